"""The main job on the embedded emoji dataset: a whole model upgrade, end to end.

dataset -> train old (30% of training classes) -> extract the old embeddings of the new training
list -> train the new model with the recommended recipe (warm-started from the old model,
:data:`~bctool.train.recipe.RECOMMENDED_METHOD`), AdvBCT in the authors' regime (``--regime paper``,
a fresh start: bctool has no ImageNet weights to start from) next to it, and an independent new
model for reference -> extract query/gallery with every model ->
evaluate M(o,o), M(n,n), M(n,o), M(*,*) and the bootstrap interval of M(n,o) - M(o,o).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bctool.checkpoint import load_checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.sources import load_image_set
from bctool.utils.device import resolve_device
from bctool.embeddings import Embeddings, load_embeddings
from bctool.evaluate.changes import ChangeOptions, change_report
from bctool.evaluate.reports import CompatibilityOptions, compatibility_report
from bctool.evaluate.scores import DEFAULT_BOOTSTRAP
from bctool.evaluate.protocols import make_protocol
from bctool.utils.progress import NULL_PROGRESS, Progress
from bctool.workflow import embed_splits, run_record, write_run
from bctool.train import TrainConfig, train
from bctool.train.recipe import COLD_LR, RECOMMENDED_METHOD, WARM_LR
from bctool.train.state import state_path

logger = logging.getLogger(__name__)

# The keys of bctool.evaluate.scores.paired_delta: delta M(n,o) - M(o,o) and its interval.
_DELTA_KEYS = ("delta", "delta_low", "delta_high", "bootstrap", "compatible_significant")


@dataclass(frozen=True)
class DemoConfig:
    """Budget of the demo; the defaults finish in a few minutes on two CPU cores."""

    arch: str = "small"
    image_size: int = 32
    embedding_dim: int = 256
    epochs: int = 30
    batch_size: int = 128
    method: str = RECOMMENDED_METHOD  # the new model's compatibility method
    warm_start: bool = True  # the new model starts from the old checkpoint, at WARM_LR
    published: str | None = "advbct"  # also trained in the paper's regime (fresh start) for comparison
    bootstrap: int = DEFAULT_BOOTSTRAP  # resamples of the interval of M(n,o) - M(o,o)
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    limit: int | None = None  # classes kept from the emoji set (tests use a few dozen)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The training config of one of the demo's models (a fresh start unless overridden)."""
        base = TrainConfig.from_options(
            arch=self.arch, embedding_dim=self.embedding_dim, epochs=self.epochs,
            batch_size=self.batch_size, lr=COLD_LR, image_size=self.image_size, seed=self.seed,
            device=self.device, workers=self.workers, init_from=None,  # a fresh start unless runs() says warm
        )
        return base.replace(**overrides)

    def runs(self, lists: dict[str, Path], old_model: Path, old_emb: Path) -> dict[str, tuple[Path, TrainConfig]]:
        """Every model the demo trains: name -> (training list, config), in training order."""
        warm = {"init_from": str(old_model), "lr": WARM_LR} if self.warm_start else {}
        runs = {
            "old": (lists["old_train"], self.train_config()),
            "new": (lists["new_train"], self.train_config(method=self.method, old_embeddings=str(old_emb), **warm)),
        }
        if self.published and (self.published != self.method or self.warm_start):
            runs[self.published] = (lists["new_train"], self.train_config(method=self.published, regime="paper",
                                                                          old_embeddings=str(old_emb)))
        runs["independent"] = (lists["new_train"], self.train_config())
        return runs


def pairs(models: list[str]) -> dict[str, tuple[str, str]]:
    """(query model, gallery model) of every reported pair: each model against itself and,
    for the new ones, against the old gallery. "ind" is the independent model, the paper's φ_*."""
    short = {"independent": "ind"}
    out = {"old/old": ("old", "old")}
    for name in models:
        if name != "old":
            label = short.get(name, name)
            out[f"{label}/{label}"] = (name, name)
            out[f"{label}/old"] = (name, "old")
    return out


def _embed(model_path: Path, lists: dict[str, Path], splits: tuple[str, ...], name: str, workdir: Path,
           config: DemoConfig, progress: Progress) -> dict[str, Embeddings]:
    """``NAME_SPLIT.safetensors`` of each split (:func:`bctool.workflow.embed_splits`: a file made by
    this very checkpoint from this very list is kept), loaded."""
    checkpoint = load_checkpoint(model_path, device=resolve_device(config.device))
    files = embed_splits(checkpoint, {split: lists[split] for split in splits}, workdir / name,
                         workers=config.workers, progress=progress)
    return {split: load_embeddings(path) for split, path in files.items()}


def _evaluate(embeddings: dict[str, dict[str, Embeddings]], models: list[str],
              config: DemoConfig) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The compatibility report of the old, new and independent models (its delta interval and
    update gain included) and the metrics of every pair of :func:`pairs`, in that order."""
    protocol = make_protocol()
    split = {name: (emb["query"], emb["gallery"]) for name, emb in embeddings.items()}
    report = compatibility_report(split["old"], split["new"], protocol, independent=split["independent"],
                                  options=CompatibilityOptions(bootstrap=config.bootstrap, seed=config.seed))
    done = report["results"]  # old/old, new/new, new/old and ind/ind
    results = {pair: done[pair] if pair in done else protocol.evaluate(split[q][0], split[g][1])
               for pair, (q, g) in pairs(models).items()}
    return report, results


def _changes(embeddings: dict[str, dict[str, Embeddings]], config: DemoConfig) -> dict[str, Any]:
    """The label-free change report of the recommended new model against the old one (top-10)."""
    old, new = embeddings["old"], embeddings["new"]
    return change_report((old["query"], old["gallery"]), (new["query"], new["gallery"]),
                         ChangeOptions(bootstrap=config.bootstrap, seed=config.seed))


def update_gain_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The update gain of a compatibility report with an independent model, as the demo's summary
    shows it: ``update_gain`` (None unless M(*,*) > M(o,o)) and, when it is None, ``undefined``
    with the reason (:func:`bctool.evaluate.scores.compatibility_verdict`)."""
    reason = report.get("undefined", {}).get("update_gain")
    return {"update_gain": report["update_gain"], **({"undefined": {"update_gain": reason}} if reason else {})}


def run_demo(workdir: str | Path, config: DemoConfig = DemoConfig(),
             progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Run the whole upgrade in ``workdir``; return the summary with the mAP table, also written
    to ``workdir/summary.json`` with the command and revision that made it."""
    start = time.perf_counter()
    workdir = Path(workdir)
    dataset = write_emoji_dataset(workdir / "emoji", EmojiSplit(seed=config.seed, limit=config.limit))
    lists = {k.removesuffix(".txt"): Path(v) for k, v in dataset["lists"].items()}
    runs = config.runs(lists, workdir / "old_model.safetensors", workdir / "old_new_train.safetensors")
    trained: dict[str, Any] = {}
    embeddings: dict[str, dict[str, Embeddings]] = {}
    for name, (list_file, train_config) in runs.items():
        model_path = workdir / f"{name}_model.safetensors"
        logger.info("training the %s model (%s) on %s", name, train_config.compat.method, list_file)
        stale = state_path(model_path)
        if stale.exists():  # the demo owns its work folder: an interrupted demo's model is trained again
            logger.warning("removing %s, left by an interrupted demo: the %s model is trained again", stale, name)
            stale.unlink()
        trained[name] = train(load_image_set(list_file), train_config, model_path, progress).to_dict()
        # The old model also embeds the new training list: the new models train against it.
        splits = ("query", "gallery", "new_train") if name == "old" else ("query", "gallery")
        embeddings[name] = _embed(model_path, lists, splits, name, workdir, config, progress)
    report, results = _evaluate(embeddings, list(runs), config)
    m = {pair: r["map"] for pair, r in results.items()}
    published = {}
    if config.published in runs:
        name = config.published
        published = {"method": name, "regime": "paper", "M(n,n)": m[f"{name}/{name}"], "M(n,o)": m[f"{name}/old"],
                     "compatible": m[f"{name}/old"] > m["old/old"]}
    summary = {
        "workdir": str(workdir),
        "method": config.method,
        "warm_start": config.warm_start,
        "dataset": {k: v for k, v in dataset.items() if k != "lists"},
        "models": trained,
        "results": results,
        "M(o,o)": m["old/old"],
        "M(n,n)": m["new/new"],
        "M(n,o)": m["new/old"],
        "M(*,*)": m["ind/ind"],
        "compatible": report["compatible"],
        **{key: report[key] for key in _DELTA_KEYS if key in report},
        # The same upgrade judged without labels: how much changes for each query (bctool.evaluate.changes).
        "changes": _changes(embeddings, config),
        **update_gain_figures(report),
        "published": published,
        "seconds": round(time.perf_counter() - start, 1),
    }
    # The figures the demo prints, kept with the command and revision that made them.
    write_run(workdir / "summary.json", run_record(**summary))
    return summary


def with_overrides(config: DemoConfig, **overrides: Any) -> DemoConfig:
    """A copy of ``config`` with the non-None overrides applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
