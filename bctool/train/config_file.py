"""Training options from a file: ``bctool train --config FILE``.

Two kinds of file:

* a TOML file of options by their flat names (``embedding_dim = 128`` or ``embedding-dim = 128``;
  ``method_params`` as a table: ``[method_params]`` then ``threshold = 0.5``);
* a bctool checkpoint: the options it was trained with (its ``train`` record), so a recorded run
  can be repeated. What the record holds about the data, the warm start's file (its path is
  taken back) and how that process ran (device, saving, logging, resuming) is left out.

Options given on the command line win over the file's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tomllib

from bctool.errors import ConfigError
from bctool.train.config import OPTION_GROUP

# What a checkpoint's train record holds beside the options, or options of how one process ran.
_NOT_REPEATED = {"data", "defaults_from", *(name for name, group in OPTION_GROUP.items() if group == "run")}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The training options ``path`` sets, by flat name (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r} is not a file; pass a .toml file of options or a bctool checkpoint")
    if path.suffix == ".safetensors":
        return _from_checkpoint(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {str(path)!r} is not a TOML file: {exc}; write one option a line, "
                          "e.g. epochs = 10") from exc
    return _checked({name.replace("-", "_"): value for name, value in raw.items()}, path)


def _from_checkpoint(path: Path) -> dict[str, Any]:
    from bctool.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(path)
    if "train" not in meta:
        raise ConfigError(f"--config {str(path)!r} records no training options (no 'train' metadata); "
                          "pass a checkpoint written by `bctool train`, or a .toml file")
    record = json.loads(meta["train"])
    options = {name: value for name, value in record.items() if name not in _NOT_REPEATED}
    start = options.get("init_from")
    if isinstance(start, dict):  # the warm start's record: the file it started from
        options["init_from"] = start.get("path")
    if "old_views" in options:
        options["old_views"] = tuple(options["old_views"])
    return _checked(options, path)


def _checked(options: dict[str, Any], path: Path) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_GROUP))
    if unknown:
        known = sorted(OPTION_GROUP)
        raise ConfigError(f"--config {str(path)!r} sets unknown option(s) {unknown}; the options are {known}")
    if "method_params" in options and not isinstance(options["method_params"], dict):
        raise ConfigError(f"--config {str(path)!r}: method_params must be a table, e.g. [method_params] threshold = 0.5")
    return options

