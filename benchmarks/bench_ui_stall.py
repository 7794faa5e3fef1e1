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
import tempfile
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
    # this machine's own autosaves must not stop the run with a "restore?" question
    os.environ["WSCOVID_AUTOSAVE_DIR"] = tempfile.mkdtemp(prefix="wscovid-bench-autosave-")

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=False)
    viewer.open_sample("napari-wscovid", "covid_phantom")
    _, dock = viewer.window.add_plugin_dock_widget("napari-wscovid", "Run detection")
    dock._model_combo.setCurrentText(args.model)
    dock._scope_combo.setCurrentIndex(dock._scope_combo.findData(args.saliency))
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    tracer = StallTracer(ticks) if args.trace else None
    print(f"model {args.model}, saliency {args.saliency}, sample 64 x 256 x 256")
    print("| run | seconds | longest stall (ms) | 99th percentile gap (ms) |\n|---|---|---|---|")
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
        print(f"| {run + 1} | {seconds:.1f} | {1000 * gaps[-1]:.0f} | {1000 * p99:.0f} |")
        if tracer is not None:
            tracer.report_and_clear()
    if tracer is not None:
        tracer.stop()
    timer.stop()
    viewer.close()
    return 0


class StallTracer:
    """Samples the GUI thread's stack every 10 ms while its timer is more than 40 ms late.

    A sample is taken only when this thread gets the interpreter lock, so a stall caused by
    another thread holding it (an import in the worker, say) shows up as few samples.
    """

    def __init__(self, ticks: list[float]):
        import threading

        self._ticks, self._samples = ticks, []
        self._main = threading.main_thread().ident
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import sys
        import threading
        import traceback

        while not self._stopped.wait(0.01):
            if not self._ticks or time.perf_counter() - self._ticks[-1] < 0.04:
                continue
            frames = sys._current_frames()
            for ident, frame in frames.items():
                if ident == threading.get_ident():
                    continue
                stack = [
                    f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                    for f in traceback.extract_stack(frame)
                    if "site-packages" in f.filename or "napari_wscovid" in f.filename
                ]
                thread = "GUI" if ident == self._main else "other"
                self._samples.append(f"[{thread}] " + " <- ".join(reversed(stack[-3:])))

    def report_and_clear(self) -> None:
        from collections import Counter

        print(f"  stall samples (10 ms each): {len(self._samples)}")
        for where, n in Counter(self._samples).most_common(10):
            print(f"  {10 * n:4d} ms  {where}")
        self._samples.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


if __name__ == "__main__":
    raise SystemExit(main())
