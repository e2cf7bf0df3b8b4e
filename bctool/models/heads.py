"""Classification heads used only during training: linear softmax, cosine, ArcFace, CosFace.

Each head maps an (un-normalised) embedding to logits; margin heads apply their margin to the
target class only when labels are given (training), so evaluation logits stay plain cosines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bctool.errors import ModelError
from bctool.registry import Registry

# Keeps acos away from +-1, where its gradient is infinite.
ACOS_EPS = 1e-6


def arcface_target(cos_target: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(theta + m) of the target-class cosines, with CosFace's penalty past theta = pi - m.

    The cosine is clamped away from +-1 first: acos has an infinite gradient there. Past
    pi - m, cos(theta + m) would rise again, so the CosFace-style penalty takes over.
    """
    theta = torch.acos(cos_target.clamp(-1 + ACOS_EPS, 1 - ACOS_EPS))
    fallback = cos_target - math.sin(math.pi - margin) * margin
    return torch.where(theta + margin < math.pi, torch.cos(theta + margin), fallback)


class Head(nn.Module):
    """The head contract: built as ``Head(dim, num_classes, scale=, margin=, bias=)``, it maps an
    (N, D) embedding (and, in training, the labels) to (N, C) logits. What other code may need
    from it, it declares, so that no code branches on head classes:

    * :meth:`class_weights`: the (C, D) weight of each class, for methods that read them
      (``needs_new_head``), or None when the head has none;
    * :meth:`class_rows`: its per-class tensors by state-dict name (row c belongs to class c),
      which a warm start copies by class name; empty when there are none.
    """

    def class_weights(self) -> torch.Tensor | None:
        """The (C, D) class weights, or None (this head has none)."""
        return None

    def class_rows(self) -> dict[str, torch.Tensor]:
        """Per-class tensors by state-dict name (none by default)."""
        return {}


class LinearHead(Head):
    """Plain linear softmax classifier on the raw embedding; the AdvBCT authors' has no bias
    (``bias=False``, the ``paper`` regime)."""

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, C)."""
        return self.fc(embedding)

    def class_weights(self) -> torch.Tensor:
        """``fc.weight``, (C, D)."""
        return self.fc.weight

    def class_rows(self) -> dict[str, torch.Tensor]:
        """The weight and, when there is one, the bias."""
        return {"fc.weight": self.fc.weight, **({"fc.bias": self.fc.bias} if self.fc.bias is not None else {})}


class CosineHead(Head):
    """Scaled cosine classifier: s * cos(f, w_c); subclasses add a margin on the target."""

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3, bias: bool = False) -> None:
        super().__init__()  # ``bias`` is accepted for a uniform signature; a cosine has none
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine between each embedding and each class weight, (N, C)."""
        return F.linear(F.normalize(embedding, dim=1), F.normalize(self.weight, dim=1))

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The target-class cosine after the margin (none for the plain cosine head)."""
        return cos_target

    def class_weights(self) -> torch.Tensor:
        """``weight``, (C, D) (un-normalised)."""
        return self.weight

    def class_rows(self) -> dict[str, torch.Tensor]:
        """The class weights."""
        return {"weight": self.weight}

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits (N, C), with the margin on the target class when labels are given."""
        cos = self.cosine(embedding)
        if labels is not None and self.margin:
            target = cos.gather(1, labels.view(-1, 1))
            cos = cos.scatter(1, labels.view(-1, 1), self.target_logit(target))
        return self.scale * cos


class ArcFaceHead(CosineHead):
    """Additive angular margin: s * cos(theta + m) on the target class."""

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return arcface_target(cos_target, self.margin)


class CosFaceHead(CosineHead):
    """Additive cosine margin: s * (cos(theta) - m) on the target class."""

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin


def _admit_head(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise ModelError(f"head {name!r} must be a subclass of bctool.models.heads.Head, got {cls!r}")


def _head_entry(name: str, cls: type[Head]) -> dict[str, object]:
    return {"class_weights": cls.class_weights is not Head.class_weights,
            "class_rows": cls.class_rows is not Head.class_rows}


# Heads by --head name; the entry-point group bctool.heads adds others (bctool.registry).
HEADS: Registry[type[Head]] = Registry("head", "heads", error=ModelError, derive=_head_entry, admit=_admit_head)
HEADS.register("linear", LinearHead)
HEADS.register("cosine", CosineHead)
HEADS.register("arcface", ArcFaceHead)
HEADS.register("cosface", CosFaceHead)


def create_head(name: str, dim: int, num_classes: int, scale: float, margin: float, bias: bool = True) -> Head:
    """Build a head by name (``bias``: the linear head's; the cosine family has none)."""
    cls = HEADS.get_obj(name)
    if num_classes < 1:
        raise ModelError(f"a {name} head needs at least one class, got {num_classes}")
    return cls(dim, num_classes, scale=scale, margin=margin, bias=bias)
