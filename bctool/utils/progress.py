"""A tiny progress protocol so library code can report progress without printing.

The CLI passes a rich-backed implementation; library callers get :data:`NULL_PROGRESS`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress events from long-running library functions."""

    def start(self, description: str, total: int | None) -> None:
        """Begin a new task of ``total`` steps (None when unknown)."""

    def advance(self, steps: int = 1, status: str = "") -> None:
        """Mark ``steps`` more steps done; ``status`` is a short line such as the loss."""

    def stop(self) -> None:
        """End the current task."""


class NullProgress:
    """Progress that reports nothing."""

    def start(self, description: str, total: int | None) -> None:  # noqa: D102
        pass

    def advance(self, steps: int = 1, status: str = "") -> None:  # noqa: D102
        pass

    def stop(self) -> None:  # noqa: D102
        pass


NULL_PROGRESS: Progress = NullProgress()
