"""CT loading and writing without napari or Qt: DICOM folders and files, NIfTI, MHA/MHD, NRRD, PNG/JPG."""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path

from .volume import DEFAULT_MAX_BYTES, CTLoadError, CTVolume, SeriesInfo, pseudonymous_key

# The readers and writers import pydicom, nibabel and SimpleITK; they are loaded when first used,
# so that code needing only CTVolume (phantoms, synthesis, training on a bare GPU machine with
# numpy/scipy/torch alone) does not need them installed.
_LAZY = {
    "scan_dicom": ".dicom",
    "write_dicom_series": ".write",
    "write_image": ".write",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CTLoadError",
    "CTVolume",
    "DEFAULT_MAX_BYTES",
    "SeriesInfo",
    "list_series",
    "load_ct",
    "pseudonymous_key",
    "scan_dicom",
    "write_dicom_series",
    "write_image",
]


def load_ct(
    path: str | os.PathLike,
    series: str | int | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    trusted: bool = False,
) -> CTVolume:
    """Load a CT volume from a DICOM folder or file, NIfTI, MHA/MHD, NRRD or a 2-D PNG/JPG.

    ``series`` picks a series of a DICOM folder by its key or its index in :func:`list_series`;
    by default the largest CT series is loaded and ``volume.warnings`` says so. Arrays are (z, y, x),
    patient LPS, reoriented so index 0 is the most inferior slice. Raises CTLoadError with the file
    or series and the reason when the input cannot be loaded safely.

    Native decoders read user files in a child process (:mod:`.isolated`), so that a damaged file
    cannot crash or exhaust the caller; ``trusted=True`` reads MHA/NRRD and PNG/JPG files in this
    process instead, with the same code (training reads thousands of known pictures).
    """
    from .dicom import load_dicom
    from .formats import format_of, load_2d_image, load_itk, load_nifti

    path = Path(path)
    if not path.exists():
        raise CTLoadError(f"{path.name}: no such file or folder")
    kind = format_of(path)
    if kind != "dicom" and series is not None:
        raise CTLoadError(f"{path.name}: series= applies to DICOM folders only")
    if kind == "nifti":
        return load_nifti(path, max_bytes=max_bytes)
    if kind == "itk":
        return load_itk(path, max_bytes=max_bytes, in_process=trusted)
    if kind == "image":
        return load_2d_image(path, max_bytes=max_bytes, in_process=trusted)
    try:
        return load_dicom(path, series, max_bytes=max_bytes)
    except CTLoadError as exc:
        if (
            path.is_file()
            and path.suffix.lower() not in ("", ".dcm", ".dicom", ".ima")
            and "not a DICOM" in str(exc)
        ):
            raise CTLoadError(
                f"{path.name}: unrecognised format "
                "(supported: DICOM, NIfTI .nii/.nii.gz, MHA/MHD, NRRD, PNG/JPG)"
            ) from exc
        raise


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Series in a DICOM folder, largest CT first, read from headers only (non-CT listed with is_ct=False)."""
    from .dicom import list_dicom_series

    return list_dicom_series(folder)
