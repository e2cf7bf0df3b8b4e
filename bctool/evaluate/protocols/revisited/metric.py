"""Revisited Oxford/Paris evaluation (Radenović et al., CVPR 2018): mAP and mP@k per difficulty
(the paper's Easy, Medium and Hard protocols: :data:`DIFFICULTIES`).

The metric functions are pure and vectorised. They take two bool ``(Q, K)`` arrays in rank order
(rank 0 first): ``ok`` marks positives and ``junk`` marks images removed from the ranking before
scoring. They follow ``compute_map`` of the reference code (filipradenovic/revisitop,
``python/evaluate.py``), including its edge cases:

- a position's junk-free rank is its rank minus the number of junk images ranked before it;
- AP is the trapezoid rule: for the j-th positive (0-based) at junk-free rank r_j,
  ``AP = (1 / n_pos) * sum_j (P0_j + P1_j) / 2`` with ``P0_j = j / r_j`` (1 if ``r_j = 0``)
  and ``P1_j = (j + 1) / (r_j + 1)``;
- mP@k is precision at ``k' = min(k, junk-free 1-based rank of the last positive)``: the share
  of the top ``k'`` junk-free images that are positives. So a query whose positives all lie in
  the top k scores 1 only if nothing else ranks above its last positive, and k larger than
  the number of positives is not penalised beyond that;
- queries without positives get NaN and are left out of the means.
"""

from __future__ import annotations

import logging

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, DataError
from bctool.evaluate.inputs import check_same_dim, match_rows, warn_zero_rows
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.protocols.revisited.files import RevisitedGroundTruth
from bctool.evaluate.search import iter_rankings

logger = logging.getLogger(__name__)

# The paper calls these its protocols; in bctool a protocol is a registered one (revisited, gldv2...).
DIFFICULTIES = ("easy", "medium", "hard")
# Most (queries x gallery) entries of rankings and masks held at once.
_BLOCK_ELEMENTS = 1 << 22


def _check(ok: np.ndarray, junk: np.ndarray, n_positives: np.ndarray) -> tuple[np.ndarray, ...]:
    ok_arr = np.asarray(ok, dtype=bool)
    junk_arr = np.asarray(junk, dtype=bool)
    if ok_arr.ndim != 2 or junk_arr.shape != ok_arr.shape:
        raise ValueError(
            f"ok and junk must be 2-D (queries x ranks) arrays of one shape, got {ok_arr.shape} "
            f"and {junk_arr.shape}"
        )
    n_pos = np.asarray(n_positives, dtype=np.float64)
    if n_pos.shape != (ok_arr.shape[0],):
        raise ValueError(
            f"n_positives must have shape ({ok_arr.shape[0]},) to match ok {ok_arr.shape}, "
            f"got {n_pos.shape}"
        )
    return ok_arr, junk_arr, n_pos


def junk_free_ranks(junk: np.ndarray) -> np.ndarray:
    """Rank of every position once junk is removed, ``(Q, K)`` int64 (0-based).

    A position's rank drops by one for every junk image ranked strictly before it.
    """
    junk_arr = np.asarray(junk, dtype=bool)
    before = np.cumsum(junk_arr, axis=1, dtype=np.int64) - junk_arr
    return np.arange(junk_arr.shape[1], dtype=np.int64) - before


def revisited_ap(ok: np.ndarray, junk: np.ndarray, n_positives: np.ndarray) -> np.ndarray:
    """Trapezoid-rule AP of every query with junk removed, ``(Q,)`` float64; NaN if no positives.

    ``n_positives`` is the number of positives of each query; positives missing from a
    truncated ranking count as missed.
    """
    ok_arr, junk_arr, n_pos = _check(ok, junk, n_positives)
    rank = junk_free_ranks(junk_arr).astype(np.float64)
    j = np.cumsum(ok_arr, axis=1, dtype=np.float64) - 1.0
    p0 = np.where(rank == 0, 1.0, j / np.maximum(rank, 1.0))
    p1 = (j + 1.0) / (rank + 1.0)
    total = np.sum(np.where(ok_arr, (p0 + p1) / 2.0, 0.0), axis=1)
    out = np.full(total.shape, np.nan, dtype=np.float64)
    np.divide(total, n_pos, out=out, where=n_pos > 0)
    return out


def revisited_precision_at_k(
    ok: np.ndarray, junk: np.ndarray, n_positives: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[int, np.ndarray]:
    """Per ``k`` in ``ks``: the revisited protocol's precision at k of every query, ``(Q,)``.

    Precision is taken at ``min(k, junk-free 1-based rank of the last ranked positive)`` over
    the junk-free ranking, as ``compute_map`` does; NaN where ``n_positives`` is 0, and 0 where
    a query has positives but none was ranked.
    """
    ok_arr, junk_arr, n_pos = _check(ok, junk, n_positives)
    rank1 = junk_free_ranks(junk_arr) + 1
    last = np.max(np.where(ok_arr, rank1, 0), axis=1, initial=0)
    out: dict[int, np.ndarray] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"every k in ks must be at least 1, got {k} in {tuple(ks)}")
        depth = np.minimum(last, k)
        depth = np.where(depth > 0, depth, k)  # nothing ranked: precision 0 over k items
        hits = np.sum(ok_arr & (rank1 <= depth[:, None]), axis=1)
        out[int(k)] = np.where(n_pos > 0, hits / depth, np.nan)
    return out


def difficulty_sets(
    gnd: RevisitedGroundTruth, difficulty: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query, the positive and the junk gallery indices at ``difficulty``.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy.
    """
    parts = {
        "easy": ((gnd.easy,), (gnd.junk, gnd.hard)),
        "medium": ((gnd.easy, gnd.hard), (gnd.junk,)),
        "hard": ((gnd.hard,), (gnd.junk, gnd.easy)),
    }
    if difficulty not in parts:
        raise ConfigError(f"difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}")
    ok_src, junk_src = parts[difficulty]

    def join(sources: tuple[tuple[np.ndarray, ...], ...]) -> list[np.ndarray]:
        # Unique, so an image listed twice counts once towards the number of positives.
        return [np.unique(np.concatenate(per_query)) for per_query in zip(*sources)]

    return join(ok_src), join(junk_src)


def _pairs(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query index lists flattened to (query, gallery index) pairs."""
    lengths = np.array([len(s) for s in sets], dtype=np.int64)
    q = np.repeat(np.arange(len(sets), dtype=np.int64), lengths)
    g = np.concatenate(sets).astype(np.int64) if sets else np.zeros(0, np.int64)
    return q, g


def _block_mask(
    pairs: tuple[np.ndarray, np.ndarray], start: int, indices: np.ndarray
) -> np.ndarray:
    """Rank-order bool mask ``(B, N)`` of the pairs whose query lies in the block."""
    q, g = pairs
    rows, n_gallery = indices.shape
    keep = (q >= start) & (q < start + rows)
    mask = np.zeros((rows, n_gallery), dtype=bool)
    mask[q[keep] - start, g[keep]] = True
    return np.take_along_axis(mask, indices, axis=1)


def _check_inputs(query: Embeddings, gallery: Embeddings, ks: tuple[int, ...]) -> None:
    check_same_dim(query.dim, gallery.dim)
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"ks must be a non-empty list of ranks >= 1, got {tuple(ks)}")


def evaluate_revisited(
    query: Embeddings,
    gallery: Embeddings,
    gnd: RevisitedGroundTruth,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float | int]:
    """Rank the whole gallery for every ground-truth query; mAP and mP@k per difficulty.

    Query and gallery rows are found by image name (:func:`match_rows`); gallery rows not in
    the ground truth's ``imlist`` are not ranked. Keys: ``map_easy``, ``map_medium``,
    ``map_hard``, ``mp@{k}_{difficulty}``, ``queries_{difficulty}`` (queries with positives), and
    ``map``, ``mp@{k}``, ``queries`` for Medium; values are fractions in [0, 1].
    Ties are ranked by gallery index (see :mod:`bctool.evaluate.search`).
    """
    return _evaluate(query, gallery, gnd, ks)[0]


def evaluate_revisited_per_query(
    query: Embeddings,
    gallery: Embeddings,
    gnd: RevisitedGroundTruth,
    ks: tuple[int, ...] = (1, 5, 10),
) -> tuple[dict[str, float | int], QueryAP]:
    """:func:`evaluate_revisited`'s metrics and the Medium AP of every query with a
    Medium positive (the ``map`` key), named by the ground truth's ``qimlist``, in its order."""
    result, medium_ap, medium_top1 = _evaluate(query, gallery, gnd, ks)
    evaluated = np.flatnonzero(~np.isnan(medium_ap))  # NaN: no positive
    return result, QueryAP(tuple(gnd.query_names[i] for i in evaluated), medium_ap[evaluated],
                           medium_top1[evaluated])


def _means(ap_sum: dict, pr_sum: dict, counted: dict, ks: tuple[int, ...]) -> dict[str, float | int]:
    """mAP and mP@k per difficulty from their sums; Medium's also unsuffixed."""
    result: dict[str, float | int] = {}
    for difficulty in DIFFICULTIES:
        n = counted[difficulty]
        result[f"map_{difficulty}"] = ap_sum[difficulty] / n if n else float("nan")
        for k in ks:
            result[f"mp@{k}_{difficulty}"] = pr_sum[(difficulty, k)] / n if n else float("nan")
        result[f"queries_{difficulty}"] = n
    result["map"] = result["map_medium"]
    for k in ks:
        result[f"mp@{k}"] = result[f"mp@{k}_medium"]
    result["queries"] = counted["medium"]
    return result


def _evaluate(
    query: Embeddings, gallery: Embeddings, gnd: RevisitedGroundTruth, ks: tuple[int, ...]
) -> tuple[dict[str, float | int], np.ndarray, np.ndarray]:
    """The body of :func:`evaluate_revisited`, plus the Medium AP of every ground-truth query."""
    ks = tuple(int(k) for k in ks)
    _check_inputs(query, gallery, ks)
    warn_zero_rows(gallery)
    q_emb = query.normalized_embeddings()[match_rows(query, gnd.query_names, "query")]
    g_rows = match_rows(gallery, gnd.gallery_names, "gallery")
    # In ground-truth order already (as `extract --gnd` writes it): the index reads the file in
    # blocks; otherwise the rows are gathered first.
    in_order = len(g_rows) == len(gallery) and bool(np.array_equal(g_rows, np.arange(len(gallery))))
    g_emb = gallery.embeddings if in_order else gallery.embeddings[g_rows]
    n_gallery = len(g_rows)

    pairs = {}
    for difficulty in DIFFICULTIES:
        ok_sets, junk_sets = difficulty_sets(gnd, difficulty)
        pairs[difficulty] = (_pairs(ok_sets), _pairs(junk_sets))
    ap_sum = dict.fromkeys(DIFFICULTIES, 0.0)
    pr_sum = {(d, k): 0.0 for d in DIFFICULTIES for k in ks}
    counted = dict.fromkeys(DIFFICULTIES, 0)
    medium_ap = np.full(q_emb.shape[0], np.nan, dtype=np.float64)
    medium_top1 = np.zeros(q_emb.shape[0], dtype=bool)

    block_size = max(1, _BLOCK_ELEMENTS // n_gallery)
    for start, _, indices in iter_rankings(q_emb, g_emb, n_gallery, block_size=block_size, normalize=True):
        for difficulty, (ok_pairs, junk_pairs) in pairs.items():
            ok = _block_mask(ok_pairs, start, indices)
            junk = _block_mask(junk_pairs, start, indices)
            n_pos = ok.sum(axis=1)
            has_pos = n_pos > 0
            counted[difficulty] += int(has_pos.sum())
            ap = revisited_ap(ok, junk, n_pos)
            ap_sum[difficulty] += float(np.sum(ap[has_pos]))
            if difficulty == "medium":
                medium_ap[start : start + ap.shape[0]] = ap
                # The first result that is not junk (junk is ignored at every difficulty) is relevant.
                first = np.argmax(~junk, axis=1)
                medium_top1[start : start + ap.shape[0]] = ok[np.arange(ok.shape[0]), first]
            for k, pr in revisited_precision_at_k(ok, junk, n_pos, ks).items():
                pr_sum[(difficulty, k)] += float(np.sum(pr[has_pos]))

    if not any(counted.values()):
        raise DataError(
            f"none of the {len(gnd.query_names)} queries of {gnd.source or 'the ground truth'!r} "
            "has a positive gallery image in any protocol; check that it is a Revisited "
            "Oxford/Paris ground-truth file"
        )
    result = _means(ap_sum, pr_sum, counted, ks)
    result["gallery"] = n_gallery
    logger.info(
        "revisited evaluation: %d queries against %d gallery images, mAP E/M/H %.4f/%.4f/%.4f",
        len(gnd.query_names),
        n_gallery,
        result["map_easy"],
        result["map_medium"],
        result["map_hard"],
    )
    return result, medium_ap, medium_top1
