"""Training logs: ``bctool train --log-dir DIR`` writes them, ``bctool plot DIR`` draws their curves
(:func:`bctool.utils.plotting.plot_training`).

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

from bctool.errors import ConfigError

# What `bctool train --log-dir DIR` writes into DIR (compat.json with --diagnostics).
LOG_FILES = ("steps.jsonl", "epochs.jsonl", "compat.json")


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

