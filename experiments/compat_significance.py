"""Is M(n,o) > M(o,o) real? Bootstrap intervals of delta = M(n,o) - M(o,o) for the paper table's runs.

    python experiments/compat_significance.py --settings extended-class-warm extended-data-fashion-warm

For every setting, method and seed that ``experiments/paper_table.py`` trained (its ``--workdir``
keeps the query and gallery embeddings), the per-query AP of the new and the old queries
against the old gallery gives delta with a paired bootstrap 95% interval (1,000 resamples,
seeded by the seed), as ``bctool evaluate`` reports it. Over the seeds, the mean of the seeds' deltas is judged by
the paired t test on the seed deltas, with the crossed seeds x queries estimate beside it
(``bctool.evaluate.seeds``). Writes ``docs/paper/significance.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from bctool.embeddings import load_embeddings
from bctool.evaluate.scores import DEFAULT_BOOTSTRAP, paired_delta
from bctool.evaluate.seeds import crossed_test, paired_seed_test
from bctool.evaluate.retrieval import evaluate_retrieval_per_query
from bctool.train.recipe import WARM_LR
from paper_table import SETTINGS  # this folder is on sys.path when the script runs


def _per_query(query: Path, gallery: Path):  # noqa: ANN202 - a QueryAP
    return evaluate_retrieval_per_query(load_embeddings(query), load_embeddings(gallery))[1]


def old_tag(tag: str) -> str:
    """The old model's folder tag of a new-model folder's ``tag`` (paper_table's ``_tag``): the
    regime (``-paper``) and the old views (``-old-none`` there, ``-none`` here); crops untagged."""
    regime = "-paper" if "-paper" in tag else ""
    views = re.search(r"-old-(none|flip|crop)", tag)
    return regime + (f"-{views.group(1)}" if views else "")


def seed_deltas(workdir: Path, setting: str, method: str, n: int, tag: str = "",
                seeds: list[int] | None = None) -> dict[int, dict]:
    """Per seed: delta, its interval, and the per-query differences (new AP - old AP), of the
    runs whose folder name ends in ``tag`` after the seeds and epochs (``-lr0.03-none``...)."""
    spec = SETTINGS[setting]
    out = {}
    for folder in sorted((workdir / setting).iterdir()):
        # paper_table's layout: SETTING/seedS-oldO-eE[-lrL][-cwW][TAGS] beside old/DATA-LIST-ARCH-eE[TAGS]-seedO
        found = re.fullmatch(r"seed(\d+)-old(\d+)-e(\d+)(.*)", folder.name)
        query = folder / f"{method}_query.safetensors"
        if not found or found.group(4) != tag or not query.exists():
            continue
        seed, old_seed, old_epochs = (int(g) for g in found.groups()[:3])
        if seeds is not None and seed not in seeds:
            continue
        old = workdir / "old" / f"{spec.dataset}-{Path(spec.old_list).stem}-{spec.old_arch}-e{old_epochs}{old_tag(tag)}-seed{old_seed}"
        old_ap = _per_query(old / "old_query.safetensors", old / "old_gallery.safetensors")
        new_ap = _per_query(query, old / "old_gallery.safetensors")
        report = paired_delta(old_ap, new_ap, n=n, seed=seed)
        report["diff"] = np.asarray(new_ap.ap, dtype=np.float64) - np.asarray(old_ap.ap, dtype=np.float64)
        out[seed] = report
    return out


def over_seeds(per_seed: dict[int, dict]) -> dict[str, dict]:
    """The mean of the seeds' deltas judged over seeds (bctool.evaluate.seeds): the paired t test
    on the seed deltas (the verdict), and the crossed seeds x queries estimate, in mAP points.
    (A stratified bootstrap of the queries within each seed, averaged, has no between-seed
    variance: it is not a test over seeds.)"""
    seeds = sorted(per_seed)
    verdict: dict[str, dict] = {}
    if len(seeds) >= 2:
        verdict["paired"] = paired_seed_test([100 * per_seed[s]["delta"] for s in seeds]).to_dict()
        verdict["crossed"] = crossed_test(np.array([100 * per_seed[s]["diff"] for s in seeds])).to_dict()
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["extended-class-warm", "extended-data-fashion-warm"])
    parser.add_argument("--methods", nargs="+", default=["independent", "bct", "advbct"])
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="paper_table.py's --workdir")
    parser.add_argument("--extra-workdirs", type=Path, nargs="*", default=[],
                        help="more workdirs searched for a setting missing from --workdir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds to read (100: the pilot)")
    parser.add_argument("--tag", default=None,
                        help="the run-folder tag after seedS-oldO-eE[-lrL] of the runs to read (default: none, the "
                             "original table's runs), e.g. --tag=-none for new models on clean views")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="resamples")
    parser.add_argument("--out", type=Path, default=Path("docs/paper/significance.json"))
    args = parser.parse_args()
    rows, record = ["| setting | method | delta per seed (95% interval), points | compatible | mean delta, paired t over seeds (95% interval, p) |",
                    "| --- | --- | --- | --- | --- |"], {}
    for setting in args.settings:
        tag = (f"-lr{WARM_LR:g}" if SETTINGS[setting].warm else "") + (args.tag or "")
        workdir = next((w for w in [args.workdir, *args.extra_workdirs] if (w / setting).is_dir()), None)
        if workdir is None:
            continue
        for method in args.methods:
            per_seed = seed_deltas(workdir, setting, method, args.bootstrap, tag, args.seeds)
            if not per_seed:
                continue
            judged = over_seeds(per_seed)
            record.setdefault(setting, {})[method] = {
                "seeds": {s: {k: v for k, v in r.items() if k != "diff"} for s, r in per_seed.items()}, **judged}
            seeds = "; ".join(f"{100 * r['delta']:+.2f} [{100 * r['delta_low']:+.2f}, {100 * r['delta_high']:+.2f}]"
                              for _, r in sorted(per_seed.items()))
            wins = sum(r["delta"] > 0 for r in per_seed.values())
            paired = judged.get("paired")
            verdict = (f"{paired['mean']:+.2f} [{paired['low']:+.2f}, {paired['high']:+.2f}], p {paired['p']:.3f}"
                       if paired else "one seed: no test over seeds")
            rows.append(f"| {setting} | {method} | {seeds} | {wins}/{len(per_seed)} | {verdict} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
