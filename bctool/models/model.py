"""The embedding model: backbone -> Linear(enc, D, bias=False) -> BatchNorm1d(D) = f.

``embed(images)`` returns the raw f (retrieval L2-normalises it); ``classify(f, labels)`` is
for training only. Nothing else is called at extraction time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from bctool.errors import ModelError
from bctool.models.heads import HEADS, create_head


def _resnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from bctool.models.resnet import resnet

        return resnet(name)

    return build


def _small() -> nn.Module:
    from bctool.models.small import SmallCNN

    return SmallCNN()


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "small": _small,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's structure; stored in every checkpoint."""

    arch: str = "resnet18"
    embedding_dim: int = 256
    num_classes: int = 0  # 0: no classification head (an extraction-only model)
    head: str = "linear"
    head_scale: float = 30.0
    head_margin: float = 0.3

    def __post_init__(self) -> None:
        if self.arch not in BACKBONES:
            raise ModelError(f"unknown architecture {self.arch!r}; choose one of {sorted(BACKBONES)}")
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
        self.backbone = BACKBONES[config.arch]()
        enc_dim = int(self.backbone.num_features)
        self.neck = nn.Sequential(
            nn.Linear(enc_dim, config.embedding_dim, bias=False),
            nn.BatchNorm1d(config.embedding_dim),
        )
        self.head = (
            create_head(
                config.head, config.embedding_dim, config.num_classes, config.head_scale, config.head_margin
            )
            if config.num_classes > 0
            else None
        )

    @property
    def embedding_dim(self) -> int:
        """D, the embedding dimension."""
        return self.config.embedding_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) embeddings f, shape (N, D)."""
        return self.neck(self.backbone(images))

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
