"""GLDv2: CSV readers, the a/b/c image layout, list files and mAP@100 against a slow reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.data import load_image_set
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import DataError, EmbeddingsError
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.protocols.gldv2.files import (
    GLDv2Solution,
    gldv2_image_path,
    is_train_csv,
    read_image_csv,
    read_index_or_test_csv,
    read_retrieval_solution,
    read_train_csv,
    write_gldv2_list,
    write_list_file,
)
from bctool.evaluate.protocols.gldv2.metric import (
    evaluate_gldv2,
    evaluate_gldv2_per_query,
)


def embeddings(vectors: np.ndarray, ids: list[str]) -> Embeddings:
    return Embeddings(
        embeddings=np.asarray(vectors, dtype=np.float32),
        labels=np.full(len(ids), -1, dtype=np.int64),
        ids=ids,
        label_names=[],
    )


def hex_id(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), size=16))


def layout_id(image_id: str) -> str:
    """The embedding id bctool gives an image stored in the GLDv2 layout."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}"


def write_solution(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("id,images,Usage\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return path


# --- slow, obvious reference ------------------------------------------------------------------


def ref_ranking(q: np.ndarray, g: np.ndarray) -> list[list[int]]:
    """Per query, gallery rows by descending score, ties by row, with plain loops."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i in range(len(qn)):
        scores = [float(np.dot(qn[i], gn[j])) for j in range(len(gn))]
        out.append(sorted(range(len(gn)), key=lambda j: (-scores[j], j)))
    return out


def ref_average_precision(prediction: list[str], relevant: list[str], k: int = 100) -> float:
    """The Kaggle scorer's AP@k: relevant images not predicted count as missed."""
    ap, correct = 0.0, 0
    for i in range(min(len(prediction), k)):
        if prediction[i] in relevant:
            correct += 1
            ap += correct / (i + 1)
    return ap / min(len(relevant), k)


def ref_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --- evaluation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_gallery", "block_size"), [(150, None), (150, 7), (60, 4)])
def test_map_matches_reference(tmp_path: Path, n_gallery: int, block_size: int | None) -> None:
    rng = np.random.default_rng(n_gallery)
    n_query = 40
    gallery_names = [hex_id(rng) for _ in range(n_gallery)]
    absent = [hex_id(rng) for _ in range(30)]  # relevant, but never extracted
    gallery_vecs = rng.standard_normal((n_gallery, 8))
    # Exact duplicates make ties; the earlier gallery row must rank first.
    gallery_vecs[20:35] = gallery_vecs[0:15]
    query_vecs = rng.standard_normal((n_query, 8))
    qn = query_vecs / np.linalg.norm(query_vecs, axis=1, keepdims=True)
    gn = gallery_vecs / np.linalg.norm(gallery_vecs, axis=1, keepdims=True)
    gaps = np.diff(np.sort(qn @ np.delete(gn, np.s_[20:35], axis=0).T, axis=1), axis=1)
    # Distinct vectors are far apart, so float32 search and this float64 reference agree.
    assert gaps.min() > 1e-6

    query_names = [hex_id(rng) for _ in range(n_query)]
    solution: dict[str, tuple[list[str], str]] = {}
    rows = []
    for i, name in enumerate(query_names):
        if i % 7 == 3:
            rows.append((name, "None", "Ignored"))
            continue
        # Some queries have more than 100 relevant images, some few; parts are absent.
        size = 120 if i % 9 == 0 else int(rng.integers(1, 12))
        pool = gallery_names + absent
        chosen = [pool[j] for j in rng.choice(len(pool), size=min(size, len(pool)), replace=False)]
        usage = "Public" if i % 2 else "Private"
        solution[name] = (chosen, usage)
        rows.append((name, " ".join(chosen), usage))
    sol = read_retrieval_solution(write_solution(tmp_path / "solution.csv", rows))
    assert set(sol.query_ids) == set(solution) and len(sol) < n_query

    # Queries stored shuffled with an extra row; gallery stored in the GLDv2 layout.
    q_perm = rng.permutation(n_query)
    q_emb = embeddings(
        np.vstack([query_vecs[q_perm], query_vecs[:1]]),
        [layout_id(query_names[i]) for i in q_perm] + ["not/in/solution"],
    )
    g_emb = embeddings(gallery_vecs, [layout_id(n) for n in gallery_names])
    result = evaluate_gldv2(q_emb, g_emb, sol, block_size=block_size)

    ranking = ref_ranking(query_vecs, gallery_vecs)
    per_usage: dict[str, list[float]] = {"Public": [], "Private": []}
    per_query: dict[str, float] = {}
    for i, name in enumerate(query_names):
        if name not in solution:
            continue
        relevant, usage = solution[name]
        prediction = [gallery_names[j] for j in ranking[i][:100]]
        per_query[name] = ref_average_precision(prediction, relevant)
        per_usage[usage].append(per_query[name])
    everything = per_usage["Public"] + per_usage["Private"]
    assert result["map@100"] == pytest.approx(ref_mean(everything), rel=1e-12)
    assert result["map@100_public"] == pytest.approx(ref_mean(per_usage["Public"]), rel=1e-12)
    assert result["map@100_private"] == pytest.approx(ref_mean(per_usage["Private"]), rel=1e-12)
    assert result["queries"] == len(everything)
    assert result["queries_public"] == len(per_usage["Public"])
    assert result["queries_private"] == len(per_usage["Private"])
    assert result["gallery"] == n_gallery
    assert 0 < result["map@100"] < 1

    # Per query: every scored query's AP@100, named by the solution's ids, in its order.
    metrics, scores = evaluate_gldv2_per_query(q_emb, g_emb, sol, block_size=block_size)
    assert metrics == result and scores.ids == sol.query_ids
    np.testing.assert_allclose(scores.ap, [per_query[name] for name in sol.query_ids], rtol=1e-12)
    assert float(np.mean(scores.ap)) == pytest.approx(result["map@100"], rel=1e-12)
    by_protocol = make_protocol(solution=tmp_path / "solution.csv").per_query(q_emb, g_emb)
    assert by_protocol[0] == result and np.array_equal(by_protocol[1].ap, scores.ap)


def hand_example(tmp_path: Path) -> tuple[Embeddings, Embeddings, GLDv2Solution]:
    g = ["000a", "000b", "000c", "000d"]
    gallery = embeddings(np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]]), [layout_id(i) for i in g])
    query = embeddings(np.array([[1, 0], [0, 1], [1, 1]]), ["q1", "q2", "q3"])
    rows = [
        ("q1", "000b 000d fff0", "Public"),  # ranks 2 and 4 of 4, one relevant image absent
        ("q2", "000d", "Private"),  # 000a and 000d tie at score 0: 000a ranks first
        ("q3", "None", "Ignored"),
    ]
    return query, gallery, read_retrieval_solution(write_solution(tmp_path / "s.csv", rows))


def test_hand_computed_example(tmp_path: Path) -> None:
    query, gallery, sol = hand_example(tmp_path)
    result = evaluate_gldv2(query, gallery, sol)
    # q1: (1/2 + 2/4) / min(3, 100) = 1/3; q2: ranking c, b, a, d: (1/4) / 1.
    assert result == {
        "map@100": pytest.approx((1 / 3 + 1 / 4) / 2),
        "queries": 2,
        "map@100_public": pytest.approx(1 / 3),
        "queries_public": 1,
        "map@100_private": pytest.approx(1 / 4),
        "queries_private": 1,
        "gallery": 4,
    }
    # At k = 2: q1 finds 000b at rank 2 out of min(3, 2) expected; q2 finds nothing.
    at_2 = evaluate_gldv2(query, gallery, sol, k=2)
    assert at_2["map@2"] == pytest.approx((0.5 / 2 + 0) / 2)


def test_no_query_of_one_usage_gives_nan(tmp_path: Path) -> None:
    query, gallery, _ = hand_example(tmp_path)
    sol = read_retrieval_solution(write_solution(tmp_path / "p.csv", [("q1", "000a", "Public")]))
    result = evaluate_gldv2(query, gallery, sol)
    assert result["map@100"] == result["map@100_public"] == 1.0
    assert np.isnan(result["map@100_private"]) and result["queries_private"] == 0


def test_query_missing_from_embeddings(tmp_path: Path) -> None:
    _, gallery, _ = hand_example(tmp_path)
    rows = [("q1", "000a", "Public"), ("q9", "000b", "Private"), ("q8", "000b", "Public")]
    sol = read_retrieval_solution(write_solution(tmp_path / "m.csv", rows))
    query = embeddings(np.ones((1, 2)), ["q1"])
    missing = r"2 of 3 query images have no embedding row.*'q9', 'q8'"
    with pytest.raises(EmbeddingsError, match=missing):
        evaluate_gldv2(query, gallery, sol)


def test_gallery_stem_twice_and_dimension_mismatch(tmp_path: Path) -> None:
    query, gallery, sol = hand_example(tmp_path)
    twice = embeddings(np.ones((2, 2)), ["x/000a", "y/000a"])
    with pytest.raises(EmbeddingsError, match="'000a' matches 2 embedding rows"):
        evaluate_gldv2(query, twice, sol)
    wide = embeddings(np.ones((1, 3)), ["000a"])
    with pytest.raises(EmbeddingsError, match="dimension 2 but gallery embeddings have dimension"):
        evaluate_gldv2(query, wide, sol)


# --- CSV readers ------------------------------------------------------------------------------


def test_read_solution_drops_ignored(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        '\ufeffid,images,Usage\nq1,"a1 b2  a1",Public\n\nq2,None,Ignored\nq3,c3,Private\n'
    )
    sol = read_retrieval_solution(path)
    assert sol.query_ids == ("q1", "q3")
    assert sol.relevant_ids == (("a1", "b2"), ("c3",))  # distinct, in file order
    assert sol.usage == ("Public", "Private")
    assert sol.source == str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"is empty"),
        ("id,images\nq1,a\n", r"s\.csv:1: header must be 'id,images,Usage', got 'id,images'"),
        ("id,images,Usage\nq1,a,Public,extra\n", r"s\.csv:2: expected 3 fields"),
        ("id,images,Usage\nq1,a,Public\nq2,b,Secret\n", r"s\.csv:3: Usage 'Secret' of query 'q2'"),
        ("id,images,Usage\nq1,None,Public\n", r"s\.csv:2: images of query 'q1' is 'None'"),
        ("id,images,Usage\nq1,,Private\n", r"s\.csv:2: images of query 'q1' is ''"),
        ("id,images,Usage\n,a,Public\n", r"s\.csv:2: query id '' is not an image id"),
        (
            "id,images,Usage\nq1,a,Public\nq1,b,Private\n",
            r"s\.csv:3: query id 'q1' appears again \(first on line 2\)",
        ),
        ("id,images,Usage\nq1,None,Ignored\n", r"no Public or Private query \(1 Ignored\)"),
    ],
)
def test_solution_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_retrieval_solution(path)


def test_solution_missing_or_binary(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*google-landmark"):
        read_retrieval_solution(tmp_path / "absent.csv")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_retrieval_solution(binary)


def test_read_train_csv_variants(tmp_path: Path) -> None:
    plain = tmp_path / "train.csv"
    plain.write_text('id,url,landmark_id\n00aa,"http://x/a,b.jpg",7\n00bb,http://x/b.jpg,3\n')
    assert read_train_csv(plain) == (("00aa", "00bb"), ("7", "3"))
    kaggle = tmp_path / "kaggle.csv"
    kaggle.write_text("id,landmark_id\n00aa,7\n")
    assert read_train_csv(kaggle) == (("00aa",), ("7",))
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n1,00aa 00bb\n2,00cc\n")
    assert read_train_csv(clean) == (("00aa", "00bb", "00cc"), ("1", "1", "2"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,url\n00aa,u\n", r"t\.csv:1: header must be 'id,url,landmark_id' or 'id,landmark_id'"),
        ("landmark_id,images\n1,\n", r"t\.csv:2: images of landmark '1' is ''"),
        ("landmark_id,images\n1,00aa\n2,00aa\n", r"t\.csv:3: image id '00aa' appears again"),
        ("id,url,landmark_id\n00aa,u,\n", r"t\.csv:2: landmark_id '' is not an image id"),
        ("id,url,landmark_id\n", r"lists no images"),
    ],
)
def test_train_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_train_csv(path)


def test_read_index_or_test_csv(tmp_path: Path) -> None:
    index = tmp_path / "index.csv"
    index.write_text("id\n00aa\n00bb\n")
    assert read_index_or_test_csv(index) == ("00aa", "00bb")
    test = tmp_path / "test.csv"
    test.write_text("id,url\n00cc,http://x\n")
    assert read_index_or_test_csv(test) == ("00cc",)
    test.write_text("id,landmark_id\n00cc,1\n")
    with pytest.raises(DataError, match=r"test\.csv:1: header must be 'id' or 'id,url'"):
        read_index_or_test_csv(test)
    test.write_text("id\n00cc\n00cc\n")
    with pytest.raises(DataError, match=r"test\.csv:3: image id '00cc' appears again"):
        read_index_or_test_csv(test)


def test_read_image_csv_tells_train_from_index_by_the_header(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text('id,url,landmark_id\n00aa,"http://x/a,b.jpg",7\n')
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n1,00aa 00bb\n")
    index = tmp_path / "index.csv"
    index.write_text("id,url\n00cc,http://x\n")
    assert is_train_csv(train) and is_train_csv(clean) and not is_train_csv(index)
    assert read_image_csv(train) == (("00aa",), ("7",))
    assert read_image_csv(clean) == (("00aa", "00bb"), ("1", "1"))
    assert read_image_csv(index) == (("00cc",), None)
    # Neither a file nor readable as one: read as an index/test CSV, which says what is wrong.
    assert not is_train_csv(tmp_path / "absent.csv") and not is_train_csv(tmp_path)
    with pytest.raises(DataError, match=r"index/test CSV .*absent\.csv' does not exist"):
        read_image_csv(tmp_path / "absent.csv")
    # Only the header decides: a train CSV whose rows are broken is still read as one.
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"id,landmark_id\n00aa,7\n\xff\xfe\n")
    assert is_train_csv(broken)
    with pytest.raises(DataError, match="train CSV .*is not UTF-8 text"):
        read_image_csv(broken)


def test_write_gldv2_list_summary(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("id,landmark_id\nabc123,7\nabd456,9\n")
    (tmp_path / "test.csv").write_text("id\nfff000\n")
    out = tmp_path / "lists" / "train.txt"
    assert write_gldv2_list(tmp_path / "train.csv", tmp_path / "img", out) == {
        "out": str(out), "images": 2, "labelled": True}
    assert out.read_text() == "../img/a/b/c/abc123.jpg\t7\n../img/a/b/d/abd456.jpg\t9\n"
    test = write_gldv2_list(tmp_path / "test.csv", tmp_path / "img", tmp_path / "test.txt")
    assert test == {"out": str(tmp_path / "test.txt"), "images": 1, "labelled": False}
    assert (tmp_path / "test.txt").read_text() == "img/f/f/f/fff000.jpg\n"


# --- image layout and list files --------------------------------------------------------------


def test_image_path_layout(tmp_path: Path) -> None:
    assert gldv2_image_path(tmp_path, "0123456789abcdef") == tmp_path / "0/1/2/0123456789abcdef.jpg"
    assert gldv2_image_path("r", "ABC") == Path("r/A/B/C/ABC.jpg")
    for bad in ("ab", "xyz123", "../etc", "0123 4567", ""):
        with pytest.raises(DataError, match="must be a hexadecimal string"):
            gldv2_image_path(tmp_path, bad)


def test_list_file_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "gld v2"  # a space in the folder: labelled lines separate by a tab
    ids = ["0123456789abcdef", "fedcba9876543210", "00ff00ff00ff00ff"]
    labels = ["17", "3", "17"]
    out = root / "train.txt"
    assert write_list_file(root, ids, labels, out) == 3
    assert out.read_text().splitlines()[0] == "0/1/2/0123456789abcdef.jpg\t17"
    images = load_image_set(out)
    expected = [gldv2_image_path(root, i).relative_to(root).with_suffix("").as_posix() for i in ids]
    assert images.ids == expected == [layout_id(i) for i in ids]
    assert [images.label_names[x] for x in images.labels] == labels
    assert [r.path for r in images.records] == [gldv2_image_path(root, i) for i in ids]

    # Elsewhere and without labels: paths lead back to the same files.
    other = tmp_path / "lists" / "index.txt"
    write_list_file(tmp_path / "gld", ids, None, other)
    unlabelled = load_image_set(other, require_labels=False)
    assert [Path(r.path).resolve() for r in unlabelled.records] == [
        gldv2_image_path(tmp_path / "gld", i).resolve() for i in ids
    ]
    assert unlabelled.labels == [-1, -1, -1]


def test_list_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3 image ids but 2 labels"):
        write_list_file(tmp_path, ["aaa", "bbb", "ccc"], ["1", "2"], tmp_path / "l.txt")
    with pytest.raises(DataError, match="label '1 2' of image 'aaa'"):
        write_list_file(tmp_path, ["aaa"], ["1 2"], tmp_path / "l.txt")
    with pytest.raises(DataError, match="contains whitespace"):
        write_list_file(tmp_path / "a b", ["aaa"], None, tmp_path / "l.txt")
    with pytest.raises(DataError, match="'zzz' must be a hexadecimal"):
        write_list_file(tmp_path, ["aaa", "zzz"], None, tmp_path / "l.txt")
    assert not (tmp_path / "l.txt").exists()


# --- reports on the command line: every one uses mAP@100 --------------------------------------

runner = CliRunner()


def _run(args: list[str]) -> tuple[dict, str]:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.stderr}{result.exception!r}"
    return json.loads(result.stdout), " ".join(result.stderr.split())  # rich wraps titles


def _two_models(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    """Old (noisy) and new (clean) query/gallery files of one set of landmarks, and a solution.

    Queries and gallery images of both models share their ids (the same images); the gallery is
    stored in the GLDv2 layout. Queries alternate Public and Private; one is Ignored.
    """
    rng = np.random.default_rng(11)
    n_landmarks, n_gallery, n_query, dim = 4, 24, 10, 8
    centers = rng.normal(size=(n_landmarks, dim))
    g_landmark = np.arange(n_gallery) % n_landmarks
    q_landmark = rng.integers(0, n_landmarks, size=n_query)
    gallery_names = [hex_id(rng) for _ in range(n_gallery)]
    query_names = [hex_id(rng) for _ in range(n_query)]
    files = {}
    for model, noise in (("old", 1.0), ("new", 0.3)):
        q = centers[q_landmark] + noise * rng.normal(size=(n_query, dim))
        g = centers[g_landmark] + noise * rng.normal(size=(n_gallery, dim))
        files[f"{model}_query"] = tmp_path / f"{model}_query.safetensors"
        files[f"{model}_gallery"] = tmp_path / f"{model}_gallery.safetensors"
        save_embeddings(embeddings(q, query_names), files[f"{model}_query"])
        save_embeddings(embeddings(g, [layout_id(n) for n in gallery_names]), files[f"{model}_gallery"])
    rows = []
    for i, name in enumerate(query_names):
        relevant = " ".join(gallery_names[j] for j in np.flatnonzero(g_landmark == q_landmark[i]))
        rows.append((name, "None", "Ignored") if i == 0 else (name, relevant, ("Public", "Private")[i % 2]))
    return files, write_solution(tmp_path / "retrieval_solution.csv", rows)


def test_every_report_uses_map_at_100_under_solution(tmp_path: Path) -> None:
    files, solution = _two_models(tmp_path)
    sol = read_retrieval_solution(solution)
    emb = {name: load_embeddings(path) for name, path in files.items()}

    def m(query: str, gallery: str) -> float:
        return evaluate_gldv2(emb[f"{query}_query"], emb[f"{gallery}_gallery"], sol)["map@100"]

    m_oo, m_nn, m_no = m("old", "old"), m("new", "new"), m("new", "old")
    assert m_no != m_oo and m_nn != m_no  # the checks below tell the pairs apart
    common = ["--solution", str(solution)]
    backfill, err = _run(["evaluate", "--backfill", "0,0.5,1", "--query", str(files["new_query"]),
                          "--old-query", str(files["old_query"]), "--old-gallery", str(files["old_gallery"]),
                          "--new-gallery", str(files["new_gallery"]), "--plot", str(tmp_path / "b.png"), *common])
    assert list(backfill) == ["metric", "seed", "order", "scoring", "m_oo", "m_nn", "curve", "area", "plot"]
    assert backfill["metric"] == "map@100" and backfill["m_oo"] == m_oo and backfill["m_nn"] == m_nn
    curve = backfill["curve"]
    assert [c["fraction"] for c in curve] == [0.0, 0.5, 1.0] and "map" not in curve[0]
    assert curve[0]["map@100"] == m_no and curve[-1]["map@100"] == m_nn
    assert {"map@100_public", "queries_private"} <= set(curve[1]) and curve[1]["queries"] == 9
    assert "partial backfill (map@100)" in err and "mAP@100" in err
    if backfill["plot"]:  # matplotlib is optional
        assert Path(backfill["plot"]).read_bytes()[:4] == b"\x89PNG"

    chain, err = _run(["evaluate", "--chain", f"{files['old_query']},{files['old_gallery']}",
                       f"{files['new_query']},{files['new_gallery']}", *common])
    assert chain == {"metric": "map@100", "matrix": [[m_oo, m("old", "new")], [m_no, m_nn]],
                     "ac": 1.0 if m_no > m_oo else 0.0, "bc": m_no - m_oo}
    assert "map@100, gallery by column" in err

    report, err = _run(["evaluate", "--old-query", str(files["old_query"]), "--old-gallery", str(files["old_gallery"]),
                        "--new-query", str(files["new_query"]), "--new-gallery", str(files["new_gallery"]),
                        "--bootstrap", "200", *common])
    assert report["metric"] == "map@100" and list(report["results"]) == ["old/old", "new/new", "new/old"]
    assert (report["m_oo"], report["m_nn"], report["m_no"]) == (m_oo, m_nn, m_no)
    assert report["results"]["new/old"]["queries_public"] + report["results"]["new/old"]["queries_private"] == 9
    assert report["delta"] == pytest.approx(m_no - m_oo, abs=1e-12) and report["bootstrap"] == 200
    assert "compatibility (map@100)" in err

    pair, err = _run(["evaluate", "--query", str(files["new_query"]), "--gallery", str(files["old_gallery"]), *common])
    assert pair == {"query_file": str(files["new_query"]), "gallery_file": str(files["old_gallery"]),
                    **evaluate_gldv2(emb["new_query"], emb["old_gallery"], sol)}
    assert "┃ mAP@100 ┃ queries ┃" in err and "│ public │" in err and "│ private │" in err
