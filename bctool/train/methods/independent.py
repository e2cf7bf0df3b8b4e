"""``independent``: no compatibility term."""

from __future__ import annotations

from torch import Tensor

from bctool.train.methods.base import Method, register_method


@register_method("independent")
class Independent(Method):
    """No compatibility term: the new model is trained alone (φ_*)."""

    needs_old_side = False

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor) -> dict[str, Tensor]:
        return {}
