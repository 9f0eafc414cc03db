"""The property benchmark runs (smoke test; timings are read from its table and JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_properties_benchmark_runs_and_writes_json() -> None:
    out = "properties-smoke-test.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_properties.py", "--quick", "--out", out],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    path = REPO / "benchmarks" / "results" / out
    payload = json.loads(path.read_text())
    path.unlink()
    assert payload["quick"] is True
    measured = {row["what"].split(" (")[0] for row in payload["results"]}
    assert {
        "image_properties",
        "property_tests",
        "cross_validated_fit ridge",
        "cross_validated_fit boosted_trees",
        "nearest_similarities",
    } <= measured
    assert "speed-up" in done.stdout
    compared = payload["importance_comparison"]
    assert {row["model"] for row in compared} == {"ridge", "boosted_trees"}
    assert all(row["identical"] for row in compared)  # the same numbers as scikit-learn's
