"""Decoding images to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bctool.errors import DataError


# Integer modes holding more than 8 bits per pixel (16-bit PNG and TIFF greyscale).
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB; transparent pixels are composited on white, 16-bit
    greyscale is scaled to 8 bits (not clipped), CMYK and palettes are converted."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _WIDE_MODES:
                wide = np.asarray(img).astype(np.float64)
                return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"image {str(path)!r} is too large to decode safely ({exc}); shrink it or drop it from the list"
        ) from exc
    except FileNotFoundError as exc:
        raise DataError(f"image {str(path)!r} does not exist; fix the path in the list file") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"image {str(path)!r} cannot be decoded ({exc}); replace or remove it"
        ) from exc
