"""Shard sets: the part files of one ``bctool extract --shard I/N`` run, read as one gallery or
merged into one file; and :func:`load_embeddings`, which reads a file or a shard set."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bctool.embeddings.core import Embeddings
from bctool.embeddings.format import EmbeddingsSpec, write_embeddings
from bctool.embeddings.ids import concat_ids
from bctool.embeddings.read import read_embeddings_file
from bctool.embeddings.rows import ConcatRows, storage_dtype
from bctool.errors import EmbeddingsError
from bctool.utils.progress import NULL_PROGRESS, Progress

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
    return read_embeddings_file(Path(path), mmap)


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


def merge_shards(parts: list[str | os.PathLike[str]], out: str | os.PathLike[str], block_rows: int = 65536,
                 progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Join the part files of ``bctool extract --shard I/N`` into one file in list order.

    Every part must come from the same list, model and N, and every index 0..N-1 must be there
    exactly once. Parts are read memory-mapped and copied block by block (memory stays flat);
    ``progress`` counts the rows copied (one task, "merge"). Returns a summary (rows, parts,
    dimension).
    """
    ordered = ordered_parts(parts)
    first = ordered[0]
    count = len(ordered)
    ids = concat_ids([emb.ids for emb in ordered])
    labels = np.concatenate([emb.labels for emb in ordered])
    dtype = "float16" if all(storage_dtype(e.embeddings) == "float16" for e in ordered) else "float32"
    spec = EmbeddingsSpec(labels=labels, ids=ids, label_names=first.label_names, dim=first.dim, model=first.model,
                          normalized=first.normalized, root=first.root, dtype=dtype)
    with write_embeddings(out, spec) as writer:
        row = 0
        progress.start("merge", len(ids))
        try:
            for emb in ordered:
                for start in range(0, len(emb), block_rows):
                    block = emb.embeddings[start : start + block_rows]
                    writer.write(row, block)
                    row += len(block)
                    progress.advance(len(block))
        finally:
            progress.stop()
    return {"out": str(out), "images": len(ids), "parts": count, "embedding_dim": first.dim,
            "list_images": int(first.shard["total"])}  # type: ignore[index]
