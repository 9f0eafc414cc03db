"""Calibrated scores and matched random baselines: is an alignment score on a stimulus set more
than its set size, its density and its categories predict?

* :func:`shuffled_pairing_null` — the same score with the vision–language pairing shuffled within
  the set: a null that keeps each modality's set (its size, density, categories) and destroys only
  the pairing. Reports the null mean, its central interval, the calibrated score (observed − null
  mean), a z-score and a permutation p-value.
* :func:`local_density`, :func:`typicality` — per-stimulus covariates: how close a stimulus is to
  its k nearest neighbours (mean inner product of prepared features), z-scored and averaged over
  models.
* :func:`matched_random_sets` — random sets with the chosen set's covariate profile: stratified on
  covariate quantile bins (× category), or nearest-covariate matching within category. Stimuli
  without a label (:func:`has_label`: None, NaN or an empty string) are one group of their own:
  they are matched only among themselves. :func:`matched_sets_by_cost` chooses the method by its
  cost (nearest within :data:`NEAREST_MATCHING_PICKS` picks, else strata): the one engine of the
  report's matched baselines and the Alignment lab's.
* :func:`compare_with_baseline` — a chosen set's score against the scores of baseline sets
  (interval, one-sided p-values).
* :func:`baseline_freedom` — whether baseline sets leave a verdict possible: a run with few
  stimuli outside a set (8 stimuli, sets of 4) leaves its matched sets one set, drawn again and
  again, against which any gap "survives"; a verdict needs :func:`distinct_sets_needed` distinct
  sets (20 at p < 0.05).
* :func:`resampled_interval` — a resampling interval of any statistic of stimulus rows (bootstrap,
  or half-sampling that never repeats a stimulus, for neighbour metrics).

Everything is a pure function of arrays and a ``score`` callable, seeded by an integer. A score
maps stimulus rows to a float: ``score(rows)``, or ``score(rows_x, rows_y)`` (row m of X paired
with row m of Y) for the shuffled-pairing null; with ``batched=True`` it receives (B, s) arrays and
returns (B,) values — the form of the subset engine, one call for every set.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .stats import percentile_interval, permutation_p_values
from .subsets import check_indices
from .validation import check_count, check_level


def _rng(seed: object) -> np.random.Generator:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}; pass e.g. seed=0.")
    return np.random.default_rng(int(seed))


def _p_values(observed: float, null: np.ndarray) -> tuple[float, float]:
    """(P(null ≥ observed), P(null ≤ observed)): :func:`.stats.permutation_p_values`' one-sided
    p of the observed value, and of its negation against the negated null."""
    null = np.asarray(null, dtype=np.float64)
    return permutation_p_values(observed, null)[1], permutation_p_values(-observed, -null)[1]


def _evaluate(score: Callable, batched: bool, *arrays: np.ndarray) -> np.ndarray:
    """score on each row of the (B, s) arrays: one batched call or B calls."""
    if batched:
        values = np.asarray(score(*arrays), dtype=np.float64)
        if values.shape != (arrays[0].shape[0],):
            raise ValueError(
                f"a batched score must return one value per set, shape ({arrays[0].shape[0]},); got "
                f"{values.shape}."
            )
        return values
    return np.array([float(score(*rows)) for rows in zip(*arrays)], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# shuffled-pairing null
@dataclass(frozen=True)
class CalibratedScore:
    """A score on a set next to its shuffled-pairing null.

    ``calibrated`` = observed − null mean; ``z`` = calibrated / null standard deviation (NaN if
    the null does not vary); ``p_value`` = P(null ≥ observed) with the +1 correction;
    (``null_lower``, ``null_upper``) the central ``level`` interval of the null.
    """

    observed: float
    null_mean: float
    null_sd: float
    null_lower: float
    null_upper: float
    calibrated: float
    z: float
    p_value: float
    n_shuffles: int
    level: float
    null: np.ndarray


def shuffled_pairings(rows: object, n_shuffles: int, seed: int = 0) -> np.ndarray:
    """(n_shuffles, s) int64: the set's rows in a fresh random order per shuffle (seeded)."""
    rows = np.asarray(rows, dtype=np.int64)
    rng = _rng(seed)
    n_shuffles = check_count(n_shuffles, "n_shuffles")
    return np.stack([rows[rng.permutation(rows.size)] for _ in range(n_shuffles)])


def shuffled_pairing_rows(
    rows: object, *, n: int | None = None, n_shuffles: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The pairings a shuffled-pairing null scores: ``(rows_x, rows_y)``, both (1 + n_shuffles, s)
    int64. Row 0 pairs the set as it is; row b > 0 pairs the same X rows with the set's Y rows in
    the b-th random order (:func:`shuffled_pairings`, seeded). ``n``: number of stimuli the rows
    index (checks the rows), optional."""
    rows = np.asarray(rows)
    rows = check_indices(rows, int(n) if n is not None else int(rows.max(initial=0)) + 1)
    rows = rows.astype(np.int64)
    shuffled = shuffled_pairings(rows, n_shuffles, seed)
    rows_x = np.ascontiguousarray(np.broadcast_to(rows, (shuffled.shape[0] + 1, rows.size)))
    return rows_x, np.concatenate([rows[None], shuffled])


def calibrated_score(values: object, level: float = 0.95) -> CalibratedScore:
    """A score on its pairings (:func:`shuffled_pairing_rows`): ``values[0]`` the set as paired,
    ``values[1:]`` the shuffled-pairing null (at least one value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(
            f"values must be one score per pairing, the observed one first and then the null, "
            f"shape (1 + n_shuffles,) with n_shuffles >= 1; got shape {values.shape}"
        )
    level = check_level(level)
    observed, null = float(values[0]), values[1:]
    mean, sd = float(null.mean()), float(null.std(ddof=1)) if null.size > 1 else float("nan")
    lower, upper = percentile_interval(null, level)
    calibrated = observed - mean
    z = calibrated / sd if sd > 0 else float("nan")
    return CalibratedScore(
        observed,
        mean,
        sd,
        lower,
        upper,
        calibrated,
        z,
        _p_values(observed, null)[0],
        null.size,
        level,
        null,
    )


def shuffled_pairing_null(
    score: Callable[[np.ndarray, np.ndarray], float],
    rows: object,
    *,
    n: int | None = None,
    n_shuffles: int = 200,
    seed: int = 0,
    level: float = 0.95,
    batched: bool = False,
) -> CalibratedScore:
    """The score of a set against the same score with the pairing shuffled within the set
    (:func:`calibrated_score` of ``score`` on :func:`shuffled_pairing_rows`).

    Args:
        score: ``score(rows_x, rows_y) -> float``: alignment of X[rows_x] with Y[rows_y], row m
            paired with row m (batched: (B, s) arrays → (B,)).
        rows: the set, (s,) distinct stimulus indices.
        n: number of stimuli the rows index (checks the rows), optional.
        n_shuffles: null draws (each one random permutation of the Y rows).
        seed: integer seed of the shuffles.
        level: central mass of the null interval.
        batched: ``score`` takes stacked (B, s) rows.
    """
    level = check_level(level)
    rows_x, rows_y = shuffled_pairing_rows(rows, n=n, n_shuffles=n_shuffles, seed=seed)
    return calibrated_score(_evaluate(score, batched, rows_x, rows_y), level)


# ----------------------------------------------------------------------------------------------
# covariates
def local_density(neighbour_values: object, k: int = 10) -> np.ndarray:
    """(n,) float64: each stimulus's mean similarity to its k nearest other stimuli.

    ``neighbour_values`` (n, K ≥ k) are the inner products of each stimulus with its most similar
    others, most similar first (``run.neighbours(model, layer).values``, or
    ``metrics.nearest_neighbours(prepare_features(F), k).values``). High = a typical stimulus in a
    dense region; low = an outlier.
    """
    values = np.asarray(neighbour_values, dtype=np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(
            f"neighbour_values must be a finite (n, K) array of similarities (no NaN/inf), got "
            f"shape {values.shape}; pass NeighbourTable.values (or rebuild the neighbour table)."
        )
    k = check_count(k, "k")
    if k > values.shape[1]:
        raise ValueError(
            f"k={k} but only {values.shape[1]} neighbours per stimulus are given; pass k <= {values.shape[1]}."
        )
    return values[:, :k].mean(axis=1)


def typicality(densities: Sequence[object]) -> np.ndarray:
    """(n,) mean over models of each model's z-scored :func:`local_density` (one array each)."""
    arrays = [np.asarray(d, dtype=np.float64) for d in densities]
    if not arrays or any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError("pass one (n,) density array per model, all of the same length n.")
    z = []
    for a in arrays:
        sd = a.std()
        z.append((a - a.mean()) / sd if sd > 0 else np.zeros_like(a))
    return np.mean(z, axis=0)


# ----------------------------------------------------------------------------------------------
# matched random sets

#: Labels are matched on only when the median label holds at least this many stimuli
MIN_STIMULI_PER_LABEL = 5


def has_label(labels: object) -> np.ndarray:
    """(n,) bool: whether each stimulus has a label. No label: a missing value (None, NaN, pandas'
    NA) or a string that is empty or blank. A data set's CSV gives an empty cell as ``""``
    (``datasets``), a parquet column a missing value as None or NaN: each is the same "no label",
    never a category of its own (``str`` made them the categories "None", "nan" and "")."""
    values = np.asarray(labels, dtype=object)
    if values.ndim != 1:
        raise ValueError(
            f"labels must be an (n,) array, one label per stimulus; got shape {values.shape}"
        )
    missing = np.asarray(pd.isna(values), dtype=bool)
    blank = np.fromiter(
        (isinstance(value, str) and not value.strip() for value in values), bool, values.size
    )
    return ~(missing | blank)


def label_codes(labels: object) -> np.ndarray:
    """(n,) int64: 0, 1, … for the labels in sorted order (labels of types that do not compare,
    str and int say, compared as strings) and -1 for a stimulus without one (:func:`has_label`)."""
    values = np.asarray(labels, dtype=object)
    labelled = has_label(values)
    codes = np.full(values.size, -1, dtype=np.int64)
    if labelled.any():
        kept = values[labelled]
        try:
            _, inverse = np.unique(kept, return_inverse=True)
        except TypeError:  # mixed types
            _, inverse = np.unique(kept.astype(str), return_inverse=True)
        codes[labelled] = inverse.ravel()
    return codes


def matchable_labels(labels: object) -> tuple[np.ndarray | None, str]:
    """``labels`` (n,) as strings when matched random sets can be drawn within them, else None
    with the reason in words: the median label must hold at least
    :data:`MIN_STIMULI_PER_LABEL` stimuli (one image per class, as in an ImageNet sample, cannot
    be matched on class). ``labels`` None gives ``(None, "")``.

    A stimulus without a label (:func:`has_label`: None, NaN or an empty string) is None in the
    result (then an object array; else str), and the median counts the labelled stimuli's labels
    only: :func:`matched_random_sets`
    matches such stimuli only among themselves (on the covariate alone), so a matched set has as
    many of them as the chosen set. Left out instead, the sets would change size (and a neighbour
    metric's level with it); matched to labelled stimuli, they would bring in categories the
    chosen set may not have."""
    if labels is None:
        return None, ""
    values = np.asarray(labels, dtype=object)
    labelled = has_label(values)
    if not labelled.any():
        return None, "no stimulus has a label (each is None, NaN or an empty string)"
    text = values.astype(str)
    _, counts = np.unique(text[labelled], return_counts=True)
    median = float(np.median(counts))
    if median < MIN_STIMULI_PER_LABEL:
        return None, (
            f"the median label holds {median:g} {'stimulus' if median == 1 else 'stimuli'} "
            f"(fewer than {MIN_STIMULI_PER_LABEL}), too few to draw matched sets from"
        )
    return (text if labelled.all() else np.where(labelled, text, None)), ""


def _check_covariates(
    chosen: object, covariate: object, labels: object
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    if covariate is None and labels is None:
        raise ValueError("pass a covariate (n,), labels (n,) or both to match on.")
    n = None
    if covariate is not None:
        covariate = np.asarray(covariate, dtype=np.float64)
        if covariate.ndim != 1 or not np.isfinite(covariate).all():
            raise ValueError("covariate must be a finite (n,) array, one value per stimulus.")
        n = covariate.size
    if labels is not None:
        labels = np.asarray(labels, dtype=object)
        if labels.ndim != 1 or (n is not None and labels.size != n):
            raise ValueError(f"labels must be an (n,) array with n = {n}, one label per stimulus.")
        n = labels.size
        labels = label_codes(labels)  # -1: no label, a group of its own
    chosen = check_indices(chosen, n)
    return chosen, covariate, labels, n


def covariate_strata(
    covariate: object = None, labels: object = None, *, n_bins: int = 5
) -> np.ndarray:
    """(n,) int stratum of each stimulus: covariate quantile bin (over all n) × label (stimuli
    without a label, :func:`has_label`, are one label of their own)."""
    n_bins = check_count(n_bins, "n_bins")
    strata = np.zeros(np.size(covariate if covariate is not None else labels), dtype=np.int64)
    if covariate is not None:
        covariate = np.asarray(covariate, dtype=np.float64)
        edges = np.quantile(covariate, np.linspace(0, 1, n_bins + 1)[1:-1])
        strata = np.searchsorted(edges, covariate, side="right").astype(np.int64)
    if labels is not None:  # label code + 1: stimuli without a label (-1) are stratum 0's
        strata = (label_codes(labels) + 1) * n_bins + strata
    return strata


class _FreeRun:
    """The stimuli of one label ordered by (covariate, index), with the unused ones found in
    amortised near-constant time from any position, leftwards or rightwards (two union-find
    forests with path compression over positions; a used position points past itself)."""

    def __init__(self, members: np.ndarray, covariate: np.ndarray) -> None:
        order = np.lexsort((members, covariate[members]))
        self.index = members[order].tolist()
        self.value = covariate[members][order].tolist()

    def reset(self) -> None:
        m = len(self.index)
        self._right = list(range(m + 1))  # m: past the end
        self._left = list(range(m + 1))  # position j is entry j + 1; 0: before the start

    @staticmethod
    def _root(parent: list[int], j: int) -> int:
        root = j
        while parent[root] != root:
            root = parent[root]
        while parent[j] != root:
            parent[j], j = root, parent[j]
        return root

    def right_of(self, j: int) -> int:
        """The first unused position >= j (len(index) if none)."""
        return self._root(self._right, j)

    def left_of(self, j: int) -> int:
        """The last unused position <= j (-1 if none)."""
        return self._root(self._left, j + 1) - 1

    def use(self, j: int) -> None:
        self._right[j] = j + 1
        self._left[j + 1] = j

    def nearest(self, value: float, start: int, count: int) -> list[tuple[float, int, int]]:
        """The ``count`` unused stimuli whose covariate is closest to ``value`` as (distance,
        index, position), by distance then index (``start``: where ``value`` sorts, every
        position left of it holding a smaller covariate).

        Walks out from ``start`` one block of equal covariates at a time, nearest block first
        (both sides' when equally near); a block's stimuli are in index order, so its first
        ``count`` unused ones are all it can give: a run of ties costs no more than one value.
        """
        values, end = self.value, len(self.index)
        found: list[tuple[float, int, int]] = []
        left, right = self.left_of(start - 1), self.right_of(start)
        while left >= 0 or right < end:
            # distances grow block by block on each side (rounding may make two blocks equally
            # near: the stable sort then orders them by index, so both are taken)
            d_left = value - values[left] if left >= 0 else math.inf
            d_right = values[right] - value if right < end else math.inf
            nearest = d_left if d_left < d_right else d_right
            if len(found) >= count and nearest > found[-1][0]:
                break  # every unused stimulus as near as the count-th is in
            if right < end and d_right == nearest:
                if right + 1 == end or values[right + 1] != values[right]:  # a block of one
                    found.append((d_right, self.index[right], right))
                    right = self.right_of(right + 1)
                else:
                    block_end = bisect.bisect_right(values, values[right], right)
                    right = self._take(right, block_end, d_right, count, found)
            if left >= 0 and d_left == nearest:
                if left == 0 or values[left - 1] != values[left]:  # a block of one
                    found.append((d_left, self.index[left], left))
                    left = self.left_of(left - 1)
                else:
                    block = bisect.bisect_left(values, values[left], 0, left + 1)
                    self._take(self.right_of(block), left + 1, d_left, count, found)
                    left = self.left_of(block - 1)
        found.sort()  # by distance, then index: the order of a stable sort by distance
        return found[:count]

    def _take(
        self, first: int, stop: int, distance: float, count: int,
        found: list[tuple[float, int, int]],
    ) -> int:
        """Add the first ``count`` unused positions from ``first`` (unused) up to ``stop`` to
        ``found``; return the first unused position at or after ``stop``."""
        position, taken = first, 0
        while position < stop and taken < count:
            found.append((distance, self.index[position], position))
            taken += 1
            position = self.right_of(position + 1)
        return position if position >= stop else self.right_of(stop)


def _nearest_matched_sets(
    chosen: np.ndarray,
    covariate: np.ndarray,
    labels: np.ndarray | None,
    pool: np.ndarray,
    n_sets: int,
    n_candidates: int,
    rng: np.random.Generator,
    avoid: np.ndarray | None = None,
) -> np.ndarray:
    """``matched_random_sets(method="nearest")``: (n_sets, s), rows unsorted (``avoid``: (n_sets,
    t) stimuli that draw b may not take, marked used before it starts). Each chosen
    stimulus's ``n_candidates`` nearest unused stimuli of its label are found by walking out from
    its place in the label's covariate order (O(n) memory; per set O(n) to mark every stimulus
    unused again, a few ms at 100,000, and about O(s · n_candidates) for the picks), never by
    ranking every candidate for every chosen stimulus (O(s · n) memory and time, ~5 GB for
    sets of 25,000)."""
    groups = labels if labels is not None else np.zeros(covariate.shape[0], dtype=np.int64)
    runs: dict[object, _FreeRun] = {}
    place: dict[int, tuple[_FreeRun, float, int]] = {}  # chosen stimulus: label's run, place
    for i in chosen.tolist():
        key = groups[i].item() if hasattr(groups[i], "item") else groups[i]
        if key not in runs:
            runs[key] = _FreeRun(np.flatnonzero(pool & (groups == groups[i])), covariate)
        value = float(covariate[i])
        place[i] = (runs[key], value, bisect.bisect_left(runs[key].value, value))
    # where each stimulus of a label's run sits in it (to keep out what a draw must avoid)
    where = (
        {stimulus: (run, at) for run in runs.values() for at, stimulus in enumerate(run.index)}
        if avoid is not None else {}
    )
    sets = np.empty((n_sets, chosen.size), dtype=np.int64)
    for b in range(n_sets):
        for run in runs.values():
            run.reset()
        if avoid is not None:
            for stimulus in avoid[b].tolist():
                if stimulus in where:
                    run, at = where[stimulus]
                    run.use(at)
        for position, i in enumerate(rng.permutation(chosen).tolist()):
            run, value, start = place[i]
            nearest = run.nearest(value, start, n_candidates)
            if not nearest:
                raise ValueError(
                    (f"no stimulus with stimulus {i}'s label is left outside the chosen set "
                     "to match it: too few stimuli share that label" if groups[i] >= 0 else
                     f"no stimulus without a label is left outside the chosen set to match "
                     f"stimulus {i}, which has none (stimuli without a label are matched only "
                     "among themselves): too few stimuli lack a label")
                    + " (in Python, exclude_chosen=False, no avoid or method='strata' relax "
                    "this)."
                )
            _, pick, at = nearest[int(rng.integers(len(nearest)))]
            run.use(at)
            sets[b, position] = pick
    return sets


#: Most stimuli a stratum gives a set for its draw to be made with the other small strata's in one
#: ``rng.integers`` call (:func:`_strata_matched_sets`); strata that give more call ``rng.choice``
#: themselves. Below 200, so that ``Generator.choice`` would use Floyd's algorithm for them at any
#: population (it switches to a tail shuffle above 10,000 stimuli and population / 50 draws).
_FLOYD_MAX_DRAWS = 32
#: Entries (sets × draws per set) of one chunk of the small strata's draws: ~16 MB of int64.
_STRATA_DRAW_CHUNK = 2_000_000


def _floyd_picks(draws: np.ndarray, population: np.ndarray) -> np.ndarray:
    """Floyd's sample without replacement from its draws: (..., m) distinct positions in
    [0, population) from (..., m) draws, draw t uniform on [0, population - m + t]
    (``population`` broadcasts against the leading axes). Draw t is kept unless an earlier pick
    took it, then population - m + t is picked instead — ``Generator.choice(population, m,
    replace=False)``'s Floyd branch, which takes exactly these draws, in this order."""
    picks = draws.copy()
    m = draws.shape[-1]
    for t in range(1, m):
        taken = (picks[..., :t] == draws[..., t, None]).any(axis=-1)
        picks[..., t] = np.where(taken, population - m + t, draws[..., t])
    return picks


def _strata_matched_sets(
    strata: np.ndarray,
    chosen: np.ndarray,
    pool: np.ndarray,
    n_sets: int,
    n_bins: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``matched_random_sets(method="strata")``: (n_sets, s) int64, rows unsorted.

    ``strata`` (n,) int64 (:func:`covariate_strata`), ``chosen`` (s,), ``pool`` (n,) bool (the
    stimuli a set may draw). The pool is grouped by stratum once (a stable sort, O(n log n) time,
    O(n) memory; a scan of all n stimuli per stratum was O(n · strata), quadratic when the labels
    grow with n: 11 s at 100,000 stimuli with a label per 10 and 25 bins, now 0.1 s). Each set
    then draws, stratum by stratum in stratum order, what ``rng.choice(members, needed,
    replace=False)`` draws — the sets of every seed are those that one call per stratum gave
    (tests/test_calibration.py keeps that implementation and compares):

    * a stratum that gives more than :data:`_FLOYD_MAX_DRAWS` stimuli calls ``rng.choice``;
    * a run of consecutive smaller strata takes all its draws in one ``rng.integers`` call:
      ``Generator.choice`` (no replacement, no weights, Floyd's branch, which it takes for samples
      this small) takes one bounded draw per pick, on [0, population − m + t] for pick t, and then
      one per swap of its shuffle, on [0, i] for i = m − 1, …, 1 — the same bounded-integer draws
      as ``rng.integers(0, high)`` with an array of ``high``; the picks follow from the draws
      (:func:`_floyd_picks`) and the shuffle's order is not needed (rows are sorted).

    One Python step per run and per large stratum, not per stratum (0.1 s a set at 100,000
    stimuli with 10,000 labels and 25 bins, where most strata give one or two stimuli; now
    0.007 s). The small strata follow ``Generator.choice``'s algorithm (Floyd's), uniform without
    replacement whatever the NumPy version; were a NumPy release to change choice's algorithm,
    the sets would differ from those of one choice per stratum (the test says so), not be any
    less uniform.
    """
    needed = np.bincount(strata[chosen], minlength=strata.max() + 1)
    used = np.flatnonzero(needed)  # the chosen set's strata, ascending: the order of the draws
    in_pool = np.flatnonzero(pool)
    order = in_pool[np.argsort(strata[in_pool], kind="stable")]  # by stratum, then index
    by_stratum = strata[order]
    start = np.searchsorted(by_stratum, used, side="left")  # a stratum's members: order[start:]
    population = np.searchsorted(by_stratum, used, side="right") - start
    want = needed[used]
    short = np.flatnonzero(population < want)
    if short.size:
        q = short[0]
        h = int(used[q])
        raise ValueError(
            f"stratum {h} (label code {h // n_bins - 1} of label_codes, -1: no label; "
            f"covariate bin {h % n_bins}) has "
            f"{population[q]} stimuli to draw from but the chosen set has {want[q]} there; "
            "use fewer n_bins, exclude_chosen=False, or method='nearest'."
        )
    slot = np.cumsum(want) - want  # where a stratum's picks go in a row
    small = want <= _FLOYD_MAX_DRAWS
    # the small strata's draws of one set, one after the other: 2m - 1 each (m picks, m - 1 swaps)
    length = np.where(small, 2 * want - 1, 0)
    first = np.cumsum(length) - length
    total = int(length.sum())
    into = np.arange(total) - np.repeat(first, length)  # the draw's place in its stratum's
    m_of, pop_of = np.repeat(want, length), np.repeat(population, length)
    high = np.where(into < m_of, pop_of - m_of + 1 + into, 2 * m_of - into)  # exclusive bounds
    # one set's steps, in stratum order: (lo, hi) a run of small strata's draws, or a large stratum
    steps: list[tuple[int, int] | int] = []
    done = 0
    for q in np.flatnonzero(~small).tolist():
        if first[q] > done:
            steps.append((done, int(first[q])))
        steps.append(q)
        done = int(first[q])
    if total > done:
        steps.append((done, total))
    # the small strata by number of picks: their draws' columns and their picks' slots in a row
    groups = []
    for m in np.unique(want[small]).tolist():
        qs = np.flatnonzero(small & (want == m))
        picks = np.arange(m)
        groups.append((qs, (first[qs, None] + picks).ravel(), (slot[qs, None] + picks).ravel()))
    sets = np.empty((n_sets, chosen.size), dtype=np.int64)
    chunk = max(1, _STRATA_DRAW_CHUNK // max(1, total))
    draws = np.empty((min(chunk, n_sets), total), dtype=np.int64)
    for at in range(0, n_sets, chunk):
        rows = range(at, min(n_sets, at + chunk))
        for c, b in enumerate(rows):
            for step in steps:
                if isinstance(step, tuple):
                    draws[c, step[0] : step[1]] = rng.integers(0, high[step[0] : step[1]])
                else:
                    q = step
                    picked = rng.choice(int(population[q]), int(want[q]), replace=False)
                    sets[b, slot[q] : slot[q] + want[q]] = order[start[q] + picked]
        for qs, columns, slots in groups:
            m = columns.size // qs.size
            floyd = draws[: len(rows), columns].reshape(len(rows), qs.size, m)
            picked = _floyd_picks(floyd, population[qs])
            sets[rows.start : rows.stop, slots] = order[start[qs, None] + picked].reshape(
                len(rows), -1
            )
    return sets


def matched_random_sets(
    chosen: object,
    covariate: object = None,
    labels: object = None,
    *,
    n_sets: int = 200,
    method: str = "nearest",
    n_bins: int = 10,
    n_candidates: int = 5,
    exclude_chosen: bool = False,
    avoid: object = None,
    seed: int = 0,
) -> np.ndarray:
    """Random sets with the chosen set's covariate (and category) profile.

    ``method="nearest"`` (default): for each chosen stimulus (in random order) one stimulus is drawn
    uniformly among the ``n_candidates`` unused ones of the same label whose covariate is closest
    to its own. ``method="strata"``: stimuli are binned into ``n_bins`` quantile bins of the
    covariate (× label when labels are given); each set draws, without replacement, as many
    stimuli from each stratum as the chosen set has there (labels only: exact category matching).
    Strata cost O(n log n) once (grouping the stimuli), then per set O(s) and a Python step per
    stratum giving more than 32 stimuli; a seed gives the sets that one ``rng.choice`` per
    stratum gave before 2026-12-07 (O(n · strata) then, quadratic with labels that grow with n).
    Strata leave the covariate gradient *within* a bin unmatched: a set chosen on something
    correlated with the covariate keeps part of its covariate excess (with 5 bins ~9 % of the raw
    excess in the tests, none measurable with 25); nearest matching keeps none measurable either.

    Args:
        chosen: (s,) indices of the chosen set.
        covariate: (n,) per-stimulus covariate (e.g. :func:`typicality`), or None (labels only).
        labels: (n,) categories, or None. Stimuli without a label (:func:`has_label`: None, NaN,
            an empty string) are one group: matched only among themselves.
        n_sets: sets to draw.
        exclude_chosen: draw only from stimuli outside the chosen set (a stratum or label that
            then has too few raises a ValueError). Off by default, and off it should stay for a
            p-value: under the null the chosen set is one more draw, which may hold any stimulus;
            kept out of its own baseline, a set that drew well by chance meets a baseline
            without its good stimuli, and a comparison of two sets (low against high) each
            matched outside itself found a gap in 21 % of null worlds at the 5 % level.
        avoid: (n_sets, t) stimuli that draw b may not take (e.g. the b-th matched set of
            another set, so that two sets' matched sets are disjoint pairs as the two sets are;
            :func:`matched_set_pairs`), or None.
        seed: integer seed.

    Returns:
        (n_sets, s) int64, each row sorted.
    """
    chosen, covariate, labels, n = _check_covariates(chosen, covariate, labels)
    n_sets = check_count(n_sets, "n_sets")
    rng = _rng(seed)
    pool = np.ones(n, dtype=bool)
    if exclude_chosen:
        pool[chosen] = False
    avoid = _check_avoid(avoid, n_sets, n)
    if method == "strata":
        strata = covariate_strata(covariate, labels, n_bins=n_bins)
        if avoid is None:
            sets = _strata_matched_sets(strata, chosen, pool, n_sets, n_bins, rng)
        else:  # a pool per draw: one draw at a time
            sets = np.empty((n_sets, chosen.size), dtype=np.int64)
            for b in range(n_sets):
                kept = pool.copy()
                kept[avoid[b]] = False
                sets[b] = _strata_matched_sets(strata, chosen, kept, 1, n_bins, rng)[0]
    elif method == "nearest":
        if covariate is None:
            raise ValueError(
                "method='nearest' matches on a covariate; pass covariate or use method='strata'."
            )
        n_candidates = check_count(n_candidates, "n_candidates")
        sets = _nearest_matched_sets(
            chosen, covariate, labels, pool, n_sets, n_candidates, rng, avoid
        )
    else:
        raise ValueError(f"method must be 'strata' or 'nearest', got {method!r}.")
    return np.sort(sets, axis=1)


def matched_set_pairs(
    first: object,
    second: object,
    covariate: object = None,
    labels: object = None,
    *,
    seeds: tuple[int, int] = (0, 1),
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Matched random sets of two disjoint sets (e.g. the low- and high-dispersion sets), drawn
    as disjoint pairs: ``(first_sets (B, s1), second_sets (B, s2))``, the b-th second set drawn
    from outside the b-th first set, each from every other stimulus (``exclude_chosen`` off).

    The null of a gap test, metric(first) − metric(second) against the gaps of the pairs, is
    that the two sets are one more such pair: two disjoint sets with these covariate profiles.
    Matched outside themselves instead, each set's baseline lacked its own chance luck while the
    other's could hold it, and the gaps' spread was about half the observed gap's under the null
    (21 % false "survives" at the 5 % level, n = 1,024, sets of 256). ``seeds``: the seeds of the
    two sets' draws (:func:`matched_random_sets`, whose other keywords ``options`` takes).
    The report and the Alignment lab draw their pairs the same way through
    :func:`matched_sets_by_cost` (the second set's call with ``avoid`` = the first's sets), which
    chooses the method by its cost: for sorted sets, the same sets as here with
    ``method="nearest"`` while nearest matching fits :data:`NEAREST_MATCHING_PICKS`.
    """
    first, second = np.asarray(first), np.asarray(second)
    if np.intersect1d(first, second).size:
        raise ValueError("the two sets share stimuli; matched pairs are for disjoint sets")
    if options.get("exclude_chosen"):
        raise ValueError("matched pairs draw from every stimulus; leave exclude_chosen off")
    drawn = matched_random_sets(first, covariate, labels, seed=seeds[0], **options)
    other = matched_random_sets(second, covariate, labels, avoid=drawn, seed=seeds[1], **options)
    return drawn, other


def _check_avoid(avoid: object, n_sets: int, n: int) -> np.ndarray | None:
    """``avoid`` as (n_sets, t) int64 stimulus indices in 0..n-1 (None stays None), else a
    ValueError naming the shape it must have."""
    if avoid is None:
        return None
    avoid = np.asarray(avoid, dtype=np.int64)
    if avoid.ndim != 2 or avoid.shape[0] != n_sets or (
        avoid.size and (avoid.min() < 0 or avoid.max() >= n)
    ):
        raise ValueError(
            f"avoid must be ({n_sets}, t) stimulus indices in 0..{n - 1}, one row per set "
            f"drawn; got shape {avoid.shape}"
        )
    return avoid


#: The most picks (chosen stimuli × sets drawn) for which :func:`matched_sets_by_cost` matches
#: by nearest covariate: a pick costs 4-6 µs of Python (``benchmarks/bench_matching.py``), so this
#: many take ~10 s a set's baseline; beyond it (sets above 10,000 stimuli at 200 draws) strata,
#: O(s) a set. The one budget of the report's matched baselines and the Alignment lab's.
NEAREST_MATCHING_PICKS = 2_000_000
#: The strata :func:`matched_sets_by_cost` tries in turn where nearest matching costs more than
#: :data:`NEAREST_MATCHING_PICKS` or runs short: covariate quantile bins (× label)
MATCHING_STRATA_BINS = (25, 5)


@dataclass(frozen=True)
class MatchedSets:
    """Matched random sets and how they were drawn (:func:`matched_sets_by_cost`).

    ``sets`` (n_sets, s) int64, each row sorted; ``method`` the matching in words:
    ``"nearest typicality"`` (``"... within label"`` with labels) when nearest matching was used,
    else why not, e.g. ``"25 typicality strata within label (nearest matching: 4,000,000 picks,
    above its budget of 2,000,000)"`` or ``"5 typicality strata (nearest matching ran short of
    stimuli)"``; ``", not kept apart from the low set's"`` is appended where the sets to avoid
    had to be let in. ``nearest``: drawn by nearest matching; ``kept_apart``: no draw took a
    stimulus of its row of ``avoid`` (True where nothing was to be avoided).
    """

    sets: np.ndarray
    method: str
    nearest: bool
    kept_apart: bool


def matched_sets_by_cost(
    chosen: object,
    covariate: object,
    labels: object = None,
    *,
    n_sets: int = 200,
    seed: int = 0,
    avoid: object = None,
    n_candidates: int = 5,
    covariate_name: str = "covariate",
    avoided: str = "the sets to avoid",
) -> MatchedSets:
    """Matched random sets of ``chosen`` drawn from every stimulus, by the method its cost
    allows: the one engine of the report's matched baselines (``analyses.matched_baselines``)
    and the Alignment lab's (``dashboard.lab.calibration_table``), so that for the same sets and
    seeds both draw the same sets and reach the same verdict.

    Tried in turn, the first that can draw every set is used (:func:`matched_random_sets`,
    ``exclude_chosen`` off):

    1. nearest-covariate matching within label (``n_candidates``), while ``s · n_sets`` picks
       are at most :data:`NEAREST_MATCHING_PICKS` (4-6 µs of Python a pick);
    2. covariate strata (× label) of each of :data:`MATCHING_STRATA_BINS` bins (25, then 5);
       strata leave the covariate gradient within a bin unmatched (none measurable with 25
       bins in the tests, ~9 % of a set's covariate excess with 5).

    ``avoid`` (n_sets, t): stimuli that draw b may not take (the low set's matched sets when
    drawing the high set's: disjoint pairs, as the two sets are; :func:`matched_set_pairs`).
    Where no method can keep them apart (a label with too few stimuli to spare) the methods are
    tried again without ``avoid``, and ``method`` says so. A method runs short only where a
    label (or stratum) has too few stimuli left; every other error is raised as it is.

    Args:
        chosen: (s,) indices of the chosen set, in any order (drawn as sorted: the order of the
            picks does not depend on the order given).
        covariate: (n,) per-stimulus covariate (e.g. ``analyses.vision_typicality``).
        labels: (n,) categories (e.g. :func:`matchable_labels`' strings), or None. Stimuli
            without a label are one group, matched only among themselves.
        n_sets: sets to draw (B).
        seed: integer seed (the same seed and method give the same sets as
            :func:`matched_random_sets`).
        avoid: (n_sets, t) stimulus indices, or None.
        n_candidates: nearest matching's candidates per pick.
        covariate_name: the covariate in ``method``'s words (``"typicality"``).
        avoided: what ``avoid`` holds, in ``method``'s words (``"the low set's"``).

    Returns:
        :class:`MatchedSets`: ``sets`` (n_sets, s) int64, each row sorted, and ``method``.
    """
    # checked before any attempt: only a shortage may make the next method's turn come
    if covariate is None:
        raise ValueError(
            "matched_sets_by_cost matches on a covariate; pass covariate (n,), or call "
            "matched_random_sets(method='strata') to match on labels alone."
        )
    chosen, _, _, n = _check_covariates(chosen, covariate, labels)
    chosen = np.sort(chosen)
    n_sets = check_count(n_sets, "n_sets")
    n_candidates = check_count(n_candidates, "n_candidates")
    _rng(seed)
    avoid = _check_avoid(avoid, n_sets, n)
    within = " within label" if labels is not None else ""
    picks, budget = chosen.size * n_sets, NEAREST_MATCHING_PICKS  # read at each call
    nearest = picks <= budget
    shortage = None
    for kept_apart in ((avoid, None) if avoid is not None else (None,)):
        attempts: list[tuple[str, dict[str, int]]] = [("nearest", {})] if nearest else []
        attempts += [("strata", {"n_bins": bins}) for bins in MATCHING_STRATA_BINS]
        short_of = ""  # why the strata's turn came, in words
        for method, extra in attempts:
            try:
                sets = matched_random_sets(
                    chosen, covariate, labels, n_sets=n_sets, method=method,
                    n_candidates=n_candidates, avoid=kept_apart, seed=seed, **extra,
                )
            except ValueError as error:  # a label or stratum with too few stimuli left
                shortage = error
                if method == "nearest":
                    short_of = "nearest matching ran short of stimuli" + (
                        " in a label" if labels is not None else ""
                    )
                continue
            if method == "nearest":
                words = f"nearest {covariate_name}{within}"
            else:
                why = short_of or (
                    f"nearest matching: {picks:,} picks, above its budget of {budget:,}"
                )
                words = f"{extra['n_bins']} {covariate_name} strata{within} ({why})"
            apart = avoid is None or kept_apart is not None
            if not apart:
                words += f", not kept apart from {avoided}"
            return MatchedSets(sets, words, method == "nearest", apart)
    raise ValueError(
        f"no matched random sets of {chosen.size} stimuli can be drawn from {n}"
        + (" with these labels" if labels is not None else "")
        + f" ({shortage}); choose a smaller set"
    )


def distinct_sets_needed(alpha: float = 0.05) -> int:
    """Fewest distinct baseline sets that let a one-sided p-value fall below ``alpha``: the
    smallest D with 1 / (D + 1) < alpha (20 at 0.05).

    Why: a baseline asks whether the chosen set is one more draw of the sets it is matched to. If
    those draws are D distinct sets, the chosen set would be one of D + 1 exchangeable sets, and
    no exact p-value is smaller than 1 / (D + 1) — however many times the D sets were drawn (the
    +1-corrected p of B draws, 1 / (B + 1), counts each repeat as new evidence). Fewer distinct
    sets cannot support a verdict at ``alpha``: matched sets that are all the same set (a run of 8
    stimuli, sets of 4: every set's other half) make any gap above that one set's "survive".
    """
    alpha = float(alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}; use e.g. 0.05.")
    needed = max(1, math.ceil(1.0 / alpha - 1.0))
    while 1.0 / (needed + 1) >= alpha:  # rounding of 1 / alpha
        needed += 1
    return needed


@dataclass(frozen=True)
class BaselineFreedom:
    """How freely baseline sets were drawn (:func:`baseline_freedom`).

    ``n_sets`` drawn, ``n_distinct`` of them distinct (as sets of stimuli), ``needed`` the
    distinct sets a verdict at ``alpha`` needs (:func:`distinct_sets_needed`), ``enough`` =
    ``n_distinct >= needed``; ``mean_overlap``: the share of a set's stimuli that another drawn
    set also holds, mean over all pairs of draws (1: one set drawn every time; descriptive, the
    rule is the distinct count).
    """

    n_sets: int
    n_distinct: int
    needed: int
    mean_overlap: float
    alpha: float

    @property
    def enough(self) -> bool:
        return self.n_distinct >= self.needed


def baseline_freedom(sets: object, alpha: float = 0.05) -> BaselineFreedom:
    """Whether baseline sets (B, s) — e.g. :func:`matched_random_sets` — are free enough for a
    verdict at ``alpha``: at least :func:`distinct_sets_needed` distinct sets among the B (see
    there why; a count of sets, not of stimuli, so no threshold on the run's size). O(B · s log s)
    time, O(B · s) memory."""
    sets = np.asarray(sets, dtype=np.int64)
    if sets.ndim != 2 or sets.shape[0] < 1:
        raise ValueError(f"sets must be (B, s) with B >= 1 baseline sets; got {sets.shape}.")
    needed = distinct_sets_needed(alpha)
    rows = np.sort(sets, axis=1)
    n_sets, size = rows.shape
    distinct = int(np.unique(rows, axis=0).shape[0])
    if n_sets > 1 and size:
        counts = np.bincount(rows.ravel()).astype(np.float64)  # sets holding each stimulus
        shared = float((counts * (counts - 1)).sum())  # ordered pairs of draws × stimulus
        overlap = shared / (n_sets * (n_sets - 1) * size)
    else:
        overlap = 1.0
    return BaselineFreedom(n_sets, distinct, needed, overlap, float(alpha))


@dataclass(frozen=True)
class BaselineComparison:
    """A chosen set's score against baseline sets' scores.

    ``p_value_greater`` = P(baseline ≥ observed), ``p_value_less`` = P(baseline ≤ observed) (+1
    correction); (``lower``, ``upper``) the central ``level`` interval of the baseline scores;
    ``freedom`` how freely the baseline sets were drawn (:func:`baseline_freedom`; None when not
    known).
    """

    observed: float
    baseline_mean: float
    lower: float
    upper: float
    p_value_greater: float
    p_value_less: float
    n_sets: int
    level: float
    baseline: np.ndarray
    freedom: BaselineFreedom | None = None


def compare_with_baseline(
    score: Callable[[np.ndarray], float],
    chosen: object,
    sets: object,
    *,
    level: float = 0.95,
    batched: bool = False,
    freedom: BaselineFreedom | None = None,
) -> BaselineComparison:
    """score(chosen) against score on each baseline set (e.g. :func:`matched_random_sets`),
    with the sets' :func:`baseline_freedom` (``freedom``: already found for these sets, as when
    several pairs are compared with the same sets: 0.5 s a call for sets of 25,000)."""
    chosen = np.asarray(chosen, dtype=np.int64)
    sets = np.asarray(sets, dtype=np.int64)
    if sets.ndim != 2 or sets.shape[1] != chosen.size or chosen.ndim != 1:
        raise ValueError(
            f"sets must be (B, s) with s = {chosen.size} (the chosen set's size); got {sets.shape}."
        )
    level = check_level(level)
    values = _evaluate(score, batched, np.concatenate([chosen[None], sets]))
    observed, baseline = float(values[0]), values[1:]
    greater, less = _p_values(observed, baseline)
    lower, upper = percentile_interval(baseline, level)
    return BaselineComparison(
        observed,
        float(baseline.mean()),
        lower,
        upper,
        greater,
        less,
        baseline.size,
        level,
        baseline,
        baseline_freedom(sets) if freedom is None else freedom,
    )


# ----------------------------------------------------------------------------------------------
# resampling intervals
@dataclass(frozen=True)
class Interval:
    """``estimate`` = statistic on all rows; (``lower``, ``upper``) its ``level`` interval."""

    estimate: float
    lower: float
    upper: float
    method: str
    n_resamples: int
    level: float


def resampled_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    method: str = "half",
    n_resamples: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """A resampling interval of ``statistic(rows)`` over n stimuli (rows index the n).

    ``method="bootstrap"``: n rows drawn with replacement (percentile interval). Repeated rows are
    each other's nearest neighbours, which inflates neighbour metrics: use it for feature metrics.
    ``method="half"``: half-samples of ⌊n/2⌋ distinct rows (never a repeat). Without replacement a
    half-sample's mean varies as much as the full sample's (variance σ²/m·(n−m)/(n−1) ≈ σ²/n for
    m = n/2), so the interval is the estimate plus the central quantiles of the half-sample values'
    deviations from their own mean (which removes the level shift of a smaller set at fixed k).
    """
    n = check_count(n, "n", 4)
    n_resamples = check_count(n_resamples, "n_resamples")
    level = check_level(level)
    rng = _rng(seed)
    estimate = float(statistic(np.arange(n)))
    if method == "bootstrap":
        values = np.array(
            [float(statistic(np.sort(rng.integers(0, n, n)))) for _ in range(n_resamples)]
        )
        lower, upper = percentile_interval(values, level)
    elif method == "half":
        m = n // 2
        values = np.array(
            [float(statistic(np.sort(rng.choice(n, m, replace=False)))) for _ in range(n_resamples)]
        )
        deviations = values - values.mean()
        low, high = percentile_interval(deviations, level)
        lower, upper = estimate + low, estimate + high
    else:
        raise ValueError(f"method must be 'half' or 'bootstrap', got {method!r}.")
    return Interval(estimate, lower, upper, method, n_resamples, level)


# ----------------------------------------------------------------------------------------------
# a difference between two sets against the same difference between their baselines
@dataclass(frozen=True)
class DifferenceComparison:
    """score(first) − score(second) against the differences of their baseline sets, paired in
    draw order (baseline set b of the first minus baseline set b of the second).

    ``p_value_greater`` = P(baseline difference ≥ observed) with the +1 correction: small when the
    observed difference is larger than the baselines reproduce; (``lower``, ``upper``) the central
    ``level`` interval of the baseline differences; ``freedom``: the two baselines'
    :func:`baseline_freedom`, the first's and the second's (None where not known). A verdict
    needs both free enough: a set whose matched sets are one set, drawn again and again, is
    compared with that set alone.
    """

    observed: float
    baseline_mean: float
    lower: float
    upper: float
    p_value_greater: float
    n_sets: int
    level: float
    freedom: tuple[BaselineFreedom | None, BaselineFreedom | None] = (None, None)


def compare_difference_with_baselines(
    first: BaselineComparison, second: BaselineComparison
) -> DifferenceComparison:
    """Is first − second larger than the same difference between their matched baselines?

    With matched random sets (:func:`matched_random_sets`) of each set: a difference that the
    matched covariates (density, category) explain is reproduced by the matched sets, and the
    p-value is large; one that survives them has a small p-value.
    """
    if first.n_sets != second.n_sets or first.level != second.level:
        raise ValueError(
            f"the two baselines must have as many sets ({first.n_sets} and {second.n_sets}) and "
            "the same level; draw them with the same n_sets"
        )
    observed = first.observed - second.observed
    differences = first.baseline - second.baseline
    lower, upper = percentile_interval(differences, first.level)
    return DifferenceComparison(
        observed,
        float(differences.mean()),
        lower,
        upper,
        _p_values(observed, differences)[0],
        differences.size,
        first.level,
        (first.freedom, second.freedom),
    )
