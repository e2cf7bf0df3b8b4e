"""Retrieval evaluation: exact top-k search and metrics over rankings."""

from bctool.evaluate.metrics import average_precision, average_precision_at_k, recall_at_k
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.evaluate.search import iter_rankings, rank_gallery

__all__ = [
    "average_precision",
    "average_precision_at_k",
    "evaluate_retrieval",
    "iter_rankings",
    "rank_gallery",
    "recall_at_k",
]
