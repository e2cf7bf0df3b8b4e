"""Retrieval evaluation: exact top-k search and metrics over rankings."""

from bctool.evaluate.metrics import QueryAP, average_precision, average_precision_at_k, recall_at_k
from bctool.evaluate.retrieval import evaluate_retrieval, evaluate_retrieval_per_query
from bctool.evaluate.search import SearchOptions, iter_rankings, rank_gallery

__all__ = [
    "QueryAP",
    "SearchOptions",
    "average_precision",
    "average_precision_at_k",
    "evaluate_retrieval",
    "evaluate_retrieval_per_query",
    "iter_rankings",
    "rank_gallery",
    "recall_at_k",
]
