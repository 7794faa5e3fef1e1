"""Studies per hour: the sequential ``detect`` loop against ``cohort`` on 1 and 2 Dask workers.

The same phantom studies (NIfTI, written once into a temporary folder) go through

* the loop a user writes today: one ``python -m napari_wscovid detect`` process per study;
* ``run_cohort`` with a LocalCluster of 1 worker, then of 2 workers.

It prints studies per hour of each and the scheduler's overhead per study (1 worker against the
in-process time of the same work). Run it alone on the machine; compare the ratios of one run::

    python benchmarks/bench_cohort.py --studies 6 --model default --saliency none
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_studies(root: Path, n: int, size: int, slices: int) -> None:
    from napari_wscovid.io.write import write_image
    from napari_wscovid.phantom import make_phantom

    kinds = ("NP", "CAP", "COVID-19")
    for i in range(n):
        ph = make_phantom(kinds[i % 3], n_slices=slices, size=size, seed=100 + i)
        write_image(ph.volume.hu, root / f"study{i:03d}.nii.gz", like=ph.volume)


def sequential(root: Path, out: Path, model: str, saliency: str) -> float:
    start = time.perf_counter()
    for study in sorted(root.glob("*.nii.gz")):
        cmd = [sys.executable, "-m", "napari_wscovid", "detect", str(study), "--out", str(out / study.stem)]
        cmd += ["--model", model, "--device", "cpu", "--saliency", saliency, "-q"]
        subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def in_process(root: Path, out: Path, model: str, saliency: str) -> float:
    """The work itself, one process, no scheduler: the baseline of the overhead."""
    from napari_wscovid.cohort import CohortOptions, run_study

    options = {**CohortOptions(model=model, saliency=saliency).as_dict(), "model_sha256": None}
    start = time.perf_counter()
    for study in sorted(root.glob("*.nii.gz")):
        row = run_study(str(root), study.name, str(out), options, threads=1)
        if row["status"] != "ok":
            raise RuntimeError(row["error"])
    return time.perf_counter() - start


def cohort(root: Path, out: Path, model: str, saliency: str, workers: int) -> float:
    from napari_wscovid.cohort import CohortOptions, run_cohort

    start = time.perf_counter()
    summary = run_cohort(root, out, options=CohortOptions(model=model, saliency=saliency), workers=workers)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} studies failed")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--size", type=int, default=192, help="in-plane pixels of each phantom")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--model", default="default")
    parser.add_argument("--saliency", default="none", help="none: classification only (saliency is minutes)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as each worker runs: the comparison is per core
    work = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    try:
        root = work / "root"
        root.mkdir()
        make_studies(root, args.studies, args.size, args.slices)
        n = args.studies
        times = {
            "detect loop (one process per study)": sequential(root, work / "seq", args.model, args.saliency),
            "in process, no scheduler": in_process(root, work / "inproc", args.model, args.saliency),
            "cohort, 1 worker": cohort(root, work / "c1", args.model, args.saliency, 1),
            "cohort, 2 workers": cohort(root, work / "c2", args.model, args.saliency, 2),
        }
        print(
            f"{n} phantom studies ({args.slices} x {args.size}^2), model {args.model}, "
            f"saliency {args.saliency}, this machine:"
        )
        print("| run | seconds | studies per hour |\n|---|---|---|")
        for name, seconds in times.items():
            print(f"| {name} | {seconds:.1f} | {3600 * n / seconds:.0f} |")
        overhead = (times["cohort, 1 worker"] - times["in process, no scheduler"]) / n
        print(f"scheduler and cluster overhead per study (1 worker vs in process): {overhead:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
