"""How responsive the viewer stays while detection runs: the longest Qt event-loop stall.

A 10 ms QTimer ticks in the GUI thread while the dock runs a detection (worker thread) on the
bundled sample; the longest gap between two ticks is the longest time the viewer could not
repaint or take a click. The result layers are added in the GUI thread, by design, and count. Run it
alone on the machine::

    QT_QPA_PLATFORM=offscreen python benchmarks/bench_ui_stall.py --model default --runs 3
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--saliency", default="positive", help="positive, all, current or none")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="sample the GUI thread's stack during stalls and print where the time went",
    )
    args = parser.parse_args(argv)
    from _dock import sample_viewer_with_dock
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer, dock = sample_viewer_with_dock(args.model, args.saliency)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    tracer = StallTracer(ticks) if args.trace else None
    print(f"model {args.model}, saliency {args.saliency}, sample 64 x 256 x 256")
    print(
        "| run | seconds | longest stall (ms) | 99th percentile gap (ms) | stalls over 100 ms "
        "(summed ms) |\n|---|---|---|---|---|"
    )
    for run in range(args.runs):
        ticks.clear()
        start = time.perf_counter()
        dock._on_run_clicked()
        while dock._worker is not None:  # the result layers are added before the worker ends
            QApplication.processEvents()
            time.sleep(0.002)
        seconds = time.perf_counter() - start
        for _ in range(50):  # and whatever the new layers still draw
            QApplication.processEvents()
            time.sleep(0.002)
        gaps = sorted(b - a for a, b in zip(ticks, ticks[1:], strict=False)) or [0.0]
        p99 = gaps[int(0.99 * (len(gaps) - 1))]
        long_gaps = [g for g in gaps if g > 0.1]
        print(
            f"| {run + 1} | {seconds:.1f} | {1000 * gaps[-1]:.0f} | {1000 * p99:.0f} | "
            f"{len(long_gaps)} ({1000 * sum(long_gaps):.0f}) |"
        )
        if tracer is not None:
            tracer.report_and_clear()
    if tracer is not None:
        tracer.stop()
    timer.stop()
    # The floor no plugin can go under: napari adding one more image layer of the sample's shape
    # (its vispy node, its layer controls, the viewer's dims), which a first run does per map.
    import numpy as np
    from napari.layers import Image

    adds = []
    for i in range(3):
        layer = Image(np.zeros((64, 256, 256), np.uint8), name=f"bench blank {i}", contrast_limits=(0, 255))
        start = time.perf_counter()
        viewer.add_layer(layer)
        adds.append(1000 * (time.perf_counter() - start))
        QApplication.processEvents()
    print(f"napari's add_layer of one blank 64 x 256 x 256 image, alone: {min(adds):.0f}-{max(adds):.0f} ms")
    viewer.close()
    return 0


class StallTracer:
    """Samples every thread's stack every 10 ms, and after each run shows those samples that fall
    inside the GUI timer's long gaps.

    A sampler that could not run for a while (its own wake-ups more than 30 ms apart) means one
    thread held the interpreter lock meanwhile; the stacks just before and after say which.
    """

    def __init__(self, ticks: list[float]):
        import threading

        self._ticks, self._trace = ticks, []
        self._main = threading.main_thread().ident
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import threading

        own = threading.get_ident()
        while not self._stopped.wait(0.01):
            self._trace.append((time.perf_counter(), self._stacks(own)))

    def _name(self, ident: int) -> str:
        return "GUI" if ident == self._main else f"thread {ident % 10000}"

    @staticmethod
    def _stacks(own: int) -> dict[int, str]:
        import sys
        import traceback

        out = {}
        for ident, frame in sys._current_frames().items():
            if ident == own:
                continue
            stack = [
                f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                for f in traceback.extract_stack(frame)
                if "site-packages" in f.filename or "napari_wscovid" in f.filename
            ]
            out[ident] = " <- ".join(reversed(stack[-3:])) or "(no Python frame)"
        return out

    def report_and_clear(self, longer_than: float = 0.08) -> None:
        ticks, trace = list(self._ticks), list(self._trace)
        gaps = [(a, b) for a, b in zip(ticks, ticks[1:], strict=False) if b - a > longer_than]
        for a, b in gaps:
            print(f"  GUI timer gap of {1000 * (b - a):.0f} ms; samples inside it (ms from its start):")
            previous = None
            for t, stacks in trace:
                if a - 0.02 <= t <= b + 0.02:
                    held = previous is not None and t - previous > 0.03
                    mark = f" (sampler blocked {1000 * (t - previous):.0f} ms)" if held else ""
                    print(f"    {1000 * (t - a):5.0f}{mark}")
                    for ident, stack in stacks.items():
                        print(f"        [{self._name(ident)}] {stack}")
                previous = t
        self._trace.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


if __name__ == "__main__":
    raise SystemExit(main())
