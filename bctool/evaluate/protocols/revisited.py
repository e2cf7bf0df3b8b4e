"""``revisited``: Revisited Oxford/Paris ground truth (``--gnd``), mAP and mP@k per protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bctool.data.gnd import load_gnd
from bctool.evaluate.protocols.base import (
    Evaluator,
    PerQueryEvaluator,
    ProtocolOptions,
    Rows,
    register_protocol,
)
from bctool.evaluate.revisited import PROTOCOLS, evaluate_revisited, evaluate_revisited_per_query

COLUMNS = ("map", "mp@1", "mp@5", "mp@10", "queries")


def rows(metrics: Mapping[str, Any]) -> Rows:
    """One row per protocol (easy, medium, hard): mAP, mP@1/5/10 and the queries counted."""
    return {p: {"map": metrics[f"map_{p}"], **{f"mp@{k}": metrics[f"mp@{k}_{p}"] for k in (1, 5, 10)},
                "queries": metrics[f"queries_{p}"]} for p in PROTOCOLS}


@register_protocol("revisited", title="Revisited Oxford/Paris", headline="map", columns=COLUMNS, rows=rows,
                   option="gnd")
def build(options: ProtocolOptions) -> tuple[Evaluator, PerQueryEvaluator]:
    """:func:`evaluate_revisited` against the ``gnd`` ground-truth pickle (read once, here)."""
    truth = load_gnd(options.given()["gnd"])
    return (
        lambda q, g: evaluate_revisited(q, g, truth),
        lambda q, g: evaluate_revisited_per_query(q, g, truth),
    )
