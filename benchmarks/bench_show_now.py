"""How long "Show now" takes to answer: from the click to the result on screen, in the real dock.

The dock runs a detection on the bundled sample with default settings (saliency on the positive
slices, integrated-gradient steps chosen per slice). Once ``--after`` slices are explained the
benchmark presses "Show now" and times the click to the end of the run (result layers added),
and how long the worker took to hand the result back. Run it alone on the machine::

    xvfb-run -a python benchmarks/bench_show_now.py --model default --runs 2
"""

from __future__ import annotations

import argparse
import re
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--after", type=int, default=2, help="slices explained before the click")
    args = parser.parse_args(argv)
    from _dock import sample_viewer_with_dock
    from qtpy.QtWidgets import QApplication

    viewer, dock = sample_viewer_with_dock(args.model, "positive")
    returned: list[float] = []
    dock_done = dock._on_detection_done

    def on_done(result):  # the worker's result reaches the GUI thread
        returned.append(time.perf_counter())
        dock_done(result)

    dock._on_detection_done = on_done
    explained = re.compile(r"Explaining slices.*\((\d+)/(\d+)\)")
    print(f"model {args.model}, sample 64 x 256 x 256, 'Show now' after {args.after} explained slices")
    print(
        "| run | seconds to the click | click to result in GUI thread (ms) | click to layers shown (ms) "
        "| slices explained | slices left |\n|---|---|---|---|---|---|"
    )
    for run in range(args.runs):
        returned.clear()
        start = time.perf_counter()
        dock._run_btn.click()  # the worker's "returned" goes to on_done (read at each run)
        clicked = None
        while dock._worker is not None:
            QApplication.processEvents()
            time.sleep(0.005)
            match = explained.search(dock._status.text())
            if clicked is None and match and int(match.group(1)) >= args.after:
                clicked = time.perf_counter()
                dock._show_now_btn.click()
        end = time.perf_counter()
        result = dock._result
        if clicked is None or result is None:
            print(f"| {run + 1} | run ended after {end - start:.1f} s before {args.after} slices | | | | |")
            continue
        to_result = 1000 * (returned[0] - clicked) if returned else float("nan")
        print(
            f"| {run + 1} | {clicked - start:.1f} | {to_result:.0f} | {1000 * (end - clicked):.0f} "
            f"| {len(result.saliency_slices)} | {len(result.unexplained_slices)} |"
        )
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
