"""Fuzz ``load_ct`` on one DICOM file: every input loads or is refused with a CTLoadError naming it.

Anything else (IndexError, ZeroDivisionError, MemoryError from a lying header, a refusal that does
not say which file) is a finding. Run through ``fuzz/run_all.py`` or directly:
``python fuzz/fuzz_dicom.py fuzz/corpus/dicom fuzz/seeds/dicom -max_total_time=60``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MAX_BYTES, instrumented, main, names_input, scratch_file  # noqa: E402

with instrumented("napari_wscovid", "pydicom"):
    # load_ct imports its readers lazily: import them here so that they are instrumented too
    import napari_wscovid.io.dicom  # noqa: F401
    from napari_wscovid.io import CTLoadError, isolated, load_ct

# GDCM decodes in a child process that is stopped at a time limit; keep a hung decoder's refusal
# inside libFuzzer's -timeout (60 s in run_all), or the refusal itself would count as a hang.
isolated._START_SECONDS = 20.0

NAME = "fuzzed.dcm"


def test_one_input(data: bytes) -> None:
    path = scratch_file(NAME, data)
    try:
        volume = load_ct(path, max_bytes=MAX_BYTES)
    except CTLoadError as exc:
        names_input(exc, NAME, "series ct-")
        return
    # a volume that loads must be one napari can show: 3-D, finite HU and a usable grid
    assert volume.hu.ndim == 3 and volume.hu.size > 0, volume.hu.shape
    assert all(s > 0 for s in volume.spacing), volume.spacing


if __name__ == "__main__":
    main(test_one_input)
