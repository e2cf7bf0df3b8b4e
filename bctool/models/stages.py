"""A backbone as an ordered list of stages, so the first ones can be frozen and their outputs
computed once (``bctool train --trainable``).

The stages of a backbone, applied one after the other, compute its ``forward`` exactly (the last
stage ends with the global pooling): ``stem, layer1..layer4`` for a ResNet, ``stem``, one stage
per row of the block table and ``head`` for an EfficientNet-Lite, ``stem`` and the four stages of
``small``. A plugin backbone declares its own with a ``stages()`` method returning modules;
without one it is a single stage (so only ``--trainable all`` or ``neck`` apply to it).

The stage modules are views over the backbone's own submodules: building them registers nothing,
so the backbone's state-dict keys do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bctool.errors import ConfigError


class _GlobalMean(nn.Module):
    """Mean over the spatial dimensions: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _ReLU6(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x)


def _resnet_stages(backbone: nn.Module) -> list[nn.Module]:
    b = backbone
    return [nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool), b.layer1, b.layer2, b.layer3,
            nn.Sequential(b.layer4, b.avgpool, nn.Flatten(1))]


def _lite_stages(backbone: nn.Module) -> list[nn.Module]:
    b = backbone
    groups: list[list[nn.Module]] = []
    for block in b._blocks:  # a stage is the run of blocks with the same output width
        width = block._project_conv.out_channels
        if not groups or groups[-1][-1]._project_conv.out_channels != width:
            groups.append([])
        groups[-1].append(block)
    return [nn.Sequential(b._conv_stem, b._bn0, _ReLU6()), *(nn.Sequential(*g) for g in groups),
            nn.Sequential(b._conv_head, b._bn1, _ReLU6(), _GlobalMean())]


def _small_stages(backbone: nn.Module) -> list[nn.Module]:
    b = backbone
    *first, last = list(b.stages)
    return [b.stem, *first, nn.Sequential(last, b.avgpool, nn.Flatten(1))]


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The stages of ``backbone`` in order (see the module's docstring)."""
    from bctool.models.efficientnet import EfficientNetLite
    from bctool.models.resnet import ResNet
    from bctool.models.small import SmallCNN

    own = getattr(backbone, "stages", None)
    if callable(own) and not isinstance(own, nn.Module):
        return list(own())
    if isinstance(backbone, ResNet):
        return _resnet_stages(backbone)
    if isinstance(backbone, EfficientNetLite):
        return _lite_stages(backbone)
    if isinstance(backbone, SmallCNN):
        return _small_stages(backbone)
    return [backbone]


TRAINABLE_HELP = ("all (the whole backbone), neck (the backbone frozen: only the neck and head train), "
                  "or N (the backbone's last N stages train, the others are frozen)")


def frozen_stage_count(trainable: str, stages: int) -> int:
    """How many leading stages ``--trainable`` freezes, of ``stages``: 0 for ``all``, every one
    for ``neck``, ``stages - N`` for a number N (1 <= N < stages)."""
    if trainable == "all":
        return 0
    if trainable == "neck":
        return stages
    try:
        count = int(trainable)
    except ValueError:
        raise ConfigError(f"--trainable {trainable!r} is unknown; give {TRAINABLE_HELP}") from None
    if not 1 <= count < stages:
        raise ConfigError(
            f"--trainable {count}: this backbone has {stages} stages, so N must be from 1 to {stages - 1} "
            "(all: every stage; neck: none)")
    return stages - count
