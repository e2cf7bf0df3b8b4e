"""The consistency floor of the paper table's old models: their own training views against the
old embeddings the new models train against.

    python experiments/consistency_floor.py --workdir runs/paper     # the old models paper_table trained

For every old model under ``WORKDIR/old/`` (one per dataset, old list and seed, trained by
``experiments/paper_table.py``) and every training view (none, flip, crop), ``bctool train
--diagnostics`` measures the floor (README, "--diagnostics"): the old model in the new model's
place, over one pass of the new training list's views, against its own precomputed embeddings of
the clean images. One epoch of a throw-away compatible model is trained to get there. Writes
``--out`` (JSON: one row per old model and view) and prints the mean over the old models of each
dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from bctool.data.sources import load_image_set
from bctool.train import TrainConfig, train
from bctool.data.transforms import TRAINING_VIEWS

log = logging.getLogger("consistency_floor")
FIGURES = ("disc_acc", "outside_r_max", "outside_r_max_stored", "cosine")


def floor(old_folder: Path, data: Path, augment: str, seed: int) -> dict:
    """The floor of one old model (``old_folder``: old.safetensors and old_new_train.safetensors)."""
    config = TrainConfig.from_options(arch="small", image_size=32, epochs=1, batch_size=128, workers=2, device="auto",
                                      method="advbct", old_embeddings=str(old_folder / "old_new_train.safetensors"),
                                      init_from=None, augment=augment, diagnostics=True, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(load_image_set(data / "new_train.txt"), config, Path(tmp) / "throwaway.safetensors")
    return result.consistency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="paper_table's --workdir")
    parser.add_argument("--views", nargs="+", default=list(TRAINING_VIEWS), choices=list(TRAINING_VIEWS))
    parser.add_argument("--old", nargs="*", default=None,
                        help="old-model folder names under WORKDIR/old (default: every one trained with crops)")
    parser.add_argument("--old-seeds", type=int, nargs="+", default=[1000, 1001, 1002],
                        help="seeds of the old models to measure (paper_table's seeds 0-2 plus its offset)")
    parser.add_argument("--out", type=Path, default=Path("docs/paper/consistency/results.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folders = sorted(p for p in (args.workdir / "old").iterdir() if (p / "old_new_train.safetensors").exists())
    if args.old:
        folders = [p for p in folders if p.name in args.old]
    else:  # paper_table tags old models trained on other views (-noaug, -old-none...): the default's are untagged
        folders = [p for p in folders if "-e" in p.name and p.name.split("-seed")[0].split("-e")[-1].isdigit()]
    folders = [p for p in folders if int(p.name.rsplit("-seed", 1)[1]) in args.old_seeds]
    rows = []
    for folder in folders:
        dataset = "emoji" if folder.name.startswith("emoji") else "fashion-mnist"
        seed = int(folder.name.rsplit("-seed", 1)[1])
        for augment in args.views:
            log.info("%s: %s views", folder.name, augment)
            rows.append({"old": folder.name, "dataset": dataset, "old_seed": seed, "augment": augment,
                         **floor(folder, args.workdir / dataset, augment, seed)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    for dataset in sorted({r["dataset"] for r in rows}):
        for augment in args.views:
            mine = [r for r in rows if r["dataset"] == dataset and r["augment"] == augment]
            means = {k: statistics.fmean(r[k] for r in mine) for k in FIGURES}
            print(f"{dataset:14s} {augment:5s} old models {len(mine)}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
