"""Tests of the synthetic chest CT phantom: geometry, masks, HU ranges, lesion layout."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wscovid.phantom import LESION_CODES, Phantom, make_phantom

SMALL = dict(n_slices=24, size=128)
SEEDS = 4


@pytest.fixture(scope="module")
def phantoms() -> dict[tuple[str, int], Phantom]:
    """A few small phantoms of each kind, built once for the module."""
    out = {}
    for kind in ("COVID-19", "CAP", "NP"):
        for seed in range(SEEDS):
            out[kind, seed] = make_phantom(kind, seed=seed, **SMALL)
    return out


def test_deterministic_per_seed():
    a = make_phantom("covid", seed=3, **SMALL)
    b = make_phantom("COVID-19", seed=3, **SMALL)
    c = make_phantom("covid", seed=4, **SMALL)
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.volume.hu, c.volume.hu)


@pytest.mark.parametrize(
    "alias, label", [("normal", "NP"), ("np", "NP"), ("Cap", "CAP"), ("COVID", "COVID-19")]
)
def test_kind_aliases(alias, label):
    assert make_phantom(alias, n_slices=8, size=64).label == label


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        make_phantom("flu", **SMALL)


def test_geometry_shapes_and_dtypes(phantoms):
    ph = phantoms["COVID-19", 0]
    vol = ph.volume
    assert vol.shape == (24, 128, 128)
    assert vol.hu.dtype in (np.int16, np.float32)
    assert vol.is_hu and vol.is_axis_aligned
    np.testing.assert_allclose(vol.direction, np.eye(3))
    np.testing.assert_allclose(vol.spacing, (5.0, 350 / 128, 350 / 128))
    centre = vol.index_to_world((np.array(vol.shape) - 1) / 2.0)
    np.testing.assert_allclose(centre, 0.0, atol=1e-6)
    for mask in (ph.lung_mask, ph.lesion_mask):
        assert mask.shape == vol.shape and mask.dtype == np.uint8
    assert set(np.unique(ph.lung_mask)) == {0, 1, 2}
    assert set(np.unique(ph.lesion_mask)) <= {0, 1, 2, 3, 4}
    assert vol.hu.min() >= -1024


def test_explicit_spacing_is_used():
    ph = make_phantom("NP", n_slices=16, size=96, spacing=(2.5, 1.0, 1.0))
    assert ph.volume.spacing == (2.5, 1.0, 1.0)


def test_right_lung_at_small_x(phantoms):
    for ph in phantoms.values():
        xs_right = np.nonzero(ph.lung_mask == 1)[2]
        xs_left = np.nonzero(ph.lung_mask == 2)[2]
        mid = ph.lung_mask.shape[2] / 2
        assert xs_right.mean() < mid < xs_left.mean()
        assert xs_right.max() < xs_left.min() + 2  # the mediastinum separates them


def test_lesions_inside_lungs_and_records_consistent(phantoms):
    for ph in phantoms.values():
        lesion = ph.lesion_mask > 0
        assert np.all(ph.lung_mask[lesion] > 0)
        for rec in ph.lesions:
            assert rec["type"] in LESION_CODES
            assert rec["lung"] in ("right", "left")
            assert rec["n_voxels"] > 0
            z, y, x = rec["centre_zyx"]
            assert 0 <= z < ph.lung_mask.shape[0] and 0 <= x < ph.lung_mask.shape[2]


def test_lung_is_air_like_and_denser_behind(phantoms):
    ph = phantoms["NP", 0]
    hu = ph.volume.hu.astype(np.float32)
    healthy = (ph.lung_mask > 0) & (ph.lesion_mask == 0)
    assert -890 < np.median(hu[healthy]) < -800
    ys = np.nonzero(healthy)[1]
    front = healthy & (np.arange(hu.shape[1])[None, :, None] < np.percentile(ys, 25))
    back = healthy & (np.arange(hu.shape[1])[None, :, None] > np.percentile(ys, 75))
    assert np.median(hu[back]) > np.median(hu[front]) + 15


def test_soft_tissue_and_bone_present(phantoms):
    hu = phantoms["NP", 1].volume.hu
    assert np.percentile(hu, 99.9) > 300  # ribs, spine, sternum
    assert np.mean((hu > -150) & (hu < 100)) > 0.2  # body wall, mediastinum, liver


def test_lesion_hu_ranges(phantoms):
    for kind in ("COVID-19", "CAP"):
        for seed in range(SEEDS):
            ph = phantoms[kind, seed]
            hu = ph.volume.hu.astype(np.float32)
            lung = np.median(hu[(ph.lung_mask > 0) & (ph.lesion_mask == 0)])
            for code, lo, hi in ((1, -750, -400), (2, -200, 100), (3, -750, -300)):
                sel = ph.lesion_mask == code
                if sel.sum() > 20:
                    med = np.median(hu[sel])
                    assert lo < med < hi, (kind, seed, code, med)
                    assert med > lung + 100


def test_covid_bilateral_and_lower_zone(phantoms):
    lower = 0
    for seed in range(SEEDS):
        ph = phantoms["COVID-19", seed]
        assert 3 <= len(ph.lesions) <= 10
        assert {rec["lung"] for rec in ph.lesions} == {"right", "left"}
        lz = np.nonzero(ph.lung_mask.any(axis=(1, 2)))[0]
        lesion_z = np.nonzero(ph.lesion_mask > 0)[0]
        lower += np.median(lesion_z) < 0.5 * (lz.min() + lz.max())
    assert lower >= SEEDS - 1


def test_covid_severity_scales_extent():
    mild = make_phantom("COVID-19", seed=2, severity=0.0, **SMALL)
    severe = make_phantom("COVID-19", seed=2, severity=1.0, **SMALL)
    assert (severe.lesion_mask > 0).sum() > 2 * (mild.lesion_mask > 0).sum()


def test_cap_mostly_unilateral_consolidation(phantoms):
    single = 0
    for seed in range(SEEDS):
        ph = phantoms["CAP", seed]
        assert any(rec["type"] == "consolidation" for rec in ph.lesions)
        assert (ph.lesion_mask == LESION_CODES["consolidation"]).sum() > 0
        single += len({rec["lung"] for rec in ph.lesions}) == 1
    assert single >= SEEDS - 1


def test_consolidation_stays_in_lung_mask(phantoms):
    """The classic failure of threshold segmentation must be in the reference mask."""
    ph = phantoms["CAP", 0]
    dense = (ph.lesion_mask == LESION_CODES["consolidation"]) & (ph.volume.hu > -300)
    assert dense.sum() > 50
    assert np.all(ph.lung_mask[dense] > 0)


def test_np_has_no_lesion_unless_nodules(phantoms):
    for seed in range(SEEDS):
        ph = phantoms["NP", seed]
        assert ph.lesions == [] and not ph.lesion_mask.any()
    ph = make_phantom("NP", seed=1, nodules=True, n_slices=32, size=160)
    assert 1 <= len(ph.lesions) <= 3
    assert {rec["type"] for rec in ph.lesions} == {"nodule"}
    assert set(np.unique(ph.lesion_mask)) == {0, LESION_CODES["nodule"]}


def test_gastric_content_is_food_mottled_with_gas():
    """Food with gas bubbles replaces the stomach's fluid, and nothing else changes."""
    from napari_wscovid.phantom import HU_AIR, HU_FOOD, HU_STOMACH, _gastric_content

    hu = np.full((12, 40, 40), -100.0, np.float32)
    hu[2:10, 8:30, 10:32] = HU_STOMACH
    stomach = hu == HU_STOMACH
    mottled = 0
    for seed in range(10):
        out = hu.copy()
        _gastric_content(np.random.default_rng(seed), out, (2.5, 1.0, 1.0))
        np.testing.assert_array_equal(out[~stomach], hu[~stomach])
        if np.array_equal(out, hu):
            continue  # this stomach keeps its fluid
        mottled += 1
        gas = out[stomach] == HU_AIR
        assert 0.1 <= gas.mean() <= 0.45
        food = out[stomach][~gas]
        assert np.all((food >= HU_FOOD[0]) & (food <= HU_FOOD[1]))
    assert 0 < mottled < 10  # some phantoms have food, some fluid
