"""Streamlit building blocks shared by the pages: caption text, stimulus cards, galleries and the
dispersion-score choice.

Captions and ids come from the web. They are only ever shown with ``st.text`` (or inside a
dataframe), which renders plain text: never Markdown, never HTML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import streamlit as st

from ..run import Run
from . import plots, state

#: Session key of the stimulus id shown in the Stimuli page's detail view.
INSPECT_KEY = "w_inspect"
#: Session key of the Stimuli page's open tab, and the label of its detail tab (Inspect opens it)
STIMULI_TAB_KEY = "w_stimuli_tab"
DETAIL_TAB = "Stimulus in detail"
#: Session key (not a widget's) remembering the inspected stimulus while the detail tab is closed
INSPECTED = "stimuli_inspected"
#: Up to this many stimuli the detail view offers every id in a select box (ranked); above it an
#: id is typed (a select box of 100,000 ids would send them all to the browser on every rerun)
SELECT_ALL_LIMIT = 5_000


def score_radio(
    view: state.View, label: str, *, horizontal: bool = True, help: str | None = None
) -> str:
    """A radio of the dispersion scores (mean / PC1) bound to ``view.score`` (so to the URL)."""
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
        ),
    )


def show_captions(captions: Sequence[str], *, first_only: bool = False) -> None:
    """Captions as plain text, one per line (``first_only``: the first and a count of the rest)."""
    if not captions:
        st.text("(no caption)")
        return
    if first_only:
        more = f"  (+{len(captions) - 1} more)" if len(captions) > 1 else ""
        st.text(f"“{captions[0]}”{more}")
        return
    for caption in captions:
        st.text(f"• {caption}")


def _inspect(identifier: str) -> None:
    st.session_state[INSPECT_KEY] = identifier
    st.session_state[INSPECTED] = identifier
    st.session_state[STIMULI_TAB_KEY] = DETAIL_TAB


def stimulus_card(
    run: Run, row: int, label: str, *, key: str, all_captions: bool = True, inspect: bool = True
) -> None:
    """Thumbnail, label, captions and (``inspect``) an "Inspect" button for one stimulus.

    ``all_captions``: the first caption plus an expander with all of them; else only the first.
    """
    thumbnail = run.thumbnail_path(row)
    if thumbnail is not None:
        st.image(str(thumbnail), width="stretch")
    else:
        st.text("(no thumbnail in this run)")
    identifier = str(run.stimuli["id"].iloc[row])
    st.text(label)
    captions = list(run.stimuli["captions"].iloc[row]) if "captions" in run.stimuli else []
    if all_captions and len(captions) > 1:
        show_captions(captions[:1])
        with st.expander(f"all {len(captions)} captions"):
            show_captions(captions)
    else:
        show_captions(captions, first_only=True)
    if inspect:
        st.button("Inspect", key=f"{key}-inspect-{row}", on_click=_inspect, args=(identifier,))


def gallery(
    run: Run,
    rows: Sequence[int],
    labels: Sequence[str],
    *,
    key: str,
    columns: int = 4,
    all_captions: bool = True,
    inspect: bool = True,
) -> None:
    """A grid of :func:`stimulus_card` s, ``columns`` per line, in the given order."""
    if not len(rows):
        st.info("No stimuli to show.")
        return
    for start in range(0, len(rows), columns):
        cells = st.columns(columns)
        for cell, row, label in zip(
            cells, rows[start : start + columns], labels[start : start + columns], strict=False
        ):  # the last line may have fewer stimuli than columns
            with cell:
                stimulus_card(
                    run, int(row), label, key=key, all_captions=all_captions, inspect=inspect
                )


def captions_frame(run: Run, rows: Sequence[int]) -> pd.DataFrame:
    """``id`` and ``caption`` (the first) of ``rows``, for st.dataframe (which shows plain text)."""
    stimuli = run.stimuli.iloc[list(rows)]
    captions = stimuli["captions"] if "captions" in stimuli else [[] for _ in range(len(stimuli))]
    return pd.DataFrame(
        {
            "id": stimuli["id"].astype(str).to_numpy(),
            "caption": [c[0] if len(c) else "" for c in captions],
        }
    )


#: Every ASCII punctuation character: CommonMark lets each be backslash-escaped to stand for itself
_MARKDOWN_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def escape_markdown(value: object) -> str:
    """``value`` as Markdown that renders exactly as the text: every ASCII punctuation character
    backslash-escaped (so no emphasis, link, image, HTML tag, table pipe or Streamlit directive
    such as ``:red[…]`` survives), line breaks and runs of spaces made single spaces."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(value).split()))


def markdown_table(frame: pd.DataFrame, *, max_cell: int = 60) -> str:
    """A small table as a Markdown table for ``st.markdown``, every cell escaped
    (:func:`escape_markdown`) and cut to ``max_cell`` characters.

    For a few rows of run metadata and numbers (model names, layers, test statistics), never for
    captions (those go through ``st.text`` only): ``st.dataframe`` would make the browser load its
    data-grid code (about 1.4 MB of JavaScript) for them, ``st.text`` is not monospaced.
    """

    def cell(value: object) -> str:
        text = " ".join(str(value).split())
        text = text if len(text) <= max_cell else text[: max_cell - 1] + "…"
        return escape_markdown(text) or " "

    header = "| " + " | ".join(cell(name) for name in frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(cell(value) for value in record) + " |"
        for record in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])
