"""Choosing the retrieval protocol: labels, Revisited Oxford/Paris, or GLDv2.

Every report (single pair, compatibility, chains, backfill) evaluates pairs of embeddings
files the same way, so they share one evaluator and one headline metric.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError
from bctool.evaluate.metrics import QueryAP

Evaluator = Callable[[Embeddings, Embeddings], dict[str, Any]]
PerQueryEvaluator = Callable[[Embeddings, Embeddings], tuple[dict[str, Any], QueryAP]]


@dataclass(frozen=True)
class Protocol:
    """An evaluator, the key of its headline mAP, and ``per_query``: the same evaluation that
    also returns the headline AP of every evaluated query (their mean is the headline value)."""

    name: str
    evaluate: Evaluator
    headline: str
    per_query: PerQueryEvaluator


def make_protocol(
    gnd: str | os.PathLike[str] | None = None,
    solution: str | os.PathLike[str] | None = None,
    top_k: int | None = None,
    index: str = "flat",
    nprobe: int = 32,
    ef_search: int = 128,
) -> Protocol:
    """Labels by default; ``gnd`` for the revisited protocols; ``solution`` for GLDv2.

    ``index`` (flat, ivf, hnsw) applies to the labelled protocol, the one for large galleries;
    the benchmark protocols always search exactly.
    """
    if gnd and solution:
        raise ConfigError("pass --gnd (Revisited Oxford/Paris) or --solution (GLDv2), not both")
    if index != "flat" and (gnd or solution):
        raise ConfigError(f"--index {index} is for labelled galleries; --gnd and --solution search exactly (--index flat)")
    if gnd:
        from bctool.evaluate.gnd import load_gnd
        from bctool.evaluate.revisited import evaluate_revisited, evaluate_revisited_per_query

        truth = load_gnd(gnd)
        return Protocol(
            "revisited",
            lambda q, g: evaluate_revisited(q, g, truth),
            "map",
            lambda q, g: evaluate_revisited_per_query(q, g, truth),
        )
    if solution:
        from bctool.evaluate.gldv2 import evaluate_gldv2, evaluate_gldv2_per_query, read_retrieval_solution

        sol = read_retrieval_solution(solution)
        return Protocol(
            "gldv2",
            lambda q, g: evaluate_gldv2(q, g, sol),
            "map@100",
            lambda q, g: evaluate_gldv2_per_query(q, g, sol),
        )
    from bctool.evaluate.retrieval import evaluate_retrieval, evaluate_retrieval_per_query

    return Protocol(
        "labels",
        lambda q, g: evaluate_retrieval(q, g, top_k=top_k, index=index, nprobe=nprobe, ef_search=ef_search),
        "map",
        lambda q, g: evaluate_retrieval_per_query(
            q, g, top_k=top_k, index=index, nprobe=nprobe, ef_search=ef_search
        ),
    )
