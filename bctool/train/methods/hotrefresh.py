"""``hotrefresh`` (Zhang et al., ICLR 2022): regression-alleviating InfoNCE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bctool.errors import ConfigError
from bctool.train.distributed import gather_rows
from bctool.train.methods.base import Method, register_method


@dataclass(frozen=True)
class HotRefreshParams:
    """The InfoNCE's temperature and its hard negatives."""

    temperature: float = 0.01
    negatives: int = 10  # top-k other-class negatives, old and new each

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"hotrefresh parameter temperature={self.temperature!r} must be positive")
        if self.negatives < 1:
            raise ConfigError(f"hotrefresh parameter negatives={self.negatives!r} must be at least 1")


@register_method("hotrefresh")
class HotRefresh(Method):
    """Regression-alleviating InfoNCE: old embedding of the same image against hard negatives.

    Under multi-process training the negatives come from the global batch (every rank's rows),
    so N processes compute the loss of one process with the whole batch.
    """

    parts = ("hotrefresh",)

    Params = HotRefreshParams

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        new = F.normalize(embeddings, dim=1)
        old = F.normalize(ref_embeddings.detach(), dim=1)
        positive = (new * old).sum(dim=1, keepdim=True)
        all_new, all_old, all_labels = gather_rows(new), gather_rows(old), gather_rows(labels)
        # Same class (the row itself included) is never a negative; -inf drops out of the softmax.
        same_class = labels.unsqueeze(1) == all_labels.unsqueeze(0)
        k = min(self.params.negatives, all_labels.shape[0])
        to_old = (new @ all_old.t()).masked_fill(same_class, -torch.inf).topk(k, dim=1).values
        to_new = (new @ all_new.t()).masked_fill(same_class, -torch.inf).topk(k, dim=1).values
        logits = torch.cat([positive, to_old, to_new], dim=1) / self.params.temperature
        target = torch.zeros_like(labels)
        return {"hotrefresh": F.cross_entropy(logits, target)}
