"""How curved is GPA's loss at the optimum, and does that set the sweeps? (issue 11, item 4)

Models of equal width are GPA's slow case (``convergence_core/procrustes.py``'s docstring). This
script measures why, on issue 11's synthetic case made narrower so that the whole Hessian fits in
memory: M models of equal width d, a shared signal of rank d / 12 plus isotropic noise 0.2
(``bench_gpa_scale.py``'s case: X_i = z A_i / sqrt(rank) + 0.2 E_i), n stimuli.

At the optimum (GPA to tol 1e-13), with the maps R_i (d, d) and B_ij = (N_i R_i)ᵀ (N_j R_j), the
loss along R_i exp(Ω_i) (Ω_i skew, Ω_0 = 0 to fix the frame) is, to second order,

    loss(Ω) = loss − (1/M) [Σ_i tr(Ω_i² S_i) − Σ_ij tr(Ω_i B_ij Ω_j)],  S_i = sym(Σ_j B_ij)

(the first-order term vanishes at the optimum; :func:`hessian_times`). The script forms the whole
Hessian H on the (M − 1)·d(d − 1)/2 free directions (an orthonormal basis of skew matrices),
checks it against second differences of the loss along random directions, and reports:

- κ(H), the ratio of its largest to its smallest eigenvalue;
- κ_block, the same for H preconditioned by its per-model diagonal blocks (the generalised
  eigenvalues of H v = λ D v): a sweep minimises the loss exactly over one model at a time, which
  is what those blocks capture, so κ_block is the condition number that is left for the sweeps;
- the iterations GPA takes to the optimum, plain and accelerated.

Plain block sweeps (block Gauss–Seidel) need of the order of κ_block iterations and Krylov-type
acceleration (Anderson's, GPA's default) of the order of sqrt(κ_block): a faster method has to
precondition the coupling between models, not the models one by one.

Usage: .venv/bin/python benchmarks/measure_gpa_curvature.py [--widths 16,24,32,48,64]
           [--seeds 2] [--n 2000] [--models 4] [--quick] [--out gpa_curvature.json]
Prints a table and writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core.procrustes import generalized_procrustes, preprocess_embeddings  # noqa: E402

NOISE = 0.2
RANK_RATIO = 12  # signal rank = width / 12 (issue 11's case: 64 of 768)


def synthetic_case(n: int, width: int, models: int, seed: int) -> list[np.ndarray]:
    """``models`` arrays (n, width): a shared rank-(width / 12) signal plus isotropic noise."""
    rank = max(2, width // RANK_RATIO)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, rank))
    return [
        z @ (rng.standard_normal((rank, width)) / np.sqrt(rank))
        + NOISE * rng.standard_normal((n, width))
        for _ in range(models)
    ]


def skew_basis_index(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each free entry of a (p, p) skew matrix (the upper triangle)."""
    return np.triu_indices(p, 1)


def to_skew(vectors: np.ndarray, models: int, p: int) -> np.ndarray:
    """(b, (M − 1)·m) coordinates → (b, M, p, p) skew matrices, Ω_0 = 0; the basis
    (E_ab − E_ba) / sqrt(2) is orthonormal in the Frobenius inner product."""
    rows, cols = skew_basis_index(p)
    b = vectors.shape[0]
    omega = np.zeros((b, models, p, p))
    upper = vectors.reshape(b, models - 1, len(rows)) / np.sqrt(2.0)
    omega[:, 1:, rows, cols] = upper
    omega[:, 1:, cols, rows] = -upper
    return omega


def from_skew(matrices: np.ndarray) -> np.ndarray:
    """(b, M, p, p) skew matrices → (b, (M − 1)·m) coordinates in the same basis."""
    b, _, p, _ = matrices.shape
    rows, cols = skew_basis_index(p)
    return (matrices[:, 1:, rows, cols] * np.sqrt(2.0)).reshape(b, -1)


def hessian_times(cross: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """H Ω for a batch of directions, H the Hessian of the loss at maps R_i pulled back through
    R_i exp(Ω_i). ``cross`` (M, M, p, p): B_ij = (N_i R_i)ᵀ (N_j R_j); ``omega`` (b, M, p, p) skew.

    The loss is const − (1/M) Σ_ij tr(exp(−Ω_i) B_ij exp(Ω_j)); its second-order term is
    q(Ω) = −(1/M) [Σ_i tr(Ω_i² S_i) − Σ_ij tr(Ω_i B_ij Ω_j)], S_i = sym(Σ_j B_ij), and H Ω is the
    gradient of q within the skew matrices (q = ½ Ωᵀ H Ω), term by term below. Returns
    (b, M, p, p) skew (entry 0 is not used: model 0 is the frame).
    """
    models = cross.shape[0]
    sym_rows = [(cross[k].sum(axis=0) + cross[k].sum(axis=0).T) / 2 for k in range(models)]
    out = np.empty_like(omega)
    for k in range(models):
        s = sym_rows[k]
        # gradient of Σ_i tr(Ω_i² S_i) in Ω_k: −(S_k Ω_k + Ω_k S_k) (a skew matrix)
        own = -(s @ omega[:, k] + omega[:, k] @ s)
        # gradient of Σ_ij tr(Ω_i B_ij Ω_j) in Ω_k: −Σ_j (Ω_j B_jk + B_kj Ω_j), made skew
        coupling = np.zeros_like(omega[:, k])
        for j in range(models):
            coupling -= omega[:, j] @ cross[j, k] + cross[k, j] @ omega[:, j]
        coupling = (coupling - np.swapaxes(coupling, -1, -2)) / 2
        out[:, k] = -(own - coupling) / models
    return out


def full_hessian(cross: np.ndarray, batch: int = 256) -> np.ndarray:
    """The whole Hessian on the (M − 1)·p(p − 1)/2 free directions, column block by block."""
    models, p = cross.shape[0], cross.shape[2]
    size = (models - 1) * p * (p - 1) // 2
    h = np.empty((size, size))
    for start in range(0, size, batch):
        stop = min(start + batch, size)
        basis = np.zeros((stop - start, size))
        basis[np.arange(stop - start), np.arange(start, stop)] = 1.0
        h[:, start:stop] = from_skew(hessian_times(cross, to_skew(basis, models, p))).T
    return (h + h.T) / 2


def loss_along(normalised: list[np.ndarray], maps: list[np.ndarray], omega: np.ndarray) -> float:
    """GPA's loss Σ_i ||N_i R_i exp(Ω_i) − C||² for one direction (M, p, p), computed directly."""
    aligned = [n @ r @ scipy.linalg.expm(o) for n, r, o in zip(normalised, maps, omega)]
    consensus = np.mean(aligned, axis=0)
    return float(sum(np.sum((a - consensus) ** 2) for a in aligned))


def second_difference_error(
    normalised: list[np.ndarray],
    maps: list[np.ndarray],
    cross: np.ndarray,
    h: np.ndarray,
    seed: int,
) -> float:
    """Largest relative gap between vᵀ H v and the loss's central second difference along 3 random
    unit directions v (the independent check of :func:`hessian_times`)."""
    rng = np.random.default_rng(seed)
    models, p = cross.shape[0], cross.shape[2]
    worst = 0.0
    for _ in range(3):
        v = rng.standard_normal(h.shape[0])
        v /= np.linalg.norm(v)
        omega = to_skew(v[None], models, p)[0]
        step = 1e-3
        curvature = (
            loss_along(normalised, maps, step * omega)
            - 2 * loss_along(normalised, maps, 0 * omega)
            + loss_along(normalised, maps, -step * omega)
        ) / step**2
        quadratic = float(v @ h @ v)
        worst = max(worst, abs(curvature - quadratic) / abs(quadratic))
    return worst


def measure(n: int, width: int, models: int, seed: int) -> dict[str, float | int]:
    arrays = synthetic_case(n, width, models, seed)
    started = time.perf_counter()
    fast = generalized_procrustes(arrays, tol=1e-13)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    plain = generalized_procrustes(arrays, tol=1e-13, accelerate=False, max_iter=100_000)
    plain_s = time.perf_counter() - started
    normalised = preprocess_embeddings(arrays)
    maps = [np.asarray(r, dtype=np.float64) for r in fast.maps]
    if any(r.shape != (width, width) for r in maps):
        raise SystemExit(f"width {width}: needs n > width + 1 (n = {n}) for square maps")
    aligned = [x @ r for x, r in zip(normalised, maps)]
    cross = np.array([[a.T @ b for b in aligned] for a in aligned])
    h = full_hessian(cross)
    eig = np.linalg.eigvalsh(h)
    m = width * (width - 1) // 2
    blocks = np.zeros_like(h)
    for k in range(models - 1):
        part = slice(k * m, (k + 1) * m)
        blocks[part, part] = h[part, part]
    block_eig = scipy.linalg.eigh(h, blocks, eigvals_only=True)
    kappa_block = float(block_eig[-1] / block_eig[0])
    return {
        "width": width,
        "seed": seed,
        "rank": max(2, width // RANK_RATIO),
        "directions": int(h.shape[0]),
        "accelerated_iterations": int(fast.n_iter),
        "accelerated_s": round(fast_s, 3),
        "plain_iterations": int(plain.n_iter),
        "plain_s": round(plain_s, 3),
        "loss_gap_plain_minus_accelerated": float(plain.loss_history[-1] - fast.loss_history[-1]),
        "eig_min": float(eig[0]),
        "eig_max": float(eig[-1]),
        "kappa": float(eig[-1] / eig[0]),
        "block_eig_min": float(block_eig[0]),
        "block_eig_max": float(block_eig[-1]),
        "kappa_block": kappa_block,
        "sqrt_kappa_block": float(np.sqrt(kappa_block)),
        "hessian_check_rel_error": second_difference_error(normalised, maps, cross, h, seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,24,32,48,64")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="widths 8,12, one seed, n = 300")
    parser.add_argument("--out", default="gpa_curvature.json")
    args = parser.parse_args(argv)
    widths = [8, 12] if args.quick else [int(w) for w in args.widths.split(",")]
    seeds = 1 if args.quick else args.seeds
    n = 300 if args.quick else args.n

    rows = []
    print(f"{args.models} models of equal width, n = {n}, rank width/{RANK_RATIO}, noise {NOISE}")
    print(
        "| width | seed | directions | κ(H) | κ_block | √κ_block | plain iterations "
        "| accelerated | check |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for width in widths:
        for seed in range(seeds):
            row = measure(n, width, args.models, seed)
            rows.append(row)
            print(
                f"| {width} | {seed} | {row['directions']:,} | {row['kappa']:.2e} | "
                f"{row['kappa_block']:.0f} | {row['sqrt_kappa_block']:.1f} | "
                f"{row['plain_iterations']} | {row['accelerated_iterations']} | "
                f"{row['hessian_check_rel_error']:.1e} |",
                flush=True,
            )
    log_w = np.log([r["width"] for r in rows])
    slope, _ = np.polyfit(log_w, np.log([r["kappa_block"] for r in rows]), 1)
    print(f"κ_block grows as width^{slope:.2f} over these widths")
    write_results(
        args.out,
        {
            "benchmark": "measure_gpa_curvature",
            "machine": machine(),
            "n": n,
            "models": args.models,
            "noise": NOISE,
            "rank_ratio": RANK_RATIO,
            "kappa_block_width_exponent": float(slope),
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
