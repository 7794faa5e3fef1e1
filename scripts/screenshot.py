"""Screenshot of napari with the bundled sample, the joint saliency and the boxes.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py [--model M] [--out PNG] [--path CT]

Runs the detection through the dock widget exactly as a user would (a worker thread, then the
layers), waits for it, shows a slice with boxes and saves the whole window.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="registry name; default: the bundled default")
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot.png"))
    parser.add_argument("--scope", default="positive", help="saliency scope, as in the widget")
    parser.add_argument("--ig-steps", type=int, default=0, help="0: chosen per slice (the default)")
    parser.add_argument("--path", default=None, help="a CT to open instead of the bundled sample")
    args = parser.parse_args()
    # this machine's own autosaves of the sample must not stop the run with a "restore?" question
    os.environ["WSCOVID_AUTOSAVE_DIR"] = tempfile.mkdtemp(prefix="wscovid-screenshot-autosave-")

    viewer = napari.Viewer(title="napari-wscovid")
    viewer.window._qt_window.resize(1600, 1000)
    if args.path:
        viewer.open(args.path, plugin="napari-wscovid")
    else:
        viewer.open_sample("napari-wscovid", "covid_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("napari-wscovid", "Run detection")
    widget._model_combo.setCurrentText(args.model)
    widget._scope_combo.setCurrentIndex(widget._scope_combo.findData(args.scope))
    widget._ig_steps.setValue(args.ig_steps)
    widget._on_run_clicked()
    deadline = time.time() + 600
    while widget._worker is not None and time.time() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    boxes = [layer for layer in viewer.layers if layer.name == "lesion boxes"]
    if boxes and len(boxes[0].data):
        slices = [int(np.round(r[0, 0])) for r in boxes[0].data]
        shown = max(set(slices), key=slices.count)
        viewer.dims.set_current_step(0, shown)
        # an annotator's box beside the model's, to show the two styles
        layer = boxes[0]
        first = np.asarray(layer.data[slices.index(shown)], dtype=float).copy()
        first[:, 1:] += 12.0
        layer.add_rectangles([first])
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    # Toasts (e.g. napari's note about the Qt backend) would cover the canvas.
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    for _ in range(10):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.screenshot(args.out, canvas_only=False)
    print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
