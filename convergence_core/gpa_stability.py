"""How well GPA pins each stimulus's residuals: GPA from several random starts.

The residuals of Generalized Procrustes Analysis are only as determined as the loss is curved.
Along nearly flat directions of the loss (in high dimensions, the alignment of the models'
model-specific "noise" subspaces, whose cross-products are small) the maps can move a long way for
a loss change far below any stopping tolerance, and the loss can have several local minima of
almost equal value. A stimulus's residuals then depend on where the iterations stopped, and a
ranking of stimuli by dispersion (mean residual) inherits that uncertainty.

:func:`gpa_stability` measures it directly: it runs the same iterations as
:func:`procrustes.generalized_procrustes` (same stopping rule and ``tol``) from Gower's start (the
reference: the result GPA returns) and from ``n_starts`` random starts (independent Haar-random
orthogonal maps per model), then compares the residuals stimulus by stimulus:

* ``residual_spread[j, i]``: max − min over the solutions of the residual of stimulus j, model i;
  ``dispersion_spread[j]`` the same for the mean residual (the dispersion score).
* ``spearman[s]``: Spearman ρ of start s's dispersion with the reference's; ``rank_low[j]`` /
  ``rank_high[j]``: the lowest and highest rank of stimulus j's dispersion over the solutions
  (0 = least dispersed).
* ``losses``: each solution's final loss. Solutions whose loss exceeds the best by more than
  ``optimum_margin`` ended in a different local minimum (see :attr:`GPAStability.same_optimum`).
* ``last_step[j, i]``: how much the reference's residuals moved in its last accepted iteration.
  Comparing it with the spread is the stopping rule's check: the iterations stopped when the
  residuals moved less than their own uncertainty across starts
  (``summary()["last_step_over_spread"]`` < 1).

GPA's answer is the minimiser of its loss, so the diagnostic's solutions are also candidates for
it: ``adopted`` is Gower's start (0) unless its loss is above the lowest by more than
``optimum_margin`` (a different, worse local minimum, not a stop a little short of the same
one), and then the first solution at the lowest minimum. ``dispersion`` and ``spearman`` are
the adopted solution's (the answer: a run takes its GPA, residuals and dispersion from it, see
``precompute``); :func:`gpa_over_starts` returns it as a ``GPAResult``. On issue 11's planted
set (300 stimuli, widths 48/32/40/48, seeds 0-11, 4 random starts of seed 0) GPA from Gower's
start stopped in a worse minimum in 3 of 12 problems (seeds 4, 5, 6), 1.0e-5, 5.9e-7 and 3.1e-8
above the lowest loss, with dispersions up to 0.79, 0.88 and 0.44 % apart (a nudged Gower
solution went back to its minimum: not a stop short of the lower one). Where Gower's start
reaches the lowest minimum (within the margin) it stays the answer, so that solutions of one
minimum, which differ by rounding, never swap.

Cost: the cross-products are built once (two passes over the inputs, as for GPA itself); each
start costs one GPA solve on them (O(M² d³) per iteration, independent of n); one more pass over
the inputs computes the residuals of every solution. Given GPA's own result with its kept fit
(``reference=``, as a run's stability step right after its GPA step), the cross-products and the
reference solution are taken from it: one solve and two passes fewer, the same numbers. With a
:class:`SolutionStore` (a run folder's: ``run_writer.StabilitySolutions``) each solution is kept
as it finishes, and a call interrupted after some of them solves only the others. The starts
are solved one after the other with BLAS's threads: solving them two at a time with one BLAS
thread each (threads; numpy releases the GIL in LAPACK) was tried and not kept. On 4 × 768
features of 2,000 stimuli, GPA and 4 starts took 792 s against 838 s (1.06×, one run each,
956 and 954 iterations): two solves slow each other down (~1.5 CPU-s per iteration each,
against 1.74 for one solve on two threads), so the 1.35× of bare 768 × 768 eigendecompositions
and products measured that way does not carry over. A
stimulus bootstrap would answer a different question (sampling variability of the stimulus set)
and needs new cross-products per replicate.

The diagnostic can also decide when GPA stops (:func:`gpa_to_uncertainty`, a run's
``gpa_stop="uncertainty"``): GPA and the random starts iterated together, stage by stage, until
the residuals move less than a tenth of their spread over the starts. For models of equal width,
where the loss rule needs hundreds of iterations, that is ~20 (4 × 768 features, 2,000 stimuli),
and the residuals end about one spread from the optimum's (README, GPA's stopping rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from . import procrustes as _gpa
from .stats import ordinal_ranks, spearman_rhos


@dataclass(frozen=True)
class GPAStability:
    """Outcome of :func:`gpa_stability` for n stimuli, M models and S random starts.

    Attributes:
        dispersion: (n,) float64, mean residual of the adopted solution (:attr:`adopted`: GPA's
            answer; the reference, Gower's start, unless a random start reached a clearly lower
            minimum).
        residual_spread: (n, M) float64, max − min over the S + 1 solutions of each residual.
        dispersion_spread: (n,) float64, max − min over the solutions of the mean residual.
        residual_spread_at_best, dispersion_spread_at_best: (n, M) and (n,) float64, the same
            over the solutions that reached the lowest minimum (:attr:`same_optimum`): how well
            the optimisation pins the residuals of that minimum, without the other minima (NaN
            when only one solution reached it).
        rank_low, rank_high: (n,) int64, lowest / highest rank of the stimulus's mean residual
            over the solutions (0 = least dispersed; ties by stimulus order).
        spearman: (S,) float64, Spearman ρ of each other solution's mean residual with the
            adopted solution's, in solution order (start s at s − 1 when the reference is
            adopted; NaN when every dispersion of the adopted solution is ≤ 1e-12, i.e.
            rounding: identical models up to rotation).
        losses: (S + 1,) float64, final loss of the reference (index 0) and of each start.
        n_iter: (S + 1,) int64, iterations of each solution.
        converged: (S + 1,) bool, whether each met the stopping rule.
        last_step: (n, M) float64, |change of each residual| over the reference's last accepted
            iteration (the stopping rule's check, made on GPA from Gower's start).
        tol: the stopping tolerance used for every solution.
        seed: seed of the random starts.
        models: names of the models, in order (may be empty).
        adopted: index of the solution that is GPA's answer (:func:`_adopted`): 0, the reference,
            unless its loss exceeds the lowest by more than :attr:`optimum_margin`; then the first
            solution at the lowest minimum (random start ``adopted``).
        adopted_dispersion_change: (n,) float64, |mean residual of the reference − that of the
            adopted solution|: what the adoption changed (zeros when the reference is adopted).
    """

    dispersion: np.ndarray
    residual_spread: np.ndarray
    dispersion_spread: np.ndarray
    residual_spread_at_best: np.ndarray
    dispersion_spread_at_best: np.ndarray
    rank_low: np.ndarray
    rank_high: np.ndarray
    spearman: np.ndarray
    losses: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    last_step: np.ndarray
    tol: float
    seed: int
    models: tuple[str, ...] = ()
    adopted: int = 0
    adopted_dispersion_change: np.ndarray | None = None

    @property
    def optimum_margin(self) -> float:
        """Loss above the best solution's that still counts as the same minimum: 100 × tol (the
        solutions stop within ~tol of their minimum), at least 1e-12 (loss rounding)."""
        return optimum_margin(self.tol)

    @property
    def same_optimum(self) -> np.ndarray:
        """(S + 1,) bool: the solution's loss is within :attr:`optimum_margin` of the best."""
        return self.losses <= self.losses.min() + self.optimum_margin

    @property
    def adopted_loss_gap(self) -> float:
        """Loss of the reference (Gower's start) minus the adopted solution's: 0 when the
        reference is adopted, else above :attr:`optimum_margin`."""
        return float(self.losses[0] - self.losses[self.adopted])

    def summary(self) -> dict[str, float]:
        """Scalars for a report: the largest and median relative dispersion spread (spread /
        dispersion; also over the solutions at the lowest minimum only), the lowest Spearman ρ,
        the widest rank interval (in ranks), the loss range, how many solutions (and whether the
        reference) reached the lowest minimum, ``last_step_over_spread`` (the largest
        residual motion of the reference's last iteration divided by the largest spread; < 1:
        the iterations stopped when residuals moved less than their uncertainty across starts;
        0 when nothing moved and the spread is 0; NaN, not defined, when the residuals moved
        but every solution has the same residuals, so that the summary stays finite for strict
        JSON; ``..._at_best``: the same against the spread within the lowest minimum), and which
        solution was adopted as GPA's answer: ``adopted_solution`` (0: Gower's start, s: random
        start s), ``adopted_loss_gap`` (how far the reference's loss is above it; 0 when
        adopted) and ``adopted_max_relative_dispersion_change`` (the largest change of a
        stimulus's dispersion it made, relative to the adopted dispersion).
        """
        # dispersion at rounding level (models alike up to a similarity) has no relative spread
        # or ranks to speak of, as in the rank correlation (_spearman)
        positive = self.dispersion > _ZERO_DISPERSION
        undefined = not positive.any()

        def relative(spread: np.ndarray) -> np.ndarray:
            if undefined:
                return np.full_like(spread, np.nan)
            return np.divide(spread, self.dispersion, out=np.zeros_like(spread), where=positive)

        spread = float(self.residual_spread.max())
        spread_at_best = float(np.max(self.residual_spread_at_best))  # NaN: one solution there
        step = float(self.last_step.max())

        def ratio(a: float, b: float) -> float:
            if np.isnan(b):
                return float("nan")
            return a / b if b > 0 else (0.0 if a == 0 else float("nan"))

        return {
            "n_starts": float(self.spearman.size),
            "max_relative_dispersion_spread": float(relative(self.dispersion_spread).max()),
            "median_relative_dispersion_spread": float(np.median(relative(self.dispersion_spread))),
            "max_relative_dispersion_spread_at_best": float(
                relative(self.dispersion_spread_at_best).max()
            ),
            "max_residual_spread": spread,
            "min_spearman": (
                float(np.nanmin(self.spearman))
                if np.any(np.isfinite(self.spearman))
                else float("nan")
            ),
            "max_rank_interval": (
                float("nan") if undefined else float((self.rank_high - self.rank_low).max())
            ),
            "loss_range": float(self.losses.max() - self.losses.min()),
            "solutions_at_best_optimum": float(self.same_optimum.sum()),
            "reference_at_best_optimum": float(self.same_optimum[0]),
            "last_step_over_spread": ratio(step, spread),
            "last_step_over_spread_at_best": ratio(step, spread_at_best),
            "adopted_solution": float(self.adopted),
            "adopted_loss_gap": self.adopted_loss_gap,
            "adopted_max_relative_dispersion_change": (
                0.0 if self.adopted == 0 or self.adopted_dispersion_change is None
                else float(relative(self.adopted_dispersion_change).max())
            ),
        }

    def to_frame(self, ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """Long-format per-stimulus table: ``stimulus`` (row index), ``id`` (when given),
        ``model`` (a model name, or ``"mean"`` for the dispersion), ``metric``
        (``residual_spread``, ``last_step`` per model; ``dispersion``, ``dispersion_spread``,
        ``dispersion_spread_at_best``, ``rank_low``, ``rank_high`` for ``"mean"``) and ``value``
        (float64)."""
        n, n_models = self.residual_spread.shape
        names = list(self.models) or [f"model {i}" for i in range(n_models)]
        frames = []
        for metric in ("residual_spread", "last_step"):
            values = getattr(self, metric)
            for i, name in enumerate(names):
                frames.append(pd.DataFrame(
                    {"stimulus": np.arange(n), "model": name, "metric": metric,
                     "value": values[:, i]}
                ))
        per_stimulus = ("dispersion", "dispersion_spread", "dispersion_spread_at_best", "rank_low",
                        "rank_high")
        for metric in per_stimulus:
            frames.append(pd.DataFrame({
                "stimulus": np.arange(n),
                "model": "mean",
                "metric": metric,
                "value": np.asarray(getattr(self, metric), dtype=np.float64),
            }))
        table = pd.concat(frames, ignore_index=True)
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (n,):
                raise ValueError(
                    f"got {ids.shape[0] if ids.ndim else 0} ids for {n} stimuli; pass one id per "
                    "stimulus."
                )
            table.insert(1, "id", ids[table["stimulus"].to_numpy()])
        return table


def describe(summary: dict[str, Any], *, n_stimuli: int, n_starts: int, tol: float) -> str:
    """One sentence for readers (report summary, Home page) from :meth:`GPAStability.summary`
    (values may be None where the summary had NaN)."""
    def number(name: str) -> float | None:  # None and NaN alike: not defined
        value = summary.get(name)
        return None if value is None or not np.isfinite(value) else float(value)

    rho = number("min_spearman")
    if rho is not None:  # rounded down, so that "≥" stays true (0.99996 is not "≥ 1.0000")
        rho = np.floor(rho * 1e4 + 1e-9) / 1e4
    spread = number("max_relative_dispersion_spread")
    interval = number("max_rank_interval")
    agree = (
        "ρ ≥ n/a" if rho is None
        else "ρ = 1 (every start ranks the stimuli alike)" if rho >= 1.0 else f"ρ ≥ {rho:.4f}"
    )
    # in words where the diagnostic found nothing: "0 of 239 ranks" and "4.7e-08 %" read as
    # defects on the Home page
    ranks = (
        f"the widest rank interval of a stimulus is n/a of {n_stimuli} ranks" if interval is None
        else "no stimulus changes rank between the solutions" if round(interval) == 0
        else f"the widest rank interval of a stimulus is {interval:.0f} of {n_stimuli} ranks"
    )
    spread_text = (
        "n/a" if spread is None
        else "below 0.001 %" if 100 * spread < 1e-3
        else f"{100 * spread:.2g} %"
    )
    sentence = (
        f"GPA stability ({n_starts} random starts, tol {tol:.0e}): dispersion ranks agree with "
        f"GPA's at Spearman {agree}; {ranks}; the largest dispersion spread is {spread_text} of "
        "that stimulus's dispersion."
    )
    return sentence + _adoption_words(number)


def _adoption_words(number: Callable[[str], float | None]) -> str:
    """What :func:`describe` adds about the solution adopted as GPA's answer: nothing when it
    is Gower's start; the start and the loss gap when a random start's lower minimum was
    adopted; the fix when a run written before adoption keeps Gower's worse minimum."""
    adopted = number("adopted_solution")
    if adopted is None:  # a run written before GPA adopted the lowest-loss solution
        if number("reference_at_best_optimum") == 0.0:
            return (
                " GPA from Gower's start ended in a local minimum above the lowest loss the "
                "random starts found, and this run, written before GPA took the lowest-loss "
                "solution as its answer, keeps Gower's: rerun its precompute command to adopt "
                "the lower one."
            )
        return ""
    if adopted == 0:
        return ""
    gap = number("adopted_loss_gap")
    change = number("adopted_max_relative_dispersion_change")
    return (
        f" GPA from Gower's start ended in a local minimum "
        f"{'n/a' if gap is None else f'{gap:.2g}'} above the lowest loss found, from random "
        f"start {adopted:.0f}: the residuals and dispersion are that solution's (a stimulus's "
        f"dispersion moved by up to {'n/a' if change is None else f'{100 * change:.2g} %'})."
    )


@dataclass(frozen=True)
class StoredStability:
    """The diagnostic as a run stores it (``Run.gpa_stability``).

    Attributes:
        n_starts, seed, tol: how it was computed.
        summary: :meth:`GPAStability.summary` (NaN as None).
        table: :meth:`GPAStability.to_frame` with ids (long: stimulus × model × metric).
    """

    n_starts: int
    seed: int
    tol: float
    summary: dict[str, Any]
    table: pd.DataFrame

    def per_stimulus(self, metric: str) -> np.ndarray:
        """(n,) float64 values of one per-stimulus metric (``rank_low``, ``rank_high``,
        ``dispersion``, ``dispersion_spread``, ``dispersion_spread_at_best``), stimulus order."""
        rows = self.table[(self.table["model"] == "mean") & (self.table["metric"] == metric)]
        if rows.empty:
            raise ValueError(
                f"the stored GPA stability has no per-stimulus metric {metric!r}; use one of "
                f"{sorted(set(self.table.loc[self.table['model'] == 'mean', 'metric']))}"
            )
        return rows.sort_values("stimulus")["value"].to_numpy(dtype=np.float64)

    def describe(self, n_stimuli: int) -> str:
        return describe(self.summary, n_stimuli=n_stimuli, n_starts=self.n_starts, tol=self.tol)


# Dispersions at or below this (units of the unit-norm configurations) are rounding: identical
# models (up to rotation) give residuals of ~1e-16, whose ranking means nothing.
_ZERO_DISPERSION = 1e-12


def optimum_margin(tol: float) -> float:
    """Loss above the lowest that still counts as the same minimum for solutions stopped at
    ``tol``: 100 × tol (they stop within ~tol of their minimum), at least 1e-12 (rounding)."""
    return max(100.0 * float(tol), 1e-12)


def _adopted(losses: np.ndarray, tol: float) -> int:
    """The solution that is GPA's answer among ``losses`` (S + 1,) (the reference first): 0
    when the reference's loss is within :func:`optimum_margin` of the lowest, else the first
    solution that is (a minimum clearly lower than the reference's; solutions of one minimum
    differ by rounding, and taking the first keeps the choice from following it)."""
    at_best = losses <= losses.min() + optimum_margin(tol)
    return 0 if at_best[0] else int(np.flatnonzero(at_best)[0])


def _spread(values: np.ndarray) -> np.ndarray:
    """max − min over the first axis; NaN where fewer than two solutions are given."""
    if values.shape[0] < 2:
        return np.full(values.shape[1:], np.nan)
    return values.max(axis=0) - values.min(axis=0)


def _spearman(reference: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Spearman ρ (average ranks for ties; :func:`.stats.spearman_rhos`) of (n,) with each row of
    (S, n); NaN for a constant row, and all NaN when the reference is zero throughout."""
    if not np.max(reference) > _ZERO_DISPERSION:
        return np.full(others.shape[0], np.nan)
    return spearman_rhos(np.asarray(others, dtype=np.float64).T, reference)


def _random_start(problem: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """Independent Haar-random maps (r_i, p) with orthonormal rows, one per model."""
    out = []
    for i in range(problem.n_models):
        q, r = np.linalg.qr(rng.standard_normal((problem.p, problem.p)))
        q *= np.sign(np.diag(r))
        out.append(q[: problem.width(i)])
    return out


class SolutionStore(Protocol):
    """Where :func:`gpa_stability` keeps each GPA solution as it finishes, so that an interrupted
    diagnostic resumes after the last one (a run folder: ``run_writer.StabilitySolutions``).
    Solution 0 is the reference (Gower's start), solution s the s-th random start."""

    def load(
        self, index: int, shapes: Sequence[tuple[int, int]]
    ) -> _gpa.GPASolution | None:
        """Solution ``index`` if it was kept for these inputs with maps of ``shapes``, else
        None."""

    def save(self, index: int, solution: _gpa.GPASolution) -> None:
        """Keep solution ``index`` (written completely or not at all)."""


def _reference_fit(
    reference: _gpa.GPAResult,
    arrays: Sequence[np.ndarray],
    names: tuple[str, ...],
    tol: float,
    max_iter: int,
) -> _gpa.GPAFit:
    """The kept fit of ``reference``, after checking that it is GPA of these inputs with this
    stopping rule: shapes, names, settings, and (where the result keeps its inputs) 64 rows spread
    over the stimuli equal in every model, so other data of the same shapes is refused without a
    pass over the inputs."""
    fit = reference.fit
    if fit is None:
        raise ValueError(
            "the reference GPA result keeps no fit; compute it with "
            "generalized_procrustes(..., keep_fit=True), or leave reference out."
        )
    shapes = [tuple(a.shape) for a in arrays]
    expected = [(reference.residuals.shape[0], r.shape[0]) for r in reference.maps]
    if shapes != expected or (names and reference.models and names != reference.models):
        raise ValueError(
            f"the reference GPA result is of {len(expected)} inputs shaped {expected} "
            f"({', '.join(reference.models) or 'unnamed'}), but the embeddings are shaped "
            f"{shapes} ({', '.join(names) or 'unnamed'}); pass the GPA result of these embeddings "
            "in the same order, or leave reference out."
        )
    if reference.inputs is not None:
        n = reference.residuals.shape[0]
        rows = np.unique(np.linspace(0, n - 1, num=min(n, 64)).round().astype(np.intp))
        for i, (given, kept) in enumerate(zip(arrays, reference.inputs)):
            if given is not kept and not np.array_equal(given[rows], kept[rows]):
                raise ValueError(
                    f"the reference GPA result was computed from other data than embedding {i}"
                    f"{f' ({names[i]})' if names else ''} (same shape, other values); pass the GPA "
                    "result of these embeddings, or leave reference out."
                )
    if (fit.tol, fit.max_iter, fit.accelerate) != (float(tol), int(max_iter), True):
        raise ValueError(
            f"the reference GPA was solved with tol={fit.tol:g}, max_iter={fit.max_iter}"
            f"{'' if fit.accelerate else ', accelerate=False'}, but the stability diagnostic "
            f"uses tol={tol:g}, max_iter={max_iter}; pass the same stopping rule (and the "
            "accelerated iterations), or leave reference out."
        )
    return fit


def _check_starts(n_starts: Any, seed: Any) -> None:
    """``n_starts`` ≥ 1 random starts and an integer ``seed`` (both diagnostics' arguments)."""
    if isinstance(n_starts, bool) or not isinstance(n_starts, (int, np.integer)) or n_starts < 1:
        raise ValueError(
            f"n_starts must be an integer >= 1, got {n_starts!r}: the diagnostic compares GPA's "
            "residuals with those from random starts; 4 is a good default."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}.")


def gpa_stability(
    embeddings: Sequence[Any],
    *,
    n_starts: int = 4,
    seed: int = 0,
    tol: float = _gpa.DEFAULT_TOL,
    max_iter: int = 1000,
    models: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    reference: _gpa.GPAResult | None = None,
    store: SolutionStore | None = None,
) -> GPAStability:
    """Per-stimulus residual spread and rank stability of GPA over random starts
    (:func:`gpa_over_starts`'s diagnostic; the arguments are its).
    """
    return gpa_over_starts(
        embeddings, n_starts=n_starts, seed=seed, tol=tol, max_iter=max_iter, models=models,
        progress=progress, reference=reference, store=store,
    )[1]


def gpa_over_starts(
    embeddings: Sequence[Any],
    *,
    n_starts: int = 4,
    seed: int = 0,
    tol: float = _gpa.DEFAULT_TOL,
    max_iter: int = 1000,
    models: Sequence[str] = (),
    layers: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    reference: _gpa.GPAResult | None = None,
    store: SolutionStore | None = None,
) -> tuple[_gpa.GPAResult, GPAStability]:
    """GPA from Gower's start and ``n_starts`` random starts: its answer (the adopted solution)
    and the per-stimulus residual spread and rank stability over all of them.

    Args:
        embeddings: M ≥ 2 arrays (n, d_i) of the same stimuli, as for
            :func:`procrustes.generalized_procrustes` (read in row blocks; memory maps are fine).
        n_starts: random starts besides the reference (Gower's start), ≥ 1.
        seed: seed of the random starts.
        tol, max_iter: the stopping rule of every solution (as in ``generalized_procrustes``).
        models: names of the inputs (empty or one per array).
        layers: layer names for the result (empty or one per array).
        progress: called with ``(solutions done, n_starts + 1)`` after the reference solution and
            after each random start.
        reference: ``generalized_procrustes(embeddings, tol=tol, max_iter=max_iter,
            keep_fit=True)`` of these embeddings, when it was just computed: its kept problem and
            solution are the reference solution, so the inputs are read once fewer and GPA is not
            solved again (the same numbers; a run's stability step after its GPA step).
        store: keeps every solution as it finishes and gives back those already kept, so an
            interrupted diagnostic solves only the rest (the random starts are drawn in the
            same order either way: the same numbers).

    Returns:
        ``(GPAResult, GPAStability)``: the adopted solution (:attr:`GPAStability.adopted`: the
        reference unless a random start reached a minimum lower by more than the optimum
        margin; its residuals come from the diagnostic's pass, no further pass over the inputs;
        no kept fit) and the diagnostic. The result's ``loss_history`` starts at its own start:
        the unaligned configurations for Gower's, the random maps' loss for a random start.
    """
    _check_starts(n_starts, seed)
    _gpa._check_options(tol, max_iter)
    arrays = _gpa._check_inputs(embeddings, tuple(str(x) for x in models))
    names = _gpa._check_names(models, len(arrays), "model names")
    layer_names = _gpa._check_names(layers, len(arrays), "layer names")
    tell = progress or (lambda done, total: None)
    if reference is None:
        problem, known = _gpa._prepare(arrays, _gpa._labels(len(arrays), names)), None
    else:
        fit = _reference_fit(reference, arrays, names, tol, max_iter)
        problem, known = fit.problem, fit.solution  # the reference solution, already solved
    shapes = [(problem.width(i), problem.p) for i in range(problem.n_models)]

    def solve(index: int, start: list[np.ndarray] | None) -> _gpa.GPASolution:
        kept = None if store is None else store.load(index, shapes)
        if kept is not None:
            return kept
        if index == 0 and known is not None:
            solution = known
        else:
            solution = _gpa._iterate(problem, tol=tol, max_iter=max_iter, start=start)
        if store is not None:
            store.save(index, solution)
        return solution

    solved = solve(0, None)
    tell(1, n_starts + 1)
    rng = np.random.default_rng(seed)
    starts = []
    for start in range(n_starts):
        # drawn even when the solution is kept: every later start is the same draw
        starts.append(solve(start + 1, _random_start(problem, rng)))
        tell(start + 2, n_starts + 1)
    solutions = [solved, *starts]
    stability, residuals = _measure(problem, arrays, solutions, tol=tol, seed=seed, names=names)
    fit = _gpa.GPAFit(problem, solutions[stability.adopted], float(tol), int(max_iter), True)
    result = _gpa._result(fit, arrays, names, layer_names, keep_fit=False, residuals=residuals)
    return result, stability


def _measure(
    problem: Any,
    arrays: Sequence[np.ndarray],
    solutions: Sequence[_gpa.GPASolution],
    *,
    tol: float,
    seed: int,
    names: tuple[str, ...],
) -> tuple[GPAStability, np.ndarray]:
    """The diagnostic of ``solutions`` (the reference first), from one pass over the inputs;
    also the adopted solution's residuals (n, M) (:func:`_adopted`; the reference's unless a
    random start reached a clearly lower minimum). Memory: the residuals of every solution,
    (S + 2, n, M) float64: O(n·M) per solution, no n × n array."""
    maps = [_gpa._full_maps(problem, s.maps) for s in solutions]
    maps.append(_gpa._full_maps(problem, solutions[0].previous_maps))
    residuals = _gpa._residuals(arrays, problem.means, problem.scales, maps)
    previous = residuals[-1]
    residuals = residuals[:-1]  # (S + 1, n, M)
    dispersion = residuals.mean(axis=2)  # (S + 1, n)
    ranks = ordinal_ranks(dispersion)
    losses = np.array([s.loss_history[-1] for s in solutions])
    at_best = losses <= losses.min() + optimum_margin(tol)  # GPAStability.same_optimum
    adopted = _adopted(losses, tol)
    others = [s for s in range(len(solutions)) if s != adopted]
    stability = GPAStability(
        dispersion=dispersion[adopted],
        residual_spread=residuals.max(axis=0) - residuals.min(axis=0),
        dispersion_spread=dispersion.max(axis=0) - dispersion.min(axis=0),
        residual_spread_at_best=_spread(residuals[at_best]),
        dispersion_spread_at_best=_spread(dispersion[at_best]),
        rank_low=ranks.min(axis=0).astype(np.int64),
        rank_high=ranks.max(axis=0).astype(np.int64),
        spearman=_spearman(dispersion[adopted], dispersion[others]),
        losses=losses,
        n_iter=np.array([len(s.loss_history) - 1 for s in solutions], dtype=np.int64),
        converged=np.array([s.converged for s in solutions]),
        last_step=np.abs(residuals[0] - previous),
        tol=float(tol),
        seed=int(seed),
        models=names,
        adopted=adopted,
        adopted_dispersion_change=np.abs(dispersion[0] - dispersion[adopted]),
    )
    return stability, residuals[adopted]


def _continued(
    problem: Any,
    solution: _gpa.GPASolution | None,
    start: list[np.ndarray] | None,
    *,
    tol: float,
    max_iter: int,
) -> _gpa.GPASolution:
    """``solution`` iterated on until the loss rule at ``tol`` holds (one history: the new
    iterations appended), or a new solve from ``start`` (None: Gower's start) when there is
    none yet; at most ``max_iter`` iterations in all."""
    if solution is None:
        return _gpa._iterate(problem, tol=tol, max_iter=max_iter, start=start)
    left = max_iter - (len(solution.loss_history) - 1)
    if left <= 0:
        return solution
    more = _gpa._iterate(problem, tol=tol, max_iter=left, start=solution.maps)
    return _gpa.GPASolution(
        maps=more.maps,
        previous_maps=more.previous_maps,
        loss_history=np.concatenate([solution.loss_history, more.loss_history[1:]]),
        converged=more.converged,
        gap_estimate=more.gap_estimate,
        sweeps=solution.sweeps + more.sweeps,
        loss_evaluations=solution.loss_evaluations + more.loss_evaluations,
        restarts=solution.restarts + more.restarts,
    )


@dataclass(frozen=True)
class UncertaintyStop:
    """Where :func:`gpa_to_uncertainty` stopped.

    Attributes:
        fraction: the rule: the reference's largest residual step ≤ ``fraction`` × the largest
            residual spread over the solutions.
        tol: the loss rule's tol of the last stage (every solution met it, or ran out of
            iterations).
        stages: how many stages ran (stage k: tol = max(FIRST_TOL · TOL_STEP^k, the floor)).
        step_over_spread: the ratio the rule compares with ``fraction``, at the stop; None
            when the largest spread is 0 (every solution ended at the same residuals, as GPA
            of two models always does: its optimum is unique up to a rotation), where there is
            no ratio and the rule cannot hold (see :func:`gpa_to_uncertainty`).
        met: whether the rule held (False: it stopped at the floor tol or at max_iter, as the
            default rule does).
    """

    fraction: float
    tol: float
    stages: int
    step_over_spread: float | None
    met: bool

    def describe(self) -> str:
        """One sentence for readers (Home page, report)."""
        if self.step_over_spread is None:  # every start ended at the same residuals
            return (
                "GPA was asked to stop at its residuals' uncertainty (gpa_stop = "
                "\"uncertainty\"), but every random start ended at the same residuals (a spread "
                "of 0, as GPA of two models always has: its optimum is unique up to a rotation), "
                "so there was no uncertainty to stop at: it ran to the loss rule at tol "
                f"{self.tol:.0e}, as GPA to its optimum does."
            )
        if not self.met:
            return (
                "GPA was asked to stop at its residuals' uncertainty (gpa_stop = "
                f"\"uncertainty\"), but the rule (a last step ≤ {self.fraction:g} × the largest "
                "spread over the random starts) did not hold before the loss rule at tol "
                f"{self.tol:.0e}: it stopped there, as GPA to its optimum does."
            )
        return (
            "GPA stopped at its residuals' uncertainty (gpa_stop = \"uncertainty\"): its last "
            "iteration moved no residual by more than "
            f"{self.step_over_spread:.2g} × the largest spread over the random starts (rule: "
            f"≤ {self.fraction:g}), at loss tol {self.tol:.0e} "
            f"({self.stages} stage{'s' if self.stages > 1 else ''}). Its loss is above the "
            "optimum's, and its residuals are about one such spread from the optimum's "
            "(README, GPA's stopping rule)."
        )


#: How a run's GPA stops (``precompute``'s ``gpa_stop``): ``"optimum"``, the loss rule to the
#: default tol (the same optimum as a tol = 1e-13 run); ``"uncertainty"``, once the residuals move
#: less than their spread over random starts (:func:`gpa_to_uncertainty`).
GPA_STOPS = ("optimum", "uncertainty")
#: The rule's default fraction of the spread, and the loss tol of its first stage and the factor
#: from one stage to the next.
UNCERTAINTY_FRACTION = 0.1
FIRST_TOL = 1e-6
TOL_STEP = 0.01


def gpa_to_uncertainty(
    embeddings: Sequence[Any],
    *,
    n_starts: int = 4,
    seed: int = 0,
    fraction: float = UNCERTAINTY_FRACTION,
    tol: float = _gpa.DEFAULT_TOL,
    max_iter: int = 1000,
    models: Sequence[str] = (),
    layers: Sequence[str] = (),
    progress: Callable[[float, int, int], None] | None = None,
) -> tuple[_gpa.GPAResult, GPAStability, UncertaintyStop]:
    """GPA that stops when its residuals move less than their own uncertainty.

    Where the loss is nearly flat (models of equal width: see :mod:`.procrustes`), the default
    rule spends hundreds of iterations on loss changes below 1e-8 while each stimulus's
    residuals wander within their spread between the loss's near-equal minima. Here GPA from
    Gower's start (the reference) and from ``n_starts`` random starts (as
    :func:`gpa_stability`, same seed: the same starts) are iterated in stages: in stage k every
    solution goes on until the loss rule holds at tol_k = max(``FIRST_TOL`` · ``TOL_STEP``^k,
    ``tol``); then one pass over the inputs gives every solution's residuals. It stops when the
    reference's largest residual step (its last iteration) is at most ``fraction`` × the
    largest residual spread over the solutions (``summary()["last_step_over_spread"]``), and
    otherwise continues every solution from its maps with the next tol. At the floor ``tol``
    (or ``max_iter`` iterations per solution) it stops as :func:`gpa_stability` does.

    A spread of 0 (every solution ended at the same residuals: so for two models, whose GPA has
    one optimum up to a rotation unless N₁ᵀN₂ is rank-deficient, an exactly degenerate input)
    means the residuals have no uncertainty to stop at:
    the rule does not hold there (not even for a step of 0, which is the loss rule's business),
    the stages go on to the floor tol, and the stop records ``step_over_spread`` None (a ratio
    ``x / 0`` would be infinite, which a run's strict JSON cannot hold).

    The result is the adopted solution, by the rule of :func:`gpa_over_starts` at the last
    stage's tol: the reference, unless a start's loss is below it by more than
    ``optimum_margin(tol)`` = 100 × that tol, more than stopping at that tol can account for
    (every solution stopped by the same loss rule; the step rule above is checked on the
    reference). Stopped at tol 1e-6, that margin (1e-4) is wider than the gaps between the
    loss's minima measured on issue 11's planted set (≤ 2e-5 over 12 problems; no adoption); it
    matters where the step rule never holds and the stages reach the floor tol, where this is
    GPA to its optimum and a worse minimum from Gower's start is replaced as there.

    Args:
        embeddings, n_starts, seed, max_iter, models: as for :func:`gpa_stability`.
        fraction: the rule's share of the spread, in (0, 1].
        tol: the floor: the default rule's tol (``procrustes.DEFAULT_TOL``).
        layers: layer names for the result (empty or one per array).
        progress: called with ``(stage tol, solutions done, n_starts + 1)`` after each solve.

    Returns:
        The adopted solution (the reference, as a rule) as a :class:`procrustes.GPAResult` (its
        loss is that of the stage's tol, not the optimum's), the diagnostic of all the
        solutions where they stopped, and :class:`UncertaintyStop`.
    """
    _check_starts(n_starts, seed)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
        0 < fraction <= 1
    ):
        raise ValueError(
            f"fraction must be a number in (0, 1], got {fraction!r}; {UNCERTAINTY_FRACTION} "
            "stops when the residuals move less than a tenth of their spread over the starts."
        )
    _gpa._check_options(tol, max_iter)
    arrays = _gpa._check_inputs(embeddings, tuple(str(x) for x in models))
    names = _gpa._check_names(models, len(arrays), "model names")
    layer_names = _gpa._check_names(layers, len(arrays), "layer names")
    problem = _gpa._prepare(arrays, _gpa._labels(len(arrays), names))
    rng = np.random.default_rng(seed)
    starts: list[list[np.ndarray] | None] = [None]
    starts += [_random_start(problem, rng) for _ in range(n_starts)]
    solutions: list[_gpa.GPASolution | None] = [None] * (n_starts + 1)
    stage_tol, stages = max(FIRST_TOL, float(tol)), 0
    while True:
        stages += 1
        for index, start in enumerate(starts):
            solutions[index] = _continued(
                problem, solutions[index], start, tol=stage_tol, max_iter=max_iter
            )
            if progress is not None:
                progress(stage_tol, index + 1, n_starts + 1)
        solved = [s for s in solutions if s is not None]
        stability, residuals = _measure(
            problem, arrays, solved, tol=stage_tol, seed=seed, names=names
        )
        spread = float(stability.residual_spread.max())
        moved = float(stability.last_step.max())
        # no spread, no uncertainty to stop at (and no finite ratio): the loss rule decides
        ratio = moved / spread if spread > 0 else None
        met = ratio is not None and ratio <= fraction
        out_of_iterations = all(len(s.loss_history) - 1 >= max_iter for s in solved)
        if met or stage_tol <= tol or out_of_iterations:
            break
        stage_tol = max(stage_tol * TOL_STEP, float(tol))
    # GPA's answer: the reference unless a start ended clearly lower (beyond the stage's margin)
    fit = _gpa.GPAFit(problem, solved[stability.adopted], stage_tol, int(max_iter), True)
    result = _gpa._result(fit, arrays, names, layer_names, keep_fit=False, residuals=residuals)
    return result, stability, UncertaintyStop(float(fraction), stage_tol, stages, ratio, met)
