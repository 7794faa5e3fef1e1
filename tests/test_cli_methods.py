"""The CLI runs every registered method: DeCoVNet and FeCNN files through ``--model FILE``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_wscovid.cli import main
from napari_wscovid.io.write import write_image
from napari_wscovid.models.registry import save_model
from napari_wscovid.phantom import make_phantom
from tests.conftest import tiny_network


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct")
    p = make_phantom("COVID-19", n_slices=12, size=96, seed=3)
    return write_image(p.volume, tmp / "ct.nii.gz")


@pytest.mark.parametrize(
    "kind, architecture", [("decovnet", "decovnet-zheng2020"), ("fecnn", "fecnn-wu2021")]
)
def test_cli_detect_with_other_methods(tmp_path, phantom_file, kind, architecture):
    weights = tmp_path / f"{kind}.safetensors"
    sha = save_model(tiny_network(kind), weights, name=f"{kind}-tiny", version="t")
    out = tmp_path / "out"
    argv = ["detect", str(phantom_file), "--out", str(out), "--model", str(weights), "--sha256", sha]
    assert main([*argv, "--saliency", "all", "--device", "cpu", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["architecture"] == architecture
    assert summary["model"]["sha256"] == sha
    assert abs(sum(summary["patient_probs"].values()) - 1) < 1e-5
    rows = list(csv.DictReader((out / "boxes.csv").open()))
    assert len(rows) == summary["n_boxes"]
    if kind == "decovnet":
        # A patient-level network: no slice gets a probability of its own.
        slices = list(csv.DictReader((out / "slices.csv").open()))
        assert all(row["COVID-19"] == "" for row in slices)
    else:
        assert summary["n_lesions"] > 0, "saliency 'all' on a COVID phantom should type some lesions"
        lesions = list(csv.DictReader((out / "lesions.csv").open()))
        assert len(lesions) == summary["n_lesions"]
        assert {r["type"] for r in lesions} <= set(summary["lesion_types"]["names"])
        scores = np.array([[float(r[k]) for k in r if k.startswith("score_")] for r in lesions])
        assert np.allclose(scores.sum(1), 1, atol=1e-3)
