"""Synthetic DICOM builders for the io tests: small 32x32 CT slices written with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def phantom_hu(rows: int = 32, cols: int = 32, value: float = 40.0) -> np.ndarray:
    """Air (-1000 HU) around a soft-tissue disk of ``value`` HU."""
    yy, xx = np.mgrid[:rows, :cols]
    disk = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (min(rows, cols) / 3) ** 2
    return np.where(disk, value, -1000.0)


def ct_dataset(
    *,
    hu: np.ndarray | None = None,
    z: float = 0.0,
    ipp=None,
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    pixel_spacing=(0.7, 0.7),
    series_uid: str = "1.2.3.4",
    sop_uid: str | None = None,
    modality: str | None = "CT",
    sop_class: str = CT_IMAGE_STORAGE,
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = False,
    instance: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **extra,
) -> Dataset:
    """One CT Image Storage dataset whose stored values are (hu - intercept) / slope."""
    hu = phantom_hu() if hu is None else np.asarray(hu, dtype=float)
    stored = np.rint((hu - intercept) / (slope or 1.0))
    pixels = stored.astype(np.int16 if signed else np.uint16)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    if modality is not None:
        ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-12345"
    ds.SeriesDescription = "synthetic"
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if iop is not None:
        ds.ImageOrientationPatient = list(iop)
    position = ipp if ipp is not None else (-10.0, -12.0, z)
    if position is not False:
        ds.ImagePositionPatient = [float(v) for v in position]
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_series(
    folder: Path, n: int = 5, dz: float = 2.0, *, names=None, hu_of=None, **kwargs
) -> list[Path]:
    """``n`` slices at z = k * dz; slice k carries the marker value 100 + k HU in pixel (0, 0)."""
    series_uid = kwargs.pop("series_uid", generate_uid())
    paths = []
    for k in range(n):
        hu = phantom_hu() if hu_of is None else hu_of(k)
        hu[0, 0] = 100 + k
        name = names[k] if names else f"slice{k:03d}.dcm"
        ds = ct_dataset(hu=hu, z=k * dz, series_uid=series_uid, instance=k + 1, **kwargs)
        paths.append(save(ds, folder / name))
    return paths
