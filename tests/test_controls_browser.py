"""The controls row's own code (``controls.CONTROLS_JS``) in a real Chromium, without a server:
it shows the values Python sends, writes labels and options as text only, reports a committed
change as the ``change`` trigger (``{name: value}``, with every change no rerun has shown yet),
sends nothing from a disabled field,
keeps a typed number in range, and a rerun updates the values in place (a focused text box keeps
its focus) and rebuilds the row only when its fields change.

What a change may store is tested in test_controls.py; the pages with AppTest; the served app in
tests/test_end_to_end.py."""

from __future__ import annotations

from dataclasses import asdict

from convergence_core.dashboard import controls
from convergence_core.dashboard.headless import CLIPPED_CONTENT
from tests.browser_components import mount

HOSTILE = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script> **b**'


def _data(score="mean", query="", only=False, page=1, disabled=True, high=4) -> dict:  # noqa: ANN001
    fields = [
        controls.choice("score", "Rank by", ["mean", "pc1"], score, key="w_score",
                        labels={"mean": "mean residual", "pc1": HOSTILE}.get, help=HOSTILE),
        controls.text("filter", HOSTILE, query, key="w_filter", placeholder="e.g. dog"),
        controls.switch("only", "Selection only", only, key="w_only", disabled=disabled),
        controls.number("page", "Page", page, 1, high, key="w_page"),
    ]
    return {"row": "row", "fields": [asdict(f) for f in fields]}


def _triggers(page) -> list:  # noqa: ANN001
    return page.evaluate("() => window.__triggers")


def test_values_shown_text_only_and_changes_reported(browser) -> None:
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _data())
    root = page.locator("#root")
    assert root.locator(".controls").count() == 1  # drawn twice, shown once
    assert root.locator(".controls").get_attribute("data-drawn") == "1"
    # labels, options and help as text: nothing became markup or ran
    assert page.evaluate("() => window.__pwned") is None
    made = page.evaluate(
        "() => [...document.getElementById('root').shadowRoot.querySelectorAll('*')]"
        ".filter((node) => ['SCRIPT', 'B', 'IMG'].includes(node.tagName)"
        " || node.hasAttribute('onerror')).length"
    )
    assert made == 0
    assert root.get_by_role("radio", name=HOSTILE).count() == 1
    assert root.get_by_role("radiogroup", name="Rank by").count() == 1
    assert root.get_by_role("textbox", name=HOSTILE).count() == 1
    assert root.get_by_role("switch", name="Selection only").count() == 1
    assert root.get_by_role("spinbutton", name="Page").count() == 1
    assert root.locator(".help").first.get_attribute("title") == HOSTILE
    assert root.locator("style").count() == 1  # the component's CSS is kept
    # the values sent
    assert root.get_by_role("radio", name="mean residual").is_checked()
    assert root.get_by_role("switch").is_disabled() and not root.get_by_role("switch").is_checked()
    assert root.locator("input[type=number]").input_value() == "1"
    assert root.get_by_role("textbox").get_attribute("placeholder") == "e.g. dog"

    root.get_by_role("radio", name=HOSTILE).check()
    text = root.get_by_role("textbox")
    text.fill("a dog")
    text.press("Enter")
    number = root.locator("input[type=number]")
    number.fill("99")  # above the last page: sent as the last
    number.press("Enter")
    assert number.input_value() == "4"
    number.fill("")  # not a number: the latest value (the 4 sent) comes back, nothing is sent
    number.press("Enter")
    assert number.input_value() == "4"
    root.get_by_role("switch").click(force=True)  # disabled: sends nothing
    # no rerun came between them: each trigger carries the earlier changes too (Streamlit keeps
    # one value per trigger, so two changes before a rerun lost the first)
    assert _triggers(page) == [
        ["change", {"score": "pc1"}],
        ["change", {"score": "pc1", "filter": "a dog"}],
        ["change", {"score": "pc1", "filter": "a dog", "page": 4}],
    ]
    page.close()


def test_a_rerun_updates_values_in_place_and_rebuilds_only_for_new_fields(browser) -> None:
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _data())
    root = page.locator("#root")
    text = root.get_by_role("textbox")
    text.focus()
    page.evaluate("(data) => window.__render(data)",
                  _data(score="pc1", query="dog", only=True, page=3, disabled=False))
    assert root.get_by_role("radio", name=HOSTILE).is_checked()
    assert text.input_value() == "dog" and text.evaluate(
        "(input) => input.getRootNode().activeElement === input")  # same box, still focused
    assert root.get_by_role("switch").is_enabled() and root.get_by_role("switch").is_checked()
    assert root.locator("input[type=number]").input_value() == "3"
    root.get_by_role("switch").click()
    assert _triggers(page) == [["change", {"only": False}]]
    # fewer pages (a filter): the range follows; another set of fields: a new row, drawn once
    page.evaluate("(data) => window.__render(data)", _data(page=1, high=2, disabled=False))
    assert root.locator("input[type=number]").get_attribute("max") == "2"
    number = root.locator("input[type=number]")
    number.fill("9")  # kept in the new range
    number.press("Enter")
    assert _triggers(page)[-1] == ["change", {"page": 2}]  # the rerun showed only = False
    fewer = _data()
    fewer["fields"] = fewer["fields"][:2]
    page.evaluate("(data) => window.__render(data)", fewer)
    assert root.locator(".controls").count() == 1 and root.locator(".field").count() == 2
    page.close()


def test_the_row_fits_a_narrow_column(browser) -> None:
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _data(), width=420)
    assert page.evaluate(CLIPPED_CONTENT) == []
    page.close()


def _lab_data(models=("a", "b"), k=10, high=20) -> dict:  # noqa: ANN001
    fields = [
        controls.many("models", "Models", ["a", "b", HOSTILE], list(models), key="w_models"),
        controls.slider("k", "k (nearest neighbours)", k, 2, high, key="w_k"),
    ]
    return {"row": "row", "fields": [asdict(f) for f in fields]}


def test_chips_and_slider_report_the_whole_choice(browser) -> None:
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _lab_data())
    root = page.locator("#root")
    chips = root.get_by_role("group", name="Models").get_by_role("checkbox")
    assert [chip.is_checked() for chip in chips.all()] == [True, True, False]
    assert root.get_by_role("checkbox", name=HOSTILE).count() == 1  # a name as text
    assert page.evaluate("() => window.__pwned") is None
    root.get_by_text("a", exact=True).click()  # a chip is its label
    root.locator(".chip").nth(2).click()
    slider = root.get_by_role("slider", name="k (nearest neighbours)")
    assert slider.input_value() == "10" and root.locator("output").inner_text() == "10"
    slider.focus()
    page.keyboard.press("ArrowRight")
    assert root.locator("output").inner_text() == "11"
    assert _triggers(page) == [
        ["change", {"models": ["b"]}],
        ["change", {"models": ["b", HOSTILE]}],
        ["change", {"models": ["b", HOSTILE], "k": 11}],
    ]
    page.evaluate("(data) => window.__render(data)", _lab_data(models=("b", HOSTILE), k=11))
    slider.press("ArrowRight")  # the rerun showed both: only the new change goes
    assert _triggers(page)[-1] == ["change", {"k": 12}]
    page.close()


def test_keys_faster_than_the_reruns_are_not_set_back(browser) -> None:
    """Two presses of → before the first rerun arrives: that rerun (k = 11) leaves the slider at
    12 while the user is on it; the rerun of the last press, or one after the user left the
    slider, sets it."""
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _lab_data())
    root = page.locator("#root")
    slider = root.get_by_role("slider", name="k (nearest neighbours)")
    slider.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.evaluate("(data) => window.__render(data)", _lab_data(k=11))
    assert slider.input_value() == "12" and root.locator("output").inner_text() == "12"
    page.evaluate("(data) => window.__render(data)", _lab_data(k=12))
    assert slider.input_value() == "12"
    page.evaluate("(data) => window.__render(data)", _lab_data(k=7))  # e.g. a smaller set
    assert slider.input_value() == "7" and root.locator("output").inner_text() == "7"
    page.keyboard.press("ArrowRight")  # 8 sent; the user moves on before its rerun
    root.get_by_text("Models").click()
    slider.evaluate("(input) => input.blur()")
    page.evaluate("(data) => window.__render(data)", _lab_data(k=3))  # the server's word
    assert slider.input_value() == "3"
    page.close()


def test_the_number_box_steps_with_its_buttons_and_stops_at_its_ends(browser) -> None:
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _data(page=1, high=3))
    root = page.locator("#root")
    minus = root.get_by_role("button", name="Decrease Page")
    plus = root.get_by_role("button", name="Increase Page")
    assert minus.is_disabled() and plus.is_enabled()
    plus.click()
    plus.click()  # before the first rerun: counts from the 2 it sent, not from the shown 1
    assert root.get_by_role("spinbutton", name="Page").input_value() == "3"
    assert [t[1]["page"] for t in _triggers(page)] == [2, 3]
    page.evaluate("(data) => window.__render(data)", _data(page=3, high=3))
    assert plus.is_disabled() and minus.is_enabled()
    # every help describes its control
    described = root.get_by_role("spinbutton", name="Page").get_attribute("aria-describedby")
    assert described is None  # the page box has no help here
    group = root.get_by_role("radiogroup", name="Rank by")
    help_id = group.get_attribute("aria-describedby")
    assert root.locator(f"#{help_id}").get_attribute("aria-label") == HOSTILE
    page.close()


def test_a_change_the_server_answered_otherwise_is_not_stuck_in_the_box(browser) -> None:
    """+ pressed (page 2 sent), then a rerun says page 1 of 1 (a filter left one page) while the
    box keeps focus: the box keeps the user's 2 meanwhile but takes the new range at once (+ and
    − disabled, no 3 or 4 sent past it), and shows the server's 1 when the user leaves it;
    Streamlit does not redraw a row whose data did not change, so nothing else would."""
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _data(page=1, high=20))
    root = page.locator("#root")
    plus = root.get_by_role("button", name="Increase Page")
    box = root.get_by_role("spinbutton", name="Page")
    plus.click()
    assert box.input_value() == "2"
    page.evaluate("(data) => window.__render(data)", _data(page=1, high=1))
    assert box.get_attribute("max") == "1" and plus.is_disabled()
    assert _triggers(page) == [["change", {"page": 2}]]
    root.get_by_role("radiogroup", name="Rank by").click()  # the user moves on
    assert box.input_value() == "1"
    # a field disabled by a rerun while the user is on it, its change waiting: disabled at once
    page.evaluate("(data) => window.__render(data)", _data(page=1, high=1, disabled=False))
    switch = root.get_by_role("switch")
    switch.click()  # sends only = True and keeps the focus
    page.evaluate("(data) => window.__render(data)", _data(page=1, high=1, disabled=True))
    assert switch.is_disabled()
    page.close()
