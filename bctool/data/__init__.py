"""Images in: list files, ImageFolder trees, the embedded emoji dataset, and transforms."""

from bctool.data.images import load_rgb
from bctool.data.sources import ImageRecord, ImageSet, load_image_set
from bctool.data.transforms import Preprocess

__all__ = ["ImageRecord", "ImageSet", "Preprocess", "load_image_set", "load_rgb"]
