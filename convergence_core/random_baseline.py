"""The random-subset baseline of alignment, drawn until its mean is known to a stated precision.

Fig. 2 compares a score on the low- and high-dispersion sets with the same score on random sets of
the same size (:func:`analyses.dispersion_set_alignment`: a fixed number of the sets of
:func:`analyses.random_sets`, 200 by default). How many random sets that needs depends on how much
the score varies between random sets, which falls with the set size: on 59-stimulus sets of the
demo the random CKNNA of a pair spreads by ~0.05, on 5,000-stimulus sets of a 20,000-stimulus run
by ~0.002. Drawing 200 sets of 25,000 stimuli takes about a minute, where a handful pins the mean
to 0.001.

Stopping once the usual t interval of the mean of the B sets drawn, ``2·t·sd/√B``, is narrow
enough (the rule until 2026-12) is optimistic: a low sd from a few sets stops the drawing early
with an interval too narrow (normal scores of sd 0.7 × the width: coverage 0.91–0.93; skewed ones
down to 0.80, the mean biased low). :func:`sequential_random_scores` draws the random sets by
Stein's two-stage rule instead, its first stage sized by a scouting one:

1. *scout*: ``min_sets // 2`` sets (2 by default), and more (at most doubling) while they are fewer
   than ``SCOUT_SHARE`` of the sets that the ``SCOUT_CONFIDENCE`` upper confidence bound of their
   sd says are needed (:func:`scout_sd`);
2. *pilot*: n0 more sets (at least the rest of ``min_sets``), n0 chosen from the scout's sd to
   make the expected total fewest (:func:`pilot_size`). Their sd S, taken with the contrast of
   their mean to the scout's (n0 degrees of freedom, :func:`stein_sd`), sets the total:
   ``N = max(sets drawn, ⌈(2·t·S / interval_width)²⌉)``, t with n0 degrees of freedom
   (:func:`stein_total`; the largest pair's N);
3. the sets up to N, then more while the usual t interval of all the sets is still wider than
   ``interval_width`` (a final check: the Alignment lab shows the usual interval too).

Each pair's interval is ``mean ± t·S/√B`` over all B sets (:func:`stein_interval_widths`), or the
usual t interval where that is wider (``RandomScores.intervals``). For normal scores Stein's has
exactly 95% coverage whatever B the rule stopped at: S comes from sets drawn after n0 was fixed and
before B was, and the rule looks only at differences between scores, never at their level, so the
mean of the B sets is independent of S and of B. Skewed scores cover less, as any t interval
does: 0.946–0.957 for skewness 1, 0.885–0.936 for 2 (the old rule: 0.901–0.946, 0.798–0.909;
``benchmarks/measure_baseline_coverage.py``); random-set CKNNA on the demo has skewness within
±0.21 on 59-stimulus sets, −0.33 on 20. Where the sd is tiny beside the width (large sets: 25,000 of
100,000 stimuli) the rule draws ``min_sets`` sets, as before; where the old rule drew 5–10 it
draws about twice as many (Stein's t has few degrees of freedom there), at ~40 about 1.4 times,
and from ~120 (the demo's 59-stimulus sets) as many; docs/PERFORMANCE.md, "The random baseline's
stopping rule", has the table.

The sets are the same draws as :func:`analyses.random_sets` for the same seed, in the same order
(:func:`random_set_stream`), so a draw that reaches ``max_sets`` equals the paper analysis
exactly, and the first B sets of any draw are the same sets.

A score undefined (NaN) on a random set — SVCCA where a set's features have fewer directions than
``cca_dim`` (repeated stimuli), a kernel metric where a model's features do not vary over the set
— makes that pair's baseline undefined: the baseline is the mean over random sets, and a score
that random sets leave undefined with some probability has no such mean (the mean over the sets
where it is defined would be that of another population, sets without the repeats say, unlike the
sets it is compared with). One undefined draw shows it and no later draw undoes it, so the
stopping rule bounds the pairs still defined (each step above over them alone) and stops once
they are precise, or as soon as no pair is defined. Before, an undefined pair's NaN interval never
became narrow enough and any undefined score drew ``max_sets`` sets (with SVCCA, the slowest
metric, 200). ``RandomScores.undefined`` counts each pair's undefined draws; where every score is
defined the draws and numbers are those of the rule above, unchanged.

Shapes: ``P`` vision × language pairs, ``B`` random sets of ``size`` stimuli out of ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

#: Default precision of the baseline mean: the full width of its 95% confidence interval (CKNNA),
#: i.e. the mean known to ±0.01 — small beside the low/high differences it is compared with
#: (0.1–0.3 on the demo), and reached with ~120 sets of 59 stimuli or 4 sets of 5,000.
DEFAULT_INTERVAL_WIDTH = 0.02
#: Fewest random sets drawn: the scout's ``DEFAULT_MIN_SETS // 2`` and the pilot's rest (the rule
#: draws no more where the sd is tiny beside the width).
DEFAULT_MIN_SETS = 4
#: The scout stops once its sets are this share of the sets its sd's upper bound says are needed.
SCOUT_SHARE = 0.3
#: One-sided confidence of that upper bound of the scout's sd.
SCOUT_CONFIDENCE = 0.75
#: Confidence level of the interval the stopping rule bounds.
CONFIDENCE = 0.95


def _two_sided_t(df: int | np.ndarray, confidence: float) -> np.ndarray:
    """Student's t quantile of a two-sided ``confidence`` interval with ``df`` degrees of freedom
    (scipy.special: scipy.stats costs ~0.5 s to import and ~0.1 ms a call)."""
    from scipy.special import stdtrit

    return stdtrit(df, 0.5 + confidence / 2.0)


def mean_interval_widths(values: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """(P,) full width ``2·t·sd/√B`` of the confidence interval of each row's mean, for (P, B)
    values (Student's t, B − 1 degrees of freedom; NaN for B < 2 or a NaN value)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    count = values.shape[1]
    if count < 2:
        return np.full(values.shape[0], np.nan)
    quantile = float(_two_sided_t(count - 1, confidence))
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
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if values.shape[1] < 2:
        return values.shape[1] + 1
    sd = float(np.nanmax(values.std(axis=1, ddof=1)))
    if not np.isfinite(sd):
        return values.shape[1] + 1
    return int(math.ceil(known_sd_sets(sd, interval_width, confidence)))


def stein_sd(values: np.ndarray, pilot: tuple[int, int]) -> np.ndarray:
    """(P,) Stein's sd of each row of (P, B) ``values``, from the pilot sets ``pilot = (m, m + n0)``
    (columns m to m + n0 − 1) with n0 degrees of freedom: ``S² = (SS + m·n0/(m + n0)·(mean of the
    first m − mean of the pilot)²) / n0``, SS the pilot's sum of squares about its mean — its own
    spread and the contrast of its mean to the first m sets' (= the sum of squares of the first
    m + n0 less that of the first m; both independent of the first m sets' spread, which chose
    n0). NaN where a value is NaN."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    first, stop = int(pilot[0]), int(pilot[1])
    if not 1 <= first < stop <= values.shape[1]:
        raise ValueError(
            f"pilot {pilot} is not a range of sets after at least one scouting set among "
            f"{values.shape[1]}; use (m, m + n0) with 1 <= m < m + n0 <= {values.shape[1]}"
        )

    scout, pilot_sets = values[:, :first], values[:, first:stop]
    count = stop - first
    own = ((pilot_sets - pilot_sets.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    contrast = first * count / stop * (scout.mean(axis=1) - pilot_sets.mean(axis=1)) ** 2
    return np.sqrt((own + contrast) / count)


def stein_total(
    sd: np.ndarray, pilot_sets: int, interval_width: float, confidence: float = CONFIDENCE
) -> float:
    """Sets Stein's rule needs for every pair's interval to be ``interval_width`` wide:
    the largest over pairs of ``⌈(2·t·S / width)²⌉`` for (P,) Stein sds ``sd`` with ``pilot_sets``
    degrees of freedom (t of that many); inf where an sd is NaN. The caller takes the larger of
    this and the sets already drawn."""
    sd = np.atleast_1d(np.asarray(sd, dtype=np.float64))
    if np.isnan(sd).any():
        return math.inf
    quantile = float(_two_sided_t(int(pilot_sets), confidence))
    return float(np.ceil((2.0 * quantile * float(sd.max(initial=0.0)) / interval_width) ** 2))


def stein_interval_widths(
    values: np.ndarray, pilot: tuple[int, int], confidence: float = CONFIDENCE
) -> np.ndarray:
    """(P,) full width ``2·t·S/√B`` of Stein's confidence interval of each row's mean, for (P, B)
    values whose pilot sets are ``pilot = (m, m + n0)`` (:func:`stein_sd`; t with n0 degrees of
    freedom): exact coverage for normal scores, however B was chosen from the pilot and later
    spreads."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    sd = stein_sd(values, pilot)
    quantile = float(_two_sided_t(int(pilot[1]) - int(pilot[0]), confidence))
    return 2.0 * quantile * sd / math.sqrt(values.shape[1])


def scout_sd(values: np.ndarray, *, upper: bool) -> float:
    """The scout's sd: the largest over the rows of its (P, m) ``values`` of their sd (m − 1
    degrees of freedom), or with ``upper`` its one-sided ``SCOUT_CONFIDENCE`` upper confidence
    bound (``sd · √((m − 1) / χ²_{1 − c}(m − 1))``, 3.1 × sd for m = 2, 1.1 × for m = 30); NaN for
    m < 2 or no finite sd."""
    from scipy.special import chdtri

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    count = values.shape[1]
    spreads = values.std(axis=1, ddof=1) if count > 1 else np.array([np.nan])
    if not np.isfinite(spreads).any():
        return math.nan
    spread = float(np.nanmax(spreads))
    if upper:
        spread *= math.sqrt((count - 1) / float(chdtri(count - 1, SCOUT_CONFIDENCE)))
    return spread


def known_sd_sets(sd: float, interval_width: float, confidence: float = CONFIDENCE) -> float:
    """Sets a known ``sd`` needs for an interval of ``interval_width``: ``(2·z·sd / width)²``,
    z the normal quantile (unrounded; NaN for a NaN sd)."""
    from scipy.special import ndtri

    z = float(ndtri(0.5 + confidence / 2.0))
    return (2.0 * z * sd / interval_width) ** 2


def pilot_size(
    sd: float,
    interval_width: float,
    scouted: int,
    fewest: int,
    most: int,
    confidence: float = CONFIDENCE,
) -> int:
    """Pilot sets n0 in [``fewest``, ``most``] that make the expected total fewest if the scores'
    sd were ``sd`` (the scout's, from ``scouted`` sets): the mean over the distribution of Stein's
    S (``sd · √(χ²(n0) / n0)``) of ``max(scouted + n0, ⌈(2·t·S / width)²⌉)``, t with n0 degrees
    of freedom. Few pilot sets make t and S rough and the total large; many overshoot. ``fewest``
    when ``sd`` is 0 or not finite."""
    from scipy.special import chdtri

    fewest, most = int(fewest), int(most)
    if most <= fewest or not (np.isfinite(sd) and sd > 0):
        return fewest
    need = known_sd_sets(sd, interval_width, confidence)  # the best n0 is below it
    top = int(min(most, max(fewest, math.ceil(1.5 * need))))
    candidates = np.arange(fewest, min(top, fewest + 64) + 1)
    if top > candidates[-1]:  # beyond, a geometric grid: the expectation is flat there
        candidates = np.unique(np.concatenate(
            [candidates, np.geomspace(candidates[-1], top, 40).round().astype(np.int64)]
        ))
    quantiles = (np.arange(48) + 0.5) / 48
    df = candidates[:, None]
    spread = sd * np.sqrt(chdtri(df, 1.0 - quantiles[None, :]) / df)
    total = np.ceil((2.0 * _two_sided_t(df, confidence) * spread / interval_width) ** 2)
    expected = np.maximum(scouted + df, total).mean(axis=1)
    return int(candidates[int(np.argmin(expected))])


class RandomScores(NamedTuple):
    """Scores of every pair on the random sets that were drawn (:func:`sequential_random_scores`).

    ``values``: ``{name: (P, B) float64}``; ``n_sets``: B; ``stop_on``: the name whose mean the
    stopping rule bounds; ``widest_interval``: the largest over pairs of ``intervals`` (NaN for
    B < 2 or a NaN value); ``interval_width``: the width asked for (None: a fixed number of sets
    was asked for); ``reached``: whether every pair's interval is at most ``interval_width`` wide;
    ``intervals``: (P,) each pair's reported 95% confidence-interval width of the mean of
    ``values[stop_on]`` — Stein's (:func:`stein_interval_widths`) or the usual t interval
    (:func:`mean_interval_widths`), whichever is wider; the usual one alone for a fixed number of
    sets; ``pilot``: ``(m, m + n0)``, the sets whose spread gives Stein's sd (None for a fixed
    number of sets, or where no pair was defined after the scout); ``undefined``: (P,) how many of
    the B values of ``stop_on`` are NaN for each pair (its baseline is undefined where any is: the
    module docstring says why).
    """

    values: dict[str, np.ndarray]
    n_sets: int
    stop_on: str
    widest_interval: float
    interval_width: float | None
    reached: bool
    intervals: np.ndarray | None = None
    pilot: tuple[int, int] | None = None
    undefined: np.ndarray | None = None


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
            ``stop_on`` (Stein's, module docstring) is at most this wide (in its units); None
            draws exactly ``max_sets``.
        max_sets: most sets drawn; min_sets: fewest (at least 2): the scout's ``min_sets // 2``
            and the pilot's rest.
        seed: as in :func:`analyses.random_sets`; confidence: of the interval (0.95).
        progress: ``progress(sets drawn, max_sets)`` after each batch (None: silent).

    The sets are :func:`random_set_stream`'s (= ``analyses.random_sets``' draws, in order), in
    batches: the scout's, the pilot's, then up to Stein's total at most doubling the sets drawn,
    then the final check's (sized from the spread, :func:`sets_needed`). Each step looks only at
    the pairs whose ``stop_on`` is defined on every set drawn so far; once none is, no more sets
    are drawn (module docstring).
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
    stream = random_set_stream(n, size, seed)
    parts: dict[str, list[np.ndarray]] = {}
    drawn = 0

    def draw(batch: int) -> None:
        nonlocal drawn
        sets = np.stack([next(stream) for _ in range(batch)])
        result = score(sets)
        if stop_on not in result:
            raise ValueError(f"score returned {sorted(result)}, not {stop_on!r} (stop_on)")
        for name, values in result.items():
            parts.setdefault(name, []).append(np.atleast_2d(np.asarray(values, dtype=np.float64)))
        drawn += batch
        if progress is not None:
            progress(drawn, max_sets)

    def bounded() -> np.ndarray:
        """(P', B) ``stop_on`` of the pairs still defined (no NaN on a set drawn so far: a NaN
        leaves a pair's baseline undefined for good, module docstring)."""
        values = np.concatenate(parts[stop_on], axis=1)
        return values[~np.isnan(values).any(axis=1)]

    pilot = None
    if interval_width is None:
        draw(max_sets)
    else:
        min_sets = max(2, min(int(min_sets), max_sets))
        scout_fewest = min_sets // 2
        pilot_fewest = min_sets - scout_fewest
        # 1. the scout: its spread sizes the pilot, and is then spent (it enters no interval)
        draw(scout_fewest)
        while drawn + pilot_fewest < max_sets and bounded().size:
            need = known_sd_sets(scout_sd(bounded(), upper=True), interval_width, confidence)
            if not (np.isfinite(need) and drawn < SCOUT_SHARE * need):
                break
            target = min(2 * drawn, max(drawn + 1, math.ceil(SCOUT_SHARE * need)))
            draw(int(min(target, max_sets - pilot_fewest)) - drawn)
        scouted = drawn
        if bounded().size:  # else no pair is defined, and nothing is left to pin
            # 2. the pilot, sized for the scout's sd (its upper bound where the scout went on:
            # it stopped on a low sd), gives Stein's sd and from it the total
            spread = scout_sd(bounded(), upper=scouted > scout_fewest)
            draw(pilot_size(spread, interval_width, scouted, pilot_fewest, max_sets - scouted,
                            confidence))
            pilot = (scouted, drawn)
        total = drawn
        if bounded().size:
            total = stein_total(
                stein_sd(bounded(), pilot), drawn - scouted, interval_width, confidence
            )
            total = min(max_sets, max(drawn, total))
        # 3. up to the total (at most doubling the sets drawn, for progress), then the final check
        # (a pair undefined on a new set leaves both to the others)
        while drawn < total and bounded().size:
            draw(int(min(total - drawn, drawn)))
        while drawn < max_sets and bounded().size:
            values = bounded()
            if np.all(mean_interval_widths(values, confidence) <= interval_width):
                break
            wanted = sets_needed(values, interval_width, confidence)
            # at least a tenth more, at most as many again
            draw(int(min(max_sets - drawn, drawn, max(wanted - drawn, math.ceil(drawn / 10)))))
    values = {name: np.concatenate(arrays, axis=1) for name, arrays in parts.items()}
    intervals = mean_interval_widths(values[stop_on], confidence)
    if pilot is not None:
        intervals = np.maximum(intervals, stein_interval_widths(values[stop_on], pilot, confidence))
    finite = intervals.size and not np.isnan(intervals).any()
    widest = float(np.max(intervals)) if finite else float("nan")
    reached = interval_width is not None and bool(np.all(intervals <= interval_width))
    undefined = np.isnan(values[stop_on]).sum(axis=1)
    return RandomScores(
        values, drawn, stop_on, widest, interval_width, reached, intervals, pilot, undefined
    )
