"""Model input: normalisation, square lung crops, and pasting maps back onto the slice."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from napari_wscovid.preprocess import (
    DEFAULT_NORMALISATION,
    DEFAULT_WINDOW,
    SliceCrop,
    intensity_range,
    maps_to_slice,
    normalisation_spec,
    normalise,
    prepare_slices,
    sliding_window,
)


def _lung_volume(n=3, shape=(96, 128), box=(30, 60, 20, 100)):
    """Body at 40 HU, a rectangular 'lung' at -850 HU, air outside the body."""
    hu = np.full((n, *shape), -1000, dtype=np.int16)
    hu[:, 10:-10, 5:-5] = 40
    y0, y1, x0, x1 = box
    hu[:, y0:y1, x0:x1] = -850
    lung = np.zeros(hu.shape, dtype=np.uint8)
    lung[:, y0:y1, x0:x1] = 1
    return hu, lung


def test_window_values():
    lo, hi = DEFAULT_WINDOW
    out = normalise(np.array([lo - 100, lo, (lo + hi) / 2, hi, hi + 500], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)
    assert DEFAULT_NORMALISATION in ("window", "sliding")


def test_sliding_window_picks_densest_range_and_follows_a_scanner_offset():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-800, 30, 5000), rng.normal(300, 30, 500)])
    lo, hi = sliding_window(values, q=400, s=10)
    assert lo < -800 < hi and hi < 0  # covers the big cluster, not the small one
    hu = rng.normal(-800, 80, (4, 32, 32)).astype(np.float32)
    a = normalise(hu, "sliding", q=1500, s=10)
    b = normalise(hu + 60, "sliding", q=1500, s=10)
    w = normalise(hu + 60, "window")
    assert np.abs(a - b).max() <= 10 / 1500 + 1e-6  # invariant up to one step S
    assert abs(float(np.median(w - normalise(hu, "window"))) - 60 / 1500) < 1e-4


def test_padding_excluded_from_statistics_and_zeroed():
    rng = np.random.default_rng(1)
    hu = rng.normal(-700, 100, (2, 40, 40)).astype(np.float32)
    padded = hu.copy()
    padded[:, :, :10] = -3024
    mask = np.zeros(hu.shape, bool)
    mask[:, :, :10] = True
    ref = intensity_range(hu[:, :, 10:], "sliding")
    assert intensity_range(padded, "sliding") == ref
    out = normalise(padded, "sliding")
    assert (out[:, :, :10] == 0).all()
    # An explicit padding mask with an in-range value (e.g. 0 used as padding) works too.
    zero_padded = hu.copy()
    zero_padded[mask] = 0
    assert intensity_range(zero_padded, "sliding", padding_mask=mask) == ref
    assert (normalise(zero_padded, "sliding", padding_mask=mask)[mask] == 0).all()


def test_non_hu_input_is_percentile_scaled_and_says_so(caplog):
    img = np.tile(np.arange(256, dtype=np.uint8), (3, 4, 1))
    with caplog.at_level(logging.INFO, logger="napari_wscovid.preprocess"):
        out, rng = normalise(img, "window", is_hu=False, return_range=True)
    assert rng.method == "percentile" and "not in HU" in rng.note
    assert "not in HU" in caplog.text
    assert out.min() == 0 and out.max() == 1 and out.dtype == np.float32


def test_normalisation_spec():
    assert normalisation_spec("window")["window"] == list(DEFAULT_WINDOW)
    assert normalisation_spec({"method": "sliding", "q": 1000})["s"] > 0
    with pytest.raises(ValueError):
        normalisation_spec("zscore")


def test_prepare_slices_shapes_and_square_crop_keeps_aspect():
    hu, lung = _lung_volume()
    x, crops = prepare_slices(hu, lung, [0, 2], size=32, margin_mm=0, spacing_yx=(1, 1))
    assert x.shape == (2, 1, 32, 32) and x.dtype == np.float32
    assert [c.slice for c in crops] == [0, 2]
    crop = crops[0]
    assert crop.y1 - crop.y0 == crop.x1 - crop.x0 == 80  # the lung box is 30 x 80
    assert (crop.y0 + crop.y1) / 2 == pytest.approx(45, abs=0.5)
    assert (crop.x0 + crop.x1) / 2 == pytest.approx(60, abs=0.5)
    # Non-square pixels: square in millimetres, not in voxels.
    _, (c2,) = prepare_slices(hu, lung, [0], size=32, margin_mm=0, spacing_yx=(2.0, 1.0))
    assert (c2.y1 - c2.y0) * 2.0 == pytest.approx((c2.x1 - c2.x0) * 1.0, abs=2)


def test_mask_zeroes_outside_lung():
    hu, lung = _lung_volume()
    x, (crop,) = prepare_slices(hu, lung, [1], size=80, margin_mm=0, dilate_mm=0, spacing_yx=(1, 1))
    # 80 px crop -> 80 px input: rows 25..55 of the crop are the lung (the box is 30 rows tall).
    image = x[0, 0]
    lung_rows = slice(crop.y0, crop.y1)
    expected = lung[1][lung_rows, crop.x0 : crop.x1] > 0
    expected = np.pad(expected, ((max(0, -crop.y0), 0), (0, 0)))[:80]
    assert (image[~expected] == 0).all()
    assert image[expected].min() > 0.3  # -850 HU in the lung window
    unmasked, _ = prepare_slices(hu, lung, [1], size=80, margin_mm=0, mask_outside_lung=False)
    assert unmasked[0, 0][~expected].max() > 0.9  # the 40 HU body would have been visible


def test_maps_to_slice_hot_pixel_lands_where_expected():
    crop = SliceCrop(slice=0, y0=20, x0=30, y1=60, x1=70, size=8)
    hot = np.zeros((1, 8, 8), np.float32)
    hot[0, 2, 5] = 1.0
    out = maps_to_slice(hot, [crop], (100, 100))
    y, x = np.unravel_index(np.argmax(out[0]), out[0].shape)
    # Input pixel (2, 5) of 8 covers crop rows 10..15 and columns 25..30 (5 slice px each).
    assert 20 + 10 <= y < 20 + 15 and 30 + 25 <= x < 30 + 30
    assert out[0, :20].max() == 0 and out[0, 60:].max() == 0


def test_constant_map_pastes_to_ones_inside_crop_even_past_the_border():
    hu, lung = _lung_volume(shape=(64, 64), box=(0, 40, 10, 30))  # touches the top border
    x, (crop,) = prepare_slices(hu, lung, [0], size=16, margin_mm=5, spacing_yx=(1, 1))
    assert crop.y0 < 0  # padded beyond the image
    out = maps_to_slice(np.ones((1, 7, 7)), [crop], (64, 64))[0]
    inside = np.zeros((64, 64), bool)
    inside[max(crop.y0, 0) : crop.y1, max(crop.x0, 0) : crop.x1] = True
    np.testing.assert_allclose(out[inside], 1.0, atol=1e-6)
    assert (out[~inside] == 0).all()


def test_prepare_then_paste_back_aligns_a_bright_spot():
    hu, lung = _lung_volume(n=1, shape=(128, 128), box=(20, 100, 10, 110))
    hu[0, 70:74, 40:44] = 100  # a dense spot inside the lung
    x, crops = prepare_slices(hu, lung, [0], size=64, dilate_mm=0, spacing_yx=(0.8, 0.8))
    back = maps_to_slice(x[:, 0], crops, (128, 128))[0]
    y, xx = np.unravel_index(np.argmax(back), back.shape)
    assert 69 <= y <= 74 and 39 <= xx <= 44


def test_sliding_prepare_is_batch_independent():
    rng = np.random.default_rng(2)
    hu, lung = _lung_volume(n=4)
    hu = (hu + rng.normal(0, 30, hu.shape)).astype(np.float32)
    hu[3, 30:60, 20:100] += 200  # a denser slice must not change the others' normalisation
    whole, _ = prepare_slices(hu, lung, range(4), size=32, normalisation="sliding")
    part, _ = prepare_slices(hu, lung, [0, 1], size=32, normalisation="sliding")
    np.testing.assert_array_equal(whole[:2], part)


def test_resizing_from_two_workers_leaves_torch_on_all_its_cores():
    # The resize runs on one core. Done with torch.set_num_threads around each call, it also
    # set the count of any thread starting torch meanwhile, and a second worker that started
    # then restored "1" for good: every later run on one core.
    import threading

    import torch

    from napari_wscovid import preprocess

    cores = max(2, torch.get_num_threads())  # two are enough to lose one, on any machine
    torch.set_num_threads(cores)
    images = [np.random.default_rng(0).random((256, 256), dtype=np.float32) for _ in range(8)]
    stop, first_view = threading.Event(), []

    def first_worker():
        while not stop.is_set():
            preprocess._resize(images, (128, 128))

    def second_worker(first):
        first_view.append(torch.get_num_threads())  # its first use of torch, while the first resizes
        stop.set()
        first.join()
        preprocess._resize(images, (128, 128))  # and it resizes last

    first = threading.Thread(target=first_worker)
    first.start()
    preprocess._resize(images, (128, 128))  # the first worker is under way
    second = threading.Thread(target=second_worker, args=(first,))
    second.start()
    second.join()
    later = []
    probe = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    assert first_view == [cores] and later == [cores] and torch.get_num_threads() == cores
    assert preprocess._one_core_thread().submit(torch.get_num_threads).result() == 1


def test_a_forked_child_resizes_too():
    # DataLoader workers are forked from a trainer that has resized already: the child has the
    # one-core executor but not its thread, and work handed to it waited for ever.
    import multiprocessing

    from napari_wscovid import preprocess

    images = [np.ones((64, 64), np.float32)]
    preprocess._resize(images, (32, 32))  # the parent's one-core thread exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result = pool.apply_async(preprocess._resize, (images, (32, 32)))
        resized = result.get(timeout=60)
    assert resized.shape == (1, 32, 32) and np.allclose(resized, 1.0)
