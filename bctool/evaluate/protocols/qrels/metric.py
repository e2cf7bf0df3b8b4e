"""Retrieval measured against relevance judgments, with trec_eval's definitions.

For each judged query the gallery is ranked (exact search, cosine, the first ``depth`` rows) and
re-ordered as trec_eval orders a run: by score, ties by document id, the larger id first. With
``R`` the query's judged documents of relevance at least ``level`` (whether or not they are in
the gallery: one that is not counts as missed) and ``rel_i`` the relevance of the document at
rank ``i``:

- ``map``: average precision, ``sum_{i: rel_i >= level} P@i / R`` (trec_eval ``map``);
- ``p@k``: relevant documents in the first ``k``, over ``k`` (``P_k``);
- ``recall@k``: relevant documents in the first ``k``, over ``R`` (``recall_k``);
- ``mrr@k``: one over the rank of the first relevant document within ``k`` (``RR@k``);
- ``ndcg@k``: ``sum_{i <= k} g_i / log2(i + 1)`` over the same sum for the judgments sorted by
  relevance, gains ``g`` the relevance values above 0 (``ndcg_cut_k``).

Queries without any judgment are counted (``unjudged_queries``) and left out, not scored zero;
the measures are means over the judged queries, as trec_eval reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, DataError, EmbeddingsError
from bctool.evaluate.inputs import check_same_dim, id_stem, warn_zero_rows
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.protocols.qrels.files import Qrels
from bctool.evaluate.search import stream_rankings

logger = logging.getLogger(__name__)

DEFAULT_DEPTH = 1000  # documents ranked a query, as a TREC run holds by convention
LEVEL = 1  # the smallest relevance that counts as relevant for the binary measures (trec_eval's -l)


@dataclass(frozen=True)
class Cutoffs:
    """The ``k`` of each measure at a cutoff."""

    ndcg: int = 10
    precision: int = 10
    recall: int = 100
    mrr: int = 10

    def keys(self) -> tuple[str, ...]:
        """The metric names, in table order."""
        return ("map", f"ndcg@{self.ndcg}", f"p@{self.precision}", f"recall@{self.recall}", f"mrr@{self.mrr}")


def trec_order(scores: np.ndarray, doc_rank: np.ndarray) -> np.ndarray:
    """The order trec_eval gives a query's retrieved documents: score descending, ties by
    document id descending (``doc_rank``: each document's position among the ids sorted)."""
    return np.lexsort((-doc_rank, -np.asarray(scores, dtype=np.float64)))


def _dcg(gains: np.ndarray, k: int) -> float:
    top = gains[:k]
    return float((top / np.log2(np.arange(2, top.size + 2))).sum())


def query_measures(ranked: np.ndarray, judged: np.ndarray, level: int = LEVEL,
                   cutoffs: Cutoffs = Cutoffs()) -> dict[str, float]:
    """The measures of one query: ``ranked`` are the relevances of its ranked documents (0 for
    unjudged ones), ``judged`` every relevance its judgments give."""
    ranked = np.asarray(ranked, dtype=np.int64)
    relevant = ranked >= level
    total = int((np.asarray(judged) >= level).sum())
    hits = np.cumsum(relevant)
    ranks = np.arange(1, ranked.size + 1)
    ap = float((hits / ranks)[relevant].sum() / total) if total else 0.0
    first = np.flatnonzero(relevant[: cutoffs.mrr])
    ideal = np.sort(np.clip(np.asarray(judged, dtype=np.float64), 0, None))[::-1]
    best = _dcg(ideal, cutoffs.ndcg)
    return {
        "map": ap,
        f"ndcg@{cutoffs.ndcg}": _dcg(np.clip(ranked, 0, None).astype(np.float64), cutoffs.ndcg) / best if best else 0.0,
        f"p@{cutoffs.precision}": float(relevant[: cutoffs.precision].sum()) / cutoffs.precision,
        f"recall@{cutoffs.recall}": float(relevant[: cutoffs.recall].sum()) / total if total else 0.0,
        f"mrr@{cutoffs.mrr}": 1.0 / (first[0] + 1) if first.size else 0.0,
    }


def _lookup(ids: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """name -> row for every name that is a row's id or its unique file stem."""
    by_id = {image_id: row for row, image_id in enumerate(ids)}
    stems: dict[str, int] = {}
    for row, image_id in enumerate(ids):
        stem = id_stem(image_id)
        stems[stem] = -1 if stem in stems else row  # -1: two rows share it
    found = {name: by_id.get(name, stems.get(name, -1)) for name in names}
    return {name: row for name, row in found.items() if row >= 0}


def judged_queries(query: Embeddings, qrels: Qrels) -> tuple[np.ndarray, list[str]]:
    """The query rows that have judgments, in qrels order, and their judgment keys; the judged
    queries with no row are a :class:`DataError` when none is left, else a warning."""
    rows = _lookup(query.ids, list(qrels.judgments))
    if not rows:
        raise DataError(
            f"none of the {len(qrels)} judged queries of {qrels.source or 'the qrels'!r} is a query row "
            f"(e.g. {next(iter(qrels.judgments))!r} against query ids such as {query.ids[0]!r}); a judgment names a "
            "query by its embedding id or file stem")
    missing = len(qrels) - len(rows)
    if missing:
        logger.warning("%d of %d judged queries have no query row; they are left out", missing, len(qrels))
    keys = list(rows)
    return np.array([rows[k] for k in keys], dtype=np.int64), keys


def evaluate_qrels(query: Embeddings, gallery: Embeddings, qrels: Qrels, *, depth: int | None = None,
                   level: int = LEVEL, cutoffs: Cutoffs = Cutoffs()) -> tuple[dict[str, float | int], QueryAP]:
    """The measures of the module docstring, averaged over the judged queries, and the AP of
    each (``map``, the headline) with whether its first result was relevant."""
    check_same_dim(query.dim, gallery.dim)
    if len(gallery) == 0:
        raise EmbeddingsError("the gallery embeddings have no rows; extract the judged documents' images")
    if depth is not None and depth < 1:
        raise ConfigError(f"the ranking depth must be at least 1, got {depth}")
    warn_zero_rows(gallery)
    rows, keys = judged_queries(query, qrels)
    gallery_ids = list(gallery.ids)
    docs = _lookup(gallery_ids, sorted({d for k in keys for d in qrels.judgments[k]}))
    absent = sum(1 for k in keys for d in qrels.judgments[k] if d not in docs)
    if absent:
        logger.warning("%d judged documents are not in the gallery; relevant ones count as missed", absent)
    doc_rank = np.empty(len(gallery_ids), dtype=np.int64)
    doc_rank[np.argsort(np.array(gallery_ids, dtype=object), kind="stable")] = np.arange(len(gallery_ids))
    scores, ranked = stream_rankings(query.normalized_embeddings()[rows], gallery.embeddings,
                                     min(depth or DEFAULT_DEPTH, len(gallery)), normalize=True)
    per_query = {key: np.zeros(len(keys)) for key in cutoffs.keys()}
    top1 = np.zeros(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        judgments = qrels.judgments[key]
        by_row = {docs[doc]: value for doc, value in judgments.items() if doc in docs}
        order = ranked[i][trec_order(scores[i], doc_rank[ranked[i]])]
        relevance = np.fromiter((by_row.get(int(row), 0) for row in order), dtype=np.int64, count=order.size)
        measures = query_measures(relevance, np.fromiter(judgments.values(), dtype=np.int64), level, cutoffs)
        for name, value in measures.items():
            per_query[name][i] = value
        top1[i] = relevance.size > 0 and relevance[0] >= level
    result: dict[str, float | int] = {name: float(values.mean()) for name, values in per_query.items()}
    result.update(queries=len(keys), unjudged_queries=len(query) - len(keys), gallery=len(gallery),
                  depth=int(ranked.shape[1]))
    return result, QueryAP(tuple(query.ids[r] for r in rows), per_query["map"], top1)
