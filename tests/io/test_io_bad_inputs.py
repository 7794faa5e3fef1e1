"""One test per BAD_INPUTS.md case 1-27, on small synthetic files."""

from __future__ import annotations

import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_builders import ct_dataset, phantom_hu, save, write_series
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from napari_wscovid.io import CTLoadError, list_series, load_ct
from napari_wscovid.io import dicom as dicom_io


def _marker_values(volume):
    return [int(round(v)) for v in volume.hu[:, 0, 0]]


# ------------------------------------------------------------------------------- folders and files


def test_case01_non_dicom_files_skipped_and_listed(series_folder, monkeypatch):
    (series_folder / "notes.txt").write_text("not an image")
    (series_folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(200))
    (series_folder / "DICOMDIR").write_bytes(bytes(300))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(series_folder / "preview.png")
    forced = []
    real_dcmread = pydicom.dcmread

    def spy(*args, **kwargs):
        forced.append(kwargs.get("force", False))
        return real_dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    volume = load_ct(series_folder)
    assert volume.shape == (5, 32, 32)
    skipped = " ".join(volume.warnings)
    for name in ("notes.txt", ".DS_Store", "DICOMDIR", "preview.png"):
        assert name in skipped
    assert not any(forced), "a file was read with force=True"


def test_case02_file_without_preamble_or_meta_refused(tmp_path):
    ds = ct_dataset()
    del ds.file_meta
    path = tmp_path / "raw_stream.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    with pytest.raises(CTLoadError, match=r"raw_stream\.dcm: not a DICOM Part 10 file"):
        load_ct(path)


def test_case03_truncated_pixel_data_reported_series_incomplete(series_folder):
    victim = series_folder / "slice002.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[:-300])
    (info,) = list_series(series_folder)
    assert info.incomplete
    assert any("slice002.dcm" in reason for reason in info.excluded)
    with pytest.raises(CTLoadError, match=r"incomplete.*slice002\.dcm"):
        load_ct(series_folder)


def test_case04_huge_declared_dimensions_refused_before_allocating(tmp_path, monkeypatch):
    ds = ct_dataset()
    ds.Rows = ds.Columns = 65535
    path = save(ds, tmp_path / "huge.dcm")
    monkeypatch.setattr(dicom_io, "decode_file", lambda h, *_: pytest.fail("pixels were decoded"))
    with pytest.raises(CTLoadError, match=r"huge\.dcm.*65535x65535"):
        load_ct(path)


def test_case05_corrupt_compressed_pixel_data_caught_per_file(tmp_path):
    folder = tmp_path / "rle"
    paths = write_series(folder, n=3)
    ds = pydicom.dcmread(paths[1])
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.PixelData = encapsulate([b"\x07garbage" * 4])
    save(ds, paths[1])
    with pytest.raises(CTLoadError, match=r"slice001\.dcm"):
        load_ct(folder)
    # the same corruption in a JPEG-lossless file goes through SimpleITK/GDCM
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
    jpeg = save(ds, tmp_path / "jpeg_lossless.dcm")
    with pytest.raises(CTLoadError, match=r"jpeg_lossless\.dcm"):
        load_ct(jpeg)


def test_case06_missing_decoder_names_the_package(tmp_path, monkeypatch):
    ds = ct_dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K lossless
    ds.PixelData = encapsulate([b"\xff\x4f" + bytes(30)])
    path = save(ds, tmp_path / "htj2k.dcm")
    monkeypatch.setattr(dicom_io, "_pydicom_plugins", lambda uid: ())
    with pytest.raises(CTLoadError, match=r"htj2k\.dcm.*High-Throughput JPEG 2000.*pylibjpeg-openjpeg"):
        load_ct(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: nobody here decodes it
    mpeg = save(ds, tmp_path / "mpeg.dcm")
    with pytest.raises(CTLoadError, match=r"mpeg\.dcm.*no decoder.*SimpleITK"):
        load_ct(mpeg)


def test_case07_non_ct_objects_excluded_and_listed(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder / "ct", n=4)
    write_series(folder / "mr", n=3, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4")
    save(ct_dataset(sop_class="1.2.840.10008.5.1.4.1.1.7", modality="OT"), folder / "sc.dcm")
    rgb = ct_dataset()
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = bytes(32 * 32 * 3)
    save(rgb, folder / "dose_screen.dcm")
    sr = ct_dataset(modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.22")
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(sr, keyword)
    save(sr, folder / "report.dcm")

    infos = list_series(folder)
    assert infos[0].is_ct and infos[0].n_slices == 4
    non_ct = [i for i in infos if not i.is_ct]
    reasons = " ".join(r for i in non_ct for r in i.excluded)
    for name in ("sc.dcm", "dose_screen.dcm", "report.dcm", "slice000.dcm"):
        assert name in reasons
    volume = load_ct(folder)
    assert volume.shape[0] == 4
    mr = next(i for i in non_ct if i.modality == "MR")
    with pytest.raises(CTLoadError, match="never run on non-CT"):
        load_ct(folder, series=mr.key)
    with pytest.raises(CTLoadError, match="no CT image series"):
        load_ct(folder / "mr")


def test_case08_several_series_largest_ct_by_default(tmp_path):
    write_series(tmp_path / "a", n=5)
    write_series(tmp_path / "b", n=3)
    infos = list_series(tmp_path)
    assert [i.n_slices for i in infos] == [5, 3]
    volume = load_ct(tmp_path)
    assert volume.shape[0] == 5 and volume.series_key == infos[0].key
    assert any("largest CT series" in w and infos[1].key in w for w in volume.warnings)
    assert load_ct(tmp_path, series=infos[1].key).shape[0] == 3
    assert load_ct(tmp_path, series=1).shape[0] == 3


def test_case09_duplicates_deduplicated_or_split_or_refused(tmp_path, series_folder):
    shutil.copy(series_folder / "slice001.dcm", series_folder / "copy_of_slice001.dcm")
    volume = load_ct(series_folder)
    assert volume.shape[0] == 5
    assert any("duplicate" in w and "copy_of_slice001.dcm" in w for w in volume.warnings)

    # same positions, different content, told apart by AcquisitionNumber: two volumes
    two_acq = tmp_path / "two_acq"
    uid = generate_uid()
    write_series(two_acq / "a", n=4, series_uid=uid, AcquisitionNumber=1)
    write_series(
        two_acq / "b", n=4, series_uid=uid, AcquisitionNumber=2, hu_of=lambda k: phantom_hu(value=300)
    )
    infos = list_series(two_acq)
    assert len(infos) == 2 and all(i.n_slices == 4 for i in infos)
    assert len({i.key for i in infos}) == 2

    # same position, different content, nothing tells them apart: refused
    clash = tmp_path / "clash"
    write_series(clash, n=4, series_uid=uid)
    save(ct_dataset(hu=phantom_hu(value=500), z=2.0, series_uid=uid), clash / "other.dcm")
    with pytest.raises(CTLoadError, match="same position with different pixels"):
        load_ct(clash)


def test_case10_localizer_excluded_and_reported(series_folder):
    scout = ct_dataset(
        series_uid=pydicom.dcmread(series_folder / "slice000.dcm").SeriesInstanceUID,
        iop=(0, 1, 0, 0, 0, -1),
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    save(scout, series_folder / "scout.dcm")
    volume = load_ct(series_folder)
    assert volume.shape[0] == 5
    assert any("scout.dcm" in w and "localizer" in w for w in volume.warnings)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_case11_few_slices_load_with_warning(tmp_path, n):
    write_series(tmp_path, n=n)
    volume = load_ct(tmp_path)
    assert volume.shape[0] == n
    assert any("only" in w and "slice" in w for w in volume.warnings)
    assert all(np.isfinite(volume.spacing))


def test_case11_missing_position_orientation_voxel_only(tmp_path):
    write_series(tmp_path, n=4, ipp=False, iop=None)
    volume = load_ct(tmp_path)
    assert volume.shape[0] == 4
    assert _marker_values(volume) == [100, 101, 102, 103]  # order from InstanceNumber, no geometry
    assert any("voxel-only" in w for w in volume.warnings)
    single = tmp_path / "single"
    save(ct_dataset(ipp=False, iop=None, pixel_spacing=None), single / "only.dcm")
    assert load_ct(single / "only.dcm").shape == (1, 32, 32)


def test_case12_memory_estimated_from_headers_and_capped(series_folder, monkeypatch):
    monkeypatch.setattr(dicom_io, "decode_file", lambda h, *_: pytest.fail("pixels were decoded"))
    with pytest.raises(CTLoadError, match=r"GiB.*max_bytes=") as info:
        load_ct(series_folder, max_bytes=10_000)
    assert "5 file(s), 32x32" in str(info.value)


def test_a_ct_larger_than_the_free_memory_is_refused_before_reading(series_folder, tmp_path, monkeypatch):
    """The machine has less memory left than the series needs: said with both figures, for DICOM
    and for a single-file format, before a pixel is decoded."""
    from napari_wscovid.io import volume as volume_io
    from napari_wscovid.io.write import write_image

    mha = tmp_path / "ct.mha"
    write_image(load_ct(series_folder), mha)
    monkeypatch.setattr(volume_io, "available_memory_bytes", lambda: 1000)
    monkeypatch.setattr(dicom_io, "decode_file", lambda h, *_: pytest.fail("pixels were decoded"))
    for path in (series_folder, mha):
        with pytest.raises(CTLoadError, match=r"about 0\.00 GiB .* only 0\.00 GiB of memory is free"):
            load_ct(path)


def test_free_memory_is_read_from_the_system():
    from napari_wscovid.io.volume import available_memory_bytes

    free = available_memory_bytes()
    assert free is None or 0 < free < 2**50


@pytest.mark.filterwarnings("ignore:(Failed to encode|Unknown encoding):UserWarning")
def test_case13_non_ascii_names_never_crash_or_leak(tmp_path, caplog):
    folder = tmp_path / "Ünïcödé データ"
    uid = generate_uid()
    for k, charset in enumerate(["ISO_IR 192", "ISO_IR 100", "ISO 2022 IR 87", "ISO_IR 999"]):
        ds = ct_dataset(z=2.0 * k, series_uid=uid, SpecificCharacterSet=charset)
        ds.PatientName = "Müller^Zoë" if k < 2 else "Yamada^Tarou"
        save(ds, folder / f"{k}.dcm")
    bogus = pydicom.dcmread(folder / "3.dcm")
    bogus.PatientName = b"\xff\xfe\x80Name"
    save(bogus, folder / "3.dcm")
    with caplog.at_level(logging.DEBUG):
        volume = load_ct(folder)
    assert volume.shape[0] == 4
    text = " ".join(
        [*volume.warnings, volume.series_key, volume.source, caplog.text, repr(list_series(folder))]
    )
    for identifier in ("Müller", "Zoë", "Yamada", "Test^Patient", "PID-12345"):
        assert identifier not in text


# -------------------------------------------------------------------------------------- geometry


def test_case14_order_from_positions_not_names_or_instance_numbers(tmp_path):
    names = ["zz.dcm", "aa.dcm", "mm.dcm", "bb.dcm", "yy.dcm"]
    write_series(tmp_path, n=5, names=names, SpacingBetweenSlices=-2.0)
    for path in tmp_path.iterdir():  # InstanceNumber made misleading
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(7 * ds.InstanceNumber % 5)
        save(ds, path)
    volume = load_ct(tmp_path)
    assert _marker_values(volume) == [100, 101, 102, 103, 104]  # ascending z: inferior first
    assert volume.spacing[0] == pytest.approx(2.0)
    assert volume.origin[0] == pytest.approx(0.0)


def test_case14_feet_first_reversed_normal_still_inferior_first(tmp_path):
    # normal = row x column points inferior; slice k (at z = 2k) is filled with 10 k HU
    write_series(tmp_path, n=4, iop=(-1, 0, 0, 0, 1, 0), hu_of=lambda k: np.full((32, 32), 10.0 * k))
    volume = load_ct(tmp_path)
    assert np.allclose(volume.direction, np.eye(3))
    for k in range(4):
        assert volume.index_to_world((k, 0, 0))[0] == pytest.approx(2.0 * k)
        assert volume.hu[k, 16, 16] == pytest.approx(10.0 * k)


def test_case15_missing_slice_refused(tmp_path, series_folder):
    (series_folder / "slice002.dcm").unlink()
    with pytest.raises(CTLoadError, match=r"gap.*slice001\.dcm and slice003\.dcm"):
        load_ct(series_folder)


def test_case16_non_uniform_spacing_interpolated_with_warning(tmp_path):
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.0, 4.0, 6.5, 8.5, 10.5]):
        save(ct_dataset(hu=np.full((32, 32), 10.0 * z), z=z, series_uid=uid), tmp_path / f"{k}.dcm")
    volume = load_ct(tmp_path)
    assert any("interpolated" in w and "tolerance" in w for w in volume.warnings)
    spacing = volume.spacing[0]
    for k in range(volume.shape[0]):  # values are linear in z, so interpolation is exact
        assert volume.hu[k, 5, 5] == pytest.approx(10.0 * k * spacing, abs=1e-3)
    jitter = tmp_path / "jitter"
    for k, z in enumerate([0.0, 2.01, 3.99, 6.0]):  # within max(0.02 mm, 2 %): uniform
        save(ct_dataset(z=z, series_uid=uid), jitter / f"{k}.dcm")
    assert not any("interpolated" in w for w in load_ct(jitter).warnings)


def test_case17_gantry_tilt_detected_and_resampled(tmp_path):
    uid = generate_uid()
    tilt = np.radians(15.0)
    for k in range(6):
        z = 2.0 * k
        shift_mm = z * np.tan(tilt)  # the slice origin slides along y as the gantry is tilted
        hu = phantom_hu()
        hu[10, 16] = 900.0  # a vessel that runs straight along z in the patient
        hu = np.roll(hu, -int(round(shift_mm / 0.7)), axis=0)
        save(
            ct_dataset(hu=hu, ipp=(-10.0, -12.0 + shift_mm, z), series_uid=uid, GantryDetectorTilt=15.0),
            tmp_path / f"{k}.dcm",
        )
    volume = load_ct(tmp_path)
    assert any("gantry tilt" in w and "resampled" in w for w in volume.warnings)
    assert volume.is_axis_aligned
    peaks = [np.unravel_index(np.argmax(volume.hu[k]), volume.hu[k].shape) for k in range(6)]
    assert all(abs(p[0] - 10) <= 1 and p[1] == 16 for p in peaks)


def test_case18_oblique_orientation_kept(tmp_path):
    angle = np.radians(30)
    row = (np.cos(angle), np.sin(angle), 0.0)
    col = (-np.sin(angle), np.cos(angle), 0.0)
    write_series(tmp_path, n=4, iop=(*row, *col), ipp=None)
    volume = load_ct(tmp_path)
    assert not volume.is_axis_aligned
    a = volume.index_to_world((0, 0, 0))
    b = volume.index_to_world((0, 0, 10))
    assert np.linalg.norm(b - a) == pytest.approx(7.0)  # 10 columns x 0.7 mm
    assert (b - a)[::-1][:2] / 7.0 == pytest.approx(row[:2])


def test_case19_mixed_rows_columns_split_without_crash(series_folder):
    uid = pydicom.dcmread(series_folder / "slice000.dcm").SeriesInstanceUID
    for k in range(3):
        save(
            ct_dataset(hu=phantom_hu(24, 24), z=20.0 + 2 * k, series_uid=uid), series_folder / f"small{k}.dcm"
        )
    infos = list_series(series_folder)
    assert sorted((i.n_slices, i.rows) for i in infos) == [(3, 24), (5, 32)]
    volume = load_ct(series_folder)
    assert volume.shape == (5, 32, 32)
    assert any("split" in w for w in volume.warnings)


def test_case20_non_square_pixels_row_then_column_spacing(tmp_path):
    hu = np.full((32, 32), -1000.0)
    hu[4:24, 8:18] = 50.0  # 20 rows x 10 columns
    write_series(tmp_path, n=2, pixel_spacing=(0.5, 1.0), hu_of=lambda k: hu.copy())
    volume = load_ct(tmp_path)
    assert volume.spacing[1:] == (0.5, 1.0)  # (dy, dx)
    rows, cols = np.nonzero(volume.hu[0] == 50.0)
    height_mm = (rows.max() - rows.min() + 1) * volume.spacing[1]
    width_mm = (cols.max() - cols.min() + 1) * volume.spacing[2]
    assert (height_mm, width_mm) == (10.0, 10.0)


def _nifti(tmp_path, name, affine, *, qform=None, sform_code=1, qform_code=0, pixdim=None):
    data = np.full((8, 8, 4), -1000, dtype=np.int16)
    image = nib.Nifti1Image(data, None)
    image.header.set_sform(affine, code=sform_code)
    if qform is not None:
        image.header.set_qform(qform, code=1)
    else:
        image.header.set_qform(None, code=qform_code)
    if pixdim is not None:
        image.header["pixdim"][1:4] = pixdim
    path = tmp_path / name
    nib.save(image, path)
    return path


def test_case21_nifti_sheared_disagreeing_and_bad_spacing(tmp_path):
    sheared = np.array([[1.0, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    rigid = np.diag([1.0, 1.0, 2.0, 1.0])
    with pytest.raises(CTLoadError, match=r"sheared\.nii\.gz.*sform is sheared"):
        load_ct(_nifti(tmp_path, "sheared.nii.gz", sheared))
    fallback = load_ct(_nifti(tmp_path, "sheared_q.nii.gz", sheared, qform=rigid))
    assert any("falling back to the qform" in w for w in fallback.warnings)

    rotated = rigid.copy()
    rotated[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 2]])
    disagree = load_ct(_nifti(tmp_path, "disagree.nii.gz", rigid, qform=rotated))
    assert any("qform and sform disagree" in w for w in disagree.warnings)

    zero = np.diag([1.0, 0.0, 2.0, 1.0])
    with pytest.raises(CTLoadError, match=r"zero\.nii\.gz.*zero voxel size"):
        load_ct(_nifti(tmp_path, "zero.nii.gz", zero))
    nan = rigid.copy()
    nan[0, 0] = np.nan
    with pytest.raises(CTLoadError, match="NaN"):
        load_ct(_nifti(tmp_path, "nan.nii.gz", nan))
    negative = load_ct(_nifti(tmp_path, "negative.nii.gz", rigid, pixdim=[-1.0, 1.0, 2.0]))
    assert any("negative" in w for w in negative.warnings)
    assert negative.spacing == (2.0, 1.0, 1.0)


def test_case23_simpleitk_xyz_reordered_to_zyx(tmp_path):
    image = sitk.GetImageFromArray(np.full((4, 6, 8), -1000, dtype=np.int16))  # (z, y, x) array
    image.SetSpacing((0.5, 0.8, 2.5))
    image.SetOrigin((1.0, 2.0, 3.0))
    path = tmp_path / "anisotropic.mha"
    sitk.WriteImage(image, str(path))
    volume = load_ct(path)
    assert volume.shape == (4, 6, 8)
    assert volume.spacing == (2.5, 0.8, 0.5)
    assert volume.origin == (3.0, 2.0, 1.0)
    assert volume.layer_kwargs()["scale"] == (2.5, 0.8, 0.5)


# ----------------------------------------------------------------------------------- intensities


def test_case24_rescale_variants_give_identical_hu(tmp_path):
    hu = phantom_hu()
    hu[3, 3], hu[4, 4] = 1500.0, -1024.0
    variants = {
        "signed12": dict(signed=True, intercept=0.0, slope=1.0, BitsStored=12, HighBit=11),
        "unsigned": dict(intercept=-1024.0, slope=1.0),
        "fractional": dict(intercept=-1024.0, slope=0.5),
    }
    loaded = {}
    for name, options in variants.items():
        save(ct_dataset(hu=hu, **options), tmp_path / name / "0.dcm")
        loaded[name] = load_ct(tmp_path / name).hu
    # per-slice slope: two slices with different slopes in one series
    uid = generate_uid()
    for k, slope in enumerate([1.0, 0.25]):
        save(ct_dataset(hu=hu, z=2.0 * k, slope=slope, series_uid=uid), tmp_path / "per_slice" / f"{k}.dcm")
    per_slice = load_ct(tmp_path / "per_slice").hu
    for array in [*loaded.values(), per_slice[0], per_slice[1]]:
        np.testing.assert_array_equal(np.squeeze(array), hu)


def test_case25_missing_rescale_tags_warn_when_unrescaled(tmp_path):
    stored = phantom_hu() + 1024  # what an unsigned scanner stores, but no tags to undo it
    save(ct_dataset(hu=stored, intercept=0.0, slope=None), tmp_path / "0.dcm")
    volume = load_ct(tmp_path)
    np.testing.assert_array_equal(volume.hu[0], stored)
    assert any("missing" in w and "look unrescaled" in w for w in volume.warnings)


def test_case26_padding_values_masked(tmp_path):
    hu = phantom_hu()
    hu[:2, :] = -2000.0  # PixelPaddingValue (stored -2000 with intercept 0)
    hu[-2:, :] = -3024.0  # outside the reconstruction circle
    save(ct_dataset(hu=hu, signed=True, intercept=0.0, PixelPaddingValue=-2000), tmp_path / "0.dcm")
    volume = load_ct(tmp_path)
    mask = volume.padding_mask[0]
    assert mask[:2].all() and mask[-2:].all() and not mask[2:-2].any()
    assert (volume.hu[0][mask] == -1024).all()
    # a padding value inside the tissue range (stored 0 = -1024 HU here) is masked too
    save(ct_dataset(hu=hu.clip(-1024), PixelPaddingValue=0), tmp_path / "pv" / "0.dcm")
    assert load_ct(tmp_path / "pv").padding_mask[0, 0, 5]


def test_case27_non_hu_inputs_flagged(tmp_path):
    png = tmp_path / "slice.png"
    Image.fromarray((np.arange(64 * 48) % 256).reshape(48, 64).astype(np.uint8)).save(png)
    volume = load_ct(png)
    assert volume.shape == (1, 48, 64) and not volume.is_hu
    assert any("not Hounsfield" in w for w in volume.warnings)
    rgb = tmp_path / "colour.jpg"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(rgb)
    assert load_ct(rgb).shape == (1, 16, 16)
    labels = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.uint8), np.eye(4)), labels)
    assert not load_ct(labels).is_hu
