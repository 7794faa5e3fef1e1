"""Class activation maps, integrated gradients and the joint saliency; no napari, no Qt."""

from napari_wscovid.explain.cam import class_cams, upsample_maps
from napari_wscovid.explain.integrated_gradients import (
    DEFAULT_IG_METHOD,
    DEFAULT_IG_STEPS,
    integrated_gradients,
    multiscale_saliency,
    path_integrals,
    prepare_model,
    quadrature,
)

__all__ = [
    "DEFAULT_IG_METHOD",
    "DEFAULT_IG_STEPS",
    "class_cams",
    "integrated_gradients",
    "multiscale_saliency",
    "path_integrals",
    "prepare_model",
    "quadrature",
    "upsample_maps",
]
