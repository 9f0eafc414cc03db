"""Clip thresholds per layer (ours) or per model (the Platonic Representation pipeline): how far
apart are the metrics?

A run clips each layer of a model at its own threshold (``neighbours.clip_threshold``: the mean
over rows of each row's q-quantile of |x|). The reference's ``measure_alignment.py`` calls the same
``remove_outliers`` on a model's whole (N, layers, D) stack, so one threshold, taken over every
layer's values, clips them all. This script computes both on a run's stored embeddings and, for
every GPA model (at its GPA layer) × every layer of every language model, the difference of each
metric between the two clippings, and whether the best language layer (by CKNNA) changes.

Usage: .venv/bin/python benchmarks/measure_clip_pooling.py [--run demo] [--out clip_pooling.json]
Prints each model's thresholds and a table of the differences; writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import metrics  # noqa: E402
from convergence_core.neighbours import clip_threshold, prepare_rows  # noqa: E402
from convergence_core.run import load_run  # noqa: E402

METRICS = {"mutual_knn": {"k": 10}, "cknna": {"k": 10}, "cka": {}}


def model_threshold(layers: list[np.ndarray]) -> float:
    """One threshold over a model's layers (n, d_l) side by side: the reference's pooled clip."""
    return clip_threshold(np.concatenate(layers, axis=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo", help="run folder or name (default: demo)")
    parser.add_argument("--out", default="clip_pooling.json")
    args = parser.parse_args(argv)
    run = load_run(args.run)

    def layer(model: str, name: str) -> np.ndarray:
        return np.asarray(run.embeddings[model][name], dtype=np.float64)

    models = [*run.gpa.models, *run.language_models]
    thresholds = {}
    for model in models:
        arrays = [layer(model, name) for name in run.layers(model)]
        thresholds[model] = {
            "model": model_threshold(arrays),
            "per_layer": dict(zip(run.layers(model), map(clip_threshold, arrays), strict=True)),
        }
        per = thresholds[model]["per_layer"].values()
        print(f"{model:24s} one threshold {thresholds[model]['model']:9.3f}   per layer "
              f"{min(per):.3f}–{max(per):.3f} ({len(per)} layers)")

    rows = []
    for vision, vision_layer in zip(run.gpa.models, run.gpa.layers, strict=True):
        X = layer(vision, vision_layer)
        x_layer = prepare_rows(X, thresholds[vision]["per_layer"][vision_layer])
        x_model = prepare_rows(X, thresholds[vision]["model"])
        for language in run.language_models:
            for name in run.layers(language):
                Y = layer(language, name)
                y_layer = prepare_rows(Y, thresholds[language]["per_layer"][name])
                y_model = prepare_rows(Y, thresholds[language]["model"])
                for metric, options in METRICS.items():
                    rows.append({
                        "vision_model": vision, "language_model": language,
                        "language_layer": name, "metric": metric,
                        "per_layer": metrics.measure(metric, x_layer, y_layer, **options),
                        "per_model": metrics.measure(metric, x_model, y_model, **options),
                    })

    print(f"\n{len(rows) // len(METRICS)} vision × language layer pairs; "
          "|per model − per layer|:")
    print(f"{'metric':12s} {'median':>8s} {'largest':>8s}")
    summary = {}
    for metric in METRICS:
        gaps = np.abs([r["per_model"] - r["per_layer"] for r in rows if r["metric"] == metric])
        summary[metric] = {"median": float(np.median(gaps)), "largest": float(gaps.max())}
        print(f"{metric:12s} {np.median(gaps):8.4f} {gaps.max():8.4f}")
    best = []
    for vision in run.gpa.models:
        for language in run.language_models:
            mine = [r for r in rows if r["vision_model"] == vision
                    and r["language_model"] == language and r["metric"] == "cknna"]
            pick = {side: mine[int(np.nanargmax([r[side] for r in mine]))]["language_layer"]
                    for side in ("per_layer", "per_model")}
            best.append({"vision_model": vision, "language_model": language, **pick})
    changed = sum(b["per_layer"] != b["per_model"] for b in best)
    print(f"best language layer by CKNNA changed in {changed} of {len(best)} model pairs")
    write_results(args.out, {
        "machine": machine(), "run": str(run.path), "thresholds": thresholds,
        "summary": summary, "best_layers": best, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
