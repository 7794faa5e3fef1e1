"""Class activation maps of a WSNet pass made into volumes for display."""

from __future__ import annotations

import numpy as np

from napari_wscovid.stages import to_uint8

#: Lung slices whose CAMs are upsampled together (bounds the float temporaries).
CAM_BLOCK_SLICES = 32


def cam_volume(
    lowres: np.ndarray, crops: list, lung_idx: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """One class's CAMs of the lung slices, pasted back onto the CT grid as a uint8 volume.

    ``lowres`` is (n, h, w) at the scale's own resolution, one map per slice of ``lung_idx``
    (whose ``crops`` came from ``prepare_slices``). Negative evidence is dropped (ReLU), as in
    Zhou et al.'s CAM: the score is a global max, so only positive responses can have made it.
    One factor for the whole volume (its peak) keeps slices comparable at a fixed 0-1 contrast;
    the slice probabilities say how strong each slice is.
    """
    from napari_wscovid.preprocess import maps_to_slice

    raw = np.maximum(lowres, 0)
    out = np.zeros(shape, dtype=np.uint8)
    peak = float(raw.max()) if raw.size else 0.0
    if peak <= 0:
        return out
    # In blocks: the float maps of all 520 lung slices of a 600-slice CT would take 545 MB.
    for first in range(0, len(lung_idx), CAM_BLOCK_SLICES):
        block = slice(first, first + CAM_BLOCK_SLICES)
        full = maps_to_slice(raw[block] / peak, crops[block], shape[1:])
        out[lung_idx[block]] = to_uint8(full)
    return out
