"""Defects new users ran into: a fresh run over an interrupted one, a method name two plugins
claim, adapted shard parts, adapters fitted on too few pairs, overflow warnings from huge rows,
format-version messages and empty shards."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.adapt import fit_adapter, load_adapter, save_adapter, transform_file
from bctool.cli import app
from bctool.data import load_image_set
from bctool.embeddings import (
    Embeddings,
    load_embeddings,
    merge_shards,
    save_embeddings,
    shard_set_parts,
)
from bctool.errors import ConfigError, EmbeddingsError
from bctool.registry import PluginError
from bctool.train import TrainConfig, train
from bctool.train.methods import METHODS
from bctool.train.state import state_path

runner = CliRunner()


def _emb(rows: np.ndarray, ids: list[str], shard: dict | None = None, model: dict | None = None) -> Embeddings:
    return Embeddings(rows.astype(np.float32), np.arange(len(ids)) % 2, ids, ["a", "b"], model or {}, shard=shard)


# 1. A run without --resume over an interrupted run's state ----------------------------------

def test_a_fresh_run_refuses_to_start_over_an_interrupted_runs_state(
    emoji_dir: Path, tmp_path: Path, sigterm_at_step  # noqa: ANN001 - the conftest fixture
) -> None:
    from bctool.utils.interrupt import Interrupted

    images = load_image_set(emoji_dir / "new_train.txt")
    config = TrainConfig.from_options(arch="small", image_size=16, epochs=1, batch_size=16, workers=0, device="cpu")
    out = tmp_path / "m.safetensors"
    with sigterm_at_step(2), pytest.raises(Interrupted):
        train(images, config, out)
    state = state_path(out)
    saved = state.read_bytes()
    with pytest.raises(ConfigError, match=r"holds the training state of an interrupted run .*pass --resume to "
                                          r"continue it, or delete .*m\.state\.safetensors' to start over"):
        train(images, config, out)
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(out), "--arch", "small",
                                 "--image-size", "16", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                                 "--device", "cpu", "-q"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 1 and str(state) in said and "--resume" in said and "delete" in said
    assert state.read_bytes() == saved and not out.exists()  # nothing trained, nothing lost
    resumed = train(images, TrainConfig.from_options(arch="small", image_size=16, epochs=1, batch_size=16,
                                                     workers=0, device="cpu", resume=True), out)
    assert resumed.resumed_from_epoch == 0 and out.exists() and not state.exists()


# 2. One method name claimed by two plugins --------------------------------------------------

def _dist(site: Path, name: str, group: str, entries: dict[str, str]) -> None:
    """An installed distribution's metadata: its name and entry points (no code of its own)."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


@pytest.fixture
def two_plugins_one_name(tmp_path: Path):  # noqa: ANN201 - a site holding both, on sys.path for one test
    site = tmp_path / "site"
    _dist(site, "plugin-a", "bctool.methods", {"twin": "bctool.train.methods.independent:Independent"})
    _dist(site, "plugin-b", "bctool.methods", {"twin": "bctool.train.methods.l2:L2",
                                                "bct": "bctool.train.methods.l2:L2"})
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    METHODS.reload_plugins()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        importlib.invalidate_caches()
        METHODS.reload_plugins()


def test_a_name_two_plugins_register_resolves_to_neither(two_plugins_one_name: Path, emoji_dir: Path,
                                                         tmp_path: Path) -> None:
    for resolve in (METHODS.entry, METHODS.get_obj, METHODS.__getitem__):
        with pytest.raises(PluginError, match=r"method 'twin' is registered twice \(plugin plugin-.*; plugin plugin-.*"
                                              r"\); uninstall one of the two packages") as err:
            resolve("twin")
        assert "plugin-a" in str(err.value) and "plugin-b" in str(err.value)  # in the order they were found
    assert "twin" in METHODS and "twin" in METHODS.failures  # listed, with the clash
    with pytest.raises(PluginError, match=r"method 'bct' is registered twice \(bctool: .*; plugin plugin-b .*\); "
                                          r"a plugin may not take the name of a built-in method"):
        METHODS.get_obj("bct")
    assert METHODS.get_obj("l2").__name__ == "L2"  # other names are untouched
    METHODS.reload_plugins()  # as a new process finds them: `bctool list methods` names the clash
    listed = runner.invoke(app, ["list", "methods", "-q"])
    assert listed.exit_code == 0 and "registered twice" in json.loads(listed.stdout)["plugin_errors"]["methods"]["twin"]
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--method", "twin", "--arch", "small", "--image-size", "16", "--epochs", "1",
                                 "--workers", "0", "--device", "cpu", "-q"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 1, said
    assert "plugin-a" in said and "plugin-b" in said and "uninstall one of the two packages" in said
    assert not (tmp_path / "m.safetensors").exists()


# 3. Adapted shard parts ---------------------------------------------------------------------

def test_adapted_shard_parts_are_a_shard_set_that_loads_and_merges(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(20)]
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    source, target = _emb(x, ids, model={"sha256": "s" * 64}), _emb(y, ids, model={"sha256": "t" * 64})
    adapter_file = tmp_path / "a.safetensors"
    save_adapter(fit_adapter(source, target, "procrustes", holdout=0), adapter_file)
    adapter = load_adapter(adapter_file)
    (tmp_path / "parts").mkdir()
    (tmp_path / "mapped").mkdir()
    for index, (start, stop) in enumerate(((0, 12), (12, 20))):
        shard = {"index": index, "count": 2, "start": start, "stop": stop, "total": 20, "list": "f" * 64}
        part = tmp_path / "parts" / f"p{index}.safetensors"
        save_embeddings(_emb(x[start:stop], ids[start:stop], shard, source.model), part)
        transform_file(part, adapter, tmp_path / "mapped" / f"p{index}.safetensors")
        assert load_embeddings(tmp_path / "mapped" / f"p{index}.safetensors").shard == shard
        # as `extract --adapter --shard` leaves them: the model's own rows beside the mapped part
        shutil.copy(part, tmp_path / "mapped" / f"p{index}.unadapted.safetensors")
    joined = load_embeddings(tmp_path / "mapped")
    assert list(joined.ids) == ids
    np.testing.assert_allclose(joined.embeddings, adapter.apply(x), atol=1e-6)
    merged = merge_shards(shard_set_parts(tmp_path / "mapped"), tmp_path / "merged.safetensors")
    assert merged["images"] == 20 and merged["parts"] == 2


# 4. Adapters fitted on fewer pairs than dimensions ------------------------------------------

@pytest.mark.parametrize("kind", ["procrustes", "affine"])
def test_an_adapter_fitted_on_fewer_pairs_than_dimensions_is_warned_about(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(12)]
    source, target = _emb(rng.normal(size=(12, 8)), ids), _emb(rng.normal(size=(12, 8)), ids)
    with caplog.at_level(logging.WARNING, logger="bctool.adapt"):
        fit_adapter(Embeddings(source.embeddings[:3], source.labels[:3], ids[:3], ["a", "b"]), target, kind, holdout=0)
    assert f"the {kind} adapter is fitted on 3 pairs, fewer than the 8 dimensions of SOURCE" in caplog.text
    assert "fit on at least 8 pairs: embed more images with both models" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bctool.adapt"):
        fit_adapter(source, target, kind, holdout=0)  # 12 pairs of 8-d rows: enough
    assert "fewer than" not in caplog.text


# 5. Rows of 3e38 reach no raw numpy warning -------------------------------------------------

def _huge_file(path: Path) -> Path:
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    rows[:2] = 3e38
    save_embeddings(_emb(rows, [f"i{i}" for i in range(6)]), path)
    return path


def test_huge_rows_go_through_adapt_and_transform_without_a_runtime_warning(tmp_path: Path) -> None:
    huge = _huge_file(tmp_path / "huge.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter = fit_adapter(load_embeddings(huge, mmap=True), load_embeddings(huge, mmap=True), "affine", holdout=0)
        transform_file(huge, adapter, tmp_path / "t.safetensors", blend=huge)
    assert np.isfinite(load_embeddings(tmp_path / "t.safetensors").embeddings).all()


def test_huge_rows_are_evaluated_without_a_runtime_warning(tmp_path: Path) -> None:
    huge = _huge_file(tmp_path / "huge.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = runner.invoke(app, ["evaluate", "--query", str(huge), "--gallery", str(huge), "-q"])
    assert result.exit_code == 0, result.stderr


# 6. Format-version messages read as English -------------------------------------------------

def _with_version(path: Path, out: Path, version: str) -> Path:
    """A copy of the safetensors file ``path`` whose ``format_version`` is ``version``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata()
    save_file(load_file(str(path)), str(out), metadata={**meta, "format_version": version})
    return out


def test_a_format_version_that_is_not_a_number_is_named_in_plain_words(tmp_path: Path) -> None:
    save_embeddings(_emb(np.eye(2), ["x", "y"]), tmp_path / "e.safetensors")
    bad = _with_version(tmp_path / "e.safetensors", tmp_path / "bad.safetensors", "2.0")
    with pytest.raises(EmbeddingsError, match="has a bctool embeddings format_version '2.0' that is not a number"):
        load_embeddings(bad)
    ids = ["x", "y", "z", "w"]
    fitted = fit_adapter(_emb(np.eye(4), ids), _emb(np.eye(4), ids), "procrustes", holdout=0)
    save_adapter(fitted, tmp_path / "a.safetensors")
    _with_version(tmp_path / "a.safetensors", tmp_path / "a2.safetensors", "1.0")
    with pytest.raises(ConfigError, match="has a bctool adapter format_version '1.0' that is not a number"):
        load_adapter(tmp_path / "a2.safetensors")


# 7. More parts than images: empty parts complete the set ------------------------------------

def test_more_shards_than_images_gives_empty_parts_that_complete_the_set(emoji_dir: Path, tmp_path: Path) -> None:
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    model = tmp_path / "m.safetensors"
    save_checkpoint(model, create_model(ModelConfig(arch="small", embedding_dim=4, num_classes=2)),
                    Preprocess(image_size=16), ["a", "b"])
    (tmp_path / "images").symlink_to(emoji_dir / "images")
    data = tmp_path / "three.txt"
    data.write_text("\n".join((emoji_dir / "new_train.txt").read_text().splitlines()[:3]) + "\n")
    for index in range(5):  # 3 images in 5 parts: parts 0 and 2 hold none
        result = runner.invoke(app, ["extract", str(data), "-m", str(model), "-o",
                                     str(tmp_path / "parts" / f"p{index}.safetensors"), "--shard", f"{index}/5",
                                     "--workers", "0", "-q"])
        assert result.exit_code == 0, result.stderr
    sizes = [len(load_embeddings(tmp_path / "parts" / f"p{i}.safetensors")) for i in range(5)]
    assert sum(sizes) == 3 and sizes[0] == 0  # the first part is one of the empty ones
    whole = runner.invoke(app, ["extract", str(data), "-m", str(model), "-o", str(tmp_path / "whole.safetensors"),
                                "--workers", "0", "-q"])
    assert whole.exit_code == 0, whole.stderr
    expected = load_embeddings(tmp_path / "whole.safetensors")
    joined = load_embeddings(tmp_path / "parts")
    assert list(joined.ids) == list(expected.ids)
    np.testing.assert_allclose(joined.embeddings, expected.embeddings, atol=1e-6)  # other batches: rounding
    merged = runner.invoke(app, ["merge", *map(str, sorted((tmp_path / "parts").glob("*.safetensors"))),
                                 "--out", str(tmp_path / "merged.safetensors"), "-q"])
    assert merged.exit_code == 0, merged.stderr
    assert json.loads(merged.stdout)["images"] == 3
