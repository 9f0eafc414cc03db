"""How often does CKNNA leave [-1, 1], by set size and k? (issue 16, item 8)

CKNNA's unbiased HSIC estimates are not inner products of a positive semi-definite form, so the
Cauchy–Schwarz bound |HSIC(K, L)| <= sqrt(HSIC(K, K) · HSIC(L, L)) does not hold for them, and
the numerator uses the mutual mask while each self-term uses its own: on small sets |CKNNA| > 1
happens (and a negative self-term makes it NaN). This script measures it on a real run, to choose
``validation.MIN_CKNNA_SET_SIZE``, the smallest set whose CKNNA is shown as a number.

For each set size s and each k (2, 3, 5, 10, 20, 39, s // 2 and s - 1, those < s), CKNNA of every
vision model (at its GPA layer) × every language model layer, on ``--n-random`` random subsets of
size s (the Alignment lab's draws, ``analyses.random_sets``) and on the lowest- and
highest-dispersion sets, through the run's neighbour engine (``run.subset_alignment``), checked
against the dense reference ``alignment.cknna`` on the prepared features on a sample.

Usage: .venv/bin/python benchmarks/measure_cknna_bound.py [--run demo] [--n-random 200]
           [--sizes 4,5,...] [--quick] [--out cknna_bound.json]
Prints a table (per size: share of values with |CKNNA| > 1 at the worst k and at k = 10, the
largest |CKNNA|, the share of NaN) and writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import write_results  # noqa: E402
from convergence_core.alignment import cknna, prepare_features  # noqa: E402
from convergence_core.analyses import random_sets  # noqa: E402
from convergence_core.run import load_run  # noqa: E402
from convergence_core.subsets import select_stimuli  # noqa: E402

DEFAULT_SIZES = (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 59, 64, 80, 96, 119)
K_GRID = (2, 3, 5, 10, 20, 39)


def k_values(size: int) -> list[int]:
    return sorted({k for k in (*K_GRID, size // 2, size - 1) if 2 <= k < size})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo", help="run folder or name (default: demo)")
    parser.add_argument("--n-random", type=int, default=200)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 random sets, a few sizes")
    parser.add_argument("--out", default="cknna_bound.json")
    args = parser.parse_args(argv)
    run = load_run(args.run)
    sizes = [int(s) for s in args.sizes.split(",") if int(s) <= run.n_stimuli // 2]
    n_random = args.n_random
    if args.quick:
        sizes, n_random = [s for s in sizes if s in (4, 6, 10, 20)] or sizes[:3], 20
    started = time.perf_counter()
    features: dict[tuple[str, str], np.ndarray] = {}
    sides = [(m, layer) for m, layer in zip(run.gpa.models, run.gpa.layers, strict=True)]
    sides += [(m, layer) for m in run.language_models for layer in run.layers(m)]
    for side in sides:
        features[side] = prepare_features(
            np.asarray(run.embeddings[side[0]][side[1]], dtype=np.float64)
        )
    pairs = [
        (vision, language)
        for vision in sides[: len(run.gpa.models)]
        for language in sides[len(run.gpa.models) :]
    ]
    quads = [(*x, *y) for x, y in pairs]
    scores = run.dispersion["mean"].to_numpy(dtype=np.float64)
    rows, checked, worst_difference = [], 0, 0.0
    for size in sizes:
        subsets = random_sets(scores, size, n_random, args.seed)
        named = {
            "low": np.asarray(select_stimuli(scores, "low", size)),
            "high": np.asarray(select_stimuli(scores, "high", size)),
        }
        for k in k_values(size):
            values = run.subset_alignment(quads, subsets, k).cknna
            fixed = run.subset_alignment(quads, np.stack(list(named.values())), k).cknna
            # the batched values against the dense reference on the features, a few per (s, k)
            for p in (0, len(pairs) - 1):
                x, y = (features[side][subsets[0]] for side in pairs[p])
                reference = cknna(x, y, k=k)
                if np.isfinite(reference) or np.isfinite(values[p, 0]):
                    worst_difference = max(worst_difference, abs(reference - values[p, 0]))
                checked += 1
            every = np.concatenate([values.ravel(), fixed.ravel()])
            finite = every[np.isfinite(every)]
            rows.append(
                {
                    "set_size": size,
                    "k": k,
                    "values": int(every.size),
                    "share_abs_above_1": float(np.mean(np.abs(finite) > 1)) if finite.size else 0.0,
                    "count_abs_above_1": int(np.sum(np.abs(finite) > 1)),
                    "max_abs": float(np.max(np.abs(finite))) if finite.size else float("nan"),
                    "share_nan": float(np.mean(~np.isfinite(every))),
                    "low_high_abs_above_1": int(np.sum(np.abs(fixed[np.isfinite(fixed)]) > 1)),
                }
            )
    by_size = []
    for size in sizes:
        at_size = [r for r in rows if r["set_size"] == size]
        at_10 = [r for r in at_size if r["k"] == 10]
        by_size.append(
            {
                "set_size": size,
                "worst_k": max(at_size, key=lambda r: r["share_abs_above_1"])["k"],
                "share_abs_above_1_worst_k": max(r["share_abs_above_1"] for r in at_size),
                "share_abs_above_1_k10": at_10[0]["share_abs_above_1"] if at_10 else None,
                "count_abs_above_1_all_k": sum(r["count_abs_above_1"] for r in at_size),
                "values_all_k": sum(r["values"] for r in at_size),
                "max_abs_all_k": max(r["max_abs"] for r in at_size),
                "share_nan_worst_k": max(r["share_nan"] for r in at_size),
            }
        )
    print(
        f"run {run.name}: n = {run.n_stimuli}, {len(pairs)} vision x language-layer pairs, "
        f"{n_random} random sets + low + high per size and k; k in {list(K_GRID)} + s//2, s-1"
    )
    header = (
        f"{'size':>5} {'worst k':>7} {'|c|>1 worst k':>14} {'|c|>1 k=10':>11} "
        f"{'count (all k)':>15} {'max |c|':>8} {'NaN worst k':>12}"
    )
    print(header)
    for r in by_size:
        k10 = "-" if r["share_abs_above_1_k10"] is None else f"{r['share_abs_above_1_k10']:.4f}"
        print(
            f"{r['set_size']:>5} {r['worst_k']:>7} {r['share_abs_above_1_worst_k']:>14.4f} "
            f"{k10:>11} {r['count_abs_above_1_all_k']:>6} / {r['values_all_k']:<7} "
            f"{r['max_abs_all_k']:>8.3f} {r['share_nan_worst_k']:>12.4f}"
        )
    print(
        f"batched vs dense reference: {checked} checks, largest difference "
        f"{worst_difference:.2e}"
    )
    payload = {
        "run": str(run.path),
        "n_stimuli": run.n_stimuli,
        "pairs": [[list(a), list(b)] for a, b in pairs],
        "n_random": n_random,
        "seed": args.seed,
        "quick": args.quick,
        "by_size_and_k": rows,
        "by_size": by_size,
        "reference_checks": checked,
        "reference_max_difference": worst_difference,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
