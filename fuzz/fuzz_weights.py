"""Fuzz the weights registry's file check: ``load_model`` on a user's ``.safetensors`` file.

Every input loads or raises ModelLoadError naming the file, before a tensor is used: a header
that lies about sizes, offsets or dtypes, a config that asks for a network the tensors do not
fit, a checksum that does not match. Anything else (a TypeError from a config, a MemoryError from
a config that asks for a huge network, a panic in the Rust parser) is a finding.

A custom mutator edits the JSON header half of the time and fixes its length prefix, so that
mutations reach the config and the tensor table instead of stopping at the first 8 bytes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import instrumented, main, names_input, scratch_file  # noqa: E402

with instrumented("napari_wscovid"):
    import napari_wscovid.models.decovnet  # noqa: F401  (imported lazily by the registry)
    import napari_wscovid.models.fecnn  # noqa: F401
    from napari_wscovid.models.registry import ModelLoadError, load_model

NAME = "fuzzed.safetensors"


def test_one_input(data: bytes) -> None:
    path = scratch_file(NAME, data)
    try:
        model, info = load_model(path, device="cpu", cache=False)
    except ModelLoadError as exc:
        names_input(exc, NAME)
        return
    assert list(info["classes"]) == list(model.config.classes) and info["sha256"]


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    rng = random.Random(seed)
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    room = max_size - (len(data) - size)  # what the header may grow to, the rest kept
    if 0 < size <= len(data) - 8 and room > 0 and rng.random() < 0.5:
        header = atheris.Mutate(data[8 : 8 + size], min(size + 256, room))
        return len(header).to_bytes(8, "little") + header + data[8 + size :]
    return atheris.Mutate(data, max_size)


if __name__ == "__main__":
    main(test_one_input, custom_mutator)
