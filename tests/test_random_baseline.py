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
    mean_interval_widths,
    random_set_stream,
    sequential_random_scores,
    sets_needed,
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
    # every pair's interval is within the width now, and was not at the stopping rule's last check
    widths = mean_interval_widths(drawn.values["cknna"])
    assert (widths <= width).all() and drawn.widest_interval == pytest.approx(widths.max())
    assert drawn.widest_interval <= width


def test_an_unreachable_precision_draws_the_most_allowed(planted) -> None:
    run, pairs, indexes = planted
    drawn = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=1e-9, max_sets=30, seed=0
    )
    assert drawn.n_sets == 30 and not drawn.reached and drawn.widest_interval > 1e-9


def test_a_loose_precision_needs_only_the_fewest_sets(planted) -> None:
    run, pairs, indexes = planted
    drawn = random_alignment(
        indexes, pairs, run.n_stimuli, 30, 5, interval_width=10.0, max_sets=200, min_sets=6,
        seed=0,
    )
    assert drawn.n_sets == 6 and drawn.reached


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
