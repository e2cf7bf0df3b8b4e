"""Training only part of a backbone (``--trainable``), and the frozen part run once per image.

The first stages of the backbone (:mod:`bctool.models.stages`) are frozen: no gradients, and
their BatchNorm layers keep their statistics (eval mode), as a pretrained network's should.
When the frozen stages see the same pixels every epoch (the clean views, ``--augment none``,
the default against precomputed old embeddings), their output for each image is computed once,
before the first epoch, and the loader yields those outputs instead of images: an epoch then
costs only the trainable top, and no image is decoded again. The outputs are kept in the cache
folder (``$BCTOOL_CACHE/frozen/``, by a digest of the frozen weights, the images and the
preprocessing), so another run from the same start on the same images reads them back. The data order, and so the run,
is the same as without the cache (the loader draws from the same generator).

Not cached (the frozen stages run on every batch, still without gradients): augmented views,
an old model run on the training batches (``--old-model``: it needs the images), stored old
views, and multi-process training.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from bctool.checkpoint import Checkpoint
from bctool.data.dataset import ImageDataset
from bctool.data.sources import ImageSet
from bctool.data.transforms import TRAINING_VIEWS, Preprocess
from bctool.embeddings import Embeddings
from bctool.models import EmbeddingModel
from bctool.train.config import TrainConfig
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)

CACHE_BATCH = 64  # images a forward pass of the frozen stages when the cache is filled


def why_not_cached(config: TrainConfig, world_size: int = 1) -> str | None:
    """Why the frozen stages' outputs cannot be computed once for this run (None: they can)."""
    if config.optim.trainable == "all":
        return "the whole backbone trains"
    if not TRAINING_VIEWS.entry(config.optim.augment).declares["clean"]:
        return f"--augment {config.optim.augment} shows other pixels every epoch"
    if config.compat.old_model:
        return "--old-model runs the old model on the training images"
    if config.compat.old_views:
        return "--old-views draws a stored view per sample"
    if world_size > 1:
        return "multi-process training"
    return None


class CachedInputs(Dataset):
    """Yields ``(frozen output, label, index)`` from the outputs computed once."""

    def __init__(self, outputs: torch.Tensor, labels: list[int]) -> None:
        self.outputs = outputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.outputs[index], self.labels[index], index


@torch.no_grad()
def frozen_outputs(model: EmbeddingModel, images: ImageSet, preprocess: Preprocess, device: torch.device,
                   workers: int = 0, progress: Progress = NULL_PROGRESS) -> torch.Tensor:
    """The frozen stages' output for every image of ``images`` (clean views), in order, on the CPU."""
    stages = model.stages[: model.frozen_stages]
    dataset = ImageDataset(images, TRAINING_VIEWS["none"](preprocess))
    loader = DataLoader(dataset, batch_size=CACHE_BATCH, shuffle=False, num_workers=workers)
    was_training = [stage.training for stage in stages]
    for stage in stages:
        stage.eval()
    parts = []
    progress.start("frozen stages", len(images))
    for batch, _, _ in loader:
        x = batch.to(device)
        for stage in stages:
            x = stage(x)
        parts.append(x.cpu())
        progress.advance(len(batch))
    progress.stop()
    for stage, mode in zip(stages, was_training):
        stage.train(mode)
    return torch.cat(parts)


def frozen_key(model: EmbeddingModel, images: ImageSet, preprocess: Preprocess) -> str:
    """sha256 of what the frozen outputs depend on: the frozen stages' weights and statistics,
    the images (ids, labels, and each file's path, size and modification time, in order) and the
    preprocessing."""
    from dataclasses import asdict

    from bctool.train.setup import data_fingerprint

    digest = hashlib.sha256(f"{model.config.arch}\n{model.frozen_stages}\n{asdict(preprocess)}\n".encode())
    digest.update(data_fingerprint(images).encode())
    for record in images.records:  # the files as they are now: an edited image is embedded again
        stat = Path(record.path).stat()
        digest.update(f"{record.path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    for stage in model.stages[: model.frozen_stages]:
        for name, tensor in stage.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stored_outputs(model: EmbeddingModel, images: ImageSet, preprocess: Preprocess, device: torch.device,
                   workers: int = 0, progress: Progress = NULL_PROGRESS) -> tuple[torch.Tensor, str]:
    """The frozen outputs, from the cache folder when a run with the same frozen stages, images
    and preprocessing stored them (``$BCTOOL_CACHE/frozen/KEY.safetensors``), else computed and
    stored there; and where they came from."""
    from safetensors.torch import load_file, save_file

    from bctool.models.weights import cache_dir
    from bctool.utils.io import atomic_path

    path = cache_dir().parent / "frozen" / f"{frozen_key(model, images, preprocess)}.safetensors"  # beside weights/
    if path.is_file():
        try:
            return load_file(path)["outputs"], f"read from {path}"
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is made again
            logger.warning("the frozen-output cache %s is unreadable (%s); computing it again", path, exc)
    outputs = frozen_outputs(model, images, preprocess, device, workers, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"outputs": outputs.contiguous()}, str(tmp))
    return outputs, f"computed, stored in {path}"


def cached_loader(loader: DataLoader, outputs: torch.Tensor, labels: list[int]) -> DataLoader:
    """``loader`` with the same batches, sampler and generator, over the cached outputs (no
    worker processes: nothing is left to decode)."""
    return DataLoader(CachedInputs(outputs, labels), batch_size=loader.batch_size, sampler=loader.sampler,
                      drop_last=loader.drop_last, num_workers=0, generator=loader.generator,
                      pin_memory=loader.pin_memory)


def use_frozen_cache(model: EmbeddingModel, images: ImageSet, loader: DataLoader, config: TrainConfig,
                     preprocess: Preprocess, device: torch.device, world_size: int = 1,
                     progress: Progress = NULL_PROGRESS) -> tuple[DataLoader, dict[str, Any]]:
    """The loader a run trains from, and what the checkpoint records about the frozen part:
    the frozen stages, and whether their outputs were computed once (and if not, why not)."""
    if not model.frozen_stages:
        return loader, {}
    facts: dict[str, Any] = {"trainable": config.optim.trainable, "stages": len(model.stages),
                             "frozen_stages": model.frozen_stages}
    reason = why_not_cached(config, world_size) or (None if config.optim.frozen_cache else "--no-frozen-cache")
    if reason:
        facts["cache"] = f"no: {reason}"
        return loader, facts
    outputs, where = stored_outputs(model, images, preprocess, device, config.optim.workers, progress)
    model.input_stage = model.frozen_stages
    facts["cache"] = (f"yes: {tuple(outputs.shape[1:])} per image, {outputs.numel() * outputs.element_size() / 2**20:.1f} "
                      f"MiB, {where}")
    logger.info("frozen stages computed once: %s", facts["cache"])
    return cached_loader(loader, outputs, list(images.labels)), facts


@torch.no_grad()
def embed_through_frozen(checkpoint: Checkpoint, images: ImageSet, workers: int = 0,
                         progress: Progress = NULL_PROGRESS, batch_size: int = 256) -> Embeddings:
    """:func:`bctool.extract.extract` of a checkpoint trained with frozen stages (its ``extra``
    records how many), the frozen stages' outputs taken from the cache folder (or computed and
    stored there): models that share those stages (every model fine-tuned from the same
    pretrained start) embed the same list with one pass through them. The rows are
    :func:`~bctool.extract.extract`'s, up to the floating-point order of a batch. An imported
    network (``bctool import``) goes through the cache with its whole backbone."""
    import os

    import numpy as np

    count = int(checkpoint.extra.get("frozen", {}).get("frozen_stages", 0))
    model = checkpoint.model
    if "imported" in checkpoint.extra and isinstance(model, EmbeddingModel):
        # An imported network's backbone is fixed pretrained weights: all of it goes through the cache.
        from bctool.models.stages import backbone_stages

        count = len(backbone_stages(model.backbone))
    if not count or not isinstance(model, EmbeddingModel):  # a model file runs whole
        from bctool.extract import extract

        return extract(images, checkpoint, workers=workers, progress=progress)
    model.freeze_stages(count)
    device = next(model.parameters()).device
    outputs, _ = stored_outputs(model, images, checkpoint.preprocess, device, workers, progress)
    model.eval()
    model.input_stage = count
    try:
        rows = [model.embed(outputs[i : i + batch_size].to(device)).cpu() for i in range(0, len(outputs), batch_size)]
    finally:
        model.input_stage = 0
    return Embeddings(embeddings=torch.cat(rows).numpy().astype(np.float32), labels=np.asarray(images.labels, dtype=np.int64),
                      ids=images.ids, label_names=list(images.label_names), model=checkpoint.identity(),
                      normalized=False, root=os.path.abspath(images.root))
