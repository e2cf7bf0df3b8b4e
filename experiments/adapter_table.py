"""Upgrades without retraining: adapters between an old model and a new model never trained for
compatibility, next to compatible training, over seeds.

    OMP_NUM_THREADS=1 python experiments/adapter_table.py --seeds 100          # the pilot: defaults chosen here
    OMP_NUM_THREADS=1 python experiments/adapter_table.py --seeds 0 1 2        # the confirmation
    python experiments/adapter_table.py --report-only --seeds 0 1 2

For each setting of the paper table (emoji extended-class, Fashion-MNIST extended-data) and seed
it takes the paper table's old model and its fresh independent new model (trained with
``paper_table.py``'s options, cached in the same ``--workdir``), embeds the new model's training
images with the new model (the pairs: the same images embedded by both models), and fits every
adapter kind both ways:

* **query adapter** (new -> old): the new model's queries mapped into the old space search the
  old gallery: M(A(n), o); and blended with the old model's query embedding (SLERP, weights
  ``--blend-weights`` on the mapped row): M(blend, o);
* **gallery transform** (old -> new): the old gallery mapped into the new space, searched by new
  queries: M(n, T(o)); also for the compatible-training recipe's new model (``lce``, warm start,
  from the paper table's ``-warm`` settings), where that run exists.

Every figure is mAP; delta = M(.) - M(o,o) comes with a paired bootstrap interval over the
queries. One JSON per setting and seed in ``--results``; the table in ``RESULTS/../table*.md``.
Each figure with a delta also keeps ``per_query``: the AP of every query of old/old (``old``) and
of the figure (``new``), in query-id order, 6 decimals, with a sha256 of the query ids one a line
(``ids_sha256``), as ``paper_table.py``'s run files do: the paired differences a test over seeds
and queries needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bctool.adapt import fit_adapter, slerp
from bctool.embeddings import Embeddings, load_embeddings
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.scores import paired_delta
from bctool.workflow import embed_splits, ids_digest, rounded, run_record, write_run
from paper_table import SETTINGS, Study, base_configs, old_side, prepare_data, run_folder, run_method  # this folder is on sys.path

log = logging.getLogger("adapter_table")
KINDS = ["procrustes", "affine", "mlp"]
PAIRS = {"extended-class": "extended-class-warm", "extended-data-fashion": "extended-data-fashion-warm",
         "pretrained-class": "pretrained-class-warm"}



@dataclass(frozen=True)
class AdapterStudy:
    """Where the study reads and writes, and what it measures."""

    workdir: Path  # paper_table.py's --workdir: the models and embeddings
    paper_results: Path  # paper_table.py's --results of the independent models
    results: Path  # one JSON per setting and seed
    bootstrap: int = 1000
    blend_weights: tuple[float, ...] = (0.25, 0.5, 0.75)


def _embed_train(model: Path, data: Path) -> Embeddings:
    """The model's embeddings of the new training list, beside it (cached by model and list)."""
    prefix = model.with_name(model.stem)
    return load_embeddings(embed_splits(model, {"new_train": data / "new_train.txt"}, prefix)["new_train"])


def _mapped(emb: Embeddings, rows: np.ndarray) -> Embeddings:
    return Embeddings(rows.astype(np.float32), emb.labels, emb.ids, emb.label_names, normalized=True, root=emb.root)


def _score(protocol, query: Embeddings, gallery: Embeddings, base_ap, bootstrap: int, seed: int) -> dict:
    """mAP of ``query`` against ``gallery``, its paired delta to ``base_ap`` (M(o,o)'s per-query AP)
    and the per-query AP of both, in the query-id order of ``base_ap``."""
    metrics, ap = protocol.per_query(query, gallery)
    if tuple(ap.ids) != tuple(base_ap.ids):
        raise SystemExit("a figure evaluates other query ids than old/old: no per-query pairs")
    return {"map": metrics["map"], **paired_delta(base_ap, ap, bootstrap, seed),
            "per_query": {"ids_sha256": ids_digest(base_ap.ids), "old": rounded(base_ap.ap),
                          "new": rounded(ap.ap)}}


def run_seed(study: AdapterStudy, name: str, seed: int) -> dict | None:
    """Every adapter of one setting and seed (cached as JSON in ``study.results``)."""
    cache = study.results / name / f"seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    setting = SETTINGS[name]
    data = prepare_data(study.workdir, setting.dataset)
    if data is None:
        log.warning("skipping %s: its data is not installed", name)
        return None
    base, old_base = base_configs(setting)
    old_seed = seed + 1000
    started = time.perf_counter()
    paper = Study(study.workdir, study.paper_results, data, base, old_base)
    independent = run_method(paper, name, seed, "independent", old_seed)
    old = old_side(study.workdir, data, setting, old_seed, old_base)
    folder = run_folder(paper, name, seed, old_seed)
    new_model = folder / "independent.safetensors"
    new_train = _embed_train(new_model, data)
    emb = {"old_train": load_embeddings(old["new_train"]), "old_query": load_embeddings(old["query"]),
           "old_gallery": load_embeddings(old["gallery"]), "new_query": load_embeddings(folder / "independent_query.safetensors"),
           "new_gallery": load_embeddings(folder / "independent_gallery.safetensors")}
    protocol = make_protocol()
    base_metrics, base_ap = protocol.per_query(emb["old_query"], emb["old_gallery"])
    row = {"setting": name, "seed": seed, "old_seed": old_seed,
           "m_oo": base_metrics["map"], "m_nn": independent["self"]["map"], "m_no": independent["cross"]["map"],
           "query_adapter": {}, "gallery_transform": {}, "fit": {}}
    for kind in KINDS:
        forward = fit_adapter(new_train, emb["old_train"], kind, holdout=0.1, seed=seed)
        backward = fit_adapter(emb["old_train"], new_train, kind, holdout=0.1, seed=seed)
        row["fit"][kind] = {"new_to_old": forward.fit, "old_to_new": backward.fit}
        mapped_query = forward.apply(np.asarray(emb["new_query"].embeddings))
        entry = {"alone": _score(protocol, _mapped(emb["new_query"], mapped_query),
                                 emb["old_gallery"], base_ap, study.bootstrap, seed)}
        for weight in study.blend_weights:
            blended = slerp(np.asarray(emb["old_query"].embeddings), mapped_query, weight)
            entry[f"blend{weight:g}"] = _score(protocol, _mapped(emb["new_query"], blended),
                                               emb["old_gallery"], base_ap, study.bootstrap, seed)
        row["query_adapter"][kind] = entry
        gallery = _mapped(emb["old_gallery"], backward.apply(np.asarray(emb["old_gallery"].embeddings)))
        row["gallery_transform"][kind] = _score(protocol, emb["new_query"], gallery, base_ap, study.bootstrap, seed)
        log.info("%s seed %d %s: query adapter %.4f, gallery transform %.4f (M(o,o) %.4f, M(n,n) %.4f)", name, seed,
                 kind, entry["alone"]["map"], row["gallery_transform"][kind]["map"], row["m_oo"], row["m_nn"])
    recipe = _recipe(study, name, seed, old_seed, data)
    if recipe is not None:
        lce_train = _embed_train(recipe, data)
        lce_query = load_embeddings(recipe.with_name("lce_query.safetensors"))
        row["recipe"] = {"cross": _score(protocol, lce_query, emb["old_gallery"], base_ap, study.bootstrap, seed),
                         "self": protocol.evaluate(lce_query, load_embeddings(recipe.with_name("lce_gallery.safetensors")))["map"],
                         "gallery_transform": {}}
        for kind in KINDS:
            backward = fit_adapter(emb["old_train"], lce_train, kind, holdout=0.1, seed=seed)
            gallery = _mapped(emb["old_gallery"], backward.apply(np.asarray(emb["old_gallery"].embeddings)))
            row["recipe"]["gallery_transform"][kind] = _score(protocol, lce_query, gallery, base_ap, study.bootstrap, seed)
    row["seconds"] = round(time.perf_counter() - started, 1)
    row = run_record(**row)
    write_run(cache, row)
    return row


def _recipe(study: AdapterStudy, name: str, seed: int, old_seed: int, data: Path) -> Path | None:
    """The recipe's (lce, warm, clean views) model of the paired -warm setting, if it was trained."""
    warm = PAIRS[name]
    base, old_base = base_configs(SETTINGS[warm])
    model = run_folder(Study(study.workdir, study.paper_results, data, base, old_base), warm, seed, old_seed) / "lce.safetensors"
    return model if model.with_name("lce_query.safetensors").exists() else None


def _cell(values: list[float]) -> str:
    """Mean ± standard deviation over seeds, in mAP %. Whether a difference is shown over seeds is
    the paired test's (``scripts/seed_tests.py --adapters``), not a count of per-seed intervals."""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def report(rows: list[dict], blend_weights: list[float]) -> str:
    """One table per setting: every path's mAP over seeds (mean ± std)."""
    out = []
    for name in PAIRS:
        runs = [r for r in rows if r["setting"] == name]
        if not runs:
            continue
        seeds = [r["seed"] for r in runs]
        lines = [f"**{name}** (seeds {seeds}): M(o,o) {_cell([r['m_oo'] for r in runs])}, independent new model "
                 f"M(n,n) {_cell([r['m_nn'] for r in runs])}, M(n,o) {_cell([r['m_no'] for r in runs])}; mAP % mean ± "
                 "std over seeds", "",
                 "| path | " + " | ".join(KINDS) + " |", "| --- | " + " | ".join("---" for _ in KINDS) + " |"]
        paths = [("query adapter alone: M(A(n), o)", lambda r, k: r["query_adapter"][k]["alone"])]
        paths += [(f"query adapter, blend {w:g}: M(slerp(o, A(n)), o)",
                   lambda r, k, w=w: r["query_adapter"][k][f"blend{w:g}"]) for w in blend_weights]
        paths += [("gallery transform: M(n, T(o))", lambda r, k: r["gallery_transform"][k])]
        with_recipe = [r for r in runs if "recipe" in r]
        if with_recipe:
            paths += [("recipe (lce) + gallery transform: M(lce, T(o))", lambda r, k: r["recipe"]["gallery_transform"][k])]
        for title, get in paths:
            use = with_recipe if "recipe" in title else runs
            lines.append(f"| {title} | " + " | ".join(_cell([get(r, k)["map"] for r in use]) for k in KINDS) + " |")
        if with_recipe:
            lines.append(f"| recipe (lce), no adapter: M(lce, o) / M(lce, lce) | "
                         f"{_cell([r['recipe']['cross']['map'] for r in with_recipe])}"
                         f" / {_cell([r['recipe']['self'] for r in with_recipe])} | | |")
        held = {k: statistics.fmean(r["fit"][k]["new_to_old"]["held_out_cosine"] for r in runs) for k in KINDS}
        lines.append("| held-out cosine of the query map (new -> old) | " + " | ".join(f"{held[k]:.3f}" for k in KINDS) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="settings to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (100: the pilot)")
    parser.add_argument("--blend-weights", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="weights of the mapped row in the blends")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of each interval")
    parser.add_argument("--workdir", type=Path, default=Path("runs/paper"), help="paper_table.py's --workdir")
    parser.add_argument("--paper-results", type=Path, default=Path("docs/paper/clean-views/runs"),
                        help="paper_table.py's --results for the independent models")
    parser.add_argument("--results", type=Path, default=Path("docs/adapters/runs"), help="one JSON per setting and seed")
    parser.add_argument("--report-only", action="store_true", help="no work: the table from --results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    study = AdapterStudy(args.workdir, args.paper_results, args.results, args.bootstrap, tuple(args.blend_weights))
    rows = []
    for name in args.settings:
        for seed in args.seeds:
            cache = args.results / name / f"seed{seed}.json"
            row = json.loads(cache.read_text()) if args.report_only and cache.exists() else (
                None if args.report_only else run_seed(study, name, seed))
            if row is not None:
                rows.append(row)
    text = report(rows, args.blend_weights)
    suffix = "" if args.seeds == [0, 1, 2] else "-seeds-" + "-".join(map(str, args.seeds))
    (args.results.parent / f"table{suffix}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
