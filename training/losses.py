"""Class-balanced focal loss (Hu et al. 2020, eq. 1) and the multi-scale training objective.

Eq. 1 reads, per image ``i`` of true class ``c``, ``w_c (1 - p_c)^gamma (-log p_c)`` with
``p = softmax(S)``, averaged over the N images of the batch; ``w_c`` is the inverse class
frequency and the paper uses ``gamma = 1``.

Relation to :class:`monai.losses.FocalLoss`: with ``use_softmax=True``, ``to_onehot_y=True``,
``gamma`` and ``alpha=w`` (a per-class sequence), MONAI computes the same per-element terms, but
its ``reduction="mean"`` also averages over the K class channels (all but the true one are zero),
so ``ours == K * monai``. They differ otherwise: MONAI's default is a sigmoid (one-vs-rest binary)
focal loss with ``gamma=2``; a scalar ``alpha`` means ``1 - alpha`` for class 0 and ``alpha`` for
the rest (not an inverse frequency); and its ``weight`` (class_weight) multiplies every class
channel, which for one-hot targets is again a per-true-class factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PHASES = ("aux", "joint")


def class_weights(counts: Sequence[float], *, normalise: bool = True) -> torch.Tensor:
    """Inverse-frequency class weights ``w_c = 1 / freq(c)``.

    Parameters
    ----------
    counts : sequence of float
        Number (or expected fraction) of training samples per class.
    normalise : bool
        Scale so that the expected weight of a sample is 1 (``sum_c freq_c w_c = 1``); the paper's
        ``1 / freq`` differs by a constant factor only, which would otherwise rescale the learning rate.

    Returns
    -------
    torch.Tensor
        (K,) float32 weights; a class with no samples gets weight 0 (it contributes no loss anyway).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"counts must be non-negative with a positive sum, got {counts}")
    freq = counts / counts.sum()
    w = np.divide(1.0, freq, out=np.zeros_like(freq), where=freq > 0)
    if normalise:
        w = w / (freq * w).sum()
    return torch.as_tensor(w, dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    gamma: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Class-balanced softmax focal loss of eq. 1.

    Parameters
    ----------
    logits : torch.Tensor
        (N, K) unnormalised class scores ``S``.
    target : torch.Tensor
        (N,) integer true classes.
    weight : torch.Tensor, optional
        (K,) class weights (see :func:`class_weights`); ``None`` means all ones.
    gamma : float
        Focusing parameter; 0 gives the weighted cross-entropy.
    reduction : {"mean", "sum", "none"}
        "mean" divides by N (not by the sum of weights), as eq. 1 does.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pc = log_p.gather(1, target.long().view(-1, 1)).squeeze(1)
    # (1 - p_c)^gamma from log p_c; gamma = 0 must give exactly 1, also where p_c == 1.
    modulator = (1.0 - log_pc.exp()).clamp(min=0.0).pow(gamma) if gamma else torch.ones_like(log_pc)
    loss = -modulator * log_pc
    if weight is not None:
        loss = loss * weight.to(loss.device, loss.dtype)[target.long()]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class MultiScaleLoss(torch.nn.Module):
    """The training objective over the per-scale auxiliary heads and the joint classifier.

    The paper first trains individual classifiers at Conv3, Conv4 and Conv5, then a joint
    classifier on the summed scores, all with eq. 1. Phase ``"aux"`` is the sum of eq. 1 over the
    scale scores; phase ``"joint"`` is eq. 1 on the summed logits plus ``aux_weight`` times the
    auxiliary sum. Keeping the auxiliary terms in the joint phase (``aux_weight > 0``) keeps every
    scale's class activation map discriminative on its own, which the multi-scale saliency needs.
    """

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 1.0, aux_weight: float = 1.0):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)
        self.gamma = gamma
        self.aux_weight = aux_weight

    def forward(self, output, target: torch.Tensor, phase: str = "joint") -> torch.Tensor:
        """Loss of a :class:`~napari_wscovid.models.wsnet.WSNetOutput` for the given phase."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        aux = sum(focal_loss(s, target, self.weight, self.gamma) for s in output.scores.values())
        if phase == "aux":
            return aux
        joint = focal_loss(output.logits, target, self.weight, self.gamma)
        return joint + self.aux_weight * aux if self.aux_weight else joint
