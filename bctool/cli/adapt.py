"""`bctool adapt` and `bctool transform`: maps between two models' embedding spaces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bctool.cli.app import app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    Quiet,
    Verbose,
    at_least,
    name_values,
    one_of,
    output_file,
    seed_range,
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
def adapt(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="Embeddings of some images by the model whose space is mapped from (say the new model).")],
    target: Annotated[Path, typer.Argument(metavar="TARGET", help="Embeddings of the same images (paired by id) by the model whose space is mapped into (say the old model).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the adapter (.safetensors).")],
    kind: Annotated[str, typer.Option(callback=one_of("bctool.adapt.maps", "ADAPTERS"), help="The map: procrustes (orthogonal), affine (ridge least squares) or mlp (affine plus a residual MLP, trained on the cosine and, with labels, the target's class centres); `bctool list adapters` shows each one's parameters.")] = "affine",
    params: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="A parameter of the kind as NAME=VALUE (repeatable), e.g. --param ridge=0.01.")] = None,
    holdout: Annotated[float, typer.Option(help="Share of the pairs held out of the fit to report it (cosine, and retrieval mAP where labels exist); 0 fits on all.")] = 0.1,
    seed: Annotated[int, typer.Option(callback=seed_range, help="Seed of the held-out pairs and of the MLP's training.")] = 0,
    max_pairs: Annotated[int, typer.Option(callback=at_least(2), help="Use at most this many pairs (a seeded sample; only their rows are read), so a gallery of any size fits in bounded memory.")] = 1_000_000,
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
                              name_values("--param", params, "NAME=VALUE"), holdout=holdout, seed=seed,
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
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="Where to write the mapped embeddings (.safetensors).")],
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
                                blend_weight=0.5 if blend_weight is None else blend_weight,
                                progress=RichProgress(not quiet))
    emit_json(result)
