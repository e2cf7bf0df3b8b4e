"""The one place that turns library errors into ``Error: ...`` lines and exit codes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.markup import escape

from bctool.cli.output import stderr
from bctool.errors import BctoolError

F = TypeVar("F", bound=Callable[..., Any])
# Typer ships its own copy of click; its UsageError is the base of BadParameter.
UsageError = typer.BadParameter.__mro__[1]


def debug_enabled() -> bool:
    """``BCTOOL_DEBUG=1`` shows tracebacks instead of one-line errors."""
    return os.environ.get("BCTOOL_DEBUG", "") not in ("", "0")


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised from a DataLoader worker, torch wraps the
    worker's traceback into the message, so keep only its last line (the original message)."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(type(exc).__name__ + ":") else last
    return text


def _label() -> str:
    """``Error`` or, in a process torchrun started other than rank 0, ``Error (rank N)``."""
    rank = os.environ.get("RANK", "0")
    return "Error" if rank in ("", "0") else f"Error (rank {rank})"


_PATH_FIXES = {
    FileNotFoundError: "check the path",
    NotADirectoryError: "a file stands where a folder is needed: pass a folder, or remove the file",
    IsADirectoryError: "a folder stands where a file is needed: pass a file name",
    PermissionError: "choose a path this user may read and write",
    FileExistsError: "choose a path that does not exist yet",
}


def _path_error(exc: OSError) -> str:
    """``cannot use 'PATH': <reason>; <fix>`` for an operating-system error on a path."""
    fix = next((text for kind, text in _PATH_FIXES.items() if isinstance(exc, kind)), "check the path and the disk")
    where = f" {str(exc.filename)!r}" if exc.filename else ""
    return f"cannot use{where}: {exc.strerror or exc}; {fix}"


def reports_errors(func: F) -> F:
    """Wrap a command: library errors exit 1 with one ``Error:`` line; Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, UsageError):
            raise  # click prints usage errors itself and exits 2
        except BctoolError as exc:
            if debug_enabled():
                raise
            signum = getattr(exc, "signal_number", 0)
            if signum:  # stopped by a signal after saving: not an error, the shell's 128 + N code
                if _label() == "Error":  # said once, by rank 0
                    stderr.print(escape(str(exc)), highlight=False, soft_wrap=True)
                raise typer.Exit(128 + signum) from None
            stderr.print(f"[bold red]{_label()}:[/] {escape(_one_line(exc))}", markup=True, highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("Interrupted.")
            raise typer.Exit(130) from None
        except OSError as exc:  # a path the library did not check: still a clear error
            if debug_enabled():
                raise
            stderr.print(f"[bold red]{_label()}:[/] {escape(_path_error(exc))}", markup=True, highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - last resort: no traceback for users
            if debug_enabled():
                raise
            stderr.print(
                f"[bold red]{_label()}:[/] unexpected {type(exc).__name__}: {escape(_one_line(exc))}. "
                "Re-run with BCTOOL_DEBUG=1 for the traceback and report it.",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
