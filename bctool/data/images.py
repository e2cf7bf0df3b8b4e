"""Decoding images to RGB."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bctool.errors import DataError


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB; transparent pixels are composited on white."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image {str(path)!r} does not exist; fix the path in the list file") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"image {str(path)!r} cannot be decoded ({exc}); replace or remove it"
        ) from exc
