"""Lung segmentation of chest CT: 1 = right lung, 2 = left lung.

In LPS orientation (``CTVolume``) the right lung lies at small x (column index).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

__all__ = [
    "LEFT",
    "RIGHT",
    "LUNG_METHODS",
    "LUNG_METHOD_LABELS",
    "DEFAULT_LUNG_METHOD",
    "segment_lungs",
    "lung_volumes_ml",
]

RIGHT, LEFT = 1, 2
#: "hybrid": classical lungs plus the dense lung the bundled multi-view U-Net finds;
#: "classical": thresholds and morphology only, no weights; "unet": the U-Net alone.
#: The labels are what the widget shows.
LUNG_METHOD_LABELS = {
    "hybrid": "classical + U-Net (hybrid)",
    "classical": "classical (no weights)",
    "unet": "U-Net only",
}
LUNG_METHODS = tuple(LUNG_METHOD_LABELS)
DEFAULT_LUNG_METHOD = "hybrid"
# The methods (scipy, scikit-image, torch) are imported when called: the CLI's and the
# widget's start-up only need the names above.

logger = logging.getLogger(__name__)


def segment_lungs(
    volume,
    method: str = DEFAULT_LUNG_METHOD,
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
    method : {"hybrid", "classical", "unet"}
        "classical" needs no weights: thresholds, morphology and pleural filling.
        "hybrid" adds to it the dense lung (consolidation against the chest wall) that
        the multi-view U-Net finds. "unet" is the U-Net alone. The U-Net is ``model``,
        or the bundled weights when ``model`` is None.
    spacing : tuple of 3 floats, optional
        Voxel size (z, y, x) in mm; only for a bare array.
    model : torch.nn.Module, optional
        A 2-D lung U-Net (1 input channel, 1 or 2 output channels) for "hybrid" and "unet"
        (see :func:`napari_wscovid.lung.unet.load_lung_unet`); default: the bundled one.
    progress : callable(done, total, message), optional
        Progress reports.

    Returns
    -------
    ndarray of uint8 (z, y, x)
        0 background, 1 right lung, 2 left lung.
    """
    if method not in LUNG_METHODS:
        raise ValueError(f"method must be one of {LUNG_METHODS}, got {method!r}")
    if isinstance(volume, np.ndarray):
        if spacing is None:
            raise ValueError("a bare array needs spacing=(z, y, x) in mm")
        hu, superior_is_up, x_is_left = volume, True, True
    else:
        hu, spacing = volume.hu, volume.spacing
        if not volume.is_hu:
            return _segment_display(volume.hu, method, model)
        # direction[:, a] is array axis a in world (z, y, x); LPS z points to the head
        # and LPS x to the patient's left.
        superior_is_up = bool(volume.direction[0, 0] >= 0)
        x_is_left = bool(volume.direction[2, 2] >= 0)
    if method == "classical":
        from napari_wscovid.lung.classical import segment_lungs_classical

        labels = segment_lungs_classical(hu, spacing, superior_is_up=superior_is_up, progress=progress)
    else:
        from napari_wscovid.lung import unet

        model = model if model is not None else unet.bundled_lung_unet()
        if method == "unet":
            labels = unet.segment_lungs_unet(hu, spacing, model, progress=progress)
        else:
            labels = unet.segment_lungs_hybrid(
                hu, spacing, model, superior_is_up=superior_is_up, progress=progress
            )
    if not x_is_left:
        # Axis flipped relative to LPS: the right lung is at large x, swap the names.
        labels = np.where(labels > 0, 3 - labels, 0).astype(np.uint8)
    return labels


def _segment_display(image: np.ndarray, method: str, model) -> np.ndarray:
    """Lungs of display intensities (no HU): the U-Net unless "classical" (no weights) is asked."""
    from napari_wscovid.lung import display

    if method == "classical":
        logger.warning("not in Hounsfield units: lungs found by an Otsu threshold of display intensities")
        return display.segment_lungs_display(image)
    from napari_wscovid.lung import unet

    logger.warning("not in Hounsfield units: lungs found by the lung U-Net on display intensities")
    model = model if model is not None else unet.bundled_lung_unet()
    return display.segment_lungs_display_unet(image, model)


def lung_volumes_ml(labels: np.ndarray, spacing) -> dict[str, float]:
    """Volume of the right lung, left lung and both, in millilitres."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    right = float(np.count_nonzero(labels == RIGHT)) * voxel_ml
    left = float(np.count_nonzero(labels == LEFT)) * voxel_ml
    return {"right": right, "left": left, "total": right + left}
