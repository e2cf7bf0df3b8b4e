"""The training loop: one function, no method-specific branches (those live in tasks)."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bctool.checkpoint import save_checkpoint
from bctool.data.dataset import ImageDataset
from bctool.data.sources import ImageSet
from bctool.data.transforms import EvalTransform, Preprocess, TrainTransform
from bctool.device import resolve_device
from bctool.errors import BctoolError, DataError
from bctool.models import create_model
from bctool.progress import NULL_PROGRESS, Progress
from bctool.train.config import TrainConfig
from bctool.train.tasks import ClassificationTask

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run reports: final loss parts and throughput."""

    out: str
    epochs: int
    steps: int
    images: int
    classes: int
    device: str
    seconds: float
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-epoch history)."""
        return {
            "out": self.out,
            "epochs": self.epochs,
            "steps": self.steps,
            "images": self.images,
            "classes": self.classes,
            "device": self.device,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.epochs * self.images / max(self.seconds, 1e-9), 1),
            "final": {k: round(v, 6) for k, v in self.final.items()},
        }


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a generator for the data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _check_trainable(images: ImageSet) -> None:
    if not images.has_labels():
        missing = sum(1 for r in images.records if r.label < 0)
        raise DataError(f"{images.source!r}: {missing} images have no label; training needs labels")
    if len(images.label_names) < 2:
        raise DataError(
            f"{images.source!r} has {len(images.label_names)} class; classification training "
            "needs at least 2 classes"
        )


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_loader(
    images: ImageSet, config: TrainConfig, preprocess: Preprocess, generator: torch.Generator, pin: bool
) -> DataLoader:
    """Shuffled, batch-complete loader (BatchNorm needs more than one sample per batch)."""
    transform = TrainTransform(preprocess) if config.augment else EvalTransform(preprocess)
    batch_size = min(config.batch_size, len(images))
    return DataLoader(
        ImageDataset(images, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.workers,
        generator=generator,
        pin_memory=pin,
        persistent_workers=config.workers > 0,
    )


def train(
    images: ImageSet,
    config: TrainConfig,
    out: str | os.PathLike[str],
    progress: Progress = NULL_PROGRESS,
) -> TrainResult:
    """Train a model on ``images`` with ``config``; write the checkpoint to ``out``."""
    _check_trainable(images)
    if len(images) < 2:
        raise DataError(f"{images.source!r} has {len(images)} image; training needs at least 2")
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    preprocess = Preprocess(image_size=config.image_size)
    model = create_model(config.model_config(num_classes=len(images.label_names)))
    if config.pretrained:
        from bctool.models.pretrained import load_backbone_weights

        report = load_backbone_weights(model.backbone, config.pretrained)
        logger.info("loaded %s pretrained tensors from %s", report.get("loaded"), config.pretrained)
    task = ClassificationTask(model).to(device)
    if device.type == "cuda":
        task = task.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        task.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    loader = make_loader(images, config, preprocess, generator, pin=device.type == "cuda")
    steps_per_epoch = len(loader)
    total = steps_per_epoch * config.epochs
    warmup = min(total // 2, round(config.warmup_epochs * steps_per_epoch))
    history: list[dict[str, float]] = []
    step = 0
    start = time.perf_counter()
    progress.start(f"train {config.arch}", total)
    try:
        for epoch in range(config.epochs):
            task.train()
            sums: dict[str, float] = {}
            for batch_images, labels, indices in loader:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, config.lr)
                batch_images = batch_images.to(device, non_blocking=True)
                if device.type == "cuda":
                    batch_images = batch_images.contiguous(memory_format=torch.channels_last)
                parts = task(batch_images, labels.to(device), indices.to(device))
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                optimizer.step()
                values = {k: float(v.detach()) for k, v in parts.items()}
                if not math.isfinite(values["loss"]):
                    bad = [k for k, v in values.items() if not math.isfinite(v)]
                    raise BctoolError(
                        f"loss became non-finite at epoch {epoch + 1}, step {step + 1} "
                        f"(parts {bad}); lower --lr (now {config.lr})"
                    )
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                step += 1
                progress.advance(1, f"epoch {epoch + 1}/{config.epochs} loss {values['loss']:.3f}")
            history.append({k: v / max(1, steps_per_epoch) for k, v in sums.items()})
            logger.info("epoch %d: %s", epoch + 1, history[-1])
    finally:
        progress.stop()
    seconds = time.perf_counter() - start
    save_checkpoint(
        out,
        model,
        preprocess,
        list(images.label_names),
        train_config={**config.to_dict(), "data": images.source},
        extra={"trained_classes": list(images.label_names)},
    )
    return TrainResult(
        out=str(Path(out)),
        epochs=config.epochs,
        steps=step,
        images=len(images),
        classes=len(images.label_names),
        device=str(device),
        seconds=seconds,
        final=history[-1] if history else {},
        history=history,
    )
