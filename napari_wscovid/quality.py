"""Quality checks of a scan before anyone trusts an answer on it; no napari, no Qt.

Each check is a named flag with its measured value and a severity (``info``, ``warn``,
``severe``); :func:`scan_status` turns them into ``ok``, ``needs_review`` (a ``severe`` flag:
the answer may be wrong for reasons the network cannot see; or a doubtful fit of the network,
:mod:`napari_wscovid.reliability`) or ``out_of_scope`` (no lungs, or
not a CT in Hounsfield units that look like a CT). The maps and boxes are still shown; the
status says first how far to trust them.

The thresholds are physical (air is -1000 HU, water 0) or the plugin's own limits (what the
networks were trained on: slices up to 5 mm); none is fitted to a test case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

from napari_wscovid.io.volume import CTVolume

SEVERITIES = ("info", "warn", "severe")
STATUSES = ("ok", "needs_review", "out_of_scope")

# Air (outside the body, in the airways) is -1000 HU on every calibrated scanner; stored values
# without rescale put it near 0 or 1024, padding at -3024 or -2048 lies far below it.
AIR_HU, AIR_TOLERANCE_HU = -1000.0, 150.0
# The muscle/blood peak of a calibrated CT lies about here. It is looked for above fat (about
# -100 HU, the largest peak in some patients), in SOFT_TISSUE_SEARCH_HU.
SOFT_TISSUE_HU = (-20.0, 100.0)
SOFT_TISSUE_SEARCH_HU = (-50.0, 250.0)
THICK_SLICE_MM = 5.0  # the networks were trained on slices up to 5 mm
SLAB_MM = 100.0  # a chest CT covers about 250-350 mm; under this it is a slab
MIN_LUNG_ML, ADULT_LUNG_ML = 300.0, 1500.0  # below: a slab or a child; far below: no chest
# A newborn's lungs cross 30-40 cm² at their widest slice, an adult's 150-300; bowel gas in an
# abdomen-only CT, or a few airways of a neck, stay under a few cm². Below this nothing is lung.
MIN_LUNG_SLICE_MM2 = 1000.0
CUT_LUNG_FRACTION = 0.25  # lung area on an end slice, relative to the largest slice: lung cut off
NOISY_AIR_HU = 60.0  # noise of air outside the body (std after removing the mean)
# Metal: cortical bone stays under about 2000 HU in the chest, iodine contrast under 1000; wires,
# clips, ports and prostheses saturate at 3000+. Above 0.5 mL their streaks cross the lungs.
METAL_HU, METAL_ML = 2500.0, 0.5
# IV contrast: unenhanced blood and muscle lie at 30-60 HU, so about a tenth of the mediastinum's
# soft tissue (bone removed) is above 120 HU; enhanced heart chambers and great vessels (150-400
# HU) lift that share to 0.40-0.60 on the two contrast LIDC series, against 0.08-0.13 on the four
# unenhanced real series in ../shared (their DICOM ContrastBolusAgent agrees).
ENHANCED_HU, ENHANCED_FRACTION = 120.0, 0.25
# A CT reconstructs square axial pixels; a stack whose rows and columns differ this much in size is
# a sagittal or coronal reformat stored with an axial header (or a resampling gone wrong).
NON_SQUARE_PIXEL_RATIO = 1.25
# Lungs touching the edge of the reconstructed field of view on this share of their slices.
FOV_CUT_FRACTION = 0.1


@dataclass(frozen=True)
class QCFlag:
    """One quality check's result."""

    name: str
    severity: str  # one of SEVERITIES
    value: float | str
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def quality_checks(volume: CTVolume, lung_mask: np.ndarray) -> list[QCFlag]:
    """Every check that finds something (info, warn or severe) on this scan and its lung mask."""
    flags: list[QCFlag] = []
    flags += _intensity_checks(volume)
    flags += _coverage_checks(volume, lung_mask)
    flags += _acquisition_checks(volume, lung_mask)
    return flags


#: Flags that send a scan to review although their severity is only ``warn``: the scan is fine,
#: the answer on it is doubtful. Those of the network's fit (napari_wscovid.reliability), and a
#: display image: its features can lie near the training data's once its lungs are found
#: (docs/reliability.md), yet its densities are only relative.
REVIEW_FLAGS = ("out_of_distribution", "low_confidence", "display_image")


def scan_status(flags: list[QCFlag], lung_mask: np.ndarray) -> str:
    """``out_of_scope`` without lungs or without CT intensities, ``needs_review`` with any
    ``severe`` flag or any of :data:`REVIEW_FLAGS`, else ``ok``."""
    severe = {f.name for f in flags if f.severity == "severe"}
    if not np.any(lung_mask) or severe & {"no_lungs", "no_air"}:
        return "out_of_scope"
    review = severe | {f.name for f in flags if f.name in REVIEW_FLAGS}
    return "needs_review" if review else "ok"


# ------------------------------------------------------------------------------ intensities
def _sample(volume: CTVolume) -> np.ndarray:
    """At most ~2 M voxels of the scan (every k-th slice and pixel), padding excluded."""
    z = max(1, volume.shape[0] // 32)
    step = max(1, volume.shape[1] // 256)
    hu = np.asarray(volume.hu[::z, ::step, ::step], dtype=np.float32)
    if volume.padding_mask is not None:
        hu = hu[~np.asarray(volume.padding_mask[::z, ::step, ::step], dtype=bool)]
    return hu.ravel()


def _intensity_checks(volume: CTVolume) -> list[QCFlag]:
    if not volume.is_hu:
        return [
            QCFlag(
                "display_image",
                "warn",
                "not HU",
                "a display image (PNG/JPG or a non-HU series): intensities were rescaled, so density "
                "is only relative and the networks see an input unlike their training",
            )
        ]
    hu = _sample(volume)
    flags = []
    air = float(np.percentile(hu, 2))
    if abs(air - AIR_HU) > AIR_TOLERANCE_HU:
        if air < AIR_HU - AIR_TOLERANCE_HU:
            flags.append(
                QCFlag(
                    "air_below_-1000",
                    "warn",
                    round(air, 1),
                    f"the darkest 2% of voxels sit at {air:.0f} HU, below air (-1000): unmasked padding "
                    "(e.g. -3024) or an offset scanner",
                )
            )
        else:
            flags.append(
                QCFlag(
                    "no_air",
                    "severe",
                    round(air, 1),
                    f"no air near -1000 HU (the darkest 2% are at {air:.0f} HU): stored values without "
                    "the rescale slope/intercept, or not a CT",
                )
            )
    lo, hi = SOFT_TISSUE_SEARCH_HU
    tissue = hu[(hu > lo) & (hu < hi)]
    if tissue.size > 1000:
        counts, edges = np.histogram(tissue, bins=30, range=(lo, hi))
        peak = float(edges[np.argmax(counts)] + 5)
        if not SOFT_TISSUE_HU[0] <= peak <= SOFT_TISSUE_HU[1]:
            flags.append(
                QCFlag(
                    "soft_tissue_peak",
                    "warn",
                    round(peak, 1),
                    f"the soft-tissue peak is at {peak:.0f} HU, outside {SOFT_TISSUE_HU[0]:.0f} to "
                    f"{SOFT_TISSUE_HU[1]:.0f}: calibration or contrast differ from the training data",
                )
            )
    return flags


# --------------------------------------------------------------------------------- coverage
def _coverage_checks(volume: CTVolume, lung_mask: np.ndarray) -> list[QCFlag]:
    lung = np.asarray(lung_mask) > 0
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    lung_ml = float(lung.sum()) * voxel_ml
    extent_mm = volume.shape[0] * float(volume.spacing[0])
    flags = []
    if lung_ml == 0:
        return [
            QCFlag(
                "no_lungs", "severe", 0.0, "no lungs were found: not a chest CT, or out of the lung window"
            )
        ]
    if volume.shape[0] > 1 and extent_mm < SLAB_MM:
        flags.append(
            QCFlag(
                "slab",
                "severe",
                round(extent_mm, 1),
                f"the scan covers only {extent_mm:.0f} mm head to feet (a chest CT covers about 300): "
                "a slab, the patient-level answer sees part of the lungs",
            )
        )
    if volume.shape[0] > 1:
        area = lung.reshape(lung.shape[0], -1).sum(1).astype(float)
        top = area.max()
        for end, index in (("first", 0), ("last", -1)):
            if top > 0 and area[index] / top > CUT_LUNG_FRACTION:
                flags.append(
                    QCFlag(
                        f"lung_cut_{end}_slice",
                        "warn",
                        round(float(area[index] / top), 2),
                        f"the lungs fill {100 * area[index] / top:.0f}% of their largest cross-section on "
                        f"the {end} slice: the apex or the base lies outside the scan",
                    )
                )
    if lung_ml < MIN_LUNG_ML:
        flags.append(
            QCFlag(
                "lung_volume",
                "severe",
                round(lung_ml, 1),
                f"{lung_ml:.0f} mL of lung: too little for a whole chest (a slab, a child or a failed mask)",
            )
        )
    elif lung_ml < ADULT_LUNG_ML:
        flags.append(
            QCFlag("lung_volume", "warn", round(lung_ml, 1), f"{lung_ml:.0f} mL of lung: small for an adult")
        )
    cut = _fov_cut_fraction(volume, lung)
    if cut > FOV_CUT_FRACTION:
        flags.append(
            QCFlag(
                "lung_fov_cut",
                "warn",
                round(cut, 2),
                f"the lungs reach the edge of the field of view on {100 * cut:.0f}% of their slices: "
                "lung outside the image is not analysed",
            )
        )
    return flags


def _fov_cut_fraction(volume: CTVolume, lung: np.ndarray) -> float:
    """Share of lung-bearing slices whose lungs touch the image border or the padding around a
    circular field of view."""
    has_lung = lung.any(axis=(1, 2))
    if not has_lung.any():
        return 0.0
    edge = np.zeros(lung.shape[1:], dtype=bool)
    edge[:2, :] = edge[-2:, :] = edge[:, :2] = edge[:, -2:] = True
    touching = (lung & edge).any(axis=(1, 2))
    if volume.padding_mask is not None:
        padding = np.asarray(volume.padding_mask, dtype=bool)
        near_padding = ndi.binary_dilation(padding, structure=np.ones((1, 5, 5), dtype=bool))
        touching |= (lung & near_padding).any(axis=(1, 2))
    return float(touching[has_lung].sum() / has_lung.sum())


# ----------------------------------------------------------------------------- acquisition
def _acquisition_checks(volume: CTVolume, lung_mask: np.ndarray) -> list[QCFlag]:
    flags = []
    dy, dx = (float(v) for v in volume.spacing[1:])
    if max(dy, dx) > NON_SQUARE_PIXEL_RATIO * min(dy, dx):
        flags.append(
            QCFlag(
                "non_square_pixels",
                "severe",
                round(max(dy, dx) / min(dy, dx), 2),
                f"pixels of {dy:.2f} x {dx:.2f} mm: a CT's axial pixels are square, so this is likely a "
                "sagittal or coronal stack whose header lost its orientation; the lungs are read sideways",
            )
        )
    thickness = float(volume.spacing[0])
    if volume.shape[0] > 1 and thickness > THICK_SLICE_MM:
        flags.append(
            QCFlag(
                "thick_slices",
                "warn",
                round(thickness, 2),
                f"{thickness:.1f} mm between slices (the networks saw up to {THICK_SLICE_MM:g} mm): small "
                "lesions blur into their neighbours",
            )
        )
    if volume.is_hu:
        noise = _air_noise(volume)
        if noise is not None and noise > NOISY_AIR_HU:
            flags.append(
                QCFlag(
                    "noise",
                    "warn",
                    round(noise, 1),
                    f"noise of {noise:.0f} HU in the air outside the body: a low-dose or very noisy scan",
                )
            )
    if volume.is_hu:
        metal_ml = _metal_ml(volume)
        if metal_ml > METAL_ML:
            flags.append(
                QCFlag(
                    "metal",
                    "warn",
                    round(metal_ml, 2),
                    f"{metal_ml:.1f} mL above {METAL_HU:g} HU (metal: wires, clips, a port or a prosthesis): "
                    "its streaks can hide or mimic opacities",
                )
            )
    if volume.is_hu:
        enhanced = _enhanced_fraction(volume, np.asarray(lung_mask) > 0)
        if enhanced is not None and enhanced > ENHANCED_FRACTION:
            flags.append(
                QCFlag(
                    "contrast",
                    "warn",
                    round(enhanced, 2),
                    f"{100 * enhanced:.0f}% of the mediastinum's soft tissue is above {ENHANCED_HU:g} HU: "
                    "an IV contrast scan; most training scans were unenhanced, and bright vessels can "
                    "read as opacities",
                )
            )
    for text in volume.warnings:
        lowered = text.lower()
        if "gantry tilt" in lowered or "non-uniform slice spacing" in lowered:
            flags.append(QCFlag("loader", "warn", text[:80], text))
    return flags


def _enhanced_fraction(volume: CTVolume, lung: np.ndarray) -> float | None:
    """Share above ENHANCED_HU of the soft tissue between the lungs (their convex hull, lungs and
    bone removed), on up to 24 slices of the middle half of the lungs; None without enough tissue."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    zs = zs[len(zs) // 4 : max(len(zs) // 4 + 1, 3 * len(zs) // 4) : max(1, len(zs) // 48)]
    step = max(1, lung.shape[1] // 256)  # half resolution on 512^2: the heart and aorta are large
    tissue = []
    for z in zs:
        lung_z = lung[z, ::step, ::step]
        region = convex_hull_image(lung_z) & ~ndi.binary_dilation(lung_z, iterations=3)
        # The median removes single noisy pixels; filled bright rings are vertebrae and sternum,
        # whose cancellous bone (200-400 HU) would look enhanced.
        hu = ndi.median_filter(np.asarray(volume.hu[z, ::step, ::step], dtype=np.float32), 3)
        bone = ndi.binary_dilation(ndi.binary_fill_holes(hu > 400), iterations=3)
        tissue.append(hu[region & ~bone & (hu > -50) & (hu < 700)])
    values = np.concatenate(tissue) if tissue else np.zeros(0)
    return float((values > ENHANCED_HU).mean()) if values.size > 2000 else None


def _metal_ml(volume: CTVolume) -> float:
    """Volume above METAL_HU, estimated from every k-th slice (all pixels: metal is small)."""
    step = max(1, volume.shape[0] // 64)
    hu = np.asarray(volume.hu[::step])
    count = int(np.count_nonzero(hu > METAL_HU)) * step
    return count * float(np.prod(volume.spacing)) / 1000.0


def _air_noise(volume: CTVolume) -> float | None:
    """Std of the air outside the body (after its mean): the scan's noise where nothing varies."""
    z = max(1, volume.shape[0] // 16)
    hu = np.asarray(volume.hu[::z], dtype=np.float32)
    ny, nx = hu.shape[1:]
    corner = np.zeros((ny, nx), dtype=bool)  # the two top corners, a tenth of the image each way
    corner[: ny // 10, : nx // 10] = corner[: ny // 10, -(nx // 10) :] = True
    corners = hu[:, corner]
    if volume.padding_mask is not None:
        corners = corners[~np.asarray(volume.padding_mask[::z], dtype=bool)[:, corner]]
    air = corners[(corners > AIR_HU - 300) & (corners < AIR_HU + 300)]
    return float(air.std()) if air.size > 500 else None
