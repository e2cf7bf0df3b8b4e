"""``unibct`` (as in the AdvBCT code): ArcFace against the fixed old class centers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from bctool.errors import ConfigError
from bctool.train.methods.base import Method, MethodContext, register_method
from bctool.train.methods.parts import arcface_logits, masked_mean, old_class_positions


@dataclass(frozen=True)
class UniBCTParams:
    """The ArcFace logits of the old-center classifier."""

    scale: float = 30.0  # s
    margin: float = 0.3  # m, added to the target angle

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"unibct parameter scale={self.scale!r} must be positive")
        if not 0 <= self.margin < math.pi:
            raise ConfigError(f"unibct parameter margin={self.margin!r} must lie in [0, pi) (an angle)")


@register_method("unibct")
class UniBCT(Method):
    """ArcFace cross-entropy of normalised new embeddings against the fixed old class centers."""

    parts = ("unibct",)

    Params = UniBCTParams

    def __init__(self, ctx: MethodContext, params: UniBCTParams | None = None) -> None:
        super().__init__(ctx, params)
        stats = ctx.stats
        self.register_buffer("targets", old_class_positions(stats), persistent=False)
        self.register_buffer("prototypes", F.normalize(stats.centers[stats.is_old], dim=1), persistent=False)
        self.has_old_classes = self.prototypes.shape[0] > 0

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        if not self.has_old_classes:
            return {"unibct": embeddings.sum() * 0}
        targets = self.targets[labels]
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        cosine = F.normalize(embeddings, dim=1) @ self.prototypes.t()
        logits = arcface_logits(cosine, safe_targets, self.params.scale, self.params.margin)
        ce = F.cross_entropy(logits, safe_targets, reduction="none")
        return {"unibct": masked_mean(ce, valid)}
