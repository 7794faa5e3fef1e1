"""Calibration and abstention on held-out real patients, from ``training.heldout_real`` reports.

* **Slices**: every classified lung slice of a held-out real patient gets its true class (an
  infected slice of a COVID-19 or CAP patient: that class; any other slice: NP). The expected
  calibration error (15 equal-width bins of the top probability) and a reliability diagram
  (``--figure``) say whether the probabilities mean what they say.
* **Patients**: the top patient probability against the answer being right; for each
  ``review_below`` threshold, how many wrong answers ``needs_review`` catches and how many right
  ones it flags (the issue asks for at least half of the wrong, at most a third of the right).

    python -m training.reliability_report runs/heldout_gpu3_real/heldout_real.json \\
        --figure docs/reliability_diagram.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

N_BINS = 15
THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)


def slice_table(report: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probabilities (n, K), true class index (n,), classes) over every labelled real slice."""
    probs, truth, classes = [], [], None
    for patient in report["real"]:
        classes = classes or list(patient["classes"])
        slices = patient.get("slices") or {}
        p = np.asarray(slices.get("probs") or [], float)
        if not p.size:
            continue
        infected = np.asarray(slices.get("infected") or [0] * len(p))
        label = classes.index(patient["truth"])
        for row, inf in zip(p, infected, strict=True):
            if np.isfinite(row).all() and inf >= 0:
                probs.append(row)
                truth.append(label if (inf > 0 and patient["truth"] != "NP") else classes.index("NP"))
    return np.asarray(probs), np.asarray(truth), classes or []


def expected_calibration_error(
    probs: np.ndarray, truth: np.ndarray, n_bins: int = N_BINS
) -> tuple[float, list]:
    """Top-label ECE and the bins (lower edge, mean confidence, accuracy, count)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == truth
    edges = np.linspace(0, 1, n_bins + 1)
    bins, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += inside.mean() * abs(conf - acc)
            bins.append((float(lo), conf, acc, int(inside.sum())))
    return float(ece), bins


def leave_one_patient_out_temperature(report: dict) -> dict:
    """What refitting the temperature on real slices would buy, measured honestly: for each
    patient, a temperature fitted on the other patients' slices (on top of the one the weights
    carry: log-probabilities are logits up to a constant) rescales that patient's slices only.
    Returns the pooled ECE before and after, and each fold's temperature; ``all_patients`` is the
    temperature fitted on every slice (what would ship)."""
    from scipy.special import softmax

    from training.calibrate import fit_temperature

    patients = report["real"]
    tables = [slice_table({"real": [p]}) for p in patients]
    usable = [i for i, (probs, _, _) in enumerate(tables) if len(probs)]
    if len(usable) < 2:
        raise ValueError("need slices of at least two patients")
    log = [np.log(np.clip(tables[i][0], 1e-12, 1.0)) for i in usable]
    truth = [tables[i][1] for i in usable]
    rescaled, folds = [], []
    for k, i in enumerate(usable):
        others = [j for j in range(len(usable)) if j != k]
        temperature = fit_temperature(np.concatenate([log[j] for j in others]),
                                      np.concatenate([truth[j] for j in others]))  # fmt: skip
        rescaled.append(softmax(log[k] / temperature, axis=1))
        folds.append({"patient": patients[i]["patient"], "temperature": round(temperature, 3)})
    before, _ = expected_calibration_error(
        np.concatenate([tables[i][0] for i in usable]), np.concatenate(truth)
    )
    after, _ = expected_calibration_error(np.concatenate(rescaled), np.concatenate(truth))
    return {
        "ece_before": before,
        "ece_leave_one_patient_out": after,
        "folds": folds,
        "all_patients": fit_temperature(np.concatenate(log), np.concatenate(truth)),
    }


def abstention_table(report: dict) -> list[dict]:
    rows = []
    patients = report["real"]
    for threshold in THRESHOLDS:
        flagged = [max(p["patient_probs"].values()) < threshold for p in patients]
        wrong = [not p["right"] for p in patients]
        rows.append(
            {
                "review_below": threshold,
                "wrong_caught": sum(f and w for f, w in zip(flagged, wrong, strict=True)),
                "wrong": sum(wrong),
                "right_flagged": sum(f and not w for f, w in zip(flagged, wrong, strict=True)),
                "right": len(patients) - sum(wrong),
            }
        )
    return rows


def figure(bins: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    width = 1.0 / N_BINS
    ax.bar([b[0] for b in bins], [b[2] for b in bins], width=width, align="edge", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot([b[1] for b in bins], [b[2] for b in bins], "o", color="black", ms=3, label="mean confidence")
    ax.set_xlabel("top slice probability")
    ax.set_ylabel("fraction right")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="heldout_real.json files")
    parser.add_argument("--figure", default=None, help="reliability diagram PNG")
    parser.add_argument(
        "--refit-temperature",
        action="store_true",
        help="also measure a temperature refitted on real slices, leaving each patient out in turn",
    )
    args = parser.parse_args(argv)
    merged = {"real": [p for r in args.reports for p in json.loads(Path(r).read_text())["real"]]}
    probs, truth, classes = slice_table(merged)
    ece, bins = expected_calibration_error(probs, truth)
    print(f"{len(truth)} held-out real slices of {len(merged['real'])} patients; classes {classes}")
    print(f"expected calibration error (top label, {N_BINS} bins): {ece:.3f}")
    print("| bin from | mean confidence | accuracy | slices |\n|---|---|---|---|")
    for lo, conf, acc, n in bins:
        print(f"| {lo:.2f} | {conf:.3f} | {acc:.3f} | {n} |")
    print("\n| patient | truth | called | top probability | right |\n|---|---|---|---|---|")
    for p in merged["real"]:
        top = max(p["patient_probs"].values())
        print(
            f"| {p['patient']} | {p['truth']} | {p['called']} | {top:.2f} | {'yes' if p['right'] else 'no'} |"
        )
    print("\n| review_below | wrong answers caught | right answers flagged |\n|---|---|---|")
    for row in abstention_table(merged):
        print(
            f"| {row['review_below']:.2f} | {row['wrong_caught']} of {row['wrong']} | "
            f"{row['right_flagged']} of {row['right']} |"
        )
    if args.refit_temperature:
        refit = leave_one_patient_out_temperature(merged)
        print("\ntemperature refitted on the other patients' real slices (leave one patient out):")
        print("| left out | temperature |\n|---|---|")
        for fold in refit["folds"]:
            print(f"| {fold['patient']} | {fold['temperature']:.3f} |")
        print(
            f"ECE {refit['ece_before']:.3f} as shipped -> {refit['ece_leave_one_patient_out']:.3f} "
            f"refitted (each patient by a temperature that never saw it); on all patients: "
            f"{refit['all_patients']:.3f}"
        )
    if args.figure:
        figure(bins, Path(args.figure), f"held-out real slices, ECE {ece:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
