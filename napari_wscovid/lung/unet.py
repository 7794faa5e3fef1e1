"""Multi-view 2-D U-Net lung segmentation (Hu et al. 2020, IEEE Access, sec. II.C).

The same 2-D U-Net is applied to every axial, coronal and sagittal slice of the
volume resampled to an isotropic grid; a voxel is lung when at least two of the
three views call it lung (majority voting). The largest air bodies are kept and
split into right and left with the classical module's rule.

This method needs trained weights; the classical method
(:func:`napari_wscovid.lung.classical.segment_lungs_classical`) is the default of
:func:`napari_wscovid.lung.segment_lungs` and needs none. torch is imported only
inside the functions of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_wscovid.lung.classical import split_left_right

logger = logging.getLogger(__name__)

#: Isotropic grid the views are cut from; 2 mm keeps a 512 x 512 x 300 CT at about
#: 200^3 voxels, and the lung outline has no detail a U-Net would add below that.
WORK_SPACING_MM = 2.0
#: Sliding-window normalisation (paper, sec. II.C): the window of this width (HU)
#: that holds the most voxels, found in steps of ``WINDOW_STEP_HU``, maps to [0, 1].
WINDOW_WIDTH_HU = 1500.0
WINDOW_STEP_HU = 50.0
#: The U-Net halves the image four times, so inputs are padded to a multiple of 16.
SIZE_MULTIPLE = 16
#: A fused body smaller than this fraction of the largest is noise, not a lung.
MIN_COMPONENT_FRACTION = 0.1
VIEW_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}

_model_cache: dict[tuple[str, str], object] = {}


def build_lung_unet(channels: tuple[int, ...] = (16, 32, 64, 128, 256), out_channels: int = 2):
    """A small 2-D U-Net (1 input channel) as used for each view.

    Parameters
    ----------
    channels : tuple of int
        Feature channels per level; ``len(channels) - 1`` poolings.
    out_channels : int
        2 for background/lung softmax, 1 for a single lung logit.
    """
    import torch
    from torch import nn

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    class LungUNet2d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.channels = tuple(channels)
            self.down = nn.ModuleList([block(1, channels[0])])
            pairs = list(zip(channels[:-1], channels[1:], strict=True))
            self.down.extend(block(a, b) for a, b in pairs)
            self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in pairs)
            self.merge = nn.ModuleList(block(2 * a, a) for a in channels[:-1])
            self.head = nn.Conv2d(channels[0], out_channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for level, layer in enumerate(self.down):
                if level:
                    x = nn.functional.max_pool2d(x, 2)
                x = layer(x)
                skips.append(x)
            for up, merge, skip in zip(self.up[::-1], self.merge[::-1], skips[-2::-1], strict=True):
                x = merge(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    return LungUNet2d()


def load_lung_unet(path, sha256: str | None = None, *, device: str = "cpu"):
    """Load lung U-Net weights from a safetensors file.

    Parameters
    ----------
    path : str or Path
        The ``.safetensors`` file. Its metadata may hold ``channels`` (e.g.
        ``"16,32,64,128,256"``) and ``out_channels``.
    sha256 : str, optional
        Expected SHA-256 of the file; checked before anything is deserialised.
    device : str
        Torch device; "cpu" unless asked otherwise.

    Returns
    -------
    torch.nn.Module
        The model in eval mode (cached per file and hash).
    """
    import torch
    from safetensors.torch import load as load_safetensors

    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise ValueError(f"SHA-256 mismatch for {Path(path).name}: expected {sha256}, file has {digest}")
    key = (str(Path(path).resolve()), digest + device)
    if key in _model_cache:
        return _model_cache[key]
    metadata = _safetensors_metadata(data)
    channels = tuple(int(c) for c in metadata.get("channels", "16,32,64,128,256").split(","))
    model = build_lung_unet(channels, out_channels=int(metadata.get("out_channels", 2)))
    model.load_state_dict(load_safetensors(data))
    model.to(torch.device(device)).eval()
    _model_cache[key] = model
    return model


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (header only, no tensors)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    return dict(header.get("__metadata__", {}))


def sliding_window_normalise(hu: np.ndarray, width: float = WINDOW_WIDTH_HU, step: float = WINDOW_STEP_HU):
    """Map the HU window of ``width`` holding the most voxels to [0, 1] (paper, sec. II.C).

    Unlike a fixed lung window, the window follows the scanner's calibration, which
    reduces differences between centres.
    """
    values = hu[hu > -1500] if np.any(hu > -1500) else hu.ravel()  # padding is not tissue
    low, high = float(values.min()), float(values.max())
    edges = np.arange(low, max(high, low + width) + step, step)
    counts = np.histogram(values, bins=edges)[0]
    bins_per_window = max(1, int(round(width / step)))
    covered = np.convolve(counts, np.ones(bins_per_window), mode="valid")
    start = float(edges[int(np.argmax(covered))])
    return np.clip((hu.astype(np.float32) - start) / width, 0.0, 1.0).astype(np.float32)


def predict_view(model, volume01: np.ndarray, axis: int, *, batch_size: int = 16) -> np.ndarray:
    """Lung probability from 2-D slices cut along ``axis`` of a normalised volume."""
    import torch

    device = next(model.parameters()).device
    moved = np.moveaxis(volume01, axis, 0)
    h, w = moved.shape[1:]
    pad_h, pad_w = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    probs = np.empty(moved.shape, np.float32)
    with torch.inference_mode():
        for start in range(0, moved.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(moved[start : start + batch_size]))[:, None]
            batch = torch.nn.functional.pad(batch, (0, pad_w, 0, pad_h))
            logits = model(batch.to(device)).float()
            if logits.shape[1] == 1:
                prob = torch.sigmoid(logits[:, 0])
            else:
                prob = torch.softmax(logits, dim=1)[:, 1]
            probs[start : start + batch_size] = prob[:, :h, :w].cpu().numpy()
    return np.moveaxis(probs, 0, axis)


def fuse_views(probabilities: list[np.ndarray], threshold: float = 0.5, min_votes: int = 2) -> np.ndarray:
    """Majority voting: lung where at least ``min_votes`` views exceed ``threshold``."""
    votes = np.zeros(probabilities[0].shape, np.uint8)
    for prob in probabilities:
        votes += prob > threshold
    return votes >= min_votes


def keep_lung_components(mask: np.ndarray) -> np.ndarray:
    """Largest 3-D bodies only: the biggest, and others at least a tenth of its size."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes >= MIN_COMPONENT_FRACTION * sizes.max()
    keep[0] = False
    return keep[labels]


def segment_lungs_unet(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    model,
    *,
    views: tuple[str, ...] = ("axial", "coronal", "sagittal"),
    work_spacing_mm: float = WORK_SPACING_MM,
    progress: Callable[[int, int, str], None] | None = None,
) -> np.ndarray:
    """Multi-view U-Net lung labels (1 right, 2 left) on the grid of ``hu``.

    Parameters
    ----------
    hu : ndarray (z, y, x)
        Hounsfield units.
    spacing : tuple of 3 floats
        Voxel size (z, y, x) in mm.
    model : torch.nn.Module
        2-D U-Net taking (B, 1, H, W) in [0, 1], returning 1 or 2 channels.
    views : tuple of str
        Views to fuse; with three, two votes make lung.
    work_spacing_mm : float
        Isotropic grid the slices are cut from.
    progress : callable(done, total, message), optional
        Called after each view.
    """
    import torch

    total = len(views) + 2
    shape = hu.shape
    model.eval()
    work_shape = tuple(
        max(1, int(round(n * s / work_spacing_mm))) for n, s in zip(shape, spacing, strict=True)
    )
    normalised = sliding_window_normalise(hu)
    tensor = torch.from_numpy(normalised)[None, None]
    work = torch.nn.functional.interpolate(tensor, size=work_shape, mode="trilinear", align_corners=False)
    work = work[0, 0].numpy()
    if progress is not None:
        progress(1, total, "resampled")
    probabilities = []
    for done, view in enumerate(views, start=2):
        probabilities.append(predict_view(model, work, VIEW_AXES[view]))
        if progress is not None:
            progress(done, total, f"{view} view")
    fused = fuse_views(probabilities, min_votes=len(views) // 2 + 1)
    fused = torch.from_numpy(fused.astype(np.float32))[None, None]
    mask = torch.nn.functional.interpolate(fused, size=shape, mode="trilinear", align_corners=False)
    mask = keep_lung_components(mask[0, 0].numpy() > 0.5)
    labels = split_left_right(mask, spacing)
    if progress is not None:
        progress(total, total, "done")
    return labels
