"""A backbone and a classification head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bctool.models.heads import Head


class TinyCNN(nn.Module):
    """Two strided convolutions and global average pooling: 32 features."""

    num_features = 32  # the width of the pooled features: bctool's neck maps it to --embedding-dim

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).mean(dim=(2, 3))


class UnitLinearHead(Head):
    """A linear classifier on the L2-normalised embedding, scaled (no bias)."""

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)
        self.scale = scale

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(embedding, dim=1), self.weight)

    def class_weights(self) -> torch.Tensor:
        return self.weight  # methods that read the new model's class weights can use this head

    def class_rows(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}  # a warm start copies these rows by class name
