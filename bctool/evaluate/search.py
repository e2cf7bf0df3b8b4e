"""Top-k search of a gallery by inner product with faiss, in query blocks.

The gallery goes into the index block by block (optionally normalising each block), so a
memory-mapped gallery is never copied whole: peak memory is the index plus one block.

``index="flat"`` (the default, ``IndexFlatIP``) is exact and its rankings are deterministic:
items are ordered by descending score, and equal scores by ascending gallery index, including
ties at the k-th boundary (the item with the smaller index is kept). faiss does not promise
either, so each block is re-sorted by ``(-score, index)``; a few items beyond k are searched,
and the rare rows whose k-th score ties with the last searched one are searched again over
the whole gallery.

``index="ivf"`` (``IndexIVFFlat``, ``nprobe`` of about ``4 * sqrt(N)`` lists searched) and
``index="hnsw"`` (``IndexHNSWFlat``, M=32, ``ef_search``) are approximate, for galleries too
large for exact search: they may miss true neighbours, so neither the ranking nor the
tie order is guaranteed (rows are still sorted by ``(-score, index)`` among the items found).
Where an approximate index finds fewer than k items, the missing slots have index -1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from bctool.embeddings import normalize_rows
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate.inputs import check_same_dim
from bctool.registry import Registry

logger = logging.getLogger(__name__)

# Items searched beyond k so that ties at the k-th boundary are usually seen in one search.
_TIE_MARGIN = 8
# Most (rows x gallery) scores held at once when a row is searched over the whole gallery.
_FULL_SEARCH_ELEMENTS = 1 << 24
# Gallery bytes copied (and normalised) at once while filling an index.
_ADD_BLOCK_BYTES = 64 << 20
# Gallery bytes (as float32) in the index of one block of a streamed search.
_STREAM_BLOCK_BYTES = 128 << 20

DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 128
_HNSW_M = 32
# IVF k-means sees this many training rows per list (faiss warns below 39).
_IVF_TRAIN_PER_LIST = 40


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


def _check_gallery(gallery: np.ndarray) -> np.ndarray:
    """The gallery as given (a memory map, or rows read on demand such as a shard set's, stay
    what they are: only blocks of them are read), checked to be a 2-D array."""
    lazy = isinstance(gallery, np.ndarray) or (hasattr(gallery, "shape") and hasattr(gallery, "__getitem__"))
    g = gallery if lazy else np.asarray(gallery, dtype=np.float32)
    if len(g.shape) != 2:
        raise EmbeddingsError(f"gallery must be a 2-D (N x D) array, got shape {g.shape}")
    return g


def _gallery_blocks(gallery: np.ndarray, normalize: bool, first_row: int = 0) -> Iterator[np.ndarray]:
    """Contiguous float32 blocks of gallery rows, normalised when asked (``first_row``: the row
    number of ``gallery[0]`` in the whole gallery, for messages)."""
    rows = max(1, _ADD_BLOCK_BYTES // (4 * max(1, gallery.shape[1])))
    for start in range(0, gallery.shape[0], rows):
        block = np.array(gallery[start : start + rows], dtype=np.float32)  # a copy of our own
        flat = block.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what this pass looks for
            finite = math.isfinite(float(np.dot(flat, flat)))
        if finite:
            # The common case, told by one pass: a finite sum of squares means every value is
            # finite and no row's squared norm overflows. faiss normalises in place (zero rows
            # stay zero), and no row can be NaN or inf.
            if normalize:
                faiss.normalize_L2(block)
            yield block
            continue
        block = normalize_rows(block) if normalize else block
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise EmbeddingsError(
                f"{int(bad.sum())} gallery rows from row {first_row + start + int(np.flatnonzero(bad)[0])} on hold NaN or "
                "inf values; re-extract the gallery (`bctool extract`)"
            )
        yield np.ascontiguousarray(block)


def _ivf_nlist(n: int) -> int:
    """About ``4 * sqrt(n)`` lists, but few enough that each has its training rows."""
    return max(1, min(int(round(4 * np.sqrt(n))), n // _IVF_TRAIN_PER_LIST))


def _train_sample(gallery: np.ndarray, size: int, normalize: bool, seed: int) -> np.ndarray:
    """``size`` gallery rows chosen with ``seed`` (read in file order, cheap on a memory map)."""
    n = gallery.shape[0]
    rows = np.arange(n) if size >= n else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    sample = np.asarray(gallery[rows], dtype=np.float32)
    return np.ascontiguousarray(normalize_rows(sample) if normalize else sample)


@dataclass(frozen=True)
class IndexSettings:
    """The search settings an index kind may read."""

    nprobe: int = DEFAULT_NPROBE  # IVF lists searched
    ef_search: int = DEFAULT_EF_SEARCH  # HNSW candidates kept while searching


@dataclass(frozen=True)
class SearchOptions:
    """How a gallery is searched: ``index`` names an index kind (:data:`INDEX_KINDS`) and
    ``nprobe`` and ``ef_search`` are its settings (those of :func:`build_index`); ``top_k`` is
    the depth of the ranking a retrieval evaluation scores (None: the whole gallery), where
    :func:`rank_gallery` takes its own ``k``."""

    top_k: int | None = None
    index: str = "flat"
    nprobe: int = DEFAULT_NPROBE  # IVF lists searched
    ef_search: int = DEFAULT_EF_SEARCH  # HNSW candidates kept while searching


# An index kind builds an empty inner-product index: (dimension, gallery rows, settings,
# sample) -> index, where ``sample(size)`` returns up to ``size`` gallery rows to train on
# (already normalised when the gallery is). The gallery is added block by block afterwards.
IndexBuilder = Callable[[int, int, IndexSettings, Callable[[int], np.ndarray]], faiss.Index]


def _admit_index(name: str, build: object) -> None:
    if not callable(build):
        raise ConfigError(f"index kind {name!r} must be a builder (dim, rows, settings, sample) -> faiss.Index, "
                          f"got {build!r}")


# Index kinds by --index name; the entry-point group bctool.index_kinds adds others
# (bctool.registry). ``exact``: the ranking is exact, ties in a fixed order (a plugin's builder
# declares it as its attribute ``exact``; approximate otherwise).
INDEX_KINDS: Registry[IndexBuilder] = Registry("index kind", "index-kinds", admit=_admit_index,
                                                derive=lambda name, build: {"exact": bool(getattr(build, "exact", False))})


@INDEX_KINDS.register("flat", exact=True)
def _flat_index(dim: int, rows: int, settings: IndexSettings, sample: Callable[[int], np.ndarray]) -> faiss.Index:
    """Exact search (IndexFlatIP); equal scores ranked by gallery order."""
    return faiss.IndexFlatIP(dim)


@INDEX_KINDS.register("ivf", exact=False)
def _ivf_index(dim: int, rows: int, settings: IndexSettings, sample: Callable[[int], np.ndarray]) -> faiss.Index:
    """Approximate: IndexIVFFlat, about 4 * sqrt(N) lists, nprobe of them searched."""
    nlist = _ivf_nlist(rows)
    idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    training = sample(nlist * _IVF_TRAIN_PER_LIST)
    logger.info("training IVF index: %d lists on %d rows", nlist, training.shape[0])
    idx.train(training)
    idx.nprobe = min(settings.nprobe, nlist)
    return idx


@INDEX_KINDS.register("hnsw", exact=False)
def _hnsw_index(dim: int, rows: int, settings: IndexSettings, sample: Callable[[int], np.ndarray]) -> faiss.Index:
    """Approximate: IndexHNSWFlat, M=32, ef_search candidates."""
    idx = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efSearch = settings.ef_search
    return idx


def build_index(
    gallery: np.ndarray,
    index: str = "flat",
    *,
    normalize: bool = False,
    nprobe: int = DEFAULT_NPROBE,
    ef_search: int = DEFAULT_EF_SEARCH,
    seed: int = 0,
) -> faiss.Index:
    """A faiss inner-product index over the gallery rows, filled block by block.

    ``index`` names an index kind (:data:`INDEX_KINDS`: ``"flat"``, exact; ``"ivf"`` or
    ``"hnsw"``, approximate, see the module docstring). ``normalize`` L2-normalises each block as
    it is added, so a raw (possibly memory-mapped) gallery needs no normalised copy. ``seed``
    picks the training rows of a kind that trains (IVF).
    """
    builder = INDEX_KINDS.get_obj(index)
    if nprobe < 1:
        raise ConfigError(f"nprobe must be at least 1, got {nprobe}")
    if ef_search < 1:
        raise ConfigError(f"ef_search must be at least 1, got {ef_search}")
    g = _check_gallery(gallery)
    n, dim = g.shape
    idx = builder(dim, n, IndexSettings(nprobe, ef_search), lambda size: _train_sample(g, size, normalize, seed))
    for block in _gallery_blocks(g, normalize):
        idx.add(block)
    logger.info("%s index holds %d gallery rows of dimension %d", index, n, dim)
    return idx


def _is_exact(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexFlat)


def iter_index_rankings(
    index: faiss.Index,
    query: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    block_size: int = 4096,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first_query_row, scores, indices)`` per query block, searching a built index.

    Same contract as :func:`rank_gallery` for an exact (flat) index; see the module docstring
    for approximate ones. Build the index once with :func:`build_index` to search it with
    several query sets.
    """
    q = _as_matrix(query, "query")
    check_same_dim(q.shape[1], index.d)
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, got {block_size}")
    n_query, n_gallery = q.shape[0], int(index.ntotal)
    ex = _check_exclude(exclude, n_query, n_gallery)
    k = max(0, min(k, n_gallery - 1 if ex is not None else n_gallery))
    if k == 0:
        for start in range(0, n_query, block_size):
            rows = min(block_size, n_query - start)
            yield start, np.zeros((rows, 0), np.float32), np.zeros((rows, 0), np.int64)
        return

    exact = _is_exact(index)
    depth = min(n_gallery, k + (1 if ex is not None else 0) + _TIE_MARGIN)
    for start in range(0, n_query, block_size):
        qb = q[start : start + block_size]
        exb = ex[start : start + block_size] if ex is not None else None
        scores, indices, last = _search_sorted(index, qb, depth, exb, k)
        if exact and depth < n_gallery:
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


def iter_rankings(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    block_size: int = 4096,
    *,
    normalize: bool = False,
    search: SearchOptions = SearchOptions(),
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first_query_row, scores, indices)`` for each block of queries.

    Same contract as :func:`rank_gallery`, streamed so that callers never hold all rankings.
    ``normalize`` and the index of ``search`` are those of :func:`build_index`.
    """
    q = _as_matrix(query, "query")
    g = _check_gallery(gallery)
    check_same_dim(q.shape[1], g.shape[1])
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, got {block_size}")
    idx = build_index(g, search.index, normalize=normalize, nprobe=search.nprobe, ef_search=search.ef_search)
    yield from iter_index_rankings(idx, q, k, exclude, block_size)


def stream_rankings(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    *,
    normalize: bool = False,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rank_gallery`'s exact (flat) top-``k``, the gallery read ``block_rows`` rows at a
    time: memory holds one block's index and the ``(Q, k)`` best so far, never the gallery, so
    a memory-mapped gallery of any size is searched in its file (its pages released after use).

    Each block gives its own exact top-k (ties by index, as :func:`iter_index_rankings` keeps
    them); merging sorted lists by ``(-score, index)`` gives the gallery's exact top-k.
    """
    from bctool.embeddings import release_rows

    q = _as_matrix(query, "query")
    g = _check_gallery(gallery)
    check_same_dim(q.shape[1], g.shape[1])
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    n, dim = g.shape
    ex = _check_exclude(exclude, q.shape[0], n)
    k = max(0, min(k, n - 1 if ex is not None else n))
    best_s = np.zeros((q.shape[0], 0), np.float32)
    best_i = np.zeros((q.shape[0], 0), np.int64)
    rows = block_rows or max(1, _STREAM_BLOCK_BYTES // (4 * max(1, dim)))
    for start in range(0, n if k else 0, rows):
        stop = min(n, start + rows)
        index = faiss.IndexFlatIP(dim)
        for block in _gallery_blocks(g[start:stop], normalize, first_row=start):
            index.add(block)
        depth = min(k + (1 if ex is not None else 0), stop - start)
        parts = list(iter_index_rankings(index, q, depth, block_size=4096))
        scores = np.concatenate([p[1] for p in parts])
        indices = np.concatenate([p[2] for p in parts]) + start
        if ex is not None:  # the excluded row sorts last and is never kept
            dropped = indices == ex[:, None]
            scores[dropped], indices[dropped] = -np.inf, np.iinfo(np.int64).max
        scores, indices = np.hstack([best_s, scores]), np.hstack([best_i, indices])
        order = np.lexsort((indices, -scores), axis=-1)[:, :k]
        best_s, best_i = np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)
        release_rows(g, start, stop)
    return np.ascontiguousarray(best_s), np.ascontiguousarray(best_i)


def rank_gallery(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    block_size: int = 4096,
    *,
    normalize: bool = False,
    search: SearchOptions = SearchOptions(),
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows of every query by inner product: ``(scores, indices)``, ``(Q, k)``.

    Inputs are L2-normalised float32 rows. ``exclude[q]`` is a gallery index removed from query
    ``q``'s ranking, or -1 for none. ``k`` is clamped to the gallery size, minus one when
    ``exclude`` names any row (then every query gets that many results). Scores are float32,
    indices int64; rows are sorted by descending score, then ascending gallery index.
    ``search.index`` ``"ivf"`` or ``"hnsw"`` search approximately (no tie-order guarantee; -1
    marks slots an approximate index left empty); ``normalize=True`` normalises the gallery
    block by block. ``search.top_k`` is not read: ``k`` is the depth.
    """
    score_blocks: list[np.ndarray] = []
    index_blocks: list[np.ndarray] = []
    for _, scores, indices in iter_rankings(query, gallery, k, exclude, block_size, normalize=normalize, search=search):
        score_blocks.append(scores)
        index_blocks.append(indices)
    if not score_blocks:  # no queries
        width = max(0, min(k, np.asarray(gallery).shape[0]))
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.int64)
    return np.concatenate(score_blocks), np.concatenate(index_blocks)
