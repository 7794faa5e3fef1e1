"""``report.html`` of a cohort: one self-contained page (figures inline as PNG) people can read.

Class counts, scan statuses, distributions of the class probabilities, lung volume and
involvement, the per-study table; with labels (CSV ``study_or_source,class``), ROC curves per
class (one class against the rest) and a confusion matrix, each with bootstrap 95% intervals
(scikit-learn for the curves and the matrix).
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np

N_BOOT = 1000


def read_labels(path: str | Path) -> dict[str, str]:
    """``study_or_source,class`` rows (a header row is allowed) -> {key: class}."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if (
                len(row) < 2
                or not row[0].strip()
                or row[0].strip().lower() in ("study", "source", "study_or_source")
            ):
                continue
            labels[row[0].strip()] = row[1].strip()
    return labels


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _floats(rows, key) -> np.ndarray:
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key, "")))
        except (TypeError, ValueError):
            continue
    values = np.asarray(values, float)
    return values[np.isfinite(values)]  # a study with no call has no probability to plot


def _histograms(rows, classes) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"P({c})", f"p_{c}") for c in classes] + [
        ("lung volume (mL)", "lung_volume_ml"),
        ("involvement (%)", "involvement_percent"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6))
    for ax, (title, key) in zip(np.atleast_1d(axes), panels, strict=True):
        values = _floats(rows, key)
        if values.size:
            ax.hist(values, bins=20, color="#4477aa")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("studies", fontsize=8)
    return _png(fig)


def _bootstrap_auc(y, scores, rng) -> tuple[float, float, float]:
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, scores)
    boots = []
    for _ in range(N_BOOT):
        idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx])) == 2:
            boots.append(roc_auc_score(y[idx], scores[idx]))
    low, high = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
    return float(auc), float(low), float(high)


def _label_key(key: str) -> str:
    """A labels file's study or source as typed: no trailing slash, forward slashes."""
    return str(key).strip().replace("\\", "/").rstrip("/")


def _no_answer(row: dict, classes) -> str:
    """Why a table row holds no answer to count or score ("" when it holds one)."""
    if row["status"] == "error":
        return "failed"
    if row.get("scan_status") == "out_of_scope":
        return "out of scope"
    try:
        probs = [float(row.get(f"p_{c}", "nan")) for c in classes]
    except (TypeError, ValueError):
        return "no call"
    if not row.get("predicted_class") or not np.isfinite(probs).all():
        return "no call"
    return ""


def _labelled_section(rows, classes, labels, source_names: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, roc_curve

    by_key = {_label_key(k): v for k, v in labels.items()}
    canonical = {c.lower(): c for c in classes}
    used, matched, left_out, unknown_class = set(), [], {}, []
    for r in rows:
        keys = [_label_key(r["study"]), _label_key(r["source"]), _label_key(Path(r["source"]).name)]
        key = next((k for k in keys if k in by_key), None)
        if key is None:
            continue
        used.add(key)
        label = canonical.get(by_key[key].strip().lower())
        if label is None:
            unknown_class.append(by_key[key])
            continue
        # only answers are scored: a failed study, one out of scope, one with no call has none
        reason = _no_answer(r, classes)
        if reason:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        matched.append((r, label))
    notes = []
    if left_out:
        notes.append(
            "left out (no answer to score): " + ", ".join(f"{n} {why}" for why, n in sorted(left_out.items()))
        )
    unused = sorted(k for k in by_key if k not in used)
    if unused:
        # keys typed as source names may be patients' names: listed only when sources are shown
        shown = ", ".join(html.escape(k) for k in unused[:10]) + (" …" if len(unused) > 10 else "")
        unused_keys = f": {shown}" if source_names else " (run with --source-names to list them)"
        notes.append(f"{len(unused)} label(s) match no study{unused_keys}")
    if unknown_class:
        notes.append(
            f"{len(unknown_class)} label(s) of no class of the model ({', '.join(classes)}): "
            + ", ".join(sorted({html.escape(c) for c in unknown_class}))
        )
    note = "".join(f"<p>{n}.</p>" for n in notes)
    if not matched:
        return note + "<p>No study with an answer matches a label of the labels file.</p>"
    truth = np.array([classes.index(c) for _, c in matched])
    probs = np.array([[float(r.get(f"p_{c}", "nan")) for c in classes] for r, _ in matched])
    rng = np.random.default_rng(0)
    parts = [f"<p>{len(matched)} labelled studies with an answer.</p>{note}"]
    fig, ax = plt.subplots(figsize=(4, 4))
    lines = []
    for k, name in enumerate(classes):
        y = (truth == k).astype(int)
        if len(set(y)) < 2:
            lines.append(f"<li>{html.escape(name)}: needs labelled studies of this class and of others</li>")
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, k])
        auc, low, high = _bootstrap_auc(y, probs[:, k], rng)
        ax.plot(fpr, tpr, label=f"{name} AUC {auc:.2f} ({low:.2f}-{high:.2f})")
        lines.append(f"<li>{html.escape(name)}: AUC {auc:.3f} (95% CI {low:.3f}-{high:.3f})</li>")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    parts += [_png(fig), "<ul>" + "".join(lines) + "</ul>"]
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, labels=range(len(classes)))
    boots = np.stack(
        [
            confusion_matrix(truth[i], predicted[i], labels=range(len(classes)))
            for i in (rng.integers(0, len(truth), len(truth)) for _ in range(N_BOOT))
        ]
    )
    low, high = np.percentile(boots, [2.5, 97.5], axis=0)
    head = "".join(f"<th>called {html.escape(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><th>truly {html.escape(classes[i])}</th>"
        + "".join(f"<td>{matrix[i, j]} ({low[i, j]:.0f}-{high[i, j]:.0f})</td>" for j in range(len(classes)))
        + "</tr>"
        for i in range(len(classes))
    )
    parts.append(
        "<h3>Confusion matrix (counts, bootstrap 95% interval)</h3>"
        f"<table><tr><th></th>{head}</tr>{body}</table>"
    )
    return "\n".join(parts)


def write_report(
    out: str | Path,
    rows: list[dict],
    classes,
    labels: dict[str, str] | None = None,
    source_names: bool = False,
) -> Path:
    """Write ``out/report.html`` atomically and return its path; ``source_names`` as in the table
    (:func:`napari_wscovid.cohort.exported_rows`). Labels keyed by source still match."""
    from napari_wscovid.cohort import REPORT_HTML, exported_rows
    from napari_wscovid.io.atomic import atomic_write_text

    classes = list(classes)
    ok = [r for r in rows if r["status"] in ("ok", "skipped")]
    answered = [r for r in ok if not _no_answer(r, classes)]
    counts = {c: sum(r.get("predicted_class") == c for r in answered) for c in classes}
    if len(answered) < len(ok):  # out of scope, or no lung slice classified: not an answer
        counts["no answer (out of scope or no call)"] = len(ok) - len(answered)
    statuses: dict[str, int] = {}
    for r in ok:
        statuses[r.get("scan_status") or "unknown"] = statuses.get(r.get("scan_status") or "unknown", 0) + 1
    failed = [r for r in rows if r["status"] == "error"]
    columns = ["study", *(["source"] if source_names else []), "status", "predicted_class"]
    columns += [*(f"p_{c}" for c in classes), "scan_status", "lung_volume_ml", "involvement_percent"]
    columns += ["n_boxes", "seconds", "error"]
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in exported_rows(rows, source_names)
    )
    sections = [
        f"<h1>Cohort report</h1><p>{len(rows)} studies: {len(ok)} analysed, {len(failed)} failed.</p>",
        "<p><b>Research use only.</b> The networks' answers are not a diagnosis; "
        "studies marked needs_review or out_of_scope deserve a look first.</p>",
        "<h2>Answers</h2><ul>"
        + "".join(f"<li>{html.escape(c)}: {n}</li>" for c, n in counts.items())
        + "</ul><h2>Scan status</h2><ul>"
        + "".join(f"<li>{html.escape(s)}: {n}</li>" for s, n in sorted(statuses.items()))
        + "</ul>",
    ]
    if ok:
        sections.append("<h2>Distributions</h2>" + _histograms(ok, classes))
    if labels:
        sections.append(
            "<h2>Against the labels</h2>" + _labelled_section(rows, classes, labels, source_names)
        )
    sections.append(
        "<h2>Studies</h2><table><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        + f"</tr>{table}</table>"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>napari-wscovid cohort report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )
    return atomic_write_text(Path(out) / REPORT_HTML, page, overwrite=True)
