"""The training configuration: four frozen groups built from the options by one function.

* :class:`ModelOptions`: what model is trained and how it starts (the checkpoint's structure,
  its input size, pretrained weights or a warm start);
* :class:`OptimOptions`: how it is optimised (schedule, batch, seed, data loading, precision);
* :class:`CompatOptions`: what it must stay compatible with (the method, its parameters, the
  old side);
* :class:`RunOptions`: how this process runs (device, saving, logging, resuming). These alone
  may change when an interrupted run resumes (:data:`RESUMABLE_CHANGES` is their field names).

:meth:`TrainConfig.from_options` takes every option by its flat name (the CLI's, less the
dashes); :meth:`TrainConfig.replace` changes some. The checkpoint records the flat dict of
every option (:meth:`TrainConfig.to_dict`), as before the groups existed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from bctool.data.transforms import TRAINING_VIEWS
from bctool.errors import ConfigError
from bctool.models import ModelConfig
from bctool.train.regime import SCHEDULES, regime, regime_parts

AMP_MODES = ("off", "bf16", "fp16")


def _check(group: object, rules: dict[str, tuple[bool, str]]) -> None:
    for name, (ok, rule) in rules.items():
        if not ok:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(group, name)!r} must be {rule}")


@dataclass(frozen=True)
class ModelOptions:
    """The model: its structure, its input size and where its weights start."""

    arch: str = "auto"  # auto: by the image size (bctool.train.defaults)
    embedding_dim: int = 256
    head: str = "linear"
    head_scale: float = 30.0
    head_margin: float = 0.3
    image_size: int = 224
    pretrained: str | None = None
    init_from: str | None = "auto"  # old bctool checkpoint to warm-start from; None: fresh; auto: the recipe's
    head_bias: bool | None = None  # the linear head's bias; None: the regime's

    def __post_init__(self) -> None:
        _check(self, {"image_size": (self.image_size >= 8, "at least 8"),
                      "head_scale": (math.isfinite(self.head_scale) and self.head_scale > 0, "a positive finite number"),
                      "head_margin": (math.isfinite(self.head_margin) and 0 <= self.head_margin < math.pi,
                                      "in [0, pi) (an angle for arcface, a cosine offset for cosface)")})
        if self.init_from not in (None, "auto") and self.pretrained:
            raise ConfigError(
                "pass only one of --init-from (a bctool checkpoint: backbone, neck and head rows) "
                "and --pretrained (backbone weights only)"
            )


@dataclass(frozen=True)
class OptimOptions:
    """The optimisation. SGD's settings are the AdvBCT authors'; ``regime`` gives the defaults of
    the parts left None (``augment``, ``schedule``, ``warmup_epochs``; see :mod:`bctool.train.regime`)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float | None = None  # None: the recipe's (0.1 from scratch, less for a warm start)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    regime: str = "bctool"
    warmup_epochs: float | None = None  # None: the regime's
    augment: str | None = None  # training views: none, flip or crop; None: the regime's
    schedule: str | None = None  # cosine or step; None: the regime's
    seed: int = 0
    # Not resumable: augmentation draws from per-worker seeds, so a change alters the data.
    workers: int = 2
    amp: str = "off"
    sync_bn: bool = False
    strict: bool = False  # an unreadable image stops training (default: left out, reported)
    # How much of the backbone trains: all, neck (none of it) or N (its last N stages); auto: the
    # recipe's (bctool.train.defaults). The frozen stages' outputs are computed once when the
    # views allow it (bctool.train.frozen).
    trainable: str = "auto"
    frozen_cache: bool = True

    def __post_init__(self) -> None:
        _check(self, {
            "trainable": (self.trainable in ("auto", "all", "neck")
                          or (self.trainable.isdigit() and int(self.trainable) >= 1),
                          "auto, all, neck or a number of stages (1 or more)"),
            "epochs": (self.epochs >= 1, "at least 1"),
            "batch_size": (self.batch_size >= 2, "at least 2 (BatchNorm needs two samples)"),
            "lr": (self.lr is None or self.lr > 0, "positive"),
            "workers": (self.workers >= 0, "0 or more"),
            "warmup_epochs": (self.warmup_epochs is None or self.warmup_epochs >= 0, "0 or more"),
            "augment": (self.augment is None or self.augment in TRAINING_VIEWS, f"one of {list(TRAINING_VIEWS)}"),
            "schedule": (self.schedule is None or self.schedule in SCHEDULES, f"one of {list(SCHEDULES)}"),
            "weight_decay": (self.weight_decay >= 0, "0 or more"),
        })
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp {self.amp!r} is unknown; choose one of {list(AMP_MODES)}")
        regime(self.regime)  # a known name


@dataclass(frozen=True)
class CompatOptions:
    """What the new model must stay compatible with, and by which method."""

    method: str | None = None  # None: the recommended one with an old side, independent without
    method_params: dict[str, Any] = field(default_factory=dict)  # over the method's defaults; resolved
    old_embeddings: str | None = None
    # Old embeddings of seeded augmented views (`extract --view`), each file one view of every image.
    old_views: tuple[str, ...] = ()
    old_model: str | None = None
    old_classes: str | None = None
    compat_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "old_views", tuple(os.fspath(v) for v in self.old_views))
        if self.old_views and not self.old_embeddings:
            raise ConfigError(
                "--old-views adds old embeddings of augmented views to the clean ones: pass the old model's clean "
                "embeddings of the training list as --old-embeddings too (`bctool extract` without --view)"
            )
        _check(self, {"compat_weight": (math.isfinite(self.compat_weight) and self.compat_weight >= 0,
                                        "a finite number, 0 or more")})
        if self.method is None:  # checked once bctool.train.defaults has chosen it
            if self.old_embeddings and self.old_model:
                raise ConfigError("pass only one of --old-embeddings and --old-model")
            return
        from bctool.train.methods import resolve_params

        # Every parameter of the method, defaults filled in: what the checkpoint records.
        object.__setattr__(self, "method_params", asdict(resolve_params(self.method, self.method_params)))
        if self.old_embeddings and self.old_model:
            raise ConfigError("pass only one of --old-embeddings and --old-model")
        given = [f"--{name.replace('_', '-')} {getattr(self, name)}" for name in ("old_embeddings", "old_model")
                 if getattr(self, name)]
        if given and not self.compatible:
            raise ConfigError(
                f"method {self.method!r} trains without an old side, so {given[0]} would be ignored: drop it, or "
                "pick a compatible method (`bctool list methods` lists them)"
            )
        if self.compatible and not (self.old_embeddings or self.old_model):
            raise ConfigError(
                f"method {self.method!r} trains against an old model: pass --old-embeddings "
                "OLD_EMB.safetensors (from `bctool extract` with the old model over the training "
                "list) or --old-model OLD.safetensors"
            )

    @property
    def compatible(self) -> bool:
        """True when the method trains against an old side (an open method: when one is given)."""
        if self.method is None:
            return bool(self.old_embeddings or self.old_model)
        from bctool.train.methods import method_class

        return method_class(self.method).needs_old_side


@dataclass(frozen=True)
class RunOptions:
    """How this process runs the training; these may change when a run resumes."""

    device: str = "auto"
    save_every: int = 0  # steps between mid-epoch saves of the training state (0: epochs only)
    log_dir: str | None = None  # where steps.jsonl and epochs.jsonl go (bctool plot draws them)
    diagnostics: bool = False  # also log gradient norms per loss part and the method's facts
    resume: bool = False

    def __post_init__(self) -> None:
        _check(self, {"save_every": (self.save_every >= 0, "0 (epochs only) or more")})


GROUPS = {"model": ModelOptions, "optim": OptimOptions, "compat": CompatOptions, "run": RunOptions}
# Which group each option belongs to, by its flat name.
OPTION_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
# Options that may change between an interrupted run and its resumption: the run group's.
RESUMABLE_CHANGES = frozenset(f.name for f in dataclasses.fields(RunOptions))


@dataclass(frozen=True)
class TrainConfig:
    """How to train one model: the four option groups."""

    model: ModelOptions = field(default_factory=ModelOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    compat: CompatOptions = field(default_factory=CompatOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """The config of the options given by flat name (``epochs=10``, ``method="bct"``), each
        in its group, defaults elsewhere; an unknown name is a :class:`ConfigError`, and paths
        (``os.PathLike``) are stored as strings."""
        return cls(**{name: GROUPS[name](**values) for name, values in _by_group(options).items()})

    def replace(self, **options: Any) -> TrainConfig:
        """A copy with the options given by flat name changed, each changed group checked again."""
        groups = {name: dataclasses.replace(getattr(self, name), **values) for name, values in _by_group(options).items()}
        return dataclasses.replace(self, **groups)

    @property
    def compatible(self) -> bool:
        """True when the run trains against an old side."""
        return self.compat.compatible

    def with_regime(self, precomputed_old: bool | None = None) -> TrainConfig:
        """This config with every part its regime sets made concrete; the parts given stay.
        ``precomputed_old`` overrides whether the run trains against precomputed old embeddings
        (what the bctool regime's views follow; default: whether ``old_embeddings`` is set).
        What-if questions about the views use it; training resolves every open option in
        :func:`bctool.train.defaults.resolve_defaults`."""
        given = {"augment": self.optim.augment, "schedule": self.optim.schedule,
                 "warmup_epochs": self.optim.warmup_epochs, "head_bias": self.model.head_bias}
        precomputed = bool(self.compat.old_embeddings) if precomputed_old is None else precomputed_old
        if self.compat.old_views and self.optim.augment not in (None, "none"):
            raise ConfigError(
                f"--old-views sets the training views (the clean image and each stored view), so --augment "
                f"{self.optim.augment} would be ignored: drop it"
            )
        return self.replace(**regime_parts(self.optim.regime, given, precomputed_old=precomputed))

    def model_config(self, num_classes: int) -> ModelConfig:
        """The model structure this config trains, for ``num_classes`` classes (``arch`` must be
        resolved: :func:`bctool.train.defaults.resolve_defaults`)."""
        m = self.model
        if m.arch == "auto":
            raise ConfigError("arch 'auto' is not resolved yet: build the model from resolve_defaults(config).config")
        bias = m.head_bias if m.head_bias is not None else regime(self.optim.regime).head_bias
        return ModelConfig(arch=m.arch, embedding_dim=m.embedding_dim, num_classes=num_classes, head=m.head,
                           head_scale=m.head_scale, head_margin=m.head_margin, head_bias=bias)

    def to_dict(self) -> dict[str, Any]:
        """Every option by its flat name, JSON-ready (what checkpoints and training states record)."""
        return {name: value for group in GROUPS for name, value in asdict(getattr(self, group)).items()}


def _by_group(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat options split into their groups; an unknown name is a :class:`ConfigError`."""
    unknown = sorted(set(options) - set(OPTION_GROUP))
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(OPTION_GROUP)}")
    groups: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        groups.setdefault(OPTION_GROUP[name], {})[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return groups
