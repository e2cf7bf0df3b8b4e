"""Option types and checks every command shares: numbers in range, seeds, registry choices,
output paths, and NAME=VALUE pairs. Checked when options are parsed (usage errors, exit 2)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand


def at_least(low: float):  # noqa: ANN202 - a click callback
    """A callback refusing, as a usage error naming the value, a number below ``low`` (and NaN
    or inf for a float option)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{value!r} must be a finite number, {low} or more")
        if value < low:
            raise typer.BadParameter(f"{value!r} is below {low}; pass {low} or more")
        return value

    return check


MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; torch's, Python's and the split's take them too


def seed_range(value: int | None) -> int | None:
    """A seed in [0, 2**32 - 1], checked before any work (numpy refuses others, after minutes)."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise typer.BadParameter(f"{value} is outside [0, {MAX_SEED}]; pass a seed in that range")
    return value


Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Run", help="No progress bars or tables on stderr.")]
# Commands with nothing to quiet still take -q (scripts pass it everywhere), hidden from their help.
QuietAccepted = Annotated[bool, typer.Option("--quiet", "-q", hidden=True, help="Accepted and ignored: this command draws nothing on stderr.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", rich_help_panel="Run", help="Log what happens to stderr: files read and written, steps taken.")]
TrainVerbose = Annotated[bool, typer.Option("--verbose", "-v", rich_help_panel="Run", help="Log what happens to stderr: files read and written, and each epoch's loss parts.")]
Device = Annotated[
    str, typer.Option(rich_help_panel="Run", help="Where to run: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
]
Workers = Annotated[int, typer.Option(callback=at_least(0), rich_help_panel="Run", help="DataLoader worker processes decoding images.")]


def one_of(module: str, name: str):  # noqa: ANN202 - a click callback
    """A callback refusing, as a usage error (exit 2), a value outside the choices the library
    defines as ``module.name`` (imported when the option is parsed, not for ``--help``)."""

    def check(value: str | None) -> str | None:
        import importlib

        choices = getattr(importlib.import_module(module), name)
        allowed = list(choices)
        # A name a plugin failed to load passes here, to fail where it is used with the plugin's error.
        if value is not None and value not in allowed and value not in getattr(choices, "failures", {}):
            raise typer.BadParameter(f"{value!r} is unknown; choose one of {allowed}")
        return value

    return check


def arch_choice(value: str | None) -> str | None:
    """A registered backbone, auto, or package.module:factory (checked when it is built)."""
    from bctool.models.model import BACKBONES, is_import_spec

    if (value is not None and value != "auto" and value not in BACKBONES and not is_import_spec(value)
            and value not in BACKBONES.failures):
        raise typer.BadParameter(
            f"{value!r} is unknown; choose one of {['auto', *sorted(BACKBONES)]}, or name your own as package.module:factory"
        )
    return value


def method_choice(value: str | None) -> str | None:
    """A registered compatibility method."""
    if value is None:
        return value
    from bctool.train.methods import METHODS

    if value not in METHODS and value not in METHODS.failures:  # a failed plugin's own error comes later
        raise typer.BadParameter(f"{value!r} is unknown; choose one of {sorted(METHODS)} (`bctool list methods` describes them)")
    return value


def output_file(text: str) -> Path:
    """An output file's path; a name ending in a path separator names a folder, refused as a
    usage error (a Path would drop the separator and write a file of the folder's name)."""
    if text.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{text!r} ends with a path separator, so it names a folder; pass the name of a file")
    return Path(text)


def positive_finite(value: float | None) -> float | None:
    """A positive, finite number (NaN and inf are refused)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value!r} must be a positive, finite number")
    return value


def shard_choice(value: str | None) -> str | None:
    """I/N with 0 <= I < N."""
    if value is None:
        return value
    from bctool.errors import ConfigError
    from bctool.extract import Shard

    try:
        Shard.parse(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--shard ")) from None
    return value


def name_values(option: str, pairs: list[str] | None, example: str) -> dict[str, str]:
    """Repeated ``NAME=VALUE`` options as a dict; a pair without ``=`` is a usage error."""
    values: dict[str, str] = {}
    for text in pairs or []:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"{option} {text!r}: expected {example}")
        values[name.strip()] = value.strip()
    return values


class PanelCommand(TyperCommand):
    """A command whose help lists its options in groups (each option's ``rich_help_panel``:
    "Model", "Old side", ...), in plain text: the app keeps click's help format, without Rich."""

    def format_options(self, ctx: Any, formatter: Any) -> None:  # click's Context and HelpFormatter
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "rich_help_panel", None) or "Other options", []).append(record)
        for name, rows in groups.items():
            with formatter.section(name):
                formatter.write_dl(rows)
