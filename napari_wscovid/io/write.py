"""Writers: a CT volume as a DICOM series, or a volume / label mask as NIfTI, MHA or NRRD.

Every file is written to a temporary file in the destination folder and moved into place with
``os.replace``, so a crash or a full disk never leaves a half-written file under the final name,
and an existing file is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import numpy as np

from napari_wscovid.io.atomic import atomic_write

from .volume import CTVolume

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HU_INTERCEPT = -1024.0


def _atomic_write(path: Path, write_to, *, overwrite: bool) -> Path:
    """Create the folder if needed, then write ``path`` atomically (see ``io.atomic``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write_to, overwrite=overwrite)


def _xyz(vector_zyx) -> list[float]:
    return [float(v) for v in np.asarray(vector_zyx, dtype=float)[::-1]]


def write_dicom_series(
    volume: CTVolume,
    folder: str | os.PathLike,
    *,
    patient_name: str = "ANONYMOUS",
    series_description: str = "napari-wscovid",
    compress: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``volume`` as a CT Image Storage series, one file per slice, with new UIDs.

    HU are rounded to integers and stored with RescaleIntercept -1024 (uint16 when every value fits,
    else int16). ``compress=True`` uses RLE Lossless. Returns the written paths in slice order.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    folder = Path(folder)
    n_slices = volume.shape[0]
    paths = [folder / f"slice_{k:04d}.dcm" for k in range(n_slices)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} file(s)); pass overwrite=True")
    direction = np.asarray(volume.direction, dtype=float)
    row_dir, col_dir, slice_dir = _xyz(direction[:, 2]), _xyz(direction[:, 1]), _xyz(direction[:, 0])
    if abs(abs(float(np.dot(np.cross(row_dir, col_dir), slice_dir))) - 1.0) > 1e-4:
        raise ValueError(
            "the slice axis is not perpendicular to the slices (sheared grid); cannot write DICOM"
        )

    intercept = HU_INTERCEPT if volume.is_hu else 0.0
    stored = np.rint(np.asarray(volume.hu, dtype=np.float64) - intercept)
    unsigned = stored.min(initial=0) >= 0 and stored.max(initial=0) <= 65535
    if unsigned:
        pixels = stored.astype(np.uint16)
    else:
        pixels = np.clip(stored, -32768, 32767).astype(np.int16)

    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    for k, path in enumerate(paths):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = patient_name
        ds.PatientID = "ANONYMOUS"
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [round(v, 6) for v in _xyz(volume.index_to_world((k, 0, 0)))]
        ds.ImageOrientationPatient = [round(v, 8) for v in row_dir + col_dir]
        ds.PixelSpacing = [
            round(volume.spacing[1], 6),
            round(volume.spacing[2], 6),
        ]  # [row (dy), column (dx)]
        ds.SliceThickness = round(volume.spacing[0], 6)
        ds.SpacingBetweenSlices = round(volume.spacing[0], 6)
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU" if volume.is_hu else "US"
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        if compress:
            ds.compress(RLELossless, encoding_plugin="pydicom")

        def write_to(temp: Path, ds=ds) -> None:
            pydicom.dcmwrite(temp, ds, enforce_file_format=True)

        _atomic_write(path, write_to, overwrite=overwrite)
    logger.info("wrote %d DICOM slice(s) to %s", n_slices, folder)
    return paths


def write_image(
    volume_or_array: CTVolume | np.ndarray,
    path: str | os.PathLike,
    *,
    like: CTVolume | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a volume, or an array on ``like``'s grid (e.g. a label mask), as NIfTI, MHA or NRRD.

    The format follows the suffix (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``); boolean
    arrays are written as uint8 labels. Geometry is converted from (z, y, x) to SimpleITK's (x, y, z).
    """
    import SimpleITK as sitk

    if isinstance(volume_or_array, CTVolume):
        grid = volume_or_array
        array = volume_or_array.hu
    else:
        if like is None:
            raise ValueError("an array needs like=<CTVolume> to give it a geometry")
        grid = like
        array = np.asarray(volume_or_array)
    if array.shape != grid.shape:
        raise ValueError(f"array shape {array.shape} does not match the geometry's shape {grid.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in grid.spacing[::-1]])
    image.SetOrigin([float(o) for o in grid.origin[::-1]])
    image.SetDirection([float(d) for d in np.asarray(grid.direction)[::-1, ::-1].ravel()])
    path = Path(path)
    if path.name.lower().endswith(".mhd"):
        # a .mhd names its .raw file inside the header, so a renamed temporary would break that link
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        sitk.WriteImage(image, str(path), useCompression=False)
        return path
    return _atomic_write(
        path, lambda temp: sitk.WriteImage(image, str(temp), useCompression=True), overwrite=overwrite
    )
