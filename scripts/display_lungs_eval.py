"""The lung finders for display-intensity figures (PNG/JPG), measured on real figures.

MedSeg's 50 slices carry infection masks: the share of infection pixels inside the lung mask
says how much lesion the lungs hold (a lung mask that leaves lesions out also hides them from
the network, which sees only the lungs). UCSD's figures carry no masks: for them the script
counts the pictures with no lung found and which way up the U-Net looked at them. With
``--ucsd-auc`` it also runs the default network on UCSD's test fold (1.0.0's split) through
``detect``, once per finder, and prints the COVID-19-vs-rest AUC. ::

    python scripts/display_lungs_eval.py --data ../shared/data [--ucsd-auc]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np


def medseg_rows(root: Path, methods) -> dict[str, list[tuple[float, float]]]:
    from napari_wscovid import load_ct
    from napari_wscovid.lung import segment_lungs
    from training.evaluation.heldout import medseg_mask

    rows = {m: [] for m in methods}
    for path in sorted((root / "images").iterdir(), key=lambda p: int(p.stem)):
        volume = load_ct(str(path))
        lesion = medseg_mask(root, path)[None] > 0
        for method in methods:
            lung = segment_lungs(volume, method) > 0
            rows[method].append((float(lung.any()), float((lung & lesion).sum() / max(1, lesion.sum()))))
    return rows


def transposed_counts(files) -> tuple[int, int]:
    from napari_wscovid import load_ct
    from napari_wscovid.lung import unet
    from napari_wscovid.lung.display import figure_is_transposed

    model = unet.bundled_lung_unet()
    flips = sum(figure_is_transposed(load_ct(str(f)).hu, model) for f in files)
    return int(flips), len(files)


def ucsd_test_auc(root: Path, method: str) -> tuple[float, int, int]:
    """COVID-19-vs-rest AUC of P(COVID-19) on UCSD's test fold, the number of figures, and how
    many got no answer (counted as 0.5)."""
    from types import SimpleNamespace

    from sklearn.metrics import roc_auc_score

    from napari_wscovid import detect, load_ct
    from training.datasets import SliceImageFolderDataset
    from training.evaluation.heldout import split_fold

    data = SliceImageFolderDataset(root, classes=("NP", "COVID-19"), size=8, preparation="whole")
    fold, _ = split_fold(SimpleNamespace(k_folds=5, fold=0, seed=0), data.patient_ids, data.patient_classes)
    truth, score = [], []
    for i in fold.test:
        result = detect(load_ct(str(data.paths[i])), lung_method=method, saliency="none")
        truth.append(int(data.labels[i]))
        score.append(float(np.asarray(result.patient_probs)[result.classes.index("COVID-19")]))
    score = np.asarray(score)
    unanswered = ~np.isfinite(score)
    score[unanswered] = 0.5
    return float(roc_auc_score(truth, score)), len(truth), int(unanswered.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--ucsd-auc", action="store_true", help="also the network's AUC on UCSD's test fold")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # one "not in Hounsfield units" line per figure otherwise
    data = Path(args.data)
    methods = ("classical", "hybrid")
    rows = medseg_rows(data / "medseg-infnet" / "train_doctor_label", methods)
    print("| finder | MedSeg slices with a lung found | infection pixels inside the lungs (mean / median) |")
    print("|---|---|---|")
    for method in methods:
        found, inside = np.array(rows[method]).T
        share = f"{inside.mean():.2f} / {np.median(inside):.2f}"
        print(f"| {method} | {int(found.sum())} of {len(found)} | {share} |")
    medseg = sorted((data / "medseg-infnet" / "train_doctor_label" / "images").iterdir())
    print("\nU-Net looked at the figure transposed (the view it was surer of):")
    flips, n = transposed_counts(medseg)
    print(f"- MedSeg (stored transposed): {flips} of {n}")
    for folder in ("CT_COVID", "CT_NonCOVID"):
        files = sorted(p for p in (data / "ucsd-covid-ct" / folder).iterdir() if p.suffix.lower() != ".md")
        flips, n = transposed_counts(files)
        print(f"- UCSD {folder}: {flips} of {n}")
    if args.ucsd_auc:
        print("\n| finder | UCSD test fold: COVID-19-vs-rest AUC of P(COVID-19) | figures | no answer |")
        print("|---|---|---|---|")
        for method in methods:
            auc, n, unanswered = ucsd_test_auc(data / "ucsd-covid-ct", method)
            print(f"| {method} | {auc:.3f} | {n} | {unanswered} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
