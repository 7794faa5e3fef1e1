"""Grad-CAM++ (Chattopadhay et al. 2018, WACV), batched, on any layer of a network.

For class ``c`` with pre-softmax score ``S^c`` the explained quantity is ``Y^c = exp(S^c)``
(the paper's eq. 17). With ``g = dS^c/dA^k_ij`` for the activations ``A`` of the chosen layer,
and ``S^c`` piecewise linear in ``A`` (ReLU, max pooling, batch norm in eval mode, convolutions,
average pooling and linear layers: every network in this package), the derivatives of ``Y``
follow from the first-order gradient alone (eq. 18):

    dY/dA = exp(S) g,   d2Y/dA2 = exp(S) g^2,   d3Y/dA3 = exp(S) g^3,

which give the closed-form weights (eq. 19)

    alpha^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)        (exp(S) cancels)
    w^c_k = sum_ij alpha^kc_ij ReLU(exp(S) g)
    L^c = ReLU(sum_k w^c_k A^k).

``alpha`` is 0 where ``g = 0`` (0/0), as in the authors' code. The factor ``exp(S)`` is a
positive constant per image that only scales its map; it is left out unless
``scale_by_exp=True`` (it overflows float32 for scores above ~88), so by default the maps are
those of the ``grad-cam`` package's GradCAMPlusPlus.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _capture(model: nn.Module, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, activations of ``layer``) of one forward pass with gradients enabled."""
    captured: list[torch.Tensor] = []
    handle = None
    if isinstance(layer, nn.Module):
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = model(x)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits if hasattr(out, "logits") else out
    if isinstance(layer, str):
        features = getattr(out, "features", None)
        if not isinstance(features, dict) or layer not in features:
            raise KeyError(f"the model's output has no feature map {layer!r}")
        activations = features[layer]
    elif callable(layer) and not isinstance(layer, nn.Module):
        activations = layer(out)
    else:
        if not captured:
            raise RuntimeError("the chosen layer was not called in the forward pass")
        activations = captured[-1]
    return logits, activations


def gradcam_plus_plus(
    model: nn.Module,
    x: torch.Tensor,
    target,
    layer: str | nn.Module | Callable = "c5",
    *,
    scale_by_exp: bool = False,
    return_activations: bool = False,
):
    """Grad-CAM++ maps of class ``target`` for a batch, at the resolution of ``layer``.

    Parameters
    ----------
    model : nn.Module
        Put it in eval mode first (batch norm must not mix the images of a batch). Its output
        is the logits tensor, or an object with ``logits`` (N, K) (and ``features`` for a
        named layer).
    x : torch.Tensor
        (N, C, H, W) input.
    target : int or sequence of int or torch.Tensor
        The class explained, one for all images or one per image.
    layer : str, nn.Module or callable
        A key of ``model(x).features``, a submodule whose output is used (via a forward
        hook), or a function of the model's output returning (N, C, h, w) activations.
    scale_by_exp : bool
        Multiply each map by ``exp(S^c)`` (the exact derivatives of ``Y = exp(S)``).
    return_activations : bool
        Also return the layer's activations (detached), e.g. to read features at a location.

    Returns
    -------
    maps : torch.Tensor
        (N, h, w) non-negative, float32 (float64 for a float64 model), detached.
    scores : torch.Tensor
        (N,) the explained scores ``S^c``.
    activations : torch.Tensor
        (N, C, h, w), only when ``return_activations``.
    """
    with torch.enable_grad():
        logits, activations = _capture(model, layer, x)
        n = logits.shape[0]
        target = torch.as_tensor(target, device=logits.device, dtype=torch.long).expand(n)
        scores = logits.gather(1, target[:, None])[:, 0]
        # The images are independent, so the gradient of the sum is every image's own gradient.
        (grads,) = torch.autograd.grad(scores.sum(), activations)
    a = activations.detach()
    g = grads.detach()
    g2 = g * g
    g3 = g2 * g
    denominator = 2.0 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(g != 0, g2 / safe, torch.zeros_like(g))
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3))  # (N, C)
    maps = torch.relu((weights[:, :, None, None] * a).sum(1))
    if scale_by_exp:
        maps = maps * torch.exp(scores.detach().to(maps.dtype))[:, None, None]
    if return_activations:
        return maps, scores.detach(), a
    return maps, scores.detach()
