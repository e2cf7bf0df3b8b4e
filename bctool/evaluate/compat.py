"""Compatibility metrics: update gain, the paper's P scores, model chains and partial backfill.

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
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.plotting import pyplot, save_png

logger = logging.getLogger(__name__)

Evaluate = Callable[[Embeddings, Embeddings], dict[str, Any]]

_PAPER_KEYS = ("m_oo", "m_nn", "m_no", "m_star")


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


def chain_matrix(
    models: Sequence[tuple[Embeddings, Embeddings]],
    evaluate: Evaluate = evaluate_retrieval,
) -> np.ndarray:
    """T x T matrix M with M[i][j] = mAP of model i's queries against model j's gallery.

    ``models[i]`` is the (query, gallery) pair embedded by model version i+1 (v1..vT, oldest first).
    """
    if not models:
        raise ConfigError("chain_matrix needs at least one (query, gallery) pair, got none")
    t = len(models)
    matrix = np.zeros((t, t), dtype=np.float64)
    for i, (query, _) in enumerate(models):
        for j, (_, gallery) in enumerate(models):
            matrix[i, j] = float(evaluate(query, gallery)["map"])
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


def _shown(ids: Iterable[str], limit: int = 5) -> str:
    ids = list(ids)
    text = ", ".join(repr(i) for i in ids[:limit])
    return text + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _align_rows(old: Embeddings, new: Embeddings) -> np.ndarray:
    """Index into ``new``'s rows giving, for each of ``old``'s rows, the row with the same id."""
    old_count, new_count = Counter(old.ids), Counter(new.ids)
    if old_count != new_count:
        only_old = sorted((old_count - new_count).elements())
        only_new = sorted((new_count - old_count).elements())
        raise EmbeddingsError(
            f"the old and new galleries must hold the same ids: {len(only_old)} ids are only in the "
            f"old gallery ({_shown(only_old) or 'none'}) and {len(only_new)} only in the new one "
            f"({_shown(only_new) or 'none'}); embed the same gallery images with both models"
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
) -> list[dict[str, Any]]:
    """Retrieval metrics of ``query`` against the partially backfilled gallery, per fraction.

    Each entry is ``{"fraction": f, "map": ..., ...}`` with every metric ``evaluate`` returns.
    """
    curve = []
    for fraction in fractions:
        gallery = partial_backfill(old_gallery, new_gallery, float(fraction), seed)
        result = evaluate(query, gallery)
        logger.info("backfill %.0f%%: mAP %.4f", 100 * fraction, result["map"])
        curve.append({"fraction": float(fraction), **result})
    return curve


def plot_backfill(
    curve: Sequence[dict[str, Any]],
    out_path: str | os.PathLike[str],
    old_map: float | None = None,
    new_map: float | None = None,
) -> None:
    """Draw mAP against the backfilled fraction as a PNG at ``out_path`` (needs matplotlib).

    ``old_map`` and ``new_map`` (e.g. M(o,o) and M(n,n)) are drawn as horizontal references.
    """
    plt = pyplot("plotting the backfill curve")
    if not curve:
        raise ConfigError("the backfill curve is empty; evaluate at least one fraction before plotting")
    x = [100.0 * point["fraction"] for point in curve]
    y = [100.0 * point["map"] for point in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, y, marker="o", label="new queries vs mixed gallery")
    if old_map is not None:
        ax.axhline(100.0 * old_map, color="grey", linestyle="--", label="old / old")
    if new_map is not None:
        ax.axhline(100.0 * new_map, color="black", linestyle=":", label="new / new")
    ax.set_xlabel("gallery re-embedded with the new model (%)")
    ax.set_ylabel("mAP (%)")
    ax.set_xlim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, out_path)
