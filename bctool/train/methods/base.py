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
* ``needs_new_head``: it reads the new model's class weights (a head that declares them);
* ``parts``: the names of the loss parts its ``forward`` returns.

Adding a method is one file in this package that defines such a class under
``@register_method("NAME")`` (the package imports every module in it), or a class in a user's
package named in the entry-point group ``bctool.methods`` (:mod:`bctool.registry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bctool.errors import ConfigError
from bctool.models import EmbeddingModel
from bctool.registry import Registry, describe_params
from bctool.registry import resolve_params as resolve_registered_params
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
    # The names of the loss parts ``forward`` returns (the task checks them on the first batch).
    parts: ClassVar[tuple[str, ...]] = ()
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


def _method_entry(name: str, cls: type[Method]) -> dict[str, Any]:
    """What a method class declares, for its registry entry."""
    return {"description": cls.description(), "params": cls.Params, "parts": tuple(cls.parts),
            "needs_old_side": cls.needs_old_side, "uses_old_head": cls.uses_old_head,
            "needs_new_head": cls.needs_new_head}


def _admit_method(name: str, cls: Any) -> None:
    """Only a :class:`Method` subclass with a frozen ``Params`` dataclass may register; it learns its name."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r} must be a subclass of bctool.train.methods.Method, got {cls!r}")
    if not dataclasses.is_dataclass(cls.Params):
        raise ConfigError(f"method {name!r}: its Params must be a frozen dataclass, got {cls.Params!r}")
    cls.name = name


METHODS: Registry[type[Method]] = Registry("method", "methods", derive=_method_entry, admit=_admit_method)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available under ``name`` (``bctool train --method``)."""
    return METHODS.register(name)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; a clear error naming the choices otherwise."""
    return METHODS.get_obj(name)


def resolve_params(method: str, given: Mapping[str, Any] | None = None) -> Any:
    """The method's ``Params`` with ``given`` over the defaults; unknown names and invalid
    values are a :class:`ConfigError` naming the method's parameters."""
    return resolve_registered_params("method", method, method_class(method).Params, given)


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
        {"name": e.name, "description": e.description, "needs_old_side": e.declares["needs_old_side"],
         "uses_old_head": e.declares["uses_old_head"], "needs_new_head": e.declares["needs_new_head"],
         "params": describe_params(e.params)}
        for e in METHODS.entries()
    ]
