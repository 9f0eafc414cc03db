"""GPA at large n: version 1 of the algorithm next to the cross-product / Anderson version.

The problem is issue 11's synthetic case: M models of width 768 (``--dims``), a rank-64 shared
signal plus isotropic noise (``--rank``, ``--noise``), float32 features stored as ``.npy`` files and
memory-mapped, as a run stores them:

    X_i = z A_i / sqrt(rank) + noise · E_i,   z (n, rank), A_i (rank, d_i), E_i (n, d_i) ~ N(0, 1).

Per stimulus count n, each method runs in its own process (so that its peak RSS is its own):

* ``old``: a private copy of version 1 of ``generalized_procrustes`` (data-space block sweeps on
  float64 copies of the inputs, stopping when one iteration lowers the loss by < 1e-10, its default),
* ``new``: ``generalized_procrustes`` (default tol), with the time of its three parts (reading the
  inputs into cross-products, the iterations, the residual pass),
* ``reference``: the tol=1e-13 run — version 1's iterates (plain block sweeps, which
  ``accelerate=False`` reproduces exactly, here in cross-product form so that it is affordable) with
  version 1's rule, stop when one iteration lowers the loss by < 1e-13,
* ``tight``: ``generalized_procrustes(tol=0)`` (runs until the decrease is rounding): the lowest
  loss available, to tell how far the reference itself is from the optimum,
* ``stability``: ``gpa_stability`` with ``--stability-starts`` random starts (its cost at this n).
* ``steps``: a run's GPA step then its stability step, as a run does them: GPA keeps its fit
  (``keep_fit=True``) and the stability diagnostic starts from it (``reference=``: no second read
  of the inputs' cross-products, no second solve of GPA);
* ``steps_before``: the same two steps as before that (the diagnostic solves GPA again); the
  summary line gives both times and the largest difference of their dispersion spreads.
* ``uncertainty``: a run's GPA step with ``gpa_stop="uncertainty"``
  (``gpa_stability.gpa_to_uncertainty``: GPA and the diagnostic's random starts together, stopped
  once the residuals move less than a tenth of their spread over the starts); its summary line
  compares it with ``steps`` (the same two outputs at the optimum) and ``new`` (the optimum's
  residuals: how far the early stop leaves them, in units of the spread).

Reported per (n, method): iterations, block sweeps, seconds (wall and CPU), final loss, loss minus
the reference's and minus the lowest loss found, Spearman ρ of the dispersion (mean residual) with
the reference's, the largest residual difference, and the peak RSS (``ru_maxrss``; it counts the
pages of the memory-mapped inputs that were read). Timings on a shared machine are noisy: compare
methods within one run (ratios), and prefer CPU seconds.

Usage:
    .venv/bin/python benchmarks/bench_gpa_scale.py [--sizes 2000,5000,10000] [--dims 768,768,768,768]
        [--rank 64] [--noise 0.2]
        [--methods old,new,reference,tight,stability,steps,steps_before,uncertainty]
        [--old-max-n 10000]
        [--threads N] [--max-iter 3000] [--out gpa_scale.json] [--quick]
``--quick`` is a smoke run (n = 400, 800; width 96). Writes benchmarks/results/NAME.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402

METHODS = ("old", "new", "reference", "tight", "stability")
#: the run's GPA and stability steps, with and without the stability step starting from GPA's fit
STEPS = ("steps", "steps_before")
#: the GPA step stopped at the residuals' uncertainty (GPA and its stability diagnostic in one)
UNCERTAINTY = "uncertainty"


# --- the data --------------------------------------------------------------------------------------
def write_case(folder: Path, n: int, dims: list[int], rank: int, noise: float, seed: int) -> list[Path]:
    """The synthetic case as float32 .npy files (written in row blocks), one per model."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, rank))
    paths = []
    for i, d in enumerate(dims):
        mixing = rng.standard_normal((rank, d)) / np.sqrt(rank)
        path = folder / f"model{i}_n{n}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        for start in range(0, n, 8192):
            rows = slice(start, min(start + 8192, n))
            block_rng = np.random.default_rng([seed, i, start])
            out[rows] = z[rows] @ mixing + noise * block_rng.standard_normal((rows.stop - rows.start, d))
        out.flush()
        del out
        paths.append(path)
    return paths


# --- version 1 of the algorithm (a private copy, data space) ------------------------------------
def _v1_polar_rows(a: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def _v1_aligned(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Version 1's step: z @ polar(zᵀ c) from eigh(a aᵀ), first-order guard 1e-7, SVD fallback."""
    a = z.T @ c
    lam, w = np.linalg.eigh(a @ a.T)
    if lam[0] > 0.0:
        zw = z @ w
        estimate = np.finfo(np.float64).eps * lam[-1] * np.linalg.norm(zw / np.sqrt(lam)) / np.sqrt(lam[0])
        if estimate <= 1e-7:
            rows = w.T @ a
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            return zw @ rows
    return z @ _v1_polar_rows(a)


def v1_generalized_procrustes(embeddings: list[np.ndarray], tol: float = 1e-10, max_iter: int = 1000):
    """Version 1 (git 7693e2d): Gower start, ten Berge block sweeps in centered rank-r coordinates,
    stop when one iteration lowers the loss by < tol. Returns (residuals (n, M), loss history)."""
    m = embeddings[0].shape[0]
    d = max(x.shape[1] for x in embeddings)
    configs = []
    for x in embeddings:
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(axis=0)
        configs.append(x / np.linalg.norm(x))
    u = np.full(m, 1.0 / np.sqrt(m))
    u[0] -= 1.0
    u /= np.linalg.norm(u)
    coords = [np.linalg.qr((n - 2.0 * np.outer(u, u @ n))[1:].T, mode="r").T for n in configs]
    n_models = len(configs)
    mean = np.zeros((m, d))
    for n in configs:
        mean[:, : n.shape[1]] += n
    mean /= n_models
    history = [float(sum(np.sum((np.pad(n, ((0, 0), (0, d - n.shape[1]))) - mean) ** 2) for n in configs))]
    del configs

    def loss(aligned):
        c = np.mean(aligned, axis=0)
        return float(sum(np.sum((a - c) ** 2) for a in aligned))

    order = sorted(range(n_models), key=lambda i: -coords[i].shape[1])
    width = min(m - 1, d)
    placed = {order[0]: np.pad(coords[order[0]], ((0, 0), (0, width - coords[order[0]].shape[1])))}
    total = placed[order[0]].copy()
    for i in order[1:]:
        placed[i] = _v1_aligned(coords[i], total)
        total += placed[i]
    aligned = [placed[i] for i in range(n_models)]
    current = loss(aligned)
    if current > history[0]:
        c0 = np.linalg.qr((mean - 2.0 * np.outer(u, u @ mean))[1:].T, mode="r").T
        aligned = [_v1_aligned(z, c0) for z in coords]
        current = loss(aligned)
    history.append(current)
    while history[-2] - history[-1] >= tol and len(history) - 1 < max_iter:
        for i in order:
            others = sum(aligned[j] for j in range(n_models) if j != i)
            aligned[i] = _v1_aligned(coords[i], others)
        history.append(loss(aligned))
    def from_basis(y):  # E y: centered-basis coordinates back to stimulus rows
        x = np.vstack([np.zeros((1, y.shape[1])), y])
        return x - 2.0 * np.outer(u, u @ x)

    aligned = [from_basis(a) for a in aligned]
    consensus = np.mean(aligned, axis=0)
    residuals = np.stack([np.linalg.norm(a - consensus, axis=1) for a in aligned], axis=1)
    return residuals, np.asarray(history)


# --- one method in its own process -----------------------------------------------------------------
def run_worker(method: str, paths: list[Path], out: Path, threads: int | None, starts: int,
               max_iter: int) -> None:
    from threadpoolctl import threadpool_limits

    from convergence_core import procrustes
    from convergence_core.gpa_stability import gpa_stability, gpa_to_uncertainty

    arrays = [np.load(p, mmap_mode="r") for p in paths]
    parts: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            value = fn(*args, **kwargs)
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
            return value
        return wrapper

    record: dict[str, object] = {"method": method}
    with threadpool_limits(threads):
        wall, cpu = time.perf_counter(), time.process_time()
        if method == "old":
            residuals, history = v1_generalized_procrustes(
                [np.asarray(a, dtype=np.float64) for a in arrays], max_iter=max_iter
            )
            record.update(iterations=len(history) - 1, sweeps=len(history) - 2, loss=float(history[-1]),
                          converged=bool(history[-2] - history[-1] < 1e-10))
        elif method in ("new", "tight"):
            procrustes._prepare = timed("read_cross_products_s", procrustes._prepare)
            procrustes._iterate = timed("iterations_s", procrustes._iterate)
            procrustes._residuals = timed("residuals_s", procrustes._residuals)
            counts = {}
            iterate = procrustes._iterate

            def counting(*args, **kwargs):
                solution = iterate(*args, **kwargs)
                counts.update(sweeps=solution.sweeps, loss_evaluations=solution.loss_evaluations,
                              restarts=solution.restarts)
                return solution

            procrustes._iterate = counting
            tol = 0.0 if method == "tight" else procrustes.DEFAULT_TOL
            result = procrustes.generalized_procrustes(arrays, tol=tol)
            residuals = result.residuals
            record.update(iterations=result.n_iter, loss=float(result.loss_history[-1]),
                          converged=result.converged, gap_estimate=result.gap_estimate, **counts)
        elif method == "reference":
            arrays_checked = procrustes._check_inputs(arrays, ())
            problem = procrustes._prepare(arrays_checked, procrustes._labels(len(arrays), ()))
            it = procrustes._Iterations(problem)
            maps, loss = it.start()
            history = [problem.unaligned_loss, loss]
            while history[-2] - history[-1] >= 1e-13 and len(history) - 1 < max_iter:
                maps, loss = it.sweep(maps)
                history.append(loss)
            full = procrustes._full_maps(problem, maps)
            residuals = procrustes._residuals(arrays_checked, problem.means, problem.scales, [full])[0]
            record.update(iterations=len(history) - 1, sweeps=it.sweeps, loss=float(history[-1]),
                          converged=history[-2] - history[-1] < 1e-13)
        elif method == "stability":
            stability = gpa_stability(arrays, n_starts=starts)
            residuals = None
            record.update(summary=stability.summary(), losses=stability.losses.tolist(),
                          iterations=int(stability.n_iter.sum()))
        elif method in STEPS:
            reuse = method == "steps"
            start = time.perf_counter()
            result = procrustes.generalized_procrustes(arrays, keep_fit=reuse)
            parts["gpa_s"] = time.perf_counter() - start
            stability = gpa_stability(arrays, n_starts=starts, reference=result if reuse else None)
            parts["stability_s"] = time.perf_counter() - start - parts["gpa_s"]
            residuals = result.residuals
            np.save(out.with_suffix(".spread.npy"), stability.dispersion_spread)
            record.update(iterations=result.n_iter, loss=float(result.loss_history[-1]),
                          converged=result.converged,
                          stability_iterations=int(stability.n_iter.sum()))
        elif method == UNCERTAINTY:
            result, stability, stop = gpa_to_uncertainty(arrays, n_starts=starts)
            residuals = result.residuals
            np.save(out.with_suffix(".spread.npy"), stability.dispersion_spread)
            record.update(iterations=result.n_iter, loss=float(result.loss_history[-1]),
                          converged=result.converged,
                          stability_iterations=int(stability.n_iter.sum()),
                          max_residual_spread=float(stability.residual_spread.max()),
                          min_spearman=float(np.nanmin(stability.spearman)),
                          stop={"tol": stop.tol, "stages": stop.stages, "met": stop.met,
                                "step_over_spread": stop.step_over_spread})
        else:
            raise ValueError(f"unknown method {method!r}")
        record["seconds"] = time.perf_counter() - wall
        record["cpu_seconds"] = time.process_time() - cpu
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    record.update(parts)
    if residuals is not None:
        np.save(out.with_suffix(".npy"), residuals)
    out.write_text(json.dumps(record))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,5000,10000")
    parser.add_argument("--dims", default="768,768,768,768")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--old-max-n", type=int, default=10000, help="run `old` only up to this n")
    parser.add_argument("--stability-starts", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=3000,
                        help="iteration cap of `old` and `reference` (reported as converged=False)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as configured)")
    parser.add_argument("--out", default="gpa_scale.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: n = 400, 800, width 96")
    parser.add_argument("--workdir", default=None, help="folder for the inputs (default: a temp dir)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, [Path(p) for p in args.paths.split(",")], Path(args.result),
                   args.threads, args.stability_starts, args.max_iter)
        return
    sizes = [400, 800] if args.quick else [int(x) for x in args.sizes.split(",")]
    dims = [96, 96, 96, 96] if args.quick else [int(x) for x in args.dims.split(",")]
    rank = 12 if args.quick else args.rank
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        rows = []
        for n in sizes:
            paths = write_case(folder, n, dims, rank, args.noise, args.seed)
            results = {}
            for method in methods:
                if method == "old" and n > args.old_max_n:
                    continue
                result_path = folder / f"{method}_{n}.json"
                command = [sys.executable, __file__, "--worker", method,
                           "--paths", ",".join(str(p) for p in paths), "--result", str(result_path),
                           "--stability-starts", str(args.stability_starts),
                           "--max-iter", str(args.max_iter)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                load = os.getloadavg()[0]
                subprocess.run(command, check=True)
                record = json.loads(result_path.read_text())
                record.update(n=n, load_average=load)
                residuals_path = result_path.with_suffix(".npy")
                if residuals_path.exists():
                    record["_residuals"] = np.load(residuals_path)
                results[method] = record
                print(f"  n={n} {method}: {record.get('iterations')} iterations "
                      f"(converged: {record.get('converged')}), "
                      f"{record['seconds']:.1f} s (cpu {record['cpu_seconds']:.1f} s), "
                      f"peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)
            best = min((r["loss"] for r in results.values() if "loss" in r), default=float("nan"))
            reference = results.get("reference")
            for method, record in results.items():
                residuals = record.pop("_residuals", None)
                if "loss" in record:
                    record["loss_minus_lowest"] = record["loss"] - best
                if reference is not None and "loss" in record:
                    record["loss_minus_reference"] = record["loss"] - reference["loss"]
                if method == UNCERTAINTY and residuals is not None and "new" in results:
                    optimum = np.load(folder / f"new_{n}.npy")  # GPA at its optimum
                    record["spearman_vs_optimum"] = spearman(residuals.mean(axis=1),
                                                             optimum.mean(axis=1))
                    distance = float(np.abs(residuals - optimum).max())
                    record["max_abs_residual_minus_optimum"] = distance
                if reference is not None and residuals is not None:
                    ref_res = np.load(folder / f"reference_{n}.npy")
                    record["spearman_vs_reference"] = spearman(residuals.mean(axis=1), ref_res.mean(axis=1))
                    record["max_abs_residual_minus_reference"] = float(np.abs(residuals - ref_res).max())
                rows.append(record)
            if all(m in results for m in STEPS):
                spreads = [np.load(folder / f"{m}_{n}.spread.npy") for m in STEPS]
                results["steps"]["spread_difference"] = float(np.abs(spreads[0] - spreads[1]).max())
            for p in paths:
                p.unlink()

    print(f"\nGPA, {len(dims)} models of width {dims}, rank-{rank} signal + noise {args.noise}; "
          f"BLAS threads {args.threads or 'default'}; load average now {os.getloadavg()[0]:.1f}")
    header = (f"{'n':>7} {'method':>9} {'iter':>5} {'sweeps':>6} {'wall s':>8} {'cpu s':>8} "
              f"{'final loss':>19} {'− reference':>12} {'− lowest':>10} {'ρ vs ref':>9} {'RSS MB':>7}")
    print(header)
    for r in rows:
        print(f"{r['n']:>7} {r['method']:>9} {r.get('iterations', 0):>5} {r.get('sweeps', 0) or 0:>6} "
              f"{r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {r.get('loss', float('nan')):>19.15f} "
              f"{r.get('loss_minus_reference', float('nan')):>12.1e} {r.get('loss_minus_lowest', float('nan')):>10.1e} "
              f"{r.get('spearman_vs_reference', float('nan')):>9.6f} {r['peak_rss_mb']:>7.0f}")
    for n in sizes:
        by = {r["method"]: r for r in rows if r["n"] == n}
        if "old" in by and "new" in by:
            print(f"n={n}: new/old wall {by['new']['seconds'] / by['old']['seconds']:.2f}, "
                  f"cpu {by['new']['cpu_seconds'] / by['old']['cpu_seconds']:.2f}")
        if "new" in by:
            parts = {k: round(v, 2) for k, v in by["new"].items() if k.endswith("_s")}
            print(f"n={n}: new, parts (s): {parts}")
        if "stability" in by:
            print(f"n={n}: stability ({args.stability_starts} starts): {by['stability']['summary']}")
        if all(m in by for m in STEPS):
            now, before = by["steps"], by["steps_before"]
            print(f"n={n}: GPA + stability ({args.stability_starts} starts) {now['seconds']:.1f} s "
                  f"(stability {now['stability_s']:.1f} s) against {before['seconds']:.1f} s "
                  f"(stability {before['stability_s']:.1f} s) when the stability step solved GPA "
                  f"again; dispersion spreads {now['spread_difference']:.1e} apart")
        if UNCERTAINTY in by:
            early = by[UNCERTAINTY]
            line = (f"n={n}: GPA + stability ({args.stability_starts} starts) stopped at the "
                    f"residuals' uncertainty: {early['seconds']:.1f} s, GPA {early['iterations']} "
                    f"iterations, all solutions {early['stability_iterations']}, {early['stop']}")
            if "steps" in by:
                line += (f"; at the optimum {by['steps']['seconds']:.1f} s (GPA "
                         f"{by['steps']['iterations']}, all {by['steps']['stability_iterations']})")
            if "max_abs_residual_minus_optimum" in early:
                distance = early["max_abs_residual_minus_optimum"]
                line += (f"; residuals {distance:.1e} from the optimum's = "
                         f"{distance / early['max_residual_spread']:.2f} × the largest spread, "
                         f"dispersion ρ {early['spearman_vs_optimum']:.5f} with it (starts among "
                         f"themselves: ≥ {early['min_spearman']:.5f})")
            print(line)

    payload = {
        "machine": machine(threads=args.threads,
                           OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS")),
        "case": {"sizes": sizes, "dims": dims, "rank": rank, "noise": args.noise, "seed": args.seed,
                 "quick": args.quick},
        "rows": rows,
    }
    print()
    write_results(args.out, payload, default=float)


if __name__ == "__main__":
    main()
