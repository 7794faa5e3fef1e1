"""Hu et al. 2020 (weakly supervised multi-scale learning) as a detection method.

Per lung slice the WSNet gives class probabilities (the three scales' globally max-pooled
class scores summed, softmax) and its per-scale class activation maps. The patient is judged on
its most abnormal slices (:func:`~napari_wscovid.stages.patient_probabilities`). The CAMs of the
explained class become volumes; the slices to explain get per-scale integrated-gradients
saliency, their pixel-wise product (joint saliency) and boxes from it (Gaussian blur, Isodata,
closing, components above an area).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable

import numpy as np

from napari_wscovid.architectures import WSNET
from napari_wscovid.explain.cam import cam_volume
from napari_wscovid.explain.saliency import SALIENCY_LAYERS, explain_slices
from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box, DetectionResult
from napari_wscovid.stages import (
    Progress,
    calibration_temperature,
    call_line,
    classify_slices,
    explain_note,
    lung_slices,
    lung_volume_ml,
    model_input_kwargs,
    patient_call,
    patient_np_offset,
    patient_probabilities,
    relay,
    slice_np_offset,
    slices_to_explain,
    stopped_note,
)

ARCHITECTURE = WSNET


def detect_iter(
    volume: CTVolume,
    net,
    info: dict,
    *,
    lung_mask: np.ndarray,
    torch_device,
    timings: dict | None = None,
    saliency: str = "positive",
    slices: Iterable[int] | None = None,
    explain_class: str | None = None,
    ig_steps: int | None = None,
    ig_method: str | None = None,
    min_box_area_mm2: float = 20.0,
    batch_size: int = 16,
    saliency_batch_size: int = 2,
    stop_explaining=None,
) -> Generator[Progress, None, DetectionResult]:
    """Classify the lung slices, build the CAM volumes, explain the chosen slices.

    ``saliency`` is one of :data:`~napari_wscovid.stages.SALIENCY_SCOPES`; ``explain_class``
    the class whose CAMs, saliency and boxes are made (the predicted one by default).
    The slices are explained most abnormal first; once ``stop_explaining`` (a
    :class:`threading.Event` or :class:`~napari_wscovid.stages.Deadline`) is set the stage ends
    (the slices in progress dropped whole), and the result lists the chosen slices left
    unexplained in ``unexplained_slices``.
    """
    from napari_wscovid.models.wsnet import inference_copy

    timings = {} if timings is None else timings
    classes = tuple(net.config.classes)
    if explain_class is not None and explain_class not in classes:
        raise ValueError(f"explain_class {explain_class!r} is not one of the model's classes {classes}")
    lung_idx = lung_slices(lung_mask, volume.spacing)
    prep_kwargs = model_input_kwargs(volume, lung_mask, int(net.config.input_size), info.get("normalisation"))

    start = time.perf_counter()
    cam_lowres: dict[str, list[np.ndarray]] = {}
    crops_all: list = []

    features: list[np.ndarray] = []

    def keep_cams(out, batch, crops):
        # Raw CAMs of every class at their native resolution; the class to show is chosen once
        # the patient-level prediction is known.
        for scale, cam in out.cams.items():
            cam_lowres.setdefault(scale, []).append(cam.float().cpu().numpy())
        crops_all.extend(crops)
        if out.features is not None:
            features.append(out.features.float().cpu().numpy())

    slice_probs = yield from classify_slices(
        inference_copy(net),
        volume,
        lung_mask,
        lung_idx,
        prep_kwargs,
        n_classes=len(classes),
        torch_device=torch_device,
        batch_size=batch_size,
        temperature=calibration_temperature(info),
        channels_last=True,
        on_batch=keep_cams,
    )
    timings["classification"] = time.perf_counter() - start

    patient_probs, rule = patient_probabilities(slice_probs, classes, patient_np_offset(info))
    called = patient_call(patient_probs, classes)
    shown_class = explain_class or called or classes[0]
    shown = classes.index(shown_class)

    start = time.perf_counter()
    cams = {
        scale: cam_volume(np.concatenate(parts)[:, shown], crops_all, lung_idx, volume.shape)
        for scale, parts in cam_lowres.items()
    }
    cam_lowres.clear()  # the low-resolution maps of every class are no longer needed
    timings["cams"] = time.perf_counter() - start

    # An explicitly asked class is explained whatever the call; otherwise a patient called NP
    # gets no boxes (stages.slices_to_explain).
    gate = None if explain_class is not None else called
    explain_idx = slices_to_explain(
        saliency, slices, slice_probs, classes, lung_idx, slice_np_offset(info), patient_class=gate
    )
    saliency_maps: dict[str, np.ndarray] = {}
    boxes: list[Box] = []
    involvement: dict = {}
    steps_used: tuple[int, ...] = ()
    if len(explain_idx):
        # The answer is known here, minutes before the saliency ends on a laptop CPU: every
        # message of that stage carries it, so the reader has it at once.
        answer = call_line(patient_probs, classes)
        prefix = f"{answer}. " if answer else ""
        yield 2, 4, f"{prefix}Explaining {len(explain_idx)} slices, most abnormal first"
        start = time.perf_counter()
        explained = yield from relay(
            explain_slices(
                volume,
                explain_idx,
                net=net,
                lung_mask=lung_mask,
                slice_probs=slice_probs,
                classes=classes,
                explain_class=explain_class,
                ig_steps=ig_steps,
                ig_method=ig_method,
                min_box_area_mm2=min_box_area_mm2,
                batch_size=saliency_batch_size,
                prep_kwargs=prep_kwargs,
                stop=stop_explaining,
            ),
            stage=2,
            stages=4,
            prefix=prefix,
        )
        timings["saliency_and_boxes"] = time.perf_counter() - start
        chosen, explain_idx = explain_idx, explained["slices"]
        unexplained = np.setdiff1d(chosen, explain_idx)
        if len(explain_idx):
            saliency_maps = {name: np.zeros(volume.shape, dtype=np.uint8) for name in SALIENCY_LAYERS}
            for name in SALIENCY_LAYERS:
                saliency_maps[name][explain_idx] = explained["saliency"][name]
            involvement = _involvement(explained["masks"], explain_idx, lung_mask)
        boxes = explained["boxes"]
        steps_used = tuple(int(v) for v in explained["ig_steps"])
    else:
        unexplained = np.array([], dtype=int)
        if saliency in ("positive", "all") and lung_mask.any():
            # nothing to explain under the scope's rule (a patient called NP, no lung slice):
            # the method finds no involved lung; only "none" leaves the involvement unmeasured
            from napari_wscovid.boxes import involvement as lung_involvement

            involvement = lung_involvement(np.zeros(lung_mask.shape, dtype=bool), lung_mask)

    yield 3, 4, "Finishing"
    return DetectionResult(
        classes=classes,
        slice_probs=slice_probs,
        patient_probs=patient_probs,
        lung_mask=lung_mask,
        cams=cams,
        saliency=saliency_maps,
        boxes=boxes,
        involvement=involvement,
        timings=timings,
        device=str(torch_device.type),
        lung_volume_ml=lung_volume_ml(lung_mask, volume.spacing),
        saliency_slices=tuple(int(i) for i in explain_idx),
        ig_steps=steps_used,
        patient_rule=rule,
        explain_note=stopped_note(len(explain_idx), len(unexplained))
        or explain_note(saliency, gate, len(explain_idx), len(lung_idx)),
        unexplained_slices=tuple(int(i) for i in unexplained),
        explained_class=shown_class,
        slice_features=np.concatenate(features) if features else None,
    )


def explain_more(
    volume: CTVolume,
    result: DetectionResult,
    slices: Iterable[int],
    *,
    model="default",
    device: str = "auto",
    ig_steps: int | None = None,
    min_box_area_mm2: float = 20.0,
) -> Generator[Progress, None, dict]:
    """Saliency and boxes of ``slices`` after a run that did not explain them ("current slice").

    Loads the run's model (the registry caches it) and explains exactly the input the run
    classified (:func:`~napari_wscovid.stages.model_input_kwargs`: HU or not, padding, the
    model's own normalisation). Returns :func:`~napari_wscovid.explain.saliency.explain_slices`'s
    dict.
    """
    from napari_wscovid.models.registry import load_model

    net, info = load_model(model, device=device)
    prep_kwargs = model_input_kwargs(
        volume, result.lung_mask, int(net.config.input_size), info.get("normalisation")
    )
    return (
        yield from explain_slices(
            volume,
            slices,
            net=net,
            lung_mask=result.lung_mask,
            slice_probs=result.slice_probs,
            classes=result.classes,
            ig_steps=ig_steps,
            min_box_area_mm2=min_box_area_mm2,
            prep_kwargs=prep_kwargs,
        )
    )


def _involvement(masks: np.ndarray, explain_idx: np.ndarray, lung_mask: np.ndarray) -> dict:
    from napari_wscovid.boxes import involvement

    full = np.zeros(lung_mask.shape, dtype=bool)
    full[explain_idx] = masks
    return involvement(full, lung_mask)
