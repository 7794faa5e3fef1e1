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
    timer.stop()
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
