"""Write the "tiny-test" weights (a WSNet(tiny_config()) with seeded random weights).

Run from the repository root::

    python scripts/make_tiny_test_weights.py

It writes ``napari_wscovid/models/weights/tiny-test.safetensors`` and puts the file's
SHA-256 into ``registry.json``. The weights are random: tests and CI use them to exercise
loading and inference offline; their predictions mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from napari_wscovid.models.registry import REGISTRY_FILE, WEIGHTS_DIR, save_model
from napari_wscovid.models.wsnet import WSNet, tiny_config
from napari_wscovid.preprocess import normalisation_spec

logger = logging.getLogger("make_tiny_test_weights")
NAME = "tiny-test"
SEED = 0


def make_model(seed: int = SEED) -> WSNet:
    """The tiny network with deterministic weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = WSNet(tiny_config())
    # Non-default running statistics so a loader that dropped them would change the output.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    registry = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    entry = registry["models"][NAME]
    path = WEIGHTS_DIR / entry["file"]
    sha = save_model(
        make_model(args.seed),
        path,
        name=NAME,
        version=entry["version"],
        extra_metadata={
            "normalisation": normalisation_spec(entry["normalisation"]),
            "training_data": entry["training_data"],
        },
        overwrite=True,
    )
    entry["sha256"] = sha
    REGISTRY_FILE.write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (%d bytes), sha256 %s", path, path.stat().st_size, sha)


if __name__ == "__main__":
    main()
