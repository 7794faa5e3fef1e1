"""Lung segmentation methods on phantoms: accuracy on held-out phantoms, then speed at full size.

Run: ``python benchmarks/bench_lung.py [--methods classical hybrid unet] [--phantoms 12] [--repeat 3]
[--lung-weights FILE]`` (``--lung-weights``: a candidate U-Net instead of the bundled one).

Accuracy: Dice against the phantom's exact lung mask (which includes every lesion) and the
share of lesion voxels inside the mask, on phantoms whose seeds (30000+) the lung U-Net never
saw (it trains on 10000+ and selects on 20000+), plus the test suite's hard cases. Speed: the
best of ``--repeat`` runs on a 300-slice 512 x 512 phantom (issue 3's target: <= 5 s).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_wscovid.lung import LUNG_METHODS, segment_lungs
from napari_wscovid.phantom import make_phantom

#: The cases tests/test_lung.py checks (kind, seed, severity); seeds below 10000.
TEST_CASES = (
    ("COVID-19", 0, None),
    ("COVID-19", 0, 0.9),
    ("COVID-19", 2, 0.9),
    ("CAP", 1, 0.9),
    ("CAP", 0, None),
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def held_out_cases(n: int) -> list[tuple[str, int, float | None]]:
    kinds = ("NP", "CAP", "COVID-19")
    return [(kinds[i % 3], 30000 + i, None) for i in range(n)]


def accuracy(methods, cases, size: int, n_slices: int, model=None) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for kind, seed, severity in cases:
        phantom = make_phantom(kind, n_slices=n_slices, size=size, seed=seed, severity=severity)
        truth = phantom.lung_mask
        lesion = phantom.lesion_mask > 0
        line = [f"{kind:8s} seed {seed:5d} sev {severity if severity is not None else '-':>4}"]
        for method in methods:
            labels = segment_lungs(phantom.volume, method=method, model=model)
            row = {
                "dice": dice(labels > 0, truth > 0),
                "dice_sides": min(dice(labels == s, truth == s) for s in (1, 2)),
                "lesion_inside": (
                    np.count_nonzero(lesion & (labels > 0)) / np.count_nonzero(lesion)
                    if lesion.any()
                    else None
                ),
            }
            rows[method].append(row)
            inside = "  -  " if row["lesion_inside"] is None else f"{row['lesion_inside']:.3f}"
            line.append(f"{method} {row['dice']:.4f}/{row['dice_sides']:.3f}/{inside}")
        print("  ".join(line))
    return rows


def summarise(title: str, rows: dict[str, list[dict]]) -> None:
    print(f"{title}: Dice mean / min, worst side's Dice min, lesion voxels inside mean / min")
    for method, values in rows.items():
        d = np.array([r["dice"] for r in values])
        sides = np.array([r["dice_sides"] for r in values])
        inside = np.array([r["lesion_inside"] for r in values if r["lesion_inside"] is not None])
        print(
            f"  {method:9s} Dice {d.mean():.4f} / {d.min():.4f}   sides min {sides.min():.4f}   "
            f"lesion inside {inside.mean():.3f} / {inside.min():.3f}   (>= 0.97: {np.mean(d >= 0.97):.0%})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(LUNG_METHODS), choices=LUNG_METHODS)
    parser.add_argument(
        "--phantoms", type=int, default=12, help="held-out phantoms (kinds in turn); 0: speed only"
    )
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--n-slices", type=int, default=32)
    parser.add_argument("--speed-slices", type=int, default=300, help="0 skips the speed test")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lung-weights", default=None, help="lung U-Net safetensors (default: bundled)")
    args = parser.parse_args()
    model = None
    if args.lung_weights:
        from napari_wscovid.lung.unet import load_lung_unet

        model = load_lung_unet(args.lung_weights)
        print(f"lung U-Net: {args.lung_weights}")

    if args.phantoms:
        summarise("test-suite cases", accuracy(args.methods, TEST_CASES, args.size, args.n_slices, model))
        summarise(
            f"{args.phantoms} held-out phantoms",
            accuracy(args.methods, held_out_cases(args.phantoms), args.size, args.n_slices, model),
        )
    if not args.speed_slices:
        return
    start = time.perf_counter()
    phantom = make_phantom(
        "COVID-19", n_slices=args.speed_slices, size=512, spacing=(1.0, None, None), seed=0
    )
    print(f"phantom {phantom.volume.shape} built in {time.perf_counter() - start:.1f} s")
    truth = phantom.lung_mask
    for method in args.methods:
        timings = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            labels = segment_lungs(phantom.volume, method=method, model=model)
            timings.append(time.perf_counter() - start)
        print(
            f"{method:9s} best {min(timings):.2f} s, median {np.median(timings):.2f} s; "
            f"Dice both {dice(labels > 0, truth > 0):.4f}, right {dice(labels == 1, truth == 1):.4f}, "
            f"left {dice(labels == 2, truth == 2):.4f}"
        )


if __name__ == "__main__":
    main()
