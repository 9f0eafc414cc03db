"""Label shuffles of the two-set permutation test, drawn and scored in blocks: the same
relabellings, nulls and p-values as drawing them all at once (the implementation before
2026-12-07, kept here as the reference), in memory that does not grow with the shuffles."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from convergence_core.stats import (
    SHUFFLE_BLOCK,
    average_ranks,
    label_shuffle_blocks,
    percentile_interval,
    permutation_p_value,
    permutation_p_values,
    permutation_tests_two_sets,
    spearman_permutation_test,
    spearman_permutation_tests,
    spearman_rho,
    spearman_rhos,
)


def _label_shuffles_all_at_once(first, second, n_permutations, rng):
    """The reference: every relabelling drawn at once (a list, then stacked), (P, s) each."""
    pool = np.concatenate([np.asarray(first, np.intp), np.asarray(second, np.intp)])
    shuffled = np.stack([pool[rng.permutation(pool.shape[0])] for _ in range(n_permutations)])
    return shuffled[:, : len(first)], shuffled[:, len(first) :]


def _permutation_tests_all_at_once(statistics, first, second, n_permutations, rng):
    """The reference: the observed sets and every relabelling in one (2 + 2P, s) call;
    (observed, two-sided p, greater p, null) per statistic."""
    shuffled_first, shuffled_second = _label_shuffles_all_at_once(
        first, second, n_permutations, rng
    )
    stacked = np.concatenate(
        [np.asarray(first, np.intp)[None], np.asarray(second, np.intp)[None],
         shuffled_first, shuffled_second]
    )
    values = np.asarray(statistics(stacked), dtype=np.float64)
    out = []
    for row in values:
        observed = float(row[0] - row[1])
        null = row[2 : 2 + n_permutations] - row[2 + n_permutations :]
        out.append((observed, *permutation_p_values(observed, null), null))
    return out


@pytest.mark.parametrize("block", [1, 7, SHUFFLE_BLOCK, 100, 101, 500])
def test_blocks_are_the_shuffles_drawn_at_once(block: int) -> None:
    first, second = np.arange(0, 60, 2), np.arange(1, 61, 2)[::-1]
    want_first, want_second = _label_shuffles_all_at_once(
        first, second, 100, np.random.default_rng(3)
    )
    rng = np.random.default_rng(3)
    blocks = list(label_shuffle_blocks(first, second, 100, rng, block=block))
    assert [b[0].shape for b in blocks] == [
        (min(block, 100 - start), 30) for start in range(0, 100, block)
    ]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), want_first)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), want_second)
    # the stream is left where the reference left it
    reference = np.random.default_rng(3)
    _label_shuffles_all_at_once(first, second, 100, reference)
    assert rng.integers(2**62) == reference.integers(2**62)


def _sums(values: np.ndarray, calls: list[int] | None = None):
    """Statistics of sets: (3, B) sums, means and maxima of ``values`` over each set."""

    def statistics(sets: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(sets.shape[0])
        picked = values[sets]
        return np.stack([picked.sum(axis=1), picked.mean(axis=1), picked.max(axis=1)])

    return statistics


@pytest.mark.parametrize("n_permutations,block", [(1, 64), (63, 64), (64, 64), (300, 64),
                                                  (300, 7), (50, 1000)])
def test_tests_scored_in_blocks_equal_one_call_on_every_shuffle(n_permutations, block) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(200)
    values[:20] += 0.3  # a real difference for the first set
    first, second = np.arange(20), np.arange(100, 120)
    calls: list[int] = []
    got = permutation_tests_two_sets(
        _sums(values, calls), first, second, n_permutations=n_permutations,
        rng=np.random.default_rng(9), block=block,
    )
    want = _permutation_tests_all_at_once(
        _sums(values), first, second, n_permutations, np.random.default_rng(9)
    )
    # the observed sets, then one call per block of relabellings (both halves)
    assert calls == [2] + [2 * min(block, n_permutations - start)
                           for start in range(0, n_permutations, block)]
    for result, (observed, two_sided, greater, null) in zip(got, want, strict=True):
        assert result.observed == observed
        assert (result.p_value_two_sided, result.p_value_first_greater) == (two_sided, greater)
        np.testing.assert_array_equal(result.null, null)  # to the last bit
        assert result.n_permutations == n_permutations


def test_shuffles_are_scored_in_memory_that_does_not_grow_with_them() -> None:
    """1,000 relabellings of 2 × 10,000 stimuli: drawn at once they are 160 MB (and a copy as
    large for the one call); in blocks of SHUFFLE_BLOCK ~10 MB, whatever the count."""
    s, n_permutations = 10_000, 1_000
    values = np.random.default_rng(1).standard_normal(2 * s)

    def statistics(sets: np.ndarray) -> np.ndarray:  # row by row: no memory of its own
        return np.array([[values[row].sum() for row in sets]])

    tracemalloc.start()
    try:
        (result,) = permutation_tests_two_sets(
            statistics, np.arange(s), np.arange(s, 2 * s), n_permutations=n_permutations,
            rng=np.random.default_rng(0),
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    block_bytes = SHUFFLE_BLOCK * 2 * s * np.dtype(np.intp).itemsize
    assert peak < 3 * block_bytes + 2**20, f"{peak / 2**20:.1f} MiB"
    assert result.null.shape == (n_permutations,)


def test_checks_name_the_fix() -> None:
    first, second = np.arange(5), np.arange(5, 10)
    with pytest.raises(ValueError, match="equal length.*same size"):
        label_shuffle_blocks(first, second[:4], 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_permutations must be >= 1"):
        label_shuffle_blocks(first, second, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="block must be a positive integer"):
        label_shuffle_blocks(first, second, 10, np.random.default_rng(0), block=0)
    with pytest.raises(ValueError, match=r"statistics must map \(B, s\) sets to \(P, B\)"):
        permutation_tests_two_sets(lambda sets: sets.sum(axis=1), first, second,
                                   n_permutations=10, rng=np.random.default_rng(0))
    answers = iter([np.zeros((2, 2)), np.zeros((3, 20))])
    with pytest.raises(ValueError, match="one row per statistic"):
        permutation_tests_two_sets(lambda sets: next(answers), first, second,
                                   n_permutations=10, rng=np.random.default_rng(0))



def test_average_ranks_are_scipys_to_the_bit() -> None:
    from scipy.stats import rankdata

    rng = np.random.default_rng(4)
    values = rng.integers(0, 6, (50, 4)).astype(np.float64)  # many ties
    values[:, 1] = rng.standard_normal(50)  # none
    values[:, 2] = 3.0  # one run of 50
    values[7, 3] = np.nan  # a column with a NaN is all NaN, as in scipy
    np.testing.assert_array_equal(average_ranks(values), rankdata(values, axis=0))
    np.testing.assert_array_equal(average_ranks(values[:, 0]), rankdata(values[:, 0]))
    assert average_ranks(np.zeros(0)).shape == (0,)


def test_spearman_rho_is_scipys_with_ties_and_nan_when_constant() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, (40, 3)).astype(np.float64)
    y = x[:, 0] + rng.integers(0, 3, 40)
    want = [spearmanr(x[:, j], y).statistic for j in range(3)]
    np.testing.assert_allclose(spearman_rhos(x, y), want, rtol=0, atol=1e-14)
    assert spearman_rho(x[:, 1], y) == pytest.approx(want[1], abs=1e-14)
    assert np.isnan(spearman_rho(np.ones(40), y)) and np.isnan(spearman_rho(y, np.ones(40)))


def _spearman_reference(x, y, n_permutations, rng):
    """ρ and the two permutation p-values by scipy, one permutation at a time."""
    from scipy.stats import spearmanr

    from convergence_core.shuffles import permutations

    rho = spearmanr(x, y).statistic
    null = np.array([spearmanr(x, y[rows]).statistic
                     for rows in permutations(len(y), n_permutations, rng)])
    return (rho, (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (n_permutations + 1),
            (1 + np.sum(null >= rho - 1e-12)) / (n_permutations + 1))


def test_batched_spearman_tests_are_each_columns_own_test() -> None:
    """Every column of x against y on the same permutations: each column's ρ and p-values are
    those of scipy's ρ on each permutation, and of spearman_permutation_test of that column with
    the same seed; a constant column has NaN throughout and leaves the others alone."""
    rng = np.random.default_rng(6)
    y = rng.standard_normal(30)
    x = np.column_stack([y + rng.standard_normal(30), rng.standard_normal(30),
                         np.round(y), np.full(30, 2.0)])
    rho, two_sided, positive = spearman_permutation_tests(
        x, y, 200, np.random.default_rng(11), block_elements=7 * 30  # several blocks
    )
    for j in range(3):
        want = _spearman_reference(x[:, j], y, 200, np.random.default_rng(11))
        np.testing.assert_allclose([rho[j], two_sided[j], positive[j]], want, rtol=0, atol=1e-12)
        single = spearman_permutation_test(x[:, j], y, n_permutations=200, seed=11)
        assert single["spearman_rho"] == pytest.approx(rho[j], abs=1e-15)  # BLAS rounding
        assert (single["permutation_p_value_two_sided"],
                single["permutation_p_value_positive"]) == (two_sided[j], positive[j])
    assert np.isnan([rho[3], two_sided[3], positive[3]]).all()


def test_one_permutation_p_value_rule_and_one_interval() -> None:
    assert permutation_p_value(0, 999) == 1 / 1000
    np.testing.assert_array_equal(permutation_p_value(np.array([0, 9]), 9), [0.1, 1.0])
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    for level in (0, 1, 1.5, True, "0.95"):
        with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
            percentile_interval(np.arange(5.0), level)
