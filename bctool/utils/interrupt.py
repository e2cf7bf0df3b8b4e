"""Stopping long runs cleanly: SIGINT and SIGTERM end the step in flight, then the run saves."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from bctool.errors import BctoolError

logger = logging.getLogger(__name__)


class Interrupted(BctoolError):
    """A signal stopped the run after a finished step, and its progress was saved; the command
    line exits with 128 + the signal number."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class StopSignals:
    """While active, SIGINT and SIGTERM only record that the run should stop (``signal_number``);
    the run checks it between steps. A second SIGINT interrupts at once. Handlers are installed
    only from the main thread (elsewhere this does nothing)."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_number and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum
        logger.warning("%s: stopping after this step and saving", signal.Signals(signum).name)

    @property
    def name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signal_number).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
