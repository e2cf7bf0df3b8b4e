"""Choosing the torch device."""

from __future__ import annotations

import torch

from bctool.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was asked for but this torch sees no CUDA GPU; "
                "use --device cpu or --device auto"
            )
        return torch.device(name)
    raise ConfigError(f"unknown device {name!r}; choose one of {list(DEVICES)} (or cuda:N)")
