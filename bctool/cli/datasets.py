"""`bctool dataset ...`: write built-in datasets to disk.

`dataset make NAME` writes any registered dataset; `dataset emoji` and `dataset fashion-mnist`
are its deprecated spellings, hidden and warning, for one more release."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bctool.cli.app import dataset_app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    QuietAccepted,
    Quiet,
    at_least,
    name_values,
    output_file,
    seed_range,
)
from bctool.cli.output import (
    RichProgress,
    emit_json,
    setup_logging,
)
from bctool.utils.files import FilePlan
from bctool.utils.io import output_lock

# A command with nothing to draw still takes -q (scripts pass it everywhere), hidden from its help.


def _deprecated(alias: str, name: str, out_dir: Path, params: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Warn that ``bctool dataset ALIAS`` goes, naming the `dataset make` command line that does the same."""
    given = " ".join(f"--param {key}={value}" for key, value in params.items() if value != defaults.get(key))
    line = " ".join(["bctool dataset make", name, shlex.quote(str(out_dir)), given]).strip()
    setup_logging(False)
    logging.getLogger(__name__).warning("`bctool dataset %s` is deprecated and goes in a later release: use `%s`",
                                        alias, line)


@dataset_app.command("make")
@reports_errors
def dataset_make(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A registered dataset writer (`bctool list datasets`): emoji, fashion-mnist, digits (scikit-learn's, pip install scikit-learn), or a plugin's.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images and list files into.")],
    params: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="A parameter of the writer as NAME=VALUE (repeatable); `bctool list datasets` shows them and their defaults.")] = None,
    quiet: Quiet = False,
) -> None:
    """Write a dataset by its registered name, with its parameters (any writer, a plugin's too)."""
    from bctool.data.writers import write_dataset

    FilePlan(f"dataset make {name}").write_folder("OUT_DIR", out_dir).check()

    emit_json(write_dataset(name, out_dir, name_values("--param", params, "NAME=VALUE"), RichProgress(not quiet)))


@dataset_app.command("emoji", hidden=True)
@reports_errors
def dataset_emoji(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images/ and the list files into.")],
    seed: Annotated[int, typer.Option(callback=seed_range, help="Seed of the class split.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Share of classes held out for query/gallery.")] = 0.3,
    old_fraction: Annotated[float, typer.Option(help="Share of the training classes the old model sees.")] = 0.3,
    limit: Annotated[Optional[int], typer.Option(callback=at_least(3), help="Keep only the first N emoji (quick experiments).")] = None,
    quiet: Quiet = False,
) -> None:
    """Deprecated: use `bctool dataset make emoji OUT_DIR --param NAME=VALUE`. Write the embedded
    emoji set (Google and Twitter renderings) with extended-class lists."""
    from bctool.data.emoji import EmojiSplit
    from bctool.data.writers import write_dataset

    params = {"seed": seed, "test_fraction": test_fraction, "old_fraction": old_fraction, "limit": limit}
    _deprecated("emoji", "emoji", out_dir, params, vars(EmojiSplit()))
    FilePlan("dataset emoji").write_folder("OUT_DIR", out_dir).check()

    emit_json(write_dataset("emoji", out_dir, params, RichProgress(not quiet)))


@dataset_app.command("fashion-mnist", hidden=True)
@reports_errors
def dataset_fashion_mnist(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images/ and the list files into.")],
    source: Annotated[Optional[Path], typer.Option(help="Folder with the four Fashion-MNIST IDX files, gzipped or not (default: /usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist installs them).")] = None,
    seed: Annotated[int, typer.Option(callback=seed_range, help="Seed of the image selection.")] = 0,
    train_per_class: Annotated[Optional[int], typer.Option(callback=at_least(2), help="Training images per class for the new model (default: all 6,000).")] = None,
    old_fraction: Annotated[float, typer.Option(help="Share of every class's training images the old model sees (extended-data).")] = 0.3,
    query_per_class: Annotated[int, typer.Option(callback=at_least(1), help="Test images per class used as queries; the rest of the test set is the gallery.")] = 100,
    quiet: Quiet = False,
) -> None:
    """Deprecated: use `bctool dataset make fashion-mnist OUT_DIR --param NAME=VALUE`. Write
    Fashion-MNIST as PNGs with extended-data lists (old model on a share of every class)."""
    from bctool.data.fashion_mnist import DEFAULT_SOURCE
    from bctool.data.writers import FashionParams, write_dataset

    params = {"source": str(source or DEFAULT_SOURCE), "seed": seed, "train_per_class": train_per_class,
              "old_fraction": old_fraction, "query_per_class": query_per_class}
    _deprecated("fashion-mnist", "fashion-mnist", out_dir, params, vars(FashionParams()))
    FilePlan("dataset fashion-mnist").read("--source", source or DEFAULT_SOURCE).write_folder("OUT_DIR", out_dir).check()
    emit_json(write_dataset("fashion-mnist", out_dir, params, RichProgress(not quiet)))


@dataset_app.command("gldv2")
@reports_errors
def dataset_gldv2(
    csv_file: Annotated[Path, typer.Argument(metavar="CSV_FILE", help="A GLDv2 CSV: train.csv / train_clean.csv (labelled), or index.csv / test.csv.")],
    images: Annotated[Path, typer.Option(help="Folder holding the images in GLDv2's a/b/c/abc....jpg layout.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="List file to write (paths relative to its folder).")],
    quiet: QuietAccepted = False,
) -> None:
    """Write a bctool list file for GLDv2 images from one of its CSV files."""
    from bctool.evaluate.protocols.gldv2.files import write_gldv2_list

    FilePlan("dataset gldv2").read("CSV_FILE", csv_file).read("--images", images).write("--out", out, locked=True).check()
    with output_lock(out):
        result = write_gldv2_list(csv_file, images, out)
    emit_json(result)
