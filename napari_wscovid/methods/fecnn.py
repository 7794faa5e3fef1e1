"""The lesion branch of Wu et al. 2021 (Phys. Med. Biol.), section 3.2, as a detection method.

Per lung slice the FeCNN gives the class probabilities. On the slices it calls positive:

1. Grad-CAM++ of the positive class on the backbone's last block (C5) is the lesion activation
   heat map (LAHm); each slice's map is normalised to [0, 1] (3.2.1), pasted back onto the
   slice and set to zero outside the lungs;
2. Otsu's threshold of the slice's lung pixels and 4-connected components give the lesion
   activation map's regions; those of at least ``min_box_area_mm2`` are lesions (the paper
   keeps components of more than one heat-map pixel, a 32 x 32 area of its input);
3. each lesion's spatial maximum (eq. 8) picks the C5 feature vector there (eq. 9);
4. k-means over all lesions of the study groups them into ``n_lesion_types`` types, and each
   lesion gets its soft scores ``softmax_k(-d(i, k))`` over the distances to the centres
   (eq. 10; the paper writes a min over k in front, which would make it a single number, and
   describes a distribution over the K clusters: the distribution is kept).

The clusters are renumbered by the mean density (HU, or display intensity for a non-HU image)
of their lesions, lowest first, and named from it: with two types the lower-density cluster is
"GGO-like" and the denser "consolidation-like". The names describe density only; whether the
clusters separate the radiological types is what ``scripts/lesion_type_clusters.py`` measures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator

import numpy as np

from napari_wscovid.results import Box, DetectionResult, Lesion
from napari_wscovid.stages import (
    NEGATIVE_CLASS,
    Progress,
    batches,
    calibration_temperature,
    classify_slices,
    explain_note,
    lung_slices,
    lung_volume_ml,
    model_input_kwargs,
    patient_call,
    patient_np_offset,
    patient_probabilities,
    slice_np_offset,
    slices_to_explain,
    to_uint8,
)

logger = logging.getLogger(__name__)

SOURCE = "gradcam++"
KMEANS_SEED = 0
KMEANS_N_INIT = 10


def positive_class(classes: tuple[str, ...]) -> str:
    """The class explained: COVID-19 when the network has it, else its first non-NP class."""
    if "COVID-19" in classes:
        return "COVID-19"
    others = [c for c in classes if c != NEGATIVE_CLASS]
    return others[0] if others else classes[-1]


def soft_scores(distances: np.ndarray) -> np.ndarray:
    """Eq. 10 as a distribution: ``softmax_k(-d(i, k))`` of (n, K) distances; rows sum to 1."""
    d = np.asarray(distances, dtype=np.float64)
    z = -(d - d.min(axis=1, keepdims=True))  # shift for stability; the softmax is unchanged
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cluster_lesions(features: np.ndarray, k: int, *, random_state: int = KMEANS_SEED) -> dict:
    """k-means over lesion feature vectors (n, C).

    Returns ``{"k", "labels" (n,), "centres" (k, C), "soft_scores" (n, k)}``. With fewer
    distinct vectors than ``k`` the number of clusters drops to that number; no lesion gives
    ``k = 0`` and empty arrays.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, C), got shape {x.shape}")
    if k < 1:
        raise ValueError(f"the number of lesion types must be at least 1, got {k}")
    n_distinct = len(np.unique(x, axis=0)) if len(x) else 0
    k_eff = min(int(k), n_distinct)
    if k_eff == 0:
        return {
            "k": 0,
            "labels": np.zeros(0, dtype=int),
            "centres": np.zeros((0, x.shape[1]), dtype=np.float32),
            "soft_scores": np.zeros((0, 0)),
        }
    km = KMeans(n_clusters=k_eff, n_init=KMEANS_N_INIT, random_state=random_state).fit(x)
    distances = km.transform(x)  # Euclidean distance to every centre
    return {
        "k": k_eff,
        "labels": km.labels_.astype(int),
        "centres": km.cluster_centers_.astype(np.float32),
        "soft_scores": soft_scores(distances),
    }


def type_names(k: int) -> list[str]:
    """Names of ``k`` clusters ordered by density, lowest first."""
    if k == 1:
        return ["lesion"]
    if k == 2:
        return ["GGO-like", "consolidation-like"]
    return ["GGO-like", *[f"intermediate-density-{i}" for i in range(1, k - 1)], "consolidation-like"][:k]


def order_by_density(clusters: dict, density: np.ndarray) -> dict:
    """Renumber the clusters by the mean ``density`` of their lesions, lowest first."""
    k = clusters["k"]
    if k == 0:
        return {**clusters, "mean_density": np.zeros(0), "counts": np.zeros(0, dtype=int)}
    labels = clusters["labels"]
    means = np.array([float(np.mean(density[labels == c])) for c in range(k)])
    order = np.argsort(means, kind="stable")  # new index j holds old cluster order[j]
    new_of_old = np.empty(k, dtype=int)
    new_of_old[order] = np.arange(k)
    new_labels = new_of_old[labels]
    return {
        "k": k,
        "labels": new_labels,
        "centres": clusters["centres"][order],
        "soft_scores": clusters["soft_scores"][:, order],
        "mean_density": means[order],
        "counts": np.bincount(new_labels, minlength=k),
    }


def _feature_index(y: int, x: int, crop, feat_shape: tuple[int, int]) -> tuple[int, int]:
    """The feature-map cell (row, col) that holds slice pixel (y, x) of an input cropped by ``crop``."""
    h, w = feat_shape
    cy, cx = crop.shape
    fy = int(np.floor((y + 0.5 - crop.y0) / cy * h))
    fx = int(np.floor((x + 0.5 - crop.x0) / cx * w))
    return min(max(fy, 0), h - 1), min(max(fx, 0), w - 1)


def _slice_regions(heat: np.ndarray, lung: np.ndarray, spacing_yx, min_area_mm2: float):
    """Otsu mask of a slice's heat map (inside the lung) and its kept 4-connected regions."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    values = heat[lung]
    if values.size == 0 or float(values.max()) <= float(values.min()):
        return np.zeros(heat.shape, bool), []
    mask = (heat > threshold_otsu(values)) & lung
    dy, dx = (float(s) for s in spacing_yx)
    regions = [r for r in regionprops(label(mask, connectivity=1)) if r.area * dy * dx >= min_area_mm2]
    return mask, regions


def detect_iter(
    volume,
    net,
    info: dict,
    *,
    lung_mask: np.ndarray,
    torch_device,
    min_box_area_mm2: float = 20.0,
    n_lesion_types: int = 2,
    timings: dict | None = None,
    batch_size: int = 16,
    saliency: str = "positive",
    slices=None,
) -> Generator[Progress, None, DetectionResult]:
    """Classify the lung slices, then detect and type lesions on the positive ones.

    Parameters
    ----------
    volume : CTVolume
    net : FeCNN
        In eval mode on ``torch_device`` (it is put there).
    info : dict
        From ``load_model``: ``name``, ``version``, ``sha256`` and ``normalisation`` are used.
    lung_mask : ndarray (z, y, x)
        Non-zero = lung.
    min_box_area_mm2 : float
        Smallest lesion region kept.
    n_lesion_types : int
        K of the k-means (the paper: 2 for GGO / consolidation, 3 with partial consolidation).
    timings : dict, optional
        Stage durations are added to it (and it becomes ``result.timings``).
    saliency : {"positive", "all", "slices", "none"}
        Slices given Grad-CAM++ and lesions: those predicted positive (the paper), every lung
        slice, the lung slices among ``slices``, or none.

    Returns
    -------
    DetectionResult
        ``cams["gradcam++"]``, ``boxes`` and ``lesions`` in the same order (``boxes[i]`` is
        the region of ``lesions[i]``), and ``lesion_types``.
    """
    import torch

    from napari_wscovid.boxes import involvement
    from napari_wscovid.explain.gradcampp import gradcam_plus_plus
    from napari_wscovid.models.fecnn import CAM_LAYER
    from napari_wscovid.preprocess import maps_to_slice, prepare_slices

    timings = {} if timings is None else timings
    net = net.to(torch_device).eval()
    classes = tuple(net.config.classes)
    size = int(net.config.input_size)
    lung_mask = np.asarray(lung_mask, dtype=np.uint8)
    spacing_yx = tuple(float(s) for s in volume.spacing[1:])
    lung_idx = lung_slices(lung_mask, volume.spacing)
    prep_kwargs = model_input_kwargs(volume, lung_mask, size, info.get("normalisation"))

    start = time.perf_counter()
    slice_probs = yield from classify_slices(
        net,
        volume,
        lung_mask,
        lung_idx,
        prep_kwargs,
        n_classes=len(classes),
        torch_device=torch_device,
        batch_size=batch_size,
        temperature=calibration_temperature(info),
    )
    timings["classification"] = time.perf_counter() - start
    patient_probs, rule = patient_probabilities(slice_probs, classes, patient_np_offset(info))

    explained = positive_class(classes)
    target = classes.index(explained)
    called = patient_call(patient_probs, classes)
    explain_idx = slices_to_explain(
        saliency, slices, slice_probs, classes, lung_idx, slice_np_offset(info), patient_class=called
    )

    start = time.perf_counter()
    heat_volume = np.zeros(volume.shape, dtype=np.uint8)
    lesion_masks = np.zeros(volume.shape, dtype=bool)
    boxes: list[Box] = []
    lesions: list[Lesion] = []
    density: list[float] = []
    done = 0
    for batch in batches(explain_idx, batch_size):
        x, crops = prepare_slices(volume.hu, lung_mask, batch, **prep_kwargs)
        maps, _, activations = gradcam_plus_plus(
            net, torch.from_numpy(x).to(torch_device), target, CAM_LAYER, return_activations=True
        )
        maps = maps.float().cpu().numpy()
        activations = activations.float().cpu().numpy()
        peak = maps.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
        maps = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)  # LAHm in [0, 1]
        lung = lung_mask[batch] > 0
        heat = np.clip(maps_to_slice(maps, crops, volume.shape[1:]), 0.0, 1.0) * lung
        heat_volume[batch] = to_uint8(heat)
        for pos, z in enumerate(batch):
            mask, regions = _slice_regions(heat[pos], lung[pos], spacing_yx, min_box_area_mm2)
            lesion_masks[z] = mask
            for region in regions:
                coords = region.coords
                values = heat[pos][coords[:, 0], coords[:, 1]]
                y, x_ = (int(v) for v in coords[int(np.argmax(values))])
                fy, fx = _feature_index(y, x_, crops[pos], activations.shape[-2:])
                area_mm2 = float(region.area) * spacing_yx[0] * spacing_yx[1]
                y0, x0, y1, x1 = (int(v) for v in region.bbox)
                boxes.append(
                    Box(
                        slice=int(z), y0=y0, x0=x0, y1=y1, x1=x1, class_name=explained,
                        score=float(slice_probs[z, target]), area_mm2=area_mm2, source=SOURCE,
                    )
                )  # fmt: skip
                lesions.append(
                    Lesion(
                        slice=int(z), y=y, x=x_, area_mm2=area_mm2, activation=float(values.max()),
                        features=activations[pos, :, fy, fx].astype(np.float32),
                    )
                )  # fmt: skip
                density.append(float(np.mean(volume.hu[z][coords[:, 0], coords[:, 1]])))
        done += len(batch)
        yield 2, 4, f"Grad-CAM++ and lesions on {done}/{len(explain_idx)} positive slices"
    timings[SOURCE] = time.perf_counter() - start

    yield 3, 4, f"Typing {len(lesions)} lesions"
    start = time.perf_counter()
    lesion_types = type_lesions(lesions, np.asarray(density), n_lesion_types, is_hu=volume.is_hu)
    timings["lesion_clustering"] = time.perf_counter() - start

    result = DetectionResult(
        classes=classes,
        slice_probs=slice_probs,
        patient_probs=patient_probs,
        lung_mask=lung_mask,
        cams={SOURCE: heat_volume},
        explained_class=explained,
        boxes=boxes,
        involvement=involvement(lesion_masks, lung_mask) if len(explain_idx) else {},
        model_info={k: info.get(k) for k in ("name", "version", "sha256")},
        timings=timings,
        device=str(torch_device.type),
        lung_volume_ml=lung_volume_ml(lung_mask, volume.spacing),
        saliency_slices=tuple(int(z) for z in explain_idx),
        patient_rule=rule,
        explain_note=explain_note(saliency, called, len(explain_idx), len(lung_idx)),
        lesions=lesions,
        lesion_types=lesion_types,
    )
    return result


def type_lesions(lesions: list[Lesion], density: np.ndarray, k: int, *, is_hu: bool = True) -> dict:
    """Cluster ``lesions`` by their features (in place: ``cluster``, ``soft_scores``); describe the types."""
    measure = "mean HU" if is_hu else "mean display intensity"
    features = (
        np.stack([np.asarray(les.features, dtype=np.float32).ravel() for les in lesions])
        if lesions
        else np.zeros((0, 0), np.float32)
    )
    clusters = order_by_density(cluster_lesions(features, k), np.asarray(density, dtype=np.float64))
    for les, label, scores in zip(lesions, clusters["labels"], clusters["soft_scores"], strict=True):
        les.cluster = int(label)
        les.soft_scores = tuple(float(s) for s in scores)
    return {
        "k": int(clusters["k"]),
        "k_requested": int(k),
        "names": type_names(clusters["k"]) if clusters["k"] else [],
        "centres": clusters["centres"],
        "counts": [int(c) for c in clusters["counts"]],
        "mean_density": [float(v) for v in clusters["mean_density"]],
        "density_measure": f"{measure} of the lesion region",
        "lesion_density": [float(v) for v in density],
        "feature_layer": "c5",
        "assignment": (
            f"k-means (scikit-learn, n_init={KMEANS_N_INIT}, random_state={KMEANS_SEED}) of the C5 feature "
            "vectors at each lesion's heat-map peak; soft scores softmax(-Euclidean distance to each centre) "
            f"(eq. 10); clusters numbered by {measure}, lowest first"
        ),
    }
