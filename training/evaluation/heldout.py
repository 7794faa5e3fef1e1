"""The held-out data of a training run, rebuilt with the training code's own functions.

Held-out data are those of one training run (its ``config.json``; by default the flags of the
bundled 3-class run), rebuilt by calling the training code's own functions on the same inputs:

- phantoms: the test phantoms of ``build_data`` (same generator, seed and per-volume seeds),
  regenerated whole with their lung and lesion masks; optionally extra phantoms with nodules
  (distractors) from a seed range no training stream draws from;
- COVID-CT-MD, UCSD COVID-CT and MedSeg: the test fold of the same ``patient_kfold`` split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.datasets import (
    MEDSEG_CLASS_MAP,
    PhantomSliceDataset,
    SliceImageFolderDataset,
    VolumeFolderDataset,
    covid_ct_md_records,
    run_fold,
    slice_labels_from_masks,
    stem_group,
    stream_seed,
)
from training.evaluation.settings import SOURCES, Settings

log = logging.getLogger("training.evaluation.heldout")

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def load_training_config(path: str | Path | None):
    """The training run's :class:`TrainConfig`: its ``config.json``, else the bundled run's flags."""
    from training.config import read_config
    from training.train_classifier import TrainConfig

    if path is None:
        return TrainConfig(**BUNDLED_RUN)
    return read_config(path, TrainConfig)


def resolve_root(root: str | Path | None) -> Path | None:
    """A data root as given, or relative to the repository root (where training runs start)."""
    if root is None:
        return None
    path = Path(root)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


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
    from training.train_classifier import holdout_set, real_source_split

    # the very split the run trained with: its held-out patients when it had any, else its fold
    _, test_idx, _, note = real_source_split("covid-ct-md", data, cfg, holdout_set(cfg))
    ids, labels = np.asarray(data.patient_ids), data.labels.numpy()
    by_id = {r.patient_id: r for r in records}
    cases = []
    for pid in dict.fromkeys(ids[test_idx]):
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
        f"{note}; test {', '.join(c.name for c in cases)} ({sum(len(c.slice_index) for c in cases)} slices)"
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
    fold, k = run_fold(data.patient_ids, data.patient_classes, cfg)
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
