"""Compatibility metrics: update gain, P scores, the bootstrap of delta, model chains and backfill."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from bctool.backfill.curve import Headline, backfill_curve, partial_backfill
from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate import scores as score_functions
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.protocols import Protocol, Table, make_protocol
from bctool.evaluate.reports import (
    BackfillOptions,
    CompatibilityOptions,
    backfill_report,
    backfill_table,
    chain_matrix,
    chain_report,
    chain_table,
    compatibility_report,
    compatibility_table,
    delta_interval,
)
from bctool.evaluate.retrieval import evaluate_retrieval, evaluate_retrieval_per_query
from bctool.evaluate.search import SearchOptions
from bctool.evaluate.scores import (
    bootstrap_interval,
    bootstrap_means,
    chain_scores,
    compatibility_verdict,
    paired_delta,
    paper_scores,
    update_gain,
)
from bctool.utils.plotting import plot_backfill

LABEL_NAMES = ["a", "b", "c", "d"]


def _emb(rows: np.ndarray, labels, ids, model: str = "m") -> Embeddings:
    return Embeddings(
        embeddings=np.asarray(rows, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        ids=list(ids),
        label_names=LABEL_NAMES,
        model={"name": model},
    )


# --- update gain and the paper's P scores ----------------------------------------------------


def test_update_gain_by_hand() -> None:
    # (0.6 - 0.5) / (0.8 - 0.5) = 0.1 / 0.3
    assert update_gain(0.6, 0.5, 0.8) == pytest.approx(1 / 3)
    assert update_gain(0.5, 0.5, 0.8) == pytest.approx(0.0)
    assert update_gain(0.4, 0.5, 0.7) == pytest.approx(-0.5)
    assert update_gain(0.6, 0.5, 0.5) is None


def test_paper_scores_one_dataset_by_hand() -> None:
    scores = paper_scores([{"m_oo": 0.5, "m_nn": 0.72, "m_no": 0.6, "m_star": 0.8}])
    # up = (0.72 - 0.8) / 0.8 = -0.1; sigma(-0.1) = 1 / (1 + e^0.1) = 1 / 2.105170918 = 0.475020813
    assert scores["p_up"] == pytest.approx(47.5020813, abs=1e-6)
    # gain = 1/3; sigma(1/3) = 1 / (1 + e^-(1/3)) = 1 / 1.716531311 = 0.582570206
    assert scores["p_comp"] == pytest.approx(58.2570206, abs=1e-6)
    # P_1 = 2 * 47.5020813 * 58.2570206 / (47.5020813 + 58.2570206) = 5534.6595 / 105.7591019
    assert scores["p_1"] == pytest.approx(52.3327, abs=1e-4)
    p_up, p_comp = scores["p_up"], scores["p_comp"]
    assert scores["p_1"] == pytest.approx(2 / (1 / p_up + 1 / p_comp))


def test_paper_scores_average_the_ratios_over_datasets() -> None:
    a = {"m_oo": 0.5, "m_nn": 0.72, "m_no": 0.6, "m_star": 0.8}  # up -0.1, gain 1/3
    b = {"m_oo": 0.2, "m_nn": 0.3, "m_no": 0.3, "m_star": 0.3}  # up 0, gain 1
    scores = paper_scores([a, b])
    # mean up = -0.05: sigma = 1 / (1 + e^0.05) = 1 / 2.051271096 = 0.487502604
    assert scores["p_up"] == pytest.approx(48.7502604, abs=1e-6)
    # mean gain = 2/3: sigma = 1 / (1 + e^-(2/3)) = 1 / 1.513417119 = 0.660756369
    assert scores["p_comp"] == pytest.approx(66.0756369, abs=1e-6)
    # METHOD.md: P_1 = harmonic mean = 2 * 48.7502604 * 66.0756369 / 114.8258973 = 56.1059
    assert scores["p_1"] == pytest.approx(56.1059, abs=1e-4)
    expected_p1 = 2 * scores["p_up"] * scores["p_comp"] / (scores["p_up"] + scores["p_comp"])
    assert scores["p_1"] == pytest.approx(expected_p1)


def test_paper_scores_errors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        paper_scores([])
    with pytest.raises(ConfigError, match="m_star"):
        paper_scores([{"m_oo": 0.5, "m_nn": 0.7, "m_no": 0.6}])
    # M(*,*) == M(o,o): the update gain is undefined, so P_comp and P_1 are null, not an error.
    undefined = paper_scores([{"m_oo": 0.5, "m_nn": 0.7, "m_no": 0.6, "m_star": 0.5}])
    assert (undefined["p_comp"], undefined["p_1"]) == (None, None) and undefined["p_up"] is not None


def test_compatibility_report() -> None:
    report = compatibility_verdict({"m_oo": 0.5, "m_nn": 0.72, "m_no": 0.6, "m_star": 0.8})
    assert report["compatible"] is True
    assert report["update_gain"] == pytest.approx(1 / 3)
    assert report["p_up"] == pytest.approx(47.5020813, abs=1e-6)
    assert report["p_comp"] == pytest.approx(58.2570206, abs=1e-6)
    assert report["p_1"] == pytest.approx(52.3327, abs=1e-4)
    assert {k: report[k] for k in ("m_oo", "m_nn", "m_no", "m_star")} == {
        "m_oo": 0.5, "m_nn": 0.72, "m_no": 0.6, "m_star": 0.8
    }

    without_star = compatibility_verdict({"m_oo": 0.5, "m_nn": 0.72, "m_no": 0.5})
    assert without_star == {"m_oo": 0.5, "m_nn": 0.72, "m_no": 0.5, "compatible": False}
    with pytest.raises(ConfigError, match="m_no"):
        compatibility_verdict({"m_oo": 0.5, "m_nn": 0.72})


# --- delta M(n,o) - M(o,o) and its paired bootstrap interval --------------------------------


def _slow_bootstrap_means(diff: np.ndarray, n: int, seed: int) -> np.ndarray:
    """One resample at a time: draw len(diff) indices with replacement, take the mean."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        idx = rng.integers(0, len(diff), size=len(diff))
        means.append(np.mean(diff[idx]))
    return np.array(means)


@pytest.mark.parametrize("block_elements", [1 << 22, 100])
def test_bootstrap_equals_a_slow_reference(block_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 elements per block: 2 resamples of 37 queries per draw, so blocks split the stream.
    monkeypatch.setattr(score_functions, "_BOOTSTRAP_ELEMENTS", block_elements)
    rng = np.random.default_rng(11)
    old = rng.uniform(size=37)
    new = np.clip(old + rng.normal(0.05, 0.2, size=37), 0, 1)
    reference = _slow_bootstrap_means(new - old, 251, seed=5)
    np.testing.assert_array_equal(bootstrap_means(new - old, 251, seed=5), reference)
    low, high = bootstrap_interval(new, old, n=251, seed=5, level=0.9)
    assert (low, high) == tuple(np.quantile(reference, [(1 - 0.9) / 2, (1 + 0.9) / 2]))
    assert low < float(np.mean(new - old)) < high
    assert bootstrap_interval(new, old, n=251, seed=6, level=0.9) != (low, high)


def test_bootstrap_interval_covers_the_true_delta_about_95_percent() -> None:
    """300 datasets of 200 paired queries; AP-like values in [0, 1], correlated old and new.

    old ~ Beta(2, 2) (mean 1/2), new = 0.7 old + 0.3 Beta(5, 2) (mean 0.35 + 0.3 * 5/7),
    so the true delta is 0.3 * 5/7 - 0.15 = 0.0642857...
    """
    true_delta = 0.3 * 5 / 7 - 0.15
    rng = np.random.default_rng(2024)
    datasets, queries = 300, 200
    old = rng.beta(2, 2, size=(datasets, queries))
    new = 0.7 * old + 0.3 * rng.beta(5, 2, size=(datasets, queries))
    covered = 0
    for d in range(datasets):
        low, high = bootstrap_interval(new[d], old[d], n=400, seed=d, level=0.95)
        covered += low <= true_delta <= high
    assert 0.90 <= covered / datasets <= 0.99


def _scores(ids: list[str], ap: list[float]) -> QueryAP:
    return QueryAP(tuple(ids), np.array(ap, dtype=np.float64))


def test_paired_delta_pairs_by_id() -> None:
    old = _scores(["a", "b", "c", "d"], [0.2, 0.4, 0.6, 0.8])
    new = _scores(["d", "c", "b", "a"], [0.9, 0.7, 0.4, 0.3])  # another order: paired by id
    result = paired_delta(old, new, n=200, seed=1)
    assert set(result) == {"delta", "delta_low", "delta_high", "bootstrap", "compatible_significant"}
    # differences a..d: 0.1, 0.0, 0.1, 0.1
    assert result["delta"] == pytest.approx(0.075)
    assert result["bootstrap"] == 200
    assert 0.0 <= result["delta_low"] <= result["delta"] <= result["delta_high"] <= 0.1 + 1e-12
    assert result["compatible_significant"] is (result["delta_low"] > 0)
    assert paired_delta(old, new, n=0) == {"delta": pytest.approx(0.075)}
    worse = _scores(["a", "b", "c", "d"], [0.1, 0.3, 0.5, 0.7])
    assert paired_delta(old, worse, n=200)["compatible_significant"] is False


def test_paired_delta_uses_the_shared_queries_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    old = _scores(["a", "b", "c"], [0.2, 0.4, 0.6])
    new = _scores(["b", "c", "z"], [0.5, 0.9, 1.0])
    with caplog.at_level("WARNING", logger="bctool.evaluate.scores"):
        result = paired_delta(old, new, n=0)
    assert result["delta"] == pytest.approx(((0.5 - 0.4) + (0.9 - 0.6)) / 2)
    assert "1 only old, 1 only new" in caplog.text and "the 2 they share" in caplog.text
    with pytest.raises(EmbeddingsError, match="share no evaluated query.*'a'.*'x'.*same ids"):
        paired_delta(old, _scores(["x"], [0.5]), n=10)
    with pytest.raises(EmbeddingsError, match="new queries list 1 ids more than once \\('b'\\)"):
        paired_delta(old, _scores(["b", "b"], [0.5, 0.6]), n=10)


def test_bootstrap_options_are_checked_naming_the_value() -> None:
    old = _scores(["a", "b"], [0.2, 0.4])
    with pytest.raises(ConfigError, match="resamples must be an integer >= 0.*got -1"):
        paired_delta(old, old, n=-1)
    for level in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=f"strictly between 0 and 1.*got {level}"):
            paired_delta(old, old, n=10, level=level)
    with pytest.raises(ConfigError, match="at least 1 resample, got 0"):
        bootstrap_interval(np.ones(3), np.ones(3), n=0)
    with pytest.raises(ConfigError, match=r"shapes \(3,\) and \(2,\)"):
        bootstrap_interval(np.ones(3), np.ones(2), n=5)


def _compat_models() -> dict[str, tuple[Embeddings, Embeddings]]:
    """v1 of _chain_versions as the old model, v2 (cleaner, same space) as the new one; queries
    of both models share their ids (the same query images)."""
    (oq, og), (nq, ng), _ = _chain_versions()
    nq = _emb(nq.embeddings, nq.labels, oq.ids, "v2")
    return {"old": (oq, og), "new": (nq, ng)}


def test_per_query_ap_means_are_the_reported_map() -> None:
    (oq, og), _ = _compat_models().values()
    # Label "d" is not in this gallery: those queries are skipped.
    kept = og.labels != 3
    gallery = _emb(og.embeddings[kept], og.labels[kept], np.array(og.ids)[kept])
    with_d = [i for i, label in zip(oq.ids, oq.labels) if label != 3]
    cases = [(oq, og, None, oq.ids), (oq, gallery, None, with_d), (oq, gallery, 5, with_d),
             (oq, oq, None, oq.ids)]  # the query file as its own gallery: self rows left out
    for query, gal, top_k, evaluated in cases:
        result, scores = evaluate_retrieval_per_query(query, gal, search=SearchOptions(top_k=top_k))
        assert result == evaluate_retrieval(query, gal, search=SearchOptions(top_k=top_k))
        assert list(scores.ids) == list(evaluated) and len(scores) == result["queries"]
        assert float(np.mean(scores.ap)) == pytest.approx(result["map"], rel=1e-12, abs=1e-15)
    assert result["queries_without_positives"] == 0 and cases[1][3] != oq.ids
    protocol = make_protocol(top_k=5)
    metrics, scores = protocol.per_query(oq, gallery)
    assert metrics == protocol.evaluate(oq, gallery)
    assert float(np.mean(scores.ap)) == pytest.approx(metrics["map"], rel=1e-12)


def test_delta_interval_is_m_no_minus_m_oo() -> None:
    models = _compat_models()
    (oq, og), (nq, _) = models["old"], models["new"]
    result = delta_interval(oq, og, nq, make_protocol(), n=500, seed=3)
    m_oo, m_no = evaluate_retrieval(oq, og)["map"], evaluate_retrieval(nq, og)["map"]
    assert result["delta"] == pytest.approx(m_no - m_oo, abs=1e-12)
    assert result["delta_low"] < result["delta"] < result["delta_high"]
    assert result == delta_interval(oq, og, nq, make_protocol(), n=500, seed=3)
    assert result["compatible_significant"] is (result["delta_low"] > 0)
    with pytest.raises(ConfigError, match="got -1"):
        delta_interval(oq, og, nq, make_protocol(), n=-1)


def test_compatibility_report_assembles_the_report() -> None:
    models = _compat_models()
    report = compatibility_report(models["old"], models["new"], make_protocol(), options=CompatibilityOptions(bootstrap=300, seed=1))
    assert report["metric"] == "map" and list(report["results"]) == ["old/old", "new/new", "new/old"]
    assert report["m_no"] == report["results"]["new/old"]["map"]
    assert report["compatible"] is (report["m_no"] > report["m_oo"])
    assert report["delta"] == pytest.approx(report["m_no"] - report["m_oo"], abs=1e-12)
    assert report["bootstrap"] == 300 and report["compatible_significant"] is (report["delta_low"] > 0)
    assert {k: report[k] for k in ("delta", "delta_low", "delta_high")} == {
        k: v for k, v in delta_interval(*models["old"], models["new"][0], make_protocol(), n=300, seed=1).items()
        if k.startswith("delta")
    }
    off = compatibility_report(models["old"], models["new"], make_protocol(), options=CompatibilityOptions(bootstrap=0))
    assert "delta" in off and not {"delta_low", "delta_high", "bootstrap", "compatible_significant"} & set(off)
    with pytest.raises(ConfigError, match="got -1"):
        compatibility_report(models["old"], models["new"], make_protocol(), options=CompatibilityOptions(bootstrap=-1))


# --- model chains -----------------------------------------------------------------------------


def test_chain_scores_by_hand() -> None:
    m = np.array(
        [
            [0.50, 0.10, 0.05],
            [0.55, 0.60, 0.20],
            [0.45, 0.65, 0.70],
        ]
    )
    scores = chain_scores(m)
    # Pairs i > j: (2,1) 0.55 > 0.50 yes; (3,1) 0.45 > 0.50 no; (3,2) 0.65 > 0.60 yes.
    assert scores["ac"] == pytest.approx(2 / 3)
    # BC over i = 1..T-1: ((0.45 - 0.50) + (0.65 - 0.60)) / 2 = 0; i = T would add a 0 term.
    assert scores["bc"] == pytest.approx(0.0)
    m[2, 1] = 0.70
    assert chain_scores(m)["bc"] == pytest.approx(((0.45 - 0.50) + (0.70 - 0.60)) / 2)
    assert chain_scores(np.array([[0.5]])) == {"ac": None, "bc": None}
    with pytest.raises(ConfigError, match="square"):
        chain_scores(np.zeros((2, 3)))


def _chain_versions() -> list[tuple[Embeddings, Embeddings]]:
    """v1 noisy, v2 a cleaner model in v1's space, v3 clean but in a rotated (incompatible) space."""
    rng = np.random.default_rng(0)
    dim, per_class = 16, 6
    centers = rng.normal(size=(len(LABEL_NAMES), dim))
    labels = np.repeat(np.arange(len(LABEL_NAMES)), per_class)
    q_ids = [f"q{i}" for i in range(len(labels))]
    g_ids = [f"g{i}" for i in range(len(labels))]
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    versions = []
    for v, (noise, rot) in enumerate([(1.2, None), (0.3, None), (0.3, rotation)], start=1):
        q = centers[labels] + noise * rng.normal(size=(len(labels), dim))
        g = centers[labels] + noise * rng.normal(size=(len(labels), dim))
        if rot is not None:
            q, g = q @ rot, g @ rot
        versions.append((_emb(q, labels, q_ids, f"v{v}"), _emb(g, labels, g_ids, f"v{v}")))
    return versions


def test_chain_matrix_matches_direct_evaluation() -> None:
    versions = _chain_versions()
    m = chain_matrix(versions)
    assert m.shape == (3, 3)
    for i, (query, _) in enumerate(versions):
        for j, (_, gallery) in enumerate(versions):
            assert m[i, j] == pytest.approx(evaluate_retrieval(query, gallery)["map"])
    # v2 is compatible with v1; v3 is compatible with neither.
    assert m[1, 0] > m[0, 0]
    assert m[2, 0] < m[0, 0] and m[2, 1] < m[1, 1]
    scores = chain_scores(m)
    assert scores["ac"] == pytest.approx(1 / 3)
    assert scores["bc"] == pytest.approx(((m[2, 0] - m[0, 0]) + (m[2, 1] - m[1, 1])) / 2)
    assert scores["bc"] < 0


def test_chain_matrix_orientation() -> None:
    versions = _chain_versions()
    calls = []

    def fake(query: Embeddings, gallery: Embeddings) -> dict[str, float]:
        calls.append((query.model["name"], gallery.model["name"]))
        return {"map": 10 * int(query.model["name"][1]) + int(gallery.model["name"][1])}

    m = chain_matrix(versions, evaluate=fake)
    assert m.tolist() == [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    assert len(calls) == 9
    with pytest.raises(ConfigError, match="at least one"):
        chain_matrix([])


# --- partial backfill -------------------------------------------------------------------------


def _galleries(n: int = 20, dim: int = 8, seed: int = 1) -> tuple[Embeddings, Embeddings, np.ndarray]:
    """Old and new galleries of the same ids; the new one is shuffled. Returns the shuffle too."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(LABEL_NAMES)
    ids = [f"img{i:02d}" for i in range(n)]
    old = _emb(rng.normal(size=(n, dim)), labels, ids, "old")
    new_rows = rng.normal(size=(n, dim))
    perm = rng.permutation(n)
    new = _emb(new_rows[perm], labels[perm], [ids[i] for i in perm], "new")
    return old, new, new_rows.astype(np.float32)


def _from_new(mixed: Embeddings, old: Embeddings) -> set[int]:
    return set(np.flatnonzero(np.any(mixed.embeddings != old.embeddings, axis=1)).tolist())


def test_partial_backfill_endpoints_and_alignment() -> None:
    old, new, new_in_old_order = _galleries()
    none = partial_backfill(old, new, 0.0, seed=0)
    np.testing.assert_array_equal(none.embeddings, old.embeddings)
    full = partial_backfill(old, new, 1.0, seed=0)
    np.testing.assert_array_equal(full.embeddings, new_in_old_order)
    for mixed in (none, full):
        assert mixed.ids == old.ids
        np.testing.assert_array_equal(mixed.labels, old.labels)
    assert full.model == {"backfill": 1.0, "old": {"name": "old"}, "new": {"name": "new"}}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_partial_backfill_count_and_rows(fraction: float) -> None:
    old, new, new_in_old_order = _galleries()
    mixed = partial_backfill(old, new, fraction, seed=3)
    rows = sorted(_from_new(mixed, old))
    assert len(rows) == round(fraction * len(old))
    np.testing.assert_array_equal(mixed.embeddings[rows], new_in_old_order[rows])
    rest = sorted(set(range(len(old))) - set(rows))
    np.testing.assert_array_equal(mixed.embeddings[rest], old.embeddings[rest])


def test_partial_backfill_is_nested_and_seeded() -> None:
    old, new, _ = _galleries()
    sets = [_from_new(partial_backfill(old, new, f, seed=7), old) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    for smaller, larger in zip(sets, sets[1:]):
        assert smaller < larger
    assert _from_new(partial_backfill(old, new, 0.5, seed=7), old) == sets[2]
    assert _from_new(partial_backfill(old, new, 0.5, seed=8), old) != sets[2]


def test_partial_backfill_errors() -> None:
    old, new, _ = _galleries()
    renamed = _emb(new.embeddings, new.labels, ["zz"] + new.ids[1:], "new")
    with pytest.raises(EmbeddingsError, match=r"1 ids are only in the old gallery \('img\d\d'\).*'zz'"):
        partial_backfill(old, renamed, 0.5, seed=0)
    many = _emb(new.embeddings, new.labels, [f"x{i}" for i in range(len(new))], "new")
    with pytest.raises(EmbeddingsError, match="20 ids are only in the old gallery .* and 15 more"):
        partial_backfill(old, many, 0.5, seed=0)
    narrow = _emb(new.embeddings[:, :4], new.labels, new.ids, "new")
    with pytest.raises(EmbeddingsError, match="dimension 8 but the new gallery has dimension 4"):
        partial_backfill(old, narrow, 0.5, seed=0)
    short = _emb(new.embeddings[:5], new.labels[:5], new.ids[:5], "new")
    with pytest.raises(EmbeddingsError, match="20 rows but the new one has 5"):
        partial_backfill(old, short, 0.5, seed=0)
    with pytest.raises(ConfigError, match=r"\[0, 1\], got 1.5"):
        partial_backfill(old, new, 1.5, seed=0)


def test_backfill_curve_rises_to_perfect() -> None:
    """New embeddings are one-hot class vectors; old ones live in an orthogonal subspace."""
    rng = np.random.default_rng(2)
    n_classes, per_class = len(LABEL_NAMES), 5
    labels = np.repeat(np.arange(n_classes), per_class)
    n = len(labels)
    dim = 2 * n_classes
    onehot = np.eye(dim)[labels]
    old_rows = np.zeros((n, dim))
    old_rows[:, n_classes:] = rng.normal(size=(n, n_classes))  # scores exactly 0 against queries
    ids = [f"g{i}" for i in range(n)]
    old = _emb(old_rows, labels, ids, "old")
    perm = rng.permutation(n)
    new = _emb(onehot[perm], labels[perm], [ids[i] for i in perm], "new")
    query = _emb(np.eye(dim)[np.arange(n_classes)], np.arange(n_classes), ["q0", "q1", "q2", "q3"], "new")

    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    curve = backfill_curve(query, old, new, fractions, seed=0)
    assert [point["fraction"] for point in curve] == fractions
    maps = [point["map"] for point in curve]
    assert all(a <= b + 1e-12 for a, b in zip(maps, maps[1:]))
    assert maps[0] == pytest.approx(evaluate_retrieval(query, old)["map"])
    assert maps[0] < maps[2] < maps[-1] == pytest.approx(1.0)
    assert {"recall@1", "map@100", "queries"} <= set(curve[0])


def _headline_only(key: str) -> Protocol:
    """The labelled protocol with its metrics under one other name, as GLDv2 has ``map@100``:
    every report must read the protocol's headline key, never ``map``."""
    labels = make_protocol()

    def evaluate(q: Embeddings, g: Embeddings) -> dict:
        return {key: labels.evaluate(q, g)["map"], "queries": len(q)}

    def per_query(q: Embeddings, g: Embeddings) -> tuple:
        metrics, scores = labels.per_query(q, g)
        return {key: metrics["map"], "queries": len(q)}, scores

    return Protocol("renamed", evaluate, key, per_query)


def test_chain_and_backfill_read_the_headline_key() -> None:
    versions = _chain_versions()
    by_map = chain_matrix(versions)
    np.testing.assert_array_equal(chain_matrix(versions, _headline_only("score").evaluate, key="score"), by_map)
    old, new, _ = _galleries()
    curve = backfill_curve(new, old, new, [0.0, 1.0], headline=Headline(_headline_only("score").evaluate, "score"))
    assert [set(point) for point in curve] == [{"fraction", "score", "queries"}] * 2


def test_chain_report() -> None:
    versions = _chain_versions()
    report = chain_report(versions, make_protocol())
    m = chain_matrix(versions)
    assert report == {"metric": "map", "matrix": m.tolist(), **chain_scores(m)}
    assert list(report) == ["metric", "matrix", "ac", "bc"]
    renamed = chain_report(versions, _headline_only("map@100"))
    assert renamed == {**report, "metric": "map@100"}
    table = chain_table(renamed)
    assert table.title == "M[i][j] (map@100, gallery by column)" and table.columns == ("v1", "v2", "v3")
    assert table.rows["v3 queries"] == {f"v{j + 1}": m[2, j] for j in range(3)}


def test_backfill_report(tmp_path) -> None:
    (oq, og), (nq, ng), _ = _chain_versions()
    ng = _emb(ng.embeddings, ng.labels, og.ids, "v2")  # the same gallery images
    protocol = make_protocol()
    report = backfill_report(nq, og, ng, protocol, BackfillOptions((0.0, 0.5, 1.0), seed=4), old_query=oq)
    assert list(report) == ["metric", "seed", "order", "scoring", "m_oo", "m_nn", "curve", "area", "plot"]
    assert report["metric"] == "map" and report["seed"] == 4 and report["plot"] is None
    assert report["curve"] == backfill_curve(nq, og, ng, [0.0, 0.5, 1.0], seed=4)
    assert report["m_oo"] == evaluate_retrieval(oq, og)["map"] and report["m_nn"] == evaluate_retrieval(nq, ng)["map"]
    assert report["curve"][-1]["map"] == report["m_nn"]
    assert backfill_report(nq, og, ng, protocol, BackfillOptions((0.0,)), old_query=None)["m_oo"] is None

    renamed = backfill_report(nq, og, ng, _headline_only("map@100"), BackfillOptions((0.0, 1.0), seed=4), old_query=oq)
    assert renamed["metric"] == "map@100" and renamed["m_oo"] == report["m_oo"]
    assert [c["map@100"] for c in renamed["curve"]] == [report["curve"][0]["map"], report["m_nn"]]
    assert backfill_table(renamed) == Table("partial backfill (map@100)", {
        "0.00": {"map@100": report["curve"][0]["map"]}, "1.00": {"map@100": report["m_nn"]}}, ("map@100",))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    out = tmp_path / "curve.png"
    drawn = backfill_report(nq, og, ng, _headline_only("map@100"), BackfillOptions((0.0, 1.0), plot=out))
    assert drawn["plot"] == str(out) and out.read_bytes()[:4] == b"\x89PNG"


def test_compatibility_table() -> None:
    models = _compat_models()
    report = compatibility_report(models["old"], models["new"], _headline_only("map@100"), options=CompatibilityOptions(bootstrap=0))
    assert report["metric"] == "map@100" and report["m_no"] == report["results"]["new/old"]["map@100"]
    table = compatibility_table(report)
    assert table.title == "compatibility (map@100)" and table.columns == ("map@100",)
    assert table.rows == {pair: {"map@100": r["map@100"]} for pair, r in report["results"].items()}


# --- plot -------------------------------------------------------------------------------------


def test_plot_backfill_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    curve = [{"fraction": f, "map": 0.2 + 0.5 * f} for f in (0.0, 0.5, 1.0)]
    out = tmp_path / "plots" / "backfill.png"
    plot_backfill(curve, out, old_map=0.3, new_map=0.7)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["backfill.png"]
    plot_backfill([{"fraction": f, "map@100": 0.5} for f in (0.0, 1.0)], out, key="map@100")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_backfill_without_matplotlib(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot_backfill([{"fraction": 0.0, "map": 0.5}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sigmoid_extremes_do_not_overflow() -> None:
    scores = paper_scores([{"m_oo": 0.0, "m_nn": 1.0, "m_no": -1e6, "m_star": 1e-9}])
    assert 0.0 <= scores["p_comp"] < 1e-6
    assert math.isfinite(scores["p_1"])
