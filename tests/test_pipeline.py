"""End-to-end detection on a small phantom with the tiny test model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_wscovid.explain import SALIENCY_LAYERS
from napari_wscovid.pipeline import detect, detect_iter
from napari_wscovid.stages import lung_slices, patient_probabilities
from tests.conftest import StopAfter, tiny_network


@pytest.fixture(scope="module")
def phantom():
    from napari_wscovid.phantom import make_phantom

    return make_phantom("COVID-19", n_slices=16, size=128, seed=3)


@pytest.fixture(scope="module")
def tiny_result(phantom):
    return detect(phantom.volume, model="tiny-test", saliency="all", lung_mask=phantom.lung_mask, ig_steps=4)


def test_patient_rule_uses_most_abnormal_slices():
    classes = ("NP", "CAP", "COVID-19")
    probs = np.array([[0.9, 0.05, 0.05]] * 40 + [[0.1, 0.1, 0.8]] * 4 + [[np.nan] * 3] * 5)
    patient, rule = patient_probabilities(probs, classes)
    assert classes[int(np.argmax(patient))] == "COVID-19"  # 4 sick slices of 44 decide it
    assert "lowest NP" in rule
    healthy, _ = patient_probabilities(np.array([[0.9, 0.05, 0.05]] * 20), classes)
    assert classes[int(np.argmax(healthy))] == "NP"


def test_patient_rule_without_lung_is_nan():
    patient, rule = patient_probabilities(np.full((3, 2), np.nan), ("NP", "COVID-19"))
    assert np.isnan(patient).all() and rule == "no lung slice"


def test_lung_slices_drops_slices_with_little_lung():
    mask = np.zeros((3, 50, 50), np.uint8)
    mask[1, 10:40, 10:40] = 1  # 900 px of 1 mm^2
    mask[2, 0:2, 0:2] = 2  # 4 px
    assert lung_slices(mask, (5.0, 1.0, 1.0)).tolist() == [1]


def test_detect_end_to_end_shapes_and_ranges(phantom, tiny_result):
    r = tiny_result
    z, y, x = phantom.volume.shape
    assert r.classes == ("NP", "CAP", "COVID-19")
    assert r.slice_probs.shape == (z, 3)
    lung_idx = lung_slices(phantom.lung_mask, phantom.volume.spacing)
    assert np.allclose(r.slice_probs[lung_idx].sum(1), 1, atol=1e-4)
    outside = np.setdiff1d(np.arange(z), lung_idx)
    assert np.isnan(r.slice_probs[outside]).all()
    assert r.patient_probs.shape == (3,) and abs(float(r.patient_probs.sum()) - 1) < 1e-4
    assert set(r.cams) == {"conv3", "conv4", "conv5"}
    for cam in r.cams.values():
        assert cam.shape == (z, y, x) and cam.dtype == np.uint8
    # one scale factor per volume: the brightest CAM voxel of the volume is exactly 1
    assert max(int(c.max()) for c in r.cams.values()) == 255
    assert r.explained_class == r.predicted_class
    assert set(r.saliency) == set(SALIENCY_LAYERS)
    for name, sal in r.saliency.items():
        assert sal.shape == (z, y, x)
        assert np.abs(sal[phantom.lung_mask == 0]).max() == 0, f"{name} saliency leaks outside the lung"
    assert set(r.saliency_slices) == set(lung_idx.tolist())
    assert r.model_info["name"] == "tiny-test" and len(r.model_info["sha256"]) == 64
    assert r.device == "cpu"
    expected_ml = np.count_nonzero(phantom.lung_mask) * np.prod(phantom.volume.spacing) / 1000
    assert r.lung_volume_ml == pytest.approx(expected_ml)
    assert 0 <= r.involvement["total_percent"] <= 100
    assert r.boxes, "the tiny net calls some slices CAP on this phantom: there must be boxes to check"
    for box in r.boxes:
        assert box.slice in r.saliency_slices
        assert 0 <= box.y0 < box.y1 <= y and 0 <= box.x0 < box.x1 <= x
        assert box.class_name in r.classes and 0 <= box.score <= 1
        assert box.class_name != "NP"
    assert {"lung_segmentation", "classification", "saliency_and_boxes"} <= set(r.timings)


def test_joint_saliency_is_product_of_scaled_maps(tiny_result):
    s = {k: v.astype(np.float32) / 255 for k, v in tiny_result.saliency.items()}
    product = s["conv3"] * s["conv4"] * s["conv5"]
    # Each scale's IG lives in the receptive field of its global-max cell, so the joint map is
    # zero on slices where those fields do not overlap; some slices must overlap.
    nonzero = [z for z in tiny_result.saliency_slices if product[z].max() > 0]
    assert len(nonzero) >= 2
    for z in tiny_result.saliency_slices:
        if z in nonzero:
            # the product rescaled to a peak of 1; uint8 storage of the factors bounds agreement
            assert s["joint"][z].max() == 1.0
            assert np.corrcoef(s["joint"][z].ravel(), product[z].ravel())[0, 1] > 0.98
        else:
            assert s["joint"][z].max() == 0


def test_detect_iter_progress_and_no_saliency(phantom):
    gen = detect_iter(phantom.volume, model="tiny-test", saliency="none", lung_mask=phantom.lung_mask)
    messages = []
    while True:
        try:
            done, total, message = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        assert 0 <= done <= total
        messages.append(message)
    assert any("Classif" in m for m in messages) and messages[-1] == "Done"
    assert result.saliency == {} and result.boxes == [] and result.saliency_slices == ()


def test_detect_iter_can_be_cancelled_at_a_yield(phantom):
    gen = detect_iter(phantom.volume, model="tiny-test", saliency="all", lung_mask=phantom.lung_mask)
    next(gen)
    next(gen)
    gen.close()  # what napari's worker.quit() does between yields
    with pytest.raises(StopIteration):
        next(gen)


def test_lung_step_reports_progress_and_stops_when_cancelled(phantom, monkeypatch):
    import threading

    import napari_wscovid.lung as lung

    stopped_at = []

    def slow_lungs(volume, method, progress):
        for i in range(1, 51):
            time.sleep(0.01)
            progress(i, 50, f"part {i}")
            stopped_at.append(i)
        return phantom.lung_mask

    monkeypatch.setattr(lung, "segment_lungs", slow_lungs)
    gen = detect_iter(phantom.volume, model="tiny-test", saliency="none")
    seen = [next(gen) for _ in range(4)]
    assert seen[0] == (0, 4, "Segmenting lungs") and seen[3] == (0, 4, "Segmenting lungs: part 3 (3/50)")
    gen.close()  # what napari's worker.quit() does
    assert len(stopped_at) < 50, "the lung step ran to its end after the run was cancelled"
    assert not [t for t in threading.enumerate() if t.name == "wscovid-lungs"]
    # run to the end, the lung step's result is used
    r = detect(phantom.volume, model="tiny-test", saliency="none")
    assert np.array_equal(r.lung_mask, phantom.lung_mask) and r.model_info["lung_method"] == "hybrid"


def test_detect_refuses_a_mismatched_lung_mask(phantom):
    with pytest.raises(ValueError, match="lung mask shape"):
        detect(phantom.volume, model="tiny-test", lung_mask=np.zeros((2, 2, 2), np.uint8))


def test_detect_refuses_unknown_scope(phantom):
    with pytest.raises(ValueError, match="saliency must be one of"):
        detect(phantom.volume, model="tiny-test", saliency="everything")


def test_detect_accepts_an_injected_model(phantom):
    import torch

    from napari_wscovid.models.wsnet import TASK_CLASSES, WSNet, tiny_config

    torch.manual_seed(0)
    net = WSNet(tiny_config(TASK_CLASSES["np_vs_covid"]))
    r = detect(
        phantom.volume, model=net, saliency="slices", slices=[8], lung_mask=phantom.lung_mask, ig_steps=2
    )
    assert r.classes == ("NP", "COVID-19")
    assert 8 in lung_slices(phantom.lung_mask, phantom.volume.spacing)
    assert r.saliency_slices == (8,) and r.saliency["conv5"][8].any()


def test_an_option_the_method_does_not_take_is_refused_before_any_work(phantom):
    with pytest.raises(ValueError, match=r"WSNet \(Hu et al. 2020\) does not take n_lesion_types"):
        detect(phantom.volume, model="tiny-test", lung_mask=phantom.lung_mask, n_lesion_types=3)
    # None means "the method's default" and is accepted by every method
    r = detect(phantom.volume, model="tiny-test", lung_mask=phantom.lung_mask, saliency="none", ig_steps=None)
    assert r.saliency_slices == () and r.model_info["architecture"] == "wsnet-hu2020"


def test_on_demand_explanation_sees_the_input_the_run_classified(phantom):
    """The "current slice" explanation after a run must explain the very input that was classified:
    a display-intensity CT (not HU) with padding is normalised as the run normalised it."""
    from napari_wscovid.io.volume import CTVolume
    from napari_wscovid.methods.wsnet import explain_more
    from napari_wscovid.stages import run_to_end

    hu = phantom.volume.hu.astype(np.float32)
    display = np.rint((np.clip(hu, -1350, 150) + 1350) / 1500 * 255).astype(np.float32)
    padding = np.zeros(display.shape, bool)
    padding[:, :, :6] = True
    volume = CTVolume(
        hu=display, spacing=phantom.volume.spacing, origin=phantom.volume.origin, is_hu=False,
        padding_mask=padding,
    )  # fmt: skip
    kwargs = dict(model="tiny-test", lung_mask=phantom.lung_mask, ig_steps=2, device="cpu")
    reference = detect(volume, saliency="slices", slices=[8], **kwargs)
    plain = detect(volume, saliency="none", **kwargs)
    later = run_to_end(explain_more(volume, plain, [8], model="tiny-test", device="cpu", ig_steps=2))
    for name, maps in later["saliency"].items():
        np.testing.assert_array_equal(maps[0], reference.saliency[name][8], err_msg=name)
    assert [b.as_dict() for b in later["boxes"]] == [b.as_dict() for b in reference.boxes]


def test_nan_output_is_a_clear_error(phantom):
    import torch

    from napari_wscovid.models.wsnet import WSNet, tiny_config

    net = WSNet(tiny_config())
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        detect(phantom.volume, model=net, saliency="none", lung_mask=phantom.lung_mask)


def test_display_intensity_input_is_not_normalised_as_hu(phantom):
    from napari_wscovid.io.volume import CTVolume
    from napari_wscovid.pipeline import model_input_kwargs
    from napari_wscovid.preprocess import prepare_slices

    hu = phantom.volume.hu.astype(np.float32)
    display = np.rint((np.clip(hu, -1350, 150) + 1350) / 1500 * 255).astype(np.float32)
    volume = CTVolume(hu=display, spacing=phantom.volume.spacing, origin=phantom.volume.origin, is_hu=False)
    kwargs = model_input_kwargs(volume, phantom.lung_mask, 64)
    assert kwargs["intensity"].method != "window" and kwargs["is_hu"] is False
    x, _ = prepare_slices(volume.hu, phantom.lung_mask, [8], **kwargs)
    lung = x[x > 0]
    # read as HU, 0..255 would all land in the top 7% of the -1350..150 window
    assert np.median(lung) < 0.5 and lung.std() > 0.02


def test_inference_copy_folds_batch_norm_without_changing_outputs():
    torch = pytest.importorskip("torch")
    from napari_wscovid.models.wsnet import WSNet, inference_copy, tiny_config

    torch.manual_seed(1)
    net = WSNet(tiny_config()).eval()
    # Non-trivial statistics, as after training; fresh ones would make folding nearly a no-op.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        reference = net(x)
        folded = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(folded.logits, reference.logits, rtol=1e-5, atol=1e-5)
    for scale, cam in reference.cams.items():
        torch.testing.assert_close(folded.cams[scale], cam, rtol=1e-5, atol=1e-5)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_ig_steps_are_reported_per_explained_slice(phantom, tiny_result):
    assert tiny_result.ig_steps == (4,) * len(tiny_result.saliency_slices)  # fixed when given
    r = detect(
        phantom.volume, model="tiny-test", lung_mask=phantom.lung_mask, saliency="slices", slices=[6, 8]
    )
    assert r.saliency_slices == (6, 8) and len(r.ig_steps) == 2
    assert all(s in (8, 16, 32, 64) for s in r.ig_steps)  # chosen by the completeness check


def test_detection_that_would_not_fit_in_memory_is_refused_before_any_work(monkeypatch):
    from napari_wscovid import pipeline
    from napari_wscovid.io import volume as volume_io
    from napari_wscovid.phantom import make_phantom

    phantom = make_phantom("COVID-19", n_slices=8, size=64, seed=0)
    monkeypatch.setattr(volume_io, "available_memory_bytes", lambda: 100 * 1024**2)
    steps = pipeline.detect_iter(phantom.volume, model="tiny-test")
    expected = r"8 x 64 x 64 CT needs about 0\.5 GiB .* 0\.1 GiB is free"
    with pytest.raises(pipeline.NotEnoughMemory, match=expected):
        next(steps)  # refused before the lung step reports anything


def test_explaining_goes_most_abnormal_first_and_a_stop_keeps_the_same_maps(
    phantom, tiny_result, monkeypatch
):
    """Stopped after one batch, the run has explained the most abnormal pair of slices, with the
    very maps and boxes a full run gives them."""
    from napari_wscovid.explain.saliency import explain_slices
    from napari_wscovid.models.registry import load_model
    from napari_wscovid.stages import abnormality, run_to_end

    net, _ = load_model("tiny-test", device="cpu")
    chosen = np.asarray(tiny_result.saliency_slices)
    probs = tiny_result.slice_probs.copy()
    probs[chosen[-1]] = (0.05, 0.05, 0.9)  # the last slice is the most abnormal by far
    kwargs = dict(
        net=net, lung_mask=phantom.lung_mask, slice_probs=probs,
        classes=tiny_result.classes, ig_steps=4, batch_size=2,
    )  # fmt: skip
    full = run_to_end(explain_slices(phantom.volume, chosen, **kwargs))
    stop = threading.Event()
    running = explain_slices(phantom.volume, chosen, stop=stop, **kwargs)
    next(running)  # the first batch is done
    stop.set()
    part = run_to_end(running)
    pairs = [chosen[i : i + 2] for i in range(0, len(chosen), 2)]
    score = abnormality(probs[chosen], tiny_result.classes)
    best = max(range(len(pairs)), key=lambda i: score[2 * i : 2 * i + 2].max())
    assert best == len(pairs) - 1  # so that index order would not pass
    assert part["slices"].tolist() == pairs[best].tolist()
    assert full["slices"].tolist() == chosen.tolist()
    rows = np.isin(chosen, part["slices"])
    for name, maps in part["saliency"].items():
        np.testing.assert_array_equal(maps, full["saliency"][name][rows], err_msg=name)
    np.testing.assert_array_equal(part["ig_steps"], full["ig_steps"][rows])
    kept = [b.as_dict() for b in full["boxes"] if b.slice in part["slices"]]
    assert [b.as_dict() for b in part["boxes"]] == kept
    assert [b.slice for b in full["boxes"]] == sorted(b.slice for b in full["boxes"])  # slice order
    # set between two forward passes of a batch's path (one path point per pass here): that batch
    # is dropped whole
    import importlib

    # (the package exports a function of the module's name: the module itself is imported by path)
    ig_module = importlib.import_module("napari_wscovid.explain.integrated_gradients")
    monkeypatch.setattr(ig_module, "_PIXELS_PER_BATCH", 64 * 64)
    cut = run_to_end(explain_slices(phantom.volume, chosen, stop=StopAfter(2), **kwargs))
    assert cut["slices"].tolist() == [] and cut["boxes"] == [] and len(cut["saliency"]["joint"]) == 0


def test_a_run_stopped_before_explaining_lists_the_slices_left(phantom, tiny_result):
    from napari_wscovid.stages import Deadline

    r = detect(
        phantom.volume, model="tiny-test", saliency="all", lung_mask=phantom.lung_mask, ig_steps=4,
        stop_explaining=Deadline(0),
    )  # fmt: skip
    assert r.saliency_slices == () and r.saliency == {} and r.boxes == []
    assert r.unexplained_slices == tiny_result.saliency_slices
    assert f"of the {len(r.unexplained_slices)} slices to explain" in r.explain_note
    np.testing.assert_array_equal(r.slice_probs, tiny_result.slice_probs)  # the answer is whole


def test_deadline_counts_from_its_first_question():
    from napari_wscovid.stages import Deadline

    deadline = Deadline(0.05)
    time.sleep(0.1)  # not yet asked: the lung step and classification do not count
    assert not deadline.is_set()
    time.sleep(0.06)
    assert deadline.is_set()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time budget"):
            Deadline(bad)


@pytest.mark.parametrize("kind", ["wsnet", "decovnet", "fecnn"])
def test_the_caller_keeps_its_autograd_mode_at_every_progress_report(phantom, kind):
    # Grad and inference mode are per-thread globals. A generator suspended inside
    # torch.inference_mode() leaves its caller in that mode; if it is then abandoned and
    # collected on another thread, the caller's thread never leaves it (CI at 570d983).
    import torch

    model = "tiny-test" if kind == "wsnet" else tiny_network(kind)
    gen = detect_iter(phantom.volume, model=model, saliency="all", lung_mask=phantom.lung_mask)
    modes = []
    while True:
        try:
            _, _, message = next(gen)
        except StopIteration:
            break
        modes.append((message, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    assert len(modes) > 3
    assert [m for m in modes if m[1:] != (True, False)] == []


def test_the_answer_is_reported_before_the_first_slice_is_explained(phantom):
    """Saliency takes minutes on a laptop CPU; the call is known before it starts, so the
    progress says it then (and keeps saying it), not only in the result at the end."""
    from napari_wscovid.stages import call_line

    gen = detect_iter(
        phantom.volume, model="tiny-test", saliency="all", lung_mask=phantom.lung_mask, ig_steps=4
    )
    messages = []
    while True:
        try:
            messages.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    answer = call_line(result.patient_probs, result.classes)
    assert answer.startswith(f"Called {result.predicted_class} (")
    saliency = [m for stage, _, m in messages if stage == 2]
    counted = [i for i, m in enumerate(saliency) if m.endswith(f"/{len(result.saliency_slices)})")]
    assert counted, saliency  # one report per explained batch
    assert saliency[0] == f"{answer}. Explaining {len(result.saliency_slices)} slices, most abnormal first"
    assert 0 < counted[0] and all(m.startswith(f"{answer}. ") for m in saliency)


def test_a_lung_narrower_than_a_newborns_is_no_lung_and_gets_no_call(phantom, monkeypatch):
    """Bowel gas of an abdomen-only CT found as 1.5 mL of 'lung' was classified (NP 0.82) and,
    with every slice explained, boxed in the bowel. Under 10 cm² at its widest it is no lung."""
    import napari_wscovid.lung as lung

    def bowel_gas(volume, method, progress=None):
        mask = np.zeros(volume.shape, np.uint8)
        side = int(np.sqrt(500.0 / np.prod(volume.spacing[1:])))  # about 5 cm² a slice
        mask[6:10, 60 : 60 + side, 60 : 60 + side] = 1
        return mask

    monkeypatch.setattr(lung, "segment_lungs", bowel_gas)
    r = detect(phantom.volume, model="tiny-test", saliency="all", ig_steps=2)
    assert r.predicted_class is None and r.call_text.startswith("no call")
    assert r.status == "out_of_scope" and not r.lung_mask.any() and r.boxes == []
    assert [f["name"] for f in r.qc if f["severity"] == "severe"][:1] == ["no_lungs"]


def test_a_picture_with_no_lung_found_is_analysed_whole_and_says_so(monkeypatch):
    import napari_wscovid.lung as lung
    from napari_wscovid.io.volume import CTVolume

    picture = CTVolume(
        hu=np.random.default_rng(0).integers(0, 255, (1, 96, 96)).astype(np.float32),
        spacing=(1.0, 0.7, 0.7),
        origin=(0.0, 0.0, 0.0),
        is_hu=False,
    )
    monkeypatch.setattr(
        lung, "segment_lungs", lambda volume, method, progress=None: np.zeros(volume.shape, np.uint8)
    )
    r = detect(picture, model="tiny-test", saliency="none")
    assert r.lung_mask.all() and r.predicted_class is not None
    assert "whole_image_as_lung" in {f["name"] for f in r.qc if f["severity"] == "severe"}
    assert r.status == "needs_review" and r.model_info["lung_method"].endswith("none found: the whole image")


def test_involvement_is_unmeasured_without_saliency_and_partial_on_the_slices_stopped_on(monkeypatch):
    """summary.json said 0 % (clear lungs) for a run that explained nothing, and the panel gave
    one explained slice's share as the whole lung's."""
    import dataclasses

    from napari_wscovid.cli import summary_dict
    from napari_wscovid.phantom import make_phantom

    qtpy = pytest.importorskip("qtpy")  # the panel's text lives beside its widget
    assert qtpy
    from napari_wscovid._widgets.results_panel import summary_text

    normal = make_phantom("NP", n_slices=12, size=96, seed=1)
    unmeasured = detect(normal.volume, model="tiny-test", saliency="none", lung_mask=normal.lung_mask)
    assert summary_dict(unmeasured, normal.volume)["involvement_percent"] is None
    assert "Involvement" not in summary_text(unmeasured)
    nothing_to_explain = detect(
        normal.volume, model="tiny-test", saliency="positive", lung_mask=normal.lung_mask
    )
    assert nothing_to_explain.predicted_class == "NP" and not nothing_to_explain.saliency_slices
    assert summary_dict(nothing_to_explain, normal.volume)["involvement_percent"] == 0.0  # measured: none
    one_slice = dataclasses.replace(
        unmeasured, involvement={"total_percent": 1.7}, saliency_slices=(5,), involvement_partial=True
    )
    assert "Involvement: at least 1.7 % of lung (only the 1 slice(s) you stopped on" in summary_text(
        one_slice
    )
