"""What predicts dispersion (convergence_core/dispersion_predictors.py): the statistics against
scipy and slow references, a planted run whose dispersion is driven by one property, a null run,
and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from convergence_core import dispersion_predictors as dp
from convergence_core import properties as props


def _table(columns: dict[str, object], n: int) -> props.PropertyTable:
    stimuli = pd.DataFrame(
        {"id": [f"s{i}" for i in range(n)], "image": ["x"] * n, "captions": [["c"]] * n}
    )
    for name, values in columns.items():
        stimuli[name] = values
    return props.assemble_properties(stimuli)


def _dispersion(values: np.ndarray, pc1: np.ndarray | None = None) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(n)],
            "mean": values,
            "pc1": values if pc1 is None else pc1,
        }
    )


# ---------------------------------------------------------------------------------------------
# statistics against references


def test_benjamini_hochberg_matches_the_step_up_definition() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=15), [1e-4, 0.003, 0.04, np.nan]])
    q = dp.benjamini_hochberg(p)
    present = np.isfinite(p)
    m = int(present.sum())
    for i in np.flatnonzero(present):
        # q_i = min over p_j >= p_i of p_j * m / rank_j (rank among the present p-values)
        candidates = [
            p[j] * m / (np.sum(p[present] <= p[j])) for j in np.flatnonzero(present) if p[j] >= p[i]
        ]
        assert q[i] == pytest.approx(min(1.0, min(candidates)), rel=1e-12)
    assert np.isnan(q[-1])


def test_spearman_tests_match_scipy_on_the_same_permutations() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    n = 40
    y = rng.standard_normal(n)
    x = np.column_stack(
        [y + rng.standard_normal(n), rng.standard_normal(n), np.round(rng.standard_normal(n))]
    )  # the last column has ties
    rho, p_perm, p_t = dp._spearman_tests(x, y, 300, np.random.default_rng(5))
    for j in range(3):
        result = spearmanr(x[:, j], y)
        assert rho[j] == pytest.approx(result.statistic, rel=1e-12)
        assert p_t[j] == pytest.approx(result.pvalue, rel=1e-9)
    # the same permutations, one at a time through scipy
    extreme = np.zeros(3)
    for block in dp._permutation_blocks(n, 300, np.random.default_rng(5)):
        for perm in block:
            for j in range(3):
                null = spearmanr(x[:, j], y[perm]).statistic
                extreme[j] += abs(null) >= abs(rho[j]) - 1e-12
    np.testing.assert_allclose(p_perm, (1 + extreme) / 301)
    assert p_perm[0] < 0.01 < p_perm[1]


def test_kruskal_matches_scipy_and_its_permutations() -> None:
    from scipy.stats import kruskal, rankdata

    rng = np.random.default_rng(2)
    labels = np.array(["a"] * 12 + ["b"] * 9 + ["c"] * 15, dtype=object)
    y = np.round(rng.standard_normal(36) + (labels == "c") * 1.5, 1)  # ties
    h, epsilon, p_perm, p_chi2 = dp._kruskal_test(labels, y, 200, np.random.default_rng(4))
    reference = kruskal(*(y[labels == g] for g in "abc"))
    assert h == pytest.approx(reference.statistic, rel=1e-10)
    assert p_chi2 == pytest.approx(reference.pvalue, rel=1e-9)
    assert epsilon == pytest.approx(h / 35)
    ranks = rankdata(y)
    extreme = 0
    for block in dp._permutation_blocks(36, 200, np.random.default_rng(4)):
        for perm in block:
            shuffled = ranks[perm]
            extreme += kruskal(*(shuffled[labels == g] for g in "abc")).statistic >= h - 1e-9
    assert p_perm == pytest.approx((1 + extreme) / 201)


def test_permutation_p_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(50)
    y = x + rng.standard_normal(50)
    table = _table({"x": x, "x_cubed_shifted": x**3 + 10}, 50)
    tests = dp.property_tests(table, _dispersion(np.exp(y)), scores=["mean"], n_permutations=500)
    by_name = tests.set_index("property")
    assert by_name.loc["x", "effect"] == pytest.approx(by_name.loc["x_cubed_shifted", "effect"])
    assert by_name.loc["x", "p_value"] == by_name.loc["x_cubed_shifted", "p_value"]


# ---------------------------------------------------------------------------------------------
# usable properties


def test_usable_properties_skip_constants_rare_levels_and_identifiers() -> None:
    n = 40
    rng = np.random.default_rng(0)
    table = _table(
        {
            "good": rng.standard_normal(n),
            "sparse": [1.0, 2.0] + [np.nan] * (n - 2),
            "group": ["a"] * 20 + ["b"] * 18 + ["rare"] * 2,
            "one_level": ["a"] * n,
            "identifier": [f"x{i}" for i in range(n)],
        },
        n,
    )
    usable = dp.usable_properties(table)
    assert "good" in usable.numeric
    assert usable.categorical == {"group": ("a", "b")}
    reasons = dict(zip(usable.skipped["property"], usable.skipped["reason"], strict=True))
    assert "2 stimuli" in reasons["sparse"]
    assert "same value" in reasons["n_captions"]
    assert "a comparison needs 2" in reasons["one_level"]
    assert "a comparison needs 2" in reasons["identifier"]


# ---------------------------------------------------------------------------------------------
# planted and null runs


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic run (120 coco-mini images) whose dispersion is driven by ``planted_noise``,
    with its image properties, typicality, a null numeric and a null categorical column, and a
    categorical that splits the planted noise at its median."""
    from tests.fixtures_runs import add_properties, make_synthetic_run

    run = make_synthetic_run(tmp_path_factory.mktemp("planted"), n=120, thumbnails=False)
    rng = np.random.default_rng(11)
    noise = run.stimuli["planted_noise"].to_numpy()
    run = add_properties(
        run,
        extra={
            "null_number": rng.standard_normal(run.n_stimuli),
            "null_group": rng.choice(["p", "q", "r"], size=run.n_stimuli),
            "noise_half": np.where(noise > np.median(noise), "noisy", "quiet"),
        },
    )
    table = run.properties
    assert {"luminance_mean", "neighbour_distance:vision-a", "planted_noise"} <= set(table.names)
    analysis = dp.analyse_properties(table, run.dispersion, n_shuffles=10, seed=0)
    return run, table, analysis


def test_planted_property_is_found_first_and_nulls_are_not(planted) -> None:
    run, _, analysis = planted
    for score in ("mean", "pc1"):
        tests = analysis.tests[analysis.tests["score"] == score].set_index("property")
        top = tests[tests["rank"] == 1]
        assert top.index[0] == "planted_noise"
        assert top["q_value"].iloc[0] < 0.01
        assert top["effect"].iloc[0] > 0.8
        assert tests.loc["noise_half", "q_value"] < 0.01
        assert tests.loc["noise_half", "test"] == "kruskal_wallis"
        assert tests.loc["null_number", "q_value"] > 0.05
        assert tests.loc["null_group", "q_value"] > 0.05
        # q-values are BH of the permutation p-values of that score
        np.testing.assert_allclose(
            tests["q_value"], dp.benjamini_hochberg(tests["p_value"].to_numpy())
        )
    groups = analysis.groups[
        (analysis.groups["property"] == "noise_half") & (analysis.groups["score"] == "mean")
    ]
    assert groups["level"].tolist() == ["quiet", "noisy"]  # sorted by median dispersion
    assert groups["n_stimuli"].sum() == run.n_stimuli


def test_models_predict_held_out_dispersion_and_the_shuffled_baseline_is_zero(planted) -> None:
    _, _, analysis = planted
    fit = analysis.fit.pivot_table(index=["score", "model"], columns="metric", values="value")
    for (score, model), row in fit.iterrows():
        assert row["r2_held_out"] > 0.5, (score, model)
        assert abs(row["r2_shuffled_mean"]) < 0.15, (score, model)
        assert row["r2_shuffled_upper_95"] < row["r2_held_out"]
        assert row["p_value_vs_shuffled"] == pytest.approx(1 / 11)
    importances = analysis.importances
    top = importances[importances["rank"] == 1]
    assert set(top["property"]) == {"planted_noise"}
    predictions = analysis.predictions
    assert len(predictions) == 2 * 2 * 120  # scores × models × stimuli
    assert set(predictions["fold"]) == set(range(5))


def test_a_null_dispersion_is_predicted_by_nothing(planted) -> None:
    run, table, _ = planted
    rng = np.random.default_rng(5)
    shuffled = run.dispersion.copy()
    shuffled["mean"] = rng.permutation(shuffled["mean"].to_numpy())
    tests = dp.property_tests(table, shuffled, scores=["mean"], n_permutations=2000, seed=1)
    assert tests["q_value"].min() > 0.05
    fit, _, _ = dp.cross_validated_fit(
        table, shuffled, score="mean", models=["ridge"], n_shuffles=5, importance_repeats=0
    )
    r2 = fit.set_index("metric")["value"]
    assert r2["r2_held_out"] < 0.1


def test_results_are_reproducible_for_a_seed(planted) -> None:
    run, table, analysis = planted
    again = dp.property_tests(table, run.dispersion, seed=0)
    pd.testing.assert_frame_equal(again, analysis.tests)


def test_missing_values_are_tested_on_the_stimuli_that_have_them() -> None:
    rng = np.random.default_rng(8)
    n = 60
    y = rng.standard_normal(n)
    partial = y + 0.3 * rng.standard_normal(n)
    partial[:20] = np.nan
    table = _table({"partial": partial, "full": rng.standard_normal(n)}, n)
    tests = dp.property_tests(table, _dispersion(y), scores=["mean"], n_permutations=999)
    row = tests.set_index("property").loc["partial"]
    assert row["n_stimuli"] == 40
    from scipy.stats import spearmanr

    assert row["effect"] == pytest.approx(spearmanr(partial[20:], y[20:]).statistic)
    fit, _, _ = dp.cross_validated_fit(
        table, _dispersion(y), models=["ridge", "boosted_trees"], n_shuffles=0
    )
    assert np.isfinite(fit["value"].dropna()).all()


def test_an_infinite_property_value_is_missing_in_the_fits_as_in_the_tests() -> None:
    """log(count) of a count of 0 is -inf: the rank tests counted it missing, the cross-validated
    models passed it to scikit-learn, which refused the whole analysis."""
    rng = np.random.default_rng(9)
    n = 60
    y = rng.standard_normal(n)
    with_inf = y + 0.3 * rng.standard_normal(n)
    with_inf[:7] = -np.inf
    with_inf[7] = np.inf
    as_missing = np.where(np.isfinite(with_inf), with_inf, np.nan)
    options = {"models": ["ridge", "boosted_trees"], "n_shuffles": 2, "seed": 3}
    fits = [
        dp.cross_validated_fit(_table({"p": values, "q": y[::-1].copy()}, n), _dispersion(y),
                               **options)[0]
        for values in (with_inf, as_missing)
    ]
    pd.testing.assert_frame_equal(fits[0], fits[1])
    tests = dp.property_tests(_table({"p": with_inf}, n), _dispersion(y), scores=["mean"],
                              n_permutations=99)
    assert tests.set_index("property").loc["p", "n_stimuli"] == n - 8


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_problem() -> None:
    n = 30
    table = _table({"x": np.arange(n, dtype=float)}, n)
    with pytest.raises(ValueError, match="29 rows"):
        dp.property_tests(table, _dispersion(np.arange(n - 1.0)))
    wrong_ids = _dispersion(np.arange(n, dtype=float)).assign(id=[f"t{i}" for i in range(n)])
    with pytest.raises(ValueError, match="different stimuli"):
        dp.property_tests(table, wrong_ids)
    with pytest.raises(ValueError, match="unknown dispersion score"):
        dp.property_tests(table, _dispersion(np.arange(n, dtype=float)), scores=["median"])
    with pytest.raises(ValueError, match="n_permutations"):
        dp.property_tests(table, _dispersion(np.arange(n, dtype=float)), n_permutations=0)
    with pytest.raises(ValueError, match="unknown model"):
        dp.cross_validated_fit(table, _dispersion(np.arange(n, dtype=float)), models=["svm"])
    constant = _table({"c": np.ones(n)}, n)
    with pytest.raises(ValueError, match="no usable property"):
        dp.cross_validated_fit(constant, _dispersion(np.arange(n, dtype=float)))
    assert dp.fit_problem(constant).startswith("no usable property")
    assert dp.fit_problem(table) is None
    too_few = "30 stimuli are too few for 20-fold cross-validation"
    assert dp.fit_problem(table, n_splits=20) == too_few
    with pytest.raises(ValueError, match="30 stimuli are too few for 20-fold"):
        dp.cross_validated_fit(table, _dispersion(np.arange(n, dtype=float)), n_splits=20)

    class NoProperties:
        name, properties = "old", None

    with pytest.raises(ValueError, match="rerun the same"):
        dp.analyse_run(NoProperties())


@pytest.mark.filterwarnings("ignore:Skipping features without any observed values")
def test_permutation_importances_are_scikit_learns_numbers() -> None:
    """The transform-once importances equal sklearn.inspection.permutation_importance on the
    same fitted model, element for element: both models, missing numbers, a one-hot category,
    a numeric column the imputer dropped (all missing in the fold); a transform it does not know
    goes to scikit-learn's own loop."""
    from sklearn.compose import ColumnTransformer
    from sklearn.inspection import permutation_importance
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import PolynomialFeatures

    rng = np.random.default_rng(4)
    n = 90
    frame = pd.DataFrame({
        "a": rng.standard_normal(n), "b": rng.standard_normal(n),
        "c": pd.Series(rng.choice(["x", "y", "z", "w"], n), dtype=object),
    })
    frame.loc[:9, "a"] = np.nan
    frame.loc[5:12, "c"] = np.nan
    y = 2 * frame["b"].to_numpy() + (frame["c"] == "x") + 0.3 * rng.standard_normal(n)
    train, test = slice(0, 60), slice(60, n)
    cases = [("ridge", frame), ("boosted_trees", frame),
             ("ridge", frame.assign(empty=[np.nan] * 60 + list(rng.standard_normal(30))))]
    for name, data in cases:
        numeric = [c for c in data.columns if c != "c"]
        model = dp._make_model(name, numeric, ["c"], 0).fit(data[numeric + ["c"]].iloc[train],
                                                             y[train])
        held = data[numeric + ["c"]].iloc[test]
        assert dp._output_columns(model[-2], held) is not None, name  # the fast path
        ours = dp.permutation_importances(model, held, y[test], 4, 7)
        theirs = permutation_importance(
            model, held, y[test], scoring="r2", n_repeats=4, random_state=7
        ).importances
        np.testing.assert_array_equal(ours, theirs)
        assert ours.shape == (len(numeric) + 1, 4)
    other = Pipeline([
        ("features", ColumnTransformer([("poly", PolynomialFeatures(2), ["b"])])),
        ("ridge", Ridge()),
    ]).fit(frame[["b"]].iloc[train], y[train])
    assert dp._output_columns(other[-2], frame.iloc[test][["b"]]) is None
    np.testing.assert_array_equal(
        dp.permutation_importances(other, frame.iloc[test][["b"]], y[test], 3, 1),
        permutation_importance(other, frame.iloc[test][["b"]], y[test], scoring="r2",
                               n_repeats=3, random_state=1).importances,
    )


def test_out_of_fold_predictions_are_those_of_the_whole_model_fitted_per_fold() -> None:
    """cross_validated_fit fits each fold's transform once for every target; its out-of-fold
    predictions (real and shuffled targets) equal those of the whole pipeline fitted on each
    fold, element for element."""
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(8)
    n = 70
    table = _table({
        "noise": rng.standard_normal(n),
        "size": np.where(rng.random(n) < 0.1, np.nan, rng.random(n)),
        "kind": rng.choice(["cat", "dog", "car"], n),
    }, n)
    y = rng.standard_normal(n)
    usable = dp.usable_properties(table)
    features = dp._design(table, usable)
    folds = list(KFold(n_splits=5, shuffle=True, random_state=0).split(features))
    for name in dp.MODELS:
        designs = dp._fold_designs(name, features, folds, usable, 0)
        for target in (y, y[rng.permutation(n)]):
            reference = np.empty(n)
            for train, test in folds:
                model = dp._make_model(name, usable.numeric, list(usable.categorical), 0)
                model.fit(features.iloc[train], target[train])
                reference[test] = model.predict(features.iloc[test])
            predicted = dp._out_of_fold(name, designs, target, usable, 0)[0]
            np.testing.assert_array_equal(predicted, reference)
    _, _, predictions = dp.cross_validated_fit(table, _dispersion(y), n_shuffles=1)
    ridge = predictions[predictions["model"] == "ridge"]
    designs = dp._fold_designs("ridge", features, folds, usable, 0)
    np.testing.assert_array_equal(
        ridge["predicted"].to_numpy(), dp._out_of_fold("ridge", designs, y, usable, 0)[0]
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_constant_score_gets_no_p_value_rather_than_the_smallest() -> None:
    """ρ and H are undefined against a constant score; a NaN statistic compared as 'not extreme'
    in every permutation, which gave it p = 1 / (N + 1), the strongest evidence there is."""
    rng = np.random.default_rng(0)
    constant = np.ones(50)
    rho, p_perm, p_t = dp._spearman_tests(rng.standard_normal((50, 3)), constant, 99, rng)
    assert np.isnan(rho).all() and np.isnan(p_perm).all() and np.isnan(p_t).all()
    h, _, p_perm, _ = dp._kruskal_test(np.array(["a", "b"] * 25), constant, 99, rng)
    assert np.isnan(h) and np.isnan(p_perm)
    _, p_perm, _ = dp._spearman_tests(rng.standard_normal((50, 1)), rng.standard_normal(50), 99,
                                      rng)
    assert 0.01 <= p_perm[0] <= 1.0  # a defined ρ keeps its permutation p


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("value", [0.3, 0.0])
def test_a_constant_score_has_an_undefined_held_out_r2_and_no_p_value(value) -> None:
    """0.3 sixty times leaves a total sum of squares of ~1e-31 (its mean is not exactly 0.3),
    which gave R² = 1.0; a score of exactly 0 gave R² NaN with p = 1 / (S + 1)."""
    rng = np.random.default_rng(0)
    table = _table({"a": rng.random(60), "b": rng.random(60)}, 60)
    fit, _, _ = dp.cross_validated_fit(
        table, _dispersion(np.full(60, value)), models=("ridge",), n_shuffles=20,
        importance_repeats=0,
    )
    values = fit.set_index("metric")["value"]
    assert np.isnan(values["r2_held_out"]) and np.isnan(values["p_value_vs_shuffled"])
    assert np.isnan(dp._r2(np.full(60, value), np.full(60, value)))
    assert dp._r2(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 1.0  # a varying target keeps R²


# ---------------------------------------------------------------------------------------------
# fit metrics against a slow reference


def _slow_ridge_null(table, y, folds, n_shuffles, seed):
    """Per shuffled target (permutations drawn as cross_validated_fit draws them, one generator
    of SeedSequence([seed, 1])), the pooled held-out R² of the whole ridge pipeline fitted on
    each fold's training rows."""
    from sklearn.metrics import r2_score

    usable = dp.usable_properties(table)
    features = dp._design(table, usable)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    null = []
    for _ in range(n_shuffles):
        target = y[rng.permutation(y.size)]
        predicted = np.empty(y.size)
        for train, test in folds:
            model = dp._make_model("ridge", usable.numeric, list(usable.categorical), seed)
            model.fit(features.iloc[train], target[train])
            predicted[test] = model.predict(features.iloc[test])
        null.append(r2_score(target, predicted))
    return np.array(null)


def test_fit_metrics_match_a_slow_fit_on_train_score_on_held_out_reference() -> None:
    """Planted: dispersion = 0.6·p0 + noise. Against a slow reference (the whole ridge pipeline
    fitted on each fold's training rows): per-fold R² is scored on the HELD-OUT rows
    (r2_fold_mean / r2_fold_sd), r2_held_out is the pooled 1 − SS_res/SS_tot over the returned
    out-of-fold predictions (not the mean of fold R²), and the shuffled-target null is S
    independent permutations (sd > 0) with r2_shuffled_upper_95 its 95th percentile."""
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(3)
    n, seed, n_shuffles = 60, 0, 19
    columns = {f"p{j}": rng.standard_normal(n) for j in range(3)}
    table = _table(columns, n)
    y = 0.6 * columns["p0"] + rng.standard_normal(n)
    fit, _, predictions = dp.cross_validated_fit(
        table, _dispersion(y), models=("ridge",), n_shuffles=n_shuffles, importance_repeats=0,
        seed=seed,
    )
    metrics = fit.set_index("metric")["value"]
    # pooled held-out R² over the returned out-of-fold predictions
    np.testing.assert_array_equal(predictions["observed"].to_numpy(), y)
    pooled = r2_score(y, predictions["predicted"].to_numpy())
    assert metrics["r2_held_out"] == pytest.approx(pooled, abs=1e-10)
    # per-fold R², fit on train, score on test
    usable = dp.usable_properties(table)
    features = dp._design(table, usable)
    folds = list(KFold(n_splits=5, shuffle=True, random_state=seed).split(features))
    fold_r2 = []
    for index, (train, test) in enumerate(folds):
        assert (predictions["fold"].to_numpy()[test] == index).all()
        model = dp._make_model("ridge", usable.numeric, list(usable.categorical), seed)
        model.fit(features.iloc[train], y[train])
        fold_r2.append(r2_score(y[test], model.predict(features.iloc[test])))
    assert metrics["r2_fold_mean"] == pytest.approx(np.mean(fold_r2), abs=1e-10)
    assert metrics["r2_fold_sd"] == pytest.approx(np.std(fold_r2, ddof=1), abs=1e-10)
    assert metrics["r2_held_out"] != pytest.approx(metrics["r2_fold_mean"], abs=1e-6)
    # the shuffled-target null
    null = _slow_ridge_null(table, y, folds, n_shuffles, seed)
    assert metrics["r2_shuffled_sd"] > 0.01
    assert metrics["r2_shuffled_mean"] == pytest.approx(null.mean(), abs=1e-10)
    assert metrics["r2_shuffled_sd"] == pytest.approx(null.std(ddof=1), abs=1e-10)
    assert metrics["r2_shuffled_upper_95"] == pytest.approx(np.percentile(null, 95), abs=1e-10)
    assert np.percentile(null, 95) != pytest.approx(np.percentile(null, 97.5), abs=1e-6)
    assert metrics["p_value_vs_shuffled"] == pytest.approx(
        (1 + np.count_nonzero(null >= pooled)) / (n_shuffles + 1)
    )


def test_per_fold_r2_on_a_null_problem_is_not_above_zero() -> None:
    """Properties unrelated to dispersion: R² scored on held-out rows is ≤ ~0 per fold on
    average (scored on the training rows it would be positive: the fit's own optimism)."""
    rng = np.random.default_rng(0)
    n = 80
    table = _table({f"p{j}": rng.standard_normal(n) for j in range(25)}, n)
    fit, _, _ = dp.cross_validated_fit(
        table, _dispersion(rng.standard_normal(n)), models=("ridge",), n_shuffles=2,
        importance_repeats=0,
    )
    metrics = fit.set_index("metric")["value"]
    assert metrics["r2_fold_mean"] < 0.02
    assert metrics["r2_held_out"] < 0.02
