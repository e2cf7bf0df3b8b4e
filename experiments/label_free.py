"""The labelled verdict and the label-free one side by side, over seeds.

    python experiments/label_free.py --workdir runs/paper --seeds 0 1 2 3 4

For the five-seed models of ``paper_table.py`` (``--workdir``: the recipe's lce model and the
warm-started independent model of ``extended-class-warm`` (emoji) and
``extended-data-fashion-warm`` (Fashion-MNIST), each against its old model) this records, per
setting, method and seed:

- the labelled compatibility report: M(o,o), M(n,o), M(n,n), delta = M(n,o) - M(o,o) with its
  bootstrap interval, the negative flip rate at rank 1;
- the same old/old mAP through relevance judgments written from the labels (``--qrels`` with
  ``--top-k`` the gallery's size, so the whole gallery is ranked as the labelled protocol ranks
  it; a TREC run's default depth of 1,000 would cut Fashion-MNIST's 900 relevant images a
  query short): a check that the judgments path gives the labelled figure;
- the label-free change report (``bctool evaluate --label-free``): overlap@10, rank-biased
  overlap and changed first results of new/old and new/new against old/old, and the identity
  check of the new gallery against the old one.

One JSON per run in ``--results`` (default ``docs/label-free/runs``) with its command and
revision; ``docs/label-free/table.md`` is made from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from bctool.embeddings import load_embeddings
from bctool.evaluate.changes import ChangeOptions, change_report
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.protocols.qrels.files import qrels_from_labels, write_qrels
from bctool.evaluate.reports import CompatibilityOptions, compatibility_report
from bctool.workflow import run_record, write_run

log = logging.getLogger("label_free")
SETTINGS = {"extended-class-warm": ("emoji", "emoji-old_train-small-e30"),
            "extended-data-fashion-warm": ("Fashion-MNIST", "fashion-mnist-old_train-small-e10")}
METHODS = ("lce", "independent")


def run(workdir: Path, results: Path, setting: str, seed: int, method: str) -> dict | None:
    """One run's labelled and label-free figures (cached as JSON in ``results``)."""
    cache = results / setting / f"seed{seed}" / f"{method}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    found = sorted((workdir / setting).glob(f"seed{seed}-old{seed + 1000}-e*-lr0.03-none/{method}_query.safetensors"))
    old_dir = workdir / "old" / f"{SETTINGS[setting][1]}-seed{seed + 1000}"
    if not found or not (old_dir / "old_query.safetensors").exists():
        log.warning("skipping %s seed %d %s: no model in %s", setting, seed, method, workdir)
        return None
    old = (load_embeddings(old_dir / "old_query.safetensors"), load_embeddings(old_dir / "old_gallery.safetensors"))
    new = (load_embeddings(found[0]), load_embeddings(found[0].with_name(f"{method}_gallery.safetensors")))
    report = compatibility_report(old, new, make_protocol(), options=CompatibilityOptions(seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        qrels = Path(tmp) / "labels.qrels"
        write_qrels(qrels, qrels_from_labels(old[0].ids, old[0].labels, old[1].ids, old[1].labels))
        judged = make_protocol(qrels=qrels, top_k=len(old[1])).evaluate(*old)  # the whole gallery ranked, as labels do
    row = run_record(
        setting=setting, seed=seed, method=method, models=[str(old_dir), str(found[0].parent)],
        labelled={key: report[key] for key in ("m_oo", "m_no", "m_nn", "delta", "delta_low", "delta_high")}
        | {"nfr": report["flips"]["new/old"]["nfr"]},
        qrels_m_oo=judged["map"],
        changes=change_report(old, new, ChangeOptions(seed=seed)),
    )
    write_run(cache, row)
    return row


def _mean(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def table(rows: list[dict]) -> str:
    """Per setting and method, mean ± std over seeds (in %): the labelled figures and the
    label-free ones side by side."""
    head = ("| setting | method | seeds | M(o,o) | M(o,o) by qrels | M(n,o) | delta | NFR@1 | overlap@10 new/old | "
            "RBO new/old | top-1 changed new/old | overlap@10 new/new | top-1 changed new/new | identity top-1 |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for setting, (title, _) in SETTINGS.items():
        for method in METHODS:
            runs = [r for r in rows if r["setting"] == setting and r["method"] == method]
            if not runs:
                continue
            lab = [r["labelled"] for r in runs]
            ch = [r["changes"] for r in runs]
            cells = [_mean([x["m_oo"] for x in lab]), _mean([r["qrels_m_oo"] for r in runs]),
                     _mean([x["m_no"] for x in lab]), _mean([x["delta"] for x in lab]), _mean([x["nfr"] for x in lab]),
                     _mean([c["new/old"]["overlap@10"] for c in ch]), _mean([c["new/old"]["rbo"] for c in ch]),
                     _mean([c["new/old"]["top1_changed"] for c in ch]), _mean([c["new/new"]["overlap@10"] for c in ch]),
                     _mean([c["new/new"]["top1_changed"] for c in ch]), _mean([c["identity"]["identity_top1"] for c in ch])]
            lines.append(f"| {title} | {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="paper_table.py's --workdir")
    parser.add_argument("--results", type=Path, default=Path("docs/label-free/runs"), help="one JSON per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--report-only", action="store_true", help="no work: the table from --results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for setting in SETTINGS:
        for seed in args.seeds:
            for method in METHODS:
                cache = args.results / setting / f"seed{seed}" / f"{method}.json"
                row = (json.loads(cache.read_text()) if cache.exists() else None) if args.report_only else run(
                    args.workdir, args.results, setting, seed, method)
                if row is not None:
                    rows.append(row)
    text = table(rows)
    (args.results.parent / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
