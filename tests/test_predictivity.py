"""Linear predictivity: a planted linear map is recovered, shuffled pairs score at chance, and each
piece matches a brute-force reference (closed-form ridge, leave-one-out by refitting, 2AFC
loops)."""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core.predictivity import (
    cross_validated_predictions,
    linear_predictivity,
    mean_correlation,
    pooled_r2,
    predictivity_table,
    two_afc,
)


def planted(rng, n=400, dx=20, dy=10, r2=0.6):
    """Y = X W + noise with population pooled R² = r2 (X standard normal)."""
    X = rng.standard_normal((n, dx))
    W = rng.standard_normal((dx, dy)) / np.sqrt(dx)
    signal = np.trace(W.T @ W)  # E‖x W‖²
    sigma = np.sqrt(signal * (1 - r2) / r2 / dy)
    return X, X @ W + sigma * rng.standard_normal((n, dy))


def test_planted_linear_map_is_recovered_both_ways() -> None:
    rng = np.random.default_rng(0)
    X, Y = planted(rng, r2=0.6)
    forward = linear_predictivity(X, Y, source="vision", target="language")
    # finite-sample shrinkage of a 20-parameter fit on 320 rows costs a few points of R²
    assert forward.r2 == pytest.approx(0.6, abs=0.05)
    assert forward.two_afc > 0.9
    assert forward.correlation > 0.7
    assert len(forward.alphas) == 5 and forward.n_stimuli == 400
    X, Y = planted(rng, r2=0.95)
    assert linear_predictivity(X, Y).two_afc > 0.99


def test_shuffled_pairs_score_at_chance() -> None:
    rng = np.random.default_rng(1)
    X, Y = planted(rng, r2=0.8)
    result = linear_predictivity(X, Y[rng.permutation(400)])
    assert -0.1 < result.r2 < 0.02
    assert result.two_afc == pytest.approx(0.5, abs=0.04)
    assert abs(result.correlation) < 0.1


def test_rows_select_the_set() -> None:
    rng = np.random.default_rng(2)
    X, Y = planted(rng, n=200)
    rows = np.sort(rng.choice(200, 80, replace=False))
    assert linear_predictivity(X, Y, rows, seed=3) == linear_predictivity(X[rows], Y[rows], seed=3)


def loo_error(X, Y, alpha):
    """Leave-one-out squared error of ridge with intercept, by refitting n times."""
    total = 0.0
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        total += np.sum((ridge_fit_predict(X[keep], Y[keep], X[i : i + 1], alpha) - Y[i]) ** 2)
    return total


def ridge_fit_predict(X, Y, X_new, alpha):
    mx, my = X.mean(0), Y.mean(0)
    Xc = X - mx
    beta = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ (Y - my))
    return (X_new - mx) @ beta + my


def test_ridge_matches_closed_form_with_penalty_chosen_by_refitting_loo() -> None:
    rng = np.random.default_rng(4)
    X, Y = planted(rng, n=40, dx=6, dy=3, r2=0.5)
    alphas = (0.01, 1.0, 10.0, 100.0)
    P, chosen = cross_validated_predictions(X, Y, n_folds=4, alphas=alphas, seed=5)
    from sklearn.model_selection import KFold

    for (train, test), alpha in zip(KFold(4, shuffle=True, random_state=5).split(X), chosen):
        errors = [loo_error(X[train], Y[train], a) for a in alphas]
        assert alpha == alphas[int(np.argmin(errors))]
        np.testing.assert_allclose(
            P[test], ridge_fit_predict(X[train], Y[train], X[test], alpha), rtol=1e-8
        )


def test_wide_sources_give_the_predictions_of_ridge_on_the_raw_features() -> None:
    """d_x > s: the source is used in its row-space coordinates; every held-out prediction and
    chosen penalty equal scikit-learn's RidgeCV on the raw wide features, fold by fold."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(3)
    X, Y = planted(rng, n=40, dx=150, dy=7)
    X = X + 2.0  # an offset: the intercept must be handled the same way
    predictions, chosen = cross_validated_predictions(X, Y, n_folds=4, seed=1)
    expected = np.empty_like(Y)
    alphas = []
    for train, test in KFold(4, shuffle=True, random_state=1).split(X):
        model = RidgeCV(alphas=tuple(10.0**p for p in range(-8, 9))).fit(X[train], Y[train])
        expected[test] = model.predict(X[test])
        alphas.append(float(model.alpha_))
    np.testing.assert_allclose(predictions, expected, atol=1e-8)
    assert chosen == tuple(alphas)


def test_scores_match_brute_force() -> None:
    rng = np.random.default_rng(6)
    Y = rng.standard_normal((30, 5))
    P = Y + rng.standard_normal((30, 5))
    assert pooled_r2(Y, P) == pytest.approx(1 - np.sum((Y - P) ** 2) / np.sum((Y - Y.mean(0)) ** 2))
    assert mean_correlation(Y, P) == pytest.approx(
        np.mean([np.corrcoef(Y[:, j], P[:, j])[0, 1] for j in range(5)])
    )
    for distance, sim in (
        ("correlation", lambda a, b: np.corrcoef(a, b)[0, 1]),
        ("cosine", lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
        ("euclidean", lambda a, b: -np.linalg.norm(a - b)),
    ):
        wins = [
            (sim(P[i], Y[i]) > sim(P[i], Y[j])) + 0.5 * (sim(P[i], Y[i]) == sim(P[i], Y[j]))
            for i in range(30)
            for j in range(30)
            if j != i
        ]
        assert two_afc(P, Y, distance=distance) == pytest.approx(np.mean(wins), abs=1e-12)
        # every other stimulus as a foil: the same pairs, drawn
        assert two_afc(P, Y, distance=distance, n_foils=29) == pytest.approx(
            np.mean(wins), abs=1e-12
        )
    assert 0.4 < two_afc(P, Y, n_foils=5, seed=1) <= 1.0


def test_euclidean_all_pairs_stay_within_the_block_budget(monkeypatch) -> None:
    """All pairs by Euclidean distance took rows one at a time but each row's (s, d) differences
    whole: 154 MB at s = 25,000, d = 768, above the block budget (from a review). The budget
    shrunk below one row's differences: the same score, never an array above the budget."""
    from convergence_core import predictivity

    rng = np.random.default_rng(13)
    Y = rng.standard_normal((40, 6))
    P = Y + rng.standard_normal((40, 6))
    expected = two_afc(P, Y, distance="euclidean")
    budget = 60  # elements: 10 targets' differences at a time, of one row's 40
    monkeypatch.setattr(predictivity, "_BLOCK_ELEMENTS", budget)
    largest = []
    norm = np.linalg.norm

    def recording_norm(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        largest.append(np.size(x))
        return norm(x, *args, **kwargs)

    monkeypatch.setattr(predictivity.np.linalg, "norm", recording_norm)
    assert two_afc(P, Y, distance="euclidean") == pytest.approx(expected, abs=1e-12)
    assert largest and max(largest) <= budget


def _row_fractions(P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Each row's all-pairs 2AFC fraction (correlation), brute force."""
    sims = np.corrcoef(P, Y)[: len(P), len(P) :]
    own = np.diag(sims)[:, None]
    wins = (own > sims) + 0.5 * (own == sims)
    np.fill_diagonal(wins, 0.0)
    return wins.sum(axis=1) / (len(P) - 1)


def test_sampled_foils_are_exactly_n_foils_others_per_stimulus() -> None:
    """Each stimulus meets exactly n_foils distinct others, never itself: predictions equal to
    their (distinct) targets win every comparison, so the score is 1 exactly (a stimulus drawn as
    its own foil would tie, half a vote; one foil too many or too few moves the mean off 1)."""
    rng = np.random.default_rng(9)
    Y = rng.standard_normal((150, 7))
    for distance in ("correlation", "cosine", "euclidean"):
        for foils in (1, 13, 64, 148, 149):
            for seed in range(3):
                assert two_afc(Y, Y, distance=distance, n_foils=foils, seed=seed) == 1.0
    # two copies of each target: each copy of a stimulus as its foil is a tie, half a vote
    twice = np.concatenate([Y, Y])
    expected = 1 - 0.5 / 299  # all pairs: of 299 others, one is the twin
    assert two_afc(twice, twice, distance="cosine") == pytest.approx(expected, abs=1e-12)
    assert two_afc(twice, twice, distance="cosine", n_foils=299) == pytest.approx(
        expected, abs=1e-12
    )


def test_sampled_2afc_is_unbiased_with_the_binomial_spread() -> None:
    """The sampled score is the mean of s·F comparisons, each row's foils a uniform draw of F of
    its s − 1 others: centred on the all-pairs score, with the standard deviation of independent
    draws, √(Σ pᵢ(1 − pᵢ)/F)/s (foils shared by a block of rows add none that shows here)."""
    rng = np.random.default_rng(10)
    s, foils = 240, 12
    Y = rng.standard_normal((s, 6))
    P = Y + 1.3 * rng.standard_normal((s, 6))
    full = two_afc(P, Y)
    p = _row_fractions(P, Y)
    assert p.mean() == pytest.approx(full, abs=1e-12)
    spread = np.sqrt(np.sum(p * (1 - p)) / foils) / s
    sampled = np.array([two_afc(P, Y, n_foils=foils, seed=seed) for seed in range(200)])
    assert abs(sampled.mean() - full) < 4 * spread / np.sqrt(sampled.size)
    assert 0.8 < sampled.std(ddof=1) / spread < 1.2
    assert two_afc(P, Y, n_foils=foils, seed=3) == two_afc(P, Y, n_foils=foils, seed=3)


def test_two_afc_ties_count_half() -> None:
    Y = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # rows 0 and 1 are identical: their pair is a tie both ways
    assert two_afc(Y, Y, distance="cosine") == pytest.approx((1 + 0.5 + 0.5 + 1 + 1 + 1) / 6)


def test_a_target_and_its_duplicate_tie_whatever_the_rounding() -> None:
    """Stimuli present twice (same image, same caption): a prediction is as near one copy of its
    target as the other, half a vote. BLAS put such pairs an ulp apart, a whole vote either way
    (from the third audit)."""
    rng = np.random.default_rng(0)
    for n, d in ((333, 17), (500, 64)):
        Y = rng.standard_normal((n, d))
        P = Y + 0.3 * rng.standard_normal((n, d))
        Y[-8:], P[-8:] = Y[:8], P[:8]  # 8 stimuli twice
        Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
        Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
        sims = np.einsum("id,jd->ij", Pn, Yn)  # no BLAS: one product per pair
        own = np.diag(sims)[:, None]
        votes = (own > sims).astype(float)
        twins = np.r_[0:8, n - 8 : n]
        votes[twins, np.r_[n - 8 : n, 0:8]] = 0.5  # an exact tie with its twin
        np.fill_diagonal(votes, 0.0)
        expected = votes.sum() / (n * (n - 1))
        assert two_afc(P, Y, distance="cosine") == pytest.approx(expected, abs=1e-12), (n, d)


def _reference_predictions(X, Y, n_folds, alphas, seed):
    """Held-out predictions of closed-form ridge, each fold's penalty chosen by refitting
    leave-one-out: the slow reference of :func:`cross_validated_predictions`."""
    from sklearn.model_selection import KFold

    P = np.empty_like(Y)
    for train, test in KFold(n_folds, shuffle=True, random_state=seed).split(X):
        errors = [loo_error(X[train], Y[train], a) for a in alphas]
        alpha = alphas[int(np.argmin(errors))]
        P[test] = ridge_fit_predict(X[train], Y[train], X[test], alpha)
    return P


def _brute_two_afc(P, Y, sim):
    s = len(P)
    wins = [
        (sim(P[i], Y[i]) > sim(P[i], Y[j])) + 0.5 * (sim(P[i], Y[i]) == sim(P[i], Y[j]))
        for i in range(s)
        for j in range(s)
        if j != i
    ]
    return float(np.mean(wins))


@pytest.mark.parametrize("dx", [3, 30])  # a source narrower and wider than the training rows
def test_a_one_feature_model_is_predicted_and_predicts(dx: int) -> None:
    """A model with one feature, as target (from a narrow or a wide source) and as source: the
    held-out predictions and scores equal closed-form ridge with refitted leave-one-out, fold by
    fold. Before, a one-column target from a wide source failed with "value array of shape (3,)
    could not be broadcast to indexing result of shape (3,1)" (scikit-learn's RidgeCV returns a
    1-D map for one column), and the report lost linear predictivity for every pair."""
    rng = np.random.default_rng(11)
    X, Y = planted(rng, n=15, dx=dx, dy=1, r2=0.7)
    alphas = (0.01, 1.0, 100.0)
    for source, target in ((X, Y), (Y, X)):
        P, _ = cross_validated_predictions(source, target, n_folds=5, alphas=alphas, seed=2)
        expected = _reference_predictions(source, target, 5, alphas, 2)
        assert P.shape == target.shape
        np.testing.assert_allclose(P, expected, rtol=1e-7, atol=1e-9)
        result = linear_predictivity(source, target, n_folds=5, alphas=alphas, seed=2)
        assert result.r2 == pytest.approx(
            1 - np.sum((target - expected) ** 2) / np.sum((target - target.mean(0)) ** 2)
        )
        assert result.correlation == pytest.approx(
            np.mean([np.corrcoef(target[:, j], expected[:, j])[0, 1]
                     for j in range(target.shape[1])])
        )
        if target.shape[1] > 1:
            assert result.two_afc == pytest.approx(
                _brute_two_afc(expected, target, lambda a, b: np.corrcoef(a, b)[0, 1]),
                abs=1e-12,
            )
        else:  # no correlation across one dimension: undefined, not ½
            assert np.isnan(result.two_afc)
            assert two_afc(expected, target, distance="euclidean") == pytest.approx(
                _brute_two_afc(expected, target, lambda a, b: -abs(a[0] - b[0])), abs=1e-12
            )
    table = predictivity_table(X, Y, n_folds=5, alphas=alphas, seed=2)
    assert table["value"].notna().sum() == 5  # all but vision → language (one feature) 2AFC


def test_predictivity_table_is_long_and_has_both_directions() -> None:
    rng = np.random.default_rng(7)
    X, Y = planted(rng, n=60, dx=5, dy=4)
    table = predictivity_table(X, Y, n_folds=3)
    assert list(table.columns) == [
        "source",
        "target",
        "metric",
        "value",
        "n_stimuli",
        "n_folds",
        "median_alpha",
    ]
    assert set(zip(table.source, table.target)) == {("vision", "language"), ("language", "vision")}
    assert sorted(table.metric.unique()) == ["correlation", "r2", "two_afc"]


def test_median_alpha_is_the_median_of_the_fold_alphas(monkeypatch) -> None:
    """``median_alpha`` is np.median of the per-fold α (catches the mean, which one outlying fold
    drags up by orders of magnitude)."""
    import dataclasses

    from convergence_core import predictivity

    # real folds whose α differ by orders of magnitude (median 1e3, mean 4e7)
    rng = np.random.default_rng(21)
    V = rng.standard_normal((30, 10))
    L = V @ rng.standard_normal((10, 12)) + 6 * rng.standard_normal((30, 12))
    alphas = linear_predictivity(V, L).alphas
    assert np.median(alphas) != pytest.approx(np.mean(alphas))
    table = predictivity_table(V, L).set_index(["source", "metric"])
    assert table.loc[("vision", "r2"), "median_alpha"] == np.median(alphas)
    # planted fold α (odd and even fold counts)
    planted_alphas = {"vision": (0.1, 1.0, 1.0, 10.0, 1e6), "language": (1e3, 1e-2, 1e3, 1e8)}
    real = predictivity.linear_predictivity

    def with_planted_alphas(*args, **kwargs):
        result = real(*args, **kwargs)
        return dataclasses.replace(result, alphas=planted_alphas[result.source])

    monkeypatch.setattr(predictivity, "linear_predictivity", with_planted_alphas)
    X, Y = planted(np.random.default_rng(7), n=40, dx=5, dy=4)
    table = predictivity_table(X, Y, n_folds=3).set_index(["source", "metric"])
    for metric in ("r2", "correlation", "two_afc"):
        assert table.loc[("vision", metric), "median_alpha"] == 1.0
        assert table.loc[("language", metric), "median_alpha"] == 1e3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda X, Y: linear_predictivity(X, Y, n_folds=1), "n_folds must be an integer >= 2"),
        (lambda X, Y: linear_predictivity(X[:7], Y[:7]), "too few for 5-fold"),
        (lambda X, Y: linear_predictivity(X, Y, alphas=[1.0, -1.0]), "positive finite"),
        (lambda X, Y: linear_predictivity(X, Y, distance="manhattan"), "distance must be one of"),
        (lambda X, Y: linear_predictivity(X, Y, n_foils=40), "n_foils must be"),
        (lambda X, Y: linear_predictivity(X, Y[:-1]), "same stimuli"),
        (lambda X, Y: linear_predictivity(X, Y, rows=[0, 0, 1]), "more than once"),
    ],
)
def test_bad_input_is_explained(call, message: str) -> None:
    X, Y = planted(np.random.default_rng(8), n=40, dx=4, dy=3)
    with pytest.raises(ValueError, match=message):
        call(X, Y)
