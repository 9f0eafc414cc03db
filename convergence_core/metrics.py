"""The alignment metric registry: every representational-alignment metric once, by name.

``measure(name, X, Y, **options) -> float`` computes a metric on paired features (row i of X and Y
is stimulus i); ``metric_names()`` lists the names; ``metric(name)`` returns its typed entry
(:class:`Metric`: the plain function, the options it takes, its range, its invariances, whether it
is a neighbour metric and whether it is fast enough for the live Alignment lab).

Names and numbers are those of minyoungg/platonic-rep ``metrics.py`` (``AlignmentMetrics``) on the
same float64 inputs (tested to |Δ| ≤ 1e-6), with these documented differences:

* ``lcs_knn`` returns the mean longest-common-subsequence length **divided by k** (in [0, 1], like
  every other neighbour metric); ``normalise=False`` returns the reference's scale (mean length,
  in [0, k]).
* ``svcca`` uses an exact truncated SVD where the reference uses ``torch.svd_lowrank(q=cca_dim)``
  (randomized: no oversampling, two power iterations, so its value depends on torch's seed).
  With the reference's SVD made exact the two agree to ~4e-7 (its iterative sklearn CCA adds no
  more); as it stands, to ~1e-9 where the top ``cca_dim`` singular values stand clear of the
  rest, and by up to ~0.2 where the spectrum has no gap there (the reference lower, and varying by
  ~0.1 between its own seeds).
* Neighbours: exact ties go to the lower index (the reference's ``argsort``/``topk`` leave them
  unspecified, and differ from each other); continuous features have no ties. With exact ties
  (duplicate stimuli) the neighbour metrics differ from the reference's by the tie order, and a
  permutation of the stimuli can change them: their stimulus-permutation invariance holds for
  features without ties. A point is never its own neighbour here; the reference masks the
  diagonal with −1e8, so where every other inner product of a row is below that (norms ≳ 1e4,
  which ``measure`` accepts: it does not normalise) it lists the point itself.
* The kernel option is ``kernel="linear" | "rbf"`` (the reference's ``kernel_metric="ip"`` is
  accepted as ``"linear"``) and ``sigma`` (the reference's ``rbf_sigma``); k is ``k`` (``topk``).

Two forms, for the subset engine
--------------------------------
*Neighbour metrics* (cknna, mutual_knn, cycle_knn, lcs_knn, edit_distance_knn) are functions of the
two neighbour tables of a set of s stimuli: ``table[i]`` lists the positions (0..s−1, within the
set) of stimulus i's k most similar *other* stimuli by inner product, MOST SIMILAR FIRST, exact
ties to the lower position (:func:`nearest_neighbours` builds one from features, blockwise). Order
matters for lcs_knn and edit_distance_knn only. CKNNA also needs the kernel values at the table
entries: ``x_at``/``y_at`` are either callables ``at(i, j)`` returning float64 inner products at
arrays of positions (called only at table entries (i, table[i, m]); a batched call passes
``at(b, i, j)``) or arrays of those values shaped like the tables (``NeighbourTable.values``). The
kernels are inner products, hence symmetric: K[j, i] is read from row j's entry when i is in j's
table. Every ``*_from_tables`` function accepts one set, tables (s, k), and returns a float, or B
sets at once, tables (B, s, k), and returns (B,) float64 — the batched form is what makes 200
random sets fast. Cost: O(B·s·k·log(B·s·k)) (lcs/edit: O(B·s·k²)); nothing (s, s) is formed.

*Feature metrics* (cka, unbiased_cka, svcca) are functions of the set's (s, d_x), (s, d_y)
features. Linear CKA (biased or unbiased HSIC) never forms an (s, s) matrix when that is the
larger work: it uses ‖X̃ᵀỸ‖²_F of the centered features (O(s·d²), column blocks of ≤ 4M floats)
when s·(d_x+d_y) exceeds d_x²+d_y²+d_x·d_y, and the (s, s) Grams otherwise (small s). RBF CKA
needs every pairwise distance: O(s²·d) time, formed in row blocks (O(block·s) memory).
:func:`cka_from_kernels` takes precomputed (s, s) or (B, s, s) kernels (e.g. sub-Grams of a
small run) for many sets at once. SVCCA standardises each feature, keeps the top ``cca_dim``
left singular vectors (exact, from ``eigh`` of the smaller of A Aᵀ and AᵀA) and averages the
canonical correlations of the two subspaces (the singular values of U_xᵀU_y).

HSIC formulas (one copy each, used by :mod:`.alignment` too): with Ã, B̃ the kernels with zeroed
diagonals (Song et al. 2012, eq. 5),

    HSIC_u(A, B) = [ Σ Ã∘B̃ᵀ + ΣÃ·ΣB̃ / ((n−1)(n−2)) − 2 Σ(Ã B̃) / (n−2) ] / (n(n−3)),
    HSIC_b(A, B) = trace(A H B H) = Σ A∘B − (2/n) (A1)·(B1) + ΣA·ΣB / n²   (A, B symmetric),

and every CKA-like score is HSIC(K, L) / (sqrt(HSIC(K, K)·HSIC(L, L)) + 1e-6) (NaN when the
product is negative, as the reference's sqrt gives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from .validation import (
    check_features,
    check_k,
    check_min_stimuli,
    check_pair,
    product_rounding,
)

#: added to every CKA-like denominator, as in the reference implementation
EPSILON = 1e-6

#: elements of one temporary block (rows × stimuli, or feature × feature): ~32 MB float64
_BLOCK_ELEMENTS = 4_000_000
#: largest s for which linear CKA may form (s, s) Grams (when that is the cheaper route)
_MAX_GRAM_STIMULI = 4096


# ----------------------------------------------------------------------------------------------
# the HSIC formulas
def unbiased_hsic_from_sums(
    n: int, trace_term: Any, sum_a: Any, sum_b: Any, cross_term: Any
) -> Any:
    """The unbiased HSIC estimator from its four sums (scalars or arrays, elementwise), n ≥ 4.

    ``trace_term`` = Σ Ã∘B̃ᵀ, ``sum_a`` = ΣÃ, ``sum_b`` = ΣB̃, ``cross_term`` = Σ(Ã B̃)
    (= column sums of Ã · row sums of B̃), Ã, B̃ the kernels with zeroed diagonals.
    """
    value = trace_term + sum_a * sum_b / ((n - 1) * (n - 2)) - 2.0 * cross_term / (n - 2)
    return value / (n * (n - 3))


def biased_hsic_from_sums(n: int, trace_term: Any, sum_a: Any, sum_b: Any, cross_term: Any) -> Any:
    """trace(A H B H) of symmetric (n, n) kernels from Σ A∘B, ΣA, ΣB and (A1)·(B1)."""
    return trace_term - 2.0 * cross_term / n + sum_a * sum_b / (n * n)


def normalised_alignment(kl: Any, kk: Any, ll: Any) -> Any:
    """kl / (sqrt(kk·ll) + 1e-6); NaN where kk·ll < 0 (scalars or arrays)."""
    product = np.asarray(kk * ll, dtype=np.float64)
    root = np.sqrt(np.where(product < 0, np.nan, product))
    value = kl / (root + EPSILON)
    return float(value) if np.ndim(value) == 0 else value


# ----------------------------------------------------------------------------------------------
# neighbour tables
class NeighbourTable(NamedTuple):
    """Each stimulus's k most similar other stimuli by inner product, most similar first.

    ``indices`` (s, k) int64 positions within the set (self excluded; exact ties: lower position
    first); ``values`` (s, k) float64 inner products at those entries.
    """

    indices: np.ndarray
    values: np.ndarray


def nearest_neighbours(F: object, k: int = 10) -> NeighbourTable:
    """The neighbour table of features F (s, d) by inner product, computed in row blocks.

    Memory O(block·s) (blocks of ≤ 4M inner products), time O(s²·d). 1 ≤ k ≤ s − 1.
    """
    F = check_features(F, "F", min_rows=2)
    s = F.shape[0]
    k = check_k(k, s, 1)
    indices = np.empty((s, k), dtype=np.int64)
    values = np.empty((s, k), dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // s)
    norms = np.sqrt(np.einsum("ij,ij->i", F, F))
    for start in range(0, s, block):
        stop = min(s, start + block)
        indices[start:stop], values[start:stop] = neighbours_of_rows(
            F, np.arange(start, stop), k, norms=norms
        )
    return NeighbourTable(indices, values)


def neighbours_of_rows(
    F: np.ndarray, rows: np.ndarray, k: int, *, norms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of F's rows (s, d) to each of F's rows ``rows`` (r,), by inner product, own
    row excluded: (positions (r, k) int64, values (r, k) float64), value descending, ties to the
    lower position. One product of r × s (the caller blocks); F float64, checked by the caller;
    ``norms``: F's row norms, when at hand.

    An exact tie is a tie. A matrix product may score a row and its exact duplicate an ulp apart
    and break their tie by noise; so rows where rounding could decide (two of the k within
    rounding of each other, or more than k within rounding of the k-th) are decided again on
    values computed one product at a time (einsum: identical rows get identical values), as the
    subset engine decides them (``neighbours._refine``). The other rows keep the product's order
    and values.
    """
    rows = np.asarray(rows, dtype=np.int64)
    norms = np.sqrt(np.einsum("ij,ij->i", F, F)) if norms is None else norms
    here = np.arange(rows.size)
    # a run of rows as a view of F: a whole set times itself then takes BLAS's syrk (half the
    # work of a general product: 66 against 119 ms for 2,000 × 768)
    whole = rows.size and rows[-1] - rows[0] + 1 == rows.size and (np.diff(rows) == 1).all()
    G = (F[rows[0] : rows[-1] + 1] if whole else F[rows]) @ F.T
    G[here, rows] = -np.inf
    top = np.argpartition(-G, k - 1, axis=1)[:, :k]
    top_values = np.take_along_axis(G, top, axis=1)
    order = np.lexsort((top, -top_values), axis=1)  # value descending, then position
    top = np.take_along_axis(top, order, axis=1)
    top_values = np.take_along_axis(top_values, order, axis=1)
    # BLAS's ulps per pair, so that one row of a huge norm widens no other pair's band: rows are
    # screened with their widest allowance, then banded pair by pair
    widest = product_rounding(F.shape[1], norms[rows] * norms.max())
    close = (np.diff(top_values, axis=1) >= -widest[:, None]).any(axis=1)
    boundary = np.count_nonzero(G >= (top_values[:, -1] - widest)[:, None], axis=1) > k
    for row in np.flatnonzero(close | boundary):
        allowance = product_rounding(F.shape[1], norms[rows[row]] * norms)
        candidates = np.flatnonzero(G[row] >= top_values[row, -1] - allowance)
        candidates = candidates[candidates != rows[row]]  # an overflowing allowance took it in
        if candidates.size > F.shape[0] // 4:  # many ties (constant features): no gathered copy
            exact = np.einsum("cd,d->c", F, F[rows[row]])[candidates]
        else:
            exact = np.einsum("cd,d->c", F[candidates], F[rows[row]])
        best = np.lexsort((candidates, -exact))[:k]
        top[row], top_values[row] = candidates[best], exact[best]
    return top, top_values


def permute_table(table: object, permutation: object) -> np.ndarray:
    """The neighbour table of the same features with rows reordered: row p of the new set is row
    ``permutation[p]`` of the old one (Y' = Y[permutation]).

    ``table`` (s, k) or (B, s, k); ``permutation`` (s,) or (B, s). Entry m of new row p is the new
    position of the old row's m-th neighbour (order kept). Used for shuffled-pairing nulls on
    tables; exact ties may then break differently than a fresh :func:`nearest_neighbours` would.
    """
    table = np.asarray(table)
    permutation = np.asarray(permutation, dtype=np.int64)
    if table.ndim not in (2, 3) or permutation.shape != table.shape[:-1]:
        raise ValueError(
            f"permute_table needs a table (s, k) or (B, s, k) and a permutation (s,) or (B, s) "
            f"matching it; got {table.shape} and {permutation.shape}."
        )
    s = table.shape[-2]
    if not np.array_equal(
        np.sort(permutation, axis=-1), np.broadcast_to(np.arange(s), permutation.shape)
    ):
        raise ValueError("permutation must hold each position 0..s-1 exactly once (per set).")
    inverse = np.argsort(permutation, axis=-1)
    if table.ndim == 2:
        return inverse[table[permutation]]
    gathered = np.take_along_axis(table, permutation[:, :, None], axis=1)  # rows reordered
    return np.take_along_axis(inverse, gathered.reshape(len(table), -1), axis=1).reshape(
        table.shape
    )


def _check_table(name: str, table: object, minimum_k: int) -> np.ndarray:
    """One validated neighbour table as int64 (B, s, k) (a 2-D (s, k) table gets B = 1)."""
    array = np.asarray(table)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be an integer neighbour table (s, k) or (B, s, k), got {array.dtype} "
            f"{array.shape}; build it with nearest_neighbours(F, k).indices."
        )
    table = array.astype(np.int64, copy=False)
    if table.ndim == 2:
        table = table[None]
    _, s, k = table.shape
    check_k(k, s, minimum_k)
    if table.min(initial=0) < 0 or table.max(initial=0) >= s:
        raise ValueError(
            f"{name} holds positions outside 0..{s - 1}; positions are within the set."
        )
    if np.any(table == np.arange(s)[:, None]):
        raise ValueError(
            f"{name} lists a stimulus as its own neighbour; exclude self from the table."
        )
    ordered = np.sort(table, axis=-1)
    if np.any(ordered[..., 1:] == ordered[..., :-1]):
        raise ValueError(
            f"{name} repeats a neighbour within a row; each row needs k distinct others."
        )
    return table


def _check_same_shape(shape_x: tuple[int, ...], shape_y: tuple[int, ...]) -> None:
    if shape_x != shape_y:
        raise ValueError(
            f"table_x has shape {shape_x} but table_y {shape_y}; both must list k neighbours of "
            "the same s stimuli (same k in both)."
        )


def _check_tables(
    table_x: object, table_y: object, minimum_k: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated tables as int64 (B, s, k) and whether the input was batched (3-D)."""
    _check_same_shape(np.shape(table_x), np.shape(table_y))
    tx = _check_table("table_x", table_x, minimum_k)
    ty = _check_table("table_y", table_y, minimum_k)
    return tx, ty, np.ndim(table_x) == 3


def _result(values: np.ndarray, batched: bool) -> float | np.ndarray:
    return values if batched else float(values[0])


def knn_overlap_per_stimulus(table_x: object, table_y: object) -> np.ndarray:
    """|knn_X(i) ∩ knn_Y(i)| / k for every stimulus: (s,) or (B, s) float64 (order ignored)."""
    from .neighbour_kernels import overlap_counts

    tx, ty, batched = _check_tables(table_x, table_y, 1)
    B, s, k = tx.shape
    overlap = overlap_counts(*_flat_int32(tx, ty), s).reshape(B, s) / k
    return overlap if batched else overlap[0]


def mutual_knn_from_tables(table_x: object, table_y: object) -> float | np.ndarray:
    """Mutual k-NN: mean over stimuli of |knn_X(i) ∩ knn_Y(i)| / k (reference ``mutual_knn``)."""
    overlap = knn_overlap_per_stimulus(table_x, table_y)
    return float(overlap.mean()) if overlap.ndim == 1 else overlap.mean(axis=-1)


def cycle_knn_from_tables(table_x: object, table_y: object) -> float | np.ndarray:
    """Cycle k-NN: fraction of stimuli i found among the X-neighbours of some Y-neighbour of i.

    The reference's ``compute_knn_accuracy(knn_A[knn_B])`` with A = X, B = Y; not symmetric.
    """
    from .neighbour_kernels import cycle_hits

    tx, ty, batched = _check_tables(table_x, table_y, 1)
    B, s, k = tx.shape
    hit = cycle_hits(*_flat_int32(tx, ty), s).reshape(B, s)
    return _result(hit.mean(axis=-1), batched)


def _flat_int32(*tables: np.ndarray) -> list[np.ndarray]:
    """Validated (B, s, k) tables as contiguous (B·s, k) int32, as the compiled loops read them."""
    return [np.ascontiguousarray(t.reshape(-1, t.shape[-1]), dtype=np.int32) for t in tables]


def _row_chunks(rows: int, k: int) -> range:
    return range(0, rows, max(1, _BLOCK_ELEMENTS // (k * k)))


def _longest_common_subsequence(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LCS length of each pair of rows of x, y (R, k): the classic DP, vectorised over rows."""
    R, k = x.shape
    out = np.empty(R, dtype=np.int64)
    for start in _row_chunks(R, k):
        stop = min(R, start + max(1, _BLOCK_ELEMENTS // (k * k)))
        xs, ys = x[start:stop], y[start:stop]
        equal = xs[:, :, None] == ys[:, None, :]
        previous = np.zeros((stop - start, k + 1), dtype=np.int64)
        for p in range(k):
            current = np.zeros_like(previous)
            for q in range(k):
                current[:, q + 1] = np.where(
                    equal[:, p, q],
                    previous[:, q] + 1,
                    np.maximum(previous[:, q + 1], current[:, q]),
                )
            previous = current
        out[start:stop] = previous[:, k]
    return out


def _edit_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Levenshtein distance (insert, delete, substitute: cost 1) of each pair of rows of x, y."""
    R, k = x.shape
    out = np.empty(R, dtype=np.int64)
    for start in _row_chunks(R, k):
        stop = min(R, start + max(1, _BLOCK_ELEMENTS // (k * k)))
        xs, ys = x[start:stop], y[start:stop]
        equal = xs[:, :, None] == ys[:, None, :]
        previous = np.broadcast_to(np.arange(k + 1, dtype=np.int64), (stop - start, k + 1)).copy()
        for p in range(k):
            current = np.empty_like(previous)
            current[:, 0] = p + 1
            for q in range(k):
                current[:, q + 1] = np.where(
                    equal[:, p, q],
                    previous[:, q],
                    1 + np.minimum(np.minimum(previous[:, q], previous[:, q + 1]), current[:, q]),
                )
            previous = current
        out[start:stop] = previous[:, k]
    return out


def lcs_knn_from_tables(
    table_x: object, table_y: object, *, normalise: bool = True
) -> float | np.ndarray:
    """Mean over stimuli of the longest common subsequence of the two ordered neighbour lists.

    ``normalise=True`` (default) divides by k (range [0, 1]); ``False`` returns the reference
    ``lcs_knn``'s scale (mean length, [0, k]).
    """
    tx, ty, batched = _check_tables(table_x, table_y, 1)
    B, s, k = tx.shape
    lengths = _longest_common_subsequence(tx.reshape(-1, k), ty.reshape(-1, k)).reshape(B, s)
    mean = lengths.mean(axis=-1)
    return _result(mean / k if normalise else mean, batched)


def edit_distance_knn_from_tables(table_x: object, table_y: object) -> float | np.ndarray:
    """1 − mean over stimuli of the edit (Levenshtein) distance of the ordered lists / k."""
    tx, ty, batched = _check_tables(table_x, table_y, 1)
    B, s, k = tx.shape
    distances = _edit_distance(tx.reshape(-1, k), ty.reshape(-1, k)).reshape(B, s)
    return _result(1.0 - distances.mean(axis=-1) / k, batched)


def _values_at(at: object, table: np.ndarray, batched: bool, name: str) -> np.ndarray:
    """Float64 kernel values at the (B, s, k) table entries from a getter or an array."""
    if callable(at):
        B, s, k = table.shape
        rows = np.repeat(np.arange(s, dtype=np.int64), k)
        if batched:
            blocks = np.repeat(np.arange(B, dtype=np.int64), s * k)
            values = at(blocks, np.tile(rows, B), table.ravel())
        else:
            values = at(rows, table[0].ravel())
        values = np.asarray(values, dtype=np.float64).reshape(table.shape)
    else:
        values = np.asarray(at, dtype=np.float64)
        if not batched:
            values = values[None]
        if values.shape != table.shape:
            raise ValueError(
                f"{name} has shape {values.shape[1:] if not batched else values.shape} but the "
                f"table {table.shape[1:] if not batched else table.shape}; pass the kernel values at "
                "the table entries (NeighbourTable.values) or a getter at(i, j)."
            )
    if not np.isfinite(values).all():
        raise ValueError(
            f"{name} holds NaN or Inf kernel values; recompute them from finite features."
        )
    return values


class CknnaSide(NamedTuple):
    """One model's half of CKNNA on a batch of sets: what depends on its table alone, computed
    once however many pairs the table is in (:func:`cknna_side`, :func:`cknna_from_sides`).

    Attributes:
        columns: (B·s, k) int32 each row's positions, in table order; values: (B·s, k)
            float64 the kernel values at them.
        back: (B·s, k) bool — whether entry (i, j) has the reciprocal entry (j, i);
            back_values: (B·s, k) float64 the kernel value there (0 where there is none).
        self_hsic: (B,) HSIC_u(M∘K, M∘K) of the table's own mask.
        shape: (B, s, k); batched: whether the table was given as (B, s, k).
    """

    columns: np.ndarray
    values: np.ndarray
    back: np.ndarray
    back_values: np.ndarray
    self_hsic: np.ndarray
    shape: tuple[int, int, int]
    batched: bool


def cknna_side(
    table: object, at: object, table_name: str = "table", values_name: str = "at"
) -> CknnaSide:
    """One model's half of CKNNA: its (s, k) or (B, s, k) neighbour table and the kernel values
    at its entries (an array shaped like the table, or a getter ``at(i, j)`` / ``at(b, i, j)``).

    The rows are read by :func:`.neighbour_kernels.cknna_side_sums`, a compiled loop (tested
    against the dense definition)."""
    from .neighbour_kernels import cknna_side_sums

    batched = np.ndim(table) == 3
    checked = _check_table(table_name, table, 2)
    B, s, k = checked.shape
    check_min_stimuli(s, 4, "CKNNA (unbiased HSIC)")
    values = _values_at(at, checked, batched, values_name)
    # int32 positions: half the bytes, so more of the table stays in cache for the look-ups
    columns = np.ascontiguousarray(checked.reshape(B * s, k), dtype=np.int32)
    values = np.ascontiguousarray(values.reshape(B * s, k), dtype=np.float64)
    back, back_values, trace, total, cross = cknna_side_sums(columns, values, s)
    self_hsic = unbiased_hsic_from_sums(s, trace, total, total, cross)
    return CknnaSide(columns, values, back, back_values, self_hsic, (B, s, k), batched)


def cknna_from_sides(x: CknnaSide, y: CknnaSide) -> float | np.ndarray:
    """CKNNA from the two models' halves (:func:`cknna_side`): the mutual-mask HSIC over the
    sides' own HSICs (see :func:`cknna_from_tables`), summed by the compiled
    :func:`.neighbour_kernels.cknna_cross_sums`."""
    from .neighbour_kernels import cknna_cross_sums

    _check_same_shape(x.shape, y.shape)
    if x.batched != y.batched:
        raise ValueError("one table is batched (B, s, k) and the other is not; pass both alike.")
    s = x.shape[1]
    sums = cknna_cross_sums(
        s, x.columns, x.values, x.back, y.columns, y.values, y.back, y.back_values
    )
    values = normalised_alignment(unbiased_hsic_from_sums(s, *sums), x.self_hsic, y.self_hsic)
    return _result(np.atleast_1d(values), x.batched)


def cknna_from_tables(
    table_x: object, table_y: object, x_at: object, y_at: object
) -> float | np.ndarray:
    """CKNNA from the two neighbour tables and the kernel values at their entries.

    With 0/1 masks M_K, M_L (row i has ones at table[i]) and M = M_K ∘ M_L:
    HSIC_u(M∘K, M∘L) / (sqrt(HSIC_u(M_K∘K, M_K∘K)·HSIC_u(M_L∘L, M_L∘L)) + 1e-6), the
    reference ``cknna`` (unbiased, distance-aware). s ≥ 4, 2 ≤ k ≤ s − 1. Not exactly symmetric in
    (X, Y) (the masked kernels are not symmetric), as in the reference.

    Args:
        table_x, table_y: (s, k) or (B, s, k) neighbour tables.
        x_at, y_at: getters ``at(i, j)`` (batched: ``at(b, i, j)``) of float64 inner products, or
            arrays of the values at the table entries, shaped like the tables.
    """
    _check_same_shape(np.shape(table_x), np.shape(table_y))
    return cknna_from_sides(
        cknna_side(table_x, x_at, "table_x", "x_at"), cknna_side(table_y, y_at, "table_y", "y_at")
    )


# ----------------------------------------------------------------------------------------------
# feature forms of the neighbour metrics
def _tables(
    X: object, Y: object, k: object, minimum_k: int
) -> tuple[NeighbourTable, NeighbourTable]:
    X, Y = check_pair(X, Y, min_rows=2)
    k = check_k(k, X.shape[0], minimum_k)
    return nearest_neighbours(X, k), nearest_neighbours(Y, k)


def cknna(X: object, Y: object, k: int = 10) -> float:
    """CKNNA of paired features X (s, d_x), Y (s, d_y) by inner product; s ≥ 4, 2 ≤ k ≤ s − 1."""
    X, Y = check_pair(X, Y)
    check_min_stimuli(X.shape[0], 4, "CKNNA (unbiased HSIC)")
    tx, ty = _tables(X, Y, k, 2)
    return cknna_from_tables(tx.indices, ty.indices, tx.values, ty.values)


def mutual_knn(X: object, Y: object, k: int = 10) -> float:
    """Mean over stimuli of |knn_X(i) ∩ knn_Y(i)| / k; neighbours by inner product, not self."""
    tx, ty = _tables(X, Y, k, 1)
    return mutual_knn_from_tables(tx.indices, ty.indices)


def cycle_knn(X: object, Y: object, k: int = 10) -> float:
    """Fraction of stimuli that are among the X-neighbours of one of their own Y-neighbours."""
    tx, ty = _tables(X, Y, k, 1)
    return cycle_knn_from_tables(tx.indices, ty.indices)


def lcs_knn(X: object, Y: object, k: int = 10, *, normalise: bool = True) -> float:
    """Mean longest common subsequence of the ordered k-NN lists, / k unless ``normalise=False``."""
    tx, ty = _tables(X, Y, k, 1)
    return lcs_knn_from_tables(tx.indices, ty.indices, normalise=normalise)


def edit_distance_knn(X: object, Y: object, k: int = 10) -> float:
    """1 − mean edit distance of the ordered k-NN lists / k."""
    tx, ty = _tables(X, Y, k, 1)
    return edit_distance_knn_from_tables(tx.indices, ty.indices)


# ----------------------------------------------------------------------------------------------
# CKA
class _KernelSums(NamedTuple):
    """What every HSIC of two symmetric (n, n) kernels K, L needs, off the diagonal and on it.

    Off-diagonal sums are accumulated directly where the kernel is formed (Gram route, RBF), so
    the unbiased HSIC (which drops the diagonal) does not subtract a large diagonal from them.
    """

    n: int
    kl: float  # Σ_{i≠j} K∘L
    kk: float  # Σ_{i≠j} K∘K
    ll: float  # Σ_{i≠j} L∘L
    rows_k: np.ndarray  # off-diagonal row sums of K
    rows_l: np.ndarray
    diagonal_k: np.ndarray
    diagonal_l: np.ndarray


def _squared_cross_norm(A: np.ndarray, B: np.ndarray) -> float:
    """‖AᵀB‖²_F in column blocks of B (never more than ~4M floats at once)."""
    block = max(1, _BLOCK_ELEMENTS // A.shape[1])
    return float(sum(np.sum((A.T @ B[:, j : j + block]) ** 2) for j in range(0, B.shape[1], block)))


def _off_diagonal_sums(
    n: int, kernels: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
) -> _KernelSums:
    """Sums of two symmetric kernels formed in row blocks by ``kernels(start, stop)``."""
    kl = kk = ll = 0.0
    rows_k, rows_l = np.empty(n), np.empty(n)
    diagonal_k, diagonal_l = np.empty(n), np.empty(n)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n, block):
        stop = min(n, start + block)
        local = np.arange(stop - start)
        Kb, Lb = kernels(start, stop)
        diagonal_k[start:stop], diagonal_l[start:stop] = (
            Kb[local, start + local],
            Lb[local, start + local],
        )
        Kb[local, start + local] = 0.0
        Lb[local, start + local] = 0.0
        kl += float(np.sum(Kb * Lb))
        kk += float(np.sum(Kb * Kb))
        ll += float(np.sum(Lb * Lb))
        rows_k[start:stop], rows_l[start:stop] = Kb.sum(axis=1), Lb.sum(axis=1)
    return _KernelSums(n, kl, kk, ll, rows_k, rows_l, diagonal_k, diagonal_l)


def _linear_sums(X: np.ndarray, Y: np.ndarray) -> _KernelSums:
    """Sums of the linear kernels of the *centered* features (HSIC is translation-invariant)."""
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    s, dx = X.shape
    dy = Y.shape[1]
    if s <= _MAX_GRAM_STIMULI and s * (dx + dy) <= dx * dx + dy * dy + dx * dy:
        return _off_diagonal_sums(s, lambda a, b: (X[a:b] @ X.T, Y[a:b] @ Y.T))
    diagonal_k, diagonal_l = np.einsum("ij,ij->i", X, X), np.einsum("ij,ij->i", Y, Y)
    return _KernelSums(
        s,
        _squared_cross_norm(X, Y) - float(diagonal_k @ diagonal_l),
        _squared_cross_norm(X, X) - float(diagonal_k @ diagonal_k),
        _squared_cross_norm(Y, Y) - float(diagonal_l @ diagonal_l),
        X @ X.sum(axis=0) - diagonal_k,
        Y @ Y.sum(axis=0) - diagonal_l,
        diagonal_k,
        diagonal_l,
    )


def _rbf_sums(X: np.ndarray, Y: np.ndarray, sigma: float) -> _KernelSums:
    """Sums of K = exp(−‖x_i − x_j‖² / (2σ²)) (and L), formed in row blocks."""
    X = X - X.mean(axis=0)  # distances unchanged; smaller norms, less rounding
    Y = Y - Y.mean(axis=0)
    norms_x, norms_y = np.einsum("ij,ij->i", X, X), np.einsum("ij,ij->i", Y, Y)

    def kernel(F: np.ndarray, norms: np.ndarray, start: int, stop: int) -> np.ndarray:
        squared = norms[start:stop, None] + norms[None, :] - 2.0 * (F[start:stop] @ F.T)
        return np.exp(-np.maximum(squared, 0.0) / (2.0 * sigma * sigma))

    return _off_diagonal_sums(
        X.shape[0], lambda a, b: (kernel(X, norms_x, a, b), kernel(Y, norms_y, a, b))
    )


def _cka_from_sums(sums: _KernelSums, unbiased: bool) -> float:
    n = sums.n
    pairs = {
        "kl": (sums.kl, sums.rows_k, sums.rows_l, sums.diagonal_k, sums.diagonal_l),
        "kk": (sums.kk, sums.rows_k, sums.rows_k, sums.diagonal_k, sums.diagonal_k),
        "ll": (sums.ll, sums.rows_l, sums.rows_l, sums.diagonal_l, sums.diagonal_l),
    }
    hsic = {}
    for key, (product, rows_a, rows_b, diagonal_a, diagonal_b) in pairs.items():
        if unbiased:
            hsic[key] = unbiased_hsic_from_sums(
                n, product, rows_a.sum(), rows_b.sum(), float(rows_a @ rows_b)
            )
        else:  # the diagonals back in
            rows_a, rows_b = rows_a + diagonal_a, rows_b + diagonal_b
            hsic[key] = biased_hsic_from_sums(
                n,
                product + float(diagonal_a @ diagonal_b),
                rows_a.sum(),
                rows_b.sum(),
                float(rows_a @ rows_b),
            )
    return normalised_alignment(hsic["kl"], hsic["kk"], hsic["ll"])


def check_kernel(kernel: object, sigma: object) -> tuple[str, float]:
    """A CKA kernel and RBF width as ``("linear" | "rbf", sigma)`` ("ip" is "linear");
    ValueError naming the fix otherwise."""
    if kernel == "ip":
        kernel = "linear"
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}.")
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float, np.integer, np.floating))
        or not (np.isfinite(sigma) and sigma > 0)
    ):
        raise ValueError(
            f"sigma (the RBF width) must be a positive number, got {sigma!r}; e.g. sigma=1.0."
        )
    return str(kernel), float(sigma)


def cka(X: object, Y: object, *, kernel: str = "linear", sigma: float = 1.0) -> float:
    """CKA with the biased HSIC trace(K H L H) (the original CKA), s ≥ 2.

    ``kernel="linear"``: K = X Xᵀ (never formed when the feature route is cheaper);
    ``kernel="rbf"``: K = exp(−‖x_i − x_j‖² / (2 sigma²)).
    """
    kernel, sigma = check_kernel(kernel, sigma)
    X, Y = check_pair(X, Y, min_rows=2)
    sums = _linear_sums(X, Y) if kernel == "linear" else _rbf_sums(X, Y, sigma)
    return _cka_from_sums(sums, unbiased=False)


def unbiased_cka(X: object, Y: object, *, kernel: str = "linear", sigma: float = 1.0) -> float:
    """CKA with the unbiased HSIC estimator, s ≥ 4 (NaN if a self-HSIC estimate is negative)."""
    kernel, sigma = check_kernel(kernel, sigma)
    X, Y = check_pair(X, Y)
    check_min_stimuli(X.shape[0], 4, "unbiased CKA")
    sums = _linear_sums(X, Y) if kernel == "linear" else _rbf_sums(X, Y, sigma)
    return _cka_from_sums(sums, unbiased=True)


class CKAFeatureSide(NamedTuple):
    """The part of (unbiased) CKA that depends on one model's features X (s, d) alone, so that a
    model met by several others (one vision model against every language model) is prepared once
    per set: :func:`cka_feature_side`, combined by :func:`cka_from_feature_sides`.

    ``features`` (s, d) centered X; ``gram`` (s, s) its linear kernel with a zeroed diagonal
    (linear kernel and s < d, where Σ K∘L over the Grams is the cheaper cross term) or None;
    ``norms`` (s,) squared row norms of the centered X (the RBF distances); ``diagonal`` (s,),
    ``rows`` (s,) off-diagonal row sums and ``self_product`` Σ_{i≠j} K_ij² of the kernel;
    ``kernel``, ``sigma`` as in :func:`cka`; ``crosses``: the cross sums with the last side it
    met, so that CKA and unbiased CKA of a pair, computed one after the other, share them (only
    the last: a set's side meets hundreds of reordered sides in a calibration, and keeping each
    would keep its features too).
    """

    features: np.ndarray
    gram: np.ndarray | None
    norms: np.ndarray
    diagonal: np.ndarray
    rows: np.ndarray
    self_product: float
    kernel: str
    sigma: float
    crosses: dict[int, tuple[CKAFeatureSide, _KernelSums]]


def _rbf_block(side: CKAFeatureSide, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of the side's RBF kernel (diagonal included)."""
    F, norms = side.features, side.norms
    squared = norms[start:stop, None] + norms[None, :] - 2.0 * (F[start:stop] @ F.T)
    return np.exp(-np.maximum(squared, 0.0) / (2.0 * side.sigma * side.sigma))


def cka_feature_side(
    X: object, *, kernel: str = "linear", sigma: float = 1.0, name: str = "X"
) -> CKAFeatureSide:
    """:class:`CKAFeatureSide` of features X (s, d), s ≥ 2: O(s·d·min(s, d)) for the linear
    kernel (its own sums from XᵀX, or from X Xᵀ when s < d), O(s²·d) in row blocks for RBF."""
    kernel, sigma = check_kernel(kernel, sigma)
    X = check_features(X, name, min_rows=2)
    X = X - X.mean(axis=0)  # HSIC is translation-invariant; smaller norms, less rounding
    s, d = X.shape
    norms = np.einsum("ij,ij->i", X, X)
    gram = None
    if kernel == "linear" and s < d and s <= _MAX_GRAM_STIMULI:
        gram = X @ X.T
        np.fill_diagonal(gram, 0.0)  # the off-diagonal sums directly, as in the Gram route
        rows, self_product = gram.sum(axis=1), float(np.sum(gram * gram))
    elif kernel == "linear":
        rows = X @ X.sum(axis=0) - norms
        self_product = _squared_cross_norm(X, X) - float(norms @ norms)
    else:
        side = CKAFeatureSide(X, None, norms, np.ones(s), np.empty(0), 0.0, kernel, sigma, {})
        sums = _off_diagonal_sums(s, lambda a, b: (_rbf_block(side, a, b),) * 2)
        return side._replace(diagonal=sums.diagonal_k, rows=sums.rows_k, self_product=sums.kk)
    return CKAFeatureSide(X, gram, norms, norms, rows, self_product, kernel, sigma, {})


def _cross_sums(a: CKAFeatureSide, b: CKAFeatureSide) -> _KernelSums:
    """The sums of two sides' kernels: their own from the sides, Σ_{i≠j} K∘L computed here
    (kept in ``a.crosses`` until ``a`` meets another side)."""
    met = a.crosses.get(id(b))
    if met is not None and met[0] is b:
        return met[1]
    sums = _new_cross_sums(a, b)
    a.crosses.clear()
    a.crosses[id(b)] = (b, sums)
    return sums


def _new_cross_sums(a: CKAFeatureSide, b: CKAFeatureSide) -> _KernelSums:
    if (a.kernel, a.sigma) != (b.kernel, b.sigma) or a.features.shape[0] != b.features.shape[0]:
        raise ValueError(
            f"CKA sides of {a.features.shape[0]} and {b.features.shape[0]} stimuli with kernels "
            f"{(a.kernel, a.sigma)} and {(b.kernel, b.sigma)}; they must be of the same stimuli "
            "and the same kernel."
        )
    s = a.features.shape[0]
    if a.kernel == "rbf":
        kl = 0.0
        block = max(1, _BLOCK_ELEMENTS // s)
        for start in range(0, s, block):
            stop = min(s, start + block)
            local = np.arange(stop - start)
            Kb, Lb = _rbf_block(a, start, stop), _rbf_block(b, start, stop)
            Kb[local, start + local] = 0.0
            kl += float(np.sum(Kb * Lb))
    elif a.gram is not None and b.gram is not None:
        kl = float(np.sum(a.gram * b.gram))
    else:
        kl = _squared_cross_norm(a.features, b.features) - float(a.diagonal @ b.diagonal)
    return _KernelSums(
        s, kl, a.self_product, b.self_product, a.rows, b.rows, a.diagonal, b.diagonal
    )


def permuted_cka_side(side: CKAFeatureSide, order: np.ndarray) -> CKAFeatureSide:
    """The side of the features' rows in ``order`` (a permutation of 0..s−1): the side's arrays
    reordered, O(s·d) (O(s²) for a Gram) instead of a new side's O(s·d·min(s, d))."""
    return side._replace(
        features=side.features[order],
        gram=None if side.gram is None else side.gram[np.ix_(order, order)],
        norms=side.norms[order],
        diagonal=side.diagonal[order],
        rows=side.rows[order],
        crosses={},
    )


def cka_from_feature_sides(a: CKAFeatureSide, b: CKAFeatureSide) -> float:
    """:func:`cka` from two :func:`cka_feature_side` s of the same stimuli and kernel."""
    return _cka_from_sums(_cross_sums(a, b), unbiased=False)


def unbiased_cka_from_feature_sides(a: CKAFeatureSide, b: CKAFeatureSide) -> float:
    """:func:`unbiased_cka` from two :func:`cka_feature_side` s of the same stimuli and kernel."""
    check_min_stimuli(a.features.shape[0], 4, "unbiased CKA")
    return _cka_from_sums(_cross_sums(a, b), unbiased=True)


class KernelSide(NamedTuple):
    """A batch of symmetric kernels of one side with the sums CKA needs from that side alone.

    ``kernels`` (B, s, s) float64; ``diagonal`` (B, s); ``rows`` (B, s) row sums; ``self_product``
    (B,) Σ K∘K. Made by :func:`kernel_side`; a batch of one pairs with a batch of any size in
    :func:`cka_from_kernel_sides`.
    """

    kernels: np.ndarray
    diagonal: np.ndarray
    rows: np.ndarray
    self_product: np.ndarray


def kernel_side(K: object) -> KernelSide:
    """:class:`KernelSide` of symmetric kernels K, (s, s) or (B, s, s)."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim not in (2, 3) or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"kernels must be square, (s, s) or (B, s, s); got {K.shape}.")
    if not np.isfinite(K).all():
        raise ValueError(
            "a kernel contains NaN or Inf; recompute the kernels from finite features."
        )
    if K.ndim == 2:
        K = K[None]
    return KernelSide(
        K,
        np.diagonal(K, axis1=1, axis2=2),
        K.sum(axis=2),
        np.einsum("bij,bij->b", K, K),
    )


def _kernel_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) Σ a∘b per batch element; a batch of one is paired with every element of the other."""
    if a.shape[0] == b.shape[0]:
        return np.einsum("bij,bij->b", a, b)
    one, many = (a, b) if a.shape[0] == 1 else (b, a)
    return many.reshape(many.shape[0], -1) @ one.reshape(-1)


def cka_from_kernel_sides(
    a: KernelSide, b: KernelSide, *, unbiased: bool = False
) -> np.ndarray:
    """(B,) CKA of two :class:`KernelSide` s of the same s stimuli (B sets each, or one set on a
    side: it is paired with every set of the other). Only Σ K∘L and the row sums' inner products
    are computed per pair; each side's own sums come with it."""
    batch_a, batch_b = a.kernels.shape[0], b.kernels.shape[0]
    if a.kernels.shape[1:] != b.kernels.shape[1:] or (
        batch_a != batch_b and 1 not in (batch_a, batch_b)
    ):
        raise ValueError(
            f"K and L must be square kernels of the same stimuli, (s, s) or (B, s, s); got "
            f"{a.kernels.shape} and {b.kernels.shape}."
        )
    n = a.kernels.shape[-1]
    check_min_stimuli(n, 4 if unbiased else 2, "unbiased CKA" if unbiased else "CKA")
    hsic = []
    for first, second, product in (
        (a, b, _kernel_product(a.kernels, b.kernels)),
        (a, a, a.self_product),
        (b, b, b.self_product),
    ):
        rows_a, rows_b = first.rows, second.rows
        if unbiased:
            rows_a, rows_b = rows_a - first.diagonal, rows_b - second.diagonal
            hsic.append(
                unbiased_hsic_from_sums(
                    n,
                    product - (first.diagonal * second.diagonal).sum(axis=1),
                    rows_a.sum(axis=1),
                    rows_b.sum(axis=1),
                    (rows_a * rows_b).sum(axis=1),
                )
            )
        else:
            hsic.append(
                biased_hsic_from_sums(
                    n,
                    product,
                    rows_a.sum(axis=1),
                    rows_b.sum(axis=1),
                    (rows_a * rows_b).sum(axis=1),
                )
            )
    return np.atleast_1d(normalised_alignment(*hsic))


def cka_from_kernels(K: object, L: object, *, unbiased: bool = False) -> float | np.ndarray:
    """CKA of precomputed symmetric kernels, (s, s) → float or (B, s, s) → (B,) float64.

    For many small sets at once (e.g. sub-Grams of a run's features): O(B·s²).
    """
    K = np.asarray(K, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    if K.shape != L.shape or K.ndim not in (2, 3) or K.shape[-1] != K.shape[-2]:
        raise ValueError(
            f"K and L must be square kernels of the same stimuli, (s, s) or (B, s, s); got "
            f"{K.shape} and {L.shape}."
        )
    values = cka_from_kernel_sides(kernel_side(K), kernel_side(L), unbiased=unbiased)
    return _result(values, K.ndim == 3)


# ----------------------------------------------------------------------------------------------
# SVCCA
def _standardised(X: np.ndarray) -> np.ndarray:
    """Center each feature, divide by its standard deviation (ddof=1) + 1e-8, as the reference."""
    X = X - X.mean(axis=0)
    return X / (X.std(axis=0, ddof=1) + 1e-8)


def _top_left_singular_vectors(A: np.ndarray, q: int, name: str) -> np.ndarray:
    """(s, q) orthonormal top-q left singular vectors of A (s, d), exact (up to rounding).

    From the eigendecomposition of the smaller Gram matrix: A Aᵀ (s ≤ d: its eigenvectors are U)
    or AᵀA accumulated in row blocks (s > d: U = orthonormalised A V). Both are O(min(s, d)²·
    max(s, d)), several times faster than an SVD of A, and never form an (s, s) matrix when s > d.
    """
    s, d = A.shape
    if s <= d:
        gram = A @ A.T
    else:
        gram = np.zeros((d, d))
        block = max(1, _BLOCK_ELEMENTS // d)
        for start in range(0, s, block):
            part = A[start : start + block]
            gram += part.T @ part
    # the top q eigenpairs only, ascending (LAPACK's syevr: 0.21 s for a 1,536-wide Gram here,
    # a full eigh 0.51 s)
    eigenvalues, vectors = scipy.linalg.eigh(gram, subset_by_index=[gram.shape[0] - q,
                                                                    gram.shape[0] - 1])
    vectors = vectors[:, ::-1]
    U = vectors if s <= d else np.linalg.qr(A @ vectors)[0]
    singular = np.sqrt(np.maximum(eigenvalues[::-1], 0.0))
    # 1e-6: eigenvalues resolve singular values only to ~sqrt(machine epsilon) of the largest
    if singular[0] == 0 or singular[q - 1] <= 1e-6 * singular[0]:
        raise ValueError(
            f"{name} has fewer than cca_dim={q} independent directions (rank-deficient after "
            "standardising); pass a smaller cca_dim or features with more variation."
        )
    return U


def _check_cca_dim(cca_dim: object, limit: int) -> int:
    if (
        isinstance(cca_dim, (bool, np.bool_))
        or not isinstance(cca_dim, (int, np.integer))
        or not (1 <= cca_dim <= limit)
    ):
        raise ValueError(
            f"cca_dim must be an integer with 1 <= cca_dim <= min(s - 1, d_x, d_y) = {limit}, got "
            f"{cca_dim!r}; the reference uses 10."
        )
    return int(cca_dim)


def svcca_side(X: object, *, cca_dim: int = 10, name: str = "X") -> np.ndarray:
    """The part of SVCCA that depends on one side: the (s, cca_dim) orthonormal top left singular
    vectors of X (s, d) after standardising each feature. ``svcca_from_sides`` of two sides equals
    :func:`svcca`; a side met by several others (one model against many) is computed once.
    1 ≤ cca_dim ≤ min(s − 1, d)."""
    X = check_features(X, name, min_rows=2)
    q = _check_cca_dim(cca_dim, min(X.shape[0] - 1, X.shape[1]))
    return _top_left_singular_vectors(_standardised(X), q, name)


def permuted_svcca_side(U: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The side of the features' rows in ``order``: its rows reordered (the standardisation is
    per feature, so it does not change)."""
    return U[order]


def svcca_from_sides(U_x: np.ndarray, U_y: np.ndarray) -> float:
    """SVCCA from two sides (:func:`svcca_side`) of the same stimuli and cca_dim: the mean of the
    canonical correlations, the singular values of U_xᵀ U_y."""
    if U_x.shape != U_y.shape:
        raise ValueError(
            f"SVCCA sides of shapes {U_x.shape} and {U_y.shape}; they must be of the same stimuli "
            "and the same cca_dim."
        )
    correlations = np.linalg.svd(U_x.T @ U_y, compute_uv=False)
    return float(np.mean(np.clip(correlations, 0.0, 1.0)))


def svcca(X: object, Y: object, *, cca_dim: int = 10) -> float:
    """SVCCA: mean canonical correlation of the top-``cca_dim`` SVD subspaces of X and Y.

    Each feature is centered and divided by its standard deviation (+1e-8); the subspaces are
    spanned by the exact top ``cca_dim`` left singular vectors U_x, U_y (orthonormal, centered), so
    the canonical correlations are the singular values of U_xᵀU_y.
    1 ≤ cca_dim ≤ min(s − 1, d_x, d_y).
    """
    X, Y = check_pair(X, Y, min_rows=2)
    _check_cca_dim(cca_dim, min(X.shape[0] - 1, X.shape[1], Y.shape[1]))
    return svcca_from_sides(
        svcca_side(X, cca_dim=cca_dim, name="X"), svcca_side(Y, cca_dim=cca_dim, name="Y")
    )


# ----------------------------------------------------------------------------------------------
# the registry
ORTHOGONAL = "orthogonal transform"
ISOTROPIC_SCALING = "isotropic scaling"
STIMULUS_PERMUTATION = "stimulus permutation"
TRANSLATION = "translation"
FEATURE_SCALING = "per-feature scaling"

#: every transform the registry states an invariance (or its absence) for
TRANSFORMS = (ORTHOGONAL, ISOTROPIC_SCALING, STIMULUS_PERMUTATION, TRANSLATION, FEATURE_SCALING)


@dataclass(frozen=True)
class Metric:
    """One alignment metric.

    Attributes:
        name: the registry name (the reference's name).
        label: the short name tables, pickers and plots show ("mutual k-NN").
        unit: what a value counts, for axis titles ("fraction of k"; "unitless").
        function: ``function(X, Y, **options) -> float`` on paired features (s, d_x), (s, d_y).
        from_tables: neighbour metrics only: ``from_tables(table_x, table_y, [x_at, y_at,]
            **options)`` on (s, k) or (B, s, k) tables (CKNNA also needs kernel values).
        options: the options it takes and their defaults (``k``, ``cca_dim``, ``kernel``,
            ``sigma``, ``normalise``).
        value_range: (low, high) the values lie in (CKNNA and unbiased CKA can stray slightly).
        invariances: the transforms of X (or Y) that leave the value unchanged, at the default
            options (up to the 1e-6 in CKA-like denominators); each tested.
        not_invariant: transforms that change it (tested too).
        symmetric: measure(X, Y) == measure(Y, X).
        neighbour_metric: a function of the neighbour tables only (plus kernel values).
        needs_kernel_values: the table form needs ``x_at``/``y_at``.
        live: fast enough for the live Alignment lab (200 random sets of the demo in ≤ 300 ms,
            benchmarks/bench_metrics.py); otherwise it runs behind a button.
        reference: how the value relates to minyoungg/platonic-rep's.
        description: one line for tables and tooltips.
        side, from_sides: table form split in two, where one table meets several others (the
            lab: each vision model with each language model): ``side(table, values)`` is what
            depends on one table alone, computed once per table; ``from_sides(side_x, side_y)``
            equals ``from_tables`` on the two tables (CKNNA: the sorted entries, reciprocal
            look-ups and own HSIC of each side). None: use ``from_tables``.
        feature_side, from_feature_sides: ``function`` split in the same way, for a feature metric
            whose per-side work dominates: ``feature_side(X, **options)`` once per model and set,
            ``from_feature_sides(side_x, side_y)`` equals ``function(X, Y, **options)`` (SVCCA:
            each side's standardised top singular vectors). None: use ``function``.
        min_k: the smallest k it is defined at (CKNNA: 2, its mutual-neighbour kernel is
            empty at k = 1; the other neighbour metrics: 1); every check of a set's k for a
            metric asks this.
        permuted_feature_side: ``permuted_feature_side(feature_side(X), order)`` equals
            ``feature_side(X[order])`` at a fraction of its cost (a shuffled pairing reorders one
            side of a set many times). None: compute the side of the reordered rows.
    """

    name: str
    label: str
    unit: str
    function: Callable[..., float]
    from_tables: Callable[..., Any] | None
    options: Mapping[str, Any]
    value_range: tuple[float, float]
    invariances: tuple[str, ...]
    not_invariant: tuple[str, ...]
    symmetric: bool
    neighbour_metric: bool
    needs_kernel_values: bool
    live: bool
    reference: str
    description: str
    notes: str = field(default="")
    min_k: int = 1
    side: Callable[..., Any] | None = None
    from_sides: Callable[..., Any] | None = None
    feature_side: Callable[..., Any] | None = None
    from_feature_sides: Callable[..., float] | None = None
    permuted_feature_side: Callable[[Any, np.ndarray], Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def axis_title(self) -> str:
        """The label with the unit, for a value axis: ``"CKNNA (unitless)"``."""
        return f"{self.label} ({self.unit})"


#: The k a neighbour metric takes when none is given: the registry's default, the report's (--k
#: left out) and the dashboard's
DEFAULT_K = 10

_NEIGHBOUR_INVARIANCES = (ORTHOGONAL, ISOTROPIC_SCALING, STIMULUS_PERMUTATION)
_NEIGHBOUR_VARIANCES = (TRANSLATION, FEATURE_SCALING)

_ENTRIES = (
    Metric(
        name="cknna",
        label="CKNNA",
        unit="unitless",
        function=cknna,
        from_tables=cknna_from_tables,
        options={"k": DEFAULT_K},
        value_range=(-1.0, 1.0),
        invariances=_NEIGHBOUR_INVARIANCES,
        not_invariant=_NEIGHBOUR_VARIANCES,
        symmetric=False,
        neighbour_metric=True,
        needs_kernel_values=True,
        live=True,
        reference="equal (|Δ| ≤ 1e-6)",
        description="centered kernel nearest-neighbour alignment (CKA on mutual k-NN entries)",
        notes="not exactly symmetric: the masked kernels are asymmetric (as in the reference)",
        min_k=2,
        side=cknna_side,
        from_sides=cknna_from_sides,
    ),
    Metric(
        name="mutual_knn",
        label="mutual k-NN",
        unit="overlap, fraction of k",
        function=mutual_knn,
        from_tables=mutual_knn_from_tables,
        options={"k": DEFAULT_K},
        value_range=(0.0, 1.0),
        invariances=_NEIGHBOUR_INVARIANCES,
        not_invariant=_NEIGHBOUR_VARIANCES,
        symmetric=True,
        neighbour_metric=True,
        needs_kernel_values=False,
        live=True,
        reference="equal",
        description="mean fraction of shared k nearest neighbours",
    ),
    Metric(
        name="cycle_knn",
        label="cycle k-NN",
        unit="fraction of stimuli",
        function=cycle_knn,
        from_tables=cycle_knn_from_tables,
        options={"k": DEFAULT_K},
        value_range=(0.0, 1.0),
        invariances=_NEIGHBOUR_INVARIANCES,
        not_invariant=_NEIGHBOUR_VARIANCES,
        symmetric=False,
        neighbour_metric=True,
        needs_kernel_values=False,
        live=True,
        reference="equal",
        description="fraction of stimuli reached back via a Y-neighbour's X-neighbours",
    ),
    Metric(
        name="lcs_knn",
        label="LCS k-NN",
        unit="fraction of k",
        function=lcs_knn,
        from_tables=lcs_knn_from_tables,
        options={"k": DEFAULT_K, "normalise": True},
        value_range=(0.0, 1.0),
        invariances=_NEIGHBOUR_INVARIANCES,
        not_invariant=_NEIGHBOUR_VARIANCES,
        symmetric=True,
        neighbour_metric=True,
        needs_kernel_values=False,
        live=True,
        reference="reference / k (normalise=False: equal, range [0, k])",
        description="mean longest common subsequence of the ordered k-NN lists, / k",
    ),
    Metric(
        name="edit_distance_knn",
        label="edit-distance k-NN",
        unit="1 − edits / k",
        function=edit_distance_knn,
        from_tables=edit_distance_knn_from_tables,
        options={"k": DEFAULT_K},
        value_range=(0.0, 1.0),
        invariances=_NEIGHBOUR_INVARIANCES,
        not_invariant=_NEIGHBOUR_VARIANCES,
        symmetric=True,
        neighbour_metric=True,
        needs_kernel_values=False,
        live=True,
        reference="equal",
        description="1 − mean edit distance of the ordered k-NN lists / k",
    ),
    Metric(
        name="cka",
        label="CKA",
        unit="unitless",
        function=cka,
        from_tables=None,
        options={"kernel": "linear", "sigma": 1.0},
        value_range=(0.0, 1.0),
        invariances=(ORTHOGONAL, ISOTROPIC_SCALING, STIMULUS_PERMUTATION, TRANSLATION),
        not_invariant=(FEATURE_SCALING,),
        symmetric=True,
        neighbour_metric=False,
        needs_kernel_values=False,
        live=True,
        reference="equal (|Δ| ≤ 1e-6)",
        description="centered kernel alignment, biased HSIC (linear or RBF kernel)",
        notes="kernel='rbf' is not invariant to isotropic scaling (sigma is an absolute width)",

        feature_side=cka_feature_side,
        from_feature_sides=cka_from_feature_sides,
        permuted_feature_side=permuted_cka_side,
    ),
    Metric(
        name="unbiased_cka",
        label="unbiased CKA",
        unit="unitless",
        function=unbiased_cka,
        from_tables=None,
        options={"kernel": "linear", "sigma": 1.0},
        value_range=(-1.0, 1.0),
        invariances=(ORTHOGONAL, ISOTROPIC_SCALING, STIMULUS_PERMUTATION, TRANSLATION),
        not_invariant=(FEATURE_SCALING,),
        symmetric=True,
        neighbour_metric=False,
        needs_kernel_values=False,
        live=True,
        reference="equal (|Δ| ≤ 1e-6)",
        description="centered kernel alignment, unbiased HSIC (linear or RBF kernel)",
        notes="kernel='rbf' is not invariant to isotropic scaling (sigma is an absolute width)",

        feature_side=cka_feature_side,
        from_feature_sides=unbiased_cka_from_feature_sides,
        permuted_feature_side=permuted_cka_side,
    ),
    Metric(
        name="svcca",
        label="SVCCA",
        unit="mean correlation",
        function=svcca,
        from_tables=None,
        options={"cca_dim": 10},
        value_range=(0.0, 1.0),
        invariances=(ISOTROPIC_SCALING, STIMULUS_PERMUTATION, TRANSLATION, FEATURE_SCALING),
        not_invariant=(ORTHOGONAL,),
        symmetric=True,
        neighbour_metric=False,
        needs_kernel_values=False,
        live=False,
        reference="equal to the reference with its SVD made exact (|Δ| ≤ 1e-6); its randomized "
        "SVD is up to ~0.2 lower where the spectrum has no gap at cca_dim",
        description="mean canonical correlation of the top cca_dim SVD directions",
        notes="standardises each feature first, so a rotation of the features changes it",
        feature_side=svcca_side,
        from_feature_sides=svcca_from_sides,
        permuted_feature_side=permuted_svcca_side,
    ),
)

METRICS: Mapping[str, Metric] = MappingProxyType({entry.name: entry for entry in _ENTRIES})


def metric_names() -> list[str]:
    """The registered metric names, in registry order."""
    return list(METRICS)


def metric(name: str) -> Metric:
    """The registry entry of ``name``."""
    entry = METRICS.get(name) if isinstance(name, str) else None
    if entry is None:
        meant = (
            f" (did you mean {name.strip().lower()!r}?)"
            if isinstance(name, str) and name.strip().lower() in METRICS else ""
        )
        raise ValueError(f"unknown metric {name!r}{meant}; known metrics: {', '.join(METRICS)}.")
    return entry


def check_options(
    name: str, options: Mapping[str, Any] | None = None, *, k_apart: bool = False
) -> dict[str, Any]:
    """The registry's options of metric ``name`` with ``options`` applied: the one check of a
    metric's options (:func:`measure`, the subset engine, the analyses and the lab use it).

    ``k_apart``: k is given elsewhere (the neighbour lists' engine), so ``options`` may hold it
    and the result does not. ValueError naming the options the metric takes for any other key,
    or the fix for a kernel or RBF width that is not one.
    """
    entry = metric(name)
    given = dict(options or {})
    if k_apart:
        given.pop("k", None)
    takes = [option for option in entry.options if not (k_apart and option == "k")]
    unknown = sorted(set(given) - set(takes))
    if unknown:
        what = ", ".join(takes) or ("no options besides k" if k_apart else "no options")
        raise ValueError(f"{name} does not take {', '.join(map(repr, unknown))}; it takes {what}.")
    chosen = {key: value for key, value in {**entry.options, **given}.items() if key in takes}
    # bad values on every route, before any work (the dense CKA route never calls measure, and
    # an analysis asked to record errors as NaN would otherwise show a typo as a column of NaN)
    if "kernel" in chosen:
        check_kernel(chosen["kernel"], chosen.get("sigma", 1.0))
    dim = chosen.get("cca_dim", 1)  # its upper bound, min(s − 1, d_x, d_y), comes with the data
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(
            f"cca_dim must be a positive integer (at most min(s - 1, d_x, d_y)), got {dim!r}; "
            "the reference uses 10."
        )
    return chosen


def measure(name: str, X: object, Y: object, **options: Any) -> float:
    """The metric ``name`` of paired features X (s, d_x), Y (s, d_y), as a float.

    Options (see :func:`metric` for each metric's): ``k`` (neighbour metrics, default 10),
    ``kernel`` / ``sigma`` (cka, unbiased_cka), ``cca_dim`` (svcca), ``normalise`` (lcs_knn).
    """
    entry = metric(name)
    return float(entry.function(X, Y, **check_options(name, options)))


def measure_tables(
    name: str,
    table_x: object,
    table_y: object,
    x_at: object = None,
    y_at: object = None,
    **options: Any,
) -> float | np.ndarray:
    """A neighbour metric from neighbour tables (s, k) → float or (B, s, k) → (B,).

    ``x_at``/``y_at`` (kernel values, see :func:`cknna_from_tables`) are required where the entry's
    ``needs_kernel_values`` is set and ignored otherwise. k is the tables' width (not an option).
    """
    entry = metric(name)
    given = dict(options)
    if entry.from_tables is None:
        raise ValueError(
            f"{name} is a feature metric, not a function of neighbour tables; use measure()."
        )
    options = check_options(name, options)
    width = np.shape(table_x)[-1]
    if "k" in options and options.pop("k") != width and "k" in given:
        raise ValueError(
            f"k={given['k']!r} but the tables list {width} neighbours; k is the tables' width."
        )
    if entry.needs_kernel_values:
        if x_at is None or y_at is None:
            raise ValueError(
                f"{name} needs the kernel values at the table entries: pass x_at and y_at."
            )
        return entry.from_tables(table_x, table_y, x_at, y_at, **options)
    return entry.from_tables(table_x, table_y, **options)
