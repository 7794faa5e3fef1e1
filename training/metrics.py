"""Classification metrics of the paper's Tables 3-4 with bootstrap 95% confidence intervals.

Per class (one vs rest): accuracy, precision, sensitivity, specificity and ROC AUC. Overall:
the multi-class accuracy and the macro averages of the per-class metrics. Intervals are
percentile bootstrap intervals; when patient ids are given, whole patients are resampled
(slices of one patient are correlated, so resampling slices would give intervals too narrow).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METRICS = ("acc", "precision", "sensitivity", "specificity", "auc")
HEADERS = {"acc": "ACC", "precision": "PRC", "sensitivity": "SEN", "specificity": "SPE", "auc": "AUC"}


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of binary ``y`` (NaN when one class is absent).

    scikit-learn's where it is installed; on the bare GPU machine of ``training.gpu_run``
    (numpy, scipy, torch only) the Mann-Whitney form on SciPy's ranks, which is the same number.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=float)
    if not 0 < y.sum() < len(y):
        return float("nan")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        from scipy.stats import rankdata

        ranks = rankdata(score)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(roc_auc_score(y, score))


def patient_groups(patient_ids: Sequence[str]) -> list[np.ndarray]:
    """The sample indices of each patient (sorted by id): the bootstrap's resampling units."""
    _, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


def auc_with_ci(y: np.ndarray, score: np.ndarray, groups: Sequence[str], n_boot: int, seed: int) -> dict:
    """ROC AUC of binary ``y`` with a percentile bootstrap over groups (patients):
    ``value, lower, upper, n, positives[, patients]``, NaN when one class is absent."""
    y = np.asarray(y, dtype=int)
    if not 0 < y.sum() < len(y):
        nan = float("nan")
        return {"value": nan, "lower": nan, "upper": nan, "n": len(y), "positives": int(y.sum())}
    score = np.asarray(score, dtype=float)
    members = patient_groups(groups)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[idx].sum() < len(idx):
            boots.append(roc_auc(y[idx], score[idx]))
    lower, upper = (float(q) for q in np.quantile(boots, [0.025, 0.975])) if boots else (math.nan, math.nan)
    return {
        "value": roc_auc(y, score),
        "lower": lower,
        "upper": upper,
        "n": len(y),
        "positives": int(y.sum()),
        "patients": len(members),
    }


def point_metrics(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class metrics plus an ``"overall"`` entry, without intervals.

    Parameters
    ----------
    y_true : np.ndarray
        (N,) class indices.
    y_prob : np.ndarray
        (N, K) class probabilities (any monotone scores work for AUC).

    Returns
    -------
    dict
        Metric name -> (K + 1,) array: the K classes then overall (multi-class accuracy,
        macro averages of the rest over the classes where they are defined).
    """
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    k = y_prob.shape[1]
    pred = y_prob.argmax(1)
    out = {m: np.full(k + 1, np.nan) for m in METRICS}
    for c in range(k):
        t, p = y_true == c, pred == c
        tp, fp = np.sum(t & p), np.sum(~t & p)
        fn, tn = np.sum(t & ~p), np.sum(~t & ~p)
        out["acc"][c] = _ratio(tp + tn, len(t))
        out["precision"][c] = _ratio(tp, tp + fp)
        out["sensitivity"][c] = _ratio(tp, tp + fn)
        out["specificity"][c] = _ratio(tn, tn + fp)
        out["auc"][c] = roc_auc(t.astype(int), y_prob[:, c])
    out["acc"][k] = _ratio(np.sum(pred == y_true), len(y_true))
    for m in METRICS[1:]:
        vals = out[m][:k]
        out[m][k] = np.nanmean(vals) if np.isfinite(vals).any() else np.nan
    return out


@dataclass
class MetricReport:
    """Point estimates and bootstrap intervals per class and overall."""

    classes: tuple[str, ...]
    value: dict[str, list[float]]
    lower: dict[str, list[float]]
    upper: dict[str, list[float]]
    n_samples: int
    n_patients: int | None
    n_boot: int
    confidence: float
    resampled: str
    extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> tuple[str, ...]:
        return (*self.classes, "overall")

    def get(self, metric: str, row: str = "overall") -> tuple[float, float, float]:
        """(value, lower, upper) of one metric for a class or ``"overall"``."""
        i = self.rows.index(row)
        return self.value[metric][i], self.lower[metric][i], self.upper[metric][i]

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes),
            "metrics": {
                row: {
                    m: dict(zip(("value", "lower", "upper"), self.get(m, row), strict=True)) for m in METRICS
                }
                for row in self.rows
            },
            "n_samples": self.n_samples,
            "n_patients": self.n_patients,
            "bootstrap": {"n": self.n_boot, "confidence": self.confidence, "resampled": self.resampled},
            **self.extra,
        }

    def to_json(self, **kwargs) -> str:
        # NaN (undefined metric) becomes null so the file is valid JSON.
        def clean(o):
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            return None if isinstance(o, float) and not np.isfinite(o) else o

        return json.dumps(clean(self.to_dict()), indent=2, **kwargs)

    def to_markdown(self, digits: int = 3) -> str:
        """A table like the paper's Tables 3-4: ``value (lower-upper)`` per class and overall."""

        def cell(v, lo, hi):
            if not np.isfinite(v):
                return "n/a"
            ci = f" ({lo:.{digits}f}-{hi:.{digits}f})" if np.isfinite(lo) else ""
            return f"{v:.{digits}f}{ci}"

        head = "| class | " + " | ".join(HEADERS[m] for m in METRICS) + " |"
        lines = [head, "|" + "---|" * (len(METRICS) + 1)]
        for row in self.rows:
            lines.append(f"| {row} | " + " | ".join(cell(*self.get(m, row)) for m in METRICS) + " |")
        unit = f"{self.n_patients} patients" if self.resampled == "patient" else f"{self.n_samples} samples"
        lines.append("")
        lines.append(
            f"{self.n_samples} samples; {int(self.confidence * 100)}% percentile bootstrap intervals, "
            f"{self.n_boot} resamples of {unit}."
        )
        return "\n".join(lines)


def classification_report(
    y_true: Sequence[int],
    y_prob,
    classes: Sequence[str],
    *,
    patient_ids: Sequence[str] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricReport:
    """Metrics with percentile bootstrap confidence intervals.

    Parameters
    ----------
    y_true : sequence of int
        (N,) true class indices.
    y_prob : array-like
        (N, K) predicted probabilities.
    classes : sequence of str
    patient_ids : sequence of str, optional
        When given, the bootstrap resamples patients (with all their samples).
    n_boot : int
    confidence : float
    seed : int
        Seed of the bootstrap; the same inputs and seed give the same intervals.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim != 2 or len(y_prob) != len(y_true) or y_prob.shape[1] != len(classes):
        raise ValueError(f"y_prob must be (N, {len(classes)}) with N = {len(y_true)}, got {y_prob.shape}")
    point = point_metrics(y_true, y_prob)
    rng = np.random.default_rng(seed)
    if patient_ids is not None:
        members = patient_groups(patient_ids)
        n_units = len(members)
    else:
        members, n_units = None, len(y_true)
    boots = {m: np.full((n_boot, len(classes) + 1), np.nan) for m in METRICS}
    for b in range(n_boot):
        pick = rng.integers(0, n_units, n_units)
        idx = np.concatenate([members[g] for g in pick]) if members is not None else pick
        res = point_metrics(y_true[idx], y_prob[idx])
        for m in METRICS:
            boots[m][b] = res[m]
    alpha = (1.0 - confidence) / 2
    lower, upper = {}, {}
    for m in METRICS:
        finite = np.isfinite(boots[m]).any(0)
        lo = np.full(len(classes) + 1, np.nan)
        hi = np.full(len(classes) + 1, np.nan)
        if finite.any():
            lo[finite] = np.nanquantile(boots[m][:, finite], alpha, axis=0)
            hi[finite] = np.nanquantile(boots[m][:, finite], 1 - alpha, axis=0)
        lower[m], upper[m] = lo.tolist(), hi.tolist()
    return MetricReport(
        classes=tuple(classes),
        value={m: point[m].tolist() for m in METRICS},
        lower=lower,
        upper=upper,
        n_samples=len(y_true),
        n_patients=n_units if members is not None else None,
        n_boot=n_boot,
        confidence=confidence,
        resampled="patient" if members is not None else "sample",
    )


def fold_summary(reports: Sequence[MetricReport], confidence: float = 0.95) -> dict:
    """Mean over folds with a t-based interval, as the paper reports its 5-fold results.

    Returns
    -------
    dict
        row -> metric -> {"mean", "lower", "upper", "folds": [...]}.
    """
    from scipy import stats

    rows = reports[0].rows
    out = {}
    for row in rows:
        out[row] = {}
        for m in METRICS:
            vals = np.array([r.get(m, row)[0] for r in reports], dtype=float)
            vals_f = vals[np.isfinite(vals)]
            mean = float(vals_f.mean()) if len(vals_f) else float("nan")
            if len(vals_f) > 1:
                half = (
                    stats.t.ppf(0.5 + confidence / 2, len(vals_f) - 1)
                    * vals_f.std(ddof=1)
                    / np.sqrt(len(vals_f))
                )
            else:
                half = float("nan")
            out[row][m] = {"mean": mean, "lower": mean - half, "upper": mean + half, "folds": vals.tolist()}
    return out
