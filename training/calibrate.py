"""Temperature scaling (Guo et al. 2017): one scalar T so that softmax(logits / T) is calibrated.

Fitted on the validation set by minimising the negative log-likelihood; it leaves every slice's
arg-max unchanged but changes how confident the probabilities are, and so the patient rule's mean
over the most abnormal slices. The value travels in the weights file's metadata (``temperature``)
and the plugin divides the logits by it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, float) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels, int)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the validation NLL (bounded search over log T)."""
    logits, labels = np.asarray(logits, float), np.asarray(labels, int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (N, K) logits and N labels, got {logits.shape} and {labels.shape}")
    res = minimize_scalar(
        lambda t: nll(logits, labels, float(np.exp(t))), bounds=LOG_T_BOUNDS, method="bounded"
    )
    return float(np.exp(res.x))
