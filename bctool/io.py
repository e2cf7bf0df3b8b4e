"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bctool.errors import BctoolError

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    A run killed at any moment leaves either the old file or the new one, never a torn file.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BctoolError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; "
            "choose an output path in a writable folder"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files (and writers may replace the file): give the output the
        # usual permissions, 0666 less the umask, as a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BctoolError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; "
            "check free disk space and permissions"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


_DTYPES = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint8": ("U8", 1), "bool": ("BOOL", 1),
}


def save_safetensors(target: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write torch ``tensors`` and ``metadata`` as a safetensors file, atomically and byte for
    byte reproducibly: the header lists the metadata in the given order and the tensors as
    safetensors' own writer lays them out (larger element sizes first, then by name, so every
    tensor is aligned), but without its per-process random order of metadata keys."""
    import torch

    entries = []
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise BctoolError(f"cannot store tensor {name!r} of dtype {dtype} in a safetensors file")
        entries.append((name, tensor, *_DTYPES[dtype]))
    entries.sort(key=lambda e: (-e[3], e[0]))
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor, code, size in entries:
        nbytes = tensor.numel() * size
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, tensor, _, _ in entries:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            fh.write(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
