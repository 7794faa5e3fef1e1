"""What the outcomes of one model add up to: classification and localisation metrics with
bootstrap intervals over patients, timing, and the issue's targets met or not."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from training.evaluation.detect_cases import CAM_SCALES, Outcome
from training.evaluation.heldout import COVID_CLASS
from training.evaluation.settings import Settings
from training.localisation import MatchCounts, ratio_with_ci
from training.metrics import MetricReport, auc_with_ci, classification_report


def slice_rows(outcomes: Sequence[Outcome]) -> tuple[list[str], np.ndarray, list[str], int]:
    """Labelled, classified slices of ``outcomes``: ``(class names, probs, patient ids, unclassified)``."""
    names, probs, pids, missing = [], [], [], 0
    for o in outcomes:
        if o.slice_probs is None:
            continue
        for name, p in zip(o.case.slice_class, o.slice_probs, strict=True):
            if np.isfinite(p).all():
                names.append(name)
                probs.append(p)
                pids.append(o.case.patient_id)
            else:
                missing += 1
    k = len(outcomes[0].classes) if outcomes else 0
    return names, np.asarray(probs, dtype=float).reshape(-1, k), pids, missing


def _report(names, probs, classes, pids, settings: Settings) -> MetricReport | None:
    keep = [i for i, n in enumerate(names) if n in classes]
    if not keep:
        return None
    y = np.array([list(classes).index(names[i]) for i in keep])
    return classification_report(
        y,
        probs[keep],
        classes,
        patient_ids=None if pids is None else [pids[i] for i in keep],
        n_boot=settings.n_boot,
        seed=settings.seed,
    )


def _covid_vs_rest(names, probs, classes, pids, settings: Settings) -> dict | None:
    if COVID_CLASS not in classes or not names:
        return None
    y = np.array([n == COVID_CLASS for n in names], dtype=int)
    return auc_with_ci(y, probs[:, list(classes).index(COVID_CLASS)], pids, settings.n_boot, settings.seed)


def summarise(outcomes: Sequence[Outcome], settings: Settings, volumetric: bool) -> dict:
    """Classification, localisation and timing of one model on one source."""
    ok = [o for o in outcomes if o.error is None]
    out: dict = {
        "cases": len(outcomes),
        "failed": [{"case": o.case.name, "error": o.error} for o in outcomes if o.error],
        "classes": list(ok[0].classes) if ok else [],
    }
    if not ok:
        return out
    classes = ok[0].classes
    names, probs, pids, missing = slice_rows(ok)
    out["slice_unclassified"] = missing
    report = _report(names, probs, classes, pids, settings) if names else None
    out["slice"] = report.to_dict() if report else None
    out["_slice_report"] = report
    out["covid_vs_rest_slice_auc"] = _covid_vs_rest(names, probs, classes, pids, settings)
    out["_slice_rows"] = (names, probs, pids)
    patient = None
    if volumetric:
        valid = [o for o in ok if o.patient_probs is not None and np.isfinite(o.patient_probs).all()]
        if valid:
            patient = _report(
                [o.case.patient_class for o in valid],
                np.stack([o.patient_probs for o in valid]),
                classes,
                None,
                settings,
            )
    out["patient"] = patient.to_dict() if patient else None
    out["_patient_report"] = patient
    out["per_case"] = [
        {
            "case": o.case.name,
            "patient_class": o.case.patient_class,
            "predicted": classes[int(np.argmax(o.patient_probs))]
            if o.patient_probs is not None and np.isfinite(o.patient_probs).all()
            else None,
            "explained_slices": o.n_explained,
            "positive_slices": o.n_positive,
            "seconds": round(o.seconds, 3),
            **({"seed": o.case.meta["seed"]} if "seed" in o.case.meta else {}),
        }
        for o in ok
    ]
    out["localisation"] = localisation_summary(ok, settings)
    explained = sum(o.n_explained for o in ok)
    per_slice = sum(o.explain_seconds for o in ok) / explained if explained else None
    if all(o.complete_run for o in ok):
        estimate = float(np.mean([o.seconds for o in ok]))
    elif per_slice is not None:
        estimate = float(np.mean([o.seconds + per_slice * o.n_positive for o in ok]))
    else:
        estimate = None
    out["timing"] = {
        "volumes": len(ok),
        "seconds_per_volume": float(np.mean([o.seconds for o in ok])),
        "explained_slices": explained,
        "saliency_seconds_per_slice": per_slice,
        "estimated_seconds_per_volume_default_saliency": estimate,
        "includes_saliency": all(o.complete_run for o in ok),
    }
    return out


def localisation_summary(outcomes: Sequence[Outcome], settings: Settings) -> dict | None:
    """Lesion recall and box precision per box source, pooled, with intervals over patients."""
    scored = [o for o in outcomes if o.case.lesion_mask is not None]
    if not scored:
        return None
    sources = list(dict.fromkeys(s for o in scored for s in o.counts))
    order = [s for s in (*CAM_SCALES, "joint") if s in sources] + sorted(
        set(sources) - {*CAM_SCALES, "joint"}
    )
    per_patient: dict[str, dict[str, MatchCounts]] = {}
    for o in scored:
        mine = per_patient.setdefault(o.case.patient_id, {})
        for s in order:
            mine[s] = mine.get(s, MatchCounts()) + o.counts.get(s, MatchCounts())
    reasons: dict[str, int] = {}
    for o in scored:
        for why, n in o.unexplained.items():
            reasons[why] = reasons.get(why, 0) + n
    out = {"methods": {}, "lesion_slices_not_explained": reasons}
    for s in order:
        counts = [p[s] for p in per_patient.values()]
        total = sum(counts, MatchCounts())
        boot = {"n_boot": settings.n_boot, "seed": settings.seed}
        out["methods"][s] = {
            "lesion_recall": ratio_with_ci(
                [c.lesions_found for c in counts], [c.lesions for c in counts], **boot
            ),
            "box_precision": ratio_with_ci(
                [c.boxes_on_lesion for c in counts], [c.boxes for c in counts], **boot
            ),
            "counts": total.as_dict(),
        }
    return out


# Targets of the issue: (key, source, text, check).
TARGETS = (
    ("phantom_slice_auc", "phantom", "phantoms: slice AUC >= 0.98 for each class"),
    ("phantom_localisation", "phantom", "phantoms: lesion recall >= 0.9 at box precision >= 0.8"),
    ("real_covid_auc", "real", "real data held out by patient: COVID-19 vs non-COVID slice AUC >= 0.9"),
    ("medseg_localisation", "medseg", "MedSeg: lesion recall >= 0.8 at box precision >= 0.6"),
)


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def check_targets(model_summary: dict) -> list[dict]:
    """Each target of the issue with its value and whether this model meets it."""
    rows = []
    phantom = model_summary["sources"].get("phantom", {})
    slice_rep = phantom.get("slice")
    if slice_rep:
        aucs = {c: slice_rep["metrics"][c]["auc"]["value"] for c in slice_rep["classes"]}
        finite = [v for v in aucs.values() if v is not None and math.isfinite(v)]
        ok = min(finite) >= 0.98 if len(finite) == len(aucs) else None
        rows.append({"target": TARGETS[0][2], "value": aucs, "status": _status(ok)})
    else:
        rows.append({"target": TARGETS[0][2], "value": None, "status": "n/a"})
    for source, text, recall_min, precision_min in (
        ("phantom", TARGETS[1][2], 0.9, 0.8),
        ("medseg", TARGETS[3][2], 0.8, 0.6),
    ):
        loc = (model_summary["sources"].get(source) or {}).get("localisation")
        if not loc or not loc["methods"]:
            rows.append({"target": text, "value": None, "status": "n/a"})
            continue
        for method, m in loc["methods"].items():
            r, p = m["lesion_recall"]["value"], m["box_precision"]["value"]
            # No box at all gives no precision, and fails the target through its recall.
            ok = (
                None
                if not math.isfinite(r)
                else bool(r >= recall_min and math.isfinite(p) and p >= precision_min)
            )
            rows.append(
                {
                    "target": f"{text} [{method} boxes]",
                    "value": {"recall": r, "precision": p},
                    "status": _status(ok),
                }
            )
    real = model_summary.get("real_covid_vs_rest_slice_auc")
    value = real["value"] if real else None
    ok = None if value is None or not math.isfinite(value) else value >= 0.9
    rows.append({"target": TARGETS[2][2], "value": value, "status": _status(ok)})
    return rows


def summarise_model(outcomes: dict[str, list[Outcome]], settings: Settings) -> dict:
    """One model's summary per source, its pooled real-data AUC, and the targets."""
    sources = {}
    for source, found in outcomes.items():
        volumetric = bool(found) and found[0].case.volumetric
        sources[source] = summarise(found, settings, volumetric)
    # Real data pooled: COVID-CT-MD's test patient(s) and UCSD's test images.
    pooled = [
        sources[s]["_slice_rows"] for s in ("covid-ct-md", "ucsd") if sources.get(s, {}).get("_slice_rows")
    ]
    classes = next(
        (sources[s]["classes"] for s in ("covid-ct-md", "ucsd") if sources.get(s, {}).get("classes")), []
    )
    real = None
    if pooled and COVID_CLASS in classes:
        names = [n for p in pooled for n in p[0]]
        probs = np.concatenate([p[1] for p in pooled])
        pids = [i for p in pooled for i in p[2]]
        real = _covid_vs_rest(names, probs, tuple(classes), pids, settings)
    summary = {"sources": sources, "real_covid_vs_rest_slice_auc": real}
    summary["targets"] = check_targets(summary)
    return summary
