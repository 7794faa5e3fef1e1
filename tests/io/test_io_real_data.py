"""Real public files from ../shared/data: COVID-CT-MD series and the DICOM robustness set."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from napari_wscovid.io import CTLoadError, list_series, load_ct

pytestmark = pytest.mark.real_data

COVID_SERIES = [
    ("COVID-19 subjects/P001", 148, 0.748),
    ("Cap subjects/cap001", 168, 0.590),
    ("Normal subjects/normal001", 154, 0.635),
]
LOSSY_SYNTAXES = (".4.50", ".4.51", ".4.53", ".4.55", ".4.81", ".4.91")


@pytest.mark.parametrize(("folder", "n_slices", "pixel_mm"), COVID_SERIES)
def test_covid_ct_md_series_load_in_anatomical_order(covid_ct_md, folder, n_slices, pixel_mm):
    volume = load_ct(covid_ct_md / folder)  # how long it takes: benchmarks/, not a test
    assert volume.shape == (n_slices, 512, 512)
    assert volume.spacing == pytest.approx((2.0, pixel_mm, pixel_mm), abs=1e-3)
    assert volume.is_hu and volume.source == "DICOM" and not volume.warnings
    assert np.allclose(volume.direction, np.eye(3))
    # index 0 is the most inferior slice: the origin is the lowest ImagePositionPatient z
    z_values = [
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        for f in (covid_ct_md / folder).iterdir()
    ]
    assert volume.origin[0] == pytest.approx(min(z_values))
    assert volume.index_to_world((n_slices - 1, 0, 0))[0] == pytest.approx(max(z_values))
    corner_air = np.median(volume.hu[:, :40, :40])
    assert -1030 <= corner_air <= -950
    # the muscle/blood peak, above fat (about -100 HU, which dominates in some patients)
    counts, edges = np.histogram(volume.hu, bins=25, range=(-50, 200))
    assert 0 <= edges[np.argmax(counts)] <= 100


def test_covid_ct_md_list_series_headers_only(covid_ct_md):
    (info,) = list_series(covid_ct_md / "COVID-19 subjects" / "P001")
    assert (info.modality, info.n_slices, info.rows, info.columns, info.is_ct) == ("CT", 148, 512, 512, True)
    assert info.key.startswith("ct-") and not info.incomplete


def _transfer_syntax_files(root):
    return sorted((root / "cornerstone_ctimage_transfer_syntaxes").glob("CTImage.dcm_*"))


def test_every_transfer_syntax_decodes_to_the_reference_hu(dicom_robustness):
    reference = load_ct(dicom_robustness / "cornerstone_ctimage_transfer_syntaxes" / "CTImage.dcm")
    assert reference.hu.max() == 1378
    files = _transfer_syntax_files(dicom_robustness)
    assert len(files) == 15
    for path in files:
        volume = load_ct(path)
        difference = np.abs(volume.hu - reference.hu)
        if path.name.endswith(tuple(s + ".dcm" for s in LOSSY_SYNTAXES)):
            # 8-bit baseline JPEG is the coarsest: about 14 HU mean error on this slice
            assert difference.mean() < 20 and difference.max() < 100, path.name
        else:
            assert difference.max() == 0, path.name


def test_transfer_syntax_folder_is_never_merged(dicom_robustness):
    # 16 copies of one slice: repeated SOPInstanceUIDs are de-duplicated, but lossy copies with new
    # UIDs differ in pixels at the same position, so the folder is refused rather than mixed
    folder = dicom_robustness / "cornerstone_ctimage_transfer_syntaxes"
    (info,) = list_series(folder)
    assert any("same SOPInstanceUID" in reason for reason in info.excluded)
    with pytest.raises(CTLoadError, match="same position with different pixels"):
        load_ct(folder)


def test_no_meta_refused_clearly(dicom_robustness):
    with pytest.raises(CTLoadError, match=r"no_meta\.dcm: not a DICOM Part 10 file"):
        load_ct(dicom_robustness / "pydicom_testfiles" / "no_meta.dcm")


def test_nema_samples_without_extension_load(dicom_robustness):
    chest = load_ct(dicom_robustness / "nema_ct_samples" / "CT1_J2KR")
    assert chest.shape == (1, 512, 512) and chest.spacing[1] == pytest.approx(0.661468)
    head = load_ct(dicom_robustness / "nema_ct_samples" / "CT2_J2KR")
    assert head.shape == (1, 512, 512) and head.is_hu
    assert "CompressedSamples" not in " ".join(chest.warnings + head.warnings)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("pydicom_testfiles/eCT_Supplemental.dcm", -1024, 172),
        ("nema_ct_samples/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm", -14, 1199),
    ],
)
def test_enhanced_multiframe_ct_per_frame_rescale(dicom_robustness, name, low, high):
    volume = load_ct(dicom_robustness / name)
    assert volume.shape == (2, 512, 512)
    assert (volume.hu.min(), volume.hu.max()) == (low, high)
    assert any("per-frame rescale" in w for w in volume.warnings)


def test_lungmask_slices_without_modality(dicom_robustness):
    volume = load_ct(dicom_robustness / "lungmask_testdata")
    assert volume.shape == (2, 512, 512) and volume.spacing == pytest.approx((1.0, 0.625, 0.625))
    assert any("no Modality" in w for w in volume.warnings)
    assert any("only 2 slices" in w for w in volume.warnings)
    assert volume.padding_mask is not None and volume.padding_mask.any()  # -2048 outside the FOV
    assert volume.hu.min() >= -1100
