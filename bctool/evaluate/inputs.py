"""Checks and look-ups every evaluator shares: one dimension for queries and gallery, ids that
name one row each, a warning for all-zero gallery rows, and embedding rows found by a
benchmark's image names (by id or file stem)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from bctool.embeddings import (
    Embeddings,
    check_unique_ids,
    find_rows,
    release_rows,
    repeated_ids,  # noqa: F401 - importers find it here, beside check_unique_ids
)
from bctool.errors import EmbeddingsError

logger = logging.getLogger(__name__)

# Gallery bytes read at once while counting its all-zero rows.
_ZERO_BLOCK_BYTES = 64 << 20


def check_same_dim(
    query_dim: int, gallery_dim: int, query_model: str | None = None, gallery_model: str | None = None
) -> None:
    """Raise :class:`EmbeddingsError` unless query and gallery rows have one dimension.

    ``query_model`` and ``gallery_model``, when given, describe the models that made each side
    and are named in the error.
    """
    if query_dim == gallery_dim:
        return
    query_about = f" ({query_model})" if query_model else ""
    gallery_about = f" ({gallery_model})" if gallery_model else ""
    raise EmbeddingsError(
        f"query embeddings have dimension {query_dim}{query_about} but gallery embeddings have "
        f"dimension {gallery_dim}{gallery_about}; extract query and gallery with models of the same "
        "embedding dimension"
    )


def check_ids_once(emb: Embeddings, where: str) -> None:
    """:func:`check_unique_ids` of ``emb``'s ids, once per :class:`Embeddings` (a file that several
    pairs of a report share, such as the old gallery of a compatibility report, is hashed once).
    A file without ids has row numbers for ids, which never repeat."""
    if emb.ids_known and not getattr(emb, "_ids_checked", False):
        check_unique_ids(emb.ids, where)
        object.__setattr__(emb, "_ids_checked", True)  # Embeddings is frozen; the flag is not a field


def warn_zero_rows(gallery: Embeddings, what: str = "gallery") -> int:
    """Warn when rows of ``gallery`` are all zero (they score 0 against every query and rank by
    tie order alone), naming how many and the first id; return how many.

    The rows are read a block at a time (a memory-mapped or lazily read gallery is never held
    whole; each block's pages are let go after it), and each gallery once: a second call on
    the same :class:`Embeddings` returns 0 without reading.
    """
    if getattr(gallery, "_zero_rows_counted", False):
        return 0
    object.__setattr__(gallery, "_zero_rows_counted", True)
    rows = gallery.embeddings
    step = max(1, _ZERO_BLOCK_BYTES // max(1, rows.shape[1] * np.dtype(rows.dtype).itemsize))
    count, first = 0, -1
    for start in range(0, rows.shape[0], step):
        zero = ~np.asarray(rows[start : start + step]).any(axis=1)
        if first < 0 and zero.any():
            first = start + int(np.flatnonzero(zero)[0])
        count += int(zero.sum())
        release_rows(rows, start, start + step)
    if count and not getattr(gallery, "_warned_zero", False):
        object.__setattr__(gallery, "_warned_zero", True)  # the flag of Embeddings' own warning
        logger.warning(
            "%d of %d %s rows are all zero (first %r, row %d): they score 0 against every query and rank only by "
            "tie order; re-extract them (`bctool extract`) or leave them out", count, rows.shape[0], what,
            gallery.ids[first], first,
        )
    return count


def mark_checked(emb: Embeddings) -> Embeddings:
    """``emb``, marked as checked by :func:`check_ids_once` and :func:`warn_zero_rows`: for a
    gallery made of rows of files already checked (a partly re-embedded one)."""
    for flag in ("_ids_checked", "_zero_rows_counted"):
        object.__setattr__(emb, flag, True)
    return emb


def id_stem(image_id: str) -> str:
    """The file stem of an embedding id: the part after its last '/' (``jpg/all_souls_1``
    -> ``all_souls_1``); ids are image paths relative to the dataset root, without extension."""
    return image_id.rsplit("/", 1)[-1]


def match_rows(emb: Embeddings, names: Sequence[str], what: str) -> np.ndarray:
    """Row of ``emb`` for every name, ``(len(names),)`` int64.

    A row matches a name when its id equals the name or its file stem (:func:`id_stem`) does.
    ``what`` says which images these are ("query", "gallery") in errors.
    """
    by_id = find_rows(emb.ids, names, f"the {what} embeddings")
    by_stem: dict[str, list[int]] | None = None  # built only when some name is not an id
    rows = np.full(len(names), -1, dtype=np.int64)
    missing: list[str] = []
    for j, name in enumerate(names):
        if by_id[j] >= 0:
            rows[j] = by_id[j]
            continue
        if by_stem is None:
            by_stem = {}
            for i, image_id in enumerate(emb.ids):
                by_stem.setdefault(id_stem(image_id), []).append(i)
        found = by_stem.get(name, [])
        if len(found) > 1:
            clash = [emb.ids[i] for i in found[:5]]
            raise EmbeddingsError(
                f"{what} image {name!r} matches {len(found)} embedding rows ({clash}); extract the "
                "dataset's jpg folder alone with `bctool extract` so every image name is unique"
            )
        if found:
            rows[j] = found[0]
        else:
            missing.append(name)
    if missing:
        raise EmbeddingsError(
            f"{len(missing)} of {len(names)} {what} images have no embedding row (e.g. {missing[:5]}; "
            "rows match by id or by file name without extension); extract the dataset's jpg folder "
            "with `bctool extract`"
        )
    return rows
