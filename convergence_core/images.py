"""Image files: open as RGB, validate, and write gallery thumbnails.

Every function takes a file path; nothing here knows about datasets or models.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .cache import atomic_path

__all__ = ["ImageFileError", "image_problem", "make_thumbnail", "open_rgb"]


class ImageFileError(ValueError):
    """An image file is missing, unreadable or not a decodable image."""


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file fully decoded and converted to RGB (palette/grey/alpha/CMYK -> RGB).

    Returns a PIL image of size (width, height) in pixels, mode ``"RGB"``, detached from the file.

    Raises:
        ImageFileError: the file is missing or is not a decodable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageFileError(
            f"image file {path} does not exist; check the dataset root and the image column"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(
            f"image file {path} cannot be decoded ({type(exc).__name__}: {exc}); replace the file "
            "or drop it (check_dataset(..., drop_bad=True))"
        ) from None


def image_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a usable image ("missing", "not a file", "corrupt: ..."), or None if it is.

    Checks both PIL's structural ``verify()`` and a full decode (``verify`` alone misses
    truncated pixel data).
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises many unrelated types for broken files
        return f"corrupt: {type(exc).__name__}: {exc}"
    return None


def make_thumbnail(
    path: str | os.PathLike[str], out_path: str | os.PathLike[str], max_side: int = 256
) -> Path:
    """Write a JPEG thumbnail of ``path`` whose longer side is at most ``max_side`` pixels.

    The aspect ratio is kept and small images are not enlarged. The file is written to a
    temporary name and renamed, so ``out_path`` is never half-written. Returns ``out_path``.
    """
    if int(max_side) < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side!r}")
    image = open_rgb(path)
    image.thumbnail((int(max_side), int(max_side)), Image.Resampling.LANCZOS)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        image.save(tmp, format="JPEG", quality=85, optimize=True)
    return out_path
