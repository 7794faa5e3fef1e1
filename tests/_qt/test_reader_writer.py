"""npe2 reader, writer and sample data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from napari_wscovid import _reader, _sample_data
from napari_wscovid._reader import get_reader
from napari_wscovid._widgets import layers as L
from napari_wscovid._writer import write_boxes
from napari_wscovid.io.boxes_io import load_boxes, save_boxes
from napari_wscovid.results import Box

io = pytest.importorskip("napari_wscovid.io")
if not hasattr(io, "load_ct"):
    pytest.skip("napari_wscovid.io.load_ct has not landed yet", allow_module_level=True)


def _write_itk(path, spacing_xyz=(0.7, 0.8, 2.5), origin_xyz=(-150.0, -170.5, -300.25)):
    hu = np.random.default_rng(0).integers(-1000, 400, size=(6, 20, 24)).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin_xyz)
    sitk.WriteImage(image, str(path))
    return hu


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.mha"])
def test_reader_gives_image_in_patient_mm(tmp_path, name):
    path = tmp_path / name
    hu = _write_itk(path)
    reader = get_reader(str(path))
    assert reader is not None
    ((data, kwargs, layer_type),) = reader(str(path))
    assert layer_type == "image"
    np.testing.assert_array_equal(np.asarray(data), hu)
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.7))
    np.testing.assert_allclose(kwargs["translate"], (-300.25, -170.5, -150.0))
    assert kwargs["contrast_limits"] == (-1350.0, 150.0) and kwargs["colormap"] == "gray"
    meta = kwargs["metadata"]
    assert meta["wscovid_geometry"]["shape"] == [6, 20, 24] and meta["is_hu"] is True
    assert kwargs["name"] == f"CT {meta['series_key']}" and meta["series_key"].startswith("ct-")
    assert meta["wscovid_volume"].shape == (6, 20, 24)


def test_reader_opens_in_viewer(viewer, tmp_path):
    path = tmp_path / "ct.nrrd"
    _write_itk(path)
    ((data, kwargs, _),) = get_reader(str(path))(str(path))
    layer = viewer.add_image(data, **kwargs)
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.7))
    np.testing.assert_allclose(layer.translate, (-300.25, -170.5, -150.0))


def test_reader_declines_and_fails_clearly(tmp_path):
    assert get_reader(str(tmp_path / "notes.txt")) is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    # a folder without DICOM: the plugin's own reason, not napari's "refused the file"
    with pytest.raises(ValueError, match="no CT image series found"):
        get_reader(str(tmp_path / "empty"))(str(tmp_path / "empty"))
    (tmp_path / "data.zarr").mkdir()
    assert get_reader(str(tmp_path / "data.zarr")) is None
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        get_reader(str(broken))(str(broken))


def test_reader_reads_a_dicom_folder(tmp_path, small_volume):
    from napari_wscovid.io import write_dicom_series

    folder = tmp_path / "series"
    write_dicom_series(small_volume, folder, patient_name="DOE^JANE")
    reader = get_reader(str(folder))
    assert reader is not None
    ((data, kwargs, _),) = reader(str(folder))
    assert data.shape == small_volume.shape
    np.testing.assert_allclose(kwargs["scale"], small_volume.spacing, rtol=1e-5)
    assert "DOE" not in kwargs["name"] and "DOE" not in repr(
        {k: v for k, v in kwargs["metadata"].items() if k != "wscovid_volume"}
    )


def test_boxes_file_opens_as_editable_shapes(tmp_path, small_volume, viewer):
    boxes = [Box(2, 3, 4, 9, 12, "COVID-19", 0.75, 42.0, "edited", "joint")]
    path = save_boxes(
        tmp_path / "a.boxes.json",
        boxes,
        small_volume.geometry(),
        series_key="ct-x",
        classes=("NP", "CAP", "COVID-19"),
    )
    ((data, kwargs, layer_type),) = get_reader(str(path))(str(path))
    layer = viewer.add_shapes(data, **kwargs)
    assert layer_type == "shapes" and layer.editable
    np.testing.assert_allclose(layer.scale, small_volume.spacing)
    np.testing.assert_allclose(layer.translate, small_volume.origin)
    assert [b.as_dict() for b in L.layer_boxes(layer)] == [b.as_dict() for b in boxes]
    assert layer.metadata["default_class"] == "CAP"  # first non-NP class for boxes the user draws


def test_boxes_file_refused_on_a_ct_of_another_grid(tmp_path, small_volume, monkeypatch, viewer, ct_layer):
    other = dict(small_volume.geometry(), origin=[0.0, 0.0, 0.0])
    path = save_boxes(tmp_path / "a.boxes.json", [Box(1, 1, 1, 2, 2, "CAP", 0.5)], other)
    monkeypatch.setattr(_reader, "_open_ct_geometries", lambda: [small_volume.geometry()])
    with pytest.raises(ValueError, match="different geometry"):
        get_reader(str(path))(str(path))


def _boxes_layer_tuple(small_volume, fake_result):
    return L.boxes_layer_data(
        fake_result.boxes,
        {"scale": small_volume.spacing, "translate": small_volume.origin},
        geometry=small_volume.geometry(),
        series_key="ct-w",
        classes=fake_result.classes,
    )


def test_writer_json_csv_and_refusal(tmp_path, viewer, small_volume, fake_result):
    data, kwargs, _ = _boxes_layer_tuple(small_volume, fake_result)
    layer = viewer.add_shapes(data, **kwargs)
    ldata, attrs, _ = layer.as_layer_data_tuple()
    out = write_boxes(str(tmp_path / "w.json"), ldata, attrs)
    assert out == [str(tmp_path / "w.json")]
    boxes, meta = load_boxes(out[0], expected_geometry=small_volume.geometry())
    assert [b.as_dict() for b in boxes] == [b.as_dict() for b in fake_result.boxes]
    assert meta["series_key"] == "ct-w"
    write_boxes(str(tmp_path / "w.json"), ldata, attrs)  # napari's dialog asked: replaced, old kept
    assert len(list(tmp_path.glob("w.*.bak.json"))) == 1
    csv_out = write_boxes(str(tmp_path / "w.csv"), [], {**attrs, "features": None, "shape_type": []})
    assert load_boxes(csv_out[0])[0] == []
    with pytest.raises(ValueError, match="no CT geometry"):
        write_boxes(str(tmp_path / "x.json"), ldata, {**attrs, "metadata": {}})
    assert json.loads((tmp_path / "w.json").read_text())["format"] == "napari-wscovid-boxes"


@pytest.mark.parametrize("name", ["boxes.json", "reviewed by AB.json", "boxes.csv", "export.CSV"])
def test_boxes_saved_under_any_json_or_csv_name_open_again(
    tmp_path, viewer, small_volume, fake_result, monkeypatch, name
):
    data, kwargs, _ = _boxes_layer_tuple(small_volume, fake_result)
    ldata, attrs, _ = viewer.add_shapes(data, **kwargs).as_layer_data_tuple()
    (out,) = write_boxes(str(tmp_path / name), ldata, attrs)
    # a CSV has no grid: it is placed on the open CT its millimetre corners fit
    monkeypatch.setattr(_reader, "_open_ct_geometries", lambda: [small_volume.geometry()])
    reader = get_reader(out)
    assert reader is not None, f"{name} written by the plugin is not opened by it"
    ((data2, kwargs2, layer_type),) = reader(out)
    layer = viewer.add_shapes(data2, **kwargs2)
    assert layer_type == "shapes"
    assert [b.as_dict() for b in L.layer_boxes(layer)] == [b.as_dict() for b in fake_result.boxes]
    np.testing.assert_allclose(layer.scale, small_volume.spacing)


def test_other_json_and_csv_are_left_to_other_readers(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"format": "something-else", "boxes": []}')
    (tmp_path / "table.csv").write_text("a,b,c\n1,2,3\n")
    assert get_reader(str(tmp_path / "config.json")) is None
    assert get_reader(str(tmp_path / "table.csv")) is None
    monkeypatch.setattr(_reader, "_open_ct_geometries", lambda: [])
    csv_path = tmp_path / "b.csv"
    save_boxes(csv_path, [Box(1, 1, 1, 2, 2, "CAP", 0.5)], {"shape": [3, 4, 4], "spacing": [1, 1, 1],
               "origin": [0, 0, 0], "direction": np.eye(3).ravel().tolist()})  # fmt: skip
    with pytest.raises(ValueError, match="open its CT first"):
        get_reader(str(csv_path))(str(csv_path))


def test_sample_falls_back_to_generated_phantom(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(_sample_data, "SAMPLE_DIR", tmp_path / "missing")
    monkeypatch.setattr(
        _sample_data, "FALLBACK_KWARGS", {"kind": "COVID-19", "seed": 0, "n_slices": 6, "size": 48}
    )
    with caplog.at_level("INFO", logger="napari_wscovid._sample_data"):
        layers = _sample_data.load_sample_phantom()
    assert "generating the phantom" in caplog.text
    (ct, ct_kwargs, ct_type), (mask, mask_kwargs, mask_type) = layers
    assert (ct_type, mask_type) == ("image", "labels")
    assert mask_kwargs["name"] == "true lesions (phantom)" and mask_kwargs["visible"] is False
    assert mask.shape == ct.shape and mask.max() > 0
    assert mask_kwargs["scale"] == ct_kwargs["scale"]


def test_sample_reads_shipped_dicom(tmp_path, monkeypatch, small_volume):
    from napari_wscovid.io import write_dicom_series

    root = tmp_path / "phantom_covid"
    write_dicom_series(small_volume, root / "dicom")
    mask = np.zeros(small_volume.shape, np.uint8)
    mask[3, 10:20, 10:20] = 1
    image = sitk.GetImageFromArray(mask)
    sitk.WriteImage(image, str(root / "lesion_mask.nii.gz"))
    monkeypatch.setattr(_sample_data, "SAMPLE_DIR", root)
    (ct, _, _), (lesions, _, _) = _sample_data.load_sample_phantom()
    assert ct.shape == small_volume.shape
    np.testing.assert_array_equal(lesions, mask)


def test_a_csv_opened_on_its_ct_takes_that_cts_key_and_class_list(
    tmp_path, viewer, ct_layer, small_volume, fake_result, monkeypatch
):
    """A CSV holds no series key and no class list: the layer gets the key of the CT it fits (its
    autosave and exports belong to that CT) and the classes of that CT's boxes layer, so a box can
    still be given a class none of the file's rows has."""
    import napari

    monkeypatch.setattr(napari, "current_viewer", lambda: viewer)  # offscreen: a bare ViewerModel
    data, kwargs, _ = _boxes_layer_tuple(small_volume, fake_result)
    viewer.add_shapes(data, **kwargs)
    only_cap = [Box(1, 1, 1, 3, 3, "CAP", 0.5, origin="edited")]
    path = save_boxes(tmp_path / "only CAP.csv", only_cap, small_volume.geometry())
    ((_, kwargs2, _),) = get_reader(str(path))(str(path))
    meta = kwargs2["metadata"]
    assert meta["series_key"] == small_volume.series_key == ct_layer.metadata["series_key"]
    assert meta["classes"] == list(fake_result.classes)
    assert "COVID-19" in meta["classes"]


def test_a_loader_warning_reaches_the_napari_user(tmp_path, monkeypatch):
    """A folder of two series loaded the largest with only a log line: the napari user never
    learned a series was left out."""
    import napari.utils.notifications

    from tests.io.io_builders import write_series

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", shown.append)
    write_series(tmp_path / "two", n=6, series_uid="1.2.3.1")
    write_series(tmp_path / "two", n=3, series_uid="1.2.3.2", names=[f"other{k}.dcm" for k in range(3)])
    (layer_data,) = get_reader(str(tmp_path / "two"))(str(tmp_path / "two"))
    assert layer_data[0].shape[0] == 6
    assert any("series" in message and message.startswith("CT ct-") for message in shown), shown


def test_a_png_slice_opens_as_a_one_slice_ct_the_dock_can_run_on(tmp_path, viewer):
    """The README lists PNG/JPG among the inputs, but only the command line read them: napari's
    own reader made a 2-D layer, and the dock answered "Open a CT first"."""
    from PIL import Image

    from napari_wscovid._widgets.detection import DetectionWidget

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80)).astype(np.uint8)).save(tmp_path / "slice.png")
    reader = get_reader(str(tmp_path / "slice.png"))
    assert reader is not None
    ((data, kwargs, layer_type),) = reader(str(tmp_path / "slice.png"))
    assert layer_type == "image" and data.shape == (1, 64, 80)
    viewer.add_image(data, **kwargs)
    dock = DetectionWidget(viewer)
    assert dock._ct_combo.currentText() == kwargs["name"]
