"""DeCoVNet (Zheng et al. 2020): the network of Table 1, its detection method and its training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_wscovid.methods.decovnet import (
    BOX_SOURCE,
    cam_to_grid,
    detect_iter,
    lesion_boxes,
    lung_crop,
    prepare_volume,
)
from napari_wscovid.models.decovnet import DeCoVNet, DeCoVNetConfig, tiny_decovnet_config
from napari_wscovid.pipeline import run_to_end
from napari_wscovid.results import Box

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def covid_phantom():
    from napari_wscovid.phantom import make_phantom

    return make_phantom("COVID-19", n_slices=16, size=96, seed=0)


@pytest.fixture()
def tiny_net():
    torch.manual_seed(0)
    return DeCoVNet(tiny_decovnet_config()).eval()


# ----------------------------------------------------------------------------- network


def table1_parameter_count() -> int:
    """Parameters of Table 1, layer by layer (BN: weight and bias; convolutions before a BN have no bias)."""
    conv = lambda cin, cout, k, bias=False: cin * cout * k + (cout if bias else 0)  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    stem = conv(2, 16, 5 * 7 * 7) + bn(16)
    res1 = conv(16, 64, 3) + bn(64) + conv(64, 64, 9) + bn(64) + conv(16, 64, 1) + bn(64)
    res2 = conv(64, 128, 3) + bn(128) + conv(128, 128, 9) + bn(128) + conv(64, 128, 1) + bn(128)
    head = conv(128, 64, 27, True) + conv(64, 32, 27, True) + conv(32, 32, 27, True)
    fc = 32 * 2 + 2
    return stem + res1 + res2 + head + fc


def test_full_network_matches_table1():
    net = DeCoVNet().eval()
    assert DeCoVNetConfig().input_size == (192, 288) and net.classes == ("NP", "COVID-19")
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == table1_parameter_count() == 534_530
    x = torch.rand(1, 2, 6, 192, 288)
    with torch.inference_mode():
        stem = net.stem(x)
        res1 = net.res1(stem)
        res2 = net.res2(net.slice_pool(res1))
        logits, cam = net.forward_with_cam(x)
    # Output sizes of Table 1 (channel, length, height, width) for T = 6.
    assert stem.shape == (1, 16, 6, 48, 72)
    assert res1.shape == (1, 64, 6, 48, 72)
    assert res2.shape == (1, 128, 3, 24, 36)
    assert logits.shape == (1, 2) and cam.shape == (1, 2, 4, 12, 18)


@pytest.mark.parametrize("n_slices", [1, 5, 23])
def test_any_number_of_slices_gives_one_prediction(tiny_net, n_slices):
    with torch.inference_mode():
        logits, cam = tiny_net.forward_with_cam(torch.rand(2, 2, n_slices, 32, 48))
    assert logits.shape == (2, 2) and cam.shape == (2, 2, 2, 2, 3)
    assert torch.isfinite(logits).all()


def test_cam_is_the_fc_weighted_last_features(tiny_net):
    # With one-hot FC weights class k's CAM is one feature channel, and the logit is its global
    # maximum plus the bias: the CAM is laid out as the classifier reads it.
    x = torch.rand(1, 2, 9, 32, 48)
    with torch.no_grad():
        peaks = tiny_net.features(x).amax(dim=(0, 2, 3, 4))
        first, second = (int(c) for c in torch.argsort(peaks, descending=True)[:2])
        tiny_net.fc.weight.zero_()
        tiny_net.fc.weight[0, first] = 1.0
        tiny_net.fc.weight[1, second] = -2.0
        tiny_net.fc.bias.copy_(torch.tensor([0.5, -0.25]))
    with torch.inference_mode():
        logits, cam = tiny_net.forward_with_cam(x)
        feats = tiny_net.features(x)
        assert torch.allclose(logits, tiny_net(x))
    assert torch.equal(cam[0, 0], feats[0, first]) and torch.equal(cam[0, 1], -2 * feats[0, second])
    assert torch.allclose(logits[0, 0], cam[0, 0].max() + 0.5)
    assert torch.allclose(logits[0, 1], -2 * feats[0, second].max() - 0.25)
    assert cam[0, 0].max() > 0 and cam[0, 1].min() < 0


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_net):
    from napari_wscovid.models.registry import load_model, save_model

    tiny_net.train()
    with torch.no_grad():
        tiny_net(torch.rand(1, 2, 8, 32, 48) * 3)  # non-trivial BatchNorm running statistics
    tiny_net.eval()
    path = tmp_path / "decovnet.safetensors"
    sha = save_model(tiny_net, path, name="tiny-decovnet", version="0", half=False)
    loaded, info = load_model(path, device="cpu", sha256=sha, cache=False)
    assert isinstance(loaded, DeCoVNet) and loaded.config == tiny_net.config
    assert info["architecture"] == "decovnet-zheng2020" and info["name"] == "tiny-decovnet"
    x = torch.rand(2, 2, 7, 32, 48)
    with torch.inference_mode():
        a, cam_a = tiny_net.forward_with_cam(x)
        b, cam_b = loaded.forward_with_cam(x)
    assert torch.equal(a, b) and torch.equal(cam_a, cam_b)


# ----------------------------------------------------------------------------- input


def test_prepare_volume_keeps_slices_and_normalises(covid_phantom):
    config = tiny_decovnet_config(input_size=(40, 60))
    vol, lung = covid_phantom.volume, covid_phantom.lung_mask
    x = prepare_volume(vol, lung, config)
    assert x.shape == (1, 2, 16, 40, 60) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    has_lung = lung.reshape(16, -1).any(1)
    assert torch.equal(x[0, 1].flatten(1).amax(1) > 0, torch.from_numpy(has_lung))
    # The default window maps -1350 HU to 0 and 150 HU to 1.
    flat = type(vol)(hu=np.full(vol.shape, 150, np.int16), spacing=vol.spacing, origin=vol.origin)
    assert torch.allclose(prepare_volume(flat, lung, config)[0, 0], torch.ones(16, 40, 60))


def test_lung_crop_keeps_the_lungs_and_the_aspect_ratio_in_mm():
    lung = np.zeros((3, 100, 120), np.uint8)
    lung[1, 30:60, 20:50] = 1
    crop = lung_crop(lung, (0.5, 1.0), (192, 288), margin_mm=0)
    assert crop.y0 <= 30 and crop.y1 >= 60 and crop.x0 <= 20 and crop.x1 >= 50
    height_mm, width_mm = crop.shape[0] * 0.5, crop.shape[1] * 1.0
    assert height_mm / width_mm == pytest.approx(192 / 288, rel=0.05)


# ----------------------------------------------------------------------------- localisation


def test_top5_threshold_and_components_give_the_two_blobs():
    rng = np.random.default_rng(0)
    cam = rng.uniform(0.0, 0.4, (10, 30, 30)).astype(np.float32)
    lung = np.ones(cam.shape, np.uint8)  # 9000 lung voxels: the top 5 % are 450
    cam[2, 3:23, 4:19] = rng.uniform(0.6, 1.0, (20, 15))  # 300 voxels
    cam[2, 10, 10] = 1.0
    cam[7, 20:30, 10:25] = rng.uniform(0.5, 0.55, (10, 15))  # 150 voxels
    boxes, mask = lesion_boxes(cam, lung, (1.0, 1.0), class_name="COVID-19", min_box_area_mm2=20.0)
    assert [(b.slice, b.y0, b.x0, b.y1, b.x1) for b in boxes] == [(2, 3, 4, 23, 19), (7, 20, 10, 30, 25)]
    assert boxes[0].score == pytest.approx(1.0)
    assert boxes[1].score == pytest.approx(float(cam[7, 20:30, 10:25].max()))
    assert [b.area_mm2 for b in boxes] == [300.0, 150.0]
    assert all(b.class_name == "COVID-19" and b.source == BOX_SOURCE for b in boxes)
    assert mask.sum() == 450 and mask[2, 3:23, 4:19].all() and mask[7, 20:30, 10:25].all()


def test_one_box_per_slice_of_a_component_small_sections_dropped():
    cam = np.zeros((6, 20, 20), np.float32)
    lung = np.ones(cam.shape, np.uint8)
    cam[1, 2:12, 2:12] = 1.0  # 100 voxels
    cam[2, 4:14, 4:14] = 0.9  # 100 voxels, touching the slice above: the same component
    cam[3, 5:7, 5:7] = 0.8  # 4 voxels: 8 mm^2 with 2 mm^2 pixels, below 20 mm^2
    boxes, mask = lesion_boxes(
        cam, lung, (1.0, 2.0), class_name="CAP", min_box_area_mm2=20.0, top_fraction=0.1, offset_yx=(5, 7)
    )
    assert [(b.slice, b.y0, b.x0, b.y1, b.x1) for b in boxes] == [(1, 7, 9, 17, 19), (2, 9, 11, 19, 21)]
    assert all(b.score == 1.0 for b in boxes)  # one component, one peak
    assert mask.sum() == 200 and not mask[3].any()
    # Only lung voxels count, and a CAM without positive values gives nothing.
    assert lesion_boxes(-cam, lung, (1, 1), class_name="CAP")[0] == []
    assert lesion_boxes(cam, np.zeros_like(lung), (1, 1), class_name="CAP")[0] == []


def _run(gen):
    progress = []
    result = run_to_end(gen, lambda *p: progress.append(p))
    return result, progress


def test_detect_iter_on_a_phantom(covid_phantom, tiny_net):
    vol, lung = covid_phantom.volume, covid_phantom.lung_mask
    info = {"name": "tiny", "version": "0", "sha256": "abc", "normalisation": "window"}
    timings = {"lung_segmentation": 0.5}
    result, progress = _run(
        detect_iter(
            vol, tiny_net, info, lung_mask=lung, torch_device=CPU, timings=timings, explain_class="COVID-19"
        )
    )
    assert [p[0] for p in progress] == sorted(p[0] for p in progress) and progress[-1][:2] == (
        3,
        4,
    )  # "Done" is the pipeline's
    n_z = vol.shape[0]
    assert result.classes == ("NP", "COVID-19") and result.explained_class == "COVID-19"
    assert result.slice_probs.shape == (n_z, 2) and result.slice_probs.dtype == np.float32
    assert np.isnan(result.slice_probs).all() and "DeCoVNet" in result.patient_rule
    assert result.patient_probs.shape == (2,) and result.patient_probs.dtype == np.float32
    assert result.patient_probs.sum() == pytest.approx(1.0, abs=1e-6)
    cam = result.cams["decovnet"]
    assert list(result.cams) == ["decovnet"] and cam.dtype == np.uint8 and cam.shape == vol.shape
    assert cam.max() == 255 and not cam[lung == 0].any()
    assert result.model_info == {"name": "tiny", "version": "0", "sha256": "abc"}
    assert set(result.timings) >= {"lung_segmentation", "preprocessing", "classification", "cam"}
    assert result.device == "cpu"
    assert result.lung_volume_ml == pytest.approx(np.count_nonzero(lung) * np.prod(vol.spacing) / 1000)

    boxes = result.boxes
    assert boxes, "the random tiny network's COVID-19 CAM is positive somewhere in the lungs"
    for b in boxes:
        assert 0 <= b.slice < n_z and 0 <= b.y0 < b.y1 <= vol.shape[1] and 0 <= b.x0 < b.x1 <= vol.shape[2]
        assert lung[b.slice, b.y0 : b.y1, b.x0 : b.x1].any()
        assert 0 < b.score <= 1 and b.class_name == "COVID-19" and b.source == BOX_SOURCE
        assert b.area_mm2 >= 20.0
    assert max(b.score for b in boxes) == pytest.approx(1.0)
    # The same boxes from the public steps: prepare, CAM, upsample, threshold + components.
    crop = lung_crop(lung, vol.spacing[1:], tiny_net.config.input_size)
    with torch.inference_mode():
        _, low = tiny_net.forward_with_cam(prepare_volume(vol, lung, tiny_net.config, crop=crop))
    rows, cols, _, _ = crop.inside(vol.shape[1:])
    grid = cam_to_grid(np.maximum(low[0, 1].numpy(), 0), n_z, crop, vol.shape[1:])
    expected, mask = lesion_boxes(
        grid, lung[:, rows, cols], vol.spacing[1:], class_name="COVID-19", offset_yx=(rows.start, cols.start)
    )
    assert boxes == expected
    per_slice = result.involvement["per_slice_percent"]
    assert per_slice.shape == (n_z,)
    assert np.isnan(per_slice[~lung.reshape(n_z, -1).any(1)]).all()
    assert all(per_slice[b.slice] > 0 for b in boxes)
    assert result.involvement["total_percent"] == pytest.approx(100 * mask.sum() / np.count_nonzero(lung))
    # The top 5 % of the lung voxels, plus those tied with the threshold, less the small sections.
    assert 0 < result.involvement["total_percent"] < 5.5


def test_single_display_image_runs(covid_phantom, tiny_net):
    from napari_wscovid.io.volume import CTVolume

    # One 8-bit slice (e.g. a PNG): T = 1 and percentile scaling instead of the HU window.
    z = 8
    hu = covid_phantom.volume.hu[z : z + 1].astype(np.float32)
    image = CTVolume(
        hu=np.clip((hu + 1000) / 4, 0, 255), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), is_hu=False
    )
    lung = covid_phantom.lung_mask[z : z + 1]
    result, _ = _run(
        detect_iter(image, tiny_net, {}, lung_mask=lung, torch_device=CPU, explain_class="COVID-19")
    )
    assert result.slice_probs.shape == (1, 2) and result.cams["decovnet"].shape == (1, 96, 96)
    assert result.patient_probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert all(b.slice == 0 for b in result.boxes)


def test_covid_negative_explanation_has_no_boxes(covid_phantom, tiny_net):
    vol, lung = covid_phantom.volume, covid_phantom.lung_mask
    result, _ = _run(detect_iter(vol, tiny_net, {}, lung_mask=lung, torch_device=CPU, explain_class="NP"))
    assert result.explained_class == "NP" and result.boxes == []
    assert result.involvement["total_percent"] == 0.0
    with pytest.raises(ValueError, match="explain_class"):
        _run(detect_iter(vol, tiny_net, {}, lung_mask=lung, torch_device=CPU, explain_class="CAP"))


def test_detect_dispatches_a_saved_decovnet(tmp_path, covid_phantom, tiny_net):
    import napari_wscovid
    from napari_wscovid.models.registry import save_model

    path = tmp_path / "decovnet.safetensors"
    sha = save_model(tiny_net, path, name="tiny-decovnet", version="1")
    result = napari_wscovid.detect(covid_phantom.volume, model=str(path), lung_mask=covid_phantom.lung_mask)
    assert list(result.cams) == ["decovnet"] and result.model_info["sha256"] == sha
    assert np.isnan(result.slice_probs).all() and result.patient_probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert result.explained_class == result.predicted_class
    assert all(isinstance(b, Box) and b.class_name == result.explained_class for b in result.boxes)


# ----------------------------------------------------------------------------- training


def test_augmentation_is_identical_across_slices_and_channels():
    from training.train_decovnet import VolumeAugment, VolumeAugmentConfig

    image = torch.rand(24, 36)
    x = image.expand(1, 2, 5, 24, 36).clone()  # five identical slices, CT = mask
    geometry_only = VolumeAugmentConfig(brightness=(1.0, 1.0), contrast=(1.0, 1.0))
    y = VolumeAugment(geometry_only, seed=3)(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert torch.allclose(y[0, 0], y[0, 0, :1].expand(5, 24, 36))  # every slice moved alike
    assert torch.allclose(y[0, 0], y[0, 1])  # the lung mask moved with the CT
    full = VolumeAugment(seed=3)(x)
    assert torch.equal(full, VolumeAugment(seed=3)(x)) and 0 <= full.min() and full.max() <= 1
    assert torch.allclose(full[0, 1], y[0, 1])  # colour jitter leaves the mask alone


def test_train_step_decreases_the_loss_on_a_fixed_batch(covid_phantom):
    from training.train_decovnet import train_step

    torch.manual_seed(1)
    config = dataclasses.replace(tiny_decovnet_config(), dropout=0.0)
    net = DeCoVNet(config).train()
    x = prepare_volume(covid_phantom.volume, covid_phantom.lung_mask, config)
    y = torch.tensor([1])
    before = float(F.cross_entropy(net(x), y).detach())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    assert train_step(net, optimizer, x, y) == pytest.approx(before, rel=1e-5)
    assert float(F.cross_entropy(net(x), y).detach()) < before


@pytest.fixture()
def fast_phantoms(monkeypatch):
    import napari_wscovid.phantom

    make = napari_wscovid.phantom.make_phantom
    cache = {k: make(k, n_slices=8, size=64, seed=i) for i, k in enumerate(("NP", "CAP", "COVID-19"))}
    # Reuse three phantoms whatever seed is asked for: the run itself is what is tested here.
    monkeypatch.setattr(napari_wscovid.phantom, "make_phantom", lambda kind, **_: cache[kind])


def test_main_trains_resumes_and_exports_a_loadable_model(tmp_path, fast_phantoms):
    from napari_wscovid.models.registry import load_model
    from training.train_decovnet import main

    out = tmp_path / "run"
    args = ["--model", "tiny", "--input-height", "32", "--input-width", "48", "--steps", "2",
            "--val-every", "1", "--phantom-pool", "1", "--val-volumes", "1", "--test-volumes", "1",
            "--num-workers", "0", "--threads", "1", "--log-every", "1", "--out-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    for name in ("config.json", "last.pt", "best.pt", "metrics.json", "decovnet-phantom.safetensors"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 2 and set(ckpt) >= {"model", "optimizer", "config", "model_config"}
    assert len(ckpt["state"]["history"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["phantom"]["n"] == 3 and metrics["input_size"] == [32, 48]

    model, info = load_model(out / "decovnet-phantom.safetensors", device="cpu", cache=False)
    assert isinstance(model, DeCoVNet) and model.config.input_size == (32, 48)
    assert info["sha256"] == metrics["export"]["sha256"] and "phantom" in info["training_data"]

    assert main([*args, "--steps", "3", "--resume", str(out / "last.pt")]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 3


def test_real_patients_are_split_by_patient(monkeypatch):
    import training.train_decovnet as td

    config = tiny_decovnet_config()
    fake = [
        td.VolumeSample(torch.zeros(2, 4, 32, 48, dtype=torch.float16), td.label_of(kind), pid, kind)
        for pid, kind in (("P001", "COVID-19"), ("cap001", "CAP"), ("normal001", "NP"))
    ]
    monkeypatch.setattr(td, "real_samples", lambda root, net_config: fake)
    cfg = td.DeCoVNetTrainConfig(phantom=False, covid_ct_md_root="unused", k_folds=5)
    data = td.build_data(cfg, config)
    parts = [{s.patient_id for s in part} for part in (data.real_train, data.val, data.tests["covid-ct-md"])]
    assert [len(p) for p in parts] == [1, 1, 1] and set.union(*parts) == {s.patient_id for s in fake}
    assert [s.label for s in fake] == [1, 0, 0]
    assert "fold 0 of 3" in data.description[0]


def test_cli_help(capsys):
    from training.train_decovnet import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--max-minutes" in text and "--input-height" in text and "--covid-ct-md-root" in text


@pytest.mark.parametrize("holdout", ["", "normal001"])
def test_no_patient_a_fold_tests_or_validates_lends_its_lungs_to_training(monkeypatch, holdout):
    """As for the slice classifier: the fold's COVID-CT-MD test and validation patients are never
    synthetic training backgrounds, and held-out patients are the test, not a fold's."""
    from types import SimpleNamespace

    import training.real_backgrounds as real_backgrounds
    import training.train_decovnet as td

    fake = [
        td.VolumeSample(torch.zeros(2, 4, 32, 48, dtype=torch.float16), td.label_of(kind), pid, kind)
        for pid, kind in (("P001", "COVID-19"), ("cap001", "CAP"), ("normal001", "NP"))
    ]
    monkeypatch.setattr(td, "real_samples", lambda root, net_config: fake)
    lungs = ["normal001", "LIDC-IDRI-0001", "LIDC-IDRI-0003", "P001", "cap001"]
    monkeypatch.setattr(
        real_backgrounds,
        "load_backgrounds",
        lambda *a, **k: [SimpleNamespace(patient_id=p, real_positive=np.zeros(1, bool)) for p in lungs],
    )
    monkeypatch.setattr(td, "fixed_phantoms", lambda *a, **k: [])
    cfg = td.DeCoVNetTrainConfig(
        phantom=False,
        covid_ct_md_root="unused",
        synth_backgrounds="unused",
        k_folds=5,
        holdout_patients=holdout,
    )
    data = td.build_data(cfg, tiny_decovnet_config())
    trained_lungs = data.description[0].split("real lungs of ")[1].split(" (")[0].split(", ")
    tested = {s.patient_id for s in data.tests["covid-ct-md"]}
    kept_out = tested | {s.patient_id for s in data.val}
    assert tested and kept_out.isdisjoint(trained_lungs) and set(trained_lungs) == set(lungs) - kept_out
    assert data.description[0].endswith("test: " + ", ".join(p for p in lungs if p in tested))
    if holdout:
        assert tested == {holdout} and not data.val
