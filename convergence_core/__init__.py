"""Convergence Explorer backend: stimulus-level convergence of neural representations.

The public API is importable from the package top level, e.g.::

    from convergence_core import generalized_procrustes, dispersion_scores, cknna, load_run

Names are resolved lazily so that ``import convergence_core`` stays fast and never imports torch;
see docs/ARCHITECTURE.md for the module map.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module (relative to this package) that defines it
_PUBLIC: dict[str, str] = {
    # numerics
    "GPAResult": "procrustes",
    "generalized_procrustes": "procrustes",
    "preprocess_embeddings": "procrustes",
    "procrustes_align": "procrustes",
    "deviation_from_consensus": "procrustes",
    "GPAStability": "gpa_stability",
    "gpa_stability": "gpa_stability",
    "ResidualPCA": "dispersion",
    "dispersion_scores": "dispersion",
    "residual_pca": "dispersion",
    "select_stimuli": "subsets",
    "drop_fraction": "subsets",
    "check_indices": "subsets",
    "cknna": "alignment",
    "mutual_knn": "alignment",
    "cka": "alignment",
    "unbiased_cka": "alignment",
    "hsic_unbiased": "alignment",
    "prepare_features": "alignment",
    "cknna_from_gram": "neighbours",
    "mutual_knn_from_gram": "neighbours",
    # data, models, cache
    "Dataset": "datasets",
    "load_dataset": "datasets",
    "check_dataset": "datasets",
    "dataset_fingerprint": "datasets",
    "list_models": "models",
    "load_encoder": "models",
    "extract_embeddings": "extract",
    "Run": "run",
    "load_run": "run",
    "list_runs": "run",
    "precompute": "precompute",
    "write_run_from_embeddings": "precompute",
    # the paper's analyses
    "dispersion_set_alignment": "analyses",
    "drop_fraction_alignment": "analyses",
    "leave_one_model_out": "analyses",
    "layer_sweep": "analyses",
    "best_language_layers": "analyses",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'convergence_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
