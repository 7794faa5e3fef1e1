"""Per-scale integrated-gradients saliency, the joint saliency and its boxes, slice by slice."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable

import numpy as np

from napari_wscovid.io.volume import CTVolume
from napari_wscovid.results import Box
from napari_wscovid.stages import (
    NEGATIVE_CLASS,
    Progress,
    batches,
    model_input_kwargs,
    per_slice_unit,
    to_uint8,
)

#: The maps one explained slice gets: |IG| at each scale and their product.
SALIENCY_LAYERS = ("conv3", "conv4", "conv5", "joint")


def explain_slices(
    volume: CTVolume,
    slice_indices: Iterable[int],
    *,
    net,
    lung_mask: np.ndarray,
    slice_probs: np.ndarray,
    classes: tuple[str, ...],
    explain_class: str | None = None,
    ig_steps: int | None = None,
    ig_method: str | None = None,
    min_box_area_mm2: float = 20.0,
    batch_size: int = 2,
    prep_kwargs: dict | None = None,
    stop=None,
) -> Generator[Progress, None, dict]:
    """Integrated-gradients saliency and boxes for some slices, as a progress generator.

    Returns ``{"slices": (n,) int, "saliency": {name: (n, y, x) uint8}, "masks": (n, y, x) bool,
    "boxes": [Box], "ig_steps": (n,) int}`` for the ``n`` slices explained, in the order of
    ``slice_indices``. The slices go through in batches of ``batch_size`` consecutive ones, the
    most abnormal batch first (:func:`~napari_wscovid.stages.abnormality`), and ``stop`` (anything
    with ``is_set()``: a :class:`threading.Event`, a :class:`~napari_wscovid.stages.Deadline`) is
    asked before each forward pass of path points: once set, the batch in progress is dropped and
    what is returned covers the slices explained by then, the ones a reader looks at first.

    Without ``ig_steps`` the steps are chosen per slice by the completeness check
    (:func:`~napari_wscovid.explain.integrated_gradients.adaptive_multiscale_saliency`); with it,
    every slice gets that many.
    The maps shown are magnitudes: each scale's |IG| divided by its largest value on the slice,
    and the joint map = the product of the three, divided by its own maximum on the slice. The
    boxes come from the unquantised product, which equals the paper's |joint| up to a per-slice
    factor that Isodata ignores (it is scale-invariant). ``prep_kwargs`` default to
    :func:`~napari_wscovid.stages.model_input_kwargs` of the volume, the input the slices were
    classified on.
    """
    import torch

    from napari_wscovid.boxes import boxes_from_mask, saliency_mask
    from napari_wscovid.explain.integrated_gradients import (
        DEFAULT_IG_METHOD,
        ExplanationStopped,
        adaptive_multiscale_saliency,
        multiscale_saliency,
    )
    from napari_wscovid.preprocess import maps_to_slice, prepare_slices
    from napari_wscovid.stages import abnormality

    ig_method = ig_method or DEFAULT_IG_METHOD
    prep_kwargs = prep_kwargs or model_input_kwargs(volume, lung_mask, int(net.config.input_size))
    indices = np.asarray(list(slice_indices), dtype=int)
    device = next(net.parameters()).device
    n, (ny, nx) = len(indices), volume.shape[1:]
    out = {name: np.zeros((n, ny, nx), dtype=np.uint8) for name in SALIENCY_LAYERS}
    masks = np.zeros((n, ny, nx), dtype=bool)
    boxes: list[Box] = []
    steps_used = np.zeros(n, dtype=int)
    done, started = 0, time.perf_counter()
    # Batches hold consecutive slices, as before the ordering, so each slice's maps are the same
    # numbers whether or not the run is stopped; only the order of the batches follows abnormality.
    priority = abnormality(slice_probs[indices], classes) if n else np.zeros(0)
    ordered = sorted(batches(range(n), batch_size), key=lambda rows: -float(priority[rows].max()))
    explained_rows: list[int] = []
    for batch in ordered:
        if stop is not None and stop.is_set():
            break
        z = indices[batch]
        x, crops = prepare_slices(volume.hu, lung_mask, z, **prep_kwargs)
        probs = slice_probs[z]
        if explain_class is not None:
            targets = np.full(len(z), classes.index(explain_class))
        else:
            targets = np.argmax(probs, axis=1)
        inputs, target_t = torch.from_numpy(x).to(device), torch.as_tensor(targets, device=device)
        try:
            if ig_steps:
                maps = multiscale_saliency(net, inputs, target_t, steps=ig_steps, method=ig_method, stop=stop)
                steps_used[batch] = ig_steps
            else:
                maps, steps_used[batch] = adaptive_multiscale_saliency(
                    net, inputs, target_t, method=ig_method, stop=stop
                )
        except ExplanationStopped:
            break  # the slices in progress are dropped whole: their maps would be part of a path
        lung = lung_mask[z] > 0
        scaled = {}
        for scale in SALIENCY_LAYERS[:3]:
            m = np.abs(maps[scale].detach().float().cpu().numpy().reshape(len(z), *x.shape[-2:]))
            scaled[scale] = maps_to_slice(per_slice_unit(m), crops, (ny, nx)) * lung
            out[scale][batch] = to_uint8(scaled[scale])
        joint_all = scaled["conv3"] * scaled["conv4"] * scaled["conv5"]
        out["joint"][batch] = to_uint8(per_slice_unit(joint_all))
        for pos, (row, zi, target) in enumerate(zip(batch, z, targets, strict=True)):
            joint = joint_all[pos]
            if classes[int(target)] == NEGATIVE_CLASS or not np.isfinite(slice_probs[zi]).all():
                # Evidence for "no pneumonia" is no lesion: no NP boxes and no involved lung (NP
                # saliency lights the pulmonary arteries); a slice too small to classify has none
                continue
            masks[row] = saliency_mask(joint) & lung[pos]  # the involvement's and the boxes' mask
            boxes += boxes_from_mask(
                masks[row],
                spacing_yx=volume.spacing[1:],
                slice_index=int(zi),
                class_name=classes[int(target)],
                score=float(slice_probs[zi, int(target)]),
                min_area_mm2=min_box_area_mm2,
            )
        explained_rows += batch.tolist()
        done += len(batch)
        yield done, n, f"Explaining slices, most abnormal first{_time_left(started, done, n)}"
    rows = np.sort(np.asarray(explained_rows, dtype=int))
    row_of = {int(z): r for r, z in enumerate(indices)}
    return {
        "slices": indices[rows],
        "saliency": {name: maps[rows] for name, maps in out.items()} if len(rows) < n else out,
        "masks": masks[rows] if len(rows) < n else masks,
        "boxes": sorted(boxes, key=lambda b: row_of[b.slice]),  # slice order, as the slices were given
        "ig_steps": steps_used[rows],
    }


def _time_left(started: float, done: int, total: int) -> str:
    """ ", about N s/min left" from the mean time per slice so far; empty when done."""
    if done >= total or done == 0:
        return ""
    left = (time.perf_counter() - started) / done * (total - done)
    return f", about {left:.0f} s left" if left < 90 else f", about {left / 60:.0f} min left"
