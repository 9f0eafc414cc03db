"""Driving the dashboard in headless Chromium on a machine whose network is closed.

Used by the end-to-end test and the dashboard benchmark. Playwright cannot download its own
browser here, so Debian's ``/usr/bin/chromium`` is launched; without the background-networking
flags it keeps opening connections that the closed network refuses, which slows every page.
"""

from __future__ import annotations

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
]

#: JavaScript predicate: Streamlit has finished running the page's script
SCRIPT_FINISHED = (
    "() => document.querySelector('[data-testid=\"stApp\"]')"
    "?.getAttribute('data-test-script-state') === 'notRunning'"
)


def launch_chromium(playwright):  # noqa: ANN001, ANN201 - playwright's own types
    """A headless Chromium browser from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
