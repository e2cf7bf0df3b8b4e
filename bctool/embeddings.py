"""Embeddings files: safetensors with ``embeddings`` (N x D float32) and ``labels`` (N int64).

Metadata (all JSON strings, as safetensors requires ``dict[str, str]``):

- ``format``: ``"bctool.embeddings"``; ``format_version``: ``"1"``;
- ``ids``: JSON list of N strings, the image path relative to the dataset root without extension;
- ``label_names``: JSON list; label ``i`` means ``label_names[i]``, ``-1`` means unknown;
- ``model``: JSON object naming the model that made the rows
  (``sha256`` of the checkpoint file, ``arch``, ``embedding_dim``, ``path``);
- ``normalized``: ``"true"`` if rows are L2-normalised (bctool writes raw rows: ``"false"``);
- ``root``: the absolute dataset root the ids are relative to (``""`` when unknown).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from bctool.errors import EmbeddingsError
from bctool.io import atomic_path

FORMAT = "bctool.embeddings"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Embeddings:
    """Rows of embeddings with their ids, labels and the identity of the model that made them."""

    embeddings: np.ndarray  # (N, D) float32, raw (not normalised) unless ``normalized``
    labels: np.ndarray  # (N,) int64, -1 where unknown
    ids: list[str]
    label_names: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    normalized: bool = False
    root: str = ""  # dataset root the ids are relative to; "" when unknown

    def __post_init__(self) -> None:
        emb, labels = self.embeddings, self.labels
        if emb.ndim != 2:
            raise EmbeddingsError(f"embeddings must be a 2-D (N x D) array, got shape {emb.shape}")
        n = emb.shape[0]
        if labels.shape != (n,):
            raise EmbeddingsError(f"labels must have shape ({n},), got {labels.shape}")
        if len(self.ids) != n:
            raise EmbeddingsError(f"{n} embeddings but {len(self.ids)} ids; they must match")
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

    def normalized_embeddings(self) -> np.ndarray:
        """L2-normalised rows (float32); zero rows stay zero."""
        emb = np.asarray(self.embeddings, dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)


def save_embeddings(emb: Embeddings, path: str | os.PathLike[str]) -> None:
    """Write ``emb`` to ``path`` atomically as a safetensors file."""
    tensors = {
        "embeddings": np.ascontiguousarray(emb.embeddings, dtype=np.float32),
        "labels": np.ascontiguousarray(emb.labels, dtype=np.int64),
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ids": json.dumps(emb.ids),
        "label_names": json.dumps(emb.label_names),
        "model": json.dumps(emb.model),
        "normalized": json.dumps(emb.normalized),
        "root": emb.root,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        return dict(fh.metadata() or {})


def load_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """Read an embeddings file written by :func:`save_embeddings` (or a compatible tool)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file {str(path)!r} does not exist; run `bctool extract` first")
    try:
        tensors = load_file(str(path))
        meta = _read_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise EmbeddingsError(
            f"{str(path)!r} is not a readable safetensors file ({exc}); "
            "re-create it with `bctool extract`"
        ) from exc
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
    try:
        ids = json.loads(meta["ids"]) if "ids" in meta else [str(i) for i in range(n)]
        label_names = json.loads(meta.get("label_names", "[]"))
        model = json.loads(meta.get("model", "{}"))
        normalized = bool(json.loads(meta.get("normalized", "false")))
    except json.JSONDecodeError as exc:
        raise EmbeddingsError(f"{str(path)!r} has corrupt metadata ({exc}); re-create it") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise EmbeddingsError(f"{str(path)!r}: metadata 'ids' must be a JSON list of strings")
    return Embeddings(
        embeddings=emb.astype(np.float32, copy=False),
        labels=labels.astype(np.int64, copy=False),
        ids=ids,
        label_names=[str(x) for x in label_names],
        model=model if isinstance(model, dict) else {},
        normalized=normalized,
        root=meta.get("root", ""),
    )
