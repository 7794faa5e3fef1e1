"""Plain data types shared by the pipeline, the CLI, the exporters and the widgets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# "rejected": a detection the annotator deleted or moved away from (see napari_wscovid.review);
# kept in box files so that a re-run does not bring it back, never drawn.
BOX_ORIGINS = ("detected", "edited", "added", "rejected")


@dataclass
class Box:
    """An axis-aligned lesion box on one axial slice.

    ``y0, x0, y1, x1`` are voxel indices of the input volume, end-exclusive, so
    ``hu[slice, y0:y1, x0:x1]`` is the boxed region.
    """

    slice: int
    y0: int
    x0: int
    y1: int
    x1: int
    class_name: str
    score: float
    area_mm2: float = 0.0
    origin: str = "detected"  # one of BOX_ORIGINS
    source: str = "joint"  # which saliency made it: "joint", "conv3", ... or "user"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Lesion:
    """One lesion found by a lesion detector (Wu et al. 2021): its peak, its type, its features.

    ``slice, y, x`` are voxel indices of the input volume (the component's activation maximum);
    ``cluster`` is the lesion type (k-means cluster index) and ``soft_scores`` the lesion's
    membership of every cluster (eq. 10 of the paper), summing to 1.
    """

    slice: int
    y: int
    x: int
    area_mm2: float
    activation: float
    cluster: int = -1
    soft_scores: tuple[float, ...] = ()
    features: np.ndarray | None = None  # backbone feature vector at the peak (not exported)

    def as_dict(self, with_features: bool = False) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "features"}
        out["soft_scores"] = [float(v) for v in self.soft_scores]
        if with_features and self.features is not None:
            out["features"] = [float(v) for v in np.asarray(self.features).ravel()]
        return out


@dataclass
class DetectionResult:
    """Everything one detection run produced for one volume."""

    classes: tuple[str, ...]
    slice_probs: np.ndarray  # (z, K) float32; rows of slices without lung are NaN
    patient_probs: np.ndarray  # (K,) float32
    lung_mask: np.ndarray  # (z, y, x) uint8, 1 = right lung, 2 = left lung
    # Maps are uint8 volumes, value / 255 in [0, 1] (see pipeline.MAP_LEVELS): CAMs of the shown
    # class scaled by one factor for the whole volume; saliency magnitudes scaled per slice.
    cams: dict[str, np.ndarray] = field(default_factory=dict)  # "conv3".."conv5" -> (z, y, x) uint8
    saliency: dict[str, np.ndarray] = field(default_factory=dict)  # "conv3".."joint" -> (z, y, x) uint8
    explained_class: str = ""  # the class whose CAMs are kept
    boxes: list[Box] = field(default_factory=list)
    involvement: dict = field(default_factory=dict)  # {"total_percent": float, "per_slice_percent": array}
    model_info: dict = field(default_factory=dict)  # {"name", "version", "sha256", ...}
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    device: str = "cpu"
    lung_volume_ml: float = 0.0
    saliency_slices: tuple[int, ...] = ()  # slices whose saliency was computed
    ig_steps: tuple[int, ...] = ()  # integrated-gradients steps used on each of saliency_slices
    patient_rule: str = ""  # how slice probabilities became patient probabilities
    explain_note: str = ""  # why no slice was explained, for the user ("" when some were)
    # slices chosen for explanation but left unexplained because the run was told to stop early
    unexplained_slices: tuple[int, ...] = ()
    # the involvement covers only the slices the reader stopped on ("current slice only")
    involvement_partial: bool = False
    # Methods other than Hu et al.'s fill these: lesion peaks with their types (Wu et al.), and
    # what the lesion types are ({"k": int, "names": [...], "centres": array, ...}).
    lesions: list[Lesion] = field(default_factory=list)
    lesion_types: dict = field(default_factory=dict)
    # Quality of the scan (napari_wscovid.quality): "ok", "needs_review" or "out_of_scope", and the
    # flags behind it, each {"name", "severity", "value", "message"}.
    status: str = ""
    qc: list[dict] = field(default_factory=list)
    # (lung slices, C) the network's pooled features of the classified slices, in the order of
    # the lung slices (WSNet only), and what napari_wscovid.reliability made of them
    slice_features: np.ndarray | None = None
    reliability: dict = field(default_factory=dict)

    @property
    def predicted_class(self) -> str | None:
        """The patient's class; None when there is no call (no lung slice could be classified:
        argmax over NaN would say the first class, "NP", for a scan nobody looked at)."""
        from napari_wscovid.stages import patient_call

        return patient_call(self.patient_probs, self.classes)

    @property
    def call_text(self) -> str:
        """The call in words, for messages: the class, or why there is none."""
        return self.predicted_class or "no call (no lung slice could be classified)"
