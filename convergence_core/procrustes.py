"""Generalized Procrustes Analysis (GPA) of several models' embeddings of the same stimuli.

Method (paper 000, §2.1-2.2): each model's (m, d_i) embedding is centered over stimuli, zero-padded to
d = max d_i and scaled to unit Frobenius norm (:func:`preprocess_embeddings`). GPA then alternates

1. consensus C = mean of the aligned configurations,
2. T_i = orthogonal Procrustes rotation of N_i onto C (SVD of N_iᵀ C; reflections allowed, no scaling),

starting from the unaligned configurations (C_0 = mean of the N_i), until the loss
``Σ_i ||N_i T_i − C||²_F`` (C = mean of the new aligned configurations) decreases by less than ``tol``.
The per-stimulus residual r_ij = ||(N_i T_i)_j − C_j|| (Euclidean, in units of the unit-norm
configurations) is stored as ``residuals[j, i]``.

Fast path (same iterates as the plain d×d loop, not an approximation):

* Coordinates. Every configuration the loop produces is centered (its rows sum to zero) and lies in
  the row space of C_0. With E an (m, m−1) orthonormal basis of the centered stimulus vectors (one
  Householder reflector) and a QR of (Eᵀ N_i)ᵀ, each model is N_i = E Z_i V_iᵀ with V_i orthonormal
  and Z_i of shape (m−1, r_i), r_i = min(m−1, d_i) (full column rank for generic data; centering
  removes one dimension, so coordinates of width min(m, d_i) would be singular). The consensus is
  E c Bᵀ with B an orthonormal basis of that row space, c of shape (m−1, p), p = min(m−1, d) ≥ r_i.
  Residuals and the loss are invariant to these orthogonal changes of basis.
* Procrustes step without an SVD. With A_i = Z_iᵀ c (r_i, p) of full row rank, the orthogonal polar
  factor is T_i = (A_i A_iᵀ)^{-1/2} A_i, so the aligned coordinates are Z_i T_i = (Z_i G_i) A_i with
  G_i = W Λ^{-1/2} Wᵀ from the symmetric eigendecomposition A_i A_iᵀ = W Λ Wᵀ (r_i × r_i). An
  eigendecomposition is 2-3× cheaper than an SVD of the same size here (LAPACK's SVD is
  bound by matrix-vector work). Squaring A_i squares its condition number, so the result is kept
  only when a first-order estimate of its error in the aligned coordinates,
  ``ε·λ_max·||Z_i W Λ^{-1/2}||_F / sqrt(λ_min)``, is below ``_EIGH_POLAR_MAX_ERROR``; otherwise
  (rank deficiency, ill conditioning) the step falls back to the SVD of A_i, as the plain loop does.
  Tolerances below ``_EIGH_POLAR_MIN_TOL`` (loss to machine precision) use the SVD for every step.
The returned consensus / aligned configurations are E c and E Z_i T_i, zero-padded to d columns (the
frame of a GPA consensus is arbitrary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .validation import check_embedding_set, check_features


@dataclass(frozen=True)
class GPAResult:
    """Outcome of :func:`generalized_procrustes` for m stimuli and M models.

    Attributes:
        residuals: (m, M) float64; ``residuals[j, i]`` = distance of stimulus j of model i (after
            alignment) from consensus row j. Units: the configurations have unit Frobenius norm.
        consensus: (m, d) float64 consensus configuration (d = the largest input dimension).
        aligned: M arrays (m, d), each model's aligned configuration; consensus = their mean.
        loss_history: (n_iter + 1,) float64; entry 0 is the loss of the unaligned configurations,
            entry t the loss Σ_i ||aligned_i − consensus||²_F after iteration t. Non-increasing.
        n_iter: number of Procrustes iterations run.
        converged: True when the last decrease of the loss was below ``tol``.
        models, layers: names of the inputs, in order (may be empty).
    """

    residuals: np.ndarray
    consensus: np.ndarray
    aligned: list[np.ndarray]
    loss_history: np.ndarray
    n_iter: int
    converged: bool
    models: tuple[str, ...] = field(default=())
    layers: tuple[str, ...] = field(default=())


def _center_and_scale(X: np.ndarray, label: str) -> np.ndarray:
    """Center (m, d) over stimuli and scale to unit Frobenius norm (float64)."""
    centered = X - X.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(centered)
    if not norm > 0.0:
        raise ValueError(
            f"{label} is identical for every stimulus (zero variance after centering), so it "
            "cannot be scaled to unit norm; drop this model or check its extraction."
        )
    return centered / norm


def _labels(n: int, models: Sequence[str]) -> list[str]:
    return [f"model {i} ({models[i]!r})" if i < len(models) else f"model {i}" for i in range(n)]


def preprocess_embeddings(
    embeddings: Sequence[np.ndarray], *, models: Sequence[str] = ()
) -> list[np.ndarray]:
    """Center each embedding over stimuli, zero-pad to the largest dimension, unit Frobenius norm.

    Args:
        embeddings: M ≥ 2 arrays (m, d_i) of the same m ≥ 3 stimuli in the same order.
        models: optional names, used in error messages.

    Returns:
        M float64 arrays of shape (m, d), d = max d_i, each with column means 0 and norm 1.
    """
    arrays = check_embedding_set(embeddings, list(models) or None)
    d = max(a.shape[1] for a in arrays)
    out = []
    for label, a in zip(_labels(len(arrays), models), arrays):
        scaled = _center_and_scale(a, label)
        out.append(np.pad(scaled, ((0, 0), (0, d - a.shape[1]))))
    return out


def procrustes_align(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal Procrustes: the orthogonal R minimising ||source R − target||_F.

    Reflections are allowed and there is no scaling. R = U Vᵀ from the SVD sourceᵀ target = U S Vᵀ.

    Args:
        source, target: arrays of the same shape (m, d).

    Returns:
        (source @ R, R) with R of shape (d, d), float64.
    """
    source = check_features(source, "source")
    target = check_features(target, "target")
    if source.shape != target.shape:
        raise ValueError(
            f"source has shape {source.shape} but target has {target.shape}; they must match. "
            "Zero-pad the narrower one (preprocess_embeddings does this) and select the same rows."
        )
    u, _, vt = np.linalg.svd(source.T @ target)
    rotation = u @ vt
    return source @ rotation, rotation


def _polar_rows(a: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor P Qᵀ of an (r, p) matrix with r ≤ p (thin SVD a = P S Qᵀ)."""
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


# Largest accepted first-order error estimate (absolute, in the unit-norm configurations) of the
# eigendecomposition route in `_aligned_coordinates`; above it the SVD is used. The estimate takes
# the backward error of forming and decomposing a aᵀ as ε·λ_max; on the tests' ill-conditioned
# cases and the benchmark the observed error (against the SVD route) is 10-1000× below it.
_EIGH_POLAR_MAX_ERROR = 1e-7
# Tolerances below this ask for the loss to machine precision, where the eigendecomposition
# route's rounding (loss differences up to ~1e-12 from the SVD route on the benchmark problem) would
# decide when to stop; they use the SVD for every step.
_EIGH_POLAR_MIN_TOL = 1e-12


def _aligned_coordinates(
    z: np.ndarray, c: np.ndarray, *, allow_eigh: bool = True
) -> tuple[np.ndarray, bool]:
    """z @ polar(zᵀ c): coordinates (n, p) of the configuration z rotated onto c.

    Args:
        z: (n, r) coordinates of one model; c: (n, p) consensus coordinates, r ≤ p.
        allow_eigh: False forces the SVD route.

    Returns:
        (aligned coordinates (n, p), True when the eigendecomposition route was used, False when
        it was not accurate enough and the SVD of zᵀ c was used instead).
    """
    a = z.T @ c
    if not allow_eigh:
        return z @ _polar_rows(a), False
    # numpy only (it computes x @ x.T with a symmetric rank-k update): interleaving scipy's own
    # BLAS/LAPACK with numpy's makes the two thread pools compete and was 2-3× slower here.
    lam, w = np.linalg.eigh(a @ a.T)
    if lam[0] > 0.0:
        scaled = w / np.sqrt(np.sqrt(lam))
        g = scaled @ scaled.T  # W Λ^{-1/2} Wᵀ
        zg = z @ g
        # G = (a aᵀ)^{-1/2} is computed from a aᵀ with a backward error δ of size ~ε·λ_max; to
        # first order it moves (z G) a by at most ||z W Λ^{-1/2}|| · |δ| / sqrt(λ_min).
        error_estimate = np.finfo(np.float64).eps * lam[-1] * np.linalg.norm(zg) / np.sqrt(lam[0])
        if error_estimate <= _EIGH_POLAR_MAX_ERROR:
            return zg @ a, True
    return z @ _polar_rows(a), False


def _check_options(tol: float, max_iter: int) -> None:
    if not (isinstance(tol, (int, float, np.floating)) and np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}; the default is 1e-10.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}; the default is 1000.")


def _check_names(names: Sequence[str], n_models: int, what: str) -> tuple[str, ...]:
    names = tuple(str(x) for x in names)
    if names and len(names) != n_models:
        raise ValueError(
            f"got {len(names)} {what} for {n_models} embedding arrays; pass one per array, or none."
        )
    return names


def _centering_reflector(m: int) -> np.ndarray:
    """Unit vector u of the Householder reflector H = I − 2uuᵀ that maps 1/sqrt(m) to e_0.

    The columns 1..m−1 of H are an orthonormal basis E of the centered vectors (sum zero).
    """
    u = np.full(m, 1.0 / np.sqrt(m))
    u[0] -= 1.0
    return u / np.linalg.norm(u)


def _to_centered_basis(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Eᵀ x: (m, k) centered columns → (m−1, k) coordinates in the basis E (see above)."""
    return (x - 2.0 * np.outer(u, u @ x))[1:]


def _from_centered_basis(y: np.ndarray, u: np.ndarray) -> np.ndarray:
    """E y: (m−1, k) coordinates → (m, k) centered columns."""
    x = np.vstack([np.zeros((1, y.shape[1])), y])
    return x - 2.0 * np.outer(u, u @ x)


def _reduced_coordinates(configs: Sequence[np.ndarray], u: np.ndarray) -> list[np.ndarray]:
    """Z_i (m−1, r_i), r_i = min(m−1, d_i), with N_i = E Z_i V_iᵀ (QR of (Eᵀ N_i)ᵀ)."""
    return [np.linalg.qr(_to_centered_basis(n, u).T, mode="r").T for n in configs]


def generalized_procrustes(
    embeddings: Sequence[np.ndarray],
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    models: Sequence[str] = (),
    layers: Sequence[str] = (),
) -> GPAResult:
    """Align M models' embeddings of the same stimuli to their consensus (Generalized Procrustes).

    Args:
        embeddings: M ≥ 2 arrays of shape (m, d_i) for the same m ≥ 3 stimuli, same order.
        tol: stop when the loss decreases by less than this in one iteration. Below 1e-12 every
            Procrustes step uses the SVD (slower; see the module docstring).
        max_iter: at most this many iterations (``converged`` is False if it is reached).
        models, layers: names of the inputs, kept on the result (empty or one per array).

    Returns:
        :class:`GPAResult` (residuals (m, M), consensus (m, d), aligned M × (m, d), loss history).
    """
    _check_options(tol, max_iter)
    arrays = check_embedding_set(embeddings, [str(x) for x in models] or None)
    model_names = _check_names(models, len(arrays), "model names")
    layer_names = _check_names(layers, len(arrays), "layer names")
    m = arrays[0].shape[0]
    d = max(a.shape[1] for a in arrays)
    n_models = len(arrays)

    configs = [_center_and_scale(a, label) for label, a in zip(_labels(n_models, model_names), arrays)]
    reflector = _centering_reflector(m)
    coords = _reduced_coordinates(configs, reflector)

    # C_0 = mean of the zero-padded configurations; c_0 = its coordinates in E and in an orthonormal
    # basis of its row space (QR of (Eᵀ C_0)ᵀ), p = min(m−1, d) columns.
    initial = np.zeros((m, d))
    for n in configs:
        initial[:, : n.shape[1]] += n
    initial /= n_models
    consensus = np.linalg.qr(_to_centered_basis(initial, reflector).T, mode="r").T
    loss_history = [float(sum(np.sum((np.pad(n, ((0, 0), (0, d - n.shape[1]))) - initial) ** 2)
                              for n in configs))]
    del initial

    allow_eigh = tol >= _EIGH_POLAR_MIN_TOL
    aligned: list[np.ndarray] = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        aligned = [_aligned_coordinates(z, consensus, allow_eigh=allow_eigh)[0] for z in coords]
        consensus = np.mean(aligned, axis=0)
        loss = float(sum(np.sum((a - consensus) ** 2) for a in aligned))
        decrease = loss_history[-1] - loss
        loss_history.append(loss)
        if decrease < tol:
            converged = True
            break

    consensus = _from_centered_basis(consensus, reflector)
    aligned = [_from_centered_basis(a, reflector) for a in aligned]
    residuals = np.stack([np.linalg.norm(a - consensus, axis=1) for a in aligned], axis=1)
    width = consensus.shape[1]
    return GPAResult(
        residuals=residuals,
        consensus=np.pad(consensus, ((0, 0), (0, d - width))),
        aligned=[np.pad(a, ((0, 0), (0, d - width))) for a in aligned],
        loss_history=np.asarray(loss_history, dtype=np.float64),
        n_iter=n_iter,
        converged=converged,
        models=model_names,
        layers=layer_names,
    )
