"""Export a training checkpoint (e.g. ``runs/X/best.pt``) as registry safetensors, float16.

The trainer exports by itself at the end of a run; this is for a run that was stopped early or
whose export failed. Run ``python -m training.export_checkpoint --help``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from napari_wscovid.models.registry import architecture_classes
from napari_wscovid.models.wsnet import WSNetConfig
from training import _export

log = logging.getLogger("training.export_checkpoint")


def export_checkpoint(checkpoint, path, *, name: str, version: str) -> str:
    """Write the weights of ``checkpoint`` to ``path``; return the file's SHA-256."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_config = ckpt["model_config"]
    # WSNet, DeCoVNet or FeCNN checkpoints alike: the config names its architecture.
    config_cls, model_cls = architecture_classes(model_config.get("architecture", WSNetConfig.architecture))
    model = model_cls(config_cls.from_dict(model_config))
    model.load_state_dict(ckpt["model"])
    state = ckpt.get("state") or {}
    meta = {
        key: value
        for key, value in (
            ("task", (ckpt.get("config") or {}).get("task")),
            ("best_step", state.get("best_step")),
            ("best_val_acc", state.get("best_acc")),
        )
        if value is not None
    }
    return _export.save_model(model.eval(), path, name=name, version=version, extra_metadata=meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "checkpoint",
        help="a best.pt or last.pt written by training.train_classifier, train_decovnet or train_fecnn",
    )
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--name", required=True, help="model name stored in the file")
    parser.add_argument("--version", default="0.1.0", help="model version stored in the file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sha = export_checkpoint(args.checkpoint, args.output, name=args.name, version=args.version)
    log.info("exported %s sha256 %s", args.output, sha)
    return 0


if __name__ == "__main__":
    sys.exit(main())
