"""k-nearest neighbours, mutual k-NN and CKNNA from (cached) Gram matrices, touching only the
n·k neighbour entries.

Neighbours are by inner product: the k nearest neighbours of stimulus i are the k largest entries of
row i of the Gram matrix G = F Fᵀ, excluding i itself (as in the Platonic Representation code, where
the diagonal is set to −inf before ``topk``). Ties: among exactly equal inner products the lower
stimulus index wins, in :func:`cknna_from_gram` / :func:`mutual_knn_from_gram` on both paths (the
sub-Gram selection on the sorted subset, and :class:`NeighbourRanking`); the reference's choice
(``torch.topk``) is unspecified, so results on data with exact ties may differ from it, and so may
:func:`subset_alignment`'s (``argpartition``). Continuous features have no ties in practice.

CKNNA (Huh et al. 2024, appendix; ``cknna`` in minyoungg/platonic-rep metrics.py):
with 0/1 masks M_K, M_L (row i has ones at i's k neighbours) and M = M_K ∘ M_L,

    CKNNA = HSIC_u(M∘K, M∘L) / (sqrt(HSIC_u(M_K∘K, M_K∘K) · HSIC_u(M_L∘L, M_L∘L)) + 1e-6)

where HSIC_u is the unbiased estimator (Song et al. 2012, eq. 5) with zeroed diagonals:

    HSIC_u(A, B) = [ Σ A∘Bᵀ + ΣA·ΣB / ((n−1)(n−2)) − 2 Σ(A B) / (n−2) ] / (n(n−3)).

The masked kernels are sparse (≤ n·k entries) and not symmetric, so each term is a sum over the
mask entries: Σ A∘Bᵀ pairs entry (i, j) with (j, i) when both are mask entries (binary search in
the sorted entry keys); Σ(A B) = (column sums of A)·(row sums of B).
Cost: gathering the (s, s) sub-Grams and one O(s²) selection per row set, or, given precomputed
:class:`NeighbourRanking` s, O(k·n) to find the neighbours; the rest is O(s·k log(s·k)).
Everything is accumulated in float64, whatever the Gram dtype.

:func:`subset_alignment` computes the same two numbers for many subsets and many model pairs at
once (the random baselines and permutation tests of Fig. 2 and the Alignment lab): the subsets are
stacked into a (B, s, s) array, each model's k-NN mask is found once and shared by every pair it
is in, and every HSIC sum is one float64 ``bincount`` over all blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import NamedTuple

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
    Ties at the k-th value are broken by the lower column index (the rule of
    :class:`NeighbourRanking`): rows with more than k entries ≥ their k-th value are redone with a
    stable sort.
    """
    n = G.shape[0]
    candidates = np.argpartition(G, n - k - 1, axis=1)[:, n - k - 1 :]
    values = np.take_along_axis(G, candidates, axis=1).astype(np.float64)
    values[candidates == np.arange(n)[:, None]] = -np.inf
    drop = np.argmin(values, axis=1)
    keep = np.ones(candidates.shape, dtype=bool)
    keep[np.arange(n), drop] = False
    top = candidates[keep].reshape(n, k)
    threshold = values[keep].reshape(n, k).min(axis=1)
    diagonal = np.diagonal(G).astype(np.float64)
    at_least = np.count_nonzero(G >= threshold[:, None], axis=1) - (diagonal >= threshold)
    for row in np.flatnonzero(at_least > k):
        keys = -G[row].astype(np.float64)
        keys[row] = np.inf
        top[row] = np.argsort(keys, kind="stable")[:k]
    return top


def top_k_neighbours(G: np.ndarray, k: int = 10, subset: object = None) -> np.ndarray:
    """The k nearest neighbours (largest inner products, self excluded) of each stimulus.

    Args:
        G: (n, n) Gram matrix F Fᵀ of the full stimulus set (any float dtype).
        k: neighbours per stimulus, 1 ≤ k ≤ s − 1.
        subset: optional indices into the n stimuli; neighbours are then searched within the subset.

    Returns:
        (s, k) int64 positions *within the subset* (within 0..n−1 when subset is None), unordered;
        exact ties are broken by the lower position.
    """
    G = check_square(G, "G")
    idx = None if subset is None else check_indices(subset, G.shape[0])
    sub = _sub_gram(G, idx)
    k = check_k(k, sub.shape[0], 1)
    return _top_k_excluding_self(sub, k).astype(np.int64)


class NeighbourRanking:
    """Every stimulus's other stimuli, most similar first: the k-NN of any subset in O(k·n).

    ``order[i]`` (n − 1 entries) lists j ≠ i by G[i, j] descending, exact ties by the lower index
    (a stable sort of −G[i]). For a subset S the k nearest neighbours of i within S are the first
    k members of S along ``order[i]``: the same neighbours as the sub-Gram selection
    (:func:`top_k_neighbours` on the sorted subset), found by reading a prefix of ``order[i]``.

    Build once per Gram (:meth:`from_gram`, an O(n² log n) sort) and pass it with that same Gram
    to :func:`cknna_from_gram` / :func:`mutual_knn_from_gram` (``rankings=``).
    """

    def __init__(self, order: np.ndarray) -> None:
        order = np.asarray(order)
        n = order.shape[0]
        if order.ndim != 2 or order.shape[1] != n - 1 or not np.issubdtype(order.dtype, np.integer):
            raise ValueError(
                f"a neighbour ranking is an integer (n, n - 1) array, got {order.dtype} "
                f"{order.shape}; build it with NeighbourRanking.from_gram(G)."
            )
        self.order = order
        self.order.flags.writeable = False

    @property
    def n(self) -> int:
        """Number of stimuli of the Gram the ranking was built from."""
        return self.order.shape[0]

    @classmethod
    def from_gram(cls, G: np.ndarray) -> NeighbourRanking:
        """The ranking of an (n, n) Gram matrix (finite, any float dtype); int16 when n ≤ 32768."""
        G = _sub_gram(check_square(G, "G"), None)
        n = G.shape[0]
        keys = np.negative(G)
        np.fill_diagonal(keys, np.inf)  # self last, then cut off
        order = np.argsort(keys, axis=1, kind="stable")[:, : n - 1]
        return cls(order.astype(np.int16 if n <= 2**15 else np.int32))

    def top_k(self, subset: np.ndarray, k: int) -> np.ndarray:
        """(s, k) positions within ``subset`` (sorted, distinct) of each member's k neighbours.

        Reads the first L ≈ 2·k·n/s entries of each member's order, keeps those in the subset and
        widens L (×4) for the rows that found fewer than k.
        """
        n, s = self.n, subset.shape[0]
        position = np.full(n, -1, dtype=np.int64)
        position[subset] = np.arange(s)
        out = np.empty((s, k), dtype=np.int64)
        rows = np.arange(s)
        width = min(n - 1, 2 * k * (n - 1) // (s - 1) + 8)
        while rows.size:
            prefix = position[self.order[subset[rows], :width]]  # (r, width), -1 outside the subset
            hits = prefix >= 0
            found = np.cumsum(hits, axis=1)
            complete = found[:, -1] >= k
            take = hits[complete] & (found[complete] <= k)
            out[rows[complete]] = prefix[complete][take].reshape(-1, k)
            rows = rows[~complete]
            width = min(n - 1, 4 * width)
        return out


def _check_rankings(rankings: object, n: int) -> tuple[NeighbourRanking, NeighbourRanking]:
    if (
        not isinstance(rankings, tuple)
        or len(rankings) != 2
        or not all(isinstance(r, NeighbourRanking) for r in rankings)
    ):
        raise ValueError(
            "rankings must be a pair (ranking of K, ranking of L) of NeighbourRanking; build each "
            "with NeighbourRanking.from_gram on the same Gram matrix passed in."
        )
    if any(r.n != n for r in rankings):
        raise ValueError(
            f"the rankings cover {rankings[0].n} and {rankings[1].n} stimuli but the Grams {n}; "
            "build them from these Gram matrices."
        )
    return rankings


def _sorted_keys(rows: np.ndarray, cols: np.ndarray, s: int) -> np.ndarray:
    """Sorted flat keys rows·s + cols of a mask's entries."""
    return np.sort(rows * s + cols)


def _contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Whether each query key is in ``sorted_keys`` (binary search)."""
    at = np.searchsorted(sorted_keys, queries)
    return sorted_keys[np.minimum(at, sorted_keys.size - 1)] == queries


def _masked_hsic(
    s: int,
    rows: np.ndarray,
    cols: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    b_transposed: np.ndarray,
) -> float:
    """Unbiased HSIC of (M∘K, M∘L) for a 0/1 mask M on s stimuli without diagonal entries.

    Args:
        rows, cols: the mask entries (i, j).
        a, b: float64 K_ij and L_ij at the entries.
        b_transposed: float64 L_ji where (j, i) is also a mask entry, else 0.
    """
    trace_term = float(np.dot(a, b_transposed))  # Σ_ij A_ij B_ji
    sum_a = float(a.sum())
    sum_b = float(b.sum())
    col_sums_a = np.bincount(cols, weights=a, minlength=s)
    row_sums_b = np.bincount(rows, weights=b, minlength=s)
    product_term = float(np.dot(col_sums_a, row_sums_b))
    value = trace_term + sum_a * sum_b / ((s - 1) * (s - 2)) - 2.0 * product_term / (s - 2)
    return value / (s * (s - 3))


def _cknna_from_neighbours(
    top_k: np.ndarray, top_l: np.ndarray, K_at: Callable, L_at: Callable
) -> float:
    """CKNNA from the two (s, k) neighbour tables (positions within the subset).

    ``K_at(i, j)`` / ``L_at(i, j)`` return the float64 kernel values at positions (i, j).
    """
    s, k = top_k.shape
    rows = np.arange(s, dtype=np.int64).repeat(k)
    cols_k, cols_l = top_k.ravel(), top_l.ravel()
    keys_k, keys_l = _sorted_keys(rows, cols_k, s), _sorted_keys(rows, cols_l, s)
    terms = []
    for cols, keys, at in ((cols_k, keys_k, K_at), (cols_l, keys_l, L_at)):
        values = at(rows, cols)
        transposed_in = _contains(keys, cols * s + rows)
        terms.append(
            _masked_hsic(s, rows, cols, values, values, np.where(transposed_in, at(cols, rows), 0.0))
        )
    # mutual mask M = M_K ∘ M_L: the K-mask entries that are also L-mask entries
    mutual = _contains(keys_l, rows * s + cols_k)
    rows_m, cols_m = rows[mutual], cols_k[mutual]
    transposed_m = cols_m * s + rows_m
    transposed_in = _contains(keys_k, transposed_m) & _contains(keys_l, transposed_m)
    sim_kl = _masked_hsic(
        s, rows_m, cols_m, K_at(rows_m, cols_m), L_at(rows_m, cols_m),
        np.where(transposed_in, L_at(cols_m, rows_m), 0.0),
    )
    product = terms[0] * terms[1]
    if product < 0:
        # the reference takes sqrt of a negative number here and returns NaN
        return float("nan")
    return sim_kl / (np.sqrt(product) + CKNNA_EPSILON)


def _mutual_knn_from_neighbours(top_k: np.ndarray, top_l: np.ndarray) -> float:
    """Mean over stimuli of |knn_K(i) ∩ knn_L(i)| / k from the two (s, k) neighbour tables."""
    s, k = top_k.shape
    rows = np.arange(s, dtype=np.int64).repeat(k)
    shared = np.count_nonzero(
        _contains(_sorted_keys(rows, top_l.ravel(), s), rows * s + top_k.ravel())
    )
    return int(shared) / (s * k)


def _cknna_from_subgrams(K: np.ndarray, L: np.ndarray, k: int) -> float:
    """CKNNA of two (s, s) Gram matrices (already validated, s ≥ 4, 2 ≤ k ≤ s − 1)."""
    return _cknna_from_neighbours(
        _top_k_excluding_self(K, k),
        _top_k_excluding_self(L, k),
        lambda i, j: K[i, j].astype(np.float64),
        lambda i, j: L[i, j].astype(np.float64),
    )


def _mutual_knn_from_subgrams(K: np.ndarray, L: np.ndarray, k: int) -> float:
    """Mean over stimuli of |knn_K(i) ∩ knn_L(i)| / k for two (s, s) Gram matrices."""
    return _mutual_knn_from_neighbours(_top_k_excluding_self(K, k), _top_k_excluding_self(L, k))


def _neighbour_tables(
    K: object, L: object, k: int, subset: object, rankings: object, min_k: int
) -> tuple[np.ndarray, np.ndarray, Callable, Callable]:
    """Validated inputs → the two (s, k) neighbour tables and float64 value getters.

    The subset is sorted first (the metrics do not depend on the order), so the sub-Gram tie rule
    "lower position first" is "lower stimulus index first", the ranking's rule.
    """
    K = check_square(K, "K")
    L = check_square(L, "L")
    if K.shape != L.shape:
        raise ValueError(
            f"K has shape {K.shape} but L has {L.shape}; both Gram matrices must cover the same "
            "stimuli in the same order."
        )
    n = K.shape[0]
    idx = np.arange(n) if subset is None else np.sort(check_indices(subset, n))
    s = idx.size
    if min_k == 2:
        check_min_stimuli(s, 4, "CKNNA (unbiased HSIC)")
    k = check_k(k, s, min_k)
    if rankings is None:
        rows = None if subset is None else idx
        K_sub, L_sub = _sub_gram(K, rows), _sub_gram(L, rows)
        return (
            _top_k_excluding_self(K_sub, k),
            _top_k_excluding_self(L_sub, k),
            lambda i, j: K_sub[i, j].astype(np.float64),
            lambda i, j: L_sub[i, j].astype(np.float64),
        )
    rank_k, rank_l = _check_rankings(rankings, n)
    top_k, top_l = rank_k.top_k(idx, k), rank_l.top_k(idx, k)

    def getter(G: np.ndarray) -> Callable:
        def at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            values = G[idx[i], idx[j]].astype(np.float64)
            if not np.isfinite(values).all():
                _sub_gram(values, None)  # raises the NaN/Inf error
            return values

        return at

    return top_k, top_l, getter(K), getter(L)


def cknna_from_gram(
    K: np.ndarray,
    L: np.ndarray,
    k: int = 10,
    subset: object = None,
    *,
    rankings: tuple[NeighbourRanking, NeighbourRanking] | None = None,
) -> float:
    """CKNNA of a stimulus subset from the Gram matrices of the full set.

    Equals ``alignment.cknna(F_x[subset], F_y[subset], k)`` for K = F_x F_xᵀ, L = F_y F_yᵀ.

    Args:
        K, L: (n, n) Gram matrices (float32 is fine; computed in float64).
        k: neighbours per stimulus, 2 ≤ k ≤ s − 1 (s = subset size).
        subset: indices into the n stimuli (None = all), any order; at least 4 (unbiased HSIC).
        rankings: optional ``(NeighbourRanking.from_gram(K), NeighbourRanking.from_gram(L))``;
            then only the O(k·n) neighbour entries are read instead of the (s, s) sub-Grams.
            Same result (same neighbours, ties by the lower stimulus index).

    Returns:
        CKNNA as a float (NaN if a self-HSIC estimate is negative, as in the reference).
    """
    top_k, top_l, K_at, L_at = _neighbour_tables(K, L, k, subset, rankings, 2)
    return _cknna_from_neighbours(top_k, top_l, K_at, L_at)


def mutual_knn_from_gram(
    K: np.ndarray,
    L: np.ndarray,
    k: int = 10,
    subset: object = None,
    *,
    rankings: tuple[NeighbourRanking, NeighbourRanking] | None = None,
) -> float:
    """Mutual k-NN alignment of a stimulus subset from the Gram matrices of the full set.

    Equals ``alignment.mutual_knn(F_x[subset], F_y[subset], k)``.

    Args:
        K, L: (n, n) Gram matrices.
        k: neighbours per stimulus, 1 ≤ k ≤ s − 1.
        subset: indices into the n stimuli (None = all).
        rankings: optional precomputed rankings, as in :func:`cknna_from_gram`.

    Returns:
        Mean fraction of shared neighbours, in [0, 1].
    """
    top_k, top_l, _, _ = _neighbour_tables(K, L, k, subset, rankings, 1)
    return _mutual_knn_from_neighbours(top_k, top_l)


# ----------------------------------------------------------------------------------------------
# many subsets at once

#: Upper bound on elements of one stacked (chunk, s, s) array (~8 MB float64): bounds memory,
#: and chunks that stay near the CPU caches ran Fig. 2 ~1.7x faster than 32 MB ones (239 stimuli).
_CHUNK_ELEMENTS = 1_000_000


def _stack(gram: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
    """(B, s, s) float64 sub-Grams ``gram[subset][:, subset]``, the diagonal set to -inf.

    ``flat_index`` (B, s, s) holds ``subset[i] * n + subset[j]`` (shared by every model).
    The diagonal is -inf so a stimulus is never its own neighbour; it is never read otherwise.
    """
    blocks = np.take(np.asarray(gram, dtype=np.float64).ravel(), flat_index)
    diagonal = np.arange(blocks.shape[-1])
    blocks[:, diagonal, diagonal] = -np.inf
    return blocks


def _knn_mask(blocks: np.ndarray, k: int) -> np.ndarray:
    """(B, s, s) bool: True at (b, i, j) when j is among the k most similar others of i in block b.

    Fast path: compare with each row's k-th largest value (one ``np.partition``). A row with
    exactly tied values at the threshold would get more than k neighbours; such blocks are redone
    with ``argpartition``, which keeps exactly k (ties broken arbitrarily, as the reference does).
    """
    s = blocks.shape[-1]
    threshold = np.partition(blocks, s - k, axis=-1)[..., s - k : s - k + 1]
    mask = blocks >= threshold
    tied = np.flatnonzero((mask.sum(axis=-1) != k).any(axis=-1))
    if tied.size:
        neighbours = np.argpartition(-blocks[tied], k - 1, axis=-1)[..., :k]
        exact = np.zeros((tied.size, s, s), dtype=bool)
        np.put_along_axis(exact, neighbours, True, axis=-1)
        mask[tied] = exact
    return mask


def _hsic_unbiased_blocks(
    n_blocks: int,
    s: int,
    position: np.ndarray,
    transposed: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    b_transposed: np.ndarray,
) -> np.ndarray:
    """(n_blocks,) unbiased HSIC of masked kernels A, B (s, s) per block, given by their entries.

    A and B are zero outside a common support of off-diagonal entries, listed as flat positions
    ``position`` = block·s² + i·s + j with ``transposed`` = block·s² + j·s + i. ``a``, ``b`` are
    A_ij, B_ij there; ``b_transposed`` is B_ji (0 where (j, i) is not in the support). The formula
    is :func:`_masked_hsic`'s, each sum a float64 ``bincount`` over the blocks.
    """
    block = position // (s * s)
    trace_term = np.bincount(block, weights=a * b_transposed, minlength=n_blocks)
    sums_term = (
        np.bincount(block, weights=a, minlength=n_blocks)
        * np.bincount(block, weights=b, minlength=n_blocks)
        / ((s - 1) * (s - 2))
    )
    column_sums_a = np.bincount(transposed // s, weights=a, minlength=n_blocks * s)  # block·s + j
    row_sums_b = np.bincount(position // s, weights=b, minlength=n_blocks * s)  # block·s + i
    cross_term = 2.0 * (column_sums_a * row_sums_b).reshape(n_blocks, s).sum(axis=1) / (s - 2)
    return (trace_term + sums_term - cross_term) / (s * (s - 3))


class _Graph(NamedTuple):
    """One model's k-NN graph on a chunk of subsets, as flat entry lists."""

    values: np.ndarray  # (B·s·s,) sub-Gram entries, flat
    mask: np.ndarray  # (B·s·s,) bool, flat: j among the k nearest of i
    position: np.ndarray  # (E,) flat positions of the mask's True entries (E = B·s·k)
    transposed: np.ndarray  # (E,) the (j, i) position of each entry
    self_similarity: np.ndarray  # (B,) HSIC of the masked kernel with itself


def _graph(gram: np.ndarray, flat_index: np.ndarray, k: int) -> _Graph:
    n_blocks, s, _ = flat_index.shape
    blocks = _stack(gram, flat_index)
    mask = _knn_mask(blocks, k).ravel()
    values = blocks.ravel()
    position = np.flatnonzero(mask)
    within = position % (s * s)
    transposed = position - within + (within % s) * s + within // s
    a = values[position]
    a_transposed = np.where(mask[transposed], values[transposed], 0.0)
    similarity = _hsic_unbiased_blocks(n_blocks, s, position, transposed, a, a, a_transposed)
    return _Graph(values, mask, position, transposed, similarity)


def _pair_similarity(x: _Graph, y: _Graph, n_blocks: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(HSIC of the mutual-neighbour kernels (B,), mutual neighbour count (B,))."""
    mutual = y.mask[x.position]
    position, transposed = x.position[mutual], x.transposed[mutual]
    in_support_transposed = x.mask[transposed] & y.mask[transposed]
    b_transposed = np.where(in_support_transposed, y.values[transposed], 0.0)
    similarity = _hsic_unbiased_blocks(
        n_blocks, s, position, transposed, x.values[position], y.values[position], b_transposed
    )
    counts = np.bincount(position // (s * s), minlength=n_blocks)
    return similarity, counts


def subset_alignment(
    grams: Mapping[Hashable, np.ndarray],
    pairs: Sequence[tuple[Hashable, Hashable]],
    subsets: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """CKNNA and mutual k-NN of every pair of Grams on every subset.

    The numbers of :func:`cknna_from_gram` / :func:`mutual_knn_from_gram` on each subset (tested to
    1e-9), computed for all subsets and pairs together.

    Args:
        grams: ``{key: (n, n) Gram}`` holding every key named in ``pairs`` (any float dtype).
        pairs: ``(key of K, key of L)`` per comparison.
        subsets: (B, s) int row indices; each row is one subset of distinct stimuli, s >= 4.
        k: neighbours per stimulus, 1 <= k < s.

    Returns:
        ``(cknna, mutual_knn)``, each (len(pairs), B) float64, rows in the order of ``pairs``
        (CKNNA is NaN where a self-HSIC estimate is negative, as in the reference).
    """
    subsets = np.asarray(subsets, dtype=np.intp)
    if subsets.ndim != 2 or subsets.shape[0] == 0:
        raise ValueError(
            f"subsets must be a non-empty (B, s) array of row indices, got shape {subsets.shape}; "
            "stack one row of indices per subset"
        )
    n_sets, s = subsets.shape
    check_min_stimuli(s, 4, "CKNNA (unbiased HSIC)")
    k = check_k(k, s, 1)
    cknna = np.empty((len(pairs), n_sets))
    mutual_knn = np.empty((len(pairs), n_sets))
    keys = list(dict.fromkeys(key for pair in pairs for key in pair))
    chunk = max(1, _CHUNK_ELEMENTS // (s * s))
    n = np.shape(grams[keys[0]])[0] if keys else 0
    for start in range(0, n_sets, chunk):
        block = subsets[start : start + chunk]
        stop = start + block.shape[0]
        flat_index = block[:, :, None] * n + block[:, None, :]
        graphs = {key: _graph(grams[key], flat_index, k) for key in keys}
        for p, (x_key, y_key) in enumerate(pairs):
            x, y = graphs[x_key], graphs[y_key]
            similarity, counts = _pair_similarity(x, y, block.shape[0], s)
            product = x.self_similarity * y.self_similarity
            root = np.sqrt(np.where(product < 0, np.nan, product))
            cknna[p, start:stop] = similarity / (root + CKNNA_EPSILON)
            mutual_knn[p, start:stop] = counts / (s * k)
    return cknna, mutual_knn
