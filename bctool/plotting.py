"""Figures as PNG files: matplotlib (the ``plot`` extra) on a non-interactive backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bctool.errors import ConfigError
from bctool.io import atomic_path


def pyplot(purpose: str) -> Any:
    """``matplotlib.pyplot`` on the Agg backend; a ConfigError naming ``purpose`` without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            f"{purpose} needs matplotlib, which is not installed; pip install matplotlib "
            "(or bctool's `plot` extra), or leave out the plot"
        ) from exc
    return plt


# The formats a plot may be written in, by the output's suffix (matplotlib's names).
PLOT_FORMATS = ("png", "svg", "pdf")


def plot_format(out_path: str | os.PathLike[str]) -> str:
    """The format ``out_path``'s suffix names; a :class:`ConfigError` for another suffix."""
    suffix = Path(out_path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ConfigError(f"cannot write a plot as {str(out_path)!r}: name a .png, .svg or .pdf file")
    return suffix


def save_png(fig: Any, out_path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Write ``fig`` to ``out_path`` atomically in the format its suffix names (PNG, SVG or
    PDF), then close it."""
    try:
        fig.tight_layout()
        kind = plot_format(out_path)
        with atomic_path(out_path) as tmp:
            # The temporary name ends in .tmp, so the format cannot come from the suffix.
            fig.savefig(tmp, format=kind, dpi=dpi)
    finally:
        import matplotlib.pyplot as plt  # present: the figure was made with it

        plt.close(fig)
