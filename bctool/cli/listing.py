"""`bctool methods` and `bctool list`: what can be chosen by name."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    Quiet,
    one_of,
)
from bctool.cli.output import (
    emit_json,
)


@app.command()
@reports_errors
def methods(quiet: Quiet = False) -> None:
    """List the compatibility methods: name, what it does, its parameters and defaults, and the
    recommended one (JSON)."""
    from bctool.train.methods import METHODS, describe_methods
    from bctool.train.recipe import RECOMMENDED_METHOD

    failed = {"plugin_errors": dict(METHODS.failures)} if METHODS.failures else {}
    emit_json({"methods": describe_methods(), "recommended": RECOMMENDED_METHOD, **failed})


@app.command("list")
@reports_errors
def list_registered(
    kind: Annotated[Optional[str], typer.Argument(metavar="[KIND]", callback=one_of("bctool.registry", "KIND_MODULES"), help="One kind to list (methods, protocols, backbones, heads, regimes, schedules, views, index-kinds, export-formats, datasets, adapters, backfill-policies); default: every kind.", show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """List what can be chosen by name, built in or added by installed plugins: each entry's name,
    description, parameters, declarations and origin, and any plugin that failed to load (JSON)."""
    from bctool.registry import describe_kinds

    emit_json(describe_kinds([kind] if kind else None))
