"""A torch Dataset over an :class:`~bctool.data.sources.ImageSet`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from bctool.data.images import load_rgb
from bctool.data.sources import ImageSet


class ImageDataset(Dataset):
    """Yields ``(image_tensor, label, index)``; ``index`` is the row in the ImageSet."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        record = self.images.records[index]
        return self.transform(load_rgb(record.path)), record.label, index
