"""A page opened from its own URL is told where the server is (dashboard/deep_links.py).

The inline script itself runs in Chromium: in tests/test_end_to_end.py every page opened from its
own URL finds the server with no failed health check and Home sets nothing; here the same behind
a URL prefix."""

from __future__ import annotations

import asyncio

import pytest

from convergence_core.dashboard import deep_links, page
from convergence_core.dashboard.deep_links import MODULE_SCRIPT, PageShellMiddleware

SHELL = (
    b'<html><head><script>window.x = 1</script>\n<script type="module" src="./i.js"></script>'
    b"</head><body></body></html>"
)
PAGES = ["Stimuli", "Residual_space"]


def _serve(
    path: str,
    *,
    method: str = "GET",
    status: int = 200,
    content_type: bytes = b"text/html; charset=utf-8",
    body: bytes = SHELL,
    chunks: int = 1,
    encoding: bytes | None = None,
) -> tuple[dict, bytes, dict]:
    """One request through the middleware around a fake app that answers ``body`` in ``chunks``
    parts: (response start message, body sent, the scope the app saw)."""
    seen: dict = {}

    async def app(scope, receive, send):  # noqa: ANN001, ANN202
        seen.update(scope)
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        if encoding is not None:
            headers.append((b"content-encoding", encoding))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        size = max(1, -(-len(body) // chunks))
        parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(parts) - 1})

    sent: list[dict] = []

    async def send(message):  # noqa: ANN001, ANN202
        sent.append(message)

    async def receive():  # noqa: ANN202
        return {"type": "http.request"}

    scope = {"type": "http", "method": method, "path": path,
             "extensions": {"http.response.pathsend": {}}, "headers": []}
    asyncio.run(PageShellMiddleware(app, PAGES)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, content, seen


@pytest.mark.parametrize("path", ["/Stimuli", "/Stimuli/", "/prefix/Residual_space"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_a_page_url_gets_the_server_address_before_streamlits_script(path, chunks):
    start, body, seen = _serve(path, chunks=chunks)
    script = deep_links.backend_script(PAGES)
    assert body == SHELL.replace(MODULE_SCRIPT, script + MODULE_SCRIPT, 1)
    assert body.index(b"BACKEND_BASE_URL") < body.index(MODULE_SCRIPT)
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(len(body)).encode()
    assert [k for k, _ in start["headers"]].count(b"content-length") == 1
    # the file comes through the body messages, where it can be edited
    assert "http.response.pathsend" not in seen["extensions"]


@pytest.mark.parametrize(
    "path, options",
    [
        ("/", {}),  # Home: the frontend never guesses there
        ("/Other_page", {}),  # not one of the dashboard's pages
        ("/Stimuli", {"method": "HEAD"}),
        ("/Stimuli", {"method": "POST"}),
        ("/Stimuli", {"status": 304, "body": b""}),
        ("/Stimuli", {"content_type": b"application/json", "body": MODULE_SCRIPT}),
        ("/Stimuli", {"encoding": b"gzip"}),  # compressed: not ours to edit
        ("/Stimuli", {"body": b"<html><head></head></html>"}),  # no module script to go before
    ],
)
def test_everything_else_passes_through_untouched(path, options):
    body = options.get("body", SHELL)
    start, sent, seen = _serve(path, **options)
    assert sent == body
    assert dict(start["headers"])[b"content-length"] == str(len(body)).encode()


def test_install_adds_the_middleware_innermost_once(monkeypatch):
    from streamlit.web.server.starlette import starlette_app

    monkeypatch.setattr(
        starlette_app, "create_streamlit_middleware", starlette_app.create_streamlit_middleware
    )
    paths = [path for _, path in page.PAGE_URLS if path]
    before = starlette_app.create_streamlit_middleware()
    assert deep_links.install(paths) and deep_links.install(paths)  # twice: added once
    after = starlette_app.create_streamlit_middleware()
    assert [m.cls for m in after[:-1]] == [m.cls for m in before]
    assert after[-1].cls is PageShellMiddleware and after[-1].kwargs["page_paths"] == paths
    assert "Stimuli" in paths and "" not in paths


def test_nothing_of_the_request_reaches_the_page():
    """The lines added are fixed (the page list, known to the server): a hostile address is not
    reflected into the HTML; the frontend reads the address from window.location itself, always
    on the page's own origin."""
    hostile = '/"><script>alert(1)</script>/Stimuli'
    _, body, _ = _serve(hostile)
    assert body == SHELL.replace(MODULE_SCRIPT, deep_links.backend_script(PAGES) + MODULE_SCRIPT)
    assert b"alert" not in body
    assert b"window.location.origin +" in deep_links.backend_script(PAGES)


def test_behind_a_url_prefix_a_page_still_finds_the_server_at_once(tmp_path):
    """Served under a prefix (``--server.baseUrlPath explorer``, as behind a proxy), a page opened
    from its URL is told the prefix, not the root, and loads with no failed request; Home there
    is not touched."""
    import os
    import signal
    import subprocess
    import sys

    from playwright.sync_api import sync_playwright

    from convergence_core.dashboard import headless
    from tests.fixtures_runs import make_synthetic_run

    if not headless.CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: install Debian's chromium (.ci/run does)")
    make_synthetic_run(tmp_path / "runs", n=40, name="demo")
    port = headless.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "convergence_core.dashboard.serve", "--cache", str(tmp_path),
         "--port", str(port), "--server.headless", "true", "--server.baseUrlPath", "explorer"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://localhost:{port}/explorer"
    try:
        headless.wait_healthy(base, server)
        with sync_playwright() as playwright:
            browser = headless.launch_chromium(playwright)
            tab = browser.new_page()
            failed: list[str] = []
            tab.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
            for path, told in (("Residual_space", f"{base}/"), ("", None)):
                tab.goto(f"{base}/{path}")
                tab.wait_for_function(headless.PAGE_DRAWN, polling="raf", timeout=120_000)
                setting = tab.evaluate("() => window.__streamlit?.BACKEND_BASE_URL ?? null")
                assert setting == told, (path, setting)
                assert not failed, (path, failed)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
