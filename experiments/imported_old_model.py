"""The recipe with an old model made outside bctool, against the same old model trained by bctool.

    python experiments/imported_old_model.py --workdir runs/paper --seeds 0 1 2 3 4

The old model of each seed is the ImageNet-start old model of the results page "Starting from
ImageNet" (``pretrained-class``: EfficientNet-Lite0, its backbone frozen, a neck trained on the
old emoji classes, 128 px). Its weights are then written as another training script would save
them: ``torch.save`` of a state dict in the EfficientNet-PyTorch layout with the projection as
``proj``/``proj_bn`` and the classifier as ``classifier`` (and the class names in a text file).
That file comes back in three ways, and the recommended recipe (``train --old-embeddings`` with
every other option at its default) trains a new model against each:

* ``native``: the bctool checkpoint itself (the warm start copies its head rows by class name);
* ``imported``: ``bctool import`` of the state dict with its projection, classifier and
  preprocessing (the same weights: the figures must be the same);
* ``imported-no-classifier``: the same without ``--classifier`` (the warm start has no head rows
  to copy; the old classes are named by ``train --old-classes``);
* ``onnx``: ``bctool export`` of the old model to ONNX, run as a black box (no warm start is
  possible: the new neck starts fresh on the ImageNet backbone, ``--pretrained imagenet``).

One JSON per seed and variant in ``--results`` (default ``docs/imported/runs``), in the layout of
``paper_table.py``'s runs (``scripts/seed_tests.py`` judges them against M(o,o)), with each
imported model's ``verify`` report against the native old model's gallery embeddings;
``table.md`` beside that folder compares every variant with ``native`` by the paired test over
seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from bctool.checkpoint import load_checkpoint, load_model
from bctool.data.sources import load_image_set
from bctool.embeddings import load_embeddings
from bctool.evaluate.seeds import paired_seed_test
from bctool.export import export_model
from bctool.models.imported import Classifier, Projection, import_pretrained
from bctool.train import TrainConfig, train
from bctool.verify import VerifyOptions, verify
from bctool.workflow import embed_splits, run_record, write_run
from paper_table import SETTINGS, _scores, base_configs, old_side, prepare_data  # this folder is on sys.path

log = logging.getLogger("imported_old_model")
SETTING = "pretrained-class"
VARIANTS = ("native", "imported", "imported-no-classifier", "onnx")


def foreign_state_dict(old: Path, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """The old checkpoint's weights as another training script saves them (its class names also
    in ``classes.txt`` beside them), and the class names."""
    checkpoint = load_checkpoint(old)
    renamed = {}
    for key, tensor in checkpoint.model.state_dict().items():
        if key.startswith("backbone."):
            renamed[key.removeprefix("backbone.")] = tensor
        elif key.startswith("neck.0."):
            renamed["proj." + key.removeprefix("neck.0.")] = tensor
        elif key.startswith("neck.1."):
            renamed["proj_bn." + key.removeprefix("neck.1.")] = tensor
        elif key.startswith("head.fc."):
            renamed["classifier." + key.removeprefix("head.fc.")] = tensor
    weights = folder / "foreign.pth"
    torch.save(renamed, weights)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in checkpoint.class_names))
    return weights, tuple(checkpoint.class_names)


def old_variants(old: dict[str, Path], folder: Path) -> dict[str, tuple[Path, dict]]:
    """Each variant's old model file and how it was made (import's record)."""
    native = load_checkpoint(old["model"])
    steps = dataclasses.asdict(native.preprocess)
    weights, names = foreign_state_dict(old["model"], folder)
    arch = native.config.arch
    made: dict[str, tuple[Path, dict]] = {"native": (old["model"], {})}
    for name, head in (("imported", Classifier("classifier", names)), ("imported-no-classifier", None)):
        out = folder / f"{name}.safetensors"
        record = import_pretrained(arch, str(weights), out, projection=Projection("proj", "proj_bn"),
                                   classifier=head, drop=() if head else ("classifier",), **steps).to_dict()
        made[name] = (out, record)
    onnx = folder / "old.onnx"
    if not onnx.exists():
        export_model(native, onnx, "onnx")
    made["onnx"] = (onnx, {"format": "onnx"})
    return made


def run_variant(workdir: Path, results: Path, data: Path, seed: int, variant: str, old: dict[str, Path],
                made: tuple[Path, dict], base: TrainConfig) -> dict:
    """Train, embed and evaluate the recipe's new model against one variant of the old model."""
    cache = results / SETTING / f"seed{seed}" / f"{variant}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    folder = workdir / "imported" / f"seed{seed}"
    model, record = made
    lists = {split: data / f"{split}.txt" for split in ("new_train", "query", "gallery")}
    old_files = embed_splits(model, lists, folder / f"old-{variant}")
    check = verify(load_embeddings(old["gallery"]), load_model(model), VerifyOptions(sample=200, threshold=0.9999))
    # The recipe as a user runs it: the old embeddings, every other option at its default (the
    # warm start from the checkpoint that made them; from ImageNet when that is a model file).
    config = base.replace(arch="efficientnet_lite0", seed=seed, old_embeddings=str(old_files["new_train"]),
                          log_dir=str(folder / f"{variant}-log"),
                          **({"pretrained": "imagenet"} if variant == "onnx" else {"pretrained": None}),
                          # Which classes the old model knew: its checkpoint says so, an ONNX file from
                          # bctool's export too; without a classifier the user names them.
                          **({"old_classes": str(folder / "classes.txt")} if variant == "imported-no-classifier" else {}))
    new = folder / f"new-{variant}.safetensors"
    summary = train(load_image_set(lists["new_train"]), config, new) if not new.exists() else None
    new_files = embed_splits(new, {s: lists[s] for s in ("query", "gallery")}, folder / f"new-{variant}")
    row = run_record(setting=SETTING, seed=seed, old_seed=seed + 1000, method=variant, dataset="emoji",
                     allocation="extended-class, ImageNet start, old model imported", old_arch="efficientnet_lite0",
                     new_arch="efficientnet_lite0", image_size=128, import_record=record,
                     check={k: check[k] for k in ("checked", "min", "mean", "passed")},
                     init_from=load_checkpoint(new).train_config.get("init_from"),
                     final=summary.final if summary else None,
                     **_scores(new_files, old_files, seed, f"{variant} seed {seed}"),
                     seconds=round(time.perf_counter() - start, 1))
    write_run(cache, row)
    return row


def report(results: Path, seeds: list[int]) -> str:
    """Each variant's figures (mean ± std over seeds) and its paired differences from ``native``."""
    runs = {v: {s: json.loads((results / SETTING / f"seed{s}" / f"{v}.json").read_text()) for s in seeds}
            for v in VARIANTS if all((results / SETTING / f"seed{s}" / f"{v}.json").exists() for s in seeds)}

    def cell(values: list[float]) -> str:
        spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{100 * statistics.mean(values):.2f}{spread}"

    lines = [f"Seeds {seeds}; mAP % mean ± std over seeds; the check: the least cosine between the variant's and "
             "the native old model's gallery embeddings (200 rows a seed).", "",
             "| old model | M(o,o) | M(n,o) | M(n,n) | check: least cosine | warm start |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, by_seed in runs.items():
        rows = [by_seed[s] for s in seeds]
        warm = "yes" if all(r.get("init_from") for r in rows) else "no"
        lines.append(f"| {variant} | {cell([r['old']['map'] for r in rows])} | {cell([r['cross']['map'] for r in rows])} "
                     f"| {cell([r['self']['map'] for r in rows])} | {min(r['check']['min'] for r in rows):.6f} | {warm} |")
    lines += ["", "| difference from native | seeds | mean | paired 95% interval | p |", "| --- | --- | --- | --- | --- |"]
    for variant, by_seed in runs.items():
        if variant == "native":
            continue
        for what, key in (("M(n,o)", "cross"), ("M(n,n)", "self")):
            deltas = [100 * (by_seed[s][key]["map"] - runs["native"][s][key]["map"]) for s in seeds]
            if max(abs(d) for d in deltas) == 0:
                lines.append(f"| {variant}: {what} | {len(seeds)} | 0 (every seed identical) | - | - |")
                continue
            if len(seeds) < 2:
                lines.append(f"| {variant}: {what} | 1 | {deltas[0]:+.2f} | - | - |")
                continue
            t = paired_seed_test(deltas).to_dict()
            lines.append(f"| {variant}: {what} | {len(seeds)} | {t['mean']:+.2f} | [{t['low']:+.2f}, {t['high']:+.2f}] "
                         f"| {t['p']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="models and embeddings")
    parser.add_argument("--results", type=Path, default=Path("docs/imported/runs"), help="one JSON per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--report-only", action="store_true", help="write the table from finished runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report_only:
        data = prepare_data(args.workdir, "emoji")
        base, old_base = base_configs(SETTINGS[SETTING])
        warm = base_configs(SETTINGS["pretrained-class-warm"])[0]
        for seed in args.seeds:
            old = old_side(args.workdir, data, SETTINGS[SETTING], seed + 1000, old_base)
            folder = args.workdir / "imported" / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            made = old_variants(old, folder)
            for variant in VARIANTS:
                # The recipe's own learning rate: the warm start's, or the fresh start's for a model file.
                config = (base if variant == "onnx" else warm).replace(lr=None)
                log.info("seed %d: %s", seed, variant)
                run_variant(args.workdir, args.results, data, seed, variant, old, made[variant], config)
    table = args.results.parent / "table.md"
    table.write_text(report(args.results, args.seeds))
    log.info("wrote %s", table)


if __name__ == "__main__":
    main()
