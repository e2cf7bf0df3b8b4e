"""Exact top-k search of a gallery by inner product (faiss ``IndexFlatIP``), in query blocks.

Rankings are deterministic: items are ordered by descending score, and equal scores by
ascending gallery index, including ties at the k-th boundary (the item with the smaller index
is kept). faiss does not promise either, so each block is re-sorted by ``(-score, index)``;
a few items beyond k are searched, and the rare rows whose k-th score ties with the last
searched one are searched again over the whole gallery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faiss
import numpy as np

from bctool.errors import ConfigError, EmbeddingsError

logger = logging.getLogger(__name__)

# Items searched beyond k so that ties at the k-th boundary are usually seen in one search.
_TIE_MARGIN = 8
# Most (rows x gallery) scores held at once when a row is searched over the whole gallery.
_FULL_SEARCH_ELEMENTS = 1 << 24


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise EmbeddingsError(f"{name} must be a 2-D (N x D) array, got shape {arr.shape}")
    return arr


def _check_exclude(exclude: np.ndarray | None, n_query: int, n_gallery: int) -> np.ndarray | None:
    """``exclude`` as int64, or None when it drops nothing."""
    if exclude is None:
        return None
    ex = np.asarray(exclude)
    if ex.shape != (n_query,) or (ex.size and not np.issubdtype(ex.dtype, np.integer)):
        raise EmbeddingsError(
            f"exclude must be an integer array of shape ({n_query},) (one gallery index or -1 per "
            f"query), got {ex.dtype} {ex.shape}"
        )
    ex = ex.astype(np.int64, copy=False)
    if ex.size and (ex.min() < -1 or ex.max() >= n_gallery):
        raise EmbeddingsError(
            f"exclude values must lie in [-1, {n_gallery - 1}] (gallery indices, -1 for none), "
            f"got [{ex.min()}, {ex.max()}]"
        )
    return ex if bool((ex >= 0).any()) else None


def _sort_by_score_then_index(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (-score, index), in place."""
    if scores.shape[1] < 2:
        return scores, indices
    step_down = scores[:, 1:] < scores[:, :-1]
    descending = np.all(step_down | (scores[:, 1:] == scores[:, :-1]), axis=1)
    # faiss returns rows by descending score, so only runs of equal scores need reordering: a
    # key of (run number, index) is nearly sorted already, which a stable sort handles fast.
    tied = np.flatnonzero(descending & ~np.all(step_down, axis=1))
    if tied.size:
        runs = np.zeros((tied.size, scores.shape[1]), np.int64)
        np.cumsum(step_down[tied], axis=1, out=runs[:, 1:])
        i = indices[tied]
        order = np.argsort(runs * (int(i.max()) + 1) + i, axis=1, kind="stable")
        scores[tied] = np.take_along_axis(scores[tied], order, axis=1)
        indices[tied] = np.take_along_axis(i, order, axis=1)
    unordered = np.flatnonzero(~descending)  # never seen from faiss, but cheap to handle
    if unordered.size:
        s, i = scores[unordered], indices[unordered]
        order = np.lexsort((i, -s), axis=1)
        scores[unordered] = np.take_along_axis(s, order, axis=1)
        indices[unordered] = np.take_along_axis(i, order, axis=1)
    return scores, indices


def _drop_excluded(
    scores: np.ndarray, indices: np.ndarray, exclude: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` items of each sorted row once its excluded gallery index is removed."""
    if exclude is not None:
        # A stable sort of the "is excluded" flags moves the excluded item to the end, keeping order.
        order = np.argsort(indices == exclude[:, None], axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, axis=1)
        indices = np.take_along_axis(indices, order, axis=1)
    return np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(indices[:, :k])


def _search_sorted(
    index: faiss.Index, query: np.ndarray, depth: int, exclude: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search ``depth`` items, sort them, drop exclusions; also return the last searched score."""
    scores, indices = index.search(query, depth)
    scores, indices = _sort_by_score_then_index(scores, indices)
    kept_scores, kept_indices = _drop_excluded(scores, indices, exclude, k)
    return kept_scores, kept_indices, scores[:, -1]


def iter_rankings(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    block_size: int = 4096,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first_query_row, scores, indices)`` for each block of queries.

    Same contract as :func:`rank_gallery`, streamed so that callers never hold all rankings.
    """
    q = _as_matrix(query, "query")
    g = _as_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise EmbeddingsError(
            f"query dimension {q.shape[1]} differs from gallery dimension {g.shape[1]}; "
            "search with embeddings of the same dimension"
        )
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, got {block_size}")
    n_query, n_gallery = q.shape[0], g.shape[0]
    ex = _check_exclude(exclude, n_query, n_gallery)
    k = max(0, min(k, n_gallery - 1 if ex is not None else n_gallery))
    if k == 0:
        for start in range(0, n_query, block_size):
            rows = min(block_size, n_query - start)
            yield start, np.zeros((rows, 0), np.float32), np.zeros((rows, 0), np.int64)
        return

    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    depth = min(n_gallery, k + (1 if ex is not None else 0) + _TIE_MARGIN)
    for start in range(0, n_query, block_size):
        qb = q[start : start + block_size]
        exb = ex[start : start + block_size] if ex is not None else None
        scores, indices, last = _search_sorted(index, qb, depth, exb, k)
        if depth < n_gallery:
            # Where the k-th kept score equals the last searched one, unseen items may tie with
            # it and have a smaller index: search those rows over the whole gallery.
            unsure = np.flatnonzero(scores[:, k - 1] <= last)
            if unsure.size:
                logger.debug("ties at rank %d: %d queries searched in full", k, unsure.size)
            chunk = max(1, _FULL_SEARCH_ELEMENTS // n_gallery)
            for c in range(0, unsure.size, chunk):
                rows = unsure[c : c + chunk]
                s, i, _ = _search_sorted(
                    index, qb[rows], n_gallery, exb[rows] if exb is not None else None, k
                )
                scores[rows], indices[rows] = s, i
        yield start, scores, indices


def rank_gallery(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    block_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows of every query by inner product: ``(scores, indices)``, ``(Q, k)``.

    Inputs are L2-normalised float32 rows. ``exclude[q]`` is a gallery index removed from query
    ``q``'s ranking, or -1 for none. ``k`` is clamped to the gallery size, minus one when
    ``exclude`` names any row (then every query gets that many results). Scores are float32,
    indices int64; rows are sorted by descending score, then ascending gallery index.
    """
    score_blocks: list[np.ndarray] = []
    index_blocks: list[np.ndarray] = []
    for _, scores, indices in iter_rankings(query, gallery, k, exclude, block_size):
        score_blocks.append(scores)
        index_blocks.append(indices)
    if not score_blocks:  # no queries
        width = max(0, min(k, np.asarray(gallery).shape[0]))
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.int64)
    return np.concatenate(score_blocks), np.concatenate(index_blocks)
