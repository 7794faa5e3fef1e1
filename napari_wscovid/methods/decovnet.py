"""Detection with DeCoVNet (Zheng et al. 2020): one 3-D pass per patient, lesions from its CAM.

The volume and its lung mask are cut to the lungs' in-plane bounding box (grown by a margin
and to the network's aspect ratio in millimetres), normalised with the project's HU window and
resized in-plane to the network's input size; every slice is kept (the paper resamples to a
fixed in-plane size "without changing the number of slices"). The network gives patient-level
probabilities only, so ``slice_probs`` is NaN throughout.

Lesion localisation follows the authors' weakly supervised recipe: the class activation map of
the explained class, upsampled to the CT grid, is thresholded at its top 5 % (here: of the lung
voxels), split into 3-D connected components, and each component gives one box per slice it
crosses, unless its cross-section there is smaller than ``min_box_area_mm2``. As in the
pipeline, a COVID-negative ("NP") explanation gets no boxes: evidence for "no pneumonia" is no
lesion.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label, regionprops

from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box, DetectionResult
from napari_wscovid.stages import (
    NEGATIVE_CLASS,
    Progress,
    calibration_temperature,
    lung_volume_ml,
    to_uint8,
)

logger = logging.getLogger(__name__)


CAM_NAME = "decovnet"
SALIENCY_SCOPES = ("positive", "all", "none")
BOX_SOURCE = "decovnet-cam"
# Share of the lung voxels kept when thresholding the CAM (the authors keep the top 5 %).
CAM_TOP_FRACTION = 0.05
# Margin around the lungs' in-plane bounding box, as for the slice classifier's crops.
CROP_MARGIN_MM = 10.0
# Slices handled at once when preparing the input and upsampling the CAM: bounds the
# temporary float arrays to a few tens of MB whatever the volume's length.
CHUNK_SLICES = 32
PATIENT_RULE = (
    "DeCoVNet: one patient-level prediction from the whole volume (3-D network); it makes no "
    "per-slice prediction, so slice probabilities are NaN"
)


@dataclass(frozen=True)
class VolumeCrop:
    """Rows ``y0:y1`` and columns ``x0:x1`` cut from every slice (end-exclusive; they may extend
    beyond the image, which is then padded)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def inside(self, slice_shape) -> tuple[slice, slice, slice, slice]:
        """(image rows, image columns, crop rows, crop columns) of the part inside the image."""
        ny, nx = (int(v) for v in slice_shape)
        sy0, sy1, sx0, sx1 = max(self.y0, 0), min(self.y1, ny), max(self.x0, 0), min(self.x1, nx)
        sy1, sx1 = max(sy1, sy0), max(sx1, sx0)
        return (
            slice(sy0, sy1),
            slice(sx0, sx1),
            slice(sy0 - self.y0, sy1 - self.y0),
            slice(sx0 - self.x0, sx1 - self.x0),
        )


def lung_crop(
    lung_mask: np.ndarray,
    spacing_yx,
    size_hw,
    margin_mm: float = CROP_MARGIN_MM,
) -> VolumeCrop:
    """In-plane bounding box of the lungs over all slices, grown by ``margin_mm`` and to the
    aspect ratio of ``size_hw`` in millimetres (so non-square pixels do not distort anatomy).
    Without lung the whole slice is used, grown to the aspect ratio."""
    dy, dx = (float(v) for v in spacing_yx)
    height, width = (int(v) for v in size_hw)
    plane = np.asarray(lung_mask).any(axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        y0, y1, x0, x1 = 0.0, float(plane.shape[0]), 0.0, float(plane.shape[1])
    else:
        y0, y1 = rows[0] - margin_mm / dy, rows[-1] + 1 + margin_mm / dy
        x0, x1 = cols[0] - margin_mm / dx, cols[-1] + 1 + margin_mm / dx
    h_mm, w_mm = (y1 - y0) * dy, (x1 - x0) * dx
    ratio = height / width
    h_mm, w_mm = max(h_mm, w_mm * ratio), max(w_mm, h_mm / ratio)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    h, w = max(1, int(round(h_mm / dy))), max(1, int(round(w_mm / dx)))
    top, left = int(round(cy - h / 2)), int(round(cx - w / 2))
    return VolumeCrop(top, left, top + h, left + w)


def _cut(stack: np.ndarray, crop: VolumeCrop, fill) -> np.ndarray:
    """``stack[:, y0:y1, x0:x1]`` of an (n, y, x) array, ``fill`` beyond the image."""
    out = np.full((len(stack), *crop.shape), fill, dtype=stack.dtype)
    rows, cols, crows, ccols = crop.inside(stack.shape[1:])
    out[:, crows, ccols] = stack[:, rows, cols]
    return out


def _resize(stack: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (n, c, h, w), anti-aliased when shrinking (as preprocess does)."""
    shrink = stack.shape[-2] > size[0] or stack.shape[-1] > size[1]
    return F.interpolate(stack, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def prepare_volume(volume: CTVolume, lung_mask: np.ndarray, config, intensity=None, *, crop=None):
    """DeCoVNet's input ``(1, 2, T, H, W)`` float32: the normalised CT and the lung mask.

    Parameters
    ----------
    volume : CTVolume
        ``(T, y, x)``; HU or display intensities (``volume.is_hu``).
    lung_mask : np.ndarray
        ``(T, y, x)`` lung labels; any non-zero voxel is lung.
    config : DeCoVNetConfig
        Its ``input_size`` (H, W) is the in-plane size of the result.
    intensity : IntensityRange, optional
        The range mapped to [0, 1]; by default the project's HU window (or percentiles for
        non-HU input), see :func:`napari_wscovid.preprocess.model_intensity_range`.
    crop : VolumeCrop, optional
        In-plane region cut from every slice; :func:`lung_crop` by default.

    Returns
    -------
    torch.Tensor
        ``(1, 2, T, H, W)``: channel 0 the CT in [0, 1] (padding and beyond the image 0),
        channel 1 the lung mask resized alike (soft edges in [0, 1]). Slices are not resampled.
    """
    from napari_wscovid.preprocess import DEFAULT_NORMALISATION, model_intensity_range, normalise

    hu = np.asarray(volume.hu)
    lung = np.asarray(lung_mask)
    if lung.shape != hu.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from the CT's {hu.shape}")
    size = tuple(int(v) for v in config.input_size)
    crop = crop or lung_crop(lung, volume.spacing[1:], size)
    if intensity is None:
        intensity = model_intensity_range(
            hu, lung, DEFAULT_NORMALISATION, padding_mask=volume.padding_mask, is_hu=volume.is_hu
        )
    if intensity.note:
        logger.info("%s", intensity.note)
    quiet = dataclasses.replace(intensity, note="")  # logged once above, not once per chunk
    n_z = hu.shape[0]
    out = torch.empty((1, 2, n_z, *size), dtype=torch.float32)
    outside = _cut(np.zeros((1, *hu.shape[1:]), dtype=bool), crop, fill=True)
    for z0 in range(0, n_z, CHUNK_SLICES):
        z1 = min(z0 + CHUNK_SLICES, n_z)
        pad = np.broadcast_to(outside, (z1 - z0, *crop.shape)).copy()
        if volume.padding_mask is not None:
            pad |= _cut(np.asarray(volume.padding_mask[z0:z1], dtype=bool), crop, fill=True)
        ct = normalise(_cut(hu[z0:z1], crop, fill=0), intensity=quiet, padding_mask=pad, is_hu=volume.is_hu)
        mask = _cut(lung[z0:z1] > 0, crop, fill=False).astype(np.float32)
        both = torch.from_numpy(np.stack([ct, mask], axis=1))  # (n, 2, h, w)
        out[0, :, z0:z1] = _resize(both, size).clamp_(0.0, 1.0).transpose(0, 1)
    return out


def cam_to_grid(cam: np.ndarray, n_slices: int, crop: VolumeCrop, slice_shape) -> np.ndarray:
    """A ``(t, h, w)`` CAM upsampled onto the CT grid inside ``crop``.

    Linear interpolation across slices then bilinear in-plane, pixel centres aligned as in
    :func:`prepare_volume` (the CAM grid spans the crop, as the network input does). Returns
    float32 ``(n_slices, ry, rx)`` for the rows and columns ``crop.inside(slice_shape)[:2]``.
    """
    cam = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    if cam.ndim != 3:
        raise ValueError(f"cam must be (t, h, w), got shape {tuple(cam.shape)}")
    along_z = F.interpolate(cam[None, None], size=(n_slices, *cam.shape[1:]), mode="trilinear",
                            align_corners=False)[0, 0]  # fmt: skip
    rows, cols, crows, ccols = crop.inside(slice_shape)
    out = np.empty((n_slices, rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
    for z0 in range(0, n_slices, CHUNK_SLICES):
        part = F.interpolate(along_z[z0 : z0 + CHUNK_SLICES, None], size=crop.shape, mode="bilinear",
                             align_corners=False)[:, 0]  # fmt: skip
        out[z0 : z0 + CHUNK_SLICES] = part[:, crows, ccols].numpy()
    return out


def lesion_boxes(
    cam: np.ndarray,
    lung_mask: np.ndarray,
    spacing_yx,
    *,
    class_name: str,
    min_box_area_mm2: float = 20.0,
    top_fraction: float = CAM_TOP_FRACTION,
    offset_yx=(0, 0),
) -> tuple[list[Box], np.ndarray]:
    """Boxes around the 3-D components of the CAM's top ``top_fraction`` of lung voxels.

    Parameters
    ----------
    cam : np.ndarray
        ``(z, y, x)`` float CAM on the CT grid (or a region of it, see ``offset_yx``).
    lung_mask : np.ndarray
        ``(z, y, x)``, same shape; any non-zero voxel is lung.
    spacing_yx : tuple of float
        Pixel size in mm.
    class_name : str
        Copied into each box.
    min_box_area_mm2 : float
        A component's cross-section on a slice smaller than this gives no box there.
    top_fraction : float
        Share of the lung voxels kept: those whose CAM is at least the value of the
        ``ceil(top_fraction * n_lung)``-th largest, and positive.
    offset_yx : tuple of int
        Added to the box coordinates (when ``cam`` is a region starting there).

    Returns
    -------
    boxes : list of Box
        One per (component, slice) kept, ordered by slice then area (largest first); ``score``
        is the component's peak CAM divided by the peak over all lung voxels (0-1).
    mask : np.ndarray
        ``(z, y, x)`` bool: the voxels inside the kept cross-sections.
    """
    cam = np.asarray(cam, dtype=np.float32)
    lung = np.asarray(lung_mask) != 0
    if cam.shape != lung.shape or cam.ndim != 3:
        raise ValueError(f"cam {cam.shape} and lung_mask {lung.shape} must be the same (z, y, x) shape")
    kept = np.zeros(cam.shape, dtype=bool)
    values = cam[lung]
    peak = float(values.max()) if values.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return [], kept
    k = max(1, math.ceil(float(top_fraction) * values.size))
    threshold = float(np.partition(values, values.size - k)[values.size - k])
    del values
    mask = lung & (cam >= threshold) & (cam > 0)
    # Label only the mask's bounding box: labels are int32, four bytes per voxel.
    zs, ys, xs = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    bbox = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    labels = label(mask[bbox], connectivity=3)
    dy, dx = (float(v) for v in spacing_yx)
    oy, ox = (int(v) for v in offset_yx)
    boxes = []
    for region in regionprops(labels, intensity_image=cam[bbox]):
        score = float(region.intensity_max) / peak
        rz0, ry0, rx0 = (int(v) + int(s.start) for v, s in zip(region.bbox[:3], bbox, strict=True))
        image = region.image
        areas = image.reshape(len(image), -1).sum(1) * dy * dx
        for j in np.flatnonzero(areas >= min_box_area_mm2):
            rows, cols = np.flatnonzero(image[j].any(1)), np.flatnonzero(image[j].any(0))
            view = kept[rz0 + j, ry0 : ry0 + image.shape[1], rx0 : rx0 + image.shape[2]]
            view |= image[j]
            boxes.append(
                Box(
                    slice=rz0 + int(j),
                    y0=ry0 + int(rows[0]) + oy,
                    x0=rx0 + int(cols[0]) + ox,
                    y1=ry0 + int(rows[-1]) + 1 + oy,
                    x1=rx0 + int(cols[-1]) + 1 + ox,
                    class_name=class_name,
                    score=score,
                    area_mm2=float(areas[j]),
                    origin="detected",
                    source=BOX_SOURCE,
                )
            )
    boxes.sort(key=lambda b: (b.slice, -b.area_mm2))
    return boxes, kept


def detect_iter(
    volume: CTVolume,
    net,
    info: dict,
    *,
    lung_mask: np.ndarray,
    torch_device,
    min_box_area_mm2: float = 20.0,
    timings: dict | None = None,
    explain_class: str | None = None,
    saliency: str = "positive",
) -> Generator[Progress, None, DetectionResult]:
    """Classify a volume with a loaded DeCoVNet and localise lesions from its CAM.

    Parameters
    ----------
    volume : CTVolume
    net : DeCoVNet
        In eval mode, on ``torch_device``.
    info : dict
        From :func:`napari_wscovid.models.registry.load_model` (``name``, ``version``,
        ``sha256``, optionally ``normalisation``).
    lung_mask : np.ndarray
        ``(z, y, x)`` labels of the volume's lungs.
    torch_device : torch.device
    min_box_area_mm2 : float
        See :func:`lesion_boxes`.
    timings : dict, optional
        Stage -> seconds already spent (lung segmentation, model loading); extended here.
    explain_class : str, optional
        Class whose CAM is shown and boxed; the predicted class by default.
    saliency : {"positive", "all", "none"}
        The CAM is one pass over the whole volume, so "positive" and "all" are the same; "none"
        keeps the CAM and skips the lesion boxes. Per-slice scopes ("slices") do not exist here.

    Yields ``(done, total, message)`` and returns a :class:`DetectionResult`.
    """
    from napari_wscovid.boxes import involvement
    from napari_wscovid.preprocess import model_intensity_range

    if saliency not in SALIENCY_SCOPES:
        raise ValueError(
            f"DeCoVNet explains the whole volume at once: saliency must be one of {SALIENCY_SCOPES}, "
            f"got {saliency!r}"
        )

    timings = timings if timings is not None else {}
    lung_mask = np.asarray(lung_mask, dtype=np.uint8)
    if lung_mask.shape != volume.shape:
        raise ValueError(f"lung mask shape {lung_mask.shape} differs from the CT's {volume.shape}")
    classes = tuple(net.config.classes)
    if explain_class is not None and explain_class not in classes:
        raise ValueError(f"explain_class {explain_class!r} is not one of the model's classes {classes}")
    n_z = volume.shape[0]

    yield 1, 4, "Preparing the volume for DeCoVNet"
    start = time.perf_counter()
    intensity = model_intensity_range(
        volume.hu,
        lung_mask,
        info.get("normalisation"),
        padding_mask=volume.padding_mask,
        is_hu=volume.is_hu,
    )
    crop = lung_crop(lung_mask, volume.spacing[1:], net.config.input_size)
    x = prepare_volume(volume, lung_mask, net.config, intensity, crop=crop)
    timings["preprocessing"] = time.perf_counter() - start

    yield 1, 4, f"Classifying the volume ({n_z} slices) on {torch_device.type.upper()}"
    start = time.perf_counter()
    with torch.inference_mode():
        logits, cam = net.forward_with_cam(x.to(torch_device))
        patient_probs = (
            torch.softmax(logits.float() / calibration_temperature(info), dim=1)[0]
            .cpu()
            .numpy()
            .astype(np.float32)
        )
        cam = cam[0].float().cpu().numpy()
    del x
    if not np.isfinite(patient_probs).all() or not np.isfinite(cam).all():
        raise FloatingPointError("the model produced NaN/inf on this volume; weights or input are broken")
    timings["classification"] = time.perf_counter() - start
    shown_class = explain_class or classes[int(np.argmax(patient_probs))]
    shown = classes.index(shown_class)

    yield 2, 4, f"Localising lesions from the {shown_class} activation map"
    start = time.perf_counter()
    rows, cols, _, _ = crop.inside(volume.shape[1:])
    region = cam_to_grid(np.maximum(cam[shown], 0.0), n_z, crop, volume.shape[1:])
    lung_region = lung_mask[:, rows, cols] != 0
    region *= lung_region
    peak = float(region.max()) if region.size else 0.0
    cam_map = np.zeros(volume.shape, dtype=np.uint8)
    if peak > 0:
        # One factor for the whole volume (its peak in the lungs), as the pipeline's CAMs.
        cam_map[:, rows, cols] = to_uint8(region / peak)
    timings["cam"] = time.perf_counter() - start

    start = time.perf_counter()
    lesions = np.zeros(volume.shape, dtype=bool)
    boxes: list[Box] = []
    if shown_class != NEGATIVE_CLASS and saliency != "none":
        boxes, kept = lesion_boxes(
            region,
            lung_region,
            volume.spacing[1:],
            class_name=shown_class,
            min_box_area_mm2=min_box_area_mm2,
            offset_yx=(rows.start, cols.start),
        )
        lesions[:, rows, cols] = kept
    del region
    timings["lesion_localisation"] = time.perf_counter() - start

    yield 3, 4, "Finishing"
    result = DetectionResult(
        classes=classes,
        slice_probs=np.full((n_z, len(classes)), np.nan, dtype=np.float32),
        patient_probs=patient_probs,
        lung_mask=lung_mask,
        cams={CAM_NAME: cam_map},
        explained_class=shown_class,
        boxes=boxes,
        involvement=involvement(lesions, lung_mask) if saliency != "none" else {},
        model_info={k: info.get(k) for k in ("name", "version", "sha256")},
        timings=timings,
        device=str(torch_device.type),
        lung_volume_ml=lung_volume_ml(lung_mask, volume.spacing),
        patient_rule=PATIENT_RULE,
    )
    return result
