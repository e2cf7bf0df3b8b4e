"""`bctool demo`: a whole model upgrade on the embedded emoji set."""

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
    arch_choice,
    at_least,
    method_choice,
    seed_range,
)
from bctool.cli.output import (
    RichProgress,
    delta_line,
    emit_json,
    metrics_table,
    setup_logging,
    stderr,
)
from bctool.utils.files import FilePlan


@app.command()
@reports_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the dataset, models and embeddings (created in the current folder by default).")] = Path("bctool-demo"),
    method: Annotated[Optional[str], typer.Option(callback=method_choice, help="Compatibility method of the new model (default: the recommended one, as `bctool list methods` names it; any method of `bctool train --method`).", show_default=False)] = None,
    warm_start: Annotated[bool, typer.Option(help="Start the new model from the old one (--init-from) at learning rate 0.03, as the recommended recipe does; --no-warm-start trains it from scratch at 0.1.")] = True,
    published: Annotated[str, typer.Option(help="Also train this method in the AdvBCT authors' regime (--regime paper, from scratch: no ImageNet weights here) for comparison; none to skip.")] = "advbct",
    bootstrap: Annotated[int, typer.Option(callback=at_least(0), help="Resamples of the 95% bootstrap interval of M(n,o) - M(o,o) (0: no interval).")] = 1000,
    epochs: Annotated[int, typer.Option(callback=at_least(1), help="Epochs of every model.")] = 30,
    arch: Annotated[str, typer.Option(callback=arch_choice, help="Backbone of every model.")] = "small",
    image_size: Annotated[int, typer.Option(callback=at_least(8), help="Image side in pixels.")] = 32,
    limit: Annotated[Optional[int], typer.Option(callback=at_least(10), help="Use only the first N emoji classes (a quicker, smaller run).")] = None,
    device: Device = "auto",
    workers: Workers = 2,
    seed: Annotated[int, typer.Option(callback=seed_range, help="Random seed of the split, the training and the bootstrap.")] = 0,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run a whole model upgrade on the embedded emoji set: an old model, a new model with the
    recommended recipe, AdvBCT in the authors' regime (from scratch), and an independent new model.

    Prints M(o,o), M(n,n), M(n,o) and M(*,*) (the independent model), whether the new model is
    compatible, M(n,o) > M(o,o), and the bootstrap interval of the difference.
    """
    from bctool.demo import DemoConfig, run_demo, with_overrides
    from bctool.evaluate.protocols.labels import COLUMNS
    from bctool.evaluate.scores import DEFAULT_LEVEL

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
            f"compatible (M(n,o) > M(o,o)): {verdict}; {delta_line(summary, DEFAULT_LEVEL)}",
            highlight=False, markup=False,
        )
        if summary["published"]:
            ref = summary["published"]
            stderr.print(f"{ref['method']} in the paper's regime, from scratch: M(n,n) {100 * ref['M(n,n)']:.2f}  M(n,o) "
                         f"{100 * ref['M(n,o)']:.2f}, compatible: {'yes' if ref['compatible'] else 'no'}",
                         highlight=False, markup=False)
        k, changes = summary["changes"]["k"], summary["changes"]["new/old"]
        stderr.print(f"without labels (new/old against old/old, top {k}): overlap {100 * changes[f'overlap@{k}']:.1f}%, "
                     f"first result changed for {100 * changes['top1_changed']:.1f}% of queries; identity: "
                     f"{100 * summary['changes']['identity']['identity_top1']:.1f}% of gallery images find their own "
                     "old embedding first", highlight=False, markup=False)
        stderr.print(f"{summary['seconds']} s", highlight=False)
    emit_json(summary)
