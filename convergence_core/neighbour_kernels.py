"""Compiled inner loops of the subset engine: within-subset tables from neighbour lists, and
CKNNA's masked-HSIC sums from two tables.

These are the loops that run for every member of every subset (the Alignment lab's k change at
n = 100,000 asks for 6 subsets of 25,000 stimuli × 5 models × 11 neighbours: ~1.6 million table
entries, each looked up twice). In NumPy they took a sort, a random-access binary search and a
``bincount`` per pass (~0.1 s per model and subset of 25,000: tables 30 ms, CKNNA's half 76 ms);
a row-by-row loop compiled by numba (already installed: UMAP is built on it) reads each row's few
entries once (17 + 17 ms, mostly waiting on memory: a look-up reads a row anywhere in the table).

Each function is tested against a slow reference written in the tests (a walk along each list;
dense masked kernels with asymmetric values: ``tests/test_neighbour_kernels.py``) and, through
the engine, against the dense definition (``tests/test_neighbours.py``, ``tests/test_metrics.py``).
Where each is used:

* :func:`tables_from_lists` — ``NeighbourIndex.tables``' first k subset members along each
  member's stored list;
* :func:`cknna_side_sums` — ``metrics.cknna_side``: which entries (i, j) have the reciprocal entry
  (j, i), its kernel value, and the table's own masked-HSIC sums;
* :func:`cknna_cross_sums` — ``metrics.cknna_from_sides``: the masked-HSIC sums of the mutual mask.

Shapes: B subsets of s stimuli, k neighbours, tables flattened to (R = B·s, k) rows; row r is
member i = r mod s of subset b = r // s, and a column is a position 0..s−1 in that subset. Sums are
float64, accumulated in row order (deterministic). Compiled on first use and cached on disk
(numba's ``cache=True``: ``__pycache__`` beside this file), so only the first call of a fresh
install pays the ~seconds of compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["cknna_cross_sums", "cknna_side_sums", "tables_from_lists"]


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
def _sort_rows(table, values):
    """Each row of a (R, k) table ascending, with its values in the same order (insertion sort:
    a row holds a few distinct positions, k ≲ 100)."""
    rows, k = table.shape
    columns = table.copy()
    sorted_values = values.copy()
    for r in range(rows):
        for c in range(1, k):
            column = columns[r, c]
            value = sorted_values[r, c]
            at = c
            while at > 0 and columns[r, at - 1] > column:
                columns[r, at] = columns[r, at - 1]
                sorted_values[r, at] = sorted_values[r, at - 1]
                at -= 1
            columns[r, at] = column
            sorted_values[r, at] = value
    return columns, sorted_values


@njit(cache=True, nogil=True)
def _position_in_row(columns, row, column):
    """Where ``column`` sits in the sorted ``columns[row]``, or −1 (binary search)."""
    lo = 0
    hi = columns.shape[1]
    while lo < hi:
        mid = (lo + hi) // 2
        if columns[row, mid] < column:
            lo = mid + 1
        else:
            hi = mid
    if lo < columns.shape[1] and columns[row, lo] == column:
        return lo
    return -1


@njit(cache=True, nogil=True)
def cknna_side_sums(table, values, s):
    """One table's half of CKNNA.

    Args:
        table: (R, k) int positions (any order within a row); values: (R, k) float64.
        s: stimuli per subset (R = B·s).

    Returns:
        columns, values: (R, k) each row's columns ascending, values in the same order;
        back: (R, k) bool — whether entry (i, j) has the reciprocal entry (j, i);
        back_values: (R, k) float64 — the value at (j, i) where it exists, else 0;
        trace, total, cross: (B,) the sums of the table's own masked HSIC
        (``metrics.unbiased_hsic_from_sums``).
    """
    columns, sorted_values = _sort_rows(table, values)
    rows, k = columns.shape
    n_sets = rows // s
    back = np.zeros((rows, k), np.bool_)
    back_values = np.zeros((rows, k))
    trace = np.zeros(n_sets)
    total = np.zeros(n_sets)
    column_sums = np.zeros(rows)
    row_sums = np.zeros(rows)
    for r in range(rows):
        b = r // s
        i = r - b * s
        for c in range(k):
            a = sorted_values[r, c]
            j = b * s + columns[r, c]
            at = _position_in_row(columns, j, i)
            if at >= 0:
                back[r, c] = True
                back_values[r, c] = sorted_values[j, at]
                trace[b] += a * sorted_values[j, at]
            total[b] += a
            column_sums[j] += a
            row_sums[r] += a
    cross = np.zeros(n_sets)
    for r in range(rows):
        cross[r // s] += column_sums[r] * row_sums[r]
    return columns, sorted_values, back, back_values, trace, total, cross


@njit(cache=True, nogil=True)
def cknna_cross_sums(s, x_columns, x_values, x_back, y_columns, y_values, y_back, y_back_values):
    """The masked-HSIC sums of M∘K against M∘L, M the mutual mask (entries in both tables).

    Arguments are two sides of :func:`cknna_side_sums` (same (R, k)). Returns (B,) trace, sum of
    the X values, sum of the Y values and cross term over the mutual entries.
    """
    rows, k = x_columns.shape
    n_sets = rows // s
    trace = np.zeros(n_sets)
    sum_x = np.zeros(n_sets)
    sum_y = np.zeros(n_sets)
    column_sums = np.zeros(rows)
    row_sums = np.zeros(rows)
    for r in range(rows):
        b = r // s
        p = 0
        q = 0
        while p < k and q < k:  # merge the two sorted rows
            cx = x_columns[r, p]
            cy = y_columns[r, q]
            if cx < cy:
                p += 1
            elif cy < cx:
                q += 1
            else:
                a = x_values[r, p]
                v = y_values[r, q]
                sum_x[b] += a
                sum_y[b] += v
                column_sums[b * s + cx] += a
                row_sums[r] += v
                if x_back[r, p] and y_back[r, q]:  # (j, i) is mutual too
                    trace[b] += a * y_back_values[r, q]
                p += 1
                q += 1
    cross = np.zeros(n_sets)
    for r in range(rows):
        cross[r // s] += column_sums[r] * row_sums[r]
    return trace, sum_x, sum_y, cross
