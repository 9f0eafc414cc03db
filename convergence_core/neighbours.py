"""k-nearest neighbours, mutual k-NN and CKNNA from (cached) Gram matrices, touching only the
n·k neighbour entries.

Neighbours are by inner product: the k nearest neighbours of stimulus i are the k largest entries of
row i of the Gram matrix G = F Fᵀ, excluding i itself (as in the Platonic Representation code, where
the diagonal is set to −inf before ``topk``). Ties: among exactly equal inner products the choice is
made by ``numpy.argpartition`` and is unspecified (as is ``torch.topk``'s); results on data with exact
ties may therefore differ from the reference. Continuous features have no ties in practice.

CKNNA (Huh et al. 2024, appendix; ``cknna`` in minyoungg/platonic-rep metrics.py):
with 0/1 masks M_K, M_L (row i has ones at i's k neighbours) and M = M_K ∘ M_L,

    CKNNA = HSIC_u(M∘K, M∘L) / (sqrt(HSIC_u(M_K∘K, M_K∘K) · HSIC_u(M_L∘L, M_L∘L)) + 1e-6)

where HSIC_u is the unbiased estimator (Song et al. 2012, eq. 5) with zeroed diagonals:

    HSIC_u(A, B) = [ Σ A∘Bᵀ + ΣA·ΣB / ((n−1)(n−2)) − 2 Σ(A B) / (n−2) ] / (n(n−3)).

The masked kernels are sparse (≤ n·k entries) and not symmetric, so each term is a sum over the
mask entries: Σ A∘Bᵀ pairs entry (i, j) with (j, i) when both are mask entries (looked up in a
one-byte-per-entry membership array); Σ(A B) = (column sums of A)·(row sums of B).
Cost: gathering the (s, s) sub-Grams and one O(s²) selection per row set; the rest is O(s·k).
Everything is accumulated in float64, whatever the Gram dtype.
"""

from __future__ import annotations

import numpy as np

from .subsets import check_indices
from .validation import check_k, check_min_stimuli, check_square

#: added to the CKNNA denominator, as in the reference implementation
CKNNA_EPSILON = 1e-6


def _sub_gram(G: np.ndarray, subset: np.ndarray | None) -> np.ndarray:
    """The (s, s) sub-matrix of G for the subset (G itself when subset is None), finite-checked."""
    sub = G if subset is None else G.take(subset, axis=0).take(subset, axis=1)
    if not np.isfinite(sub).all():
        raise ValueError(
            "the Gram matrix contains NaN or Inf entries for the chosen stimuli; recompute it from "
            "finite features (check the embeddings for NaN)."
        )
    return sub


def _top_k_excluding_self(G: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of the k largest entries of each row of G, the diagonal excluded.

    Takes the k + 1 largest entries of each row (argpartition, O(n²)), then drops the row's own
    index if it is among them and otherwise the smallest of the k + 1. No copy of G is made.
    """
    n = G.shape[0]
    candidates = np.argpartition(G, n - k - 1, axis=1)[:, n - k - 1 :]
    values = np.take_along_axis(G, candidates, axis=1).astype(np.float64)
    values[candidates == np.arange(n)[:, None]] = -np.inf
    drop = np.argmin(values, axis=1)
    keep = np.ones(candidates.shape, dtype=bool)
    keep[np.arange(n), drop] = False
    return candidates[keep].reshape(n, k)


def top_k_neighbours(G: np.ndarray, k: int = 10, subset: object = None) -> np.ndarray:
    """The k nearest neighbours (largest inner products, self excluded) of each stimulus.

    Args:
        G: (n, n) Gram matrix F Fᵀ of the full stimulus set (any float dtype).
        k: neighbours per stimulus, 1 ≤ k ≤ s − 1.
        subset: optional indices into the n stimuli; neighbours are then searched within the subset.

    Returns:
        (s, k) int64 positions *within the subset* (within 0..n−1 when subset is None), unordered.
    """
    G = check_square(G, "G")
    idx = None if subset is None else check_indices(subset, G.shape[0])
    sub = _sub_gram(G, idx)
    k = check_k(k, sub.shape[0], 1)
    return _top_k_excluding_self(sub, k).astype(np.int64)


def _flat_keys(neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask entries of a neighbour table: (rows, cols, flat keys rows·n + cols), each (n·k,)."""
    n, k = neighbours.shape
    rows = np.arange(n, dtype=np.int64).repeat(k)
    cols = neighbours.ravel().astype(np.int64)
    return rows, cols, rows * n + cols


def _membership(keys: np.ndarray, n: int) -> np.ndarray:
    """Flat boolean (n·n,) array, True at the given keys (a 0/1 mask, one byte per entry)."""
    member = np.zeros(n * n, dtype=bool)
    member[keys] = True
    return member


def _masked_hsic(
    rows: np.ndarray,
    cols: np.ndarray,
    transpose_in_mask: np.ndarray,
    K: np.ndarray,
    L: np.ndarray,
) -> float:
    """Unbiased HSIC of (M∘K, M∘L) for a 0/1 mask M without diagonal entries.

    Args:
        rows, cols: the mask entries (i, j).
        transpose_in_mask: for each entry, whether (j, i) is also a mask entry.
        K, L: (n, n) kernels.
    """
    n = K.shape[0]
    a = K[rows, cols].astype(np.float64)
    b = L[rows, cols].astype(np.float64)
    # Σ_ij A_ij B_ji: entry (i, j) pairs with L[j, i] when (j, i) is also a mask entry.
    b_transposed = L[cols[transpose_in_mask], rows[transpose_in_mask]].astype(np.float64)
    trace_term = float(np.dot(a[transpose_in_mask], b_transposed))
    sum_a = float(a.sum())
    sum_b = float(b.sum())
    col_sums_a = np.bincount(cols, weights=a, minlength=n)
    row_sums_b = np.bincount(rows, weights=b, minlength=n)
    product_term = float(np.dot(col_sums_a, row_sums_b))
    value = trace_term + sum_a * sum_b / ((n - 1) * (n - 2)) - 2.0 * product_term / (n - 2)
    return value / (n * (n - 3))


def _cknna_from_subgrams(K: np.ndarray, L: np.ndarray, k: int) -> float:
    """CKNNA of two (s, s) Gram matrices (already validated, s ≥ 4, 2 ≤ k ≤ s − 1)."""
    s = K.shape[0]
    rows, cols_k, keys_k = _flat_keys(_top_k_excluding_self(K, k))
    _, cols_l, keys_l = _flat_keys(_top_k_excluding_self(L, k))
    in_k = _membership(keys_k, s)
    in_l = _membership(keys_l, s)
    transposed_k = cols_k * s + rows
    transposed_l = cols_l * s + rows
    # mutual mask M = M_K ∘ M_L: the K-mask entries that are also L-mask entries
    mutual = in_l[keys_k]
    rows_m, cols_m = rows[mutual], cols_k[mutual]
    transposed_m = transposed_k[mutual]
    sim_kl = _masked_hsic(rows_m, cols_m, in_k[transposed_m] & in_l[transposed_m], K, L)
    sim_kk = _masked_hsic(rows, cols_k, in_k[transposed_k], K, K)
    sim_ll = _masked_hsic(rows, cols_l, in_l[transposed_l], L, L)
    product = sim_kk * sim_ll
    if product < 0:
        # the reference takes sqrt of a negative number here and returns NaN
        return float("nan")
    return sim_kl / (np.sqrt(product) + CKNNA_EPSILON)


def _mutual_knn_from_subgrams(K: np.ndarray, L: np.ndarray, k: int) -> float:
    """Mean over stimuli of |knn_K(i) ∩ knn_L(i)| / k for two (s, s) Gram matrices."""
    s = K.shape[0]
    _, _, keys_k = _flat_keys(_top_k_excluding_self(K, k))
    _, _, keys_l = _flat_keys(_top_k_excluding_self(L, k))
    shared = int(np.count_nonzero(_membership(keys_l, s)[keys_k]))
    return shared / keys_k.size


def _check_gram_pair(K: object, L: object, subset: object) -> tuple[np.ndarray, np.ndarray]:
    K = check_square(K, "K")
    L = check_square(L, "L")
    if K.shape != L.shape:
        raise ValueError(
            f"K has shape {K.shape} but L has {L.shape}; both Gram matrices must cover the same "
            "stimuli in the same order."
        )
    idx = None if subset is None else check_indices(subset, K.shape[0])
    return _sub_gram(K, idx), _sub_gram(L, idx)


def cknna_from_gram(K: np.ndarray, L: np.ndarray, k: int = 10, subset: object = None) -> float:
    """CKNNA of a stimulus subset from the Gram matrices of the full set.

    Equals ``alignment.cknna(F_x[subset], F_y[subset], k)`` for K = F_x F_xᵀ, L = F_y F_yᵀ.

    Args:
        K, L: (n, n) Gram matrices (float32 is fine; computed in float64).
        k: neighbours per stimulus, 2 ≤ k ≤ s − 1 (s = subset size).
        subset: indices into the n stimuli (None = all); at least 4 (unbiased HSIC).

    Returns:
        CKNNA as a float (NaN if a self-HSIC estimate is negative, as in the reference).
    """
    K_sub, L_sub = _check_gram_pair(K, L, subset)
    check_min_stimuli(K_sub.shape[0], 4, "CKNNA (unbiased HSIC)")
    k = check_k(k, K_sub.shape[0], 2)
    return _cknna_from_subgrams(K_sub, L_sub, k)


def mutual_knn_from_gram(K: np.ndarray, L: np.ndarray, k: int = 10, subset: object = None) -> float:
    """Mutual k-NN alignment of a stimulus subset from the Gram matrices of the full set.

    Equals ``alignment.mutual_knn(F_x[subset], F_y[subset], k)``.

    Args:
        K, L: (n, n) Gram matrices.
        k: neighbours per stimulus, 1 ≤ k ≤ s − 1.
        subset: indices into the n stimuli (None = all).

    Returns:
        Mean fraction of shared neighbours, in [0, 1].
    """
    K_sub, L_sub = _check_gram_pair(K, L, subset)
    k = check_k(k, K_sub.shape[0], 1)
    return _mutual_knn_from_subgrams(K_sub, L_sub, k)
