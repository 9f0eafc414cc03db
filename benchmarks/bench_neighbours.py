"""Subset CKNNA from neighbour lists vs the dense reference, in the same run.

For n stimuli (two synthetic models, widths 768 and 512: a shared rank-64 signal plus noise):

* ``dense``: the Platonic Representation ``cknna`` transcribed to numpy float64 (s×s kernels,
  s×s masks, an s×s matrix product per HSIC) on the subset's prepared features;
* ``lists``: ``neighbours.subset_alignment`` on the run's stored exact neighbour lists (one subset,
  then the lab's workload: 200 random subsets of n/4 in one call);
* ``build``: building both models' lists once (``build_neighbour_lists``; float32 screen + float64
  refinement), with its work 2·n²·d flops and the throughput reached.

Subsets: the full set, a random half, a random quarter. |diff| is lists − dense.

Usage: .venv/bin/python benchmarks/bench_neighbours.py [--quick] [--out NAME]
Writes benchmarks/results/NAME (default neighbours.json).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core.neighbours import (  # noqa: E402
    NeighbourIndex,
    PreparedFeatures,
    build_neighbour_lists,
    subset_alignment,
)



def dense_reference_cknna(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    """The Platonic Representation ``cknna`` with s×s masks, in numpy float64."""
    K, L = X @ X.T, Y @ Y.T
    n = K.shape[0]

    def hsic_unbiased(A: np.ndarray, B: np.ndarray) -> float:
        At, Bt = A.copy(), B.copy()
        np.fill_diagonal(At, 0.0)
        np.fill_diagonal(Bt, 0.0)
        value = (
            np.sum(At * Bt.T)
            + At.sum() * Bt.sum() / ((n - 1) * (n - 2))
            - 2 * np.sum(At @ Bt) / (n - 2)
        )
        return value / (n * (n - 3))

    def mask(G: np.ndarray) -> np.ndarray:
        G_hat = G.copy()
        np.fill_diagonal(G_hat, -np.inf)
        top = np.argpartition(G_hat, n - k, axis=1)[:, n - k :]
        out = np.zeros((n, n))
        np.put_along_axis(out, top, 1.0, axis=1)
        return out

    mask_k, mask_l = mask(K), mask(L)
    both = mask_k * mask_l
    sim_kl = hsic_unbiased(both * K, both * L)
    sim_kk = hsic_unbiased(mask_k * K, mask_k * K)
    sim_ll = hsic_unbiased(mask_l * L, mask_l * L)
    return sim_kl / (np.sqrt(sim_kk * sim_ll) + 1e-6)


def synthetic(n: int, dims: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 64)).astype(np.float32)
    return [
        (z @ rng.standard_normal((64, d)).astype(np.float32)
         + 2.0 * rng.standard_normal((n, d)).astype(np.float32))
        for d in dims
    ]


def timed(fn, repeats: int = 1):
    best, value = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def bench(n: int, k: int, dims: tuple[int, int]) -> list[dict]:
    raw = synthetic(n, dims)
    features = [PreparedFeatures.from_raw(x) for x in raw]
    t_build, lists = timed(lambda: [build_neighbour_lists(f) for f in features])
    indexes = {i: NeighbourIndex(f, lst) for i, (f, lst) in enumerate(zip(features, lists))}
    prepared = [f.all_rows() for f in features]
    rng = np.random.default_rng(1)
    rows = []
    for s in (n, n // 2, n // 4):
        subset = np.sort(rng.choice(n, s, replace=False))
        t_dense, dense = timed(
            lambda: dense_reference_cknna(prepared[0][subset], prepared[1][subset], k),
            1 if s > 2048 else 3,
        )
        t_lists, ours = timed(lambda: subset_alignment(indexes, [(0, 1)], subset, k), 5)
        rows.append({
            "n": n, "subset_size": s, "k": k, "list_size": lists[0].k_max,
            "dense_s": t_dense, "lists_s": t_lists, "speedup": t_dense / t_lists,
            "abs_difference": abs(float(ours.cknna[0, 0]) - dense),
            "build_both_s": t_build,
            "build_gflop": 2.0 * n * n * sum(dims) / 1e9,
        })
    sets = np.stack([np.sort(rng.choice(n, n // 4, replace=False)) for _ in range(200)])
    t_batch, _ = timed(lambda: subset_alignment(indexes, [(0, 1)], sets, k))
    for row in rows:
        row["random_200_sets_of_quarter_s"] = t_batch
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small problems (a smoke run)")
    parser.add_argument("--out", default="neighbours.json", help="file name in benchmarks/results/")
    args = parser.parse_args()
    sizes = [256, 512] if args.quick else [1024, 2048, 4096]
    dims = (96, 64) if args.quick else (768, 512)
    rows = [row for n in sizes for row in bench(n, 10, dims)]
    print(f"Subset CKNNA, k=10, widths {dims}: dense reference vs neighbour lists; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'n':>5} {'s':>5} {'dense (s)':>9} {'lists (ms)':>10} {'×':>7} {'|diff|':>8} "
          f"{'200 sets (s)':>12} {'build (s)':>9} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['n']:>5} {r['subset_size']:>5} {r['dense_s']:>9.3f} {1e3 * r['lists_s']:>10.2f} "
              f"{r['speedup']:>7.1f} {r['abs_difference']:>8.1e} "
              f"{r['random_200_sets_of_quarter_s']:>12.2f} {r['build_both_s']:>9.2f} "
              f"{r['build_gflop'] / r['build_both_s']:>8.1f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:.0f} MB")
    payload = {"quick": args.quick, "machine": machine(), "peak_rss_mb": peak_mb, "rows": rows}
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
