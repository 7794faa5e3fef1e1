"""Checkpoints that hold everything a run needs to resume: weights, optimiser, progress, config,
augmentation and torch RNG state. One layout for the WSNet, DeCoVNet and FeCNN trainers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch


def unwrap(model):
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path, model, optimizer, state, cfg, augment=None) -> None:
    """Write ``state`` (the trainer's progress dataclass) and the rest, atomically: a crash never
    leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": dataclasses.asdict(state),
            "config": cfg.to_dict(),
            "model_config": unwrap(model).config.to_dict(),
            "augment": augment.state_dict() if augment is not None else None,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(path, model, optimizer=None, augment=None) -> dict:
    """Restore weights (and optimiser, augmentation and torch RNG) in place; return the saved
    progress fields, for the trainer's own state dataclass."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if augment is not None and ckpt.get("augment"):
        augment.load_state_dict(ckpt["augment"])
    if ckpt.get("torch_rng") is not None:
        torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["state"]


def load_best(net, model, out_dir) -> None:
    """Put the weights of ``out_dir/best.pt`` into ``net``, or ``model``'s current ones when no
    validation kept a checkpoint."""
    best = Path(out_dir) / "best.pt"
    if best.is_file():
        load_checkpoint(best, net)
    else:
        net.load_state_dict(unwrap(model).state_dict())
