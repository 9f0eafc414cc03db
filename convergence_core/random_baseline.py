"""The random-subset baseline of alignment, drawn until its mean is known to a stated precision.

Fig. 2 compares a score on the low- and high-dispersion sets with the same score on random sets of
the same size (:func:`analyses.dispersion_set_alignment`: a fixed number of the sets of
:func:`analyses.random_sets`, 200 by default). How many random sets that needs depends on how much
the score varies between random sets, which falls with the set size: on 59-stimulus sets of the
demo the random CKNNA of a pair spreads by ~0.03, on 5,000-stimulus sets of a 20,000-stimulus run
by ~0.002. Drawing 200 sets of 25,000 stimuli takes about a minute, where a handful pins the mean
to 0.001.

:func:`sequential_random_scores` therefore draws the random sets in batches and stops as soon as
the 95% confidence interval of the mean score (``2·t·sd/√B`` for B sets, Student's t with B − 1
degrees of freedom) is narrower than ``interval_width`` for every pair, or at ``max_sets``; the
Alignment lab's random baseline (``dashboard.lab.baseline_table``, any registry metric) is drawn
this way. The sets are the same draws as :func:`analyses.random_sets` for the same seed, in the
same order (:func:`random_set_stream`), so a draw that reaches ``max_sets`` equals the paper
analysis exactly, and the first B sets of any draw are the same sets.

Shapes: ``P`` vision × language pairs, ``B`` random sets of ``size`` stimuli out of ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

#: Default precision of the baseline mean: the full width of its 95% confidence interval (CKNNA),
#: i.e. the mean known to ±0.01 — small beside the low/high differences it is compared with
#: (0.1–0.3 on the demo), and reached with ~80 sets of 59 stimuli or 4 sets of 5,000.
DEFAULT_INTERVAL_WIDTH = 0.02
#: Fewest random sets before the stopping rule is consulted (the sd of fewer is too rough).
DEFAULT_MIN_SETS = 4
#: Confidence level of the interval the stopping rule bounds.
CONFIDENCE = 0.95


def mean_interval_widths(values: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """(P,) full width ``2·t·sd/√B`` of the confidence interval of each row's mean, for (P, B)
    values (Student's t, B − 1 degrees of freedom; NaN for B < 2 or a NaN value)."""
    from scipy.stats import t as student_t  # imported here: scipy.stats costs ~0.5 s to import

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    count = values.shape[1]
    if count < 2:
        return np.full(values.shape[0], np.nan)
    quantile = float(student_t.ppf(0.5 + confidence / 2.0, count - 1))
    return 2.0 * quantile * values.std(axis=1, ddof=1) / math.sqrt(count)


def random_set_stream(n: int, size: int, seed: int) -> Iterator[np.ndarray]:
    """Fig. 2's random sets of ``size`` of ``n`` stimuli, one (size,) sorted int64 array at a
    time: the draws of :func:`analyses.random_sets` for the same ``seed``, in order."""
    if not 1 <= size <= n:
        raise ValueError(f"size={size} is out of range for {n} stimuli; use 1 <= size <= {n}")
    from .analyses import set_draw_seeds  # here: analyses is slow to import

    # analyses.random_sets' stream (the first of two spawned from the seed), one
    # choice(n, size, replace=False) per set (tests/test_random_baseline.py checks they agree)
    rng = np.random.default_rng(set_draw_seeds(seed)[0])
    while True:
        yield np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def sets_needed(values: np.ndarray, interval_width: float, confidence: float = CONFIDENCE) -> int:
    """Random sets the widest row of (P, B) ``values`` needs for an interval of
    ``interval_width``, from its current sd (normal approximation: ``(2·z·sd / width)²``)."""
    from scipy.stats import norm

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if values.shape[1] < 2:
        return values.shape[1] + 1
    sd = float(np.nanmax(values.std(axis=1, ddof=1)))
    if not np.isfinite(sd):
        return values.shape[1] + 1
    z = float(norm.ppf(0.5 + confidence / 2.0))
    return int(math.ceil((2.0 * z * sd / interval_width) ** 2))


class RandomScores(NamedTuple):
    """Scores of every pair on the random sets that were drawn (:func:`sequential_random_scores`).

    ``values``: ``{name: (P, B) float64}``; ``n_sets``: B; ``stop_on``: the name whose mean the
    stopping rule bounds; ``widest_interval``: the largest over pairs of the confidence-interval
    width of the mean of ``values[stop_on]`` (NaN for B < 2); ``interval_width``: the width asked
    for (None: a fixed number of sets was asked for); ``reached``: whether every pair's interval
    is at most ``interval_width`` wide.
    """

    values: dict[str, np.ndarray]
    n_sets: int
    stop_on: str
    widest_interval: float
    interval_width: float | None
    reached: bool


def sequential_random_scores(
    score: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    n: int,
    size: int,
    *,
    stop_on: str,
    interval_width: float | None = DEFAULT_INTERVAL_WIDTH,
    max_sets: int = 200,
    min_sets: int = DEFAULT_MIN_SETS,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    progress: Callable[[int, int], None] | None = None,
) -> RandomScores:
    """Any scores on Fig. 2's random sets, drawn until the mean of one of them is pinned.

    Args:
        score: ``score(sets (b, size)) -> {name: (P, b)}``, e.g. the subset engine's metrics of P
            pairs (``subset_metrics.metric_on_sets`` for any registry metric).
        n: stimuli in the run; size: stimuli per random set.
        stop_on: the name in ``score``'s result whose mean the stopping rule bounds.
        interval_width: stop once every pair's ``confidence`` interval of the mean of
            ``stop_on`` is at most this wide (in its units); None draws exactly ``max_sets``.
        max_sets: most sets drawn; min_sets: fewest before stopping (at least 2).
        seed: as in :func:`analyses.random_sets`; confidence: of the interval (0.95).
        progress: ``progress(sets drawn, max_sets)`` after each batch (None: silent).

    The sets are :func:`random_set_stream`'s (= ``analyses.random_sets``' draws, in order), in
    batches sized from the current spread (:func:`sets_needed`), at most doubling the sets drawn.
    """
    if max_sets < 1:
        raise ValueError(f"max_sets must be at least 1, got {max_sets}; use e.g. 200")
    if interval_width is not None and not interval_width > 0:
        raise ValueError(
            f"interval_width must be a positive width of the mean, got {interval_width!r}; use "
            f"e.g. {DEFAULT_INTERVAL_WIDTH}, or None for a fixed number of sets"
        )
    if interval_width is not None and max_sets < 2:  # (2 were drawn all the same)
        raise ValueError(
            f"a baseline drawn to a precision needs at least 2 random sets, got max_sets="
            f"{max_sets}; use max_sets >= 2, or interval_width=None for a fixed number of sets"
        )
    min_sets = max(2, min(int(min_sets), max_sets))
    stream = random_set_stream(n, size, seed)
    parts: dict[str, list[np.ndarray]] = {}
    drawn = 0

    def bounded() -> np.ndarray:
        return np.concatenate(parts[stop_on], axis=1)

    while True:
        if interval_width is None:
            batch = max_sets - drawn
        elif drawn < min_sets:
            batch = min_sets - drawn
        else:
            values = bounded()
            widths = mean_interval_widths(values, confidence)
            if np.all(widths <= interval_width) or drawn >= max_sets:
                break
            wanted = sets_needed(values, interval_width, confidence)
            # at least a quarter more, at most as many again (the sd of a few sets is itself
            # rough: growing geometrically never overshoots by more than the sets drawn so far)
            batch = int(
                min(max_sets - drawn, drawn, max(wanted - drawn, math.ceil(drawn / 4), 1))
            )
        if batch <= 0:
            break
        sets = np.stack([next(stream) for _ in range(batch)])
        result = score(sets)
        if stop_on not in result:
            raise ValueError(f"score returned {sorted(result)}, not {stop_on!r} (stop_on)")
        for name, values in result.items():
            parts.setdefault(name, []).append(np.atleast_2d(np.asarray(values, dtype=np.float64)))
        drawn += batch
        if progress is not None:
            progress(drawn, max_sets)
        if interval_width is None:
            break
    values = {name: np.concatenate(arrays, axis=1) for name, arrays in parts.items()}
    widths = mean_interval_widths(values[stop_on], confidence)
    widest = float(np.max(widths)) if widths.size and not np.isnan(widths).any() else float("nan")
    reached = interval_width is not None and bool(np.all(widths <= interval_width))
    return RandomScores(values, drawn, stop_on, widest, interval_width, reached)
