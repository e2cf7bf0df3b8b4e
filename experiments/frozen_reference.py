"""The frozen ImageNet networks as they are, the reference rows of the ImageNet-start table.

    python experiments/frozen_reference.py --workdir runs/paper

Each EfficientNet-Lite is imported with its named ImageNet weights (``bctool import``: pooled
features, an identity neck) at the table's 128 px, once with the centre crop its weights were
evaluated with and once with the whole image (as the table's trained models see it), and its
mAP measured on the emoji query and gallery (Google renderings query Twitter ones). One JSON per
network and crop in ``--results`` (default ``docs/paper/pretrained/frozen``) with its command and
revision; ``frozen.md`` beside that folder is the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bctool.embeddings import load_embeddings
from bctool.evaluate import evaluate_retrieval
from bctool.models.imported import import_pretrained
from bctool.workflow import embed_splits, run_record, write_run
from paper_table import prepare_data  # this folder is on sys.path when the script runs

log = logging.getLogger("frozen_reference")
ARCHS = ("efficientnet_lite0", "efficientnet_lite2")
CROPS = {"weights": None, "whole": 1.0}  # the weights' own evaluation crop, or the whole image


def run(workdir: Path, results: Path, arch: str, crop: str, image_size: int) -> dict:
    """One frozen network's figures (cached as JSON in ``results``)."""
    cache = results / f"{arch}-{crop}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    data = prepare_data(workdir, "emoji")
    model = workdir / "frozen" / f"{arch}-{image_size}-{crop}.safetensors"
    model.parent.mkdir(parents=True, exist_ok=True)
    imported = import_pretrained(arch, "imagenet", model, image_size=image_size, crop_fraction=CROPS[crop])
    files = embed_splits(model, {s: data / f"{s}.txt" for s in ("query", "gallery")}, model.with_suffix(""))
    metrics = evaluate_retrieval(load_embeddings(files["query"]), load_embeddings(files["gallery"]))
    row = run_record(arch=arch, crop=crop, image_size=image_size, preprocess=imported.preprocess,
                     pretrained=imported.pretrained, self=metrics)
    write_run(cache, row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="paper_table.py's --workdir")
    parser.add_argument("--results", type=Path, default=Path("docs/paper/pretrained/frozen"))
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = [run(args.workdir, args.results, arch, crop, args.image_size) for arch in ARCHS for crop in CROPS]
    lines = ["| frozen network (ImageNet weights, no training on emoji) | px | crop | mAP | R@1 |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        crop = f"{r['preprocess']['crop_fraction']:g} of the shorter side"
        lines.append(f"| {r['arch']} | {r['image_size']} | {crop} | {100 * r['self']['map']:.1f} | "
                     f"{100 * r['self']['recall@1']:.1f} |")
    text = "\n".join(lines) + "\n"
    (args.results.parent / "frozen.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
