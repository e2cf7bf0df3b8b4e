"""A dataset writer: coloured noise blobs, a class per colour, with bctool's list files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bctool.registry import param


@dataclass(frozen=True)
class BlobParams:
    """How many classes and images."""

    classes: int = param(6, low=2, help="number of classes (colours)")
    per_class: int = param(4, low=2, help="images per class")
    seed: int = 0


def write_blobs(out_dir: Path, params: BlobParams) -> dict:
    """Coloured noise images, one colour per class: train.txt (half of each class) and test.txt."""
    rng = np.random.default_rng(params.seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    colours = rng.uniform(0, 255, (params.classes, 3))
    lists: dict[str, list[str]] = {"train.txt": [], "test.txt": []}
    for c in range(params.classes):
        for i in range(params.per_class):
            pixels = np.clip(colours[c] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"images/c{c}_{i}.png"
            Image.fromarray(pixels).save(out_dir / name)
            lists["train.txt" if i < params.per_class // 2 else "test.txt"].append(f"{name} c{c}")
    for list_name, lines in lists.items():
        (out_dir / list_name).write_text("\n".join(lines) + "\n")
    return {"out_dir": str(out_dir), "classes": params.classes, "images": params.classes * params.per_class}
