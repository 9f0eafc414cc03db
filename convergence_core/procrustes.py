"""Generalized Procrustes Analysis (GPA) of several models' embeddings of the same stimuli.

Method (paper 000, §2.1-2.2): each model's (m, d_i) embedding is centered over stimuli, zero-padded to
d = max d_i and scaled to unit Frobenius norm (:func:`preprocess_embeddings`). GPA then finds the
orthogonal maps T_i (reflections allowed, no scaling) that minimise the loss
``Σ_i ||N_i T_i − C||²_F`` with C = mean of the aligned configurations N_i T_i, and stops when one
iteration decreases the loss by less than ``tol``. The per-stimulus residual
r_ij = ||(N_i T_i)_j − C_j|| (Euclidean, in units of the unit-norm configurations) is stored as
``residuals[j, i]``.

Iterations (:data:`GPA_ALGORITHM`):

1. Start (Gower 1975): the widest model as it is; every next model, in order of decreasing width,
   rotated onto the sum of those already placed. If that start has a larger loss than the unaligned
   configurations (possible when the models' raw feature axes already agree), iteration 1 is instead
   the textbook step: every model rotated onto the unaligned mean C_0, which never increases the loss.
2. Block updates (ten Berge 1977): each model in turn (same order) rotated onto the sum of the
   *other* models' current configurations. With the others fixed this rotation minimises the loss
   exactly, so the loss never increases. At convergence each model is also the Procrustes rotation
   onto the mean of all aligned configurations (if N_iᵀ S_{≠i} = H T_i with H symmetric positive
   semidefinite, then N_iᵀ (N_i T_i + S_{≠i}) = (N_iᵀ N_i + H) T_i has the same polar factor T_i):
   the paper's fixed point.

The plain loop of the paper (every model rotated onto the previous mean, all at once) converges to
a stationary point of the same loss. Where the optimum is unique both reach it; the block updates
need fewer iterations, because a model's own copy in the mean no longer drags it back, and they
cannot stop where rotating a single model would still lower the loss, which the plain loop can
(a five-model case in the tests stops 1e-4 above the loss reached here). On the benchmark problem
(4 models × 1024 stimuli) the plain loop needs 14 iterations to Δloss < 1e-10 and stops 1.3e-8 (in
residual) from the optimum; these iterations need 6 and stop 3.6e-9 from it
(``benchmarks/bench_numerics.py``).

Fast path (exact, not an approximation):

* Coordinates. Every configuration the iterations produce is centered (its rows sum to zero), so
  with E an (m, m−1) orthonormal basis of the centered stimulus vectors (one Householder reflector)
  and a QR of (Eᵀ N_i)ᵀ, each model is N_i = E Z_i V_iᵀ with V_i orthonormal and Z_i of shape
  (m−1, r_i), r_i = min(m−1, d_i) (full column rank for generic data; centering removes one
  dimension, so coordinates of width min(m, d_i) would be singular). The aligned configurations are
  E Z_i T_i with T_i of shape (r_i, p) with orthonormal rows, p = min(m−1, d) ≥ r_i: with M
  configurations of rank ≤ m−1 the optimum needs no more than p columns (the loss is
  M − ||S||²_F / M with S = Σ_i Z_i T_i, and ||S||_F = max over unit-norm Y of
  Σ_i tr(Yᵀ Z_i T_i) ≤ Σ_i ||Z_iᵀ Y||_*, with equality for T_i = polar(Z_iᵀ Y), whose rows lie in
  the row space of Y, of rank ≤ m−1). Residuals and the loss are invariant to these orthogonal
  changes of basis.
* Procrustes step without an SVD. With A_i = Z_iᵀ c (r_i, p) of full row rank (c the target), the
  orthogonal polar factor is T_i = (A_i A_iᵀ)^{-1/2} A_i = W Λ^{-1/2} Wᵀ A_i with the symmetric
  eigendecomposition A_i A_iᵀ = W Λ Wᵀ (r_i × r_i); the aligned coordinates are
  Z_i T_i = (Z_i W) B with B = Wᵀ A_i, each row scaled to unit length (the row norms are Λ^{1/2},
  measured on A_i itself instead of taken from the computed eigenvalues, whose absolute error ε·λ_max
  would otherwise mis-scale the rows of small eigenvalues). An eigendecomposition is 2-3× cheaper
  than an SVD of the same size here (LAPACK's SVD is bound by matrix-vector work). Squaring A_i
  squares its condition number, so the result is kept only when a first-order estimate of its
  error in the aligned coordinates, ``ε·λ_max·||Z_i W Λ^{-1/2}||_F / sqrt(λ_min)``, is below
  ``_EIGH_POLAR_MAX_ERROR``; otherwise (rank deficiency, ill conditioning) the step falls back to
  the SVD of A_i. Tolerances below ``_EIGH_POLAR_MIN_TOL`` (loss to machine precision) use the SVD
  for every step.
The returned aligned configurations and their mean (the consensus) are E Z_i T_i, zero-padded to d
columns (the frame of a GPA consensus is arbitrary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .validation import check_embedding_set, check_features


# Names the iteration scheme (see the module docstring); part of the cache key of stored GPA results.
GPA_ALGORITHM = "gower-start+ten-berge-blocks/1"


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


# Largest accepted first-order error estimate (Frobenius, in the unit-norm configurations) of the
# eigendecomposition route in `_aligned_coordinates`; above it the SVD is used. The estimate takes
# the backward error of forming and decomposing a aᵀ as ε·λ_max. Observed errors (against the SVD
# route): at most 0.16× the estimate, median 0.02×, over 3,000 random ill-conditioned steps
# (tests/test_procrustes.py checks ≤ 0.5× on 300); 0.003× on the benchmark problem, whose
# estimates are 2-8e-9.
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
        z: (n, r) coordinates of one model; c: (n, p) coordinates of the target, r ≤ p.
        allow_eigh: False forces the SVD route.

    Returns:
        (aligned coordinates (n, p), True when the eigendecomposition route was used, False when
        it was not accurate enough and the SVD of zᵀ c was used instead).
    """
    a = z.T @ c
    if allow_eigh:
        aligned, error_estimate = _eigh_polar_aligned(z, a)
        if error_estimate <= _EIGH_POLAR_MAX_ERROR:
            return aligned, True
    return z @ _polar_rows(a), False


def _eigh_polar_aligned(z: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, float]:
    """z @ polar(a) from the eigendecomposition of a aᵀ, and a first-order bound on its error.

    Args:
        z: (n, r) coordinates of one model; a: (r, p) = zᵀ (target), r ≤ p.

    Returns:
        (aligned coordinates (n, p), estimated Frobenius error of them; ``inf`` when a aᵀ is not
        numerically positive definite, so that the caller uses the SVD).
    """
    # numpy only (it computes x @ x.T with a symmetric rank-k update): interleaving scipy's own
    # BLAS/LAPACK with numpy's makes the two thread pools compete and was 2-3× slower here.
    lam, w = np.linalg.eigh(a @ a.T)
    if not lam[0] > 0.0:
        return np.empty((z.shape[0], a.shape[1])), np.inf
    zw = z @ w
    # (a aᵀ)^{-1/2} is computed from a aᵀ with a backward error δ of size ~ε·λ_max; to first order
    # it moves the aligned coordinates by at most ||z W Λ^{-1/2}|| · |δ| / sqrt(λ_min).
    error_estimate = (
        np.finfo(np.float64).eps * lam[-1] * np.linalg.norm(zw / np.sqrt(lam)) / np.sqrt(lam[0])
    )
    # polar(a) = W Λ^{-1/2} Wᵀ a, with Λ^{1/2} taken as the row norms of Wᵀ a rather than from the
    # computed eigenvalues: their absolute error ε·λ_max would mis-scale the rows of the small
    # eigenvalues, the dominant error of this route otherwise (5-1000× larger).
    rows = w.T @ a
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return zw @ rows, float(error_estimate)


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


def _loss(aligned: Sequence[np.ndarray]) -> float:
    """Σ_i ||aligned_i − mean||²_F."""
    consensus = np.mean(aligned, axis=0)
    return float(sum(np.sum((a - consensus) ** 2) for a in aligned))


def _sequential_start(
    coords: Sequence[np.ndarray],
    order: Sequence[int],
    width: int,
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """Gower's start: order[0] as it is (zero-padded to ``width`` columns), then each next model
    rotated onto the sum of those already placed. Returns the configurations in input order."""
    first = coords[order[0]]
    placed = {order[0]: np.pad(first, ((0, 0), (0, width - first.shape[1])))}
    total = placed[order[0]].copy()
    for i in order[1:]:
        placed[i] = step(coords[i], total)
        total += placed[i]
    return [placed[i] for i in range(len(coords))]


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
    unaligned_mean = np.zeros((m, d))
    for n in configs:
        unaligned_mean[:, : n.shape[1]] += n
    unaligned_mean /= n_models
    loss_history = [float(sum(np.sum((np.pad(n, ((0, 0), (0, d - n.shape[1]))) - unaligned_mean) ** 2)
                              for n in configs))]

    def step(z: np.ndarray, target: np.ndarray) -> np.ndarray:
        return _aligned_coordinates(z, target, allow_eigh=tol >= _EIGH_POLAR_MIN_TOL)[0]

    # Widest first, so that each target of the start has at least the rank of the model rotated
    # onto it (otherwise that rotation would not be unique). Ties keep the input order.
    order = sorted(range(n_models), key=lambda i: -coords[i].shape[1])
    aligned = _sequential_start(coords, order, min(m - 1, d), step)
    loss = _loss(aligned)
    if loss > loss_history[0]:
        c0 = np.linalg.qr(_to_centered_basis(unaligned_mean, reflector).T, mode="r").T
        aligned = [step(z, c0) for z in coords]
        loss = _loss(aligned)
    del unaligned_mean
    loss_history.append(loss)
    n_iter = 1
    converged = loss_history[0] - loss < tol
    while not converged and n_iter < max_iter:
        n_iter += 1
        for i in order:
            others = sum(aligned[j] for j in range(n_models) if j != i)
            aligned[i] = step(coords[i], others)
        loss = _loss(aligned)
        converged = loss_history[-1] - loss < tol
        loss_history.append(loss)
    consensus = _from_centered_basis(np.mean(aligned, axis=0), reflector)
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
