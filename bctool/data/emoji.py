"""The embedded emoji dataset: the same ~1,900 emoji drawn by two vendors (Google, Twitter).

One class is one emoji; the two vendors are two views of it. ``write_emoji_dataset`` writes the
PNG files and the list files of the extended-class setting (old model on 30% of the training
classes, new model on all of them, retrieval on held-out classes from one vendor to the other).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image

from bctool.errors import DataError
from bctool.utils.io import atomic_path, atomic_write_text
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)

ASSETS = "assets/emoji"


@dataclass(frozen=True)
class EmojiSplit:
    """Fractions and seed of the extended-class split."""

    seed: int = 0
    test_fraction: float = 0.3  # held-out classes for query/gallery
    old_fraction: float = 0.3  # share of training classes the old model sees
    query_vendor: str = "google"
    gallery_vendor: str = "twitter"
    limit: int | None = None  # keep only this many classes (for quick tests)


def _asset_bytes(name: str) -> bytes:
    return resources.files("bctool.data").joinpath(f"{ASSETS}/{name}").read_bytes()


def load_index() -> dict:
    """The emoji catalogue (tile size, grid columns, vendors, emoji entries)."""
    return json.loads(_asset_bytes("index.json"))


def load_sheet(vendor: str) -> Image.Image:
    """One vendor's sprite sheet as an RGB image."""
    import io

    vendors = load_index()["vendors"]
    if vendor not in vendors:
        raise DataError(f"unknown emoji vendor {vendor!r}; choose one of {vendors}")
    return Image.open(io.BytesIO(_asset_bytes(f"{vendor}.png"))).convert("RGB")


def class_name(entry: dict) -> str:
    """A readable, unique, whitespace-free class name: short name plus code point."""
    return f"{entry['short_name']}-{entry['unified']}".replace(" ", "_")


def split_classes(names: list[str], split: EmojiSplit) -> dict[str, list[str]]:
    """Split class names into held-out test classes, training classes and old classes."""
    if not 0 < split.test_fraction < 1 or not 0 < split.old_fraction <= 1:
        raise DataError(
            f"test_fraction {split.test_fraction} and old_fraction {split.old_fraction} "
            "must lie in (0, 1)"
        )
    order = sorted(names)
    random.Random(split.seed).shuffle(order)
    n_test = max(1, round(len(order) * split.test_fraction))
    test, train = order[:n_test], order[n_test:]
    old = train[: max(1, round(len(train) * split.old_fraction))]
    return {"test": sorted(test), "train": sorted(train), "old": sorted(old)}


def _same_pixels(path: Path, tile: Image.Image) -> bool:
    """True when the image file at ``path`` holds exactly ``tile``'s pixels (a rerun into the
    same folder); False for other pixels or an unreadable file."""
    try:
        with Image.open(path) as existing:
            return existing.size == tile.size and existing.convert("RGBA").tobytes() == tile.convert("RGBA").tobytes()
    except (OSError, ValueError):
        return False


def _write_images(out: Path, index: dict, names: list[str], progress: Progress) -> None:
    """Every vendor's tile of every class ``names`` as ``OUT/images/VENDOR/NAME.png``; a file
    already there must hold the same pixels."""
    size, columns = index["tile_size"], index["columns"]
    progress.start("write images", len(index["vendors"]) * len(names))
    try:
        for vendor in index["vendors"]:
            sheet = load_sheet(vendor)
            folder = out / "images" / vendor
            folder.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names):
                x, y = (i % columns) * size, (i // columns) * size
                target = folder / f"{name}.png"
                tile = sheet.crop((x, y, x + size, y + size))
                if not target.exists():
                    with atomic_path(target) as tmp:  # a killed run leaves no torn PNG
                        tile.save(tmp, format="PNG")
                elif not _same_pixels(target, tile):
                    raise DataError(
                        f"{str(target)!r} is already there and is not the {vendor} {name} emoji bctool ships; it would "
                        f"be listed as that emoji. Write the dataset into an empty folder, or remove {str(folder)!r} first"
                    )
                progress.advance()
    finally:
        progress.stop()


def write_emoji_dataset(out_dir: str | Path, split: EmojiSplit = EmojiSplit(),
                        progress: Progress = NULL_PROGRESS) -> dict:
    """Write PNGs under ``OUT/images/VENDOR/`` and list files ``old_train.txt``,
    ``new_train.txt``, ``query.txt``, ``gallery.txt``; return a summary dict. ``progress``
    counts the images (one task, "write images")."""
    out = Path(out_dir)
    index = load_index()
    entries = index["emoji"][: split.limit] if split.limit else index["emoji"]
    size = index["tile_size"]
    for vendor in (split.query_vendor, split.gallery_vendor):
        if vendor not in index["vendors"]:
            raise DataError(f"unknown emoji vendor {vendor!r}; choose one of {index['vendors']}")
    if split.query_vendor == split.gallery_vendor:
        raise DataError("query and gallery vendors must differ (google and twitter)")
    names = [class_name(e) for e in entries]
    _write_images(out, index, names, progress)
    parts = split_classes(names, split)

    def lines(classes: list[str], vendors: list[str]) -> str:
        return "".join(f"images/{v}/{c}.png\t{c}\n" for c in classes for v in vendors)

    both = list(index["vendors"])
    files = {
        "old_train.txt": lines(parts["old"], both),
        "new_train.txt": lines(parts["train"], both),
        "query.txt": lines(parts["test"], [split.query_vendor]),
        "gallery.txt": lines(parts["test"], [split.gallery_vendor]),
    }
    for fname, text in files.items():
        atomic_write_text(out / fname, text)
    summary = {
        "out_dir": str(out),
        "classes": len(names),
        "image_size": size,
        "old_train_classes": len(parts["old"]),
        "new_train_classes": len(parts["train"]),
        "test_classes": len(parts["test"]),
        "lists": {f: str(out / f) for f in files},
        "images": {f: text.count("\n") for f, text in files.items()},
    }
    logger.info("wrote emoji dataset to %s", out)
    return summary
