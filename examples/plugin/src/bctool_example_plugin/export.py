"""An export format: TorchScript, traced and frozen (constants folded), in a .frozen.pt file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bctool.export import ExportFormat

KEY = "bctool.json"


def _write(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        frozen = torch.jit.freeze(torch.jit.trace(module.eval(), example))
        torch.jit.save(frozen, str(path), _extra_files={KEY: json.dumps(metadata)})


def _load(path: Path, extra: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra if extra is not None else {})


def _run(path: Path, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return _load(path)(images).numpy()


def _metadata(path: Path) -> dict[str, Any]:
    extra = {KEY: ""}
    _load(path, extra)
    return json.loads(extra[KEY])


FROZEN = ExportFormat(export=_write, run=_run, metadata=_metadata, suffix=".frozen", runtime="torch.jit.load")
