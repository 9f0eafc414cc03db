"""Coverage and cost of the random baseline's stopping rule: the rule before Stein's against
Stein's two-stage rule (``random_baseline.sequential_random_scores``), in one run.

The rule before (copied below as :func:`previous_rule`) drew 4 sets, then batches until the usual
t interval of the mean, ``2·t·sd/√B``, was narrower than the width for every pair: a low sd from a
few sets stops early. For each case the script draws the same scores for both rules (one seeded
generator per replicate, read in the same order by both) and records whether each pair's reported
95% interval covers the true mean, how many sets were drawn, and the bias of the mean in units of
the reported half-width.

Cases: synthetic scores of one pair with known mean — normal, gamma of skewness 1 and
exponential (skewness 2) — at several ratios of their sd to the width (0.025: the sd 0.0005 of
large sets at the default width 0.02; 0.7: the audit's sd 0.014); and, unless ``--no-demo``, the
demo run's CKNNA (k = 10, 6 best-layer pairs, sets of n // 4 = 59 stimuli, the lab's defaults),
resampled from a pool of ``--demo-pool`` random sets whose mean is the true mean, plus the sets
each rule draws on the demo's own stream (seed 0).

Usage: .venv/bin/python benchmarks/measure_baseline_coverage.py [--reps 2000] [--demo-reps 1000]
       [--demo-pool 4000] [--no-demo] [--out baseline_coverage.json]
Prints a table (Markdown) and writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core.random_baseline import (  # noqa: E402
    CONFIDENCE,
    DEFAULT_INTERVAL_WIDTH,
    DEFAULT_MIN_SETS,
    mean_interval_widths,
    random_set_stream,
    sequential_random_scores,
    sets_needed,
)

RATIOS = (0.025, 0.1, 0.3, 0.7, 1.5, 3.0)
#: name -> gamma shape (None: normal); gamma's skewness is 2/√shape
SHAPES = {"normal": None, "skew 1 (gamma)": 4.0, "skew 2 (exponential)": 1.0}
LEVEL = 0.5  # the true mean of the synthetic scores (a CKNNA-like level; it does not matter)


def previous_rule(
    score: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    n: int,
    size: int,
    *,
    stop_on: str,
    interval_width: float,
    max_sets: int = 200,
    min_sets: int = DEFAULT_MIN_SETS,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[np.ndarray, int, np.ndarray]:
    """The stopping rule before Stein's (``sequential_random_scores`` until 2026-12), for a width:
    ((P, B) values of ``stop_on``, B, (P,) usual t-interval widths reported)."""
    min_sets = max(2, min(int(min_sets), max_sets))
    stream = random_set_stream(n, size, seed)
    parts: list[np.ndarray] = []
    drawn = 0
    while True:
        if drawn < min_sets:
            batch = min_sets - drawn
        else:
            values = np.concatenate(parts, axis=1)
            widths = mean_interval_widths(values, confidence)
            if np.all(widths <= interval_width) or drawn >= max_sets:
                break
            wanted = sets_needed(values, interval_width, confidence)
            batch = int(
                min(max_sets - drawn, drawn, max(wanted - drawn, math.ceil(drawn / 4), 1))
            )
        if batch <= 0:
            break
        sets = np.stack([next(stream) for _ in range(batch)])
        parts.append(np.atleast_2d(np.asarray(score(sets)[stop_on], dtype=np.float64)))
        drawn += batch
    values = np.concatenate(parts, axis=1)
    return values, drawn, mean_interval_widths(values, confidence)


def stein_rule(score, n, size, **options) -> tuple[np.ndarray, int, np.ndarray]:  # noqa: ANN001
    """The rule now: ((P, B) values, B, (P,) reported widths)."""
    drawn = sequential_random_scores(score, n, size, **options)
    return drawn.values[options["stop_on"]], drawn.n_sets, drawn.intervals


RULES = {"before": previous_rule, "Stein": stein_rule}


def synthetic(shape: float | None, sd: float, rng: np.random.Generator):  # noqa: ANN201
    """``score(sets (b, 1)) -> {"s": (1, b)}``: scores of mean LEVEL and sd ``sd``, normal or
    gamma of ``shape`` (skewed right), ignoring the sets (one stimulus each)."""

    def score(sets: np.ndarray) -> dict[str, np.ndarray]:
        b = len(sets)
        if shape is None:
            draws = LEVEL + sd * rng.standard_normal(b)
        else:
            draws = LEVEL + sd * (rng.standard_gamma(shape, b) - shape) / math.sqrt(shape)
        return {"s": draws[None, :]}

    return score


def resampled(pool: np.ndarray, rng: np.random.Generator):  # noqa: ANN201
    """``score(sets (b, ·)) -> {"s": (P, b)}``: b columns of the (P, K) ``pool`` drawn with
    replacement (the sets themselves are ignored: the pool's mean is the true mean)."""

    def score(sets: np.ndarray) -> dict[str, np.ndarray]:
        return {"s": pool[:, rng.integers(0, pool.shape[1], len(sets))]}

    return score


def summarise(truth: np.ndarray, runs: list[tuple[np.ndarray, int, np.ndarray]]) -> dict:
    """Coverage (per pair), sets drawn and bias over replicates ``runs`` of one rule."""
    means = np.stack([values.mean(axis=1) for values, _, _ in runs])  # (R, P)
    halves = np.stack([widths / 2.0 for _, _, widths in runs])
    sets = np.array([count for _, count, _ in runs])
    covered = np.abs(means - truth) <= halves
    coverage = covered.mean(axis=0)
    return {
        "coverage": coverage.tolist(),
        "coverage_se": float(np.sqrt(coverage.mean() * (1 - coverage.mean()) / len(runs))),
        # the mean's bias in units of the mean half-width (not the mean of error / half-width,
        # which is biased by itself for skewed scores: a high mean comes with a wide interval)
        "bias_in_half_widths": ((means - truth).mean(axis=0) / halves.mean(axis=0)).tolist(),
        "sets_mean": float(sets.mean()),
        "sets_median": float(np.median(sets)),
        "sets_p90": float(np.percentile(sets, 90)),
        "sets_max": int(sets.max()),
        "reached": float(np.mean([(w <= DEFAULT_INTERVAL_WIDTH).all() for _, _, w in runs])),
    }


def run_case(make_score, truth: np.ndarray, reps: int, seed: int, **options) -> dict:  # noqa: ANN001
    """Both rules on ``reps`` replicates, replicate r's scores from generator (seed, r) for both."""
    out = {}
    for name, rule in RULES.items():
        start = time.perf_counter()
        runs = [
            rule(make_score(np.random.default_rng([seed, r])), stop_on="s", **options)
            for r in range(reps)
        ]
        out[name] = summarise(truth, runs) | {"seconds": time.perf_counter() - start}
    return out


def demo_pool(pool_sets: int) -> tuple[np.ndarray, dict]:
    """(P, K) CKNNA (k = 10) of the demo's 6 best-layer pairs on ``pool_sets`` random sets of
    n // 4 stimuli (seed 12345, apart from the lab's seed 0), and what it is."""
    from convergence_core import analyses
    from convergence_core.run import load_run
    from convergence_core.subset_metrics import metric_on_sets

    run = load_run("demo")
    pairs = analyses.pairs_with_best_layers(run, k=10)  # Fig. 2's pairs, as the lab's
    indexes = analyses.indexes_for(run, pairs)
    keyed = [pair.sides for pair in pairs]
    size = run.n_stimuli // 4
    stream = random_set_stream(run.n_stimuli, size, 12345)
    pool = metric_on_sets(indexes, keyed, np.stack([next(stream) for _ in range(pool_sets)]),
                          "cknna", k=10)

    def lab_score(sets: np.ndarray) -> dict[str, np.ndarray]:
        return {"s": metric_on_sets(indexes, keyed, sets, "cknna", k=10)}

    own = {
        name: rule(lab_score, run.n_stimuli, size, stop_on="s",
                   interval_width=DEFAULT_INTERVAL_WIDTH, max_sets=200, seed=0)[1]
        for name, rule in RULES.items()
    }
    info = {"n": run.n_stimuli, "size": size, "pairs": [list(p) for p in pairs],
            "pool_sets": pool_sets, "sd": pool.std(axis=1, ddof=1).tolist(),
            "sets_on_the_demo_stream_seed_0": own}
    return pool, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000, help="replicates per synthetic case")
    parser.add_argument("--demo-reps", type=int, default=1000)
    parser.add_argument("--demo-pool", type=int, default=4000, help="random sets in the pool")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--out", default="baseline_coverage.json")
    args = parser.parse_args(argv)
    width = DEFAULT_INTERVAL_WIDTH
    options = {"n": 1, "size": 1, "interval_width": width, "max_sets": 200}
    rows = []
    print(f"width {width}, 95% intervals, max 200 sets, {args.reps} replicates per case "
          f"(coverage ± {math.sqrt(0.95 * 0.05 / args.reps):.3f})\n")
    print("| scores | sd / width | known-sd sets | rule | coverage | bias / half-width | "
          "sets: mean | median | 90th pct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        for ratio in RATIOS:
            sd = ratio * width
            case = run_case(lambda rng, s=sd, a=shape: synthetic(a, s, rng), np.array([LEVEL]),
                            args.reps, seed=int(ratio * 1000), **options)
            ideal = (2 * 1.959964 * ratio) ** 2
            for name, result in case.items():
                print(f"| {label} | {ratio:g} | {ideal:.1f} | {name} | "
                      f"{result['coverage'][0]:.3f} | {result['bias_in_half_widths'][0]:+.2f} | "
                      f"{result['sets_mean']:.1f} | {result['sets_median']:.0f} | "
                      f"{result['sets_p90']:.0f} |", flush=True)
            rows.append({"scores": label, "gamma_shape": shape, "sd_over_width": ratio,
                         "known_sd_sets": ideal, **case})
    demo = None
    if not args.no_demo:
        pool, info = demo_pool(args.demo_pool)
        truth = pool.mean(axis=1)
        size = info["size"]
        case = run_case(lambda rng: resampled(pool, rng), truth, args.demo_reps, seed=7,
                        n=info["n"], size=size, interval_width=width, max_sets=200)
        sds = np.asarray(info["sd"])
        for name, result in case.items():
            coverage = np.asarray(result["coverage"])
            print(f"| demo CKNNA, 6 pairs, {size} stimuli | {sds.min() / width:.2f}–"
                  f"{sds.max() / width:.2f} | {(2 * 1.959964 * sds.max() / width) ** 2:.1f} | "
                  f"{name} | {coverage.min():.3f}–{coverage.max():.3f} | "
                  f"{min(result['bias_in_half_widths']):+.2f}–"
                  f"{max(result['bias_in_half_widths']):+.2f} | {result['sets_mean']:.1f} | "
                  f"{result['sets_median']:.0f} | {result['sets_p90']:.0f} |")
        own = info["sets_on_the_demo_stream_seed_0"]
        print(f"\ndemo, its own stream (seed 0): {own['before']} sets before, {own['Stein']} "
              f"with Stein's rule ({args.demo_reps} replicates resampled from {args.demo_pool} "
              "sets)")
        demo = {**info, **case}
    write_results(args.out, {
        "machine": machine(), "width": width, "reps": args.reps, "synthetic": rows, "demo": demo,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
