"""The compiled Fisher–Yates shuffle (``convergence_core.shuffles``): every row a permutation, each
permutation equally likely (checked on n = 4: all 24 orders by a chi-square test), reproducible
from the generator's state, and the blocks add up to the count asked for."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from convergence_core.shuffles import _fisher_yates, permutation_blocks, permutations


def test_every_row_is_a_permutation_and_a_seed_repeats_them():
    rows = permutations(1000, 20, np.random.default_rng(3))
    assert rows.shape == (20, 1000) and rows.dtype == np.int64
    assert all(np.array_equal(np.sort(row), np.arange(1000)) for row in rows)
    np.testing.assert_array_equal(rows, permutations(1000, 20, np.random.default_rng(3)))
    assert not np.array_equal(rows, permutations(1000, 20, np.random.default_rng(4)))


def test_all_orders_are_equally_likely():
    rows = permutations(4, 48_000, np.random.default_rng(0))
    index = {order: i for i, order in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([index[tuple(row)] for row in rows.tolist()], minlength=24)
    assert counts.min() > 0
    assert chisquare(counts).pvalue > 1e-3  # fails for a biased shuffle (e.g. j on 0..n−1)


def test_the_largest_uniform_stays_in_range():
    largest = np.nextafter(1.0, 0.0)  # u·(i + 1) rounds to i + 1 when i + 1 is a power of two
    rows = _fisher_yates(np.full((1, 1024), largest))
    np.testing.assert_array_equal(np.sort(rows[0]), np.arange(1024))


def test_blocks_hold_the_count_asked_for():
    blocks = list(permutation_blocks(50, 23, np.random.default_rng(1), block_elements=500))
    assert [block.shape for block in blocks] == [(10, 50), (10, 50), (3, 50)]
    with pytest.raises(ValueError, match="non-negative"):
        permutations(-1, 2, np.random.default_rng(0))
