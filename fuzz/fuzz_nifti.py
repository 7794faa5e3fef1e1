"""Fuzz ``load_ct`` on NIfTI headers (``.nii`` bytes): load, or a CTLoadError naming the file.

Anything else (an exception from nibabel that escapes, a NaN spacing that reaches napari, a refusal
that does not name the file) is a finding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MAX_BYTES, instrumented, main, names_input, scratch_file  # noqa: E402

with instrumented("napari_wscovid", "nibabel"):
    # load_ct imports its readers lazily: import them here so that they are instrumented too
    import nibabel  # noqa: F401

    import napari_wscovid.io.formats  # noqa: F401
    from napari_wscovid.io import CTLoadError, load_ct

NAME = "fuzzed.nii"


def test_one_input(data: bytes) -> None:
    path = scratch_file(NAME, data)
    try:
        volume = load_ct(path, max_bytes=MAX_BYTES)
    except CTLoadError as exc:
        names_input(exc, NAME)
        return
    assert volume.hu.ndim == 3 and volume.hu.size > 0, volume.hu.shape
    assert np.all(np.isfinite(volume.origin)), volume.origin
    assert np.all(np.isfinite(volume.direction)), volume.direction


if __name__ == "__main__":
    main(test_one_input)
