"""The stages every detection method shares; imports no method and no pipeline.

Layering, lowest first: ``io``, ``preprocess``, ``models``, ``lung``, ``boxes`` -> ``stages``
(this module) -> ``explain`` -> ``methods`` (one module per paper) -> ``pipeline`` (lungs, model,
dispatch). A stage here is what more than one method does the same way: classify lung slices in
batches, choose the slices to explain, turn slice probabilities into a patient's, quantise maps.
Nothing here imports napari or Qt.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable

import numpy as np

from napari_wscovid.architectures import NEGATIVE_CLASS
from napari_wscovid.io.volume import CTVolume

#: What every detection generator yields: ``(done, total, message)``.
Progress = tuple[int, int, str]

#: Which slices get explained (saliency, boxes): predicted positive, all lung slices, the
#: requested ones, or none.
SALIENCY_SCOPES = ("positive", "all", "slices", "none")

# CAMs and saliency maps are kept as uint8 (value / MAP_LEVELS in [0, 1]): seven full-volume
# maps of a 600-slice 512x512 CT take 1.1 GB this way and 2.2 GB as float16, which broke the
# 3 GB budget for a run with all results kept (benchmarks/bench_detect.py).
MAP_LEVELS = 255

# A slice enters classification when it holds at least this much lung (mm^2): below it the
# lung crop is a few apical or basal voxels, which the network never saw in training.
MIN_LUNG_AREA_MM2 = 200.0

# Patient rule: the patient is judged on its most abnormal slices (those with the lowest NP
# probability), because a few diseased slices decide a diagnosis while most slices of a sick
# lung look normal. The fraction is of the lung slices, with a floor for short series.
TOP_K_FRACTION = 0.1
TOP_K_MIN = 3


def calibration_temperature(info: dict) -> float:
    """The temperature the logits are divided by (fitted on validation data; 1 when none)."""
    return float(info.get("temperature") or 1.0)


def patient_np_offset(info: dict) -> float:
    """Log-odds added to the patient's NP probability before the call (0 when none was fitted).

    The top-k rule judges a patient on its most abnormal slices, so an NP patient is called NP
    only when even those look normal to the network. Weights may carry an offset fitted on
    synthetic patients painted into their own training backgrounds
    (``python -m training.patient_rule``), which re-balances that call; it never sees a held-out
    patient.
    """
    return _info_offset(info, "patient_np_offset")


def slice_np_offset(info: dict) -> float:
    """Log-odds added to a slice's NP probability when choosing the "positive" slices to explain
    (0 when none was fitted; fitted like :func:`patient_np_offset`, on synthetic lesion slices)."""
    return _info_offset(info, "slice_np_offset")


def _info_offset(info: dict, key: str) -> float:
    value = float(info.get(key) or 0.0)
    return value if math.isfinite(value) else 0.0


def shift_np_odds(probs: np.ndarray, classes: tuple[str, ...], np_offset: float) -> np.ndarray:
    """A float copy of ``probs`` (..., K) with the NP column times ``exp(np_offset)``, not
    renormalised: the arg-max is the call under the shifted prior (unchanged without an NP class)."""
    shifted = np.array(probs, dtype=float)
    if np_offset and NEGATIVE_CLASS in classes:
        shifted[..., classes.index(NEGATIVE_CLASS)] *= math.exp(np_offset)
    return shifted


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Quantise maps in [0, 1] to uint8."""
    return np.rint(np.clip(values, 0.0, 1.0) * MAP_LEVELS).astype(np.uint8)


def per_slice_unit(maps: np.ndarray) -> np.ndarray:
    """Divide each (y, x) map of a (n, y, x) stack by its maximum (all-zero maps stay zero)."""
    peak = maps.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def lung_volume_ml(lung_mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Volume of the lung mask in millilitres."""
    return float(np.count_nonzero(lung_mask)) * float(np.prod(spacing)) / 1000.0


def lung_slices(lung_mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Indices of the slices holding at least ``MIN_LUNG_AREA_MM2`` of lung."""
    area_mm2 = lung_mask.reshape(lung_mask.shape[0], -1).astype(bool).sum(1) * spacing[1] * spacing[2]
    return np.flatnonzero(area_mm2 >= MIN_LUNG_AREA_MM2)


def patient_probabilities(
    slice_probs: np.ndarray, classes: tuple[str, ...], np_offset: float = 0.0
) -> tuple[np.ndarray, str]:
    """Aggregate (z, K) slice probabilities (NaN rows = no lung) into (K,) patient probabilities.

    ``np_offset`` (see :func:`patient_np_offset`) multiplies the NP probability of the aggregate
    by ``exp(np_offset)`` before renormalising, a prior shift of the patient call.
    """
    valid = slice_probs[~np.isnan(slice_probs).any(1)]
    if len(valid) == 0:
        return np.full(len(classes), np.nan, dtype=np.float32), "no lung slice"
    if NEGATIVE_CLASS not in classes:
        return valid.mean(0).astype(np.float32), "mean over all lung slices"
    k = min(len(valid), max(TOP_K_MIN, math.ceil(TOP_K_FRACTION * len(valid))))
    negative = classes.index(NEGATIVE_CLASS)
    most_abnormal = np.argsort(valid[:, negative])[:k]
    rule = f"mean of the {k} lung slices with the lowest {NEGATIVE_CLASS} probability"
    patient = valid[most_abnormal].mean(0)
    if np_offset:
        patient = shift_np_odds(patient, classes, np_offset)
        patient /= patient.sum()
        rule += f", {NEGATIVE_CLASS} odds times {math.exp(np_offset):.3g} (fitted on synthetic patients)"
    return patient.astype(np.float32), rule


def model_input_kwargs(volume: CTVolume, lung_mask: np.ndarray, size: int, normalisation=None) -> dict:
    """Keyword arguments of ``prepare_slices`` for this volume; the intensity range is computed
    once here rather than for every batch. Every caller that feeds slices to a network (detection,
    on-demand explanation, training) takes them from here, so all see the same input."""
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


def batches(indices: Iterable[int], size: int) -> Generator[np.ndarray, None, None]:
    """Consecutive chunks of at most ``size`` of ``indices``, as integer arrays."""
    indices = np.asarray(list(indices), dtype=int)
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def slices_to_explain(
    scope: str,
    slices,
    slice_probs: np.ndarray,
    classes: tuple[str, ...],
    lung_idx: np.ndarray,
    np_offset: float = 0.0,
    patient_class: str | None = None,
) -> np.ndarray:
    """The lung slices that get saliency and boxes under ``scope`` (one of :data:`SALIENCY_SCOPES`).

    "positive" = the slices whose most probable class is not :data:`NEGATIVE_CLASS` once its
    probability is multiplied by ``exp(np_offset)`` (:func:`slice_np_offset`; every lung slice for
    a task without it), and none when ``patient_class`` (the patient call) is
    :data:`NEGATIVE_CLASS`: Hu et al. localise lesions in CT called COVID-19 or CAP, and boxes on a
    patient called NP contradict the call (measured on held-out real NP lungs: 56 and 25 boxes,
    ``docs/heldout/patient_rule.md``). "slices" = the lung slices among ``slices``.
    """
    if scope not in SALIENCY_SCOPES:
        raise ValueError(f"saliency must be one of {SALIENCY_SCOPES}, got {scope!r}")
    if scope == "none":
        return np.array([], dtype=int)
    if scope == "all":
        return lung_idx
    if scope == "slices":
        requested = np.asarray(list(slices) if slices is not None else [], dtype=int)
        return lung_idx[np.isin(lung_idx, requested)]
    if NEGATIVE_CLASS not in classes:
        return lung_idx
    if patient_class == NEGATIVE_CLASS:
        return np.array([], dtype=int)
    probs = shift_np_odds(slice_probs[lung_idx], classes, np_offset)
    return lung_idx[np.argmax(probs, axis=1) != classes.index(NEGATIVE_CLASS)]


def abnormality(slice_probs: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """How abnormal each slice looks, for ordering: ``1 - P(NP)``, or the largest class probability
    for a task without :data:`NEGATIVE_CLASS`; slices without a probability (no lung) rank last."""
    probs = np.asarray(slice_probs, dtype=float)
    if NEGATIVE_CLASS in classes:
        score = 1.0 - probs[:, classes.index(NEGATIVE_CLASS)]
    else:
        score = probs.max(axis=1) if probs.size else np.zeros(len(probs))
    return np.where(np.isfinite(score), score, -np.inf)


def budget_seconds(seconds) -> float:
    """``seconds`` as a time budget: a finite number >= 0, or a ValueError saying why not."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"a time budget must be a number of seconds, got {seconds!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a time budget must be a finite number of seconds >= 0, got {seconds!r}")
    return value


class Deadline:
    """A stop signal (``is_set()``, as :class:`threading.Event`) that sets itself ``seconds`` after
    it is first asked, so that a budget given for the explanation counts from the explanation's
    start, not from the lung step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = budget_seconds(seconds)
        self._started: float | None = None

    def is_set(self) -> bool:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        return now - self._started >= self.seconds


def patient_call(patient_probs: np.ndarray, classes: tuple[str, ...]) -> str | None:
    """The most probable class of the patient, or None when there is none (no lung slice)."""
    probs = np.asarray(patient_probs, dtype=float)
    return classes[int(np.argmax(probs))] if probs.size and np.isfinite(probs).all() else None


def call_line(patient_probs: np.ndarray, classes: tuple[str, ...]) -> str:
    """The patient's answer in words, "Called COVID-19 (0.87)", or "" when there is none."""
    called = patient_call(patient_probs, classes)
    if called is None:
        return ""
    return f"Called {called} ({float(patient_probs[classes.index(called)]):.2f})"


def explain_note(scope: str, patient_class: str | None, n_explained: int, n_lung_slices: int) -> str:
    """Why a run explained no slice, in words for the user ("" when it explained some)."""
    if n_explained or scope == "none":
        return ""
    if not n_lung_slices:
        return "No lesion boxes: no slice holds enough lung to be classified."
    if scope == "positive" and patient_class == NEGATIVE_CLASS:
        return (
            f"No lesion boxes: the patient is called {NEGATIVE_CLASS}. Choose 'all slices' or "
            "'current slice only' to see the network's saliency anyway."
        )
    if scope == "positive":
        return f"No lesion boxes: every lung slice is called {NEGATIVE_CLASS}."
    return "No lesion boxes: none of the chosen slices holds lung."


def stopped_note(n_explained: int, n_left: int) -> str:
    """What a run stopped early explained, in words for the user ("" when nothing is left)."""
    if not n_left:
        return ""
    if not n_explained:
        return (
            f"Explaining was stopped before any slice: none of the {n_left} slices to explain has "
            "saliency or boxes yet."
        )
    return (
        f"Explaining was stopped early: saliency and boxes cover the {n_explained} most abnormal of "
        f"the {n_explained + n_left} slices to explain; the other {n_left} have none yet."
    )


def classify_slices(
    forward: Callable,
    volume: CTVolume,
    lung_mask: np.ndarray,
    lung_idx: np.ndarray,
    prep_kwargs: dict,
    *,
    n_classes: int,
    torch_device,
    batch_size: int = 16,
    temperature: float = 1.0,
    channels_last: bool = False,
    on_batch: Callable | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Slice probabilities (z, K) of the lung slices, in batches; NaN rows for the others.

    ``forward(x)`` returns an output with ``.logits``; ``on_batch(output, indices, crops)``
    sees each batch (a method keeps its CAMs there). Logits are divided by ``temperature``
    (the calibration fitted on validation data; 1 = none). Raises ``FloatingPointError`` on
    NaN/inf, naming the slices.
    """
    import torch

    from napari_wscovid.preprocess import prepare_slices

    slice_probs = np.full((volume.shape[0], n_classes), np.nan, dtype=np.float32)
    total, done = len(lung_idx), 0
    yield 1, 4, f"Classifying {total} lung slices on {torch_device.type.upper()}"
    # Each batch has its own inference_mode block and the yield stays outside it: grad mode is
    # a per-thread global, and a generator suspended inside the block would leave its caller
    # in inference mode (for good, if it were then collected on another thread).
    for batch in batches(lung_idx, batch_size):
        with torch.inference_mode():
            x, crops = prepare_slices(volume.hu, lung_mask, batch, **prep_kwargs)
            x = torch.from_numpy(x).to(torch_device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = forward(x)
            probs = torch.softmax(out.logits.float() / temperature, dim=1).cpu().numpy()
            if not np.isfinite(probs).all():
                raise FloatingPointError(
                    f"the model produced NaN/inf on slices {batch.tolist()}; weights or input are broken"
                )
            slice_probs[batch] = probs
            if on_batch is not None:
                on_batch(out, batch, crops)
        done += len(batch)
        yield 1, 4, f"Classified {done}/{total} slices"
    return slice_probs


def relay(gen, stage: int, stages: int, prefix: str = ""):
    """Re-yield a sub-generator's progress as one stage of the outer progress, each message after
    ``prefix``; return its result."""
    while True:
        try:
            done, total, message = next(gen)
        except StopIteration as stop:
            return stop.value
        yield stage, stages, prefix + (message if not total else f"{message} ({done}/{total})")


def run_to_end(gen: Generator[Progress, None, object], on_progress=None):
    """Drive a progress generator to its end, passing each ``(done, total, message)`` on."""
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(*progress)


class WorkCancelled(Exception):
    """Raised inside :func:`in_thread`'s work at its next progress report once the caller
    closed the generator."""


def in_thread(work: Callable, name: str = "wscovid-work") -> Generator[Progress, None, object]:
    """Run ``work(report)`` in a thread and yield each ``report(done, total, message)`` it makes;
    return its result, or raise its error, in the caller's thread.

    A long step that reports through a callback (the lungs, a PACS download) thus becomes a
    progress generator a widget shows and can cancel: closing the generator makes the work's
    next report raise :class:`WorkCancelled`, and the work's thread is joined before the close
    returns (a thread left inside torch aborts the interpreter at exit).
    """
    reports: queue.Queue = queue.Queue()
    outcome: dict = {}
    cancelled = threading.Event()

    def report(done, total, message):
        if cancelled.is_set():
            raise WorkCancelled
        reports.put((done, total, message))

    def run():
        try:
            outcome["result"] = work(report)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
        finally:
            reports.put(None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := reports.get()) is not None:
            yield item
    finally:
        cancelled.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
