"""Warm start (``--init-from``): exactly which tensors are copied, refusals, and the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bctool.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from bctool.cli import app
from bctool.data import load_image_set
from bctool.data.transforms import Preprocess
from bctool.errors import ConfigError, ModelError
from bctool.models import ModelConfig, create_model
from bctool.train import TrainConfig, train
from bctool.train.warm_start import warm_start
from tests.test_compat_train import _interrupted_run

OLD_NAMES = ["cat", "dog", "owl"]
NEW_NAMES = ["ant", "dog", "cat", "eel"]  # dog and cat are old; ant and eel are new


def _old_checkpoint(path: Path, head: str = "linear", arch: str = "small", dim: int = 16) -> Path:
    torch.manual_seed(1)
    model = create_model(ModelConfig(arch=arch, embedding_dim=dim, num_classes=len(OLD_NAMES), head=head))
    # Non-trivial BatchNorm running statistics: they must travel too.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    save_checkpoint(path, model, Preprocess(image_size=32), OLD_NAMES)
    return path


def _new_model(head: str = "linear", arch: str = "small", dim: int = 16):  # noqa: ANN202
    torch.manual_seed(2)
    return create_model(ModelConfig(arch=arch, embedding_dim=dim, num_classes=len(NEW_NAMES), head=head))


@pytest.mark.parametrize("head", ["linear", "arcface"])
def test_copies_backbone_neck_and_the_head_rows_of_old_classes_by_name(head: str, tmp_path: Path) -> None:
    path = _old_checkpoint(tmp_path / "old.safetensors", head=head)
    old = load_checkpoint(path).model.state_dict()
    model = _new_model(head=head)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    record = warm_start(model, NEW_NAMES, path)
    got = model.state_dict()
    body = [k for k in got if k.startswith(("backbone.", "neck."))]
    assert body and record.tensors == len(body)
    for key in body:  # every backbone and neck tensor, buffers included, is the old one
        assert torch.equal(got[key], old[key]), key
    head_keys = [k for k in got if k.startswith("head.")]
    assert head_keys == (["head.fc.weight", "head.fc.bias"] if head == "linear" else ["head.weight"])
    for key in head_keys:
        # new rows: dog <- old row 1, cat <- old row 0; ant and eel keep their fresh values
        assert torch.equal(got[key][1], old[key][1]) and torch.equal(got[key][2], old[key][0]), key
        assert torch.equal(got[key][0], fresh[key][0]) and torch.equal(got[key][3], fresh[key][3]), key
    assert (record.head_rows, record.head) == (2, "copied by class name")
    assert record.sha256 == file_sha256(path) and record.path == str(path.resolve())


def test_another_head_kind_is_left_fresh_and_recorded(tmp_path: Path) -> None:
    path = _old_checkpoint(tmp_path / "old.safetensors", head="linear")
    model = _new_model(head="cosine")
    fresh = model.head.weight.detach().clone()
    record = warm_start(model, NEW_NAMES, path)
    assert torch.equal(model.head.weight, fresh)
    assert record.head_rows == 0 and "old head is linear, the new one cosine" in record.head


def test_refuses_another_architecture_or_dimension_naming_both(tmp_path: Path) -> None:
    path = _old_checkpoint(tmp_path / "old.safetensors")
    with pytest.raises(ModelError, match=r"is a small with embedding dimension 16, but this run trains a small "
                                         r"with dimension 32; pass --arch small --embedding-dim 16"):
        warm_start(_new_model(dim=32), NEW_NAMES, path)
    with pytest.raises(ModelError, match=r"is a small .* this run trains a resnet18 with dimension 16"):
        warm_start(_new_model(arch="resnet18"), NEW_NAMES, path)
    with pytest.raises(ModelError, match="does not exist"):
        warm_start(_new_model(), NEW_NAMES, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="only one of --init-from .* and --pretrained"):
        TrainConfig.from_options(init_from=str(path), pretrained="weights.safetensors")


def _config(old_model: Path, **kw: object) -> TrainConfig:
    base = TrainConfig.from_options(arch="small", image_size=32, epochs=2, batch_size=16, workers=0, device="cpu",
                       lr=0.01, init_from=str(old_model))
    return base.replace(**kw)


@pytest.fixture(scope="module")
def old_model(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("warm") / "old.safetensors"
    train(load_image_set(emoji_dir / "old_train.txt"),
          TrainConfig.from_options(arch="small", image_size=32, epochs=1, batch_size=16, workers=0, device="cpu"), path)
    return path


def test_training_records_the_warm_start_and_resume_checks_its_file(
    emoji_dir: Path, old_model: Path, tmp_path: Path
) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    out = tmp_path / "new.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(out), "--arch", "small",
                                 "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                                 "--device", "cpu", "--lr", "0.01", "--init-from", str(old_model), "-q"])
    assert result.exit_code == 0, result.stderr
    record = load_checkpoint(out).train_config["init_from"]
    assert record["sha256"] == file_sha256(old_model) and record["path"] == str(old_model.resolve())
    assert record["head_rows"] == len(load_checkpoint(old_model).class_names)
    assert json.loads(result.stdout)["out"] == str(out)

    # A run interrupted after its first epoch resumes only against the same old file.
    copy = tmp_path / "old-copy.safetensors"
    copy.write_bytes(old_model.read_bytes())
    stopped = tmp_path / "stopped.safetensors"
    _interrupted_run(images, _config(copy), stopped, epochs_done=1)
    straight = tmp_path / "straight.safetensors"
    train(images, _config(copy), straight)
    other = load_checkpoint(copy)
    with torch.no_grad():
        other.model.neck[1].running_mean.add_(1.0)
    save_checkpoint(copy, other.model, other.preprocess, other.class_names)
    with pytest.raises(ConfigError, match="options differ .*init_from"):
        train(images, _config(copy, resume=True), stopped)
    copy.write_bytes(old_model.read_bytes())
    train(images, _config(copy, resume=True), stopped)
    a, b = load_checkpoint(straight).model.state_dict(), load_checkpoint(stopped).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_warm_start_keeps_the_preprocessing_its_weights_expect(emoji_dir: Path, tmp_path: Path) -> None:
    """A model imported or trained from named weights normalises as those weights expect; a new
    model warm-started from it must see its images the same way (not bctool's defaults)."""
    from bctool.models import ModelConfig, create_model
    from bctool.train import TrainConfig, train

    own = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=2)), own, ["a", "b"])
    config = TrainConfig.from_options(arch="small", image_size=32, embedding_dim=8, epochs=1, batch_size=8,
                                      workers=0, device="cpu", init_from=str(old))
    train(load_image_set(emoji_dir / "old_train.txt"), config, tmp_path / "new.safetensors")
    assert load_checkpoint(tmp_path / "new.safetensors").preprocess == own
