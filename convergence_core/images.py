"""Image files: open as RGB, validate, and write gallery thumbnails.

Every function takes a file path; nothing here knows about datasets or models. Two guards apply
to every image read here:

* **Containment** (``root=``): the path must stay inside ``root`` once symbolic links are
  resolved, so a link in a dataset folder can never make us read a file elsewhere.
* **Size** (``settings.max_image_pixels()``): an image whose header claims more pixels than the
  limit is refused *before* decoding (a "decompression bomb": a PNG of a few KB can claim
  12,000 × 12,000 pixels and take gigabytes once decoded). Pillow's own bomb check (a warning
  above ``Image.MAX_IMAGE_PIXELS``, an error above twice that) is superseded by this one: while
  we read an image, Pillow's limit is raised to ours (when ours is higher) and its warning is
  silenced, since we refuse or accept by our own limit.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .cache import atomic_file
from .settings import max_image_pixels

__all__ = [
    "TOO_LARGE",
    "TOO_LARGE_FIX",
    "ImageFileError",
    "ImageTooLargeError",
    "image_problem",
    "make_thumbnail",
    "open_rgb",
    "open_rgb_reduced",
    "resolve_inside",
    "to_rgb",
]

#: ``warnings.catch_warnings`` swaps the process-wide filter list: two threads doing it at once
#: can leave a filter behind, so header reads that silence Pillow's warning take turns; the lock
#: also guards Pillow's process-wide limit and the count of reads that raised it.
_HEADER_LOCK = threading.Lock()
#: reads in progress (``_pillow_limit``) and Pillow's own ``MAX_IMAGE_PIXELS`` from before them
_PILLOW = {"reads": 0, "own": Image.MAX_IMAGE_PIXELS}


#: How :func:`image_problem`'s reason for an image over the pixel limit begins.
TOO_LARGE = "too large"
#: What to do about an image over the pixel limit (``settings.max_image_pixels()``, read from
#: ``$CONVERGENCE_MAX_IMAGE_PIXELS``): every message about such an image says it.
TOO_LARGE_FIX = (
    "The pixel limit is set by $CONVERGENCE_MAX_IMAGE_PIXELS: raise it above the image's pixel "
    "count if the image is trusted (e.g. CONVERGENCE_MAX_IMAGE_PIXELS=200000000), or resize the "
    "image"
)


class ImageFileError(ValueError):
    """An image file is missing, unreadable, outside its root or not a decodable image."""


class ImageTooLargeError(ImageFileError):
    """An image claims more pixels than ``settings.max_image_pixels()``; it was not decoded.

    ``size``: (width, height) from the header, or None where Pillow refused even the header.
    """

    def __init__(self, message: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.size = size


def resolve_inside(root: str | os.PathLike[str] | None, path: str | os.PathLike[str]) -> Path:
    """``path`` with symbolic links resolved, if it stays inside ``root`` (resolved too).

    With ``root=None`` the path is only resolved. A path that is not there is resolved as far as
    it exists (opening it then reports it missing).

    Raises:
        ImageFileError: the resolved path lies outside the resolved ``root``.
    """
    resolved = Path(os.path.realpath(path))
    if root is None:
        return resolved
    real_root = Path(os.path.realpath(root))
    if not resolved.is_relative_to(real_root):
        raise ImageFileError(
            f"image file {path} leads outside the dataset root {root} (a symbolic link to "
            f"{resolved}); copy the image into the root instead of linking to it, or load the "
            "dataset with a root that contains its target"
        )
    return resolved


def _too_large_message(path: Path, width: int, height: int, limit: int) -> str:
    return (
        f"image file {path} is {width:,} × {height:,} = {width * height:,} pixels, more than the "
        f"limit of {limit:,}; it was not decoded. {TOO_LARGE_FIX}, "
        "or drop it (check_dataset(..., drop_bad=True) / precompute --drop-bad)"
    )


@contextlib.contextmanager
def _pillow_limit(limit: int) -> Iterator[None]:
    """Pillow's ``Image.MAX_IMAGE_PIXELS`` at least ``limit`` while an image is opened and
    decoded here (Pillow refuses above twice its own value, whatever our limit says; this module
    checks ``limit`` itself); Pillow's value comes back when the last read in progress ends."""
    with _HEADER_LOCK:
        if _PILLOW["reads"] == 0:
            _PILLOW["own"] = Image.MAX_IMAGE_PIXELS
        _PILLOW["reads"] += 1
        if Image.MAX_IMAGE_PIXELS is not None:  # None: the user turned Pillow's check off
            Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, limit)
    try:
        yield
    finally:
        with _HEADER_LOCK:
            _PILLOW["reads"] -= 1
            if _PILLOW["reads"] == 0:
                Image.MAX_IMAGE_PIXELS = _PILLOW["own"]


@contextlib.contextmanager
def _open_checked(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None
) -> Iterator[Image.Image]:
    """The image at ``path`` opened lazily (header only), after the containment and size checks.

    Raises:
        FileNotFoundError: no file. ImageFileError / ImageTooLargeError: outside ``root``, or
        more pixels than the limit. Pillow's own errors for files that are not images.
    """
    limit = max_image_pixels()
    resolved = resolve_inside(root, path)
    with _pillow_limit(limit):
        with _HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(resolved)
            except Image.DecompressionBombError:
                # above twice Pillow's limit (at least twice ours): Pillow refuses the header too
                raise ImageTooLargeError(
                    f"image file {path} claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} "
                    f"pixels (the limit is {limit:,}); it was not decoded. "
                    f"{TOO_LARGE_FIX}, or drop it "
                    "(check_dataset(..., drop_bad=True) / precompute --drop-bad)"
                ) from None
        with image:
            width, height = image.size
            if width * height > limit:
                raise ImageTooLargeError(
                    _too_large_message(Path(path), width, height, limit), (width, height)
                )
            yield image


#: Pillow's grey modes of more than 8 bits (16-bit integer, 32-bit integer, 32-bit float)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB (the image itself when it already is).

    Pillow's own ``convert("RGB")`` clips the high-bit-depth grey modes at 255: a 16-bit PNG (mode
    ``I;16``, common for scientific and neuroscience stimuli) would come out almost all white.
    Those are scaled to 0..255 by a fixed rule per mode, never by the pixel values themselves (so
    two images one pixel apart decode alike): ``I;16*`` by 255/65535; 32-bit integer ``I`` as
    16-bit values (by 255/65535; Pillow's own reading of 16-bit PGM/PPM), or as 8-bit values
    where the file's BitsPerSample says 8; 32-bit floats in [0, 1] by 255, float values already
    in 0..255 are kept. Values outside the mode's range are ambiguous and raise.

    Raises:
        ImageFileError: an ``I`` image with values outside 0..65535 (0..255 for 8-bit files), or
        an ``F`` image outside the ranges above.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        low = float(values.min()) if values.size else 0.0
        high = float(values.max()) if values.size else 0.0
        bits = getattr(image, "tag_v2", {}).get(258) if image.mode == "I" else None
        top = 255.0 if bits and max(bits) <= 8 else 65535.0
        if image.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif image.mode == "I" and low >= 0.0 and high <= top:
            scale = 255.0 / top
        elif image.mode == "F" and low >= 0.0 and high <= 1.0:
            scale = 255.0
        elif image.mode == "F" and low >= 0.0 and high <= 255.0:
            scale = 1.0
        else:
            expected = f"0..{top:g}" if image.mode == "I" else "0..1 or 0..255"
            raise ImageFileError(
                f"a {image.mode!r} image with values from {low:g} to {high:g} has no agreed 8-bit "
                f"grey scale (read as {expected}); save it as 8-bit (or 16-bit) PNG/JPEG with the "
                "contrast you want, e.g. Image.fromarray(np.clip(a, 0, 65535).astype(np.uint16))"
            )
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def open_rgb(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> Image.Image:
    """Open an image file fully decoded and converted to RGB (palette/grey/alpha/CMYK -> RGB).

    ``root``: the folder the file must stay inside once symbolic links are resolved.

    Returns a PIL image of size (width, height) in pixels, mode ``"RGB"``, detached from the file.

    Raises:
        ImageFileError: the file is missing, outside ``root``, or is not a decodable image.
        ImageTooLargeError (an ImageFileError): more pixels than ``settings.max_image_pixels()``.
    """
    return _decode(path, root, None)[1]


def open_rgb_reduced(
    path: str | os.PathLike[str], side: int, *, root: str | os.PathLike[str] | None = None
) -> tuple[tuple[int, int], Image.Image]:
    """The file's own (width, height) and its RGB image decoded at a reduced scale where the
    format allows it (JPEG draft mode: a power-of-two reduction that keeps the longer side at
    least ``side`` pixels; other formats in full). Guards and errors as :func:`open_rgb`."""
    return _decode(path, root, int(side))


def _decode(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None, draft_side: int | None
) -> tuple[tuple[int, int], Image.Image]:
    path = Path(path)
    try:
        with _open_checked(path, root) as image:
            size = image.size
            if draft_side is not None:
                image.draft("RGB", (draft_side, draft_side))
            image.load()
            return size, to_rgb(image)
    except ImageFileError:
        raise
    except FileNotFoundError:
        raise ImageFileError(
            f"image file {path} does not exist; check the dataset root and the image column"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(
            f"image file {path} cannot be decoded ({type(exc).__name__}: {exc}); replace the file "
            "or drop it (check_dataset(..., drop_bad=True))"
        ) from None


def image_problem(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> str | None:
    """Why ``path`` is not a usable image, or None if it is.

    Reasons: "missing", "not a file", "outside the dataset root (...)", "too large: ..." (read
    from the header; such an image is never decoded; the reason names the limit's variable,
    ``$CONVERGENCE_MAX_IMAGE_PIXELS``; :data:`TOO_LARGE_FIX` says what to do), "corrupt: ...".
    Checks both PIL's structural ``verify()`` and a full decode (``verify`` alone misses truncated
    pixel data).
    """
    path = Path(path)
    try:
        resolve_inside(root, path)
    except ImageFileError:
        return f"outside the dataset root (a symbolic link to {os.path.realpath(path)})"
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    try:
        with _open_checked(path, root) as image:
            image.verify()
        with _open_checked(path, root) as image:
            image.load()
            if image.mode in _HIGH_BIT_MODES:
                to_rgb(image)  # a grey range with no agreed 8-bit scale is refused here
    except ImageTooLargeError as exc:
        size = exc.size
        claimed = f"{size[0]:,} × {size[1]:,} pixels" if size else "more pixels than Pillow opens"
        return (
            f"{TOO_LARGE}: {claimed}, over the limit of {max_image_pixels():,} "
            "($CONVERGENCE_MAX_IMAGE_PIXELS; not decoded)"
        )
    except ImageFileError as exc:
        return str(exc)
    except Exception as exc:  # PIL raises many unrelated types for broken files
        return f"corrupt: {type(exc).__name__}: {exc}"
    return None


def make_thumbnail(
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    max_side: int = 256,
    *,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a JPEG thumbnail of ``path`` whose longer side is at most ``max_side`` pixels.

    The aspect ratio is kept and small images are not enlarged. The file is written to a
    temporary name and renamed, so ``out_path`` is never half-written. Returns ``out_path``.
    ``root`` and the size limit apply as in :func:`open_rgb`.
    """
    if int(max_side) < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side!r}")
    image = open_rgb(path, root=root)
    image.thumbnail((int(max_side), int(max_side)), Image.Resampling.LANCZOS)
    out_path = Path(out_path)
    with atomic_file(out_path) as handle:
        image.save(handle, format="JPEG", quality=85, optimize=True)
    return out_path
