"""Classical (weight-free) lung segmentation of chest CT.

The pipeline works on an in-plane downsampled copy of the volume (about 1.2-1.5 mm
pixels) because every morphological step costs time proportional to the voxel count,
and lungs are large, smooth organs; the outline is refined back at full resolution.

1. air = HU below ``AIR_THRESHOLD_HU``; air connected to the image border in its slice
   is outside the patient.
2. Large 3-D air bodies that look like lung are kept (bowel gas is rejected by its
   position and its HU: lung parenchyma is around -850 HU, pure gas around -1000 HU).
3. The trachea and main bronchi are tracked slice by slice from the top and removed
   until they enter the lung.
4. Lungs touching at the anterior/posterior junction are split by in-plane erosion
   until two bodies appear; every voxel then goes to the nearest body.
5. Per slice and per lung: holes (vessels, lesions surrounded by lung) are filled,
   a small closing keeps pleural nodules, and concave pockets along the chest wall
   (sub-pleural consolidation) are filled, but pockets opening towards the
   mediastinum (heart, great vessels) are not.

All sizes are in millimetres so the result does not depend on the pixel size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image, disk

from napari_wscovid.lung import LEFT, RIGHT

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]


#: Lung parenchyma is about -850 HU and soft tissue about +40 HU; -320 HU sits near the
#: middle and is the value most classical lung masks use, so partial-volume pixels at
#: the pleura split roughly evenly.
AIR_THRESHOLD_HU = -320.0
#: Target in-plane pixel size for the heavy morphology; lungs have no detail at this
#: scale that the full-resolution refinement does not restore.
WORK_PIXEL_MM = 2.0
#: A 3-D air body smaller than this is not a lung (bowel gas, table pockets).
MIN_LUNG_ML = 40.0
#: Gas in the bowel or stomach is about -1000 HU throughout; aerated lung is around
#: -850 HU, so in lung only a minority of voxels (airways, emphysema) is this dark.
PURE_GAS_HU = -960.0
MAX_GAS_FRACTION = 0.5
#: A pure-gas space this large is not lung parenchyma (trachea, stomach, colon).
MIN_GAS_BLOB_ML = 5.0
#: Partial-volume rim around gas that is still below the air threshold.
GAS_RIM_MM = 3.0
#: A coarse block is air when this fraction of its pixels is: a wall one block wide
#: then always separates two air spaces.
MIN_BLOCK_AIR_FRACTION = 0.75
#: Trachea and main bronchi cross-sections stay below this area until they reach
#: the hilum (adult trachea is 1.5-2.5 cm wide, i.e. 2-5 cm^2).
MAX_AIRWAY_AREA_MM2 = 700.0
#: The trachea may touch the lung over this height (partial volume) and separate below.
AIRWAY_GAP_MM = 12.0
#: The trachea lies within this distance of the body midline.
TRACHEA_MIDLINE_MM = 35.0
#: Look for the trachea this far below the top of the air bodies before giving up.
TRACHEA_SEARCH_MM = 60.0
#: Bronchi move obliquely; allow this much lateral shift from one slice to the next.
AIRWAY_STEP_MM = 4.0
#: Maximal in-plane erosion used to separate touching lungs.
MAX_SPLIT_EROSION_MM = 30.0
#: Closing radius that keeps small juxta-pleural nodules and smooths the pleura.
PLEURAL_CLOSING_MM = 6.0
#: A concave pocket whose opening faces the mediastinum more than this cosine is heart
#: or great vessels, not lesion.
MEDIAL_POCKET_COS = 0.5
#: A pocket or hole larger than this fraction of its lung's slice area is anatomy
#: (cardiac notch, liver dome), not a lesion.
MAX_POCKET_AREA_FRACTION = 0.6

_SLICE_2D = np.array(
    [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]],
    dtype=bool,
)


def segment_lungs_classical(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    superior_is_up: bool = True,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Segment and label the lungs of a chest CT without learned weights.

    Parameters
    ----------
    hu : ndarray (z, y, x)
        Hounsfield units.
    spacing : tuple of 3 floats
        Voxel size (z, y, x) in mm.
    superior_is_up : bool
        True when slice index increasing goes towards the head (DICOM/ITK order).
    progress : callable(done, total, message), optional
        Called after each stage.

    Returns
    -------
    ndarray of uint8 (z, y, x)
        0 background, 1 right lung (small x in LPS), 2 left lung.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (z, y, x), got shape {hu.shape}")
    spacing = tuple(float(s) for s in spacing)
    total = 7

    def report(done: int, message: str) -> None:
        if progress is not None:
            progress(done, total, message)

    factor = max(1, int(round(WORK_PIXEL_MM / min(spacing[1], spacing[2]))))
    work_spacing = (spacing[0], spacing[1] * factor, spacing[2] * factor)
    work_air, work_gas = _block_air(hu, factor)
    if not superior_is_up:
        # Airway tracking works feet to head.
        work_air, work_gas = work_air[::-1], work_gas[::-1]
    report(1, "threshold")

    inside = _remove_outside_air(work_air)
    inside &= ~_gas_blobs(work_gas & inside, work_spacing)
    report(2, "outside air and gas removed")

    lungs = _select_lung_bodies(inside, work_gas, work_spacing)
    report(3, "lung bodies selected")

    lungs &= ~_track_airway(lungs, work_spacing)
    report(4, "airway removed")

    labels = split_left_right(lungs, work_spacing)
    report(5, "left and right separated")

    labels = _fill_lungs(labels, work_spacing)
    report(6, "vessels and lesions filled")

    if not superior_is_up:
        labels, work_air = labels[::-1], work_air[::-1]
    full = _upsample_refine(labels, work_air, hu, factor)
    report(7, "done")
    return full


def _block_air(hu: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Air and pure-gas masks on a grid ``factor`` times coarser in-plane.

    A block is air only when at least ``MIN_BLOCK_AIR_FRACTION`` of its pixels are:
    a block mean would blur a 2-3 mm diaphragm or bowel wall away and join the
    stomach to the lung. A block is gas when most of its pixels are.
    """
    if factor == 1:
        return hu < AIR_THRESHOLD_HU, hu < PURE_GAS_HU
    nz, ny, nx = hu.shape
    wy, wx = -(-ny // factor), -(-nx // factor)
    air_count = np.zeros((nz, wy, wx), np.uint8)
    gas_count = np.zeros((nz, wy, wx), np.uint8)
    pixel_count = np.zeros((1, wy, wx), np.uint8)
    for dy in range(factor):
        for dx in range(factor):
            part = hu[:, dy::factor, dx::factor]
            window = (slice(None), slice(0, part.shape[1]), slice(0, part.shape[2]))
            air_count[window] += part < AIR_THRESHOLD_HU
            gas_count[window] += part < PURE_GAS_HU
            pixel_count[window] += 1
    work_air = air_count >= MIN_BLOCK_AIR_FRACTION * pixel_count
    work_gas = 2 * gas_count > pixel_count
    return work_air, work_gas


def _remove_outside_air(air: np.ndarray) -> np.ndarray:
    """Air not connected, within its slice, to the image border."""
    labels, n = ndimage.label(air, structure=_SLICE_2D)
    keep = np.ones(n + 1, bool)
    keep[0] = False
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        keep[np.unique(edge)] = False
    return keep[labels]


def _gas_blobs(gas: np.ndarray, spacing) -> np.ndarray:
    """Large pure-gas spaces (stomach, bowel, trachea) with their partial-volume rim.

    They are removed before the air bodies are labelled because a horizontal
    diaphragm thinner than a slice does not separate stomach gas from the lung base.
    Lung parenchyma is mostly above ``PURE_GAS_HU``; large bullae would also go here.
    """
    labels, n = ndimage.label(gas)
    if n == 0:
        return gas
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    large = sizes * (float(np.prod(spacing)) / 1000.0) >= MIN_GAS_BLOB_ML
    blobs = large[labels]
    if not blobs.any():
        return blobs
    rim_pixels = max(1, int(round(GAS_RIM_MM / spacing[2])))
    return ndimage.binary_dilation(blobs, _SLICE_2D, iterations=rim_pixels)


def _select_lung_bodies(inside: np.ndarray, gas: np.ndarray, spacing) -> np.ndarray:
    """Keep the 3-D air bodies that are lung, not gas in the bowel or stomach."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, n = ndimage.label(inside)
    if n == 0:
        return np.zeros_like(inside)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    candidates = np.flatnonzero(sizes * voxel_ml >= MIN_LUNG_ML)
    if candidates.size == 0:
        candidates = np.array([int(np.argmax(sizes))])
    gas_counts = np.bincount(labels[gas], minlength=n + 1)
    keep = np.zeros(n + 1, bool)
    largest = candidates[np.argmax(sizes[candidates])]
    for label in candidates:
        gas_fraction = gas_counts[label] / sizes[label]
        # The largest body is lung even in severe emphysema; others must look like lung.
        if label == largest or (gas_fraction < MAX_GAS_FRACTION and sizes[label] >= 0.1 * sizes[largest]):
            keep[label] = True
        else:
            logger.debug(
                "air body %d (%.0f mL, %.0f%% pure gas) rejected",
                label,
                sizes[label] * voxel_ml,
                100 * gas_fraction,
            )
    return keep[labels]


def _track_airway(lungs: np.ndarray, spacing) -> np.ndarray:
    """Trachea and main bronchi, tracked from the top slice down until they join the lung.

    Slices are assumed ordered feet-to-head (the top of the body at the last index).
    """
    airway = np.zeros_like(lungs)
    pixel_mm2 = spacing[1] * spacing[2]
    max_area = MAX_AIRWAY_AREA_MM2 / pixel_mm2
    occupied = np.flatnonzero(lungs.any(axis=(1, 2)))
    if occupied.size == 0:
        return airway
    step = disk(max(1, int(round(AIRWAY_STEP_MM / spacing[2]))))
    cols = np.nonzero(lungs.any(axis=(0, 1)))[0]
    midline = 0.5 * (cols[0] + cols[-1])
    search_slices = max(1, int(round(TRACHEA_SEARCH_MM / spacing[0])))
    max_gap_slices = max(1, int(round(AIRWAY_GAP_MM / spacing[0])))
    gap_slices = 0
    previous = None
    for z in range(occupied[-1], occupied[0] - 1, -1):
        labels, n = ndimage.label(lungs[z])
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        if previous is None:
            if z < occupied[-1] - search_slices:
                logger.info("no trachea found at the top of the lungs; airway left in the mask")
                break
            # Start at the highest slice that shows exactly one small air tube near the midline.
            centroids = ndimage.center_of_mass(lungs[z], labels, range(1, n + 1))
            chosen = [
                i + 1
                for i, (_, cx) in enumerate(centroids)
                if areas[i + 1] <= max_area and abs(cx - midline) * spacing[2] <= TRACHEA_MIDLINE_MM
            ]
            if len(chosen) != 1:
                continue
        else:
            reach = ndimage.binary_dilation(previous, step)
            touched = np.unique(labels[reach & (labels > 0)])
            chosen = [int(i) for i in touched if areas[i] <= max_area]
            merged = [int(i) for i in touched if areas[i] > max_area]
            if merged:
                gap_slices += 1
                if gap_slices > max_gap_slices:
                    break
            else:
                gap_slices = 0
            if not chosen and not merged:
                break
            # Where the tube touches the lung in this slice (partial volume), carry its
            # previous outline straight down; it usually separates again below.
            current = np.isin(labels, chosen) | (previous & np.isin(labels, merged))
            if not current.any():
                break
            airway[z] = current
            previous = current
            continue
        current = np.isin(labels, chosen)
        airway[z] = current
        previous = current
    return airway


def split_left_right(lungs: np.ndarray, spacing) -> np.ndarray:
    """Label voxels 1 (right, small x) and 2 (left) even where the lungs touch."""
    labels = np.zeros(lungs.shape, np.uint8)
    if not lungs.any():
        return labels
    seeds = _two_seeds(lungs, spacing)
    if seeds is None:
        # One lung only (or unsplittable): name it by its side of the image.
        cx = np.nonzero(lungs.any(axis=(0, 1)))[0].mean()
        labels[lungs] = RIGHT if cx < lungs.shape[2] / 2 else LEFT
        logger.info("only one lung body found")
        return labels
    # Every lung voxel goes to its nearest seed, measured in mm. The distance map is
    # computed on a cropped grid at half the in-plane resolution: the junction between
    # the lungs is a few millimetres wide, and this is the costliest step otherwise.
    box = _bounding_box(lungs, pad=0)
    step = 2
    coarse_seeds = seeds[box][:, ::step, ::step]
    coarse_spacing = (spacing[0], spacing[1] * step, spacing[2] * step)
    _, nearest = ndimage.distance_transform_edt(
        coarse_seeds == 0, sampling=coarse_spacing, return_indices=True
    )
    owner = coarse_seeds[nearest[0], nearest[1], nearest[2]]
    owner = np.repeat(np.repeat(owner, step, axis=1), step, axis=2)
    crop = lungs[box]
    owner = owner[:, : crop.shape[1], : crop.shape[2]]
    labels[box][crop] = owner[crop]
    return labels


def _bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, grown by ``pad`` in-plane."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        grow = 0 if axis == 0 else pad
        box.append(slice(max(hits[0] - grow, 0), hits[-1] + grow + 1))
    return tuple(box)


def _two_seeds(lungs: np.ndarray, spacing) -> np.ndarray | None:
    """Two eroded cores (1 right, 2 left) of the lung mask, or None if it never splits."""
    structure = _SLICE_2D
    eroded = lungs
    step_mm = min(spacing[1], spacing[2])
    for iteration in range(int(MAX_SPLIT_EROSION_MM / step_mm) + 1):
        if iteration:
            eroded = ndimage.binary_erosion(eroded, structure)
        labels, n = ndimage.label(eroded)
        if n == 0:
            return None
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        order = np.argsort(sizes)[::-1]
        if n >= 2 and sizes[order[1]] >= 0.15 * sizes[order[0]]:
            a, b = order[0], order[1]
            xa = np.nonzero(labels == a)[2].mean()
            xb = np.nonzero(labels == b)[2].mean()
            right, left = (a, b) if xa < xb else (b, a)
            seeds = np.zeros(lungs.shape, np.uint8)
            seeds[labels == right] = RIGHT
            seeds[labels == left] = LEFT
            return seeds
    return None


def _fill_lungs(labels: np.ndarray, spacing) -> np.ndarray:
    """Per slice and per lung: fill holes, close small pleural notches, fill pleural pockets."""
    out = np.zeros_like(labels)
    radius = max(1, int(round(PLEURAL_CLOSING_MM / spacing[2])))
    closing_footprint = disk(radius)[None]
    pad = radius + 1
    for side in (RIGHT, LEFT):
        mask = labels == side
        if not mask.any():
            continue
        box = _bounding_box(mask, pad)
        # One empty slice above and below keeps hole filling strictly per slice (the
        # structure has no z neighbours) and the in-plane padding keeps the closing exact.
        crop = np.pad(mask[box], ((1, 1), (pad, pad), (pad, pad)))
        filled = _fill_small_holes(crop)
        filled = ndimage.binary_closing(filled, closing_footprint)
        for z in range(1, filled.shape[0] - 1):
            if filled[z].any():
                filled[z] = _fill_pleural_pockets(filled[z], side)
        filled = _fill_small_holes(filled)[1:-1, pad:-pad, pad:-pad]
        target = out[box]
        target[filled & (target == 0)] = side
    return out


def _fill_small_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes per slice, except holes larger than ``MAX_POCKET_AREA_FRACTION`` of the lung.

    At the diaphragm the lung base can ring the liver dome in one slice; that hole is
    abdomen, and it is larger than the thin ring of lung around it.
    """
    holes = ndimage.binary_fill_holes(mask, _SLICE_2D) & ~mask
    labels, n = ndimage.label(holes, _SLICE_2D)
    if n == 0:
        return mask
    hole_area = np.bincount(labels.ravel(), minlength=n + 1)
    hole_slice = np.zeros(n + 1, np.intp)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        hole_slice[index] = box[0].start
    lung_area = np.count_nonzero(mask, axis=(1, 2))
    keep = hole_area <= MAX_POCKET_AREA_FRACTION * lung_area[hole_slice]
    keep[0] = False
    return mask | keep[labels]


def _fill_pleural_pockets(mask: np.ndarray, side: int) -> np.ndarray:
    """Add concave pockets of one lung slice unless they open towards the mediastinum."""
    if mask.sum() < 20:
        return mask
    hull = convex_hull_image(mask)
    pockets, n = ndimage.label(hull & ~mask)
    if n == 0:
        return mask
    # Medial direction in array x: the right lung (small x) has the mediastinum at +x.
    medial = 1.0 if side == RIGHT else -1.0
    outside_hull = ~hull
    near_outside = ndimage.binary_dilation(outside_hull)
    lung_area = mask.sum()
    lung_centre = np.array(ndimage.center_of_mass(mask))
    result = mask.copy()
    for index in range(1, n + 1):
        pocket = pockets == index
        area = pocket.sum()
        if area < 4 or area > MAX_POCKET_AREA_FRACTION * lung_area:
            continue
        mouth = pocket & near_outside
        if not mouth.any():
            continue
        # A pocket opening towards the mediastinum (centre -> mouth, the hull chord)
        # holds heart or great vessels; so does a thin sliver on the medial side of the
        # lung, whose mouth is the whole pocket.
        pocket_centre = np.array(ndimage.center_of_mass(pocket))
        opening = np.array(ndimage.center_of_mass(mouth)) - pocket_centre
        position = pocket_centre - lung_centre
        if any(_cos_medial(v, medial) > MEDIAL_POCKET_COS for v in (opening, position)):
            continue
        result |= pocket
    return result


def _cos_medial(vector: np.ndarray, medial: float) -> float:
    """Cosine between an in-plane (y, x) vector and the medial direction (0 if null)."""
    norm = float(np.linalg.norm(vector))
    return medial * float(vector[1]) / norm if norm > 1e-6 else 0.0


def _upsample_refine(labels: np.ndarray, work_air: np.ndarray, hu: np.ndarray, factor: int) -> np.ndarray:
    """Bring labels to full resolution; re-threshold the outline at full resolution.

    Pixels added by filling (vessels, lesions) stay in; along the outline, where the
    coarse grid is too blunt, a full-resolution pixel is lung when it is air.
    """
    if factor == 1:
        return labels.astype(np.uint8)
    ny, nx = hu.shape[1:]
    full = np.repeat(np.repeat(labels, factor, axis=1), factor, axis=2)[:, :ny, :nx]
    lung = labels > 0
    edge = lung & ~ndimage.binary_erosion(lung, _SLICE_2D)
    edge |= ndimage.binary_dilation(lung, _SLICE_2D) & ~lung
    # Coarse outline pixels that were air can shrink to the full-resolution air; filled
    # (non-air) outline pixels keep their coarse extent.
    edge_air = edge & (work_air | ~lung)
    band = np.repeat(np.repeat(edge_air, factor, axis=1), factor, axis=2)[:, :ny, :nx]
    zz, yy, xx = np.nonzero(band)
    is_air = hu[zz, yy, xx] < AIR_THRESHOLD_HU
    # Outline pixels just outside the lung take the label of their lung neighbour.
    owner = np.where(lung, labels, ndimage.grey_dilation(labels, footprint=_SLICE_2D))
    full[zz, yy, xx] = np.where(is_air, owner[zz, yy // factor, xx // factor], 0).astype(np.uint8)
    return full
