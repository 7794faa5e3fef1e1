"""A hand-edited box file opened in napari (issue 16): the good boxes land, the viewer names the
skipped entries in a warning, and a box outside the CT never reaches the layer."""

from __future__ import annotations

import json

import pytest

from napari_wscovid import _reader
from napari_wscovid._widgets import detection
from napari_wscovid._widgets import layers as L
from napari_wscovid.io.boxes_io import save_boxes
from napari_wscovid.results import Box

BOXES = [Box(1, 2, 3, 6, 7, "CAP", 0.5), Box(2, 4, 4, 9, 10, "COVID-19", 0.9)]


@pytest.fixture
def warnings_shown(monkeypatch):
    shown: list[str] = []
    import napari.utils.notifications

    # the reader imports napari's show_warning when it needs it (it is imported without napari)
    monkeypatch.setattr(napari.utils.notifications, "show_warning", shown.append)
    monkeypatch.setattr(detection, "show_warning", shown.append)
    return shown


def _edited(tmp_path, small_volume, suffix):
    path = save_boxes(tmp_path / f"edited{suffix}", [*BOXES, BOXES[0], BOXES[0]], small_volume.geometry())
    if suffix == ".csv":
        header, *lines = path.read_text().splitlines()
        lines[2] = lines[2].replace("1,2,3,6,7,", "1,nan,3,6,7,", 1)
        lines[3] = lines[3].replace("1,2,3,6,7,", "99,2,3,6,7,", 1)
        path.write_text("\n".join([header, *lines]) + "\n")
    else:
        doc = json.loads(path.read_text())
        doc["boxes"][2]["y0"] = None
        doc["boxes"][3]["slice"] = 99
        path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("suffix", [".boxes.json", ".csv"])
def test_reader_opens_the_good_boxes_and_warns_about_the_rest(
    tmp_path, small_volume, viewer, monkeypatch, warnings_shown, suffix
):
    path = _edited(tmp_path, small_volume, suffix)
    monkeypatch.setattr(_reader, "_open_ct_geometries", lambda: [small_volume.geometry()])
    ((data, kwargs, _),) = _reader.get_reader(str(path))(str(path))
    layer = viewer.add_shapes(data, **kwargs)
    assert [(b.slice, b.y0, b.class_name) for b in L.layer_boxes(layer)] == [
        (1, 2, "CAP"),
        (2, 4, "COVID-19"),
    ]
    (message,) = warnings_shown
    first = "row 4" if suffix == ".csv" else "box 2"
    assert (
        message.startswith(f"edited{suffix}: 2 entries skipped ({first}: ")
        and "outside the CT grid" in message
    )


def test_dock_import_warns_about_skipped_entries(tmp_path, small_volume, viewer, ct_layer, qtbot, errors,
                                                 warnings_shown):  # fmt: skip
    dock = detection.DetectionWidget(viewer)
    qtbot.addWidget(dock)
    path = _edited(tmp_path, small_volume, ".boxes.json")
    assert dock._import_boxes(path) is True
    assert errors == [] and len(warnings_shown) == 1 and "2 entries skipped" in warnings_shown[0]
    layer = next(la for la in viewer.layers if la.name.startswith(L.BOXES_LAYER))
    assert layer.nshapes == 2
