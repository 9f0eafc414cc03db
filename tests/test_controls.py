"""A row of controls drawn by the browser (``dashboard/controls.py``): what a change from the
browser may store, and where. The JavaScript is tested in Chromium (test_controls_browser.py),
the pages that use it with AppTest (test_page_stimuli.py, test_app_home.py)."""

from __future__ import annotations

import math

import pytest

from convergence_core.dashboard import controls, state
from tests.page_reading import field_from_data

SCORE = controls.choice("score", "Rank by", state.SCORES, "mean", key="w_score", view="score")
FILTER = controls.text("filter", "Filter", "", key="w_filter")
ONLY = controls.switch("only", "Selection only", False, key="w_only")
PAGE = controls.number("page", "Page", 1, 1, 4, key="w_page", view="page")
MODELS = controls.many("models", "Models", ["b", "a", "c"], ["a"], key="w_models")
K = controls.slider("k", "k", 10, 2, 12, key="w_k", view="k")
FIELDS = [SCORE, FILTER, ONLY, PAGE, MODELS, K]
KEYS = {"w_score", "w_filter", "w_only", "w_page", "w_models", "w_k"}


def _changed(name: object, value: object, fields=FIELDS, **session) -> dict:  # noqa: ANN001
    """The session after the row ``row`` reported ``{name: value}``."""
    session = {"row": {controls.TRIGGER: {name: value}},
               state.VIEW_KEY: state.View(), **session}
    controls.store_change(session, "row", fields)
    return session


@pytest.mark.parametrize(
    ("field", "sent", "stored"),
    [
        ("score", "pc1", "pc1"),
        ("filter", "a dog <b>", "a dog <b>"),
        ("filter", "x" * 5_000, "x" * controls.TEXT_LIMIT),
        ("filter", "", ""),
        ("only", True, True),
        ("page", 3, 3),
        ("page", 2.6, 3),  # rounded
        ("page", 99, 4),  # kept in range
        ("page", -7, 1),
        ("models", ["c", "b"], ["b", "c"]),  # in the options' order
        ("models", ["a", "a"], ["a"]),
        ("models", [], []),  # none chosen: the page says to pick one
        ("k", 12, 12),
        ("k", 1, 2),
    ],
)
def test_a_change_the_field_can_take_is_stored_under_its_key(field, sent, stored) -> None:
    session = _changed(field, sent)
    key = next(f.key for f in FIELDS if f.name == field)
    assert session[key] == stored and type(session[key]) is type(stored)


@pytest.mark.parametrize(
    ("field", "sent"),
    [
        ("score", "no such score"),
        ("score", None),
        ("score", ["pc1"]),
        ("filter", 3),
        ("only", "yes"),
        ("only", 1),
        ("page", True),  # a bool is not a number here
        ("page", "2"),
        ("page", math.nan),
        ("page", math.inf),
        ("models", ["a", "z"]),
        ("models", "a"),
        ("models", [1]),
        ("k", "5"),
        ("no such field", "pc1"),
        (None, None),
    ],
)
def test_anything_else_is_ignored(field, sent) -> None:
    session = _changed(field, sent)
    assert not KEYS & set(session)
    assert session[state.VIEW_KEY] == state.View()


@pytest.mark.parametrize("trigger", [None, "pc1", ["score", "pc1"], {"value": "pc1"}, {}])
def test_a_malformed_trigger_is_ignored(trigger) -> None:
    session = {"row": {controls.TRIGGER: trigger}, state.VIEW_KEY: state.View()}
    controls.store_change(session, "row", FIELDS)
    assert set(session) == {"row", state.VIEW_KEY} and session[state.VIEW_KEY] == state.View()
    controls.store_change({}, "row", FIELDS)  # no trigger at all


def test_every_change_of_one_trigger_is_stored_and_a_bad_one_spoils_none() -> None:
    """Two controls changed before a rerun arrive in one trigger (Streamlit keeps a trigger's
    last value only): each is stored; a name or value the row cannot take is skipped alone."""
    session = {"row": {controls.TRIGGER: {"filter": "dog", "score": "pc1", "page": "x",
                                          "nope": 1}},
               state.VIEW_KEY: state.View()}
    controls.store_change(session, "row", FIELDS)
    assert session["w_filter"] == "dog" and session["w_score"] == "pc1"
    assert "w_page" not in session and session[state.VIEW_KEY].score == "pc1"


def test_a_field_bound_to_the_view_changes_the_view_too() -> None:
    session = _changed("score", "pc1")
    assert session[state.VIEW_KEY].score == "pc1"
    session = _changed("page", 3)
    assert session[state.VIEW_KEY].page == 3
    session = _changed("filter", "dog")
    assert session[state.VIEW_KEY] == state.View()  # not bound


def test_a_disabled_field_takes_nothing() -> None:
    disabled = controls.switch("only", "Selection only", False, key="w_only", disabled=True)
    session = _changed("only", True, fields=[disabled])
    assert "w_only" not in session


def test_bound_value_reads_the_view_and_hands_it_to_the_other_pages_widgets() -> None:
    view = state.View(page=9)
    session: dict = {}
    assert controls.bound_value(session, view, "page", lambda p: min(max(1, int(p)), 4)) == 4
    assert view.page == 4 and session["w_page"] == 4  # state.bind_widget reads w_<name>


def test_bounded_value_keeps_a_number_the_range_cannot_take_until_it_can() -> None:
    """k above the smallest set is used lowered, but the view (so the URL) keeps it, and it comes
    back once the sets are large enough, unless the user moved k meanwhile."""
    view, session = state.View(k=30), {"clamped_w_k": (40, 5)}
    assert controls.bounded_value(session, view, "k", 2, 9) == (9, 30)
    # the number asked for, where the Paper page's k widget (state.bind_bounded_int) reads it and
    # lowers it for its own sets; that widget's note of an older lowering is dropped
    assert view.k == 30 and session["w_k"] == 30 and "clamped_w_k" not in session
    assert controls.bounded_value(session, view, "k", 2, 40) == (30, None)
    assert controls.bounded_value(session, view, "k", 2, 9) == (9, 30)
    session = _changed("k", 5)  # the user moved it: the lowered number is forgotten
    view = session[state.VIEW_KEY]
    assert controls.bounded_value(session, view, "k", 2, 40) == (5, None)
    assert controls.bounded_value({}, state.View(k=1), "k", 2, 40) == (2, None)


def test_a_many_field_shows_only_its_options_in_their_order() -> None:
    assert controls.many("m", "M", ["b", "a", "c"], ["c", "z", "b"], key="k").value == ("b", "c")


def test_fields_travel_to_the_browser_and_back_unchanged() -> None:
    from dataclasses import asdict

    for field in FIELDS:
        assert field_from_data(asdict(field)) == field
    labelled = controls.choice("order", "Order", ["a", "b"], "a", key="k", labels=str.upper)
    assert labelled.labels == ("A", "B")


def test_a_row_needs_distinct_names() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        controls.row([FILTER, FILTER], key="row")
