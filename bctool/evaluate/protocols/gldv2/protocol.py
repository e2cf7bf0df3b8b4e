"""The registry entry ``gldv2``: Google Landmarks v2 retrieval (``--solution``), mAP@100 for Public
and Private."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bctool.evaluate.protocols.base import (
    Evaluator,
    PerQueryEvaluator,
    ProtocolOptions,
    Rows,
    register_protocol,
)
from bctool.evaluate.protocols.gldv2.files import read_retrieval_solution
from bctool.evaluate.protocols.gldv2.metric import (
    evaluate_gldv2,
    evaluate_gldv2_per_query,
)

COLUMNS = ("map@100", "queries")
_SUBSETS = (("all", ""), ("public", "_public"), ("private", "_private"))


def rows(metrics: Mapping[str, Any]) -> Rows:
    """One row for all scored queries, one for the Public and one for the Private ones."""
    return {u: {"map@100": metrics[f"map@100{s}"], "queries": metrics[f"queries{s}"]} for u, s in _SUBSETS}


@register_protocol("gldv2", title="GLDv2", headline="map@100", columns=COLUMNS, rows=rows, option="solution")
def build(options: ProtocolOptions) -> tuple[Evaluator, PerQueryEvaluator]:
    """:func:`evaluate_gldv2` against the ``solution`` CSV (read once, here)."""
    solution = read_retrieval_solution(options.given()["solution"])
    return (
        lambda q, g: evaluate_gldv2(q, g, solution),
        lambda q, g: evaluate_gldv2_per_query(q, g, solution),
    )
