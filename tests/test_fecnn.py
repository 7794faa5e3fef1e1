"""FeCNN and the lesion branch of Wu et al. 2021: network, Grad-CAM++, detection, typing, layer, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_wscovid.explain.gradcampp import gradcam_plus_plus
from napari_wscovid.models.fecnn import (
    LEVELS,
    FeCNN,
    FeCNNConfig,
    effective_fusion_weights,
    fusion_weights,
    level_error_rates,
    tiny_fecnn_config,
)
from napari_wscovid.results import Box, DetectionResult, Lesion


@pytest.fixture(scope="module")
def phantom():
    from napari_wscovid.phantom import make_phantom

    return make_phantom("COVID-19", n_slices=16, size=96, seed=0)


def _tiny_net(seed: int = 0, positive_bias: float = 5.0) -> FeCNN:
    """A random tiny FeCNN whose fusion bias makes every slice COVID-19 (so every slice is explained)."""
    torch.manual_seed(seed)
    net = FeCNN(tiny_fecnn_config()).eval()
    with torch.no_grad():
        net.fusion.bias.copy_(torch.tensor([-positive_bias, positive_bias]))
    return net


@pytest.fixture(scope="module")
def tiny_result(phantom):
    from napari_wscovid.methods.fecnn import detect_iter
    from napari_wscovid.pipeline import run_to_end

    info = {"name": "tiny-fecnn", "version": "0", "sha256": "0" * 64}
    progress = []
    result = run_to_end(
        detect_iter(
            phantom.volume, _tiny_net(), info, lung_mask=phantom.lung_mask, torch_device=torch.device("cpu")
        ),
        lambda *p: progress.append(p),
    )
    return result, progress


# ----------------------------------------------------------------------------- network


def test_shapes_levels_and_config_round_trip():
    cfg = tiny_fecnn_config(input_size=64)
    net = FeCNN(cfg).eval()
    out = net(torch.rand(3, 1, 64, 64))
    assert out.logits.shape == (3, 2)
    assert set(out.level_logits) == set(LEVELS)
    assert all(s.shape == (3, 2) and (s >= 0).all() for s in out.level_logits.values())  # eq. 1 has a ReLU
    # C3..C5 at strides 8, 16, 32; P3..P5 match them; P6, P7 halve again from C5
    sizes = {k: tuple(v.shape[-2:]) for k, v in out.features.items()}
    assert sizes["c3"] == sizes["p3"] == (8, 8) and sizes["c4"] == sizes["p4"] == (4, 4)
    assert sizes["c5"] == sizes["p5"] == (2, 2) and sizes["p6"] == (1, 1) and sizes["p7"] == (1, 1)
    assert out.features["c5"].shape[1] == cfg.widths[-1]
    assert FeCNNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert FeCNNConfig().architecture == "fecnn-wu2021" and FeCNNConfig().classes == ("NP", "COVID-19")
    assert FeCNNConfig().input_size == 224


def test_fusion_weights_formula_and_buffer():
    e = np.array([0.1, 0.5, 0.9, 0.25, 0.0])
    w = fusion_weights(e)
    np.testing.assert_allclose(w[[0, 1, 3]], 0.5 * np.log((1 - e[[0, 1, 3]]) / e[[0, 1, 3]]))
    assert w[0] == pytest.approx(0.5 * math.log(9)) and w[3] == pytest.approx(0.5 * math.log(3))
    assert w[1] == 0 and w[2] == 0  # no better than chance: left out, not flipped
    assert np.isfinite(w[4]) and w[4] == pytest.approx(0.5 * math.log(999))  # clipped at 1e-3

    net = FeCNN(tiny_fecnn_config()).eval()
    assert torch.equal(net.level_weights, torch.ones(5)) and "level_weights" in net.state_dict()
    x = torch.rand(2, 1, 64, 64)
    net.set_level_error_rates(dict(zip(LEVELS, e, strict=True)))
    np.testing.assert_allclose(net.level_weights.numpy(), w, rtol=1e-6)
    out = net(x)
    d = torch.cat([float(w[i]) * out.level_logits[lv] for i, lv in enumerate(LEVELS)], 1)
    torch.testing.assert_close(out.logits, d @ net.fusion.weight.T + net.fusion.bias)
    labels = torch.tensor([0, 1])
    rates = level_error_rates(out.level_logits, labels)
    assert set(rates) == set(LEVELS) and all(r in (0.0, 0.5, 1.0) for r in rates.values())
    with pytest.raises(ValueError):
        net.set_level_error_rates([0.1, 0.2])
    # every level at chance or worse: averaged, not a constant fused score
    net.set_level_error_rates([0.5, 0.6, 0.7, 0.5, 0.55])
    np.testing.assert_allclose(net.level_weights.numpy(), np.full(5, 0.2), rtol=1e-6)


def test_save_load_round_trip(tmp_path):
    from napari_wscovid.models.registry import load_model, save_model

    net = FeCNN(tiny_fecnn_config()).eval()
    net.set_level_error_rates([0.05, 0.1, 0.2, 0.3, 0.4])
    path = tmp_path / "fecnn.safetensors"
    sha = save_model(net, path, name="t", version="1", extra_metadata={"training_data": "none"})
    loaded, info = load_model(path, device="cpu", sha256=sha, cache=False)
    assert isinstance(loaded, FeCNN) and loaded.config == net.config
    assert info["architecture"] == "fecnn-wu2021" and info["training_data"] == "none"
    reference = FeCNN(net.config).eval()
    reference.load_state_dict(
        {k: v.half().float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    )
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(loaded(x).logits, reference(x).logits)
    np.testing.assert_allclose(loaded.level_weights.numpy(), net.level_weights.numpy(), rtol=1e-3)


# ----------------------------------------------------------------------------- Grad-CAM++


class _ExpLinearNet(nn.Module):
    """x -> A = conv(x) (2 channels, 3x3) -> S = linear(A) (or linear(GAP(ReLU(conv1x1 A))))."""

    def __init__(self, relu_head: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(1, 2, 3, padding=1).double()
        self.relu_head = relu_head
        self.mix = nn.Conv2d(2, 4, 1).double()
        self.linear = nn.Linear(4 if relu_head else 18, 2).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        if self.relu_head:
            h = torch.relu(self.mix(a)).mean((2, 3))
        else:
            h = a.flatten(1)
        return type("Out", (), {"logits": self.linear(h), "features": {"a": a}})()


def _oracle(net, x, target):
    """Grad-CAM++ from the paper's general formula, with exact higher derivatives of Y = exp(S)."""
    maps = []
    for n in range(len(x)):
        out = net(x[n : n + 1])
        a = out.features["a"]
        y = torch.exp(out.logits[0, target])
        (d1,) = torch.autograd.grad(y, a, create_graph=True)
        d2 = torch.zeros_like(a)
        d3 = torch.zeros_like(a)
        for idx in np.ndindex(*a.shape):
            (h,) = torch.autograd.grad(d1[idx], a, create_graph=True)
            d2[idx] = h[idx]
            (t,) = torch.autograd.grad(h[idx], a, retain_graph=True, allow_unused=True)
            d3[idx] = 0.0 if t is None else t[idx]
        a, d1, d2, d3 = a.detach(), d1.detach(), d2.detach(), d3.detach()
        den = 2 * d2 + a.sum((2, 3), keepdim=True) * d3
        alpha = torch.where(d2 != 0, d2 / torch.where(den != 0, den, 1.0), 0.0)
        w = (alpha * torch.relu(d1)).sum((2, 3))
        maps.append(torch.relu((w[:, :, None, None] * a).sum(1))[0])
    return torch.stack(maps)


@pytest.mark.parametrize("relu_head", [False, True])
def test_gradcampp_matches_double_backward_oracle(relu_head):
    net = _ExpLinearNet(relu_head)
    x = torch.randn(3, 1, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for target in (0, 1):
        maps, scores = gradcam_plus_plus(net, x, target, "a", scale_by_exp=True)
        expected = _oracle(net, x, target)
        assert expected.abs().max() > 0
        torch.testing.assert_close(maps, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(scores, net(x).logits[:, target].detach())
        plain, _ = gradcam_plus_plus(net, x, target, "a")  # without exp(S): the same map up to a factor
        torch.testing.assert_close(plain * torch.exp(scores)[:, None, None], maps)


def test_gradcampp_hand_computed_single_channel():
    # One channel, S = sum(W * A): g = W, alpha = W^2 / (2 W^2 + sum(A) W^3), map = w * A.
    w_a = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    a = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]], dtype=torch.float64)

    def model(x):
        return type("Out", (), {"logits": (w_a * x).sum((2, 3)), "features": {"a": x}})()

    maps, _ = gradcam_plus_plus(model, a.clone().requires_grad_(True), 0, "a")
    alpha = w_a**2 / (2 * w_a**2 + a.sum() * w_a**3)
    weight = (alpha * torch.relu(w_a)).sum()
    torch.testing.assert_close(maps[0], torch.relu(weight * a[0, 0]))


def test_gradcampp_properties_and_layer_choices():
    # The score reads channel 0 only; channel 1 (non-zero on the right half) must not appear.
    a = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    a[:, 0, :, :2] = torch.rand(2, 4, 2, dtype=torch.float64) + 0.1
    a[:, 1, :, 2:] = 1.0
    w = torch.randn(4, 4, dtype=torch.float64).abs()

    def model(x):
        return type(
            "Out",
            (),
            {"logits": torch.stack([(w * x[:, 0]).sum((1, 2)), -x.sum((1, 2, 3))], 1), "features": {"a": x}},
        )()

    maps, _ = gradcam_plus_plus(model, a.clone().requires_grad_(True), 0, "a")
    assert (maps >= 0).all() and torch.isfinite(maps).all()
    assert maps[:, :, 2:].abs().max() == 0 and maps[:, :, :2].min() > 0

    net = FeCNN(tiny_fecnn_config()).eval()
    x = torch.rand(3, 1, 64, 64)
    batched, _ = gradcam_plus_plus(net, x, 1, "c5")
    hooked, _ = gradcam_plus_plus(net, x, 1, net.stages[3])  # the module whose output is C5
    torch.testing.assert_close(batched, hooked)
    singles = torch.cat([gradcam_plus_plus(net, x[i : i + 1], 1, "c5")[0] for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-6)
    assert (batched >= 0).all() and batched.shape == (3, 2, 2)


# ----------------------------------------------------------------------------- detection


def test_detect_iter_on_phantom(phantom, tiny_result):
    from napari_wscovid.pipeline import lung_slices, patient_probabilities

    r, progress = tiny_result
    z, y, x = phantom.volume.shape
    lung_idx = lung_slices(phantom.lung_mask, phantom.volume.spacing)
    # the method ends at its last stage; the pipeline around it says "Done"
    assert progress[-1][:2] == (3, 4) and all(d <= t for d, t, _ in progress)
    assert r.classes == ("NP", "COVID-19") and r.slice_probs.shape == (z, 2)
    assert np.isnan(r.slice_probs[np.setdiff1d(np.arange(z), lung_idx)]).all()
    np.testing.assert_allclose(r.slice_probs[lung_idx].sum(1), 1, atol=1e-5)
    expected, rule = patient_probabilities(r.slice_probs, r.classes)
    np.testing.assert_allclose(r.patient_probs, expected)
    assert r.patient_rule == rule
    assert r.predicted_class == "COVID-19" and r.explained_class == "COVID-19"
    assert r.saliency_slices == tuple(lung_idx.tolist())  # every slice is positive with this bias

    heat = r.cams["gradcam++"]
    assert set(r.cams) == {"gradcam++"} and heat.shape == (z, y, x) and heat.dtype == np.uint8
    assert heat[phantom.lung_mask == 0].max() == 0
    assert all(heat[s].max() > 0 for s in lung_idx)

    assert len(r.boxes) == len(r.lesions) > 1
    k = r.lesion_types["k"]
    assert k == 2 and r.lesion_types["names"] == ["GGO-like", "consolidation-like"]
    assert r.lesion_types["mean_density"][0] <= r.lesion_types["mean_density"][1]
    assert sum(r.lesion_types["counts"]) == len(r.lesions) and r.lesion_types["centres"].shape == (2, 16)
    for box, les in zip(r.boxes, r.lesions, strict=True):
        assert box.source == "gradcam++" and box.class_name == "COVID-19" and box.slice == les.slice
        assert box.area_mm2 == les.area_mm2 >= 20.0
        assert box.y0 <= les.y < box.y1 and box.x0 <= les.x < box.x1  # the peak lies in its region
        assert phantom.lung_mask[les.slice, les.y, les.x] > 0
        assert abs(int(heat[les.slice, les.y, les.x]) - les.activation * 255) <= 0.5  # the peak's value
        assert les.features.shape == (16,) and 0 <= les.cluster < k
        assert len(les.soft_scores) == k and sum(les.soft_scores) == pytest.approx(1.0)
        assert int(np.argmax(les.soft_scores)) == les.cluster  # nearest centre, highest score
    assert 0 < r.involvement["total_percent"] <= 100
    assert r.model_info == {"name": "tiny-fecnn", "version": "0", "sha256": "0" * 64}
    assert {"classification", "gradcam++", "lesion_clustering"} <= set(r.timings)
    assert r.device == "cpu" and r.lung_volume_ml > 0


def test_regions_are_four_connected():
    from napari_wscovid.methods.fecnn import _slice_regions

    heat = np.zeros((12, 12))
    heat[2:6, 2:6] = 1.0
    heat[6:10, 6:10] = 0.9  # touches the first block only at a corner
    lung = np.ones_like(heat, dtype=bool)
    mask, regions = _slice_regions(heat, lung, (1.0, 1.0), min_area_mm2=5.0)
    assert len(regions) == 2 and mask.sum() == 32
    assert _slice_regions(heat, lung, (1.0, 1.0), min_area_mm2=17.0)[1] == []  # 16 mm^2 each
    assert _slice_regions(np.zeros((4, 4)), np.ones((4, 4), bool), (1.0, 1.0), 0.0)[1] == []


def test_detect_with_nothing_positive(phantom):
    from napari_wscovid.methods.fecnn import detect_iter
    from napari_wscovid.pipeline import run_to_end

    net = _tiny_net(positive_bias=-5.0)  # every slice NP
    r = run_to_end(
        detect_iter(phantom.volume, net, {}, lung_mask=phantom.lung_mask, torch_device=torch.device("cpu"))
    )
    assert r.predicted_class == "NP" and r.boxes == [] and r.lesions == [] and r.saliency_slices == ()
    assert r.cams["gradcam++"].max() == 0 and r.lesion_types["k"] == 0


# ----------------------------------------------------------------------------- lesion typing


def test_kmeans_typing_recovers_two_groups_with_soft_scores():
    from napari_wscovid.methods.fecnn import cluster_lesions, soft_scores, type_lesions

    rng = np.random.default_rng(0)
    low = rng.normal(0.0, 0.3, (15, 8))
    high = rng.normal(0.0, 0.3, (12, 8)) + 5.0
    features = np.concatenate([low, high]).astype(np.float32)
    truth = np.array([0] * 15 + [1] * 12)
    c = cluster_lesions(features, 2)
    assert c["k"] == 2 and len({*c["labels"][:15]}) == 1 and len({*c["labels"][15:]}) == 1
    assert c["labels"][0] != c["labels"][-1]
    np.testing.assert_allclose(c["soft_scores"].sum(1), 1.0)
    d = np.linalg.norm(features[:, None] - c["centres"][None], axis=2)
    np.testing.assert_allclose(c["soft_scores"], soft_scores(d), rtol=1e-5)
    np.testing.assert_allclose(soft_scores(np.array([[0.0, math.log(3)]])), [[0.75, 0.25]])

    # type_lesions: clusters renumbered by density, so the low-density group is cluster 0, "GGO-like"
    lesions = [Lesion(0, i, i, 10.0, 1.0, features=f) for i, f in enumerate(features)]
    density = np.where(truth == 1, -600.0, 0.0)  # the second group is the less dense one here
    types = type_lesions(lesions, density, 2)
    assert [les.cluster for les in lesions] == (1 - truth).tolist()
    assert types["names"] == ["GGO-like", "consolidation-like"] and types["counts"] == [12, 15]
    assert types["mean_density"] == [-600.0, 0.0]
    for les in lesions:
        assert sum(les.soft_scores) == pytest.approx(1.0) and les.soft_scores[les.cluster] > 0.5
    assert cluster_lesions(features[:1], 2)["k"] == 1  # fewer distinct lesions than types


# ----------------------------------------------------------------------------- napari layer


def test_lesion_points_layer(phantom, tiny_result):
    from napari_wscovid._widgets.lesion_layer import lesion_points_layer

    r, _ = tiny_result
    vol = phantom.volume
    data, kwargs, kind = lesion_points_layer(r, vol)
    assert kind == "points" and data.shape == (len(r.lesions), 3)
    np.testing.assert_array_equal(data, [[les.slice, les.y, les.x] for les in r.lesions])
    # in world (mm) coordinates each point is its lesion's peak voxel
    world = data * np.asarray(kwargs["scale"]) + np.asarray(kwargs["translate"])
    np.testing.assert_allclose(world, vol.index_to_world(data))
    feats = kwargs["features"]
    assert {"cluster", "type", "soft_score", "score_0", "score_1", "area_mm2", "activation"} <= set(feats)
    assert len(feats) == len(r.lesions) and set(feats["type"]) <= {"GGO-like", "consolidation-like"}
    np.testing.assert_allclose(feats["score_0"] + feats["score_1"], 1.0)
    colors = {tuple(c) for c, k in zip(kwargs["face_color"], feats["cluster"], strict=True) if k == 0}
    assert len(colors) == 1 and kwargs["face_color"].shape == (len(r.lesions), 4)
    assert "phantom" not in kwargs["name"].lower() and kwargs["name"]

    napari_layers = pytest.importorskip("napari.layers")
    layer = napari_layers.Points(data, **kwargs)
    assert len(layer.data) == len(r.lesions) and list(layer.features["cluster"]) == list(feats["cluster"])

    empty = DetectionResult(
        classes=r.classes, slice_probs=r.slice_probs, patient_probs=r.patient_probs, lung_mask=r.lung_mask
    )
    data0, kwargs0, _ = lesion_points_layer(empty, vol)
    assert data0.shape == (0, 3) and len(kwargs0["features"]) == 0
    assert len(napari_layers.Points(data0, **kwargs0).data) == 0


# ----------------------------------------------------------------------------- training


def test_short_training_exports_a_loadable_model(tmp_path, monkeypatch, phantom):
    import napari_wscovid.phantom
    from napari_wscovid.models.registry import file_sha256, load_model
    from training.train_fecnn import main

    normal = napari_wscovid.phantom.make_phantom("NP", n_slices=16, size=96, seed=1)
    monkeypatch.setattr(
        napari_wscovid.phantom, "make_phantom", lambda kind, **_: normal if kind == "NP" else phantom
    )
    out = tmp_path / "run"
    args = [
        "--model",
        "tiny",
        "--input-size",
        "64",
        "--iterations",
        "3",
        "--batch-size",
        "4",
        "--val-every",
        "2",
        "--phantom-size",
        "96",
        "--phantom-slices",
        "16",
        "--phantom-pool",
        "1",
        "--val-volumes",
        "1",
        "--test-volumes",
        "1",
        "--num-workers",
        "0",
        "--n-boot",
        "10",
        "--threads",
        "1",
        "--out-dir",
        str(out),
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 3]
    exported = metrics["export"]["path"]
    assert metrics["export"]["sha256"] == file_sha256(exported)
    net, info = load_model(exported, device="cpu", sha256=metrics["export"]["sha256"], cache=False)
    assert isinstance(net, FeCNN) and net.classes == ("NP", "COVID-19")
    assert "phantoms" in info["training_data"]
    # the exported fusion weights come from the kept checkpoint's validation error rates (eq. 2-3)
    best = next(h for h in metrics["history"] if h["step"] == metrics["best_step"])
    expected = effective_fusion_weights([best["level_error_rates"][lv] for lv in LEVELS])
    np.testing.assert_allclose(net.level_weights.numpy(), expected, rtol=2e-3)
    assert net(torch.rand(1, 1, 64, 64)).logits.shape == (1, 2)

    assert main([*args, "--iterations", "4", "--resume", str(out / "last.pt")]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 4


def test_training_cli_help(capsys):
    from training.train_fecnn import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--max-minutes" in text and "--medseg-root" in text and "50 %" in text


def test_through_the_pipeline(tmp_path, phantom):
    from napari_wscovid import detect
    from napari_wscovid.models.registry import save_model

    path = tmp_path / "fecnn.safetensors"
    sha = save_model(_tiny_net(), path, name="tiny-fecnn", version="0")
    r = detect(phantom.volume, model=str(path), lung_mask=phantom.lung_mask, device="cpu")
    assert r.model_info["sha256"] == sha and "gradcam++" in r.cams
    assert len(r.lesions) == len(r.boxes) > 0 and r.lesion_types["k"] == 2


def test_lesion_type_script_scores_clusters():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "lesion_type_clusters.py"
    spec = importlib.util.spec_from_file_location("lesion_type_clusters", script)
    ltc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ltc)

    mask = np.zeros((1, 10, 10), np.uint8)
    mask[0, 0:3, 0:3] = 3  # crazy paving counts as GGO
    mask[0, 5:9, 5:9] = 2
    lesions = [Lesion(0, 1, 1, 1.0, 1.0), Lesion(0, 4, 4, 1.0, 1.0), Lesion(0, 9, 0, 1.0, 1.0)]
    boxes = [
        Box(0, 0, 0, 3, 3, "COVID-19", 1.0),
        Box(0, 4, 4, 7, 7, "COVID-19", 1.0),
        Box(0, 9, 0, 10, 1, "COVID-19", 1.0),
    ]
    # the second peak is off the lesion: its box's majority decides; the third box holds no lesion
    assert ltc.lesion_truth(lesions, boxes, mask, ltc.PHANTOM_TYPES) == [0, 1, -1]

    rng = np.random.default_rng(1)
    features = np.concatenate(
        [rng.normal(0, 0.2, (6, 4)), rng.normal(4, 0.2, (4, 4)), rng.normal(0, 1, (1, 4))]
    )
    truth = [0] * 6 + [1] * 3 + [0] + [-1]  # one GGO lesion sits in the consolidation group
    density = [-700.0] * 6 + [0.0] * 4 + [0.0]
    res = ltc.evaluate_clusters(list(features), density, truth, 2)
    assert res["n_untyped"] == 1 and res["confusion"] == [[6, 1], [0, 3]]
    ggo, cons = res["clusters"]
    assert ggo["matched_type"] == "GGO" and ggo["sensitivity"] == pytest.approx(6 / 7)
    assert ggo["specificity"] == 1.0 and ggo["purity"] == 1.0
    assert cons["matched_type"] == "consolidation" and cons["sensitivity"] == 1.0
    assert cons["specificity"] == pytest.approx(6 / 7) and cons["purity"] == pytest.approx(0.75)
    assert "| GGO | 6 | 1 |" in ltc.format_report("t", res)
