"""`bctool dataset ...`: write built-in datasets to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bctool.cli.app import dataset_app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    Quiet,
    at_least,
    name_values,
    output_file,
    seed_range,
)
from bctool.cli.output import (
    emit_json,
)
from bctool.files import FilePlan
from bctool.io import output_lock


@dataset_app.command("emoji")
@reports_errors
def dataset_emoji(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images/ and the list files into.")],
    seed: Annotated[int, typer.Option(callback=seed_range, help="Seed of the class split.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Share of classes held out for query/gallery.")] = 0.3,
    old_fraction: Annotated[float, typer.Option(help="Share of the training classes the old model sees.")] = 0.3,
    limit: Annotated[Optional[int], typer.Option(callback=at_least(3), help="Keep only the first N emoji (quick experiments).")] = None,
    quiet: Quiet = False,
) -> None:
    """Write the embedded emoji set (Google and Twitter renderings) with extended-class lists."""
    from bctool.data.emoji import EmojiSplit, write_emoji_dataset

    FilePlan("dataset emoji").write_folder("OUT_DIR", out_dir).check()

    summary = write_emoji_dataset(
        out_dir, EmojiSplit(seed=seed, test_fraction=test_fraction, old_fraction=old_fraction, limit=limit)
    )
    emit_json(summary)


@dataset_app.command("fashion-mnist")
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
    """Write Fashion-MNIST as PNGs with extended-data lists (old model on a share of every class)."""
    from bctool.data.fashion_mnist import (
        DEFAULT_SOURCE,
        FashionSplit,
        write_fashion_mnist_dataset,
    )

    FilePlan("dataset fashion-mnist").read("--source", source or DEFAULT_SOURCE).write_folder("OUT_DIR", out_dir).check()
    split = FashionSplit(seed=seed, train_per_class=train_per_class, old_fraction=old_fraction,
                         query_per_class=query_per_class)
    emit_json(write_fashion_mnist_dataset(out_dir, split, source or DEFAULT_SOURCE))


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

    emit_json(write_dataset(name, out_dir, name_values("--param", params, "NAME=VALUE")))


@dataset_app.command("gldv2")
@reports_errors
def dataset_gldv2(
    csv_file: Annotated[Path, typer.Argument(metavar="CSV_FILE", help="A GLDv2 CSV: train.csv / train_clean.csv (labelled), or index.csv / test.csv.")],
    images: Annotated[Path, typer.Option(help="Folder holding the images in GLDv2's a/b/c/abc....jpg layout.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="List file to write (paths relative to its folder).")],
    quiet: Quiet = False,
) -> None:
    """Write a bctool list file for GLDv2 images from one of its CSV files."""
    from bctool.data.gldv2 import write_gldv2_list

    FilePlan("dataset gldv2").read("CSV_FILE", csv_file).read("--images", images).write("--out", out, locked=True).check()
    with output_lock(out):
        result = write_gldv2_list(csv_file, images, out)
    emit_json(result)
