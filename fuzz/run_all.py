"""Run every fuzz harness for a while, one after the other; exit non-zero when one finds a crash.

    python fuzz/run_all.py --seconds 60 --seed 1   # all harnesses, 60 s each, fixed mutations (CI)
    python fuzz/run_all.py --seconds 600 dicom     # one harness, 10 minutes

Each harness runs in its own process with libFuzzer's ``-max_total_time``; new coverage is kept in
``fuzz/corpus/<name>/`` (not committed), the committed seeds in ``fuzz/seeds/<name>/`` are read too,
and a crashing input is written to ``fuzz/crashes/<name>/`` and its path printed. Where atheris is
not installed or does not run on this platform the runner says so and exits 0: only a crash
found by a harness that did run fails it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("dicom", "nifti", "boxes", "weights")
# libFuzzer's own words for "this input broke the target"; anything else that stops a run is a setup problem
_CRASH_MARKERS = ("Uncaught Python exception", "ERROR: libFuzzer", "deadly signal", "Test unit written to")


def atheris_problem() -> str | None:
    """Why atheris cannot fuzz here, or None."""
    if importlib.util.find_spec("atheris") is None:
        return "atheris is not installed (pip install atheris, or the 'fuzz' extra)"
    probe = subprocess.run(
        [sys.executable, "-c", "import atheris; atheris.instrument_imports"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return f"atheris does not load on this platform ({lines[-1] if lines else probe.returncode})"
    return None


def run_one(name: str, seconds: int, rss_limit_mb: int, seed: int = 0) -> tuple[bool, str]:
    """(crashed, summary) for one harness run."""
    corpus = HERE / "corpus" / name
    crashes = HERE / "crashes" / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(HERE / f"fuzz_{name}.py"),
        str(corpus),
        str(HERE / "seeds" / name),
        f"-max_total_time={seconds}",
        f"-rss_limit_mb={rss_limit_mb}",
        # a small file that keeps the reader busy this long would freeze the viewer: a finding too
        "-timeout=60",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
    ]
    if seed:
        command.append(f"-seed={seed}")  # the same mutations every run: CI repeats, it does not explore
    dictionary = HERE / "dicts" / f"{name}.dict"
    if dictionary.is_file():  # tokens the mutator may splice in (NaN, Infinity, field names...)
        command.append(f"-dict={dictionary}")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    output = result.stdout + result.stderr
    elapsed = time.monotonic() - started
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
    summary = f"{name}: {elapsed:.0f} s, {runs[-1] if runs else '?'} executions"
    if result.returncode == 0:
        return False, summary
    written = re.findall(r"Test unit written to (\S+)", output)
    crashed = bool(written) or any(marker in output for marker in _CRASH_MARKERS)
    # libFuzzer's verdict (an uncaught exception, out-of-memory, a timeout, a signal)
    verdict = [ln for ln in output.splitlines() if "ERROR: libFuzzer" in ln or ln.startswith("SUMMARY")]
    if written:
        # libFuzzer's log interleaves the traceback with its own lines: replay the input for a clean one
        replay = subprocess.run(
            [sys.executable, str(HERE / f"fuzz_{name}.py"), "--replay", written[0]],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        )
        output = replay.stdout + replay.stderr
    # native backtraces (a Rust panic, a signal) are hundreds of frame lines: keep the Python ones
    lines = [
        line
        for line in output.strip().splitlines()
        if not re.match(r"\s+(\d+: |at )", line) and not line.startswith("INFO: Instrumenting")
    ]
    detail = "\n".join(verdict + lines[-30:])
    where = f"; crash input: {', '.join(written)}" if written else ""
    kind = "CRASH" if crashed else f"harness failed to run (exit {result.returncode})"
    return True, f"{summary}: {kind}{where}\n{detail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("harnesses", nargs="*", help=f"some of {', '.join(HARNESSES)} (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness (default 60)")
    parser.add_argument("--rss-limit-mb", type=int, default=3072)
    parser.add_argument(
        "--seed", type=int, default=0, help="libFuzzer's random seed; 0 (default) picks a new one each run"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.harnesses) - set(HARNESSES))
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(HARNESSES)}")
    problem = atheris_problem()
    if problem:
        print(f"fuzzing skipped: {problem}")
        return 0
    failed = []
    for name in args.harnesses or HARNESSES:
        crashed, summary = run_one(name, args.seconds, args.rss_limit_mb, args.seed)
        print(summary, flush=True)
        if crashed:
            failed.append(name)
    if failed:
        print(f"fuzzing found problems in: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
