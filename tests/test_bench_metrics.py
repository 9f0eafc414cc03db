"""The metric benchmark runs (small sizes) and writes its table: a benchmark that cannot run
measures nothing. Timings are not asserted; values are (ours on the same sets as the lab path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from convergence_core.metrics import metric_names

REPO = Path(__file__).resolve().parent.parent


def test_metrics_benchmark_runs_and_writes_json() -> None:
    out = "metrics-smoke-test.json"
    env = {key: value for key, value in os.environ.items() if key != "PLATONIC_REP_DIR"}
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_metrics.py", "--quick", "--sets", "4", "--out", out],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = REPO / "benchmarks" / "results" / out
    payload = json.loads(path.read_text())
    path.unlink()
    assert payload["quick"] is True and payload["n_sets"] == 4
    assert "no reference checkout" in payload["reference_notes"]
    rows = payload["rows"]
    assert {row["name"] for row in rows} == set(metric_names())
    assert {row["s"] for row in rows} == {30, 59}
    for row in rows:
        assert row["reference_ms"] is None and row["ours_ms"] > 0 and row["sets_ms"] > 0
        assert row["registry_live"] in (True, False)
    assert "sets ms" in done.stdout
