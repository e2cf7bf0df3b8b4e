"""Typer app: one thin command per library entry point.

stdout carries exactly one JSON document per command; people read stderr.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bctool import __version__
from bctool.cli.errors import reports_errors
from bctool.cli.output import RichProgress, emit_json, metrics_table, setup_logging, stderr
from bctool.files import FilePlan
from bctool.io import output_lock

if TYPE_CHECKING:
    from bctool.evaluate.protocols import Protocol, Table

app = typer.Typer(
    name="bctool",
    help=(
        "Upgrade the embedding model of an image-retrieval system without re-embedding the "
        "gallery: extract embeddings, train (compatible) models, evaluate self- and "
        "cross-model retrieval. JSON results go to stdout, progress and tables to stderr."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: option text is shown as written ("M[i][j]" is not Rich markup) and
    # flags carry no type placeholder.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dataset_app = typer.Typer(help="Write built-in datasets to disk.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
backfill_app = typer.Typer(help="Plan the re-embedding of a gallery with the new model.", no_args_is_help=True)
app.add_typer(backfill_app, name="backfill")


def _at_least(low: float):  # noqa: ANN202 - a click callback
    """A callback refusing, as a usage error naming the value, a number below ``low`` (and NaN
    or inf for a float option)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{value!r} must be a finite number, {low} or more")
        if value < low:
            raise typer.BadParameter(f"{value!r} is below {low}; pass {low} or more")
        return value

    return check


MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; torch's, Python's and the split's take them too


def _seed_range(value: int | None) -> int | None:
    """A seed in [0, 2**32 - 1], checked before any work (numpy refuses others, after minutes)."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise typer.BadParameter(f"{value} is outside [0, {MAX_SEED}]; pass a seed in that range")
    return value


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens to stderr: files read and written, steps taken.")]
TrainVerbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens to stderr: files read and written, and each epoch's loss parts.")]
Device = Annotated[
    str, typer.Option(help="Where to run: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
]
Workers = Annotated[int, typer.Option(callback=_at_least(0), help="DataLoader worker processes decoding images.")]


def _one_of(module: str, name: str):  # noqa: ANN202 - a click callback
    """A callback refusing, as a usage error (exit 2), a value outside the choices the library
    defines as ``module.name`` (imported when the option is parsed, not for ``--help``)."""

    def check(value: str | None) -> str | None:
        import importlib

        choices = getattr(importlib.import_module(module), name)
        allowed = list(choices)
        # A name a plugin failed to load passes here, to fail where it is used with the plugin's error.
        if value is not None and value not in allowed and value not in getattr(choices, "failures", {}):
            raise typer.BadParameter(f"{value!r} is unknown; choose one of {allowed}")
        return value

    return check


def _arch_choice(value: str | None) -> str | None:
    """A registered backbone, auto, or package.module:factory (checked when it is built)."""
    from bctool.models.model import BACKBONES, is_import_spec

    if (value is not None and value != "auto" and value not in BACKBONES and not is_import_spec(value)
            and value not in BACKBONES.failures):
        raise typer.BadParameter(
            f"{value!r} is unknown; choose one of {['auto', *sorted(BACKBONES)]}, or name your own as package.module:factory"
        )
    return value


def _method_choice(value: str | None) -> str | None:
    """A registered compatibility method."""
    if value is None:
        return value
    from bctool.train.methods import METHODS

    if value not in METHODS and value not in METHODS.failures:  # a failed plugin's own error comes later
        raise typer.BadParameter(f"{value!r} is unknown; choose one of {sorted(METHODS)} (`bctool methods` describes them)")
    return value


def _output_file(text: str) -> Path:
    """An output file's path; a name ending in a path separator names a folder, refused as a
    usage error (a Path would drop the separator and write a file of the folder's name)."""
    if text.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{text!r} ends with a path separator, so it names a folder; pass the name of a file")
    return Path(text)


def _positive_finite(value: float | None) -> float | None:
    """A positive, finite number (NaN and inf are refused)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value!r} must be a positive, finite number")
    return value


def _shard_choice(value: str | None) -> str | None:
    """I/N with 0 <= I < N."""
    if value is None:
        return value
    from bctool.errors import ConfigError
    from bctool.extract import Shard

    try:
        Shard.parse(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--shard ")) from None
    return value


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bctool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """bctool: backward-compatible training for image retrieval."""


@app.command()
@reports_errors
def train(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Training images: a list file (`PATH LABEL` lines) or a folder with one subfolder per class.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write the checkpoint (.safetensors).")],
    arch: Annotated[str, typer.Option(callback=_arch_choice, help="Backbone: small, resnet18, resnet34, resnet50, your own as package.module:factory (a torch module giving pooled (N, F) features, with F as num_features; extract imports it again from the checkpoint's record), or auto: small below 64 px --image-size (where a ResNet's ImageNet stem leaves a 1x1 map: at 32 px on the emoji set small scores 61.3 mAP, resnet18 54.5, raw pixels 44.9), resnet18 from 64 px.")] = "auto",
    embedding_dim: Annotated[int, typer.Option(callback=_at_least(1), help="Embedding dimension D.")] = 256,
    head: Annotated[str, typer.Option(callback=_one_of("bctool.models.heads", "HEADS"), help="Classification head: linear, cosine, arcface or cosface.")] = "linear",
    head_scale: Annotated[float, typer.Option(help="Scale s of the cosine/arcface/cosface heads.")] = 30.0,
    head_margin: Annotated[float, typer.Option(help="Margin m of the arcface/cosface heads.")] = 0.3,
    epochs: Annotated[int, typer.Option(callback=_at_least(1), help="Passes over the training images.")] = 30,
    batch_size: Annotated[int, typer.Option(callback=_at_least(2), help="Images per step.")] = 128,
    lr: Annotated[Optional[float], typer.Option(callback=_positive_finite, help="Peak SGD learning rate (see --schedule); default 0.1, or 0.03 for a warm start (--init-from).", show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay.")] = 5e-4,
    regime: Annotated[str, typer.Option(callback=_one_of("bctool.train.regime", "REGIMES"), help="Defaults of --augment, --schedule, --warmup-epochs and --head-bias. bctool: views matching the old side (none with --old-embeddings, else crop), cosine, 1, with bias. paper: the AdvBCT authors' training: none, step, 0, without bias (with the default SGD 0.1, momentum 0.9, weight decay 5e-4 and 30 epochs).")] = "bctool",
    augment: Annotated[Optional[str], typer.Option(callback=_one_of("bctool.data.transforms", "TRAINING_VIEWS"), help="Training views: none (the clean image, as extraction sees it), flip (mirrored left-right half the time) or crop (random resized crops and colour jitter). Default: the regime's (bctool: none with --old-embeddings, which are made from clean images, crop otherwise; paper: none). With --old-embeddings anything but none trains against old embeddings of other views than the new model sees (a warning says so); --old-model runs the old model on the same views.", show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(callback=_one_of("bctool.train.regime", "SCHEDULES"), help="Learning-rate schedule after the warm-up: cosine (decay to zero) or step (x0.1 at epochs 5, 10 and 20 of 30, scaled to --epochs). Default: the regime's.", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(callback=_at_least(0.0), help="Epochs of linear learning-rate warm-up. Default: the regime's (bctool 1, paper 0).", show_default=False)] = None,
    head_bias: Annotated[Optional[bool], typer.Option("--head-bias/--no-head-bias", help="Give the linear head a bias. Default: the regime's (bctool yes, paper no).", show_default=False)] = None,
    image_size: Annotated[int, typer.Option(callback=_at_least(8), help="Training and extraction image side in pixels.")] = 224,
    pretrained: Annotated[Optional[Path], typer.Option(help="Backbone weights (.safetensors) with timm or torchvision ResNet key names.")] = None,
    init_from: Annotated[str, typer.Option(help="Warm start: initialise from this old bctool checkpoint (same --arch and --embedding-dim; backbone and neck copied, head rows of the classes it knows copied by name). auto: with an old side, from the old checkpoint when it is known (--old-model, or the one that made --old-embeddings, unchanged) and fits; none: a fresh start.")] = "auto",
    device: Device = "auto",
    workers: Workers = 2,
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Random seed (weights, data order, augmentation).")] = 0,
    old_embeddings: Annotated[Optional[Path], typer.Option(help="Old-model embeddings of the SAME training images (from `bctool extract`), matched by id: trains a compatible model.")] = None,
    old_model: Annotated[Optional[Path], typer.Option(help="Old checkpoint run on every training batch, on the very views the new model sees, instead of --old-embeddings.")] = None,
    old_views: Annotated[Optional[list[Path]], typer.Option("--old-views", help="With --old-embeddings: old embeddings of a stored augmented view of every training image (`bctool extract --view crop --view-index K`), repeatable, one file per view. Each sample is then the clean image or one of these views, drawn uniformly, and is trained against the old embedding of that very view.", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(callback=_method_choice, help="Compatibility method (`bctool methods` lists every registered one with its parameters and names the recommended one, the default with an old side, warm-started: see --init-from); advbct is the AdvBCT paper's (its authors' training: --regime paper); independent is the default without an old side.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="A parameter of the method as NAME=VALUE, repeatable (e.g. --param threshold=0.5 for advbct); `bctool methods` lists them with their defaults.")] = None,
    old_classes: Annotated[Optional[Path], typer.Option(help="Text file of the class names the old model was trained on, one per line (default: from the old checkpoint's metadata, else every label of the old file).")] = None,
    boundary_threshold: Annotated[Optional[float], typer.Option(help="AdvBCT's elastic-boundary threshold T (default 1.0); the same as --param threshold=T.", show_default=False)] = None,
    compat_weight: Annotated[float, typer.Option(callback=_at_least(0.0), help="Multiplier of the compatibility loss parts (1.0: each method's terms at their published weights).")] = 1.0,
    amp: Annotated[str, typer.Option(callback=_one_of("bctool.train.config", "AMP_MODES"), help="Mixed precision: off, bf16 or fp16 (fp16 uses a grad scaler on CUDA).")] = "off",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from OUT.state.safetensors (saved after every epoch).")] = False,
    log_dir: Annotated[Optional[Path], typer.Option(help="Write per-step loss parts (steps.jsonl) and per-epoch means (epochs.jsonl) here; draw them with `bctool plot DIR`.")] = None,
    diagnostics: Annotated[bool, typer.Option(help="With --log-dir: also log, per step, the gradient norm of every loss part at the embedding (grad_PART) and the method's own measurements (AdvBCT: discriminator accuracy disc_acc, share of old-class samples outside their boundary, mean elastic radius), and write the final boundary radii to LOG_DIR/compat.json.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of checking every image first and leaving the unreadable ones out (listed in OUT.failed.tsv).")] = False,
    save_every: Annotated[int, typer.Option(callback=_at_least(0), help="Also save the training state every N steps (0: after every epoch only; SIGINT/SIGTERM always save).")] = 0,
    sync_bn: Annotated[bool, typer.Option(help="Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm), so N processes train as one.")] = False,
    quiet: Quiet = False,
    verbose: TrainVerbose = False,
) -> None:
    """Train a model on labelled images, alone or compatible with an old model; print a JSON summary.

    With --old-embeddings (or --old-model) the new model is trained so that its embeddings can
    be searched against the old model's gallery (the recommended recipe by default: see --method and --init-from). Under
    `torchrun --nproc-per-node N -m bctool train ...` it trains with DistributedDataParallel;
    --batch-size is then the global batch and only rank 0 writes files and output.
    """
    from bctool.data import load_image_set
    from bctool.train import TrainConfig
    from bctool.train import train as run_train
    from bctool.train.config import OPTION_GROUP
    from bctool.train.distributed import launched_rank, process_group
    from bctool.train.recipe import default_method

    # Every parameter of this command named like a training option is one (the CLI's names).
    options = {name: value for name, value in locals().items() if name in OPTION_GROUP}
    options["old_views"] = tuple(old_views or ())
    _train_files(data, out, old_embeddings, old_views, old_model, init_from, pretrained, old_classes, log_dir).check()
    main_rank = launched_rank().is_main
    setup_logging(verbose and main_rank)
    if not main_rank:  # other ranks report only errors
        logging.getLogger().setLevel(logging.ERROR)
    config = TrainConfig.from_options(**{
        **options,
        "init_from": None if init_from == "none" else init_from,
        "method": method or default_method(bool(old_embeddings or old_model)),
        "method_params": _method_params(param, boundary_threshold),
    })
    config.model_config(num_classes=1)  # fail on a bad arch/head before reading any image
    images = load_image_set(data, require_labels=True)
    with process_group(config.run.device):
        result = run_train(images, config, out, RichProgress(not quiet and main_rank))
    if main_rank:  # unreadable images left out were logged as a warning, with the report's name
        emit_json(result.to_dict())


def _train_files(data: Path, out: Path, old_embeddings: Path | None, old_views: list[Path] | None,
                 old_model: Path | None, init_from: str, pretrained: Path | None, old_classes: Path | None,
                 log_dir: Path | None) -> FilePlan:
    """What `train` reads (the old checkpoint behind --old-embeddings too: --init-from auto
    starts from it) and writes (the checkpoint, its state, lock and skipped-image report, the log)."""
    from bctool.data.check import report_path
    from bctool.train.log import LOG_FILES
    from bctool.train.state import state_path

    plan = (FilePlan("train").read_data("DATA", data).read_embeddings("--old-embeddings", old_embeddings)
            .read_embeddings("--old-views", old_views).read("--old-model", old_model)
            .read("--init-from", None if init_from in ("auto", "none") else init_from)
            .read("--pretrained", pretrained).read("--old-classes", old_classes))
    if old_embeddings is not None and old_model is None and init_from == "auto":
        plan.read("the old checkpoint that made --old-embeddings", _maker_of(old_embeddings))
    plan.write("--out", out, locked=True).write("--out's training state", state_path(out))
    plan.write("--out's report of skipped images", report_path(out))
    for name in LOG_FILES if log_dir is not None else ():
        plan.write(f"--log-dir's {name}", log_dir / name)
    return plan


def _maker_of(embeddings: Path) -> str | None:
    """The checkpoint an embeddings file records as its maker, changed since or not (None when
    unknown or unreadable: the command itself then says what is wrong with the file)."""
    from bctool.embeddings import load_embeddings
    from bctool.errors import BctoolError

    try:
        return load_embeddings(embeddings, mmap=True).model.get("path") or None
    except (BctoolError, OSError):
        return None


def _name_values(option: str, pairs: list[str] | None, example: str) -> dict[str, str]:
    """Repeated ``NAME=VALUE`` options as a dict; a pair without ``=`` is a usage error."""
    values: dict[str, str] = {}
    for text in pairs or []:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"{option} {text!r}: expected {example}")
        values[name.strip()] = value.strip()
    return values


def _method_params(pairs: list[str] | None, threshold: float | None) -> dict[str, str | float]:
    """``--param NAME=VALUE`` options (and ``--boundary-threshold``) as a dict; the method's
    ``Params`` converts and checks the values."""
    params: dict[str, str | float] = {**_name_values("--param", pairs, "NAME=VALUE, e.g. threshold=0.5")}
    if threshold is not None:
        params["threshold"] = threshold
    return params


@app.command()
@reports_errors
def methods(quiet: Quiet = False) -> None:
    """List the compatibility methods: name, what it does, its parameters and defaults, and the
    recommended one (JSON)."""
    from bctool.train.methods import describe_methods
    from bctool.train.recipe import RECOMMENDED_METHOD

    from bctool.train.methods import METHODS

    failed = {"plugin_errors": dict(METHODS.failures)} if METHODS.failures else {}
    emit_json({"methods": describe_methods(), "recommended": RECOMMENDED_METHOD, **failed})


@app.command("list")
@reports_errors
def list_registered(
    kind: Annotated[Optional[str], typer.Argument(metavar="[KIND]", callback=_one_of("bctool.registry", "KIND_MODULES"), help="One kind to list (methods, protocols, backbones, heads, regimes, schedules, views, index-kinds, export-formats, datasets, adapters, backfill-policies); default: every kind.", show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """List what can be chosen by name, built in or added by installed plugins: each entry's name,
    description, parameters, declarations and origin, and any plugin that failed to load (JSON)."""
    from bctool.registry import describe_kinds

    emit_json(describe_kinds([kind] if kind else None))


@app.command()
@reports_errors
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="Embeddings to convert, the format named by the suffix: .safetensors (a bctool file, or a shard-set folder or .txt manifest), .npy, .parquet or .faiss.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write, the format named by the suffix (.safetensors, .npy, .parquet, .faiss); .npy and .faiss get STEM.ids.txt and STEM.labels.txt beside them.")],
    ids: Annotated[Optional[Path], typer.Option(help="From .npy or .faiss: the ids, one a line in row order (default: SRC's STEM.ids.txt beside it).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="From .npy or .faiss: the label names, one a line, empty for unknown (default: STEM.labels.txt beside SRC, when there).")] = None,
    quiet: Quiet = False,
) -> None:
    """Convert embeddings between bctool files and .npy, parquet or a faiss index; print a JSON summary.

    Rows, ids and labels round-trip exactly (a faiss index holds the L2-normalised rows, as
    `bctool evaluate` searches them).
    """
    from bctool.convert import SIDECAR_SUFFIXES, beside, convert as run_convert

    setup_logging(False)
    plan = FilePlan("convert").read_embeddings("SRC", src).read("--ids", ids).read("--labels", labels)
    if src.suffix in SIDECAR_SUFFIXES:
        plan.read("SRC's ids file", None if ids else beside(src, "ids"))
        plan.read("SRC's labels file", None if labels else beside(src, "labels"))
    plan.write("--out", out, locked=True)
    if out.suffix in SIDECAR_SUFFIXES:
        plan.write("--out's ids file", beside(out, "ids")).write("--out's labels file", beside(out, "labels"))
    plan.check()
    with output_lock(out):
        emit_json(run_convert(src, out, str(ids) if ids else None, str(labels) if labels else None))


@app.command()
@reports_errors
def extract(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Images to embed: a list file (labels optional) or a class-folder tree.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint written by `bctool train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write the embeddings (.safetensors).")],
    batch_size: Annotated[int, typer.Option(callback=_at_least(1), help="Images per forward pass.")] = 256,
    gnd: Annotated[Optional[Path], typer.Option(help="Revisited Oxford/Paris ground truth: DATA is the dataset folder (holding jpg/); embed its gallery (imlist) in ground-truth order, or with --queries its queries.")] = None,
    queries: Annotated[bool, typer.Option("--queries", help="With --gnd: embed the query images (qimlist), cropped to their bounding boxes.")] = False,
    crop: Annotated[bool, typer.Option(help="With --gnd --queries: crop queries to their bbx (the standard protocol); --no-crop as in the AdvBCT paper.")] = True,
    shard: Annotated[Optional[str], typer.Option(callback=_shard_choice, help="Embed only part I of N of the list (I/N, 0-based), e.g. one per GPU or machine; join the parts with `bctool merge`.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of skipping it (skipped images are listed in OUT.failed.tsv).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from OUT.partial (its progress is saved every 30 s and on errors or Ctrl-C).")] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="An adapter (`bctool adapt`) fitted on this model's embeddings: write the rows mapped into its target space (the model's own rows go to OUT.unadapted.safetensors first, and stay there).")] = None,
    view: Annotated[Optional[str], typer.Option(callback=_one_of("bctool.data.transforms", "TRAINING_VIEWS"), help="Embed a seeded augmented view of each image instead of the clean one (flip or crop, as `train --augment`): old embeddings of the very views a new model then trains on (`train --old-views`). View --view-index of an image is the same on every machine.", show_default=False)] = None,
    view_index: Annotated[int, typer.Option(callback=_at_least(0), help="With --view: which view of each image (0, 1, ...); one file per view.")] = 0,
    view_seed: Annotated[int, typer.Option(callback=_at_least(0), help="With --view: the seed the views are drawn from.")] = 0,
    dtype: Annotated[str, typer.Option(callback=_one_of("bctool.embeddings", "DTYPES"), help="How the rows are stored: float32, or float16 (half the disk and memory; every reader scores in float32).")] = "float32",
    device: Device = "auto",
    workers: Workers = 2,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Embed images with a model; stream them into an embeddings file and print a JSON summary.

    Memory stays flat whatever the number of images. Images that cannot be read are skipped,
    counted and listed in OUT.failed.tsv (or stop the run with --strict).
    """
    from bctool.checkpoint import load_checkpoint
    from bctool.data import load_image_set
    from bctool.device import resolve_device
    from bctool.extract import Shard, extract_to_file, unadapted_path

    setup_logging(verbose)
    _extract_files(data, model, out, gnd, adapter).check()
    if queries and gnd is None:
        raise typer.BadParameter("--queries selects the query images of a --gnd ground truth; pass --gnd too")
    part = Shard.parse(shard) if shard is not None else None
    stored_view = None
    if view is not None:
        from bctool.data.transforms import StoredView

        stored_view = StoredView(view, view_index, view_seed)
    elif view_index or view_seed:
        raise typer.BadParameter("--view-index and --view-seed choose a seeded view: pass --view crop (or flip) too")
    checkpoint = load_checkpoint(model, device=resolve_device(device))
    if gnd is not None:
        from bctool.data.sources import image_set_from_names
        from bctool.data.gnd import load_gnd

        truth = load_gnd(gnd)
        if queries:
            boxes = [tuple(b) for b in truth.bbx] if crop else None
            images = image_set_from_names(data, truth.query_names, boxes, source=f"{gnd} queries")
        else:
            images = image_set_from_names(data, truth.gallery_names, source=f"{gnd} gallery")
    else:
        images = load_image_set(data, require_labels=False)
    mapping = None
    if adapter is not None:
        from bctool.adapt import load_adapter
        from bctool.export import check_adapter_source

        mapping = load_adapter(adapter)
        check_adapter_source(mapping, checkpoint)  # before any image is read
    raw = unadapted_path(out) if mapping else out
    result = extract_to_file(images, checkpoint, raw, batch_size=batch_size, workers=workers, shard=part,
                             strict=strict, resume=resume, progress=RichProgress(not quiet), view=stored_view,
                             dtype=dtype)
    if result.failed and not quiet:
        stderr.print(f"[yellow]Skipped {len(result.failed)} unreadable images[/] (listed in {result.report}); "
                     "--strict stops at the first one instead.")
    summary = result.to_dict()
    if mapping is not None:
        from bctool.adapt import transform_file

        with output_lock(out):
            summary["adapter"] = transform_file(raw, mapping, out)["adapter"]
        summary["unadapted"], summary["out"] = str(raw), str(out)
    emit_json(summary)


def _extract_files(data: Path, model: Path, out: Path, gnd: Path | None, adapter: Path | None) -> FilePlan:
    """What `extract` reads and writes: with --adapter the model's own rows go to
    OUT.unadapted.safetensors (with its partial, progress and skipped-image files) first."""
    from bctool.extract import side_files, unadapted_path

    plan = (FilePlan("extract").read_data("DATA", data).read("--model", model).read("--gnd", gnd)
            .read("--adapter", adapter).write("--out", out, locked=True))
    raw = unadapted_path(out) if adapter is not None else out
    if adapter is not None:
        plan.write("--out's unadapted rows", raw, locked=True)
    for what, path in side_files(raw).items():
        plan.write(f"--out's {what}", path)
    return plan


@app.command()
@reports_errors
def export(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint written by `bctool train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write the exported model (model.onnx, model.pt).")],
    format: Annotated[str, typer.Option("--format", "-f", callback=_one_of("bctool.export", "FORMATS"), help="onnx (run it with onnxruntime; needs the export extra: pip install -e \".[export]\") or torchscript (torch.jit.load).")] = "onnx",
    normalize: Annotated[bool, typer.Option(help="Put the per-channel normalisation inside the model, so it takes RGB in [0, 1]; without it the input is already normalised, as the JSON says.")] = False,
    images: Annotated[Optional[Path], typer.Option(help="Images (a list file or folder) to check the exported model on (its first --check ones); default: seeded random images.")] = None,
    check: Annotated[int, typer.Option(callback=_at_least(1), help="Images the exported model is checked on against `bctool extract`.")] = 8,
    tolerance: Annotated[float, typer.Option(callback=_at_least(0.0), help="Largest allowed difference from `bctool extract`, relative to the embedding norm.")] = 1e-4,
    adapter: Annotated[Optional[Path], typer.Option(help="An adapter (`bctool adapt`) fitted on this model's embeddings: export the model followed by the map, one file whose output is L2-normalised rows in the adapter's target space (checked against `bctool extract --adapter`).")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Export a checkpoint's embedding model (ONNX or TorchScript, dynamic batch axis) for serving;
    refuse it unless its outputs match `bctool extract`'s; print a JSON summary.

    The input is (N, 3, S, S) float32 RGB of the checkpoint's image size S, resized (shorter side
    to S) and centre-cropped; the output is the raw (N, D) embeddings, to L2-normalise. The
    checkpoint's metadata (class names aside) goes into the file's metadata under "bctool".
    """
    from bctool.checkpoint import load_checkpoint
    from bctool.data import load_image_set
    from bctool.export import export_model

    setup_logging(verbose)
    (FilePlan("export").read("MODEL", model).read_data("--images", images).read("--adapter", adapter)
     .write("--out", out, locked=True).check())
    with output_lock(out):
        checkpoint = load_checkpoint(model)
        image_set = load_image_set(images, require_labels=False) if images is not None else None
        mapping = None
        if adapter is not None:
            from bctool.adapt import load_adapter

            mapping = load_adapter(adapter)
        result = export_model(checkpoint, out, format, normalize=normalize, images=image_set, check=check,
                              tolerance=tolerance, adapter=mapping)
    if not quiet:
        stderr.print(f"exported {format} to {out}: largest difference {result.max_difference:.2e} of the embedding "
                     f"norm on {result.images_checked} images (tolerance {tolerance:g})", highlight=False, markup=False)
    emit_json(result.to_dict())


@app.command()
@reports_errors
def plot(
    log_dir: Annotated[Path, typer.Argument(metavar="LOG_DIR", help="The folder given to `bctool train --log-dir`.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", parser=_output_file, help="Plot to write, PNG, SVG or PDF by its suffix (default: LOG_DIR/training.png).")] = None,
    quiet: Quiet = False,
) -> None:
    """Draw the training curves of a --log-dir folder (loss parts per step and per epoch, learning rate) as a PNG."""
    from bctool.train.log import DEFAULT_PLOT, LOG_FILES, plot_training

    from bctool.plotting import plot_format

    target = out if out is not None else log_dir / DEFAULT_PLOT
    (FilePlan("plot").read("LOG_DIR", [log_dir / name for name in LOG_FILES])
     .write("--out" if out is not None else "LOG_DIR's plot", target, locked=True).check())
    if out is not None:
        plot_format(out)
    with output_lock(target):
        result = plot_training(log_dir, out)
    emit_json(result)


@app.command()
@reports_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(metavar="PARTS", help="The part files of `bctool extract --shard I/N`, in any order.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write the joined embeddings file (.safetensors).")],
    quiet: Quiet = False,
) -> None:
    """Join the parts of a sharded extraction into one embeddings file, in list order."""
    from bctool.embeddings import merge_shards

    FilePlan("merge").read("PARTS", list(parts)).write("--out", out, locked=True).check()
    with output_lock(out):
        result = merge_shards(list(parts), out)
    emit_json(result)


@app.command()
@reports_errors
def adapt(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="Embeddings of some images by the model whose space is mapped from (say the new model).")],
    target: Annotated[Path, typer.Argument(metavar="TARGET", help="Embeddings of the same images (paired by id) by the model whose space is mapped into (say the old model).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write the adapter (.safetensors).")],
    kind: Annotated[str, typer.Option(callback=_one_of("bctool.adapt.maps", "ADAPTERS"), help="The map: procrustes (orthogonal), affine (ridge least squares) or mlp (affine plus a residual MLP, trained on the cosine and, with labels, the target's class centres); `bctool list adapters` shows each one's parameters.")] = "affine",
    params: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="A parameter of the kind as NAME=VALUE (repeatable), e.g. --param ridge=0.01.")] = None,
    holdout: Annotated[float, typer.Option(help="Share of the pairs held out of the fit to report it (cosine, and retrieval mAP where labels exist); 0 fits on all.")] = 0.1,
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Seed of the held-out pairs and of the MLP's training.")] = 0,
    max_pairs: Annotated[int, typer.Option(callback=_at_least(2), help="Use at most this many pairs (a seeded sample; only their rows are read), so a gallery of any size fits in bounded memory.")] = 1_000_000,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Fit a map from SOURCE's embedding space to TARGET's on the images both files hold (paired
    by id; dimensions may differ) and write it as an adapter file; print the fit (JSON)."""
    from bctool.adapt import fit_adapter, save_adapter
    from bctool.embeddings import load_embeddings

    setup_logging(verbose)
    (FilePlan("adapt").read_embeddings("SOURCE", source).read_embeddings("TARGET", target)
     .write("--out", out, locked=True).check())
    with output_lock(out):
        adapter = fit_adapter(load_embeddings(source, mmap=True), load_embeddings(target, mmap=True), kind,
                              _name_values("--param", params, "NAME=VALUE"), holdout=holdout, seed=seed,
                              max_pairs=max_pairs)
        save_adapter(adapter, out)
    if not quiet:
        fit = adapter.fit
        stderr.print(f"{kind} adapter {adapter.source_dim} -> {adapter.target_dim} on {fit['fitted_on']} pairs: "
                     f"held-out cosine {fit.get('held_out_cosine', float('nan')):.3f}, held-out mAP "
                     f"{fit.get('held_out_map')} (target itself {fit.get('held_out_map_target')})",
                     highlight=False, markup=False)
    from dataclasses import asdict

    emit_json({"out": str(out), "kind": kind, "params": asdict(adapter.params), "source_dim": adapter.source_dim,
               "target_dim": adapter.target_dim, "fit": adapter.fit})


@app.command()
@reports_errors
def transform(
    emb: Annotated[Path, typer.Argument(metavar="EMB", help="Embeddings made by the adapter's source model (a gallery of any size streams).")],
    adapter: Annotated[Path, typer.Option(help="Adapter file written by `bctool adapt`.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="Where to write the mapped embeddings (.safetensors).")],
    blend: Annotated[Optional[Path], typer.Option(help="Embeddings of the same images (by id) in the adapter's target space, e.g. the old model's queries: each mapped row is interpolated with its row on the sphere (SLERP), for the transition while both models embed queries.")] = None,
    blend_weight: Annotated[Optional[float], typer.Option(help="With --blend: the weight of the mapped row (0: the --blend row, 1: the mapped row). Default 0.5.", show_default=False)] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Map every row of EMB into the adapter's target space, block by block (memory stays flat);
    the output names the adapter and both models (JSON summary)."""
    from bctool.adapt import load_adapter, transform_file

    setup_logging(verbose)
    if blend_weight is not None and blend is None:
        raise typer.BadParameter("--blend-weight weighs the mapped row against a --blend row; pass --blend FILE too")
    (FilePlan("transform").read_embeddings("EMB", emb).read("--adapter", adapter).read_embeddings("--blend", blend)
     .write("--out", out, locked=True).check())
    with output_lock(out):
        result = transform_file(emb, load_adapter(adapter), out, blend=blend,
                                blend_weight=0.5 if blend_weight is None else blend_weight)
    emit_json(result)


def _pair(text: str) -> tuple[Path, Path]:
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter(f"{text!r} is not QUERY,GALLERY (two embeddings files separated by a comma)")
    return Path(parts[0]), Path(parts[1])


@app.command()
@reports_errors
def evaluate(
    pairs: Annotated[Optional[list[str]], typer.Argument(metavar="QUERY,GALLERY", help="With --chain: one QUERY,GALLERY pair of embeddings files per model version, oldest first.", show_default=False)] = None,
    query: Annotated[Optional[Path], typer.Option("--query", help="Query embeddings file (from `bctool extract`); with --backfill, the new model's queries.")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", help="Gallery embeddings file; may be the query file itself (self matches are skipped).")] = None,
    old_query: Annotated[Optional[Path], typer.Option(help="Compatibility report: the old model's queries (with --backfill: for the old/old reference line).")] = None,
    old_gallery: Annotated[Optional[Path], typer.Option(help="Compatibility report and --backfill: the old model's gallery.")] = None,
    new_query: Annotated[Optional[Path], typer.Option(help="Compatibility report: the new model's queries.")] = None,
    new_gallery: Annotated[Optional[Path], typer.Option(help="Compatibility report and --backfill: the new model's gallery (the same images).")] = None,
    independent_query: Annotated[Optional[Path], typer.Option(help="Compatibility report: queries of a new model trained without compatibility (M(*,*)).")] = None,
    independent_gallery: Annotated[Optional[Path], typer.Option(help="Compatibility report: that independent model's gallery.")] = None,
    chain: Annotated[bool, typer.Option("--chain", help="Evaluate every model version against every other: the matrix M[i][j] and AC/BC (pass the QUERY,GALLERY pairs as arguments).")] = False,
    backfill: Annotated[Optional[str], typer.Option(help="Partial backfill: comma-separated fractions of the gallery re-embedded by the new model, e.g. 0,0.25,0.5,0.75,1.")] = None,
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Seed of the random order in which --backfill re-embeds the gallery, and of the compatibility report's --bootstrap resamples.")] = 0,
    bootstrap: Annotated[int, typer.Option(callback=_at_least(0), help="Compatibility report: resamples of the queries (paired, with replacement) for the 95% bootstrap interval of delta = M(n,o) - M(o,o); 0 turns the interval off.")] = 1000,
    plot: Annotated[Optional[Path], typer.Option(parser=_output_file, help="With --backfill: draw the curve to this file, PNG, SVG or PDF by its suffix (needs matplotlib).")] = None,
    order: Annotated[Optional[Path], typer.Option(help="With --backfill: re-embed the gallery in this order (a plan from `bctool backfill plan`) instead of a random one.")] = None,
    backfill_scoring: Annotated[str, typer.Option(callback=_one_of("bctool.evaluate.backfill", "SCORINGS"), help="With --backfill: raw (both models' cosines in one ranking) or calibrated (the old rows' cosines put on the new model's scale, fitted on the rows re-embedded so far).")] = "raw",
    top_k: Annotated[Optional[int], typer.Option(callback=_at_least(1), help="Rank only the top K gallery items per query (default: the whole gallery); relevant items below K count as missed.")] = None,
    gnd: Annotated[Optional[Path], typer.Option(help="Revisited Oxford/Paris ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl): report mAP and mP@k for the Easy, Medium and Hard protocols; rows are matched to the image names by id stem.")] = None,
    solution: Annotated[Optional[Path], typer.Option(help="GLDv2 retrieval_solution_v2.1.csv: report mAP@100 for the Public and Private queries and both together.")] = None,
    truth: Annotated[Optional[list[str]], typer.Option("--truth", help="The ground truth of any registered protocol as OPTION=PATH, repeatable: --truth gnd=FILE is --gnd FILE; a protocol added to bctool.evaluate.protocols is reached this way with no other change.")] = None,
    index: Annotated[str, typer.Option(callback=_one_of("bctool.evaluate.search", "INDEX_KINDS"), help="Gallery index: flat (exact, default), ivf or hnsw (approximate, for very large galleries; ties then lose their fixed order).")] = "flat",
    nprobe: Annotated[int, typer.Option(callback=_at_least(1), help="With --index ivf: inverted lists visited per query.")] = 32,
    ef_search: Annotated[int, typer.Option(callback=_at_least(1), help="With --index hnsw: search breadth per query.")] = 128,
    require: Annotated[Optional[list[str]], typer.Option("--require", callback=_requirements, help="A release gate (repeatable): KEY (a yes/no figure that must hold, e.g. compatible_significant) or KEY OP NUMBER with OP one of <= >= < > == != (e.g. 'nfr<=0.05', 'delta>=0.01'); keys are the report's numbers and, in a compatibility report, nfr, pfr (new/old) and nfr_new_new, pfr_new_new. The JSON gains 'requirements'; any failure exits with code 3.")] = None,
    quiet: Quiet = False,
) -> None:
    """Retrieval quality of queries against a gallery, a compatibility report, a model chain or
    a partial backfill; print one JSON object.

    Relevance: the same label name, or with --gnd / --solution the benchmark's ground truth.
    """
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.protocols import make_protocol

    setup_logging(False)  # warnings (queries without a relevant item, ...) reach stderr
    if backfill is None:
        given = [name for name, value in (("--plot", plot), ("--order", order),
                                          ("--backfill-scoring", None if backfill_scoring == "raw" else backfill_scoring))
                 if value is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} only apply to a partial backfill; pass --backfill FRACTIONS too")
    plan = FilePlan("evaluate")
    for option, path in {"--query": query, "--gallery": gallery, "--old-query": old_query, "--old-gallery": old_gallery,
                         "--new-query": new_query, "--new-gallery": new_gallery, "--independent-query": independent_query,
                         "--independent-gallery": independent_gallery}.items():
        plan.read_embeddings(option, path)
    plan.read_embeddings("QUERY,GALLERY", [path for text in pairs or [] for path in text.split(",") if path])
    plan.read("--gnd", gnd).read("--solution", solution).read("--truth", list(_truth_files(truth).values()))
    plan.read("--order", order).write("--plot", plot, locked=True).check()
    if plot is not None:
        from bctool.plotting import plot_format

        plot_format(plot)
    truths = {"gnd": gnd, "solution": solution, **_truth_files(truth)}
    protocol = make_protocol(top_k=top_k, index=index, nprobe=nprobe, ef_search=ef_search, **truths)
    if chain:
        report = _evaluate_chain(pairs or [], protocol, quiet)
    elif pairs:
        raise typer.BadParameter("QUERY,GALLERY arguments are only for --chain")
    elif backfill is not None:
        report = _evaluate_backfill({"query": query, "old-query": old_query, "old-gallery": old_gallery,
                                     "new-gallery": new_gallery, "order": order}, backfill, seed, plot, protocol, quiet,
                                    backfill_scoring)
    elif old_query or new_query:
        report = _evaluate_compatibility(
            {"old": (old_query, old_gallery), "new": (new_query, new_gallery),
             "independent": (independent_query, independent_gallery)}, protocol, bootstrap, seed, quiet)
    else:
        if query is None or gallery is None:
            raise typer.BadParameter("pass --query and --gallery (or a compatibility report, --chain or --backfill)")
        # The gallery is read memory-mapped: a million rows need not fit twice in memory.
        metrics = protocol.evaluate(load_embeddings(query), load_embeddings(gallery, mmap=True))
        if not quiet:
            _print_table(protocol.table(f"{query.name} -> {gallery.name}", metrics))
        report = {"query_file": str(query), "gallery_file": str(gallery), **metrics}
    _emit_gated(report, require or [], quiet)


DEFAULT_POLICY = "norm"  # bctool.backfill.DEFAULT_POLICY, without importing numpy for --help
GATE_FAILED = 3  # the exit code of a release gate that failed (errors exit 1, usage errors 2)


def _requirements(texts: list[str] | None) -> list | None:
    """``--require`` expressions parsed before any work; a malformed one is a usage error."""
    if not texts:
        return texts
    from bctool.errors import ConfigError
    from bctool.evaluate.gate import parse_requirement

    try:
        return [parse_requirement(text) for text in texts]
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def _emit_gated(report: dict, requirements: list, quiet: bool) -> None:
    """Print the report (with its ``requirements`` when there are any); exit 3 if one failed."""
    if not requirements:
        emit_json(report)
        return
    from bctool.evaluate.gate import UnknownKey, check_requirements

    try:
        checked = check_requirements(requirements, report)
    except UnknownKey as exc:
        raise typer.BadParameter(str(exc), param_hint="'--require'") from None
    emit_json({**report, "requirements": checked})
    failed = [r["expression"] for r in checked if not r["passed"]]
    if not quiet:
        verdict = f"release gate failed: {', '.join(failed)}" if failed else "release gate passed"
        stderr.print(verdict, highlight=False, markup=False)
    if failed:
        raise typer.Exit(GATE_FAILED)


def _print_table(table: Table) -> None:
    """A library table (title, rows, columns) drawn on stderr."""
    stderr.print(metrics_table(table.title, table.rows, list(table.columns)))


def _truth_files(pairs: list[str] | None) -> dict[str, Path]:
    """``--truth OPTION=PATH`` options as ``{option: path}``."""
    return {name: Path(path) for name, path in
            _name_values("--truth", pairs, "OPTION=PATH, e.g. gnd=gnd_roxford5k.pkl").items()}


def _evaluate_compatibility(files: dict, protocol: Protocol, bootstrap: int, seed: int, quiet: bool) -> dict:
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.reports import CompatibilityOptions, compatibility_report, compatibility_table
    from bctool.evaluate.scores import DEFAULT_LEVEL

    for name in ("old", "new"):
        if None in files[name]:
            raise typer.BadParameter(f"a compatibility report needs --{name}-query and --{name}-gallery")
    ind = files["independent"]
    if (ind[0] is None) != (ind[1] is None):
        raise typer.BadParameter("pass both --independent-query and --independent-gallery, or neither")
    # Galleries are memory-mapped (and read in blocks); queries are read whole.
    emb = {name: (load_embeddings(paths[0]), load_embeddings(paths[1], mmap=True))
           for name, paths in files.items() if paths[0]}
    report = compatibility_report(emb["old"], emb["new"], protocol, independent=emb.get("independent"),
                                  options=CompatibilityOptions(bootstrap=bootstrap, seed=seed, level=DEFAULT_LEVEL))
    if not quiet:
        _print_table(compatibility_table(report))
        stderr.print(f"compatible (M(n,o) > M(o,o)): {'yes' if report['compatible'] else 'no'}", highlight=False)
        stderr.print(_delta_line(report, DEFAULT_LEVEL), markup=False, highlight=False)
        flips = report["flips"].get("new/old")
        if flips:
            stderr.print(f"negative flips at rank 1 (new/old against old/old): {flips['nfr_count']} of {flips['queries']} "
                         f"queries ({100 * flips['nfr']:.1f}%), positive flips {flips['pfr_count']}",
                         markup=False, highlight=False)
    return report


def _delta_line(report: dict, level: float) -> str:
    """``delta M(n,o) - M(o,o): +1.23 [95% CI +0.40, +2.05] (significant)``, in mAP points."""
    text = f"delta M(n,o) - M(o,o): {100 * report['delta']:+.2f}"
    if "delta_low" not in report:
        return text + " (no bootstrap)"
    verdict = "significant" if report["compatible_significant"] else "not significant"
    return (f"{text} [{100 * level:g}% CI {100 * report['delta_low']:+.2f}, {100 * report['delta_high']:+.2f}] "
            f"({verdict})")


def _evaluate_chain(pairs: list[str], protocol: Protocol, quiet: bool) -> dict:
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.reports import chain_report, chain_table

    if len(pairs) < 2:
        raise typer.BadParameter("--chain needs at least two QUERY,GALLERY pairs (model versions)")
    models = [(load_embeddings(q), load_embeddings(g, mmap=True)) for q, g in map(_pair, pairs)]
    report = chain_report(models, protocol)
    if not quiet:
        _print_table(chain_table(report))
    return report


def _evaluate_backfill(files: dict[str, Path | None], fractions: str, seed: int, plot: Path | None,
                       protocol: Protocol, quiet: bool, scoring: str = "raw") -> dict:
    """``files``: the paths of --query, --old-query, --old-gallery and --new-gallery (by option name)."""
    from bctool.embeddings import load_embeddings
    from bctool.backfill import read_plan
    from bctool.evaluate.reports import BackfillOptions, backfill_report, backfill_table

    query, old_query, old_gallery, new_gallery = (files[k] for k in ("query", "old-query", "old-gallery", "new-gallery"))
    if query is None or old_gallery is None or new_gallery is None:
        raise typer.BadParameter("--backfill needs --query (new model), --old-gallery and --new-gallery")
    try:
        values = [float(f) for f in fractions.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--backfill {fractions!r}: expected comma-separated fractions such as 0,0.25,0.5,0.75,1") from None
    with output_lock(plot) if plot is not None else contextlib.nullcontext():
        report = backfill_report(
            load_embeddings(query), load_embeddings(old_gallery, mmap=True), load_embeddings(new_gallery, mmap=True),
            protocol,
            BackfillOptions(tuple(values), seed=seed, plot=plot, scoring=scoring,
                            order=tuple(read_plan(files["order"])) if files.get("order") else None),
            old_query=load_embeddings(old_query) if old_query else None,
        )
    if not quiet:
        _print_table(backfill_table(report))
    return report


@dataset_app.command("emoji")
@reports_errors
def dataset_emoji(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images/ and the list files into.")],
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Seed of the class split.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Share of classes held out for query/gallery.")] = 0.3,
    old_fraction: Annotated[float, typer.Option(help="Share of the training classes the old model sees.")] = 0.3,
    limit: Annotated[Optional[int], typer.Option(callback=_at_least(3), help="Keep only the first N emoji (quick experiments).")] = None,
    quiet: Quiet = False,
) -> None:
    """Write the embedded emoji set (Google and Twitter renderings) with extended-class lists."""
    from bctool.data.emoji import EmojiSplit, write_emoji_dataset

    FilePlan("dataset emoji").write_folder("OUT_DIR", out_dir).check()

    summary = write_emoji_dataset(
        out_dir, EmojiSplit(seed=seed, test_fraction=test_fraction, old_fraction=old_fraction, limit=limit)
    )
    emit_json(summary)


@dataset_app.command("fashion-mnist")
@reports_errors
def dataset_fashion_mnist(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images/ and the list files into.")],
    source: Annotated[Optional[Path], typer.Option(help="Folder with the four Fashion-MNIST IDX files, gzipped or not (default: /usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist installs them).")] = None,
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Seed of the image selection.")] = 0,
    train_per_class: Annotated[Optional[int], typer.Option(callback=_at_least(2), help="Training images per class for the new model (default: all 6,000).")] = None,
    old_fraction: Annotated[float, typer.Option(help="Share of every class's training images the old model sees (extended-data).")] = 0.3,
    query_per_class: Annotated[int, typer.Option(callback=_at_least(1), help="Test images per class used as queries; the rest of the test set is the gallery.")] = 100,
    quiet: Quiet = False,
) -> None:
    """Write Fashion-MNIST as PNGs with extended-data lists (old model on a share of every class)."""
    from bctool.data.fashion_mnist import DEFAULT_SOURCE, FashionSplit, write_fashion_mnist_dataset

    FilePlan("dataset fashion-mnist").read("--source", source or DEFAULT_SOURCE).write_folder("OUT_DIR", out_dir).check()
    split = FashionSplit(seed=seed, train_per_class=train_per_class, old_fraction=old_fraction,
                         query_per_class=query_per_class)
    emit_json(write_fashion_mnist_dataset(out_dir, split, source or DEFAULT_SOURCE))


@dataset_app.command("make")
@reports_errors
def dataset_make(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A registered dataset writer (`bctool list datasets`): emoji, fashion-mnist, digits (scikit-learn's, pip install scikit-learn), or a plugin's.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images and list files into.")],
    params: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="A parameter of the writer as NAME=VALUE (repeatable); `bctool list datasets` shows them and their defaults.")] = None,
    quiet: Quiet = False,
) -> None:
    """Write a dataset by its registered name, with its parameters (any writer, a plugin's too)."""
    from bctool.data.writers import write_dataset

    FilePlan(f"dataset make {name}").write_folder("OUT_DIR", out_dir).check()

    emit_json(write_dataset(name, out_dir, _name_values("--param", params, "NAME=VALUE")))


@dataset_app.command("gldv2")
@reports_errors
def dataset_gldv2(
    csv_file: Annotated[Path, typer.Argument(metavar="CSV_FILE", help="A GLDv2 CSV: train.csv / train_clean.csv (labelled), or index.csv / test.csv.")],
    images: Annotated[Path, typer.Option(help="Folder holding the images in GLDv2's a/b/c/abc....jpg layout.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="List file to write (paths relative to its folder).")],
    quiet: Quiet = False,
) -> None:
    """Write a bctool list file for GLDv2 images from one of its CSV files."""
    from bctool.data.gldv2 import write_gldv2_list

    FilePlan("dataset gldv2").read("CSV_FILE", csv_file).read("--images", images).write("--out", out, locked=True).check()
    with output_lock(out):
        result = write_gldv2_list(csv_file, images, out)
    emit_json(result)


@backfill_app.command("plan")
@reports_errors
def backfill_plan(
    old_gallery: Annotated[Path, typer.Argument(metavar="OLD_GALLERY", help="The old model's gallery embeddings (the ids to re-embed).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=_output_file, help="The plan to write: one gallery id a line with its batch number (ID<TAB>BATCH).")],
    policy: Annotated[str, typer.Option(callback=_one_of("bctool.backfill", "POLICIES"), help="The order: norm (smallest old embeddings first; the default, the best measured: README, 'Rolling the upgrade out'), random, crowded (old rows closest to another first) or disagreement (rows predicted to differ most between the models first; needs --new-sample); `bctool list backfill-policies`.")] = DEFAULT_POLICY,
    new_sample: Annotated[Optional[Path], typer.Option(help="The new model's embeddings of a sample of the gallery's images (same ids).")] = None,
    batch: Annotated[int, typer.Option(callback=_at_least(0), help="Ids a batch (0: one batch), so a backfill runs, stops and resumes batch by batch.")] = 0,
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Seed of the random policy.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Write the order in which to re-embed a gallery with the new model (JSON summary);
    `bctool evaluate --backfill ... --order PLAN` measures its curve."""
    from bctool.backfill import POLICIES, write_plan

    if new_sample is not None and not POLICIES.entry(policy).declares.get("needs_sample"):
        users = [e.name for e in POLICIES.entries() if e.declares.get("needs_sample")]
        raise typer.BadParameter(f"--new-sample is read only by the {', '.join(users)} policy; the {policy} policy "
                                 "orders by the old gallery alone: drop --new-sample, or pass --policy disagreement")

    (FilePlan("backfill plan").read_embeddings("OLD_GALLERY", old_gallery).read_embeddings("--new-sample", new_sample)
     .write("--out", out, locked=True).check())
    with output_lock(out):
        emit_json(write_plan(old_gallery, out, policy, batch, new_sample, seed))


@app.command()
@reports_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the dataset, models and embeddings (created in the current folder by default).")] = Path("bctool-demo"),
    method: Annotated[Optional[str], typer.Option(callback=_method_choice, help="Compatibility method of the new model (default: the recommended one, as `bctool methods` names it; any method of `bctool train --method`).", show_default=False)] = None,
    warm_start: Annotated[bool, typer.Option(help="Start the new model from the old one (--init-from) at learning rate 0.03, as the recommended recipe does; --no-warm-start trains it from scratch at 0.1.")] = True,
    published: Annotated[str, typer.Option(help="Also train this method in the AdvBCT authors' regime (--regime paper, from scratch: no ImageNet weights here) for comparison; none to skip.")] = "advbct",
    bootstrap: Annotated[int, typer.Option(callback=_at_least(0), help="Resamples of the 95% bootstrap interval of M(n,o) - M(o,o) (0: no interval).")] = 1000,
    epochs: Annotated[int, typer.Option(callback=_at_least(1), help="Epochs of every model.")] = 30,
    arch: Annotated[str, typer.Option(callback=_arch_choice, help="Backbone of every model.")] = "small",
    image_size: Annotated[int, typer.Option(callback=_at_least(8), help="Image side in pixels.")] = 32,
    limit: Annotated[Optional[int], typer.Option(callback=_at_least(10), help="Use only the first N emoji classes (a quicker, smaller run).")] = None,
    device: Device = "auto",
    workers: Workers = 2,
    seed: Annotated[int, typer.Option(callback=_seed_range, help="Random seed of the split, the training and the bootstrap.")] = 0,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run a whole model upgrade on the embedded emoji set: an old model, a new model with the
    recommended recipe, AdvBCT in the authors' regime (from scratch), and an independent new model.

    Prints M(o,o), M(n,n), M(n,o) and M(*,*) (the independent model), whether the new model is
    compatible, M(n,o) > M(o,o), and the bootstrap interval of the difference.
    """
    from bctool.demo import DemoConfig, run_demo, with_overrides
    from bctool.evaluate.scores import DEFAULT_LEVEL
    from bctool.evaluate.protocols.labels import COLUMNS

    setup_logging(verbose)
    FilePlan("demo").write_folder("--workdir", workdir).check()
    config = with_overrides(
        DemoConfig(), method=method, warm_start=warm_start, published=None if published == "none" else published,
        bootstrap=bootstrap, epochs=epochs, arch=arch, image_size=image_size, limit=limit, device=device,
        workers=workers, seed=seed,
    )
    for name in (config.method, config.published):  # fail on a bad method before training
        if name:
            config.train_config(method=name, old_embeddings="-")
    summary = run_demo(workdir, config, RichProgress(not quiet))
    if not quiet:
        stderr.print(metrics_table("emoji upgrade (query model / gallery model)", summary["results"], list(COLUMNS)))
        verdict = "yes" if summary["compatible"] else "no"
        start = "warm start, " if summary["warm_start"] else ""
        stderr.print(
            f"M(o,o) {100 * summary['M(o,o)']:.2f}  M(n,n) {100 * summary['M(n,n)']:.2f}  "
            f"M(n,o) {100 * summary['M(n,o)']:.2f}  M(*,*) {100 * summary['M(*,*)']:.2f}  "
            f"({start}{summary['method']})\n"
            f"compatible (M(n,o) > M(o,o)): {verdict}; {_delta_line(summary, DEFAULT_LEVEL)}",
            highlight=False, markup=False,
        )
        if summary["published"]:
            ref = summary["published"]
            stderr.print(f"{ref['method']} in the paper's regime, from scratch: M(n,n) {100 * ref['M(n,n)']:.2f}  M(n,o) "
                         f"{100 * ref['M(n,o)']:.2f}, compatible: {'yes' if ref['compatible'] else 'no'}",
                         highlight=False, markup=False)
        stderr.print(f"{summary['seconds']} s", highlight=False)
    emit_json(summary)


def main() -> None:
    """Console-script entry point."""
    app()
