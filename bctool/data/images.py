"""Decoding images to RGB."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bctool.errors import DataError


# Integer modes holding more than 8 bits per pixel (16-bit PNG and TIFF greyscale).
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The smallest size with the image's aspect whose shorter side is ``min_side``: what
    :meth:`PIL.Image.Image.draft` is asked for (it decodes at the smallest 1/1, 1/2, 1/4 or 1/8
    scale that is at least this large)."""
    w, h = size
    scale = min_side / max(1, min(w, h))
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def load_rgb(path: Path, min_side: int | None = None, box_side: float | None = None,
             background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image as 8-bit RGB, turned as its EXIF orientation says; transparent pixels are
    composited on ``background`` (white unless the checkpoint records another), 16-bit greyscale is scaled to 8 bits (not clipped), float greyscale by
    its range (0-1 times 255, 0-255 as is, up to 65535 divided by 257; others refused), CMYK and
    palettes are converted.

    With ``min_side``, a JPEG whose shorter side is at least twice that is decoded at a reduced
    scale (1/2, 1/4 or 1/8, by the decoder itself) that keeps its shorter side at least
    ``min_side``: a fraction of a full decode. With ``box_side`` (the shorter side, in full-size
    pixels, of the crop box that will be cut out), the box keeps ``min_side`` instead.
    ``image.info["draft_scale"]`` then gives the scale (multiply full-size boxes by it).
    """
    try:
        with Image.open(path) as img:
            full = img.size
            need = min_side
            if min_side and box_side:
                need = math.ceil(min_side * min(full) / max(1.0, box_side))
            if need and img.format == "JPEG" and min(full) >= 2 * need:
                img.draft("RGB", draft_size(full, need))
            img.load()
            scale = img.size[0] / full[0]
            # As displayed: an EXIF orientation (a phone's rotated JPEG) is applied, so a rotated
            # file embeds like its upright copy.
            out = _to_rgb(ImageOps.exif_transpose(img), background)
            if scale != 1.0:
                out.info["draft_scale"] = scale
            return out
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


def _to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A decoded image as 8-bit RGB (see :func:`load_rgb`)."""
    if img.mode == "F":  # 32-bit float greyscale (TIFF): 0-1, 0-255 or 0-65535 by its values
        values = np.asarray(img, dtype=np.float64)
        top = float(np.nanmax(values)) if values.size else 0.0
        if not np.isfinite(values).all() or values.min() < 0 or top > 65535:
            raise ValueError(f"float image with values from {np.nanmin(values):g} to {top:g}: its range is unclear; "
                             "save it as 8- or 16-bit, or as floats in 0-1")
        scale = 255.0 if top <= 1.0 else (1.0 if top <= 255.0 else 1 / 257.0)
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return img.convert("RGB")
