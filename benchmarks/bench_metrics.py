"""Speed of every registered alignment metric at the demo's sizes, next to the Platonic
Representation implementation (minyoungg/platonic-rep ``metrics.py``) in the same run.

For s = 59 and 239 stimuli (the demo's quarter and whole set), k = 10, features shaped like the
demo's (d_x = 1280 vision, d_y = 640 language; a shared latent structure, rows L2-normalised):

* ``ours_ms``: one ``measure(name, X, Y)`` call on one set (minimum over repeats);
* ``reference_ms`` and ``abs_difference``: the reference's function on the same float64 tensors
  (torch), when a checkout of the reference is found (``--reference DIR`` or the environment
  variable ``PLATONIC_REP_DIR``; never part of this repository). It imports ``torchaudio`` for
  ``edit_distance``; where torchaudio is absent a stand-in with torchaudio's pure-Python
  Levenshtein loop is used (``reference_notes`` says so). ``lcs_knn`` is compared on the
  reference's scale (ours × k). ``svcca``: the reference's SVD is randomized, so Δ ~1e-2 is
  expected;
* ``sets_ms``: the Alignment lab's cost of a metric change: the metric on ``--sets`` (200) random
  sets of size s. Neighbour metrics: one batched ``measure_tables`` call on the sets' neighbour
  tables (built beforehand: ``tables_ms`` is that build from features, the cost a k change adds
  when no stored neighbour lists are at hand); linear CKA: ``cka_from_kernels`` on the sets'
  sub-Grams of the full (n, n) Gram (gather included); the rest: one ``measure`` per set (timed
  on up to 20 sets, scaled, ``sets_timed`` says how many);
* ``live``: sets_ms ≤ 300 ms (the issue's budget), compared with the registry's ``live`` flag.

Usage: .venv/bin/python benchmarks/bench_metrics.py [--quick] [--threads N] [--sets B]
           [--reference DIR] [--out NAME]
Writes benchmarks/results/NAME (default metrics.json). Timings on a shared machine are noisy:
compare columns of one run (ratios), and run the full size on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import metrics  # noqa: E402
from convergence_core.metrics import (  # noqa: E402
    cka_from_kernels,
    measure,
    measure_tables,
    metric,
    nearest_neighbours,
)

BUDGET_MS = 300.0

#: (label, registry name, options)
CASES = [
    ("cknna", "cknna", {"k": 10}),
    ("mutual_knn", "mutual_knn", {"k": 10}),
    ("cycle_knn", "cycle_knn", {"k": 10}),
    ("lcs_knn", "lcs_knn", {"k": 10}),
    ("edit_distance_knn", "edit_distance_knn", {"k": 10}),
    ("cka", "cka", {}),
    ("cka_rbf", "cka", {"kernel": "rbf", "sigma": 1.0}),
    ("unbiased_cka", "unbiased_cka", {}),
    ("unbiased_cka_rbf", "unbiased_cka", {"kernel": "rbf", "sigma": 1.0}),
    ("svcca", "svcca", {"cca_dim": 10}),
]


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, value = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def demo_like(rng: np.random.Generator, n: int, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    latent = rng.standard_normal((n, 32)) * np.linspace(3.0, 0.3, 32)
    X = latent @ rng.standard_normal((32, dx)) + 2.0 * rng.standard_normal((n, dx))
    Y = latent @ rng.standard_normal((32, dy)) + 2.0 * rng.standard_normal((n, dy))
    return X / np.linalg.norm(X, axis=1, keepdims=True), Y / np.linalg.norm(
        Y, axis=1, keepdims=True
    )


# --- the reference -------------------------------------------------------------------------------
def _levenshtein(seq1, seq2) -> int:
    """torchaudio.functional.edit_distance's algorithm (pure Python, one row at a time)."""
    previous = list(range(len(seq2) + 1))
    for i in range(1, len(seq1) + 1):
        current = [i] + [0] * len(seq2)
        for j in range(1, len(seq2) + 1):
            if seq1[i - 1] == seq2[j - 1]:
                current[j] = previous[j - 1]
            else:
                current[j] = 1 + min(previous[j - 1], current[j - 1], previous[j])
        previous = current
    return int(previous[-1])


def load_reference(directory: str | None) -> tuple[object | None, str]:
    """The reference's ``AlignmentMetrics`` class and a note, or (None, why not)."""
    if not directory:
        return None, "no reference checkout given (--reference or PLATONIC_REP_DIR)"
    path = Path(directory)
    if not (path / "metrics.py").is_file():
        return None, f"{path / 'metrics.py'} not found"
    note = "reference metrics.py as fetched"
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("torchaudio")
        functional = types.ModuleType("torchaudio.functional")
        functional.edit_distance = _levenshtein
        stand_in.functional = functional
        sys.modules.setdefault("torchaudio", stand_in)
        sys.modules.setdefault("torchaudio.functional", functional)
        note += (
            "; torchaudio absent: edit_distance is a stand-in with torchaudio's pure-Python loop"
        )
    sys.path.insert(0, str(path))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a pymp hint on import
            module = importlib.import_module("metrics")
    except Exception as exc:  # torch missing and the like
        return None, f"reference import failed: {exc!r}"
    finally:
        sys.path.remove(str(path))
    return module.AlignmentMetrics, note


def reference_call(reference, name: str, options: dict, X, Y):
    import torch

    tx, ty = torch.from_numpy(X), torch.from_numpy(Y)
    if name in ("cknna", "mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"):
        return lambda: getattr(reference, name)(tx, ty, topk=options["k"])
    if name in ("cka", "unbiased_cka"):
        kernel = {"linear": "ip", "rbf": "rbf"}[options.get("kernel", "linear")]
        return lambda: getattr(reference, name)(
            tx, ty, kernel_metric=kernel, rbf_sigma=options.get("sigma", 1.0)
        )
    if name == "svcca":
        return lambda: reference.svcca(tx, ty, cca_dim=options["cca_dim"])
    raise KeyError(name)


# --- the lab's 200 sets -------------------------------------------------------------------------
def sets_time(name, options, X, Y, sets, gram_x, gram_y, repeats) -> dict:
    entry = metric(name)
    k = options.get("k")
    if entry.neighbour_metric:
        start = time.perf_counter()
        tables = [(nearest_neighbours(X[q], k), nearest_neighbours(Y[q], k)) for q in sets]
        tables_s = time.perf_counter() - start
        tx = np.stack([a.indices for a, _ in tables])
        ty = np.stack([b.indices for _, b in tables])
        vx = np.stack([a.values for a, _ in tables])
        vy = np.stack([b.values for _, b in tables])
        extra = {key: value for key, value in options.items() if key != "k"}
        seconds, _ = best_time(lambda: measure_tables(name, tx, ty, vx, vy, **extra), repeats)
        return {
            "sets_ms": 1e3 * seconds,
            "sets_path": "measure_tables (batched)",
            "tables_ms": 1e3 * tables_s,
            "sets_timed": len(sets),
        }
    if name in ("cka", "unbiased_cka") and options.get("kernel", "linear") == "linear":

        def gathered():
            index = (sets[:, :, None], sets[:, None, :])
            return cka_from_kernels(gram_x[index], gram_y[index], unbiased=name == "unbiased_cka")

        seconds, _ = best_time(gathered, repeats)
        return {
            "sets_ms": 1e3 * seconds,
            "sets_path": "cka_from_kernels on sub-Grams",
            "tables_ms": None,
            "sets_timed": len(sets),
        }
    timed = sets[:20]
    start = time.perf_counter()
    for q in timed:
        measure(name, X[q], Y[q], **options)
    seconds = (time.perf_counter() - start) * len(sets) / len(timed)
    return {
        "sets_ms": 1e3 * seconds,
        "sets_path": "measure per set",
        "tables_ms": None,
        "sets_timed": len(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (s = 30, 59; 20 sets)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument(
        "--sets", type=int, default=None, help="random sets for the lab column (200)"
    )
    parser.add_argument("--reference", default=os.environ.get("PLATONIC_REP_DIR"))
    parser.add_argument("--out", default="metrics.json")
    args = parser.parse_args()
    sizes = (30, 59) if args.quick else (59, 239)
    n_sets = args.sets or (20 if args.quick else 200)
    repeats = 2 if args.quick else 5
    n, dx, dy = 239, 1280, 640
    rng = np.random.default_rng(0)
    X, Y = demo_like(rng, n, dx, dy)
    gram_x, gram_y = X @ X.T, Y @ Y.T
    reference, reference_note = load_reference(args.reference)
    rows = []
    with threadpool_limits(args.threads):
        for s in sizes:
            one = np.sort(rng.choice(n, s, replace=False))
            sets = np.stack([np.sort(rng.choice(n, s, replace=False)) for _ in range(n_sets)])
            for label, name, options in CASES:
                Xs, Ys = X[one], Y[one]
                seconds, ours = best_time(lambda: measure(name, Xs, Ys, **options), repeats)
                row = {
                    "metric": label,
                    "name": name,
                    "options": options,
                    "s": s,
                    "ours_ms": 1e3 * seconds,
                    "value": ours,
                    "reference_ms": None,
                    "reference_value": None,
                    "abs_difference": None,
                }
                if reference is not None:
                    call = reference_call(reference, name, options, Xs, Ys)
                    ref_seconds, value = best_time(
                        call, 1 if name in ("lcs_knn", "edit_distance_knn") else repeats
                    )
                    value = float(value)
                    comparable = ours * options["k"] if name == "lcs_knn" else ours
                    row.update(
                        reference_ms=1e3 * ref_seconds,
                        reference_value=value,
                        abs_difference=abs(comparable - value),
                    )
                row.update(sets_time(name, options, X, Y, sets, gram_x, gram_y, repeats))
                row["n_sets"] = n_sets
                row["live"] = row["sets_ms"] <= BUDGET_MS * n_sets / 200
                row["registry_live"] = metric(name).live
                rows.append(row)
    header = (
        f"{'metric':18s} {'s':>4s} {'ours ms':>9s} {'ref ms':>9s} {'speed-up':>9s} {'|Δ|':>9s} "
        f"{str(n_sets) + ' sets ms':>13s} {'tables ms':>10s} {'live':>5s}  path"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ref, diff, tables = row["reference_ms"], row["abs_difference"], row["tables_ms"]
        ref_text = f"{ref:9.2f}" if ref is not None else "        -"
        speed_text = f"{ref / row['ours_ms']:8.1f}x" if ref is not None else "        -"
        diff_text = f"{diff:9.1e}" if diff is not None else "        -"
        tables_text = f"{tables:10.1f}" if tables is not None else "         -"
        live = "yes" if row["live"] else "no"
        print(
            f"{row['metric']:18s} {row['s']:4d} {row['ours_ms']:9.2f} {ref_text} {speed_text} {diff_text} "
            f"{row['sets_ms']:13.1f} {tables_text} {live:>5s}  {row['sets_path']}"
        )
    print(f"reference: {reference_note}")
    payload = {
        "quick": args.quick,
        "threads": args.threads,
        "n": n,
        "dx": dx,
        "dy": dy,
        "n_sets": n_sets,
        "budget_ms": BUDGET_MS,
        "reference_notes": reference_note,
        "machine": machine(numpy=np.__version__),
        "block_elements": metrics._BLOCK_ELEMENTS,
        "rows": rows,
    }
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
