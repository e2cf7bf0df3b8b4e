"""Training step time: what the compatibility machinery and the old side cost per step.

    python benchmarks/train_step.py             # small @ 32 px, batch 128, 20 timed steps x 3 rounds
    python benchmarks/train_step.py --quick     # 5 timed steps x 2 rounds

Writes the embedded emoji set (``EmojiSplit(limit=400)``) into a temporary folder, trains on its
``new_train.txt`` list, and builds, with the library (``build_model``, ``build_task``,
``make_loader``), three tasks on the same data and the same seeded model:

* ``independent``: the classification task alone;
* ``advbct`` with precomputed old embeddings (``TrainConfig.from_options(old_embeddings=...)``);
* ``advbct`` with the old model run on every batch (``TrainConfig.from_options(old_model=...)``).

The old model is a seeded, untrained ``small`` checkpoint over the same classes (its weights do
not change the step's cost). Batches are drawn once through ``make_loader`` (workers=0,
each task's training views as `bctool train` resolves them) and kept in memory, so a "step" is
exactly what the loop does per batch:
lr update, forward (new model, old side, losses), zero_grad, backward, optimizer step and the
one host sync of ``float(loss)``. Data loading is not timed.

Each task is warmed up, then timed step by step; tasks are interleaved in rounds so that no
task alone pays for a noisy period, and each task's median step time over all rounds is reported.
torch's thread count is left at its default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save_result  # this folder is on sys.path when run

from bctool.checkpoint import load_checkpoint, save_checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.sources import load_image_set
from bctool.data.transforms import Preprocess
from bctool.embeddings import save_embeddings
from bctool.extract import extract
from bctool.models import create_model
from bctool.train.config import TrainConfig
from bctool.train.defaults import resolve_defaults
from bctool.train.loop import (
    build_model,
    build_task,
    lr_at,
    make_loader,
    seed_everything,
)


def _config(args: argparse.Namespace, **kw) -> TrainConfig:  # noqa: ANN003
    """The config ``bctool train`` would run with these options: every open part (the views, the
    schedule) resolved as training resolves it."""
    return resolve_defaults(TrainConfig.from_options(
        arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, embedding_dim=args.dim,
        epochs=1, workers=0, device="cpu", seed=0, lr=0.1, init_from=None, **kw,
    )).config


def _write_old_side(images, args: argparse.Namespace, folder: Path) -> tuple[str, str]:  # noqa: ANN001
    """An old checkpoint over the training classes, and its embeddings of the training list."""
    torch.manual_seed(1)
    config = _config(args)
    old = create_model(config.model_config(num_classes=len(images.label_names)))
    ckpt_path, emb_path = folder / "old.safetensors", folder / "old_emb.safetensors"
    save_checkpoint(ckpt_path, old, Preprocess(image_size=args.image_size), list(images.label_names),
                    extra={"trained_classes": list(images.label_names)})
    save_embeddings(extract(images, load_checkpoint(ckpt_path), workers=0), emb_path)
    return str(ckpt_path), str(emb_path)


def _prepare(images, config: TrainConfig, batches: int):  # noqa: ANN001, ANN202
    """Task, optimizer and a fixed in-memory list of batches for ``config``."""
    generator = seed_everything(config.optim.seed)
    preprocess = Preprocess(image_size=config.model.image_size)
    model, _ = build_model(images, config)
    task, _ = build_task(images, config, model, preprocess, torch.device("cpu"))
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.optim.lr, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay)
    data = []
    while len(data) < batches:
        for batch in make_loader(images, config, preprocess, generator, pin=False):
            data.append(batch)
            if len(data) == batches:
                break
    task.train()
    return task, optimizer, data


def _step(task, optimizer, config: TrainConfig, batch, step: int, total: int) -> float:  # noqa: ANN001
    """One training step as ``_train_epoch`` runs it."""
    images, labels, indices = batch
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total, 0, config.optim.lr)
    task.set_progress(0, config.optim.epochs, step, total)
    parts = task(images, labels, indices)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    return float(parts["loss"].detach())


def _time_steps(state, config: TrainConfig, start: int, n: int, total: int) -> list[float]:  # noqa: ANN001
    task, optimizer, data = state
    times = []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        _step(task, optimizer, config, data[i % len(data)], i, total)
        times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> dict:
    """Build the three tasks, time them interleaved, return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_emoji_dataset(folder / "emoji", EmojiSplit(limit=args.limit))
        images = load_image_set(folder / "emoji" / "new_train.txt")
        old_model, old_emb = _write_old_side(images, args, folder)
        configs = {
            "independent": _config(args, method="independent"),
            "advbct_old_embeddings": _config(args, method="advbct", old_embeddings=old_emb),
            "advbct_old_model": _config(args, method="advbct", old_model=old_model),
        }
        batches = max(1, len(images) // min(args.batch_size, len(images)))
        states = {name: _prepare(images, cfg, batches) for name, cfg in configs.items()}
        total = args.warmup + args.rounds * args.steps
        for name, cfg in configs.items():
            _time_steps(states[name], cfg, 0, args.warmup, total)
        times: dict[str, list[float]] = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, cfg in configs.items():
                times[name] += _time_steps(states[name], cfg, args.warmup + r * args.steps, args.steps, total)
    med = {name: statistics.median(t) for name, t in times.items()}
    mean = {name: statistics.fmean(t) for name, t in times.items()}
    ind, emb, mod = (med[k] for k in ("independent", "advbct_old_embeddings", "advbct_old_model"))
    return {
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "embedding_dim": args.dim,
        "train_images": len(images),
        "classes": len(images.label_names),
        "distinct_batches": batches,
        "workers": 0,
        "torch_threads": torch.get_num_threads(),
        "timed_steps_per_task": args.rounds * args.steps,
        "median_step_ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "mean_step_ms": {k: round(1000 * v, 2) for k, v in mean.items()},
        "min_step_ms": {k: round(1000 * min(t), 2) for k, t in times.items()},
        "advbct_emb_over_independent": round(emb / ind, 3),
        "compat_overhead_pct": round(100 * (emb / ind - 1), 1),
        "old_model_over_old_embeddings": round(mod / emb, 3),
        "advbct_model_over_independent": round(mod / ind, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small", help="model architecture")
    parser.add_argument("--image-size", type=int, default=32, help="input size in pixels")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--limit", type=int, default=400, help="emoji classes written (EmojiSplit.limit)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per task first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per task per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="small run: 5 steps x 2 rounds")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.warmup = 5, 2, 2
    result = run(args)
    print(json.dumps(result, indent=2))
    save_result(args.out, "train_step", result)
    m = result["median_step_ms"]
    print(
        f"step ms (median): independent {m['independent']}, advbct+old-embeddings "
        f"{m['advbct_old_embeddings']} ({result['compat_overhead_pct']:+.1f}%), advbct+old-model "
        f"{m['advbct_old_model']} ({result['old_model_over_old_embeddings']}x the old-embeddings step)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
