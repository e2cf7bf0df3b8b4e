"""Extraction throughput against the bare model forward, and extraction's peak memory.

    python benchmarks/extract_throughput.py            # small @ 32 px and resnet18 @ 64 px; RSS at 1,000 and 10,000 images
    python benchmarks/extract_throughput.py --quick    # small @ 32 px only, fewer images

Writes the embedded emoji set into a temporary folder and tiles its PNGs into as many files as
needed (the same PNG bytes under distinct names, so every image is a separate file decoded from
disk), with a list file per image count. Then, for each model (a seeded, untrained checkpoint):

(a) throughput: ``bctool.extract.extract_to_file``, what ``bctool extract`` runs (DataLoader,
    PNG decoding, resize, forward, rows streamed into the output file) at its default
    ``workers=2`` and at ``workers=0``, against the bare
    ``model.embed`` over the same batches already in memory (inference mode). Each is run twice,
    alternating, and the faster run of each is reported. torch's thread count is left at its
    default (2 on this machine), so with ``workers=2`` the loader processes and the model's
    threads share the cores.
(b) peak RSS of extraction in fresh processes (multiprocessing spawn) at two image counts 10x
    apart, with ``workers=0`` so the whole pipeline lives in the measured process; the RSS
    after imports and checkpoint loading (before extracting) is reported too, and the size of
    the N x D float32 embeddings written (streamed to disk, so not held in memory). The process-wide peak (ru_maxrss) is
    set by importing torch and loading the checkpoint, so the peak during extraction is read
    from the kernel's VmHWM after resetting it (``/proc/self/clear_refs``) just before.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import in_fresh_process, peak_rss_mib, save_result


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so import-time peaks do not hide extraction's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_tiled_list(emoji_dir: Path, n: int) -> Path:
    """A list file of ``n`` distinct PNG files (the emoji PNGs copied under new names)."""
    sources = sorted((emoji_dir / "images").glob("*/*.png"))
    tiles = emoji_dir / "tiles"
    tiles.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        src = sources[i % len(sources)]
        target = tiles / f"{i}.png"
        if not target.exists():
            shutil.copyfile(src, target)
        lines.append(f"tiles/{i}.png\t{src.stem}\n")
    path = emoji_dir / f"list_{n}.txt"
    path.write_text("".join(lines))
    return path


def write_checkpoint(path: Path, arch: str, image_size: int, dim: int) -> None:
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, embedding_dim=dim, num_classes=10))
    save_checkpoint(path, model, Preprocess(image_size=image_size), [f"c{i}" for i in range(10)])


def _bare_forward_s(model, batches: list[torch.Tensor]) -> float:  # noqa: ANN001
    with torch.inference_mode():
        t0 = time.perf_counter()
        for batch in batches:
            model.embed(batch).float().cpu().numpy()
        return time.perf_counter() - t0


def throughput(list_path: Path, ckpt_path: Path, batch_size: int) -> dict:
    """Images/s of extract (workers 2 and 0) and of the bare forward, best of two each."""
    from torch.utils.data import DataLoader

    from bctool.checkpoint import load_checkpoint
    from bctool.data.dataset import ImageDataset
    from bctool.data.sources import load_image_set
    from bctool.data.transforms import EvalTransform
    from bctool.extract import ExtractOptions, extract_to_file

    images = load_image_set(list_path)
    ckpt = load_checkpoint(ckpt_path)
    out = list_path.with_suffix(".safetensors")
    loader = DataLoader(ImageDataset(images, EvalTransform(ckpt.preprocess)), batch_size=batch_size, num_workers=0)
    t0 = time.perf_counter()
    batches = [b for b, _, _ in loader]
    load_only_s = time.perf_counter() - t0
    _bare_forward_s(ckpt.model.eval(), batches[:1])  # warm-up
    runs: dict[str, list[float]] = {"extract_workers2": [], "extract_workers0": [], "forward_only": []}
    for _ in range(2):
        t0 = time.perf_counter()
        extract_to_file(images, ckpt, out, options=ExtractOptions(batch_size=batch_size, workers=2))
        runs["extract_workers2"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        extract_to_file(images, ckpt, out, options=ExtractOptions(batch_size=batch_size, workers=0))
        runs["extract_workers0"].append(time.perf_counter() - t0)
        runs["forward_only"].append(_bare_forward_s(ckpt.model, batches))
    n = len(images)
    rate = {k: n / min(v) for k, v in runs.items()}
    rate["decode_only_workers0"] = n / load_only_s
    print(f"  runs (s): { {k: [round(x, 2) for x in v] for k, v in runs.items()} }", file=sys.stderr)
    return {
        "images": n,
        "batch_size": batch_size,
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "extract_w2_over_forward": round(rate["extract_workers2"] / rate["forward_only"], 3),
        "extract_w0_over_forward": round(rate["extract_workers0"] / rate["forward_only"], 3),
    }


def _rss_child(list_path: str, ckpt_path: str, batch_size: int, out: mp.Queue) -> None:
    from bctool.checkpoint import load_checkpoint
    from bctool.data.sources import load_image_set
    from bctool.extract import ExtractOptions, extract_to_file

    images = load_image_set(Path(list_path))
    ckpt = load_checkpoint(ckpt_path)
    target = Path(list_path).with_suffix(".safetensors")
    before_current, before_peak = _current_rss_mib(), peak_rss_mib()
    reset = _reset_peak()
    t0 = time.perf_counter()
    result = extract_to_file(images, ckpt, target, options=ExtractOptions(batch_size=batch_size, workers=0))
    seconds = time.perf_counter() - t0
    during = _vm_hwm_mib() if reset else float("nan")
    emb_mib = result.rows * result.dim * 4 / 2**20
    out.put((before_current, before_peak, peak_rss_mib(), during, emb_mib, seconds))



def peak_rss(lists: dict[int, Path], ckpt_path: Path, batch_size: int) -> dict:
    rows = {}
    for n, path in lists.items():
        before, before_peak, peak, during, emb_mib, seconds = in_fresh_process(_rss_child, str(path), str(ckpt_path), batch_size)
        rows[str(n)] = {
            "rss_before_extract_mib": round(before, 1),
            "peak_rss_before_extract_mib": round(before_peak, 1),
            "process_peak_rss_mib_incl_imports": round(peak, 1),
            "peak_rss_during_extract_mib": round(during, 1),
            "growth_during_extract_mib": round(during - before, 1),
            "embeddings_written_mib": round(emb_mib, 2),
            "seconds": round(seconds, 2),
        }
    small, large = (rows[str(n)] for n in sorted(lists))
    rows["peak_difference_mib"] = round(large["peak_rss_during_extract_mib"] - small["peak_rss_during_extract_mib"], 1)
    rows["embeddings_written_difference_mib"] = round(large["embeddings_written_mib"] - small["embeddings_written_mib"], 2)
    return rows


def run(args: argparse.Namespace) -> dict:
    from bctool.data.emoji import EmojiSplit, write_emoji_dataset

    models = [("small", 32, args.throughput_images)]
    if not args.quick:
        models.append(("resnet18", 64, args.resnet_images))
    result: dict = {"torch_threads": torch.get_num_threads(), "throughput": {}, "peak_rss": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_emoji_dataset(folder / "emoji", EmojiSplit())
        for arch, size, n in models:
            ckpt = folder / f"{arch}.safetensors"
            write_checkpoint(ckpt, arch, size, args.dim)
            key = f"{arch}@{size}px"
            print(f"throughput {key} over {n} images", file=sys.stderr)
            result["throughput"][key] = throughput(write_tiled_list(folder / "emoji", n), ckpt, args.batch_size)
        small_ckpt = folder / "small.safetensors"
        lists = {n: write_tiled_list(folder / "emoji", n) for n in args.rss_images}
        print(f"peak RSS of extract (small@32px, workers=0) at {args.rss_images} images", file=sys.stderr)
        result["peak_rss"]["small@32px"] = peak_rss(lists, small_ckpt, args.batch_size)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256, help="extraction batch size (extract's default)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--throughput-images", type=int, default=4_000, help="images for small@32px throughput")
    parser.add_argument("--resnet-images", type=int, default=1_000, help="images for resnet18@64px throughput")
    parser.add_argument("--rss-images", type=int, nargs=2, default=[1_000, 10_000], help="two image counts for RSS")
    parser.add_argument("--quick", action="store_true", help="small@32px only, 1,000 images; RSS at 200 and 2,000")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    if args.quick:
        args.throughput_images, args.rss_images = 1_000, [200, 2_000]
    result = run(args)
    print(json.dumps(result, indent=2))
    save_result(args.out, "extract_throughput", result)
    parts = [f"{k}: extract {v['images_per_s']['extract_workers2']} img/s (w=2) / "
             f"{v['images_per_s']['extract_workers0']} (w=0) vs forward {v['images_per_s']['forward_only']} "
             f"({v['extract_w2_over_forward']:.0%} / {v['extract_w0_over_forward']:.0%})"
             for k, v in result["throughput"].items()]
    rss = result["peak_rss"]["small@32px"]
    print("; ".join(parts) + f"; peak RSS difference {rss['peak_difference_mib']} MiB for "
          f"{rss['embeddings_written_difference_mib']} MiB more embeddings written to disk", file=sys.stderr)


if __name__ == "__main__":
    main()
