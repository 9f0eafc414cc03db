"""Streamlit building blocks shared by the pages: caption text, thumbnails, number cards and the
dispersion-score choice (the grids of stimulus cards are :mod:`.gallery`).

Captions and ids come from the web. They are only ever shown with ``st.text`` (or inside a
dataframe, or as ``textContent`` in the gallery), which renders plain text: never Markdown, never
HTML. Cards, labels and tables show them as bounded excerpts (:func:`excerpt`,
``settings.caption_excerpt_chars()`` characters: a 100,000-character caption rendered whole froze
the browser); in the detail view, where a caption was cut (:func:`captions_cut`), a "Full
captions" button opens a dialog with the whole text (still ``st.text``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from .. import settings
from ..images import ImageFileError, open_rgb
from ..run import Run
from . import catalogue, controls, plots, state

#: Session key of the stimulus id shown in the Stimuli page's detail view.
INSPECT_KEY = "w_inspect"
#: Session key of the Stimuli page's open tab, and the label of its detail tab (Inspect opens it)
STIMULI_TAB_KEY = "w_stimuli_tab"
DETAIL_TAB = "Stimulus in detail"
#: Session key (not a widget's) remembering the inspected stimulus while the detail tab is closed
INSPECTED = "stimuli_inspected"
#: Key prefix of a number card's container (:func:`number_cards`): ``card-<row key>-<index>``, for
#: the browser test and the AppTests, which read a card's label and value inside it
CARD_KEY_PREFIX = "card-"
#: Up to this many stimuli the detail view offers every id in a select box (ranked); above it an
#: id is typed (a select box of 100,000 ids would send them all to the browser on every rerun)
SELECT_ALL_LIMIT = 5_000


def score_radio(
    view: state.View,
    label: str,
    *,
    horizontal: bool = True,
    help: str | None = None,
    disabled: bool = False,
) -> str:
    """A radio of the dispersion scores (mean / PC1) bound to ``view.score`` (so to the URL);
    ``disabled`` (greyed out, its value kept) where another control has taken over its role."""
    return state.bind_widget(
        st.session_state,
        view,
        "score",
        lambda key: st.radio(
            label,
            state.SCORES,
            key=key,
            horizontal=horizontal,
            format_func=lambda s: plots.SCORE_NAME[s],
            help=help,
            disabled=disabled,
        ),
    )


#: Up to this many options a choice is a row of pills (:func:`choose_one`, :func:`choose_many`);
#: above it a select box. Select boxes cost a first visit ~0.1-0.15 s more in the browser: their
#: code loads and runs when the page first shows one (benchmarks/bench_dashboard.py)
PILL_LIMIT = 12


def _pill_text(format_func: Callable[[Any], object]) -> Callable[[Any], str]:
    # a pill's label is Markdown: escaped, so that a model name shows exactly as written
    return lambda option: escape_markdown(format_func(option))


def choose_one(
    label: str,
    options: Sequence[Any],
    *,
    key: str,
    format_func: Callable[[Any], object] = str,
    help: str | None = None,
) -> Any:
    """One of ``options``: a row of pills, one always chosen (the first until the user picks),
    or a select box above :data:`PILL_LIMIT` options. Its value lives in ``st.session_state[key]``
    either way, and is kept while the user visits other pages (:func:`state.kept_widget`)."""
    options = list(options)

    def widget(key: str) -> Any:
        if len(options) > PILL_LIMIT:
            return st.selectbox(label, options, key=key, format_func=format_func, help=help)
        if key not in st.session_state:  # the first value through the session state, as below
            st.session_state[key] = options[0]
        return st.pills(
            label,
            options,
            required=True,
            key=key,
            format_func=_pill_text(format_func),
            help=help,
        )

    return state.kept_widget(st.session_state, key, widget)


def choose_many(
    label: str,
    options: Sequence[Any],
    *,
    key: str,
    format_func: Callable[[Any], object] = str,
    help: str | None = None,
) -> list[Any]:
    """Any of ``options`` (all chosen until the user changes it): a row of pills, or a
    multi-select box above :data:`PILL_LIMIT` options. The value (a list) lives in
    ``st.session_state[key]`` either way, and is kept while the user visits other pages
    (:func:`state.kept_widget`; a choice made on another run:
    :func:`state.carry_choices_to_run`)."""
    options = list(options)

    def widget(key: str) -> list[Any]:
        # the first value through the session state, not a default argument: Streamlit reports
        # a default beside a value restored through the session state
        if key not in st.session_state:
            st.session_state[key] = options
        if len(options) > PILL_LIMIT:
            return st.multiselect(label, options, key=key, format_func=format_func, help=help)
        chosen = st.pills(
            label,
            options,
            selection_mode="multi",
            key=key,
            format_func=_pill_text(format_func),
            help=help,
        )
        return list(chosen or [])

    return state.kept_widget(st.session_state, key, widget)


#: Suffix of the widget key of a multi-select box that stands in for a row's chips
#: (:func:`choose_many_in_row`): the field's own key stays a plain session key
BOX_SUFFIX = "__box"


def choose_many_in_row(fields: Sequence[Any], *, key: str) -> dict[str, list[Any]]:
    """``fields`` (``controls.many``: any of their options) as one row of chips drawn by the
    browser (``controls.row``, keyed ``key``), except a field of more than :data:`PILL_LIMIT`
    options: that one is a multi-select box (type to search; 30 brain subjects as chips were 15
    rows of them, and choosing one of them 29 clicks), drawn first. Returns each field's name ->
    its chosen options.

    Either way the choice lives under the field's ``key`` as a plain session value: the box has a
    key of its own (``key + BOX_SUFFIX``), set from the field's value on every rerun, and its
    change is copied back to it (the box's callback).
    (Sharing one key, a run of 12 models or fewer after one of more kept the box's widget
    mapping, and Streamlit dropped every change the chips wrote.)"""
    chosen: dict[str, list[Any]] = {}
    chips = []
    for field in fields:
        if len(field.options) <= PILL_LIMIT:
            chips.append(field)
            chosen[field.name] = list(field.value)
            continue
        labels = dict(zip(field.options, field.labels, strict=True))
        box = field.key + BOX_SUFFIX

        def copy(box: str = box, field: Any = field) -> None:  # the box's change, before rerun
            st.session_state[field.key] = list(st.session_state[box])

        st.session_state[box] = list(field.value)  # the plain value is the choice
        chosen[field.name] = list(st.multiselect(
            field.label, list(field.options), key=box, format_func=labels.get, on_change=copy,
            help=field.help or None,
        ))
    if chips:
        controls.row(chips, key=key)
    return chosen


def ask_first(
    long: bool,
    done: Sequence[object],
    message: str,
    button: str,
    *,
    key: str,
    icon: str | None = None,
) -> bool:
    """Whether to compute a long analysis now: at once when it is not ``long`` here or this
    server has computed it already (``done``: its key in ``data.finished``, shown to every
    session); otherwise only when the user presses ``button``, under ``message`` (what it
    costs)."""
    from . import data

    if not long or data.finished(*done):
        return True
    st.info(message)
    return st.button(button, key=key, icon=icon)


def interactive_chart_toggle(key: str, label: str, picture_of: str) -> bool:
    """The toggle between a server-drawn picture of a chart and the interactive Plotly chart,
    kept while the page or tab is not shown (:func:`state.kept_widget`: Streamlit forgets a
    widget it does not draw). ``picture_of`` names what the picture shows ("map", "scatter")."""
    return state.kept_widget(
        st.session_state,
        key,
        lambda widget_key: st.toggle(
            label,
            key=widget_key,
            help=f"Off: a picture of the same {picture_of}, drawn on the server (quick to load). "
            "On: the Plotly chart, whose code takes the browser a few seconds to load the first "
            "time in a tab.",
        ),
    )


def excerpt(text: object, limit: int | None = None) -> str:
    """``text`` as a string of at most about ``limit`` characters (default
    ``settings.caption_excerpt_chars()``): a longer one is cut and ends with "…" and its full
    length, e.g. ``"a dog on a … [100,000 characters]"``."""
    text = str(text)
    limit = settings.caption_excerpt_chars() if limit is None else int(limit)
    if len(text) <= limit:
        return text
    return f"{text[: max(1, limit - 1)].rstrip()}… [{len(text):,} characters]"


@st.dialog("Captions", width="large")
def _full_captions_dialog(title: str, captions: Sequence[str]) -> None:
    st.text(excerpt(title))
    for number, caption in enumerate(captions, start=1):
        st.text(f"{number}. {caption}" if len(captions) > 1 else caption)


def captions_cut(captions: Sequence[str]) -> bool:
    """Whether an excerpt (:func:`excerpt`) cuts one of ``captions``: then a "Full captions"
    shows them whole."""
    limit = settings.caption_excerpt_chars()
    return any(len(caption) > limit for caption in captions)


def full_captions_button(captions: Sequence[str], *, key: str, title: str = "") -> None:
    """A "Full captions" button (widget key ``<key>-full-captions``), shown only when one of
    ``captions`` is cut (:func:`captions_cut`); it opens a dialog headed ``title`` with every
    caption whole (``st.text``)."""
    if captions_cut(captions) and st.button(
        "Full captions",
        key=f"{key}-full-captions",
        icon=":material/notes:",
        help=f"Captions longer than {settings.caption_excerpt_chars()} characters are cut here; "
        "this shows them whole.",
    ):
        _full_captions_dialog(title, list(captions))


def first_caption_text(captions: Sequence[str]) -> str:
    """The first caption in quotes, as an :func:`excerpt`, and how many more there are:
    ``“A dog on a sofa.”  (+4 more)``; ``(no caption)`` when there is none."""
    if not captions:
        return "(no caption)"
    more = f"  (+{len(captions) - 1} more)" if len(captions) > 1 else ""
    return f"“{excerpt(captions[0], settings.caption_excerpt_chars())}”{more}"


def show_captions(
    captions: Sequence[str],
    *,
    first_only: bool = False,
    key: str | None = None,
    title: str = "",
) -> None:
    """Captions as plain text, one per line (``first_only``: the first and a count of the rest),
    each as an :func:`excerpt`; with ``key``, the :func:`full_captions_button`."""
    if not captions:
        st.text("(no caption)")
        return
    limit = settings.caption_excerpt_chars()
    if first_only:
        st.text(first_caption_text(captions))
    else:
        for caption in captions:
            st.text(f"• {excerpt(caption, limit)}")
    if key is not None:
        full_captions_button(captions, key=key, title=title)


_JPEG_MAGIC = b"\xff\xd8\xff"


#: Largest thumbnail file shown (the precompute writes ~20 kB JPEGs, 256 px on the longest side):
#: a gallery sends its thumbnails inside the page's message, so a padded file in an altered run
#: would make every page that shows it megabytes
THUMBNAIL_MAX_BYTES = 1_000_000


def thumbnail_file(run: Run, row: int) -> tuple[Path | None, str | None]:
    """``(path, problem)`` of a stimulus's thumbnail: ``(None, None)`` when the run has none for
    it; ``problem`` (with ``path`` None) when the file is unreadable: not a JPEG, undecodable,
    larger than :data:`THUMBNAIL_MAX_BYTES` or leading outside the run (a damaged or altered run,
    which never stops a page)."""
    try:
        path = run.thumbnail_path(row)
    except ValueError:  # CacheFormatError: a thumbnail path that leads outside the run folder
        return None, "it leads outside the run folder"
    if path is None:
        return None, None
    try:
        size = os.stat(path).st_size
        if size > THUMBNAIL_MAX_BYTES:
            return None, (
                f"it is {size:,} bytes, where a thumbnail is ~20 kB (at most "
                f"{THUMBNAIL_MAX_BYTES:,})"
            )
        with open(path, "rb") as handle:
            head = handle.read(len(_JPEG_MAGIC))
        if head != _JPEG_MAGIC:
            return None, "it is not a JPEG file"
        open_rgb(path)  # decodes (a 256 px JPEG: ~1 ms), refusing oversized ones
    except (OSError, ImageFileError) as exc:
        return None, f"it cannot be decoded ({type(exc).__name__})"
    return Path(path), None


def unreadable_thumbnail_note(problem: str) -> str:
    """What is shown instead of an unreadable thumbnail (:func:`thumbnail_file`'s ``problem``)."""
    return f"(thumbnail unreadable: {problem}; rerun precompute to rewrite the run's thumbnails)"


def thumbnail(run: Run, row: int) -> None:
    """The stimulus's thumbnail (nothing when the run has none), or a placeholder text when the
    file is unreadable (:func:`thumbnail_file`)."""
    path, problem = thumbnail_file(run, row)
    if problem is not None:
        st.text(unreadable_thumbnail_note(problem))
    elif path is not None:
        st.image(str(path), width="stretch")


def inspect(identifier: str) -> None:
    """Open the Stimuli page's detail tab on stimulus ``identifier`` (a gallery's Inspect
    button; call it from a widget callback, before the page's widgets are drawn)."""
    st.session_state[INSPECT_KEY] = identifier
    st.session_state[INSPECTED] = identifier
    st.session_state[STIMULI_TAB_KEY] = DETAIL_TAB


def show_messages(messages: Sequence[tuple[str, str]]) -> None:
    """``(kind, text)`` messages (``selection_io``), each as ``st.<kind>`` (error, warning, text,
    success, info), as plain text: they may quote a user's file (its ids, its column names), so
    Markdown in them is escaped (:func:`escape_markdown`)."""
    for kind, text in messages:
        if kind not in ("error", "warning", "text", "success", "info"):
            raise ValueError(f"unknown message kind {kind!r}")
        getattr(st, kind)(text if kind == "text" else escape_markdown(text))


def captions_frame(run: Run, rows: Sequence[int]) -> pd.DataFrame:
    """``id`` and ``caption`` (the first, as an :func:`excerpt`) of ``rows``, for st.dataframe
    (which shows plain text); ``id`` alone when the run has no captions."""
    stimuli = run.stimuli.iloc[list(rows)]
    frame = pd.DataFrame({"id": [excerpt(i) for i in stimuli["id"].astype(str)]})
    if run.has_captions:
        frame["caption"] = [excerpt(c[0]) if len(c) else "" for c in stimuli["captions"]]
    return frame


#: Every ASCII punctuation character: CommonMark lets each be backslash-escaped to stand for itself
_MARKDOWN_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def escape_markdown(value: object) -> str:
    """``value`` as Markdown that renders exactly as the text: every ASCII punctuation character
    backslash-escaped (so no emphasis, link, image, HTML tag, table pipe or Streamlit directive
    such as ``:red[…]`` survives), line breaks and runs of spaces made single spaces."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(value).split()))


class ProgressBar:
    """An ``st.progress`` bar fed as ``progress(fraction, words)`` (the callbacks of
    ``convergence_core``'s long computations): the words shown as text, since a progress text
    renders Markdown and the words name models as written; the fraction kept within [0, 1]."""

    def __init__(self, words: str) -> None:
        self._bar = st.progress(0.0, text=escape_markdown(words))

    def __call__(self, done: float, words: str) -> None:
        self._bar.progress(min(1.0, max(0.0, float(done))), text=escape_markdown(words))

    def empty(self) -> None:
        """Remove the bar (the work is done)."""
        self._bar.empty()


@dataclass(frozen=True)
class Card:
    """One number card: a short label (one line in a 1024-pixel window), the value as text, an
    optional change ("+0.0123 vs random": green with an up arrow when it starts with "+", red
    with a down arrow when it starts with "-" or "−", grey otherwise) and the label's help."""

    label: str
    value: str
    delta: str | None = None
    help: str | None = None


def _delta_badge(delta: str) -> str:
    if delta.startswith("+"):
        colour, arrow = "green", ":material/arrow_upward: "
    elif delta.startswith(("-", "−")):
        colour, arrow = "red", ":material/arrow_downward: "
    else:
        colour, arrow = "gray", ""
    return f":{colour}-badge[{arrow}{escape_markdown(delta)}]"


def number_cards(cards: Sequence[Card], *, key: str, widths: Sequence[float] | None = None) -> None:
    """A row of number cards, one per column (``widths`` as for ``st.columns``; default equal):
    the label in small text (its help as a tooltip), the value as a heading, the change as a
    badge below it. They look like ``st.metric`` but are drawn with Markdown and a heading,
    whose code every page has loaded already, where ``st.metric`` makes the browser load and run
    its own on a page's first visit: with these cards the Alignment lab's first visit took a
    median 100 ms less (9 rounds of old and new code side by side, 7 faster;
    ``benchmarks/bench_dashboard.py --element-costs`` times each kind of element alone). Each
    card's container has the key ``card-<key>-<index>`` (:data:`CARD_KEY_PREFIX`)."""
    columns = st.columns(list(widths) if widths is not None else len(cards))
    for index, (column, card) in enumerate(zip(columns, cards, strict=True)):
        with column.container(gap=None, key=f"{CARD_KEY_PREFIX}{key}-{index}"):
            st.markdown(f":small[{escape_markdown(card.label)}]", help=card.help)
            st.subheader(escape_markdown(card.value), anchor=False)
            if card.delta:
                st.markdown(_delta_badge(card.delta))


def number_text(value: object, digits: int = 4) -> str:
    """A table cell's text: floats to ``digits`` significant digits (``0.3324``, ``2.813e-06``;
    whole numbers from 10,000 up with thousands separators), anything else as ``str``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, float | np.floating):
        return str(value)
    if not np.isfinite(value):
        return str(float(value))
    if abs(value) >= 10_000 and float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


#: zero-width space: where a table header may break
_BREAK = "\u200b"
#: word joiner: no line break on either side (after a minus sign inside a number)
_JOIN = "\u2060"
#: A cell that is one number or a short phrase of one ("0.3324", "< 0.001", "ρ = +0.066",
#: "70.7 %", "3.2e-04", "W = 0"): kept on one line (:func:`unbroken`)
_NUMBER_CELL = re.compile(
    r"(?:\S{1,3}[ \u00a0]?[=<>≤≥][ \u00a0]?|[<>≤≥][ \u00a0]?)?[-+−]?\d[\d,]*(?:\.\d+)?"
    r"(?:e[-+]?\d+)?(?:[ \u00a0]?%)?"
)


def unbroken(text: str) -> str:
    """``text`` (escaped Markdown or plain) that never wraps inside: its spaces no-break spaces,
    a word joiner after each minus sign. A 1024-pixel window broke "3.2e-04" and "ρ = +0.0663"
    over two lines of a table cell."""
    text = text.replace(" ", "\u00a0")
    return re.sub(r"([-−])", "\\1" + _JOIN, text)


def markdown_table(frame: pd.DataFrame, *, max_cell: int = 60) -> str:
    """A small table as a Markdown table for ``st.markdown``, every cell escaped
    (:func:`escape_markdown`) and cut to ``max_cell`` characters; floats to 4 significant digits
    (:func:`number_text`).

    For a few rows of run metadata and numbers (model names, layers, test statistics), never for
    captions (those go through ``st.text`` only): ``st.dataframe`` would make the browser load its
    data-grid code (about 1.4 MB of JavaScript) for them, ``st.text`` is not monospaced.
    """

    def cell(value: object) -> str:
        text = " ".join(number_text(value).split())
        text = text if len(text) <= max_cell else text[: max_cell - 1] + "…"
        if _NUMBER_CELL.fullmatch(text):  # a number stays on one line (:func:`unbroken`)
            return unbroken(escape_markdown(text))
        return escape_markdown(text) or " "

    # a header may break after an underscore (a zero-width space, invisible): snake_case column
    # names are single words that would otherwise set the table's width and push it past a
    # 1024-pixel window
    header = "| " + " | ".join(
        cell(name).replace("\\_", "\\_" + _BREAK) for name in frame.columns
    ) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(cell(value) for value in record) + " |"
        for record in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


#: Columns of p- or q-values: a sortable table shows them to four significant digits (one format
#: a column; :func:`catalogue.p_text` chooses per value elsewhere; exact values: the CSV download)
P_VALUE_COLUMNS = frozenset({
    "p_value", "q_value", "p_value_asymptotic", "pearson_p_value", "spearman_p_value",
    "permutation_p_value_two_sided", "permutation_p_value_low_greater",
    "mean_over_pairs_p_value_two_sided", "mean_over_pairs_p_value_low_greater",
    "p_value_vs_shuffled", "p vs shuffled",
})


#: Most distinct values of a column whose machine names :func:`data_table` shows in words (a
#: column of ids or captions is not one)
MACHINE_NAME_LIMIT = 50


def _machine_names(column: pd.Series) -> list[str] | None:
    """The distinct values of a text column when one of them has a display name (else None)."""
    if not (column.dtype == object or pd.api.types.is_string_dtype(column)):
        return None
    values = list(dict.fromkeys(column.dropna()))
    if len(values) > MACHINE_NAME_LIMIT:
        return None
    if not values or not all(isinstance(v, str) for v in values):
        return None
    if all(catalogue.display_name(v) == v for v in values):
        return None
    return values


def data_table(
    frame: pd.DataFrame,
    *,
    column_config: dict[str, Any] | None = None,
    names: dict[str, str] | None = None,
    **options: Any,
) -> Any:
    """``st.dataframe`` of ``frame`` as a reader reads it, its data untouched: each header the
    column's display name (:func:`catalogue.display_name`, or ``names``) as its label, p- and
    q-value columns (:data:`P_VALUE_COLUMNS`) to four significant digits, and a text column of
    machine names (``boosted_trees``, ``vision_to_language``) showing their display names (a
    read-only select-box column, whose cells show a label for each value).

    The grid's CSV download (its toolbar) writes the data, so it keeps the machine-readable
    column names and values. ``column_config`` entries are kept (given a label when they have
    none); ``options`` go to ``st.dataframe``."""
    config: dict[str, Any] = dict(column_config or {})
    names = names or {}
    for column in frame.columns:
        label = names.get(column, catalogue.display_name(column, column=True))
        given = config.get(column, ...)
        if given is None or isinstance(given, str):  # hidden, or a label given
            continue
        if given is ...:
            values = (
                _machine_names(frame[column])
                if column in catalogue.MACHINE_VALUE_COLUMNS else None
            )
            if column in P_VALUE_COLUMNS:
                # 4 significant digits: fewer rounded 0.0496 to "0.05" beside a "q < 0.05"
                # (the grid takes one format a column; catalogue.p_text chooses per value)
                given = st.column_config.NumberColumn(format="%.4g")
            elif values is not None:
                # sized by its longest word (~8 px a character), not by the data: "medium" made
                # the predictors' fit table wider than the page at 1400 px
                words = max(len(catalogue.display_name(value)) for value in values)
                given = st.column_config.SelectboxColumn(
                    width=min(300, 8 * words + 24), options=values,
                    format_func=catalogue.display_name,
                )
            else:
                given = st.column_config.Column()
        config[column] = {**given, "label": given.get("label") or label}
    return st.dataframe(frame, column_config=config, **options)
