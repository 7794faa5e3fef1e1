"""npe2 reader: chest CT (DICOM folder/file, NIfTI, MHA/MHD, NRRD) and exported boxes.

``get_reader`` only looks at names and, for ``.json`` and ``.csv``, the first bytes (so a boxes
file saved under any name opens and other JSON/CSV is left to other readers); folders are
claimed without looking inside, so one without DICOM gets the loader's reason. The
returned function does the loading and raises an error with a clear message when
it fails, which napari shows without closing the viewer. Layer names never carry
patient data: the CT is called ``CT <series_key>`` with the pseudonymous key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from napari_wscovid.io.boxes_io import (
    COLUMNS,
    FORMAT_NAME,
    describe_skipped,
    geometry_layer_kwargs,
    geometry_mismatch,
    load_boxes,
)
from napari_wscovid.io.volume import CTLoadError, CTVolume, geometry_key
from napari_wscovid.review import split_rejected

logger = logging.getLogger(__name__)

# 2-D pictures too (a slice exported by a viewer, the UCSD images): read as a one-slice CT so the
# dock can run on them; napari's own reader would give a 2-D layer the dock cannot take
CT_SUFFIXES = (".dcm", ".ima", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg")
BOXES_SUFFIX = ".boxes.json"
_SNIFF_BYTES = 4096
HU_WINDOW = (-1350.0, 150.0)  # lung window: level -600, width 1500


def get_reader(path):
    """Return a reader function for ``path``, or None when this plugin cannot read it."""
    if isinstance(path, (list, tuple)):
        paths = [str(p) for p in path]
        if len(paths) == 1:
            path = paths[0]
        elif (
            paths and all(_is_dicom_file(p) for p in paths) and len({str(Path(p).parent) for p in paths}) == 1
        ):
            # Several slices of one series picked in the file dialog: read their folder.
            folder = str(Path(paths[0]).parent)
            return lambda _path: read_ct(folder)
        else:
            return None
    path = str(path)
    lower = path.lower()
    if lower.endswith(BOXES_SUFFIX) or (lower.endswith((".json", ".csv")) and _is_boxes_file(path)):
        return read_boxes
    if os.path.isdir(path):
        # A folder is claimed even without DICOM (napari reads no plain folders itself): the user
        # then gets the loader's reason ("no CT image series found ...") instead of napari's
        # generic refusal. Zarr stores are left to the readers that know them.
        return None if lower.rstrip("/\\").endswith(".zarr") else read_ct
    if lower.endswith(CT_SUFFIXES) or _is_dicom_file(path):
        if _is_dicom_file(path):
            from napari_wscovid.io.dicom_objects import SEG_STORAGE, SR_STORAGE, sop_class_of

            sop_class = sop_class_of(path)
            if sop_class in SR_STORAGE:
                return read_sr
            if sop_class == SEG_STORAGE:
                return read_seg
        return read_ct
    return None


def _is_boxes_file(path: str) -> bool:
    """Whether a ``.json``/``.csv`` file is one of ours: the format name near the top of a JSON,
    every column of :data:`~napari_wscovid.io.boxes_io.COLUMNS` in a CSV's header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES).decode("utf-8-sig", errors="replace")  # a spreadsheet's BOM
    except OSError:
        return False
    if path.lower().endswith(".json"):
        return f'"{FORMAT_NAME}"' in head
    header = {c.strip().strip('"') for c in head.splitlines()[0].split(",")} if head else set()
    return set(COLUMNS) <= header


def _is_dicom_file(path: str) -> bool:
    from napari_wscovid.io.dicom import looks_like_dicom

    return looks_like_dicom(path)


# ------------------------------------------------------------------------------- CT
def ct_layer_data(volume: CTVolume, name: str | None = None, dicom_source: str | None = None) -> tuple:
    """The Image layer tuple for a CT volume, in patient millimetres. ``dicom_source`` (the
    DICOM folder or file it was read from) lets the dock write a SEG/SR that references it; it
    stays in the layer's metadata, never in a name."""
    if volume.is_hu:
        limits = HU_WINDOW
    else:
        lo, hi = np.percentile(volume.hu[:: max(1, volume.shape[0] // 16)], (1, 99))
        limits = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    kwargs = {
        **volume.layer_kwargs(),
        "name": name or f"CT {volume.series_key}",
        "contrast_limits": limits,
        "colormap": "gray",
        "metadata": {
            "wscovid_geometry": volume.geometry(),
            "series_key": volume.series_key,
            "is_hu": volume.is_hu,
            "warnings": list(volume.warnings),
            "wscovid_volume": volume,
            "dicom_source": dicom_source if volume.source == "DICOM" else None,
        },
    }
    return (volume.hu, kwargs, "image")


def read_ct(path) -> list[tuple]:
    """Load a CT with :func:`napari_wscovid.io.load_ct` and return its layer tuple."""
    from napari_wscovid.io import load_ct

    try:
        volume = load_ct(path)
    except CTLoadError:
        raise
    except Exception as exc:  # turn any loader bug into a readable message instead of a traceback
        raise CTLoadError(
            f"{Path(path).name}: could not be read as a CT ({type(exc).__name__}: {exc})"
        ) from exc
    if volume.warnings:
        from napari.utils.notifications import show_warning  # napari only where a viewer reads

        for warning in volume.warnings:
            logger.warning("%s: %s", volume.series_key, warning)
            # the user sees it too (a second series left out, voxel-only positions, a NaN voxel
            # size): named by the layer's pseudonymous name, as the log is
            show_warning(f"CT {volume.series_key}: {warning}")
    return [ct_layer_data(volume, dicom_source=str(path))]


# ---------------------------------------------------------------------------- boxes
def read_boxes(path) -> list[tuple]:
    """An exported boxes file (JSON or CSV, any name) as an editable Shapes layer on its CT's grid.

    When a CT is open in the current viewer and none has the grid the boxes were
    made on, the file is refused with both geometries named (BAD_INPUTS case 36).
    A CSV carries no grid: it goes onto the open CT whose grid its millimetre corners fit.
    Entries edited beyond use (a missing field, a NaN corner, a box outside the CT) are left
    out and the viewer says which.
    """
    from napari_wscovid._widgets.layers import boxes_layer_data, default_box_class

    open_geometries = _open_ct_geometries()
    if Path(path).suffix.lower() == ".csv":
        geometry, boxes, meta = _load_csv_on_open_ct(path, open_geometries)
        # the CT it fits is its CT: its key ties the layer's exports and autosave to that CT
        meta["series_key"] = _open_ct_series_key(geometry)
        # a CSV holds no class list: the classes of that CT's other boxes layers first, so a box
        # can still be given a class no row of the file has
        meta["classes"] = _classes_on_grid(geometry, [b.class_name for b in boxes])
    else:
        boxes, meta = load_boxes(path)
        geometry = meta["geometry"]
        if open_geometries and all(geometry_mismatch(geometry, g) for g in open_geometries):
            # Re-load against the newest CT so the error names both grids.
            load_boxes(path, expected_geometry=open_geometries[-1])
    if meta["skipped"]:
        from napari.utils.notifications import show_warning  # napari only where a viewer reads

        show_warning(describe_skipped(Path(path).name, meta["skipped"]))
    boxes, rejected = split_rejected(boxes)
    classes = meta["classes"] or sorted({b.class_name for b in boxes})
    default_class = default_box_class(classes)
    return [
        boxes_layer_data(
            boxes,
            geometry_layer_kwargs(geometry),
            rejected=rejected,
            reviewed=meta.get("reviewed_slices", []),
            geometry=geometry,
            series_key=meta["series_key"],
            classes=classes,
            default_class=default_class,
            model_info=meta["model"],
        )
    ]


def read_sr(path) -> list[tuple]:
    """A DICOM SR this plugin wrote (``sr.dcm``) as an editable boxes layer on its CT's grid,
    which the SR's image library describes (:func:`napari_wscovid.io.dicom_objects.read_sr_boxes`)."""
    from napari_wscovid._widgets.layers import boxes_layer_data, default_box_class
    from napari_wscovid.io.dicom_objects import read_sr_boxes

    boxes, meta = read_sr_boxes(path)
    boxes, rejected = split_rejected(boxes)
    classes = meta["classes"] or ["lesion"]
    return [
        boxes_layer_data(
            boxes,
            geometry_layer_kwargs(meta["geometry"]),
            rejected=rejected,
            reviewed=[],
            geometry=meta["geometry"],
            series_key=meta["series_key"],
            classes=classes,
            default_class=default_box_class(classes),
            model_info={},
        )
    ]


def read_seg(path) -> list[tuple]:
    """A DICOM SEG as a labels layer in patient millimetres (segment numbers as labels)."""
    from napari_wscovid.io.dicom_objects import read_seg_labels

    labels, geometry, names = read_seg_labels(path)
    kwargs = {
        **geometry_layer_kwargs(geometry),
        "name": "segmentation (" + ", ".join(names.values()) + ")",
        "metadata": {"wscovid_geometry": geometry, "segments": names},
        "opacity": 0.4,
    }
    return [(labels, kwargs, "labels")]


def _load_csv_on_open_ct(path, open_geometries: list[dict]) -> tuple[dict, list, dict]:
    """``(grid, boxes, meta)`` of a boxes CSV on the open CT it fits (newest first), its boxes checked
    against that grid; a clear error if none fits."""
    name = Path(path).name
    if not open_geometries:
        raise ValueError(f"{name} is a boxes CSV, which carries no CT grid: open its CT first, then the CSV")
    errors = []
    for geometry in reversed(open_geometries):
        try:
            return (geometry, *load_boxes(path, expected_geometry=geometry))
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError(f"{name} fits none of the open CTs: {errors[0]}")


def _viewer_layers() -> list:
    """The layers of napari's current viewer; none without Qt or a viewer."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt / no viewer: nothing to compare against
        return []
    return list(viewer.layers) if viewer is not None else []


def _open_ct_layers() -> list:
    return [
        layer
        for layer in _viewer_layers()
        if type(layer).__name__ == "Image"
        and isinstance(layer.metadata.get("wscovid_geometry"), dict)
        and not layer.metadata.get("wscovid_result")
    ]


def _open_ct_geometries() -> list[dict]:
    return [layer.metadata["wscovid_geometry"] for layer in _open_ct_layers()]


def _classes_on_grid(geometry: dict, present: list[str]) -> list[str]:
    """The class lists of the open boxes layers on ``geometry``, then the ``present`` classes,
    each once, in that order ("not a lesion" is the dock's own, always offered)."""
    from napari_wscovid._widgets.layers import NOT_A_LESION

    classes: list[str] = []
    for layer in _viewer_layers():
        layer_geometry = layer.metadata.get("wscovid_geometry")
        if layer.metadata.get("wscovid_boxes") and isinstance(layer_geometry, dict):
            if not geometry_mismatch(geometry, layer_geometry):
                classes += [str(c) for c in layer.metadata.get("classes") or ()]
    classes += sorted(set(present) - {NOT_A_LESION})
    return list(dict.fromkeys(classes))


def _open_ct_series_key(geometry: dict) -> str:
    """The series key of the newest open CT on ``geometry``; else the key of the grid itself
    (what a CT read from a file without a series UID gets)."""
    for layer in reversed(_open_ct_layers()):
        if not geometry_mismatch(geometry, layer.metadata["wscovid_geometry"]) and layer.metadata.get(
            "series_key"
        ):
            return str(layer.metadata["series_key"])
    spacing, origin, direction, shape = (geometry[k] for k in ("spacing", "origin", "direction", "shape"))
    return geometry_key(shape, spacing, origin, direction)
