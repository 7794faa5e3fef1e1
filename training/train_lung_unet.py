"""Train the multi-view lung U-Net (Hu et al. 2020, sec. II.C) on synthetic phantoms.

    python -m training.train_lung_unet --out-dir runs/lung_unet --max-minutes 25 --threads 2

The phantoms' exact lung masks include every lesion, so the network learns the shape of
the lung (thoracic cavity minus mediastinum) rather than "dark pixels": exactly what a
threshold cannot see when consolidation touches the chest wall. Slices of all three views
are cut from the same 2 mm isotropic, sliding-window-normalised grid the plugin uses
(:func:`napari_wscovid.lung.unet.to_work_grid`), padded or cropped to a fixed canvas.

Dense lesions (consolidation, nodules) are what the U-Net is for, yet a small share of the
pixels: ``--dense-lesion-weight`` raises their cross-entropy weight and
``--dense-lesion-fraction`` draws that share of each batch from slices that show them.

Augmentation widens the phantom's range towards real scanners: in-plane rotation and
scaling, left-right flips, intensity gain/offset/gamma, blur and noise. The kept weights
are those with the best Dice on held-out phantoms (disjoint seeds); the run ends by
writing ``lung-unet.safetensors`` (channels in its metadata) and ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_wscovid.lung.unet import build_lung_unet, resample_linear, to_work_grid
from napari_wscovid.phantom import LESION_CODES, make_phantom
from training.config import (
    RunOptions,
    TimeBudget,
    config_from_args,
    config_parser,
    opt,
    resolve_device,
    set_threads,
    setup_logging,
    write_config,
    write_json,
)

log = logging.getLogger("training.train_lung_unet")

KINDS = ("NP", "CAP", "COVID-19")
#: Lesions as dense as soft tissue: against the chest wall no threshold separates them from it.
DENSE_LESION_CODES = (LESION_CODES["consolidation"], LESION_CODES["nodule"])


@dataclass
class LungUNetConfig(RunOptions):
    """Everything a run depends on; written as ``config.json`` in ``out_dir``."""

    channels: str = opt("8,16,32,64,128", "feature channels per U-Net level, comma-separated")
    canvas: int = opt(192, "side of the square training canvas in 2 mm pixels (384 mm)")
    train_phantoms: int = opt(72, "phantom volumes in the training pool (kinds in turn)")
    val_phantoms: int = opt(9, "held-out phantom volumes for model selection")
    phantom_size: int = opt(176, "in-plane matrix of generated phantoms (350 mm field of view)")
    min_height_mm: float = opt(170.0, "shortest apex-to-base span of a phantom")
    max_height_mm: float = opt(300.0, "longest apex-to-base span of a phantom")
    steps: int = opt(4000, "maximum optimisation steps")
    batch_size: int = opt(12, "slices per step")
    lr: float = opt(2e-3, "AdamW learning rate (cosine decay to 5% of it)")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    augment: bool = opt(True, "geometric and intensity augmentation")
    # the run options this trainer reads differently
    max_minutes: float | None = opt(None, "wall-clock budget of the optimisation (after building the data)")
    out_dir: str = opt("runs/lung_unet", "folder for config.json, metrics.json and the weights")
    seed: int = opt(0, "seed of phantoms (train seeds 10000+, validation 20000+), sampling and init")
    real_normal: str | None = opt(
        None,
        "comma-separated lesion-free real CTs (DICOM folders or files) whose classical lung mask is "
        "the target: teaches real hila, diaphragm and bowel, which phantoms draw too simply",
    )
    real_fraction: float = opt(0.25, "share of each batch drawn from --real-normal slices")
    init: str | None = opt(None, "lung U-Net safetensors to start from (fine-tuning)")
    dense_lesion_weight: float = opt(
        1.0,
        "cross-entropy weight of phantom lung pixels in consolidation or nodules (1 = like any "
        "pixel): dense lung against the chest wall is what thresholds miss and what the U-Net is for",
    )
    dense_lesion_fraction: float = opt(
        0.0, "share of each phantom batch drawn from slices that show consolidation or nodules"
    )


def phantom_grid(index: int, seed_base: int, cfg: LungUNetConfig) -> tuple[np.ndarray, ...]:
    """One phantom on the U-Net's work grid: normalised CT (float32), lung and dense-lesion masks
    (uint8: a quarter of float32's memory in a pool of ~100 phantoms; :func:`cut` makes them float)."""
    rng = np.random.default_rng(seed_base + index)
    kind = KINDS[index % len(KINDS)]
    height = rng.uniform(cfg.min_height_mm, cfg.max_height_mm)
    spacing_z = float(rng.choice([2.5, 5.0]))
    severity = None if kind == "NP" else float(rng.uniform(0.2, 1.0))
    phantom = make_phantom(
        kind,
        n_slices=max(8, int(round(height / spacing_z))),
        size=cfg.phantom_size,
        spacing=(spacing_z, None, None),
        seed=seed_base + index,
        severity=severity,
    )
    volume = phantom.volume
    work = to_work_grid(volume.hu, volume.spacing)
    mask = resample_linear((phantom.lung_mask > 0).astype(np.float32), work.shape) > 0.5
    dense_lesion = np.isin(phantom.lesion_mask, DENSE_LESION_CODES).astype(np.float32)
    dense = resample_linear(dense_lesion, work.shape) > 0.5
    return work, mask.astype(np.uint8), (dense & mask).astype(np.uint8)


def real_grid(path: str) -> tuple[np.ndarray, ...]:
    """A lesion-free real CT on the work grid, with its classical lung mask as the target."""
    from napari_wscovid.io import load_ct
    from napari_wscovid.lung import segment_lungs

    volume = load_ct(path)
    work = to_work_grid(volume.hu, volume.spacing)
    labels = segment_lungs(volume, method="classical")
    mask = resample_linear((labels > 0).astype(np.float32), work.shape) > 0.5
    return work, mask.astype(np.uint8), np.zeros(work.shape, np.uint8)


def all_slices(grids: list[tuple[np.ndarray, ...]]) -> list[tuple[int, int, int]]:
    """(volume, axis, index) of every slice of every view that shows some lung or is near it."""
    out = []
    for v, (_, mask, _) in enumerate(grids):
        for axis in range(3):
            has_lung = np.moveaxis(mask, axis, 0).any(axis=(1, 2))
            hits = np.flatnonzero(has_lung)
            if hits.size == 0:
                continue
            # A few lung-free slices beyond each end teach the network to say "no lung".
            lo, hi = max(0, hits[0] - 4), min(has_lung.size, hits[-1] + 5)
            out.extend((v, axis, i) for i in range(lo, hi))
    return out


def dense_lesion_slices(grids, items, min_pixels: int = 20) -> list[tuple[int, int, int]]:
    """The items whose slice shows at least ``min_pixels`` of consolidation or nodule."""
    return [(v, axis, i) for v, axis, i in items if np.take(grids[v][2], i, axis=axis).sum() >= min_pixels]


def cut(grids, item, canvas: int, rng: np.random.Generator | None) -> tuple[np.ndarray, ...]:
    """A slice, its lung mask and its dense-lesion mask on a ``canvas`` square (randomly
    shifted when ``rng``)."""
    v, axis, i = item
    planes = [np.take(grid, i, axis=axis) for grid in grids[v]]
    outs = [np.zeros((canvas, canvas), np.float32) for _ in planes]
    src, dst = [], []
    for n in planes[0].shape:
        slack = canvas - n
        if slack >= 0:
            offset = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
            src.append(slice(0, n))
            dst.append(slice(offset, offset + n))
        else:
            offset = int(rng.integers(0, -slack + 1)) if rng is not None else -slack // 2
            src.append(slice(offset, offset + canvas))
            dst.append(slice(0, canvas))
    for plane, out in zip(planes, outs, strict=True):
        out[tuple(dst)] = plane[tuple(src)]
    return tuple(outs)


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """Random rotation (+-12 deg), scale (0.85-1.15), flips, gain/offset/gamma, blur, noise.

    ``y`` holds binary masks (any number of channels); they move with the image.
    """
    n = x.shape[0]

    def uniform(low, high, size=(n,)):
        return low + (high - low) * torch.rand(size, generator=generator)

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.85, 1.15)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    gain = uniform(0.85, 1.15).view(n, 1, 1, 1)
    offset = uniform(-0.08, 0.08).view(n, 1, 1, 1)
    gamma = uniform(0.8, 1.25).view(n, 1, 1, 1)
    x = (x.clamp(0, 1) ** gamma) * gain + offset
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    mix = (torch.rand(n, generator=generator) < 0.3).float().view(n, 1, 1, 1)
    x = mix * blurred + (1 - mix) * x
    x = x + uniform(0.0, 0.03).view(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-0.2, 1.2), y


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the batch (one number): balances the lung against the large background."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    return 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)


@torch.no_grad()
def validate(model, grids, items, canvas: int, device) -> tuple[float, float]:
    """Over every validation slice (axial, coronal, sagittal): the Dice of thresholded
    predictions, and the share of dense-lesion pixels called lung."""
    model.eval()
    inter = total = dense_hit = dense_all = 0.0
    for start in range(0, len(items), 32):
        cuts = [cut(grids, item, canvas, None) for item in items[start : start + 32]]
        x, y, dense = (
            torch.from_numpy(np.stack(planes))[:, None].to(device) for planes in zip(*cuts, strict=True)
        )
        pred = (model(x) > 0).float()
        inter += float((pred * y).sum())
        total += float(pred.sum() + y.sum())
        dense_hit += float((pred * dense).sum())
        dense_all += float(dense.sum())
    model.train()
    return 2 * inter / max(total, 1.0), dense_hit / max(dense_all, 1.0)


def train(cfg: LungUNetConfig) -> dict:
    out = write_config(cfg)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    start = time.perf_counter()
    train_grids = [phantom_grid(i, 10000 + 1000 * cfg.seed, cfg) for i in range(cfg.train_phantoms)]
    val_grids = [phantom_grid(i, 20000 + 1000 * cfg.seed, cfg) for i in range(cfg.val_phantoms)]
    train_items, val_items = all_slices(train_grids), all_slices(val_grids)
    dense_items = dense_lesion_slices(train_grids, train_items)
    log.info(
        "%d train phantoms (%d slices, %d with dense lesions), %d val phantoms (%d slices) built in %.0f s",
        len(train_grids),
        len(train_items),
        len(dense_items),
        len(val_grids),
        len(val_items),
        time.perf_counter() - start,
    )

    real_grids = [real_grid(p) for p in cfg.real_normal.split(",")] if cfg.real_normal else []
    real_items = all_slices(real_grids)
    n_real = int(round(cfg.batch_size * cfg.real_fraction)) if real_items else 0
    n_dense = int(round((cfg.batch_size - n_real) * cfg.dense_lesion_fraction)) if dense_items else 0
    if real_grids:
        log.info(
            "%d real lesion-free CTs (%d slices), %d per batch", len(real_grids), len(real_items), n_real
        )

    channels = tuple(int(c) for c in cfg.channels.split(","))
    model = build_lung_unet(channels, out_channels=1).to(device)
    if cfg.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cfg.init))
        log.info("starting from %s", cfg.init)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = {"dice": -1.0, "step": 0}
    best_state = None
    history = []
    budget = TimeBudget(cfg.max_minutes)
    step = 0
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        picks = rng.integers(0, len(train_items), cfg.batch_size - n_real - n_dense)
        cuts = [cut(train_grids, train_items[p], cfg.canvas, rng) for p in picks]
        cuts += [
            cut(train_grids, dense_items[p], cfg.canvas, rng)
            for p in rng.integers(0, len(dense_items), n_dense)
        ]
        cuts += [
            cut(real_grids, real_items[p], cfg.canvas, rng) for p in rng.integers(0, len(real_items), n_real)
        ]
        x = torch.from_numpy(np.stack([c[0] for c in cuts]))[:, None]
        y = torch.from_numpy(np.stack([np.stack(c[1:]) for c in cuts]))  # (B, 2, H, W): lung, dense lesion
        if cfg.augment:
            x, y = augment_batch(x, y, generator)
        x, y = x.to(device), y.to(device)
        lung, dense = y[:, :1], y[:, 1:]
        logits = model(x)
        weight = 1.0 + (cfg.dense_lesion_weight - 1.0) * dense
        loss = F.binary_cross_entropy_with_logits(logits, lung, weight=weight) + dice_loss(logits, lung)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        elapsed = budget.elapsed_s() / 60
        time_up = budget.spent()
        if step % 50 == 0:
            log.info("step %d loss %.4f lr %.2e (%.1f min)", step, loss.item(), lr, elapsed)
        if step % cfg.val_every == 0 or step == cfg.steps or time_up:
            dice, dense_recall = validate(model, val_grids, val_items, cfg.canvas, device)
            history.append(
                {
                    "step": step,
                    "val_dice": dice,
                    "val_dense_lesion_recall": dense_recall,
                    "loss": loss.item(),
                    "minutes": elapsed,
                }
            )
            log.info(
                "step %d validation Dice %.4f, dense lesion pixels called lung %.3f", step, dice, dense_recall
            )
            if dice > best["dice"]:
                best = {"dice": dice, "step": step}
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if time_up:
            log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
            break

    model.load_state_dict(best_state)
    weights = out / "lung-unet.safetensors"
    save_lung_unet(model, weights, cfg, best, step)
    summary = {"steps": step, "best": best, "history": history, "weights": str(weights)}
    write_json(out / "metrics.json", summary)
    log.info("best validation slice Dice %.4f at step %d; weights %s", best["dice"], best["step"], weights)
    return summary


def save_lung_unet(model, path: Path, cfg: LungUNetConfig, best: dict, steps: int) -> None:
    """Safetensors with what :func:`napari_wscovid.lung.unet.load_lung_unet` rebuilds it from."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "channels": cfg.channels,
        "out_channels": "1",
        "training_data": (
            f"synthetic phantoms: {cfg.train_phantoms} train (seeds {10000 + 1000 * cfg.seed}+), "
            f"{cfg.val_phantoms} validation (seeds {20000 + 1000 * cfg.seed}+), NP/CAP/COVID-19 in turn, "
            f"{cfg.min_height_mm:.0f}-{cfg.max_height_mm:.0f} mm tall, lesion severity 0.2-1"
            + (
                f"; {len(cfg.real_normal.split(','))} lesion-free real CT(s) with classical lung masks as "
                f"targets, {cfg.real_fraction:.0%} of each batch"
                if cfg.real_normal
                else ""
            )
            + (
                f"; dense lesions weighted {cfg.dense_lesion_weight:g}x, "
                f"{cfg.dense_lesion_fraction:.0%} of phantom slices drawn from slices showing them"
                if cfg.dense_lesion_weight != 1.0 or cfg.dense_lesion_fraction > 0
                else ""
            )
            + (f"; fine-tuned from {Path(cfg.init).name}" if cfg.init else "")
        ),
        "selection": f"best validation slice Dice {best['dice']:.4f} at step {best['step']} of {steps}",
    }
    save_file(state, str(path), metadata=metadata)


def main(argv=None) -> int:
    args = config_parser(__doc__, LungUNetConfig).parse_args(argv)
    setup_logging(args.log_file)
    cfg = config_from_args(args, LungUNetConfig)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
