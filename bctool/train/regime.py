"""Training regimes: named defaults for the parts of training that a paper fixes.

A regime sets four parts, each also an option of its own: the training views (``augment``), the
learning-rate schedule (``schedule``), the warm-up (``warmup_epochs``) and whether the linear
head has a bias (``head_bias``). A part left unset (``None``) takes its regime's value;
:func:`resolve_regime` makes every part concrete, and that is what checkpoints record.

* ``bctool`` (the default): training views that match the old side (``auto``: the clean image
  against precomputed old embeddings, which are of clean images; random resized crops when the
  old model runs on every batch or there is no old side), one epoch of linear warm-up then cosine
  decay, a linear head with a bias;
* ``paper``: the AdvBCT authors' training (Ashespt/AdvBCT, ``configs/new_AdvBct.yml``): clean
  views (resize and normalise, nothing else), step decay x0.1 at epochs 5, 10 and 20 of 30 (scaled
  to other epoch counts), no warm-up, a linear head without a bias. SGD 0.1, momentum 0.9 and
  weight decay 5e-4 are every regime's defaults. What bctool cannot reproduce by itself: the
  ImageNet-pretrained ResNet-18 both models start from (``--pretrained``) and SyncBN over 4 x 256
  images (``torchrun ... --sync-bn --batch-size 1024``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from bctool.errors import ConfigError
from bctool.registry import Registry

logger = logging.getLogger(__name__)

# Training views: the clean image (the eval transform), a random horizontal mirror of it, or a
# random resized crop (scale 0.35-1) with colour jitter.
# The bctool regime's views: "none" against precomputed old embeddings (made from clean images),
# "crop" otherwise (no old side, or the old model run on the same views).
AUTO = "auto"
# The AdvBCT authors' MultiStepLR: x0.1 at these epochs of 30.
PAPER_MILESTONES, PAPER_EPOCHS, STEP_GAMMA = (5, 10, 20), 30, 0.1


@dataclass(frozen=True)
class Regime:
    """The value of each part a regime sets."""

    description: str
    augment: str
    schedule: str
    warmup_epochs: float
    head_bias: bool


def _admit_regime(name: str, chosen: object) -> None:
    if not isinstance(chosen, Regime):
        raise ConfigError(f"regime {name!r} must be a bctool.train.regime.Regime, got {chosen!r}")


# Regimes by --regime name; the entry-point group bctool.regimes adds others (bctool.registry).
REGIMES: Registry[Regime] = Registry(
    "regime", "regimes", admit=_admit_regime,
    derive=lambda name, r: {"description": r.description, "augment": r.augment, "schedule": r.schedule,
                            "warmup_epochs": r.warmup_epochs, "head_bias": r.head_bias},
)
REGIMES.register("bctool", Regime(
    "bctool's defaults: training views that match the old side (clean against precomputed old embeddings, "
    "random crops otherwise), one epoch of linear warm-up then cosine decay, a linear head with a bias",
    augment=AUTO, schedule="cosine", warmup_epochs=1.0, head_bias=True))
REGIMES.register("paper", Regime(
    "the AdvBCT authors': clean training views (resize only), step decay x0.1 at epochs 5, 10 and 20 "
    "of 30 (scaled to --epochs), no warm-up, a linear head without a bias", augment="none",
    schedule="step", warmup_epochs=0.0, head_bias=False))
PARTS = ("augment", "schedule", "warmup_epochs", "head_bias")


def regime(name: str) -> Regime:
    """The regime called ``name``; an unknown name is a :class:`ConfigError` naming the choices."""
    if name not in REGIMES:
        REGIMES.raise_if_failed(name)
        raise ConfigError(f"--regime {name!r} is unknown; choose one of {sorted(REGIMES)}")
    return REGIMES[name]


def regime_parts(name: str, given: dict[str, object], precomputed_old: bool) -> dict[str, object]:
    """Every part of regime ``name``, with the ``given`` values that are not None over its own;
    ``precomputed_old``: the run trains against precomputed old embeddings (``auto`` views)."""
    chosen = regime(name)
    parts = {part: given[part] if given.get(part) is not None else getattr(chosen, part) for part in PARTS}
    if parts["augment"] == AUTO:
        parts["augment"] = "none" if precomputed_old else "crop"
    return parts


# Learning-rate schedules by --schedule name: a function of the epoch count returning the epochs
# where the rate is multiplied by 0.1, or None for cosine decay to zero (after the warm-up).
SCHEDULES: Registry[Callable[[int], tuple[int, ...] | None]] = Registry("schedule", "schedules")


@SCHEDULES.register("cosine")
def cosine_schedule(epochs: int) -> None:
    """Cosine decay to zero after the warm-up."""
    return None


@SCHEDULES.register("step")
def step_milestones(epochs: int) -> tuple[int, ...]:
    """The epochs (0-based boundaries) where the step schedule multiplies the rate by 0.1: the
    authors' 5, 10 and 20 of 30 scaled to ``epochs``, each at least 1, repeats dropped."""
    scaled = (max(1, round(m * epochs / PAPER_EPOCHS)) for m in PAPER_MILESTONES)
    return tuple(sorted({m for m in scaled if m < epochs}))
