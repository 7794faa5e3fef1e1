"""Lung masks for display-intensity images (8-bit PNG/JPG slices, figures): no HU, no spacing.

Two finders, as for CT:

- :func:`segment_lungs_display_unet` (the default, "hybrid" and "unet"): the bundled lung
  U-Net on each picture, its display range taken as the U-Net's [0, 1] input. A figure's
  orientation is unknown (MedSeg's slices are stored transposed, lungs above and below the
  heart), so the picture is looked at as it is and transposed, and the view in which the U-Net
  is surer of itself is kept: it took the transposed view for 46 of the 50 MedSeg slices and the
  upright one for 670 of UCSD's 746 figures (``scripts/display_lungs_eval.py``).
- :func:`segment_lungs_display` ("classical", no weights): Otsu splits dark (air, lung) from
  bright (tissue); dark regions touching the border are outside air; the two largest dark
  regions left are the lungs. It finds no lung in a tight crop whose lungs touch the border (30
  of the 50 MedSeg slices).

Lungs are named by their centroid in the upright view (small x = patient right, as in a
radiological display). Fallbacks for 2-D figures, not a substitute for the HU methods on CT.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation

# A lung on a 2-D figure covers at least this share of the image; smaller dark blobs are
# bowel gas, the trachea or text artefacts.
MIN_LUNG_FRACTION = 0.01
# The U-Net sees a figure with its longer side at this many pixels: a chest figure spans about
# 350-400 mm, and the U-Net was trained on a 2 mm grid.
UNET_SIDE_PX = 192
# Figures are often cropped to the lungs; the U-Net, trained on whole chests, then misses lung
# it sees against the picture's edge. Extending each edge outwards by this many pixels (of
# UNET_SIDE_PX) gives it that context: lesion pixels inside the lungs on the 50 MedSeg slices
# 0.45 -> 0.71 (mirroring the edge instead: 0.54; a soft-tissue frame: 0.74, but it drew
# lung into a heart on a UCSD figure).
EDGE_PAD_PX = 16
# Display range: these percentiles of a picture map to the U-Net's 0 and 1 (a lung-window
# figure then puts lung near 0.15 and soft tissue near 0.8, as the sliding HU window does).
RANGE_PERCENTILES = (0.1, 99.9)
# Pictures the orientation is judged on, evenly spread through a stack.
ORIENTATION_SAMPLES = 5


def segment_lungs_display(image: np.ndarray) -> np.ndarray:
    """(z, y, x) display intensities -> uint8 labels, 1 right lung, 2 left lung (no weights)."""
    labels = np.zeros(image.shape, dtype=np.uint8)
    for z, plane in enumerate(np.asarray(image, dtype=np.float32)):
        if np.ptp(plane) == 0:
            continue
        dark = plane < filters.threshold_otsu(plane)
        dark = segmentation.clear_border(morphology.opening(dark, morphology.disk(1)))
        regions = measure.label(dark)
        props = [p for p in measure.regionprops(regions) if p.area >= MIN_LUNG_FRACTION * plane.size]
        labels[z] = _name_lungs(regions, props)
    return labels


def segment_lungs_display_unet(image: np.ndarray, model) -> np.ndarray:
    """(z, y, x) display intensities -> uint8 labels from the lung U-Net ``model``."""
    planes = np.asarray(image, dtype=np.float32)
    labels = np.zeros(planes.shape, dtype=np.uint8)
    varied = [z for z in range(len(planes)) if np.ptp(planes[z]) > 0]
    if not varied:
        return labels
    transposed, known = _orientation(planes, varied, model)
    rest = [z for z in varied if z not in known]
    for start in range(0, len(rest), 16):
        zs = rest[start : start + 16]
        known.update(zip(zs, lung_probabilities(planes, zs, model, transposed), strict=True))
    for z, prob in known.items():
        lung = prob > 0.5
        upright = lung.T if transposed else lung
        regions = measure.label(upright)
        props = [p for p in measure.regionprops(regions) if p.area >= MIN_LUNG_FRACTION * lung.size]
        named = _name_lungs(regions, props)
        labels[z] = named.T if transposed else named
    return labels


def figure_is_transposed(planes: np.ndarray, model) -> bool:
    """Whether the U-Net is surer of itself on the transposed pictures (a few, evenly spread)."""
    varied = [z for z in range(len(planes)) if np.ptp(planes[z]) > 0]
    return bool(varied) and _orientation(np.asarray(planes, np.float32), varied, model)[0]


def _orientation(planes: np.ndarray, varied: list[int], model) -> tuple[bool, dict]:
    """Whether to look at the pictures transposed, judged on a few of ``varied`` evenly spread,
    and those pictures' probabilities in the view chosen (a single figure needs no third pass)."""
    picks = np.linspace(0, len(varied) - 1, min(ORIENTATION_SAMPLES, len(varied))).astype(int)
    sample = [varied[i] for i in picks]
    as_is = lung_probabilities(planes, sample, model, transposed=False)
    turned = lung_probabilities(planes, sample, model, transposed=True)
    transposed = _confidence(turned) > _confidence(as_is)
    return transposed, dict(zip(sample, turned if transposed else as_is, strict=True))


def lung_probabilities(planes: np.ndarray, zs, model, transposed: bool) -> np.ndarray:
    """The U-Net's lung probability for pictures ``zs`` of ``planes``, on their own grid; the
    network looks at each transposed when ``transposed``."""
    import torch

    from napari_wscovid.lung.unet import predict_view

    h, w = planes.shape[1:]
    scale = UNET_SIDE_PX / max(h, w)
    small = (max(16, round(h * scale)), max(16, round(w * scale)))
    batch = torch.from_numpy(np.stack([_unit_range(planes[z]) for z in zs]))[:, None]
    batch = torch.nn.functional.interpolate(batch, size=small, mode="bilinear", align_corners=False)
    if transposed:
        batch = batch.transpose(2, 3)
    batch = torch.nn.functional.pad(batch, (EDGE_PAD_PX,) * 4, mode="replicate")
    prob = torch.from_numpy(predict_view(model, np.ascontiguousarray(batch[:, 0].numpy()), 0))[:, None]
    prob = prob[:, :, EDGE_PAD_PX:-EDGE_PAD_PX, EDGE_PAD_PX:-EDGE_PAD_PX]
    if transposed:
        prob = prob.transpose(2, 3)
    prob = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
    return prob[:, 0].numpy()


def _unit_range(plane: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane, RANGE_PERCENTILES)
    return np.clip((plane - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def _confidence(prob: np.ndarray) -> float:
    """How sure the U-Net is, 0 (every pixel 0.5) to 1 (every pixel 0 or 1)."""
    return float(np.abs(prob - 0.5).mean() * 2)


def _name_lungs(regions: np.ndarray, props) -> np.ndarray:
    """The two largest regions, holes filled, as right (1, smaller x) and left (2) lung."""
    named = np.zeros(regions.shape, dtype=np.uint8)
    props = sorted(props, key=lambda p: p.area, reverse=True)[:2]
    if len(props) == 2:
        sides = zip((1, 2), sorted(props, key=lambda p: p.centroid[1]), strict=True)
    else:
        sides = ((1 if p.centroid[1] < regions.shape[1] / 2 else 2, p) for p in props)
    for side, p in sides:
        named[ndimage.binary_fill_holes(regions == p.label)] = side
    return named
