"""Held-out retrieval at scale: time and peak memory of the blocked ranks (retrieval.retrieval_ranks)
against a dense (n, n) reference, and of fitting a universal space of 3 vision + 2 language models;
and a universal space of many models on few stimuli (the paper's setting: 4 vision × 10 language
models, 768–2,048 features, 1,000 stimuli), its GPA sweeping on the stimuli's rows (what
``procrustes._rows_cheaper`` picks there) against the same fit on the cross-products, in one run.

Peak memory is what ``tracemalloc`` sees numpy allocate during the call (numpy reports its
buffers to it), compared with the n² float64 bytes a dense similarity matrix would take.

    .venv/bin/python benchmarks/bench_universal.py [--quick] [--out NAME.json]

Full size (n_test up to 20,000) needs a quiet machine for meaningful times; ``--quick`` (n up to
2,000) is what the test suite runs.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results
from convergence_core import procrustes, retrieval
from convergence_core.universal import Member, fit_universal_space

WIDTH = 64


def dense_ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Reference: the whole (n, n) cosine matrix at once."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q @ g.T
    return np.count_nonzero(scores >= np.diag(scores)[:, None], axis=1)


def measure(function, *args):
    tracemalloc.start()
    started = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, WIDTH))
    return latent + 0.8 * rng.standard_normal((n, WIDTH)), latent + 0.8 * rng.standard_normal(
        (n, WIDTH)
    )


def many_models(quick: bool) -> dict[str, object]:
    """fit_universal_space of many models on few stimuli, GPA on the rows (the automatic choice)
    and on the cross-products (forced), one after the other on the same features."""
    n_train, n_vision, n_language = (60, 3, 5) if quick else (1000, 4, 10)
    widths = [(48, 64, 80, 96)[i % 4] if quick else (768, 1024, 1280, 1536, 2048)[i % 5]
              for i in range(n_vision + n_language)]
    rng = np.random.default_rng(2)
    latent = rng.standard_normal((n_train, 16))
    features = [
        latent @ rng.standard_normal((16, d)) + 2.0 * rng.standard_normal((n_train, d))
        for d in widths
    ]
    members = [Member(f"v{i}", "l", "vision") for i in range(n_vision)] + [
        Member(f"t{i}", "l", "language") for i in range(n_language)
    ]
    rows_fit, rows_seconds, rows_peak = measure(fit_universal_space, features, members)
    automatic = procrustes._rows_cheaper
    procrustes._rows_cheaper = lambda n, ranks: False
    try:
        cross_fit, cross_seconds, cross_peak = measure(fit_universal_space, features, members)
    finally:
        procrustes._rows_cheaper = automatic
    ranks = [min(d, n_train - 1) for d in widths]
    return {
        "models": len(widths),
        "n_train": n_train,
        "widths": widths,
        "rows_chosen": bool(automatic(n_train, ranks)),
        "rows_seconds": rows_seconds,
        "rows_peak_bytes": rows_peak,
        "cross_seconds": cross_seconds,
        "cross_peak_bytes": cross_peak,
        "gpa_iterations": int(rows_fit.gpa.n_iter),
        "cross_gpa_iterations": int(cross_fit.gpa.n_iter),
        "max_residual_difference": float(
            np.abs(rows_fit.gpa.residuals - cross_fit.gpa.residuals).max()
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", default="universal.json", help="file in benchmarks/results/")
    args = parser.parse_args()
    sizes = (500, 2000) if args.quick else (2000, 5000, 20000)
    dense_limit = 2000 if args.quick else 5000

    rank_rows = []
    for n in sizes:
        queries, gallery = pairs(n)
        ranks, seconds, peak = measure(retrieval.retrieval_ranks, queries, gallery)
        row = {
            "n_test": n,
            "width": WIDTH,
            "blocked_seconds": seconds,
            "blocked_peak_bytes": peak,
            "dense_matrix_bytes": 8 * n * n,
            "inputs_bytes": 2 * queries.nbytes,
            "block_budget_bytes": 8 * retrieval.BLOCK_ELEMENTS,
            "recall_at_1": float(np.mean(ranks == 1)),
        }
        if n <= dense_limit:
            reference, dense_seconds, dense_peak = measure(dense_ranks, queries, gallery)
            row.update(
                dense_seconds=dense_seconds,
                dense_peak_bytes=dense_peak,
                identical_to_dense=bool(np.array_equal(ranks, reference)),
            )
        rank_rows.append(row)

    n_train = 400 if args.quick else 8000
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((n_train, 32))
    widths = (64, 80, 96, 96, 128) if args.quick else (1280, 1280, 1536, 384, 640)
    features = [
        latent @ rng.standard_normal((32, d)) + rng.standard_normal((n_train, d)) for d in widths
    ]
    members = [Member(f"v{i}", "l", "vision") for i in range(3)] + [
        Member(f"t{i}", "l", "language") for i in range(2)
    ]
    fit, fit_seconds, fit_peak = measure(fit_universal_space, features, members)
    fit_row = {
        "n_train": n_train,
        "widths": list(widths),
        "seconds": fit_seconds,
        "peak_bytes": fit_peak,
        "gpa_iterations": int(fit.gpa.n_iter),
        "width": fit.width,
    }

    many_row = many_models(quick=args.quick)

    print(f"{'n_test':>7} {'blocked s':>10} {'peak MiB':>9} {'dense n² MiB':>13} {'dense s':>8}")
    for row in rank_rows:
        dense = f"{row['dense_seconds']:.3f}" if "dense_seconds" in row else "-"
        print(
            f"{row['n_test']:>7} {row['blocked_seconds']:>10.3f} "
            f"{row['blocked_peak_bytes'] / 2**20:>9.1f} {row['dense_matrix_bytes'] / 2**20:>13.1f} "
            f"{dense:>8}"
        )
    print(
        f"fit_universal_space: {n_train} stimuli × widths {widths}: {fit_seconds:.2f} s, "
        f"{fit_row['gpa_iterations']} GPA iterations, peak {fit_peak / 2**20:.1f} MiB"
    )
    print(
        f"{many_row['models']} models × {many_row['n_train']} stimuli (widths "
        f"{min(many_row['widths'])}-{max(many_row['widths'])}): GPA on the rows "
        f"{many_row['rows_seconds']:.1f} s (peak {many_row['rows_peak_bytes'] / 2**20:.0f} MiB), "
        f"on the cross-products {many_row['cross_seconds']:.1f} s (peak "
        f"{many_row['cross_peak_bytes'] / 2**20:.0f} MiB); {many_row['gpa_iterations']} "
        f"iterations each; residuals equal to {many_row['max_residual_difference']:.1e}"
    )
    payload = {
        "quick": args.quick,
        "machine": machine(),
        "ranks": rank_rows,
        "fit": fit_row,
        "many_models": many_row,
    }
    write_results(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
