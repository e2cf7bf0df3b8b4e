"""Tasks: what one training step computes, returned as named loss parts plus ``loss``.

A task is an ``nn.Module`` that owns every trainable parameter of the step (the model, and for
compatible training its discriminator or boundary parameters), so the optimizer is built from
``task.parameters()`` and the loop never branches on the method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bctool.models import EmbeddingModel


class ClassificationTask(nn.Module):
    """Train a model alone: cross-entropy of its classification head."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss parts for one batch: ``cls`` and the total ``loss``."""
        embedding = self.model.embed(images)
        cls = F.cross_entropy(self.model.classify(embedding, labels), labels)
        return {"cls": cls, "loss": cls}
