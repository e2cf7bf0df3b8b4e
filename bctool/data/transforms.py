"""Preprocessing in plain torch and PIL: resize, random resized crop, colour jitter, normalise.

Training views (:data:`TRAINING_VIEWS`, the ``--augment`` choices): ``none`` (the clean image,
exactly what extraction sees), ``flip`` (the clean image mirrored left-right half the time) and
``crop`` (a random resized crop with colour jitter).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bctool.errors import DataError
from bctool.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-channel normalisations by the name a user may give instead of three numbers
# (``bctool import --mean/--std``): the ImageNet statistics of torchvision and timm, OpenAI
# CLIP's, and the Inception/TensorFlow-Lite one that maps [0, 1] to [-1, 1].
NORMALISATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def parse_channels(text: str, which: str) -> tuple[float, float, float]:
    """Three per-channel values from ``"R,G,B"`` or a name of :data:`NORMALISATIONS` (``which``
    is ``mean`` or ``std``: the statistic the name gives)."""
    if text.strip().lower() in NORMALISATIONS:
        return NORMALISATIONS[text.strip().lower()][0 if which == "mean" else 1]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{which} {text!r} is not three numbers R,G,B (e.g. 0.5,0.5,0.5) nor one of "
                         f"{sorted(NORMALISATIONS)}")
    return values  # type: ignore[return-value]


def parse_background(text: str) -> tuple[int, int, int]:
    """An RGB colour from ``"R,G,B"`` (0-255) or ``white``/``black``."""
    if text.strip().lower() in BACKGROUNDS:
        return BACKGROUNDS[text.strip().lower()]
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"background {text!r} is not three integers R,G,B in 0-255 (e.g. 255,255,255) nor one "
                         f"of {sorted(BACKGROUNDS)}")
    return values  # type: ignore[return-value]


# Resampling filters by the name a checkpoint records (PIL's, and torch's for a resize of tensors).
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# The same filters for a resize of tensors (torch has no lanczos: bicubic is the nearest).
TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "lanczos": "bicubic"}
# How an image becomes a square of ``image_size``: the one rule bctool implements, recorded by
# name so that a file says it and a serving stack can rebuild it.
# shorter-side: the centred square (crop_fraction of the shorter side) resized to image_size in
# one resampling (the aspect ratio kept); squash: the whole image (or its centred crop_fraction
# of each side) resized to image_size x image_size (the aspect ratio not kept); torchvision: two
# steps, as torchvision's Resize + CenterCrop and timm's evaluation transform do them: the
# shorter side resized to floor(image_size / crop_fraction) (the longer side in proportion,
# truncated), then the centred image_size square cut out (its offsets rounded).
RESIZE_RULES = ("shorter-side", "squash", "torchvision")
CROP_RULES = ("center",)  # then the centred square is cut out
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images, every step of it: stored in every checkpoint, applied at
    extract time, read by the old side and by export. An image is decoded to 8-bit RGB (turned
    as its EXIF says; transparent pixels composited on ``background``), its shorter side resized
    to ``image_size`` with ``interpolation`` and the centred square cut out (in one resampling of
    that square), scaled to [0, 1] and normalised per channel with ``mean`` and ``std``. With
    ``crop_fraction`` below 1 the centred square is that share of the shorter side (TensorFlow's
    and timm's evaluation crop: 224/256 = 0.875), resized to ``image_size`` in the same one
    resampling. With ``resize="squash"`` the whole image (or its centred ``crop_fraction`` of
    each side) is resized to the square, its aspect ratio not kept; with ``"torchvision"`` the
    image is resized, then cropped, in two steps (:data:`RESIZE_RULES`)."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize: str = "shorter-side"
    crop: str = "center"
    background: tuple[int, int, int] = WHITE  # RGB under transparent pixels
    crop_fraction: float = 1.0  # the centred square's side over the shorter side (1: all of it)

    def __post_init__(self) -> None:
        if not self.image_size >= 1:
            raise ValueError(f"image_size {self.image_size!r} must be at least 1")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"mean {self.mean!r} and std {self.std!r} must be 3 values each, std positive")
        for field_name, value, allowed in (("interpolation", self.interpolation, tuple(INTERPOLATIONS)),
                                           ("resize", self.resize, RESIZE_RULES), ("crop", self.crop, CROP_RULES)):
            if value not in allowed:
                raise ValueError(f"preprocess {field_name} {value!r} is not one bctool implements; choose one of {list(allowed)}")
        if len(self.background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.background):
            raise ValueError(f"background {self.background!r} must be 3 integers in 0-255 (RGB)")
        if not (isinstance(self.crop_fraction, (int, float)) and 0 < self.crop_fraction <= 1):
            raise ValueError(f"crop_fraction {self.crop_fraction!r} must be above 0 and at most 1 (1: the whole "
                             "shorter side; 0.875: the centred 224/256)")

    @property
    def resample(self) -> Image.Resampling:
        """The PIL filter of :attr:`interpolation`."""
        return INTERPOLATIONS[self.interpolation]

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Rebuild from the JSON stored in a checkpoint; a checkpoint written before the steps
        were recorded gets the steps bctool applied then (bilinear, shorter side, centre, white,
        the whole shorter side)."""
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
            resize=str(d.get("resize", RESIZE_RULES[0])),
            crop=str(d.get("crop", CROP_RULES[0])),
            background=tuple(int(x) for x in d.get("background", WHITE)),  # type: ignore[arg-type]
            crop_fraction=float(d.get("crop_fraction", 1.0)),
        )

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centred box an image of ``width`` x ``height`` is cut to before the resize: a
        square (``shorter-side``), or the image's own shape (``squash``)."""
        if self.resize == "squash":
            w, h = width * self.crop_fraction, height * self.crop_fraction
        else:
            w = h = min(width, height) * self.crop_fraction
        return ((width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2)


def _to_tensor(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0  # H, W, 3
    arr = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class EvalTransform:
    """Cut the centred square (``crop_fraction`` of the shorter side) and resize it to
    ``image_size`` (as ``pre`` says)."""

    def __init__(self, pre: Preprocess) -> None:
        self.pre = pre

    @property
    def background(self) -> tuple[int, int, int]:
        """The colour the decoder puts under transparent pixels."""
        return self.pre.background

    @property
    def source_side(self) -> int:
        """The input's shorter side that this transform resizes down to: ``image_size`` (more
        with a crop, so that the cut square still holds ``image_size`` pixels)."""
        return math.ceil(self.pre.image_size / self.pre.crop_fraction)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        size = self.pre.image_size
        if self.pre.resize == "torchvision":
            return _to_tensor(_resize_then_crop(img, self.pre), self.pre)
        img = img.resize((size, size), self.pre.resample, box=self.pre.crop_box(*img.size))
        return _to_tensor(img, self.pre)


def _resize_then_crop(img: Image.Image, pre: Preprocess) -> Image.Image:
    """torchvision's ``Resize(floor(size / crop_fraction))`` then ``CenterCrop(size)``, step by
    step as torchvision computes them on a PIL image."""
    size = pre.image_size
    scaled = math.floor(size / pre.crop_fraction)
    w, h = img.size
    new = (scaled, int(scaled * h / w)) if w <= h else (int(scaled * w / h), scaled)
    img = img.resize(new, pre.resample)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class FlipTransform(EvalTransform):
    """The clean image, mirrored left-right with probability 1/2 (torch's global RNG, or
    ``generator`` for a seeded view)."""

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        x = super().__call__(img)
        return x.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else x


class TrainTransform:
    """Random resized crop plus mild colour jitter; randomness from torch's global RNG.

    No horizontal flip: in many retrieval sets (arrows, text, emoji) a mirror image is another
    class. DataLoader workers seed torch per worker, so runs are reproducible for a given seed.
    """

    def __init__(
        self,
        pre: Preprocess,
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.2,
    ) -> None:
        self.pre, self.scale, self.ratio, self.jitter = pre, scale, ratio, jitter

    @property
    def background(self) -> tuple[int, int, int]:
        """The colour the decoder puts under transparent pixels."""
        return self.pre.background

    @property
    def source_side(self) -> int:
        """The input's shorter side that keeps the smallest crop at least ``image_size``: a
        crop covers a ``scale[0]`` share of the area at worst, at the extreme aspect ratio."""
        smallest = math.sqrt(self.scale[0] * min(self.ratio[0], 1 / self.ratio[1]))
        return math.ceil(self.pre.image_size / smallest)

    def _crop_box(self, w: int, h: int, generator: torch.Generator | None) -> tuple[float, float, float, float]:
        area = w * h
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
            cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if cw <= w and ch <= h:
                x0, y0 = u[2] * (w - cw), u[3] * (h - ch)
                return (x0, y0, x0 + cw, y0 + ch)
        side = min(w, h)
        return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """The view of ``img``; its draws come from ``generator`` when given (a seeded view)."""
        size = self.pre.image_size
        img = img.resize((size, size), self.pre.resample, box=self._crop_box(*img.size, generator))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.jitter > 0:
            b, c, s = (1 + self.jitter * (2 * torch.rand(3, generator=generator) - 1)).tolist()
            x = x * b
            mean = x.mean()
            x = (x - mean) * c + mean
            gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
            x = ((x - gray) * s + gray).clamp_(0, 1)
        mean_t = torch.tensor(self.pre.mean).view(3, 1, 1)
        std_t = torch.tensor(self.pre.std).view(3, 1, 1)
        return ((x - mean_t) / std_t).contiguous()


def _admit_view(name: str, make: object) -> None:
    if not callable(make):
        raise DataError(f"training view {name!r} must be callable as make(preprocess) -> transform, got {make!r}")


# The training views by ``--augment`` name: ``make(preprocess)`` returns a transform from an RGB
# image to a normalised (3, H, W) tensor; ``clean`` declares it the very tensor extraction computes,
# ``seeded`` that it also takes ``generator=`` for its draws (so `extract --view` can store it).
# The entry-point group bctool.views adds others.
TRAINING_VIEWS: Registry[Callable[[Preprocess], Callable]] = Registry(
    "training view", "views", error=DataError, admit=_admit_view,
    derive=lambda name, make: {"clean": False, "seeded": False})
TRAINING_VIEWS.register("none", EvalTransform, description="The clean image, as extraction sees it.", clean=True)
TRAINING_VIEWS.register("flip", FlipTransform, description="The clean image, mirrored left-right half the time.",
                        seeded=True)
TRAINING_VIEWS.register("crop", TrainTransform, description="Random resized crops (scale 0.35-1) and colour jitter.",
                        seeded=True)


def _view_generator(seed: int, index: int, image_id: str) -> torch.Generator:
    """The generator of view ``index`` of image ``image_id`` under ``seed``: the same draws on
    every machine and in every process (a stable hash, not Python's salted one)."""
    digest = hashlib.blake2b(f"{seed}/{index}/{image_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass(frozen=True)
class StoredView:
    """One seeded augmented view of every image: view ``index`` of the training view ``augment``
    under ``seed``. ``bctool extract --view`` embeds it with the old model; training against that
    file shows the new model the very same view of each image (see :class:`StoredViewTransform`)."""

    augment: str
    index: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.augment not in TRAINING_VIEWS:
            TRAINING_VIEWS.raise_if_failed(self.augment)
            raise DataError(f"view {self.augment!r} is unknown; choose one of {list(TRAINING_VIEWS)}")
        if not TRAINING_VIEWS.entry(self.augment).declares["seeded"]:
            seeded = [n for n in TRAINING_VIEWS if TRAINING_VIEWS.entry(n).declares["seeded"]]
            raise DataError(f"view {self.augment!r} cannot be stored (it takes no seed); choose one of {seeded}")
        if self.index < 0 or self.seed < 0:
            raise DataError(f"view index {self.index} and seed {self.seed} must be 0 or more")

    def to_dict(self) -> dict[str, object]:
        """What an embeddings file records of the view its rows are of."""
        return {"augment": self.augment, "index": self.index, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> StoredView:
        """The view an embeddings file records."""
        return cls(str(d["augment"]), int(d["index"]), int(d["seed"]))

    def transform(self, pre: Preprocess) -> StoredViewTransform:
        """The transform giving this view of an image, given the image and its id."""
        return StoredViewTransform(self, TRAINING_VIEWS[self.augment](pre))


class StoredViewTransform:
    """``(image, image_id) -> tensor``: a :class:`StoredView` of one image, the same every call."""

    def __init__(self, view: StoredView, base: Callable) -> None:
        self.view, self.base = view, base

    @property
    def background(self) -> tuple[int, int, int]:
        """The colour the decoder puts under transparent pixels."""
        return self.base.background

    @property
    def source_side(self) -> int | None:
        """The input's shorter side the view needs (its training view's)."""
        return getattr(self.base, "source_side", None)

    def __call__(self, img: Image.Image, image_id: str) -> torch.Tensor:
        return self.base(img, generator=_view_generator(self.view.seed, self.view.index, image_id))
