"""Segment the lungs of the three COVID-CT-MD sample series; print volumes, draw outlines.

Run: ``python scripts/lung_masks_real.py [--method hybrid] [--data ../shared/data] [--out FILE]``
Writes a figure with three axial and one coronal slice per series, right lung red,
left lung blue. With a method other than "classical", what it adds to the classical
mask is filled in yellow and its volume printed, so that every added voxel can be looked at.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from napari_wscovid.io import load_ct  # noqa: E402
from napari_wscovid.lung import LEFT, LUNG_METHODS, RIGHT, lung_volumes_ml, segment_lungs  # noqa: E402

SERIES = {
    "P001 (COVID-19)": "COVID-19 subjects/P001",
    "cap001 (CAP)": "Cap subjects/cap001",
    "normal001 (normal)": "Normal subjects/normal001",
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def draw(axis, image, labels, aspect=1.0, title="", added=None) -> None:
    axis.imshow(image, cmap="gray", vmin=-1200, vmax=300, aspect=aspect, interpolation="nearest")
    if added is not None and added.any():
        overlay = np.zeros((*added.shape, 4))
        overlay[added] = (1.0, 0.9, 0.0, 0.45)
        axis.imshow(overlay, aspect=aspect, interpolation="nearest")
    for side, colour in ((RIGHT, "red"), (LEFT, "deepskyblue")):
        if (labels == side).any():
            axis.contour(labels == side, levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_title(title, fontsize=9)
    axis.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None, help="default docs/lung_masks_real_METHOD.png")
    parser.add_argument("--method", default="classical", choices=LUNG_METHODS)
    args = parser.parse_args()
    args.out = args.out or REPO_ROOT / "docs" / f"lung_masks_real_{args.method}.png"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    root = args.data / "covid-ct-md" / "sample_data"
    figure, axes = plt.subplots(len(SERIES), 4, figsize=(16, 4.2 * len(SERIES)))
    for row, (name, relative) in enumerate(SERIES.items()):
        volume = load_ct(root / relative)
        start = time.perf_counter()
        labels = segment_lungs(volume, method=args.method)
        seconds = time.perf_counter() - start
        litres = {key: value / 1000 for key, value in lung_volumes_ml(labels, volume.spacing).items()}
        added = np.zeros(labels.shape, bool)
        note = ""
        if args.method != "classical":
            added = (labels > 0) & (segment_lungs(volume, method="classical") == 0)
            note = f", {added.sum() * np.prod(volume.spacing) / 1000:.0f} mL more than classical"
        print(
            f"{name}: {volume.shape}, {args.method} {seconds:.1f} s, right {litres['right']:.2f} L, "
            f"left {litres['left']:.2f} L, total {litres['total']:.2f} L{note}"
        )
        occupied = np.flatnonzero(labels.any(axis=(1, 2)))
        for column, fraction in enumerate((0.2, 0.5, 0.85)):
            z = int(occupied[0] + fraction * (occupied[-1] - occupied[0]))
            if column == 1 and added.any():
                z = int(np.argmax(added.sum(axis=(1, 2))))  # where the method adds the most
            draw(axes[row, column], volume.hu[z], labels[z], title=f"{name} axial z={z}", added=added[z])
        y = int(np.nonzero(labels.any(axis=(0, 2)))[0].mean())
        coronal_aspect = volume.spacing[0] / volume.spacing[2]
        # Slice index grows towards the head; flip so the head is up.
        draw(
            axes[row, 3],
            volume.hu[::-1, y],
            labels[::-1, y],
            aspect=coronal_aspect,
            title=f"coronal y={y}, total {litres['total']:.2f} L",
            added=added[::-1, y],
        )
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
