"""Linear predictivity's 2AFC on large sets: every pair against sampled foils, in one run.

The report scores sets of more than ``report.PREDICTIVITY_ALL_PAIRS_MAX_STIMULI`` stimuli against
``report.PREDICTIVITY_FOILS`` seeded random foils per stimulus (``predictivity.two_afc(n_foils=)``)
instead of all s − 1 others (O(s²·d) per set and direction). This times both on the same
synthetic predictions and targets (a shared signal plus noise, so that the score is neither 0.5
nor 1), and measures the sampled score's spread over seeds against the all-pairs score and the
binomial bound 0.5/√(s·F).

    .venv/bin/python benchmarks/bench_two_afc.py            # s = 5,000 and 10,000, d = 64
    .venv/bin/python benchmarks/bench_two_afc.py --sizes 2000 --seeds 3 --out smoke.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core.predictivity import two_afc  # noqa: E402
from convergence_core.report import PREDICTIVITY_FOILS  # noqa: E402


def problem(s: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(s, d) predictions and targets sharing an 8-dimensional signal, with noise."""
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((s, 8)) @ rng.standard_normal((8, d))
    return signal + 2.0 * rng.standard_normal((s, d)), signal + 2.0 * rng.standard_normal((s, d))


def timed(call):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--foils", type=int, default=PREDICTIVITY_FOILS)
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the sampled score (10)")
    parser.add_argument("--out", default="two_afc.json")
    args = parser.parse_args(argv)
    rows = []
    print(f"2AFC, all pairs vs {args.foils:,} foils per stimulus, d = {args.width}")
    print(f"{'s':>8} {'all pairs s':>12} {'foils s':>9} {'speed-up':>9} {'sd over seeds':>14} "
          f"{'bound':>9} {'largest error':>14} {'peak MiB':>10}")
    for s in args.sizes:
        P, Y = problem(s, args.width)
        full_s, full = timed(lambda: two_afc(P, Y))
        sampled_s, first = timed(lambda: two_afc(P, Y, n_foils=args.foils, seed=0))
        values = [first] + [two_afc(P, Y, n_foils=args.foils, seed=k) for k in range(1, args.seeds)]
        errors = np.asarray(values) - full
        tracemalloc.start()
        two_afc(P, Y, n_foils=args.foils, seed=0)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row = {
            "s": s, "d": args.width, "foils": args.foils, "all_pairs": full,
            "all_pairs_seconds": full_s, "foils_seconds": sampled_s,
            "speedup": full_s / sampled_s, "sd_over_seeds": float(np.std(values, ddof=1)),
            "bound": 0.5 / math.sqrt(s * args.foils), "largest_error": float(np.abs(errors).max()),
            "peak_mib_sampled": peak, "seeds": args.seeds,
        }
        rows.append(row)
        print(f"{s:>8,} {full_s:>12.2f} {sampled_s:>9.2f} {row['speedup']:>8.1f}× "
              f"{row['sd_over_seeds']:>14.1e} {row['bound']:>9.1e} {row['largest_error']:>14.1e} "
              f"{peak:>10.1f}")
    write_results(args.out, {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
