"""Ridge regression with its penalty chosen by efficient leave-one-out: scikit-learn's ``RidgeCV``
(intercept, no sample weights, one penalty for all targets), cheaper when the targets are many.

Model: for training rows X (s, d_x), targets Y (s, d_y) and a penalty α, the ridge map with an
unpenalised intercept. ``RidgeCV`` picks α from a grid by the mean squared leave-one-out error
over every row and target, computed in closed form from the eigendecomposition of the centred
Gram matrix K = X̃ X̃ᵀ = Q Λ Qᵀ (its "gram" mode, used when d_x > s): with D = (Λ + α)⁻¹, the
dual coefficients C = Q D Qᵀ Ỹ (s, d_y) and g_i = (Q D Qᵀ)_ii − (Q D Qᵀ 1)_i / s, the
leave-one-out residuals are C_ij / g_i. ``RidgeCV`` forms C for every α: s²·d_y flops each. Only
the row sums Σ_j C_ij² enter the error, and they are the diagonal of (Q D) M (Q D)ᵀ with
M = (QᵀỸ)(QᵀỸ)ᵀ (s, s), formed once: s³ per α instead of s²·d_y. With 1,536-13,000 targets on
200-800 rows (linear predictivity, the universal space's ridge baseline) that is 10-16× less work;
C itself is formed once, for the chosen α.

Sources no wider than the rows (d_x ≤ s: the sets of thousands of a large run) take the
covariance form (:func:`_primal_fit`): the eigendecomposition of X̃ᵀX̃ once, then per α one
product for the fitted values and the leverages from the squared coordinates. ``RidgeCV``'s "cov"
mode also forms the leverages by an (s, d_x) × (d_x, d_x) product per α; on 2,000 rows of 1,536
features and 1,024 targets a fit took 7 s there.

The choice and the fitted map equal ``RidgeCV``'s (tests/test_ridge.py: the same α, coefficients
and predictions to 1e-10 on random problems, many and few targets, both forms). Problems with
d_x > s and d_y ≤ s go to ``RidgeCV`` itself (no saving there), as does a given ``cv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RidgeFit", "fit_ridge_cv"]


@dataclass(frozen=True)
class RidgeFit:
    """A fitted ridge map: ``predict(X) = X @ coef + intercept``; ``alpha`` the chosen penalty.

    ``coef`` (d_x, d_y), ``intercept`` (d_y,).
    """

    coef: np.ndarray
    intercept: np.ndarray
    alpha: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(r, d_y) predictions of rows X (r, d_x)."""
        return np.asarray(X, dtype=np.float64) @ self.coef + self.intercept


def _sklearn_fit(X: np.ndarray, Y: np.ndarray, alphas: np.ndarray, cv: object = None) -> RidgeFit:
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=alphas, fit_intercept=True, cv=cv).fit(X, Y)
    # RidgeCV drops the target axis of a one-column Y (coef_ (d_x,), not (1, d_x)): predict()
    # then gave (r,) for (r, 1) targets, and linear predictivity of a one-feature model failed
    d_y = Y.shape[1]
    coef = np.asarray(model.coef_).reshape(d_y, X.shape[1]).T
    return RidgeFit(coef, np.asarray(model.intercept_).reshape(d_y), float(model.alpha_))


def fit_ridge_cv(
    X: np.ndarray, Y: np.ndarray, alphas: np.ndarray, *, cv: object = None
) -> RidgeFit:
    """Ridge from X (s, d_x) to Y (s, d_y), 2-D float arrays, with an intercept and α the grid
    value of least mean squared leave-one-out error (the first on ties): ``RidgeCV(alphas)``.
    ``cv`` (a scikit-learn splitter) chooses α by those folds instead: ``RidgeCV(alphas, cv=cv)``.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    s = X.shape[0]
    if cv is None and X.shape[1] <= s:
        return _primal_fit(X, Y, alphas)
    if cv is not None or not (X.shape[1] > s and Y.shape[1] > s):
        return _sklearn_fit(X, Y, alphas, cv)
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    Xc, Yc = X - x_mean, Y - y_mean
    eigenvalues, Q = np.linalg.eigh(Xc @ Xc.T)
    QtY = Q.T @ Yc
    M = QtY @ QtY.T  # (s, s): Σ_j C_ij² = ((Q D) M (Q D)ᵀ)_ii
    Qt1 = Q.sum(axis=0)  # Qᵀ 1
    Q2 = Q * Q
    best_score, best = -np.inf, 0
    for a, alpha in enumerate(alphas):
        D = 1.0 / (eigenvalues + alpha)
        QD = Q * D
        g = Q2 @ D - (QD @ Qt1) / s
        row_sums = np.einsum("ik,ik->i", QD @ M, QD)
        score = -float(np.sum(row_sums / (g * g))) / (s * Y.shape[1])
        if score > best_score:  # strictly greater: the first α wins a tie, as in RidgeCV
            best_score, best = score, a
    alpha = float(alphas[best])
    dual = (Q / (eigenvalues + alpha)) @ QtY  # C = Q D Qᵀ Ỹ
    coef = Xc.T @ dual
    return RidgeFit(coef, y_mean - x_mean @ coef, alpha)


def _primal_fit(X: np.ndarray, Y: np.ndarray, alphas: np.ndarray) -> RidgeFit:
    """``RidgeCV`` for d_x ≤ s from the eigendecomposition of X̃ᵀX̃ = V Λ Vᵀ (d_x, d_x), as its
    "cov" mode: with Z = X̃ V (s, d_x), B = Zᵀ Ỹ and D = (Λ + α)⁻¹, the fitted values are
    Z D B and the leave-one-out residuals (Ỹ − Z D B)_ij / (1 − h_i), h_i = 1/s + Σ_k Z_ik² D_k
    (the intercept's 1/s: X̃ is centred, so 1 is orthogonal to Z). Per α that is one product
    Z (D B): s·d_x·d_y flops, against ``RidgeCV``'s s·d_x² more for its leverages."""
    s = X.shape[0]
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    Xc, Yc = X - x_mean, Y - y_mean
    eigenvalues, V = np.linalg.eigh(Xc.T @ Xc)
    Z = Xc @ V
    B = Z.T @ Yc
    Z2 = Z * Z
    best_score, best = -np.inf, 0
    for a, alpha in enumerate(alphas):
        D = 1.0 / (eigenvalues + alpha)
        leverage = 1.0 / s + Z2 @ D
        residuals = Yc - Z @ (D[:, None] * B)
        score = -float(np.sum((residuals / (1.0 - leverage)[:, None]) ** 2)) / (s * Y.shape[1])
        if score > best_score:  # strictly greater: the first α wins a tie, as in RidgeCV
            best_score, best = score, a
    alpha = float(alphas[best])
    coef = V @ (B / (eigenvalues + alpha)[:, None])
    return RidgeFit(coef, y_mean - x_mean @ coef, alpha)
