"""The controls row's own code (``controls.CONTROLS_JS``) in a real Chromium, without a server:
it shows the values Python sends, writes labels and options as text only, reports a committed
change as the ``change`` trigger (``{"name", "value"}``), sends nothing from a disabled field,
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
    number.fill("")  # not a number: the value Python last sent comes back, nothing is sent
    number.press("Enter")
    assert number.input_value() == "1"  # (no rerun here has sent the 4)
    root.get_by_role("switch").click(force=True)  # disabled: sends nothing
    assert _triggers(page) == [
        ["change", {"name": "score", "value": "pc1"}],
        ["change", {"name": "filter", "value": "a dog"}],
        ["change", {"name": "page", "value": 4}],
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
    assert _triggers(page) == [["change", {"name": "only", "value": False}]]
    # fewer pages (a filter): the range follows; another set of fields: a new row, drawn once
    page.evaluate("(data) => window.__render(data)", _data(page=1, high=2, disabled=False))
    assert root.locator("input[type=number]").get_attribute("max") == "2"
    number = root.locator("input[type=number]")
    number.fill("9")  # kept in the new range
    number.press("Enter")
    assert _triggers(page)[-1] == ["change", {"name": "page", "value": 2}]
    fewer = _data()
    fewer["fields"] = fewer["fields"][:2]
    page.evaluate("(data) => window.__render(data)", fewer)
    assert root.locator(".controls").count() == 1 and root.locator(".field").count() == 2
    page.close()


def test_the_row_fits_a_narrow_column(browser) -> None:
    page = mount(browser, controls.CONTROLS_JS, controls.CONTROLS_CSS, _data(), width=420)
    assert page.evaluate(CLIPPED_CONTENT) == []
    page.close()
