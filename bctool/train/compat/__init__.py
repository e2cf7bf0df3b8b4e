"""What compatible training reads from the old side: old-model statistics and the
gradient-reversal layer (the methods themselves: :mod:`bctool.train.methods`)."""

from bctool.train.compat.grl import grad_reverse, grl_alpha
from bctool.train.compat.stats import OldStats, compute_old_stats

__all__ = ["OldStats", "compute_old_stats", "grad_reverse", "grl_alpha"]
