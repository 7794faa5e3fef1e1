"""Classify held-out real patients with several WSNet weights, without saliency: a quick judge.

For comparing training recipes on the real patients a fold never saw when the full held-out
evaluation (``python -m training.heldout_real``, boxes included) would take an hour on this CPU:
per patient and per weights file, the patient call and probabilities, the number of "positive"
slices (the slices that would get saliency and boxes) and the mean P(NP) over lung slices::

    python scripts/classify_heldout.py --patients cap001,LIDC-IDRI-0003,Lung_Dx-A0001 \\
        wsnet-3class runs/pilot/distractors/wsnet-3class.safetensors

One patient is loaded once and judged by every weights file in turn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def judge(volume, weights: str, device: str) -> dict:
    from napari_wscovid import detect
    from napari_wscovid.stages import slice_np_offset, slices_to_explain

    result = detect(volume, model=weights, device=device, saliency="none")
    probs = np.asarray(result.slice_probs)
    lung_idx = np.flatnonzero(np.isfinite(probs).all(1))
    positive = slices_to_explain(
        "positive", None, probs, tuple(result.classes), lung_idx, slice_np_offset(result.model_info)
    )
    negative = list(result.classes).index("NP") if "NP" in result.classes else None
    return {
        "weights": weights,
        "version": result.model_info.get("version"),
        "called": result.predicted_class,
        "patient_probs": {
            c: round(float(v), 3) for c, v in zip(result.classes, result.patient_probs, strict=True)
        },
        "positive_slices": int(len(positive)),
        "lung_slices": int(len(lung_idx)),
        "mean_p_np": None if negative is None else round(float(probs[lung_idx, negative].mean()), 3),
        # per lung slice, for --out: where along the scan the positive slices lie
        "lung_slice_index": lung_idx.tolist(),
        "slice_probs": np.round(probs[lung_idx], 3).tolist(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("weights", nargs="+", help="registered names or safetensors files")
    parser.add_argument("--patients", required=True, help="comma-separated ids of training.real_backgrounds")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    from napari_wscovid import load_ct
    from training.real_backgrounds import PATIENTS_BY_ID

    rows = []
    for patient_id in args.patients.split(","):
        patient = PATIENTS_BY_ID[patient_id]
        volume = load_ct(str(Path(args.data) / patient.path))
        for weights in args.weights:
            row = {"patient": patient_id, "truth": patient.label, **judge(volume, weights, args.device)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("lung_slice_index", "slice_probs")}))
    print(
        "\n| patient | truth | weights | called | P(NP) / P(CAP) / P(COVID-19) "
        "| positive slices | mean slice P(NP) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["patient_probs"]
        probs = " / ".join(f"{p.get(c, float('nan')):.2f}" for c in ("NP", "CAP", "COVID-19"))
        print(
            f"| {r['patient']} | {r['truth']} | {r['version']} | {r['called']} | {probs} | "
            f"{r['positive_slices']} of {r['lung_slices']} | {r['mean_p_np']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
