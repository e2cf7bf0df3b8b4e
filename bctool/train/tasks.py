"""Tasks: what one training step computes, returned as named loss parts plus ``loss``.

A task is an ``nn.Module`` that owns every trainable parameter of the step (the model, and for
compatible training the discriminator or boundary parameters of its loss), so the optimizer is
built from the task's trainable parameters and the loop never branches on the method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bctool.errors import ConfigError
from bctool.models import EmbeddingModel


class ClassificationTask(nn.Module):
    """Train a model alone: cross-entropy of its classification head."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def set_progress(self, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        """Schedules hook called by the loop before every step (nothing to schedule here)."""

    def trainable_state(self) -> dict[str, nn.Module]:
        """The modules whose state a resumable run must save."""
        return {"model": self.model}

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss parts for one batch: ``cls`` and the total ``loss``."""
        embedding = self.model.embed(images)
        cls = F.cross_entropy(self.model.classify(embedding, labels), labels)
        return {"cls": cls, "loss": cls}


class CompatibleTask(ClassificationTask):
    """Train a new model compatible with a frozen old side.

    ``loss = cls + weight * sum(compat parts)``; the parts are reported weighted. ``old`` maps
    (images, row indices) to old embeddings and never receives gradients.
    """

    def __init__(
        self, model: EmbeddingModel, old: nn.Module, compat: nn.Module, weight: float = 1.0, diagnose: bool = False
    ) -> None:
        super().__init__(model)
        self.old = old
        self.compat = compat
        self.weight = weight
        self.diagnose = diagnose
        compat.noting = diagnose  # the loss measures its side facts only when they are logged
        self._parts_checked = False

    def _check_parts(self, returned: dict[str, torch.Tensor]) -> None:
        """The method returned the loss parts it declares (logs, tables and tests rely on them)."""
        self._parts_checked = True
        if not hasattr(self.compat, "parts"):  # a bare loss module, not a registered method
            return
        declared = tuple(self.compat.parts)
        if set(returned) != set(declared) or "cls" in returned or "loss" in returned:
            name = getattr(self.compat, "name", type(self.compat).__name__)
            raise ConfigError(
                f"method {name!r} returned the loss parts {sorted(returned)} but declares {sorted(declared)}; "
                "list the names its forward returns in its class attribute parts (not 'cls' or 'loss')"
            )

    def set_progress(self, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        """Forward the schedule position (AdvBCT's alpha and adversarial weight use it)."""
        self.compat.set_progress(epoch, epochs, step, total_steps)

    def trainable_state(self) -> dict[str, nn.Module]:
        """The new model and the loss's own parameters (discriminator, boundary weights)."""
        return {"model": self.model, "compat": self.compat}

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss parts for one batch: ``cls``, the method's parts, and the total ``loss``."""
        embedding = self.model.embed(images)
        cls = F.cross_entropy(self.model.classify(embedding, labels), labels)
        with torch.no_grad():
            old = self.old(images, indices)
        # The compatibility terms divide cosines by small temperatures and take arccos: keep
        # them in float32 even when the backbone runs under autocast.
        with torch.autocast(images.device.type, enabled=False):
            returned = self.compat(embedding.float(), labels, old.float(), labels)
        if not self._parts_checked:
            self._check_parts(returned)
        parts = {k: self.weight * v for k, v in returned.items()}
        total = cls + sum(parts.values()) if parts else cls
        facts = self.diagnostics(embedding, {"cls": cls, **parts}) if self.diagnose else {}
        return {"cls": cls, **parts, "loss": total, **facts}

    def diagnostics(self, embedding: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Side measurements, not added to the loss: the norm of each loss part's gradient at the
        embedding (``grad_PART``: which part pushes the features how hard; AdvBCT's ``adv``
        through its gradient reversal) and the facts the compatibility loss noted (``disc_acc``...)."""
        out = {}
        for name, value in parts.items():
            if value.requires_grad:
                (grad,) = torch.autograd.grad(value, embedding, retain_graph=True, allow_unused=True)
                out[f"grad_{name}"] = grad.norm() if grad is not None else torch.zeros((), device=embedding.device)
        return {**out, **getattr(self.compat, "facts", {})}
