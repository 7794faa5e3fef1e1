"""Results as DICOM objects a PACS shows: a Segmentation (SEG) and a TID 1500 measurement report
(Comprehensive 3D SR), built with highdicom; and both read back. No napari, no Qt.

* **SEG**: right and left lung (coded anatomy) and the lesion region of the explained class (the
  Isodata-thresholded joint saliency of the explained slices, as the boxes are drawn), one frame
  per source CT image, in the source study and frame of reference.
* **SR**: one planar-ROI group per box (a closed polyline on the referenced CT image, the
  finding coded, its score and its origin), one group with the patient-level answer (class,
  probabilities, lung volume, involvement, scan status) and the algorithm (name, version,
  SHA-256). Its image library lists every source image with its position, orientation and
  pixel spacing (TID 1602), so the boxes read back onto the CT grid from the SR alone.

The objects carry the source's patient and study identity because they go back to the same
PACS; :func:`deidentify` turns a written object into a research copy (DICOM PS3.15 basic
profile: names, IDs and dates removed, UIDs remapped consistently).

Coordinates: the volume's grid is (z, y, x) LPS (see :mod:`napari_wscovid.io.volume`); DICOM
positions are (x, y, z) LPS, and an SR's image coordinates are (column, row) with the top-left
corner of the top-left pixel at (0, 0), so a pixel centre is at (c + 0.5, r + 0.5).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_wscovid.io.volume import CTVolume, grid_geometry
from napari_wscovid.results import BOX_ORIGINS, Box

logger = logging.getLogger(__name__)

MANUFACTURER = "napari-wscovid"
#: Codes of this plugin's own concepts (DICOM PS3.16 8.2: a private coding scheme designator).
PRIVATE_SCHEME = "99WSCOVID"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9701, 9702


class DicomObjectError(ValueError):
    """A SEG or SR could not be written or read; the message names the file and the reason."""


# ------------------------------------------------------------------------------ source geometry
@dataclass(frozen=True)
class SourceImage:
    """One source CT image's plane: where its pixels lie in patient space (LPS, x/y/z order)."""

    sop_instance_uid: str
    sop_class_uid: str
    position: np.ndarray  # centre of pixel (row 0, column 0)
    row_direction: np.ndarray  # unit vector along increasing column index
    column_direction: np.ndarray  # unit vector along increasing row index
    spacing: tuple[float, float]  # (between rows, between columns) mm
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @classmethod
    def from_dataset(cls, ds) -> SourceImage:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        return cls(
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            np.asarray(ds.ImagePositionPatient, float),
            iop[:3],
            iop[3:],
            tuple(float(v) for v in ds.PixelSpacing),
            int(ds.Rows),
            int(ds.Columns),
        )

    def pixel_to_world(self, column, row) -> np.ndarray:
        """Pixel indices (centre at integers) -> LPS x/y/z."""
        column, row = np.asarray(column, float), np.asarray(row, float)
        return (
            self.position
            + column[..., None] * self.spacing[1] * self.row_direction
            + row[..., None] * self.spacing[0] * self.column_direction
        )

    def world_to_pixel(self, world) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS x/y/z -> (column, row, distance from the plane in mm)."""
        offset = np.asarray(world, float) - self.position
        return (
            offset @ self.row_direction / self.spacing[1],
            offset @ self.column_direction / self.spacing[0],
            offset @ self.normal,
        )


def _xyz(world_zyx) -> np.ndarray:
    return np.asarray(world_zyx, float)[..., ::-1]


def nearest_source(images: Sequence[SourceImage], world_xyz) -> tuple[SourceImage, float]:
    """The source image whose plane lies nearest ``world_xyz``, and that distance in mm."""
    distances = [abs(float(im.world_to_pixel(world_xyz)[2])) for im in images]
    best = int(np.argmin(distances))
    return images[best], distances[best]


def source_frames(volume: CTVolume, images: Sequence[SourceImage], labels: np.ndarray) -> np.ndarray:
    """``labels`` (on the volume's grid) resampled, nearest voxel, onto each source image's
    pixels: (n_images, rows, columns). The loader may have flipped, permuted, de-tilted or
    resampled the slices; going through patient space undoes whichever it did."""
    out = np.zeros((len(images), images[0].rows, images[0].columns), dtype=labels.dtype)
    shape = np.asarray(volume.shape)
    for k, im in enumerate(images):
        r, c = np.meshgrid(np.arange(im.rows), np.arange(im.columns), indexing="ij")
        world = im.pixel_to_world(c, r)[..., ::-1]  # -> (z, y, x)
        index = np.rint(volume.world_to_index(world)).astype(np.int64)
        inside = np.all((index >= 0) & (index < shape), axis=-1)
        z, y, x = (index[..., a][inside] for a in range(3))
        frame = np.zeros((im.rows, im.columns), dtype=labels.dtype)
        frame[inside] = labels[z, y, x]
        out[k] = frame
    return out


def read_source_datasets(folder, series_key: str) -> list:
    """Headers (no pixel data) of the CT series ``series_key`` in ``folder``, as the loader chose it."""
    import pydicom

    from napari_wscovid.io.dicom import _choose_group, scan_dicom

    group = _choose_group(scan_dicom(folder), series_key or None, Path(folder).name)
    datasets = [
        _with_type2_attributes(pydicom.dcmread(h.path, stop_before_pixels=True)) for h in group.headers
    ]
    if any("ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds for ds in datasets):
        raise DicomObjectError(
            f"series {group.key}: images without position or orientation cannot be referenced by a SEG or SR"
        )
    return datasets


#: Patient and study attributes a SEG or SR must carry (type 2: present, may be empty) that
#: anonymised or minimal CT files often lack; highdicom copies them from the source.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_type2_attributes(ds):
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


# ----------------------------------------------------------------------------------- coded terms
def _codes():
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    def private(value: str, meaning: str) -> CodedConcept:
        return CodedConcept(value, PRIVATE_SCHEME, meaning)

    findings = {
        "COVID-19": CodedConcept("840539006", "SCT", "Disease caused by SARS-CoV-2"),
        "CAP": CodedConcept("385093006", "SCT", "Community acquired pneumonia"),
        "NP": CodedConcept("260413007", "SCT", "None"),
    }
    return codes, private, findings


def _finding(class_name: str):
    from highdicom.sr import CodedConcept

    _, _, findings = _codes()
    return findings.get(class_name) or CodedConcept(class_name[:16], PRIVATE_SCHEME, class_name)


def _sr_algorithm(model_info: dict):
    import highdicom as hd

    sha = model_info.get("sha256")
    return hd.sr.AlgorithmIdentification(
        name=str(model_info.get("name") or "unknown"),
        version=str(model_info.get("version") or "unknown"),
        parameters=[f"sha256={sha}"] if sha else None,
    )


def _algorithm(model_info: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    name = str(model_info.get("name") or "unknown")
    version = str(model_info.get("version") or "unknown")
    sha = model_info.get("sha256")
    return hd.AlgorithmIdentificationSequence(
        name=name,
        version=version,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"sha256": str(sha)} if sha else None,
    )


# -------------------------------------------------------------------------------------------- SEG
def lesion_mask(result, volume_shape) -> np.ndarray:
    """The lesion region the boxes were drawn around: the thresholded, closed joint saliency in
    the lungs of every explained slice that has boxes (:func:`napari_wscovid.boxes.saliency_mask`;
    a slice explained as NP has none: its saliency is no lesion)."""
    from napari_wscovid.boxes import saliency_mask

    mask = np.zeros(volume_shape, dtype=bool)
    joint = result.saliency.get("joint")
    if joint is None:
        return mask
    boxed = {int(b.slice) for b in result.boxes}
    for z in result.saliency_slices:
        if z in boxed and joint[z].any():
            mask[z] = saliency_mask(joint[z]) & (result.lung_mask[z] > 0)
    return mask


def build_seg(volume: CTVolume, datasets: Sequence, result, *, lesions: np.ndarray | None = None):
    """A highdicom Segmentation of the lungs (segments 1 right, 2 left) and the lesion region of
    the explained class (segment 3, when there is one), referencing ``datasets``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    images = [SourceImage.from_dataset(ds) for ds in datasets]
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[result.lung_mask == 1] = 1
    labels[result.lung_mask == 2] = 2
    lesions = lesion_mask(result, volume.shape) if lesions is None else lesions
    labels[lesions] = 3
    frames = source_frames(volume, images, labels)
    algorithm = _algorithm(result.model_info)

    def segment(number, label, category, kind, tracking_id, side=None):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Lung],
            tracking_uid=hd.UID(),
            tracking_id=tracking_id,
        )
        if side is not None:  # laterality: a modifier of the segment's anatomic region
            modifier = hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [modifier]
        return description

    anatomy = codes.SCT.AnatomicalStructure
    descriptions = [
        segment(1, "Right lung", anatomy, codes.SCT.Lung, "right lung", codes.SCT.Right),
        segment(2, "Left lung", anatomy, codes.SCT.Lung, "left lung", codes.SCT.Left),
    ]
    if frames.max() >= 3:
        lesion = codes.SCT.MorphologicallyAbnormalStructure
        label = f"{result.explained_class} lesion region"
        descriptions.append(segment(3, label, lesion, codes.SCT.Lesion, "lesion region"))
    else:
        frames[frames > 2] = 0
    return hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=str(result.model_info.get("name") or "napari-wscovid"),
        software_versions=_software_version(),
        device_serial_number="none",
        series_description="napari-wscovid lungs and lesion region",
        content_label="WSCOVID",
        content_description="research use: lungs and weakly supervised lesion region",
        omit_empty_frames=True,
    )


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("napari-wscovid")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------- SR
def _unit(code: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(code, "UCUM", meaning)


def box_region(volume: CTVolume, images: Sequence[SourceImage], box: Box):
    """The box as a closed polyline in (column, row) image coordinates of its nearest source image."""
    corners = np.array(
        [
            [box.slice, box.y0 - 0.5, box.x0 - 0.5],
            [box.slice, box.y0 - 0.5, box.x1 - 0.5],
            [box.slice, box.y1 - 0.5, box.x1 - 0.5],
            [box.slice, box.y1 - 0.5, box.x0 - 0.5],
        ]
    )
    world = _xyz(volume.index_to_world(corners))
    image, distance = nearest_source(images, world.mean(axis=0))
    if distance > 0.5 * float(min(volume.spacing)):
        logger.info("box on slice %d lies %.2f mm from its nearest source image", box.slice, distance)
    column, row, _ = image.world_to_pixel(world)
    points = np.stack([column + 0.5, row + 0.5], axis=1)
    return image, np.vstack([points, points[:1]]).astype(np.float32)


def build_sr(volume: CTVolume, datasets: Sequence, result, boxes: Sequence[Box] | None = None):
    """A Comprehensive 3D SR holding a TID 1500 measurement report of ``boxes`` (default: the
    result's) and the patient-level answer, referencing ``datasets``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _, private, _ = _codes()
    boxes = list(result.boxes if boxes is None else boxes)
    images = [SourceImage.from_dataset(ds) for ds in datasets]
    algorithm = _sr_algorithm(result.model_info)
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=MANUFACTURER)
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    no_units, mm2 = _unit("1", "no units"), _unit("mm2", "square millimeter")
    groups = []
    for number, box in enumerate(boxes, start=1):
        image, points = box_region(volume, images, box)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=image.sop_class_uid,
                referenced_sop_instance_uid=image.sop_instance_uid,
            ),
        )
        measurements = [
            hd.sr.Measurement(name=private("score", "Saliency score"), value=float(box.score), unit=no_units)
        ]
        if box.area_mm2 > 0:
            measurements.append(hd.sr.Measurement(name=codes.SCT.Area, value=float(box.area_mm2), unit=mm2))
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"box {number}"),
                referenced_region=region,
                finding_type=_finding(box.class_name),
                algorithm_id=algorithm if box.origin == "detected" else None,
                measurements=measurements,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=private("origin", "Box origin"),
                        value=private(box.origin, f"{box.origin} box"),
                    ),
                    hd.sr.QualitativeEvaluation(
                        name=private("saliency", "Saliency source"),
                        value=private(box.source[:16] or "joint", f"{box.source or 'joint'} saliency"),
                    ),
                ],
            )
        )
    groups.append(_patient_group(result, algorithm, private, no_units))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("24627-2", "LN", "CT Chest"),
        imaging_measurements=groups,
        referenced_images=list(datasets),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(datasets),
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="napari-wscovid boxes and answer",
    )


def _patient_group(result, algorithm, private, no_units):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measurements = [
        hd.sr.Measurement(
            name=private(f"p-{name}"[:16], f"Probability of {name}"), value=float(p), unit=no_units
        )
        for name, p in zip(result.classes, np.asarray(result.patient_probs, float), strict=True)
        if np.isfinite(p)  # none when no lung slice was classified: the answer then says "no call"
    ]
    measurements.append(
        hd.sr.Measurement(
            name=codes.SCT.Volume, value=float(result.lung_volume_ml), unit=_unit("ml", "milliliter")
        )
    )
    involvement = float(result.involvement.get("total_percent", 0.0)) if result.involvement else 0.0
    if np.isfinite(involvement):  # DICOM decimal strings hold no NaN
        measurements.append(
            hd.sr.Measurement(
                name=private("involvement", "Lung involvement"), value=involvement, unit=_unit("%", "percent")
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=private("answer", "Patient-level class"), value=_finding(result.predicted_class or "no call")
        )
    ]
    if result.status:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=private("status", "Scan status"), value=private(result.status, result.status)
            )
        )
    # the flags behind the status, so a reader in the PACS sees why an answer needs review
    for flag in getattr(result, "qc", None) or []:
        if flag.get("severity") in ("warn", "severe"):
            text = f"{flag['severity']}: {flag['name']} = {flag['value']}"
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=private("qc-flag", "Quality flag"), value=private(flag["name"][:16], text[:64])
                )
            )

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="patient-level answer"),
        finding_type=_finding(result.predicted_class or "no call"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


# ------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def _no_identity_in_messages():
    """highdicom warns about attribute values it copies from the CT, quoting them (a one-word
    patient name, for one), and logs each module it copies at INFO with the study's UIDs: neither
    may reach a log or a terminal. Its warnings are counted at debug level instead."""
    hd_logger = logging.getLogger("highdicom")
    level = hd_logger.level
    hd_logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        hd_logger.setLevel(level)
    if caught:
        logger.debug("%d warning(s) from highdicom not shown: they may quote patient attributes", len(caught))


def write_dicom_objects(
    out_dir,
    volume: CTVolume,
    datasets: Sequence,
    result,
    boxes=None,
    *,
    overwrite: bool = False,
    research_copies: bool = False,
    names: tuple[str, str] = ("seg.dcm", "sr.dcm"),
):
    """Write ``seg.dcm`` and ``sr.dcm`` into ``out_dir`` (atomically); returns their paths. With
    ``research_copies``, de-identified copies (:func:`deidentify`, one UID map for both) go to
    ``out_dir/research/`` too (not returned: they are not sent back to the PACS)."""
    from napari_wscovid.io.atomic import atomic_write

    out_dir = Path(out_dir)
    with _no_identity_in_messages():
        objects = {
            names[0]: build_seg(volume, datasets, result),
            names[1]: build_sr(volume, datasets, result, boxes),
        }
    for obj in objects.values():
        _drop_incomplete_study_reference(obj)
    paths = []
    for name, obj in objects.items():
        path = out_dir / name
        atomic_write(
            path, lambda tmp, obj=obj: obj.save_as(tmp, enforce_file_format=True), overwrite=overwrite
        )
        paths.append(path)
    if research_copies:
        uid_map = UIDMap()
        (out_dir / "research").mkdir(exist_ok=True)
        for name, obj in objects.items():
            copy_ = deidentify(obj, uid_map)
            atomic_write(
                out_dir / "research" / name,
                lambda tmp, obj=copy_: obj.save_as(tmp, enforce_file_format=True),
                overwrite=overwrite,
            )
    return paths


def _drop_incomplete_study_reference(obj) -> None:
    """De-identified CTs often keep a Referenced Study Sequence with its SOP class removed; the
    study module copies it from the source, and dciodvfy rejects an item without the class. The
    sequence is optional (type 3): an incomplete one is dropped rather than passed on."""
    refs = obj.get("ReferencedStudySequence")
    if refs is not None and any("ReferencedSOPClassUID" not in item for item in refs):
        del obj.ReferencedStudySequence


# ------------------------------------------------------------------------------------ reading
_DESCRIPTORS = {
    "Pixel Data Rows": "rows",
    "Pixel Data Columns": "columns",
    "Horizontal Pixel Spacing": "dx",
    "Vertical Pixel Spacing": "dy",
    "Image Position (Patient) X": "px",
    "Image Position (Patient) Y": "py",
    "Image Position (Patient) Z": "pz",
    "Image Orientation (Patient) Row X": "rx",
    "Image Orientation (Patient) Row Y": "ry",
    "Image Orientation (Patient) Row Z": "rz",
    "Image Orientation (Patient) Column X": "cx",
    "Image Orientation (Patient) Column Y": "cy",
    "Image Orientation (Patient) Column Z": "cz",
}


def _meaning(item) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _library_images(ds) -> list[SourceImage]:
    """The source images of an SR's image library (TID 1601/1602) with their geometry."""
    images = []
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        if item.ValueType == "IMAGE" and "ContentSequence" in item:
            values = {}
            for d in item.ContentSequence:
                key = _DESCRIPTORS.get(_meaning(d))
                if key and d.ValueType == "NUM":
                    values[key] = float(d.MeasuredValueSequence[0].NumericValue)
            if len(values) == len(_DESCRIPTORS):
                ref = item.ReferencedSOPSequence[0]
                images.append(
                    SourceImage(
                        str(ref.ReferencedSOPInstanceUID),
                        str(ref.ReferencedSOPClassUID),
                        np.array([values["px"], values["py"], values["pz"]]),
                        np.array([values["rx"], values["ry"], values["rz"]]),
                        np.array([values["cx"], values["cy"], values["cz"]]),
                        (values["dy"], values["dx"]),
                        int(values["rows"]),
                        int(values["columns"]),
                    )
                )
            continue
        stack.extend(item.get("ContentSequence", []))
    return images


def grid_from_images(images: Sequence[SourceImage]) -> dict:
    """The CT grid the loader builds from these images (sorted along their normal, then turned
    nearest the identity as :func:`~napari_wscovid.io.formats.reorient_nearest_identity` does),
    as a geometry dict (:meth:`CTVolume.geometry`)."""
    from napari_wscovid.io.dicom import SAME_POSITION_MM, stack_spacing
    from napari_wscovid.io.formats import nearest_identity_geometry

    first = images[0]
    normal = first.normal
    order = sorted(images, key=lambda im: float(im.position @ normal))
    positions = np.array([float(im.position @ normal) for im in order])
    # the loader's slices: files at one position are one slice; uneven steps are resampled
    distinct = positions[np.concatenate([[True], np.diff(positions) >= SAME_POSITION_MM])]
    n, dz = (len(distinct), 1.0) if len(distinct) < 2 else stack_spacing(distinct - distinct[0])[:2]
    # index axes (z, y, x) = (along the normal, rows, columns); world axes in (z, y, x) order
    direction = np.stack([normal[::-1], first.column_direction[::-1], first.row_direction[::-1]], axis=1)
    spacing = (dz, first.spacing[0], first.spacing[1])
    shape = (n, first.rows, first.columns)
    # the loader's own reorientation, on the grid alone
    _, _, shape, spacing, origin, direction = nearest_identity_geometry(
        shape, spacing, order[0].position[::-1], direction
    )
    return grid_geometry(shape, spacing, origin, direction)


def read_sr_boxes(path) -> tuple[list[Box], dict]:
    """The boxes of an SR this plugin wrote, on the grid of the CT its image library describes.

    Returns ``(boxes, meta)`` shaped as :func:`napari_wscovid.io.boxes_io.load_boxes` returns
    them (``geometry``, ``classes``, ``series_key``, ``model``, ``reviewed_slices``); a
    :class:`DicomObjectError` naming the file when it is not such an SR.
    """
    import highdicom as hd
    import pydicom

    from napari_wscovid.io.volume import pseudonymous_key

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        sr = hd.sr.srread(path)
        groups = sr.content.get_planar_roi_measurement_groups()
    except Exception as exc:  # pydicom and highdicom raise many types for a foreign file
        raise DicomObjectError(f"{path.name}: not a readable DICOM SR measurement report ({exc})") from exc
    images = {im.sop_instance_uid: im for im in _library_images(ds)}
    if not images:
        raise DicomObjectError(f"{path.name}: its image library describes no CT image geometry")
    geometry = grid_from_images(list(images.values()))
    spacing, origin = np.asarray(geometry["spacing"]), np.asarray(geometry["origin"])
    inverse = np.linalg.inv(np.asarray(geometry["direction"]))
    boxes, skipped = [], []
    for number, group in enumerate(groups, start=1):
        region = group.roi
        uid = _region_source_uid(region)
        image = images.get(uid)
        if region is None or image is None:
            skipped.append(f"group {number}: no image region on a described CT image")
            continue
        points = np.asarray(region.value, float).reshape(-1, 2)
        world = image.pixel_to_world(points[:, 0] - 0.5, points[:, 1] - 0.5)[..., ::-1]
        index = ((world - origin) @ inverse.T) / spacing
        z = int(np.rint(index[:, 0].mean()))
        evaluations = {q.name.meaning: str(q.value.value) for q in group.get_qualitative_evaluations()}
        scores = [m.value for m in group.get_measurements() if m.name.meaning == "Saliency score"]
        areas = [m.value for m in group.get_measurements() if m.name.meaning == "Area"]
        boxes.append(
            Box(
                slice=z,
                y0=int(np.rint(index[:, 1].min() + 0.5)),
                x0=int(np.rint(index[:, 2].min() + 0.5)),
                y1=int(np.rint(index[:, 1].max() + 0.5)),
                x1=int(np.rint(index[:, 2].max() + 0.5)),
                class_name=_class_of(group.finding_type),
                score=float(scores[0]) if scores else 0.0,
                area_mm2=float(areas[0]) if areas else 0.0,
                origin=evaluations.get("Box origin", "detected")
                if evaluations.get("Box origin") in BOX_ORIGINS
                else "detected",
                source=evaluations.get("Saliency source", "joint"),
            )
        )
    if skipped:
        logger.warning("%s: %d group(s) skipped: %s", path.name, len(skipped), "; ".join(skipped[:5]))
    series_uids = {
        str(s.SeriesInstanceUID)
        for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for s in s.get("ReferencedSeriesSequence", [])
    }
    meta = {
        "geometry": geometry,
        "classes": sorted({b.class_name for b in boxes}),
        "series_key": pseudonymous_key(next(iter(series_uids))) if len(series_uids) == 1 else "",
        "model": {},
        "reviewed_slices": [],
    }
    return boxes, meta


def _region_source_uid(region) -> str | None:
    if region is None:
        return None
    for item in region.get("ContentSequence", []):
        refs = item.get("ReferencedSOPSequence")
        if refs:
            return str(refs[0].ReferencedSOPInstanceUID)
    return None


def _class_of(finding) -> str:
    _, _, findings = _codes()
    for name, code in findings.items():
        if (
            finding is not None
            and finding.value == code.value
            and finding.scheme_designator == code.scheme_designator
        ):
            return name
    return str(finding.meaning) if finding is not None else "unknown"


SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
)


def sop_class_of(path) -> str:
    """The SOP class UID of a DICOM file (header only); "" when it has none or is unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM, truncated: the CT reader gives the reason
        return ""
    return str(ds.get("SOPClassUID", ""))


def read_seg_labels(path) -> tuple[np.ndarray, dict, dict[int, str]]:
    """A SEG as a label volume (segment numbers) on the grid of its frames, turned nearest the
    identity as the CT loader turns CTs; returns ``(labels, geometry, segment labels)``."""
    import highdicom as hd

    from napari_wscovid.io.formats import reorient_nearest_identity

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True, relabel=False)
    except Exception as exc:  # highdicom raises many types for a SEG it cannot stack
        raise DicomObjectError(f"{path.name}: not a segmentation that stacks into a volume ({exc})") from exc
    affine = np.asarray(volume.affine, float)
    spacing = tuple(float(np.linalg.norm(affine[:3, a])) for a in range(3))
    direction = np.stack([affine[:3, a][::-1] / spacing[a] for a in range(3)], axis=1)
    labels, spacing, origin, direction, _ = reorient_nearest_identity(
        np.asarray(volume.array), spacing, affine[:3, 3][::-1], direction
    )
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    geometry = grid_geometry(labels.shape, spacing, origin, direction)
    return labels, geometry, names


# -------------------------------------------------------------------------------- de-identifying
#: Attributes the DICOM PS3.15 basic application confidentiality profile removes or empties
#: that these objects can carry (copied from the source CT by highdicom).
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "IssuerOfPatientID",
    "EthnicGroup",
    "PatientComments",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "RequestAttributesSequence",
    "ReferencedStudySequence",
    "ReferencedPatientSequence",
    # free text a site fills with names, MRNs or clinical notes (PS3.15 basic profile: X)
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepDescription",
    "AdmittingDiagnosesDescription",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "ImageComments",
    "StudyComments",
    "PatientMotherBirthName",
    "CountryOfResidence",
    "RegionOfResidence",
    "MilitaryRank",
    "BranchOfService",
    "PatientReligiousPreference",
    "InstitutionCodeSequence",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
)
#: Dates and times get one dummy value (the profile's action "D"): some are type 1 in a SEG.
_DUMMY_DATES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}


class UIDMap:
    """Consistent remapping of instance UIDs: the same source UID gets the same new UID in every
    object of one run, so the research copies still reference each other and their CT."""

    def __init__(self, salt: bytes | None = None):
        import secrets

        self._salt = salt if salt is not None else secrets.token_bytes(16)
        self._seen: dict[str, str] = {}
        self._produced: set[str] = set()

    def __call__(self, uid: str) -> str:
        import hashlib

        if uid in self._produced:
            # an item highdicom shares between two sequences is visited twice: map it once
            return uid
        if uid not in self._seen:
            digest = hashlib.sha256(self._salt + uid.encode()).digest()[:16]
            self._seen[uid] = f"2.25.{int.from_bytes(digest, 'big')}"
            self._produced.add(self._seen[uid])
        return self._seen[uid]


def _is_instance_uid(uid: str) -> bool:
    """SOP classes, transfer syntaxes and coding schemes are registered UIDs and keep their value."""
    from pydicom.uid import UID

    return bool(uid) and UID(uid).name == uid  # a registered UID's name is its title


def deidentify(ds, uid_map: UIDMap):
    """A research copy of ``ds`` (PS3.15 basic profile: identifying attributes removed or emptied,
    dates set to one dummy value, instance UIDs remapped by ``uid_map``)."""
    import copy

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    out = copy.deepcopy(ds)

    def walk(dataset):
        for keyword in _IDENTIFYING:
            if keyword in dataset:
                delattr(dataset, keyword)
        for elem in list(dataset):
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and elem.value:
                values = elem.value if isinstance(elem.value, list) else [elem.value]
                mapped = [uid_map(str(v)) if _is_instance_uid(str(v)) else v for v in values]
                elem.value = mapped if len(mapped) > 1 else mapped[0]
            elif elem.VR in _DUMMY_DATES and elem.value:
                elem.value = _DUMMY_DATES[elem.VR]
            elif elem.VR == "PN":
                elem.value = ""

    walk(out)
    out.remove_private_tags()  # a vendor's private elements can hold anything, names included
    if hasattr(out, "file_meta"):
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(out, keyword, "")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "PS3.15 basic profile (napari-wscovid)"
    method = Dataset()
    method.CodeValue, method.CodingSchemeDesignator = "113100", "DCM"
    method.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = DicomSequence([method])
    return out
