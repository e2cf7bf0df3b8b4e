"""``center`` (a variant): pull every new embedding to its class's old center."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bctool.train.methods.base import Method, register_method
from bctool.train.methods.parts import masked_mean


@register_method("center")
class CenterPull(Method):
    """Variant: pull every normalised new embedding towards its class's old center.

    |f̂_new - c_y|², for every training class with old embeddings (new classes included). With
    two images a class the center lies between them, so a query pulled there sits nearer its
    class's old gallery item than the old model's own query does.
    """

    parts = ("center",)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        stats = self.ctx.stats
        distance = (F.normalize(embeddings, dim=1) - stats.centers[labels]).pow(2).sum(dim=1)
        return {"center": masked_mean(distance, stats.counts[labels] > 0)}
