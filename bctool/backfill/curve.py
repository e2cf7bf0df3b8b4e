"""Backfill curves: the old gallery with a share of its rows re-embedded by the new model (a
partial backfill, in random order or a plan's), and the retrieval curve over the shares.

Evaluation code: numpy and faiss, never torch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bctool.embeddings import (
    Embeddings,
    LazyRows,
    RowIds,
    find_rows,
    normalize_rows,
    pair_rows,
    release_rows,
)
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.evaluate.inputs import check_ids_once, mark_checked, warn_zero_rows
from bctool.evaluate.retrieval import evaluate_retrieval

if TYPE_CHECKING:
    from bctool.evaluate.protocols import Evaluator

logger = logging.getLogger(__name__)

SCORINGS = ("raw", "calibrated")


def _align_rows(old: Embeddings, new: Embeddings) -> np.ndarray:
    """Index into ``new``'s rows giving, for each of ``old``'s rows, the row with the same id."""
    if isinstance(old.ids, RowIds) and old.ids == new.ids:  # one list embedded twice: compared as buffers
        return np.arange(len(old), dtype=np.int64)
    old_rows, new_rows = pair_rows(old.ids, new.ids, ("the old gallery", "the new gallery"))
    if old_rows.size != len(old) or new_rows.size != len(new):
        only_old, only_new = _left_out(old.ids, old_rows), _left_out(new.ids, new_rows)
        raise EmbeddingsError(
            f"the old and new galleries must hold the same ids: {len(only_old)} ids are only in the "
            f"old gallery ({shown(only_old) or 'none'}) and {len(only_new)} only in the new one "
            f"({shown(only_new) or 'none'}); embed the same gallery images with both models"
        )
    return new_rows


def _left_out(ids: Sequence[str], paired: np.ndarray) -> list[str]:
    """The ids of the rows not in ``paired``, sorted (for an error)."""
    kept = np.zeros(len(ids), dtype=bool)
    kept[paired] = True
    return sorted(image_id for image_id, k in zip(ids, kept.tolist()) if not k)


def order_rows(old_gallery: Embeddings, order: Sequence[str] | None, seed: int) -> np.ndarray:
    """The old gallery's rows in the order they are re-embedded: ``order`` (gallery ids, every
    one once; a backfill plan) or a random permutation from ``numpy.random.default_rng(seed)``."""
    n = len(old_gallery)
    if order is None:
        return np.random.default_rng(seed).permutation(n)
    found = find_rows(old_gallery.ids, order, "the old gallery")
    unknown = [image_id for image_id, row in zip(order, found.tolist()) if row < 0]
    rows = found[found >= 0]
    if unknown or len(set(rows.tolist())) != len(rows) or len(rows) != n:
        raise EmbeddingsError(
            f"the backfill order must list every gallery id once: it has {len(order)} ids for {n} gallery rows "
            f"({len(unknown)} not in the gallery: {shown(unknown) or 'none'}; {len(rows) - len(set(rows.tolist()))} "
            "repeated); write it with `bctool backfill plan` from this gallery")
    return rows


def partial_backfill(
    old_gallery: Embeddings, new_gallery: Embeddings, fraction: float, seed: int,
    order: np.ndarray | None = None, calibration: tuple[float, float] | None = None,
) -> Embeddings:
    """The old gallery with round(fraction * N) rows replaced by the new model's rows: the first
    rows of ``order`` (gallery row numbers, :func:`order_rows`), else of a random permutation
    from ``numpy.random.default_rng(seed)``; for one order the rows re-embedded at ``f`` are a
    subset of those at any larger fraction.

    Rows are matched by id, so ``new_gallery`` may list them in any order; the result keeps the
    old gallery's order, ids and labels. ``calibration`` ``(a, b)``: the rows still from the old
    model score ``a * cos + b`` against a query instead of ``cos`` (:func:`fit_calibration`):
    two extra coordinates carry it through any inner-product search (the query's is 1 after its
    normalisation's uniform scale, which ranks nothing differently), and every row gets the same
    norm, so the search's own normalisation keeps it.
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
    chosen = (order if order is not None else np.random.default_rng(seed).permutation(n))[:count]
    model = {"backfill": fraction, "old": old_gallery.model, "new": new_gallery.model}
    if calibration is None:  # rows read block by block from the two files, as a search asks for them
        converted = np.zeros(n, dtype=bool)
        converted[chosen] = True
        mixed = MixedRows(old_gallery.embeddings, new_gallery.embeddings, aligned, converted,
                          normalize=old_gallery.normalized != new_gallery.normalized)
        return Embeddings(mixed, old_gallery.labels, old_gallery.ids, list(old_gallery.label_names), model=model,
                          normalized=old_gallery.normalized or new_gallery.normalized, root=old_gallery.root,
                          ids_known=old_gallery.ids_known)
    rows = np.array(old_gallery.embeddings, dtype=np.float32, copy=True)
    new_rows = np.asarray(new_gallery.embeddings, dtype=np.float32)
    if old_gallery.normalized != new_gallery.normalized or calibration is not None:
        # One gallery stores unit rows and the other raw ones: mix like with like.
        rows = old_gallery.normalized_embeddings()
        new_rows = new_gallery.normalized_embeddings()
    rows[chosen] = new_rows[aligned[chosen]]
    if calibration is not None:
        rows = _calibrated(rows, np.setdiff1d(np.arange(n), chosen), calibration)
    return Embeddings(
        embeddings=rows,
        labels=np.array(old_gallery.labels, copy=True),
        ids=list(old_gallery.ids),
        label_names=list(old_gallery.label_names),
        model={"backfill": fraction, "old": old_gallery.model, "new": new_gallery.model},
        normalized=old_gallery.normalized or new_gallery.normalized,
        root=old_gallery.root,
    )


class MixedRows(LazyRows):
    """A partly re-embedded gallery read on demand: row ``i`` is the new model's row
    ``aligned[i]`` where ``converted[i]``, else the old model's row ``i`` (float32; both sides
    L2-normalised when ``normalize``, for files that differ in it). A search reads it block by
    block, so neither file is copied whole."""

    dtype = np.dtype(np.float32)

    def __init__(self, old: np.ndarray, new: np.ndarray, aligned: np.ndarray, converted: np.ndarray,
                 normalize: bool = False) -> None:
        self.old, self.new, self.aligned, self.converted, self.normalize = old, new, aligned, converted, normalize
        self.shape = (int(old.shape[0]), int(old.shape[1]))

    def _mixed(self, rows: np.ndarray, block: np.ndarray) -> np.ndarray:
        out = np.array(block, dtype=np.float32)
        if self.normalize:
            out = normalize_rows(out)
        swap = self.converted[rows]
        if swap.any():
            wanted = self.aligned[rows[swap]]
            order = np.argsort(wanted)  # read the new file in row order, put the rows back after
            new = np.empty((len(wanted), self.shape[1]), np.float32)
            new[order] = np.asarray(self.new[wanted[order]], dtype=np.float32)
            out[swap] = normalize_rows(new) if self.normalize else new
        return out

    def _slice(self, start: int, stop: int) -> np.ndarray:
        return self._mixed(np.arange(start, stop), self.old[start:stop])

    def _take(self, index: np.ndarray) -> np.ndarray:
        return self._mixed(index, np.asarray(self.old[index]))

    def release(self, start: int, stop: int) -> None:
        """Let the old file's pages of rows ``start .. stop`` go (see :func:`release_rows`)."""
        release_rows(self.old, start, stop)


def _calibrated(rows: np.ndarray, old_rows: np.ndarray, calibration: tuple[float, float]) -> np.ndarray:
    """Unit ``rows`` with two coordinates added so that, against a query ``[q, 1, 0]``, the rows
    in ``old_rows`` score ``a * cos + b`` and the others ``cos``, all rows of one norm."""
    a, b = calibration
    norm2 = max(a * a + b * b, 1.0)
    out = np.zeros((rows.shape[0], rows.shape[1] + 2), dtype=np.float32)
    out[:, : rows.shape[1]] = rows
    out[:, -1] = math.sqrt(norm2 - 1.0)
    out[old_rows, : rows.shape[1]] *= a
    out[old_rows, -2] = b
    out[old_rows, -1] = math.sqrt(max(0.0, norm2 - a * a - b * b))
    return out


def calibrated_query(query: Embeddings) -> Embeddings:
    """``query`` with the two coordinates a calibrated mixed gallery expects: ``[q, 1, 0]``."""
    rows = query.normalized_embeddings()
    extra = np.zeros((len(query), 2), dtype=np.float32)
    extra[:, 0] = 1.0
    return Embeddings(np.hstack([rows, extra]), query.labels, query.ids, query.label_names, model=query.model,
                      normalized=True, root=query.root, ids_known=query.ids_known)


def fit_calibration(query: Embeddings, old_gallery: Embeddings, new_gallery: Embeddings, rows: np.ndarray,
                    pairs: int = 200_000, seed: int = 0) -> tuple[float, float] | None:
    """``(a, b)`` of least squares ``cos(q, new row) ~ a * cos(q, old row) + b`` over (query,
    gallery item) pairs of the items in ``rows`` (those both models embedded; old-gallery row
    numbers), at most ``pairs`` of them drawn with ``seed``; None for fewer than two items.
    Labels are not used: it puts the two models' scores on one scale, nothing more."""
    if len(rows) < 2:
        return None
    aligned = _align_rows(old_gallery, new_gallery)
    rng = np.random.default_rng(seed)
    q = query.normalized_embeddings()
    take = min(pairs, len(q) * len(rows))
    qi = rng.integers(0, len(q), take)
    gi = rows[rng.integers(0, len(rows), take)]
    used = np.unique(gi)  # sorted: the memory map is read in file order
    old = normalize_rows(np.asarray(old_gallery.embeddings[used], dtype=np.float32))
    new = normalize_rows(np.asarray(new_gallery.embeddings[aligned[used]], dtype=np.float32))
    local = np.searchsorted(used, gi)
    cross = np.einsum("ij,ij->i", q[qi], old[local]).astype(np.float64)
    self_ = np.einsum("ij,ij->i", q[qi], new[local]).astype(np.float64)
    var = cross.var()
    if var <= 0:
        return None
    a = float(((cross - cross.mean()) * (self_ - self_.mean())).mean() / var)
    return (a, float(self_.mean() - a * cross.mean())) if a > 0 else None


@dataclass(frozen=True)
class Headline:
    """How a curve's points are scored: the evaluator, and the metric it logs (``map@100`` for
    GLDv2)."""

    evaluate: Evaluator = evaluate_retrieval
    key: str = "map"


def backfill_curve(
    query: Embeddings,
    old_gallery: Embeddings,
    new_gallery: Embeddings,
    fractions: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    order: Sequence[str] | None = None,
    scoring: str = "raw",
    headline: Headline = Headline(),
) -> list[dict[str, Any]]:
    """Retrieval metrics of ``query`` against the partially backfilled gallery, per fraction.

    Each entry is ``{"fraction": f, "map": ..., ...}`` with every metric ``headline.evaluate``
    returns; ``headline.key`` is the one it logs (``map@100`` for GLDv2). ``order``: the gallery ids in
    the order they are re-embedded (a backfill plan; default random, by ``seed``). ``scoring``:
    ``raw`` (cosines of both models in one ranking) or ``calibrated`` (the old rows' cosines put
    on the new model's scale, :func:`fit_calibration` on the rows re-embedded so far).
    """
    if scoring not in SCORINGS:
        raise ConfigError(f"backfill scoring {scoring!r} is unknown; choose one of {list(SCORINGS)}")
    for gallery, role in ((old_gallery, "old"), (new_gallery, "new")):
        check_ids_once(gallery, f"the {role} gallery")
        warn_zero_rows(gallery, f"{role} gallery")
    rows = order_rows(old_gallery, order, seed)
    curve = []
    for fraction in fractions:
        count = int(round(float(fraction) * len(old_gallery)))
        calibration = None
        if scoring == "calibrated" and 0 < count < len(old_gallery):
            calibration = fit_calibration(query, old_gallery, new_gallery, rows[:count], seed=seed)
        # Its rows are those of the two galleries checked above: no second pass over them.
        gallery = mark_checked(partial_backfill(old_gallery, new_gallery, float(fraction), seed, rows, calibration))
        result = headline.evaluate(calibrated_query(query) if calibration is not None else query, gallery)
        logger.info("backfill %.0f%%: %s %.4f", 100 * fraction, headline.key, result[headline.key])
        curve.append({"fraction": float(fraction), **result})
    return curve
