"""Checks and look-ups every evaluator shares: one dimension for queries and gallery, and
embedding rows found by a benchmark's image names (by id or file stem)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import EmbeddingsError


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


def id_stem(image_id: str) -> str:
    """The file stem of an embedding id: the part after its last '/' (``jpg/all_souls_1``
    -> ``all_souls_1``); ids are image paths relative to the dataset root, without extension."""
    return image_id.rsplit("/", 1)[-1]


def match_rows(emb: Embeddings, names: Sequence[str], what: str) -> np.ndarray:
    """Row of ``emb`` for every name, ``(len(names),)`` int64.

    A row matches a name when its id equals the name or its file stem (:func:`id_stem`) does.
    ``what`` says which images these are ("query", "gallery") in errors.
    """
    by_id = {image_id: i for i, image_id in reversed(list(enumerate(emb.ids)))}
    by_stem: dict[str, list[int]] = {}
    for i, image_id in enumerate(emb.ids):
        by_stem.setdefault(id_stem(image_id), []).append(i)
    rows = np.full(len(names), -1, dtype=np.int64)
    missing: list[str] = []
    for j, name in enumerate(names):
        if name in by_id:
            rows[j] = by_id[name]
            continue
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
