"""The network's fit to a scan: out-of-distribution score from a feature reference beside the
weights, low confidence against the model's review threshold, and the status they lead to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_wscovid.models.registry import clear_cache, file_sha256, save_model
from napari_wscovid.models.wsnet import WSNet, tiny_config
from napari_wscovid.reliability import FeatureReference, reference_for, reference_path


@pytest.fixture(scope="module")
def chest():
    from napari_wscovid.phantom import make_phantom

    return make_phantom("COVID-19", n_slices=24, size=96, seed=4)


def _weights(tmp_path, review_below=None) -> tuple:
    torch.manual_seed(0)
    net = WSNet(tiny_config(input_size=48)).eval()
    extra = {} if review_below is None else {"review_below": str(review_below)}
    path = tmp_path / "net.safetensors"
    sha = save_model(net, path, name="net", version="t", extra_metadata=extra, overwrite=True)
    clear_cache()
    return path, sha


def _reference(features, sha, threshold) -> FeatureReference:
    mean = features.mean(0)
    cov = np.cov(features, rowvar=False) + 1e-3 * np.eye(features.shape[1])
    return FeatureReference(mean, np.linalg.inv(cov), threshold, sha, "test")


def test_distance_is_mahalanobis_and_survives_a_round_trip(tmp_path):
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 6))
    ref = _reference(feats, "ab" * 32, 3.0)
    x = rng.normal(size=(5, 6)) * 3
    expected = [mahalanobis(row, ref.mean, ref.precision) for row in x]
    np.testing.assert_allclose(ref.distances(x), expected, rtol=1e-10)
    back = FeatureReference.load(ref.save(tmp_path / "r.reference.safetensors"), "ab" * 32)
    np.testing.assert_array_equal(back.precision, ref.precision)
    assert back.threshold == 3.0 and back.scan_score(x) == pytest.approx(np.median(expected))
    with pytest.raises(ValueError, match="other weights"):
        FeatureReference.load(tmp_path / "r.reference.safetensors", "cd" * 32)
    (tmp_path / "bad.reference.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="bad.reference.safetensors"):
        FeatureReference.load(tmp_path / "bad.reference.safetensors")


def test_out_of_distribution_scan_needs_review(tmp_path, chest):
    from napari_wscovid import detect

    path, sha = _weights(tmp_path)
    run = detect(chest.volume, model=str(path), lung_mask=chest.lung_mask, saliency="none")
    assert run.reliability["feature_distance"] is None
    assert "no feature reference" in run.reliability["feature_distance_note"]
    feats = run.slice_features
    assert feats.shape == (int((run.slice_probs[:, 0] == run.slice_probs[:, 0]).sum()), 16)

    # the scan's own features as the reference: it lies at its centre and passes
    _reference(feats, sha, threshold=50.0).save(reference_path(path))
    same = detect(chest.volume, model=str(path), lung_mask=chest.lung_mask, saliency="none")
    assert same.status == "ok" and same.reliability["feature_distance"] < 50.0
    assert "out_of_distribution" not in {f["name"] for f in same.qc}

    # a reference far from this scan (shifted mean): flagged, and the scan needs review
    far = _reference(feats, sha, threshold=50.0)
    far = FeatureReference(far.mean + 10.0, far.precision, 50.0, sha)
    far.save(reference_path(path))
    odd = detect(chest.volume, model=str(path), lung_mask=chest.lung_mask, saliency="none")
    assert odd.status == "needs_review" and odd.reliability["feature_distance"] > 50.0
    assert {f["name"]: f["severity"] for f in odd.qc}["out_of_distribution"] == "warn"

    # a reference made for other weights is not used (and says why)
    FeatureReference(far.mean, far.precision, 50.0, "0" * 64).save(reference_path(path))
    reference, reason = reference_for({"path": str(path), "sha256": sha})
    assert reference is None and "other weights" in reason


@pytest.mark.parametrize("review_below, flagged", [(0.99, True), (0.01, False)])
def test_low_confidence_follows_the_models_threshold(tmp_path, chest, review_below, flagged):
    from napari_wscovid import detect

    path, _ = _weights(tmp_path, review_below=review_below)
    run = detect(chest.volume, model=str(path), lung_mask=chest.lung_mask, saliency="none")
    names = {f["name"] for f in run.qc}
    assert ("low_confidence" in names) is flagged
    assert (run.status == "needs_review") is flagged
    assert run.reliability["review_below"] == review_below
    assert 0.0 <= run.reliability["slices_disagreeing"] <= 1.0


def test_a_review_threshold_that_is_not_a_probability_is_refused(tmp_path):
    from napari_wscovid.models.registry import ModelLoadError, load_model

    path, _ = _weights(tmp_path, review_below=1.5)
    with pytest.raises(ModelLoadError, match="review_below"):
        load_model(path, device="cpu", cache=False)


def test_feature_reference_builder_sets_its_threshold_on_held_out_scans(tmp_path, chest):
    """training.feature_reference: fitted on synthetic cases, threshold from the held-out scans."""
    pytest.importorskip("sklearn")
    from training.feature_reference import MARGIN, build_reference, slice_features
    from training.real_backgrounds import make_background

    path, sha = _weights(tmp_path)
    bg = make_background("bgA", "NP", chest.volume, chest.lung_mask, pixel_mm=4.0)
    reference, scores = build_reference(path, [bg], {"held": chest.volume}, cases_per_class=1)
    assert reference.weights_sha256 == sha and len(scores["training"]) == 3
    assert reference.threshold == pytest.approx(MARGIN * scores["held_out"]["held"])
    assert reference.scan_score(slice_features(chest.volume, path)) == pytest.approx(
        scores["held_out"]["held"]
    )
    assert file_sha256(path) == sha


def test_bundled_reference_belongs_to_the_bundled_weights_and_passes_the_sample():
    from napari_wscovid import detect, load_ct
    from napari_wscovid.models.registry import load_model

    _, info = load_model("default", device="cpu")
    reference, reason = reference_for(info)
    assert reference is not None, reason
    assert info["review_below"] == pytest.approx(0.5)
    sample = Path(__file__).resolve().parents[1] / "sample_data" / "phantom_covid" / "dicom"
    run = detect(load_ct(str(sample)), saliency="none", device="cpu")
    assert run.reliability["feature_distance"] < reference.threshold
    assert "out_of_distribution" not in {f["name"] for f in run.qc}


@pytest.mark.real_data
def test_a_display_image_needs_review_and_its_feature_distance_is_measured(shared_data):
    """A COVID-CT figure from a paper (UCSD, 8-bit PNG) needs review as a display image; its
    distance from the training features is measured and reported either way (with its lungs
    found it lies near CT slices: docs/reliability.md)."""
    from napari_wscovid import detect, load_ct

    pngs = sorted((shared_data / "ucsd-covid-ct").rglob("*.png"))
    if not pngs:
        pytest.skip(f"{shared_data / 'ucsd-covid-ct'} holds no PNG")
    run = detect(load_ct(str(pngs[0])), saliency="none", device="cpu")
    assert "display_image" in {f["name"] for f in run.qc} and run.status == "needs_review"
    assert run.reliability["feature_distance"] > 0


def test_slice_disagreement_reads_slices_as_the_explained_ones_are_chosen():
    from napari_wscovid.reliability import _slice_disagreement

    classes = ("NP", "CAP", "COVID-19")
    # a patient called NP whose slices lean to CAP at P(NP) 0.3: all disagree without the offset
    probs = np.array([[0.3, 0.7, 0.0]] * 8 + [[0.01, 0.99, 0.0]] * 2)
    assert _slice_disagreement(probs, 0, classes) == 1.0
    assert _slice_disagreement(probs, 0, classes, np_offset=1.0) == pytest.approx(0.2)


def test_slices_disagreeing_uses_the_weights_slice_offset(tmp_path, chest):
    """The bundled weights carry a slice NP offset (1.04) that the explanation applies; the
    reliability value read an empty model_info instead (96% of a real scan's slices "disagreed"
    with its NP call where the tool's own rule made it 59%)."""
    from napari_wscovid import detect
    from napari_wscovid.reliability import _slice_disagreement

    torch.manual_seed(0)
    net = WSNet(tiny_config(input_size=48)).eval()
    path = tmp_path / "offset.safetensors"
    save_model(net, path, name="offset", version="t", extra_metadata={"slice_np_offset": "-3.0"})
    clear_cache()
    run = detect(chest.volume, model=str(path), lung_mask=chest.lung_mask, saliency="none")
    called = int(np.argmax(run.patient_probs))
    with_offset = _slice_disagreement(run.slice_probs, called, run.classes, np_offset=-3.0)
    assert run.reliability["slices_disagreeing"] == round(with_offset, 4)
    assert with_offset != _slice_disagreement(run.slice_probs, called, run.classes)
