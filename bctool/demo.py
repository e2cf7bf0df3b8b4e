"""The main job on the embedded emoji dataset: a whole model upgrade, end to end.

dataset -> train old (30% of training classes) -> train new (all) -> extract query/gallery
with each -> evaluate old/old, new/new and new/old (new queries against the old gallery).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bctool.checkpoint import load_checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.sources import load_image_set
from bctool.embeddings import Embeddings, save_embeddings
from bctool.evaluate import evaluate_retrieval
from bctool.extract import extract
from bctool.progress import NULL_PROGRESS, Progress
from bctool.train import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Budget of the demo; the defaults finish in a few minutes on two CPU cores."""

    arch: str = "small"
    image_size: int = 32
    embedding_dim: int = 256
    old_epochs: int = 30
    new_epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    limit: int | None = None  # classes kept from the emoji set (tests use a few dozen)

    def train_config(self, epochs: int) -> TrainConfig:
        """The training config of one of the demo's models."""
        return TrainConfig(
            arch=self.arch,
            embedding_dim=self.embedding_dim,
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            image_size=self.image_size,
            seed=self.seed,
            device=self.device,
            workers=self.workers,
        )


def _embed(model_path: Path, lists: dict[str, Path], name: str, workdir: Path, config: DemoConfig,
           progress: Progress) -> dict[str, Embeddings]:
    checkpoint = load_checkpoint(model_path, device=_device(config))
    out = {}
    for split in ("query", "gallery"):
        emb = extract(load_image_set(lists[split], require_labels=False), checkpoint,
                      workers=config.workers, progress=progress)
        save_embeddings(emb, workdir / f"{name}_{split}.safetensors")
        out[split] = emb
    return out


def _device(config: DemoConfig) -> str:
    from bctool.device import resolve_device

    return str(resolve_device(config.device))


def run_demo(workdir: str | Path, config: DemoConfig = DemoConfig(),
             progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Run the whole upgrade in ``workdir``; return the summary with the mAP table."""
    start = time.perf_counter()
    workdir = Path(workdir)
    data_dir = workdir / "emoji"
    dataset = write_emoji_dataset(data_dir, EmojiSplit(seed=config.seed, limit=config.limit))
    lists = {k.removesuffix(".txt"): Path(v) for k, v in dataset["lists"].items()}
    runs = {
        "old": (lists["old_train"], config.old_epochs),
        "new": (lists["new_train"], config.new_epochs),
    }
    trained: dict[str, Any] = {}
    embeddings: dict[str, dict[str, Embeddings]] = {}
    for name, (list_file, epochs) in runs.items():
        model_path = workdir / f"{name}_model.safetensors"
        logger.info("training the %s model on %s", name, list_file)
        result = train(load_image_set(list_file), config.train_config(epochs), model_path, progress)
        trained[name] = result.to_dict()
        embeddings[name] = _embed(model_path, lists, name, workdir, config, progress)
    pairs = {"old/old": ("old", "old"), "new/new": ("new", "new"), "new/old": ("new", "old")}
    results = {
        pair: evaluate_retrieval(embeddings[q]["query"], embeddings[g]["gallery"])
        for pair, (q, g) in pairs.items()
    }
    return {
        "workdir": str(workdir),
        "dataset": {k: v for k, v in dataset.items() if k != "lists"},
        "models": trained,
        "results": results,
        "compatible": results["new/old"]["map"] > results["old/old"]["map"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def with_overrides(config: DemoConfig, **overrides: Any) -> DemoConfig:
    """A copy of ``config`` with the non-None overrides applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
