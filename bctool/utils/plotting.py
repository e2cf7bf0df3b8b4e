"""Every figure bctool draws, and the helpers they share: matplotlib (the ``plot`` extra) on a
non-interactive backend, imported only when a figure is drawn; PNG, SVG or PDF by the output's
suffix.

* :func:`plot_training`: the curves of a training log (``bctool plot DIR``);
* :func:`plot_backfill`: a backfill curve (``bctool evaluate --backfill ... --plot``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bctool.errors import ConfigError
from bctool.utils.io import atomic_path

# The formats a plot may be written in, by the output's suffix (matplotlib's names).
PLOT_FORMATS = ("png", "svg", "pdf")
DEFAULT_PLOT = "training.png"  # what `bctool plot DIR` draws into DIR without --out
_METRIC_NAMES = {"map": "mAP", "map@100": "mAP@100"}


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


def plot_format(out_path: str | os.PathLike[str]) -> str:
    """The format ``out_path``'s suffix names; a :class:`ConfigError` for another suffix."""
    suffix = Path(out_path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ConfigError(f"cannot write a plot as {str(out_path)!r}: name a .png, .svg or .pdf file")
    return suffix


def save_figure(fig: Any, out_path: str | os.PathLike[str], dpi: int = 120) -> None:
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


# ---------------------------------------------------------------------------------------------
# Training curves


def _moving_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    y = np.asarray(values, dtype=np.float64)
    total = np.concatenate([[0.0], np.cumsum(y)])
    end = np.arange(1, len(y) + 1)
    start = np.maximum(0, end - window)
    return (total[end] - total[start]) / (end - start)


def plot_training(folder: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Draw the curves logged in ``folder`` (:mod:`bctool.train.log`): every loss part per step
    (with a moving average) and per epoch, and the learning rate. Returns ``{"out", "steps",
    "epochs", "parts"}``."""
    # Imported here: bctool.train loads torch, which a backfill plot does without.
    from bctool.train.log import read_records

    folder = Path(folder)
    steps, epochs = read_records(folder / "steps.jsonl"), read_records(folder / "epochs.jsonl")
    if not steps:
        raise ConfigError(
            f"{str(folder)!r} holds no training log (steps.jsonl); train with --log-dir {folder} first"
        )
    fixed = {"step", "epoch", "lr", "seconds", "images_per_second"}
    parts = [k for k in steps[0] if k not in fixed]
    plt = pyplot("plotting training curves")
    fig, axes = plt.subplots(len(parts) + 1, 1, figsize=(7, 1.9 * (len(parts) + 1)), sharex=True)
    x = [r["step"] for r in steps]
    window = max(1, len(steps) // 50)
    for ax, part in zip(axes, parts):
        y = [r.get(part, float("nan")) for r in steps]
        ax.plot(x, y, color="lightsteelblue" if window > 1 else "steelblue", linewidth=0.8, label="step")
        if window > 1:
            ax.plot(x, _moving_mean(y, window), color="steelblue", linewidth=1.2, label=f"mean of {window} steps")
        if epochs:
            ax.plot([e["step"] for e in epochs], [e.get(part, float("nan")) for e in epochs], "o",
                    color="darkorange", markersize=3, label="epoch mean")
        ax.set_ylabel(part)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="x-small")
    axes[-1].plot(x, [r.get("lr", float("nan")) for r in steps], color="grey")
    axes[-1].set_ylabel("lr")
    axes[-1].set_xlabel("step")
    axes[-1].grid(True, alpha=0.3)
    out = Path(out_path) if out_path is not None else folder / DEFAULT_PLOT
    save_figure(fig, out)
    return {"out": str(out), "steps": len(steps), "epochs": len(epochs), "parts": parts}


# ---------------------------------------------------------------------------------------------
# Backfill curves


def plot_backfill(
    curve: Sequence[dict[str, Any]],
    out_path: str | os.PathLike[str],
    old_map: float | None = None,
    new_map: float | None = None,
    key: str = "map",
) -> None:
    """Draw metric ``key`` (by default mAP) of a backfill curve (:mod:`bctool.backfill.curve`)
    against the backfilled fraction at ``out_path`` (needs matplotlib).

    ``old_map`` and ``new_map`` (e.g. M(o,o) and M(n,n)) are drawn as horizontal references.
    """
    plt = pyplot("plotting the backfill curve")
    if not curve:
        raise ConfigError("the backfill curve is empty; evaluate at least one fraction before plotting")
    x = [100.0 * point["fraction"] for point in curve]
    y = [100.0 * point[key] for point in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, y, marker="o", label="new queries vs mixed gallery")
    if old_map is not None:
        ax.axhline(100.0 * old_map, color="grey", linestyle="--", label="old / old")
    if new_map is not None:
        ax.axhline(100.0 * new_map, color="black", linestyle=":", label="new / new")
    ax.set_xlabel("gallery re-embedded with the new model (%)")
    ax.set_ylabel(f"{_METRIC_NAMES.get(key, key)} (%)")
    ax.set_xlim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_figure(fig, out_path)
