"""GPA's iterations on one BLAS thread or the library's threads, on an idle and a busy machine.

GPA's iterations are many small products and eigendecompositions. On the library's threads
(OpenBLAS: one per core) every call waits for its slowest thread, so when another process holds
a core the whole call waits; below a consensus width of ``procrustes.ONE_THREAD_WIDTH`` the
iterations run on one thread. This benchmark times, per case, GPA plus its stability diagnostic
(2 random starts) three ways in one process:

- ``library``: the library's threads throughout (the rule switched off);
- ``one``: one thread throughout (``threadpool_limits(1)``, as ``OPENBLAS_NUM_THREADS=1`` does);
- ``rule``: the default (one thread for the iterations up to the width, the library's beyond).

first on the machine as it is, then beside ``--busy`` processes that each keep a core busy (a
shared machine, a CI runner beside other jobs). Every way reaches the same loss (to 1e-12).

The data are synthetic (a 24-d shared latent plus noise); the timings depend on the shapes.

Usage: .venv/bin/python benchmarks/bench_gpa_threads.py [--big | --quick] [--busy 3] [--out NAME]
Writes benchmarks/results/NAME (default gpa_threads.json).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
import convergence_core.procrustes as procrustes  # noqa: E402
from convergence_core.gpa_stability import gpa_stability  # noqa: E402

CASES = {
    "300 x 64/96/128": (300, (64, 96, 128)),
    "2,000 x 256/384/512": (2000, (256, 384, 512)),
}
BIG = {"5,000 x 768/1,024/1,280/1,536": (5000, (768, 1024, 1280, 1536))}


def features(n: int, widths: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 24))
    return [
        (latent @ rng.standard_normal((24, d)) + 0.5 * rng.standard_normal((n, d))).astype(
            np.float32
        )
        for d in widths
    ]


def _spin(stop) -> None:  # noqa: ANN001 - a multiprocessing Event
    count = 0
    while not stop.is_set():
        for _ in range(100_000):
            count += 1


def timed(arrays: list[np.ndarray], way: str) -> dict[str, float]:
    """GPA and 2 stability starts, the given way; seconds and the final loss."""
    saved = procrustes.ONE_THREAD_WIDTH
    if way == "library":
        procrustes.ONE_THREAD_WIDTH = 0
    try:
        with threadpool_limits(limits=1 if way == "one" else None):
            start = time.perf_counter()
            result = procrustes.generalized_procrustes(arrays, keep_fit=True)
            gpa_seconds = time.perf_counter() - start
            gpa_stability(arrays, n_starts=2, seed=0, reference=result)
            total = time.perf_counter() - start
    finally:
        procrustes.ONE_THREAD_WIDTH = saved
    return {"gpa_s": gpa_seconds, "gpa_and_stability_s": total,
            "loss": float(result.loss_history[-1]), "iterations": len(result.loss_history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="add 5,000 x 768-1,536 (minutes)")
    parser.add_argument("--quick", action="store_true", help="the smallest case (a smoke test)")
    parser.add_argument("--busy", type=int, default=3, help="busy processes for the busy rounds")
    parser.add_argument("--out", default="gpa_threads.json")
    args = parser.parse_args()
    cases = {**CASES, **(BIG if args.big else {})}
    if args.quick:
        cases = dict(list(CASES.items())[:1])
    blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
    rows = []
    print(f"BLAS {blas}; one-thread width {procrustes.ONE_THREAD_WIDTH}")
    print(f"{'case':32s} {'machine':8s} {'library':>9s} {'one':>9s} {'rule':>9s}  loss spread")
    for state in ("idle", "busy"):
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,)) for _ in range(args.busy)]
        if state == "busy":
            for process in spinners:
                process.start()
            time.sleep(1.0)
        load = machine()["load_average_1min"]
        try:
            for name, (n, widths) in cases.items():
                arrays = features(n, widths)
                ways = {way: timed(arrays, way) for way in ("library", "one", "rule")}
                losses = [w["loss"] for w in ways.values()]
                spread = max(losses) - min(losses)
                print(f"{name:32s} {state:8s} " + " ".join(
                    f"{ways[w]['gpa_and_stability_s']:8.2f}s" for w in ("library", "one", "rule")
                ) + f"  {spread:.1e}", flush=True)
                rows.append({"case": name, "n": n, "widths": list(widths), "machine": state,
                             "busy_processes": args.busy if state == "busy" else 0,
                             "load_average_at_start": load, "loss_spread": spread, **{
                                 f"{way}_{key}": value for way, values in ways.items()
                                 for key, value in values.items()}})
        finally:
            stop.set()
            for process in spinners if state == "busy" else []:
                process.join()
    write_results(args.out, {"machine": machine(blas=blas),
                             "one_thread_width": procrustes.ONE_THREAD_WIDTH, "rows": rows})


if __name__ == "__main__":
    main()
