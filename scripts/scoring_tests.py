"""Calibrated against raw scoring of a partly re-embedded gallery, over seeds, by the paired t test.

    python scripts/scoring_tests.py docs/backfill/seeds5/runs     # writes scoring-tests.json and .md beside it

For every setting and order of ``experiments/backfill_policies.py``'s run files (one JSON per
setting and seed), the seed differences D_s = area_s(ORDER/calibrated) - area_s(ORDER/raw), in
mAP points, go through the paired t test over seeds (:func:`bctool.evaluate.seeds.paired_seed_test`,
the verdict) and, when every seed scored the same queries, the crossed seeds x queries estimate
from each query's own area. ``scripts/seed_tests.py --backfill`` judges each order against the
random order of the same scoring; this script judges the scoring itself, order by order, in
the same table format.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent


def _seed_tests() -> ModuleType:
    """scripts/seed_tests.py, whose tests and table format this script shares."""
    spec = importlib.util.spec_from_file_location("seed_tests", ROOT / "seed_tests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def judge_scoring(by_seed: dict[int, dict], tests: ModuleType) -> dict[str, dict]:
    """Each order's area scored calibrated minus the same order's area scored raw, same seed."""
    seeds = sorted(by_seed)
    same_queries = len({by_seed[s].get("per_query_ids_sha256") for s in seeds}) == 1
    orders = sorted({name.split("/")[0] for s in seeds for name in by_seed[s]["curves"]})
    judged: dict[str, dict] = {}
    for order in orders:
        calibrated, raw = f"{order}/calibrated", f"{order}/raw"
        if any(calibrated not in by_seed[s]["curves"] or raw not in by_seed[s]["curves"] for s in seeds):
            continue
        curves = {s: by_seed[s]["curves"] for s in seeds}
        deltas = [100 * (curves[s][calibrated]["area"] - curves[s][raw]["area"]) for s in seeds]
        table = (100 * np.array([np.subtract(curves[s][calibrated]["per_query_area"], curves[s][raw]["per_query_area"])
                                 for s in seeds]) if same_queries else None)
        judged[f"{calibrated} - {raw}"] = tests._tests(by_seed, deltas, table)
    return judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a folder of backfill_policies.py run files (SETTING/seedS.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: all)")
    args = parser.parse_args()
    tests = _seed_tests()
    judged = {}
    for setting, by_seed in sorted(tests.collect_backfill(args.results).items()):
        chosen = {s: r for s, r in by_seed.items() if args.seeds is None or s in args.seeds}
        judged[setting] = judge_scoring(chosen, tests)
    out = args.results.parent
    (out / "scoring-tests.json").write_text(json.dumps(judged, indent=1) + "\n")
    (out / "scoring-tests.md").write_text(tests.markdown(judged))
    print(tests.markdown(judged))


if __name__ == "__main__":
    main()
