"""Data in: list files, ImageFolder trees, the embedded emoji dataset, transforms, the dataset
writers. A benchmark's own files (GLDv2's CSVs, Revisited Oxford/Paris ground truth) are read by
its package in :mod:`bctool.evaluate.protocols`.

The names below are imported on first use, so importing this package loads neither torch nor PIL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bctool.data.images import load_rgb
    from bctool.data.sources import ImageRecord, ImageSet, load_image_set
    from bctool.data.transforms import Preprocess

_HOMES = {
    "ImageRecord": "bctool.data.sources",
    "ImageSet": "bctool.data.sources",
    "Preprocess": "bctool.data.transforms",
    "load_image_set": "bctool.data.sources",
    "load_rgb": "bctool.data.images",
}

__all__ = ["ImageRecord", "ImageSet", "Preprocess", "load_image_set", "load_rgb"]


def __getattr__(name: str) -> Any:
    """Import one of :data:`__all__` from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
