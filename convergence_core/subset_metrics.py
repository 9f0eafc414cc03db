"""Any registry metric of vision × language pairs on many stimulus sets at once.

The Alignment lab and the calibration of a set's score (issue 14, items 1 and 6) ask one question
many times: the value of a metric (``metrics.metric_names()``) for every pair on each of B sets of
s stimuli — the chosen sets, 200 random sets, matched random sets, relabelled low/high sets — and
the same score with the vision–language pairing shuffled within a set. This module answers both for
every metric of the registry, by name, without a per-metric code path outside the registry:

* **Neighbour metrics** (``metric(name).neighbour_metric``) come from the subset engine,
  ``neighbours.subset_alignment`` (the run's exact neighbour lists; every set of a chunk in one
  batched pass). With the pairing shuffled (:func:`metric_on_pairings`), each side's within-set
  tables come from the same index (``NeighbourIndex.tables`` of the sorted set) and are relabelled
  to the given order (``metrics.permute_table``): a set's tables are built once however many
  shuffles are scored.
* **Feature metrics** (CKA, unbiased CKA — linear or RBF kernel — and SVCCA) come from the sets'
  prepared features (``NeighbourIndex.features``, the features every neighbour list was built
  from). CKA-family metrics of a run of at most :data:`DENSE_GRAM_STIMULI` stimuli use the small-n
  fast path: each side's (n, n) kernel once, the (b, s, s) sub-kernels of a chunk of sets gathered
  from it once per model for all its pairs (``metrics.kernel_side``), and
  ``metrics.cka_from_kernel_sides`` on all of them at once (the kernels are kept between calls
  while their index lives, at most :data:`KERNEL_CACHE_BYTES`). Above it (and for SVCCA) every
  set is one ``metrics.measure`` call on its prepared rows, which picks its own route (O(s·d²) for
  large sets; nothing (n, n)).

Every value equals ``metrics.measure(name, X[rows_x], Y[rows_y], **options)`` on the prepared
features (tested to 1e-9 for each metric and both routes).

Shapes: ``n`` stimuli in the run, ``P`` pairs, ``B`` sets of ``s`` stimuli, ``k`` neighbours.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from . import metrics as registry
from .neighbours import NeighbourIndex, check_subsets, subset_alignment

__all__ = [
    "DENSE_GRAM_STIMULI",
    "metric_on_pairings",
    "metric_on_sets",
    "metric_options",
    "set_scorer",
    "uses_dense_kernels",
]

#: Largest run whose (n, n) kernels the CKA-family route forms (32 MB float64 per side at 2,048)
DENSE_GRAM_STIMULI = 2048
#: Elements of one chunk of gathered sub-kernels or relabelled tables (~32 MB float64)
_CHUNK_ELEMENTS = 4_000_000


def metric_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The registry's options of ``name`` with ``options`` applied (``k`` excluded: it is given
    separately); ValueError naming the options the metric takes for any other key."""
    entry = registry.metric(name)
    given = dict(options or {})
    given.pop("k", None)
    unknown = sorted(set(given) - set(entry.options))
    if unknown:
        takes = ", ".join(o for o in entry.options if o != "k") or "no options besides k"
        raise ValueError(f"{name} does not take {', '.join(map(repr, unknown))}; it takes {takes}.")
    return {key: value for key, value in {**entry.options, **given}.items() if key != "k"}


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
    kernel = "linear" if options.get("kernel", "linear") in ("linear", "ip") else "rbf"
    return kernel, float(options.get("sigma", 1.0))


def metric_on_sets(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    sets: object,
    metric: str,
    *,
    k: int = 10,
    options: Mapping[str, Any] | None = None,
    dense_limit: int = DENSE_GRAM_STIMULI,
) -> np.ndarray:
    """(P, B) float64: ``metric`` of every pair on every set (the same rows on both sides).

    Args:
        indexes: ``{key: NeighbourIndex}`` holding both keys of every pair (one run).
        pairs: ``(key of X, key of Y)`` per comparison (e.g. ``analyses.Pair.sides``).
        sets: (B, s) or (s,) stimulus rows, each row distinct stimuli (any order).
        metric: a registry name (``metrics.metric_names()``).
        k: neighbours per stimulus (neighbour metrics only; k < s).
        options: the metric's options (``kernel``, ``sigma``, ``cca_dim``, ...).
        dense_limit: largest n for the CKA family's (n, n)-kernel route.
    """
    entry = registry.metric(metric)
    chosen = metric_options(metric, options)
    if entry.neighbour_metric:
        if any(chosen.get(name) != value for name, value in entry.options.items() if name != "k"):
            raise ValueError(
                f"the subset engine computes {metric} at its default options; got {chosen}"
            )
        result = subset_alignment(indexes, list(pairs), sets, k, metrics=[metric])
        return np.asarray(result.values[metric], dtype=np.float64)
    sets = _check_sets(indexes, pairs, sets)
    return np.stack(_feature_metric_pairs(indexes, pairs, sets, sets, metric, chosen, dense_limit))


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


def _feature_metric_pairs(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    rows_x: np.ndarray,
    rows_y: np.ndarray,
    metric: str,
    options: Mapping[str, Any],
    dense_limit: int,
) -> list[np.ndarray]:
    """(B,) per pair of a feature metric; each model's sub-kernels (the CKA family at small n) or
    side (a metric split in sides, SVCCA) once per set for all its pairs."""
    entry = registry.metric(metric)
    n = indexes[pairs[0][0]].n if pairs else 0
    if uses_dense_kernels(metric, n, dense_limit):
        return list(_dense_cka_pairs(indexes, pairs, rows_x, rows_y, metric, options))
    if entry.feature_side is not None:
        out = np.empty((len(pairs), rows_x.shape[0]))
        roles = ("", "") if rows_x is rows_y else ("x", "y")  # same rows: one side per model
        last: dict[Hashable, tuple[np.ndarray, Any]] = {}  # each model's last set and its side
        for b in range(rows_x.shape[0]):
            sides: dict[tuple[Hashable, str], Any] = {}
            for p, (x, y) in enumerate(pairs):
                for key, role, rows in ((x, roles[0], rows_x[b]), (y, roles[1], rows_y[b])):
                    if (key, role) not in sides:
                        sides[(key, role)] = _side_of_rows(entry, indexes[key], rows, options,
                                                           last, key)
                out[p, b] = entry.from_feature_sides(sides[(x, roles[0])], sides[(y, roles[1])])
        return list(out)
    return [
        np.array(
            [
                registry.measure(metric, indexes[x].features.rows(a), indexes[y].features.rows(b),
                                 **options)
                for a, b in zip(rows_x, rows_y, strict=True)
            ]
        )
        for x, y in pairs
    ]


def _side_of_rows(
    entry: registry.Metric,
    index: NeighbourIndex,
    rows: np.ndarray,
    options: Mapping[str, Any],
    last: dict[Hashable, tuple[np.ndarray, Any]],
    key: Hashable,
) -> Any:
    """``entry.feature_side`` of the model's features at ``rows`` (s stimuli in any order). The
    side of the sorted set is kept in ``last[key]``; the same set in another order (a shuffled
    pairing reorders one side of a set again and again) is that side reordered
    (``entry.permuted_feature_side``) instead of a new one."""
    if entry.permuted_feature_side is None:
        return entry.feature_side(index.features.rows(rows), **options)
    members = np.sort(rows)
    kept = last.get(key)
    if kept is None or not np.array_equal(kept[0], members):
        kept = (members, entry.feature_side(index.features.rows(members), **options))
        last[key] = kept
    if np.array_equal(rows, members):
        return kept[1]
    return entry.permuted_feature_side(kept[1], np.searchsorted(members, rows))


def _dense_cka_pairs(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    rows_x: np.ndarray,
    rows_y: np.ndarray,
    metric: str,
    options: Mapping[str, Any],
) -> np.ndarray:
    """(P, B) CKA or unbiased CKA on the small-n route: each model's (n, n) kernel once, and per
    chunk of sets each model's (b, s, s) sub-kernels and their own sums once for all its pairs
    (``metrics.kernel_side``); a pair then costs Σ K∘L. When every set of ``rows_x`` is the same
    (a shuffled pairing: only the Y side's order changes) the X side is one set."""
    kernel, sigma = _kernel_key(options)
    n_sets, s = rows_x.shape
    fixed_x = bool((rows_x == rows_x[:1]).all())
    roles = ("fixed" if fixed_x else "", "") if rows_x is rows_y else ("x", "y")
    kernels = {
        key: _dense_kernel(indexes[key], kernel, sigma) for pair in pairs for key in pair
    }
    out = np.empty((len(pairs), n_sets))
    # the sub-kernels of a chunk of every side together: at most ~2 × _CHUNK_ELEMENTS (as two
    # sides of a chunk did when each pair gathered its own), however many models there are
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
            out[p, start : start + b.shape[0]] = registry.cka_from_kernel_sides(
                sides[(x, roles[0])], sides[(y, roles[1])], unbiased=metric == "unbiased_cka"
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


def metric_on_pairings(
    x: NeighbourIndex,
    y: NeighbourIndex,
    rows_x: object,
    rows_y: object,
    metric: str,
    *,
    k: int = 10,
    options: Mapping[str, Any] | None = None,
    dense_limit: int = DENSE_GRAM_STIMULI,
) -> np.ndarray:
    """(B,) float64: ``metric`` of X[rows_x[b]] against Y[rows_y[b]], row m paired with row m.

    For shuffled pairings (``calibration.shuffled_pairing_null``): ``rows_y[b]`` may list any s
    distinct stimuli in any order (typically a permutation of ``rows_x[b]``). Equal to
    ``metrics.measure(metric, X[rows_x[b]], Y[rows_y[b]], **options)`` on prepared features.
    Neighbour tables of each distinct set are built once and relabelled per pairing.
    """
    entry = registry.metric(metric)
    chosen = metric_options(metric, options)
    indexes = {"x": x, "y": y}
    rows_x = _check_sets(indexes, [("x", "y")], rows_x)
    rows_y = _check_sets(indexes, [("x", "y")], rows_y)
    if rows_x.shape != rows_y.shape:
        raise ValueError(
            f"rows_x {rows_x.shape} and rows_y {rows_y.shape} must pair s stimuli of X with s of "
            "Y in each of B sets; pass arrays of the same shape"
        )
    n_sets, s = rows_x.shape
    if not entry.neighbour_metric:
        return _feature_metric_pairs(
            indexes, [("x", "y")], rows_x, rows_y, metric, chosen, dense_limit
        )[0]
    from .validation import check_k

    check_k(k, s, 2 if metric == "cknna" else 1, what="each set")
    out = np.empty(n_sets)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, s * k * k))
    for start in range(0, n_sets, chunk):
        a, b = rows_x[start : start + chunk], rows_y[start : start + chunk]
        table_x, values_x = _relabelled_tables(x, a, k)
        table_y, values_y = _relabelled_tables(y, b, k)
        out[start : start + a.shape[0]] = registry.measure_tables(
            metric, table_x, table_y, values_x, values_y, **chosen
        )
    return out


def set_scorer(
    indexes: Mapping[Hashable, NeighbourIndex],
    pairs: Sequence[tuple[Hashable, Hashable]],
    metric: str,
    *,
    k: int = 10,
    options: Mapping[str, Any] | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """``score(sets (B, s)) -> (P, B)``: :func:`metric_on_sets` with everything else fixed (the
    form ``stats.permutation_tests_two_sets`` and ``random_baseline`` take)."""
    return lambda sets: metric_on_sets(indexes, pairs, sets, metric, k=k, options=options)
