"""Gradient-reversal layer (Ganin & Lempitsky, 2015), as used by AdvBCT's discriminator."""

from __future__ import annotations

import math
from typing import Any

import torch


class GradientReversal(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by ``-alpha``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * -ctx.alpha, None


def grad_reverse(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient reversed and scaled by ``alpha`` on the way back."""
    return GradientReversal.apply(x, float(alpha))


def grl_alpha(p: float) -> float:
    """The GRL schedule α(p) = 2/(1+exp(-10 p)) - 1 for training progress p, clamped to [0, 1]."""
    p = min(max(float(p), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
