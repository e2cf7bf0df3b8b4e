"""A torch Dataset over an :class:`~bctool.data.sources.ImageSet`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from bctool.data.images import load_rgb
from bctool.data.sources import ImageRecord, ImageSet


class ImageDataset(Dataset):
    """Yields ``(image_tensor, label, index)``; ``index`` is the row in the ImageSet."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        record = self.images.records[index]
        return self.transform(load_record(record)), record.label, index


def load_record(record: ImageRecord) -> Image.Image:
    """The record's image as RGB, cut to its crop box when it has one (training and extraction
    read every image through here)."""
    image = load_rgb(record.path)
    return crop_box(image, record.crop) if record.crop is not None else image


def crop_box(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Cut out ``box`` (x1, y1, x2, y2), clipped to the image; an empty box keeps the image."""
    w, h = image.size
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(w, int(round(box[2]))), min(h, int(round(box[3])))
    if x2 <= x1 or y2 <= y1:
        return image
    return image.crop((x1, y1, x2, y2))
