"""Fig. 2's feature metrics on large sets: each model's side once per set against one metric call
per pair, in the same run.

On a run above ``subset_metrics.DENSE_GRAM_STIMULI`` stimuli the CKA family and SVCCA are
measured set by set (``analyses.set_metric_values``). A 10,000-stimulus report (4 vision models
of 768-1,536 features, 2 language models of 768 and 1,024; sets of 2,500) spent ~4.5 s per set,
and its Fig. 2 section measures ~600 sets (200 random, and per score the low and high sets and
2 × 100 label shuffles). This benchmark builds features of that shape (a shared rank-64 signal
plus noise) and times, on the same sets:

* ``ours``: ``set_metric_values`` as the report calls it: each model's CKA side (centered
  features, its own kernel sums) once per set, shared by CKA and unbiased CKA and by every pair
  it is in, each pair's cross term once for both; SVCCA's side (top singular vectors) once per
  model and set;
* ``per_pair``: the route before: one ``metrics.measure`` call per pair, metric and set (each
  computes both sides and the cross term again).

The report's calibration section shuffles the pairing within a set (200 times per set, pair and
metric): ``shuffles`` times ``analyses.shuffled_pairing_calibration`` on the first set, where a
shuffle reorders the language side's side of the set (``permuted_feature_side``), against one
``metrics.measure`` call per pair, metric and shuffle on the reordered rows.

Linear predictivity fits ridge maps (5 folds, both directions, 17 penalties chosen by
leave-one-out) on the same sets: ``ridge`` times one ``ridge.fit_ridge_cv`` from the widest
vision model to the widest language model on 80% of the first set against scikit-learn's
``RidgeCV`` on the same rows (the same α and coefficients).

Values must agree to 1e-10 (the same formulas, other rounding). ``flops`` counts the matrix
products of each route (2 per multiply-add; eigendecompositions not counted), ``gflops_per_s``
that over the time, beside the machine's measured float64 matrix-product rate.

Usage: .venv/bin/python benchmarks/bench_feature_sets.py [--n 5000] [--size 2500] [--sets 3]
           [--out feature_sets.json]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import analyses, calibration, subset_metrics  # noqa: E402
from convergence_core import metrics as registry  # noqa: E402
from convergence_core.neighbours import NeighbourIndex  # noqa: E402

VISION_WIDTHS = (768, 1024, 1280, 1536)
LANGUAGE_WIDTHS = (768, 1024)
METRICS = ("cka", "unbiased_cka", "svcca")


def features(rng: np.random.Generator, n: int, width: int, signal: np.ndarray) -> np.ndarray:
    """(n, width) float32: the shared signal through a random map, plus noise."""
    mixed = signal @ rng.standard_normal((signal.shape[1], width)) / np.sqrt(signal.shape[1])
    return (mixed + 0.5 * rng.standard_normal((n, width))).astype(np.float32)


def matrix_product_rate() -> float:
    """Measured float64 GFLOP/s of a 2,500 × 1,536 by 1,536 × 1,024 product (best of 3)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2500, 1536)), rng.standard_normal((1536, 1024))
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * 2500 * 1536 * 1024 / best / 1e9


def _timed(call) -> float:  # noqa: ANN001
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def flops(size: int, widths: dict, pairs: list, shared: bool) -> float:
    """Matrix-product flops per set of the CKA family (both metrics) and SVCCA's Grams."""
    own = sum(size * d * d for d in widths.values())  # XᵀX (symmetric: half of 2·s·d²)
    cross = sum(2 * size * widths[x] * widths[y] for x, y in pairs)
    if shared:  # each side once for both CKA metrics, each cross once; SVCCA's Gram per model
        return own + cross + own
    per_pair = sum(size * (widths[x] ** 2 + widths[y] ** 2) for x, y in pairs)
    return 2 * (per_pair + cross) + per_pair  # CKA, unbiased CKA, SVCCA per pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="stimuli of the synthetic run")
    parser.add_argument("--size", type=int, default=2500, help="stimuli per set")
    parser.add_argument("--sets", type=int, default=3, help="sets timed")
    parser.add_argument("--shuffles", type=int, default=4, help="shuffled pairings timed")
    parser.add_argument("--out", default="feature_sets.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    signal = rng.standard_normal((args.n, 64))
    widths = {f"vision-{i}": d for i, d in enumerate(VISION_WIDTHS)}
    widths |= {f"language-{i}": d for i, d in enumerate(LANGUAGE_WIDTHS)}
    print(f"building {len(widths)} indexes of {args.n:,} stimuli…", flush=True)
    indexes = {
        (name, "l"): NeighbourIndex.from_features(features(rng, args.n, width, signal))
        for name, width in widths.items()
    }
    pairs = [(v, "l", lang, "l") for v in widths if v.startswith("vision")
             for lang in widths if lang.startswith("language")]
    sets = np.stack([np.sort(rng.choice(args.n, args.size, replace=False))
                     for _ in range(args.sets)])
    options = {"svcca": {"cca_dim": 10}}
    subset_metrics.uses_dense_kernels = lambda *a, **k: False  # the large-run route at any n

    start = time.perf_counter()
    ours = analyses.set_metric_values(indexes, pairs, sets, 10, list(METRICS), options)
    ours_s = (time.perf_counter() - start) / args.sets

    start = time.perf_counter()
    per_pair = {name: np.empty((len(pairs), args.sets)) for name in METRICS}
    for b, members in enumerate(sets):
        for p, (x, _, y, _) in enumerate(pairs):
            X = indexes[(x, "l")].features.rows(members)
            Y = indexes[(y, "l")].features.rows(members)
            for name in METRICS:
                per_pair[name][p, b] = registry.measure(name, X, Y, **options.get(name, {}))
    per_pair_s = (time.perf_counter() - start) / args.sets

    # shuffled pairings of the first set (the calibration section)
    members = sets[0]
    start = time.perf_counter()
    calibrated = analyses.shuffled_pairing_calibration(
        indexes, pairs, {"set": members}, 10, list(METRICS), metric_options=options,
        n_shuffles=args.shuffles, seed=1,
    )
    shuffled_ours_s = (time.perf_counter() - start) / args.shuffles
    orders = calibration.shuffled_pairings(members, args.shuffles, 1)
    start = time.perf_counter()
    null_means = {}
    for x, _, y, _ in pairs:
        X, Y = indexes[(x, "l")].features, indexes[(y, "l")].features
        X_set = X.rows(members)
        for name in METRICS:
            null_means[(x, y, name)] = np.mean([
                registry.measure(name, X_set, Y.rows(order), **options.get(name, {}))
                for order in orders
            ])
    shuffled_naive_s = (time.perf_counter() - start) / args.shuffles
    shuffle_difference = float(max(
        abs(row.null_mean - null_means[(row.vision_model, row.language_model, row.metric)])
        for row in calibrated.itertuples()
    ))

    # one ridge fit of linear predictivity: the widest vision model → the widest language model
    from sklearn.linear_model import RidgeCV

    from convergence_core.predictivity import DEFAULT_ALPHAS
    from convergence_core.ridge import fit_ridge_cv

    train = sets[0][: int(0.8 * args.size)]
    X = indexes[("vision-3", "l")].features.rows(train)
    Y = indexes[("language-1", "l")].features.rows(train)
    start = time.perf_counter()
    fit = fit_ridge_cv(X, Y, np.asarray(DEFAULT_ALPHAS))
    ridge_ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = RidgeCV(alphas=DEFAULT_ALPHAS, fit_intercept=True).fit(X, Y)
    ridge_sklearn_s = time.perf_counter() - start
    ridge_difference = float(np.max(np.abs(fit.coef - reference.coef_.T)))
    same_alpha = bool(fit.alpha == reference.alpha_)

    difference = max(float(np.max(np.abs(ours[m] - per_pair[m]))) for m in METRICS)
    pair_names = [(x, y) for x, _, y, _ in pairs]
    rate = matrix_product_rate()
    rows = []
    for label, seconds, shared in (("ours", ours_s, True), ("per_pair", per_pair_s, False)):
        work = flops(args.size, widths, pair_names, shared)
        rows.append({"route": label, "seconds_per_set": round(seconds, 3),
                     "gflop_per_set": round(work / 1e9, 1),
                     "gflops_per_s": round(work / seconds / 1e9, 1)})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{len(pairs)} pairs, sets of {args.size:,} of {args.n:,} stimuli, metrics "
          f"{', '.join(METRICS)}; machine's float64 matrix products: {rate:.0f} GFLOP/s")
    print(f"{'route':10} {'s / set':>8} {'GFLOP / set':>12} {'GFLOP/s':>8}")
    for row in rows:
        print(f"{row['route']:10} {row['seconds_per_set']:8.3f} {row['gflop_per_set']:12.1f} "
              f"{row['gflops_per_s']:8.1f}")
    print(f"speed-up {per_pair_s / ours_s:.2f}×; largest |difference| {difference:.1e}")
    print(f"shuffled pairings of one set: {shuffled_ours_s:.3f} s per shuffle (reordered sides) "
          f"against {shuffled_naive_s:.3f} s (a call per pair and metric): speed-up "
          f"{shuffled_naive_s / shuffled_ours_s:.2f}×; largest |difference of null means| "
          f"{shuffle_difference:.1e}")
    print(f"ridge ({X.shape[0]:,} rows, {X.shape[1]:,} → {Y.shape[1]:,} features, "
          f"{len(DEFAULT_ALPHAS)} penalties): {ridge_ours_s:.2f} s against RidgeCV "
          f"{ridge_sklearn_s:.2f} s ({ridge_sklearn_s / ridge_ours_s:.1f}×); same α {same_alpha}, "
          f"largest |coefficient difference| {ridge_difference:.1e}; peak RSS {peak_mb:,.0f} MB")
    write_results(args.out, {
        "n": args.n, "set_size": args.size, "sets_timed": args.sets, "pairs": len(pairs),
        "widths": widths, "metrics": list(METRICS),
        "machine": machine(matrix_product_gflops=round(rate, 1), peak_rss_mb=round(peak_mb)),
        "routes": rows, "speed_up": round(per_pair_s / ours_s, 2),
        "largest_abs_difference": difference,
        "shuffled_pairings": {
            "shuffles_timed": args.shuffles,
            "seconds_per_shuffle_ours": round(shuffled_ours_s, 3),
            "seconds_per_shuffle_per_call": round(shuffled_naive_s, 3),
            "speed_up": round(shuffled_naive_s / shuffled_ours_s, 2),
            "largest_abs_difference_of_null_means": shuffle_difference,
        },
        "ridge": {
            "rows": int(X.shape[0]), "source_features": int(X.shape[1]),
            "target_features": int(Y.shape[1]), "penalties": len(DEFAULT_ALPHAS),
            "seconds_ours": round(ridge_ours_s, 3), "seconds_ridgecv": round(ridge_sklearn_s, 3),
            "same_alpha": same_alpha, "largest_abs_coefficient_difference": ridge_difference,
        },
        "ok": bool(difference <= 1e-10 and shuffle_difference <= 1e-10 and same_alpha
                   and ridge_difference <= 1e-8),
    })


if __name__ == "__main__":
    main()
