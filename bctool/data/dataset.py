"""A torch Dataset over an :class:`~bctool.data.sources.ImageSet`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from bctool.data.images import load_rgb
from bctool.data.sources import ImageRecord, ImageSet
from bctool.data.transforms import WHITE


class ImageDataset(Dataset):
    """Yields ``(image_tensor, label, index)``; ``index`` is the row in the ImageSet."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        record = self.images.records[index]
        image = load_record(record, source_side(self.transform), background_of(self.transform))
        return self.transform(image), record.label, index


class StoredViewsDataset(ImageDataset):
    """Yields ``(image_tensor, label, k * N + index)`` for an ImageSet of N images: per sample
    one view drawn uniformly (torch's global RNG) among the clean image (``k = 0``, through
    ``transform``) and the seeded views ``views[k - 1]`` (each a
    :class:`~bctool.data.transforms.StoredViewTransform`). ``k * N + index`` is the row of the
    old embedding of that very view in the old side's table (clean rows first, then each view's)."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor],
                 views: Sequence[Callable[[Image.Image, str], torch.Tensor]]) -> None:
        super().__init__(images, transform)
        self.views = list(views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        k = int(torch.randint(len(self.views) + 1, ()))
        if k == 0:
            return super().__getitem__(index)
        record, view = self.images.records[index], self.views[k - 1]
        image = load_record(record, source_side(view), background_of(view))
        return view(image, self.images.ids[index]), record.label, k * len(self.images) + index


def source_side(transform: object) -> int | None:
    """The shorter side a transform needs of its input image to lose nothing (its
    ``source_side``), None when it does not say."""
    return getattr(transform, "source_side", None)


def background_of(transform: object) -> tuple[int, int, int]:
    """The colour a transform wants under transparent pixels (its ``background``), else white."""
    return getattr(transform, "background", WHITE)


def load_record(record: ImageRecord, min_side: int | None = None,
                background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The record's image as RGB (transparency on ``background``), cut to its crop box when it
    has one (training and extraction read every image through here). With ``min_side``, a large
    JPEG is decoded at a reduced scale that leaves the image, or its crop box, at least that side
    (see ``load_rgb``)."""
    if record.crop is None:
        return load_rgb(record.path, min_side, background=background)
    x1, y1, x2, y2 = record.crop
    image = load_rgb(record.path, min_side, box_side=min(x2 - x1, y2 - y1), background=background)
    scale = image.info.get("draft_scale", 1.0)  # the box is in full-size pixels
    return crop_box(image, (x1 * scale, y1 * scale, x2 * scale, y2 * scale))


def crop_box(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Cut out ``box`` (x1, y1, x2, y2), clipped to the image; an empty box keeps the image."""
    w, h = image.size
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(w, int(round(box[2]))), min(h, int(round(box[3])))
    if x2 <= x1 or y2 <= y1:
        return image
    return image.crop((x1, y1, x2, y2))
