"""Backbones (ResNet-18/34/50, SmallCNN) and loading timm/torchvision weights from safetensors."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bctool.errors import ModelError
from bctool.models.pretrained import guess_resnet_arch, load_backbone_weights
from bctool.models.resnet import ResNet, resnet
from bctool.models.small import SmallCNN

ARCH_NAMES = ("resnet18", "resnet34", "resnet50")

# torchvision's ResNet*_Weights.IMAGENET1K_V1 meta "num_params" (with the 1000-class fc).
TORCHVISION_NUM_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
NUM_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Every backbone built once: building resnet50 is the slow part of this file."""
    torch.manual_seed(0)
    built: dict[str, nn.Module] = {name: resnet(name).eval() for name in ARCH_NAMES}
    built["small"] = SmallCNN().eval()
    return built


def torchvision_keys(block_counts: tuple[int, ...], bottleneck: bool) -> list[str]:
    """State-dict keys of torchvision's ResNet without ``fc``, written out the slow, obvious way."""

    def bn(prefix: str) -> list[str]:
        stats = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return [f"{prefix}.{s}" for s in stats]

    keys = ["conv1.weight", *bn("bn1")]
    for i, count in enumerate(block_counts, start=1):
        for j in range(count):
            p = f"layer{i}.{j}"
            for k in range(1, 4 if bottleneck else 3):
                keys += [f"{p}.conv{k}.weight", *bn(f"{p}.bn{k}")]
            if j == 0 and (i > 1 or bottleneck):
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys


def randomize_bn_stats(model: nn.Module, seed: int) -> None:
    """Give BN non-default running stats so eval-mode outputs depend on them."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("name", [*ARCH_NAMES, "small"])
@pytest.mark.parametrize("px", [32, 64])
def test_output_shape(models: dict[str, nn.Module], name: str, px: int) -> None:
    model = models[name]
    with torch.no_grad():
        out = model(torch.randn(2, 3, px, px))
    assert out.shape == (2, model.num_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_num_features_and_param_count_match_torchvision_without_fc(
    models: dict[str, nn.Module], name: str
) -> None:
    model = models[name]
    c = NUM_FEATURES[name]
    fc_params = c * 1000 + 1000
    assert model.num_features == c
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_NUM_PARAMS[name] - fc_params


@pytest.mark.parametrize(
    ("name", "counts", "bottleneck"),
    [
        ("resnet18", (2, 2, 2, 2), False),
        ("resnet34", (3, 4, 6, 3), False),
        ("resnet50", (3, 4, 6, 3), True),
    ],
)
def test_state_dict_keys_are_torchvision_names(
    models: dict[str, nn.Module], name: str, counts: tuple[int, ...], bottleneck: bool
) -> None:
    keys = list(models[name].state_dict())
    assert keys == torchvision_keys(counts, bottleneck)
    assert guess_resnet_arch(keys) == name


def test_unknown_arch_names_the_choices() -> None:
    with pytest.raises(ModelError, match="'resnet101'.*resnet18, resnet34, resnet50"):
        resnet("resnet101")


def test_zero_init_residual_zeroes_last_bn_of_each_block() -> None:
    torch.manual_seed(0)
    model = resnet("resnet18", zero_init_residual=True)
    assert all(not b.bn2.weight.any() for layer in (model.layer1, model.layer4) for b in layer)
    assert model.layer1[0].bn1.weight.eq(1).all()


@pytest.mark.parametrize("build", [lambda: resnet("resnet18"), SmallCNN])
def test_same_seed_gives_identical_weights_and_outputs(build: Callable[[], nn.Module]) -> None:
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(123)
    a = build().eval()
    torch.manual_seed(123)
    b = build().eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    torch.manual_seed(124)
    c = build()
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_round_trip_with_fc_and_module_prefix(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = resnet("resnet18").eval()
    randomize_bn_stats(source, seed=1)
    tensors = {f"module.{k}": v for k, v in source.state_dict().items()}
    tensors["module.fc.weight"] = torch.randn(1000, 512)
    tensors["module.fc.bias"] = torch.randn(1000)
    # Some exports drop the BN step counter; it must not count as missing.
    del tensors["module.bn1.num_batches_tracked"]
    path = tmp_path / "resnet18.safetensors"
    save_file(tensors, str(path))

    torch.manual_seed(2)
    target = resnet("resnet18").eval()
    report = load_backbone_weights(target, path)

    assert report == {
        "loaded": len(tensors) - 2,
        "dropped": ["fc.weight", "fc.bias"],
        "source": "timm/torchvision",
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_nested_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    model = SmallCNN()
    path = tmp_path / "small.safetensors"
    save_file({f"model.backbone.{k}": v for k, v in model.state_dict().items()}, str(path))
    report = load_backbone_weights(SmallCNN(), path)
    assert report["loaded"] == len(model.state_dict())
    assert report["dropped"] == []


def test_wrong_architecture_names_keys_shapes_and_fix(
    models: dict[str, nn.Module], tmp_path: Path
) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(dict(models["resnet18"].state_dict()), str(path))
    pattern = (
        rf"{re.escape(str(path))}.*"
        r"layer1\.0\.conv1\.weight \(expected \(64, 64, 1, 1\), found \(64, 64, 3, 3\)\).*"
        r"and \d+ more.*pass weights of a resnet50, or choose --arch resnet18"
    )
    with pytest.raises(ModelError, match=pattern):
        load_backbone_weights(models["resnet50"], path)


def test_extra_key_is_unexpected(tmp_path: Path) -> None:
    state = dict(SmallCNN().state_dict())
    state["head.weight"] = torch.zeros(4, 256)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    pattern = r"head\.weight \(expected: not in model, found \(4, 256\)\).*--arch small"
    with pytest.raises(ModelError, match=pattern):
        load_backbone_weights(SmallCNN(), path)


def test_not_safetensors_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"  # a .pth state dict loads (weights-only): its keys are then checked
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}.* does not fit the SmallCNN"):
        load_backbone_weights(SmallCNN(), path)
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ModelError, match=rf"{re.escape(str(text))}.* is not a safetensors file"):
        load_backbone_weights(SmallCNN(), text)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}.* does not exist"):
        load_backbone_weights(SmallCNN(), path)


def test_resnet_is_exported_class(models: dict[str, nn.Module]) -> None:
    assert isinstance(models["resnet50"], ResNet)
