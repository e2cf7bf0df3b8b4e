"""Apply an adapter to an embeddings file, in blocks, optionally blended with the old space.

The input is read memory-mapped and written block by block (:func:`bctool.embeddings.write_embeddings`),
so a gallery of any size streams with flat memory. The output's ``model`` record names the
adapter, the model that made the input rows (``source``) and the space the rows now live in
(``space``: the adapter's target model); its ``sha256`` combines the input model's and the
adapter's, so two files mapped by one adapter from one model pair up as one model's files. A part
of ``extract --shard I/N`` keeps its ``shard`` record (the rows are the same images, in the same
order), so mapped parts are a shard set as the unmapped ones were.

``blend``: each mapped row is interpolated on the unit sphere (SLERP) with the row of the same
id in another file of the target space (the old model's embedding of the same image), with
weight ``w`` on the mapped row: 0 gives the old row, 1 the mapped one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bctool.adapt.adapter import Adapter
from bctool.embeddings import (
    Embeddings,
    EmbeddingsSpec,
    find_rows,
    load_embeddings,
    normalize_rows,
    release_rows,
    storage_dtype,
    write_embeddings,
)
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)

BLOCK_ROWS = 16384  # rows mapped at once: a few MiB of temporaries at 256-d


def slerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Spherical interpolation between unit rows ``a`` (weight 0) and ``b`` (weight 1), row by
    row; rows almost parallel fall back to the normalised linear mix."""
    a, b = normalize_rows(a), normalize_rows(b)
    cos = np.clip((a * b).sum(1, keepdims=True), -1.0, 1.0)
    theta = np.arccos(cos)
    sin = np.sin(theta)
    near = sin < 1e-6
    safe = np.where(near, 1.0, sin)
    wa = np.where(near, 1.0 - weight, np.sin((1.0 - weight) * theta) / safe)
    wb = np.where(near, weight, np.sin(weight * theta) / safe)
    return normalize_rows((wa * a + wb * b).astype(np.float32))


def check_source(emb: Embeddings, adapter: Adapter, name: str = "EMB") -> None:
    """``emb`` must come from the adapter's source model: same dimension, and the same checkpoint
    (sha256) where both record one."""
    if emb.dim != adapter.source_dim:
        raise EmbeddingsError(f"{name} has dimension {emb.dim} but the adapter maps {adapter.source_dim}-d rows "
                              f"(from {adapter.source_model.get('path') or 'its source model'})")
    have, want = emb.model.get("sha256"), adapter.source_model.get("sha256")
    if have and want and have != want:
        raise EmbeddingsError(
            f"{name} was made by model {have[:12]} ({emb.model.get('path', '?')}) but the adapter maps the space of "
            f"model {want[:12]} ({adapter.source_model.get('path', '?')}); extract {name} with that model, or fit an "
            "adapter for this one (`bctool adapt`)")


def adapted_model(source: dict[str, Any], adapter: Adapter, blend: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model`` record of rows mapped by ``adapter`` from ``source``'s rows."""
    digest = hashlib.sha256(f"{source.get('sha256', '')}+{adapter.sha256}".encode()).hexdigest()
    record = {"sha256": digest, "embedding_dim": adapter.target_dim, "adapter": adapter.describe(),
              "source": {k: v for k, v in source.items() if k != "trained_classes"},
              "space": {k: v for k, v in adapter.target_model.items() if k != "trained_classes"}}
    if blend is not None:
        record["blend"] = blend
    return record


def _blend_rows(old: Embeddings, ids: Sequence[str]) -> np.ndarray:
    """The row of the --blend file ``old`` holding each of ``ids``; every id must be there."""
    rows = find_rows(old.ids, ids, "the --blend file")
    if (rows < 0).any():
        missing = [ids[int(j)] for j in np.flatnonzero(rows < 0)]
        raise EmbeddingsError(f"{len(missing)} ids of EMB are not in the --blend file ({shown(missing)}); blend with "
                              "the old model's embeddings of the same images")
    return rows


def transform_file(emb_path: str | os.PathLike[str], adapter: Adapter, out: str | os.PathLike[str],
                   blend: str | os.PathLike[str] | None = None, blend_weight: float = 0.5,
                   block_rows: int = BLOCK_ROWS, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Map every row of the embeddings file ``emb_path`` with ``adapter`` into ``out``; return a
    summary. See the module docstring for ``blend``. ``progress`` counts the rows mapped (one
    task, "transform")."""
    if not 0.0 <= blend_weight <= 1.0:
        raise ConfigError(f"--blend-weight {blend_weight} must lie in [0, 1] (0: the old row, 1: the mapped row)")
    emb = load_embeddings(emb_path, mmap=True)
    check_source(emb, adapter)
    old = old_rows = None
    blend_record = None
    if blend is not None:
        old = load_embeddings(blend, mmap=True)
        if old.dim != adapter.target_dim:
            raise EmbeddingsError(f"the --blend file has dimension {old.dim}; the adapter maps into "
                                  f"{adapter.target_dim}-d rows (the --blend file must be the adapter's target space)")
        have, want = old.model.get("sha256"), adapter.target_model.get("sha256")
        if have and want and have != want:
            raise EmbeddingsError(f"the --blend file was made by model {have[:12]}, but the adapter maps into the space "
                                  f"of model {want[:12]}; blend with that model's embeddings of the same images")
        old_rows = _blend_rows(old, emb.ids)
        blend_record = {"file": str(Path(blend).resolve()), "weight": blend_weight,
                        "model": {k: v for k, v in old.model.items() if k != "trained_classes"}}
    model = adapted_model(emb.model, adapter, blend_record)
    spec = EmbeddingsSpec(labels=np.asarray(emb.labels), ids=emb.ids, label_names=emb.label_names,
                          dim=adapter.target_dim, model=model, normalized=True, root=emb.root, shard=emb.shard,
                          dtype=storage_dtype(emb.embeddings))  # float16 in, float16 out
    with write_embeddings(out, spec) as writer:
        progress.start("transform", len(emb))
        try:
            for start in range(0, len(emb), block_rows):
                mapped = adapter.apply(np.asarray(emb.embeddings[start : start + block_rows], dtype=np.float32))
                if old is not None:
                    rows = np.asarray(old.embeddings[old_rows[start : start + block_rows]], dtype=np.float32)
                    mapped = slerp(rows, mapped, blend_weight)
                writer.write(start, mapped)
                release_rows(emb.embeddings, start, start + block_rows)
                progress.advance(len(mapped))
        finally:
            progress.stop()
    logger.info("mapped %d rows of %s with the %s adapter into %s", len(emb), emb_path, adapter.kind, out)
    return {"out": str(out), "rows": len(emb), "adapter": adapter.describe(), "blend": blend_record,
            "dim": adapter.target_dim}
