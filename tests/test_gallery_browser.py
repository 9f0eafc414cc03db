"""The gallery component's own code (``gallery.GALLERY_JS``) in a real Chromium, without a
server: given cards as the page sends them, it draws every card, writes user text as text only,
lists every caption under "Full captions", and a press of Inspect reports the card's id.

The pages' AppTests check what is sent (tests/page_reading.py ``gallery_cards``); the browser test
(tests/test_end_to_end.py) presses Inspect on the served demo."""

from __future__ import annotations

from convergence_core.dashboard import gallery
from convergence_core.dashboard.headless import CLIPPED_CONTENT
from tests.browser_components import mount

HOSTILE = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script> **b**'
# a 1×1 white JPEG
PIXEL = (
    "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAAMCAgICAgMCAgIDAwMDBAYEBAQEBAgGBgUG"
    "CQgKCgkICQkKDA8MCgsOCwkJDRENDg8QEBEQCgwSExIQEw8QEBD/yQALCAABAAEBAREA/8wABgAQEAX/2gAIAQEAAD8A"
    "0s8g/9k="
)


def _card(
    identifier: str, text: str, captions=(), image: str = "", note: str = "", left_out: int = 0
) -> dict:
    return {
        "id": identifier, "image": image, "note": note, "text": text, "captions": list(captions),
        "left_out": left_out,
    }


def _mount(browser, data: dict, width: int = 1024):  # noqa: ANN001, ANN202
    return mount(browser, gallery.GALLERY_JS, gallery.GALLERY_CSS, data, width)


def test_cards_show_user_text_as_text_and_inspect_reports_the_id(browser) -> None:
    cards = [
        _card("a-1", "#1 of 3 · id a-1\n“a dog”", image=PIXEL),
        _card(HOSTILE, f"#2 of 3 · id {HOSTILE}\n“{HOSTILE}”", captions=[HOSTILE, "two"],
              left_out=3),
        _card("c-3", "#3 of 3 · id c-3", note="(no thumbnail for this stimulus)"),
    ]
    page = _mount(browser, {"columns": 2, "inspect": True, "cards": cards})
    root = page.locator("#root")
    assert root.locator(".card").count() == 3  # drawn twice, shown once
    # marked drawn, which the benchmark and browser test wait for (headless.PAGE_DRAWN)
    assert root.locator(".gallery").get_attribute("data-drawn") == "3"
    texts = root.locator(".card > .text").all_inner_texts()
    assert texts == [card["text"] for card in cards]  # verbatim, line break kept
    # nothing from the hostile text became markup or ran
    assert page.evaluate("() => window.__pwned") is None
    made = page.evaluate(
        "() => [...document.getElementById('root').shadowRoot.querySelectorAll('*')]"
        ".filter((node) => node.tagName === 'SCRIPT' || node.tagName === 'B'"
        " || node.hasAttribute('onerror')).length"
    )
    assert made == 0
    assert root.locator("img").count() == 1  # the first card's thumbnail only
    assert root.locator("img").first.evaluate("(image) => image.naturalWidth") == 1
    assert "(no thumbnail for this stimulus)" in root.locator(".card").nth(2).inner_text()
    # every caption whole, numbered, once "Full captions" opens; only where one is cut
    assert root.locator("details").count() == 1
    root.locator("summary").click()
    assert root.locator("details .caption").all_inner_texts() == [
        f"1. {HOSTILE}", "2. two",
        "… and 3 more: the Stimuli page's detail view shows every caption whole under Full "
        "captions",
    ]
    # Inspect reports the pressed card's id (the page's callback opens the detail on it)
    root.get_by_role("button", name="Inspect").nth(1).click()
    assert page.evaluate("() => window.__triggers") == [["inspect", HOSTILE]]
    columns = root.locator(".gallery").evaluate("(grid) => grid.style.gridTemplateColumns")
    assert columns == "repeat(2, minmax(0px, 1fr))"
    page.close()


def test_without_inspect_there_is_no_button(browser) -> None:
    page = _mount(browser, {"columns": 4, "inspect": False, "cards": [_card("x", "id x")]})
    assert page.locator("#root button").count() == 0
    assert page.locator("#root .card").count() == 1
    page.close()


def test_cards_fit_a_narrow_column_and_the_clipping_check_sees_inside_them(browser) -> None:
    """Long unbroken ids and captions wrap inside a card (the 1024-pixel check of the browser
    test, ``headless.CLIPPED_CONTENT``, finds nothing cut), and that check does look inside the
    component's shadow root: a line made too wide there is reported."""
    word = "x" * 400
    cards = [_card(f"id-{i}-{word}", f"id {word}\n“{word}”", image=PIXEL) for i in range(6)]
    page = _mount(browser, {"columns": 3, "inspect": True, "cards": cards}, width=500)
    assert page.evaluate(CLIPPED_CONTENT) == []
    page.evaluate(
        "() => { const line = document.createElement('div'); line.textContent = 'y'.repeat(400);"
        " line.style.cssText = 'width: 40px; overflow: hidden; white-space: nowrap';"
        " document.getElementById('root').shadowRoot.querySelector('.card').appendChild(line); }"
    )
    assert [found.split(": ")[1][:10] for found in page.evaluate(CLIPPED_CONTENT)] == ["y" * 10]
    page.close()
