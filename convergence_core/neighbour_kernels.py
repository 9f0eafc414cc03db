"""Compiled inner loops of the subset engine: within-subset tables from neighbour lists, and the
neighbour metrics' sums from two tables.

These are the loops that run for every member of every subset (the Alignment lab's k change at
n = 100,000 asks for 6 subsets of 25,000 stimuli × 5 models × 11 neighbours: ~1.6 million table
entries, each looked up twice). In NumPy they took a sort, a random-access binary search and a
``bincount`` per pass (~0.1 s per model and subset of 25,000: tables 30 ms, CKNNA's half 76 ms);
a row-by-row loop compiled by numba (already installed: UMAP is built on it) reads each row's few
entries once. Entries are found without sorting: a row is marked in an (s,) stamp array (``stamp[j]
== r``: row r lists j), and "who lists member i" comes from the table turned around by a counting
sort, so every look-up is O(1) and each loop O(s·k) at any k. Per model and subset of 25,000 at
k = 11: tables 13-17 ms (mostly waiting on memory: each member's list is a row anywhere in an
(n, K) file), CKNNA's half ~5 ms, a pair's CKNNA ~2 ms.

Each function is tested against a slow reference written in the tests (a walk along each list;
dense masked kernels with asymmetric values; Python sets: ``tests/test_neighbour_kernels.py``) and,
through the engine, against the dense definition (``tests/test_neighbours.py``,
``tests/test_metrics.py``). Where each is used:

* :func:`tables_from_lists` — ``NeighbourIndex.tables``' first k subset members along each
  member's stored list;
* :func:`cknna_side_sums` — ``metrics.cknna_side``: which entries (i, j) have the reciprocal entry
  (j, i), its kernel value, and the table's own masked-HSIC sums;
* :func:`cknna_cross_sums` — ``metrics.cknna_from_sides``: the masked-HSIC sums of the mutual mask;
* :func:`overlap_counts` — ``metrics.knn_overlap_per_stimulus`` (mutual k-NN);
* :func:`cycle_hits` — ``metrics.cycle_knn_from_tables``;
* :func:`first_invalid_list_row` — ``run_checks``: stored lists that a page must not read (an index
  out of range or the row itself, a similarity not finite or increasing along the row), in one pass
  instead of five NumPy passes (the check of a 100,000-stimulus run's 14 lists: see the function).

Shapes: B subsets of s stimuli, k neighbours, tables flattened to (R = B·s, k) rows of distinct
positions (any order within a row); row r is member i = r mod s of subset b = r // s, and a column
is a position 0..s−1 in that subset. Sums are float64, accumulated in row order (deterministic).
Compiled on first use and cached on disk (numba's ``cache=True``: ``__pycache__`` beside this
file), so only the first call of a fresh install pays the ~seconds of compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "cknna_cross_sums", "cknna_side_sums", "cycle_hits", "first_invalid_list_row", "overlap_counts",
    "tables_from_lists",
]


@njit(cache=True, nogil=True)
def tables_from_lists(list_indices, list_values, subsets, n, k, positions, values, complete):
    """Fill each subset member's first k fellow members along its neighbour list.

    Args:
        list_indices: (n, K) int stimulus rows, most similar first; list_values (n, K) float64.
        subsets: (B, s) int64 stimulus rows, each row sorted and distinct.
        n: stimuli in the run; k: neighbours wanted.
        positions: (B, s, k) int64 out — positions in the sorted subset, in list order.
        values: (B, s, k) float64 out — their inner products.
        complete: (B, s) bool out — False where the list held fewer than k members (those rows
            of ``positions``/``values`` are partly filled and must be completed by the caller).
    """
    where = np.full(n, -1, np.int32)  # stimulus -> position in the current subset, or -1
    n_sets, s = subsets.shape
    width = list_indices.shape[1]
    for b in range(n_sets):
        for i in range(s):
            where[subsets[b, i]] = i
        for i in range(s):
            row = subsets[b, i]
            found = 0
            for c in range(width):
                j = where[list_indices[row, c]]
                if j >= 0:
                    positions[b, i, found] = j
                    values[b, i, found] = list_values[row, c]
                    found += 1
                    if found == k:
                        break
            complete[b, i] = found == k
        for i in range(s):
            where[subsets[b, i]] = -1


@njit(cache=True, nogil=True)
def cknna_side_sums(table, values, s):
    """One table's half of CKNNA.

    Args:
        table: (R, k) int positions, each row distinct others (any order); values: (R, k)
            float64 the kernel value at each entry.
        s: stimuli per subset (R = B·s).

    Returns:
        back: (R, k) bool — whether entry (i, j) has the reciprocal entry (j, i);
        back_values: (R, k) float64 — the value at (j, i) where it exists, else 0;
        trace, total, cross: (B,) the sums of the table's own masked HSIC
        (``metrics.unbiased_hsic_from_sums``).

    Per subset, the table is first turned around (who lists member i: a counting sort by
    column), then each row's own entries are marked in an (s,) stamp array, and every member j
    that lists i finds its entry (i, j) there in O(1): O(s·k) in all. A binary search of j's row
    for i instead needed a sorted copy of every row and a look-up into a row anywhere in the
    table per entry: at s = 25,000, k = 11 on the 100,000-stimulus run 10.5 → 4.8 ms, at k = 40
    55 → 17 ms, at k = 100 176 → 51 ms.
    """
    rows, k = table.shape
    n_sets = rows // s
    back = np.zeros((rows, k), np.bool_)
    back_values = np.zeros((rows, k))
    trace = np.zeros(n_sets)
    total = np.zeros(n_sets)
    column_sums = np.zeros(rows)
    row_sums = np.zeros(rows)
    start = np.zeros(s + 1, np.int64)  # member j's listers are listers[start[j]:start[j + 1]]
    listers = np.empty(s * k, np.int32)
    lister_values = np.empty(s * k)  # the value of the lister's entry (lister, j)
    filled = np.empty(s, np.int64)
    stamp = np.full(s, -1, np.int64)  # stamp[j] == r: row r lists j, at column slot[j]
    slot = np.zeros(s, np.int32)
    for b in range(n_sets):
        base = b * s
        start[:] = 0
        for r in range(base, base + s):
            for c in range(k):
                start[table[r, c] + 1] += 1
        for j in range(s):
            start[j + 1] += start[j]
        filled[:] = start[:s]
        for i in range(s):
            for c in range(k):
                j = table[base + i, c]
                listers[filled[j]] = i
                lister_values[filled[j]] = values[base + i, c]
                filled[j] += 1
        for i in range(s):
            r = base + i
            for c in range(k):
                j = table[r, c]
                stamp[j] = r
                slot[j] = c
                a = values[r, c]
                total[b] += a
                column_sums[base + j] += a
                row_sums[r] += a
            for t in range(start[i], start[i + 1]):
                j = listers[t]
                if stamp[j] == r:  # i lists j and j lists i
                    c = slot[j]
                    back[r, c] = True
                    back_values[r, c] = lister_values[t]
                    trace[b] += values[r, c] * lister_values[t]
    cross = np.zeros(n_sets)
    for r in range(rows):
        cross[r // s] += column_sums[r] * row_sums[r]
    return back, back_values, trace, total, cross


@njit(cache=True, nogil=True)
def cknna_cross_sums(s, x_columns, x_values, x_back, y_columns, y_values, y_back, y_back_values):
    """The masked-HSIC sums of M∘K against M∘L, M the mutual mask (entries in both tables).

    Arguments: the two tables (R, k) with their values, and each side's ``back`` (and Y's
    ``back_values``) from :func:`cknna_side_sums`. Returns (B,) trace, sum of the X values, sum
    of the Y values and cross term over the mutual entries. Each row of X is marked in an (s,)
    stamp array and each entry of Y's row looked up there: O(k) per row, in any column order
    (a merge of two sorted rows took 3.0 ms instead of 2.2 ms at s = 25,000, k = 11, and needed
    the rows sorted).
    """
    rows, k = x_columns.shape
    n_sets = rows // s
    trace = np.zeros(n_sets)
    sum_x = np.zeros(n_sets)
    sum_y = np.zeros(n_sets)
    column_sums = np.zeros(rows)
    row_sums = np.zeros(rows)
    stamp = np.full(s, -1, np.int64)  # stamp[j] == r: X's row r lists j, at column slot[j]
    slot = np.zeros(s, np.int32)
    for r in range(rows):
        b = r // s
        for p in range(k):
            stamp[x_columns[r, p]] = r
            slot[x_columns[r, p]] = p
        for q in range(k):
            j = y_columns[r, q]
            if stamp[j] == r:  # (i, j) is in both tables
                p = slot[j]
                a = x_values[r, p]
                v = y_values[r, q]
                sum_x[b] += a
                sum_y[b] += v
                column_sums[b * s + j] += a
                row_sums[r] += v
                if x_back[r, p] and y_back[r, q]:  # (j, i) is mutual too
                    trace[b] += a * y_back_values[r, q]
    cross = np.zeros(n_sets)
    for r in range(rows):
        cross[r // s] += column_sums[r] * row_sums[r]
    return trace, sum_x, sum_y, cross


@njit(cache=True, nogil=True)
def overlap_counts(x_table, y_table, s):
    """|knn_X(i) ∩ knn_Y(i)| of every row: (R,) int64, for two (R, k) tables of distinct
    positions in any order (X's row marked in an (s,) stamp array, Y's entries looked up there).
    """
    rows, k = x_table.shape
    counts = np.zeros(rows, np.int64)
    stamp = np.full(s, -1, np.int64)  # stamp[j] == r: X's row r lists j
    for r in range(rows):
        for p in range(k):
            stamp[x_table[r, p]] = r
        found = 0
        for q in range(k):
            if stamp[y_table[r, q]] == r:
                found += 1
        counts[r] = found
    return counts


@njit(cache=True, nogil=True)
def cycle_hits(x_table, y_table, s):
    """Whether member i is among the X-neighbours of one of its own Y-neighbours: (R,) bool, for
    two (R, k) tables of distinct positions in any order.

    Per subset X is turned around (who lists member i, a counting sort by column); i's
    Y-neighbours are marked in an (s,) stamp array and each member that lists i in X is looked
    up there: O(s·k) per subset.
    """
    rows, k = x_table.shape
    n_sets = rows // s
    hits = np.zeros(rows, np.bool_)
    start = np.zeros(s + 1, np.int64)  # X-listers of member j: listers[start[j]:start[j + 1]]
    listers = np.empty(s * k, np.int32)
    filled = np.empty(s, np.int64)
    stamp = np.full(s, -1, np.int64)  # stamp[j] == r: Y's row r lists j
    for b in range(n_sets):
        base = b * s
        start[:] = 0
        for r in range(base, base + s):
            for c in range(k):
                start[x_table[r, c] + 1] += 1
        for j in range(s):
            start[j + 1] += start[j]
        filled[:] = start[:s]
        for i in range(s):
            for c in range(k):
                j = x_table[base + i, c]
                listers[filled[j]] = i
                filled[j] += 1
        for i in range(s):
            r = base + i
            for q in range(k):
                stamp[y_table[r, q]] = r
            for t in range(start[i], start[i + 1]):
                if stamp[listers[t]] == r:
                    hits[r] = True
                    break
    return hits


@njit(cache=True, nogil=True)
def first_invalid_list_row(indices, values, first_row, n, tolerance):
    """The first row of a block of stored neighbour lists that is not valid, and why.

    ``indices`` (rows, K) int and ``values`` (rows, K) float are rows ``first_row ..`` of a run's
    lists of n stimuli. A row is valid when every index is in 0..n-1 and not the row's own stimulus,
    and its values are finite and non-increasing along the row (a value may exceed the one before
    it by at most ``tolerance``). Returns (row within the block, 1 for an index, 2 for a value), or
    (-1, 0) when every row is valid. One pass over the block: at n = 100,000 the 14 lists of the
    dashboard's synthetic run (K = 128) are checked in 0.3-0.4 s instead of 1.9 s in NumPy.
    """
    rows, width = indices.shape
    for r in range(rows):
        own = first_row + r
        for c in range(width):
            j = indices[r, c]
            if j < 0 or j >= n or j == own:
                return r, 1
        previous = np.inf
        for c in range(width):
            value = values[r, c]
            if not np.isfinite(value) or value - previous > tolerance:
                return r, 2
            previous = value
    return -1, 0
