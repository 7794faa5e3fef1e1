"""How long a large box file takes to read back (issue 16: 100,000 boxes must not freeze the viewer).

Writes ``--boxes`` boxes as JSON and as CSV on a 300 x 512 x 512 grid, then times ``load_boxes``
with the CT's geometry given (what the dock's import does), for a clean file and for one where
every other entry was broken by hand (skipped and listed). Prints the best of ``--repeat`` runs::

    python benchmarks/bench_boxes_io.py --boxes 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_wscovid.io.boxes_io import load_boxes, save_boxes
from napari_wscovid.results import Box

GEOMETRY = {
    "shape": [300, 512, 512],
    "spacing": [1.0, 0.7, 0.7],
    "origin": [-300.0, -180.0, -180.0],
    "direction": np.eye(3).tolist(),
}


def _boxes(n: int) -> list[Box]:
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 480, size=(n, 2))
    sizes = rng.integers(1, 30, size=(n, 2))
    return [
        Box(int(i % 300), int(y), int(x), int(y + h), int(x + w), "COVID-19", 0.5, 10.0)
        for i, ((y, x), (h, w)) in enumerate(zip(corners, sizes, strict=True))
    ]


def _break_half(path: Path) -> None:
    if path.suffix == ".csv":
        header, *lines = path.read_text().splitlines()
        lines = [",".join(["nan", *line.split(",")[1:]]) if i % 2 else line for i, line in enumerate(lines)]
        path.write_text("\n".join([header, *lines]) + "\n")
    else:
        doc = json.loads(path.read_text())
        for row in doc["boxes"][1::2]:
            row["y0"] = None
        path.write_text(json.dumps(doc))


def _best(path: Path, repeat: int) -> tuple[float, int, int]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        boxes, meta = load_boxes(path, expected_geometry=GEOMETRY)
        times.append(time.perf_counter() - start)
    return min(times), len(boxes), len(meta["skipped"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # load_boxes logs one warning per file with skipped entries; the table below already counts them
    logging.getLogger("napari_wscovid.io.boxes_io").setLevel(logging.ERROR)
    boxes = _boxes(args.boxes)
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".boxes.json", ".csv"):
            path = save_boxes(Path(folder) / f"many{suffix}", boxes, GEOMETRY)
            size = path.stat().st_size / 2**20
            seconds, n, _ = _best(path, args.repeat)
            print(f"{suffix:12s} {size:6.1f} MiB  {n:,} boxes read in {seconds:.2f} s")
            _break_half(path)
            seconds, n, skipped = _best(path, args.repeat)
            print(f"{suffix:12s} half broken: {n:,} read, {skipped:,} skipped in {seconds:.2f} s")


if __name__ == "__main__":
    main()
