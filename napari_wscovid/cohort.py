"""Whole cohorts on a Dask cluster: one task per study, resumable, fault-isolated, with a table and
a report. No napari, no Qt.

``python -m napari_wscovid cohort ROOT --out D [--workers N | --scheduler tcp://HOST:PORT]``

* **Studies**: every folder under ROOT that holds DICOM files itself (its sub-folders belong to
  it), and every NIfTI/MHA/NRRD file outside such folders.
* **One task per study** on a ``LocalCluster`` (one process per worker, one thread each, torch
  threads matched) or on any running scheduler; the CT is read on the worker from the shared
  file system, never shipped from the client.
* **Outputs**: each study's ``detect`` files go to a temporary folder in ``D`` that is renamed to
  ``D/<study>/`` once complete, so a killed worker leaves no half study. ``study`` is a
  pseudonymous key of the source path: series keys of NIfTI files come from their grid, and two
  files of the same grid would share one folder; the CT's ``series_key`` is a column; ``D/cohort.csv``
  (rewritten atomically after every study) and ``D/report.html`` (:mod:`napari_wscovid.report`).
* **No source names by default**: folders exported from a PACS are often named by patient name or
  ID, so the source paths appear in no output (table, report, study record; an error message has
  them replaced by the study key) unless ``source_names`` asks for a ``source`` column.
* **Resumable**: a study whose folder holds a complete result for the same model (SHA-256) and
  options is skipped; ``overwrite`` recomputes.
* **Fault isolation**: a study that raises, or whose worker dies, becomes an ``error`` row with
  the message; the others finish.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
COHORT_CSV, REPORT_HTML, STUDY_RECORD = "cohort.csv", "report.html", "cohort_study.json"
TMP_PREFIX = ".incomplete-"
BASE_COLUMNS = (
    "study",
    "source",
    "series_key",
    "status",
    "predicted_class",
    "scan_status",
    "lung_volume_ml",
    "involvement_percent",
    "n_boxes",
    "seconds",
    "error",
)


@dataclass(frozen=True)
class CohortOptions:
    """What decides a study's result: a re-run with other options recomputes it."""

    model: str = "default"
    device: str = "cpu"
    saliency: str = "positive"
    lung_method: str | None = None
    min_box_area_mm2: float = 20.0
    # seconds of saliency per study, most abnormal slices first (None: every chosen slice)
    explain_budget_s: float | None = None

    def __post_init__(self) -> None:
        # A wrong budget is refused here, once, rather than by every study as an error row.
        if self.explain_budget_s is not None:
            from napari_wscovid.stages import budget_seconds

            object.__setattr__(self, "explain_budget_s", budget_seconds(self.explain_budget_s))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class CohortSummary:
    rows: list[dict] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    dashboard: str | None = None

    @property
    def failed(self) -> int:
        return sum(r["status"] == "error" for r in self.rows)


# ------------------------------------------------------------------------------------ finding
def find_studies(root: str | Path, skip: str | Path | None = None) -> list[str]:
    """Study sources relative to ``root`` (folders of DICOM files, volume files), sorted; nothing
    under ``skip`` (the cohort's own output folder, when it lies inside ``root``: its lung masks
    were read back as studies, one more each run)."""
    from napari_wscovid.io.dicom import looks_like_dicom

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    skip = Path(skip).resolve() if skip is not None else None
    studies: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if skip is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != skip]
        if (here / STUDY_RECORD).is_file():  # one study's results (an --out that is the input folder)
            dirnames[:] = []
            continue
        files = [here / f for f in sorted(filenames) if not f.startswith(".")]
        if here != root and any(looks_like_dicom(f) for f in files):
            studies.append(here.relative_to(root).as_posix())
            dirnames[:] = []  # sub-folders belong to this study (the loader reads them)
            continue
        studies += [f.relative_to(root).as_posix() for f in files if f.name.lower().endswith(VOLUME_SUFFIXES)]
    return sorted(studies)


# --------------------------------------------------------------------------- one study (worker)
def study_key(source: str) -> str:
    from napari_wscovid.io.volume import pseudonymous_key

    return "st-" + pseudonymous_key("cohort-study", source)[3:]


def run_study(root: str, source: str, out: str, options: dict, threads: int = 1) -> dict:
    """Run ``detect`` on one study and write its files; always returns a row (never raises).

    Runs on a worker: the CT is read here. Files go to a temporary folder renamed into place
    when complete."""
    import torch

    from napari_wscovid import load_ct
    from napari_wscovid.cli import summary_dict, write_results
    from napari_wscovid.pipeline import detect_iter, run_to_end
    from napari_wscovid.stages import Deadline

    torch.set_num_threads(max(1, int(threads)))
    start = time.perf_counter()
    row = {"study": study_key(source), "source": source, "status": "error", "error": ""}
    tmp = Path(out) / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        volume = load_ct(str(Path(root) / source))
        row["series_key"] = volume.series_key
        kwargs = {k: v for k, v in options.items() if k not in ("model_sha256", "explain_budget_s")}
        if options.get("explain_budget_s") is not None:
            kwargs["stop_explaining"] = Deadline(float(options["explain_budget_s"]))
        result = run_to_end(detect_iter(volume, **kwargs))
        tmp.mkdir(parents=True)
        write_results(result, volume, tmp)
        # no source path: the folder's name (the study key) already says which source it is
        record = {"options": options, "model_sha256": result.model_info.get("sha256")}
        (tmp / STUDY_RECORD).write_text(json.dumps(record, indent=1))
        final = Path(out) / row["study"]
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        row.update(_row_from_summary(summary_dict(result, volume)))
        row["status"] = "ok"
    except Exception as exc:  # one broken study must not stop the cohort
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        shutil.rmtree(tmp, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _row_from_summary(summary: dict) -> dict:
    """A table row's answer columns from a study's ``summary.json`` (fresh or read back), so a
    skipped study's row is the row its run wrote."""
    involvement = summary.get("involvement_percent")  # None: no slice explained, not a measured 0 %
    row = {
        "series_key": summary.get("series_key", ""),
        "predicted_class": summary.get("predicted_class", ""),
        "scan_status": summary.get("status", ""),
        "lung_volume_ml": round(float(summary.get("lung_volume_ml", 0.0)), 1),
        "involvement_percent": "" if involvement is None else round(float(involvement), 3),
        "n_boxes": summary.get("n_boxes", ""),
    }
    for name, p in (summary.get("patient_probs") or {}).items():
        row[f"p_{name}"] = round(float(p), 6)
    return row


def completed_row(out: Path, source: str, options: dict, study: str) -> dict | None:
    """The row of a study already complete in ``out`` for the same model and options, else None."""
    folder = out / study
    try:
        record = json.loads((folder / STUDY_RECORD).read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    # a record written before source paths were left out still names its source
    if record.get("source", source) != source or record.get("options") != options:
        return None
    if options.get("model_sha256") and record.get("model_sha256") != options["model_sha256"]:
        return None
    return {
        "study": study,
        "source": source,
        "status": "skipped",
        "seconds": 0.0,
        "error": "",
        **_row_from_summary(summary),
    }


# ------------------------------------------------------------------------------------ client
def exported_rows(rows: list[dict], source_names: bool = False) -> list[dict]:
    """The rows as written to the table and the report, in source order.

    Without ``source_names`` a row has no ``source`` and its error message has the source path and
    each of its folder and file names replaced by the study key: a loader's refusal names the
    folder it refused, and folders are often named by patient."""
    exported = []
    for row in sorted(rows, key=lambda r: r["source"]):
        row = dict(row)
        if not source_names:
            source = row.pop("source")
            row["error"] = _without_source(str(row.get("error", "")), source, row["study"])
        exported.append(row)
    return exported


def _without_source(text: str, source: str, study: str) -> str:
    names = {source, *Path(source).parts, Path(source).name.split(".")[0]}
    for name in sorted((n for n in names if len(n) >= 2 and n not in (".", "..")), key=len, reverse=True):
        text = text.replace(name, study)
    return text


def write_table(out: Path, rows: list[dict], classes: Iterable[str], source_names: bool = False) -> Path:
    from napari_wscovid.io.atomic import atomic_write_text

    base = BASE_COLUMNS if source_names else tuple(c for c in BASE_COLUMNS if c != "source")
    split = base.index("status") + 2  # the class probabilities follow the predicted class
    columns = [*base[:split], *(f"p_{c}" for c in classes), *base[split:]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in exported_rows(rows, source_names):
        writer.writerow({c: row.get(c, "") for c in columns})
    return atomic_write_text(out / COHORT_CSV, buffer.getvalue(), overwrite=True)


def model_sha256(model: str) -> str | None:
    """The SHA-256 of the weights a model name or file stands for (resume compares it)."""
    from napari_wscovid.models.registry import file_sha256, model_info

    if Path(model).is_file():
        return file_sha256(model)
    try:
        return model_info("wsnet-3class" if model == "default" else model).get("sha256")
    except (KeyError, ValueError):
        return None


def run_cohort(
    root: str | Path,
    out: str | Path,
    *,
    options: CohortOptions = CohortOptions(),  # noqa: B008 - frozen, never mutated
    workers: int = 1,
    scheduler: str | None = None,
    overwrite: bool = False,
    source_names: bool = False,
    progress: Callable[[int, int, int, int], None] | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> CohortSummary:
    """Run every study of ``root`` and write ``out``; ``progress(done, failed, skipped, total)``.

    ``source_names``: put each study's source path in the table (off: only its study key)."""
    from distributed import Client, LocalCluster, as_completed

    root, out = Path(root).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{TMP_PREFIX}*"):  # left by a run that was killed mid-study
        shutil.rmtree(stale, ignore_errors=True)
    sources = find_studies(root, skip=out)
    logger.info("%d studies under %s", len(sources), root.name)
    opts = {**options.as_dict(), "model_sha256": model_sha256(options.model)}
    summary = CohortSummary()
    todo = []
    for source in sources:
        done = None if overwrite else completed_row(out, source, opts, study_key(source))
        if done is not None:
            summary.rows.append(done)
        else:
            todo.append(source)
    total, failed = len(sources), 0
    if progress:
        progress(len(summary.rows), 0, len(summary.rows), total)
    if todo:
        cluster = None
        if scheduler:
            client = Client(scheduler, timeout="30s")
        else:
            cluster = LocalCluster(
                n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            client = Client(cluster)
        try:
            summary.dashboard = client.dashboard_link
            if on_dashboard and summary.dashboard:
                on_dashboard(summary.dashboard)
            futures = {
                client.submit(
                    run_study, str(root), s, str(out), opts, 1, key=f"study-{uuid.uuid4().hex}", pure=False
                ): s
                for s in todo
            }
            for future in as_completed(futures):
                source = futures[future]
                try:
                    row = future.result()
                except Exception as exc:  # the worker died (KilledWorker) or the task was lost
                    row = {
                        "study": study_key(source),
                        "source": source,
                        "status": "error",
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                    }
                failed += row["status"] == "error"
                summary.rows.append(row)
                write_table(out, summary.rows, _classes(summary.rows), source_names)
                if progress:
                    progress(len(summary.rows), failed, total - len(todo), total)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    summary.classes = _classes(summary.rows)
    write_table(out, summary.rows, summary.classes, source_names)
    return summary


def _classes(rows: list[dict]) -> tuple[str, ...]:
    seen: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("p_") and key[2:] not in seen:
                seen.append(key[2:])
    return tuple(seen)
