"""Reading what a page shows in an AppTest: the number cards of ``widgets.number_cards``, and
the text of messages written with ``widgets.escape_markdown`` (``shown``)."""

from __future__ import annotations

import re

from convergence_core.dashboard.controls import Field
from convergence_core.dashboard.widgets import CARD_KEY_PREFIX


def field_from_data(data: dict) -> Field:
    """A ``controls.Field`` from its form in the component's ``data`` (``controls.row``): what
    the browser got, as the page built it."""
    return Field(**{name: tuple(value) if isinstance(value, list) else value
                    for name, value in data.items()})

_ESCAPED = re.compile(r"\\(.)")
_SMALL = re.compile(r"^:small\[(.*)\]$", re.S)


def _text(markdown: str) -> str:
    """The text of Markdown written with ``widgets.escape_markdown`` (and ``:small[…]``)."""
    inner = _SMALL.match(markdown)
    return _ESCAPED.sub(r"\1", inner.group(1) if inner else markdown)


def plain(markdown: str) -> str:
    """The text a reader sees of Markdown written with ``widgets.escape_markdown``."""
    return _text(markdown)


def shown(elements) -> list[str]:  # noqa: ANN001
    """The text of alerts (``at.warning``, ``at.error``…) as the browser shows it: Markdown
    escapes (``widgets.show_messages``) removed."""
    return [_text(element.value) for element in elements]


def _card_blocks(node):
    proto = getattr(node, "proto", None)
    if proto is not None and f"-{CARD_KEY_PREFIX}" in str(getattr(proto, "id", "")):
        yield node
        return
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        for child in children.values():
            yield from _card_blocks(child)


def _card_parts(at):
    """(label, the card's elements) of every number card on the page (main area and sidebar)."""
    for block in [*_card_blocks(at.main), *_card_blocks(at.sidebar)]:
        parts = list(block.children.values())
        yield _text(parts[0].value), parts


def cards(at) -> dict[str, str]:
    """label → value of every number card on the page (main area and sidebar)."""
    return {label: _text(parts[1].value) for label, parts in _card_parts(at)}


def card_deltas(at) -> dict[str, str | None]:
    """label → the change shown under the value (the badge's text), or None."""
    shown: dict[str, str | None] = {}
    for label, parts in _card_parts(at):
        badge = None
        if len(parts) > 2:
            inner = re.match(r"^:\w+-badge\[(?::material/\w+: )?(.*)\]$", parts[2].value, re.S)
            badge = _text(inner.group(1)) if inner else parts[2].value
        shown[label] = badge
    return shown


def gallery_cards(at, key: str | None = None) -> list[dict]:  # noqa: ANN001
    """The cards every gallery on the page sent to the browser (``gallery.show``: one component
    each, whose cards AppTest cannot look inside), in page order; ``key``: only that gallery's.
    Each card is a dict: ``id``, ``image`` (a data URI or ""), ``note``, ``text``, ``captions``,
    ``left_out`` (``gallery.Card``)."""
    import json

    from convergence_core.dashboard import gallery

    found = []
    for element in at.get("bidi_component"):
        proto = element.proto
        if proto.component_name != gallery.COMPONENT:
            continue
        if key is not None and not proto.id.endswith(f"-{gallery.KEY_PREFIX}{key}"):
            continue
        found.extend(json.loads(proto.json)["cards"])
    return found


def gallery_texts(at, key: str | None = None) -> list[str]:  # noqa: ANN001
    """The text of every gallery card (label and first caption), in page order."""
    return [card["text"] for card in gallery_cards(at, key)]


def _control_rows(at):  # noqa: ANN001, ANN202
    import json

    from convergence_core.dashboard import controls

    for element in at.get("bidi_component"):
        if element.proto.component_name == controls.COMPONENT:
            yield json.loads(element.proto.json)


def controls_shown(at) -> dict[str, dict]:  # noqa: ANN001
    """name → field (as a dict: ``kind``, ``label``, ``value``, ``options``, ``disabled``...) of
    every control every ``controls.row`` on the page sent to the browser (AppTest cannot look
    inside a component)."""
    return {f["name"]: f for data in _control_rows(at) for f in data["fields"]}


def change_control(at, name: str, value, *, timeout: float = 60):  # noqa: ANN001, ANN201
    """Change the control ``name`` to ``value`` and rerun: what a change in the browser does
    (the row's ``change`` trigger set, ``controls.store_change`` run on the session before the
    rerun). The browser test (tests/test_end_to_end.py) changes the real controls."""
    from convergence_core.dashboard import controls

    rows = [data for data in _control_rows(at) if any(f["name"] == name for f in data["fields"])]
    assert len(rows) == 1, f"no control (or several) named {name!r} on the page"
    key = rows[0]["row"]
    fields = [field_from_data(f) for f in rows[0]["fields"]]

    class Changed:  # the session state as the callback sees it, the trigger set
        def get(self, item, default=None):  # noqa: ANN001, ANN202
            if item == key:
                return {controls.TRIGGER: {name: value}}
            return at.session_state[item] if item in at.session_state else default

        def __setitem__(self, item, new) -> None:  # noqa: ANN001
            at.session_state[item] = new

    controls.store_change(Changed(), key, fields)
    return at.run(timeout=timeout)
