"""``bct`` (Shen et al., CVPR 2020) and its variant ``bct-all``: the old classifier's
cross-entropy on new embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bctool.errors import ConfigError
from bctool.train.methods.base import Method, MethodContext, register_method
from bctool.train.methods.parts import masked_mean, old_class_positions


@dataclass(frozen=True)
class BCTParams:
    """BCT's prototype classifier, used without the old checkpoint's classifier (and by bct-all)."""

    scale: float = 30.0  # s: logits are s·cos(f, old class center)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"bct parameter scale={self.scale!r} must be positive")


@register_method("bct")
class BCT(Method):
    """Influence loss: the old classifier's cross-entropy on new embeddings of old classes.

    Uses the old checkpoint's classifier when it is known, else a cosine classifier over the
    old class centers (scale s).
    """

    parts = ("bct",)

    Params = BCTParams
    uses_old_head = True
    all_classes = False  # bct-all: prototypes of every training class, the old head unused

    def __init__(self, ctx: MethodContext, params: BCTParams | None = None) -> None:
        super().__init__(ctx, params)
        stats = ctx.stats
        if self.all_classes:
            present = stats.counts > 0
            targets = torch.where(present, torch.cumsum(present.long(), 0) - 1, torch.full_like(stats.counts, -1))
            prototypes = F.normalize(stats.centers[present], dim=1)
        elif ctx.old_head is not None:
            if ctx.old_label_index is None:
                raise ConfigError("bct with an old classifier head needs old_label_index (new label -> old class)")
            if tuple(ctx.old_label_index.shape) != (stats.num_classes,):
                raise ConfigError(
                    f"old_label_index must have shape ({stats.num_classes},), got {tuple(ctx.old_label_index.shape)}"
                )
            targets = ctx.old_label_index.to(device=stats.centers.device, dtype=torch.int64)
            prototypes = torch.zeros(0, stats.centers.shape[1], device=stats.centers.device)
        else:
            targets = old_class_positions(stats)
            prototypes = F.normalize(stats.centers[stats.is_old], dim=1)
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.has_old_classes = bool((targets >= 0).any())

    def logits(self, embeddings: Tensor) -> Tensor:
        """Old-class logits of the new raw embeddings."""
        if self.ctx.old_head is not None and not self.all_classes:
            return self.ctx.old_head(embeddings)
        return self.params.scale * F.normalize(embeddings, dim=1) @ self.prototypes.t()

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        if not self.has_old_classes:
            return {"bct": embeddings.sum() * 0}
        targets = self.targets[labels]
        valid = targets >= 0
        ce = F.cross_entropy(self.logits(embeddings), targets.clamp(min=0), reduction="none")
        return {"bct": masked_mean(ce, valid)}


@register_method("bct-all")
class BCTAllClasses(BCT):
    """Variant: BCT's influence loss over every training class, with old-center prototypes.

    A cosine classifier (scale s) whose prototypes are the old model's class centers of all
    training classes. The BCT paper synthesises old-space classifier weights for new classes
    this way; here every class gets them, so the whole new training set is tied to the old
    space, not only the old classes.
    """

    uses_old_head = False
    all_classes = True
