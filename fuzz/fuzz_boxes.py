"""Fuzz the boxes reader ``load_boxes`` on JSON and CSV files.

The first byte of an input picks the case: bit 0 a ``.csv`` (else ``.boxes.json``), bit 1 the CT's
geometry given as ``expected_geometry``. Every input either loads or raises BoxFileError naming the
file; what loads lies inside the CT grid (when one is known) and can be exported and read back to
the same boxes. Anything else is a finding.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BOXES_GEOMETRY, instrumented, main, names_input, scratch_file  # noqa: E402

with instrumented("napari_wscovid"):
    from napari_wscovid.io import boxes_io
    from napari_wscovid.io.boxes_io import BoxFileError, load_boxes
    from napari_wscovid.results import BOX_ORIGINS


def _same(a, b) -> bool:
    da, db = a.as_dict(), b.as_dict()
    for key in ("score", "area_mm2"):
        if math.isnan(da[key]) and math.isnan(db[key]):
            da.pop(key), db.pop(key)
    return da == db


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    suffix = ".csv" if mode & 1 else ".boxes.json"
    expected = BOXES_GEOMETRY if mode & 2 else None
    path = scratch_file("fuzzed" + suffix, body)
    try:
        boxes, meta = load_boxes(path, expected_geometry=expected)
    except BoxFileError as exc:
        names_input(exc, path.name)
        return
    assert all(isinstance(s, str) for s in meta["skipped"])
    assert all(b.y0 < b.y1 and b.x0 < b.x1 and b.origin in BOX_ORIGINS for b in boxes)
    grid = expected or meta["geometry"]
    if grid is None:
        return
    nz, ny, nx = grid["shape"]
    assert all(0 <= b.slice < nz and 0 <= b.y0 and b.y1 <= ny and 0 <= b.x0 and b.x1 <= nx for b in boxes)
    # what the viewer shows can be exported and read back unchanged (the user's next save)
    for out_suffix in (".boxes.json", ".csv"):
        out = path.with_name("roundtrip" + out_suffix)
        out.unlink(missing_ok=True)
        boxes_io.save_boxes(
            out,
            boxes,
            grid,
            series_key=meta["series_key"],
            model=meta["model"],
            classes=meta["classes"],
            reviewed_slices=meta["reviewed_slices"],
        )
        again, again_meta = load_boxes(out, expected_geometry=grid)
        assert again_meta["skipped"] == [], again_meta["skipped"]
        assert len(again) == len(boxes) and all(_same(a, b) for a, b in zip(again, boxes, strict=True))


if __name__ == "__main__":
    main(test_one_input)
