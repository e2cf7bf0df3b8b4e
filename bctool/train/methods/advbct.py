"""``advbct`` (Pan et al., CVPR 2023): adversarial learning behind a gradient-reversal layer
plus an elastic boundary around each old class center.

The loss is the authors' (Ashespt/AdvBCT) term for term. Trained as they train it (the
``paper`` regime: clean views, step decay, no warm-up, a head without bias) from an
ImageNet-pretrained backbone, it is the published method; bctool cannot ship those weights
(``--pretrained`` loads them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bctool.errors import ConfigError
from bctool.train.compat.grl import grad_reverse, grl_alpha
from bctool.train.methods.base import Method, MethodContext, register_method
from bctool.train.methods.parts import masked_mean


def make_discriminator(dim: int) -> nn.Sequential:
    """AdvBCT's domain discriminator: Linear(D, 100) -> BatchNorm1d -> ReLU -> Linear(100, 2),
    log-softmax scores (class 0: new, 1: old)."""
    return nn.Sequential(nn.Linear(dim, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 2), nn.LogSoftmax(dim=1))


@dataclass(frozen=True)
class AdvBCTParams:
    """The elastic boundary's threshold."""

    threshold: float = 1.0  # T: each class's radius r_max moves towards T (the paper's value, for GLDv2)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ConfigError(f"advbct parameter threshold={self.threshold!r} must be positive (a radius)")


@register_method("advbct")
class AdvBCT(Method):
    """AdvBCT: a domain discriminator behind a gradient-reversal layer, plus an elastic boundary."""

    parts = ("adv", "bound")

    Params = AdvBCTParams

    def __init__(self, ctx: MethodContext, params: AdvBCTParams | None = None) -> None:
        super().__init__(ctx, params)
        dim, device = ctx.model.embedding_dim, ctx.stats.centers.device
        self.discriminator = make_discriminator(dim).to(device)
        self.boundary_weight = nn.Parameter(torch.empty(ctx.stats.num_classes, device=device).uniform_(-1, 1))

    @property
    def alpha(self) -> float:
        """GRL strength α(p), p = global step / total steps."""
        return grl_alpha(self.step / max(self.total_steps, 1))

    @property
    def adv_weight(self) -> float:
        """λ_adv(e) = (E - e + 1)/E for the 0-based epoch e of E."""
        epochs = max(self.epochs, 1)
        return (epochs - self.epoch + 1) / epochs

    def boundary_radii(self) -> Tensor:
        """(C,) elastic radii r̃: r_max moved towards T by |r_max - T|·sigmoid(w)."""
        radius = self.ctx.stats.radius_max
        threshold = self.params.threshold
        elastic = (radius - threshold).abs() * torch.sigmoid(self.boundary_weight)
        return torch.where(radius < threshold, radius + elastic, radius - elastic)

    def adversarial(self, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        """L_adv: new embeddings (behind the GRL) labelled 0, old embeddings labelled 1."""
        new_scores = self.discriminator(grad_reverse(embeddings, self.alpha))
        old_scores = self.discriminator(ref_embeddings.detach())
        if self.noting:
            self._note_discriminator(new_scores, old_scores)
        zeros = torch.zeros(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
        return F.nll_loss(new_scores, zeros) + F.nll_loss(old_scores, torch.ones_like(zeros))

    def _note_discriminator(self, new_scores: Tensor, old_scores: Tensor) -> None:
        """Facts: the discriminator's accuracy on the batch, new and old together (0.5 when it
        cannot tell the domains apart), and on the new features alone."""
        with torch.no_grad():
            new_right = (new_scores.argmax(dim=1) == 0).float().mean()
            old_right = (old_scores.argmax(dim=1) == 1).float().mean()
            self.facts["disc_acc"] = (new_right + old_right) / 2
            self.facts["disc_acc_new"] = new_right

    def summary(self) -> dict[str, object]:
        """r_max and the elastic radius r̃ of every class with a boundary, and T."""
        stats, radii = self.ctx.stats, self.boundary_radii().detach()
        keep = stats.has_boundary
        return {"threshold": self.params.threshold,
                "radius_max": stats.radius_max[keep].tolist(), "radius": radii[keep].tolist()}

    def boundary(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """L_bound: mean excess distance to the old center over the violating samples."""
        stats = self.ctx.stats
        distance = (F.normalize(embeddings, dim=1) - stats.centers[labels]).norm(dim=1)
        radii = self.boundary_radii()
        excess = distance - radii[labels]
        bounded = stats.has_boundary[labels]
        violating = bounded & (excess > 0)
        if self.noting:
            with torch.no_grad():
                self.facts["violating"] = violating.float().sum() / bounded.float().sum().clamp(min=1)
                self.facts["radius_mean"] = radii[stats.has_boundary].mean()
        return masked_mean(excess, violating)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        return {
            "adv": self.adv_weight * self.adversarial(embeddings, ref_embeddings),
            "bound": self.boundary(embeddings, labels),
        }
