"""Alignment metrics against a slow dense transcription of the Platonic Representation code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convergence_core.alignment import (
    cka,
    cknna,
    hsic_unbiased,
    mutual_knn,
    prepare_features,
    unbiased_cka,
)


# --- slow dense references (n×n masks, loops where the original loops) -------------------------
def dense_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    m = K.shape[0]
    Kt = K.copy()
    Lt = L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    value = (
        np.sum(Kt * Lt.T)
        + np.sum(Kt) * np.sum(Lt) / ((m - 1) * (m - 2))
        - 2 * np.sum(Kt @ Lt) / (m - 2)
    )
    return value / (m * (m - 3))


def dense_knn_mask(K: np.ndarray, k: int) -> np.ndarray:
    n = K.shape[0]
    mask = np.zeros((n, n))
    for i in range(n):
        row = K[i].copy()
        row[i] = -np.inf
        mask[i, np.argsort(-row, kind="stable")[:k]] = 1.0
    return mask


def dense_cknna(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    K, L = X @ X.T, Y @ Y.T

    def similarity(A: np.ndarray, B: np.ndarray) -> float:
        mask = dense_knn_mask(A, k) * dense_knn_mask(B, k)
        return dense_hsic_unbiased(mask * A, mask * B)

    return similarity(K, L) / (np.sqrt(similarity(K, K) * similarity(L, L)) + 1e-6)


def dense_mutual_knn(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    overlap = dense_knn_mask(X @ X.T, k) * dense_knn_mask(Y @ Y.T, k)
    return float(np.mean(overlap.sum(axis=1) / k))


def dense_cka(X: np.ndarray, Y: np.ndarray) -> float:
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, L) / (np.sqrt(hsic(K, K) * hsic(L, L)) + 1e-6)


def paired(rng: np.random.Generator, n: int = 120, dx: int = 24, dy: int = 16, noise: float = 1.0):
    X = rng.standard_normal((n, dx))
    Y = X @ rng.standard_normal((dx, dy)) + noise * rng.standard_normal((n, dy))
    return X, Y


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --- CKNNA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 10, 40, 119])
def test_cknna_matches_dense_reference(k: int) -> None:
    X, Y = paired(np.random.default_rng(k))
    assert cknna(X, Y, k) == pytest.approx(dense_cknna(X, Y, k), abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(6, 60),
    k_fraction=st.floats(0.0, 1.0),
    noise=st.floats(0.0, 3.0),
)
def test_cknna_and_mutual_knn_match_dense_reference_property(
    seed: int, n: int, k_fraction: float, noise: float
) -> None:
    X, Y = paired(np.random.default_rng(seed), n=n, dx=7, dy=5, noise=noise)
    k = 2 + int(k_fraction * (n - 3))
    assert cknna(X, Y, k) == pytest.approx(dense_cknna(X, Y, k), abs=1e-9)
    assert mutual_knn(X, Y, k) == pytest.approx(dense_mutual_knn(X, Y, k), abs=1e-12)


def test_cknna_is_one_under_orthogonal_transform() -> None:
    rng = np.random.default_rng(0)
    X, Y = paired(rng)
    Q = random_orthogonal(rng, X.shape[1])
    # 1 up to the reference's +1e-6 in the denominator
    assert cknna(X, X @ Q, 10) == pytest.approx(1.0, abs=1e-4)
    assert cknna(X, Y, 10) < 0.9


def test_cknna_symmetry_is_that_of_the_reference() -> None:
    """The reference CKNNA is symmetric only up to its Σ(K̃ L̃) term: the masked kernels are not
    symmetric, so colsum(M∘K)·rowsum(M∘L) ≠ colsum(M∘L)·rowsum(M∘K). Each argument order matches
    the reference; with all n − 1 neighbours (symmetric masks) the two orders agree exactly."""
    X, Y = paired(np.random.default_rng(0))
    assert cknna(Y, X, 10) == pytest.approx(dense_cknna(Y, X, 10), abs=1e-9)
    assert cknna(X, Y, 10) == pytest.approx(cknna(Y, X, 10), abs=0.02)
    n = X.shape[0]
    assert cknna(X, Y, n - 1) == pytest.approx(cknna(Y, X, n - 1), abs=1e-12)


def test_cknna_with_all_neighbours_is_unbiased_cka() -> None:
    X, Y = paired(np.random.default_rng(3), n=50)
    assert cknna(X, Y, 49) == pytest.approx(unbiased_cka(X, Y), abs=1e-9)


def test_mutual_knn_identical_is_one_and_symmetric() -> None:
    X, Y = paired(np.random.default_rng(1))
    assert mutual_knn(X, X, 7) == 1.0
    assert mutual_knn(X, Y, 7) == mutual_knn(Y, X, 7)
    assert 0.0 <= mutual_knn(X, Y, 7) < 1.0


def test_mutual_knn_known_value() -> None:
    # points on a line: neighbours by inner product are the largest values, not the closest
    X = np.arange(1.0, 6.0).reshape(-1, 1)
    Y = X - 2.5  # [-1.5, -0.5, 0.5, 1.5, 2.5]
    # top-1 by inner product, self excluded. X: rows 0-3 -> 4, row 4 -> 3.
    # Y: row 0 -> 1, row 1 -> 0 (negative rows prefer the most negative), rows 2, 3 -> 4, row 4 -> 3.
    assert mutual_knn(X, Y, 1) == pytest.approx(3 / 5)
    assert mutual_knn(X, X, 1) == 1.0


# --- HSIC / CKA ---------------------------------------------------------------------------------
def test_hsic_unbiased_matches_reference_on_asymmetric_kernels() -> None:
    rng = np.random.default_rng(5)
    K = rng.standard_normal((30, 30))
    L = rng.standard_normal((30, 30))
    assert hsic_unbiased(K, L) == pytest.approx(dense_hsic_unbiased(K, L), rel=1e-12)
    # the transpose in the first term matters for asymmetric kernels
    assert hsic_unbiased(K, L) != pytest.approx(hsic_unbiased(K, L.T), rel=1e-6)


def test_cka_matches_dense_reference_and_invariances() -> None:
    rng = np.random.default_rng(6)
    X, Y = paired(rng, n=80)
    assert cka(X, Y) == pytest.approx(dense_cka(X, Y), rel=1e-10)
    Q = random_orthogonal(rng, X.shape[1])
    assert cka(X @ Q, 3.0 * Y) == pytest.approx(cka(X, Y), rel=1e-6)
    assert cka(X, X) == pytest.approx(1.0, abs=1e-6)
    assert unbiased_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-6)
    assert unbiased_cka(X, Y) == pytest.approx(unbiased_cka(Y, X), rel=1e-12)


# --- prepare_features ---------------------------------------------------------------------------
def test_prepare_features_clips_at_mean_row_quantile_and_normalises() -> None:
    rng = np.random.default_rng(7)
    X = rng.standard_normal((20, 50))
    X[3, 7] = 100.0
    out = prepare_features(X, q=0.9)
    threshold = np.mean([np.quantile(np.abs(row), 0.9) for row in X])
    expected = np.clip(X, -threshold, threshold)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)
    np.testing.assert_allclose(prepare_features(X, q=1), X / np.linalg.norm(X, axis=1, keepdims=True))


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda X, Y: cknna(X, Y, 1), "2 <= k"),
        (lambda X, Y: cknna(X, Y, 30), "k=30 is too large"),
        (lambda X, Y: cknna(X[:3], Y[:3], 2), "at least 4 stimuli"),
        (lambda X, Y: mutual_knn(X, Y, 0), "1 <= k"),
        (lambda X, Y: mutual_knn(X, Y, 2.0), "integer"),
        (lambda X, Y: cknna(X, Y[:-1], 3), "same stimuli"),
        (lambda X, Y: cka(X[:, 0], Y), "must be 2-D"),
        (lambda X, Y: prepare_features(X, q=0), "0 < q <= 1"),
        (lambda X, Y: prepare_features(np.zeros((4, 3)), q=1), "all zeros"),
    ],
)
def test_bad_input_is_explained(call, message: str) -> None:
    X, Y = paired(np.random.default_rng(8), n=30, dx=4, dy=3)
    with pytest.raises(ValueError, match=message):
        call(X, Y)


def test_non_finite_features_are_counted() -> None:
    X, Y = paired(np.random.default_rng(9), n=30, dx=4, dy=3)
    X[2, 1] = np.nan
    X[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"X contains 1 NaN and 1 Inf values in 2 rows"):
        cknna(X, Y, 5)
