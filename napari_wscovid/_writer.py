"""npe2 writer: a lesion-boxes Shapes layer to ``.json`` or ``.csv`` (see io/boxes_io.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from napari_wscovid.io.boxes_io import rectangles_to_boxes, save_boxes
from napari_wscovid.results import Box

logger = logging.getLogger(__name__)


def write_boxes(path: str, data, attributes: dict) -> list[str]:
    """Write one Shapes layer of lesion boxes.

    Parameters
    ----------
    path : str
        Destination ``.json`` or ``.csv``.
    data : list of array
        The layer's rectangles, (4, 3) vertices in CT data coordinates.
    attributes : dict
        Layer attributes; ``metadata["wscovid_geometry"]`` is required to convert
        the rectangles to millimetres, ``features`` carries class/score/origin.

    Returns
    -------
    list of str
        The written path.
    """
    metadata = attributes.get("metadata") or {}
    geometry = metadata.get("wscovid_geometry")
    if geometry is None:
        raise ValueError(
            f"layer {attributes.get('name', '')!r} is not a WS-COVID boxes layer: it has no CT geometry "
            "(metadata 'wscovid_geometry'). Export boxes made by the detection widget or opened from a "
            "*.boxes.json file."
        )
    shape_types = attributes.get("shape_type") or []
    if any(t != "rectangle" for t in shape_types):
        raise ValueError("only rectangles can be exported as lesion boxes; remove the other shapes first")
    boxes = rectangles_to_boxes(list(data), attributes.get("features"), geometry)
    # the detections the annotator rejected travel with the file, so a re-run later respects them
    boxes += [Box(**row) for row in metadata.get("wscovid_rejected", [])]
    target = Path(path)
    existed = target.exists()
    # napari's save dialog has already asked before replacing; the previous file is kept as .bak.
    save_boxes(
        target,
        boxes,
        geometry,
        series_key=metadata.get("series_key", ""),
        model=metadata.get("model"),
        classes=metadata.get("classes", ()),
        reviewed_slices=metadata.get("wscovid_reviewed", []),
        overwrite=True,
    )
    if existed:
        logger.warning("replaced %s; the previous version was kept beside it as a .bak file", target.name)
    reviewed = metadata.get("wscovid_reviewed", [])
    if target.suffix.lower() == ".csv" and reviewed:
        from napari.utils.notifications import show_warning  # napari only where a viewer writes

        show_warning(
            f"{target.name}: a CSV holds boxes only; the {len(reviewed)} slice(s) marked reviewed are "
            "not in it (a .json export keeps them)"
        )
    return [str(target)]
