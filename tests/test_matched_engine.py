"""One subset engine for matched random sets: the report's matched baselines
(``analyses.matched_baselines``) and the Alignment lab's (``dashboard.lab.calibration_table``)
choose the matching method by its cost in one place (``calibration.matched_sets_by_cost``, one
budget: ``calibration.NEAREST_MATCHING_PICKS``), so that for the same sets and seed they draw
the same matched sets and reach the same verdict, nearest matching or strata, and say which.

Before, the report always matched by nearest covariate and the lab switched to strata above its
own budget: on large runs the two could disagree, and the report took minutes where the lab
did not. The budget is made small here (monkeypatched) to reach the strata on a small run."""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core import analyses, calibration, report
from convergence_core.dashboard import lab
from convergence_core.subsets import select_stimuli
from tests.fixtures_runs import make_synthetic_run

N, SIZE, N_SETS, K, SEED = 120, 20, 25, 5, 4
PICKS = SIZE * N_SETS  # nearest matching's picks for one set's baseline


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_run(
        tmp_path_factory.mktemp("matched_engine"), N, plant="quiet_half", name="planted",
        images=False, thumbnails=False,
    )


@pytest.fixture(scope="module")
def setting(planted):
    """(pairs, low, high, indexes, labels): two vision × language pairs at the best layers,
    the low and high sets of SIZE by mean dispersion, labels of 4 classes that can be matched
    on (``calibration.matchable_labels``' strings, as the report and the lab pass them)."""
    best = analyses.best_language_layers(planted, k=K)
    pairs = analyses.pairs_with_best_layers(planted, k=K, best_layers=best)[:2]
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", SIZE), select_stimuli(scores, "high", SIZE)
    labels, why_not = calibration.matchable_labels(np.array(list("abcd"))[np.arange(N) % 4])
    assert labels is not None, why_not
    return pairs, low, high, analyses.indexes_for(planted, pairs), labels


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Every call's sets of ``calibration.matched_random_sets`` that drew them, in order."""
    record: list[np.ndarray] = []
    original = calibration.matched_random_sets

    def spy(*args, **kwargs):
        sets = original(*args, **kwargs)
        record.append(sets)
        return sets

    monkeypatch.setattr(calibration, "matched_random_sets", spy)
    return record


def _both_paths(planted, setting, drawn, labels):
    """The lab's and the report's matched baselines of the low and high sets for SEED: ((lab
    table, lab low-high table, lab's sets), (report table, balance, report's sets))."""
    pairs, low, high, indexes, _ = setting
    covariates = lab.matching_covariates(planted, labels, k=K)
    table, comparisons = lab.calibration_table(
        indexes, pairs, {"low": low, "high": high}, K, covariates, metric="cknna",
        n_shuffles=4, n_matched=N_SETS, seed=SEED,
    )
    low_high = lab.low_high_matched_table(pairs, comparisons)
    lab_sets = list(drawn)
    drawn.clear()
    matched, balance = analyses.matched_baselines(
        indexes, pairs, low, high, K, ["cknna"], covariate=covariates.typicality,
        labels=covariates.labels, n_sets=N_SETS, seed=SEED,
    )
    report_sets = list(drawn)
    return (table, low_high, lab_sets), (matched, balance, report_sets)


def _assert_same_draws_and_verdicts(lab_side, report_side, pairs) -> None:
    table, low_high, lab_sets = lab_side
    matched, _, report_sets = report_side
    assert len(lab_sets) == len(report_sets) == 2  # low, then high: one draw each
    for ours, theirs in zip(lab_sets, report_sets, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    for pair in pairs:
        mine = table[table["vision_model"] == pair.vision_model]
        mine = mine[mine["language_model"] == pair.language_model]
        row = matched[(matched["vision_model"] == pair.vision_model)
                      & (matched["language_model"] == pair.language_model)].iloc[0]
        verdict = low_high[(low_high["vision_model"] == pair.vision_model)
                           & (low_high["language_model"] == pair.language_model)].iloc[0]
        for name in ("low", "high"):
            assert mine[mine["set"] == name]["matched_mean"].iloc[0] == pytest.approx(
                row[f"matched_{name}_mean"], abs=1e-12
            )
        assert verdict["low_minus_high"] == pytest.approx(row["low_minus_high"], abs=1e-12)
        assert verdict["p_value"] == pytest.approx(row["p_value_gap"], abs=1e-12)
        assert bool(verdict["survives"]) == bool(row["survives"])
        assert bool(verdict["verdict_possible"])  # 25 distinct sets: a verdict is reached


@pytest.mark.parametrize("with_labels", [True, False])
def test_above_the_budget_the_lab_and_the_report_draw_the_same_strata(
    planted, setting, drawn, monkeypatch, with_labels
) -> None:
    """Nearest matching over its budget: both go to 25 strata, draw the same sets from the same
    seeds, reach the same verdicts, and say so in words (the lab's ``matching``, the report's
    ``matched_on`` in both tables)."""
    pairs, low, high, _, labels = setting
    labels = labels if with_labels else None
    monkeypatch.setattr(calibration, "NEAREST_MATCHING_PICKS", PICKS - 1)
    lab_side, report_side = _both_paths(planted, setting, drawn, labels)
    _assert_same_draws_and_verdicts(lab_side, report_side, pairs)
    within = " within label" if with_labels else ""
    words = (f"25 typicality strata{within} (nearest matching: {PICKS:,} picks, above its "
             f"budget of {PICKS - 1:,})")
    assert set(lab_side[0]["matching"]) == {words}
    covariate = "typicality and category" if with_labels else "typicality"
    matched, balance, sets = report_side
    assert set(matched["matched_on"]) == set(balance["matched_on"]) == {
        f"{covariate}, by {words}"
    }
    # the sets are the strata's: what matched_random_sets draws with 25 bins from those seeds
    typical = lab.matching_covariates(planted, None, k=K).typicality
    expected = calibration.matched_random_sets(
        low, typical, labels, n_sets=N_SETS, method="strata", n_bins=25,
        seed=analyses.matched_set_seed(SEED, "low"),
    )
    np.testing.assert_array_equal(sets[0], expected)
    high_sets = sets[1]
    assert not any(np.intersect1d(a, b).size for a, b in zip(sets[0], high_sets, strict=True))


@pytest.mark.parametrize("budget", [PICKS, None])
def test_within_the_budget_both_match_by_nearest_covariate(
    planted, setting, drawn, monkeypatch, budget
) -> None:
    """At the budget exactly (and at the default, far above these 500 picks) both use nearest
    matching: the pairs of ``calibration.matched_set_pairs(method="nearest")`` with the seeds
    of ``analyses.matched_set_seed``, the lab's ``matching`` "nearest typicality within label"
    and the report's ``matched_on`` the plain words, as before the engine was shared. The
    budget is ``calibration``'s alone."""
    pairs, low, high, _, labels = setting
    if budget is not None:
        monkeypatch.setattr(calibration, "NEAREST_MATCHING_PICKS", budget)
    assert calibration.NEAREST_MATCHING_PICKS >= PICKS
    assert not hasattr(lab, "_NEAREST_MATCHING_PICKS")  # one budget, in calibration
    lab_side, report_side = _both_paths(planted, setting, drawn, labels)
    _assert_same_draws_and_verdicts(lab_side, report_side, pairs)
    assert set(lab_side[0]["matching"]) == {"nearest typicality within label"}
    matched, balance, sets = report_side
    assert set(matched["matched_on"]) == set(balance["matched_on"]) == {
        "typicality and category"
    }
    typical = lab.matching_covariates(planted, None, k=K).typicality
    drawn.clear()
    expected = calibration.matched_set_pairs(
        low, high, typical, labels, n_sets=N_SETS, method="nearest",
        seeds=(analyses.matched_set_seed(SEED, "low"), analyses.matched_set_seed(SEED, "high")),
    )
    for ours, theirs in zip(sets, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_the_engine_falls_back_in_order_and_says_why(monkeypatch) -> None:
    """``calibration.matched_sets_by_cost``: nearest within the budget; above it 25 strata; 5
    strata where a stratum of 25 runs short; and, where nothing can keep the draws apart from
    ``avoid``, the same again without it, said in words. A result is the draw
    ``matched_random_sets`` makes with its method and seed."""
    rng = np.random.default_rng(0)
    n = 400
    covariate = rng.standard_normal(n)
    chosen = np.sort(np.argsort(covariate)[-30:])  # the 30 most typical: the top bins' stimuli
    kwargs = {"n_sets": 10, "seed": 3, "covariate_name": "typicality", "avoided": "the low set's"}
    result = calibration.matched_sets_by_cost(chosen, covariate, **kwargs)
    assert (result.method, result.nearest, result.kept_apart) == (
        "nearest typicality", True, True
    )
    np.testing.assert_array_equal(
        result.sets, calibration.matched_random_sets(chosen, covariate, n_sets=10, seed=3)
    )
    monkeypatch.setattr(calibration, "NEAREST_MATCHING_PICKS", 299)
    over = calibration.matched_sets_by_cost(chosen, covariate, **kwargs)
    # the top 25-bin stratum holds 16 stimuli, all chosen: avoiding 8 of them leaves too few
    top = chosen[np.argsort(covariate[chosen])][-16:]
    avoid = np.tile(top[:8], (10, 1))
    five = calibration.matched_sets_by_cost(chosen, covariate, avoid=avoid, **kwargs)
    # avoiding every stimulus leaves no method a draw: kept apart no longer
    everything = np.tile(np.arange(n), (10, 1))
    apart = calibration.matched_sets_by_cost(chosen, covariate, avoid=everything, **kwargs)
    budget = "(nearest matching: 300 picks, above its budget of 299)"
    assert over.method == f"25 typicality strata {budget}" and not over.nearest
    np.testing.assert_array_equal(over.sets, calibration.matched_random_sets(
        chosen, covariate, n_sets=10, method="strata", n_bins=25, seed=3
    ))
    assert five.method == f"5 typicality strata {budget}" and five.kept_apart
    assert not np.isin(five.sets, top[:8]).any()
    assert apart.method == f"25 typicality strata {budget}, not kept apart from the low set's"
    assert not apart.kept_apart
    np.testing.assert_array_equal(apart.sets, over.sets)  # 25 strata, nothing avoided
    with pytest.raises(ValueError, match="seed must be an integer"):  # not a shortage: raised
        calibration.matched_sets_by_cost(chosen, covariate, n_sets=10, seed=1.5)


def test_the_report_says_the_method_where_it_is_not_nearest(
    planted, setting, monkeypatch, tmp_path
) -> None:
    """The report's calibration verdict and tables name the strata where the budget sent the
    matching there (its words unchanged where nearest matching drew the sets)."""
    pairs, low, high, _, _ = setting
    sets = report.DispersionSets("mean", low, high, np.empty((0, SIZE), dtype=np.int64))
    monkeypatch.setattr(calibration, "NEAREST_MATCHING_PICKS", PICKS - 1)
    _, entry = report.calibration_section(
        planted, tmp_path, pairs, sets, k=K, metrics=["cknna"], metric_options={},
        n_shuffles=4, n_matched=N_SETS, seed=SEED,
    )
    assert "Against random sets matched on typicality, by 25 typicality strata (nearest " \
        f"matching: {PICKS:,} picks, above its budget of {PICKS - 1:,}) ({N_SETS} per set)" \
        in entry["verdict"]
    assert {row["matched_on"] for row in entry["matched"]} == {
        f"typicality, by 25 typicality strata (nearest matching: {PICKS:,} picks, above its "
        f"budget of {PICKS - 1:,})"
    }
