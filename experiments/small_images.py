"""Which backbone for small images: raw pixels against `small` and ResNet-18 at 32 px.

    python experiments/small_images.py                  # seeds 0 1 2, about 10 minutes on 2 CPU cores
    python experiments/small_images.py --seeds 0 --image-size 32 48

On the embedded emoji set (extended-class lists): each backbone is trained as the old model is
(the 401 old classes, 30 epochs, batch 128) and retrieves the held-out classes (Google queries,
Twitter gallery). Raw pixels (the resized, normalised image flattened) are the floor a model
must beat. This is the evidence behind ``--arch auto`` (``small`` below 64 px).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from bctool.checkpoint import load_checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.sources import load_image_set
from bctool.data.transforms import Preprocess
from bctool.evaluate import evaluate_retrieval
from bctool.extract import extract, pixel_embeddings
from bctool.train import TrainConfig, train

log = logging.getLogger("small_images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--image-size", type=int, nargs="+", default=[32], help="image sides to compare")
    parser.add_argument("--archs", nargs="+", default=["small", "resnet18"], help="backbones to train")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--workdir", type=Path, default=Path("runs/small-images"), help="dataset and models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = args.workdir / "emoji"
    if not (data / "gallery.txt").exists():
        write_emoji_dataset(data, EmojiSplit(seed=0))
    query, gallery = load_image_set(data / "query.txt"), load_image_set(data / "gallery.txt")
    rows = []
    for size in args.image_size:
        pre = Preprocess(image_size=size)
        pixels = evaluate_retrieval(pixel_embeddings(query, pre), pixel_embeddings(gallery, pre))["map"]
        rows.append({"image_size": size, "arch": "pixels", "map": [pixels]})
        for arch in args.archs:
            maps = []
            for seed in args.seeds:
                model = args.workdir / f"{arch}-{size}px-seed{seed}.safetensors"
                if not model.exists():
                    config = TrainConfig.from_options(arch=arch, image_size=size, epochs=args.epochs, batch_size=128, seed=seed)
                    train(load_image_set(data / "old_train.txt"), config, model)
                ckpt = load_checkpoint(model)
                maps.append(evaluate_retrieval(extract(query, ckpt), extract(gallery, ckpt))["map"])
                log.info("%s at %d px, seed %d: mAP %.3f (pixels %.3f)", arch, size, seed, maps[-1], pixels)
            rows.append({"image_size": size, "arch": arch, "map": maps})
    print("| image side | backbone | mAP % (mean ± std over seeds) |\n| --- | --- | --- |")
    for row in rows:
        mean = 100 * statistics.fmean(row["map"])
        spread = f" ± {100 * statistics.stdev(row['map']):.1f}" if len(row["map"]) > 1 else ""
        print(f"| {row['image_size']} | {row['arch']} | {mean:.1f}{spread} |")
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
