"""Integrated gradients of the per-scale scores and the joint saliency (Hu et al. 2020, II.F).

Eq. 2 of the paper integrates the gradient of one scale's class score along the straight
path from a zero image to the input; eq. 3 approximates it with ``m = 25`` right Riemann
steps (``method="riemann_right"`` here). The joint saliency is the pixel-wise product of the
Conv3, Conv4 and Conv5 maps.

Captum's ``IntegratedGradients`` is the reference (tests compare against it). This module
computes the same sums with the quadrature nodes and weights defined exactly as captum
defines them, but faster, measured on the full-size WSNet at 224 x 224 on a 2-core CPU
(``benchmarks/bench_saliency.py``):

- one forward pass to Conv5 per batch of path points serves all three scales. Three
  separate captum runs repeat the Conv1-Conv3 forward three times. ``is_grads_batched``
  (vmap over the three cotangents) was slower than separate backward calls;
- a global-max score's gradient is that of its winning CAM cell, which sees only its
  receptive field (44 x 44 input pixels at Conv3, 104 x 104 at Conv4). Conv3 and Conv4
  are back-propagated through that window alone instead of the whole image (exactly the
  same result; ~30 % less time per path point at 224 x 224); Conv5's field is nearly the
  whole image, so it uses the shared graph;
- the network runs on a private copy in eval mode with batch norm folded into the
  convolutions, parameters frozen (no weight gradients are formed) and channels-last
  tensors, which oneDNN convolves faster on this CPU;
- path points of several slices go through in batches of about four 224 x 224 images:
  larger batches were slower per image here (activations fall out of cache).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from napari_wscovid.models.wsnet import SCALES, WSNet

logger = logging.getLogger(__name__)


class ExplanationStopped(Exception):
    """Raised between two forward batches of path points once the caller's ``stop`` is set: the
    inputs in progress are dropped whole, never returned with part of their path summed."""


IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")

# Chosen with benchmarks/bench_saliency.py on the full-size net (224 x 224, 2-core CPU), trained
# 150 steps on synthetic slices with per-scale supervision; Pearson r against a 256-point
# Gauss-Legendre reference, minimum over 3 slices (conv3 / conv4 / conv5 / joint):
#   riemann_right m=4: .9959 .9975 .9952 .9979   m=8: .9987 .9992 .9965 .9974   m=10: >= .9983
#   gausslegendre m=8: .9895 (conv3 fails)       riemann_middle m=8: >= .9965
# riemann_right (the paper's eq. 3, with fewer steps) clears 0.99 on every map from m=4 on;
# m=8 leaves a margin for less smooth networks. Time at m=8: ~1.05 s per slice of CPU time /
# 2 threads (the idle-machine estimate; 2.2 s wall with the machine shared, load ~5), against
# 12 s CPU / 24 s wall for plain captum m=25 in the same run.
DEFAULT_IG_METHOD = "riemann_right"
DEFAULT_IG_STEPS = 8

# Adaptive steps: a fixed m = 8 was measured at r = 0.966 against the reference on a crude
# synthetic chest, and with the GPU-trained default down to r = -0.27 on a slice of the bundled
# sample (benchmarks/bench_ig_adaptive.py): the scores change abruptly along the path.
# Completeness (the attributions of a scale sum to its score at the input minus at the
# baseline; captum's convergence delta)
# is checked after each pass and the steps doubled while any scale of any slice misses it by
# more than ADAPTIVE_TOLERANCE of its score gap; ADAPTIVE_MAX_STEPS bounds the time.
ADAPTIVE_START_STEPS = DEFAULT_IG_STEPS
ADAPTIVE_MAX_STEPS = 64
ADAPTIVE_TOLERANCE = 0.05

# Pixels per forward batch: about four 224 x 224 images. Per image, batches of 1-4 ran at the
# same speed on the full-size net and 8 ran ~20 % slower; small inputs batch more images.
_PIXELS_PER_BATCH = 4 * 224 * 224
# Receptive-field windows are used while their area is below this fraction of the image: the
# window's forward plus backward then costs less than the full-image backward it replaces.
_MAX_WINDOW_FRACTION = 0.4


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Path positions ``alpha`` in [0, 1] and their weights, as captum defines them.

    The Riemann rules use ``steps`` equal weights ``1 / steps``; ``riemann_trapezoid`` puts
    its nodes on ``linspace(0, 1, steps)`` and halves the two end weights, so (as in captum)
    its weights sum to ``1 - 1 / steps``, not 1. ``gausslegendre`` is the ``steps``-point
    Gauss-Legendre rule mapped to [0, 1].
    """
    if method not in IG_METHODS:
        raise ValueError(f"unknown integration method {method!r}; choose one of {IG_METHODS}")
    if steps < (1 if method == "gausslegendre" else 2):
        raise ValueError(f"{method} needs at least {1 if method == 'gausslegendre' else 2} steps")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1.0 + nodes), 0.5 * weights
    weights = np.full(steps, 1.0 / steps)
    if method == "riemann_trapezoid":
        weights[[0, -1]] /= 2
    first, last = {
        "riemann_left": (0.0, 1 - 1 / steps),
        "riemann_middle": (0.5 / steps, 1 - 0.5 / steps),
        "riemann_right": (1 / steps, 1.0),
        "riemann_trapezoid": (0.0, 1.0),
    }[method]
    # A float32 linspace, as captum builds it, so the two agree to rounding.
    return torch.linspace(first, last, steps).double().numpy(), weights


def prepare_model(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy with batch norm folded into the preceding convolutions.

    Folding removes one elementwise pass per layer in the forward and in each of the three
    backward passes; freezing the parameters keeps autograd from saving what only weight
    gradients need. The caller's model is left untouched (not even switched to eval).
    """
    prepared = copy.deepcopy(model).eval()
    for module in prepared.modules():
        if isinstance(module, nn.Sequential):
            _fold_batch_norm(module)
    for param in prepared.parameters():
        param.requires_grad_(False)
    return prepared.to(memory_format=torch.channels_last)


def _fold_batch_norm(seq: nn.Sequential) -> None:
    children = list(seq.children())
    merged: list[nn.Module] = []
    i = 0
    while i < len(children):
        layer = children[i]
        following = children[i + 1] if i + 1 < len(children) else None
        if isinstance(layer, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
            merged.append(fuse_conv_bn_eval(layer, following))
            i += 2
        else:
            merged.append(layer)
            i += 1
    if len(merged) != len(children):
        for name in list(seq._modules):
            del seq._modules[name]
        for j, layer in enumerate(merged):
            seq.add_module(str(j), layer)


def _targets(target: int | torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for {n} inputs")
    return t


def path_integrals(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | Sequence[int],
    scales: Sequence[str] = SCALES,
    *,
    steps: int = 25,
    method: str = "riemann_trapezoid",
    baseline: torch.Tensor | None = None,
    internal_batch_size: int | None = None,
    prepared: bool = False,
    stop=None,
) -> dict[str, torch.Tensor]:
    """Integrated gradients of several scales' scores from one shared forward per batch.

    Parameters
    ----------
    model
        A WSNet-like module: ``model(x, scales=...)`` returns an object with ``scores``.
    x
        ``(N, C, H, W)`` inputs.
    target
        Class index, one for all inputs or one per input.
    scales
        Which scale scores to attribute.
    steps, method
        Quadrature, see :func:`quadrature`.
    baseline
        Path start, broadcastable to ``x``; zeros (the paper's null image) when None.
    internal_batch_size
        Path points per forward pass; by default about four 224 x 224 images' worth.
    prepared
        True when ``model`` already comes from :func:`prepare_model` (saves the copy).
    stop
        Anything with ``is_set()``; asked before each forward batch, and once set the call raises
        :class:`ExplanationStopped`.

    Returns
    -------
    dict
        Scale -> attributions shaped like ``x``, in ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    unknown = [s for s in scales if s not in SCALES]
    if unknown:
        raise ValueError(f"unknown scales {unknown}; choose from {SCALES}")
    # Gradients are the point, so leave a caller's no_grad / inference_mode for this call
    # (the folded copy's weights must not be inference tensors either); an inference-mode
    # input is cloned into an ordinary tensor.
    with torch.inference_mode(False), torch.enable_grad():
        net = model if prepared else prepare_model(model)
        x = x.clone() if x.is_inference() else x.detach()
        return _path_sums(net, x, target, tuple(scales), steps, method, baseline, internal_batch_size, stop)


def _path_sums(net, x, target, scales, steps, method, baseline, internal_batch_size, stop=None):
    n = x.shape[0]
    base = torch.zeros_like(x) if baseline is None else torch.broadcast_to(baseline.to(x), x.shape)
    delta = x - base
    targets = _targets(target, n).to(x.device)
    alphas, weights = quadrature(method, steps)

    logger.debug("integrated gradients: %d inputs x %d %s steps, scales %s", n, steps, method, scales)
    # Path points are enumerated step-major: point k is (step k // n, input k % n).
    total = steps * n
    batch = internal_batch_size or max(1, _PIXELS_PER_BATCH // (x.shape[-1] * x.shape[-2]))
    sums = {s: torch.zeros_like(x) for s in scales}
    for start in range(0, total, batch):
        if stop is not None and stop.is_set():
            raise ExplanationStopped
        idx = torch.arange(start, min(start + batch, total))
        step_idx, item_idx = idx // n, idx % n
        a = torch.as_tensor(alphas[step_idx.numpy()], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        w = torch.as_tensor(weights[step_idx.numpy()], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        points = base[item_idx] + a * delta[item_idx]
        points = points.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        out = net(points, scales=scales)
        rows = torch.arange(len(idx), device=x.device)
        point_targets = targets[item_idx]
        # Cheap cropped gradients first: they need no part of the shared graph.
        full = []
        for scale in scales:
            grad = _cropped_score_grad(net, points, out.cams[scale], point_targets, scale)
            if grad is None:
                full.append(scale)
            else:
                sums[scale].index_add_(0, item_idx.to(x.device), (w * grad).contiguous())
        for j, scale in enumerate(full):
            score = out.scores[scale][rows, point_targets].sum()
            (grad,) = torch.autograd.grad(score, points, retain_graph=j < len(full) - 1)
            sums[scale].index_add_(0, item_idx.to(x.device), (w * grad).contiguous())
    return {s: sums[s] * delta for s in scales}


def _receptive_window(net: WSNet, scale: str) -> tuple[int, int, int]:
    """Stride, receptive-field offset and window size (input pixels) of one scale's CAM cells.

    A cell ``u`` sees input pixels ``stride * u + lo`` to ``stride * u + lo + size - 1``; the
    window starts on a multiple of the stride (so the poolings pair the same pixels as in
    the full image) and is the smallest such multiple that holds the whole field.
    """
    rf, stride = 1, 1
    for block, depth in enumerate(net.config.depths[: 3 + SCALES.index(scale)]):
        if block:
            rf, stride = rf + stride, stride * 2  # 2 x 2 max pooling
        rf += 2 * stride * depth  # 3 x 3 convolutions, padding 1
    lo = (stride - rf) // 2  # field centred on the cell's centre, stride * u + (stride - 1) / 2
    start = stride * math.floor(lo / stride)
    size = stride * math.ceil((lo + rf - start) / stride)
    return stride, start, size


def _cropped_score_grad(
    net: nn.Module, points: torch.Tensor, cams: torch.Tensor, targets: torch.Tensor, scale: str
) -> torch.Tensor | None:
    """Gradient of a global-max score by back-propagating through the winning cell's field only.

    The score is the CAM's maximum, so its gradient is that of one cell, and the cell depends
    only on its receptive field (44 x 44 input pixels at Conv3, 104 x 104 at Conv4 for the
    full-size net). Re-running the blocks on that window and back-propagating there costs about
    5 % (Conv3) and 40 % (Conv4) of a backward pass through the whole image, measured as a
    net saving of ~30 % per path point on the 224 x 224 net. Returns None where the shortcut
    does not apply (not a WSNet, a window as large as the image, or a tied maximum, whose
    gradient torch's ``amax`` splits between the tied cells): the caller then uses the full graph.
    """
    if not isinstance(net, WSNet):
        return None
    stride, lo, size = _receptive_window(net, scale)
    height, width = points.shape[-2:]
    # A window's forward and backward must cost less than the full backward it replaces.
    if (
        size * size > _MAX_WINDOW_FRACTION * height * width
        or (height - size) % stride
        or (width - size) % stride
    ):
        return None
    with torch.no_grad():
        maps = cams[torch.arange(len(points)), targets].flatten(1)
        best = maps.amax(1, keepdim=True)
        if bool(((maps == best).sum(1) > 1).any()):
            return None
        cells = maps.argmax(1)
    cam_w = cams.shape[-1]
    uy, ux = (cells // cam_w).tolist(), (cells % cam_w).tolist()
    # Windows are shifted inside the image rather than cut: at the image edge the network's own
    # zero padding is then what the crop sees too.
    y0 = [min(max(stride * u + lo, 0), height - size) for u in uy]
    x0 = [min(max(stride * u + lo, 0), width - size) for u in ux]
    windows = list(zip(y0, x0, strict=True))
    crops = torch.stack(
        [points.detach()[i, :, a : a + size, b : b + size] for i, (a, b) in enumerate(windows)]
    )
    crops = crops.contiguous(memory_format=torch.channels_last)
    crops.requires_grad_(True)
    crop_cams = net.heads[scale](net.feature_maps(crops, scale)[scale])
    local = crop_cams[
        torch.arange(len(points)),
        targets,
        torch.tensor([u - a // stride for u, a in zip(uy, y0, strict=True)]),
        torch.tensor([u - b // stride for u, b in zip(ux, x0, strict=True)]),
    ]
    (crop_grad,) = torch.autograd.grad(local.sum(), crops)
    grad = torch.zeros_like(points)
    for i, (a, b) in enumerate(windows):
        grad[i, :, a : a + size, b : b + size] = crop_grad[i]
    return grad


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | Sequence[int],
    scale: str,
    *,
    steps: int = 25,
    method: str = "riemann_trapezoid",
    baseline: torch.Tensor | None = None,
    internal_batch_size: int | None = None,
) -> torch.Tensor:
    """Integrated gradients (eq. 2-3) of one scale's score of class ``target``.

    Parameters
    ----------
    model
        A WSNet-like module (``model(x, scales=...)`` with per-scale ``scores``).
    x
        ``(N, C, H, W)`` inputs.
    target
        Class index: an int for all inputs or an ``(N,)`` tensor.
    scale
        ``"conv3"``, ``"conv4"`` or ``"conv5"``.
    steps, method
        Number of path points and quadrature rule, named as in captum (the paper's eq. 3 is
        ``"riemann_right"`` with 25 steps).
    baseline
        Path start; zeros when None.
    internal_batch_size
        Path points per forward pass.

    Returns
    -------
    torch.Tensor
        Attributions shaped like ``x``.
    """
    return path_integrals(
        model,
        x,
        target,
        (scale,),
        steps=steps,
        method=method,
        baseline=baseline,
        internal_batch_size=internal_batch_size,
    )[scale]


def multiscale_saliency(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | Sequence[int],
    *,
    steps: int = DEFAULT_IG_STEPS,
    method: str = DEFAULT_IG_METHOD,
    scales: Sequence[str] = SCALES,
    baseline: torch.Tensor | None = None,
    internal_batch_size: int | None = None,
    stop=None,
) -> dict[str, torch.Tensor]:
    """Per-scale integrated gradients and their pixel-wise product.

    Parameters
    ----------
    model, x, target, steps, method, baseline, internal_batch_size
        As in :func:`integrated_gradients`.
    stop
        As in :func:`path_integrals`.
    scales
        Scales to attribute; the joint map multiplies all of them.

    Returns
    -------
    dict
        ``"conv3"``, ``"conv4"``, ``"conv5"`` (or ``scales``) and ``"joint"`` -> ``(N, H, W)``
        tensors. Attributions are summed over input channels (one for CT).
    """
    per_scale = path_integrals(
        model,
        x,
        target,
        tuple(scales),
        steps=steps,
        method=method,
        baseline=baseline,
        internal_batch_size=internal_batch_size,
        stop=stop,
    )
    maps = {s: a.sum(dim=1).contiguous() for s, a in per_scale.items()}
    maps["joint"] = math.prod(maps[s] for s in scales)
    return maps


def convergence_delta(
    net: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    attributions: dict[str, torch.Tensor],
    baseline: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Relative completeness error per scale and input: ``|sum(attr) - (f(x) - f(b))| / |f(x) - f(b)|``.

    ``f`` is the scale's score of ``target``; the gap is floored at 1e-6 so that a scale whose
    score hardly moves along the path does not divide by zero.
    """
    scales = tuple(attributions)
    base = torch.zeros_like(x) if baseline is None else torch.broadcast_to(baseline.to(x), x.shape)
    with torch.no_grad():
        ends = net(torch.cat([x, base]).contiguous(memory_format=torch.channels_last), scales=scales)
    rows = torch.arange(len(x), device=x.device)
    out = {}
    for scale in scales:
        scores = ends.scores[scale].to(x.dtype)
        gap = scores[: len(x)][rows, target] - scores[len(x) :][rows, target]
        total = attributions[scale].sum(dim=tuple(range(1, attributions[scale].ndim)))
        out[scale] = (total - gap).abs() / gap.abs().clamp_min(1e-6)
    return out


def adaptive_multiscale_saliency(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | Sequence[int],
    *,
    method: str = DEFAULT_IG_METHOD,
    start_steps: int = ADAPTIVE_START_STEPS,
    max_steps: int = ADAPTIVE_MAX_STEPS,
    tolerance: float = ADAPTIVE_TOLERANCE,
    scales: Sequence[str] = SCALES,
    stop=None,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """:func:`multiscale_saliency` with the number of steps chosen per input by completeness.

    Each input starts at ``start_steps``; inputs whose completeness error
    (:func:`convergence_delta`) exceeds ``tolerance`` on any scale are recomputed with twice
    the steps, up to ``max_steps`` (logged when still above it). Returns the maps and the
    steps used per input; ``stop`` as in :func:`path_integrals`.
    """
    with torch.inference_mode(False), torch.enable_grad():
        net = prepare_model(model)
        x = x.clone() if x.is_inference() else x.detach()
        targets = _targets(target, x.shape[0]).to(x.device)
        attributions = {s: torch.zeros_like(x) for s in scales}
        steps_used = np.zeros(x.shape[0], dtype=int)
        todo = torch.arange(x.shape[0], device=x.device)
        steps = start_steps
        while len(todo):
            if method == "riemann_right" and steps > start_steps:
                # The right rule's nodes nest: j / 2m holds every j / m, and the new ones are the
                # midpoints (2j - 1) / 2m, so the doubled sum costs m new points, not 2m.
                mid = path_integrals(
                    net, x[todo], targets[todo], tuple(scales), steps=steps // 2, method="riemann_middle",
                    prepared=True, stop=stop,
                )  # fmt: skip
                part = {s: 0.5 * (attributions[s][todo] + mid[s]) for s in scales}
            else:
                part = path_integrals(
                    net, x[todo], targets[todo], tuple(scales), steps=steps, method=method, prepared=True,
                    stop=stop,
                )  # fmt: skip
            for scale in scales:
                attributions[scale][todo] = part[scale]
            steps_used[todo.cpu().numpy()] = steps
            errors = convergence_delta(net, x[todo], targets[todo], part)
            worst = torch.stack([errors[s] for s in scales]).amax(0)
            failing = todo[worst > tolerance]
            if len(failing) and steps * 2 > max_steps:
                logger.info(
                    "integrated gradients: %d input(s) still off completeness by up to %.1f%% at %d steps",
                    len(failing), 100 * float(worst.max()), steps,
                )  # fmt: skip
                break
            todo, steps = failing, steps * 2
    maps = {s: a.sum(dim=1).contiguous() for s, a in attributions.items()}
    maps["joint"] = math.prod(maps[s] for s in scales)
    return maps, steps_used
