"""How far the network's answer on one scan can be trusted; no napari, no Qt.

Beside the scan's quality flags (:mod:`napari_wscovid.quality`) come three measures of the
network's fit to the scan:

* **out of distribution**: the Mahalanobis distance of each lung slice's pooled deepest features
  (:attr:`~napari_wscovid.models.wsnet.WSNetOutput.features`) from the features of the slices
  the network trained on. Their mean and a shrunk inverse covariance live beside the weights, in
  ``<weights stem>.reference.safetensors`` (made by ``python -m training.feature_reference``),
  tied to the weights by their SHA-256. The scan's score is the median over its lung slices;
  above the reference's threshold the scan needs review.
* **low confidence**: the top patient probability (calibrated) below the model's
  ``review_below``, chosen on held-out real patients (registry entry or weights metadata).
* **spread**: the fraction of lung slices that call another class than the scan's answer
  (a value only: a patient with few lesion slices has most slices clean).

Each becomes a :class:`~napari_wscovid.quality.QCFlag`; ``result.reliability`` keeps the
measured values and the thresholds they were compared with, flagged or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_wscovid.quality import QCFlag
from napari_wscovid.stages import shift_np_odds

logger = logging.getLogger(__name__)

REFERENCE_SUFFIX = ".reference.safetensors"


@dataclass(frozen=True)
class FeatureReference:
    """What the network's features look like on its training data."""

    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C) inverse of the shrunk covariance
    threshold: float  # scan score above which a scan is out of distribution
    weights_sha256: str
    description: str = ""

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (N, C)."""
        centred = np.asarray(features, np.float64) - self.mean
        squared = np.einsum("ij,jk,ik->i", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    def scan_score(self, features: np.ndarray) -> float:
        """Median distance over the scan's slices: a few odd slices (apex, base) do not decide."""
        return float(np.median(self.distances(features))) if len(features) else float("nan")

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {
                "mean": np.ascontiguousarray(self.mean, np.float64),
                "precision": np.ascontiguousarray(self.precision, np.float64),
            },
            str(tmp),
            metadata={
                "threshold": repr(float(self.threshold)),
                "weights_sha256": self.weights_sha256,
                "description": self.description,
            },
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, weights_sha256: str | None = None) -> FeatureReference:
        """Read a reference; ``ValueError`` naming the file when it is broken or belongs to other
        weights."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                mean, precision = f.get_tensor("mean"), f.get_tensor("precision")
            threshold = float(meta["threshold"])
        except Exception as exc:  # safetensors raises several types for a broken file
            raise ValueError(f"{path.name}: not a readable feature reference ({exc})") from exc
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size) or not np.isfinite(threshold):
            raise ValueError(
                f"{path.name}: feature reference of inconsistent shapes {mean.shape} / {precision.shape}"
            )
        if weights_sha256 and meta.get("weights_sha256") != weights_sha256:
            raise ValueError(
                f"{path.name}: made for other weights (SHA-256 {meta.get('weights_sha256', '?')[:12]}..., "
                f"these are {weights_sha256[:12]}...)"
            )
        return cls(mean, precision, threshold, meta.get("weights_sha256", ""), meta.get("description", ""))


def reference_path(weights_path: str | Path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.stem + REFERENCE_SUFFIX)


def reference_for(model_info: dict) -> tuple[FeatureReference | None, str]:
    """The feature reference beside the loaded weights, or ``None`` and the reason."""
    path = model_info.get("path")
    if not path:
        return None, "a network given in memory has no feature reference"
    ref_path = reference_path(path)
    if not ref_path.is_file():
        return None, f"no feature reference beside {Path(path).name}"
    try:
        return FeatureReference.load(ref_path, model_info.get("sha256")), ""
    except ValueError as exc:
        logger.warning("%s; out-of-distribution score not computed", exc)
        return None, str(exc)


def model_fit_checks(
    result,
    reference: FeatureReference | None,
    review_below: float | None,
    missing_reason: str = "",
    slice_offset: float = 0.0,
) -> tuple[list[QCFlag], dict]:
    """Flags and measured values of the network's fit to this scan (see the module docstring).
    ``slice_offset`` is the weights' slice NP offset (:func:`~napari_wscovid.stages.slice_np_offset`),
    the one the explanation applies to say which slices are abnormal."""
    flags: list[QCFlag] = []
    values: dict = {}
    probs = np.asarray(result.patient_probs, float)
    if np.isfinite(probs).all() and probs.size:
        top = float(probs.max())
        values.update(top_probability=round(top, 4), review_below=review_below)
        if review_below is not None and top < review_below:
            flags.append(
                QCFlag(
                    "low_confidence",
                    "warn",
                    round(top, 3),
                    f"the answer's probability {top:.2f} is below {review_below:.2f}, this model's review "
                    "threshold (set on its few held-out patients, docs/reliability.md): read the scan "
                    "yourself",
                )
            )
        spread = _slice_disagreement(
            result.slice_probs,
            int(probs.argmax()),
            tuple(result.classes),
            slice_offset,
        )
        if spread is not None:
            # a value, not a flag: a patient with few lesion slices has most slices clean
            values["slices_disagreeing"] = round(spread, 4)
    features = getattr(result, "slice_features", None)
    if reference is None or features is None or not len(features):
        values["feature_distance"] = None
        values["feature_distance_note"] = missing_reason or "this method gives no features"
        return flags, values
    score = reference.scan_score(features)
    values.update(feature_distance=round(score, 3), feature_threshold=round(reference.threshold, 3))
    if score > reference.threshold:
        flags.append(
            QCFlag(
                "out_of_distribution",
                "warn",
                round(score, 2),
                f"the network's features of this scan lie {score:.1f} from its training data "
                f"(threshold {reference.threshold:.1f}): an unfamiliar scanner, protocol or anatomy",
            )
        )
    return flags, values


def _slice_disagreement(
    slice_probs: np.ndarray, patient_class: int, classes: tuple[str, ...] = (), np_offset: float = 0.0
) -> float | None:
    """Fraction of the classified slices whose top class is not the patient's (a slice's NP odds
    shifted by the weights' slice offset, as when its slices are chosen for explaining)."""
    probs = np.asarray(slice_probs, float)
    rows = probs[np.isfinite(probs).all(axis=1)] if probs.ndim == 2 else probs[:0]
    if not len(rows):
        return None
    rows = shift_np_odds(rows, classes, np_offset)
    return float(np.mean(rows.argmax(axis=1) != patient_class))
