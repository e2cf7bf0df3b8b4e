"""Compatibility losses: one small class per method, registered by name.

Each loss takes ``(embeddings, labels, ref_embeddings, ref_labels)`` — the new model's raw
embeddings (with grad), their labels, and the old model's raw embeddings of the same images —
and returns a dict of named, already weighted loss parts. The caller adds its classification
loss and sums every returned part. All work is batched tensor ops with no host-device sync, so
a step never waits on the accelerator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bctool.errors import ConfigError
from bctool.models import EmbeddingModel
from bctool.models.heads import ACOS_EPS, CosineHead, LinearHead, arcface_target
from bctool.train.compat.grl import grad_reverse, grl_alpha
from bctool.train.compat.stats import OldStats
from bctool.train.distributed import gather_rows, global_count


@dataclass
class CompatContext:
    """What a compatibility loss may read: old statistics, the new model, the frozen old side."""

    stats: OldStats  # on the training device
    model: EmbeddingModel  # the new model being trained
    old_head: nn.Module | None = None  # frozen old classifier: raw embeddings -> old-class logits
    old_label_index: torch.Tensor | None = None  # (C,) new label -> old_head class, -1 if not old
    boundary_threshold: float = 1.0  # T of AdvBCT's elastic boundary
    scale: float = 30.0  # s of unibct and of bct's prototype classifier
    margin: float = 0.3  # m of unibct
    temperature: float = 0.01  # hotrefresh
    negatives: int = 10  # hotrefresh: top-k other-class negatives, old and new each

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.negatives < 1:
            raise ConfigError(f"the number of negatives must be at least 1, got {self.negatives}")
        if self.scale <= 0:
            raise ConfigError(f"scale must be positive, got {self.scale}")


class CompatLoss(nn.Module):
    """Base class: stores the context and the training progress; subclasses define ``forward``."""

    name: str = ""
    # True when some of the loss's parameters never get a gradient (an ablation that drops the
    # term using them): DistributedDataParallel must then look for unused parameters.
    has_unused_parameters: bool = False

    def __init__(self, ctx: CompatContext) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the task owns the model and the frozen old head.
        self.ctx = ctx
        self.epoch, self.epochs, self.step, self.total_steps = 0, 1, 0, 1
        # Detached scalars a forward pass measures on the side, only when ``noting`` (the task
        # sets it under ``--diagnostics``); never losses.
        self.noting = False
        self.facts: dict[str, torch.Tensor] = {}

    def summary(self) -> dict[str, object]:
        """JSON-ready facts about the loss's own state at the end of training (none by default)."""
        return {}

    def set_progress(self, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        """Record training progress: 0-based ``epoch`` of ``epochs``, global ``step`` of ``total_steps``."""
        self.epoch, self.epochs, self.step, self.total_steps = epoch, epochs, step, total_steps

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Named, weighted loss parts for one batch."""
        raise NotImplementedError


COMPAT_LOSSES: dict[str, type[CompatLoss]] = {}


def register(name: str) -> Callable[[type[CompatLoss]], type[CompatLoss]]:
    """Class decorator: make a compatibility loss available under ``name``."""

    def add(cls: type[CompatLoss]) -> type[CompatLoss]:
        cls.name = name
        COMPAT_LOSSES[name] = cls
        return cls

    return add


def create_compat_loss(name: str, ctx: CompatContext) -> CompatLoss:
    """Build the compatibility loss registered as ``name``."""
    if name not in COMPAT_LOSSES:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(COMPAT_LOSSES)}")
    return COMPAT_LOSSES[name](ctx)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` holds; 0 (still attached to the graph) if it never does.

    Under multi-process training the mean is over the global batch: each of W ranks returns
    ``W * (its sum) / (global count)``, so the ranks' average (what DDP's gradient averaging
    computes) is the global masked mean.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count, world = global_count(mask.sum())
    return total * world / count.clamp(min=1).to(values.dtype)


def _old_class_positions(stats: OldStats) -> torch.Tensor:
    """(C,) int64: each old class's position among the old classes, -1 for the others."""
    positions = torch.cumsum(stats.is_old.long(), 0) - 1
    return torch.where(stats.is_old, positions, torch.full_like(positions, -1))


def _arcface_logits(cosine: torch.Tensor, targets: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """s·cos(θ + m) on the target column, s·cos elsewhere (ArcFaceHead's rule, with its fallback)."""
    target = cosine.gather(1, targets.unsqueeze(1))
    return scale * cosine.scatter(1, targets.unsqueeze(1), arcface_target(target, margin))


def _classifier_weight(model: EmbeddingModel) -> torch.Tensor:
    """The new model's (C, D) class weights: ``fc.weight`` of a linear head, ``weight`` of a cosine one."""
    head = model.head
    if isinstance(head, LinearHead):
        return head.fc.weight
    if isinstance(head, CosineHead):
        return head.weight
    raise ConfigError(
        f"lce needs the new model's classification head (linear or cosine family), got {type(head).__name__}"
    )


@register("independent")
class IndependentLoss(CompatLoss):
    """No compatibility term: the new model is trained alone (φ_*)."""

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        return {}


@register("l2")
class L2Loss(CompatLoss):
    """MSE between the normalised new and old embeddings of each image."""

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        new = F.normalize(embeddings, dim=1)
        old = F.normalize(ref_embeddings.detach(), dim=1)
        return {"l2": F.mse_loss(new, old)}


@register("bct")
class BCTLoss(CompatLoss):
    """Influence loss: the old classifier's cross-entropy on new embeddings of old classes.

    Uses ``ctx.old_head`` when given, else a cosine classifier over the old class centers.
    """

    all_classes = False  # bct-all: prototypes of every training class, the old head unused

    def __init__(self, ctx: CompatContext) -> None:
        super().__init__(ctx)
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
            targets = _old_class_positions(stats)
            prototypes = F.normalize(stats.centers[stats.is_old], dim=1)
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.has_old_classes = bool((targets >= 0).any())

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Old-class logits of the new raw embeddings."""
        if self.ctx.old_head is not None and not self.all_classes:
            return self.ctx.old_head(embeddings)
        return self.ctx.scale * F.normalize(embeddings, dim=1) @ self.prototypes.t()

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        if not self.has_old_classes:
            return {"bct": embeddings.sum() * 0}
        targets = self.targets[labels]
        valid = targets >= 0
        ce = F.cross_entropy(self.logits(embeddings), targets.clamp(min=0), reduction="none")
        return {"bct": _masked_mean(ce, valid)}


@register("bct-all")
class BCTAllClasses(BCTLoss):
    """BCT's influence loss over every training class, new classes included: a cosine classifier
    (scale s) whose prototypes are the old model's class centers of all training classes. The
    BCT paper synthesises old-space classifier weights for new classes this way; here every
    class gets them, so the whole new training set is tied to the old space, not only the old
    classes."""

    all_classes = True


@register("center")
class CenterPull(CompatLoss):
    """Pull every normalised new embedding towards its class's old center: |f̂_new - c_y|², for
    every training class with old embeddings (new classes included). With two images a class
    the center lies between them, so a query pulled there sits nearer its class's old gallery
    item than the old model's own query does."""

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        stats = self.ctx.stats
        distance = (F.normalize(embeddings, dim=1) - stats.centers[labels]).pow(2).sum(dim=1)
        return {"center": _masked_mean(distance, stats.counts[labels] > 0)}


@register("lce")
class LCELoss(CompatLoss):
    """LCE: an angular boundary around each old center, and new class weights aligned with it."""

    def __init__(self, ctx: CompatContext) -> None:
        super().__init__(ctx)
        weight = _classifier_weight(ctx.model)
        if weight.shape[0] != ctx.stats.num_classes:
            raise ConfigError(
                f"the new classifier has {weight.shape[0]} classes but the old statistics have "
                f"{ctx.stats.num_classes}; build both over the new label space"
            )

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        stats = self.ctx.stats
        selected = stats.has_boundary[labels]
        centers = F.normalize(stats.centers[labels], dim=1)
        cosine = (centers * F.normalize(embeddings, dim=1)).sum(dim=1)
        theta = torch.acos(cosine.clamp(-1 + ACOS_EPS, 1 - ACOS_EPS))
        outside = (theta - stats.theta_max[labels]).clamp(min=0)
        weights = F.normalize(_classifier_weight(self.ctx.model)[labels], dim=1)
        misalignment = 1 - (centers * weights).sum(dim=1)
        return {"lce_boundary": _masked_mean(outside, selected), "lce_align": _masked_mean(misalignment, selected)}


@register("unibct")
class UniBCTLoss(CompatLoss):
    """ArcFace cross-entropy of normalised new embeddings against the fixed old class centers."""

    def __init__(self, ctx: CompatContext) -> None:
        super().__init__(ctx)
        stats = ctx.stats
        self.register_buffer("targets", _old_class_positions(stats), persistent=False)
        self.register_buffer("prototypes", F.normalize(stats.centers[stats.is_old], dim=1), persistent=False)
        self.has_old_classes = self.prototypes.shape[0] > 0

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        if not self.has_old_classes:
            return {"unibct": embeddings.sum() * 0}
        targets = self.targets[labels]
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        cosine = F.normalize(embeddings, dim=1) @ self.prototypes.t()
        logits = _arcface_logits(cosine, safe_targets, self.ctx.scale, self.ctx.margin)
        ce = F.cross_entropy(logits, safe_targets, reduction="none")
        return {"unibct": _masked_mean(ce, valid)}


@register("hotrefresh")
class HotRefreshLoss(CompatLoss):
    """Regression-alleviating InfoNCE: old embedding of the same image against hard negatives.

    Under multi-process training the negatives come from the global batch (every rank's rows),
    so N processes compute the loss of one process with the whole batch.
    """

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        new = F.normalize(embeddings, dim=1)
        old = F.normalize(ref_embeddings.detach(), dim=1)
        positive = (new * old).sum(dim=1, keepdim=True)
        all_new, all_old, all_labels = gather_rows(new), gather_rows(old), gather_rows(labels)
        # Same class (the row itself included) is never a negative; -inf drops out of the softmax.
        same_class = labels.unsqueeze(1) == all_labels.unsqueeze(0)
        k = min(self.ctx.negatives, all_labels.shape[0])
        to_old = (new @ all_old.t()).masked_fill(same_class, -torch.inf).topk(k, dim=1).values
        to_new = (new @ all_new.t()).masked_fill(same_class, -torch.inf).topk(k, dim=1).values
        logits = torch.cat([positive, to_old, to_new], dim=1) / self.ctx.temperature
        target = torch.zeros_like(labels)
        return {"hotrefresh": F.cross_entropy(logits, target)}


@register("advbct")
class AdvBCTLoss(CompatLoss):
    """AdvBCT: a domain discriminator behind a gradient-reversal layer, plus an elastic boundary."""

    def __init__(self, ctx: CompatContext) -> None:
        super().__init__(ctx)
        dim, device = ctx.model.embedding_dim, ctx.stats.centers.device
        self.discriminator = nn.Sequential(
            nn.Linear(dim, 100),
            nn.BatchNorm1d(100),
            nn.ReLU(),
            nn.Linear(100, 2),
            nn.LogSoftmax(dim=1),
        ).to(device)
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

    def boundary_radii(self) -> torch.Tensor:
        """(C,) elastic radii r̃: r_max moved towards T by |r_max - T|·sigmoid(w)."""
        radius = self.ctx.stats.radius_max
        threshold = self.ctx.boundary_threshold
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
        return {"threshold": self.ctx.boundary_threshold,
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
        return _masked_mean(excess, violating)

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        return {
            "adv": self.adv_weight * self.adversarial(embeddings, ref_embeddings),
            "bound": self.boundary(embeddings, labels),
        }


# Ablations of AdvBCT: which of its parts carries the compatibility.


@register("advbct-noadv")
class AdvBCTBoundaryOnly(AdvBCTLoss):
    """AdvBCT without the adversarial term: the elastic boundary alone."""

    has_unused_parameters = True  # the discriminator

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        return {"bound": self.boundary(embeddings, labels)}


@register("advbct-nobound")
class AdvBCTAdversarialOnly(AdvBCTLoss):
    """AdvBCT without the boundary term: the discriminator and GRL alone."""

    has_unused_parameters = True  # the boundary weights

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor
    ) -> dict[str, Tensor]:
        return {"adv": self.adv_weight * self.adversarial(embeddings, ref_embeddings)}


@register("advbct-joint")
class AdvBCTJointDiscriminator(AdvBCTLoss):
    """AdvBCT with the discriminator run once on the new and old batch together, so its
    BatchNorm sees both domains' statistics (the original runs the two batches separately)."""

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


@register("advbct-fixed")
class AdvBCTFixedRadius(AdvBCTLoss):
    """AdvBCT with the boundary fixed at the old classes' r_max (no learnable elasticity)."""

    has_unused_parameters = True  # the boundary weights

    def boundary_radii(self) -> Tensor:
        return self.ctx.stats.radius_max
