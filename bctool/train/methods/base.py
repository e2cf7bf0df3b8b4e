"""The method contract and its registry: one class per compatibility method, registered by name.

A method is an ``nn.Module`` that takes ``(embeddings, labels, ref_embeddings, ref_labels)`` —
the new model's raw embeddings (with grad), their labels, and the old model's raw embeddings of
the same images — and returns a dict of named, already weighted loss parts; the task adds the
classification loss and sums every part. It declares, as class attributes, what it needs, so
no code outside the method branches on its name:

* ``Params``: a frozen dataclass of its hyperparameters (``bctool train --param KEY=VALUE``;
  the checkpoint records every value);
* ``needs_old_side``: it trains against an old model (every method but ``independent``);
* ``uses_old_head``: it uses the old checkpoint's classifier when that is known;
* ``needs_new_head``: it reads the new model's class weights (a linear or cosine head).

Adding a method is one file in this package that defines such a class under
``@register_method("NAME")``; the package imports every module in it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bctool.errors import ConfigError
from bctool.models import EmbeddingModel
from bctool.train.compat.stats import OldStats


@dataclass(frozen=True)
class NoParams:
    """The parameters of a method that has none."""


@dataclass
class MethodContext:
    """What a method may read: old statistics, the new model, the frozen old classifier."""

    stats: OldStats  # on the training device
    model: EmbeddingModel  # the new model being trained
    old_head: nn.Module | None = None  # frozen old classifier: raw embeddings -> old-class logits
    old_label_index: torch.Tensor | None = None  # (C,) new label -> old_head class, -1 if not old


class Method(nn.Module):
    """Base class: stores the context, the parameters and the training progress; subclasses
    define ``forward``. The first line of a subclass's docstring is its one-line description."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_old_side: ClassVar[bool] = True
    uses_old_head: ClassVar[bool] = False
    needs_new_head: ClassVar[bool] = False
    # True when some of the method's parameters never get a gradient (an ablation that drops
    # the term using them): DistributedDataParallel must then look for unused parameters.
    has_unused_parameters: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext, params: Any = None) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the task owns the model and the frozen old head.
        self.ctx = ctx
        self.params = params if params is not None else self.Params()
        if self.needs_new_head:
            from bctool.train.methods.parts import classifier_weight

            classifier_weight(ctx.model, self.name)  # fails early on a head without class weights
        self.epoch, self.epochs, self.step, self.total_steps = 0, 1, 0, 1
        # Detached scalars a forward pass measures on the side, only when ``noting`` (the task
        # sets it under ``--diagnostics``); never losses.
        self.noting = False
        self.facts: dict[str, Tensor] = {}

    @classmethod
    def description(cls) -> str:
        """The first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def summary(self) -> dict[str, object]:
        """JSON-ready facts about the method's own state at the end of training (none by default)."""
        return {}

    def set_progress(self, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        """Record training progress: 0-based ``epoch`` of ``epochs``, global ``step`` of ``total_steps``."""
        self.epoch, self.epochs, self.step, self.total_steps = epoch, epochs, step, total_steps

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        """Named, weighted loss parts for one batch."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available under ``name``."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ConfigError(f"method {name!r} is registered twice ({METHODS[name].__module__}, {cls.__module__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; a clear error naming the choices otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)} (`bctool methods` describes them)")
    return METHODS[name]


def _coerce(method: str, field: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type (options arrive as strings)."""
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "bool": bool}.get(str(field.type), str)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) and not (
            kind is float and not math.isfinite(value)):
        return value
    try:
        if kind is bool:
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return text in ("true", "1")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method} parameter {field.name}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(converted):
        # NaN or inf switches a term off or makes it constant without a word: never what was meant.
        raise ConfigError(f"{method} parameter {field.name}={value!r} must be a finite number")
    return converted


def resolve_params(method: str, given: Mapping[str, Any] | None = None) -> Any:
    """The method's ``Params`` with ``given`` over the defaults; unknown names and invalid
    values are a :class:`ConfigError` naming the method's parameters."""
    cls = method_class(method).Params
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = dict(given or {})
    unknown = sorted(set(given) - set(fields))
    if unknown:
        allowed = ", ".join(f"{n}={f.default!r}" for n, f in fields.items()) or "none"
        raise ConfigError(f"method {method!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: {allowed}")
    return cls(**{key: _coerce(method, fields[key], value) for key, value in given.items()})


def create_method(name: str, ctx: MethodContext, params: Mapping[str, Any] | Any = None) -> Method:
    """Build the method registered as ``name`` with ``params`` (a mapping over its defaults, or
    its ``Params`` instance)."""
    cls = method_class(name)
    if params is None or isinstance(params, Mapping):
        params = resolve_params(name, params)
    return cls(ctx, params)


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method: name, description, needs and parameters with their defaults."""
    return [
        {"name": name, "description": cls.description(), "needs_old_side": cls.needs_old_side,
         "uses_old_head": cls.uses_old_head, "needs_new_head": cls.needs_new_head,
         "params": {f.name: f.default for f in dataclasses.fields(cls.Params)}}
        for name, cls in sorted(METHODS.items())
    ]
