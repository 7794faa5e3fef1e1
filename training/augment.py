"""The paper's on-the-fly augmentation (section II.G.3) on batches of (N, 1, S, S) tensors.

Centre crop with a random scale in [0.7, 1] resized to the output size, rotation in [-25, 25]
degrees and a horizontal flip with p = 0.5 are one affine map per image, so they are applied
together with a single ``grid_sample`` (one interpolation instead of three, and batched).
Contrast follows TensorFlow's ``adjust_contrast`` (the paper used TF 1.14):
``(x - mean) * factor + mean`` per image with a factor in [0.5, 1.5], clipped to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Ranges of the random augmentation; the defaults are the paper's."""

    scale: tuple[float, float] = (0.7, 1.0)
    max_rotation_deg: float = 25.0
    flip_p: float = 0.5
    contrast: tuple[float, float] = (0.5, 1.5)
    clip: tuple[float, float] | None = (0.0, 1.0)


def random_affine_params(n: int, config: AugmentConfig, generator: torch.Generator) -> dict:
    """Draw per-image scale, angle (radians), flip sign and contrast factor."""

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    return {
        "scale": uniform(*config.scale),
        "angle": uniform(-config.max_rotation_deg, config.max_rotation_deg) * (math.pi / 180.0),
        "flip": torch.where(torch.rand(n, generator=generator) < config.flip_p, -1.0, 1.0),
        "contrast": uniform(*config.contrast),
    }


def affine_theta(scale: torch.Tensor, angle: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) sampling matrices: output grid -> input coordinates in [-1, 1].

    A centre crop of relative size ``scale`` resized to the full output samples the input at
    ``scale * R(angle) * F(flip) * p``; the flip acts on the output x axis.
    """
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(scale)
    row0 = torch.stack([cos * flip, -sin, zero], dim=1)
    row1 = torch.stack([sin * flip, cos, zero], dim=1)
    return torch.stack([row0, row1], dim=1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF-style contrast: scale each image's deviation from its own mean by ``factor`` (N,)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1).to(x) + mean


class Augment:
    """Seeded, batched random augmentation; ``Augment(seed=0)(x)`` is reproducible.

    Parameters
    ----------
    config : AugmentConfig, optional
        Ranges; the paper's by default.
    out_size : int, optional
        Output side length; the input's by default (the paper resizes crops to 224).
    seed : int
        Seed of the private generator, so augmentation does not disturb (or depend on) torch's
        global random state.
    """

    def __init__(self, config: AugmentConfig | None = None, out_size: int | None = None, seed: int = 0):
        self.config = config or AugmentConfig()
        self.out_size = out_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        size = self.out_size or h
        p = random_affine_params(n, self.config, self.generator)
        theta = affine_theta(p["scale"], p["angle"], p["flip"]).to(x)
        grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
        # Zero padding: inputs are lung-masked, so the background is already 0.
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = adjust_contrast(out, p["contrast"])
        if self.config.clip is not None:
            out = out.clamp(*self.config.clip)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
