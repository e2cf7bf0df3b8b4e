"""Ridge least squares between two sets of rows, in numpy float64: the affine and MLP adapters
(:mod:`bctool.adapt.maps`) and the ``disagreement`` backfill policy
(:mod:`bctool.backfill.policies`) share it."""

from __future__ import annotations

import numpy as np


def ridge_least_squares(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` minimising ``||x W + b - y||^2 + lam ||W||^2`` (the bias not penalised), with
    ``lam = ridge`` times the mean diagonal of the centred Gram matrix, so ``ridge`` does not
    depend on the rows' scale; float64 throughout."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    gram += ridge * np.trace(gram) / x.shape[1] * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, xc.T @ (y - y_mean))
    return weight, y_mean - x_mean @ weight
