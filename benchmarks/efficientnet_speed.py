"""Images per second of a frozen EfficientNet-Lite0 forward pass (eval mode, no gradients), at
64, 128 and 224 px, in torch's default memory layout and in channels_last.

    python benchmarks/efficientnet_speed.py                    # 2 threads, batch 32, 3 rounds of 3 s
    python benchmarks/efficientnet_speed.py --threads 4 --sizes 128 224 --out result.json

The backbone carries the ImageNet weights when their package is installed (random weights
otherwise: the cost is the same). Inputs are random tensors already in memory, so decoding and
resizing are not timed: this is the network's own cost, what `bctool extract` pays on top of
reading the images. Each (size, layout) pair is warmed up with two batches, then timed over
whole batches until ``--seconds`` have passed, in ``--rounds`` rounds that interleave every
pair so that none alone pays for a noisy period; the best and the median round are reported
(on a shared machine other work only ever slows a round down, so the best is the network's own
speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import save_result  # this folder is on sys.path when run

from bctool.models.efficientnet import efficientnet_lite

LAYOUTS = ("contiguous", "channels_last")


def lite0() -> tuple[torch.nn.Module, bool]:
    """Lite0 in eval mode, with the ImageNet weights when installed; and whether they were."""
    from bctool.models.pretrained import load_backbone_weights
    from bctool.models.weights import WEIGHTS, weights_file

    model = efficientnet_lite("efficientnet_lite0").eval()
    weights = WEIGHTS["efficientnet_lite0.imagenet"]
    if weights.installed():
        load_backbone_weights(model, weights_file(weights))
    return model, weights.installed()


def images_per_second(model: torch.nn.Module, size: int, batch: int, seconds: float, channels_last: bool) -> float:
    """Throughput of ``model`` on random (batch, 3, size, size) inputs."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
        elapsed = time.perf_counter() - start
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224], help="image sides in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per figure and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file, with the machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, pretrained = lite0()
    rates: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for size in args.sizes:
            for layout in LAYOUTS:
                rate = images_per_second(model, size, args.batch, args.seconds, layout == "channels_last")
                rates.setdefault((size, layout), []).append(rate)
    figures = {str(size): {layout: {"best": round(max(rates[size, layout]), 1),
                                    "median": round(statistics.median(rates[size, layout]), 1)}
                           for layout in LAYOUTS} for size in args.sizes}
    result = {"model": "efficientnet_lite0", "imagenet_weights": pretrained, "threads": args.threads,
              "batch": args.batch, "rounds": args.rounds, "images_per_second": figures}
    print(json.dumps(result, indent=2))
    save_result(args.out, "efficientnet_speed", result)
    for size, by_layout in figures.items():
        print(f"{size} px: " + ", ".join(f"{layout} {v['best']} images/s (median {v['median']})"
                                         for layout, v in by_layout.items()))


if __name__ == "__main__":
    main()
