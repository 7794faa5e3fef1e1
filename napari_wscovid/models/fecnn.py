"""FeCNN, the diagnosis branch of Wu et al. 2021 (Phys. Med. Biol.), section 3.1.

Backbone (3.1.1): five blocks Conv1..Conv5 of a ResNet-18-like network: a 7x7 stride-2
convolution, 3x3 stride-2 max pooling, then four stages of two residual basic blocks (two 3x3
convolutions with batch norm and ReLU, and a shortcut); stages 3-5 halve the resolution.

FPN (3.1.2, Lin et al. 2017): C3, C4 and C5 go through a 1x1 convolution with batch norm; C5
and C4 are upsampled (nearest) and added to the level below; each sum goes through a 3x3
convolution (P3, P4, P5). Two 3x3 stride-2 convolutions on C5 give P6 and P7 (the second on
the ReLU of the first, as in RetinaNet). Each of the five levels then gets a 1x1 convolution
with batch norm (and a ReLU, our choice: without it the head is linear up to the pooling),
global average pooling (the paper's 256-d vector ``P_i``), dropout, and a K-way
fully-connected layer with ReLU: the level's score ``s^i`` (eq. 1, with rho = K as in the paper).

Ensemble fusion (3.1.3): ``d = [w_0 s^0, ..., w_4 s^4]`` with ``w_i = 0.5 log((1 - e_i) / e_i)``
(eq. 2) from each level's error rate ``e_i`` (eq. 3; clipped to [0.001, 0.5], so a level no
better than chance gets weight 0 rather than a negative one), then a K-way fully-connected
layer and a softmax (eq. 4). The weights are a buffer (``level_weights``), saved with the network and set
by training from validation error rates (:meth:`FeCNN.set_level_error_rates`); a new network
has all weights 1.

The 224 x 224 input is the plugin's lung-cropped, normalised single-channel slice
(``napari_wscovid.preprocess.prepare_slices``), as for the other networks; the paper fed
512 x 512 lung crops to an ImageNet-initialised backbone, which this package cannot download.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_wscovid.architectures import FECNN

BACKBONE_LEVELS = ("c3", "c4", "c5")
LEVELS = ("p3", "p4", "p5", "p6", "p7")
# Grad-CAM++ and the lesion features use the output of the backbone's last block (paper 3.2.1).
CAM_LAYER = "c5"
# Error rates are clipped to [1e-3, 0.5]: the weights stay finite (w <= 3.45), and a level no
# better than chance gets weight 0. Eq. 2 would give it a negative weight (AdaBoost's flip), but
# the fusion layer after it learns its own signs, so a flip only inverts what that layer learnt.
MIN_ERROR_RATE = 1e-3
MAX_ERROR_RATE = 0.5


@dataclass
class FeCNNConfig:
    """Everything needed to rebuild a network from its weights file.

    ``widths``/``depths`` are the four residual stages Conv2..Conv5 (ResNet-18: 64-512 wide,
    two blocks each); the default is a quarter as wide so that it trains on a CPU.
    """

    classes: tuple[str, ...] = ("NP", "COVID-19")
    stem_width: int = 16
    widths: tuple[int, ...] = (16, 32, 64, 128)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    fpn_width: int = 64  # the paper: 256
    head_width: int = 64  # width of the pooled vector P_i; the paper: 256
    dropout: float = 0.5
    input_size: int = 224
    in_channels: int = 1
    architecture: str = FECNN

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> FeCNNConfig:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


def resnet18_config(classes: tuple[str, ...] = ("NP", "COVID-19"), input_size: int = 224) -> FeCNNConfig:
    """The ResNet-18 widths and the paper's 256-d FPN (for a GPU)."""
    return FeCNNConfig(
        classes=tuple(classes),
        stem_width=64,
        widths=(64, 128, 256, 512),
        fpn_width=256,
        head_width=256,
        input_size=input_size,
    )


def tiny_fecnn_config(classes: tuple[str, ...] = ("NP", "COVID-19"), input_size: int = 64) -> FeCNNConfig:
    """The same topology with few channels and a small input: for tests and CI."""
    return FeCNNConfig(
        classes=tuple(classes),
        stem_width=4,
        widths=(4, 8, 8, 16),
        depths=(1, 1, 1, 1),
        fpn_width=8,
        head_width=8,
        input_size=input_size,
    )


def fusion_weights(error_rates) -> np.ndarray:
    """Eq. 2: ``w_i = 0.5 log((1 - e_i) / e_i)``, with ``e_i`` clipped to [1e-3, 0.5].

    A level right half the time or less gets weight 0 (see ``MAX_ERROR_RATE``).
    """
    e = np.clip(np.asarray(error_rates, dtype=np.float64), MIN_ERROR_RATE, MAX_ERROR_RATE)
    return 0.5 * np.log((1.0 - e) / e)


def effective_fusion_weights(error_rates) -> np.ndarray:
    """Eq. 2's weights, or equal weights 1/L when no level beats chance.

    Early in training every level can be at chance; eq. 2 would then zero every level and leave
    the fused score a constant, so the levels are averaged instead until one is better.
    """
    weights = fusion_weights(error_rates)
    if not np.any(weights > 0):
        weights = np.full(len(weights), 1.0 / len(weights))
    return weights


def level_error_rates(level_logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Eq. 3: the fraction of samples whose level score's arg max is not the label."""
    labels = torch.as_tensor(labels)
    return {
        level: float((logits.argmax(1).cpu() != labels.cpu()).float().mean())
        for level, logits in level_logits.items()
    }


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, ReLU, and an identity or 1x1 projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = _conv_bn(out_ch, out_ch, 3)
        self.shortcut = _conv_bn(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.conv1(x))
        return F.relu(self.conv2(out) + identity)


@dataclass
class FeCNNOutput:
    """Fused logits, per-level scores and the feature maps the lesion branch needs."""

    logits: torch.Tensor  # (N, K), eq. 4 before the softmax
    level_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # "p3".."p7" -> (N, K), eq. 1
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # "c3".."c5", "p3".."p7" -> (N, C, h, w)


class FeCNN(nn.Module):
    """FPN-embedded CNN with ensemble fusion; see the module docstring."""

    def __init__(self, config: FeCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeCNNConfig()
        cfg = self.config
        if len(cfg.widths) != 4 or len(cfg.depths) != 4:
            raise ValueError("FeCNN needs four residual stages (widths and depths of length 4)")
        n_classes = len(cfg.classes)
        self.stem = nn.Sequential(_conv_bn(cfg.in_channels, cfg.stem_width, 7, 2), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_ch = [], cfg.stem_width
        for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths, strict=True)):
            blocks = [
                BasicBlock(in_ch if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)  # Conv2..Conv5
        f = cfg.fpn_width
        self.lateral = nn.ModuleDict(
            {c: _conv_bn(w, f, 1) for c, w in zip(BACKBONE_LEVELS, cfg.widths[1:], strict=True)}
        )
        self.smooth = nn.ModuleDict({p: nn.Conv2d(f, f, 3, padding=1) for p in LEVELS[:3]})
        self.p6 = nn.Conv2d(cfg.widths[-1], f, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(f, f, 3, stride=2, padding=1)
        self.heads = nn.ModuleDict(
            {p: nn.Sequential(_conv_bn(f, cfg.head_width, 1), nn.ReLU(inplace=True)) for p in LEVELS}
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.level_fc = nn.ModuleDict({p: nn.Linear(cfg.head_width, n_classes) for p in LEVELS})
        self.fusion = nn.Linear(n_classes * len(LEVELS), n_classes)
        self.register_buffer("level_weights", torch.ones(len(LEVELS)))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)

    def backbone(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """C3, C4, C5: outputs of Conv3..Conv5."""
        x = self.stages[0](self.pool(self.stem(x)))
        out = {}
        for name, stage in zip(BACKBONE_LEVELS, self.stages[1:], strict=True):
            x = stage(x)
            out[name] = x
        return out

    def pyramid(self, c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """P3..P7 from C3..C5 (top-down pathway, then the two stride-2 levels)."""
        top = self.lateral["c5"](c["c5"])
        merged = {"p5": top}
        for p, cname in (("p4", "c4"), ("p3", "c3")):
            lat = self.lateral[cname](c[cname])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            merged[p] = top
        out = {p: self.smooth[p](merged[p]) for p in LEVELS[:3]}
        out["p6"] = self.p6(c["c5"])
        out["p7"] = self.p7(F.relu(out["p6"]))
        return out

    def forward(self, x: torch.Tensor) -> FeCNNOutput:
        c = self.backbone(x)
        p = self.pyramid(c)
        level_logits = {}
        for level in LEVELS:
            pooled = self.heads[level](p[level]).mean(dim=(2, 3))  # GAP -> P_i
            level_logits[level] = F.relu(self.level_fc[level](self.dropout(pooled)))  # eq. 1
        return FeCNNOutput(logits=self.fuse(level_logits), level_logits=level_logits, features={**c, **p})

    def fuse(self, level_logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 4 before the softmax: the fusion layer on ``d = [w_0 s^0, ..., w_4 s^4]``."""
        weights = self.level_weights.to(level_logits[LEVELS[0]].dtype)
        d = torch.cat([weights[i] * level_logits[level] for i, level in enumerate(LEVELS)], dim=1)
        return self.fusion(d)

    def set_level_error_rates(self, error_rates) -> np.ndarray:
        """Set the fusion weights from the five levels' error rates (eq. 2-3); returns them.

        ``error_rates`` is a sequence in ``LEVELS`` order or a dict level -> rate.
        """
        if isinstance(error_rates, dict):
            error_rates = [error_rates[level] for level in LEVELS]
        if len(error_rates) != len(LEVELS) or not all(math.isfinite(e) for e in error_rates):
            raise ValueError(f"need {len(LEVELS)} finite error rates ({LEVELS}), got {error_rates}")
        weights = effective_fusion_weights(error_rates)
        self.level_weights.copy_(torch.as_tensor(weights, dtype=self.level_weights.dtype))
        return weights
