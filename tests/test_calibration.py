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
            {
                "patient": f"p{i}",
                "truth": "CAP",
                "classes": ["NP", "CAP", "COVID-19"],
                "slices": {"probs": probs.tolist(), "infected": infected.tolist()},
            }  # fmt: skip
        )
    return {"real": patients}


def test_leave_one_patient_out_temperature_softens_overconfident_slices():
    from training.reliability_report import leave_one_patient_out_temperature

    refit = leave_one_patient_out_temperature(_report_of_overconfident_patients())
    assert all(fold["temperature"] > 1.5 for fold in refit["folds"])
    assert refit["ece_before"] > 0.3 and refit["ece_leave_one_patient_out"] < 0.1


def test_patient_np_offset_shifts_the_call_and_nothing_else():
    from napari_wscovid.stages import patient_probabilities

    classes = ("NP", "CAP", "COVID-19")
    # a normal lung whose most abnormal slices still lean to CAP
    probs = np.array([[0.6, 0.3, 0.1]] * 30 + [[0.2, 0.5, 0.3]] * 10)
    plain, rule = patient_probabilities(probs, classes)
    assert classes[int(np.argmax(plain))] == "CAP" and "odds" not in rule
    shifted, rule = patient_probabilities(probs, classes, np_offset=np.log(4.0))
    assert classes[int(np.argmax(shifted))] == "NP" and "odds times 4" in rule
    assert shifted.sum() == pytest.approx(1.0)
    # CAP : COVID-19 stays as it was; only the NP odds move
    assert shifted[1] / shifted[2] == pytest.approx(plain[1] / plain[2], rel=1e-5)


def test_fit_np_offset_separates_synthetic_patients_in_the_middle():
    from training.patient_rule import fit_np_offset

    classes = ("NP", "CAP", "COVID-19")

    def patient(truth, p_np, ill="CAP"):
        row = [p_np, 0.0, 0.0]
        row[classes.index(ill)] = 1 - p_np
        return {"truth": truth, "slice_probs": [row] * 20}

    # NP patients' worst slices at P(NP) 0.2-0.3, ill ones at 0.01-0.02: called ill without an offset
    rows = [patient("NP", 0.2), patient("NP", 0.3), patient("CAP", 0.02), patient("CAP", 0.01)]
    rows += [patient("COVID-19", 0.01, "COVID-19"), patient("COVID-19", 0.02, "COVID-19")]
    fit = fit_np_offset(rows, classes)
    assert fit["balanced_accuracy_without"] == pytest.approx(2 / 3)
    assert fit["balanced_accuracy"] == 1.0
    # NP called from odds 0.25 * e^o > 0.75, ill kept while 0.02 / 0.98 * e^o < 1: o in (1.39, 3.89)
    lo, hi = fit["best_range"]
    assert lo == pytest.approx(1.39, abs=0.02) and hi == pytest.approx(3.89, abs=0.02)
    assert fit["offset"] == pytest.approx((lo + hi) / 2, abs=0.01)
    with pytest.raises(ValueError, match="two of"):
        fit_np_offset([r for r in rows if r["truth"] == "NP"], classes)


def test_detect_applies_the_offset_the_weights_carry_and_refuses_a_bad_one(tmp_path):
    from napari_wscovid import detect
    from napari_wscovid.models.registry import ModelLoadError, load_model
    from napari_wscovid.phantom import make_phantom
    from training.calibrate import copy_with_metadata

    ph = make_phantom("COVID-19", n_slices=8, size=96, seed=0)
    plain_file = _tiny(tmp_path / "plain.safetensors", temperature=3.0)
    calls = {}
    for offset in (-20, 20):
        out = tmp_path / f"offset{offset}.safetensors"
        copy_with_metadata(plain_file, out, {"patient_np_offset": offset})
        _, info = load_model(out, device="cpu", cache=False)
        assert info["patient_np_offset"] == offset and info["temperature"] == 3.0  # the rest kept
        r = detect(ph.volume, model=str(out), saliency="none", lung_mask=ph.lung_mask)
        calls[offset] = r.predicted_class
        assert "fitted on synthetic patients" in r.patient_rule
    assert calls[20] == "NP" and calls[-20] != "NP"
    # the slice offset decides which slices of a patient called ill are explained
    explained = {}
    for offset in (-20, 20):
        out = tmp_path / f"slices{offset}.safetensors"
        copy_with_metadata(plain_file, out, {"slice_np_offset": offset, "patient_np_offset": -20})
        r = detect(ph.volume, model=str(out), saliency="positive", lung_mask=ph.lung_mask, ig_steps=2)
        explained[offset] = len(r.saliency_slices)
    lung_slices = int(np.isfinite(r.slice_probs).all(1).sum())
    assert explained == {-20: lung_slices, 20: 0}
    for key, bad in (("patient_np_offset", "nan"), ("slice_np_offset", 21)):
        with pytest.raises(ModelLoadError, match=f"bad.safetensors: {key[:-10]} NP offset"):
            load_model(_tiny(tmp_path / "bad.safetensors", **{key: bad}), device="cpu", cache=False)


def test_fit_slice_offset_balances_lesion_and_clean_slices():
    from training.patient_rule import fit_slice_offset, np_margins

    classes = ("NP", "CAP", "COVID-19")
    # clean slices at P(NP) 0.2 (margin log 4 = 1.39), lesion slices at 0.01 (margin 4.6)
    row = {
        "truth": "CAP",
        "slice_probs": [[0.2, 0.8, 0.0]] * 30 + [[0.01, 0.99, 0.0]] * 10 + [[0.5, 0.5, 0.0]],
        "slice_lesion": [0] * 30 + [1] * 10 + [-1],  # the last one is too little to say: left out
    }
    margins, lesion = np_margins([row], classes)
    assert len(margins) == 40 and lesion.sum() == 10
    fit = fit_slice_offset([row], classes)
    assert fit["without"]["specificity"] == 0.0 and fit["without"]["sensitivity"] == 1.0
    assert fit["with"]["specificity"] == 1.0 and fit["with"]["sensitivity"] == 1.0
    lo, hi = fit["best_range"]
    assert lo == pytest.approx(1.39, abs=0.02) and hi == pytest.approx(4.59, abs=0.02)


def test_slices_to_explain_follows_the_slice_offset():
    from napari_wscovid.stages import slices_to_explain

    classes = ("NP", "CAP", "COVID-19")
    probs = np.array([[0.2, 0.8, 0.0], [0.01, 0.0, 0.99], [0.9, 0.1, 0.0]])
    lung = np.arange(3)
    assert slices_to_explain("positive", None, probs, classes, lung).tolist() == [0, 1]
    assert slices_to_explain("positive", None, probs, classes, lung, np_offset=2.0).tolist() == [1]
    assert slices_to_explain("all", None, probs, classes, lung, np_offset=2.0).tolist() == [0, 1, 2]


def test_a_patient_called_np_gets_no_positive_slices_unless_asked():
    from napari_wscovid.stages import explain_note, slices_to_explain

    classes = ("NP", "CAP", "COVID-19")
    probs = np.array([[0.2, 0.8, 0.0], [0.01, 0.0, 0.99], [0.9, 0.1, 0.0]])
    lung = np.arange(3)
    assert slices_to_explain("positive", None, probs, classes, lung, patient_class="NP").size == 0
    assert slices_to_explain("positive", None, probs, classes, lung, patient_class="CAP").tolist() == [0, 1]
    # the user's explicit scopes are not gated by the call
    assert slices_to_explain("all", None, probs, classes, lung, patient_class="NP").tolist() == [0, 1, 2]
    assert slices_to_explain("slices", [2], probs, classes, lung, patient_class="NP").tolist() == [2]
    assert "called NP" in explain_note("positive", "NP", 0, 3)
    assert explain_note("positive", "NP", 3, 3) == "" and explain_note("none", "NP", 0, 3) == ""
    assert "every lung slice" in explain_note("positive", "CAP", 0, 3)
    assert "no slice holds enough lung" in explain_note("positive", None, 0, 0)


def test_detect_boxes_nothing_on_a_patient_called_np_but_explains_an_asked_class(tmp_path):
    from napari_wscovid import detect
    from napari_wscovid.phantom import make_phantom
    from training.calibrate import copy_with_metadata

    ph = make_phantom("COVID-19", n_slices=8, size=96, seed=0)
    plain_file = _tiny(tmp_path / "plain.safetensors")
    # every slice positive (slice offset -20), the patient called NP (patient offset +20)
    out = tmp_path / "np.safetensors"
    copy_with_metadata(plain_file, out, {"patient_np_offset": 20, "slice_np_offset": -20})
    r = detect(ph.volume, model=str(out), saliency="positive", lung_mask=ph.lung_mask, ig_steps=2)
    assert r.predicted_class == "NP"
    assert r.saliency_slices == () and r.boxes == [] and "called NP" in r.explain_note
    asked = detect(
        ph.volume,
        model=str(out),
        saliency="positive",
        lung_mask=ph.lung_mask,
        ig_steps=2,
        explain_class="COVID-19",
    )
    lung_slices = int(np.isfinite(asked.slice_probs).all(1).sum())
    assert len(asked.saliency_slices) == lung_slices and asked.explain_note == ""


def test_a_metadata_only_copy_carries_the_feature_reference(tmp_path):
    from napari_wscovid.models.registry import load_model
    from napari_wscovid.reliability import FeatureReference, reference_path
    from training.calibrate import copy_with_metadata

    weights = _tiny(tmp_path / "w.safetensors")
    _, info = load_model(weights, device="cpu", cache=False)
    FeatureReference(np.zeros(4), np.eye(4), 3.0, info["sha256"], "trained on bgA").save(
        reference_path(weights)
    )
    sha = copy_with_metadata(weights, tmp_path / "w2.safetensors", {"patient_np_offset": 1.0}, version="2")
    carried = FeatureReference.load(reference_path(tmp_path / "w2.safetensors"), sha)
    assert carried.threshold == 3.0 and carried.description.startswith("trained on bgA")
    _, info2 = load_model(tmp_path / "w2.safetensors", device="cpu", cache=False)
    assert info2["version"] == "2" and info2["sha256"] == sha != info["sha256"]
    # a reference already beside the target is not replaced without overwrite (nor are the weights)
    reference_path(tmp_path / "w3.safetensors").write_bytes(b"someone's reference")
    with pytest.raises(FileExistsError, match="w3.reference.safetensors exists"):
        copy_with_metadata(weights, tmp_path / "w3.safetensors", {"patient_np_offset": 1.0})
    assert not (tmp_path / "w3.safetensors").exists()
    assert reference_path(tmp_path / "w3.safetensors").read_bytes() == b"someone's reference"
