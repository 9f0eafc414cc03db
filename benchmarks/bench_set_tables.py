"""Within-set neighbour tables where the stored lists fall short, before and after keeping the
completed rows, in the same run.

A member whose K stored neighbours (the run's list size) hold fewer than k members of its set is
completed from the features against the whole set: O(s²·d) per model and set. That is most
members of a set of s stimuli when s·K/n < k (and s > 2,048, the dense path's limit, for
``exact_top_k``): set sizes from 2,048 to about k·n/K, every size of the lab at n = 100,000 from
2,049 to ~7,800 at k = 10.

* ``old``: each call completes the rows short at its own k (``neighbours.COMPLETION_CACHE_BYTES =
  0``: the method before 2026-12-07), so every k change completes them again;
* ``new``: the completed rows of each model × set are computed once, at max(k,
  ``COMPLETION_K``) neighbours (the whole set when most of it is short: one symmetric product),
  kept, and sliced at any k up to that.

Workload: CKNNA of one pair on 4 random sets of s stimuli (``subset_alignment``), then the lab's k
slider moving (k = 10, 15, 5, 20, 10, 32). Each step is timed for old and new one after the other
(the same load); the tables and CKNNA values of the two must be equal bit for bit (asserted).
Rows completed are counted per step; peak memory (``tracemalloc``, numpy's allocations) is traced
on separate first calls of old and new (tracing slows the code), and the completions kept
after the sequence are reported.

Data: ``--run PATH`` (a run folder: its first vision and first language model at their default
layers, e.g. the 40,000-stimulus synthetic run of ``tests.fixtures_runs.make_synthetic_run``) or
synthetic features built here (``--n``, ``--width``, ``--list-size``: two models of that width, a
shared rank-64 signal plus noise; at n = 20,000 and K = 64 the fraction of short rows is that of
K = 128 at n = 40,000).

Prints a table and writes benchmarks/results/set_tables.json (or ``--out``)::

    .venv/bin/python benchmarks/bench_set_tables.py --run /path/to/runs/n40000 --sizes 2500 10000
    .venv/bin/python benchmarks/bench_set_tables.py --n 20000 --width 768 --list-size 64 \\
        --sizes 2500 --out set_tables_768.json
    .venv/bin/python benchmarks/bench_set_tables.py --n 4000 --width 16 --list-size 32 \\
        --sizes 2100 --out set_tables_smoke.json                          # smoke test
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import neighbours  # noqa: E402
from convergence_core.neighbours import (  # noqa: E402
    NeighbourIndex,
    PreparedFeatures,
    build_neighbour_lists,
    subset_alignment,
)

K_STEPS = (10, 15, 5, 20, 10, 32)
N_SETS = 4


def synthetic_indexes(n: int, width: int, list_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 64)).astype(np.float32)
    indexes = {}
    for key in ("x", "y"):
        raw = (z @ rng.standard_normal((64, width)).astype(np.float32)
               + 2.0 * rng.standard_normal((n, width)).astype(np.float32))
        features = PreparedFeatures.from_raw(raw)
        indexes[key] = NeighbourIndex(features, build_neighbour_lists(features, list_size))
    return indexes


def run_indexes(path: str) -> dict:
    from convergence_core.run import load_run

    run = load_run(path)
    vision, language = run.vision_models[0], run.language_models[0]
    return {"x": run.neighbours(vision, run.default_layer(vision)),
            "y": run.neighbours(language, run.default_layer(language))}


class Counter:
    """Counts the rows ``NeighbourIndex._complete`` computes from the features."""

    def __init__(self) -> None:
        self.rows = 0
        self._complete = NeighbourIndex._complete
        counter = self

        def counted(index, members, rows, k):
            counter.rows += int(np.size(rows))
            return counter._complete(index, members, rows, k)

        NeighbourIndex._complete = counted

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


def fresh(indexes: dict) -> dict:
    """The same features and lists in new index objects (nothing kept from earlier calls)."""
    return {key: NeighbourIndex(index.features, index.lists) for key, index in indexes.items()}


def call(indexes: dict, sets: np.ndarray, k: int, kept: bool):
    neighbours.COMPLETION_CACHE_BYTES = DEFAULT_BYTES if kept else 0
    start = time.perf_counter()
    result = subset_alignment(indexes, [("x", "y")], sets, k, metrics=("cknna",))
    return time.perf_counter() - start, result


def traced_peak(indexes: dict, sets: np.ndarray, k: int, kept: bool) -> float:
    tracemalloc.start()
    try:
        call(fresh(indexes), sets, k, kept)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def bench(indexes: dict, s: int, counter: Counter) -> dict:
    n = indexes["x"].n
    rng = np.random.default_rng(s)
    sets = np.stack([np.sort(rng.choice(n, s, replace=False)) for _ in range(N_SETS)])
    old_indexes, new_indexes = fresh(indexes), fresh(indexes)
    steps = []
    for k in K_STEPS:
        old_s, old = call(old_indexes, sets, k, kept=False)
        old_rows = counter.take()
        new_s, new = call(new_indexes, sets, k, kept=True)
        new_rows = counter.take()
        assert np.array_equal(old.cknna, new.cknna, equal_nan=True), (s, k)
        for key in ("x", "y"):  # the tables themselves, bit for bit (from the kept rows now)
            neighbours.COMPLETION_CACHE_BYTES = DEFAULT_BYTES
            got = new_indexes[key].tables(sets, k)
            neighbours.COMPLETION_CACHE_BYTES = 0
            expected = old_indexes[key].tables(sets, k)
            assert np.array_equal(got.positions, expected.positions), (s, k, key)
            assert np.array_equal(got.values, expected.values), (s, k, key)
        counter.take()
        steps.append({"k": k, "old_s": round(old_s, 3), "new_s": round(new_s, 3),
                      "old_rows_completed": old_rows, "new_rows_completed": new_rows})
        print(f"  s={s} k={k:>2}: old {old_s:6.2f} s ({old_rows:>6} rows)   "
              f"new {new_s:6.2f} s ({new_rows:>6} rows)", flush=True)
    kept_mib = neighbours._COMPLETIONS.nbytes / 2**20
    peak_old = traced_peak(indexes, sets, K_STEPS[0], kept=False)
    peak_new = traced_peak(indexes, sets, K_STEPS[0], kept=True)
    counter.take()
    # the share of the members short at k = 10 (the regime this is about)
    short = sum(
        int((~_complete_mask(index, sets, K_STEPS[0])).sum()) for index in indexes.values()
    ) / (len(indexes) * sets.size)
    return {
        "n": n, "s": s, "n_sets": N_SETS, "list_size": indexes["x"].k_max,
        "widths": [index.features.d for index in indexes.values()],
        "short_fraction_k10": round(short, 3),
        "steps": steps,
        "old_total_s": round(sum(step["old_s"] for step in steps), 2),
        "new_total_s": round(sum(step["new_s"] for step in steps), 2),
        "old_after_first_s": round(sum(step["old_s"] for step in steps[1:]), 2),
        "new_after_first_s": round(sum(step["new_s"] for step in steps[1:]), 2),
        "peak_first_call_old_mib": round(peak_old, 1),
        "peak_first_call_new_mib": round(peak_new, 1),
        "kept_after_sequence_mib": round(kept_mib, 1),
    }


def _complete_mask(index: NeighbourIndex, sets: np.ndarray, k: int) -> np.ndarray:
    from convergence_core.neighbour_kernels import tables_from_lists

    b, s = sets.shape
    complete = np.empty((b, s), dtype=bool)
    tables_from_lists(np.asarray(index.lists.indices), np.asarray(index.lists.values),
                      np.ascontiguousarray(sets), index.n, k, np.empty((b, s, k), np.int64),
                      np.empty((b, s, k)), complete)
    return complete


DEFAULT_BYTES = neighbours.COMPLETION_CACHE_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder (else synthetic features, built here)")
    parser.add_argument("--n", type=int, default=40_000, help="synthetic stimuli")
    parser.add_argument("--width", type=int, default=16, help="synthetic feature width")
    parser.add_argument("--list-size", type=int, default=128, help="synthetic lists' K")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000],
                        help="set sizes (each > 2,048 to be in the exact_top_k regime)")
    parser.add_argument("--out", default="set_tables.json", help="file in benchmarks/results/")
    args = parser.parse_args()
    start = time.perf_counter()
    indexes = (run_indexes(args.run) if args.run
               else synthetic_indexes(args.n, args.width, args.list_size))
    built_s = time.perf_counter() - start
    # compile the table loops and import torch outside the timings
    subset_alignment(fresh(indexes), [("x", "y")], np.arange(3000)[None, :], 10)
    counter = Counter()
    rows = [bench(indexes, s, counter) for s in args.sizes]
    print(f"\nWithin-set tables, CKNNA of 1 pair on {N_SETS} random sets, k steps {K_STEPS}; "
          f"COMPLETION_K {neighbours.COMPLETION_K}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'n':>6} {'s':>6} {'widths':>9} {'K':>4} {'short':>6} {'old (s)':>8} {'new (s)':>8} "
          f"{'old k changes':>13} {'new k changes':>13} {'peak old/new MiB':>16} {'kept MiB':>8}")
    for r in rows:
        widths = "/".join(map(str, r["widths"]))
        print(f"{r['n']:>6} {r['s']:>6} {widths:>9} {r['list_size']:>4} "
              f"{r['short_fraction_k10']:>6.2f} {r['old_total_s']:>8.2f} {r['new_total_s']:>8.2f} "
              f"{r['old_after_first_s']:>13.2f} {r['new_after_first_s']:>13.2f} "
              f"{r['peak_first_call_old_mib']:>7.1f}/{r['peak_first_call_new_mib']:<8.1f} "
              f"{r['kept_after_sequence_mib']:>8.1f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:.0f} MB (data and lists {built_s:.0f} s)")
    payload = {"machine": machine(), "source": args.run or "synthetic",
               "k_steps": list(K_STEPS), "completion_k": neighbours.COMPLETION_K,
               "peak_rss_mb": round(peak_mb), "rows": rows}
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
