"""Speed of the GPA hot path next to the plain method it replaces (CKNNA: bench_neighbours.py).

GPA: the paper's plain loop (every model rotated onto the previous mean: SVD of the d×d matrix
   N_iᵀ C per model per iteration, d = 1536) to Δloss < 1e-10 vs ``generalized_procrustes`` (its
   default: cross-products, sequential start, Anderson-accelerated block sweeps, eigh-based
   Procrustes step with SVD fallback) on 4 models × 1024 stimuli × dims (1280, 1536, 1280, 1280).
   Both are compared with the optimum (``generalized_procrustes`` at tol 0, i.e. to rounding).
   Reported: iterations, Procrustes steps, time, speed-up, how many steps took the eigh route, the
   plain loop's work (flop counts from Golub & Van Loan), the distance of each from the optimum,
   the load average. GPA at large n, next to version 1: ``benchmarks/bench_gpa_scale.py``.

The data are synthetic (a shared latent structure with a decaying spectrum, model-specific maps and
noise), because the timings depend only on the shapes. Each timing is the minimum over repeats.

Usage: .venv/bin/python benchmarks/bench_numerics.py [--quick] [--threads N] [--out NAME]
           [--gpa-stimuli M] [--gpa-dims D1,D2,...]
Writes benchmarks/results/NAME (default numerics.json). Run it once with OPENBLAS_NUM_THREADS=1
(--out numerics_blas1.json) and once with the default threads: on a shared 2-core machine
multithreaded LAPACK can be much slower than single-threaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
import convergence_core.procrustes as procrustes  # noqa: E402
from convergence_core.procrustes import generalized_procrustes  # noqa: E402



def best_time(fn, repeats: int) -> tuple[float, object]:
    best, value = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


# --- GPA ----------------------------------------------------------------------------------------
def synthetic_embeddings(m: int, dims: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 256
    shared = rng.standard_normal((m, latent)) * np.exp(-np.arange(latent) / 40.0)
    out = []
    for d in dims:
        specific = rng.standard_normal((m, d)) * np.exp(-np.arange(d) / 300.0)
        out.append(shared @ rng.standard_normal((latent, d)) / np.sqrt(latent) + 0.3 * specific
                   + 0.02 * rng.standard_normal((m, d)))
    return out


def plain_gpa(embeddings: list[np.ndarray], tol: float = 1e-10, max_iter: int = 1000):
    """GPA as written in the paper: full padded d, SVD of the d×d matrix N_iᵀ C every iteration."""
    d = max(x.shape[1] for x in embeddings)
    configs = []
    for x in embeddings:
        x = x - x.mean(axis=0)
        configs.append(np.pad(x / np.linalg.norm(x), ((0, 0), (0, d - x.shape[1]))))
    consensus = np.mean(configs, axis=0)
    losses = [sum(float(np.sum((c - consensus) ** 2)) for c in configs)]
    aligned = configs
    for _ in range(max_iter):
        aligned = []
        for n in configs:
            u, _, vt = np.linalg.svd(n.T @ consensus)
            aligned.append(n @ (u @ vt))
        consensus = np.mean(aligned, axis=0)
        losses.append(sum(float(np.sum((a - consensus) ** 2)) for a in aligned))
        if losses[-2] - losses[-1] < tol:
            break
    residuals = np.stack([np.linalg.norm(a - consensus, axis=1) for a in aligned], axis=1)
    return residuals, len(losses) - 1, losses[-1]


def count_routes(run):
    """Run ``run()`` while counting the Procrustes steps (``procrustes._polar`` calls, in
    cross-product form: one (r_i × p) matrix each) that took the eigh / SVD route."""
    counts = {"eigh": 0, "svd": 0}
    original = procrustes._polar

    def counting(a):
        t, used_eigh = original(a)
        counts["eigh" if used_eigh else "svd"] += 1
        return t, used_eigh

    procrustes._polar = counting
    try:
        value = run()
    finally:
        procrustes._polar = original
    return value, counts


def bench_gpa(m: int, dims: tuple[int, ...], repeats: int) -> dict:
    embeddings = synthetic_embeddings(m, dims)
    load_before = os.getloadavg()
    t_plain, (res_plain, it_plain, loss_plain) = best_time(lambda: plain_gpa(embeddings), 1)
    t_fast, result = best_time(lambda: generalized_procrustes(embeddings), repeats)
    load_after = os.getloadavg()
    _, routes = count_routes(lambda: generalized_procrustes(embeddings))
    optimum = generalized_procrustes(embeddings, tol=0.0)
    d, n_models = max(dims), len(dims)
    p = min(m - 1, d)
    # Work of the plain loop (flops; gesdd of an (n, n) matrix with both factors ≈ 8·n³), per model
    # per iteration: N_iᵀC and N_i(UVᵀ) (2·m·d² each), UVᵀ (2·d³), SVD (d, d). The fast path's work
    # is measured in benchmarks/bench_gpa_scale.py (time per part), not modelled here.
    plain_flop = it_plain * n_models * (2 * 2 * m * d * d + 2 * d**3 + 8 * d**3)
    fast_steps = routes["eigh"] + routes["svd"]
    rng = np.random.default_rng(2)
    t_svd_d, _ = best_time(lambda: np.linalg.svd(rng.standard_normal((d, d))), 1)
    sym = rng.standard_normal((p, p))
    t_eigh_p, _ = best_time(lambda: np.linalg.eigh(sym + sym.T), 1)
    return {
        "m": m,
        "dims": list(dims),
        "tol": 1e-10,
        "plain_s": t_plain,
        "plain_iterations": it_plain,
        "plain_procrustes_steps": it_plain * n_models,
        "fast_s": t_fast,
        "fast_iterations": result.n_iter,
        "fast_procrustes_steps": fast_steps,
        "fast_steps_eigh_route": routes["eigh"],
        "fast_steps_svd_route": routes["svd"],
        "speedup": t_plain / t_fast,
        "max_abs_residual_difference": float(np.abs(res_plain - result.residuals).max()),
        "optimum_iterations": optimum.n_iter,
        "optimum_loss": float(optimum.loss_history[-1]),
        "plain_loss_above_optimum": loss_plain - float(optimum.loss_history[-1]),
        "fast_loss_above_optimum": float(result.loss_history[-1] - optimum.loss_history[-1]),
        "plain_max_abs_residual_from_optimum": float(np.abs(res_plain - optimum.residuals).max()),
        "fast_max_abs_residual_from_optimum": float(np.abs(result.residuals - optimum.residuals).max()),
        "plain_gflop": plain_flop / 1e9,
        "svd_d_s": t_svd_d,
        "eigh_p_s": t_eigh_p,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
    }


def peak_gflops(n: int = 1024, repeats: int = 3) -> float:
    """Measured dense float64 matrix-product rate of this machine (the practical limit)."""
    a = np.random.default_rng(1).standard_normal((n, n))
    t, _ = best_time(lambda: a @ a, repeats)
    return 2 * n**3 / t / 1e9


def _plain(value: object) -> object:
    """JSON fallback for numpy scalars and arrays (np.bool_, np.float64, ...)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller problems (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as configured)")
    parser.add_argument("--out", default="numerics.json", help="file name in benchmarks/results/")
    parser.add_argument("--gpa-stimuli", type=int, default=None,
                        help="GPA problem: stimuli (default 1024, --quick 256)")
    parser.add_argument("--gpa-dims", default=None,
                        help="GPA problem: comma-separated model widths "
                             "(default 1280,1536,1280,1280; --quick 320,384,320,320)")
    args = parser.parse_args()
    gpa_m, gpa_dims = (256, (320, 384, 320, 320)) if args.quick else (1024, (1280, 1536, 1280, 1280))
    if args.gpa_dims:
        gpa_dims = tuple(int(d) for d in args.gpa_dims.split(","))
    gpa_shape = (args.gpa_stimuli or gpa_m, gpa_dims)
    with threadpool_limits(args.threads):
        blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]
        peak = peak_gflops()
        gpa = bench_gpa(*gpa_shape, repeats=1)

    print(f"BLAS {blas}; cores {os.cpu_count()}; measured float64 matmul peak {peak:.1f} GFLOP/s")
    dims = tuple(gpa["dims"])
    print(f"\nGPA, {len(dims)} models × {gpa['m']} stimuli × dims {dims}, Δloss < 1e-10; "
          f"load average {gpa['load_average_before'][0]:.2f} → {gpa['load_average_after'][0]:.2f}")
    print(f"{'method':>8} {'iterations':>10} {'steps':>6} {'time (s)':>9} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'loss − optimum':>15} {'max |Δ residual| from optimum':>30}")
    for name in ("plain", "fast"):
        gflop, seconds = gpa.get(f"{name}_gflop", float("nan")), gpa[f"{name}_s"]
        print(f"{name:>8} {gpa[f'{name}_iterations']:>10} {gpa[f'{name}_procrustes_steps']:>6} "
              f"{seconds:>9.2f} {gflop:>7.0f} {gflop / seconds:>8.1f} "
              f"{gpa[f'{name}_loss_above_optimum']:>15.1e} "
              f"{gpa[f'{name}_max_abs_residual_from_optimum']:>30.1e}")
    print(f"speed-up {gpa['speedup']:.1f}×; max |Δ residual| plain vs fast "
          f"{gpa['max_abs_residual_difference']:.1e}; fast steps by eigh / SVD: "
          f"{gpa['fast_steps_eigh_route']} / {gpa['fast_steps_svd_route']}; optimum: tol 0, "
          f"{gpa['optimum_iterations']} iterations, loss {gpa['optimum_loss']:.12f}")
    print(f"one SVD ({max(dims)}²) {gpa['svd_d_s']:.2f} s, "
          f"one eigh ({min(gpa['m'] - 1, max(dims))}²) {gpa['eigh_p_s']:.2f} s")

    payload = {
        "machine": machine(blas=blas, matmul_peak_gflop_per_s=peak,
                           OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS")),
        "quick": args.quick,
        "gpa": gpa,
    }
    print()
    write_results(args.out, payload, default=_plain)


if __name__ == "__main__":
    main()
