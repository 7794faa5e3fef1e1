"""What the first run's imports cost the viewer: the longest time a GUI-like thread waits.

A run imports torch and the core in its worker thread; while an import holds the interpreter
lock, napari cannot repaint. Each case runs in a fresh process that first builds a napari
viewer model with the sample's shape (so the garbage collector has a viewer's objects to walk),
then imports in a thread while another thread ticks every 5 ms; the longest gap between ticks is
the stall. With the garbage collector off during the import, what remains is the libraries' own
initialisation. ::

    python benchmarks/bench_import_stall.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    "torch": ["torch"],
    "torch and the core": [
        "torch",
        "napari_wscovid.pipeline",
        "napari_wscovid.methods.wsnet",
        "skimage.filters",
        "skimage.measure",
        "skimage.morphology",
        "scipy.ndimage",
    ],
}

CHILD = r"""
import gc, importlib, json, sys, threading, time
import numpy as np
from napari.components import ViewerModel
viewer = ViewerModel()
viewer.add_image(np.zeros((64, 256, 256), np.int16))
modules, gc_off = json.loads(sys.argv[1]), sys.argv[2] == "off"
gaps, done = [], threading.Event()
def tick():
    last = time.perf_counter()
    while not done.is_set():
        time.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
ticker = threading.Thread(target=tick)
ticker.start()
time.sleep(0.2)
if gc_off:
    gc.disable()
start = time.perf_counter()
worker = threading.Thread(target=lambda: [importlib.import_module(m) for m in modules])
worker.start()
worker.join()
seconds = time.perf_counter() - start
gc.enable()
time.sleep(0.05)
done.set()
ticker.join()
print(json.dumps({"seconds": seconds, "gaps_ms": sorted(1000 * g for g in gaps)[-3:]}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print("| imports | garbage collector | import (s) | longest stall (ms) | next two (ms) |")
    print("|---|---|---|---|---|")
    for name, modules in CASES.items():
        for gc_mode in ("on", "off"):
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(modules), gc_mode],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                longest, *others = reversed(row["gaps_ms"])
                rest = ", ".join(f"{g:.0f}" for g in others)
                print(f"| {name} | {gc_mode} | {row['seconds']:.2f} | {longest:.0f} | {rest} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
