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
