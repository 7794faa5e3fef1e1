"""The dock against orderings a reading session meets: a slice whose explanation fails, a
background slice landing mid-drag, a re-run cancelled while the earlier result still has slices
left, the CT closed while its result is being shown, a second CT reopened after a crash."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from napari.utils._test_utils import read_only_mouse_event
from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

from napari_wscovid._widgets import detection
from napari_wscovid._widgets import layers as L
from napari_wscovid.results import Box
from tests._qt.conftest import as_plugin_sees_it


@pytest.fixture
def make_dock(viewer, qtbot, fake_pipeline):
    docks = []

    def make():
        dock = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
        qtbot.addWidget(dock)
        docks.append(dock)
        return dock

    yield make
    for dock in docks:  # no worker outlives its test
        if dock._worker is not None:
            dock._on_cancel_clicked()
            qtbot.waitUntil(lambda d=dock: d._worker is None, timeout=5000)
        dock._fill_left = False
        dock._slice_timer.stop()
        dock._stop_slice_worker()


def _run(dock, qtbot):
    dock._run_btn.click()
    qtbot.waitUntil(lambda: dock._worker is None, timeout=10000)


def _explainer(calls, seconds=0.05, fail=()):
    """An ``explain_more`` that records its calls, takes ``seconds``, and fails on ``fail``."""

    def explain(volume, result, slices, **kwargs):
        calls.append((list(slices), dict(kwargs)))
        yield 0, 1, "explaining"
        time.sleep(seconds)
        if slices[0] in fail:
            raise ValueError(f"cannot explain slice {slices[0]}")
        n, (ny, nx) = len(slices), volume.shape[1:]
        maps = {k: np.full((n, ny, nx), 200, np.uint8) for k in ("conv3", "conv4", "conv5", "joint")}
        return {"saliency": maps, "boxes": [Box(slices[0], 2, 2, 6, 6, "COVID-19", 0.7)]}

    return explain


@pytest.mark.parametrize("scope", ["slices left", "current"])
def test_a_slice_that_cannot_be_explained_is_said_once_not_retried(
    viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors, make_dock, scope
):
    """It was retried every 200 ms, each failure re-raised into the Qt event loop."""
    calls = []
    left = (3, 5) if scope == "slices left" else ()
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, boxes=[], saliency_slices=(), unexplained_slices=left
    )
    dock = make_dock()
    dock._explain_more = _explainer(calls, seconds=0.01, fail=(3, 4, 5))
    if scope == "current":
        dock._scope_combo.setCurrentIndex([v for _, v in detection.SALIENCY_SCOPES].index("current"))
        dock._go_to_slice(4)
    else:
        dock._go_to_slice(0)
    _run(dock, qtbot)
    qtbot.wait(1500)
    assert len(calls) == 1, [c[0] for c in calls]
    assert len(errors) == 1 and f"Could not explain slice {calls[0][0][0]}" in errors[0]
    if scope == "slices left":
        assert "no longer explained in the background" in errors[0] and not dock._fill_left
        other = ({3, 5} - {calls[0][0][0]}).pop()
        dock._go_to_slice(other)  # the reader stops on the other slice left: it is tried
        qtbot.waitUntil(lambda: len(calls) == 2, timeout=5000)
        assert calls[1][0] == [other]


def _mouse(kind, position):
    return read_only_mouse_event(
        type=kind,
        position=tuple(position),
        is_dragging=kind != "mouse_press",
        dims_displayed=[1, 2],
        view_direction=None,
    )


def test_a_box_moved_while_a_background_slice_lands_stays_moved_after_a_rerun(
    viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors, make_dock
):
    """The slice's boxes used to rebuild the layer mid-drag: the move was never recorded as the
    annotator's, and a re-run put the detection back where it had been."""
    calls = []
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, saliency_slices=(), unexplained_slices=(5, 6, 7)
    )
    dock = make_dock()
    dock._explain_more = _explainer(calls, seconds=0.4)
    dock._go_to_slice(2)
    _run(dock, qtbot)
    layer = viewer.layers[L.BOXES_LAYER]
    layer.mode = "select"
    start = np.asarray(layer.data_to_world((2, 10, 10)))
    step = np.asarray(layer.data_to_world((2, 10, 15))) - start  # 5 voxels to the right
    explained = len(dock._explained)
    mouse_press_callbacks(layer, _mouse("mouse_press", start))
    mouse_move_callbacks(layer, _mouse("mouse_move", start + step * 0.5))
    qtbot.waitUntil(lambda: len(dock._explained) > explained, timeout=5000)  # a slice lands mid-drag
    mouse_move_callbacks(layer, _mouse("mouse_move", start + step))
    mouse_release_callbacks(layer, _mouse("mouse_release", start + step))
    qtbot.waitUntil(lambda: any(b.slice == 5 for b in L.layer_boxes(layer)), timeout=5000)  # merged after
    dock._fill_left = False
    dock._stop_slice_worker()
    moved = [(b.slice, b.x0, b.origin) for b in L.layer_boxes(layer) if b.slice == 2]
    assert moved and moved[0][2] == "edited", moved
    assert any(b.slice == 2 for b in L.layer_rejected(layer))  # its old place is rejected
    _run(dock, qtbot)  # the same detections come again
    assert sorted((b.slice, b.x0, b.origin) for b in L.layer_boxes(layer) if b.slice == 2) == [moved[0]]
    assert errors == []


def test_a_cancelled_rerun_does_not_change_how_the_shown_result_is_explained(
    viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors, make_dock
):
    calls = []
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, boxes=[], saliency_slices=(), unexplained_slices=(3, 5, 6)
    )
    dock = make_dock()
    dock._explain_more = _explainer(calls, seconds=0.3)
    dock._model_combo.setCurrentText("default")
    dock._go_to_slice(0)
    _run(dock, qtbot)  # model "default", three slices left
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=5000)
    shown = dock._result
    dock._model_combo.setCurrentText("tiny-test")  # the reader tries another model, then cancels
    dock._ig_steps.setValue(64)
    fake_pipeline.steps, fake_pipeline.delay = 50, 0.05
    dock._run_btn.click()
    qtbot.wait(200)
    dock._cancel_btn.click()
    qtbot.waitUntil(lambda: dock._worker is None, timeout=5000)
    assert dock._result is shown
    dock._fill_left = True  # the cancel stopped the background work; the reader resumes it
    dock._slice_timer.start()
    qtbot.waitUntil(lambda: len(calls) >= 2, timeout=5000)
    assert all(c[1]["model"] == "default" and "ig_steps" not in c[1] for c in calls), calls


def test_the_ct_closed_while_its_result_is_shown_gets_no_result(
    viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors, make_dock, monkeypatch
):
    """Each display step takes 0.2-0.3 s in a real viewer; the CT closed between two of them left
    the result, and its background explanations, tied to a CT no longer open."""
    warned = []
    monkeypatch.setattr(detection, "show_warning", warned.append)
    monkeypatch.setattr(detection, "_SHOW_STEP_GAP_MS", 100)
    calls = []
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, saliency_slices=(), unexplained_slices=(3, 5, 6)
    )
    before = [la.name for la in viewer.layers]
    dock = make_dock()
    dock._explain_more = _explainer(calls)
    dock._run_btn.click()
    qtbot.waitUntil(lambda: L.LUNG_LAYER in [la.name for la in viewer.layers], timeout=5000)
    viewer.layers.remove(ct_layer)
    qtbot.waitUntil(lambda: dock._worker is None, timeout=10000)
    qtbot.wait(500)
    assert dock._result is None and calls == []
    assert [la.name for la in viewer.layers] == [n for n in before if n != ct_layer.name]
    assert len(warned) == 1 and "result was discarded" in warned[0]
    assert errors == []


def test_a_crash_autosave_is_offered_although_another_ct_has_a_result(
    viewer, ct_layer, fake_pipeline, qtbot, errors, make_dock, monkeypatch
):
    from qtpy.QtWidgets import QMessageBox

    from napari_wscovid._reader import ct_layer_data
    from napari_wscovid.io.boxes_io import write_autosave
    from napari_wscovid.io.volume import CTVolume

    rng = np.random.default_rng(5)
    other = CTVolume(
        hu=rng.integers(-1000, 100, size=(8, 40, 48)).astype(np.int16),
        spacing=(5.0, 0.75, 0.8),
        origin=(100.0, -100.5, -120.25),
        source="test",
    )
    write_autosave(
        other.series_key, [Box(3, 5, 5, 15, 15, "CAP", np.nan, 1.0, "added", "user")], other.geometry()
    )
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.Yes)
    dock = make_dock()
    _run(dock, qtbot)  # a result, and its boxes layer, on the first CT
    data, kwargs, _ = ct_layer_data(other)
    viewer.add_image(data, **kwargs)  # the other CT, reopened after the crash
    qtbot.waitUntil(lambda: len(asked) == 1, timeout=3000)
    restored = dock._boxes_layer(other.geometry())
    assert restored is not None and [(b.slice, b.origin) for b in L.layer_boxes(restored)] == [(3, "added")]
    assert errors == []


def test_cancel_while_the_finished_result_is_being_shown_completes_it(
    viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors, make_dock, monkeypatch
):
    """Stopping between display steps would leave some layers of this result and some of the
    last; the click says the run had finished, and the result is shown whole."""
    monkeypatch.setattr(detection, "_SHOW_STEP_GAP_MS", 100)
    dock = make_dock()
    dock._run_btn.click()
    qtbot.waitUntil(lambda: L.LUNG_LAYER in [la.name for la in viewer.layers], timeout=5000)
    assert dock._showing is not None
    dock._cancel_btn.click()
    assert dock._status.text().startswith("Detection had already finished")
    qtbot.waitUntil(lambda: dock._worker is None, timeout=10000)
    assert dock._result is not None and dock._status.text().startswith("Done in")
    assert len(L.layer_boxes(viewer.layers[L.BOXES_LAYER])) == len(fake_result.boxes)
    assert errors == []


def test_current_slice_only_says_its_involvement_is_partial(
    viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors, make_dock
):
    calls = []
    fake_pipeline.result = dataclasses.replace(fake_result, saliency={}, boxes=[], saliency_slices=())
    dock = make_dock()
    dock._explain_more = _explainer(calls)
    dock._scope_combo.setCurrentIndex([v for _, v in detection.SALIENCY_SCOPES].index("current"))
    dock._go_to_slice(4)
    _run(dock, qtbot)
    qtbot.waitUntil(lambda: len(calls) == 1 and 4 in dock._explained, timeout=5000)
    assert dock._result.involvement_partial
    assert "Involvement: at least" in dock._results._summary.text()


def test_a_result_that_fails_midway_on_screen_leaves_no_layer(
    viewer, ct_layer, fake_pipeline, qtbot, errors, make_dock, monkeypatch
):
    """Out of memory at the fourth layer left the lung mask and two CAMs behind, the status
    still "Done" beside the error."""
    before = [la.name for la in viewer.layers]
    real, calls = L.upsert_layer, []

    def fourth_fails(viewer_, data, kwargs, layer_type, **kw):
        calls.append(kwargs["name"])
        if len(calls) == 4:
            raise MemoryError("Unable to allocate 1.2 GiB for an array")
        return real(viewer_, data, kwargs, layer_type, **kw)

    monkeypatch.setattr(L, "upsert_layer", fourth_fails)
    dock = make_dock()
    _run(dock, qtbot)
    assert [la.name for la in viewer.layers] == before and dock._result is None
    assert len(errors) == 1 and "could not be shown" in errors[0]
    assert dock._status.text().startswith("Failed")


def test_the_users_own_layer_of_a_result_name_is_renamed_not_overwritten(
    viewer, ct_layer, qtbot, errors, make_dock
):
    painted = np.zeros(ct_layer.data.shape, np.uint8)
    painted[2, 5:20, 5:20] = 1
    mine = viewer.add_labels(painted.copy(), name=L.LUNG_LAYER, scale=ct_layer.scale)
    dock = make_dock()
    _run(dock, qtbot)
    assert mine in viewer.layers and mine.name == f"{L.LUNG_LAYER} (not ours)"
    np.testing.assert_array_equal(mine.data, painted)
    assert viewer.layers[L.LUNG_LAYER].metadata.get("wscovid_result") and errors == []
