"""The multi-scale weakly supervised network of Hu et al. 2020 (IEEE Access), sections II.D-II.E.

Backbone: 2xC(32)-MP-2xC(64)-MP-3xC(128)-MP-3xC(256)-MP-3xC(256)-MP, 3x3 convolutions with
batch norm and ReLU. At Conv3, Conv4 and Conv5 a 1x1 convolution maps the features to K
class-score maps (the class activation maps); global max pooling turns each map into a score;
the three score vectors are summed and a softmax gives the prediction.

The heads read each block's features before its max pooling, so the CAMs keep the finest
resolution the block has (56, 28 and 14 pixels for a 224 input); the final pooling of the
backbone therefore feeds nothing and is omitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from napari_wscovid.architectures import WSNET

SCALES = ("conv3", "conv4", "conv5")

# The three-way task and the paper's three binary tasks.
TASK_CLASSES = {
    "3class": ("NP", "CAP", "COVID-19"),
    "np_vs_covid": ("NP", "COVID-19"),
    "np_vs_cap": ("NP", "CAP"),
    "cap_vs_covid": ("CAP", "COVID-19"),
}


@dataclass
class WSNetConfig:
    """Everything needed to rebuild a network from its weights file."""

    classes: tuple[str, ...] = TASK_CLASSES["3class"]
    widths: tuple[int, ...] = (32, 64, 128, 256, 256)
    depths: tuple[int, ...] = (2, 2, 3, 3, 3)
    input_size: int = 224
    in_channels: int = 1
    architecture: str = WSNET

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> WSNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


def tiny_config(classes: tuple[str, ...] = TASK_CLASSES["3class"], input_size: int = 64) -> WSNetConfig:
    """The same topology with few channels and a small input: for tests and CI."""
    return WSNetConfig(
        classes=tuple(classes), widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1), input_size=input_size
    )


def _conv_block(in_ch: int, out_ch: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [
            nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


@dataclass
class WSNetOutput:
    """Logits (summed scale scores), per-scale scores and per-scale class activation maps."""

    logits: torch.Tensor  # (N, K)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # scale -> (N, K)
    cams: dict[str, torch.Tensor] = field(default_factory=dict)  # scale -> (N, K, h, w)
    # (N, C) the deepest block's features averaged over the slice: what napari_wscovid.reliability
    # compares with the training data to say how far a scan lies from it
    features: torch.Tensor | None = None


class WSNet(nn.Module):
    """Multi-scale weakly supervised classifier; see the module docstring."""

    def __init__(self, config: WSNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or WSNetConfig()
        cfg = self.config
        if len(cfg.widths) != 5 or len(cfg.depths) != 5:
            raise ValueError("WSNet needs five blocks (widths and depths of length 5)")
        channels = (cfg.in_channels, *cfg.widths)
        self.blocks = nn.ModuleList(
            _conv_block(channels[i], channels[i + 1], cfg.depths[i]) for i in range(5)
        )
        self.pool = nn.MaxPool2d(2)
        n_classes = len(cfg.classes)
        self.heads = nn.ModuleDict(
            {scale: nn.Conv2d(cfg.widths[2 + i], n_classes, 1) for i, scale in enumerate(SCALES)}
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)

    def feature_maps(self, x: torch.Tensor, last_scale: str = "conv5") -> dict[str, torch.Tensor]:
        """Block outputs (before pooling) at Conv3..``last_scale``; stops early to save work."""
        stop = 3 + SCALES.index(last_scale)
        features = {}
        for i in range(stop):
            if i:
                x = self.pool(x)
            x = self.blocks[i](x)
            if i >= 2:
                features[SCALES[i - 2]] = x
        return features

    def forward(self, x: torch.Tensor, scales: tuple[str, ...] = SCALES) -> WSNetOutput:
        last = max(scales, key=SCALES.index)
        features = self.feature_maps(x, last)
        cams = {s: self.heads[s](features[s]) for s in scales}
        scores = {s: cam.amax(dim=(2, 3)) for s, cam in cams.items()}
        logits = torch.stack(list(scores.values())).sum(0)
        return WSNetOutput(logits=logits, scores=scores, cams=cams, features=features[last].mean(dim=(2, 3)))

    def scale_score(self, x: torch.Tensor, scale: str) -> torch.Tensor:
        """(N, K) global-max-pooled score of one scale; computes only the blocks it needs."""
        return self.forward(x, scales=(scale,)).scores[scale]


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d in a Sequential into it, in place (eval only)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        fused: list[nn.Module] = []
        for layer in sequential:
            if isinstance(layer, nn.BatchNorm2d) and fused and isinstance(fused[-1], nn.Conv2d):
                fused[-1] = fuse_conv_bn_eval(fused[-1], layer)
            else:
                fused.append(layer)
        sequential._modules.clear()
        for index, layer in enumerate(fused):
            sequential.add_module(str(index), layer)
    return module


def inference_copy(net: nn.Module) -> nn.Module:
    """An eval-mode copy for fast inference: batch norm folded into the convolutions, channels-last.

    Same outputs to float rounding (about 1e-7 relative). Measured on this project's 2-core CPU
    (`benchmarks/bench_detect.py` prints the ratio): folding saves about 12% of a 224x224 WSNet
    forward pass and the channels-last layout, which oneDNN's convolutions prefer, about 30%
    more. Inputs should be passed as ``x.contiguous(memory_format=torch.channels_last)``.
    """
    import copy

    fast = fold_batch_norm(copy.deepcopy(net).eval())
    return fast.to(memory_format=torch.channels_last)
