"""A run at 10k, 50k and 100k stimuli on one machine: time per step, peak memory, cache size,
subset-alignment latency, GPA iterations (issue 11).

The features are synthetic, shaped like real ones: 4 vision models of width 768, 1024, 1280,
1536 and 2 language models of width 768 and 1024, each a rank-64 shared signal times a
model-specific map plus noise, one layer each, written as float32 ``.npy`` files. The run is then
made from them by the same pipeline ``precompute`` uses (``write_run_from_embeddings`` on the
memory-mapped files: stored embeddings, exact neighbour lists, GPA, dispersion, PCA), in a child
process whose peak resident memory is the number reported. Then, in the same child:

* subset CKNNA (s = n/4, k = 10) through ``Run.alignment`` (best of 5) — and the dense reference
  (s × s kernels and masks, as the Platonic Representation code computes it) on the same subset
  where it fits in memory (s ≤ 6,000 here);
* the Alignment lab's workload: one pair on 20 random subsets of n/4 in one call.

Targets at n = 100,000: whole precompute from features ≤ 30 min, peak RSS ≤ 8 GB, cache ≤ 5 GB,
subset CKNNA (s = 25,000, k = 10) ≤ 300 ms.

Usage: .venv/bin/python benchmarks/bench_scale.py [--sizes 10000,50000,100000] [--quick]
           [--work DIR] [--out NAME]
``--quick`` is a smoke run of every step in under a minute (25 s on 2 busy cores): n = 1,000 and
2,000 at an eighth of the widths (``QUICK_*``; at the real widths GPA alone took 333 s at
n = 2,000).
Writes benchmarks/results/NAME (default scale.json); the feature files and runs go to --work
(default a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402

VISION_DIMS = (768, 1024, 1280, 1536)
LANGUAGE_DIMS = (768, 1024)
RANK = 64
DENSE_MAX_SUBSET = 6000
#: --quick: the same six models at an eighth of the widths, on smaller n
QUICK_SIZES = (1000, 2000)
QUICK_VISION_DIMS = tuple(d // 8 for d in VISION_DIMS)
QUICK_LANGUAGE_DIMS = tuple(d // 8 for d in LANGUAGE_DIMS)


def write_features(n: int, folder: Path, dims_v=VISION_DIMS, dims_l=LANGUAGE_DIMS) -> dict:
    """Synthetic float32 features, one .npy per model, generated in row blocks."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((n, RANK)).astype(np.float32)
    models = {f"vision-{i}": d for i, d in enumerate(dims_v)}
    models.update({f"language-{i}": d for i, d in enumerate(dims_l)})
    files = {}
    for m, (name, d) in enumerate(models.items()):
        mixing = rng.standard_normal((RANK, d)).astype(np.float32) / np.sqrt(RANK)
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32,
                                        shape=(n, d))
        noise_rng = np.random.default_rng(1000 + m)
        for start in range(0, n, 8192):
            stop = min(n, start + 8192)
            out[start:stop] = signal[start:stop] @ mixing + 0.7 * noise_rng.standard_normal(
                (stop - start, d), dtype=np.float32)
        out.flush()
        del out
        files[name] = str(folder / f"{name}.npy")
    ids = [f"s{i:06d}" for i in range(n)]
    pd.DataFrame({"id": ids, "image": [""] * n,
                  "captions": [[f"stimulus {i}"] for i in range(n)]}).to_parquet(
        folder / "stimuli.parquet")
    return files


class MemorySampler:
    """Samples this process's resident memory every 0.2 s from /proc/self/status: anonymous
    pages (arrays the run allocates) and file-backed pages (memory-mapped inputs and outputs,
    which the kernel can drop) apart, with the step that was running at each peak."""

    def __init__(self) -> None:
        import threading

        self.step = "start"
        self.peak = {"anon_gb": 0.0, "file_gb": 0.0, "total_gb": 0.0}
        self.at = {key: "" for key in self.peak}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> dict[str, float]:
        fields = {}
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    name, value = line.split(":")
                    fields[name] = int(value.split()[0]) / 1024**2
        anon, file = fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0)
        return {"anon_gb": anon, "file_gb": file + fields.get("RssShmem", 0.0),
                "total_gb": anon + file + fields.get("RssShmem", 0.0)}

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for key, value in self._read().items():
                if value > self.peak[key]:
                    self.peak[key], self.at[key] = value, self.step

    def __enter__(self) -> MemorySampler:
        if Path("/proc/self/status").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def child(folder: Path, run_path: Path) -> dict:
    """Make the run from the feature files and measure it (runs in its own process)."""
    import pandas as pd

    from convergence_core.precompute import write_run_from_embeddings
    from convergence_core.run import load_run

    stimuli = pd.read_parquet(folder / "stimuli.parquet")
    stimuli["captions"] = [list(c) for c in stimuli["captions"]]
    names = sorted(p.stem for p in folder.glob("*.npy"))
    embeddings = {name: {"features": np.load(folder / f"{name}.npy", mmap_mode="r")}
                  for name in names}
    vision = [m for m in names if m.startswith("vision")]
    language = [m for m in names if m.startswith("language")]
    marks: list[tuple[float, str]] = []

    sampler = MemorySampler()

    def progress(event) -> None:
        if not marks or marks[-1][1] != event.step:  # a line per step: minutes pass in some
            print(f"  {time.perf_counter() - started:7.1f} s  {event.step} {event.model or ''}",
                  file=sys.stderr, flush=True)
        marks.append((time.perf_counter(), event.step))
        sampler.step = event.step

    started = time.perf_counter()
    with sampler:
        write_run_from_embeddings(run_path, stimuli, embeddings, vision_models=vision,
                                  language_models=language, thumbnails=False, progress=progress)
    total = time.perf_counter() - started
    steps: dict[str, float] = {}
    previous = started
    for stamp, step in marks:
        steps[step] = steps.get(step, 0.0) + stamp - previous
        previous = stamp
    run = load_run(run_path)
    n = run.n_stimuli
    s = n // 4
    rng = np.random.default_rng(5)
    subset = np.sort(rng.choice(n, s, replace=False))
    pair = (vision[0], "features", language[0], "features")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        value = run.alignment(*pair, subset=subset, k=10)
        times.append(time.perf_counter() - t)
    sets = np.stack([np.sort(rng.choice(n, s, replace=False)) for _ in range(20)])
    t = time.perf_counter()
    run.subset_alignment([pair], sets, 10)
    batch = time.perf_counter() - t
    dense_s = dense_value = None
    if s <= DENSE_MAX_SUBSET:
        from benchmarks.bench_neighbours import dense_reference_cknna

        X = run.neighbours(vision[0], "features").features.rows(subset)
        Y = run.neighbours(language[0], "features").features.rows(subset)
        t = time.perf_counter()
        dense_value = dense_reference_cknna(X, Y, 10)
        dense_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in run_path.rglob("*") if p.is_file())
    widths = sum(array.shape[1] for layers in embeddings.values() for array in layers.values())
    return {
        "n": n,
        "total_s": total,
        "step_s": steps,
        "gpa_iterations": int(run.gpa.n_iter),
        "gpa_converged": bool(run.gpa.converged),
        "list_size": run.neighbours(vision[0], "features").k_max,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        # sampled during the run: anonymous (allocated) vs file-backed (mapped) pages, and the
        # step whose progress event came last before each peak
        "peak_memory_gb": sampler.peak,
        "peak_memory_step": sampler.at,
        "cache_gb": size / 1e9,
        "subset_size": s,
        "subset_cknna_s": min(times),
        "subset_cknna": value,
        "random_20_sets_s": batch,
        "dense_subset_cknna_s": dense_s,
        "dense_abs_difference": None if dense_value is None else abs(dense_value - value),
        "build_gflop": 2.0 * n * n * widths / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--quick", action="store_true",
                        help="n = 1000 and 2000 at widths 96-192: every step in under a minute")
    parser.add_argument("--work", default=None, help="folder for feature files and runs")
    parser.add_argument("--out", default="scale.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    sizes = list(QUICK_SIZES) if args.quick else [int(x) for x in args.sizes.split(",")]
    dims_v, dims_l = ((QUICK_VISION_DIMS, QUICK_LANGUAGE_DIMS) if args.quick
                      else (VISION_DIMS, LANGUAGE_DIMS))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    try:
        for n in sizes:
            folder = work / f"features-{n}"
            t = time.perf_counter()
            write_features(n, folder, dims_v, dims_l)
            generate_s = time.perf_counter() - t
            run_path = work / f"run-{n}"
            shutil.rmtree(run_path, ignore_errors=True)
            print(f"n = {n:,}: features written in {generate_s:.1f} s; the run's steps:",
                  file=sys.stderr, flush=True)
            done = subprocess.run(  # the child's step lines (stderr) show as it goes
                [sys.executable, __file__, "--child", str(folder), str(run_path)],
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )
            if done.returncode != 0:
                raise SystemExit(f"n = {n:,}: the run failed (its error is above)")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["generate_features_s"] = generate_s
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(run_path, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nScale, 4 vision (widths {dims_v}) + 2 language ({dims_l}) models, one "
          f"layer each; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    print(f"{'n':>7} {'total (s)':>9} {'lists (s)':>9} {'GPA (s)':>8} {'GPA it':>6} "
          f"{'RSS (GB)':>8} {'anon/file (GB)':>14} {'cache (GB)':>10} {'s':>6} {'CKNNA (ms)':>10} {'dense (s)':>9} "
          f"{'20 sets (s)':>11}")
    for r in rows:
        dense = "-" if r["dense_subset_cknna_s"] is None else f"{r['dense_subset_cknna_s']:.2f}"
        peak = r.get("peak_memory_gb", {})
        memory = f"{peak.get('anon_gb', 0):.2f}/{peak.get('file_gb', 0):.2f}"
        print(f"{r['n']:>7} {r['total_s']:>9.1f} {r['step_s'].get('neighbours', 0):>9.1f} "
              f"{r['step_s'].get('gpa', 0):>8.1f} {r['gpa_iterations']:>6} "
              f"{r['peak_rss_gb']:>8.2f} {memory:>14} {r['cache_gb']:>10.2f} {r['subset_size']:>6} "
              f"{1e3 * r['subset_cknna_s']:>10.1f} {dense:>9} {r['random_20_sets_s']:>11.2f}")
    payload = {"quick": args.quick, "machine": machine(), "vision_dims": dims_v,
               "language_dims": dims_l, "rows": rows}
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
