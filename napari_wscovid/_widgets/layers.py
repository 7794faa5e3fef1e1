"""Layers built from a DetectionResult, and the bookkeeping of edited boxes.

Pure functions of numpy data and napari layer objects (no Qt widgets), so they are
tested without a window. Every layer made here carries the CT layer's
``scale``/``translate`` (and ``rotate``), a name without patient data, and
``metadata["wscovid_result"] = True`` so a re-run finds and re-uses it by name.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd

from napari_wscovid.io.boxes_io import (
    box_area_mm2,
    boxes_to_rectangles,
    rectangle_to_voxels,
    rectangles_to_boxes,
)
from napari_wscovid.results import Box, DetectionResult
from napari_wscovid.review import Reading, add_rejected, as_rejected

logger = logging.getLogger(__name__)

LUNG_LAYER = "lung mask"
BOXES_LAYER = "lesion boxes"
NOT_A_LESION = "not a lesion"  # the class an annotator gives a box that marks no finding
REJECTED_KEY = "wscovid_rejected"  # metadata: detections the annotator deleted or moved away from
REVIEWED_KEY = "wscovid_reviewed"  # metadata: slices the annotator marked as reviewed
JOINT_LAYER = "joint saliency"
SALIENCY_LEVELS = ("conv3", "conv4", "conv5")
SALIENCY_COLORMAP = "inferno"

# Edge colour of a box by class; other classes cycle through _EXTRA_COLORS.
CLASS_COLORS = {"COVID-19": "#ff453a", "CAP": "#ffd60a", "NP": "#32d74b", "Normal": "#32d74b"}
_EXTRA_COLORS = ("#64d2ff", "#bf5af2", "#ff9f0a", "#ffffff")

BOX_FEATURE_DTYPES = {
    "class": object,
    "score": float,
    "slice": int,
    "area_mm2": float,
    "origin": object,
    "source": object,
}


def cam_layer_name(level: str) -> str:
    return f"CAM {level}"


def ig_layer_name(level: str) -> str:
    return f"IG {level}"


def ct_layer_kwargs(ct_layer) -> dict:
    """``scale``, ``translate``, ``rotate`` and ``affine`` of the CT layer, identities included:
    a result layer re-used from an oblique CT keeps no rotation of it."""
    kwargs = {
        "scale": tuple(float(s) for s in ct_layer.scale),
        "translate": tuple(float(t) for t in ct_layer.translate),
        # result layers name their axes as the CT does (z/y/x, mm)
        **{
            k: tuple(str(v) for v in getattr(ct_layer, k))
            for k in ("axis_labels", "units")
            if hasattr(ct_layer, k)
        },
    }
    kwargs["rotate"] = np.asarray(ct_layer.rotate, dtype=float).tolist()
    kwargs["affine"] = np.asarray(ct_layer.affine.affine_matrix, dtype=float).tolist()
    return kwargs


def class_color(name: str, classes: Sequence[str] = ()) -> str:
    """Hex colour of a class, stable for a given class list."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    others = [c for c in classes if c not in CLASS_COLORS]
    i = others.index(name) if name in others else abs(hash(name))
    return _EXTRA_COLORS[i % len(_EXTRA_COLORS)]


NEGATIVE_CLASSES = ("NP", "Normal", "normal")


def default_box_class(classes: Sequence[str], probs=None) -> str:
    """Class given to a box the user draws: the most probable disease class (never "NP")."""
    candidates = [(i, c) for i, c in enumerate(classes) if c not in NEGATIVE_CLASSES]
    if not candidates:
        return classes[0] if classes else ""
    if probs is not None:
        p = np.nan_to_num(np.asarray(probs, dtype=float), nan=-1.0)
        return max(candidates, key=lambda ic: p[ic[0]])[1]
    return candidates[0][1]


def _result_metadata(geometry: dict | None, series_key: str, **extra) -> dict:
    return {"wscovid_result": True, "wscovid_geometry": geometry, "series_key": series_key, **extra}


def map_full_scale(data: np.ndarray) -> float:
    """The value meaning 1.0 in a map: 255 for the pipeline's uint8 maps, else 1."""
    return float(np.iinfo(data.dtype).max) if np.issubdtype(data.dtype, np.integer) else 1.0


def saliency_limits(data: np.ndarray) -> tuple[float, float]:
    """``(0, max)`` of a map, or its full scale when it is all zero."""
    top = float(np.nanmax(data)) if data.size else 0.0
    return (0.0, top if math.isfinite(top) and top > 0 else map_full_scale(data))


# ------------------------------------------------------------------ result -> layer tuples
def result_layer_data(
    result: DetectionResult,
    layer_kwargs: dict,
    *,
    geometry: dict | None = None,
    series_key: str = "",
) -> list[tuple]:
    """Layer data tuples for the lung mask, CAMs, per-level IG and joint saliency.

    CAM and IG layers are hidden, additive, with contrast 0..1 of the map's scale
    (0..255 for the pipeline's uint8 maps); joint saliency is visible, 0..max.
    The boxes are built separately (:func:`boxes_layer_data`) because a re-run
    merges them with the user's edits instead of replacing them.
    """
    meta = _result_metadata(geometry, series_key)
    tuples = [
        (
            np.asarray(result.lung_mask, dtype=np.uint8),
            {
                **layer_kwargs,
                "name": LUNG_LAYER,
                "opacity": 0.3,
                "colormap": {1: "#0a84ff", 2: "#30d158", None: "transparent"},
                "features": {"index": [0, 1, 2], "lung": ["outside", "right", "left"]},
                "metadata": dict(meta),
            },
            "labels",
        )
    ]
    for level in SALIENCY_LEVELS:
        if level in result.cams:
            tuples.append(
                _saliency_tuple(result.cams[level], cam_layer_name(level), layer_kwargs, meta, False)
            )
    # Maps of the other methods ("decovnet", "gradcam++") are their main evidence: shown.
    for name in result.cams:
        if name not in SALIENCY_LEVELS:
            tuples.append(_saliency_tuple(result.cams[name], cam_layer_name(name), layer_kwargs, meta, True))
    for level in SALIENCY_LEVELS:
        if level in result.saliency:
            tuples.append(
                _saliency_tuple(result.saliency[level], ig_layer_name(level), layer_kwargs, meta, False)
            )
    if "joint" in result.saliency:
        joint = result.saliency["joint"]
        tuples.append(
            _saliency_tuple(joint, JOINT_LAYER, layer_kwargs, meta, True, saliency_limits(np.asarray(joint)))
        )
    return tuples


def _saliency_tuple(data, name, layer_kwargs, meta, visible, limits=None) -> tuple:
    data = np.asarray(data)
    # CAMs and per-level IG use a fixed 0..1 contrast so slices and runs compare by eye.
    limits = limits or (0.0, map_full_scale(data))
    return (
        data,
        {
            **layer_kwargs,
            "name": name,
            "colormap": SALIENCY_COLORMAP,
            "blending": "additive",
            "contrast_limits": limits,
            "visible": visible,
            "metadata": dict(meta),
        },
        "image",
    )


def box_features(boxes: Sequence[Box]) -> pd.DataFrame:
    """The features table of the boxes layer, one row per box."""
    columns = {
        "class": [b.class_name for b in boxes],
        "score": [float(b.score) for b in boxes],
        "slice": [int(b.slice) for b in boxes],
        "area_mm2": [float(b.area_mm2) for b in boxes],
        "origin": [b.origin for b in boxes],
        "source": [b.source for b in boxes],
    }
    return pd.DataFrame({k: pd.Series(v, dtype=BOX_FEATURE_DTYPES[k]) for k, v in columns.items()})


def box_feature_defaults(default_class: str) -> dict:
    """Features given to a box the user draws: no model score (NaN), origin "added"."""
    return {
        "class": default_class,
        "score": math.nan,
        "slice": 0,
        "area_mm2": math.nan,
        "origin": "added",
        "source": "user",
    }


def boxes_layer_data(
    boxes: Sequence[Box],
    layer_kwargs: dict,
    *,
    geometry: dict,
    series_key: str = "",
    classes: Sequence[str] = (),
    default_class: str = "",
    model_info: dict | None = None,
    name: str = BOXES_LAYER,
    rejected: Sequence[Box] = (),
    reviewed: Iterable[int] = (),
) -> tuple:
    """The Shapes layer tuple for boxes: editable rectangles on their slices.

    ``rejected`` (detections the annotator deleted or moved away from) go into the metadata,
    not onto the canvas: re-runs and exports need them (:mod:`napari_wscovid.review`).
    """
    boxes = list(boxes)
    default_class = default_class or (classes[0] if classes else "")
    kwargs = {
        **layer_kwargs,
        "name": name,
        "ndim": 3,
        "shape_type": "rectangle",
        "face_color": "transparent",
        "edge_width": 1.5,
        "features": box_features(boxes),
        "feature_defaults": box_feature_defaults(default_class),
        # the class only: the number (the slice's P(class)) is in the table, and drawn boxes have none
        "text": {"string": "{class}", "size": 9, "anchor": "upper_left"},
        "metadata": _result_metadata(
            geometry,
            series_key,
            wscovid_boxes=True,
            classes=list(classes),
            default_class=default_class,
            model=dict(model_info or {}),
            **{REJECTED_KEY: [as_rejected(b).as_dict() for b in rejected]},
            **{REVIEWED_KEY: sorted({int(z) for z in reviewed})},
        ),
    }
    colors, widths = box_styles([b.class_name for b in boxes], [b.origin for b in boxes], classes)
    # labels in the class colour (white text vanished on bright lung); the user's boxes thicker
    kwargs["text"]["color"] = {"array": colors, "default": class_color(default_class, classes)}
    if boxes:
        kwargs["edge_color"], kwargs["edge_width"] = colors, widths
    return (boxes_to_rectangles(boxes), kwargs, "shapes")


# ----------------------------------------------------------------------------- viewer
def find_layer(viewer, name: str, layer_type: str | None = None):
    """The layer called ``name`` (of ``layer_type`` when given), or None."""
    for layer in viewer.layers:
        if layer.name == name and (layer_type is None or type(layer).__name__.lower() == layer_type):
            return layer
    return None


def result_layer(viewer, name: str, layer_type: str | None = None):
    """The plugin's own result layer called ``name``, or None (a user's layer of that name is not
    one to refill)."""
    layer = find_layer(viewer, name, layer_type)
    return layer if layer is not None and layer.metadata.get("wscovid_result") else None


#: Outline width of the lung mask (pixels): a filled mask hides the density a reader judges.
LUNG_CONTOUR = 2


def _first_look(layer) -> None:
    """How a new result layer is first drawn (the user's later choices are kept on re-runs)."""
    if layer.name == LUNG_LAYER:
        layer.contour = LUNG_CONTOUR
        layer.opacity = 0.7


def show_colorbar(layer) -> None:
    """What the colours of a map mean: its 0..1 scale (napari >= 0.6 draws the bar)."""
    if type(layer).__name__ == "Image" and hasattr(layer, "colorbar"):
        layer.colorbar.visible = layer.visible


def set_transform(layer, kwargs: dict) -> None:
    """Give ``layer`` the scale, translation and rotation in ``kwargs`` where they differ.

    Each assignment re-checks the viewer's dims and redraws (about 15 ms a layer on a 2-core
    CPU, measured): a re-run on the same CT leaves them as they are.
    """
    for name in ("scale", "translate", "rotate", "affine"):
        current = layer.affine.affine_matrix if name == "affine" else getattr(layer, name)
        if name in kwargs and not np.allclose(current, kwargs[name]):
            setattr(layer, name, kwargs[name])


def upsert_layer(viewer, data, kwargs: dict, layer_type: str, *, colorbar: bool = True):
    """Add the layer, or update the layer of the same name and type in place.

    Re-using the layer keeps its position in the layer list and the visibility
    and opacity the user chose. ``colorbar=False`` leaves a new map's colour bar to the caller
    (:func:`show_colorbar`): napari takes 130-150 ms to build one, on top of the 200-290 ms it
    takes to add the layer, and the dock does the two in separate turns of the event loop.
    """
    from napari.layers import Layer

    layer = result_layer(viewer, kwargs["name"], layer_type)
    holder = find_layer(viewer, kwargs["name"], layer_type) if layer is None else None
    if holder is not None:
        # the user's own layer of that name (a lung mask they painted): renamed, never overwritten
        holder.name = f"{kwargs['name']} (not ours)"
    if layer is None:
        layer = Layer.create(data, dict(kwargs), layer_type)
        _first_look(layer)  # before it joins the viewer, so the lung is not drawn filled first
        # The layer itself is returned: to a plugin, napari's add_layer hands back a proxy, whose
        # type is not Image (the colour bar was never shown in the dock for that reason).
        viewer.add_layer(layer)
        if colorbar:
            show_colorbar(layer)
        return layer
    set_transform(layer, kwargs)
    layer.metadata = dict(kwargs.get("metadata", {}))
    layer.data = data
    if layer_type == "image" and "contrast_limits" in kwargs:
        layer.contrast_limits = kwargs["contrast_limits"]
    return layer


def remove_stale_result_layers(viewer, keep: Iterable[str]) -> None:
    """Remove result layers of an earlier run that this run did not produce (e.g. IG after scope "none")."""
    keep = set(keep) | {BOXES_LAYER}
    for layer in list(viewer.layers):
        if layer.metadata.get("wscovid_result") and layer.name not in keep and not _is_boxes(layer):
            viewer.layers.remove(layer)


def _is_boxes(layer) -> bool:
    return bool(layer.metadata.get("wscovid_boxes"))


def layer_boxes(layer) -> list[Box]:
    """The boxes currently in a boxes layer (rectangles snapped to whole voxels)."""
    geometry = layer.metadata.get("wscovid_geometry")
    if geometry is None:
        raise ValueError(
            f"layer {layer.name!r} has no CT geometry (metadata 'wscovid_geometry'); "
            "create boxes with the detection widget or open an exported boxes file"
        )
    return rectangles_to_boxes(layer.data, layer.features, geometry)


def layer_rejected(layer) -> list[Box]:
    """The detections the annotator rejected on this layer (deleted, or moved away from)."""
    return [Box(**row) for row in layer.metadata.get(REJECTED_KEY, [])]


def layer_reviewed(layer) -> list[int]:
    """The slices the annotator marked as reviewed on this boxes layer."""
    return sorted(int(z) for z in layer.metadata.get(REVIEWED_KEY, []))


def layer_reading(layer) -> Reading:
    """The annotator's reading held by a boxes layer (an empty one for no layer)."""
    if layer is None:
        return Reading()
    return Reading(tuple(layer_boxes(layer)), tuple(layer_rejected(layer)), frozenset(layer_reviewed(layer)))


def set_slice_reviewed(layer, index: int, reviewed: bool) -> None:
    marks = set(layer_reviewed(layer))
    (marks.add if reviewed else marks.discard)(int(index))
    layer.metadata = {**layer.metadata, REVIEWED_KEY: sorted(marks)}


def set_layer_rejected(layer, rejected: Sequence[Box]) -> None:
    layer.metadata = {**layer.metadata, REJECTED_KEY: [b.as_dict() for b in rejected]}


def geometries_equal(a: dict | None, b: dict | None) -> bool:
    from napari_wscovid.io.boxes_io import geometry_mismatch

    return a is not None and b is not None and not geometry_mismatch(a, b)


# -------------------------------------------------------------------------- edit tracking
def _action(event) -> str:
    action = getattr(event, "action", "")
    return str(getattr(action, "value", action))


class BoxEditTracker:
    """Keeps a boxes layer's features true to what the user did.

    A moved or resized detection becomes origin "edited"; a drawn box gets the
    ``feature_defaults`` (origin "added", the predicted class, score NaN because no
    model scored it, source "user"); a deleted box simply disappears. ``slice``
    and ``area_mm2`` follow the rectangle. Programmatic updates go through
    :meth:`paused` so they are not mistaken for edits.
    """

    def __init__(self, layer) -> None:
        self.layer = layer
        self._paused = 0
        self._cache = [np.array(v, dtype=float) for v in layer.data]
        layer.events.data.connect(self._on_data)

    def disconnect(self) -> None:
        self.layer.events.data.disconnect(self._on_data)

    @property
    def is_paused(self) -> bool:
        """Whether the layer is being changed by the program, not the user."""
        return self._paused > 0

    @contextmanager
    def paused(self):
        """Change the layer without recording edits."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._cache = [np.array(v, dtype=float) for v in self.layer.data]

    def _on_data(self, event) -> None:
        if self._paused:
            return
        action = _action(event)
        if action == "removing":
            self._reject([int(i) for i in event.data_indices if int(i) >= 0], self.layer.data)
            return
        if action == "removed":
            for i in sorted((int(i) for i in event.data_indices if int(i) >= 0), reverse=True):
                if i < len(self._cache):
                    del self._cache[i]
            self._cache = [np.array(v, dtype=float) for v in self.layer.data]
            return
        if action not in ("added", "changed"):
            return
        data = [np.array(v, dtype=float) for v in self.layer.data]
        changed, added = [], []
        for i, verts in enumerate(data):
            if i >= len(self._cache):
                added.append(i)
            elif verts.shape != self._cache[i].shape or not np.allclose(verts, self._cache[i]):
                changed.append(i)
        moved = [i for i in changed if self.layer.features.at[i, "origin"] == "detected"]
        # the place a detection was moved away from is rejected, or a re-run would put it back
        self._reject(moved, self._cache)
        self._cache = data
        if changed or added:
            self._update_rows(changed, added)

    def _reject(self, rows: list[int], vertices) -> None:
        """Remember the detections at ``rows`` (geometry from ``vertices``) as rejected."""
        layer = self.layer
        geometry = layer.metadata.get("wscovid_geometry")
        if not rows or geometry is None or "origin" not in layer.features:
            return
        boxes = rectangles_to_boxes(
            [vertices[i] for i in rows], layer.features.iloc[rows].reset_index(drop=True), geometry
        )
        # the annotator's own drawn boxes leave nothing behind that a re-run could bring back
        boxes = [b for b in boxes if b.origin in ("detected", "edited")]
        if boxes:
            set_layer_rejected(layer, add_rejected(layer_rejected(layer), boxes))
            logger.debug("rejected detections: %s", [b.as_dict() for b in boxes])

    def _update_rows(self, changed: list[int], added: list[int]) -> None:
        layer = self.layer
        geometry = layer.metadata.get("wscovid_geometry")
        features = layer.features.copy()
        defaults = box_feature_defaults(layer.metadata.get("default_class", ""))
        for col, dtype in BOX_FEATURE_DTYPES.items():
            if col not in features:
                features[col] = pd.Series([defaults[col]] * len(features), dtype=dtype)
        shape = geometry["shape"] if geometry else None
        for i in changed + added:
            z, y0, x0, y1, x1 = rectangle_to_voxels(layer.data[i], shape)
            if i in added:
                for col in ("class", "score", "origin", "source"):
                    features.at[i, col] = defaults[col]
            elif features.at[i, "origin"] == "detected":
                features.at[i, "origin"] = "edited"
            features.at[i, "slice"] = z
            if geometry is not None:
                features.at[i, "area_mm2"] = box_area_mm2(y0, x0, y1, x1, geometry)
        layer.features = features
        refresh_box_colors(layer)
        logger.debug("boxes edited: %s, added: %s", changed, added)


#: Edge widths (screen pixels): the annotator's boxes (edited, added) are drawn thicker than the
#: model's, so the two can be told apart at a glance in any colour.
DETECTED_EDGE_WIDTH, USER_EDGE_WIDTH = 1.0, 3.0


def box_styles(class_names, origins, classes: Sequence[str]) -> tuple[list[str], list[float]]:
    """Edge (and label) colour of each box from its class, edge width from its origin."""
    colors = [class_color(str(c), classes) for c in class_names]
    widths = [DETECTED_EDGE_WIDTH if str(o) == "detected" else USER_EDGE_WIDTH for o in origins]
    return colors, widths


def set_box_class(layer, rows: Sequence[int], class_name: str) -> int:
    """Give the boxes at ``rows`` the class ``class_name``; a detection becomes "edited" (the
    annotator's decision, which a re-run respects). Returns how many boxes changed."""
    features = layer.features.copy()
    changed = 0
    for i in rows:
        if features.at[i, "class"] != class_name:
            features.at[i, "class"] = class_name
            if features.at[i, "origin"] == "detected":
                features.at[i, "origin"] = "edited"
            changed += 1
    layer.features = features
    refresh_box_colors(layer)
    return changed


def replace_boxes(layer, boxes: list[Box]) -> None:
    """Make a shapes layer hold exactly ``boxes``, with their features and colours, in one redraw.

    Removing every shape and adding the new ones, then setting features and colours, redrew the
    layer and recomputed the viewer's dims over every layer at each step: 90-110 ms of a frozen
    viewer for 24 boxes on a 2-core CPU, against 40-56 ms this way (benchmarks/bench_ui_stall.py).
    The events held back during the change are sent once after it; pause the layer's
    :class:`BoxEditTracker` around the call, or it takes them for the annotator's edits.
    """
    from napari.layers.base import ActionType  # napari only where a layer exists

    # napari's own refresh blocker (private, hence the fallback): without it each assignment
    # below still re-slices the layer and redraws its thumbnail, events or not
    no_refresh = getattr(layer, "_block_refresh", contextlib.nullcontext)
    # napari's data setter clears the selection too, but silently under the blocker below: the
    # shapes controls would go on showing a selection of boxes that are gone
    layer.selected_data = set()
    with layer.events.blocker_all(), no_refresh():
        # a type per shape: napari's setter cannot extend a single type string
        layer.data = (boxes_to_rectangles(boxes), ["rectangle"] * len(boxes)) if boxes else []
        layer.features = box_features(boxes)
        refresh_box_colors(layer)
    layer.refresh()  # the drawing, the thumbnail and the extent, once
    layer.events.data(
        value=layer.data,
        action=ActionType.CHANGED,
        data_indices=tuple(range(len(boxes))),
        vertex_indices=((),),
    )
    for name in ("features", "current_edge_color", "edge_color", "edge_width"):
        getattr(layer.events, name)()


def refresh_box_colors(layer) -> None:
    """Edge colour of every box from its class (also the colour of the next drawn box), edge width
    from its origin, label text in the class colour (white text vanished on bright lung)."""
    classes = layer.metadata.get("classes", [])
    default = layer.metadata.get("default_class", "")
    if default:
        layer.current_edge_color = class_color(default, classes)
    layer.current_edge_width = USER_EDGE_WIDTH
    if layer.nshapes:
        colors, widths = box_styles(layer.features["class"], layer.features["origin"], classes)
        layer.edge_color, layer.edge_width = colors, widths
        # one colour per label; a box drawn later gets the default class's colour
        layer.text.color = {"array": colors, "default": class_color(default or str(colors[0]), classes)}
