"""Tests of the evaluation script: lesion matching, held-out splits equal to training's, a --quick run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training.evaluate import main
from training.evaluation import detect_cases
from training.evaluation.detect_cases import run_case, score_boxes, slices_to_explain
from training.evaluation.heldout import (
    EXTRA_PHANTOM_SEED_BASE,
    Case,
    build_heldout,
    extra_phantoms,
    heldout_phantoms,
)
from training.evaluation.settings import Settings
from training.evaluation.summary import summarise
from training.localisation import MatchCounts, component_rects, match_slice, ratio_with_ci, rect_iou

CLASSES = ("NP", "CAP", "COVID-19")

# ----------------------------------------------------------------------------- lesion matching


def test_components_are_eight_connected_and_filtered_by_area_in_mm2():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 2:5] = 1  # 9 px
    mask[5:8, 5:8] = 2  # touches the first only diagonally: one 8-connected component
    mask[12:14, 12:14] = 3  # 4 px: 16 mm^2 at 2 x 2 mm
    mask[15:18, 1:4] = 4  # a nodule: not pneumonia
    assert component_rects(mask, (1, 2, 3)) == [(2, 2, 8, 8), (12, 12, 14, 14)]
    assert component_rects(mask, (1, 2, 3), spacing_yx=(2.0, 2.0), min_area_mm2=20.0) == [(2, 2, 8, 8)]
    assert component_rects(mask, (4,)) == [(15, 1, 18, 4)]


def test_match_slice_counts_recall_and_precision_at_iou_threshold():
    lesion, other = (0, 0, 10, 10), (30, 30, 40, 40)
    exactly = (0, 0, 10, 1)  # inside the lesion box, 10 of 100 px: IoU 0.1 counts
    below = (0, 0, 9, 1)  # IoU 0.09
    nodule = (50, 50, 54, 54)
    on_nodule = (50, 50, 54, 55)
    assert rect_iou(exactly, lesion) == pytest.approx(0.1)
    assert rect_iou(below, lesion) == pytest.approx(0.09)
    got = match_slice([exactly, below, on_nodule], [lesion, other], [nodule], iou_threshold=0.1)
    assert got == MatchCounts(
        lesions=2, lesions_found=1, boxes=3, boxes_on_lesion=1, boxes_on_distractor=1, slices=1
    )
    # Two boxes on one lesion both count as precise; the lesion counts once.
    twice = match_slice([lesion, exactly], [lesion, other])
    assert (twice.lesions_found, twice.boxes_on_lesion) == (1, 2)
    assert match_slice([], [lesion]) == MatchCounts(lesions=1, slices=1)


def _box(z, y0, x0, y1, x1, source="joint"):
    return SimpleNamespace(slice=z, y0=y0, x0=x0, y1=y1, x1=x1, source=source)


def test_score_boxes_on_a_synthetic_volume():
    lesion = np.zeros((4, 40, 40), np.uint8)
    lesion[1, 5:15, 5:15] = 1  # lesion A
    lesion[1, 25:35, 25:35] = 2  # lesion B
    lesion[1, 0:2, 38:40] = 1  # 4 mm^2: below the 20 mm^2 minimum, not a lesion
    lesion[2, 10:20, 10:20] = 3  # lesion C
    lesion[2, 30:33, 30:33] = 4  # nodule
    lesion[3, 5:15, 5:15] = 1  # lesion D, on a slice not explained
    case = Case(
        "phantom", "p", "p", "COVID-19", lambda: None, np.arange(4), ["NP"] * 4, lesion, (1, 2, 3), (4,)
    )
    boxes = {
        "joint": {1: [_box(1, 5, 5, 15, 15)], 2: [_box(2, 30, 30, 33, 33)]},  # hits A; a box on the nodule
        "conv5": {1: [_box(1, 0, 0, 40, 40)], 2: [_box(2, 10, 10, 20, 20), _box(2, 0, 0, 3, 3)]},
    }
    settings = Settings(models=[], out=Path("."), min_lesion_area_mm2=20.0, iou_threshold=0.1)
    counts, missed = score_boxes(case, boxes, [1, 2], (1.0, 1.0), settings)
    assert missed == [3]  # lesion D's slice
    joint = counts["joint"]
    assert (joint.lesions, joint.lesions_found, joint.boxes, joint.boxes_on_lesion) == (3, 1, 2, 1)
    assert joint.boxes_on_distractor == 1 and joint.slices == 2
    # The whole-slice box has IoU 100/1600 < 0.1 with each lesion: it matches none.
    conv5 = counts["conv5"]
    assert (conv5.lesions_found, conv5.boxes, conv5.boxes_on_lesion) == (1, 3, 1)


def test_ratio_with_ci():
    perfect = ratio_with_ci([3, 2], [3, 2], n_boot=200)
    assert (perfect["value"], perfect["lower"], perfect["upper"]) == (1.0, 1.0, 1.0)
    got = ratio_with_ci([1, 0, 3], [2, 1, 4], n_boot=300, seed=1)
    assert got["value"] == pytest.approx(4 / 7) and (got["numerator"], got["denominator"]) == (4, 7)
    assert got["lower"] <= got["value"] <= got["upper"] and got["lower"] < got["upper"]
    assert ratio_with_ci([1, 0, 3], [2, 1, 4], n_boot=300, seed=1) == got
    assert np.isnan(ratio_with_ci([0, 0], [0, 0])["value"])


def test_slices_to_explain_follow_the_plugin_rule_and_the_cap():
    probs = np.full((10, 3), np.nan)
    probs[1:9] = [0.1, 0.1, 0.8]
    probs[4] = [0.9, 0.05, 0.05]  # predicted NP: not explained
    chosen, positive = slices_to_explain(probs, CLASSES, limit=3)
    assert positive == 7 and chosen.tolist() == [2, 5, 7]  # centres of three equal runs
    assert slices_to_explain(probs, CLASSES, limit=None)[0].tolist() == [1, 2, 3, 5, 6, 7, 8]


def test_slices_to_explain_follow_the_slice_offset_and_the_patient_call():
    from training.evaluation.detect_cases import _why_not_explained

    probs = np.full((6, 3), np.nan)
    probs[1:6] = [0.3, 0.7, 0.0]  # positive without an offset, NP with odds x e^2
    probs[5] = [0.01, 0.0, 0.99]  # positive either way
    assert slices_to_explain(probs, CLASSES, limit=None)[0].tolist() == [1, 2, 3, 4, 5]
    assert slices_to_explain(probs, CLASSES, limit=None, np_offset=2.0)[0].tolist() == [5]
    chosen, positive = slices_to_explain(probs, CLASSES, limit=None, patient_class="NP")
    assert chosen.size == 0 and positive == 0
    assert _why_not_explained([0, 1, 5], probs, CLASSES, np_offset=2.0) == {
        "not classified (no lung found)": 1,
        "patient called NP": 0,
        "predicted NP": 1,
        "beyond the per-volume cap": 1,
    }
    assert _why_not_explained([1, 5], probs, CLASSES, patient_class="NP")["patient called NP"] == 2


def test_a_patient_level_method_gets_na_slice_metrics_and_its_own_boxes_scored(monkeypatch):
    from napari_wscovid.results import Box, DetectionResult

    lesion = np.zeros((3, 40, 40), np.uint8)
    lesion[1, 5:15, 5:15] = 1
    volume = SimpleNamespace(shape=(3, 40, 40), spacing=(5.0, 1.0, 1.0))
    case = Case(
        "phantom", "p", "p", "COVID-19", lambda: volume, np.arange(3), ["NP", "COVID-19", "NP"], lesion
    )
    boxes = [Box(1, 5, 5, 15, 15, "COVID-19", 0.8, source="decovnet-cam")]
    boxes.append(Box(2, 0, 0, 5, 5, "COVID-19", 0.8, source="decovnet-cam"))

    def fake_detect(volume, **_):  # what a DeCoVNet-like method returns: no slice probabilities
        return DetectionResult(
            classes=CLASSES,
            slice_probs=np.full((3, 3), np.nan, np.float32),
            patient_probs=np.array([0.1, 0.1, 0.8], np.float32),
            lung_mask=np.ones((3, 40, 40), np.uint8),
            boxes=boxes,
            model_info={"architecture": "decovnet-zheng2020"},
        )

    monkeypatch.setattr("napari_wscovid.pipeline.detect", fake_detect)
    monkeypatch.setattr(detect_cases, "model_info", lambda *_: {"architecture": "decovnet-zheng2020"})
    settings = Settings(models=["x"], out=Path("."), n_boot=20)
    summary = summarise([run_case(case, volume, "x", settings)], settings, volumetric=True)
    assert summary["slice"] is None and summary["covid_vs_rest_slice_auc"] is None
    assert summary["slice_unclassified"] == 0 and summary["patient"]["n_samples"] == 1
    loc = summary["localisation"]["methods"]
    assert list(loc) == ["decovnet-cam"]
    assert loc["decovnet-cam"]["lesion_recall"]["value"] == 1.0
    assert loc["decovnet-cam"]["box_precision"]["value"] == 0.5
    assert summary["timing"]["includes_saliency"]


def test_a_slice_method_is_scored_on_the_slices_it_explained(monkeypatch):
    from napari_wscovid.results import Box, DetectionResult

    lesion = np.zeros((3, 40, 40), np.uint8)
    lesion[1, 5:15, 5:15] = 1
    lesion[0, 20:30, 20:30] = 2  # on a slice predicted NP: not explained, not a miss
    volume = SimpleNamespace(shape=(3, 40, 40), spacing=(5.0, 1.0, 1.0))
    case = Case(
        "phantom", "p", "p", "COVID-19", lambda: volume, np.arange(3), ["COVID-19", "COVID-19", "NP"], lesion
    )
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]], np.float32)
    explained = (1, 2)
    boxes = [Box(1, 6, 6, 15, 15, "COVID-19", 0.8, source="gradcam++"), Box(2, 0, 0, 9, 9, "COVID-19", 0.8)]

    def fake_detect(volume, **_):  # a FeCNN-like method: slice probabilities, its own boxes
        return DetectionResult(
            classes=CLASSES,
            slice_probs=probs,
            patient_probs=probs[1],
            lung_mask=np.ones((3, 40, 40), np.uint8),
            boxes=boxes,
            model_info={"architecture": "fecnn-wu2021"},
            saliency_slices=explained,
        )

    monkeypatch.setattr("napari_wscovid.pipeline.detect", fake_detect)
    monkeypatch.setattr(detect_cases, "model_info", lambda *_: {"architecture": "fecnn-wu2021"})
    settings = Settings(models=["x"], out=Path("."), n_boot=20)
    outcome = run_case(case, volume, "x", settings)
    assert outcome.unexplained["predicted NP"] == 1
    assert outcome.counts["gradcam++"] == MatchCounts(1, 1, 1, 1, 0, 2)
    assert outcome.counts["joint"] == MatchCounts(1, 0, 1, 0, 0, 2)
    summary = summarise([outcome], settings, volumetric=True)
    assert summary["slice"]["n_samples"] == 3 and summary["covid_vs_rest_slice_auc"]["value"] == 0.25


# ----------------------------------------------------------------------------- held-out splits


def _tiny_run(**overrides):
    from training.train_classifier import TrainConfig

    base = dict(
        model="tiny",
        input_size=16,
        phantom_size=48,
        phantom_slices=8,
        phantom_pool=1,
        phantom_refresh=4,
        val_volumes=1,
        test_volumes=1,
        k_folds=3,
        fold=1,
        seed=3,
    )
    return TrainConfig(**{**base, **overrides})


def _seed(patient_id: str) -> int:
    return int(patient_id.rsplit("-", 1)[1])


def _fake_phantom(kind, seed):
    lung = np.zeros((6, 32, 32), np.uint8)
    lung[:, 6:26, 4:14], lung[:, 6:26, 18:28] = 1, 2
    lesion = np.zeros_like(lung)
    lesion[2:4, 10:14, 6:10] = 0 if kind == "NP" else 1
    volume = SimpleNamespace(hu=np.full(lung.shape, -800.0, np.float32), spacing=(5.0, 1.0, 1.0))
    return SimpleNamespace(volume=volume, lung_mask=lung, lesion_mask=lesion, label=kind)


def test_heldout_phantoms_are_the_training_test_set_and_never_trained_on():
    from training.train_classifier import DistInfo, build_data

    cfg = _tiny_run()
    data = build_data(cfg, CLASSES, DistInfo())
    trained = data.tests["phantom"]
    cases = heldout_phantoms(cfg, CLASSES)
    assert [c.name for c in cases] == list(dict.fromkeys(trained.patient_ids))
    assert sorted(c.patient_class for c in cases) == sorted(CLASSES)
    for case in cases:
        rows = [i for i, p in enumerate(trained.patient_ids) if p == case.name]
        assert case.slice_class == [CLASSES[int(trained.labels[i])] for i in rows]
        assert case.lesion_mask.shape == case.load().shape == (8, 48, 48)
        assert case.meta["seed"] == _seed(case.name)
    test_seeds = {c.meta["seed"] for c in cases}

    # The training stream (build_data's own, with its pool refreshed every 4 draws) and the
    # validation set: record every phantom seed they use, without generating the phantoms.
    stream = data.streams[0]
    used = []
    stream.phantom_fn = lambda kind, seed: used.append(int(seed)) or _fake_phantom(kind, seed)
    stream.prepare_fn = lambda hu, lung, idx, size, spacing, **_: np.zeros(
        (len(idx), 1, size, size), np.float32
    )
    for _ in zip(range(400), stream, strict=False):
        pass
    assert len(set(used)) > 100
    val_seeds = {_seed(p) for p in data.val.patient_ids}
    assert not test_seeds & set(used) and not test_seeds & val_seeds
    extra = {c.meta["seed"] for c in extra_phantoms(cfg, CLASSES, 2, phantom_fn=_fake_phantom)}
    assert min(extra) >= EXTRA_PHANTOM_SEED_BASE
    assert not extra & (set(used) | val_seeds | test_seeds)


def _chest_picture(rng, lesion: bool, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D 'CT picture': bright body, two dark lungs, and a grey blob in one of them."""
    yy, xx = np.mgrid[:size, :size]
    img = np.where(((yy - 48) / 40) ** 2 + ((xx - 48) / 44) ** 2 < 1, 170, 10).astype(float)
    for cx in (28, 68):
        img[((yy - 48) / 28) ** 2 + ((xx - cx) / 14) ** 2 < 1] = 35
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        blob = ((yy - 50) / 7) ** 2 + ((xx - 26) / 6) ** 2 < 1
        img[blob], mask[blob] = 120, 1
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _image_folders(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    ucsd, medseg = root / "ucsd", root / "medseg"
    names = {
        "CT_COVID": [
            "2020.01.01.1-p1-1.png",
            "2020.01.01.1-p1-2.png",
            "2020.02.02.2-p3-1%0.png",
            "a.png",
            "b.png",
        ],
        "CT_NonCOVID": ["1.png", "2.png", "3.jpg", "4%1.png", "5.png", "6.png"],
    }
    for folder, files in names.items():
        (ucsd / folder).mkdir(parents=True)
        for name in files:
            Image.fromarray(_chest_picture(rng, folder == "CT_COVID")[0]).save(ucsd / folder / name)
    for sub in ("images", "infection_multiclass", "infection_binary"):
        (medseg / sub).mkdir(parents=True)
    for i in range(6):
        img, mask = _chest_picture(rng, True)
        Image.fromarray(img).save(medseg / "images" / f"{i}.jpg", quality=95)
        Image.fromarray(mask).save(medseg / "infection_multiclass" / f"{i}.png")
        Image.fromarray(mask * 255).save(medseg / "infection_binary" / f"{i}.png")
    return ucsd, medseg


def _covid_ct_md_folder(root: Path) -> Path:
    from napari_wscovid.io import write_dicom_series
    from napari_wscovid.phantom import make_phantom

    patients = [("COVID-19", "COVID-19 subjects", "P001"), ("CAP", "Cap subjects", "cap001")]
    patients.append(("NP", "Normal subjects", "normal001"))
    labels = np.zeros((2, 20), np.int64)
    for i, (kind, folder, pid) in enumerate(patients):
        phantom = make_phantom(kind, n_slices=12, size=64, seed=i)
        write_dicom_series(phantom.volume, root / "sample_data" / folder / pid)
        if i < 2:  # descending z: the superior slice first
            labels[i, :12] = (phantom.lesion_mask > 0).reshape(12, -1).any(1)[::-1]
    np.save(root / "Slice-level-labels-updated-1.npy", labels)
    with open(root / "Index.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Folder/ID", "Label Index"])
        writer.writerows([["P001", 1], ["cap001", 2]])
    return root


def test_real_data_held_out_sets_equal_build_data_tests(tmp_path):
    from training.train_classifier import DistInfo, build_data

    ucsd, medseg = _image_folders(tmp_path)
    ct_md = _covid_ct_md_folder(tmp_path / "ctmd")
    cfg = _tiny_run(phantom=False, image_root=str(ucsd), medseg_root=str(medseg), covid_ct_md_root=str(ct_md))
    data = build_data(cfg, CLASSES, DistInfo())
    settings = Settings(models=[], out=tmp_path, sources=("covid-ct-md", "ucsd", "medseg", "medseg-seen"))
    held = build_heldout(cfg, CLASSES, settings)
    assert not held.skipped

    def rows(cases):
        return [(c.patient_id, cls) for c in cases for cls in c.slice_class]

    def expected(name):
        test = data.tests[name]
        return [(p, CLASSES[int(y)]) for p, y in zip(test.patient_ids, test.labels, strict=True)]

    assert sorted(rows(held.cases["ucsd"])) == sorted(expected("images"))
    assert sorted(rows(held.cases["medseg"])) == sorted(expected("medseg"))
    assert rows(held.cases["covid-ct-md"]) == expected("covid-ct-md")
    ct_case = held.cases["covid-ct-md"][0]
    assert len(ct_case.slice_index) == len(ct_case.slice_class) and ct_case.load().shape == (12, 64, 64)
    # The MedSeg images not tested are the ones the run trained or validated on.
    seen = {c.patient_id for c in held.cases["medseg-seen"]}
    assert seen.isdisjoint(c.patient_id for c in held.cases["medseg"]) and len(seen) == 6 - len(
        held.cases["medseg"]
    )
    assert held.cases["medseg"][0].lesion_mask.shape == (1, 96, 96)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def covid_everywhere_model(tmp_path) -> str:
    """A tiny WSNet whose heads favour COVID-19, so every slice is explained and gets boxes."""
    import torch

    from napari_wscovid.models.registry import save_model
    from napari_wscovid.models.wsnet import WSNet, tiny_config

    torch.manual_seed(1)
    net = WSNet(tiny_config()).eval()
    with torch.no_grad():
        for head in net.heads.values():
            head.bias[:] = torch.tensor([-3.0, -3.0, 3.0])
    path = tmp_path / "covid-everywhere.safetensors"
    save_model(net, path, name="covid-everywhere", version="0")
    return str(path)


def test_quick_run_writes_both_files_and_refuses_to_overwrite(tmp_path, covid_everywhere_model):
    _, medseg = _image_folders(tmp_path)
    out = tmp_path / "eval"
    argv = ["--models", "tiny-test", covid_everywhere_model, "--quick", "--out", str(out), "--threads", "1"]
    argv += ["--sources", "phantom", "phantom-extra", "medseg", "--medseg-root", str(medseg)]
    assert main(argv) == 0
    report = json.loads((out / "evaluation.json").read_text())
    md = (out / "evaluation.md").read_text()
    assert set(report["models"]) == {"tiny-test", covid_everywhere_model}
    assert report["data"]["phantom"]["cases"] == 3 and report["data"]["medseg"]["cases"] >= 1
    for model, result in report["models"].items():
        phantom = result["sources"]["phantom"]
        assert not phantom["failed"], phantom["failed"]
        assert phantom["slice"]["classes"] == list(CLASSES) and phantom["patient"]["n_samples"] == 3
        assert set(phantom["localisation"]["methods"]) >= {"conv3", "conv4", "conv5", "joint"}
        assert result["sources"]["medseg"]["patient"] is None  # 2-D pictures: no patient level
        assert f"`{model}`" in md
    covid = report["models"][covid_everywhere_model]["sources"]
    joint = covid["phantom"]["localisation"]["methods"]["joint"]
    # Every lesion slice is predicted COVID-19, so each volume explains its cap of 2 slices.
    assert joint["counts"]["slices"] == 2 * 3 and joint["counts"]["lesions"] > 0
    assert 0 <= joint["lesion_recall"]["value"] <= 1
    assert (
        covid["medseg"]["localisation"]["methods"]["joint"]["counts"]["slices"]
        == report["data"]["medseg"]["cases"]
    )
    for heading in ("## Held-out data", "## Targets", "## Classification", "## Localisation", "## Speed"):
        assert heading in md

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(argv) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("holdout", ["", "cap001", "P001,normal001"])
def test_no_patient_a_fold_tests_or_validates_lends_its_lungs_to_training(tmp_path, monkeypatch, holdout):
    """The synthetic-lesion stream painted into every background not in --holdout-patients, while
    COVID-CT-MD was split by fold: without a hold-out list (cross-validation) the fold's test
    patient was a training background. And the evaluation rebuilt its test patients by fold even
    when the run had held some out, so it could judge the run on a patient it trained on."""
    import torch

    import training.real_backgrounds as real_backgrounds
    import training.train_classifier as tc
    from training.datasets import SliceSet

    names = ["P001", "cap001", "normal001", "LIDC-IDRI-0001"]
    monkeypatch.setattr(
        real_backgrounds, "load_backgrounds", lambda *a, **k: [SimpleNamespace(patient_id=p) for p in names]
    )
    painted: dict[str, list[str]] = {}

    class Backgrounds:  # stands in for the synthetic-lesion dataset: which lungs each part uses
        def __init__(self, backgrounds, classes, seed, **kwargs):
            by_seed = {1011: "val", 1012: "test"}
            part = "train" if "refresh_every" in kwargs else by_seed.get(seed, str(seed))
            painted.setdefault(part, []).extend(b.patient_id for b in backgrounds)
            self.ids = [b.patient_id for b in backgrounds]

        def fixed_set(self, n):
            return SliceSet(torch.zeros(1, 1, 16, 16), [0], [f"synth-{self.ids[0]}"], CLASSES)

        def expected_frequencies(self):
            return np.full(len(CLASSES), 1 / len(CLASSES))

    monkeypatch.setattr(tc, "SynthInRealSliceDataset", Backgrounds)
    monkeypatch.setattr(tc, "stream_seed", lambda seed, part, fold: 1000 + part)
    ct_md = _covid_ct_md_folder(tmp_path / "ctmd")
    cfg = _tiny_run(
        phantom=False, synth_backgrounds="unused", covid_ct_md_root=str(ct_md), holdout_patients=holdout
    )
    data = tc.build_data(cfg, CLASSES, tc.DistInfo())
    tested = set(data.tests["covid-ct-md"].patient_ids)
    validated = set(data.val.patient_ids) & {"P001", "cap001", "normal001"}
    assert tested and tested.isdisjoint(painted["train"]) and validated.isdisjoint(painted["train"])
    assert set(painted["test"]) == tested  # the fold's tested lungs are the synthetic test
    if holdout:
        assert tested == set(holdout.split(","))
    held = build_heldout(cfg, CLASSES, Settings(models=[], out=tmp_path, sources=("covid-ct-md",)))
    assert {c.patient_id for c in held.cases["covid-ct-md"]} == tested
