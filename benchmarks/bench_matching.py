"""Time nearest-covariate matching (``calibration.matched_random_sets(method="nearest")``, the
report's matched baselines and the lab's calibrated scores) as n grows, against ranking every
candidate for every chosen stimulus (the method before 2026-12-06) where that fits, in the same
run: seconds per matched set, peak memory, and whether the two draw the same sets.

The chosen set is the s = n / 4 stimuli of lowest covariate (the report's low-dispersion set is
the same shape), 10 labels, 5 candidates, the chosen set excluded from the draws (the report's
settings). Peak memory is traced (``tracemalloc``) on separate calls of 2 sets, since tracing
slows Python code several times; the times are untraced.

Prints a table and writes benchmarks/results/bench_matching.json (or ``--out``)::

    .venv/bin/python benchmarks/bench_matching.py                        # n = 2,000 … 100,000
    .venv/bin/python benchmarks/bench_matching.py --sizes 2000 --sets 5  # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core.calibration import matched_random_sets  # noqa: E402

N_LABELS = 10
N_CANDIDATES = 5
#: Largest n the reference runs at (its memory and time grow as s · n: ~0.2 GB at 20,000)
REFERENCE_LIMIT = 20_000


def nearest_sets_by_ranking(
    chosen: np.ndarray,
    covariate: np.ndarray,
    labels: np.ndarray | None,
    n_sets: int,
    n_candidates: int,
    exclude_chosen: bool,
    seed: int,
) -> np.ndarray:
    """The slow reference of nearest matching: every chosen stimulus ranks every candidate of its
    label by covariate distance (a stable sort, so lower index first on ties); each set then
    draws, in a random order, one of the ``n_candidates`` nearest unused ones. (n_sets, s), rows
    sorted; O(s · n) memory and time."""
    rng = np.random.default_rng(seed)
    n = covariate.size
    pool = np.ones(n, dtype=bool)
    if exclude_chosen:
        pool[chosen] = False
    groups = labels if labels is not None else np.zeros(n, dtype=np.int64)
    ranked = {}
    for i in chosen:
        members = np.flatnonzero(pool & (groups == groups[i]))
        distance = np.abs(covariate[members] - covariate[i])
        ranked[int(i)] = members[np.argsort(distance, kind="stable")]
    sets = np.empty((n_sets, chosen.size), dtype=np.int64)
    for b in range(n_sets):
        free = pool.copy()
        for position, i in enumerate(rng.permutation(chosen)):
            candidates = ranked[int(i)]
            nearest = candidates[free[candidates]][:n_candidates]
            pick = nearest[rng.integers(nearest.size)]  # ValueError when none is left
            free[pick] = False
            sets[b, position] = pick
    return np.sort(sets, axis=1)


def _timed(draw: Callable[[int], np.ndarray], n_sets: int) -> tuple[np.ndarray, float, float]:
    """The sets of ``draw(n_sets)``, its seconds, and the traced peak MiB of ``draw(2)``."""
    start = time.perf_counter()
    sets = draw(n_sets)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        draw(2)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return sets, seconds, peak


def measure(n: int, n_sets: int, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    covariate = rng.standard_normal(n)
    labels = rng.integers(0, N_LABELS, n)
    chosen = np.sort(np.argsort(covariate, kind="stable")[: n // 4])

    def ours(sets: int) -> np.ndarray:
        return matched_random_sets(
            chosen, covariate, labels, n_sets=sets, method="nearest",
            n_candidates=N_CANDIDATES, exclude_chosen=True, seed=seed,
        )

    def reference(sets: int) -> np.ndarray:
        return nearest_sets_by_ranking(
            chosen, covariate, labels, sets, N_CANDIDATES, True, seed
        )

    got, seconds, peak = _timed(ours, n_sets)
    row: dict[str, object] = {
        "n": n, "s": int(chosen.size), "n_sets": n_sets,
        "seconds": round(seconds, 3), "seconds_per_set": round(seconds / n_sets, 4),
        "peak_mib": round(peak, 1),
        # what the method must at least do per set: one pick per chosen stimulus
        "picks_per_second": round(n_sets * chosen.size / seconds),
    }
    if n <= REFERENCE_LIMIT:
        expected, ref_seconds, ref_peak = _timed(reference, n_sets)
        row.update(
            reference_seconds=round(ref_seconds, 3),
            reference_seconds_per_set=round(ref_seconds / n_sets, 4),
            reference_peak_mib=round(ref_peak, 1),
            speedup=round(ref_seconds / seconds, 2),
            identical=bool(np.array_equal(got, expected)),
        )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 20000, 100000])
    parser.add_argument("--sets", type=int, default=200, help="matched sets per size (200)")
    parser.add_argument("--out", default="bench_matching.json")
    args = parser.parse_args(argv)
    rows = []
    header = (f"{'n':>8} {'s':>7} {'sets':>5} {'s/set':>8} {'peak MiB':>9} {'ref s/set':>10} "
              f"{'ref MiB':>8} {'speed-up':>9} {'same sets':>10}")
    print(header)
    for n in args.sizes:
        row = measure(n, args.sets)
        rows.append(row)
        print(f"{row['n']:>8,} {row['s']:>7,} {row['n_sets']:>5} {row['seconds_per_set']:>8.4f} "
              f"{row['peak_mib']:>9.1f} {row.get('reference_seconds_per_set', '—'):>10} "
              f"{row.get('reference_peak_mib', '—'):>8} {row.get('speedup', '—'):>9} "
              f"{str(row.get('identical', '—')):>10}")
    print("peak memory: traced on 2 sets; the reference above n = "
          f"{REFERENCE_LIMIT:,} is not run (its ranking alone is s · n · 8 bytes)")
    write_results(args.out, {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
