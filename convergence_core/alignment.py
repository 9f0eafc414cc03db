"""Representational alignment metrics on paired features (row i of X and Y = stimulus i).

The formulas live in :mod:`.metrics` (the metric registry); these are the original entry points.
All metrics use the features exactly as given (no normalisation inside); call
:func:`prepare_features` first to reproduce the Platonic Representation pipeline. Kernels are inner
products K = X Xᵀ, L = Y Yᵀ computed in float64. Definitions follow minyoungg/platonic-rep
``metrics.py``, including the ``+ 1e-6`` in the CKA / CKNNA denominators.

* :func:`cknna` – Centered Kernel Nearest-Neighbour Alignment (see :mod:`.neighbours` for the formula);
* :func:`mutual_knn` – mean fraction of shared k nearest neighbours;
* :func:`cka` – CKA with the biased HSIC trace(K H L H);
* :func:`unbiased_cka` – CKA with the unbiased HSIC estimator (:func:`hsic_unbiased`);
* :func:`cknna_bound_note` – what to tell a reader when CKNNA leaves [-1, 1] (small sets).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from . import metrics as _metrics
from .neighbours import clip_threshold, prepare_rows
from .validation import MIN_CKNNA_SET_SIZE, check_features, check_min_stimuli, check_square


def hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) of two (n, n) kernels, n ≥ 4.

    With K̃, L̃ = K, L with zeroed diagonals:
    [ Σ K̃∘L̃ᵀ + ΣK̃·ΣL̃ / ((n−1)(n−2)) − 2 Σ(K̃ L̃) / (n−2) ] / (n(n−3))
    (:func:`.metrics.unbiased_hsic_from_sums`). The kernels need not be symmetric (the masked
    kernels of CKNNA are not).
    """
    K = check_square(K, "K").astype(np.float64)
    L = check_square(L, "L").astype(np.float64)
    if K.shape != L.shape:
        raise ValueError(f"K has shape {K.shape} but L has {L.shape}; pass kernels of the same stimuli.")
    n = K.shape[0]
    check_min_stimuli(n, 4, "the unbiased HSIC estimator")
    if not (np.isfinite(K).all() and np.isfinite(L).all()):
        raise ValueError("K or L contains NaN or Inf; recompute the kernels from finite features.")
    K_tilde = K.copy()
    L_tilde = L.copy()
    np.fill_diagonal(K_tilde, 0.0)
    np.fill_diagonal(L_tilde, 0.0)
    value = _metrics.unbiased_hsic_from_sums(
        n,
        np.sum(K_tilde * L_tilde.T),
        K_tilde.sum(),
        L_tilde.sum(),
        np.dot(K_tilde.sum(axis=0), L_tilde.sum(axis=1)),
    )
    return float(value)


def cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA: HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6), biased HSIC, n ≥ 2
    (:func:`.metrics.cka`; also the RBF kernel there)."""
    return _metrics.cka(X, Y)


def unbiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA with the unbiased HSIC estimator, n ≥ 4 (NaN if a self-HSIC estimate is < 0)."""
    return _metrics.unbiased_cka(X, Y)


def cknna(X: np.ndarray, Y: np.ndarray, k: int = 10) -> float:
    """CKNNA of paired features X (n, d_x), Y (n, d_y); n ≥ 4, 2 ≤ k ≤ n − 1.

    Neighbours by inner product, self excluded, ties to the lower index (:func:`.metrics.cknna`).
    """
    return _metrics.cknna(X, Y, k)


def mutual_knn(X: np.ndarray, Y: np.ndarray, k: int = 10) -> float:
    """Mean over stimuli of |knn_X(i) ∩ knn_Y(i)| / k, neighbours by inner product, self excluded."""
    return _metrics.mutual_knn(X, Y, k)


def prepare_features(X: np.ndarray, q: float = 0.95) -> np.ndarray:
    """Clip outlier activations and L2-normalise rows, as the Platonic Representation code's
    ``remove_outliers`` does to an (n, d) array.

    The clipping threshold is that code's default (``remove_outliers(exact=False)``): the q-quantile
    of |X| in each row (linear interpolation), averaged over rows (``neighbours.clip_threshold``,
    summed exactly); every entry is clamped to [−threshold, threshold]. q = 1 skips the clipping.
    Runs clip each layer at its own threshold; that code's pipeline takes one threshold over a
    model's stacked layers (docs/ARCHITECTURE.md, metric registry).
    Then each row is divided by its L2 norm (``neighbours.prepare_rows``: a run stores only the
    threshold and prepares rows on demand, with the same result).

    Args:
        X: (n, d) features.
        q: quantile in (0, 1].

    Returns:
        (n, d) float64 with unit-norm rows.
    """
    X = check_features(X, "X")
    return prepare_rows(X, clip_threshold(X, q))


def cknna_bound_note(values: Iterable[tuple[str, float, int, int]]) -> str | None:
    """A note for readers when some CKNNA value lies outside [-1, 1], else None.

    Args:
        values: ``(what, value, set size, k)`` of every CKNNA shown, e.g.
            ``("pasted ids × minilm", 1.29, 5, 3)``; NaN values are ignored.

    Returns:
        One paragraph: how many values, the largest (what, set size, k), why it happens (the
        unbiased HSIC estimates are not bounded by the Cauchy–Schwarz inequality on small sets)
        and what to do (sets of at least ``validation.MIN_CKNNA_SET_SIZE`` stimuli, k <= s/4).
    """
    outside = [row for row in values if np.isfinite(row[1]) and abs(row[1]) > 1]
    if not outside:
        return None
    what, value, size, k = max(outside, key=lambda row: abs(row[1]))
    count = f"{len(outside)} value{'s' if len(outside) > 1 else ''}"
    return (
        f"CKNNA outside [-1, 1] ({count}; largest {value:.3f}: {what}, {size} stimuli, k = {k}). "
        "CKNNA divides unbiased HSIC estimates, which are not bounded by the Cauchy–Schwarz "
        "inequality on small sets (their self-terms are not squared norms, and the numerator "
        "counts only mutual neighbours while each self-term uses its own), so with few stimuli, "
        "or k large for the set, the ratio can exceed 1. Read such a value as 'close to 1, "
        f"unreliable'. Use sets of at least {MIN_CKNNA_SET_SIZE} stimuli and k <= s/4: on the "
        "demo run no value exceeded 1 then (benchmarks/measure_cknna_bound.py)."
    )
