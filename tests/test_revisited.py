"""Revisited Oxford/Paris: ground-truth loading, protocols, AP and mP@k against a slow reference."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import DataError, EmbeddingsError
from bctool.evaluate.inputs import id_stem, match_rows
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.protocols.revisited.files import RevisitedGroundTruth, load_gnd
from bctool.evaluate.protocols.revisited.metric import (
    DIFFICULTIES,
    difficulty_sets,
    evaluate_revisited,
    evaluate_revisited_per_query,
    junk_free_ranks,
    revisited_ap,
    revisited_precision_at_k,
)

KAPPAS = (1, 3, 5, 10, 60)


# --- slow, obvious reference: a direct port of revisitop's python/evaluate.py -----------------


def ref_compute_ap(ranks: np.ndarray, nres: int) -> float:
    ap = 0.0
    recall_step = 1.0 / nres
    for j in range(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranks: np.ndarray, gnd: list[dict], kappas=()) -> tuple:
    """``ranks`` is (db_size x queries); returns map, aps, pr, prs as the published code does."""
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    total, nempty = 0.0, 0
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i].get("junk", np.empty(0)))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = ref_compute_ap(pos, len(qgnd))
        total += ap
        aps[i] = ap
        pos += 1
        for j in range(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return total / (nq - nempty), aps, pr / (nq - nempty), prs


def ref_protocol(gnd: dict, protocol: str) -> list[dict]:
    """The protocols as revisitop's example_evaluate.py builds them."""
    out = []
    for g in gnd["gnd"]:
        easy, hard, junk = (np.asarray(g[key], dtype=np.int64) for key in ("easy", "hard", "junk"))
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def masks(ranks: np.ndarray, sets: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-order ok/junk masks ``(Q, N)`` and positive counts from (N x Q) ``ranks``."""
    order = ranks.T
    ok = np.stack([np.isin(order[i], s["ok"]) for i, s in enumerate(sets)])
    junk = np.stack([np.isin(order[i], s["junk"]) for i, s in enumerate(sets)])
    n_pos = np.array([len(np.unique(s["ok"])) for s in sets])
    return ok, junk, n_pos


# --- fixtures ---------------------------------------------------------------------------------


def random_gnd(rng: np.random.Generator, n_query: int, n_gallery: int, overlap: bool = False) -> dict:
    """Disjoint easy/hard/junk sets (or independent ones with ``overlap``), some of them empty."""
    entries = []
    for q in range(n_query):
        if overlap:
            sets = [rng.choice(n_gallery, rng.integers(0, 8), replace=False) for _ in range(3)]
            if q % 7 == 0:
                sets[0] = sets[1] = np.zeros(0, np.int64)
        else:
            sizes = rng.integers(0, 8, size=3)
            if q % 7 == 0:
                sizes[:2] = 0  # no positives in any protocol
            elif q % 5 == 0:
                sizes[1] = 0  # no hard positives
            picked = rng.choice(n_gallery, int(sizes.sum()), replace=False)
            sets = np.split(picked, np.cumsum(sizes)[:2])
        entries.append(
            {
                "easy": [int(x) for x in sets[0]],
                "hard": np.asarray(sets[1], dtype=np.int64),
                "junk": [int(x) for x in sets[2]],
                "bbx": [1.0, 2.0, 30.5, 40.0],
            }
        )
    return {
        "imlist": [f"img_{i:04d}" for i in range(n_gallery)],
        "qimlist": [f"query_{q:03d}" for q in range(n_query)],
        "gnd": entries,
    }


def write_pickle(path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path


def embeddings(vectors: np.ndarray, ids: list[str]) -> Embeddings:
    return Embeddings(
        embeddings=np.asarray(vectors, dtype=np.float32),
        labels=np.full(len(ids), -1, dtype=np.int64),
        ids=ids,
        label_names=[],
    )


# --- pure metrics -----------------------------------------------------------------------------


def test_hand_computed_example() -> None:
    # Ranking: positive, junk, negative, positive, negative, positive.
    ok = np.array([[1, 0, 0, 1, 0, 1]], dtype=bool)
    junk = np.array([[0, 1, 0, 0, 0, 0]], dtype=bool)
    assert junk_free_ranks(junk).tolist() == [[0, 1, 1, 2, 3, 4]]
    # Positives at junk-free ranks 0, 2, 4: trapezoids (1+1)/2, (1/2+2/3)/2, (2/4+3/5)/2.
    expected_ap = (1.0 + (0.5 + 2 / 3) / 2 + (0.5 + 0.6) / 2) / 3
    np.testing.assert_allclose(revisited_ap(ok, junk, np.array([3])), [expected_ap])
    pr = revisited_precision_at_k(ok, junk, np.array([3]), ks=(1, 3, 5, 10))
    # k is capped at the junk-free 1-based rank of the last positive (5).
    assert pr[1].tolist() == [1.0]
    np.testing.assert_allclose(pr[3], [2 / 3])
    np.testing.assert_allclose(pr[5], [3 / 5])
    np.testing.assert_allclose(pr[10], [3 / 5])


def test_precision_caps_k_at_last_positive() -> None:
    # Both positives on top: k = 10 > 2 positives still gives precision 1, as in compute_map.
    ok = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=bool)
    junk = np.zeros_like(ok)
    pr = revisited_precision_at_k(ok, junk, np.array([2, 2]), ks=(10,))
    np.testing.assert_allclose(pr[10], [1.0, 0.5])


def test_no_positives_gives_nan() -> None:
    ok = np.zeros((2, 4), dtype=bool)
    ok[1, 2] = True
    junk = np.zeros_like(ok)
    ap = revisited_ap(ok, junk, np.array([0, 1]))
    # One positive at rank 2: (0/2 + 1/3) / 2.
    assert np.isnan(ap[0]) and ap[1] == pytest.approx(1 / 6)
    pr = revisited_precision_at_k(ok, junk, np.array([0, 1]), ks=(1,))
    assert np.isnan(pr[1][0]) and pr[1][1] == 0.0


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_reference_on_random_rankings(seed: int, overlap: bool) -> None:
    rng = np.random.default_rng(seed)
    n_query, n_gallery = 40, 50
    gnd = random_gnd(rng, n_query, n_gallery, overlap=overlap)
    ranks = np.stack([rng.permutation(n_gallery) for _ in range(n_query)], axis=1)  # N x Q
    for protocol in DIFFICULTIES:
        sets = ref_protocol(gnd, protocol)
        if overlap:  # duplicates within "ok" would make the reference count a positive twice
            sets = [{"ok": np.unique(s["ok"]), "junk": s["junk"]} for s in sets]
        ref_map, ref_aps, ref_pr, ref_prs = ref_compute_map(ranks, sets, KAPPAS)
        ok, junk, n_pos = masks(ranks, sets)
        aps = revisited_ap(ok, junk, n_pos)
        np.testing.assert_allclose(aps, ref_aps, rtol=1e-12, atol=1e-12)
        assert np.nanmean(aps) == pytest.approx(ref_map, rel=1e-12)
        prs = revisited_precision_at_k(ok, junk, n_pos, KAPPAS)
        for j, k in enumerate(KAPPAS):
            np.testing.assert_allclose(prs[k], ref_prs[:, j], rtol=1e-12, atol=1e-12)
            assert np.nanmean(prs[k]) == pytest.approx(ref_pr[j], rel=1e-12)
        assert np.isnan(aps).any()  # empty-positive queries were exercised


def test_difficulty_sets() -> None:
    gnd = RevisitedGroundTruth(
        gallery_names=tuple("abcdef"),
        query_names=("q",),
        easy=(np.array([0, 1]),),
        hard=(np.array([2]),),
        junk=(np.array([3, 1]),),
        bbx=np.zeros((1, 4)),
    )
    expected = {"easy": ([0, 1], [1, 2, 3]), "medium": ([0, 1, 2], [1, 3]), "hard": ([2], [0, 1, 3])}
    for difficulty, (want_ok, want_junk) in expected.items():
        ok, junk = difficulty_sets(gnd, difficulty)
        assert [a.tolist() for a in ok] == [want_ok]
        assert [a.tolist() for a in junk] == [want_junk]
    with pytest.raises(Exception, match="difficulty must be one of"):
        difficulty_sets(gnd, "extreme")


# --- end to end -------------------------------------------------------------------------------


def ref_ranking(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(N x Q) ranking by descending score, ties by index, with plain loops."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    cols = []
    for i in range(len(qn)):
        scores = [float(np.dot(qn[i], gn[j])) for j in range(len(gn))]
        cols.append(sorted(range(len(gn)), key=lambda j: (-scores[j], j)))
    return np.array(cols).T


def test_evaluate_revisited_matches_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n_query, n_gallery = 21, 60
    gnd_dict = random_gnd(rng, n_query, n_gallery)
    gallery_vecs = rng.standard_normal((n_gallery, 8))
    # Exact duplicates make ties; the earlier gallery index must rank first.
    gallery_vecs[10:20] = gallery_vecs[0:10]
    query_vecs = rng.standard_normal((n_query, 8))
    qn = query_vecs / np.linalg.norm(query_vecs, axis=1, keepdims=True)
    gn = gallery_vecs / np.linalg.norm(gallery_vecs, axis=1, keepdims=True)
    unique_scores = qn @ np.delete(gn, np.s_[10:20], axis=0).T
    gaps = np.diff(np.sort(unique_scores, axis=1), axis=1)
    # Distinct vectors are far apart, so float32 search and this float64 reference agree.
    assert gaps.min() > 1e-5
    gnd = load_gnd(write_pickle(tmp_path / "gnd.pkl", gnd_dict))

    # Stored in another order, with folders in the ids and an extra row outside imlist.
    perm = rng.permutation(n_gallery)
    g_ids = [f"jpg/{gnd_dict['imlist'][i]}" for i in perm] + ["jpg/not_in_gnd"]
    g_emb = embeddings(np.vstack([gallery_vecs[perm], gallery_vecs[:1] * 3]), g_ids)
    q_emb = embeddings(query_vecs, gnd_dict["qimlist"])
    result = evaluate_revisited(q_emb, g_emb, gnd, ks=(1, 5, 10))

    ranks = ref_ranking(query_vecs, gallery_vecs)
    for protocol in DIFFICULTIES:
        sets = ref_protocol(gnd_dict, protocol)
        ref_map, _, ref_pr, ref_prs = ref_compute_map(ranks, sets, (1, 5, 10))
        assert result[f"map_{protocol}"] == pytest.approx(ref_map, rel=1e-9)
        for j, k in enumerate((1, 5, 10)):
            assert result[f"mp@{k}_{protocol}"] == pytest.approx(ref_pr[j], rel=1e-9)
        assert result[f"queries_{protocol}"] == sum(len(s["ok"]) > 0 for s in sets)
    assert result["map"] == result["map_medium"]
    assert result["mp@5"] == result["mp@5_medium"]
    assert result["queries"] == result["queries_medium"] < n_query
    assert result["gallery"] == n_gallery

    # Per query: the Medium AP of the queries with a Medium positive, named by qimlist.
    metrics, scores = evaluate_revisited_per_query(q_emb, g_emb, gnd, ks=(1, 5, 10))
    assert metrics == result
    _, ref_aps, _, _ = ref_compute_map(ranks, ref_protocol(gnd_dict, "medium"))
    kept = ~np.isnan(ref_aps)
    assert list(scores.ids) == [name for name, k in zip(gnd_dict["qimlist"], kept) if k]
    np.testing.assert_allclose(scores.ap, ref_aps[kept], rtol=1e-9)
    assert float(np.mean(scores.ap)) == pytest.approx(result["map"], rel=1e-12)
    by_protocol = make_protocol(gnd=tmp_path / "gnd.pkl").per_query(q_emb, g_emb)
    assert by_protocol[0] == result and by_protocol[1].ids == scores.ids


# --- ground-truth loading ---------------------------------------------------------------------


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"imlist": ["a"], "qimlist": [], "gnd": _Evil(os.system, (f"echo pwned > {marker}",))}
    path = write_pickle(tmp_path / "evil.pkl", payload)
    with pytest.raises(DataError, match=r"(posix|os|nt)\.system.*not loaded") as info:
        load_gnd(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("func", "args", "name"),
    [(eval, ("1+1",), "builtins.eval"), (subprocess.Popen, (["true"],), "subprocess.Popen")],
)
def test_refuses_other_globals(tmp_path: Path, func, args, name: str) -> None:
    path = write_pickle(tmp_path / "evil.pkl", {"imlist": _Evil(func, args)})
    with pytest.raises(DataError, match=rf"{name}.*evil\.pkl|evil\.pkl.*{name}"):
        load_gnd(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_loads_valid_gnd(tmp_path: Path, protocol: int) -> None:
    data = random_gnd(np.random.default_rng(3), 4, 30)
    data["gnd"][0]["bbx"] = np.array([1.5, 2.0, 10.0, 12.0], dtype=np.float32)
    data["gnd"][1]["easy"] = np.array([1, 2], dtype=np.int32)
    data["gnd"][2]["bbx"] = (np.float64(1.0), 2, 3, 4)
    data["extra"] = {"tags": {"x", "y"}, "frozen": frozenset({1}), "z": complex(1, 2)}
    gnd = load_gnd(write_pickle(tmp_path / "gnd.pkl", data, protocol=protocol))
    assert gnd.gallery_names == tuple(data["imlist"])
    assert gnd.query_names == tuple(data["qimlist"])
    assert len(gnd) == 4 and gnd.bbx.shape == (4, 4)
    assert gnd.bbx[0].tolist() == [1.5, 2.0, 10.0, 12.0]
    for key in ("easy", "hard", "junk"):
        for q, arr in enumerate(getattr(gnd, key)):
            assert arr.dtype == np.int64
            assert arr.tolist() == [int(x) for x in data["gnd"][q][key]]


def _valid() -> dict:
    return {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"easy": [0], "hard": [1], "junk": [], "bbx": [0, 0, 5, 5]},
            {"easy": [], "hard": [2], "junk": [0], "bbx": [0, 0, 5, 5]},
        ],
    }


def _broken(change) -> dict:
    data = _valid()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "holds a list, not a dict"),
        (_broken(lambda d: d.pop("qimlist")), r"lacks the key\(s\) \['qimlist'\]"),
        (_broken(lambda d: d.update(imlist=[1, 2])), "'imlist' must be a list of image names"),
        (_broken(lambda d: d.update(imlist=["a", "a", "b"])), "'imlist' names 'a' more than once"),
        (_broken(lambda d: d["gnd"].pop()), "one dict per query \\(2 queries.*got 1 entries"),
        (
            _broken(lambda d: d["gnd"][1].pop("junk")),
            r"gnd\[1\] \(query 'q1'\) lacks the key\(s\) \['junk'\]",
        ),
        (
            _broken(lambda d: d["gnd"][1].update(hard=[3])),
            r"gnd\[1\]\['hard'\] holds index 3, outside \[0, 2\]",
        ),
        (_broken(lambda d: d["gnd"][0].update(easy=[-1])), r"gnd\[0\]\['easy'\] holds index -1"),
        (
            _broken(lambda d: d["gnd"][0].update(junk=[0.5])),
            r"gnd\[0\]\['junk'\] must be a flat list of integer",
        ),
        (
            _broken(lambda d: d["gnd"][0].update(bbx=[1, 2, 3])),
            r"gnd\[0\]\['bbx'\] must be 4 finite numbers",
        ),
        (
            _broken(lambda d: d["gnd"].__setitem__(0, "x")),
            r"gnd\[0\] \(query 'q0'\) must be a dict",
        ),
    ],
)
def test_structure_errors(tmp_path: Path, data, message: str) -> None:
    path = write_pickle(tmp_path / "bad.pkl", data)
    with pytest.raises(DataError, match=message) as info:
        load_gnd(path)
    assert "bad.pkl" in str(info.value) and "download the ground truth again" in str(info.value)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_gnd(tmp_path / "absent.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="not a readable ground-truth pickle"):
        load_gnd(garbage)


# --- matching names to embedding rows ---------------------------------------------------------


def test_id_stem() -> None:
    assert id_stem("jpg/all_souls_000013") == "all_souls_000013"
    assert id_stem("a/b/c/abc123") == "abc123" and id_stem("plain") == "plain" and id_stem("dir/") == ""


def test_match_rows() -> None:
    emb = embeddings(np.eye(4), ["jpg/a", "jpg/b", "c", "x/y/d"])
    assert match_rows(emb, ["d", "a", "c", "jpg/b"], "gallery").tolist() == [3, 0, 2, 1]
    assert match_rows(emb, ["d", "a", "c", "jpg/b"], "gallery").dtype == np.int64


def test_match_rows_missing_names() -> None:
    emb = embeddings(np.eye(2), ["jpg/a", "jpg/b"])
    names = ["a", "m1", "m2", "m3", "m4", "m5", "m6"]
    with pytest.raises(EmbeddingsError, match=r"6 of 7 query images have no embedding row") as info:
        match_rows(emb, names, "query")
    text = str(info.value)
    assert "'m5'" in text and "'m6'" not in text and "bctool extract" in text


def test_match_rows_ambiguous_stem() -> None:
    emb = embeddings(np.eye(2), ["one/a", "two/a"])
    with pytest.raises(EmbeddingsError, match="matches 2 embedding rows"):
        match_rows(emb, ["a"], "gallery")
    assert match_rows(emb, ["two/a"], "gallery").tolist() == [1]


# --- reports on the command line under --gnd --------------------------------------------------


def test_every_report_uses_the_medium_map_under_gnd(tmp_path: Path) -> None:
    """Backfill, chain and compatibility report under --gnd, each against the library's value."""
    rng = np.random.default_rng(3)
    n_landmarks, n_gallery, n_query, dim = 3, 18, 6, 8
    centers = rng.normal(size=(n_landmarks, dim))
    g_landmark = np.arange(n_gallery) % n_landmarks
    q_landmark = np.arange(n_query) % n_landmarks
    entries = []
    for landmark in q_landmark:
        same = np.flatnonzero(g_landmark == landmark)
        entries.append({"easy": same[:3].tolist(), "hard": same[3:5].tolist(), "junk": same[5:].tolist(),
                        "bbx": [0.0, 0.0, 10.0, 10.0]})
    gnd_dict = {"imlist": [f"img_{i}" for i in range(n_gallery)], "qimlist": [f"q_{i}" for i in range(n_query)],
                "gnd": entries}
    gnd_path = write_pickle(tmp_path / "gnd.pkl", gnd_dict)
    files = {}
    for model, noise in (("old", 1.2), ("new", 0.4)):
        for part, names, landmark in (("query", gnd_dict["qimlist"], q_landmark),
                                      ("gallery", gnd_dict["imlist"], g_landmark)):
            vectors = centers[landmark] + noise * rng.normal(size=(len(names), dim))
            files[f"{model}_{part}"] = tmp_path / f"{model}_{part}.safetensors"
            save_embeddings(embeddings(vectors, [f"jpg/{n}" for n in names]), files[f"{model}_{part}"])
    gnd = load_gnd(gnd_path)
    emb = {name: load_embeddings(path) for name, path in files.items()}

    def m(query: str, gallery: str) -> float:
        return evaluate_revisited(emb[f"{query}_query"], emb[f"{gallery}_gallery"], gnd)["map"]

    def run(args: list[str]) -> dict:
        result = CliRunner().invoke(app, ["evaluate", *args, "--gnd", str(gnd_path), "-q"])
        assert result.exit_code == 0, f"{args}: {result.stderr}{result.exception!r}"
        return json.loads(result.stdout)

    m_oo, m_nn, m_no = m("old", "old"), m("new", "new"), m("new", "old")
    assert len({m_oo, m_nn, m_no}) == 3
    backfill = run(["--backfill", "0,1", "--query", str(files["new_query"]), "--old-query", str(files["old_query"]),
                    "--old-gallery", str(files["old_gallery"]), "--new-gallery", str(files["new_gallery"])])
    assert backfill["metric"] == "map" and (backfill["m_oo"], backfill["m_nn"]) == (m_oo, m_nn)
    assert [c["map"] for c in backfill["curve"]] == [m_no, m_nn]
    assert backfill["curve"][0]["map_medium"] == m_no and "mp@5_hard" in backfill["curve"][0]
    chain = run(["--chain", f"{files['old_query']},{files['old_gallery']}",
                 f"{files['new_query']},{files['new_gallery']}"])
    assert chain["metric"] == "map" and chain["matrix"] == [[m_oo, m("old", "new")], [m_no, m_nn]]
    report = run(["--old-query", str(files["old_query"]), "--old-gallery", str(files["old_gallery"]),
                  "--new-query", str(files["new_query"]), "--new-gallery", str(files["new_gallery"]),
                  "--bootstrap", "100"])
    assert report["metric"] == "map" and (report["m_oo"], report["m_nn"], report["m_no"]) == (m_oo, m_nn, m_no)
    assert report["results"]["old/old"]["map_hard"] == evaluate_revisited(emb["old_query"], emb["old_gallery"],
                                                                          gnd)["map_hard"]
