"""Networks and the weights registry (see :mod:`napari_wscovid.models.registry`)."""

from napari_wscovid.models.registry import (
    ModelLoadError,
    available_models,
    load_model,
    model_info,
    save_model,
    select_device,
)
from napari_wscovid.models.wsnet import TASK_CLASSES, WSNet, WSNetConfig, tiny_config

__all__ = [
    "TASK_CLASSES",
    "ModelLoadError",
    "WSNet",
    "WSNetConfig",
    "available_models",
    "load_model",
    "model_info",
    "save_model",
    "select_device",
    "tiny_config",
]
