"""One prepared command that trains all four networks on one GPU and times ``detect`` on CUDA.

The device machine has torch, numpy, scipy, scikit-image and safetensors, no network and no
``../shared``: everything it trains on travels with the repository. So the run trains on

* the **pack** (``gpu_pack/``, git-ignored, carried): the real lesion-free lung backgrounds of
  :mod:`training.real_backgrounds` (six patients, about 29 MiB), into which
  :mod:`training.synthesis` paints lesions, for WSNet and FeCNN
  and DeCoVNet (whole synthetic-in-real volumes of the four patients without real lesions);
* phantoms generated on the spot, a minority for those three, and the data of the lung U-Net
  (exact lung masks).

Steps and budgets (minutes, ``--minutes-scale`` scales them): WSNet 4.5, FeCNN 1.5, DeCoVNet 1.25,
lung U-Net 1, then ``detect`` with each new network on the bundled sample on CUDA, timings printed.
Weights are written to ``--out`` (``$OUT`` on the device machine) as safetensors with their
SHA-256; nothing is registered here (``scripts/register_weights.py`` does that once the weights
have beaten the bundled ones on held-out real patients).

Build the pack here, then run on the device::

    python -m training.gpu_run pack --data ../shared/data --out gpu_pack
    python -m training.gpu_run train --pack gpu_pack --out "$OUT"        # on the GPU machine
    python -m training.gpu_run train --smoke --out /tmp/smoke            # the same code, CPU, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("training.gpu_run")

#: The run's data must fit the device copy: 64 MiB in all with the repository's ~23 MB.
PACK_LIMIT_MIB = 35.0
#: Fold A of the real patients: never trained on, so the run's weights can be compared with the
#: CPU weights on the same held-out patients.
DEFAULT_HOLDOUT = "cap001,LIDC-IDRI-0003,Lung_Dx-A0001"
#: Pure-Python packages the trainers import that the GPU machine lacks; the pack carries them.
CARRIED_PACKAGES = ("tqdm",)
# WSNet's includes about a minute of building its validation and test sets.
BUDGET_MINUTES = {"wsnet": 4.5, "fecnn": 1.5, "decovnet": 1.25, "lung_unet": 1.0}


def build_pack(data_root: str | Path, out: str | Path) -> Path:
    """Write the real backgrounds into ``out/backgrounds`` and refuse a pack over the limit."""
    from training.real_backgrounds import build_cache

    out = Path(out)
    files = build_cache(data_root, out / "backgrounds")
    for package in CARRIED_PACKAGES:
        source = Path(importlib.util.find_spec(package).origin).parent
        shutil.copytree(
            source, out / "site" / package, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pyc")
        )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    if size > PACK_LIMIT_MIB:
        raise ValueError(
            f"pack {out} is {size:.1f} MiB, over the {PACK_LIMIT_MIB:g} MiB the device copy allows"
        )
    (out / "pack.json").write_text(json.dumps({"patients": [f.stem for f in files], "mib": round(size, 2)}))
    print(f"pack {out}: {len(files)} backgrounds, {size:.1f} MiB (limit {PACK_LIMIT_MIB:g})")
    return out


def _smoke_pack(folder: Path) -> Path:
    """Two backgrounds cut from small lesion-free phantoms: the pack's format, made in seconds."""
    from napari_wscovid.phantom import make_phantom
    from training.real_backgrounds import make_background

    bg_dir = folder / "backgrounds"
    bg_dir.mkdir(parents=True, exist_ok=True)
    for i, pid in enumerate(("smokeA", "smokeB")):
        ph = make_phantom("NP", n_slices=16, size=96, seed=40 + i)
        make_background(pid, "NP", ph.volume, ph.lung_mask, pixel_mm=2.5).save(bg_dir / f"{pid}.npz")
    return folder


def _slice_data(pack: Path, device: str, minutes: float, smoke: bool, holdout: str) -> dict:
    """The data and run options WSNet and FeCNN share (both train on slices)."""
    return dict(
        synth_backgrounds=str(pack / "backgrounds"),
        holdout_patients=holdout,
        phantom=not smoke,
        phantom_weight=0.5,
        phantom_pool=1,
        val_volumes=1,
        test_volumes=1,
        # small pools per worker: 14 workers build theirs in parallel before the first batch
        synth_pool=1 if smoke else 2,
        synth_refresh=48,
        synth_val_cases=1 if smoke else 2,
        synth_test_cases=1 if smoke else 2,
        max_minutes=minutes,
        device=device,
        num_workers=0 if smoke else 14,
        n_boot=10 if smoke else 1000,
    )


def _train_wsnet(
    pack: Path,
    out: Path,
    device: str,
    minutes: float,
    smoke: bool,
    holdout: str,
    init: str | None = "wsnet-3class",
    version: str = "2.2.0-gpu",
    mix: dict | None = None,
) -> dict:
    from training.train_classifier import TrainConfig, train

    size = (
        dict(model="tiny", input_size=48, iterations=2, batch_size=4, val_every=2)
        if smoke
        else dict(model="full", input_size=224, iterations=100000, batch_size=64, val_every=250)
    )
    cfg = TrainConfig(
        **size,
        **_slice_data(pack, device, minutes, smoke, holdout),
        # the default: the bundled weights never saw fold A (1.0.0 trained on P001 and normal001,
        # 2.2.0-gpu continued it on fold A's complement); another fold must start elsewhere
        init=None if smoke else init,
        synth_weight=3.0,
        # the first GPU run (2.1.0-gpu, paper augmentation only) still called unseen normal lungs
        # CAP: warps, kernels and noise keep the few real negatives from being learnt by heart
        scanner_augment=True,
        phantom_size=256,
        aux_fraction=0.3,
        patience=100000,
        out_dir=str(out / "wsnet"),
        export=str(out / "wsnet-3class.safetensors"),
        export_name="wsnet-3class",
        export_version=version,
        **(mix or {}),
    )
    return train(cfg)


#: A fold's names for the synthetic stream's mix (``TrainConfig`` fields).
FOLD_MIX = {
    "distractors": "synth_distractors",
    "masses": "synth_masses",
    "pleural": "synth_pleural_masses",
    "contrast": "synth_contrast",
}


@dataclass(frozen=True)
class WSNetFold:
    """One extra WSNet run of the call: its own held-out patients, start and minutes.

    Written ``name=foldB,minutes=4,init=none,holdout=P001+normal001+LIDC-IDRI-0001`` on the command
    line, optionally with the synthetic stream's mix (``distractors=0.6,masses=0.5,pleural=0.5,contrast=0``,
    see :data:`FOLD_MIX`); its weights go to ``OUT/<name>/``. Several folds in one call give
    every real patient a judge that never trained on it, from one device start.
    """

    name: str
    minutes: float
    holdout: str
    init: str | None = None
    version: str = "2.3.0-gpu"
    mix: tuple[tuple[str, float], ...] = ()  # (TrainConfig field, value)

    @classmethod
    def parse(cls, text: str) -> WSNetFold:
        fields = dict(part.split("=", 1) for part in text.split(",") if part)
        unknown = set(fields) - {"name", "minutes", "init", "holdout", "version", *FOLD_MIX}
        missing = {"name", "minutes", "holdout"} - set(fields)
        if unknown or missing:
            raise ValueError(
                f"--wsnet-fold {text!r}: unknown {sorted(unknown)}, missing {sorted(missing)}"
                " (name=...,minutes=...,holdout=A+B[,init=...|none][,version=...]"
                "[,distractors=...][,masses=...][,pleural=...][,contrast=...])"
            )
        init = fields.get("init", "none")
        return cls(
            name=fields["name"],
            minutes=float(fields["minutes"]),
            holdout=fields["holdout"].replace("+", ","),
            init=None if init.lower() == "none" else init,
            version=fields.get("version", cls.version),
            mix=tuple((FOLD_MIX[k], float(fields[k])) for k in FOLD_MIX if k in fields),
        )


def _train_fecnn(pack: Path, out: Path, device: str, minutes: float, smoke: bool, holdout: str) -> dict:
    from training.train_fecnn import FeCNNTrainConfig, train

    size = (
        dict(model="tiny", input_size=64, iterations=2, batch_size=2, val_every=2)
        if smoke
        else dict(iterations=100000, batch_size=32, val_every=250)
    )
    cfg = FeCNNTrainConfig(
        **size,
        **_slice_data(pack, device, minutes, smoke, holdout),
        out_dir=str(out / "fecnn"),
        export=str(out / "fecnn-covid.safetensors"),
        export_version="2.1.0-gpu",
    )
    return train(cfg)


def _train_decovnet(pack: Path, out: Path, device: str, minutes: float, smoke: bool, holdout: str) -> dict:
    from training.train_decovnet import DeCoVNetTrainConfig, train

    size = (
        dict(model="tiny", input_height=32, input_width=48, steps=2, val_every=2, phantom_size=64,
             phantom_slices_min=8, phantom_slices_max=8, phantom_pool=1, val_volumes=1, test_volumes=1)
        if smoke
        else dict(input_height=96, input_width=144, steps=100000, val_every=200, phantom_pool=1,
                  val_volumes=2, test_volumes=1)
    )  # fmt: skip
    cfg = DeCoVNetTrainConfig(
        **size,
        synth_backgrounds=str(pack / "backgrounds"),
        holdout_patients=holdout,
        max_minutes=minutes,
        device=device,
        num_workers=0 if smoke else 14,
        out_dir=str(out / "decovnet"),
        export=str(out / "decovnet-covid.safetensors"),
        export_name="decovnet-covid",
        export_version="2.1.0-gpu",
    )
    return train(cfg)


def _train_lung_unet(out: Path, device: str, minutes: float, smoke: bool) -> dict:
    from training.train_lung_unet import LungUNetConfig, train

    size = (
        dict(channels="4,8,8,16,16", canvas=64, train_phantoms=2, val_phantoms=1, phantom_size=64, steps=2,
             batch_size=2, val_every=2)
        if smoke
        else dict(steps=100000, batch_size=48, val_every=300, train_phantoms=24, val_phantoms=3)
    )  # fmt: skip
    cfg = LungUNetConfig(**size, max_minutes=minutes, device=device, out_dir=str(out / "lung_unet"))
    return train(cfg)


def _time_detect(out: Path, device: str, smoke: bool) -> dict:
    """``detect`` with each new network on the bundled sample: the stage timings on this device."""
    from napari_wscovid import detect
    from napari_wscovid._sample_data import FALLBACK_KWARGS
    from napari_wscovid.phantom import make_phantom

    if smoke:
        volume = make_phantom("COVID-19", n_slices=12, size=96, seed=1).volume
    else:
        # The bundled sample is this phantom written as DICOM (scripts/make_sample_data.py); the
        # GPU machine has no pydicom, so the very same study is generated rather than read.
        volume = make_phantom(**FALLBACK_KWARGS).volume
    timings = {}
    for name in ("wsnet-3class", "fecnn-covid", "decovnet-covid"):
        # the steps' weights, else the first fold's (a call that trained folds only)
        found = [out / f"{name}.safetensors", *sorted(out.glob(f"*/{name}.safetensors"))]
        weights = next((w for w in found if w.is_file()), None)
        if weights is None:
            continue
        start = time.perf_counter()
        try:
            result = detect(volume, model=str(weights), device=device, saliency="positive")
        except ImportError as exc:  # FeCNN's lesion typing needs scikit-learn, absent on the GPU machine
            timings[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            print(f"detect {name}: skipped ({exc})", flush=True)
            continue
        timings[name] = {
            "total_s": round(time.perf_counter() - start, 3),
            "device": result.device,
            "predicted": result.predicted_class,
            "stages_s": {k: round(v, 3) for k, v in result.timings.items()},
        }
        print(f"detect {name} on {result.device}: {json.dumps(timings[name])}", flush=True)
    return timings


STEPS = tuple(BUDGET_MINUTES)


def _preflight(pack: Path, smoke: bool, holdout: str, steps: tuple[str, ...], folds: tuple[WSNetFold, ...]):
    """Refuse, before any device minute is spent, a run that would fail or mislead half-way.

    A fold's start that is missing (a file of an earlier device run, gone with a fresh checkout)
    would otherwise fail only after the folds before it had trained; a mistyped held-out patient
    would silently train on the patient it is meant to be judged on.
    """
    from napari_wscovid.models.registry import ModelLoadError, load_model

    names = [fold.name for fold in folds]
    if len(set(names)) != len(names):
        raise ValueError(f"--wsnet-fold names must differ (each writes OUT/<name>/): {names}")
    for fold in folds:
        if fold.init is None:
            continue
        try:
            load_model(fold.init, device="cpu", cache=False)
        except (ModelLoadError, KeyError, OSError, ValueError) as err:
            raise ValueError(
                f"--wsnet-fold {fold.name}: its start init={fold.init} cannot be loaded ({err}); "
                "use a registered name (init=wsnet-3class), a file that is here, or init=none"
            ) from err
    if smoke:
        return
    listed = pack / "pack.json"
    patients = set(json.loads(listed.read_text())["patients"]) if listed.is_file() else set()
    if not patients:
        raise ValueError(
            f"{pack} is not a pack (no pack.json): build it with 'python -m training.gpu_run pack'"
        )
    wanted = [holdout] * bool(set(steps) & {"wsnet", "fecnn", "decovnet"}) + [f.holdout for f in folds]
    for ids in wanted:
        unknown = sorted({p.strip() for p in ids.split(",") if p.strip()} - patients)
        if unknown:
            raise ValueError(
                f"held-out patient(s) {unknown} are not in the pack {pack} (it holds {sorted(patients)})"
            )


def run(
    pack: Path | None,
    out: Path,
    *,
    smoke: bool,
    minutes_scale: float,
    holdout: str,
    steps: tuple[str, ...] = STEPS,
    folds: tuple[WSNetFold, ...] = (),
) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if smoke else ("cuda" if torch.cuda.is_available() else "cpu")
    if not smoke and device != "cuda":
        log.warning("no CUDA device: the full run on CPU takes the same minutes but trains far less")
    if pack is None:
        if not smoke:
            raise ValueError("the full run needs --pack (python -m training.gpu_run pack ...)")
        pack = _smoke_pack(out / "smoke_pack")
        holdout = "smokeB"
    if (pack / "site").is_dir():
        sys.path.insert(0, str(pack / "site"))
    _preflight(pack, smoke, holdout, steps, folds)
    budgets = {k: v * minutes_scale for k, v in BUDGET_MINUTES.items()}
    report = {"device": device, "torch": torch.__version__, "budget_min": budgets, "steps": {}}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    for name, step in (
        ("wsnet", lambda m: _train_wsnet(pack, out, device, m, smoke, holdout)),
        ("fecnn", lambda m: _train_fecnn(pack, out, device, m, smoke, holdout)),
        ("decovnet", lambda m: _train_decovnet(pack, out, device, m, smoke, holdout)),
        ("lung_unet", lambda m: _train_lung_unet(out, device, m, smoke)),
    ):
        if name not in steps:
            continue
        start = time.perf_counter()
        summary = step(budgets[name])
        report["steps"][name] = {
            "minutes": round((time.perf_counter() - start) / 60, 2),
            "steps": summary.get("steps"),
            "iterations_per_s": summary.get("iterations_per_s"),
            "export": summary.get("export"),
        }
        print(f"trained {name}: {json.dumps(report['steps'][name], default=str)}", flush=True)
    for fold in folds:
        start = time.perf_counter()
        fold_out = out / fold.name
        fold_holdout = "smokeB" if smoke else fold.holdout
        summary = _train_wsnet(
            pack,
            fold_out,
            device,
            fold.minutes * minutes_scale,
            smoke,
            fold_holdout,
            fold.init,
            fold.version,
            dict(fold.mix),
        )
        report["steps"][f"wsnet:{fold.name}"] = {
            "minutes": round((time.perf_counter() - start) / 60, 2),
            "holdout": fold_holdout,
            "init": fold.init,
            "mix": dict(fold.mix),
            "steps": summary.get("steps"),
            "export": summary.get("export"),
        }
        print(f"trained wsnet {fold.name}: {json.dumps(report['steps'][f'wsnet:{fold.name}'])}", flush=True)
    report["detect"] = _time_detect(out, device, smoke)
    (out / "gpu_run.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_pack = sub.add_parser("pack", help="build the data pack that travels to the device machine")
    p_pack.add_argument("--data", default="../shared/data")
    p_pack.add_argument("--out", default="gpu_pack")
    p_train = sub.add_parser("train", help="train the four networks and time detect")
    p_train.add_argument("--pack", default=None, help="the folder built by 'pack' (not needed with --smoke)")
    p_train.add_argument("--out", required=True, help="where weights, logs and gpu_run.json go ($OUT)")
    p_train.add_argument(
        "--smoke", action="store_true", help="tiny networks on CPU for seconds: the same code"
    )
    p_train.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every step's budget")
    p_train.add_argument("--holdout", default=DEFAULT_HOLDOUT, help="real patients never trained on")
    p_train.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} (default all)"
    )
    p_train.add_argument(
        "--wsnet-fold",
        action="append",
        default=[],
        type=WSNetFold.parse,
        help="an extra WSNet run after the steps: name=...,minutes=...,holdout=A+B[,init=...|none]",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.command == "pack":
        build_pack(args.data, args.out)
        return 0
    pack = Path(args.pack) if args.pack else None
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    run(
        pack,
        Path(args.out),
        smoke=args.smoke,
        minutes_scale=args.minutes_scale,
        holdout=args.holdout,
        steps=steps,
        folds=tuple(args.wsnet_fold),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
