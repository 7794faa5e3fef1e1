"""Evaluate detection models on data their training run held out: classification and localisation.

Every model goes through ``napari_wscovid.detect`` (a registry name or a weights file), on the
same held-out cases, so WSNet, DeCoVNet and FeCNN are compared side by side:

- classification, as the paper's Tables 3-4 (per class and overall, 95% bootstrap intervals over
  patients), at slice level and, for CT volumes, at patient level;
- lesion localisation, where exact lesion masks exist (phantoms, MedSeg): lesion recall and box
  precision at IoU >= 0.1 (see :mod:`training.localisation`), for the boxes of each per-scale CAM
  and of the joint saliency (the paper's claim is that the joint one localises better), or for a
  method's own boxes;
- seconds per volume on this machine.

The steps live in :mod:`training.evaluation`: ``heldout`` rebuilds the run's held-out data,
``detect_cases`` runs the models on it, ``summary`` computes the metrics, ``report`` and
``markdown`` write ``evaluation.json`` and ``evaluation.md``. A metric a model cannot give (slice
AUC of a patient-level network) is reported as "n/a".

Run ``python -m training.evaluate --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path

from training.config import set_threads, setup_logging
from training.evaluation.detect_cases import check_models, run_all
from training.evaluation.heldout import build_heldout, load_training_config
from training.evaluation.report import OUTPUT_FILES, build_report, write_report
from training.evaluation.settings import DEFAULT_SOURCES, SOURCES, Settings
from training.evaluation.summary import summarise_model
from training.localisation import IOU_THRESHOLD, MIN_LESION_AREA_MM2

log = logging.getLogger("training.evaluate")

# --quick: small and fast, for tests; the phantoms are then smaller than the run's, so they are
# not its held-out set (the output says so).
QUICK = {"phantom_size": 64, "phantom_slices": 16, "test_volumes": 1}
QUICK_DEFAULTS = {"n_boot": 50, "explain_per_volume": 2, "ig_steps": 2, "max_cases": 3, "extra_phantoms": 1}


def evaluate(settings: Settings) -> dict:
    """Build the held-out data, run every model, and return the report (:func:`main` writes it)."""
    from napari_wscovid.models.wsnet import TASK_CLASSES

    t0 = time.monotonic()
    cfg = load_training_config(settings.train_config)
    if settings.quick:
        cfg = dataclasses.replace(cfg, **{k: min(getattr(cfg, k), v) for k, v in QUICK.items()})
    classes = tuple(TASK_CLASSES[cfg.task])
    infos = check_models(settings.models, settings.device, classes)
    heldout = build_heldout(cfg, classes, settings)
    if not heldout.cases:
        raise RuntimeError("no held-out data to evaluate on: " + "; ".join(heldout.skipped.values()))
    outcomes = run_all(heldout, settings)
    summaries = {model: summarise_model(outcomes[model], settings) for model in settings.models}
    return build_report(settings, cfg, heldout, infos, summaries, (time.monotonic() - t0) / 60)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.splitlines()[0],
        epilog="--quick: 64 x 64 x 16 phantoms, and unless given --n-boot 50 --explain-per-volume 2 "
        "--ig-steps 2 --max-cases 3 --extra-phantoms 1.",
    )
    add = p.add_argument
    add(
        "--models", nargs="+", default=["wsnet-3class"], help="registry names or weights files (wsnet-3class)"
    )
    add("--out", required=True, help="folder for evaluation.json and evaluation.md")
    add("--train-config", default=None, help="config.json of the training run (default: the bundled run's)")
    add("--overwrite", action="store_true", help="replace evaluation files already in --out")
    add("--quick", action="store_true", help="small phantoms, few cases: for tests")
    add("--sources", nargs="+", choices=SOURCES, default=list(DEFAULT_SOURCES), help="(all but medseg-seen)")
    add("--device", default="cpu", help="'cpu' (default), 'cuda', 'cuda:N' or 'auto'")
    add("--threads", type=int, default=None, help="torch intra-op threads")
    add("--ig-steps", type=int, default=None, help="integrated-gradients steps (the plugin's default, 8)")
    add("--explain-per-volume", type=int, default=None, help="most slices explained per volume (6)")
    add("--extra-phantoms", type=int, default=None, help="extra phantoms with nodules, per class (1)")
    add("--max-cases", type=int, default=None, help="at most this many cases per source (all)")
    add("--min-lesion-area", type=float, default=MIN_LESION_AREA_MM2, help="smallest true lesion, mm^2 (20)")
    add("--iou", type=float, default=IOU_THRESHOLD, help="box-lesion IoU that counts as a match (0.1)")
    add("--n-boot", type=int, default=None, help="bootstrap resamples (1000)")
    add("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    add("--covid-ct-md-root", default=None, help="replace the run's COVID-CT-MD folder")
    add("--image-root", default=None, help="replace the run's UCSD COVID-CT folder")
    add("--medseg-root", default=None, help="replace the run's MedSeg folder")
    add("--log-file", default=None, help="also write the log here")
    add("--verbose", action="store_true", help="show the plugin's per-image warnings too")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = QUICK_DEFAULTS if args.quick else {}

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    return Settings(
        models=list(args.models),
        out=Path(args.out),
        train_config=args.train_config,
        sources=tuple(args.sources),
        quick=args.quick,
        overwrite=args.overwrite,
        device=args.device,
        ig_steps=pick("ig_steps", None),
        explain_per_volume=pick("explain_per_volume", 6),
        extra_phantoms=pick("extra_phantoms", 1),
        max_cases=pick("max_cases", None),
        min_lesion_area_mm2=args.min_lesion_area,
        iou_threshold=args.iou,
        n_boot=pick("n_boot", 1000),
        seed=args.seed,
        roots={"covid-ct-md": args.covid_ct_md_root, "ucsd": args.image_root, "medseg": args.medseg_root},
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 2 without running when the output files exist."""
    import torch

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    setup_logging(args.log_file)
    existing = [settings.out / n for n in OUTPUT_FILES if (settings.out / n).exists()]
    if existing and not settings.overwrite:
        log.error("%s already exist; pass --overwrite to replace them", ", ".join(map(str, existing)))
        return 2
    plugin_log = logging.getLogger("napari_wscovid")
    level, threads = plugin_log.level, torch.get_num_threads()
    if not args.verbose:
        # Every 2-D picture warns that it is not in HU and has no spacing: expected here.
        plugin_log.setLevel(logging.ERROR)
        log.info(
            "the plugin's warnings are hidden (2-D inputs are not in HU, as expected); --verbose shows them"
        )
    set_threads(args.threads)
    try:
        with warnings.catch_warnings():
            if not args.verbose:
                # scikit-image deprecations raised inside the plugin, once per 2-D picture.
                warnings.simplefilter("ignore", FutureWarning)
            report = evaluate(settings)
    finally:  # main() may run inside another program (tests): leave its settings as they were
        plugin_log.setLevel(level)
        torch.set_num_threads(threads)
    write_report(report, settings.out, settings.overwrite)
    log.info(
        "wrote %s and %s (%.1f min)",
        settings.out / OUTPUT_FILES[0],
        settings.out / OUTPUT_FILES[1],
        report["elapsed_minutes"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
