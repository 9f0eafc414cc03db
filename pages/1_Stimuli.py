"""Stimuli: ranked gallery (lowest vs highest dispersion), caption filter, a stimulus in detail.

Two tabs, and only the open one is built: the gallery first; the detail (ranks, residuals,
nearest neighbours in every model) when the user opens it or presses Inspect under an image.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from convergence_core.dashboard import data, page, plots, state, widgets

PER_SIDE = 6  # stimuli per side and page
GALLERY_COLUMNS = 3
NEIGHBOUR_THUMBNAILS = 5  # per model; the table lists all requested neighbours

context = page.open_page("Stimuli", icon="🖼️")
run, view = context.run, context.view
found = data.catalogue(run)
ids = found.ids
n = run.n_stimuli
path, stamp = str(run.path), data.manifest_stamp(run.path)

controls = st.columns([1, 2, 1])
with controls[0]:
    score = widgets.score_radio(
        view,
        "Rank by",
        help="mean: average residual across vision models; PC1: score on the first principal "
        "component of the residuals (the paper's two dispersion measures).",
    )
with controls[1]:
    query = st.text_input(
        "Filter by caption text",
        key="w_caption_filter",
        placeholder="e.g. dog, kitchen, surf…",
        help="Case-insensitive; matches any caption or the id.",
    )
selection = state.get_selection(st.session_state, run.name)
with controls[2]:
    only_selection = st.toggle(
        "Only the current selection",
        key="w_only_selection",
        disabled=selection is None,
        help="Make a selection on the Residual space page (box/lasso) or import one there.",
    )

rank, values, ascending = found.rank[score], found.values[score], found.order[score]
gallery_tab, detail_tab = st.tabs(
    ["Gallery", widgets.DETAIL_TAB], key=widgets.STIMULI_TAB_KEY, on_change="rerun"
)


def _label(row: int) -> str:
    return (
        f"#{int(rank[row]) + 1} of {n} · id {ids[row]}\n{plots.SCORE_NAME[score]} {values[row]:.4f}"
    )


with gallery_tab:
    if gallery_tab.open:
        keep = found.matching(query)
        if only_selection and selection is not None:
            chosen = np.zeros(n, dtype=bool)
            chosen[found.rows_of(selection.ids)[0]] = True
            keep &= chosen
        ranked = ascending[keep[ascending]]
        n_pages = max(1, math.ceil(len(ranked) / PER_SIDE))
        st.text(
            f"{len(ranked)} of {n} stimuli shown, {PER_SIDE} per side and page, {n_pages} pages."
        )
        page_number = state.bind_widget(
            st.session_state,
            view,
            "page",
            lambda key: st.number_input(
                "Page",
                min_value=1,
                max_value=n_pages,
                step=1,
                key=key,
                help="Each page shows the next stimuli from both ends of the ranking.",
            ),
            coerce=lambda value: min(max(1, int(value)), n_pages),
        )
        start = (page_number - 1) * PER_SIDE
        low_rows = ranked[start : start + PER_SIDE]
        high_rows = ranked[::-1][start : start + PER_SIDE]
        if len(ranked) == 0:
            st.info("No stimulus matches the filter; clear the caption filter to see all.")
        else:
            low_side, high_side = st.columns(2, gap="large")
            with low_side:
                st.subheader("Lowest dispersion (models agree)")
                widgets.gallery(
                    run,
                    low_rows,
                    [_label(r) for r in low_rows],
                    key="low",
                    columns=GALLERY_COLUMNS,
                    all_captions=False,  # all of them: Inspect (fewer elements in the gallery)
                )
            with high_side:
                st.subheader("Highest dispersion (models disagree)")
                widgets.gallery(
                    run,
                    high_rows,
                    [_label(r) for r in high_rows],
                    key="high",
                    columns=GALLERY_COLUMNS,
                    all_captions=False,
                )

with detail_tab:
    if detail_tab.open:
        remembered = st.session_state.get(widgets.INSPECTED)
        if widgets.INSPECT_KEY not in st.session_state and remembered in found.position:
            st.session_state[widgets.INSPECT_KEY] = remembered
        if n <= widgets.SELECT_ALL_LIMIT:
            inspect_options = [str(ids[r]) for r in ascending]
            state.drop_stale_choice(st.session_state, widgets.INSPECT_KEY, inspect_options)
            detail_id = st.selectbox(
                f"Stimulus (by {plots.SCORE_NAME[score]}, lowest first; or press Inspect under "
                "an image in the gallery)",
                inspect_options,
                key=widgets.INSPECT_KEY,
                format_func=widgets.excerpt,
            )
        else:
            if widgets.INSPECT_KEY not in st.session_state:
                st.session_state[widgets.INSPECT_KEY] = str(ids[ascending[0]])
            typed = st.text_input(
                f"Stimulus id (one of {n:,}; or press Inspect under an image in the gallery)",
                key=widgets.INSPECT_KEY,
            ).strip()
            detail_id = typed if typed in found.position else str(ids[ascending[0]])
            if typed not in found.position:
                st.error(
                    f"No stimulus with id '{state.shown(typed)}' in this run: type an id exactly "
                    "as the gallery shows it. Showing the lowest-dispersion stimulus."
                )
        st.session_state[widgets.INSPECTED] = detail_id
        row = int(found.position[detail_id])
        captions = list(run.stimuli["captions"].iloc[row]) if "captions" in run.stimuli else []

        picture, facts = st.columns([1, 2])
        with picture:
            widgets.thumbnail(run, row)
            st.text(f"id {widgets.excerpt(detail_id)}")
            widgets.show_captions(captions, key="detail", title=f"Stimulus {detail_id}")
        with facts:
            ranks = st.columns(2)
            ranks[0].metric(
                "Rank by mean residual",
                f"{int(found.rank['mean'][row]) + 1} / {n}",
                help="1 = lowest dispersion (most agreement among the vision models)",
            )
            ranks[1].metric(
                "Rank by PC1 score",
                f"{int(found.rank['pc1'][row]) + 1} / {n}",
                help="1 = lowest dispersion along the first principal component of the residuals",
            )
            st.image(data.residual_bars_png(path, stamp, row))

        st.subheader("Nearest neighbours")
        st.caption(
            "Most similar stimuli under each model: largest inner product of the prepared "
            "features (the run's exact neighbour lists). Vision models at their GPA layer, "
            "language models at their best layer."
        )
        count = st.slider(
            "Neighbours per model", 3, min(20, n - 1), min(5, n - 1), key="w_neighbour_count"
        )
        try:
            best_layers = data.best_language_layers(path, stamp)
        except ValueError as exc:
            st.warning(
                f"Best language layers unavailable ({exc}); using each language model's default "
                "layer."
            )
            best_layers = {}
        model_layers = [*zip(run.gpa.models, run.gpa.layers, strict=True)] + [
            (model, best_layers.get(model, run.default_layer(model)))
            for model in run.language_models
        ]
        neighbours = {
            model: (layer, *run.nearest(model, layer, row, count)) for model, layer in model_layers
        }
        overview = pd.DataFrame({"neighbour": np.arange(1, count + 1)})
        for model, (layer, neighbour_rows, similarity) in neighbours.items():
            overview[f"{model} ({layer})"] = [
                f"{widgets.excerpt(ids[r])} · {s:.3f}"
                for r, s in zip(neighbour_rows, similarity, strict=True)
            ]
        st.text(
            "Neighbour ids and similarities in every model (same id in several columns: the "
            "models agree):"
        )
        st.dataframe(overview, hide_index=True, width="stretch")

        state.drop_stale_choice(
            st.session_state, "w_neighbour_model", [model for model, _ in model_layers]
        )
        shown_model = st.radio(
            "Neighbours in detail for",
            [model for model, _ in model_layers],
            key="w_neighbour_model",
            horizontal=True,
            format_func=lambda m: f"{m} ({run.modality(m)})",
        )
        layer, neighbour_rows, similarity = neighbours[shown_model]
        thumbs = st.columns(NEIGHBOUR_THUMBNAILS)
        for cell, neighbour in zip(thumbs, neighbour_rows[:NEIGHBOUR_THUMBNAILS], strict=False):
            with cell:
                widgets.thumbnail(run, int(neighbour))
                st.text(widgets.excerpt(ids[neighbour]))
        detail = widgets.captions_frame(run, neighbour_rows)
        detail.insert(0, "neighbour", np.arange(1, len(neighbour_rows) + 1))
        detail.insert(2, "similarity", similarity)
        detail[f"rank ({plots.SCORE_NAME[score]})"] = rank[neighbour_rows] + 1
        st.dataframe(detail, hide_index=True, width="stretch")

page.close_page(context)
