"""Google Landmarks v2 (GLDv2) retrieval mAP@100; its files are read by :mod:`.files`.

The metric follows the official Kaggle scorer (``MeanAveragePrecision`` in
tensorflow/models ``delf/python/datasets/google_landmarks_dataset/metrics.py``):
``AP@100_q = (1 / min(m_q, 100)) * sum_{k <= 100} P_q(k) rel_q(k)``, where ``m_q`` is the
number of relevant images the solution lists for ``q``, whether or not they are in the gallery
that was searched: a relevant image missing from the gallery counts as missed. Public and
Private are scored apart, as on Kaggle; ``map@100`` is the mean over both.
"""

from __future__ import annotations

import logging

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate.inputs import check_same_dim, id_stem, match_rows, warn_zero_rows
from bctool.evaluate.metrics import QueryAP, average_precision_at_k
from bctool.evaluate.protocols.gldv2.files import USAGES, GLDv2Solution
from bctool.evaluate.search import stream_rankings

logger = logging.getLogger(__name__)

# Most (queries x ranks) entries of rankings and relevance masks held at once.
_BLOCK_ELEMENTS = 1 << 22


def _gallery_stems(gallery: Embeddings) -> np.ndarray:
    """File stem of every gallery row, as a numpy string array; stems must be unique."""
    stems = np.array([id_stem(i) for i in gallery.ids], dtype=str)
    values, first, counts = np.unique(stems, return_index=True, return_counts=True)
    if np.any(counts > 1):
        name = str(values[counts > 1][0])
        clash = [image_id for image_id in gallery.ids if id_stem(image_id) == name][:5]
        raise EmbeddingsError(
            f"gallery image {name!r} matches {int(counts[counts > 1][0])} embedding rows "
            f"({clash}); extract each GLDv2 index image once so every image name is unique"
        )
    return stems


def _relevance_keys(
    solution: GLDv2Solution, gallery_stems: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``query * G + gallery_row`` keys of the relevant pairs present in the gallery,
    and the number of relevant ids per query (``m_q``, counted from the solution)."""
    n_gallery = len(gallery_stems)
    lengths = np.array([len(r) for r in solution.relevant_ids], dtype=np.int64)
    flat = np.array([i for r in solution.relevant_ids for i in r], dtype=str)
    query = np.repeat(np.arange(len(solution), dtype=np.int64), lengths)
    order = np.argsort(gallery_stems, kind="stable")
    sorted_stems = gallery_stems[order]
    pos = np.minimum(np.searchsorted(sorted_stems, flat), n_gallery - 1)
    found = sorted_stems[pos] == flat if flat.size else np.zeros(0, dtype=bool)
    keys = np.unique(query[found] * n_gallery + order[pos[found]])
    missing = int(flat.size - found.sum())
    if missing:
        logger.warning(
            "%d of %d relevant index images are not in the gallery; they count as missed",
            missing,
            flat.size,
        )
    return keys, lengths


def _block_relevance(
    keys: np.ndarray, start: int, indices: np.ndarray, n_gallery: int
) -> np.ndarray:
    """Bool ``(B, K)``: is ``indices[i, r]`` relevant to query ``start + i``."""
    rows = indices.shape[0]
    lo, hi = np.searchsorted(keys, [start * n_gallery, (start + rows) * n_gallery])
    query = np.arange(start, start + rows, dtype=np.int64)[:, None]
    return np.isin(query * n_gallery + indices, keys[lo:hi])


def evaluate_gldv2(
    query: Embeddings,
    gallery: Embeddings,
    solution: GLDv2Solution,
    k: int = 100,
    *,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """mAP@k of the GLDv2 retrieval task (k = 100 is the official metric).

    Query rows are found by id or file stem (:func:`match_rows`); every gallery row is ranked,
    and is the index image named by its file stem. Keys: ``map@{k}`` (all scored queries),
    ``map@{k}_public``, ``map@{k}_private`` (NaN when a subset has no query), ``queries``,
    ``queries_public``, ``queries_private``, ``gallery``. Ties are ranked by gallery index.
    """
    return _evaluate(query, gallery, solution, k, block_size)[0]


def evaluate_gldv2_per_query(
    query: Embeddings,
    gallery: Embeddings,
    solution: GLDv2Solution,
    k: int = 100,
    *,
    block_size: int | None = None,
) -> tuple[dict[str, float | int], QueryAP]:
    """:func:`evaluate_gldv2`'s metrics and the AP@k of every scored query (the ``map@{k}``
    key), named by the solution's query ids, in its order."""
    top1 = np.zeros(len(solution), dtype=bool)
    result, ap = _evaluate(query, gallery, solution, k, block_size, top1)
    return result, QueryAP(tuple(solution.query_ids), ap, top1)


def _evaluate(
    query: Embeddings,
    gallery: Embeddings,
    solution: GLDv2Solution,
    k: int,
    block_size: int | None,
    top1_out: np.ndarray | None = None,
) -> tuple[dict[str, float | int], np.ndarray]:
    """The body of :func:`evaluate_gldv2`, plus the AP@k of every scored query (and its rank-1
    hit into ``top1_out``)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    check_same_dim(query.dim, gallery.dim)
    if len(gallery) == 0:
        raise EmbeddingsError("the gallery embeddings have no rows; extract the GLDv2 index images")
    warn_zero_rows(gallery)
    q_emb = query.normalized_embeddings()[match_rows(query, solution.query_ids, "query")]
    n_gallery = len(gallery)
    keys, n_pos = _relevance_keys(solution, _gallery_stems(gallery))

    depth = min(k, n_gallery)
    rows = block_size or max(1, _BLOCK_ELEMENTS // depth)
    ap = np.zeros(len(solution), dtype=np.float64)
    # The exact top-k, the gallery read from its file block by block (never copied whole).
    _, ranked = stream_rankings(q_emb, gallery.embeddings, depth, normalize=True)
    for start in range(0, ranked.shape[0], rows):
        indices = ranked[start : start + rows]
        stop = start + indices.shape[0]
        rel = _block_relevance(keys, start, indices, n_gallery)
        ap[start:stop] = average_precision_at_k(rel, n_pos[start:stop], k)
        if top1_out is not None:
            top1_out[start:stop] = rel[:, 0]

    usage = np.array(solution.usage)
    name = f"map@{k}"
    result: dict[str, float | int] = {name: float(ap.mean()), "queries": len(solution)}
    for tag in USAGES:
        chosen = usage == tag
        count = int(chosen.sum())
        result[f"{name}_{tag.lower()}"] = float(ap[chosen].mean()) if count else float("nan")
        result[f"queries_{tag.lower()}"] = count
    result["gallery"] = n_gallery
    logger.info(
        "GLDv2 evaluation: %d queries against %d gallery images, %s %.4f",
        len(solution),
        n_gallery,
        name,
        result[name],
    )
    return result, ap
