"""Add (or update) a bundled weights file's entry in ``models/weights/registry.json``.

The entry is read from the file itself (its SHA-256, architecture, classes, input size,
normalisation, training data and recipe in the safetensors metadata), so nothing is typed by hand:

    python scripts/register_weights.py napari_wscovid/models/weights/wsnet-3class.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_wscovid.io.atomic import atomic_write_text
from napari_wscovid.models.registry import REGISTRY_FILE, WEIGHTS_DIR, file_sha256
from napari_wscovid.preprocess import DEFAULT_WINDOW


def entry_from_file(path: Path) -> tuple[str, dict]:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    config = json.loads(meta["config"])
    normalisation = meta.get("normalisation", "window")
    if normalisation == "window":
        normalisation = {"method": "window", "window": list(DEFAULT_WINDOW)}
    training = meta.get("training_data", "")
    if meta.get("recipe"):
        training = f"{training}. Recipe: {meta['recipe']}"
    return meta["name"], {
        "file": path.name,
        "sha256": file_sha256(path),
        "version": meta.get("version", "unknown"),
        "architecture": config["architecture"],
        "classes": list(config["classes"]),
        "input_size": config.get("input_size"),
        "normalisation": normalisation,
        "training_data": training,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="weights files inside models/weights/")
    args = parser.parse_args(argv)
    registry = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    for path in args.files:
        if path.resolve().parent != WEIGHTS_DIR:
            parser.error(f"{path} is not in {WEIGHTS_DIR}; bundled weights live there")
        name, entry = entry_from_file(path)
        registry["models"][name] = entry
        print(f"{name}: {entry['sha256']}")
    atomic_write_text(REGISTRY_FILE, json.dumps(registry, indent=2) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
