"""Time the paper's analyses on a run shaped like the demo (239 stimuli; 3 vision models of width
1280; language models with 7 layers of 384 and 19 layers of 640), and on the real demo run when
it is cached. Prints a table and writes benchmarks/results/bench_analyses.json.

    .venv/bin/python benchmarks/bench_analyses.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import analyses, report, settings  # noqa: E402
from convergence_core.precompute import write_run_from_embeddings  # noqa: E402
from convergence_core.run import Run, load_run  # noqa: E402

N_STIMULI = 239
SET_SIZE = N_STIMULI // 4


def demo_shaped_run(path: Path, seed: int = 0) -> Run:
    """A synthetic run with the demo's sizes: shared latent + per-stimulus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((N_STIMULI, 32))
    noise = rng.uniform(0.1, 1.5, N_STIMULI)[:, None]

    def view(width: int) -> np.ndarray:
        return latent @ rng.standard_normal((32, width)) + noise * rng.standard_normal(
            (N_STIMULI, width)
        )

    embeddings = {f"vision{i}": {"features": view(1280)} for i in range(3)}
    embeddings["minilm-like"] = {f"layer{j}": view(384) for j in range(7)}
    embeddings["gemma-like"] = {f"layer{j}": view(640) for j in range(19)}
    stimuli = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(N_STIMULI)],
            "image": [f"{i}.jpg" for i in range(N_STIMULI)],
            "captions": [[f"caption {i}"] for i in range(N_STIMULI)],
        }
    )
    return write_run_from_embeddings(
        path,
        stimuli,
        embeddings,
        vision_models=["vision0", "vision1", "vision2"],
        language_models=["minilm-like", "gemma-like"],
        thumbnails=False,
    )


def _time(call: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def bench(run: Run, label: str, repeats: int, out: Path) -> list[dict[str, object]]:
    size = report.default_set_size(run.n_stimuli, 10)
    best = analyses.best_language_layers(run)
    cases: dict[str, Callable[[], object]] = {
        "layer_sweep (k=10)": lambda: analyses.layer_sweep(run),
        f"dispersion_set_alignment (size={size}, n_random=200, n_permutations=1000)": lambda: (
            analyses.dispersion_set_alignment(run, size=size, best_layers=best)
        ),
        "drop_fraction_alignment (q=0.25)": lambda: analyses.drop_fraction_alignment(
            run, best_layers=best
        ),
        "leave_one_model_out": lambda: analyses.leave_one_model_out(run),
        "full report (both scores, figures)": lambda: report.write_report(run, out),
    }
    rows = []
    for name, call in cases.items():
        seconds = _time(call, 1 if name.startswith("full report") else repeats)
        rows.append({"run": label, "analysis": name, "seconds": round(seconds, 3)})
        print(f"{label:<14} {name:<76} {seconds:8.2f} s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="best of this many runs per analysis"
    )
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = demo_shaped_run(Path(tmp) / "demo-shaped")
        print(f"{'run':<14} {'analysis':<76} {'best time':>10}")
        rows += bench(run, "demo-shaped", args.repeats, Path(tmp) / "report")
        demo = settings.runs_root() / "demo"
        if (demo / "manifest.json").is_file():
            rows += bench(load_run(demo), "demo (real)", args.repeats, Path(tmp) / "report-demo")
    result = {
        "benchmark": "analyses",
        "machine": machine(),
        "n_stimuli": N_STIMULI,
        "results": rows,
    }
    write_results("bench_analyses.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
