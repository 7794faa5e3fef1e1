"""Quality checks: each failure is built from the sample phantom and flagged with its severity;
the clean sample and the real chest series get no severe flag."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_wscovid.lung import segment_lungs
from napari_wscovid.quality import quality_checks, scan_status


@pytest.fixture(scope="module")
def chest():
    from napari_wscovid.phantom import make_phantom

    return make_phantom("COVID-19", n_slices=64, size=128, seed=4)  # 5 mm slices, 320 mm


def _check(volume, lung=None):
    lung = segment_lungs(volume, method="classical") if lung is None else lung
    flags = quality_checks(volume, lung)
    return {f.name: f.severity for f in flags}, scan_status(flags, lung), flags


def test_the_clean_chest_has_no_severe_flag(chest):
    names, status, _ = _check(chest.volume, chest.lung_mask)
    assert status == "ok" and "severe" not in names.values(), names


def test_stored_values_without_rescale_are_out_of_scope(chest):
    raw = dataclasses.replace(
        chest.volume, hu=chest.volume.hu.astype(np.int32) + 1024
    )  # slope 1, intercept lost
    names, status, flags = _check(raw, chest.lung_mask)
    assert names["no_air"] == "severe" and status == "out_of_scope"
    assert "rescale" in next(f.message for f in flags if f.name == "no_air")


def test_padding_at_minus_3024_is_a_warning(chest):
    hu = chest.volume.hu.astype(np.int16).copy()
    hu[:, :, :40] = -3024  # a padded field of view, not masked
    names, _, _ = _check(dataclasses.replace(chest.volume, hu=hu), chest.lung_mask)
    assert names["air_below_-1000"] == "warn"


def test_a_five_slice_slab_needs_review(chest):
    mid = chest.volume.shape[0] // 2
    slab = dataclasses.replace(chest.volume, hu=chest.volume.hu[mid : mid + 5])
    names, status, _ = _check(slab, chest.lung_mask[mid : mid + 5])
    assert (
        names["slab"] == "severe" and names["lung_volume"] in ("warn", "severe") and status == "needs_review"
    )
    assert names["lung_cut_first_slice"] == names["lung_cut_last_slice"] == "warn"


def test_abdomen_only_slices_are_out_of_scope(chest):
    below = np.flatnonzero(~chest.lung_mask.any(axis=(1, 2)))
    abdomen = below[below < chest.volume.shape[0] // 2]
    assert len(abdomen) >= 3, "the phantom has slices below the lungs"
    volume = dataclasses.replace(chest.volume, hu=chest.volume.hu[abdomen])
    names, status, _ = _check(volume)
    assert names.get("no_lungs") == "severe" and status == "out_of_scope"


def test_added_noise_is_flagged(chest):
    rng = np.random.default_rng(0)
    noisy = chest.volume.hu + rng.normal(0, 150, chest.volume.shape)
    names, _, _ = _check(dataclasses.replace(chest.volume, hu=noisy.astype(np.float32)), chest.lung_mask)
    assert names["noise"] == "warn"


def test_ten_mm_slices_are_flagged(chest):
    z, y, x = chest.volume.spacing
    thick = dataclasses.replace(chest.volume, hu=chest.volume.hu[::2], spacing=(2 * z, y, x))
    names, status, _ = _check(thick, chest.lung_mask[::2])
    assert names["thick_slices"] == "warn" and status == "ok"


def test_a_sagittal_stack_with_an_axial_header_is_sent_to_review(chest):
    """Read as axial it got status ok and a lung volume 22% off (a real series, by hand)."""
    z, y, x = chest.volume.spacing
    sideways = dataclasses.replace(
        chest.volume, hu=np.ascontiguousarray(chest.volume.hu.transpose(2, 1, 0)), spacing=(x, y, z)
    )
    names, status, flags = _check(sideways, np.ascontiguousarray(chest.lung_mask.transpose(2, 1, 0)))
    assert names["non_square_pixels"] == "severe" and status == "needs_review"
    assert "sagittal or coronal" in next(f.message for f in flags if f.name == "non_square_pixels")


def test_a_display_image_is_flagged_and_sent_to_review():
    from napari_wscovid.io.volume import CTVolume

    png = CTVolume(hu=np.random.default_rng(1).integers(0, 255, (1, 64, 64)).astype(np.float32),
                   spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), is_hu=False)  # fmt: skip
    lung = np.zeros(png.shape, np.uint8)
    lung[0, 20:40, 20:40] = 1
    names, _, _ = _check(png, lung)
    assert names["display_image"] == "warn"
    # on its own, not only through the small lung volume a single picture always has
    from napari_wscovid.quality import QCFlag, scan_status

    assert scan_status([QCFlag("display_image", "warn", "not HU", "")], lung) == "needs_review"


def test_detect_reports_status_and_flags(chest):
    from napari_wscovid import detect

    mid = chest.volume.shape[0] // 2
    slab = dataclasses.replace(chest.volume, hu=chest.volume.hu[mid : mid + 5])
    r = detect(slab, model="tiny-test", saliency="none", lung_mask=chest.lung_mask[mid : mid + 5])
    assert r.status == "needs_review"
    assert {"name", "severity", "value", "message"} <= set(r.qc[0])


@pytest.mark.real_data
@pytest.mark.parametrize(
    "folder",
    [
        "covid-ct-md/sample_data/COVID-19 subjects/P001",
        "covid-ct-md/sample_data/Normal subjects/normal001",
        "lidc-idri/LIDC-IDRI-0003",
        "lung-pet-ct-dx/Lung_Dx-A0001",
    ],
)
def test_real_chest_series_get_no_severe_flag(shared_data, folder):
    from napari_wscovid.io import load_ct

    volume = load_ct(shared_data / folder)
    names, status, _ = _check(volume)
    assert status == "ok" and "severe" not in names.values(), names


def test_metal_is_flagged(chest):
    """A 2 mL clip at 3000 HU near the lungs: streaks may hide opacities, a warning."""
    hu = np.array(chest.volume.hu, dtype=np.float32, copy=True)
    z, y, x = (n // 2 for n in hu.shape)
    hu[z - 1 : z + 1, y - 6 : y + 6, x - 6 : x + 6] = 3000.0
    metal = dataclasses.replace(chest.volume, hu=hu)
    names, status, flags = _check(metal, chest.lung_mask)
    assert names.get("metal") == "warn" and status == "ok"
    assert "metal" not in _check(chest.volume, chest.lung_mask)[0]


def test_contrast_enhancement_is_flagged(chest):
    """Enhanced blood (heart, great vessels) lifted from 40 to 240 HU between the lungs."""
    from skimage.morphology import convex_hull_image

    hu = np.array(chest.volume.hu, dtype=np.float32, copy=True)
    lung = chest.lung_mask > 0
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        between = convex_hull_image(lung[z]) & ~lung[z]
        hu[z][between & (hu[z] > 0) & (hu[z] < 80)] += 200.0
    names, status, _ = _check(dataclasses.replace(chest.volume, hu=hu), chest.lung_mask)
    assert names.get("contrast") == "warn" and status == "ok"
    assert "contrast" not in _check(chest.volume, chest.lung_mask)[0]


def test_lungs_cut_by_the_field_of_view_are_flagged(chest):
    cut = dataclasses.replace(chest.volume, hu=chest.volume.hu[:, :, 30:])
    names, _, flags = _check(cut, chest.lung_mask[:, :, 30:])
    assert names.get("lung_fov_cut") == "warn"
    assert "lung_fov_cut" not in _check(chest.volume, chest.lung_mask)[0]


@pytest.mark.real_data
def test_the_contrast_flag_agrees_with_the_dicom_tag(shared_data):
    """The two LIDC series were scanned with IV contrast (ContrastBolusAgent), the CT-MD and
    Lung-PET-CT-Dx series without: the flag comes from the pixels alone."""
    import pydicom

    from napari_wscovid.io import load_ct

    for folder in (
        "covid-ct-md/sample_data/COVID-19 subjects/P001",
        "covid-ct-md/sample_data/Cap subjects/cap001",
        "lidc-idri/LIDC-IDRI-0001",
        "lidc-idri/LIDC-IDRI-0003",
        "lung-pet-ct-dx/Lung_Dx-A0001",
    ):
        first = next(p for p in sorted((shared_data / folder).rglob("*")) if p.suffix.lower() == ".dcm")
        tagged = bool(pydicom.dcmread(first, stop_before_pixels=True).get("ContrastBolusAgent"))
        names, _, _ = _check(load_ct(shared_data / folder))
        assert ("contrast" in names) == tagged, (folder, names)
