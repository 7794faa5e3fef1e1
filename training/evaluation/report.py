"""The evaluation report: assembled from the held-out data and each model's summary, what the
run left out, and the two files it is written to (``evaluation.json``, ``evaluation.md``)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from training.evaluation.heldout import HeldOut
from training.evaluation.markdown import to_markdown
from training.evaluation.settings import Settings

OUTPUT_FILES = ("evaluation.json", "evaluation.md")


def _clean(obj):
    """JSON-safe: numpy scalars and arrays to Python, NaN/inf to null, private keys dropped."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def build_report(
    settings: Settings, cfg, heldout: HeldOut, infos: dict, summaries: dict, elapsed_minutes: float
) -> dict:
    """The JSON-safe report: how it ran, the held-out data, each model's summary, the limits."""
    import platform

    import torch

    report = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m training.evaluate " + " ".join(sys.argv[1:]),
        "device": settings.device,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "roots"},
        "training_run": {
            "config": settings.train_config or "bundled run flags (runs/wsnet3)",
            **{
                k: getattr(cfg, k)
                for k in ("task", "seed", "fold", "k_folds", "phantom_size", "phantom_slices")
            },
            "test_volumes": cfg.test_volumes,
        },
        "data": {
            src: {
                "description": heldout.description.get(src, ""),
                "cases": len(cases),
                "patients": len({c.patient_id for c in cases}),
                "slices": sum(len(c.slice_index) for c in cases),
                "case_ids": [c.name for c in cases],
            }
            for src, cases in heldout.cases.items()
        },
        "skipped": heldout.skipped,
        "models": {model: {"info": infos[model], **summaries[model]} for model in settings.models},
        "limits": describe_limits(settings, heldout),
        "elapsed_minutes": elapsed_minutes,
    }
    return _clean(report)


def describe_limits(settings: Settings, heldout: HeldOut) -> list[str]:
    """What this run left out or could not do, for the report."""
    from napari_wscovid.explain.integrated_gradients import DEFAULT_IG_STEPS

    limits = [
        f"Saliency (integrated gradients, {settings.ig_steps or DEFAULT_IG_STEPS} steps) only on at most "
        f"{settings.explain_per_volume} slices per volume, evenly spread over those the plugin explains "
        "(predicted not NP under the weights' slice offset; none when the patient is called NP); "
        "lesions on other slices are listed as 'not scored' with the reason, not counted as misses.",
    ]
    if "covid-ct-md" in heldout.cases:
        limits.append(
            "COVID-CT-MD: no lesion masks (classification only); the sample has 3 patients, so its test fold "
            "is one patient and its intervals show no between-patient variability."
        )
    if "ucsd" in heldout.cases:
        limits.append(
            "UCSD COVID-CT: no lesion masks (classification only); no patient ids, so images are grouped by "
            "source paper (the split's best guess)."
        )
    if settings.max_cases is not None:
        limits.append(f"At most {settings.max_cases} cases per source.")
    if settings.quick:
        limits.append(
            "--quick: phantoms smaller than the run's (not its held-out set), few cases, few resamples."
        )
    for src, why in heldout.skipped.items():
        limits.append(f"{src} skipped: {why}.")
    return limits


def write_report(report: dict, out: Path, overwrite: bool) -> None:
    """``evaluation.json`` and ``evaluation.md`` in ``out``, each written atomically."""
    from napari_wscovid.io.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evaluation.json", json.dumps(report, indent=2), overwrite=overwrite)
    atomic_write_text(out / "evaluation.md", to_markdown(report), overwrite=overwrite)
