"""Scoring of the held-out real-patient evaluation (the detect runs themselves are real-data work)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def _box(z, y0, x0, y1, x1):
    return SimpleNamespace(slice=z, y0=y0, x0=x0, y1=y1, x1=x1)


def test_score_lesions_counts_missed_slices_and_false_boxes():
    from training.heldout_real import score_lesions

    mask = np.zeros((3, 40, 40), np.uint8)
    mask[0, 5:15, 5:15] = 1  # found
    mask[1, 20:30, 20:30] = 2  # on a slice without any box: missed
    result = SimpleNamespace(boxes=[_box(0, 4, 4, 16, 16), _box(2, 0, 0, 10, 10)])  # second: false positive
    c = score_lesions(result, mask, (1.0, 1.0))
    assert (c.lesions, c.lesions_found, c.boxes, c.boxes_on_lesion) == (2, 1, 2, 1)


def test_summary_pools_real_slices_and_counts_patients():
    from training.heldout_real import Fold, summarise

    classes = ["NP", "CAP", "COVID-19"]
    covid = {
        "patient": "P001",
        "truth": "COVID-19",
        "called": "COVID-19",
        "right": True,
        "boxes": 4,
        "classes": classes,
        "slices": {"probs": [[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]], "infected": [True, False]},
    }
    normal = {
        "patient": "normal001",
        "truth": "NP",
        "called": "CAP",
        "right": False,
        "boxes": 3,
        "classes": classes,
        "slices": {"probs": [[0.7, 0.2, 0.1]], "infected": [False]},
    }
    cap = {
        "patient": "cap001",
        "truth": "CAP",
        "called": "CAP",
        "right": True,
        "boxes": 0,
        "classes": classes,
        # its own slices are ordered right, but its infected ones score below normal001's clean one
        "slices": {"probs": [[0.5, 0.4, 0.1], [0.8, 0.1, 0.1]], "infected": [True, False]},
        "weights": "runs/b/w.safetensors",
    }
    covid["weights"] = normal["weights"] = "runs/a/w.safetensors"
    s = summarise({"real": [covid, normal, cap]})
    assert s["patients_right"] == "2 of 3" and s["real_np_boxes"] == {"normal001": 3}
    within = s["real_slice_auc_infected_vs_clean_by_patient"]
    assert within == {
        "P001": {"auc": 1.0, "positive_slices": 1, "negative_slices": 1},
        "cap001": {"auc": 1.0, "positive_slices": 1, "negative_slices": 1},
    }
    assert set(s["real_slice_auc_covid_vs_rest_by_patient"]) == {"P001"}
    pooled = s["real_slice_auc_infected_vs_clean_pooled_by_weights"]
    # each set of weights pooled on its own, never the two networks' scores together
    assert pooled == {
        "a": {"auc": 1.0, "patients": ["P001", "normal001"]},
        "b": {"auc": 1.0, "patients": ["cap001"]},
    }
    fold = Fold.parse("runs/a/w.safetensors:P001, normal001")
    assert fold.weights == "runs/a/w.safetensors" and fold.patients == ["P001", "normal001"]


def test_a_two_class_covid_network_is_right_to_call_a_cap_patient_negative(monkeypatch, tmp_path):
    """For NP vs COVID-19 networks (DeCoVNet, FeCNN) every other diagnosis is the negative class:
    cap001 called NP is right, and its boxes are not counted as boxes on a non-pneumonia patient."""
    import napari_wscovid
    from training import heldout_real

    ct = SimpleNamespace(shape=(2, 4, 4))
    monkeypatch.setattr(napari_wscovid, "load_ct", lambda path: ct)
    monkeypatch.setattr(
        napari_wscovid,
        "detect",
        lambda volume, **kw: SimpleNamespace(
            classes=("NP", "COVID-19"),
            predicted_class="NP",
            patient_probs=np.array([0.7, 0.3]),
            boxes=[],
            slice_probs=np.array([[0.7, 0.3], [0.6, 0.4]]),
        ),
    )
    monkeypatch.setattr("training.real_backgrounds.slice_positive", lambda *a: np.array([True, False]))
    row = heldout_real.real_patient("cap001", "w.safetensors", tmp_path, "cpu")
    assert (row["diagnosis"], row["truth"], row["right"]) == ("CAP", "NP", True)
    assert heldout_real.summarise({"real": [row]})["real_np_boxes"] == {}
