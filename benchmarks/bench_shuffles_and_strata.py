"""Time and trace two scale fixes against the code before them (kept here), in the same run:

* **Matched random sets by strata** (``calibration.matched_random_sets(method="strata")``, the
  report's and the Alignment lab's matched sets above ``calibration.NEAREST_MATCHING_PICKS``): the pool was scanned once per stratum
  (O(n · strata) with strata = bins × (labels + 1): quadratic when the labels grow with n) and
  each set called ``rng.choice`` once per stratum; now the pool is grouped once (a stable sort)
  and the small strata's draws are one ``rng.integers`` call per set — the same sets.
  Settings as the scale audit: n / 10 labels, 25 bins, the chosen set s = n / 4 random stimuli,
  drawn from every stimulus.
* **Label shuffles** of the low/high permutation test (``stats.permutation_tests_two_sets``, the
  report's Fig. 2 through ``analyses._shuffle_nulls``): all P relabellings of the 2·s pooled
  stimuli were drawn at once, then copied into the engine's one (2P, s) call; now they are drawn
  and scored ``stats.SHUFFLE_BLOCK`` at a time — the same relabellings. The statistic here is a
  cheap stand-in (the sum of a per-stimulus value over each set, row by row), so the numbers are
  the shuffles' own cost, not a metric's.

Peak memory is traced (``tracemalloc``) on separate calls, since tracing slows Python code; the
times are untraced. Prints a table and writes benchmarks/results/bench_shuffles_and_strata.json
(or ``--out``)::

    .venv/bin/python benchmarks/bench_shuffles_and_strata.py                   # n = 10k, 20k, 40k
    .venv/bin/python benchmarks/bench_shuffles_and_strata.py --sizes 2000 --sets 2 \\
        --permutations 100                                                       # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core.calibration import covariate_strata, matched_random_sets  # noqa: E402
from convergence_core.stats import SHUFFLE_BLOCK, permutation_tests_two_sets  # noqa: E402

LABELS_PER = 10  # one label per 10 stimuli
N_BINS = 25
#: Extra sets timed for the seconds per set after the set-up
PER_SET_SETS = 50


# ----------------------------------------------------------------------------------------------
# the code before the fixes
def strata_sets_before(
    chosen: np.ndarray, covariate: np.ndarray, labels: np.ndarray, n_sets: int, seed: int
) -> np.ndarray:
    """``matched_random_sets(method="strata", n_bins=N_BINS)`` before 2026-12-07: one scan of the
    pool per stratum, one ``rng.choice`` per stratum and set. (n_sets, s), rows sorted."""
    rng = np.random.default_rng(seed)
    strata = covariate_strata(covariate, labels, n_bins=N_BINS)
    pool = np.ones(covariate.size, dtype=bool)
    needed = np.bincount(strata[chosen], minlength=strata.max() + 1)
    members = [np.flatnonzero((strata == h) & pool) for h in range(needed.size)]
    sets = np.empty((n_sets, chosen.size), dtype=np.int64)
    for b in range(n_sets):
        sets[b] = np.concatenate(
            [rng.choice(members[h], needed[h], replace=False) for h in np.flatnonzero(needed)]
        )
    return np.sort(sets, axis=1)


def permutation_tests_before(
    statistics: Callable[[np.ndarray], np.ndarray],
    first: np.ndarray,
    second: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
) -> list[tuple[float, np.ndarray]]:
    """``stats.permutation_tests_two_sets`` before 2026-12-07: every relabelling drawn at once
    (a list, then stacked), copied into one (2 + 2P, s) call. (observed, null) per statistic."""
    pool = np.concatenate([first, second])
    shuffled = np.stack([pool[rng.permutation(pool.shape[0])] for _ in range(n_permutations)])
    s = first.shape[0]
    stacked = np.concatenate([first[None], second[None], shuffled[:, :s], shuffled[:, s:]])
    values = np.asarray(statistics(stacked), dtype=np.float64)
    return [
        (float(row[0] - row[1]), row[2 : 2 + n_permutations] - row[2 + n_permutations :])
        for row in values
    ]


# ----------------------------------------------------------------------------------------------
def _timed(call: Callable[[], Any], trace: Callable[[], Any]) -> tuple[Any, float, float]:
    """``call()``'s result and seconds, and the traced peak MiB of ``trace()``."""
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        trace()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def _seconds_per_set(draw: Callable[[int], np.ndarray]) -> float:
    """Seconds per set after the set-up: (time of 1 + PER_SET_SETS sets − time of 1) /
    PER_SET_SETS."""
    start = time.perf_counter()
    draw(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    draw(1 + PER_SET_SETS)
    return max(0.0, time.perf_counter() - start - one) / PER_SET_SETS


def measure_strata(n: int, n_sets: int, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    covariate = rng.standard_normal(n)
    labels = rng.integers(0, max(1, n // LABELS_PER), n)
    chosen = np.sort(rng.choice(n, n // 4, replace=False))
    strata = covariate_strata(covariate, labels, n_bins=N_BINS)

    def ours(sets: int) -> np.ndarray:
        return matched_random_sets(chosen, covariate, labels, n_sets=sets, method="strata",
                                   n_bins=N_BINS, seed=seed)

    def before(sets: int) -> np.ndarray:
        return strata_sets_before(chosen, covariate, labels, sets, seed)

    got, seconds, peak = _timed(lambda: ours(n_sets), lambda: ours(1))
    expected, ref_seconds, ref_peak = _timed(lambda: before(n_sets), lambda: before(1))
    return {
        "n": n, "s": int(chosen.size), "labels": int(labels.max() + 1), "bins": N_BINS,
        "strata": int(strata.max() + 1),
        "strata_in_chosen": int(np.unique(strata[chosen]).size),
        "n_sets": n_sets,
        "seconds": round(seconds, 3),
        "seconds_per_set": round(_seconds_per_set(ours), 6),
        "peak_mib": round(peak, 1),
        "before_seconds": round(ref_seconds, 3),
        "before_seconds_per_set": round(_seconds_per_set(before), 6),
        "before_peak_mib": round(ref_peak, 1),
        "speedup": round(ref_seconds / seconds, 1),
        "identical": bool(np.array_equal(got, expected)),
    }


def measure_shuffles(n: int, n_permutations: int, seed: int = 0) -> dict[str, object]:
    s = n // 4
    value = np.random.default_rng(seed).standard_normal(n)
    first, second = np.arange(s), np.arange(s, 2 * s)

    def statistic(sets: np.ndarray) -> np.ndarray:
        """(1, B): one set at a time, so its own memory is one set's."""
        return np.array([[value[row].sum() for row in sets]])

    def ours() -> list[tuple[float, np.ndarray]]:
        tests = permutation_tests_two_sets(statistic, first, second,
                                           n_permutations=n_permutations,
                                           rng=np.random.default_rng(seed))
        return [(test.observed, test.null) for test in tests]

    def before() -> list[tuple[float, np.ndarray]]:
        return permutation_tests_before(statistic, first, second, n_permutations,
                                        np.random.default_rng(seed))

    got, seconds, peak = _timed(ours, ours)
    expected, ref_seconds, ref_peak = _timed(before, before)
    identical = all(
        a == b and np.array_equal(x, y) for (a, x), (b, y) in zip(got, expected, strict=True)
    )
    return {
        "n": n, "s": s, "n_permutations": n_permutations, "block": SHUFFLE_BLOCK,
        "seconds": round(seconds, 3), "peak_mib": round(peak, 1),
        "before_seconds": round(ref_seconds, 3), "before_peak_mib": round(ref_peak, 1),
        "memory_ratio": round(ref_peak / peak, 1),
        "identical": bool(identical),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000])
    parser.add_argument("--sets", type=int, default=5, help="matched sets per size (5)")
    parser.add_argument("--permutations", type=int, default=1000,
                        help="label shuffles per size (1,000)")
    parser.add_argument("--out", default="bench_shuffles_and_strata.json")
    args = parser.parse_args(argv)
    strata_rows, shuffle_rows = [], []
    print(f"matched sets by strata ({N_BINS} bins, n/{LABELS_PER} labels, s = n/4, "
          f"{args.sets} sets): before → now")
    print(f"{'n':>8} {'strata':>8} {'used':>6} {'call s':>16} {'ms per set':>16} "
          f"{'peak MiB':>14} {'speed-up':>9} {'same sets':>10}")
    for n in args.sizes:
        row = measure_strata(n, args.sets)
        strata_rows.append(row)
        print(f"{n:>8,} {row['strata']:>8,} {row['strata_in_chosen']:>6,} "
              f"{row['before_seconds']:>7.3f} → {row['seconds']:>6.3f} "
              f"{1e3 * row['before_seconds_per_set']:>7.2f} → {1e3 * row['seconds_per_set']:>6.2f} "
              f"{row['before_peak_mib']:>5.1f} → {row['peak_mib']:>5.1f} "
              f"{row['speedup']:>8}× {str(row['identical']):>10}")
    print(f"\nlabel shuffles ({args.permutations} of the 2·s pooled stimuli, s = n/4, a "
          f"statistic of no memory of its own; blocks of {SHUFFLE_BLOCK}): before → now")
    print(f"{'n':>8} {'s':>7} {'seconds':>16} {'peak MiB':>16} {'memory':>8} {'same nulls':>11}")
    for n in args.sizes:
        row = measure_shuffles(n, args.permutations)
        shuffle_rows.append(row)
        print(f"{n:>8,} {row['s']:>7,} {row['before_seconds']:>7.3f} → {row['seconds']:>6.3f} "
              f"{row['before_peak_mib']:>7.1f} → {row['peak_mib']:>6.1f} "
              f"{row['memory_ratio']:>7}× {str(row['identical']):>11}")
    print("peak memory: traced on separate calls (strata: 1 set); times untraced; "
          f"'ms per set': {PER_SET_SETS} more sets than 1, per set")
    write_results(args.out, {"machine": machine(), "strata": strata_rows,
                             "shuffles": shuffle_rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
