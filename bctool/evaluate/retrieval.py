"""Retrieval evaluation of query embeddings against a gallery: mAP, mAP@100, recall@k."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bctool.embeddings import Embeddings, RowIds
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.evaluate.inputs import check_ids_once, check_same_dim, warn_zero_rows
from bctool.evaluate.metrics import (
    QueryAP,
    average_precision,
    average_precision_at_k,
    recall_at_k,
)
from bctool.evaluate.search import (
    SearchOptions,
    build_index,
    iter_index_rankings,
    stream_rankings,
)

logger = logging.getLogger(__name__)

# Most (queries x ranks) entries of rankings held at once.
_BLOCK_ELEMENTS = 1 << 22
# A whole-gallery index larger than this gets a warning that --top-k streams the gallery instead.
_LARGE_INDEX_BYTES = 2 << 30


def _describe_model(model: dict[str, Any]) -> str:
    if not model:
        return "unknown model"
    parts = []
    for key in sorted(model):
        value = model[key]
        if key == "sha256" and isinstance(value, str):
            value = value[:12]
        elif isinstance(value, (list, tuple)):  # trained_classes: hundreds of names
            value = f"[{len(value)}: {shown(value, 3)}]"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _check_inputs(
    query: Embeddings, gallery: Embeddings, top_k: int | None, ks: tuple[int, ...]
) -> None:
    if len(query) == 0:
        raise EmbeddingsError("the query embeddings have 0 rows; extract at least one query image")
    if len(gallery) == 0:
        raise EmbeddingsError("the gallery embeddings have 0 rows; extract at least one gallery image")
    check_same_dim(query.dim, gallery.dim, _describe_model(query.model), _describe_model(gallery.model))
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1 (or None for the whole gallery), got {top_k}")
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"ks must be a non-empty list of ranks >= 1, got {tuple(ks)}")
    # A query skips the gallery row of its own id: an id given twice would leave a copy in.
    check_ids_once(query, "the query embeddings")
    check_ids_once(gallery, "the gallery embeddings")
    warn_zero_rows(gallery)


def _shared_labels(query: Embeddings, gallery: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery labels as integers of one vocabulary (the gallery's label names).

    The two files may number their labels differently, so labels are matched by name. A query
    label absent from the gallery gets a fresh id (it has no positives); unknown stays -1.
    """
    # Only the label names are mapped (a few thousand strings); the rows are mapped with numpy.
    names = np.array(list(gallery.label_names) + list(query.label_names), dtype=str)
    _, name_ids = np.unique(names, return_inverse=True)
    name_ids = name_ids.reshape(-1).astype(np.int64)
    n_gallery_names = len(gallery.label_names)
    return (
        _map_labels(query.labels, name_ids[n_gallery_names:]),
        _map_labels(gallery.labels, name_ids[:n_gallery_names]),
    )


def _map_labels(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids[label]`` for every row, -1 where the label is unknown."""
    labels = np.asarray(labels, dtype=np.int64)
    if ids.size == 0:
        return np.full(labels.shape, -1, dtype=np.int64)
    return np.where(labels >= 0, ids[np.maximum(labels, 0)], -1)


def _self_rows(query: Embeddings, gallery: Embeddings) -> np.ndarray:
    """Per query, the gallery row with the same id, or -1 (ids are unique: :func:`_check_inputs`).

    Ids are relative to their dataset root, so files extracted from two different roots never
    share an image, whatever their ids; an unknown root (``""``) matches any. A file without ids
    shares no image with any file: row numbers name no image (a warning says so).
    """
    if not (query.ids_known and gallery.ids_known):
        logger.warning(
            "the %s file has no ids, so no gallery row is taken for a query's own image (row numbers name no "
            "image); if the queries are also in the gallery, each finds itself: re-extract with `bctool extract`, "
            "which records ids", "query" if not query.ids_known else "gallery",
        )
        return np.full(len(query), -1, dtype=np.int64)
    if query.root and gallery.root and query.root != gallery.root:
        return np.full(len(query), -1, dtype=np.int64)
    # Only ids that some query has are kept, so a large gallery costs one pass and a small dict
    # (a version-2 file's ids are searched in their buffer, never decoded one by one).
    wanted = set(query.ids)
    row_of: dict[str, int] = {}
    if isinstance(gallery.ids, RowIds):
        row_of = gallery.ids.rows_of(wanted)
    else:
        for i, image_id in enumerate(gallery.ids):
            if image_id in wanted:
                row_of.setdefault(image_id, i)
    return np.array([row_of.get(image_id, -1) for image_id in query.ids], dtype=np.int64)


def _count_positives(q_lab: np.ndarray, g_lab: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Relevant gallery rows per query: same label, not unknown, not the query itself."""
    n_labels = int(max(q_lab.max(initial=-1), g_lab.max(initial=-1))) + 1
    counts = np.bincount(g_lab[g_lab >= 0], minlength=n_labels)
    n_pos = np.where(q_lab >= 0, counts[np.maximum(q_lab, 0)] if n_labels else 0, 0)
    has_self = exclude >= 0
    self_label = np.where(has_self, g_lab[np.maximum(exclude, 0)], -1)
    return n_pos - (has_self & (q_lab >= 0) & (self_label == q_lab))


def evaluate_retrieval(
    query: Embeddings,
    gallery: Embeddings,
    search: SearchOptions = SearchOptions(),
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float | int]:
    """Rank the gallery for every query and report mAP, mAP@100 and recall@k.

    A gallery row is relevant to a query when both have the same label name. Queries with an
    unknown label or without any relevant gallery row are skipped and counted in
    ``queries_without_positives`` (so ``queries + queries_without_positives`` is the number of
    query rows). A query never retrieves the gallery row with its own id (ids from one dataset
    root). ``map`` is computed over the top ``search.top_k`` items (default: the whole gallery);
    positives ranked lower count as missed. Ties are ranked by gallery index (see :mod:`bctool.evaluate.search`).

    ``search.index`` is ``"flat"`` (exact), ``"ivf"`` (with ``nprobe``) or ``"hnsw"`` (with
    ``ef_search``), as in :func:`bctool.evaluate.search.build_index`; approximate indexes may
    miss relevant rows and do not keep the tie order. The gallery may be memory-mapped
    (``load_embeddings(path, mmap=True)``): it is normalised block by block into the index.
    """
    return _evaluate(query, gallery, search, ks, None)


def evaluate_retrieval_per_query(
    query: Embeddings,
    gallery: Embeddings,
    search: SearchOptions = SearchOptions(),
    ks: tuple[int, ...] = (1, 5, 10),
) -> tuple[dict[str, float | int], QueryAP]:
    """:func:`evaluate_retrieval`'s metrics and the AP of every evaluated query (the ``map`` key).

    The queries are listed by id in row order; their mean AP is ``map``.
    """
    ap = np.full(len(query), np.nan, dtype=np.float64)
    top1 = np.zeros(len(query), dtype=bool)
    result = _evaluate(query, gallery, search, ks, ap, top1)
    # Skipped queries keep their NaN: an evaluated one has positives, so a finite AP.
    evaluated = np.flatnonzero(~np.isnan(ap))
    return result, QueryAP(tuple(query.ids[i] for i in evaluated), ap[evaluated], top1[evaluated])


def _rankings(g_index, q_emb: np.ndarray, evaluated: np.ndarray, exclude: np.ndarray, depth: int):  # noqa: ANN001, ANN202
    """``(query rows, gallery indices)`` blocks of the top ``depth`` of every evaluated query.

    Queries with a self row lose one gallery item to the exclusion, so they are ranked apart:
    the others keep the whole gallery.
    """
    block_size = max(1, min(4096, _BLOCK_ELEMENTS // depth))
    with_self = exclude[evaluated] >= 0
    for rows, ex in ((evaluated[with_self], exclude[evaluated[with_self]]), (evaluated[~with_self], None)):
        if rows.size == 0:
            continue
        for start, _, indices in iter_index_rankings(g_index, q_emb[rows], depth, ex, block_size):
            yield rows[start : start + indices.shape[0]], indices


def _streamed(gallery: np.ndarray, q_emb: np.ndarray, evaluated: np.ndarray, exclude: np.ndarray, depth: int):  # noqa: ANN202
    """:func:`_rankings` by :func:`stream_rankings`: ``(query rows, gallery indices)`` blocks."""
    _, indices = stream_rankings(q_emb[evaluated], gallery, depth, exclude[evaluated], normalize=True)
    block = max(1, min(4096, _BLOCK_ELEMENTS // depth))
    for start in range(0, evaluated.size, block):
        yield evaluated[start : start + block], indices[start : start + block]


def _metric_sums(
    rankings, q_lab: np.ndarray, g_lab: np.ndarray, n_pos: np.ndarray, map_depth: int,  # noqa: ANN001
    ks: tuple[int, ...], ap_out: np.ndarray | None, top1_out: np.ndarray | None = None,
) -> dict[str, float]:
    """Sums over the ranked queries of AP (to ``map_depth``), AP@100 and recall@k; each query's
    AP and rank-1 hit into ``ap_out`` and ``top1_out`` when given."""
    sums = {"map": 0.0, "map@100": 0.0, **{f"recall@{k}": 0.0 for k in ks}}
    for block, indices in rankings:
        # -1 marks a slot an approximate index left empty: never relevant.
        relevance = (g_lab[indices] == q_lab[block, None]) & (indices >= 0)
        ap = average_precision(relevance[:, :map_depth], n_pos[block])
        sums["map"] += float(np.sum(ap))
        if ap_out is not None:
            ap_out[block] = ap
        if top1_out is not None:
            top1_out[block] = relevance[:, 0]
        sums["map@100"] += float(np.sum(average_precision_at_k(relevance, n_pos[block], k=100)))
        for k, hit in recall_at_k(relevance, ks).items():
            sums[f"recall@{k}"] += float(np.sum(hit))
    return sums


def _evaluate(
    query: Embeddings,
    gallery: Embeddings,
    search: SearchOptions,
    ks: tuple[int, ...],
    ap_out: np.ndarray | None,
    top1_out: np.ndarray | None = None,
) -> dict[str, float | int]:
    """The body of :func:`evaluate_retrieval`; fills ``ap_out[row]`` (and ``top1_out[row]``)
    with each evaluated query's AP (and rank-1 hit) when given."""
    top_k, index = search.top_k, search.index
    _check_inputs(query, gallery, top_k, ks)
    q_lab, g_lab = _shared_labels(query, gallery)
    exclude = _self_rows(query, gallery)
    n_pos = _count_positives(q_lab, g_lab, exclude)
    evaluated = np.flatnonzero(n_pos > 0)
    skipped = len(query) - int(evaluated.size)
    if evaluated.size == 0:
        raise EmbeddingsError(
            f"none of the {len(query)} queries has a relevant gallery row "
            f"({int((q_lab < 0).sum())} queries have no label; relevance means the same label name); "
            "check that query and gallery come from datasets with the same label names"
        )

    n_gallery = len(gallery)
    map_depth = n_gallery if top_k is None else min(top_k, n_gallery)
    depth = min(n_gallery, max(map_depth, 100, *ks))
    if index == "flat" and depth < n_gallery:
        # Exact top-depth, the gallery streamed from its file: memory does not grow with it.
        rankings = _streamed(gallery.embeddings, query.normalized_embeddings(), evaluated, exclude, depth)
    else:
        if index == "flat" and n_gallery * gallery.dim * 4 > _LARGE_INDEX_BYTES:
            logger.warning(
                "ranking all %d gallery rows holds them in one index (%.1f GiB); pass --top-k 100 (or another depth) "
                "to stream the gallery from its file instead", n_gallery, n_gallery * gallery.dim * 4 / 2**30)
        g_index = build_index(gallery.embeddings, index, normalize=True, nprobe=search.nprobe,
                              ef_search=search.ef_search)
        rankings = _rankings(g_index, query.normalized_embeddings(), evaluated, exclude, depth)
    sums = _metric_sums(rankings, q_lab, g_lab, n_pos, map_depth, ks, ap_out, top1_out)

    n_evaluated = int(evaluated.size)
    result: dict[str, float | int] = {name: total / n_evaluated for name, total in sums.items()}
    result.update(queries=n_evaluated, gallery=n_gallery, queries_without_positives=skipped)
    if skipped:
        logger.warning(
            "%d of %d queries have no relevant gallery item (no label, or none of the gallery's "
            "labels) and are left out: the metrics are over the other %d",
            skipped, skipped + n_evaluated, n_evaluated,
        )
    logger.info(
        "evaluated %d queries against %d gallery rows (%d queries skipped: no label or no positive)",
        n_evaluated,
        n_gallery,
        skipped,
    )
    return result
