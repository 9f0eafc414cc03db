"""How far do the report's blind-matching accuracies move with the last digits of the features?

Blind matching (paper 003; ``report.blind_matching_section``) searches for the pairing of a set's
images and captions that maximises CKA with a local quadratic-assignment solver. Its optimum is
discrete, so features a few parts in a million apart (what another CPU's kernels or thread count
give when the encoders run) can end in other local optima and other accuracies. The README
quotes the demo report's accuracies as the range this script measures.

The report's own section runs on the run's features as stored, then ``--perturbations`` times on
features multiplied entry-wise by (1 + scale · ε), ε standard normal (seeded 0, 1, ...), with the
report's pairs (best language layers), sets (mean dispersion, its default size, the first random
draws) and solver settings.

Usage: .venv/bin/python benchmarks/measure_blind_matching_spread.py [--run demo]
           [--perturbations 16] [--scale 1e-6] [--quick] [--out blind_matching_spread.json]
Prints each run's mean accuracy per set (low, high, random; mean over the pairs, in %) and the
range over the perturbed runs, and writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import analyses, report  # noqa: E402
from convergence_core.run import load_run  # noqa: E402

SETS = ("low", "high", "random")


class _PerturbedRun:
    """What ``report.blind_matching_section`` reads of a run (``neighbours(model, layer)
    .features.rows(rows)``), with every feature entry multiplied by (1 + scale · ε)."""

    def __init__(self, features: dict[tuple[str, str], np.ndarray], scale: float, seed: int):
        rng = np.random.default_rng(seed)
        self._features = {
            key: value * (1.0 + scale * rng.standard_normal(value.shape)) if scale else value
            for key, value in features.items()
        }

    def neighbours(self, model: str, layer: str) -> SimpleNamespace:
        table = self._features[(model, layer)]
        return SimpleNamespace(features=SimpleNamespace(rows=lambda rows: table[rows]))


def accuracies(run, pairs, sets, options: report.AnalysisOptions, seed: int) -> dict[str, float]:
    """The report's blind-matching section on ``run``: mean accuracy per set, in %."""
    with tempfile.TemporaryDirectory() as folder:
        _, entry = report.blind_matching_section(
            run, Path(folder), pairs, sets, repeats=options.blind_matching_repeats,
            n_random=options.blind_matching_random, n_seeds=options.blind_matching_seeds,
            seed=seed,
        )
    out: dict[str, list[float]] = {name: [] for name in SETS}
    for row in entry["summary"]:
        out[row["set"]].append(row["accuracy_mean"])
    return {name: 100.0 * float(np.mean(values)) for name, values in out.items() if values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo", help="run folder or name (default: demo)")
    parser.add_argument("--perturbations", type=int, default=16)
    parser.add_argument("--scale", type=float, default=1e-6,
                        help="relative size of the perturbation of each feature entry")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="the report's seed")
    parser.add_argument("--quick", action="store_true", help="1 perturbation (a smoke test)")
    parser.add_argument("--out", default="blind_matching_spread.json")
    args = parser.parse_args(argv)
    if args.perturbations < 1 or not args.scale > 0:
        parser.error("--perturbations must be at least 1 and --scale above 0")
    run = load_run(args.run)
    options = report.AnalysisOptions()
    size = report.default_set_size(run.n_stimuli, args.k)
    pairs = analyses.pairs_with_best_layers(run, k=args.k)
    sets = report.dispersion_sets(run, report.SCORES[0], size, 200, args.seed)
    features = {
        side: np.asarray(run.neighbours(*side).features.rows(np.arange(run.n_stimuli)))
        for pair in pairs
        for side in pair.sides
    }
    n_perturbations = 1 if args.quick else args.perturbations

    started = time.perf_counter()
    stored = accuracies(run, pairs, sets, options, args.seed)
    print("stored features:    " + ", ".join(f"{k} {v:.2f} %" for k, v in stored.items()))
    perturbed = []
    for index in range(n_perturbations):
        values = accuracies(
            _PerturbedRun(features, args.scale, index), pairs, sets, options, args.seed
        )
        perturbed.append(values)
        shown = ", ".join(f"{k} {v:.2f} %" for k, v in values.items())
        print(f"perturbation {index:2d}:    {shown}", flush=True)
    ranges = {
        name: [min(v[name] for v in perturbed), max(v[name] for v in perturbed)]
        for name in stored
    }
    print(f"range over {n_perturbations} perturbations of {args.scale:g}: "
          + ", ".join(f"{k} {lo:.1f}–{hi:.1f} %" for k, (lo, hi) in ranges.items()))
    write_results(args.out, {
        "run": str(run.path),
        "n_stimuli": run.n_stimuli,
        "set_size": size,
        "pairs": [pair.label for pair in pairs],
        "scale": args.scale,
        "n_perturbations": n_perturbations,
        "stored_percent": stored,
        "perturbed_percent": perturbed,
        "range_percent": ranges,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
