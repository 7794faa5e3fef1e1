"""The whole detection as a generator: lungs -> slice classification + CAMs -> saliency -> boxes.

``detect_iter`` yields ``(done, total, message)`` and returns a :class:`DetectionResult`, so a
napari worker can show progress and cancel at any yield; ``detect`` runs it to the end for
scripts and the CLI. Nothing here imports napari or Qt.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator, Iterable

import numpy as np

from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box, DetectionResult

logger = logging.getLogger(__name__)

Progress = tuple[int, int, str]

ARCH = "wsnet-hu2020"  # the architecture this module runs itself; others go to methods/
SALIENCY_SCOPES = ("positive", "all", "slices", "none")
SALIENCY_LAYERS = ("conv3", "conv4", "conv5", "joint")
NEGATIVE_CLASS = "NP"

# CAMs and saliency maps are kept as uint8 (value / MAP_LEVELS in [0, 1]): seven full-volume
# maps of a 600-slice 512x512 CT take 1.1 GB this way and 2.2 GB as float16, which broke the
# 3 GB budget for a run with all results kept (benchmarks/bench_detect.py).
MAP_LEVELS = 255


#: Lung slices whose CAMs are upsampled together (bounds the float temporaries).
CAM_BLOCK_SLICES = 32


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Quantise maps in [0, 1] to uint8."""
    return np.rint(np.clip(values, 0.0, 1.0) * MAP_LEVELS).astype(np.uint8)


# A slice enters classification when it holds at least this much lung (mm^2): below it the
# lung crop is a few apical or basal voxels, which the network never saw in training.
MIN_LUNG_AREA_MM2 = 200.0

# Patient rule: the patient is judged on its most abnormal slices (those with the lowest NP
# probability), because a few diseased slices decide a diagnosis while most slices of a sick
# lung look normal. The fraction is of the lung slices, with a floor for short series.
TOP_K_FRACTION = 0.1
TOP_K_MIN = 3


def _default_ig() -> tuple[int, str]:
    from napari_wscovid.explain.integrated_gradients import DEFAULT_IG_METHOD, DEFAULT_IG_STEPS

    return DEFAULT_IG_STEPS, DEFAULT_IG_METHOD


def lung_volume_ml(lung_mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Volume of the lung mask in millilitres."""
    return float(np.count_nonzero(lung_mask)) * float(np.prod(spacing)) / 1000.0


def lung_slices(lung_mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Indices of the slices holding at least ``MIN_LUNG_AREA_MM2`` of lung."""
    area_mm2 = lung_mask.reshape(lung_mask.shape[0], -1).astype(bool).sum(1) * spacing[1] * spacing[2]
    return np.flatnonzero(area_mm2 >= MIN_LUNG_AREA_MM2)


def patient_probabilities(slice_probs: np.ndarray, classes: tuple[str, ...]) -> tuple[np.ndarray, str]:
    """Aggregate (z, K) slice probabilities (NaN rows = no lung) into (K,) patient probabilities."""
    valid = slice_probs[~np.isnan(slice_probs).any(1)]
    if len(valid) == 0:
        return np.full(len(classes), np.nan, dtype=np.float32), "no lung slice"
    if NEGATIVE_CLASS not in classes:
        return valid.mean(0).astype(np.float32), "mean over all lung slices"
    k = min(len(valid), max(TOP_K_MIN, math.ceil(TOP_K_FRACTION * len(valid))))
    negative = classes.index(NEGATIVE_CLASS)
    most_abnormal = np.argsort(valid[:, negative])[:k]
    rule = f"mean of the {k} lung slices with the lowest {NEGATIVE_CLASS} probability"
    return valid[most_abnormal].mean(0).astype(np.float32), rule


def model_input_kwargs(volume: CTVolume, lung_mask: np.ndarray, size: int, normalisation=None) -> dict:
    """Keyword arguments of ``prepare_slices`` for this volume; the intensity range is computed
    once here rather than for every batch."""
    from napari_wscovid.preprocess import DEFAULT_NORMALISATION, model_intensity_range

    intensity = model_intensity_range(
        volume.hu,
        lung_mask,
        normalisation or DEFAULT_NORMALISATION,
        padding_mask=volume.padding_mask,
        is_hu=volume.is_hu,
    )
    return {
        "size": size,
        "spacing_yx": volume.spacing[1:],
        "padding_mask": volume.padding_mask,
        "is_hu": volume.is_hu,
        "intensity": intensity,
    }


def _batches(indices: Iterable[int], size: int) -> Generator[np.ndarray, None, None]:
    indices = np.asarray(list(indices), dtype=int)
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _saliency_slices(scope: str, slices, probs: np.ndarray, classes, lung_idx: np.ndarray) -> np.ndarray:
    if scope == "none":
        return np.array([], dtype=int)
    if scope == "all":
        return lung_idx
    if scope == "slices":
        requested = np.asarray(slices if slices is not None else [], dtype=int)
        return requested[np.isin(requested, lung_idx)]
    if scope != "positive":
        raise ValueError(f"saliency must be one of {SALIENCY_SCOPES}, got {scope!r}")
    if NEGATIVE_CLASS not in classes:
        return lung_idx
    negative = classes.index(NEGATIVE_CLASS)
    return lung_idx[np.argmax(probs[lung_idx], axis=1) != negative]


def detect_iter(
    volume: CTVolume,
    *,
    model="default",
    device: str = "auto",
    saliency: str = "positive",
    slices: Iterable[int] | None = None,
    explain_class: str | None = None,
    ig_steps: int | None = None,
    ig_method: str | None = None,
    min_box_area_mm2: float = 20.0,
    lung_mask: np.ndarray | None = None,
    lung_method: str | None = None,
    batch_size: int = 16,
    saliency_batch_size: int = 2,
) -> Generator[Progress, None, DetectionResult]:
    """Run the detection on ``volume``, yielding progress; returns a :class:`DetectionResult`.

    ``saliency`` chooses the slices that get integrated gradients and boxes: ``"positive"``
    (slices not predicted NP), ``"all"`` lung slices, ``"slices"`` (those in ``slices``) or
    ``"none"``. ``model`` is a registry name, a weights file or a ``WSNet`` instance.
    ``lung_method`` is one of :data:`napari_wscovid.lung.LUNG_METHODS` (default
    :data:`~napari_wscovid.lung.DEFAULT_LUNG_METHOD`); with ``lung_mask`` given there is no
    segmentation, and ``model_info["lung_method"]`` says "given".
    """
    import torch

    from napari_wscovid.models.registry import load_model, select_device
    from napari_wscovid.models.wsnet import inference_copy
    from napari_wscovid.preprocess import maps_to_slice, prepare_slices

    if not volume.is_hu:
        logger.warning("input is not in Hounsfield units; intensities were rescaled for display")
    if saliency not in SALIENCY_SCOPES:
        raise ValueError(f"saliency must be one of {SALIENCY_SCOPES}, got {saliency!r}")
    timings: dict[str, float] = {}
    n_z = volume.shape[0]

    yield 0, 4, "Segmenting lungs"
    start = time.perf_counter()
    lung_source = "given"
    if lung_mask is None:
        from napari_wscovid.lung import DEFAULT_LUNG_METHOD, segment_lungs

        lung_source = lung_method or DEFAULT_LUNG_METHOD
        lung_mask = segment_lungs(volume, method=lung_source)
    lung_mask = np.asarray(lung_mask, dtype=np.uint8)
    if lung_mask.shape != volume.shape:
        raise ValueError(f"lung mask shape {lung_mask.shape} differs from the CT's {volume.shape}")
    if not volume.is_hu and volume.shape[0] == 1 and not lung_mask.any():
        # Tight 2-D crops (lungs touching the border) defeat the display-image lung finder; the
        # whole picture is then used, as training does with such images (plugin_image_input).
        logger.warning("no lung found in this 2-D image; the whole image is analysed as lung")
        lung_mask = np.ones(volume.shape, dtype=np.uint8)
    timings["lung_segmentation"] = time.perf_counter() - start
    lung_idx = lung_slices(lung_mask, volume.spacing)

    start = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        torch_device, device_note = select_device(device)
        net = model.to(torch_device).eval()
        info = {"name": type(model).__name__, "version": "in-memory", "sha256": None, "temperature": 1.0}
    else:
        net, info = load_model(model, device=device)
        torch_device = next(net.parameters()).device
        device_note = info.get("fallback") or ""
    if device_note:
        logger.warning(device_note)
    architecture = getattr(net.config, "architecture", ARCH)
    if architecture != ARCH:
        timings["model_load"] = time.perf_counter() - start
        result = yield from _other_method(
            architecture,
            volume,
            net,
            info,
            lung_mask=lung_mask,
            torch_device=torch_device,
            min_box_area_mm2=min_box_area_mm2,
            timings=timings,
            batch_size=batch_size,
            saliency=saliency,
            slices=slices,
            explain_class=explain_class,
        )
        result.model_info["lung_method"] = lung_source
        return result
    classes = tuple(net.config.classes)
    size = int(net.config.input_size)
    normalisation = info.get("normalisation")
    timings["model_load"] = time.perf_counter() - start
    prep_kwargs = model_input_kwargs(volume, lung_mask, size, normalisation)
    temperature = float(info.get("temperature") or 1.0)

    total = len(lung_idx)
    yield 1, 4, f"Classifying {total} lung slices on {torch_device.type.upper()}"
    start = time.perf_counter()
    slice_probs = np.full((n_z, len(classes)), np.nan, dtype=np.float32)
    cam_lowres: dict[str, list[np.ndarray]] = {}
    crops_all = []
    done = 0
    fast_net = inference_copy(net)
    with torch.inference_mode():
        for batch in _batches(lung_idx, batch_size):
            x, crops = prepare_slices(volume.hu, lung_mask, batch, **prep_kwargs)
            x = torch.from_numpy(x).to(torch_device).contiguous(memory_format=torch.channels_last)
            out = fast_net(x)
            # Calibrated probabilities: the temperature fitted on validation data (1 if none).
            probs = torch.softmax(out.logits.float() / temperature, dim=1).cpu().numpy()
            if not np.isfinite(probs).all():
                raise FloatingPointError(
                    f"the model produced NaN/inf on slices {batch.tolist()}; weights or input are broken"
                )
            slice_probs[batch] = probs
            # Raw CAMs of every class at their native resolution; the class to show is
            # chosen once the patient-level prediction is known.
            for scale, cam in out.cams.items():
                cam_lowres.setdefault(scale, []).append(cam.float().cpu().numpy())
            crops_all.extend(crops)
            done += len(batch)
            yield 1, 4, f"Classified {done}/{total} slices"
    timings["classification"] = time.perf_counter() - start

    patient_probs, rule = patient_probabilities(slice_probs, classes)
    shown_class = explain_class or (
        classes[int(np.nanargmax(patient_probs))] if np.isfinite(patient_probs).all() else classes[0]
    )
    if shown_class not in classes:
        raise ValueError(f"explain_class {shown_class!r} is not one of the model's classes {classes}")
    shown = classes.index(shown_class)

    start = time.perf_counter()
    cams: dict[str, np.ndarray] = {}
    for scale, parts in cam_lowres.items():
        raw = np.concatenate(parts)[:, shown] if parts else np.zeros((0, 1, 1), np.float32)
        raw = np.maximum(raw, 0)
        # One scale factor for the whole volume keeps slices comparable at a fixed 0-1 contrast.
        peak = float(raw.max()) if raw.size else 0.0
        volume_map = np.zeros(volume.shape, dtype=np.uint8)
        if peak > 0:
            # In blocks: the float maps of all 520 lung slices of a 600-slice CT would take 545 MB.
            for first in range(0, len(lung_idx), CAM_BLOCK_SLICES):
                block = slice(first, first + CAM_BLOCK_SLICES)
                full = maps_to_slice(raw[block] / peak, crops_all[block], volume.shape[1:])
                volume_map[lung_idx[block]] = to_uint8(full)
        cams[scale] = volume_map
    del cam_lowres
    timings["cams"] = time.perf_counter() - start

    explain_idx = _saliency_slices(saliency, slices, slice_probs, classes, lung_idx)
    saliency_maps: dict[str, np.ndarray] = {}
    boxes: list[Box] = []
    involvement: dict = {}
    if len(explain_idx):
        steps_default, method_default = _default_ig()
        gen = explain_slices(
            volume,
            explain_idx,
            net=net,
            lung_mask=lung_mask,
            slice_probs=slice_probs,
            classes=classes,
            explain_class=explain_class,
            ig_steps=ig_steps or steps_default,
            ig_method=ig_method or method_default,
            min_box_area_mm2=min_box_area_mm2,
            batch_size=saliency_batch_size,
            prep_kwargs=prep_kwargs,
        )
        start = time.perf_counter()
        explained = yield from _relay(gen, stage=2, stages=4)
        timings["saliency_and_boxes"] = time.perf_counter() - start
        saliency_maps = {name: np.zeros(volume.shape, dtype=np.uint8) for name in SALIENCY_LAYERS}
        for name in SALIENCY_LAYERS:
            saliency_maps[name][explain_idx] = explained["saliency"][name]
        boxes = explained["boxes"]
        involvement = _involvement(explained["masks"], explain_idx, lung_mask)

    yield 3, 4, "Finishing"
    result = DetectionResult(
        classes=classes,
        slice_probs=slice_probs,
        patient_probs=patient_probs,
        lung_mask=lung_mask,
        cams=cams,
        saliency=saliency_maps,
        boxes=boxes,
        involvement=involvement,
        model_info={
            **{k: info.get(k) for k in ("name", "version", "sha256", "temperature")},
            "architecture": ARCH,
            "lung_method": lung_source,
        },
        timings=timings,
        device=str(torch_device.type),
        lung_volume_ml=lung_volume_ml(lung_mask, volume.spacing),
        saliency_slices=tuple(int(i) for i in explain_idx),
        patient_rule=rule,
        explained_class=shown_class,
    )
    yield 4, 4, "Done"
    return result


def _other_method(architecture: str, volume: CTVolume, net, info: dict, **kwargs):
    """Hand a loaded DeCoVNet or FeCNN to its own detection generator (see ``methods``)."""
    import importlib

    from napari_wscovid.methods import METHOD_MODULES

    if architecture not in METHOD_MODULES:
        known = sorted(METHOD_MODULES)
        raise ValueError(f"no detection method for architecture {architecture!r}; known: {known}")
    method = importlib.import_module(METHOD_MODULES[architecture])
    result = yield from method.detect_iter(volume, net, info, **kwargs)
    result.model_info = {**(result.model_info or {}), "architecture": architecture}
    return result


def _relay(gen, stage: int, stages: int):
    """Re-yield a sub-generator's progress as one stage of the outer progress; return its result."""
    while True:
        try:
            done, total, message = next(gen)
        except StopIteration as stop:
            return stop.value
        yield stage, stages, message if not total else f"{message} ({done}/{total})"


def _involvement(masks: np.ndarray, explain_idx: np.ndarray, lung_mask: np.ndarray) -> dict:
    from napari_wscovid.boxes import involvement

    full = np.zeros(lung_mask.shape, dtype=bool)
    full[explain_idx] = masks
    return involvement(full, lung_mask)


def explain_slices(
    volume: CTVolume,
    slice_indices: Iterable[int],
    *,
    net,
    lung_mask: np.ndarray,
    slice_probs: np.ndarray,
    classes: tuple[str, ...],
    explain_class: str | None = None,
    ig_steps: int | None = None,
    ig_method: str | None = None,
    min_box_area_mm2: float = 20.0,
    batch_size: int = 2,
    prep_kwargs: dict | None = None,
) -> Generator[Progress, None, dict]:
    """Integrated-gradients saliency and boxes for some slices, as a progress generator.

    Returns ``{"saliency": {name: (n, y, x) uint8}, "masks": (n, y, x) bool, "boxes": [Box]}``.
    The maps shown are magnitudes: each scale's |IG| divided by its largest value on the slice,
    and the joint map = the product of the three, divided by its own maximum on the slice. The
    boxes come from the unquantised product, which equals the paper's |joint| up to a per-slice
    factor that Isodata ignores (it is scale-invariant).
    """
    import torch

    from napari_wscovid.boxes import boxes_from_saliency, saliency_mask
    from napari_wscovid.explain.integrated_gradients import multiscale_saliency
    from napari_wscovid.preprocess import maps_to_slice, prepare_slices

    steps_default, method_default = _default_ig()
    ig_steps = ig_steps or steps_default
    ig_method = ig_method or method_default
    prep_kwargs = prep_kwargs or model_input_kwargs(volume, lung_mask, int(net.config.input_size))
    indices = np.asarray(list(slice_indices), dtype=int)
    device = next(net.parameters()).device
    n, (ny, nx) = len(indices), volume.shape[1:]
    out = {name: np.zeros((n, ny, nx), dtype=np.uint8) for name in SALIENCY_LAYERS}
    masks = np.zeros((n, ny, nx), dtype=bool)
    boxes: list[Box] = []
    done = 0
    for batch in _batches(range(n), batch_size):
        z = indices[batch]
        x, crops = prepare_slices(volume.hu, lung_mask, z, **prep_kwargs)
        probs = slice_probs[z]
        if explain_class is not None:
            targets = np.full(len(z), classes.index(explain_class))
        else:
            targets = np.argmax(probs, axis=1)
        maps = multiscale_saliency(
            net,
            torch.from_numpy(x).to(device),
            torch.as_tensor(targets, device=device),
            steps=ig_steps,
            method=ig_method,
        )
        lung = lung_mask[z] > 0
        scaled = {}
        for scale in SALIENCY_LAYERS[:3]:
            m = np.abs(maps[scale].detach().float().cpu().numpy().reshape(len(z), *x.shape[-2:]))
            scaled[scale] = maps_to_slice(_per_slice_unit(m), crops, (ny, nx)) * lung
            out[scale][batch] = to_uint8(scaled[scale])
        joint_all = scaled["conv3"] * scaled["conv4"] * scaled["conv5"]
        out["joint"][batch] = to_uint8(_per_slice_unit(joint_all))
        for pos, (row, zi, target) in enumerate(zip(batch, z, targets, strict=True)):
            joint = joint_all[pos]
            masks[row] = saliency_mask(joint) & lung[pos]
            if classes[int(target)] == NEGATIVE_CLASS:
                # Evidence for "no pneumonia" is no lesion: a radiologist gets no NP boxes.
                continue
            boxes += boxes_from_saliency(
                joint,
                spacing_yx=volume.spacing[1:],
                slice_index=int(zi),
                class_name=classes[int(target)],
                score=float(slice_probs[zi, int(target)]),
                min_area_mm2=min_box_area_mm2,
            )
        done += len(batch)
        yield done, n, "Explaining slices"
    return {"saliency": out, "masks": masks, "boxes": boxes}


def _per_slice_unit(maps: np.ndarray) -> np.ndarray:
    """Divide each (y, x) map of a (n, y, x) stack by its maximum (all-zero maps stay zero)."""
    peak = maps.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def run_to_end(gen: Generator[Progress, None, object], on_progress=None):
    """Drive a progress generator to its end, passing each ``(done, total, message)`` on."""
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(*progress)


def detect(volume: CTVolume, **kwargs) -> DetectionResult:
    """Run :func:`detect_iter` to the end (scripts, CLI, tests)."""
    return run_to_end(detect_iter(volume, **kwargs))
