"""Maps between embedding spaces, one registered kind each (``bctool adapt --kind``).

A map takes L2-normalised rows of the source space, (N, d_s), to rows of the target space,
(N, d_t), which retrieval normalises again. Dimensions may differ either way. Each kind is a
function ``fit(x, y, labels, params) -> nn.Module`` over float32 tensors of training pairs
(``x`` and ``y`` already L2-normalised, ``labels`` (N,) int64 with -1 where unknown), with its
parameters as a frozen dataclass:

* ``procrustes``: the orthogonal map (semi-orthogonal when the dimensions differ) closest to the
  pairs, from one SVD: rotations only, so distances inside the source space are kept;
* ``affine``: ridge least squares, a full matrix and a bias;
* ``mlp``: the affine map plus a residual two-layer MLP trained with Adam on the cosine to the
  target row, and, where labels exist, a classification term against the target space's class
  centres (the labels of the training pairs are there to use).

The entry-point group ``bctool.adapters`` adds kinds (:mod:`bctool.registry`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bctool.errors import ConfigError
from bctool.utils.linear import ridge_least_squares
from bctool.registry import Registry, param

logger = logging.getLogger(__name__)


class LinearMap(nn.Module):
    """y = x W (+ b): ``weight`` is (d_s, d_t)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class ResidualMLP(nn.Module):
    """y = x W + b + MLP(sqrt(d) x): the affine map with a learned correction. Unit rows have
    entries of about 1/sqrt(d); scaled by sqrt(d) they reach the MLP at unit size, where its
    activation bends (at 1/sqrt(d) it is nearly linear and learns slowly)."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 512) -> None:
        super().__init__()
        self.scale = math.sqrt(d_in)
        self.linear = LinearMap(d_in, d_out, bias=True)
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        nn.init.zeros_(self.mlp[2].weight)  # starts as the affine map exactly
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x * self.scale)


Fit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], nn.Module]


def _admit(name: str, fit: object) -> None:
    if not callable(fit) or not callable(getattr(fit, "build", None)):
        raise ConfigError(f"adapter kind {name!r} must be a fit(x, y, labels, params) -> nn.Module function with an "
                          "attribute build(d_in, d_out, params) -> nn.Module (what a saved adapter loads into)")


def _build_entry(name: str, fit: Any) -> dict[str, Any]:
    return {"build": getattr(fit, "build", None)}


# Adapter kinds by --kind name. ``build(d_in, d_out, params)`` makes the empty module a saved
# adapter's tensors load into (declared, as the attribute ``build`` of the fit function).
ADAPTERS: Registry[Fit] = Registry("adapter kind", "adapters", admit=_admit, derive=_build_entry)


@dataclass(frozen=True)
class NoParams:
    """Procrustes has no parameters."""


@dataclass(frozen=True)
class AffineParams:
    """The ridge penalty of the least-squares fit."""

    ridge: float = param(1e-3, low=0.0, help="ridge penalty, relative to the mean diagonal of the Gram matrix")


@dataclass(frozen=True)
class MLPParams:
    """The residual MLP and its training."""

    hidden: int = param(512, low=1, help="hidden width of the residual MLP")
    epochs: int = param(60, low=1, help="passes over the training pairs (at most max_steps steps in all)")
    max_steps: int = param(3000, low=1, help="cap on the optimisation steps, so a large set of pairs fits in bounded time")
    lr: float = param(1e-3, low=0.0, low_open=True, help="Adam learning rate")
    weight_decay: float = param(1e-4, low=0.0, help="Adam weight decay")
    batch_size: int = param(256, low=1, help="pairs per step")
    label_weight: float = param(1.0, low=0.0, help="weight of the classification term on labelled pairs (0: off)")
    temperature: float = param(0.05, low=0.0, low_open=True, help="temperature of that classification term")
    ridge: float = param(1e-3, low=0.0, help="ridge penalty of the affine start")
    seed: int = 0


def procrustes_fit(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, params: NoParams) -> LinearMap:
    """W = U V^T from the SVD of x^T y: the (semi-)orthogonal W minimising ||x W - y||."""
    u, _, vh = torch.linalg.svd(x.double().T @ y.double(), full_matrices=False)
    out = LinearMap(x.shape[1], y.shape[1], bias=False)
    with torch.no_grad():
        out.weight.copy_((u @ vh).float())
    return out


procrustes_fit.build = lambda d_in, d_out, params: LinearMap(d_in, d_out, bias=False)  # type: ignore[attr-defined]


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of ridge least squares y ~ x W + b (:func:`bctool.utils.linear.ridge_least_squares`)."""
    weight, bias = ridge_least_squares(x.double().numpy(), y.double().numpy(), ridge)
    return torch.from_numpy(weight), torch.from_numpy(bias)


def affine_fit(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, params: AffineParams) -> LinearMap:
    """Ridge least squares with a bias."""
    weight, bias = _ridge(x, y, params.ridge)
    out = LinearMap(x.shape[1], y.shape[1], bias=True)
    with torch.no_grad():
        out.weight.copy_(weight.float())
        out.bias.copy_(bias.float())
    return out


affine_fit.build = lambda d_in, d_out, params: LinearMap(d_in, d_out, bias=True)  # type: ignore[attr-defined]


def _class_centres(y: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean target row of every label present, and each row's centre index (-1: none)."""
    known = labels >= 0
    classes, index = torch.unique(labels[known], return_inverse=True)
    centres = torch.zeros(len(classes), y.shape[1]).index_add_(0, index, y[known])
    rows = torch.full_like(labels, -1)
    rows[known] = index
    return F.normalize(centres, dim=1), rows


def mlp_fit(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, params: MLPParams) -> ResidualMLP:
    """The affine start, then Adam on 1 - cos(f(x), y) (+ ``label_weight`` x cross-entropy of
    f(x) against the target class centres at ``temperature``, on labelled pairs)."""
    generator = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)
    model = ResidualMLP(x.shape[1], y.shape[1], params.hidden)
    weight, bias = _ridge(x, y, params.ridge)
    with torch.no_grad():
        model.linear.weight.copy_(weight.float())
        model.linear.bias.copy_(bias.float())
    centres, rows = _class_centres(y, labels)
    use_labels = params.label_weight > 0 and len(centres) > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    n = x.shape[0]
    steps = min(params.max_steps, params.epochs * math.ceil(n / params.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, params.batch_size):
            if done == steps:
                break
            done += 1
            batch = order[start : start + params.batch_size]
            out = F.normalize(model(x[batch]), dim=1)
            loss = (1 - (out * y[batch]).sum(1)).mean()
            if use_labels:
                labelled = rows[batch] >= 0
                if labelled.any():
                    logits = out[labelled] @ centres.T / params.temperature
                    loss = loss + params.label_weight * F.cross_entropy(logits, rows[batch][labelled])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


mlp_fit.build = lambda d_in, d_out, params: ResidualMLP(d_in, d_out, params.hidden)  # type: ignore[attr-defined]

ADAPTERS.register("procrustes", procrustes_fit, params=NoParams,
                  description="The orthogonal map closest to the pairs (one SVD): rotations only, no fitting of scale.")
ADAPTERS.register("affine", affine_fit, params=AffineParams,
                  description="Ridge least squares: a full matrix and a bias.")
ADAPTERS.register("mlp", mlp_fit, params=MLPParams,
                  description="The affine map plus a residual MLP trained on the cosine to the target and, "
                              "with labels, on the target space's class centres.")
