"""``python -m napari_wscovid detect`` on the bundled sample, a phantom file and real data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from napari_wscovid.cli import OUTPUT_FILES, main

REPO = Path(__file__).resolve().parents[1]
BOX_COLUMNS = ["slice", "y0", "x0", "y1", "x1", "z_mm", "y0_mm", "x0_mm", "y1_mm", "x1_mm", "class", "score"]


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    from napari_wscovid.io.write import write_image
    from napari_wscovid.phantom import make_phantom

    phantom = make_phantom("CAP", n_slices=12, size=128, seed=5)
    path = tmp_path_factory.mktemp("ct") / "phantom.nii.gz"
    write_image(phantom.volume, path)
    return path


def _check_outputs(out: Path, n_slices: int) -> dict:
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["patient_probs"]) == set(summary["classes"])
    assert summary["predicted_class"] in summary["classes"]
    assert abs(sum(summary["patient_probs"].values()) - 1) < 1e-3
    assert summary["lung_volume_ml"] > 0
    assert set(summary["model"]) >= {"name", "version", "sha256"}
    assert summary["device"] == "cpu"
    with open(out / "slices.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["slice", *summary["classes"]] and len(rows) == n_slices + 1
    with open(out / "boxes.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[: len(BOX_COLUMNS)] == BOX_COLUMNS
    boxes = json.loads((out / "boxes.json").read_text())
    assert len(boxes["boxes"]) == summary["n_boxes"]
    return summary


def test_cli_detect_writes_every_file(phantom_file, tmp_path):
    out = tmp_path / "res"
    code = main(
        ["detect", str(phantom_file), "--out", str(out), "--model", "tiny-test", "-q", "--ig-steps", "2"]
    )
    assert code == 0
    _check_outputs(out, 12)
    import SimpleITK as sitk

    mask = sitk.ReadImage(str(out / "lung_mask.nii.gz"))
    source = sitk.ReadImage(str(phantom_file))
    assert mask.GetSize() == source.GetSize()
    assert mask.GetSpacing() == pytest.approx(source.GetSpacing())
    assert mask.GetOrigin() == pytest.approx(source.GetOrigin())


def test_cli_lung_method_is_used_and_recorded(phantom_file, tmp_path):
    import json

    import SimpleITK as sitk

    masks = {}
    for method in ("classical", "hybrid"):
        out = tmp_path / method
        args = ["detect", str(phantom_file), "--out", str(out), "--model", "tiny-test", "-q"]
        assert main([*args, "--saliency", "none", "--lung-method", method]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model"]["lung_method"] == method
        masks[method] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lung_mask.nii.gz")))
    # The hybrid keeps every classical lung voxel and may add dense ones.
    assert ((masks["hybrid"] > 0) | (masks["classical"] == 0)).all()


def _quick_detect(source, out) -> list[str]:
    """``detect`` with the tiny network and no saliency: the outputs without the wait."""
    return ["detect", str(source), "--out", str(out), "--model", "tiny-test", "-q", "--saliency", "none"]


def test_cli_never_overwrites_without_flag(phantom_file, tmp_path):
    out = tmp_path / "res"
    args = _quick_detect(phantom_file, out)
    assert main(args) == 0
    before = (out / "summary.json").read_bytes()
    assert main(args) == 2  # refused before any work
    assert (out / "summary.json").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_cli_bad_input_exits_nonzero_with_message(tmp_path, caplog):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    code = main(["detect", str(bad), "--out", str(tmp_path / "o"), "--model", "tiny-test", "-q"])
    assert code == 2
    assert "broken.nii.gz" in caplog.text
    assert not (tmp_path / "o" / "summary.json").exists()


def test_cli_runs_as_module_on_the_bundled_sample(tmp_path):
    sample = REPO / "sample_data" / "phantom_covid" / "dicom"
    if not sample.is_dir():
        pytest.skip("bundled sample not present")
    out = tmp_path / "res"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_wscovid",
            "detect",
            str(sample),
            "--out",
            str(out),
            "--model",
            "tiny-test",
            "--saliency",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _check_outputs(out, len(list(sample.glob("*.dcm"))))


def test_cli_png_input_gives_single_slice(tmp_path):
    import numpy as np
    from skimage.io import imsave

    from napari_wscovid.phantom import make_phantom

    phantom = make_phantom("COVID-19", n_slices=8, size=128, seed=1)
    hu = phantom.volume.hu[4].astype(np.float32)
    png = ((np.clip(hu, -1350, 150) + 1350) / 1500 * 255).astype(np.uint8)
    path = tmp_path / "slice.png"
    imsave(path, png)
    out = tmp_path / "res"
    assert (
        main(["detect", str(path), "--out", str(out), "--model", "tiny-test", "-q", "--ig-steps", "2"]) == 0
    )
    summary = _check_outputs(out, 1)
    assert summary["is_hu"] is False


@pytest.mark.real_data
def test_cli_on_a_real_series(covid_ct_md, tmp_path):
    series = covid_ct_md / "Normal subjects" / "normal001"
    out = tmp_path / "res"
    assert (
        main(["detect", str(series), "--out", str(out), "--model", "tiny-test", "-q", "--saliency", "none"])
        == 0
    )
    summary = _check_outputs(out, 154)
    assert 2500 < summary["lung_volume_ml"] < 8000
    text = (out / "summary.json").read_text() + (out / "boxes.json").read_text()
    assert "normal001" not in text  # the folder name could identify the patient


def test_headless_core_detects_without_napari_qt_or_captum(tmp_path):
    """``pip install napari-wscovid`` (no extras) is the headless core: the CLI's detect runs
    with napari, Qt, magicgui, pandas and captum unimportable."""
    import subprocess
    import sys

    from napari_wscovid.io.write import write_image
    from napari_wscovid.phantom import make_phantom

    ct = write_image(make_phantom("COVID-19", n_slices=8, size=64, seed=2).volume, tmp_path / "ct.nii.gz")
    code = (
        "import sys\n"
        "for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'magicgui', 'superqt', 'pandas',\n"
        "          'captum'):\n"
        "    sys.modules[m] = None\n"
        "from napari_wscovid.cli import main\n"
        f"sys.exit(main(['detect', {str(ct)!r}, '--out', {str(tmp_path / 'out')!r}, '--model', 'tiny-test',\n"
        "                '--device', 'cpu', '--ig-steps', '2', '--lung-method', 'classical']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "out" / "boxes.json").is_file()
    import json

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # 8 slices of 5 mm are a slab: the summary says how far to trust the answer, and why
    assert summary["status"] == "needs_review" and "slab" in {f["name"] for f in summary["qc"]}


@pytest.mark.parametrize("budget", ["-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("command", ["detect", "cohort"])
def test_cli_refuses_a_wrong_explain_budget_before_reading_anything(command, budget, tmp_path, capsys):
    # The input does not exist: reaching it would fail with another message, after the read.
    missing = tmp_path / "no-such-ct"
    with pytest.raises(SystemExit) as exc:
        main([command, str(missing), "--out", str(tmp_path / "out"), "--explain-budget", budget])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--explain-budget" in err and "time budget" in err and budget in err
    assert not (tmp_path / "out").exists()


def test_cli_explain_budget_zero_explains_nothing_and_says_which_slices_are_left(phantom_file, tmp_path):
    out = tmp_path / "res"
    args = ["detect", str(phantom_file), "--out", str(out), "--model", "tiny-test", "-q"]
    assert main([*args, "--saliency", "all", "--ig-steps", "2", "--explain-budget", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["saliency_slices"] == [] and summary["n_boxes"] == 0
    assert len(summary["unexplained_slices"]) > 0 and "stopped before any slice" in summary["explain_note"]


def test_a_scan_with_no_lung_slice_gets_no_call_and_strict_json(tmp_path):
    """All air: nothing is classified. summary.json said "NP" (argmax over NaN) and wrote NaN,
    which strict JSON readers refuse; now the call is null, the probabilities null."""
    import numpy as np

    from napari_wscovid.io.volume import CTVolume
    from napari_wscovid.io.write import write_image

    path = tmp_path / "air.nii.gz"
    air = CTVolume(hu=np.full((8, 16, 16), -1000, np.int16), spacing=(2.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0))
    write_image(air, path)
    out = tmp_path / "res"
    assert main(["detect", str(path), "--out", str(out), "--model", "tiny-test", "-q"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["predicted_class"] is None
    assert set(summary["patient_probs"].values()) == {None}


SAMPLE_DICOM = REPO / "sample_data" / "phantom_covid" / "dicom"


def test_dicom_output_problems_are_refused_before_the_run(tmp_path, monkeypatch):
    """A wrong --send-to, or a series a SEG/SR cannot reference, was found after the whole run
    and after the core files were written (a re-run then refused: "already holds summary.json")."""
    pytest.importorskip("highdicom")
    import napari_wscovid.io.dicom_objects as dicom_objects
    import napari_wscovid.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "detect_iter", lambda *a, **k: ran.append(1) or iter(()))
    out = tmp_path / "o"
    args = ["detect", str(SAMPLE_DICOM), "--out", str(out), "--model", "tiny-test", "-q"]
    assert main([*args, "--send-to", "pacs.example.org"]) == 2
    assert main([*args, "--send-to", "dimse://NOPORT@host"]) == 2

    def unreferencable(source, key):
        raise ValueError(
            f"{Path(source).name}: cannot be referenced by a SEG or SR (no ImagePositionPatient)"
        )

    monkeypatch.setattr(dicom_objects, "read_source_datasets", unreferencable)
    assert main([*args, "--dicom"]) == 2
    assert ran == [] and not out.exists()


def test_overwrite_removes_what_an_earlier_run_left_and_this_one_does_not_write(tmp_path):
    """A SEG of an earlier --dicom run stayed beside the new summary, referencing another run."""
    pytest.importorskip("highdicom")
    out = tmp_path / "o"
    args = _quick_detect(SAMPLE_DICOM, out)
    assert main([*args, "--dicom", "--deidentify"]) == 0
    assert (out / "seg.dcm").is_file() and (out / "research" / "sr.dcm").is_file()
    assert main([*args, "--overwrite"]) == 0
    assert (
        not (out / "seg.dcm").exists() and not (out / "sr.dcm").exists() and not (out / "research").exists()
    )
    assert (out / "summary.json").is_file()
