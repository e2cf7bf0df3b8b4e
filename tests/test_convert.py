"""`bctool convert`: .npy, parquet and faiss to and from bctool files, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.convert import convert
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import ConfigError, EmbeddingsError


def _emb(n: int = 300, dim: int = 12, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 4, size=n)
    return Embeddings(rng.normal(size=(n, dim)).astype(np.float32), labels,
                      [f"imgs/ü{i}/x y" for i in range(n)], ["bird", "cat", "dog", "eel"], {"sha256": "ab" * 32})


def _same(a: Embeddings, b: Embeddings) -> None:
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert list(a.ids) == list(b.ids) and a.label_strings() == b.label_strings()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_round_trips_keep_rows_ids_and_labels_exactly(tmp_path: Path, suffix: str, dtype: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    emb = _emb()
    src = tmp_path / "e.safetensors"
    save_embeddings(emb, src, dtype=dtype)
    original = load_embeddings(src, mmap=True)
    convert(src, tmp_path / f"e{suffix}")
    if suffix == ".npy":
        assert np.load(tmp_path / "e.npy").dtype == np.dtype(dtype)
        assert (tmp_path / "e.ids.txt").read_text().splitlines()[:2] == ["imgs/ü0/x y", "imgs/ü1/x y"]
    summary = convert(tmp_path / f"e{suffix}", tmp_path / "back.safetensors")
    back = load_embeddings(tmp_path / "back.safetensors", mmap=True)
    _same(original, back)
    assert back.embeddings.dtype == np.dtype(dtype) and summary["rows"] == 300 and summary["dtype"] == dtype
    convert(tmp_path / "back.safetensors", tmp_path / f"again{suffix}")  # and back once more: the same bytes
    if suffix == ".npy":
        assert (tmp_path / "again.npy").read_bytes() == (tmp_path / "e.npy").read_bytes()
        assert (tmp_path / "again.labels.txt").read_text() == (tmp_path / "e.labels.txt").read_text()


def test_a_faiss_index_round_trips_and_searches_as_evaluate_ranks(tmp_path: Path) -> None:
    import faiss

    from bctool.evaluate.search import rank_gallery

    emb = _emb()
    src = tmp_path / "g.safetensors"
    save_embeddings(emb, src)
    convert(src, tmp_path / "g.faiss")
    index = faiss.read_index(str(tmp_path / "g.faiss"))
    query = _emb(20, seed=1).normalized_embeddings()
    scores, rows = index.search(query, 10)
    expected_scores, expected_rows = rank_gallery(query, emb.normalized_embeddings(), 10)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    distinct = np.diff(expected_scores, axis=1, prepend=np.inf) != 0  # ties aside
    assert np.array_equal(rows[distinct], expected_rows[distinct])
    ids = (tmp_path / "g.ids.txt").read_text().splitlines()
    assert ids[int(rows[0, 0])] == emb.ids[int(expected_rows[0, 0])]
    convert(tmp_path / "g.faiss", tmp_path / "back.safetensors")
    back = load_embeddings(tmp_path / "back.safetensors")
    assert back.normalized and list(back.ids) == emb.ids and back.label_strings() == emb.label_strings()
    np.testing.assert_allclose(back.embeddings, emb.normalized_embeddings(), atol=1e-7)
    convert(tmp_path / "back.safetensors", tmp_path / "again.faiss")  # normalised rows are not normalised again
    again = faiss.read_index(str(tmp_path / "again.faiss"))
    np.testing.assert_array_equal(faiss.downcast_index(again.index).reconstruct_n(0, again.ntotal),
                                  faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal))


def test_npy_with_ids_and_labels_from_options(tmp_path: Path) -> None:
    rows = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "raw.npy", rows)
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "classes.txt").write_text("x\n\nx\ny\n")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "raw.npy"), "--ids", str(tmp_path / "names.txt"),
                                      "--labels", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "e.safetensors")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 4 and summary["labelled"] == 3 and summary["to"] == "bctool"
    emb = load_embeddings(tmp_path / "e.safetensors")
    assert list(emb.ids) == ["a", "b", "c", "d"] and emb.label_strings() == ["x", None, "x", "y"]
    np.testing.assert_array_equal(emb.embeddings, rows.astype(np.float32))


def test_bad_conversions_name_the_value_and_the_fix(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(EmbeddingsError, match="e.ids.txt' is not there; pass --ids FILE"):
        convert(tmp_path / "e.npy", tmp_path / "o.safetensors")
    (tmp_path / "e.ids.txt").write_text("a\nb\na\n")
    with pytest.raises(EmbeddingsError, match="id 'a' is given twice"):
        convert(tmp_path / "e.npy", tmp_path / "o.safetensors")
    (tmp_path / "e.ids.txt").write_text("a\nb\n")
    with pytest.raises(EmbeddingsError, match="2 ids for 3 rows"):
        convert(tmp_path / "e.npy", tmp_path / "o.safetensors")
    (tmp_path / "e.ids.txt").write_text("a\nb\nc\n")
    (tmp_path / "e.labels.txt").write_text("x\n")
    with pytest.raises(EmbeddingsError, match="1 labels for 3 rows"):
        convert(tmp_path / "e.npy", tmp_path / "o.safetensors")
    np.save(tmp_path / "v.npy", np.zeros(3, np.float32))
    with pytest.raises(EmbeddingsError, match="a 2-D float array"):
        convert(tmp_path / "v.npy", tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match="the suffix '.csv' names no format"):
        convert(tmp_path / "e.npy", tmp_path / "o.csv")
    with pytest.raises(ConfigError, match="go through a .safetensors file"):
        convert(tmp_path / "e.npy", tmp_path / "o.faiss")
    assert not (tmp_path / "o.safetensors").exists()
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "e.npy"), "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1 and "1 labels for 3 rows" in result.output
