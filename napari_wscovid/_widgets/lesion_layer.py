"""The lesions of a Wu et al. 2021 detection as a napari Points layer-data tuple.

One point per lesion at its activation peak (voxel ``slice, y, x``), placed on the CT in mm by
the volume's ``scale``/``translate``, coloured by lesion type (cluster), with a features table
the layer's tooltip and the table widgets show. A pure function: no Qt, no napari import.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_wscovid.results import DetectionResult

LESION_LAYER = "lesion types (FeCNN)"
# Colour per cluster, in density order (cluster 0 is the least dense): GGO-like in cyan,
# consolidation-like in orange, further clusters after them.
CLUSTER_COLORS = ("#64d2ff", "#ff9f0a", "#bf5af2", "#30d158", "#ffd60a", "#ff375f", "#ffffff")
UNTYPED_COLOR = "#8e8e93"
POINT_SIZE_MM = 6.0


def _rgba(hex_color: str) -> list[float]:
    h = hex_color.lstrip("#")
    return [int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4)] + [1.0]


def cluster_color(cluster: int) -> str:
    """Hex colour of a lesion type; an unclustered lesion (-1) is grey."""
    return UNTYPED_COLOR if cluster < 0 else CLUSTER_COLORS[cluster % len(CLUSTER_COLORS)]


def lesion_features(result: DetectionResult) -> pd.DataFrame:
    """One row per lesion: cluster, type name, own and per-cluster soft scores, area, activation."""
    names = list(result.lesion_types.get("names", []))
    k = int(result.lesion_types.get("k", 0))
    rows = result.lesions
    data = {
        "cluster": pd.Series([int(les.cluster) for les in rows], dtype=int),
        "type": pd.Series(
            [names[les.cluster] if 0 <= les.cluster < len(names) else "untyped" for les in rows], dtype=object
        ),
        "soft_score": pd.Series(
            [
                float(les.soft_scores[les.cluster]) if 0 <= les.cluster < len(les.soft_scores) else np.nan
                for les in rows
            ],
            dtype=float,
        ),
    }
    for c in range(k):
        data[f"score_{c}"] = pd.Series(
            [float(les.soft_scores[c]) if c < len(les.soft_scores) else np.nan for les in rows], dtype=float
        )
    data["area_mm2"] = pd.Series([float(les.area_mm2) for les in rows], dtype=float)
    data["activation"] = pd.Series([float(les.activation) for les in rows], dtype=float)
    data["slice"] = pd.Series([int(les.slice) for les in rows], dtype=int)
    return pd.DataFrame(data)


def lesion_points_layer(result: DetectionResult, volume) -> tuple[np.ndarray, dict, str]:
    """``(data, kwargs, "points")`` for ``viewer.add_points(data, **kwargs)`` or a reader/widget.

    Parameters
    ----------
    result : DetectionResult
        With ``lesions`` (and ``lesion_types``) from ``napari_wscovid.methods.fecnn``.
    volume : CTVolume
        The CT the result belongs to; its ``layer_kwargs()`` place the points in mm.
    """
    lesions = result.lesions
    data = np.array([[les.slice, les.y, les.x] for les in lesions], dtype=float).reshape(-1, 3)
    placement = {
        k: (tuple(float(v) for v in val) if k in ("scale", "translate") else val)
        for k, val in volume.layer_kwargs().items()
    }
    in_plane = min(float(s) for s in volume.spacing[1:])
    colors = np.array([_rgba(cluster_color(int(les.cluster))) for les in lesions], dtype=float).reshape(-1, 4)
    kwargs = {
        **placement,
        "name": LESION_LAYER,
        "features": lesion_features(result),
        # napari cannot take an empty (0, 4) colour array: an empty layer gets one colour
        "face_color": colors if len(lesions) else UNTYPED_COLOR,
        "border_color": "white",
        "border_width": 0.1,
        "size": POINT_SIZE_MM / in_plane,
        "symbol": "disc",
        "text": {"string": "{cluster}", "size": 10, "color": "white", "anchor": "upper_left"},
        "metadata": {
            "wscovid_result": True,
            "lesion_type_names": list(result.lesion_types.get("names", [])),
            "cluster_colors": {
                int(c): cluster_color(int(c)) for c in range(int(result.lesion_types.get("k", 0)))
            },
        },
    }
    return data, kwargs, "points"
