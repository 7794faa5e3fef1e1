"""What decoding JPEG DICOM series in GDCM child processes costs against decoding them in-process.

GDCM runs in child processes (``napari_wscovid/io/isolated.py``) so that a decoder crash or
runaway allocation cannot end the viewer. For each real JPEG Lossless / JPEG-LS series in
``../shared/data`` this times, interleaved and repeated (median of ``--repeats``):

* ``in-process``: every file through ``dicom._read_with_gdcm`` here, as loading did before;
* ``1 child``: all files in one child process;
* ``children``: the default, one child per core (at most 4) for series of 16 files or more;
* ``load_ct``: the whole load (headers, decoding, ordering) with the default.

Run from the repository root::

    python benchmarks/bench_dicom_load.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from napari_wscovid.io import dicom as dicom_io
from napari_wscovid.io import isolated, load_ct

DATA = Path(os.environ.get("WSCOVID_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SERIES = {
    "COVID-CT-MD P001 (JPEG Lossless)": "covid-ct-md/sample_data/COVID-19 subjects/P001",
    "COVID-CT-MD cap001 (JPEG Lossless)": "covid-ct-md/sample_data/Cap subjects/cap001",
    "LIDC-IDRI-0001 (JPEG-LS)": "lidc-idri/LIDC-IDRI-0001/dicom",
}


def in_process(files: list[Path]) -> float:
    return float(sum(sitk.GetArrayFromImage(dicom_io._read_with_gdcm(f)).mean() for f in files))


def in_children(files: list[Path], max_children: int | None) -> float:
    saved = isolated._MAX_CHILDREN
    if max_children is not None:
        isolated._MAX_CHILDREN = max_children
    try:
        with isolated.Decoding("gdcm", [(f, 512 * 512 * 8) for f in files]) as decoded:
            return float(sum(np.asarray(decoded.result(f).pixels).mean() for f in files))
    finally:
        isolated._MAX_CHILDREN = saved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"cores: {os.cpu_count()}; load average {load:.1f}; median of {args.repeats} runs, seconds")
    print("| series | files | in-process | 1 child | children | load_ct |")
    print("|---|---|---|---|---|---|")
    for label, relative in SERIES.items():
        folder = DATA / relative
        if not folder.is_dir():
            print(f"| {label} | missing: {folder} | | | | |")
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())
        runs = {
            "in-process": lambda files=files: in_process(files),
            "1 child": lambda files=files: in_children(files, 1),
            "children": lambda files=files: in_children(files, None),
            "load_ct": lambda folder=folder: load_ct(folder).hu.mean(),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        sums = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                sums[name] = run()
                times[name].append(time.perf_counter() - started)
        # the same pixels either way (the sums of slice means agree)
        assert abs(sums["in-process"] - sums["children"]) < 1e-6 * max(1.0, abs(sums["in-process"]))
        cells = " | ".join(f"{statistics.median(t):.2f}" for t in times.values())
        print(f"| {label} | {len(files)} | {cells} |")


if __name__ == "__main__":
    main()
