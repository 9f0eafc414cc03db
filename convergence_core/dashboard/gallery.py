"""A grid of stimulus cards (thumbnail, label, first caption, every caption on demand, an Inspect
button) drawn by the browser as one element.

Every page that shows stimuli shows them here: the Stimuli gallery, Home's previews, a selection
on Residual space, the stimuli behind a point on What predicts dispersion and Universal space's
extremes. Drawn as Streamlit elements, a card was a picture, a text and one or two buttons
inside a column: 12 cards were some 60 elements for the browser to mount and lay out one by one.
As one ``st.components.v2`` component (:data:`GALLERY_JS`, a few lines of DOM code, no library)
they are one element, and the Stimuli page's first visit in a browser went from 1.70-1.94x to
1.56-1.62x a bare Streamlit page (two runs beside the old code, ``benchmarks/bench_dashboard.py
--beside``; ``docs/PERFORMANCE.md``). The thumbnails travel inside the page's message as data
URIs (about 20 kB each) rather than as separate requests.

Safety: captions, ids and labels come from a user's data set. The component writes them with
``textContent`` only (never as HTML), and a thumbnail is sent as a ``data:image/jpeg`` URI of a
file checked to be a decodable JPEG inside the run folder (``widgets.thumbnail_file``).

What the browser receives (the component's ``data``)::

    {"columns": 3,  # at most, per line (fewer where narrow: GALLERY_CSS)
     "inspect": true, "cards": [
        {"id": "42", "image": "data:image/jpeg;base64,...", "note": "", "text": "#1 of 239 ...",
         "captions": ["a dog ...", ...],  # [] when no caption is cut; at most ~20,000 characters
         "left_out": 0},  # captions past that budget, not sent
        ...]}

A press of Inspect sets the component's ``inspect`` trigger to the stimulus id; its callback
(:func:`inspect_trigger`) opens the Stimuli page's detail tab on that stimulus.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import streamlit as st

from .. import settings
from ..run import Run
from . import dom, widgets

#: Name of the component (unique in the app) and the prefix of each gallery's key
COMPONENT = "convergence_gallery"
KEY_PREFIX = "gallery-"

#: The component's code: builds the cards from ``data`` with DOM calls and ``textContent``
#: (user text never becomes HTML); Inspect sets the ``inspect`` trigger to the card's id.
GALLERY_JS = """
export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
""" + dom.MAKE_JS + """
  let grid = parentElement.querySelector('.gallery');
  if (!grid) {
    grid = make('div', 'gallery');
    parentElement.appendChild(grid);
  }
  grid.style.setProperty('--columns', String(data.columns));  // at most; fewer when narrow
  grid.replaceChildren(...data.cards.map((card) => {
    const cell = make('div', 'card');
    cell.dataset.id = card.id;
    if (card.image) {
      const image = make('img');
      image.src = card.image;
      image.alt = `stimulus ${card.id}`;
      cell.appendChild(image);
    } else if (card.note) {
      cell.appendChild(make('div', 'note', card.note));
    }
    cell.appendChild(make('div', 'text', card.text));
    if (card.captions.length) {
      const more = make('details');
      more.appendChild(make('summary', '', 'Full captions'));
      const numbered = card.captions.length + card.left_out > 1;
      card.captions.forEach((caption, index) => more.appendChild(make(
        'div', 'text caption', numbered ? `${index + 1}. ${caption}` : caption)));
      if (card.left_out > 0) {
        more.appendChild(make('div', 'text caption note', `… and ${card.left_out} more: the ` +
          "Stimuli page's detail view shows every caption whole under Full captions"));
      }
      cell.appendChild(more);
    }
    if (data.inspect) {
      const button = make('button', '', 'Inspect');
      button.type = 'button';
      button.onclick = () => setTriggerValue('inspect', card.id);
      cell.appendChild(button);
    }
    return cell;
  }));
  grid.dataset.drawn = data.cards.length;  // the browser test and benchmark wait for this
}
"""

#: Narrowest a card (so its thumbnail) gets before the grid drops a column: a side of the Stimuli
#: gallery at a 1024-pixel window (~250 px) holds two cards of 125 px, not three of 72 px, while
#: Home's five cards still share one line there (~100 px each, where 110 px left one alone below)
MIN_CARD = "96px"

#: The cards' look, from Streamlit's theme variables (light and dark themes alike). ``columns``
#: is the most cards a line holds: the grid fits as many as it can of at least
#: :data:`MIN_CARD` (auto-fill), never more than ``columns``, each line's cards equally wide and
#: aligned (every thumbnail in a 4:3 box, the Inspect buttons at the foot of their line).
GALLERY_CSS = """
.gallery { --gap: 1rem; display: grid; gap: var(--gap); font-family: var(--st-font);
  color: var(--st-text-color);
  grid-template-columns: repeat(auto-fill, minmax(min(100%, max(""" + MIN_CARD + """,
    (100% - (var(--columns) - 1) * var(--gap)) / var(--columns) - 0.5px)), 1fr)); }
.card { display: flex; flex-direction: column; align-items: flex-start; gap: 0.25rem;
  min-width: 0; }
.card img { display: block; width: 100%; aspect-ratio: 4 / 3; object-fit: contain;
  border-radius: 0.25rem; background: var(--st-secondary-background-color); }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.875rem; line-height: 1.5; }
.note { font-size: 0.875rem; opacity: 0.7; }
.caption { margin-top: 0.25rem; }
summary { cursor: pointer; font-size: 0.875rem; }
.card > button { margin-top: auto; }
button { font: inherit; font-size: 0.875rem; padding: 0.25rem 0.75rem; cursor: pointer;
  border-radius: 0.5rem; border: 1px solid var(--st-border-color);
  background: var(--st-background-color); color: var(--st-text-color); }
button:hover, button:focus-visible { border-color: var(--st-primary-color);
  color: var(--st-primary-color); }
"""

_component = st.components.v2.component(COMPONENT, js=GALLERY_JS, css=GALLERY_CSS)

#: About this many characters of a card's captions travel with the page (for "Full captions"):
#: the caption that passes it is cut with its length, those after it are counted, and the Stimuli
#: page's detail view shows them whole (a hostile data set's 100,000-character or 10,000 captions
#: would otherwise make every gallery megabytes; :func:`bounded_captions`)
FULL_CAPTIONS_CHARS = 20_000


@dataclass(frozen=True)
class Card:
    """One stimulus as the component draws it (see the module docstring)."""

    id: str
    image: str  # a data:image/jpeg URI, or "" (then ``note`` says why, or nothing is shown)
    note: str
    text: str  # the label and the first caption, as plain text
    captions: tuple[str, ...]  # the captions when one is cut in ``text`` (:func:`bounded_captions`)
    left_out: int = 0  # captions past the budget, not sent


def card(run: Run, row: int, label: str) -> Card:
    """Stimulus ``row`` of ``run`` as a :class:`Card` headed ``label`` (cut as an excerpt)."""
    image, note = "", ""
    if run.has_thumbnails:
        path, problem = widgets.thumbnail_file(run, row)
        if path is not None:
            image = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
        elif problem is not None:
            note = widgets.unreadable_thumbnail_note(problem)
        else:
            note = "(no thumbnail for this stimulus)"
    identifier = str(run.stimuli["id"].iloc[row])
    if not run.has_captions:
        return Card(identifier, image, note, widgets.excerpt(label), ())
    captions = tuple(str(c) for c in run.stimuli["captions"].iloc[row])
    kept, left_out = bounded_captions(captions) if widgets.captions_cut(captions) else ((), 0)
    text = f"{widgets.excerpt(label)}\n{widgets.first_caption_text(captions)}"
    return Card(identifier, image, note, text, kept, left_out)


def bounded_captions(
    captions: Sequence[str], budget: int = FULL_CAPTIONS_CHARS
) -> tuple[tuple[str, ...], int]:
    """``(kept, left_out)``: ``captions`` whole while their lengths add up to at most ``budget``
    characters; the one that passes the budget is cut there (keeping at least an excerpt's
    length) and says how long it is; the ``left_out`` after it are not sent, so that a card
    carries about ``budget`` characters however many captions a stimulus has (the Stimuli
    page's detail view shows every caption whole)."""
    kept: list[str] = []
    left = budget
    for caption in captions:
        if left <= 0:
            break
        room = max(left, settings.caption_excerpt_chars())
        if len(caption) <= room:
            kept.append(caption)
        else:
            kept.append(
                f"{caption[:room].rstrip()}… [{len(caption):,} characters; the Stimuli page's "
                "detail view shows it whole under Full captions]"
            )
        left -= min(len(caption), room)
    return tuple(kept), len(captions) - len(kept)


def inspect_trigger(key: str) -> None:
    """The callback of a press of Inspect in the gallery keyed ``key``: the Stimuli page opens its
    detail tab on the pressed stimulus (:func:`widgets.inspect`)."""
    pressed = (st.session_state.get(key) or {}).get("inspect")
    if pressed:
        widgets.inspect(str(pressed))


def show(
    run: Run,
    rows: Sequence[int],
    labels: Sequence[str],
    *,
    key: str,
    columns: int = 4,
    inspect: bool = True,
) -> None:
    """``rows`` of ``run`` as cards, at most ``columns`` per line (fewer where a card would be
    narrower than :data:`MIN_CARD`) in the given order, headed by ``labels``; with ``inspect``
    each has an Inspect button (the Stimuli page's detail view). Above the grid, once, what the
    cards leave out in a run without thumbnails or captions. The component's key is
    ``gallery-<key>`` (:data:`KEY_PREFIX`)."""
    if not len(rows):
        st.info("No stimuli to show.")
        return
    missing = [what for what, present in (("thumbnails", run.has_thumbnails),
                                          ("captions", run.has_captions)) if not present]
    if missing:
        shown = ": the cards show ids and scores." if len(missing) == 2 else "."
        st.caption(f"This run has no {' and no '.join(missing)}{shown}")
    cards = [card(run, int(row), label) for row, label in zip(rows, labels, strict=True)]
    component_key = f"{KEY_PREFIX}{key}"
    _component(
        key=component_key,
        data={"columns": int(columns), "inspect": bool(inspect),
              "cards": [asdict(c) for c in cards]},
        on_inspect_change=lambda: inspect_trigger(component_key),
    )
