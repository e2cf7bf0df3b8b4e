"""Partial backfill: the old gallery with a share of its rows re-embedded by the new model, and
the retrieval curve over the shares."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.evaluate.retrieval import evaluate_retrieval

logger = logging.getLogger(__name__)

Evaluate = Callable[[Embeddings, Embeddings], dict[str, Any]]


def _align_rows(old: Embeddings, new: Embeddings) -> np.ndarray:
    """Index into ``new``'s rows giving, for each of ``old``'s rows, the row with the same id."""
    old_count, new_count = Counter(old.ids), Counter(new.ids)
    if old_count != new_count:
        only_old = sorted((old_count - new_count).elements())
        only_new = sorted((new_count - old_count).elements())
        raise EmbeddingsError(
            f"the old and new galleries must hold the same ids: {len(only_old)} ids are only in the "
            f"old gallery ({shown(only_old) or 'none'}) and {len(only_new)} only in the new one "
            f"({shown(only_new) or 'none'}); embed the same gallery images with both models"
        )
    # Stable sorts pair repeated ids in their order of appearance.
    old_order = np.argsort(np.array(old.ids, dtype=object), kind="stable")
    new_order = np.argsort(np.array(new.ids, dtype=object), kind="stable")
    aligned = np.empty(len(old), dtype=np.int64)
    aligned[old_order] = new_order
    return aligned


def partial_backfill(
    old_gallery: Embeddings, new_gallery: Embeddings, fraction: float, seed: int
) -> Embeddings:
    """The old gallery with round(fraction * N) random rows replaced by the new model's rows.

    Rows are matched by id, so ``new_gallery`` may list them in any order; the result keeps the
    old gallery's order, ids and labels. One permutation from ``numpy.random.default_rng(seed)``
    picks the rows, and a fraction takes its prefix, so for one seed the rows re-embedded at
    ``f`` are a subset of those at any larger fraction.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"backfill fraction must lie in [0, 1], got {fraction}")
    if len(old_gallery) != len(new_gallery):
        raise EmbeddingsError(
            f"the old gallery has {len(old_gallery)} rows but the new one has {len(new_gallery)}; "
            "embed the same gallery images with both models"
        )
    aligned = _align_rows(old_gallery, new_gallery)
    if old_gallery.dim != new_gallery.dim:
        raise EmbeddingsError(
            f"the old gallery has dimension {old_gallery.dim} but the new gallery has dimension "
            f"{new_gallery.dim}; a mixed gallery needs models with the same embedding dimension"
        )
    n = len(old_gallery)
    count = int(round(fraction * n))
    chosen = np.random.default_rng(seed).permutation(n)[:count]
    rows = np.array(old_gallery.embeddings, dtype=np.float32, copy=True)
    new_rows = np.asarray(new_gallery.embeddings, dtype=np.float32)
    if old_gallery.normalized != new_gallery.normalized:
        # One gallery stores unit rows and the other raw ones: mix like with like.
        rows = old_gallery.normalized_embeddings()
        new_rows = new_gallery.normalized_embeddings()
    rows[chosen] = new_rows[aligned[chosen]]
    return Embeddings(
        embeddings=rows,
        labels=np.array(old_gallery.labels, copy=True),
        ids=list(old_gallery.ids),
        label_names=list(old_gallery.label_names),
        model={"backfill": fraction, "old": old_gallery.model, "new": new_gallery.model},
        normalized=old_gallery.normalized or new_gallery.normalized,
        root=old_gallery.root,
    )


def backfill_curve(
    query: Embeddings,
    old_gallery: Embeddings,
    new_gallery: Embeddings,
    fractions: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    evaluate: Evaluate = evaluate_retrieval,
    key: str = "map",
) -> list[dict[str, Any]]:
    """Retrieval metrics of ``query`` against the partially backfilled gallery, per fraction.

    Each entry is ``{"fraction": f, "map": ..., ...}`` with every metric ``evaluate`` returns;
    ``key`` is the headline metric it logs (``map@100`` for GLDv2).
    """
    curve = []
    for fraction in fractions:
        gallery = partial_backfill(old_gallery, new_gallery, float(fraction), seed)
        result = evaluate(query, gallery)
        logger.info("backfill %.0f%%: %s %.4f", 100 * fraction, key, result[key])
        curve.append({"fraction": float(fraction), **result})
    return curve
