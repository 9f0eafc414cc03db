"""Time the dashboard: each page in a real browser beside a bare Streamlit page, what each page
costs the browser, and the lab's new bars after a change of k; plus the server side alone.

Uses the real demo run (``<cache>/runs/demo``) when it is cached, else a synthetic run of 239
coco-mini stimuli with thumbnails (the demo's size); ``--run PATH`` measures any run (e.g. a large
synthetic one). Prints tables and writes benchmarks/results/dashboard.json.

    .venv/bin/python benchmarks/bench_dashboard.py                     # everything
    .venv/bin/python benchmarks/bench_dashboard.py --browser-only --repeats 9
    .venv/bin/python benchmarks/bench_dashboard.py --trace /tmp/traces   # Chromium traces too
    .venv/bin/python benchmarks/bench_dashboard.py --element-costs --repeats 7
    .venv/bin/python benchmarks/bench_dashboard.py --first-visits --repeats 3  # a fresh server
    .venv/bin/python benchmarks/bench_dashboard.py --browser-only --run RUN --lasso-fraction 0.3
    git worktree add /tmp/old HEAD~3        # then old and new pages in the same rounds:
    .venv/bin/python benchmarks/bench_dashboard.py --browser-only --beside /tmp/old --repeats 9
    .venv/bin/python benchmarks/bench_dashboard.py --browser-only --beside /tmp/old \
        --pages "Stimuli gallery,Home" --repeats 13     # only these pages: more rounds, less time

With ``--beside`` each page's two visits of a round are also paired: this checkout's time minus
the other's, its median with a 95 % interval, the rounds in which each was faster and the exact
sign test's p-value, so that a change is called faster only when the rounds say so.

The browser part (issue 18) serves the dashboard as ``make demo`` does and, beside it, a bare
Streamlit page (a title and one line of text, the same ``.streamlit/config.toml``), and opens
each page in a new tab of one headless Chromium (``dashboard/headless.py``), the bare page and
the dashboard's pages interleaved, ``--repeats`` times; every page of the dashboard's one list
(``page.PAGE_URLS``) is visited once first so that the browser's cache holds Streamlit's scripts
for all of them alike (that visit is reported as ``cold s``: the server computed the page's data
then, as for the first user of a new run). A visit ends when the page is
drawn: the script has finished, every visible figure, table and image is drawn and the last
response has arrived (``headless.measure_visit``, timed by the browser's own clock). Machines here
are shared and noisy, so the targets are ratios to the bare page in the same run (each page's
median, its lowest and highest round, and a 95 % interval of its median ratio from the rounds'
order statistics (up to 8 rounds the lowest–highest, hence ``--repeats 9`` or more): the
verdict is "met" when the whole interval is within the target, "not met" when it is all above,
"within noise" when it straddles):

* every page's first visit within ``TARGET_PAGE_RATIO`` (1.5) × the bare page's;
* a change of k in the Alignment lab, from the key press until the new bars are drawn, within
  ``TARGET_K_RATIO`` (1.0) × the bare page's load time.

Each page's cost is reported beside its time: elements, Plotly figures, data tables, images,
bytes the server sent over the websocket, bytes over HTTP, JavaScript the tab loaded, and the
main thread's busy time (of it: running JavaScript). With ``--trace`` one more visit per page is
recorded as a Chromium trace, and its main thread's sampled time is split into the browser's own
work (style, layout, paint), DOM calls, garbage collection and each JavaScript module's self time
(``headless.trace_profile``): where a page's time goes beyond the bare page's.

What one element costs (``--element-costs``): a small multipage app with the dashboard's config,
one page per kind of element (a title, one line and that element), each page's first visit
against the page with only the title and line (the frame), interleaved round by round: the
median extra milliseconds of each kind, and of the renderer's busy time. Streamlit's frontend
loads the code of a kind of element on its first use in a tab, so a page pays once per kind it
shows. Measured on this 2-core machine (9 rounds): a 20-row ``st.dataframe`` ~380 ms, a Plotly
chart ~2 s, the first widget of a kind 60-160 ms, a row of four ``st.metric`` 126 ms against 83
ms for four ``widgets.number_cards``; single rounds vary by ±150 ms, so only the large
differences are firm. This is what decides which elements a page's first screen shows.

The lab's responsiveness per metric (issue 14; ``--lab-only`` runs just this part): for every
metric of the registry, what the lab computes before it draws new bars — the metric on the low
and high sets, on the random sets (drawn as the page draws them by default: until every pair's
95% interval of the mean is 0.02 wide; and, the worst case, all ``--lab-sets`` (200) of them)
and the SVG bars — after a **metric change** (the metric not yet cached; a new seed per repeat, so every
repeat computes) and after a **k change** (the same metric at a new k: neighbour metrics
recompute, feature metrics are a cache hit because k does not enter them). Target: ≤ 300 ms
for the neighbour metrics and CKA (``TARGET_UPDATE_S``); the registry's ``live`` flag is printed
beside it (metrics that are not live run behind a button).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

# the server-side timings call the pages' cached functions outside a Streamlit server, on purpose;
# Streamlit would warn once per cached function ("No runtime found") when data is imported
logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import settings  # noqa: E402
from convergence_core.dashboard import data, headless, lab, state  # noqa: E402
from convergence_core.dashboard import page as dashboard_page  # noqa: E402
from convergence_core.dashboard.page import PAGE_URLS  # noqa: E402
from convergence_core.random_baseline import DEFAULT_INTERVAL_WIDTH  # noqa: E402
from convergence_core.run import load_run  # noqa: E402
from convergence_core.subsets import select_stimuli  # noqa: E402
from tests.page_reading import change_control  # noqa: E402

TARGET_PAGE_RATIO = 1.5
TARGET_K_RATIO = 1.0
TARGET_UPDATE_S = 0.300
TIMEOUT = 300
#: every page (label, URL path), Home first: the dashboard's one list of pages
PAGES = PAGE_URLS
BARE_PAGE = 'import streamlit as st\n\nst.title("A bare page")\nst.text("One line of text.")\n'


def _choose_run(run: str | None) -> tuple[Path, str]:
    if run is not None:
        path = Path(run).resolve()
        if not (path / "manifest.json").is_file():
            raise SystemExit(f"--run {run}: no manifest.json there; give a run folder")
        return path, f"run at {path}"
    demo = settings.runs_root() / "demo"
    if (demo / "manifest.json").is_file():
        return demo, "real demo run"
    from tests.fixtures_runs import make_synthetic_run

    cache = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    make_synthetic_run(cache / "runs", n=239, name="demo")
    return cache / "runs" / "demo", "synthetic run (239 coco-mini stimuli, no real demo cached)"


def _cache_of(run_path: Path) -> Path:
    """The cache folder holding ``run_path`` (``<cache>/runs/<name>``)."""
    return run_path.parent.parent


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _check(at: AppTest) -> AppTest:
    if at.exception:
        raise RuntimeError(f"page raised: {at.exception}")
    return at


# ----------------------------------------------------------------------------------------------
# the browser


def _with_dashboard_config(folder: Path) -> None:
    """Give an app in ``folder`` the dashboard's own ``.streamlit/config.toml``."""
    (folder / ".streamlit").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / ".streamlit" / "config.toml", folder / ".streamlit" / "config.toml")


def _bare_app(folder: Path) -> Path:
    """A bare Streamlit page in ``folder``, served with the dashboard's own config."""
    _with_dashboard_config(folder)
    app = folder / "bare.py"
    app.write_text(BARE_PAGE)
    return app


#: --element-costs: the Python that draws each kind of element on its own page (after a title and
#: one line, the frame every page has); "frame" draws nothing more
ELEMENT_KINDS: dict[str, str] = {
    "frame": "",
    "st.metric ×4": (
        "for i, c in enumerate(st.columns(4)):\n"
        "    c.metric('Low dispersion', '0.4123', delta='+0.2207 vs random' if i == 0 else None)"
    ),
    "widgets.number_cards ×4": (
        "widgets.number_cards([widgets.Card('Low dispersion', '0.4123', "
        "delta='+0.2207 vs random')] + [widgets.Card('Low dispersion', '0.4123')] * 3, key='c')"
    ),
    "st.selectbox": "st.selectbox('Model', ['a', 'b', 'c'])",
    "st.radio": "st.radio('Score', ['mean residual', 'PC1 score'], horizontal=True)",
    "st.segmented_control": "st.segmented_control('Metric', ['CKNNA', 'CKA'], default='CKNNA')",
    "st.pills": "st.pills('Models', ['a', 'b', 'c'], default=['a'], selection_mode='multi')",
    "st.slider": "st.slider('k', 1, 50, 10)",
    "st.number_input": "st.number_input('Set size', 1, 239, 59)",
    "st.checkbox": "st.checkbox('Show all')",
    "st.toggle": "st.toggle('Interactive chart')",
    "st.expander (closed)": "st.expander('Statistics').write('x')",
    "st.tabs ×3": "[t.write('x') for t in st.tabs(['One', 'Two', 'Three'])]",
    "st.popover": "st.popover('Colour').write('x')",
    "st.image (PNG)": "st.image(str(HERE / 'picture.png'))",
    "st.dataframe (20 rows)": "st.dataframe(pd.DataFrame({'a': range(20), 'b': [0.5] * 20}))",
    "st.text ×10": "for i in range(10):\n    st.text(f'Line {i} of plain text.')",
    "st.markdown ×10 (with help)": (
        "for i in range(10):\n    st.markdown(f':small[Label {i}]', help='What it means.')"
    ),
    "controls.row (choice, switch)": (
        "controls.row([controls.choice('score', 'Score', ['mean residual', 'PC1 score'], "
        "'mean residual', key='w_s'), "
        "controls.switch('chart', 'Interactive chart', False, key='w_c')], key='r')"
    ),
    "st.plotly_chart (200 points)": (
        "st.plotly_chart(go.Figure(go.Scattergl(x=list(range(200)), y=list(range(200)), "
        "mode='markers')))"
    ),
}

_ELEMENT_APP_HEAD = """import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

HERE = Path(__file__).parent
sys.path.insert(0, {root!r})
from convergence_core.dashboard import controls, widgets  # noqa: E402
"""


def _element_app(root: Path, only: int | None = None) -> str:
    """The --element-costs app's source: one function per kind (title, line, the element), each
    a page of one st.navigation; with ``only``, that kind's function alone is called (a test runs
    each page so)."""
    parts = [_ELEMENT_APP_HEAD.format(root=str(root))]
    for i, source in enumerate(ELEMENT_KINDS.values()):
        body = "".join(f"    {line}\n" for line in source.splitlines())
        parts.append(
            f"\n\ndef kind{i}():\n    st.title('A page')\n    st.text('One line of text.')\n"
            + body
        )
    pages = ", ".join(
        f"st.Page(kind{i}, title={name!r}, url_path='kind{i}', default={i == 0})"
        for i, name in enumerate(ELEMENT_KINDS)
    )
    last = f"kind{only}()" if only is not None else f"st.navigation([{pages}]).run()"
    parts.append(f"\n\n{last}\n")
    return "".join(parts)


def element_costs(repeats: int) -> list[dict[str, object]]:
    """Per kind of element (:data:`ELEMENT_KINDS`): the median extra time of a page showing it
    over the frame page, visits interleaved round by round (see the module docstring)."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bench-elements-") as folder:
        here = Path(folder)
        _with_dashboard_config(here)
        picture = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(picture).save(here / "picture.png")
        app = here / "elements.py"
        app.write_text(_element_app(ROOT))
        with (
            headless.streamlit_server(app, cwd=here) as (base, _),
            sync_playwright() as playwright,
        ):
            browser = headless.launch_chromium(playwright)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            urls = {name: f"{base}/kind{i}" for i, name in enumerate(ELEMENT_KINDS)}
            for url in urls.values():  # the browser's cache holds every chunk before timing
                headless.measure_visit(context, url)
            visits: dict[str, list[headless.VisitCost]] = {name: [] for name in urls}
            for _ in range(repeats):
                for name, url in urls.items():
                    visits[name].append(headless.measure_visit(context, url))
            browser.close()

    def extra_ms(name: str, field: str) -> list[float]:
        return [
            1000 * (getattr(a, field) - getattr(b, field))
            for a, b in zip(visits[name], visits["frame"], strict=True)
        ]

    rows = []
    for name, measured in visits.items():
        wall, busy = extra_ms(name, "seconds"), extra_ms(name, "main_thread_s")
        rows.append({
            "element": name,
            "seconds_median": round(statistics.median(v.seconds for v in measured), 3),
            "extra_ms_median": round(statistics.median(wall), 1),
            "extra_ms_lowest": round(min(wall), 1),
            "extra_ms_highest": round(max(wall), 1),
            "extra_main_thread_ms_median": round(statistics.median(busy), 1),
        })
    return rows


def median_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """A distribution-free interval for the median of independent ``values`` (one per round):
    the k-th lowest and the k-th highest value, with k the largest whose coverage
    1 − 2·P(Binomial(n, ½) ≤ k − 1) is still at least ``level``. Up to 8 values that is the
    lowest and the highest (k = 1; below 6 values even they cover less than 95 %: the
    coverage returned says how much); from 9 values on, k ≥ 2.

    Returns ``low``, ``high`` and ``coverage``."""
    from scipy.stats import binom

    if not 0 < level < 1:
        raise ValueError(f"level must be a fraction between 0 and 1 (e.g. 0.95), got {level!r}")
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    if not n:
        raise ValueError("need at least one value for an interval of the median")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * float(binom.cdf(k - 1, n, 0.5))

    k = 1
    while 2 * (k + 1) <= n + 1 and coverage(k + 1) >= level:
        k += 1
    return {"low": ordered[k - 1], "high": ordered[n - k], "coverage": coverage(k)}


def round_ratios(page_s: list[float], bare_s: list[float], target: float) -> dict[str, object]:
    """A page's time over the bare page's, round by round (each round visits the bare page and
    every page once, so a busy moment of the machine slows both): the median, the lowest and
    highest round, a 95 % interval of the median (:func:`median_interval`) and a verdict that
    says when the noise decides it.

    ``verdict``: "met" (the whole interval of the median within ``target``), "not met" (the
    whole interval above it) or "within noise" (the interval straddles it: more rounds, or a
    quieter machine, would decide)."""
    if len(page_s) != len(bare_s) or not page_s:
        raise ValueError(
            f"need one bare-page visit per page visit, got {len(page_s)} and {len(bare_s)}"
        )
    ratios = [page / bare for page, bare in zip(page_s, bare_s, strict=True)]
    interval = median_interval(ratios)
    verdict = (
        "met" if interval["high"] <= target
        else "not met" if interval["low"] > target
        else "within noise"
    )
    return {
        "per_round": [round(r, 3) for r in ratios],
        "median": round(statistics.median(ratios), 3),
        "lowest": round(min(ratios), 3),
        "highest": round(max(ratios), 3),
        "median_interval": [round(interval["low"], 3), round(interval["high"], 3)],
        "interval_coverage": round(interval["coverage"], 3),
        "verdict": verdict,
    }


def paired_difference(page_s: Sequence[float], beside_s: Sequence[float]) -> dict[str, object]:
    """This checkout's visit minus the ``--beside`` checkout's, round by round (the two visits
    of a round are back to back, so the machine's busy moments largely cancel): the median
    difference in seconds with its 95 % interval (:func:`median_interval`), the rounds in which
    this checkout was faster and slower, and the exact two-sided sign test's p-value (ties
    left out): how likely so lopsided a split is if neither checkout were faster."""
    from scipy.stats import binomtest

    if len(page_s) != len(beside_s) or not page_s:
        raise ValueError(
            f"need one visit beside per visit, got {len(page_s)} and {len(beside_s)}"
        )
    differences = [a - b for a, b in zip(page_s, beside_s, strict=True)]
    interval = median_interval(differences)
    faster = sum(d < 0 for d in differences)
    slower = sum(d > 0 for d in differences)
    decided = faster + slower
    return {
        "median_s": round(statistics.median(differences), 4),
        "interval_s": [round(interval["low"], 4), round(interval["high"], 4)],
        "interval_coverage": round(interval["coverage"], 3),
        "faster_rounds": faster,
        "slower_rounds": slower,
        "rounds": len(differences),
        "sign_test_p": float(binomtest(faster, decided).pvalue) if decided else 1.0,
    }


BESIDE = " (beside)"


def visits_of_a_round(
    bare_base: str,
    base: str,
    run_query: str,
    beside_base: str | None = None,
    pages: Sequence[str] | None = None,
    beside_first: bool = False,
) -> list[tuple[str, str]]:
    """(label, URL) of one round's visits: the bare page, then every page (``PAGES``, or those
    labelled in ``pages``), each with the same page of the ``--beside`` checkout when one is
    served (label + BESIDE): after it, or before it with ``beside_first`` (the benchmark
    alternates, so that neither checkout always has the second visit of a pair)."""
    urls = [("bare Streamlit page", bare_base + "/")]
    for label, path in PAGES:
        if pages is not None and label not in pages:
            continue
        pair = [(label, f"{base}/{path}{run_query}")]
        if beside_base is not None:
            pair.append((label + BESIDE, f"{beside_base}/{path}{run_query}"))
        urls.extend(reversed(pair) if beside_first else pair)
    return urls


def browser_benchmark(
    run_path: Path,
    repeats: int,
    trace: Path | None,
    lasso_fraction: float = 0.5,
    beside: Path | None = None,
    pages: Sequence[str] | None = None,
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Per page: median seconds, ratio to the bare page, and its costs; and the k step.

    ``beside``: another checkout of this repository (e.g. ``git worktree add /tmp/old REV``),
    whose dashboard is served too and whose pages are visited next to this one's in every
    round (after them, and before them every other round): old and new code measured in one
    run, against the same bare page. ``pages``: only
    the pages with these labels (``PAGES``); the k step needs the Alignment lab among them and
    the lasso the Residual space (each is left out otherwise)."""
    from playwright.sync_api import sync_playwright

    cache = _cache_of(run_path)
    env = {"CONVERGENCE_CACHE": str(cache)}
    run_query = f"?run={run_path.name}"
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as folder:
        bare = _bare_app(Path(folder))
        with contextlib.ExitStack() as servers, sync_playwright() as playwright:
            bare_base, _ = servers.enter_context(headless.streamlit_server(bare, cwd=bare.parent))
            base, _ = servers.enter_context(headless.streamlit_server(None, cwd=ROOT, env=env))
            beside_base = None
            if beside is not None:  # `python -m` there imports that checkout's own package
                beside_base, _ = servers.enter_context(headless.streamlit_server(
                    None, cwd=beside, env={**env, "PYTHONPATH": str(beside)}
                ))
            browser = headless.launch_chromium(playwright)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            urls = visits_of_a_round(bare_base, base, run_query, beside_base, pages)
            # fill the browser's cache and the server's caches alike; these first visits are
            # the cold-server loads (a page's data computed and cached for every later session)
            cold = {label: headless.measure_visit(context, url).seconds for label, url in urls}
            visits: dict[str, list[headless.VisitCost]] = {label: [] for label, _ in urls}
            for round_ in range(repeats):  # with --beside, each checkout goes first in turn
                ordered = visits_of_a_round(bare_base, base, run_query, beside_base, pages,
                                            beside_first=round_ % 2 == 1)
                for label, url in ordered:
                    visits[label].append(headless.measure_visit(context, url))
            wanted = {label for label, _ in urls}
            steps = (_k_steps(context, f"{base}/Alignment_lab{run_query}&k=10", repeats)
                     if "Alignment lab" in wanted else [])
            lasso = (_lasso(context, f"{base}/Residual_space{run_query}", lasso_fraction)
                     if "Residual space" in wanted else {})
            profiles = {} if trace is None else _traces(browser, context, urls, trace)
            browser.close()
    bare_median = statistics.median(v.seconds for v in visits["bare Streamlit page"])
    rows = []
    for label, measured in visits.items():
        seconds = statistics.median(v.seconds for v in measured)
        costs = measured[len(measured) // 2].as_dict()
        ratio = seconds / bare_median
        rows.append(
            {
                "page": label,
                "seconds_median": round(seconds, 3),
                "seconds_all": [round(v.seconds, 3) for v in measured],
                "ratio_to_bare": round(ratio, 2),
                "cold_server_s": round(cold[label], 3),
                "target_ratio": None if label.startswith("bare") else TARGET_PAGE_RATIO,
                "ok": None if label.startswith("bare") else ratio <= TARGET_PAGE_RATIO,
                "rounds": None if label.startswith("bare") else round_ratios(
                    [v.seconds for v in measured],
                    [v.seconds for v in visits["bare Streamlit page"]],
                    TARGET_PAGE_RATIO,
                ),
                "main_thread_s_median": round(
                    statistics.median(v.main_thread_s for v in measured), 3
                ),
                **{
                    name: costs[name]
                    for name in (
                        "elements", "figures", "tables", "images", "widgets",
                        "ws_bytes_received", "ws_messages", "http_bytes", "js_bytes", "requests",
                        "script_s", "layout_s",
                    )
                },
            }
        )
    for row in rows:
        twin = row["page"] + BESIDE
        if twin in visits:
            row["beside_paired"] = paired_difference(
                [v.seconds for v in visits[row["page"]]], [v.seconds for v in visits[twin]]
            )
    if not steps:
        return rows, {"lasso": lasso, "trace_profiles": profiles}
    step_median = statistics.median(steps)
    k_step = {
        "seconds_median": round(step_median, 3),
        "seconds_all": [round(s, 3) for s in steps],
        "ratio_to_bare_load": round(step_median / bare_median, 2),
        "target_ratio": TARGET_K_RATIO,
        "ok": step_median / bare_median <= TARGET_K_RATIO,
        "bare_page_s": round(bare_median, 3),
    }
    return rows, {**k_step, "lasso": lasso, "trace_profiles": profiles}


def _lasso(context, url: str, fraction: float) -> dict[str, float]:  # noqa: ANN001
    """Residual space: seconds until the interactive chart is drawn after its toggle, and a
    lasso over the left ``fraction`` of the map: stimuli selected and seconds until the page
    lists them."""
    page = context.new_page()
    try:
        page.goto(url)
        page.wait_for_function(headless.PAGE_DRAWN, timeout=120_000, polling="raf")
        start = page.evaluate("() => performance.now()")
        page.get_by_text("Interactive chart", exact=False).first.click()
        page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=120_000)
        page.wait_for_function(headless.PAGE_DRAWN, timeout=120_000, polling="raf")
        drawn = (page.evaluate("() => performance.now()") - start) / 1000.0
        selected, seconds = headless.lasso_select(page, fraction)
        return {
            "lasso_fraction": fraction,
            "interactive_chart_s": round(drawn, 3),
            "lasso_selected": selected,
            "lasso_to_selection_s": round(seconds, 3),
        }
    finally:
        page.close()


def _k_steps(context, url: str, repeats: int) -> list[float]:  # noqa: ANN001
    """Seconds per k → k + 1 in the Alignment lab until the new bars are drawn (one tab)."""
    page = context.new_page()
    try:
        page.goto(url)
        page.wait_for_function(headless.PAGE_DRAWN, timeout=120_000, polling="raf")
        headless.time_slider_step(page, "k (nearest neighbours)", lab.BARS_CONTAINER_KEY)  # warm
        return [
            headless.time_slider_step(page, "k (nearest neighbours)", lab.BARS_CONTAINER_KEY)
            for _ in range(repeats)
        ]
    finally:
        page.close()


#: serve's source in a checkout (an older one's warm-up may end without serve.WARM_DONE)
SERVE_SOURCE = Path("convergence_core") / "dashboard" / "serve.py"


def first_visits(
    run_path: Path,
    repeats: int,
    beside: Path | None = None,
    pages: Sequence[str] | None = None,
    warm_timeout_s: float = 600,
) -> list[dict[str, object]]:
    """Each page's first visit on a freshly started server, once ``serve``'s warm-up has said it is
    done (its ``serve.WARM_DONE`` line), and a later visit of the same page on that server: what
    the first visitor of a live demo waits for, against everyone after.

    A round starts each checkout's server in turn (this one's, then ``beside``'s; never both at
    once), waits for the warm-up, visits every page once, then once more. Each checkout keeps
    one port for all its rounds, so the browser's cache, kept per origin, holds Streamlit's
    scripts as a returning presenter's browser does; a first round that only fills that cache is
    not counted. Every other round the checkout beside goes first; the pages are visited in the
    dashboard's order, so Home is always the first page of a server's first session. Returns one
    row per page and checkout: the median of each, the per-round lists and, with ``beside``, the
    paired difference of the first visits (:func:`paired_difference`). The run must be the one
    ``serve`` warms up (the cache's default run)."""
    from playwright.sync_api import sync_playwright

    from convergence_core.dashboard import serve

    if repeats < 1:
        raise ValueError(f"--first-visits needs --repeats 1 or more, got {repeats}")
    cache = _cache_of(run_path)
    warmed = data.default_run_name(data.complete_runs(cache / "runs"))
    if warmed != run_path.name:
        raise SystemExit(
            f"--first-visits: serve warms up the default run of {cache} ({warmed!r}), not "
            f"{run_path.name!r}; measure it in a cache where it is the only run, or named demo"
        )
    env = {"CONVERGENCE_CACHE": str(cache)}
    run_query = f"?run={run_path.name}"
    checkouts = [("", ROOT, {})] + (
        [(BESIDE, beside, {"PYTHONPATH": str(beside)})] if beside is not None else []
    )
    ports: dict[str, int] = {}
    for suffix, _, _ in checkouts:  # one port per checkout, for all its rounds
        while (port := headless.free_port()) in ports.values():
            pass
        ports[suffix] = port
    chosen = [(label, path) for label, path in PAGES if pages is None or label in pages]
    times: dict[str, dict[str, list[float]]] = {
        label + suffix: {"first": [], "again": []}
        for label, _ in chosen
        for suffix, _, _ in checkouts
    }
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="bench-") as folder:
        browser = headless.launch_chromium(playwright)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        for round_ in range(repeats + 1):
            in_turn = reversed(checkouts) if round_ % 2 else checkouts  # each goes first in turn
            for suffix, checkout, extra_env in in_turn:
                log = Path(folder) / f"serve{round_}{len(suffix)}.err"
                with headless.streamlit_server(
                    None, cwd=checkout, env={**env, **extra_env}, port=ports[suffix], stderr=log
                ) as (base, server):
                    source = checkout / SERVE_SOURCE
                    if source.is_file() and "WARM_DONE" in source.read_text():
                        headless.wait_for_line(log, serve.WARM_DONE, warm_timeout_s, server)
                    else:  # an older checkout's serve: its warm-up ends without a last line
                        headless.wait_until_quiet(log, timeout=warm_timeout_s, process=server)
                    for when in ("first", "again"):
                        for label, path in chosen:
                            seconds = headless.measure_visit(
                                context, f"{base}/{path}{run_query}"
                            ).seconds
                            if round_:  # round 0 fills the browser's cache for this origin
                                times[label + suffix][when].append(seconds)
        browser.close()
    rows = []
    for label, measured in times.items():
        row: dict[str, object] = {
            "page": label,
            "first_s_median": round(statistics.median(measured["first"]), 3),
            "again_s_median": round(statistics.median(measured["again"]), 3),
            "first_s_all": [round(t, 3) for t in measured["first"]],
            "again_s_all": [round(t, 3) for t in measured["again"]],
            "first_minus_again": paired_difference(measured["first"], measured["again"]),
        }
        if label + BESIDE in times:
            row["beside_paired"] = paired_difference(
                measured["first"], times[label + BESIDE]["first"]
            )
        rows.append(row)
    return rows


def _paired_line(page: str, p: dict[str, object]) -> str:
    """One printed line of a :func:`paired_difference`: the page, the median difference with its
    interval, the rounds each way and the sign test."""
    tied = p["rounds"] - p["faster_rounds"] - p["slower_rounds"]
    return (
        f"{page:<34} median {p['median_s']:+.3f} s ({p['interval_coverage']:.0%} interval: "
        f"{p['interval_s'][0]:+.3f} to {p['interval_s'][1]:+.3f}); of {p['rounds']} rounds "
        f"{p['faster_rounds']} faster, {p['slower_rounds']} slower, {tied} tied; sign test "
        f"p = {p['sign_test_p']:.3g}"
    )


def _print_first_visits(rows: list[dict[str, object]]) -> None:
    print(f"{'page':<34} {'first s':>7} {'later s':>7} {'first − later (interval)':>30}")
    for r in rows:
        gap = r["first_minus_again"]
        print(f"{r['page']:<34} {r['first_s_median']:7.2f} {r['again_s_median']:7.2f} "
              f"{gap['median_s']:+10.3f} ({gap['interval_s'][0]:+.3f} to "
              f"{gap['interval_s'][1]:+.3f})")
    print("first: a page's first visit on a fresh server after its warm-up said it was done; "
          "later: the same page visited again on that server (medians over the rounds)")
    paired = [r for r in rows if "beside_paired" in r]
    if paired:
        print("\nfirst visits, this checkout minus the one beside, paired round by round")
        for r in paired:
            print(_paired_line(r["page"], r["beside_paired"]))


def _traces(browser, context, urls, folder: Path) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """One Chromium performance trace per page (open them in chrome://tracing or Perfetto), and
    where each one's main-thread time went (``headless.trace_profile``, ms)."""
    folder.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for label, url in urls:
        page = context.new_page()
        name = label.lower().replace(" ", "-")
        browser.start_tracing(
            page=page,
            path=str(folder / f"{name}.json"),
            categories=[
                "devtools.timeline",
                "v8.execute",
                "disabled-by-default-devtools.timeline",
                "disabled-by-default-v8.cpu_profiler",
            ],
        )
        page.goto(url)
        page.wait_for_function(headless.PAGE_DRAWN, timeout=120_000, polling="raf")
        page.wait_for_load_state("networkidle")
        browser.stop_tracing()
        page.close()
        profiles[label] = headless.trace_profile(folder / f"{name}.json")
    return profiles


# ----------------------------------------------------------------------------------------------
# the server alone (AppTest runs the page script as the server does, minus the browser)


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


def server_benchmark(run_path: Path, repeats: int) -> tuple[list[dict[str, object]], dict]:
    """Script times (AppTest) and the lab's numbers alone."""
    import streamlit as st

    from convergence_core.dashboard import charts

    os.environ["CONVERGENCE_CACHE"] = str(_cache_of(run_path))
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

    def home() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
        at.query_params["run"] = run_path.name
        return at

    record(
        "home, fresh process (first script run)",
        _fresh_process_first_run(_cache_of(run_path)),
        None,
        "AppTest in a new Python process: the app's imports and the run's first read",
    )
    st.cache_resource.clear()
    st.cache_data.clear()
    first = home()
    record("home, first session (cold caches)", _timed(lambda: _check(first.run())), None, "")
    warm = [_timed(lambda: _check(home().run())) for _ in range(repeats)]
    record("home, new session (warm caches)", statistics.median(warm), None, "median")
    for page in (entry.file for entry in dashboard_page.PAGES):
        at = home()
        _check(at.run())
        at.switch_page(page)
        record(f"{page}, first visit", _timed(lambda at=at: _check(at.run())), None,
               "first visit in the process (cold caches of that page)")

    run = data.open_run(run_path)
    scores = run.dispersion["mean"].to_numpy(dtype=np.float64)
    best = data.best_language_layers(str(run.path), data.manifest_stamp(run.path))
    pairs = tuple(
        lab.Pair(v, layer, language, best[language])
        for v, layer in zip(run.gpa.models, run.gpa.layers, strict=True)
        for language in run.language_models
    )
    indexes = data.indexes_for(run, pairs)
    size = state.default_subset_size(run.n_stimuli)
    low, high = select_stimuli(scores, "low", size), select_stimuli(scores, "high", size)
    drawn: list[int] = []

    def bars(k: int) -> None:  # what the page computes before it shows the new bars
        values = lab.set_table(indexes, pairs, {"low": low, "high": high}, k)
        baseline = lab.baseline_table(
            indexes, pairs, len(scores), size, k, n_random=200, seed=0,
            interval_width=DEFAULT_INTERVAL_WIDTH,
        )
        drawn.append(int(baseline["n_random"].iloc[0]))
        charts.alignment_bars(values, baseline, "cknna")

    bars(10)  # warm numpy, scipy and matplotlib
    times = [_timed(lambda k=k: bars(k)) for k in range(5, 5 + repeats)]
    record(
        f"new bars for a new k ({len(pairs)} pairs, sets of {size})",
        statistics.median(times),
        TARGET_UPDATE_S,
        f"set CKNNA + random baseline to a {DEFAULT_INTERVAL_WIDTH}-wide interval "
        f"({drawn[-1]} sets) + PNG, median",
    )

    def permutation(k: int) -> None:
        lab.low_high_permutation_table(indexes, pairs, low, high, k, n_permutations=200, seed=0)

    times = [_timed(lambda k=k: permutation(k)) for k in range(5, 5 + repeats)]
    record("low-vs-high permutation test for a new k", statistics.median(times), None,
           "200 shuffles = 400 subsets; computed when its expander is open")

    at = home()
    _check(at.run())
    at.switch_page("pages/3_Alignment_lab.py")
    _check(at.run())
    k_times, size_times = [], []
    for step in range(repeats):  # as the browser's row of controls changes them (controls.row)
        k_times.append(_timed(lambda step=step: _check(change_control(at, "k", 3 + step))))
        size_times.append(_timed(
            lambda step=step: _check(change_control(at, "size", size - 1 - step))))
    record("lab page, rerun after changing k", statistics.median(k_times), None,
           "median, uncached k (the whole script under AppTest; in a browser only the fragment)")
    record("lab page, rerun after changing the set size", statistics.median(size_times), None,
           "median, uncached size")
    return rows, {"pairs": len(pairs), "set_size": size}


# ----------------------------------------------------------------------------------------------
# the lab per metric (issue 14)


def lab_benchmark(
    run_path: Path, repeats: int, n_sets: int, metrics: list[str] | None = None
) -> tuple[list[dict[str, object]], dict]:
    """Per registry metric (or those in ``metrics``): seconds from a metric change and from a k
    change to new bars."""
    import streamlit as st

    from convergence_core.metrics import metric as registry_entry
    from convergence_core.metrics import metric_names

    os.environ["CONVERGENCE_CACHE"] = str(_cache_of(run_path))
    st.cache_data.clear()
    run = data.open_run(run_path)
    path, stamp = str(run.path), data.manifest_stamp(run.path)
    scores = run.dispersion["mean"].to_numpy(dtype=np.float64)
    best = data.best_language_layers(path, stamp)
    pairs = tuple(
        lab.Pair(v, layer, language, best[language])
        for v, layer in zip(run.gpa.models, run.gpa.layers, strict=True)
        for language in run.language_models
    )
    data.indexes_for(run, pairs)  # memory maps opened once, as on a warm server
    size = state.default_subset_size(run.n_stimuli)
    names = ("low", "high")
    sets = (select_stimuli(scores, "low", size), select_stimuli(scores, "high", size))

    drawn: list[int] = []

    def bars(metric: str, k: int, seed: int, width: float | None) -> None:  # the page's calls
        values = data.set_values(path, stamp, pairs, names, sets, k, metric)
        baseline = data.random_baseline(
            path, stamp, pairs, size, k, n_sets, seed, width, metric
        )
        drawn.append(int(baseline["n_random"].max()))
        data.alignment_bars_svg(values, baseline, metric)

    bars("cknna", 9, 10_000, None)  # warm numpy, scipy, matplotlib and the memory maps
    rows = []
    # the page's default (random sets drawn until every pair's 95% interval of the mean is
    # DEFAULT_INTERVAL_WIDTH wide, at most n_sets) and the worst case (all n_sets, no stopping)
    baselines = ((f"interval {DEFAULT_INTERVAL_WIDTH}", DEFAULT_INTERVAL_WIDTH),
                 (f"{n_sets} fixed", None))
    for metric in metrics or metric_names():
        entry = registry_entry(metric)
        for label, width in baselines:
            drawn.clear()
            change = [_timed(lambda m=metric, r=r, w=width: bars(m, 10, r, w))
                      for r in range(repeats)]
            change_sets = list(drawn)
            drawn.clear()
            k_step = [_timed(lambda m=metric, r=r, w=width: bars(m, 11 + r, 0, w))
                      for r in range(repeats)]
            for what, times, sets_drawn in (("metric change", change, change_sets),
                                            ("k change", k_step, list(drawn))):
                seconds = statistics.median(times)
                budget = entry.neighbour_metric or metric in ("cka", "unbiased_cka")
                rows.append(
                    {
                        "metric": metric,
                        "change": what,
                        "baseline": label,
                        "random_sets": int(statistics.median(sets_drawn)),
                        "seconds": round(seconds, 4),
                        "seconds_min": round(min(times), 4),
                        "target_s": TARGET_UPDATE_S if budget else None,
                        "ok": (seconds <= TARGET_UPDATE_S) if budget else None,
                        "registry_live": entry.live,
                        "neighbour_metric": entry.neighbour_metric,
                    }
                )
    facts = {"pairs": len(pairs), "set_size": size, "random_sets": n_sets, "repeats": repeats,
             "n_stimuli": run.n_stimuli, "interval_width": DEFAULT_INTERVAL_WIDTH}
    return rows, facts


def _print_lab(rows: list[dict[str, object]], facts: dict) -> None:
    print(
        f"\nAlignment lab per metric: {facts['pairs']} pairs, low/high sets of "
        f"{facts['set_size']}, random sets until a 95% interval of {facts['interval_width']} "
        f"(the page's default, at most {facts['random_sets']}) or {facts['random_sets']} fixed, "
        f"median of {facts['repeats']}"
    )
    print(f"{'metric':<18} {'change':<14} {'baseline':<14} {'sets':>5} {'s':>7} {'min s':>7} "
          f"{'target':>6} {'ok':>5} {'live':>5}")
    for r in rows:
        target = "" if r["target_s"] is None else f"{r['target_s']:.3f}"
        ok = "" if r["ok"] is None else str(r["ok"])
        print(f"{r['metric']:<18} {r['change']:<14} {r['baseline']:<14} {r['random_sets']:>5} "
              f"{r['seconds']:7.3f} {r['seconds_min']:7.3f} {target:>6} {ok:>5} "
              f"{str(r['registry_live']):>5}")


# ----------------------------------------------------------------------------------------------


def _print_browser(rows: list[dict[str, object]], k_step: dict[str, object]) -> None:
    header = (
        f"{'page':<34} {'s':>6} {'×bare':>6} {'ok':>5} {'cold s':>6} {'elements':>8} {'figs':>4} "
        f"{'tables':>6} {'imgs':>4} {'ws kB':>7} {'http kB':>8} {'JS MB':>6} {'main s':>6} "
        f"{'JS s':>5}"
        f"  {'rounds ×bare':>12} {'median in':>11} verdict"
    )
    print(header)
    for r in rows:
        print(
            f"{r['page']:<34} {r['seconds_median']:6.2f} {r['ratio_to_bare']:6.2f} "
            f"{'' if r['ok'] is None else str(r['ok']):>5} {r['cold_server_s']:6.2f} "
            f"{r['elements']:8d} {r['figures']:4d} "
            f"{r['tables']:6d} {r['images']:4d} {r['ws_bytes_received'] / 1e3:7.1f} "
            f"{r['http_bytes'] / 1e3:8.1f} {r['js_bytes'] / 1e6:6.2f} "
            f"{r['main_thread_s_median']:6.2f} {r['script_s']:5.2f}"
            + (
                ""
                if r["ok"] is None
                else f"  {r['rounds']['lowest']:5.2f}–{r['rounds']['highest']:<6.2f}"
                f" {r['rounds']['median_interval'][0]:5.2f}–"
                f"{r['rounds']['median_interval'][1]:<5.2f} {r['rounds']['verdict']}"
            )
        )
    coverage = min(
        (r["rounds"]["interval_coverage"] for r in rows if r["rounds"] is not None), default=None
    )
    print(
        "rounds: each round visits the bare page and every page once; lowest–highest ratio "
        "over the rounds, and an interval of the median ratio from the rounds' order statistics"
        + ("" if coverage is None else f" (it holds the median with {coverage:.0%} confidence; "
           "up to 8 rounds it is the lowest–highest, from 9 rounds on narrower)")
        + f". Verdict against {TARGET_PAGE_RATIO}×: met (the whole interval within it), not met "
        "(the whole interval above it) or within noise (it straddles)."
    )
    paired = [r for r in rows if "beside_paired" in r]
    if paired:
        print("\nthis checkout minus the one beside, paired round by round "
              "(negative: this checkout is faster)")
        for r in paired:
            print(_paired_line(r["page"], r["beside_paired"]))
    if "seconds_median" in k_step:  # the Alignment lab was measured
        print(
            f"k change in the Alignment lab until the new bars are drawn: "
            f"{k_step['seconds_median']:.2f} s = {k_step['ratio_to_bare_load']:.2f} × the bare "
            f"page's load ({k_step['bare_page_s']:.2f} s); target ≤ {TARGET_K_RATIO} ×: "
            f"{k_step['ok']}"
        )
    profiles = k_step["trace_profiles"]
    if profiles:  # --trace: one traced visit per page
        print("\nwhere a traced visit's main-thread time went "
              "(ms; JavaScript: self time per module)")
        for page, profile in profiles.items():
            modules = [
                (name, ms) for name, ms in profile.items()
                if name not in headless.TRACE_OTHER_BUCKETS
            ][:5]
            print(
                f"{page:<34} busy {profile.get('busy', 0):5.0f}  "
                f"native {profile.get('native', 0):4.0f}  "
                f"DOM calls {profile.get('browser API', 0):4.0f}  "
                f"gc {profile.get('gc', 0):3.0f}  "
                + ", ".join(f"{name} {ms:.0f}" for name, ms in modules)
            )
    lasso = k_step["lasso"]
    if lasso:  # the Residual space was measured
        print(
            f"Residual space: interactive chart drawn {lasso['interactive_chart_s']:.2f} s after "
            f"its toggle; a lasso over the left {lasso['lasso_fraction']:.0%} of the map selected "
            f"{lasso['lasso_selected']:,} stimuli, listed "
            f"{lasso['lasso_to_selection_s']:.2f} s after the mouse was released"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", help="a run folder to measure (default: the demo run)")
    parser.add_argument("--browser-only", action="store_true", help="skip the server-side part")
    parser.add_argument("--server-only", action="store_true", help="skip the browser part")
    parser.add_argument("--lab-only", action="store_true",
                        help="only the lab's per-metric responsiveness (no browser, no AppTest)")
    parser.add_argument("--lab-sets", type=int, default=200,
                        help="random sets per baseline in the per-metric lab timings (200)")
    parser.add_argument("--lab-metrics",
                        help="comma-separated registry metrics for the lab timings (default: all; "
                        "'cknna' keeps a 100,000-stimulus run to minutes)")
    parser.add_argument("--trace", type=Path, help="write a Chromium trace per page here")
    parser.add_argument("--lasso-fraction", type=float, default=0.5,
                        help="the lasso covers this left share of the residual map (0.5; pick "
                        "one that selects ~10,000 of a 100,000-stimulus run)")
    parser.add_argument("--element-costs", action="store_true",
                        help="only what one element of each kind costs a page's first visit")
    parser.add_argument("--first-visits", action="store_true",
                        help="only each page's first visit on a fresh server after its warm-up, "
                        "beside a later visit (with --beside: both checkouts' servers in turn)")
    parser.add_argument("--beside", type=Path,
                        help="another checkout of this repository (e.g. a git worktree of an "
                        "older commit) whose pages are measured in the same rounds")
    parser.add_argument("--pages", help="comma-separated page labels to measure (default: all: "
                        + ", ".join(label for label, _ in PAGES) + ")")
    parser.add_argument("--out", default="dashboard.json", help="file name in benchmarks/results")
    args = parser.parse_args()
    if args.beside is not None and not (args.beside / "convergence_core" / "dashboard").is_dir():
        raise SystemExit(f"--beside {args.beside}: not a checkout of this repository (no "
                         "convergence_core/dashboard); make one with `git worktree add PATH REV`")
    pages = None if args.pages is None else [p.strip() for p in args.pages.split(",")]
    unknown = sorted(set(pages or ()) - {label for label, _ in PAGES})
    if unknown:
        raise SystemExit(f"--pages: no page labelled {', '.join(map(repr, unknown))}; the pages "
                         f"are {', '.join(label for label, _ in PAGES)}")
    if args.element_costs:
        rows = element_costs(args.repeats)
        print(f"{'element (one page each)':<30} {'page s':>7} {'extra ms':>9} {'rounds':>14} "
              f"{'main thread ms':>15}")
        for r in rows:
            rounds = f"{r['extra_ms_lowest']:.0f} to {r['extra_ms_highest']:.0f}"
            print(f"{r['element']:<30} {r['seconds_median']:7.3f} {r['extra_ms_median']:9.1f} "
                  f"{rounds:>14} {r['extra_main_thread_ms_median']:15.1f}")
        print("extra ms: a page's first visit minus the frame page's in the same round (median, "
              "lowest and highest round); main thread: the same for the renderer's busy time")
        write_results(args.out, {"repeats": args.repeats, "machine": machine(),
                                 "element_costs": rows})
        return
    run_path, run_kind = _choose_run(args.run)
    if args.first_visits:
        rows = first_visits(run_path, args.repeats, args.beside, pages)
        _print_first_visits(rows)
        write_results(args.out, {"run": run_kind, "repeats": args.repeats, "machine": machine(),
                                 "first_visits": rows})
        return
    run = load_run(run_path)
    payload: dict[str, object] = {
        "run": run_kind,
        "n_stimuli": run.n_stimuli,
        "repeats": args.repeats,
        "machine": machine(),  # its load average: at the start
    }
    print(f"run: {run_kind} ({run.n_stimuli} stimuli) at {run_path}")
    if not args.server_only and not args.lab_only:
        if not headless.CHROMIUM.exists():
            raise SystemExit(f"{headless.CHROMIUM} is missing: install Debian's chromium")
        rows, k_step = browser_benchmark(
            run_path, args.repeats, args.trace, args.lasso_fraction, args.beside, pages
        )
        payload["browser"] = {"pages": rows, "k_step": k_step,
                              "targets": {"page_ratio": TARGET_PAGE_RATIO,
                                          "k_step_ratio": TARGET_K_RATIO}}
        _print_browser(rows, k_step)
    if not args.browser_only:
        rows, facts = lab_benchmark(run_path, args.repeats, args.lab_sets,
                                    args.lab_metrics.split(",") if args.lab_metrics else None)
        payload["lab_metrics"] = {"results": rows, **facts, "target_s": TARGET_UPDATE_S}
        _print_lab(rows, facts)
    if not args.browser_only and not args.lab_only:
        rows, facts = server_benchmark(run_path, args.repeats)
        payload["server"] = {"results": rows, **facts}
        width = max(len(str(r["measure"])) for r in rows)
        print(f"\n{'server side (AppTest)':<{width}}  seconds  target  ok")
        for r in rows:
            target = "" if r["target_s"] is None else f"{r['target_s']:.3f}"
            print(f"{r['measure']:<{width}}  {r['seconds']:7.3f}  {target:>6}  {r['ok']}")
    payload["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    print(
        f"machine: {os.cpu_count()} CPUs, load average "
        f"{payload['machine']['load_average_1min']:.1f}"
        f" → {os.getloadavg()[0]:.1f} (other jobs slow every number; compare the ratios)"
    )
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
