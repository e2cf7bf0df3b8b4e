"""``l2``: regress each new embedding onto the old embedding of the same image."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bctool.train.methods.base import Method, register_method


@register_method("l2")
class L2(Method):
    """MSE between the normalised new and old embeddings of each image."""

    parts = ("l2",)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        new = F.normalize(embeddings, dim=1)
        old = F.normalize(ref_embeddings.detach(), dim=1)
        return {"l2": F.mse_loss(new, old)}
