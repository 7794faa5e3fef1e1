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

from napari_wscovid.lung.classical import (
    AIR_THRESHOLD_HU,
    _bounding_box,
    segment_lungs_classical,
    split_left_right,
)
from napari_wscovid.preprocess import best_window

logger = logging.getLogger(__name__)

#: Isotropic grid the views are cut from; 2 mm keeps a 512 x 512 x 300 CT at about
#: 200^3 voxels, and the lung outline has no detail a U-Net would add below that.
WORK_SPACING_MM = 2.0
#: Sliding-window normalisation (paper, sec. II.C): the window of this width (HU)
#: that holds the most voxels, found in steps of ``WINDOW_STEP_HU``, maps to [0, 1].
WINDOW_WIDTH_HU = 1500.0
WINDOW_STEP_HU = 50.0
#: Slices processed together when resampling, to bound temporary memory.
_CHUNK = 32
#: The U-Net halves the image four times, so inputs are padded to a multiple of 16.
SIZE_MULTIPLE = 16
#: A fused body smaller than this fraction of the largest is noise, not a lung.
MIN_COMPONENT_FRACTION = 0.1
VIEW_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
#: The hybrid method adds U-Net lung at most this far (3-D) from the classical lungs: on
#: phantoms with lobar consolidation 99% of the lung the classical method misses lies within
#: 17-41 mm of it (five phantoms measured), and a whole liver or heart lies farther.
MAX_ADDED_DISTANCE_MM = 50.0
#: Grid of the hybrid's distance, nearest-lung and connectivity checks.
COARSE_GRID_MM = 4.0
#: The hybrid runs the U-Net on the classical lungs' box grown by this much: the network
#: needs the chest wall around the lung as context. With 25 mm the cropped views lost Dice
#: 0.004 on the lobar CAP test phantom against the whole CT; 40 mm matches the whole CT.
UNET_MARGIN_MM = 40.0
#: Registry name (``models/weights/registry.json``, key ``lung_models``) of the bundled weights.
BUNDLED_LUNG_UNET = "lung-unet"

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
        The model in eval mode, batch norm folded into the convolutions and channels-last
        (cached per file and hash).
    """
    import torch
    from safetensors.torch import load as load_safetensors

    from napari_wscovid.models.wsnet import inference_copy

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
    # Folded and channels-last: 500 views of 176 x 176 take 2.8 s instead of 5.1 s on the
    # 2-core CPU (measured with the bundled weights).
    model = inference_copy(model).to(torch.device(device))
    _model_cache[key] = model
    return model


def bundled_lung_unet(name: str = BUNDLED_LUNG_UNET, *, device: str = "cpu"):
    """The lung U-Net shipped with the plugin, its SHA-256 checked against the registry.

    Raises FileNotFoundError (naming the file) when the weights are not installed.
    """
    from napari_wscovid.models.registry import REGISTRY_FILE, WEIGHTS_DIR

    with open(REGISTRY_FILE, encoding="utf-8") as handle:
        entries = json.load(handle).get("lung_models", {})
    if name not in entries:
        raise ValueError(f"unknown lung model {name!r}; bundled: {sorted(entries)}")
    path = WEIGHTS_DIR / entries[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lung U-Net weights not installed")
    return load_lung_unet(path, sha256=entries[name]["sha256"], device=device)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (header only, no tensors)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    return dict(header.get("__metadata__", {}))


def sliding_window_start(
    hu: np.ndarray, width: float = WINDOW_WIDTH_HU, step: float = WINDOW_STEP_HU, stride: int = 2
) -> float:
    """Lower end of the HU window of ``width`` that holds the most voxels (paper, sec. II.C).

    Unlike a fixed lung window, the window follows the scanner's calibration, which reduces
    differences between centres. The histogram is taken over every ``stride``-th pixel in-plane
    and slice by slice in blocks (no full-size temporary); padding below -1500 HU is not tissue.
    """
    low, high = np.inf, -np.inf
    for z in range(0, hu.shape[0], _CHUNK):
        values = hu[z : z + _CHUNK, ::stride, ::stride]
        values = values[values > -1500]
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if not np.isfinite(low):  # nothing above -1500: use everything
        return float(hu.min())
    n_bins = int((max(high, low + width) - low) // step) + 1
    counts = np.zeros(n_bins, np.int64)
    for z in range(0, hu.shape[0], _CHUNK):
        values = hu[z : z + _CHUNK, ::stride, ::stride]
        values = values[values > -1500]
        counts += np.bincount(((values - low) // step).astype(np.int64), minlength=n_bins)[:n_bins]
    return low + step * best_window(counts, max(1, int(round(width / step))))


def predict_view(model, volume01: np.ndarray, axis: int, *, batch_size: int = 32) -> np.ndarray:
    """Lung probability from 2-D slices cut along ``axis`` of a normalised volume.

    Batches of 32 ran 8% faster than 16 with the bundled network on the 2-core CPU.
    """
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
            batch = batch.to(device).contiguous(memory_format=torch.channels_last)
            logits = model(batch).float()
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


def to_work_grid(hu: np.ndarray, spacing, work_spacing_mm: float = WORK_SPACING_MM) -> np.ndarray:
    """The CT normalised to [0, 1] (sliding window) on an isotropic grid, as the U-Net sees it.

    Training (``training.train_lung_unet``) cuts its slices from this same grid. Trilinear
    resampling is separable, so it is done as bilinear per block of slices, then linear
    along z: a full-resolution float copy of a 600-slice CT would cost 630 MB.
    """
    work_shape = tuple(
        max(1, int(round(n * s / work_spacing_mm))) for n, s in zip(hu.shape, spacing, strict=True)
    )
    start = sliding_window_start(hu)

    def normalise(block: np.ndarray) -> np.ndarray:
        return np.clip((block.astype(np.float32) - start) / WINDOW_WIDTH_HU, 0.0, 1.0)

    return resample_linear(hu, work_shape, transform=normalise)


def upsample_mask(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A work-grid mask on the CT's grid: trilinear (separable, in blocks) then > 0.5."""
    planes = _resize_z(mask.astype(np.float32), shape[0])
    out = np.empty(shape, bool)
    for z in range(0, shape[0], _CHUNK):
        out[z : z + _CHUNK] = _resize_planes(planes[z : z + _CHUNK], shape[1:]) > 0.5
    return out


def _resize_planes(block: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) resize of each (y, x) plane of a float32 block."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[:, None]
    out = torch.nn.functional.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


def _resize_z(planes: np.ndarray, n_out: int) -> np.ndarray:
    """Linear (align_corners=False) resampling of a (z, y, x) float32 array along z only."""
    import torch

    nz, ny, nx = planes.shape
    if nz == n_out:
        return planes
    columns = torch.from_numpy(np.ascontiguousarray(planes)).reshape(nz, ny * nx).T[None]
    out = torch.nn.functional.interpolate(columns, size=n_out, mode="linear", align_corners=False)
    return np.ascontiguousarray(out[0].T.reshape(n_out, ny, nx).numpy())


def resample_linear(array: np.ndarray, shape: tuple[int, ...], transform=None) -> np.ndarray:
    """Trilinear resampling of a (z, y, x) array to ``shape``, ``transform`` applied to each block first."""
    planes = np.empty((array.shape[0], *shape[1:]), np.float32)
    for z in range(0, array.shape[0], _CHUNK):
        block = array[z : z + _CHUNK]
        planes[z : z + _CHUNK] = _resize_planes(transform(block) if transform else block, shape[1:])
    return _resize_z(planes, shape[0])


def unet_lung_mask(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    model,
    *,
    views: tuple[str, ...] = ("axial", "coronal", "sagittal"),
    work_spacing_mm: float = WORK_SPACING_MM,
    progress: Callable[[int, int, str], None] | None = None,
    box: tuple[slice, slice, slice] | None = None,
) -> np.ndarray:
    """Boolean lung mask on the grid of ``hu`` from the views' fused votes (no clean-up).

    With ``box`` (a tuple of three slices) only that part of the CT is looked at; the mask is
    False elsewhere.
    """
    if box is not None:
        mask = np.zeros(hu.shape, bool)
        mask[box] = unet_lung_mask(
            hu[box],
            spacing,
            model,
            views=views,
            work_spacing_mm=work_spacing_mm,
            progress=progress,
        )
        return mask
    model.eval()
    total = len(views) + 2
    work = to_work_grid(hu, spacing, work_spacing_mm)
    if progress is not None:
        progress(1, total, "resampled")
    probabilities = []
    for done, view in enumerate(views, start=2):
        probabilities.append(predict_view(model, work, VIEW_AXES[view]))
        if progress is not None:
            progress(done, total, f"{view} view")
    fused = fuse_views(probabilities, min_votes=len(views) // 2 + 1)
    return upsample_mask(fused, hu.shape)


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
    mask = unet_lung_mask(hu, spacing, model, views=views, work_spacing_mm=work_spacing_mm, progress=progress)
    return split_left_right(keep_lung_components(mask), spacing)


def segment_lungs_hybrid(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    model,
    *,
    superior_is_up: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> np.ndarray:
    """Classical lungs plus the dense lung the U-Net finds around them (1 right, 2 left).

    The classical method outlines aerated lung precisely (Dice 0.996 on lesion-free
    phantoms) but cannot tell consolidation abutting the chest wall or mediastinum from
    the wall itself: both are soft tissue. The U-Net sees the shape of the thoracic
    cavity, so its mask adds exactly what thresholds miss. Only U-Net voxels denser than
    the air threshold are added (aerated voxels the classical method left out are
    trachea, bowel gas or outside air on purpose), and only in 3-D components that touch
    the classical lungs; each added voxel takes the label of the nearest classical lung.
    """
    # classical, the U-Net's resampling and three views, then the merge
    total = 6

    def report(done: int, message: str) -> None:
        if progress is not None:
            progress(done, total, message)

    classical = segment_lungs_classical(hu, spacing, superior_is_up=superior_is_up)
    report(1, "classical lungs")
    if not classical.any():
        return classical
    # The U-Net looks only at the classical lungs' box grown by UNET_MARGIN_MM: the box spans
    # every slice's widest lung, so lesions at the edge of one slice's lung lie inside it.
    grow = [int(np.ceil(UNET_MARGIN_MM / s)) for s in spacing]
    around = tuple(
        slice(max(0, sl.start - g), min(n, sl.stop + g))
        for sl, g, n in zip(_bounding_box(classical > 0, pad=0), grow, hu.shape, strict=True)
    )
    learned = unet_lung_mask(
        hu,
        spacing,
        model,
        box=around,
        progress=lambda done, _total, message: report(1 + done, f"U-Net {message}"),
    )
    # In place: on a 600-slice CT every full-size temporary is 160 MB (bool) or more.
    added = learned
    added &= classical == 0
    added &= hu >= AIR_THRESHOLD_HU
    # A safety net against a U-Net gone wrong on an unfamiliar scan: nothing is added in
    # slices without aerated lung, nor farther than MAX_ADDED_DISTANCE_MM from it, nor where
    # it does not connect to it.
    added[~classical.any(axis=(1, 2))] = False
    if not added.any():
        report(total, "done")
        return classical
    # Distances, nearest lung and connectivity on a ~4 mm grid: labelling the full grid of a
    # 300 x 512 x 512 CT alone takes 1 s here, the coarse grid a few hundredths.
    steps = [max(1, int(round(COARSE_GRID_MM / s))) for s in spacing]
    seeds = classical[:: steps[0], :: steps[1], :: steps[2]]
    distance, nearest = ndimage.distance_transform_edt(
        seeds == 0, sampling=[s * k for s, k in zip(spacing, steps, strict=True)], return_indices=True
    )
    owner = seeds[tuple(nearest)]
    del nearest
    # Distances to the sampled lung are never shorter than to the lung itself: the cap holds.
    owner[distance > MAX_ADDED_DISTANCE_MM] = 0
    zz, yy, xx = np.nonzero(added)
    cells = (zz // steps[0], yy // steps[1], xx // steps[2])
    coarse_added = np.zeros(seeds.shape, bool)
    coarse_added[cells] = True
    coarse_lung = seeds > 0
    components, n = ndimage.label(coarse_added | coarse_lung, structure=np.ones((3, 3, 3), bool))
    touching = np.bincount(components[coarse_lung], minlength=n + 1) > 0
    touching[0] = False
    owner[~touching[components]] = 0
    new_labels = owner[cells]
    keep = new_labels > 0
    labels = classical.copy()
    labels[zz[keep], yy[keep], xx[keep]] = new_labels[keep]
    report(total, "done")
    return labels
