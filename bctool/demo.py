"""The main job on the embedded emoji dataset: a whole model upgrade, end to end.

dataset -> train old (30% of training classes) -> extract the old embeddings of the new training
list -> train the new model with AdvBCT against them, and an independent new model for reference
-> extract query/gallery with every model -> evaluate M(o,o), M(n,n), M(n,o) and M(*,*).
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
from bctool.device import resolve_device
from bctool.embeddings import Embeddings, save_embeddings
from bctool.evaluate import evaluate_retrieval
from bctool.extract import extract
from bctool.progress import NULL_PROGRESS, Progress
from bctool.train import TrainConfig, train

logger = logging.getLogger(__name__)

# (query model, gallery model) of every reported pair; "independent" is the paper's φ_*.
PAIRS = {
    "old/old": ("old", "old"),
    "new/new": ("new", "new"),
    "new/old": ("new", "old"),
    "ind/ind": ("independent", "independent"),
    "ind/old": ("independent", "old"),
}


@dataclass(frozen=True)
class DemoConfig:
    """Budget of the demo; the defaults finish in a few minutes on two CPU cores."""

    arch: str = "small"
    image_size: int = 32
    embedding_dim: int = 256
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    method: str = "advbct"
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    limit: int | None = None  # classes kept from the emoji set (tests use a few dozen)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The training config of one of the demo's models."""
        base = TrainConfig(
            arch=self.arch, embedding_dim=self.embedding_dim, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, image_size=self.image_size, seed=self.seed,
            device=self.device, workers=self.workers,
        )
        return replace(base, **overrides)


def _embed(model_path: Path, lists: dict[str, Path], splits: tuple[str, ...], name: str, workdir: Path,
           config: DemoConfig, progress: Progress) -> dict[str, Embeddings]:
    checkpoint = load_checkpoint(model_path, device=resolve_device(config.device))
    out = {}
    for split in splits:
        emb = extract(load_image_set(lists[split], require_labels=False), checkpoint,
                      workers=config.workers, progress=progress)
        save_embeddings(emb, workdir / f"{name}_{split}.safetensors")
        out[split] = emb
    return out


def run_demo(workdir: str | Path, config: DemoConfig = DemoConfig(),
             progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Run the whole upgrade in ``workdir``; return the summary with the mAP table."""
    start = time.perf_counter()
    workdir = Path(workdir)
    dataset = write_emoji_dataset(workdir / "emoji", EmojiSplit(seed=config.seed, limit=config.limit))
    lists = {k.removesuffix(".txt"): Path(v) for k, v in dataset["lists"].items()}
    old_emb = workdir / "old_new_train.safetensors"
    runs = {
        "old": (lists["old_train"], config.train_config()),
        "new": (lists["new_train"], config.train_config(method=config.method, old_embeddings=str(old_emb))),
        "independent": (lists["new_train"], config.train_config()),
    }
    trained: dict[str, Any] = {}
    embeddings: dict[str, dict[str, Embeddings]] = {}
    for name, (list_file, train_config) in runs.items():
        model_path = workdir / f"{name}_model.safetensors"
        logger.info("training the %s model (%s) on %s", name, train_config.method, list_file)
        trained[name] = train(load_image_set(list_file), train_config, model_path, progress).to_dict()
        # The old model also embeds the new training list: the new model trains against it.
        splits = ("query", "gallery", "new_train") if name == "old" else ("query", "gallery")
        embeddings[name] = _embed(model_path, lists, splits, name, workdir, config, progress)
    results = {
        pair: evaluate_retrieval(embeddings[q]["query"], embeddings[g]["gallery"])
        for pair, (q, g) in PAIRS.items()
    }
    m = {pair: r["map"] for pair, r in results.items()}
    headroom = m["ind/ind"] - m["old/old"]
    return {
        "workdir": str(workdir),
        "method": config.method,
        "dataset": {k: v for k, v in dataset.items() if k != "lists"},
        "models": trained,
        "results": results,
        "M(o,o)": m["old/old"],
        "M(n,n)": m["new/new"],
        "M(n,o)": m["new/old"],
        "M(*,*)": m["ind/ind"],
        "compatible": m["new/old"] > m["old/old"],
        "update_gain": (m["new/old"] - m["old/old"]) / headroom if headroom else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


def with_overrides(config: DemoConfig, **overrides: Any) -> DemoConfig:
    """A copy of ``config`` with the non-None overrides applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
