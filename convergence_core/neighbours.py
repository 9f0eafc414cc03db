"""Exact nearest-neighbour lists of every stimulus, and neighbour metrics of any subset from them.

This is the engine behind every alignment number of a run, at any n (the paper's 1,000 stimuli up
to 100,000), with no (n, n) array anywhere:

* :class:`PreparedFeatures` — the rows of ``alignment.prepare_features(X)`` on demand, from the raw
  (n, d) embeddings (a float32 memory map is fine) and the layer's clip threshold (one number,
  :func:`clip_threshold`). A run stores the raw embeddings (GPA needs them) and the threshold, so
  the prepared features cost no second copy on disk.
* :func:`exact_top_k` — for some query rows, their k most similar candidate rows by inner product,
  computed in row blocks: a float32 matrix product (torch, CPU or GPU) screens the candidates, every
  candidate that could still be among the k is recomputed in float64, and the k are taken in the
  order *value descending, then lower stimulus index* (the tie rule everywhere in this module).
  Exact, not approximate: the screen keeps every candidate within twice a rigorous bound on the
  float32 error (:func:`float32_error_bound`) of the k-th value.
* :class:`NeighbourLists` — each stimulus's K most similar other stimuli (indices (n, K) and
  float64 inner products (n, K), most similar first); built once per model × layer by
  :func:`build_neighbour_lists` (K = :data:`DEFAULT_LIST_SIZE`, or n − 1 for small n).
* :class:`NeighbourIndex` — features + lists of one model × layer. ``tables(subsets, k)`` gives,
  for every member of every subset, its k nearest neighbours *within the subset* (positions in the
  sorted subset, most similar first) and their inner products: the first k subset members along
  the member's stored list, or — for a member whose list holds fewer than k of them (small or
  clustered subsets) — an exact :func:`exact_top_k` against the subset's own features. So the
  result equals the dense definition on ``features[subset]`` for every subset. Those completed
  rows cost O(s·d) each, so they are computed once per index and set, with at least
  :data:`COMPLETION_K` neighbours, and kept (:data:`COMPLETION_CACHE_BYTES`): a k change slices
  them (the Alignment lab's sets between 2,048 and ~k·n/K stimuli: most of their rows).
* :func:`subset_alignment` — any neighbour metric of the registry (:mod:`.metrics`: CKNNA, mutual
  k-NN, cycle k-NN, LCS, edit distance) of many pairs × many subsets from those tables, every
  subset of a chunk in one batched call of ``metrics.measure_tables``.

CKNNA needs kernel values besides the tables; K and L are symmetric (inner products), so every value
it reads is in the two tables (A_ji = K_ij whenever (j, i) is also a mask entry). Cost per subset:
O(s·w) to read list prefixes (w ≈ k·n/s), the metric's O(s·k log(s·k)), plus the completions.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .subsets import check_indices
from .validation import check_k, check_min_stimuli

__all__ = [
    "DEFAULT_LIST_SIZE",
    "NeighbourIndex",
    "NeighbourLists",
    "NeighbourRangeError",
    "PreparedFeatures",
    "SubsetAlignment",
    "Tables",
    "build_neighbour_lists",
    "check_subsets",
    "clip_threshold",
    "exact_top_k",
    "float32_error_bound",
    "list_size_for",
    "prepare_rows",
    "subset_alignment",
]

#: Neighbours stored per stimulus (K). A uniformly random quarter of the stimuli holds a row's
#: k = 10 within-subset neighbours among its first K = 128 global neighbours unless fewer than 10
#: of those 128 fall in the subset: P(Binomial(128, 1/4) < 10) ≈ 3e-6 per row, so about one row in
#: a 25,000-stimulus subset needs the exact completion from features.
DEFAULT_LIST_SIZE = 128

#: Rows per block of the float32 screen: bounds the (block, n) similarity block in memory
#: (~256 MB float32 at n = 100,000 for 640 rows).
_BLOCK_ELEMENTS = 64_000_000
#: Largest float64 copy of the candidates kept in memory by exact_top_k (2 GB: 100,000 × 1536 × 8 B
#: is 1.2 GB); larger candidate sets are prepared again per block.
_FLOAT64_CACHE_BYTES = 2_000_000_000
#: Subsets up to this size complete their members' tables from the dense (s, s) float64 inner
#: products of their features (O(s²·d), no float32 screen); larger ones use exact_top_k. (The two
#: cost about the same from 512 to 3,000 stimuli at d = 16 and 768 (bench_set_tables); above, the
#: dense product would need row blocks, which exact_top_k already has.)
_DENSE_SUBSET = 2048
#: Rows completed from the features (``NeighbourIndex.tables``) are computed with at least this
#: many neighbours (at most the set's other members) and kept (:data:`COMPLETION_CACHE_BYTES`):
#: the same set at any k up to the kept number slices them. The float64 refinement grows with
#: the number: a set's first call costs ~1.25-1.8× that at k = 10 at d = 768 (s = 5,000 /
#: 2,500) and ~2.5× at d = 16; the lab's k steps 15, 5, 20, 10, 32 after it then cost nothing
#: (bench_set_tables). 128 (the list size) cost ~2× at d = 768 and ~3× at d = 16.
COMPLETION_K = 32
#: Bytes of completed rows kept for all neighbour indexes of the process, least recently used
#: dropped first (0: none kept; each call then completes its rows at its own k, the method
#: before 2026-12-07). A set of 5,000 stimuli completed whole takes 2 MB per model at
#: COMPLETION_K (positions int32, values float64): ~130 such sets × models fit.
COMPLETION_CACHE_BYTES = 256 * 2**20
#: A set of which at least this share of rows needs completing is completed whole: by one
#: symmetric product (half the multiplications of the general one), and no later k up to the
#: kept one completes a row of it again (most rows of a lab set in the gap are short anyway)
_WHOLE_SET_SHARE = 0.5
#: Rows per chunk of the norms in :func:`prepare_rows` (bounds its temporary to ~this × d floats).
_NORM_CHUNK_ROWS = 4096
#: Entries compared at once in the batched table/HSIC code (bounds temporaries to ~100s of MB).
_ENTRY_CHUNK = 4_000_000
#: Sets of at least this many table entries (s·k) are worked on in a thread per core, one model ×
#: set at a time: the lab's 25,000-stimulus sets at n = 100,000
_THREADED_ENTRIES = 100_000


# ----------------------------------------------------------------------------------------------
# prepared features


def _row_quantiles(block: np.ndarray, q: float) -> np.ndarray:
    return np.quantile(np.abs(np.asarray(block, dtype=np.float64)), q, axis=1)


def clip_threshold(X: np.ndarray, q: float = 0.95, *, block_rows: int = 8192) -> float:
    """The clip threshold of ``prepare_features``: the mean over rows of each row's q-quantile of |x|.

    Computed in row blocks (X may be a memory map) and summed exactly (``math.fsum``), so the value
    does not depend on the blocking. ``q = 1`` means no clipping (returns ``inf``).

    Args:
        X: (n, d) features, any float dtype.
        q: quantile in (0, 1].
    """
    if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not 0 < q <= 1:
        raise ValueError(f"q must be a quantile with 0 < q <= 1, got {q!r}; the paper uses 0.95.")
    if q >= 1:
        return math.inf
    n = X.shape[0]
    parts: list[float] = []
    for start in range(0, n, block_rows):
        parts.extend(_row_quantiles(X[start : start + block_rows], q).tolist())
    threshold = math.fsum(parts) / n
    if threshold == 0.0:
        raise ValueError(
            f"the {q}-quantile of |X| is 0 (the features are mostly zeros), so clipping would "
            "erase them; pass q=1 to skip clipping or a higher q."
        )
    return threshold


def prepare_rows(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Rows of prepared features: clip to [−threshold, threshold], divide by the row's L2 norm.

    Args:
        rows: (r, d) raw features (any float dtype; computed in float64).
        threshold: from :func:`clip_threshold` of the whole (n, d) array (``inf``: no clipping).

    Returns:
        (r, d) float64 with unit-norm rows; ValueError for all-zero rows.
    """
    # one (r, d) float64 array, clipped and divided in place; the norms in row chunks (each row's
    # sum is the same computation as one call over all rows), so no other full-size temporary
    out = np.array(rows, dtype=np.float64)
    if math.isfinite(threshold):
        np.clip(out, -threshold, threshold, out=out)
    norms = np.empty((out.shape[0], 1))
    for start in range(0, out.shape[0], _NORM_CHUNK_ROWS):
        chunk = slice(start, start + _NORM_CHUNK_ROWS)
        norms[chunk] = np.linalg.norm(out[chunk], axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(
            f"{zero.size} rows are all zeros (first: {zero[:5].tolist()} of this block) and cannot "
            "be L2-normalised; drop those stimuli or re-extract their features."
        )
    out /= norms
    return out


class PreparedFeatures:
    """``prepare_features(raw, q)`` row by row, without holding a float64 copy of all rows.

    Attributes:
        raw: (n, d) raw features (a read-only float32 memory map in a run).
        threshold: the clip threshold (:func:`clip_threshold`; ``inf`` = no clipping).
    """

    def __init__(self, raw: np.ndarray, threshold: float) -> None:
        if getattr(raw, "ndim", 0) != 2 or raw.shape[0] < 1 or raw.shape[1] < 1:
            raise ValueError(
                f"features must be a 2-D (n_stimuli, dim) array, got shape {getattr(raw, 'shape', None)}"
            )
        if not (isinstance(threshold, (int, float, np.floating)) and threshold > 0):
            raise ValueError(
                f"the clip threshold must be a positive number, got {threshold!r}; compute it with "
                "neighbours.clip_threshold(raw)"
            )
        self.raw = raw
        self.threshold = float(threshold)

    @classmethod
    def from_raw(cls, raw: np.ndarray, q: float = 0.95) -> PreparedFeatures:
        """Prepared features of ``raw`` with the threshold computed from it."""
        return cls(raw, clip_threshold(raw, q))

    @property
    def n(self) -> int:
        return int(self.raw.shape[0])

    @property
    def d(self) -> int:
        return int(self.raw.shape[1])

    def rows(self, index: np.ndarray | slice) -> np.ndarray:
        """(r, d) float64 prepared rows at ``index`` (positions or a slice)."""
        if isinstance(index, slice):
            return prepare_rows(self.raw[index], self.threshold)
        index = np.asarray(index, dtype=np.int64)
        return prepare_rows(self.raw[index], self.threshold)

    def all_rows(self) -> np.ndarray:
        """(n, d) float64: every prepared row (small n only; large n works in blocks)."""
        return self.rows(slice(None))


# ----------------------------------------------------------------------------------------------
# exact top-k by blocked float32 screening + float64 refinement


def float32_error_bound(d: int) -> float:
    """Bound on |float32 x̃·ỹ − x·y| for unit vectors x, y of dimension d.

    Rounding each entry to float32 moves the product by at most 2u + u² (u = 2⁻²⁴, Σ|x_t y_t| ≤ 1),
    and any float32 summation order of d products errs by at most γ_d = d·u / (1 − d·u) (Higham,
    Accuracy and Stability of Numerical Algorithms, §3.1). Returned with a 10 % margin.
    """
    u = 2.0**-24
    gamma = d * u / (1.0 - d * u)
    return 1.1 * (gamma + 2.0 * u + u * u)


def _torch():
    import torch

    return torch


def _device(device: str | None):
    torch = _torch()
    name = device or "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r} was asked for but torch sees no CUDA GPU; use device='cpu'"
            )
        # exact screening needs IEEE float32 products (no TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def _float32_block(features: PreparedFeatures, index: np.ndarray, device) -> object:
    torch = _torch()
    block_rows = max(1, _BLOCK_ELEMENTS // (4 * max(features.d, 1)))
    parts = [
        torch.from_numpy(features.rows(index[start : start + block_rows]).astype(np.float32))
        for start in range(0, index.size, block_rows)
    ]
    return torch.cat(parts).to(device) if parts else torch.empty((0, features.d))


def _refine(
    query_features: np.ndarray,
    candidate_index: np.ndarray,
    window: np.ndarray,
    window_ok: np.ndarray,
    features: PreparedFeatures,
    candidate_features: np.ndarray | None,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 values of each query's screened candidates; the k best by (value, index).

    Args:
        query_features: (b, d) float64 prepared rows of the queries.
        candidate_index: (c,) global rows of the candidates (sorted).
        window: (b, w) candidate positions (into ``candidate_index``); window_ok: (b, w) which
            of them to consider: a prefix of each row, at least k long.
        features: all prepared features (to gather candidate rows from).
        candidate_features: (c, d) float64 of all candidates when already at hand, else None.
    """
    b, w = window.shape
    values = np.full((b, w), -np.inf)
    # window_ok is a prefix of each row (the screen sorts by float32 value, descending): only the
    # chunk's longest prefix is gathered and multiplied (K + a few instead of K + the margin)
    prefix = window_ok.sum(axis=1)
    # chunks of ~2 MB of gathered float64 rows: they stay in cache for the product that follows
    rows_per_chunk = max(1, 250_000 // max(1, int(prefix.max(initial=1)) * features.d))
    for start in range(0, b, rows_per_chunk):
        stop = min(b, start + rows_per_chunk)
        used = max(1, int(prefix[start:stop].max()))
        positions = window[start:stop, :used]
        if candidate_features is not None:
            gathered = candidate_features[positions]
        else:
            gathered = features.rows(candidate_index[positions.ravel()])
        gathered = gathered.reshape(stop - start, used, features.d)
        # einsum, not a stacked matmul: BLAS gemv takes tail rows through another kernel, so two
        # identical candidates could get values an ulp apart and break an exact tie by position
        chunk = np.einsum("bwd,bd->bw", gathered, query_features[start:stop])
        values[start:stop, :used] = np.where(window_ok[start:stop, :used], chunk, -np.inf)
    global_index = candidate_index[window]
    # value descending, then the lower stimulus index (np.lexsort: the last key is the primary one)
    order = np.lexsort((global_index, -values), axis=-1)[:, :k]
    return np.take_along_axis(global_index, order, axis=1), np.take_along_axis(values, order, axis=1)


def _screen(sims, k: int, margin: int, threshold_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate windows of a (b, c) float32 similarity block (torch, own entries at -inf).

    Returns ``(window (b, w) positions, window_ok (b, w))``: for each row every position whose
    value is ≥ (its k-th largest − ``threshold_width``), found with ``torch.topk`` of ``margin``
    entries, widened ×4 for rows whose margin does not reach below that bound.
    """
    torch = _torch()
    b, c = sims.shape
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    todo = np.arange(b)
    keep = margin
    while todo.size:
        keep = min(keep, c)
        chosen = sims if todo.size == b else sims[torch.from_numpy(todo).to(sims.device)]
        values32, positions = torch.topk(chosen, keep, dim=1)  # largest first
        values32 = values32.cpu().numpy().astype(np.float64)
        positions = positions.cpu().numpy()
        bound = values32[:, k - 1] - threshold_width
        complete = (keep >= c) | (values32[:, -1] < bound)
        inside = values32 >= bound[:, None]
        for local in np.flatnonzero(complete):
            found[int(todo[local])] = (positions[local], inside[local])
        todo = todo[~complete]
        keep *= 4
    width = max(pos.size for pos, _ in found.values())
    window = np.zeros((b, width), dtype=np.int64)
    window_ok = np.zeros((b, width), dtype=bool)
    for row, (pos, ok) in found.items():
        window[row, : pos.size] = pos
        window_ok[row, : pos.size] = ok
    return window, window_ok


def exact_top_k(
    features: PreparedFeatures,
    k: int,
    *,
    queries: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    device: str | None = None,
    progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's k most similar candidate rows (inner product of prepared features).

    A row is never its own neighbour. Order: value descending, then lower stimulus index.

    Args:
        features: the prepared features of all n stimuli.
        k: neighbours per query, 1 ≤ k ≤ (number of candidates other than the query).
        queries: (q,) rows to find neighbours for (default: all n).
        candidates: (c,) distinct rows to search among, ascending (default: all n).
        device: ``"cpu"`` (default) or ``"cuda[:N]"`` for the float32 screen.
        progress: optional ``progress(done_queries, total_queries)``.

    Returns:
        ``(indices (q, k) int64 global rows, values (q, k) float64 inner products)``.

    Method: per block of query rows, S = Q₃₂ C₃₂ᵀ in float32 (torch), the top k + margin of each
    row, and every candidate whose float32 value is ≥ (k-th float32 value − 2δ) recomputed in
    float64 (δ = :func:`float32_error_bound`). Any true top-k candidate has a float32 value at
    least the true k-th value − δ, and the float32 k-th value is at most the true one + δ, so no
    true neighbour is lost; rows whose kept margin does not reach below that window are screened
    again with a wider margin. Memory: the float32 candidates and one (block, c) float32 block.
    """
    torch = _torch()
    n = features.n
    query_rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    candidate_index = np.arange(n) if candidates is None else np.asarray(candidates, np.int64)
    c = candidate_index.size
    for name, rows in (("queries", query_rows), ("candidates", candidate_index)):
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= n)):
            raise ValueError(f"{name} must be a 1-D array of rows in 0..{n - 1}")
    if c > 1 and not np.all(np.diff(candidate_index) > 0):
        # each query's own row is found by binary search: unsorted or repeated candidates would
        # let a query be its own neighbour
        raise ValueError("candidates must be distinct rows in ascending order; pass np.unique(...)")
    if query_rows.size == 0:
        return np.empty((0, k), np.int64), np.empty((0, k))
    # each query's own position among the candidates (excluded), -1 when it is not a candidate
    at = np.minimum(np.searchsorted(candidate_index, query_rows), c - 1)
    own = np.where(candidate_index[at] == query_rows, at, -1)
    available = c - int((own >= 0).any())
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not (
        1 <= k <= available
    ):
        raise ValueError(
            f"k = {k} neighbours were asked for among {c} candidates (the query itself excluded); "
            f"use 1 <= k <= {available}"
        )
    k = int(k)
    device_ = _device(device)
    width = 2.0 * float32_error_bound(features.d)
    # float64 candidates for the refinement, when they fit (else gathered per block); prepared
    # once and reused for the float32 screen and for queries among the candidates (a row's
    # preparation does not depend on the other rows, so these are the same numbers)
    fits = c * features.d * 8 <= _FLOAT64_CACHE_BYTES
    candidates64 = features.rows(candidate_index) if fits else None
    if candidates64 is None:
        candidates32 = _float32_block(features, candidate_index, device_)
    else:
        candidates32 = torch.from_numpy(candidates64.astype(np.float32)).to(device_)
    on_cpu = device_.type == "cpu"
    candidates32_cpu = candidates32.numpy() if on_cpu else None
    from_candidates = candidates64 is not None and bool((own >= 0).all())
    block = max(1, min(query_rows.size, _BLOCK_ELEMENTS // max(c, 1)))
    # every candidate queried, in order, in one block: the screen is C₃₂ C₃₂ᵀ, which BLAS
    # computes as a symmetric product (syrk: half the multiplications of a general one)
    symmetric = (
        on_cpu and from_candidates and block == query_rows.size == c
        and bool((own == np.arange(c)).all())
    )
    margin = min(c, k + max(8, k // 2))
    out_index = np.empty((query_rows.size, k), dtype=np.int64)
    out_values = np.empty((query_rows.size, k))
    for start in range(0, query_rows.size, block):
        stop = min(query_rows.size, start + block)
        if from_candidates:
            q64 = candidates64[own[start:stop]]
        else:
            q64 = features.rows(query_rows[start:stop])
        with torch.no_grad():
            if symmetric:
                sims = torch.from_numpy(candidates32_cpu @ candidates32_cpu.T)
            elif on_cpu:  # OpenBLAS sgemm: 1.2–1.35× torch's on these 2 cores (bench_neighbours)
                sims = torch.from_numpy(q64.astype(np.float32) @ candidates32_cpu.T)
            else:
                sims = torch.from_numpy(q64.astype(np.float32)).to(device_) @ candidates32.T
            mine = np.flatnonzero(own[start:stop] >= 0)
            if mine.size:
                sims[
                    torch.from_numpy(mine).to(device_),
                    torch.from_numpy(own[start:stop][mine]).to(device_),
                ] = -math.inf
            window, window_ok = _screen(sims, k, margin, width)
            del sims
        out_index[start:stop], out_values[start:stop] = _refine(
            q64, candidate_index, window, window_ok, features, candidates64, k
        )
        if progress is not None:
            progress(stop, query_rows.size)
    return out_index, out_values


# ----------------------------------------------------------------------------------------------
# stored lists


def list_size_for(n: int, requested: int = DEFAULT_LIST_SIZE) -> int:
    """K actually stored for n stimuli: ``min(requested, n − 1)``."""
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
        raise ValueError(
            f"the neighbour list size K must be a positive integer, got {requested!r}; "
            f"the default is {DEFAULT_LIST_SIZE}"
        )
    return int(min(requested, n - 1))


class NeighbourRangeError(ValueError):
    """Neighbour lists that name rows outside 0..n-1 (a run reading its own files says which file
    and how to repair the run: ``Run.neighbours``)."""


@dataclass(frozen=True)
class NeighbourLists:
    """Each stimulus's K most similar other stimuli, most similar first (ties: lower index).

    Attributes:
        indices: (n, K) int32 stimulus rows.
        values: (n, K) float64 inner products of prepared features, non-increasing along a row.
    """

    indices: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        i, v = self.indices, self.values
        if i.ndim != 2 or v.shape != i.shape or not np.issubdtype(i.dtype, np.integer):
            raise ValueError(
                f"neighbour lists need integer indices and float values of the same (n, K) shape, "
                f"got {i.dtype} {i.shape} and {v.dtype} {v.shape}; rebuild them with "
                "build_neighbour_lists"
            )
        # the compiled table loop indexes by these rows unchecked: a damaged file must stop here
        if i.size and (int(i.min()) < 0 or int(i.max()) >= i.shape[0]):
            raise NeighbourRangeError(
                f"the neighbour lists name stimuli outside 0..{i.shape[0] - 1} (damaged, or "
                "built for other stimuli); build them with build_neighbour_lists from these "
                "stimuli's features"
            )

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k_max(self) -> int:
        """K: the most neighbours stored per stimulus."""
        return int(self.indices.shape[1])


def build_neighbour_lists(
    features: PreparedFeatures,
    list_size: int = DEFAULT_LIST_SIZE,
    *,
    device: str | None = None,
    progress=None,
) -> NeighbourLists:
    """Exact K-nearest-neighbour lists of every stimulus (:func:`exact_top_k` over all rows).

    K = ``min(list_size, n − 1)``. Memory: the float32 features, one (block, n) float32 block
    (≤ 256 MB) and the (n, K) result; never an (n, n) array.
    """
    k = list_size_for(features.n, list_size)
    if k < 1:
        raise ValueError("neighbour lists need at least 2 stimuli")
    index, values = exact_top_k(features, k, device=device, progress=progress)
    return NeighbourLists(index.astype(np.int32), values)


# ----------------------------------------------------------------------------------------------
# within-subset neighbour tables


class _Completed(NamedTuple):
    """Rows of one set completed from the features: ``rows`` (r,) ascending positions in the
    sorted set, each row's ``kc`` nearest fellow members (``positions`` (r, kc) int32,
    ``values`` (r, kc) float64), most similar first, ties to the lower index."""

    rows: np.ndarray
    positions: np.ndarray
    values: np.ndarray

    @property
    def kc(self) -> int:
        return int(self.positions.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.rows, self.positions, self.values))


class _CompletionCache:
    """The completed rows of recent sets, per neighbour index (:data:`COMPLETION_CACHE_BYTES`
    for all of them, least recently used dropped first). Thread-safe: the lab's sessions share
    a run's indexes, and :func:`subset_alignment` asks for tables from a thread per core.
    Entries are never modified, only replaced. A set is known by its size and a 256-bit BLAKE2b
    digest of its sorted rows (not a copy of them: a set of 25,000 with one row completed keeps
    ~0.2 MB less)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, _Completed] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # indexes garbage-collected since the last get/put: a finalizer only appends here (a
        # deque's append takes no lock of ours). Taking the lock in the finalizer deadlocked: a
        # collection started by an allocation while this thread held the lock ran the finalizer
        # of another index, which then waited for the lock its own thread held.
        self._gone: deque[int] = deque()

    def _forget_gone(self) -> None:
        """Drop the entries of the indexes collected meanwhile (the lock held)."""
        if not self._gone:
            return
        owners = set()
        while self._gone:
            owners.add(self._gone.popleft())
        for key in [key for key in self._entries if key[0] in owners]:
            self._drop(key)

    def get(self, key: tuple) -> _Completed | None:
        with self._lock:
            self._forget_gone()
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: _Completed) -> None:
        with self._lock:
            self._forget_gone()
            self._drop(key)
            if entry.nbytes > COMPLETION_CACHE_BYTES:
                return
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > COMPLETION_CACHE_BYTES:
                self._drop(next(iter(self._entries)))

    def drop_owner(self, owner: int) -> None:
        """Forget the entries of one index (its finalizer: called when it is garbage-collected,
        at any allocation of any thread, so it never waits for the lock: its rows go now if the
        store is free, else at the next get or put)."""
        self._gone.append(owner)
        # dropped now when no thread is using the store (a free lock: nobody is changing it);
        # never waited for
        if self._lock.acquire(blocking=False):
            try:
                self._forget_gone()
            finally:
                self._lock.release()

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._forget_gone()
            return self._bytes


_COMPLETIONS = _CompletionCache()
_INDEX_TOKENS = itertools.count()


class Tables(NamedTuple):
    """Within-subset k-NN of B subsets of s stimuli, most similar first.

    positions: (B, s, k) int64 positions within each sorted subset; values: (B, s, k) float64.
    """

    positions: np.ndarray
    values: np.ndarray


class NeighbourIndex:
    """One model × layer of a run: prepared features and (optionally) stored neighbour lists.

    Without lists (``lists=None``) every table is computed exactly from the features, which costs
    O(s²·d) per subset: fine for small subsets, slow for large ones.
    """

    def __init__(self, features: PreparedFeatures, lists: NeighbourLists | None = None) -> None:
        if lists is not None and lists.n != features.n:
            raise ValueError(
                f"the neighbour lists cover {lists.n} stimuli but the features {features.n}; "
                "rebuild the lists from these features"
            )
        self.features = features
        self.lists = lists
        # this index's completed rows in the process-wide cache; forgotten with the index
        self._token = next(_INDEX_TOKENS)
        weakref.finalize(self, _COMPLETIONS.drop_owner, self._token)

    @classmethod
    def from_features(
        cls, X: np.ndarray, *, list_size: int = DEFAULT_LIST_SIZE, q: float = 0.95
    ) -> NeighbourIndex:
        """Index of raw features X (n, d): threshold, prepared features and exact lists."""
        features = PreparedFeatures.from_raw(X, q)
        return cls(features, build_neighbour_lists(features, list_size))

    @property
    def n(self) -> int:
        return self.features.n

    @property
    def k_max(self) -> int:
        """K of the stored lists (0 without lists)."""
        return 0 if self.lists is None else self.lists.k_max

    def nearest(self, row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` stimuli most similar to ``row`` (itself excluded), most similar first.

        Returns ``(rows (count,) int64, inner products (count,) float64)``; ties: lower row.
        """
        n = self.n
        if isinstance(row, bool) or not 0 <= int(row) < n:
            raise ValueError(f"row {row} is out of range for {n} stimuli; use 0..{n - 1}")
        count = int(min(count, n - 1))
        if self.lists is not None and count <= self.lists.k_max:
            return (
                self.lists.indices[row, :count].astype(np.int64),
                np.asarray(self.lists.values[row, :count], dtype=np.float64),
            )
        index, values = exact_top_k(self.features, count, queries=np.array([int(row)]))
        return index[0], values[0]

    def tables(self, subsets: np.ndarray, k: int) -> Tables:
        """Within-subset k-NN tables of B subsets, each (s,) sorted, distinct rows.

        Each member's neighbours are the first k subset members along its stored list; members
        whose list holds fewer than k of them are completed exactly from the features. The lists
        are read by :func:`.neighbour_kernels.tables_from_lists` (a compiled loop). Completed
        rows are computed once per set with at least :data:`COMPLETION_K` neighbours and kept
        (:data:`COMPLETION_CACHE_BYTES`): the same set at another k up to that many (the lab's k
        slider, the report's passes over one set) slices them instead of recomputing.
        """
        from .neighbour_kernels import tables_from_lists

        subsets = np.ascontiguousarray(subsets, dtype=np.int64)
        if subsets.ndim != 2 or (subsets.size and (subsets.min() < 0 or subsets.max() >= self.n)):
            raise ValueError(
                f"subsets must be a (B, s) array of stimulus rows in 0..{self.n - 1}, got shape "
                f"{subsets.shape}; check them with neighbours.check_subsets"
            )
        n_sets, s = subsets.shape
        positions = np.empty((n_sets, s, k), dtype=np.int64)
        values = np.empty((n_sets, s, k))
        incomplete: list[tuple[int, np.ndarray]] = []
        if self.lists is not None:
            if k > self.k_max and s > _DENSE_SUBSET:
                raise ValueError(
                    f"k = {k} is more than the {self.k_max} neighbours stored per stimulus; on a "
                    f"subset of {s} stimuli (> {_DENSE_SUBSET}) every neighbour would be "
                    f"recomputed from the features: use k <= {self.k_max}, or rebuild the run's "
                    "lists with a larger list size (precompute --list-size)"
                )
            complete = np.empty((n_sets, s), dtype=bool)
            tables_from_lists(
                np.asarray(self.lists.indices), np.asarray(self.lists.values), subsets, self.n, k,
                positions, values, complete,
            )
            incomplete = [(b, np.flatnonzero(~complete[b]))
                          for b in np.flatnonzero(~complete.all(axis=1))]
        else:
            incomplete = [(b, np.arange(s)) for b in range(n_sets)]
        for b, rows in incomplete:
            positions[b, rows], values[b, rows] = self._completed_rows(subsets[b], rows, k)
        return Tables(positions, values)

    def _completed_rows(
        self, members: np.ndarray, rows: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The within-set k nearest of the set ``members``' rows ``rows`` (ascending positions),
        from the kept completions of this set where they hold those rows at ≥ k neighbours;
        the other rows are computed (:meth:`_complete`) at max(k, :data:`COMPLETION_K`)
        neighbours (every row of the set when they are at least :data:`_WHOLE_SET_SHARE` of
        it) and kept with them. One order ranks every candidate (value descending, then the
        lower index), so the k nearest are the first k of the kc nearest: the same positions as
        computing at k, and from ``exact_top_k`` (sets above :data:`_DENSE_SUBSET`) the same
        values bit for bit. The dense path's values come from a matrix product whose last bit
        depends on the rows multiplied together (up to 3e-16 from the code before on sets of
        1,500; its positions are decided on exact values wherever rounding could decide)."""
        s = members.size
        key = (self._token, s, hashlib.blake2b(members.tobytes(), digest_size=32).digest())
        kept = _COMPLETIONS.get(key) if COMPLETION_CACHE_BYTES > 0 else None
        if kept is not None and kept.kc < k:
            kept = None  # a larger k than these rows hold: computed again, at the new k
        have = np.zeros(rows.size, dtype=bool)
        if kept is not None and kept.rows.size:
            at = np.minimum(np.searchsorted(kept.rows, rows), kept.rows.size - 1)
            have = kept.rows[at] == rows
        missing = rows[~have]
        if missing.size:
            if COMPLETION_CACHE_BYTES <= 0:  # nothing is kept: only what is asked for
                return self._complete(members, missing, k)
            kc = kept.kc if kept is not None else max(k, min(COMPLETION_K, s - 1))
            if kept is None and missing.size >= _WHOLE_SET_SHARE * s:
                # most of the set: all of it, by one symmetric product (half the work of a
                # general one), and no later k up to kc completes any row of it again
                missing = np.arange(s)
            found_positions, found_values = self._complete(members, missing, kc)
            if kept is None:
                order_rows, order_positions, order_values = (
                    missing, found_positions, found_values
                )
            else:  # disjoint rows, merged in ascending order
                order_rows = np.concatenate([kept.rows, missing])
                order = np.argsort(order_rows, kind="stable")
                order_rows = order_rows[order]
                order_positions = np.concatenate([kept.positions, found_positions])[order]
                order_values = np.concatenate([kept.values, found_values])[order]
            kept = _Completed(
                order_rows.astype(np.int64), order_positions.astype(np.int32), order_values
            )
            _COMPLETIONS.put(key, kept)
        at = np.searchsorted(kept.rows, rows)
        return kept.positions[at, :k], kept.values[at, :k]

    def _complete(
        self, members: np.ndarray, rows: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(positions (r, k), values (r, k)) of the set ``members``' rows ``rows`` computed from
        the features: the dense product for sets up to :data:`_DENSE_SUBSET`, else
        :func:`exact_top_k` of those rows against the set."""
        s = members.size
        if s <= _DENSE_SUBSET:
            from .metrics import neighbours_of_rows

            return neighbours_of_rows(
                self.features.rows(members), rows, k, norms=np.ones(s)  # unit rows
            )
        index, vals = exact_top_k(self.features, k, queries=members[rows], candidates=members)
        return np.searchsorted(members, index), vals


# ----------------------------------------------------------------------------------------------
# metrics of many subsets from their tables


class SubsetAlignment(NamedTuple):
    """``cknna`` and ``mutual_knn`` (each (len(pairs), B) float64; CKNNA NaN where a self-HSIC
    estimate is negative, as in the reference; None when not asked for) and ``values``:
    ``{metric: (len(pairs), B)}`` for every neighbour metric asked for (``metrics.measure_tables``
    names)."""

    cknna: np.ndarray
    mutual_knn: np.ndarray
    values: dict[str, np.ndarray]


def check_subsets(subsets: object, n: int, k: int, *, min_k: int = 1) -> np.ndarray:
    """(B, s) int64 with each row sorted; ValueError naming the fix for bad subsets or k."""
    array = np.asarray(subsets)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(
            f"subsets must be a non-empty (B, s) array of row indices, got shape {array.shape}; "
            "stack one row of indices per subset"
        )
    rows = [np.sort(check_indices(row, n)) for row in array]
    out = np.stack(rows)
    # every metric of the subset engine takes sets of 4 or more (CKNNA's unbiased HSIC needs 4)
    check_min_stimuli(out.shape[1], 4, "a set of the subset engine (any metric, as CKNNA)")
    check_k(k, out.shape[1], min_k)
    return out


def subset_alignment(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    subsets: np.ndarray,
    k: int,
    *,
    metrics: Sequence[str] = ("cknna", "mutual_knn"),
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> SubsetAlignment:
    """Neighbour metrics of every pair of indexes on every subset.

    Equal to the metric on the prepared features of each subset (the dense definition, e.g.
    ``alignment.cknna``; tested to 1e-9), with ties to the lower stimulus index: each model's
    within-subset tables come from its index (:meth:`NeighbourIndex.tables`), the numbers from the
    metric registry (``metrics.measure_tables``), all subsets of a chunk in one batched call.

    Args:
        indexes: ``{key: NeighbourIndex}`` holding every key named in ``pairs`` (same n stimuli).
        pairs: ``(key of X, key of Y)`` per comparison.
        subsets: (B, s) or (s,) int rows; each row distinct stimuli, s ≥ 4 (any order).
        k: neighbours per stimulus, 1 ≤ k < s (CKNNA needs k ≥ 2).
        metrics: neighbour metrics to compute (only these: a lab that shows one metric does not
            pay for CKNNA's tables-to-HSIC pass).
        options: ``{metric: options}`` other than the registry's defaults (``lcs_knn``'s
            ``normalise``), k excluded.

    Returns:
        :class:`SubsetAlignment`.
    """
    from . import metrics as registry

    names = list(dict.fromkeys(metrics))
    if not names:
        raise ValueError("metrics is empty; name at least one neighbour metric, e.g. ['cknna']")
    for name in names:
        if not registry.metric(name).neighbour_metric:
            raise ValueError(
                f"{name} is not a neighbour metric; compute it from the subset's features with "
                "metrics.measure"
            )
    keys = list(dict.fromkeys(key for pair in pairs for key in pair))
    missing = [key for key in keys if key not in indexes]
    if missing:
        raise ValueError(f"no neighbour index for {missing}; pass one per key named in pairs")
    sizes = {indexes[key].n for key in keys}
    if len(sizes) > 1:
        raise ValueError(
            f"the indexes cover different numbers of stimuli ({sorted(sizes)}); use indexes of "
            "the same run"
        )
    n = sizes.pop() if sizes else 0
    sets = check_subsets(subsets, n, k, min_k=max(registry.metric(name).min_k for name in names))
    n_sets, s = sets.shape
    out = {name: np.empty((len(pairs), n_sets)) for name in names}
    chunk = max(1, _ENTRY_CHUNK // max(1, s * k * k))
    options = {name: dict((options or {}).get(name) or {}) for name in names}
    # a metric of two halves is summed from each model's half, at its default options
    halves = [
        name for name in names if registry.metric(name).side is not None and not options[name]
    ]
    # Large sets: one task per model × set and per pair × set, on a thread per core (the compiled
    # loops release the GIL), so every core is busy however many models there are. Small sets:
    # one batched call per model for the whole chunk.
    threads = (os.cpu_count() or 1) if s * k >= _THREADED_ENTRIES else 1

    def tables_and_sides(task):
        """One model's tables of some sets and, for each metric with halves, its half (once,
        however many pairs the model is in)."""
        key, rows = task
        t = indexes[key].tables(rows, k)
        return t, {name: registry.metric(name).side(t.positions, t.values) for name in halves}

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, n_sets, chunk):
            stop = min(n_sets, start + chunk)
            parts = [(b, b + 1) for b in range(start, stop)] if threads > 1 else [(start, stop)]
            tasks = [(key, part) for key in keys for part in parts]
            made = dict(zip(tasks, pool.map(tables_and_sides,
                                            [(key, sets[slice(*part)]) for key, part in tasks])))

            def pair_values(task, made=made):
                _, (x_key, y_key), part = task
                (x, x_sides), (y, y_sides) = made[x_key, part], made[y_key, part]
                return [
                    registry.metric(name).from_sides(x_sides[name], y_sides[name])
                    if name in halves
                    else registry.measure_tables(name, x.positions, y.positions, x.values,
                                                 y.values, **options[name])
                    for name in names
                ]

            pair_tasks = [(p, pair, part) for p, pair in enumerate(pairs) for part in parts]
            for (p, _, part), values in zip(pair_tasks, pool.map(pair_values, pair_tasks)):
                for name, value in zip(names, values, strict=True):
                    out[name][p, slice(*part)] = value
    return SubsetAlignment(out.get("cknna"), out.get("mutual_knn"), out)
