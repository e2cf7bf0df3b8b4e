"""The backbone registry: register_backbone, and a user's own module as --arch package.module:factory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint
from bctool.cli import app
from bctool.errors import ModelError
from bctool.models import BACKBONES, ModelConfig, create_model, register_backbone
from helpers import tiny_train

runner = CliRunner()
TINY = tiny_train(epochs=1, arch=None)
# A user's backbone, written as a module file: pooled features and their width, num_features.
USER_MODULE = '''
from torch import nn


class TinyNet(nn.Module):
    num_features = 12

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images):
        return self.body(images)


def build():
    return TinyNet()


def no_width():
    return nn.Conv2d(3, 4, 3)
'''


class Pooled(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).mean(dim=(2, 3))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module ``user_nets_<id>`` defining the backbones above."""
    name = f"user_nets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield name
    sys.modules.pop(name, None)


def test_a_registered_backbone_builds_by_name() -> None:
    register_backbone("test-pooled", Pooled)
    try:
        model = create_model(ModelConfig(arch="test-pooled", embedding_dim=5, num_classes=3))
        assert model.embed(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    finally:
        del BACKBONES["test-pooled"]
    with pytest.raises(ModelError, match="without ':'"):
        register_backbone("a:b", Pooled)


def test_user_module_trains_extracts_and_is_recorded(emoji_dir: Path, user_module: str, tmp_path: Path) -> None:
    arch = f"{user_module}:build"
    model = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["train", str(emoji_dir / "old_train.txt"), "--out", str(model), "--arch", arch,
                                 "--embedding-dim", "8", *TINY])
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(model).config.arch == arch
    emb = tmp_path / "e.safetensors"
    result = runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(model), "-o", str(emb),
                                 "--workers", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    from bctool.embeddings import load_embeddings

    assert load_embeddings(emb).dim == 8

    # Without the module the checkpoint cannot be rebuilt: a clear error naming it.
    sys.modules.pop(user_module, None)
    sys.path.remove(str(tmp_path / "pkg"))
    result = runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(model), "-o",
                                 str(tmp_path / "e2.safetensors"), "--workers", "0", "-q"])
    assert result.exit_code == 1
    assert f"cannot import '{user_module}'" in result.stderr and "PYTHONPATH" in result.stderr
    assert not (tmp_path / "e2.safetensors").exists()


def test_user_backbone_must_declare_its_width(user_module: str) -> None:
    with pytest.raises(ModelError, match="int attribute num_features"):
        create_model(ModelConfig(arch=f"{user_module}:no_width", embedding_dim=4))
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        ModelConfig(arch=f"{user_module}:missing")
    with pytest.raises(ModelError, match=r"unknown architecture 'resnet9'.*package\.module:factory"):
        ModelConfig(arch="resnet9")
