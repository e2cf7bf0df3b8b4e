"""Whole reports, as ``bctool evaluate`` prints them: which pairs are evaluated, how the results
combine into one JSON-ready dict, and how each report reads as a table for people.

Every report scores its (query, gallery) pairs with one :class:`Protocol` and compares its
headline metric (``report["metric"]``: ``map``, or ``map@100`` for GLDv2). The compatibility
report itself is :func:`bctool.evaluate.compat.compatibility_evaluation`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bctool.embeddings import Embeddings
from bctool.evaluate.compat import backfill_curve, chain_matrix, chain_scores, plot_backfill
from bctool.evaluate.protocols import Protocol, Table


def chain_report(models: Sequence[tuple[Embeddings, Embeddings]], protocol: Protocol) -> dict[str, Any]:
    """Every model version's queries against every version's gallery.

    ``models[i]`` is the (query, gallery) pair of version i+1, oldest first. Returns
    ``{"metric", "matrix" (M[i][j], queries of i against the gallery of j), "ac", "bc"}``.
    """
    key = protocol.headline
    matrix = chain_matrix(models, evaluate=protocol.evaluate, key=key)
    return {"metric": key, "matrix": matrix.tolist(), **chain_scores(matrix)}


def backfill_report(
    query: Embeddings,
    old_gallery: Embeddings,
    new_gallery: Embeddings,
    protocol: Protocol,
    fractions: Iterable[float],
    seed: int = 0,
    old_query: Embeddings | None = None,
    plot: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The new model's ``query`` against the old gallery with each fraction re-embedded by the
    new model (:func:`bctool.evaluate.compat.backfill_curve`), and two reference levels.

    Returns ``{"metric", "seed", "m_oo" (``old_query`` against the old gallery, None without
    it), "m_nn" (``query`` against the new gallery), "curve", "plot"}``; ``plot`` names a PNG
    to draw the curve to (needs matplotlib), None for no plot.
    """
    key = protocol.headline
    curve = backfill_curve(query, old_gallery, new_gallery, fractions, seed=seed, evaluate=protocol.evaluate, key=key)
    # Reference lines: the old system as it is (old queries, old gallery) and the full upgrade.
    m_oo = protocol.evaluate(old_query, old_gallery)[key] if old_query is not None else None
    m_nn = protocol.evaluate(query, new_gallery)[key]
    if plot is not None:
        plot_backfill(curve, plot, old_map=m_oo, new_map=m_nn, key=key)
    return {"metric": key, "seed": seed, "m_oo": m_oo, "m_nn": m_nn, "curve": curve,
            "plot": str(plot) if plot is not None else None}


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
