"""Fixtures for the napari/Qt tests: a small CT, a fake detection result, a fake pipeline.

``viewer`` is a real napari viewer (``make_napari_viewer``) when OpenGL works; on a
headless machine without it (``QT_QPA_PLATFORM=offscreen`` and no display) vispy cannot
draw a layer, so the tests run against napari's ``ViewerModel`` -- the same layer list,
dims and camera the widget uses, without a canvas.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box, DetectionResult

CLASSES = ("NP", "CAP", "COVID-19")


def _opengl_available() -> bool:
    from qtpy.QtGui import QOpenGLContext

    return bool(QOpenGLContext().create())


@pytest.fixture(scope="session")
def opengl(qapp) -> bool:
    return _opengl_available()


@pytest.fixture
def viewer(request, opengl, qtbot):
    if opengl:
        return request.getfixturevalue("make_napari_viewer")()
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture
def small_volume() -> CTVolume:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 100, size=(8, 40, 48)).astype(np.int16)
    return CTVolume(hu=hu, spacing=(5.0, 0.75, 0.8), origin=(-40.0, -100.5, -120.25), source="test")


def make_fake_result(volume: CTVolume, n_boxes: int = 3) -> DetectionResult:
    rng = np.random.default_rng(1)
    nz, ny, nx = volume.shape
    lung = np.zeros(volume.shape, np.uint8)
    lung[:, 5:35, 4:22] = 1
    lung[:, 5:35, 26:44] = 2
    probs = rng.dirichlet(np.ones(3), size=nz).astype(np.float32)
    probs[0] = np.nan
    maps = {k: rng.integers(0, 256, size=volume.shape, dtype=np.uint8) for k in ("conv3", "conv4", "conv5")}
    saliency = dict(maps, joint=(rng.random(volume.shape) * 200).astype(np.uint8))
    boxes = [
        Box(
            slice=2 + i,
            y0=6 + i,
            x0=5,
            y1=14 + i,
            x1=15,
            class_name="COVID-19",
            score=0.9 - 0.1 * i,
            area_mm2=8 * 10 * 0.75 * 0.8,
            origin="detected",
            source="joint",
        )
        for i in range(n_boxes)
    ]
    return DetectionResult(
        classes=CLASSES,
        slice_probs=probs,
        patient_probs=np.array([0.1, 0.2, 0.7], np.float32),
        lung_mask=lung,
        cams=maps,
        saliency=saliency,
        boxes=boxes,
        involvement={"total_percent": 12.5},
        model_info={"name": "fake", "version": "0", "sha256": "0" * 64},
        device="cpu",
        lung_volume_ml=1234.0,
        saliency_slices=tuple(range(1, nz)),
    )


@pytest.fixture
def fake_result(small_volume) -> DetectionResult:
    return make_fake_result(small_volume)


class FakePipeline:
    """Stands in for the core's ``detect_iter``: a slow-enough generator with a fixed result."""

    def __init__(self, result, steps: int = 4, delay: float = 0.02, error: Exception | None = None):
        self.result, self.steps, self.delay, self.error = result, steps, delay, error
        self.calls: list[dict] = []

    def detect_iter(
        self,
        volume,
        *,
        model="default",
        device="auto",
        saliency="positive",
        slices=None,
        ig_steps=None,
        min_box_area_mm2=20.0,
        lung_method=None,
        stop_explaining=None,
    ):
        self.stop_explaining = stop_explaining
        self.calls.append(
            {
                "model": model,
                "lung_method": lung_method,
                "device": device,
                "saliency": saliency,
                "ig_steps": ig_steps,
                "min_box_area_mm2": min_box_area_mm2,
                "shape": volume.shape,
            }
        )
        for i in range(self.steps):
            time.sleep(self.delay)
            yield i, self.steps, f"step {i}"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def fake_pipeline(fake_result):
    """Passed to the widget as its ``detect_iter`` (the ``widget`` fixture does)."""
    return FakePipeline(fake_result)


@pytest.fixture
def ct_layer(viewer, small_volume):
    from napari_wscovid._reader import ct_layer_data

    data, kwargs, _ = ct_layer_data(small_volume)
    return viewer.add_image(data, **kwargs)


@pytest.fixture
def errors(monkeypatch):
    """The dock's error messages, collected (its info messages are dropped)."""
    from napari_wscovid._widgets import detection

    shown: list[str] = []
    monkeypatch.setattr(detection, "show_error", shown.append)
    monkeypatch.setattr(detection, "show_info", lambda msg: None)
    return shown


def as_plugin_sees_it(viewer):
    """The viewer as napari hands it to a plugin's dock: a proxy whose ``add_*`` methods return
    proxies of the layers (ids and types differ from the layers in ``viewer.layers``)."""
    from napari.utils._proxies import PublicOnlyProxy

    return PublicOnlyProxy(viewer)
