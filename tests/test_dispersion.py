"""Dispersion scores and the residual PCA."""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core.dispersion import SCORES, dispersion_scores, rank_column, residual_pca
from convergence_core.procrustes import generalized_procrustes


def test_planted_outlier_has_the_highest_dispersion() -> None:
    rng = np.random.default_rng(0)
    m, latent = 60, 6
    base = rng.standard_normal((m, latent))
    embeddings = [base @ rng.standard_normal((latent, d)) + 0.05 * rng.standard_normal((m, d)) for d in (8, 12, 10, 9)]
    outlier = 17
    for i in (1, 3):  # the models disagree about this stimulus only in some models
        embeddings[i][outlier] += 3.0 * rng.standard_normal(embeddings[i].shape[1])
    residuals = generalized_procrustes(embeddings).residuals
    for method in ("mean", "pc1"):
        scores = dispersion_scores(residuals, method)
        assert scores.shape == (m,)
        assert int(np.argmax(scores)) == outlier, method


def slow_pca(R: np.ndarray):
    """PCA from the eigen-decomposition of the covariance matrix."""
    centered = R - R.mean(axis=0)
    cov = centered.T @ centered / (R.shape[0] - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order].T


def test_residual_pca_matches_covariance_eigendecomposition() -> None:
    rng = np.random.default_rng(1)
    R = np.abs(rng.standard_normal((50, 4)) @ rng.standard_normal((4, 4)))
    pca = residual_pca(R)
    values, vectors = slow_pca(R)
    np.testing.assert_allclose(pca.explained_variance, values, rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance_ratio, values / values.sum(), rtol=1e-10)
    np.testing.assert_allclose(np.abs(pca.components @ vectors.T), np.eye(4), atol=1e-8)
    np.testing.assert_allclose(pca.mean, R.mean(axis=0))
    np.testing.assert_allclose(pca.scores, (R - R.mean(axis=0)) @ pca.components.T, atol=1e-12)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-12)
    # PC1 oriented with the mean residual
    assert np.corrcoef(pca.scores[:, 0], R.mean(axis=1))[0, 1] > 0
    np.testing.assert_allclose(dispersion_scores(R, "pc1"), pca.scores[:, 0])
    np.testing.assert_allclose(dispersion_scores(R, "mean"), R.mean(axis=1))


def test_pc1_sign_follows_mean_residual_when_loadings_are_negative() -> None:
    rng = np.random.default_rng(2)
    t = rng.standard_normal(40)
    # model 0 anti-correlated with the others but with the largest loading
    R = np.column_stack([-5.0 * t, t, t, t]) + 0.01 * rng.standard_normal((40, 4))
    for flip in (1.0, -1.0):
        pca = residual_pca(flip * R)
        assert np.dot(pca.scores[:, 0], (flip * R).mean(axis=1) - (flip * R).mean()) > 0


def test_fewer_stimuli_than_models_and_constant_residuals() -> None:
    pca = residual_pca(np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]]))
    assert pca.components.shape == (3, 3) and pca.scores.shape == (2, 3)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-12)
    constant = residual_pca(np.zeros((5, 3)))
    assert np.all(constant.explained_variance_ratio == 0.0)
    assert np.all(dispersion_scores(np.zeros((5, 3)), "pc1") == 0.0)


@pytest.mark.parametrize(
    ("residuals", "method", "message"),
    [
        (np.ones((5, 3)), "median", "unknown dispersion score"),
        (np.ones(5), "mean", "must be 2-D"),
        (np.ones((1, 3)), "pc1", "at least 2"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "mean", "1 NaN"),
    ],
)
def test_bad_input_is_explained(residuals, method, message) -> None:
    with pytest.raises(ValueError, match=message):
        dispersion_scores(residuals, method)


def test_one_list_of_scores_names_the_run_columns(tmp_path) -> None:
    """A run stores a column and a rank column for every score of the one list, and nothing
    else; the run check and the pages read the same names."""
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", n=20, name="r", images=False, thumbnails=False)
    assert list(run.dispersion.columns) == ["id", *SCORES, *map(rank_column, SCORES)]
    assert rank_column("pc1") == "rank_pc1"
    for score in SCORES:
        np.testing.assert_array_equal(
            run.dispersion[score], dispersion_scores(run.gpa.residuals, score)
        )
        ranks = run.dispersion[rank_column(score)].to_numpy()
        assert np.array_equal(np.argsort(ranks), np.argsort(run.dispersion[score], kind="stable"))
    with pytest.raises(ValueError, match=r"unknown dispersion score 'median'; use one of"):
        rank_column("median")


def test_every_score_is_one_entry_that_computes_and_names_itself() -> None:
    """The one list of scores: each entry computes its own values (no score falls through to
    another's) and gives the labels the pages, charts and figures use."""
    from convergence_core.dashboard import plots
    from convergence_core.dispersion import SCORE_ENTRIES, SCORES, score_entry

    rng = np.random.default_rng(0)
    residuals = rng.random((30, 4))
    assert SCORES == tuple(SCORE_ENTRIES) == ("mean", "pc1")
    np.testing.assert_allclose(dispersion_scores(residuals, "mean"), residuals.mean(axis=1))
    pc1 = dispersion_scores(residuals, "pc1")
    centered = residuals - residuals.mean(axis=0)
    axis = np.linalg.svd(centered, full_matrices=False)[2][0]
    np.testing.assert_allclose(np.abs(pc1), np.abs(centered @ axis), atol=1e-12)
    for name in SCORES:
        entry = score_entry(name)
        assert plots.SCORE_NAME[name] == entry.label
        assert plots.SCORE_AXIS[name] == entry.axis_title
        assert entry.axis_title.endswith("(Procrustes distance)")
    with pytest.raises(ValueError, match="unknown dispersion score 'median'"):
        score_entry("median")



def test_every_component_has_its_largest_loading_positive() -> None:
    """The documented sign rule holds for every component, not only PC1 (which is oriented by
    the mean residual): the components table would otherwise show PC2+ with arbitrary signs."""
    rng = np.random.default_rng(0)
    for shape in ((30, 4), (50, 6), (3, 5)):
        pca = residual_pca(np.abs(rng.standard_normal(shape)))
        components = np.asarray(pca.components)
        for c in range(1, components.shape[0]):
            assert components[c, np.argmax(np.abs(components[c]))] > 0, (shape, c)
