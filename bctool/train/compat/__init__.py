"""Backward-compatible training: old-model statistics, the gradient-reversal layer, and the
compatibility losses (one registered class per method)."""

from bctool.train.compat.grl import grad_reverse, grl_alpha
from bctool.train.compat.losses import (
    COMPAT_LOSSES,
    CompatContext,
    CompatLoss,
    create_compat_loss,
)
from bctool.train.compat.stats import OldStats, compute_old_stats

__all__ = [
    "COMPAT_LOSSES",
    "CompatContext",
    "CompatLoss",
    "OldStats",
    "compute_old_stats",
    "create_compat_loss",
    "grad_reverse",
    "grl_alpha",
]
