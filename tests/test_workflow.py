"""bctool.workflow: the cached steps the demo and the experiments share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bctool.checkpoint import file_sha256
from bctool.embeddings import load_embeddings
from bctool.workflow import embed_splits, ids_digest, rounded, run_record, write_run
from tests.helpers import tiny_checkpoint


def test_embeddings_are_reused_only_for_the_same_checkpoint_and_list(emoji_dir: Path, tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "m.safetensors", seed=0)
    lists = {"query": emoji_dir / "query.txt"}
    first = embed_splits(model, lists, tmp_path / "m")["query"]
    assert first == tmp_path / "m_query.safetensors"
    made = first.stat().st_mtime_ns
    assert embed_splits(model, lists, tmp_path / "m")["query"].stat().st_mtime_ns == made  # cached
    emb = load_embeddings(first)
    assert emb.model["sha256"] == file_sha256(model)

    tiny_checkpoint(model, seed=1)  # the model is trained again: other weights, same path
    again = load_embeddings(embed_splits(model, lists, tmp_path / "m")["query"])
    assert again.model["sha256"] == file_sha256(model)
    assert not np.array_equal(np.asarray(again.embeddings), np.asarray(emb.embeddings))

    gallery = load_embeddings(embed_splits(model, {"query": emoji_dir / "gallery.txt"}, tmp_path / "m")["query"])
    assert list(gallery.ids) != list(emb.ids)  # another list under the same name is embedded, not reused


def test_a_run_file_records_its_command_and_revision(tmp_path: Path) -> None:
    row = run_record(seed=3, ap=rounded([0.12345678, 1]))
    write_run(tmp_path / "runs" / "seed3.json", row)
    stored = json.loads((tmp_path / "runs" / "seed3.json").read_text())
    assert stored["seed"] == 3 and stored["ap"] == [0.123457, 1.0]
    assert "pytest" in stored["command"] or "python" in stored["command"]
    assert stored["revision"] is None or len(stored["revision"]) == 40
    assert stored["torch_threads"] >= 1
    assert ids_digest(["a", "b"]) != ids_digest(["b", "a"])
