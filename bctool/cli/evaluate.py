"""`bctool evaluate` (retrieval quality, the compatibility report, chains, partial backfill, the
release gate) and `bctool backfill plan`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bctool.cli.app import app, backfill_app
from bctool.cli.errors import reports_errors
from bctool.cli.options import (
    QuietAccepted,
    PanelCommand,
    Quiet,
    at_least,
    name_values,
    one_of,
    output_file,
    seed_range,
)
from bctool.cli.output import (
    delta_line,
    emit_json,
    metrics_table,
    setup_logging,
    stderr,
)
from bctool.utils.files import FilePlan
from bctool.utils.io import output_lock

if TYPE_CHECKING:
    from bctool.evaluate.protocols import Protocol, Table


def _pair(text: str) -> tuple[Path, Path]:
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter(f"{text!r} is not QUERY,GALLERY (two embeddings files separated by a comma)")
    return Path(parts[0]), Path(parts[1])


@app.command(cls=PanelCommand)
@reports_errors
def evaluate(
    pairs: Annotated[Optional[list[str]], typer.Argument(metavar="QUERY,GALLERY", rich_help_panel="Model chain", help="With --chain: one QUERY,GALLERY pair of embeddings files per model version, oldest first.", show_default=False)] = None,
    query: Annotated[Optional[Path], typer.Option("--query", rich_help_panel="Queries and gallery", help="Query embeddings file (from `bctool extract`); with --backfill, the new model's queries.")] = None,
    gallery: Annotated[Optional[Path], typer.Option("--gallery", rich_help_panel="Queries and gallery", help="Gallery embeddings file; may be the query file itself (self matches are skipped).")] = None,
    old_query: Annotated[Optional[Path], typer.Option(rich_help_panel="Compatibility report", help="Compatibility report: the old model's queries (with --backfill: for the old/old reference line).")] = None,
    old_gallery: Annotated[Optional[Path], typer.Option(rich_help_panel="Compatibility report", help="Compatibility report and --backfill: the old model's gallery.")] = None,
    new_query: Annotated[Optional[Path], typer.Option(rich_help_panel="Compatibility report", help="Compatibility report: the new model's queries.")] = None,
    new_gallery: Annotated[Optional[Path], typer.Option(rich_help_panel="Compatibility report", help="Compatibility report and --backfill: the new model's gallery (the same images).")] = None,
    independent_query: Annotated[Optional[Path], typer.Option(rich_help_panel="Compatibility report", help="Compatibility report: queries of a new model trained without compatibility (M(*,*)).")] = None,
    independent_gallery: Annotated[Optional[Path], typer.Option(rich_help_panel="Compatibility report", help="Compatibility report: that independent model's gallery.")] = None,
    chain: Annotated[bool, typer.Option("--chain", rich_help_panel="Model chain", help="Evaluate every model version against every other: the matrix M[i][j] and AC/BC (pass the QUERY,GALLERY pairs as arguments).")] = False,
    backfill: Annotated[Optional[str], typer.Option(rich_help_panel="Partial backfill", help="Partial backfill: comma-separated fractions of the gallery re-embedded by the new model, e.g. 0,0.25,0.5,0.75,1.")] = None,
    seed: Annotated[int, typer.Option(callback=seed_range, rich_help_panel="Run", help="Seed of the random order in which --backfill re-embeds the gallery, and of the compatibility report's --bootstrap resamples.")] = 0,
    bootstrap: Annotated[int, typer.Option(callback=at_least(0), rich_help_panel="Compatibility report", help="Compatibility report: resamples of the queries (paired, with replacement) for the 95% bootstrap interval of delta = M(n,o) - M(o,o); 0 turns the interval off.")] = 1000,
    plot: Annotated[Optional[Path], typer.Option(parser=output_file, rich_help_panel="Partial backfill", help="With --backfill: draw the curve to this file, PNG, SVG or PDF by its suffix (needs matplotlib).")] = None,
    order: Annotated[Optional[Path], typer.Option(rich_help_panel="Partial backfill", help="With --backfill: re-embed the gallery in this order (a plan from `bctool backfill plan`) instead of a random one.")] = None,
    backfill_scoring: Annotated[str, typer.Option(callback=one_of("bctool.backfill.curve", "SCORINGS"), rich_help_panel="Partial backfill", help="With --backfill: raw (both models' cosines in one ranking) or calibrated (the old rows' cosines put on the new model's scale, fitted on the rows re-embedded so far).")] = "raw",
    top_k: Annotated[Optional[int], typer.Option(callback=at_least(1), rich_help_panel="Protocol and search", help="Rank only the top K gallery items per query (default: the whole gallery); relevant items below K count as missed.")] = None,
    gnd: Annotated[Optional[Path], typer.Option(rich_help_panel="Protocol and search", help="Revisited Oxford/Paris ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl): report mAP and mP@k for the Easy, Medium and Hard protocols; rows are matched to the image names by id stem.")] = None,
    solution: Annotated[Optional[Path], typer.Option(rich_help_panel="Protocol and search", help="GLDv2 retrieval_solution_v2.1.csv: report mAP@100 for the Public and Private queries and both together.")] = None,
    qrels: Annotated[Optional[Path], typer.Option(rich_help_panel="Protocol and search", help="Relevance judgments in the TREC qrels layout (QUERY_ID 0 DOC_ID RELEVANCE, graded; ids are embedding ids or file stems): report trec_eval's map, ndcg@10, p@10, recall@100 and mrr@10 over the judged queries (the others are counted and left out), ranking --top-k documents a query (default 1000).")] = None,
    run_file: Annotated[Optional[Path], typer.Option(parser=output_file, rich_help_panel="Protocol and search", help="Also write the search of --query against --gallery as a TREC run file (QUERY_ID Q0 DOC_ID RANK SCORE TAG; --top-k results a query, default 1000), for trec_eval or ir-measures.")] = None,
    truth: Annotated[Optional[list[str]], typer.Option("--truth", rich_help_panel="Protocol and search", help="The ground truth of any registered protocol as OPTION=PATH, repeatable: --truth gnd=FILE is --gnd FILE; a protocol added to bctool.evaluate.protocols is reached this way with no other change.")] = None,
    index: Annotated[str, typer.Option(callback=one_of("bctool.evaluate.search", "INDEX_KINDS"), rich_help_panel="Protocol and search", help="Gallery index: flat (exact, default), ivf or hnsw (approximate, for very large galleries; ties then lose their fixed order).")] = "flat",
    nprobe: Annotated[int, typer.Option(callback=at_least(1), rich_help_panel="Protocol and search", help="With --index ivf: inverted lists visited per query.")] = 32,
    ef_search: Annotated[int, typer.Option(callback=at_least(1), rich_help_panel="Protocol and search", help="With --index hnsw: search breadth per query.")] = 128,
    changes: Annotated[bool, typer.Option("--changes", rich_help_panel="Compatibility report", help="Add what the upgrade changes for each query, with no judgment needed: top-k overlap, rank-biased overlap and the share of changed first results of new/old (and new/new) against old/old (k: --top-k, default 10), and the identity check (each new gallery embedding searched among the old ones: the rank of its own old embedding); each with a bootstrap interval, keys usable by --require (top1_changed, overlap@10, rbo, identity_top1...; new/new with _new_new).")] = False,
    label_free: Annotated[bool, typer.Option("--label-free", rich_help_panel="Compatibility report", help="Only what --changes reports, from --old-query, --old-gallery, --new-query (and --new-gallery): for a gallery without labels or judgments. Says how much changes, not whether it got better.")] = False,
    require: Annotated[Optional[list[str]], typer.Option("--require", callback=_requirements, rich_help_panel="Release gate", help="A release gate (repeatable): KEY (a yes/no figure that must hold, e.g. compatible_significant) or KEY OP NUMBER with OP one of <= >= < > == != (e.g. 'nfr<=0.05', 'delta>=0.01'); keys are the report's numbers and, in a compatibility report, nfr, pfr (new/old) and nfr_new_new, pfr_new_new. The JSON gains 'requirements'; any failure exits with code 3.")] = None,
    quiet: Quiet = False,
) -> None:
    """Retrieval quality of queries against a gallery, a compatibility report, a model chain or
    a partial backfill; print one JSON object.

    Relevance: the same label name, with --gnd / --solution the benchmark's ground truth, or
    with --qrels relevance judgments (TREC qrels).
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
    plan.read("--gnd", gnd).read("--solution", solution).read("--qrels", qrels)
    plan.read("--truth", list(_truth_files(truth).values())).read("--order", order)
    plan.write("--plot", plot, locked=True).write("--run-file", run_file, locked=True).check()
    if changes and not (old_query or new_query) or label_free and (chain or backfill is not None):
        raise typer.BadParameter("--changes adds to a compatibility report and --label-free replaces it: pass "
                                 "--old-query, --old-gallery and --new-query (not --chain or --backfill)")
    if run_file is not None and (chain or pairs or backfill is not None or old_query or new_query):
        raise typer.BadParameter("--run-file writes the search of --query against --gallery; it does not apply to "
                                 "a compatibility report, --chain or --backfill (evaluate each pair on its own)")
    if plot is not None:
        from bctool.utils.plotting import plot_format

        plot_format(plot)
    truths = {"gnd": gnd, "solution": solution, "qrels": qrels, **_truth_files(truth)}
    protocol = make_protocol(top_k=top_k, index=index, nprobe=nprobe, ef_search=ef_search, **truths)
    if chain:
        report = _evaluate_chain(pairs or [], protocol, quiet)
    elif pairs:
        raise typer.BadParameter("QUERY,GALLERY arguments are only for --chain")
    elif backfill is not None:
        report = _evaluate_backfill({"query": query, "old-query": old_query, "old-gallery": old_gallery,
                                     "new-gallery": new_gallery, "order": order}, backfill, seed, plot, protocol, quiet,
                                    backfill_scoring)
    elif label_free:
        report = _evaluate_changes({"old": (old_query, old_gallery), "new": (new_query, new_gallery)},
                                   top_k, bootstrap, seed, quiet)
    elif old_query or new_query:
        report = _evaluate_compatibility(
            {"old": (old_query, old_gallery), "new": (new_query, new_gallery),
             "independent": (independent_query, independent_gallery)}, protocol, bootstrap, seed, quiet)
        if changes:
            report["changes"] = _evaluate_changes({"old": (old_query, old_gallery), "new": (new_query, new_gallery)},
                                                  top_k, bootstrap, seed, quiet)["changes"]
    else:
        if query is None or gallery is None:
            raise typer.BadParameter("pass --query and --gallery (or a compatibility report, --chain or --backfill)")
        # The gallery is read memory-mapped: a million rows need not fit twice in memory.
        query_emb, gallery_emb = load_embeddings(query), load_embeddings(gallery, mmap=True)
        metrics = protocol.evaluate(query_emb, gallery_emb)
        if not quiet:
            _print_table(protocol.table(f"{query.name} -> {gallery.name}", metrics))
        report = {"query_file": str(query), "gallery_file": str(gallery), **metrics}
        if run_file is not None:
            from bctool.evaluate.protocols.qrels.files import write_run

            with output_lock(run_file):
                lines = write_run(run_file, query_emb, gallery_emb, top_k or 1000)
            report["run_file"] = {"path": str(run_file), "lines": lines}
    _emit_gated(report, require or [], quiet)


DEFAULT_POLICY = "norm"  # bctool.backfill.policies.DEFAULT_POLICY, without importing numpy for --help
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
            name_values("--truth", pairs, "OPTION=PATH, e.g. gnd=gnd_roxford5k.pkl").items()}


def _evaluate_compatibility(files: dict, protocol: Protocol, bootstrap: int, seed: int, quiet: bool) -> dict:
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.reports import (
        CompatibilityOptions,
        compatibility_report,
        compatibility_table,
    )
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
        stderr.print(delta_line(report, DEFAULT_LEVEL), markup=False, highlight=False)
        flips = report["flips"].get("new/old")
        if flips:
            stderr.print(f"negative flips at rank 1 (new/old against old/old): {flips['nfr_count']} of {flips['queries']} "
                         f"queries ({100 * flips['nfr']:.1f}%), positive flips {flips['pfr_count']}",
                         markup=False, highlight=False)
    return report


def _evaluate_changes(files: dict, top_k: int | None, bootstrap: int, seed: int, quiet: bool) -> dict:
    """The label-free change report (:mod:`bctool.evaluate.changes`) as ``{"changes": ...}``."""
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.changes import ChangeOptions, change_report

    (old_q, old_g), (new_q, new_g) = files["old"], files["new"]
    if None in (old_q, old_g, new_q):
        raise typer.BadParameter("--label-free and --changes need --old-query, --old-gallery and --new-query "
                                 "(and --new-gallery for new/new)")
    options = ChangeOptions(k=top_k or 10, bootstrap=bootstrap, seed=seed)
    report = change_report((load_embeddings(old_q), load_embeddings(old_g, mmap=True)),
                           (load_embeddings(new_q), load_embeddings(new_g, mmap=True) if new_g else None), options)
    if not quiet:
        rows = {pair: {key: report[pair][key] for key in (f"overlap@{report['k']}", "rbo", "top1_changed", "queries")}
                for pair in ("new/old", "new/new") if pair in report}
        stderr.print(metrics_table("what changes for each query, against old/old", rows,
                                   [f"overlap@{report['k']}", "rbo", "top1_changed", "queries"]))
        identity = report["identity"]
        stderr.print(f"identity: {100 * identity['identity_top1']:.1f}% of {identity['identity_images']} images find "
                     f"their own old embedding first (MRR {identity['identity_mrr']:.3f})", markup=False, highlight=False)
    return {"changes": report}


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
    from bctool.backfill.plan import read_plan
    from bctool.embeddings import load_embeddings
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


@backfill_app.command("plan")
@reports_errors
def backfill_plan(
    old_gallery: Annotated[Path, typer.Argument(metavar="OLD_GALLERY", help="The old model's gallery embeddings (the ids to re-embed).")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_file, help="The plan to write: one gallery id a line with its batch number (ID<TAB>BATCH).")],
    policy: Annotated[str, typer.Option(callback=one_of("bctool.backfill.policies", "POLICIES"), help="The order: norm (smallest old embeddings first; the default), random, crowded (old rows closest to another first) or disagreement (rows predicted to differ most between the models first; needs --new-sample); `bctool list backfill-policies`.")] = DEFAULT_POLICY,
    new_sample: Annotated[Optional[Path], typer.Option(help="The new model's embeddings of a sample of the gallery's images (same ids).")] = None,
    batch: Annotated[int, typer.Option(callback=at_least(0), help="Ids a batch (0: one batch), so a backfill runs, stops and resumes batch by batch.")] = 0,
    seed: Annotated[int, typer.Option(callback=seed_range, help="Seed of the random policy.")] = 0,
    # Instant, it draws nothing on stderr: -q is accepted (scripts pass it everywhere), hidden from the help.
    quiet: QuietAccepted = False,
) -> None:
    """Write the order in which to re-embed a gallery with the new model (JSON summary);
    `bctool evaluate --backfill ... --order PLAN` measures its curve."""
    from bctool.backfill.plan import write_plan
    from bctool.backfill.policies import POLICIES

    if new_sample is not None and not POLICIES.entry(policy).declares.get("needs_sample"):
        users = [e.name for e in POLICIES.entries() if e.declares.get("needs_sample")]
        raise typer.BadParameter(f"--new-sample is read only by the {', '.join(users)} policy; the {policy} policy "
                                 "orders by the old gallery alone: drop --new-sample, or pass --policy disagreement")

    (FilePlan("backfill plan").read_embeddings("OLD_GALLERY", old_gallery).read_embeddings("--new-sample", new_sample)
     .write("--out", out, locked=True).check())
    with output_lock(out):
        emit_json(write_plan(old_gallery, out, policy, batch, new_sample, seed))
