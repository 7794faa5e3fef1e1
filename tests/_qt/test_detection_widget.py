"""The detection widget, driven through its handlers with a fake (or the real) pipeline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_wscovid._widgets import detection
from napari_wscovid._widgets import layers as L
from napari_wscovid.io.boxes_io import boxes_to_rectangles, load_boxes
from napari_wscovid.results import Box
from tests._qt.conftest import as_plugin_sees_it

RESULT_LAYERS = {
    "lung mask",
    "CAM conv3",
    "CAM conv4",
    "CAM conv5",
    "IG conv3",
    "IG conv4",
    "IG conv5",
    "joint saliency",
    "lesion boxes",
}


@pytest.fixture
def widget(viewer, ct_layer, qtbot, errors, fake_pipeline):
    w = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
    qtbot.addWidget(w)
    yield w
    # never leave a worker running into the next test
    if w._worker is not None:
        w._on_cancel_clicked()
        qtbot.waitUntil(lambda: w._worker is None, timeout=5000)
    w._stop_slice_worker()


def run_and_wait(widget, qtbot, timeout=10000):
    widget._run_btn.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def names(viewer):
    return {layer.name for layer in viewer.layers}


def test_widget_construction_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        from qtpy.QtWidgets import QApplication
        app = QApplication([])
        from napari.components import ViewerModel
        from napari_wscovid._widgets import DetectionWidget
        w = DetectionWidget(ViewerModel())
        assert w._model_combo.count() >= 2
        print("torch" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_run_builds_layers_and_panel(widget, viewer, ct_layer, fake_pipeline, fake_result, errors, qtbot):
    widget._min_area.setValue(35.0)
    widget._ig_steps.setValue(8)
    widget._model_combo.setCurrentText("tiny-test")
    assert widget._lung_combo.currentData() == "hybrid"  # the default lung method
    widget._lung_combo.setCurrentIndex(widget._lung_combo.findData("classical"))
    run_and_wait(widget, qtbot)
    assert errors == []
    assert fake_pipeline.calls == [
        {
            "model": "tiny-test",
            "lung_method": "classical",
            "device": "auto",
            "saliency": "positive",
            "ig_steps": 8,
            "min_box_area_mm2": 35.0,
            "shape": ct_layer.data.shape,
        }
    ]
    assert RESULT_LAYERS <= names(viewer)
    for name in RESULT_LAYERS:
        np.testing.assert_allclose(viewer.layers[name].scale, ct_layer.scale)
        np.testing.assert_allclose(viewer.layers[name].translate, ct_layer.translate)
    boxes = viewer.layers["lesion boxes"]
    assert boxes.nshapes == len(fake_result.boxes)
    assert widget._results._summary.text().count("Device: cpu") == 1
    assert widget._progress.value() == widget._progress.maximum() > 0  # a finished run shows a full bar
    assert "Model: fake 0" in widget._results._summary.text()  # the real name and version
    assert "Research software" in widget._results._notice.text()
    assert "Involvement" in widget._results._summary.toolTip()
    assert viewer.layers["lung mask"].contour == L.LUNG_CONTOUR  # an outline: the fill hid density
    # the shown map says what its colours mean; hidden ones keep napari's default (no bar)
    assert viewer.layers["joint saliency"].colorbar.visible
    assert not viewer.layers["IG conv3"].colorbar.visible
    assert "COVID-19" in widget._results._summary.text() and "12.5 %" in widget._results._summary.text()
    assert widget._results._table.rowCount() == 3
    assert [b.score for b in widget._results.boxes] == sorted(
        (b.score for b in fake_result.boxes), reverse=True
    )
    assert widget._run_btn.isEnabled() and not widget._cancel_btn.isEnabled()


def test_cancel_mid_run_leaves_no_layers(widget, viewer, fake_pipeline, qtbot):
    fake_pipeline.steps, fake_pipeline.delay = 200, 0.02
    before = names(viewer)
    widget._run_btn.click()
    qtbot.waitUntil(lambda: widget._progress.maximum() == 200, timeout=5000)
    assert widget._cancel_btn.isEnabled()
    widget._cancel_btn.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=5000)
    assert names(viewer) == before
    assert "Cancelled" in widget._status.text()
    assert widget._result is None


def test_error_shows_reason_and_no_layers(widget, viewer, fake_pipeline, qtbot, errors):
    fake_pipeline.error = RuntimeError("weights file is corrupt")
    before = names(viewer)
    run_and_wait(widget, qtbot)
    assert names(viewer) == before
    assert len(errors) == 1 and "weights file is corrupt" in errors[0]


def test_run_without_ct_is_refused(viewer, qtbot, errors):
    w = detection.DetectionWidget(as_plugin_sees_it(viewer))
    qtbot.addWidget(w)
    w._on_run_clicked()
    assert errors and "CT" in errors[0] and w._worker is None


def test_edit_export_reimport_and_rerun_keeps_edit(
    widget, viewer, ct_layer, small_volume, fake_pipeline, qtbot, tmp_path, errors
):
    run_and_wait(widget, qtbot)
    boxes = viewer.layers["lesion boxes"]
    data = [v.copy() for v in boxes.data]
    data[0][:, 1:] += 2.0  # drag the top box 2 voxels down and right
    boxes.data = data
    assert boxes.features["origin"][0] == "edited"
    new = data[1].copy()
    new[:, 0] = 6
    boxes.add_rectangles([new])
    assert boxes.features["origin"].iloc[-1] == "added"
    assert widget._results._table.rowCount() == 4

    path = widget._export_boxes(tmp_path / "ct.boxes.json")
    assert path is not None and errors == []
    assert widget._export_boxes(tmp_path / "ct.boxes.json") is None  # never silently overwritten
    assert "already exists" in errors.pop()
    csv_path = widget._export_boxes(tmp_path / "ct.csv")
    exported = L.layer_boxes(boxes)

    saved, meta = load_boxes(path, expected_geometry=small_volume.geometry())
    assert meta["series_key"] == small_volume.series_key
    # the moved detection's original place travels as a rejected row (a re-run must not restore it)
    assert [b.origin for b in saved] == ["edited", "detected", "detected", "added", "rejected"]
    # re-import through the reader: identical voxels, mm and features
    from napari_wscovid._reader import get_reader

    ((data2, kwargs2, type2),) = get_reader(str(path))(str(path))
    assert type2 == "shapes"
    np.testing.assert_array_equal(np.array(data2), np.array([np.asarray(v) for v in boxes_rects(exported)]))
    for col in ("class", "slice", "origin", "source", "area_mm2"):
        assert list(kwargs2["features"][col]) == list(boxes.features[col]), col
    np.testing.assert_array_equal(kwargs2["features"]["score"], boxes.features["score"])
    np.testing.assert_allclose(kwargs2["scale"], ct_layer.scale)
    np.testing.assert_allclose(kwargs2["translate"], ct_layer.translate)
    json_rows = json.loads(path.read_text())["boxes"]
    csv_lines = csv_path.read_text().splitlines()
    assert len(csv_lines) == 1 + len(json_rows)
    assert [float(x) for x in csv_lines[1].split(",")[5:10]] == [
        json_rows[0][k] for k in ("z_mm", "y0_mm", "x0_mm", "y1_mm", "x1_mm")
    ]

    # re-run: the edited and the added box survive, detections are refreshed
    run_and_wait(widget, qtbot)
    after = L.layer_boxes(viewer.layers["lesion boxes"])
    kept = [b for b in after if b.origin != "detected"]
    assert [b.as_dict() for b in kept if b.origin == "edited"] == [exported[0].as_dict()]
    assert sum(b.origin == "added" for b in after) == 1
    # the detection the user corrected is not duplicated under the edited box
    assert len(after) == 4
    assert len([la for la in viewer.layers if la.name.startswith("lesion boxes")]) == 1


def boxes_rects(boxes):
    from napari_wscovid.io.boxes_io import boxes_to_rectangles

    return boxes_to_rectangles(boxes)


def test_import_on_other_geometry_is_refused(widget, viewer, ct_layer, small_volume, tmp_path, errors):
    from napari_wscovid.io.boxes_io import save_boxes

    other = dict(small_volume.geometry(), spacing=[2.5, 0.75, 0.8])
    path = save_boxes(tmp_path / "o.boxes.json", [Box(1, 1, 1, 3, 3, "CAP", 0.5)], other)
    assert widget._import_boxes(path) is False
    assert "different geometry" in errors[0] and "2.5" in errors[0] and "5.0" in errors[0]
    assert "lesion boxes" not in names(viewer)
    good = save_boxes(tmp_path / "g.boxes.json", [Box(1, 1, 1, 3, 3, "CAP", 0.5)], small_volume.geometry())
    assert widget._import_boxes(good) is True
    assert viewer.layers["lesion boxes"].nshapes == 1


def test_plot_and_box_list_navigate(widget, viewer, ct_layer, fake_pipeline, qtbot):
    run_and_wait(widget, qtbot)
    widget._go_to_slice(5)
    assert widget._current_slice() == 5
    box = widget._results.boxes[0]
    widget._results._on_cell_clicked(0, 0)
    assert widget._current_slice() == box.slice
    centre = ct_layer.data_to_world((box.slice, (box.y0 + box.y1 - 1) / 2, (box.x0 + box.x1 - 1) / 2))
    np.testing.assert_allclose(detection._camera(viewer).center[-2:], centre[-2:])
    plot = widget._results._plot
    plot.resize(200, 90)
    assert plot.slice_at(6) == 0 and plot.slice_at(194) == plot.n_slices - 1


def fake_slice_explanation(calls: list, seconds: float = 0.0):
    """Stands in for the on-demand explanation: maps of 200 and one box on the slice, each call
    recorded in ``calls``, taking ``seconds``."""

    def explain(volume, result, slices, **kwargs):
        calls.append(list(slices))
        yield 0, 1, "explaining"
        time.sleep(seconds)
        n, (ny, nx) = len(slices), volume.shape[1:]
        maps = {k: np.full((n, ny, nx), 200, np.uint8) for k in ("conv3", "conv4", "conv5", "joint")}
        return {"saliency": maps, "boxes": [Box(slices[0], 2, 2, 6, 6, "COVID-19", 0.7)]}

    return explain


def test_current_slice_scope_explains_on_demand(
    widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot, monkeypatch
):
    calls = []
    widget._explain_more = fake_slice_explanation(calls)
    fake_pipeline.result = type(fake_result)(
        **{**fake_result.__dict__, "saliency": {}, "boxes": [], "saliency_slices": ()}
    )
    widget._scope_combo.setCurrentIndex([v for _, v in detection.SALIENCY_SCOPES].index("current"))
    widget._go_to_slice(4)
    run_and_wait(widget, qtbot)
    assert fake_pipeline.calls[-1]["saliency"] == "none"
    qtbot.waitUntil(lambda: 4 in widget._explained, timeout=5000)
    joint = viewer.layers["joint saliency"]
    assert joint.data[4].max() == 200 and joint.data[3].max() == 0
    assert [b.slice for b in L.layer_boxes(viewer.layers["lesion boxes"])] == [4]
    widget._go_to_slice(6)
    qtbot.waitUntil(lambda: 6 in widget._explained, timeout=5000)
    widget._go_to_slice(4)  # cached: not computed again
    qtbot.wait(400)
    assert calls == [[4], [6]]
    # the slices explained on demand are part of the result the dock exports (a SEG's lesion region)
    assert widget._result.saliency_slices == (4, 6) and widget._result.saliency["joint"][6].max() == 200


def test_show_now_shows_at_once_and_explains_the_rest_in_the_background(
    widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot
):
    """ "Show now" sets the signal the run was given. A result that left slices unexplained is
    shown with saliency layers (empty there) and says so; the slices left are then explained in
    the background, most abnormal first, and join the result (panel, explained slices)."""
    import dataclasses

    from napari_wscovid.stages import abnormality

    calls = []
    widget._explain_more = fake_slice_explanation(calls)
    fake_pipeline.steps, fake_pipeline.delay = 100, 0.02
    fake_pipeline.result = dataclasses.replace(
        fake_result,
        saliency={},
        boxes=[],
        saliency_slices=(),
        unexplained_slices=(3, 5),
        involvement={"total_percent": 0.0},
    )
    widget._go_to_slice(0)  # not one of those left: the background order alone decides
    assert not widget._show_now_btn.isEnabled()
    widget._run_btn.click()
    qtbot.waitUntil(lambda: widget._progress.maximum() == 100, timeout=5000)
    assert widget._show_now_btn.isEnabled()
    widget._show_now_btn.click()
    assert fake_pipeline.stop_explaining.is_set() and not widget._show_now_btn.isEnabled()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10000)
    assert "at least 0.0 % of lung (2 slices not explained)" in widget._results._summary.text()
    qtbot.waitUntil(lambda: {3, 5} <= widget._explained, timeout=10000)
    score = abnormality(fake_result.slice_probs[[3, 5]], fake_result.classes)
    assert calls == [[3], [5]] if score[0] >= score[1] else [[5], [3]]
    joint = viewer.layers["joint saliency"]
    assert joint.data[3].max() == 200 and joint.data[5].max() == 200 and joint.data[4].max() == 0
    assert sorted(b.slice for b in L.layer_boxes(viewer.layers["lesion boxes"])) == [3, 5]
    result = widget._result
    assert result.unexplained_slices == () and result.saliency_slices == (3, 5)
    assert result.saliency["joint"][5].max() == 200  # what a DICOM SEG export reads
    assert "Involvement: " in widget._results._summary.text()
    assert "at least" not in widget._results._summary.text()
    assert "Every slice the run left is explained now." in widget._status.text()
    # a run on "current slice only" explains on its own: nothing to stop early
    widget._scope_combo.setCurrentIndex([v for _, v in detection.SALIENCY_SCOPES].index("current"))
    widget._run_btn.click()
    assert not widget._show_now_btn.isEnabled()
    widget._cancel_btn.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=5000)


def test_cancel_stops_the_background_explanation_and_the_slice_in_view_still_gets_one(
    widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot
):
    import dataclasses

    calls = []
    widget._explain_more = fake_slice_explanation(calls, seconds=0.5)
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, boxes=[], saliency_slices=(), unexplained_slices=(3, 5, 6)
    )
    widget._go_to_slice(0)
    run_and_wait(widget, qtbot)
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=5000)
    assert widget._cancel_btn.isEnabled()  # it stops the background work
    widget._cancel_btn.click()
    assert "Stopped explaining the slices left" in widget._status.text()
    qtbot.wait(1200)
    assert len(calls) == 1 and not widget._cancel_btn.isEnabled()
    left = next(z for z in (3, 5, 6) if [z] not in calls)
    widget._go_to_slice(left)  # on demand still
    qtbot.waitUntil(lambda: left in widget._explained, timeout=5000)
    assert calls[-1] == [left] and len(calls) == 2


def test_a_dock_closed_during_the_background_explanation_paints_nothing_afterwards(
    widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot
):
    import dataclasses

    calls = []
    widget._explain_more = fake_slice_explanation(calls, seconds=0.5)
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, boxes=[], saliency_slices=(), unexplained_slices=(3, 5)
    )
    widget._go_to_slice(0)
    run_and_wait(widget, qtbot)
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=5000)
    widget.close()
    qtbot.wait(1500)
    assert viewer.layers["joint saliency"].data.max() == 0 and calls == [calls[0]]
    assert not L.layer_boxes(viewer.layers["lesion boxes"])


def test_real_pipeline_tiny_model(viewer, qtbot, errors):
    from napari_wscovid._reader import ct_layer_data
    from napari_wscovid.phantom import make_phantom

    phantom = make_phantom("COVID-19", n_slices=12, size=96, seed=1)
    data, kwargs, _ = ct_layer_data(phantom.volume)
    ct = viewer.add_image(data, **kwargs)
    w = detection.DetectionWidget(as_plugin_sees_it(viewer))
    qtbot.addWidget(w)
    w._model_combo.setCurrentText("tiny-test")
    w._device_combo.setCurrentIndex(1)  # CPU
    w._ig_steps.setValue(4)
    # every lung slice: "positive slices" explains none when the tiny network calls the patient NP
    w._scope_combo.setCurrentIndex([v for _, v in detection.SALIENCY_SCOPES].index("all"))
    run_and_wait(w, qtbot, timeout=60000)
    assert errors == []
    assert {"lung mask", "joint saliency", "lesion boxes"} <= names(viewer)
    np.testing.assert_allclose(viewer.layers["joint saliency"].scale, ct.scale)
    assert w._results._summary.text().count("Device: cpu") == 1
    assert not math.isnan(float(w._result.patient_probs.sum()))
    assert all(
        0 <= b.slice < 12 and b.origin == "detected" for b in L.layer_boxes(viewer.layers["lesion boxes"])
    )

    # "current slice only": no saliency in the run, then the slice in view on demand
    w._scope_combo.setCurrentIndex([v for _, v in detection.SALIENCY_SCOPES].index("current"))
    lung_slice = int(np.argmax(phantom.lung_mask.reshape(12, -1).sum(1)))
    w._go_to_slice(lung_slice)
    run_and_wait(w, qtbot, timeout=60000)
    qtbot.waitUntil(lambda: lung_slice in w._explained, timeout=60000)
    assert errors == []
    # (the tiny random network's joint map can be all zero on a slice; its per-level maps are not)
    assert viewer.layers["IG conv5"].data[lung_slice].max() > 0
    assert all(viewer.layers["IG conv5"].data[z].max() == 0 for z in range(12) if z != lung_slice)


def test_a_run_that_explained_nothing_says_why(widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot):
    import dataclasses

    note = "No lesion boxes: the patient is called NP. Choose 'all slices' to see the saliency anyway."
    fake_pipeline.result = dataclasses.replace(
        fake_result, saliency={}, boxes=[], saliency_slices=(), explain_note=note
    )
    run_and_wait(widget, qtbot)
    assert note in widget._results._summary.text()
    assert "joint saliency" not in names(viewer)


def test_fecnn_result_shows_its_map_and_lesion_types(
    widget, viewer, ct_layer, small_volume, fake_pipeline, errors, qtbot
):
    """A result of Wu et al.'s method: its Grad-CAM++ map and typed lesion points, no IG layers."""
    import dataclasses

    from napari_wscovid.results import Lesion
    from tests._qt.conftest import make_fake_result

    base = make_fake_result(small_volume)
    lesions = [
        Lesion(slice=2, y=10, x=10, area_mm2=30.0, activation=0.9, cluster=0, soft_scores=(0.8, 0.2)),
        Lesion(slice=4, y=20, x=30, area_mm2=50.0, activation=0.7, cluster=1, soft_scores=(0.3, 0.7)),
    ]
    result = dataclasses.replace(
        base,
        classes=("NP", "COVID-19"),
        slice_probs=base.slice_probs[:, :2] / base.slice_probs[:, :2].sum(1, keepdims=True),
        patient_probs=np.array([0.2, 0.8], np.float32),
        cams={"gradcam++": base.cams["conv3"]},
        saliency={},
        boxes=[dataclasses.replace(b, source="gradcam++") for b in base.boxes],
        lesions=lesions,
        lesion_types={"k": 2, "names": ["GGO-like", "consolidation-like"]},
        model_info={"name": "fecnn-tiny", "version": "t", "sha256": None, "architecture": "fecnn-wu2021"},
    )
    fake_pipeline.result = result
    run_and_wait(widget, qtbot)
    assert errors == []
    shown = names(viewer)
    assert L.cam_layer_name("gradcam++") in shown and viewer.layers[L.cam_layer_name("gradcam++")].visible
    assert not any(name.startswith("IG ") for name in shown)
    points = [layer for layer in viewer.layers if layer.__class__.__name__ == "Points"]
    assert len(points) == 1 and len(points[0].data) == 2
    world = points[0].data_to_world(points[0].data[1])
    np.testing.assert_allclose(world, ct_layer.data_to_world((4, 20, 30)), atol=1e-6)
    assert list(points[0].features["type"]) == ["GGO-like", "consolidation-like"]


# ---------------------------------------------------------------- a reading session (issue 18)


def _correct(viewer):
    """Delete the detection on slice 2, move the one on slice 3 away, draw one on slice 6."""
    layer = viewer.layers[L.BOXES_LAYER]
    assert sorted(b.slice for b in L.layer_boxes(layer)) == [2, 3, 4]
    layer.selected_data = {0}
    layer.remove_selected()
    data = [v.copy() for v in layer.data]
    data[0][:, 2] += 20  # now index 0 is slice 3's box: 20 columns to the right
    layer.data = data
    drawn = boxes_to_rectangles([Box(6, 20, 20, 26, 30, "COVID-19", 0.5)])[0]
    layer.add_rectangles([drawn])


def _session(viewer):
    return sorted((b.slice, b.origin, b.x0) for b in L.layer_boxes(viewer.layers[L.BOXES_LAYER]))


EXPECTED = [(3, "edited", 25), (4, "detected", 5), (6, "added", 20)]


def test_rerun_respects_deleted_moved_and_added_boxes(widget, viewer, ct_layer, qtbot, errors):
    run_and_wait(widget, qtbot)
    _correct(viewer)
    rejected = L.layer_rejected(viewer.layers[L.BOXES_LAYER])
    assert sorted((b.slice, b.x0, b.origin) for b in rejected) == [(2, 5, "rejected"), (3, 5, "rejected")]
    # the annotator's boxes look different from the model's: thicker edges
    layer = viewer.layers[L.BOXES_LAYER]
    widths = dict(zip(layer.features["origin"], layer.edge_width, strict=True))
    assert widths == {
        "edited": L.USER_EDGE_WIDTH,
        "detected": L.DETECTED_EDGE_WIDTH,
        "added": L.USER_EDGE_WIDTH,
    }
    assert L.USER_EDGE_WIDTH > L.DETECTED_EDGE_WIDTH
    assert widget._results._table.horizontalHeaderItem(2).text() == "slice P(class)"
    run_and_wait(widget, qtbot)  # the same three detections come again
    assert errors == []
    # the deleted one stays deleted, the moved one is there once (the annotator's copy)
    assert _session(viewer) == EXPECTED
    assert "0 new box(es); 2 of yours kept; 2 detection(s) not shown again" in widget._status.text()
    run_and_wait(widget, qtbot)  # and again: nothing piles up
    assert _session(viewer) == EXPECTED
    assert len(L.layer_rejected(viewer.layers[L.BOXES_LAYER])) == 2


def test_corrections_survive_export_and_reimport(widget, viewer, ct_layer, qtbot, errors, tmp_path):
    run_and_wait(widget, qtbot)
    _correct(viewer)
    path = widget._export_boxes(tmp_path / "session.boxes.json")
    rows = json.loads(path.read_text())["boxes"]
    assert sorted(r["origin"] for r in rows) == ["added", "detected", "edited", "rejected", "rejected"]
    viewer.layers.remove(L.BOXES_LAYER)  # a new session: the CT is open, the boxes are not
    assert widget._import_boxes(path)
    assert _session(viewer) == EXPECTED
    run_and_wait(widget, qtbot)
    assert errors == [] and _session(viewer) == EXPECTED


def test_merging_a_second_annotator_s_file_keeps_every_box_of_both(
    widget, viewer, ct_layer, small_volume, qtbot, errors, tmp_path, monkeypatch
):
    """Their box overlapping mine is their decision, not a detection mine corrects: both stay.
    The old detection on slice 2 that I deleted does not come back with their file."""
    from napari_wscovid.io.boxes_io import save_boxes

    run_and_wait(widget, qtbot)
    theirs = [
        Box(3, 12, 22, 22, 34, "CAP", 0.4, 1.0, "added", "user"),  # overlaps my moved box on slice 3
        Box(2, 10, 5, 20, 15, "COVID-19", 0.7, 1.0, "detected", "joint"),  # where I deleted one
    ]
    path = save_boxes(tmp_path / "second_reader.json", theirs, small_volume.geometry(), reviewed_slices=[5])
    _correct(viewer)
    monkeypatch.setattr(widget, "_ask_merge_or_replace", lambda n, m: "merge")
    assert widget._import_boxes(path)
    assert _session(viewer) == sorted([*EXPECTED, (3, "added", 22)])
    layer = viewer.layers[L.BOXES_LAYER]
    assert 5 in L.layer_reviewed(layer) and len(L.layer_rejected(layer)) == 2
    assert errors == []


def test_where_am_i_axes_and_slice_position_in_mm(widget, viewer, ct_layer, small_volume, qtbot):
    assert tuple(viewer.dims.axis_labels) == ("z", "y", "x")
    run_and_wait(widget, qtbot)
    assert all(tuple(la.axis_labels) == ("z", "y", "x") for la in viewer.layers)  # result layers too
    widget._go_to_slice(4)
    z_mm = small_volume.origin[0] + 4 * small_volume.spacing[0]
    qtbot.waitUntil(lambda: widget._position.text().startswith("Slice 4 of 7"), timeout=3000)
    assert f"z = {z_mm:.1f} mm" in widget._position.text()


def test_class_picker_sets_selected_boxes_and_survives_rerun_and_export(
    widget, viewer, ct_layer, small_volume, qtbot, errors, tmp_path
):
    run_and_wait(widget, qtbot)
    layer = viewer.layers[L.BOXES_LAYER]
    options = [widget._class_combo.itemText(i) for i in range(widget._class_combo.count())]
    assert options == ["NP", "CAP", "COVID-19", L.NOT_A_LESION]
    layer.selected_data = {1}
    widget._class_combo.setCurrentText(L.NOT_A_LESION)
    widget._class_btn.click()
    assert list(layer.features["class"]) == ["COVID-19", L.NOT_A_LESION, "COVID-19"]
    assert list(layer.features["origin"]) == ["detected", "edited", "detected"]
    run_and_wait(widget, qtbot)  # a re-run keeps the decision and does not re-add the detection
    after = L.layer_boxes(viewer.layers[L.BOXES_LAYER])
    assert sorted((b.slice, b.class_name) for b in after) == [
        (2, "COVID-19"),
        (3, L.NOT_A_LESION),
        (4, "COVID-19"),
    ]
    path = widget._export_boxes(tmp_path / "c.boxes.json")
    saved, _ = load_boxes(path, expected_geometry=small_volume.geometry())
    assert [b.class_name for b in saved if b.slice == 3] == [L.NOT_A_LESION]
    assert errors == []


def test_coronal_and_sagittal_views_are_head_up(widget, viewer, ct_layer):
    camera = detection._camera(viewer)
    assert (
        str(getattr(camera.orientation2d[0], "value", camera.orientation2d[0])) == "down"
    )  # axial: anterior up
    viewer.dims.order = (1, 0, 2)  # coronal: z is the vertical axis
    assert str(getattr(camera.orientation2d[0], "value", camera.orientation2d[0])) == "up"
    viewer.dims.order = (2, 0, 1)  # sagittal
    assert str(getattr(camera.orientation2d[0], "value", camera.orientation2d[0])) == "up"
    viewer.dims.order = (0, 1, 2)
    assert str(getattr(camera.orientation2d[0], "value", camera.orientation2d[0])) == "down"


def test_export_without_boxes_says_so_before_any_dialog(widget, monkeypatch):
    infos = []
    monkeypatch.setattr(detection, "show_info", infos.append)
    opened = []
    monkeypatch.setattr(
        detection.QFileDialog, "getSaveFileName", lambda *a, **k: opened.append(a) or ("", "")
    )
    widget._export_btn.click()
    assert opened == [] and "no lesion boxes to export" in infos[-1]


def test_slice_plot_has_a_legend_axes_and_an_explained_marker(widget, viewer, ct_layer, qtbot):
    run_and_wait(widget, qtbot)
    plot = widget._results._plot
    assert [name for name, _ in plot.legend_entries()] == ["NP", "CAP", "COVID-19"]
    assert len({color for _, color in plot.legend_entries()}) == 3
    assert "white line marks the slice in view" in plot.toolTip() and "0 to 1" in plot.toolTip()
    plot.resize(320, 120)
    image = plot.grab().toImage()  # paints the axes, legend and marker without error
    assert not image.isNull() and image.width() == plot.width()


def test_reviewed_slice_marks_survive_rerun_export_and_reimport(
    widget, viewer, ct_layer, qtbot, errors, tmp_path
):
    run_and_wait(widget, qtbot)
    for z in (3, 5):
        widget._go_to_slice(z)
        qtbot.waitUntil(lambda z=z: widget._position.text().startswith(f"Slice {z} "), timeout=3000)
        assert widget._reviewed_box.isEnabled() and not widget._reviewed_box.isChecked()
        widget._reviewed_box.setChecked(True)
    assert L.layer_reviewed(viewer.layers[L.BOXES_LAYER]) == [3, 5]
    run_and_wait(widget, qtbot)
    assert L.layer_reviewed(viewer.layers[L.BOXES_LAYER]) == [3, 5]
    path = widget._export_boxes(tmp_path / "r.boxes.json")
    assert json.loads(path.read_text())["reviewed_slices"] == [3, 5]
    viewer.layers.remove(L.BOXES_LAYER)
    assert widget._import_boxes(path)
    assert L.layer_reviewed(viewer.layers[L.BOXES_LAYER]) == [3, 5]
    widget._go_to_slice(5)
    qtbot.waitUntil(lambda: widget._reviewed_box.isChecked(), timeout=3000)
    assert errors == []


@pytest.mark.parametrize("choice", ["merge", "replace", "cancel"])
def test_import_onto_a_ct_with_boxes_asks_merge_or_replace(
    widget, viewer, ct_layer, small_volume, qtbot, errors, tmp_path, monkeypatch, choice
):
    from napari_wscovid.io.boxes_io import save_boxes

    run_and_wait(widget, qtbot)
    other = Box(6, 20, 20, 26, 30, "CAP", 0.4, 1.0, "added", "user")
    path = save_boxes(tmp_path / "other.json", [other], small_volume.geometry())
    asked = []
    monkeypatch.setattr(widget, "_ask_merge_or_replace", lambda n, m: asked.append((n, m)) or choice)
    assert widget._import_boxes(path) == (choice != "cancel")
    assert asked == [(3, 1)]
    layers = [la for la in viewer.layers if la.name.startswith(L.BOXES_LAYER)]
    assert len(layers) == 1  # never a pile of box layers
    slices = sorted(b.slice for b in L.layer_boxes(layers[0]))
    assert slices == {"merge": [2, 3, 4, 6], "replace": [6], "cancel": [2, 3, 4]}[choice]
    assert errors == []


def test_dock_follows_the_boxes_layer_whatever_its_name(widget, viewer, ct_layer, qtbot, errors):
    run_and_wait(widget, qtbot)
    layer = viewer.layers[L.BOXES_LAYER]
    layer.name = "my reading"
    layer.selected_data = {0}
    layer.remove_selected()  # a decision on the renamed layer
    run_and_wait(widget, qtbot)
    ours = [la for la in viewer.layers if la.metadata.get("wscovid_boxes")]
    assert [la.name for la in ours] == ["my reading"]  # no second layer, the name kept
    assert sorted(b.slice for b in L.layer_boxes(ours[0])) == [3, 4]  # the deletion respected
    assert widget._results._table.rowCount() == 2 and errors == []


def test_3d_view_shows_lung_surfaces_not_a_ct_slab(widget, viewer, ct_layer, qtbot):
    run_and_wait(widget, qtbot)
    lung = viewer.layers["lung mask"]
    viewer.dims.ndisplay = 3
    assert not ct_layer.visible and lung.visible and lung.contour == 0
    viewer.dims.ndisplay = 2
    assert ct_layer.visible and lung.contour == L.LUNG_CONTOUR


def test_table_marks_what_a_rerun_added(widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors):
    import dataclasses

    run_and_wait(widget, qtbot)
    extra = Box(5, 10, 30, 16, 40, "COVID-19", 0.55, 48.0)
    fake_pipeline.result = dataclasses.replace(fake_result, boxes=[*fake_result.boxes, extra])
    run_and_wait(widget, qtbot)
    table = widget._results._table
    origins = {int(table.item(r, 0).text()): table.item(r, 4).text() for r in range(table.rowCount())}
    assert origins == {2: "detected", 3: "detected", 4: "detected", 5: "detected (new)"}
    assert "1 new box(es)" in widget._status.text() and errors == []


def test_a_doubtful_scan_gets_a_banner_before_the_answer(
    widget, viewer, ct_layer, fake_pipeline, fake_result, qtbot, errors
):
    import dataclasses

    run_and_wait(widget, qtbot)
    assert widget._results._banner.isHidden()  # a clean scan: no banner
    flag = {"name": "slab", "severity": "severe", "value": 25.0, "message": "the scan covers only 25 mm"}
    fake_pipeline.result = dataclasses.replace(fake_result, status="needs_review", qc=[flag])
    run_and_wait(widget, qtbot)
    banner = widget._results._banner
    assert not banner.isHidden() and "Needs review" in banner.text() and "slab = 25.0" in banner.text()
    assert "scan may be why" in banner.text()
    # a clean scan whose answer is doubtful: the banner blames the answer, not the scan
    doubt = {"name": "low_confidence", "severity": "warn", "value": 0.41, "message": "below 0.50"}
    fake_pipeline.result = dataclasses.replace(fake_result, status="needs_review", qc=[doubt])
    run_and_wait(widget, qtbot)
    assert "answer on this scan is doubtful" in banner.text() and "low_confidence = 0.41" in banner.text()
    assert errors == []


def test_a_layer_holding_the_boxes_name_is_renamed_not_overwritten(widget, viewer, ct_layer, qtbot, errors):
    square = np.array([[2, 1, 1], [2, 1, 5], [2, 5, 5], [2, 5, 1]], dtype=float)
    theirs = viewer.add_shapes([square], shape_type="rectangle", name=L.BOXES_LAYER)  # not ours
    run_and_wait(widget, qtbot)
    assert theirs.name == f"{L.BOXES_LAYER} (not ours)" and len(theirs.data) == 1
    ours = viewer.layers[L.BOXES_LAYER]
    assert ours is not theirs and ours.metadata.get("wscovid_boxes") and errors == []
