"""Case 22 (LPS vs RAS round trip) and the writers: DICOM series, NIfTI/MHA/NRRD, atomic saves."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from napari_wscovid.io import CTVolume, load_ct, write_dicom_series, write_image
from napari_wscovid.io import write as write_io

SHAPE = (6, 10, 12)
MARKER = (4, 1, 10)  # superior (high z), anterior (low y), left (high x) in LPS


@pytest.fixture
def marked_volume() -> CTVolume:
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[1:5, 3:8, 2:9] = 40.0
    hu[MARKER] = 1200.0
    return CTVolume(hu=hu, spacing=(2.5, 0.8, 0.6), origin=(-50.0, -30.0, -40.0))


def _marker_world(volume: CTVolume) -> np.ndarray:
    index = np.unravel_index(np.argmax(volume.hu), volume.shape)
    return volume.index_to_world(index)


def test_case22_marker_lands_on_same_world_point_in_every_format(tmp_path, marked_volume):
    expected = marked_volume.index_to_world(MARKER)
    write_dicom_series(marked_volume, tmp_path / "dicom")
    write_image(marked_volume, tmp_path / "ours.nii.gz")
    write_image(marked_volume, tmp_path / "ours.mha")
    write_image(marked_volume, tmp_path / "ours.nrrd")
    for source in ("dicom", "ours.nii.gz", "ours.mha", "ours.nrrd"):
        loaded = load_ct(tmp_path / source)
        np.testing.assert_allclose(_marker_world(loaded), expected, atol=1e-3, err_msg=source)
        assert loaded.shape == SHAPE and loaded.spacing == pytest.approx(marked_volume.spacing)


def test_case22_independent_ras_nifti_converted_to_lps(tmp_path):
    # written with nibabel alone, in RAS: i runs to the patient's right, j anterior, k superior
    zooms = np.array([0.6, 0.8, 2.5])
    translation = np.array([-20.0, -10.0, -60.0])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(zooms)
    affine[:3, 3] = translation
    data = np.full((12, 10, 6), -1000, dtype=np.int16)
    marker_ijk = np.array([1, 8, 4])  # low i = left, high j = anterior, high k = superior
    data[tuple(marker_ijk)] = 1200
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")
    ras = translation + zooms * marker_ijk
    lps_zyx = np.array([ras[2], -ras[1], -ras[0]])
    volume = load_ct(tmp_path / "ras.nii.gz")
    np.testing.assert_allclose(_marker_world(volume), lps_zyx, atol=1e-4)
    index = np.unravel_index(np.argmax(volume.hu), volume.shape)
    assert index == (4, 1, 10)  # superior end, anterior row, left column: radiological layout
    assert np.allclose(volume.direction, np.eye(3))


def test_case22_nrrd_in_ras_space_converted_to_lps(tmp_path):
    data = np.full((12, 10, 6), -1000, dtype=np.int16)  # pynrrd default: (x, y, z) index order
    data[1, 8, 4] = 1200
    header = {
        "space": "right-anterior-superior",
        "space directions": np.diag([0.6, 0.8, 2.5]),
        "space origin": np.array([-20.0, -10.0, -60.0]),
    }
    nrrd.write(str(tmp_path / "ras.nrrd"), data, header)
    volume = load_ct(tmp_path / "ras.nrrd")
    ras = np.array([-20.0, -10.0, -60.0]) + np.array([0.6, 0.8, 2.5]) * [1, 8, 4]
    np.testing.assert_allclose(_marker_world(volume), [ras[2], -ras[1], -ras[0]], atol=1e-4)


def test_write_dicom_series_tags_and_storage(tmp_path):
    hu = np.full((3, 8, 6), -1000.0, dtype=np.float32)
    hu[1, 2, 3] = 3000.0
    volume = CTVolume(hu=hu, spacing=(2.0, 0.5, 1.0), origin=(10.0, 20.0, 30.0))
    paths = write_dicom_series(
        volume, tmp_path / "out", patient_name="Zoë^Test", series_description="phantom"
    )
    assert len(paths) == 3
    ds = pydicom.dcmread(paths[1])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 1.0]  # [row (dy), column (dx)]
    assert [float(v) for v in ds.ImagePositionPatient] == [30.0, 20.0, 12.0]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.RescaleIntercept) == -1024 and ds.PixelRepresentation == 0
    assert str(ds.PatientName) == "Zoë^Test"
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert len(uids) == 3
    np.testing.assert_array_equal(load_ct(tmp_path / "out").hu, hu)

    negative = CTVolume(hu=np.full((1, 4, 4), -1200.0, np.float32), spacing=(1, 1, 1), origin=(0, 0, 0))
    (path,) = write_dicom_series(negative, tmp_path / "signed")
    assert pydicom.dcmread(path).PixelRepresentation == 1  # stored -176 needs int16


def test_write_dicom_series_compressed_and_never_overwrites(tmp_path, marked_volume):
    write_dicom_series(marked_volume, tmp_path / "rle", compress=True)
    assert (
        pydicom.dcmread(tmp_path / "rle" / "slice_0000.dcm").file_meta.TransferSyntaxUID
        == "1.2.840.10008.1.2.5"
    )
    np.testing.assert_array_equal(load_ct(tmp_path / "rle").hu, marked_volume.hu)
    before = (tmp_path / "rle" / "slice_0000.dcm").read_bytes()
    with pytest.raises(FileExistsError):
        write_dicom_series(marked_volume, tmp_path / "rle")
    assert (tmp_path / "rle" / "slice_0000.dcm").read_bytes() == before
    write_dicom_series(marked_volume, tmp_path / "rle", overwrite=True)


def test_write_image_mask_on_input_geometry(tmp_path, marked_volume):
    mask = marked_volume.hu > 0
    path = write_image(mask, tmp_path / "lung_mask.nii.gz", like=marked_volume)
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert image.GetSpacing() == pytest.approx(marked_volume.spacing[::-1])
    assert image.GetOrigin() == pytest.approx(marked_volume.origin[::-1], abs=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mask)
    with pytest.raises(ValueError, match="like="):
        write_image(mask, tmp_path / "other.nii.gz")
    with pytest.raises(ValueError, match="shape"):
        write_image(mask[:2], tmp_path / "other.nii.gz", like=marked_volume)


def test_write_image_is_atomic_and_keeps_the_previous_file(tmp_path, marked_volume, monkeypatch):
    target = tmp_path / "volume.mha"
    write_image(marked_volume, target)
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        write_image(marked_volume, target)

    def crash_halfway(image, name, **kwargs):
        with open(name, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        write_image(marked_volume, target, overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.mha"]
    assert write_io.HU_INTERCEPT == -1024.0
