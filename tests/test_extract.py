"""Extraction at scale: the streaming writer, shards and merge, skipped images, resuming."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from typer.testing import CliRunner

from bctool.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bctool.cli import app
from bctool.data import load_image_set
from bctool.data.check import report_path
from bctool.data.transforms import Preprocess
from bctool.embeddings import (
    Embeddings,
    EmbeddingsSpec,
    load_embeddings,
    merge_shards,
    save_embeddings,
    write_embeddings,
)
from bctool.embeddings.format import _metadata
from bctool.errors import ConfigError, DataError, EmbeddingsError
from bctool.extract import ExtractOptions, Shard, extract, extract_to_file, partial_paths
from bctool.models import ModelConfig, create_model

runner = CliRunner()


def _split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_file_is_what_safetensors_writes(tmp_path: Path, dtype: str) -> None:
    """Same header (as JSON) and the same data bytes as safetensors' own writer, ids as tensors
    (version 2); rows written in blocks out of order."""
    rng = np.random.default_rng(0)
    emb = Embeddings(rng.normal(size=(7, 3)).astype(np.float32), np.array([0, 1, -1, 0, 1, 1, 0]),
                     ["a", "ü/b", 'c"q', "d\te", "e", "", "g"], ["x", "y"], {"sha256": "ab"}, root="/r",
                     shard={"index": 0, "count": 1, "start": 0, "stop": 7, "total": 7, "list": "h"})
    ours = tmp_path / "ours.safetensors"
    with write_embeddings(ours, EmbeddingsSpec(labels=emb.labels, ids=emb.ids, label_names=emb.label_names, dim=3,
                                               model=emb.model, root=emb.root, shard=emb.shard, dtype=dtype)) as writer:
        writer.write(4, emb.embeddings[4:])
        writer.write(0, emb.embeddings[:4])
    ref = tmp_path / "ref.safetensors"
    encoded = [i.encode() for i in emb.ids]
    rows = emb.embeddings.astype(np.float16 if dtype == "float16" else np.float32)
    save_file({"embeddings": rows, "labels": emb.labels,
               "id_offsets": np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64),
               "id_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8)}, str(ref),
              metadata=_metadata(emb.label_names, emb.model, False, emb.root, emb.shard))
    (ours_header, ours_data), (ref_header, ref_data) = _split_file(ours), _split_file(ref)
    assert ours_header == ref_header and ours_data == ref_data
    with safe_open(str(ours), framework="np") as fh:  # safetensors validates the layout
        np.testing.assert_array_equal(fh.get_tensor("embeddings"), rows)
    for mmap in (True, False):
        back = load_embeddings(ours, mmap=mmap)
        assert back.ids == emb.ids and list(back.ids) == emb.ids and back.shard == emb.shard
        assert back.embeddings.dtype == (rows.dtype if mmap else np.float32)
        np.testing.assert_array_equal(back.embeddings, rows)


def test_unwritten_rows_leave_no_file(tmp_path: Path) -> None:
    out = tmp_path / "e.safetensors"
    spec = EmbeddingsSpec(labels=np.zeros(3, np.int64), ids=["a", "b", "c"], label_names=["x"], dim=2, model={})
    with pytest.raises(EmbeddingsError, match="1 of 3 rows were never written"):
        with write_embeddings(out, spec) as writer:
            writer.write(0, np.ones((2, 2), np.float32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EmbeddingsError, match="rows 2..4 lie outside a file of 3 rows"):
        with write_embeddings(out, spec) as writer:
            writer.write(2, np.ones((2, 2), np.float32))


def test_save_embeddings_copies_a_memory_mapped_file_block_by_block(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    emb = Embeddings(rng.normal(size=(10, 4)).astype(np.float32), np.arange(10) % 2, [str(i) for i in range(10)],
                     ["a", "b"])
    save_embeddings(emb, tmp_path / "a.safetensors")
    save_embeddings(load_embeddings(tmp_path / "a.safetensors", mmap=True), tmp_path / "b.safetensors", block_rows=3)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_shard_rows_cover_the_list_once() -> None:
    for total in (0, 1, 7, 100):
        for count in (1, 3, 8):
            covered = [r for i in range(count) for r in Shard(i, count).rows(total)]
            assert covered == list(range(total))
    assert Shard.parse("2/5") == Shard(2, 5)
    for bad, match in [("3", "is not I/N"), ("a/b", "is not I/N"), ("5/5", "I must lie in 0..N-1"),
                       ("-1/2", "I must lie in 0..N-1"), ("0/0", "N be at least 1")]:
        with pytest.raises(ConfigError, match=match):
            Shard.parse(bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=2))
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_checkpoint(path, model, Preprocess(image_size=16), ["a", "b"])
    return load_checkpoint(path)


@pytest.fixture()
def images(emoji_dir: Path, tmp_path: Path) -> Path:
    """A copy of the emoji query list (its images shared), so tests may break images."""
    lines = (emoji_dir / "gallery.txt").read_text().splitlines()
    (tmp_path / "images").symlink_to(emoji_dir / "images")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "list.txt"


def test_streamed_extraction_equals_in_memory(images: Path, checkpoint: Checkpoint, tmp_path: Path) -> None:
    image_set = load_image_set(images)
    result = extract_to_file(image_set, checkpoint, tmp_path / "e.safetensors",
                             options=ExtractOptions(batch_size=5, workers=0))
    streamed, memory = load_embeddings(tmp_path / "e.safetensors"), extract(image_set, checkpoint, batch_size=5, workers=0)
    np.testing.assert_array_equal(streamed.embeddings, memory.embeddings)
    assert streamed.ids == memory.ids and streamed.shard is None
    assert result.rows == len(image_set) and not result.failed and result.report is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "images", "list.txt"]


def test_shards_merge_into_the_whole(images: Path, checkpoint: Checkpoint, tmp_path: Path) -> None:
    image_set = load_image_set(images)
    extract_to_file(image_set, checkpoint, tmp_path / "whole.safetensors",
                    options=ExtractOptions(batch_size=4, workers=0))
    parts = [tmp_path / f"part{i}.safetensors" for i in range(3)]
    for i, part in enumerate(parts):
        extract_to_file(image_set, checkpoint, part, options=ExtractOptions(batch_size=4, workers=0, shard=Shard(i, 3)))
    assert load_embeddings(parts[1]).shard["start"] == len(image_set) // 3
    summary = merge_shards([parts[2], parts[0], parts[1]], tmp_path / "merged.safetensors")
    assert summary["images"] == len(image_set) and summary["parts"] == 3
    merged, whole = load_embeddings(tmp_path / "merged.safetensors"), load_embeddings(tmp_path / "whole.safetensors")
    assert merged.ids == whole.ids and merged.shard is None
    np.testing.assert_array_equal(merged.labels, whole.labels)
    np.testing.assert_allclose(merged.embeddings, whole.embeddings, rtol=1e-5, atol=1e-6)  # other batch splits

    with pytest.raises(EmbeddingsError, match=r"shards 1/3 are missing \(1 of 3\)"):
        merge_shards([parts[0], parts[2]], tmp_path / "m.safetensors")
    with pytest.raises(EmbeddingsError, match="shard 0/3 is given twice"):
        merge_shards([parts[0], parts[0], parts[1], parts[2]], tmp_path / "m.safetensors")
    with pytest.raises(EmbeddingsError, match="is not a shard"):
        merge_shards([tmp_path / "whole.safetensors"], tmp_path / "m.safetensors")
    other_list = tmp_path / "half.txt"
    other_list.write_text("\n".join(images.read_text().splitlines()[:-1]) + "\n")
    extract_to_file(load_image_set(other_list), checkpoint, tmp_path / "other.safetensors",
                    options=ExtractOptions(workers=0, shard=Shard(1, 3)))
    with pytest.raises(EmbeddingsError, match="differ in list"):
        merge_shards([parts[0], tmp_path / "other.safetensors", parts[2]], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def _break_images(images: Path, tmp_path: Path) -> list[str]:
    """Replace two images of the list by a truncated PNG and a missing file; return their ids."""
    lines = images.read_text().splitlines()
    bad_png, gone = tmp_path / "bad.png", tmp_path / "gone.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    lines[2] = f"{bad_png.name}\t{lines[2].split()[1]}"
    lines[5] = f"{gone.name}\t{lines[5].split()[1]}"
    images.write_text("\n".join(lines) + "\n")
    return ["bad", "gone"]


def test_unreadable_images_are_skipped_and_reported(images: Path, checkpoint: Checkpoint, tmp_path: Path) -> None:
    bad_ids = _break_images(images, tmp_path)
    image_set = load_image_set(images)
    out = tmp_path / "e.safetensors"
    result = extract_to_file(image_set, checkpoint, out, options=ExtractOptions(batch_size=4, workers=0))
    emb = load_embeddings(out)
    assert len(emb) == len(image_set) - 2 and not set(bad_ids) & set(emb.ids)
    readable = replace(image_set, records=tuple(r for r in image_set.records if r.id not in bad_ids))
    np.testing.assert_allclose(emb.embeddings, extract(readable, checkpoint, workers=0).embeddings, rtol=1e-4, atol=1e-6)
    report = report_path(out).read_text().splitlines()
    assert report[0] == "id\tpath\terror" and [line.split("\t")[0] for line in report[1:]] == bad_ids
    assert "cannot be decoded" in report[1] and "does not exist" in report[2]
    assert result.to_dict()["failed"] == 2 and result.report == str(report_path(out))

    with pytest.raises(DataError, match="cannot be decoded"):
        extract_to_file(image_set, checkpoint, tmp_path / "strict.safetensors",
                        options=ExtractOptions(workers=0, strict=True))
    assert not (tmp_path / "strict.safetensors").exists()


def test_cli_extract_skips_then_strict_fails(images: Path, checkpoint: Checkpoint, tmp_path: Path) -> None:
    _break_images(images, tmp_path)
    model = checkpoint.path
    out = tmp_path / "e.safetensors"
    result = runner.invoke(app, ["extract", str(images), "-m", str(model), "-o", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["failed"] == 2 and summary["report"].endswith("e.safetensors.failed.tsv")
    assert "Skipped 2 unreadable images" in result.stderr
    result = runner.invoke(app, ["extract", str(images), "-m", str(model), "-o", str(out), "--workers", "0",
                                 "--strict"])
    assert result.exit_code == 1 and "Error: image" in result.stderr and "cannot be decoded" in result.stderr


def test_interrupted_extraction_resumes_to_the_same_file(
    images: Path, checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_set = load_image_set(images)
    extract_to_file(image_set, checkpoint, tmp_path / "straight.safetensors",
                    options=ExtractOptions(batch_size=3, workers=0))
    out = tmp_path / "e.safetensors"
    import bctool.extract as module

    real = module._embed_batches

    def dies_after_two_batches(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(module, "_embed_batches", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(image_set, checkpoint, out, options=ExtractOptions(batch_size=3, workers=0))
    monkeypatch.setattr(module, "_embed_batches", real)
    partial, state = partial_paths(out)
    assert not out.exists() and partial.exists()
    assert json.loads(state.read_text())["rows_done"] == 6

    seen: list[int] = []

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for batch in real(*args, **kwargs):
            seen.append(batch[0])
            yield batch

    monkeypatch.setattr(module, "_embed_batches", counting)
    result = extract_to_file(image_set, checkpoint, out, options=ExtractOptions(batch_size=3, workers=0, resume=True))
    assert result.resumed_from_row == 6 and seen[0] == 6
    assert out.read_bytes() == (tmp_path / "straight.safetensors").read_bytes()
    assert not partial.exists() and not state.exists()


def test_resume_refuses_another_run(images: Path, checkpoint: Checkpoint, tmp_path: Path) -> None:
    image_set = load_image_set(images)
    out = tmp_path / "e.safetensors"
    with pytest.raises(ConfigError, match="no interrupted extraction to .* start without --resume"):
        extract_to_file(image_set, checkpoint, out, options=ExtractOptions(workers=0, resume=True))
    partial, state = partial_paths(out)
    extract_to_file(image_set, checkpoint, out, options=ExtractOptions(workers=0, shard=Shard(0, 2)))
    # Fake an interrupted run of shard 0/2, then resume it as shard 1/2.
    shutil.copy(out, partial)
    state.write_text(json.dumps({"fingerprint": "x", "rows_done": 1, "failed": []}))
    with pytest.raises(ConfigError, match="was begun for other images, labels, model or shard"):
        extract_to_file(image_set, checkpoint, out, options=ExtractOptions(workers=0, shard=Shard(1, 2), resume=True))
    state.write_text("{not json")
    with pytest.raises(ConfigError, match="is unreadable"):
        extract_to_file(image_set, checkpoint, out, options=ExtractOptions(workers=0, shard=Shard(0, 2), resume=True))


def test_cli_shards_and_merge(images: Path, checkpoint: Checkpoint, tmp_path: Path) -> None:
    parts = []
    for i in range(2):
        part = tmp_path / f"p{i}.safetensors"
        result = runner.invoke(app, ["extract", str(images), "-m", checkpoint.path, "-o", str(part),
                                     "--shard", f"{i}/2", "--workers", "0", "-q"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["shard"] == f"{i}/2"
        parts.append(str(part))
    result = runner.invoke(app, ["merge", *parts[::-1], "-o", str(tmp_path / "all.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"] == len(load_image_set(images))
    result = runner.invoke(app, ["merge", parts[0], "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "shards 1/2 are missing" in result.stderr
    result = runner.invoke(app, ["extract", str(images), "-m", checkpoint.path, "-o", str(tmp_path / "y.safetensors"),
                                 "--shard", "2/2"])
    assert result.exit_code == 2 and "'2/2': I must lie in 0..N-1" in result.stderr  # a usage error


def test_merge_refuses_corrupt_shard_metadata(tmp_path: Path) -> None:
    rows = np.zeros((2, 3), np.float32)
    for name, shard, match in [
        ("missing", {"index": 0, "count": 1}, "corrupt 'shard' metadata"),
        ("outside", {"index": 3, "count": 2, "start": 0, "stop": 2, "total": 2, "list": "x"}, "inconsistent"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_embeddings(Embeddings(rows, np.zeros(2, np.int64), ["a", "b"], ["x"], shard=shard), path)
        with pytest.raises(EmbeddingsError, match=match):
            merge_shards([path], tmp_path / "out.safetensors")
