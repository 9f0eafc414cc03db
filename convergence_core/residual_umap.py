"""A 2-d UMAP map of the GPA residuals (stimuli × vision models), at any number of stimuli.

UMAP's fit costs grow faster than linearly with the stimuli (a nearest-neighbour graph and its
layout: about 20 s for 10,000 points on one core, minutes for 100,000). Above
:data:`MAX_FIT_STIMULI` stimuli the map is fitted on a seeded random sample of that many and every
other stimulus is placed by ``UMAP.transform`` (its neighbours among the fitted points, then a few
layout steps), which keeps the fitted layout and costs about linearly in n. The result says how it
was made (:class:`ResidualMap`), so the page can state it.

A run may store the map as ``umap.npy`` (``RunLayout.umap``): the dashboard
(``dashboard.data.umap_coordinates``) computes it with :func:`residual_map` on first use and
writes it there; precompute does not write it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: UMAP's random_state: the map is reproducible
RANDOM_STATE = 0
#: UMAP's n_neighbors
NEIGHBOURS = 15
#: Above this many stimuli, fit on a sample of this size and transform the rest
MAX_FIT_STIMULI = 10_000


class ResidualMap(NamedTuple):
    """``coordinates`` (n, 2) float64; ``fitted_rows`` (f,) int64: the stimuli UMAP was fitted
    on (all n when n ≤ the limit), the others were placed by ``transform``."""

    coordinates: np.ndarray
    fitted_rows: np.ndarray


def fit_sample(n: int, max_fit: int = MAX_FIT_STIMULI, seed: int = RANDOM_STATE) -> np.ndarray:
    """Sorted rows of the stimuli the map is fitted on: all of them up to ``max_fit``, else a
    seeded uniform sample of ``max_fit``."""
    if n <= max_fit:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_fit, replace=False)).astype(np.int64)


def residual_map(
    residuals: np.ndarray,
    *,
    random_state: int = RANDOM_STATE,
    max_fit: int = MAX_FIT_STIMULI,
) -> ResidualMap:
    """UMAP (Euclidean, ``n_neighbors`` 15, fixed seed) of the (n, M) residual matrix."""
    import umap  # here: it compiles with numba on first use, which takes seconds

    residuals = np.asarray(residuals, dtype=np.float64)
    if residuals.ndim != 2 or residuals.shape[0] < 3:
        raise ValueError(
            f"UMAP needs a (stimuli, models) residual matrix with at least 3 stimuli, got shape "
            f"{residuals.shape}"
        )
    n = residuals.shape[0]
    fitted = fit_sample(n, max_fit, random_state)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(NEIGHBOURS, max(2, fitted.shape[0] - 1)),
        random_state=random_state,
        n_jobs=1,  # a fixed random_state forces one thread anyway; saying so silences a warning
        init="spectral" if fitted.shape[0] > 10 else "random",
    )
    coordinates = np.empty((n, 2), dtype=np.float64)
    coordinates[fitted] = reducer.fit_transform(residuals[fitted])
    if fitted.shape[0] < n:
        rest = np.setdiff1d(np.arange(n), fitted, assume_unique=True)
        coordinates[rest] = reducer.transform(residuals[rest])
    return ResidualMap(coordinates, fitted)
