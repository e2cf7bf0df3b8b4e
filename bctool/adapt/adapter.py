"""Adapters: a fitted map between two embedding spaces, its file, and how it is fitted.

:func:`fit_adapter` pairs the rows of two embeddings files of the same images by id (never by
row order), holds a seeded share of the pairs out, fits a map of a registered kind
(:mod:`bctool.adapt.maps`) on the rest and reports the fit on the held-out pairs: the mean cosine
to the target row, and, where the rows have labels, the retrieval mAP of the mapped held-out
rows searched against the target rows (and of the target rows themselves, the ceiling).

An adapter file is safetensors: the map's tensors plus metadata (JSON strings): ``format``
(``bctool.adapter``), ``format_version``, ``kind``, ``params``, ``source_dim``, ``target_dim``,
``source_model`` and ``target_model`` (the ``model`` records of the two embeddings files) and
``fit`` (the figures).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bctool import __version__
from bctool.adapt.maps import ADAPTERS
from bctool.checkpoint import file_sha256
from bctool.embeddings import Embeddings, RowIds, has_repeats, normalize_rows, pair_rows
from bctool.errors import ConfigError, EmbeddingsError, shown
from bctool.utils.io import atomic_path, check_format_version
from bctool.registry import resolve_params

logger = logging.getLogger(__name__)

FORMAT = "bctool.adapter"
FORMAT_VERSION = "1"


@dataclass
class Adapter:
    """A fitted map from ``source_model``'s space to ``target_model``'s."""

    kind: str
    params: Any  # the kind's Params instance
    module: nn.Module
    source_dim: int
    target_dim: int
    source_model: dict[str, Any]
    target_model: dict[str, Any]
    fit: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # the file it was read from
    sha256: str = ""  # of that file

    @torch.no_grad()
    def apply(self, rows: np.ndarray) -> np.ndarray:
        """Map (N, source_dim) rows (raw or normalised) to L2-normalised (N, target_dim) rows."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.source_dim:
            raise EmbeddingsError(f"the adapter maps {self.source_dim}-d rows, got rows of shape {rows.shape}")
        mapped = self.module(torch.from_numpy(normalize_rows(rows))).numpy()
        return normalize_rows(mapped)

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity: kind, dimensions, the two models, the file."""
        return {"kind": self.kind, "source_dim": self.source_dim, "target_dim": self.target_dim,
                "source_model": _identity(self.source_model), "target_model": _identity(self.target_model),
                "path": self.path, "sha256": self.sha256}


def _identity(model: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``model`` record that name a model (no class lists)."""
    return {k: v for k, v in model.items() if k in ("sha256", "arch", "embedding_dim", "path", "adapter", "source")}


def pair_by_id(source: Embeddings, target: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``source`` and ``target`` holding the same ids (in source order). Repeated ids, or
    files without ids, are refused; ids in one file only are dropped (logged)."""
    for name, emb in (("SOURCE", source), ("TARGET", target)):
        if not emb.ids_known:
            raise EmbeddingsError(f"{name} has no ids, so its rows cannot be paired with the other file's; "
                                  "write it with `bctool extract` or `bctool convert --ids`")
        if has_repeats(emb.ids):
            raise EmbeddingsError(f"{name} lists some ids more than once; each image must appear once to be paired")
    if isinstance(source.ids, RowIds) and source.ids == target.ids:  # one list embedded twice: row i pairs row i
        rows = np.arange(len(source), dtype=np.int64)
        return rows, rows
    src, tgt = pair_rows(source.ids, target.ids, ("SOURCE", "TARGET"))
    if src.size == 0:
        raise EmbeddingsError(
            f"SOURCE and TARGET share no id (SOURCE {shown(source.ids)}, TARGET {shown(target.ids)}); embed the "
            "same images with both models (the same list file)")
    if src.size != len(source) or tgt.size != len(target):
        logger.warning("%d of %d SOURCE rows and %d of %d TARGET rows share an id; the others are not used",
                       src.size, len(source), tgt.size, len(target))
    return src, tgt


def _labels_of(source: Embeddings, target: Embeddings, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """One label index per pair (by name, from whichever file has one), -1 where neither does."""
    source_names, target_names = source.label_strings(), target.label_strings()
    names = [source_names[i] if source_names[i] is not None else target_names[j] for i, j in zip(src, tgt)]
    vocab = {name: i for i, name in enumerate(sorted({n for n in names if n is not None}))}
    return np.array([vocab[n] if n is not None else -1 for n in names], dtype=np.int64)


# Held-out rows searched as queries at most, and held-out rows searched at most (seeded samples).
HELD_OUT_QUERIES, HELD_OUT_GALLERY = 2000, 20000


def _held_out_map(mapped: np.ndarray, target: np.ndarray, labels: np.ndarray,
                  seed: int = 0) -> tuple[float | None, float | None]:
    """mAP of the mapped held-out rows searched against the target held-out rows (each other row
    with the same label is relevant; the row's own pair is excluded), and of the target rows
    against themselves; None without two labelled rows of a class. At most
    :data:`HELD_OUT_QUERIES` rows (a seeded sample) are queries, so a large fit stays quick
    (the caller passes at most :data:`HELD_OUT_GALLERY` rows)."""
    from bctool.evaluate.retrieval import evaluate_retrieval

    if (labels >= 0).sum() < 2:
        return None, None
    ids = [str(i) for i in range(len(labels))]
    names = [str(v) for v in range(int(labels.max()) + 1)]
    queries = np.arange(len(labels))
    if len(queries) > HELD_OUT_QUERIES:
        queries = np.sort(np.random.default_rng(seed).choice(len(labels), HELD_OUT_QUERIES, replace=False))

    def emb(rows: np.ndarray, chosen: np.ndarray | None = None) -> Embeddings:
        if chosen is None:
            return Embeddings(rows.astype(np.float32), labels, ids, names, normalized=True)
        return Embeddings(rows[chosen].astype(np.float32), labels[chosen], [ids[i] for i in chosen], names,
                          normalized=True)

    quiet = logging.getLogger("bctool.evaluate")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # held-out rows without a same-class partner are expected, not news
    try:
        return (float(evaluate_retrieval(emb(mapped, queries), emb(target))["map"]),
                float(evaluate_retrieval(emb(target, queries), emb(target))["map"]))
    except (EmbeddingsError, ConfigError):  # no query with a relevant row
        return None, None
    finally:
        quiet.setLevel(level)


def fit_adapter(source: Embeddings, target: Embeddings, kind: str = "affine", params: dict[str, Any] | None = None,
                holdout: float = 0.1, seed: int = 0, max_pairs: int | None = None) -> Adapter:
    """Fit a ``kind`` map from ``source``'s space to ``target``'s on the pairs of rows with the
    same id; ``holdout`` of the pairs (seeded) are kept out of the fit and report it. With
    ``max_pairs``, at most that many pairs (a seeded sample) are read: memory is bounded by it,
    not by the files.

    Fewer pairs fitted on than the source dimension is warned about, whatever the kind: a map of
    d_s-dimensional rows is then underdetermined (least squares has more unknowns per output than
    equations; Procrustes leaves the directions the pairs do not span to chance), so it fits the
    pairs and says little about other rows."""
    entry = ADAPTERS.entry(kind)
    resolved = resolve_params("adapter kind", kind, entry.params, params)
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout} must lie in [0, 1)")
    src, tgt = pair_by_id(source, target)
    shared = len(src)
    if max_pairs is not None and len(src) > max_pairs:
        chosen = np.sort(np.random.default_rng(seed).choice(len(src), max_pairs, replace=False))
        src, tgt = src[chosen], tgt[chosen]
    x = normalize_rows(np.asarray(source.embeddings[src], dtype=np.float32))
    y = normalize_rows(np.asarray(target.embeddings[tgt], dtype=np.float32))
    labels = _labels_of(source, target, src, tgt)
    order = np.random.default_rng(seed).permutation(len(src))
    held = order[: int(round(holdout * len(src)))]
    used = order[len(held):]
    if len(used) < 2:
        raise ConfigError(f"only {len(used)} pairs are left to fit on ({len(src)} shared ids, --holdout {holdout}); "
                          "embed more images with both models")
    if len(used) < source.dim:
        needed = math.ceil(source.dim / (1 - holdout))
        fix = ("raise --max-pairs" if len(src) < shared else
               f"embed more images with both models (about {needed} with --holdout {holdout:g})")
        logger.warning("the %s adapter is fitted on %d pairs, fewer than the %d dimensions of SOURCE: the map is "
                       "underdetermined and fits these pairs rather than the space; fit on at least %d pairs: %s",
                       kind, len(used), source.dim, source.dim, fix)
    started = time.perf_counter()
    torch.manual_seed(seed)
    module = entry.obj(torch.from_numpy(x[used]), torch.from_numpy(y[used]), torch.from_numpy(labels[used]),
                       resolved).eval()
    seconds = time.perf_counter() - started
    adapter = Adapter(kind, resolved, module, source.dim, target.dim, dict(source.model), dict(target.model))
    fit: dict[str, Any] = {"pairs": int(len(src)), "shared_ids": int(shared), "fitted_on": int(len(used)), "held_out": int(len(held)),
                           "seconds": round(seconds, 3), "seed": seed}
    fit["train_cosine"] = float((adapter.apply(x[used]) * y[used]).sum(1).mean())
    if len(held):
        mapped = adapter.apply(x[held])
        fit["held_out_cosine"] = float((mapped * y[held]).sum(1).mean())
        fit["held_out_cosine_unmapped"] = (float((x[held] * y[held]).sum(1).mean()) if source.dim == target.dim
                                           else None)
        searched = np.arange(len(held))
        if len(held) > HELD_OUT_GALLERY:  # a sample of the held-out pairs: the search stays quick
            searched = np.sort(np.random.default_rng(seed).choice(len(held), HELD_OUT_GALLERY, replace=False))
        fit["held_out_map"], fit["held_out_map_target"] = _held_out_map(
            mapped[searched], y[held][searched], labels[held][searched], seed)
    adapter.fit = fit
    logger.info("fitted a %s adapter %d -> %d on %d pairs in %.1f s: %s", kind, source.dim, target.dim, len(used),
                seconds, {k: v for k, v in fit.items() if "cosine" in k or "map" in k})
    return adapter


def save_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> None:
    """Write ``adapter`` to ``path`` atomically (safetensors; see the module docstring)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.module.state_dict().items()}
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": adapter.kind,
        "params": json.dumps(asdict(adapter.params) if adapter.params is not None else {}),
        "source_dim": str(adapter.source_dim),
        "target_dim": str(adapter.target_dim), "source_model": json.dumps(adapter.source_model),
        "target_model": json.dumps(adapter.target_model), "fit": json.dumps(adapter.fit), "bctool": __version__,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read an adapter file; anything else is an error naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"adapter file {str(path)!r} does not exist; fit one with `bctool adapt`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable adapter file ({exc}); fit it again with `bctool adapt`") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not an adapter file (format {meta.get('format')!r}); pass a file "
                          "written by `bctool adapt`")
    check_format_version(path, meta, "bctool adapter", FORMAT_VERSION, ConfigError)
    try:
        kind = meta["kind"]
        entry = ADAPTERS.entry(kind)
        params = resolve_params("adapter kind", kind, entry.params, json.loads(meta["params"]))
        source_dim, target_dim = int(meta["source_dim"]), int(meta["target_dim"])
        module = entry.declares["build"](source_dim, target_dim, params)
        module.load_state_dict(tensors)
        return Adapter(kind, params, module.eval(), source_dim, target_dim, json.loads(meta["source_model"]),
                       json.loads(meta["target_model"]), json.loads(meta.get("fit", "{}")), str(path.resolve()),
                       file_sha256(path))
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"{str(path)!r} has corrupt adapter metadata or tensors ({exc}); fit it again") from exc
