"""A compatibility method: pull each new embedding towards the old embedding of the same image."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bctool.registry import param
from bctool.train.methods import Method


@dataclass(frozen=True)
class CosParams:
    """How strongly the cosine term pulls."""

    weight: float = param(1.0, low=0.0, help="multiplier of 1 - cos(new, old)")


class CosToOld(Method):
    """1 - cos(new, old) of each image, weighted: the simplest compatibility term."""

    Params = CosParams
    parts = ("cos",)  # the loss parts forward returns, logged and checked by name

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        cosine = F.cosine_similarity(embeddings, ref_embeddings.detach(), dim=1)
        return {"cos": self.params.weight * (1 - cosine).mean()}
