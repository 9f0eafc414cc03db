"""A page opened from its own URL connects at once (Streamlit issue 7074, measured ~0.1 s).

Opened at ``/Stimuli`` (a shared link, a bookmark, the address bar), Streamlit's frontend does
not know whether ``Stimuli`` is a page or the prefix the app is served under. It asks
``/Stimuli/_stcore/health`` first, gets a 404, waits its first retry delay (100 ms) and only
then finds the server at ``/``: every first visit of a page other than Home paid that, ~20 % of
a bare page's whole load here (``benchmarks/bench_dashboard.py``). The frontend skips the guess
when the page says where the server is (``window.__streamlit.BACKEND_BASE_URL``, Streamlit's
setting for hosts that embed an app), so :class:`PageShellMiddleware` adds a few lines to the
HTML of the dashboard's page URLs: if the address's last segment is one of the pages, the server
is the address without it. The browser then finds the server where it would have found it
second; nothing else changes (Home, at ``/``, never guessed).

:func:`install` adds the middleware to the server that ``streamlit run`` builds (``serve`` calls
it before starting Streamlit). ``st.App`` takes middleware too, but would run the dashboard in
another server mode; here Streamlit's own stack is kept and the middleware is its innermost
layer, so it sees the page's HTML before compression. Where a later Streamlit has no such stack,
nothing is installed and pages load as before (one line on stderr says so).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

__all__ = ["PageShellMiddleware", "backend_script", "install"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where the script goes: before Streamlit's own module script, which reads the setting once
MODULE_SCRIPT = b'<script type="module"'


def backend_script(page_paths: Collection[str]) -> bytes:
    """The inline script that tells the frontend where the server is when the address ends in
    one of ``page_paths`` (URL paths without slashes, e.g. ``"Stimuli"``); it leaves an
    existing ``window.__streamlit`` (a host's own setting) alone."""
    pages = json.dumps(sorted(page_paths))
    return (
        "<script>(function () {"
        "var path = window.location.pathname.replace(/\\/+$/, '');"
        "var cut = path.lastIndexOf('/');"
        f"if (window.__streamlit || {pages}.indexOf(path.slice(cut + 1)) < 0) return;"
        "window.__streamlit = {BACKEND_BASE_URL: window.location.origin + path.slice(0, cut + 1)};"
        "})();</script>\n    "
    ).encode()


def _last_segment(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next((value for key, value in headers if key.lower() == name), b"")


class PageShellMiddleware:
    """ASGI middleware: a GET of a page URL (last path segment in ``page_paths``) that answers
    with Streamlit's HTML shell gets :func:`backend_script` before the module script; every
    other request and response passes through untouched."""

    def __init__(self, app: ASGIApp, page_paths: Collection[str]) -> None:
        self.app = app
        self.page_paths = frozenset(page_paths)
        self.script = backend_script(self.page_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or _last_segment(scope["path"]) not in self.page_paths
        ):
            await self.app(scope, receive, send)
            return
        # the file is read into the body messages (not handed to the server to send itself)
        extensions = {
            key: value for key, value in (scope.get("extensions") or {}).items()
            if key != "http.response.pathsend"
        }
        scope = {**scope, "extensions": extensions}
        start: Message | None = None
        chunks: list[bytes] = []

        async def edited(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body, headers = b"".join(chunks), list(start.get("headers", []))
            html = _header(headers, b"content-type").startswith(b"text/html")
            if start["status"] == 200 and html and not _header(headers, b"content-encoding"):
                at = body.find(MODULE_SCRIPT)
                if at >= 0:
                    body = body[:at] + self.script + body[at:]
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, edited)


def install(page_paths: Collection[str]) -> bool:
    """Add :class:`PageShellMiddleware` for ``page_paths`` to the server ``streamlit run``
    builds in this process; False (and one line on stderr) where this Streamlit has no such
    stack to add it to."""
    try:
        from starlette.middleware import Middleware
        from streamlit.web.server.starlette import starlette_app

        streamlit_middleware = starlette_app.create_streamlit_middleware
    except (ImportError, AttributeError) as exc:
        print(
            f"convergence serve: pages opened from their own URL connect as Streamlit does "
            f"(~0.1 s later): no middleware stack to add to ({exc})",
            file=sys.stderr,
        )
        return False
    if getattr(streamlit_middleware, "adds_page_shell", False):
        return True

    def with_page_shell() -> list[Middleware]:
        return [*streamlit_middleware(), Middleware(PageShellMiddleware, page_paths=page_paths)]

    with_page_shell.adds_page_shell = True  # type: ignore[attr-defined]
    starlette_app.create_streamlit_middleware = with_page_shell
    return True
