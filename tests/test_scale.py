"""Large-gallery evaluation: memory-mapped loading, block-wise indexing, approximate indexes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.evaluate.search import SearchOptions, rank_gallery


def _clustered(n: int, n_classes: int, dim: int, seed: int, prefix: str) -> Embeddings:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).standard_normal((n_classes, dim)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    emb = centers[labels] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return Embeddings(
        embeddings=emb.astype(np.float32),
        labels=labels.astype(np.int64),
        ids=[f"{prefix}/{i}" for i in range(n)],
        label_names=[f"c{i}" for i in range(n_classes)],
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Embeddings, Path]:
    gallery = _clustered(3000, 40, 16, seed=0, prefix="g")
    path = tmp_path_factory.mktemp("scale") / "gallery.safetensors"
    save_embeddings(gallery, path)
    return _clustered(200, 40, 16, seed=1, prefix="q"), path


def test_mmap_load_matches_normal_load(pair: tuple[Embeddings, Path]) -> None:
    _, path = pair
    full, mapped = load_embeddings(path), load_embeddings(path, mmap=True)
    assert isinstance(mapped.embeddings, np.memmap)
    np.testing.assert_array_equal(np.asarray(mapped.embeddings), full.embeddings)
    np.testing.assert_array_equal(mapped.labels, full.labels)
    assert (mapped.ids, mapped.label_names, mapped.model, mapped.normalized, mapped.root) == (
        full.ids, full.label_names, full.model, full.normalized, full.root,
    )
    blocks = np.concatenate([b for _, b in mapped.iter_normalized_blocks(700)])
    np.testing.assert_array_equal(blocks, full.normalized_embeddings())


def test_mmap_rejects_truncated_file(pair: tuple[Embeddings, Path], tmp_path: Path) -> None:
    data = pair[1].read_bytes()
    for size in (5, 100, len(data) - 10):
        cut = tmp_path / f"cut{size}.safetensors"
        cut.write_bytes(data[:size])
        with pytest.raises(EmbeddingsError, match="not a readable safetensors file"):
            load_embeddings(cut, mmap=True)


def _rewrite_header(data: bytes, edit) -> bytes:  # noqa: ANN001
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_mmap_rejects_bad_headers(pair: tuple[Embeddings, Path], tmp_path: Path) -> None:
    data = pair[1].read_bytes()
    bad = tmp_path / "bad.safetensors"

    def out_of_file(h: dict) -> None:
        h["embeddings"]["data_offsets"][1] += 10**9

    bad.write_bytes(_rewrite_header(data, out_of_file))
    with pytest.raises(EmbeddingsError, match="claims bytes"):
        load_embeddings(bad, mmap=True)

    def wrong_shape(h: dict) -> None:
        h["embeddings"]["shape"][0] += 1

    bad.write_bytes(_rewrite_header(data, wrong_shape))
    with pytest.raises(EmbeddingsError, match="does not fill"):
        load_embeddings(bad, mmap=True)

    def wrong_dtype(h: dict) -> None:
        h["embeddings"]["dtype"] = "I32"  # same width, not a float: never mapped (F64 is read and converted)

    bad.write_bytes(_rewrite_header(data, wrong_dtype))
    with pytest.raises(EmbeddingsError, match="needs a 2-D F32 or F16 tensor"):
        load_embeddings(bad, mmap=True)

    bad.write_bytes((200 * 1024 * 1024).to_bytes(8, "little") + data[8:])
    with pytest.raises(EmbeddingsError, match="over the .* limit"):
        load_embeddings(bad, mmap=True)


@pytest.mark.parametrize("top_k", [None, 50])
def test_flat_on_mmap_gives_identical_metrics(pair: tuple[Embeddings, Path], top_k: int | None) -> None:
    query, path = pair
    in_memory = evaluate_retrieval(query, load_embeddings(path), search=SearchOptions(top_k=top_k))
    mapped = evaluate_retrieval(query, load_embeddings(path, mmap=True), search=SearchOptions(top_k=top_k))
    assert mapped == in_memory


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_are_close_to_flat(pair: tuple[Embeddings, Path], kind: str) -> None:
    query, path = pair
    gallery = load_embeddings(path, mmap=True)
    flat = evaluate_retrieval(query, gallery, search=SearchOptions(top_k=100))
    approx = evaluate_retrieval(query, gallery, search=SearchOptions(top_k=100, index=kind))
    assert abs(approx["recall@1"] - flat["recall@1"]) <= 0.05
    assert abs(approx["map@100"] - flat["map@100"]) <= 0.1


def test_approximate_rank_gallery_sorted_and_self_excluded() -> None:
    emb = _clustered(500, 5, 8, seed=2, prefix="g").normalized_embeddings()
    exclude = np.arange(20)
    scores, indices = rank_gallery(emb[:20], emb, 10, exclude=exclude, search=SearchOptions(index="ivf", nprobe=4))
    assert scores.shape == indices.shape == (20, 10)
    assert not (indices == exclude[:, None]).any()
    assert (np.diff(scores, axis=1) <= 0).all()


def test_unknown_index_names_the_choices(pair: tuple[Embeddings, Path]) -> None:
    query, path = pair
    with pytest.raises(ConfigError, match=r"unknown index kind .annoy.; choose one of \[.flat., .hnsw., .ivf.\]"):
        evaluate_retrieval(query, load_embeddings(path), search=SearchOptions(index="annoy"))
    with pytest.raises(ConfigError, match="nprobe must be at least 1"):
        rank_gallery(query.embeddings, query.embeddings, 3, search=SearchOptions(index="ivf", nprobe=0))
