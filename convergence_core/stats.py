"""Statistics used by the paper's analyses: permutation test of two stimulus sets, percentile
intervals, paired tests across model pairs, correlation with a least-squares fit line.

Everything here is model-agnostic: a "statistic" is any function of stimulus index sets (in the
analyses, CKNNA of each vision × language pair on those stimuli).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .validation import check_features, check_level

#: Relative tolerance under which a permuted value counts as "as extreme as" the observed one
#: (every permutation test of the package uses it): it keeps the identity permutation (an exact
#: tie) counted despite floating-point rounding.
TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of one statistic's test in :func:`permutation_tests_two_sets`.

    ``observed`` is statistic(first) - statistic(second); ``null`` (n_permutations,) holds the
    same difference for each relabelling; p-values use the +1 correction
    ``(1 + #{as extreme}) / (n_permutations + 1)`` so they are never 0.
    """

    observed: float
    p_value_two_sided: float
    p_value_first_greater: float
    null: np.ndarray
    n_permutations: int


#: Label shuffles drawn and scored at a time (:func:`label_shuffle_blocks`): a block holds
#: 2 · SHUFFLE_BLOCK · s indices (~25 MB at s = 25,000) however many shuffles a test has (all
#: 1,000 at once were 0.8 GB at 100,000 stimuli, with their copies).
SHUFFLE_BLOCK = 64


def _two_sets(
    first: object, second: object, n_permutations: int
) -> tuple[np.ndarray, np.ndarray]:
    """The two sets of a permutation test as 1-D intp arrays of one length s; ValueError naming
    the fix otherwise (or when n_permutations < 1)."""
    first = np.asarray(first, dtype=np.intp)
    second = np.asarray(second, dtype=np.intp)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(
            f"the two sets must be 1-D index arrays of equal length, got shapes {first.shape} and "
            f"{second.shape}; pass sets of the same size"
        )
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}; use e.g. 1000")
    return first, second


def label_shuffle_blocks(
    first: np.ndarray,
    second: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    *,
    block: int = SHUFFLE_BLOCK,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The relabelled sets of a two-set permutation test, ``block`` relabellings at a time.

    ``first`` and ``second`` are disjoint 1-D index arrays of the same length s; each relabelling
    shuffles the 2·s pooled indices (one ``rng.permutation`` per relabelling, in order) and splits
    them into two sets of s again. Yields ``(first', second')``, each (b, s) intp with b = ``block``
    (the last block: what is left), n_permutations rows in all: the same relabellings, in the same
    order, from the same draws whatever ``block`` is, so a test scored block by block has the
    nulls and p-values of one scored all at once, in O(block · s) memory instead of
    O(n_permutations · s). The arguments are checked when called, before the first block.
    """
    first, second = _two_sets(first, second, n_permutations)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}; use e.g. 64")
    return _shuffle_blocks(np.concatenate([first, second]), first.shape[0], int(n_permutations),
                           rng, int(block))


def _shuffle_blocks(
    pool: np.ndarray, s: int, n_permutations: int, rng: np.random.Generator, block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`label_shuffle_blocks` on the (2·s,) pooled indices, arguments checked: a fresh
    (b, 2·s) array per block, row r = ``pool[rng.permutation(2·s)]``, split after column s."""
    for start in range(0, n_permutations, block):
        shuffled = np.empty((min(block, n_permutations - start), pool.shape[0]), dtype=np.intp)
        for row in shuffled:
            np.take(pool, rng.permutation(pool.shape[0]), out=row)
        yield shuffled[:, :s], shuffled[:, s:]


def permutation_p_value(as_extreme: int | np.ndarray, n_permutations: int) -> float | np.ndarray:
    """The permutation p-value of ``as_extreme`` null values as extreme as the observed one out of
    ``n_permutations``, with the +1 correction (the observed labelling counts as one of the null's,
    so p is never 0): ``(1 + as_extreme) / (n_permutations + 1)``; element-wise for an array."""
    return (1 + as_extreme) / (n_permutations + 1)


def permutation_p_values(observed: float, null: np.ndarray) -> tuple[float, float]:
    """(two-sided, observed-greater) permutation p-values with the +1 correction.

    A null value counts as "as extreme" within a relative tolerance of :data:`TIE_TOLERANCE`. NaN
    (both) when the observed value or any null value is not finite: NaN compares as not extreme,
    which would give an undefined statistic the smallest p there is, and shrink the others.
    """
    null = np.asarray(null, dtype=np.float64)
    if not (np.isfinite(observed) and np.isfinite(null).all()):
        return float("nan"), float("nan")
    tolerance = TIE_TOLERANCE * max(1.0, abs(observed))
    as_extreme_two_sided = int(np.count_nonzero(np.abs(null) >= abs(observed) - tolerance))
    as_extreme_greater = int(np.count_nonzero(null >= observed - tolerance))
    return (
        permutation_p_value(as_extreme_two_sided, null.shape[0]),
        permutation_p_value(as_extreme_greater, null.shape[0]),
    )


def _statistic_values(
    statistics: Callable[[np.ndarray], np.ndarray], sets: np.ndarray
) -> np.ndarray:
    """statistics(sets) as (P, B) float64; ValueError naming the fix when it is not (P, B)."""
    values = np.asarray(statistics(sets), dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != sets.shape[0]:
        raise ValueError(
            f"statistics must map (B, s) sets to (P, B) values (one row per statistic); got "
            f"{values.shape} for B = {sets.shape[0]}; return e.g. np.stack([stat(sets) ...])"
        )
    return values


def permutation_tests_two_sets(
    statistics: Callable[[np.ndarray], np.ndarray],
    first: np.ndarray,
    second: np.ndarray,
    *,
    n_permutations: int,
    rng: np.random.Generator,
    block: int = SHUFFLE_BLOCK,
) -> list[PermutationResult]:
    """Permutation tests of P statistics at once, all on the same label shuffles.

    ``statistics`` maps stacked index sets (B, s) to their values (P, B) (e.g. CKNNA of P model
    pairs on each set, :func:`neighbours.subset_alignment`); it is called on the observed sets
    (B = 2), then on each block of ``block`` relabellings (:func:`label_shuffle_blocks`: B = 2·b,
    the first sets of the block, then the second ones), so memory is O(block · s), not
    O(n_permutations · s); the relabellings, nulls and p-values do not depend on ``block``
    (as long as a statistic's value on a set does not depend on the other sets of the call).
    Returns one result per statistic.
    """
    first, second = _two_sets(first, second, n_permutations)
    observed = _statistic_values(statistics, np.stack([first, second]))
    null = np.empty((observed.shape[0], int(n_permutations)), dtype=np.float64)
    done = 0
    for shuffled_first, shuffled_second in label_shuffle_blocks(
        first, second, n_permutations, rng, block=block
    ):
        b = shuffled_first.shape[0]
        values = _statistic_values(statistics, np.concatenate([shuffled_first, shuffled_second]))
        if values.shape[0] != observed.shape[0]:
            raise ValueError(
                f"statistics gave {values.shape[0]} rows on the label shuffles but "
                f"{observed.shape[0]} on the observed sets; return one row per statistic always"
            )
        null[:, done : done + b] = values[:, :b] - values[:, b:]
        done += b
    results = []
    for row, row_null in zip(observed, null, strict=True):
        difference = float(row[0] - row[1])
        two_sided, greater = permutation_p_values(difference, row_null)
        results.append(
            PermutationResult(difference, two_sided, greater, row_null, int(n_permutations))
        )
    return results


#: Fewest values whose central 95% percentile interval is more than their extremes' neighbours
#: (each tail holds 2.5% = 1/40 of them); with fewer, the interval is about their range.
PERCENTILE_INTERVAL_MIN_VALUES = 40


def spread_words(n_values: int) -> str:
    """What a 95% percentile interval of ``n_values`` values is, in words for a legend:
    ``95% of 200 sets``, or ``about the range of 5 sets`` where there are too few for tails
    (:data:`PERCENTILE_INTERVAL_MIN_VALUES`)."""
    if n_values < PERCENTILE_INTERVAL_MIN_VALUES:
        return f"about the range of {n_values} sets"
    return f"95% of {n_values} sets"


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Central percentile interval of ``values`` (e.g. 2.5th and 97.5th percentiles for 0.95)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot take a percentile interval of no values; draw at least one set")
    level = check_level(level)
    tail = 100.0 * (1.0 - level) / 2.0
    lower, upper = np.percentile(values, [tail, 100.0 - tail])
    return float(lower), float(upper)


def paired_difference_tests(first: np.ndarray, second: np.ndarray) -> pd.DataFrame:
    """Wilcoxon signed-rank and paired t tests of first vs second across pairs (two-sided).

    Returns one row per test: ``test``, ``statistic``, ``p_value``, ``n_pairs``,
    ``mean_difference`` (mean of first - second). With fewer than 2 pairs, or when every
    difference is zero, the statistic and p-value are NaN (no test is possible); so are the t
    test's when the differences do not vary (up to rounding): t would be ±inf and p 0.
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(
            "paired values must be 1-D arrays of equal length, got "
            f"{first.shape} and {second.shape}"
        )
    # imported here: scipy.stats takes ~0.5 s to import, and every dashboard page imports this
    # module (through dashboard/lab.py) without needing these tests
    from scipy import stats as sps

    differences = first - second
    n_pairs = differences.shape[0]
    mean_difference = float(differences.mean()) if n_pairs else float("nan")
    rows = []
    testable = n_pairs >= 2 and np.any(differences != 0)
    # the rounding of first - second: differences within it of each other have no variance
    rounding = 4 * np.finfo(np.float64).eps * max(np.abs(first).max(initial=0.0),
                                                  np.abs(second).max(initial=0.0))
    varies = n_pairs >= 2 and np.ptp(differences) > rounding
    for name, test in (("wilcoxon_signed_rank", sps.wilcoxon), ("paired_t", sps.ttest_rel)):
        statistic = p_value = float("nan")
        if testable and (varies or name != "paired_t"):
            result = test(first, second) if name == "paired_t" else test(differences)
            statistic, p_value = float(result.statistic), float(result.pvalue)
        rows.append(
            {
                "test": name,
                "statistic": statistic,
                "p_value": p_value,
                "n_pairs": n_pairs,
                "mean_difference": mean_difference,
            }
        )
    return pd.DataFrame(rows)


def correlation_with_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman ρ (two-sided p-values) of y on x, and the least-squares line.

    Returns ``pearson_r``, ``pearson_p_value``, ``spearman_rho``, ``spearman_p_value``,
    ``fit_slope``, ``fit_intercept`` (y ≈ slope·x + intercept) and ``n_stimuli``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.shape[0] < 3:
        raise ValueError(
            f"correlation needs two 1-D arrays of equal length >= 3, got {x.shape} and {y.shape}"
        )
    from scipy import stats as sps  # here: see paired_difference_tests

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        pearson = spearman = (nan, nan)
        slope, intercept = nan, float(y.mean())
    else:
        pearson_result = sps.pearsonr(x, y)
        spearman_result = sps.spearmanr(x, y)
        pearson = (float(pearson_result.statistic), float(pearson_result.pvalue))
        spearman = (float(spearman_result.statistic), float(spearman_result.pvalue))
        slope, intercept = (float(v) for v in np.polyfit(x, y, deg=1))
    return {
        "pearson_r": pearson[0],
        "pearson_p_value": pearson[1],
        "spearman_rho": spearman[0],
        "spearman_p_value": spearman[1],
        "fit_slope": slope,
        "fit_intercept": intercept,
        "n_stimuli": int(x.shape[0]),
    }


def ordinal_ranks(values: np.ndarray) -> np.ndarray:
    """0-based int64 ranks along the last axis (0 = lowest; ties broken by position, so every
    rank is distinct), for (n,) values or each row of (S, n)."""
    values = np.asarray(values)
    order = np.argsort(values, axis=-1, kind="stable")
    ranks = np.empty(order.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(values.shape[-1], dtype=np.int64), axis=-1)
    return ranks


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based float64 ranks along the first axis of (n,) values or each column of (n, P), ties
    given the average of the ranks they span (``scipy.stats.rankdata``'s "average", to the bit:
    every rank is a half-integer; a column holding a NaN is all NaN, as there). NumPy only:
    ``scipy.stats`` takes ~0.5 s to import, and the dashboard ranks without needing it."""
    values = np.asarray(values, dtype=np.float64)
    columns = values.reshape(values.shape[0], values.shape[1] if values.ndim == 2 else 1)
    n = columns.shape[0]
    order = np.argsort(columns, axis=0, kind="stable")
    ordered = np.take_along_axis(columns, order, axis=0)
    position = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None], columns.shape)
    # a run of equal values spans sorted positions first..last; each gets (first + last) / 2 + 1
    starts = np.ones(columns.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(columns.shape, dtype=bool)
    ends[:-1] = starts[1:]
    first = np.maximum.accumulate(np.where(starts, position, 0.0), axis=0)
    last = np.minimum.accumulate(np.where(ends, position, n - 1.0)[::-1], axis=0)[::-1]
    ranks = np.empty(columns.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
    ranks[:, np.isnan(columns).any(axis=0)] = np.nan
    return ranks.reshape(values.shape)


def centred_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (:func:`average_ranks`) of each column of (n, P), centred and scaled to unit
    norm, (n, P): Spearman ρ of two columns is their inner product. A constant column (no ranks
    to speak of) is NaN. Column-major, as each column is read whole (and as ``rankdata(axis=0)``
    returns them: the products below are then the earlier implementation's to the bit)."""
    ranks = np.asfortranarray(average_ranks(values))
    ranks -= ranks.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ranks / np.linalg.norm(ranks, axis=0)


def spearman_rhos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ (average ranks for ties) of each column of x (n, P) with y (n,), (P,); NaN where
    either is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return np.clip(centred_ranks(x).T @ centred_ranks(y[:, None])[:, 0], -1.0, 1.0)


def spearman_rho(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman ρ of two (n,) scores (average ranks for ties); NaN when either is constant."""
    return float(spearman_rhos(np.asarray(first, dtype=np.float64)[:, None], second)[0])


#: Numbers per block of permutations in :func:`spearman_permutation_tests` (at most ~32 MB of
#: float64); the permutations drawn do not depend on it.
_PERMUTATION_BLOCK_ELEMENTS = 1 << 22


def spearman_permutation_tests(
    x: np.ndarray,
    y: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    *,
    block_elements: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spearman ρ of each column of x (n, P) with y (n,), each with permutation p-values, all on
    the same permutations: ``(rho, p_two_sided, p_positive)``, each (P,).

    The null shuffles which stimulus each y value belongs to (``n_permutations`` shuffles by
    :func:`.shuffles.permutation_blocks` from ``rng``, at most ``block_elements`` numbers at a
    time, default :data:`_PERMUTATION_BLOCK_ELEMENTS`); p = :func:`permutation_p_value` of
    #{|ρ_perm| ≥ |ρ|} (two-sided) or #{ρ_perm ≥ ρ} (positive), ties within
    :data:`TIE_TOLERANCE`. A column whose ρ is undefined (either score
    constant) gets NaN p-values: NaN compares as not extreme, which would give it the smallest p
    there is. Arguments are the caller's to check (:func:`spearman_permutation_test` checks them).
    """
    from .shuffles import permutation_blocks  # numba: imported when a test runs

    rx = centred_ranks(np.asarray(x, dtype=np.float64))
    ry = centred_ranks(np.asarray(y, dtype=np.float64)[:, None])[:, 0]
    rho = np.clip(rx.T @ ry, -1.0, 1.0)
    if block_elements is None:
        block_elements = _PERMUTATION_BLOCK_ELEMENTS
    # |ρ| ≤ 1, so the tolerance relative to max(1, |ρ|) is TIE_TOLERANCE itself
    two_sided = np.zeros(rho.shape[0], dtype=np.int64)
    positive = np.zeros(rho.shape[0], dtype=np.int64)
    for perms in permutation_blocks(len(ry), n_permutations, rng, block_elements=block_elements):
        null = ry[perms] @ rx  # (B, P)
        two_sided += np.count_nonzero(np.abs(null) >= np.abs(rho) - TIE_TOLERANCE, axis=0)
        positive += np.count_nonzero(null >= rho - TIE_TOLERANCE, axis=0)
    undefined = np.isnan(rho)
    return (
        rho,
        np.where(undefined, np.nan, permutation_p_value(two_sided, n_permutations)),
        np.where(undefined, np.nan, permutation_p_value(positive, n_permutations)),
    )


def spearman_permutation_test(
    first: np.ndarray,
    second: np.ndarray,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    names: tuple[str, str] = ("first", "second"),
) -> dict[str, float]:
    """Spearman ρ between two per-stimulus scores, with a two-sided permutation p-value.

    :func:`spearman_permutation_tests` of the two with ``numpy.random.default_rng(seed)``: the
    null shuffles which stimulus each ``second`` value belongs to; p = (1 + #{|ρ_perm| ≥ |ρ|}) /
    (n_permutations + 1), also one-sided (ρ_perm ≥ ρ). Ties get average ranks.

    Returns:
        ``spearman_rho``, ``permutation_p_value_two_sided``, ``permutation_p_value_positive``,
        ``n_permutations``, ``n_stimuli``, ``seed``.
    """
    x = check_features(np.asarray(first, dtype=np.float64).reshape(-1, 1), names[0])
    y = check_features(np.asarray(second, dtype=np.float64).reshape(-1, 1), names[1])
    if x.shape[0] != y.shape[0] or x.shape[0] < 3:
        raise ValueError(
            f"the two scores must have one value per stimulus, at least 3, got {x.shape[0]} and "
            f"{y.shape[0]}; pass scores of the same stimuli in the same order"
        )
    if (
        isinstance(n_permutations, bool)
        or not isinstance(n_permutations, (int, np.integer))
        or (n_permutations < 1)
    ):
        raise ValueError(f"n_permutations must be a positive integer, got {n_permutations!r}")
    n = x.shape[0]
    rho = two_sided = positive = float("nan")
    if np.ptp(x) > 0 and np.ptp(y) > 0:  # else ρ is undefined: no permutations drawn
        rhos, two_sideds, positives = spearman_permutation_tests(
            x, y[:, 0], int(n_permutations), np.random.default_rng(seed)
        )
        rho, two_sided, positive = float(rhos[0]), float(two_sideds[0]), float(positives[0])
    return {
        "spearman_rho": rho,
        "permutation_p_value_two_sided": two_sided,
        "permutation_p_value_positive": positive,
        "n_permutations": int(n_permutations),
        "n_stimuli": n,
        "seed": int(seed),
    }
