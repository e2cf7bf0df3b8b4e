"""Multi-process training on ``torch.distributed``: launched by ``torchrun``, one process per GPU.

``torchrun --nproc-per-node N -m bctool train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`process_group` turns them into a process group (NCCL on GPUs, gloo on
the CPU). The training loop then wraps its task in ``DistributedDataParallel`` and draws batches
with :class:`ShardedShuffle`, so that ``--batch-size`` stays the *global* batch: every step of an
N-process run sees the same images as the same step of a one-process run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from bctool.utils.device import resolve_device
from bctool.errors import ConfigError


@dataclass(frozen=True)
class Rank:
    """Where this process stands: its rank among ``world_size`` processes (0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, JSON and progress; the others stay quiet."""
        return self.rank == 0


def current_rank() -> Rank:
    """This process's rank, from the initialised process group (0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    return Rank()


def launched_rank() -> Rank:
    """The rank ``torchrun`` gave this process (from the environment), before any group exists."""
    try:
        return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE are not integers ({exc}); launch with torchrun") from exc


def rank_device(name: str) -> torch.device:
    """The device of this process: ``--device`` resolved, and on CUDA the GPU ``LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and launched_rank().distributed:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local)
    return device


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Rank]:
    """Join the process group ``torchrun`` describes (nothing to do for a single process).

    NCCL when this process trains on a GPU, gloo on the CPU. The group is destroyed on exit.
    """
    launched = launched_rank()
    if not launched.distributed or dist.is_initialized():
        yield current_rank()
        return
    device = rank_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield current_rank()
    finally:
        dist.destroy_process_group()


class ShardedShuffle(Sampler[int]):
    """Each epoch, one random order of all rows, the same on every rank; rank r takes the rows at
    positions r, r + W, r + 2W, ...

    With per-rank batches of ``B / W`` rows, global batch i (the union over ranks of their batch
    i) is exactly rows ``i*B .. (i+1)*B`` of the order, as a one-process run with batch ``B``
    would draw it. With W = 1 it draws from ``generator`` exactly as torch's ``RandomSampler``
    (which takes a second, empty permutation at the end of every epoch), so one-process runs
    keep their data order.
    """

    def __init__(self, num_rows: int, generator: torch.Generator, rank: Rank) -> None:
        self.num_rows = num_rows
        self.generator = generator
        self.rank = rank
        self.skip = 0  # rows of this rank's share to leave out, once (resuming mid-epoch)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=self.generator).tolist()
        torch.randperm(self.num_rows, generator=self.generator)  # RandomSampler's empty tail draw
        usable = self.num_rows - self.num_rows % self.rank.world_size
        skip, self.skip = self.skip, 0
        return iter(order[self.rank.rank : usable : self.rank.world_size][skip:])

    def __len__(self) -> int:
        return self.num_rows // self.rank.world_size


def per_rank_batch(batch_size: int, rank: Rank) -> int:
    """``--batch-size`` is global: each of W processes takes ``batch_size / W`` images a step."""
    if batch_size % rank.world_size:
        raise ConfigError(
            f"--batch-size {batch_size} does not split over {rank.world_size} processes; "
            f"use a multiple of {rank.world_size} (it is the global batch)"
        )
    per_rank = batch_size // rank.world_size
    if per_rank < 2:
        raise ConfigError(
            f"--batch-size {batch_size} over {rank.world_size} processes leaves {per_rank} image per "
            "process; BatchNorm needs at least 2: raise --batch-size"
        )
    return per_rank


class _GatherRows(torch.autograd.Function):
    """All-gather along rows whose backward hands each rank the gradient of its own rows summed
    over every rank's loss (an all-reduce of the gathered gradient, then this rank's slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return _all_gather_rows(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor`` from every rank, concatenated in rank order; gradients flow back to
    each rank's own rows, summed over the ranks' losses. Identity when alone.

    Every rank must pass the same number of rows (training batches are equal by construction).
    """
    if not current_rank().distributed:
        return tensor
    return _GatherRows.apply(tensor) if tensor.requires_grad else _all_gather_rows(tensor)


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over ranks (``values`` itself when alone)."""
    if not current_rank().distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def global_count(count: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``count`` summed over ranks, and the number of ranks (``count``, 1 when alone)."""
    if not current_rank().distributed:
        return count, 1
    count = count.clone()
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count, dist.get_world_size()


def gather_lists(items: list) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order (``items`` when alone)."""
    if not current_rank().distributed:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if current_rank().distributed:
        dist.barrier()


def seed_worker_for_rank(rank: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ranks share the loader's base seed (the data order must
    match), so shift each worker's augmentation seed by the rank."""
    torch.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for process groups on the CPU (gloo), where torch's
    ``SyncBatchNorm`` has no kernels. Outside multi-process training it is plain BatchNorm.

    Each rank computes its rows' count, mean and sum of squared deviations; the three are
    gathered (differentiably) and combined per channel as in a one-process batch, so gradients
    and running statistics match a one-process run with the whole batch.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not (self.training and current_rank().distributed):
            return super().forward(input)
        if input.dtype in (torch.float16, torch.bfloat16):
            input = input.float()  # statistics in float32, as BatchNorm runs under autocast
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        count = input.numel() // channels
        mean = input.mean(dims)
        m2 = ((input - mean.view(shape)) ** 2).sum(dims)
        local = torch.cat([mean.new_full((1,), float(count)), mean, m2])
        stats = gather_rows(local.unsqueeze(0))  # (W, 1 + 2C)
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - global_mean) ** 2).sum(0) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(global_mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)
        out = (input - global_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer computing statistics over the global batch: torch's
    ``SyncBatchNorm`` on GPUs, :class:`GlobalBatchNorm` on the CPU. Parameters and buffers are
    kept (the same tensors), so optimizers and saved states are unaffected."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        layer = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            layer.weight, layer.bias = module.weight, module.bias
        layer.running_mean, layer.running_var = module.running_mean, module.running_var
        layer.num_batches_tracked = module.num_batches_tracked
        layer.training = module.training
        return layer
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child, device))
    return module
