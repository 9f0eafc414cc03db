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
