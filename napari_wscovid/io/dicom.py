"""DICOM series discovery and loading: headers via pydicom, pixels via pydicom or SimpleITK (GDCM).

Decoders (chosen for licence and coverage, see ``pixel_route``):

* uncompressed, deflated: pydicom + numpy;
* RLE Lossless: pydicom (pylibjpeg-rle when installed, MIT);
* JPEG 2000 / HTJ2K: pydicom + pylibjpeg-openjpeg (MIT), JPEG 2000 falls back to SimpleITK;
* every JPEG and JPEG-LS process (baseline, extended, 6/8, 10/12, lossless 14/SV1, LS): SimpleITK's
  bundled GDCM (Apache-2.0 / BSD). pylibjpeg-libjpeg is GPL-3 and deliberately never used, and
  pydicom's ``gdcm`` plugin is avoided because python-gdcm is not a declared dependency.

No patient identifier is ever read into a message: ``PatientName``, ``PatientID``, birth date and
accession number are not accessed at all. Series are named by ``pseudonymous_key(SeriesInstanceUID)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .formats import PADDING_HU_THRESHOLD, reorient_nearest_identity
from .isolated import Decoding
from .volume import DEFAULT_MAX_BYTES, CTLoadError, CTVolume, SeriesInfo, check_load_size, pseudonymous_key

logger = logging.getLogger(__name__)

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_DATA_TAG = 0x7FE00010

NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
}
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
OPENJPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}
GDCM_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG extended (process 2 and 4)
    "1.2.840.10008.1.2.4.53",  # JPEG spectral selection (process 6 and 8)
    "1.2.840.10008.1.2.4.55",  # JPEG full progression (process 10 and 12)
    "1.2.840.10008.1.2.4.57",  # JPEG lossless (process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
}

# Slices closer than this along the normal are "at the same position" (case 9).
SAME_POSITION_MM = 1e-3
# A step larger than this multiple of the median step is a missing slice (case 15).
GAP_FACTOR = 1.5
# Uniform spacing tolerance (case 16): every slice within max(0.02 mm, 2 % of the spacing) of a
# uniform grid through the first and last slice; beyond it the stack is interpolated.
SPACING_TOLERANCE_MM = 0.02
SPACING_TOLERANCE_REL = 0.02
# In-plane drift of slice origins above this fraction of a pixel is treated as gantry tilt (case 17).
TILT_TOLERANCE_PX = 0.1


@dataclass
class FileHeader:
    """What one DICOM file says about itself, read without pixel data."""

    path: Path
    sop_uid: str
    series_uid: str
    sop_class: str
    modality: str
    transfer_syntax: str
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    bits_allocated: int
    pixel_spacing: tuple[float, float] | None  # (row spacing dy, column spacing dx)
    ipp: np.ndarray | None
    iop: np.ndarray | None
    image_type: tuple[str, ...]
    instance_number: int | None
    slice_location: float | None
    acquisition_number: int | None
    slope: float
    intercept: float
    rescale_present: bool
    padding_value: int | None
    padding_limit: int | None
    spacing_between_slices: float | None
    slice_thickness: float | None
    description: str
    file_size: int
    problem: str | None = None  # set when the header already shows the file cannot be decoded

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_image(self) -> bool:
        return self.rows > 0 and self.cols > 0

    @property
    def is_multiframe(self) -> bool:
        return self.frames > 1 or self.sop_class in (
            "1.2.840.10008.5.1.4.1.1.2.1",
            "1.2.840.10008.5.1.4.1.1.2.2",
        )


@dataclass
class _Group:
    """Files that form one candidate volume (or one non-CT series to list)."""

    series_uid: str
    label: str  # what split this group from others of the same SeriesInstanceUID, or ""
    headers: list[FileHeader]
    is_ct: bool
    key: str = ""
    excluded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class DicomScan:
    """The result of scanning a folder: candidate series and the files that were skipped."""

    groups: list[_Group]
    skipped: list[str]  # "name: reason" for non-DICOM or unreadable files

    @property
    def series(self) -> list[SeriesInfo]:
        return [_series_info(g) for g in self.groups]


# --------------------------------------------------------------------------------------- headers


def _value(ds, keyword, default=None):
    """A header value, or ``default`` when missing or unparsable (never raises)."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # a malformed element must not stop the scan
        return default
    return default if value is None or value == "" else value


def _floats(ds, keyword, count):
    value = _value(ds, keyword)
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return np.asarray(numbers, dtype=float)


def _float(ds, keyword):
    value = _floats(ds, keyword, 1)
    return None if value is None else float(value[0])


def _int(ds, keyword, default=None):
    value = _value(ds, keyword)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """A ``.dcm``/``.ima`` name or the ``DICM`` marker at byte 128 (nothing else is read)."""
    path = str(path)
    if path.lower().endswith((".dcm", ".ima")):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: str | os.PathLike) -> FileHeader:
    """Read one file's header (no pixels, never ``force=True``); raise CTLoadError if not DICOM."""
    path = Path(path)
    try:
        _check_inflated_size(path)
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
            # pydicom rewinds to the start of the Pixel Data element it stopped at
            pixel_offset = handle.tell()
    except CTLoadError:
        raise
    except InvalidDicomError as exc:
        raise CTLoadError(
            f"{path.name}: not a DICOM Part 10 file (no 128-byte preamble with 'DICM' or no File Meta "
            "header). Files without a File Meta header are not read, because guessing their encoding "
            "can silently misread them; re-save it with a File Meta header (e.g. dcmconv) to load it"
        ) from exc
    except Exception as exc:  # truncated or corrupt header; the message may not quote values
        raise CTLoadError(f"{path.name}: unreadable DICOM header ({type(exc).__name__})") from exc
    try:
        return _header_from_dataset(path, ds, pixel_offset)
    except Exception as exc:  # pydicom parses elements lazily: a corrupt one fails only when read here
        raise CTLoadError(f"{path.name}: unreadable DICOM header ({type(exc).__name__})") from exc


#: The most a Deflated Explicit VR file may inflate to. pydicom inflates the whole data set at once,
#: headers-only reads included, and holds it two to three times: a 1 MB file of zeros inflating to
#: 1 GiB took 2.1-3.1 GB (audit). A single CT image inflates to about 0.5 MB.
MAX_INFLATED_BYTES = 512 * 2**20


def _check_inflated_size(path: Path) -> None:
    """Refuse a Deflated Explicit VR file that inflates beyond ``MAX_INFLATED_BYTES``, counted in
    1 MiB steps without keeping them; any other file costs a read of its meta header."""
    import zlib

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        # the deflated stream starts after the preamble, "DICM", the 12-byte group length element
        # and the group it measures
        start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    except Exception:
        return  # no readable meta header, or no group length: dcmread says what is wrong
    if str(meta.get("TransferSyntaxUID", "")) != "1.2.840.10008.1.2.1.99":
        return
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(2**20):
            try:
                data = inflater.decompress(chunk, 2**20)
                while data:
                    inflated += len(data)
                    if inflated > MAX_INFLATED_BYTES:
                        raise CTLoadError(
                            f"{path.name}: its deflated data set inflates to more than "
                            f"{MAX_INFLATED_BYTES // 2**20} MiB, far beyond a CT image; refused"
                        )
                    data = inflater.decompress(inflater.unconsumed_tail, 2**20)
            except zlib.error:
                return  # a damaged stream: pydicom's read names it


def _header_from_dataset(path: Path, ds, pixel_offset: int) -> FileHeader:
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(_value(meta, "TransferSyntaxUID", "")) if meta is not None else ""
    sop_class = str(_value(ds, "SOPClassUID", "") or _value(meta, "MediaStorageSOPClassUID", "") or "")
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is not None and not np.all(spacing > 0):
        spacing = None
    slope = _float(ds, "RescaleSlope")
    intercept = _float(ds, "RescaleIntercept")
    image_type = _value(ds, "ImageType", ())
    image_type = tuple(
        str(t).upper() for t in (image_type if not isinstance(image_type, str) else [image_type])
    )
    padding_value = _int(ds, "PixelPaddingValue")
    padding_limit = _int(ds, "PixelPaddingRangeLimit")
    header = FileHeader(
        path=path,
        sop_uid=str(_value(ds, "SOPInstanceUID", "")),
        series_uid=str(_value(ds, "SeriesInstanceUID", "")),
        sop_class=sop_class,
        modality=str(_value(ds, "Modality", "")).upper(),
        transfer_syntax=transfer_syntax,
        rows=_int(ds, "Rows", 0),
        cols=_int(ds, "Columns", 0),
        frames=max(_int(ds, "NumberOfFrames", 1) or 1, 1),
        samples=_int(ds, "SamplesPerPixel", 1),
        photometric=str(_value(ds, "PhotometricInterpretation", "MONOCHROME2")).upper(),
        bits_allocated=_int(ds, "BitsAllocated", 16),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        ipp=_floats(ds, "ImagePositionPatient", 3),
        iop=_floats(ds, "ImageOrientationPatient", 6),
        image_type=image_type,
        instance_number=_int(ds, "InstanceNumber"),
        slice_location=_float(ds, "SliceLocation"),
        acquisition_number=_int(ds, "AcquisitionNumber"),
        slope=1.0 if slope is None or slope == 0 else slope,
        intercept=0.0 if intercept is None else intercept,
        rescale_present=slope is not None and intercept is not None,
        padding_value=padding_value,
        padding_limit=padding_limit,
        spacing_between_slices=_float(ds, "SpacingBetweenSlices"),
        slice_thickness=_float(ds, "SliceThickness"),
        description=str(_value(ds, "SeriesDescription", "") or _value(ds, "ProtocolName", "")),
        file_size=path.stat().st_size,
    )
    header.problem = _size_problem(header, pixel_offset)
    return header


def _size_problem(h: FileHeader, pixel_offset: int) -> str | None:
    """For uncompressed files, the declared pixel bytes must be in the file (cases 3 and 4)."""
    if not h.is_image or h.transfer_syntax not in NATIVE_SYNTAXES - {"1.2.840.10008.1.2.1.99"}:
        return None
    element_header = 8 if h.transfer_syntax == "1.2.840.10008.1.2" else 12
    available = max(h.file_size - pixel_offset - element_header, 0)
    expected = h.rows * h.cols * h.frames * h.samples * max(h.bits_allocated // 8, 1)
    if expected > available:
        return (
            f"declares {h.rows}x{h.cols}x{h.frames} pixels ({expected:,} bytes) but holds only "
            f"{available:,} bytes of pixel data: truncated or corrupt; refused before allocating memory"
        )
    return None


# ------------------------------------------------------------------------------------- grouping


def _ct_problem(h: FileHeader) -> str | None:
    """Why a file is not a CT image slice for the model, or None (case 7)."""
    if h.sop_class == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR (a directory index, not an image)"
    if not h.is_image:
        return f"no image (modality {h.modality or 'unknown'}, e.g. SR, RTSTRUCT, report)"
    if h.modality and h.modality != "CT":
        return f"modality {h.modality} is not CT"
    if h.sop_class and h.sop_class not in CT_SOP_CLASSES:
        return f"SOP class {h.sop_class} is not a CT image (secondary capture, dose screen, SEG...)"
    if h.samples != 1 or not h.photometric.startswith("MONOCHROME"):
        return f"colour image ({h.photometric}, {h.samples} samples per pixel)"
    if not h.modality and not h.sop_class:
        return "neither Modality nor SOPClassUID says this is CT"
    return None


def _is_localizer(h: FileHeader) -> bool:
    return any(t in ("LOCALIZER", "SCOUT", "TOPOGRAM") for t in h.image_type)


def _geometry_label(h: FileHeader) -> tuple:
    iop = None if h.iop is None else tuple(np.round(h.iop, 3) + 0.0)
    spacing = None if h.pixel_spacing is None else tuple(round(s, 4) for s in h.pixel_spacing)
    return (h.rows, h.cols, spacing, iop, h.is_multiframe)


def _describe_geometry(label: tuple) -> str:
    rows, cols, spacing, iop, multiframe = label
    text = f"{rows}x{cols}"
    if spacing is not None:
        text += f", pixel spacing {spacing[0]:g}x{spacing[1]:g} mm"
    if iop is not None:
        text += f", orientation {list(iop)}"
    return text + (", multi-frame" if multiframe else "")


def group_headers(headers: list[FileHeader]) -> list[_Group]:
    """Group headers by SeriesInstanceUID and geometry; exclude non-CT, scouts and duplicates."""
    seen_sop: dict[str, FileHeader] = {}
    by_series: dict[str, list[FileHeader]] = defaultdict(list)
    non_ct: dict[tuple[str, str], list[tuple[FileHeader, str]]] = defaultdict(list)
    notes: dict[str, list[str]] = defaultdict(list)
    for h in headers:
        if h.sop_uid and h.sop_uid in seen_sop:
            notes[h.series_uid].append(
                f"{h.name}: duplicate of {seen_sop[h.sop_uid].name} (same SOPInstanceUID), ignored"
            )
            continue
        if h.sop_uid:
            seen_sop[h.sop_uid] = h
        reason = _ct_problem(h)
        if reason is not None:
            non_ct[(h.series_uid, h.modality or "?")].append((h, reason))
            continue
        if _is_localizer(h):
            notes[h.series_uid].append(
                f"{h.name}: localizer/scout image ({'/'.join(h.image_type)}), excluded"
            )
            continue
        by_series[h.series_uid].append(h)

    groups: list[_Group] = []
    for series_uid, members in by_series.items():
        by_geometry: dict[tuple, list[FileHeader]] = defaultdict(list)
        for h in members:
            by_geometry[_geometry_label(h)].append(h)
        split = len(by_geometry) > 1
        for label, geometry_members in by_geometry.items():
            for acq_label, acq_members in _split_by_acquisition(geometry_members):
                text = ", ".join(t for t in ((_describe_geometry(label) if split else ""), acq_label) if t)
                group = _Group(series_uid, text, acq_members, is_ct=True)
                group.excluded.extend(notes.get(series_uid, []))
                if split:
                    group.warnings.append(
                        f"series split by geometry into {len(by_geometry)} parts (mixed rows/columns, pixel "
                        "spacing or orientation are never stacked together)"
                    )
                groups.append(group)
    for (series_uid, modality), members in non_ct.items():
        group = _Group(series_uid, f"non-CT {modality}", [h for h, _ in members], is_ct=False)
        group.excluded.extend(f"{h.name}: {reason}" for h, reason in members)
        groups.append(group)
    # Notes about series that lost every file (e.g. a series that is only a scout) still get listed.
    listed = {g.series_uid for g in groups}
    for series_uid, series_notes in notes.items():
        if series_uid not in listed:
            groups.append(_Group(series_uid, "excluded", [], is_ct=False, excluded=list(series_notes)))

    groups.sort(key=lambda g: (not g.is_ct, -_n_images(g), g.series_uid, g.label))
    used: set[str] = set()
    for g in groups:
        key = pseudonymous_key(g.series_uid)
        if key in used:
            key = pseudonymous_key(g.series_uid, g.label)
        g.key = key
        used.add(key)
    return groups


def _split_by_acquisition(members: list[FileHeader]) -> list[tuple[str, list[FileHeader]]]:
    """Slices at the same position from different acquisitions become separate volumes (case 9)."""
    positions = [_position_along_normal(h) for h in members]
    if any(p is None for p in positions) or len(members) < 2:
        return [("", members)]
    order = np.sort(np.asarray(positions))
    if not np.any(np.diff(order) < SAME_POSITION_MM):
        return [("", members)]
    acquisitions: dict[int | None, list[FileHeader]] = defaultdict(list)
    for h in members:
        acquisitions[h.acquisition_number].append(h)
    if len(acquisitions) < 2:
        return [("", members)]  # resolved (identical duplicates) or refused at load time
    return [
        (f"acquisition {number}", hs)
        for number, hs in sorted(acquisitions.items(), key=lambda kv: str(kv[0]))
    ]


def _position_along_normal(h: FileHeader) -> float | None:
    normal = _normal(h.iop)
    if normal is None or h.ipp is None:
        return None
    return float(h.ipp @ normal)


def _normal(iop) -> np.ndarray | None:
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(row @ col) > 1e-3:
        return None
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def _n_images(group: _Group) -> int:
    return sum(h.frames for h in group.headers)


def _series_info(g: _Group) -> SeriesInfo:
    first = g.headers[0] if g.headers else None
    modality = "CT" if g.is_ct else (first.modality if first else "") or "unknown"
    description = (first.description if first else "") + (f" [{g.label}]" if g.label else "")
    return SeriesInfo(
        key=g.key,
        modality=modality,
        n_slices=_n_images(g),
        rows=first.rows if first else 0,
        columns=first.cols if first else 0,
        description=description.strip(),
        files=tuple(str(h.path) for h in g.headers),
        excluded=tuple(g.excluded + [f"{h.name}: {h.problem}" for h in g.headers if h.problem]),
        is_ct=g.is_ct,
        incomplete=any(h.problem for h in g.headers),
    )


# ----------------------------------------------------------------------------------------- scan


def scan_dicom(path: str | os.PathLike) -> DicomScan:
    """Read every file's header under ``path`` (recursively); non-DICOM files are skipped and listed."""
    root = Path(path)
    if root.is_file():
        return DicomScan(group_headers([read_header(root)]), [])
    if not root.is_dir():
        raise CTLoadError(f"{root.name}: no such file or folder")
    headers: list[FileHeader] = []
    skipped: list[str] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            file = Path(folder) / filename
            relative = str(file.relative_to(root))
            if filename.upper() == "DICOMDIR":
                skipped.append(f"{relative}: DICOMDIR index, not an image")
                continue
            try:
                headers.append(read_header(file))
            except CTLoadError as exc:
                # a DICOM file refused for a reason (a deflate bomb, a damaged header) says which
                reason = str(exc).split(": ", 1)[-1]
                skipped.append(f"{relative}: {'not DICOM' if reason.startswith('not a DICOM') else reason}")
            except OSError as exc:
                skipped.append(f"{relative}: unreadable ({type(exc).__name__})")
    if skipped:
        logger.info("skipped %d file(s) under %s: %s", len(skipped), root.name, _short_list(skipped))
    return DicomScan(group_headers(headers), skipped)


def list_dicom_series(path: str | os.PathLike) -> list[SeriesInfo]:
    """Series in a DICOM folder (largest CT first), from headers only."""
    return scan_dicom(path).series


def _short_list(items: list[str], limit: int = 10) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------- pixels


def _pydicom_plugins(transfer_syntax: str) -> tuple[str, ...]:
    try:
        from pydicom.pixels import get_decoder

        return tuple(get_decoder(transfer_syntax).available_plugins)
    except Exception:  # unknown syntax or no decoder class for it
        return ()


def _simpleitk_available() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def _syntax_name(uid: str) -> str:
    try:
        name = pydicom.uid.UID(uid).name
    except Exception:
        name = uid
    return f"{name} ({uid})" if name != uid else uid


def pixel_route(transfer_syntax: str, file_name: str = "") -> tuple[str, str]:
    """Which library decodes a transfer syntax: ("pydicom", plugin) or ("simpleitk", ""); else CTLoadError."""
    where = f"{file_name}: " if file_name else ""
    if transfer_syntax in NATIVE_SYNTAXES:
        return ("pydicom", "")
    if transfer_syntax == RLE_LOSSLESS:
        plugins = _pydicom_plugins(transfer_syntax)
        return ("pydicom", "pylibjpeg" if "pylibjpeg" in plugins else "pydicom")
    if transfer_syntax in OPENJPEG_SYNTAXES:
        if "pylibjpeg" in _pydicom_plugins(transfer_syntax):
            return ("pydicom", "pylibjpeg")
        if transfer_syntax in GDCM_SYNTAXES and _simpleitk_available():
            return ("simpleitk", "")
        raise CTLoadError(
            f"{where}no decoder installed for transfer syntax {_syntax_name(transfer_syntax)}; "
            "install pylibjpeg and pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)"
        )
    if transfer_syntax in GDCM_SYNTAXES:
        if _simpleitk_available():
            return ("simpleitk", "")
        raise CTLoadError(
            f"{where}no decoder installed for transfer syntax {_syntax_name(transfer_syntax)}; "
            "install SimpleITK (pip install SimpleITK), whose bundled GDCM decodes all JPEG processes"
        )
    raise CTLoadError(
        f"{where}no decoder available for transfer syntax {_syntax_name(transfer_syntax or 'missing')}: "
        "napari-wscovid decodes uncompressed, RLE, JPEG, JPEG-LS, JPEG 2000 and HTJ2K (packages pydicom, "
        "pylibjpeg-rle, pylibjpeg-openjpeg, SimpleITK); convert the file to an uncompressed transfer "
        "syntax (e.g. gdcmconv --raw or dcmdjpeg)"
    )


def _padding_mask(raw: np.ndarray, h: FileHeader) -> np.ndarray | None:
    """True where stored values equal PixelPaddingValue or lie in its range (case 26)."""
    if h.padding_value is None:
        return None
    if h.padding_limit is None:
        return raw == h.padding_value
    low, high = sorted((h.padding_value, h.padding_limit))
    return (raw >= low) & (raw <= high)


def decoding_child(h: FileHeader) -> tuple[str, str] | None:
    """The child-process task (:mod:`.isolated`) and pydicom plugin that decode a file's pixels,
    or None for uncompressed pixels, which numpy reads here.

    Every compressed syntax goes to a child: GDCM (JPEG, JPEG-LS) took gigabytes on 1 kB files
    and crashed on one (fuzzing), and an audit of pylibjpeg-openjpeg found a JPEG 2000 palette box
    writing past its buffer (heap corruption), codestreams whose tile and component counts took
    1-4 GB, and a JP2 box of length 0 on which pydicom's header parser loops forever.
    """
    library, plugin = pixel_route(h.transfer_syntax, h.name)
    if library == "simpleitk":
        return ("gdcm", "")
    if h.transfer_syntax in NATIVE_SYNTAXES:
        return None
    return ("pydicom", plugin)


@contextlib.contextmanager
def decoded_in_children(headers: Sequence[FileHeader]):
    """``{path: decoding}`` for the files among ``headers`` whose pixels a child decodes (one
    batch per task and plugin, children sharing the cores); their files go on leaving the block."""
    batches: dict[tuple[str, str], list[FileHeader]] = defaultdict(list)
    for h in headers:
        route = decoding_child(h)
        if route is not None:
            batches[route].append(h)
    with contextlib.ExitStack() as stack:
        by_path = {}
        for (task, plugin), batch in batches.items():
            files = [(h.path, _decoded_bytes(h)) for h in batch]
            decoding = stack.enter_context(Decoding(task, files, plugin=plugin))
            by_path.update(dict.fromkeys((h.path for h in batch), decoding))
        yield by_path


def decode_file(h: FileHeader, decoded: Mapping | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one file to (HU float32 (frames, rows, cols), padding mask or None).

    Compressed pixels are decoded in a child process (:func:`decoding_child`): pass the series'
    ``decoded`` (from :func:`decoded_in_children`), or the file gets a child of its own.
    """
    route = decoding_child(h)
    if route is None:
        raw = np.asarray(pydicom.dcmread(h.path).pixel_array)
    elif decoded is not None and h.path in decoded:
        raw = decoded[h.path].result(h.path).pixels  # a memory map, converted (copied) below
    else:
        with decoded_in_children([h]) as own:
            raw = np.array(own[h.path].result(h.path).pixels)
    if route is None or route[0] == "pydicom":
        raw = raw.reshape((h.frames, *raw.shape[-2:])) if raw.ndim in (2, 3) else raw
        mask = _padding_mask(raw, h)
        hu = raw.astype(np.float32) * np.float32(h.slope) + np.float32(h.intercept)
    else:
        # GDCM already applies RescaleSlope/Intercept; stored values are recovered for the padding test.
        hu = raw.astype(np.float32).reshape((-1, *raw.shape[-2:]))
        mask = None
        if h.padding_value is not None:
            mask = _padding_mask(np.rint((hu - h.intercept) / h.slope).astype(np.int64), h)
    if hu.shape != (h.frames, h.rows, h.cols):
        raise CTLoadError(
            f"{h.name}: decoded pixels have shape {hu.shape[1:]} but the header says {h.rows}x{h.cols}"
        )
    return hu, mask


_FILE_META_KEPT = (
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
    "TransferSyntaxUID",
    "ImplementationClassUID",
)


def _decoded_bytes(h: FileHeader) -> int:
    """What a file's pixels take decoded, as float64: the child's memory ceiling scales with it."""
    return max(h.frames, 1) * h.rows * h.cols * max(h.samples, 1) * 8


def _read_with_gdcm(path: Path):
    """The file as a SimpleITK image, read by GDCM from a copy that pydicom re-wrote (run in the
    ``isolated`` process, never in the viewer's).

    GDCM trusts element lengths that pydicom checks: a stray element after the pixel data of a 1 kB
    file made it allocate 2 to 3.6 GB, and an element of unknown VR in the file meta header 740 MB
    that it never gave back (found by fuzzing). The copy holds what pydicom parsed, in order,
    without what decoding never needs: elements after the pixel data, private elements, and any
    file meta element but the four that name the object and its encoding.
    """
    import tempfile

    import SimpleITK as sitk

    name = path.name
    try:
        # Values above 1 MiB are read when used, not when parsed: an element after the pixel data that
        # claims gigabytes is then dropped unread instead of meeting the child's memory ceiling.
        ds = pydicom.dcmread(path, defer_size=2**20)
        for tag in [t for t in ds.keys() if t > PIXEL_DATA_TAG or t.is_private]:
            del ds[tag]
        meta = pydicom.dataset.FileMetaDataset()
        for keyword in _FILE_META_KEPT:
            if keyword in ds.file_meta:
                setattr(meta, keyword, ds.file_meta[keyword].value)
        ds.file_meta = meta
        if ds.file_meta.get("TransferSyntaxUID") and ds.file_meta.TransferSyntaxUID.is_encapsulated:
            _check_encapsulated(ds, name)
        with tempfile.TemporaryDirectory(prefix="wscovid-gdcm-") as folder:
            copy = Path(folder) / "copy.dcm"
            ds.save_as(copy, enforce_file_format=True)
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")  # not every ITK reader probing the file in turn
            reader.SetFileName(str(copy))
            return reader.Execute()
    except CTLoadError:
        raise
    except MemoryError as exc:  # above the child's memory ceiling: a header that lies about sizes
        raise CTLoadError(
            f"{name}: decoding asked for far more memory than an image of this size needs; damaged file"
        ) from exc
    except Exception as exc:  # pydicom could not parse or re-write it, or GDCM could not decode it
        raise CTLoadError(f"{name}: {_decode_error_text(exc)}") from exc


#: Transfer syntaxes whose frames are JPEG or JPEG-LS codestreams (start with SOI, FF D8).
_JPEG_SYNTAXES = frozenset((*pydicom.uid.JPEGTransferSyntaxes, *pydicom.uid.JPEGLSTransferSyntaxes))
#: JPEG and JPEG-LS start-of-frame markers (not DHT C4, JPG C8, DAC CC): precision, rows, columns.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _check_encapsulated(ds, name: str) -> None:
    """Refuse compressed pixel data whose framing GDCM would trust: a 1.3 kB JPEG Lossless file
    whose fragment items were corrupt made GDCM allocate 3.1 GB (found by fuzzing). pydicom checks
    the fragment items; each JPEG frame's header must be well formed (``_jpeg_frame_size``) and its
    size the header's Rows x Columns."""
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    except ValueError as exc:
        raise CTLoadError(f"{name}: damaged compressed pixel data, {_decode_error_text(exc)}") from exc
    if not frames:
        raise CTLoadError(f"{name}: damaged compressed pixel data, no frame in the pixel data")
    for number, frame in enumerate(frames, start=1):
        where = f"{name}: frame {number}" if len(frames) > 1 else name
        if frame[:2] != b"\xff\xd8" and ds.file_meta.TransferSyntaxUID in _JPEG_SYNTAXES:
            # a JPEG frame that does not start as one: GDCM took 4 GB for a 769-byte file (fuzzing)
            raise CTLoadError(f"{where}: the compressed JPEG frame has no start-of-image marker")
        size = _jpeg_frame_size(frame, where)
        if size is not None and size != (int(ds.Rows), int(ds.Columns)):
            raise CTLoadError(
                f"{where}: the compressed image is {size[0]} x {size[1]} pixels but the header says "
                f"{int(ds.Rows)} x {int(ds.Columns)}"
            )


#: Markers that stand alone, without a length: TEM and the restart markers RST0-7.
_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_frame_size(frame: bytes, name: str) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG or JPEG-LS codestream's frame header; None for other codestreams.

    Every marker segment up to the first scan is walked and must be well formed: each lies inside
    the frame, a frame header's precision is 2 to 16 bits and its components' sampling factors 1 to
    4, and a Huffman table holds the codes its counts announce. GDCM's libjpeg trusts these: a
    32 x 32 JPEG Lossless frame whose Huffman counts ran past their segment made it take 1.5 GB, one
    with bytes that were no marker after its frame header 3.2 GB, and one of 18-bit precision
    crashed it (found by fuzzing; GDCM now runs in a child process, ``isolated``, so such a crash
    costs a refusal, not the viewer). The walk is ours because no library
    we depend on parses a JPEG header publicly; it stops at the scan, so it costs microseconds.
    """
    if frame[:2] != b"\xff\xd8":  # no SOI: JPEG 2000, RLE or damaged, decoded or refused elsewhere
        return None
    size = None
    i = 2
    while True:
        if i >= len(frame) or frame[i] != 0xFF:
            what = "ends" if i >= len(frame) else f"has byte {frame[i]:#04x} where a marker belongs"
            raise CTLoadError(f"{name}: the JPEG codestream {what} before its first scan (offset {i})")
        while i < len(frame) and frame[i] == 0xFF:  # fill bytes may precede any marker
            i += 1
        if i >= len(frame):
            raise CTLoadError(f"{name}: the JPEG codestream ends before its first scan")
        marker = frame[i]
        i += 1
        if marker in _MARKERS_WITHOUT_LENGTH:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            raise CTLoadError(f"{name}: the JPEG codestream has marker FF{marker:02X} before its first scan")
        length = int.from_bytes(frame[i : i + 2], "big")
        if length < 2 or i + length > len(frame):
            raise CTLoadError(
                f"{name}: JPEG marker FF{marker:02X} at offset {i - 2} announces {length} bytes, which do "
                f"not fit in the {len(frame)}-byte frame"
            )
        segment = frame[i + 2 : i + length]
        if marker in _SOF_MARKERS:
            size = _jpeg_frame_header(segment, name)
        elif marker == 0xC4:
            _check_huffman_tables(segment, name)
        elif marker == 0xDA:
            if size is None:
                raise CTLoadError(f"{name}: the JPEG codestream has no readable frame header")
            return size
        i += length


def _jpeg_frame_header(segment: bytes, name: str) -> tuple[int, int]:
    """(rows, columns) from a start-of-frame segment whose component list is well formed."""
    n_components = segment[5] if len(segment) > 5 else 0
    if n_components == 0 or len(segment) != 6 + 3 * n_components:
        raise CTLoadError(f"{name}: the JPEG frame header is damaged ({len(segment) + 2} bytes)")
    if not 2 <= segment[0] <= 16:  # JPEG and JPEG-LS samples have 2 to 16 bits; GDCM crashed on 18
        raise CTLoadError(f"{name}: the JPEG frame header gives a sample precision of {segment[0]} bits")
    for c in range(n_components):
        sampling = segment[6 + 3 * c + 1]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 0x0F <= 4):
            raise CTLoadError(f"{name}: the JPEG frame header has sampling factors {sampling:#04x}")
    return int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")


def _check_huffman_tables(segment: bytes, name: str) -> None:
    """Each table: class and slot, 16 code counts, then as many symbols as the counts add up to."""
    j = 0
    while j < len(segment):
        counts = segment[j + 1 : j + 17]
        n_codes = sum(counts)
        if len(counts) != 16 or n_codes > 256 or j + 17 + n_codes > len(segment):
            raise CTLoadError(f"{name}: a JPEG Huffman table is damaged (its codes overrun the segment)")
        j += 17 + n_codes


def _is_decoder_panic(exc: BaseException) -> bool:
    """A Rust decoder (pylibjpeg-rle) that panicked on corrupt data: pyo3 raises PanicException,
    a BaseException, so ``except Exception`` lets it through to the viewer (found by fuzzing)."""
    return type(exc).__name__ == "PanicException"


def _decode_error_text(exc: BaseException) -> str:
    if isinstance(exc, CTLoadError):
        return str(exc).split(": ", 1)[-1]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[-1][:200] if lines else ""
    if detail.startswith(type(exc).__name__):
        return detail  # a message that already quotes its traceback's last line
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


# ------------------------------------------------------------------------------------ loading


def load_dicom(
    path: str | os.PathLike, series: str | int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> CTVolume:
    """Load one CT series from a DICOM folder or a single DICOM file."""
    scan = scan_dicom(path)
    group = _choose_group(scan, series, Path(path).name)
    volume = _load_group(group, max_bytes)
    if scan.skipped:
        _warn(volume.warnings, f"skipped {len(scan.skipped)} non-DICOM file(s): {_short_list(scan.skipped)}")
    return volume


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    logger.warning(message)


def _describe_group(g: _Group) -> str:
    kind = "CT" if g.is_ct else (g.headers[0].modality if g.headers else "") or "non-CT"
    text = f"{g.key} ({kind}, {_n_images(g)} image(s)"
    if g.label:
        text += f", {g.label}"
    return text + ")"


def _choose_group(scan: DicomScan, series: str | int | None, where: str) -> _Group:
    ct_groups = [g for g in scan.groups if g.is_ct]
    if series is not None:
        if isinstance(series, int) and not isinstance(series, bool):
            if not 0 <= series < len(scan.groups):
                raise CTLoadError(f"{where}: series index {series} out of range (found {len(scan.groups)})")
            group = scan.groups[series]
        else:
            matches = [g for g in scan.groups if g.key == series]
            if not matches:
                raise CTLoadError(
                    f"{where}: no series with key {series!r}; "
                    f"found {', '.join(_describe_group(g) for g in scan.groups)}"
                )
            group = matches[0]
        if not group.is_ct:
            reasons = _short_list(group.excluded, 3)
            raise CTLoadError(
                f"series {group.key} in {where} is not a CT image series ({reasons}); "
                "the CT model is never run on non-CT images"
            )
        return group
    if not ct_groups:
        found = ", ".join(_describe_group(g) for g in scan.groups) or "no DICOM images"
        excluded = [e for g in scan.groups for e in g.excluded]
        raise CTLoadError(
            f"{where}: no CT image series found (found: {found}). "
            f"Excluded: {_short_list(excluded, 5) or 'none'}"
        )
    chosen = ct_groups[0]
    others = [g for g in scan.groups if g is not chosen]
    if others:
        chosen.warnings.append(
            f"{len(scan.groups)} series found; loaded the largest CT series {_describe_group(chosen)}. "
            f"Others (choose with series=): {', '.join(_describe_group(g) for g in others)}"
        )
    return chosen


def _load_group(group: _Group, max_bytes: int) -> CTVolume:
    warnings: list[str] = []
    for message in group.warnings:
        _warn(warnings, message)
    if group.excluded:
        _warn(warnings, f"excluded from series {group.key}: {_short_list(group.excluded)}")
    headers = group.headers
    if not headers:
        raise CTLoadError(f"series {group.key} has no loadable CT images")
    broken = [f"{h.name}: {h.problem}" for h in headers if h.problem]
    if broken:
        raise CTLoadError(
            f"series {group.key} is incomplete ({len(broken)} of {len(headers)} file(s) unusable, nothing "
            f"padded): {_short_list(broken, 5)}"
        )
    n_voxels = sum(h.frames for h in headers) * headers[0].rows * headers[0].cols
    layout = f"{len(headers)} file(s), {headers[0].rows}x{headers[0].cols} pixels"
    check_load_size(f"series {group.key}", n_voxels, layout, max_bytes)
    for h in headers:
        pixel_route(h.transfer_syntax, h.name)  # refuse a missing decoder before decoding anything
    if any(h.is_multiframe for h in headers):
        return _load_multiframe(group, warnings)
    if not headers[0].modality:
        _warn(warnings, "no Modality tag; treated as CT because SOPClassUID is CT Image Storage")

    plan = _plan_slices(headers, warnings, group.key)
    with decoded_in_children(headers) as decoded:
        hu, mask, failures = _decode_slices(plan, headers[0], decoded, warnings, group.key)
    if failures:
        raise CTLoadError(
            f"series {group.key} is incomplete: {len(failures)} of {len(headers)} file(s) could not be "
            f"decoded (nothing padded): {_short_list(failures, 5)}"
        )
    _check_rescale(headers, hu, warnings)
    mask |= hu < PADDING_HU_THRESHOLD
    if mask.any():
        hu[mask] = -1024.0
        logger.info(
            "series %s: %d padding/outside-FOV voxels masked and set to -1024 HU", group.key, mask.sum()
        )

    if plan.in_plane_shift is not None:
        hu, mask = _correct_tilt(hu, mask, plan.in_plane_shift)
    if plan.resample_positions is not None:
        hu, mask = _resample_z(hu, mask, plan.positions, plan.resample_positions)
    hu, spacing, origin, direction, mask = reorient_nearest_identity(
        hu, plan.spacing, plan.origin, plan.direction, mask
    )
    for message in plan.warnings:
        _warn(warnings, message)
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=direction,
        is_hu=True,
        series_key=group.key,
        source="DICOM",
        warnings=warnings,
        padding_mask=mask if mask.any() else None,
    )


def _decode_slices(
    plan: _SlicePlan, first: FileHeader, decoded: Mapping, warnings: list[str], key: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(HU volume, padding mask, failures) from the planned slices' files."""
    hu = np.empty((len(plan.slices), first.rows, first.cols), dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=bool)
    failures: list[str] = []
    for index, candidates in enumerate(plan.slices):
        decoded_slices = []
        for h in candidates:
            try:
                decoded_slices.append(decode_file(h, decoded))
            except BaseException as exc:  # one bad file must not take the viewer down (cases 3 and 5)
                if not isinstance(exc, Exception) and not _is_decoder_panic(exc):
                    raise  # Ctrl-C, SystemExit
                failures.append(f"{h.name}: {_decode_error_text(exc)}")
        if len(decoded_slices) != len(candidates):
            continue
        first_hu, first_mask = decoded_slices[0]
        for (other_hu, _), h in zip(decoded_slices[1:], candidates[1:], strict=True):
            if not np.array_equal(other_hu, first_hu):
                raise CTLoadError(
                    f"series {key}: {candidates[0].name} and {h.name} lie at the same position with "
                    "different pixels and no AcquisitionNumber tells them apart; refused"
                )
        if len(candidates) > 1:
            _warn(
                warnings,
                f"identical slices at one position de-duplicated: {', '.join(h.name for h in candidates)}",
            )
        hu[index] = first_hu[0]
        if first_mask is not None:
            mask[index] = first_mask[0]
    return hu, mask, failures


@dataclass
class _SlicePlan:
    slices: list[list[FileHeader]]  # per output slice, the file(s) at that position
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    positions: np.ndarray  # mm along the stacking axis, relative to the first slice
    resample_positions: np.ndarray | None = None
    in_plane_shift: np.ndarray | None = None  # (n, 2) pixel shifts (rows, cols) that undo gantry tilt
    warnings: list[str] = field(default_factory=list)


def _fallback_z_spacing(h: FileHeader) -> float | None:
    for value in (h.spacing_between_slices, h.slice_thickness):
        if value is not None and np.isfinite(value) and abs(value) > 0:
            return abs(value)
    return None


def _plan_slices(headers: list[FileHeader], warnings: list[str], key: str) -> _SlicePlan:
    """Order slices by position along the normal and check gaps, spacing and tilt (cases 11, 14-17)."""
    first = headers[0]
    dy, dx = first.pixel_spacing or (1.0, 1.0)
    if first.pixel_spacing is None:
        _warn(
            warnings,
            "PixelSpacing missing or invalid: 1 mm assumed in-plane; millimetre measurements are wrong",
        )
    normal = _normal(first.iop)
    if normal is None or any(h.ipp is None for h in headers):
        return _voxel_only_plan(headers, warnings, (dy, dx))
    row_dir = first.iop[:3] / np.linalg.norm(first.iop[:3])
    col_dir = first.iop[3:] / np.linalg.norm(first.iop[3:])
    positions = np.array([h.ipp @ normal for h in headers])
    order = np.argsort(positions, kind="stable")
    slices: list[list[FileHeader]] = []
    unique_positions: list[float] = []
    for i in order:
        if unique_positions and positions[i] - unique_positions[-1] < SAME_POSITION_MM:
            slices[-1].append(headers[i])
        else:
            slices.append([headers[i]])
            unique_positions.append(float(positions[i]))
    z = np.asarray(unique_positions) - unique_positions[0]
    origin_xyz = slices[0][0].ipp
    direction_xyz = np.column_stack([row_dir, col_dir, normal])  # ITK order: columns x, y, slice
    plan_warnings: list[str] = []
    n = len(slices)
    if n == 1:
        dz = _fallback_z_spacing(first)
        if dz is None:
            dz = 1.0
            plan_warnings.append("single slice without SliceThickness: 1 mm slice spacing assumed")
        plan_warnings.append("only 1 slice: a single-slice volume; 3-D analysis is not meaningful")
        return _SlicePlan(
            slices,
            (dz, dy, dx),
            tuple(origin_xyz[::-1]),
            direction_xyz[::-1, ::-1],
            z,
            warnings=plan_warnings,
        )
    if n <= 3:
        plan_warnings.append(f"only {n} slices: too few for whole-chest analysis")
    steps = np.diff(z)
    median_step = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median_step)
    if gaps.size:
        i = int(gaps[0])
        raise CTLoadError(
            f"series {key}: {gaps.size} gap(s) in slice positions (missing slice?): {steps[i]:.3f} mm "
            f"between {slices[i][0].name} and {slices[i + 1][0].name} where the spacing is "
            f"{median_step:.3f} mm; refused "
            "rather than interpolated"
        )
    n_out, step, residual, tolerance = stack_spacing(z)
    plan = _SlicePlan(
        slices,
        (step, dy, dx),
        tuple(origin_xyz[::-1]),
        direction_xyz[::-1, ::-1],
        z,
        warnings=plan_warnings,
    )
    if n_out != n or residual > tolerance:
        plan.resample_positions = np.linspace(0.0, z[-1], n_out)
        plan_warnings.append(
            f"non-uniform slice spacing (steps {steps.min():.3f}-{steps.max():.3f} mm, deviation up to "
            f"{residual:.3f} mm > tolerance {tolerance:.3f} mm): slices interpolated linearly to "
            f"{step:.3f} mm"
        )
    offsets = np.array([s[0].ipp - origin_xyz for s in slices])
    shift_px = np.column_stack([offsets @ col_dir / dy, offsets @ row_dir / dx])
    if np.abs(shift_px).max() > TILT_TOLERANCE_PX:
        drift_mm = float(np.hypot(offsets[-1] @ col_dir, offsets[-1] @ row_dir))
        angle = float(np.degrees(np.arctan2(drift_mm, z[-1])))
        plan.in_plane_shift = shift_px
        plan_warnings.append(
            f"gantry tilt of about {angle:.2f} degrees detected (slice origins drift {drift_mm:.2f} mm "
            "in-plane): "
            "slices resampled (interpolated) onto an orthogonal grid"
        )
    return plan


def stack_spacing(z: np.ndarray) -> tuple[int, float, float, float]:
    """The loader's slices along the normal from distinct sorted positions ``z`` (mm from the first,
    at least two): ``(count, step, largest deviation, tolerance)``. Positions uniform within the
    tolerance keep their count at the mean step; others are resampled at the median step (the
    SR reader rebuilds a CT's grid with this, so its boxes land on the loader's slices)."""
    n = len(z)
    mean_step = float(z[-1] / (n - 1))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * mean_step)
    residual = float(np.abs(z - mean_step * np.arange(n)).max())
    if residual <= tolerance:
        return n, mean_step, residual, tolerance
    n_target = int(round(z[-1] / float(np.median(np.diff(z))))) + 1
    return n_target, float(z[-1] / (n_target - 1)), residual, tolerance


def _voxel_only_plan(headers: list[FileHeader], warnings: list[str], in_plane) -> _SlicePlan:
    """No usable position/orientation: a voxel-only volume ordered as well as possible (case 11)."""
    if all(h.slice_location is not None for h in headers):
        order = sorted(headers, key=lambda h: h.slice_location)
        how = "SliceLocation"
    elif all(h.instance_number is not None for h in headers):
        order = sorted(headers, key=lambda h: h.instance_number)
        how = "InstanceNumber"
    else:
        order = list(headers)
        how = "file name"
    dz = _fallback_z_spacing(headers[0]) or 1.0
    _warn(
        warnings,
        f"ImagePositionPatient/ImageOrientationPatient missing or invalid: voxel-only volume (origin 0, no "
        f"orientation, slice order from {how}, {dz:g} mm slice spacing assumed); positions are not "
        "patient coordinates",
    )
    return _SlicePlan(
        [[h] for h in order], (dz, *in_plane), (0.0, 0.0, 0.0), np.eye(3), np.arange(len(order)) * dz
    )


def _check_rescale(headers: list[FileHeader], hu: np.ndarray, warnings: list[str]) -> None:
    missing = [h for h in headers if not h.rescale_present]
    if not missing:
        return
    message = (
        f"RescaleSlope/RescaleIntercept missing on {len(missing)} of {len(headers)} slice(s): "
        "slope 1, intercept 0 used"
    )
    if hu.size and float(np.percentile(hu, 1)) >= 0:
        message += (
            f"; values look unrescaled (1st percentile {np.percentile(hu, 1):.0f} >= 0 where air should be "
            "about -1000 HU)"
        )
    _warn(warnings, message)


def _correct_tilt(hu: np.ndarray, mask: np.ndarray, shifts: np.ndarray):
    from scipy import ndimage

    out = np.empty_like(hu)
    out_mask = np.empty_like(mask)
    for k, (shift_rows, shift_cols) in enumerate(shifts):
        # new(j, i) = old(j - shift_rows, i - shift_cols); what moves in from outside is padding
        out[k] = ndimage.shift(hu[k], (shift_rows, shift_cols), order=1, cval=-1024.0)
        out_mask[k] = ndimage.shift(mask[k].astype(np.uint8), (shift_rows, shift_cols), order=0, cval=1) > 0
    return out, out_mask


def _resample_z(hu: np.ndarray, mask: np.ndarray, positions: np.ndarray, target: np.ndarray):
    upper = np.clip(np.searchsorted(positions, target, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((target - positions[lower]) / (positions[upper] - positions[lower])).astype(np.float32)
    weight = np.clip(weight, 0.0, 1.0)[:, None, None]
    out = hu[lower] * (1 - weight) + hu[upper] * weight
    out_mask = (mask[lower] & (weight < 1)) | (mask[upper] & (weight > 0))
    return out.astype(np.float32), out_mask


def _load_multiframe(group: _Group, warnings: list[str]) -> CTVolume:
    """Enhanced / multi-frame CT via SimpleITK, which applies the per-frame rescale."""
    if len(group.headers) != 1:
        raise CTLoadError(
            f"series {group.key}: {len(group.headers)} multi-frame files in one series; load them one by one"
        )
    h = group.headers[0]
    with Decoding("gdcm", [(h.path, _decoded_bytes(h))]) as gdcm:
        try:
            image = gdcm.result(h.path)
        except CTLoadError as exc:
            raise CTLoadError(
                f"{h.name}: enhanced multi-frame CT could not be read ({_decode_error_text(exc)})"
            ) from exc
        if image.dimension != 3 or image.components != 1:
            raise CTLoadError(f"{h.name}: multi-frame image is not a 3-D grey-level volume")
        hu = np.array(image.pixels, dtype=np.float32)
    mask = hu < PADDING_HU_THRESHOLD
    hu[mask] = -1024.0
    _warn(
        warnings,
        f"{h.name}: enhanced multi-frame CT read with SimpleITK (GDCM): per-frame rescale applied, frame "
        "spacing taken as uniform",
    )
    direction = np.asarray(image.direction, dtype=float).reshape(3, 3)[::-1, ::-1]
    hu, spacing, origin, direction, mask = reorient_nearest_identity(
        hu, image.spacing[::-1], image.origin[::-1], direction, mask
    )
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=direction,
        series_key=group.key,
        source="DICOM",
        warnings=warnings,
        padding_mask=mask if mask.any() else None,
    )
