"""Time the dashboard: first page of a cached run, and new CKNNA bars after changing k or subset.

Uses the real demo run (``<cache>/runs/demo``) when it is cached, else a synthetic run of 239
coco-mini stimuli with thumbnails (the demo's size). Pages are driven with Streamlit's AppTest,
which runs the page script exactly as the server does (minus the browser's rendering).
Prints a table and writes benchmarks/results/dashboard.json.

    .venv/bin/python benchmarks/bench_dashboard.py [--repeats 5]

Targets (issue 5): first page <= 2 s after the server is up; changing k or the subset and getting
the new CKNNA bars <= 300 ms on the demo run. The lab page sends the bars before it runs the
permutation test, so "new bars" times what precedes the bars; whole-page reruns are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from convergence_core import settings  # noqa: E402
from convergence_core.dashboard import data, headless, lab, plots, state  # noqa: E402
from convergence_core.subsets import select_stimuli  # noqa: E402

TARGET_FIRST_PAGE_S = 2.0
TARGET_UPDATE_S = 0.300
TIMEOUT = 300


def _choose_run() -> tuple[Path, str]:
    demo = settings.runs_root() / "demo"
    if (demo / "manifest.json").is_file():
        return demo, "real demo run"
    from tests.fixtures_runs import make_synthetic_run

    cache = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    os.environ["CONVERGENCE_CACHE"] = str(cache)
    make_synthetic_run(cache / "runs", n=239, name="demo")
    return cache / "runs" / "demo", "synthetic run (239 coco-mini stimuli, no real demo cached)"


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _home() -> AppTest:
    """A new browser session on the app's entry page (pages are reached with switch_page)."""
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)


def _check(at: AppTest) -> AppTest:
    if at.exception:
        raise RuntimeError(f"page raised: {at.exception}")
    return at


_FRESH = """
import sys, time
sys.path.insert(0, {root!r})
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({app!r}, default_timeout=300)
start = time.perf_counter()
at.run(timeout=300)
assert not at.exception, at.exception
print(time.perf_counter() - start)
"""


def _fresh_process_first_run(cache: Path) -> float:
    code = _FRESH.format(root=str(ROOT), app=str(ROOT / "app.py"))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CONVERGENCE_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def _browser_timings(cache: Path) -> dict[str, float]:
    """Seconds from navigation until the page's script has finished, per page, in Chromium."""
    if not headless.CHROMIUM.exists():
        return {}
    from playwright.sync_api import sync_playwright

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convergence_core.dashboard.serve",  # what `make demo` runs
            "--server.port",
            str(port),
            "--server.headless",
            "true",
        ],
        cwd=ROOT,
        env={**os.environ, "CONVERGENCE_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    timings: dict[str, float] = {}
    try:
        base = f"http://localhost:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as reply:
                    if reply.read().strip() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = headless.launch_chromium(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for label, path in (
                ("home, first visit after server up", ""),
                ("home, second visit", ""),
                ("stimuli page", "Stimuli"),
                ("residual space page", "Residual_space"),
                ("alignment lab page", "Alignment_lab"),
            ):
                start = time.perf_counter()
                page.goto(f"{base}/{path}")
                page.wait_for_selector("h1", timeout=120_000)
                page.wait_for_function(headless.SCRIPT_FINISHED, timeout=120_000)
                timings[label] = time.perf_counter() - start
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run_path, run_kind = _choose_run()
    rows: list[dict[str, object]] = []

    def record(name: str, seconds: float, target: float | None, note: str) -> None:
        rows.append(
            {
                "measure": name,
                "seconds": round(seconds, 4),
                "target_s": target,
                "ok": None if target is None else seconds <= target,
                "note": note,
            }
        )

    # 1. first page of a cached run in a fresh process (a just-started server): the app's own
    # imports (plotly, scipy, the run) are paid here, as by the first visitor
    record(
        "home, fresh process (first script run)",
        _fresh_process_first_run(run_path.parent.parent),
        TARGET_FIRST_PAGE_S,
        "AppTest in a new Python process; streamlit itself already imported",
    )
    st.cache_resource.clear()
    st.cache_data.clear()
    home = _home()
    record(
        "home, first session (cold caches)",
        _timed(lambda: _check(home.run(timeout=TIMEOUT))),
        TARGET_FIRST_PAGE_S,
        "opens the run, histogram, 10 thumbnails; includes first imports",
    )
    warm = [
        _timed(lambda: _check(_home().run(timeout=TIMEOUT))) for _ in range(args.repeats)
    ]
    record(
        "home, new session (warm caches)", statistics.median(warm), TARGET_FIRST_PAGE_S, "median"
    )

    for page in ("pages/1_Stimuli.py", "pages/2_Residual_space.py", "pages/3_Alignment_lab.py"):
        at = _home()
        _check(at.run(timeout=TIMEOUT))
        at.switch_page(page)
        record(
            f"{page}, first visit",
            _timed(lambda at=at: _check(at.run(timeout=TIMEOUT))),
            TARGET_FIRST_PAGE_S,
            "first visit in the process: includes best layers, baseline, permutations"
            if "Alignment" in page
            else "",
        )

    # 2. the lab's numbers alone (what a change of k recomputes): 200 random sets, 200 permutations
    run = data.open_run(run_path)
    scores = run.dispersion["mean"].to_numpy(dtype=np.float64)
    best = data.best_language_layers(str(run.path), data.manifest_stamp(run.path))
    pairs = tuple(
        lab.Pair(v, layer, language, best[language])
        for v, layer in zip(run.gpa.models, run.gpa.layers, strict=True)
        for language in run.language_models
    )
    grams = data.grams_for(run, pairs)
    size = state.default_subset_size(run.n_stimuli)
    low, high = select_stimuli(scores, "low", size), select_stimuli(scores, "high", size)

    def bars(k: int) -> None:  # what the page computes before it sends the new bars
        values = lab.set_table(grams, pairs, {"low": low, "high": high}, k)
        baseline = lab.baseline_table(grams, pairs, scores, size, k, n_random=200, seed=0)
        plots.alignment_bars(values, baseline, "cknna")

    def permutation(k: int) -> None:  # computed and shown after the bars
        lab.low_high_permutation_table(grams, pairs, low, high, k, n_permutations=200, seed=0)

    bars(10)  # warm numpy and plotly
    times = [_timed(lambda k=k: bars(k)) for k in range(5, 5 + args.repeats)]
    record(
        f"new CKNNA bars for a new k ({len(pairs)} pairs, size {size})",
        statistics.median(times),
        TARGET_UPDATE_S,
        "set CKNNA + 200 random sets + figure, median",
    )
    times = [_timed(lambda k=k: permutation(k)) for k in range(5, 5 + args.repeats)]
    record(
        "low-vs-high permutation test for a new k",
        statistics.median(times),
        None,
        "200 shuffles = 400 subsets; streamed after the bars",
    )

    # 3. the lab page: change k / subset size / focus set and rerun (AppTest overhead included)
    at = _home()
    _check(at.run(timeout=TIMEOUT))
    at.switch_page("pages/3_Alignment_lab.py")
    _check(at.run(timeout=TIMEOUT))
    k_times, size_times, source_times = [], [], []
    for step in range(args.repeats):
        at.slider(key="w_k").set_value(3 + step)
        k_times.append(_timed(lambda: _check(at.run(timeout=TIMEOUT))))
        at.number_input(key="w_size").set_value(size - 1 - step)
        size_times.append(_timed(lambda: _check(at.run(timeout=TIMEOUT))))
        at.radio(key="w_source").set_value("high" if step % 2 == 0 else "low")
        source_times.append(_timed(lambda: _check(at.run(timeout=TIMEOUT))))
    record(
        "lab page, whole rerun after changing k",
        statistics.median(k_times),
        None,
        "median, uncached k; bars are sent before the permutation test and tables",
    )
    record(
        "lab page, whole rerun after changing set size",
        statistics.median(size_times),
        None,
        "median, uncached size",
    )
    record(
        "lab page rerun after changing the focus set",
        statistics.median(source_times),
        TARGET_UPDATE_S,
        "median; baseline cached",
    )

    # 4. a real browser against a real server (what a user sees), when Chromium is installed
    for name, seconds in _browser_timings(run_path.parent.parent).items():
        record(
            f"browser: {name}",
            seconds,
            TARGET_FIRST_PAGE_S,
            "goto until the script has finished (Chromium, headless; includes rendering)",
        )

    width = max(len(str(r["measure"])) for r in rows)
    print(f"run: {run_kind} ({run.n_stimuli} stimuli) at {run_path}")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        "(other jobs slow every number)"
    )
    print(f"{'measure':<{width}}  seconds  target  ok")
    for r in rows:
        target = "" if r["target_s"] is None else f"{r['target_s']:.3f}"
        print(f"{r['measure']:<{width}}  {r['seconds']:7.3f}  {target:>6}  {r['ok']}")
    out = ROOT / "benchmarks" / "results" / "dashboard.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "run": run_kind,
                "n_stimuli": run.n_stimuli,
                "pairs": len(pairs),
                "set_size": size,
                "machine": {
                    "python": platform.python_version(),
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                    "load_average_1min": os.getloadavg()[0],
                },
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
