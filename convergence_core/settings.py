"""Where things live: cache root and data sets, each overridable by an environment variable.

Settings are read at call time (not import time) so tests and the CLI can change them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root (the folder holding ``app.py``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Root of the cache: ``$CONVERGENCE_CACHE`` or ``<project>/cache``."""
    return Path(os.environ.get("CONVERGENCE_CACHE", PROJECT_ROOT / "cache")).resolve()


def runs_root() -> Path:
    """Folder holding one sub-folder per precomputed run."""
    return cache_root() / "runs"


def _shared_data(name: str) -> Path:
    return (PROJECT_ROOT.parent / "shared" / "data" / name).resolve()


def demo_data_root() -> Path:
    """The embedded demo set (COCO format): ``$CONVERGENCE_DEMO_DATA`` or ``../shared/data/coco-mini``."""
    return Path(os.environ.get("CONVERGENCE_DEMO_DATA", _shared_data("coco-mini"))).resolve()


def imagenet_samples_root() -> Path:
    """The labelled ImageNet sample set: ``$CONVERGENCE_IMAGENET_DATA`` or ``../shared/data/imagenet-samples``."""
    return Path(os.environ.get("CONVERGENCE_IMAGENET_DATA", _shared_data("imagenet-samples"))).resolve()


#: Default largest image (width × height, in pixels) that is decoded: Pillow's own
#: decompression-bomb warning level, ``Image.MAX_IMAGE_PIXELS`` = 1024³ // 4 // 3 = 89,478,485
#: (a 9,500 × 9,400 photo). Camera originals stay under it (a 61 MP full-frame sensor, a 50 MP
#: phone), while one RGB image at the limit already takes 268 MB once decoded, and the dataset
#: check decodes up to 4 at a time (~1.1 GB). The models see 224-260 px crops, so nothing larger
#: is ever useful. A PNG of a few KB can claim 12,000 × 12,000 pixels (432 MB decoded).
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def max_image_pixels() -> int:
    """Largest image, in pixels (width × height), that is decoded; larger ones are bad items.

    ``$CONVERGENCE_MAX_IMAGE_PIXELS`` (a positive integer) or :data:`DEFAULT_MAX_IMAGE_PIXELS`.
    """
    text = os.environ.get("CONVERGENCE_MAX_IMAGE_PIXELS", "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"CONVERGENCE_MAX_IMAGE_PIXELS={os.environ['CONVERGENCE_MAX_IMAGE_PIXELS']!r} is not a "
            f"positive whole number of pixels; unset it (default {DEFAULT_MAX_IMAGE_PIXELS:,}) or "
            "set e.g. 50000000"
        )
    return value


#: Default longest caption excerpt on cards and in tables, in characters: every caption of the
#: demo set is whole (coco-mini: median 51, longest 240 of 1,195), while a 100,000-character
#: caption is cut to a few lines (rendering it whole froze the browser on Home).
DEFAULT_CAPTION_EXCERPT_CHARS = 300


def caption_excerpt_chars() -> int:
    """Longest caption shown on dashboard cards and in tables (the full text is one click away).

    ``$CONVERGENCE_CAPTION_EXCERPT_CHARS`` (a whole number >= 20) or
    :data:`DEFAULT_CAPTION_EXCERPT_CHARS`.
    """
    text = os.environ.get("CONVERGENCE_CAPTION_EXCERPT_CHARS", "").strip()
    if not text:
        return DEFAULT_CAPTION_EXCERPT_CHARS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 20:
        raise ValueError(
            f"CONVERGENCE_CAPTION_EXCERPT_CHARS={text!r} is not a whole number of at least 20 "
            f"characters; unset it (default {DEFAULT_CAPTION_EXCERPT_CHARS}) or set e.g. 500"
        )
    return value
