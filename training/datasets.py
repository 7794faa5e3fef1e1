"""Slice datasets for the classifier: synthetic phantoms, CT volume folders and 2-D image folders.

Every dataset yields ``(image, label, patient_id)``: a (1, S, S) float32 tensor in [0, 1], the
index of the slice's class in the task's class tuple, and a string naming the patient (used to
split and to bootstrap by patient, never to train).

Slice labels. A slice with a lesion carries its patient's class; a lung slice without a lesion
is labelled NP, whatever the patient's class, as COVID-CT-MD's per-slice labels do (a lesion-free
slice of a COVID-19 patient looks like a normal slice, and labelling it COVID-19 would teach the
network to guess the patient from anatomy). Phantom slices whose lesion is too small to judge
(between 0 and ``min_lesion_fraction`` of the slice's lung) are left out rather than forced
into either class. Volumes without per-slice labels get the patient's class on every lung slice
(the weak, patient-level label).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from napari_wscovid.models.wsnet import TASK_CLASSES

log = logging.getLogger(__name__)

LESION_KINDS = ("COVID-19", "CAP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- common helpers


def _prepare(hu, lung_mask, indices, size, spacing_yx, **kwargs):
    """Lung-cropped, normalised (N, 1, size, size) float32 slices, exactly as the plugin prepares them."""
    from napari_wscovid.preprocess import prepare_slices

    images, _ = prepare_slices(hu, lung_mask, list(indices), size=size, spacing_yx=spacing_yx, **kwargs)
    return np.asarray(images, dtype=np.float32)


def slice_labels_from_masks(
    lung_mask: np.ndarray,
    lesion_mask: np.ndarray,
    kind: str,
    *,
    min_lung_fraction: float = 0.01,
    min_lesion_fraction: float = 0.002,
    pneumonia_labels: Sequence[int] = (1, 2, 3),
) -> tuple[np.ndarray, list[str]]:
    """Usable slice indices of a volume and their class names (see the module docstring).

    Parameters
    ----------
    lung_mask, lesion_mask : np.ndarray
        (z, y, x) masks; any non-zero value counts.
    kind : str
        The patient's class.
    min_lung_fraction : float
        Slices whose lung covers less of the slice than this are skipped (lung apex and base).
    min_lesion_fraction : float
        Lesion area, relative to the slice's lung area, from which a slice counts as a lesion slice.
    pneumonia_labels : sequence of int
        Lesion-mask values that are pneumonia (GGO, consolidation, crazy paving). Nodules (4) are
        distractors, not pneumonia: a slice with only a nodule is lesion-free here.
    """
    lung = (lung_mask > 0).reshape(lung_mask.shape[0], -1).sum(1)
    lesion = (
        (np.isin(lesion_mask, pneumonia_labels) & (lung_mask > 0)).reshape(lesion_mask.shape[0], -1).sum(1)
    )
    plane = lung_mask.shape[1] * lung_mask.shape[2]
    indices, names = [], []
    for z in np.flatnonzero(lung >= min_lung_fraction * plane):
        frac = lesion[z] / lung[z]
        if frac >= min_lesion_fraction:
            indices.append(int(z))
            names.append(kind)
        elif frac == 0:
            indices.append(int(z))
            names.append("NP")
    return np.asarray(indices, dtype=int), names


class SliceSet(Dataset):
    """A finite, in-memory set of prepared slices (float16 to halve memory).

    Parameters
    ----------
    images : torch.Tensor
        (N, 1, S, S) in [0, 1].
    labels : sequence of int
        Class indices into ``classes``.
    patient_ids : sequence of str
    classes : tuple of str
    patient_classes : sequence of str, optional
        Each sample's patient class (for stratified patient splits); the slice class by default.
    """

    def __init__(self, images, labels, patient_ids, classes, patient_classes=None):
        self.images = torch.as_tensor(images).to(torch.float16)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.patient_ids = list(patient_ids)
        self.classes = tuple(classes)
        self.patient_classes = (
            list(patient_classes) if patient_classes is not None else [self.classes[i] for i in self.labels]
        )
        if not (len(self.images) == len(self.labels) == len(self.patient_ids) == len(self.patient_classes)):
            raise ValueError("images, labels, patient_ids and patient_classes differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float(), int(self.labels[i]), self.patient_ids[i]

    def subset(self, indices) -> SliceSet:
        idx = np.asarray(indices, dtype=int)
        return SliceSet(
            self.images[idx],
            self.labels[idx],
            [self.patient_ids[i] for i in idx],
            self.classes,
            [self.patient_classes[i] for i in idx],
        )

    def label_counts(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=len(self.classes))

    @staticmethod
    def concat(sets: Sequence[SliceSet]) -> SliceSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            raise ValueError("nothing to concatenate")
        return SliceSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.labels for s in sets]),
            [p for s in sets for p in s.patient_ids],
            sets[0].classes,
            [p for s in sets for p in s.patient_classes],
        )


# ----------------------------------------------------------------------------- phantoms


@dataclass
class _PoolEntry:
    images: torch.Tensor  # (n, 1, S, S) float16
    labels: torch.Tensor  # (n,) int64
    patient_id: str
    kind: str


def stream_seed(*parts: int) -> int:
    """Mix integers (seed, rank, worker, ...) into one 63-bit seed; stable across runs."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


class PhantomSliceDataset(IterableDataset):
    """Unlimited stream of labelled slices from synthetic CT phantoms.

    Generating a 3-D phantom costs seconds, drawing a slice costs nothing: each worker keeps a
    pool of ``pool_per_class`` prepared volumes per phantom kind, draws slices from it, and
    replaces one volume with a freshly generated one every ``refresh_every`` draws, so variety
    grows without stalling. Run it in a ``DataLoader`` worker to overlap generation with training.
    Each (seed, rank, worker) gets its own stream, so DDP ranks and workers do not repeat each
    other. Patient kinds are drawn uniformly; slice labels follow the module docstring.

    Parameters
    ----------
    classes : tuple of str
        The task's classes; phantom kinds outside it are not generated, and slices whose label
        is not a class (NP slices in CAP vs COVID-19) are skipped.
    size : int
        Side of the prepared slices.
    phantom_size, n_slices, spacing_z : int, int, float
        Geometry of the generated volumes.
    pool_per_class : int
    refresh_every : int
        Draws between two volume replacements; 0 never refreshes.
    seed : int
    balanced : bool
        Draw the slice class uniformly, then a phantom and slice of that class, so every class is
        equally frequent (the loss weights then come out as 1). Otherwise draw the phantom kind
        uniformly and a lung slice of it: lesion-free NP slices dominate, as in real scans, and
        the class-balanced loss has to compensate (the paper's setting).
    nodules_p : float
        Probability that a phantom also carries nodules (label 4), as distractors.
    phantom_fn : callable, optional
        ``(kind, seed) -> Phantom``; ``napari_wscovid.phantom.make_phantom`` by default (tests inject fakes).
    prepare_fn : callable, optional
        ``(hu, lung_mask, indices, size, spacing_yx) -> (n, 1, size, size)``.
    """

    def __init__(
        self,
        classes: Sequence[str] = TASK_CLASSES["3class"],
        *,
        size: int = 224,
        phantom_size: int = 256,
        n_slices: int = 64,
        spacing_z: float = 5.0,
        pool_per_class: int = 4,
        refresh_every: int = 256,
        seed: int = 0,
        rank: int = 0,
        balanced: bool = False,
        nodules_p: float = 0.3,
        min_lung_fraction: float = 0.01,
        min_lesion_fraction: float = 0.002,
        phantom_fn: Callable | None = None,
        prepare_fn: Callable | None = None,
    ):
        self.classes = tuple(classes)
        self.kinds = tuple(k for k in ("NP", *LESION_KINDS) if k in self.classes)
        if not self.kinds:
            raise ValueError(f"no phantom kind among classes {self.classes}")
        self.size, self.phantom_size, self.n_slices, self.spacing_z = size, phantom_size, n_slices, spacing_z
        self.pool_per_class, self.refresh_every = pool_per_class, refresh_every
        self.seed, self.rank, self.nodules_p, self.balanced = seed, rank, nodules_p, balanced
        self.min_lung_fraction, self.min_lesion_fraction = min_lung_fraction, min_lesion_fraction
        self.phantom_fn = phantom_fn or self._make_phantom
        self.prepare_fn = prepare_fn or _prepare
        self.start_step = 0  # the trainer sets it on resume so a resumed stream does not replay

    def _make_phantom(self, kind: str, seed: int):
        from napari_wscovid.phantom import make_phantom

        rng = np.random.default_rng(seed)
        return make_phantom(
            kind,
            n_slices=self.n_slices,
            size=self.phantom_size,
            spacing=(self.spacing_z, None, None),
            seed=int(seed % 2**31),
            nodules=bool(rng.random() < self.nodules_p),
        )

    def make_entry(self, kind: str, seed: int) -> _PoolEntry | None:
        """Generate one phantom and prepare its usable slices; ``None`` if it has none for this task."""
        ph = self.phantom_fn(kind, seed)
        idx, names = slice_labels_from_masks(
            ph.lung_mask,
            ph.lesion_mask,
            kind,
            min_lung_fraction=self.min_lung_fraction,
            min_lesion_fraction=self.min_lesion_fraction,
        )
        keep = [i for i, n in enumerate(names) if n in self.classes]
        if not keep:
            return None
        idx = idx[keep]
        labels = [self.classes.index(names[i]) for i in keep]
        spacing = tuple(ph.volume.spacing)
        images = self.prepare_fn(ph.volume.hu, ph.lung_mask, idx, self.size, spacing[1:])
        return _PoolEntry(
            torch.as_tensor(images).to(torch.float16),
            torch.as_tensor(labels, dtype=torch.int64),
            f"phantom-{kind}-{seed}",
            kind,
        )

    def _stream_rng(self) -> np.random.Generator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return np.random.default_rng(stream_seed(self.seed, self.rank, worker, self.start_step))

    def _new_entry(self, kind: str, rng: np.random.Generator) -> _PoolEntry | None:
        for _ in range(10):
            entry = self.make_entry(kind, int(rng.integers(2**62)))
            if entry is not None:
                return entry
        return None

    def build_pool(self, rng: np.random.Generator) -> dict[str, list[_PoolEntry]]:
        pool = {}
        for kind in self.kinds:
            entries = [self._new_entry(kind, rng) for _ in range(self.pool_per_class)]
            pool[kind] = [e for e in entries if e is not None]
        pool = {k: v for k, v in pool.items() if v}
        if not pool:
            raise RuntimeError("phantom generation produced no usable slices for this task")
        return pool

    def __iter__(self):
        rng = self._stream_rng()
        pool = self.build_pool(rng)
        kinds = sorted(pool)
        draws = 0
        while True:
            if self.balanced:
                entry, j = self._draw_balanced(pool, rng)
            else:
                kind = kinds[int(rng.integers(len(kinds)))]
                entry = pool[kind][int(rng.integers(len(pool[kind])))]
                j = int(rng.integers(len(entry.labels)))
            yield entry.images[j].float(), int(entry.labels[j]), entry.patient_id
            draws += 1
            if self.refresh_every and draws % self.refresh_every == 0:
                refresh = kinds[int(rng.integers(len(kinds)))]
                new = self._new_entry(refresh, rng)
                if new is not None:
                    pool[refresh][int(rng.integers(len(pool[refresh])))] = new

    @staticmethod
    def _draw_balanced(pool, rng: np.random.Generator) -> tuple[_PoolEntry, int]:
        entries = [e for v in pool.values() for e in v]
        present = sorted({int(c) for e in entries for c in e.labels.unique()})
        label = present[int(rng.integers(len(present)))]
        holders = [e for e in entries if bool((e.labels == label).any())]
        entry = holders[int(rng.integers(len(holders)))]
        candidates = torch.nonzero(entry.labels == label).ravel()
        return entry, int(candidates[int(rng.integers(len(candidates)))])

    def expected_frequencies(self, reference: SliceSet | None = None) -> np.ndarray:
        """Class frequencies of the stream: uniform when balanced, else those of ``reference``
        (a :meth:`fixed_set` from the same generator)."""
        if self.balanced:
            return np.full(len(self.classes), 1.0 / len(self.classes))
        if reference is None:
            raise ValueError("an unbalanced stream needs a reference set to estimate its frequencies")
        counts = reference.label_counts().astype(float)
        return counts / counts.sum()

    def fixed_set(self, volumes_per_class: int | None = None) -> SliceSet:
        """Every usable slice of a fixed set of phantoms: a validation or test set.

        Use a ``seed`` different from the training stream's; the stream mixes its seed with the
        rank and worker, so the phantoms differ.
        """
        rng = np.random.default_rng(stream_seed(self.seed, 1_000_003))
        n = volumes_per_class or self.pool_per_class
        entries = [self._new_entry(kind, rng) for kind in self.kinds for _ in range(n)]
        entries = [e for e in entries if e is not None]
        return SliceSet(
            torch.cat([e.images for e in entries]),
            torch.cat([e.labels for e in entries]),
            [e.patient_id for e in entries for _ in range(len(e.labels))],
            self.classes,
            [e.kind for e in entries for _ in range(len(e.labels))],
        )


# ----------------------------------------------------------------------------- CT volume folders


@dataclass
class VolumeRecord:
    """One patient's CT: its class, where it is, and optional per-slice infection labels.

    ``slice_labels`` are 0/1 per slice, in array order (``slice_order="array"``) or in descending
    z (superior first, ``"descending_z"``: COVID-CT-MD's order). Entries past the volume are ignored.
    """

    patient_id: str
    label: str
    path: Path
    slice_labels: np.ndarray | None = None
    slice_order: str = "array"


def slice_labels_in_array_order(volume, labels: np.ndarray, order: str) -> np.ndarray:
    """Per-slice labels re-indexed to the volume's array z order.

    Parameters
    ----------
    volume : CTVolume
    labels : np.ndarray
        0/1 per slice in ``order``; may be longer than the volume (padding is dropped).
    order : {"array", "descending_z"}
        "descending_z": the j-th label belongs to the slice with the j-th largest world z
        (patient LPS z = DICOM SliceLocation, superior first).
    """
    nz = volume.shape[0]
    labels = np.asarray(labels).ravel()
    if len(labels) < nz:
        raise ValueError(f"{len(labels)} slice labels for a volume of {nz} slices")
    if order == "array":
        return labels[:nz].astype(np.int64)
    if order != "descending_z":
        raise ValueError(f"unknown slice order {order!r}")
    ks = np.arange(nz)
    world_z = volume.index_to_world(np.stack([ks, 0 * ks, 0 * ks], axis=1).astype(float))[:, 0]
    desc = np.argsort(-world_z, kind="stable")
    out = np.zeros(nz, dtype=np.int64)
    out[desc] = labels[:nz]
    return out


class VolumeFolderDataset(SliceSet):
    """Lung slices of CT volumes listed in a CSV, prepared like the plugin's input.

    Volumes are read with ``napari_wscovid.load_ct``, lungs segmented with
    ``napari_wscovid.segment_lungs``, and every lung slice prepared with ``prepare_slices`` at
    construction; all slices are then held in memory (float16). That suits the few public
    volumes at hand; preprocess a large cohort to disk first.

    Parameters
    ----------
    records : sequence of VolumeRecord
    classes : tuple of str
        The task's classes; slices whose class is not among them are dropped.
    size : int
    min_lung_fraction : float
    load_fn, lung_fn, prepare_fn : callable, optional
        Injected for tests; the package's functions by default.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        classes: Sequence[str] = TASK_CLASSES["3class"],
        *,
        size: int = 224,
        min_lung_fraction: float = 0.01,
        load_fn: Callable | None = None,
        lung_fn: Callable | None = None,
        prepare_fn: Callable | None = None,
    ):
        if load_fn is None:
            from napari_wscovid import load_ct as load_fn
        if lung_fn is None:
            from napari_wscovid import segment_lungs as lung_fn
        prepare_fn = prepare_fn or _prepare
        classes = tuple(classes)
        parts = []
        for rec in records:
            volume = load_fn(str(rec.path))
            lung = np.asarray(lung_fn(volume))
            area = (lung > 0).reshape(lung.shape[0], -1).sum(1)
            idx = np.flatnonzero(area >= min_lung_fraction * lung.shape[1] * lung.shape[2])
            if rec.slice_labels is not None:
                positive = slice_labels_in_array_order(volume, rec.slice_labels, rec.slice_order)
                names = [rec.label if positive[z] else "NP" for z in idx]
            else:
                names = [rec.label] * len(idx)
            keep = [i for i, n in enumerate(names) if n in classes]
            if not keep:
                log.warning("%s: no slice of a class in %s", rec.patient_id, classes)
                continue
            idx = idx[keep]
            images = prepare_fn(
                volume.hu,
                lung,
                idx,
                size,
                tuple(volume.spacing)[1:],
                is_hu=volume.is_hu,
                padding_mask=volume.padding_mask,
            )
            parts.append(
                SliceSet(
                    images,
                    [classes.index(names[i]) for i in keep],
                    [rec.patient_id] * len(keep),
                    classes,
                    [rec.label] * len(keep),
                )
            )
            log.info("%s (%s): %d slices", rec.patient_id, rec.label, len(keep))
        merged = SliceSet.concat(parts)
        super().__init__(merged.images, merged.labels, merged.patient_ids, classes, merged.patient_classes)

    @staticmethod
    def read_csv(csv_path: str | Path, root: str | Path | None = None) -> list[VolumeRecord]:
        """Records from a CSV with columns ``patient_id,label[,path][,slice_labels]``.

        ``path`` (default: the patient id) and ``slice_labels`` (a .npy or one-column .csv of
        0/1 in array order) are relative to ``root`` (default: the CSV's folder).
        """
        csv_path = Path(csv_path)
        root = Path(root) if root is not None else csv_path.parent
        records = []
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                sl = None
                if row.get("slice_labels"):
                    p = root / row["slice_labels"]
                    sl = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, delimiter=",", ndmin=1)
                records.append(
                    VolumeRecord(
                        row["patient_id"], row["label"], root / (row.get("path") or row["patient_id"]), sl
                    )
                )
        return records


COVID_CT_MD_FOLDERS = {
    "COVID-19": "COVID-19 subjects",
    "CAP": "Cap subjects",
    "NP": "Normal subjects",
}


def covid_ct_md_records(root: str | Path) -> list[VolumeRecord]:
    """The COVID-CT-MD series present under ``root`` with their per-slice labels.

    Per SOURCE.md: labels from ``Slice-level-labels-updated-1.npy``; its row is the patient's
    0-based row in ``Index.csv`` (P001 -> 0, cap001 -> 54); its column j is the j-th slice in
    descending SliceLocation order. Normal patients have no row: all their slices are NP.
    """
    root = Path(root)
    labels = np.load(root / "Slice-level-labels-updated-1.npy")
    with open(root / "Index.csv", newline="") as fh:
        rows = {r["Folder/ID"]: i for i, r in enumerate(csv.DictReader(fh))}
    records = []
    for label, folder in COVID_CT_MD_FOLDERS.items():
        base = root / "sample_data" / folder
        if not base.is_dir():
            continue
        for patient in sorted(p for p in base.iterdir() if p.is_dir()):
            pid = patient.name
            if label == "NP":
                sl = np.zeros(labels.shape[1], dtype=np.int64)
            elif pid in rows:
                sl = labels[rows[pid]].astype(np.int64)
            else:
                raise ValueError(f"{pid} has no row in Index.csv")
            records.append(VolumeRecord(pid, label, patient, sl, "descending_z"))
    return records


def covid_ct_md_slices(root: str | Path, classes=TASK_CLASSES["3class"], **kwargs) -> VolumeFolderDataset:
    """Slice-labelled COVID-CT-MD lung slices (see :func:`covid_ct_md_records`)."""
    return VolumeFolderDataset(covid_ct_md_records(root), classes, **kwargs)


# ----------------------------------------------------------------------------- 2-D image folders

UCSD_CLASS_MAP = {"CT_COVID": "COVID-19", "CT_NonCOVID": "NP"}


def _image_group(path: Path) -> str:
    """Best-guess source id of a UCSD image (preprint id before ``-p<page>``, or before ``%``).

    The dataset has no patient ids; images from one paper are likely one patient, so they are
    kept on one side of a split.
    """
    m = re.match(r"^(.*?)(?:-p\d+|%|\(|$)", path.stem)
    return f"{path.parent.name}/{m.group(1) if m and m.group(1) else path.stem}"


def load_gray_image(path: str | Path, size: int) -> np.ndarray:
    """Any image file -> (size, size) float32 in [0, 1], grayscale, zero-padded to square.

    Every file takes the same path (8-bit grayscale -> float -> square -> resampled), so the
    network sees no trace of the file format or colour mode; alpha is dropped.
    """
    from PIL import Image

    with Image.open(path) as im:
        gray = np.asarray(im.convert("RGB").convert("L"), dtype=np.float32) / 255.0
    h, w = gray.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
    out = Image.fromarray(square, mode="F").resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def plugin_image_input(path: str | Path, size: int) -> np.ndarray:
    """One 2-D image file -> the (size, size) float32 input the plugin itself would give the network.

    The same path as ``napari_wscovid.detect`` on a PNG/JPG: ``load_ct`` (display intensities),
    the display-image lung finder, lung crop, mask and resize. Training on whole resized figures
    instead would teach the network a view it never gets at run time. A picture in which no lung
    is found is used whole (the crop falls back to the full slice, unmasked).
    """
    from napari_wscovid.io import load_ct
    from napari_wscovid.lung import segment_lungs
    from napari_wscovid.pipeline import model_input_kwargs
    from napari_wscovid.preprocess import prepare_slices

    volume = load_ct(path, trusted=True)  # public data sets, read by the thousand: no child per file
    lung = segment_lungs(volume)
    kwargs = model_input_kwargs(volume, lung, size)
    mask_outside_lung = bool(lung.any())
    images, _ = prepare_slices(volume.hu, lung, [0], mask_outside_lung=mask_outside_lung, **kwargs)
    return np.asarray(images[0, 0], dtype=np.float32)


MEDSEG_CLASS_MAP = {"images": "COVID-19"}


def stem_group(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


class SliceImageFolderDataset(SliceSet):
    """2-D slice images in one folder per class (e.g. UCSD COVID-CT).

    Parameters
    ----------
    root : path
    class_map : dict, optional
        Folder name -> class name; UCSD's by default. Note UCSD's non-COVID folder mixes normal
        and other findings: mapped to NP it is "not COVID-19", not "no pneumonia".
    classes : tuple of str
    size : int
    group_fn : callable, optional
        Path -> group id used in place of a patient id.
    preparation : {"plugin", "whole"}
        "plugin" (default): each image goes through the plugin's own 2-D path
        (:func:`plugin_image_input`: lungs found, cropped, masked), so training sees what
        detection sees. "whole": the whole picture, grayscale, padded square and resized.
    """

    def __init__(
        self,
        root: str | Path,
        class_map: dict[str, str] | None = None,
        classes: Sequence[str] = TASK_CLASSES["np_vs_covid"],
        *,
        size: int = 224,
        group_fn: Callable[[Path], str] = _image_group,
        preparation: str = "plugin",
    ):
        root = Path(root)
        class_map = class_map or UCSD_CLASS_MAP
        classes = tuple(classes)
        paths, labels = [], []
        for folder, name in sorted(class_map.items()):
            if name not in classes:
                continue
            files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [classes.index(name)] * len(files)
        if not paths:
            raise ValueError(f"no images of classes {classes} under {root}")
        if preparation not in ("plugin", "whole"):
            raise ValueError(f"preparation must be 'plugin' or 'whole', got {preparation!r}")
        load = plugin_image_input if preparation == "plugin" else load_gray_image
        images = np.stack([load(p, size) for p in paths])[:, None]
        super().__init__(images, labels, [group_fn(p) for p in paths], classes)
        self.paths = paths


# ----------------------------------------------------------------------------- patient-level splits


@dataclass
class Fold:
    """Sample indices of one cross-validation fold; no patient is in two of them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def patient_kfold(
    patient_ids: Sequence[str],
    labels: Sequence,
    k: int = 5,
    seed: int = 0,
    *,
    val_folds: int = 1,
) -> list[Fold]:
    """Patient-level stratified k-fold: each patient is tested exactly once.

    Fold ``i`` tests group-fold ``i``, validates on the next ``val_folds`` group-folds and trains
    on the rest (60/20/20 for k = 5, val_folds = 1; ``val_folds=0`` leaves val empty).

    Parameters
    ----------
    patient_ids : sequence of str
        One per sample.
    labels : sequence
        One per sample, used for stratification; the patient's class is the right choice (slice
        labels vary within a patient).
    k, seed : int
    val_folds : int
    """
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.asarray(patient_ids)
    y = np.asarray(labels)
    if len(groups) != len(y):
        raise ValueError("patient_ids and labels differ in length")
    n_groups = len(np.unique(groups))
    if not 2 <= k <= n_groups:
        raise ValueError(f"k={k} folds need 2 <= k <= number of patients ({n_groups})")
    if not 0 <= val_folds <= k - 2:
        raise ValueError(f"val_folds must be in [0, k - 2], got {val_folds}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tests = [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]
    folds = []
    for i in range(k):
        val_parts = [tests[(i + j) % k] for j in range(1, val_folds + 1)]
        val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=int)
        held = np.union1d(tests[i], val)
        train = np.setdiff1d(np.arange(len(y)), held)
        folds.append(Fold(train, val, np.sort(tests[i])))
    for f in folds:
        check_no_leakage(groups, f)
    return folds


def run_fold(patient_ids: Sequence[str], patient_classes: Sequence, cfg) -> tuple[Fold, int]:
    """``(fold, k)``: the fold a run's config (``k_folds``, ``fold``, ``seed``) takes of one source,
    for training and for evaluating the same split. A source with fewer patients than folds
    (COVID-CT-MD's sample has 3) is split into as many folds as it has patients."""
    k = min(cfg.k_folds, len(set(patient_ids)))
    return patient_kfold(patient_ids, patient_classes, k=k, seed=cfg.seed)[cfg.fold % k], k


def check_no_leakage(patient_ids: Sequence[str], fold: Fold) -> None:
    """Raise ``ValueError`` if a patient has samples in two parts of ``fold``."""
    ids = np.asarray(patient_ids)
    parts = {name: set(ids[getattr(fold, name)]) for name in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = parts[a] & parts[b]
        if shared:
            raise ValueError(f"patients in both {a} and {b}: {sorted(shared)[:5]}")


def infinite_indices(n: int, seed: int, rank: int = 0, world_size: int = 1):
    """Endless random sample indices, a different stream per rank (DistributedSampler's role)."""
    rng = np.random.default_rng(stream_seed(seed, rank, world_size))
    while True:
        yield from rng.permutation(n).tolist()


# ------------------------------------------------------------------------ synthetic lesions in real lungs


class SynthInRealSliceDataset(PhantomSliceDataset):
    """Unlimited stream of real lung slices with synthetic pneumonia painted in.

    The same pool-and-refresh stream as :class:`PhantomSliceDataset`; a "phantom" here is one real
    background (:mod:`training.real_backgrounds`) chosen by the seed, with lesions of the drawn
    kind painted in by :func:`training.synthesis.synthesize`. NP cases are the real lungs as they
    are (with distractor nodules in some). Slices of a background that hold a real lesion carry
    no lung in the case and are never drawn.

    Parameters
    ----------
    backgrounds : sequence of Background
        Only patients that may be trained on (or, for a test set, only held-out ones).
    synthesis : dict
        Options of :func:`training.synthesis.synthesize` for every case (``distractor_fraction``,
        ``mass_fraction``, ``enhance_fraction``); its defaults when empty.
    classes, size, pool_per_class, refresh_every, seed, rank, balanced : see PhantomSliceDataset
    """

    def __init__(
        self, backgrounds, classes: Sequence[str] = TASK_CLASSES["3class"], synthesis=None, **kwargs
    ):
        backgrounds = list(backgrounds)
        if not backgrounds:
            raise ValueError("no backgrounds to paint into")
        self.backgrounds = backgrounds
        self.synthesis = dict(synthesis or {})
        super().__init__(classes, phantom_fn=self._synthesize, **kwargs)

    def _background(self, seed: int):
        return self.backgrounds[seed % len(self.backgrounds)]

    def _synthesize(self, kind: str, seed: int):
        from training.synthesis import synthesize

        return synthesize(self._background(seed), kind, seed=int(seed % 2**63), **self.synthesis)

    def make_entry(self, kind: str, seed: int) -> _PoolEntry | None:
        entry = super().make_entry(kind, seed)
        if entry is not None:
            # The patient is the real background: the cases painted into one patient's lungs are
            # not independent, so a bootstrap resamples that patient with all of them.
            entry.patient_id = f"synth-{self._background(seed).patient_id}"
        return entry
