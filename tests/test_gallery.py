"""The gallery's cards without a browser: how much caption text a card carries, and what a press
of Inspect does to the session (the component itself runs in tests/test_gallery_browser.py)."""

from __future__ import annotations

import pytest

from convergence_core.dashboard import gallery, widgets


def test_captions_travel_whole_up_to_the_budget_then_cut_then_counted() -> None:
    assert gallery.bounded_captions(["a" * 60, "b" * 40], budget=100) == (("a" * 60, "b" * 40), 0)
    (first, second), left_out = gallery.bounded_captions(
        ["a" * 600, "b" * 900, "c" * 10], budget=1000
    )
    assert first == "a" * 600 and left_out == 1  # the budget is spent: "c" is counted, not sent
    assert second.startswith("b" * 400 + "…") and "[900 characters;" in second
    assert "b" * 401 not in second
    # a caption past the budget keeps at least an excerpt's length (300), never less
    (_, short), _ = gallery.bounded_captions(["a" * 990, "d" * 200], budget=1000)
    assert short == "d" * 200
    # however many or long the captions, a card carries about the budget
    for captions in (["x" * 100_000] * 5, ["y" * 100] * 10_000):
        kept, left_out = gallery.bounded_captions(captions, budget=20_000)
        assert sum(map(len, kept)) < 20_000 + 400
        assert len(kept) + left_out == len(captions) and left_out > 0


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


def test_show_mounts_one_component_whose_inspect_callback_opens_the_pressed_card(
    monkeypatch, tmp_path
) -> None:
    """The wiring the AppTests cannot press: ``show`` mounts the component under
    ``gallery-<key>`` with the cards and an ``inspect`` callback that reads that key."""
    import streamlit as st

    from tests.fixtures_runs import make_synthetic_run

    mounted = []
    monkeypatch.setattr(gallery, "_component", lambda **kwargs: mounted.append(kwargs))
    run = make_synthetic_run(tmp_path / "runs", 12, name="demo")
    gallery.show(run, [3, 1], ["first", "second"], key="high", columns=2)
    (call,) = mounted
    assert call["key"] == "gallery-high"
    assert call["data"]["columns"] == 2 and call["data"]["inspect"] is True
    ids = [str(run.stimuli["id"].iloc[r]) for r in (3, 1)]
    assert [card["id"] for card in call["data"]["cards"]] == ids
    session = {"gallery-high": {"inspect": ids[1]}}
    monkeypatch.setattr(st, "session_state", session)
    call["on_inspect_change"]()
    assert session[widgets.INSPECT_KEY] == ids[1]


def test_a_padded_thumbnail_is_a_placeholder_not_megabytes_in_the_page(tmp_path) -> None:
    from PIL import Image

    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", 12, name="demo")
    path = run.thumbnail_path(0)
    assert path is not None and widgets.thumbnail_file(run, 0) == (path, None)
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    with open(path, "ab") as handle:  # a valid JPEG followed by padding
        handle.write(b"\0" * (widgets.THUMBNAIL_MAX_BYTES + 1))
    found, problem = widgets.thumbnail_file(run, 0)
    assert found is None and "where a thumbnail is ~20 kB" in problem
    card = gallery.card(run, 0, "label")
    assert card.image == "" and card.note.startswith("(thumbnail unreadable:")
