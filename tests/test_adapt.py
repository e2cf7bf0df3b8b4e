"""Adapters between embedding spaces: known maps recovered, ids paired (never row order),
dimensions either way, the adapter file, streamed transforms, blends, and the adapter in extract
and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bctool.adapt import fit_adapter, load_adapter, save_adapter, slerp, transform_file
from bctool.adapt.transform import check_source
from bctool.cli import app
from bctool.embeddings import (
    Embeddings,
    load_embeddings,
    normalize_rows,
    save_embeddings,
)
from bctool.errors import EmbeddingsError

runner = CliRunner()
SHA_A, SHA_B = "a" * 64, "b" * 64


def _emb(rows: np.ndarray, ids: list[str], labels: np.ndarray | None = None, sha: str = SHA_A) -> Embeddings:
    labels = np.zeros(len(ids), np.int64) if labels is None else labels
    names = [f"c{i}" for i in range(int(labels.max()) + 1)] if len(labels) else []
    return Embeddings(np.asarray(rows, np.float32), labels, ids, names, model={"sha256": sha, "path": f"/m/{sha[0]}"})


def _pairs(d_in: int, d_out: int, n: int = 400, seed: int = 0):  # noqa: ANN202 - (x, ids, rng)
    rng = np.random.default_rng(seed)
    x = normalize_rows(rng.normal(size=(n, d_in)).astype(np.float32))
    return x, [f"img{i}" for i in range(n)], rng


def _shuffled(rows: np.ndarray, ids: list[str], rng: np.random.Generator, sha: str = SHA_B) -> Embeddings:
    """The same images in another row order: pairing must go by id."""
    order = rng.permutation(len(ids))
    return _emb(rows[order], [ids[i] for i in order], sha=sha)


@pytest.mark.parametrize(("d_in", "d_out"), [(16, 16), (16, 32), (32, 16)])
def test_procrustes_recovers_a_known_rotation(d_in: int, d_out: int) -> None:
    x, ids, rng = _pairs(d_in, d_out)
    q, _ = np.linalg.qr(rng.normal(size=(max(d_in, d_out), max(d_in, d_out))))
    rotation = q[:d_in, :d_out] if d_in <= d_out else q[:d_out, :d_in].T  # orthonormal columns or rows
    if d_in > d_out:
        x = normalize_rows((x @ rotation) @ rotation.T)  # rows in the span the map keeps: an exact answer exists
    y = x @ rotation
    adapter = fit_adapter(_emb(x, ids), _shuffled(y, ids, rng), "procrustes", holdout=0.1)
    np.testing.assert_allclose(adapter.module.weight.detach().numpy(), rotation, atol=1e-4)
    assert adapter.fit["held_out_cosine"] > 0.9999 and (adapter.source_dim, adapter.target_dim) == (d_in, d_out)


@pytest.mark.parametrize(("d_in", "d_out"), [(12, 12), (12, 20), (20, 12)])
def test_affine_recovers_a_known_affine_map(d_in: int, d_out: int) -> None:
    """The fit itself on raw targets (``fit_adapter`` normalises them first, as retrieval does)."""
    from bctool.adapt.maps import AffineParams, affine_fit

    x, _, rng = _pairs(d_in, d_out)
    matrix, bias = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    y = torch.from_numpy((x @ matrix + bias).astype(np.float32))
    fitted = affine_fit(torch.from_numpy(x), y, torch.zeros(len(x), dtype=torch.int64), AffineParams(ridge=0.0))
    np.testing.assert_allclose(fitted.weight.detach().numpy(), matrix, atol=1e-3)
    np.testing.assert_allclose(fitted.bias.detach().numpy(), bias, atol=1e-3)


def test_rows_pair_by_id_and_unshared_ids_are_dropped() -> None:
    x, ids, rng = _pairs(8, 8, n=50)
    target = _emb(x[:40][::-1], ids[:40][::-1], sha=SHA_B)  # reversed, and 10 images missing
    adapter = fit_adapter(_emb(x, ids), target, "procrustes", holdout=0)
    assert adapter.fit["pairs"] == 40
    np.testing.assert_allclose(adapter.module.weight.detach().numpy(), np.eye(8), atol=1e-5)
    with pytest.raises(EmbeddingsError, match="share no id"):
        fit_adapter(_emb(x, ids), _emb(x, [f"other{i}" for i in range(50)]), "procrustes")
    twice = _emb(x[:2], ["a", "a"])
    with pytest.raises(EmbeddingsError, match="more than once"):
        fit_adapter(twice, target, "procrustes")


def test_mlp_starts_as_the_affine_map_and_fits_a_curved_map_closer() -> None:
    from bctool.adapt.maps import AffineParams, MLPParams, affine_fit, mlp_fit

    x, _, _ = _pairs(8, 8, n=1200)
    y = torch.from_numpy(normalize_rows(np.sin(4 * x) + 0.3 * x))
    x, labels = torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64)
    affine = affine_fit(x, y, labels, AffineParams())
    untrained = mlp_fit(x, y, labels, MLPParams(epochs=1, lr=1e-12, label_weight=0))
    trained = mlp_fit(x, y, labels, MLPParams(epochs=30, lr=3e-3, label_weight=0))

    def cosine(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(model(x), y).mean())

    assert cosine(untrained) == pytest.approx(cosine(affine), abs=1e-5)
    assert cosine(trained) > cosine(affine) + 0.002


def test_the_adapter_file_round_trips_and_is_self_describing(tmp_path: Path) -> None:
    x, ids, rng = _pairs(8, 6)
    labels = rng.integers(0, 4, len(ids))
    source = _emb(x, ids, labels)
    target = _emb(normalize_rows(x @ rng.normal(size=(8, 6)).astype(np.float32)), ids, labels, SHA_B)
    for kind in ("procrustes", "affine", "mlp"):
        adapter = fit_adapter(source, target, kind, {"epochs": 2} if kind == "mlp" else None)
        save_adapter(adapter, tmp_path / f"{kind}.safetensors")
        back = load_adapter(tmp_path / f"{kind}.safetensors")
        np.testing.assert_array_equal(back.apply(x), adapter.apply(x))
        assert (back.kind, back.source_dim, back.target_dim) == (kind, 8, 6)
        assert back.source_model["sha256"] == SHA_A and back.target_model["sha256"] == SHA_B
        assert back.fit == adapter.fit and back.fit["held_out_map"] is not None
    save_embeddings(source, tmp_path / "e.safetensors")
    with pytest.raises(Exception, match="is not an adapter file"):
        load_adapter(tmp_path / "e.safetensors")


def test_transform_streams_blocks_refuses_other_models_and_blends(tmp_path: Path) -> None:
    x, ids, rng = _pairs(8, 8, n=300)
    old = _emb(normalize_rows(x @ np.linalg.qr(rng.normal(size=(8, 8)))[0].astype(np.float32)), ids, sha=SHA_B)
    adapter = fit_adapter(_emb(x, ids), old, "procrustes")
    save_adapter(adapter, tmp_path / "a.safetensors")
    adapter = load_adapter(tmp_path / "a.safetensors")
    save_embeddings(_emb(x, ids), tmp_path / "new.safetensors")
    save_embeddings(old, tmp_path / "old.safetensors")
    whole = transform_file(tmp_path / "new.safetensors", adapter, tmp_path / "t1.safetensors")
    transform_file(tmp_path / "new.safetensors", adapter, tmp_path / "t2.safetensors", block_rows=7)
    one, blocks = load_embeddings(tmp_path / "t1.safetensors"), load_embeddings(tmp_path / "t2.safetensors")
    np.testing.assert_array_equal(one.embeddings, blocks.embeddings)
    np.testing.assert_allclose(one.embeddings, old.embeddings, atol=1e-4)
    assert whole["rows"] == 300 and one.model["adapter"]["kind"] == "procrustes"
    assert one.model["source"]["sha256"] == SHA_A and one.model["space"]["sha256"] == SHA_B
    # Blend weight 0 gives the old rows, 1 the mapped ones; the --blend file pairs by id.
    save_embeddings(_shuffled(old.embeddings, ids, rng), tmp_path / "old_shuffled.safetensors")
    for weight, want in ((0.0, old.embeddings), (1.0, one.embeddings)):
        transform_file(tmp_path / "new.safetensors", adapter, tmp_path / "b.safetensors",
                       blend=tmp_path / "old_shuffled.safetensors", blend_weight=weight, block_rows=50)
        np.testing.assert_allclose(load_embeddings(tmp_path / "b.safetensors").embeddings, want, atol=1e-5)
    with pytest.raises(EmbeddingsError, match="was made by model bbbbbbbbbbbb .* but the adapter maps the space"):
        check_source(old, adapter)


def test_slerp_keeps_unit_length_and_interpolates_the_angle() -> None:
    a, b = np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    half = slerp(a, b, 0.5)
    np.testing.assert_allclose(half, [[2**-0.5, 2**-0.5]], atol=1e-6)
    np.testing.assert_allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel rows: no division by zero


@pytest.mark.slow
def test_cli_adapt_transform_extract_and_export_with_an_adapter(emoji_dir: Path, tmp_path: Path) -> None:
    """A tiny model's embeddings mapped into a second model's space; the ONNX export with the
    adapter matches `extract --adapter` within 1e-4; an adapter of another model is refused."""
    pytest.importorskip("onnxruntime")
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    paths = {}
    for name, dim, seed in (("new", 12, 0), ("old", 8, 1)):
        torch.manual_seed(seed)
        model = create_model(ModelConfig(arch="small", embedding_dim=dim, num_classes=3))
        with torch.no_grad():
            model.train()(torch.randn(8, 3, 24, 24))
        paths[name] = tmp_path / f"{name}.safetensors"
        save_checkpoint(paths[name], model.eval(), Preprocess(image_size=24), ["a", "b", "c"], train_config={"seed": 0})
        result = runner.invoke(app, ["extract", str(emoji_dir / "new_train.txt"), "-m", str(paths[name]), "-o",
                                     str(tmp_path / f"{name}_train.safetensors"), "--workers", "0", "-q"])
        assert result.exit_code == 0, result.stderr
    fitted = runner.invoke(app, ["adapt", str(tmp_path / "new_train.safetensors"), str(tmp_path / "old_train.safetensors"),
                                 "--out", str(tmp_path / "a.safetensors"), "--kind", "affine", "-q"])
    assert fitted.exit_code == 0, fitted.stderr
    fit = json.loads(fitted.stdout)
    assert (fit["source_dim"], fit["target_dim"]) == (12, 8) and fit["fit"]["held_out"] > 0
    adapted = tmp_path / "q.safetensors"
    extracted = runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(paths["new"]), "-o", str(adapted),
                                    "--adapter", str(tmp_path / "a.safetensors"), "--workers", "0", "-q"])
    assert extracted.exit_code == 0, extracted.stderr
    rows = load_embeddings(adapted)
    assert rows.dim == 8 and rows.model["adapter"]["kind"] == "affine"
    # transform of the unadapted rows gives the same file's rows
    again = runner.invoke(app, ["transform", json.loads(extracted.stdout)["unadapted"], "--adapter",
                                str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "q2.safetensors"), "-q"])
    assert again.exit_code == 0, again.stderr
    np.testing.assert_array_equal(load_embeddings(tmp_path / "q2.safetensors").embeddings, rows.embeddings)
    onnx = tmp_path / "new+adapter.onnx"
    exported = runner.invoke(app, ["export", str(paths["new"]), "--out", str(onnx), "--adapter",
                                   str(tmp_path / "a.safetensors"), "--images", str(emoji_dir / "query.txt"), "-q"])
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["output"]["shape"] == ["batch", 8]
    import onnxruntime

    from bctool.data import load_image_set
    from bctool.data.dataset import load_record
    from bctool.data.transforms import EvalTransform

    images = load_image_set(emoji_dir / "query.txt").records[:6]
    batch = torch.stack([EvalTransform(Preprocess(image_size=24))(load_record(r)) for r in images]).numpy()
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": batch})[0]
    assert np.abs(got - rows.embeddings[:6]).max() < 1e-4
    # Files mapped by one adapter from one model pair up as one model's in the compatibility report.
    for split in ("gallery", "query"):
        for name in ("new", "old"):
            assert runner.invoke(app, ["extract", str(emoji_dir / f"{split}.txt"), "-m", str(paths[name]), "-o",
                                       str(tmp_path / f"{name}_{split}.safetensors"), "--workers", "0", "-q"]).exit_code == 0
    mapped_gallery = tmp_path / "mapped_gallery.safetensors"
    assert runner.invoke(app, ["transform", str(tmp_path / "new_gallery.safetensors"), "--adapter",
                               str(tmp_path / "a.safetensors"), "--out", str(mapped_gallery), "-q"]).exit_code == 0
    report = runner.invoke(app, ["evaluate", "--old-query", str(tmp_path / "old_query.safetensors"), "--old-gallery",
                                 str(tmp_path / "old_gallery.safetensors"), "--new-query", str(adapted),
                                 "--new-gallery", str(mapped_gallery), "--bootstrap", "20", "-q"])
    assert report.exit_code == 0, report.stderr
    assert set(json.loads(report.stdout)["results"]) == {"old/old", "new/new", "new/old"}
    wrong = runner.invoke(app, ["export", str(paths["old"]), "--out", str(tmp_path / "x.onnx"), "--adapter",
                                str(tmp_path / "a.safetensors")])
    assert wrong.exit_code == 1 and "the adapter maps the space of model" in wrong.stderr
    refused = runner.invoke(app, ["transform", str(tmp_path / "old_train.safetensors"), "--adapter",
                                  str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "y.safetensors")])
    assert refused.exit_code == 1 and "has dimension 8 but the adapter maps 12-d rows" in refused.stderr
