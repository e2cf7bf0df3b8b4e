"""The training loop: one function, no method-specific branches (those live in the tasks)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bctool.checkpoint import save_checkpoint
from bctool.data.check import find_unreadable, without, write_report
from bctool.data.dataset import ImageDataset, StoredViewsDataset
from bctool.data.sources import ImageSet
from bctool.data.transforms import TRAINING_VIEWS, Preprocess, StoredView
from bctool.errors import BctoolError, ConfigError, DataError
from bctool.interrupt import Interrupted, StopSignals
from bctool.io import atomic_write_text, check_output_path, output_lock
from bctool.models import EmbeddingModel, create_model
from bctool.progress import NULL_PROGRESS, Progress
from bctool.train.config import TrainConfig
from bctool.train.distributed import (
    Rank,
    ShardedShuffle,
    all_mean,
    barrier,
    current_rank,
    gather_lists,
    per_rank_batch,
    rank_device,
    seed_worker_for_rank,
    sync_batchnorm,
)
from bctool.train.log import TrainLog
from bctool.train.defaults import Resolved, resolve_defaults
from bctool.train.regime import SCHEDULES, STEP_GAMMA
from bctool.train.state import load_train_state, save_train_state, state_path
from bctool.train.tasks import ClassificationTask, CompatibleTask

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run reports: final loss parts and throughput."""

    out: str
    method: str
    epochs: int
    steps: int
    images: int
    classes: int
    device: str
    seconds: float
    resumed_from_epoch: int = 0
    processes: int = 1
    skipped: int = 0  # unreadable images left out (listed in OUT.failed.tsv)
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    consistency: dict[str, Any] = field(default_factory=dict)  # --diagnostics: the consistency floor
    defaults_from: dict[str, str] = field(default_factory=dict)  # option -> given, default, regime ..., recipe

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, with the per-epoch mean of every loss part."""
        trained_epochs = self.epochs - self.resumed_from_epoch
        return {
            "out": self.out,
            "method": self.method,
            "epochs": self.epochs,
            "resumed_from_epoch": self.resumed_from_epoch,
            "steps": self.steps,
            "images": self.images,
            "classes": self.classes,
            "device": self.device,
            "processes": self.processes,
            "skipped_images": self.skipped,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(trained_epochs * self.images / max(self.seconds, 1e-9), 1),
            "final": {k: round(v, 6) for k, v in self.final.items()},
            "history": [{k: round(v, 6) for k, v in epoch.items()} for epoch in self.history],
            **({"consistency": self.consistency} if self.consistency else {}),
            "defaults_from": self.defaults_from,
        }


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


def _check_trainable(images: ImageSet) -> None:
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


def lr_at(step: int, total: int, warmup: int, base_lr: float, milestones: tuple[int, ...] | None = None) -> float:
    """The learning rate of ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps,
    then cosine decay to zero; with ``milestones`` (steps), step decay instead: x0.1 from each."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if milestones is not None:
        return base_lr * STEP_GAMMA ** sum(step >= m for m in milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def build_model(images: ImageSet, config: TrainConfig) -> tuple[EmbeddingModel, dict[str, Any] | None]:
    """A fresh model for ``images``' classes, with pretrained backbone weights or warm-started
    from an old checkpoint if asked; and the warm start's record (None without one)."""
    model = create_model(config.model_config(num_classes=len(images.label_names)))
    if config.model.pretrained:
        from bctool.models.pretrained import load_backbone_weights

        report = load_backbone_weights(model.backbone, config.model.pretrained)
        logger.info("loaded %s pretrained tensors from %s", report.get("loaded"), config.model.pretrained)
    if config.model.init_from:
        from bctool.train.warm_start import warm_start

        return model, warm_start(model, images.label_names, config.model.init_from).to_dict()
    return model, None


def build_task(
    images: ImageSet, config: TrainConfig, model: EmbeddingModel, preprocess: Preprocess,
    device: torch.device, progress: Progress = NULL_PROGRESS,
) -> tuple[ClassificationTask, dict[str, Any]]:
    """The task of ``config.compat.method`` and the facts the checkpoint records about it."""
    if not config.compatible:
        return ClassificationTask(model), {}
    from bctool.train.compat import compute_old_stats
    from bctool.train.methods import MethodContext, create_method, method_class
    from bctool.train.old_side import load_old_side

    old = load_old_side(
        images, config.model.embedding_dim, preprocess, device,
        old_embeddings=config.compat.old_embeddings, old_model=config.compat.old_model,
        old_classes=config.compat.old_classes, need_old_head=method_class(config.compat.method).uses_old_head,
        workers=config.optim.workers, progress=progress, old_views=config.compat.old_views,
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


def _consistency(
    images: ImageSet, config: TrainConfig, task: ClassificationTask, preprocess: Preprocess, device: torch.device,
) -> dict[str, Any]:
    """The consistency floor of a compatible run against precomputed old embeddings (see
    :mod:`bctool.train.consistency`), when the old checkpoint is known; else why not."""
    from bctool.train.old_side import PrecomputedOld

    if not isinstance(task, CompatibleTask):
        return {}
    if not isinstance(task.old, PrecomputedOld):
        return {"skipped": "the old model runs on every training batch: the same views by construction"}
    from bctool.checkpoint import load_checkpoint
    from bctool.train.consistency import consistency_floor
    from bctool.train.old_side import OnTheFlyOld
    from bctool.train.recipe import known_old_checkpoint

    path = known_old_checkpoint(config)
    if path is None:
        return {"skipped": "the old checkpoint is not known (keep the one the embeddings file names, unchanged)"}
    old = OnTheFlyOld(load_checkpoint(path, device=device), preprocess).to(device)
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


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _readable(
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


def train(
    images: ImageSet,
    config: TrainConfig,
    out: str | os.PathLike[str],
    progress: Progress = NULL_PROGRESS,
    given: Iterable[str] | None = None,
) -> TrainResult:
    """Train a model on ``images`` with ``config``; write the checkpoint to ``out``.

    Options ``config`` leaves open are resolved by :func:`~bctool.train.defaults.resolve_defaults`
    (``given``: the options the user set, for the record of where each value came from).

    The training state is saved to ``OUT.state.safetensors`` after every epoch, every
    ``config.run.save_every`` steps, and when SIGINT or SIGTERM stops the run (after the step in
    flight; :class:`~bctool.interrupt.Interrupted` is raised then). ``config.run.resume`` continues
    from it, mid-epoch included; it is removed once the checkpoint is written. A run without
    ``resume`` is refused while that state exists (it would train from scratch and replace it).
    Unreadable images are left out first (listed in ``OUT.failed.tsv``) unless ``config.optim.strict``.
    """
    check_output_path(out)
    # One writer per checkpoint (and its state file): another process training into the same
    # OUT is refused at once. Only rank 0 writes, so only rank 0 locks.
    with output_lock(out) if current_rank().is_main else contextlib.nullcontext():
        if not config.run.resume:
            refuse_interrupted_state(out)
        return _train(images, resolve_defaults(config, given), out, progress)


def refuse_interrupted_state(out: str | os.PathLike[str]) -> None:
    """A :class:`ConfigError` when an interrupted run into ``out`` left its training state: a
    fresh run would start over and overwrite it, losing the epochs it holds."""
    state = state_path(out)
    if state.exists():
        raise ConfigError(
            f"{str(state)!r} holds the training state of an interrupted run into {str(out)!r}; pass --resume to "
            f"continue it, or delete {str(state)!r} to start over"
        )


def _train(images: ImageSet, resolved: Resolved, out: str | os.PathLike[str], progress: Progress) -> TrainResult:
    """:func:`train` once its output is checked and locked and its config resolved."""
    config = resolved.config
    rank = current_rank()
    images, failed = _readable(images, config, out, rank, progress) if not config.optim.strict else (images, [])
    _check_trainable(images)
    session = _Session.start(images, config, out, rank, progress, resolved.sources)
    start_epoch, step, partial = session.resume()
    start = time.perf_counter()
    progress.start(f"train {config.compat.method} {config.model.arch}", session.total)
    progress.advance(step)
    try:
        step = session.run_epochs(start_epoch, step, partial)
    finally:
        progress.stop()
        if session.log is not None:
            session.log.close()
    seconds = time.perf_counter() - start
    if rank.is_main:
        session.write_checkpoint(out, images)
    barrier()  # every rank returns once the checkpoint exists
    history = session.history
    return TrainResult(
        out=str(Path(out)), method=config.compat.method, epochs=config.optim.epochs, steps=step, images=len(images),
        classes=len(images.label_names), device=str(session.device), seconds=seconds,
        resumed_from_epoch=start_epoch, processes=rank.world_size, skipped=len(failed),
        final=history[-1] if history else {}, history=history, consistency=session.facts.get("consistency", {}),
        defaults_from=dict(resolved.sources),
    )


@dataclass
class _Session:
    """What every epoch of one run shares: the task and the module a step calls (the task or
    its DDP wrapper), the optimizer, the data, the schedule, and where the state is saved."""

    config: TrainConfig
    rank: Rank
    device: torch.device
    model: EmbeddingModel
    preprocess: Preprocess
    task: ClassificationTask
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loader: DataLoader
    generator: torch.Generator
    total: int  # steps of the whole run
    warmup: int  # steps of linear warm-up
    milestones: tuple[int, ...] | None  # steps where the step schedule decays (None: cosine)
    state_file: Path
    # What the run depends on: the options and the exact data (ids and labels, in order). A
    # warm start's record holds the old file's sha256: --resume refuses a changed file.
    identity: dict[str, Any]
    init: dict[str, Any] | None  # the warm start's record
    facts: dict[str, Any]  # what the checkpoint records about the compatibility method
    progress: Progress
    sources: Mapping[str, str]  # where each option's value came from (resolve_defaults)
    log: TrainLog | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, images: ImageSet, config: TrainConfig, out: str | os.PathLike[str], rank: Rank,
              progress: Progress, sources: Mapping[str, str]) -> _Session:
        """Build the model, the task, the optimizer and the loader of a run (seeded first)."""
        device = rank_device(config.run.device)
        generator = seed_everything(config.optim.seed)
        preprocess = Preprocess(image_size=config.model.image_size)
        model, init = build_model(images, config)
        task, facts = build_task(images, config, model, preprocess, device, progress)
        task.to(device)
        if config.run.diagnostics and rank.is_main:
            facts["consistency"] = _consistency(images, config, task, preprocess, device)
        if device.type == "cuda":
            task.to(memory_format=torch.channels_last)
        forward = _distribute(task, config, device, rank)
        optim = config.optim
        params = [p for p in task.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        scaler = torch.amp.GradScaler(device.type) if optim.amp == "fp16" and device.type == "cuda" else None
        loader = make_loader(images, config, preprocess, generator, pin=device.type == "cuda", rank=rank,
                             views=getattr(getattr(task, "old", None), "views", ()))
        total = len(loader) * optim.epochs
        warmup = min(total // 2, round(optim.warmup_epochs * len(loader)))
        decays = SCHEDULES.get_obj(optim.schedule)(optim.epochs)
        milestones = tuple(m * len(loader) for m in decays) if decays is not None else None
        identity = {**config.to_dict(), "data": data_fingerprint(images), "processes": rank.world_size,
                    "init_from": init}
        return cls(config, rank, device, model, preprocess, task, forward, optimizer, scaler, loader, generator,
                   total, warmup, milestones, state_path(out), identity, init, facts, progress, sources)

    def resume(self) -> tuple[int, int, dict[str, Any] | None]:
        """Restore an interrupted run's state when resuming; open the log. Returns the epoch
        and step to start at, and what the interrupted epoch had done (or None)."""
        step, start_epoch, partial = 0, 0, None
        run = self.config.run
        if run.resume:
            saved = load_train_state(self.state_file, self.task.trainable_state(), self.optimizer, self.scaler,
                                     self.generator, self.identity)
            start_epoch, step, self.history = saved["epoch"], saved["step"], saved["history"]
            partial = saved.get("partial")
            logger.info("resuming at epoch %d, step %d", start_epoch + 1, step)
        if run.log_dir and self.rank.is_main:
            self.log = TrainLog(run.log_dir, step if run.resume else None)
        return start_epoch, step, partial

    def save_state(self, epoch: int, step: int, epoch_rng: torch.Tensor, partial: dict | None) -> None:
        """Save the state after ``epoch`` finished epochs (and ``partial`` of the next)."""
        if self.rank.is_main:
            save_train_state(self.state_file, self.task.trainable_state(), self.optimizer, self.scaler, epoch_rng,
                             {"epoch": epoch, "step": step, "history": self.history, "partial": partial},
                             self.identity)

    def run_epochs(self, start_epoch: int, step: int, partial: dict[str, Any] | None) -> int:
        """Train from ``start_epoch`` (``partial``: what an interrupted run did of it) to the
        end; return the step reached. A stop signal saves the state and raises Interrupted."""
        loader, config = self.loader, self.config
        with StopSignals() as stop:
            for epoch in range(start_epoch, config.optim.epochs):
                epoch_start = time.perf_counter()
                epoch_rng = self.generator.get_state()  # the epoch's data order is drawn from it
                done = partial if epoch == start_epoch else None
                if done:
                    loader.sampler.skip = done["batches"] * loader.batch_size
                run = _EpochRun(self, epoch, step, done)
                finished = run.train(loader, stop, lambda r: self.save_state(epoch, r.step, epoch_rng, r.partial()))
                step = run.step
                if not finished:
                    self.save_state(epoch, step, epoch_rng, run.partial())
                    raise Interrupted(
                        f"{stop.name}: stopped after step {step} of {self.total} (epoch {epoch + 1}); the training "
                        f"state is saved in {str(self.state_file)!r}: continue with the same command and --resume",
                        stop.signal_number,
                    )
                self.history.append(run.means())
                logger.info("epoch %d: %s", epoch + 1, self.history[-1])
                if self.log is not None:
                    seconds = time.perf_counter() - epoch_start
                    batches = run.batches - (done["batches"] if done else 0)
                    images_done = batches * loader.batch_size * self.rank.world_size
                    self.log.epoch({"epoch": epoch + 1, "step": step, "seconds": round(seconds, 3),
                                    "images_per_second": round(images_done / max(seconds, 1e-9), 1),
                                    **self.history[-1]})
                self.save_state(epoch + 1, step, self.generator.get_state(), None)
        return step

    def write_checkpoint(self, out: str | os.PathLike[str], images: ImageSet) -> None:
        """The checkpoint (and, under diagnostics, the method's final state); the training
        state is removed then."""
        config = self.config
        save_checkpoint(
            out, self.model, self.preprocess, list(images.label_names),
            train_config={**config.to_dict(), "data": images.source, "init_from": self.init,
                          "defaults_from": dict(self.sources)},
            extra={"trained_classes": list(images.label_names), "method": config.compat.method,
                   "processes": self.rank.world_size, **self.facts},
        )
        self.state_file.unlink(missing_ok=True)
        if config.run.diagnostics and config.run.log_dir and isinstance(self.task, CompatibleTask):
            atomic_write_text(Path(config.run.log_dir) / "compat.json", json.dumps(self.task.compat.summary()))


def _distribute(task: nn.Module, config: TrainConfig, device: torch.device, rank: Rank) -> nn.Module:
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


class _EpochRun:
    """One pass over the data through ``forward`` (the task or its DDP wrapper), possibly the rest
    of a pass an earlier run began (``done``: its batch count and loss sums)."""

    def __init__(self, session: _Session, epoch: int, step: int, done: dict[str, Any] | None) -> None:
        self.task, self.forward, self.optimizer = session.task, session.forward, session.optimizer
        self.scaler, self.log, self.rank, self.progress = session.scaler, session.log, session.rank, session.progress
        self.config, self.device, self.total, self.warmup = session.config, session.device, session.total, session.warmup
        self.milestones = session.milestones
        self.epoch, self.step = epoch, step
        self.batches = int(done["batches"]) if done else 0
        self.sums = {k: torch.tensor(v, device=self.device) for k, v in (done["sums"] if done else {}).items()}

    def partial(self) -> dict[str, Any]:
        """What a resumed run needs to finish this epoch: batches done and the loss sums,
        averaged over ranks (every rank calls this at the same step)."""
        names = list(self.sums)
        sums = all_mean(torch.stack([self.sums[k] for k in names])).tolist() if names else []
        return {"batches": self.batches, "sums": dict(zip(names, sums))}

    def _seed_rank(self) -> None:
        """Ranks other than 0 draw augmentation (with ``workers=0``) from a stream of their own,
        seeded by (seed, rank, step), so a resumed run draws what an uninterrupted one would;
        rank 0 keeps the one-process stream, saved with the training state."""
        if self.rank.rank:
            torch.manual_seed((self.config.optim.seed * 1_000_003 + self.rank.rank) * 1_000_033 + self.step)

    def means(self) -> dict[str, float]:
        """The mean of every loss part over the epoch, averaged over ranks."""
        names = list(self.sums)
        if not names:
            return {}
        means = all_mean(torch.stack([self.sums[k] for k in names]) / max(1, self.batches))
        return {k: float(means[i]) for i, k in enumerate(names)}

    def train(self, loader: DataLoader, stop: StopSignals, save: Callable[[_EpochRun], None]) -> bool:
        """Run the epoch's remaining steps; False if a signal stopped it after a finished step.

        ``save`` is called every ``config.run.save_every`` steps, except at the epoch's last step
        (the caller saves the finished epoch).
        """
        config, device, task = self.config, self.device, self.task
        task.train()
        self._seed_rank()
        for images, labels, indices in loader:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.total, self.warmup, config.optim.lr, self.milestones)
            task.set_progress(self.epoch, config.optim.epochs, self.step, self.total)
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.optim.amp):
                parts = self.forward(images, labels.to(device, non_blocking=True),
                                     indices.to(device, non_blocking=True))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(parts["loss"]).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                parts["loss"].backward()
                self.optimizer.step()
            # One sync per step, for the progress line and the log; averaged over ranks so that a
            # non-finite loss or a stop signal on any rank stops all of them after the same step.
            names = list(parts)
            flag = torch.tensor(float(stop.signal_number > 0), device=device)
            synced = all_mean(torch.stack([*(parts[k].detach().float() for k in names), flag])).tolist()
            values, stopping = dict(zip(names, synced)), synced[-1]
            loss = values["loss"]
            if not math.isfinite(loss):
                bad = [k for k, v in parts.items() if not torch.isfinite(v.detach()).all()]
                raise BctoolError(
                    f"loss became non-finite at epoch {self.epoch + 1}, step {self.step + 1} (parts {bad}); "
                    f"lower --lr (now {config.optim.lr}) or check the old embeddings; the last saved state "
                    "is kept for --resume"
                )
            for k, v in parts.items():
                self.sums[k] = self.sums.get(k, torch.zeros((), device=device)) + v.detach().float()
            self.batches += 1
            self.step += 1
            self.progress.advance(1, f"epoch {self.epoch + 1}/{config.optim.epochs} loss {loss:.3f}")
            self._seed_rank()  # before the loader fetches the next batch
            if self.log is not None:
                lr = self.optimizer.param_groups[0]["lr"]
                self.log.step({"step": self.step, "epoch": self.epoch + 1, "lr": lr, **values})
            if stopping:
                if not stop.signal_number:
                    stop.signal_number = signal.SIGTERM  # another rank was stopped
                return False
            if config.run.save_every and self.step % config.run.save_every == 0 and self.batches < len(loader):
                save(self)
        return True
