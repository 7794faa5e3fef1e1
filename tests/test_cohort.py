"""Cohorts on Dask: a LocalCluster and an external scheduler with two workers (started and stopped
here, on loopback) give the same rows; a broken study is reported and the others complete; a
re-run skips what is done; a worker killed mid-run and a half-written study leave nothing half."""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("distributed")

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "phantom_covid" / "dicom"


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    """Two phantom NIfTI studies (same grid), one study in a sub-folder, and a broken DICOM study."""
    from napari_wscovid.io.write import write_image
    from napari_wscovid.phantom import make_phantom

    root = tmp_path_factory.mktemp("cohort") / "root"
    (root / "site1").mkdir(parents=True)
    for i, (kind, where) in enumerate(
        [("NP", "a.nii.gz"), ("CAP", "b.nii.gz"), ("COVID-19", "site1/c.nii.gz")]
    ):
        ph = make_phantom(kind, n_slices=16, size=96, seed=i)
        write_image(ph.volume.hu, root / where, like=ph.volume)
    (root / "broken").mkdir()
    (root / "broken" / "x.dcm").write_bytes((SAMPLE / "slice_0000.dcm").read_bytes()[:3000])
    return root


def _rows(out: Path, sources=("a.nii.gz", "b.nii.gz", "site1/c.nii.gz", "broken")) -> dict[str, dict]:
    """cohort.csv's rows by source; the table names studies by key only, unless --source-names."""
    from napari_wscovid.cohort import study_key

    by_key = {study_key(s): s for s in sources}
    with open(out / "cohort.csv", newline="") as fh:
        return {r["source"] if "source" in r else by_key[r["study"]]: r for r in csv.DictReader(fh)}


def _cli(root, out, *extra) -> int:
    from napari_wscovid.cli import main

    return main(["cohort", str(root), "--out", str(out), "--model", "tiny-test", "-q", *extra])


def test_find_studies(cohort_root, tmp_path):
    from napari_wscovid.cohort import find_studies

    assert find_studies(cohort_root) == ["a.nii.gz", "b.nii.gz", "broken", "site1/c.nii.gz"]
    nested = tmp_path / "root" / "p1" / "series"
    nested.mkdir(parents=True)
    shutil.copy(SAMPLE / "slice_0000.dcm", nested.parent / "s0.dcm")
    shutil.copy(SAMPLE / "slice_0001.dcm", nested / "s1.dcm")
    assert find_studies(tmp_path / "root") == ["p1"]  # a DICOM folder owns its sub-folders


def test_a_cohorts_own_results_inside_its_input_are_not_studies(cohort_root, tmp_path):
    """--out inside the input folder: each study's lung_mask.nii.gz was read back as a study on
    the next (resumed) run, called a class with status ok, one more per run."""
    from napari_wscovid.cohort import STUDY_RECORD, find_studies

    root = shutil.copytree(cohort_root, tmp_path / "root")  # the module's folder stays as it is
    for out in (root / "results", root):  # inside the input, or the input itself
        study = out / "st-0123456789ab"
        study.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "a.nii.gz", study / "lung_mask.nii.gz")
        (study / STUDY_RECORD).write_text("{}")
        assert find_studies(root, skip=out) == ["a.nii.gz", "b.nii.gz", "broken", "site1/c.nii.gz"]


def test_local_cluster_cohort_resumes_and_reports(cohort_root, tmp_path):
    out = tmp_path / "out"
    assert _cli(cohort_root, out, "--workers", "2") == 1  # the broken study fails the run
    rows = _rows(out)
    assert {s: r["status"] for s, r in rows.items()} == {
        "a.nii.gz": "ok",
        "b.nii.gz": "ok",
        "site1/c.nii.gz": "ok",
        "broken": "error",
    }
    assert "x.dcm" in rows["broken"]["error"]
    for source in ("a.nii.gz", "b.nii.gz", "site1/c.nii.gz"):
        folder = out / rows[source]["study"]
        assert (folder / "summary.json").is_file() and (folder / "boxes.json").is_file()
        assert abs(sum(float(rows[source][f"p_{c}"]) for c in ("NP", "CAP", "COVID-19")) - 1) < 1e-4
    assert rows["a.nii.gz"]["study"] != rows["b.nii.gz"]["study"]  # same grid, two folders
    assert not list(out.glob(".incomplete-*"))
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and "3 analysed, 1 failed" in report

    # a re-run skips every complete study and retries the broken one
    assert _cli(cohort_root, out, "--workers", "1") == 1
    again = _rows(out)
    assert [again[s]["status"] for s in ("a.nii.gz", "b.nii.gz", "site1/c.nii.gz")] == ["skipped"] * 3
    assert again["a.nii.gz"]["p_NP"] == rows["a.nii.gz"]["p_NP"]

    # a half-written study (interrupted between files) and a stale temporary folder: recomputed
    (out / rows["b.nii.gz"]["study"] / "summary.json").unlink()
    (out / ".incomplete-deadbeef").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("study_or_source,class\na.nii.gz,NP\nb.nii.gz,CAP\nsite1/c.nii.gz,COVID-19\n")
    assert _cli(cohort_root, out, "--workers", "1", "--labels", str(labels)) == 1
    third = _rows(out)
    assert third["b.nii.gz"]["status"] == "ok" and third["a.nii.gz"]["status"] == "skipped"
    assert not list(out.glob(".incomplete-*"))
    assert "Confusion matrix" in (out / "report.html").read_text()


@pytest.fixture
def dask_cluster(unused_port):
    """``dask scheduler`` and two ``dask worker`` processes on loopback; stopped after the test."""
    dask = shutil.which("dask", path=str(Path(sys.executable).parent))
    if dask is None:
        pytest.skip("the dask command line is not installed")
    port = unused_port()
    address = f"tcp://127.0.0.1:{port}"
    common = ["--no-dashboard"]
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), *common],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = [
        subprocess.Popen(
            [dask, "worker", address, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1", *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in [*workers, scheduler]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*workers, scheduler]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_external_scheduler_matches_local_and_survives_a_killed_worker(cohort_root, tmp_path, dask_cluster):
    address, workers = dask_cluster
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert _cli(cohort_root, local, "--workers", "1") == 1

    # kill one worker while the cohort runs: its study is rescheduled on the other worker
    killer = threading.Timer(3.0, lambda: workers[0].send_signal(signal.SIGKILL))
    killer.start()
    try:
        code = _cli(cohort_root, remote, "--scheduler", address)
    finally:
        killer.cancel()
    assert code == 1
    assert workers[0].poll() is not None, "the worker was not killed during the run"
    a, b = _rows(local), _rows(remote)
    assert {s: r["status"] for s, r in b.items()} == {s: r["status"] for s, r in a.items()}
    for source, row in a.items():
        for key in ("study", "predicted_class", "p_NP", "p_CAP", "p_COVID-19", "n_boxes"):
            assert b[source][key] == row[key], (source, key)
    assert not list(remote.glob(".incomplete-*"))
    for row in b.values():
        if row["status"] == "ok":
            assert (remote / row["study"] / "summary.json").is_file()


@pytest.mark.parametrize("budget", [-0.5, float("nan"), float("inf"), "soon"])
def test_cohort_options_refuse_a_wrong_budget_once_not_per_study(budget):
    from napari_wscovid.cohort import CohortOptions

    with pytest.raises(ValueError, match="time budget"):
        CohortOptions(explain_budget_s=budget)
    assert CohortOptions(explain_budget_s="2.5").explain_budget_s == 2.5  # a budget read from text


def test_a_study_s_saliency_budget_is_kept_and_recorded(cohort_root, tmp_path):
    """``--explain-budget``: each study stops explaining after its budget (0 here: none) and
    lists the slices left; the budget is one of the options a re-run compares."""
    import json

    from napari_wscovid.cohort import STUDY_RECORD, CohortOptions, run_study

    options = CohortOptions(model="tiny-test", saliency="all", explain_budget_s=0.0).as_dict()
    row = run_study(str(cohort_root), "b.nii.gz", str(tmp_path), options)
    assert row["status"] == "ok", row
    summary = json.loads((tmp_path / row["study"] / "summary.json").read_text())
    assert summary["saliency_slices"] == [] and len(summary["unexplained_slices"]) > 0
    record = json.loads((tmp_path / row["study"] / STUDY_RECORD).read_text())
    assert record["options"]["explain_budget_s"] == 0.0


def test_the_report_scores_answers_only_and_says_which_labels_it_could_not_use(tmp_path):
    """A study out of scope (no call, NaN probabilities) crashed the labelled report after the
    whole cohort had run, or was counted as "called NP"; labels typed as a folder's base name,
    with a trailing slash or in lower case were dropped without a word."""
    from napari_wscovid.cohort import study_key
    from napari_wscovid.report import write_report

    classes = ["NP", "CAP", "COVID-19"]

    def row(source, called, probs, scan_status="ok"):
        r = {"study": study_key(source), "source": source, "status": "ok", "scan_status": scan_status}
        r.update(predicted_class=called, lung_volume_ml=3000.0, involvement_percent=1.0, n_boxes=0)
        r.update({f"p_{c}": p for c, p in zip(classes, probs, strict=True)})
        return r

    rows = [
        row("site/P001", "COVID-19", (0.1, 0.2, 0.7)),
        row("site/cap001", "CAP", (0.2, 0.6, 0.2)),
        row("site/normal001", "NP", (0.7, 0.2, 0.1)),
        row("abdomen", None, (float("nan"),) * 3, scan_status="out_of_scope"),
    ]
    labels = {
        "P001": "covid-19",
        "site/cap001/": "CAP",
        study_key("site/normal001"): "NP",
        "abdomen": "NP",
        "P999": "NP",
    }
    text = write_report(tmp_path, rows, classes, labels, source_names=True).read_text()
    assert "<li>NP: 1</li>" in text and "<li>no answer (out of scope or no call): 1</li>" in text
    assert "3 labelled studies with an answer" in text
    assert "left out (no answer to score): 1 out of scope" in text
    assert "1 label(s) match no study: P999" in text
    # by default the sources, and label keys that may be patients' names, are not written
    text = write_report(tmp_path, rows, classes, labels).read_text()
    assert "3 labelled studies with an answer" in text and "1 label(s) match no study (run with" in text
    assert not any(name in text for name in ("P001", "cap001", "normal001", "abdomen", "P999"))


def test_no_source_name_reaches_an_output_unless_asked(tmp_path):
    """Folders exported from a PACS are often named by patient: the table, the report, each study's
    record and a refusal's message carried the folder names. They now hold the study key only,
    unless --source-names asks for them."""
    from napari_wscovid.cohort import (
        CohortOptions,
        find_studies,
        model_sha256,
        run_study,
        study_key,
        write_table,
    )
    from napari_wscovid.io.write import write_image
    from napari_wscovid.phantom import make_phantom
    from napari_wscovid.report import write_report

    root, out = tmp_path / "root", tmp_path / "out"
    (root / "DOE^JANE_0042").mkdir(parents=True)
    (root / "DOE^JANE_0042" / "x.dcm").write_bytes((SAMPLE / "slice_0000.dcm").read_bytes()[:3000])
    ph = make_phantom("CAP", n_slices=12, size=64, seed=3)
    write_image(ph.volume.hu, root / "SMITH_JOHN_1961.nii.gz", like=ph.volume)
    out.mkdir()
    options = {
        **CohortOptions(model="tiny-test", saliency="none").as_dict(),
        "model_sha256": model_sha256("tiny-test"),
    }
    rows = [run_study(str(root), s, str(out), options) for s in find_studies(root)]
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert study_key("DOE^JANE_0042") in rows[0]["error"] or "x.dcm" in rows[0]["error"]
    classes = ("NP", "CAP", "COVID-19")
    write_table(out, rows, classes)
    write_report(out, rows, classes, {"DOE^JANE_0042": "CAP", "SMITH_JOHN_1961.nii.gz": "CAP"})
    written = [f for f in out.rglob("*") if f.is_file() and f.suffix in (".csv", ".html", ".json")]
    assert {"cohort.csv", "report.html", "cohort_study.json", "summary.json"} <= {f.name for f in written}
    for file in written:
        text = file.read_text(errors="replace")
        assert not any(name in text for name in ("DOE", "JANE", "SMITH", "JOHN")), file.name
    with open(out / "cohort.csv", newline="") as fh:
        error = {r["study"]: r["error"] for r in csv.DictReader(fh)}[study_key("DOE^JANE_0042")]
    assert error  # the refusal is kept, its folder name replaced

    write_table(out, rows, classes, source_names=True)
    assert "DOE^JANE_0042" in (out / "cohort.csv").read_text()
