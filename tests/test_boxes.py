"""Saliency -> mask -> boxes, lung involvement and box corners in millimetres."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wscovid.boxes import box_to_mm, boxes_from_saliency, involvement, saliency_mask
from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box


def _blob(shape, centre, sigma, amplitude=1.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return amplitude * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def _iou(box: Box, ref: tuple[int, int, int, int]) -> float:
    y0, x0, y1, x1 = max(box.y0, ref[0]), max(box.x0, ref[1]), min(box.y1, ref[2]), min(box.x1, ref[3])
    inter = max(0, y1 - y0) * max(0, x1 - x0)
    area = (box.y1 - box.y0) * (box.x1 - box.x0) + (ref[2] - ref[0]) * (ref[3] - ref[1]) - inter
    return inter / area


def _kwargs(**over):
    return {"spacing_yx": (0.7, 0.7), "slice_index": 4, "class_name": "COVID-19", "score": 0.9, **over}


def test_boxes_find_each_blob():
    shape = (128, 128)
    blobs = [((30, 40), 6.0), ((90, 85), 8.0), ((35, 100), 5.0)]
    # Signed maps, as integrated gradients give: the absolute value is what counts.
    sal = sum(_blob(shape, c, s, a) for (c, s), a in zip(blobs, (1.0, -0.8, 0.9), strict=True))
    sal += 0.01 * np.random.default_rng(0).standard_normal(shape)
    boxes = boxes_from_saliency(sal, **_kwargs())
    assert len(boxes) == len(blobs)
    for centre, sigma in blobs:
        # Reference extent: where the blob exceeds half its peak (radius sigma * sqrt(2 ln 2)).
        r = sigma * np.sqrt(2 * np.log(2))
        ref = (int(centre[0] - r), int(centre[1] - r), int(centre[0] + r) + 1, int(centre[1] + r) + 1)
        best = max(boxes, key=lambda b, ref=ref: _iou(b, ref))
        assert _iou(best, ref) >= 0.5
        assert best.y0 <= centre[0] < best.y1 and best.x0 <= centre[1] < best.x1
    for box in boxes:
        assert box.slice == 4 and box.class_name == "COVID-19" and box.score == 0.9
        assert box.source == "joint" and box.origin == "detected"
        assert box.area_mm2 >= 20.0


def test_min_area_drops_tiny_blob():
    shape = (96, 96)
    sal = _blob(shape, (30, 30), 7.0) + _blob(shape, (70, 70), 0.8)
    mask = saliency_mask(sal)
    assert mask[70, 70]  # the tiny blob passes the threshold ...
    boxes = boxes_from_saliency(sal, **_kwargs(spacing_yx=(1.0, 1.0), min_area_mm2=20.0))
    assert len(boxes) == 1  # ... but is smaller than 20 mm^2
    assert boxes[0].y0 <= 30 < boxes[0].y1
    assert len(boxes_from_saliency(sal, **_kwargs(spacing_yx=(1.0, 1.0), min_area_mm2=1.0))) == 2


@pytest.mark.parametrize(
    "sal",
    [np.zeros((32, 32)), np.full((32, 32), 3.0), np.full((32, 32), np.nan), np.zeros((0, 0))],
    ids=["zeros", "flat", "nan", "empty"],
)
def test_empty_or_flat_maps_give_no_boxes(sal):
    assert boxes_from_saliency(sal, **_kwargs()) == []
    assert not saliency_mask(sal).any()


def test_nan_pixels_are_ignored():
    sal = _blob((64, 64), (32, 32), 5.0)
    sal[0, :5] = np.nan
    boxes = boxes_from_saliency(sal, **_kwargs(spacing_yx=(1.0, 1.0)))
    assert len(boxes) == 1


def test_area_uses_non_square_spacing():
    sal = np.zeros((64, 64))
    sal[20:30, 10:30] = 1.0  # a 10 x 20 pixel plateau survives blur + isodata as itself
    square = boxes_from_saliency(sal, **_kwargs(spacing_yx=(1.0, 1.0), min_area_mm2=0))
    stretched = boxes_from_saliency(sal, **_kwargs(spacing_yx=(2.5, 0.5), min_area_mm2=0))
    assert len(square) == len(stretched) == 1
    n_pixels = square[0].area_mm2
    assert stretched[0].area_mm2 == pytest.approx(n_pixels * 2.5 * 0.5)
    assert (square[0].y0, square[0].x0, square[0].y1, square[0].x1) == (20, 10, 30, 30)


def test_blur_kernel_is_5x5():
    impulse = np.zeros((15, 15))
    impulse[7, 7] = 1.0
    from napari_wscovid.boxes import BLUR_SIGMA, _blur

    support = _blur(impulse, BLUR_SIGMA) > 0
    assert support.sum() == 25 and support[5:10, 5:10].all()


def test_involvement_counts_only_lung():
    lung = np.zeros((3, 10, 10), np.uint8)
    lung[0, :, :5] = 1  # 50 voxels
    lung[1, :, :] = 2  # 100 voxels
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :, :] = True  # 50 lung voxels inside, 50 outside the lung
    masks[1, :5, :] = True  # 50 of 100
    masks[2, :, :] = True  # no lung on this slice
    result = involvement(masks, lung)
    np.testing.assert_allclose(result["per_slice_percent"][:2], [100.0, 50.0])
    assert np.isnan(result["per_slice_percent"][2])
    assert result["total_percent"] == pytest.approx(100.0 * 100 / 150)
    assert involvement(masks, np.zeros_like(lung))["total_percent"] == 0.0


@pytest.mark.parametrize("spacing", [(2.0, 0.7, 0.7), (5.0, 0.6, 0.9)])
def test_box_to_mm_edge_convention(spacing):
    volume = CTVolume(hu=np.zeros((8, 64, 64), np.int16), spacing=spacing, origin=(-100.0, 20.0, -30.0))
    box = Box(slice=3, y0=5, x0=7, y1=15, x1=27, class_name="CAP", score=0.5)  # 10 x 20 voxels
    first, last = box_to_mm(box, volume)
    np.testing.assert_allclose(last - first, [0.0, 10 * spacing[1], 20 * spacing[2]])
    np.testing.assert_allclose(
        first, [-100.0 + 3 * spacing[0], 20.0 + 4.5 * spacing[1], -30.0 + 6.5 * spacing[2]]
    )


def test_box_to_mm_follows_direction():
    flip = np.diag([1.0, -1.0, 1.0])  # y axis pointing to patient anterior
    volume = CTVolume(
        hu=np.zeros((2, 32, 32), np.int16), spacing=(1.0, 0.5, 0.8), origin=(0, 0, 0), direction=flip
    )
    box = Box(slice=0, y0=2, x0=2, y1=12, x1=22, class_name="CAP", score=0.5)
    first, last = box_to_mm(box, volume)
    np.testing.assert_allclose(np.abs(last - first), [0.0, 5.0, 16.0])


def test_rerun_merge_respects_rejected_edited_and_added_boxes():
    from napari_wscovid.review import REJECTED, merge_rerun, split_rejected

    def box(z, x0, origin="detected"):
        return Box(z, 10, x0, 20, x0 + 10, "COVID-19", 0.8, 1.0, origin)

    previous = [box(1, 0, "edited"), box(2, 0), box(5, 30, "added")]
    rejected = [box(3, 0, REJECTED), box(1, 40, REJECTED)]  # deleted on 3; slice 1's box moved from x=40
    detected = [box(1, 42), box(2, 0), box(3, 5), box(4, 0), box(5, 35)]
    merged, change = merge_rerun(previous, detected, rejected)
    assert [(b.slice, b.x0, b.origin) for b in merged] == [
        (1, 0, "edited"), (5, 30, "added"), (2, 0, "detected"), (4, 0, "detected")
    ]  # fmt: skip
    added = change.pop("added")
    assert change == {"kept": 2, "new": 1, "suppressed": 3, "detected": 5}
    assert [(b.slice, b.x0) for b in added] == [(4, 0)]  # slice 2's detection was there before
    shown, rej = split_rejected(merged + rejected)
    assert shown == merged and rej == rejected


def test_involvement_with_slices_explained_later_equals_involvement_of_all_at_once():
    from napari_wscovid.boxes import involvement, involvement_with

    rng = np.random.default_rng(4)
    lung = np.zeros((5, 20, 20), np.uint8)
    lung[1:4, 3:17, 3:17] = 1
    masks = rng.random(lung.shape) < 0.3
    first = np.zeros_like(masks)
    first[1] = masks[1]
    partial = involvement(first, lung)
    later = involvement_with(partial, [2, 3], masks[[2, 3]], lung)
    whole = involvement(masks, lung)
    assert later["total_percent"] == pytest.approx(whole["total_percent"])
    np.testing.assert_allclose(later["per_slice_percent"], whole["per_slice_percent"])
    assert involvement_with({}, [1, 2, 3], masks[1:4], lung)["total_percent"] == pytest.approx(
        whole["total_percent"]
    )


def test_a_box_never_bridges_the_gap_between_the_lungs():
    """The closing joined two lesions across a 4-pixel mediastinum into one box over it, its
    area counting pixels outside the lung; components are now taken inside the lung."""
    lung = np.zeros((128, 128), bool)
    lung[30:100, 20:62] = lung[30:100, 66:108] = True  # two lungs 4 px apart
    sal = np.zeros((128, 128))
    sal[50:70, 52:62] = sal[50:70, 66:76] = 1.0  # a lesion on each side of the gap, in the lung
    kw = dict(spacing_yx=(0.7, 0.7), slice_index=0, class_name="CAP", score=0.9)
    bridged = boxes_from_saliency(sal, **kw)
    assert len(bridged) == 1 and bridged[0].x0 < 62 and bridged[0].x1 > 66  # without the lung
    boxes = boxes_from_saliency(sal, lung=lung, **kw)
    assert len(boxes) == 2 and all(b.x1 <= 62 or b.x0 >= 66 for b in boxes)
    in_lung = (saliency_mask(sal) & lung).sum() * 0.49
    assert sum(b.area_mm2 for b in boxes) == pytest.approx(in_lung)


def test_slices_explained_as_np_add_no_involved_lung_and_no_lesion_region():
    """NP saliency (the pulmonary arteries, in the paper) counted as involved lung and went into
    the DICOM SEG's lesion region, though those slices get no boxes."""
    from napari_wscovid.explain.saliency import explain_slices
    from napari_wscovid.io.dicom_objects import lesion_mask
    from napari_wscovid.models.registry import load_model
    from napari_wscovid.phantom import make_phantom
    from napari_wscovid.results import DetectionResult
    from napari_wscovid.stages import lung_slices, run_to_end

    ph = make_phantom("COVID-19", n_slices=12, size=96, seed=2)
    chosen = lung_slices(ph.lung_mask, ph.volume.spacing)[:4]
    probs = np.full((ph.volume.shape[0], 3), np.nan, np.float32)
    probs[chosen] = (0.9, 0.05, 0.05)  # every chosen slice called NP
    net, _ = load_model("default", device="cpu")  # the tiny network's three maps never overlap
    out = run_to_end(
        explain_slices(
            ph.volume, chosen, net=net, lung_mask=ph.lung_mask, slice_probs=probs,
            classes=("NP", "CAP", "COVID-19"), ig_steps=2,
        )
    )  # fmt: skip
    assert out["boxes"] == [] and not out["masks"].any()
    assert out["saliency"]["joint"].any()  # the maps are shown; they are just not lesions
    result = DetectionResult(
        classes=("NP", "CAP", "COVID-19"), slice_probs=probs, patient_probs=np.array([0.9, 0.05, 0.05]),
        lung_mask=ph.lung_mask, saliency={"joint": np.zeros(ph.volume.shape, np.uint8)},
        saliency_slices=tuple(int(z) for z in chosen),
    )  # fmt: skip
    result.saliency["joint"][chosen] = out["saliency"]["joint"]
    assert not lesion_mask(result, ph.volume.shape).any()
