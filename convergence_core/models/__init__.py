"""Model registry and encoders: ``get_spec``, ``list_models``, ``load_encoder``.

See :mod:`.registry` for the names and :mod:`.base` for the Encoder interface;
``check_weights_available(names, weights=None)`` checks weights without loading any model
(:mod:`.availability`). Importing this package imports torch; ``convergence_core`` itself
imports it lazily.
"""

from __future__ import annotations

from .base import Encoder, VisionEncoder
from .errors import UnknownModelError, WeightsUnavailableError
from .hf_language import LanguageEncoder
from .registry import (
    ModelSpec,
    check_weights_available,
    get_spec,
    list_models,
    load_encoder,
    register,
)

__all__ = [
    "Encoder",
    "LanguageEncoder",
    "ModelSpec",
    "UnknownModelError",
    "VisionEncoder",
    "WeightsUnavailableError",
    "check_weights_available",
    "get_spec",
    "list_models",
    "load_encoder",
    "register",
]
