"""``lce`` (Meng et al., ICCV 2021): learning compatible embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bctool.errors import ConfigError
from bctool.models.heads import ACOS_EPS
from bctool.train.methods.base import Method, MethodContext, register_method
from bctool.train.methods.parts import classifier_weight, masked_mean


@register_method("lce")
class LCE(Method):
    """LCE: an angular boundary around each old center, and new class weights aligned with it."""

    parts = ("lce_boundary", "lce_align")

    needs_new_head = True

    def __init__(self, ctx: MethodContext, params: object = None) -> None:
        super().__init__(ctx, params)
        weight = classifier_weight(ctx.model, self.name)
        if weight.shape[0] != ctx.stats.num_classes:
            raise ConfigError(
                f"the new classifier has {weight.shape[0]} classes but the old statistics have "
                f"{ctx.stats.num_classes}; build both over the new label space"
            )

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        stats = self.ctx.stats
        selected = stats.has_boundary[labels]
        centers = F.normalize(stats.centers[labels], dim=1)
        cosine = (centers * F.normalize(embeddings, dim=1)).sum(dim=1)
        theta = torch.acos(cosine.clamp(-1 + ACOS_EPS, 1 - ACOS_EPS))
        outside = (theta - stats.theta_max[labels]).clamp(min=0)
        weights = F.normalize(classifier_weight(self.ctx.model, self.name)[labels], dim=1)
        misalignment = 1 - (centers * weights).sum(dim=1)
        return {"lce_boundary": masked_mean(outside, selected), "lce_align": masked_mean(misalignment, selected)}
