"""What one training run is built from: the seeded random state, the readable images, the model
(fresh, pretrained or warm-started), the task (plain or compatible), the loader and the
multi-process wrapper. The loop (:mod:`bctool.train.loop`) runs what these build."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bctool.data.check import find_unreadable, without, write_report
from bctool.data.dataset import ImageDataset, StoredViewsDataset
from bctool.data.sources import ImageSet
from bctool.data.transforms import TRAINING_VIEWS, Preprocess, StoredView
from bctool.errors import DataError
from bctool.models import EmbeddingModel, create_model
from bctool.utils.progress import NULL_PROGRESS, Progress
from bctool.train.config import TrainConfig
from bctool.train.distributed import (
    Rank,
    ShardedShuffle,
    gather_lists,
    per_rank_batch,
    seed_worker_for_rank,
    sync_batchnorm,
)
from bctool.train.tasks import ClassificationTask, CompatibleTask

logger = logging.getLogger(__name__)


def data_fingerprint(images: ImageSet) -> str:
    """sha256 over the ids, labels and label names of ``images``, in order."""
    digest = hashlib.sha256()
    for record in images.records:
        digest.update(f"{record.id}\t{record.label}\n".encode())
    digest.update("\n".join(images.label_names).encode())
    return digest.hexdigest()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a generator for the data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_trainable(images: ImageSet) -> None:
    if not images.has_labels():
        missing = sum(1 for r in images.records if r.label < 0)
        raise DataError(f"{images.source!r}: {missing} images have no label; training needs labels")
    if len(images.label_names) < 2:
        raise DataError(
            f"{images.source!r} has {len(images.label_names)} class; classification training "
            "needs at least 2 classes"
        )
    if len(images) < 2:
        raise DataError(f"{images.source!r} has {len(images)} image; training needs at least 2")


def make_loader(
    images: ImageSet, config: TrainConfig, preprocess: Preprocess, generator: torch.Generator, pin: bool,
    rank: Rank = Rank(), views: Sequence[StoredView] = (),
) -> DataLoader:
    """Shuffled, batch-complete loader (BatchNorm needs more than one sample per batch).

    Workers are re-created each epoch and seeded from ``generator``, so an epoch's data order and
    augmentation depend only on the generator state saved with the training state. Under
    multi-process training each rank loads its share of every global batch (``--batch-size``).
    With stored ``views`` each sample is the clean image or one of those views, drawn uniformly.
    """
    transform = TRAINING_VIEWS[config.optim.augment](preprocess)
    batch_size = per_rank_batch(min(config.optim.batch_size, len(images)), rank)
    dataset = (StoredViewsDataset(images, transform, [v.transform(preprocess) for v in views]) if views
               else ImageDataset(images, transform))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedShuffle(len(images), generator, rank),
        drop_last=True,
        num_workers=config.optim.workers,
        generator=generator,
        pin_memory=pin,
        worker_init_fn=functools.partial(seed_worker_for_rank, rank.rank) if rank.rank else None,
    )


def run_preprocess(config: TrainConfig) -> Preprocess:
    """How a run trains and its checkpoint extracts, at the run's image size: a warm start keeps
    the preprocessing of the checkpoint it starts from (the normalisation and interpolation its
    weights expect: an imported or pretrained-start model's are not bctool's defaults); named
    weights give theirs; else bctool's. Training sees the whole image (no evaluation crop)."""
    from bctool.models.weights import training_preprocess

    if config.model.init_from:
        import dataclasses
        import json

        from bctool.checkpoint import read_checkpoint_metadata
        from bctool.train.warm_start import refuse_model_file

        refuse_model_file(config.model.init_from)
        recorded = Preprocess.from_dict(json.loads(read_checkpoint_metadata(config.model.init_from)["preprocess"]))
        return dataclasses.replace(recorded, image_size=config.model.image_size, crop_fraction=1.0)
    return training_preprocess(config.model.arch, config.model.pretrained, config.model.image_size)


def build_model(images: ImageSet, config: TrainConfig) -> tuple[EmbeddingModel, dict[str, Any] | None]:
    """A fresh model for ``images``' classes, with pretrained backbone weights or warm-started
    from an old checkpoint if asked, its first stages frozen if ``--trainable`` says so; and the
    warm start's record (None without one)."""
    model = create_model(config.model_config(num_classes=len(images.label_names)))
    if config.model.pretrained:
        from bctool.models.weights import load_pretrained

        report = load_pretrained(model.backbone, config.model.arch, config.model.pretrained)
        logger.info("loaded %s pretrained tensors from %s", report.get("loaded"), config.model.pretrained)
    init = None
    if config.model.init_from:
        from bctool.train.warm_start import warm_start

        init = warm_start(model, images.label_names, config.model.init_from).to_dict()
    if config.optim.trainable != "all":  # after the weights are in: freezing does not change them
        from bctool.models.stages import backbone_stages, frozen_stage_count

        model.freeze_stages(frozen_stage_count(config.optim.trainable, len(backbone_stages(model.backbone))))
    return model, init


def build_task(
    images: ImageSet, config: TrainConfig, model: EmbeddingModel, preprocess: Preprocess,
    device: torch.device, progress: Progress = NULL_PROGRESS,
) -> tuple[ClassificationTask, dict[str, Any]]:
    """The task of ``config.compat.method`` and the facts the checkpoint records about it."""
    if not config.compatible:
        return ClassificationTask(model), {}
    from bctool.train.compat import compute_old_stats
    from bctool.train.methods import MethodContext, create_method, method_class
    from bctool.train.old_side import OldSource, load_old_side

    old = load_old_side(
        images, config.model.embedding_dim, preprocess, device, OldSource.of(config.compat),
        need_old_head=method_class(config.compat.method).uses_old_head, workers=config.optim.workers,
        progress=progress,
    )
    labels = torch.tensor(images.labels, dtype=torch.int64)
    labels = labels.repeat(old.embeddings.shape[0] // len(images))  # one per view, with stored views
    stats = compute_old_stats(old.embeddings, labels, len(images.label_names), old.old_classes)
    model.to(device)
    context = MethodContext(
        stats=stats.to(device),
        model=model,
        old_head=old.old_head.to(device) if old.old_head is not None else None,
        old_label_index=old.old_label_index.to(device) if old.old_label_index is not None else None,
    )
    compat = create_method(config.compat.method, context, config.compat.method_params)
    facts = {
        "old": old.description,
        "old_classes": int(old.old_classes.sum()),
        "old_classifier": "old checkpoint head" if old.old_head is not None else "none",
        "old_view": _old_view(config),
    }
    logger.info("compatible training with %s against %s", config.compat.method, old.description)
    return CompatibleTask(model, old.module, compat, weight=config.compat.compat_weight, diagnose=config.run.diagnostics), facts


def _old_view(config: TrainConfig) -> str:
    """Which views the old embeddings a run trains against are of; a warning when they are not
    the views the new model sees (precomputed from clean images, new views augmented)."""
    if config.compat.old_model:
        return "same: the old model runs on every training batch"
    if config.compat.old_views:
        return f"same: the clean image and {len(config.compat.old_views)} stored views, with their old embeddings"
    if TRAINING_VIEWS.entry(config.optim.augment).declares["clean"]:
        return "same: clean images on both sides"
    logger.warning(
        "--augment %s with --old-embeddings: the old embeddings were made from clean images, so the new model is "
        "trained against old embeddings of other views than it sees (a discriminator tells the old model's own "
        "%s views from them; --diagnostics measures it). Use --augment none, or --old-model to run the old model "
        "on the same views", config.optim.augment, config.optim.augment,
    )
    return f"different: the new model sees {config.optim.augment} views, the old embeddings are of clean images"


def consistency_facts(
    images: ImageSet, config: TrainConfig, task: ClassificationTask, preprocess: Preprocess, device: torch.device,
) -> dict[str, Any]:
    """The consistency floor of a compatible run against precomputed old embeddings (see
    :mod:`bctool.train.consistency`), when the old checkpoint is known; else why not."""
    from bctool.train.old_side import PrecomputedOld

    if not isinstance(task, CompatibleTask):
        return {}
    if not isinstance(task.old, PrecomputedOld):
        return {"skipped": "the old model runs on every training batch: the same views by construction"}
    from bctool.checkpoint import load_model
    from bctool.train.consistency import consistency_floor
    from bctool.train.old_side import OnTheFlyOld
    from bctool.train.recipe import known_old_checkpoint

    path = known_old_checkpoint(config)
    if path is None:
        return {"skipped": "the old checkpoint is not known (keep the one the embeddings file names, unchanged)"}
    old = OnTheFlyOld(load_model(path, device=device), preprocess).to(device)
    seed = config.optim.seed + 1  # its own draws: the training's are left alone
    loader = make_loader(images, config, preprocess, torch.Generator().manual_seed(seed), pin=False,
                         views=task.old.views)
    # The table holds the clean rows, then each stored view's: a label per row.
    labels = torch.tensor(images.labels, dtype=torch.int64).repeat(1 + len(task.old.views))
    seen = f"{config.optim.augment} and {len(task.old.views)} stored views" if task.old.views else config.optim.augment
    floor = consistency_floor(old, loader, task.old.table.cpu(), labels, task.compat.ctx.stats, seen,
                              device, seed=seed).to_dict()
    logger.info("consistency floor (the old model's own %s views against the old embeddings): %s",
                config.optim.augment, floor)
    return floor


def readable_images(
    images: ImageSet, config: TrainConfig, out: str | os.PathLike[str], rank: Rank, progress: Progress
) -> tuple[ImageSet, list[dict[str, Any]]]:
    """``images`` without the unreadable ones, and those (reported in ``OUT.failed.tsv``). Each
    rank decodes every W-th image; all ranks then leave out the same ones."""
    mine = find_unreadable(images, range(rank.rank, len(images), rank.world_size), config.optim.workers, progress)
    failed = sorted(gather_lists(mine), key=lambda f: f["row"])
    if rank.is_main:
        report = write_report(out, failed)
        if failed:
            logger.warning("%d unreadable images are left out of training (listed in %s); --strict stops at the "
                           "first one instead", len(failed), report)
    return without(images, failed), failed


def distribute(task: nn.Module, config: TrainConfig, device: torch.device, rank: Rank) -> nn.Module:
    """The module a step calls: ``task`` itself, or ``task`` wrapped in DistributedDataParallel.

    The frozen old side is left out of DDP's parameter and buffer syncing (every rank loads the
    same old model or embeddings). Each rank normalises its own share of the batch; BatchNorm's
    running statistics are rank 0's (DDP broadcasts them every step) unless ``--sync-bn``
    computes them over the global batch.
    """
    if config.optim.sync_bn and rank.distributed:
        for name, child in task.named_children():
            if name != "old":  # the frozen old model runs in eval mode
                setattr(task, name, sync_batchnorm(child, device))
    elif config.optim.sync_bn:
        logger.info("--sync-bn has no effect in a single process")
    if not rank.distributed:
        return task
    from torch.nn.parallel import DistributedDataParallel

    # Not synced by DDP: the frozen old side, and constant buffers (old-class targets and
    # prototypes, precomputed tables: non-persistent, equal on every rank by construction).
    frozen = [name for name, _ in (*task.named_parameters(), *task.named_buffers()) if name.startswith("old.")]
    frozen += [f"{prefix}.{name}" if prefix else name for prefix, module in task.named_modules()
               for name in module._non_persistent_buffers_set]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, sorted(set(frozen)))
    compat = getattr(task, "compat", None)
    return DistributedDataParallel(
        task,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(getattr(compat, "has_unused_parameters", False)),
    )
