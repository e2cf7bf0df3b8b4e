"""Dataset writers by name: each writes images and list files into a folder.

A writer is ``write(out_dir, params) -> summary``, its ``params`` argument annotated with a
frozen dataclass of its parameters; a writer that also takes a ``progress`` keyword is given a
:class:`~bctool.utils.progress.Progress` to count the images it writes. The built-ins are the embedded
emoji set, Fashion-MNIST and scikit-learn's digits, and the entry-point group ``bctool.datasets``
adds others; ``bctool dataset make NAME OUT_DIR --param KEY=VALUE`` writes any of them
(:mod:`bctool.registry`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bctool.data.digits import DigitsSplit, write_digits_dataset
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.fashion_mnist import DEFAULT_SOURCE, FashionSplit, write_fashion_mnist_dataset
from bctool.errors import DataError
from bctool.utils.progress import NULL_PROGRESS, Progress
from bctool.registry import Registry, resolve_params

DatasetWriter = Callable[[Path, Any], dict]


def _admit_writer(name: str, write: object) -> None:
    if not callable(write):
        raise DataError(f"dataset {name!r} must be a writer write(out_dir, params) -> summary, got {write!r}")


def _writer_params(name: str, write: Callable) -> dict[str, Any]:
    """A writer's parameters: the dataclass its ``params`` argument is annotated with."""
    try:
        hint = typing.get_type_hints(write).get("params")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve declares nothing
        hint = None
    return {"params": hint if dataclasses.is_dataclass(hint) else None}


DATASETS: Registry[DatasetWriter] = Registry("dataset", "datasets", error=DataError, admit=_admit_writer,
                                             derive=_writer_params)


@dataclass(frozen=True)
class FashionParams(FashionSplit):
    """The Fashion-MNIST split, and the folder of its four IDX files."""

    source: str = str(DEFAULT_SOURCE)


@DATASETS.register("emoji", params=EmojiSplit)
def write_emoji(out_dir: Path, params: EmojiSplit, progress: Progress = NULL_PROGRESS) -> dict:
    """The embedded emoji set (Google and Twitter renderings) with extended-class lists."""
    return write_emoji_dataset(out_dir, params, progress)


@DATASETS.register("fashion-mnist", params=FashionParams)
def write_fashion(out_dir: Path, params: FashionParams, progress: Progress = NULL_PROGRESS) -> dict:
    """Fashion-MNIST as PNGs with extended-data lists (Debian's dataset-fashion-mnist)."""
    split = FashionSplit(seed=params.seed, train_per_class=params.train_per_class, old_fraction=params.old_fraction,
                         query_per_class=params.query_per_class)
    return write_fashion_mnist_dataset(out_dir, split, params.source, progress)


@dataclass(frozen=True)
class DigitsParams(DigitsSplit):
    """The digits split, and the digits file ("": scikit-learn's, when it is installed)."""

    source: str = ""


@DATASETS.register("digits", params=DigitsParams)
def write_digits(out_dir: Path, params: DigitsParams, progress: Progress = NULL_PROGRESS) -> dict:
    """scikit-learn's handwritten digits (8x8, 10 classes) with extended-data lists (pip install scikit-learn)."""
    split = DigitsSplit(seed=params.seed, test_fraction=params.test_fraction, query_per_class=params.query_per_class,
                        old_fraction=params.old_fraction)
    return write_digits_dataset(out_dir, split, params.source or None, progress)


def _takes_progress(write: Callable) -> bool:
    """Whether a writer accepts a ``progress`` keyword (a plugin's need not)."""
    try:
        parameters = inspect.signature(write).parameters
    except (TypeError, ValueError):  # a callable without a signature takes none
        return False
    return "progress" in parameters


def write_dataset(name: str, out_dir: str | os.PathLike[str], params: Mapping[str, Any] | None = None,
                  progress: Progress = NULL_PROGRESS) -> dict:
    """Write the dataset registered as ``name`` into ``out_dir`` with ``params`` over its defaults;
    a writer that takes ``progress`` counts its images there."""
    entry = DATASETS.entry(name)
    resolved = resolve_params("dataset", name, entry.params, params)
    if _takes_progress(entry.obj):
        return entry.obj(Path(out_dir), resolved, progress=progress)
    return entry.obj(Path(out_dir), resolved)
