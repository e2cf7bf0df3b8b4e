"""An old system made outside bctool, as a user would have it: a plain-torch ResNet-18 (timm's
key layout) with a projection head (Linear + BatchNorm1d), its own preprocessing, its weights
saved as a state dict, the same network exported to ONNX and TorchScript by torch itself, and
the gallery embeddings it wrote, stored as ``.npy`` with the ids beside them.

Nothing here imports bctool: it is the reference bctool's import, extractors and ``verify`` are
checked against (``tests/test_import_foreign.py``), and the starting point of the guide
"Upgrading a model you did not train with bctool".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Block(nn.Module):
    """timm's BasicBlock: two 3x3 convolutions and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + short)


class ForeignNet(nn.Module):
    """ResNet-18 (7x7 stem, max pool, four stages), global average pooling, then the user's
    projection ``fc`` (512 -> dim, with a bias) and ``fc_norm`` (BatchNorm1d)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths, 1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(Block(cin, width, stride), Block(width, width, 1)))
            cin = width
        self.fc = nn.Linear(512, dim)
        self.fc_norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc_norm(self.fc(x.mean(dim=(2, 3))))


def make_net(images: torch.Tensor, dim: int = 64, seed: int = 0) -> ForeignNet:
    """A network with random weights whose BatchNorm statistics are those of ``images`` (one
    pass in training mode, as training leaves them), with affine parameters away from their
    defaults, in eval mode: every tensor reaches the embedding, and the embedding depends on the
    image (a random network with default statistics maps every image to nearly one vector)."""
    torch.manual_seed(seed)
    net = ForeignNet(dim)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.momentum = None  # a cumulative average: the statistics of the images given
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        net.train()(images)
    return net.eval()


@dataclass(frozen=True)
class Preprocessing:
    """The user's own pipeline: the shorter side resized to ``size / crop`` (rounded down), the
    centred ``size`` square cut out, RGB scaled to [0, 1] and normalised; transparent pixels
    on white. torchvision's Resize + CenterCrop, and timm's evaluation transform, do this."""

    size: int = 32
    crop: float = 0.875
    resample: Image.Resampling = Image.Resampling.BICUBIC
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            img = img.convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img).convert("RGB")
        # torchvision's Resize(int(size / crop)) on a PIL image: the longer side truncated.
        scaled = int(self.size / self.crop)
        w, h = img.size
        new = (scaled, int(scaled * h / w)) if w <= h else (int(scaled * w / h), scaled)
        img = img.resize(new, self.resample)
        # torchvision's CenterCrop: offsets rounded.
        left, top = int(round((new[0] - self.size) / 2.0)), int(round((new[1] - self.size) / 2.0))
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


def inputs(paths: list[Path], pre: Preprocessing) -> torch.Tensor:
    """The network's input for ``paths``: the user's preprocessing of each image."""
    return torch.stack([pre(p) for p in paths])


def embed(net: nn.Module, paths: list[Path], pre: Preprocessing) -> np.ndarray:
    """The user's embeddings of ``paths``: their preprocessing, their network."""
    with torch.no_grad():
        return net(inputs(paths, pre)).numpy()


def save_state_dict(net: ForeignNet, path: Path) -> None:
    """The weights as ``torch.save(model.state_dict())`` writes them."""
    torch.save(net.state_dict(), path)


def export_onnx(net: ForeignNet, path: Path, size: int) -> None:
    """The network exported by torch's ONNX exporter, with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(net, (torch.zeros(2, 3, size, size),), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes={"x": {0: batch}}, verbose=False, external_data=False)


def export_torchscript(net: ForeignNet, path: Path, size: int) -> None:
    """The network traced and saved by TorchScript."""
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(net, torch.zeros(2, 3, size, size)), str(path))


def write_stored(embeddings: np.ndarray, ids: list[str], path: Path, labels: list[str] | None = None) -> None:
    """The gallery as many vector stores export it: an ``.npy`` of rows, ``STEM.ids.txt`` and,
    when known, ``STEM.labels.txt`` (one class name a line)."""
    np.save(path, embeddings.astype(np.float32))
    path.with_suffix(".ids.txt").write_text("".join(f"{i}\n" for i in ids))
    if labels is not None:
        path.with_suffix(".labels.txt").write_text("".join(f"{name}\n" for name in labels))
