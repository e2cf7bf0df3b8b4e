"""Is M(n,o) > M(o,o) shown over seeds? The tests of bctool.evaluate.seeds on paper-table runs.

    python scripts/seed_tests.py docs/paper/seeds5/runs            # writes tests.json and tests.md beside it
    python scripts/seed_tests.py --backfill docs/backfill/seeds5/runs   # each order's area over random
    python scripts/seed_tests.py --adapters docs/adapters/seeds5/runs   # each adapter's M(n,o) over M(o,o)

For every setting and method of ``experiments/paper_table.py``'s run files (one JSON per setting,
seed and method, each holding M(o,o), M(n,o) and the per-query AP of both), the seed
differences D_s = M_s(n,o) - M_s(o,o) go through the paired t test (the claim's test), the
random-effects estimate (each seed's variance of its mean difference over queries, s^2 / Q) and
the crossed seeds x queries estimate (the per-query differences of every seed, on the same
queries). Each method is also compared with ``independent`` of the same seeds (rows ``METHOD -
independent``: M(n,o) of the method minus M(n,o) of the independent model, both on the old
gallery). Figures in mAP points; the minimum detectable effect is the paired test's at 80% power.

``--adapters`` judges ``experiments/adapter_table.py``'s run files (one JSON per setting and seed):
every query adapter (alone and each blend), every gallery transform, and the recipe's model with
and without a gallery transform, each against M(o,o) on the same queries; and each gallery
transform of the recipe's model against the recipe's model alone (``... - recipe``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bctool.evaluate.scores import bootstrap_interval
from bctool.evaluate.seeds import crossed_test, paired_seed_test, random_effects

GATE_RESAMPLES = 1000  # the bootstrap of one run's release gate (bctool evaluate's default)
BASELINE = "independent"  # each method is also compared with it: the same start without a compatibility term


def collect(results: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """setting -> method -> seed -> run file, for every run file under ``results``."""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(results.glob("*/seed*/*.json")):
        row = json.loads(path.read_text())
        runs.setdefault(row["setting"], {}).setdefault(row["method"], {})[row["seed"]] = row
    return runs


def judge(by_seed: dict[int, dict], baseline: dict[int, dict] | None = None) -> dict:
    """The three tests of one setting and method, in mAP points, with what they ran on: of
    M(n,o) - M(o,o), or with ``baseline`` (another method's runs of the same seeds) of
    M(n,o) - M(baseline,o), the two new models' queries on the same old gallery."""
    seeds = sorted(by_seed)
    reference = {s: (baseline[s]["cross"] if baseline else by_seed[s]["old"]) for s in seeds}
    deltas = [100 * (by_seed[s]["cross"]["map"] - reference[s]["map"]) for s in seeds]
    report: dict = {"seeds": seeds, "deltas": [round(d, 3) for d in deltas],
                    "revisions": sorted({by_seed[s].get("revision") or "unknown" for s in seeds})}
    if len(seeds) < 2:
        return report
    report["paired"] = paired_seed_test(deltas).to_dict()
    with_queries = [s for s in seeds if "per_query" in by_seed[s]]
    if len(with_queries) == len(seeds) and len({by_seed[s]["per_query"]["ids_sha256"] for s in seeds}) == 1:
        against = "cross" if baseline else "old"
        table = np.array([np.subtract(by_seed[s]["per_query"]["cross"], (baseline or by_seed)[s]["per_query"][against])
                          for s in seeds]) * 100
        variances = table.var(axis=1, ddof=1) / table.shape[1]
        report["random_effects"] = random_effects(deltas, variances).to_dict()
        report["crossed"] = crossed_test(table).to_dict()
        report["queries"] = int(table.shape[1])
        if not baseline:  # what a user of one run sees: the release gate, its interval above 0
            lows = [bootstrap_interval(np.asarray(by_seed[s]["per_query"]["cross"]),
                                       np.asarray(by_seed[s]["per_query"]["old"]), GATE_RESAMPLES, s)[0] for s in seeds]
            report["gates"] = {"passed": sum(low > 0 for low in lows), "of": len(seeds),
                               "lows": [round(100 * low, 3) for low in lows]}
    return report


def collect_backfill(results: Path) -> dict[str, dict[int, dict]]:
    """setting -> seed -> run file of ``experiments/backfill_policies.py`` or
    ``experiments/adapter_table.py`` (one per setting and seed)."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(results.glob("*/seed*.json")):
        row = json.loads(path.read_text())
        runs.setdefault(row["setting"], {})[row["seed"]] = row
    return runs


def _tests(by_seed: dict[int, dict], deltas: list[float], table: np.ndarray | None) -> dict:
    """The paired t test of ``deltas`` (one per seed, in seed order) and, when every seed scored
    the same queries, the crossed estimate of ``table`` (seeds x queries differences)."""
    seeds = sorted(by_seed)
    report: dict = {"seeds": seeds, "deltas": [round(d, 3) for d in deltas],
                    "revisions": sorted({by_seed[s].get("revision") or "unknown" for s in seeds})}
    if len(seeds) >= 2:
        report["paired"] = paired_seed_test(deltas).to_dict()
        if table is not None:
            report["crossed"] = crossed_test(table).to_dict()
            report["queries"] = int(table.shape[1])
    return report


def judge_backfill(by_seed: dict[int, dict]) -> dict[str, dict]:
    """Each order's area over the random order's (same scoring, same seed), in mAP points: the
    paired t test over seeds, and the crossed estimate from every query's own area."""
    seeds = sorted(by_seed)
    same_queries = len({by_seed[s].get("per_query_ids_sha256") for s in seeds}) == 1
    judged: dict[str, dict] = {}
    for name in sorted({name for s in seeds for name in by_seed[s]["curves"]}):
        policy, scoring = name.split("/")
        if policy == "random" or any(name not in by_seed[s]["curves"] for s in seeds):
            continue
        against = f"random/{scoring}"
        deltas = [100 * by_seed[s]["curves"][name]["area_minus_random"] for s in seeds]
        table = (100 * np.array([np.subtract(by_seed[s]["curves"][name]["per_query_area"],
                                             by_seed[s]["curves"][against]["per_query_area"]) for s in seeds])
                 if same_queries else None)
        judged[f"{name} - {against}"] = _tests(by_seed, deltas, table)
    return judged


def adapter_figures(row: dict) -> dict[str, dict]:
    """Every scored figure of one adapter run: name -> its score (``map`` and ``per_query`` with
    ``old``, M(o,o)'s APs, and ``new``, the figure's own, in the same query order)."""
    out = {}
    for kind, entry in row["query_adapter"].items():
        for key, score in entry.items():
            out[f"query adapter {kind}, {key.replace('blend', 'blend ')}"] = score
    for kind, score in row["gallery_transform"].items():
        out[f"gallery transform {kind}"] = score
    if "recipe" in row:
        out["recipe"] = row["recipe"]["cross"]
        for kind, score in row["recipe"]["gallery_transform"].items():
            out[f"recipe + gallery transform {kind}"] = score
    return out


def judge_adapters(by_seed: dict[int, dict]) -> dict[str, dict]:
    """Each adapter figure against M(o,o), and each of the recipe's gallery transforms against the
    recipe's model alone, in mAP points, over the seeds that have it."""
    seeds = sorted(by_seed)
    figures = {s: adapter_figures(by_seed[s]) for s in seeds}
    names = [n for n in figures[seeds[0]] if all(n in figures[s] for s in seeds)]
    same_queries = len({figures[s][n]["per_query"]["ids_sha256"] for s in seeds for n in names}) == 1
    judged: dict[str, dict] = {}
    for name in names:
        deltas = [100 * (figures[s][name]["map"] - by_seed[s]["m_oo"]) for s in seeds]
        table = (100 * np.array([np.subtract(figures[s][name]["per_query"]["new"], figures[s][name]["per_query"]["old"])
                                 for s in seeds]) if same_queries else None)
        judged[f"{name} - old/old"] = _tests(by_seed, deltas, table)
    for name in names:
        if name.startswith("recipe + "):
            deltas = [100 * (figures[s][name]["map"] - figures[s]["recipe"]["map"]) for s in seeds]
            table = (100 * np.array([np.subtract(figures[s][name]["per_query"]["new"], figures[s]["recipe"]["per_query"]["new"])
                                     for s in seeds]) if same_queries else None)
            judged[f"{name} - recipe"] = _tests(by_seed, deltas, table)
    return judged


def verdict(paired: dict) -> str:
    """What the paired test shows: the difference above 0, below 0, or neither ("not shown")."""
    return "above 0" if paired["low"] > 0 else "below 0" if paired["high"] < 0 else "not shown"


def markdown(judged: dict[str, dict[str, dict]]) -> str:
    """One row per setting and method: the paired test (the verdict), then the crossed one."""
    lines = ["| setting | method | seeds | mean delta | paired 95% interval | p | MDE (80%) | verdict | crossed 95% interval "
             "| crossed p | single runs passing the gate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setting, methods in judged.items():
        for method, r in methods.items():
            if "paired" not in r:
                continue
            p, c = r["paired"], r.get("crossed")
            crossed = (f"[{c['low']:+.2f}, {c['high']:+.2f}] | {c['p']:.3f}" if c else "- | -")
            gates = f"{r['gates']['passed']} of {r['gates']['of']}" if "gates" in r else "-"
            lines.append(f"| {setting} | {method} | {len(r['seeds'])} | {p['mean']:+.2f} | [{p['low']:+.2f}, {p['high']:+.2f}] "
                         f"| {p['p']:.3f} | {p['mde']:.2f} | {verdict(p)} | {crossed} | {gates} |")
    return "\n".join(lines) + "\n"


def judge_folder(results: Path, mode: str = "paper", seeds: list[int] | None = None) -> dict[str, dict[str, dict]]:
    """setting -> figure -> tests of a folder of run files: ``paper`` (paper_table.py's, with each
    method also against ``independent``), ``backfill`` or ``adapters``; only ``seeds`` when given."""

    def chosen(by_seed: dict[int, dict]) -> dict[int, dict]:
        return {s: r for s, r in by_seed.items() if seeds is None or s in seeds}

    if mode != "paper":
        judge_one = judge_backfill if mode == "backfill" else judge_adapters
        return {setting: judge_one(chosen(by_seed)) for setting, by_seed in sorted(collect_backfill(results).items())}
    judged: dict[str, dict[str, dict]] = {}
    for setting, methods in sorted(collect(results).items()):
        judged[setting] = {method: judge(chosen(by_seed)) for method, by_seed in sorted(methods.items())}
        baseline = chosen(methods.get(BASELINE, {}))
        for method, by_seed in sorted(methods.items()):
            paired = {s: r for s, r in chosen(by_seed).items() if s in baseline}
            if method != BASELINE and len(paired) >= 2:
                judged[setting][f"{method} - {BASELINE}"] = judge(paired, baseline)
    return judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a folder of paper_table.py run files (SETTING/seedS/METHOD.json), "
                        "or with --backfill of backfill_policies.py run files (SETTING/seedS.json)")
    parser.add_argument("--backfill", action="store_true", help="judge each backfill order's area over the random order's")
    parser.add_argument("--adapters", action="store_true",
                        help="judge adapter_table.py run files (SETTING/seedS.json): each adapter against M(o,o)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: all)")
    args = parser.parse_args()
    mode = "backfill" if args.backfill else "adapters" if args.adapters else "paper"
    write(args.results.parent, judge_folder(args.results, mode, args.seeds))


def write(out: Path, judged: dict[str, dict[str, dict]]) -> None:
    """``tests.json`` and ``tests.md`` in ``out``; the table on stdout too."""
    (out / "tests.json").write_text(json.dumps(judged, indent=1) + "\n")
    (out / "tests.md").write_text(markdown(judged))
    print(markdown(judged))


if __name__ == "__main__":
    main()
