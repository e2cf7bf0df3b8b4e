"""Ablations of AdvBCT: which of its parts carries the compatibility."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bctool.train.compat.grl import grad_reverse
from bctool.train.methods.advbct import AdvBCT
from bctool.train.methods.base import register_method


@register_method("advbct-noadv")
class AdvBCTBoundaryOnly(AdvBCT):
    """Ablation: AdvBCT without the adversarial term (the elastic boundary alone)."""

    parts = ("bound",)

    has_unused_parameters = True  # the discriminator

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        return {"bound": self.boundary(embeddings, labels)}


@register_method("advbct-nobound")
class AdvBCTAdversarialOnly(AdvBCT):
    """Ablation: AdvBCT without the boundary term (the discriminator and GRL alone)."""

    parts = ("adv",)

    has_unused_parameters = True  # the boundary weights

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        return {"adv": self.adv_weight * self.adversarial(embeddings, ref_embeddings)}


@register_method("advbct-joint")
class AdvBCTJointDiscriminator(AdvBCT):
    """Ablation: AdvBCT with one discriminator pass over the new and old batch together.

    Its BatchNorm then sees both domains' statistics (the original runs the two batches
    separately).
    """

    def adversarial(self, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        both = torch.cat([grad_reverse(embeddings, self.alpha), ref_embeddings.detach()])
        domain = torch.cat([
            torch.zeros(embeddings.shape[0], dtype=torch.long, device=embeddings.device),
            torch.ones(ref_embeddings.shape[0], dtype=torch.long, device=embeddings.device),
        ])
        scores = self.discriminator(both)
        if self.noting:
            self._note_discriminator(scores[: embeddings.shape[0]], scores[embeddings.shape[0]:])
        # Sum of the two per-domain means, like the separate passes.
        return 2 * F.nll_loss(scores, domain)


@register_method("advbct-fixed")
class AdvBCTFixedRadius(AdvBCT):
    """Ablation: AdvBCT with the boundary fixed at the old classes' r_max (no elasticity)."""

    has_unused_parameters = True  # the boundary weights

    def boundary_radii(self) -> Tensor:
        return self.ctx.stats.radius_max
