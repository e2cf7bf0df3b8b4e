"""Fashion-MNIST (Zalando, MIT) from its IDX files, as PNGs and list files for extended-data.

Debian's ``dataset-fashion-mnist`` installs the four gzipped IDX files under
``/usr/share/datasets/fashion-mnist``. ``write_fashion_mnist_dataset`` writes every image once
as a PNG and list files for the extended-data setting: the old model sees a share of the
training images of every class, the new model all of them; retrieval runs on the test set
(a few queries per class against the rest).
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bctool.errors import DataError
from bctool.utils.io import atomic_write_text
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type byte -> big-endian numpy dtype (the format's own table)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class FashionSplit:
    """Which images go into the extended-data lists."""

    seed: int = 0
    train_per_class: int | None = None  # new-model training images per class (None: all 6,000)
    old_fraction: float = 0.3  # share of each class's training images the old model sees
    query_per_class: int = 100  # test images per class used as queries; the rest is the gallery


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its stored shape and type."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}; re-install or re-download it") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES:
        raise DataError(f"{str(path)!r} is not an IDX file (bad magic {raw[:4].hex() or 'empty'}); "
                        "pass the Fashion-MNIST *-ubyte(.gz) files")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"IDX file {str(path)!r} holds {len(raw)} bytes, its header {shape} needs {expected}; "
                        "the file is truncated or corrupt: re-install it")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise DataError(f"no {stem}(.gz) in {str(source)!r}; install Debian's dataset-fashion-mnist "
                    f"(apt install dataset-fashion-mnist) or pass --source FOLDER holding the IDX files")


def load_fashion_mnist(source: str | os.PathLike[str] = DEFAULT_SOURCE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images N x 28 x 28 uint8, labels N), "test": (...)}`` from the IDX files."""
    source = Path(source)
    out = {}
    for part, (images_stem, labels_stem) in FILES.items():
        images, labels = read_idx(_find(source, images_stem)), read_idx(_find(source, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {part}: images {images.shape} and labels {labels.shape} do not "
                            "match (expected N x H x W and N)")
        if images.dtype != np.uint8 or (labels.size and int(labels.max()) >= len(CLASS_NAMES)):
            raise DataError(f"Fashion-MNIST {part}: expected uint8 images and labels 0-{len(CLASS_NAMES) - 1}")
        out[part] = (images, labels.astype(np.int64))
    return out


def _write_images(folder: Path, images: np.ndarray, progress: Progress) -> None:
    """All images as ``folder/NNNNN.png``, written into a temporary folder renamed at the end,
    so an interrupted run leaves no partial folder (and no fsync per file is needed); each
    image (or a folder already whole) is counted on ``progress``."""
    if folder.is_dir() and sum(1 for _ in folder.glob("*.png")) == len(images):
        progress.advance(len(images))
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp / f"{i:05d}.png", format="PNG")
            progress.advance()
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_indices(labels: np.ndarray, per_class: int | None, rng: random.Random, *,
                  fraction: float | None = None, count: int | None = None) -> tuple[list[int], list[int]]:
    """Per class, shuffle the indices, keep ``per_class`` of them (all when None) and cut them
    into a first part (``fraction`` of them, or ``count`` of them) and the rest."""
    first, rest = [], []
    for label in range(len(CLASS_NAMES)):
        idx = [int(i) for i in np.flatnonzero(labels == label)]
        rng.shuffle(idx)
        idx = idx[:per_class] if per_class is not None else idx
        cut = round(len(idx) * fraction) if fraction is not None else count
        first += idx[:cut]
        rest += idx[cut:]
    return sorted(first), sorted(rest)


def write_fashion_mnist_dataset(out_dir: str | os.PathLike[str], split: FashionSplit = FashionSplit(),
                                source: str | os.PathLike[str] = DEFAULT_SOURCE,
                                progress: Progress = NULL_PROGRESS) -> dict:
    """Write ``OUT/images/{train,test}/NNNNN.png`` and the lists ``old_train.txt`` (extended-data:
    ``old_fraction`` of every class), ``new_train.txt``, ``query.txt`` and ``gallery.txt``.
    ``progress`` counts the images (one task, "write images")."""
    if not 0 < split.old_fraction <= 1:
        raise DataError(f"old_fraction {split.old_fraction} must lie in (0, 1]")
    if split.train_per_class is not None and split.train_per_class < 2:
        raise DataError(f"train_per_class {split.train_per_class} must be at least 2")
    if split.query_per_class < 1:
        raise DataError(f"query_per_class {split.query_per_class} must be at least 1")
    out = Path(out_dir)
    data = load_fashion_mnist(source)
    progress.start("write images", sum(len(images) for images, _ in data.values()))
    try:
        for part, (images, _) in data.items():
            _write_images(out / "images" / part, images, progress)
    finally:
        progress.stop()
    rng = random.Random(split.seed)
    old, kept = split_indices(data["train"][1], split.train_per_class, rng, fraction=split.old_fraction)
    new = sorted(old + kept)
    query, gallery = split_indices(data["test"][1], None, rng, count=split.query_per_class)
    if not gallery:
        raise DataError(f"query_per_class {split.query_per_class} leaves no test image for the gallery")

    def lines(part: str, indices: list[int]) -> str:
        labels = data[part][1]
        return "".join(f"images/{part}/{i:05d}.png\t{CLASS_NAMES[labels[i]]}\n" for i in indices)

    files = {
        "old_train.txt": lines("train", old),
        "new_train.txt": lines("train", new),
        "query.txt": lines("test", query),
        "gallery.txt": lines("test", gallery),
    }
    for name, text in files.items():
        atomic_write_text(out / name, text)
    logger.info("wrote Fashion-MNIST lists to %s", out)
    return {
        "out_dir": str(out),
        "classes": len(CLASS_NAMES),
        "image_size": int(data["train"][0].shape[1]),
        "lists": {name: str(out / name) for name in files},
        "images": {name: text.count("\n") for name, text in files.items()},
    }
