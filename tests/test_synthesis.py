"""Lesion synthesis into real lungs: backgrounds, painting rules, the training stream.

The backgrounds here are cut from small lesion-free phantoms (fast, exact lung labels); the real
cache is built the same way by ``python -m training.real_backgrounds``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_wscovid.io.volume import CTVolume


@pytest.fixture(scope="module")
def background():
    from napari_wscovid.phantom import make_phantom
    from training.real_backgrounds import make_background

    ph = make_phantom("NP", n_slices=24, size=128, seed=3)
    positive = np.zeros(24, bool)
    positive[20:] = True  # as if the top slices held a real lesion
    return make_background("bgA", "NP", ph.volume, ph.lung_mask, positive, pixel_mm=2.0)


def test_background_crop_orientation_and_flags():
    from training.real_backgrounds import make_background

    hu = np.full((6, 40, 50), -1000, np.int16)
    lung = np.zeros(hu.shape, np.uint8)
    lung[:, 10:30, 5:20] = 1
    lung[:, 10:30, 30:45] = 2
    hu[lung > 0] = -850
    hu[:, 12, 8] = 40  # a marker near the "top" row
    flipped = CTVolume(
        hu=hu, spacing=(2.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.diag([1.0, -1.0, 1.0]), is_hu=True
    )
    positive = np.array([0, 0, 0, 0, 1, 1], bool)
    bg = make_background("x", "NP", flipped, lung, positive, pixel_mm=1.0, margin_mm=2.0)
    # y axis flipped to run along +world y: the marker row moves to the other side of the lung
    rows = np.argwhere(bg.hu[0] == 40)[:, 0]
    assert rows.size == 1 and rows[0] > bg.hu.shape[1] // 2
    assert bg.hu.shape[1:] == (24, 44)  # lung box 20 x 40 plus 2 mm each side
    assert bg.usable.tolist() == [True] * 4 + [False] * 2
    assert set(np.unique(bg.lung)) == {0, 1, 2}


def test_background_roundtrip(tmp_path, background):
    from training.real_backgrounds import Background, load_backgrounds

    background.save(tmp_path / "bgA.npz")
    back = Background.load(tmp_path / "bgA.npz")
    assert back.patient_id == "bgA" and back.spacing == background.spacing
    assert np.array_equal(back.hu, background.hu) and np.array_equal(back.usable, background.usable)
    assert [b.patient_id for b in load_backgrounds(tmp_path)] == ["bgA"]
    with pytest.raises(FileNotFoundError, match="no background"):
        load_backgrounds(tmp_path, exclude={"bgA"})


@pytest.mark.parametrize("kind", ["COVID-19", "CAP"])
def test_synthesis_changes_only_the_marked_lesion_inside_the_lung(background, kind):
    from training.synthesis import synthesize

    case = synthesize(background, kind, seed=5, severity=0.8, nodules=False)
    les = case.lesion_mask
    changed = case.volume.hu != background.hu
    assert les.any() and changed.any()
    assert not (changed & (les == 0)).any(), "HU changed outside the lesion mask"
    assert not ((les > 0) & (case.lung_mask == 0)).any(), "lesion outside the lung"
    # a lesion only adds density
    assert (case.volume.hu.astype(int) >= background.hu.astype(int)).all()
    # slices with a real lesion carry no lung (never drawn) and no synthetic lesion
    assert not case.lung_mask[~background.usable].any() and not les[~background.usable].any()
    again = synthesize(background, kind, seed=5, severity=0.8, nodules=False)
    assert np.array_equal(again.volume.hu, case.volume.hu) and np.array_equal(again.lesion_mask, les)


def test_covid_is_bilateral_mostly_ground_glass(background):
    from training.synthesis import synthesize

    case = synthesize(background, "COVID-19", seed=11, severity=0.9, nodules=False)
    les = case.lesion_mask
    assert set(np.unique(case.lung_mask[les > 0])) - {0} == {1, 2}
    assert np.isin(les, (1, 3)).sum() > (les == 2).sum()


def test_ground_glass_keeps_vessels_and_noise(background):
    from training import synthesis

    ctx = synthesis._Context(background)
    rng = np.random.default_rng(0)
    centre = np.argwhere(ctx.lung == 1).mean(0)
    paint = synthesis._blob(rng, ctx, centre, 25.0, 1, "GGO")
    hu0 = background.hu.astype(np.float32)
    hu1 = hu0.copy()
    les = synthesis._apply(hu1, [paint], ctx.spacing)
    ggo = les == 1
    vessels = ggo & (hu0 > paint.target.max() + 1)
    assert vessels.any() and np.array_equal(hu1[vessels], hu0[vessels])
    parenchyma = ggo & (hu0 < -700) & (paint_weight(paint, les.shape) > 0.99)
    raised = hu1[parenchyma]
    assert synthesis.HU_GGO[0] - 150 < np.median(raised) < synthesis.HU_GGO[1] + 150
    # the background's own grain stays on top of the raise (replacing would decorrelate them)
    assert np.corrcoef(raised, hu0[parenchyma])[0, 1] > 0.3


def paint_weight(paint, shape):
    w = np.zeros(shape, np.float32)
    w[paint.sl] = paint.weight
    return w


def test_cap_is_ground_glass_and_consolidation_mostly_in_one_lung(background):
    from training.synthesis import HU_CONSOLIDATION, synthesize

    case = synthesize(background, "CAP", seed=2, severity=0.7, nodules=False)
    les = case.lesion_mask
    assert (les == 2).any() and (les == 1).any()
    dense = case.volume.hu[les == 2]
    assert HU_CONSOLIDATION[0] - 150 < np.median(dense) < HU_CONSOLIDATION[1] + 100
    per_side = np.bincount(case.lung_mask[np.isin(les, (1, 2))], minlength=3)[1:]
    assert per_side.max() >= 0.8 * per_side.sum()


def test_bronchopneumonia_is_many_small_foci(background):
    from training import synthesis

    ctx = synthesis._Context(background)
    paints = synthesis.bronchopneumonia(np.random.default_rng(3), ctx, severity=0.5)
    foci = [p for p in paints if p.kind in ("GGO", "consolidating")]
    assert len(foci) >= 15
    voxel_ml = np.prod(background.spacing) / 1000
    assert np.median([(p.weight > 0).sum() * voxel_ml for p in foci]) < 5.0  # each under 5 mL


def test_np_case_is_the_background_unchanged(background):
    from training.synthesis import synthesize

    case = synthesize(background, "NP", seed=4, nodules=False, enhance=False)
    assert np.array_equal(case.volume.hu, background.hu) and not case.lesion_mask.any()
    nod = synthesize(background, "NP", seed=4, nodules=True)
    assert set(np.unique(nod.lesion_mask)) <= {0, 4}
    with pytest.raises(ValueError, match="kind"):
        synthesize(background, "flu", seed=0)


def test_solitary_mass_is_a_dense_distractor_not_pneumonia(background):
    from training.datasets import slice_labels_from_masks
    from training.synthesis import _Context, solitary_mass

    rng = np.random.default_rng(1)
    ctx = _Context(background)
    (paint,) = solitary_mass(rng, ctx, side=1)
    assert paint.kind == "mass" and paint.mode == "replace" and set(np.unique(paint.labels)) == {0, 4}
    diameter_mm = (paint.weight > 0.5).any((0, 1)).sum() * ctx.spacing[2]
    assert 10.0 <= diameter_mm <= 55.0
    # a case whose only finding is the mass is NP on every slice
    masses = [s for s in range(40) if "mass" in {r["type"] for r in synthesize_np(background, s).lesions}]
    assert masses, "no NP case with a mass in 40 seeds"
    case = synthesize_np(background, masses[0])
    assert (case.volume.hu[case.lesion_mask == 4] > -200).mean() > 0.5
    _, names = slice_labels_from_masks(case.lung_mask, case.lesion_mask, "NP")
    assert set(names) == {"NP"}


def test_juxtapleural_mass_bulges_from_the_lung_border(background):
    """The tumour of Lung_Dx-A0001 sits against mediastinum and pleura; the juxtapleural mass is
    centred on the lung's border (its dome in the lung, which it meets), the default one inside."""
    from scipy import ndimage

    from training.synthesis import _Context, solitary_mass, synthesize

    ctx = _Context(background)
    inside = ndimage.distance_transform_edt(ctx.lung > 0, sampling=ctx.spacing)

    def border_share(paint) -> float:
        full = np.zeros(ctx.lung.shape, bool)
        full[paint.sl] = paint.weight > 0.5
        return float((inside[full] <= 3.0).mean())  # of its voxels, those within 3 mm of the border

    shares = {True: [], False: []}
    for seed in range(6):
        for juxta in (True, False):
            paints = solitary_mass(np.random.default_rng(seed), ctx, side=2, juxtapleural=juxta)
            shares[juxta] += [border_share(p) for p in paints]
    assert shares[True] and shares[False]
    assert min(shares[True]) > max(shares[False]), shares
    # the option draws from its own stream: off (the default), every case is as it was
    for seed in range(4):
        plain = synthesize(background, "CAP", seed=seed, nodules=True, mass_fraction=1.0)
        off = synthesize(
            background, "CAP", seed=seed, nodules=True, mass_fraction=1.0, pleural_mass_fraction=0.0
        )
        assert np.array_equal(plain.volume.hu, off.volume.hu)
    moved = [
        not np.array_equal(
            synthesize(background, "NP", seed=s, nodules=True, mass_fraction=1.0).lesion_mask,
            synthesize(
                background, "NP", seed=s, nodules=True, mass_fraction=1.0, pleural_mass_fraction=1.0
            ).lesion_mask,
        )
        for s in range(4)
    ]
    assert any(moved)


def synthesize_np(background, seed):
    from training.synthesis import synthesize

    return synthesize(background, "NP", seed=seed, nodules=True)


def test_synth_stream_labels_and_patients(background):
    from training.datasets import SynthInRealSliceDataset

    ds = SynthInRealSliceDataset(
        [background], size=48, pool_per_class=1, refresh_every=0, seed=1, balanced=True
    )
    draws = [d for _, d in zip(range(60), iter(ds), strict=False)]
    labels = np.array([d[1] for d in draws])
    assert draws[0][0].shape == (1, 48, 48)
    assert np.bincount(labels, minlength=3).min() >= 8  # class-balanced draws
    # one patient, the background: its cases are resampled together by the bootstrap
    assert {d[2] for d in draws} == {"synth-bgA"}


def test_trainer_holds_out_background_patients(tmp_path, background):
    from training.real_backgrounds import Background
    from training.train_classifier import TrainConfig, train

    folder = tmp_path / "bg"
    folder.mkdir()
    background.save(folder / "bgA.npz")
    other = Background(**{**background.__dict__, "patient_id": "bgB"})
    other.save(folder / "bgB.npz")
    cfg = TrainConfig(
        model="tiny",
        input_size=48,
        iterations=2,
        batch_size=4,
        val_every=2,
        phantom=False,
        synth_backgrounds=str(folder),
        synth_pool=1,
        synth_val_cases=1,
        synth_test_cases=1,
        holdout_patients="bgB",
        num_workers=0,
        n_boot=10,
        out_dir=str(tmp_path / "run"),
    )
    summary = train(cfg)
    assert set(summary["test"]) == {"synth-heldout"}
    card = (tmp_path / "run" / "model_card.md").read_text()
    assert "real lungs of 1 patients (bgA)" in card and "held-out real lungs (bgB)" in card


def test_gpu_run_smoke_trains_four_networks_and_times_detect(tmp_path):
    """The prepared GPU command, run as --smoke: the same code on CPU with tiny networks."""
    import json

    from napari_wscovid.models.registry import load_model
    from training.gpu_run import main

    assert main(["train", "--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert set(report["steps"]) == {"wsnet", "fecnn", "decovnet", "lung_unet"}
    for name in ("wsnet-3class", "fecnn-covid", "decovnet-covid"):
        net, info = load_model(tmp_path / f"{name}.safetensors", device="cpu", cache=False)
        assert info["name"] == name and report["detect"][name]["device"] == "cpu"
    assert list((tmp_path / "lung_unet").glob("*.safetensors"))


def test_gpu_run_folds_write_one_judge_per_fold(tmp_path):
    """--wsnet-fold: extra WSNet runs in the same call, each to its own folder, detect timed."""
    import json

    from napari_wscovid.models.registry import load_model
    from training.gpu_run import WSNetFold, main

    fold = "name=foldB,minutes=0.1,holdout=smokeB,version=9.9.9-test,distractors=0.9,contrast=0.5"
    assert main(["train", "--smoke", "--out", str(tmp_path), "--steps", "", "--wsnet-fold", fold]) == 0
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert set(report["steps"]) == {"wsnet:foldB"} and report["steps"]["wsnet:foldB"]["init"] is None
    _, info = load_model(tmp_path / "foldB" / "wsnet-3class.safetensors", device="cpu", cache=False)
    assert info["version"] == "9.9.9-test"
    config = json.loads((tmp_path / "foldB" / "wsnet" / "config.json").read_text())
    assert (config["synth_distractors"], config["synth_contrast"], config["synth_masses"]) == (0.9, 0.5, 0.4)
    assert report["steps"]["wsnet:foldB"]["mix"] == {"synth_distractors": 0.9, "synth_contrast": 0.5}
    assert report["detect"]["wsnet-3class"]["device"] == "cpu"
    parsed = WSNetFold.parse("name=a,minutes=2,holdout=P001+normal001,init=wsnet-3class")
    assert parsed.holdout == "P001,normal001" and parsed.init == "wsnet-3class"
    with pytest.raises(ValueError, match="missing"):
        WSNetFold.parse("name=a,minutes=2")
    with pytest.raises(ValueError, match="unknown"):
        WSNetFold.parse("name=a,minutes=2,holdout=P001,lr=3")


def test_gpu_run_refuses_a_missing_start_or_unknown_patient_before_training(tmp_path):
    """A fold whose start is a file of an earlier device run (gone in a fresh checkout), or a
    held-out patient the pack lacks, is refused before any step trains (no device minute lost)."""
    import json

    from training.gpu_run import main

    missing = "name=foldB,minutes=0.1,holdout=smokeB,init=runs/gone/wsnet-3class.safetensors"
    with pytest.raises(ValueError, match="foldB: its start init=runs/gone"):
        main(["train", "--smoke", "--out", str(tmp_path / "a"), "--wsnet-fold", missing])
    assert not (tmp_path / "a" / "wsnet").exists()  # refused before WSNet's step began
    pack = tmp_path / "pack"
    (pack / "backgrounds").mkdir(parents=True)
    (pack / "pack.json").write_text(json.dumps({"patients": ["P001", "cap001"]}))
    typo = "name=foldA,minutes=0.1,holdout=cap01"
    with pytest.raises(ValueError, match=r"\['cap01'\] are not in the pack"):
        main(
            ["train", "--pack", str(pack), "--out", str(tmp_path / "b"), "--steps", "", "--wsnet-fold", typo]
        )
    with pytest.raises(ValueError, match="names must differ"):
        fold = "name=f,minutes=0.1,holdout=smokeB"
        main(["train", "--smoke", "--out", str(tmp_path / "c"), "--wsnet-fold", fold, "--wsnet-fold", fold])


def test_prepared_gpu_lease_script_runs_both_calls_as_smoke(tmp_path):
    """scripts/gpu_lease.sh, the exact flow a lent device runs blind: call 2 starts from call 1's
    fold B, and each call leaves in OUT what the held-out evaluation needs."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_lease.sh"
    for call in ("call1", "call2"):
        out = tmp_path / f"out_{call}"
        out.mkdir()
        env = {**os.environ, "SMOKE": "1", "OUT": str(out), "GPU_WORK": str(tmp_path)}
        done = subprocess.run(
            ["bash", str(script), call], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        folds = ("foldA", "foldB") if call == "call1" else ("foldB",)
        for fold in folds:
            names = {f.name for f in (out / fold).iterdir()}
            assert names == {"wsnet-3class.safetensors", "metrics.json", "config.json"}, (fold, names)
        assert (out / "gpu_run.json").is_file()
    report = json.loads((tmp_path / "out_call2" / "gpu_run.json").read_text())
    assert report["steps"]["wsnet:foldB"]["init"] == f"{tmp_path}/g/foldB/wsnet-3class.safetensors"


@pytest.mark.real_data
def test_real_background_and_synthesis_on_a_real_ct(shared_data, tmp_path):
    """Lung-PET-CT-Dx (64 slices): cached on the 1.5 mm grid, painted into, lesions inside its lungs."""
    from training.real_backgrounds import PATIENTS_BY_ID, build_cache, load_backgrounds
    from training.synthesis import synthesize

    patient = PATIENTS_BY_ID["Lung_Dx-A0001"]
    if not (shared_data / patient.path).is_dir():
        pytest.skip(f"{shared_data / patient.path} is absent")
    (path,) = build_cache(shared_data, tmp_path, [patient])
    assert path.name == "Lung_Dx-A0001.npz"
    (bg,) = load_backgrounds(tmp_path)
    assert bg.usable.all() and abs(bg.spacing[1] - 1.5) < 0.01 and bg.spacing[0] == 5.0
    lung_l = (bg.lung > 0).sum() * np.prod(bg.spacing) / 1e6
    assert 2.0 < lung_l < 8.0, f"lung volume {lung_l:.2f} L"
    case = synthesize(bg, "COVID-19", seed=3, severity=0.6)
    inside = case.lung_mask[case.lesion_mask > 0] > 0
    assert case.lesion_mask.any() and inside.all()


def test_training_path_imports_without_readers_or_scikit_learn():
    """The GPU machine has numpy/scipy/torch/scikit-image/safetensors only: the training and
    detection code it runs must import without pydicom, SimpleITK, nibabel or scikit-learn."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('pydicom', 'SimpleITK', 'nibabel', 'sklearn', 'pandas', 'napari', 'qtpy'):\n"
        "    sys.modules[m] = None\n"
        "from napari_wscovid.phantom import make_phantom\n"
        "from napari_wscovid.pipeline import detect\n"
        "from napari_wscovid._sample_data import FALLBACK_KWARGS  # the GPU run's sample\n"
        "from training import gpu_run, real_backgrounds, synthesis\n"
        "from training import train_decovnet, train_fecnn, train_lung_unet\n"
        "from training.train_classifier import train\n"
        "from training.metrics import roc_auc\n"
        "print(roc_auc([0, 1, 1], [0.1, 0.2, 0.9]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1.0"


def test_contrast_raises_vessels_not_parenchyma_and_keeps_the_lesions(background):
    """IV contrast as the LIDC-IDRI scans have it: vessels up by the boost (partial volume in
    proportion), air and parenchyma untouched, the seed's lesions the same with or without it."""
    from training.synthesis import ENHANCED_VESSEL_P99_HU, synthesize, vessel_p99

    plain = synthesize(background, "COVID-19", seed=7, severity=0.5, nodules=False, enhance=False)
    dyed = synthesize(background, "COVID-19", seed=7, severity=0.5, nodules=False, enhance=True)
    assert np.array_equal(plain.lesion_mask, dyed.lesion_mask)
    lung = (plain.lung_mask > 0) & (plain.lesion_mask == 0)
    before, after = plain.volume.hu[lung].astype(float), dyed.volume.hu[lung].astype(float)
    gain = after - before
    assert np.all(gain >= 0)
    # parenchyma and air: untouched but for the odd noise spike
    assert np.percentile(gain[before < -800], 99.9) <= 1 and gain[before < -800].max() < 30
    vessels = before > 0
    assert vessels.any() and gain[vessels].min() >= 80 - 1  # the smallest boost drawn
    half = (before > -500) & (before < -300)
    assert 0 < np.median(gain[half]) < np.median(gain[vessels])
    # the background's vessels were unenhanced and now read as a contrast scan's
    assert vessel_p99(background.hu, background.lung) < ENHANCED_VESSEL_P99_HU
    assert vessel_p99(dyed.volume.hu, plain.lung_mask) > vessel_p99(plain.volume.hu, plain.lung_mask)


def test_contrast_is_drawn_for_a_share_of_cases_and_never_twice(background):
    from training.synthesis import _unenhanced, synthesize

    assert _unenhanced(background)

    def dyed(bg, seed, share):
        case = synthesize(bg, "NP", seed=seed, nodules=False, enhance_fraction=share)
        return not np.array_equal(case.volume.hu, bg.hu)

    assert 0.15 * 30 <= sum(dyed(background, s, 0.4) for s in range(30)) <= 0.7 * 30
    assert not any(dyed(background, s, 0.0) for s in range(10))  # off is off
    vessels = (background.lung > 0) & (background.hu > -300)
    enhanced = dataclasses.replace(
        background, hu=np.where(vessels, 400, background.hu).astype(np.int16), vessel_p99=None
    )
    assert not _unenhanced(enhanced)
    assert not any(dyed(enhanced, s, 1.0) for s in range(10))


def test_synth_stream_passes_its_mix_to_every_case(background):
    """The trainers' --synth-distractors/--synth-masses/--synth-contrast reach synthesize."""
    from training.datasets import SynthInRealSliceDataset

    always = SynthInRealSliceDataset(
        [background], synthesis={"distractor_fraction": 1.0, "mass_fraction": 1.0, "enhance_fraction": 0.0}
    )
    never = SynthInRealSliceDataset([background], synthesis={"distractor_fraction": 0.0})
    for seed in range(4):
        masses = [r["type"] for r in always._synthesize("NP", seed).lesions]
        assert masses == ["mass"] or masses == [], masses  # a mass, unless no room was found
        assert never._synthesize("NP", seed).lesions == []
    assert any(always._synthesize("NP", s).lesions for s in range(4))


def test_classify_heldout_counts_the_slices_detect_would_explain():
    """scripts/classify_heldout.py stands in for boxes by the slices that would get saliency: the
    same slices detect explains under saliency="positive"."""
    import importlib.util

    from napari_wscovid import detect
    from napari_wscovid.phantom import make_phantom

    script = Path(__file__).resolve().parents[1] / "scripts" / "classify_heldout.py"
    spec = importlib.util.spec_from_file_location("classify_heldout", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    volume = make_phantom("COVID-19", n_slices=12, size=96, seed=5).volume
    row = module.judge(volume, "tiny-test", "cpu")
    full = detect(volume, model="tiny-test", device="cpu", saliency="positive")
    assert row["positive_slices"] == len(full.saliency_slices) > 0
    assert row["called"] == full.predicted_class and 0 < row["lung_slices"] <= 12
    assert abs(sum(row["patient_probs"].values()) - 1.0) < 0.01
