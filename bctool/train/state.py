"""Resumable training state: everything needed to continue a run after its last epoch.

Saved atomically after every epoch beside the output checkpoint (``OUT.state.safetensors``):
the task's trainable modules (model, loss parameters), the optimizer, the AMP grad scaler,
the torch RNG and the data-order generator, the epoch and step counters and the loss history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from bctool.errors import ConfigError
from bctool.utils.io import save_safetensors
from bctool.train.config import RESUMABLE_CHANGES  # the run group's options

FORMAT = "bctool.train-state"


def state_path(out: str | os.PathLike[str]) -> Path:
    """``model.safetensors`` -> ``model.state.safetensors``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.state.safetensors")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    generator_state: torch.Tensor,
    progress: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """Write the state of a run that has finished ``progress['epoch']`` epochs (and, mid-epoch,
    ``progress['partial']['batches']`` batches of the next; ``generator_state`` is then the
    data-order generator as that epoch began)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator_state
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {
        "format": FORMAT,
        "progress": json.dumps(progress),
        "config": json.dumps(config),
        "optimizer": json.dumps(optim_meta),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None else {}),
    }
    save_safetensors(path, tensors, metadata)


def load_train_state(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Restore a run from ``path``; return its progress (``epoch``, ``step``, ``history``)."""
    if not path.is_file():
        raise ConfigError(
            f"--resume: no training state at {str(path)!r} (it is written after every epoch and "
            "removed when a run finishes); start without --resume"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"--resume: {str(path)!r} is unreadable ({exc}); delete it and start again") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"--resume: {str(path)!r} is not a bctool training state")
    saved = json.loads(meta["config"])
    config = json.loads(json.dumps(config))  # compared as saved: tuples read back as lists
    changed = sorted(
        k for k in set(saved) | set(config) if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"--resume: the options differ from the interrupted run ({diffs}); resume with the "
            f"same options, or delete {str(path)!r} to start a new run"
        )
    device = next(next(iter(modules.values())).parameters()).device
    for prefix, module in modules.items():
        own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        try:
            module.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"--resume: {str(path)!r} does not fit this run ({str(exc).splitlines()[0]}); "
                "delete it and start again without --resume"
            ) from exc
    optim_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(_unflatten_optimizer(optim_tensors, json.loads(meta["optimizer"])))
    if scaler is not None and meta.get("scaler", "{}") != "{}":
        scaler.load_state_dict(json.loads(meta["scaler"]))
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return json.loads(meta["progress"])
