"""Driving the dashboard in headless Chromium on a machine whose network is closed, and measuring
what a page costs there.

Used by the end-to-end test and the dashboard benchmark. Playwright cannot download its own
browser here, so Debian's ``/usr/bin/chromium`` is launched; without the background-networking
flags it keeps opening connections that the closed network refuses, which slows every page.

:func:`measure_visit` opens a URL in a new tab and reports, from the browser's own clocks, when the
page was complete (script finished, every visible figure, table and image drawn, no request in
flight) and what it cost: elements, figures, tables, images, bytes over the websocket and over
HTTP, and the main thread's busy time (Chromium's ``Performance.getMetrics``).
:func:`trace_profile` says where a recorded Chromium trace's main-thread time went: the
browser's own work, garbage collection and each JavaScript module's functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: Debian's Chromium (``apt-get install chromium``; .ci/run installs it)
CHROMIUM = Path("/usr/bin/chromium")

#: launch flags for a root, headless, offline Chromium
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # the full browser's omnibox popup is a WebUI page: in a new tab it may start a renderer that
    # burns ~0.5-3 s of CPU beside the page being measured
    "--disable-features=WebUIOmniboxPopup,WebUIOmniboxFullPopup,WebUIOmniboxAimPopup",
]

#: JavaScript predicate: Streamlit has finished running the page's script
SCRIPT_FINISHED = (
    "() => document.querySelector('[data-testid=\"stApp\"]')"
    "?.getAttribute('data-test-script-state') === 'notRunning'"
)

#: JavaScript: every image of the page, ``st.image``'s and those inside components' shadow roots
#: (``gallery.show``'s cards)
_PAGE_IMAGES = """() => [
  ...document.querySelectorAll('[data-testid="stImage"] img'),
  ...[...document.querySelectorAll('[data-testid^="stBidiComponent"]')].flatMap(
    (host) => [...(host.shadowRoot ?? host).querySelectorAll('img')]),
]"""

#: JavaScript predicate: the page is drawn — the script has finished (and has sent its title),
#: every visible Plotly chart has its SVG, every visible table its canvas, every component has
#: drawn (its code marks an element ``data-drawn``: ``gallery.GALLERY_JS``), every visible image
#: (:data:`_PAGE_IMAGES`) is decoded and no skeleton or spinner is left. The first time it
#: holds, ``window.__drawnAt`` is set to ``performance.now()`` (ms since the navigation started).
PAGE_DRAWN = """() => {
  const PAGE_IMAGES = """ + "(" + _PAGE_IMAGES + ")" + """;
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
  if (!document.querySelector('h1')) return false;
  const visible = (node) => node.offsetParent !== null;
  for (const chart of document.querySelectorAll('[data-testid="stPlotlyChart"]')) {
    if (visible(chart) && !chart.querySelector('.main-svg')) return false;
  }
  for (const table of document.querySelectorAll('[data-testid="stDataFrame"]')) {
    if (visible(table) && !table.querySelector('canvas')) return false;
  }
  for (const host of document.querySelectorAll('[data-testid^="stBidiComponent"]')) {
    if (!(host.shadowRoot ?? host).querySelector('[data-drawn]')) return false;
  }
  for (const image of PAGE_IMAGES()) {
    if (visible(image) && !(image.complete && image.naturalWidth > 0)) return false;
  }
  if (document.querySelector('[data-testid="stSkeleton"], [data-testid="stSpinner"]')) return false;
  if (window.__drawnAt === undefined) window.__drawnAt = performance.now();
  return true;
}"""

#: JavaScript: the visible elements of the page's main area whose content is cut off sideways
#: (wider than their box, which clips it or hides it behind a scroll bar): a label that does not
#: fit its column, a row of pills wider than the page, a table with columns out of sight, the page
#: itself scrolling sideways because something in it is too wide, and the same inside
#: components' shadow roots (the gallery's cards). Returns each as "<Streamlit element>: <its
#: text, 80 characters>".
CLIPPED_CONTENT = """() => {
  const main = [...document.querySelectorAll('[data-testid="stMain"], [data-testid="stMain"] *')];
  // and what components draw in their shadow roots (the gallery's cards), named by their host
  const inside = main.filter((e) => e.shadowRoot).flatMap(
    (host) => [...host.shadowRoot.querySelectorAll('*')].map((e) => [e, host]));
  return [...main.map((e) => [e, e]), ...inside]
    .filter(([e]) => e.clientWidth > 5 && e.scrollWidth > e.clientWidth + 2
      && getComputedStyle(e).overflowX !== 'visible')
    .map(([e, anchor]) => {
      const owner = anchor.closest('[data-testid^="st"]:not([data-testid="stMain"])');
      const kind = owner ? owner.getAttribute('data-testid') : e.tagName;
      return `${kind}: ${(e.innerText || '').replace(/\\s+/g, ' ').slice(0, 80)}`;
    });
}"""

#: JavaScript: what the drawn page holds and what its resources cost (bytes from the Resource
#: Timing entries of this tab, same origin so the sizes are exposed).
_PAGE_COSTS = """() => {
  const count = (selector) => document.querySelectorAll(selector).length;
  const entries = performance.getEntriesByType('resource');
  const navigation = performance.getEntriesByType('navigation')[0];
  let http = navigation ? navigation.transferSize : 0, js = 0, lastEnd = 0;
  for (const e of entries) {
    http += e.transferSize;
    if (e.name.endsWith('.js') || e.initiatorType === 'script') js += e.decodedBodySize;
    lastEnd = Math.max(lastEnd, e.responseEnd);
  }
  return {
    drawn_ms: window.__drawnAt ?? null,
    title_ms: window.__titleAt ?? null,
    last_response_ms: lastEnd,
    elements: count('[data-testid="stElementContainer"]'),
    figures: count('[data-testid="stPlotlyChart"]'),
    tables: count('[data-testid="stDataFrame"]') + count('[data-testid="stTable"]'),
    images: (""" + _PAGE_IMAGES + """)().length,
    widgets: ['input', 'button', 'textarea'].reduce(
      (total, tag) => total + count(`[data-testid="stElementContainer"] ${tag}`), 0)
      + [...document.querySelectorAll('[data-testid^="stBidiComponent"]')].reduce(
        (total, host) => total + (host.shadowRoot ?? host).querySelectorAll('button').length, 0),
    http_bytes: http,
    js_bytes: js,
    requests: entries.length,
  };
}"""

#: JavaScript run in every new tab before the page's own scripts: notes when the title appears
_WATCH_TITLE = """
new MutationObserver((_, observer) => {
  if (document.querySelector('h1')) { window.__titleAt = performance.now(); observer.disconnect(); }
}).observe(document, {childList: true, subtree: true});
"""


def launch_chromium(playwright):  # noqa: ANN001, ANN201 - playwright's own types
    """A headless Chromium browser from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@dataclass
class VisitCost:
    """One page visit in a new tab, timed by the browser (seconds from the navigation's start).

    ``seconds``: until the page is drawn (:data:`PAGE_DRAWN`) and its last response has arrived;
    ``title_seconds``: until the title was shown. ``ws_bytes_received`` / ``ws_messages``: what
    the server sent over the websocket; ``http_bytes``: transferred over HTTP (HTML, scripts,
    images, fonts; 0 for what the browser's cache served); ``main_thread_s``: the renderer's busy
    time (task duration), ``script_s`` of it running JavaScript, ``layout_s`` style and layout.
    """

    url: str
    seconds: float
    title_seconds: float | None
    elements: int
    figures: int
    tables: int
    images: int
    widgets: int
    ws_bytes_received: int
    ws_messages: int
    http_bytes: int
    js_bytes: int
    requests: int
    main_thread_s: float
    script_s: float
    layout_s: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _payload_size(payload: str | bytes) -> int:
    return len(payload.encode("utf-8")) if isinstance(payload, str) else len(payload)


def measure_visit(context, url: str, *, timeout_ms: int = 120_000) -> VisitCost:  # noqa: ANN001
    """Open ``url`` in a new tab of the browser ``context``, wait until it is drawn, close the tab.

    The tab stays open only for this visit; the context's HTTP cache is shared between visits, as
    in a browser the user already has open.
    """
    page = context.new_page()
    try:
        page.add_init_script(_WATCH_TITLE)
        frames = {"bytes": 0, "messages": 0}

        def on_websocket(websocket) -> None:  # noqa: ANN001
            def received(payload: str | bytes) -> None:
                frames["bytes"] += _payload_size(payload)
                frames["messages"] += 1

            websocket.on("framereceived", received)

        page.on("websocket", on_websocket)
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        page.goto(url, wait_until="commit", timeout=timeout_ms)
        page.wait_for_function(PAGE_DRAWN, timeout=timeout_ms, polling="raf")
        # the last image or script chunk may still be arriving: wait for the network to settle
        page.wait_for_load_state("networkidle", timeout=timeout_ms)
        costs = page.evaluate(_PAGE_COSTS)
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        end_ms = max(costs["drawn_ms"] or 0.0, costs["last_response_ms"] or 0.0)
        return VisitCost(
            url=url,
            seconds=end_ms / 1000.0,
            title_seconds=None if costs["title_ms"] is None else costs["title_ms"] / 1000.0,
            elements=int(costs["elements"]),
            figures=int(costs["figures"]),
            tables=int(costs["tables"]),
            images=int(costs["images"]),
            widgets=int(costs["widgets"]),
            ws_bytes_received=frames["bytes"],
            ws_messages=frames["messages"],
            http_bytes=int(costs["http_bytes"]),
            js_bytes=int(costs["js_bytes"]),
            requests=int(costs["requests"]),
            main_thread_s=float(metrics.get("TaskDuration", 0.0)),
            script_s=float(metrics.get("ScriptDuration", 0.0)),
            layout_s=float(
                metrics.get("LayoutDuration", 0.0) + metrics.get("RecalcStyleDuration", 0.0)
            ),
        )
    finally:
        page.close()


#: JavaScript: the ``src`` of the first image inside the element with CSS class ``%s``
_IMAGE_SOURCE = "() => document.querySelector('.%s img')?.getAttribute('src') ?? null"


def time_slider_step(  # noqa: ANN001 - playwright's own types
    page, label: str, image_key: str, *, timeout_ms: int = 60_000
) -> float:
    """Seconds from pressing → on the slider labelled ``label`` (a native slider of a row of
    controls, ``controls.row``, or Streamlit's) until the image in the container keyed
    ``image_key`` (``st.container(key=...)``) is a new, loaded picture: the time a user waits for
    new bars, by the browser's clock."""
    before = page.evaluate(_IMAGE_SOURCE % f"st-key-{image_key}")
    native = page.get_by_role("slider", name=label, exact=True)
    slider = native.first if native.count() else (
        page.locator('[data-testid="stSlider"]')
        .filter(has_text=label)
        .locator('input[type="range"]')
        .first
    )
    slider.focus()
    start = page.evaluate("() => performance.now()")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        """([selector, before]) => {
          const image = document.querySelector(selector);
          const ready = image !== null && image.getAttribute('src') !== before
            && image.complete && image.naturalWidth > 0;
          if (ready && window.__stepAt === undefined) window.__stepAt = performance.now();
          return ready;
        }""",
        arg=[f".st-key-{image_key} img", before],
        timeout=timeout_ms,
        polling="raf",
    )
    end = page.evaluate(
        "() => { const t = window.__stepAt; window.__stepAt = undefined; return t; }"
    )
    return (end - start) / 1000.0


def lasso_select(  # noqa: ANN001 - playwright's own types
    page, fraction: float = 0.5, *, timeout_ms: int = 120_000
) -> tuple[int, float]:
    """Draw a lasso over the left ``fraction`` of the interactive residual-space chart (already
    shown) and wait until the page lists the selection. Returns ``(stimuli selected, seconds from
    releasing the mouse until the page says so)``, by the browser's clock."""
    import re

    plot = page.locator('[data-testid="stPlotlyChart"] .nsewdrag').first
    box = plot.bounding_box()
    if box is None:
        raise AssertionError("no interactive chart to draw a lasso on")
    left, top = box["x"] + 2, box["y"] + 2
    right = box["x"] + 2 + (box["width"] - 4) * fraction
    bottom = box["y"] + box["height"] - 2
    page.evaluate("() => { window.__lassoText = document.body.innerText; }")
    page.mouse.move(left, top)
    page.mouse.down()
    for x, y in ((right, top), (right, bottom), (left, bottom), (left, top + 4)):
        page.mouse.move(x, y, steps=10)
    start = page.evaluate("() => performance.now()")
    page.mouse.up()
    page.wait_for_function(
        """() => {
          const found = /(\\d[\\d,]*) stimuli selected \\(from /.test(document.body.innerText);
          if (found && window.__lassoAt === undefined) window.__lassoAt = performance.now();
          return found;
        }""",
        timeout=timeout_ms,
        polling="raf",
    )
    end = page.evaluate("() => window.__lassoAt")
    text = page.inner_text("body")
    count = int(re.search(r"(\d[\d,]*) stimuli selected \(from ", text).group(1).replace(",", ""))
    return count, (end - start) / 1000.0


# ----------------------------------------------------------------------------------------------
# a server to measure


#: a bundled script's file name: ``name.<content hash>.js`` (``react-dom.Dzbslgj4.js``)
_HASHED_SCRIPT = re.compile(r"^(?P<name>.+?)\.[A-Za-z0-9_-]{6,}\.js$")
#: the sampler's pseudo-functions (no script): what they stand for
_SAMPLER_NODES = {"(idle)": "idle", "(program)": "native", "(garbage collector)": "gc"}
#: the buckets of :func:`trace_profile` that are not a JavaScript module, and its two sums
TRACE_OTHER_BUCKETS = (*_SAMPLER_NODES.values(), "browser API", "total", "busy")


def _module_of(function: str, url: str) -> str:
    """The bucket of one sampled function: a pseudo-function's meaning, else its script's name
    without hash or query (``browser API`` for functions without a script, e.g. appendChild)."""
    if function in _SAMPLER_NODES:
        return _SAMPLER_NODES[function]
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not name:
        return "browser API"
    match = _HASHED_SCRIPT.match(name)
    return match.group("name") if match else name


def trace_profile(path: str | os.PathLike[str]) -> dict[str, float]:
    """Where the sampled time of a Chromium trace's busiest thread went, in milliseconds.

    Reads the CPU profile a trace with the ``disabled-by-default-v8.cpu_profiler`` category holds
    (``ProfileChunk`` events: call-tree nodes, the sampled node per tick and the time since the
    previous tick) and sums each sample's time by its function's bucket: ``idle``, ``native`` (the
    browser's own work between scripts: style, layout, paint, parsing), ``gc``, ``browser API``
    (functions without a script, such as DOM calls) and per script its name without the content
    hash (``react-dom``, ``StreamlitMarkdown``, ...): the functions' self time. Of several
    profiles (one per thread that ran JavaScript) the one with the most sampled time is kept.

    Returns:
        ``{bucket: ms}``, largest first, plus ``"total"`` (every sample) and ``"busy"`` (total
        minus idle); empty when the trace holds no CPU profile.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    events = data["traceEvents"] if isinstance(data, dict) else data
    nodes: dict[str, dict[int, str]] = {}
    times: dict[str, Counter[int]] = {}
    for event in events:
        if event.get("name") != "ProfileChunk":
            continue
        profile = f"{event.get('pid')}:{event.get('id')}"
        chunk = event.get("args", {}).get("data", {})
        cpu = chunk.get("cpuProfile", {})
        known = nodes.setdefault(profile, {})
        for node in cpu.get("nodes", []):
            frame = node.get("callFrame", {})
            known[node["id"]] = _module_of(frame.get("functionName") or "", frame.get("url", ""))
        counter = times.setdefault(profile, Counter())
        for sample, delta in zip(cpu.get("samples", []), chunk.get("timeDeltas", [])):
            counter[sample] += max(int(delta), 0)
    if not times:
        return {}
    profile = max(times, key=lambda key: sum(times[key].values()))
    buckets: Counter[str] = Counter()
    for node, microseconds in times[profile].items():
        buckets[nodes[profile].get(node, "unknown")] += microseconds
    out = {name: value / 1000.0 for name, value in buckets.most_common()}
    total = sum(out.values())
    return {**out, "total": total, "busy": total - out.get("idle", 0.0)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_healthy(base: str, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    """Wait until ``base``/_stcore/health answers ``ok``; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited early with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{base} not healthy after {timeout} s")


@contextlib.contextmanager
def streamlit_server(
    app: str | os.PathLike[str] | None,
    *,
    cwd: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
    port: int | None = None,
    stderr: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A headless Streamlit server on a local port (``port``, else a free one), stopped on exit;
    yields (base URL, process).

    ``app=None`` serves the dashboard as ``make demo`` does (``python -m
    convergence_core.dashboard.serve``); a path serves that script with ``streamlit run``.
    ``stderr``: a file the server's standard error is written to (e.g. to wait for ``serve``'s
    warm-up), else it is dropped.
    """
    port = free_port() if port is None else int(port)
    if app is None:
        command = [sys.executable, "-m", "convergence_core.dashboard.serve"]
    else:
        command = [sys.executable, "-m", "streamlit", "run", str(app)]
    command += [
        "--server.port", str(port),
        "--server.address", "localhost",
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        *extra,
    ]
    with contextlib.ExitStack() as closing:
        errors = None if stderr is None else closing.enter_context(open(stderr, "wb"))
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if errors is None else errors,
            start_new_session=True,
        )
        base = f"http://localhost:{port}"
        try:
            wait_healthy(base, process)
            yield base, process
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _check_running(process: subprocess.Popen | None, path: str | os.PathLike[str]) -> None:
    if process is not None and process.poll() is not None:
        raise AssertionError(
            f"the server exited with {process.returncode} while it was awaited; its stderr: "
            f"{path}"
        )


def wait_until_quiet(
    path: str | os.PathLike[str],
    quiet: float = 30.0,
    timeout: float = 300,
    process: subprocess.Popen | None = None,
) -> None:
    """Wait until the text file ``path`` (a server's stderr) has not grown for ``quiet`` s: for a
    server that says nothing when it is done (an older ``serve`` without its warm-up's last
    line; its steps are silent while they run, up to ~20 s each at 100,000 stimuli, hence the
    default). TimeoutError after ``timeout`` s; AssertionError if ``process`` exits."""
    deadline = time.monotonic() + timeout
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        _check_running(process, path)
        now = Path(path).stat().st_size if Path(path).exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} still growing after {timeout} s")


def wait_for_line(
    path: str | os.PathLike[str],
    start: str,
    timeout: float = 300,
    process: subprocess.Popen | None = None,
) -> str:
    """The first line of the text file ``path`` (a server's stderr, growing) that starts with
    ``start``, once it is there; TimeoutError after ``timeout`` s naming the file's last line;
    AssertionError if ``process`` (the server) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        _check_running(process, path)
        text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
        for line in text.splitlines():
            if line.startswith(start):
                return line
        if time.monotonic() > deadline:
            last = text.strip().splitlines()[-1:] or ["(nothing written)"]
            raise TimeoutError(
                f"no line starting {start!r} in {path} after {timeout} s; its last line: "
                f"{last[0]!r}"
            )
        time.sleep(0.2)
