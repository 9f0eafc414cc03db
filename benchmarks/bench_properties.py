"""Time the stimulus-property pipeline and the what-predicts-dispersion analysis as n grows.

* image properties per image (coco-mini files: decode at reduced scale + statistics);
* ``property_tests`` (25 numeric + 1 categorical property, 10,000 permutations, one score),
  against a naive loop (scipy.stats.spearmanr per permutation) on the same permutations at a
  small size: the ratio is the speed-up;
* ``cross_validated_fit`` per model (5 folds, 20 shuffled-target refits, 5 importance repeats);
* permutation importances with the model's column transform run once
  (``permutation_importances``) against scikit-learn's ``permutation_importance`` on the same
  fitted model and held-out rows: seconds of each and whether the numbers are identical;
* ``nearest_similarities`` (exact blocked top-10 of 1280-d features; the reference path until
  the run's neighbour tables are wired in; O(n² d)).

Prints a table and writes benchmarks/results/bench_properties.json (or ``--out``)::

    .venv/bin/python benchmarks/bench_properties.py                       # n = 1,000 and 10,000
    .venv/bin/python benchmarks/bench_properties.py --sizes 1000 10000 100000   # quiet machine
    .venv/bin/python benchmarks/bench_properties.py --quick               # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import dispersion_predictors as dp  # noqa: E402
from convergence_core import properties as props  # noqa: E402
from convergence_core import settings  # noqa: E402
from convergence_core.datasets import load_coco  # noqa: E402

N_NUMERIC = 25


def synthetic(n: int, seed: int = 0) -> tuple[props.PropertyTable, pd.DataFrame]:
    """n stimuli, 25 numeric properties (one drives dispersion) and a 4-level category."""
    rng = np.random.default_rng(seed)
    columns = {f"p{j:02d}": rng.standard_normal(n) for j in range(N_NUMERIC)}
    columns["group"] = rng.choice(["a", "b", "c", "d"], size=n)
    stimuli = pd.DataFrame(
        {"id": [f"s{i}" for i in range(n)], "image": ["x"] * n, "captions": [["c"]] * n}
    )
    for name, values in columns.items():
        stimuli[name] = values
    table = props.assemble_properties(stimuli)
    y = columns["p00"] + rng.standard_normal(n)
    return table, pd.DataFrame({"id": stimuli["id"], "mean": y, "pc1": y})


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def naive_ratio(n: int, n_permutations: int) -> dict[str, float]:
    """property_tests vs spearmanr-per-permutation on the same permutations (numeric only)."""
    from scipy.stats import spearmanr

    table, dispersion = synthetic(n)
    names = [f"p{j:02d}" for j in range(N_NUMERIC)]
    x = table.values[names].to_numpy()
    y = dispersion["mean"].to_numpy()
    fast = _seconds(lambda: dp._spearman_tests(x, y, n_permutations, np.random.default_rng(0)))

    def slow() -> None:
        for block in dp._permutation_blocks(n, n_permutations, np.random.default_rng(0)):
            for perm in block:
                for j in range(N_NUMERIC):
                    spearmanr(x[:, j], y[perm])

    naive = _seconds(slow)
    return {"n": n, "n_permutations": n_permutations, "vectorised_s": fast, "naive_s": naive}


def importance_ratio(n: int, n_repeats: int) -> list[dict[str, object]]:
    """dp.permutation_importances (the model's column transform run once) against
    sklearn.inspection.permutation_importance on the same fitted model and held-out fifth of
    the stimuli, per model: seconds of each and whether the numbers are identical."""
    from sklearn.inspection import permutation_importance

    table, dispersion = synthetic(n)
    usable = dp.usable_properties(table)
    frame = dp._design(table, usable)
    y = dispersion["mean"].to_numpy()
    train, test = slice(0, n - n // 5), slice(n - n // 5, n)
    rows = []
    for name in dp.MODELS:
        model = dp._make_model(name, usable.numeric, list(usable.categorical), 0)
        model.fit(frame.iloc[train], y[train])
        held, target = frame.iloc[test], y[test]
        ours, theirs = [], []
        fast = _seconds(lambda: ours.append(dp.permutation_importances(
            model, held, target, n_repeats, 0)))
        slow = _seconds(lambda: theirs.append(permutation_importance(
            model, held, target, scoring="r2", n_repeats=n_repeats, random_state=0).importances))
        rows.append({
            "model": name, "n": n, "n_held_out": len(target), "n_repeats": n_repeats,
            "properties": len(usable.names), "transform_once_s": round(fast, 4),
            "sklearn_s": round(slow, 4), "identical": bool(np.array_equal(ours[0], theirs[0])),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", default="bench_properties.json")
    args = parser.parse_args()
    sizes = [200] if args.quick else args.sizes
    permutations = 200 if args.quick else dp.PROPERTY_TEST_PERMUTATIONS
    shuffles = 1 if args.quick else dp.DEFAULT_N_SHUFFLES
    rows: list[dict[str, object]] = []

    def record(what: str, n: int, seconds: float, **extra: object) -> None:
        rows.append({"what": what, "n": n, "seconds": round(seconds, 4), **extra})
        print(f"{what:<58} n = {n:>7,}  {seconds:9.3f} s", flush=True)

    coco = load_coco(settings.demo_data_root())
    paths = [coco.root / image for image in coco.stimuli["image"][: 5 if args.quick else 60]]
    seconds = _seconds(lambda: props.image_properties(paths))
    record("image_properties (coco-mini files)", len(paths), seconds,
           ms_per_image=round(1000 * seconds / len(paths), 2))  # fmt: skip

    ratio = naive_ratio(200, 10 if args.quick else 200)
    print(
        f"property_tests speed-up over spearmanr per permutation (n = 200, "
        f"{ratio['n_permutations']} permutations, {N_NUMERIC} properties): "
        f"{ratio['naive_s'] / ratio['vectorised_s']:.0f}x", flush=True
    )  # fmt: skip
    importances = importance_ratio(sizes[0], 5)
    for row in importances:
        print(
            f"permutation importances, {row['model']} (n = {row['n_held_out']} held out, "
            f"{row['properties']} properties, {row['n_repeats']} repeats): "
            f"{row['sklearn_s'] / row['transform_once_s']:.1f}x faster than scikit-learn's, "
            f"identical numbers: {row['identical']}", flush=True
        )
    for n in sizes:
        table, dispersion = synthetic(n)
        record(
            f"property_tests ({permutations} permutations, one score)",
            n,
            _seconds(
                lambda t=table, d=dispersion: dp.property_tests(
                    t, d, scores=["mean"], n_permutations=permutations
                )
            ),
        )
        for model in dp.MODELS:
            record(
                f"cross_validated_fit {model} ({shuffles} shuffles)",
                n,
                _seconds(
                    lambda t=table, d=dispersion, m=model: dp.cross_validated_fit(
                        t, d, models=[m], n_shuffles=shuffles
                    )
                ),
            )
        if n <= 10000:
            features = np.random.default_rng(0).standard_normal((n, 1280)).astype(np.float32)
            record(
                "nearest_similarities (k=10, d=1280)",
                n,
                _seconds(lambda f=features: props.nearest_similarities(f, 10)),
            )
    result = {
        "benchmark": "properties",
        "quick": args.quick,
        "machine": machine(),
        "naive_comparison": ratio,
        "importance_comparison": importances,
        "results": rows,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
