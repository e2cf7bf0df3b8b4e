"""Shared fixtures: a tiny slice of the embedded emoji set, written once per session."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from bctool.data.emoji import EmojiSplit, write_emoji_dataset


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 emoji classes with the extended-class list files."""
    out = tmp_path_factory.mktemp("emoji")
    write_emoji_dataset(out, EmojiSplit(seed=0, limit=40))
    return out


@pytest.fixture()
def training_log(tmp_path: Path) -> Path:
    """A small --log-dir as `bctool train` writes it (4 steps, 1 epoch): `bctool plot` draws it."""
    folder = tmp_path / "log"
    folder.mkdir()
    (folder / "steps.jsonl").write_text(
        "".join(f'{{"step": {i}, "epoch": 1, "lr": 0.1, "loss": {1 / i}}}\n' for i in range(1, 5)))
    (folder / "epochs.jsonl").write_text('{"epoch": 1, "step": 4, "loss": 0.5}\n')
    return folder


@pytest.fixture()
def sigterm_at_step() -> Callable[[int], AbstractContextManager[None]]:
    """``with sigterm_at_step(n): train(...)``: the n-th training step sends SIGTERM to this
    process (as a scheduler stopping the job would); the run saves its state and raises."""
    from bctool.train import loop as train_loop

    @contextlib.contextmanager
    def patched(n: int) -> Iterator[None]:
        real, calls = train_loop.lr_at, []

        def lr_at(step: int, *args: object) -> float:
            calls.append(step)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(step, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_loop, "lr_at", lr_at)
            yield

    return patched
