"""Plots of evaluation results (need matplotlib: ``pip install -e ".[plot]"``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bctool.errors import ConfigError
from bctool.plotting import pyplot, save_png

_METRIC_NAMES = {"map": "mAP", "map@100": "mAP@100"}


def plot_backfill(
    curve: Sequence[dict[str, Any]],
    out_path: str | os.PathLike[str],
    old_map: float | None = None,
    new_map: float | None = None,
    key: str = "map",
) -> None:
    """Draw metric ``key`` (by default mAP) against the backfilled fraction as a PNG at
    ``out_path`` (needs matplotlib).

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
    save_png(fig, out_path)
