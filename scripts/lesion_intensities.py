"""Measure the HU of real pneumonia on the slice-labelled real CTs, for the lesion synthesis.

COVID-CT-MD labels slices, not voxels, so lesions are found as *broad opacities*: lung voxels
denser than -750 HU that survive a 3 mm opening (which removes vessels and fissures, thinner than
that). Their share of the lung on infected slices, against lesion-free slices of the same patient
(dependent density and hila also survive), says how much of it is lesion; their HU percentiles on
infected slices give the ranges ``training/synthesis.py`` draws from. MedSeg's masks cannot give
HU: its images are 8-bit crops with an unknown window.

    python -m training.real_backgrounds --out runs/backgrounds     # the cache this reads
    python scripts/lesion_intensities.py --backgrounds runs/backgrounds --out docs/lesion_intensities.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage import morphology

from training.real_backgrounds import load_backgrounds

OPACITY_HU = -750.0
CONSOLIDATION_HU = -300.0


def broad_opacity(hu2d, lung2d, pixel_mm):
    dense = lung2d & (hu2d > OPACITY_HU)
    return morphology.opening(dense, morphology.disk(max(1, round(1.5 / pixel_mm))))


def measure(bg):
    pixel = bg.spacing[1]
    stats = {"infected": [], "clean": []}
    hus = {"infected": [], "clean": []}
    parenchyma = []
    for z in range(len(bg.hu)):
        lung = bg.lung[z] > 0
        if lung.sum() < 500:
            continue
        op = broad_opacity(bg.hu[z], lung, pixel)
        key = "infected" if bg.real_positive[z] else "clean"
        stats[key].append(op.sum() / lung.sum())
        hus[key].append(bg.hu[z][op])
        parenchyma.append(np.median(bg.hu[z][lung & (bg.hu[z] < OPACITY_HU)]))
    row = {"patient": bg.patient_id, "class": bg.label, "parenchyma_median_hu": float(np.median(parenchyma))}
    for key in stats:
        row[f"{key}_slices"] = len(stats[key])
        row[f"{key}_opacity_share"] = float(np.mean(stats[key])) if stats[key] else float("nan")
    inf = np.concatenate(hus["infected"]) if hus["infected"] else np.zeros(0)
    clean = np.concatenate(hus["clean"]) if hus["clean"] else np.zeros(0)
    row["infected_opacity_hu_p5_25_50_75_95"] = np.percentile(inf, [5, 25, 50, 75, 95]).round(0).tolist()
    row["clean_opacity_hu_p5_25_50_75_95"] = np.percentile(clean, [5, 25, 50, 75, 95]).round(0).tolist()
    ggo, cons = inf[inf <= CONSOLIDATION_HU], inf[inf > CONSOLIDATION_HU]
    row["ggo_range_share"] = float(len(ggo) / max(len(inf), 1))
    row["ggo_hu_p10_50_90"] = np.percentile(ggo, [10, 50, 90]).round(0).tolist() if len(ggo) else []
    row["consolidation_hu_p10_50_90"] = (
        np.percentile(cons, [10, 50, 90]).round(0).tolist() if len(cons) else []
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backgrounds", default="runs/backgrounds")
    parser.add_argument("--out", default="docs/lesion_intensities.md")
    args = parser.parse_args(argv)
    rows = [measure(bg) for bg in load_backgrounds(args.backgrounds, ["P001", "cap001"])]
    lines = [
        "# Real lesion intensities (COVID-CT-MD, slice-labelled)",
        "",
        "Measured by `python scripts/lesion_intensities.py`: broad opacities (lung voxels > -750 HU that",
        "survive a 3 mm opening) on infected vs lesion-free slices of the same patient, on the 1.5 mm",
        "background grid. Percentiles in HU.",
        "",
        "| patient | class | lung parenchyma median | infected slices: opacity share of lung "
        "| clean slices: opacity share | infected opacity HU p5/25/50/75/95 "
        "| clean opacity HU p5/25/50/75/95 | share in GGO range (<= -300) "
        "| GGO-range HU p10/50/90 | consolidation-range HU p10/50/90 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = {k: "/".join(f"{v:.0f}" for v in r[k]) for k in r if "_p" in k}
        lines.append(
            f"| {r['patient']} | {r['class']} | {r['parenchyma_median_hu']:.0f} | "
            f"{r['infected_opacity_share']:.3f} ({r['infected_slices']} slices) | "
            f"{r['clean_opacity_share']:.3f} ({r['clean_slices']} slices) | "
            f"{pct['infected_opacity_hu_p5_25_50_75_95']} | {pct['clean_opacity_hu_p5_25_50_75_95']} | "
            f"{r['ggo_range_share']:.2f} | {pct['ggo_hu_p10_50_90']} | {pct['consolidation_hu_p10_50_90']} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
