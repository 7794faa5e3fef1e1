"""Time classical lung segmentation on a 300-slice 512 x 512 phantom and report its Dice.

Run: ``python benchmarks/bench_lung.py [--kind COVID-19] [--seed 0] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_wscovid.lung import segment_lungs
from napari_wscovid.phantom import make_phantom


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="COVID-19")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slice-mm", type=float, default=1.0, help="z spacing; 300 x 1 mm spans the chest")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    phantom = make_phantom(
        args.kind, n_slices=args.slices, size=args.size, spacing=(args.slice_mm, None, None), seed=args.seed
    )
    print(f"phantom {phantom.volume.shape} built in {time.perf_counter() - start:.1f} s")
    timings = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        labels = segment_lungs(phantom.volume)
        timings.append(time.perf_counter() - start)
    truth = phantom.lung_mask
    print(f"classical segmentation: best {min(timings):.2f} s, median {np.median(timings):.2f} s")
    print(
        f"Dice both {dice(labels > 0, truth > 0):.4f}, right {dice(labels == 1, truth == 1):.4f}, "
        f"left {dice(labels == 2, truth == 2):.4f}"
    )


if __name__ == "__main__":
    main()
