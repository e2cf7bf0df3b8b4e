"""Whole reports, as ``bctool evaluate`` prints them, one library function per mode: which pairs
are evaluated, how the results combine into one JSON-ready dict, and how each report reads as a
table for people.

* :func:`compatibility_report`: old, new (and independent) models' pairs, with
  :class:`CompatibilityOptions` (bootstrap resamples, seed, level);
* :func:`chain_report`: every model version against every other;
* :func:`backfill_report`: the partly re-embedded gallery, with :class:`BackfillOptions`.

Every report scores its (query, gallery) pairs with one :class:`Protocol` and compares its
headline metric (``report["metric"]``: ``map``, or ``map@100`` for GLDv2). The numbers are
combined by the pure functions of :mod:`bctool.evaluate.scores`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bctool.backfill.curve import Headline, backfill_curve
from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate.inputs import check_ids_once, warn_zero_rows
from bctool.evaluate.protocols import Evaluator, Protocol, Table
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.evaluate.scores import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_LEVEL,
    _check_bootstrap,
    chain_scores,
    class_changes,
    compatibility_verdict,
    flip_rates,
    paired_delta,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompatibilityOptions:
    """How a compatibility report measures the uncertainty of delta = M(n,o) - M(o,o)."""

    bootstrap: int = DEFAULT_BOOTSTRAP  # paired resamples of the queries; 0 turns the interval off
    seed: int = 0
    level: float = DEFAULT_LEVEL


@dataclass(frozen=True)
class BackfillOptions:
    """Which shares of the gallery a backfill report re-embeds, in which random order, and a plot."""

    fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    plot: str | os.PathLike[str] | None = None  # PNG, SVG or PDF by suffix; None: no plot
    order: tuple[str, ...] | None = None  # gallery ids in the order re-embedded (a plan); None: random by seed
    scoring: str = "raw"  # raw, or calibrated (bctool.backfill.curve.backfill_curve)


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


def _check_pair(query: Embeddings, gallery: Embeddings, role: str) -> None:
    """Before any evaluation, the checks every evaluation makes, with the pair's ``role`` (old,
    new, independent, v2, ...) in the message: ids given twice are refused, all-zero gallery
    rows warned about. The evaluations then find each file checked."""
    check_ids_once(query, f"the {role} queries")
    check_ids_once(gallery, f"the {role} gallery")
    warn_zero_rows(gallery, f"{role} gallery")


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


def compatibility_report(
    old: tuple[Embeddings, Embeddings],
    new: tuple[Embeddings, Embeddings],
    protocol: Protocol,
    independent: tuple[Embeddings, Embeddings] | None = None,
    options: CompatibilityOptions = CompatibilityOptions(),
) -> dict[str, Any]:
    """The whole compatibility report of (query, gallery) pairs of the old, new and optionally
    independent models.

    Returns ``{"metric" (the protocol's headline key), **compatibility_verdict, **paired_delta,
    "flips", "regressed_classes", "results"}``: ``flips`` holds :func:`flip_rates` of new/old
    and of new/new against old/old, ``regressed_classes`` the classes whose mean AP fell most in
    each (:func:`class_changes`), ``results`` every pair's metrics (``old/old``, ``new/new``,
    ``new/old``, ``ind/ind``). ``options.bootstrap`` resamples with ``options.seed`` give the
    interval of delta.
    """
    bootstrap, seed, level = options.bootstrap, options.seed, options.level
    _check_bootstrap(bootstrap, level)
    pairs = {"old": old, "new": new, **({"independent": independent} if independent is not None else {})}
    for role, (query, gallery) in pairs.items():
        check_one_model(query, gallery, role)
        _check_pair(query, gallery, role)
    results: dict[str, dict[str, Any]] = {}
    results["old/old"], old_ap = protocol.per_query(old[0], old[1])
    results["new/new"], self_ap = protocol.per_query(new[0], new[1])
    results["new/old"], new_ap = protocol.per_query(new[0], old[1])
    if independent is not None:
        results["ind/ind"] = protocol.evaluate(independent[0], independent[1])
    key = protocol.headline
    report = compatibility_verdict({
        "m_oo": results["old/old"][key], "m_nn": results["new/new"][key], "m_no": results["new/old"][key],
        "m_star": results["ind/ind"][key] if independent is not None else None,
    })
    interval = paired_delta(old_ap, new_ap, bootstrap, seed, level)
    labels = dict(zip(old[0].ids, old[0].label_strings()))
    flips = {pair: flip_rates(old_ap, ap, bootstrap, seed, level) for pair, ap in (("new/old", new_ap), ("new/new", self_ap))}
    classes = {pair: class_changes(labels, old_ap, ap) for pair, ap in (("new/old", new_ap), ("new/new", self_ap))}
    return {"metric": key, **report, **interval, "flips": flips, "regressed_classes": classes, "results": results}


def chain_matrix(
    models: Sequence[tuple[Embeddings, Embeddings]],
    evaluate: Evaluator = evaluate_retrieval,
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


def chain_report(models: Sequence[tuple[Embeddings, Embeddings]], protocol: Protocol) -> dict[str, Any]:
    """Every model version's queries against every version's gallery.

    ``models[i]`` is the (query, gallery) pair of version i+1, oldest first. Returns
    ``{"metric", "matrix" (M[i][j], queries of i against the gallery of j), "ac", "bc"}``.
    """
    key = protocol.headline
    for i, (query, gallery) in enumerate(models):
        _check_pair(query, gallery, f"v{i + 1}")
    matrix = chain_matrix(models, evaluate=protocol.evaluate, key=key)
    return {"metric": key, "matrix": matrix.tolist(), **chain_scores(matrix)}


def backfill_report(
    query: Embeddings,
    old_gallery: Embeddings,
    new_gallery: Embeddings,
    protocol: Protocol,
    options: BackfillOptions = BackfillOptions(),
    old_query: Embeddings | None = None,
) -> dict[str, Any]:
    """The new model's ``query`` against the old gallery with each fraction re-embedded by the
    new model (:func:`bctool.backfill.curve.backfill_curve`), and two reference levels.

    Returns ``{"metric", "seed", "m_oo" (``old_query`` against the old gallery, None without
    it), "m_nn" (``query`` against the new gallery), "curve", "plot"}``; ``options.plot`` names
    a file to draw the curve to (needs matplotlib), None for no plot.
    """
    fractions, seed, plot = options.fractions, options.seed, options.plot
    key = protocol.headline
    curve = backfill_curve(query, old_gallery, new_gallery, fractions, seed=seed, order=options.order,
                           scoring=options.scoring, headline=Headline(protocol.evaluate, key))
    # Reference lines: the old system as it is (old queries, old gallery) and the full upgrade.
    m_oo = protocol.evaluate(old_query, old_gallery)[key] if old_query is not None else None
    m_nn = protocol.evaluate(query, new_gallery)[key]
    if plot is not None:
        from bctool.utils.plotting import plot_backfill

        plot_backfill(curve, plot, old_map=m_oo, new_map=m_nn, key=key)
    area = _area(curve, key)
    return {"metric": key, "seed": seed, "order": "plan" if options.order is not None else "random",
            "scoring": options.scoring, "m_oo": m_oo, "m_nn": m_nn, "curve": curve, "area": area,
            "plot": str(plot) if plot is not None else None}


def _area(curve: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The mean of the headline metric over the re-embedded share (trapezoids; the curve's area
    over [first, last] fraction, divided by that span); None for fewer than two fractions."""
    points = sorted((float(p["fraction"]), float(p[key])) for p in curve)
    span = points[-1][0] - points[0][0] if points else 0.0
    if len(points) < 2 or span <= 0:
        return None
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:])) / span


def compatibility_table(report: Mapping[str, Any]) -> Table:
    """The headline metric of every pair of a compatibility report (old/old, new/new, ...)."""
    key = report["metric"]
    rows = {pair: {key: result[key]} for pair, result in report["results"].items()}
    return Table(f"compatibility ({key})", rows, (key,))


def chain_table(report: Mapping[str, Any]) -> Table:
    """A chain report's matrix: one row per query version, one column per gallery version."""
    matrix = report["matrix"]
    rows = {f"v{i + 1} queries": {f"v{j + 1}": float(v) for j, v in enumerate(row)} for i, row in enumerate(matrix)}
    columns = tuple(f"v{j + 1}" for j in range(len(matrix)))
    return Table(f"M[i][j] ({report['metric']}, gallery by column)", rows, columns)


def backfill_table(report: Mapping[str, Any]) -> Table:
    """A backfill report's curve: the headline metric per re-embedded fraction."""
    key = report["metric"]
    rows = {f"{point['fraction']:.2f}": {key: point[key]} for point in report["curve"]}
    return Table(f"partial backfill ({key})", rows, (key,))
