"""Every model on every held-out case through the plugin's ``detect``, boxes scored against the masks.

WSNet runs without saliency (so its time is the classification's) and then explains a few chosen
slices, whose per-scale CAM boxes and joint boxes are scored; another method makes its maps and
boxes in its one default run, and those are scored.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from napari_wscovid.architectures import NEGATIVE_CLASS, WSNET
from napari_wscovid.stages import patient_call, slice_np_offset
from training.evaluation.heldout import Case, HeldOut
from training.evaluation.settings import Settings
from training.localisation import MatchCounts, component_rects, match_slice

log = logging.getLogger("training.evaluation.detect_cases")

CAM_SCALES = ("conv3", "conv4", "conv5")


@dataclass
class Outcome:
    """What one model gave on one case."""

    case: Case
    classes: tuple[str, ...] = ()
    slice_probs: np.ndarray | None = None  # (len(case.slice_index), K); NaN rows: not classified
    patient_probs: np.ndarray | None = None  # (K,)
    counts: dict[str, MatchCounts] = field(default_factory=dict)  # box source -> counts
    unexplained: dict[str, int] = field(default_factory=dict)  # lesion slices not scored, by reason
    seconds: float = 0.0  # the main detect call
    explain_seconds: float = 0.0
    n_explained: int = 0
    n_positive: int = 0
    complete_run: bool = False  # ``seconds`` already includes the method's saliency and boxes
    error: str | None = None


def slices_to_explain(
    slice_probs: np.ndarray,
    classes: Sequence[str],
    limit: int | None,
    *,
    np_offset: float = 0.0,
    patient_class: str | None = None,
) -> tuple:
    """The plugin's default saliency slices (``stages.slices_to_explain`` "positive": classified,
    not predicted NP under the weights' slice offset, none when the patient is called NP), at most
    ``limit`` of them evenly spread over the volume: ``(chosen, number predicted positive)``."""
    from napari_wscovid.stages import slices_to_explain as plugin_rule

    classified = np.flatnonzero(np.isfinite(slice_probs).all(1))
    rows = plugin_rule("positive", None, slice_probs, tuple(classes), classified, np_offset, patient_class)
    n_positive = len(rows)
    if limit is not None and len(rows) > limit:
        # The centres of ``limit`` equal runs, so the partial-lung first and last slices are not
        # favoured.
        rows = rows[((np.arange(limit) + 0.5) * len(rows) / limit).astype(int)]
    return rows, n_positive


def _rects(boxes) -> list[tuple[int, int, int, int]]:
    return [(b.y0, b.x0, b.y1, b.x1) for b in boxes]


def score_boxes(
    case: Case,
    boxes_by_source: dict[str, dict[int, list]],
    slices: Sequence[int],
    spacing_yx,
    settings: Settings,
) -> tuple[dict[str, MatchCounts], list[int]]:
    """Match each box source's boxes on ``slices`` with the case's true lesions.

    Returns the counts per box source and the slices with a true lesion outside ``slices``
    (lesions the localisation never looked at).
    """
    truth, distractors = {}, {}
    for z in range(case.lesion_mask.shape[0]):
        truth[z] = component_rects(
            case.lesion_mask[z], case.pneumonia_labels, spacing_yx, settings.min_lesion_area_mm2
        )
        distractors[z] = component_rects(case.lesion_mask[z], case.distractor_labels, spacing_yx)
    counts = {}
    for source, by_slice in boxes_by_source.items():
        total = MatchCounts()
        for z in slices:
            total += match_slice(
                _rects(by_slice.get(int(z), [])), truth[int(z)], distractors[int(z)], settings.iou_threshold
            )
        counts[source] = total
    chosen = {int(z) for z in slices}
    return counts, [z for z, rects in truth.items() if rects and z not in chosen]


def _by_slice(boxes) -> dict[int, list]:
    out: dict[int, list] = {}
    for b in boxes:
        out.setdefault(int(b.slice), []).append(b)
    return out


def _why_not_explained(
    slices: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    np_offset: float = 0.0,
    patient_class: str | None = None,
) -> dict[str, int]:
    """Why WSNet explained none of these lesion slices: no lung found, the patient called NP, the
    slice predicted NP (under the weights' slice offset), or the cap."""
    from napari_wscovid.stages import slices_to_explain as plugin_rule

    reasons = {
        "not classified (no lung found)": 0,
        "patient called NP": 0,
        "predicted NP": 0,
        "beyond the per-volume cap": 0,
    }
    classified = np.flatnonzero(np.isfinite(probs).all(1))
    positive = set(plugin_rule("positive", None, probs, tuple(classes), classified, np_offset).tolist())
    for z in slices:
        if not np.isfinite(probs[z]).all():
            reasons["not classified (no lung found)"] += 1
        elif NEGATIVE_CLASS in classes and patient_class == NEGATIVE_CLASS:
            reasons["patient called NP"] += 1
        elif z not in positive:
            reasons["predicted NP"] += 1
        else:
            reasons["beyond the per-volume cap"] += 1
    return reasons


def check_models(models: Sequence[str], device: str, classes: Sequence[str]) -> dict[str, dict]:
    """Load every model before the long part (a model that cannot load fails now) and return
    what the report says of each; warn about classes the held-out data have and a model lacks."""
    from napari_wscovid.models.registry import load_model

    infos = {}
    for model in models:
        _, info = load_model(model, device=device)
        infos[model] = {
            k: info.get(k) for k in ("name", "version", "sha256", "architecture", "classes", "path")
        }
        if info.get("fallback"):
            log.warning("%s: %s", model, info["fallback"])
        if set(info.get("classes") or ()) != set(classes):
            log.warning(
                "%s has classes %s, the run's held-out data %s: classes it lacks are left out of its tables",
                model,
                info.get("classes"),
                classes,
            )
    return infos


def model_info(model: str, device: str) -> dict:
    """The info of a registry name or weights file (the registry caches the loaded model)."""
    from napari_wscovid.models.registry import load_model

    return load_model(model, device=device)[1]


def run_case(case: Case, volume, model: str, settings: Settings) -> Outcome:
    """Detect on one case with one model; explain some slices and score boxes where masks exist."""
    from napari_wscovid import detect
    from napari_wscovid.boxes import boxes_from_saliency

    outcome = Outcome(case)
    info = model_info(model, settings.device)
    architecture = info["architecture"]
    # WSNet is timed without saliency and explains chosen slices below; another method makes its
    # maps and boxes in its one default run (FeCNN on the slices it calls positive).
    saliency = {"saliency": "none"} if architecture == WSNET else {}
    start = time.perf_counter()
    result = detect(volume, model=model, device=settings.device, **saliency)
    outcome.seconds = time.perf_counter() - start
    outcome.classes = tuple(result.classes)
    outcome.complete_run = architecture != WSNET
    probs = np.asarray(result.slice_probs, dtype=float)
    per_slice = probs.ndim == 2 and probs.shape[0] == volume.shape[0]
    # A patient-level method (DeCoVNet) gives no slice probabilities: n/a, not "unclassified".
    if per_slice and (architecture == WSNET or np.isfinite(probs).any()):
        outcome.slice_probs = probs[case.slice_index]
    outcome.patient_probs = np.asarray(result.patient_probs, dtype=float)
    if case.lesion_mask is None:
        return outcome
    if case.lesion_mask.shape != tuple(volume.shape):
        raise ValueError(f"{case.name}: lesion mask {case.lesion_mask.shape} but volume {volume.shape}")
    spacing_yx = tuple(volume.spacing[1:])
    # the plugin's rule for the slices to explain: the weights' slice offset and the patient call
    rule = {
        "np_offset": slice_np_offset(info),
        "patient_class": patient_call(result.patient_probs, tuple(result.classes)),
    }
    if architecture != WSNET:
        # Another method makes its boxes in the same call: scored on the slices it explained
        # (FeCNN: those predicted not NP), or on every lung slice when it names none (DeCoVNet).
        sources = {}
        for b in result.boxes:
            sources.setdefault(b.source, []).append(b)
        boxes = {s: _by_slice(bs) for s, bs in sources.items()}
        if result.saliency_slices:
            slices = np.asarray(result.saliency_slices, dtype=int)
            outcome.counts, missed = score_boxes(case, boxes, slices, spacing_yx, settings)
            outcome.unexplained = _why_not_explained(missed, probs, outcome.classes, **rule)
        else:
            slices = np.flatnonzero(np.asarray(result.lung_mask).reshape(volume.shape[0], -1).any(1))
            outcome.counts, missed = score_boxes(case, boxes, slices, spacing_yx, settings)
            outcome.unexplained = {"outside the lung mask": len(missed)}
        return outcome
    chosen, outcome.n_positive = slices_to_explain(
        probs, outcome.classes, settings.explain_per_volume, **rule
    )
    boxes = {scale: {} for scale in CAM_SCALES}
    boxes["joint"] = {}
    if len(chosen):
        start = time.perf_counter()
        explained = detect(
            volume,
            model=model,
            device=settings.device,
            saliency="slices",
            slices=chosen.tolist(),
            lung_mask=result.lung_mask,
            ig_steps=settings.ig_steps,
            min_box_area_mm2=settings.min_box_area_mm2,
        )
        outcome.explain_seconds = explained.timings.get("saliency_and_boxes", time.perf_counter() - start)
        chosen = np.asarray(explained.saliency_slices, dtype=int)
        outcome.n_explained = len(chosen)
        cls = explained.explained_class
        for scale in CAM_SCALES:
            if scale not in explained.cams:
                continue
            for z in chosen:
                cam = explained.cams[scale][z].astype(np.float32) / 255.0
                boxes[scale][int(z)] = boxes_from_saliency(
                    cam,
                    spacing_yx=spacing_yx,
                    slice_index=int(z),
                    class_name=cls,
                    score=float(probs[z, outcome.classes.index(cls)]),
                    min_area_mm2=settings.min_box_area_mm2,
                    source=scale,
                )
        for b in explained.boxes:
            boxes.setdefault(b.source, {}).setdefault(int(b.slice), []).append(b)
    outcome.counts, missed = score_boxes(case, boxes, chosen, spacing_yx, settings)
    outcome.unexplained = _why_not_explained(missed, probs, outcome.classes, **rule)
    return outcome


def run_all(heldout: HeldOut, settings: Settings) -> dict[str, dict[str, list[Outcome]]]:
    """Every model on every case: ``{model: {source: [Outcome]}}``; a failure is recorded, not raised."""
    results = {m: {s: [] for s in heldout.cases} for m in settings.models}
    for source, cases in heldout.cases.items():
        for case in tqdm(cases, desc=source, unit="case", file=sys.stderr, mininterval=2.0):
            volume = case.load()
            for model in settings.models:
                try:
                    outcome = run_case(case, volume, model, settings)
                except Exception as exc:  # one broken case must not lose a long run
                    log.exception("%s on %s/%s failed", model, source, case.name)
                    outcome = Outcome(case, error=f"{type(exc).__name__}: {exc}")
                results[model][source].append(outcome)
    return results
