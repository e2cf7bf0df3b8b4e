"""Typed errors raised by the library.

Library code raises these; the CLI turns them into ``Error: ...`` on stderr and exit code 1.
Every message names the bad value and the fix.
"""

from __future__ import annotations


class BctoolError(Exception):
    """Base class for every error bctool reports to users without a traceback."""


class DataError(BctoolError):
    """Bad image data or list file: missing files, unreadable images, empty datasets."""


class ModelError(BctoolError):
    """Unknown architecture, bad weights file, mismatched checkpoint."""


class EmbeddingsError(BctoolError):
    """Bad or mismatched embeddings file."""


class ConfigError(BctoolError):
    """Invalid option values (device not available, bad sizes)."""


def shown(items: object, limit: int = 5) -> str:
    """The first ``limit`` items, quoted, then "and N more": a list in a message never runs to
    hundreds of names."""
    items = list(items)  # type: ignore[call-overload]
    text = ", ".join(repr(i) for i in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")
