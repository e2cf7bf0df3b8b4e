"""The :class:`Embeddings` record: rows with their ids, labels and the model that made them."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bctool.embeddings.rows import normalize_rows
from bctool.errors import EmbeddingsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embeddings:
    """Rows of embeddings with their ids, labels and the identity of the model that made them."""

    # (N, D) float32, raw (not normalised) unless ``normalized``; float16 when a float16 file is
    # memory-mapped (every reader converts its blocks to float32)
    embeddings: np.ndarray
    labels: np.ndarray  # (N,) int64, -1 where unknown
    ids: Sequence[str]  # a list, or the RowIds of a version-2 file (decoded when read)
    label_names: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    normalized: bool = False
    root: str = ""  # dataset root the ids are relative to; "" when unknown
    shard: dict[str, Any] | None = None  # set in the part files of `bctool extract --shard`
    # False for a file without ids: ``ids`` are then row numbers, which name no image, so no row
    # is ever taken for the same image as a row of another file (retrieval, training).
    ids_known: bool = True

    def __post_init__(self) -> None:
        emb, labels = self.embeddings, self.labels
        if emb.ndim != 2:
            raise EmbeddingsError(f"embeddings must be a 2-D (N x D) array, got shape {emb.shape}")
        n = emb.shape[0]
        if labels.shape != (n,):
            raise EmbeddingsError(f"labels must have shape ({n},), got {labels.shape}")
        if len(self.ids) != n:
            raise EmbeddingsError(f"{n} embeddings but {len(self.ids)} ids; they must match")
        if n and not self.label_names and labels.max(initial=-1) >= 0:
            raise EmbeddingsError(
                f"{int((labels >= 0).sum())} rows have labels but there are no label names (the file's "
                "'label_names' metadata is missing or empty); add the names, one per label, or set the labels "
                "of unlabelled rows to -1"
            )
        if n and (labels.max(initial=-1) >= len(self.label_names) or labels.min(initial=0) < -1):
            raise EmbeddingsError(
                f"labels must lie in [-1, {len(self.label_names) - 1}] "
                f"(there are {len(self.label_names)} label names)"
            )

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def label_strings(self) -> list[str | None]:
        """Label of every row as its name (None where unknown)."""
        return [self.label_names[i] if i >= 0 else None for i in self.labels.tolist()]

    def _check_finite(self, start: int, rows: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            first = start + int(np.flatnonzero(bad)[0])
            raise EmbeddingsError(
                f"{int(bad.sum())} embedding rows hold NaN or inf values, first {self.ids[first]!r} "
                f"(row {first}); re-extract them (`bctool extract`) from the model "
                f"{self.model.get('path', '') or 'that made them'}"
            )
        zero = ~rows.any(axis=1)
        if zero.any() and not getattr(self, "_warned_zero", False):
            object.__setattr__(self, "_warned_zero", True)  # once per file, not per block
            first = start + int(np.flatnonzero(zero)[0])
            logger.warning(
                "%d embedding rows are all zero (first %r, row %d): they score 0 against every query and rank only "
                "by tie order; re-extract them (`bctool extract`) or leave them out", int(zero.sum()),
                self.ids[first], first,
            )
        return rows

    def normalized_embeddings(self) -> np.ndarray:
        """L2-normalised rows (float32), a full copy; zero rows stay zero; a NaN or inf row is an
        :class:`EmbeddingsError` naming its id.

        For large (memory-mapped) galleries use :meth:`iter_normalized_blocks`, or pass the raw
        rows to :func:`bctool.evaluate.search.build_index` with ``normalize=True``.
        """
        return self._check_finite(0, normalize_rows(self.embeddings))

    def iter_normalized_blocks(self, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows)`` of L2-normalised float32 rows, ``block_rows`` at a time."""
        if block_rows < 1:
            raise EmbeddingsError(f"block_rows must be at least 1, got {block_rows}")
        for start in range(0, len(self), block_rows):
            yield start, self._check_finite(start, normalize_rows(self.embeddings[start : start + block_rows]))
