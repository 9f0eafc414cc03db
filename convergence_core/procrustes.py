"""Generalized Procrustes Analysis (GPA) of several models' embeddings of the same stimuli.

Method (paper 000, §2.1-2.2): each model's (n, d_i) embedding X_i is centered over stimuli and
scaled to unit Frobenius norm, N_i = (X_i − μ_i) / s_i, and zero-padded to d = max d_i
(:func:`preprocess_embeddings`). GPA finds the maps R_i (d_i × d, orthonormal rows: rotations and
reflections, no scaling) that minimise the loss ``Σ_i ||N_i R_i − C||²_F`` with C = mean of the
aligned configurations N_i R_i (the consensus). The per-stimulus residual
r_ji = ||(N_i R_i)_j − C_j|| (Euclidean, in units of the unit-norm configurations) is stored as
``residuals[j, i]``.

Cross-product formulation (what makes large n cheap). Everything the iterations need is a function
of the cross-products C_ij = N_iᵀ N_j (d_i × d_j): with maps T_i (d_i × p, orthonormal rows),
S = Σ_i N_i T_i and ||N_i T_i||² = tr C_ii = 1,

    loss = Σ_i tr C_ii − ||S||²_F / M,   ||S||²_F = Σ_ij tr(T_iᵀ C_ij T_j),
    N_iᵀ (Σ_{j≠i} N_j T_j) = Σ_{j≠i} C_ij T_j.

So the data are read three times in row blocks (float64 sums; inputs may be float32 memory maps and
are never copied whole): column means (and the finiteness check), the cross-products (one
symmetric (D, D) matrix, D = Σ d_i), and at the end the residuals. An iteration then costs
O(M² d³), independent of n. When n − 1 < d_i a model's centered configuration has rank ≤ n − 1:
it is written as N_i = Z_i V_iᵀ (its thin SVD, n − 1 singular triplets; V_i orthonormal columns)
and the iterations use Z_i, r_i = min(n − 1, d_i) columns, with p = min(n − 1, d) ≥ r_i consensus
columns; such a problem is read model by model (n < d_i there) and never forms the (D, D)
cross-products of the full widths (3 × 20,000 features would need 29 GB), and the model's map is
R_i = V_i T_i (d_i × p, orthonormal columns). The optimum needs no more columns (the loss
is M − ||S||²_F / M with ||S||_F = max over unit-norm Y of Σ_i tr(Yᵀ Z_i T_i) ≤ Σ_i ||Z_iᵀ Y||_*,
with equality for T_i = polar(Z_iᵀ Y), whose rows lie in the row space of Y, of rank ≤ n − 1).

Rows instead of cross-products (few stimuli, many models). A sweep on the cross-products costs
Σ_{i≠j} r_i r_j p flops, growing with the square of the number of models M. Computed on the
coordinates themselves, with the sum S = Σ_j Z_j T_j (n × p) kept up to date as each model moves,
model i's target is Z_iᵀ (S − Z_i T_i) and the loss is Σ_i tr C_ii − ||S||²_F / M: about 4·n·R·p
flops per sweep (R = Σ r_i), the same iterates with other rounding. :func:`_prepare` keeps the
rows when that is fewer flops (:func:`_rows_cheaper`, i.e. roughly when 4n < (M − 1)·r), which
also spares the (R, R) cross-products: a universal space of 14 models (768-2,048 features, ~1,000
coordinates each after its principal axes) fitted on 1,000 stimuli took 47 s instead of 76 s, on
800 stimuli 24 s instead of 50 s (7 iterations each; residuals equal to 6e-17).

Iterations (:data:`GPA_ALGORITHM`):

1. Start (Gower 1975): the widest model as it is; every next model, in order of decreasing width,
   rotated onto the sum of those already placed. If that start has a larger loss than the unaligned
   configurations (possible when the models' raw feature axes already agree), iteration 1 is instead
   the textbook step: every model rotated onto the unaligned mean C_0, which never increases the
   loss.
2. Block sweeps (ten Berge 1977): each model in turn (same order) rotated onto the sum of the
   *other* models' current configurations, T_i = polar(Σ_{j≠i} C_ij T_j). With the others fixed
   this rotation minimises the loss exactly, so a sweep never increases the loss. At a fixed point
   each model is also the Procrustes rotation onto the mean of all aligned configurations (if
   N_iᵀ S_{≠i} = H T_i with H symmetric positive semidefinite, then N_iᵀ (N_i T_i + S_{≠i}) =
   (N_iᵀ N_i + H) T_i has the same polar factor T_i): the paper's fixed point. The frame is fixed
   so that the widest model's map is the identity (the loss and the residuals do not depend on the
   frame; the sweep commutes with it): that model moves first, to Q, and the sweep goes on in the
   frame where it is I again, the maps not yet updated turned into it with one product by Qᵀ per
   model. That spares the products with the identity map and a pass over all maps afterwards:
   a sweep of 4 × 768 took 0.47 s instead of 0.53 s.
3. Acceleration (Anderson 1965, "type II", window ``_AA_WINDOW``): the sweep is a fixed-point map
   x ↦ g(x) on the maps of the other models; the next sweep starts from the Anderson combination of
   the last few (x, g(x)) pairs (a secant / GMRES-like extrapolation), projected back onto maps
   with orthonormal rows (Newton–Schulz). Safeguard: the combination is kept only when the sweep
   from it ends below the last accepted loss; otherwise the history is dropped and a plain sweep
   is taken from the last accepted maps, followed by a line search that extrapolates along that
   sweep's step (x + 2^k step, k = 1, 2, ... while the loss falls). The line search is what leaves
   the near-saddle plateaus that make plain sweeps slow at large n: near a saddle the plain sweeps
   grow the unstable direction by a factor close to 1 per sweep, and their step points along it.
   The loss history records the accepted sweeps only, so it is **non-increasing**, and every
   accepted iterate is a sweep output: the fixed point and its characterisation above are
   unchanged. ``accelerate=False`` runs the plain sweeps (the iterates of version 1 of this
   module, which checks them against an independent transcription).

Stopping rule. Plain sweeps converge linearly with a per-sweep ratio of decreases ρ close to 1;
stopping when one iteration lowers the loss by less than ``tol`` leaves the loss up to
~ρ/(1−ρ)·tol above the optimum (version 1 run to tol = 1e-13 ended 3-5.5e-12 above the lowest loss
found, at tol = 1e-10 2-4e-9 above it). The rule estimates the remaining decrease: with Δ_k the
decrease of accepted iteration k and ρ the largest ratio Δ_j/Δ_{j−1} of the last three (capped at
``_MAX_RATE``), a stop is due when both Δ_k and Δ_k·ρ/(1−ρ) are below ``tol``, or when two
decreases in a row are below the rounding level of the loss (``_LOSS_ROUNDING`` · M; the loss is
a difference of O(M) terms). Plain sweeps (``accelerate=False``) stop there
(``GPAResult.gap_estimate`` = Δ_k·ρ/(1−ρ), or Δ_k at rounding). Accelerated decreases do not
contract linearly: they stall for an iteration or three and then fall again (on a problem of
4 × 64, n = 120, they fell to 9e-14 and the next five took another 2.3e-13), and no rule built
only on them foresees that. So an accelerated run confirms a due stop with one plain sweep from
its current maps, recorded as an iterate. With δ that sweep's decrease, computed from the step
(:meth:`_Iterations.decrease`: the difference of two losses carries ~1e-15 of rounding, as much
as δ itself near the optimum), it stops when δ·ρ/(1−ρ) with ρ = ``_MAX_RATE`` is below
max(``tol``, rounding level), and that is ``gap_estimate``: the loss left above the (local)
optimum if a plain sweep removes at least 1 − ρ of it, as block Gauss–Seidel with a per-sweep
contraction of the excess ≤ ρ does (near the optimum of the 4 × 96 case below plain sweeps
removed 3-9 % per sweep). Otherwise the acceleration goes on, the plain sweep's (x, g(x)) pair
joining its history. Measured (24 problems: ``bench_gpa_scale``'s signal, rank 16, noise 0.2;
4 models of widths 96 or 48/64/80/96; n = 150, 300; seeds 0-5): before the check the default
stopped up to 1.5e-13 above the lowest loss of a run to rounding (one case over 1e-13, its gap
estimate 4.1e-14; residuals up to 7.6e-8 from that run's), with it at most 3.1e-15 above
(residuals within 8.4e-9), for 9 % more sweeps (841 against 769; the runs to rounding took 823).
On ``benchmarks/bench_gpa_scale.py`` (``--quick``: 4 × 96, n = 400, 800; n = 2,000: 4 × 256 and
128/160/192/256) the default ended at most 4.1e-14 above the lowest loss found, where it had ended
up to 1.1e-13 above it (4 × 96, n = 400), in 71, 55, 122 and 13 iterations against 64, 50, 121 and
10; the tol = 0 run of 4 × 256 had itself stopped 4.1e-14 above the lowest loss before. At
4 × 768, n = 2,000 (``--dims 768,768,768,768 --methods new,tight``) the default took 278
iterations (307 sweeps; 269-285 before the check) and ended 2.4e-14 above the tol = 0 run's loss. The check
is dearest at loose tolerances: at tol = 1e-6 on 4 × 64, n = 400, 45 iterations instead of 34
(the first check's δ = 6e-8 certifies only 5.9e-6). Tried and not kept: ρ measured as the ratio
of two checking sweeps' decreases (cheaper, +6 % sweeps): the plain sweeps from an accelerated
iterate start with fast components, so that ratio was 0.8 where the excess later shrank by 0.97
per sweep, and the worst case still ended 1.3e-13 above with a gap estimate of 3.6e-14.

Convergence speed (measured: ``benchmarks/bench_gpa_scale.py``, synthetic rank-k signal plus
isotropic noise). The number of sweeps depends on the widths and barely on n. Models of *equal*
width are the hard case: the cross-products of their model-specific ("noise") parts are square,
random-like matrices whose singular values reach down to ~0 (the hard edge of the Marchenko–Pastur
law), so the loss has directions of almost no curvature and near-saddles. With 4 models of width
256 the accelerated iterations need ~90-130 sweeps (plain sweeps: 500-740 to rounding), at width
768 ~250 (plain: thousands); n from 2,000 to 128,000 (width 256) changed the sweeps by ±20 %
without a trend, but at width 768 n = 100,000 took 667 iterations (757 sweeps, 498 s of 520 s
with the sweep in the reference's frame, 689 iterations and 670 s before it; 13 s cross-products,
9 s residuals, peak RSS 0.67 GB) against 269-285 at n = 2,000. *Distinct*
widths make those cross-products rectangular, their smallest singular values stay away from 0,
and ~10-15 sweeps suffice (widths 128/160/192/256 or 96/128/192/256; 37 with two models of the
largest width). Every sweep costs O(M² d³), so time at large n is the three
passes over the inputs plus (sweeps × a cost set by the widths): n = 100,000 × widths
768/1024/1280/1536 took 183 s on one core (46 s cross-products, 15 sweeps in 107 s, 29 s
residuals), peak RSS 3.2 GB of which 1.8 GB are the memory-mapped float32 inputs.

Tried for the equal-width case and not kept (4 × 768, n = 2,000, rank 64, noise 0.2: 269
iterations, 204 s here):

* A longer Anderson window (16 past steps instead of 6): 273 iterations instead of 268.
* Riemannian Newton with preconditioned conjugate gradients (the Hessian of the loss pulled back
  through T_i exp(Ω_i), in each model's eigenbasis of sym(T_iᵀ G_i), preconditioned by the
  per-model block Hessians, Cayley retraction, backtracking): the smallest block curvatures are
  ~5e-6 against ~0.3 for the largest, so each step took 50-400 CG iterations and the loss still
  fell only linearly: from 10 sweeps, 30 Newton steps (~500 s) left it 1.7e-9 above the Gower
  run's minimum; from 1.4e-8 above it, one step of 414 CG iterations (69 s) was accepted only at
  1/8 of its length.
* An eigen start (the top p eigenvectors of the stacked cross-products, the maximiser of
  Σ_ij tr(T_iᵀ C_ij T_j) with one constraint on the whole stack, projected per model): 109 and
  130 iterations instead of 269 and 189 on two seeds of this case, ending in a different local
  minimum 8e-8 lower. But it is not better in general: on 16 random smaller problems (4 equal
  widths 16-128) the lower minimum came from Gower's start 6 times, from the eigen start 7
  times (3 ties), and at width 256 either start was faster or lower depending on the seed. The
  loss of equal-width problems has many local minima: within ~1e-7-1e-5 of each other on those
  cases, but on small ones far more apart (4 models of width 12, 40 stimuli: Gower's start
  ended 3.7e-4 to 2.4e-3 above the lowest of many starts in 5 of 8 seeds, and the lowest of
  the run's 4 random starts still 7e-4 to 1e-3 above it in 2, dispersion up to 15 % off);
  :mod:`gpa_stability` measures what they do to the residuals, and flags such runs.
* Group moves (after each plain sweep, each pair of the three non-reference models rotated
  together onto the other two, one polar factor per pair; 4 × 128, n = 2,000): 340 sweeps to
  rounding instead of 359, each slower. The slow direction (the step of the last plain sweeps)
  lies wholly in rotations among each model's directions of small block curvature (eigenvalues
  1.2e-5 to 1e-3 of sym(T_iᵀ G_i), the models' "noise" dimensions, against 0.08 for the
  signal's) and is spread over all 64 of them (the 8 smallest hold 11-73 % of it): neither a
  move of whole models nor a Newton step on a few directions catches it.
* Sweeps that keep the reference at I instead of moving it first (the same stationary points:
  the reference's condition follows from the others'; at width 768 6 products and 3 polar
  factors instead of 11 and 4): more iterations than that saves (4 × 128, 3 seeds: 134, 78, 50
  against 49, 63, 36; 4 × 256, 2 seeds: 106, 153 against 79, 84).
* Symmetric sweeps (each model in order, then back in reverse order: 7 block steps instead of 4)
  under the same acceleration: fewer iterations (4 × 128, 3 seeds: 44, 48, 31 against 49, 63,
  36; 4 × 256: 62, 76 against 79, 84) but more block steps (315, 385, 224 against 200, 264,
  148; 497, 567 against 336, 356), and more time.
* Over-relaxed sweeps (each model's step extrapolated by ω, T_i + ω (polar(target) − T_i),
  projected back; 4 × 128, n = 2,000): plain sweeps to rounding fell from 348 (ω = 1) to 216,
  149 and 124 (ω = 1.5, 1.8, 1.9), but under Anderson acceleration ω = 1.3, 1.6 and 1.9 took
  50, 76 and 83 iterations against 48 on one seed and 54, 48 and 53 against 62 on another:
  no gain the acceleration does not already make.
* Where a sweep's time goes (4 × 768): 0.64 s, of which four polar factors 0.11 s each (its
  eigendecomposition 0.063 s) and eleven 768 × 768 products 0.011 s each. The eigendecomposition
  cannot move to float32: the smallest eigenvalue of a aᵀ is ~6e-9 of its largest (after 30
  sweeps), below float32's resolution.

Why those sweeps are needed (measured: ``benchmarks/measure_gpa_curvature.py``, the whole Hessian
of the loss at the optimum on this case made narrower, widths 16-64, 3 seeds each, n = 2,000).
The Hessian's condition number κ is 1e5-2e6, but a sweep minimises exactly over one model at a
time, which removes the curvature within each model: what is left is κ_block, the condition
number of the Hessian preconditioned by its per-model blocks, 53-827 on these widths and growing
as width^1.34. Plain sweeps took 0.3-1.0 × κ_block iterations and the accelerated ones 1.5-3.3 ×
√κ_block (Spearman 0.95 and 0.89 over the 15 problems), as block Gauss–Seidel and a Krylov-type
acceleration of it would. Extrapolated to width 768, κ_block ≈ 1.1e4 predicts 160-345
accelerated iterations (median 250), and 269-286 were measured. Reaching the optimum in ~20
sweeps would need κ_block near 100 there: a preconditioner of the coupling *between* models,
which none of the attempts above (the Newton step's preconditioner was the same per-model
blocks: hence its 50-400 CG iterations) provides.

What is offered instead for that case: stopping where the residuals are as determined as the
minima allow (``gpa_stability.gpa_to_uncertainty``, a run's ``gpa_stop="uncertainty"``): ~20
iterations here, residuals about one spread between minima from the optimum's; the default stays
the optimum.

Procrustes step without an SVD. With A = Σ_{j≠i} C_ij T_j (r × p, r ≤ p) of full row rank, the
orthogonal polar factor is polar(A) = (A Aᵀ)^{-1/2} A = W · rownormalise(Wᵀ A) with the symmetric
eigendecomposition A Aᵀ = W Λ Wᵀ (r × r): the row norms of Wᵀ A are Λ^{1/2}, measured on Wᵀ A
instead of taken from the computed eigenvalues, whose absolute error ε·λ_max would otherwise
mis-scale the rows of small eigenvalues. An eigendecomposition is 2-3× cheaper than an SVD of the
same size here. Squaring A squares its condition number: the eigenvectors of small eigenvalues
carry errors ~ε·λ_max/λ, which show up as rows that are not orthonormal. The measured departure
||T Tᵀ − I||_F is the error estimate (it bounded the error against the SVD route in every tested
step); above ``_EIGH_POLAR_MAX_ERROR`` (rank deficiency, ill conditioning) the step uses the SVD of
A. Newton–Schulz steps then make the rows orthonormal to rounding, which the loss formula above
relies on.

Result record. :class:`GPAResult` holds the small arrays that reproduce the aligned configurations:
the maps R_i (d_i × d), the column means μ_i (d_i,) and the scales s_i, so that
aligned_i = ((X_i − μ_i) / s_i) R_i for any rows; :meth:`GPAResult.aligned_rows` and
:meth:`GPAResult.consensus_rows` compute them for given rows. Nothing of size n × d is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from .memory_maps import read_rows, release
from .validation import (
    _check_finite,
    _label,
    check_embedding_set,
    check_features,
    numeric_matrix,
)


# Names the iteration scheme (see the module docstring); part of the cache key of stored GPA
# results.
GPA_ALGORITHM = "gower-start+ten-berge-blocks+anderson/3"

# Default of ``tol``: the estimated remaining decrease of the loss at which the iterations stop.
DEFAULT_TOL = 1e-13

# Rows per block when reading the inputs: a block of all models in float64 is ~this many bytes.
_BLOCK_BYTES = 1 << 26

# Largest accepted error estimate (Frobenius) of the eigendecomposition route in `_polar`; above
# it the SVD is used. The estimate is the measured departure from orthonormal rows, ||T Tᵀ − I||_F
# (the route's error comes from the eigenvectors of small eigenvalues of a aᵀ, computed to
# ~ε·λ_max/λ, and shows up as non-orthogonal rows): the error against the SVD route stayed below
# 0.76× it over 300 random ill-conditioned steps (tests/test_procrustes.py checks ≤ 1×). An error
# δ of a step costs at most ~½·s_max·δ² ≤ 5e-13 in the loss (s_max ≤ 1, the block curvature):
# far below the stopping tolerances, and it lands in the weakly coupled directions where the
# block curvature is smallest. On the benchmark problem (width 768, n = 2,000) the estimates are
# 2-4e-8 while the a-priori first-order bound ε·λ_max·||Λ^{-1/2}||_F/sqrt(λ_min) is 2-9e-7.
_EIGH_POLAR_MAX_ERROR = 1e-6

# Anderson acceleration: how many past (x, g(x)) differences enter the combination, and the
# Tikhonov regularisation of its least-squares problem (relative to the trace of the Gram matrix).
_AA_WINDOW = 6
_AA_REGULARISATION = 1e-10
# Largest step multiplier tried by the extrapolating line search (2, 4, ..., 2**_LINE_SEARCH_STEPS).
_LINE_SEARCH_STEPS = 12
# Cap of the estimated per-iteration ratio of loss decreases in the stopping rule (so at most
# 99 × the last decrease is assumed to remain).
_MAX_RATE = 0.99
# Decreases below this × M are rounding: the loss is a difference of O(M) float64 terms, each a
# sum of ~d² products (observed run-to-run noise of the final loss: ~1e-15).
_LOSS_ROUNDING = 4e-15


@dataclass(frozen=True, init=False)
class GPAResult:
    """Outcome of :func:`generalized_procrustes` for n stimuli and M models (d = max d_i; the
    aligned configurations have p = min(n − 1, d) columns).

    Attributes:
        residuals: (n, M) float64; ``residuals[j, i]`` = distance of stimulus j of model i (after
            alignment) from consensus row j. Units: the configurations have unit Frobenius norm.
        loss_history: (n_iter + 1,) float64; entry 0 is the loss of the unaligned configurations,
            entry t the loss Σ_i ||aligned_i − consensus||²_F after accepted iteration t.
            Non-increasing. (A solution from a random start, which a run adopts when it reached
            a lower minimum than Gower's start, ``gpa_stability.gpa_over_starts``: entry 0 is the
            loss at that start.)
        n_iter: number of accepted iterations (iteration 1 is the start).
        converged: True when the stopping rule was met (see the module docstring).
        models, layers: names of the inputs, in order (may be empty).
        maps: M float64 arrays (d_i, p), p = min(n − 1, d), with orthonormal rows (when
            n − 1 < d_i: orthonormal columns spanning the row space of the centered data):
            aligned_i = ((X_i − means[i]) / scales[i]) @ maps[i]. Empty for a result read from a
            run stored before maps were kept; a run written by an earlier version may hold (d_i, d)
            maps, whose columns past p are zero on the data.
        means: M float64 arrays (d_i,), the column means μ_i of the inputs.
        scales: (M,) float64, the Frobenius norms s_i of the centered inputs.
        gap_estimate: the stopping rule's estimate of the remaining decrease of the loss (≥ 0;
            NaN when unknown): at an accelerated run's stop, ρ/(1−ρ) (ρ = 0.99) times the
            decrease of the plain sweep that confirmed it, a bound if plain sweeps remove at
            least 1 % of the loss above the optimum per sweep (see the module docstring).
        inputs: the M input arrays (n, d_i), kept by reference (never copied) so that
            :attr:`aligned` and :attr:`consensus` can be computed; None when not kept.
        fit: the :class:`GPAFit` of the solve (``generalized_procrustes(..., keep_fit=True)``),
            for :func:`.gpa_stability` on the same inputs; None otherwise.

    :attr:`aligned` (M arrays (n, p)) and :attr:`consensus` (n, p) are computed on first access
    from ``inputs`` (O(n·d) memory each: for large n use :meth:`aligned_rows` /
    :meth:`consensus_rows` on the rows you need). A result built with ``consensus=`` and
    ``aligned=`` arrays (a run stored before maps were kept) returns those instead.
    """

    residuals: np.ndarray
    loss_history: np.ndarray
    n_iter: int
    converged: bool
    models: tuple[str, ...]
    layers: tuple[str, ...]
    maps: tuple[np.ndarray, ...]
    means: tuple[np.ndarray, ...]
    scales: np.ndarray
    gap_estimate: float
    inputs: tuple[Any, ...] | None = field(repr=False, compare=False)
    fit: GPAFit | None = field(repr=False, compare=False)
    _stored_consensus: np.ndarray | None = field(repr=False, compare=False)
    _stored_aligned: tuple[np.ndarray, ...] | None = field(repr=False, compare=False)

    def __init__(
        self,
        residuals: np.ndarray,
        loss_history: np.ndarray,
        n_iter: int,
        converged: bool,
        models: Sequence[str] = (),
        layers: Sequence[str] = (),
        *,
        maps: Sequence[np.ndarray] = (),
        means: Sequence[np.ndarray] = (),
        scales: Sequence[float] | np.ndarray = (),
        gap_estimate: float = float("nan"),
        inputs: Sequence[Any] | None = None,
        fit: GPAFit | None = None,
        consensus: np.ndarray | None = None,
        aligned: Sequence[np.ndarray] | None = None,
    ) -> None:
        put = object.__setattr__
        put(self, "residuals", residuals)
        put(self, "loss_history", loss_history)
        put(self, "n_iter", int(n_iter))
        put(self, "converged", bool(converged))
        put(self, "models", tuple(models))
        put(self, "layers", tuple(layers))
        put(self, "maps", tuple(maps))
        put(self, "means", tuple(means))
        put(self, "scales", np.asarray(scales, dtype=np.float64))
        put(self, "gap_estimate", float(gap_estimate))
        put(self, "inputs", None if inputs is None else tuple(inputs))
        put(self, "fit", fit)
        put(self, "_stored_consensus", consensus)
        put(self, "_stored_aligned", None if aligned is None else tuple(aligned))

    # -- reproducing the aligned configurations -------------------------------------------------
    def _inputs_for(self, embeddings: Sequence[Any] | None) -> Sequence[Any]:
        if not self.maps:
            raise ValueError(
                "this GPA result holds no maps (a run stored before maps were kept), so it cannot "
                "compute aligned rows; recompute the run's GPA."
            )
        arrays = self.inputs if embeddings is None else tuple(embeddings)
        if arrays is None:
            raise ValueError(
                "this GPA result does not keep its inputs; pass the M embeddings it was computed "
                "from (same order, same stimuli) as `embeddings`."
            )
        if len(arrays) != len(self.maps):
            raise ValueError(
                f"got {len(arrays)} embedding arrays for a GPA result of {len(self.maps)} models; "
                "pass the arrays it was computed from, in the same order."
            )
        for i, (x, r) in enumerate(zip(arrays, self.maps)):
            shape = np.shape(x)
            if len(shape) != 2 or shape[1] != r.shape[0] or shape[0] != self.residuals.shape[0]:
                raise ValueError(
                    f"embedding {i} has shape {shape}, but the GPA result expects "
                    f"({self.residuals.shape[0]}, {r.shape[0]}); pass the arrays it was computed "
                    "from, in the same order."
                )
        return arrays

    def aligned_rows(
        self, rows: Any = None, embeddings: Sequence[Any] | None = None
    ) -> np.ndarray:
        """Aligned configurations of the given stimuli.

        Args:
            rows: stimulus indices (int array, slice or boolean mask over the n stimuli); None for
                all (O(M·n·d) memory).
            embeddings: the M input arrays (n, d_i); default: the inputs kept by reference.

        Returns:
            (M, r, p) float64: row k of model i is ((X_i[rows][k] − μ_i) / s_i) @ R_i.
        """
        arrays = self._inputs_for(embeddings)
        index = slice(None) if rows is None else rows
        return np.stack(
            [
                _aligned_block(np.asarray(x[index]), mu, s, r)
                for x, mu, s, r in zip(arrays, self.means, self.scales, self.maps)
            ]
        )

    def consensus_rows(
        self, rows: Any = None, embeddings: Sequence[Any] | None = None
    ) -> np.ndarray:
        """Consensus rows (r, p) float64 of the given stimuli: the mean of :meth:`aligned_rows`."""
        arrays = self._inputs_for(embeddings)
        index = slice(None) if rows is None else rows
        total = None
        for x, mu, s, r in zip(arrays, self.means, self.scales, self.maps):
            block = _aligned_block(np.asarray(x[index]), mu, s, r)
            total = block if total is None else total + block
        return total / len(self.maps)

    @cached_property
    def consensus(self) -> np.ndarray:
        """(n, p) float64 consensus configuration (computed from the kept inputs; see the class)."""
        if self._stored_consensus is not None:
            return self._stored_consensus
        return self.consensus_rows()

    @cached_property
    def aligned(self) -> list[np.ndarray]:
        """M arrays (n, p), each model's aligned configuration (computed from the kept inputs)."""
        if self._stored_aligned is not None:
            return list(self._stored_aligned)
        return list(self.aligned_rows())


def _aligned_block(
    x: np.ndarray, mean: np.ndarray, scale: float, rotation: np.ndarray
) -> np.ndarray:
    """((x − mean) / scale) @ rotation in float64, for an (r, d_i) block of one model's rows."""
    centered = np.asarray(x, dtype=np.float64) - mean
    return (centered @ rotation) / scale


#: The range of a model's largest |value| that GPA takes (:func:`_check_magnitude`): its
#: cross-products square the values, and beyond it they overflow to inf or underflow to zero
#: (a model × 1e155 gave a singular matrix, or silently a model of zeros; × 1e-170 "identical
#: for every stimulus"); GPA scales each model to unit norm, so rescaling one changes nothing.
MAGNITUDE_RANGE = (1e-100, 1e100)


def _check_magnitude(largest: float, label: str) -> None:
    """ValueError, with the fix, for a model whose largest |value| lies outside
    :data:`MAGNITUDE_RANGE` (0, a constant model of zeros, is left to the zero-variance check)."""
    low, high = MAGNITUDE_RANGE
    if largest == 0.0 or not np.isfinite(largest) or low <= largest <= high:
        return  # zeros, NaN and inf have checks (and messages) of their own
    raise ValueError(
        f"{label}'s largest |value| is {largest:.1e}, outside the range {low:.0e} to {high:.0e} "
        "that GPA handles in float64 (its cross-products square the values); rescale the model "
        "first, "
        "e.g. X / np.abs(X).max(): GPA scales every model to unit norm, so this changes nothing "
        "else."
    )


def _center_and_scale(X: np.ndarray, label: str) -> np.ndarray:
    """Center (m, d) over stimuli and scale to unit Frobenius norm (float64)."""
    _check_magnitude(float(np.max(np.abs(X))) if X.size else 0.0, label)
    centered = X - X.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(centered)
    if not norm > 0.0:
        raise ValueError(_zero_variance_message(label))
    return centered / norm


def _zero_variance_message(label: str) -> str:
    return (
        f"{label} is identical for every stimulus (zero variance after centering), so it "
        "cannot be scaled to unit norm; drop this model or check its extraction."
    )


def _labels(n: int, models: Sequence[str]) -> list[str]:
    return [_label(i, models or None) for i in range(n)]


def preprocess_embeddings(
    embeddings: Sequence[np.ndarray], *, models: Sequence[str] = ()
) -> list[np.ndarray]:
    """Center each embedding over stimuli, zero-pad to the largest dimension, unit Frobenius norm.

    Args:
        embeddings: M ≥ 2 arrays (m, d_i) of the same m ≥ 3 stimuli in the same order.
        models: optional names, used in error messages.

    Returns:
        M float64 arrays of shape (m, d), d = max d_i, each with column means 0 and norm 1.
    """
    arrays = check_embedding_set(embeddings, list(models) or None)
    d = max(a.shape[1] for a in arrays)
    out = []
    for label, a in zip(_labels(len(arrays), models), arrays):
        scaled = _center_and_scale(a, label)
        out.append(np.pad(scaled, ((0, 0), (0, d - a.shape[1]))))
    return out


def procrustes_align(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal Procrustes: the orthogonal R minimising ||source R − target||_F.

    Reflections are allowed and there is no scaling. R = U Vᵀ from the SVD sourceᵀ target = U S Vᵀ.

    Args:
        source, target: arrays of the same shape (m, d).

    Returns:
        (source @ R, R) with R of shape (d, d), float64.
    """
    source = check_features(source, "source")
    target = check_features(target, "target")
    if source.shape != target.shape:
        raise ValueError(
            f"source has shape {source.shape} but target has {target.shape}; they must match. "
            "Zero-pad the narrower one (preprocess_embeddings does this) and select the same rows."
        )
    u, _, vt = np.linalg.svd(source.T @ target)
    rotation = u @ vt
    return source @ rotation, rotation


# -- the Procrustes step --------------------------------------------------------------------------
def _polar_rows(a: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor P Qᵀ of an (r, p) matrix with r ≤ p (thin SVD a = P S Qᵀ)."""
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def _eigh_polar(a: np.ndarray) -> tuple[np.ndarray, float]:
    """polar(a) of an (r, p) matrix, r ≤ p, from the eigendecomposition of a aᵀ, one Newton–Schulz
    step, and an estimate of its Frobenius error: ||T₀ T₀ᵀ − I||_F of the route's raw result T₀
    (``inf`` when a aᵀ is not numerically positive definite)."""
    # numpy only (it computes x @ x.T with a symmetric rank-k update): interleaving scipy's own
    # BLAS/LAPACK with numpy's makes the two thread pools compete and was 2-3× slower here.
    lam, w = np.linalg.eigh(a @ a.T)
    if not lam[0] > 0.0:
        return np.empty_like(a), np.inf
    # polar(a) = W Λ^{-1/2} Wᵀ a, with Λ^{1/2} taken as the row norms of Wᵀ a rather than from the
    # computed eigenvalues: their absolute error ε·λ_max would mis-scale the rows of the small
    # eigenvalues (5-1000× larger errors otherwise).
    rows = w.T @ a
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    t = w @ rows
    e = t @ t.T
    e[np.diag_indices_from(e)] -= 1.0
    error = float(np.linalg.norm(e))
    # Newton–Schulz: the departure from orthonormal rows becomes ~¾·error², so that the loss
    # formula (which assumes orthonormal rows) holds to rounding (≤ 1e-15 after one step from 3e-8)
    t = t - 0.5 * (e @ t)
    if error > 3e-8:
        t = _orthonormalise_rows(t)
    return t, error


def _orthonormalise_rows(t: np.ndarray, steps: int = 1) -> np.ndarray:
    """Newton–Schulz steps t ← t − ½ (t tᵀ − I) t towards the nearest matrix with orthonormal
    rows (quadratic convergence; for t whose rows are already orthonormal to ~1e-4 or better)."""
    for _ in range(steps):
        e = t @ t.T
        e[np.diag_indices_from(e)] -= 1.0
        t = t - 0.5 * (e @ t)
    return t


def _polar(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """polar(a) (r, p) with orthonormal rows, and True when the eigendecomposition route was used
    (False: it was not accurate enough, the SVD of a was used)."""
    t, error = _eigh_polar(a)
    if error <= _EIGH_POLAR_MAX_ERROR:
        return t, True
    return _polar_rows(a), False


def _project_rows(t: np.ndarray) -> np.ndarray:
    """A matrix with orthonormal rows close to an extrapolated map t: one Newton–Schulz step when t
    is already close (it only proposes where the next sweep starts), the polar factor otherwise."""
    e = t @ t.T
    e[np.diag_indices_from(e)] -= 1.0
    error = float(np.abs(e).max())
    if not error < 0.05:
        return _polar(t)[0]
    t = t - 0.5 * (e @ t)  # error → ~¾·error²
    return t if error < 1e-3 else _orthonormalise_rows(t, 1 if error < 1e-2 else 2)


# -- input checks without float64 copies ----------------------------------------------------------
def _check_options(tol: float, max_iter: int) -> None:
    if not (isinstance(tol, (int, float, np.floating)) and np.isfinite(tol) and tol >= 0):
        raise ValueError(
            f"tol must be a finite number >= 0, got {tol!r}; the default is {DEFAULT_TOL:g}."
        )
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(
            f"max_iter must be an integer >= 1, got {max_iter!r}; the default is 1000."
        )


def _check_names(names: Sequence[str], n_models: int, what: str) -> tuple[str, ...]:
    names = tuple(str(x) for x in names)
    if names and len(names) != n_models:
        raise ValueError(
            f"got {len(names)} {what} for {n_models} embedding arrays; pass one name per array, "
            "or none."
        )
    return names


def _check_inputs(embeddings: Sequence[Any], names: Sequence[str]) -> list[np.ndarray]:
    """The structure checks of :func:`validation.check_embedding_set` (same messages), without
    converting: the arrays come back as given (memory maps stay memory maps). Finiteness and zero
    variance are checked while reading (:func:`_column_means`, :func:`_cross_products`)."""
    if isinstance(embeddings, np.ndarray) and embeddings.ndim == 3:
        embeddings = list(embeddings)
    if isinstance(embeddings, np.ndarray) or not isinstance(embeddings, Sequence):
        # the same message as check_embedding_set
        check_embedding_set(embeddings)
    if len(embeddings) < 2:
        check_embedding_set(embeddings)
    labels = _labels(len(embeddings), names)
    arrays = [numeric_matrix(value, label) for label, value in zip(labels, embeddings)]
    n_rows = [a.shape[0] for a in arrays]
    if len(set(n_rows)) != 1:
        listing = ", ".join(f"{label}: {n}" for label, n in zip(labels, n_rows))
        raise ValueError(
            f"all models must embed the same stimuli, but the numbers of rows differ ({listing}); "
            "select the same stimuli, in the same order, from every model."
        )
    if n_rows[0] < 3:
        raise ValueError(
            f"only {n_rows[0]} stimuli; Procrustes residuals need at least 3 stimuli (after "
            "centering fewer carry no shape); pass more stimuli."
        )
    for label, a in zip(labels, arrays):
        if a.shape[1] < 1:
            raise ValueError(f"{label} has no feature columns; drop it or re-extract it.")
    return arrays


def _available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_needed(n: int, widths: Sequence[int]) -> tuple[int, int]:
    """(bytes, columns): the peak memory of preparing GPA of n stimuli and models of ``widths``,
    and the columns of its cross-products."""
    ranks = [min(w, n - 1) for w in widths]
    total = sum(ranks)
    if _rows_cheaper(n, ranks):  # coordinates, C_0 and one input, the targets Z_iᵀ C_0
        return 8 * (n * (total + 2 * max(widths)) + total * min(n - 1, max(widths))), total
    if max(widths) > n - 1:  # _prepare_from_rows: cross-products, coordinates, C_0, one input
        return 8 * (total * total + n * (total + 2 * max(widths))), total
    total = sum(widths)  # the cross-products, the block product and a block of rows
    return 8 * total * (2 * total + _BLOCK_BYTES // (8 * total) + 1), total


def check_gpa_fits(n: int, widths: Sequence[int], models: Sequence[str] = ()) -> None:
    """ValueError (with the fix) when GPA of n stimuli and models of ``widths`` features would
    not fit in the memory available now; :func:`generalized_procrustes` checks this itself, and
    a run checks it before extracting anything when the GPA models' widths are known (feature
    files, arrays)."""
    _check_memory(n, widths, _labels(len(widths), tuple(models)))


def _check_memory(n: int, widths: Sequence[int], labels: Sequence[str]) -> None:
    """Refuse, before allocating, a problem whose cross-products cannot fit: an (R, R) float64
    matrix grows with the square of the models' total width, and a process that runs out of
    memory while filling it is killed without a word."""
    needed, columns = _memory_needed(n, widths)
    available = _available_memory()
    if available is None or needed <= 0.9 * available:
        return
    raise ValueError(
        f"GPA across {', '.join(labels)} needs the cross-products of their {columns:,} features "
        f"together: about {needed / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is available. "
        "Reduce the features first (their leading principal components: GPA depends on a "
        "model's features only up to rotation, so dropping components changes the residuals "
        "by the variance they carry), or put fewer or narrower models into GPA (--gpa-models, "
        "--gpa-layer)."
    )


def _row_blocks(n: int, width: int) -> list[slice]:
    """Row slices of about ``_BLOCK_BYTES`` of float64 at ``width`` columns (at least 256 rows)."""
    step = max(256, _BLOCK_BYTES // (8 * max(width, 1)))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _column_means(arrays: Sequence[np.ndarray], labels: Sequence[str]) -> list[np.ndarray]:
    """Column means (float64 sums over row blocks); ValueError naming NaN/Inf like the
    validation module does, or a model whose values lie beyond what its cross-products keep
    (:func:`_check_magnitude`)."""
    n = arrays[0].shape[0]
    sums = [np.zeros(a.shape[1]) for a in arrays]
    largest = [0.0] * len(arrays)
    for rows in _row_blocks(n, sum(a.shape[1] for a in arrays)):
        for i, a in enumerate(arrays):
            block = read_rows(a, rows)
            if block.size:
                largest[i] = max(largest[i], float(np.max(np.abs(block))))
            total = block.sum(axis=0)
            if not np.all(np.isfinite(total)):
                # error path: count over the whole model, with the shared message
                _check_finite(
                    np.asarray(a, dtype=np.float64),
                    labels[i],
                    "stimuli",
                    "drop those stimuli from every model or re-extract this model's embeddings.",
                )
            sums[i] += total
    for i, label in enumerate(labels):
        _check_magnitude(largest[i], label)
    return [s / n for s in sums]


def _cross_products(
    arrays: Sequence[np.ndarray], means: Sequence[np.ndarray]
) -> np.ndarray:
    """Σ over row blocks of Xcᵀ Xc, Xc = [X_1 − μ_1, ..., X_M − μ_M] in float64: (D, D),
    D = Σ d_i."""
    n = arrays[0].shape[0]
    widths = [a.shape[1] for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    total_width = int(offsets[-1])
    cross = np.zeros((total_width, total_width))
    product = np.empty_like(cross)
    for rows in _row_blocks(n, total_width):
        block = np.empty((rows.stop - rows.start, total_width))
        for i, a in enumerate(arrays):
            np.subtract(a[rows], means[i], out=block[:, offsets[i] : offsets[i + 1]])
            release(a, rows)
        np.matmul(block.T, block, out=product)  # a symmetric rank-k update in numpy
        cross += product
    return cross


# -- the problem in cross-product form ------------------------------------------------------------
@dataclass(frozen=True)
class _Problem:
    """GPA as a function of cross-products (see the module docstring).

    Attributes:
        cross: (R, R) float64, R = Σ r_i: blocks C_ij = Z_iᵀ Z_j of the models' coordinates;
            None when the iterations work on the rows (``coordinates``).
        offsets: (M + 1,) block boundaries of the models' r_i coordinates.
        p: consensus width of the iterations and of the maps in the result, min(n − 1, max d_i).
        bases: per model None (coordinates = the centered, scaled features) or the (d_i, n − 1)
            orthonormal columns V_i of its row space (the model is wider than n − 1; its
            coordinates are Z_i = N_i V_i).
        unaligned_loss: loss of the configurations as given (zero-padded, no rotation).
        unaligned_targets: per model the (r_i, p) cross-product Z_iᵀ C_0 with the unaligned mean
            C_0, in a p-column frame of its row space (for the plain first step).
        means, scales: per model column means (d_i,) and Frobenius norm of the centered input.
        coordinates: None, or per model its (n, r_i) float64 coordinates Z_i, when a sweep costs
            fewer flops on them than on the cross-products (:func:`_rows_cheaper`: few stimuli,
            many models).
    """

    cross: np.ndarray | None
    offsets: np.ndarray
    p: int
    bases: tuple[np.ndarray | None, ...]
    unaligned_loss: float
    unaligned_targets: tuple[np.ndarray, ...]
    means: tuple[np.ndarray, ...]
    scales: np.ndarray
    coordinates: tuple[np.ndarray, ...] | None = None

    @property
    def n_models(self) -> int:
        return len(self.offsets) - 1

    def block(self, i: int, j: int) -> np.ndarray:
        o = self.offsets
        return self.cross[o[i] : o[i + 1], o[j] : o[j + 1]]

    def width(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


def _rows_cheaper(n: int, ranks: Sequence[int]) -> bool:
    """True when a sweep costs fewer flops on the models' (n, r_i) coordinates than on their
    cross-products (R = Σ r_i; p consensus columns): on the rows, ~4·n·R·p (the sum
    S = Σ_j Z_j T_j, each model's target Z_iᵀ (S − Z_i T_i), S's update, and the frame), against
    Σ_{i≠j} r_i r_j p = (R² − Σ r_i²)·p. That happens with few stimuli and many models: a
    universal space of 14 models of ~1,000 coordinates fitted on 1,000 stimuli (3.5× fewer)."""
    total = sum(ranks)
    return 4 * n * total < total * total - sum(r * r for r in ranks)


def _prepare(arrays: Sequence[np.ndarray], labels: Sequence[str]) -> _Problem:
    """Read the inputs (row blocks) into the cross-product form of the problem, or keep the rows
    when the iterations are cheaper on them (:func:`_rows_cheaper`)."""
    n = arrays[0].shape[0]
    widths = [a.shape[1] for a in arrays]
    _check_memory(n, widths, labels)
    keep_rows = _rows_cheaper(n, [min(w, n - 1) for w in widths])
    if max(widths) > n - 1 or keep_rows:
        return _prepare_from_rows(arrays, labels, keep_rows=keep_rows)
    n_models = len(arrays)
    means = _column_means(arrays, labels)
    cross = _cross_products(arrays, means)
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    traces = np.array([np.trace(cross[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]])
                       for i in range(n_models)])
    for label, trace in zip(labels, traces):
        if not trace > 0.0:
            raise ValueError(_zero_variance_message(label))
    scales = np.sqrt(traces)
    inverse = np.repeat(1.0 / scales, widths)
    cross *= inverse[:, None]
    cross *= inverse[None, :]

    def block(i: int, j: int) -> np.ndarray:
        return cross[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]

    # the unaligned configurations (zero-padded to d): their loss, and the cross-products N_iᵀ C_0
    # with their mean C_0 (for the plain first step)
    d = max(widths)
    overlap = sum(
        float(np.trace(block(i, j)[: min(widths[i], widths[j]), : min(widths[i], widths[j])]))
        for i in range(n_models)
        for j in range(n_models)
    )
    traces_sum = sum(float(np.trace(block(i, i))) for i in range(n_models))
    unaligned_loss = traces_sum - overlap / n_models
    targets = []
    for i in range(n_models):
        t = np.zeros((widths[i], d))
        for j in range(n_models):
            t[:, : widths[j]] += block(i, j)
        targets.append(t / n_models)  # N_iᵀ C_0, (d_i, d)
    return _Problem(
        cross=cross,
        offsets=offsets,
        p=d,
        bases=(None,) * n_models,
        unaligned_loss=unaligned_loss,
        unaligned_targets=tuple(targets),
        means=tuple(means),
        scales=scales,
    )


def _prepare_from_rows(
    arrays: Sequence[np.ndarray], labels: Sequence[str], *, keep_rows: bool
) -> _Problem:
    """:func:`_prepare` when a model is wider than n − 1, or when the iterations work on the rows
    (``keep_rows``); n is then small, and each model is read whole, one at a time (n·d_i floats).

    A wide model's centered, scaled configuration N_i has rank ≤ n − 1 (its columns are centered):
    with its thin SVD N_i = U S Vᵀ, the iterations use Z_i = U S (n × (n − 1), the first n − 1
    singular triplets; the n-th singular value is 0 up to rounding) and the result's map is
    R_i = V_i T_i (d_i × p, orthonormal columns), so N_i R_i = Z_i T_i. Nothing of size Σ d_i
    squared is formed: the cross-products are Z_iᵀ Z_j ((n − 1) × (n − 1) for two wide models),
    and with ``keep_rows`` none are formed (the problem keeps the Z_i).
    """
    n = arrays[0].shape[0]
    n_models = len(arrays)
    widths = [a.shape[1] for a in arrays]
    p = min(n - 1, max(widths))
    means = _column_means(arrays, labels)  # also the finiteness check, with its message
    coordinates, bases, scales = [], [], []
    unaligned_sum = np.zeros((n, max(widths)))  # Σ_i N_i, zero-padded
    for i, a in enumerate(arrays):
        centered = np.asarray(a, dtype=np.float64) - means[i]
        scale = float(np.linalg.norm(centered))
        if not scale > 0.0:
            raise ValueError(_zero_variance_message(labels[i]))
        centered /= scale
        unaligned_sum[:, : widths[i]] += centered
        if widths[i] > p:
            u, singular, vt = np.linalg.svd(centered, full_matrices=False)
            coordinates.append(u[:, :p] * singular[:p])
            bases.append(np.ascontiguousarray(vt[:p].T))
        else:
            coordinates.append(centered)
            bases.append(None)
        scales.append(scale)
        del centered
    ranks = [z.shape[1] for z in coordinates]
    offsets = np.concatenate([[0], np.cumsum(ranks)]).astype(np.int64)
    unaligned_mean = unaligned_sum / n_models  # C_0 (n, d)
    unaligned_loss = float(sum(np.vdot(z, z) for z in coordinates))
    unaligned_loss -= n_models * float(np.vdot(unaligned_mean, unaligned_mean))
    if max(widths) > p:
        # Z_iᵀ C_0 F with F the p leading right singular vectors of C_0 (a p-column frame of its
        # row space): C_0 F = U_0 S_0, first p columns
        u0, s0, _ = np.linalg.svd(unaligned_mean, full_matrices=False)
        mean_in_frame = u0[:, :p] * s0[:p]
    else:  # no model is reduced: C_0 has the p = d columns of the zero-padded features
        mean_in_frame = unaligned_mean
    targets = tuple(z.T @ mean_in_frame for z in coordinates)
    if keep_rows:
        cross = None
    else:
        stacked = np.hstack(coordinates)
        cross = stacked.T @ stacked
    return _Problem(
        cross=cross,
        offsets=offsets,
        p=p,
        bases=tuple(bases),
        unaligned_loss=unaligned_loss,
        unaligned_targets=targets,
        means=tuple(means),
        scales=np.asarray(scales),
        coordinates=tuple(coordinates) if keep_rows else None,
    )


# -- the iterations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPASolution:
    """The iterations' outcome: maps T_i (r_i, p) with orthonormal rows, in the frame where the
    widest model's is I, and how they got there (what :mod:`.gpa_stability` keeps per solution)."""

    maps: list[np.ndarray]
    previous_maps: list[np.ndarray]  # the accepted iterate before the last one
    loss_history: np.ndarray
    converged: bool
    gap_estimate: float
    sweeps: int
    loss_evaluations: int
    restarts: int


@dataclass(frozen=True)
class GPAFit:
    """What a GPA solve leaves for further solves on the same inputs (:mod:`.gpa_stability`
    starts its random starts from it instead of reading the inputs and solving GPA again).

    Attributes:
        problem: the problem in cross-product form (its (D, D) cross-products: D = Σ d_i, e.g.
            4 × 768 features: 75 MB; kept only while the result holding this is alive).
        solution: the iterations' final state (maps, the previous accepted maps, loss history).
        tol, max_iter, accelerate: the stopping rule and the iterations it was solved with.
    """

    problem: _Problem
    solution: GPASolution
    tol: float
    max_iter: int
    accelerate: bool


class _Iterations:
    """Block sweeps, their loss and the frame fixing on a :class:`_Problem` (shared by
    :func:`generalized_procrustes` and the stability diagnostic). On a problem that keeps its
    rows the same steps are computed from the coordinates (``_rows_*``): the same iterates, with
    other rounding."""

    def __init__(self, problem: _Problem) -> None:
        self.problem = problem
        m = problem.n_models
        # widest first; ties keep the input order
        self.order = sorted(range(m), key=lambda i: -problem.width(i))
        self.reference = self.order[0]
        self.rows = problem.coordinates
        if self.rows is None:
            self.traces = sum(float(np.trace(problem.block(i, i))) for i in range(m))
        else:
            self.traces = sum(float(np.vdot(z, z)) for z in self.rows)
        self.sweeps = 0
        self.loss_evaluations = 0

    def _rows_sum(self, maps: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """S = Σ_j Z_j T_j (n, p) and the terms Z_j T_j."""
        terms = [z @ t for z, t in zip(self.rows, maps)]
        return sum(terms[1:], terms[0].copy()), terms

    def _rows_loss(self, total: np.ndarray) -> float:
        """The loss Σ_i ||Z_i T_i||² − ||S||²_F / M from S (maps with orthonormal rows)."""
        return max(self.traces - float(np.vdot(total, total)) / self.problem.n_models, 0.0)

    def loss_from_pairs(self, pair_sum: float) -> float:
        """Loss from Σ_{i<j} tr(T_iᵀ C_ij T_j) (maps with orthonormal rows); a sum of squares, so
        never below 0 (rounding of this difference of O(M) terms could otherwise give -4e-16)."""
        m = self.problem.n_models
        return max(self.traces - (self.traces + 2.0 * pair_sum) / m, 0.0)

    def loss(self, maps: Sequence[np.ndarray]) -> float:
        self.loss_evaluations += 1
        if self.rows is not None:
            return self._rows_loss(self._rows_sum(maps)[0])
        m = self.problem.n_models
        pair_sum = 0.0
        for i in range(m):
            for j in range(i + 1, m):
                pair_sum += float(np.vdot(maps[i], self.problem.block(i, j) @ maps[j]))
        return self.loss_from_pairs(pair_sum)

    def start(self) -> tuple[list[np.ndarray], float]:
        """Gower's sequential start (or the plain first step when that raises the loss)."""
        problem, m = self.problem, self.problem.n_models
        maps: list[np.ndarray | None] = [None] * m
        first = self.order[0]
        maps[first] = np.eye(problem.width(first), problem.p)
        placed = [first]
        if self.rows is not None:
            placed_sum = self.rows[first] @ maps[first]  # Σ over placed models of Z_j T_j
        for i in self.order[1:]:
            if self.rows is None:
                target = sum(problem.block(i, j) @ maps[j] for j in placed)
            else:
                target = self.rows[i].T @ placed_sum
            maps[i] = _polar(target)[0]
            if self.rows is not None:
                placed_sum += self.rows[i] @ maps[i]
            placed.append(i)
        loss = self.loss(maps)
        if loss > problem.unaligned_loss:
            maps = [_polar(t)[0] for t in problem.unaligned_targets]
            loss = self.loss(maps)
        return self.fix_frame(maps), loss

    def sweep(self, maps: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """One block sweep (each model onto the sum of the others, in order), frame fixed; returns
        the new maps and their loss (from the products the sweep forms anyway)."""
        problem, m = self.problem, self.problem.n_models
        self.sweeps += 1
        if self.rows is not None:
            return self._rows_sweep(maps)
        reference = self.reference
        if not np.array_equal(maps[reference], np.eye(problem.p)):
            maps = self.fix_frame(maps)
        maps = list(maps)
        # The reference model (widest, first in the order) moves first, to Q. The sweep then goes
        # on in the frame where it is I again: every map right-multiplied by Qᵀ, which commutes
        # with the Procrustes step (polar(A Qᵀ) = polar(A) Qᵀ), so the result is the frame-fixed
        # sweep of the plain formulation, with no products by the reference's identity map and
        # the not-yet-updated models' products turned into the new frame with one product each.
        pending = {j: problem.block(reference, j) @ maps[j] for j in range(m) if j != reference}
        rotation = _polar(sum(pending.values()))[0].T  # Qᵀ
        maps[reference] = np.eye(problem.p)
        done = [reference]
        pair_sum = 0.0
        for i in self.order[1:]:
            updated = {j: problem.block(i, j) @ maps[j] for j in done if j != reference}
            target = problem.block(i, reference) + sum(updated.values())
            later = [j for j in range(m) if j != i and j not in done]
            if later:
                target = target + sum(problem.block(i, j) @ maps[j] for j in later) @ rotation
            maps[i] = _polar(target)[0]
            # pairs with the models already updated in this sweep use final maps on both sides
            pair_sum += float(np.vdot(maps[i], problem.block(i, reference)))
            pair_sum += sum(float(np.vdot(maps[i], product)) for product in updated.values())
            done.append(i)
        return maps, self.loss_from_pairs(pair_sum)

    def _rows_sweep(self, maps: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """:meth:`sweep` on the rows: model i's target Σ_{j≠i} C_ij T_j is Z_iᵀ (S − Z_i T_i),
        and S takes each model's new term as soon as it moves (the sweep's order); the frame is
        fixed at the end (the sweep commutes with it)."""
        maps = list(maps)
        total, terms = self._rows_sum(maps)
        for i in self.order:
            z = self.rows[i]
            total -= terms[i]  # the other models' sum
            maps[i] = _polar(z.T @ total)[0]
            total += z @ maps[i]
        return self.fix_frame(maps), self._rows_loss(total)

    def decrease(self, maps: Sequence[np.ndarray], new_maps: Sequence[np.ndarray]) -> float:
        """loss(maps) − loss(new_maps) (maps with orthonormal rows, (r_i, p) each) computed from
        the differences D_i = T'_i − T_i, not as a difference of two losses: with P_i = T'_i + T_i
        it is Σ_{i≠j} tr(D_iᵀ C_ij P_j) / M (on the rows, <Σ Z_i D_i, Σ Z_i P_i> / M), whose
        rounding error is ~ε·||D||, where the difference of two losses of size O(M) carries
        ~1e-15 whatever the step (what a verification sweep near the optimum must resolve)."""
        self.loss_evaluations += 1
        m = self.problem.n_models
        steps = [b - a for a, b in zip(maps, new_maps)]
        sums = [b + a for a, b in zip(maps, new_maps)]
        if self.rows is not None:
            step = sum(z @ d for z, d in zip(self.rows, steps))
            both = sum(z @ q for z, q in zip(self.rows, sums))
            return float(np.vdot(step, both)) / m
        total = 0.0
        for i in range(m):
            if not steps[i].any():  # the reference model's map is I in both frames
                continue
            for j in range(m):
                if j != i:
                    total += float(np.vdot(steps[i], self.problem.block(i, j) @ sums[j]))
        return total / m

    def fix_frame(self, maps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Right-multiply every map by T_refᵀ so that the widest model's map is I (p × p)."""
        rotation = maps[self.reference].T
        out = [t @ rotation for t in maps]
        out[self.reference] = np.eye(self.problem.p)
        return out


class _Anderson:
    """Anderson acceleration (type II) of a fixed-point map x ↦ g(x) on flat vectors: keeps the
    last ``window`` differences of inputs x and residuals f = g(x) − x (in place, float64) and
    proposes x + f − (ΔX + ΔF) γ with γ the regularised least-squares fit of f by ΔF."""

    def __init__(self, size: int, window: int) -> None:
        self.dx = np.empty((window, size))
        self.df = np.empty((window, size))
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.slot = 0
        self.x: np.ndarray | None = None
        self.f: np.ndarray | None = None

    def update(self, x: np.ndarray, f: np.ndarray) -> None:
        if self.x is not None:
            np.subtract(x, self.x, out=self.dx[self.slot])
            np.subtract(f, self.f, out=self.df[self.slot])
            self.slot = (self.slot + 1) % self.window
            self.count = min(self.count + 1, self.window)
        self.x, self.f = x, f

    def proposal(self) -> np.ndarray | None:
        if self.count == 0:
            return None
        dx, df = self.dx[: self.count], self.df[: self.count]
        gram = df @ df.T
        gram[np.diag_indices_from(gram)] += _AA_REGULARISATION * np.trace(gram)
        gamma = np.linalg.solve(gram, df @ self.f)
        out = self.x + self.f
        out -= dx.T @ gamma
        out -= df.T @ gamma
        return out


def _remaining_decrease(decreases: Sequence[float]) -> float:
    """Estimated remaining decrease of the loss after the last of ``decreases`` (see the module
    docstring); inf while fewer than three are known."""
    if len(decreases) < 3:
        return np.inf
    last = decreases[-4:]
    ratios = [b / a if a > 0 else (0.0 if b == 0 else np.inf) for a, b in zip(last[:-1], last[1:])]
    rate = min(max(ratios), _MAX_RATE)
    return decreases[-1] * rate / (1.0 - rate)


def _certified_gap(decrease: float) -> float:
    """The remaining decrease certified by one plain sweep that lowered the loss by ``decrease``
    (computed by :meth:`_Iterations.decrease`): ``decrease`` · ρ / (1 − ρ), ρ = ``_MAX_RATE``.
    A plain sweep is block Gauss–Seidel on the loss, which removes at least a fraction 1 − ρ of
    the loss above the (local) optimum when it contracts that excess by ρ per sweep or faster,
    so the excess after it is at most ``decrease`` · ρ / (1 − ρ) (see the module docstring)."""
    return max(decrease, 0.0) * _MAX_RATE / (1.0 - _MAX_RATE)


#: Widest consensus (p) up to which GPA's iterations run on one BLAS thread. Their products and
#: eigendecompositions are then small, and on the library's threads every call waits for its
#: slowest thread, so another process holding a core stalls them all. GPA and 2 random starts
#: (`benchmarks/bench_gpa_threads.py`, 2 cores; the library's threads against this rule): 300
#: stimuli × widths 64/96/128, 1.35 s against 0.23 s idle and 3.5 s against 1.0 s beside 3 busy
#: processes; 2,000 × 256/384/512, 7.3 s against 8.3 s idle and 50 s against 17.5 s busy. Wider
#: problems keep the threads: GPA at 5,000 × 768–1,536 took 93 s on them against 131 s on one
#: idle, and 518 s against 298 s busy (there OPENBLAS_NUM_THREADS=1 is the remedy).
ONE_THREAD_WIDTH = 512


def _iterate(
    problem: _Problem,
    *,
    tol: float,
    max_iter: int,
    accelerate: bool = True,
    start: Sequence[np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> GPASolution:
    """Minimise the loss from Gower's start (or ``start``: maps (r_i, p) with orthonormal rows).

    Every recorded iterate is the output of a block sweep and its loss is ≤ the previous one.
    ``progress`` is called with the number of accepted iterations after each. One BLAS thread
    up to a consensus width of :data:`ONE_THREAD_WIDTH`.
    """
    threads = threadpool_limits(limits=1) if problem.p <= ONE_THREAD_WIDTH else nullcontext()
    with threads:
        return _minimise(problem, tol=tol, max_iter=max_iter, accelerate=accelerate, start=start,
                         progress=progress)


def _minimise(
    problem: _Problem,
    *,
    tol: float,
    max_iter: int,
    accelerate: bool,
    start: Sequence[np.ndarray] | None,
    progress: Callable[[int], None] | None,
) -> GPASolution:
    """:func:`_iterate` at the BLAS threads it chose."""
    it = _Iterations(problem)
    m = problem.n_models
    if start is None:
        current, loss = it.start()
    else:
        current = it.fix_frame([np.asarray(t, dtype=np.float64) for t in start])
        loss = it.loss(current)
    history = [problem.unaligned_loss, loss] if start is None else [loss]
    if progress is not None and start is None:
        progress(1)  # iteration 1 is the start
    previous = current
    decreases: list[float] = []
    rounding = _LOSS_ROUNDING * m
    free = [i for i in range(m) if i != it.reference]
    shapes = [(problem.width(i), problem.p) for i in free]
    sizes = np.cumsum([0] + [a * b for a, b in shapes])

    def flat(maps: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([maps[i].ravel() for i in free])

    def unflat(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = list(like)
        for k, i in enumerate(free):
            out[i] = _project_rows(vector[sizes[k] : sizes[k + 1]].reshape(shapes[k]))
        return out

    anderson = _Anderson(int(sizes[-1]), _AA_WINDOW) if accelerate else None
    proposal: list[np.ndarray] | None = None  # None: a plain sweep from `current`
    verify = False  # the next iteration is a plain sweep that checks a would-be stop
    floor = max(tol, rounding)  # the certificate cannot resolve less than the loss's rounding
    restarts = 0
    converged = False
    gap = np.inf
    while len(history) - 1 < max_iter:
        rejected = False
        if verify:
            x = current
            mapped, new_loss = it.sweep(current)
            step_decrease = it.decrease(current, mapped)
            certified = _certified_gap(step_decrease)
            if not new_loss <= loss:  # rounding of the two losses: keep the history monotone
                new_loss = loss - max(step_decrease, 0.0)
        elif proposal is not None:
            x = proposal
            mapped, new_loss = it.sweep(proposal)
            if not new_loss <= loss:  # the safeguard: back to a plain sweep
                rejected = True
                restarts += 1
                anderson.reset()
        if not verify and (proposal is None or rejected):
            x = current
            mapped, new_loss = it.sweep(current)
            if rejected and new_loss < loss:
                # extrapolate along the plain sweep's step while the loss keeps falling
                base = flat(mapped)
                step = base - flat(current)
                best, best_loss = None, new_loss
                for k in range(1, _LINE_SEARCH_STEPS + 1):
                    trial = unflat(base + 2.0**k * step, mapped)
                    trial_loss = it.loss(trial)
                    if not trial_loss < best_loss:
                        break
                    best, best_loss = trial, trial_loss
                if best is not None:
                    # a sweep from the extrapolated maps does not raise their loss
                    x = best
                    mapped, new_loss = it.sweep(best)
        decreases.append(max(loss - new_loss, 0.0))
        previous, current, loss = current, mapped, new_loss
        history.append(loss)
        if progress is not None:
            progress(len(history) - 1)
        if verify:
            # the plain sweep's certificate decides; if it fails, the acceleration goes on, the
            # sweep's (x, g(x)) pair joining its history (any pair of the same map g is valid)
            verify = False
            gap = certified
            if gap <= floor:
                converged = True
                break
        else:
            gap = _remaining_decrease(decreases)
            at_rounding = len(decreases) >= 2 and max(decreases[-2:]) <= rounding
            if at_rounding or (decreases[-1] <= tol and gap <= tol):
                if anderson is None:  # plain sweeps: the ratio estimate holds (version 1's stop)
                    converged = True
                    gap = decreases[-1] if at_rounding else gap
                    break
                verify = True  # accelerated decreases can stall and resume: check first
        if anderson is None:
            continue
        x_flat = flat(x)
        anderson.update(x_flat, flat(current) - x_flat)
        if verify:
            proposal = None
            continue
        combination = anderson.proposal()
        proposal = None if combination is None else unflat(combination, current)
    return GPASolution(
        maps=current,
        previous_maps=previous,
        loss_history=np.asarray(history, dtype=np.float64),
        converged=converged,
        gap_estimate=float(gap),
        sweeps=it.sweeps,
        loss_evaluations=it.loss_evaluations,
        restarts=restarts,
    )


def _full_maps(problem: _Problem, maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The maps R_i (d_i, p) of the result from the iterations' T_i (r_i, p): T_i itself, or
    V_i T_i for a model reduced to its row space (orthonormal columns; N_i R_i = Z_i T_i)."""
    return [t if basis is None else basis @ t for t, basis in zip(maps, problem.bases)]


def _residuals(
    arrays: Sequence[np.ndarray],
    means: Sequence[np.ndarray],
    scales: np.ndarray,
    maps_per_solution: Sequence[Sequence[np.ndarray]],
) -> np.ndarray:
    """Residuals (S, n, M) of S solutions (each M maps (d_i, p), p = min(n - 1, d)), computed
    over row blocks."""
    n = arrays[0].shape[0]
    n_models = len(arrays)
    d = maps_per_solution[0][0].shape[1]
    out = np.empty((len(maps_per_solution), n, n_models))
    for rows in _row_blocks(n, len(maps_per_solution) * n_models * d):
        centered = [
            (read_rows(a, rows) - mu) / s
            for a, mu, s in zip(arrays, means, scales)
        ]
        for k, maps in enumerate(maps_per_solution):
            aligned = np.stack([x @ r for x, r in zip(centered, maps)])
            consensus = aligned.mean(axis=0)
            out[k, rows] = np.linalg.norm(aligned - consensus, axis=2).T
    return out


def generalized_procrustes(
    embeddings: Sequence[np.ndarray],
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = 1000,
    models: Sequence[str] = (),
    layers: Sequence[str] = (),
    accelerate: bool = True,
    progress: Callable[[int], None] | None = None,
    keep_fit: bool = False,
) -> GPAResult:
    """Align M models' embeddings of the same stimuli to their consensus (Generalized Procrustes).

    Args:
        embeddings: M ≥ 2 arrays of shape (n, d_i) for the same n ≥ 3 stimuli, same order. Any
            numeric dtype; read in row blocks (float32 memory maps are fine and are not copied).
            They are kept by reference on the result (``GPAResult.inputs``).
        tol: stop when the estimated remaining decrease of the loss (and the last decrease) is
            below this, confirmed by a plain sweep when accelerated (see the module docstring).
        max_iter: at most this many iterations (``converged`` is False if it is reached).
        models, layers: names of the inputs, kept on the result (empty or one per array).
        accelerate: False runs the plain block sweeps (for checking; many more iterations).
        progress: called with the number of accepted iterations after each (a long run's sign
            of life; the iterations are the same with or without it).
        keep_fit: keep the problem and the iterations' state on the result (``GPAResult.fit``),
            so that :func:`.gpa_stability` of the same inputs neither reads them nor solves this
            GPA again (a run's stability step, right after its GPA step).

    Returns:
        :class:`GPAResult`: residuals (n, M), loss history, maps (d_i, p) with p = min(n - 1,
        d) (orthonormal columns where d_i > p), means, scales.

    Memory: the (D, D) cross-products (D = Σ d_i) plus one block of rows; when a model is wider
    than n − 1, D = Σ min(d_i, n − 1) and each input is read whole once (n·d_i floats); time:
    three passes over the inputs plus O(M² p³) per iteration. With many models and few stimuli
    the iterations keep the (n, D) coordinates instead, O(n·D·p) per iteration.
    """
    _check_options(tol, max_iter)
    arrays = _check_inputs(embeddings, tuple(str(x) for x in models))
    model_names = _check_names(models, len(arrays), "model names")
    layer_names = _check_names(layers, len(arrays), "layer names")
    labels = _labels(len(arrays), model_names)
    problem = _prepare(arrays, labels)
    solution = _iterate(
        problem, tol=tol, max_iter=max_iter, accelerate=accelerate, progress=progress
    )
    fit = GPAFit(problem, solution, float(tol), int(max_iter), bool(accelerate))
    return _result(fit, arrays, model_names, layer_names, keep_fit=keep_fit)


def _result(
    fit: GPAFit,
    arrays: Sequence[np.ndarray],
    models: tuple[str, ...],
    layers: tuple[str, ...],
    *,
    keep_fit: bool,
    residuals: np.ndarray | None = None,
) -> GPAResult:
    """The :class:`GPAResult` of a solved problem; ``residuals`` (n, M) when a pass over the
    inputs already computed them for these maps (else that pass is made here)."""
    problem, solution = fit.problem, fit.solution
    maps = _full_maps(problem, solution.maps)
    if residuals is None:
        residuals = _residuals(arrays, problem.means, problem.scales, [maps])[0]
    return GPAResult(
        residuals=residuals,
        loss_history=solution.loss_history,
        n_iter=len(solution.loss_history) - 1,
        converged=solution.converged,
        models=models,
        layers=layers,
        maps=maps,
        means=problem.means,
        scales=problem.scales,
        gap_estimate=solution.gap_estimate,
        inputs=arrays,
        fit=fit if keep_fit else None,
    )


def deviation_from_consensus(
    held_out: Any, result: GPAResult, *, embeddings: Sequence[Any] | None = None
) -> np.ndarray:
    """Per-stimulus distance of a held-out embedding from a GPA consensus it did not enter.

    The held-out (n, d_h) embedding is preprocessed as GPA preprocesses its inputs (centered,
    unit Frobenius norm) and rotated by orthogonal Procrustes (reflections allowed; both zero-padded
    to the wider of d_h and d) onto the consensus of ``result``. The same numbers as
    ``analyses.held_out_deviation(held_out, result.consensus)``, from cross-products over row
    blocks: with x the preprocessed held-out rows, c the consensus rows and U S Vᵀ the thin SVD of
    xᵀc (d_h × d), the distance of row j is sqrt(||x_j U Vᵀ − c_j||² + ||x_j||² − ||x_j U||²) (the
    second part is what an optimal rotation sends to the padding when d_h > d).

    Args:
        held_out: (n, d_h) array of the same n stimuli (any numeric dtype; read in row blocks).
        result: the GPA result of the other models (with maps).
        embeddings: their inputs, when the result does not keep them.

    Returns:
        (n,) float64 distances, in the units of the GPA residuals.
    """
    arrays = result._inputs_for(embeddings)
    n = result.residuals.shape[0]
    held = _check_inputs([held_out, held_out], ("held-out model", "held-out model"))[0]
    if held.shape[0] != n:
        raise ValueError(
            f"the held-out embedding has {held.shape[0]} rows but the GPA result has {n} stimuli; "
            "pass an (n, d) array of the same stimuli in the same order."
        )
    (mean,) = _column_means([held], ["held-out model"])
    width = held.shape[1]
    cross = np.zeros((width, result.maps[0].shape[1]))
    square_norm = 0.0
    blocks = _row_blocks(n, width + sum(r.shape[0] + r.shape[1] for r in result.maps))
    for rows in blocks:
        x = read_rows(held, rows) - mean
        square_norm += float(np.sum(x * x))
        cross += x.T @ result.consensus_rows(rows, arrays)
    if not square_norm > 0.0:
        raise ValueError(_zero_variance_message("the held-out model"))
    scale = np.sqrt(square_norm)
    u, _, vt = np.linalg.svd(cross / scale, full_matrices=False)
    out = np.empty(n)
    for rows in blocks:
        x = (read_rows(held, rows) - mean) / scale
        xu = x @ u
        outside = np.maximum(np.sum(x * x, axis=1) - np.sum(xu * xu, axis=1), 0.0)
        inside = np.sum((xu @ vt - result.consensus_rows(rows, arrays)) ** 2, axis=1)
        out[rows] = np.sqrt(inside + outside)
    return out
