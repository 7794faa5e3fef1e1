"""DeCoVNet, the 3-D weakly supervised COVID-19 classifier of Zheng et al. 2020 (medRxiv), Table 1.

Input: a CT volume and its lung mask as two channels, ``(N, 2, T, H, W)``, every slice kept
(T varies from patient to patient) and resized in-plane to ``input_size`` (Table 1: 192 x 288).

- Stem: Conv3d(2, 16) 5x7x7 with in-plane stride 2, BN, ReLU and a 1x3x3 max pooling with
  in-plane stride 2 (16 x T x H/4 x W/4).
- Two 3-D residual blocks, ResBlock(16, 64) and ResBlock(64, 128): a 3x1x1 convolution (across
  slices) then a 1x3x3 convolution (in-plane), each with BN, beside a 1x1x1 convolution with BN
  on the shortcut that aligns the channels; a 2x1x1 max pooling between the blocks halves T and
  the second block halves H and W (128 x T/2 x H/8 x W/8).
- Progressive classifier (ProClf): AdaptiveMaxPool3d to 16 x H/8 x W/8, Conv3d(128, 64) 3x3x3 +
  ReLU, AdaptiveMaxPool3d to 4 x H/16 x W/16, Conv3d(64, 32) 3x3x3 + ReLU, Dropout3d(0.5),
  Conv3d(32, 32) 3x3x3 + ReLU, global max pooling, a fully connected layer to K logits.

The adaptive poolings make the output independent of T; their in-plane sizes follow the input
(24 x 36 and 12 x 18 for Table 1's 192 x 288). The class activation map is Zhou et al.'s
construction for a global pooling followed by one linear layer: the FC weights of a class
applied to the last convolution's features at every position, ``CAM_k = sum_c w_kc f_c``, on
the 4 x H/16 x W/16 grid (the FC bias is left out; it shifts every position alike).

The authors' released code (github.com/sydney0zq/covid-19-detection) differs from Table 1 in
places (bottleneck residual blocks with a 1x1x1 expansion, a 1 x 6 x 9 pooling before the last
convolution, two FC layers); this module follows the paper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from napari_wscovid.architectures import DECOVNET

DECOVNET_CLASSES = ("NP", "COVID-19")  # COVID-negative, COVID-positive


@dataclass
class DeCoVNetConfig:
    """Everything needed to rebuild a network from its weights file.

    ``widths`` are the output channels of the stem, the two residual blocks and the three
    ProClf convolutions; ``pool_depths`` the slice counts the two ProClf adaptive poolings
    produce; ``input_size`` the in-plane (height, width) every slice is resized to.
    """

    classes: tuple[str, ...] = DECOVNET_CLASSES
    input_size: tuple[int, int] = (192, 288)
    widths: tuple[int, ...] = (16, 64, 128, 64, 32, 32)
    pool_depths: tuple[int, int] = (16, 4)
    in_channels: int = 2
    dropout: float = 0.5
    architecture: str = DECOVNET

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> DeCoVNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


def tiny_decovnet_config(
    classes: tuple[str, ...] = DECOVNET_CLASSES, input_size: tuple[int, int] = (32, 48)
) -> DeCoVNetConfig:
    """The same topology with few channels and a small input: for tests and CI."""
    return DeCoVNetConfig(
        classes=tuple(classes), input_size=tuple(input_size), widths=(4, 8, 8, 8, 4, 4), pool_depths=(4, 2)
    )


class ResBlock3d(nn.Module):
    """Residual block of Table 1: 3x1x1 then 1x3x3 convolutions, a 1x1x1 convolution shortcut."""

    def __init__(self, in_ch: int, out_ch: int, spatial_stride: int = 1) -> None:
        super().__init__()
        stride = (1, spatial_stride, spatial_stride)
        self.temporal = nn.Conv3d(in_ch, out_ch, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.bn_temporal = nn.BatchNorm3d(out_ch)
        self.spatial = nn.Conv3d(out_ch, out_ch, (1, 3, 3), stride=stride, padding=(0, 1, 1), bias=False)
        self.bn_spatial = nn.BatchNorm3d(out_ch)
        self.shortcut = nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False)
        self.bn_shortcut = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn_temporal(self.temporal(x)))
        out = self.bn_spatial(self.spatial(out))
        return self.relu(out + self.bn_shortcut(self.shortcut(x)))


class DeCoVNet(nn.Module):
    """3-D CT + lung-mask classifier; see the module docstring."""

    def __init__(self, config: DeCoVNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or DeCoVNetConfig()
        cfg = self.config
        if len(cfg.widths) != 6 or len(cfg.pool_depths) != 2 or len(cfg.input_size) != 2:
            raise ValueError("DeCoVNet needs 6 widths, 2 pool depths and an (height, width) input size")
        stem, res1, res2, head1, head2, head3 = (int(w) for w in cfg.widths)
        height, width = (int(v) for v in cfg.input_size)
        self.stem = nn.Sequential(
            nn.Conv3d(cfg.in_channels, stem, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.res1 = ResBlock3d(stem, res1)
        # ceil_mode keeps a single-slice input (T = 1) valid and the last slice of an odd T.
        self.slice_pool = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1), ceil_mode=True)
        self.res2 = ResBlock3d(res1, res2, spatial_stride=2)
        pool1 = (int(cfg.pool_depths[0]), math.ceil(height / 8), math.ceil(width / 8))
        pool2 = (int(cfg.pool_depths[1]), math.ceil(height / 16), math.ceil(width / 16))
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool3d(pool1),
            nn.Conv3d(res2, head1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool3d(pool2),
            nn.Conv3d(head1, head2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout3d(cfg.dropout),
            nn.Conv3d(head2, head3, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(head3, len(cfg.classes))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T', H', W') output of the last ProClf convolution (after its ReLU)."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"DeCoVNet expects (N, {self.config.in_channels}, T, H, W), got {tuple(x.shape)}"
            )
        x = self.res1(self.stem(x))
        x = self.res2(self.slice_pool(x))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) patient-level logits."""
        return self.fc(self.features(x).amax(dim=(2, 3, 4)))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K) and class activation maps (N, K, T', H', W'), T' = ``pool_depths[1]``."""
        feats = self.features(x)
        logits = self.fc(feats.amax(dim=(2, 3, 4)))
        cam = torch.einsum("kc,nczyx->nkzyx", self.fc.weight, feats)
        return logits, cam
