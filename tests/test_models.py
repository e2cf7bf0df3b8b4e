"""The embedding model contract (embed / classify) and the classification heads."""

from __future__ import annotations

import math

import pytest
import torch

from bctool.errors import ModelError
from bctool.models import ModelConfig, create_model
from bctool.models.heads import ArcFaceHead, CosFaceHead, CosineHead, LinearHead


@pytest.mark.parametrize("head", ["linear", "cosine", "arcface", "cosface"])
def test_embed_and_classify_shapes(head: str) -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=24, num_classes=7, head=head))
    images = torch.randn(5, 3, 32, 32)
    f = model.embed(images)
    assert f.shape == (5, 24)
    logits = model.classify(f, torch.arange(5))
    assert logits.shape == (5, 7)
    assert torch.equal(model(images), f)


def test_same_seed_same_model() -> None:
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = create_model(ModelConfig(arch="small", embedding_dim=16, num_classes=3)).eval()
        outputs.append(model.embed(torch.ones(2, 3, 32, 32)))
    assert torch.equal(outputs[0], outputs[1])


def test_model_without_head_refuses_to_classify() -> None:
    model = create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=0))
    assert model.head is None
    with pytest.raises(ModelError, match="no classification head"):
        model.classify(torch.zeros(2, 8))


def test_bad_config_names_the_choices() -> None:
    with pytest.raises(ModelError, match=r"unknown architecture 'resnet9'; choose one of"):
        ModelConfig(arch="resnet9")
    with pytest.raises(ModelError, match=r"unknown head 'softmax'; choose one of"):
        ModelConfig(head="softmax")


def _cosines(head: CosineHead, f: torch.Tensor) -> torch.Tensor:
    w = head.weight
    return torch.stack([
        torch.stack([torch.dot(fi, wj) / (fi.norm() * wj.norm()) for wj in w]) for fi in f
    ])


def test_margin_heads_against_per_sample_reference() -> None:
    torch.manual_seed(0)
    f, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    s, m = 30.0, 0.3
    for cls in (CosineHead, ArcFaceHead, CosFaceHead):
        head = cls(5, 4, scale=s, margin=m)
        cos = _cosines(head, f)
        expected = cos.clone()
        for i, y in enumerate(labels.tolist()):
            c = cos[i, y].item()
            if cls is ArcFaceHead:
                theta = math.acos(c)
                expected[i, y] = math.cos(theta + m) if theta + m < math.pi else c - math.sin(math.pi - m) * m
            elif cls is CosFaceHead:
                expected[i, y] = c - m
        torch.testing.assert_close(head(f, labels), s * expected, rtol=1e-4, atol=1e-4)
        # Without labels (evaluation) no margin is applied.
        torch.testing.assert_close(head(f), s * cos, rtol=1e-4, atol=1e-4)


def test_arcface_gradient_is_finite_at_the_extremes() -> None:
    head = ArcFaceHead(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
    f = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0]], requires_grad=True)
    head(f, torch.tensor([0, 0])).sum().backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(head.weight.grad).all()


def test_linear_head_is_plain_linear() -> None:
    head = LinearHead(4, 3)
    f = torch.randn(2, 4)
    torch.testing.assert_close(head(f, torch.tensor([0, 1])), f @ head.fc.weight.T + head.fc.bias)
