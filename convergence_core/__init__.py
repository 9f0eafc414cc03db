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
    "NeighbourIndex": "neighbours",
    "build_neighbour_lists": "neighbours",
    "exact_top_k": "neighbours",
    "subset_alignment": "neighbours",
    "Metric": "metrics",
    "METRICS": "metrics",
    "NeighbourTable": "metrics",
    "measure": "metrics",
    "measure_tables": "metrics",
    "metric": "metrics",
    "metric_names": "metrics",
    "nearest_neighbours": "metrics",
    "permute_table": "metrics",
    "knn_overlap_per_stimulus": "metrics",
    "cknna_from_tables": "metrics",
    "mutual_knn_from_tables": "metrics",
    "cycle_knn_from_tables": "metrics",
    "lcs_knn_from_tables": "metrics",
    "edit_distance_knn_from_tables": "metrics",
    "cka_from_kernels": "metrics",
    "cycle_knn": "metrics",
    "lcs_knn": "metrics",
    "edit_distance_knn": "metrics",
    "svcca": "metrics",
    # the neighbouring papers' analyses and calibration (issue 14)
    "linear_predictivity": "predictivity",
    "predictivity_table": "predictivity",
    "Predictivity": "predictivity",
    "caption_averaging_effect": "many_to_many",
    "class_averaging_effect": "many_to_many",
    "caption_count_curve": "many_to_many",
    "AveragingEffect": "many_to_many",
    "blind_matching": "blind_matching",
    "MatchingResult": "blind_matching",
    "shuffled_pairing_null": "calibration",
    "CalibratedScore": "calibration",
    "matched_random_sets": "calibration",
    "matched_sets_by_cost": "calibration",
    "MatchedSets": "calibration",
    "compare_with_baseline": "calibration",
    "BaselineComparison": "calibration",
    "local_density": "calibration",
    "typicality": "calibration",
    "resampled_interval": "calibration",
    # per-stimulus alignment (issue 14)
    "per_stimulus_alignment": "stimulus_alignment",
    "knn_overlap": "stimulus_alignment",
    "local_cka": "stimulus_alignment",
    "alignment_dispersion_relation": "stimulus_alignment",
    "spearman_permutation_test": "stats",
    # stimulus properties that predict dispersion (issue 15)
    "PropertyTable": "properties",
    "PropertyInfo": "properties",
    "analyse_properties": "dispersion_predictors",
    # the universal space across modalities (issue 13)
    "Member": "universal",
    "fit_universal_space": "universal",
    "cross_modal_analysis": "universal",
    "run_cross_modal_analysis": "universal",
    "cross_validated_retrieval": "retrieval",
    "run_retrieval": "retrieval",
    # data, models, cache
    "Dataset": "datasets",
    "load_dataset": "datasets",
    "check_dataset": "datasets",
    "dataset_fingerprint": "datasets",
    "list_models": "models",
    "check_weights_available": "models",
    "check_run_files": "run_checks",
    "cknna_bound_note": "alignment",
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
