"""The registry entry ``qrels``: retrieval against relevance judgments (``--qrels``), with
trec_eval's measures; the headline is mAP."""

from __future__ import annotations

from bctool.evaluate.protocols.base import Evaluator, PerQueryEvaluator, ProtocolOptions, register_protocol
from bctool.evaluate.protocols.qrels.files import read_qrels
from bctool.evaluate.protocols.qrels.metric import DEFAULT_DEPTH, Cutoffs, evaluate_qrels

COLUMNS = (*Cutoffs().keys(), "queries", "unjudged_queries")


@register_protocol("qrels", title="relevance judgments", headline="map", columns=COLUMNS, option="qrels")
def build(options: ProtocolOptions) -> tuple[Evaluator, PerQueryEvaluator]:
    """:func:`evaluate_qrels` against the ``qrels`` file (read once, here), ranking ``--top-k``
    documents a query (default: a TREC run's 1,000)."""
    qrels = read_qrels(options.given()["qrels"])
    depth = options.search.top_k or DEFAULT_DEPTH
    return (
        lambda q, g: evaluate_qrels(q, g, qrels, depth=depth)[0],
        lambda q, g: evaluate_qrels(q, g, qrels, depth=depth),
    )
