"""The registry entry ``revisited``: Revisited Oxford/Paris ground truth (``--gnd``), mAP and mP@k per
difficulty."""

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
from bctool.evaluate.protocols.revisited.files import load_gnd
from bctool.evaluate.protocols.revisited.metric import (
    DIFFICULTIES,
    evaluate_revisited,
    evaluate_revisited_per_query,
)

COLUMNS = ("map", "mp@1", "mp@5", "mp@10", "queries")


def rows(metrics: Mapping[str, Any]) -> Rows:
    """One row per difficulty (easy, medium, hard): mAP, mP@1/5/10 and the queries counted."""
    return {d: {"map": metrics[f"map_{d}"], **{f"mp@{k}": metrics[f"mp@{k}_{d}"] for k in (1, 5, 10)},
                "queries": metrics[f"queries_{d}"]} for d in DIFFICULTIES}


@register_protocol("revisited", title="Revisited Oxford/Paris", headline="map", columns=COLUMNS, rows=rows,
                   option="gnd")
def build(options: ProtocolOptions) -> tuple[Evaluator, PerQueryEvaluator]:
    """:func:`evaluate_revisited` against the ``gnd`` ground-truth pickle (read once, here)."""
    truth = load_gnd(options.given()["gnd"])
    return (
        lambda q, g: evaluate_revisited(q, g, truth),
        lambda q, g: evaluate_revisited_per_query(q, g, truth),
    )
