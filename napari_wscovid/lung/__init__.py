"""Lung segmentation of chest CT: 1 = right lung, 2 = left lung.

In LPS orientation (``CTVolume``) the right lung lies at small x (column index).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from napari_wscovid.lung.classical import LEFT, RIGHT, segment_lungs_classical

__all__ = ["LEFT", "RIGHT", "segment_lungs", "lung_volumes_ml"]

logger = logging.getLogger(__name__)


def segment_lungs(
    volume,
    method: str = "classical",
    *,
    spacing: tuple[float, float, float] | None = None,
    model=None,
    progress: Callable[[int, int, str], None] | None = None,
) -> np.ndarray:
    """Segment and label both lungs.

    Parameters
    ----------
    volume : CTVolume or ndarray (z, y, x)
        The CT in HU. A bare array needs ``spacing`` and is assumed to be ordered
        feet-to-head with x increasing towards the patient's left (LPS).
    method : {"classical", "unet"}
        "classical" (default) needs no weights: thresholds, morphology and pleural
        filling. "unet" runs the multi-view U-Net given as ``model`` (see
        :func:`napari_wscovid.lung.unet.load_lung_unet`).
    spacing : tuple of 3 floats, optional
        Voxel size (z, y, x) in mm; only for a bare array.
    model : torch.nn.Module, optional
        A 2-D lung U-Net (1 input channel, 1 or 2 output channels); required by "unet".
    progress : callable(done, total, message), optional
        Progress reports.

    Returns
    -------
    ndarray of uint8 (z, y, x)
        0 background, 1 right lung, 2 left lung.
    """
    if isinstance(volume, np.ndarray):
        if spacing is None:
            raise ValueError("a bare array needs spacing=(z, y, x) in mm")
        hu, superior_is_up, x_is_left = volume, True, True
    else:
        hu, spacing = volume.hu, volume.spacing
        if not volume.is_hu:
            from napari_wscovid.lung.display import segment_lungs_display

            logger.warning("not in Hounsfield units: lungs found by an Otsu threshold of display intensities")
            return segment_lungs_display(volume.hu)
        # direction[:, a] is array axis a in world (z, y, x); LPS z points to the head
        # and LPS x to the patient's left.
        superior_is_up = bool(volume.direction[0, 0] >= 0)
        x_is_left = bool(volume.direction[2, 2] >= 0)
    if method == "classical":
        labels = segment_lungs_classical(hu, spacing, superior_is_up=superior_is_up, progress=progress)
    elif method == "unet":
        if model is None:
            raise ValueError('method="unet" needs a model (see napari_wscovid.lung.unet.load_lung_unet)')
        from napari_wscovid.lung.unet import segment_lungs_unet

        labels = segment_lungs_unet(hu, spacing, model, progress=progress)
    else:
        raise ValueError(f'method must be "classical" or "unet", got {method!r}')
    if not x_is_left:
        # Axis flipped relative to LPS: the right lung is at large x, swap the names.
        labels = np.where(labels > 0, 3 - labels, 0).astype(np.uint8)
    return labels


def lung_volumes_ml(labels: np.ndarray, spacing) -> dict[str, float]:
    """Volume of the right lung, left lung and both, in millilitres."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    right = float(np.count_nonzero(labels == RIGHT)) * voxel_ml
    left = float(np.count_nonzero(labels == LEFT)) * voxel_ml
    return {"right": right, "left": left, "total": right + left}
