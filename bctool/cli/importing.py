"""`bctool import`: a network made elsewhere, as a model bctool runs.

Two kinds of source: a backbone's weights (named ImageNet weights, or a state dict file in the
torchvision, timm or EfficientNet-PyTorch layout, with the user's projection head if any), which
becomes an ordinary checkpoint; or an ONNX or TorchScript file, copied with its preprocessing
recorded in it. Either way, ``--check STORED`` then verifies the result against embeddings the
original system wrote (`bctool verify`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    PanelCommand,
    Quiet,
    Verbose,
    Workers,
    arch_choice,
    at_least,
    one_of,
    output_file,
)
from bctool.cli.output import RichProgress, emit_json, setup_logging
from bctool.utils.files import FilePlan
from bctool.utils.io import output_lock

PRE = "Preprocessing (default: the named weights', bctool's at 224 px for a weights file, or a model file's recorded steps; a model file without any needs --image-size)"
PROJ = "Projection head (default: none, an exact identity neck)"
CHECK = "Check against stored embeddings"


def _source(value: str) -> str:
    """A registered backbone's name, or an ONNX/TorchScript file."""
    from bctool.models.external import model_file_kind, named_like_model_file

    if value == "auto":
        raise typer.BadParameter("'auto' chooses a backbone by the training image size; name the backbone to import")
    if named_like_model_file(value) and not Path(value).exists():
        raise typer.BadParameter(f"the model file {value!r} does not exist")
    if Path(value).suffix and Path(value).is_file():
        try:
            if model_file_kind(value) is not None:
                return value
        except Exception as exc:  # a state dict named .pt: say how it comes in
            raise typer.BadParameter(str(exc)) from None
    return arch_choice(value) or value


def _fraction(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value!r} must be above 0 and at most 1 (1: the whole image; 0.875: 224/256)")
    return value


def _channels(which: str):  # noqa: ANN202 - a click callback
    def parse(value: str | None) -> tuple[float, float, float] | None:
        from bctool.data.transforms import parse_channels

        try:
            return None if value is None else parse_channels(value, which)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parse


def _background(value: str | None) -> tuple[int, int, int] | None:
    from bctool.data.transforms import parse_background

    try:
        return None if value is None else parse_background(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("import", cls=PanelCommand)
@reports_errors
def import_model(
    source: Annotated[str, typer.Argument(metavar="ARCH|FILE", callback=_source, help="A backbone (efficientnet_lite0/1/2 take ImageNet weights by name; resnet18/34/50 and the others a weights file: `bctool list backbones`), or an ONNX or TorchScript file to copy with its preprocessing recorded.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the model: a checkpoint (.safetensors) for a backbone, a file of the same kind for an ONNX or TorchScript FILE.")],
    pretrained: Annotated[Optional[str], typer.Option(help="With ARCH: the weights, a name (imagenet; `bctool list weights`) or a file (.safetensors, or a .pth state dict read weights-only) in the torchvision, timm or EfficientNet-PyTorch layout; wrapper prefixes (module., model.) and the ImageNet classifier are dropped.", show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option(callback=at_least(8), rich_help_panel=PRE, help="Side of the square the model takes.", show_default=False)] = None,
    resize: Annotated[Optional[str], typer.Option(callback=one_of("bctool.data.transforms", "RESIZE_RULES"), rich_help_panel=PRE, help="shorter-side: the centred square (--crop of the shorter side) resized in one resampling, bctool's rule; torchvision: resize the shorter side to floor(size / crop), then cut the centred square, in two steps as torchvision's Resize + CenterCrop and timm's eval transform do; squash: resize the whole image to the square.", show_default=False)] = None,
    crop: Annotated[Optional[float], typer.Option("--crop", "--crop-fraction", callback=_fraction, rich_help_panel=PRE, help="The centred share of the image kept before the resize: 1 the whole, 0.875 timm's and TensorFlow's 224/256, 0.95 some timm models.", show_default=False)] = None,
    interpolation: Annotated[Optional[str], typer.Option(callback=one_of("bctool.data.transforms", "INTERPOLATIONS"), rich_help_panel=PRE, help="The resampling filter: bilinear, bicubic (most timm models), nearest or lanczos.", show_default=False)] = None,
    mean: Annotated[Optional[str], typer.Option(callback=_channels("mean"), rich_help_panel=PRE, help="Per-channel mean subtracted from RGB in [0, 1]: R,G,B or imagenet, clip, inception.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option(callback=_channels("std"), rich_help_panel=PRE, help="Per-channel deviation divided by: R,G,B or imagenet, clip, inception.", show_default=False)] = None,
    background: Annotated[Optional[str], typer.Option(callback=_background, rich_help_panel=PRE, help="Colour under transparent pixels: R,G,B (0-255), white or black.", show_default=False)] = None,
    projection: Annotated[Optional[str], typer.Option(rich_help_panel=PROJ, help="Key prefix of the Linear after the pooled features in the weights file (PREFIX.weight, PREFIX.bias if any), e.g. fc or head.proj: the embedding is its output.", show_default=False)] = None,
    projection_norm: Annotated[Optional[str], typer.Option(rich_help_panel=PROJ, help="Key prefix of a BatchNorm1d after that Linear (weight, bias, running_mean, running_var).", show_default=False)] = None,
    projection_file: Annotated[Optional[Path], typer.Option(rich_help_panel=PROJ, help="The file holding the projection, when not the weights file.", show_default=False)] = None,
    projection_eps: Annotated[float, typer.Option(rich_help_panel=PROJ, help="That BatchNorm's epsilon.")] = 1e-5,
    classifier: Annotated[Optional[str], typer.Option(rich_help_panel=PROJ, help="Key prefix of the user's classifier on the embedding (a Linear, classes x embedding dim), from the projection's file: the checkpoint's head, whose rows a warm start copies by class name (with --classes).", show_default=False)] = None,
    classes: Annotated[Optional[Path], typer.Option(rich_help_panel=PROJ, help="With --classifier: a text file naming its classes, one a line, in the order of its rows.", show_default=False)] = None,
    drop: Annotated[Optional[list[str]], typer.Option(rich_help_panel=PROJ, help="A key prefix of the weights file to leave out (repeatable), e.g. a classifier not imported; any other key the backbone does not take is refused, by name.", show_default=False)] = None,
    check: Annotated[Optional[Path], typer.Option(rich_help_panel=CHECK, help="Embeddings the original system wrote: re-embed a sample of their images with the imported model and compare (`bctool verify`); exit 1 below --threshold (the model is written either way).", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(rich_help_panel=CHECK, help="With --check: the images behind it, when not under its recorded root.", show_default=False)] = None,
    threshold: Annotated[float, typer.Option(rich_help_panel=CHECK, help="With --check: the least cosine a row may have to its stored row.")] = 0.99,
    sample: Annotated[int, typer.Option(callback=at_least(1), rich_help_panel=CHECK, help="With --check: rows re-embedded.")] = 1000,
    workers: Workers = 2,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Bring a network made elsewhere into bctool, as it is.

    From ARCH and --pretrained: a checkpoint of the backbone's pooled features through the
    user's projection (--projection) or an exact identity neck, the user's classifier as its head
    (--classifier, --classes) or none, and the preprocessing given (the named weights' own by
    default). It works wherever a trained checkpoint does: `extract`, `evaluate`, `export`,
    `train --old-model`, and the warm start (same --arch and --embedding-dim). From an ONNX or TorchScript FILE: a copy that records its
    preprocessing, for `extract --model` and `train --old-model` (no warm start: no weights).
    """
    from bctool.models.external import model_file_kind
    from bctool.verify import recorded_root

    setup_logging(verbose)
    steps = {"image_size": image_size, "resize": resize, "crop_fraction": crop, "interpolation": interpolation,
             "mean": mean, "std": std, "background": background}
    file_source = Path(source).is_file() and model_file_kind(source) is not None
    plan = _import_files(source, pretrained, out, projection_file, file_source).read("--check", check)
    plan.read("--classes", classes)
    plan.read_data("--data", data)
    root = recorded_root(check) if check is not None and data is None else None
    if root and Path(root).is_dir():
        plan.read_data("--check's recorded root", root)  # the images are found under it
    plan.check()
    with output_lock(out):
        if file_source:
            given = {"--projection": projection, "--projection-norm": projection_norm,
                     "--projection-file": projection_file, "--projection-eps": projection_eps != 1e-5,
                     "--classifier": classifier, "--classes": classes, "--drop": drop}
            result = _import_model_file(source, out, steps, pretrained, [k for k, v in given.items() if v])
        else:
            head = _classifier(classifier, classes, projection_file)
            result = _import_weights(source, out, steps, pretrained, projection, projection_norm, projection_file,
                                     projection_eps, head, tuple(drop or ()))
    if check is not None:
        result["check"] = _check(check, out, data, threshold, sample, workers, quiet)
    emit_json(result)
    if check is not None and not result["check"]["passed"]:
        raise typer.Exit(1)


def _classifier(prefix: str | None, classes: Path | None, projection_file: Path | None) -> Any:
    """The --classifier and --classes options as a Classifier (None without them)."""
    from bctool.models.imported import Classifier

    if (prefix is None) != (classes is None):
        raise typer.BadParameter("--classifier PREFIX and --classes FILE go together: the rows and their names")
    if prefix is None or classes is None:
        return None
    names = tuple(line.strip() for line in classes.read_text(encoding="utf-8").splitlines() if line.strip())
    return Classifier(prefix, names, str(projection_file) if projection_file else None)


def _import_weights(arch: str, out: Path, steps: dict[str, Any], pretrained: str | None, projection: str | None,
                    norm: str | None, projection_file: Path | None, eps: float, classifier: Any,
                    drop: tuple[str, ...]) -> dict[str, Any]:
    from bctool.models.imported import Projection, import_pretrained

    if pretrained is None:
        raise typer.BadParameter(f"importing the backbone {arch} needs its weights: --pretrained imagenet (named "
                                 "weights) or --pretrained FILE")
    if projection is None and (norm or projection_file):
        raise typer.BadParameter("--projection-norm and --projection-file describe a projection: name its Linear with "
                                 "--projection PREFIX too")
    head = Projection(projection, norm, str(projection_file) if projection_file else None, eps) if projection else None
    return import_pretrained(arch, pretrained, out, projection=head, classifier=classifier, drop=drop,
                             **steps).to_dict()


def _import_model_file(source: str, out: Path, steps: dict[str, Any], pretrained: str | None,
                       weights_options: list[str]) -> dict[str, Any]:
    import dataclasses

    from bctool.checkpoint import file_sha256
    from bctool.data.transforms import Preprocess
    from bctool.models.external import model_file_kind, read_model_file_metadata, write_model_file_with_metadata

    if pretrained is not None or weights_options:
        raise typer.BadParameter(f"{source} is a whole model: --pretrained and the projection and classifier "
                                 f"options ({', '.join(weights_options) or '--pretrained'}) describe weights to build "
                                 "one from; leave them out")
    record = read_model_file_metadata(source)
    if "preprocess" in record:
        base = Preprocess.from_dict(record["preprocess"])
    elif steps["image_size"] is None:
        raise typer.BadParameter(f"{source} records no preprocessing: give at least --image-size (and each step its "
                                 "makers used: --resize, --crop, --interpolation, --mean, --std)")
    else:
        base = Preprocess(image_size=steps["image_size"])
    inside = bool(record.get("export", {}).get("normalize_included"))
    if inside and (steps["mean"] is not None or steps["std"] is not None):
        raise typer.BadParameter(f"{source} normalises its input inside its graph (`bctool export --normalize`): "
                                 "--mean and --std would normalise twice; leave them out")
    preprocess = dataclasses.replace(base, **{k: v for k, v in steps.items() if v is not None})
    record = {**record, "preprocess": dataclasses.asdict(preprocess),
              "export": {**record.get("export", {}), "normalize_included": inside},
              "imported": {"from": str(Path(source).resolve()), "sha256": file_sha256(source)}}
    write_model_file_with_metadata(source, out, record)
    return {"out": str(out), "format": model_file_kind(source), "preprocess": record["preprocess"],
            "sha256": file_sha256(out)}


def _check(stored: Path, model: Path, data: Path | None, threshold: float, sample: int, workers: int,
           quiet: bool) -> dict[str, Any]:
    """`bctool verify STORED --model MODEL`'s report."""
    from bctool.cli.embed import print_verdict
    from bctool.verify import VerifyOptions, verify_file

    options = VerifyOptions(sample=sample, threshold=threshold, workers=workers)
    report = verify_file(stored, model, options, data, RichProgress(not quiet))
    if not quiet:
        print_verdict(report, threshold)
    return report


def _import_files(source: str, pretrained: str | None, out: Path, projection_file: Path | None,
                  file_source: bool) -> FilePlan:
    """What `import` reads (a weights or model file, a projection file) and writes (the model;
    named weights' cache file)."""
    from bctool.models.weights import declare_pretrained

    plan = FilePlan("import")
    if file_source:
        plan.read("FILE", Path(source))
    elif pretrained is not None:
        declare_pretrained(plan, source, pretrained)
    return plan.read("--projection-file", projection_file).write("--out", out, locked=True)
