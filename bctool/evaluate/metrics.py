"""Retrieval metrics over rankings: pure, vectorised numpy functions.

Every function takes ``relevance``, a bool ``(Q, K)`` array whose row ``q`` says which of the
``K`` best-ranked gallery items of query ``q`` are relevant (rank 0 first). A ranking may be
truncated: ``n_positives`` gives the number of relevant gallery items of each query, so
positives that were not ranked count as missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class QueryAP:
    """Per-query average precision of a protocol's headline metric: query ``ids[i]`` scored
    ``ap[i]``. Only the evaluated queries are listed, so ``ap.mean()`` is the headline value.
    ``top1[i]``: the first result of query ``i`` was relevant (None where a protocol does not
    say); what negative and positive flips count."""

    ids: tuple[str, ...]
    ap: np.ndarray
    top1: np.ndarray | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.ap) != 1 or len(self.ap) != len(self.ids):
            raise ValueError(
                f"QueryAP needs one AP per query id: got {len(self.ids)} ids and AP of shape "
                f"{np.shape(self.ap)}"
            )
        if self.top1 is not None and np.shape(self.top1) != np.shape(self.ap):
            raise ValueError(f"QueryAP's top1 must have one value per query: {np.shape(self.top1)} for {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)


def _check(
    relevance: np.ndarray, n_positives: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    rel = np.asarray(relevance, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be a 2-D (queries x ranks) array, got shape {rel.shape}")
    if n_positives is None:
        return rel, None
    n_pos = np.asarray(n_positives, dtype=np.float64)
    if n_pos.shape != (rel.shape[0],):
        raise ValueError(
            f"n_positives must have shape ({rel.shape[0]},) to match relevance {rel.shape}, "
            f"got {n_pos.shape}"
        )
    return rel, n_pos


def _precision_sum(rel: np.ndarray) -> np.ndarray:
    """Per query, the sum of precision@(r+1) over the relevant ranks r."""
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    return np.sum(np.where(rel, hits / ranks, 0.0), axis=1)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, NaN where the denominator is 0 (queries without positives)."""
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def average_precision(relevance: np.ndarray, n_positives: np.ndarray) -> np.ndarray:
    """Average precision of every query, ``(Q,)`` float64; NaN where ``n_positives`` is 0.

    ``AP_q = (1 / n_pos_q) * sum over relevant ranks r of hits(<= r) / (r + 1)``.
    """
    rel, n_pos = _check(relevance, n_positives)
    return _divide(_precision_sum(rel), n_pos)


def average_precision_at_k(relevance: np.ndarray, n_positives: np.ndarray, k: int = 100) -> np.ndarray:
    """GLDv2-style AP@k of every query, ``(Q,)`` float64; NaN where ``n_positives`` is 0.

    ``AP@k_q = (1 / min(n_pos_q, k)) * sum_{i < k} P(i) rel(i)``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rel, n_pos = _check(relevance, n_positives)
    return _divide(_precision_sum(rel[:, :k]), np.minimum(n_pos, k))


def recall_at_k(relevance: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, np.ndarray]:
    """Per query and per ``k`` in ``ks``: 1.0 if a relevant item is among the top ``k``, else 0.0."""
    rel, _ = _check(relevance)
    out: dict[int, np.ndarray] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"every k in ks must be at least 1, got {k} in {ks}")
        out[int(k)] = rel[:, :k].any(axis=1).astype(np.float64)
    return out
