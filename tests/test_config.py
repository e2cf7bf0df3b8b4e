"""The training configuration: four frozen groups built from flat option names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bctool.errors import ConfigError
from bctool.train.config import GROUPS, OPTION_GROUP, RESUMABLE_CHANGES, TrainConfig
from bctool.train.state import RESUMABLE_CHANGES as STATE_RESUMABLE


def test_options_land_in_their_groups() -> None:
    config = TrainConfig.from_options(image_size=32, epochs=3, method="l2", old_embeddings=Path("old.safetensors"),
                                      save_every=5)
    assert (config.model.arch, config.model.image_size) == ("auto", 32)  # open until resolve_defaults
    assert config.optim.epochs == 3
    assert (config.compat.method, config.compat.old_embeddings) == ("l2", "old.safetensors")  # paths as text
    assert config.run.save_every == 5
    assert config.compatible and not TrainConfig().compatible
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.epochs = 4  # type: ignore[misc]


def test_every_option_has_one_group_and_the_record_stays_flat() -> None:
    names = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(OPTION_GROUP)
    record = TrainConfig().to_dict()
    assert list(record) == names and record["method_params"] == {}


def test_resumable_changes_are_the_run_group() -> None:
    assert RESUMABLE_CHANGES == STATE_RESUMABLE == {"device", "save_every", "log_dir", "diagnostics", "resume"}
    assert "workers" not in RESUMABLE_CHANGES  # it changes the augmentation draws


def test_replace_checks_the_changed_group_again() -> None:
    config = TrainConfig.from_options(image_size=32)
    assert config.replace(lr=0.5).optim.lr == 0.5 and config.optim.lr is None  # None: the recipe's
    with pytest.raises(ConfigError, match=r"--epochs 0 must be at least 1"):
        config.replace(epochs=0)
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) \['epoch'\]; known: \["):
        TrainConfig.from_options(epoch=3)
    with pytest.raises(ConfigError, match="method 'bct' trains against an old model"):
        config.replace(method="bct")
