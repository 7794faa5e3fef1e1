"""The network's input, shared by the detection pipeline and training.

Two steps, both documented in Hu et al. 2020 (IEEE Access), sections II.C and II.G:

1. Intensity normalisation to [0, 1] (:func:`normalise`): a fixed HU window, or the paper's
   sliding window W(Q, S), which slides a window of width Q HU in steps of S HU over the
   histogram of the (lung) voxels and keeps the position that covers the most voxels.
2. Per slice, a square crop around the lungs resized to the network's input size
   (:func:`prepare_slices`), and the inverse mapping that pastes low-resolution maps (CAMs,
   saliency) back onto the slice (:func:`maps_to_slice`).

Padding voxels (BAD_INPUTS case 26) never enter the statistics. A volume that is not in HU
(case 27, e.g. an 8-bit PNG) is scaled by percentiles and the returned
:class:`IntensityRange` says so in its ``note``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

NORMALISATIONS = ("window", "sliding")

# Fixed lung window (centre -600 HU, width 1500 HU): air just above 0, soft tissue near 1.
DEFAULT_WINDOW = (-1350.0, 150.0)
# W(Q, S): the paper gives no values. Q = 1500 HU matches the width of the fixed window so the
# two methods differ only in where the window sits; S = 10 HU is finer than any scanner offset
# we care about and keeps the histogram cheap.
DEFAULT_Q = 1500.0
DEFAULT_S = 10.0
# Percentiles used for non-HU (display-intensity) input, robust to a few saturated pixels.
DISPLAY_PERCENTILES = (0.5, 99.5)
# HU at or below this are padding / outside the field of view (-2000, -3024 are common
# PixelPaddingValues); real air is about -1000 HU.
PADDING_HU = -1500.0

# Chosen by measurement: ``python benchmarks/bench_normalisation.py`` (three COVID-CT-MD series,
# the normal one shifted by +-40 HU, with contrast-enhanced vessels or a lung mask grown into
# the chest wall, one slice in 16 transfer syntaxes, three phantoms). Sum of the spreads (std
# across images of the normalised lung median and of lung/soft-tissue or lesion contrast):
# window 0.065, sliding W(1500,10) on lung voxels 0.188, W(1000,10) 0.274. The sliding window
# only wins on a pure scanner offset (lung std 0.000 vs 0.022); enhanced vessels or a sloppy
# mask move it by hundreds of HU (lung std 0.145 vs 0.000), because with Q wider than the lung
# histogram the tie-break centres it on the extremes. On all voxels (W(1500,10) body) it
# pushed the lung of the transfer-syntax slice to 0 (black).
DEFAULT_NORMALISATION = "window"


@dataclass(frozen=True)
class IntensityRange:
    """The intensities mapped to 0 and 1, how they were chosen, and a note for the user."""

    lo: float
    hi: float
    method: str  # "window", "sliding" or "percentile" (non-HU input)
    note: str = ""


@dataclass(frozen=True)
class SliceCrop:
    """Where a network input came from: rows ``y0:y1`` and columns ``x0:x1`` of slice ``slice``.

    The bounds are in slice voxels, end-exclusive, and may extend beyond the image (the crop
    was padded there). ``size`` is the side of the square network input it was resized to.
    """

    slice: int
    y0: int
    x0: int
    y1: int
    x1: int
    size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def normalisation_spec(normalisation: str | Mapping | None) -> dict:
    """A normalisation given as a name or a dict (as stored with a model) -> a full dict.

    ``{"method": "window", "window": [lo, hi]}`` or ``{"method": "sliding", "q": Q, "s": S}``.
    """
    if normalisation is None:
        normalisation = DEFAULT_NORMALISATION
    spec = {"method": normalisation} if isinstance(normalisation, str) else dict(normalisation)
    method = spec.get("method")
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation method must be one of {NORMALISATIONS}, got {method!r}")
    if method == "window":
        spec["window"] = [float(v) for v in spec.get("window", DEFAULT_WINDOW)]
    else:
        spec["q"] = float(spec.get("q", DEFAULT_Q))
        spec["s"] = float(spec.get("s", DEFAULT_S))
    return spec


def _stat_values(hu, stats_mask, padding_mask, is_hu: bool) -> tuple[np.ndarray, str]:
    """Voxels the statistics are computed on, and a word for which ones."""
    valid = np.ones(hu.shape, dtype=bool) if padding_mask is None else ~np.asarray(padding_mask, bool)
    if is_hu:
        valid &= hu > PADDING_HU
    if stats_mask is not None:
        inside = valid & (np.asarray(stats_mask) > 0)
        if inside.any():
            return hu[inside], "lung"
    return hu[valid], "non-padding"


def sliding_window(values: np.ndarray, q: float = DEFAULT_Q, s: float = DEFAULT_S) -> tuple[float, float]:
    """W(Q, S): the range ``[lo, lo + q]`` with ``lo`` on an ``s`` grid covering most ``values``.

    When several positions cover the same (largest) count, which is the rule when the values
    span less than ``q``, the middle one is taken, so the window is centred on the data.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if q <= 0 or s <= 0:
        raise ValueError(f"sliding window needs q > 0 and s > 0, got q={q}, s={s}")
    if values.size == 0:
        raise ValueError("sliding window: no voxels to compute the histogram on")
    vmin, vmax = float(values.min()), float(values.max())
    n_window = max(1, int(round(q / s)))
    edges_lo = np.floor(vmin / s) * s - n_window * s
    n_bins = int(np.ceil((vmax - edges_lo) / s)) + 1
    counts = np.bincount(((values - edges_lo) // s).astype(np.int64), minlength=n_bins)
    counts = np.concatenate([counts, np.zeros(n_window, dtype=counts.dtype)])
    lo = edges_lo + best_window(counts, n_window) * s
    return float(lo), float(lo + n_window * s)


def best_window(counts: np.ndarray, n_window: int) -> int:
    """First bin of the ``n_window`` consecutive histogram bins that hold the most counts.

    Among equally full positions the middle one is taken. Shared by :func:`sliding_window`
    and the lung U-Net's whole-volume normalisation, which builds its histogram in blocks.
    """
    cum = np.concatenate([[0], np.cumsum(counts)])
    covered = cum[n_window:] - cum[:-n_window]  # covered[k]: bins k .. k + n_window - 1
    best = np.flatnonzero(covered == covered.max())
    return int(best[len(best) // 2])


def intensity_range(
    hu: np.ndarray,
    method: str = DEFAULT_NORMALISATION,
    *,
    window: Sequence[float] = DEFAULT_WINDOW,
    q: float = DEFAULT_Q,
    s: float = DEFAULT_S,
    stats_mask: np.ndarray | None = None,
    padding_mask: np.ndarray | None = None,
    is_hu: bool = True,
) -> IntensityRange:
    """The range that :func:`normalise` maps to [0, 1].

    Parameters
    ----------
    hu : ndarray
        Intensities, HU when ``is_hu``.
    method : {"window", "sliding"}
        Fixed HU ``window``, or the sliding window W(``q``, ``s``) over the voxels of
        ``stats_mask`` (the lungs; all non-padding voxels when it is None or empty).
    padding_mask : ndarray of bool, optional
        Voxels excluded from the statistics; HU at or below ``PADDING_HU`` always are.
    is_hu : bool
        False for display intensities: the ``DISPLAY_PERCENTILES`` of the non-padding voxels
        are used whatever ``method`` says, and ``note`` says so.
    """
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation method must be one of {NORMALISATIONS}, got {method!r}")
    hu = np.asarray(hu)
    if not is_hu:
        values, _ = _stat_values(hu, None, padding_mask, is_hu=False)
        lo, hi = (float(v) for v in np.percentile(values, DISPLAY_PERCENTILES)) if values.size else (0, 1)
        if hi <= lo:
            hi = lo + 1.0
        note = (
            f"input is not in HU (display intensities): scaled by its "
            f"{DISPLAY_PERCENTILES[0]}-{DISPLAY_PERCENTILES[1]} percentiles [{lo:g}, {hi:g}] "
            f"instead of the {method!r} HU normalisation"
        )
        return IntensityRange(lo, hi, "percentile", note)
    if method == "window":
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"window must be (lo, hi) with hi > lo, got {tuple(window)}")
        return IntensityRange(lo, hi, "window")
    values, where = _stat_values(hu, stats_mask, padding_mask, is_hu=True)
    if values.size == 0:
        lo, hi = DEFAULT_WINDOW
        note = "sliding window: no non-padding voxels; used the fixed window instead"
        return IntensityRange(lo, hi, "window", note)
    lo, hi = sliding_window(values, q, s)
    return IntensityRange(lo, hi, "sliding", f"sliding window W({q:g}, {s:g}) over {where} voxels")


def normalise(
    hu: np.ndarray,
    method: str = DEFAULT_NORMALISATION,
    *,
    window: Sequence[float] = DEFAULT_WINDOW,
    q: float = DEFAULT_Q,
    s: float = DEFAULT_S,
    stats_mask: np.ndarray | None = None,
    padding_mask: np.ndarray | None = None,
    is_hu: bool = True,
    intensity: IntensityRange | None = None,
    return_range: bool = False,
):
    """Map intensities to float32 in [0, 1]; padding voxels become 0.

    Parameters are those of :func:`intensity_range`; ``intensity`` skips its computation
    (e.g. one range for a whole volume). Returns the array, or ``(array, IntensityRange)``
    when ``return_range``. A non-HU note is also logged at INFO level.
    """
    hu = np.asarray(hu)
    if intensity is None:
        intensity = intensity_range(
            hu, method, window=window, q=q, s=s, stats_mask=stats_mask,
            padding_mask=padding_mask, is_hu=is_hu,
        )  # fmt: skip
    if intensity.note:
        logger.info("%s", intensity.note)
    out = _scale(hu, intensity)
    pad = _padding(hu, padding_mask, is_hu)
    if pad is not None:
        out[pad] = 0.0
    return (out, intensity) if return_range else out


def _scale(hu: np.ndarray, intensity: IntensityRange) -> np.ndarray:
    scale = np.float32(1.0 / (intensity.hi - intensity.lo))
    out = (hu.astype(np.float32) - np.float32(intensity.lo)) * scale
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _padding(hu: np.ndarray, padding_mask, is_hu: bool) -> np.ndarray | None:
    pad = None if padding_mask is None else np.asarray(padding_mask, bool)
    if is_hu:
        below = hu <= PADDING_HU
        pad = below if pad is None else (pad | below)
    return pad


def model_intensity_range(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    normalisation: str | Mapping | None = DEFAULT_NORMALISATION,
    *,
    padding_mask: np.ndarray | None = None,
    is_hu: bool = True,
) -> IntensityRange:
    """The range :func:`prepare_slices` maps to [0, 1]; compute it once per volume.

    A fixed HU window needs no statistics. Non-HU percentiles and the sliding window come from
    the whole volume, so a slice is normalised the same whichever batch it is in.
    """
    spec = normalisation_spec(normalisation)
    if spec["method"] == "window" and is_hu:
        return IntensityRange(*spec["window"], "window")
    return volume_intensity_range(
        hu, lung_mask if is_hu else None, spec, padding_mask=padding_mask, is_hu=is_hu
    )


def volume_intensity_range(
    hu: np.ndarray,
    lung_mask: np.ndarray | None,
    normalisation: str | Mapping | None = None,
    *,
    padding_mask: np.ndarray | None = None,
    is_hu: bool = True,
) -> IntensityRange:
    """One :class:`IntensityRange` for a whole volume, from a strided subsample (fast).

    Compute it once and pass it to :func:`prepare_slices` as ``intensity`` so every batch of
    slices is normalised alike, whatever the batch size.
    """
    spec = normalisation_spec(normalisation)
    step = (slice(None, None, 2), slice(None, None, 2), slice(None, None, 2))
    hu = np.asarray(hu)
    sub = hu[step] if hu.ndim == 3 else hu
    mask = None if lung_mask is None else (np.asarray(lung_mask)[step] if hu.ndim == 3 else lung_mask)
    pad = None if padding_mask is None else (np.asarray(padding_mask)[step] if hu.ndim == 3 else padding_mask)
    return intensity_range(
        sub, spec["method"], window=spec.get("window", DEFAULT_WINDOW), q=spec.get("q", DEFAULT_Q),
        s=spec.get("s", DEFAULT_S), stats_mask=mask, padding_mask=pad, is_hu=is_hu,
    )  # fmt: skip


def square_crop(
    mask2d: np.ndarray, slice_index: int, *, size: int, margin_mm: float, spacing_yx: Sequence[float]
) -> SliceCrop:
    """Bounding box of ``mask2d`` grown by ``margin_mm`` and made square in millimetres.

    Square in mm (not voxels) keeps the anatomy's aspect ratio after resizing to a square
    input when pixels are not square (BAD_INPUTS case 20). An empty mask gives the whole slice.
    """
    dy, dx = (float(v) for v in spacing_yx)
    ny, nx = mask2d.shape
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        y0, y1, x0, x1 = 0.0, float(ny), 0.0, float(nx)
    else:
        y0, y1 = rows[0] - margin_mm / dy, rows[-1] + 1 + margin_mm / dy
        x0, x1 = cols[0] - margin_mm / dx, cols[-1] + 1 + margin_mm / dx
    side_mm = max((y1 - y0) * dy, (x1 - x0) * dx)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    h, w = max(1, int(round(side_mm / dy))), max(1, int(round(side_mm / dx)))
    top, left = int(round(cy - h / 2)), int(round(cx - w / 2))
    return SliceCrop(int(slice_index), top, left, top + h, left + w, int(size))


def _cut(image: np.ndarray, crop: SliceCrop, fill=0) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` with ``fill`` where the crop extends beyond the image."""
    out = np.full(crop.shape, fill, dtype=image.dtype)
    ny, nx = image.shape
    sy0, sy1 = max(crop.y0, 0), min(crop.y1, ny)
    sx0, sx1 = max(crop.x0, 0), min(crop.x1, nx)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - crop.y0 : sy1 - crop.y0, sx0 - crop.x0 : sx1 - crop.x0] = image[sy0:sy1, sx0:sx1]
    return out


_one_core: ThreadPoolExecutor | None = None
_one_core_lock = threading.Lock()


def _one_core_thread() -> ThreadPoolExecutor:
    """A long-lived thread whose torch operations run on one core.

    A single slice is too small to split, and on a busy machine torch's thread pool made the
    resize 3-4x slower (300 slices: 5.4 s vs 2.1 s with the load average at 6 on 2 cores).
    ``torch.set_num_threads`` also sets the count of every thread that starts using torch
    afterwards, so setting and restoring it around each call, from concurrent workers (a run
    and the dock's slice explanation), could leave all later threads on one core. It is set
    here once, in this thread only, and the default restored at once.
    """
    global _one_core
    with _one_core_lock:
        if _one_core is None:
            import torch

            default = torch.get_num_threads()
            pool = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="wscovid-one-core",
                initializer=_use_one_core,
            )
            pool.submit(int).result()  # the thread exists and is set to one core
            torch.set_num_threads(default)
            _one_core = pool
    return _one_core


def _forget_one_core_thread() -> None:
    # A forked child (a DataLoader worker) has the executor but not its thread: work handed to it
    # would wait for ever. The child makes its own on first use.
    global _one_core, _one_core_lock
    _one_core, _one_core_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_one_core_thread)


def _use_one_core() -> None:
    import torch

    # A thread takes torch's default count at its first use of torch, overriding any count set
    # before it: use torch first, then set.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _resize(images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of 2-D float arrays to one ``size``, anti-aliased when shrinking (torch,
    ~1 ms a slice), on one core (:func:`_one_core_thread`); stacked (N, *size)."""
    out = np.empty((len(images), *size), dtype=np.float32)
    for i, image in enumerate(_resize_each(images, [size] * len(images))):
        out[i] = image
    return out


def _resize_each(images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """:func:`_resize` with a size per image, in one hand-over to the one-core thread (a hand-over
    costs ~0.7 ms: one per map doubled the time to paste 112 maps back)."""
    return _one_core_thread().submit(_resize_here, images, sizes).result()


def _resize_here(images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for image, size in zip(images, sizes, strict=True):
            t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
            shrink = t.shape[-2] > size[0] or t.shape[-1] > size[1]
            r = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
            out.append(r[0, 0].numpy())
    return out


def _disk(radius_yx: tuple[float, float]) -> np.ndarray:
    ry, rx = (max(r, 1e-6) for r in radius_yx)
    iy, ix = int(np.floor(ry)), int(np.floor(rx))
    yy, xx = np.mgrid[-iy : iy + 1, -ix : ix + 1]
    return (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0


def prepare_slices(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    slice_indices: Sequence[int],
    *,
    size: int = 224,
    normalisation: str | Mapping | None = DEFAULT_NORMALISATION,
    mask_outside_lung: bool = True,
    margin_mm: float = 10.0,
    dilate_mm: float = 3.0,
    spacing_yx: Sequence[float] = (1.0, 1.0),
    padding_mask: np.ndarray | None = None,
    is_hu: bool = True,
    intensity: IntensityRange | None = None,
) -> tuple[np.ndarray, list[SliceCrop]]:
    """Network inputs for the given slices of a (z, y, x) volume.

    Per slice: the lung bounding box grown by ``margin_mm``, made square in mm and centred
    (padded with 0 beyond the image), normalised, zeroed outside the lung mask dilated by
    ``dilate_mm`` (when ``mask_outside_lung``), and resized to ``size`` x ``size``.

    Pass only lung slices: a slice without lung gets the whole slice as its crop and, when
    masked, an all-zero input. ``intensity`` (see :func:`volume_intensity_range`) fixes the
    range for every slice; without it a fixed window needs nothing and a sliding window is
    computed from the whole volume on each call.

    Returns
    -------
    x : ndarray, float32, shape (N, 1, size, size)
    crops : list of SliceCrop
        Where each input came from; :func:`maps_to_slice` uses them to paste maps back.
    """
    hu = np.asarray(hu)
    lung_mask = np.asarray(lung_mask)
    if hu.ndim != 3 or lung_mask.shape != hu.shape:
        raise ValueError(f"hu must be (z, y, x) and lung_mask alike, got {hu.shape} and {lung_mask.shape}")
    indices = [int(z) for z in np.asarray(slice_indices, dtype=int).ravel()]
    if intensity is None:
        intensity = model_intensity_range(
            hu, lung_mask, normalisation, padding_mask=padding_mask, is_hu=is_hu
        )
    if intensity.note:
        logger.info("%s", intensity.note)
    dy, dx = (float(v) for v in spacing_yx)
    footprint = _disk((dilate_mm / dy, dilate_mm / dx)) if dilate_mm > 0 else None
    crops: list[SliceCrop] = []
    tiles: list[np.ndarray] = []
    for z in indices:
        lung2d = lung_mask[z] > 0
        crop = square_crop(lung2d, z, size=size, margin_mm=margin_mm, spacing_yx=(dy, dx))
        raw = _cut(hu[z], crop, fill=0)
        tile = _scale(raw, intensity)
        # Beyond the image counts as padding, like the volume's own padding voxels.
        pad = _cut(np.zeros(hu.shape[1:], bool), crop, fill=True)
        if padding_mask is not None:
            pad |= _cut(np.asarray(padding_mask[z], bool), crop, fill=True)
        if is_hu:
            pad |= raw <= PADDING_HU
        tile[pad] = 0.0
        if mask_outside_lung:
            inside = _cut(lung2d, crop, fill=False)
            if footprint is not None and inside.any():
                inside = ndimage.binary_dilation(inside, structure=footprint)
            tile[~inside] = 0.0
        crops.append(crop)
        tiles.append(tile)
    x = _resize(tiles, (size, size))[:, None] if tiles else np.zeros((0, 1, size, size), np.float32)
    np.clip(x, 0.0, 1.0, out=x)
    return x, crops


def maps_to_slice(maps: np.ndarray, crops: Sequence[SliceCrop], slice_shape: Sequence[int]) -> np.ndarray:
    """Paste per-input maps (N, h, w) back into slice coordinates (N, Y, X); zero outside crops.

    Each map is resized (bilinear, pixel centres aligned as in :func:`prepare_slices`) to its
    crop's extent, and the part of the crop inside the image is kept.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or len(maps) != len(crops):
        raise ValueError(f"maps must be (N, h, w) with N = len(crops) = {len(crops)}, got {maps.shape}")
    ny, nx = (int(v) for v in slice_shape)
    out = np.zeros((len(crops), ny, nx), dtype=np.float32)
    resized = _resize_each(maps, [crop.shape for crop in crops])
    for i, (full, crop) in enumerate(zip(resized, crops, strict=True)):
        sy0, sy1 = max(crop.y0, 0), min(crop.y1, ny)
        sx0, sx1 = max(crop.x0, 0), min(crop.x1, nx)
        if sy1 > sy0 and sx1 > sx0:
            out[i, sy0:sy1, sx0:sx1] = full[sy0 - crop.y0 : sy1 - crop.y0, sx0 - crop.x0 : sx1 - crop.x0]
    return out
