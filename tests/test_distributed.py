"""Multi-process training: the sampler's global batches, and torchrun with 2 gloo processes on
the CPU against a one-process run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from bctool.checkpoint import file_sha256, load_checkpoint
from bctool.data import load_image_set
from bctool.embeddings import save_embeddings
from bctool.errors import ConfigError
from bctool.extract import extract
from bctool.train import TrainConfig, train
from bctool.train.distributed import Rank, ShardedShuffle, per_rank_batch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _batches(rank: Rank | None, n: int, batch: int, seed: int, epochs: int) -> list[list[int]]:
    """Batches of row indices over ``epochs``: from ShardedShuffle for ``rank``, or (None) from
    a DataLoader with torch's own shuffling."""
    generator = torch.Generator().manual_seed(seed)
    rows = list(range(n))
    if rank is None:
        loader = DataLoader(rows, batch_size=batch, shuffle=True, drop_last=True, generator=generator)
    else:
        loader = DataLoader(rows, batch_size=batch, sampler=ShardedShuffle(n, generator, rank), drop_last=True,
                            generator=generator)
    return [b.tolist() for _ in range(epochs) for b in loader]


def test_one_process_draws_the_same_batches_as_torch_random_sampler() -> None:
    # Earlier releases shuffled with DataLoader(shuffle=True): one-process runs keep their order.
    ours = _batches(Rank(), 103, 16, seed=7, epochs=3)
    assert ours == _batches(None, 103, 16, seed=7, epochs=3)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_every_global_batch_of_a_one_process_run(world: int) -> None:
    n, global_batch, epochs = 101, 12, 2
    single = _batches(Rank(), n, global_batch, seed=3, epochs=epochs)
    per_rank = [
        _batches(Rank(r, world), n, global_batch // world, seed=3,
                 epochs=epochs)
        for r in range(world)
    ]
    assert all(len(batches) == len(single) for batches in per_rank)
    for i, batch in enumerate(single):
        parts = [rows[i] for rows in per_rank]
        assert sorted(sum(parts, [])) == sorted(batch)  # the same images, none twice


def test_global_batch_must_split_over_the_processes() -> None:
    assert per_rank_batch(128, Rank(1, 4)) == 32
    with pytest.raises(ConfigError, match="--batch-size 30 does not split over 4 processes; use a multiple of 4"):
        per_rank_batch(30, Rank(0, 4))
    with pytest.raises(ConfigError, match="leaves 1 image per process"):
        per_rank_batch(4, Rank(0, 4))


@pytest.fixture(scope="module")
def old_embeddings(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dist_old")
    config = TrainConfig.from_options(arch="small", image_size=32, epochs=2, batch_size=16, workers=0, device="cpu")
    train(load_image_set(emoji_dir / "old_train.txt"), config, work / "old.safetensors")
    checkpoint = load_checkpoint(work / "old.safetensors")
    emb = extract(load_image_set(emoji_dir / "new_train.txt"), checkpoint, batch_size=64, workers=0)
    save_embeddings(emb, work / "old_emb.safetensors")
    return work / "old_emb.safetensors"


def _train_cli(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    # One thread per process on both sides: thread count changes float summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "bctool", "train", *args],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_trajectory(
    emoji_dir: Path, old_embeddings: Path, tmp_path: Path
) -> None:
    """2 gloo processes x 8 images with --sync-bn take the same steps as 1 process x 16 images:
    the same data per step (ShardedShuffle), global BatchNorm statistics (backbone, embedding
    and discriminator), gradients averaged by DDP, AdvBCT's boundary mean over the global batch.

    (hotrefresh's temperature of 0.01 amplifies float noise: its runs drift apart even between
    one and two threads in one process, so its gathering is checked step by step below.)"""
    args = [str(emoji_dir / "new_train.txt"), "--old-embeddings", str(old_embeddings),
            "--init-from", "none", "--method", "advbct", "--arch", "small", "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--lr", "0.01",
            "--augment", "none", "--workers", "0", "--device", "cpu", "--sync-bn", "-q"]
    one = _train_cli([], [*args, "--out", str(tmp_path / "one.safetensors")])
    two = _train_cli(TORCHRUN, [*args, "--out", str(tmp_path / "two.safetensors")])
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    single, multi = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints JSON
    assert (single["processes"], multi["processes"]) == (1, 2)
    assert multi["steps"] == single["steps"] and len(multi["history"]) == 2
    assert set(multi["history"][0]) == {"cls", "adv", "bound", "loss"}
    for epoch_single, epoch_multi in zip(single["history"], multi["history"]):
        for part, value in epoch_single.items():
            assert epoch_multi[part] == pytest.approx(value, rel=1e-3, abs=1e-5), (part, epoch_single, epoch_multi)
    # The two checkpoints hold the same model: weights and BatchNorm running statistics.
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    assert not (tmp_path / "two.state.safetensors").exists()


@pytest.mark.slow
def test_two_processes_without_sync_bn_train_and_write_once(
    emoji_dir: Path, old_embeddings: Path, tmp_path: Path
) -> None:
    """Without --sync-bn each rank normalises its own half batch: close to, not equal to, one
    process. Every rank warm-starts from the same old checkpoint."""
    old_model = old_embeddings.with_name("old.safetensors")
    args = [str(emoji_dir / "new_train.txt"), "--arch", "small", "--image-size", "32", "--epochs", "3",
            "--batch-size", "16", "--workers", "1", "--device", "cpu", "--init-from", str(old_model), "-q"]
    two = _train_cli(TORCHRUN, [*args, "--out", str(tmp_path / "two.safetensors")])
    assert two.returncode == 0, two.stderr
    summary = json.loads(two.stdout)
    assert summary["processes"] == 2 and summary["epochs"] == 3
    assert len(summary["history"]) == 3
    assert all(math.isfinite(epoch["loss"]) for epoch in summary["history"])
    checkpoint = load_checkpoint(tmp_path / "two.safetensors")
    assert checkpoint.extra["processes"] == 2
    assert checkpoint.train_config["init_from"]["sha256"] == file_sha256(old_model)



def _collectives_worker(rank: int, world: int, init_file: str) -> None:
    """On each rank: its share of one batch through the distributed pieces, checked against the
    whole batch computed before joining the group (every rank builds the same batch)."""
    import torch.distributed as dist
    from torch import nn

    from bctool.models import ModelConfig, create_model
    from bctool.train.compat import compute_old_stats
    from bctool.train.distributed import GlobalBatchNorm, sync_batchnorm
    from bctool.train.methods import MethodContext, create_method
    from bctool.train.methods.parts import masked_mean as _masked_mean

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    per_rank, n = 6, 6 * world
    own = slice(rank * per_rank, (rank + 1) * per_rank)
    close = {"rtol": 1e-9, "atol": 1e-10}
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    out_weight = torch.randn(x.shape, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % 4
    new = torch.randn(n, 8, generator=g, dtype=torch.float64)
    old = torch.randn(n, 8, generator=g, dtype=torch.float64)
    values, mask = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g) < 0.4
    stats = compute_old_stats(torch.randn(40, 8, generator=g), torch.arange(40) % 4, 4, torch.ones(4, dtype=torch.bool))
    hotrefresh = create_method("hotrefresh", MethodContext(
        stats=stats, model=create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=4))),
        {"negatives": 3, "temperature": 0.1})

    # References: the whole batch in one process.
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():  # from g: the processes' global RNGs differ
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-0.5, 0.5, generator=g)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * out_weight).sum().backward()
    new_ref = new.clone().requires_grad_(True)
    loss_ref = hotrefresh(new_ref, labels, old, labels)["hotrefresh"]
    loss_ref.backward()
    masked_ref = _masked_mean(values, mask)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # GlobalBatchNorm == BatchNorm over the whole batch: outputs, input gradients, weight
        # gradients (summed over ranks) and running statistics.
        layer = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3).double()), torch.device("cpu"))[0]
        assert isinstance(layer, GlobalBatchNorm)
        layer.load_state_dict(start)
        x_own = x[own].clone().requires_grad_(True)
        y = layer(x_own)
        (y * out_weight[own]).sum().backward()
        torch.testing.assert_close(y, y_ref[own], **close)
        torch.testing.assert_close(x_own.grad, x_ref.grad[own], **close)
        for name in ("weight", "bias"):
            grad = getattr(layer, name).grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, getattr(ref, name).grad, **close)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, name), getattr(ref, name), **close)

        # hotrefresh with negatives from every rank: each rank's loss is the mean over its own
        # rows, so (as DDP averages) the ranks' mean loss and gradient / world are the whole's.
        new_own = new[own].clone().requires_grad_(True)
        loss = hotrefresh(new_own, labels[own], old[own], labels[own])["hotrefresh"]
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / world, loss_ref.detach(), **close)
        torch.testing.assert_close(new_own.grad / world, new_ref.grad[own], **close)

        # The boundary's masked mean: the ranks' mean is the global masked mean.
        masked = _masked_mean(values[own], mask[own])
        dist.all_reduce(masked)
        torch.testing.assert_close(masked / world, masked_ref, **close)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_hotrefresh_and_masked_means_equal_the_whole_batch(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_collectives_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
