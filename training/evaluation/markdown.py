"""The evaluation report as Markdown: data, targets, classification, localisation, speed, limits."""

from __future__ import annotations

import math
from collections.abc import Sequence

from training.metrics import METRICS


def _ci(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("value") is None or not math.isfinite(d["value"]):
        return "n/a"
    lo, hi = d.get("lower"), d.get("upper")
    ci = f" ({lo:.{digits}f}-{hi:.{digits}f})" if lo is not None and math.isfinite(lo) else ""
    return f"{d['value']:.{digits}f}{ci}"


def _metric(report: dict | None, metric: str, row: str) -> str:
    if not report or row not in report["metrics"]:
        return "n/a"
    return _ci(report["metrics"][row][metric])


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(report: dict) -> str:
    """The human-readable report: data, targets, classification, localisation, speed, limits."""
    s = report["settings"]
    models = list(report["models"])
    lines = [
        "# Evaluation on held-out data",
        "",
        f"Models: {', '.join(f'`{m}`' for m in models)}. Generated {report['created']} on "
        f"{report['device']}; "
        f"command `{report['command']}`; {report['elapsed_minutes']:.1f} min.",
        "",
        f"Held-out data of the training run `{report['training_run']['config']}` "
        f"(seed {report['training_run']['seed']}, fold {report['training_run']['fold']}, "
        f"k = {report['training_run']['k_folds']}): rebuilt with the training code's own functions.",
    ]
    if s["quick"]:
        lines += ["", "**--quick run: small sizes and few cases, for tests; the numbers mean nothing.**"]
    lines += ["", "## Held-out data", ""]
    lines += _table(
        ("source", "cases", "patients", "labelled slices", "what"),
        [
            (src, d["cases"], d["patients"], d["slices"], d["description"])
            for src, d in report["data"].items()
        ],
    )
    for src, why in report["skipped"].items():
        lines.append(f"\n- skipped **{src}**: {why}")
    lines += ["", "## Targets", ""]
    rows = []
    for m in models:
        for t in report["models"][m]["targets"]:
            value = t["value"]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.3f}"
            rows.append((f"`{m}`", t["target"], value if value is not None else "n/a", t["status"]))
    lines += _table(("model", "target", "value", "status"), rows)
    lines += [
        "",
        "## Classification",
        "",
        "Tables as the paper's Tables 3-4: value (95% percentile bootstrap interval; slices resampled "
        "by patient, so the intervals are wide when there are few patients). n/a: not defined on this data "
        "(e.g. no sample of the class) or not given by the model. Slices not classified: labelled slices "
        "on which `detect` found too little lung to classify (left out of the tables).",
    ]
    for src in report["data"]:
        lines += ["", f"### {src}", ""]
        summary_rows = []
        for m in models:
            r = report["models"][m]["sources"].get(src, {})
            summary_rows.append(
                (
                    f"`{m}`",
                    _metric(r.get("slice"), "acc", "overall"),
                    _metric(r.get("slice"), "auc", "overall"),
                    _ci(r.get("covid_vs_rest_slice_auc")),
                    _metric(r.get("patient"), "acc", "overall"),
                    _metric(r.get("patient"), "auc", "overall"),
                    r.get("slice_unclassified", "n/a"),
                )
            )
        lines += _table(
            (
                "model",
                "slice ACC",
                "slice AUC (macro)",
                "slice AUC COVID-19 vs rest",
                "patient ACC",
                "patient AUC (macro)",
                "slices not classified",
            ),
            summary_rows,
        )
        for m in models:
            r = report["models"][m]["sources"].get(src, {})
            for level in ("slice", "patient"):
                rep = r.get(level)
                if rep:
                    lines += ["", f"`{m}`, {level} level:", "", *_report_table(rep)]
            if r.get("failed"):
                lines += ["", f"`{m}` failed on {len(r['failed'])} case(s), e.g. {r['failed'][0]['error']}"]
    real = [(m, report["models"][m]["real_covid_vs_rest_slice_auc"]) for m in models]
    if any(v for _, v in real):
        lines += ["", "### real data pooled (COVID-CT-MD + UCSD test folds)", ""]
        lines += _table(("model", "slice AUC COVID-19 vs rest"), [(f"`{m}`", _ci(v)) for m, v in real])
    lines += [
        "",
        "## Localisation",
        "",
        f"True lesions: 8-connected components of the pneumonia labels on each axial slice, "
        f">= {s['min_lesion_area_mm2']:g} mm^2 (MedSeg: 1 mm pixels assumed). A box matches a lesion "
        f"when its IoU with the lesion's bounding box is >= {s['iou_threshold']:g}. Lesion recall: lesions "
        "matched by a box; "
        "box precision: boxes matching a lesion; both pooled, 95% bootstrap intervals over patients. "
        "Scored on the explained slices only (WSNet: at most "
        f"{s['explain_per_volume']} per volume, evenly spread over the slices predicted not NP under the "
        "weights' slice offset, none when the patient is called NP, as the "
        "plugin "
        "explains them); per-scale boxes are the plugin's box post-processing applied to each scale's CAM on "
        "those slices (CAMs as the plugin shows them: of the patient's predicted class, one scale factor "
        "per volume, not masked to the lung), joint boxes are the plugin's own (masked to the lung). A box "
        "on a nodule is a false positive.",
    ]
    for src in report["data"]:
        rows, unexplained = [], []
        for m in models:
            loc = report["models"][m]["sources"].get(src, {}).get("localisation")
            if not loc:
                continue
            for method, v in loc["methods"].items():
                c = v["counts"]
                rows.append(
                    (
                        f"`{m}`",
                        method,
                        c["slices"],
                        _ci(v["lesion_recall"]),
                        f"{c['lesions_found']}/{c['lesions']}",
                        _ci(v["box_precision"]),
                        f"{c['boxes_on_lesion']}/{c['boxes']}",
                        c["boxes_on_distractor"],
                    )
                )
            if loc is not None:
                why = loc["lesion_slices_not_explained"]
                text = ", ".join(f"{n} {reason}" for reason, n in why.items() if n) or "none"
                unexplained.append(f"`{m}`: {text}")
        if rows:
            lines += ["", f"### {src}", ""]
            lines += _table(
                (
                    "model",
                    "boxes",
                    "slices",
                    "lesion recall",
                    "found/lesions",
                    "box precision",
                    "hits/boxes",
                    "FP on nodules",
                ),
                rows,
            )
            lines += [
                "",
                "Slices with a true lesion that were not scored: " + "; ".join(unexplained) + ".",
            ]
    lines += ["", "## Speed", "", f"Seconds on {report['device']} ({report['cpu']}).", ""]
    rows = []
    for m in models:
        for src, r in report["models"][m]["sources"].items():
            t = r.get("timing")
            if not t:
                continue
            per = t["saliency_seconds_per_slice"]
            est = t["estimated_seconds_per_volume_default_saliency"]
            rows.append(
                (
                    f"`{m}`",
                    src,
                    t["volumes"],
                    f"{t['seconds_per_volume']:.2f}",
                    f"{per:.2f}" if per is not None else "n/a",
                    f"{est:.1f}" if est is not None else "n/a",
                )
            )
    lines += _table(
        (
            "model",
            "source",
            "volumes",
            "s/volume (detect, no saliency)",
            "s per explained slice",
            "est. s/volume, plugin default",
        ),
        rows,
    )
    lines += [
        "",
        "s/volume: one `detect` call with saliency off (lung segmentation, classification, CAMs; for other "
        "methods their whole run). Estimated plugin default: that plus the saliency time per slice times the "
        "slices predicted not NP (the plugin explains them all).",
        "",
        "## Limits of this run",
        "",
        *[f"- {x}" for x in report["limits"]],
        "",
    ]
    return "\n".join(lines)


def _report_table(rep: dict) -> list[str]:
    head = ("class", "ACC", "PRC", "SEN", "SPE", "AUC")
    rows = [(row, *(_metric(rep, m, row) for m in METRICS)) for row in (*rep["classes"], "overall")]
    boot = rep["bootstrap"]
    unit = (
        f"{rep['n_patients']} patients" if boot["resampled"] == "patient" else f"{rep['n_samples']} samples"
    )
    note = f"{rep['n_samples']} samples; {boot['n']} resamples of {unit}."
    if boot["resampled"] == "patient" and rep["n_patients"] < 2:
        note += " One patient: the interval shows no between-patient variability."
    return [*_table(head, rows), "", note]
