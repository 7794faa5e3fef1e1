"""Saliency maps -> lesion masks, boxes and lung involvement (Hu et al. 2020, II.F.2).

The paper's post-processing: absolute value of the joint saliency, 5 x 5 Gaussian blur,
Isodata threshold, dilation then erosion (a closing), connected components above an area,
and the smallest rectangle around each.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_isodata
from skimage.measure import label, regionprops
from skimage.morphology import closing, disk

from napari_wscovid.results import Box

if TYPE_CHECKING:
    from napari_wscovid.io.volume import CTVolume

logger = logging.getLogger(__name__)

# The paper blurs with OpenCV's 5 x 5 Gaussian; with sigma left to OpenCV that is
# sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8 = 1.1. scipy's kernel radius is
# int(truncate * sigma + 0.5), so truncate = 2.25 / sigma gives radius 2 (a 5 x 5 kernel) for
# any sigma, with a margin against rounding; scipy normalises the truncated kernel, as cv2 does.
BLUR_SIGMA = 1.1
# Closing radius in pixels: a disk of radius 2 (5 x 5) bridges the one- and two-pixel gaps the
# product of three maps leaves inside a lesion without merging lesions a few pixels apart. The
# paper does not give its structuring element.
CLOSING_RADIUS = 2


def _blur(saliency: np.ndarray, sigma: float) -> np.ndarray:
    radius = 2  # the paper's 5 x 5 kernel, whatever the sigma
    return ndimage.gaussian_filter(saliency, sigma=sigma, truncate=(radius + 0.25) / sigma, mode="nearest")


def saliency_mask(
    saliency: np.ndarray, *, blur_sigma: float | None = None, closing_radius: int = CLOSING_RADIUS
) -> np.ndarray:
    """The thresholded, closed mask that boxes are drawn around.

    Parameters
    ----------
    saliency
        ``(Y, X)`` saliency map, any sign.
    blur_sigma
        Sigma of the 5 x 5 Gaussian kernel in pixels; ``None`` for OpenCV's default for a
        5 x 5 kernel (1.1).
    closing_radius
        Radius in pixels of the disk used for dilation then erosion; 0 skips the closing.

    Returns
    -------
    np.ndarray
        ``(Y, X)`` bool mask; all False for an empty, constant or non-finite map.
    """
    sal = np.abs(np.asarray(saliency, dtype=np.float64))
    if sal.ndim != 2:
        raise ValueError(f"saliency must be 2-D (Y, X), got shape {sal.shape}")
    # NaN or inf pixels (a failed slice) count as no evidence rather than poisoning the blur.
    sal = np.where(np.isfinite(sal), sal, 0.0)
    empty = np.zeros(sal.shape, dtype=bool)
    if sal.size == 0 or not sal.any():
        return empty
    blurred = _blur(sal, BLUR_SIGMA if blur_sigma is None else float(blur_sigma))
    if np.ptp(blurred) <= np.finfo(np.float64).eps * max(blurred.max(), 1e-300):
        return empty  # a flat map has no foreground to separate
    mask = blurred > threshold_isodata(blurred)
    if closing_radius > 0:
        # Dilation then erosion with the same disk, as the paper describes.
        mask = closing(mask, disk(closing_radius)).astype(bool)
    return mask


def boxes_from_saliency(
    saliency: np.ndarray,
    *,
    spacing_yx: tuple[float, float],
    slice_index: int,
    class_name: str,
    score: float,
    min_area_mm2: float = 20.0,
    blur_sigma: float | None = None,
    source: str = "joint",
    lung: np.ndarray | None = None,
) -> list[Box]:
    """Boxes around the connected components of the thresholded saliency of one slice.

    Parameters
    ----------
    saliency
        ``(Y, X)`` saliency at the CT's pixel grid (any sign; its absolute value is used).
    spacing_yx
        Pixel size in mm along y and x.
    slice_index
        Axial slice the map belongs to.
    class_name, score
        Copied into each box (the class explained and, e.g., its slice probability).
    min_area_mm2
        Components smaller than this (pixel count times ``dy * dx``) are dropped.
    blur_sigma
        See :func:`saliency_mask`.
    source
        Which saliency made the boxes, recorded in ``Box.source``.
    lung
        ``(Y, X)`` lung mask of the slice: components are taken inside it (the closing can bridge
        a narrow mediastinum), as the involvement is.

    Returns
    -------
    list of Box
        One per kept component, largest first; ``y1``/``x1`` are end-exclusive.
    """
    mask = saliency_mask(saliency, blur_sigma=blur_sigma)
    if lung is not None:
        mask &= np.asarray(lung, dtype=bool)
    return boxes_from_mask(
        mask,
        spacing_yx=spacing_yx,
        slice_index=slice_index,
        class_name=class_name,
        score=score,
        min_area_mm2=min_area_mm2,
        source=source,
    )


def boxes_from_mask(
    mask: np.ndarray,
    *,
    spacing_yx: tuple[float, float],
    slice_index: int,
    class_name: str,
    score: float,
    min_area_mm2: float = 20.0,
    source: str = "joint",
) -> list[Box]:
    """:func:`boxes_from_saliency` from its mask (:func:`saliency_mask`, in the lung), for a caller
    that keeps the mask too (the involvement)."""
    dy, dx = (float(s) for s in spacing_yx)
    if not mask.any():
        return []
    boxes = []
    for region in regionprops(label(mask, connectivity=2)):
        area_mm2 = float(region.area) * dy * dx
        if area_mm2 < min_area_mm2:
            continue
        y0, x0, y1, x1 = (int(v) for v in region.bbox)
        boxes.append(
            Box(
                slice=int(slice_index),
                y0=y0,
                x0=x0,
                y1=y1,
                x1=x1,
                class_name=class_name,
                score=float(score),
                area_mm2=area_mm2,
                origin="detected",
                source=source,
            )
        )
    boxes.sort(key=lambda b: b.area_mm2, reverse=True)
    logger.debug("slice %d: %d boxes from %d mask pixels", slice_index, len(boxes), int(mask.sum()))
    return boxes


def involvement(masks: np.ndarray, lung_mask: np.ndarray) -> dict:
    """Percentage of lung voxels inside the thresholded saliency.

    Parameters
    ----------
    masks
        ``(z, y, x)`` bool saliency masks (see :func:`saliency_mask`); slices without a
        computed saliency are all False.
    lung_mask
        ``(z, y, x)`` lung labels; any non-zero voxel is lung.

    Returns
    -------
    dict
        ``"per_slice_percent"``: ``(z,)`` float array, NaN on slices without lung;
        ``"total_percent"``: float over the whole lung volume (0 when there is no lung).
    """
    masks = np.asarray(masks, dtype=bool)
    lung = np.asarray(lung_mask) != 0
    if masks.shape != lung.shape:
        raise ValueError(f"masks {masks.shape} and lung_mask {lung.shape} differ in shape")
    lung_per_slice = lung.reshape(len(lung), -1).sum(1)
    hit_per_slice = (masks & lung).reshape(len(lung), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_slice = np.where(lung_per_slice > 0, 100.0 * hit_per_slice / lung_per_slice, np.nan)
    total_lung = int(lung_per_slice.sum())
    total = 100.0 * float(hit_per_slice.sum()) / total_lung if total_lung else 0.0
    return {"per_slice_percent": per_slice.astype(np.float64), "total_percent": total}


def involvement_with(current: dict, slices, masks: np.ndarray, lung_mask: np.ndarray) -> dict:
    """:func:`involvement` once the saliency masks of ``slices`` (``(len(slices), y, x)`` bool,
    explained after the run) are put in: the other slices keep their percentages."""
    lung = np.asarray(lung_mask) != 0
    if not current or "per_slice_percent" not in current:
        current = involvement(np.zeros(lung.shape, bool), lung)
    per_slice = np.array(current["per_slice_percent"], dtype=np.float64)
    lung_per_slice = lung.reshape(len(lung), -1).sum(1)
    for z, mask in zip(slices, np.asarray(masks, dtype=bool), strict=True):
        if lung_per_slice[z]:
            per_slice[z] = 100.0 * float((mask & lung[z]).sum()) / lung_per_slice[z]
    total_lung = int(lung_per_slice.sum())
    hits = np.nansum(per_slice * lung_per_slice) / 100.0
    total = 100.0 * float(hits) / total_lung if total_lung else 0.0
    return {"per_slice_percent": per_slice, "total_percent": total}


def box_to_mm(box: Box, volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """The box's two corners in patient LPS mm, ``(z, y, x)`` order.

    Edge convention: voxel index ``i`` is the centre of a voxel that spans ``i - 0.5`` to
    ``i + 0.5``. The first corner is the outer edge of the first voxel, index
    ``(slice, y0 - 0.5, x0 - 0.5)``; the second is the outer edge of the last voxel,
    ``(slice, y1 - 0.5, x1 - 0.5)`` (``y1``, ``x1`` being end-exclusive). A box of ``n``
    voxels along an axis therefore measures ``n * spacing`` mm, not ``(n - 1) * spacing``.
    The slice coordinate is the slice centre. Both corners go through
    ``volume.index_to_world``, so an oblique direction matrix is honoured.

    Returns
    -------
    tuple of np.ndarray
        ``(corner0, corner1)``, each ``(3,)`` LPS mm in ``(z, y, x)``.
    """
    first = volume.index_to_world([box.slice, box.y0 - 0.5, box.x0 - 0.5])
    last = volume.index_to_world([box.slice, box.y1 - 0.5, box.x1 - 0.5])
    return first, last
