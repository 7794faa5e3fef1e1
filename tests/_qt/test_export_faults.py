"""Exports under faults (issue 16): a full disk, a folder that is not writable, the target
replaced by a folder, a crash between writing and renaming, two exports at once. Each time the
previous file stays intact and readable, the message names the path, the edits stay in the layer."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from napari_wscovid._widgets import detection
from napari_wscovid._widgets import layers as L
from napari_wscovid.io.boxes_io import load_boxes
from tests._qt.conftest import as_plugin_sees_it


@pytest.fixture
def dock(viewer, ct_layer, qtbot, errors, fake_pipeline):
    w = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
    qtbot.addWidget(w)
    w._run_btn.click()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    return w


def _previous(tmp_path, dock):
    """A good export, then one more box in the layer: the edit the failed export must not lose."""
    path = dock._export_boxes(tmp_path / "session.boxes.json")
    before = path.read_bytes()
    layer = dock._viewer.layers[L.BOXES_LAYER]
    layer.add_rectangles([[[2, 1, 1], [2, 1, 4], [2, 4, 4], [2, 4, 1]]])
    return path, before, layer.nshapes


def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".session")] == []


@pytest.mark.parametrize(
    "fault",
    ["disk_full", "crash_before_rename"],
)
def test_a_failed_export_keeps_the_previous_file_and_the_edits(dock, tmp_path, errors, monkeypatch, fault):
    path, before, n_boxes = _previous(tmp_path, dock)
    if fault == "disk_full":

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("pathlib.Path.write_text", full)
    else:

        def crash(src, dst):  # the process dies between the write and the rename
            raise OSError(errno.EIO, "killed")

        monkeypatch.setattr(os, "replace", crash)
    assert dock._export_boxes(path, overwrite=True) is None
    monkeypatch.undo()
    assert path.read_bytes() == before and load_boxes(path)[0]  # intact and readable
    assert errors and str(path) in errors[-1] and "still in the layer" in errors[-1]
    assert dock._viewer.layers[L.BOXES_LAYER].nshapes == n_boxes  # the edit is still there
    assert _no_temporaries(tmp_path)


def test_a_folder_that_is_not_writable(dock, tmp_path, errors, monkeypatch):
    """Built by refusing the temporary file (root may write into a read-only folder)."""
    import napari_wscovid.io.atomic as atomic

    path, before, n_boxes = _previous(tmp_path, dock)

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refused)
    assert dock._export_boxes(path, overwrite=True) is None
    monkeypatch.undo()
    assert path.read_bytes() == before and str(path) in errors[-1] and "Permission denied" in errors[-1]
    assert dock._viewer.layers[L.BOXES_LAYER].nshapes == n_boxes


def test_the_target_replaced_by_a_folder(dock, tmp_path, errors):
    target = tmp_path / "boxes.json"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    assert dock._export_boxes(target, overwrite=True) is None
    assert (target / "keep.txt").read_text() == "not ours" and "boxes.json" in errors[-1]
    assert dock._viewer.layers[L.BOXES_LAYER].nshapes > 0


def test_two_exports_at_once_leave_one_whole_file(dock, tmp_path, errors):
    path, _, n_boxes = _previous(tmp_path, dock)
    written = []

    def export():
        written.append(dock._export_boxes(path, overwrite=True))

    threads = [threading.Thread(target=export) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(w == path for w in written), errors
    data = json.loads(path.read_text())  # one whole file, not an interleaving
    boxes, _ = load_boxes(path)
    assert len([b for b in boxes if b.origin != "rejected"]) == n_boxes and data["boxes"]
    assert _no_temporaries(tmp_path)


def test_edits_are_autosaved_and_offered_back_after_a_crash(
    viewer, ct_layer, small_volume, qtbot, errors, fake_pipeline, monkeypatch
):
    """Edits reach the CT's autosave within a second; the CT opened again in a new session (a new
    dock, the old boxes layer gone) offers them back, and accepting restores them all."""
    from qtpy.QtWidgets import QMessageBox

    from napari_wscovid._reader import ct_layer_data
    from napari_wscovid.io.boxes_io import autosave_path

    first = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
    qtbot.addWidget(first)
    first._autosave_timer.setInterval(50)
    first._run_btn.click()
    qtbot.waitUntil(lambda: first._worker is None, timeout=10000)
    layer = viewer.layers[L.BOXES_LAYER]
    layer.add_rectangles([[[2, 1, 1], [2, 1, 4], [2, 4, 4], [2, 4, 1]]])
    layer.selected_data = {0}
    layer.remove_selected()  # an annotator's deletion must survive too
    edited = sorted((b.slice, b.y0, b.x0, b.y1, b.x1, b.origin) for b in L.layer_boxes(layer))
    path = autosave_path(small_volume.series_key)
    qtbot.waitUntil(lambda: path.is_file() and len(load_boxes(path)[0]) >= len(edited), timeout=5000)

    # the crash: everything gone; a new session opens the same CT
    viewer.layers.clear()
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.Yes)
    second = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
    qtbot.addWidget(second)
    data, kwargs, _ = ct_layer_data(small_volume)
    viewer.add_image(data, **kwargs)
    qtbot.waitUntil(lambda: L.BOXES_LAYER in [la.name for la in viewer.layers], timeout=5000)
    restored = viewer.layers[L.BOXES_LAYER]
    assert len(asked) == 1
    assert sorted((b.slice, b.y0, b.x0, b.y1, b.x1, b.origin) for b in L.layer_boxes(restored)) == edited
    assert L.layer_rejected(restored), "the deletion came back as a rejected box"
    assert errors == []


def test_runs_without_edits_leave_no_autosave_to_offer(
    viewer, ct_layer, small_volume, qtbot, errors, fake_pipeline
):
    """Only the annotator's changes are autosaved: detection's own boxes, on the first run or a
    re-run, are not an edit to restore (the question would come on every reopening)."""
    from napari_wscovid.io.boxes_io import autosave_path

    dock = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
    qtbot.addWidget(dock)
    dock._autosave_timer.setInterval(20)
    for _ in range(2):
        dock._run_btn.click()
        qtbot.waitUntil(lambda: dock._worker is None, timeout=10000)
        qtbot.wait(200)
    path = autosave_path(small_volume.series_key)
    assert not path.exists()
    dock._go_to_slice(5)
    dock._on_reviewed_toggled(True)  # a reviewed mark is an annotator's decision too
    qtbot.waitUntil(lambda: path.exists() and 5 in load_boxes(path)[1]["reviewed_slices"], timeout=5000)
    path.unlink()
    layer = viewer.layers[L.BOXES_LAYER]
    layer.selected_data = {0}
    layer.remove_selected()
    qtbot.waitUntil(path.exists, timeout=5000)
    assert errors == []


def test_edits_on_another_cts_boxes_go_to_that_cts_autosave(
    viewer, ct_layer, small_volume, qtbot, errors, fake_pipeline, tmp_path
):
    """The dock shows CT A's result; an annotator edits the boxes of CT B, opened afterwards with
    its boxes file. B's edit reaches B's autosave (it went to A's before: lost in a crash)."""
    import numpy as np

    from napari_wscovid._reader import ct_layer_data, read_boxes
    from napari_wscovid.io.boxes_io import autosave_path, save_boxes
    from napari_wscovid.io.volume import CTVolume
    from napari_wscovid.results import Box

    dock = detection.DetectionWidget(as_plugin_sees_it(viewer), detect_iter=fake_pipeline.detect_iter)
    qtbot.addWidget(dock)
    dock._autosave_timer.setInterval(50)
    dock._run_btn.click()
    qtbot.waitUntil(lambda: dock._worker is None, timeout=10000)
    other = CTVolume(hu=np.zeros((6, 30, 30), np.int16), spacing=(3.0, 0.9, 0.9), origin=(10.0, 0.0, 0.0))
    data, kwargs, _ = ct_layer_data(other)
    viewer.add_image(data, **kwargs)
    path = save_boxes(
        tmp_path / "b.boxes.json",
        [Box(2, 3, 3, 9, 9, "CAP", 0.7, origin="edited")],
        other.geometry(),
        series_key=other.series_key,
    )
    boxes_data, boxes_kwargs, _ = read_boxes(str(path))[0]
    layer = viewer.add_shapes(boxes_data, **{**boxes_kwargs, "name": "boxes of B"})
    qtbot.wait(100)
    layer.add_rectangles([[[4, 1, 1], [4, 1, 6], [4, 6, 6], [4, 6, 1]]])  # the annotator's edit
    saved = autosave_path(other.series_key)
    qtbot.waitUntil(saved.is_file, timeout=5000)
    assert len(load_boxes(saved)[0]) == 2
    assert not autosave_path(small_volume.series_key).exists()  # A was not edited
    assert errors == []


def test_a_csv_export_keeps_the_reviewed_marks_in_the_autosave_and_says_so(
    dock, small_volume, tmp_path, qtbot, monkeypatch
):
    """A CSV holds boxes only: exporting one must not delete the autosave, the only file that
    still holds the slices marked reviewed, and the user is told where the marks are."""
    from napari_wscovid.io.boxes_io import autosave_path

    warned = []
    monkeypatch.setattr(detection, "show_warning", warned.append)
    dock._autosave_timer.setInterval(20)
    dock._go_to_slice(3)
    dock._on_reviewed_toggled(True)
    saved = autosave_path(small_volume.series_key)
    qtbot.waitUntil(lambda: saved.is_file() and load_boxes(saved)[1]["reviewed_slices"] == [3], timeout=5000)
    written = dock._export_boxes(tmp_path / "reading.csv")
    assert written is not None and load_boxes(written)[1]["reviewed_slices"] == []
    assert saved.is_file() and load_boxes(saved)[1]["reviewed_slices"] == [3]
    assert len(warned) == 1 and "1 slice(s) marked reviewed are not in it" in warned[0]
    dock._export_boxes(tmp_path / "reading.boxes.json")  # JSON holds them: the autosave goes
    assert not saved.exists()
