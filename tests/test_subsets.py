"""Stimulus subsets by score and index validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convergence_core.subsets import check_indices, drop_fraction, select_stimuli


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.data())
def test_low_and_high_sets_are_the_extremes(values, data) -> None:
    scores = np.array(values)
    size = data.draw(st.integers(1, scores.size))
    low = select_stimuli(scores, "low", size)
    high = select_stimuli(scores, "high", size)
    for chosen in (low, high):
        assert chosen.dtype == np.int64 and chosen.size == size
        assert np.all(np.diff(chosen) > 0)  # ascending, no duplicates
    rest_low = np.setdiff1d(np.arange(scores.size), low)
    rest_high = np.setdiff1d(np.arange(scores.size), high)
    if rest_low.size:
        assert scores[low].max() <= scores[rest_low].min()
        assert scores[high].min() >= scores[rest_high].max()


def test_ties_are_broken_by_index() -> None:
    scores = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    assert select_stimuli(scores, "low", 1).tolist() == [1]
    assert select_stimuli(scores, "high", 2).tolist() == [0, 2]


def test_random_is_reproducible_and_uniform() -> None:
    scores = np.arange(10.0)
    a = select_stimuli(scores, "random", 4, rng=3)
    assert a.tolist() == select_stimuli(scores, "random", 4, rng=np.random.default_rng(3)).tolist()
    counts = np.zeros(10)
    generator = np.random.default_rng(0)
    for _ in range(2000):
        counts[select_stimuli(scores, "random", 3, rng=generator)] += 1
    # each stimulus is chosen with probability 3/10: 600 ± 5 sd
    assert np.all(np.abs(counts - 600) < 5 * np.sqrt(2000 * 0.3 * 0.7))


def test_drop_fraction() -> None:
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0])
    assert drop_fraction(scores, 0.25, "high").tolist() == [0, 1, 3, 4, 5, 7]
    assert drop_fraction(scores, 0.25, "low").tolist() == [0, 2, 3, 4, 6, 7]
    assert drop_fraction(scores, 0.0).tolist() == list(range(8))
    # round half up: 0.0625 * 8 = 0.5 -> drop 1
    assert drop_fraction(scores, 0.0625, "high").size == 7
    assert drop_fraction(np.arange(1024.0), 0.25).size == 768


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: select_stimuli(np.arange(5.0), "low", 6), "only 5 stimuli are available"),
        (lambda: select_stimuli(np.arange(5.0), "low", 0), "1 <= size <= 5"),
        (lambda: select_stimuli(np.arange(5.0), "middle", 2), "unknown kind"),
        (lambda: select_stimuli(np.ones((5, 2)), "low", 2), "1-D"),
        (lambda: select_stimuli(np.array([1.0, np.nan]), "low", 1), "1 NaN"),
        (lambda: drop_fraction(np.arange(5.0), 1.0), "0 <= q < 1"),
        (lambda: drop_fraction(np.arange(3.0), 0.9), "would leave none"),
        (lambda: drop_fraction(np.arange(3.0), 0.2, "middle"), "unknown which"),
    ],
)
def test_bad_selection_is_explained(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_check_indices() -> None:
    assert check_indices([3, 0, 2], 4).tolist() == [3, 0, 2]
    assert check_indices(np.array([1], dtype=np.uint8), 4).dtype == np.int64
    for bad, message in [
        ([], "empty"),
        ([0, 0], "more than once"),
        ([0, 4], "outside 0..3"),
        ([-1], "negative"),
        ([0.5], "integers"),
        ([[0, 1]], "1-D"),
        (np.array([True, False, True, True]), "boolean mask"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_indices(bad, 4)
