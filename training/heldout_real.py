"""Judge networks on real patients they never trained on, through the plugin's own ``detect``.

Each ``--fold WEIGHTS:PATIENT,PATIENT,...`` names a weights file and the real patients it held
out (``training.real_backgrounds.REAL_PATIENTS`` ids). For every held-out patient the script runs
``detect`` as a user would (hybrid lungs, default saliency and boxes) and records the patient
call, its probabilities and the number of boxes; for the slice-labelled patients (COVID-CT-MD)
the slice AUCs within each patient and, pooled over one weights' patients, per set of weights.
``--calls-only`` skips the boxes (the saliency) for a quick look at calls and AUCs. With
``--backgrounds`` it also paints synthetic cases into the same held-out patients' lungs
(:mod:`training.synthesis`) and scores the slice AUC per class and the boxes against the exact
lesion masks. With ``--medseg`` it scores the default boxes on MedSeg slices that none of the
weights trained on.

    A=runs/wsnet_foldA/wsnet-3class.safetensors B=runs/wsnet_foldB/wsnet-3class.safetensors
    python -m training.heldout_real --fold $A:cap001,LIDC-IDRI-0003,Lung_Dx-A0001 \\
        --fold $B:P001,normal001,LIDC-IDRI-0001 \\
        --backgrounds runs/backgrounds --out runs/heldout_real
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_wscovid.architectures import NEGATIVE_CLASS
from training.localisation import MIN_LESION_AREA_MM2, MatchCounts, component_rects, match_slice
from training.metrics import roc_auc

log = logging.getLogger("training.heldout_real")

PNEUMONIA = (1, 2, 3)
KIND_SEED = {"NP": 0, "CAP": 1, "COVID-19": 2}


@dataclass
class Fold:
    weights: str
    patients: list[str]

    @classmethod
    def parse(cls, text: str) -> Fold:
        weights, _, ids = text.rpartition(":")
        if not weights or not ids:
            raise argparse.ArgumentTypeError(f"expected WEIGHTS:PATIENT[,PATIENT...], got {text!r}")
        return cls(weights, [p.strip() for p in ids.split(",") if p.strip()])


def _rects(boxes, z):
    return [(b.y0, b.x0, b.y1, b.x1) for b in boxes if int(b.slice) == z]


def score_lesions(result, lesion_mask: np.ndarray, spacing_yx) -> MatchCounts:
    """Every lesion slice and every boxed slice: boxes matched to the mask's lesions by IoU."""
    total = MatchCounts()
    boxed = {int(b.slice) for b in result.boxes}
    lesion_slices = set(np.flatnonzero(np.isin(lesion_mask, PNEUMONIA).reshape(len(lesion_mask), -1).any(1)))
    for z in sorted(boxed | {int(z) for z in lesion_slices}):
        truth = component_rects(lesion_mask[z], PNEUMONIA, spacing_yx, MIN_LESION_AREA_MM2)
        distract = component_rects(lesion_mask[z], (4,), spacing_yx)
        total += match_slice(_rects(result.boxes, z), truth, distract)
    return total


def real_patient(patient_id: str, weights: str, data_root: Path, device: str, boxes: bool = True) -> dict:
    from napari_wscovid import detect, load_ct
    from training.real_backgrounds import PATIENTS_BY_ID, slice_positive

    patient = PATIENTS_BY_ID[patient_id]
    volume = load_ct(str(data_root / patient.path))
    start = time.perf_counter()
    # Boxes are scored on real patients only where they must stay few: the NP patients. On the
    # diseased ones (no voxel masks) only the call and the slice probabilities count, and the
    # saliency of a hundred positive slices would dominate the run time.
    saliency = "positive" if patient.label == "NP" and boxes else "none"
    result = detect(volume, model=weights, device=device, saliency=saliency)
    # A two-class COVID network's negative class holds every other diagnosis (CAP included).
    truth = patient.label if patient.label in result.classes else NEGATIVE_CLASS
    row = {
        "patient": patient_id,
        "diagnosis": patient.label,
        "truth": truth,
        "called": result.predicted_class,
        "right": result.predicted_class == truth,
        "patient_probs": dict(zip(result.classes, np.round(result.patient_probs, 4).tolist(), strict=True)),
        "boxes": None if patient.label == "NP" and not boxes else len(result.boxes),
        "seconds": round(time.perf_counter() - start, 1),
        "classes": list(result.classes),
    }
    positive = slice_positive(patient, volume, data_root)
    probs = np.asarray(result.slice_probs)
    lung = np.isfinite(probs).all(1)
    infected = positive[lung] if positive is not None else np.zeros(lung.sum(), bool)
    row["slices"] = {"probs": probs[lung].tolist(), "infected": infected.tolist()}
    log.info(
        "%s (%s): called %s %s, %d boxes",
        patient_id,
        patient.label,
        row["called"],
        row["patient_probs"],
        row["boxes"],
    )
    return row


def synthetic_cases(
    patient_ids, weights, backgrounds_dir, per_class: int, seed: int, device: str
) -> list[dict]:
    from napari_wscovid import detect
    from training.datasets import slice_labels_from_masks
    from training.real_backgrounds import load_backgrounds
    from training.synthesis import synthesize

    rows = []
    for bg in load_backgrounds(backgrounds_dir, patient_ids):
        for kind in ("NP", "CAP", "COVID-19"):
            for i in range(per_class):
                case = synthesize(bg, kind, seed=seed + 1000 * i + KIND_SEED[kind], nodules=False)
                result = detect(case.volume, model=weights, device=device, lung_mask=case.lung_mask)
                idx, names = slice_labels_from_masks(case.lung_mask, case.lesion_mask, kind)
                probs = np.asarray(result.slice_probs)[idx]
                keep = np.isfinite(probs).all(1)
                counts = score_lesions(result, case.lesion_mask, case.volume.spacing[1:])
                rows.append(
                    {
                        "background": bg.patient_id,
                        "truth": kind,
                        "called": result.predicted_class,
                        "probs": probs[keep].tolist(),
                        "labels": [n for n, k in zip(names, keep, strict=True) if k],
                        "counts": counts.as_dict(),
                    }
                )
                log.info(
                    "synthetic %s in %s: called %s, %s",
                    kind,
                    bg.patient_id,
                    result.predicted_class,
                    counts.as_dict(),
                )
    return rows


def medseg_rows(weights_files, root: Path, device: str, seen: set[str]) -> list[dict]:
    from napari_wscovid import detect, load_ct
    from training.evaluation.heldout import medseg_mask

    rows = []
    for path in sorted((root / "images").iterdir()):
        if path.stem in seen:
            continue
        volume = load_ct(str(path))
        mask = medseg_mask(root, path)[None]
        for weights in weights_files:
            result = detect(volume, model=weights, device=device)
            counts = score_lesions(result, mask, volume.spacing[1:])
            rows.append({"image": path.name, "weights": weights, "counts": counts.as_dict()})
    return rows


def summarise(report: dict) -> dict:
    """Patient calls; slice AUCs per patient and, pooled, per set of weights (never across weights:
    two folds' networks score on different scales); box and lesion counts."""
    out = {}
    real = report["real"]
    out["patients_right"] = f"{sum(r['right'] for r in real)} of {len(real)}"
    by_patient: dict[str, dict] = {}
    pooled: dict[str, dict[str, list]] = {}
    for r in real:
        cls = r["classes"]
        p = np.asarray(r["slices"]["probs"]).reshape(-1, len(cls))
        inf = np.asarray(r["slices"]["infected"], bool)
        covid_score = p[:, cls.index("COVID-19")] if "COVID-19" in cls else np.zeros(len(p))
        scores = {"infected_vs_clean": 1 - p[:, cls.index(NEGATIVE_CLASS)], "covid_vs_rest": covid_score}
        truths = {"infected_vs_clean": inf, "covid_vs_rest": inf & (r["truth"] == "COVID-19")}
        # within one patient: its own infected slices against its own clean ones
        for measure in scores:
            if truths[measure].any() and not truths[measure].all():
                by_patient.setdefault(measure, {})[r["patient"]] = {
                    "auc": roc_auc(truths[measure], scores[measure]),
                    "positive_slices": int(truths[measure].sum()),
                    "negative_slices": int((~truths[measure]).sum()),
                }
        weights = Path(r.get("weights", "")).parent.name or r.get("weights", "")
        pool = pooled.setdefault(weights, {"patients": []})
        pool["patients"].append(r["patient"])
        for measure in scores:
            pool.setdefault(f"{measure}_truth", []).extend(truths[measure].tolist())
            pool.setdefault(f"{measure}_score", []).extend(scores[measure].tolist())
    for measure in ("infected_vs_clean", "covid_vs_rest"):
        out[f"real_slice_auc_{measure}_by_patient"] = by_patient.get(measure, {})
        # every slice of one weights' held-out patients: positives of some against negatives of all
        out[f"real_slice_auc_{measure}_pooled_by_weights"] = {
            w: {
                "auc": roc_auc(pool[f"{measure}_truth"], pool[f"{measure}_score"]),
                "patients": pool["patients"],
            }
            for w, pool in pooled.items()
        }
    out["real_np_boxes"] = {
        r["patient"]: r["boxes"]
        for r in real
        if r.get("diagnosis", r["truth"]) == "NP" and r["boxes"] is not None  # None: not run (--calls-only)
    }
    synth = report.get("synthetic") or []
    if synth:
        cls = real[0]["classes"] if real else ["NP", "CAP", "COVID-19"]
        probs = np.concatenate([np.asarray(r["probs"]).reshape(-1, len(cls)) for r in synth])
        labels = [lab for r in synth for lab in r["labels"]]
        out["synthetic_slice_auc"] = {
            c: roc_auc([lab == c for lab in labels], probs[:, i]) for i, c in enumerate(cls)
        }
        total = MatchCounts()
        for r in synth:
            total += MatchCounts(**r["counts"])
        out["synthetic_lesions"] = _recall_precision(total)
        out["synthetic_patients_right"] = f"{sum(r['called'] == r['truth'] for r in synth)} of {len(synth)}"
    med = report.get("medseg") or []
    if med:
        total = MatchCounts()
        for r in med:
            total += MatchCounts(**r["counts"])
        out["medseg_lesions"] = _recall_precision(total)
    return out


def _recall_precision(c: MatchCounts) -> dict:
    return {
        "recall": c.lesions_found / c.lesions if c.lesions else float("nan"),
        "precision": c.boxes_on_lesion / c.boxes if c.boxes else float("nan"),
        "lesions": c.lesions,
        "boxes": c.boxes,
    }


def _rounded(value, digits: int = 3):
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits)
    return value


def to_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        "# Held-out real patients, through the plugin's `detect`",
        "",
        f"Command: `{report['command']}`",
        "",
        "| patient | truth | weights (held it out) | called | P(NP / CAP / COVID-19) | boxes |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["real"]:
        probs = " / ".join(f"{v:.2f}" for v in r["patient_probs"].values())
        weights = Path(r["weights"]).parent.name or r["weights"]  # a folder, or a registry name
        lines.append(
            f"| {r['patient']} | {r['truth']} | `{weights}` | {r['called']}"
            f"{'' if r['right'] else ' (wrong)'} | {probs} | {r['boxes']} |"
        )
    lines += ["", "| measure | value |", "|---|---|"]
    for key, value in s.items():
        lines.append(f"| {key} | {json.dumps(_rounded(value))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", type=Fold.parse, action="append", required=True)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--backgrounds", default=None, help="real-background cache for synthetic cases")
    parser.add_argument("--synthetic-per-class", type=int, default=1)
    parser.add_argument("--medseg", action="store_true", help="also score boxes on MedSeg slices")
    parser.add_argument(
        "--medseg-seen",
        default=None,
        help="file listing MedSeg image stems some weights trained on (skipped)",
    )
    parser.add_argument(
        "--calls-only", action="store_true", help="no boxes on the real patients: calls and slice AUCs only"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data_root = Path(args.data)
    report = {
        "command": "python -m training.heldout_real " + " ".join(sys.argv[1:] if argv is None else argv),
        "real": [],
        "synthetic": [],
    }
    for fold in args.fold:
        for pid in fold.patients:
            row = real_patient(pid, fold.weights, data_root, args.device, boxes=not args.calls_only)
            row["weights"] = fold.weights
            report["real"].append(row)
        if args.backgrounds:
            report["synthetic"] += synthetic_cases(
                fold.patients,
                fold.weights,
                args.backgrounds,
                args.synthetic_per_class,
                args.seed,
                args.device,
            )
    if args.medseg:
        seen = set(Path(args.medseg_seen).read_text().split()) if args.medseg_seen else set()
        root = data_root / "medseg-infnet" / "train_doctor_label"
        report["medseg"] = medseg_rows([args.fold[0].weights], root, args.device, seen)
    report["summary"] = summarise(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_real.json").write_text(json.dumps(report, default=float))
    (out / "heldout_real.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
