"""The paper's analyses on runs with planted answers, against slow references and invariances."""

from __future__ import annotations

import itertools
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from scipy.linalg import orthogonal_procrustes

from convergence_core import analyses, calibration, subset_metrics
from convergence_core import metrics as registry
from convergence_core.alignment import cknna, prepare_features
from convergence_core.procrustes import generalized_procrustes
from convergence_core.stats import (
    correlation_with_fit,
    paired_difference_tests,
    percentile_interval,
    permutation_p_values,
    permutation_tests_two_sets,
)
from convergence_core.subsets import select_stimuli
from tests.fixtures_runs import PLANTED_BEST_LAYER, make_rotation_run, make_synthetic_run


def _quiet_half_run(root, name: str, *, n: int, n_vision: int = 3):
    return make_synthetic_run(
        root, n, plant="quiet_half", n_vision=n_vision, name=name, images=False, thumbnails=False
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    return _quiet_half_run(tmp_path_factory.mktemp("analyses"), "planted", n=80)


@pytest.fixture(scope="module")
def sweep(planted):
    return analyses.layer_sweep(planted, k=5)


@pytest.fixture(scope="module")
def fig2(planted, sweep):
    best = analyses.best_language_layers(planted, k=5, sweep=sweep)
    return analyses.dispersion_set_alignment(
        planted, size=20, k=5, n_random=60, n_permutations=300, seed=3, best_layers=best
    )


def _features(run, model: str, layer: str) -> np.ndarray:
    return prepare_features(np.asarray(run.embeddings[model][layer], dtype=np.float64))


# --- layer sweep and best layer -------------------------------------------------------------


def test_layer_sweep_matches_cknna_on_features(planted, sweep):
    assert len(sweep) == 3 * (4 + 1)  # 3 vision models × (4 + 1 language layers)
    for row in sweep.sample(5, random_state=0).itertuples():
        expected = cknna(
            _features(planted, row.vision_model, row.vision_layer),
            _features(planted, row.language_model, row.language_layer),
            k=5,
        )
        assert row.cknna == pytest.approx(expected, abs=1e-5)


def test_layer_sweep_and_fig_s1_ask_the_subset_engine_for_cknna_alone(planted, monkeypatch):
    """Both read only CKNNA; mutual k-NN was computed beside it and dropped (3x the layer
    sweep's time on the demo run)."""
    asked = []
    engine = analyses.subset_alignment

    def recording(*args, metrics, **kwargs):
        asked.append(tuple(metrics))
        return engine(*args, metrics=metrics, **kwargs)

    monkeypatch.setattr(analyses, "subset_alignment", recording)
    analyses.layer_sweep(planted, k=5)
    pair = analyses.Pair(*analyses.vision_layers(planted)[0], "planted", PLANTED_BEST_LAYER)
    analyses.drop_fraction_alignment(planted, pairs=[pair], k=5)
    assert asked and set(asked) == {("cknna",)}


def test_best_layer_is_the_planted_one(planted, sweep):
    best = analyses.best_language_layers(planted, k=5, sweep=sweep).set_index("language_model")
    assert best.loc["planted", "language_layer"] == PLANTED_BEST_LAYER
    assert best.loc["planted", "language_layer_index"] == 2
    assert best.loc["independent", "language_layer"] == "final"
    # the reported mean is the mean over vision models of the sweep at that layer
    chosen = sweep[
        (sweep.language_model == "planted") & (sweep.language_layer == PLANTED_BEST_LAYER)
    ]
    assert best.loc["planted", "mean_cknna"] == pytest.approx(chosen["cknna"].mean())
    assert best.loc["planted", "n_vision_models"] == 3


def test_best_layers_without_a_sweep_agree(planted, sweep):
    pd.testing.assert_frame_equal(
        analyses.best_language_layers(planted, k=5),
        analyses.best_language_layers(planted, k=5, sweep=sweep),
    )
    with pytest.raises(ValueError, match="another k"):
        analyses.best_language_layers(planted, k=7, sweep=sweep)


# --- Fig. 2 ----------------------------------------------------------------------------------


def test_planted_language_model_prefers_low_dispersion(fig2):
    planted_rows = fig2[fig2.language_model == "planted"]
    assert len(planted_rows) == 3
    assert (planted_rows.language_layer == PLANTED_BEST_LAYER).all()
    assert (planted_rows.cknna_low_dispersion > planted_rows.cknna_random_mean).all()
    assert (planted_rows.cknna_random_mean > planted_rows.cknna_high_dispersion).all()
    assert (planted_rows.permutation_p_value_two_sided < 0.01).all()
    assert (planted_rows.permutation_p_value_low_greater < 0.01).all()
    assert (planted_rows.low_high_ratio > 1).all()


def test_independent_language_model_shows_no_effect(fig2):
    rows = fig2[fig2.language_model == "independent"]
    assert (rows.permutation_p_value_two_sided > 0.01).all()
    # its low - high gap is smaller than that of every planted pair (small sets give CKNNA a
    # positive chance level, so the gap, not the level, is what must vanish)
    planted_gap = fig2.loc[fig2.language_model == "planted", "low_minus_high"]
    assert rows.low_minus_high.abs().max() < 0.5 * planted_gap.min()


def test_set_values_match_slow_reference(planted, fig2):
    scores = planted.dispersion["mean"].to_numpy()
    order = np.argsort(scores, kind="stable")
    low, high = order[:20], order[-20:]
    row = fig2[(fig2.vision_model == "vision1") & (fig2.language_model == "planted")].iloc[0]
    vision = _features(planted, "vision1", "final")
    language = _features(planted, "planted", PLANTED_BEST_LAYER)
    assert row.cknna_low_dispersion == pytest.approx(
        cknna(vision[low], language[low], k=5), abs=1e-5
    )
    assert row.cknna_high_dispersion == pytest.approx(
        cknna(vision[high], language[high], k=5), abs=1e-5
    )
    assert row.low_minus_high == pytest.approx(row.cknna_low_dispersion - row.cknna_high_dispersion)
    assert row.cknna_random_lower_95 <= row.cknna_random_mean <= row.cknna_random_upper_95


def test_random_sets_and_permutation_test_match_a_per_subset_reference(planted):
    """Fig. 2's batched random baseline and permutation test against a loop over subsets with
    alignment.cknna on the subsets' features (the dense definition): seed -> SeedSequence.spawn(2) (random sets, then label shuffles,
    one rng.permutation of the 2·s pooled stimuli per relabelling)."""
    size, k, n_random, n_permutations, seed = 10, 4, 15, 25, 7
    best = analyses.best_language_layers(planted, k=k)
    table = analyses.dispersion_set_alignment(
        planted,
        size=size,
        k=k,
        n_random=n_random,
        n_permutations=n_permutations,
        seed=seed,
        best_layers=best,
    )
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", size), select_stimuli(scores, "high", size)
    random_seed, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    random_rng = np.random.default_rng(random_seed)
    random_sets = [select_stimuli(scores, "random", size, rng=random_rng) for _ in range(n_random)]
    permutation_rng = np.random.default_rng(permutation_seed)
    pool = np.concatenate([low, high])
    shuffles = [pool[permutation_rng.permutation(2 * size)] for _ in range(n_permutations)]
    for row in table.itertuples():
        X = _features(planted, row.vision_model, row.vision_layer)
        Y = _features(planted, row.language_model, row.language_layer)

        def value(subset, X=X, Y=Y):
            subset = np.sort(subset)
            return cknna(X[subset], Y[subset], k=k)

        random_values = np.array([value(subset) for subset in random_sets])
        assert row.cknna_random_mean == pytest.approx(random_values.mean(), rel=1e-9)
        assert row.cknna_random_lower_95 == pytest.approx(np.percentile(random_values, 2.5))
        assert row.cknna_random_upper_95 == pytest.approx(np.percentile(random_values, 97.5))
        observed = value(low) - value(high)
        null = np.array([value(s[:size]) - value(s[size:]) for s in shuffles])
        assert row.low_minus_high == pytest.approx(observed, rel=1e-9, abs=1e-12)
        two_sided = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (n_permutations + 1)
        greater = (1 + np.sum(null >= observed - 1e-12)) / (n_permutations + 1)
        assert row.permutation_p_value_two_sided == pytest.approx(two_sided)
        assert row.permutation_p_value_low_greater == pytest.approx(greater)


def test_fig2_is_reproducible_and_seeded(planted, fig2):
    best = analyses.best_language_layers(planted, k=5)
    kwargs = dict(size=20, k=5, n_random=60, n_permutations=300, best_layers=best)
    again = analyses.dispersion_set_alignment(planted, seed=3, **kwargs)
    pd.testing.assert_frame_equal(again, fig2)
    other = analyses.dispersion_set_alignment(planted, seed=4, **kwargs)
    assert not np.allclose(other.cknna_random_mean, fig2.cknna_random_mean)
    # the low / high sets do not depend on the seed
    np.testing.assert_allclose(other.cknna_low_dispersion, fig2.cknna_low_dispersion)


def test_pc1_selection_runs_and_reports_its_score(planted):
    table = analyses.dispersion_set_alignment(
        planted, size=20, k=5, score="pc1", n_random=10, n_permutations=20
    )
    assert set(table.score) == {"pc1"}
    planted_rows = table[table.language_model == "planted"]
    assert (planted_rows.cknna_low_dispersion > planted_rows.cknna_high_dispersion).all()


def test_paired_tests_and_verdict_are_computed_from_the_table(fig2):
    paired = analyses.paired_set_tests(fig2).set_index("test")
    differences = fig2.cknna_low_dispersion - fig2.cknna_high_dispersion
    assert paired.loc["paired_t", "p_value"] == pytest.approx(
        sps.ttest_1samp(differences, 0.0).pvalue
    )
    assert paired.loc["wilcoxon_signed_rank", "n_pairs"] == 6
    verdict = analyses.effect_verdict(fig2)
    ordered = int(
        (
            (fig2.cknna_low_dispersion > fig2.cknna_random_mean)
            & (fig2.cknna_random_mean > fig2.cknna_high_dispersion)
        ).sum()
    )
    assert f"holds for {ordered} of 6 " in verdict
    planted = fig2[fig2.language_model == "planted"]
    assert "holds for 3 of 3 " in analyses.effect_verdict(planted)
    assert "low > high for 3 of 3 (3 with permutation p < 0.05)" in analyses.effect_verdict(planted)
    flipped = planted.assign(
        cknna_low_dispersion=planted.cknna_high_dispersion,
        cknna_high_dispersion=planted.cknna_low_dispersion,
    )
    assert "holds for 0 of 3 " in analyses.effect_verdict(flipped)
    assert "low > high for 0 of 3 (0 with" in analyses.effect_verdict(flipped)


# --- Fig. 2 for every metric of the registry ------------------------------------------------

ALL_METRICS = registry.metric_names()
#: the synthetic "independent" model has 9 dimensions, fewer than SVCCA's default 10
OPTIONS = {"svcca": {"cca_dim": 5}}


@pytest.fixture(scope="module")
def fig2_long(planted, sweep):
    best = analyses.best_language_layers(planted, k=5, sweep=sweep)
    return analyses.dispersion_set_alignment(
        planted, size=20, k=5, n_random=12, n_permutations=300, seed=3, best_layers=best,
        metrics=ALL_METRICS, metric_options=OPTIONS, metric_permutations=15,
    )


def test_the_long_table_holds_the_classic_cknna_table(planted, sweep, fig2_long):
    best = analyses.best_language_layers(planted, k=5, sweep=sweep)
    classic = analyses.dispersion_set_alignment(
        planted, size=20, k=5, n_random=12, n_permutations=300, seed=3, best_layers=best
    )
    pd.testing.assert_frame_equal(analyses.cknna_table(fig2_long), classic)
    assert list(fig2_long.metric.unique()) == ALL_METRICS  # metric-major
    assert len(fig2_long) == len(ALL_METRICS) * 6
    counts = fig2_long.drop_duplicates("metric").set_index("metric")["n_permutations"]
    assert counts["cknna"] == 300 and (counts.drop("cknna") == 15).all()
    with pytest.raises(ValueError, match="no cknna rows"):
        analyses.cknna_table(fig2_long[fig2_long.metric == "cka"])


@pytest.mark.parametrize("name", ALL_METRICS)
def test_every_metric_on_the_sets_matches_measure_on_their_features(planted, fig2_long, name):
    """Slow reference: metrics.measure on each set's prepared features (sorted rows), the same
    random draws (analyses.random_sets) and the first 15 of the same label shuffles."""
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", 20), select_stimuli(scores, "high", 20)
    draws = analyses.random_sets(scores, 20, 12, 3)
    _, permutation_seed = np.random.SeedSequence(3).spawn(2)
    rng = np.random.default_rng(permutation_seed)
    pool = np.concatenate([low, high])
    shuffles = [pool[rng.permutation(40)] for _ in range(15)]
    options = {"k": 5} if registry.metric(name).neighbour_metric else OPTIONS.get(name, {})
    rows = fig2_long[fig2_long.metric == name]
    for row in rows[rows.vision_model == "vision1"].itertuples():
        X = _features(planted, row.vision_model, row.vision_layer)
        Y = _features(planted, row.language_model, row.language_layer)

        def value(subset, X=X, Y=Y):
            subset = np.sort(subset)
            return registry.measure(name, X[subset], Y[subset], **options)

        assert row.low_dispersion == pytest.approx(value(low), abs=1e-9)
        assert row.high_dispersion == pytest.approx(value(high), abs=1e-9)
        random_values = np.array([value(subset) for subset in draws])
        assert row.random_mean == pytest.approx(random_values.mean(), abs=1e-9)
        assert row.random_lower_95 == pytest.approx(np.percentile(random_values, 2.5), abs=1e-9)
        null = np.array([value(s[:20]) - value(s[20:]) for s in shuffles])
        two_sided, greater = permutation_p_values(value(low) - value(high), null)
        if name != "cknna":  # (CKNNA's 300 shuffles are checked by the test above)
            assert row.permutation_p_value_two_sided == pytest.approx(two_sided)
            assert row.permutation_p_value_low_greater == pytest.approx(greater)


def test_feature_rows_in_row_space_coordinates_change_no_invariant_metric():
    """The sets' union is written in its own row-space coordinates for metrics invariant to
    orthogonal maps: wide features (d > union) give the same values as the raw rows, and a metric
    that is not invariant (SVCCA) is computed on the rows themselves."""
    from convergence_core.neighbours import NeighbourIndex

    rng = np.random.default_rng(11)
    z = rng.standard_normal((30, 4))
    X = z @ rng.standard_normal((4, 70)) + 0.4 * rng.standard_normal((30, 70))
    Y = z @ rng.standard_normal((4, 50)) + 0.6 * rng.standard_normal((30, 50))
    indexes = {
        ("x", "l"): NeighbourIndex.from_features(X),
        ("y", "l"): NeighbourIndex.from_features(Y),
    }
    sets = np.stack([np.sort(rng.choice(30, 12, replace=False)) for _ in range(3)])
    names = [m for m in ALL_METRICS if not registry.metric(m).neighbour_metric]
    values = analyses.set_metric_values(indexes, [("x", "l", "y", "l")], sets, 4, names)
    F, G = indexes[("x", "l")].features.all_rows(), indexes[("y", "l")].features.all_rows()
    for name in names:
        expected = [registry.measure(name, F[s], G[s]) for s in sets]
        np.testing.assert_allclose(values[name][0], expected, atol=1e-10)
    with pytest.raises(ValueError, match="pairs is empty"):
        analyses.set_metric_values(indexes, [], sets, 4, names)


def test_several_scores_at_once_are_the_single_score_tables_one_after_the_other(planted, sweep):
    best = analyses.best_language_layers(planted, k=5, sweep=sweep)
    kwargs = dict(size=15, k=5, n_random=6, n_permutations=20, seed=2, best_layers=best,
                  metrics=["cknna", "lcs_knn", "cka"], metric_permutations=7)
    both = analyses.dispersion_set_alignment(planted, score=["mean", "pc1"], **kwargs)
    one_by_one = pd.concat(
        [analyses.dispersion_set_alignment(planted, score=s, **kwargs) for s in ("mean", "pc1")],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(both, one_by_one)
    classic = analyses.dispersion_set_alignment(
        planted, score=["mean", "pc1"], size=15, k=5, n_random=6, n_permutations=20, seed=2,
        best_layers=best,
    )
    assert list(classic.score) == ["mean"] * 6 + ["pc1"] * 6
    with pytest.raises(ValueError, match="at least one dispersion score"):
        analyses.dispersion_set_alignment(planted, score=[], size=15, k=5)


def test_a_metric_undefined_on_the_sets_raises_or_gives_nan(planted):
    """SVCCA with cca_dim above the rank of the features: an error by default; with
    on_error="nan" NaN values, and NaN (not small) p-values and intervals where they enter."""
    kwargs = dict(size=15, k=5, n_random=4, n_permutations=6, metrics=["cknna", "svcca"],
                  metric_options={"svcca": {"cca_dim": 10}})  # the independent model has 9 dims
    with pytest.raises(ValueError, match="cca_dim"):
        analyses.dispersion_set_alignment(planted, **kwargs)
    table = analyses.dispersion_set_alignment(planted, on_error="nan", **kwargs)
    svcca = table[table.metric == "svcca"]
    broken = svcca[svcca.language_model == "independent"]
    assert broken.low_dispersion.isna().all() and broken.random_mean.isna().all()
    assert broken.permutation_p_value_two_sided.isna().all()
    fine = svcca[svcca.language_model == "planted"]
    assert fine.low_dispersion.notna().all() and fine.permutation_p_value_two_sided.notna().all()
    assert table[table.metric == "cknna"].permutation_p_value_two_sided.notna().all()
    with pytest.raises(ValueError, match="on_error must be"):
        analyses.dispersion_set_alignment(planted, on_error="ignore", **kwargs)


def test_no_permutations_for_the_other_metrics_gives_nan_p_values(planted):
    table = analyses.dispersion_set_alignment(
        planted, size=15, k=5, n_random=3, n_permutations=5, metrics=["cknna", "cka"],
        metric_permutations=0,
    )
    cka_rows = table[table.metric == "cka"]
    assert cka_rows.permutation_p_value_two_sided.isna().all()
    assert (cka_rows.n_permutations == 0).all()
    assert table[table.metric == "cknna"].permutation_p_value_two_sided.notna().all()


def test_effect_counts_come_from_the_long_table(fig2_long):
    counts = analyses.effect_counts(fig2_long).set_index("metric")
    assert list(counts.index) == ALL_METRICS
    for name, group in fig2_long.groupby("metric"):
        ordered = (
            (group.low_dispersion > group.random_mean) & (group.random_mean > group.high_dispersion)
        ).sum()
        significant = (
            (group.low_dispersion > group.high_dispersion)
            & (group.permutation_p_value_two_sided < 0.05)
        ).sum()
        assert counts.loc[name, "n_low_random_high"] == ordered
        assert counts.loc[name, "n_significant"] == significant
        assert counts.loc[name, "n_pairs"] == 6
        mean_high = counts.loc[name, "mean_high_dispersion"]
        assert mean_high == pytest.approx(group.high_dispersion.mean())
    # the planted effect shows in every metric for the planted language model
    planted_rows = fig2_long[fig2_long.language_model == "planted"]
    assert (planted_rows.low_dispersion > planted_rows.high_dispersion).all()


def test_metric_names_and_options_are_checked(planted):
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        analyses.dispersion_set_alignment(planted, size=15, k=5, metrics=["cosine"])
    with pytest.raises(ValueError, match=r"take no metric_options \(got \['normalise'\]\); leave"):
        analyses.dispersion_set_alignment(
            planted, size=15, k=5, metrics=["lcs_knn"],
            metric_options={"lcs_knn": {"normalise": False}},
        )
    # k for a neighbour metric: the message says where k goes (it said "no options besides k")
    with pytest.raises(ValueError, match=r"got \['k'\]\); its k is the analysis's own k argument"):
        analyses.dispersion_set_alignment(
            planted, size=15, k=5, metrics=["cknna"], metric_options={"cknna": {"k": 10}}
        )
    # a bad cca_dim is an error before any work, also where errors become NaN (it was a NaN)
    with pytest.raises(ValueError, match="cca_dim must be a positive integer"):
        analyses.dispersion_set_alignment(
            planted, size=15, k=5, metrics=["svcca"], metric_options={"svcca": {"cca_dim": 0}},
            on_error="nan",
        )
    with pytest.raises(ValueError, match="not asked for"):
        analyses.dispersion_set_alignment(
            planted, size=15, k=5, metrics=["cka"], metric_options={"svcca": {"cca_dim": 3}}
        )
    with pytest.raises(ValueError, match="does not take"):
        analyses.dispersion_set_alignment(
            planted, size=15, k=5, metrics=["svcca"], metric_options={"svcca": {"k": 3}}
        )
    with pytest.raises(ValueError, match="at least one metric"):
        analyses.dispersion_set_alignment(planted, size=15, k=5, metrics=[])
    with pytest.raises(ValueError, match="metric_permutations must be an integer >= 0"):
        analyses.dispersion_set_alignment(
            planted, size=15, k=5, metrics=["cka"], metric_permutations=-1
        )


# --- calibrated scores and matched baselines -------------------------------------------------


def _planted_pairs(planted):
    best = analyses.best_language_layers(planted, k=5)
    return [p for p in analyses.pairs_with_best_layers(planted, k=5, best_layers=best)
            if p.vision_model == "vision0"]


@pytest.mark.parametrize("dense", [True, False])
def test_shuffled_pairing_null_matches_a_loop_over_shuffled_features(planted, dense,
                                                                     monkeypatch):
    """Both routes of the feature metrics: the (n, n) kernels of a small run, and (``dense``
    False: a large run's) each model's side once per set, a shuffle reordering the Y side's."""
    if not dense:
        monkeypatch.setattr(subset_metrics, "uses_dense_kernels", lambda *args, **kwargs: False)
    pairs = _planted_pairs(planted)
    low = select_stimuli(planted.dispersion["mean"].to_numpy(), "low", 20)
    names = ["cknna", "mutual_knn", "lcs_knn", "cka", "unbiased_cka", "svcca"]
    told = []
    table = analyses.shuffled_pairing_calibration(
        analyses.indexes_for(planted, pairs), pairs, {"low": low}, 5, names,
        metric_options={"svcca": {"cca_dim": 5}}, n_shuffles=30, seed=4,
        progress=lambda *call: told.append(call),
    )
    assert len(table) == len(names) * len(pairs)
    # the set's 31 pairings (30 shuffles and the observed one), told after each: SVCCA is
    # measured pairing by pairing on either route
    assert told == [("low", done, 31) for done in range(1, 32)]
    shuffled = calibration.shuffled_pairings(low, 30, 4)
    for row in table.itertuples():
        X = _features(planted, row.vision_model, row.vision_layer)
        Y = _features(planted, row.language_model, row.language_layer)
        options = {"k": 5} if registry.metric(row.metric).neighbour_metric else {}
        if row.metric == "svcca":
            options = {"cca_dim": 5}
        observed = registry.measure(row.metric, X[low], Y[low], **options)
        null = np.array([registry.measure(row.metric, X[low], Y[s], **options) for s in shuffled])
        assert row.observed == pytest.approx(observed, abs=1e-9)
        assert row.null_mean == pytest.approx(null.mean(), abs=1e-9)
        assert row.calibrated == pytest.approx(observed - null.mean(), abs=1e-9)
        assert row.p_value_shuffled == pytest.approx((1 + np.sum(null >= observed - 1e-12)) / 31)
    # planted: the planted model's pairing carries alignment on the quiet stimuli, the
    # independent model's does not
    by_model = table[table.metric == "cknna"].set_index("language_model")
    assert by_model.loc["planted", "z"] > 3
    assert abs(by_model.loc["independent", "z"]) < 3


def test_calibration_of_metrics_computed_all_at_once_tells_each_set_once(planted):
    """Neighbour metrics take every shuffle of a set in one pass: one progress call per set."""
    pairs = _planted_pairs(planted)[:2]
    scores = planted.dispersion["mean"].to_numpy()
    sets = {"low": select_stimuli(scores, "low", 20), "high": select_stimuli(scores, "high", 20)}
    told = []
    table = analyses.shuffled_pairing_calibration(
        analyses.indexes_for(planted, pairs), pairs, sets, 5, ["cknna", "cycle_knn"],
        n_shuffles=12, seed=1, progress=lambda *call: told.append(call),
    )
    assert told == [("low", 13, 13), ("high", 13, 13)]
    assert len(table) == 2 * 2 * 2 and (table.n_shuffles == 12).all()
    with pytest.raises(ValueError, match="level must lie in"):  # before any set is scored
        analyses.shuffled_pairing_calibration(
            analyses.indexes_for(planted, pairs), pairs, sets, 5, ["cknna"], level=1.5,
            progress=lambda *call: pytest.fail("scored a set before checking level"),
        )


def test_matched_baselines_explain_a_gap_made_by_the_covariate(planted):
    """Planted: the gap is made by each stimulus's noise level. Matched on that noise level,
    random sets reproduce the gap (it does not survive); matched on an unrelated covariate, they
    do not (it survives)."""
    pairs = [p for p in _planted_pairs(planted) if p.language_model == "planted"]
    noise = planted.stimuli["planted_noise"].to_numpy()
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", 15), select_stimuli(scores, "high", 15)
    indexes = analyses.indexes_for(planted, pairs)
    explained, balance = analyses.matched_baselines(
        indexes, pairs, low, high, 5, ["cknna", "cka"], covariate=noise, n_sets=40, seed=1,
    )
    assert not explained.survives.any()
    assert (explained.share_of_gap_matched > 0.5).all()
    assert (balance.standardised_difference.abs() < 0.1).all()
    unrelated = np.random.default_rng(0).standard_normal(noise.size)
    survives, _ = analyses.matched_baselines(
        indexes, pairs, low, high, 5, ["cknna", "cka"], covariate=unrelated, n_sets=40, seed=1,
    )
    assert survives.survives.all()
    assert (survives.share_of_gap_matched.abs() < 0.5).all()
    # the p-value by hand from the matched draws
    row = survives.iloc[0]
    lows = calibration.matched_random_sets(
        low, unrelated, n_sets=40,
        seed=int(np.random.SeedSequence(1).spawn(2)[0].generate_state(1)[0]),
    )
    X = _features(planted, row.vision_model, row.vision_layer)
    Y = _features(planted, row.language_model, row.language_layer)
    values = [cknna(X[s], Y[s], k=5) for s in lows]
    assert row.matched_low_mean == pytest.approx(np.mean(values), abs=1e-6)


def test_the_lab_and_the_report_calibrate_and_match_a_set_with_the_same_draws(planted):
    """One result whoever asks: the Alignment lab's calibrated scores and matched baselines of
    the low and high sets equal the report's (same seed and k, no labels): the same shuffled
    pairings, the same typicality and the same matched random sets per set."""
    from convergence_core.dashboard import lab

    pairs = _planted_pairs(planted)[:2]
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", 15), select_stimuli(scores, "high", 15)
    indexes = analyses.indexes_for(planted, pairs)
    k, seed = 4, 5
    calibrated = analyses.shuffled_pairing_calibration(
        indexes, pairs, {"low": low, "high": high}, k, ["cknna"], n_shuffles=12, seed=seed
    )
    matched, _ = analyses.matched_baselines(
        indexes, pairs, low, high, k, ["cknna"],
        covariate=analyses.vision_typicality(planted, k=k), n_sets=15, seed=seed,
    )
    table, _ = lab.calibration_table(
        indexes, pairs, {"low": low, "high": high}, k,
        lab.matching_covariates(planted, None, k=k), n_shuffles=12, n_matched=15, seed=seed,
    )
    for pair in pairs:
        for name in ("low", "high"):
            ours = table[(table["set"] == name) & (table["vision_model"] == pair.vision_model)
                         & (table["language_model"] == pair.language_model)].iloc[0]
            theirs = calibrated[(calibrated["set"] == name)
                                & (calibrated["vision_model"] == pair.vision_model)
                                & (calibrated["language_model"] == pair.language_model)].iloc[0]
            assert ours["calibrated"] == pytest.approx(theirs["calibrated"], abs=1e-12)
            assert ours["null_p_value"] == pytest.approx(theirs["p_value_shuffled"], abs=1e-12)
            report_row = matched[(matched["vision_model"] == pair.vision_model)
                                 & (matched["language_model"] == pair.language_model)].iloc[0]
            assert ours["matching"] == "nearest typicality"
            assert ours["matched_mean"] == pytest.approx(
                report_row[f"matched_{name}_mean"], abs=1e-12
            )


def test_matched_baselines_match_on_category_too(planted):
    pairs = _planted_pairs(planted)[:1]
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", 12), select_stimuli(scores, "high", 12)
    labels = np.arange(scores.size) % 4
    covariate = np.random.default_rng(1).standard_normal(scores.size)
    table, balance = analyses.matched_baselines(
        analyses.indexes_for(planted, pairs), pairs, low, high, 5, ["mutual_knn"],
        covariate=covariate, labels=labels, n_sets=10, seed=2,
    )
    assert set(table.matched_on) == {"typicality and category"}
    assert len(balance) == 2


def test_vision_typicality_is_the_mean_z_scored_local_density(planted):
    densities = []
    for model, layer in analyses.vision_layers(planted):
        F = _features(planted, model, layer)
        G = F @ F.T
        np.fill_diagonal(G, -np.inf)
        densities.append(np.sort(G, axis=1)[:, ::-1][:, :5].mean(axis=1))
    expected = np.mean([(d - d.mean()) / d.std() for d in densities], axis=0)
    np.testing.assert_allclose(analyses.vision_typicality(planted, k=5), expected, atol=1e-9)
    # dense regions of the vision models are where they agree: typicality falls with dispersion
    rho = sps.spearmanr(analyses.vision_typicality(planted, k=5), planted.dispersion["mean"])[0]
    assert rho < 0


# --- Fig. S1 ---------------------------------------------------------------------------------


def test_drop_high_beats_full_beats_drop_low(planted):
    table = analyses.drop_fraction_alignment(planted, q=0.25, k=5)
    assert len(table) == 6 * 3
    wide = table[table.language_model == "planted"].pivot_table(
        index="vision_model", columns="condition", values="cknna"
    )
    assert (wide["drop_high"] > wide["full"]).all()
    assert (wide["full"] > wide["drop_low"]).all()
    kept = table.drop_duplicates("condition").set_index("condition")["n_stimuli"]
    assert kept.to_dict() == {"full": 80, "drop_high": 60, "drop_low": 60}


def test_drop_fraction_matches_slow_reference(planted):
    table = analyses.drop_fraction_alignment(planted, q=0.25, k=5)
    order = np.argsort(planted.dispersion["mean"].to_numpy(), kind="stable")
    kept = np.sort(order[:60])  # drop the 20 highest
    row = table[
        (table.vision_model == "vision0")
        & (table.language_model == "planted")
        & (table.condition == "drop_high")
    ].iloc[0]
    expected = cknna(
        _features(planted, "vision0", "final")[kept],
        _features(planted, "planted", PLANTED_BEST_LAYER)[kept],
        k=5,
    )
    assert row.cknna == pytest.approx(expected, abs=1e-5)


# --- Fig. S2 ---------------------------------------------------------------------------------


def test_rotated_copy_deviates_exactly_like_its_original(tmp_path):
    """Theory: a held-out model that is an exact rotation R of a model A still in the partial GPA
    preprocesses to A's configuration times R, and Procrustes undoes R, so its deviation from the
    partial consensus equals A's GPA residual there, stimulus by stimulus; hence r equals
    corr(mean partial residual, A's residual)."""
    run, _ = make_rotation_run(tmp_path / "rotation")
    points = analyses.leave_one_model_out(run)
    assert len(points) == 4 * run.n_stimuli
    held = points[points.held_out_model == "copy"]
    embeddings = [
        np.asarray(run.embeddings[m]["final"], dtype=np.float64)
        for m in ("vision0", "vision1", "vision2")
    ]
    partial = generalized_procrustes(embeddings)
    residual_of_original = np.asarray(partial.residuals)[:, 0]
    np.testing.assert_allclose(held.deviation.to_numpy(), residual_of_original, atol=1e-5)
    np.testing.assert_allclose(
        held.partial_dispersion.to_numpy(), np.asarray(partial.residuals).mean(axis=1), atol=1e-9
    )
    statistics = analyses.leave_one_model_out_statistics(points).set_index("held_out_model")
    expected_r = np.corrcoef(np.asarray(partial.residuals).mean(axis=1), residual_of_original)[0, 1]
    assert statistics.loc["copy", "pearson_r"] == pytest.approx(expected_r, abs=1e-4)
    # and symmetrically for the original held out, with the copy in the partial GPA
    original = points[points.held_out_model == "vision0"]
    others = [
        np.asarray(run.embeddings[m]["final"], dtype=np.float64)
        for m in ("vision1", "vision2", "copy")
    ]
    np.testing.assert_allclose(
        original.deviation.to_numpy(),
        np.asarray(generalized_procrustes(others).residuals)[:, 2],
        atol=1e-5,
    )


@pytest.mark.parametrize("held_width, consensus_width", [(50, 40), (12, 40), (20, 8)])
def test_held_out_deviation_matches_full_width_procrustes(held_width, consensus_width):
    """Slow reference: pad both to the common width and solve the full orthogonal Procrustes
    problem with scipy, no change of basis."""
    rng = np.random.default_rng(held_width)
    m = 30
    held = rng.standard_normal((m, held_width)) + 3.0
    consensus = rng.standard_normal((m, consensus_width))
    consensus -= consensus.mean(axis=0)
    width = max(held_width, consensus_width)
    prepared = held - held.mean(axis=0)
    prepared = np.pad(prepared / np.linalg.norm(prepared), ((0, 0), (0, width - held_width)))
    target = np.pad(consensus, ((0, 0), (0, width - consensus_width)))
    rotation, _ = orthogonal_procrustes(prepared, target)
    expected = np.linalg.norm(prepared @ rotation - target, axis=1)
    np.testing.assert_allclose(analyses.held_out_deviation(held, consensus), expected, atol=1e-10)


def test_held_out_deviation_ignores_shift_scale_rotation_and_padding():
    rng = np.random.default_rng(9)
    held = rng.standard_normal((25, 7))
    consensus = rng.standard_normal((25, 10))
    consensus -= consensus.mean(axis=0)
    rotation, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    transformed = 4.0 * held @ rotation + rng.standard_normal(7)
    padded = np.pad(held, ((0, 0), (0, 5)))
    reference = analyses.held_out_deviation(held, consensus)
    np.testing.assert_allclose(
        analyses.held_out_deviation(transformed, consensus), reference, atol=1e-10
    )
    np.testing.assert_allclose(
        analyses.held_out_deviation(padded, consensus), reference, atol=1e-10
    )
    # but it does see a change of the held-out geometry
    warped = held * np.linspace(0.5, 2.0, 7)
    assert not np.allclose(analyses.held_out_deviation(warped, consensus), reference, atol=1e-3)
    with pytest.raises(ValueError, match="same m stimuli"):
        analyses.held_out_deviation(held[:20], consensus)


def test_partial_dispersion_predicts_held_out_deviation(planted):
    points = analyses.leave_one_model_out(planted)
    statistics = analyses.leave_one_model_out_statistics(points)
    assert list(statistics.held_out_model) == ["vision0", "vision1", "vision2"]
    # the planted noise is shared by all models, so the correlation must be strongly positive
    assert (statistics.pearson_r > 0.5).all()
    assert (statistics.spearman_p_value < 1e-3).all()
    assert (points.deviation >= 0).all()


# --- stats helpers against slow references ---------------------------------------------------


def test_permutation_p_value_matches_exact_enumeration():
    values = np.array([3.1, 2.7, 2.9, 3.4, 1.0, 1.4, 2.8, 0.9])
    first, second = np.arange(4), np.arange(4, 8)

    def statistic(indices):
        return values[indices].mean(axis=-1)

    observed = statistic(first) - statistic(second)
    exact = []
    for chosen in itertools.combinations(range(8), 4):
        rest = [i for i in range(8) if i not in chosen]
        exact.append(statistic(np.array(chosen)) - statistic(np.array(rest)))
    exact = np.array(exact)
    exact_two_sided = np.mean(np.abs(exact) >= abs(observed) - 1e-12)
    exact_greater = np.mean(exact >= observed - 1e-12)
    (result,) = permutation_tests_two_sets(
        lambda sets: statistic(sets)[None],  # one statistic, (1, B)
        first,
        second,
        n_permutations=4000,
        rng=np.random.default_rng(0),
    )
    assert result.observed == pytest.approx(observed)
    assert result.p_value_two_sided == pytest.approx(exact_two_sided, abs=0.015)
    assert result.p_value_first_greater == pytest.approx(exact_greater, abs=0.015)
    assert result.p_value_two_sided > 0  # the +1 correction


def test_permutation_p_values_are_roughly_uniform_under_the_null():
    rng = np.random.default_rng(5)
    p_values = []
    for _ in range(200):
        values = rng.standard_normal(20)
        (result,) = permutation_tests_two_sets(
            lambda sets, values=values: values[sets].mean(axis=1)[None],
            np.arange(10),
            np.arange(10, 20),
            n_permutations=99,
            rng=rng,
        )
        p_values.append(result.p_value_two_sided)
    p_values = np.array(p_values)
    assert 0.02 <= np.mean(p_values <= 0.1) <= 0.2
    assert 0.4 <= np.median(p_values) <= 0.6


def test_permutation_p_values_by_hand():
    null = np.array([-0.3, -0.1, 0.0, 0.1, 0.2, 0.5])
    assert permutation_p_values(0.2, null) == pytest.approx(((1 + 3) / 7, (1 + 2) / 7))
    assert permutation_p_values(10.0, null) == pytest.approx((1 / 7, 1 / 7))
    # an undefined statistic (CKNNA of a tiny set whose self-HSIC is negative) or an undefined
    # null value: no p-value (they got the smallest p there is, 1/7, or a smaller one than due)
    assert np.isnan(permutation_p_values(float("nan"), null)).all()
    assert np.isnan(permutation_p_values(0.2, np.append(null, np.nan))).all()
    from convergence_core.calibration import calibrated_score

    assert np.isnan(calibrated_score(np.array([np.nan, 0.1, 0.2, 0.3])).p_value)


def test_percentile_interval_and_correlation_against_numpy():
    rng = np.random.default_rng(2)
    values = rng.standard_normal(1000)
    lower, upper = percentile_interval(values)
    assert np.mean(values < lower) == pytest.approx(0.025, abs=0.002)
    assert np.mean(values > upper) == pytest.approx(0.025, abs=0.002)
    x = rng.standard_normal(50)
    y = 2.0 * x + 0.5 + 0.3 * rng.standard_normal(50)
    fit = correlation_with_fit(x, y)
    assert fit["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    assert fit["fit_slope"] == pytest.approx(slope)
    assert fit["fit_intercept"] == pytest.approx(y.mean() - slope * x.mean())
    ranks_r = np.corrcoef(sps.rankdata(x), sps.rankdata(y))[0, 1]
    assert fit["spearman_rho"] == pytest.approx(ranks_r)


def test_paired_tests_without_differences_give_nan():
    same = np.array([0.1, 0.2, 0.3])
    table = paired_difference_tests(same, same)
    assert table.p_value.isna().all()
    assert (table.mean_difference == 0).all()


# --- bad input --------------------------------------------------------------------------------


def test_set_size_larger_than_half_is_refused(planted):
    with pytest.raises(ValueError, match=r"larger than half.*use size <= 40"):
        analyses.dispersion_set_alignment(planted, size=41, n_random=2, n_permutations=2)


def test_k_too_large_for_a_set_is_refused(planted):
    with pytest.raises(ValueError, match=r"k=10 is too large.*use k <= 7"):
        analyses.dispersion_set_alignment(planted, size=8, k=10, n_random=2, n_permutations=2)
    with pytest.raises(ValueError, match="too large"):
        analyses.drop_fraction_alignment(planted, q=0.9, k=10)
    with pytest.raises(ValueError, match="too large"):
        analyses.layer_sweep(planted, k=80)


def test_other_bad_parameters_are_refused(planted):
    with pytest.raises(ValueError, match="unknown dispersion score"):
        analyses.dispersion_set_alignment(planted, size=10, k=5, score="median", n_random=2)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        analyses.drop_fraction_alignment(planted, q=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        analyses.dispersion_set_alignment(planted, size=0)
    with pytest.raises(ValueError, match="k=1 is too small: it must satisfy 2 <= k"):
        analyses.layer_sweep(planted, k=1)


def _single_vision_run():
    residuals = np.zeros((30, 1))
    return SimpleNamespace(
        path="single",
        gpa=SimpleNamespace(models=("only",), layers=("final",), residuals=residuals),
        language_models=["text"],
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda run: analyses.dispersion_set_alignment(run, size=10),
        lambda run: analyses.drop_fraction_alignment(run),
        lambda run: analyses.layer_sweep(run),
        lambda run: analyses.best_language_layers(run),
        lambda run: analyses.leave_one_model_out(run),
    ],
)
def test_a_single_vision_model_is_refused(call):
    with pytest.raises(
        ValueError, match="single vision model.*precompute the run with more vision models"
    ):
        call(_single_vision_run())


def test_leave_one_out_needs_three_vision_models(tmp_path):
    run = _quiet_half_run(tmp_path, "two", n=30, n_vision=2)
    with pytest.raises(ValueError, match="at least 3 GPA models"):
        analyses.leave_one_model_out(run)


@pytest.mark.parametrize("block", [None, 2])
def test_fig2_sets_report_how_far_the_feature_metrics_are(planted, block, monkeypatch):
    """``progress(stage, done, total)`` after every set measured set by set (the slow part on
    large sets: a 10,000-stimulus report sat minutes in this section without a word), stage by
    stage; the values are those of a call without it. Label shuffles measured in blocks (2 here)
    count on across the blocks, as one call on all of them did."""
    if block is not None:
        monkeypatch.setattr(analyses, "SHUFFLE_BLOCK", block)
    calls = []
    kwargs = dict(size=15, k=5, n_random=4, n_permutations=6, metrics=["cknna", "svcca"],
                  metric_permutations=3, score=["mean", "pc1"],
                  metric_options={"svcca": {"cca_dim": 5}})
    table = analyses.dispersion_set_alignment(
        planted, progress=lambda *call: calls.append(call), **kwargs
    )
    expected = [("random sets", b, 4) for b in range(1, 5)]
    for score in ("mean", "pc1"):
        expected += [(f"low and high sets ({score})", b, 2) for b in (1, 2)]
        expected += [(f"label shuffles ({score})", b, 6) for b in range(1, 7)]  # 3 × 2 sets
    assert calls == expected
    pd.testing.assert_frame_equal(table, analyses.dispersion_set_alignment(planted, **kwargs))


@pytest.mark.parametrize("options", [{}, {"kernel": "rbf", "sigma": 4.0}])
def test_cka_family_set_by_set_shares_each_models_side(monkeypatch, options):
    """The route of large runs (no (n, n) kernels): each model's CKA side once per set, shared by
    CKA and unbiased CKA and by every pair it is in; the values are the metrics' own on each
    set's rows (a 10,000-stimulus report spent 1.6 s per set and metric recomputing them)."""
    from convergence_core.neighbours import NeighbourIndex

    monkeypatch.setattr(subset_metrics, "uses_dense_kernels", lambda *args, **kwargs: False)
    rng = np.random.default_rng(5)
    z = rng.standard_normal((40, 3))
    features = {
        (name, "l"): z @ rng.standard_normal((3, d)) + 0.5 * rng.standard_normal((40, d))
        for name, d in (("a", 9), ("b", 60), ("c", 12), ("e", 25))
    }
    indexes = {key: NeighbourIndex.from_features(F) for key, F in features.items()}
    pairs = [(x, "l", y, "l") for x in ("a", "b") for y in ("c", "e")]
    sets = np.stack([np.sort(rng.choice(40, 20, replace=False)) for _ in range(3)])
    names = ["cka", "unbiased_cka"]
    values = analyses.set_metric_values(
        indexes, pairs, sets, 4, names, {name: options for name in names}
    )
    merged = {name: subset_metrics.metric_options(name, options) for name in names}
    assert subset_metrics._side_key("cka", merged["cka"]) == subset_metrics._side_key(
        "unbiased_cka", merged["unbiased_cka"]
    )
    for name in names:
        for p, (x, _, y, _) in enumerate(pairs):
            F, G = (indexes[(m, "l")].features.all_rows() for m in (x, y))
            expected = [registry.measure(name, F[s], G[s], **options) for s in sets]
            np.testing.assert_allclose(values[name][p], expected, atol=1e-12)


def test_typicality_is_measured_within_the_stored_lists(planted):
    """From the review: the lab's typicality at its k searched the whole run for each stimulus's
    neighbours beyond the stored lists (O(n²)); both the lab and the report stop at the lists."""
    stored = min(planted.neighbours(m, layer).k_max for m, layer in analyses.vision_layers(planted))
    assert analyses.typicality_k(planted, 5) == 5
    assert analyses.typicality_k(planted, stored + 40) == stored


def test_pairs_that_all_differ_by_the_same_amount_have_no_t_statistic():
    """Equal nonzero differences have no variance: t was inf and p 0 (report.json refused the
    inf); the Wilcoxon test (all differences positive) stands."""
    for first, second in (([0.3, 0.3], [0.2, 0.2]), ([0.3, 0.5, 0.7], [0.2, 0.4, 0.6])):
        table = paired_difference_tests(np.array(first), np.array(second)).set_index("test")
        assert table.loc["paired_t", ["statistic", "p_value"]].isna().all()
        wilcoxon = table.loc["wilcoxon_signed_rank", "p_value"]
        assert wilcoxon == pytest.approx(0.5 ** (len(first) - 1))  # every difference positive
        assert table["mean_difference"].iloc[0] == pytest.approx(0.1)
    varied = paired_difference_tests(np.array([0.3, 0.5, 0.8]), np.array([0.2, 0.4, 0.6]))
    assert np.isfinite(varied.set_index("test").loc["paired_t", "statistic"])


def test_best_layer_passes_over_layers_whose_mean_cknna_is_nan():
    """np.argmax returned the NaN layer; every layer NaN is a ValueError naming the model."""
    sweep = pd.DataFrame({
        "vision_model": ["v"] * 3, "vision_layer": ["l"] * 3, "language_model": ["t"] * 3,
        "language_layer": ["L0", "L1", "L2"], "language_layer_index": [0, 1, 2], "k": [10] * 3,
        "cknna": [0.30, np.nan, 0.55], "n_stimuli_used": [20] * 3, "sample_seed": [None] * 3,
    })
    best = analyses.best_language_layers(None, k=10, sweep=sweep)
    assert best["language_layer"].tolist() == ["L2"] and best["mean_cknna"].iloc[0] == 0.55
    sweep.loc[2, "cknna"] = np.nan
    sweep.loc[0, "cknna"] = np.nan
    with pytest.raises(ValueError, match="language model 't' has no defined CKNNA"):
        analyses.best_language_layers(None, k=10, sweep=sweep)


def test_a_language_model_in_gpa_is_not_paired_with_itself(tmp_path):
    """GPA across a vision and a language model: the Paper page's and the report's pairs held
    language-a × language-a (CKNNA about 1 on every set, lifting every mean over the pairs)."""
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import synthetic_embeddings

    embeddings, _ = synthetic_embeddings(40)
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(40)],
                            "image": [f"{i}.jpg" for i in range(40)],
                            "captions": [[f"c{i}"] for i in range(40)]})
    run = write_run_from_embeddings(
        tmp_path / "gpalang", stimuli, embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"], thumbnails=False,
        gpa_models=["vision-a", "language-a"],
        gpa_layers={"vision-a": "stage2", "language-a": "layer3"},
    )
    pairs = analyses.pairs_with_best_layers(run, k=5)
    assert [(p.vision_model, p.language_model) for p in pairs] == [
        ("vision-a", "language-a"), ("vision-a", "language-b"), ("language-a", "language-b")
    ]
    table = analyses.dispersion_set_alignment(run, size=10, k=5, n_random=5, n_permutations=10)
    assert not (table["vision_model"] == table["language_model"]).any()
    # nor does it choose language-a's best layer (its GPA layer scored ~1 with itself)
    sweep = analyses.layer_sweep(run, k=5)
    assert not (sweep["vision_model"] == sweep["language_model"]).any()
    best = analyses.best_language_layers(run, k=5, sweep=sweep).set_index("language_model")
    assert best.loc["language-a", "n_vision_models"] == 1


def test_a_model_undefined_at_every_layer_gets_its_default_layer_when_asked():
    """The report stopped on a language model whose CKNNA is NaN at every layer; the dashboard
    pages use its default layer. ``undefined="default"`` does that for that model alone (the
    others keep their best layer), with ``mean_cknna`` NaN and a note naming model and layer;
    the default still raises (the pages catch it)."""
    sweep = pd.DataFrame({
        "vision_model": ["v"] * 5, "vision_layer": ["l"] * 5,
        "language_model": ["t", "t", "t", "u", "u"],
        "language_layer": ["L0", "L1", "L2", "M0", "M1"], "language_layer_index": [0, 1, 2, 0, 1],
        "k": [10] * 5, "cknna": [np.nan, np.nan, np.nan, 0.2, 0.4], "n_stimuli_used": [20] * 5,
        "sample_seed": [None] * 5,
    })
    run = SimpleNamespace(default_layer={"t": "L1", "u": "M0"}.__getitem__)
    best = analyses.best_language_layers(run, k=10, sweep=sweep, undefined="default")
    assert best["language_layer"].tolist() == ["L1", "M1"]
    assert best["language_layer_index"].tolist() == [1, 1]
    assert np.isnan(best["mean_cknna"].iloc[0]) and best["mean_cknna"].iloc[1] == 0.4
    notes = analyses.undefined_layer_note(best)
    assert len(notes) == 1 and "'t'" in notes[0] and "default layer 'L1'" in notes[0]
    assert analyses.undefined_layer_note(best.iloc[1:]) == []
    with pytest.raises(ValueError, match="language model 't' has no defined CKNNA"):
        analyses.best_language_layers(run, k=10, sweep=sweep)
    with pytest.raises(ValueError, match="undefined must be 'raise' or 'default'"):
        analyses.best_language_layers(run, k=10, sweep=sweep, undefined="skip")


def test_copies_of_one_pair_are_no_more_evidence_than_the_pair(planted):
    """Pairs that share models are not independent: in the limit, k copies of one pair. The
    Wilcoxon test across them reads k identical differences as k replicates (p = 2 / 2^k); the
    test of the mean over pairs on the shared label shuffles gives the one pair's own p."""
    pair = analyses.Pair("vision0", "final", "independent", "final")
    one = analyses.dispersion_set_alignment(
        planted, size=20, k=5, n_random=5, n_permutations=200, seed=2, pairs=[pair]
    )
    copies = analyses.dispersion_set_alignment(
        planted, size=20, k=5, n_random=5, n_permutations=200, seed=2, pairs=[pair] * 8
    )
    own = one["permutation_p_value_two_sided"].iloc[0]
    assert own > 0.05  # the planted noise model: no effect
    assert (copies["mean_over_pairs_p_value_two_sided"] == own).all()
    assert one["mean_over_pairs_p_value_two_sided"].iloc[0] == own
    tests = analyses.paired_set_tests(copies).set_index("test")
    assert tests.loc["permutation_mean_over_pairs", "p_value"] == own
    assert tests.loc["permutation_mean_over_pairs", "n_pairs"] == 8
    assert tests.loc["wilcoxon_signed_rank", "p_value"] < 0.05 < own  # what it got wrong
    assert "not" in tests.loc["wilcoxon_signed_rank", "note"]
    assert "independent" in tests.loc["paired_t", "note"]
    assert "shuffles for every pair" in tests.loc["permutation_mean_over_pairs", "note"]


def test_the_mean_over_pairs_test_matches_a_per_subset_reference(planted):
    """The mean over pairs of low − high against its mean on each of the label shuffles (the
    per-pair test's, every pair on the same ones), from alignment.cknna on each set's features."""
    size, k, n_permutations, seed = 10, 4, 25, 7
    table = analyses.dispersion_set_alignment(
        planted, size=size, k=k, n_random=3, n_permutations=n_permutations, seed=seed,
    )
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", size), select_stimuli(scores, "high", size)
    _, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    permutation_rng = np.random.default_rng(permutation_seed)
    pool = np.concatenate([low, high])
    shuffles = [pool[permutation_rng.permutation(2 * size)] for _ in range(n_permutations)]
    observed, null = [], []
    for row in table.itertuples():
        X = _features(planted, row.vision_model, row.vision_layer)
        Y = _features(planted, row.language_model, row.language_layer)

        def value(subset, X=X, Y=Y):
            subset = np.sort(subset)
            return cknna(X[subset], Y[subset], k=k)

        observed.append(value(low) - value(high))
        null.append([value(s[:size]) - value(s[size:]) for s in shuffles])
    mean, mean_null = np.mean(observed), np.mean(null, axis=0)
    two_sided = (1 + np.sum(np.abs(mean_null) >= abs(mean) - 1e-12)) / (n_permutations + 1)
    greater = (1 + np.sum(mean_null >= mean - 1e-12)) / (n_permutations + 1)
    np.testing.assert_allclose(table["mean_over_pairs_p_value_two_sided"], two_sided)
    np.testing.assert_allclose(table["mean_over_pairs_p_value_low_greater"], greater)
    tests = analyses.paired_set_tests(table).set_index("test")
    assert tests.loc["permutation_mean_over_pairs", "p_value"] == pytest.approx(two_sided)
    assert tests.loc["permutation_mean_over_pairs", "statistic"] == pytest.approx(mean, abs=1e-9)


def _label_shuffle_nulls_all_at_once(indexes, pairs, low, high, k, names, options, counts, seed):
    """The reference (Fig. 2's shuffles before 2026-12-07): every label shuffle drawn at once
    from ``shuffle_rng(seed)`` (a list, then stacked), then each count's metrics measured on the
    first ``count`` of them in one call. ``{metric: (pairs, count)}``."""
    rng = analyses.shuffle_rng(seed)
    pool = np.concatenate([low, high])
    most = max(counts.values())
    shuffled = np.stack([pool[rng.permutation(pool.shape[0])] for _ in range(most)])
    first, second = shuffled[:, : low.size], shuffled[:, low.size :]
    nulls = {}
    for count in sorted(set(counts.values()) - {0}):
        group = [name for name in names if counts[name] == count]
        values = analyses.set_metric_values(
            indexes, pairs, np.concatenate([first[:count], second[:count]]), k, group,
            {name: options.get(name, {}) for name in group},
        )
        for name in group:
            nulls[name] = values[name][:, :count] - values[name][:, count:]
    return nulls


@pytest.mark.parametrize("block", [None, 16])
def test_label_shuffles_in_blocks_give_the_nulls_of_all_at_once(planted, block, monkeypatch):
    """Fig. 2's label shuffles drawn and measured a block at a time are the shuffles drawn all at
    once (the same stream, in order): the same nulls to the last bit, for metrics of different
    counts (CKNNA 40, the others the first 20 of the same shuffles; blocks of 16 cut both; a
    count of 0: no test), and so the same p-values, per pair and for the mean over pairs."""
    if block is not None:
        monkeypatch.setattr(analyses, "SHUFFLE_BLOCK", block)
    size, k, seed = 20, 5, 3
    names = ["cknna", "mutual_knn", "cka", "svcca"]
    options = {"svcca": {"cca_dim": 5}}
    counts = {"cknna": 40, "mutual_knn": 20, "cka": 20, "svcca": 0}
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", size), select_stimuli(scores, "high", size)
    pairs = analyses._pairs_with_best_layers(planted, k, None)
    indexes = analyses.indexes_for(planted, pairs)
    full_options = analyses._metric_options(names, options)
    got = analyses._shuffle_nulls(indexes, pairs, low, high, k, names, full_options, counts, seed,
                                  on_error="raise")
    want = _label_shuffle_nulls_all_at_once(indexes, pairs, low, high, k, names, full_options,
                                            counts, seed)
    assert set(got) == set(want) == {"cknna", "mutual_knn", "cka"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    table = analyses.dispersion_set_alignment(
        planted, size=size, k=k, n_random=3, n_permutations=40, metric_permutations=20,
        seed=seed, metrics=names, metric_options=options, pairs=pairs,
    )
    for name in ("cknna", "mutual_knn", "cka"):
        rows = table[table["metric"] == name].reset_index(drop=True)
        for p, row in rows.iterrows():
            assert (row["permutation_p_value_two_sided"], row["permutation_p_value_low_greater"]) \
                == permutation_p_values(row["low_minus_high"], want[name][p])
        mean = float(np.mean(rows["low_minus_high"]))
        assert (rows["mean_over_pairs_p_value_two_sided"].iloc[0],
                rows["mean_over_pairs_p_value_low_greater"].iloc[0]) \
            == permutation_p_values(mean, want[name].mean(axis=0))


def test_label_shuffles_are_measured_in_memory_that_does_not_grow_with_them(monkeypatch):
    """300 label shuffles of two sets of 10,000 (a 40,000-stimulus run): drawn at once they were
    48 MB, a list of them as much again, and a copy as large for the engine's one call (~90 MiB
    at the peak); a block of analyses.SHUFFLE_BLOCK (64) at a time is ~10 MB (~20 MiB at the
    peak), whatever the count. The engine is a stand-in without memory of its own (the sum of a
    per-stimulus value over each set, set by set)."""
    n, size, n_permutations = 40_000, 10_000, 300
    value = np.random.default_rng(0).standard_normal(n)
    seen = []

    def measured(indexes, pairs, sets, k, names, options=None, *, on_error="raise",
                 progress=None):
        seen.append(sets.shape[0])
        return {name: np.array([[value[row].sum() for row in sets]]) for name in names}

    monkeypatch.setattr(analyses, "set_metric_values", measured)
    pair = analyses.Pair("vision", "final", "language", "final")
    scores = np.random.default_rng(1).standard_normal(n)
    tracemalloc.start()
    try:
        (row,) = analyses._score_rows(
            {}, [pair], scores, "mean", {"cknna": np.zeros((1, 5))}, size=size, k=10,
            names=["cknna"], options={"cknna": {}}, counts={"cknna": n_permutations},
            n_random=5, seed=0, on_error="raise",
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a block of 64 shuffles is 64 × 2 × 10,000 × 8 bytes = 10 MB (then its copy for the call)
    assert peak < 32 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert sum(seen) == 2 + 2 * n_permutations
    assert 0 < row["permutation_p_value_two_sided"] <= 1


# --- mutation-review guards -----------------------------------------------------------------


def test_matched_high_p_value_is_the_share_of_matched_sets_at_or_below_high(planted):
    """p_value_high_below_matched = P(matched ≤ high) with the +1 correction, by hand from the
    high set's matched draws (drawn as matched_baselines draws them: the high matches avoid the
    low matches). On an unrelated covariate the high set sits below its matched sets: small p."""
    pairs = _planted_pairs(planted)[:1]
    scores = planted.dispersion["mean"].to_numpy()
    low, high = select_stimuli(scores, "low", 15), select_stimuli(scores, "high", 15)
    covariate = np.random.default_rng(0).standard_normal(scores.size)
    table, _ = analyses.matched_baselines(
        analyses.indexes_for(planted, pairs), pairs, low, high, 5, ["cknna"],
        covariate=covariate, n_sets=40, seed=1,
    )
    row = table.iloc[0]
    lows = calibration.matched_sets_by_cost(
        low, covariate, n_sets=40, seed=analyses.matched_set_seed(1, "low")
    ).sets
    highs = calibration.matched_sets_by_cost(
        high, covariate, n_sets=40, seed=analyses.matched_set_seed(1, "high"), avoid=lows
    ).sets
    X = _features(planted, row.vision_model, row.vision_layer)
    Y = _features(planted, row.language_model, row.language_layer)
    values = np.array([cknna(X[s], Y[s], k=5) for s in highs])
    assert row.matched_high_mean == pytest.approx(values.mean(), abs=1e-6)  # the same draws
    observed = cknna(X[np.sort(high)], Y[np.sort(high)], k=5)
    assert row.observed_high == pytest.approx(observed, abs=1e-9)
    assert np.min(np.abs(values - observed)) > 1e-6  # no tie within rounding
    expected = (1 + np.count_nonzero(values <= observed)) / (values.size + 1)
    assert row.p_value_high_below_matched == pytest.approx(expected)
    assert row.p_value_high_below_matched < 0.5


def test_effect_counts_significance_is_the_two_sided_p():
    """n_significant counts low > high with the TWO-sided permutation p < 0.05 (docstring): a row
    with two-sided p 0.08 and one-sided 0.04 is not significant; one with 0.03 / 0.015 is."""
    def row(two_sided, one_sided, pair):
        return dict(score="mean", metric="cknna", pair=pair, low_dispersion=0.5,
                    random_mean=0.4, high_dispersion=0.3,
                    permutation_p_value_two_sided=two_sided,
                    permutation_p_value_low_greater=one_sided, n_permutations=1000)

    counts = analyses.effect_counts(pd.DataFrame([row(0.08, 0.04, 0)]))
    assert int(counts["n_significant"].iloc[0]) == 0
    assert int(counts["n_low_above_high"].iloc[0]) == 1
    counts = analyses.effect_counts(pd.DataFrame([row(0.08, 0.04, 0), row(0.03, 0.015, 1)]))
    assert int(counts["n_significant"].iloc[0]) == 1
