"""Patient-level k-fold cross-validation of the WSNet classifier (the paper's 5-fold protocol).

Fold ``i`` trains with ``--fold i``: real data are split by patient with
:func:`training.datasets.patient_kfold` (test fold ``i``, validation fold ``i + 1``), and the
phantoms of each fold come from their own seeds. The test predictions of all folds are then
pooled and summarised twice: pooled metrics with a patient-level bootstrap interval, and the mean
over folds with a t interval, as the paper's Table 3 reports. A source with fewer patients than
folds repeats its splits (COVID-CT-MD's sample: 3 patients, so fold 3 tests fold 0's patient
again, with another model); the pooled predictions keep each patient from the first fold that
tested it, so that no patient counts twice.

Run ``python -m training.cross_validate --help``; every trainer option is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

from training.config import config_from_args, config_parser, setup_logging, write_json
from training.metrics import HEADERS, METRICS, classification_report, fold_summary
from training.train_classifier import TrainConfig, train

log = logging.getLogger("training.cross_validate")


def fold_config(cfg: TrainConfig, fold: int, k: int) -> TrainConfig:
    """The trainer's configuration of one fold: its own output folder, no shared export or resume."""
    return dataclasses.replace(
        cfg,
        fold=fold,
        k_folds=k,
        out_dir=str(Path(cfg.out_dir) / f"fold{fold}"),
        export=None,
        resume=None,
    )


def pooled_predictions(fold_dirs, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The saved test predictions of ``source`` over the folds, each patient's from the first
    fold that tested it only."""
    labels, probs, ids, seen = [], [], [], set()
    for d in fold_dirs:
        part = np.load(Path(d) / f"test_predictions_{source}.npz")
        fold_ids = np.asarray(part["patient_ids"]).astype(str)
        new = ~np.isin(fold_ids, sorted(seen))
        labels.append(part["labels"][new])
        probs.append(part["probs"][new])
        ids.append(fold_ids[new])
        seen |= set(fold_ids.tolist())
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(ids)


def _fold_cell(s: dict) -> str:
    mean, lo, hi = (s[key] for key in ("mean", "lower", "upper"))
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ({lo:.3f}-{hi:.3f})" if np.isfinite(lo) else f"{mean:.3f}"


def _fold_table(summary: dict, classes) -> str:
    head = "| class | " + " | ".join(HEADERS[m] for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for row in (*classes, "overall"):
        lines.append(f"| {row} | " + " | ".join(_fold_cell(summary[row][m]) for m in METRICS) + " |")
    return "\n".join(lines)


def cross_validate(cfg: TrainConfig, k: int = 5) -> dict:
    """Train ``k`` folds and aggregate; writes ``cv_metrics.json`` and ``cv_table.md`` in ``out_dir``."""
    if cfg.holdout_patients:
        raise ValueError(
            "--holdout-patients with cross-validation: every fold would test the same held-out "
            "patients; cross-validate without it, or train once with it"
        )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv_config.json").write_text(json.dumps({**cfg.to_dict(), "k": k}, indent=2))
    fold_dirs, summaries = [], []
    for fold in range(k):
        fcfg = fold_config(cfg, fold, k)
        log.info("fold %d of %d -> %s", fold + 1, k, fcfg.out_dir)
        summaries.append(train(fcfg))
        fold_dirs.append(fcfg.out_dir)
    classes = tuple(summaries[0]["classes"])
    result = {"k": k, "classes": list(classes), "sources": {}}
    lines = [f"# {k}-fold cross-validation, task `{cfg.task}`", ""]
    for source in summaries[0]["test"]:
        y, prob, pid = pooled_predictions(fold_dirs, source)
        pooled = classification_report(y, prob, classes, patient_ids=pid, n_boot=cfg.n_boot, seed=cfg.seed)
        per_fold = [
            classification_report(*pooled_predictions([d], source)[:2], classes, n_boot=1, seed=cfg.seed)
            for d in fold_dirs
        ]
        means = fold_summary(per_fold)
        result["sources"][source] = {"pooled": pooled.to_dict(), "fold_mean": means}
        lines += [
            f"## {source}: pooled test predictions of all folds",
            "",
            pooled.to_markdown(),
            "",
            f"## {source}: mean over {k} folds (95% t interval)",
            "",
            _fold_table(means, classes),
            "",
        ]
    write_json(out / "cv_metrics.json", result)
    (out / "cv_table.md").write_text("\n".join(lines))
    log.info("cross-validation done:\n%s", "\n".join(lines))
    return result


def main(argv=None) -> int:
    """Command-line entry point: the trainer's options plus ``--k``."""
    parser = config_parser(__doc__, TrainConfig)
    parser.add_argument("--k", type=int, default=5, help="number of patient-level folds")
    args = parser.parse_args(argv)
    setup_logging(args.log_file)
    cross_validate(config_from_args(args, TrainConfig), args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
