"""Embeddings in the formats users already have: ``.npy``, parquet and faiss indexes.

``bctool convert SRC --out DST`` reads SRC and writes DST, each format named by its suffix:

* ``.safetensors``: a bctool embeddings file (or a shard set: a folder or ``.txt`` manifest);
* ``.npy``: the (N, D) rows; the ids and labels in two text files beside it, ``STEM.ids.txt``
  and ``STEM.labels.txt``, one id or label name a line (an empty label line: unknown). Reading
  a ``.npy`` takes them from there, or from ``--ids`` and ``--labels``;
* ``.parquet`` (``pip install 'bctool[parquet]'``): one row per embedding, columns ``id``
  (string), ``label`` (string, null when unknown) and ``embedding`` (a fixed-size list of
  float32 or float16);
* ``.faiss``: an ``IndexIDMap2`` over an exact inner-product index (``IndexFlatIP``) holding the
  L2-normalised rows, as ``bctool evaluate`` searches them; its int64 ids are row numbers, and
  ``STEM.ids.txt`` / ``STEM.labels.txt`` beside it map them back to ids and labels (read with
  the index for serving). Reading one reconstructs its rows (normalised, so the file says so).

Rows stream in blocks to and from ``.npy`` (memory-mapped) and into parquet; reading parquet
holds its rows in memory once, and a faiss index is built in memory, as faiss holds it. Ids are
checked both ways: one a row, unique, no line breaks; rows are checked block by block as they
are written: a NaN or inf row is refused, naming it, and nothing is written.

A ``.npy`` or ``.faiss`` output and its ids and labels files are written as one unit
(:func:`bctool.utils.io.atomic_paths`): a failed conversion leaves the previous three files whole,
never new ids beside old rows. The labels file is always written (empty lines when no row is
labelled), so a labels file left by an earlier conversion is never paired with new rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bctool.embeddings import (
    Embeddings,
    EmbeddingsSpec,
    RowIds,
    load_embeddings,
    normalize_rows,
    storage_dtype,
    write_embeddings,
)
from bctool.errors import BctoolError, ConfigError, EmbeddingsError
from bctool.utils.io import atomic_path, atomic_paths
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)
BLOCK_ROWS = 65536
SIDECAR_SUFFIXES = (".npy", ".faiss")  # formats whose ids and labels live in STEM.ids.txt / STEM.labels.txt


def beside(path: str | os.PathLike[str], what: str) -> Path:
    """``STEM.WHAT.txt`` beside ``path`` (``emb.npy`` -> ``emb.ids.txt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{what}.txt")


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbeddingsError(f"cannot read the {what} file {str(path)!r}: {exc}") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line break
    return [line.removesuffix("\r") for line in lines]


def check_ids(ids: list[str] | RowIds, rows: int, where: str) -> None:
    """One id a row, unique, none holding a line break: what a text file of ids can carry back."""
    from bctool.evaluate.inputs import check_unique_ids

    if len(ids) != rows:
        raise EmbeddingsError(f"{where}: {len(ids)} ids for {rows} rows; give one id a row")
    check_unique_ids(ids, where)  # the answer evaluate and backfill plan give
    for image_id in ids:
        if "\n" in image_id or "\r" in image_id:
            raise EmbeddingsError(f"{where}: id {image_id!r} holds a line break, which a text file of ids cannot keep")


def _labels_from_names(names: list[str | None], rows: int, where: str) -> tuple[np.ndarray, list[str]]:
    if len(names) != rows:
        raise EmbeddingsError(f"{where}: {len(names)} labels for {rows} rows; give one label a row (empty: unknown)")
    label_names = sorted({n for n in names if n})
    number = {name: i for i, name in enumerate(label_names)}
    return np.array([number[n] if n else -1 for n in names], dtype=np.int64), label_names


@contextlib.contextmanager
def _with_text_files(emb: Embeddings, out: Path) -> Iterator[Path]:
    """Write ``STEM.ids.txt`` and ``STEM.labels.txt`` beside ``out`` and ``out`` itself as one
    unit (:func:`atomic_paths`): yield the temporary path of ``out``, to be written in the block."""
    check_ids(emb.ids, len(emb), str(out))
    with atomic_paths([beside(out, "ids"), beside(out, "labels"), out]) as (ids_tmp, labels_tmp, out_tmp):
        for tmp, lines in ((ids_tmp, emb.ids), (labels_tmp, (n or "" for n in emb.label_strings()))):
            with open(tmp, "w", encoding="utf-8") as fh:
                for line in lines:
                    fh.write(line + "\n")
        yield out_tmp


def _text_files(out: Path) -> dict[str, str]:
    """The ids and labels files written beside ``out``, for the summary."""
    return {what: str(beside(out, what)) for what in ("ids", "labels")}


def _finite_blocks(emb: Embeddings, where: str, progress: Progress,
                   dtype: str | np.dtype | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, rows)`` of ``emb``, ``BLOCK_ROWS`` at a time (as ``dtype`` when given),
    each refused when a row holds NaN or inf: the rows are read once, block by block. Each
    block is counted on ``progress`` when the next is asked for (once it is written)."""
    for start in range(0, len(emb), BLOCK_ROWS):
        block = emb.embeddings[start : start + BLOCK_ROWS]
        if dtype is not None:
            block = np.asarray(block, dtype=dtype)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            first = start + int(np.flatnonzero(bad)[0])
            raise EmbeddingsError(
                f"{where!r}: row {first} (id {emb.ids[first]!r}) holds NaN or inf values; nothing was written: "
                "re-extract the embeddings (`bctool extract`), or leave that row out, and convert again"
            )
        yield start, block
        progress.advance(len(block))


def _sidecar(src: Path, given: str | os.PathLike[str] | None, what: str, required: bool) -> Path | None:
    path = Path(given) if given else beside(src, what)
    if path.is_file():
        return path
    if given or required:
        raise EmbeddingsError(
            f"no {what} file for {str(src)!r}: {str(path)!r} is not there; pass --{what} FILE (one {what[:-1]} a "
            "line, in row order)"
        )
    return None


# Readers: (src, ids file, labels file) -> Embeddings. Writers: (embeddings, out, the source's
# name for messages, progress counting the rows written) -> files written beside out.
Reader = Callable[[Path, "str | None", "str | None"], Embeddings]
Writer = Callable[[Embeddings, Path, str, Progress], dict[str, str]]


def _read_bctool(src: Path, ids: str | None, labels: str | None) -> Embeddings:
    if ids or labels:
        raise ConfigError("--ids and --labels are for a .npy source; a bctool file carries its own")
    return load_embeddings(src, mmap=True)


def _write_bctool(emb: Embeddings, out: Path, where: str, progress: Progress) -> dict[str, str]:
    with write_embeddings(out, EmbeddingsSpec.of(emb, storage_dtype(emb.embeddings))) as writer:
        for start, block in _finite_blocks(emb, where, progress):
            writer.write(start, block)
    return {}


def _read_npy(src: Path, ids: str | None, labels: str | None) -> Embeddings:
    try:
        rows = np.load(src, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EmbeddingsError(f"cannot read {str(src)!r} as a .npy array: {exc}") from exc
    if rows.ndim != 2 or rows.dtype.kind != "f":
        raise EmbeddingsError(f"{str(src)!r} holds a {rows.dtype} array of shape {rows.shape}; embeddings are a 2-D "
                              "float array (N x D)")
    ids_path = _sidecar(src, ids, "ids", required=True)
    assert ids_path is not None
    id_list = _read_lines(ids_path, "ids")
    check_ids(id_list, rows.shape[0], str(ids_path))
    labels_path = _sidecar(src, labels, "labels", required=False)
    names: list[str | None] = [*_read_lines(labels_path, "labels")] if labels_path else [None] * rows.shape[0]
    label_ids, label_names = _labels_from_names(names, rows.shape[0], str(labels_path or src))
    if rows.dtype not in (np.float32, np.float16):
        rows = np.asarray(rows, dtype=np.float32)
    return Embeddings(rows, label_ids, id_list, label_names, {"source": str(src.resolve()), "format": "npy"})


def _write_npy(emb: Embeddings, out: Path, where: str, progress: Progress) -> dict[str, str]:
    dtype = np.dtype(storage_dtype(emb.embeddings))
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (len(emb), emb.dim)}
    # Written, not memory-mapped: a full disk is then an error of a write, not a SIGBUS on a page.
    with _with_text_files(emb, out) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for _, block in _finite_blocks(emb, where, progress, dtype):
            fh.write(np.ascontiguousarray(block).data)
    return _text_files(out)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule is what is used
    except ImportError as exc:
        raise ConfigError("parquet needs pyarrow: pip install 'bctool[parquet]' (or pip install pyarrow)") from exc
    return pyarrow


def _read_parquet(src: Path, ids: str | None, labels: str | None) -> Embeddings:
    if ids or labels:
        raise ConfigError("--ids and --labels are for a .npy source; a parquet file has id and label columns")
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(src, columns=["id", "label", "embedding"])
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise EmbeddingsError(f"cannot read {str(src)!r} as parquet with columns id, label, embedding: {exc}") from exc
    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise EmbeddingsError(f"{str(src)!r}: column 'embedding' is {column.type}; bctool writes a fixed-size list")
    dim = column.type.list_size
    rows = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    id_list = [str(i) for i in table.column("id").to_pylist()]
    check_ids(id_list, rows.shape[0], str(src))
    label_ids, label_names = _labels_from_names(table.column("label").to_pylist(), rows.shape[0], str(src))
    if rows.dtype not in (np.float32, np.float16):
        rows = rows.astype(np.float32)
    return Embeddings(rows, label_ids, id_list, label_names, {"source": str(src.resolve()), "format": "parquet"})


def _write_parquet(emb: Embeddings, out: Path, where: str, progress: Progress) -> dict[str, str]:
    pa = _pyarrow()
    check_ids(emb.ids, len(emb), str(out))
    value_type = pa.float16() if storage_dtype(emb.embeddings) == "float16" else pa.float32()
    schema = pa.schema([("id", pa.string()), ("label", pa.string()), ("embedding", pa.list_(value_type, emb.dim))])
    names = emb.label_strings()
    with atomic_path(out) as tmp, pa.parquet.ParquetWriter(tmp, schema) as writer:
        for start, block in _finite_blocks(emb, where, progress):
            rows = np.ascontiguousarray(block)
            values = pa.array(rows.reshape(-1), type=value_type)
            writer.write_table(pa.table({
                "id": pa.array(list(emb.ids[start : start + BLOCK_ROWS]), pa.string()),
                "label": pa.array(names[start : start + BLOCK_ROWS], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(values, emb.dim),
            }, schema=schema))
    return {}


def _read_faiss(src: Path, ids: str | None, labels: str | None) -> Embeddings:
    import faiss

    try:
        index = faiss.read_index(str(src))
    except RuntimeError as exc:
        raise EmbeddingsError(f"cannot read {str(src)!r} as a faiss index: {exc}") from exc
    if not isinstance(index, faiss.IndexIDMap2) or not isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
        raise EmbeddingsError(f"{str(src)!r} is a {type(index).__name__}; bctool reads back the IndexIDMap2 over a flat "
                              "index that `bctool convert` writes (other indexes do not keep their rows exactly)")
    rows = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
    numbers = faiss.vector_to_array(index.id_map)
    ids_path = _sidecar(src, ids, "ids", required=True)
    assert ids_path is not None
    id_lines = _read_lines(ids_path, "ids")
    if numbers.size and (numbers.min() < 0 or numbers.max() >= len(id_lines)):
        raise EmbeddingsError(f"{str(src)!r} holds row numbers up to {int(numbers.max())}, but {str(ids_path)!r} has "
                              f"{len(id_lines)} ids; keep the index with the id file written beside it")
    id_list = [id_lines[i] for i in numbers.tolist()]
    check_ids(id_list, rows.shape[0], str(ids_path))
    labels_path = _sidecar(src, labels, "labels", required=False)
    names = _read_lines(labels_path, "labels") if labels_path else [""] * len(id_lines)
    if len(names) != len(id_lines):
        raise EmbeddingsError(f"{str(labels_path)!r} has {len(names)} labels for {len(id_lines)} ids")
    label_ids, label_names = _labels_from_names([names[i] for i in numbers.tolist()], rows.shape[0], str(src))
    return Embeddings(rows, label_ids, id_list, label_names, {"source": str(src.resolve()), "format": "faiss"},
                      normalized=True)


def _write_faiss(emb: Embeddings, out: Path, where: str, progress: Progress) -> dict[str, str]:
    import faiss

    check_ids(emb.ids, len(emb), str(out))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.dim))
    for start, block in _finite_blocks(emb, where, progress, np.float32):
        rows = np.ascontiguousarray(block) if emb.normalized else normalize_rows(block)
        index.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
    with _with_text_files(emb, out) as tmp, open(tmp, "wb") as fh:
        # Through Python's file, so a failed write is an OSError naming no temporary file (which
        # atomic_paths reports against ``out``), and none is lost in faiss's closing of a file.
        try:
            faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))
        except RuntimeError as exc:
            # faiss's message names its source lines (and any file by its temporary name): keep
            # only the system's reason it ends with, "(No space left on device)", when there.
            found = re.search(r"\(([^()]+)\)\s*$", str(exc))
            reason = found.group(1) if found else "faiss could not write the index"
            raise BctoolError(
                f"cannot write the faiss index {str(out)!r}: {reason}; check free disk space and the "
                "file-size limit (`ulimit -f`), then convert again"
            ) from exc
    return _text_files(out)


@dataclass(frozen=True)
class Format:
    """How one file suffix is read and written."""

    name: str
    read: Reader
    write: Writer


FORMATS = {
    ".safetensors": Format("bctool", _read_bctool, _write_bctool),
    ".npy": Format("npy", _read_npy, _write_npy),
    ".parquet": Format("parquet", _read_parquet, _write_parquet),
    ".faiss": Format("faiss", _read_faiss, _write_faiss),
}


def format_of(path: str | os.PathLike[str], role: str) -> Format:
    """The format ``path``'s suffix names (a folder or ``.txt`` manifest is a bctool shard set)."""
    path = Path(path)
    if role == "SRC" and (path.is_dir() or path.suffix == ".txt"):
        return FORMATS[".safetensors"]
    if path.suffix not in FORMATS:
        raise ConfigError(f"{role} {str(path)!r}: the suffix {path.suffix or '(none)'!r} names no format; use one of "
                          f"{sorted(FORMATS)}")
    return FORMATS[path.suffix]


def read_embeddings_any(src: str | os.PathLike[str], ids: str | None = None, labels: str | None = None) -> Embeddings:
    """The embeddings of ``src`` in any format :data:`FORMATS` reads (by its suffix)."""
    return format_of(src, "SRC").read(Path(src), ids, labels)


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], ids: str | None = None,
            labels: str | None = None, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Read ``src`` and write ``out``, each in the format its suffix names; return a summary.
    ``progress`` counts the rows written (one task, "convert")."""
    source, target = format_of(src, "SRC"), format_of(out, "--out")
    if source.name == target.name:
        raise ConfigError(f"SRC and --out are both {source.name} files; nothing to convert")
    if source.name != "bctool" and target.name != "bctool":
        raise ConfigError("convert between bctool files and another format; go through a .safetensors file")
    if not Path(src).exists():
        raise EmbeddingsError(f"{str(src)!r} does not exist")
    emb = source.read(Path(src), ids, labels)
    progress.start("convert", len(emb))
    try:
        files = target.write(emb, Path(out), str(src), progress)
    finally:
        progress.stop()
    logger.info("converted %d rows of %s (%s) into %s (%s)", len(emb), src, source.name, out, target.name)
    return {"src": str(src), "out": str(out), "from": source.name, "to": target.name, "rows": len(emb),
            "dim": emb.dim, "dtype": storage_dtype(np.asarray(emb.embeddings[:0])), "labelled": int((emb.labels >= 0).sum()),
            **{f"{what}_file": path for what, path in files.items()}}
