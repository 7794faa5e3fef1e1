"""Every explanation the methods show: CAM volumes, integrated gradients, the joint saliency and
its boxes, Grad-CAM++; no napari, no Qt."""

from napari_wscovid.explain.cam import cam_volume
from napari_wscovid.explain.integrated_gradients import (
    DEFAULT_IG_METHOD,
    DEFAULT_IG_STEPS,
    integrated_gradients,
    multiscale_saliency,
    path_integrals,
    prepare_model,
    quadrature,
)
from napari_wscovid.explain.saliency import SALIENCY_LAYERS, explain_slices

__all__ = [
    "DEFAULT_IG_METHOD",
    "DEFAULT_IG_STEPS",
    "SALIENCY_LAYERS",
    "cam_volume",
    "explain_slices",
    "integrated_gradients",
    "multiscale_saliency",
    "path_integrals",
    "prepare_model",
    "quadrature",
]
