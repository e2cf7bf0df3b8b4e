"""Compare every compatibility method on the embedded emoji set, over several seeds.

Extended-class setting: the old model trains on 30% of the training classes, every new model
on all of them, each with the same architecture and budget. For each seed and method this
trains the new model against the old model's precomputed embeddings, embeds the held-out
query (Google) and gallery (Twitter) images, and measures M(n,n) and M(n,o) next to M(o,o).
Finished runs are cached in WORKDIR, so an interrupted run resumes where it stopped.

    python experiments/compat_table.py --workdir runs/compat --seeds 0 1 2

Prints a markdown table (mean and standard deviation over seeds) on stdout and writes
WORKDIR/results.json with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.sources import load_image_set
from bctool.embeddings import load_embeddings
from bctool.evaluate import evaluate_retrieval
from bctool.train import TrainConfig, train
from bctool.train.methods import METHODS as REGISTERED
from bctool.workflow import embed_splits, run_record, train_once, write_run

log = logging.getLogger("compat_table")
METHODS = ["independent", "l2", "bct", "lce", "unibct", "hotrefresh", "advbct",
           "advbct-noadv", "advbct-nobound", "advbct-fixed"]


def embed(model: Path, lists: dict[str, Path], splits: list[str], prefix: Path) -> None:
    """Extract each split with ``model`` to ``PREFIX_SPLIT.safetensors`` (cached by model and list)."""
    embed_splits(model, {split: lists[split] for split in splits}, prefix)


def run_seed(workdir: Path, seed: int, methods: list[str], base: TrainConfig, limit: int | None,
             old_epochs: int) -> dict:
    """Old model plus every method's new model for one seed; cached per run."""
    data = workdir / "emoji"
    if not (data / "gallery.txt").exists():
        write_emoji_dataset(data, EmojiSplit(seed=0, limit=limit))
    lists = {name: data / f"{name}.txt" for name in ("old_train", "new_train", "query", "gallery")}
    sdir = workdir / f"seed{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    old = sdir / "old.safetensors"
    if train_once(lists["old_train"], base.replace(seed=seed, epochs=old_epochs), old) is not None:
        log.info("seed %d: trained the old model", seed)
    embed(old, lists, ["new_train", "query", "gallery"], sdir / "old")
    results = {"old/old": _eval(sdir / "old_query.safetensors", sdir / "old_gallery.safetensors")}
    for method in methods:
        cache = sdir / f"{method}.json"
        if cache.exists():
            results[method] = json.loads(cache.read_text())
            continue
        log.info("seed %d: training %s", seed, method)
        model = sdir / f"{method}.safetensors"
        side = {"old_embeddings": str(sdir / "old_new_train.safetensors")}
        # A method without an old side trains on the views the compatible methods see.
        config = base.replace(seed=seed, method=method, augment=base.with_regime(precomputed_old=True).optim.augment,
                              **(side if REGISTERED[method].needs_old_side else {}))
        start = time.perf_counter()
        summary = train(load_image_set(lists["new_train"]), config, model)
        embed(model, lists, ["query", "gallery"], sdir / method)
        row = {
            "self": _eval(sdir / f"{method}_query.safetensors", sdir / f"{method}_gallery.safetensors"),
            "cross": _eval(sdir / f"{method}_query.safetensors", sdir / "old_gallery.safetensors"),
            "final": summary.final,
            "seconds": round(time.perf_counter() - start, 1),
        }
        row = run_record(**row)
        write_run(cache, row)
        results[method] = row
    return results


def _eval(query: Path, gallery: Path) -> dict:
    return evaluate_retrieval(load_embeddings(query), load_embeddings(gallery))


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def table(per_seed: dict[int, dict], methods: list[str]) -> str:
    """Markdown: per method M(n,n), M(n,o), R@1 cross, compatible seeds, update gain."""
    seeds = sorted(per_seed)
    oo = [per_seed[s]["old/old"]["map"] for s in seeds]
    star = {s: per_seed[s]["independent"]["self"]["map"] for s in seeds if "independent" in per_seed[s]}
    lines = [
        f"M(o,o) = {_fmt(oo)} (old model alone, mAP %, mean ± std over seeds {seeds})",
        "",
        "| method | M(n,n) | M(n,o) | R@1 (n,o) | M(n,o) > M(o,o) | update gain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in methods:
        nn_ = [per_seed[s][m]["self"]["map"] for s in seeds]
        no = [per_seed[s][m]["cross"]["map"] for s in seeds]
        r1 = [per_seed[s][m]["cross"]["recall@1"] for s in seeds]
        wins = sum(n > o for n, o in zip(no, oo))
        gains = [(n - o) / (star[s] - o) for s, n, o in zip(seeds, no, oo) if s in star and star[s] != o]
        gain = f"{statistics.fmean(gains):.2f}" if gains else "-"
        lines.append(f"| {m} | {_fmt(nn_)} | {_fmt(no)} | {_fmt(r1)} | {wins}/{len(seeds)} | {gain} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/compat"), help="cache folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(REGISTERED),
                        help="methods to compare")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every model")
    parser.add_argument("--old-epochs", type=int, default=None,
                        help="epochs of the old model (default: --epochs, the same budget)")
    parser.add_argument("--arch", default="small", help="backbone of every model")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N emoji classes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = TrainConfig.from_options(arch=args.arch, image_size=args.image_size, epochs=args.epochs,
                       batch_size=128, device="auto", workers=2, lr=0.1, init_from=None)  # fresh starts, as measured
    old_epochs = args.old_epochs or args.epochs
    per_seed = {s: run_seed(args.workdir, s, args.methods, base, args.limit, old_epochs) for s in args.seeds}
    (args.workdir / "results.json").write_text(json.dumps(per_seed, indent=1))
    print(table(per_seed, args.methods))


if __name__ == "__main__":
    main()
