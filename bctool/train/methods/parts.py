"""Pieces several methods share: masked means over the global batch, old-class positions, the
ArcFace logit rule and the new model's class weights."""

from __future__ import annotations

import torch
from torch import Tensor

from bctool.errors import ConfigError
from bctool.models import EmbeddingModel
from bctool.models.heads import HEADS, arcface_target
from bctool.train.compat.stats import OldStats
from bctool.train.distributed import global_count


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds; 0 (still attached to the graph) if it never does.

    Under multi-process training the mean is over the global batch: each of W ranks returns
    ``W * (its sum) / (global count)``, so the ranks' average (what DDP's gradient averaging
    computes) is the global masked mean.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count, world = global_count(mask.sum())
    return total * world / count.clamp(min=1).to(values.dtype)


def old_class_positions(stats: OldStats) -> Tensor:
    """(C,) int64: each old class's position among the old classes, -1 for the others."""
    positions = torch.cumsum(stats.is_old.long(), 0) - 1
    return torch.where(stats.is_old, positions, torch.full_like(positions, -1))


def arcface_logits(cosine: Tensor, targets: Tensor, scale: float, margin: float) -> Tensor:
    """s·cos(θ + m) on the target column, s·cos elsewhere (ArcFaceHead's rule, with its fallback)."""
    target = cosine.gather(1, targets.unsqueeze(1))
    return scale * cosine.scatter(1, targets.unsqueeze(1), arcface_target(target, margin))


def classifier_weight(model: EmbeddingModel, method: str = "this method") -> Tensor:
    """The new model's (C, D) class weights, as its head declares them."""
    weights = model.head.class_weights() if model.head is not None else None
    if weights is None:
        with_weights = [e.name for e in HEADS.entries() if e.declares.get("class_weights")]
        raise ConfigError(
            f"{method} needs the class weights of the new model's head, and its {model.config.head!r} head has none; "
            f"pass --head with one of {with_weights}"
        )
    return weights
