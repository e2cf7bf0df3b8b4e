"""Galleries at production size: version-2 ids, float16 rows, and shard sets read as one gallery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.embeddings import (
    ConcatRows,
    Embeddings,
    RowIds,
    load_embeddings,
    save_embeddings,
)
from bctool.errors import EmbeddingsError


def _rows_of_reference(ids: list[str], wanted: set[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if image_id in wanted and image_id not in found:
            found[image_id] = i
    return found


@pytest.mark.parametrize("one_by_one", [200_000, 0])  # candidates checked directly, or hashed
def test_row_ids_find_rows_as_a_loop_over_the_ids_does(one_by_one: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import bctool.embeddings.ids

    monkeypatch.setattr(bctool.embeddings.ids, "_CHECK_ONE_BY_ONE", one_by_one)
    rng = np.random.default_rng(0)
    alphabet = list("ab/é😀_") + [""]
    ids = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 6)))) for _ in range(3000)]
    ids += ["x" * 300, "dup", "dup"]  # a long id, a repeated one (its first row counts)
    encoded = RowIds.encode(ids)
    assert len(encoded) == len(ids) and list(encoded) == ids and encoded[-1] == "dup" and encoded[5:8] == ids[5:8]
    wanted = set(rng.choice(ids, size=200).tolist()) | {"dup", "not there", ""}
    assert encoded.rows_of(wanted) == _rows_of_reference(ids, wanted)
    with pytest.raises(IndexError):
        encoded[len(ids)]


def test_concat_rows_index_like_the_concatenated_array() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 3)).astype(np.float16) for n in (4, 0, 7, 2)]
    whole = np.concatenate(parts)
    rows = ConcatRows(parts)
    assert rows.shape == whole.shape and rows.dtype == np.float16 and len(rows) == 13
    for key in (slice(None), slice(2, 9), slice(11, 40), slice(5, 5), slice(None, None, 3)):
        np.testing.assert_array_equal(rows[key], whole[key])
    for key in (np.array([12, 0, 5, 5, -1]), np.arange(13) % 2 == 0, 6):
        np.testing.assert_array_equal(rows[key], whole[key])
    np.testing.assert_array_equal(np.asarray(rows), whole)
    np.testing.assert_array_equal(rows[3:8, :2], whole[3:8, :2])


def _gallery(n: int, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=n)
    return Embeddings(rng.normal(size=(n, 8)).astype(np.float32) + labels[:, None] * 0.5, labels,
                      [f"img/{i}" for i in range(n)], [f"c{i}" for i in range(5)], {"sha256": "ab" * 32})


def test_float16_files_evaluate_adapt_transform_and_plan_like_float32(tmp_path: Path) -> None:
    """Every command reads a float16 gallery; scores are float32 on the float16 values."""
    gallery = _gallery(400)
    for dtype in ("float32", "float16"):
        save_embeddings(gallery, tmp_path / f"g-{dtype}.safetensors", dtype=dtype)
    half = load_embeddings(tmp_path / "g-float16.safetensors", mmap=True)
    assert half.embeddings.dtype == np.float16
    sizes = {d: (tmp_path / f"g-{d}.safetensors").stat().st_size for d in ("float32", "float16")}
    assert sizes["float32"] - sizes["float16"] == 2 * 400 * 8  # the rows take half the bytes; the rest is the same
    rounded = Embeddings(gallery.embeddings.astype(np.float16).astype(np.float32), gallery.labels, gallery.ids,
                         gallery.label_names, gallery.model)
    save_embeddings(rounded, tmp_path / "rounded.safetensors")
    runner = CliRunner()
    q = str(tmp_path / "rounded.safetensors")

    def run(*args: str) -> dict:
        result = runner.invoke(app, [*args, "-q"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    by_half = run("evaluate", "--query", q, "--gallery", str(tmp_path / "g-float16.safetensors"))
    by_rounded = run("evaluate", "--query", q, "--gallery", q)
    assert by_half["map"] == pytest.approx(by_rounded["map"], abs=1e-9) and by_half["queries"] == 400
    run("adapt", str(tmp_path / "g-float16.safetensors"), str(tmp_path / "g-float32.safetensors"),
        "--out", str(tmp_path / "a.safetensors"))
    run("transform", str(tmp_path / "g-float16.safetensors"), "--adapter", str(tmp_path / "a.safetensors"),
        "--out", str(tmp_path / "t.safetensors"))
    assert load_embeddings(tmp_path / "t.safetensors", mmap=True).embeddings.dtype == np.float16
    plan = run("backfill", "plan", str(tmp_path / "g-float16.safetensors"), "--out", str(tmp_path / "plan.txt"))
    assert plan["ids"] == 400 and len((tmp_path / "plan.txt").read_text().splitlines()) == 400


def test_float16_refuses_rows_beyond_its_range(tmp_path: Path) -> None:
    big = Embeddings(np.full((2, 3), 1e6, np.float32), np.zeros(2, np.int64), ["a", "b"], ["x"])
    with pytest.raises(EmbeddingsError, match="beyond float16's 65504; store them as float32"):
        save_embeddings(big, tmp_path / "big.safetensors", dtype="float16")
    assert not (tmp_path / "big.safetensors").exists()


@pytest.fixture(scope="module")
def shard_set(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The gallery embedded by 3 processes at once (`extract --shard I/3`), and merged."""
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    folder = tmp_path_factory.mktemp("shards")
    model = folder / "m.safetensors"
    import torch

    torch.manual_seed(0)
    save_checkpoint(model, create_model(ModelConfig(arch="small", embedding_dim=16, num_classes=2)),
                    Preprocess(image_size=16), ["a", "b"])
    parts = folder / "parts"
    parts.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bctool", "extract", str(emoji_dir / "gallery.txt"), "--model",
                               str(model), "--out", str(parts / f"g.part{i}.safetensors"), "--shard", f"{i}/3",
                               "--workers", "0", "--dtype", "float16", "-q"], env=env, stdout=subprocess.PIPE)
             for i in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    runner = CliRunner()
    merged = folder / "merged.safetensors"
    result = runner.invoke(app, ["merge", *map(str, sorted(parts.iterdir())), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    query = folder / "query.safetensors"
    result = runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "--model", str(model), "--out", str(query),
                                 "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    manifest = folder / "gallery.parts.txt"
    manifest.write_text("# the three parts\n" + "\n".join(f"parts/g.part{i}.safetensors" for i in (2, 0, 1)) + "\n")
    return {"parts": parts, "merged": merged, "manifest": manifest, "model": model, "query": query}


def test_a_shard_set_evaluates_to_the_numbers_of_the_merged_file(emoji_dir: Path, shard_set: dict[str, Path]) -> None:
    runner = CliRunner()
    merged = str(shard_set["merged"])
    reports = []
    for gallery in (merged, str(shard_set["parts"]), str(shard_set["manifest"])):
        result = runner.invoke(app, ["evaluate", "--query", str(shard_set["query"]), "--gallery", gallery, "-q"])
        assert result.exit_code == 0, result.output
        reports.append({k: v for k, v in json.loads(result.stdout).items() if k != "gallery_file"})
    assert reports[0] == reports[1] == reports[2] and reports[0]["queries"] > 0
    whole = load_embeddings(merged)
    as_set = load_embeddings(shard_set["parts"], mmap=True)
    assert isinstance(as_set.embeddings, ConcatRows) and as_set.ids == whole.ids
    np.testing.assert_array_equal(np.asarray(as_set.embeddings, dtype=np.float32), whole.embeddings)
    np.testing.assert_array_equal(as_set.labels, whole.labels)


def test_a_shard_set_with_a_part_missing_or_foreign_is_refused(shard_set: dict[str, Path], tmp_path: Path) -> None:
    manifest = tmp_path / "two.txt"
    manifest.write_text("\n".join(str(shard_set["parts"] / f"g.part{i}.safetensors") for i in (0, 2)))
    with pytest.raises(EmbeddingsError, match=r"shards 1/3 are missing"):
        load_embeddings(manifest, mmap=True)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "merged.safetensors").write_bytes(shard_set["merged"].read_bytes())
    with pytest.raises(EmbeddingsError, match="is not a shard"):
        load_embeddings(mixed, mmap=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(EmbeddingsError, match="names no part files"):
        load_embeddings(empty)
    gone = tmp_path / "gone.txt"
    gone.write_text("nowhere.safetensors\n")
    with pytest.raises(EmbeddingsError, match="names 1 part files that are not there"):
        load_embeddings(gone)


def _reference_top_k(q: np.ndarray, g: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """The slow, obvious ranking: every score, sorted by (-score, index), the excluded row dropped."""
    out = []
    for row, ex in zip(q, exclude):
        scores = g @ row
        order = sorted(range(len(g)), key=lambda i: (-scores[i], i))
        out.append([i for i in order if i != ex][:k])
    return np.array(out)


@pytest.mark.parametrize("block_rows", [1, 7, 64, None])
def test_streamed_search_is_the_exact_top_k_with_ties_by_index(block_rows: int | None) -> None:
    from bctool.evaluate.search import rank_gallery, stream_rankings

    rng = np.random.default_rng(3)
    # Few distinct rows: scores tie everywhere, across block boundaries too.
    g = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=50)]
    q = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=9)] + np.float32(0.5)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exclude = rng.integers(-1, 50, size=9)
    for k in (1, 5, 30):
        _, streamed = stream_rankings(q, g, k, exclude, block_rows=block_rows)
        np.testing.assert_array_equal(streamed, _reference_top_k(q, g, k, exclude))
        _, whole = rank_gallery(q, g, k, exclude)
        np.testing.assert_array_equal(streamed, whole)


def test_evaluate_on_a_streamed_gallery_equals_the_whole_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """--top-k below the gallery size streams the gallery; the figures are those of one index."""
    import bctool.evaluate.search as search
    from bctool.evaluate.retrieval import evaluate_retrieval
    from bctool.evaluate.search import SearchOptions

    gallery, query = _gallery(300, seed=4), _gallery(40, seed=5)
    whole = evaluate_retrieval(query, gallery, ks=(1, 5), search=SearchOptions(top_k=299))  # one block: the whole gallery
    monkeypatch.setattr(search, "_STREAM_BLOCK_BYTES", 4 * 8 * 13)  # blocks of 13 rows
    assert evaluate_retrieval(query, gallery, ks=(1, 5), search=SearchOptions(top_k=299)) == whole
    full = evaluate_retrieval(query, gallery, ks=(1, 5))  # the whole ranking: one index, not streamed
    assert full["map@100"] == pytest.approx(whole["map@100"])


def test_adapt_reads_at_most_max_pairs(tmp_path: Path) -> None:
    """A seeded sample of the pairs: the fit's memory is bounded by --max-pairs, not the files."""
    source, target = _gallery(400, seed=6), _gallery(400, seed=7)
    for name, emb in (("s", source), ("t", target)):
        save_embeddings(emb, tmp_path / f"{name}.safetensors", dtype="float16")
    result = CliRunner().invoke(app, ["adapt", str(tmp_path / "s.safetensors"), str(tmp_path / "t.safetensors"),
                                      "--out", str(tmp_path / "a.safetensors"), "--max-pairs", "50", "-q"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)["fit"]
    assert fit["shared_ids"] == 400 and fit["pairs"] == 50 and fit["fitted_on"] == 45 and fit["held_out"] == 5


@pytest.mark.parametrize("new_normalized", [False, True])
def test_a_mixed_gallery_reads_the_rows_a_copy_would_hold(new_normalized: bool) -> None:
    from bctool.backfill.curve import MixedRows, partial_backfill

    old, new = _gallery(60, seed=8), _gallery(60, seed=9)
    shuffle = np.random.default_rng(0).permutation(60)  # the new file lists the images in another order
    new = Embeddings(new.embeddings[shuffle], new.labels[shuffle], [old.ids[i] for i in shuffle], new.label_names,
                     normalized=new_normalized)
    if new_normalized:
        new = Embeddings(new.normalized_embeddings(), new.labels, new.ids, new.label_names, normalized=True)
    mixed = partial_backfill(old, new, 0.4, seed=3)
    assert isinstance(mixed.embeddings, MixedRows)
    chosen = np.random.default_rng(3).permutation(60)[:24]
    new_row_of = {image_id: i for i, image_id in enumerate(new.ids)}
    old_rows = old.normalized_embeddings() if new_normalized else old.embeddings
    expected = np.array(old_rows, dtype=np.float32, copy=True)
    expected[chosen] = new.embeddings[[new_row_of[old.ids[i]] for i in chosen]]
    np.testing.assert_allclose(np.asarray(mixed.embeddings), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mixed.embeddings[np.array([5, 1, 59])], expected[[5, 1, 59]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mixed.embeddings[10:30], expected[10:30], rtol=1e-6, atol=1e-7)


def test_repeated_ids_are_found_in_the_buffer_as_a_set_finds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import bctool.embeddings.ids
    from bctool.embeddings import has_repeats

    ids = [f"img/{i}" for i in range(5000)]
    assert not has_repeats(RowIds.encode(ids)) and not has_repeats(ids)
    assert has_repeats(RowIds.encode([*ids, "img/17"])) and has_repeats([*ids, "img/17"])
    # Every id hashed alike: only the exact comparison of the suspects decides.
    monkeypatch.setattr(bctool.embeddings.ids, "_hash_ids", lambda ids: np.zeros(len(ids), np.uint64))
    assert not has_repeats(RowIds.encode(ids)) and has_repeats(RowIds.encode(["a", "b", "a"]))
