"""Training curves: ``bctool train --log-dir DIR`` writes them, ``bctool plot DIR`` draws them.

``DIR/steps.jsonl``: one JSON object per step, ``{"step", "epoch", "lr", <loss part>: value,
...}`` (``step`` counts from 1; loss parts averaged over ranks). ``DIR/epochs.jsonl``: one per
finished epoch, ``{"epoch", "step", "seconds", "images_per_second", <loss part>: mean, ...}``.
Lines are flushed as they are written, so a running job can be watched (``tail -f``); a resumed
run first drops the lines past the state it resumes from, so the files never hold a step twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bctool.errors import ConfigError

# What `bctool train --log-dir DIR` writes into DIR (compat.json with --diagnostics).
LOG_FILES = ("steps.jsonl", "epochs.jsonl", "compat.json")
DEFAULT_PLOT = "training.png"  # what `bctool plot DIR` draws into DIR without --out


class TrainLog:
    """Appends step and epoch records to ``DIR/steps.jsonl`` and ``DIR/epochs.jsonl``."""

    def __init__(self, folder: str | os.PathLike[str], resume_step: int | None = None) -> None:
        """Open the log in ``folder``; a fresh run (``resume_step`` None) starts empty files, a
        resumed one keeps the records up to ``resume_step``."""
        self.folder = Path(folder)
        earlier = [self.folder / n for n in ("steps.jsonl", "epochs.jsonl") if (self.folder / n).is_file()
                   and (self.folder / n).stat().st_size]
        if resume_step is None and earlier:
            raise ConfigError(
                f"--log-dir {str(self.folder)!r} holds another run's log ({earlier[0].name}); a new run would "
                "overwrite it: pass another folder, or remove that one first (--resume continues its own log)"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._steps = self._open("steps.jsonl", resume_step)
            self._epochs = self._open("epochs.jsonl", resume_step)
        except OSError as exc:
            raise ConfigError(f"--log-dir {str(self.folder)!r}: {exc.strerror or exc}; choose a writable folder") from exc

    def _open(self, name: str, resume_step: int | None) -> TextIO:
        path = self.folder / name
        kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        for record in kept:
            fh.write(json.dumps(record) + "\n")
        fh.flush()
        return fh

    def step(self, record: dict[str, Any]) -> None:
        """One step's record."""
        self._steps.write(json.dumps(record) + "\n")
        self._steps.flush()

    def epoch(self, record: dict[str, Any]) -> None:
        """One finished epoch's record."""
        self._epochs.write(json.dumps(record) + "\n")
        self._epochs.flush()

    def close(self) -> None:
        """Close both files."""
        self._steps.close()
        self._epochs.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none if it does not exist); a torn last line is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def _moving_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    y = np.asarray(values, dtype=np.float64)
    total = np.concatenate([[0.0], np.cumsum(y)])
    end = np.arange(1, len(y) + 1)
    start = np.maximum(0, end - window)
    return (total[end] - total[start]) / (end - start)


def plot_training(folder: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Draw the curves logged in ``folder``: every loss part per step (with a moving average)
    and per epoch, and the learning rate. Returns ``{"out", "steps", "epochs", "parts"}``."""
    from bctool.plotting import pyplot, save_png

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
    save_png(fig, out)
    return {"out": str(out), "steps": len(steps), "epochs": len(epochs), "parts": parts}
