"""Checkpoint and embeddings files: round trips, metadata, and clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from bctool.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from bctool.data.transforms import Preprocess
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import EmbeddingsError, ModelError
from bctool.models import ModelConfig, create_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=16, num_classes=3, head="arcface"))
    # Non-trivial BN statistics, so a lost buffer would change the outputs.
    model.train()
    model.embed(torch.randn(8, 3, 32, 32))
    return model.eval()


def test_checkpoint_rebuilds_model_from_file_alone(tmp_path: Path) -> None:
    model = _model()
    pre = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, pre, ["a", "b", "c"], train_config={"epochs": 2}, extra={"k": 1})
    ckpt = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.model.embed(x), model.embed(x))
    assert ckpt.config == model.config
    assert ckpt.preprocess == pre
    assert ckpt.class_names == ["a", "b", "c"]
    assert ckpt.train_config == {"epochs": 2} and ckpt.extra == {"k": 1}
    assert len(ckpt.sha256) == 64 and ckpt.identity()["arch"] == "small"
    meta = read_checkpoint_metadata(path)
    assert json.loads(meta["model"])["head"] == "arcface" and meta["bctool_version"]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist; train one"):
        load_checkpoint(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a readable safetensors checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(foreign))
    with pytest.raises(ModelError, match="not a bctool checkpoint"):
        load_checkpoint(foreign)
    emb = tmp_path / "emb.safetensors"
    save_embeddings(_embeddings(), emb)
    with pytest.raises(ModelError, match="not a bctool checkpoint.*embeddings file"):
        load_checkpoint(emb)


def test_checkpoint_with_tampered_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), Preprocess(32), ["a", "b", "c"])
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_pt

    state = load_file(str(path))
    meta = read_checkpoint_metadata(path)
    meta["model"] = json.dumps({**json.loads(meta["model"]), "embedding_dim": 32})
    save_pt(state, str(path), metadata=meta)
    with pytest.raises(ModelError, match="do not fit a small with embedding dimension 32"):
        load_checkpoint(path)


def _embeddings(n: int = 5, d: int = 4) -> Embeddings:
    rng = np.random.default_rng(0)
    return Embeddings(
        embeddings=rng.normal(size=(n, d)).astype(np.float32),
        labels=np.array([0, 1, -1, 1, 0][:n], dtype=np.int64),
        ids=[f"img/{i}" for i in range(n)],
        label_names=["cat", "dog"],
        model={"sha256": "ab" * 32, "arch": "small", "embedding_dim": d},
    )


def test_embeddings_round_trip(tmp_path: Path) -> None:
    emb = _embeddings()
    path = tmp_path / "e.safetensors"
    save_embeddings(emb, path)
    back = load_embeddings(path)
    np.testing.assert_array_equal(back.embeddings, emb.embeddings)
    np.testing.assert_array_equal(back.labels, emb.labels)
    assert back.ids == emb.ids and back.label_names == emb.label_names and back.model == emb.model
    assert back.label_strings() == ["cat", "dog", None, "dog", "cat"]
    np.testing.assert_allclose(np.linalg.norm(back.normalized_embeddings(), axis=1), 1.0, rtol=1e-6)


def test_embeddings_file_layout_is_plain_safetensors(tmp_path: Path) -> None:
    """Other tools can read the file with nothing but safetensors."""
    from safetensors import safe_open

    path = tmp_path / "e.safetensors"
    save_embeddings(_embeddings(), path)
    with safe_open(str(path), framework="np") as fh:
        assert set(fh.keys()) == {"embeddings", "labels", "id_offsets", "id_bytes"}
        assert fh.get_tensor("embeddings").dtype == np.float32
        assert fh.get_tensor("labels").dtype == np.int64
        offsets, data = fh.get_tensor("id_offsets"), fh.get_tensor("id_bytes").tobytes()
        meta = fh.metadata()
    # The README's recipe for the ids: the UTF-8 bytes between consecutive offsets.
    ids = [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
    assert ids == _embeddings().ids and meta["format"] == "bctool.embeddings" and meta["format_version"] == "2"


def test_version_1_files_still_load() -> None:
    """A file in the version-1 layout (ids as JSON in the metadata), kept as written then."""
    path = Path(__file__).parent / "data" / "embeddings_v1.safetensors"
    for mmap in (False, True):
        emb = load_embeddings(path, mmap=mmap)
        assert emb.ids == ["img/0", "img/1", "img/2"] and emb.label_strings() == ["cat", "dog", None]
        assert emb.embeddings.shape == (3, 4) and emb.model["arch"] == "small" and emb.ids_known


def test_embeddings_validation() -> None:
    good = _embeddings()
    with pytest.raises(EmbeddingsError, match="5 embeddings but 4 ids"):
        Embeddings(good.embeddings, good.labels, good.ids[:4], good.label_names)
    with pytest.raises(EmbeddingsError, match=r"labels must lie in \[-1, 1\]"):
        Embeddings(good.embeddings, good.labels + 5, good.ids, good.label_names)
    with pytest.raises(EmbeddingsError, match="2-D"):
        Embeddings(good.embeddings[0], good.labels, good.ids, good.label_names)


def test_embeddings_load_errors(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingsError, match="does not exist; run `bctool extract`"):
        load_embeddings(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(EmbeddingsError, match="not a readable safetensors file"):
        load_embeddings(junk)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, _model(), Preprocess(32), ["a", "b", "c"])
    with pytest.raises(EmbeddingsError, match="is a model checkpoint, not an embeddings file"):
        load_embeddings(ckpt)


def test_foreign_safetensors_lists_only_a_few_tensor_names(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({f"t{i:02d}": np.zeros(1, np.float32) for i in range(20)}, str(path))
    with pytest.raises(EmbeddingsError, match=r"no 'embeddings' tensor \(found t00, t01, t02, t03, t04 and 15 more\)"):
        load_embeddings(path)
