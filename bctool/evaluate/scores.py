"""Compatibility scores, pure functions of numbers: the update gain, the paper's P scores, the
verdict of one compatibility report, the paired bootstrap interval of M(n,o) - M(o,o) and a
model chain's AC and BC.

Notation (METHOD.md, "Compatibility metrics"): ``M(q, g)`` is the mAP of queries embedded by
model ``q`` against a gallery embedded by model ``g``; ``o`` is the old model, ``n`` the new
one and ``*`` the new model trained independently (the upper bound a compatible model gives up).
Nothing here reads embeddings or evaluates a protocol (that is :mod:`bctool.evaluate.reports`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from bctool.embeddings import pair_rows
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.evaluate.metrics import QueryAP

logger = logging.getLogger(__name__)

_PAPER_KEYS = ("m_oo", "m_nn", "m_no", "m_star")
DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
# Most (resamples x queries) bootstrap indices drawn at once.
_BOOTSTRAP_ELEMENTS = 1 << 22


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # avoids overflow of exp(-x) for very negative x
    return z / (1.0 + z)


def _harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def update_gain(m_no: float, m_oo: float, m_star: float) -> float | None:
    """Update gain Δ = (M(n,o) - M(o,o)) / (M(*,*) - M(o,o)): the share of the independent new
    model's improvement that the compatible one keeps across models. None when M(*,*) <= M(o,o)
    (or a value is NaN): with no improvement to share, the ratio means nothing (a negative over
    a negative would read as a gain)."""
    if not m_star > m_oo:
        return None
    return (m_no - m_oo) / (m_star - m_oo)


def undefined_gain_reason(m_oo: float, m_star: float) -> str | None:
    """Why :func:`update_gain` is None for these scores, for reports and warnings; None when it
    is defined."""
    if m_star > m_oo:
        return None
    return (f"the independent model scores M(*,*)={m_star:.4f}, not above M(o,o)={m_oo:.4f}: the update gain "
            "is undefined; compare against an independent model that improves on the old one")


def _require_keys(metrics: dict[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if metrics.get(k) is None]
    if missing:
        raise ConfigError(
            f"{where} is missing {', '.join(missing)} (has {', '.join(sorted(metrics)) or 'nothing'}); "
            f"pass all of {', '.join(keys)}"
        )


def paper_scores(per_dataset: list[dict[str, float]]) -> dict[str, float | None]:
    """The paper's summary over datasets d: P_up, P_comp and their harmonic mean P_1 (0..100).

    Each dict holds ``m_oo``, ``m_nn``, ``m_no`` and ``m_star`` (M(o,o), M(n,n), M(n,o), M(*,*)).
    P_up = 100 σ(mean_d (M_d(n,n) - M_d(*,*)) / M_d(*,*)), P_comp = 100 σ(mean_d Δ_d).
    Where Δ_d is undefined in any dataset (M_d(*,*) <= M_d(o,o), :func:`update_gain`), the mean
    over the datasets is too: ``p_comp`` and ``p_1`` are None (a warning names the datasets);
    leaving the dataset out would change what the mean is over.
    """
    if not per_dataset:
        raise ConfigError("paper_scores needs at least one dataset's metrics, got an empty list")
    ups, gains, undefined = [], [], []
    for i, metrics in enumerate(per_dataset):
        _require_keys(metrics, _PAPER_KEYS, f"dataset {i}")
        if metrics["m_star"] == 0:
            raise ConfigError(f"dataset {i} has m_star = 0; P_up divides by M(*,*), which must be > 0")
        ups.append((metrics["m_nn"] - metrics["m_star"]) / metrics["m_star"])
        gain = update_gain(metrics["m_no"], metrics["m_oo"], metrics["m_star"])
        if gain is None:
            reason = undefined_gain_reason(metrics["m_oo"], metrics["m_star"]) or "the update gain is undefined"
            undefined.append(f"dataset {i}: {reason}" if len(per_dataset) > 1 else reason)
        else:
            gains.append(gain)
    p_up = 100.0 * _sigmoid(float(np.mean(ups)))
    if undefined:
        logger.warning("P_comp and P_1 are undefined (null): %s", "; ".join(undefined))
        return {"p_up": p_up, "p_comp": None, "p_1": None}
    p_comp = 100.0 * _sigmoid(float(np.mean(gains)))
    return {"p_up": p_up, "p_comp": p_comp, "p_1": _harmonic_mean(p_up, p_comp)}


def compatibility_verdict(metrics: dict[str, float]) -> dict[str, Any]:
    """Single-dataset report: the inputs, ``compatible`` (M(n,o) > M(o,o)) and, given ``m_star``,
    ``update_gain``, ``p_up``, ``p_comp`` and ``p_1``.

    Where M(*,*) <= M(o,o), ``update_gain``, ``p_comp`` and ``p_1`` are None and ``undefined``
    maps each of them to the reason (:func:`undefined_gain_reason`).
    """
    _require_keys(metrics, ("m_oo", "m_nn", "m_no"), "compatibility_verdict's metrics")
    report: dict[str, Any] = {k: metrics[k] for k in ("m_oo", "m_nn", "m_no")}
    report["compatible"] = bool(metrics["m_no"] > metrics["m_oo"])
    if metrics.get("m_star") is not None:
        report["m_star"] = metrics["m_star"]
        report["update_gain"] = update_gain(metrics["m_no"], metrics["m_oo"], metrics["m_star"])
        report.update(paper_scores([report]))
        reason = undefined_gain_reason(metrics["m_oo"], metrics["m_star"])
        if reason is not None:
            report["undefined"] = {key: reason for key in ("update_gain", "p_comp", "p_1")}
    return report


def _check_bootstrap(n: int, level: float) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(
            f"the number of bootstrap resamples must be an integer >= 0 (0 turns the interval "
            f"off), got {n!r}"
        )
    if not 0.0 < level < 1.0:  # also refuses NaN
        raise ConfigError(
            f"the bootstrap interval's level must lie strictly between 0 and 1 (such as 0.95), "
            f"got {level!r}"
        )


def bootstrap_means(diff: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Means of ``n`` resamples of ``diff`` drawn with replacement, ``(n,)`` float64.

    Resample ``r`` is ``diff[idx_r]`` with ``idx_r`` the ``r``-th draw of
    ``rng.integers(0, len(diff), size=len(diff))`` from one ``numpy.random.default_rng(seed)``;
    the draws are made many resamples at a time (a generator's stream does not depend on how
    it is split into calls), a bounded block of indices per call.
    """
    values = np.asarray(diff, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(
            f"the bootstrap needs a non-empty 1-D array of per-query values, got shape {values.shape}"
        )
    _check_bootstrap(n, DEFAULT_LEVEL)
    rng = np.random.default_rng(seed)
    size = values.size
    means = np.empty(int(n), dtype=np.float64)
    per_block = max(1, _BOOTSTRAP_ELEMENTS // size)
    for start in range(0, int(n), per_block):
        count = min(per_block, int(n) - start)
        means[start : start + count] = values[rng.integers(0, size, size=(count, size))].mean(axis=1)
    return means


def bootstrap_interval(
    new: np.ndarray, old: np.ndarray, n: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = DEFAULT_LEVEL
) -> tuple[float, float]:
    """Paired percentile bootstrap interval at ``level`` of ``mean(new - old)``.

    ``new[i]`` and ``old[i]`` belong to one query; each resample draws queries with replacement
    and keeps both values of a drawn query (see :func:`bootstrap_means`). The interval runs from
    the ``(1 - level) / 2`` to the ``(1 + level) / 2`` quantile of the resampled means.
    """
    _check_bootstrap(n, level)
    if n == 0:
        raise ConfigError("a bootstrap interval needs at least 1 resample, got 0")
    a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(
            f"new and old must be 1-D arrays of one value per query, paired, got shapes {a.shape} "
            f"and {b.shape}"
        )
    low, high = np.quantile(bootstrap_means(a - b, n, seed), [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _paired_rows(old: QueryAP, new: QueryAP) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``old`` and ``new`` holding the same query ids (those in both, in old's order)."""
    for name, scores in (("old", old), ("new", new)):
        if len(set(scores.ids)) != len(scores.ids):
            twice = sorted(i for i, c in Counter(scores.ids).items() if c > 1)
            raise EmbeddingsError(
                f"the {name} queries list {len(twice)} ids more than once ({shown(twice)}); each "
                "query must appear once to be paired with the other model's"
            )
    old_rows, new_rows = pair_rows(old.ids, new.ids, ("the old queries", "the new queries"))
    if old_rows.size == 0:
        raise EmbeddingsError(
            f"the old and new models share no evaluated query: {len(old)} old queries "
            f"({shown(old.ids) or 'none'}) and {len(new)} new ones ({shown(new.ids) or 'none'}); "
            "embed the same query images (same list, same ids) with both models"
        )
    if old_rows.size != len(old) or new_rows.size != len(new):
        logger.warning(
            "the old and new models evaluate different queries (%d only old, %d only new); "
            "delta M(n,o) - M(o,o) uses the %d they share",
            len(old) - old_rows.size,
            len(new) - new_rows.size,
            old_rows.size,
        )
    return old_rows, new_rows


def paired_delta(
    old: QueryAP,
    new: QueryAP,
    n: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """``delta`` = mean over paired queries of new AP - old AP, and its bootstrap interval.

    Queries are paired by id; if the two lists differ, their intersection is used (logged).
    Returns ``{"delta", "delta_low", "delta_high", "bootstrap": n, "compatible_significant"
    (delta_low > 0)}``, or only ``{"delta"}`` when ``n`` is 0.
    """
    _check_bootstrap(n, level)
    old_rows, new_rows = _paired_rows(old, new)
    new_ap = np.asarray(new.ap, dtype=np.float64)[new_rows]
    old_ap = np.asarray(old.ap, dtype=np.float64)[old_rows]
    delta = float(np.mean(new_ap - old_ap))
    if n == 0:
        logger.info("delta M(n,o) - M(o,o) = %.4f over %d queries (no bootstrap)", delta, old_rows.size)
        return {"delta": delta}
    low, high = bootstrap_interval(new_ap, old_ap, n, seed, level)
    logger.info(
        "delta M(n,o) - M(o,o) = %.4f, %g%% interval [%.4f, %.4f] over %d queries, %d resamples",
        delta, 100 * level, low, high, old_rows.size, n,
    )
    return {"delta": delta, "delta_low": low, "delta_high": high, "bootstrap": int(n),
            "compatible_significant": bool(low > 0)}


def chain_scores(matrix: np.ndarray) -> dict[str, float | None]:
    """AC and BC of a model chain's T x T matrix (:func:`bctool.evaluate.reports.chain_matrix`).

    AC = share of pairs i > j with M[i][j] > M[j][j] (newer queries beat the older gallery's own
    model). BC = mean over i = 1..T-1 of (M[T][i] - M[i][i]), T the newest model: the term i = T is
    always 0, so including it would only shrink BC towards 0 as a function of T. Both are None
    for a chain of one model.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ConfigError(f"chain_scores needs a non-empty square T x T matrix, got shape {m.shape}")
    t = m.shape[0]
    if t == 1:
        return {"ac": None, "bc": None}
    rows, cols = np.tril_indices(t, k=-1)
    ac = float(np.mean(m[rows, cols] > m[cols, cols]))
    bc = float(np.mean(m[t - 1, : t - 1] - np.diag(m)[: t - 1]))
    return {"ac": ac, "bc": bc}


def flip_rates(old: QueryAP, new: QueryAP, n: int = DEFAULT_BOOTSTRAP, seed: int = 0,
               level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """Negative and positive flips at rank 1 between two evaluations of the same queries
    (paired by id; Yan et al., "Positive-Congruent Training", CVPR 2021).

    ``nfr``: the share of the queries whose first result was relevant in ``old`` and is not in
    ``new``; ``pfr`` the reverse; both over every shared query, with their counts and, for ``n``
    resamples, the paired bootstrap interval of ``nfr`` (``nfr_low``, ``nfr_high``). Empty when a
    protocol does not report rank-1 hits.
    """
    _check_bootstrap(n, level)
    if old.top1 is None or new.top1 is None:
        return {}
    old_rows, new_rows = _paired_rows(old, new)
    before = np.asarray(old.top1, dtype=bool)[old_rows]
    after = np.asarray(new.top1, dtype=bool)[new_rows]
    negative, positive = before & ~after, ~before & after
    out: dict[str, Any] = {"nfr": float(negative.mean()), "nfr_count": int(negative.sum()),
                           "pfr": float(positive.mean()), "pfr_count": int(positive.sum()),
                           "queries": int(before.size)}
    if n:
        low, high = bootstrap_interval(negative.astype(np.float64), np.zeros(negative.size), n, seed, level)
        out.update(nfr_low=low, nfr_high=high)
    return out


def class_changes(labels: dict[str, str | None], old: QueryAP, new: QueryAP, limit: int = 5) -> list[dict[str, Any]]:
    """The classes whose mean AP fell most from ``old`` to ``new`` (paired queries; ``labels``
    maps a query id to its class name): ``[{"class", "old", "new", "queries"}]``, the largest
    falls first, at most ``limit``, only classes that fell."""
    old_rows, new_rows = _paired_rows(old, new)
    sums: dict[str, list[float]] = {}
    for i, j in zip(old_rows, new_rows):
        name = labels.get(old.ids[i])
        if name is None:
            continue
        entry = sums.setdefault(name, [0.0, 0.0, 0])
        entry[0] += float(old.ap[i])
        entry[1] += float(new.ap[j])
        entry[2] += 1
    rows = [{"class": name, "old": a / c, "new": b / c, "queries": c} for name, (a, b, c) in sums.items()]
    fell = sorted((r for r in rows if r["new"] < r["old"]), key=lambda r: (r["new"] - r["old"], r["class"]))
    return fell[:limit]
