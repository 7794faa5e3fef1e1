"""Command line: ``python -m napari_wscovid detect PATH --out DIR``.

Writes ``summary.json``, ``slices.csv``, ``boxes.csv``, ``boxes.json`` and ``lung_mask.nii.gz``
into DIR. Refuses to overwrite existing result files unless ``--overwrite`` is given, and
checks that before any computation, so a typo never costs a long run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from napari_wscovid.lung import LUNG_METHODS

logger = logging.getLogger("napari_wscovid")

OUTPUT_FILES = ("summary.json", "slices.csv", "boxes.csv", "boxes.json", "lung_mask.nii.gz")
OPTIONAL_OUTPUT_FILES = ("lesions.csv", "seg.dcm", "sr.dcm")  # FeCNN's lesion types; --dicom


def _budget(text: str) -> float:
    """``--explain-budget``'s type: a wrong budget is refused before any CT is read."""
    from napari_wscovid.stages import budget_seconds

    try:
        return budget_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m napari_wscovid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    det = sub.add_parser("detect", help="detect COVID-19 / CAP lesions in a CT and write the results")
    det.add_argument(
        "path",
        help="DICOM folder or file, NIfTI, MHA/MHD, NRRD, a 2-D PNG/JPG, or a study on a PACS: "
        "dicomweb:http://HOST:PORT/dicom-web/studies/STUDY_UID",
    )
    det.add_argument("--out", required=True, help="output folder (created if missing)")
    det.add_argument("--model", default="default", help="registry name or a .safetensors file")
    det.add_argument("--sha256", default=None, help="expected SHA-256 of a user's weights file")
    det.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    det.add_argument("--series", default=None, help="series key or index when the folder holds several")
    det.add_argument(
        "--saliency",
        default="positive",
        choices=("positive", "all", "none"),
        help="slices to explain: those called COVID-19 or CAP (none when the patient is called NP), "
        "every lung slice, or none",
    )
    det.add_argument("--ig-steps", type=int, default=None, help="integrated-gradients steps")
    det.add_argument(
        "--explain-budget",
        type=_budget,
        default=None,
        metavar="SECONDS",
        help="end the saliency stage after this long (most abnormal slices first; the slices in "
        "progress then are dropped, within a fraction of a second); "
        "summary.json lists the slices left in unexplained_slices. WSNet only: DeCoVNet and FeCNN "
        "explain within their forward pass",
    )
    det.add_argument(
        "--lung-method",
        default=None,
        choices=LUNG_METHODS,
        help="lung segmentation: hybrid (classical + bundled U-Net), classical (no weights), unet",
    )
    det.add_argument("--min-box-area", type=float, default=20.0, help="smallest box kept, in mm^2")
    det.add_argument(
        "--dicom",
        action="store_true",
        help="also write seg.dcm (lungs, lesion region) and sr.dcm (boxes, answer) for a DICOM input",
    )
    det.add_argument(
        "--send-to",
        default=None,
        help="store seg.dcm and sr.dcm on a PACS (implies --dicom): dicomweb:http://HOST:PORT/dicom-web "
        "or dimse://AET@HOST:PORT; credentials from WSCOVID_PACS_* or the config file (see README)",
    )
    det.add_argument(
        "--deidentify",
        action="store_true",
        help="with --dicom: also write de-identified research copies (PS3.15 basic profile) to OUT/research",
    )
    det.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    det.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    coh = sub.add_parser("cohort", help="run detect on every study under a folder, on a Dask cluster")
    coh.add_argument("root", help="folder of studies: DICOM folders and NIfTI/MHA/NRRD files")
    coh.add_argument(
        "--out", required=True, help="output folder: one sub-folder per study, cohort.csv, report.html"
    )
    where = coh.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    where.add_argument("--scheduler", default=None, help="a running Dask scheduler, e.g. tcp://HOST:8786")
    coh.add_argument("--model", default="default", help="registry name or a .safetensors file")
    coh.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    coh.add_argument("--saliency", default="positive", choices=("positive", "all", "none"))
    coh.add_argument("--lung-method", default=None, choices=LUNG_METHODS)
    coh.add_argument(
        "--explain-budget",
        type=_budget,
        default=None,
        metavar="SECONDS",
        help="per study: end the saliency stage after this long (most abnormal slices first)",
    )
    coh.add_argument(
        "--labels", default=None, help="CSV study_or_source,class: ROC and confusion in the report"
    )
    coh.add_argument("--overwrite", action="store_true", help="recompute studies already complete")
    coh.add_argument(
        "--source-names",
        action="store_true",
        help="list each study's folder or file name in cohort.csv and report.html (off by default: "
        "folders exported from a PACS are often named by patient; the study key stands for them)",
    )
    coh.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub.add_parser("models", help="list the registered models")
    view = sub.add_parser("view", help="open napari with a CT (default: the bundled sample) and the widget")
    view.add_argument("path", nargs="?", default=None, help="CT to open; omitted: the bundled sample")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.command == "models":
        from napari_wscovid.models.registry import available_models, model_info

        for name in available_models():
            info = model_info(name)
            print(f"{name}\t{', '.join(info.get('classes', []))}\t{info.get('sha256', '')}")
        return 0
    if args.command == "view":
        return _view(args.path)
    if args.command == "cohort":
        try:
            return _cohort(args)
        except KeyboardInterrupt:
            logger.error("interrupted; finished studies are kept, a re-run resumes")
            return 130
        except (OSError, ValueError, RuntimeError) as err:
            logger.error("%s", err)
            return 2
    try:
        return _detect(args)
    except KeyboardInterrupt:
        logger.error("interrupted; no result files were written")
        return 130
    except (OSError, ValueError, RuntimeError) as err:
        # Bad input, bad weights or a full disk: one clear line, no traceback, non-zero exit.
        logger.error("%s", err)
        return 2


def _detect(args) -> int:
    from napari_wscovid.io.pacs import is_dicomweb

    out = Path(args.out)
    existing = [name for name in (*OUTPUT_FILES, *OPTIONAL_OUTPUT_FILES) if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    series = int(args.series) if args.series is not None and args.series.isdigit() else args.series
    dicom_objects = bool(args.dicom or args.send_to)
    if args.send_to:  # refused now, not after minutes of detection and half the files written
        from napari_wscovid.io.pacs import DIMSE_PREFIX, parse_dimse

        if str(args.send_to).startswith(DIMSE_PREFIX):
            parse_dimse(args.send_to)
        elif not is_dicomweb(args.send_to):
            raise ValueError(
                "--send-to takes dicomweb:http://HOST:PORT/dicom-web or dimse://AET@HOST:PORT, "
                f"got {args.send_to}"
            )
    with contextlib.ExitStack() as stack:
        source = args.path
        if is_dicomweb(source):
            from napari_wscovid.io.pacs import fetch_study

            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="wscovid-study-"))
            source = str(fetch_study(source, folder))
        elif dicom_objects and not _is_dicom_input(source):
            raise ValueError(f"--dicom needs a DICOM series as input; {Path(source).name} is not DICOM")
        return _detect_volume(args, source, series, out, dicom_objects)


def _cohort(args) -> int:
    from tqdm import tqdm

    try:
        from napari_wscovid.cohort import CohortOptions, run_cohort
        from napari_wscovid.report import read_labels, write_report
    except ImportError as exc:
        raise RuntimeError(
            f"the cohort command needs Dask: pip install 'napari-wscovid[cohort]' ({exc})"
        ) from exc
    labels = read_labels(args.labels) if args.labels else None
    options = CohortOptions(
        model=args.model,
        device=args.device,
        saliency=args.saliency,
        lung_method=args.lung_method,
        explain_budget_s=args.explain_budget,
    )
    bar = tqdm(total=0, disable=args.quiet, unit="study")

    def show(done: int, failed: int, skipped: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix(failed=failed, skipped=skipped, left=total - done)
        bar.refresh()

    try:
        summary = run_cohort(
            args.root,
            args.out,
            options=options,
            workers=args.workers,
            scheduler=args.scheduler,
            overwrite=args.overwrite,
            source_names=args.source_names,
            progress=show,
            on_dashboard=lambda link: logger.info("Dask dashboard: %s", link),
        )
    finally:
        bar.close()
    report = write_report(args.out, summary.rows, summary.classes, labels, args.source_names)
    logger.info(
        "%d studies: %d failed; table %s, report %s",
        len(summary.rows),
        summary.failed,
        Path(args.out) / "cohort.csv",
        report,
    )
    return 1 if summary.failed else 0


def _is_dicom_input(path: str) -> bool:
    from napari_wscovid.io.dicom import looks_like_dicom

    return Path(path).is_dir() or looks_like_dicom(path)


def _detect_volume(args, source: str, series, out: Path, dicom_objects: bool) -> int:
    from tqdm import tqdm

    from napari_wscovid.io import load_ct
    from napari_wscovid.pipeline import detect_iter, run_to_end

    volume = load_ct(source, series=series)
    for warning in volume.warnings:
        logger.warning("%s", warning)
    datasets = None
    if dicom_objects:  # a series a SEG/SR cannot reference is refused before the run, not after it
        from napari_wscovid.io.dicom_objects import read_source_datasets

        datasets = read_source_datasets(source, volume.series_key)
    model = args.model
    if args.sha256 and Path(model).is_file():
        from napari_wscovid.models.registry import load_model

        load_model(model, device=args.device, sha256=args.sha256)  # verifies and caches
    from napari_wscovid.stages import Deadline

    gen = detect_iter(
        volume,
        stop_explaining=None if args.explain_budget is None else Deadline(args.explain_budget),
        model=model,
        device=args.device,
        saliency=args.saliency,
        ig_steps=args.ig_steps,
        min_box_area_mm2=args.min_box_area,
        lung_method=args.lung_method,
    )
    with tqdm(total=4, disable=args.quiet or not sys.stderr.isatty(), unit="stage") as bar:

        def show(done: int, total: int, message: str) -> None:
            bar.n = done
            bar.set_description(message)
            bar.refresh()

        result = run_to_end(gen, show)
    out.mkdir(parents=True, exist_ok=True)
    write_results(result, volume, out, overwrite=args.overwrite)
    if args.overwrite:
        _remove_stale_outputs(out, result, dicom_objects, args.deidentify)
    if dicom_objects:
        from napari_wscovid.io.dicom_objects import write_dicom_objects

        written = write_dicom_objects(
            out, volume, datasets, result, overwrite=args.overwrite, research_copies=args.deidentify
        )
        logger.info("wrote %s", ", ".join(p.name for p in written))
        if args.send_to:
            from napari_wscovid.io.pacs import send

            stored = send(args.send_to, written)
            logger.info("stored %d object(s) on the PACS", stored)
    logger.info(
        "%s: %s (%s), %d boxes; results in %s",
        volume.series_key,
        result.call_text,
        ", ".join(f"{c} {p:.3f}" for c, p in zip(result.classes, result.patient_probs, strict=True)),
        len(result.boxes),
        out,
    )
    if result.explain_note:
        logger.info("%s", result.explain_note)
    return 0


def _remove_stale_outputs(out: Path, result, dicom_objects: bool, research: bool) -> None:
    """With --overwrite: the optional files an earlier run left that this one does not write (a
    SEG that would reference another series than this summary, another method's lesions.csv)."""
    import shutil

    stale = [] if result.lesions else ["lesions.csv"]
    if not dicom_objects:
        stale += ["seg.dcm", "sr.dcm"]
    for name in stale:
        if (out / name).is_file():
            (out / name).unlink()
            logger.info("removed %s, left by an earlier run (--overwrite)", name)
    if (out / "research").is_dir() and not (dicom_objects and research):
        shutil.rmtree(out / "research")
        logger.info("removed research/, left by an earlier run (--overwrite)")


def _view(path: str | None) -> int:
    import napari

    viewer = napari.Viewer(title="napari-wscovid")
    if path is None:
        viewer.open_sample("napari-wscovid", "covid_phantom")
    else:
        viewer.open(path, plugin="napari-wscovid")
    viewer.window.add_plugin_dock_widget("napari-wscovid", "Run detection")
    napari.run()
    return 0


def summary_dict(result, volume) -> dict:
    """The JSON summary of one run (no patient identifier: only the pseudonymous series key)."""
    return {
        "series_key": volume.series_key,
        "classes": list(result.classes),
        "patient_probs": {c: float(p) for c, p in zip(result.classes, result.patient_probs, strict=True)},
        "predicted_class": result.predicted_class,
        # how far to trust it: "ok", "needs_review" or "out_of_scope", and the quality flags
        "status": result.status,
        "qc": list(result.qc),
        "reliability": dict(result.reliability),
        "patient_rule": result.patient_rule,
        "lung_volume_ml": round(result.lung_volume_ml, 1),
        # null when no slice was explained: 0 % would say the lungs are clear
        "involvement_percent": float(result.involvement["total_percent"]) if result.involvement else None,
        "model": result.model_info,
        "device": result.device,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "n_boxes": len(result.boxes),
        "saliency_slices": list(result.saliency_slices),
        # chosen for saliency but not explained: the run was stopped early (--explain-budget)
        "unexplained_slices": list(result.unexplained_slices),
        "explain_note": result.explain_note,
        # steps per explained slice: chosen by the completeness check unless --ig-steps was given
        "ig_steps": list(result.ig_steps),
        "n_lesions": len(result.lesions),
        "lesion_types": _jsonable(result.lesion_types),
        "is_hu": volume.is_hu,
        "warnings": list(volume.warnings),
    }


def _jsonable(value):
    """Arrays and numpy scalars (e.g. k-means centres) as plain lists and numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def lesions_csv(result, volume) -> str:
    """One row per typed lesion (Wu et al.'s detector): voxel and mm position, type, soft scores."""
    names = (result.lesion_types or {}).get("names") or []
    k = max((len(les.soft_scores) for les in result.lesions), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["slice", "y", "x", "z_mm", "y_mm", "x_mm", "cluster", "type", "area_mm2", "activation"]
        + [f"score_{i}" for i in range(k)]
    )
    for les in result.lesions:
        z_mm, y_mm, x_mm = (float(v) for v in volume.index_to_world((les.slice, les.y, les.x)))
        name = names[les.cluster] if 0 <= les.cluster < len(names) else ""
        writer.writerow(
            [les.slice, les.y, les.x, f"{z_mm:.2f}", f"{y_mm:.2f}", f"{x_mm:.2f}", les.cluster, name]
            + [f"{les.area_mm2:.1f}", f"{les.activation:.4f}"]
            + [f"{v:.4f}" for v in les.soft_scores]
        )
    return buffer.getvalue()


def json_safe(value):
    """``value`` with every NaN or infinity as None: JSON has no NaN, and a strict reader (a
    browser, Node, a hospital's tools) refuses a file that writes one."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value


def write_results(result, volume, out: Path, *, overwrite: bool = False) -> None:
    """Write every output file atomically into ``out``."""
    from napari_wscovid.io.atomic import atomic_write_text
    from napari_wscovid.io.boxes_io import save_boxes
    from napari_wscovid.io.write import write_image

    atomic_write_text(
        out / "summary.json",
        json.dumps(json_safe(summary_dict(result, volume)), indent=2, allow_nan=False),
        overwrite=overwrite,
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slice", *result.classes])
    for z, row in enumerate(result.slice_probs):
        writer.writerow([z, *("" if np.isnan(p) else f"{p:.6f}" for p in row)])
    atomic_write_text(out / "slices.csv", buffer.getvalue(), overwrite=overwrite)
    meta = {"model": result.model_info, "classes": list(result.classes), "series_key": volume.series_key}
    for name in ("boxes.json", "boxes.csv"):
        save_boxes(out / name, result.boxes, volume.geometry(), overwrite=overwrite, **meta)
    write_image(result.lung_mask, out / "lung_mask.nii.gz", like=volume, overwrite=overwrite)
    if result.lesions:
        atomic_write_text(out / "lesions.csv", lesions_csv(result, volume), overwrite=overwrite)
