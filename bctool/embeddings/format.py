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
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bctool.embeddings.core import Embeddings
from bctool.embeddings.ids import RowIds
from bctool.embeddings.rows import storage_dtype
from bctool.errors import BctoolError, EmbeddingsError
from bctool.utils.io import atomic_path, safetensors_header

FORMAT = "bctool.embeddings"
FORMAT_VERSION = "2"
# Storage dtypes of the rows by name (``extract --dtype``): numpy's and safetensors' codes.
DTYPES = {"float32": ("<f4", "F32"), "float16": ("<f2", "F16")}
FLOAT16_MAX = 65504.0


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


@dataclass(frozen=True, eq=False)
class EmbeddingsSpec:
    """What an embeddings file holds besides its rows: a label and an id per row, the rows'
    dimension and storage ``dtype`` (float32 or float16), and the metadata (module docstring)."""

    labels: np.ndarray
    ids: Sequence[str]
    label_names: list[str]
    dim: int
    model: dict[str, Any]
    normalized: bool = False
    root: str = ""
    shard: dict[str, Any] | None = None
    dtype: str = "float32"

    @classmethod
    def of(cls, emb: Embeddings, dtype: str) -> EmbeddingsSpec:
        """The spec of a file holding ``emb``'s rows, stored as ``dtype``."""
        return cls(labels=emb.labels, ids=emb.ids, label_names=emb.label_names, dim=emb.dim, model=emb.model,
                   normalized=emb.normalized, root=emb.root, shard=emb.shard, dtype=dtype)

    def metadata(self) -> dict[str, str]:
        """The file's metadata, as safetensors stores it."""
        return _metadata(self.label_names, self.model, self.normalized, self.root, self.shard)


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
    def _plan(cls, fh: Any, spec: EmbeddingsSpec) -> EmbeddingsWriter:
        row_ids = RowIds.encode(spec.ids)
        n = len(row_ids)
        labels = np.asarray(spec.labels)
        if labels.shape != (n,):
            raise EmbeddingsError(f"{n} ids but labels of shape {labels.shape}; they must match")
        return cls(fh, n, spec.dim, _layout(labels, row_ids, spec.dim, spec.dtype, spec.metadata()))

    @classmethod
    def create(cls, fh: Any, spec: EmbeddingsSpec) -> EmbeddingsWriter:
        """Write the header, ids and labels of a ``len(spec.ids) x spec.dim`` file to ``fh`` (opened ``w+b``)."""
        writer = cls._plan(fh, spec)
        fh.seek(0)
        fh.write(writer.head)
        for offset, raw in writer.layout.fixed:
            fh.seek(offset)
            fh.write(raw)
        fh.truncate(writer.size)  # the rows' bytes, filled by write()
        return writer

    @classmethod
    def reopen(cls, fh: Any, spec: EmbeddingsSpec) -> EmbeddingsWriter:
        """A writer over a file :meth:`create` began with the same spec (opened ``r+b``);
        an :class:`EmbeddingsError` if the file holds another header, ids, labels or size."""
        writer = cls._plan(fh, spec)
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


@contextlib.contextmanager
def write_embeddings(path: str | os.PathLike[str], spec: EmbeddingsSpec) -> Iterator[EmbeddingsWriter]:
    """Stream an embeddings file of ``spec`` to ``path``: atomically renamed into place once every
    row is written (an error, or rows left unwritten, leaves any earlier file untouched).
    ``spec.dtype``: how the rows are stored (float32, or float16: half the disk and memory)."""
    with atomic_path(path) as tmp, open(tmp, "w+b") as fh:
        writer = EmbeddingsWriter.create(fh, spec)
        yield writer
        if writer.missing():
            raise EmbeddingsError(f"{writer.missing()} of {writer.num_rows} rows were never written to {str(path)!r}")


def save_embeddings(emb: Embeddings, path: str | os.PathLike[str], block_rows: int = 65536,
                    dtype: str | None = None) -> None:
    """Write ``emb`` to ``path`` atomically as a safetensors file, ``block_rows`` rows at a time
    (a memory-mapped source is never read whole); ``dtype`` defaults to the rows' own
    (float16 rows stay float16, others are stored as float32)."""
    with write_embeddings(path, EmbeddingsSpec.of(emb, dtype or storage_dtype(emb.embeddings))) as out:
        for start in range(0, len(emb), block_rows):
            out.write(start, emb.embeddings[start : start + block_rows])
