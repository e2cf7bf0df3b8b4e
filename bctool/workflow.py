"""The upgrade workflow's shared steps, cached in a work folder: what ``bctool demo`` and the
studies in ``experiments/`` both run.

- :func:`train_once`: train a model unless its checkpoint is already there;
- :func:`embed_splits`: embed each list with a model to ``PREFIX_SPLIT.safetensors``, reusing a
  file only when its recorded model is this very checkpoint file (sha256) and its ids are the
  list's, so a retrained model never meets a stale gallery; a model trained with frozen stages
  runs them once per list for every model that shares them (the frozen-output cache);
- :func:`run_record` / :func:`write_run`: one JSON file per finished run, with the command that
  made it, the git revision of the code and the torch thread count, written atomically;
- :func:`ids_digest` and :func:`rounded`: how a run file stores per-query APs, so the tests over
  seeds (:mod:`bctool.evaluate.seeds`) pair runs that scored the same queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from bctool.checkpoint import Checkpoint, file_sha256, load_model
from bctool.data.sources import load_image_set
from bctool.embeddings import load_embeddings, save_embeddings
from bctool.train import TrainConfig, train
from bctool.train.frozen import embed_through_frozen
from bctool.utils.io import atomic_path
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)


def train_once(list_file: Path, config: TrainConfig, out: Path, progress: Progress = NULL_PROGRESS) -> dict[str, Any] | None:
    """Train ``config`` on ``list_file`` to ``out`` unless ``out`` exists; the run's summary, or
    None when the checkpoint was already there."""
    if out.exists():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return train(load_image_set(list_file), config, out, progress).to_dict()


def _cached(path: Path, sha256: str, ids: list[str]) -> bool:
    """Whether ``path`` holds the rows of exactly ``ids`` made by the checkpoint with ``sha256``."""
    if not path.exists():
        return False
    emb = load_embeddings(path)
    return emb.model.get("sha256") == sha256 and list(emb.ids) == ids


def embed_splits(model: Path | Checkpoint, lists: Mapping[str, Path], prefix: Path, *, workers: int = 2,
                 progress: Progress = NULL_PROGRESS, device: str = "cpu") -> dict[str, Path]:
    """``PREFIX_SPLIT.safetensors`` of every ``SPLIT`` in ``lists`` (split -> list file), embedded
    by ``model``; a file already there is kept when it was made by this very checkpoint file from
    this very list (its recorded sha256 and ids), and made again otherwise."""
    checkpoint = model if isinstance(model, Checkpoint) else None
    sha256 = checkpoint.sha256 if checkpoint else file_sha256(model)
    out = {}
    for split, list_file in lists.items():
        path = prefix.parent / f"{prefix.name}_{split}.safetensors"
        images = load_image_set(list_file, require_labels=False)
        if not _cached(path, sha256, images.ids):
            checkpoint = checkpoint or load_model(model, device=device)
            # A model trained with frozen stages embeds through their cached outputs (bctool.train.frozen).
            save_embeddings(embed_through_frozen(checkpoint, images, workers=workers, progress=progress), path)
        out[split] = path
    return out


def revision() -> str | None:
    """The git commit the code runs at (None outside a git checkout), recorded in every run file."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def command_line() -> str:
    """The command this process runs, as a shell would take it back."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def run_record(**fields: Any) -> dict[str, Any]:
    """``fields`` with the command, the revision and the torch thread count (results are bit-for-bit
    the same for the same thread count, not across counts) a run file records."""
    return {**fields, "command": command_line(), "revision": revision(), "torch_threads": torch.get_num_threads()}


def write_run(path: Path, row: Mapping[str, Any]) -> None:
    """Write one run's JSON file atomically (a crash leaves no half file for a resume to trust)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(row, indent=1))


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the query ids, one a line: runs with the same digest score the same queries."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def rounded(values: Iterable[float]) -> list[float]:
    """Per-query APs for a run file, to 6 decimals (far below any difference reported)."""
    return [round(float(v), 6) for v in values]
