"""Lesion boxes on disk: a versioned JSON format and a CSV with the same columns.

No napari, no Qt. Coordinates are written twice:

* voxels: ``slice, y0, x0, y1, x1`` -- indices of the CT array, end-exclusive, so
  ``hu[slice, y0:y1, x0:x1]`` is the boxed region;
* millimetres: ``z_mm, y0_mm, x0_mm, y1_mm, x1_mm`` -- patient LPS coordinates of the
  box's two corners. The corners are voxel **edges**, not centres: corner 0 is the
  outer edge of voxel ``(slice, y0, x0)`` at index ``(slice, y0 - 0.5, x0 - 0.5)``
  and corner 1 the outer edge of voxel ``(slice, y1 - 1, x1 - 1)`` at index
  ``(slice, y1 - 0.5, x1 - 0.5)``, both mapped with ``index_to_world``. ``z_mm`` is
  the slice-centre coordinate of corner 0 (the slice position for axis-aligned CTs).
  The same edge convention places the rectangles of a napari Shapes layer (see
  :func:`boxes_to_rectangles`), so on an axis-aligned CT the exported mm corners are exactly
  the world coordinates of the rectangle drawn on the screen. On an **oblique** CT (a rotated
  or tilted plane) five numbers cannot hold a rotated rectangle: they are then the world
  position of corner 0 and the in-plane position of corner 1 only, and the voxel columns with
  the file's geometry (JSON) are what places the box; the mm columns still check a CSV row
  against its CT.

Both formats identify the CT only by its pseudonymous ``series_key`` and its grid
geometry; they never carry a patient identifier (BAD_INPUTS case 38).

Saving is atomic (temporary file in the destination folder, fsync, ``os.replace``),
refuses to overwrite unless asked, and keeps the previous file as a timestamped
``.bak`` copy when it does overwrite (cases 33-34).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from napari_wscovid.io.atomic import atomic_write_text
from napari_wscovid.io.volume import LAYER_AXES
from napari_wscovid.results import BOX_ORIGINS, Box

logger = logging.getLogger(__name__)

FORMAT_NAME = "napari-wscovid-boxes"
# 100,000 boxes are 31 MB of JSON and read in 0.7 s here; a file 8 times that is not ours, and
# reading a 1 GB file whole would stall the viewer and take gigabytes
MAX_BOXES_FILE_BYTES = 256 * 2**20
FORMAT_VERSION = 1

COLUMNS = (
    "slice",
    "y0",
    "x0",
    "y1",
    "x1",
    "z_mm",
    "y0_mm",
    "x0_mm",
    "y1_mm",
    "x1_mm",
    "class",
    "score",
    "origin",
    "source",
    "area_mm2",
)
_INT_COLUMNS = ("slice", "y0", "x0", "y1", "x1")
_MM_COLUMNS = ("z_mm", "y0_mm", "x0_mm", "y1_mm", "x1_mm")

# Tolerances used to decide whether two grids are "the same CT"; geometry() already
# rounds spacing to 1e-6 mm and origin to 1e-4 mm, so these only absorb loader noise.
_SPACING_TOL = 1e-4
_ORIGIN_TOL = 1e-2
_DIRECTION_TOL = 1e-4


# --------------------------------------------------------------------------- geometry
def _geometry_arrays(geometry: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    try:
        spacing = np.asarray(geometry["spacing"], dtype=float).reshape(3)
        origin = np.asarray(geometry["origin"], dtype=float).reshape(3)
        direction = np.asarray(geometry.get("direction", np.eye(3)), dtype=float).reshape(3, 3)
        shape = tuple(int(n) for n in geometry["shape"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"invalid CT geometry {_short_repr(geometry, 200)}: {exc}") from exc
    if len(shape) != 3:
        raise ValueError(f"invalid CT geometry: shape must have 3 entries, got {shape}")
    return spacing, origin, direction, shape


def geometry_index_to_world(geometry: dict, index_zyx) -> np.ndarray:
    """Voxel indices (..., 3) -> LPS mm (..., 3), the same formula as ``CTVolume.index_to_world``."""
    spacing, origin, direction, _ = _geometry_arrays(geometry)
    idx = np.asarray(index_zyx, dtype=float)
    return origin + (idx * spacing) @ direction.T


def geometry_layer_kwargs(geometry: dict) -> dict:
    """``scale``, ``translate`` and ``rotate`` (the identity unless oblique: a re-used layer must
    not keep an earlier grid's rotation) for a layer on this grid."""
    spacing, origin, direction, _ = _geometry_arrays(geometry)
    kwargs = {
        "scale": tuple(float(s) for s in spacing),
        "translate": tuple(float(o) for o in origin),
        **LAYER_AXES,
    }
    oblique = not np.allclose(np.abs(direction), np.eye(3), atol=1e-6)
    kwargs["rotate"] = direction.tolist() if oblique else np.eye(3).tolist()
    return kwargs


def geometry_mismatch(a: dict, b: dict) -> str:
    """Describe how two geometries differ; an empty string when they match."""
    sa, oa, da, sha = _geometry_arrays(a)
    sb, ob, db, shb = _geometry_arrays(b)
    problems = []
    if sha != shb:
        problems.append(f"shape {list(sha)} != {list(shb)}")
    if not np.allclose(sa, sb, rtol=0, atol=_SPACING_TOL):
        problems.append(f"spacing {sa.tolist()} != {sb.tolist()}")
    if not np.allclose(oa, ob, rtol=0, atol=_ORIGIN_TOL):
        problems.append(f"origin {oa.tolist()} != {ob.tolist()}")
    if not np.allclose(da, db, rtol=0, atol=_DIRECTION_TOL):
        problems.append(f"direction {da.tolist()} != {db.tolist()}")
    return "; ".join(problems)


def _format_geometry(g: dict) -> str:
    return f"shape={list(g['shape'])} spacing={list(g['spacing'])} origin={list(g['origin'])}"


# ------------------------------------------------------------------------ rows <-> boxes
def box_corners_mm(box: Box, geometry: dict) -> dict[str, float]:
    """The mm columns of one box (voxel-edge corners, see the module docstring)."""
    c0, c1 = geometry_index_to_world(
        geometry,
        [[box.slice, box.y0 - 0.5, box.x0 - 0.5], [box.slice, box.y1 - 0.5, box.x1 - 0.5]],
    )
    return {
        "z_mm": float(c0[0]),
        "y0_mm": float(c0[1]),
        "x0_mm": float(c0[2]),
        "y1_mm": float(c1[1]),
        "x1_mm": float(c1[2]),
    }


def box_area_mm2(y0: int, x0: int, y1: int, x1: int, geometry: dict) -> float:
    """In-plane area of an end-exclusive voxel box in mm²."""
    spacing = _geometry_arrays(geometry)[0]
    return float((y1 - y0) * (x1 - x0) * spacing[1] * spacing[2])


def box_to_row(box: Box, geometry: dict) -> dict:
    """One box as a row with every column of :data:`COLUMNS`."""
    row = {
        "slice": int(box.slice),
        "y0": int(box.y0),
        "x0": int(box.x0),
        "y1": int(box.y1),
        "x1": int(box.x1),
        **box_corners_mm(box, geometry),
        "class": str(box.class_name),
        "score": float(box.score),
        "origin": str(box.origin),
        "source": str(box.source),
        "area_mm2": float(box.area_mm2),
    }
    return row


class BoxFileError(ValueError):
    """A boxes file that cannot be used at all; the message names the file and the reason."""


class _EntryError(ValueError):
    """One box entry that cannot be used; the reason, without the file or the entry's index."""


_REQUIRED = (*_INT_COLUMNS, "class")
# usable entries with their index in the file, kept so that skipped ones can be named
_Entries = list[tuple[int, Box]]


def row_to_box(row, where: str = "") -> Box:
    """A row (from JSON or CSV) back to a :class:`Box`; raises ValueError naming the problem.

    JSON ``null`` and a CSV cell that is missing (a short row) count as a missing field. The mm
    columns are not read into the box (the voxel columns place it) but, where present, must be finite.
    """
    try:
        return _parse_entry(row)
    except _EntryError as exc:
        raise ValueError(f"{where}{exc}") from exc


def _parse_entry(row) -> Box:
    if not isinstance(row, dict):
        raise _EntryError(f"not a box entry but {type(row).__name__} {_short_repr(row)}")
    missing = [k for k in _REQUIRED if row.get(k) is None]
    if missing:
        raise _EntryError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    ints = {k: _field(k, row[k], _as_int, "not a whole number") for k in _INT_COLUMNS}
    for key in _MM_COLUMNS:
        if row.get(key) not in (None, ""):
            if not math.isfinite(_field(key, row[key], _as_float, "not a number")):
                raise _EntryError(f"{key} is {_short_repr(row[key])}, not a finite number")
    if not _is_text(row["class"]):
        raise _EntryError(f"class is {_short_repr(row['class'])}, not a name")
    source = str(row.get("source") or "")
    if not _is_text(source):
        raise _EntryError(f"source is {_short_repr(source)}, not a name")
    score = _field("score", row.get("score"), _as_float, "not a number")
    if math.isinf(score):
        raise _EntryError(f"score is {row.get('score')!r}, not a probability")
    area_mm2 = _field("area_mm2", row.get("area_mm2", 0.0), _as_float, "not a number")
    if math.isinf(area_mm2):  # JSON writes no infinity: the next export would read back NaN (fuzzing)
        raise _EntryError(f"area_mm2 is {row.get('area_mm2')!r}, not an area")
    origin = row.get("origin") or "detected"
    if origin not in BOX_ORIGINS:
        raise _EntryError(f"origin is {_short_repr(origin)}, not one of {', '.join(BOX_ORIGINS)}")
    box = Box(
        slice=ints["slice"],
        y0=ints["y0"],
        x0=ints["x0"],
        y1=ints["y1"],
        x1=ints["x1"],
        class_name=row["class"],
        score=score,
        area_mm2=area_mm2,
        origin=origin,
        source=source,
    )
    if box.y1 <= box.y0 or box.x1 <= box.x0:
        raise _EntryError(f"empty box (y0={box.y0}, y1={box.y1}, x0={box.x0}, x1={box.x1})")
    return box


def _is_text(value) -> bool:
    """A string that can be written back as UTF-8 (JSON's "\\ud800" escape reads as a lone surrogate,
    which would make the next CSV export fail)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(key: str, value, parse, what: str):
    try:
        return parse(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _EntryError(f"{key} is {_short_repr(value)}, {what}") from exc


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) > 40:
        # int() of a long digit string is quadratic in its length
        raise ValueError("expected an integer, got a string of more than 40 characters")
    f = float(value)
    if not f.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return int(f)


def _as_float(value) -> float:
    # JSON has no NaN: a missing score (a box the user drew) is written as null / an empty cell.
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _json_number(value: float):
    return None if value is None or not math.isfinite(value) else value


# ------------------------------------------------------------------------ serialisation
def boxes_to_json_text(
    boxes: Iterable[Box],
    geometry: dict,
    *,
    series_key: str = "",
    model: dict | None = None,
    classes: Sequence[str] = (),
    reviewed_slices: Iterable[int] = (),
) -> str:
    """The JSON document for these boxes (floats at full ``repr`` precision)."""
    rows = []
    for box in boxes:
        row = box_to_row(box, geometry)
        row["score"] = _json_number(row["score"])
        row["area_mm2"] = _json_number(row["area_mm2"])
        rows.append(row)
    model = dict(model or {})
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "series_key": str(series_key),
        "geometry": _plain_geometry(geometry),
        "model": {k: model.get(k, "") for k in ("name", "version", "sha256")},
        "classes": [str(c) for c in classes],
        # slices the annotator marked as reviewed (an optional key: older readers ignore it)
        "reviewed_slices": sorted({int(z) for z in reviewed_slices}),
        "boxes": rows,
    }
    # json writes floats with repr(), the shortest text that reads back to the same double.
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def boxes_to_csv_text(boxes: Iterable[Box], geometry: dict) -> str:
    """CSV with a header row always, so an export with no boxes is still a valid file."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for box in boxes:
        row = box_to_row(box, geometry)
        writer.writerow([_csv_cell(row[c]) for c in COLUMNS])
    return buf.getvalue()


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _plain_geometry(geometry: dict) -> dict:
    spacing, origin, direction, shape = _geometry_arrays(geometry)
    return {
        "shape": list(shape),
        "spacing": [float(s) for s in spacing],
        "origin": [float(o) for o in origin],
        "direction": direction.tolist(),
    }


# ------------------------------------------------------------------------------- saving
def save_boxes(
    path,
    boxes: Iterable[Box],
    volume_geometry: dict,
    *,
    series_key: str = "",
    model: dict | None = None,
    classes: Sequence[str] = (),
    reviewed_slices: Iterable[int] = (),
    overwrite: bool = False,
) -> Path:
    """Write boxes to ``path`` (``.csv`` -> CSV, anything else -> JSON), atomically.

    Parameters
    ----------
    path : str or Path
        Destination file.
    boxes : iterable of Box
        The boxes, in voxel indices of the CT described by ``volume_geometry``.
    volume_geometry : dict
        ``CTVolume.geometry()`` of the CT the boxes were made on.
    series_key, model, classes, reviewed_slices
        Pseudonymous CT key, ``{"name", "version", "sha256"}``, class names and the slices the
        annotator marked reviewed (JSON only: a CSV holds the boxes alone).
    overwrite : bool
        If False and ``path`` exists, raise FileExistsError. If True, the previous
        file is first copied to ``<name>.<timestamp>.bak<ext>`` beside it.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    boxes = list(boxes)
    if path.suffix.lower() == ".csv":
        text = boxes_to_csv_text(boxes, volume_geometry)
    else:
        text = boxes_to_json_text(
            boxes,
            volume_geometry,
            series_key=series_key,
            model=model,
            classes=classes,
            reviewed_slices=reviewed_slices,
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    if path.exists():
        backup = backup_path(path)
        shutil.copy2(path, backup)
        logger.info("kept the previous boxes file as %s", backup.name)
    return atomic_write_text(path, text, overwrite=True)


def backup_path(path: Path) -> Path:
    """A free ``<name>.<timestamp>.bak<ext>`` name beside ``path``."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    stem, ext = path.name[: -len(path.suffix)] if path.suffix else path.name, path.suffix
    candidate = path.with_name(f"{stem}.{stamp}.bak{ext}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{stem}.{stamp}-{n}.bak{ext}")
        n += 1
    return candidate


# ------------------------------------------------------------------------------ loading
def load_boxes(path, expected_geometry: dict | None = None) -> tuple[list[Box], dict]:
    """Read boxes written by :func:`save_boxes`, or such a file edited by hand.

    What makes the whole file unusable raises :class:`BoxFileError` (a ValueError) naming the file:
    unreadable, larger than :data:`MAX_BOXES_FILE_BYTES`, not this format, a newer version, a
    missing or broken geometry block, or made on another CT than ``expected_geometry``. A bad
    entry only costs itself: a box with a missing field, a NaN/inf or fractional corner, an empty
    extent, an unknown origin, or lying outside the CT grid is skipped, listed in ``meta["skipped"]``
    and logged as one warning naming the file. Unknown extra fields are ignored.

    Parameters
    ----------
    path : str or Path
        A ``.json`` or ``.csv`` boxes file.
    expected_geometry : dict, optional
        ``geometry()`` of the CT the boxes are meant for. When given and the file was
        made on a different grid, a BoxFileError naming both geometries is raised.

    Returns
    -------
    boxes : list of Box
    meta : dict
        ``format``, ``version``, ``series_key``, ``geometry`` (None for CSV), ``model``, ``classes``,
        ``reviewed_slices`` and ``skipped`` (``"box 3: missing field x1"``, one line per entry left
        out; see :func:`describe_skipped`).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BOXES_FILE_BYTES:
            raise BoxFileError(
                f"boxes file {path.name} is {size / 2**20:.0f} MiB; a box file of this plugin is at most "
                f"{MAX_BOXES_FILE_BYTES / 2**20:.0f} MiB (about a million boxes), so it is not read"
            )
        # utf-8-sig: a CSV saved again by a spreadsheet starts with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BoxFileError(f"cannot read boxes file {path.name}: {exc}") from exc
    if path.suffix.lower() == ".csv":
        boxes, meta = _load_csv(text, path.name, expected_geometry)
    else:
        boxes, meta = _load_json(text, path.name, expected_geometry)
    if meta["skipped"]:
        logger.warning("%s", describe_skipped(path.name, meta["skipped"]))
    return boxes, meta


def describe_skipped(name: str, skipped: Sequence[str], limit: int = 5) -> str:
    """One message for the entries a load left out, e.g. for the viewer's warning."""
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    shown = "; ".join(skipped[:limit]) + more
    return f"{name}: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} skipped ({shown})"


def _load_json(text: str, name: str, expected_geometry: dict | None) -> tuple[list[Box], dict]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoxFileError(f"{name} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BoxFileError(f"{name} is not a boxes file: JSON nested too deeply to read") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise BoxFileError(f"{name} is not a {FORMAT_NAME} file (missing 'format': '{FORMAT_NAME}')")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise BoxFileError(
            f"{name} has boxes format version {_short_repr(version)}; this napari-wscovid reads version "
            f"{FORMAT_VERSION} or older"
        )
    geometry = _file_geometry(doc.get("geometry"), name)
    if expected_geometry is not None:
        diff = geometry_mismatch(geometry, expected_geometry)
        if diff:
            raise BoxFileError(
                f"the boxes in {name} were made on a CT with a different geometry ({diff}). "
                f"Boxes: {_format_geometry(geometry)}; this CT: {_format_geometry(expected_geometry)}"
            )
    rows = doc.get("boxes")
    if not isinstance(rows, list):
        raise BoxFileError(f"{name}: 'boxes' must be a list")
    skipped: list[str] = []
    boxes = _parse_entries(rows, "box", 0, skipped)
    boxes = _in_grid(boxes, geometry, "box", skipped)
    meta = {
        "format": FORMAT_NAME,
        "version": version,
        "series_key": str(doc.get("series_key") or ""),
        "geometry": geometry,
        "model": _model_info(doc.get("model"), skipped),
        "classes": _class_names(doc.get("classes"), skipped),
        "reviewed_slices": _reviewed(doc.get("reviewed_slices", []), geometry, skipped),
        "skipped": [reason for _, reason in sorted(skipped, key=_order)] if skipped else [],
    }
    _note_unknown_fields(rows, name)
    return [box for _, box in boxes], meta


def _parse_entries(rows, label: str, first: int, skipped: list) -> _Entries:
    """(index, box) of the usable entries; ``(index, reason)`` of the others appended to ``skipped``."""
    boxes = []
    for i, row in enumerate(rows, start=first):
        try:
            boxes.append((i, _parse_entry(row)))
        except _EntryError as exc:
            skipped.append((i, f"{label} {i}: {exc}"))
    return boxes


def _order(item):
    index, _ = item
    return (1, 0) if index is None else (0, index)


def _in_grid(boxes: _Entries, geometry: dict, label: str, skipped: list) -> _Entries:
    nz, ny, nx = _geometry_arrays(geometry)[3]
    kept = []
    for i, b in boxes:
        if 0 <= b.slice < nz and 0 <= b.y0 and b.y1 <= ny and 0 <= b.x0 and b.x1 <= nx:
            kept.append((i, b))
        else:
            skipped.append(
                (
                    i,
                    f"{label} {i}: slice {b.slice}, y {b.y0}..{b.y1}, x {b.x0}..{b.x1} lies "
                    f"outside the CT grid {[nz, ny, nx]}",
                )
            )
    return kept


def _file_geometry(geometry, name: str) -> dict:
    """The JSON file's grid, checked enough that napari can place a layer on it."""
    try:
        spacing, origin, direction, shape = _geometry_arrays(geometry if isinstance(geometry, dict) else {})
    except ValueError as exc:
        raise BoxFileError(f"{name}: {exc}") from exc
    problems = []
    if not all(n >= 1 for n in shape):
        problems.append(f"shape {list(shape)} has an empty axis")
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        problems.append(f"spacing {spacing.tolist()} is not finite and positive")
    if not (np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))):
        problems.append("origin or direction is not finite")
    elif abs(np.linalg.det(direction)) < 1e-3:  # napari would fail inverting it, naming nothing
        problems.append(f"direction {direction.tolist()} is singular: its columns must be the CT's axes")
    if problems:
        raise BoxFileError(f"{name}: invalid CT geometry: {'; '.join(problems)}")
    return _plain_geometry(geometry)


def _model_info(value, skipped: list) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        skipped.append((None, f"'model' is {_short_repr(value)}, not an object; ignored"))
        return {}
    # the model's name, version and hash are text; anything else would break the next export
    dropped = sorted(str(k) for k, v in value.items() if not isinstance(v, str))
    if dropped:
        skipped.append((None, f"'model' fields {_short_repr(dropped)} are not text; ignored"))
    return {k: v for k, v in value.items() if isinstance(v, str)}


def _class_names(value, skipped: list) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        skipped.append((None, f"'classes' is {_short_repr(value)}, not a list of names; ignored"))
        return []
    return list(value)


def _reviewed(value, geometry: dict, skipped: list) -> list[int]:
    """The reviewed-slice list of a JSON document; indices outside the CT grid are skipped."""
    n_slices = _geometry_arrays(geometry)[3][0]
    if not isinstance(value, list):
        skipped.append((None, f"'reviewed_slices' is {_short_repr(value)}, not a list; ignored"))
        return []

    def valid(z) -> bool:
        return isinstance(z, int) and not isinstance(z, bool) and 0 <= z < n_slices

    good = {z for z in value if valid(z)}
    bad = [z for z in value if not valid(z)]
    if bad:
        skipped.append(
            (None, f"'reviewed_slices' entries {_short_repr(bad)} are not slice indices 0..{n_slices - 1}")
        )
    return sorted(good)


def _note_unknown_fields(rows: list, name: str) -> None:
    unknown = set()
    for row in rows:
        if isinstance(row, dict):
            unknown.update(k for k in row if k not in COLUMNS)
    if unknown:
        logger.info("%s: unknown box fields ignored: %s", name, _short_repr(sorted(map(str, unknown)), 200))


def _load_csv(text: str, name: str, expected_geometry: dict | None) -> tuple[list[Box], dict]:
    reader = csv.DictReader(io.StringIO(text))
    skipped: list = []
    try:
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BoxFileError(f"{name} is not a boxes CSV: missing columns {missing}")
        # rows are named by their line in the file (the header is line 1)
        rows = list(reader)
    except csv.Error as exc:
        raise BoxFileError(f"{name} is not a readable CSV (line {reader.line_num}): {exc}") from exc
    boxes = _parse_entries(rows, "row", 2, skipped)
    # a CSV row's mm corners are needed to check it against a CT: a blank one is a missing field
    for k in range(len(boxes) - 1, -1, -1):
        i, _ = boxes[k]
        blank = [c for c in _MM_COLUMNS if rows[i - 2].get(c) in (None, "")]
        if blank:
            skipped.append((i, f"row {i}: missing field{'s' if len(blank) > 1 else ''} {', '.join(blank)}"))
            del boxes[k]
    if expected_geometry is not None:
        # A CSV carries no geometry block, but its mm columns pin down origin and spacing:
        # recompute them on the expected grid and refuse if they disagree.
        # Another CT's file is refused whole (BAD_INPUTS case 36) before any row is left out for
        # lying outside this grid: its rows may all do so, and would each be skipped instead.
        _csv_mm_agree(boxes, rows, expected_geometry, name, [])
        boxes = _in_grid(boxes, expected_geometry, "row", skipped)
        boxes = _csv_mm_agree(boxes, rows, expected_geometry, name, skipped, refuse=False)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "series_key": "",
        "geometry": None,
        "model": {},
        "classes": sorted({b.class_name for _, b in boxes}),
        "reviewed_slices": [],
        "skipped": [reason for _, reason in sorted(skipped, key=_order)],
    }
    return [box for _, box in boxes], meta


def _csv_mm_agree(
    boxes: _Entries, rows, geometry: dict, name: str, skipped: list, refuse: bool = True
) -> _Entries:
    """Keep the rows whose mm corners match their voxel corners on ``geometry``.

    When no row matches, the file was made on another CT (refused, naming both grids, unless
    ``refuse`` is False); when some do, the others were edited by hand in one set of columns
    only, and are skipped.
    """
    if not boxes:
        return boxes
    stored = np.array([[float(rows[i - 2][k]) for k in _MM_COLUMNS] for i, _ in boxes])
    expected = _corners_mm_array([b for _, b in boxes], geometry)
    agree = np.all(np.abs(stored - expected) <= _ORIGIN_TOL, axis=1)
    if refuse and not agree.any():
        box = boxes[0][1]
        raise BoxFileError(
            f"the boxes in {name} were made on a CT with a different geometry: box on slice "
            f"{box.slice} has mm corners {dict(zip(_MM_COLUMNS, stored[0].tolist(), strict=True))} but on "
            f"this CT ({_format_geometry(geometry)}) they would be "
            f"{dict(zip(_MM_COLUMNS, expected[0].tolist(), strict=True))}"
        )
    for k in np.flatnonzero(~agree):
        i = boxes[k][0]
        skipped.append(
            (
                i,
                f"row {i}: mm corners {stored[k].tolist()} do not match its voxel corners on this CT "
                f"({expected[k].tolist()}); one set of columns was edited without the other",
            )
        )
    return [entry for entry, ok in zip(boxes, agree, strict=True) if ok]


def _corners_mm_array(boxes: Sequence[Box], geometry: dict) -> np.ndarray:
    """:func:`box_corners_mm` of many boxes at once, (n, 5) in :data:`_MM_COLUMNS` order."""
    idx = np.array([[[b.slice, b.y0 - 0.5, b.x0 - 0.5], [b.slice, b.y1 - 0.5, b.x1 - 0.5]] for b in boxes])
    world = geometry_index_to_world(geometry, idx.reshape(-1, 3).astype(float)).reshape(-1, 2, 3)
    return np.column_stack([world[:, 0, 0], world[:, 0, 1], world[:, 0, 2], world[:, 1, 1], world[:, 1, 2]])


# ------------------------------------------------------------- napari rectangles <-> boxes
def boxes_to_rectangles(boxes: Iterable[Box]) -> list[np.ndarray]:
    """Rectangles (4, 3) in CT data coordinates, ``z = slice``, corners on voxel edges."""
    rects = []
    for b in boxes:
        ya, yb = b.y0 - 0.5, b.y1 - 0.5
        xa, xb = b.x0 - 0.5, b.x1 - 0.5
        z = float(b.slice)
        rects.append(np.array([[z, ya, xa], [z, ya, xb], [z, yb, xb], [z, yb, xa]], dtype=float))
    return rects


def rectangle_to_voxels(vertices, shape_zyx: Sequence[int] | None = None) -> tuple[int, int, int, int, int]:
    """``(slice, y0, x0, y1, x1)`` of a drawn or moved rectangle, snapped to whole voxels."""
    v = np.asarray(vertices, dtype=float)
    z = int(np.rint(v[:, 0].mean()))
    y0, y1 = (int(np.rint(t + 0.5)) for t in (v[:, 1].min(), v[:, 1].max()))
    x0, x1 = (int(np.rint(t + 0.5)) for t in (v[:, 2].min(), v[:, 2].max()))
    if shape_zyx is not None:
        nz, ny, nx = (int(n) for n in shape_zyx)
        z = min(max(z, 0), nz - 1)
        y0, y1 = min(max(y0, 0), ny - 1), min(max(y1, 1), ny)
        x0, x1 = min(max(x0, 0), nx - 1), min(max(x1, 1), nx)
    # A rectangle thinner than a voxel still marks one voxel rather than vanishing.
    y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
    return z, y0, x0, y1, x1


def rectangles_to_boxes(rectangles: Sequence, features, geometry: dict) -> list[Box]:
    """Boxes from Shapes-layer rectangles and their features table.

    ``features`` is a mapping (or DataFrame) with the columns ``class``, ``score``,
    ``origin``, ``source`` and ``area_mm2``; a missing or non-finite area is
    recomputed from the snapped voxel box.
    """
    shape = _geometry_arrays(geometry)[3]
    n = len(rectangles)

    def column(name, default):
        if features is not None and name in features:
            values = list(features[name])
            if len(values) == n:
                return values
        return [default] * n

    classes = column("class", "")
    scores = column("score", math.nan)
    origins = column("origin", "added")
    sources = column("source", "user")
    areas = column("area_mm2", math.nan)
    boxes = []
    for i, rect in enumerate(rectangles):
        z, y0, x0, y1, x1 = rectangle_to_voxels(rect, shape)
        area = _as_float(areas[i])
        if not math.isfinite(area):
            area = box_area_mm2(y0, x0, y1, x1, geometry)
        origin = str(origins[i]) if str(origins[i]) in BOX_ORIGINS else "added"
        boxes.append(
            Box(
                slice=z,
                y0=y0,
                x0=x0,
                y1=y1,
                x1=x1,
                class_name=str(classes[i]),
                score=_as_float(scores[i]),
                area_mm2=area,
                origin=origin,
                source=str(sources[i]),
            )
        )
    return boxes


# ---------------------------------------------------------------------------- autosave
AUTOSAVE_ENV = "WSCOVID_AUTOSAVE_DIR"


def autosave_dir() -> Path:
    """Where edited boxes are kept between saves: ``$WSCOVID_AUTOSAVE_DIR``, else the user's state
    folder (``$XDG_STATE_HOME/napari-wscovid/autosave``, ``~/.local/state/...`` by default)."""
    import os

    if os.environ.get(AUTOSAVE_ENV):
        return Path(os.environ[AUTOSAVE_ENV])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "napari-wscovid" / "autosave"


def autosave_path(series_key: str) -> Path:
    """One file per CT, named by its pseudonymous key (never a patient identifier)."""
    safe = "".join(c for c in series_key if c.isalnum() or c in "-_") or "unnamed"
    return autosave_dir() / f"{safe}.boxes.json"


def write_autosave(series_key: str, boxes: Iterable[Box], geometry: dict, **meta) -> Path:
    """Replace the CT's autosave atomically (no backup copies: it is rewritten on every change)."""
    path = autosave_path(series_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = boxes_to_json_text(list(boxes), geometry, series_key=series_key, **meta)
    return atomic_write_text(path, text, overwrite=True)
