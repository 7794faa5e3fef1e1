"""Layers built from a DetectionResult, and edit tracking on the boxes layer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps.standardize_color import transform_color

from napari_wscovid._widgets import layers as L
from napari_wscovid.io.boxes_io import boxes_to_rectangles
from napari_wscovid.review import merge_rerun


def _kwargs(volume):
    return {"scale": volume.spacing, "translate": volume.origin}


def test_result_layers_types_scales_and_ranges(viewer, ct_layer, small_volume, fake_result):
    tuples = L.result_layer_data(fake_result, L.ct_layer_kwargs(ct_layer), geometry=small_volume.geometry())
    layers = {kw["name"]: L.upsert_layer(viewer, d, kw, t) for d, kw, t in tuples}
    assert set(layers) == {
        "lung mask",
        "CAM conv3",
        "CAM conv4",
        "CAM conv5",
        "IG conv3",
        "IG conv4",
        "IG conv5",
        "joint saliency",
    }
    assert isinstance(layers["lung mask"], Labels)
    assert set(np.unique(layers["lung mask"].data)) == {0, 1, 2}
    for name, layer in layers.items():
        np.testing.assert_allclose(layer.scale, ct_layer.scale)
        np.testing.assert_allclose(layer.translate, ct_layer.translate)
        assert "Patient" not in name
        if name.startswith(("CAM", "IG")):
            assert isinstance(layer, Image) and not layer.visible
            assert layer.blending == "additive" and layer.colormap.name == "inferno"
            assert tuple(layer.contrast_limits) == (0, 255)  # uint8 maps: 255 means 1.0
    joint = layers["joint saliency"]
    assert joint.visible and joint.blending == "additive"
    assert tuple(joint.contrast_limits) == (0, float(fake_result.saliency["joint"].max()))


def test_rerun_reuses_layers_by_name(viewer, ct_layer, small_volume, fake_result):
    for _ in range(2):
        for d, kw, t in L.result_layer_data(fake_result, L.ct_layer_kwargs(ct_layer)):
            L.upsert_layer(viewer, d, kw, t)
    assert len([la for la in viewer.layers if la.name == "lung mask"]) == 1
    assert len(viewer.layers) == 1 + 8
    L.remove_stale_result_layers(viewer, ["lung mask"])
    assert [la.name for la in viewer.layers] == [ct_layer.name, "lung mask"]


def test_boxes_layer_rectangles_on_slices(viewer, small_volume, fake_result):
    data, kwargs, layer_type = L.boxes_layer_data(
        fake_result.boxes,
        _kwargs(small_volume),
        geometry=small_volume.geometry(),
        classes=fake_result.classes,
    )
    layer = viewer.add_layer(Shapes(data, **{k: v for k, v in kwargs.items()}))
    assert layer_type == "shapes" and layer.nshapes == 3
    assert all(t == "rectangle" for t in layer.shape_type)
    for box, verts in zip(fake_result.boxes, layer.data, strict=True):
        assert verts.shape == (4, 3) and np.all(verts[:, 0] == box.slice)
    assert list(layer.features["origin"]) == ["detected"] * 3
    assert layer.text.values[0] == "COVID-19"  # the number is in the table (slice P(class))
    assert [b.as_dict() for b in L.layer_boxes(layer)] == [b.as_dict() for b in fake_result.boxes]
    np.testing.assert_allclose(layer.edge_color[0], [1.0, 69 / 255, 58 / 255, 1.0], atol=1e-6)


def test_empty_boxes_layer(viewer, small_volume):
    data, kwargs, _ = L.boxes_layer_data([], _kwargs(small_volume), geometry=small_volume.geometry())
    layer = viewer.add_layer(Shapes(data, **kwargs))
    assert layer.nshapes == 0 and L.layer_boxes(layer) == []


def _tracked_layer(viewer, small_volume, boxes):
    data, kwargs, _ = L.boxes_layer_data(
        boxes,
        _kwargs(small_volume),
        geometry=small_volume.geometry(),
        classes=("NP", "CAP", "COVID-19"),
        default_class="COVID-19",
    )
    layer = viewer.add_layer(Shapes(data, **kwargs))
    return layer, L.BoxEditTracker(layer)


def test_moved_box_becomes_edited(viewer, small_volume, fake_result):
    layer, _ = _tracked_layer(viewer, small_volume, fake_result.boxes)
    data = [v.copy() for v in layer.data]
    data[1][:, 1] += 3  # move the second box 3 voxels down
    data[1][2:, 2] += 2  # and widen it by 2 voxels
    layer.data = data
    assert list(layer.features["origin"]) == ["detected", "edited", "detected"]
    moved = L.layer_boxes(layer)[1]
    old = fake_result.boxes[1]
    assert (moved.y0, moved.y1) == (old.y0 + 3, old.y1 + 3)
    assert moved.area_mm2 == (old.y1 - old.y0) * (old.x1 - old.x0 + 2) * 0.75 * 0.8
    assert moved.score == old.score


def test_drawn_box_is_added_and_deleted_box_disappears(viewer, small_volume, fake_result):
    layer, _ = _tracked_layer(viewer, small_volume, fake_result.boxes)
    new = boxes_to_rectangles([fake_result.boxes[0]])[0]
    new[:, 0] = 6
    layer.add_rectangles([new])
    f = layer.features.iloc[-1]
    assert (f["origin"], f["class"], f["source"], f["slice"]) == ("added", "COVID-19", "user", 6)
    assert math.isnan(f["score"]) and f["area_mm2"] > 0
    layer.selected_data = {0}
    layer.remove_selected()
    assert list(layer.features["origin"]) == ["detected", "detected", "added"]
    layer.selected_data = {0}
    layer.remove_selected()
    data = [v.copy() for v in layer.data]
    data[0][:, 2] -= 1
    layer.data = data  # the cache follows removals: the right box is marked
    assert list(layer.features["origin"]) == ["edited", "added"]


def test_merge_keeps_user_boxes(fake_result):
    old = [b for b in fake_result.boxes]
    old[0] = type(old[0])(**{**old[0].as_dict(), "origin": "edited", "y0": 7})
    added = type(old[0])(**{**old[0].as_dict(), "origin": "added", "slice": 7, "score": math.nan})
    merged, _ = merge_rerun([*old, added], fake_result.boxes)
    origins = [b.origin for b in merged]
    assert origins.count("edited") == 1 and origins.count("added") == 1
    # the new detection under the edited box is dropped; the others replace the old detections
    assert origins.count("detected") == 2


def test_replace_boxes_holds_exactly_the_new_boxes_and_tells_listeners_once(
    viewer, small_volume, fake_result
):
    layer, tracker = _tracked_layer(viewer, small_volume, fake_result.boxes)
    seen = {"data": 0, "features": 0, "set_data": 0}
    for name in seen:
        getattr(layer.events, name).connect(lambda event, name=name: seen.__setitem__(name, seen[name] + 1))
    one = fake_result.boxes[1]
    edited = dataclasses.replace(fake_result.boxes[0], class_name="CAP", origin="edited")
    for boxes in ([edited, one], [one, edited, *fake_result.boxes[2:], one], []):
        for name in seen:
            seen[name] = 0
        with tracker.paused():  # as the dock does: a replacement is not the annotator's edit
            L.replace_boxes(layer, boxes)
        assert [b.as_dict() for b in L.layer_boxes(layer)] == [b.as_dict() for b in boxes]
        colors, widths = L.box_styles(
            [b.class_name for b in boxes], [b.origin for b in boxes], layer.metadata["classes"]
        )
        if boxes:
            np.testing.assert_allclose(layer.edge_color, transform_color(colors), atol=1e-6)
            np.testing.assert_allclose(layer.edge_width, widths)
            assert list(layer.text.values) == [b.class_name for b in boxes]
        # the events held back during the change come once, after it, and the layer is redrawn
        assert seen["data"] == 1 and seen["features"] == 1 and seen["set_data"] >= 1


def test_a_result_layer_reused_from_an_oblique_ct_sits_on_the_next_ct(viewer, qtbot, errors, monkeypatch):
    """The lung mask (and every map re-used by name) kept an oblique CT's rotation when the next
    run was on an axis-aligned CT: identity transforms were left out of the settings."""
    from napari_wscovid._reader import ct_layer_data
    from napari_wscovid._widgets import detection
    from napari_wscovid.io.volume import CTVolume
    from tests._qt.conftest import FakePipeline, as_plugin_sees_it, make_fake_result

    turn = np.radians(15)
    hu = np.random.default_rng(0).integers(-1000, 100, size=(8, 40, 48)).astype(np.int16)
    grid = dict(spacing=(5.0, 0.75, 0.8), origin=(-40.0, -100.5, -120.25), source="test")
    oblique = CTVolume(
        hu=hu,
        direction=[[1, 0, 0], [0, np.cos(turn), -np.sin(turn)], [0, np.sin(turn), np.cos(turn)]],
        **grid,
    )
    axial = CTVolume(hu=hu.copy(), **grid)
    for volume, name in ((oblique, "CT oblique"), (axial, "CT axial")):
        data, kwargs, _ = ct_layer_data(volume, name=name)
        ct = viewer.add_image(data, **kwargs)
        dock = detection.DetectionWidget(
            as_plugin_sees_it(viewer), detect_iter=FakePipeline(make_fake_result(volume)).detect_iter
        )
        qtbot.addWidget(dock)
        dock._ct_combo.setCurrentText(name)
        dock._run_btn.click()
        qtbot.waitUntil(lambda d=dock: d._worker is None, timeout=20000)
        dock._stop_slice_worker()
        for layer in (viewer.layers[L.LUNG_LAYER], viewer.layers[L.BOXES_LAYER]):
            np.testing.assert_allclose(
                layer.data_to_world((4, 20, 24)), ct.data_to_world((4, 20, 24)), atol=1e-6
            )
    assert errors == []


def test_a_ct_placed_by_an_affine_alone_gives_its_grid_to_detection(viewer):
    """Another reader may place a CT with napari's `affine` only: it was taken as index space."""
    from napari_wscovid._widgets.detection import volume_from_layer

    affine = np.eye(4)
    affine[:3, :3] = np.diag([2.5, 0.7, 0.7]) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    affine[:3, 3] = (-92.5, 40.0, -60.0)
    layer = viewer.add_image(np.full((6, 20, 24), -1000, np.int16), affine=affine, name="elsewhere")
    volume = volume_from_layer(layer)
    for index in [(0, 0, 0), (3, 5, 6), (5, 19, 23)]:
        np.testing.assert_allclose(
            volume.index_to_world(np.array([index], float))[0], layer.data_to_world(index)
        )
