"""What the dashboard's components (``st.components.v2``: ``gallery``, ``controls``) share in
their DOM code.

:data:`MAKE_JS` defines ``make(tag, className, text)``: a new element whose text is written with
``textContent``, the one way user text (captions, ids, model names) enters a component's DOM, so
that it never becomes HTML. A component's code puts it first in its function (``GALLERY_JS``,
``CONTROLS_JS``).
"""

from __future__ import annotations

#: JavaScript (inside a component's function): ``make(tag, className, text)`` creates an element,
#: sets its class and writes ``text`` (when given) as text, never as HTML
MAKE_JS = """  const make = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };"""
