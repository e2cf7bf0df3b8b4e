"""`bctool list`: what can be chosen by name (and `bctool methods`, its deprecated spelling for
the methods)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import QuietAccepted, one_of
from bctool.cli.output import (
    emit_json,
    setup_logging,
)

# A command with nothing to draw still takes -q (scripts pass it everywhere), hidden from its help.


def _listing(kinds: list[str] | None) -> dict[str, Any]:
    """The JSON of `bctool list`: every entry of ``kinds`` (default: all), and, when the methods
    are listed, the recommended one under ``recommended``."""
    from bctool.registry import describe_kinds
    from bctool.train.recipe import RECOMMENDED_METHOD

    listed = describe_kinds(kinds)
    if "methods" in listed["kinds"]:
        listed["recommended"] = {"methods": RECOMMENDED_METHOD}
    if "weights" in listed["kinds"]:  # installed or not: a fact of this machine, not of the registry
        from bctool.models.weights import WEIGHTS

        for entry in listed["kinds"]["weights"]:
            if entry["name"] in WEIGHTS:
                entry["installed"] = WEIGHTS[entry["name"]].installed()
    return listed


@app.command("methods", hidden=True)
@reports_errors
def methods(quiet: QuietAccepted = False) -> None:
    """Deprecated: use `bctool list methods`, which prints the same JSON."""
    setup_logging(False)
    logging.getLogger(__name__).warning("`bctool methods` is deprecated and goes in a later release: "
                                        "use `bctool list methods`")
    emit_json(_listing(["methods"]))


@app.command("list")
@reports_errors
def list_registered(
    kind: Annotated[Optional[str], typer.Argument(metavar="[KIND]", callback=one_of("bctool.registry", "KIND_MODULES"), help="One kind to list (methods, protocols, backbones, weights, heads, regimes, schedules, views, index-kinds, export-formats, datasets, adapters, backfill-policies); default: every kind. weights: the named pretrained weights (--pretrained NAME), their preprocessing, the pip command that installs each and whether it is installed.", show_default=False)] = None,
    quiet: QuietAccepted = False,
) -> None:
    """List what can be chosen by name, built in or added by installed plugins: each entry's name,
    description, parameters, declarations and origin, any plugin that failed to load, the
    recommended method, and whether each named weights' package is installed (JSON)."""
    emit_json(_listing([kind] if kind else None))
