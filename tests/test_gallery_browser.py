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


#: The grid as the browser lays it out: its column count, and each card's box, thumbnail box
#: and Inspect button (left, top, width, height; the button's top only)
GRID = """() => {
  const root = document.getElementById('root').shadowRoot;
  const grid = root.querySelector('.gallery');
  const box = (node) => { const r = node.getBoundingClientRect();
    return [r.left, r.top, r.width, r.height].map(Math.round); };
  return {
    columns: getComputedStyle(grid).gridTemplateColumns.split(' ').length,
    cards: [...grid.querySelectorAll('.card')].map((card) => ({
      card: box(card), image: card.querySelector('img') ? box(card.querySelector('img')) : null,
      button: card.querySelector('button') ? box(card.querySelector('button'))[1] : null,
    })),
  };
}"""


def _grid(page) -> dict:  # noqa: ANN001
    return page.evaluate(GRID)


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
    assert _grid(page)["columns"] == 2  # as asked: the page is wide enough
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


#: A side of the Stimuli gallery (two side by side in the main column): ~266 px wide at a
#: 1024-pixel window with the sidebar open, ~454 px at 1400 (measured in Chromium)
SIDE_AT_1024, SIDE_AT_1400 = 266, 454


def _mount_in(browser, data: dict, container: int, viewport: int = 1024):  # noqa: ANN001, ANN202
    """The gallery mounted in a column ``container`` pixels wide (as a side of the page)."""
    page = _mount(browser, data, viewport)
    page.evaluate(f"() => {{ document.getElementById('root').style.width = '{container}px'; }}")
    return page


def test_the_grid_drops_columns_rather_than_shrink_thumbnails_below_the_minimum(browser) -> None:
    """Three cards a line in a side of the gallery at a 1024-pixel window gave thumbnails of
    72 px and captions wrapping every word or two; the grid now holds as many cards as fit at
    least ``gallery.MIN_CARD`` wide, never more than asked, so two there, three at 1400."""
    cards = [_card(f"s{i}", f"#{i + 1} of 239 · id 28178{i}\nmean residual 0.0100\n“a caption”",
                   image=PIXEL) for i in range(6)]
    data = {"columns": 3, "inspect": True, "cards": cards}
    page = _mount_in(browser, data, SIDE_AT_1024)
    grid = _grid(page)
    assert grid["columns"] == 2
    assert min(card["image"][2] for card in grid["cards"]) >= 110
    page.close()
    page = _mount_in(browser, data, SIDE_AT_1400, viewport=1400)  # as before: three a line
    grid = _grid(page)
    assert grid["columns"] == 3 and min(card["image"][2] for card in grid["cards"]) >= 135
    page.close()
    # Home's five cards in its main column at 1024 (564 px) keep one line, none left alone below
    page = _mount_in(browser, {**data, "columns": 5, "inspect": False, "cards": cards[:5]}, 564)
    assert _grid(page)["columns"] == 5
    page.close()
    # whatever the width and the columns asked (the pages ask 3 to 6), no thumbnail is narrower
    # than the minimum unless the column itself is, no line holds more cards than asked, and a
    # line is filled when it can be
    least = int(gallery.MIN_CARD.removesuffix("px"))
    for columns in (3, 4, 5, 6):
        data = {"columns": columns, "inspect": False, "cards": cards}
        page = _mount(browser, data, 1400)
        for width in (100, 180, 250, 266, 380, 454, 564, 700, 940, 1200):
            page.evaluate(f"() => {{ document.getElementById('root').style.width = '{width}px'; }}")
            grid = _grid(page)
            widths = [card["image"][2] for card in grid["cards"]]
            assert min(widths) >= min(least, width), (columns, width, widths)
            assert grid["columns"] <= columns
            assert grid["columns"] == min(columns, max(1, (width + 16) // (least + 16))), (
                columns, width, grid["columns"])
        page.close()


def test_cards_of_a_line_align_whatever_their_pictures_and_captions(browser) -> None:
    """Pictures of different shapes and captions of different lengths: each line's thumbnails
    share a top and a height (a 4:3 box, the picture inside it whole), so the labels start level,
    and the Inspect buttons sit at the foot of the line."""
    wide = "data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciIHdp" \
        "ZHRoPSIzMDAiIGhlaWdodD0iMTAwIi8+"  # an empty 300 × 100 SVG
    tall = "data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciIHdp" \
        "ZHRoPSIxMDAiIGhlaWdodD0iMzAwIi8+"  # an empty 100 × 300 SVG
    cards = [
        _card("a", "id a\n“short”", image=wide),
        _card("b", "id b\n“" + "a much longer caption " * 6 + "”", image=tall),
        _card("c", "id c\n“mid length caption here”", image=PIXEL),
        _card("d", "id d", image=tall),
    ]
    page = _mount_in(browser, {"columns": 2, "inspect": True, "cards": cards}, SIDE_AT_1024)
    grid = _grid(page)
    assert grid["columns"] == 2
    for line in (grid["cards"][:2], grid["cards"][2:]):
        assert len({card["image"][1] for card in line}) == 1  # thumbnails level
        assert len({card["image"][3] for card in line}) == 1  # and as tall
        assert len({card["button"] for card in line}) == 1  # Inspect level
        image = line[0]["image"]
        assert image[3] == round(image[2] * 3 / 4) or abs(image[3] - image[2] * 3 / 4) <= 1
    page.close()
