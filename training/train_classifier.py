"""Train the multi-scale WSNet slice classifier (Hu et al. 2020, section II.G).

Recipe: Adam (lr 1e-4, betas (0.5, 0.9), eps 1e-8), class-balanced focal loss with gamma 1,
the paper's augmentation, first the per-scale auxiliary classifiers then the joint classifier,
validation every 500 iterations, early stop when the validation loss has not improved for 1000
iterations, and the checkpoint with the best validation accuracy kept and exported.

Run ``python -m training.train_classifier --help``; under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from napari_wscovid.models.wsnet import TASK_CLASSES, WSNet, WSNetConfig, tiny_config
from training import _export
from training.augment import SCANNER_AUGMENT, Augment
from training.checkpoint import load_best, load_checkpoint, save_checkpoint, unwrap
from training.config import (
    ExportedRunOptions,
    TimeBudget,
    augment_seed,
    config_from_args,
    config_parser,
    opt,
    resolve_device,
    run_option,
    seed_torch,
    set_threads,
    setup_logging,
    single_thread_worker,
    write_config,
    write_json,
)
from training.datasets import (
    MEDSEG_CLASS_MAP,
    PhantomSliceDataset,
    SliceImageFolderDataset,
    SliceSet,
    SynthInRealSliceDataset,
    VolumeFolderDataset,
    covid_ct_md_slices,
    infinite_indices,
    run_fold,
    stem_group,
    stream_seed,
)
from training.losses import MultiScaleLoss, class_weights
from training.metrics import classification_report

log = logging.getLogger("training.train_classifier")

#: Half the paper's widths: the same five blocks and three heads at a quarter of the FLOPs, so a
#: CPU run of an hour makes thousands of iterations instead of hundreds.
COMPACT_WIDTHS = (16, 32, 64, 128, 128)


@dataclass
class SynthOptions:
    """Options of the synthetic-lesions-in-real-lungs stream; the slice trainers' configs inherit them."""

    synth_backgrounds: str | None = opt(
        None, "folder of real-lung backgrounds (python -m training.real_backgrounds) to paint lesions into"
    )
    synth_weight: float = opt(3.0, "mixing weight of the synthetic-in-real stream (the others weigh 1)")
    phantom_weight: float = opt(1.0, "mixing weight of the phantom stream")
    synth_pool: int = opt(3, "synthetic-in-real cases kept per class and per loader worker")
    synth_distractors: float = opt(
        0.25, "share of synthetic cases given distractor nodules or a mass (any class)"
    )
    synth_masses: float = opt(0.4, "of the cases with distractors, the share given one tumour-like mass")
    synth_pleural_masses: float = opt(
        0.0, "of the masses, the share centred on the lung's border (against pleura or mediastinum)"
    )
    synth_contrast: float = opt(0.0, "share of synthetic cases on unenhanced lungs given IV contrast")
    synth_refresh: int = opt(96, "draws between replacing one pooled synthetic case (0: never)")
    synth_val_cases: int = opt(4, "synthetic cases per class in the validation set (training backgrounds)")
    synth_test_cases: int = opt(4, "synthetic cases per class in the test set (held-out backgrounds)")
    holdout_patients: str | None = opt(
        None,
        "comma-separated real patient ids never trained on (backgrounds and real slices); with it, "
        "COVID-CT-MD is split by this list instead of by --k-folds, and its held-out patients are the test",
    )


@dataclass
class TrainConfig(SynthOptions, ExportedRunOptions):
    """Everything a run depends on; written as ``config.json`` in ``out_dir``."""

    # task and network
    task: str = opt("3class", f"classes to learn: one of {sorted(TASK_CLASSES)}")
    model: str = opt(
        "full", "'full' (the paper's widths), 'compact' (half the widths, 4x fewer FLOPs) or 'tiny' (tests)"
    )
    input_size: int = opt(224, "side of the network input in pixels (the paper: 224)")
    # optimisation (paper II.G.2)
    iterations: int = opt(20000, "maximum training iterations, both phases together (paper: 20,000)")
    aux_fraction: float = opt(
        0.5, "share of the iterations (and of --max-minutes, whichever ends first) in the auxiliary phase"
    )
    batch_size: int = opt(16, "slices per iteration (over all DDP ranks together)")
    lr: float = opt(1e-4, "Adam learning rate")
    beta1: float = opt(0.5, "Adam beta1")
    beta2: float = opt(0.9, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    warmup: int = opt(0, "linear learning-rate warm-up iterations (the paper uses none)")
    gamma: float = opt(1.0, "focal-loss focusing parameter (eq. 1)")
    joint_aux_weight: float = opt(1.0, "weight of the auxiliary losses during the joint phase")
    augment: bool = opt(True, "the paper's random crop/rotation/flip/contrast augmentation")
    scanner_augment: bool = opt(
        False, "also elastic warps, other scanners' kernels and noise (training.augment.SCANNER_AUGMENT)"
    )
    # validation and stopping
    val_every: int = run_option("val_every", 500)
    select_metric: str = opt(
        "balanced_acc",
        "validation metric of the kept checkpoint: 'balanced_acc' (mean per-class recall; lesion-free "
        "slices make NP the majority, so plain accuracy rewards predicting NP) or 'acc' (the paper)",
    )
    patience: int = opt(
        1000, "stop (or end the aux phase) after this many iterations without a lower val loss"
    )
    # phantom data
    phantom: bool = opt(True, "train on synthetic phantom slices")
    phantom_size: int = opt(256, "in-plane size of generated phantoms (smaller is faster)")
    phantom_slices: int = opt(64, "slices per generated phantom")
    phantom_spacing_z: float = opt(5.0, "slice spacing of generated phantoms in mm")
    phantom_balanced: bool = opt(
        True, "draw phantom slice classes uniformly (else by patient kind: NP-heavy, loss-weighted)"
    )
    phantom_pool: int = opt(4, "phantom volumes kept per class and per loader worker")
    phantom_refresh: int = opt(256, "draws between replacing one pooled phantom (0: never)")
    val_volumes: int = opt(3, "phantom volumes per class in the validation set")
    test_volumes: int = opt(3, "phantom volumes per class in the test set")
    # real data (optional)
    covid_ct_md_root: str | None = opt(None, "COVID-CT-MD folder (Index.csv, sample_data/)")
    volume_csv: str | None = opt(None, "CSV of CT volumes: patient_id,label[,path][,slice_labels]")
    image_root: str | None = opt(None, "folder of 2-D slice images in class folders (UCSD layout)")
    medseg_root: str | None = opt(
        None, "MedSeg/Inf-Net folder holding images/ (all COVID-19), e.g. medseg-infnet/train_doctor_label"
    )
    init: str | None = opt(None, "weights file (safetensors, hash-checked loader) to start from")
    k_folds: int = opt(5, "patient-level folds used to split the real data")
    fold: int = opt(0, "which fold is the test fold (the next one validates)")
    # evaluation, run and export
    eval_batch_size: int = opt(64, "slices per forward pass when evaluating")
    n_boot: int = opt(1000, "bootstrap resamples for the confidence intervals")
    out_dir: str = run_option("out_dir", "runs/wsnet")
    export_name: str = run_option("export_name", "wsnet-3class-phantom")


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision, shared with every rank, so all stop at the same step."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


# ----------------------------------------------------------------------------- data


class _SliceStream(IterableDataset):
    """Endless random draws from a finite :class:`SliceSet`, a different stream per rank/worker."""

    def __init__(self, data: SliceSet, seed: int, rank: int = 0):
        self.data, self.seed, self.rank, self.start_step = data, seed, rank, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for i in infinite_indices(len(self.data), stream_seed(self.seed, worker, self.start_step), self.rank):
            yield self.data[i]


class _Mixture(IterableDataset):
    """Draw from several endless streams with given probabilities."""

    def __init__(self, streams, probs, seed: int, rank: int = 0):
        self.streams, self.probs, self.seed, self.rank = list(streams), np.asarray(probs, float), seed, rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng(stream_seed(self.seed, self.rank, worker, 17))
        its = [iter(s) for s in self.streams]
        while True:
            yield next(its[int(rng.choice(len(its), p=self.probs / self.probs.sum()))])


@dataclass
class Data:
    """Training streams with their mixing weights, and the fixed validation and test sets."""

    streams: list
    probs: list[float]
    class_freq: np.ndarray  # expected class frequencies of the training stream
    val: SliceSet
    tests: dict[str, SliceSet]
    description: list[str]


def _freq(counts) -> np.ndarray:
    counts = np.asarray(counts, float)
    return counts / max(counts.sum(), 1.0)


def build_data(cfg: TrainConfig, classes: tuple[str, ...], info: DistInfo) -> Data:
    """Phantom and real-data sources, split by patient, for one fold."""
    streams, probs, freqs, vals, tests, desc = [], [], [], [], {}, []
    if cfg.phantom:
        common = dict(
            size=cfg.input_size,
            phantom_size=cfg.phantom_size,
            n_slices=cfg.phantom_slices,
            spacing_z=cfg.phantom_spacing_z,
            pool_per_class=cfg.phantom_pool,
        )
        train = PhantomSliceDataset(
            classes,
            refresh_every=cfg.phantom_refresh,
            seed=stream_seed(cfg.seed, 0, cfg.fold),
            rank=info.rank,
            balanced=cfg.phantom_balanced,
            **common,
        )
        val = PhantomSliceDataset(classes, seed=stream_seed(cfg.seed, 1, cfg.fold), **common).fixed_set(
            cfg.val_volumes
        )
        test = PhantomSliceDataset(classes, seed=stream_seed(cfg.seed, 2, cfg.fold), **common).fixed_set(
            cfg.test_volumes
        )
        streams.append(train)
        probs.append(cfg.phantom_weight)
        # The validation phantoms come from the same generator, so their class mix estimates an
        # unbalanced stream's without generating anything twice.
        freqs.append(train.expected_frequencies(val))
        vals.append(val)
        tests["phantom"] = test
        desc.append(
            f"synthetic phantoms ({cfg.phantom_size}x{cfg.phantom_size}x{cfg.phantom_slices}, "
            f"{cfg.phantom_spacing_z:g} mm slices; {'class-balanced' if cfg.phantom_balanced else 'by kind'}"
            f" draws from a pool per worker, refreshed every "
            f"{cfg.phantom_refresh} draws); val {len(val)} slices of {cfg.val_volumes} phantoms/class, "
            f"test {len(test)} slices of {cfg.test_volumes} phantoms/class, disjoint seeds"
        )
    holdout = holdout_set(cfg)
    real = _real_sources(cfg, classes)
    # Each real source's split of this fold, made before the synthetic backgrounds are chosen: a
    # patient a fold tests or validates on must not lend its lungs to that fold's training.
    splits = {name: real_source_split(name, data, cfg, holdout) for name, data in real}
    tested = set(holdout)
    kept_out = set(holdout)
    for name, data in real:
        ids = np.asarray(data.patient_ids)
        test_idx, val_idx = splits[name][1], splits[name][2]
        tested |= set(ids[test_idx].tolist())
        kept_out |= set(ids[test_idx].tolist()) | set(ids[val_idx].tolist())
    if cfg.synth_backgrounds:
        from training.real_backgrounds import load_backgrounds

        every = load_backgrounds(cfg.synth_backgrounds)
        train_bg = [b for b in every if b.patient_id not in kept_out]
        test_bg = [b for b in every if b.patient_id in tested]
        common = dict(size=cfg.input_size, pool_per_class=cfg.synth_pool)
        mix = dict(
            distractor_fraction=cfg.synth_distractors,
            mass_fraction=cfg.synth_masses,
            pleural_mass_fraction=cfg.synth_pleural_masses,
            enhance_fraction=cfg.synth_contrast,
        )
        train = SynthInRealSliceDataset(
            train_bg,
            classes,
            refresh_every=cfg.synth_refresh,
            seed=stream_seed(cfg.seed, 10, cfg.fold),
            rank=info.rank,
            balanced=True,
            synthesis=mix,
            **common,
        )
        # validation draws the training mix; the held-out test keeps synthesize's defaults, so
        # that runs with different mixes are scored on the same kind of cases
        val = SynthInRealSliceDataset(
            train_bg, classes, seed=stream_seed(cfg.seed, 11, cfg.fold), synthesis=mix, **common
        )
        val = val.fixed_set(cfg.synth_val_cases)
        streams.append(train)
        probs.append(cfg.synth_weight)
        freqs.append(train.expected_frequencies())
        vals.append(val)
        names = ", ".join(b.patient_id for b in train_bg)
        desc.append(
            f"synthetic lesions in real lungs of {len(train_bg)} patients ({names}); class-balanced "
            f"draws, weight {cfg.synth_weight:g}; val {len(val)} slices of {cfg.synth_val_cases} cases/class"
        )
        if test_bg:
            test = SynthInRealSliceDataset(
                test_bg, classes, seed=stream_seed(cfg.seed, 12, cfg.fold), **common
            )
            tests["synth-heldout"] = test.fixed_set(cfg.synth_test_cases)
            desc.append(
                "test: synthetic lesions in held-out real lungs ("
                + ", ".join(b.patient_id for b in test_bg)
                + f"), {len(tests['synth-heldout'])} slices"
            )
    for name, data in real:
        train_idx, test_idx, val_idx, note = splits[name]
        if len(train_idx):
            train = data.subset(train_idx)
            streams.append(_SliceStream(train, stream_seed(cfg.seed, 3, cfg.fold), info.rank))
            probs.append(1.0)
            freqs.append(_freq(train.label_counts()))
        if len(val_idx):
            vals.append(data.subset(val_idx))
        if len(test_idx):
            tests[name] = data.subset(test_idx)
        desc.append(f"{name}: {note}")
    if not streams:
        raise ValueError("no training data: enable --phantom or give a real-data root")
    if not vals:
        raise ValueError(
            "no validation data: held-out COVID-CT-MD patients leave it none; add --phantom or "
            "--synth-backgrounds, whose validation cases are drawn apart from the test"
        )
    p = np.asarray(probs) / np.sum(probs)
    class_freq = np.sum([pi * f for pi, f in zip(p, freqs, strict=True)], axis=0)
    return Data(streams, list(p), class_freq, SliceSet.concat(vals), tests, desc)


def _real_sources(cfg: TrainConfig, classes: tuple[str, ...]) -> list[tuple[str, SliceSet]]:
    """The real slice sources a run is given, by name."""
    real = []
    if cfg.covid_ct_md_root:
        real.append(("covid-ct-md", covid_ct_md_slices(cfg.covid_ct_md_root, classes, size=cfg.input_size)))
    if cfg.volume_csv:
        records = VolumeFolderDataset.read_csv(cfg.volume_csv)
        real.append(("volumes", VolumeFolderDataset(records, classes, size=cfg.input_size)))
    if cfg.image_root:
        real.append(("images", SliceImageFolderDataset(cfg.image_root, classes=classes, size=cfg.input_size)))
    if cfg.medseg_root and "COVID-19" in classes:
        medseg = SliceImageFolderDataset(
            cfg.medseg_root, MEDSEG_CLASS_MAP, classes, size=cfg.input_size, group_fn=stem_group
        )
        real.append(("medseg", medseg))
    return real


def real_source_split(name: str, data, cfg: TrainConfig, holdout: set[str]):
    """``(train, test, val, note)`` slice indices of one real source in this fold, by patient.

    COVID-CT-MD with held-out patients: those are its test, the others its training (no
    validation). Otherwise a patient k-fold; a source with fewer patients than folds (COVID-CT-MD's
    sample has 3) is split into as many folds as it has patients, so it still gets a train, a
    validation and a test patient.
    """
    ids = np.asarray(data.patient_ids)
    if holdout and name == "covid-ct-md":
        held = np.isin(ids, sorted(holdout))
        note = f"trained on {sorted(set(ids[~held]))}, held out {sorted(set(ids[held]))}"
        return np.flatnonzero(~held), np.flatnonzero(held), np.array([], dtype=int), note
    fold, k = run_fold(data.patient_ids, data.patient_classes, cfg)
    note = (
        f"{len(set(data.patient_ids))} patients, {len(data)} slices; fold {cfg.fold % k} of "
        f"{k} by patient: train {len(fold.train)}, val {len(fold.val)}, test {len(fold.test)} slices"
    )
    return np.asarray(fold.train), np.asarray(fold.test), np.asarray(fold.val), note


def holdout_set(cfg) -> set[str]:
    """The real patient ids a run must never train on (any trainer's config with ``holdout_patients``)."""
    return {p.strip() for p in (cfg.holdout_patients or "").split(",") if p.strip()}


def make_loader(data: Data, cfg: TrainConfig, info: DistInfo, start_step: int = 0) -> DataLoader:
    """An endless loader of training batches for this rank."""
    for s in data.streams:
        s.start_step = start_step  # a resumed run draws new data rather than replaying the first batches
    stream = (
        data.streams[0] if len(data.streams) == 1 else _Mixture(data.streams, data.probs, cfg.seed, info.rank)
    )
    per_rank = max(1, cfg.batch_size // info.world_size)
    return DataLoader(
        stream,
        batch_size=per_rank,
        num_workers=cfg.num_workers,
        worker_init_fn=single_thread_worker if cfg.num_workers else None,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers else None,
    )


# ----------------------------------------------------------------------------- model, schedule, progress


def build_model(cfg: TrainConfig, classes: tuple[str, ...]) -> WSNet:
    if cfg.model == "tiny":
        return WSNet(tiny_config(classes, input_size=cfg.input_size))
    if cfg.model == "full":
        return WSNet(WSNetConfig(classes=classes, input_size=cfg.input_size))
    if cfg.model == "compact":
        return WSNet(WSNetConfig(classes=classes, widths=COMPACT_WIDTHS, input_size=cfg.input_size))
    raise ValueError(f"model must be 'full', 'compact' or 'tiny', got {cfg.model!r}")


def init_from(model: WSNet, path: str) -> None:
    """Start from the weights in ``path`` (verified loader), which must be the same network."""
    from napari_wscovid.models.registry import load_model

    source, info = load_model(path, device="cpu", cache=False)
    if tuple(getattr(source.config, "classes", ())) != tuple(model.config.classes):
        raise ValueError(
            f"{path}: classes {source.config.classes} differ from the task's {model.config.classes}"
        )
    model.load_state_dict(source.state_dict())
    log.info("initialised from %s (%s %s)", path, info.get("name"), info.get("version"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: optional linear warm-up, then the paper's constant rate."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr


@dataclass
class TrainState:
    """Progress that a resumed run needs besides the weights and the optimiser."""

    step: int = 0
    phase: str = "aux"
    aux_end: int = 0  # first iteration of the joint phase
    best_acc: float = -1.0
    best_step: int = -1
    best_val_loss: float = math.inf
    last_improvement: int = 0  # step of the last lower validation loss (this phase)
    history: list = field(default_factory=list)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model, data: SliceSet, loss_fn: MultiScaleLoss, phase: str, device, batch_size: int = 64
) -> dict:
    """Loss (of ``phase``'s objective), accuracy and probabilities of the summed logits on ``data``."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    probs, losses = [], []
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device, torch.float32)
        y = data.labels[i : i + batch_size].to(device)
        out = net(x)
        losses.append(float(loss_fn(out, y, phase)) * len(y))
        probs.append(torch.softmax(out.logits.float(), 1).cpu())
    net.train(was_training)
    probs = torch.cat(probs).numpy()
    labels = data.labels.numpy()
    hits = probs.argmax(1) == labels
    recalls = [hits[labels == c].mean() for c in np.unique(labels)]
    return {
        "loss": sum(losses) / len(data),
        "acc": float(hits.mean()),
        "balanced_acc": float(np.mean(recalls)),
        "probs": probs,
        "labels": labels,
        "patient_ids": data.patient_ids,
    }


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> dict:
    """Run one training (one fold); returns the summary written to ``metrics.json``."""
    budget = TimeBudget(cfg.max_minutes)
    info = setup_distributed()
    set_threads(cfg.threads)
    device = resolve_device(cfg.device, info.local_rank if info.world_size > 1 else None)
    if cfg.task not in TASK_CLASSES:
        raise ValueError(f"task must be one of {sorted(TASK_CLASSES)}, got {cfg.task!r}")
    classes = tuple(TASK_CLASSES[cfg.task])
    out = Path(cfg.out_dir)
    if info.is_main:
        write_config(cfg)
    seed_torch(cfg.seed, info.rank)

    data = build_data(cfg, classes, info)
    weight = class_weights(data.class_freq)
    log.info(
        "classes %s, expected training frequencies %s, loss weights %s",
        classes,
        np.round(data.class_freq, 3).tolist(),
        np.round(weight.numpy(), 3).tolist(),
    )
    for line in data.description:
        log.info("data: %s", line)

    model = build_model(cfg, classes)
    if cfg.init:
        init_from(model, cfg.init)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    augment = (
        Augment(
            SCANNER_AUGMENT if cfg.scanner_augment else None,
            out_size=cfg.input_size,
            seed=augment_seed(cfg.seed, info.rank),
        )
        if cfg.augment
        else None
    )
    state = TrainState(aux_end=int(round(cfg.aux_fraction * cfg.iterations)))
    if cfg.resume:
        state = TrainState(**load_checkpoint(cfg.resume, model, optimizer, augment))
        log.info("resumed from %s at step %d (phase %s)", cfg.resume, state.step, state.phase)
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = MultiScaleLoss(weight.to(device), gamma=cfg.gamma, aux_weight=cfg.joint_aux_weight)
    loader = make_loader(data, cfg, info, start_step=state.step)
    model.train()

    def validate():
        nonlocal state
        stop = False
        if info.is_main:
            res = evaluate(model, data.val, loss_fn, state.phase, device, cfg.eval_batch_size)
            improved_loss = res["loss"] < state.best_val_loss
            if improved_loss:
                state.best_val_loss, state.last_improvement = res["loss"], state.step
            if res[cfg.select_metric] > state.best_acc:
                state.best_acc, state.best_step = res[cfg.select_metric], state.step
                save_checkpoint(out / "best.pt", model, optimizer, state, cfg, augment)
            state.history.append(
                {
                    "step": state.step,
                    "phase": state.phase,
                    "val_loss": res["loss"],
                    "val_acc": res["acc"],
                    "val_balanced_acc": res["balanced_acc"],
                }
            )
            log.info(
                "step %d [%s] val loss %.4f acc %.4f balanced acc %.4f (best %s %.4f at %d)",
                state.step,
                state.phase,
                res["loss"],
                res["acc"],
                res["balanced_acc"],
                cfg.select_metric,
                state.best_acc,
                state.best_step,
            )
            stop = state.step - state.last_improvement >= cfg.patience
        return _broadcast_flag(stop, info, device)

    it_t0, it_n, timed_out = time.monotonic(), 0, False
    bar = tqdm(
        total=cfg.iterations,
        initial=state.step,
        disable=not info.is_main,
        mininterval=5.0,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="train",
    )
    batches = iter(loader)
    while state.step < cfg.iterations:
        if state.phase == "aux" and (state.step >= state.aux_end or _aux_time_up(cfg, budget, info, device)):
            _enter_joint(state)
            if info.is_main:
                log.info("step %d: joint phase starts", state.step)
        x, y, _ = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg)
        loss = loss_fn(model(x), y, state.phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        it_n += 1
        bar.update(1)
        if state.step % cfg.log_every == 0 and info.is_main:
            rate = it_n / (time.monotonic() - it_t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", phase=state.phase)
            log.info("step %d [%s] loss %.4f  %.3f it/s", state.step, state.phase, loss.item(), rate)
        over_time = budget.spent()
        over_time = _broadcast_flag(over_time, info, device) if info.world_size > 1 else over_time
        if state.step % cfg.val_every == 0 or over_time or state.step == cfg.iterations:
            stop = validate()
            if info.is_main:
                save_checkpoint(out / "last.pt", model, optimizer, state, cfg, augment)
            if over_time:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, state.step)
                timed_out = True
                break
            if stop and state.phase == "aux":
                log.info(
                    "aux phase: no lower val loss for %d iterations; starting the joint phase", cfg.patience
                )
                state.aux_end = state.step
            elif stop:
                log.info(
                    "early stop at step %d: no lower val loss for %d iterations", state.step, cfg.patience
                )
                break
    bar.close()
    rate = it_n / max(time.monotonic() - it_t0, 1e-9)
    summary = {"steps": state.step, "iterations_per_s": rate, "timed_out": timed_out}
    if info.is_main:
        summary.update(finish(cfg, model, data, loss_fn, state, device, classes, rate, budget.elapsed_s()))
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _aux_time_up(cfg: TrainConfig, budget: TimeBudget, info: DistInfo, device) -> bool:
    """With a time budget the aux phase also ends at ``aux_fraction`` of it, so that a run slower
    than planned still trains its joint classifier."""
    if budget.minutes is None:
        return False
    up = budget.spent(cfg.aux_fraction)
    return _broadcast_flag(up, info, device) if info.world_size > 1 else up


def _enter_joint(state: TrainState) -> None:
    # The joint objective differs from the auxiliary one, so its loss history starts afresh.
    state.phase = "joint"
    state.aux_end = state.step
    state.best_val_loss = math.inf
    state.last_improvement = state.step


def test_report(res: dict, classes, cfg, predictions_path: Path):
    """Save one test set's predictions (labels, probabilities, patients) and return its report."""
    np.savez(
        predictions_path,
        labels=res["labels"],
        probs=res["probs"],
        patient_ids=np.asarray(res["patient_ids"]),
    )
    return classification_report(
        res["labels"], res["probs"], classes, patient_ids=res["patient_ids"], n_boot=cfg.n_boot, seed=cfg.seed
    )


def finish(
    cfg, model, data: Data, loss_fn, state: TrainState, device, classes, rate: float, elapsed: float
) -> dict:
    """Test the best checkpoint, export it, and write metrics.json and model_card.md (rank 0)."""
    out = Path(cfg.out_dir)
    net = build_model(cfg, classes)
    load_best(net, model, out)
    net.to(device).eval()
    reports = {}
    for name, test in data.tests.items():
        res = evaluate(net, test, loss_fn, "joint", device, cfg.eval_batch_size)
        reports[name] = test_report(res, classes, cfg, out / f"test_predictions_{name}.npz")
        log.info("test on %s:\n%s", name, reports[name].to_markdown())
    temperature, calibration = calibrate_on(net, data.val, device, cfg.eval_batch_size)
    log.info("temperature %.3f fitted on the validation set: %s", temperature, calibration)
    summary = {
        "task": cfg.task,
        "classes": list(classes),
        "steps": state.step,
        "aux_end": state.aux_end,
        "best_step": state.best_step,
        "best_val_acc": state.best_acc,
        "select_metric": cfg.select_metric,
        "loss_weights": [round(float(w), 4) for w in loss_fn.weight.cpu()]
        if loss_fn.weight is not None
        else None,
        "iterations_per_s": rate,
        "elapsed_min": elapsed / 60,
        "history": state.history,
        "temperature": temperature,
        "calibration": calibration,
        "test": {name: r.to_dict() for name, r in reports.items()},
    }
    path, sha = _export.export_weights(
        net.to("cpu"),
        cfg,
        extra_metadata={
            "training_data": "; ".join(data.description),
            "task": cfg.task,
            "best_step": state.best_step,
            "best_val_acc": state.best_acc,
            "test_overall_acc": {n: r.get("acc")[0] for n, r in reports.items()},
            "temperature": temperature,
        },
    )
    summary["export"] = {"path": str(path), "sha256": sha}
    log.info("exported %s sha256 %s", path, sha)
    write_json(out / "metrics.json", summary)
    (out / "model_card.md").write_text(model_card(cfg, data, summary, reports))
    return summary


@torch.no_grad()
def calibrate_on(net, data: SliceSet, device, batch_size: int = 64) -> tuple[float, dict]:
    """Temperature (see :mod:`training.calibrate`) fitted on ``data``'s summed logits, with the
    validation NLL before and after."""
    from training.calibrate import fit_temperature, nll

    logits = []
    for i in range(0, len(data), batch_size):
        logits.append(net(data.images[i : i + batch_size].to(device, torch.float32)).logits.float().cpu())
    logits = torch.cat(logits).numpy()
    labels = data.labels.numpy()
    temperature = fit_temperature(logits, labels)
    return temperature, {
        "val_nll_before": nll(logits, labels, 1.0),
        "val_nll_after": nll(logits, labels, temperature),
    }


def model_card(cfg: TrainConfig, data: Data, summary: dict, reports: dict) -> str:
    """A short markdown model card: data, recipe, training, test metrics with CIs, export."""
    aug = "centre crop 0.7-1, rotation +-25 deg, h-flip 0.5, contrast 0.5-1.5" if cfg.augment else "none"
    if cfg.augment and cfg.scanner_augment:
        aug += "; elastic warps, blur/unsharp kernels and noise (SCANNER_AUGMENT)"
    budget = f"{cfg.iterations} it" + (f" / {cfg.max_minutes:g} min" if cfg.max_minutes else "")
    lines = [
        f"# {cfg.export_name} {cfg.export_version}",
        "",
        f"WSNet (Hu et al. 2020, multi-scale weakly supervised) slice classifier, task `{cfg.task}`, "
        f"classes {list(summary['classes'])}, input {cfg.input_size}x{cfg.input_size}, "
        f"model size `{cfg.model}`.",
        "",
        "**Not for clinical use.** Research weights; trained on the data below only.",
        "",
        "## Data",
        *[f"- {d}" for d in data.description],
        "- Slice labels: a lesion slice carries its patient's class; a lesion-free lung slice is NP.",
        "",
        "## Recipe",
        f"- Adam lr {cfg.lr:g}, betas ({cfg.beta1:g}, {cfg.beta2:g}), eps {cfg.eps:g}; "
        f"batch {cfg.batch_size}; class-balanced focal loss, gamma {cfg.gamma:g}, inverse-frequency "
        f"class weights {summary['loss_weights']} (1 each when the sampling is already balanced).",
        f"- Phases: per-scale auxiliary classifiers (Conv3/4/5) until step {summary['aux_end']}, then the "
        f"joint classifier (auxiliary losses weighted {cfg.joint_aux_weight:g}).",
        f"- Augmentation: {aug}.",
        f"- Validation every {cfg.val_every} it, early stop after {cfg.patience} it without a lower "
        f"val loss, best val {cfg.select_metric} kept; budget {budget}.",
        f"- Seed {cfg.seed}; full configuration in `config.json`.",
        "",
        "## Training",
        f"- {summary['steps']} iterations in {summary['elapsed_min']:.1f} min "
        f"({summary['iterations_per_s']:.3f} it/s); "
        f"best validation {cfg.select_metric} {summary['best_val_acc']:.4f} at step {summary['best_step']}.",
        "",
        "## Test metrics (best checkpoint)",
    ]
    for name, rep in reports.items():
        lines += ["", f"### {name}", "", rep.to_markdown()]
    exp = summary["export"]
    lines += [
        "",
        "## File",
        "",
        f"- `{exp['path']}` (safetensors, float16)",
        f"- sha256 `{exp['sha256']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point: parse options, configure logging, train."""
    args = config_parser(__doc__, TrainConfig).parse_args(argv)
    cfg = config_from_args(args, TrainConfig)
    setup_logging(args.log_file)
    summary = train(cfg)
    log.info("done: %d steps", summary["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
