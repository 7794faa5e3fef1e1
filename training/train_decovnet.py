"""Train DeCoVNet (Zheng et al. 2020, medRxiv) on patient-level labels.

Recipe of the paper ("Training and Testing Procedures", "Data Augmentation"): Adam with a
constant learning rate of 1e-5, batch size 1 (volumes differ in length), the cross-entropy of
the two softmax outputs (the paper's binary cross-entropy), and online augmentation drawn once
per volume and applied identically to every slice: a random affine map (rotation +-10 deg,
translation +-10 %, scaling +-20 %, shear along the width +-10 deg) and colour jitter (brightness
+-50 %, contrast +-30 %) of the CT channel. The paper trained 100 epochs over 499 volumes (about
50,000 steps) and kept 15 % of the training volumes for validation.

Data: synthetic phantoms (NP and CAP are COVID-negative, COVID-19 is positive), drawn half
positive, half negative from a pool of prepared volumes that is refreshed as it is drawn from;
optionally COVID-CT-MD patients with patient-level labels, split by patient. Validation (ROC AUC)
every ``--val-every`` steps keeps the best checkpoint, which is tested and exported at the end.

Run ``python -m training.train_decovnet --help``. Use a smaller ``--input-height/--input-width``
for an affordable CPU run; the exported network carries that size and the plugin prepares its
input accordingly.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from napari_wscovid.methods.decovnet import prepare_volume
from napari_wscovid.models.decovnet import DECOVNET_CLASSES, DeCoVNet, DeCoVNetConfig, tiny_decovnet_config
from training import _export
from training.checkpoint import load_best, load_checkpoint, save_checkpoint
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
from training.datasets import covid_ct_md_records, patient_kfold, stream_seed

log = logging.getLogger("training.train_decovnet")

POSITIVE_KIND = "COVID-19"
NEGATIVE_KINDS = ("NP", "CAP")
PHANTOM_KINDS = ("NP", "CAP", "COVID-19")


@dataclass
class DeCoVNetTrainConfig(ExportedRunOptions):
    """Everything a run depends on; written as ``config.json`` in ``out_dir``."""

    # network
    model: str = opt("full", "'full' (Table 1's widths) or 'tiny' (tests, CI)")
    input_height: int = opt(192, "in-plane input height (Table 1: 192); smaller is much cheaper")
    input_width: int = opt(288, "in-plane input width (Table 1: 288)")
    # optimisation (the paper's recipe)
    steps: int = opt(50000, "maximum optimiser steps, one volume each (paper: 100 epochs x 499 volumes)")
    lr: float = opt(1e-5, "Adam learning rate, constant (paper: 1e-5)")
    augment: bool = opt(True, "random affine + colour jitter, identical for all slices of a volume")
    # validation (ROC AUC)
    val_every: int = run_option("val_every", 200)
    # phantom data
    phantom: bool = opt(True, "train on synthetic phantom volumes")
    phantom_size: int = opt(256, "in-plane size of generated phantoms")
    phantom_slices_min: int = opt(32, "fewest slices of a generated phantom")
    phantom_slices_max: int = opt(64, "most slices of a generated phantom (lengths vary like patients')")
    phantom_spacing_z: float = opt(5.0, "slice spacing of generated phantoms in mm")
    phantom_pool: int = opt(2, "prepared phantom volumes kept per kind (NP, CAP, COVID-19) and worker")
    phantom_refresh: int = opt(8, "draws between replacing one pooled phantom (0: never)")
    val_volumes: int = opt(4, "phantom volumes per kind in the validation set")
    test_volumes: int = opt(4, "phantom volumes per kind in the test set")
    # synthetic lesions in real lungs (training.synthesis)
    synth_backgrounds: str | None = opt(
        None, "folder of real-lung backgrounds (python -m training.real_backgrounds) to paint lesions into"
    )
    synth_fraction: float = opt(0.75, "share of generated volumes that are synthetic-in-real, not phantoms")
    holdout_patients: str | None = opt(
        None, "comma-separated real background patients never trained on; their cases form the test set"
    )
    # real data (optional)
    covid_ct_md_root: str | None = opt(None, "COVID-CT-MD folder (Index.csv, sample_data/)")
    k_folds: int = opt(5, "patient-level folds of the real data (at most its number of patients)")
    fold: int = opt(0, "which fold is the test fold (the next one validates)")
    real_fraction: float = opt(0.5, "share of training steps on real volumes when both sources are used")
    # run and export
    out_dir: str = run_option("out_dir", "runs/decovnet")
    log_every: int = run_option("log_every", 20)
    export_name: str = run_option("export_name", "decovnet-phantom")


# ----------------------------------------------------------------------------- augmentation


@dataclass
class VolumeAugmentConfig:
    """Ranges of the paper's augmentation (fractions of the image size for the translation)."""

    max_rotation_deg: float = 10.0
    max_translation: float = 0.1
    scale: tuple[float, float] = (0.8, 1.2)
    max_shear_deg: float = 10.0
    brightness: tuple[float, float] = (0.5, 1.5)
    contrast: tuple[float, float] = (0.7, 1.3)


class VolumeAugment:
    """Seeded random affine map and colour jitter, one draw per volume, the same for every slice.

    Works on ``(N, 2, T, H, W)`` tensors (CT, lung mask): both channels move together, the
    colour jitter changes the CT only. Brightness multiplies, contrast scales the deviation from
    the volume's mean (torchvision's definitions); the CT is clipped to [0, 1].
    """

    def __init__(self, config: VolumeAugmentConfig | None = None, seed: int = 0):
        self.config = config or VolumeAugmentConfig()
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=self.generator))

    def theta(self, height: int, width: int) -> torch.Tensor:
        """(2, 3) ``affine_grid`` matrix: output to input coordinates in [-1, 1] (x, y order)."""
        c = self.config
        angle = math.radians(self._uniform(-c.max_rotation_deg, c.max_rotation_deg))
        shear = math.tan(math.radians(self._uniform(-c.max_shear_deg, c.max_shear_deg)))
        scale = self._uniform(*c.scale)
        shift = torch.tensor(
            [
                self._uniform(-1, 1) * c.max_translation * width,
                self._uniform(-1, 1) * c.max_translation * height,
            ]
        )
        rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        forward = rotation @ torch.tensor([[1.0, shear], [0.0, 1.0]]) * scale  # in pixels, centred
        half = torch.tensor([width / 2.0, height / 2.0])
        inverse = torch.linalg.inv(forward)
        # n_in = D^-1 M^-1 (D n_out - t), with D = diag(W/2, H/2) mapping [-1, 1] to pixels.
        matrix = inverse * half[None, :] / half[:, None]
        offset = -(inverse @ shift) / half
        return torch.cat([matrix, offset[:, None]], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"expected (N, 2, T, H, W), got shape {tuple(x.shape)}")
        n, c, t, h, w = x.shape
        out = []
        for volume in x:
            slices = volume.transpose(0, 1)  # (T, 2, H, W): one affine map for every slice
            theta = self.theta(h, w).to(x)[None].expand(t, 2, 3)
            grid = F.affine_grid(theta, [t, c, h, w], align_corners=False)
            moved = F.grid_sample(slices, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            ct = moved[:, 0] * self._uniform(*self.config.brightness)
            mean = ct.mean()
            ct = ((ct - mean) * self._uniform(*self.config.contrast) + mean).clamp(0.0, 1.0)
            out.append(torch.stack([ct, moved[:, 1]], dim=0))
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- data


@dataclass
class VolumeSample:
    """One patient's prepared input and its patient-level label (1 = COVID-19)."""

    x: torch.Tensor  # (2, T, H, W) float16
    label: int
    patient_id: str
    kind: str


def label_of(kind: str) -> int:
    """Patient-level label: 1 for COVID-19, 0 for NP and CAP (COVID-negative)."""
    return int(kind == POSITIVE_KIND)


def phantom_sample(
    kind: str,
    seed: int,
    net_config: DeCoVNetConfig,
    *,
    size: int = 256,
    slices: tuple[int, int] = (32, 64),
    spacing_z: float = 5.0,
    nodules_p: float = 0.3,
    phantom_fn: Callable | None = None,
) -> VolumeSample:
    """Generate one phantom (length drawn in ``slices``) and prepare it like the plugin does."""
    if phantom_fn is None:
        from napari_wscovid.phantom import make_phantom as phantom_fn
    rng = np.random.default_rng(seed)
    n_slices = int(rng.integers(slices[0], slices[1] + 1))
    ph = phantom_fn(
        kind,
        n_slices=n_slices,
        size=size,
        spacing=(spacing_z, None, None),
        seed=int(seed % 2**31),
        nodules=bool(rng.random() < nodules_p),
    )
    x = prepare_volume(ph.volume, ph.lung_mask, net_config)[0].to(torch.float16)
    return VolumeSample(x, label_of(kind), f"phantom-{kind}-{seed}", kind)


class PhantomVolumeStream(IterableDataset):
    """Endless ``(x, label, patient_id)`` draws from a pool of prepared phantom volumes.

    Each worker keeps ``pool_per_kind`` volumes of every kind, draws a positive or a negative
    volume with equal probability (a negative is NP or CAP alike), and every ``refresh_every``
    draws replaces one pooled volume by a new phantom. Each (seed, worker, start step) gets its
    own stream, so a resumed run does not replay the first draws.
    """

    def __init__(
        self,
        net_config: DeCoVNetConfig,
        *,
        pool_per_kind: int = 2,
        refresh_every: int = 8,
        seed: int = 0,
        **phantom_kwargs,
    ):
        self.net_config, self.pool_per_kind, self.refresh_every = net_config, pool_per_kind, refresh_every
        self.seed, self.phantom_kwargs, self.start_step = seed, phantom_kwargs, 0

    def _new(self, kind: str, rng: np.random.Generator) -> VolumeSample:
        return phantom_sample(kind, int(rng.integers(2**62)), self.net_config, **self.phantom_kwargs)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng(stream_seed(self.seed, worker, self.start_step))
        pool = {kind: [self._new(kind, rng) for _ in range(self.pool_per_kind)] for kind in PHANTOM_KINDS}
        draws = 0
        while True:
            positive = rng.random() < 0.5
            kind = POSITIVE_KIND if positive else NEGATIVE_KINDS[int(rng.integers(len(NEGATIVE_KINDS)))]
            sample = pool[kind][int(rng.integers(len(pool[kind])))]
            yield sample.x, sample.label, sample.patient_id
            draws += 1
            if self.refresh_every and draws % self.refresh_every == 0:
                kind = PHANTOM_KINDS[int(rng.integers(len(PHANTOM_KINDS)))]
                pool[kind][int(rng.integers(len(pool[kind])))] = self._new(kind, rng)


def fixed_phantoms(net_config: DeCoVNetConfig, per_kind: int, seed: int, **phantom_kwargs) -> list:
    """A fixed validation or test set: ``per_kind`` phantoms of every kind."""
    rng = np.random.default_rng(stream_seed(seed, 1_000_003))
    return [
        phantom_sample(kind, int(rng.integers(2**62)), net_config, **phantom_kwargs)
        for kind in PHANTOM_KINDS
        for _ in range(per_kind)
    ]


def real_samples(root, net_config: DeCoVNetConfig, load_fn=None, lung_fn=None) -> list[VolumeSample]:
    """Every COVID-CT-MD patient under ``root``, prepared, with its patient-level label."""
    if load_fn is None:
        from napari_wscovid.io import load_ct as load_fn
    if lung_fn is None:
        from napari_wscovid.lung import segment_lungs as lung_fn
    samples = []
    for rec in covid_ct_md_records(root):
        start = time.perf_counter()
        volume = load_fn(str(rec.path))
        lung = np.asarray(lung_fn(volume))
        x = prepare_volume(volume, lung, net_config)[0].to(torch.float16)
        samples.append(VolumeSample(x, label_of(rec.label), rec.patient_id, rec.label))
        log.info(
            "%s (%s): %d slices prepared in %.1f s", rec.patient_id, rec.label, x.shape[1],
            time.perf_counter() - start,
        )  # fmt: skip
    return samples


@dataclass
class Data:
    """Training sources and the fixed validation and test sets."""

    phantom_stream: PhantomVolumeStream | None
    real_train: list
    val: list
    tests: dict[str, list]
    description: list[str]


class SynthOrPhantom:
    """``phantom_fn`` drop-in: a synthetic-in-real case (share ``fraction``) or a phantom.

    The synthetic case keeps its background's own geometry; the phantom geometry arguments then
    do not apply. A plain class (not a closure) so that DataLoader workers can pickle it.
    """

    def __init__(self, backgrounds, fraction: float):
        self.backgrounds, self.fraction = list(backgrounds), float(fraction)

    def __call__(self, kind, *, seed, nodules=False, **phantom_kwargs):
        from napari_wscovid.phantom import make_phantom
        from training.synthesis import synthesize

        rng = np.random.default_rng([seed, 77])
        if self.backgrounds and rng.random() < self.fraction:
            bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
            return synthesize(bg, kind, seed=seed, nodules=nodules)
        return make_phantom(kind, seed=seed, nodules=nodules, **phantom_kwargs)


def _phantom_kwargs(cfg: DeCoVNetTrainConfig, backgrounds=None, fraction: float | None = None) -> dict:
    kwargs = {
        "size": cfg.phantom_size,
        "slices": (cfg.phantom_slices_min, cfg.phantom_slices_max),
        "spacing_z": cfg.phantom_spacing_z,
    }
    if backgrounds:
        kwargs["phantom_fn"] = SynthOrPhantom(
            backgrounds, cfg.synth_fraction if fraction is None else fraction
        )
    return kwargs


def build_data(cfg: DeCoVNetTrainConfig, net_config: DeCoVNetConfig) -> Data:
    """Phantom and real-data sources; the real patients split by patient for one fold."""
    from training.train_classifier import holdout_set

    stream, real_train, val, tests, desc = None, [], [], {}, []
    holdout = holdout_set(cfg)
    # COVID-CT-MD's split of this fold comes first: a patient the fold tests or validates on must
    # not lend its lungs to the fold's synthetic training volumes.
    real = _covid_ct_md_split(cfg, net_config, holdout) if cfg.covid_ct_md_root else None
    tested, kept_out = set(holdout), set(holdout)
    if real is not None:
        tested |= {s.patient_id for s in real[2]}
        kept_out |= {s.patient_id for s in real[1] + real[2]}
    train_bg = []
    if cfg.synth_backgrounds:
        from training.real_backgrounds import load_backgrounds

        # A patient-level label needs a whole volume free of real lesions: the labelled slices
        # of P001 and cap001 would otherwise sit in an "NP" volume.
        every = [b for b in load_backgrounds(cfg.synth_backgrounds) if not b.real_positive.any()]
        train_bg = [b for b in every if b.patient_id not in kept_out]
        test_bg = [b for b in every if b.patient_id in tested]
        if test_bg:
            tests["synth-heldout"] = fixed_phantoms(
                net_config,
                cfg.test_volumes,
                stream_seed(cfg.seed, 12, cfg.fold),
                **_phantom_kwargs(cfg, test_bg, 1.0),
            )
        desc.append(
            f"synthetic lesions in real lungs of {', '.join(b.patient_id for b in train_bg)} "
            f"({cfg.synth_fraction:g} of generated volumes); test: "
            f"{', '.join(b.patient_id for b in test_bg) or 'none'}"
        )
    if cfg.phantom:
        kwargs = _phantom_kwargs(cfg, train_bg)
        stream = PhantomVolumeStream(
            net_config,
            pool_per_kind=cfg.phantom_pool,
            refresh_every=cfg.phantom_refresh,
            seed=stream_seed(cfg.seed, 0, cfg.fold),
            **kwargs,
        )
        val += fixed_phantoms(net_config, cfg.val_volumes, stream_seed(cfg.seed, 1, cfg.fold), **kwargs)
        tests["phantom"] = fixed_phantoms(
            net_config, cfg.test_volumes, stream_seed(cfg.seed, 2, cfg.fold), **kwargs
        )
        desc.append(
            f"synthetic phantoms ({cfg.phantom_size}x{cfg.phantom_size}, {cfg.phantom_slices_min}-"
            f"{cfg.phantom_slices_max} slices of {cfg.phantom_spacing_z:g} mm; NP and CAP negative, COVID-19 "
            f"positive, drawn half positive from a pool of {cfg.phantom_pool} per kind refreshed every "
            f"{cfg.phantom_refresh} draws); val {cfg.val_volumes} and test {cfg.test_volumes} phantoms "
            "per kind, disjoint seeds"
        )
    if real is not None:
        real_train, real_val, real_test, note = real
        val += real_val
        if real_test:
            tests["covid-ct-md"] = real_test
        desc.append(f"COVID-CT-MD: patient-level labels (COVID-19 positive); {note}")
    if stream is None and not real_train:
        raise ValueError("no training data: enable --phantom or give --covid-ct-md-root")
    return Data(stream, real_train, val, tests, desc)


def _covid_ct_md_split(cfg: DeCoVNetTrainConfig, net_config: DeCoVNetConfig, holdout: set[str]):
    """``(train, val, test, note)`` COVID-CT-MD volumes of this fold: the held-out patients are
    the test (no validation) when there are any, else a patient k-fold."""
    samples = real_samples(cfg.covid_ct_md_root, net_config)
    ids = [s.patient_id for s in samples]
    if holdout:
        train = [s for s in samples if s.patient_id not in holdout]
        test = [s for s in samples if s.patient_id in holdout]
        note = (
            f"trained on {sorted({s.patient_id for s in train})}, "
            f"held out {sorted({s.patient_id for s in test})}"
        )
        return train, [], test, note
    k = min(cfg.k_folds, len(set(ids)))
    if k < 3:
        raise ValueError(f"COVID-CT-MD: {len(set(ids))} patients; a train/val/test split needs 3")
    fold = _patient_folds(ids, [s.kind for s in samples], k, cfg.seed)[cfg.fold % k]
    note = (
        f"{len(samples)} patients; fold {cfg.fold % k} of {k} by patient: train {len(fold.train)}, "
        f"val {len(fold.val)}, test {len(fold.test)} patients"
    )
    return (
        [samples[i] for i in fold.train],
        [samples[i] for i in fold.val],
        [samples[i] for i in fold.test],
        note,
    )


def _patient_folds(ids: list[str], kinds: list[str], k: int, seed: int):
    """Patient-level folds stratified by kind, or unstratified when every kind has fewer patients
    than folds (COVID-CT-MD's sample: one patient per kind), which stratification cannot split."""
    try:
        return patient_kfold(ids, kinds, k=k, seed=seed)
    except ValueError as exc:
        if "number of members in each class" not in str(exc):
            raise
        log.warning("too few patients per kind to stratify %d folds; splitting by patient only", k)
        return patient_kfold(ids, ["any"] * len(ids), k=k, seed=seed)


def make_sampler(data: Data, cfg: DeCoVNetTrainConfig, start_step: int = 0):
    """An endless iterator of ``(x (2, T, H, W), label, patient_id)`` training volumes."""
    rng = np.random.default_rng(stream_seed(cfg.seed, 4, start_step))
    phantoms = None
    if data.phantom_stream is not None:
        data.phantom_stream.start_step = start_step
        loader = DataLoader(
            data.phantom_stream,
            batch_size=None,
            num_workers=cfg.num_workers,
            worker_init_fn=single_thread_worker if cfg.num_workers else None,
            prefetch_factor=2 if cfg.num_workers else None,
        )
        phantoms = iter(loader)
    while True:
        if data.real_train and (phantoms is None or rng.random() < cfg.real_fraction):
            s = data.real_train[int(rng.integers(len(data.real_train)))]
            yield s.x, s.label, s.patient_id
        else:
            yield next(phantoms)


# ----------------------------------------------------------------------------- model, checkpoints


def build_model(cfg: DeCoVNetTrainConfig) -> DeCoVNet:
    size = (cfg.input_height, cfg.input_width)
    if cfg.model == "tiny":
        return DeCoVNet(tiny_decovnet_config(DECOVNET_CLASSES, input_size=size))
    if cfg.model == "full":
        return DeCoVNet(DeCoVNetConfig(classes=DECOVNET_CLASSES, input_size=size))
    raise ValueError(f"model must be 'full' or 'tiny', got {cfg.model!r}")


@dataclass
class TrainState:
    """Progress that a resumed run needs besides the weights and the optimiser."""

    step: int = 0
    best_auc: float = -1.0
    best_loss: float = math.inf
    best_step: int = -1
    history: list = field(default_factory=list)


# ----------------------------------------------------------------------------- training


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, augment=None) -> float:
    """One optimiser step on a batch ``x (N, 2, T, H, W)``, ``y (N,)``; returns the loss."""
    if augment is not None:
        x = augment(x)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, samples: Sequence[VolumeSample], device) -> dict:
    """Mean loss, ROC AUC (NaN with one class only) and accuracy at p = 0.5 over whole volumes."""
    from training.metrics import roc_auc

    was_training = model.training
    model.eval()
    probs, losses = [], []
    for s in samples:
        logits = model(s.x[None].to(device, torch.float32))
        losses.append(float(F.cross_entropy(logits, torch.tensor([s.label], device=device))))
        probs.append(float(torch.softmax(logits.float(), 1)[0, 1]))
    model.train(was_training)
    labels = np.array([s.label for s in samples])
    probs = np.array(probs)
    return {
        "loss": float(np.mean(losses)) if losses else math.nan,
        "auc": roc_auc(labels, probs),
        "acc": float(np.mean((probs >= 0.5) == labels)) if len(labels) else math.nan,
        "n": len(samples),
        "probs": probs.tolist(),
        "labels": labels.tolist(),
        "patient_ids": [s.patient_id for s in samples],
    }


def _better(res: dict, state: TrainState) -> bool:
    """Higher validation AUC wins; an equal (or undefined) AUC is decided by the lower loss."""
    auc = res["auc"] if math.isfinite(res["auc"]) else -1.0
    return (auc, -res["loss"]) > (state.best_auc, -state.best_loss)


def train(cfg: DeCoVNetTrainConfig) -> dict:
    """Run one training; returns the summary written to ``metrics.json``."""
    budget = TimeBudget(cfg.max_minutes)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = write_config(cfg)
    seed_torch(cfg.seed)

    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augment = VolumeAugment(seed=augment_seed(cfg.seed)) if cfg.augment else None
    state = TrainState()
    if cfg.resume:
        state = TrainState(**load_checkpoint(cfg.resume, model, optimizer, augment))
        log.info("resumed from %s at step %d", cfg.resume, state.step)
    log.info(
        "DeCoVNet %s, input %dx%d, %d parameters, device %s",
        cfg.model, cfg.input_height, cfg.input_width, sum(p.numel() for p in model.parameters()), device,
    )  # fmt: skip
    data = build_data(cfg, model.config)
    for line in data.description:
        log.info("data: %s", line)
    log.info("data ready after %.1f s", budget.elapsed_s())

    def validate() -> None:
        res = evaluate(model, data.val, device)
        if _better(res, state):
            state.best_auc = res["auc"] if math.isfinite(res["auc"]) else -1.0
            state.best_loss, state.best_step = res["loss"], state.step
            save_checkpoint(out / "best.pt", model, optimizer, state, cfg, augment)
        state.history.append(
            {"step": state.step, "val_loss": res["loss"], "val_auc": res["auc"], "val_acc": res["acc"]}
        )
        log.info(
            "step %d val loss %.4f AUC %.4f acc %.4f (best AUC %.4f at step %d)",
            state.step, res["loss"], res["auc"], res["acc"], state.best_auc, state.best_step,
        )  # fmt: skip

    samples = make_sampler(data, cfg, start_step=state.step)
    bar = tqdm(total=cfg.steps, initial=state.step, mininterval=5.0, file=sys.stderr, desc="train")
    model.train()
    it_t0, it_n, running, timed_out = time.monotonic(), 0, [], False
    while state.step < cfg.steps:
        x, y, _ = next(samples)
        x = x[None].to(device, torch.float32)
        y = torch.tensor([int(y)], device=device)
        running.append(train_step(model, optimizer, x, y, augment))
        state.step += 1
        it_n += 1
        bar.update(1)
        if state.step % cfg.log_every == 0:
            rate = (time.monotonic() - it_t0) / it_n
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            log.info(
                "step %d loss %.4f (mean of %d)  %.2f s/step",
                state.step,
                np.mean(running),
                len(running),
                rate,
            )
            running = []
        over_time = budget.spent()
        if state.step % cfg.val_every == 0 or over_time or state.step == cfg.steps:
            validate()
            save_checkpoint(out / "last.pt", model, optimizer, state, cfg, augment)
            if over_time:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, state.step)
                timed_out = True
                break
    bar.close()
    seconds_per_step = (time.monotonic() - it_t0) / max(it_n, 1)
    summary = {"steps": state.step, "seconds_per_step": seconds_per_step, "timed_out": timed_out}
    summary.update(finish(cfg, model, data, state, device, budget.elapsed_s()))
    return summary


def finish(cfg: DeCoVNetTrainConfig, model, data: Data, state: TrainState, device, elapsed: float) -> dict:
    """Test the best checkpoint, export it, and write metrics.json."""
    out = Path(cfg.out_dir)
    net = build_model(cfg)
    load_best(net, model, out)
    net.to(device).eval()
    tests = {name: evaluate(net, samples, device) for name, samples in data.tests.items()}
    for name, res in tests.items():
        log.info("test on %s: %d volumes, AUC %.4f, acc %.4f", name, res["n"], res["auc"], res["acc"])
    path, sha = _export.export_weights(
        net.to("cpu"),
        cfg,
        extra_metadata={
            "training_data": "; ".join(data.description),
            "recipe": (
                f"Zheng et al. 2020: Adam lr {cfg.lr:g}, batch 1, cross-entropy, augmentation "
                f"{'on' if cfg.augment else 'off'}; {state.step} steps, best val AUC at step "
                f"{state.best_step}"
            ),
            "best_step": state.best_step,
            "best_val_auc": state.best_auc,
            "test_auc": {name: res["auc"] for name, res in tests.items()},
        },
    )
    log.info("exported %s sha256 %s", path, sha)
    summary = {
        "classes": list(DECOVNET_CLASSES),
        "input_size": [cfg.input_height, cfg.input_width],
        "best_step": state.best_step,
        "best_val_auc": state.best_auc,
        "best_val_loss": state.best_loss,
        "elapsed_min": elapsed / 60,
        "history": state.history,
        "test": tests,
        "export": {"path": str(path), "sha256": sha},
    }
    write_json(out / "metrics.json", summary)
    return summary


def main(argv=None) -> int:
    """Command-line entry point: parse options, configure logging, train."""
    args = config_parser(__doc__, DeCoVNetTrainConfig).parse_args(argv)
    cfg = config_from_args(args, DeCoVNetTrainConfig)
    setup_logging(args.log_file)
    summary = train(cfg)
    log.info("done: %d steps, %.2f s/step", summary["steps"], summary["seconds_per_step"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
