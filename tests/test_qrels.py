"""evaluate --qrels: trec_eval's measures on relevance judgments, checked against pytrec_eval
(trec_eval itself, compiled) on random runs with ties and graded judgments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bctool.embeddings import Embeddings
from bctool.errors import DataError
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.protocols.qrels.files import Qrels, qrels_from_labels, read_qrels, run_lines, write_qrels
from bctool.evaluate.protocols.qrels.metric import Cutoffs, evaluate_qrels, query_measures, trec_order
from bctool.evaluate.retrieval import evaluate_retrieval

pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec-eval-terrier (the dev extra) checks the measures")

CUTOFFS = Cutoffs(ndcg=5, precision=5, recall=20, mrr=5)
TREC = {"map": "map", "ndcg@5": "ndcg_cut_5", "p@5": "P_5", "recall@20": "recall_20"}


def _random_case(rng: np.random.Generator, docs: int = 40) -> tuple[dict, dict]:
    """qrels and a run of 12 queries: graded relevance 0-3 (some negative), scores rounded so
    that ties are common, some judged documents never retrieved."""
    names = [f"d{j:02d}" for j in range(docs)]
    qrels, run = {}, {}
    for q in range(12):
        judged = rng.choice(docs, size=rng.integers(1, 15), replace=False)
        qrels[f"q{q}"] = {names[j]: int(rng.integers(-1, 4)) for j in judged}
        retrieved = rng.choice(docs, size=rng.integers(5, docs), replace=False)
        run[f"q{q}"] = {names[j]: float(np.round(rng.uniform(0, 1), 1)) for j in retrieved}
    return qrels, run


def _ours(qrels: dict, run: dict, level: int) -> dict[str, dict[str, float]]:
    out = {}
    for q, scored in run.items():
        docs = sorted(scored)
        doc_rank = np.arange(len(docs))  # docs sorted by id: the position is the rank
        order = trec_order(np.array([scored[d] for d in docs]), doc_rank)
        ranked = np.array([qrels[q].get(docs[i], 0) for i in order])
        out[q] = query_measures(ranked, np.array(list(qrels[q].values())), level, CUTOFFS)
    return out


@pytest.mark.parametrize(("seed", "level"), [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_the_measures_are_trec_evals_on_random_runs_with_ties(seed: int, level: int) -> None:
    qrels, run = _random_case(np.random.default_rng(seed))
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"map", "ndcg_cut_5", "P_5", "recall_20", "recip_rank"},
                                               relevance_level=level).evaluate(run)
    ours = _ours(qrels, run, level)
    for q in run:
        for name, trec in TREC.items():
            assert ours[q][name] == pytest.approx(reference[q][trec], abs=1e-6), (q, name)


def test_mrr_at_k_is_the_reciprocal_rank_cut_at_k() -> None:
    """trec_eval's recip_rank has no cutoff: on a run of 5 documents it is RR@5."""
    qrels, run = _random_case(np.random.default_rng(4))
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        {q: {d: s for d, s in _top(scored, 5)} for q, scored in run.items()})
    ours = _ours(qrels, run, 1)
    for q in run:
        assert ours[q]["mrr@5"] == pytest.approx(reference[q]["recip_rank"], abs=1e-9)


def _top(scored: dict[str, float], k: int) -> list[tuple[str, float]]:
    """The first ``k`` documents in trec_eval's order (score descending, ties by id descending)."""
    return sorted(scored.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]


def _embeddings(rows: np.ndarray, labels: np.ndarray, prefix: str) -> Embeddings:
    return Embeddings(rows.astype(np.float32), labels.astype(np.int64), [f"{prefix}/{i}" for i in range(len(rows))],
                      [str(c) for c in range(int(labels.max()) + 1)])


def test_judgments_written_from_labels_give_the_labelled_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16))
    q_labels, g_labels = rng.integers(0, 8, 30), rng.integers(0, 8, 120)
    query = _embeddings(centers[q_labels] + rng.normal(size=(30, 16)), q_labels, "q")
    gallery = _embeddings(centers[g_labels] + rng.normal(size=(120, 16)), g_labels, "g")
    write_qrels(tmp_path / "labels.qrels", qrels_from_labels(query.ids, query.labels, gallery.ids, gallery.labels))
    judged = make_protocol(qrels=tmp_path / "labels.qrels").evaluate(query, gallery)
    assert judged["map"] == pytest.approx(evaluate_retrieval(query, gallery)["map"], abs=1e-6)
    assert judged["queries"] + judged["unjudged_queries"] == 30


def test_the_run_file_scores_as_bctool_reports(tmp_path: Path) -> None:
    """What bctool reports for a search is what trec_eval gives on the run file of that search."""
    rng = np.random.default_rng(1)
    query = _embeddings(rng.normal(size=(10, 8)), np.zeros(10), "q")
    gallery = _embeddings(np.round(rng.normal(size=(50, 8)), 0), np.zeros(50), "g")  # rounded rows: tied scores
    qrels = Qrels({f"q/{i}": {f"g/{j}": int(rng.integers(0, 3)) for j in rng.choice(50, 8, replace=False)}
                   for i in range(10)})
    metrics, per_query = evaluate_qrels(query, gallery, qrels, depth=20, cutoffs=CUTOFFS)
    from bctool.evaluate.search import stream_rankings

    scores, ranked = stream_rankings(query.normalized_embeddings(), gallery.embeddings, 20, normalize=True)
    lines = run_lines(query.ids, ((np.array(gallery.ids)[r], s) for r, s in zip(ranked, scores)))
    run: dict[str, dict[str, float]] = {}
    for line in lines:
        q, _, d, _, s, _ = line.split()
        run.setdefault(q, {})[d] = float(s)
    reference = pytrec_eval.RelevanceEvaluator(qrels.judgments, {"map", "ndcg_cut_5"}).evaluate(run)
    assert metrics["map"] == pytest.approx(np.mean([reference[q]["map"] for q in reference]), abs=1e-6)
    assert metrics["ndcg@5"] == pytest.approx(np.mean([reference[q]["ndcg_cut_5"] for q in reference]), abs=1e-6)
    assert per_query.ids == tuple(query.ids) and metrics["depth"] == 20


def test_unjudged_queries_are_left_out_and_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    query = _embeddings(rng.normal(size=(5, 4)), np.zeros(5), "q")
    gallery = _embeddings(rng.normal(size=(9, 4)), np.zeros(9), "g")
    # judged by file stem, one judged query with no row, one judged document not in the gallery
    qrels = Qrels({"0": {"3": 1, "gone": 2}, "2": {"4": 1}, "missing": {"1": 1}})
    metrics, per_query = evaluate_qrels(query, gallery, qrels)
    assert (metrics["queries"], metrics["unjudged_queries"]) == (2, 3) and per_query.ids == ("q/0", "q/2")
    assert metrics["recall@100"] <= 0.75  # query 0's second relevant document is missing: recall at most 1/2


@pytest.mark.parametrize(("text", "message"), [
    ("q1 0 d1\n", r"line 1: 3 fields"),
    ("q1 0 d1 yes\n", r"relevance 'yes' is not an integer"),
    ("q1 0 d1 1\nq1 0 d1 2\n", r"judges 'd1' twice \(1 and 2\)"),
    ("# nothing\n", r"holds no judgment"),
])
def test_a_bad_qrels_file_names_the_line_and_the_layout(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.qrels").write_text(text)
    with pytest.raises(DataError, match=message):
        read_qrels(tmp_path / "bad.qrels")


def test_qrels_round_trip(tmp_path: Path) -> None:
    qrels = Qrels({"a": {"x": 2, "y": 0}, "b": {"x": -1}})
    write_qrels(tmp_path / "r.qrels", qrels)
    assert read_qrels(tmp_path / "r.qrels").judgments == qrels.judgments


def test_evaluate_qrels_and_run_file_from_the_command_line(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from bctool.cli import app
    from bctool.embeddings import save_embeddings

    rng = np.random.default_rng(3)
    centers = rng.normal(size=(6, 8))
    q_labels, g_labels = rng.integers(0, 6, 12), rng.integers(0, 6, 40)
    query = _embeddings(centers[q_labels] + rng.normal(size=(12, 8)), q_labels, "q")
    gallery = _embeddings(centers[g_labels] + rng.normal(size=(40, 8)), g_labels, "g")
    save_embeddings(query, tmp_path / "q.safetensors")
    save_embeddings(gallery, tmp_path / "g.safetensors")
    write_qrels(tmp_path / "j.qrels", qrels_from_labels(query.ids, query.labels, gallery.ids, gallery.labels))
    runner = CliRunner()
    base = ["evaluate", "--query", str(tmp_path / "q.safetensors"), "--gallery", str(tmp_path / "g.safetensors"), "-q"]
    result = runner.invoke(app, [*base, "--qrels", str(tmp_path / "j.qrels"), "--run-file", str(tmp_path / "r.run")])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    labelled = json.loads(runner.invoke(app, base).stdout)
    assert report["map"] == pytest.approx(labelled["map"], abs=1e-6) and report["run_file"]["lines"] == 12 * 40
    run: dict[str, dict[str, float]] = {}
    for line in (tmp_path / "r.run").read_text().splitlines():
        q, _, d, _, s, _ = line.split()
        run.setdefault(q, {})[d] = float(s)
    reference = pytrec_eval.RelevanceEvaluator(read_qrels(tmp_path / "j.qrels").judgments, {"ndcg_cut_10"}).evaluate(run)
    assert report["ndcg@10"] == pytest.approx(np.mean([r["ndcg_cut_10"] for r in reference.values()]), abs=1e-5)
    clash = runner.invoke(app, [*base, "--qrels", str(tmp_path / "j.qrels"), "--run-file", str(tmp_path / "j.qrels")])
    assert clash.exit_code == 1 and "--run-file" in clash.stderr


def test_emoji_through_judgments_from_its_labels_gives_the_labelled_map(emoji_dir: Path, tmp_path: Path) -> None:
    from bctool.checkpoint import load_checkpoint
    from bctool.data.sources import load_image_set
    from bctool.extract import extract
    from tests.helpers import tiny_checkpoint

    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "m.safetensors", embedding_dim=16))
    query, gallery = (extract(load_image_set(emoji_dir / f"{split}.txt"), checkpoint, workers=0)
                      for split in ("query", "gallery"))
    write_qrels(tmp_path / "emoji.qrels", qrels_from_labels(query.ids, query.labels, gallery.ids, gallery.labels))
    judged = make_protocol(qrels=tmp_path / "emoji.qrels").evaluate(query, gallery)
    assert judged["map"] == pytest.approx(evaluate_retrieval(query, gallery)["map"], abs=1e-6)
