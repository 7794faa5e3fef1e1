"""Temperature scaling: fitted on validation logits, carried in the weights file, applied by detect."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_fit_temperature_recovers_a_known_temperature():
    from scipy.special import softmax

    from training.calibrate import fit_temperature, nll

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, size=(20000, 3))
    p = softmax(logits / 2.5, axis=1)
    labels = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(logits, labels)
    assert abs(t - 2.5) < 0.15
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(logits[:, 0], labels)


def _tiny(path, **meta):
    from napari_wscovid.models.registry import save_model
    from napari_wscovid.models.wsnet import WSNet, tiny_config

    torch.manual_seed(0)
    net = WSNet(tiny_config(input_size=64))
    save_model(net, path, name="tiny-cal", version="0", extra_metadata=meta, overwrite=True)
    return path


def test_registry_reads_and_checks_the_temperature(tmp_path):
    from napari_wscovid.models.registry import ModelLoadError, load_model

    _, info = load_model(_tiny(tmp_path / "a.safetensors", temperature=2.0), device="cpu", cache=False)
    assert info["temperature"] == 2.0
    _, info = load_model(_tiny(tmp_path / "b.safetensors"), device="cpu", cache=False)
    assert info["temperature"] == 1.0
    with pytest.raises(ModelLoadError, match="c.safetensors.*temperature"):
        load_model(_tiny(tmp_path / "c.safetensors", temperature=-1), device="cpu", cache=False)


def test_detect_divides_the_logits_by_the_temperature(tmp_path):
    from napari_wscovid import detect
    from napari_wscovid.phantom import make_phantom

    ph = make_phantom("COVID-19", n_slices=8, size=96, seed=0)
    plain = detect(
        ph.volume, model=str(_tiny(tmp_path / "t1.safetensors")), saliency="none", lung_mask=ph.lung_mask
    )
    hot = detect(
        ph.volume,
        model=str(_tiny(tmp_path / "t4.safetensors", temperature=4.0)),
        saliency="none",
        lung_mask=ph.lung_mask,
    )
    rows = np.isfinite(plain.slice_probs).all(1)
    logp = np.log(plain.slice_probs[rows])
    expected = np.exp(logp / 4.0)
    expected /= expected.sum(1, keepdims=True)
    assert np.allclose(hot.slice_probs[rows], expected, atol=1e-4)
    assert hot.model_info["temperature"] == 4.0


def test_recalibrate_writes_a_copy_with_the_fitted_temperature(tmp_path):
    import dataclasses
    import json

    from napari_wscovid.models.registry import load_model, save_model
    from napari_wscovid.models.wsnet import WSNet, tiny_config
    from napari_wscovid.phantom import make_phantom
    from training.calibrate import recalibrate
    from training.real_backgrounds import make_background
    from training.train_classifier import TrainConfig

    ph = make_phantom("NP", n_slices=12, size=96, seed=8)
    (tmp_path / "bg").mkdir()
    make_background("bgA", "NP", ph.volume, ph.lung_mask, pixel_mm=2.5).save(tmp_path / "bg" / "bgA.npz")
    cfg = TrainConfig(
        model="tiny", input_size=48, phantom=False, synth_backgrounds=str(tmp_path / "bg"), synth_val_cases=1
    )
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(1)
    save_model(
        WSNet(tiny_config(input_size=48)), tmp_path / "w.safetensors", name="w", version="1",
        extra_metadata={"training_data": "bgA"},
    )  # fmt: skip
    t = recalibrate(tmp_path / "w.safetensors", tmp_path / "config.json", tmp_path / "w-cal.safetensors")
    _, info = load_model(tmp_path / "w-cal.safetensors", device="cpu", cache=False)
    assert t > 0 and info["temperature"] == pytest.approx(t)
    assert info["name"] == "w" and info["version"] == "1" and info["training_data"] == "bgA"
    with pytest.raises(FileExistsError, match="w-cal.safetensors exists"):
        recalibrate(tmp_path / "w.safetensors", tmp_path / "config.json", tmp_path / "w-cal.safetensors")



def _report_of_overconfident_patients(n_patients=3, n_slices=200, seed=0) -> dict:
    """CAP patients whose slices (infected: CAP, clean: NP) are called at 0.95 but right 60% of
    the time."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n_patients):
        infected = rng.integers(0, 2, n_slices)  # slice truth: CAP (1) where infected, else NP (0)
        called = np.where(rng.random(n_slices) < 0.6, infected, 1 - infected)
        probs = np.full((n_slices, 3), 0.025)
        probs[np.arange(n_slices), called] = 0.95
        patients.append(
            {"patient": f"p{i}", "truth": "CAP", "classes": ["NP", "CAP", "COVID-19"],
             "slices": {"probs": probs.tolist(), "infected": infected.tolist()}}  # fmt: skip
        )
    return {"real": patients}


def test_leave_one_patient_out_temperature_softens_overconfident_slices():
    from training.reliability_report import leave_one_patient_out_temperature

    refit = leave_one_patient_out_temperature(_report_of_overconfident_patients())
    assert all(fold["temperature"] > 1.5 for fold in refit["folds"])
    assert refit["ece_before"] > 0.3 and refit["ece_leave_one_patient_out"] < 0.1
