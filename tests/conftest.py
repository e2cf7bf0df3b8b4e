"""Shared fixtures: a tiny slice of the embedded emoji set, written once per session."""

from __future__ import annotations

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
