"""Training images/s of a ResNet with and without mixed precision, side by side.

    python benchmarks/train_amp.py                  # ResNet-50 at 224 px, batch 64, on CUDA
    python benchmarks/train_amp.py --quick          # ResNet-18 at 64 px, batch 16 (runs on a CPU)

For each precision (``off``; ``bf16``; on CUDA also ``fp16`` with a grad scaler) a model is
built by the library (``build_model``, ``ClassificationTask``, channels_last on CUDA), and
training steps run exactly as the loop runs them (``_autocast``, backward, SGD step, one host
sync per step) on a fixed random batch already on the device, so the figure is the model's
step rate, not data loading. Precisions are interleaved in rounds; the median step of each is
reported as images/s, with the ratio of each to ``off``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import save_result  # this folder is on sys.path when run

from bctool.data.sources import ImageRecord, ImageSet
from bctool.train import TrainConfig
from bctool.train.loop import _autocast
from bctool.train.setup import build_model
from bctool.train.tasks import ClassificationTask


def _fake_classes(n: int) -> ImageSet:
    """An ImageSet that only names ``n`` classes (build_model reads the class count)."""
    names = tuple(f"c{i}" for i in range(n))
    records = tuple(ImageRecord(path=Path(f"{i}.png"), id=str(i), label=i) for i in range(n))
    return ImageSet(root=Path("."), records=records, label_names=names, source="benchmark")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = ["off", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    classes = _fake_classes(args.classes)
    states = {}
    for amp in modes:
        config = TrainConfig.from_options(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, amp=amp,
                                          device=str(device), workers=0, init_from=None)  # a fresh model
        torch.manual_seed(0)
        task = ClassificationTask(build_model(classes, config)[0]).to(device)
        if device.type == "cuda":
            task.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        states[amp] = (config, task, optimizer, scaler)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    indices = torch.arange(args.batch_size, device=device)

    def step(amp: str) -> float:
        config, task, optimizer, scaler = states[amp]
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, config.optim.amp):
            parts = task(images, labels, indices)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(parts["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            parts["loss"].backward()
            optimizer.step()
        float(parts["loss"].detach())
        _sync(device)
        return time.perf_counter() - t0

    for amp in modes:
        for _ in range(args.warmup):
            step(amp)
    times: dict[str, list[float]] = {amp: [] for amp in modes}
    for _ in range(args.rounds):
        for amp in modes:
            times[amp].extend(step(amp) for _ in range(args.steps))
    rate = {amp: args.batch_size / statistics.median(t) for amp, t in times.items()}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "images_per_s": {amp: round(r, 1) for amp, r in rate.items()},
        "over_off": {amp: round(r / rate["off"], 3) for amp, r in rate.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="backbone")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the linear head")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per precision")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, batch 16, few steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.image_size, args.batch_size, args.classes = "resnet18", 64, 16, 100
        args.warmup, args.steps, args.rounds = 1, 3, 2
    result = run(args)
    print(json.dumps(result, indent=2))
    save_result(args.out, "train_amp", result)
    print(f"{result['arch']} @ {result['image_size']} px on {result['device']}: "
          + ", ".join(f"{amp} {r} img/s ({result['over_off'][amp]:.2f}x)" for amp, r in result["images_per_s"].items()),
          file=sys.stderr)


if __name__ == "__main__":
    main()
