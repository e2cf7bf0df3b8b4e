"""Which backfill order, and which scoring of the mixed gallery: curves over seeds.

    python experiments/backfill_policies.py --workdir runs/paper                # seeds 0 1 2
    python experiments/backfill_policies.py --report-only

For the compatible-training recipe's new models of the paper table (``lce``, warm start, clean
views: ``extended-class-warm`` on emoji, ``extended-data-fashion-warm`` on Fashion-MNIST; trained
by ``paper_table.py`` in ``--workdir``) it re-embeds the old gallery in the order of every
backfill policy (``bctool backfill plan``; the ``disagreement`` policy gets the new model's
embeddings of a seeded 5% sample of the gallery) and scores the mixed gallery raw and calibrated,
at every tenth of the gallery. Per curve: its area (the mean mAP over the share re-embedded,
trapezoids), and its lowest point against the 0% point (no re-embedding). One JSON per setting
and seed; the table in ``RESULTS/../table.md``.

Each curve in a run file also keeps the area of the random order with the same scoring and seed
(``random_area``, ``area_minus_random``) and every query's own area (``per_query_area``: the mean
over the share re-embedded of that query's AP, in query-id order, 6 decimals; the curve's area is
their mean), with a sha256 of the query ids (``per_query_ids_sha256``): a policy's paired
difference to random per query, the input of a test over seeds and queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path

import numpy as np

from bctool.backfill import POLICIES, SCORINGS, plan_order, sample_pairs
from bctool.embeddings import Embeddings, load_embeddings
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.reports import BackfillOptions, backfill_report
from bctool.workflow import ids_digest, rounded, run_record, write_run

log = logging.getLogger("backfill_policies")
SETTINGS = {"extended-class-warm": "emoji", "extended-data-fashion-warm": "Fashion-MNIST"}
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
SAMPLE = 0.05



def run(workdir: Path, results: Path, setting: str, seed: int) -> dict | None:
    """Every order with each scoring for one setting and seed, from the paper table's recipe and
    old models in ``workdir`` (cached as JSON in ``results``)."""
    cache = results / setting / f"seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    found = sorted((workdir / setting).glob(f"seed{seed}-old{seed + 1000}-e*-lr0.03-none/lce_query.safetensors"))
    old_dirs = sorted((workdir / "old").glob(f"*-old_train-small-e*-seed{seed + 1000}"))
    dataset = "emoji" if setting.startswith("extended-class") else "fashion-mnist"
    old_dirs = [d for d in old_dirs if d.name.startswith(dataset) and "-paper" not in d.name and "-noaug" not in d.name]
    if not found or not old_dirs:
        log.warning("skipping %s seed %d: no recipe model or old model in %s", setting, seed, workdir)
        return None
    query = load_embeddings(found[0])
    new_gallery = load_embeddings(found[0].with_name("lce_gallery.safetensors"))
    old_gallery = load_embeddings(old_dirs[0] / "old_gallery.safetensors")
    old_query = load_embeddings(old_dirs[0] / "old_query.safetensors")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(new_gallery), max(8, int(SAMPLE * len(new_gallery))), replace=False))
    sample = Embeddings(np.asarray(new_gallery.embeddings[picked]), new_gallery.labels[picked],
                        [new_gallery.ids[i] for i in picked], new_gallery.label_names, model=new_gallery.model)
    sample_pairs(old_gallery, sample)  # checks the ids
    protocol = make_protocol()
    recorded: list = []  # every evaluation's per-query AP, in call order

    def evaluate(q: Embeddings, g: Embeddings) -> dict:
        metrics, ap = protocol.per_query(q, g)
        recorded.append(ap)
        return metrics

    recording = dataclasses.replace(protocol, evaluate=evaluate)
    row = {"setting": setting, "seed": seed, "fractions": list(FRACTIONS), "curves": {}}
    ids = None
    for policy in POLICIES.names():
        order = tuple(plan_order(old_gallery, policy, sample, seed))
        for scoring in SCORINGS:
            recorded.clear()
            report = backfill_report(query, old_gallery, new_gallery, recording,
                                     BackfillOptions(FRACTIONS, seed=seed, order=order, scoring=scoring),
                                     old_query=old_query)
            maps = [p["map"] for p in report["curve"]]
            per_query = _per_query_area(recorded[: len(FRACTIONS)], report["area"])
            if ids is None:
                ids = recorded[0].ids
            elif recorded[0].ids != ids:
                raise SystemExit(f"{setting} seed {seed} {policy}/{scoring}: other query ids than the first curve's")
            row["curves"][f"{policy}/{scoring}"] = {"map": maps, "area": report["area"],
                                                    "lowest_minus_start": min(maps) - maps[0],
                                                    "per_query_area": rounded(per_query)}
            row["m_oo"], row["m_nn"] = report["m_oo"], report["m_nn"]
            log.info("%s seed %d %s/%s: area %.4f, lowest - start %+.4f", setting, seed, policy, scoring,
                     report["area"], min(maps) - maps[0])
    for key, curve in row["curves"].items():  # the random order of the same scoring and seed
        curve["random_area"] = row["curves"][f"random/{key.split('/')[1]}"]["area"]
        curve["area_minus_random"] = curve["area"] - curve["random_area"]
    row["per_query_ids_sha256"] = ids_digest(ids)
    row = run_record(**row)
    write_run(cache, row)
    return row


def _per_query_area(aps: list, area: float) -> np.ndarray:
    """Every query's area (the trapezoid mean of its AP over the fractions, as the curve's area
    is of mAP); their mean is ``area`` (checked)."""
    if len(aps) != len(FRACTIONS) or any(ap.ids != aps[0].ids for ap in aps):
        raise SystemExit("the backfill curve's points evaluate other queries")
    points = np.stack([np.asarray(ap.ap, dtype=np.float64) for ap in aps])  # fractions x queries
    f = np.asarray(FRACTIONS, dtype=np.float64)
    per_query = ((f[1:] - f[:-1])[:, None] * (points[1:] + points[:-1]) / 2).sum(axis=0) / (f[-1] - f[0])
    if abs(float(per_query.mean()) - area) > 1e-9:
        raise SystemExit(f"the per-query areas average {per_query.mean()}, the curve's area is {area}")
    return per_query


def report(rows: list[dict]) -> str:
    out = []
    for setting, title in SETTINGS.items():
        runs = [r for r in rows if r["setting"] == setting]
        if not runs:
            continue
        keys = list(runs[0]["curves"])
        random_area = {r["seed"]: r["curves"]["random/raw"]["area"] for r in runs}
        lines = [f"**{title}, the recipe's model** (seeds {[r['seed'] for r in runs]}; M(o,o) "
                 f"{100 * statistics.fmean(r['m_oo'] for r in runs):.1f}, M(n,n) "
                 f"{100 * statistics.fmean(r['m_nn'] for r in runs):.1f}); mAP % mean over seeds", "",
                 "| order / scoring | " + " | ".join(f"{int(100 * f)}%" for f in FRACTIONS) +
                 " | area | area - random/raw (per seed) | lowest - 0% point (worst seed) |",
                 "| --- | " + " | ".join("---" for _ in FRACTIONS) + " | --- | --- | --- |"]
        for key in keys:
            curves = [r["curves"][key] for r in runs]
            mean_curve = np.mean([c["map"] for c in curves], axis=0)
            gains = [r["curves"][key]["area"] - random_area[r["seed"]] for r in runs]
            lines.append(f"| {key} | " + " | ".join(f"{100 * v:.1f}" for v in mean_curve) +
                         f" | {100 * statistics.fmean(c['area'] for c in curves):.2f} | "
                         + ", ".join(f"{100 * g:+.2f}" for g in gains) +
                         f" | {100 * min(c['lowest_minus_start'] for c in curves):+.2f} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="paper_table.py's --workdir")
    parser.add_argument("--results", type=Path, default=Path("docs/backfill/runs"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for setting in SETTINGS:
        for seed in args.seeds:
            cache = args.results / setting / f"seed{seed}.json"
            row = (json.loads(cache.read_text()) if cache.exists() else None) if args.report_only else run(args.workdir, args.results, setting, seed)
            if row is not None:
                rows.append(row)
    text = report(rows)
    (args.results.parent / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
