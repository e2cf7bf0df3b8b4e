"""``labels``: relevance is the same label name (the default protocol; any search index)."""

from __future__ import annotations

from bctool.evaluate.protocols.base import Evaluator, PerQueryEvaluator, ProtocolOptions, register_protocol
from bctool.evaluate.retrieval import evaluate_retrieval, evaluate_retrieval_per_query

COLUMNS = ("map", "map@100", "recall@1", "recall@5", "recall@10", "queries", "queries_without_positives", "gallery")


@register_protocol("labels", title="labels", headline="map", columns=COLUMNS, approximate_index=True)
def build(options: ProtocolOptions) -> tuple[Evaluator, PerQueryEvaluator]:
    """:func:`evaluate_retrieval` with the options' top-k and search index."""
    return (
        lambda q, g: evaluate_retrieval(q, g, options.search),
        lambda q, g: evaluate_retrieval_per_query(q, g, options.search),
    )
