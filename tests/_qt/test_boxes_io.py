"""Box export / import: format, round trip, atomic and never-silent saving (cases 32-36, 38)."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from napari_wscovid.io import atomic, boxes_io
from napari_wscovid.io.boxes_io import COLUMNS, load_boxes, save_boxes
from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box


@pytest.fixture
def oblique_volume() -> CTVolume:
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return CTVolume(
        hu=np.zeros((6, 30, 40), np.int16),
        spacing=(2.5, 0.7031249, 0.7031249),
        origin=(-312.123456, -171.3, 12.0),
        direction=direction,
    )


def _boxes():
    return [
        Box(3, 4, 5, 10, 17, "COVID-19", 0.8734159265358979, 42.123456789, "detected", "joint"),
        Box(0, 0, 0, 1, 1, "CAP", 0.1, 0.49, "edited", "conv4"),
        Box(5, 20, 30, 30, 40, "COVID-19", math.nan, 49.4, "added", "user"),
    ]


@pytest.mark.parametrize("suffix", [".boxes.json", ".csv"])
def test_round_trip_is_exact(tmp_path, oblique_volume, suffix):
    geometry = oblique_volume.geometry()
    path = save_boxes(tmp_path / f"b{suffix}", _boxes(), geometry, series_key="ct-abc", classes=("NP", "CAP"))
    boxes, meta = load_boxes(path, expected_geometry=geometry)
    for a, b in zip(_boxes(), boxes, strict=True):
        da, db = a.as_dict(), b.as_dict()
        if math.isnan(da["score"]):
            assert math.isnan(db.pop("score"))
            da.pop("score")
        assert da == db
    # mm columns read back bit-identical to what box_corners_mm computes
    rows = (
        json.loads(path.read_text())["boxes"]
        if suffix.endswith("json")
        else [dict(zip(COLUMNS, line.split(","), strict=True)) for line in path.read_text().splitlines()[1:]]
    )
    for box, row in zip(boxes, rows, strict=True):
        for key, value in boxes_io.box_corners_mm(box, geometry).items():
            assert float(row[key]) == value
    if suffix.endswith("json"):
        assert meta["series_key"] == "ct-abc" and meta["geometry"] == boxes_io._plain_geometry(geometry)


def test_mm_corners_are_voxel_edges(small_volume):
    box = Box(2, 4, 6, 10, 16, "CAP", 0.5)
    mm = boxes_io.box_corners_mm(box, small_volume.geometry())
    c0 = small_volume.index_to_world([2, 3.5, 5.5])
    c1 = small_volume.index_to_world([2, 9.5, 15.5])
    assert (mm["z_mm"], mm["y0_mm"], mm["x0_mm"]) == pytest.approx(tuple(c0))
    assert (mm["y1_mm"], mm["x1_mm"]) == pytest.approx(tuple(c1[1:]))
    # the mm box spans exactly (y1 - y0) x (x1 - x0) voxels
    assert (mm["y1_mm"] - mm["y0_mm"]) == pytest.approx(6 * 0.75)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_empty_export_is_a_valid_file(tmp_path, small_volume, suffix):
    path = save_boxes(tmp_path / f"empty{suffix}", [], small_volume.geometry())
    if suffix == ".csv":
        assert path.read_text().strip() == ",".join(COLUMNS)
    else:
        assert json.loads(path.read_text())["boxes"] == []
    assert load_boxes(path, expected_geometry=small_volume.geometry())[0] == []


def test_no_silent_overwrite_and_backup(tmp_path, small_volume):
    g = small_volume.geometry()
    path = save_boxes(tmp_path / "b.boxes.json", _boxes()[:1], g)
    first = path.read_text()
    with pytest.raises(FileExistsError):
        save_boxes(path, [], g)
    assert path.read_text() == first
    save_boxes(path, [], g, overwrite=True)
    backups = list(tmp_path.glob("b.boxes.*.bak.json"))
    assert len(backups) == 1 and backups[0].read_text() == first
    assert load_boxes(path)[0] == []
    save_boxes(path, _boxes()[:2], g, overwrite=True)  # a second backup within the same second
    assert len(list(tmp_path.glob("b.boxes.*.bak.json"))) == 2


def test_crash_during_replace_keeps_previous_file(tmp_path, small_volume, monkeypatch):
    g = small_volume.geometry()
    path = save_boxes(tmp_path / "b.csv", _boxes(), g)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_boxes(path, [], g, overwrite=True)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temporary file left behind


def test_read_only_folder_keeps_previous_file(tmp_path, small_volume, monkeypatch):
    g = small_volume.geometry()
    path = save_boxes(tmp_path / "b.json", _boxes(), g)
    before = path.read_bytes()
    if os.name == "nt" or os.geteuid() == 0:
        # root ignores folder permissions: simulate the refusal the OS would give.
        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(tmp_path))

        monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError):
            save_boxes(path, [], g, overwrite=True)
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert path.read_bytes() == before


def test_geometry_mismatch_is_refused_naming_both(tmp_path, small_volume):
    path = save_boxes(tmp_path / "b.json", _boxes()[:1], small_volume.geometry())
    other = CTVolume(hu=small_volume.hu, spacing=(5.0, 0.75, 0.8), origin=(-40.0, -90.5, -120.25))
    with pytest.raises(ValueError, match="different geometry") as info:
        load_boxes(path, expected_geometry=other.geometry())
    assert "-100.5" in str(info.value) and "-90.5" in str(info.value)
    csv_path = save_boxes(tmp_path / "b.csv", _boxes()[:1], small_volume.geometry())
    with pytest.raises(ValueError, match="different geometry"):
        load_boxes(csv_path, expected_geometry=other.geometry())


def test_bad_files_are_refused_clearly(tmp_path, small_volume):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a napari-wscovid-boxes file"):
        load_boxes(bad)
    path = save_boxes(tmp_path / "v.json", [], small_volume.geometry())
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version 99"):
        load_boxes(path)


def test_no_patient_identifiers_in_export(tmp_path, small_volume):
    doc = json.loads(
        save_boxes(tmp_path / "b.json", _boxes(), small_volume.geometry(), series_key="ct-1").read_text()
    )
    assert set(doc) == {
        "format", "version", "series_key", "geometry", "model", "classes", "reviewed_slices", "boxes"
    }  # fmt: skip
    assert set(doc["boxes"][0]) == set(COLUMNS)


def test_rectangles_round_trip_to_voxels(small_volume):
    boxes = _boxes()
    rects = boxes_io.boxes_to_rectangles(boxes)
    back = boxes_io.rectangles_to_boxes(
        rects,
        {"class": [b.class_name for b in boxes], "area_mm2": [b.area_mm2 for b in boxes]},
        small_volume.geometry(),
    )
    assert [(b.slice, b.y0, b.x0, b.y1, b.x1) for b in back] == [
        (b.slice, b.y0, b.x0, b.y1, b.x1) for b in boxes
    ]
    # a sloppily dragged rectangle snaps to the nearest voxel edges and stays inside the grid
    assert boxes_io.rectangle_to_voxels(
        [[2.2, 3.4, -3], [2.2, 3.4, 60], [2.2, 9.6, 60], [2.2, 9.6, -3]], small_volume.shape
    ) == (2, 4, 0, 10, 48)


def test_huge_box_file_is_refused_from_its_size(tmp_path):
    """A 1 GB file is refused from its size before anything is read (hand-edited entries:
    tests/io/test_boxes_hand_edited.py)."""
    huge = tmp_path / "huge.boxes.json"
    with open(huge, "wb") as fh:
        fh.write(b'{"format": "napari-wscovid-boxes"')
    os.truncate(huge, 2**30)  # sparse: no gigabyte is written
    with pytest.raises(ValueError, match="huge.boxes.json is 1024 MiB"):
        load_boxes(huge)
