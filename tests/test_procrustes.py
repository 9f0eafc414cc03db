"""Generalized Procrustes: agreement with a slow full-dimensional reference loop, invariances,
monotone convergence and the errors for bad input."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import convergence_core.procrustes as procrustes
from convergence_core.procrustes import (
    GPAResult,
    _eigh_polar,
    _polar,
    _polar_rows,
    _remaining_decrease,
    deviation_from_consensus,
    generalized_procrustes,
    preprocess_embeddings,
    procrustes_align,
)

TIGHT = 1e-15  # run to (near) machine precision so different frames reach the same fixed point
# Near the optimum the loss is quadratic in the configuration, so a loss converged to ~1e-15 pins
# the configuration only to ~sqrt(1e-15): runs started from different frames agree to this.
DIFFERENT_START_ATOL = 1e-7


def preprocessed(embeddings):
    """Centered, unit-norm, zero-padded to the largest width: written out here, independently."""
    d = max(x.shape[1] for x in embeddings)
    configs = []
    for x in embeddings:
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(axis=0)
        x = x / np.sqrt(np.sum(x**2))
        configs.append(np.hstack([x, np.zeros((x.shape[0], d - x.shape[1]))]))
    return configs


def loss_of(aligned):
    consensus = sum(aligned) / len(aligned)
    return sum(np.sum((a - consensus) ** 2) for a in aligned)


def residuals_of(aligned):
    consensus = sum(aligned) / len(aligned)
    return np.array([[np.linalg.norm(a[j] - consensus[j]) for a in aligned] for j in range(len(consensus))])


def rotated_onto(n, target):
    """n @ (U Vᵀ) from the full SVD nᵀ target = U S Vᵀ (d × d)."""
    u, _, vt = np.linalg.svd(n.T @ target)
    return n @ (u @ vt)


def reference_plain_gpa(embeddings, tol=1e-10, max_iter=1000):
    """Plain GPA as the paper describes it, in the full padded d-dimensional space: every model
    rotated onto the previous consensus, all at once."""
    configs = preprocessed(embeddings)
    aligned = configs
    losses = [loss_of(configs)]
    for _ in range(max_iter):
        consensus = sum(aligned) / len(aligned)
        aligned = [rotated_onto(n, consensus) for n in configs]
        losses.append(loss_of(aligned))
        if losses[-2] - losses[-1] < tol:
            break
    return residuals_of(aligned), np.array(losses)


def reference_gpa(embeddings, tol=1e-10, max_iter=1000):
    """The iterations generalized_procrustes documents, in the full padded space with d × d SVDs:
    Gower's sequential start (widest model first; the plain first step if that start raises the
    loss), then each model in turn rotated onto the sum of the others.

    Returns (residuals (m, M), loss history, whether iteration 1 fell back to the plain step)."""
    configs = preprocessed(embeddings)
    m = configs[0].shape[0]
    widths = [min(m - 1, np.shape(x)[1]) for x in embeddings]
    order = sorted(range(len(configs)), key=lambda i: -widths[i])
    losses = [loss_of(configs)]
    aligned = list(configs)
    placed = configs[order[0]].copy()
    for i in order[1:]:
        aligned[i] = rotated_onto(configs[i], placed)
        placed = placed + aligned[i]
    fell_back = loss_of(aligned) > losses[0]
    if fell_back:
        mean = sum(configs) / len(configs)
        aligned = [rotated_onto(n, mean) for n in configs]
    losses.append(loss_of(aligned))
    while losses[-2] - losses[-1] >= tol and len(losses) - 1 < max_iter:
        for i in order:
            others = sum(aligned[j] for j in range(len(configs)) if j != i)
            aligned[i] = rotated_onto(configs[i], others)
        losses.append(loss_of(aligned))
    return residuals_of(aligned), np.array(losses), fell_back


def shared_structure(rng, m=40, dims=(6, 9, 7), noise=0.3, latent=5):
    base = rng.standard_normal((m, latent))
    return [base @ rng.standard_normal((latent, d)) + noise * rng.standard_normal((m, d)) for d in dims]


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@contextlib.contextmanager
def sweeps_on(form):
    """Run the iterations on the cross-products (``"cross"``) or on the rows (``"rows"``) whatever
    :func:`procrustes._rows_cheaper` would choose; both must give the same iterates."""
    original = procrustes._rows_cheaper
    procrustes._rows_cheaper = lambda n, ranks: form == "rows"
    try:
        yield
    finally:
        procrustes._rows_cheaper = original


FORMS = ("cross", "rows")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("m", "dims"),
    [(40, (6, 9, 7)), (12, (30, 25, 40, 20)), (25, (25, 3)), (8, (5, 5)), (10, (9, 12, 4))],
    ids=["m>d", "m<d", "m=d mixed", "small", "m-1=d"],
)
def test_plain_sweeps_match_reference_gpa(m, dims, form) -> None:
    """accelerate=False: the same iterates as the full-space loop (cross-products or rows, reduced
    coordinates and the eigh step change no iterate), for as many iterations as it runs."""
    embeddings = shared_structure(np.random.default_rng(m), m=m, dims=dims, latent=min(4, *dims))
    with sweeps_on(form):
        result = generalized_procrustes(embeddings, accelerate=False)
    ref_residuals, ref_losses, _ = reference_gpa(embeddings, tol=-np.inf, max_iter=result.n_iter)
    np.testing.assert_allclose(result.loss_history, ref_losses, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.residuals, ref_residuals, atol=1e-8)


@pytest.mark.parametrize(
    ("m", "dims"),
    [(40, (6, 9, 7)), (12, (30, 25, 40, 20)), (25, (25, 3)), (8, (5, 5)), (10, (9, 12, 4))],
    ids=["m>d", "m<d", "m=d mixed", "small", "m-1=d"],
)
@pytest.mark.parametrize("form", FORMS)
def test_reaches_the_reference_optimum(m, dims, form) -> None:
    """The default (accelerated) iterations end at the optimum of the reference loop run to
    machine precision: the same loss to 1e-12 and the same residuals."""
    embeddings = shared_structure(np.random.default_rng(m), m=m, dims=dims, latent=min(4, *dims))
    with sweeps_on(form):
        result = generalized_procrustes(embeddings)
    ref_residuals, ref_losses, _ = reference_gpa(embeddings, tol=TIGHT, max_iter=5000)
    assert result.converged
    assert result.loss_history[-1] == pytest.approx(ref_losses[-1], abs=1e-12)
    np.testing.assert_allclose(result.residuals, ref_residuals, atol=DIFFERENT_START_ATOL)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(3, 30), n_models=st.integers(2, 4))
@example(seed=4_294_967_294, m=21, n_models=4)  # the plain loop needs ~400 iterations here
@example(seed=223, m=10, n_models=3)  # a decrease within rounding (~1e-12) of tol at the end
def test_matches_reference_gpa_property(seed, m, n_models) -> None:
    # Plain sweeps: the same iterates, compared along the whole run (the reference runs exactly
    # as many iterations). Accelerated: the loss the reference reaches at machine precision, never
    # above it, and a loss history that never increases.
    rng = np.random.default_rng(seed)
    dims = tuple(int(d) for d in rng.integers(1, 12, size=n_models))
    embeddings = [rng.standard_normal((m, d)) for d in dims]
    for form in FORMS:
        with sweeps_on(form):
            plain = generalized_procrustes(embeddings, accelerate=False, max_iter=3000)
        ref_residuals, ref_losses, _ = reference_gpa(
            embeddings, tol=-np.inf, max_iter=plain.n_iter
        )
        np.testing.assert_allclose(plain.loss_history, ref_losses, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(plain.residuals, ref_residuals, atol=1e-8)
    _, tight_losses, _ = reference_gpa(embeddings, tol=TIGHT, max_iter=20000)
    fast = generalized_procrustes(embeddings, max_iter=3000)
    assert fast.converged
    assert np.all(np.diff(fast.loss_history) <= 1e-15)
    assert fast.loss_history[-1] == pytest.approx(tight_losses[-1], abs=1e-12)


@pytest.mark.parametrize(
    ("m", "dims", "noise"),
    [(40, (6, 9, 7), 0.3), (12, (30, 25, 40, 20), 0.3), (25, (25, 3), 0.3), (60, (12, 14, 10, 12, 16), 0.2)],
    ids=["m>d", "m<d", "m=d mixed", "five models"],
)
def test_reaches_the_plain_loops_optimum(m, dims, noise) -> None:
    """Where the paper's plain loop finds the optimum, ours finds the same one (both run to machine
    precision)."""
    embeddings = shared_structure(
        np.random.default_rng(100 + m), m=m, dims=dims, latent=min(4, *dims), noise=noise
    )
    plain_residuals, plain_losses = reference_plain_gpa(embeddings, tol=TIGHT, max_iter=5000)
    result = generalized_procrustes(embeddings, tol=TIGHT, max_iter=5000)
    assert result.loss_history[-1] == pytest.approx(plain_losses[-1], rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(result.residuals, plain_residuals, atol=DIFFERENT_START_ATOL)


@pytest.mark.parametrize(
    ("m", "dims"), [(20, (30,) * 8), (60, (40, 45, 50, 42, 48, 44, 46))], ids=["reduced", "full"]
)
def test_many_models_on_few_stimuli_iterate_on_the_rows(m, dims) -> None:
    """Many models, few stimuli (a universal space's shape): the problem keeps the rows and forms
    no cross-products, and gives the cross-product iterations' result to rounding."""
    embeddings = shared_structure(np.random.default_rng(m), m=m, dims=dims, latent=4, noise=0.5)
    arrays = procrustes._check_inputs(embeddings, ())
    problem = procrustes._prepare(arrays, procrustes._labels(len(arrays), ()))
    assert problem.cross is None and len(problem.coordinates) == len(dims)
    rows = generalized_procrustes(embeddings, tol=TIGHT, max_iter=5000)
    with sweeps_on("cross"):
        cross = generalized_procrustes(embeddings, tol=TIGHT, max_iter=5000)
    # at a tolerance of 1e-15 the stopping test reads rounding: one path may take one more sweep
    # (20 against 21 on one CPU, the same number on another), and a sweep this close to the
    # optimum still moves the maps by ~3e-7 while the loss stays flat to 1e-16; so the iterates
    # are compared after the same number of sweeps
    assert abs(rows.n_iter - cross.n_iter) <= 2  # and the plain sweep confirming the stop
    common = min(len(rows.loss_history), len(cross.loss_history))
    np.testing.assert_allclose(
        rows.loss_history[:common], cross.loss_history[:common], rtol=0, atol=1e-12
    )
    # before the last few: where one path checks a due stop with a plain sweep (rounding decides
    # when) the other may take an accelerated one
    sweeps = min(rows.n_iter, cross.n_iter) - 3
    rows = generalized_procrustes(embeddings, tol=0.0, max_iter=sweeps)
    with sweeps_on("cross"):
        cross = generalized_procrustes(embeddings, tol=0.0, max_iter=sweeps)
    np.testing.assert_allclose(rows.residuals, cross.residuals, atol=1e-10)
    assert all(np.allclose(a, b, atol=1e-9) for a, b in zip(rows.maps, cross.maps))
    ranks = [min(d, m - 1) for d in dims]
    assert procrustes._memory_needed(m, dims)[0] < 8 * sum(ranks) ** 2  # no (R, R) matrix


def test_iterations_run_on_one_blas_thread_up_to_the_width(monkeypatch) -> None:
    """Narrow problems iterate on one BLAS thread (the library's threads stall on a busy machine:
    `benchmarks/bench_gpa_threads.py`); wider ones keep the library's threads; the optimum is
    the same either way."""
    from threadpoolctl import threadpool_info, threadpool_limits

    seen: list[int] = []
    minimise = procrustes._minimise

    def counting(*args, **kwargs):
        seen.append(max(info["num_threads"] for info in threadpool_info()))
        return minimise(*args, **kwargs)

    monkeypatch.setattr(procrustes, "_minimise", counting)
    embeddings = shared_structure(np.random.default_rng(3), m=40, dims=(12, 16, 20), latent=4,
                                  noise=0.5)
    with threadpool_limits(limits=2):  # the library's threads, as on a 2-core machine
        narrow = generalized_procrustes(embeddings, tol=TIGHT)
        outside = max(info["num_threads"] for info in threadpool_info())
        monkeypatch.setattr(procrustes, "ONE_THREAD_WIDTH", 10)  # this problem is now "wide"
        wide = generalized_procrustes(embeddings, tol=TIGHT)
    assert seen == [1, outside]
    assert abs(narrow.loss_history[-1] - wide.loss_history[-1]) < 1e-12
    np.testing.assert_allclose(narrow.residuals, wide.residuals, atol=1e-8)


def lowest_block_curvature(aligned):
    """min over models i of the smallest eigenvalue of sym(A_iᵀ S_i), S_i = Σ_{j≠i} A_j. At a
    minimum of the loss every A_iᵀ S_i is symmetric positive semidefinite; a negative eigenvalue
    means reflecting model i along that direction lowers the loss."""
    lowest = np.inf
    for i, a in enumerate(aligned):
        b = a.T @ sum(x for j, x in enumerate(aligned) if j != i)
        np.testing.assert_allclose(b, b.T, atol=1e-6)  # stationary (to the loss's sqrt(ε) pinning)
        lowest = min(lowest, np.linalg.eigvalsh((b + b.T) / 2).min())
    return lowest


def test_converges_to_a_minimum_where_the_plain_loop_stops_at_a_saddle() -> None:
    """Five equally wide models: the plain loop (each model rotated onto a mean that contains
    itself) settles where one model's block still has a negative direction, 1e-4 above the loss
    our iterations reach; at ours no single model's rotation lowers the loss."""
    embeddings = shared_structure(np.random.default_rng(150), m=50, dims=(8,) * 5, latent=4)
    configs = preprocessed(embeddings)
    plain = configs
    for _ in range(3000):
        plain = [rotated_onto(n, sum(plain) / len(plain)) for n in configs]
    assert lowest_block_curvature(plain) < -1e-5  # the negative control: the check can fail
    result = generalized_procrustes(embeddings, tol=TIGHT, max_iter=5000)
    assert lowest_block_curvature(result.aligned) > 0.0
    assert result.loss_history[-1] < loss_of(plain) - 5e-5


def orthogonal_start_trap():
    """Three 1-D models whose raw axes already agree best (unit vectors a, b, c with a·b = −0.1,
    a·c = 0.2, b·c = 0.9): the sequential start flips b (to fit a), then c (to fit a − b), and ends
    with a larger loss than the unaligned models, so iteration 1 must fall back to the plain step."""
    gram = np.array([[1.0, -0.1, 0.2], [-0.1, 1.0, 0.9], [0.2, 0.9, 1.0]])
    centered_basis = np.linalg.qr(np.eye(4) - 0.25)[0][:, :3]  # orthonormal, columns sum to zero
    vectors = centered_basis @ np.linalg.cholesky(gram).T  # columns a, b, c
    return [vectors[:, [i]] for i in range(3)]


def test_start_that_raises_the_loss_falls_back_to_the_plain_first_step() -> None:
    embeddings = orthogonal_start_trap()
    ref_residuals, ref_losses, fell_back = reference_gpa(embeddings)
    assert fell_back  # the case is what it claims to be
    plain = generalized_procrustes(embeddings, accelerate=False)
    _, plain_ref_losses, _ = reference_gpa(embeddings, tol=-np.inf, max_iter=plain.n_iter)
    np.testing.assert_allclose(plain.loss_history, plain_ref_losses, rtol=1e-9, atol=1e-12)
    result = generalized_procrustes(embeddings)
    assert np.all(np.diff(result.loss_history) <= 1e-15)
    np.testing.assert_allclose(result.loss_history[:2], ref_losses[:2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.residuals, ref_residuals, atol=1e-8)
    # the unaligned axes were the optimum (a·b + a·c + b·c = 1.0 beats every sign flip)
    assert result.loss_history[-1] == pytest.approx(result.loss_history[0], abs=1e-12)


def planted_signal(seed, n, widths, rank, noise=0.2):
    """benchmarks/bench_gpa_scale.py's case: X_i = z A_i / sqrt(rank) + noise · E_i."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, rank))
    return [z @ rng.standard_normal((rank, d)) / np.sqrt(rank) + noise * rng.standard_normal((n, d))
            for d in widths]


def test_a_stalled_accelerated_decrease_does_not_stop_the_iterations() -> None:
    """4 models of width 64, n = 120: the accelerated decreases fell to 9e-14 and would have
    dropped again by 2e-13 over the next iterations; a rule built on them alone stopped 2.3e-13
    above the optimum with a gap estimate of 5.6e-14 (a quarter of the true gap). The plain sweep
    that must confirm a stop sends the iterations on; the result ends within rounding of the
    optimum (the lowest loss of a run to rounding, accelerated or plain), and its gap estimate
    bounds what is left."""
    embeddings = planted_signal(12, 120, (64,) * 4, rank=8)
    tight = generalized_procrustes(embeddings, tol=0.0, max_iter=5000)
    plain = generalized_procrustes(embeddings, accelerate=False, tol=0.0, max_iter=5000)
    optimum = min(tight.loss_history[-1], plain.loss_history[-1])
    result = generalized_procrustes(embeddings)
    assert result.converged and np.all(np.diff(result.loss_history) <= 0.0)
    excess = result.loss_history[-1] - optimum
    rounding = procrustes._LOSS_ROUNDING * len(embeddings)
    assert excess <= procrustes.DEFAULT_TOL / 2  # 2.3e-13 before the plain check
    assert excess <= result.gap_estimate + rounding  # not a gross underestimate (it was 4x)
    assert result.gap_estimate <= procrustes.DEFAULT_TOL
    np.testing.assert_allclose(result.residuals, tight.residuals, atol=2e-8)  # was 8.8e-8


@pytest.mark.parametrize("form", FORMS)
def test_the_decrease_of_a_step_is_computed_without_cancellation(form) -> None:
    """_Iterations.decrease (loss before − loss after, from the step) equals the difference of
    the two losses for a large step, and resolves a step of 1e-7 near the optimum, where that
    difference is rounding: it is additive over two such steps to 1e-22 and the same on the
    cross-products as on the rows."""
    embeddings = planted_signal(3, 60, (12, 12, 12), rank=4)
    with sweeps_on(form):
        problem = procrustes._prepare(procrustes._check_inputs(embeddings, ()), ["a", "b", "c"])
    it = procrustes._Iterations(problem)
    maps, loss = it.start()
    swept, swept_loss = it.sweep(maps)
    assert it.decrease(maps, swept) == pytest.approx(loss - swept_loss, rel=1e-10, abs=1e-15)
    solution = procrustes._iterate(problem, tol=0.0, max_iter=500)
    a = solution.maps
    b, _ = it.sweep(a)
    c = [procrustes._project_rows(t + 1e-7 * np.sin(np.arange(t.size)).reshape(t.shape)) for t in b]
    c[it.reference] = b[it.reference]
    ab, bc, ac = it.decrease(a, b), it.decrease(b, c), it.decrease(a, c)
    assert abs(ab + bc - ac) <= 1e-22 and bc < -1e-16  # c moved away from the optimum
    assert it.decrease(c, a) == pytest.approx(-ac, rel=1e-9, abs=1e-24)


def test_result_is_consistent() -> None:
    embeddings = shared_structure(np.random.default_rng(1))
    r = generalized_procrustes(embeddings, models=("a", "b", "c"), layers=("x", "y", "z"))
    assert isinstance(r, GPAResult)
    m, d = 40, 9
    assert r.residuals.shape == (m, 3) and r.residuals.dtype == np.float64
    assert r.consensus.shape == (m, d) and len(r.aligned) == 3
    assert all(a.shape == (m, d) for a in r.aligned)
    assert r.loss_history.shape == (r.n_iter + 1,)
    assert r.converged and r.models == ("a", "b", "c") and r.layers == ("x", "y", "z")
    assert 0.0 <= r.gap_estimate <= procrustes.DEFAULT_TOL
    np.testing.assert_allclose(r.consensus, np.mean(r.aligned, axis=0), atol=1e-14)
    # residuals are the row distances, and their squares sum to the final loss
    np.testing.assert_allclose(r.residuals[:, 1], np.linalg.norm(r.aligned[1] - r.consensus, axis=1))
    assert np.sum(r.residuals**2) == pytest.approx(r.loss_history[-1], rel=1e-12)
    # each aligned configuration is an isometric copy of the preprocessed input
    for a, n in zip(r.aligned, preprocess_embeddings(embeddings)):
        np.testing.assert_allclose(a @ a.T, n @ n.T, atol=1e-12)
    # the spec's fixed point: each aligned model is its own Procrustes rotation onto the consensus
    for a in r.aligned:
        np.testing.assert_allclose(rotated_onto(a, r.consensus), a, atol=1e-6)
    # monotone convergence, to the estimated remaining decrease
    assert np.all(np.diff(r.loss_history) <= 1e-15)
    assert r.loss_history[-2] - r.loss_history[-1] < 1e-10


@pytest.mark.parametrize(("m", "dims"), [(40, (6, 9, 7)), (6, (8, 3, 12))], ids=["m>d", "m<d"])
def test_maps_means_and_scales_reproduce_the_aligned_configurations(m, dims) -> None:
    """The small arrays of the result: aligned_i = ((X_i − μ_i) / s_i) R_i, R_i (d_i, p) with
    p = min(n − 1, d) and orthonormal rows (orthonormal columns on the row space for a model wider
    than n − 1), for any rows, without the result having to hold (n, d) arrays."""
    rng = np.random.default_rng(21)
    embeddings = [x + 5.0 for x in shared_structure(rng, m=m, dims=dims, latent=3)]
    r = generalized_procrustes(embeddings)
    p = min(m - 1, max(dims))
    assert len(r.maps) == len(r.means) == 3 and r.scales.shape == (3,)
    for x, mu, s, rotation in zip(embeddings, r.means, r.scales, r.maps):
        assert rotation.shape == (x.shape[1], p) and rotation.dtype == np.float64
        if x.shape[1] <= p:
            np.testing.assert_allclose(rotation @ rotation.T, np.eye(x.shape[1]), atol=1e-12)
        else:
            np.testing.assert_allclose(rotation.T @ rotation, np.eye(p), atol=1e-12)
        np.testing.assert_allclose(mu, x.mean(axis=0), atol=1e-12)
        assert s == pytest.approx(np.linalg.norm(x - x.mean(axis=0)), rel=1e-12)
    # the lazily computed configurations equal the independent preprocessing, rotated
    for a, n, rotation in zip(r.aligned, preprocess_embeddings(embeddings), r.maps):
        np.testing.assert_allclose(a, n[:, : rotation.shape[0]] @ rotation, atol=1e-13)
    np.testing.assert_allclose(
        np.linalg.norm(np.stack(r.aligned) - r.consensus, axis=2).T, r.residuals, atol=1e-13
    )
    rows = np.array([4, 0, 3])
    mask = np.zeros(m, dtype=bool)
    mask[rows] = True
    np.testing.assert_allclose(r.aligned_rows(rows), np.stack(r.aligned)[:, rows], atol=1e-14)
    np.testing.assert_allclose(r.aligned_rows(mask), np.stack(r.aligned)[:, np.sort(rows)], atol=1e-14)
    np.testing.assert_allclose(r.consensus_rows(slice(1, 4)), r.consensus[1:4], atol=1e-14)
    # from explicitly passed inputs, and errors that say what to pass
    np.testing.assert_allclose(r.consensus_rows(rows, embeddings), r.consensus[rows], atol=1e-14)
    with pytest.raises(ValueError, match="in the same order"):
        r.consensus_rows(rows, embeddings[::-1])
    with pytest.raises(ValueError, match="computed from"):
        r.aligned_rows(rows, embeddings[:2])


def test_result_from_stored_configurations() -> None:
    """A run stored before maps were kept gives consensus and aligned arrays: they are returned
    as stored, and rows cannot be recomputed (an error says why)."""
    consensus = np.ones((4, 2))
    aligned = [np.zeros((4, 2)), np.ones((4, 2))]
    r = GPAResult(
        residuals=np.zeros((4, 2)),
        consensus=consensus,
        aligned=aligned,
        loss_history=np.array([1.0, 0.5]),
        n_iter=1,
        converged=True,
        models=("a", "b"),
        layers=("x", "y"),
    )
    assert r.consensus is consensus and r.aligned[1] is aligned[1]
    assert r.maps == () and r.inputs is None
    with pytest.raises(ValueError, match="no maps"):
        r.consensus_rows([0])


def test_float32_memory_maps_are_read_in_blocks_without_copies(tmp_path, monkeypatch) -> None:
    """Inputs may be float32 memory maps: the result keeps them by reference, every sum is float64
    (blocks of rows), and the numbers equal those of float64 in-memory inputs."""
    embeddings = [x.astype(np.float32) for x in shared_structure(np.random.default_rng(22), m=300)]
    maps = []
    for i, x in enumerate(embeddings):
        np.save(tmp_path / f"{i}.npy", x)
        maps.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    reference = generalized_procrustes([x.astype(np.float64) for x in embeddings])
    monkeypatch.setattr(procrustes, "_BLOCK_BYTES", 8 * 64)  # 256-row blocks (the minimum)
    result = generalized_procrustes(maps)
    assert all(a is b for a, b in zip(result.inputs, maps))
    assert result.loss_history[-1] == pytest.approx(reference.loss_history[-1], abs=1e-13)
    np.testing.assert_allclose(result.residuals, reference.residuals, atol=1e-9)
    np.testing.assert_allclose(result.consensus_rows([0, 299]), reference.consensus[[0, 299]], atol=1e-9)


def test_cross_products_in_blocks_equal_the_dense_product(monkeypatch) -> None:
    rng = np.random.default_rng(23)
    arrays = [rng.standard_normal((700, d)) + 3.0 for d in (5, 9)]
    means = [a.mean(axis=0) for a in arrays]
    stacked = np.hstack([a - mu for a, mu in zip(arrays, means)])
    monkeypatch.setattr(procrustes, "_BLOCK_BYTES", 8 * 14)  # 256-row blocks: 3 of them
    assert len(procrustes._row_blocks(700, 14)) == 3
    np.testing.assert_allclose(procrustes._cross_products(arrays, means), stacked.T @ stacked, rtol=1e-13)
    np.testing.assert_allclose(procrustes._column_means(arrays, ["a", "b"])[1], means[1], rtol=1e-13)


def test_the_stopping_rule_estimates_the_remaining_decrease() -> None:
    """Geometric decreases Δ_k = c ρ^k leave exactly Δ_k ρ / (1 − ρ); the largest recent ratio is
    used (a sudden small decrease does not stop the iterations early), capped at _MAX_RATE."""
    rho = 0.8
    decreases = [1e-3 * rho**k for k in range(6)]
    assert _remaining_decrease(decreases) == pytest.approx(decreases[-1] * rho / (1 - rho))
    assert _remaining_decrease(decreases[:2]) == np.inf
    jumpy = [1e-6, 5e-7, 4e-7, 1e-12]
    assert _remaining_decrease(jumpy) == pytest.approx(1e-12 * 0.8 / 0.2)
    growing = [1e-9, 2e-9, 4e-9]
    rate = procrustes._MAX_RATE
    assert _remaining_decrease(growing) == pytest.approx(4e-9 * rate / (1 - rate))


def test_stops_close_to_the_optimum_where_plain_sweeps_converge_slowly() -> None:
    """A problem whose plain sweeps need hundreds of iterations: the default run ends within 1e-12
    of the loss that plain sweeps reach when run to rounding, and below it within that margin."""
    rng = np.random.default_rng(24)
    m, latent = 300, 4
    base = rng.standard_normal((m, latent))
    embeddings = [base @ rng.standard_normal((latent, 32)) + rng.standard_normal((m, 32)) for _ in range(4)]
    plain = generalized_procrustes(embeddings, accelerate=False, tol=0.0, max_iter=5000)
    assert plain.n_iter > 300  # the case is what it claims to be
    fast = generalized_procrustes(embeddings)
    assert fast.converged and fast.n_iter < plain.n_iter / 4
    assert fast.loss_history[-1] <= plain.loss_history[-1] + 1e-13
    assert fast.loss_history[-1] == pytest.approx(plain.loss_history[-1], abs=1e-12)


def test_invariances() -> None:
    rng = np.random.default_rng(2)
    embeddings = shared_structure(rng)
    base = generalized_procrustes(embeddings, tol=TIGHT).residuals
    rotated = [embeddings[0] @ random_orthogonal(rng, 6), embeddings[1], embeddings[2]]
    reflected = [embeddings[0], -embeddings[1], embeddings[2]]
    permuted = [embeddings[0], embeddings[1][:, rng.permutation(9)], embeddings[2]]
    scaled = [embeddings[0] * 1e3, embeddings[1], embeddings[2] * 0.01 + 5.0]  # scale and shift
    for variant in (rotated, reflected, permuted, scaled):
        residuals = generalized_procrustes(variant, tol=TIGHT).residuals
        np.testing.assert_allclose(residuals, base, atol=DIFFERENT_START_ATOL)
    # permuting the stimuli permutes the residual rows
    order = rng.permutation(40)
    shuffled = generalized_procrustes([e[order] for e in embeddings], tol=TIGHT).residuals
    np.testing.assert_allclose(shuffled, base[order], atol=DIFFERENT_START_ATOL)


def test_identical_models_have_zero_residuals() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 8))
    r = generalized_procrustes([x, x @ random_orthogonal(rng, 8), 2.0 * x])
    np.testing.assert_allclose(r.residuals, 0.0, atol=1e-12)
    assert r.loss_history[-1] == pytest.approx(0.0, abs=1e-20)


def test_procrustes_align_recovers_rotation() -> None:
    rng = np.random.default_rng(4)
    source = rng.standard_normal((20, 5))
    R = random_orthogonal(rng, 5)
    aligned, rotation = procrustes_align(source, source @ R)
    np.testing.assert_allclose(rotation, R, atol=1e-12)
    np.testing.assert_allclose(aligned, source @ R, atol=1e-12)
    with pytest.raises(ValueError, match="Zero-pad"):
        procrustes_align(source, source[:, :4])


def test_preprocess_embeddings() -> None:
    rng = np.random.default_rng(5)
    out = preprocess_embeddings([rng.standard_normal((10, 3)) + 7.0, rng.standard_normal((10, 5))])
    assert [o.shape for o in out] == [(10, 5), (10, 5)]
    for o in out:
        np.testing.assert_allclose(o.mean(axis=0), 0.0, atol=1e-15)
        assert np.linalg.norm(o) == pytest.approx(1.0)
    assert np.all(out[0][:, 3:] == 0.0)


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        ([np.ones((5, 3))], "at least 2 models"),
        (np.ones((5, 3)), "list of M arrays"),
        ([np.ones((5, 3)), np.ones((6, 3))], r"model 0: 5, model 1: 6"),
        ([np.ones((2, 3)), np.ones((2, 3))], "at least 3 stimuli"),
        ([np.ones(5), np.ones((5, 3))], "must be 2-D"),
        ([np.ones((5, 3)), np.ones((5, 3))], "zero variance"),
    ],
)
def test_bad_input_is_explained(embeddings, message) -> None:
    with pytest.raises(ValueError, match=message):
        generalized_procrustes(embeddings)


def test_non_finite_names_the_model_and_counts() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((6, 4))
    b[1, 2] = np.nan
    b[4, 0] = np.nan
    b[4, 1] = -np.inf
    with pytest.raises(ValueError, match=r"model 1 \('dino'\) contains 2 NaN and 1 Inf values in 2 stimuli"):
        generalized_procrustes([a, b], models=("mae", "dino"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tol": -1.0}, "tol"), ({"max_iter": 0}, "max_iter"), ({"models": ("a",)}, "one name per array")],
)
def test_bad_options_are_explained(kwargs, message) -> None:
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match=message):
        generalized_procrustes([rng.standard_normal((6, 3)), rng.standard_normal((6, 3))], **kwargs)


def test_max_iter_reached_is_reported() -> None:
    embeddings = shared_structure(np.random.default_rng(8), noise=2.0)
    r = generalized_procrustes(embeddings, max_iter=1, tol=0.0)
    assert r.n_iter == 1 and not r.converged and r.loss_history.shape == (2,)


# --- the fast path's building blocks -------------------------------------------------------------
def svd_polar(a):
    """Independent reference for the Procrustes step: P Qᵀ from the SVD a = P S Qᵀ."""
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def with_singular_values(rng, n, r, singular_values):
    """(n, r) matrix with the given singular values and random singular vectors."""
    u = np.linalg.qr(rng.standard_normal((n, r)))[0]
    return (u * singular_values) @ random_orthogonal(rng, r)


@pytest.mark.parametrize(
    ("n", "r", "p"), [(60, 20, 35), (50, 49, 49), (40, 7, 39)], ids=["r<p", "r=p", "narrow"]
)
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4, 1e6], ids=lambda c: f"cond{c:.0e}")
def test_eigh_polar_matches_svd_on_ill_conditioned_models(n, r, p, condition) -> None:
    """A GPA-like step, A = zᵀ c: c holds this model's aligned copy and another model; z is
    ill-conditioned."""
    rng = np.random.default_rng(r)
    z = with_singular_values(rng, n, r, np.geomspace(1.0, 1.0 / condition, r))
    own = z @ np.linalg.qr(rng.standard_normal((p, r)))[0].T  # an isometric copy of z in p dims
    other = with_singular_values(rng, n, p, np.geomspace(1.0, 1.0 / condition, p))
    a = z.T @ (own + 0.5 * other) / 2
    t, used_eigh = _polar(a)
    if condition <= 1e2:
        assert used_eigh  # the SVD-free route is accurate enough here and must be taken
    # whichever route was taken, the step equals the SVD Procrustes step, in the aligned
    # coordinates and as a map, and its rows are orthonormal to rounding
    _, estimate = _eigh_polar(a)
    tolerance = max(1e-9, estimate) if used_eigh else 1e-9
    np.testing.assert_allclose(z @ t, z @ svd_polar(a), atol=tolerance)
    assert np.linalg.norm(t - svd_polar(a)) <= tolerance
    if condition <= 1e2:
        np.testing.assert_allclose(t, svd_polar(a), atol=1e-9)
    np.testing.assert_allclose(t @ t.T, np.eye(r), atol=1e-14)


def test_eigh_polar_error_estimate_bounds_the_error() -> None:
    """The guard rests on the estimate (the raw route's departure from orthonormal rows) being an
    upper bound of the error: check it on random steps with condition numbers up to 1e8 (where the
    route's error reaches ~1)."""
    rng = np.random.default_rng(16)
    ratios = []
    for _ in range(300):
        n = int(rng.integers(6, 80))
        r = int(rng.integers(1, min(n - 1, 40) + 1))
        p = int(rng.integers(r, min(n, 50) + 1))
        z = with_singular_values(rng, n, r, np.geomspace(1.0, 10 ** -rng.uniform(0, 3), r))
        z /= np.linalg.norm(z)  # a model's coordinates have unit norm
        c = with_singular_values(rng, n, p, np.geomspace(1.0, 10 ** -rng.uniform(0, 8), p))
        a = z.T @ c
        t, estimate = _eigh_polar(a)
        if not np.isfinite(estimate):
            continue
        error = np.linalg.norm(t - svd_polar(a))
        assert np.linalg.norm(z @ (t - svd_polar(a))) <= error + 1e-15  # ||z||_2 ≤ 1
        if estimate <= procrustes._EIGH_POLAR_MAX_ERROR:  # accepted: rows orthonormal to rounding
            np.testing.assert_allclose(t @ t.T, np.eye(r), atol=1e-13)
        if error > 1e-13:  # below it both routes are at rounding level
            ratios.append(error / estimate)
    assert len(ratios) > 100
    assert max(ratios) < 1.0


def test_eigh_polar_falls_back_to_svd_on_rank_deficient_steps() -> None:
    rng = np.random.default_rng(11)
    z = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 8))  # rank 3 in 8 columns
    a = z.T @ rng.standard_normal((30, 12))
    t, used_eigh = _polar(a)
    assert not used_eigh
    np.testing.assert_array_equal(t, _polar_rows(a))


def test_eigh_polar_falls_back_when_the_target_is_ill_conditioned() -> None:
    """zᵀ c nearly singular because c (not z) is: squaring it would lose the small directions."""
    rng = np.random.default_rng(12)
    z = rng.standard_normal((40, 10))
    c = with_singular_values(rng, 40, 10, np.geomspace(1.0, 1e-9, 10))
    t, used_eigh = _polar(z.T @ c)
    assert not used_eigh
    np.testing.assert_allclose(z @ t, z @ svd_polar(z.T @ c), atol=1e-12)


def record_routes(monkeypatch) -> list[bool]:
    """Patch the GPA step to record, per call, whether it took the eigh route."""
    routes: list[bool] = []

    def recording(a):
        t, used_eigh = _polar(a)
        routes.append(used_eigh)
        return t, used_eigh

    monkeypatch.setattr(procrustes, "_polar", recording)
    return routes


@pytest.mark.parametrize(
    ("m", "dims", "rank"), [(20, (10, 12, 6), 3), (8, (15, 20), 5)], ids=["d<m", "d>m"]
)
def test_matches_reference_gpa_on_rank_deficient_models(monkeypatch, m, dims, rank) -> None:
    """Embeddings of rank < min(m - 1, d_i): some steps are rank deficient, and whichever route
    each takes (the SVD where the eigh route's rows come out far from orthonormal; the eigh route
    where its arbitrary completion of the null directions happens to be orthonormal, which is as
    good: any completion maximises the step), the iterates agree with the reference."""
    routes = record_routes(monkeypatch)
    rng = np.random.default_rng(14)
    base = rng.standard_normal((m, rank))
    embeddings = [
        (base + 0.1 * rng.standard_normal((m, rank))) @ rng.standard_normal((rank, d)) for d in dims
    ]
    plain = generalized_procrustes(embeddings, accelerate=False)
    assert routes and (dims[0] > m or not all(routes))
    ref_residuals, ref_losses, _ = reference_gpa(embeddings, tol=-np.inf, max_iter=plain.n_iter)
    np.testing.assert_allclose(plain.loss_history, ref_losses, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(plain.residuals, ref_residuals, atol=1e-8)
    fast = generalized_procrustes(embeddings)
    _, tight_losses, _ = reference_gpa(embeddings, tol=TIGHT, max_iter=5000)
    assert fast.loss_history[-1] == pytest.approx(tight_losses[-1], abs=1e-12)


def test_gpa_takes_the_eigh_route_on_well_conditioned_models(monkeypatch) -> None:
    """The guard is on the map itself (its rows must be orthonormal for the loss formula), which
    is stricter than version 1's guard on the aligned coordinates (a model wider than the others
    together can have directions that barely couple to them, and take the SVD); models of similar
    width (here 24-28 features, 100 stimuli) take the eigh route throughout."""
    routes = record_routes(monkeypatch)
    embeddings = shared_structure(np.random.default_rng(15), m=100, dims=(24, 28, 26), noise=0.5)
    generalized_procrustes(embeddings)
    assert routes and all(routes)
    routes.clear()
    generalized_procrustes(embeddings, tol=TIGHT)
    assert routes and all(routes)


# --- a held-out model against a consensus -----------------------------------------------------
@pytest.mark.parametrize(
    ("m", "held_width", "dims"),
    [(60, 5, (6, 9, 7)), (60, 14, (6, 9, 7)), (8, 12, (10, 6)), (8, 4, (10, 6))],
    ids=["narrower", "wider", "m<d wider", "m<d narrower"],
)
def test_deviation_from_consensus_matches_the_dense_procrustes(m, held_width, dims) -> None:
    """Blockwise cross-products give the same per-stimulus distances as full-width orthogonal
    Procrustes of the preprocessed held-out model onto the materialised consensus (both padded)."""
    rng = np.random.default_rng(held_width + m)
    embeddings = shared_structure(rng, m=m, dims=dims, latent=3)
    held = rng.standard_normal((m, held_width)) * 3.0 + 1.0
    result = generalized_procrustes(embeddings)
    consensus = result.consensus
    width = max(held_width, consensus.shape[1])
    source = held - held.mean(axis=0)
    source = np.pad(source / np.linalg.norm(source), ((0, 0), (0, width - held_width)))
    target = np.pad(consensus, ((0, 0), (0, width - consensus.shape[1])))
    expected = np.linalg.norm(rotated_onto(source, target) - target, axis=1)
    np.testing.assert_allclose(deviation_from_consensus(held, result), expected, atol=1e-10)
    with pytest.raises(ValueError, match="same stimuli"):
        deviation_from_consensus(held[:5], result)


def test_models_much_wider_than_n_stay_in_their_row_space() -> None:
    """3 'subjects' of 20,000-25,000 voxels on 30 stimuli: the cross-products of the full widths
    would take 29 GB; GPA works on the row-space coordinates instead (tracemalloc peak well under
    the 4 × 60,000 × 30 × 8 bytes of four copies of the inputs), and ends where GPA of those
    coordinates, computed here with their own SVD, ends: the same loss and residuals."""
    import tracemalloc

    rng = np.random.default_rng(5)
    n, widths = 30, (20_000, 15_000, 25_000)
    latent = rng.standard_normal((n, 4))
    voxels = [
        (latent @ rng.standard_normal((4, w)) + rng.standard_normal((n, w)) + 2.0)
        .astype(np.float32)
        for w in widths
    ]
    tracemalloc.start()
    result = generalized_procrustes(voxels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * sum(widths) * n * 8
    assert result.converged
    assert [m.shape for m in result.maps] == [(w, n - 1) for w in widths]
    for rotation in result.maps:  # orthonormal columns on the row space
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(n - 1), atol=1e-10)
    row_space = []
    for x in voxels:
        centered = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
        u, s, _ = np.linalg.svd(centered, full_matrices=False)
        row_space.append((u * s)[:, : n - 1])
    reduced = generalized_procrustes(row_space)
    assert result.loss_history[-1] == pytest.approx(reduced.loss_history[-1], abs=1e-12)
    np.testing.assert_allclose(result.residuals, reduced.residuals, atol=DIFFERENT_START_ATOL)
    np.testing.assert_allclose(
        np.linalg.norm(result.aligned_rows() - result.consensus_rows(), axis=2).T,
        result.residuals, atol=1e-12,
    )


def test_cross_products_that_cannot_fit_are_refused_before_allocating(monkeypatch) -> None:
    """A process that runs out of memory while filling the cross-products is killed without a
    word: GPA compares what they need with the memory available first, and says what to do."""
    rng = np.random.default_rng(0)
    narrow = [rng.standard_normal((50, 20)) for _ in range(3)]
    wide = [rng.standard_normal((10, 40)) for _ in range(3)]
    monkeypatch.setattr(procrustes, "_available_memory", lambda: 1000)
    for embeddings, columns in ((narrow, 60), (wide, 27)):
        with pytest.raises(ValueError, match=rf"needs the cross-products of their {columns} "
                                             r"features.*Reduce the features first.*--gpa-models"):
            generalized_procrustes(embeddings, models=("subj01", "subj02", "subj03"))
    monkeypatch.setattr(procrustes, "_available_memory", lambda: None)  # unknown: no check
    assert generalized_procrustes(narrow).converged
    monkeypatch.setattr(procrustes, "_available_memory", lambda: 2**30)
    assert generalized_procrustes(wide).converged
    monkeypatch.undo()  # the real function reads /proc/meminfo here
    assert procrustes._available_memory() is None or procrustes._available_memory() > 2**20


def test_models_beyond_float64s_squares_are_refused_and_large_ones_kept() -> None:
    """A model x 1e155 gave a singular matrix (or, wider than n - 1, silently a model of zeros
    and converged=True); x 1e-170 was called 'identical for every stimulus'. Both are refused
    naming the fix; x 1e90 and 1e-90 give the unscaled residuals (from the GPA review)."""
    rng = np.random.default_rng(0)
    X = [rng.normal(size=(50, d)) for d in (3, 80, 20)]
    base = generalized_procrustes(X).residuals
    for scale in (1e90, 1e-90):
        scaled = generalized_procrustes([X[0] * scale, X[1], X[2]]).residuals
        np.testing.assert_allclose(scaled, base, atol=1e-12)
    for scale in (1e155, 1e-170):
        for which in (0, 1):  # narrow, and wider than n - 1
            Y = [x * scale if i == which else x for i, x in enumerate(X)]
            with pytest.raises(ValueError, match=rf"model {which}'s largest \|value\| is .*"
                               r"rescale the model first, e\.g\. X / np\.abs\(X\)\.max\(\)"):
                generalized_procrustes(Y)
    with pytest.raises(ValueError, match="rescale the model first"):
        preprocess_embeddings([X[0] * 1e155, X[1]])



# -- gaps a mutation review found (each test fails on a deliberately broken copy) ---------------


def test_procrustes_align_keeps_a_reflection_of_equal_width_full_rank_data() -> None:
    """Reflections are allowed: a mirrored copy at full rank and equal width (nothing padded to
    absorb the mirror) is aligned exactly, with R the mirror itself. A rotation-only Procrustes
    (det R forced to +1) left a residual of 0.62 here and passed every other test."""
    rng = np.random.default_rng(1)
    data = rng.standard_normal((40, 6))
    mirror = np.diag([1.0, 1, 1, 1, 1, -1])
    aligned, rotation = procrustes_align(data, data @ mirror)
    np.testing.assert_allclose(rotation, mirror, atol=1e-12)
    np.testing.assert_allclose(aligned, data @ mirror, atol=1e-12)


def test_a_mirrored_held_out_model_sits_on_the_consensus() -> None:
    """Fig. S2's leave-one-model-out distance of a mirrored, scaled and shifted copy of the
    consensus (equal widths, full rank) is zero: the mirror is an allowed orthogonal map."""
    from convergence_core.analyses import held_out_deviation

    rng = np.random.default_rng(1)
    consensus = rng.standard_normal((40, 6))
    consensus -= consensus.mean(axis=0)
    consensus /= np.linalg.norm(consensus)
    held = 3.0 * consensus @ np.diag([1.0, 1, 1, 1, 1, -1]) + 0.5
    assert held_out_deviation(held, consensus).max() < 1e-12


def test_plain_sweeps_stop_only_when_the_gap_is_within_tol() -> None:
    """A plain (not accelerated) run that says it converged has its estimated gap to the optimum
    within tol, and its loss is within tol of a run to rounding: the stopping rule needs both the
    last decrease and the gap below tol (with either one it stopped at gap 1.9e-8 > tol = 1e-8)."""
    for seed in range(2):
        rng = np.random.default_rng(seed)
        latent = rng.standard_normal((300, 8))
        embeddings = [latent @ rng.standard_normal((8, 24)) + 0.2 * rng.standard_normal((300, 24))
                      for _ in range(4)]
        best = generalized_procrustes(embeddings, tol=0.0, max_iter=20000, accelerate=False)
        for tol in (1e-8, 1e-10):
            run = generalized_procrustes(embeddings, tol=tol, max_iter=20000, accelerate=False)
            assert run.converged
            assert run.gap_estimate <= tol, (seed, tol, run.gap_estimate)
            assert run.loss_history[-1] - best.loss_history[-1] <= tol, (seed, tol)
