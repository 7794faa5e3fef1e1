"""Detection as a generator: lungs -> the loaded network's method (see :mod:`napari_wscovid.methods`).

``detect_iter`` yields ``(done, total, message)`` and returns a :class:`DetectionResult`, so a
napari worker can show progress and cancel at any yield; ``detect`` runs it to the end for
scripts and the CLI. It segments the lungs, loads the model and hands over to the method of the
model's architecture; the stages the methods share are in :mod:`napari_wscovid.stages`. Nothing
here imports napari or Qt.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Generator

import numpy as np

from napari_wscovid.io.volume import CTVolume
from napari_wscovid.methods import DEFAULT_ARCHITECTURE, METHOD_MODULES, METHOD_NAMES
from napari_wscovid.results import DetectionResult

# The shared stages, re-exported: scripts and the training package import them from here.
from napari_wscovid.stages import (  # noqa: F401
    MAP_LEVELS,
    NEGATIVE_CLASS,
    SALIENCY_SCOPES,
    Progress,
    in_thread,
    lung_slices,
    lung_volume_ml,
    model_input_kwargs,
    patient_probabilities,
    run_to_end,
    slice_np_offset,
    to_uint8,
)

logger = logging.getLogger(__name__)

#: Parameters of a method's ``detect_iter`` that the pipeline fills, not the caller.
_PIPELINE_ARGS = {"volume", "net", "info", "lung_mask", "torch_device", "timings", "stop_explaining"}


def method_module(architecture: str):
    """The module that runs networks of ``architecture``."""
    if architecture not in METHOD_MODULES:
        known = sorted(METHOD_MODULES)
        raise ValueError(f"no detection method for architecture {architecture!r}; known: {known}")
    return importlib.import_module(METHOD_MODULES[architecture])


def method_options(architecture: str) -> dict:
    """The options (name -> default) the method of ``architecture`` accepts."""
    params = inspect.signature(method_module(architecture).detect_iter).parameters
    return {
        name: p.default
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _PIPELINE_ARGS
    }


# What detection needs beyond the loaded CT: results kept (lung mask, CAMs, saliency: 8 bytes a
# voxel) and working copies. Measured: a 1000 x 512 x 512 CT peaks at 3.74 GiB RSS with its
# 1.22 GiB of HU (benchmarks/bench_detect.py --memory-only --memory-slices 1000): 2.5 GiB more.
DETECT_BYTES_PER_VOXEL = 9
DETECT_FIXED_BYTES = 512 * 1024**2


class NotEnoughMemory(RuntimeError):
    """Detection of this CT would not fit in the memory left; raised before any work."""


def check_detect_memory(volume: CTVolume) -> None:
    """Refuse, with the figures, a detection that would run out of memory halfway."""
    from napari_wscovid.io.volume import available_memory_bytes

    need = int(np.prod(volume.shape, dtype=np.int64)) * DETECT_BYTES_PER_VOXEL + DETECT_FIXED_BYTES
    available = available_memory_bytes()
    if available is not None and need > available:
        size = " x ".join(map(str, volume.shape))
        raise NotEnoughMemory(
            f"detection of this {size} CT needs about {need / 1024**3:.1f} GiB more memory; "
            f"{available / 1024**3:.1f} GiB is free. Close other programs or layers, or analyse "
            "part of the scan"
        )


def detect_iter(
    volume: CTVolume,
    *,
    model="default",
    device: str = "auto",
    lung_mask: np.ndarray | None = None,
    lung_method: str | None = None,
    stop_explaining=None,
    **options,
) -> Generator[Progress, None, DetectionResult]:
    """Run the detection on ``volume``, yielding progress; returns a :class:`DetectionResult`.

    ``model`` is a registry name, a weights file or a network instance; its architecture picks
    the method. ``lung_method`` is one of :data:`napari_wscovid.lung.LUNG_METHODS` (default
    :data:`~napari_wscovid.lung.DEFAULT_LUNG_METHOD`); with ``lung_mask`` given there is no
    segmentation, and ``model_info["lung_method"]`` says "given". ``options`` go to the method
    (WSNet: ``saliency``, ``slices``, ``explain_class``, ``ig_steps``, ``ig_method``,
    ``min_box_area_mm2``, ``batch_size``, ``saliency_batch_size``; see :func:`method_options`);
    one the method does not take raises ``ValueError`` before any work is done, and ``None``
    means the method's default. ``stop_explaining`` (a :class:`threading.Event` or
    :class:`~napari_wscovid.stages.Deadline`) is a signal, not an option: a method with a
    slice-by-slice explanation stage (WSNet's integrated gradients) ends it once it is set (the
    slices in progress dropped whole) and lists the slices left in ``unexplained_slices``;
    DeCoVNet and FeCNN explain within their forward pass and have nothing to stop.
    """
    import torch

    from napari_wscovid.models.registry import load_model, select_device

    options = {k: v for k, v in options.items() if v is not None}
    saliency = options.get("saliency", "positive")
    if saliency not in SALIENCY_SCOPES:
        raise ValueError(f"saliency must be one of {SALIENCY_SCOPES}, got {saliency!r}")
    if not volume.is_hu:
        logger.warning("input is not in Hounsfield units; intensities were rescaled for display")
    timings: dict[str, float] = {}
    check_detect_memory(volume)

    yield 0, 4, "Segmenting lungs"
    start = time.perf_counter()
    lung_source = "given"
    if lung_mask is None:
        from napari_wscovid.lung import DEFAULT_LUNG_METHOD, segment_lungs

        lung_source = lung_method or DEFAULT_LUNG_METHOD
        lung_mask = yield from _segment_with_progress(segment_lungs, volume, lung_source)
    lung_mask = np.asarray(lung_mask, dtype=np.uint8)
    if lung_mask.shape != volume.shape:
        raise ValueError(f"lung mask shape {lung_mask.shape} differs from the CT's {volume.shape}")
    whole_image = False
    if lung_source != "given" and lung_mask.any():
        from napari_wscovid.quality import MIN_LUNG_SLICE_MM2

        widest_mm2 = lung_mask.reshape(len(lung_mask), -1).sum(1).max() * float(np.prod(volume.spacing[1:]))
        if widest_mm2 < MIN_LUNG_SLICE_MM2:
            # bowel gas of an abdomen-only CT, airways of a neck: classified, it got a confident
            # class and boxes in the bowel; no lung means no call
            logger.warning(
                "no lungs: the widest 'lung' cross-section found is %.1f cm² (a lung is over %.0f); "
                "nothing is classified",
                widest_mm2 / 100,
                MIN_LUNG_SLICE_MM2 / 100,
            )
            lung_mask = np.zeros_like(lung_mask)
    if not volume.is_hu and volume.shape[0] == 1 and not lung_mask.any():
        # A picture in which no lung is found (the "classical" finder on a tight crop whose lungs
        # touch the border) is used whole, as training does with such images (plugin_image_input);
        # the result says so (a severe quality flag), since the answer is then about the picture.
        logger.warning("no lung found in this 2-D image; the whole image is analysed as lung")
        lung_mask = np.ones(volume.shape, dtype=np.uint8)
        whole_image, lung_source = True, f"{lung_source}, none found: the whole image"
    timings["lung_segmentation"] = time.perf_counter() - start

    start = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        torch_device, device_note = select_device(device)
        net = model.to(torch_device).eval()
        info = {"name": type(model).__name__, "version": "in-memory", "sha256": None, "temperature": 1.0}
        # an in-memory network has no registry entry: no review threshold, no feature reference
    else:
        net, info = load_model(model, device=device)
        torch_device = next(net.parameters()).device
        device_note = info.get("fallback") or ""
    if device_note:
        logger.warning(device_note)
    architecture = getattr(net.config, "architecture", DEFAULT_ARCHITECTURE)
    accepted = method_options(architecture)
    unsupported = sorted(set(options) - set(accepted))
    if unsupported:
        raise ValueError(
            f"{METHOD_NAMES.get(architecture, architecture)} does not take "
            f"{', '.join(unsupported)}; its options are {', '.join(sorted(accepted))}"
        )
    timings["model_load"] = time.perf_counter() - start

    method = method_module(architecture)
    if stop_explaining is not None and "stop_explaining" in inspect.signature(method.detect_iter).parameters:
        options["stop_explaining"] = stop_explaining
    result = yield from method.detect_iter(
        volume, net, info, lung_mask=lung_mask, torch_device=torch_device, timings=timings, **options
    )
    from napari_wscovid.quality import QCFlag, quality_checks, scan_status
    from napari_wscovid.reliability import model_fit_checks, reference_for

    flags = quality_checks(volume, lung_mask)
    if whole_image:
        flags.append(
            QCFlag(
                "whole_image_as_lung",
                "severe",
                1.0,
                "no lung was found in this 2-D image: the whole picture was analysed as lung, so the "
                "answer is about the picture, not about its lungs",
            )
        )
    reference, missing = reference_for(info)
    fit_flags, result.reliability = model_fit_checks(
        result, reference, info.get("review_below"), missing, slice_offset=slice_np_offset(info)
    )
    flags += fit_flags
    result.qc = [f.as_dict() for f in flags]
    result.status = scan_status(flags, lung_mask)
    if result.status != "ok":
        logger.warning(
            "scan status %s: %s",
            result.status,
            "; ".join(f.message for f in flags if f.severity == "severe") or "see the quality flags",
        )
    result.model_info = {
        **{k: info.get(k) for k in ("name", "version", "sha256", "temperature")},
        **(result.model_info or {}),
        "architecture": architecture,
        "lung_method": lung_source,
    }
    yield 4, 4, "Done"
    return result


def _segment_with_progress(segment_lungs, volume: CTVolume, method: str):
    """The lung step (about 5 s on a laptop for a 300-slice CT) in a thread, its progress
    re-yielded so a widget shows it and can cancel there (:func:`stages.in_thread`)."""
    reports = in_thread(lambda report: segment_lungs(volume, method=method, progress=report), "wscovid-lungs")
    try:
        while True:
            try:
                done, total, message = next(reports)
            except StopIteration as stop:
                return stop.value
            yield 0, 4, f"Segmenting lungs: {message} ({done}/{total})" if total else "Segmenting lungs"
    finally:
        reports.close()  # a cancelled run stops the lung thread and waits for it here


def detect(volume: CTVolume, **kwargs) -> DetectionResult:
    """Run :func:`detect_iter` to the end (scripts, CLI, tests)."""
    return run_to_end(detect_iter(volume, **kwargs))
