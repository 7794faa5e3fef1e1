"""The paper's on-the-fly augmentation (section II.G.3) on batches of (N, 1, S, S) tensors.

Centre crop with a random scale in [0.7, 1] resized to the output size, rotation in [-25, 25]
degrees and a horizontal flip with p = 0.5 are one affine map per image, so they are applied
together with a single ``grid_sample`` (one interpolation instead of three, and batched).
Contrast follows TensorFlow's ``adjust_contrast`` (the paper used TF 1.14):
``(x - mean) * factor + mean`` per image with a factor in [0.5, 1.5], clipped to [0, 1].

:data:`SCANNER_AUGMENT` adds what the paper did not need (its 150 patients came from many
scanners) and six real backgrounds do not provide: a smooth elastic warp, so that no two
presentations of a lesion-free slice are the same anatomy (a network can otherwise learn the
few negatives by heart and call every unseen normal lung abnormal), and the reconstruction kernel
and dose of other scanners (a Gaussian blur or an unsharp mask, additive noise inside the lungs).
All of it is batched on the batch's device: MONAI's per-sample dictionary transforms exist on the
CPU machine but not on the GPU machine, and one ``grid_sample`` keeps a single interpolation.
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
    # scanner and anatomy variation (off by default: the paper's recipe; see SCANNER_AUGMENT)
    elastic_p: float = 0.0
    elastic_magnitude: float = 0.0  # displacement sd, in units of the half image width
    elastic_grid: int = 5  # control points per side of the smooth displacement field
    kernel_p: float = 0.0  # chance of a blur or (equally likely) an unsharp mask
    blur_sigma_px: tuple[float, float] = (0.4, 1.2)
    sharpen_amount: tuple[float, float] = (0.3, 1.0)
    noise_std: tuple[float, float] = (0.0, 0.0)  # in normalised units (1 = 1500 HU)


#: Elastic warps on most images, another scanner's kernel on half, noise of 0-45 HU.
SCANNER_AUGMENT = AugmentConfig(elastic_p=0.8, elastic_magnitude=0.025, kernel_p=0.5, noise_std=(0.0, 0.03))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def random_affine_params(n: int, config: AugmentConfig, generator: torch.Generator) -> dict:
    """Draw per-image scale, angle (radians), flip sign and contrast factor."""

    def uniform(lo, hi):
        return _uniform(n, lo, hi, generator)

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


def elastic_offsets(n: int, size: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(N, size, size, 2) smooth random displacements in grid units; zero for unwarped images."""
    k = config.elastic_grid
    coarse = torch.randn(n, 2, k, k, generator=generator) * config.elastic_magnitude
    coarse *= (torch.rand(n, generator=generator) < config.elastic_p).view(-1, 1, 1, 1)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (N, 1, H, W) with its own sigma (pixels): one grouped convolution."""
    radius = int(math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kern = torch.exp(-0.5 * (t[None] / sigma.to(x)[:, None]) ** 2)
    kern = kern / kern.sum(1, keepdim=True)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    k = kern.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def scanner_variation(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Another reconstruction kernel (blur or unsharp mask) and dose (noise), inside the content only.

    The inputs are lung-masked (0 outside), so the mask is kept: blurring does not spread lung
    into the black surround and noise is not painted on it.
    """
    n = x.shape[0]

    def uniform(lo, hi):
        return _uniform(n, lo, hi, generator)

    inside = x > 0
    which = torch.rand(n, generator=generator)
    blur_on = which < config.kernel_p / 2
    sharpen_on = (which >= config.kernel_p / 2) & (which < config.kernel_p)
    sigma = uniform(*config.blur_sigma_px)
    amount = uniform(*config.sharpen_amount) * sharpen_on
    noise = uniform(*config.noise_std)
    gaussian = torch.randn(x.shape, generator=generator).to(x)
    if blur_on.any() or sharpen_on.any():
        blurred = _gaussian_blur(x, sigma)
        x = torch.where(blur_on.to(x.device).view(-1, 1, 1, 1), blurred, x)
        x = x + amount.to(x).view(-1, 1, 1, 1) * (x - blurred)
    x = x + noise.to(x).view(-1, 1, 1, 1) * gaussian
    return torch.where(inside, x, torch.zeros_like(x))


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
        if self.config.elastic_p > 0:
            grid = grid + elastic_offsets(n, size, self.config, self.generator).to(grid)
        # Zero padding: inputs are lung-masked, so the background is already 0.
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.config.kernel_p > 0 or self.config.noise_std[1] > 0:
            out = scanner_variation(out, self.config, self.generator)
        out = adjust_contrast(out, p["contrast"])
        if self.config.clip is not None:
            out = out.clamp(*self.config.clip)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
