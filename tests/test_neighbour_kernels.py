"""The compiled loops of the subset engine (``convergence_core.neighbour_kernels``) against slow
references written here: a Python walk along each neighbour list, and dense (s, s) masked kernels
with the unbiased HSIC of ``alignment.hsic_unbiased``.

The kernel values are deliberately not symmetric (K[i, j] ≠ K[j, i]): a loop that read the value of
(i, j) where it should read (j, i) gives the same numbers on symmetric inner products and is caught
only here.
"""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core.alignment import hsic_unbiased
from convergence_core.metrics import cknna_from_tables, unbiased_hsic_from_sums
from convergence_core.neighbour_kernels import (
    first_invalid_list_row,
    cknna_cross_sums,
    cknna_side_sums,
    cycle_hits,
    overlap_counts,
    tables_from_lists,
)


def _random_tables(B: int, s: int, k: int, seed: int, *, clustered: bool = False):
    """(B, s, k) distinct non-self positions and asymmetric values; ``clustered`` draws the
    neighbours from a few nearby positions so that many entries are reciprocal."""
    rng = np.random.default_rng(seed)
    table = np.empty((B, s, k), dtype=np.int64)
    for b in range(B):
        for i in range(s):
            pool = np.arange(s)
            if clustered:
                pool = (i + np.arange(-k - 2, k + 3)) % s
                pool = np.unique(pool)
            pool = pool[pool != i]
            table[b, i] = rng.choice(pool, k, replace=False)
    return table, rng.uniform(-0.2, 1.0, (B, s, k))


def _dense(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(s, s) masked kernel: values at the table's entries, 0 elsewhere."""
    s, k = table.shape
    out = np.zeros((s, s))
    out[np.repeat(np.arange(s), k), table.ravel()] = values.ravel()
    return out


@pytest.mark.parametrize("clustered", [False, True])
def test_side_sums_are_the_dense_masked_hsic_and_find_every_reciprocal_entry(clustered):
    B, s, k = 3, 40, 5
    table, values = _random_tables(B, s, k, seed=1, clustered=clustered)
    back, back_values, trace, total, cross = cknna_side_sums(
        table.reshape(B * s, k).astype(np.int32), values.reshape(B * s, k), s
    )
    for b in range(B):
        A = _dense(table[b], values[b])
        assert np.isclose(
            unbiased_hsic_from_sums(s, trace[b], total[b], total[b], cross[b]),
            hsic_unbiased(A, A), rtol=1e-12, atol=1e-15,
        )
        for i in range(s):
            r = b * s + i
            for c, j in enumerate(table[b, i]):
                assert back[r, c] == (i in table[b, j])
                assert back_values[r, c] == (A[j, i] if back[r, c] else 0.0)
    if clustered:
        assert back.mean() > 0.3  # the reciprocal branch is exercised


def _side(table: np.ndarray, values: np.ndarray, s: int):
    """(columns, values, back, back_values, trace, total, cross) of a (B, s, k) table."""
    columns = table.reshape(-1, table.shape[-1]).astype(np.int32)
    flat = values.reshape(columns.shape)
    return (columns, flat, *cknna_side_sums(columns, flat, s))


@pytest.mark.parametrize("clustered", [False, True])
def test_cross_sums_are_the_dense_mutual_mask_hsic(clustered):
    B, s, k = 2, 30, 6
    tx, vx = _random_tables(B, s, k, seed=12, clustered=clustered)
    ty, vy = _random_tables(B, s, k, seed=13, clustered=clustered)
    x, y = _side(tx, vx, s), _side(ty, vy, s)
    sums = cknna_cross_sums(s, x[0], x[1], x[2], y[0], y[1], y[2], y[3])
    got = cknna_from_tables(tx, ty, vx, vy)
    for b in range(B):
        Ax, Ay = _dense(tx[b], vx[b]), _dense(ty[b], vy[b])
        mutual = (Ax != 0) & (Ay != 0)
        expected = hsic_unbiased(mutual * Ax, mutual * Ay)
        assert np.isclose(unbiased_hsic_from_sums(s, *(v[b] for v in sums)), expected,
                          rtol=1e-12, atol=1e-15)
        self_x, self_y = hsic_unbiased(Ax, Ax), hsic_unbiased(Ay, Ay)
        assert self_x * self_y > 0  # (seeds where both unbiased self-HSICs are positive)
        assert np.isclose(got[b], expected / (np.sqrt(self_x * self_y) + 1e-6), rtol=1e-10)


def test_cross_sums_do_not_depend_on_the_order_within_rows():
    """The loops read rows in any column order: a row's entries shuffled give the same sums."""
    B, s, k = 2, 30, 7
    tx, vx = _random_tables(B, s, k, seed=21, clustered=True)
    ty, vy = _random_tables(B, s, k, seed=22, clustered=True)
    rng = np.random.default_rng(23)
    shuffle = np.argsort(rng.random(ty.shape), axis=-1)
    ty2, vy2 = np.take_along_axis(ty, shuffle, -1), np.take_along_axis(vy, shuffle, -1)
    x, y, y2 = _side(tx, vx, s), _side(ty, vy, s), _side(ty2, vy2, s)
    np.testing.assert_allclose(y[4:], y2[4:], rtol=1e-13)
    np.testing.assert_allclose(
        cknna_cross_sums(s, x[0], x[1], x[2], y[0], y[1], y[2], y[3]),
        cknna_cross_sums(s, x[0], x[1], x[2], y2[0], y2[1], y2[2], y2[3]), rtol=1e-13,
    )


def test_cross_sums_of_a_table_with_itself_are_its_own_sums():
    B, s, k = 2, 25, 4
    table, values = _random_tables(B, s, k, seed=4, clustered=True)
    x = _side(table, values, s)
    trace, sum_x, sum_y, cross = cknna_cross_sums(s, x[0], x[1], x[2], x[0], x[1], x[2], x[3])
    np.testing.assert_allclose(trace, x[4], rtol=1e-13)
    np.testing.assert_allclose(sum_x, x[5], rtol=1e-13)
    np.testing.assert_allclose(sum_y, x[5], rtol=1e-13)
    np.testing.assert_allclose(cross, x[6], rtol=1e-13)


def test_tables_from_lists_take_the_first_k_members_along_each_list():
    rng = np.random.default_rng(5)
    n, width, k = 60, 12, 4
    lists = np.stack([rng.permutation(np.delete(np.arange(n), i))[:width] for i in range(n)])
    list_values = rng.standard_normal((n, width))
    subsets = np.sort(np.stack([rng.choice(n, 20, replace=False) for _ in range(3)]), axis=1)
    positions = np.full((3, 20, k), -7, dtype=np.int64)
    values = np.zeros((3, 20, k))
    complete = np.zeros((3, 20), dtype=bool)
    tables_from_lists(lists.astype(np.int32), list_values, subsets, n, k, positions, values,
                      complete)
    incomplete = 0
    for b, members in enumerate(subsets):
        for i, row in enumerate(members):
            hits = [(int(np.searchsorted(members, j)), v)
                    for j, v in zip(lists[row], list_values[row]) if j in members][:k]
            assert complete[b, i] == (len(hits) == k)
            if len(hits) == k:
                assert positions[b, i].tolist() == [p for p, _ in hits]
                assert values[b, i].tolist() == [v for _, v in hits]
            else:
                incomplete += 1
    assert 0 < incomplete < subsets.size  # both branches are exercised


@pytest.mark.parametrize("clustered", [False, True])
def test_overlap_counts_and_cycle_hits_against_set_loops(clustered):
    """Both loops against Python sets, on rows in random order within each row."""
    B, s, k = 3, 30, 6
    tx, _ = _random_tables(B, s, k, seed=31, clustered=clustered)
    ty, _ = _random_tables(B, s, k, seed=32, clustered=clustered)
    x, y = tx.reshape(B * s, k).astype(np.int32), ty.reshape(B * s, k).astype(np.int32)
    counts, hits = overlap_counts(x, y, s), cycle_hits(x, y, s)
    for b in range(B):
        for i in range(s):
            r = b * s + i
            assert counts[r] == len(set(tx[b, i]) & set(ty[b, i]))
            assert hits[r] == any(i in set(tx[b, j]) for j in ty[b, i])
    assert 0 < hits.sum() < hits.size and counts.max() > 0  # both outcomes are exercised
    # X's row order does not matter, and the cycle is not symmetric in (X, Y)
    shuffled = np.take_along_axis(x, np.argsort(np.random.default_rng(0).random(x.shape)), 1)
    np.testing.assert_array_equal(cycle_hits(np.ascontiguousarray(shuffled), y, s), hits)
    np.testing.assert_array_equal(overlap_counts(y, x, s), counts)


def _first_invalid_row_slowly(indices, values, first_row, n, tolerance):
    """The list check written plainly: each row's indices, then its values, in Python."""
    for r, (row, vals) in enumerate(zip(indices.tolist(), values.tolist(), strict=True)):
        if any(j < 0 or j >= n or j == first_row + r for j in row):
            return r, 1
        if any(not np.isfinite(v) for v in vals) or any(
            b - a > tolerance for a, b in zip(vals, vals[1:])
        ):
            return r, 2
    return -1, 0


def _valid_lists(rows: int, k: int, n: int, first_row: int, seed: int):
    rng = np.random.default_rng(seed)
    indices = np.empty((rows, k), dtype=np.int32)
    for r in range(rows):
        others = np.delete(np.arange(n), first_row + r)
        indices[r] = rng.choice(others, size=k, replace=False)
    values = -np.sort(-rng.standard_normal((rows, k)), axis=1)
    values[:, 1] = values[:, 0]  # exact ties are valid
    return indices, values


@pytest.mark.parametrize(
    "damage",
    ["none", "negative", "too_large", "self", "nan", "inf", "increasing", "within_rounding"],
)
def test_first_invalid_list_row_finds_the_planted_row(damage: str) -> None:
    n, k, first_row, rows = 60, 7, 20, 30
    indices, values = _valid_lists(rows, k, n, first_row, seed=3)
    planted = {"none": None, "within_rounding": None}.get(damage, 17)
    edits = {
        "negative": lambda: indices.__setitem__((17, 4), -1),
        "too_large": lambda: indices.__setitem__((17, 6), n),
        "self": lambda: indices.__setitem__((17, 0), first_row + 17),
        "nan": lambda: values.__setitem__((17, 3), np.nan),
        "inf": lambda: values.__setitem__((17, 0), np.inf),
        "increasing": lambda: values.__setitem__((17, 5), values[17, 4] + 1e-9),
        "within_rounding": lambda: values.__setitem__((17, 5), values[17, 4] + 1e-13),
    }
    if damage in edits:
        edits[damage]()
    if damage in ("negative", "too_large", "self"):
        values[25, 2] = np.nan  # a later bad row: the first one is reported
    found = first_invalid_list_row(indices, values, first_row, n, 1e-12)
    assert tuple(found) == _first_invalid_row_slowly(indices, values, first_row, n, 1e-12)
    if planted is None:
        assert tuple(found) == (-1, 0)
    else:
        assert found[0] == planted
        assert found[1] == (1 if damage in ("negative", "too_large", "self") else 2)
