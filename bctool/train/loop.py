"""The training loop: one function, no method-specific branches (those live in the tasks)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bctool.checkpoint import save_checkpoint
from bctool.data.sources import ImageSet
from bctool.data.transforms import Preprocess
from bctool.errors import BctoolError, ConfigError
from bctool.utils.interrupt import Interrupted, StopSignals
from bctool.utils.io import atomic_write_text, check_output_path, output_lock
from bctool.models import EmbeddingModel
from bctool.models.weights import describe_pretrained
from bctool.utils.progress import NULL_PROGRESS, Progress
from bctool.train.config import TrainConfig
from bctool.train.defaults import Resolved, resolve_defaults
from bctool.train.distributed import (
    Rank,
    all_mean,
    barrier,
    current_rank,
    rank_device,
)
from bctool.train.log import TrainLog
from bctool.train.regime import SCHEDULES, STEP_GAMMA
from bctool.train.frozen import use_frozen_cache
from bctool.train.setup import (
    build_model,
    build_task,
    check_trainable,
    consistency_facts,
    data_fingerprint,
    distribute,
    make_loader,
    readable_images,
    run_preprocess,
    seed_everything,
)
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
    frozen: dict[str, Any] = field(default_factory=dict)  # --trainable: the frozen stages and their cache
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
            **({"frozen": self.frozen} if self.frozen else {}),
            "defaults_from": self.defaults_from,
        }


def lr_at(step: int, total: int, warmup: int, base_lr: float, milestones: tuple[int, ...] | None = None) -> float:
    """The learning rate of ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps,
    then cosine decay to zero; with ``milestones`` (steps), step decay instead: x0.1 from each."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if milestones is not None:
        return base_lr * STEP_GAMMA ** sum(step >= m for m in milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(
    images: ImageSet,
    config: TrainConfig,
    out: str | os.PathLike[str],
    progress: Progress = NULL_PROGRESS,
    given: Iterable[str] | None = None,
    resolved: Resolved | None = None,
) -> TrainResult:
    """Train a model on ``images`` with ``config``; write the checkpoint to ``out``. ``resolved``:
    ``resolve_defaults(config, given)`` when the caller has made it already (resolved once, its
    choices logged once).

    Options ``config`` leaves open are resolved by :func:`~bctool.train.defaults.resolve_defaults`
    (``given``: the options the user set, for the record of where each value came from).

    The training state is saved to ``OUT.state.safetensors`` after every epoch, every
    ``config.run.save_every`` steps, and when SIGINT or SIGTERM stops the run (after the step in
    flight; :class:`~bctool.utils.interrupt.Interrupted` is raised then). ``config.run.resume`` continues
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
        return _train(images, resolved or resolve_defaults(config, given), out, progress)


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
    images, failed = readable_images(images, config, out, rank, progress) if not config.optim.strict else (images, [])
    check_trainable(images)
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
        frozen=session.facts.get("frozen", {}), defaults_from=dict(resolved.sources),
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
        preprocess = run_preprocess(config)
        model, init = build_model(images, config)
        task, facts = build_task(images, config, model, preprocess, device, progress)
        if config.model.pretrained:  # the weights' name (or file), sha256 and preprocessing
            facts["pretrained"] = describe_pretrained(config.model.arch, config.model.pretrained)
        task.to(device)
        if config.run.diagnostics and rank.is_main:
            facts["consistency"] = consistency_facts(images, config, task, preprocess, device)
        if device.type == "cuda":
            task.to(memory_format=torch.channels_last)
        forward = distribute(task, config, device, rank)
        optim = config.optim
        params = [p for p in task.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        scaler = torch.amp.GradScaler(device.type) if optim.amp == "fp16" and device.type == "cuda" else None
        loader = make_loader(images, config, preprocess, generator, pin=device.type == "cuda", rank=rank,
                             views=getattr(getattr(task, "old", None), "views", ()))
        loader, facts["frozen"] = use_frozen_cache(model, images, loader, config, preprocess, device,
                                                   rank.world_size, progress)
        if not facts["frozen"]:
            del facts["frozen"]
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
            if device.type == "cuda" and images.dim() == 4:  # images, or cached feature maps (not pooled rows)
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
