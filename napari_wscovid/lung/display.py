"""Lung masks for display-intensity images (8-bit PNG/JPG slices): no HU, so no HU threshold.

Per slice: Otsu splits dark (air, lung) from bright (tissue); dark regions touching the image
border are outside air; of what is left, the two largest dark regions are the lungs, named by
their centroid (small x = patient right, as in a radiological display). It is a fallback for
2-D figures, not a substitute for the HU method on real CT.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation

# A lung on a 2-D figure covers at least this share of the image; smaller dark blobs are
# bowel gas, the trachea or text artefacts.
MIN_LUNG_FRACTION = 0.01


def segment_lungs_display(image: np.ndarray) -> np.ndarray:
    """(z, y, x) display intensities -> uint8 labels, 1 right lung, 2 left lung."""
    labels = np.zeros(image.shape, dtype=np.uint8)
    for z, plane in enumerate(np.asarray(image, dtype=np.float32)):
        if np.ptp(plane) == 0:
            continue
        dark = plane < filters.threshold_otsu(plane)
        dark = segmentation.clear_border(morphology.opening(dark, morphology.disk(1)))
        regions = measure.label(dark)
        props = [p for p in measure.regionprops(regions) if p.area >= MIN_LUNG_FRACTION * plane.size]
        props = sorted(props, key=lambda p: p.area, reverse=True)[:2]
        for p in sorted(props, key=lambda p: p.centroid[1]):
            side = 1 if p.centroid[1] < plane.shape[1] / 2 or len(props) == 1 else 2
            labels[z][ndimage.binary_fill_holes(regions == p.label)] = side
    return labels
