"""Commands that make and move embeddings files: `extract`, `export`, `convert`, `merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    Device,
    Quiet,
    Verbose,
    Workers,
    at_least,
    one_of,
    output_file,
    shard_choice,
)
from bctool.cli.output import (
    RichProgress,
    emit_json,
    setup_logging,
    stderr,
)
from bctool.utils.files import FilePlan
from bctool.utils.io import output_lock


@app.command()
@reports_errors
def extract(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Images to embed: a list file (labels optional) or a class-folder tree.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="A checkpoint (`bctool train`, `bctool import`), or an ONNX or TorchScript file that records its preprocessing (`bctool export` writes one; `bctool import FILE` adds it to any).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the embeddings (.safetensors).")],
    batch_size: Annotated[int, typer.Option(callback=at_least(1), help="Images per forward pass.")] = 256,
    gnd: Annotated[Optional[Path], typer.Option(help="Revisited Oxford/Paris ground truth: DATA is the dataset folder (holding jpg/); embed its gallery (imlist) in ground-truth order, or with --queries its queries.")] = None,
    queries: Annotated[bool, typer.Option("--queries", help="With --gnd: embed the query images (qimlist), cropped to their bounding boxes.")] = False,
    crop: Annotated[bool, typer.Option(help="With --gnd --queries: crop queries to their bbx (the standard protocol); --no-crop as in the AdvBCT paper.")] = True,
    shard: Annotated[Optional[str], typer.Option(callback=shard_choice, help="Embed only part I of N of the list (I/N, 0-based), e.g. one per GPU or machine; join the parts with `bctool merge`.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of skipping it (skipped images are listed in OUT.failed.tsv).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from OUT.partial (its progress is saved every 30 s and on errors or Ctrl-C).")] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="An adapter (`bctool adapt`) fitted on this model's embeddings: write the rows mapped into its target space (the model's own rows go to OUT.unadapted.safetensors first, and stay there).")] = None,
    view: Annotated[Optional[str], typer.Option(callback=one_of("bctool.data.transforms", "TRAINING_VIEWS"), help="Embed a seeded augmented view of each image instead of the clean one (flip or crop, as `train --augment`): old embeddings of the very views a new model then trains on (`train --old-views`). View --view-index of an image is the same on every machine.", show_default=False)] = None,
    view_index: Annotated[int, typer.Option(callback=at_least(0), help="With --view: which view of each image (0, 1, ...); one file per view.")] = 0,
    view_seed: Annotated[int, typer.Option(callback=at_least(0), help="With --view: the seed the views are drawn from.")] = 0,
    dtype: Annotated[str, typer.Option(callback=one_of("bctool.embeddings", "DTYPES"), help="How the rows are stored: float32, or float16 (half the disk and memory; every reader scores in float32).")] = "float32",
    device: Device = "auto",
    workers: Workers = 2,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Embed images with a model; stream them into an embeddings file and print a JSON summary.

    Memory stays flat whatever the number of images. Images that cannot be read are skipped,
    counted and listed in OUT.failed.tsv (or stop the run with --strict).
    """
    from bctool.checkpoint import load_model
    from bctool.data import load_image_set
    from bctool.utils.device import resolve_device
    from bctool.extract import ExtractOptions, Shard, extract_to_file, unadapted_path

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
    checkpoint = load_model(model, device=resolve_device(device))
    if gnd is not None:
        from bctool.data.sources import image_set_from_names
        from bctool.evaluate.protocols.revisited.files import load_gnd

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
    options = ExtractOptions(batch_size=batch_size, workers=workers, shard=part, strict=strict, resume=resume,
                             view=stored_view, dtype=dtype)
    result = extract_to_file(images, checkpoint, raw, options=options, progress=RichProgress(not quiet))
    if result.failed and not quiet:
        stderr.print(f"[yellow]Skipped {len(result.failed)} unreadable images[/] (listed in {result.report}); "
                     "--strict stops at the first one instead.")
    summary = result.to_dict()
    if mapping is not None:
        from bctool.adapt import transform_file

        with output_lock(out):
            summary["adapter"] = transform_file(raw, mapping, out, progress=RichProgress(not quiet))["adapter"]
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
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the exported model (model.onnx, model.pt).")],
    format: Annotated[str, typer.Option("--format", "-f", callback=one_of("bctool.export", "FORMATS"), help="onnx (run it with onnxruntime; needs the export extra: pip install -e \".[export]\") or torchscript (torch.jit.load).")] = "onnx",
    normalize: Annotated[bool, typer.Option(help="Put the per-channel normalisation inside the model, so it takes RGB in [0, 1]; without it the input is already normalised, as the JSON says.")] = False,
    images: Annotated[Optional[Path], typer.Option(help="Images (a list file or folder) to check the exported model on (its first --check ones); default: seeded random images.")] = None,
    check: Annotated[int, typer.Option(callback=at_least(1), help="Images the exported model is checked on against `bctool extract`.")] = 8,
    tolerance: Annotated[float, typer.Option(callback=at_least(0.0), help="Largest allowed difference from `bctool extract`, relative to the embedding norm.")] = 1e-4,
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
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="Embeddings to convert, the format named by the suffix: .safetensors (a bctool file, or a shard-set folder or .txt manifest), .npy, .parquet or .faiss.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write, the format named by the suffix (.safetensors, .npy, .parquet, .faiss); .npy and .faiss get STEM.ids.txt and STEM.labels.txt beside them.")],
    ids: Annotated[Optional[Path], typer.Option(help="From .npy or .faiss: the ids, one a line in row order (default: SRC's STEM.ids.txt beside it).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="From .npy or .faiss: the label names, one a line, empty for unknown (default: STEM.labels.txt beside SRC, when there).")] = None,
    quiet: Quiet = False,
) -> None:
    """Convert embeddings between bctool files and .npy, parquet or a faiss index; print a JSON summary.

    Rows, ids and labels round-trip exactly (a faiss index holds the L2-normalised rows, as
    `bctool evaluate` searches them).
    """
    from bctool.convert import SIDECAR_SUFFIXES, beside
    from bctool.convert import convert as run_convert

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
        emit_json(run_convert(src, out, str(ids) if ids else None, str(labels) if labels else None,
                              progress=RichProgress(not quiet)))


@app.command()
@reports_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(metavar="PARTS", help="The part files of `bctool extract --shard I/N`, in any order.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the joined embeddings file (.safetensors).")],
    quiet: Quiet = False,
) -> None:
    """Join the parts of a sharded extraction into one embeddings file, in list order."""
    from bctool.embeddings import merge_shards

    FilePlan("merge").read("PARTS", list(parts)).write("--out", out, locked=True).check()
    with output_lock(out):
        result = merge_shards(list(parts), out, progress=RichProgress(not quiet))
    emit_json(result)


@app.command()
@reports_errors
def verify(
    stored: Annotated[Path, typer.Argument(metavar="STORED", help="A stored embeddings file whose rows a model should reproduce: bctool's format (or a shard set), or any format `bctool convert` reads (.npy with its ids beside it, .parquet, .faiss; these record no image root: give --data).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="The model that should have made STORED: a checkpoint (`bctool train`, `bctool import`), or an ONNX or TorchScript file with its preprocessing recorded.")],
    data: Annotated[Optional[Path], typer.Option(help="A list file or folder naming the images behind STORED, by the same ids (default: found under the file's recorded root; an id is the image path without its extension).")] = None,
    sample: Annotated[int, typer.Option(callback=at_least(1), help="Rows re-embedded, drawn at random (all when STORED has fewer).")] = 1000,
    threshold: Annotated[float, typer.Option(help="Each re-embedded row's cosine to its stored row must be at least this; otherwise exit 1.")] = 0.99,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    device: Device = "auto",
    workers: Workers = 2,
    quiet: Quiet = False,
) -> None:
    """Re-embed a sample of the images behind a stored embeddings file and compare each row with
    its stored row (cosine): the check that a model and its preprocessing reproduce an old
    system's embeddings, before training against them, and after any upgrade. Prints the cosines'
    minimum, mean and quantiles and the worst rows; exits 1 when a row is below --threshold. Then
    the worst rows are re-embedded with one preprocessing step changed at a time, and the changes
    that bring them closer are named (as `bctool import` options)."""
    from bctool.utils.device import resolve_device
    from bctool.verify import VerifyOptions, recorded_root, verify_file

    plan = FilePlan("verify").read("STORED", stored).read("--model", model).read_data("--data", data)
    root = recorded_root(stored) if data is None else None
    if root and Path(root).is_dir():
        plan.read_data("STORED's recorded root", root)  # the images are found under it
    plan.check()
    options = VerifyOptions(sample=sample, threshold=threshold, seed=seed, workers=workers)
    report = verify_file(stored, model, options, data, RichProgress(not quiet), device=str(resolve_device(device)))
    if not quiet:
        print_verdict(report, threshold)
    emit_json(report)
    if not report["passed"]:
        raise typer.Exit(1)


def print_verdict(report: dict, threshold: float) -> None:
    """`verify`'s one-line verdict on stderr, and the preprocessing change that would fix it."""
    verdict = "reproduced" if report["passed"] else f"{report['below_threshold']} rows below {threshold}"
    stderr.print(f"{report['checked']} rows re-embedded: cosine min {report['min']:.5f}, mean {report['mean']:.5f}; "
                 f"{verdict}", highlight=False, markup=False)
    for change in report.get("diagnosis", [])[:3]:
        stderr.print(f"  with {change['change']}: cosine min {change['min']:.5f}, mean {change['mean']:.5f}"
                     f"{' (passes)' if change['passes'] else ''}", highlight=False, markup=False)
