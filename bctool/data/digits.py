"""scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as PNGs and extended-data lists.

The images ship inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``: 64 grey values from
0 to 16 and the digit, one image a line), so ``pip install scikit-learn`` brings them; bctool
reads the file directly and needs scikit-learn for nothing else. The split is Fashion-MNIST's in
small: per class, ``test_fraction`` of the images are held out for retrieval (``query_per_class``
of them query the rest), the new model trains on the others and the old model on
``old_fraction`` of those (extended-data).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bctool.errors import DataError
from bctool.utils.io import atomic_write_text
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)


def default_source() -> Path | None:
    """scikit-learn's ``digits.csv.gz`` when scikit-learn is installed, else None."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@dataclass(frozen=True)
class DigitsSplit:
    """Which images go into the extended-data lists."""

    seed: int = 0
    test_fraction: float = 0.4  # of every class, held out for query and gallery
    query_per_class: int = 20  # held-out images a class that query the rest
    old_fraction: float = 0.3  # of every class's training images, seen by the old model


def load_digits(source: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 8, 8) uint8 scaled to 0-255 and their digits (N,) from ``digits.csv.gz``."""
    path = Path(source)
    try:
        with gzip.open(path, "rt") as fh:
            rows = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read the digits file {str(path)!r}: {exc}; pip install scikit-learn, "
                        "or pass --param source=PATH/digits.csv.gz") from exc
    if rows.shape[1] != 65 or rows[:, :64].min() < 0 or rows[:, :64].max() > 16:
        raise DataError(f"{str(path)!r} is not scikit-learn's digits file: {rows.shape[1]} columns (want 65, "
                        "64 grey values 0-16 and the digit)")
    images = np.rint(rows[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return images, rows[:, 64].astype(np.int64)


def write_digits_dataset(out_dir: str | os.PathLike[str], split: DigitsSplit = DigitsSplit(),
                         source: str | os.PathLike[str] | None = None, progress: Progress = NULL_PROGRESS) -> dict:
    """Write ``OUT/images/NNNN.png`` and ``old_train.txt``, ``new_train.txt``, ``query.txt``,
    ``gallery.txt``; return a summary. ``progress`` counts the images (one task, "write images")."""
    if not 0 < split.test_fraction < 1 or not 0 < split.old_fraction <= 1:
        raise DataError(f"test_fraction {split.test_fraction} must lie in (0, 1) and old_fraction "
                        f"{split.old_fraction} in (0, 1]")
    source = source or default_source()
    if source is None:
        raise DataError("the digits ship with scikit-learn, which is not installed: pip install scikit-learn")
    images, labels = load_digits(source)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    progress.start("write images", len(images))
    try:
        for i, image in enumerate(images):
            target = out / "images" / f"{i:04d}.png"
            if not target.exists():
                Image.fromarray(image, "L").save(target)
            progress.advance()
    finally:
        progress.stop()
    rng = random.Random(split.seed)
    parts: dict[str, list[int]] = {"old_train.txt": [], "new_train.txt": [], "query.txt": [], "gallery.txt": []}
    for digit in range(10):
        idx = [int(i) for i in np.flatnonzero(labels == digit)]
        rng.shuffle(idx)
        held = round(len(idx) * split.test_fraction)
        test, train = idx[:held], idx[held:]
        if split.query_per_class >= len(test):
            raise DataError(f"query_per_class {split.query_per_class} leaves no held-out image of digit {digit} "
                            f"for the gallery ({len(test)} held out)")
        parts["query.txt"] += test[:split.query_per_class]
        parts["gallery.txt"] += test[split.query_per_class:]
        parts["new_train.txt"] += train
        parts["old_train.txt"] += train[:max(1, round(len(train) * split.old_fraction))]
    for name, indices in parts.items():
        atomic_write_text(out / name, "".join(f"images/{i:04d}.png\tdigit{labels[i]}\n" for i in sorted(indices)))
    logger.info("wrote the digits lists to %s", out)
    return {"out_dir": str(out), "classes": 10, "image_size": 8,
            "lists": {name: str(out / name) for name in parts},
            "images": {name: len(indices) for name, indices in parts.items()}}
