"""Typer app: one thin command per library entry point.

stdout carries exactly one JSON document per command; people read stderr.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from bctool import __version__

app = typer.Typer(
    name="bctool",
    help=(
        "Upgrade the embedding model of an image-retrieval system without re-embedding the "
        "gallery: extract embeddings, train (compatible) models, evaluate self- and "
        "cross-model retrieval. JSON results go to stdout, progress and tables to stderr."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: option text is shown as written ("M[i][j]" is not Rich markup) and
    # flags carry no type placeholder.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dataset_app = typer.Typer(help="Write built-in datasets to disk.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
backfill_app = typer.Typer(help="Plan the re-embedding of a gallery with the new model.", no_args_is_help=True)
app.add_typer(backfill_app, name="backfill")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bctool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """bctool: backward-compatible training for image retrieval."""


def main() -> None:
    """Console-script entry point."""
    app()
