"""Lesion localisation scores: true lesions from a mask, predicted boxes matched to them by IoU.

A true lesion is a 2-D connected component (8-connected) of the pneumonia labels on one axial
slice of a lesion mask, of at least ``min_area_mm2``. A box matches a lesion when the IoU of the
box with the lesion's bounding box is at least ``iou_threshold``. Lesion recall is the share of
true lesions matched by some box; box precision is the share of boxes that match some true
lesion. The two are counted independently (one box may cover two lesions, one lesion may get two
boxes), as the evaluation protocol defines them. Components of distractor labels (phantom nodules)
are not lesions: a box on one is a false positive, and is also counted as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

Rect = tuple[int, int, int, int]  # y0, x0, y1, x1 in pixels, end-exclusive (as ``Box``)

IOU_THRESHOLD = 0.1
MIN_LESION_AREA_MM2 = 20.0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def component_rects(
    mask2d: np.ndarray,
    labels: Iterable[int],
    spacing_yx: tuple[float, float] = (1.0, 1.0),
    min_area_mm2: float = 0.0,
) -> list[Rect]:
    """Bounding boxes of the 8-connected components of ``labels`` in one slice of a label mask.

    Parameters
    ----------
    mask2d : np.ndarray
        (y, x) integer labels.
    labels : iterable of int
        Label values that belong to the components (e.g. 1-3 for pneumonia).
    spacing_yx : tuple of float
        Pixel size in mm; MedSeg's images have none, and 1 mm is assumed as ``load_ct`` does.
    min_area_mm2 : float
        Components smaller than this (pixel count times pixel area) are left out.
    """
    selected = np.isin(np.asarray(mask2d), list(labels))
    if not selected.any():
        return []
    labelled, _ = ndimage.label(selected, structure=_EIGHT_CONNECTED)
    pixel_mm2 = float(spacing_yx[0]) * float(spacing_yx[1])
    rects = []
    for index, region in enumerate(ndimage.find_objects(labelled), start=1):
        if region is None:
            continue
        if np.count_nonzero(labelled[region] == index) * pixel_mm2 < min_area_mm2:
            continue
        rects.append((region[0].start, region[1].start, region[0].stop, region[1].stop))
    return rects


def rect_iou(a: Rect, b: Rect) -> float:
    """Intersection over union of two end-exclusive rectangles (0 when both are empty)."""
    dy = min(a[2], b[2]) - max(a[0], b[0])
    dx = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(dy, 0) * max(dx, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class MatchCounts:
    """Counts of one slice, or summed over slices."""

    lesions: int = 0
    lesions_found: int = 0
    boxes: int = 0
    boxes_on_lesion: int = 0
    boxes_on_distractor: int = 0  # false positives that overlap a distractor (a nodule)
    slices: int = 0

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def match_slice(
    boxes: Sequence[Rect],
    lesions: Sequence[Rect],
    distractors: Sequence[Rect] = (),
    iou_threshold: float = IOU_THRESHOLD,
) -> MatchCounts:
    """Match the boxes of one slice with its true lesions (and distractors), by IoU."""
    iou = np.array([[rect_iou(b, t) for t in lesions] for b in boxes]).reshape(len(boxes), len(lesions))
    hit = iou >= iou_threshold
    on_lesion = hit.any(1)
    on_distractor = np.array(
        [
            not on_lesion[i] and any(rect_iou(b, d) >= iou_threshold for d in distractors)
            for i, b in enumerate(boxes)
        ],
        dtype=bool,
    )
    return MatchCounts(
        lesions=len(lesions),
        lesions_found=int(hit.any(0).sum()),
        boxes=len(boxes),
        boxes_on_lesion=int(on_lesion.sum()),
        boxes_on_distractor=int(on_distractor.sum()),
        slices=1,
    )


def ratio_with_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """A pooled ratio (sum of numerators / sum of denominators) with a percentile bootstrap interval.

    Each position is one resampling unit (a patient or a slice): units are drawn with replacement
    and the ratio recomputed, so correlated lesions of one patient move together. Resamples whose
    denominator is zero are left out; the ratio is NaN when the total denominator is zero.

    Returns
    -------
    dict
        ``value, lower, upper, numerator, denominator, units``.
    """
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerators {num.shape} and denominators {den.shape} must be equal 1-D shapes")
    total_num, total_den = float(num.sum()), float(den.sum())
    value = total_num / total_den if total_den > 0 else float("nan")
    lower = upper = float("nan")
    if total_den > 0 and n_boot > 0:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(num), size=(n_boot, len(num)))
        b_num, b_den = num[picks].sum(1), den[picks].sum(1)
        ratios = b_num[b_den > 0] / b_den[b_den > 0]
        if len(ratios):
            alpha = (1.0 - confidence) / 2
            lower, upper = (float(q) for q in np.quantile(ratios, [alpha, 1 - alpha]))
    return {
        "value": value,
        "lower": lower,
        "upper": upper,
        "numerator": int(round(total_num)),
        "denominator": int(round(total_den)),
        "units": len(num),
    }
