"""Output for people (stderr: progress, tables, errors) and for pipelines (stdout: JSON)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgressBar
from rich.table import Table

# A redirected stderr (a log file, CI) has no width: rich would assume 80 columns and cut the
# tables' row labels ("advbc…"); such a log gets room for a whole table.
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout (the only thing commands print there). A reader that
    closed the pipe (``bctool list methods | head -0``) ends the command quietly with status 0, as
    standard tools do: the work is done, only the reader is gone."""
    try:
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


def setup_logging(verbose: bool) -> None:
    """Route library logs to stderr through rich."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False, show_time=False)],
        force=True,
    )


class RichProgress:
    """The :class:`bctool.utils.progress.Progress` protocol drawn as a rich bar on stderr.

    Off when ``enabled`` is False (``--quiet``) or stderr is not a terminal.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and stderr.is_terminal
        self._bar: RichProgressBar | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None) -> None:  # noqa: D102
        if not self.enabled:
            return
        self._bar = RichProgressBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=stderr,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, status="")

    def advance(self, steps: int = 1, status: str = "") -> None:  # noqa: D102
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, status=status)

    def stop(self) -> None:  # noqa: D102
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


HEADERS = {"map": "mAP", "map@100": "mAP@100", "recall@1": "R@1", "recall@5": "R@5",
           "recall@10": "R@10", "queries": "queries", "queries_without_positives": "no positive", "gallery": "gallery",
           "mp@1": "mP@1", "mp@5": "mP@5", "mp@10": "mP@10"}


def metrics_table(title: str, rows: dict[str, dict[str, Any]], keys: list[str]) -> Table:
    """A table of metric rows (row name -> {metric: value}, fractions shown as %) for stderr."""
    table = Table(title=escape(title))  # "M[i][j]" is text, not Rich markup
    table.add_column("")
    for key in keys:
        table.add_column(HEADERS.get(key, key), justify="right")
    for name, values in rows.items():
        cells = []
        for key in keys:
            v = values.get(key)
            cells.append(f"{100 * v:.2f}" if isinstance(v, float) else str(v if v is not None else ""))
        table.add_row(name, *cells)
    return table


def delta_line(report: dict, level: float) -> str:
    """``delta M(n,o) - M(o,o): +1.23 [95% CI +0.40, +2.05] (significant)``, in mAP points."""
    text = f"delta M(n,o) - M(o,o): {100 * report['delta']:+.2f}"
    if "delta_low" not in report:
        return text + " (no bootstrap)"
    verdict = "significant" if report["compatible_significant"] else "not significant"
    return (f"{text} [{100 * level:g}% CI {100 * report['delta_low']:+.2f}, {100 * report['delta_high']:+.2f}] "
            f"({verdict})")
