"""Train FeCNN (Wu et al. 2021, Phys. Med. Biol.) for COVID-19 vs non-COVID slices.

Recipe (paper 4.2): Adam with a constant learning rate, dropout 0.5, batch 10; augmentation
by rotation (0-360 degrees), flips, a 5 % scale shift, brightness (+-50 %) and contrast
(+-30 %); the loss of eq. 5 (cross-entropy of the fused prediction). The fusion weights of
eq. 2 are recomputed from each FPN level's validation error rate (eq. 3) at every validation;
the checkpoint with the best validation metric is kept, tested and exported.

Differences from the paper, and why:

- no ImageNet initialisation (nothing is downloaded, and the input has one channel), so the
  default learning rate is 1e-3 rather than the paper's 1e-5, which suits fine-tuning: in two
  7-8 minute CPU runs on phantoms + COVID-CT-MD + UCSD, 1e-4 had not left chance level after
  900 steps (best validation balanced accuracy 0.52, phantom test AUC 0.45; that run still had
  negative fusion weights, see below) and 1e-3 reached 0.60 at step 1000 (phantom test AUC
  0.64). Neither is a trained model: both numbers are near chance and noisy;
- a level no better than chance gets fusion weight 0 instead of eq. 2's negative weight (see
  ``napari_wscovid.models.fecnn.MAX_ERROR_RATE``);
- eq. 3 needs every level's arg max to be a class prediction, which eq. 5 alone does not train
  (a level's scores only feed the fusion layer); ``--level-loss-weight`` adds each level's own
  cross-entropy (0 gives the paper's loss alone);
- the classes are weighted by inverse frequency when the training stream is unbalanced;
- a rotation by 180 degrees composed with the horizontal flip is the vertical flip, so the
  rotation over the full circle and the horizontal flip cover both flips.

Data: the sources of ``training.train_classifier`` (phantoms, COVID-CT-MD, UCSD images, MedSeg)
built by its ``build_data`` and split by patient. Run ``python -m training.train_fecnn --help``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from napari_wscovid.models.fecnn import LEVELS, FeCNN, FeCNNConfig, resnet18_config, tiny_fecnn_config
from training import _export
from training.augment import Augment, AugmentConfig
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
    write_config,
    write_json,
)
from training.datasets import SliceSet
from training.losses import class_weights
from training.train_classifier import (
    DistInfo,
    SynthOptions,
    TrainConfig,
    TrainState,
    build_data,
    make_loader,
    test_report,
)

log = logging.getLogger("training.train_fecnn")

CLASSES = ("NP", "COVID-19")


@dataclass
class FeCNNTrainConfig(SynthOptions, ExportedRunOptions):
    """Everything a run depends on; written as ``config.json`` in ``out_dir``."""

    # network
    model: str = opt(
        "small",
        "'small' (ResNet-18 layout a quarter as wide, 64-d FPN: CPU), 'resnet18' (the paper's "
        "widths, 256-d FPN) or 'tiny' (tests)",
    )
    input_size: int = opt(224, "side of the network input in pixels (the paper: 512)")
    dropout: float = opt(0.5, "dropout before each level's fully-connected layer (the paper: 0.5)")
    # optimisation (paper 4.2.1)
    iterations: int = opt(20000, "maximum training iterations")
    batch_size: int = opt(10, "slices per iteration (the paper: 10)")
    lr: float = opt(
        1e-3,
        "constant Adam learning rate (the paper: 1e-5 when fine-tuning ImageNet weights; here from scratch)",
    )
    level_loss_weight: float = opt(
        1.0, "weight of the five levels' own cross-entropy beside eq. 5 (0: the paper's loss alone)"
    )
    # augmentation (paper 4.2.3)
    augment: bool = opt(True, "random rotation, flip, scale shift, brightness and contrast")
    rotation_deg: float = opt(180.0, "rotation range +- degrees (the paper: 0-360)")
    scale_shift: float = opt(0.05, "relative zoom range +- (the paper's 'resolution shifting' 0.05)")
    brightness: float = opt(0.5, "brightness factor range +- (the paper: 50 %)")
    contrast: float = opt(0.3, "contrast factor range +- (the paper: 30 %)")
    # validation and stopping
    val_every: int = opt(250, "iterations between validations (and fusion-weight updates)")
    select_metric: str = opt(
        "balanced_acc", "validation metric of the kept checkpoint: 'balanced_acc' or 'acc'"
    )
    patience: int = opt(0, "stop after this many iterations without a better validation metric (0: never)")
    # data: the same sources and options as training.train_classifier
    phantom: bool = opt(True, "train on synthetic phantom slices")
    phantom_size: int = opt(256, "in-plane size of generated phantoms")
    phantom_slices: int = opt(64, "slices per generated phantom")
    phantom_spacing_z: float = opt(5.0, "slice spacing of generated phantoms in mm")
    phantom_balanced: bool = opt(True, "draw phantom slice classes uniformly")
    phantom_pool: int = opt(4, "phantom volumes kept per class and per loader worker")
    phantom_refresh: int = opt(256, "draws between replacing one pooled phantom (0: never)")
    val_volumes: int = opt(3, "phantom volumes per class in the validation set")
    test_volumes: int = opt(3, "phantom volumes per class in the test set")
    covid_ct_md_root: str | None = opt(None, "COVID-CT-MD folder (Index.csv, sample_data/)")
    volume_csv: str | None = opt(None, "CSV of CT volumes: patient_id,label[,path][,slice_labels]")
    image_root: str | None = opt(None, "folder of 2-D slice images in class folders (UCSD layout)")
    medseg_root: str | None = opt(None, "MedSeg/Inf-Net folder holding images/ (all COVID-19)")
    k_folds: int = opt(5, "patient-level folds used to split the real data")
    fold: int = opt(0, "which fold is the test fold (the next one validates)")
    # evaluation, run and export
    eval_batch_size: int = opt(64, "slices per forward pass when evaluating")
    n_boot: int = opt(1000, "bootstrap resamples for the confidence intervals")
    out_dir: str = run_option("out_dir", "runs/fecnn")
    export_name: str = run_option("export_name", "fecnn-covid")


def data_config(cfg: FeCNNTrainConfig) -> TrainConfig:
    """The data options as ``train_classifier``'s config, so its ``build_data``/``make_loader`` serve."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(cfg)}
    shared.discard("model")
    return TrainConfig(**{name: getattr(cfg, name) for name in shared})


def build_model(cfg: FeCNNTrainConfig) -> FeCNN:
    if cfg.model == "tiny":
        config = tiny_fecnn_config(CLASSES, input_size=cfg.input_size)
    elif cfg.model == "resnet18":
        config = resnet18_config(CLASSES, input_size=cfg.input_size)
    elif cfg.model == "small":
        config = FeCNNConfig(classes=CLASSES, input_size=cfg.input_size)
    else:
        raise ValueError(f"model must be 'small', 'resnet18' or 'tiny', got {cfg.model!r}")
    return FeCNN(dataclasses.replace(config, dropout=cfg.dropout))


def make_augment(cfg: FeCNNTrainConfig, seed: int) -> Augment | None:
    if not cfg.augment:
        return None
    config = AugmentConfig(
        scale=(1.0 - cfg.scale_shift, 1.0 + cfg.scale_shift),
        max_rotation_deg=cfg.rotation_deg,
        flip_p=0.5,
        contrast=(1.0 - cfg.contrast, 1.0 + cfg.contrast),
    )
    return Augment(config, out_size=cfg.input_size, seed=seed)


def augment_batch(x: torch.Tensor, augment: Augment, brightness: float) -> torch.Tensor:
    """Rotation, flip, scale and contrast (``Augment``), then a brightness factor per image.

    The brightness factors come from the augmentation's own generator, so a resumed run
    continues the same random sequence.
    """
    x = augment(x)
    if brightness > 0:
        factor = 1.0 + brightness * (2.0 * torch.rand(len(x), generator=augment.generator) - 1.0)
        x = (x * factor.view(-1, 1, 1, 1).to(x)).clamp(0.0, 1.0)
    return x


def fecnn_loss(out, y: torch.Tensor, weight: torch.Tensor | None, level_weight: float) -> torch.Tensor:
    """Eq. 5 on the fused logits, plus ``level_weight`` times the mean of the levels' own losses."""
    loss = F.cross_entropy(out.logits, y, weight=weight)
    if level_weight:
        levels = [F.cross_entropy(out.level_logits[lv], y, weight=weight) for lv in LEVELS]
        loss = loss + level_weight * torch.stack(levels).mean()
    return loss


@torch.no_grad()
def evaluate(net: FeCNN, data: SliceSet, device, batch_size: int = 64, *, set_weights: bool = False) -> dict:
    """Levels' error rates (eq. 3), and accuracy and probabilities of the fused prediction.

    With ``set_weights`` the fusion weights are first set from these error rates (eq. 2) and
    the fused prediction is that of the new weights (the level scores do not depend on them).
    """
    was_training = net.training
    net.eval()
    levels: dict[str, list[torch.Tensor]] = {lv: [] for lv in LEVELS}
    for i in range(0, len(data), batch_size):
        out = net(data.images[i : i + batch_size].to(device, torch.float32))
        for lv in LEVELS:
            levels[lv].append(out.level_logits[lv].float())
    level_logits = {lv: torch.cat(v) for lv, v in levels.items()}
    labels = data.labels.to(device)
    errors = {lv: float((s.argmax(1) != labels).float().mean()) for lv, s in level_logits.items()}
    if set_weights:
        net.set_level_error_rates(errors)
    logits = net.fuse(level_logits)
    net.train(was_training)
    probs = torch.softmax(logits, 1).cpu().numpy()
    y = labels.cpu().numpy()
    hits = probs.argmax(1) == y
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "acc": float(hits.mean()),
        "balanced_acc": float(np.mean([hits[y == c].mean() for c in np.unique(y)])),
        "level_error_rates": errors,
        "level_weights": [float(w) for w in net.level_weights.cpu()],
        "probs": probs,
        "labels": y,
        "patient_ids": data.patient_ids,
    }


def train(cfg: FeCNNTrainConfig) -> dict:
    """Run one training; returns the summary written to ``metrics.json``."""
    budget = TimeBudget(cfg.max_minutes)
    set_threads(cfg.threads)
    info = DistInfo()
    device = resolve_device(cfg.device)
    out = write_config(cfg)
    seed_torch(cfg.seed)

    dcfg = data_config(cfg)
    data = build_data(dcfg, CLASSES, info)
    weight = class_weights(data.class_freq)
    log.info(
        "classes %s, training frequencies %s, loss weights %s",
        CLASSES,
        np.round(data.class_freq, 3).tolist(),
        np.round(weight.numpy(), 3).tolist(),
    )
    for line in data.description:
        log.info("data: %s", line)

    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augment = make_augment(cfg, augment_seed(cfg.seed))
    state = TrainState(phase="fused")
    if cfg.resume:
        state = TrainState(**load_checkpoint(cfg.resume, model, optimizer, augment))
        log.info("resumed from %s at step %d", cfg.resume, state.step)
    weight = weight.to(device)
    loader = make_loader(data, dcfg, info, start_step=state.step)
    log.info(
        "FeCNN %s: %d parameters, fusion weights %s",
        cfg.model,
        sum(p.numel() for p in model.parameters()),
        model.level_weights.tolist(),
    )

    def validate() -> bool:
        res = evaluate(model, data.val, device, cfg.eval_batch_size, set_weights=True)
        if res[cfg.select_metric] > state.best_acc:
            state.best_acc, state.best_step, state.last_improvement = (
                res[cfg.select_metric],
                state.step,
                state.step,
            )
            save_checkpoint(out / "best.pt", model, optimizer, state, cfg, augment)
        state.history.append(
            {
                "step": state.step,
                "val_loss": res["loss"],
                "val_acc": res["acc"],
                "val_balanced_acc": res["balanced_acc"],
                "level_error_rates": res["level_error_rates"],
                "level_weights": res["level_weights"],
            }
        )
        log.info(
            "step %d val loss %.4f acc %.4f balanced acc %.4f; level errors %s -> fusion weights %s "
            "(best %s %.4f at %d)",
            state.step,
            res["loss"],
            res["acc"],
            res["balanced_acc"],
            {k: round(v, 3) for k, v in res["level_error_rates"].items()},
            [round(w, 3) for w in res["level_weights"]],
            cfg.select_metric,
            state.best_acc,
            state.best_step,
        )
        return bool(cfg.patience) and state.step - state.last_improvement >= cfg.patience

    model.train()
    it_t0, it_n, timed_out = time.monotonic(), 0, False
    bar = tqdm(
        total=cfg.iterations,
        initial=state.step,
        mininterval=5.0,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="train",
    )
    batches = iter(loader)
    while state.step < cfg.iterations:
        x, y, _ = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment_batch(x, augment, cfg.brightness)
        loss = fecnn_loss(model(x), y, weight, cfg.level_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        it_n += 1
        bar.update(1)
        if state.step % cfg.log_every == 0:
            rate = it_n / (time.monotonic() - it_t0)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("step %d loss %.4f  %.3f s/step", state.step, loss.item(), 1.0 / rate)
        over_time = budget.spent()
        if state.step % cfg.val_every == 0 or over_time or state.step == cfg.iterations:
            stop = validate()
            save_checkpoint(out / "last.pt", model, optimizer, state, cfg, augment)
            if over_time:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, state.step)
                timed_out = True
                break
            if stop:
                log.info(
                    "early stop at step %d: no better %s for %d iterations",
                    state.step,
                    cfg.select_metric,
                    cfg.patience,
                )
                break
    bar.close()
    seconds_per_step = (time.monotonic() - it_t0) / max(it_n, 1)
    summary = {"steps": state.step, "seconds_per_step": seconds_per_step, "timed_out": timed_out}
    summary.update(finish(cfg, model, data, state, device, seconds_per_step, budget.elapsed_s()))
    return summary


def finish(cfg: FeCNNTrainConfig, model, data, state: TrainState, device, seconds_per_step, elapsed) -> dict:
    """Test the best checkpoint, export it, write metrics.json and model_card.md."""
    out = Path(cfg.out_dir)
    net = build_model(cfg)
    load_best(net, model, out)
    net.to(device).eval()
    reports, test_errors = {}, {}
    for name, test in data.tests.items():
        res = evaluate(net, test, device, cfg.eval_batch_size)
        reports[name] = test_report(res, CLASSES, cfg, out / f"test_predictions_{name}.npz")
        test_errors[name] = res["level_error_rates"]
        log.info(
            "test on %s (level error rates %s):\n%s",
            name,
            {k: round(v, 3) for k, v in res["level_error_rates"].items()},
            reports[name].to_markdown(),
        )
    weights = [float(w) for w in net.level_weights.cpu()]
    val_errors = state.history[-1]["level_error_rates"] if state.history else {}
    for entry in state.history:
        if entry["step"] == state.best_step:
            val_errors = entry["level_error_rates"]
    path, sha = _export.export_weights(
        net.to("cpu"),
        cfg,
        extra_metadata={
            "training_data": "; ".join(data.description),
            "recipe": f"Wu et al. 2021 FeCNN, Adam lr {cfg.lr:g} constant, batch {cfg.batch_size}, "
            f"dropout {cfg.dropout:g}, level loss weight {cfg.level_loss_weight:g}, from scratch",
            "level_val_error_rates": val_errors,
            "level_weights": weights,
            "best_step": state.best_step,
            "best_val_metric": {cfg.select_metric: state.best_acc},
            "test_overall_acc": {n: r.get("acc")[0] for n, r in reports.items()},
        },
    )
    log.info("exported %s sha256 %s", path, sha)
    summary = {
        "classes": list(CLASSES),
        "model": cfg.model,
        "best_step": state.best_step,
        "best_val_metric": state.best_acc,
        "select_metric": cfg.select_metric,
        "level_weights": weights,
        "level_val_error_rates": val_errors,
        "elapsed_min": elapsed / 60,
        "seconds_per_step": seconds_per_step,
        "history": state.history,
        "test": {n: {**r.to_dict(), "level_error_rates": test_errors[n]} for n, r in reports.items()},
        "export": {"path": str(path), "sha256": sha},
    }
    write_json(out / "metrics.json", summary)
    (out / "model_card.md").write_text(model_card(cfg, data, summary, reports))
    return summary


def model_card(cfg: FeCNNTrainConfig, data, summary: dict, reports: dict) -> str:
    augmentation = (
        f"rotation +-{cfg.rotation_deg:g} deg, h-flip, scale +-{cfg.scale_shift:g}, "
        f"brightness +-{cfg.brightness:g}, contrast +-{cfg.contrast:g}"
        if cfg.augment
        else "none"
    )
    lines = [
        f"# {cfg.export_name} {cfg.export_version}",
        "",
        f"FeCNN (Wu et al. 2021) slice classifier {list(CLASSES)}, model `{cfg.model}`, input "
        f"{cfg.input_size}x{cfg.input_size}. **Not for clinical use.**",
        "",
        "## Data",
        *[f"- {d}" for d in data.description],
        "",
        "## Recipe",
        f"- Adam lr {cfg.lr:g} constant, batch {cfg.batch_size}, dropout {cfg.dropout:g}; eq. 5 plus "
        f"{cfg.level_loss_weight:g} x the levels' own cross-entropy; from scratch (no ImageNet weights).",
        f"- Augmentation: {augmentation}.",
        f"- {summary['history'][-1]['step'] if summary['history'] else 0} iterations in "
        f"{summary['elapsed_min']:.1f} min ({summary['seconds_per_step']:.3f} s/step); best validation "
        f"{cfg.select_metric} {summary['best_val_metric']:.4f} at step {summary['best_step']}.",
        f"- Fusion weights (eq. 2) {[round(w, 3) for w in summary['level_weights']]} from the validation "
        f"error rates {summary['level_val_error_rates']} of levels {list(LEVELS)}.",
        "",
        "## Test metrics (best checkpoint)",
    ]
    for name, rep in reports.items():
        lines += ["", f"### {name}", "", rep.to_markdown()]
    lines += [
        "",
        "## File",
        "",
        f"- `{summary['export']['path']}`",
        f"- sha256 `{summary['export']['sha256']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point: parse options, configure logging, train."""
    args = config_parser(__doc__, FeCNNTrainConfig).parse_args(argv)
    cfg = config_from_args(args, FeCNNTrainConfig)
    setup_logging(args.log_file)
    summary = train(cfg)
    log.info("done: %d steps, exported %s", summary["steps"], summary["export"]["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
