"""Tests of the training package: loss, augmentation, splits, metrics, a tiny run with resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.augment import Augment, AugmentConfig
from training.datasets import (
    PhantomSliceDataset,
    SliceImageFolderDataset,
    check_no_leakage,
    covid_ct_md_records,
    patient_kfold,
    slice_labels_from_masks,
    slice_labels_in_array_order,
)
from training.losses import MultiScaleLoss, class_weights, focal_loss
from training.metrics import classification_report, fold_summary

# ----------------------------------------------------------------------------- loss


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 3.0, 0.0]])
    target = torch.tensor([0, 2, 1])
    weight = torch.tensor([1.0, 2.0, 0.5])
    expected = []
    for row, c in zip(logits.tolist(), target.tolist(), strict=True):
        p = np.exp(row) / np.sum(np.exp(row))
        expected.append(weight[c].item() * (1 - p[c]) * -np.log(p[c]))
    got = focal_loss(logits, target, weight, gamma=1.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert focal_loss(logits, target, weight, gamma=1.0).item() == pytest.approx(np.mean(expected), rel=1e-6)


def test_focal_loss_gamma0_is_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    weight = torch.tensor([0.5, 1.0, 3.0])
    ce = F.cross_entropy(logits, target, weight=weight, reduction="none").mean()
    assert focal_loss(logits, target, weight, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_focal_loss_equals_monai_times_k():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    weight = torch.tensor([0.7, 1.6, 1.1])
    oracle = monai_losses.FocalLoss(
        to_onehot_y=True, use_softmax=True, gamma=1.0, alpha=weight.tolist(), reduction="mean"
    )
    # MONAI wants (B, K, spatial...): one pixel per image; its mean also divides by K.
    theirs = oracle(logits[:, :, None], target[:, None, None]) * 3
    ours = focal_loss(logits, target, weight, gamma=1.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_class_weights_inverse_frequency_and_balance():
    counts = [80, 15, 5]
    w = class_weights(counts)
    freq = np.array(counts) / 100
    np.testing.assert_allclose(w.numpy() * freq, 1 / 3, rtol=1e-6)  # each class carries equal weight
    assert float((w.numpy() * freq).sum()) == pytest.approx(1.0)
    assert w[2] > w[1] > w[0]
    assert class_weights([3, 0, 1])[1] == 0
    with pytest.raises(ValueError):
        class_weights([0, 0])


def test_multiscale_loss_phases():
    g = torch.Generator().manual_seed(2)
    scores = {s: torch.randn(4, 3, generator=g) for s in ("conv3", "conv4", "conv5")}
    out = SimpleNamespace(scores=scores, logits=sum(scores.values()))
    y = torch.tensor([0, 1, 2, 1])
    aux = sum(focal_loss(s, y) for s in scores.values())
    loss = MultiScaleLoss(aux_weight=0.5)
    assert loss(out, y, "aux").item() == pytest.approx(aux.item())
    assert loss(out, y, "joint").item() == pytest.approx((focal_loss(out.logits, y) + 0.5 * aux).item())
    with pytest.raises(ValueError):
        loss(out, y, "both")


# ----------------------------------------------------------------------------- augmentation


def test_augment_shapes_determinism_and_range():
    x = torch.rand(6, 1, 48, 48)
    a = Augment(seed=3)(x)
    assert a.shape == (6, 1, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, Augment(seed=3)(x))
    assert not torch.equal(a, Augment(seed=4)(x))
    assert Augment(out_size=32, seed=0)(x).shape == (6, 1, 32, 32)
    assert a.min() >= 0 and a.max() <= 1


def test_augment_identity_and_flip():
    x = torch.rand(2, 1, 16, 16)
    still = AugmentConfig(scale=(1, 1), max_rotation_deg=0, flip_p=0, contrast=(1, 1))
    torch.testing.assert_close(Augment(still)(x), x, atol=1e-5, rtol=0)
    flip = AugmentConfig(scale=(1, 1), max_rotation_deg=0, flip_p=1, contrast=(1, 1))
    torch.testing.assert_close(Augment(flip)(x), x.flip(-1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- data and splits


def test_scanner_augment_keeps_the_mask_and_varies_kernel_noise_and_anatomy():
    from training.augment import SCANNER_AUGMENT, _gaussian_blur

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 48, 48)
    x[:, :, 8:40, 10:38] = 0.3 + 0.1 * torch.rand(8, 1, 32, 28, generator=g)
    x[:, :, 20:24, 20:24] = 0.9  # a vessel
    still = dict(scale=(1, 1), max_rotation_deg=0, flip_p=0, contrast=(1, 1))
    plain = Augment(AugmentConfig(**still), seed=1)(x)
    scanner = Augment(AugmentConfig(**{**SCANNER_AUGMENT.__dict__, **still}), seed=1)
    out = scanner(x)
    assert out.shape == x.shape and torch.equal(out, Augment(scanner.config, seed=1)(x))
    assert not torch.allclose(out, plain, atol=1e-3)
    # nothing is painted on the black surround the lung mask left (up to the warp at the edge)
    assert float(out[:, :, :4].abs().max()) == 0.0 and float(out[:, :, :, :4].abs().max()) == 0.0
    # a blur conserves the mean away from the border and lowers the vessel's peak
    blurred = _gaussian_blur(x[:2], torch.tensor([1.0, 2.0]))
    assert float(blurred[1, 0, 21, 21]) < float(blurred[0, 0, 21, 21]) < 0.9
    torch.testing.assert_close(
        blurred[:, :, 4:44, 4:44].mean(), x[:2, :, 4:44, 4:44].mean(), atol=1e-3, rtol=0
    )


def test_slice_labels_lesion_free_slices_are_np():
    lung = np.zeros((5, 20, 20), np.uint8)
    lung[1:5, 4:16, 4:16] = 1
    lesion = np.zeros_like(lung)
    lesion[2, 5:9, 5:9] = 1  # GGO
    lesion[3, 5:7, 5:7] = 4  # a nodule only: not pneumonia
    idx, names = slice_labels_from_masks(lung, lesion, "COVID-19", min_lesion_fraction=0.01)
    assert idx.tolist() == [1, 2, 3, 4]
    assert names == ["NP", "COVID-19", "NP", "NP"]


def _fake_phantom(kind, seed):
    rng = np.random.default_rng(seed)
    lung = np.zeros((6, 32, 32), np.uint8)
    lung[:, 6:26, 4:14], lung[:, 6:26, 18:28] = 1, 2
    lesion = np.zeros_like(lung)
    if kind != "NP":
        lesion[2:4, 10:14, 6:10] = 1
    hu = rng.normal(-800, 50, lung.shape).astype(np.float32)
    vol = SimpleNamespace(hu=hu, spacing=(5.0, 1.0, 1.0))
    return SimpleNamespace(volume=vol, lung_mask=lung, lesion_mask=lesion, label=kind)


def _fake_prepare(hu, lung, idx, size, spacing_yx, **_):
    return np.full((len(idx), 1, size, size), 0.5, np.float32)


def test_phantom_stream_labels_balance_and_seed():
    kwargs = dict(size=8, pool_per_class=2, phantom_fn=_fake_phantom, prepare_fn=_fake_prepare)
    ds = PhantomSliceDataset(seed=5, balanced=True, **kwargs)
    draws = [d for _, d in zip(range(300), ds, strict=False)]
    labels = np.array([y for _, y, _ in draws])
    assert np.bincount(labels, minlength=3).min() > 60  # all three classes, roughly balanced
    np.testing.assert_array_equal(labels[:50], [y for _, (_, y, _) in zip(range(50), ds, strict=False)])
    for _, y, pid in draws:  # a lesion-free slice is NP whatever its patient
        assert y == 0 or pid.split("-")[1] in ("CAP", "COVID")
    fixed = PhantomSliceDataset(seed=6, **kwargs).fixed_set(1)
    assert len(fixed) == 3 * 6 and len(set(fixed.patient_ids)) == 3
    assert fixed.label_counts().tolist() == [6 + 4 + 4, 2, 2]


def test_patient_kfold_has_no_leakage():
    rng = np.random.default_rng(0)
    patients = [f"p{i:02d}" for i in range(23)]
    classes = ["NP", "CAP", "COVID-19"]
    pid, lab = [], []
    for i, p in enumerate(patients):
        n = int(rng.integers(3, 12))
        pid += [p] * n
        lab += [classes[i % 3]] * n
    folds = patient_kfold(pid, lab, k=5, seed=1)
    tested = []
    pid_arr = np.asarray(pid)
    for f in folds:
        parts = [set(pid_arr[getattr(f, name)]) for name in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(f.train) + len(f.val) + len(f.test) == len(pid)
        tested += sorted(parts[2])
    assert sorted(tested) == patients  # every patient is tested exactly once
    with pytest.raises(ValueError):
        patient_kfold(pid[:10], lab[:10], k=5)
    bad = SimpleNamespace(train=np.array([0]), val=np.array([], int), test=np.array([1]))
    with pytest.raises(ValueError, match="both train and test"):
        check_no_leakage(["a", "a"], bad)


def test_slice_labels_descending_z():
    from napari_wscovid.io.volume import CTVolume

    vol = CTVolume(np.zeros((4, 2, 2), np.int16), (2.0, 1.0, 1.0), (-10.0, 0.0, 0.0))
    # Label j belongs to the j-th slice from the top; array index 3 is the most superior.
    labels = np.array([1, 1, 0, 0, 0, 0])
    assert slice_labels_in_array_order(vol, labels, "descending_z").tolist() == [0, 0, 1, 1]
    assert slice_labels_in_array_order(vol, labels, "array").tolist() == [1, 1, 0, 0]
    flipped = CTVolume(np.zeros((4, 2, 2), np.int16), (2.0, 1.0, 1.0), (-4.0, 0, 0), np.diag([-1.0, 1, 1]))
    assert slice_labels_in_array_order(flipped, labels, "descending_z").tolist() == [1, 1, 0, 0]


def test_volume_folder_dataset_from_csv(tmp_path):
    from napari_wscovid.io.volume import CTVolume
    from training.datasets import VolumeFolderDataset

    np.save(tmp_path / "p1_slices.npy", np.array([0, 1, 1, 0]))
    (tmp_path / "labels.csv").write_text(
        "patient_id,label,path,slice_labels\np1,COVID-19,p1,p1_slices.npy\np2,CAP,p2,\n"
    )
    records = VolumeFolderDataset.read_csv(tmp_path / "labels.csv")
    assert [r.patient_id for r in records] == ["p1", "p2"] and records[1].slice_labels is None

    def load(path):
        return CTVolume(np.full((4, 8, 8), -800, np.int16), (5.0, 1.0, 1.0), (0.0, 0.0, 0.0))

    def lungs(volume):
        mask = np.zeros(volume.shape, np.uint8)
        mask[:3, 2:6, 2:6] = 1  # slice 3 has no lung and is skipped
        return mask

    ds = VolumeFolderDataset(records, size=8, load_fn=load, lung_fn=lungs, prepare_fn=_fake_prepare)
    assert ds.patient_ids == ["p1"] * 3 + ["p2"] * 3
    # p1: per-slice labels (lesion-free -> NP); p2: the patient's class on every lung slice.
    assert ds.labels.tolist() == [0, 2, 2, 1, 1, 1]
    assert ds.patient_classes == ["COVID-19"] * 3 + ["CAP"] * 3
    binary = VolumeFolderDataset(
        records, ("CAP", "COVID-19"), size=8, load_fn=load, lung_fn=lungs, prepare_fn=_fake_prepare
    )
    assert binary.labels.tolist() == [1, 1, 0, 0, 0]


@pytest.mark.real_data
def test_covid_ct_md_records(shared_data):
    root = shared_data / "covid-ct-md"
    records = {r.patient_id: r for r in covid_ct_md_records(root)}
    assert records["P001"].label == "COVID-19" and int(records["P001"].slice_labels.sum()) == 80
    assert records["cap001"].label == "CAP" and int(records["cap001"].slice_labels.sum()) == 86
    assert records["normal001"].label == "NP" and int(records["normal001"].slice_labels.sum()) == 0
    assert all(r.slice_order == "descending_z" for r in records.values())


def test_image_folder_ignores_file_format(tmp_path):
    from PIL import Image

    base = (np.linspace(0, 255, 40 * 30).reshape(30, 40)).astype(np.uint8)
    (tmp_path / "CT_COVID").mkdir()
    (tmp_path / "CT_NonCOVID").mkdir()
    Image.fromarray(base).convert("RGBA").save(tmp_path / "CT_COVID" / "2020.01.01.1-p3-1.png")
    Image.fromarray(base).convert("RGB").save(tmp_path / "CT_NonCOVID" / "0.png")
    Image.fromarray(base).save(tmp_path / "CT_NonCOVID" / "1.jpg", quality=95)
    ds = SliceImageFolderDataset(tmp_path, size=16, preparation="whole")
    assert ds.images.shape == (3, 1, 16, 16)
    x = ds.images.float()
    assert x.min() >= 0 and x.max() <= 1
    # Same picture in three formats and modes -> (nearly) the same input.
    assert float((x[0] - x[1]).abs().max()) < 1e-3 and float((x[0] - x[2]).abs().max()) < 0.05
    assert ds.patient_ids[ds.labels.tolist().index(1)] == "CT_COVID/2020.01.01.1"


# ----------------------------------------------------------------------------- metrics


def _predictions(seed=0, n_patients=12, per=5):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_patients) % 3, per)
    logits = rng.normal(size=(len(y), 3)) + 2.0 * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pid = np.repeat([f"p{i}" for i in range(n_patients)], per)
    return y, prob, pid


def test_metrics_ci_contains_estimate_and_is_deterministic():
    y, prob, pid = _predictions()
    classes = ("NP", "CAP", "COVID-19")
    rep = classification_report(y, prob, classes, patient_ids=pid, n_boot=60, seed=7)
    for row in rep.rows:
        for m in ("acc", "sensitivity", "specificity", "auc"):
            v, lo, hi = rep.get(m, row)
            assert lo <= v <= hi, (row, m, v, lo, hi)
    again = classification_report(y, prob, classes, patient_ids=pid, n_boot=60, seed=7)
    assert rep.to_dict() == again.to_dict()
    other = classification_report(y, prob, classes, patient_ids=pid, n_boot=60, seed=8)
    assert other.lower != rep.lower
    assert rep.n_patients == 12 and rep.resampled == "patient"
    md = rep.to_markdown()
    assert "| COVID-19 |" in md and "AUC" in md
    assert json.loads(rep.to_json())["metrics"]["overall"]["acc"]["value"] == pytest.approx(
        float((prob.argmax(1) == y).mean())
    )


def test_metrics_perfect_and_fold_summary():
    y = np.array([0, 1, 2, 0, 1, 2])
    prob = np.eye(3)[y] * 0.9 + 0.05
    rep = classification_report(y, prob, ("NP", "CAP", "COVID-19"), n_boot=50, seed=0)
    for m in ("acc", "precision", "sensitivity", "specificity", "auc"):
        assert rep.get(m)[0] == pytest.approx(1.0)
    summary = fold_summary([rep, rep])
    assert summary["overall"]["acc"]["mean"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny_phantoms():
    """One real 96 x 96 x 16 phantom per class; generating one costs about a second."""
    from napari_wscovid.phantom import make_phantom

    return {k: make_phantom(k, n_slices=16, size=96, seed=i) for i, k in enumerate(("NP", "CAP", "COVID-19"))}


def test_tiny_training_checkpoint_resume_and_export(tmp_path, monkeypatch, tiny_phantoms):
    import napari_wscovid.phantom
    from training import _export
    from training.train_classifier import TrainConfig, train

    # Reuse the three phantoms whatever seed is asked for: the run itself is what is tested here.
    monkeypatch.setattr(napari_wscovid.phantom, "make_phantom", lambda kind, **_: tiny_phantoms[kind])

    cfg = TrainConfig(
        model="tiny",
        input_size=64,
        iterations=3,
        batch_size=4,
        val_every=2,
        phantom_size=96,
        phantom_slices=16,
        phantom_pool=1,
        val_volumes=1,
        test_volumes=1,
        num_workers=0,
        n_boot=20,
        log_every=1,
        out_dir=str(tmp_path / "run"),
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 3
    for name in ("config.json", "last.pt", "best.pt", "metrics.json", "model_card.md"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 3 and set(ckpt) >= {"model", "optimizer", "config"}
    assert json.loads((run / "config.json").read_text())["iterations"] == 3

    resumed = TrainConfig(**{**cfg.to_dict(), "iterations": 5, "resume": str(run / "last.pt")})
    assert train(resumed)["steps"] == 5
    assert torch.load(run / "last.pt", weights_only=True)["state"]["step"] == 5

    exported = summary["export"]["path"]
    assert summary["export"]["sha256"] == _export.sha256_file(exported)
    model = _export.load_model(exported)
    assert model.classes == ("NP", "CAP", "COVID-19")
    out = model(torch.rand(2, 1, 64, 64))
    assert out.logits.shape == (2, 3)
    assert "sha256" in (run / "model_card.md").read_text()

    from training.export_checkpoint import export_checkpoint

    again = tmp_path / "again.safetensors"
    sha = export_checkpoint(run / "best.pt", again, name="t", version="0")
    assert sha == _export.sha256_file(again) and _export.load_model(again).classes == model.classes


def test_cross_validation_two_folds(tmp_path, monkeypatch, tiny_phantoms):
    import napari_wscovid.phantom
    from training.cross_validate import cross_validate
    from training.train_classifier import TrainConfig

    monkeypatch.setattr(napari_wscovid.phantom, "make_phantom", lambda kind, **_: tiny_phantoms[kind])
    cfg = TrainConfig(
        model="tiny",
        input_size=32,
        iterations=1,
        batch_size=2,
        phantom_pool=1,
        val_volumes=1,
        test_volumes=1,
        num_workers=0,
        n_boot=10,
        out_dir=str(tmp_path / "cv"),
    )
    result = cross_validate(cfg, k=2)
    pooled = result["sources"]["phantom"]["pooled"]
    assert pooled["n_samples"] == 2 * len(
        np.load(tmp_path / "cv/fold0/test_predictions_phantom.npz")["labels"]
    )
    assert len(result["sources"]["phantom"]["fold_mean"]["overall"]["acc"]["folds"]) == 2
    assert (tmp_path / "cv" / "cv_table.md").read_text().count("| overall |") == 2


def test_cross_validation_pools_each_patient_once(tmp_path):
    """Three patients in five folds: folds 3 and 4 repeat the splits of folds 0 and 1, with other
    models. The pooled table counted those patients twice; now each is kept from its first fold."""
    from training.cross_validate import cross_validate, pooled_predictions
    from training.train_classifier import TrainConfig

    tested = ["normal001", "cap001", "P001", "normal001", "cap001"]
    for fold, patient in enumerate(tested):
        (tmp_path / f"fold{fold}").mkdir()
        np.savez(
            tmp_path / f"fold{fold}" / "test_predictions_covid-ct-md.npz",
            labels=np.full(4, fold),
            probs=np.full((4, 3), fold / 10),
            patient_ids=np.array([patient] * 4),
        )
    labels, probs, ids = pooled_predictions([tmp_path / f"fold{f}" for f in range(5)], "covid-ct-md")
    assert ids.tolist() == ["normal001"] * 4 + ["cap001"] * 4 + ["P001"] * 4
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and probs.shape == (12, 3)
    with pytest.raises(ValueError, match="every fold would test the same held-out patients"):
        cross_validate(TrainConfig(holdout_patients="cap001", out_dir=str(tmp_path / "cv")), k=2)


def test_cli_help(capsys):
    from training.train_classifier import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--max-minutes" in text and "--task" in text


def test_lung_unet_trainer_writes_loadable_weights(tmp_path):
    """A few steps on tiny phantoms: the weights load through the plugin's verified loader."""
    import hashlib
    import json

    from napari_wscovid.lung.unet import load_lung_unet
    from training.train_lung_unet import LungUNetConfig, train

    cfg = LungUNetConfig(
        channels="4,8,16",
        canvas=64,
        train_phantoms=2,
        val_phantoms=1,
        phantom_size=48,
        min_height_mm=90.0,
        max_height_mm=100.0,
        steps=3,
        batch_size=2,
        val_every=3,
        out_dir=str(tmp_path),
        threads=1,
        device="cpu",
        dense_lesion_weight=5.0,
        dense_lesion_fraction=0.5,
    )
    summary = train(cfg)
    assert 0.0 <= summary["history"][-1]["val_dense_lesion_recall"] <= 1.0
    weights = tmp_path / "lung-unet.safetensors"
    assert summary["steps"] == 3 and 0.0 <= summary["best"]["dice"] <= 1.0
    model = load_lung_unet(weights, sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    x = torch.rand(1, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert model(x).shape == (1, 1, 64, 64)
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][-1]["step"] == 3


def test_lung_unet_dense_lesion_targets_stay_aligned():
    """The dense-lesion mask lies inside the lung target, picks the right slices, and moves with
    the image under augmentation."""
    from training.train_lung_unet import (
        LungUNetConfig,
        all_slices,
        augment_batch,
        cut,
        dense_lesion_slices,
        phantom_grid,
    )

    cfg = LungUNetConfig(phantom_size=64, min_height_mm=120.0, max_height_mm=130.0)
    grids = [phantom_grid(1, 10000, cfg)]  # index 1: a CAP phantom
    work, lung, dense = grids[0]
    assert work.shape == lung.shape == dense.shape
    assert dense.sum() > 0 and np.all(lung[dense > 0] == 1)
    items = all_slices(grids)
    chosen = dense_lesion_slices(grids, items, min_pixels=1)
    assert 0 < len(chosen) < len(items)
    assert all(np.take(dense, i, axis=a).sum() >= 1 for _, a, i in chosen)
    cuts = [cut(grids, item, 96, np.random.default_rng(0)) for item in chosen[:8]]
    x = torch.from_numpy(np.stack([c[0] for c in cuts]))[:, None]
    y = torch.from_numpy(np.stack([np.stack(c[1:]) for c in cuts]))
    _, y_aug = augment_batch(x, y, torch.Generator().manual_seed(0))
    lung_aug, dense_aug = y_aug[:, 0] > 0, y_aug[:, 1] > 0
    assert dense_aug.any()
    # Both masks go through the same warp: dense lesion pixels stay (almost all) inside the lung.
    assert (dense_aug & ~lung_aug).sum() <= 0.05 * dense_aug.sum()


def test_roc_auc_without_scikit_learn_is_the_same_number(monkeypatch):
    """The GPU machine has no scikit-learn: the rank (Mann-Whitney) form must agree with it."""
    import builtins

    from training.metrics import roc_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.normal(y * 0.8, 1.0), 1)  # ties included
    with_sklearn = roc_auc(y, score)
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    assert roc_auc(y, score) == pytest.approx(with_sklearn, abs=1e-12)
    assert np.isnan(roc_auc(np.ones(4), np.arange(4)))
