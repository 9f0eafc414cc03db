"""The UMAP map of the residuals at any n (convergence_core/residual_umap.py)."""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core.residual_umap import fit_sample, residual_map


def test_fit_sample_is_everything_up_to_the_limit_then_a_seeded_sample() -> None:
    np.testing.assert_array_equal(fit_sample(50, max_fit=50), np.arange(50))
    sample = fit_sample(1000, max_fit=100, seed=3)
    assert sample.shape == (100,) and (np.diff(sample) > 0).all() and sample.max() < 1000
    np.testing.assert_array_equal(sample, fit_sample(1000, max_fit=100, seed=3))
    assert not np.array_equal(sample, fit_sample(1000, max_fit=100, seed=4))


def test_a_map_fitted_on_a_sample_places_the_rest_beside_their_kind() -> None:
    """Two well-separated planted clusters: the fitted points are exactly the map of the sample
    alone, and every transformed point lands nearest to fitted points of its own cluster."""
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    n = 160
    cluster = np.repeat([0, 1], n // 2)
    residuals = rng.normal(0.0, 0.05, size=(n, 3)) + cluster[:, None] * 2.0
    result = residual_map(residuals, max_fit=60)
    fitted = result.fitted_rows
    assert fitted.shape == (60,) and result.coordinates.shape == (n, 2)
    assert np.isfinite(result.coordinates).all()
    alone = residual_map(residuals[fitted], max_fit=60)
    np.testing.assert_allclose(result.coordinates[fitted], alone.coordinates)
    rest = np.setdiff1d(np.arange(n), fitted)
    fitted_map = result.coordinates[fitted]
    for row in rest:
        distance = np.linalg.norm(fitted_map - result.coordinates[row], axis=1)
        nearest = fitted[np.argsort(distance)[:5]]
        assert (cluster[nearest] == cluster[row]).all(), row


def test_the_dashboards_real_umap_is_deterministic() -> None:
    """The Residual space page's UMAP (``data.compute_umap``) gives the same map twice. Here, not
    in the page's test file: real UMAP compiles with numba for ~40 s per process, and the suite
    gives each test file one process, so its UMAP tests share one compilation."""
    pytest.importorskip("umap")
    from convergence_core.dashboard import data

    residuals = np.random.default_rng(0).random((40, 3))
    first = data.compute_umap(residuals)
    assert first.shape == (40, 2) and np.isfinite(first).all()
    np.testing.assert_allclose(data.compute_umap(residuals), first)


def test_too_few_stimuli_is_an_error_in_words() -> None:
    with pytest.raises(ValueError, match="at least 3 stimuli"):
        residual_map(np.zeros((2, 3)))
