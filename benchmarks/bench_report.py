"""What the report's issue-14 sections cost: the report with and without them, and each section
alone, on a run shaped like the demo (239 stimuli; widths 1280 / 384 / 640) and on the real demo
run when it is cached (its many-to-many section only when its caption embeddings are cached too:
``report --preset demo --embed-captions`` once). Wall and CPU seconds, and their ratios to the
report without the sections, so a loaded machine still gives comparable numbers. Prints a table
and writes benchmarks/results/bench_report.json.

    .venv/bin/python benchmarks/bench_report.py            # full size (about 3 minutes, 1 core)
    .venv/bin/python benchmarks/bench_report.py --quick    # smoke test: 48 stimuli, small counts

Run it with one BLAS thread (``OMP_NUM_THREADS=1``) for numbers that do not depend on how many
cores the machine lends.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_analyses import demo_shaped_run  # noqa: E402
from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import analyses, report, settings  # noqa: E402
from convergence_core.dispersion import SCORES  # noqa: E402
from convergence_core.run import Run, load_run  # noqa: E402


def _time(call: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(run: Run, label: str, folder: Path, *, quick: bool = False) -> list[dict[str, object]]:
    """Every case once; ``quick``: k = 5 and small counts (a smoke test, not a measurement)."""
    k = 5 if quick else 10
    size = report.default_set_size(run.n_stimuli, k)
    counts = {"n_random": 20, "n_permutations": 50} if quick else {}
    # the property fits and universal-space folds, small too (the report's slowest parts there)
    report_counts = (
        {**counts, "property_permutations": 200, "property_shuffles": 1, "universal_folds": 2}
        if quick else {}
    )
    options = (
        report.AnalysisOptions(
            metric_permutations=10, n_shuffles=10, n_matched=10, predictivity_random=1,
            blind_matching_repeats=1, blind_matching_random=1, many_to_many_resamples=10,
        )
        if quick
        else report.AnalysisOptions()
    )
    without = report.AnalysisOptions(metrics=("cknna",), skip=report.OPTIONAL_SECTIONS)
    best = analyses.best_language_layers(run, k=k)
    pairs = analyses.pairs_with_best_layers(run, k=k, best_layers=best)
    metrics = options.metric_names()
    metric_options = options.metric_options(run, pairs, size, metrics)
    sets = report.dispersion_sets(run, "mean", size, counts.get("n_random", 200), 0)
    calibration_metrics = options.calibration_metric_names(metrics)
    cases: dict[str, Callable[[], object]] = {
        "report without the issue-14 sections": lambda: report.write_report(
            run, folder / "without", k=k, options=without, **report_counts
        ),
        "report with them (defaults)": lambda: report.write_report(
            run, folder / "with", k=k, options=options, **report_counts
        ),
        "Fig. 2 sets, CKNNA only (both scores)": lambda: analyses.dispersion_set_alignment(
            run, size=size, k=k, score=list(SCORES), best_layers=best, **counts
        ),
        "Fig. 2 sets, every metric (both scores)": lambda: analyses.dispersion_set_alignment(
            run, size=size, k=k, score=list(SCORES), best_layers=best, metrics=metrics,
            metric_options=metric_options, metric_permutations=options.metric_permutations,
            on_error="nan", **counts,
        ),
        "per-stimulus alignment": lambda: report.per_stimulus_section(
            run, folder, pairs, k=k, score="mean",
            n_permutations=counts.get("n_permutations", 1000), seed=0,
        ),
        "linear predictivity": lambda: report.predictivity_section(
            run, folder, pairs, sets, n_random=options.predictivity_random,
            n_folds=options.predictivity_folds, seed=0,
        ),
        "many-to-many (cached captions only)": lambda: report.many_to_many_section(
            run, folder, pairs, k=k, metrics=options.many_to_many_metrics,
            n_resamples=options.many_to_many_resamples, embed=False, seed=0,
        ),
        "blind matching": lambda: report.blind_matching_section(
            run, folder, pairs, sets, repeats=options.blind_matching_repeats,
            n_random=options.blind_matching_random, n_seeds=options.blind_matching_seeds, seed=0,
        ),
        "calibration and matched baselines": lambda: report.calibration_section(
            run, folder, pairs, sets, k=k, metrics=calibration_metrics,
            metric_options={n: v for n, v in metric_options.items() if n in calibration_metrics},
            n_shuffles=options.n_shuffles, n_matched=options.n_matched, seed=0,
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for name, call in cases.items():
        wall, cpu = _time(call)
        rows.append(
            {"run": label, "n_stimuli": run.n_stimuli, "set_size": size, "what": name,
             "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)}
        )
    base = rows[0]
    for row in rows:
        row["cpu_ratio_to_report_without"] = round(row["cpu_seconds"] / base["cpu_seconds"], 2)
        print(
            f"{label:<12} {row['what']:<42} {row['wall_seconds']:8.2f} s "
            f"{row['cpu_seconds']:8.2f} s  {row['cpu_ratio_to_report_without']:6.2f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: a 48-stimulus run, small counts"
    )
    parser.add_argument("--out", default="bench_report.json", help="file name in results/")
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    print(f"{'run':<12} {'what':<42} {'wall':>10} {'cpu':>10}  {'cpu / report without':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from tests.fixtures_runs import make_synthetic_run

            run = make_synthetic_run(Path(tmp), 48, images=False, thumbnails=False)
            rows += bench(run, "synthetic-48", Path(tmp) / "out", quick=True)
        else:
            run = demo_shaped_run(Path(tmp) / "demo-shaped")
            rows += bench(run, "demo-shaped", Path(tmp) / "shaped")
            demo = settings.runs_root() / "demo"
            if (demo / "manifest.json").is_file():
                rows += bench(load_run(demo), "demo (real)", Path(tmp) / "demo")
    result = {
        "benchmark": "report",
        "quick": bool(args.quick),
        "blas_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": machine(),
        "results": rows,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
