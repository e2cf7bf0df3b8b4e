"""The AdvBCT paper's main table at small scale: three allocation settings, every method, seeds.

    python experiments/paper_table.py                       # everything (hours on 2 CPU cores)
    python experiments/paper_table.py --settings extended-class --seeds 0 1 2
    python experiments/paper_table.py --report-only          # table and plots from finished runs

Settings, on the embedded emoji set (held-out classes: Google renderings query Twitter ones):

* ``extended-class``: the old model sees 30% of the training classes, the new model all of them;
* ``extended-data``: the old model sees part of the images of every training class. An emoji
  class has two images (its Google and Twitter renderings), so the old model gets one of them,
  the Google rendering (50%; the paper's 30% is not possible with two images a class);
* ``extended-backbone``: the extended-class old model (``small``) and a ResNet-18 new model;
* ``extended-data-digits``: extended-data on scikit-learn's 8x8 digits (``pip install
  scikit-learn``; skipped without it): 60% of every class trains the new model, 30% of that the
  old one; 20 held-out images a digit query the other held-out ones. A third real set that no
  choice of the recipe looked at;
* ``extended-data-fashion``: extended-data on Fashion-MNIST (Debian's ``dataset-fashion-mnist``,
  skipped when it is not installed): 1,000 training images a class for the new model, 30% of
  them for the old one, 10 epochs; 100 test images a class query the other 9,000.

The table has the paper's layout: one section per allocation setting, self / cross mAP per
dataset, and P_up, P_comp, P_1 summarised over the setting's datasets (extended-data: emoji and
Fashion-MNIST) for every seed.

Training views follow ``--regime`` (bctool by default): new models train on the clean images their
precomputed old embeddings are of, old models on random crops; ``--augment`` and ``--old-augment``
choose others, ``--old-side model`` runs the old model on the new models' own views,
``--old-side views --stored-views K`` trains against the clean images and K seeded crop views of
each, with the old model's stored embeddings of those very views (``bctool extract --view``), and
``--regime paper`` trains every model as the AdvBCT authors do. Each run records them, with the
git revision it ran at; a cached run made with other ones is refused (use another ``--results``).
Folders in ``--workdir`` carry a tag per choice (``-none``, ``-flip``, ``-oldmodel``, ``-paper``...).

The old model of seed s is trained with seed s + ``--old-seed-offset`` (1000): with the same
seed, old and new models start from the same initial weights, and that alone makes an
independently trained new model partly compatible (46 cross mAP in extended-data, where both
see the same classes; ``--old-seed-offset 0 --results docs/paper/shared-init/runs`` shows it).

For every setting, seed and method (independent, l2, bct, lce, unibct, hotrefresh, advbct by
default; ``--methods`` adds the AdvBCT ablations) it trains the new model against the old
model's precomputed embeddings, embeds the query and gallery, and records M(n,n), M(n,o), R@1,
the update gain and the partial-backfill curve. Each finished run is a JSON file under
``--results`` (default ``docs/paper/runs``, kept with the project), so an interrupted or partial
run resumes where it stopped and the table regenerates without training; models and embeddings
go to ``--workdir`` (default ``runs/paper``) and are rebuilt when a missing run needs them; each
model's training curves go beside it (``METHOD-log/``, drawn by ``bctool plot``). Runs with other
options (``--old-seed-offset``, ``--old-epochs``, ``--epochs``) belong in another ``--results``.

Writes ``--results``/../table.md (the markdown table), ``results.json`` and PNG plots: self vs
cross mAP per method (one point per seed) and the mean partial-backfill curve of each method.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


from bctool.checkpoint import load_checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.digits import DigitsSplit, default_source, write_digits_dataset
from bctool.data.fashion_mnist import DEFAULT_SOURCE, FashionSplit, write_fashion_mnist_dataset
from bctool.data.sources import load_image_set
from bctool.data.transforms import TRAINING_VIEWS, StoredView
from bctool.embeddings import load_embeddings
from bctool.evaluate import evaluate_retrieval
from bctool.evaluate.retrieval import evaluate_retrieval_per_query
from bctool.backfill.curve import backfill_curve
from bctool.evaluate.scores import paper_scores, update_gain
from bctool.extract import ExtractOptions, extract_to_file
from bctool.train import TrainConfig, train
from bctool.train.methods import METHODS as REGISTERED
from bctool.train.recipe import WARM_LR
from bctool.train.regime import REGIMES
from bctool.workflow import embed_splits, ids_digest, rounded, run_record, write_run

log = logging.getLogger("paper_table")
METHODS = ["independent", "l2", "bct", "lce", "unibct", "hotrefresh", "advbct"]
ABLATIONS = ["advbct-noadv", "advbct-nobound", "advbct-fixed", "advbct-joint"]
VARIANTS = ["bct-all", "center"]  # named variants that fix a measured cause (README, "Why AdvBCT trails")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SEEDS = [0, 1, 2]  # the table's seeds; 100 is the pilot seed recipes are chosen on


@dataclass(frozen=True)
class Setting:
    """Which images the old model sees and which backbones old and new use."""

    allocation: str  # the paper's allocation type (a section of the table)
    dataset: str  # emoji or fashion-mnist (a column group of the table)
    old_list: str  # list file name in the dataset folder
    old_arch: str
    new_arch: str
    epochs: int | None = None  # overrides --epochs (Fashion-MNIST has more images an epoch)
    warm: bool = False  # the new model starts from the old checkpoint (--init-from), at --warm-lr
    image_size: int = 32
    # Both models start from these named weights (a warm start takes the old model's instead),
    # train only the backbone's last ``trainable`` stages, and the old model sees ``old_augment``.
    pretrained: str | None = None
    trainable: str = "all"
    old_augment: str | None = None  # None: --old-augment (the regime's by default)


SETTINGS = {
    "extended-class": Setting("extended-class", "emoji", "old_train.txt", "small", "small"),
    "extended-data": Setting("extended-data", "emoji", "old_data.txt", "small", "small"),
    "extended-backbone": Setting("extended-backbone", "emoji", "old_train.txt", "small", "resnet18"),
    "extended-data-fashion": Setting("extended-data", "fashion-mnist", "old_train.txt", "small", "small", epochs=10),
    "extended-class-warm": Setting("extended-class, warm start", "emoji", "old_train.txt", "small", "small",
                                   warm=True),
    "extended-data-fashion-warm": Setting("extended-data, warm start", "fashion-mnist", "old_train.txt", "small",
                                          "small", epochs=10, warm=True),
    # ImageNet-pretrained EfficientNet-Lite models at 128 px with frozen backbones (--trainable neck:
    # their pooled features computed once, only the neck and head train), clean views for the old
    # model too: where users start, at a cost two CPU cores can pay for five seeds.
    "pretrained-class": Setting("extended-class, ImageNet start", "emoji", "old_train.txt", "efficientnet_lite0",
                                "efficientnet_lite0", image_size=128, pretrained="imagenet", trainable="neck",
                                old_augment="none"),
    "pretrained-class-warm": Setting("extended-class, ImageNet start, warm start", "emoji", "old_train.txt",
                                     "efficientnet_lite0", "efficientnet_lite0", warm=True, image_size=128,
                                     pretrained="imagenet", trainable="neck", old_augment="none"),
    # Fashion-MNIST's 28 px images upsampled to 64 px for the ImageNet network (extended-data, 10 epochs).
    "pretrained-data-fashion": Setting("extended-data, ImageNet start", "fashion-mnist", "old_train.txt",
                                       "efficientnet_lite0", "efficientnet_lite0", epochs=10, image_size=64,
                                       pretrained="imagenet", trainable="neck", old_augment="none"),
    "pretrained-data-fashion-warm": Setting("extended-data, ImageNet start, warm start", "fashion-mnist",
                                            "old_train.txt", "efficientnet_lite0", "efficientnet_lite0", epochs=10,
                                            warm=True, image_size=64, pretrained="imagenet", trainable="neck",
                                            old_augment="none"),
    # The paper's extended-backbone setting: a bigger new backbone (Lite2) against the Lite0 old model.
    "pretrained-backbone": Setting("extended-backbone, ImageNet start", "emoji", "old_train.txt",
                                   "efficientnet_lite0", "efficientnet_lite2", image_size=128, pretrained="imagenet",
                                   trainable="neck", old_augment="none"),
    # A third real set, kept out of every choice of the recipe: its confirmation.
    "extended-data-digits": Setting("extended-data", "digits", "old_train.txt", "small", "small"),
    "extended-data-digits-warm": Setting("extended-data, warm start", "digits", "old_train.txt", "small", "small",
                                         warm=True),
}
DATASET_TITLES = {"emoji": "emoji", "fashion-mnist": "Fashion-MNIST", "digits": "digits"}
FASHION_SPLIT = FashionSplit(seed=0, train_per_class=1000, old_fraction=0.3, query_per_class=100)


def prepare_data(workdir: Path, dataset: str) -> Path | None:
    """The dataset folder with the lists of every setting; None when Fashion-MNIST is missing.

    emoji: extended-class lists, plus ``old_data.txt`` for extended-data (the Google half).
    fashion-mnist: extended-data lists (``old_train.txt`` holds 30% of every class).
    """
    data = workdir / dataset
    if (data / "gallery.txt").exists():
        return data
    if dataset == "emoji":
        write_emoji_dataset(data, EmojiSplit(seed=0))
        lines = (data / "new_train.txt").read_text().splitlines()
        (data / "old_data.txt").write_text("\n".join(line for line in lines if "/google/" in line) + "\n")
        return data
    if dataset == "digits":
        if default_source() is None:
            return None
        write_digits_dataset(data, DigitsSplit(seed=0))
        return data
    if not DEFAULT_SOURCE.is_dir():
        return None
    write_fashion_mnist_dataset(data, FASHION_SPLIT, DEFAULT_SOURCE)
    return data


def _embed(model: Path, data: Path, splits: list[str], prefix: str) -> dict[str, Path]:
    """``PREFIX_SPLIT.safetensors`` beside ``model`` for each split (cached by model and list)."""
    return embed_splits(model, {split: data / f"{split}.txt" for split in splits}, model.parent / prefix)


def stored_views(old: dict[str, Path], data: Path, count: int) -> tuple[str, ...]:
    """The old model's embeddings of ``count`` seeded crop views of the new training list (cached)."""
    files, ckpt = [], None
    for k in range(count):
        out = old["model"].parent / f"old_view{k}_new_train.safetensors"
        if not out.exists():
            ckpt = ckpt or load_checkpoint(old["model"])
            extract_to_file(load_image_set(data / "new_train.txt"), ckpt, out,
                            options=ExtractOptions(workers=2, view=StoredView("crop", k)))
        files.append(str(out))
    return tuple(files)


def base_configs(setting: Setting, *, epochs: int = 30, warm_lr: float = WARM_LR, compat_weight: float = 1.0,
                 regime: str = "bctool", augment: str | None = None, old_epochs: int | None = None,
                 old_augment: str | None = None) -> tuple[TrainConfig, TrainConfig]:
    """The new and old models' training configs of ``setting`` (the command line's defaults
    unless given): 128 images a batch, SGD at 0.1 (``warm_lr`` for a warm start), the setting's
    image size, epochs, pretrained weights and trainable part."""
    base = TrainConfig.from_options(image_size=setting.image_size, epochs=setting.epochs or epochs, batch_size=128,
                                    device="auto", workers=2, lr=warm_lr if setting.warm else 0.1,
                                    compat_weight=compat_weight, regime=regime, augment=augment,
                                    pretrained=setting.pretrained, trainable=setting.trainable)
    old_base = base.replace(epochs=old_epochs or base.optim.epochs, lr=0.1, compat_weight=1.0,
                            augment=setting.old_augment or old_augment)
    return base, old_base


def old_side(workdir: Path, data: Path, setting: Setting, seed: int, base: TrainConfig) -> dict[str, Path]:
    """The old model of ``setting`` trained with ``seed`` (shared by settings with the same data,
    old list, backbone and epochs) and its embeddings of the new training list, query and gallery."""
    folder = workdir / "old" / f"{data.name}-{Path(setting.old_list).stem}-{setting.old_arch}-e{base.optim.epochs}{_tag(base)}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "old.safetensors"
    if not model.exists():
        log.info("old model %s", folder.name)
        train(load_image_set(data / setting.old_list), base.replace(arch=setting.old_arch, seed=seed), model)
    return {**_embed(model, data, ["new_train", "query", "gallery"], "old"), "model": model}


@dataclass(frozen=True)
class Study:
    """Where one table's runs live and how its models train (from the command line)."""

    workdir: Path  # models and embeddings
    results: Path  # one JSON per finished run
    data: Path  # the dataset folder of the setting
    base: TrainConfig  # the new models' training
    old_base: TrainConfig  # the old models' training
    diagnostics: bool = False
    old_source: str = "embeddings"  # embeddings, model or viewsK

    def asked(self, old_seed: int) -> dict[str, object]:
        """The options a cached run must have been made with."""
        base, old_base = self.base, self.old_base
        return {"lr": base.optim.lr, "epochs": base.optim.epochs, "old_epochs": old_base.optim.epochs,
                "old_seed": old_seed, "compat_weight": base.compat.compat_weight,
                **_views(base, old_base, self.old_source)}


def _cached(study: Study, cache: Path, old_seed: int) -> dict | None:
    """A finished run's row, refused when it was made with other options."""
    if not cache.exists():
        return None
    row = json.loads(cache.read_text())
    differ = {key: (_recorded(row, key), value) for key, value in study.asked(old_seed).items()
              if _recorded(row, key, value) != value}
    if differ:
        raise SystemExit(f"{cache} was run with other options ({', '.join(f'{k} {a} there, {b} asked' for k, (a, b) in differ.items())}): "
                         "give these options another --results folder")
    return row


def _new_config(study: Study, name: str, seed: int, method: str, old: dict[str, Path], folder: Path) -> TrainConfig:
    """The new model's training config: the setting's backbone, the old side the method needs."""
    setting, source = SETTINGS[name], study.old_source
    side: dict[str, object] = ({"old_model": str(old["model"])} if source == "model"
                               else {"old_embeddings": str(old["new_train"])})
    if source.startswith("views"):
        side["old_views"] = stored_views(old, study.data, int(source.removeprefix("views")))
    # A method without an old side trains on the views the compatible methods see.
    views = study.base.with_regime(precomputed_old=source != "model").optim.augment
    return study.base.replace(arch=setting.new_arch, seed=seed, method=method, augment=views,
                              **(side if REGISTERED[method].needs_old_side else {}),
                              log_dir=str(folder / f"{method}-log"),
                              init_from=str(old["model"]) if setting.warm else None, diagnostics=study.diagnostics,
                              # a warm start takes the old model's weights, pretrained ones included
                              **({"pretrained": None} if setting.warm else {}))


def run_folder(study: Study, name: str, seed: int, old_seed: int) -> Path:
    """The work folder of a setting's new models for one seed, tagged by every choice that changes
    them (warm-start runs at several rates, and runs at other compatibility weights, share a workdir)."""
    base, old_base, source = study.base, study.old_base, study.old_source
    tag = (f"-lr{base.optim.lr:g}" if SETTINGS[name].warm else "") + (
        f"-cw{base.compat.compat_weight:g}" if base.compat.compat_weight != 1 else "")
    tag += _tag(base, precomputed_old=source != "model") + _tag(old_base, "old-")
    tag += {"embeddings": "", "model": "-oldmodel"}.get(source, f"-old{source}")
    folder = study.workdir / name / f"seed{seed}-old{old_seed}-e{old_base.optim.epochs}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_method(study: Study, name: str, seed: int, method: str, old_seed: int) -> dict:
    """Train, embed and evaluate one new model; the result is cached as JSON in ``study.results``."""
    cache = study.results / name / f"seed{seed}" / f"{method}.json"
    row = _cached(study, cache, old_seed)
    if row is not None:
        return row
    setting = SETTINGS[name]
    old = old_side(study.workdir, study.data, setting, old_seed, study.old_base)
    folder = run_folder(study, name, seed, old_seed)
    model = folder / f"{method}.safetensors"
    log.info("%s seed %d: %s", name, seed, method)
    start = time.perf_counter()
    shutil.rmtree(folder / f"{method}-log", ignore_errors=True)  # an interrupted run's log: this run's starts anew
    config = _new_config(study, name, seed, method, old, folder)
    summary = train(load_image_set(study.data / "new_train.txt"), config, model)
    new = _embed(model, study.data, ["query", "gallery"], method)
    row = {
        "setting": name, "seed": seed, "old_seed": old_seed, "method": method,
        "dataset": setting.dataset, "allocation": setting.allocation,
        "old_arch": setting.old_arch, "new_arch": setting.new_arch,
        "epochs": study.base.optim.epochs, "old_epochs": study.old_base.optim.epochs, "lr": config.optim.lr,
        "warm": setting.warm, "compat_weight": config.compat.compat_weight, "image_size": setting.image_size,
        "pretrained": setting.pretrained, "trainable": setting.trainable,
        **_views(study.base, study.old_base, study.old_source),
        **_scores(new, old, seed, f"{name} seed {seed}"),
        "final": summary.final,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if study.diagnostics:  # every epoch's loss parts and side measurements, and the loss's final state
        row["history"] = summary.history
        compat_state = folder / f"{method}-log" / "compat.json"  # AdvBCT: r_max and r̃ of every old class
        if compat_state.exists():
            row["compat"] = json.loads(compat_state.read_text())
    row = run_record(**row)  # the command, revision and torch thread count
    write_run(cache, row)
    return row


def _scores(new: dict[str, Path], old: dict[str, Path], seed: int, what: str) -> dict:
    """M(o,o), M(n,n), M(n,o) with the per-query APs of old/old and new/old (in query-id order:
    the paired differences a test over seeds and queries needs, :mod:`bctool.evaluate.seeds`; the
    ids' digest pairs runs) and the partial-backfill curve."""
    query, gallery = load_embeddings(new["query"]), load_embeddings(new["gallery"])
    old_query, old_gallery = load_embeddings(old["query"]), load_embeddings(old["gallery"])
    old_metrics, old_ap = evaluate_retrieval_per_query(old_query, old_gallery)
    cross_metrics, cross_ap = evaluate_retrieval_per_query(query, old_gallery)
    if old_ap.ids != cross_ap.ids:
        raise SystemExit(f"{what}: the old and new queries evaluate other query ids")
    return {
        "old": old_metrics,
        "self": evaluate_retrieval(query, gallery),
        "cross": cross_metrics,
        "per_query": {"ids_sha256": ids_digest(old_ap.ids), "old": rounded(old_ap.ap), "cross": rounded(cross_ap.ap)},
        "backfill": [{"fraction": p["fraction"], "map": p["map"]}
                     for p in backfill_curve(query, old_gallery, gallery, FRACTIONS, seed=seed)],
    }


def _views(base: TrainConfig, old_base: TrainConfig, old_source: str) -> dict[str, str]:
    """The regime, where the new models' old embeddings come from, and the training views of the
    new models and of the old model, as the regime resolves them."""
    new = base.with_regime(precomputed_old=old_source != "model")
    return {"regime": base.optim.regime, "old_source": old_source, "augment": new.optim.augment,
            "old_augment": old_base.with_regime().optim.augment}


def _recorded(row: dict, key: str, default: object = None) -> object:
    """A run's recorded option; runs from before the regime options recorded none of them (the
    bctool regime, crops for every model) or augmentation as a bool."""
    if key == "regime":
        return row.get(key, "bctool")
    if key == "old_source":
        return row.get(key, "embeddings")
    if key in ("augment", "old_augment"):
        value = row.get(key, row.get("augment", True))
        return {True: "crop", False: "none"}.get(value, value)
    return row.get(key, default)


def _tag(config: TrainConfig, prefix: str = "", precomputed_old: bool = False) -> str:
    """A folder-name tag of a config's regime and views (those of a run against precomputed old
    embeddings when ``precomputed_old``); empty for the original table's (the bctool regime with
    crops)."""
    resolved = config.with_regime(precomputed_old=precomputed_old)
    tag = "" if resolved.optim.regime == "bctool" else f"-{resolved.optim.regime}"
    return tag + ("" if resolved.optim.augment == "crop" else f"-{prefix}{resolved.optim.augment}")



def collect(results: Path, seeds: list[int] | None = None) -> dict[str, dict[str, dict[int, dict]]]:
    """Finished runs (of ``seeds`` only, when given): setting -> method -> seed -> row, settings
    in the order of SETTINGS."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(results.glob("*/seed*/*.json")):
        row = json.loads(path.read_text())
        if seeds is not None and row["seed"] not in seeds:
            continue
        out.setdefault(row["setting"], {}).setdefault(row["method"], {})[row["seed"]] = row
    return {name: out[name] for name in [*SETTINGS, *sorted(out)] if name in out}


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method of one setting: per-seed figures and the paper's scores (needs independent)."""
    star = {seed: row["self"]["map"] for seed, row in runs.get("independent", {}).items()}
    out = {}
    for method, seeds in runs.items():
        per_seed = []
        for seed, row in sorted(seeds.items()):
            m = {"m_oo": row["old"]["map"], "m_nn": row["self"]["map"], "m_no": row["cross"]["map"],
                 "r1_no": row["cross"]["recall@1"], "m_star": star.get(seed)}
            if m["m_star"] is not None:
                m["gain"] = update_gain(m["m_no"], m["m_oo"], m["m_star"])
                m.update(paper_scores([m]))
            per_seed.append(m)
        out[method] = {"seeds": sorted(seeds), "per_seed": per_seed}
    return out


def _seed_scores(parts: list[dict[str, dict]], method: str) -> list[dict[str, float]]:
    """The paper's P scores of ``method`` per seed, each over the datasets that have that seed
    and an independent model for it."""
    by_seed: dict[int, list[dict]] = {}
    for summary in parts:
        if method in summary:
            for seed, m in zip(summary[method]["seeds"], summary[method]["per_seed"]):
                if m.get("m_star") is not None:
                    by_seed.setdefault(seed, []).append(m)
    return [paper_scores(ms) for _, ms in sorted(by_seed.items())]


def table(allocation: str, parts: dict[str, dict[str, dict]], methods: list[str]) -> str:
    """The paper's layout for one allocation setting: per dataset self / cross mAP, R@1 and update
    gain; P_up, P_comp and P_1 over the datasets, per seed, then mean ± std over seeds."""
    header, rule, caption = ["method"], ["---"], []
    for name, summary in parts.items():
        setting = SETTINGS.get(name)
        title = DATASET_TITLES.get(setting.dataset, setting.dataset) if setting else name
        old_maps = {seed: m["m_oo"] for s in summary.values() for seed, m in zip(s["seeds"], s["per_seed"])}
        arch = f", {setting.old_arch} -> {setting.new_arch}" if setting else ""
        caption.append(f"{title}: M(o,o) = {_fmt(list(old_maps.values()))}, seeds {sorted(old_maps)}{arch}")
        header += [f"{title} self / cross", f"{title} R@1 (n,o) / gain"]
        rule += ["---", "---"]
    header += ["M(n,o) > M(o,o)", "P_up", "P_comp", "P_1"]
    rule += ["---"] * 4
    lines = [f"**{allocation}** ({'; '.join(caption)}); mAP % mean ± std over seeds",
             "", "| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for method in methods:
        if not any(method in summary for summary in parts.values()):
            continue
        cells, wins, total = [method], 0, 0
        for summary in parts.values():
            rows = summary.get(method, {}).get("per_seed", [])

            def col(key: str, scale: float = 100.0, digits: int = 1, rows: list = rows) -> str:
                return _fmt([r[key] for r in rows if r.get(key) is not None], scale, digits)
            cells += [f"{col('m_nn')} / {col('m_no')}", f"{col('r1_no')} / {col('gain', 1.0, 2)}"]
            wins += sum(r["m_no"] > r["m_oo"] for r in rows)
            total += len(rows)
        scores = _seed_scores(list(parts.values()), method)
        cells.append(f"{wins}/{total}")
        # P_comp and P_1 are undefined (None) for a seed whose independent model is no better than the old one
        cells += [_fmt([s[key] for s in scores if s[key] is not None], 1.0) for key in ("p_up", "p_comp", "p_1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shown_methods(finished: dict[str, dict[str, dict[int, dict]]]) -> list[str]:
    """The methods with at least one finished run, in table order."""
    return [m for m in [*METHODS, *VARIANTS, *ABLATIONS] if any(m in runs for runs in finished.values())]


def report(finished: dict[str, dict[str, dict[int, dict]]]) -> tuple[list[str], dict]:
    """Markdown sections (one per allocation setting) and the per-run summaries of ``collect``."""
    methods = shown_methods(finished)
    summaries = {name: summarise(runs) for name, runs in finished.items()}
    allocations: dict[str, dict[str, dict]] = {}
    for name, summary in summaries.items():
        allocation = SETTINGS[name].allocation if name in SETTINGS else name
        allocations.setdefault(allocation, {})[name] = summary
    return [table(a, parts, methods) for a, parts in allocations.items()], summaries


def plots(out_dir: Path, all_runs: dict[str, dict[str, dict[int, dict]]], methods: list[str],
          suffix: str = "") -> list[str]:
    """Self vs cross mAP per method (a point per seed) and mean backfill curves, per setting."""
    from bctool.utils.plotting import pyplot, save_figure

    plt = pyplot("the paper-table plots")
    written = []
    for name, runs in all_runs.items():
        shown = [m for m in methods if m in runs]
        fig, (scatter, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
        colours = plt.get_cmap("tab20" if len(shown) > 10 else "tab10")
        oo = [row["old"]["map"] for row in next(iter(runs.values())).values()]
        for i, method in enumerate(shown):
            rows = list(runs[method].values())
            marker, line = ("x", ":") if method in ABLATIONS else ("o", "-")  # ablations stand apart
            scatter.scatter([100 * r["self"]["map"] for r in rows], [100 * r["cross"]["map"] for r in rows],
                            color=colours(i), label=method, s=22, marker=marker)
            mean_curve = [100 * statistics.fmean(r["backfill"][k]["map"] for r in rows)
                          for k in range(len(rows[0]["backfill"]))]
            curves.plot([100 * p["fraction"] for p in rows[0]["backfill"]], mean_curve, marker=marker,
                        linestyle=line, color=colours(i), label=method)
        for ax in (scatter, curves):
            ax.axhline(100 * statistics.fmean(oo), color="grey", linestyle="--", linewidth=1, label="M(o,o)")
            ax.grid(True, alpha=0.3)
        scatter.set_xlabel("self mAP M(n,n) %")
        scatter.set_ylabel("cross mAP M(n,o) %")
        scatter.set_title(f"{name}: one point per seed")
        curves.set_xlabel("gallery re-embedded with the new model (%)")
        curves.set_ylabel("mAP % (new queries)")
        curves.set_title(f"{name}: partial backfill (mean over seeds)")
        scatter.legend(fontsize="x-small", loc="best")
        curves.legend(fontsize="x-small", loc="best")
        path = out_dir / f"{name}{suffix}.png"
        save_figure(fig, path)
        written.append(str(path))
    return written


def _parser() -> argparse.ArgumentParser:
    """The command line: what to run and where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings to run")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(REGISTERED), help="methods to compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS,
                        help="training seeds (also the seeds the table reports)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every model (Fashion-MNIST: 10)")
    parser.add_argument("--warm-lr", type=float, default=WARM_LR,
                        help="peak learning rate of the new models of the warm-start settings (default: the recipe's)")
    parser.add_argument("--compat-weight", type=float, default=1.0, help="multiplier of the compatibility terms")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="bctool",
                        help="training regime of every model (paper: the AdvBCT authors')")
    parser.add_argument("--augment", choices=list(TRAINING_VIEWS), default=None,
                        help="training views of the new models (default: the regime's; bctool: none against the "
                             "precomputed old embeddings, which are of clean images)")
    parser.add_argument("--old-augment", choices=list(TRAINING_VIEWS), default=None,
                        help="training views of the old models (default: the regime's; bctool: crop)")
    parser.add_argument("--old-side", choices=["embeddings", "model", "views"], default="embeddings",
                        help="the new models train against the old model's precomputed embeddings of the clean "
                             "images, run the old model on their own training views (--old-model), or train on the "
                             "clean images and --stored-views seeded crops of each against the old model's stored "
                             "embeddings of them (--old-views)")
    parser.add_argument("--stored-views", type=int, default=4, help="with --old-side views: crop views per image")
    parser.add_argument("--old-epochs", type=int, default=None, help="epochs of the old model (default: as the new)")
    parser.add_argument("--old-seed-offset", type=int, default=1000,
                        help="the old model of seed s trains with seed s + this (0: old and new share initial weights)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="models and embeddings")
    parser.add_argument("--results", type=Path, default=Path("docs/paper/runs"), help="one JSON per finished run")
    parser.add_argument("--diagnostics", action="store_true",
                        help="log gradient norms and the methods' side measurements; keep them in each run's JSON")
    parser.add_argument("--report-only", action="store_true", help="no training: table and plots from --results")
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report_only:
        for name in args.settings:  # setting by setting, so a partial run completes whole settings
            setting = SETTINGS[name]
            data = prepare_data(args.workdir, setting.dataset)
            if data is None:
                how = ("pip install scikit-learn" if setting.dataset == "digits"
                       else f"apt install dataset-fashion-mnist, into {DEFAULT_SOURCE}")
                log.warning("skipping %s: no %s data (%s)", name, setting.dataset, how)
                continue
            base, old_base = base_configs(setting, epochs=args.epochs, warm_lr=args.warm_lr,
                                          compat_weight=args.compat_weight, regime=args.regime, augment=args.augment,
                                          old_epochs=args.old_epochs, old_augment=args.old_augment)
            study = Study(args.workdir, args.results, data, base, old_base, args.diagnostics,
                          f"views{args.stored_views}" if args.old_side == "views" else args.old_side)
            for seed in args.seeds:
                for method in args.methods:
                    run_method(study, name, seed, method, seed + args.old_seed_offset)
    finished = collect(args.results, args.seeds)
    sections, summaries = report(finished)
    if not sections:
        parser.error(f"no finished runs of seeds {args.seeds} in {args.results}; run without --report-only first")
    out_dir = args.results.parent
    # A pilot seed's table (any --seeds but the default) goes beside the main one.
    suffix = "" if args.seeds == DEFAULT_SEEDS else "-seeds-" + "-".join(map(str, args.seeds))
    (out_dir / f"table{suffix}.md").write_text("\n\n".join(sections) + "\n")
    (out_dir / f"results{suffix}.json").write_text(json.dumps(summaries, indent=1))
    try:
        written = plots(out_dir, finished, shown_methods(finished), suffix)
    except Exception as exc:  # noqa: BLE001 - the table stands without the plots
        written = []
        log.warning("no plots: %s", exc)
    print("\n\n".join(sections))
    log.info("wrote %s, %s and %s", out_dir / f"table{suffix}.md", out_dir / f"results{suffix}.json", ", ".join(written))


if __name__ == "__main__":
    main()
