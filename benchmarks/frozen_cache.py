"""What the frozen-output cache buys: an epoch of training a pretrained EfficientNet-Lite0 with
its backbone partly or wholly frozen, with the frozen stages' outputs computed once and without,
side by side in one run; and images/s of full fine-tuning and of extraction at 64, 128 and 224 px.

    python benchmarks/frozen_cache.py                         # 2 threads, 256 emoji images
    python benchmarks/frozen_cache.py --images 512 --out docs/benchmarks/frozen-cache.json

The images are the first ``--images`` of the embedded emoji set's training list (clean views,
the default against precomputed old embeddings). For each ``--trainable`` (neck, the last two
stages) one run trains two epochs with the cache and one without: the cached run's second epoch
is what every epoch after the first costs (its first also fills the cache), the uncached run's
second epoch is what every epoch costs without it. Full fine-tuning (``--trainable all``) is
timed over its second epoch too. Extraction is ``bctool.extract.extract`` of the same images by
a frozen Lite0 (decoding and resizing included).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import emoji_subset, save_result  # this folder is on sys.path when run

from bctool.data.sources import ImageSet
from bctool.train import TrainConfig, train


def _epoch_seconds(images: ImageSet, out: Path, size: int, trainable: str, cache: bool, log: Path) -> float:
    """Seconds of the second epoch of a 2-epoch run."""
    config = TrainConfig.from_options(arch="efficientnet_lite0", pretrained="imagenet", image_size=size, epochs=2,
                                      batch_size=32, workers=2, device="cpu", lr=0.03, augment="none",
                                      init_from=None, trainable=trainable, frozen_cache=cache, log_dir=str(log))
    train(images, config, out)
    epochs = [json.loads(line) for line in (log / "epochs.jsonl").read_text().splitlines()]
    return float(epochs[-1]["seconds"])


def _extract_rate(images: ImageSet, folder: Path, size: int) -> float:
    from bctool.checkpoint import load_checkpoint
    from bctool.extract import extract
    from bctool.models.imported import import_pretrained

    model = folder / f"lite0-{size}.safetensors"
    import_pretrained("efficientnet_lite0", "imagenet", model, image_size=size, crop_fraction=1.0)
    checkpoint = load_checkpoint(model)
    start = time.perf_counter()
    extract(images, checkpoint, workers=2)
    return len(images) / (time.perf_counter() - start)


def table(result: dict) -> str:
    """The figures as markdown (what the benchmarks page includes)."""
    lines = [f"Frozen-output cache, EfficientNet-Lite0 at {result['cache_size']} px, {result['images']} emoji images, "
             f"{result['threads']} threads: seconds an epoch", "",
             "| --trainable | with the cache | without | speed-up |", "| --- | --- | --- | --- |"]
    for trainable, s in result["epoch_seconds"].items():
        lines.append(f"| {trainable} | {s['cached']:.2f} | {s['uncached']:.2f} | {s['speedup']:.1f}x |")
    lines += ["", "| image side | full fine-tuning, images/s | extraction, images/s |", "| --- | --- | --- |"]
    for size, r in result["images_per_second"].items():
        lines.append(f"| {size} | {r['train_all']:.1f} | {r['extract']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--cache-size", type=int, default=128, help="image side of the cache comparison")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the figures here (JSON), and their table beside it (.md)")
    parser.add_argument("--table-from", type=Path, default=None, help="no measuring: the table of a stored --out file")
    args = parser.parse_args()
    if args.table_from:
        args.table_from.with_suffix(".md").write_text(table(json.loads(args.table_from.read_text())["result"]))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["BCTOOL_CACHE"] = str(folder / "cache")  # a cold cache: the fill is timed in the first epoch
        images = emoji_subset(folder, args.images)
        cache = {}
        for trainable in ("neck", "2"):
            seconds = {mode: _epoch_seconds(images, folder / f"{trainable}-{mode}.safetensors", args.cache_size,
                                            trainable, mode == "cached", folder / f"log-{trainable}-{mode}")
                       for mode in ("cached", "uncached")}
            cache[trainable] = {**seconds, "speedup": seconds["uncached"] / seconds["cached"]}
            print(f"--trainable {trainable} at {args.cache_size} px: an epoch of {len(images)} images takes "
                  f"{seconds['cached']:.2f} s with the cache, {seconds['uncached']:.2f} s without "
                  f"({cache[trainable]['speedup']:.1f}x)", flush=True)
        rates = {}
        for size in args.sizes:
            seconds = _epoch_seconds(images, folder / f"all-{size}.safetensors", size, "all", False, folder / f"log-all-{size}")
            rates[size] = {"train_all": len(images) / seconds, "extract": _extract_rate(images, folder, size)}
            print(f"{size} px: full fine-tuning {rates[size]['train_all']:.1f} images/s, extraction "
                  f"{rates[size]['extract']:.1f} images/s", flush=True)
    result = {"images": len(images), "threads": args.threads, "cache_size": args.cache_size, "epoch_seconds": cache,
              "images_per_second": rates}
    if args.out:
        save_result(args.out, "frozen_cache", result)
        args.out.with_suffix(".md").write_text(table(result))


if __name__ == "__main__":
    main()
