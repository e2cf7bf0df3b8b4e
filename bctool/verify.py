"""Does a model reproduce a stored embeddings file? (``bctool verify``)

A sample of the rows of a stored embeddings file is embedded again by a model, from the same
images, and each new row is compared with its stored row by cosine. A wrong preprocessing
setting (resize rule, crop, normalisation), a different model, or drift after a library
upgrade shows as rows well below 1. That is the check to run before training a new model
against an old system's embeddings, and after any change to the embedding service.

The images are found through the file's own record: its ``root`` and its ids (an id is the
image's path relative to the root, without its extension; an id that two files of different
extensions could be is refused), or through a list file (``--data``) whose ids match the
stored ones. The stored file may be in any format ``bctool convert`` reads (``.npy`` with its
ids beside it, parquet, a faiss index); those record no root, so ``--data`` names the images.

When rows fall below the threshold, the report's ``diagnosis`` re-embeds the worst of them
with one preprocessing step changed at a time (the filter, the normalisation, the crop, the
resize rule, the background) and lists the changes that bring them closer, best first, each as
the ``bctool import`` option that makes it: a wrong step is named, not only detected.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bctool.checkpoint import Checkpoint
from bctool.data.transforms import BACKGROUNDS, INTERPOLATIONS, NORMALISATIONS, RESIZE_RULES, Preprocess
from bctool.data.sources import ImageRecord, ImageSet
from bctool.embeddings import Embeddings
from bctool.embeddings.ids import find_rows
from bctool.errors import ConfigError, DataError
from bctool.extract import extract
from bctool.utils.progress import NULL_PROGRESS, Progress

QUANTILES = (0.001, 0.01, 0.05, 0.5)
SHOWN = 10  # rows below the threshold named in the report
DIAGNOSED = 32  # of the rows below the threshold, the worst re-embedded under each change
CROPS = (1.0, 0.95, 0.9, 0.875)  # the crop fractions common in the wild (timm's, TensorFlow's)


@dataclass(frozen=True)
class VerifyOptions:
    """How many rows to check, how close they must be, and how to draw them."""

    sample: int = 1000
    threshold: float = 0.99  # a row's cosine to its stored row must be at least this
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        if self.sample < 1:
            raise ConfigError(f"--sample {self.sample} must be at least 1")
        if not -1 <= self.threshold <= 1:
            raise ConfigError(f"--threshold {self.threshold} must be a cosine, from -1 to 1")


def _file_of(root: Path, image_id: str) -> Path:
    """The one file under ``root`` whose path without extension is ``image_id``."""
    target = root / image_id
    found = sorted(p for p in target.parent.glob(f"{target.name}.*") if p.is_file()) if target.parent.is_dir() else []
    if not found:
        raise DataError(f"no image for id {image_id!r} under {str(root)!r} (looked for {str(target)}.*); pass --data "
                        "LIST naming the images, or the folder they live in now")
    if len(found) > 1:
        raise DataError(f"id {image_id!r} matches {len(found)} files under {str(root)!r} "
                        f"({', '.join(p.name for p in found)}): pass --data LIST to say which image each id is")
    return found[0]


def images_of(stored: Embeddings, rows: np.ndarray, data: ImageSet | None = None) -> ImageSet:
    """The images behind ``rows`` of ``stored``: by ``data``'s ids, or under the file's root."""
    ids = [str(stored.ids[int(r)]) for r in rows]
    if data is not None:
        found = find_rows(data.ids, ids, f"the list {data.source!r}")
        missing = [i for i, row in zip(ids, found) if row < 0]
        if missing:
            raise DataError(f"{len(missing)} stored ids are not in {data.source!r} (e.g. {missing[0]!r}); the list "
                            "must name the images the stored rows were made from, with the same ids")
        records = tuple(data.records[int(row)] for row in found)
        return ImageSet(data.root, records, data.label_names, data.source)
    if not stored.root:
        raise DataError("the stored file records no dataset root; pass --data LIST naming its images")
    root = Path(stored.root)
    records = tuple(ImageRecord(path=_file_of(root, i), id=i, label=-1) for i in ids)
    return ImageSet(root, records, (), str(root))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def verify(stored: Embeddings, checkpoint: Checkpoint, options: VerifyOptions = VerifyOptions(),
           data: ImageSet | None = None, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Embed a sample of ``stored``'s images again with ``checkpoint`` and compare each row with
    its stored row: the cosines' minimum, mean and quantiles, and the rows below the threshold."""
    if stored.dim != checkpoint.config.embedding_dim:
        raise ConfigError(f"the stored rows have dimension {stored.dim}, the model makes {checkpoint.config.embedding_dim}: "
                          "it is not the model behind this file")
    count = min(options.sample, len(stored))
    rows = np.sort(np.random.default_rng(options.seed).choice(len(stored), count, replace=False))
    images = images_of(stored, rows, data)
    made = extract(images, checkpoint, workers=options.workers, progress=progress)
    cosines = (_unit(made.embeddings) * _unit(np.asarray(stored.embeddings[rows]))).sum(axis=1)
    below = np.flatnonzero(cosines < options.threshold)
    worst = below[np.argsort(cosines[below])][:SHOWN]
    diagnosis = []
    if below.size:
        picked = below[np.argsort(cosines[below])][:DIAGNOSED]
        subset = ImageSet(images.root, tuple(images.records[int(i)] for i in picked), images.label_names, images.source)
        diagnosis = diagnose(subset, np.asarray(stored.embeddings[rows[picked]]), checkpoint, options,
                             float(cosines[picked].mean()))
    return {
        "rows": len(stored), "checked": count, "threshold": options.threshold,
        "min": float(cosines.min()), "mean": float(cosines.mean()),
        "quantiles": {f"{q:g}": float(np.quantile(cosines, q)) for q in QUANTILES},
        "below_threshold": int(below.size),
        "worst": [{"id": str(stored.ids[int(rows[i])]), "cosine": float(cosines[i])} for i in worst],
        "passed": bool(below.size == 0),
        "diagnosis": diagnosis,
        "model": checkpoint.identity(), "stored_model": stored.model,
        "images": os.fspath(images.root),
    }


def preprocess_changes(pre: Preprocess) -> list[tuple[str, Preprocess]]:
    """Every preprocessing one step away from ``pre`` that users' pipelines commonly differ by,
    each with the ``bctool import`` options that make it."""
    out: list[tuple[str, Preprocess]] = []
    out += [(f"--interpolation {name}", dataclasses.replace(pre, interpolation=name))
            for name in INTERPOLATIONS if name != pre.interpolation]
    out += [(f"--mean {name} --std {name}", dataclasses.replace(pre, mean=mean, std=std))
            for name, (mean, std) in NORMALISATIONS.items() if (tuple(pre.mean), tuple(pre.std)) != (mean, std)]
    out += [(f"--crop {crop:g}", dataclasses.replace(pre, crop_fraction=crop)) for crop in CROPS
            if abs(crop - pre.crop_fraction) > 1e-9]
    out += [(f"--resize {rule}", dataclasses.replace(pre, resize=rule)) for rule in RESIZE_RULES if rule != pre.resize]
    out += [(f"--background {name}", dataclasses.replace(pre, background=rgb)) for name, rgb in BACKGROUNDS.items()
            if tuple(pre.background) != rgb]
    return out


def diagnose(images: ImageSet, stored_rows: np.ndarray, checkpoint: Checkpoint, options: VerifyOptions,
             base: float) -> list[dict[str, Any]]:
    """Re-embed ``images`` (whose stored rows are ``stored_rows``) under each one-step change of
    the model's preprocessing; the changes that raise the mean cosine above ``base`` (the mean
    as it is), best first, each with
    its minimum and mean cosine and whether every row then passes the threshold. A model file
    that normalises inside its graph is tried without the normalisation changes."""
    target = _unit(stored_rows)
    fixed_norm = checkpoint.extra.get("model_file") is not None and tuple(checkpoint.preprocess.std) == (1.0, 1.0, 1.0)
    found = []
    for option, pre in preprocess_changes(checkpoint.preprocess):
        if fixed_norm and option.startswith("--mean"):
            continue
        made = extract(images, dataclasses.replace(checkpoint, preprocess=pre), workers=0)
        cosines = (_unit(made.embeddings) * target).sum(axis=1)
        if cosines.mean() > base + 1e-6:
            found.append({"change": option, "min": float(cosines.min()), "mean": float(cosines.mean()),
                          "passes": bool(cosines.min() >= options.threshold)})
    return sorted(found, key=lambda d: -d["mean"])[:5]


def verify_file(stored: str | os.PathLike[str], model: str | os.PathLike[str], options: VerifyOptions = VerifyOptions(),
                data: str | os.PathLike[str] | None = None, progress: Progress = NULL_PROGRESS,
                device: str = "cpu") -> dict[str, Any]:
    """:func:`verify` from paths: ``stored`` in any format ``convert`` reads, ``model`` a
    checkpoint or a model file, ``data`` an optional image list."""
    from bctool.checkpoint import load_model
    from bctool.convert import read_embeddings_any
    from bctool.data.sources import load_image_set

    rows = read_embeddings_any(stored)
    images = load_image_set(data, require_labels=False, labels_used=False) if data is not None else None
    if images is None and not rows.root:
        raise DataError(f"{os.fspath(stored)!r} records no dataset root (only bctool's own files do); pass --data LIST "
                        "naming the images behind its rows, by the same ids")
    return verify(rows, load_model(model, device=device), options, images, progress)


def recorded_root(stored: str | os.PathLike[str]) -> str | None:
    """The image root a stored file records (bctool's own files only; None for the others)."""
    from bctool.convert import FORMATS, format_of
    from bctool.embeddings import load_embeddings

    if format_of(stored, "SRC") is not FORMATS[".safetensors"]:
        return None
    return load_embeddings(stored, mmap=True).root or None
