"""Models in plain torch: backbones, the embedding neck, classification heads."""

from bctool.models.model import BACKBONES, EmbeddingModel, ModelConfig, create_model, register_backbone

__all__ = ["BACKBONES", "EmbeddingModel", "ModelConfig", "create_model", "register_backbone"]
