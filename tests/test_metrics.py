"""Metrics, search and evaluate_retrieval against slow, obvious references (with ties)."""

from __future__ import annotations

import numpy as np
import pytest

from bctool.embeddings import Embeddings
from bctool.errors import EmbeddingsError
from bctool.evaluate import (
    average_precision,
    average_precision_at_k,
    evaluate_retrieval,
    rank_gallery,
    recall_at_k,
)
from bctool.evaluate.inputs import check_same_dim
from bctool.evaluate.search import SearchOptions, build_index, iter_index_rankings

from helpers import ref_ap

# ---------------------------------------------------------------- slow references


def ref_ranking(q: np.ndarray, gallery: np.ndarray, skip: int = -1) -> list[int]:
    """Every gallery index but ``skip``, sorted by (-score, index)."""
    scores = [float(np.dot(q.astype(np.float64), g.astype(np.float64))) for g in gallery]
    order = sorted(range(len(gallery)), key=lambda j: (-scores[j], j))
    return [j for j in order if j != skip]


def ref_recall(rel: list[bool], k: int) -> float:
    return 1.0 if any(rel[:k]) else 0.0


def ref_evaluate(query: Embeddings, gallery: Embeddings, top_k: int | None, ks: tuple[int, ...]) -> dict:
    qn, gn = query.normalized_embeddings(), gallery.normalized_embeddings()
    q_names, g_names = query.label_strings(), gallery.label_strings()
    per_metric: dict[str, list[float]] = {"map": [], "map@100": [], **{f"recall@{k}": [] for k in ks}}
    skipped = 0
    for qi in range(len(query)):
        skip = gallery.ids.index(query.ids[qi]) if query.ids[qi] in gallery.ids else -1
        name = q_names[qi]
        n_pos = sum(1 for j, g in enumerate(g_names) if name is not None and g == name and j != skip)
        if n_pos == 0:
            skipped += 1
            continue
        rel = [g_names[j] == name for j in ref_ranking(qn[qi], gn, skip)]
        depth = len(rel) if top_k is None else top_k
        per_metric["map"].append(ref_ap(rel[:depth], n_pos))
        per_metric["map@100"].append(ref_ap(rel, n_pos, 100))
        for k in ks:
            per_metric[f"recall@{k}"].append(ref_recall(rel, k))
    out: dict = {key: sum(v) / len(v) for key, v in per_metric.items()}
    out.update(queries=len(per_metric["map"]), gallery=len(gallery), queries_without_positives=skipped)
    return out


# ---------------------------------------------------------------- data


def tie_vectors(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    """Rows with four entries +-1: normalised entries are +-0.5, so every dot product is exact
    (a multiple of 0.25) whatever the summation order, and ties are frequent."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, size=4, replace=False)] = rng.choice([-1.0, 1.0], size=4)
    return x


def make_embeddings(
    x: np.ndarray, labels: np.ndarray, names: list[str], prefix: str, model: dict | None = None
) -> Embeddings:
    return Embeddings(
        embeddings=x,
        labels=np.asarray(labels, np.int64),
        ids=[f"{prefix}{i}" for i in range(len(x))],
        label_names=names,
        model=model or {},
    )


def random_relevance(rng: np.random.Generator, q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rel = rng.random((q, k)) < 0.3
    n_pos = rel.sum(axis=1) + rng.integers(0, 3, size=q)  # some positives unranked
    n_pos[:3] = 0  # queries with no positives at all
    rel[:3] = False
    return rel, n_pos


# ---------------------------------------------------------------- metric functions


def test_average_precision_hand_computed() -> None:
    rel = np.array([[True, False, True], [True, True, True], [False, False, False]])
    ap = average_precision(rel, np.array([2, 3, 0]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1] == 1.0
    assert np.isnan(ap[2])
    # one positive was never ranked: it counts as missed
    assert average_precision(rel[:1], np.array([3]))[0] == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision_at_k(rel[:1], np.array([2]), k=2)[0] == pytest.approx(1 / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_functions_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rel, n_pos = random_relevance(rng, q=40, k=int(rng.integers(1, 30)))
    ap = average_precision(rel, n_pos)
    ap_k = {k: average_precision_at_k(rel, n_pos, k=k) for k in (1, 5, 100)}
    recalls = recall_at_k(rel, ks=(1, 5, 10))
    for i in range(len(rel)):
        row = rel[i].tolist()
        np.testing.assert_allclose(ap[i], ref_ap(row, int(n_pos[i])), equal_nan=True)
        for k, values in ap_k.items():
            np.testing.assert_allclose(values[i], ref_ap(row, int(n_pos[i]), k), equal_nan=True)
        for k, values in recalls.items():
            assert values[i] == ref_recall(row, k)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="n_positives must have shape"):
        average_precision(np.zeros((2, 3), bool), np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.zeros(3, bool))


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("k", [1, 3, 12, 39, 40, 500])
@pytest.mark.parametrize("block_size", [1, 7, 4096])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_rank_gallery_matches_reference_with_ties(k: int, block_size: int, with_exclude: bool) -> None:
    rng = np.random.default_rng(k * 31 + block_size)
    # small integer entries: many exactly equal scores, including duplicated rows
    gallery = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    gallery[20:30] = gallery[0]
    query = rng.integers(-1, 2, size=(25, 3)).astype(np.float32)  # > 20 rows: faiss's BLAS path too
    exclude = None
    if with_exclude:
        exclude = rng.integers(-1, len(gallery), size=len(query))
        exclude[0] = 5
    scores, indices = rank_gallery(query, gallery, k, exclude=exclude, block_size=block_size)
    expected_k = min(k, len(gallery) - 1 if with_exclude else len(gallery))
    assert scores.shape == indices.shape == (len(query), expected_k)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    for qi in range(len(query)):
        skip = int(exclude[qi]) if exclude is not None else -1
        expected = ref_ranking(query[qi], gallery, skip)[:expected_k]
        assert indices[qi].tolist() == expected
        np.testing.assert_array_equal(scores[qi], gallery[expected] @ query[qi])


def test_rank_gallery_edge_cases() -> None:
    gallery = np.eye(3, dtype=np.float32)
    scores, indices = rank_gallery(gallery[:0], gallery, 2)
    assert scores.shape == indices.shape == (0, 2)
    scores, indices = rank_gallery(gallery[:1], gallery[:1], 5, exclude=np.array([0]))
    assert indices.shape == (1, 0)
    with pytest.raises(EmbeddingsError, match="dimension 2 but gallery embeddings have dimension 3"):
        rank_gallery(np.ones((1, 2), np.float32), gallery, 1)
    with pytest.raises(EmbeddingsError, match=r"exclude values must lie in \[-1, 2\]"):
        rank_gallery(gallery, gallery, 1, exclude=np.array([0, 1, 3]))


# ---------------------------------------------------------------- evaluate_retrieval


def assert_same_result(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, int):
            assert got[key] == value and isinstance(got[key], int), key
        else:
            assert isinstance(got[key], float) and 0.0 <= got[key] <= 1.0, key
            assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("top_k", [None, 1, 7])
def test_evaluate_retrieval_matches_reference(seed: int, top_k: int | None) -> None:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d", "e"]
    g_x = tie_vectors(rng, 60)
    g_x[40:50] = g_x[:10]  # duplicated rows: exact ties
    g_labels = rng.integers(-1, 4, size=60)  # label "e" never in the gallery, some unknown
    # powers of two: evaluate must normalise, and the normalised rows stay exact
    scale = (2.0 ** rng.integers(-2, 3, size=(60, 1))).astype(np.float32)
    gallery = make_embeddings(g_x * scale, g_labels, names, "g")
    q_labels = rng.integers(-1, 5, size=30)
    # The query file numbers its labels differently; relevance is by name.
    q_names = names[::-1]
    q_x = tie_vectors(rng, 30)
    query = make_embeddings(q_x, np.where(q_labels >= 0, 4 - q_labels, -1), q_names, "q")
    assert query.label_strings() == [names[i] if i >= 0 else None for i in q_labels]
    got = evaluate_retrieval(query, gallery, search=SearchOptions(top_k=top_k))
    expected = ref_evaluate(query, gallery, top_k, (1, 5, 10))
    assert_same_result(got, expected)
    assert got["queries"] + got["queries_without_positives"] == len(query)


@pytest.mark.parametrize("top_k", [None, 4])
def test_evaluate_retrieval_self_matches(top_k: int | None) -> None:
    rng = np.random.default_rng(7)
    x = tie_vectors(rng, 50)
    x[25:35] = x[:10]
    labels = rng.integers(-1, 5, size=50)
    labels[45] = 5  # the only row of label "5": no positive once its own row is excluded
    emb = make_embeddings(x, labels, [str(i) for i in range(6)], "img")
    got = evaluate_retrieval(emb, emb, ks=(1, 3), search=SearchOptions(top_k=top_k))
    expected = ref_evaluate(emb, emb, top_k, (1, 3))
    assert_same_result(got, expected)
    assert set(got) == {
        "map", "map@100", "recall@1", "recall@3", "queries", "gallery", "queries_without_positives"
    }


def test_evaluate_retrieval_mixed_self_and_new_queries() -> None:
    rng = np.random.default_rng(11)
    g_x, g_labels = tie_vectors(rng, 40), rng.integers(0, 3, size=40)
    gallery = make_embeddings(g_x, g_labels, ["x", "y", "z"], "g")
    # half the queries are gallery images (same ids), half are new
    q_x = np.concatenate([g_x[:10], tie_vectors(rng, 10)])
    q_labels = np.concatenate([g_labels[:10], rng.integers(0, 3, size=10)])
    ids = [f"g{i}" for i in range(10)] + [f"n{i}" for i in range(10)]
    query = Embeddings(q_x, q_labels, ids, ["x", "y", "z"])
    expected = ref_evaluate(query, gallery, None, (1, 5, 10))
    assert_same_result(evaluate_retrieval(query, gallery), expected)


def test_evaluate_retrieval_perfect_ranking() -> None:
    labels = np.repeat(np.arange(4), 3)
    x = np.eye(4, dtype=np.float32)[labels] * 3.0
    emb = make_embeddings(x, labels, ["a", "b", "c", "d"], "img")
    got = evaluate_retrieval(emb, emb)
    assert got == {
        "map": 1.0,
        "map@100": 1.0,
        "recall@1": 1.0,
        "recall@5": 1.0,
        "recall@10": 1.0,
        "queries": 12,
        "gallery": 12,
        "queries_without_positives": 0,
    }


def test_evaluate_retrieval_dimension_mismatch() -> None:
    q = make_embeddings(np.ones((2, 8), np.float32), [0, 0], ["a"], "q", model={"arch": "resnet18"})
    g = make_embeddings(np.ones((2, 4), np.float32), [0, 0], ["a"], "g")
    with pytest.raises(
        EmbeddingsError,
        match=r"dimension 8 \(arch=resnet18\).*dimension 4 \(unknown model\).*same embedding dimension",
    ):
        evaluate_retrieval(q, g)


def test_one_dimension_check_for_every_evaluator() -> None:
    check_same_dim(4, 4)
    with pytest.raises(EmbeddingsError, match=r"^query embeddings have dimension 8 but gallery embeddings have "
                                              r"dimension 4; extract query and gallery with models of the same "
                                              r"embedding dimension$"):
        check_same_dim(8, 4)
    with pytest.raises(EmbeddingsError, match=r"dimension 8 \(old\) but gallery embeddings have dimension 4 \(new\)"):
        check_same_dim(8, 4, "old", "new")
    # The search functions (arrays, a built index) raise the same error.
    gallery = np.eye(4, dtype=np.float32)
    with pytest.raises(EmbeddingsError, match="dimension 3 but gallery embeddings have dimension 4"):
        next(iter_index_rankings(build_index(gallery), np.ones((1, 3), np.float32), 1))


def test_evaluate_retrieval_empty_and_no_positives() -> None:
    g = make_embeddings(np.ones((2, 4), np.float32), [0, 1], ["a", "b"], "g")
    empty = make_embeddings(np.ones((0, 4), np.float32), np.zeros(0), ["a"], "q")
    with pytest.raises(EmbeddingsError, match="query embeddings have 0 rows"):
        evaluate_retrieval(empty, g)
    with pytest.raises(EmbeddingsError, match="gallery embeddings have 0 rows"):
        evaluate_retrieval(g, empty)
    q = make_embeddings(np.ones((2, 4), np.float32), [0, -1], ["c"], "q")
    with pytest.raises(EmbeddingsError, match="none of the 2 queries has a relevant gallery row"):
        evaluate_retrieval(q, g)


def test_tie_sort_handles_rows_in_any_order() -> None:
    from bctool.evaluate.search import _sort_by_score_then_index

    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(40, 12)).astype(np.float32)
    indices = np.stack([rng.permutation(30)[:12] for _ in range(40)]).astype(np.int64)
    order = np.argsort(-scores[:20], axis=1)  # half the rows descending as faiss returns them
    scores[:20] = np.take_along_axis(scores[:20], order, axis=1)
    indices[:20] = np.take_along_axis(indices[:20], order, axis=1)
    got_scores, got_indices = _sort_by_score_then_index(scores.copy(), indices.copy())
    for r in range(len(scores)):
        expected = sorted(zip(scores[r].tolist(), indices[r].tolist()), key=lambda t: (-t[0], t[1]))
        assert list(zip(got_scores[r].tolist(), got_indices[r].tolist())) == expected


def test_same_ids_from_different_dataset_roots_are_not_self_matches() -> None:
    """Two ImageFolder trees with the same relative names hold different images."""
    emb = np.eye(2, dtype=np.float32)
    q = Embeddings(emb, np.array([0, 1]), ["cls/1", "cls/2"], ["a", "b"], root="/data/google")
    g = Embeddings(emb, np.array([0, 1]), ["cls/1", "cls/2"], ["a", "b"], root="/data/twitter")
    assert evaluate_retrieval(q, g)["map"] == 1.0  # each query finds its own class
    same_root = Embeddings(emb, np.array([0, 1]), ["cls/1", "cls/2"], ["a", "b"], root="/data/google")
    with pytest.raises(EmbeddingsError, match="none of the 2 queries has a relevant gallery row"):
        evaluate_retrieval(q, same_root)  # now they are the same images: nothing left to find
