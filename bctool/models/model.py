"""The embedding model: backbone -> Linear(enc, D, bias=False) -> BatchNorm1d(D) = f.

``embed(images)`` returns the raw f (retrieval L2-normalises it); ``classify(f, labels)`` is
for training only. Nothing else is called at extraction time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from bctool.errors import ModelError
from bctool.models.heads import HEADS, create_head
from bctool.registry import Registry


BackboneFactory = Callable[[], nn.Module]


def _resnet(name: str) -> BackboneFactory:
    def build() -> nn.Module:
        from bctool.models.resnet import resnet

        return resnet(name)

    return build


def _efficientnet(name: str) -> BackboneFactory:
    def build() -> nn.Module:
        from bctool.models.efficientnet import efficientnet_lite

        return efficientnet_lite(name)

    return build


def _small() -> nn.Module:
    from bctool.models.small import SmallCNN

    return SmallCNN()


def _admit_backbone(name: str, factory: object) -> None:
    if not callable(factory):
        raise ModelError(f"backbone {name!r} must be a factory (called with no arguments), got {factory!r}")


# A backbone maps images (N, 3, H, W) to pooled features (N, F) and declares F as ``num_features``.
# register_backbone and the entry-point group bctool.backbones add others (bctool.registry).
BACKBONES: Registry[BackboneFactory] = Registry("backbone", "backbones", error=ModelError, admit=_admit_backbone)
BACKBONES.register("small", _small, description="A small four-stage CNN for fast CPU training on 32-64 px images.")
for _depth in ("resnet18", "resnet34", "resnet50"):
    BACKBONES.register(_depth, _resnet(_depth), description=f"ResNet-{_depth[6:]} with the ImageNet stem.")
for _lite, _size in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
    BACKBONES.register(_lite, _efficientnet(_lite), description=(
        f"EfficientNet-Lite{_lite[-1]} (no squeeze-excite, ReLU6, TensorFlow padding), 1280-d features; "
        f"ImageNet weights ({_size} px): --pretrained imagenet."))


def register_backbone(name: str, factory: BackboneFactory | None = None) -> Any:
    """Make ``factory`` (no arguments; returns a module with ``num_features`` whose forward
    gives pooled (N, F) features) available as ``--arch name``; without ``factory``, a decorator.
    A name taken by another backbone is refused."""
    if factory is None:
        return BACKBONES.register(name)
    return BACKBONES.register(name, factory)


def is_import_spec(arch: str) -> bool:
    """True for ``package.module:factory``, a user's backbone imported by name."""
    module, sep, attr = arch.partition(":")
    return bool(sep and module and attr)


def backbone_factory(arch: str) -> BackboneFactory:
    """The factory of a registered backbone, or the one ``package.module:factory`` names
    (imported now); a clear error naming the choices otherwise."""
    if not is_import_spec(arch):
        if arch in BACKBONES:
            return BACKBONES[arch]
        BACKBONES.raise_if_failed(arch)
        raise ModelError(
            f"unknown architecture {arch!r}; choose one of {sorted(BACKBONES)}, or name your own "
            "backbone as package.module:factory"
        )
    import importlib

    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"architecture {arch!r}: cannot import {module_name!r} ({exc}); install the package that "
            "defines it or put its folder on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"architecture {arch!r}: {module_name!r} has no callable {attr!r}")
    return factory


def build_backbone(arch: str) -> nn.Module:
    """A fresh backbone for ``arch``, checked against the contract (``num_features``)."""
    backbone = backbone_factory(arch)()
    features = getattr(backbone, "num_features", None)
    if not isinstance(backbone, nn.Module) or not isinstance(features, int) or features < 1:
        raise ModelError(
            f"architecture {arch!r} must build an nn.Module with an int attribute num_features "
            f"(the width of its pooled features), got {type(backbone).__name__} with num_features={features!r}"
        )
    return backbone


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's structure; stored in every checkpoint."""

    arch: str = "resnet18"
    embedding_dim: int = 256
    num_classes: int = 0  # 0: no classification head (an extraction-only model)
    head: str = "linear"
    head_scale: float = 30.0
    head_margin: float = 0.3
    head_bias: bool = True  # the linear head's bias (checkpoints from before this field had one)

    def __post_init__(self) -> None:
        backbone_factory(self.arch)  # a registered name, or an importable package.module:factory
        if self.head not in HEADS:
            raise ModelError(f"unknown head {self.head!r}; choose one of {sorted(HEADS)}")
        if self.embedding_dim < 1:
            raise ModelError(f"embedding dimension must be positive, got {self.embedding_dim}")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Rebuild from JSON, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class EmbeddingModel(nn.Module):
    """Backbone + embedding neck (+ an optional classification head for training)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.arch)
        enc_dim = int(self.backbone.num_features)
        self.neck = nn.Sequential(
            nn.Linear(enc_dim, config.embedding_dim, bias=False),
            nn.BatchNorm1d(config.embedding_dim),
        )
        self.head = (
            create_head(
                config.head, config.embedding_dim, config.num_classes, config.head_scale, config.head_margin,
                config.head_bias,
            )
            if config.num_classes > 0
            else None
        )

    @property
    def embedding_dim(self) -> int:
        """D, the embedding dimension."""
        return self.config.embedding_dim

    # Training only part of the backbone (bctool.train.frozen): its stages, how many leading ones
    # are frozen, and the stage the inputs of embed() enter at (0: images; frozen_stages: the
    # frozen stages' outputs, computed once). Plain attributes: the state dict does not change.
    stages: list[nn.Module] | None = None
    frozen_stages: int = 0
    input_stage: int = 0

    def freeze_stages(self, count: int) -> None:
        """Freeze the backbone's first ``count`` stages (:func:`bctool.models.stages.backbone_stages`):
        no gradients, and their BatchNorm statistics kept (eval mode, also under ``train()``)."""
        from bctool.models.stages import backbone_stages

        self.stages = backbone_stages(self.backbone)
        self.frozen_stages = count
        for stage in self.stages[:count]:
            stage.requires_grad_(False)
            stage.eval()

    def train(self, mode: bool = True) -> EmbeddingModel:
        """``nn.Module.train``, leaving the frozen stages in eval mode."""
        super().train(mode)
        for stage in (self.stages or [])[: self.frozen_stages]:
            stage.eval()
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) embeddings f, shape (N, D). ``images`` are the frozen stages'
        outputs instead while :attr:`input_stage` is set (training with the frozen cache)."""
        if not self.input_stage:
            return self.neck(self.backbone(images))
        features = images
        for stage in self.stages[self.input_stage:]:
            features = stage(features)
        return self.neck(features)

    def classify(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits from embeddings (training only)."""
        if self.head is None:
            raise ModelError("this model has no classification head (it was built with 0 classes)")
        return self.head(embedding, labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed`."""
        return self.embed(images)


def create_model(config: ModelConfig) -> EmbeddingModel:
    """Build an embedding model from its config."""
    return EmbeddingModel(config)
