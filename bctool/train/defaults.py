"""The one place that turns a training config's unset options into values, and says where each
value came from.

A :class:`~bctool.train.config.TrainConfig` may leave nine options open: ``method`` (None),
``arch`` (``auto``), the four parts a regime sets (``augment``, ``schedule``, ``warmup_epochs``,
``head_bias``: None), ``init_from`` (``auto``), ``lr`` (None) and ``trainable`` (``auto``). That is what ``TrainConfig()``
and ``bctool train`` without those options both give, so a library caller and the command line
train the same model. :func:`resolve_defaults` makes them concrete, in this order, each step
seeing the ones before:

1. ``method``: the recommended one (:data:`~bctool.train.recipe.RECOMMENDED_METHOD`) with an old
   side (``old_embeddings`` or ``old_model``), ``independent`` without;
2. ``arch``: ``small`` below 64 px, ``resnet18`` from 64 px (:func:`default_arch`);
3. the regime's parts (:mod:`bctool.train.regime`), the bctool regime's views following the old
   side (the clean image against precomputed old embeddings, crops otherwise);
4. ``init_from``: the recipe's warm start from the known old checkpoint when it fits
   (:func:`~bctool.train.recipe.warm_start_source`), else a fresh start;
5. ``lr``: the recipe's rate for a warm start (:data:`~bctool.train.recipe.WARM_LR`) or a fresh
   one (:data:`~bctool.train.recipe.COLD_LR`);
6. ``trainable``: on a CPU, ``neck`` for a pretrained start (``pretrained``, or a warm start from a
   checkpoint that trained its neck alone): a frozen ImageNet backbone under a trained neck is
   cheap (its features computed once) where fine-tuning the backbone costs hours on a few cores;
   ``all`` otherwise, and always on a GPU (:func:`default_trainable`). With the backbone frozen
   this way, training views left to the regime are the clean ones (``augment`` none), so its
   features are computed once (crops would run it on every batch: not measured against, chosen
   for cost).

The resolved config is what the checkpoint records, with :attr:`Resolved.sources` (``given``,
``default``, ``regime bctool``, ``recipe``, ``image size``) under ``defaults_from``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bctool.train.config import GROUPS, TrainConfig
from bctool.train.regime import PARTS, regime_parts

logger = logging.getLogger(__name__)

AUTO = "auto"
# Below this image side ``arch="auto"`` picks the small CNN: a ResNet's ImageNet stem and four
# stride-2 stages leave a 1x1 map at 32 px (experiments/small_images.py measures both).
SMALL_IMAGE_SIDE = 64
GIVEN, DEFAULT, RECIPE, IMAGE_SIZE = "given", "default", "recipe", "image size"
# The options resolve_defaults fills in when they are left open, with the value that means "open".
OPEN = {"method": None, "arch": AUTO, **{part: None for part in PARTS}, "init_from": AUTO, "lr": None,
        "trainable": AUTO}


def default_arch(image_size: int) -> str:
    """The backbone ``arch="auto"`` means: ``small`` below 64 px, ``resnet18`` from 64 px on."""
    return "small" if image_size < SMALL_IMAGE_SIDE else "resnet18"


def default_method(compatible: bool) -> str:
    """The method when none is given: the recommended one with an old side, else independent."""
    from bctool.train.recipe import RECOMMENDED_METHOD

    return RECOMMENDED_METHOD if compatible else "independent"


@dataclass(frozen=True)
class Resolved:
    """A config with every option concrete, and where each option's value came from."""

    config: TrainConfig
    sources: Mapping[str, str]


def resolve_defaults(config: TrainConfig, given: Iterable[str] | None = None) -> Resolved:
    """``config`` with every open option made concrete (see the module docstring) and the source
    of every option's value. ``given``: the options the user set (the command line knows);
    without it an option counts as given when it differs from the library default. Resolving a
    resolved config changes nothing."""
    from bctool.train.recipe import COLD_LR, WARM_LR, warm_start_source

    sources = _given_or_default(config, given)
    values: dict[str, object] = {}

    def settle(name: str, value: object, source: str) -> None:
        values[name] = value
        sources[name] = source

    if config.compat.method is None:
        has_old_side = bool(config.compat.old_embeddings or config.compat.old_model)
        settle("method", default_method(has_old_side), RECIPE if has_old_side else DEFAULT)
    if config.model.arch == AUTO:
        settle("arch", default_arch(config.model.image_size), IMAGE_SIZE)
    config = config.replace(**values)
    open_parts = {part for part in PARTS if _value(config, part) is None}
    if open_parts:
        given_parts = {part: _value(config, part) for part in PARTS}
        parts = regime_parts(config.optim.regime, given_parts, precomputed_old=bool(config.compat.old_embeddings))
        for part in open_parts:
            settle(part, parts[part], f"regime {config.optim.regime}")
    config = config.replace(**{part: values[part] for part in open_parts})
    late: dict[str, object] = {}
    if config.model.init_from == AUTO:
        late["init_from"] = warm_start_source(config)
        sources["init_from"] = RECIPE
    init_from = late.get("init_from", config.model.init_from)
    if config.optim.lr is None:
        late["lr"] = WARM_LR if init_from else COLD_LR
        sources["lr"] = RECIPE
    if late:
        logger.info("recipe: %s, lr %g", f"warm start from {init_from}" if init_from else "fresh start",
                    late.get("lr", config.optim.lr))
    config = config.replace(**late)
    if config.optim.trainable == AUTO:
        trainable, why = default_trainable(config)
        config = config.replace(trainable=trainable)
        sources["trainable"] = why
        if trainable == "neck" and "augment" in open_parts and config.optim.augment != "none":
            # A frozen backbone on clean views is run once per image; on crops, every batch.
            config = config.replace(augment="none")
            sources["augment"] = "recipe (a frozen backbone sees the clean views, its features computed once)"
    return Resolved(config, dict(sorted(sources.items())))


def default_trainable(config: TrainConfig) -> tuple[str, str]:
    """What ``trainable="auto"`` means for ``config`` (its ``init_from`` resolved), and why: on a
    CPU, ``neck`` for a pretrained start (named or file weights, or a warm start from a
    checkpoint that trained its neck alone or from an imported network, whose backbone is
    pretrained weights as they are), else ``all``; ``all`` on a GPU."""
    from bctool.utils.device import resolve_device

    if resolve_device(config.run.device).type != "cpu":
        return "all", "device"
    if config.model.pretrained:
        return "neck", "recipe (pretrained start on the CPU)"
    if config.model.init_from and _trained_neck_alone(config.model.init_from):
        return "neck", "recipe (warm start from a neck-only or imported model on the CPU)"
    return "all", DEFAULT


def _trained_neck_alone(checkpoint: str) -> bool:
    """Whether the checkpoint's backbone is pretrained weights as they are: its own training froze
    the whole backbone (``trainable`` neck), or ``bctool import`` wrote it."""
    import json

    from bctool.checkpoint import read_checkpoint_metadata
    from bctool.errors import BctoolError

    try:
        meta = read_checkpoint_metadata(checkpoint)
        imported = "imported" in json.loads(meta.get("extra", "{}"))
        return imported or json.loads(meta.get("train", "{}")).get("trainable") == "neck"
    except (BctoolError, OSError, ValueError):
        return False


def _value(config: TrainConfig, name: str) -> object:
    """The value of the option ``name`` (a flat name) in ``config``."""
    return config.to_dict()[name]


def _given_or_default(config: TrainConfig, given: Iterable[str] | None) -> dict[str, str]:
    """``given`` or ``default`` for every option; the open ones are overwritten by resolution."""
    defaults = TrainConfig().to_dict()
    record = config.to_dict()
    names = set(given) if given is not None else {name for name in record if record[name] != defaults[name]}
    sources = {name: GIVEN if name in names else DEFAULT for name in record}
    for name, open_value in OPEN.items():  # an open option given as open is not "given"
        if record[name] == open_value:
            sources[name] = DEFAULT
    return sources


def option_names() -> list[str]:
    """Every training option by its flat name (what ``--config`` files may set)."""
    return [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
