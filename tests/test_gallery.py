"""The gallery's cards without a browser: how much caption text a card carries, and what a press
of Inspect does to the session (the component itself runs in tests/test_gallery_browser.py)."""

from __future__ import annotations

import pytest

from convergence_core.dashboard import gallery, widgets


def test_captions_travel_whole_up_to_the_budget_then_cut_with_their_length() -> None:
    assert gallery.bounded_captions(["a" * 60, "b" * 40], budget=100) == ("a" * 60, "b" * 40)
    first, second, third = gallery.bounded_captions(["a" * 600, "b" * 900, "c" * 10], budget=1000)
    assert first == "a" * 600
    assert second.startswith("b" * 400 + "…") and "[900 characters;" in second
    assert "b" * 401 not in second
    # nothing left: still an excerpt of the usual length, never an empty caption
    assert third == "c" * 10  # short enough for the 300 characters every cut caption keeps
    huge = gallery.bounded_captions(["x" * 100_000] * 5, budget=20_000)
    assert sum(map(len, huge)) < 20_000 + 5 * 400
    assert all(caption.endswith("whole under Full captions]") for caption in huge)


def test_inspect_trigger_opens_the_detail_on_the_pressed_stimulus(monkeypatch) -> None:
    import streamlit as st

    session = {"gallery-high": {"inspect": "42"}}
    monkeypatch.setattr(st, "session_state", session)
    gallery.inspect_trigger("gallery-high")
    assert session[widgets.INSPECT_KEY] == session[widgets.INSPECTED] == "42"
    assert session[widgets.STIMULI_TAB_KEY] == widgets.DETAIL_TAB


@pytest.mark.parametrize("state", [None, {}, {"inspect": None}])
def test_inspect_trigger_without_a_press_changes_nothing(monkeypatch, state) -> None:
    import streamlit as st

    session = {} if state is None else {"gallery-low": state}
    before = dict(session)
    monkeypatch.setattr(st, "session_state", session)
    gallery.inspect_trigger("gallery-low")
    assert session == before
