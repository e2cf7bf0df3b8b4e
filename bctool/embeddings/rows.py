"""Rows of embeddings: normalisation, and arrays of rows read on demand (memory-mapped files,
the parts of a shard set) without holding them whole."""

from __future__ import annotations

import contextlib
import mmap as mmap_module
from collections.abc import Iterator, Sequence

import numpy as np

from bctool.errors import EmbeddingsError


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalised copy of the rows of ``x`` (float32); zero rows stay zero.

    Each row is normalised on its own, so normalising a gallery block by block gives exactly
    the values of normalising it whole.
    """
    emb = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf rows stay NaN; callers check
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        out = emb / np.maximum(norms, 1e-12)
        # A finite row whose norm overflowed (values near 3e38) would come out as zeros: divide
        # it by its largest magnitude first. Other rows keep the plain formula's exact values.
        overflowed = np.isinf(norms[:, 0]) & np.isfinite(emb).all(axis=1) if emb.size else np.zeros(0, bool)
        if overflowed.any():
            rows = emb[overflowed] / np.abs(emb[overflowed]).max(axis=1, keepdims=True)
            out[overflowed] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return out


def storage_dtype(rows: np.ndarray) -> str:
    """The name (``DTYPES``) a file keeps ``rows`` in: float16 rows stay float16, others float32."""
    return "float16" if rows.dtype == np.float16 else "float32"


def release_rows(rows: np.ndarray, start: int, stop: int) -> None:
    """Let the operating system drop the pages of rows ``start .. stop`` of a memory-mapped array
    from this process's memory (they are read again from the file if touched): a stream over a
    file larger than memory then keeps only its current block resident. A no-op for other arrays."""
    if isinstance(rows, LazyRows):  # rows read on demand (a shard set's): they release their own
        rows.release(start, stop)
        return
    mapping = getattr(rows, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
        return
    row_bytes = rows.strides[0]
    # numpy maps the file from the offset rounded down to the allocation granularity: offsets
    # into the mapping are the array's offset within it plus the rows'.
    base = rows.offset % mmap_module.ALLOCATIONGRANULARITY
    begin = base + start * row_bytes
    end = base + min(stop, rows.shape[0]) * row_bytes
    page = mmap_module.PAGESIZE
    first, last = (begin // page) * page, (end // page) * page  # whole pages inside the rows only
    if last > first:
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(mmap_module.MADV_DONTNEED, first, last - first)


class LazyRows:
    """Rows of an (N, D) array read on demand: numpy-style row indexing (a slice, an index or
    boolean array, an integer, with optional column indices after them) on top of two reads a
    subclass gives, :meth:`_slice` (contiguous rows) and :meth:`_take` (rows by number)."""

    ndim = 2
    shape: tuple[int, int]
    dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _take(self, index: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key):  # noqa: ANN001, ANN204 - numpy-style indexing of rows
        if isinstance(key, tuple):
            rows, *rest = key
            return self[rows][(slice(None), *rest)]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._slice(start, max(start, stop))
            key = np.arange(start, stop, step)
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.ndim == 0:
            return self[index.reshape(1)][0]
        index = np.where(index < 0, index + len(self), index).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return self._take(index)

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001, ANN204 - the whole array, read
        return np.asarray(self[:], dtype=dtype)

    def release(self, start: int, stop: int) -> None:
        """Let the pages of rows ``start .. stop`` go (:func:`release_rows`); nothing by default."""


class ConcatRows(LazyRows):
    """The rows of several arrays of one width (the memory-mapped parts of a shard set), read as
    one (N, D) array: a slice or an index array reads only the parts it touches."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise EmbeddingsError("a shard set needs parts of one dimension")
        self.parts = list(parts)
        self.bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.shape = (int(self.bounds[-1]), int(parts[0].shape[1]))
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def _spans(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, int, int]]:
        """``(part, first, last)``: the rows of each part that ``start .. stop`` covers."""
        for p, a, b in zip(self.parts, self.bounds[:-1].tolist(), self.bounds[1:].tolist()):
            if max(start, a) < min(stop, b):
                yield p, max(start, a) - a, min(stop, b) - a

    def _slice(self, start: int, stop: int) -> np.ndarray:
        pieces = [np.asarray(p[first:last]) for p, first, last in self._spans(start, stop)]
        if not pieces:
            return np.zeros((0, self.shape[1]), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces).astype(self.dtype, copy=False)

    def _take(self, index: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self.bounds, index, side="right") - 1
        out = np.empty((len(index), self.shape[1]), self.dtype)
        for i in np.unique(part).tolist():
            chosen = part == i
            out[chosen] = self.parts[i][index[chosen] - self.bounds[i]]
        return out

    def release(self, start: int, stop: int) -> None:
        """:func:`release_rows` of rows ``start .. stop`` in every part they lie in."""
        for p, first, last in self._spans(start, stop):
            release_rows(p, first, last)
