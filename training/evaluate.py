"""Evaluate detection models on data their training run held out: classification and localisation.

Every model goes through ``napari_wscovid.detect`` (a registry name or a weights file), on the
same held-out cases, so WSNet, DeCoVNet and FeCNN are compared side by side:

- classification, as the paper's Tables 3-4 (per class and overall, 95% bootstrap intervals over
  patients), at slice level and, for CT volumes, at patient level;
- lesion localisation, where exact lesion masks exist (phantoms, MedSeg): lesion recall and box
  precision at IoU >= 0.1 (see :mod:`training.localisation`), for the boxes of each per-scale CAM
  and of the joint saliency (the paper's claim is that the joint one localises better), or for a
  method's own boxes;
- seconds per volume on this machine.

Held-out data are those of one training run (its ``config.json``; by default the flags of the
bundled 3-class run), rebuilt by calling the training code's own functions on the same inputs:

- phantoms: the test phantoms of ``build_data`` (same generator, seed and per-volume seeds),
  regenerated whole with their lung and lesion masks; optionally extra phantoms with nodules
  (distractors) from a seed range no training stream draws from;
- COVID-CT-MD, UCSD COVID-CT and MedSeg: the test fold of the same ``patient_kfold`` split.

A metric a model cannot give (slice AUC of a patient-level network) is reported as "n/a".

Run ``python -m training.evaluate --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from napari_wscovid.architectures import NEGATIVE_CLASS, WSNET
from training.datasets import (
    MEDSEG_CLASS_MAP,
    PhantomSliceDataset,
    SliceImageFolderDataset,
    VolumeFolderDataset,
    covid_ct_md_records,
    patient_kfold,
    slice_labels_from_masks,
    stem_group,
    stream_seed,
)
from training.localisation import (
    IOU_THRESHOLD,
    MIN_LESION_AREA_MM2,
    MatchCounts,
    component_rects,
    match_slice,
    ratio_with_ci,
)
from training.metrics import METRICS, MetricReport, classification_report

log = logging.getLogger("training.evaluate")

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("evaluation.json", "evaluation.md")
SOURCES = ("phantom", "phantom-extra", "covid-ct-md", "ucsd", "medseg", "medseg-seen")
DEFAULT_SOURCES = ("phantom", "phantom-extra", "covid-ct-md", "ucsd", "medseg")
CAM_SCALES = ("conv3", "conv4", "conv5")
COVID_CLASS = "COVID-19"

# The bundled 3-class model's training command (``runs/wsnet3``); used when no --train-config is
# given. Only the fields that decide the held-out data matter here.
BUNDLED_RUN = {
    "task": "3class",
    "model": "full",
    "input_size": 224,
    "phantom_size": 256,
    "phantom_slices": 64,
    "val_volumes": 2,
    "test_volumes": 3,
    "covid_ct_md_root": "../shared/data/covid-ct-md",
    "image_root": "../shared/data/ucsd-covid-ct",
    "medseg_root": "../shared/data/medseg-infnet/train_doctor_label",
    "k_folds": 5,
    "fold": 0,
    "seed": 0,
    "out_dir": "runs/wsnet3",
}

# Extra phantoms take seeds from here on. Every phantom of a training run (train stream,
# validation and test sets) gets a uniform 62-bit seed, so the chance that one falls in this
# range of a few hundred small integers is about 1e-16.
EXTRA_PHANTOM_SEED_BASE = 1_000_000

# The split only needs each image's path, class and group; the images are read at this tiny size.
_ID_ONLY_SIZE = 4

# --quick: small and fast, for tests; the phantoms are then smaller than the run's, so they are
# not its held-out set (the output says so).
QUICK = {"phantom_size": 64, "phantom_slices": 16, "test_volumes": 1}
QUICK_DEFAULTS = {"n_boot": 50, "explain_per_volume": 2, "ig_steps": 2, "max_cases": 3, "extra_phantoms": 1}


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """How the evaluation runs (the command-line options)."""

    models: list[str]
    out: Path
    train_config: str | None = None
    sources: tuple[str, ...] = DEFAULT_SOURCES
    quick: bool = False
    overwrite: bool = False
    device: str = "cpu"
    ig_steps: int | None = None  # None: the plugin's default
    explain_per_volume: int = 6
    extra_phantoms: int = 1  # per class
    max_cases: int | None = None  # per source
    min_lesion_area_mm2: float = MIN_LESION_AREA_MM2
    iou_threshold: float = IOU_THRESHOLD
    min_box_area_mm2: float = 20.0
    n_boot: int = 1000
    seed: int = 0
    roots: dict[str, str | None] = field(default_factory=dict)  # overrides of the run's data roots


def load_training_config(path: str | Path | None):
    """The training run's :class:`TrainConfig`: its ``config.json``, else the bundled run's flags."""
    from training.train_classifier import TrainConfig

    if path is None:
        return TrainConfig(**BUNDLED_RUN)
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        log.warning("%s: ignoring fields this version does not know: %s", path, unknown)
    return TrainConfig(**{k: v for k, v in raw.items() if k in known})


def resolve_root(root: str | Path | None) -> Path | None:
    """A data root as given, or relative to the repository root (where training runs start)."""
    if root is None:
        return None
    path = Path(root)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


# ----------------------------------------------------------------------------- held-out cases


@dataclass
class Case:
    """One held-out CT volume or 2-D image, with the ground truth it has."""

    source: str
    name: str  # unique within the source
    patient_id: str  # the bootstrap's resampling unit
    patient_class: str
    load: Callable[[], object]  # -> CTVolume
    slice_index: np.ndarray  # slices with a class label, as the training test set has them
    slice_class: list[str]
    lesion_mask: np.ndarray | None = None  # (z, y, x) labels; None: no localisation
    pneumonia_labels: tuple[int, ...] = (1, 2, 3)
    distractor_labels: tuple[int, ...] = ()
    volumetric: bool = True  # a CT volume (patient-level metrics), not a 2-D picture
    meta: dict = field(default_factory=dict)


@dataclass
class HeldOut:
    cases: dict[str, list[Case]]
    description: dict[str, str]
    skipped: dict[str, str]


def _no_images(hu, lung_mask, indices, size, spacing_yx, **_):
    return np.zeros((len(indices), 1, 1, 1), dtype=np.float32)


def phantom_test_generator(cfg, classes) -> PhantomSliceDataset:
    """The phantom generator of ``build_data``'s test set, with the same arguments."""
    return PhantomSliceDataset(
        classes,
        seed=stream_seed(cfg.seed, 2, cfg.fold),
        size=cfg.input_size,
        phantom_size=cfg.phantom_size,
        n_slices=cfg.phantom_slices,
        spacing_z=cfg.phantom_spacing_z,
        pool_per_class=cfg.phantom_pool,
    )


def heldout_phantoms(cfg, classes, *, phantom_fn: Callable | None = None) -> list[Case]:
    """The test phantoms of the training run, regenerated whole with their masks.

    ``fixed_set`` itself is run, with the generator's own phantom function, so the per-volume
    seeds (and the retries of a phantom without usable slices) are exactly the training's; the
    phantoms and the slice indices it keeps are recorded on the way, and slice preparation is
    skipped (the network input is prepared by ``detect``). ``phantom_fn`` replaces the
    generator in tests.
    """
    ds = phantom_test_generator(cfg, classes)
    make = phantom_fn or ds.phantom_fn
    kept, current = [], {}

    def recording_phantom(kind, seed):
        phantom = make(kind, seed)
        current.update(kind=kind, seed=int(seed), phantom=phantom)
        return phantom

    def recording_prepare(hu, lung_mask, indices, size, spacing_yx, **kwargs):
        # make_entry prepares only the phantoms it keeps, right after generating each.
        kept.append({**current, "indices": np.asarray(indices, dtype=int)})
        return _no_images(hu, lung_mask, indices, size, spacing_yx)

    ds.phantom_fn, ds.prepare_fn = recording_phantom, recording_prepare
    test = ds.fixed_set(cfg.test_volumes)
    patients = list(dict.fromkeys(test.patient_ids))
    if len(patients) != len(kept):
        raise RuntimeError(f"{len(patients)} test phantoms but {len(kept)} prepared: generator changed?")
    labels, ids = test.labels.numpy(), np.asarray(test.patient_ids)
    cases = []
    for pid, entry in zip(patients, kept, strict=True):
        rows = np.flatnonzero(ids == pid)
        if len(rows) != len(entry["indices"]):
            raise RuntimeError(f"{pid}: {len(rows)} labelled slices but {len(entry['indices'])} prepared")
        phantom = entry["phantom"]
        cases.append(
            Case(
                source="phantom",
                name=pid,
                patient_id=pid,
                patient_class=entry["kind"],
                load=lambda v=phantom.volume: v,
                slice_index=entry["indices"],
                slice_class=[classes[i] for i in labels[rows]],
                lesion_mask=phantom.lesion_mask,
                distractor_labels=(4,),
                meta={"seed": entry["seed"], "nodules": bool((phantom.lesion_mask == 4).any())},
            )
        )
    return cases


def extra_phantoms(cfg, classes, per_class: int, *, phantom_fn: Callable | None = None) -> list[Case]:
    """Phantoms no training stream drew, all with nodules as distractors, labelled as in training."""
    from napari_wscovid.phantom import make_phantom

    def default_fn(kind, seed):
        return make_phantom(
            kind,
            n_slices=cfg.phantom_slices,
            size=cfg.phantom_size,
            spacing=(cfg.phantom_spacing_z, None, None),
            seed=seed,
            nodules=True,
        )

    make = phantom_fn or default_fn
    kinds = PhantomSliceDataset(classes).kinds
    cases = []
    for i in range(per_class * len(kinds)):
        kind, seed = kinds[i % len(kinds)], EXTRA_PHANTOM_SEED_BASE + i
        phantom = make(kind, seed)
        idx, names = slice_labels_from_masks(phantom.lung_mask, phantom.lesion_mask, kind)
        keep = [j for j, n in enumerate(names) if n in classes]
        pid = f"extra-phantom-{kind}-{seed}"
        cases.append(
            Case(
                source="phantom-extra",
                name=pid,
                patient_id=pid,
                patient_class=kind,
                load=lambda v=phantom.volume: v,
                slice_index=idx[keep],
                slice_class=[names[j] for j in keep],
                lesion_mask=phantom.lesion_mask,
                distractor_labels=(4,),
                meta={"seed": seed, "nodules": bool((phantom.lesion_mask == 4).any())},
            )
        )
    return cases


def split_fold(cfg, patient_ids: Sequence[str], patient_classes: Sequence[str]):
    """``build_data``'s fold of one real-data source: ``(fold, k)``.

    A source with fewer patients than folds is split into as many folds as it has patients.
    """
    k = min(cfg.k_folds, len(set(patient_ids)))
    return patient_kfold(patient_ids, patient_classes, k=k, seed=cfg.seed)[cfg.fold % k], k


def heldout_covid_ct_md(cfg, classes, root, **dataset_kwargs) -> tuple[list[Case], str]:
    """The test patient(s) of COVID-CT-MD, with the slices and labels of the training test set.

    The dataset is built as ``build_data`` builds it (same records, classes, lung segmentation)
    with slice preparation skipped; the slice indices it keeps are recorded per volume.
    ``dataset_kwargs`` (``load_fn``, ``lung_fn``) are for tests.
    """
    from napari_wscovid.io import load_ct

    load = dataset_kwargs.pop("load_fn", load_ct)
    volumes, prepared = {}, {}

    def keeping_load(path):
        volumes[str(path)] = load(path)
        return volumes[str(path)]

    def recording_prepare(hu, lung_mask, indices, size, spacing_yx, **kwargs):
        prepared[id(hu)] = np.asarray(indices, dtype=int)
        return _no_images(hu, lung_mask, indices, size, spacing_yx)

    records = covid_ct_md_records(root)
    data = VolumeFolderDataset(
        records,
        classes,
        size=cfg.input_size,
        load_fn=keeping_load,
        prepare_fn=recording_prepare,
        **dataset_kwargs,
    )
    fold, k = split_fold(cfg, data.patient_ids, data.patient_classes)
    ids, labels = np.asarray(data.patient_ids), data.labels.numpy()
    by_id = {r.patient_id: r for r in records}
    cases = []
    for pid in dict.fromkeys(ids[fold.test]):
        rec = by_id[pid]
        volume = volumes[str(rec.path)]
        rows = np.flatnonzero(ids == pid)
        index = prepared[id(volume.hu)]
        if len(index) != len(rows):
            raise RuntimeError(f"{pid}: {len(rows)} labelled slices but {len(index)} prepared")
        cases.append(
            Case(
                source="covid-ct-md",
                name=pid,
                patient_id=pid,
                patient_class=rec.label,
                load=lambda v=volume: v,
                slice_index=index,
                slice_class=[classes[i] for i in labels[rows]],
            )
        )
    volumes.clear()  # only the test patients' volumes stay, held by their cases
    text = (
        f"{len(set(ids))} patients, fold {cfg.fold % k} of {k} by patient: test "
        f"{', '.join(c.name for c in cases)} ({sum(len(c.slice_index) for c in cases)} slices)"
    )
    return cases, text


def medseg_mask(root: Path, image: Path) -> np.ndarray:
    """The lesion labels of one MedSeg image: 1 GGO, 2 consolidation (any infection if only binary)."""
    from PIL import Image

    multi = root / "infection_multiclass" / f"{image.stem}.png"
    if multi.is_file():
        with Image.open(multi) as im:
            return np.asarray(im).astype(np.uint8)  # palette indices
    binary = root / "infection_binary" / f"{image.stem}.png"
    if not binary.is_file():
        raise FileNotFoundError(f"no infection mask for {image.name} under {root}")
    with Image.open(binary) as im:
        return (np.asarray(im.convert("L")) > 127).astype(np.uint8)


def heldout_images(cfg, classes, root, *, medseg: bool) -> tuple[dict[str, list[Case]], str]:
    """Test-fold images of UCSD COVID-CT or MedSeg (and, for MedSeg, the rest as 'medseg-seen')."""
    from napari_wscovid.io import load_ct

    root = Path(root)
    if medseg:
        data = SliceImageFolderDataset(
            root, MEDSEG_CLASS_MAP, classes, size=_ID_ONLY_SIZE, group_fn=stem_group, preparation="whole"
        )
    else:
        data = SliceImageFolderDataset(root, classes=classes, size=_ID_ONLY_SIZE, preparation="whole")
    fold, k = split_fold(cfg, data.patient_ids, data.patient_classes)
    labels = data.labels.numpy()
    source = "medseg" if medseg else "ucsd"

    def make_cases(indices, name):
        cases = []
        for i in indices:
            path, cls = data.paths[i], classes[labels[i]]
            cases.append(
                Case(
                    source=name,
                    name=f"{path.parent.name}/{path.name}",
                    patient_id=data.patient_ids[i],
                    patient_class=cls,
                    load=lambda p=path: load_ct(p),
                    slice_index=np.array([0]),
                    slice_class=[cls],
                    lesion_mask=medseg_mask(root, path)[None] if medseg else None,
                    volumetric=False,
                )
            )
        return cases

    out = {source: make_cases(fold.test, source)}
    if medseg:
        out["medseg-seen"] = make_cases(np.concatenate([fold.train, fold.val]).astype(int), "medseg-seen")
    text = (
        f"{len(set(data.patient_ids))} groups, {len(data)} images; fold {cfg.fold % k} of {k} by "
        f"{'image' if medseg else 'source-paper group'}: test {len(fold.test)} images"
    )
    return out, text


def build_heldout(cfg, classes, settings: Settings) -> HeldOut:
    """Every requested held-out source that the run used and that is present."""
    wanted = set(settings.sources)
    cases, desc, skipped = {}, {}, {}
    roots = {
        "covid-ct-md": settings.roots.get("covid-ct-md") or cfg.covid_ct_md_root,
        "ucsd": settings.roots.get("ucsd") or cfg.image_root,
        "medseg": settings.roots.get("medseg") or cfg.medseg_root,
    }
    quick_note = (
        " (--quick: smaller than the run's phantoms, so NOT its held-out set)" if settings.quick else ""
    )
    if "phantom" in wanted:
        if not cfg.phantom:
            skipped["phantom"] = "the training run used no phantoms"
        else:
            log.info("regenerating the %d test phantoms per class of the run", cfg.test_volumes)
            cases["phantom"] = heldout_phantoms(cfg, classes)
            desc["phantom"] = (
                f"the run's test phantoms: {cfg.test_volumes} per class, "
                f"{cfg.phantom_size}x{cfg.phantom_size}x{cfg.phantom_slices} at "
                f"{cfg.phantom_spacing_z:g} mm, seeds "
                f"{[c.meta['seed'] for c in cases['phantom']]}{quick_note}"
            )
    if "phantom-extra" in wanted and settings.extra_phantoms > 0:
        log.info("generating %d extra phantoms per class (with nodules)", settings.extra_phantoms)
        cases["phantom-extra"] = extra_phantoms(cfg, classes, settings.extra_phantoms)
        held = {c.meta["seed"] for c in cases.get("phantom", [])}
        if held & {c.meta["seed"] for c in cases["phantom-extra"]}:
            raise RuntimeError("an extra phantom seed equals a held-out phantom seed")
        desc["phantom-extra"] = (
            f"{settings.extra_phantoms} per class, never trained on (seeds from {EXTRA_PHANTOM_SEED_BASE}), "
            "all with 1-3 nodules as distractors (not lesions: a box on one is a false positive)"
        )
    for source in ("covid-ct-md", "ucsd", "medseg"):
        if source not in wanted and not (source == "medseg" and "medseg-seen" in wanted):
            continue
        root = resolve_root(roots[source])
        if source == "medseg" and COVID_CLASS not in classes:
            skipped[source] = f"the run's classes {classes} have no {COVID_CLASS}: it used no MedSeg images"
            continue
        if root is None:
            skipped[source] = "the training run used none of it (its root is not set)"
            continue
        needed = {"covid-ct-md": "Index.csv", "ucsd": "CT_COVID", "medseg": "images"}[source]
        if not (root / needed).exists():
            skipped[source] = f"{root} is absent (no {needed} there)"
            continue
        log.info("reproducing the %s split from %s", source, root)
        if source == "covid-ct-md":
            cases[source], desc[source] = heldout_covid_ct_md(cfg, classes, root)
        else:
            parts, desc[source] = heldout_images(cfg, classes, root, medseg=source == "medseg")
            for name, found in parts.items():
                if name in wanted:
                    cases[name] = found
            if "medseg-seen" in cases:
                desc["medseg-seen"] = (
                    "MedSeg images of the run's training and validation folds: SEEN IN TRAINING"
                )
    for source, reason in skipped.items():
        log.warning("skipping %s: %s", source, reason)
    if settings.max_cases is not None:
        for source, found in cases.items():
            if len(found) > settings.max_cases:
                cases[source] = found[: settings.max_cases]
                desc[source] += f"; only the first {settings.max_cases} of {len(found)} cases evaluated"
    ordered = {s: cases[s] for s in SOURCES if s in cases}
    return HeldOut(ordered, desc, skipped)


# ----------------------------------------------------------------------------- running the models


@dataclass
class Outcome:
    """What one model gave on one case."""

    case: Case
    classes: tuple[str, ...] = ()
    slice_probs: np.ndarray | None = None  # (len(case.slice_index), K); NaN rows: not classified
    patient_probs: np.ndarray | None = None  # (K,)
    counts: dict[str, MatchCounts] = field(default_factory=dict)  # box source -> counts
    unexplained: dict[str, int] = field(default_factory=dict)  # lesion slices not scored, by reason
    seconds: float = 0.0  # the main detect call
    explain_seconds: float = 0.0
    n_explained: int = 0
    n_positive: int = 0
    complete_run: bool = False  # ``seconds`` already includes the method's saliency and boxes
    error: str | None = None


def slices_to_explain(slice_probs: np.ndarray, classes: Sequence[str], limit: int | None) -> tuple:
    """The plugin's default saliency slices (classified, not predicted NP), at most ``limit`` of
    them evenly spread over the volume: ``(chosen, number predicted positive)``."""
    rows = np.flatnonzero(np.isfinite(slice_probs).all(1))
    if NEGATIVE_CLASS in classes:
        rows = rows[np.argmax(slice_probs[rows], axis=1) != list(classes).index(NEGATIVE_CLASS)]
    n_positive = len(rows)
    if limit is not None and len(rows) > limit:
        # The centres of ``limit`` equal runs, so the partial-lung first and last slices are not
        # favoured.
        rows = rows[((np.arange(limit) + 0.5) * len(rows) / limit).astype(int)]
    return rows, n_positive


def _rects(boxes) -> list[tuple[int, int, int, int]]:
    return [(b.y0, b.x0, b.y1, b.x1) for b in boxes]


def score_boxes(
    case: Case,
    boxes_by_source: dict[str, dict[int, list]],
    slices: Sequence[int],
    spacing_yx,
    settings: Settings,
) -> tuple[dict[str, MatchCounts], list[int]]:
    """Match each box source's boxes on ``slices`` with the case's true lesions.

    Returns the counts per box source and the slices with a true lesion outside ``slices``
    (lesions the localisation never looked at).
    """
    truth, distractors = {}, {}
    for z in range(case.lesion_mask.shape[0]):
        truth[z] = component_rects(
            case.lesion_mask[z], case.pneumonia_labels, spacing_yx, settings.min_lesion_area_mm2
        )
        distractors[z] = component_rects(case.lesion_mask[z], case.distractor_labels, spacing_yx)
    counts = {}
    for source, by_slice in boxes_by_source.items():
        total = MatchCounts()
        for z in slices:
            total += match_slice(
                _rects(by_slice.get(int(z), [])), truth[int(z)], distractors[int(z)], settings.iou_threshold
            )
        counts[source] = total
    chosen = {int(z) for z in slices}
    return counts, [z for z, rects in truth.items() if rects and z not in chosen]


def _by_slice(boxes) -> dict[int, list]:
    out: dict[int, list] = {}
    for b in boxes:
        out.setdefault(int(b.slice), []).append(b)
    return out


def _why_not_explained(slices: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """Why WSNet explained none of these lesion slices: no lung found, predicted NP, or the cap."""
    reasons = {"not classified (no lung found)": 0, "predicted NP": 0, "beyond the per-volume cap": 0}
    negative = list(classes).index(NEGATIVE_CLASS) if NEGATIVE_CLASS in classes else None
    for z in slices:
        if not np.isfinite(probs[z]).all():
            reasons["not classified (no lung found)"] += 1
        elif negative is not None and int(np.argmax(probs[z])) == negative:
            reasons["predicted NP"] += 1
        else:
            reasons["beyond the per-volume cap"] += 1
    return reasons


def model_architecture(model: str, device: str) -> str:
    """The architecture of a registry name or weights file (the registry caches the loaded model)."""
    from napari_wscovid.models.registry import load_model

    return load_model(model, device=device)[1]["architecture"]


def run_case(case: Case, volume, model: str, settings: Settings) -> Outcome:
    """Detect on one case with one model; explain some slices and score boxes where masks exist."""
    from napari_wscovid import detect
    from napari_wscovid.boxes import boxes_from_saliency

    outcome = Outcome(case)
    architecture = model_architecture(model, settings.device)
    # WSNet is timed without saliency and explains chosen slices below; another method makes its
    # maps and boxes in its one default run (FeCNN on the slices it calls positive).
    saliency = {"saliency": "none"} if architecture == WSNET else {}
    start = time.perf_counter()
    result = detect(volume, model=model, device=settings.device, **saliency)
    outcome.seconds = time.perf_counter() - start
    outcome.classes = tuple(result.classes)
    outcome.complete_run = architecture != WSNET
    probs = np.asarray(result.slice_probs, dtype=float)
    per_slice = probs.ndim == 2 and probs.shape[0] == volume.shape[0]
    # A patient-level method (DeCoVNet) gives no slice probabilities: n/a, not "unclassified".
    if per_slice and (architecture == WSNET or np.isfinite(probs).any()):
        outcome.slice_probs = probs[case.slice_index]
    outcome.patient_probs = np.asarray(result.patient_probs, dtype=float)
    if case.lesion_mask is None:
        return outcome
    if case.lesion_mask.shape != tuple(volume.shape):
        raise ValueError(f"{case.name}: lesion mask {case.lesion_mask.shape} but volume {volume.shape}")
    spacing_yx = tuple(volume.spacing[1:])
    if architecture != WSNET:
        # Another method makes its boxes in the same call: scored on the slices it explained
        # (FeCNN: those predicted not NP), or on every lung slice when it names none (DeCoVNet).
        sources = {}
        for b in result.boxes:
            sources.setdefault(b.source, []).append(b)
        boxes = {s: _by_slice(bs) for s, bs in sources.items()}
        if result.saliency_slices:
            slices = np.asarray(result.saliency_slices, dtype=int)
            outcome.counts, missed = score_boxes(case, boxes, slices, spacing_yx, settings)
            outcome.unexplained = _why_not_explained(missed, probs, outcome.classes)
        else:
            slices = np.flatnonzero(np.asarray(result.lung_mask).reshape(volume.shape[0], -1).any(1))
            outcome.counts, missed = score_boxes(case, boxes, slices, spacing_yx, settings)
            outcome.unexplained = {"outside the lung mask": len(missed)}
        return outcome
    chosen, outcome.n_positive = slices_to_explain(probs, outcome.classes, settings.explain_per_volume)
    boxes = {scale: {} for scale in CAM_SCALES}
    boxes["joint"] = {}
    if len(chosen):
        start = time.perf_counter()
        explained = detect(
            volume,
            model=model,
            device=settings.device,
            saliency="slices",
            slices=chosen.tolist(),
            lung_mask=result.lung_mask,
            ig_steps=settings.ig_steps,
            min_box_area_mm2=settings.min_box_area_mm2,
        )
        outcome.explain_seconds = explained.timings.get("saliency_and_boxes", time.perf_counter() - start)
        chosen = np.asarray(explained.saliency_slices, dtype=int)
        outcome.n_explained = len(chosen)
        cls = explained.explained_class
        for scale in CAM_SCALES:
            if scale not in explained.cams:
                continue
            for z in chosen:
                cam = explained.cams[scale][z].astype(np.float32) / 255.0
                boxes[scale][int(z)] = boxes_from_saliency(
                    cam,
                    spacing_yx=spacing_yx,
                    slice_index=int(z),
                    class_name=cls,
                    score=float(probs[z, outcome.classes.index(cls)]),
                    min_area_mm2=settings.min_box_area_mm2,
                    source=scale,
                )
        for b in explained.boxes:
            boxes.setdefault(b.source, {}).setdefault(int(b.slice), []).append(b)
    outcome.counts, missed = score_boxes(case, boxes, chosen, spacing_yx, settings)
    outcome.unexplained = _why_not_explained(missed, probs, outcome.classes)
    return outcome


def run_all(heldout: HeldOut, settings: Settings) -> dict[str, dict[str, list[Outcome]]]:
    """Every model on every case: ``{model: {source: [Outcome]}}``; a failure is recorded, not raised."""
    results = {m: {s: [] for s in heldout.cases} for m in settings.models}
    for source, cases in heldout.cases.items():
        for case in tqdm(cases, desc=source, unit="case", file=sys.stderr, mininterval=2.0):
            volume = case.load()
            for model in settings.models:
                try:
                    outcome = run_case(case, volume, model, settings)
                except Exception as exc:  # one broken case must not lose a long run
                    log.exception("%s on %s/%s failed", model, source, case.name)
                    outcome = Outcome(case, error=f"{type(exc).__name__}: {exc}")
                results[model][source].append(outcome)
    return results


# ----------------------------------------------------------------------------- metrics


def _interval(value: float, lower: float, upper: float, **extra) -> dict:
    return {"value": value, "lower": lower, "upper": upper, **extra}


def auc_with_ci(y: np.ndarray, score: np.ndarray, groups: Sequence[str], n_boot: int, seed: int) -> dict:
    """ROC AUC of a binary problem with a percentile bootstrap over groups (patients)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=int)
    if not 0 < y.sum() < len(y):
        return _interval(float("nan"), float("nan"), float("nan"), n=len(y), positives=int(y.sum()))
    value = float(roc_auc_score(y, score))
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[idx].sum() < len(idx):
            boots.append(roc_auc_score(y[idx], score[idx]))
    lower, upper = (float(q) for q in np.quantile(boots, [0.025, 0.975])) if boots else (math.nan, math.nan)
    return _interval(value, lower, upper, n=len(y), positives=int(y.sum()), patients=len(members))


def slice_rows(outcomes: Sequence[Outcome]) -> tuple[list[str], np.ndarray, list[str], int]:
    """Labelled, classified slices of ``outcomes``: ``(class names, probs, patient ids, unclassified)``."""
    names, probs, pids, missing = [], [], [], 0
    for o in outcomes:
        if o.slice_probs is None:
            continue
        for name, p in zip(o.case.slice_class, o.slice_probs, strict=True):
            if np.isfinite(p).all():
                names.append(name)
                probs.append(p)
                pids.append(o.case.patient_id)
            else:
                missing += 1
    k = len(outcomes[0].classes) if outcomes else 0
    return names, np.asarray(probs, dtype=float).reshape(-1, k), pids, missing


def _report(names, probs, classes, pids, settings: Settings) -> MetricReport | None:
    keep = [i for i, n in enumerate(names) if n in classes]
    if not keep:
        return None
    y = np.array([list(classes).index(names[i]) for i in keep])
    return classification_report(
        y,
        probs[keep],
        classes,
        patient_ids=None if pids is None else [pids[i] for i in keep],
        n_boot=settings.n_boot,
        seed=settings.seed,
    )


def _covid_vs_rest(names, probs, classes, pids, settings: Settings) -> dict | None:
    if COVID_CLASS not in classes or not names:
        return None
    y = np.array([n == COVID_CLASS for n in names], dtype=int)
    return auc_with_ci(y, probs[:, list(classes).index(COVID_CLASS)], pids, settings.n_boot, settings.seed)


def summarise(outcomes: Sequence[Outcome], settings: Settings, volumetric: bool) -> dict:
    """Classification, localisation and timing of one model on one source."""
    ok = [o for o in outcomes if o.error is None]
    out: dict = {
        "cases": len(outcomes),
        "failed": [{"case": o.case.name, "error": o.error} for o in outcomes if o.error],
        "classes": list(ok[0].classes) if ok else [],
    }
    if not ok:
        return out
    classes = ok[0].classes
    names, probs, pids, missing = slice_rows(ok)
    out["slice_unclassified"] = missing
    report = _report(names, probs, classes, pids, settings) if names else None
    out["slice"] = report.to_dict() if report else None
    out["_slice_report"] = report
    out["covid_vs_rest_slice_auc"] = _covid_vs_rest(names, probs, classes, pids, settings)
    out["_slice_rows"] = (names, probs, pids)
    patient = None
    if volumetric:
        valid = [o for o in ok if o.patient_probs is not None and np.isfinite(o.patient_probs).all()]
        if valid:
            patient = _report(
                [o.case.patient_class for o in valid],
                np.stack([o.patient_probs for o in valid]),
                classes,
                None,
                settings,
            )
    out["patient"] = patient.to_dict() if patient else None
    out["_patient_report"] = patient
    out["per_case"] = [
        {
            "case": o.case.name,
            "patient_class": o.case.patient_class,
            "predicted": classes[int(np.argmax(o.patient_probs))]
            if o.patient_probs is not None and np.isfinite(o.patient_probs).all()
            else None,
            "explained_slices": o.n_explained,
            "positive_slices": o.n_positive,
            "seconds": round(o.seconds, 3),
            **({"seed": o.case.meta["seed"]} if "seed" in o.case.meta else {}),
        }
        for o in ok
    ]
    out["localisation"] = localisation_summary(ok, settings)
    explained = sum(o.n_explained for o in ok)
    per_slice = sum(o.explain_seconds for o in ok) / explained if explained else None
    if all(o.complete_run for o in ok):
        estimate = float(np.mean([o.seconds for o in ok]))
    elif per_slice is not None:
        estimate = float(np.mean([o.seconds + per_slice * o.n_positive for o in ok]))
    else:
        estimate = None
    out["timing"] = {
        "volumes": len(ok),
        "seconds_per_volume": float(np.mean([o.seconds for o in ok])),
        "explained_slices": explained,
        "saliency_seconds_per_slice": per_slice,
        "estimated_seconds_per_volume_default_saliency": estimate,
        "includes_saliency": all(o.complete_run for o in ok),
    }
    return out


def localisation_summary(outcomes: Sequence[Outcome], settings: Settings) -> dict | None:
    """Lesion recall and box precision per box source, pooled, with intervals over patients."""
    scored = [o for o in outcomes if o.case.lesion_mask is not None]
    if not scored:
        return None
    sources = list(dict.fromkeys(s for o in scored for s in o.counts))
    order = [s for s in (*CAM_SCALES, "joint") if s in sources] + sorted(
        set(sources) - {*CAM_SCALES, "joint"}
    )
    per_patient: dict[str, dict[str, MatchCounts]] = {}
    for o in scored:
        mine = per_patient.setdefault(o.case.patient_id, {})
        for s in order:
            mine[s] = mine.get(s, MatchCounts()) + o.counts.get(s, MatchCounts())
    reasons: dict[str, int] = {}
    for o in scored:
        for why, n in o.unexplained.items():
            reasons[why] = reasons.get(why, 0) + n
    out = {"methods": {}, "lesion_slices_not_explained": reasons}
    for s in order:
        counts = [p[s] for p in per_patient.values()]
        total = sum(counts, MatchCounts())
        boot = {"n_boot": settings.n_boot, "seed": settings.seed}
        out["methods"][s] = {
            "lesion_recall": ratio_with_ci(
                [c.lesions_found for c in counts], [c.lesions for c in counts], **boot
            ),
            "box_precision": ratio_with_ci(
                [c.boxes_on_lesion for c in counts], [c.boxes for c in counts], **boot
            ),
            "counts": total.as_dict(),
        }
    return out


# Targets of the issue: (key, source, text, check).
TARGETS = (
    ("phantom_slice_auc", "phantom", "phantoms: slice AUC >= 0.98 for each class"),
    ("phantom_localisation", "phantom", "phantoms: lesion recall >= 0.9 at box precision >= 0.8"),
    ("real_covid_auc", "real", "real data held out by patient: COVID-19 vs non-COVID slice AUC >= 0.9"),
    ("medseg_localisation", "medseg", "MedSeg: lesion recall >= 0.8 at box precision >= 0.6"),
)


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def check_targets(model_summary: dict) -> list[dict]:
    """Each target of the issue with its value and whether this model meets it."""
    rows = []
    phantom = model_summary["sources"].get("phantom", {})
    slice_rep = phantom.get("slice")
    if slice_rep:
        aucs = {c: slice_rep["metrics"][c]["auc"]["value"] for c in slice_rep["classes"]}
        finite = [v for v in aucs.values() if v is not None and math.isfinite(v)]
        ok = min(finite) >= 0.98 if len(finite) == len(aucs) else None
        rows.append({"target": TARGETS[0][2], "value": aucs, "status": _status(ok)})
    else:
        rows.append({"target": TARGETS[0][2], "value": None, "status": "n/a"})
    for source, text, recall_min, precision_min in (
        ("phantom", TARGETS[1][2], 0.9, 0.8),
        ("medseg", TARGETS[3][2], 0.8, 0.6),
    ):
        loc = (model_summary["sources"].get(source) or {}).get("localisation")
        if not loc or not loc["methods"]:
            rows.append({"target": text, "value": None, "status": "n/a"})
            continue
        for method, m in loc["methods"].items():
            r, p = m["lesion_recall"]["value"], m["box_precision"]["value"]
            # No box at all gives no precision, and fails the target through its recall.
            ok = (
                None
                if not math.isfinite(r)
                else bool(r >= recall_min and math.isfinite(p) and p >= precision_min)
            )
            rows.append(
                {
                    "target": f"{text} [{method} boxes]",
                    "value": {"recall": r, "precision": p},
                    "status": _status(ok),
                }
            )
    real = model_summary.get("real_covid_vs_rest_slice_auc")
    value = real["value"] if real else None
    ok = None if value is None or not math.isfinite(value) else value >= 0.9
    rows.append({"target": TARGETS[2][2], "value": value, "status": _status(ok)})
    return rows


def summarise_model(
    model: str, outcomes: dict[str, list[Outcome]], heldout: HeldOut, settings: Settings
) -> dict:
    sources = {}
    for source, found in outcomes.items():
        volumetric = bool(found) and found[0].case.volumetric
        sources[source] = summarise(found, settings, volumetric)
    # Real data pooled: COVID-CT-MD's test patient(s) and UCSD's test images.
    pooled = [
        sources[s]["_slice_rows"] for s in ("covid-ct-md", "ucsd") if sources.get(s, {}).get("_slice_rows")
    ]
    classes = next(
        (sources[s]["classes"] for s in ("covid-ct-md", "ucsd") if sources.get(s, {}).get("classes")), []
    )
    real = None
    if pooled and COVID_CLASS in classes:
        names = [n for p in pooled for n in p[0]]
        probs = np.concatenate([p[1] for p in pooled])
        pids = [i for p in pooled for i in p[2]]
        real = _covid_vs_rest(names, probs, tuple(classes), pids, settings)
    summary = {"sources": sources, "real_covid_vs_rest_slice_auc": real}
    summary["targets"] = check_targets(summary)
    return summary


# ----------------------------------------------------------------------------- output


def _clean(obj):
    """JSON-safe: numpy scalars and arrays to Python, NaN/inf to null, private keys dropped."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _ci(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("value") is None or not math.isfinite(d["value"]):
        return "n/a"
    lo, hi = d.get("lower"), d.get("upper")
    ci = f" ({lo:.{digits}f}-{hi:.{digits}f})" if lo is not None and math.isfinite(lo) else ""
    return f"{d['value']:.{digits}f}{ci}"


def _metric(report: dict | None, metric: str, row: str) -> str:
    if not report or row not in report["metrics"]:
        return "n/a"
    return _ci(report["metrics"][row][metric])


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(report: dict) -> str:
    """The human-readable report: data, targets, classification, localisation, speed, limits."""
    s = report["settings"]
    models = list(report["models"])
    lines = [
        "# Evaluation on held-out data",
        "",
        f"Models: {', '.join(f'`{m}`' for m in models)}. Generated {report['created']} on "
        f"{report['device']}; "
        f"command `{report['command']}`; {report['elapsed_minutes']:.1f} min.",
        "",
        f"Held-out data of the training run `{report['training_run']['config']}` "
        f"(seed {report['training_run']['seed']}, fold {report['training_run']['fold']}, "
        f"k = {report['training_run']['k_folds']}): rebuilt with the training code's own functions.",
    ]
    if s["quick"]:
        lines += ["", "**--quick run: small sizes and few cases, for tests; the numbers mean nothing.**"]
    lines += ["", "## Held-out data", ""]
    lines += _table(
        ("source", "cases", "patients", "labelled slices", "what"),
        [
            (src, d["cases"], d["patients"], d["slices"], d["description"])
            for src, d in report["data"].items()
        ],
    )
    for src, why in report["skipped"].items():
        lines.append(f"\n- skipped **{src}**: {why}")
    lines += ["", "## Targets", ""]
    rows = []
    for m in models:
        for t in report["models"][m]["targets"]:
            value = t["value"]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.3f}"
            rows.append((f"`{m}`", t["target"], value if value is not None else "n/a", t["status"]))
    lines += _table(("model", "target", "value", "status"), rows)
    lines += [
        "",
        "## Classification",
        "",
        "Tables as the paper's Tables 3-4: value (95% percentile bootstrap interval; slices resampled "
        "by patient, so the intervals are wide when there are few patients). n/a: not defined on this data "
        "(e.g. no sample of the class) or not given by the model. Slices not classified: labelled slices "
        "on which `detect` found too little lung to classify (left out of the tables).",
    ]
    for src in report["data"]:
        lines += ["", f"### {src}", ""]
        summary_rows = []
        for m in models:
            r = report["models"][m]["sources"].get(src, {})
            summary_rows.append(
                (
                    f"`{m}`",
                    _metric(r.get("slice"), "acc", "overall"),
                    _metric(r.get("slice"), "auc", "overall"),
                    _ci(r.get("covid_vs_rest_slice_auc")),
                    _metric(r.get("patient"), "acc", "overall"),
                    _metric(r.get("patient"), "auc", "overall"),
                    r.get("slice_unclassified", "n/a"),
                )
            )
        lines += _table(
            (
                "model",
                "slice ACC",
                "slice AUC (macro)",
                "slice AUC COVID-19 vs rest",
                "patient ACC",
                "patient AUC (macro)",
                "slices not classified",
            ),
            summary_rows,
        )
        for m in models:
            r = report["models"][m]["sources"].get(src, {})
            for level in ("slice", "patient"):
                rep = r.get(level)
                if rep:
                    lines += ["", f"`{m}`, {level} level:", "", *_report_table(rep)]
            if r.get("failed"):
                lines += ["", f"`{m}` failed on {len(r['failed'])} case(s), e.g. {r['failed'][0]['error']}"]
    real = [(m, report["models"][m]["real_covid_vs_rest_slice_auc"]) for m in models]
    if any(v for _, v in real):
        lines += ["", "### real data pooled (COVID-CT-MD + UCSD test folds)", ""]
        lines += _table(("model", "slice AUC COVID-19 vs rest"), [(f"`{m}`", _ci(v)) for m, v in real])
    lines += [
        "",
        "## Localisation",
        "",
        f"True lesions: 8-connected components of the pneumonia labels on each axial slice, "
        f">= {s['min_lesion_area_mm2']:g} mm^2 (MedSeg: 1 mm pixels assumed). A box matches a lesion "
        f"when its IoU with the lesion's bounding box is >= {s['iou_threshold']:g}. Lesion recall: lesions "
        "matched by a box; "
        "box precision: boxes matching a lesion; both pooled, 95% bootstrap intervals over patients. "
        "Scored on the explained slices only (WSNet: at most "
        f"{s['explain_per_volume']} per volume, evenly spread over the slices predicted not NP, as the "
        "plugin "
        "explains them); per-scale boxes are the plugin's box post-processing applied to each scale's CAM on "
        "those slices (CAMs as the plugin shows them: of the patient's predicted class, one scale factor "
        "per volume, not masked to the lung), joint boxes are the plugin's own (masked to the lung). A box "
        "on a nodule is a false positive.",
    ]
    for src in report["data"]:
        rows, unexplained = [], []
        for m in models:
            loc = report["models"][m]["sources"].get(src, {}).get("localisation")
            if not loc:
                continue
            for method, v in loc["methods"].items():
                c = v["counts"]
                rows.append(
                    (
                        f"`{m}`",
                        method,
                        c["slices"],
                        _ci(v["lesion_recall"]),
                        f"{c['lesions_found']}/{c['lesions']}",
                        _ci(v["box_precision"]),
                        f"{c['boxes_on_lesion']}/{c['boxes']}",
                        c["boxes_on_distractor"],
                    )
                )
            if loc is not None:
                why = loc["lesion_slices_not_explained"]
                text = ", ".join(f"{n} {reason}" for reason, n in why.items() if n) or "none"
                unexplained.append(f"`{m}`: {text}")
        if rows:
            lines += ["", f"### {src}", ""]
            lines += _table(
                (
                    "model",
                    "boxes",
                    "slices",
                    "lesion recall",
                    "found/lesions",
                    "box precision",
                    "hits/boxes",
                    "FP on nodules",
                ),
                rows,
            )
            lines += [
                "",
                "Slices with a true lesion that were not scored: " + "; ".join(unexplained) + ".",
            ]
    lines += ["", "## Speed", "", f"Seconds on {report['device']} ({report['cpu']}).", ""]
    rows = []
    for m in models:
        for src, r in report["models"][m]["sources"].items():
            t = r.get("timing")
            if not t:
                continue
            per = t["saliency_seconds_per_slice"]
            est = t["estimated_seconds_per_volume_default_saliency"]
            rows.append(
                (
                    f"`{m}`",
                    src,
                    t["volumes"],
                    f"{t['seconds_per_volume']:.2f}",
                    f"{per:.2f}" if per is not None else "n/a",
                    f"{est:.1f}" if est is not None else "n/a",
                )
            )
    lines += _table(
        (
            "model",
            "source",
            "volumes",
            "s/volume (detect, no saliency)",
            "s per explained slice",
            "est. s/volume, plugin default",
        ),
        rows,
    )
    lines += [
        "",
        "s/volume: one `detect` call with saliency off (lung segmentation, classification, CAMs; for other "
        "methods their whole run). Estimated plugin default: that plus the saliency time per slice times the "
        "slices predicted not NP (the plugin explains them all).",
        "",
        "## Limits of this run",
        "",
        *[f"- {x}" for x in report["limits"]],
        "",
    ]
    return "\n".join(lines)


def _report_table(rep: dict) -> list[str]:
    head = ("class", "ACC", "PRC", "SEN", "SPE", "AUC")
    rows = [(row, *(_metric(rep, m, row) for m in METRICS)) for row in (*rep["classes"], "overall")]
    boot = rep["bootstrap"]
    unit = (
        f"{rep['n_patients']} patients" if boot["resampled"] == "patient" else f"{rep['n_samples']} samples"
    )
    note = f"{rep['n_samples']} samples; {boot['n']} resamples of {unit}."
    if boot["resampled"] == "patient" and rep["n_patients"] < 2:
        note += " One patient: the interval shows no between-patient variability."
    return [*_table(head, rows), "", note]


def describe_limits(settings: Settings, heldout: HeldOut) -> list[str]:
    """What this run left out or could not do, for the report."""
    from napari_wscovid.explain.integrated_gradients import DEFAULT_IG_STEPS

    limits = [
        f"Saliency (integrated gradients, {settings.ig_steps or DEFAULT_IG_STEPS} steps) only on at most "
        f"{settings.explain_per_volume} slices per volume, evenly spread over those predicted not NP; "
        "lesions on other slices are listed as 'not scored' with the reason, not counted as misses.",
    ]
    if "covid-ct-md" in heldout.cases:
        limits.append(
            "COVID-CT-MD: no lesion masks (classification only); the sample has 3 patients, so its test fold "
            "is one patient and its intervals show no between-patient variability."
        )
    if "ucsd" in heldout.cases:
        limits.append(
            "UCSD COVID-CT: no lesion masks (classification only); no patient ids, so images are grouped by "
            "source paper (the split's best guess)."
        )
    if settings.max_cases is not None:
        limits.append(f"At most {settings.max_cases} cases per source.")
    if settings.quick:
        limits.append(
            "--quick: phantoms smaller than the run's (not its held-out set), few cases, few resamples."
        )
    for src, why in heldout.skipped.items():
        limits.append(f"{src} skipped: {why}.")
    return limits


# ----------------------------------------------------------------------------- entry point


def evaluate(settings: Settings) -> dict:
    """Build the held-out data, run every model, and return the report (also written to disk)."""
    import platform

    import torch

    from napari_wscovid.models.registry import load_model
    from napari_wscovid.models.wsnet import TASK_CLASSES

    t0 = time.monotonic()
    cfg = load_training_config(settings.train_config)
    if settings.quick:
        cfg = dataclasses.replace(cfg, **{k: min(getattr(cfg, k), v) for k, v in QUICK.items()})
    classes = tuple(TASK_CLASSES[cfg.task])
    infos = {}
    for model in settings.models:  # fail before the long part when a model cannot be loaded
        _, info = load_model(model, device=settings.device)
        infos[model] = {
            k: info.get(k) for k in ("name", "version", "sha256", "architecture", "classes", "path")
        }
        if info.get("fallback"):
            log.warning("%s: %s", model, info["fallback"])
        if set(info.get("classes") or ()) != set(classes):
            log.warning(
                "%s has classes %s, the run's held-out data %s: classes it lacks are left out of its tables",
                model,
                info.get("classes"),
                classes,
            )
    heldout = build_heldout(cfg, classes, settings)
    if not heldout.cases:
        raise RuntimeError("no held-out data to evaluate on: " + "; ".join(heldout.skipped.values()))
    outcomes = run_all(heldout, settings)
    report = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m training.evaluate " + " ".join(sys.argv[1:]),
        "device": settings.device,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "roots"},
        "training_run": {
            "config": settings.train_config or "bundled run flags (runs/wsnet3)",
            **{
                k: getattr(cfg, k)
                for k in ("task", "seed", "fold", "k_folds", "phantom_size", "phantom_slices")
            },
            "test_volumes": cfg.test_volumes,
        },
        "data": {
            src: {
                "description": heldout.description.get(src, ""),
                "cases": len(cases),
                "patients": len({c.patient_id for c in cases}),
                "slices": sum(len(c.slice_index) for c in cases),
                "case_ids": [c.name for c in cases],
            }
            for src, cases in heldout.cases.items()
        },
        "skipped": heldout.skipped,
        "models": {},
        "limits": describe_limits(settings, heldout),
    }
    for model in settings.models:
        report["models"][model] = {
            "info": infos[model],
            **summarise_model(model, outcomes[model], heldout, settings),
        }
    report["elapsed_minutes"] = (time.monotonic() - t0) / 60
    return _clean(report)


def write_report(report: dict, out: Path, overwrite: bool) -> None:
    from napari_wscovid.io.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evaluation.json", json.dumps(report, indent=2), overwrite=overwrite)
    atomic_write_text(out / "evaluation.md", to_markdown(report), overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.splitlines()[0],
        epilog="--quick: 64 x 64 x 16 phantoms, and unless given --n-boot 50 --explain-per-volume 2 "
        "--ig-steps 2 --max-cases 3 --extra-phantoms 1.",
    )
    add = p.add_argument
    add(
        "--models", nargs="+", default=["wsnet-3class"], help="registry names or weights files (wsnet-3class)"
    )
    add("--out", required=True, help="folder for evaluation.json and evaluation.md")
    add("--train-config", default=None, help="config.json of the training run (default: the bundled run's)")
    add("--overwrite", action="store_true", help="replace evaluation files already in --out")
    add("--quick", action="store_true", help="small phantoms, few cases: for tests")
    add("--sources", nargs="+", choices=SOURCES, default=list(DEFAULT_SOURCES), help="(all but medseg-seen)")
    add("--device", default="cpu", help="'cpu' (default), 'cuda', 'cuda:N' or 'auto'")
    add("--threads", type=int, default=None, help="torch intra-op threads")
    add("--ig-steps", type=int, default=None, help="integrated-gradients steps (the plugin's default, 8)")
    add("--explain-per-volume", type=int, default=None, help="most slices explained per volume (6)")
    add("--extra-phantoms", type=int, default=None, help="extra phantoms with nodules, per class (1)")
    add("--max-cases", type=int, default=None, help="at most this many cases per source (all)")
    add("--min-lesion-area", type=float, default=MIN_LESION_AREA_MM2, help="smallest true lesion, mm^2 (20)")
    add("--iou", type=float, default=IOU_THRESHOLD, help="box-lesion IoU that counts as a match (0.1)")
    add("--n-boot", type=int, default=None, help="bootstrap resamples (1000)")
    add("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    add("--covid-ct-md-root", default=None, help="replace the run's COVID-CT-MD folder")
    add("--image-root", default=None, help="replace the run's UCSD COVID-CT folder")
    add("--medseg-root", default=None, help="replace the run's MedSeg folder")
    add("--log-file", default=None, help="also write the log here")
    add("--verbose", action="store_true", help="show the plugin's per-image warnings too")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = QUICK_DEFAULTS if args.quick else {}

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    return Settings(
        models=list(args.models),
        out=Path(args.out),
        train_config=args.train_config,
        sources=tuple(args.sources),
        quick=args.quick,
        overwrite=args.overwrite,
        device=args.device,
        ig_steps=pick("ig_steps", None),
        explain_per_volume=pick("explain_per_volume", 6),
        extra_phantoms=pick("extra_phantoms", 1),
        max_cases=pick("max_cases", None),
        min_lesion_area_mm2=args.min_lesion_area,
        iou_threshold=args.iou,
        n_boot=pick("n_boot", 1000),
        seed=args.seed,
        roots={"covid-ct-md": args.covid_ct_md_root, "ucsd": args.image_root, "medseg": args.medseg_root},
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 2 without running when the output files exist."""
    import torch

    from training.config import setup_logging

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    setup_logging(args.log_file)
    existing = [settings.out / n for n in OUTPUT_FILES if (settings.out / n).exists()]
    if existing and not settings.overwrite:
        log.error("%s already exist; pass --overwrite to replace them", ", ".join(map(str, existing)))
        return 2
    plugin_log = logging.getLogger("napari_wscovid")
    level, threads = plugin_log.level, torch.get_num_threads()
    if not args.verbose:
        # Every 2-D picture warns that it is not in HU and has no spacing: expected here.
        plugin_log.setLevel(logging.ERROR)
        log.info(
            "the plugin's warnings are hidden (2-D inputs are not in HU, as expected); --verbose shows them"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            if not args.verbose:
                # scikit-image deprecations raised inside the plugin, once per 2-D picture.
                warnings.simplefilter("ignore", FutureWarning)
            report = evaluate(settings)
    finally:  # main() may run inside another program (tests): leave its settings as they were
        plugin_log.setLevel(level)
        torch.set_num_threads(threads)
    write_report(report, settings.out, settings.overwrite)
    log.info(
        "wrote %s and %s (%.1f min)",
        settings.out / OUTPUT_FILES[0],
        settings.out / OUTPUT_FILES[1],
        report["elapsed_minutes"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
