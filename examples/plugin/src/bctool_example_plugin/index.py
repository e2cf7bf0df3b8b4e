"""An index kind: exact inner-product search through faiss's generic flat index."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from bctool.evaluate.search import IndexSettings


def flat_index(dim: int, rows: int, settings: IndexSettings, sample: Callable[[int], np.ndarray]) -> faiss.Index:
    """Exact: faiss.IndexFlat with the inner-product metric (what IndexFlatIP is)."""
    return faiss.IndexFlat(dim, faiss.METRIC_INNER_PRODUCT)


# Declares the ranking exact (ties in gallery order): every protocol may then search with it.
flat_index.exact = True
