"""Reading one embeddings file (:mod:`bctool.embeddings.format`): its header checked before
anything is read, the tensors read whole or memory-mapped. :func:`bctool.embeddings.load_embeddings`
also reads shard sets."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from bctool.embeddings.core import Embeddings
from bctool.embeddings.format import FORMAT, FORMAT_VERSION
from bctool.embeddings.ids import RowIds
from bctool.errors import EmbeddingsError
from bctool.utils.io import check_format_version, read_safetensors_header

logger = logging.getLogger(__name__)


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


def _load_tensors(path: Path, mmap: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (memory-mapped or read whole) and metadata of ``path``, an existing file."""
    try:
        if mmap:
            return _load_mmap(path)
        meta = _checked_metadata(path)
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, str(exc)) from exc


def _no_rows(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> EmbeddingsError:
    """The error for a file without an ``embeddings`` tensor, saying what it holds instead."""
    if meta.get("format") == "bctool.checkpoint":
        return EmbeddingsError(
            f"{str(path)!r} is a model checkpoint, not an embeddings file; embed images with "
            "it first (`bctool extract DATA --model MODEL --out EMB.safetensors`), or pass it "
            "to train as --old-model"
        )
    found = sorted(tensors)
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return EmbeddingsError(
        f"{str(path)!r} has no 'embeddings' tensor (found {shown}); pass an embeddings file "
        "written by `bctool extract`"
    )


def read_embeddings_file(path: Path, mmap: bool = False) -> Embeddings:
    """One embeddings file (not a shard set), as :func:`bctool.embeddings.load_embeddings` reads it."""
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file {str(path)!r} does not exist; run `bctool extract` first")
    tensors, meta = _load_tensors(path, mmap)
    if meta.get("format") == FORMAT:
        check_format_version(path, meta, "bctool embeddings", FORMAT_VERSION, EmbeddingsError)
    if "embeddings" not in tensors:
        raise _no_rows(path, tensors, meta)
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
