"""Any registry metric of vision × language pairs on many stimulus sets at once: the one engine.

The Alignment lab, the report's Fig. 2 sets and the calibration of a set's score (issue 14, items
1 and 6) ask one question many times: the value of a metric (``metrics.metric_names()``) for every
pair on each of B sets of s stimuli — the chosen sets, 200 random sets, matched random sets,
relabelled low/high sets — and the same score with the vision–language pairing shuffled within a
set. :func:`metric_values` answers both for every metric of the registry, by name, several metrics
and pairs in one call (sharing what they have in common), without a per-metric code path outside
the registry; :func:`metric_on_sets` is its one-metric form (and ``paired_with`` its shuffled
pairings), and
``analyses.set_metric_values`` and ``analyses.shuffled_pairing_calibration`` call it:

* **Neighbour metrics** (``metric(name).neighbour_metric``) come from the subset engine,
  ``neighbours.subset_alignment`` (the run's exact neighbour lists; every set of a chunk in one
  batched pass). With the pairing shuffled (``paired_with``), each side's within-set tables come
  from the same index (``NeighbourIndex.tables`` of the sorted set) and are relabelled to the
  given order (``metrics.permute_table``): a model's tables of a set are built once per chunk of
  pairings, for all its pairs and metrics.
* **Feature metrics** (CKA, unbiased CKA — linear or RBF kernel — and SVCCA) come from the sets'
  prepared features (``NeighbourIndex.features``, the features every neighbour list was built
  from). CKA-family metrics of a run of at most :data:`DENSE_GRAM_STIMULI` stimuli use the small-n
  fast path: each side's (n, n) kernel once, the (b, s, s) sub-kernels of a chunk of sets gathered
  from it once per model for all its pairs (``metrics.kernel_side``), and
  ``metrics.cka_from_kernel_sides`` on all of them at once (the kernels are kept between calls
  while their index lives, at most :data:`KERNEL_CACHE_BYTES`). Above it (and for SVCCA) a
  metric split in sides (``feature_side``: CKA, unbiased CKA, SVCCA) takes each model's side of a
  set once for all its pairs and for the metrics sharing it (CKA and unbiased CKA with one
  kernel), and a shuffled pairing reorders the set's side (``permuted_feature_side``) instead of
  making a new one; nothing (n, n). Metrics invariant to orthogonal maps read the rows in
  row-space coordinates (:func:`row_space_coordinates`) when the features are wider than the rows
  read at once (the union of a batch's sets, or one set).

Every value equals ``metrics.measure(name, X[rows_x], Y[rows_y], **options)`` on the prepared
features (tested to 1e-9 for each metric and both routes) where no two stimuli tie exactly
(duplicate stimuli): neighbour ties go here to the lower stimulus index, in ``measure`` to the
earlier row as given, so with duplicates the neighbour metrics may differ for rows given out of
index order (a shuffled pairing, an unsorted set).

Shapes: ``n`` stimuli in the run, ``P`` pairs, ``B`` sets of ``s`` stimuli, ``k`` neighbours.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from . import metrics as registry
from .neighbours import NeighbourIndex, check_subsets, subset_alignment

__all__ = [
    "DENSE_GRAM_STIMULI",
    "MIN_K",
    "MIN_SET_SIZE",
    "OnError",
    "cca_dim_limit",
    "default_set_size",
    "k_for_sets",
    "largest_k",
    "metric_on_sets",
    "metric_options",
    "metric_values",
    "row_space_coordinates",
    "set_scorer",
    "uses_dense_kernels",
]

#: Largest run whose (n, n) kernels the CKA-family route forms (32 MB float64 per side at 2,048)
DENSE_GRAM_STIMULI = 2048
#: Elements of one chunk of gathered sub-kernels or relabelled tables (~32 MB float64)
_CHUNK_ELEMENTS = 4_000_000


def metric_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The registry's options of ``name`` with ``options`` applied, ``k`` excluded (it is given
    separately): ``metrics.check_options`` with k apart."""
    return registry.check_options(name, options, k_apart=True)


def cca_dim_limit(set_size: int, widths: Iterable[int]) -> int:
    """The largest SVCCA ``cca_dim`` sets of ``set_size`` stimuli allow between layers of these
    feature ``widths`` (every layer compared): min(set_size − 1, every width), as
    ``metrics.svcca`` bounds it, and at least 1. The report and the Alignment lab clamp their
    ``cca_dim`` to it (a larger one raises on every set). A set whose standardised features have
    fewer independent directions than ``cca_dim`` (repeated stimuli, features that do not vary)
    still has no SVCCA: :func:`metric_values` with ``on_error="nan"`` gives NaN there."""
    widths = [int(width) for width in widths]
    if not widths:
        raise ValueError("pass the feature width of at least one layer compared")
    return max(1, min(int(set_size) - 1, *widths))


#: Fewest stimuli of a low-, high-dispersion or random set of the pages and of the report's sets
#: when its k is lowered (:func:`default_set_size`)
MIN_SET_SIZE = 4
#: Smallest k the pages offer and :func:`k_for_sets` lowers to (CKNNA needs 2)
MIN_K = 2


def default_set_size(n_stimuli: int) -> int:
    """The default size of the low-, high-dispersion and random sets of the dashboard's pages: a
    quarter of the stimuli, ``n // 4``, at least :data:`MIN_SET_SIZE` (at most n). The report
    uses it too where its default k does not fit its own default sets (``report.sets_and_k``), so
    that there it measures the sets the Alignment lab shows, at the lab's k."""
    return max(min(MIN_SET_SIZE, int(n_stimuli)), int(n_stimuli) // 4)


def largest_k(smallest: int) -> int:
    """The largest k sets whose smallest holds ``smallest`` stimuli allow: ``smallest − 1`` (a
    stimulus is never its own neighbour), at least 1."""
    return max(1, int(smallest) - 1)


def k_for_sets(k: int, smallest: int) -> int:
    """The k a neighbour metric uses on sets whose smallest holds ``smallest`` stimuli: ``k``
    lowered to ``smallest − 1`` where larger (each stimulus needs k other stimuli of its set as
    neighbours), and raised to :data:`MIN_K`; at least 1. The one rule of the Alignment lab (its
    k slider stops at it, and a larger k asked for is used as it) and of the report where its k
    was not given (``report.sets_and_k``): an explicit k that is too large is refused there
    instead (``validation.check_k``)."""
    return min(max(MIN_K, int(k)), largest_k(smallest))


#: Bytes of (n, n) kernels kept between calls (least recently used dropped first)
KERNEL_CACHE_BYTES = 256 * 2**20
_kernels: OrderedDict[tuple[int, str, float], tuple[weakref.ref, np.ndarray]] = OrderedDict()
_kernels_lock = threading.Lock()


def _dense_kernel(index: NeighbourIndex, kernel: str, sigma: float) -> np.ndarray:
    """(n, n) float64 kernel of the prepared features (the small-n fast path only), kept for
    the next call while the index lives (a lab changing k or the sets reuses it), read-only."""
    key = (id(index), kernel, float(sigma))
    with _kernels_lock:
        held = _kernels.get(key)
        if held is not None and held[0]() is index:
            _kernels.move_to_end(key)
            return held[1]
    matrix = _compute_kernel(index, kernel, sigma)
    matrix.flags.writeable = False
    with _kernels_lock:
        _kernels[key] = (weakref.ref(index), matrix)
        total = sum(m.nbytes for _, m in _kernels.values())
        while total > KERNEL_CACHE_BYTES and len(_kernels) > 1:
            _, (_, dropped) = _kernels.popitem(last=False)
            total -= dropped.nbytes
    return matrix


def _compute_kernel(index: NeighbourIndex, kernel: str, sigma: float) -> np.ndarray:
    features = index.features.rows(slice(None))
    gram = features @ features.T
    if kernel == "linear":
        return gram
    norms = np.diagonal(gram).copy()
    squared = norms[:, None] + norms[None, :] - 2.0 * gram
    return np.exp(-np.maximum(squared, 0.0) / (2.0 * float(sigma) ** 2))


def uses_dense_kernels(name: str, n: int, dense_limit: int = DENSE_GRAM_STIMULI) -> bool:
    """Whether ``name`` on sets of a run of n stimuli takes the batched route of (n, n) kernels
    (the CKA family at small n); else each set is one ``metrics.measure`` call."""
    return name in ("cka", "unbiased_cka") and n <= dense_limit


def _kernel_key(options: Mapping[str, Any]) -> tuple[str, float]:
    """(kernel, sigma) of a CKA metric's options, checked as ``metrics.measure`` checks them."""
    return registry.check_kernel(options.get("kernel", "linear"), options.get("sigma", 1.0))


#: What a feature metric that is undefined on a set gives: an error, or NaN.
OnError = Literal["raise", "nan"]

#: Prepared values (stimuli × dimensions; 256 MB of float64, and as much again for their
#: row-space coordinates) that the feature rows of a batch's union of sets may hold for all models
#: together; a model whose share would be larger reads its rows set by set instead.
_UNION_ROWS_MAX_VALUES = 32_000_000


def metric_values(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    sets: object,
    metrics: Sequence[str] | str,
    *,
    paired_with: object = None,
    k: int = 10,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    on_error: OnError = "raise",
    dense_limit: int = DENSE_GRAM_STIMULI,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``{metric: (P, B) float64}``: every metric of every pair on every set — the engine behind
    :func:`metric_on_sets`, ``analyses.set_metric_values`` and the
    calibration of a set's score against shuffled pairings.

    Args:
        indexes: ``{key: NeighbourIndex}`` holding both keys of every pair (one run).
        pairs: ``(key of X, key of Y)`` per comparison (e.g. ``analyses.Pair.sides``).
        sets: (B, s) or (s,) stimulus rows of X, each row distinct stimuli (any order).
        metrics: registry names (``metrics.metric_names()``); order kept, repeats dropped.
        paired_with: None (Y at the same rows), or (B, s) rows of Y, row m of ``sets[b]`` paired
            with row m of ``paired_with[b]`` (a shuffled pairing: the same set in another order).
        k: neighbours per stimulus (neighbour metrics only; k < s).
        options: ``{metric: {option: value}}`` (``kernel``, ``sigma``, ``cca_dim``, ...).
        on_error: ``"raise"``, or ``"nan"``: a feature metric undefined on a set (ValueError,
            e.g. SVCCA on features of lower rank than ``cca_dim``) gives NaN there.
        dense_limit: largest n for the CKA family's (n, n)-kernel route.
        progress: ``progress(done, B)`` after each set of the feature metrics measured set by set
            (the slow part on large sets; the other routes take all sets at once).

    Work is shared wherever the values allow it: neighbour tables per model and set for all
    neighbour metrics and pairs, a model's sub-kernels for CKA and unbiased CKA, a model's
    feature side once per set for every pair and every metric that shares it (CKA and unbiased
    CKA with the same kernel), and where the Y rows are the set in another order that side is
    the set's own reordered (``permuted_feature_side``).
    """
    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
    names = list(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    if not names:
        raise ValueError(f"pass at least one metric; known metrics: {registry.metric_names()}")
    given = dict(options or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"options name metrics not asked for: {unknown}; ask for them too")
    chosen = {name: metric_options(name, given.get(name)) for name in names}
    pairs = [tuple(pair) for pair in pairs]
    if not pairs:
        raise ValueError("pairs is empty; pass at least one (key of X, key of Y) pair")
    rows_x = _check_sets(indexes, pairs, sets)
    rows_y = rows_x if paired_with is None else _check_sets(indexes, pairs, paired_with)
    if rows_x.shape != rows_y.shape:
        raise ValueError(
            f"sets {rows_x.shape} and paired_with {rows_y.shape} must pair s stimuli of X with s "
            "of Y in each of B sets; pass arrays of the same shape"
        )
    n = indexes[pairs[0][0]].n
    out: dict[str, np.ndarray] = {}
    neighbour = [name for name in names if registry.metric(name).neighbour_metric]
    if neighbour:
        out.update(_neighbour_values(indexes, pairs, rows_x, rows_y, neighbour, chosen, k,
                                     paired=paired_with is not None))
    dense = [name for name in names if name not in out and uses_dense_kernels(name, n, dense_limit)]
    if dense:
        out.update(_dense_cka_values(indexes, pairs, rows_x, rows_y, dense, chosen, on_error))
    feature = [name for name in names if name not in out]
    if feature:
        out.update(_feature_values(indexes, pairs, rows_x, rows_y, feature, chosen, on_error,
                                   progress))
    return {name: out[name] for name in names}


def metric_on_sets(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    sets: object,
    metric: str,
    *,
    k: int = 10,
    options: Mapping[str, Any] | None = None,
    on_error: OnError = "raise",
    dense_limit: int = DENSE_GRAM_STIMULI,
) -> np.ndarray:
    """(P, B) float64: ``metric`` of every pair on every set (the same rows on both sides);
    :func:`metric_values` for one metric (its arguments; ``on_error="nan"``: NaN on a set where
    a feature metric is undefined)."""
    return metric_values(indexes, pairs, sets, [metric], k=k, options={metric: options or {}},
                         on_error=on_error, dense_limit=dense_limit)[metric]


def _check_sets(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    sets: object,
) -> np.ndarray:
    keys = list(dict.fromkeys(key for pair in pairs for key in pair))
    missing = [key for key in keys if key not in indexes]
    if missing:
        raise ValueError(f"no neighbour index for {missing}; pass one per key named in pairs")
    sizes = {indexes[key].n for key in keys}
    if len(sizes) != 1:
        raise ValueError(
            f"the indexes cover different numbers of stimuli ({sorted(sizes)}); use indexes of "
            "one run"
        )
    array = np.asarray(sets)
    if array.ndim == 1:
        array = array[None, :]
    check_subsets(array, sizes.pop(), 1)  # distinct rows in range, s >= 4 (order kept here)
    return array.astype(np.int64)


def _roles(rows_x: np.ndarray, rows_y: np.ndarray) -> tuple[str, str]:
    """How a model's side is named on each side of a pair: once per model when both sides have
    the same rows, else once per model and side."""
    return ("", "") if rows_x is rows_y else ("x", "y")


def _neighbour_values(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    rows_x: np.ndarray,
    rows_y: np.ndarray,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    k: int,
    *,
    paired: bool,
) -> dict[str, np.ndarray]:
    """Neighbour metrics: the same rows on both sides from the subset engine
    (``neighbours.subset_alignment``, all sets of a chunk at once, registry defaults); pairings
    from each side's tables of the sorted set (``NeighbourIndex.tables``, each distinct set once)
    relabelled to the given order, every model's once per chunk for all pairs and metrics."""
    if not paired:
        result = subset_alignment(indexes, list(pairs), rows_x, k, metrics=list(names),
                                  options=options)
        return {name: np.asarray(result.values[name], dtype=np.float64) for name in names}
    from .validation import check_k

    n_sets, s = rows_x.shape
    check_k(k, s, max(registry.metric(name).min_k for name in names), what="each set")
    out = {name: np.empty((len(pairs), n_sets)) for name in names}
    roles = _roles(rows_x, rows_y)
    n_sides = len({(key, roles[0]) for key, _ in pairs} | {(key, roles[1]) for _, key in pairs})
    # the tables of a chunk of every side together at most ~2 × _CHUNK_ELEMENTS entries, and a
    # metric's (b, s, k, k) work on one pair's at most _CHUNK_ELEMENTS (or one set's, when a set
    # alone is more: each side then holds that one set's tables)
    chunk = max(1, min(2 * _CHUNK_ELEMENTS // (s * k * n_sides), _CHUNK_ELEMENTS // (s * k * k)))
    for start in range(0, n_sets, chunk):
        a, b = rows_x[start : start + chunk], rows_y[start : start + chunk]
        tables: dict[tuple[Hashable, str], tuple[np.ndarray, np.ndarray]] = {}
        for p, (x, y) in enumerate(pairs):
            for key, role, rows in ((x, roles[0], a), (y, roles[1], b)):
                if (key, role) not in tables:
                    tables[(key, role)] = _relabelled_tables(indexes[key], rows, k)
            (table_x, values_x), (table_y, values_y) = tables[(x, roles[0])], tables[(y, roles[1])]
            for name in names:
                out[name][p, start : start + a.shape[0]] = registry.measure_tables(
                    name, table_x, table_y, values_x, values_y, **options[name]
                )
    return out


def _relabelled_tables(
    index: NeighbourIndex, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(b, s, k) positions and values of each row of ``rows`` (b, s) **in the given order**:
    the tables of the sorted set (``NeighbourIndex.tables``, each distinct set once) relabelled
    so that row p is stimulus ``rows[:, p]`` and entries are positions in ``rows``' order."""
    order = np.argsort(rows, axis=1, kind="stable")
    unique, inverse = np.unique(np.take_along_axis(rows, order, axis=1), axis=0,
                                return_inverse=True)
    tables = index.tables(unique, k)
    ranks = np.argsort(order, axis=1)  # position of rows[b, p] within its sorted set
    inverse = np.asarray(inverse).reshape(-1)
    positions = registry.permute_table(tables.positions[inverse], ranks)
    values = np.take_along_axis(tables.values[inverse], ranks[:, :, None], axis=1)
    return positions, values


def _dense_cka_values(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    rows_x: np.ndarray,
    rows_y: np.ndarray,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    on_error: OnError,
) -> dict[str, np.ndarray]:
    """CKA and unbiased CKA on the small-n route: each model's (n, n) kernel once, and per chunk
    of sets each model's (b, s, s) sub-kernels and their own sums once for all its pairs and for
    both metrics where they share the kernel (``metrics.kernel_side``); a pair then costs Σ K∘L.
    When every set of ``rows_x`` is the same (a shuffled pairing: only the Y side's order
    changes) the X side is one set. An error there (a model's kernel that is not finite) is one
    for every set: with ``on_error="nan"`` the metrics of that kernel are NaN throughout."""
    out: dict[str, np.ndarray] = {}
    by_kernel: dict[tuple[str, float], list[str]] = {}
    for name in names:
        by_kernel.setdefault(_kernel_key(options[name]), []).append(name)
    for (kernel, sigma), group in by_kernel.items():
        try:
            out.update(_dense_cka_group(indexes, pairs, rows_x, rows_y, group, kernel, sigma))
        except ValueError:
            if on_error == "raise":
                raise
            out.update({name: np.full((len(pairs), rows_x.shape[0]), np.nan) for name in group})
    return out


def _dense_cka_group(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    rows_x: np.ndarray,
    rows_y: np.ndarray,
    names: Sequence[str],
    kernel: str,
    sigma: float,
) -> dict[str, np.ndarray]:
    n_sets, s = rows_x.shape
    fixed_x = bool((rows_x == rows_x[:1]).all())
    roles = _roles(rows_x, rows_y)
    if rows_x is rows_y and fixed_x:
        roles = ("fixed", "")
    kernels = {
        key: _dense_kernel(indexes[key], kernel, sigma) for pair in pairs for key in pair
    }
    out = {name: np.empty((len(pairs), n_sets)) for name in names}
    # the sub-kernels of a chunk of every side together: at most ~2 × _CHUNK_ELEMENTS (as two
    # sides of a chunk did when each pair gathered its own), however many models there are,
    # unless one set's are more: then a chunk is one set, (s, s) per side (32 MB at s = 2,048)
    n_sides = len({(key, roles[0]) for key, _ in pairs} | {(key, roles[1]) for _, key in pairs})
    chunk = max(1, 2 * _CHUNK_ELEMENTS // (s * s * n_sides))
    for start in range(0, n_sets, chunk):
        a, b = rows_x[start : start + chunk], rows_y[start : start + chunk]
        if fixed_x:
            a = a[:1]
        sides: dict[tuple[Hashable, str], registry.KernelSide] = {}
        for p, (x, y) in enumerate(pairs):
            for key, role, rows in ((x, roles[0], a), (y, roles[1], b)):
                if (key, role) not in sides:
                    sides[(key, role)] = registry.kernel_side(
                        kernels[key][rows[:, :, None], rows[:, None, :]]
                    )
            for name in names:
                out[name][p, start : start + b.shape[0]] = registry.cka_from_kernel_sides(
                    sides[(x, roles[0])], sides[(y, roles[1])], unbiased=name == "unbiased_cka"
                )
    return out


def row_space_coordinates(features: np.ndarray) -> np.ndarray:
    """Features (m, d) written in m coordinates when d > m (else unchanged): Z Zᵀ = F Fᵀ (Z the
    coordinates of the rows in an orthonormal basis of their row space), so every inner product,
    norm and distance between rows — and any metric invariant to orthogonal maps that sees the
    features only through them — is kept, at a fraction of the width."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[1] <= features.shape[0]:
        return features
    return np.linalg.qr(features.T, mode="r").T


class _SetRows:
    """Prepared feature rows of one model × layer for the members of a batch of sets.

    The union of the sets' stimuli is read once (while it holds at most ``max_values`` values);
    ``reduced`` rows are its coordinates in its own row space (:func:`row_space_coordinates`), on
    which a metric invariant to orthogonal maps of the features — all of the registry's depend on
    the features only through inner products — has the same value as on the rows themselves
    (tested, every metric)."""

    def __init__(
        self, index: NeighbourIndex, sets: Sequence[np.ndarray], reduce: bool, max_values: int
    ) -> None:
        self._features = index.features
        self._reduce = reduce
        union = np.unique(np.concatenate([np.ravel(rows) for rows in sets]))
        self._union: np.ndarray | None = None
        if union.size * self._features.d <= max_values:
            self._union = union
            self._full = self._features.rows(union)
            self._reduced = row_space_coordinates(self._full) if reduce else self._full

    def rows(self, members: np.ndarray, reduced: bool) -> np.ndarray:
        """(s, ·) float64 rows of ``members`` (sorted stimulus rows of one set)."""
        if self._union is None:
            full = self._features.rows(members)
            return row_space_coordinates(full) if reduced and self._reduce else full
        positions = np.searchsorted(self._union, members)
        return (self._reduced if reduced else self._full)[positions]


def _side_key(name: str, options: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a metric's ``feature_side`` depends on: the function and its options (CKA and
    unbiased CKA with the same kernel share one side)."""
    return (registry.metric(name).feature_side, *sorted(options.items()))


def _feature_values(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    rows_x: np.ndarray,
    rows_y: np.ndarray,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    on_error: OnError,
    progress: Callable[[int, int], None] | None,
) -> dict[str, np.ndarray]:
    """Feature metrics set by set. A metric split in sides (``feature_side``) takes each model's
    side once per set for all its pairs and the metrics sharing it; the side of a set is kept
    while the next set has the same members, and reordered (``permuted_feature_side``) when they
    come in another order (a shuffled pairing). Other metrics are one ``metrics.measure`` call per
    pair and set. Metrics invariant to orthogonal maps read the rows in row-space coordinates."""
    n_sets = rows_x.shape[0]
    roles = _roles(rows_x, rows_y)
    invariant = {name: registry.ORTHOGONAL in registry.metric(name).invariances for name in names}
    keys = list(dict.fromkeys(key for pair in pairs for key in pair))
    readers = {
        key: _SetRows(indexes[key], [rows_x] if rows_x is rows_y else [rows_x, rows_y],
                      reduce=any(invariant.values()),
                      max_values=_UNION_ROWS_MAX_VALUES // len(keys))
        for key in keys
    }
    out = {name: np.empty((len(pairs), n_sets)) for name in names}
    kept: dict[tuple[Hashable, str, tuple[Any, ...]], tuple[np.ndarray, Any]] = {}
    for b in range(n_sets):
        rows_of = {roles[0]: rows_x[b], roles[1]: rows_y[b]}
        members = {role: np.sort(rows) for role, rows in rows_of.items()}
        read_rows: dict[tuple[Hashable, str, bool], np.ndarray] = {}
        sides: dict[tuple[Hashable, str, tuple[Any, ...]], Any] = {}

        def rows(key: Hashable, role: str, reduced: bool, members=members, rows_of=rows_of,
                 read_rows=read_rows) -> np.ndarray:
            """The model's rows of this set in the set's given order."""
            if (key, role, reduced) not in read_rows:
                sorted_rows = readers[key].rows(members[role], reduced)
                given = rows_of[role]
                read_rows[(key, role, reduced)] = (
                    sorted_rows if np.array_equal(given, members[role])
                    else sorted_rows[np.searchsorted(members[role], given)]
                )
            return read_rows[(key, role, reduced)]

        def side(key: Hashable, role: str, name: str, members=members, rows_of=rows_of,
                 sides=sides) -> Any:
            """The model's side of this set for ``name`` (None where undefined and NaN asked)."""
            shared = (key, role, _side_key(name, options[name]))
            if shared in sides:
                return sides[shared]
            entry = registry.metric(name)
            try:
                if entry.permuted_feature_side is None:
                    value = entry.feature_side(rows(key, role, invariant[name]), **options[name])
                else:
                    held = kept.get(shared)
                    if held is None or not np.array_equal(held[0], members[role]):
                        held = (members[role], entry.feature_side(
                            readers[key].rows(members[role], invariant[name]), **options[name]
                        ))
                        kept[shared] = held
                    given = rows_of[role]
                    value = held[1] if np.array_equal(given, members[role]) else (
                        entry.permuted_feature_side(
                            held[1], np.searchsorted(members[role], given)
                        )
                    )
            except ValueError:
                if on_error == "raise":
                    raise
                value = None
            sides[shared] = value
            return value

        for p, (x, y) in enumerate(pairs):
            for name in names:
                combine = registry.metric(name).from_feature_sides
                if combine is not None:
                    x_side, y_side = side(x, roles[0], name), side(y, roles[1], name)
                    out[name][p, b] = (
                        np.nan if x_side is None or y_side is None else combine(x_side, y_side)
                    )
                    continue
                try:
                    out[name][p, b] = registry.measure(
                        name, rows(x, roles[0], invariant[name]), rows(y, roles[1],
                                                                       invariant[name]),
                        **options[name],
                    )
                except ValueError:
                    if on_error == "raise":
                        raise
                    out[name][p, b] = np.nan
        if progress is not None:
            progress(b + 1, n_sets)
    return out


def set_scorer(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    metric: str,
    *,
    k: int = 10,
    options: Mapping[str, Any] | None = None,
    on_error: OnError = "raise",
) -> Callable[[np.ndarray], np.ndarray]:
    """``score(sets (B, s)) -> (P, B)``: :func:`metric_on_sets` with everything else fixed (the
    form ``stats.permutation_tests_two_sets`` and ``random_baseline`` take; the lab's
    permutation test uses it with ``on_error="nan"``)."""
    return lambda sets: metric_on_sets(
        indexes, pairs, sets, metric, k=k, options=options, on_error=on_error
    )
