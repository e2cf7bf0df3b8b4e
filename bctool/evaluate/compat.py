"""Compatibility metrics: update gain, the paper's P scores, the paired bootstrap interval of
M(n,o) - M(o,o), model chains and partial backfill.

Notation (METHOD.md, "Compatibility metrics"): ``M(q, g)`` is the mAP of queries embedded by
model ``q`` against a gallery embedded by model ``g``; ``o`` is the old model, ``n`` the new
one and ``*`` the new model trained independently (the upper bound a compatible model gives up).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.protocols import Protocol
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.plotting import pyplot, save_png

logger = logging.getLogger(__name__)

Evaluate = Callable[[Embeddings, Embeddings], dict[str, Any]]

_PAPER_KEYS = ("m_oo", "m_nn", "m_no", "m_star")
_METRIC_NAMES = {"map": "mAP", "map@100": "mAP@100"}
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
    """Update gain Δ = (M(n,o) - M(o,o)) / (M(*,*) - M(o,o)); None when M(*,*) == M(o,o)."""
    denominator = m_star - m_oo
    if denominator == 0:
        return None
    return (m_no - m_oo) / denominator


def _require_keys(metrics: dict[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if metrics.get(k) is None]
    if missing:
        raise ConfigError(
            f"{where} is missing {', '.join(missing)} (has {', '.join(sorted(metrics)) or 'nothing'}); "
            f"pass all of {', '.join(keys)}"
        )


def paper_scores(per_dataset: list[dict[str, float]]) -> dict[str, float]:
    """The paper's summary over datasets d: P_up, P_comp and their harmonic mean P_1 (0..100).

    Each dict holds ``m_oo``, ``m_nn``, ``m_no`` and ``m_star`` (M(o,o), M(n,n), M(n,o), M(*,*)).
    P_up = 100 σ(mean_d (M_d(n,n) - M_d(*,*)) / M_d(*,*)), P_comp = 100 σ(mean_d Δ_d).
    """
    if not per_dataset:
        raise ConfigError("paper_scores needs at least one dataset's metrics, got an empty list")
    ups, gains = [], []
    for i, metrics in enumerate(per_dataset):
        _require_keys(metrics, _PAPER_KEYS, f"dataset {i}")
        if metrics["m_star"] == 0:
            raise ConfigError(f"dataset {i} has m_star = 0; P_up divides by M(*,*), which must be > 0")
        gain = update_gain(metrics["m_no"], metrics["m_oo"], metrics["m_star"])
        if gain is None:
            raise ConfigError(
                f"dataset {i} has m_star == m_oo ({metrics['m_oo']}); the update gain is undefined "
                "when the independent new model is no better than the old one"
            )
        ups.append((metrics["m_nn"] - metrics["m_star"]) / metrics["m_star"])
        gains.append(gain)
    p_up = 100.0 * _sigmoid(float(np.mean(ups)))
    p_comp = 100.0 * _sigmoid(float(np.mean(gains)))
    return {"p_up": p_up, "p_comp": p_comp, "p_1": _harmonic_mean(p_up, p_comp)}


def check_one_model(query: Embeddings, gallery: Embeddings, role: str) -> None:
    """A query/gallery pair that should come from one model (``role``: old, new, independent)
    must name the same checkpoint (sha256) when both files record one."""
    a, b = query.model.get("sha256"), gallery.model.get("sha256")
    if a and b and a != b:
        raise EmbeddingsError(
            f"--{role}-query was made by model {a[:12]} ({query.model.get('path', '?')}) but "
            f"--{role}-gallery by model {b[:12]} ({gallery.model.get('path', '?')}); both files of "
            f"the {role} pair must be extracted with the {role} model"
        )


def compatibility_report(metrics: dict[str, float]) -> dict[str, Any]:
    """Single-dataset report: the inputs, ``compatible`` (M(n,o) > M(o,o)) and, given ``m_star``,
    ``update_gain``, ``p_up``, ``p_comp`` and ``p_1``.
    """
    _require_keys(metrics, ("m_oo", "m_nn", "m_no"), "compatibility_report's metrics")
    report: dict[str, Any] = {k: metrics[k] for k in ("m_oo", "m_nn", "m_no")}
    report["compatible"] = bool(metrics["m_no"] > metrics["m_oo"])
    if metrics.get("m_star") is not None:
        report["m_star"] = metrics["m_star"]
        report["update_gain"] = update_gain(metrics["m_no"], metrics["m_oo"], metrics["m_star"])
        report.update(paper_scores([report]))
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
    row_of = {image_id: i for i, image_id in enumerate(new.ids)}
    old_rows = np.array([i for i, image_id in enumerate(old.ids) if image_id in row_of], dtype=np.int64)
    new_rows = np.array([row_of[old.ids[i]] for i in old_rows], dtype=np.int64)
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


def delta_interval(
    old_query: Embeddings,
    old_gallery: Embeddings,
    new_query: Embeddings,
    protocol: Protocol,
    n: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """``delta`` = M(n,o) - M(o,o) over paired queries, with a paired bootstrap interval.

    Evaluates new and old queries against the old gallery with ``protocol.per_query`` (its
    headline AP) and returns :func:`paired_delta`'s keys.
    """
    _check_bootstrap(n, level)  # before the evaluations, which may take long
    _, old_ap = protocol.per_query(old_query, old_gallery)
    _, new_ap = protocol.per_query(new_query, old_gallery)
    return paired_delta(old_ap, new_ap, n, seed, level)


def compatibility_evaluation(
    old: tuple[Embeddings, Embeddings],
    new: tuple[Embeddings, Embeddings],
    protocol: Protocol,
    independent: tuple[Embeddings, Embeddings] | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """The whole compatibility report of (query, gallery) pairs of the old, new and optionally
    independent models.

    Returns ``{"metric" (the protocol's headline key), **compatibility_report, **paired_delta,
    "results"}``, ``results`` holding every pair's metrics (``old/old``, ``new/new``,
    ``new/old``, ``ind/ind``). ``bootstrap`` resamples with ``seed`` give the interval of delta.
    """
    _check_bootstrap(bootstrap, level)
    pairs = {"old": old, "new": new, **({"independent": independent} if independent is not None else {})}
    for role, (query, gallery) in pairs.items():
        check_one_model(query, gallery, role)
    results: dict[str, dict[str, Any]] = {}
    results["old/old"], old_ap = protocol.per_query(old[0], old[1])
    results["new/new"] = protocol.evaluate(new[0], new[1])
    results["new/old"], new_ap = protocol.per_query(new[0], old[1])
    if independent is not None:
        results["ind/ind"] = protocol.evaluate(independent[0], independent[1])
    key = protocol.headline
    report = compatibility_report({
        "m_oo": results["old/old"][key], "m_nn": results["new/new"][key], "m_no": results["new/old"][key],
        "m_star": results["ind/ind"][key] if independent is not None else None,
    })
    interval = paired_delta(old_ap, new_ap, bootstrap, seed, level)
    return {"metric": key, **report, **interval, "results": results}


def chain_matrix(
    models: Sequence[tuple[Embeddings, Embeddings]],
    evaluate: Evaluate = evaluate_retrieval,
    key: str = "map",
) -> np.ndarray:
    """T x T matrix M with M[i][j] = metric ``key`` (by default mAP) of model i's queries
    against model j's gallery, as ``evaluate`` reports it.

    ``models[i]`` is the (query, gallery) pair embedded by model version i+1 (v1..vT, oldest first).
    """
    if not models:
        raise ConfigError("chain_matrix needs at least one (query, gallery) pair, got none")
    t = len(models)
    matrix = np.zeros((t, t), dtype=np.float64)
    for i, (query, _) in enumerate(models):
        for j, (_, gallery) in enumerate(models):
            matrix[i, j] = float(evaluate(query, gallery)[key])
            logger.info("chain M[%d][%d] = %.4f", i + 1, j + 1, matrix[i, j])
    return matrix


def chain_scores(matrix: np.ndarray) -> dict[str, float | None]:
    """AC and BC of a model chain's T x T matrix (see :func:`chain_matrix`).

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


def _align_rows(old: Embeddings, new: Embeddings) -> np.ndarray:
    """Index into ``new``'s rows giving, for each of ``old``'s rows, the row with the same id."""
    old_count, new_count = Counter(old.ids), Counter(new.ids)
    if old_count != new_count:
        only_old = sorted((old_count - new_count).elements())
        only_new = sorted((new_count - old_count).elements())
        raise EmbeddingsError(
            f"the old and new galleries must hold the same ids: {len(only_old)} ids are only in the "
            f"old gallery ({shown(only_old) or 'none'}) and {len(only_new)} only in the new one "
            f"({shown(only_new) or 'none'}); embed the same gallery images with both models"
        )
    # Stable sorts pair repeated ids in their order of appearance.
    old_order = np.argsort(np.array(old.ids, dtype=object), kind="stable")
    new_order = np.argsort(np.array(new.ids, dtype=object), kind="stable")
    aligned = np.empty(len(old), dtype=np.int64)
    aligned[old_order] = new_order
    return aligned


def partial_backfill(
    old_gallery: Embeddings, new_gallery: Embeddings, fraction: float, seed: int
) -> Embeddings:
    """The old gallery with round(fraction * N) random rows replaced by the new model's rows.

    Rows are matched by id, so ``new_gallery`` may list them in any order; the result keeps the
    old gallery's order, ids and labels. One permutation from ``numpy.random.default_rng(seed)``
    picks the rows, and a fraction takes its prefix, so for one seed the rows re-embedded at
    ``f`` are a subset of those at any larger fraction.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"backfill fraction must lie in [0, 1], got {fraction}")
    if len(old_gallery) != len(new_gallery):
        raise EmbeddingsError(
            f"the old gallery has {len(old_gallery)} rows but the new one has {len(new_gallery)}; "
            "embed the same gallery images with both models"
        )
    aligned = _align_rows(old_gallery, new_gallery)
    if old_gallery.dim != new_gallery.dim:
        raise EmbeddingsError(
            f"the old gallery has dimension {old_gallery.dim} but the new gallery has dimension "
            f"{new_gallery.dim}; a mixed gallery needs models with the same embedding dimension"
        )
    n = len(old_gallery)
    count = int(round(fraction * n))
    chosen = np.random.default_rng(seed).permutation(n)[:count]
    rows = np.array(old_gallery.embeddings, dtype=np.float32, copy=True)
    new_rows = np.asarray(new_gallery.embeddings, dtype=np.float32)
    if old_gallery.normalized != new_gallery.normalized:
        # One gallery stores unit rows and the other raw ones: mix like with like.
        rows = old_gallery.normalized_embeddings()
        new_rows = new_gallery.normalized_embeddings()
    rows[chosen] = new_rows[aligned[chosen]]
    return Embeddings(
        embeddings=rows,
        labels=np.array(old_gallery.labels, copy=True),
        ids=list(old_gallery.ids),
        label_names=list(old_gallery.label_names),
        model={"backfill": fraction, "old": old_gallery.model, "new": new_gallery.model},
        normalized=old_gallery.normalized or new_gallery.normalized,
        root=old_gallery.root,
    )


def backfill_curve(
    query: Embeddings,
    old_gallery: Embeddings,
    new_gallery: Embeddings,
    fractions: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    evaluate: Evaluate = evaluate_retrieval,
    key: str = "map",
) -> list[dict[str, Any]]:
    """Retrieval metrics of ``query`` against the partially backfilled gallery, per fraction.

    Each entry is ``{"fraction": f, "map": ..., ...}`` with every metric ``evaluate`` returns;
    ``key`` is the headline metric it logs (``map@100`` for GLDv2).
    """
    curve = []
    for fraction in fractions:
        gallery = partial_backfill(old_gallery, new_gallery, float(fraction), seed)
        result = evaluate(query, gallery)
        logger.info("backfill %.0f%%: %s %.4f", 100 * fraction, key, result[key])
        curve.append({"fraction": float(fraction), **result})
    return curve


def plot_backfill(
    curve: Sequence[dict[str, Any]],
    out_path: str | os.PathLike[str],
    old_map: float | None = None,
    new_map: float | None = None,
    key: str = "map",
) -> None:
    """Draw metric ``key`` (by default mAP) against the backfilled fraction as a PNG at
    ``out_path`` (needs matplotlib).

    ``old_map`` and ``new_map`` (e.g. M(o,o) and M(n,n)) are drawn as horizontal references.
    """
    plt = pyplot("plotting the backfill curve")
    if not curve:
        raise ConfigError("the backfill curve is empty; evaluate at least one fraction before plotting")
    x = [100.0 * point["fraction"] for point in curve]
    y = [100.0 * point[key] for point in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, y, marker="o", label="new queries vs mixed gallery")
    if old_map is not None:
        ax.axhline(100.0 * old_map, color="grey", linestyle="--", label="old / old")
    if new_map is not None:
        ax.axhline(100.0 * new_map, color="black", linestyle=":", label="new / new")
    ax.set_xlabel("gallery re-embedded with the new model (%)")
    ax.set_ylabel(f"{_METRIC_NAMES.get(key, key)} (%)")
    ax.set_xlim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, out_path)
