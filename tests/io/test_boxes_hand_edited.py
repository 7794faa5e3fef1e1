"""Box files edited by hand (issue 16): a bad entry is skipped and named, a bad file is refused.

File-level problems (not this format, broken or other geometry, unreadable CSV) raise BoxFileError
naming the file; a box with a missing field, a NaN/inf corner, an empty extent or lying outside the
CT is left out, listed in ``meta["skipped"]`` with its index and reason, and logged once.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from napari_wscovid.io.boxes_io import (
    COLUMNS,
    BoxFileError,
    describe_skipped,
    load_boxes,
    save_boxes,
)
from napari_wscovid.results import Box

GEOMETRY = {
    "shape": [6, 20, 24],
    "spacing": [2.5, 0.75, 0.8],
    "origin": [-40.0, -100.5, -120.25],
    "direction": np.eye(3).tolist(),
}
BOXES = [
    Box(1, 2, 3, 6, 7, "CAP", 0.5, 10.0, "detected", "joint"),
    Box(2, 4, 4, 9, 10, "COVID-19", 0.9, 20.0, "edited", "conv4"),
    Box(3, 0, 0, 2, 2, "COVID-19", math.nan, 1.0, "added", "user"),
]


def _edited_json(tmp_path, edits: dict, name="edited.boxes.json"):
    """A file of BOXES plus one extra copy of box 0 per edit, each changed by ``edits[label]``."""
    path = save_boxes(tmp_path / "good.boxes.json", BOXES, GEOMETRY, overwrite=True)
    doc = json.loads(path.read_text())
    for change in edits.values():
        row = dict(doc["boxes"][0])
        doc["boxes"].append(change(row) or row)
    out = tmp_path / name
    # allow_nan: a hand edit can leave NaN or Infinity, which Python's json reads back
    out.write_text(json.dumps(doc, allow_nan=True))
    return out


def _set(key, value):
    return lambda row: row.__setitem__(key, value)


def _pop(key):
    def change(row):
        del row[key]

    return change


BAD_JSON_ENTRIES = {
    "nan corner": (_set("y0", float("nan")), "y0 is nan, not a whole number"),
    "inf corner": (_set("x1", float("inf")), "x1 is inf, not a whole number"),
    "fractional corner": (_set("y1", 6.5), "y1 is 6.5, not a whole number"),
    "nan mm corner": (_set("z_mm", float("nan")), "z_mm is nan, not a finite number"),
    "missing field": (_pop("x1"), "missing field x1"),
    "null field": (_set("class", None), "missing field class"),
    "outside the CT": (_set("slice", 6), "slice 6, y 2..6, x 3..7 lies outside the CT grid [6, 20, 24]"),
    "past the edge": (_set("x1", 25), "lies outside the CT grid"),
    "empty box": (_set("y1", 2), "empty box"),
    "unknown origin": (_set("origin", "guessed"), "origin is 'guessed'"),
    "class not a name": (_set("class", ["CAP"]), "class is ['CAP'], not a name"),
    # JSON's "\ud800" escape reads as a lone surrogate, which no UTF-8 export can write back
    "class not text": (_set("class", "\ud800"), "class is '\\ud800', not a name"),
    "score not a number": (_set("score", "high"), "score is 'high', not a number"),
    "a list, not an entry": (lambda row: [1, 2, 3], "not a box entry but list"),
}


def test_each_bad_json_entry_is_skipped_and_named(tmp_path, caplog):
    path = _edited_json(tmp_path, {k: change for k, (change, _) in BAD_JSON_ENTRIES.items()})
    with caplog.at_level(logging.WARNING):
        boxes, meta = load_boxes(path, expected_geometry=GEOMETRY)
    assert [b.as_dict() for b in boxes if not math.isnan(b.score)] == [b.as_dict() for b in BOXES[:2]]
    assert len(boxes) == 3  # the good ones, nothing else
    assert len(meta["skipped"]) == len(BAD_JSON_ENTRIES)
    for index, (label, (_, reason)) in enumerate(BAD_JSON_ENTRIES.items(), start=len(BOXES)):
        assert meta["skipped"][index - len(BOXES)].startswith(f"box {index}: "), label
        assert reason in meta["skipped"][index - len(BOXES)], label
    # one warning for the file, naming it and the count
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().startswith(f"edited.boxes.json: {len(BAD_JSON_ENTRIES)} entries skipped")


def test_unknown_extra_fields_are_ignored(tmp_path):
    path = save_boxes(tmp_path / "b.boxes.json", BOXES, GEOMETRY)
    doc = json.loads(path.read_text())
    doc["boxes"][0]["comment"] = "checked with Dr X"
    doc["reader_notes"] = {"any": "thing"}
    path.write_text(json.dumps(doc))
    boxes, meta = load_boxes(path)
    assert boxes[0] == BOXES[0] and len(boxes) == 3 and meta["skipped"] == []


def test_json_without_mm_columns_still_loads_from_its_voxels(tmp_path):
    path = save_boxes(tmp_path / "b.boxes.json", BOXES[:1], GEOMETRY)
    doc = json.loads(path.read_text())
    for key in ("z_mm", "y0_mm", "x0_mm", "y1_mm", "x1_mm", "score", "area_mm2", "origin", "source"):
        doc["boxes"][0].pop(key)
    path.write_text(json.dumps(doc))
    (box,), meta = load_boxes(path)
    assert (box.slice, box.y0, box.x0, box.y1, box.x1, box.class_name) == (1, 2, 3, 6, 7, "CAP")
    assert math.isnan(box.score) and box.origin == "detected" and meta["skipped"] == []


def test_bad_metadata_entries_are_ignored_and_named(tmp_path):
    path = save_boxes(tmp_path / "b.boxes.json", BOXES, GEOMETRY, reviewed_slices=[1, 2])
    doc = json.loads(path.read_text())
    doc["reviewed_slices"] = [1, 2, 99, -1, "3", True, [4]]
    doc["classes"] = "CAP"
    doc["model"] = ["wsnet"]
    path.write_text(json.dumps(doc))
    boxes, meta = load_boxes(path)
    assert len(boxes) == 3 and meta["reviewed_slices"] == [1, 2]
    assert meta["classes"] == [] and meta["model"] == {}
    assert len(meta["skipped"]) == 3
    assert any("'reviewed_slices' entries [99, -1, '3', True, [4]]" in s for s in meta["skipped"])
    assert any(s.startswith("'classes' is 'CAP'") for s in meta["skipped"])
    assert any(s.startswith("'model' is ['wsnet']") for s in meta["skipped"])


def test_model_fields_that_are_not_text_are_dropped_so_the_next_export_works(tmp_path):
    path = save_boxes(tmp_path / "b.boxes.json", BOXES, GEOMETRY, model={"name": "wsnet", "version": "2"})
    doc = json.loads(path.read_text())
    doc["model"]["version"] = float("nan")  # json.dumps(allow_nan=False) would refuse it on export
    path.write_text(json.dumps(doc, allow_nan=True))
    boxes, meta = load_boxes(path)
    assert meta["model"] == {"name": "wsnet", "sha256": ""}
    assert meta["skipped"] == ["'model' fields ['version'] are not text; ignored"]
    again = save_boxes(tmp_path / "again.boxes.json", boxes, GEOMETRY, model=meta["model"])
    assert load_boxes(again)[1]["model"]["name"] == "wsnet"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc.__setitem__("geometry", {**GEOMETRY, "spacing": [2.5, float("nan"), 0.8]}),
         "invalid CT geometry: spacing"),
        (lambda doc: doc.__setitem__("geometry", {**GEOMETRY, "shape": [6, 0, 24]}), "empty axis"),
        (lambda doc: doc.__setitem__("geometry", {**GEOMETRY, "shape": [float("inf"), 20, 24]}),
         "invalid CT geometry"),
        (lambda doc: doc.pop("geometry"), "invalid CT geometry"),
        (lambda doc: doc.__setitem__("boxes", {"0": {}}), "'boxes' must be a list"),
        (lambda doc: doc.__setitem__("version", True), "version True"),
        # napari would fail inverting it with a bare LinAlgError naming neither file nor reason
        (lambda doc: doc.__setitem__("geometry", {**GEOMETRY, "direction": [[0, 0, 0]] * 3}),
         "is singular"),
    ],
)  # fmt: skip
def test_file_level_problems_are_refused_naming_the_file(tmp_path, change, message):
    path = save_boxes(tmp_path / "b.boxes.json", BOXES, GEOMETRY)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, allow_nan=True))
    with pytest.raises(BoxFileError, match="b.boxes.json") as info:
        load_boxes(path)
    assert message in str(info.value)


def test_wrong_geometry_is_refused_naming_both(tmp_path):
    path = save_boxes(tmp_path / "b.boxes.json", BOXES, GEOMETRY)
    other = {**GEOMETRY, "spacing": [5.0, 0.75, 0.8]}
    with pytest.raises(BoxFileError, match="b.boxes.json.*different geometry") as info:
        load_boxes(path, expected_geometry=other)
    assert "2.5" in str(info.value) and "5.0" in str(info.value)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BoxFileError, match="deep.json"):
        load_boxes(path)


# ------------------------------------------------------------------------------------------ CSV
def _csv_rows(tmp_path):
    path = save_boxes(tmp_path / "good.csv", BOXES, GEOMETRY, overwrite=True)
    header, *rows = path.read_text().splitlines()
    return header, [dict(zip(COLUMNS, r.split(","), strict=True)) for r in rows]


def _write_csv(path, header, rows):
    lines = [header] + [
        ",".join(str(r.get(c, "")) for c in COLUMNS) if isinstance(r, dict) else r for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_bad_csv_row_is_skipped_and_named(tmp_path):
    header, rows = _csv_rows(tmp_path)
    good = rows[0]
    bad = [
        {**good, "y0": "nan"},  # row 5
        {**good, "x1": "inf"},  # row 6
        {**good, "z_mm": ""},  # row 7: a blank mm corner cannot be checked against the CT
        ",".join(list(good.values())[:4]),  # row 8: a short row
        {**good, "slice": "6", "z_mm": "-25.0"},  # row 9: outside the grid
        {**good, "y0": "3", "y1": "7"},  # row 10: voxels moved, mm corners not
        {**good, "class": ""},  # row 11: an empty class is allowed (a box drawn without one)
    ]
    path = _write_csv(tmp_path / "edited.csv", header, rows + bad)
    boxes, meta = load_boxes(path, expected_geometry=GEOMETRY)
    assert len(boxes) == 4 and [b.class_name for b in boxes][-1] == ""
    skipped = meta["skipped"]
    assert [s.split(":")[0] for s in skipped] == ["row 5", "row 6", "row 7", "row 8", "row 9", "row 10"]
    assert "y0 is 'nan', not a whole number" in skipped[0]
    assert "x1 is 'inf', not a whole number" in skipped[1]
    assert "missing field z_mm" in skipped[2]
    assert "missing fields x1, class" in skipped[3]
    assert "outside the CT grid" in skipped[4]
    assert "one set of columns was edited without the other" in skipped[5]
    # without a CT to check against, the grid and mm checks cannot run: the rows parse alone
    assert len(load_boxes(path)[1]["skipped"]) == 4


def test_csv_whose_every_row_disagrees_is_from_another_ct(tmp_path):
    header, rows = _csv_rows(tmp_path)
    path = _write_csv(tmp_path / "other.csv", header, rows)
    shifted = {**GEOMETRY, "origin": [-40.0, -90.5, -120.25]}
    with pytest.raises(BoxFileError, match="other.csv were made on a CT with a different geometry"):
        load_boxes(path, expected_geometry=shifted)


def test_csv_of_another_ct_whose_rows_all_lie_outside_this_one_is_refused(tmp_path):
    """Rows of a longer CT fall outside this grid: the file is refused as another CT's (case 36),
    not read as an empty layer with every row skipped."""
    longer = {**GEOMETRY, "shape": [300, 20, 24], "origin": [-400.0, -100.5, -120.25]}
    boxes = [Box(150 + i, 2, 3, 6, 7, "CAP", 0.5, origin="edited") for i in range(3)]
    path = save_boxes(tmp_path / "longer.csv", boxes, longer)
    assert len(load_boxes(path, expected_geometry=longer)[0]) == 3
    with pytest.raises(BoxFileError, match="longer.csv were made on a CT with a different geometry"):
        load_boxes(path, expected_geometry=GEOMETRY)


def test_csv_saved_again_by_a_spreadsheet_with_a_byte_order_mark_opens(tmp_path):
    from napari_wscovid._reader import get_reader

    plain = save_boxes(tmp_path / "reading.csv", BOXES, GEOMETRY)
    excel = tmp_path / "reading excel.csv"  # "CSV UTF-8" in a spreadsheet: a BOM and CRLF lines
    excel.write_bytes(b"\xef\xbb\xbf" + plain.read_text().replace("\n", "\r\n").encode())
    assert get_reader(str(excel)) is not None
    boxes, meta = load_boxes(excel, expected_geometry=GEOMETRY)
    assert [b.as_dict() for b in boxes] == [b.as_dict() for b in load_boxes(plain)[0]]
    assert meta["skipped"] == []


@pytest.mark.parametrize("text", ["slice,y0\x00\n1,2\n", '"unclosed\n' + ",".join(COLUMNS) + "\n"])
def test_unreadable_csv_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.csv"
    path.write_text(text)
    with pytest.raises(BoxFileError, match="broken.csv"):
        load_boxes(path)


# ------------------------------------------------------------------------------------- volume
@pytest.mark.parametrize("suffix", [".boxes.json", ".csv"])
def test_100000_boxes_load_and_a_bad_half_is_summarised(tmp_path, suffix):
    """Every entry is read once (no quadratic step); 50,000 skipped ones give one short message."""
    many = [Box(z % 6, 1, 1, 1 + (z % 19) + 1, 5, "CAP", 0.5, 1.0) for z in range(100_000)]
    path = save_boxes(tmp_path / f"many{suffix}", many, GEOMETRY)
    boxes, meta = load_boxes(path, expected_geometry=GEOMETRY)
    assert len(boxes) == 100_000 and meta["skipped"] == []
    if suffix == ".csv":
        header, *lines = path.read_text().splitlines()
        lines = [line.replace(",1,1,", ",nan,1,", 1) if i % 2 else line for i, line in enumerate(lines)]
        path.write_text("\n".join([header, *lines]) + "\n")
    else:
        doc = json.loads(path.read_text())
        for row in doc["boxes"][1::2]:
            row["y0"] = None
        path.write_text(json.dumps(doc))
    boxes, meta = load_boxes(path, expected_geometry=GEOMETRY)
    assert len(boxes) == 50_000 and len(meta["skipped"]) == 50_000
    message = describe_skipped(path.name, meta["skipped"])
    assert message.startswith(f"many{suffix}: 50000 entries skipped") and "and 49995 more" in message
    assert len(message) < 1000
