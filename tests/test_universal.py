"""Universal space across modalities: exact rotations give zero residuals, the learned maps
reproduce GPA and generalise to held-out rows, cross-modal dispersion as defined, the permutation
test of its relation to intra-modal dispersion, and errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from convergence_core import stats, universal
from convergence_core.procrustes import generalized_procrustes
from convergence_core.shuffles import permutations
from convergence_core.universal import (
    Member,
    cross_modal_analysis,
    cross_modal_dispersion,
    dispersion_relation,
    fit_universal_space,
    modality_means,
)
from tests.fixtures_runs import make_synthetic_run


def isometry(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """(k, d), orthonormal rows: R^k into R^d."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T


THREE_MODALITIES = [
    Member("cam-a", "final", "vision"),
    Member("cam-b", "final", "vision"),
    Member("text-a", "last", "language"),
    Member("v1-subject1", "roi", "brain"),
]


def rotated_copies(n: int = 40, k: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Four models that are exact isometric images of one latent (different widths, shifts and
    overall scales): vision ×2, language, brain."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, k))
    widths, scales = (6, 9, 11, 15), (1.0, 3.0, 0.2, 7.0)
    return [
        scale * latent @ isometry(rng, k, d) + rng.standard_normal(d)
        for d, scale in zip(widths, scales, strict=True)
    ]


def test_exact_rotations_give_zero_residuals_across_modalities():
    features = rotated_copies()
    analysis = cross_modal_analysis(features, THREE_MODALITIES)
    assert analysis.residuals["value"].abs().max() < 1e-10
    wide = analysis.per_stimulus()
    assert wide["cross_modal_dispersion"].abs().max() < 1e-10
    assert {c for c in wide.columns if c.startswith("distance ")} == {
        "distance vision|language",
        "distance vision|brain",
        "distance language|brain",
    }
    # and a second latent makes the residuals non-zero: the test can fail
    rng = np.random.default_rng(5)
    features[2] = features[2] + 0.5 * rng.standard_normal(features[2].shape)
    noisy = cross_modal_analysis(features, THREE_MODALITIES)
    assert noisy.residuals["value"].max() > 1e-3


def test_exact_rotations_map_held_out_rows_onto_each_other():
    features = rotated_copies(n=60)
    train, test = np.arange(40), np.arange(40, 60)
    fit = fit_universal_space([x[train] for x in features], THREE_MODALITIES)
    mapped = [fit.transform(i, x[test]) for i, x in enumerate(features)]
    for other in mapped[1:]:
        np.testing.assert_allclose(other, mapped[0], atol=1e-10)
    assert np.linalg.norm(mapped[0]) > 0.1


@pytest.mark.parametrize("widths", [(5, 8, 12), (30, 45, 25)], ids=["narrow", "wider-than-n"])
def test_maps_reproduce_the_training_alignment(widths):
    rng = np.random.default_rng(1)
    n = 20
    latent = rng.standard_normal((n, 4))
    features = [
        latent @ rng.standard_normal((4, d)) + 0.3 * rng.standard_normal((n, d)) for d in widths
    ]
    members = [Member(f"m{i}", "l", "vision" if i < 2 else "language") for i in range(3)]
    fit = fit_universal_space(features, members)
    for i, x in enumerate(features):
        np.testing.assert_allclose(fit.transform(i, x), fit.gpa.aligned[i], atol=1e-10)
        basis, rotation = fit.bases[i], fit.rotations[i]
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(rotation.shape[0]), atol=1e-10)
        assert basis.shape[1] == min(n - 1, widths[i])
    # the space's residuals are those of GPA on the raw features (no information dropped)
    plain = generalized_procrustes(features)
    np.testing.assert_allclose(fit.gpa.residuals, plain.residuals, atol=1e-7)


def test_rows_outside_the_training_span_map_to_the_origin():
    rng = np.random.default_rng(2)
    n, d = 10, 30  # d > n: the training rows span at most n - 1 directions
    features = [rng.standard_normal((n, d)), rng.standard_normal((n, 12))]
    members = [Member("wide", "l", "vision"), Member("other", "l", "language")]
    fit = fit_universal_space(features, members)
    centred = features[0] - features[0].mean(axis=0)
    _, _, vt = np.linalg.svd(centred)
    outside = vt[-1]  # orthogonal to every centred training row
    assert np.abs(centred @ outside).max() < 1e-10
    moved = fit.transform(0, (fit.means[0] + 5.0 * outside)[None])
    np.testing.assert_allclose(moved, 0.0, atol=1e-12)


def test_fit_is_invariant_to_rotation_scale_and_shift_of_a_model():
    rng = np.random.default_rng(3)
    n = 50
    latent = rng.standard_normal((n, 5))
    features = [latent @ rng.standard_normal((5, d)) + rng.standard_normal((n, d)) for d in (7, 9)]
    members = [Member("a", "l", "vision"), Member("b", "l", "language")]
    train, test = np.arange(35), np.arange(35, n)
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    changed = [features[0], 4.0 * features[1] @ q + 2.0]

    def held_out_distances(feats):
        fit = fit_universal_space([x[train] for x in feats], members, tol=1e-14)
        a, b = (fit.transform(i, x[test]) for i, x in enumerate(feats))
        return np.linalg.norm(a[:, None] - b[None], axis=2)

    np.testing.assert_allclose(held_out_distances(changed), held_out_distances(features), atol=1e-7)


def test_both_principal_axis_routes_and_blocks_agree(monkeypatch):
    rng = np.random.default_rng(4)
    n = 60
    latent = rng.standard_normal((n, 3))
    # model 0 has rank 3 in 8 columns: both routes must drop the 5 null directions
    features = [latent @ rng.standard_normal((3, 8)), rng.standard_normal((n, 6))]
    members = [Member("low-rank", "l", "vision"), Member("b", "l", "language")]
    monkeypatch.setattr(universal, "_SCATTER_ROUTE_RATIO", 10**6)  # always the SVD
    by_svd = fit_universal_space(features, members)
    monkeypatch.setattr(universal, "_SCATTER_ROUTE_RATIO", 0)  # always the scatter matrix
    monkeypatch.setattr(universal, "_ROW_BLOCK", 7)
    by_scatter = fit_universal_space(features, members)
    assert by_svd.bases[0].shape[1] == by_scatter.bases[0].shape[1] == 3
    np.testing.assert_allclose(by_scatter.gpa.residuals, by_svd.gpa.residuals, atol=1e-8)
    for i, x in enumerate(features):
        grams = [f.transform(i, x) @ f.transform(i, x).T for f in (by_scatter, by_svd)]
        np.testing.assert_allclose(grams[0], grams[1], atol=1e-10)


def test_n_components_keeps_the_leading_axes():
    rng = np.random.default_rng(6)
    features = [rng.standard_normal((30, 10)) * np.arange(10, 0, -1), rng.standard_normal((30, 8))]
    members = [Member("a", "l", "vision"), Member("b", "l", "language")]
    fit = fit_universal_space(features, members, n_components=3)
    assert [b.shape[1] for b in fit.bases] == [3, 3]
    assert fit.width == 3
    variances = np.var((features[0] - fit.means[0]) @ fit.bases[0], axis=0)
    assert np.all(np.diff(variances) <= 0)


def test_cross_modal_dispersion_is_the_distance_between_modality_means():
    rng = np.random.default_rng(7)
    aligned = [rng.standard_normal((12, 4)) for _ in THREE_MODALITIES]
    means = modality_means(aligned, THREE_MODALITIES)
    assert list(means) == ["vision", "language", "brain"]
    np.testing.assert_allclose(means["vision"], (aligned[0] + aligned[1]) / 2)
    dispersion, pairs = cross_modal_dispersion(means)
    expected_pairs = {
        ("vision", "language"): np.linalg.norm(means["vision"] - aligned[2], axis=1),
        ("vision", "brain"): np.linalg.norm(means["vision"] - aligned[3], axis=1),
        ("language", "brain"): np.linalg.norm(aligned[2] - aligned[3], axis=1),
    }
    for key, value in expected_pairs.items():
        np.testing.assert_allclose(pairs[key], value)
    rms = np.sqrt(sum(v**2 for v in expected_pairs.values()) / 3)
    np.testing.assert_allclose(dispersion, rms)
    two, _ = cross_modal_dispersion({k: means[k] for k in ("vision", "language")})
    np.testing.assert_allclose(two, expected_pairs[("vision", "language")])


def reference_permutation_p(x, y, n_permutations, seed):
    """Slow: scipy's Spearman on every shuffle, the same shuffles as the implementation (drawn
    here in one call: the implementation's blocks continue one stream of uniforms)."""
    rho = spearmanr(x, y).statistic
    shuffles = permutations(len(y), n_permutations, np.random.default_rng(seed))
    null = np.array([spearmanr(x, y[rows]).statistic for rows in shuffles])
    return rho, (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (n_permutations + 1)


def test_dispersion_relation_matches_a_slow_reference(monkeypatch):
    rng = np.random.default_rng(8)
    x = rng.standard_normal(40)
    y = 0.3 * x + rng.standard_normal(40)
    y[:4] = y[0]  # ties get average ranks, as in scipy
    monkeypatch.setattr(stats, "_PERMUTATION_BLOCK_ELEMENTS", 7 * 40)  # several blocks
    result = dispersion_relation(x, y, n_permutations=50, seed=3)
    rho, p = reference_permutation_p(x, y, 50, 3)
    assert result["spearman_rho"] == pytest.approx(rho, abs=1e-12)
    assert result["permutation_p_value_two_sided"] == pytest.approx(p)


def test_dispersion_relation_finds_a_planted_monotone_relation_and_not_an_absent_one():
    rng = np.random.default_rng(9)
    x = rng.uniform(size=200)
    planted = dispersion_relation(
        x, np.exp(x) + 0.05 * rng.standard_normal(200), n_permutations=200
    )
    assert planted["spearman_rho"] > 0.9
    assert planted["permutation_p_value_two_sided"] == pytest.approx(1 / 201)
    absent = dispersion_relation(x, rng.uniform(size=200), n_permutations=200, seed=1)
    assert abs(absent["spearman_rho"]) < 0.2
    assert absent["permutation_p_value_two_sided"] > 0.01


def test_bad_input_names_the_problem():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((10, 3))
    a, b = Member("a", "l", "vision"), Member("b", "l", "language")
    with pytest.raises(ValueError, match="at least 2 models"):
        fit_universal_space([x], [a])
    with pytest.raises(ValueError, match="row counts differ"):
        fit_universal_space([x, x[:8]], [a, b])
    with pytest.raises(ValueError, match="appears twice"):
        fit_universal_space([x, x], [a, a])
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_universal_space([x, bad], [a, b])
    with pytest.raises(ValueError, match="identical for every stimulus"):
        fit_universal_space([x, np.ones((10, 3))], [a, b])
    with pytest.raises(ValueError, match="n_components"):
        fit_universal_space([x, x + 1], [a, b], n_components=0)
    with pytest.raises(ValueError, match="2-D"):
        fit_universal_space([x, x[:, 0]], [a, b])
    with pytest.raises(ValueError, match="at least 2 modalities"):
        cross_modal_analysis([x, 2 * x], [a, Member("c", "l", "vision")])
    with pytest.raises(ValueError, match="one per stimulus"):
        cross_modal_analysis([x, 2 * x], [a, b], intra_modal=np.ones(4))
    fit = fit_universal_space([x, x @ rng.standard_normal((3, 3))], [a, b])
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        fit.transform(0, np.ones((2, 4)))


def test_run_level_analysis_on_a_planted_run(tmp_path):
    run = make_synthetic_run(tmp_path, 60, images=False, thumbnails=False)
    analysis = universal.run_cross_modal_analysis(run, n_permutations=200)
    assert len(analysis.residuals) == 60 * len(run.models)
    assert set(analysis.residuals["modality"]) == {"vision", "language"}
    wide = analysis.per_stimulus()
    assert list(wide["id"]) == list(run.stimuli["id"])
    np.testing.assert_allclose(
        wide["intra_modal_dispersion"], run.dispersion["mean"].to_numpy(), rtol=1e-12
    )
    relation = analysis.relation.iloc[0]
    assert relation["y"] == "vision_dispersion_mean" and relation["n_stimuli"] == 60
    # planted: one per-stimulus noise level drives both the vision models' disagreement and the
    # captions' distance from the images
    assert relation["spearman_rho"] > 0.3
    assert relation["permutation_p_value_two_sided"] < 0.05
    rho_noise = spearmanr(wide["cross_modal_dispersion"], run.stimuli["planted_noise"]).statistic
    assert rho_noise > 0.3
    chosen = universal.run_cross_modal_analysis(
        run, ["vision-a", "language-b"], layers={"language-b": "layer2"}, n_permutations=20
    )
    assert [m.layer for m in chosen.fit.members] == ["stage2", "layer2"]
    with pytest.raises(ValueError, match="not a layer"):
        universal.run_members(run, ["vision-a"], {"vision-a": "nope"})
    with pytest.raises(ValueError, match="not chosen"):
        universal.run_members(run, ["vision-a"], {"language-a": "layer1"})


def test_model_summary_averages_each_members_residuals():
    features = rotated_copies()
    rng = np.random.default_rng(12)
    features = [x + 0.1 * rng.standard_normal(x.shape) for x in features]
    analysis = cross_modal_analysis(features, THREE_MODALITIES)
    summary = analysis.model_summary()
    assert list(summary["model"]) == [m.model for m in THREE_MODALITIES]
    np.testing.assert_allclose(summary["mean_residual"], analysis.fit.gpa.residuals.mean(axis=0))


def test_cross_modal_analysis_checks_its_input_before_the_fit(monkeypatch):
    """One modality, ids or intra_modal of the wrong length and n_permutations = 0 were refused
    only after fit_universal_space (minutes on a large run)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((10, 3))
    a, b = Member("a", "l", "vision"), Member("b", "l", "language")

    def no_fit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("fit_universal_space ran before the input was checked")

    monkeypatch.setattr(universal, "fit_universal_space", no_fit)
    for match, members, options in (
        ("at least 2 modalities", [a, Member("c", "l", "vision")], {}),
        ("got 4 ids for 10 stimuli", [a, b], {"ids": list("abcd")}),
        ("intra_modal has 4 values for 10", [a, b], {"intra_modal": np.ones(4)}),
        ("n_permutations must be an integer >= 1", [a, b],
         {"intra_modal": np.ones(10), "n_permutations": 0}),
        ("intra_modal has 1 NaN or Inf values .first at stimulus 3", [a, b],
         {"intra_modal": np.where(np.arange(10) == 3, np.nan, 1.0)}),
    ):
        with pytest.raises(ValueError, match=match):
            cross_modal_analysis([x, 2 * x], members, **options)
