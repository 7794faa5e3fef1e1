"""What the dock benchmarks share: napari with the bundled sample and the detection dock."""

from __future__ import annotations

import os
import tempfile


def sample_viewer_with_dock(model: str, scope: str):
    """A hidden viewer holding the bundled sample, and the dock set to ``model`` and ``scope``."""
    # this machine's own autosaves must not stop a run with a "restore?" question
    os.environ["WSCOVID_AUTOSAVE_DIR"] = tempfile.mkdtemp(prefix="wscovid-bench-autosave-")
    import napari

    viewer = napari.Viewer(show=False)
    viewer.open_sample("napari-wscovid", "covid_phantom")
    _, dock = viewer.window.add_plugin_dock_widget("napari-wscovid", "Run detection")
    dock._model_combo.setCurrentText(model)
    dock._scope_combo.setCurrentIndex(dock._scope_combo.findData(scope))
    return viewer, dock
