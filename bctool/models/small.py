"""A small CNN for fast CPU training on 32-64 px images.

Four stages of 32-64-128-256 channels, each entered by a stride-2 3x3 conv, so a 32 px image is
16 px after the stem and 2 px at the end; small maps are what keep it fast on a few CPU cores.
Stages 2-4 add one 3x3 conv on a residual path for depth at little cost.
"""

from __future__ import annotations

import torch
from torch import nn

from bctool.models.init import init_conv_bn


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias: BN follows), BatchNorm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ResidualConv(nn.Module):
    """``relu(x + bn(conv3x3(x)))``: one extra conv that starts close to the identity path."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Compact 7-conv feature extractor; ``forward`` returns (N, ``num_features``) features."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, widths[0], stride=2)
        stages = []
        for in_ch, out_ch in zip(widths[:-1], widths[1:]):
            stages.append(nn.Sequential(ConvBNReLU(in_ch, out_ch, stride=2), ResidualConv(out_ch)))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the last stage: (N, num_features, H/16, W/16)."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, shape (N, num_features)."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)
