"""Embeddings files: safetensors with ``embeddings`` (N x D float32 or float16), ``labels``
(N int64) and the ids as two tensors: ``id_bytes`` (uint8, the UTF-8 of every id, one after
the other) and ``id_offsets`` (N + 1 int64: id ``i`` is ``id_bytes[id_offsets[i]:id_offsets[i + 1]]``).

Metadata (all JSON strings, as safetensors requires ``dict[str, str]``):

- ``format``: ``"bctool.embeddings"``; ``format_version``: ``"2"`` (version 1 kept the ids as a
  JSON list in the ``ids`` metadata key, which safetensors' 100 MB header limit capped at about
  1.5 million rows; version-1 files still read);
- ids: the image path relative to the dataset root without extension (tensors above);
- ``label_names``: JSON list; label ``i`` means ``label_names[i]``, ``-1`` means unknown;
- ``model``: JSON object naming the model that made the rows
  (``sha256`` of the checkpoint file, ``arch``, ``embedding_dim``, ``path``);
- ``normalized``: ``"true"`` if rows are L2-normalised (bctool writes raw rows: ``"false"``);
- ``root``: the absolute dataset root the ids are relative to (``""`` when unknown);
- ``shard`` (only in the part files of ``bctool extract --shard I/N``): JSON object with
  ``index``, ``count``, ``start``, ``stop`` (the rows of the full list this part covers),
  ``total`` (rows in the full list) and ``list`` (sha256 of the full list's ids).

Tensors are stored as safetensors' own writer orders them (larger elements first, then by name:
``id_offsets``, ``labels``, ``embeddings``, ``id_bytes``), so :class:`EmbeddingsWriter` streams
rows into their final place in the file and memory never holds more than one block of rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap as mmap_module
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from bctool.errors import BctoolError, EmbeddingsError
from bctool.io import atomic_path, check_format_version, read_safetensors_header, safetensors_header

FORMAT = "bctool.embeddings"
FORMAT_VERSION = "2"
# Storage dtypes of the rows by name (``extract --dtype``): numpy's and safetensors' codes.
DTYPES = {"float32": ("<f4", "F32"), "float16": ("<f2", "F16")}
FLOAT16_MAX = 65504.0
logger = logging.getLogger(__name__)


class RowIds(Sequence[str]):
    """The ids of a version-2 file: ``data`` (uint8, every id's UTF-8 one after the other) and
    ``offsets`` (N + 1 int64), both possibly memory-mapped; an id is decoded when it is read,
    so a gallery of millions of rows holds no Python string per row."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray) -> None:
        self.offsets, self.data = offsets, data

    @classmethod
    def encode(cls, ids: Iterable[str]) -> RowIds:
        """The ids as one buffer and offsets (a :class:`RowIds` is returned as it is)."""
        if isinstance(ids, RowIds):
            return ids
        raw = [str(i).encode("utf-8") for i in ids]
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in raw], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(raw), dtype=np.uint8))

    def check(self, path: object) -> RowIds:
        """``self``, after refusing offsets that do not cut ``data`` into ids."""
        o = self.offsets
        if o.ndim != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.data) or bool((np.diff(o) < 0).any()):
            raise EmbeddingsError(f"{str(path)!r}: 'id_offsets' do not cut 'id_bytes' into ids; re-create the file")
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _decode(self, begin: int, end: int) -> str:
        try:
            return self.data[begin:end].tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EmbeddingsError(f"an id is not UTF-8 ({exc}); re-create the file") from exc

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - int -> str, slice -> list[str]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"id {index} of {n}")
        return self._decode(int(self.offsets[i]), int(self.offsets[i + 1]))

    def __iter__(self) -> Iterator[str]:
        block = 65536
        for start in range(0, len(self), block):
            offsets = self.offsets[start : start + block + 1].tolist()
            raw = self.data[offsets[0] : offsets[-1]].tobytes()
            base = offsets[0]
            try:
                yield from (raw[a - base : b - base].decode("utf-8") for a, b in zip(offsets, offsets[1:]))
            except UnicodeDecodeError as exc:
                raise EmbeddingsError(f"an id is not UTF-8 ({exc}); re-create the file") from exc

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RowIds):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RowIds({len(self)} ids)"

    def rows_of(self, wanted: Iterable[str]) -> dict[str, int]:
        """The first row of each ``wanted`` id that is there: one vectorised pass over the
        buffer (lengths, then a hash of each id, then an exact check of the few candidates)."""
        targets = {w.encode("utf-8"): w for w in wanted}
        if not targets or not len(self):
            return {}
        # A cheap key first (length, first and last byte), a block of ids at a time: ids that
        # cannot match are dropped without hashing; few candidates are checked one by one.
        wanted_keys = _cheap_keys(*_buffers([*targets]))
        step = 1 << 20
        candidates = np.concatenate([np.zeros(0, np.int64)] + [
            start + np.flatnonzero(np.isin(_cheap_keys(self.offsets[start : start + step + 1], self.data), wanted_keys))
            for start in range(0, len(self), step)])
        if candidates.size <= _CHECK_ONE_BY_ONE:
            found_rows: dict[str, int] = {}
            for i in candidates.tolist():
                name = targets.get(self.data[self.offsets[i] : self.offsets[i + 1]].tobytes())
                if name is not None and name not in found_rows:
                    found_rows[name] = i
            return found_rows
        found: dict[str, int] = {}
        keys = _hash_ids(RowIds.encode(list(targets.values())))
        block = _HASH_BLOCK
        for start in range(0, len(self), block):
            part = RowIds(self.offsets[start : start + block + 1] - self.offsets[start],
                          self.data[self.offsets[start] : self.offsets[min(start + block, len(self))]])
            for i in np.flatnonzero(np.isin(_hash_ids(part), keys)).tolist():
                raw = part.data[part.offsets[i] : part.offsets[i + 1]].tobytes()
                name = targets.get(raw)
                if name is not None and name not in found:
                    found[name] = start + i
        return found


_CHECK_ONE_BY_ONE = 200_000  # candidate ids compared as bytes, without hashing
_HASH_BLOCK = 1 << 18  # ids hashed at once: a few arrays of 8 bytes per byte of their ids


def has_repeats(ids: Sequence[str]) -> bool:
    """True when some id appears twice. A :class:`RowIds` is checked by hashing its buffer a block
    at a time (8 bytes an id) and comparing only the ids whose hashes meet; a list by a set."""
    if not isinstance(ids, RowIds):
        return len(set(ids)) != len(ids)
    step = _HASH_BLOCK
    hashes = np.concatenate([np.zeros(0, np.uint64)] + [
        _hash_ids(RowIds(ids.offsets[start : start + step + 1], ids.data)) for start in range(0, len(ids), step)])
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if same.size == 0:
        return False
    suspects = np.unique(np.concatenate([order[same], order[same + 1]]))
    seen = [ids[int(i)] for i in suspects]
    return len(set(seen)) != len(seen)


def _buffers(raw: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and data of byte strings laid end to end."""
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return offsets, np.frombuffer(b"".join(raw), dtype=np.uint8)


def _cheap_keys(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per id of ``offsets`` (positions in ``data``): its length, first and last byte in one
    int64 (256 for the bytes of an empty id)."""
    begin, end = np.asarray(offsets[:-1], np.int64), np.asarray(offsets[1:], np.int64)
    lengths = end - begin
    nonempty = lengths > 0
    first = np.full(len(lengths), 256, np.int64)
    last = np.full(len(lengths), 256, np.int64)
    first[nonempty] = data[begin[nonempty]]
    last[nonempty] = data[end[nonempty] - 1]
    return (lengths << 18) | (first << 9) | last


_HASH_BASE = np.uint64(1099511628211)  # FNV's 64-bit prime: any odd number mixes well enough here


def _hash_ids(ids: RowIds) -> np.ndarray:
    """A 64-bit polynomial hash of every id of ``ids`` (uint64, wrapping), vectorised; the
    offsets may be a slice of a larger file's (its data is then read from ``offsets[0]`` on)."""
    first = int(ids.offsets[0]) if len(ids.offsets) else 0
    offsets = ids.offsets - first
    lengths = np.diff(offsets)
    n_bytes = int(offsets[-1]) if len(offsets) else 0
    out = np.zeros(len(ids), dtype=np.uint64)
    if n_bytes == 0:
        return out
    position = np.arange(n_bytes, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    longest = int(lengths.max())
    powers = np.ones(longest, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(1, longest):
            powers[k] = powers[k - 1] * _HASH_BASE
        data = np.asarray(ids.data[first : first + n_bytes], dtype=np.uint64)
        terms = (data + np.uint64(1)) * powers[position]
    nonempty = lengths > 0
    out[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    return out + lengths.astype(np.uint64)


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


def _metadata(
    label_names: list[str], model: dict[str, Any], normalized: bool, root: str, shard: dict[str, Any] | None,
) -> dict[str, str]:
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "label_names": json.dumps(label_names),
        "model": json.dumps(model),
        "normalized": json.dumps(normalized),
        "root": root,
    }
    if shard is not None:
        metadata["shard"] = json.dumps(shard)
    return metadata


@dataclass(frozen=True)
class _Layout:
    """Where everything of an ``N x dim`` version-2 file lies: its header, the bytes of every
    tensor but the rows (with their offsets in the file), and the rows' span."""

    head: bytes
    fixed: tuple[tuple[int, bytes], ...]
    rows_start: int
    size: int
    row_dtype: str  # numpy's


def _layout(labels: np.ndarray, ids: RowIds, dim: int, dtype: str, metadata: dict[str, str]) -> _Layout:
    """The file safetensors' own writer would lay out for these tensors (larger elements first,
    then by name): ``id_offsets``, ``labels``, ``embeddings``, ``id_bytes``."""
    if dtype not in DTYPES:
        raise EmbeddingsError(f"dtype {dtype!r} is not one an embeddings file stores; choose one of {list(DTYPES)}")
    n = len(ids)
    row_dtype, code = DTYPES[dtype]
    row_bytes = np.dtype(row_dtype).itemsize * dim
    offsets = np.ascontiguousarray(ids.offsets - ids.offsets[0], dtype="<i8").tobytes()
    id_bytes = np.ascontiguousarray(ids.data, dtype=np.uint8).tobytes()
    entries = [("id_offsets", "I64", [n + 1], len(offsets)), ("labels", "I64", [n], 8 * n),
               ("embeddings", code, [n, dim], n * row_bytes), ("id_bytes", "U8", [len(id_bytes)], len(id_bytes))]
    try:
        head = safetensors_header(metadata, entries)
    except BctoolError as exc:
        names = len(json.loads(metadata["label_names"]))
        raise EmbeddingsError(f"{names:,} label names: {exc}") from exc
    labels_at = len(head) + len(offsets)
    rows_start = labels_at + 8 * n
    ids_at = rows_start + n * row_bytes
    label_bytes = np.ascontiguousarray(labels, dtype="<i8").tobytes()
    fixed = ((len(head), offsets), (labels_at, label_bytes), (ids_at, id_bytes))
    return _Layout(head, fixed, rows_start, ids_at + len(id_bytes), row_dtype)


class EmbeddingsWriter:
    """Rows of an embeddings file written block by block into their place in an open file.

    The header, ids and labels are written on creation; :meth:`write` puts rows ``start ..`` at
    their offset, in any order. :meth:`missing` counts rows not yet written.
    """

    def __init__(self, fh: Any, num_rows: int, dim: int, layout: _Layout) -> None:
        self._fh = fh
        self.num_rows, self.dim, self.layout = num_rows, dim, layout
        self.head, self.size = layout.head, layout.size
        self._written = np.zeros(num_rows, dtype=bool)

    @classmethod
    def _plan(
        cls, fh: Any, labels: np.ndarray, ids: Sequence[str], label_names: list[str], dim: int,
        model: dict[str, Any], normalized: bool, root: str, shard: dict[str, Any] | None, dtype: str,
    ) -> EmbeddingsWriter:
        row_ids = RowIds.encode(ids)
        n = len(row_ids)
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise EmbeddingsError(f"{n} ids but labels of shape {labels.shape}; they must match")
        metadata = _metadata(label_names, model, normalized, root, shard)
        return cls(fh, n, dim, _layout(labels, row_ids, dim, dtype, metadata))

    @classmethod
    def create(
        cls, fh: Any, *, labels: np.ndarray, ids: Sequence[str], label_names: list[str], dim: int,
        model: dict[str, Any], normalized: bool = False, root: str = "",
        shard: dict[str, Any] | None = None, dtype: str = "float32",
    ) -> EmbeddingsWriter:
        """Write the header, ids and labels of an ``len(ids) x dim`` file to ``fh`` (opened ``w+b``)."""
        writer = cls._plan(fh, labels, ids, label_names, dim, model, normalized, root, shard, dtype)
        fh.seek(0)
        fh.write(writer.head)
        for offset, raw in writer.layout.fixed:
            fh.seek(offset)
            fh.write(raw)
        fh.truncate(writer.size)  # the rows' bytes, filled by write()
        return writer

    @classmethod
    def reopen(
        cls, fh: Any, *, labels: np.ndarray, ids: Sequence[str], label_names: list[str], dim: int,
        model: dict[str, Any], normalized: bool = False, root: str = "",
        shard: dict[str, Any] | None = None, dtype: str = "float32",
    ) -> EmbeddingsWriter:
        """A writer over a file :meth:`create` began with the same arguments (opened ``r+b``);
        an :class:`EmbeddingsError` if the file holds another header, ids, labels or size."""
        writer = cls._plan(fh, labels, ids, label_names, dim, model, normalized, root, shard, dtype)
        fh.seek(0)
        same = fh.read(len(writer.head)) == writer.head
        for offset, raw in writer.layout.fixed:
            fh.seek(offset)
            same = same and fh.read(len(raw)) == raw
        if not same or fh.seek(0, 2) != writer.size:
            raise EmbeddingsError("the file was begun for other images, labels, model or shard")
        return writer

    def write(self, start: int, rows: np.ndarray) -> None:
        """Put ``rows`` (k x dim) at rows ``start .. start + k`` of the file."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise EmbeddingsError(f"rows of shape {rows.shape} do not fit a file of dimension {self.dim}")
        if not 0 <= start <= start + len(rows) <= self.num_rows:
            raise EmbeddingsError(f"rows {start}..{start + len(rows)} lie outside a file of {self.num_rows} rows")
        if self.layout.row_dtype == "<f2" and rows.dtype != np.float16 and rows.size:
            with np.errstate(invalid="ignore"):
                peak = float(np.nanmax(np.abs(np.where(np.isfinite(rows), rows, 0))))
            if peak > FLOAT16_MAX:
                raise EmbeddingsError(
                    f"rows {start}..{start + len(rows)} hold values up to {peak:.4g}, beyond float16's "
                    f"{FLOAT16_MAX:g}; store them as float32 (--dtype float32)"
                )
        rows = np.ascontiguousarray(rows, dtype=self.layout.row_dtype)
        self._fh.seek(self.layout.rows_start + rows.itemsize * self.dim * start)
        self._fh.write(rows.tobytes())
        self._written[start : start + len(rows)] = True

    def missing(self) -> int:
        """Rows not written yet."""
        return int((~self._written).sum())


def storage_dtype(rows: np.ndarray) -> str:
    """The name (``DTYPES``) a file keeps ``rows`` in: float16 rows stay float16, others float32."""
    return "float16" if rows.dtype == np.float16 else "float32"


@contextlib.contextmanager
def write_embeddings(
    path: str | os.PathLike[str], *, labels: np.ndarray, ids: Sequence[str], label_names: list[str],
    dim: int, model: dict[str, Any], normalized: bool = False, root: str = "",
    shard: dict[str, Any] | None = None, dtype: str = "float32",
) -> Iterator[EmbeddingsWriter]:
    """Stream an embeddings file to ``path``: atomically renamed into place once every row is
    written (an error, or rows left unwritten, leaves any earlier file untouched). ``dtype``:
    how the rows are stored (float32, or float16: half the disk and memory)."""
    with atomic_path(path) as tmp, open(tmp, "w+b") as fh:
        writer = EmbeddingsWriter.create(fh, labels=labels, ids=ids, label_names=label_names, dim=dim,
                                         model=model, normalized=normalized, root=root, shard=shard, dtype=dtype)
        yield writer
        if writer.missing():
            raise EmbeddingsError(f"{writer.missing()} of {writer.num_rows} rows were never written to {str(path)!r}")


def save_embeddings(emb: Embeddings, path: str | os.PathLike[str], block_rows: int = 65536,
                    dtype: str | None = None) -> None:
    """Write ``emb`` to ``path`` atomically as a safetensors file, ``block_rows`` rows at a time
    (a memory-mapped source is never read whole); ``dtype`` defaults to the rows' own
    (float16 rows stay float16, others are stored as float32)."""
    with write_embeddings(path, labels=emb.labels, ids=emb.ids, label_names=emb.label_names, dim=emb.dim,
                          model=emb.model, normalized=emb.normalized, root=emb.root, shard=emb.shard,
                          dtype=dtype or storage_dtype(emb.embeddings)) as out:
        for start in range(0, len(emb), block_rows):
            out.write(start, emb.embeddings[start : start + block_rows])


def _pop_metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    """Take ``__metadata__`` out of a parsed header, as strings."""
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _unreadable(path, "'__metadata__' is not a JSON object")
    return {str(k): str(v) for k, v in meta.items()}


def _unreadable(path: Path, why: str) -> EmbeddingsError:
    return EmbeddingsError(
        f"{str(path)!r} is not a readable safetensors file ({why}); re-create it with `bctool extract`"
    )


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset of its data buffer."""
    try:
        return read_safetensors_header(path)
    except ValueError as exc:
        raise _unreadable(path, str(exc)) from exc


def _tensor_span(path: Path, header: dict[str, Any], name: str, data_size: int) -> tuple[str, list[int], int, int]:
    """``(dtype, shape, begin, end)`` of tensor ``name``, checked against the data buffer."""
    info = header[name]
    try:
        dtype, shape = str(info["dtype"]), [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _unreadable(path, f"bad header entry for {name!r}: {exc}") from exc
    itemsize = {"F32": 4, "I64": 8, "F64": 8, "I32": 4, "F16": 2, "BF16": 2, "U8": 1}.get(dtype, 0)
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
        raise _unreadable(
            path, f"tensor {name!r} claims bytes [{begin}, {end}) of a {data_size}-byte data buffer"
        )
    if itemsize and end - begin != itemsize * math.prod(shape):  # Python ints: no overflow
        raise _unreadable(path, f"tensor {name!r} of shape {shape} ({dtype}) does not fill bytes [{begin}, {end})")
    return dtype, shape, begin, end


def _load_converted(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of ``path``, read whole, ``embeddings`` as float32."""
    meta = _checked_metadata(path)
    tensors = load_file(str(path))
    tensors["embeddings"] = tensors["embeddings"].astype(np.float32)
    return tensors, meta


# Tensors a memory-mapped load maps rather than reads: their numpy dtype by safetensors code.
_MAPPED = {"embeddings": {"F32": "<f4", "F16": "<f2"}, "id_offsets": {"I64": "<i8"}, "id_bytes": {"U8": "u1"}}


def _load_mmap(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors of ``path`` with ``embeddings`` (float32 or float16) and the ids memory-mapped
    (read-only); the labels read."""
    header, data_start = _read_header(path)
    meta = _pop_metadata(path, header)
    data_size = path.stat().st_size - data_start
    tensors: dict[str, np.ndarray] = {}
    for name in header:
        dtype, shape, begin, end = _tensor_span(path, header, name, data_size)
        if name == "embeddings" and dtype == "F64" and len(shape) == 2:
            # float64 cannot be mapped as a float32 or float16 reader expects: read it whole and
            # convert, as for a query file (float32 in memory; the caller's streaming still works).
            logger.info("%s: 'embeddings' is %s, read whole and converted to float32", path, dtype)
            return _load_converted(path)
        if name in _MAPPED:
            wanted = 2 if name == "embeddings" else 1
            if dtype not in _MAPPED[name] or len(shape) != wanted:
                raise EmbeddingsError(
                    f"{str(path)!r}: {name!r} is {dtype} of shape {shape}; memory-mapped loading needs a "
                    f"{wanted}-D {' or '.join(_MAPPED[name])} tensor (load without mmap, or re-create it with "
                    "`bctool extract`)"
                )
            np_dtype = _MAPPED[name][dtype]
            if math.prod(shape) == 0:
                tensors[name] = np.zeros(shape, np_dtype)
            else:
                tensors[name] = np.memmap(path, dtype=np_dtype, mode="r", offset=data_start + begin, shape=tuple(shape))
        elif name == "labels":
            if dtype != "I64":
                raise EmbeddingsError(f"{str(path)!r}: 'labels' is {dtype}; it must be I64")
            with open(path, "rb") as fh:
                fh.seek(data_start + begin)
                tensors[name] = np.frombuffer(fh.read(end - begin), dtype="<i8").reshape(shape)
        else:
            tensors[name] = np.zeros((0,), np.uint8)  # only its name is reported
    return tensors, meta


# dtypes an embeddings file may hold in memory: numpy has no bfloat16 or float8.
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def _checked_metadata(path: Path) -> dict[str, str]:
    """The metadata of ``path``, after refusing (before safetensors reads the file) a header
    that is oversized or corrupt or names tensors numpy cannot hold."""
    header, _ = _read_header(path)
    meta = _pop_metadata(path, header)
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in _NUMPY_DTYPES:
            raise EmbeddingsError(
                f"{str(path)!r}: tensor {name!r} has dtype {dtype!r}, which bctool cannot read; "
                "store embeddings as float32 (`bctool extract` does)"
            )
    return meta


UNADAPTED_SUFFIX = ".unadapted.safetensors"  # the model's own rows, beside a part of `extract --adapter`


def shard_set_parts(path: str | os.PathLike[str]) -> list[Path] | None:
    """The part files ``path`` names when it is a shard set: a folder of the part files of one
    ``bctool extract --shard I/N`` run (every ``*.safetensors`` in it but the
    ``X.unadapted.safetensors`` that ``extract --adapter`` keeps beside a part ``X``), or a manifest (a ``.txt``
    file naming one part a line, relative to the manifest's folder; ``#`` starts a comment).
    None for anything else (an embeddings file)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        # `extract --adapter` keeps the model's own rows as X.unadapted.safetensors beside the
        # mapped part X.safetensors: the set is the mapped parts.
        names = {p.name for p in found}
        parts = [p for p in found if not (p.name.endswith(UNADAPTED_SUFFIX)
                                          and p.name.removesuffix(UNADAPTED_SUFFIX) + ".safetensors" in names)]
        where = f"folder {str(path)!r}"
    elif path.suffix == ".txt" and path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise EmbeddingsError(f"cannot read the shard manifest {str(path)!r}: {exc}") from exc
        parts = [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        where = f"manifest {str(path)!r}"
    else:
        return None
    if not parts:
        raise EmbeddingsError(f"{where} names no part files; list the files of `bctool extract --shard I/N`, one a line "
                              "(or pass a folder holding them)")
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise EmbeddingsError(f"{where} names {len(missing)} part files that are not there ({', '.join(missing[:3])})")
    return parts


def load_shard_set(parts: Sequence[str | os.PathLike[str]], mmap: bool = False) -> Embeddings:
    """The parts of one ``extract --shard I/N`` run as one gallery, in list order, without
    merging them: with ``mmap`` the rows stay in their files (:class:`ConcatRows`)."""
    ordered = ordered_parts(parts)
    first = ordered[0]
    if mmap:
        rows: Any = ConcatRows([e.embeddings for e in ordered])
    else:
        rows = np.concatenate([np.asarray(e.embeddings, dtype=np.float32) for e in ordered])
    return Embeddings(rows, np.concatenate([e.labels for e in ordered]), concat_ids([e.ids for e in ordered]),
                      first.label_names, first.model, first.normalized, first.root,
                      ids_known=all(e.ids_known for e in ordered))


def load_embeddings(path: str | os.PathLike[str], mmap: bool = False) -> Embeddings:
    """Read an embeddings file written by :func:`save_embeddings` (or a compatible tool), or a
    shard set (a folder or ``.txt`` manifest of the parts of ``extract --shard``: see
    :func:`shard_set_parts`) as one.

    With ``mmap=True`` the ``embeddings`` array is a read-only ``np.memmap`` of the file (float32
    or float16; a shard set's is a :class:`ConcatRows` of its parts), and a version-2 file's ids
    are mapped too, so a gallery larger than memory can be searched block by block.
    """
    parts = shard_set_parts(path)
    if parts is not None:
        return load_shard_set(parts, mmap)
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file {str(path)!r} does not exist; run `bctool extract` first")
    try:
        if mmap:
            tensors, meta = _load_mmap(path)
        else:
            meta = _checked_metadata(path)
            tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, str(exc)) from exc
    if meta.get("format") == FORMAT:
        check_format_version(path, meta, "bctool embeddings", FORMAT_VERSION, EmbeddingsError)
    if "embeddings" not in tensors:
        if meta.get("format") == "bctool.checkpoint":
            raise EmbeddingsError(
                f"{str(path)!r} is a model checkpoint, not an embeddings file; embed images with "
                "it first (`bctool extract DATA --model MODEL --out EMB.safetensors`), or pass it "
                "to train as --old-model"
            )
        found = sorted(tensors)
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise EmbeddingsError(
            f"{str(path)!r} has no 'embeddings' tensor (found {shown}); pass an embeddings file "
            "written by `bctool extract`"
        )
    emb = tensors["embeddings"]
    n = emb.shape[0] if emb.ndim else 0
    labels = tensors.get("labels", np.full((n,), -1, dtype=np.int64))
    ids_known = "ids" in meta or "id_offsets" in tensors
    try:
        if "id_offsets" in tensors:
            if "id_bytes" not in tensors:
                raise EmbeddingsError(f"{str(path)!r} has 'id_offsets' but no 'id_bytes'; re-create it")
            ids: Sequence[str] = RowIds(tensors["id_offsets"].astype(np.int64, copy=False),
                                        tensors["id_bytes"].astype(np.uint8, copy=False)).check(path)
        else:
            ids = json.loads(meta["ids"]) if "ids" in meta else [str(i) for i in range(n)]
        label_names = json.loads(meta.get("label_names", "[]"))
        model = json.loads(meta.get("model", "{}"))
        normalized = bool(json.loads(meta.get("normalized", "false")))
        shard = json.loads(meta["shard"]) if "shard" in meta else None
    except json.JSONDecodeError as exc:
        raise EmbeddingsError(f"{str(path)!r} has corrupt metadata ({exc}); re-create it") from exc
    if not isinstance(ids, (list, RowIds)) or (isinstance(ids, list) and not all(isinstance(i, str) for i in ids)):
        raise EmbeddingsError(f"{str(path)!r}: metadata 'ids' must be a JSON list of strings")
    if not isinstance(label_names, list):
        raise EmbeddingsError(f"{str(path)!r}: metadata 'label_names' must be a JSON list of names")
    return Embeddings(
        # A memory-mapped file keeps its float16 rows (readers convert blocks); in memory, float32.
        embeddings=emb if isinstance(emb, np.memmap) else emb.astype(np.float32, copy=False),
        labels=labels.astype(np.int64, copy=False),
        ids=ids,
        label_names=[str(x) for x in label_names],
        model=model if isinstance(model, dict) else {},
        normalized=normalized,
        root=meta.get("root", ""),
        shard=shard if isinstance(shard, dict) else None,
        ids_known=ids_known,
    )


def concat_ids(parts: Sequence[Sequence[str]]) -> RowIds:
    """The ids of several files one after the other, as one :class:`RowIds` (buffers joined)."""
    encoded = [RowIds.encode(p) for p in parts]
    data = np.concatenate([np.asarray(e.data[e.offsets[0] : e.offsets[-1]], dtype=np.uint8) for e in encoded]
                          or [np.zeros(0, np.uint8)])
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for e in encoded:
        offsets.append(e.offsets[1:] - e.offsets[0] + base)
        base += int(e.offsets[-1] - e.offsets[0])
    return RowIds(np.concatenate(offsets), data)


def _check_shard(path: Path, shard: dict[str, Any]) -> None:
    """The ``shard`` metadata of a part: integer index < count, start <= stop <= total, a list hash."""
    try:
        index, count, start, stop, total = (int(shard[k]) for k in ("index", "count", "start", "stop", "total"))
        ok = 0 <= index < count and 0 <= start <= stop <= total and isinstance(shard["list"], str)
    except (KeyError, TypeError, ValueError) as exc:
        raise EmbeddingsError(f"{str(path)!r} has corrupt 'shard' metadata ({exc!r}); extract that part again") from exc
    if not ok:
        raise EmbeddingsError(f"{str(path)!r} has inconsistent 'shard' metadata {shard}; extract that part again")


def ordered_parts(parts: Sequence[str | os.PathLike[str]]) -> list[Embeddings]:
    """The part files of one ``bctool extract --shard I/N`` run, memory-mapped, in list order;
    an :class:`EmbeddingsError` unless they come from one list, one model and one N, with every
    index 0..N-1 there exactly once."""
    if not parts:
        raise EmbeddingsError("no part files to merge; pass the files written by `bctool extract --shard I/N`")
    loaded = [(Path(p), load_embeddings(p, mmap=True)) for p in parts]
    for path, emb in loaded:
        if emb.shard is None:
            raise EmbeddingsError(
                f"{str(path)!r} is not a shard (it has no 'shard' metadata); merge only the files of "
                "`bctool extract --shard I/N`"
            )
        _check_shard(path, emb.shard)
    first_path, first = loaded[0]
    count = int(first.shard["count"])  # type: ignore[index]
    for path, emb in loaded[1:]:
        same = {
            "list": emb.shard["list"] == first.shard["list"] and emb.shard["count"] == count,  # type: ignore[index]
            "model": emb.model == first.model,
            "dimension": emb.dim == first.dim,
            "label names": emb.label_names == first.label_names,
            "dataset root": emb.root == first.root,
            "normalisation": emb.normalized == first.normalized,
        }
        differs = [name for name, ok in same.items() if not ok]
        if differs:
            unadapted = [str(p) for p in (path, first_path) if p.name.endswith(".unadapted.safetensors")]
            hint = (f"; {unadapted[0]!r} holds the model's own rows, kept beside the mapped part by `extract "
                    "--adapter`: move the *.unadapted.safetensors files to another folder, or list the parts in "
                    "a .txt manifest" if len(unadapted) == 1 else "")
            raise EmbeddingsError(
                f"{str(path)!r} and {str(first_path)!r} differ in {', '.join(differs)}; only the parts of one "
                f"`bctool extract --shard I/N` over one list with one model belong together{hint}"
            )
    by_index: dict[int, tuple[Path, Embeddings]] = {}
    for path, emb in loaded:
        index = int(emb.shard["index"])  # type: ignore[index]
        if index in by_index:
            raise EmbeddingsError(f"shard {index}/{count} is given twice: {str(by_index[index][0])!r} and {str(path)!r}")
        by_index[index] = (path, emb)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:5])
        raise EmbeddingsError(f"shards {shown} are missing ({len(missing)} of {count}); extract them with --shard first")
    return [by_index[i][1] for i in range(count)]


def merge_shards(parts: list[str | os.PathLike[str]], out: str | os.PathLike[str], block_rows: int = 65536) -> dict[str, Any]:
    """Join the part files of ``bctool extract --shard I/N`` into one file in list order.

    Every part must come from the same list, model and N, and every index 0..N-1 must be there
    exactly once. Parts are read memory-mapped and copied block by block (memory stays flat).
    Returns a summary (rows, parts, dimension).
    """
    ordered = ordered_parts(parts)
    first = ordered[0]
    count = len(ordered)
    ids = concat_ids([emb.ids for emb in ordered])
    labels = np.concatenate([emb.labels for emb in ordered])
    with write_embeddings(out, labels=labels, ids=ids, label_names=first.label_names, dim=first.dim,
                          model=first.model, normalized=first.normalized, root=first.root,
                          dtype="float16" if all(storage_dtype(e.embeddings) == "float16" for e in ordered) else "float32") as writer:
        row = 0
        for emb in ordered:
            for start in range(0, len(emb), block_rows):
                block = emb.embeddings[start : start + block_rows]
                writer.write(row, block)
                row += len(block)
    return {"out": str(out), "images": len(ids), "parts": count, "embedding_dim": first.dim,
            "list_images": int(first.shard["total"])}  # type: ignore[index]
