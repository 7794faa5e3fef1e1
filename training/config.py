"""The run options every trainer shares, the command line built from a config, and run helpers.

A trainer's config is a dataclass of :func:`opt` fields that inherits :class:`RunOptions` (and
:class:`ExportedRunOptions` when it checkpoints, resumes and exports); it redeclares a shared
field with :func:`run_option` where its default differs. :func:`config_parser` gives one flag per
field, the shared ones in their own group, so every trainer spells ``--seed``, ``--device``,
``--threads``, ``--resume`` and ``--export`` alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("training.config")

#: ``stream_seed`` parts of the run-wide random streams (the data streams use others).
INIT_STREAM, AUGMENT_STREAM = 5, 6


def opt(default, help_text):
    """A config field with its default and its ``--help`` text."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class RunOptions:
    """Options of every trainer: where the run writes, its seed, device, threads and budget."""

    out_dir: str = opt("runs/train", "folder for config.json, checkpoints, metrics and the exported weights")
    seed: int = opt(0, "seed of the data streams, augmentation and initialisation")
    device: str = opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    threads: int | None = opt(None, "torch intra-op threads of the training process")
    max_minutes: float | None = opt(
        None,
        "wall-clock budget of this process (a resumed run gets a new one); the run then validates, "
        "tests and exports by itself",
    )
    val_every: int = opt(250, "steps between validations (the best weights are kept)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ExportedRunOptions(RunOptions):
    """Options of the trainers that load data in workers, checkpoint, resume and export."""

    num_workers: int = opt(1, "DataLoader workers generating phantoms beside training (0: in-process)")
    resume: str | None = opt(None, "checkpoint to resume from (e.g. OUT/last.pt)")
    log_every: int = opt(50, "steps between log lines")
    export: str | None = opt(
        None, "where to write the exported safetensors (default OUT/<export_name>.safetensors)"
    )
    export_name: str = opt("model", "model name stored in the exported file")
    export_version: str = opt("0.1.0", "model version stored in the exported file")


_SHARED_FIELDS = {f.name: f for f in dataclasses.fields(ExportedRunOptions)}


def run_option(name: str, default):
    """The shared option ``name`` with a trainer's own default (and the shared help)."""
    return opt(default, _SHARED_FIELDS[name].metadata["help"])


# ----------------------------------------------------------------------------- command line


def _field_type(f):
    text = str(f.type)
    if "bool" in text:
        return bool
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def config_parser(description: str, config_cls: type) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of ``config_cls``, plus ``--log-file``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shared = parser.add_argument_group("run options (every trainer)")
    for f in dataclasses.fields(config_cls):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats it
        group = shared if f.name in _SHARED_FIELDS else parser
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=f.default, help=help_text)
    shared.add_argument("--log-file", default=None, help="also write the log to this file")
    return parser


def config_from_args(args: argparse.Namespace, config_cls: type):
    """The ``config_cls`` that :func:`config_parser`'s options describe."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def read_config(path: str | Path, config_cls: type):
    """A run's ``config.json`` as ``config_cls``; fields this version does not know are ignored."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        log.warning("%s: ignoring fields this version does not know: %s", path, unknown)
    return config_cls(**{k: v for k, v in raw.items() if k in known})


def setup_logging(log_file: str | None) -> None:
    """Log to the terminal and, when given, to ``log_file`` too (entry points only)."""
    handlers = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers
    )


# ----------------------------------------------------------------------------- starting a run


def write_config(cfg, out_dir: str | Path | None = None) -> Path:
    """Create the run's folder (``cfg.out_dir`` unless given) and write ``config.json`` there."""
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads (None or 0 leaves torch's choice)."""
    if threads:
        torch.set_num_threads(threads)


def single_thread_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers generate phantoms with numpy/scipy; one torch thread
    each leaves the cores to training."""
    torch.set_num_threads(1)


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    """``--device`` through the plugin's rule (a CPU fallback is logged); under DDP a CUDA device
    is this process's ``local_rank``."""
    from napari_wscovid.models.registry import select_device

    device, note = select_device(requested)
    if note:
        log.warning("%s", note)
    if device.type == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device


def seed_torch(seed: int, rank: int = 0) -> None:
    """Seed torch's global generator (weight initialisation) for this run and DDP rank."""
    from training.datasets import stream_seed

    torch.manual_seed(stream_seed(seed, INIT_STREAM, rank))


def augment_seed(seed: int, rank: int = 0) -> int:
    """The seed of the run's augmentation generator on this DDP rank."""
    from training.datasets import stream_seed

    return stream_seed(seed, AUGMENT_STREAM, rank)


class TimeBudget:
    """``--max-minutes``: a wall-clock budget counted from creation (None: unlimited)."""

    def __init__(self, minutes: float | None):
        self.minutes, self.start = minutes, time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def spent(self, fraction: float = 1.0) -> bool:
        """Whether ``fraction`` of the budget has passed (never, without a budget)."""
        return self.minutes is not None and self.elapsed_s() / 60 >= fraction * self.minutes


# ----------------------------------------------------------------------------- outputs


def export_path(cfg) -> Path:
    """``--export``, else ``OUT/<export_name>.safetensors``."""
    return Path(cfg.export) if cfg.export else Path(cfg.out_dir) / f"{cfg.export_name}.safetensors"


def jsonable(obj):
    """Dicts, lists and numbers with NaN/inf as None: strict JSON for metrics files."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented strict JSON (see :func:`jsonable`)."""
    Path(path).write_text(json.dumps(jsonable(obj), indent=2))
