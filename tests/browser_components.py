"""Mounting a component's own code (``st.components.v2``: ``gallery.GALLERY_JS``,
``controls.CONTROLS_JS``) in a real Chromium without a server, as Streamlit mounts it."""

from __future__ import annotations

#: The component's module loaded as the page loads it, mounted in a shadow root holding its CSS
#: (as Streamlit mounts it) with the ``component`` object it receives (``data``,
#: ``parentElement``, ``setTriggerValue``); the triggers it sets are kept in ``window.__triggers``
#: and ``window.__render(data)`` runs it again, as a rerun does.
MOUNT = """async ([code, css, data]) => {
  const url = URL.createObjectURL(new Blob([code], {type: 'text/javascript'}));
  const module = await import(url);
  window.__triggers = [];
  const parentElement = document.getElementById('root').attachShadow({mode: 'open'});
  const style = document.createElement('style');
  style.textContent = css;
  parentElement.appendChild(style);
  const setTriggerValue = (name, value) => window.__triggers.push([name, value]);
  window.__render = (next) => module.default({data: next, parentElement, setTriggerValue});
  window.__render(data);
  window.__render(data);  // a rerun redraws, never duplicates
}"""


def mount(browser, js: str, css: str, data: dict, width: int = 1024):  # noqa: ANN001, ANN201
    """A new page with the component ``js``/``css`` mounted on ``data`` under ``#root``."""
    page = browser.new_page(viewport={"width": width, "height": 800})
    page.set_content("<div data-testid='stMain'><div id='root'></div></div>")
    page.evaluate(MOUNT, [js, css, data])
    return page
