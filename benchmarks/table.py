"""The tables of the stored benchmark results, for the results pages.

    python benchmarks/table.py                     # reads docs/benchmarks/*.json, writes table.md and eval-scale.md there
    python benchmarks/table.py --results DIR

Each JSON file is one run of a benchmark with ``--out`` (``benchmarks/_common.py::save_result``):
its figures, the command, the revision of the bctool code it ran and whether that code had
changes (``clean``), and the machine (CPU, cores, memory, torch, torch threads, and the load
average when it ended: the development machine is shared, and other work slows a benchmark
down). ``table.md`` has one row per file; ``eval-scale.md`` the gallery sizes of
``eval_scale.py``, row by row.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks"


def _train_step(r: dict) -> str:
    m = r["median_step_ms"]
    return (f"`{r['arch']}`, {r['image_size']} px, batch {r['batch_size']}, {r['timed_steps_per_task']} timed steps a task; "
            f"median step: `independent` {m['independent']:.1f} ms, `advbct` with precomputed old embeddings "
            f"{m['advbct_old_embeddings']:.1f} ms ({r['compat_overhead_pct']:+.1f}% over `independent`), `advbct` with the "
            f"old model run every step {m['advbct_old_model']:.1f} ms ({r['old_model_over_old_embeddings']:.2f}x the "
            f"precomputed step)")


def _loss_vectorised(r: dict) -> str:
    lo, st = r["loss_fwd_bwd_ms"], r["old_stats_ms"]
    return (f"batch {r['batch']:,}, {r['classes']:,} classes, D = {r['dim']}: values and gradients equal "
            f"({'yes' if r['values_match'] else 'no'}); loss forward + backward {lo['vectorised']:.2f} vs "
            f"{lo['loop']:.2f} ms ({r['loss_speedup']}x); old statistics over {r['old_embeddings']:,} embeddings "
            f"{st['vectorised']:.1f} vs {st['loop']:.1f} ms ({r['old_stats_speedup']}x)")


def _extract_throughput(r: dict) -> str:
    parts = []
    for key, t in r["throughput"].items():
        ips = t["images_per_s"]
        parts.append(f"`{key}` over {t['images']:,} images: `extract` {ips['extract_workers2']:,.0f} images/s at "
                     f"`workers=2` and {ips['extract_workers0']:,.0f} at `workers=0`, bare forward "
                     f"{ips['forward_only']:,.0f}, decoding alone {ips['decode_only_workers0']:,.0f}: ratios "
                     f"{t['extract_w2_over_forward']:.2f} and {t['extract_w0_over_forward']:.2f}")
    for key, rows in r["peak_rss"].items():
        counts = sorted((k for k in rows if k.isdigit()), key=int)
        figures = ", ".join(f"{int(n):,} images: +{rows[n]['growth_during_extract_mib']:.1f} MiB "
                            f"(peak {rows[n]['peak_rss_during_extract_mib']:.1f} MiB, {rows[n]['embeddings_written_mib']:.1f} MiB "
                            f"written)" for n in counts)
        parts.append(f"memory of `extract` (`{key}`, `workers=0`) over the process before it: {figures}")
    return "; ".join(parts)


def _adapt_fit(r: dict) -> str:
    fits = ", ".join(f"{kind} {f['seconds']:.1f} s (held-out cosine {f['held_out_cosine']:.3f}, peak RSS "
                     f"{f['peak_rss_mib']:,} MiB)" for kind, f in r["fit"].items())
    t = r["transform"]
    return (f"fit on {r['pairs']:,} pairs of {r['dim']}-d rows: {fits}; `transform` ({t['kind']}) of a "
            f"{t['rows']:,}-row gallery ({t['gallery_mib']:,} MiB): {t['seconds']:.1f} s, {t['rows_per_s']:,} rows/s, "
            f"peak RSS {t['peak_rss_mib']:,} MiB, {t['over_mib']:,} MiB over the process before it "
            f"({t['over_gallery_ratio']:.2f} of the gallery's size)")


def _eval_scale(r: dict) -> str:
    parts = []
    for run in r["runs"]:
        for index in ("flat", "ivf"):
            if index in run:
                x = run[index]
                parts.append(f"{run['gallery']:,} rows, {index}: `evaluate_retrieval` {x['evaluate_s']:.2f} s against a "
                             f"bare faiss search {x['bare_faiss_s']:.2f} s (ratio {x['ratio']:.2f})")
    return "; ".join(parts) + " (table: `eval-scale.md`)"


def _train_amp(r: dict) -> str:
    rates = ", ".join(f"{amp} {ips:,.1f} images/s ({r['over_off'][amp]:.2f}x)" for amp, ips in r["images_per_s"].items())
    return f"`{r['arch']}`, {r['image_size']} px, batch {r['batch_size']}, on {r['device']}: {rates}"


def _jpeg_decode(r: dict) -> str:
    ips, d, x = r["images_per_second"], r["difference"], r["extraction"]
    lo, hi = r["shorter_side_px"]
    return (f"{r['photos']} photos, shorter side {lo:,}-{hi:,} px, at {r['size']} px: decode + transform, reduced-scale "
            f"decode vs full, extraction's {ips['eval_draft']:.1f} vs {ips['eval_full']:.1f} images/s "
            f"({r['speedup_eval']:.2f}x), training's ({r['train_source_side']} px decode) {ips['train_draft']:.1f} vs "
            f"{ips['train_full']:.1f} images/s ({r['speedup_train']:.2f}x); what the reduced decode changes: the input by "
            f"{d['draft']['tensor_mean_abs']:.4f} on average (normalised units; a re-save at JPEG quality 90: "
            f"{d['resaved_q90']['tensor_mean_abs']:.4f}), a seeded `{r['arch']}`'s embedding by a mean cosine distance of "
            f"{d['draft']['embedding_cosine_distance_mean']:.4f} (max {d['draft']['embedding_cosine_distance_max']:.4f}; "
            f"the re-save: {d['resaved_q90']['embedding_cosine_distance_mean']:.4f}); `extract` vs bare forward "
            f"(`{r['arch']}`): {x['extract']:.2f} vs {x['bare']:.2f} images/s, ratio {x['ratio']:.2f}")


def _generic(r: dict) -> str:
    return "`" + json.dumps(r, separators=(", ", ": "))[:400] + "`"


FORMAT: dict[str, Callable[[dict], str]] = {
    "train_step": _train_step, "loss_vectorised": _loss_vectorised, "extract_throughput": _extract_throughput,
    "adapt_fit": _adapt_fit, "eval_scale": _eval_scale, "train_amp": _train_amp, "jpeg_decode": _jpeg_decode,
}


def _machine(record: dict) -> str:
    m = record["machine"]
    load = "/".join(f"{x:.1f}" for x in m["load_average"]) if m.get("load_average") else "?"
    device = f", {m['cuda']}" if m.get("cuda") else ", no GPU"
    return (f"{m['cpus']} x {m['cpu']}, {m['memory_gib']:.0f} GiB{device}; torch {m['torch']}, {m['torch_threads']} threads; "
            f"load {load}")


def _revision(record: dict) -> str:
    rev = (record.get("revision") or "unknown")[:7]
    return rev if record.get("clean") else f"{rev} (with changes)"


def load(results: Path) -> list[dict[str, Any]]:
    """Every stored benchmark run in ``results``, by file name."""
    return [{**json.loads(p.read_text()), "file": p.name} for p in sorted(results.glob("*.json"))]


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | command | figures | bctool revision | machine (load average at the end: 1/5/15 min) |",
             "| --- | --- | --- | --- | --- |"]
    for record in records:
        figures = FORMAT.get(record["benchmark"], _generic)(record["result"])
        lines.append(f"| [`{record['file']}`](../benchmarks/{record['file']}) | `{record['command']}` | {figures} | {_revision(record)} "
                     f"| {_machine(record)} |")
    return "\n".join(lines) + "\n"


def eval_scale_table(records: list[dict[str, Any]]) -> str | None:
    rows = [(record, run) for record in records if record["benchmark"] == "eval_scale" for run in record["result"]["runs"]]
    if not rows:
        return None
    lines = ["| gallery | index | file | bare faiss | `evaluate_retrieval` | ratio | peak RSS: bare / evaluate | mAP | run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for record, run in rows:
        for index in ("flat", "ivf"):
            if index not in run:
                continue
            x = run[index]
            lines.append(f"| {run['gallery']:,} x {run['dim']}, {run['dtype']}, {run['queries']:,} queries, k = {run['k']} "
                         f"| {index} | {run['file_gib']:.2f} GiB | {x['bare_faiss_s']:.2f} s | {x['evaluate_s']:.2f} s "
                         f"| {x['ratio']:.2f} | {x['bare_faiss_peak_rss_mib']:,} / {x['evaluate_peak_rss_mib']:,} MiB "
                         f"| {100 * x['map']:.1f} | [`{record['file']}`](../benchmarks/{record['file']}), {_revision(record)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the stored JSON files")
    args = parser.parse_args()
    records = load(args.results)
    (args.results / "table.md").write_text(table(records))
    print(table(records))
    scale = eval_scale_table(records)
    if scale:
        (args.results / "eval-scale.md").write_text(scale)
        print(scale)


if __name__ == "__main__":
    main()
