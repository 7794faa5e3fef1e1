"""A radiologist's long reading session with the real pipeline (tiny-test network, small phantom):
runs cancelled at random points, a second CT opened mid-run, the dock and the viewer closed
mid-run. Nothing crashes, nothing is half-shown, threads and memory come back (issue 16)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import psutil
import pytest
from qtpy.QtCore import QThreadPool

from napari_wscovid._widgets import detection
from napari_wscovid._widgets import layers as L
from tests._qt.conftest import as_plugin_sees_it

RUNS = 30
EXPECTED_LAYERS = {L.LUNG_LAYER, *map(L.cam_layer_name, L.SALIENCY_LEVELS),
                   *map(L.ig_layer_name, L.SALIENCY_LEVELS), L.JOINT_LAYER}  # fmt: skip


@pytest.fixture(scope="module")
def phantoms():
    from napari_wscovid.phantom import make_phantom

    return (make_phantom("COVID-19", n_slices=20, size=96, seed=1),
            make_phantom("CAP", n_slices=16, size=80, seed=2))  # fmt: skip


def _add_ct(viewer, volume, name):
    from napari_wscovid._reader import ct_layer_data

    data, kwargs, _ = ct_layer_data(volume)
    return viewer.add_image(data, **{**kwargs, "name": name})


class CountingPipeline:
    """The real ``detect_iter`` (tiny-test network, classical lungs), counting its reports."""

    def __init__(self):
        from napari_wscovid.pipeline import detect_iter

        self._detect_iter, self.reports = detect_iter, 0

    def __call__(self, volume, **kwargs):
        self.reports = 0
        kwargs.update(model="tiny-test", lung_method="classical", device="cpu")
        generator = self._detect_iter(volume, **kwargs)
        while True:
            try:
                update = next(generator)
            except StopIteration as stop:
                return stop.value
            self.reports += 1
            yield update


@pytest.fixture
def session(viewer, qtbot, errors, phantoms):
    pipeline = CountingPipeline()
    ct = _add_ct(viewer, phantoms[0].volume, "chest A")
    widget = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=pipeline)
    qtbot.addWidget(widget)
    widget._ct_combo.setCurrentText("chest A")
    yield widget, pipeline, ct
    if widget._worker is not None:
        widget._on_cancel_clicked()
        qtbot.waitUntil(lambda: widget._worker is None, timeout=20000)


def python_threads() -> int:
    """Threads started from Python (the lung step's); Qt's pooled worker threads show up as
    dummy threads while the pool keeps them, so they are counted by the pool instead."""
    return sum(not isinstance(t, threading._DummyThread) for t in threading.enumerate())


def _settled(qtbot, widget, threads_before):
    """The run is over, its threads are gone."""
    qtbot.waitUntil(lambda: widget._worker is None, timeout=30000)
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=10000)
    qtbot.waitUntil(lambda: python_threads() <= threads_before, timeout=10000)


def _result_layers(viewer):
    """The maps and the lung mask (the boxes layer is checked apart)."""
    return {
        la.name: la
        for la in viewer.layers
        if la.metadata.get("wscovid_result") and not la.metadata.get("wscovid_boxes")
    }


def _assert_whole_result_on(viewer, volume):
    shown = _result_layers(viewer)
    assert set(shown) == EXPECTED_LAYERS, sorted(shown)  # all of a run's layers, never a part
    for layer in shown.values():
        assert layer.data.shape == volume.shape, layer.name
        assert L.geometries_equal(layer.metadata["wscovid_geometry"], volume.geometry()), layer.name
    boxes = [la for la in viewer.layers if la.metadata.get("wscovid_boxes")]
    assert len(boxes) == 1
    assert L.geometries_equal(boxes[0].metadata["wscovid_geometry"], volume.geometry())


def test_thirty_runs_cancelled_at_random_points_leave_no_trace(session, viewer, qtbot, errors, phantoms):
    widget, pipeline, _ = session
    volume = phantoms[0].volume
    threads_before = python_threads()
    rng = np.random.default_rng(16)
    finished = cancelled = 0
    for run in range(RUNS):
        # cancel after a random number of progress reports (lungs, classification, saliency),
        # or let the run finish
        cancel_after = int(rng.integers(0, 15)) if rng.random() < 0.6 else None
        had_result = bool(_result_layers(viewer))
        widget._run_btn.click()
        if cancel_after is not None:
            reached = lambda k=cancel_after: pipeline.reports >= k or widget._worker is None  # noqa: E731
            qtbot.waitUntil(reached, timeout=30000)
            widget._cancel_btn.click()
        _settled(qtbot, widget, threads_before)
        assert errors == [], (run, errors)
        assert widget._run_btn.isEnabled() and not widget._cancel_btn.isEnabled()
        if widget._run_succeeded:
            finished += 1
            assert widget._progress.value() == widget._progress.maximum()
        else:
            cancelled += 1
            assert "Cancelled" in widget._status.text()
        if widget._run_succeeded or had_result:
            _assert_whole_result_on(viewer, volume)  # the latest whole result, untouched by a cancel
        else:
            assert not _result_layers(viewer)
    assert finished >= 5 and cancelled >= 5, (finished, cancelled)


def test_memory_is_flat_over_ten_full_runs(session, viewer, qtbot, errors):
    widget, _, _ = session
    threads_before = python_threads()
    process = psutil.Process()
    rss = []
    for _ in range(10):
        widget._run_btn.click()
        _settled(qtbot, widget, threads_before)
        assert widget._run_succeeded and errors == []
        gc.collect()
        rss.append(process.memory_info().rss)
    print("RSS MiB after each run:", [round(r / 2**20) for r in rss])
    assert rss[-1] <= 1.10 * rss[0], [f"{r / 2**20:.0f} MiB" for r in rss]


def test_a_ct_opened_and_chosen_mid_run_does_not_get_the_result(session, viewer, qtbot, errors, phantoms):
    widget, pipeline, _ = session
    widget._run_btn.click()
    qtbot.waitUntil(lambda: pipeline.reports >= 1, timeout=30000)
    _add_ct(viewer, phantoms[1].volume, "chest B")  # opened while chest A is analysed
    widget._ct_combo.setCurrentText("chest B")
    _settled(qtbot, widget, python_threads() + 2)
    assert widget._run_succeeded and errors == []
    _assert_whole_result_on(viewer, phantoms[0].volume)  # chest A's grid, never chest B's
    assert widget._ct_combo.currentText() == "chest B"  # the user's choice is left alone


def test_closing_the_ct_mid_run_discards_the_result_cleanly(session, viewer, qtbot, errors, monkeypatch):
    widget, pipeline, ct = session
    warnings = []
    monkeypatch.setattr(detection, "show_warning", warnings.append)
    widget._run_btn.click()
    qtbot.waitUntil(lambda: pipeline.reports >= 2, timeout=30000)
    viewer.layers.clear()  # what closing the viewer's layers (or the CT) does to the run
    _settled(qtbot, widget, python_threads() + 2)
    assert errors == [] and not list(viewer.layers)
    assert any("closed" in w for w in warnings) or not widget._run_succeeded


@pytest.mark.parametrize("how", ["closed", "taken out of the window"])
def test_closing_the_dock_mid_run_stops_the_run(session, viewer, qtbot, errors, how):
    from qtpy.QtWidgets import QWidget

    widget, pipeline, _ = session
    window = QWidget()  # stands in for napari's dock
    qtbot.addWidget(window)
    if how != "closed":
        widget.setParent(window)
    threads_before = python_threads()
    widget._run_btn.click()
    qtbot.waitUntil(lambda: pipeline.reports >= 2, timeout=30000)
    if how == "closed":
        widget.close()
    else:
        widget.setParent(None)  # what napari's remove_dock_widget does
    qtbot.waitUntil(lambda: widget._worker is None, timeout=30000)
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=30000)
    qtbot.waitUntil(lambda: python_threads() <= threads_before, timeout=10000)
    assert errors == [] and pipeline.reports < 14  # stopped, not run to the end
    assert not _result_layers(viewer)  # a closed dock does not paint layers afterwards
    viewer.layers.clear()  # and no longer listens to the viewer
    viewer.dims.ndisplay = 3


def test_a_dock_deleted_with_the_viewer_mid_run_stops_quietly(viewer, qtbot, errors, phantoms):
    from qtpy.QtWidgets import QWidget

    pipeline = CountingPipeline()
    _add_ct(viewer, phantoms[0].volume, "chest A")
    window = QWidget()
    widget = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=pipeline)
    widget.setParent(window)
    widget._ct_combo.setCurrentText("chest A")
    widget._run_btn.click()
    qtbot.waitUntil(lambda: pipeline.reports >= 2, timeout=30000)
    window.deleteLater()  # the main window and its docks go; the worker still runs
    qtbot.waitUntil(lambda: not detection._qt_alive(widget), timeout=5000)
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=30000)
    assert errors == [] and pipeline.reports < 14 and not _result_layers(viewer)
