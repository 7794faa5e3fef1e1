"""Real lesion-free lungs as backgrounds for lesion synthesis, cached as small arrays.

Each real patient's CT is read with the plugin's own ``load_ct`` and ``segment_lungs``, cropped to
the lungs' box plus a margin, turned to the canonical axis order (array axes along world
+z/+y/+x, i.e. superior / posterior / patient-left in LPS) and resampled in-plane to
``pixel_mm``. The network sees a lung crop of about 330 mm at 224 px (1.47 mm per pixel), so a
1.5 mm grid loses nothing the network could use and keeps six patients within the GPU run's
data budget. Slices that hold a real lesion (COVID-CT-MD's per-slice labels) are flagged
unusable: they are neither lesion-free backgrounds nor labelled as the synthesis says.

``python -m training.real_backgrounds --data ../shared/data --out runs/backgrounds`` writes one
``<patient>.npz`` per patient (int16 HU, uint8 lung labels, spacing, usable slices, class).
The file names are the public datasets' own anonymised case ids (P001, LIDC-IDRI-0001, ...).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

DEFAULT_PIXEL_MM = 1.5
MARGIN_MM = 15.0


@dataclass(frozen=True)
class RealPatient:
    """One real CT of ``../shared/data``: id, patient class, folder, and how to get slice labels."""

    patient_id: str
    label: str  # the patient's class: "NP", "CAP" or "COVID-19"
    path: str  # relative to the data root
    source: str
    slice_labelled: bool = False  # COVID-CT-MD per-slice infection labels exist


#: The real chest CTs with lung anatomy we may paint into (see ``../shared/data/README.md``).
REAL_PATIENTS = (
    RealPatient("P001", "COVID-19", "covid-ct-md/sample_data/COVID-19 subjects/P001", "covid-ct-md", True),
    RealPatient("cap001", "CAP", "covid-ct-md/sample_data/Cap subjects/cap001", "covid-ct-md", True),
    RealPatient("normal001", "NP", "covid-ct-md/sample_data/Normal subjects/normal001", "covid-ct-md"),
    RealPatient("LIDC-IDRI-0001", "NP", "lidc-idri/LIDC-IDRI-0001/dicom", "lidc-idri"),
    RealPatient("LIDC-IDRI-0003", "NP", "lidc-idri/LIDC-IDRI-0003/dicom", "lidc-idri"),
    RealPatient("Lung_Dx-A0001", "NP", "lung-pet-ct-dx/Lung_Dx-A0001", "lung-pet-ct-dx"),
    # 3 mm thorax-abdomen NIfTI, normal lungs in its upper slices: a fourth scanner, coarse grid
    RealPatient("totalseg-example", "NP", "totalseg-example/example_ct.nii.gz", "totalseg-example"),
)
PATIENTS_BY_ID = {p.patient_id: p for p in REAL_PATIENTS}


@dataclass
class Background:
    """A real lung region on a canonical grid; ``usable`` marks slices free of real lesions."""

    patient_id: str
    label: str
    hu: np.ndarray  # int16 (z, y, x), axes along world +z (superior), +y (posterior), +x (left)
    lung: np.ndarray  # uint8, 0 outside, 1 right lung, 2 left lung
    spacing: tuple[float, float, float]
    usable: np.ndarray  # bool per slice: lesion-free, may receive synthetic lesions and labels
    real_positive: np.ndarray  # bool per slice: a real lesion (labelled slices only)
    #: 99th percentile of the lung's vessels (HU): above ~200 the scan has IV contrast; measured
    #: from ``hu`` and ``lung`` when not given
    vessel_p99: float | None = None

    def __post_init__(self):
        if self.vessel_p99 is None:
            self.vessel_p99 = vessel_p99(self.hu, self.lung)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            patient_id=self.patient_id,
            label=self.label,
            hu=self.hu,
            lung=self.lung,
            spacing=np.asarray(self.spacing, float),
            usable=self.usable,
            real_positive=self.real_positive,
        )

    @classmethod
    def load(cls, path: str | Path) -> Background:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                str(f["patient_id"]),
                str(f["label"]),
                f["hu"],
                f["lung"],
                tuple(float(s) for s in f["spacing"]),
                f["usable"].astype(bool),
                f["real_positive"].astype(bool),
            )


def vessel_p99(hu: np.ndarray, lung: np.ndarray) -> float:
    """99th percentile of the in-lung voxels above -300 HU (vessels, mostly); nan without any.

    COVID-CT-MD's unenhanced scans measure 63-74 HU, LIDC-IDRI's and Lung-PET-CT-Dx's 339-455.
    """
    inner = ndimage.binary_erosion(lung > 0, iterations=2)
    values = hu[inner]
    values = values[values > -300]
    return float(np.percentile(values, 99)) if values.size else float("nan")


def canonical(volume, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Flip arrays so that each array axis runs along +world of its nearest world axis.

    Only axis flips (no rotations): CT series are axial with at most a small tilt, and the
    synthesis only needs to know which way is superior and posterior. An array of fewer
    dimensions (per-slice flags) is flipped along the volume's leading axes.
    """
    direction = np.asarray(volume.direction, float)
    out = []
    for a in arrays:
        for axis in range(np.ndim(a)):
            if direction[axis, axis] < 0:
                a = np.flip(a, axis)
        out.append(np.ascontiguousarray(a))
    return tuple(out)


def make_background(
    patient_id: str,
    label: str,
    volume,
    lung: np.ndarray,
    positive: np.ndarray | None = None,
    *,
    pixel_mm: float = DEFAULT_PIXEL_MM,
    margin_mm: float = MARGIN_MM,
    min_lung_mm2: float = 200.0,
) -> Background:
    """Crop, orient and resample one CT and its lung labels (``positive``: per-slice real lesions)."""
    hu = np.asarray(volume.hu)
    lung = np.asarray(lung, np.uint8)
    positive = np.zeros(hu.shape[0], bool) if positive is None else np.asarray(positive, bool)
    hu, lung, positive = canonical(volume, hu, lung, positive)
    dz, dy, dx = (float(s) for s in volume.spacing)
    area = (lung > 0).reshape(lung.shape[0], -1).sum(1) * dy * dx
    zs = np.flatnonzero(area >= min_lung_mm2)
    if zs.size == 0:
        raise ValueError(f"{patient_id}: no slice holds {min_lung_mm2:g} mm^2 of lung")
    ys = np.flatnonzero((lung[zs] > 0).any(axis=(0, 2)))
    xs = np.flatnonzero((lung[zs] > 0).any(axis=(0, 1)))
    my, mx = int(round(margin_mm / dy)), int(round(margin_mm / dx))
    box = (
        slice(zs.min(), zs.max() + 1),
        slice(max(ys.min() - my, 0), ys.max() + my + 1),
        slice(max(xs.min() - mx, 0), xs.max() + mx + 1),
    )
    zoom = (1.0, dy / pixel_mm, dx / pixel_mm)
    hu_small = ndimage.zoom(hu[box].astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
    lung_small = ndimage.zoom(lung[box], zoom, order=0, grid_mode=True, mode="nearest")
    spacing = (dz, dy * hu[box].shape[1] / hu_small.shape[1], dx * hu[box].shape[2] / hu_small.shape[2])
    positive = positive[box[0]]
    return Background(
        patient_id,
        label,
        np.clip(np.rint(hu_small), -1024, 3071).astype(np.int16),
        lung_small.astype(np.uint8),
        spacing,
        usable=~positive,
        real_positive=positive,
    )


def slice_positive(patient: RealPatient, volume, data_root: Path) -> np.ndarray | None:
    """Per-slice real-lesion flags in the volume's array order (labelled patients only)."""
    if not patient.slice_labelled:
        return None
    from training.datasets import covid_ct_md_records, slice_labels_in_array_order

    rec = {r.patient_id: r for r in covid_ct_md_records(data_root / "covid-ct-md")}[patient.patient_id]
    return slice_labels_in_array_order(volume, rec.slice_labels, rec.slice_order).astype(bool)


def build_cache(
    data_root: str | Path,
    out_dir: str | Path,
    patients=None,
    *,
    pixel_mm: float = DEFAULT_PIXEL_MM,
    lung_method: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<patient>.npz`` for each real patient present under ``data_root``; returns the files."""
    from napari_wscovid import load_ct
    from napari_wscovid.lung import segment_lungs

    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for patient in patients or REAL_PATIENTS:
        target = out_dir / f"{patient.patient_id}.npz"
        if target.exists() and not overwrite:
            written.append(target)
            continue
        folder = data_root / patient.path
        if not folder.exists():
            log.warning("%s: %s is absent; skipped", patient.patient_id, folder)
            continue
        volume = load_ct(str(folder))
        lung = segment_lungs(volume, **({"method": lung_method} if lung_method else {}))
        bg = make_background(
            patient.patient_id,
            patient.label,
            volume,
            lung,
            slice_positive(patient, volume, data_root),
            pixel_mm=pixel_mm,
        )
        tmp = target.with_name(target.stem + ".tmp.npz")
        bg.save(tmp)
        tmp.replace(target)
        log.info(
            "%s: %s, %d of %d slices lesion-free, %.1f MB",
            patient.patient_id,
            bg.hu.shape,
            int(bg.usable.sum()),
            len(bg.usable),
            target.stat().st_size / 1e6,
        )
        written.append(target)
    return written


def load_backgrounds(folder: str | Path, patient_ids=None, exclude=()) -> list[Background]:
    """The cached backgrounds in ``folder`` (all, or those in ``patient_ids``), minus ``exclude``."""
    files = sorted(Path(folder).glob("*.npz"))
    out = []
    for f in files:
        if f.name.endswith(".tmp.npz"):
            continue
        bg = Background.load(f)
        if patient_ids is not None and bg.patient_id not in patient_ids:
            continue
        if bg.patient_id in exclude:
            continue
        out.append(bg)
    if not out:
        raise FileNotFoundError(
            f"no background .npz in {folder} (selected {patient_ids}, excluded {exclude})"
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data", help="the real-data root")
    parser.add_argument("--out", default="runs/backgrounds", help="folder for the .npz files")
    parser.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM)
    parser.add_argument("--patients", nargs="*", help=f"subset of {sorted(PATIENTS_BY_ID)}")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    patients = [PATIENTS_BY_ID[p] for p in args.patients] if args.patients else None
    files = build_cache(args.data, args.out, patients, pixel_mm=args.pixel_mm, overwrite=args.overwrite)
    total = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} backgrounds in {args.out}: {total:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
