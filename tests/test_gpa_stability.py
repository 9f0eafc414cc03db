"""The GPA stability diagnostic: planted answers (exact rotations: no spread; a shared latent plus
noise: a measurable spread), its consistency with GPA itself, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from convergence_core.gpa_stability import GPAStability, gpa_stability
from convergence_core.procrustes import generalized_procrustes


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def planted(seed=0, noise=1.0, m=300, latent=24, dims=(48, 32, 40, 48)):
    """Issue 11's planted set: 4 models of width 48/32/40/48, 300 stimuli, a 24-d shared latent
    plus model-specific noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, latent))
    return [z @ rng.standard_normal((latent, d)) + noise * rng.standard_normal((m, d)) for d in dims]


def test_exact_rotations_of_one_model_have_no_spread() -> None:
    """Every model is the same configuration rotated (and shifted, scaled): every start reaches
    loss 0 with residuals 0, so nothing spreads and the ranking is undefined (NaN). "Zero" is to
    the square root of the loss's rounding (~1e-15): residuals ~sqrt(loss), so ≤ 1e-7."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 8))
    embeddings = [x @ random_orthogonal(rng, 8) * s + 3.0 for s in (1.0, 2.0, 0.5, 7.0)]
    stability = gpa_stability(embeddings, n_starts=3, seed=2)
    assert isinstance(stability, GPAStability)
    np.testing.assert_allclose(stability.losses, 0.0, atol=1e-14)
    assert stability.residual_spread.max() < 1e-7
    assert stability.dispersion_spread.max() < 1e-7
    assert stability.dispersion.max() < 1e-12  # the reference (Gower's start) is exact
    assert np.all(np.isnan(stability.spearman))
    assert stability.same_optimum.all()


def test_planted_set_has_a_measurable_spread_and_a_stable_ranking() -> None:
    """The shared latent fixes the ranking (ρ close to 1), but the residuals are not pinned:
    random starts end up to several 1e-6 apart in loss (other local minima) with dispersions up to
    ~1 % apart, while solutions at the same minimum agree to ~3e-7; the reference stopped moving
    its residuals long before they were that uncertain."""
    stability = gpa_stability(planted(), n_starts=4, seed=0)
    summary = stability.summary()
    assert stability.residual_spread.shape == (300, 4) and stability.spearman.shape == (4,)
    assert 1e-3 < summary["max_relative_dispersion_spread"] < 0.1  # measurable, and bounded
    assert summary["min_spearman"] > 0.999
    assert 0 < summary["loss_range"] < 1e-4
    assert stability.converged.all()
    # solutions at the lowest minimum (here the reference and 3 of the 4 starts) agree to ~3e-7
    assert summary["solutions_at_best_optimum"] >= 2 and summary["reference_at_best_optimum"] == 1
    assert summary["max_relative_dispersion_spread_at_best"] < 1e-4
    assert summary["max_relative_dispersion_spread_at_best"] < summary["max_relative_dispersion_spread"] / 100
    assert summary["last_step_over_spread"] < 1e-2
    assert summary["max_rank_interval"] >= 1


def test_reference_is_the_gpa_result_and_spreads_are_consistent() -> None:
    """Index 0 is GPA's own result (same start, same stopping rule); the spread is the range over
    the solutions, so it contains every pairwise difference, and every rank interval contains the
    reference's rank."""
    embeddings = planted(seed=3, m=120, dims=(20, 16, 24, 20), latent=8)
    stability = gpa_stability(embeddings, n_starts=2, seed=5, models=("a", "b", "c", "d"))
    result = generalized_procrustes(embeddings)
    np.testing.assert_allclose(stability.dispersion, result.residuals.mean(axis=1), atol=1e-10)
    assert stability.losses[0] == pytest.approx(result.loss_history[-1], abs=1e-15)
    assert stability.n_iter[0] == result.n_iter
    ranks = np.argsort(np.argsort(stability.dispersion, kind="stable"), kind="stable")
    assert np.all(stability.rank_low <= ranks) and np.all(ranks <= stability.rank_high)
    assert np.all(stability.residual_spread >= 0) and np.all(stability.last_step >= 0)
    if stability.same_optimum.sum() >= 2:
        assert np.all(stability.dispersion_spread_at_best <= stability.dispersion_spread + 1e-16)
    else:  # one solution at the lowest minimum: no spread there to measure
        assert np.isnan(stability.dispersion_spread_at_best).all()
    # the reference's last iteration moved its residuals by at most the last step
    assert stability.last_step.max() < 1e-4
    assert np.all((-1 <= stability.spearman) & (stability.spearman <= 1))
    assert stability.models == ("a", "b", "c", "d")


def test_progress_reports_every_solution_and_iteration_without_changing_them() -> None:
    """The progress callbacks (precompute's sign of life at 100,000 stimuli) see every
    iteration of GPA and every solution of the diagnostic, and change neither."""
    embeddings = planted(seed=3, m=120, dims=(20, 16, 24, 20), latent=8)
    iterations: list[int] = []
    result = generalized_procrustes(embeddings, progress=iterations.append)
    assert iterations == list(range(1, result.n_iter + 1))
    np.testing.assert_array_equal(
        result.loss_history, generalized_procrustes(embeddings).loss_history
    )
    solutions: list[tuple[int, int]] = []
    stability = gpa_stability(embeddings, n_starts=2, seed=5,
                              progress=lambda done, total: solutions.append((done, total)))
    assert solutions == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(
        stability.residual_spread, gpa_stability(embeddings, n_starts=2, seed=5).residual_spread
    )


def test_spearman_matches_scipy() -> None:
    from convergence_core.gpa_stability import _spearman

    rng = np.random.default_rng(7)
    reference = rng.random(50)
    others = np.stack([reference + 0.1 * rng.random(50), rng.random(50), np.round(reference, 1)])
    expected = [spearmanr(reference, row)[0] for row in others]
    np.testing.assert_allclose(_spearman(reference, others), expected, atol=1e-12)
    assert np.isnan(_spearman(np.zeros(50), others)).all()


def test_to_frame_is_long_format() -> None:
    embeddings = planted(seed=4, m=60, dims=(10, 8, 12, 10), latent=4)
    stability = gpa_stability(embeddings, n_starts=1, models=("a", "b", "c", "d"))
    ids = [f"img{j}" for j in range(60)]
    table = stability.to_frame(ids)
    assert list(table.columns) == ["stimulus", "id", "model", "metric", "value"]
    assert len(table) == 60 * (2 * 4 + 5)
    spread_b = table[(table.model == "b") & (table.metric == "residual_spread")]
    np.testing.assert_array_equal(spread_b.value.to_numpy(), stability.residual_spread[:, 1])
    assert table[table.metric == "rank_high"].model.unique().tolist() == ["mean"]
    assert table.id.iloc[61] == "img1"
    with pytest.raises(ValueError, match="one id per stimulus"):
        stability.to_frame(ids[:5])


def test_gpa_result_with_its_fit_is_the_reference_not_solved_again(monkeypatch) -> None:
    """A run's stability step follows its GPA step: given GPA's result with its kept fit, the
    diagnostic neither reads the inputs' cross-products nor solves GPA again (one solve per random
    start only), and every number is the same as when it solves everything itself."""
    from convergence_core import procrustes

    embeddings = planted(seed=3)
    models = ("a", "b", "c", "d")
    alone = gpa_stability(embeddings, n_starts=2, seed=5, models=models)
    gpa = generalized_procrustes(embeddings, models=models, keep_fit=True)
    assert gpa.fit is not None and generalized_procrustes(embeddings).fit is None
    calls = {"_prepare": 0, "_iterate": 0}
    for name in calls:
        original = getattr(procrustes, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(procrustes, name, counted)
    reused = gpa_stability(embeddings, n_starts=2, seed=5, models=models, reference=gpa)
    assert calls == {"_prepare": 0, "_iterate": 2}
    for name in ("dispersion", "residual_spread", "dispersion_spread", "rank_low", "rank_high",
                 "spearman", "losses", "n_iter", "converged", "last_step"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(alone, name), err_msg=name)
    np.testing.assert_array_equal(reused.dispersion, gpa.residuals.mean(axis=1))


@pytest.mark.parametrize(
    ("gpa_options", "stability_options", "message"),
    [({}, {}, "keeps no fit"),
     ({"keep_fit": True, "tol": 1e-10}, {}, "tol=1e-10"),
     ({"keep_fit": True, "accelerate": False}, {}, "accelerate=False"),
     ({"keep_fit": True, "models": ("a", "b", "c", "d")}, {"models": ("a", "b", "d", "c")},
      "in the same order"),
     ({"keep_fit": True}, {"embeddings": planted(m=200)}, r"shaped \[\(200, 48\)"),
     ({"keep_fit": True}, {"embeddings": planted(seed=9, m=100)}, "other data than embedding 0")],
)
def test_a_reference_of_other_inputs_or_settings_is_refused(
    gpa_options, stability_options, message
) -> None:
    embeddings = planted(m=100)
    gpa = generalized_procrustes(embeddings, max_iter=50, **gpa_options)
    options = {"embeddings": embeddings, "n_starts": 1, "max_iter": 50, **stability_options}
    with pytest.raises(ValueError, match=message):
        gpa_stability(options.pop("embeddings"), reference=gpa, **options)


class _MemoryStore:
    """A SolutionStore in a dict (the run folder's is run_writer.StabilitySolutions)."""

    def __init__(self) -> None:
        self.kept: dict = {}

    def load(self, index, shapes):
        return self.kept.get(index)

    def save(self, index, solution) -> None:
        self.kept[index] = solution


def test_an_interrupted_diagnostic_resumes_from_its_store(monkeypatch) -> None:
    """Stopped after the reference and one random start, the diagnostic solves only the other
    starts when called again with the same store, draws them as before, and gives the numbers
    of an uninterrupted call."""
    from convergence_core import procrustes

    embeddings = planted(seed=4, m=200)
    alone = gpa_stability(embeddings, n_starts=3, seed=7)
    store = _MemoryStore()

    def stop_after_two(done, total) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gpa_stability(embeddings, n_starts=3, seed=7, store=store, progress=stop_after_two)
    assert sorted(store.kept) == [0, 1]
    solves = []
    iterate = procrustes._iterate
    monkeypatch.setattr(
        procrustes, "_iterate", lambda *a, **k: solves.append(k.get("start")) or iterate(*a, **k)
    )
    resumed = gpa_stability(embeddings, n_starts=3, seed=7, store=store)
    assert len(solves) == 2 and sorted(store.kept) == [0, 1, 2, 3]
    for name in ("dispersion", "residual_spread", "losses", "n_iter", "last_step", "spearman"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(alone, name), err_msg=name)


def test_run_folder_store_keeps_solutions_exactly_and_takes_none_it_cannot_trust(tmp_path) -> None:
    """StabilitySolutions: a kept solution comes back bit for bit; another key, another shape, a
    damaged or a pickled file give None (that solution is computed again), never an error."""
    from convergence_core import procrustes
    from convergence_core.cache import RunLayout
    from convergence_core.run_writer import StabilitySolutions

    embeddings = planted(seed=5, m=120)
    problem = procrustes._prepare(
        procrustes._check_inputs(embeddings, ()), procrustes._labels(4, ())
    )
    solution = procrustes._iterate(problem, tol=1e-13, max_iter=1000)
    shapes = [(problem.width(i), problem.p) for i in range(4)]
    layout = RunLayout(tmp_path / "run")
    store = StabilitySolutions(layout, "inputs-1")
    assert store.load(0, shapes) is None
    store.save(0, solution)
    store.save(1, solution)
    for index, previous in ((0, solution.previous_maps), (1, solution.maps)):
        back = store.load(index, shapes)
        for got, want in zip([*back.maps, *back.previous_maps], [*solution.maps, *previous]):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(back.loss_history, solution.loss_history)
        assert (back.converged, back.sweeps, back.restarts, back.gap_estimate) == (
            solution.converged, solution.sweeps, solution.restarts, solution.gap_estimate
        )
    assert StabilitySolutions(layout, "inputs-2").load(0, shapes) is None
    assert store.load(0, [(w + 1, p) for w, p in shapes]) is None
    layout.gpa_stability_solution(0, "map_2.npy").write_bytes(b"\x93NUMPY damaged")
    assert store.load(0, shapes) is None
    layout.gpa_stability_solution(1, "loss_history.npy").write_bytes(b"\x80\x04pickled")
    assert store.load(1, shapes) is None
    store.remove()
    assert not layout.gpa_stability_solutions_dir.exists()
    # a tampered run folder: the solutions' folder is a link to a folder outside the run
    from convergence_core.cache import CacheFormatError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    layout.gpa_stability_solutions_dir.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "gpa" / "stability_solutions").symlink_to(outside)
    assert store.load(0, shapes) is None
    for write in (lambda: store.save(0, solution), store.remove):
        with pytest.raises(CacheFormatError, match="outside the run folder"):
            write()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_starts": 0}, "n_starts"), ({"seed": 1.5}, "seed"), ({"tol": -1.0}, "tol"),
     ({"models": ("a",)}, "one name per array")],
)
def test_bad_options_are_explained(kwargs, message) -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match=message):
        gpa_stability([rng.standard_normal((6, 3)), rng.standard_normal((6, 3))], **kwargs)


def test_the_sentence_rounds_the_rank_agreement_down() -> None:
    from convergence_core.gpa_stability import describe

    summary = {"min_spearman": 0.99996, "max_rank_interval": 3.0,
               "max_relative_dispersion_spread": 2e-4}
    text = describe(summary, n_stimuli=100, n_starts=4, tol=1e-13)
    assert "Spearman ρ ≥ 0.9999;" in text and "3 of 100 ranks" in text and "0.02 %" in text
    assert "ρ = 1 (every start ranks the stimuli alike)" in describe(
        {**summary, "min_spearman": 1.0}, n_stimuli=100, n_starts=4, tol=1e-13
    )  # it read "ρ ≥ 1.0000"
    assert "ρ ≥ n/a" in describe({}, n_stimuli=100, n_starts=4, tol=1e-13)


# -- GPA stopped at its residuals' uncertainty ----------------------------------------------------
def equal_widths(seed=1, m=400, d=64, latent=8, noise=0.3, models=4):
    """Models of equal width (the slow case of GPA's loss rule: nearly flat directions)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, latent))
    return [
        z @ rng.standard_normal((latent, d)) / np.sqrt(latent)
        + noise * rng.standard_normal((m, d))
        for _ in range(models)
    ]


def test_stopping_at_the_uncertainty_is_the_loss_rule_at_a_looser_tol_when_it_holds() -> None:
    """On equal widths the rule holds after the first stage (tol 1e-6): the reference is GPA at
    that tol (same iterations), the diagnostic is gpa_stability's at that tol (same starts), in
    far fewer iterations than the optimum's rule, and the residuals are about one spread from the
    optimum's, as the docstring says."""
    from convergence_core.gpa_stability import FIRST_TOL, gpa_to_uncertainty

    embeddings = equal_widths()
    result, stability, stop = gpa_to_uncertainty(
        embeddings, n_starts=4, seed=0, models=("a", "b", "c", "d"), layers=("l",) * 4
    )
    assert stop.met and stop.stages == 1 and stop.tol == FIRST_TOL
    assert stop.step_over_spread <= stop.fraction
    at_tol = generalized_procrustes(embeddings, tol=FIRST_TOL)
    np.testing.assert_array_equal(result.loss_history, at_tol.loss_history)
    np.testing.assert_allclose(result.residuals, at_tol.residuals, rtol=0, atol=1e-15)
    assert result.models == ("a", "b", "c", "d") and result.layers == ("l",) * 4
    alone = gpa_stability(embeddings, n_starts=4, seed=0, tol=FIRST_TOL)
    np.testing.assert_allclose(stability.residual_spread, alone.residual_spread, atol=1e-15)
    np.testing.assert_array_equal(stability.n_iter, alone.n_iter)
    assert stability.tol == FIRST_TOL
    assert stability.summary()["last_step_over_spread"] == pytest.approx(stop.step_over_spread)
    optimum = generalized_procrustes(embeddings)
    assert result.n_iter < 0.6 * optimum.n_iter  # 45 against 86 iterations here
    assert optimum.loss_history[-1] <= result.loss_history[-1] < optimum.loss_history[-1] + 1e-5
    at_optimum = gpa_stability(embeddings, n_starts=4, seed=0)
    distance = np.abs(result.residuals - optimum.residuals).max()
    assert distance < 2 * at_optimum.residual_spread.max()  # 7.5e-4 against 1.1e-3 here
    assert "stopped at its residuals' uncertainty" in stop.describe()


def test_a_rule_that_never_holds_tightens_the_tol_down_to_the_floor() -> None:
    """Stage by stage (1e-6, 1e-8, 1e-10: the floor), each solution goes on from its maps: one
    non-increasing loss history per solution, every solution meets the loss rule at the floor."""
    from convergence_core.gpa_stability import gpa_to_uncertainty

    embeddings = equal_widths(seed=2, m=200, d=24)
    seen = []
    result, stability, stop = gpa_to_uncertainty(
        embeddings, n_starts=2, seed=1, fraction=1e-300, tol=1e-10,
        progress=lambda tol, done, total: seen.append((tol, done, total)),
    )
    assert not stop.met and stop.stages == 3 and stop.tol == 1e-10
    assert seen == [(tol, done, 3) for tol in (1e-6, 1e-8, 1e-10) for done in (1, 2, 3)]
    assert stability.converged.all() and result.converged
    assert np.all(np.diff(result.loss_history) <= 0)
    assert result.loss_history[-1] <= generalized_procrustes(embeddings, tol=1e-6).loss_history[-1]
    assert "did not hold" in stop.describe()


def test_the_iteration_cap_counts_every_stage() -> None:
    from convergence_core.gpa_stability import gpa_to_uncertainty

    result, stability, stop = gpa_to_uncertainty(
        equal_widths(seed=3, m=200, d=24), n_starts=1, fraction=1e-300, max_iter=4
    )
    assert stop.stages == 1 and not stop.met
    assert list(stability.n_iter) == [4, 4] and not stability.converged.any()
    assert result.n_iter == 4 and not result.converged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_starts": 0}, "n_starts must be an integer >= 1"),
     ({"fraction": 0.0}, r"fraction.*\(0, 1\]"), ({"fraction": 1.5}, "fraction"),
     ({"fraction": float("nan")}, "fraction"),
     ({"fraction": True}, "fraction"), ({"layers": ("x",)}, "one name per array")],
)
def test_bad_options_of_the_uncertainty_rule_are_explained(kwargs, message) -> None:
    from convergence_core.gpa_stability import gpa_to_uncertainty

    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match=message):
        gpa_to_uncertainty([rng.standard_normal((6, 3)), rng.standard_normal((6, 3))], **kwargs)


def test_a_solution_interrupted_while_replacing_another_is_not_taken_for_it(
    tmp_path, monkeypatch
) -> None:
    """Solution 0 of inputs A is kept; inputs B's solution 0 is being written over it when the
    process stops (its maps written, its record not yet): a resume with inputs A must not pair
    A's record with B's maps."""
    from convergence_core import procrustes, run_writer
    from convergence_core.cache import RunLayout
    from convergence_core.run_writer import StabilitySolutions

    def solve(seed):
        embeddings = planted(seed=seed, m=60)
        problem = procrustes._prepare(
            procrustes._check_inputs(embeddings, ()), procrustes._labels(4, ())
        )
        return procrustes._iterate(problem, tol=1e-12, max_iter=500), [
            (problem.width(i), problem.p) for i in range(4)
        ]

    first, shapes = solve(5)
    second, _ = solve(6)
    layout = RunLayout(tmp_path / "run")
    StabilitySolutions(layout, "inputs-A").save(0, first)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_writer, "write_json", stop)
    with pytest.raises(KeyboardInterrupt):
        StabilitySolutions(layout, "inputs-B").save(0, second)
    monkeypatch.undo()
    assert StabilitySolutions(layout, "inputs-A").load(0, shapes) is None  # solved again


def test_models_alike_up_to_a_similarity_get_no_spread_or_rank_interval() -> None:
    """Three models equal up to rotation, scale and translation: dispersion is rounding
    (~4e-17), and the summary divided by it (a spread of 1.4e9 %, a rank interval of 111 of
    120) while the rank correlation already said NaN (from the audit)."""
    from convergence_core.gpa_stability import describe, gpa_stability

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 8))
    Q1, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    Q2, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    stability = gpa_stability([X, X @ Q1 * 3, X @ Q2 + 1], n_starts=3, seed=0)
    summary = stability.summary()
    for name in ("max_relative_dispersion_spread", "max_rank_interval", "min_spearman"):
        assert np.isnan(summary[name]), name
    sentence = describe(summary, n_stimuli=120, n_starts=3, tol=stability.tol)
    assert "nan" not in sentence and "n/a" in sentence


# -- GPA's answer: the lowest minimum the starts found --------------------------------------------
def residuals_from_maps(embeddings, result):
    """Residuals (n, M) and loss of a GPA result recomputed from its maps, means and scales
    alone (independent of the row blocks and cross-products GPA works with)."""
    aligned = np.stack([
        ((np.asarray(x, dtype=np.float64) - mean) / scale) @ rotation
        for x, mean, scale, rotation in zip(embeddings, result.means, result.scales, result.maps)
    ])
    deviations = aligned - aligned.mean(axis=0)
    return np.linalg.norm(deviations, axis=2).T, float(np.sum(deviations**2))


def test_a_start_at_a_lower_minimum_is_gpas_answer() -> None:
    """Planted set, seed 4 (the audit's finding, reproduced): GPA from Gower's start stops in a
    local minimum 1.03e-5 above the one random starts 1-3 reach (far beyond the margin, 1e-11;
    a nudged Gower solution goes back to it: a minimum, not a stop short of one), and the
    dispersions of the two minima differ by up to 0.8 %. GPA's answer is the lower one: the
    first start there; its residuals are those of its maps, and the diagnostic is centred on
    it."""
    from convergence_core import procrustes
    from convergence_core.gpa_stability import gpa_over_starts

    embeddings = planted(seed=4)
    gower = generalized_procrustes(embeddings, keep_fit=True)
    result, stability = gpa_over_starts(
        embeddings, n_starts=4, seed=0, models=("a", "b", "c", "d"), layers=("l",) * 4
    )
    gap = stability.losses[0] - stability.losses.min()
    assert 1e-5 < gap < 1.1e-5 and gap > 1e5 * stability.optimum_margin
    assert list(stability.same_optimum) == [False, True, True, True, False]
    assert stability.adopted == 1 and stability.adopted_loss_gap == pytest.approx(gap, abs=1e-15)
    fit = gower.fit
    nudged = [procrustes._project_rows(t + 1e-2 * np.random.default_rng(1).standard_normal(t.shape))
              for t in fit.solution.maps]
    again = procrustes._iterate(fit.problem, tol=1e-13, max_iter=1000, start=nudged)
    assert again.loss_history[-1] == pytest.approx(stability.losses[0], abs=1e-12)
    # the answer: start 1's solution, checked against its own maps
    residuals, loss = residuals_from_maps(embeddings, result)
    np.testing.assert_allclose(result.residuals, residuals, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(stability.losses[1], abs=1e-12)
    assert result.loss_history[-1] == stability.losses[1] and result.converged
    assert loss < gower.loss_history[-1] - 1e-5
    assert result.models == ("a", "b", "c", "d") and result.layers == ("l",) * 4
    np.testing.assert_allclose(stability.dispersion, residuals.mean(axis=1), rtol=1e-12)
    change = np.abs(gower.residuals.mean(axis=1) - residuals.mean(axis=1))
    np.testing.assert_allclose(stability.adopted_dispersion_change, change, atol=1e-12)
    relative = change / residuals.mean(axis=1)
    assert 5e-3 < relative.max() < 1e-2
    summary = stability.summary()
    assert summary["adopted_solution"] == 1.0 and summary["reference_at_best_optimum"] == 0.0
    assert summary["adopted_max_relative_dispersion_change"] == pytest.approx(relative.max())
    # every other solution's ranking is compared with the answer's: Gower's start first
    from scipy.stats import spearmanr

    assert stability.spearman.shape == (4,)
    assert stability.spearman[0] == pytest.approx(
        spearmanr(residuals.mean(axis=1), gower.residuals.mean(axis=1))[0], abs=1e-12
    )
    # gpa_stability is that diagnostic; given GPA's own result, the same numbers
    reused = gpa_stability(embeddings, n_starts=4, seed=0, reference=gower)
    np.testing.assert_array_equal(reused.dispersion, stability.dispersion)
    assert reused.adopted == 1


def test_gower_start_at_the_lowest_minimum_stays_the_answer() -> None:
    """Seed 0 of the same set: start 1 ends 7.6e-6 higher, the others at Gower's minimum up to
    rounding (≤ 1e-14): Gower's start stays GPA's answer, its result unchanged, and nothing of
    the diagnostic moves (solutions of one minimum never displace it)."""
    from convergence_core.gpa_stability import gpa_over_starts

    embeddings = planted(seed=0)
    gower = generalized_procrustes(embeddings)
    result, stability = gpa_over_starts(embeddings, n_starts=4, seed=0)
    assert stability.same_optimum[0] and not stability.same_optimum.all()
    assert stability.adopted == 0 and stability.adopted_loss_gap == 0.0
    np.testing.assert_array_equal(result.loss_history, gower.loss_history)
    np.testing.assert_allclose(result.residuals, gower.residuals, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(stability.adopted_dispersion_change, 0.0)
    summary = stability.summary()
    assert (summary["adopted_solution"], summary["adopted_loss_gap"]) == (0.0, 0.0)
    assert summary["adopted_max_relative_dispersion_change"] == 0.0


@pytest.mark.parametrize(
    ("losses", "tol", "adopted"),
    [([1.0, 1.0, 1.0], 1e-13, 0),
     ([1.0 + 9e-12, 1.0, 1.0], 1e-13, 0),  # within 100 × tol: the same minimum
     ([1.0 + 2e-11, 1.0 + 1e-15, 1.0], 1e-13, 1),  # the first solution at the lowest minimum
     ([1.0 + 2e-11, 2.0, 1.0], 1e-13, 2),
     ([1.0 + 5e-5, 1.0, 1.0], 1e-6, 0),  # stopped at tol 1e-6: within its margin, 1e-4
     ([1.0 + 2e-4, 1.0, 1.0], 1e-6, 1),
     ([0.5 + 5e-13, 0.5], 1e-16, 0)],  # the margin is at least 1e-12 (loss rounding)
)
def test_the_adopted_solution_is_gowers_unless_another_is_clearly_lower(
    losses, tol, adopted
) -> None:
    from convergence_core.gpa_stability import _adopted

    assert _adopted(np.array(losses), tol) == adopted


def test_the_sentence_says_which_solution_is_gpas_answer() -> None:
    """Home and the report show describe(): an adopted start and its loss gap; nothing more
    for Gower's start; for a run written before adoption whose diagnostic found Gower's start
    above another minimum, the fix."""
    from convergence_core.gpa_stability import describe

    base = {"min_spearman": 0.9999, "max_rank_interval": 4.0,
            "max_relative_dispersion_spread": 8e-3, "reference_at_best_optimum": 0.0}
    adopted = describe(
        {**base, "adopted_solution": 1.0, "adopted_loss_gap": 1.03e-5,
         "adopted_max_relative_dispersion_change": 7.9e-3},
        n_stimuli=300, n_starts=4, tol=1e-13,
    )
    assert "above the lowest loss found, from random start 1" in adopted
    assert "1e-05" in adopted and "0.79 %" in adopted and "that solution's" in adopted
    kept = describe({**base, "reference_at_best_optimum": 1.0, "adopted_solution": 0.0,
                     "adopted_loss_gap": 0.0}, n_stimuli=300, n_starts=4, tol=1e-13)
    assert kept == describe({**base, "reference_at_best_optimum": 1.0}, n_stimuli=300,
                            n_starts=4, tol=1e-13)
    assert "Gower" not in kept and kept.endswith("dispersion.")
    old = describe(base, n_stimuli=300, n_starts=4, tol=1e-13)
    assert "written before" in old and "rerun its precompute command" in old


def test_stopped_at_the_uncertainty_gpa_adopts_only_beyond_the_stage_margin() -> None:
    """gpa_to_uncertainty takes the same rule at its last stage's tol. Seed 4 at the default
    fraction stops at tol 1e-6, where Gower's start's 1e-5 is within the margin (1e-4): it stays.
    With a rule that never holds it goes down to the floor, GPA at its optimum, and adopts
    start 1's lower minimum, as gpa_over_starts does."""
    from convergence_core.gpa_stability import gpa_over_starts, gpa_to_uncertainty

    embeddings = planted(seed=4)
    result, stability, stop = gpa_to_uncertainty(embeddings, n_starts=4, seed=0)
    assert stop.met and stop.tol == 1e-6 and stability.adopted == 0
    assert 0 < stability.losses[0] - stability.losses.min() < stability.optimum_margin
    result, stability, stop = gpa_to_uncertainty(embeddings, n_starts=4, seed=0, fraction=1e-300)
    assert not stop.met and stop.tol == 1e-13 and stability.adopted == 1
    residuals, loss = residuals_from_maps(embeddings, result)
    np.testing.assert_allclose(result.residuals, residuals, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(stability.losses[1], abs=1e-12)
    np.testing.assert_allclose(stability.dispersion, residuals.mean(axis=1), rtol=1e-12)
    optimum, _ = gpa_over_starts(embeddings, n_starts=4, seed=0)
    assert loss == pytest.approx(optimum.loss_history[-1], abs=1e-12)
