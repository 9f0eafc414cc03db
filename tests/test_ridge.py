"""fit_ridge_cv against scikit-learn's RidgeCV (the reference it reproduces)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from convergence_core.ridge import fit_ridge_cv

ALPHAS = 10.0 ** np.arange(-8, 9)


def _problem(seed: int, s: int, d_x: int, d_y: int, signal: float):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((s + 40, 6))
    X = z @ rng.standard_normal((6, d_x)) + rng.standard_normal((s + 40, d_x)) + 3.0
    Y = signal * z @ rng.standard_normal((6, d_y)) + rng.standard_normal((s + 40, d_y)) - 1.0
    return X[:s], Y[:s], X[s:]


@pytest.mark.parametrize(
    ("seed", "s", "d_x", "d_y", "signal"),
    [
        (0, 30, 80, 200, 1.0),  # the closed-form route: d_x > s, d_y > s
        (1, 50, 60, 400, 0.1),  # weak signal: a large α
        (2, 40, 300, 90, 3.0),  # strong signal: a small α
        (3, 30, 80, 10, 1.0),  # few targets: RidgeCV itself
        (4, 60, 20, 200, 1.0),  # d_x < s: the covariance form
        (6, 80, 30, 5, 1.0),  # d_x < s, few targets
        (7, 100, 40, 300, 0.1),  # d_x < s, weak signal
        (8, 50, 50, 60, 3.0),  # d_x = s
    ],
)
def test_the_choice_and_the_map_equal_ridgecv(seed, s, d_x, d_y, signal):
    X, Y, new = _problem(seed, s, d_x, d_y, signal)
    reference = RidgeCV(alphas=ALPHAS, fit_intercept=True).fit(X, Y)
    fit = fit_ridge_cv(X, Y, ALPHAS)
    assert fit.alpha == reference.alpha_
    np.testing.assert_allclose(fit.coef, reference.coef_.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.intercept, reference.intercept_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.predict(new), reference.predict(new), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("s", "d_x"), [(25, 40), (40, 12)])  # the Gram and covariance forms
def test_the_leave_one_out_error_is_the_refit_without_the_row(s, d_x):
    """Slow reference for the closed forms: refit without each row at every α of a short grid;
    the α of least mean squared held-out error is the one chosen."""
    X, Y, _ = _problem(5, s, d_x, 60, 0.5)
    alphas = np.array([1e-2, 1.0, 30.0, 1e3])
    errors = []
    for alpha in alphas:
        total = 0.0
        for i in range(X.shape[0]):
            keep = np.arange(X.shape[0]) != i
            Xk, Yk = X[keep], Y[keep]
            xm, ym = Xk.mean(axis=0), Yk.mean(axis=0)
            coef = np.linalg.solve((Xk - xm).T @ (Xk - xm) + alpha * np.eye(X.shape[1]),
                                   (Xk - xm).T @ (Yk - ym))
            total += float(np.sum((Y[i] - ym - (X[i] - xm) @ coef) ** 2))
        errors.append(total)
    assert fit_ridge_cv(X, Y, alphas).alpha == alphas[int(np.argmin(errors))]
