"""The random-subset baseline drawn to a stated precision (convergence_core/random_baseline.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from convergence_core import analyses
from convergence_core.neighbours import subset_alignment
from convergence_core.random_baseline import (
    DEFAULT_MIN_SETS,
    mean_interval_widths,
    pilot_size,
    random_set_stream,
    scout_sd,
    sequential_random_scores,
    sets_needed,
    stein_interval_widths,
    stein_sd,
    stein_total,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """A 120-stimulus run, its best-layer pairs and their neighbour indexes."""
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(
        Path(tmp_path_factory.mktemp("runs")), n=120, images=False, thumbnails=False
    )
    best = analyses.best_language_layers(run, k=10)
    layers = dict(zip(best["language_model"], best["language_layer"], strict=True))
    pairs = [
        analyses.Pair(v, layer, m, layers[m])
        for v, layer in zip(run.gpa.models, run.gpa.layers, strict=True)
        for m in run.language_models
    ]
    return run, pairs, analyses.indexes_for(run, pairs)


def random_alignment(indexes, pairs, n: int, size: int, k: int, **options):  # noqa: ANN001, ANN201
    """The stopping rule over CKNNA and mutual k-NN of every pair (the subset engine's), stopping
    on the mean CKNNA."""
    keyed = [pair.sides for pair in pairs]

    def score(sets: np.ndarray) -> dict[str, np.ndarray]:
        result = subset_alignment(indexes, keyed, sets, k)
        return {"cknna": result.cknna, "mutual_knn": result.mutual_knn}

    return sequential_random_scores(score, n, size, stop_on="cknna", **options)


def test_the_stream_draws_the_paper_analysis_sets_in_order() -> None:
    scores = np.random.default_rng(1).random(300)
    reference = analyses.random_sets(scores, 40, 12, seed=7)
    stream = random_set_stream(300, 40, seed=7)
    drawn = np.stack([next(stream) for _ in range(12)])
    np.testing.assert_array_equal(drawn, reference)
    assert all((np.diff(row) > 0).all() for row in drawn)  # sorted, distinct


def test_a_fixed_number_of_sets_is_the_paper_analysis_baseline(planted) -> None:
    run, pairs, indexes = planted
    scores = run.dispersion["mean"].to_numpy()
    sets = analyses.random_sets(scores, 30, 25, seed=3)
    paper = subset_alignment(indexes, [pair.sides for pair in pairs], sets, 5)
    drawn = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=None, max_sets=25, seed=3
    )
    assert drawn.n_sets == 25 and drawn.interval_width is None and not drawn.reached
    np.testing.assert_array_equal(drawn.values["cknna"], paper.cknna)
    np.testing.assert_array_equal(drawn.values["mutual_knn"], paper.mutual_knn)
    # a fixed number of sets: the usual t interval, no pilot
    assert drawn.pilot is None
    np.testing.assert_array_equal(drawn.intervals, mean_interval_widths(paper.cknna))


def test_drawing_stops_once_every_pair_is_that_precise(planted) -> None:
    run, pairs, indexes = planted
    full = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=None, max_sets=120, seed=0
    )
    width = 0.06  # random CKNNA of 30-stimulus sets spreads by ~0.16: ~30 sets
    drawn = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=width, max_sets=120, seed=0
    )
    assert drawn.reached and 4 <= drawn.n_sets < 120
    # the sets drawn are the first ones of the full draw
    np.testing.assert_array_equal(drawn.values["cknna"], full.values["cknna"][:, : drawn.n_sets])
    # every pair's reported interval is Stein's or the usual one, whichever is wider, and both are
    # within the width now
    values = drawn.values["cknna"]
    usual = mean_interval_widths(values)
    stein = stein_interval_widths(values, drawn.pilot)
    np.testing.assert_array_equal(drawn.intervals, np.maximum(usual, stein))
    assert (usual <= width).all() and (stein <= width).all()
    assert drawn.widest_interval == drawn.intervals.max() <= width
    # Stein's total from the pilot was drawn
    scouted, piloted = drawn.pilot
    assert drawn.n_sets >= stein_total(stein_sd(values[:, :piloted], drawn.pilot),
                                       piloted - scouted, width)


def test_an_unreachable_precision_draws_the_most_allowed(planted) -> None:
    run, pairs, indexes = planted
    drawn = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=1e-9, max_sets=30, seed=0
    )
    assert drawn.n_sets == 30 and not drawn.reached and drawn.widest_interval > 1e-9
    # the most allowed are the paper analysis's sets, exactly
    scores = run.dispersion["mean"].to_numpy()
    paper = subset_alignment(indexes, [pair.sides for pair in pairs],
                             analyses.random_sets(scores, 30, 30, seed=0), 5)
    np.testing.assert_array_equal(drawn.values["cknna"], paper.cknna)


def test_a_loose_precision_needs_only_the_fewest_sets(planted) -> None:
    run, pairs, indexes = planted
    drawn = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=10.0, max_sets=200, min_sets=6,
        seed=0,
    )
    assert drawn.n_sets == 6 and drawn.reached and drawn.pilot == (3, 6)  # 6 // 2 scout, 3 pilot


def test_interval_widths_match_scipy_t_intervals() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 0.02, size=(3, 17))
    for row, width in zip(values, mean_interval_widths(values), strict=True):
        low, high = stats.t.interval(0.95, len(row) - 1, loc=row.mean(), scale=stats.sem(row))
        assert width == pytest.approx(high - low, rel=1e-12)
    assert np.isnan(mean_interval_widths(values[:, :1])).all()  # one set: no interval


def test_sets_needed_follows_the_spread() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(0.0, 0.05, size=(2, 400))
    sd = values.std(axis=1, ddof=1).max()
    expected = math.ceil((2 * stats.norm.ppf(0.975) * sd / 0.01) ** 2)
    assert sets_needed(values, 0.01) == expected
    assert sets_needed(values, 0.02) < sets_needed(values, 0.01)


def test_bad_requests_are_errors_in_words(planted) -> None:
    run, pairs, indexes = planted
    with pytest.raises(ValueError, match="max_sets must be at least 1"):
        random_alignment(indexes, pairs, run.n_stimuli, 30, 5, max_sets=0)
    # one set cannot give an interval: it drew two, beyond max_sets (from the third audit)
    with pytest.raises(ValueError, match="at least 2 random sets, got max_sets=1"):
        random_alignment(indexes, pairs, run.n_stimuli, 30, 5, max_sets=1, interval_width=0.01)
    assert random_alignment(indexes, pairs, run.n_stimuli, 30, 5, max_sets=1,
                            interval_width=None).n_sets == 1
    with pytest.raises(ValueError, match="interval_width must be a positive"):
        random_alignment(indexes, pairs, run.n_stimuli, 30, 5, interval_width=0.0)
    with pytest.raises(ValueError, match="out of range"):
        next(random_set_stream(10, 11, 0))
    with pytest.raises(ValueError, match="not a range of sets after at least one scouting set"):
        stein_sd(np.zeros((2, 5)), (0, 3))


# --- the stopping rule on planted scores (no run: a score function that ignores its sets) -----


def planted_scores(draws):  # noqa: ANN001, ANN201
    """``score(sets (b, ·)) -> {"s": (P, b)}``: the next b columns of ``draws(b)`` (a callable
    returning (P, b)), recording the batch sizes in ``score.batches``."""

    def score(sets: np.ndarray) -> dict[str, np.ndarray]:
        score.batches.append(len(sets))
        return {"s": draws(len(sets))}

    score.batches = []
    return score


def from_columns(table: np.ndarray):  # noqa: ANN201
    """``draws(b)``: the next b columns of the (P, K) ``table``."""
    position = [0]

    def draws(b: int) -> np.ndarray:
        start = position[0]
        position[0] += b
        return table[:, start : start + b]

    return draws


def test_the_old_rule_covered_too_rarely_and_steins_covers() -> None:
    """The audit's case: normal scores of sd 0.014 against a width of 0.02. The rule before
    (stop once the usual t interval is narrow enough, from 4 sets) covered the mean 0.909 of the
    time on these 1,000 seeded draws (and 0.91 in the audit); Stein's covers it 0.95 of the
    time, exactly in expectation (benchmarks/measure_baseline_coverage.py)."""
    width, sd, truth = 0.02, 0.014, 0.5
    covered, sets = [], []
    for replicate in range(1000):
        rng = np.random.default_rng([5, replicate])
        score = planted_scores(lambda b, rng=rng: truth + sd * rng.standard_normal((1, b)))
        drawn = sequential_random_scores(score, 1, 1, stop_on="s", interval_width=width)
        covered.append(abs(drawn.values["s"].mean() - truth) <= drawn.widest_interval / 2)
        sets.append(drawn.n_sets)
    coverage = float(np.mean(covered))
    assert coverage >= 0.94, f"coverage {coverage:.3f} of a 95% interval"
    assert np.mean(sets) < 30  # ~22: Stein's t has few degrees of freedom here (the old: ~10)


def test_large_sets_still_take_the_fewest() -> None:
    """Where the sd is tiny beside the width (large sets: sd 0.0005 against 0.02), the rule draws
    DEFAULT_MIN_SETS = 4 sets, as the rule before did: 2 to scout, 2 for the pilot."""
    for replicate in range(100):
        rng = np.random.default_rng([6, replicate])
        score = planted_scores(lambda b, rng=rng: 0.3 + 0.0005 * rng.standard_normal((6, b)))
        drawn = sequential_random_scores(score, 1, 1, stop_on="s", interval_width=0.02)
        assert drawn.n_sets == DEFAULT_MIN_SETS and drawn.pilot == (2, 4) and drawn.reached
        assert score.batches == [2, 2]


def test_steins_arithmetic_on_planted_scores() -> None:
    """Two scout sets a hair apart (the scout stops, the pilot is its fewest, 2), two pilot sets
    0.02 apart: Stein's sd, total and interval by hand, and the batches that reach the total."""
    width = 0.02
    table = np.full((1, 200), 0.5)
    table[0, :4] = [0.5, 0.5001, 0.49, 0.51]
    score = planted_scores(from_columns(table))
    drawn = sequential_random_scores(score, 1, 1, stop_on="s", interval_width=width)
    first = table[0, :4]
    # S² = (the pilot's own sum of squares + the contrast of its mean to the scout's) / n0
    contrast = 2 * 2 / 4 * (first[:2].mean() - first[2:].mean()) ** 2
    s = math.sqrt((((first[2:] - first[2:].mean()) ** 2).sum() + contrast) / 2)
    assert stein_sd(table[:, :4], (2, 4))[0] == pytest.approx(s, rel=1e-12)
    assert stein_sd(table[:, :4], (2, 4))[0] == pytest.approx(
        math.sqrt((((first - first.mean()) ** 2).sum() - ((first[:2] - first[:2].mean()) ** 2)
                   .sum()) / 2), rel=1e-12)
    t2 = stats.t.ppf(0.975, 2)
    total = math.ceil((2 * t2 * s / width) ** 2)
    assert total == 19 and stein_total(np.array([s]), 2, width) == total
    assert drawn.pilot == (2, 4) and drawn.n_sets == total and drawn.reached
    assert score.batches == [2, 2, 4, 8, 3]  # scout, pilot, then at most doubling up to 19
    values = drawn.values["s"]
    assert drawn.intervals[0] == pytest.approx(
        max(2 * t2 * s / math.sqrt(total), mean_interval_widths(values)[0]), rel=1e-12)


def test_the_scout_grows_then_sizes_the_pilot() -> None:
    """Spread scores (sd = the width): the scout grows (at most doubling) past its 2 sets, the
    pilot is sized from its sd's 75% upper bound (pilot_size), and Stein's total is drawn."""
    width = 0.02
    rng = np.random.default_rng(11)
    table = 0.5 + width * rng.standard_normal((3, 200))
    score = planted_scores(from_columns(table))
    drawn = sequential_random_scores(score, 1, 1, stop_on="s", interval_width=width)
    scouted, piloted = drawn.pilot
    batches = score.batches
    ends = list(np.cumsum(batches))
    assert batches[0] == 2 and scouted > 2 and scouted in ends and piloted in ends
    scout_batches = batches[: ends.index(scouted) + 1]
    assert all(b <= sum(scout_batches[:i]) for i, b in enumerate(scout_batches) if i)
    assert batches[len(scout_batches)] == piloted - scouted  # the pilot: one batch
    assert piloted - scouted == pilot_size(scout_sd(table[:, :scouted], upper=True), width,
                                           scouted, 2, 200 - scouted)
    total = stein_total(stein_sd(table[:, :piloted], drawn.pilot), piloted - scouted, width)
    assert drawn.n_sets >= total and drawn.reached


def test_the_pilot_size_balances_a_rough_t_against_overshooting() -> None:
    assert pilot_size(0.0, 0.02, 2, 2, 198) == 2  # no spread: the fewest
    assert pilot_size(float("nan"), 0.02, 2, 2, 198) == 2
    assert pilot_size(0.0005, 0.02, 2, 2, 198) == 2  # large sets
    sizes = [pilot_size(sd, 0.02, 10, 2, 190) for sd in (0.01, 0.02, 0.04, 0.08)]
    assert sizes == sorted(sizes) and sizes[0] > 2 and sizes[-1] <= 190
    # more spread: about as many pilot sets as the known-sd need, (2·1.96·sd / width)² = 61
    assert 30 <= pilot_size(0.04, 0.02, 10, 2, 190) <= 61
    # the scout's sd and its upper bound (one-sided 75%, m − 1 degrees of freedom)
    values = np.array([[0.1, 0.3, 0.2], [0.0, 0.0, 0.0]])
    assert scout_sd(values, upper=False) == pytest.approx(0.1)
    assert scout_sd(values, upper=True) == pytest.approx(
        0.1 * math.sqrt(2 / stats.chi2.ppf(0.25, 2)), rel=1e-12)
    assert math.isnan(scout_sd(values[:, :1], upper=True))


def test_a_nan_score_leaves_the_rule_to_the_defined_pairs() -> None:
    """A pair undefined on a set has no baseline mean however many more sets are drawn: the rule
    bounds the other pairs (it drew all 50 sets, as its NaN interval never narrowed)."""
    table = np.full((2, 50), 0.5)
    table[1, 3] = np.nan
    drawn = sequential_random_scores(planted_scores(from_columns(table)), 1, 1, stop_on="s",
                                     max_sets=50)
    assert drawn.n_sets == DEFAULT_MIN_SETS and list(drawn.undefined) == [0, 1]
    assert not drawn.reached and math.isnan(drawn.widest_interval)
    assert drawn.intervals[0] == 0 and math.isnan(drawn.intervals[1])


def test_no_set_is_drawn_once_every_pair_is_undefined() -> None:
    table = np.full((2, 50), 0.5)
    table[:, 1] = np.nan  # in the scout
    score = planted_scores(from_columns(table))
    drawn = sequential_random_scores(score, 1, 1, stop_on="s", max_sets=50)
    assert drawn.n_sets == 2 and score.batches == [2] and drawn.pilot is None
    assert list(drawn.undefined) == [1, 1] and not drawn.reached
    table = np.full((1, 50), 0.5) + np.random.default_rng(0).normal(0, 0.03, (1, 50))
    table[0, 9] = np.nan  # later: the rule stops after that batch, where it would draw on
    score = planted_scores(from_columns(table.copy()))
    stopped = sequential_random_scores(score, 1, 1, stop_on="s", max_sets=50).n_sets
    assert stopped == sum(score.batches) and sum(score.batches[:-1]) <= 9 < stopped
    table[0, 9] = 0.5
    assert sequential_random_scores(
        planted_scores(from_columns(table)), 1, 1, stop_on="s", max_sets=50
    ).n_sets > stopped


def test_the_fewest_sets_and_progress() -> None:
    table = np.full((1, 10), 0.5)
    seen = []
    drawn = sequential_random_scores(
        planted_scores(from_columns(table)), 1, 1, stop_on="s", max_sets=10, min_sets=2,
        progress=lambda done, most: seen.append((done, most)),
    )
    # min_sets = 2: one scout set (no sd: the pilot is its fewest, 1 set, 1 degree of freedom)
    assert drawn.n_sets == 2 and drawn.pilot == (1, 2) and drawn.reached
    assert seen == [(1, 10), (2, 10)]
    drawn = sequential_random_scores(planted_scores(from_columns(table)), 1, 1, stop_on="s",
                                     max_sets=3, min_sets=8)
    assert drawn.n_sets == 3 and drawn.pilot == (1, 3)  # min_sets beyond max_sets: max_sets
