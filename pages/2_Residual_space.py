"""Residual space: PCA (or UMAP) of the GPA residuals; box/lasso selection; export and import.

The map is first a picture drawn on the server (``charts.residual_scatter``); a toggle turns it
into the interactive chart (hover, box and lasso selection), which costs the browser Plotly's
4.7 MB of JavaScript. The interactive scatter is WebGL (Plotly ``scattergl``) at any number of
stimuli; above ``plots.HOVER_TEXT_LIMIT`` points it carries no per-point text (see
``plots.residual_scatter``). The principal components are shown only when their expander opens.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from convergence_core.dashboard import (
    catalogue,
    data,
    gallery,
    page,
    plots,
    predictors,
    selection_io,
    state,
    widgets,
)
from convergence_core.dispersion import two_model_note

SELECTION_GALLERY_LIMIT = 24
LAST_CHART_ROWS = "residual_space_last_chart_rows"
LAST_IMPORT = "residual_space_last_import"
#: Session key of the interactive-chart toggle (kept across page switches)
INTERACTIVE_KEY = "w_interactive_scatter"
COLOUR_KEY = "w_colour_property"
#: The colour choice that leaves the map coloured by the dispersion score (the radio's)
SCORE_COLOUR = "(dispersion score)"

context = page.open_page("pages/2_Residual_space.py")
run, view = context.run, context.view
stimuli = run.stimuli
found = data.catalogue(run)
ids = found.ids
n = run.n_stimuli
pca = run.pca

controls = st.columns(2)
with controls[0]:
    # kept: the choice stays while the user visits other pages
    projection = state.kept_widget(st.session_state, "w_projection", lambda key: st.radio(
        "Projection",
        ("PCA", "UMAP"),
        key=key,
        horizontal=True,
        help="PCA: PC1 vs PC2 of the residual matrix R (stimuli × GPA models). "
        "UMAP (umap-learn, fixed seed) of R: computed once per run and cached.",
    ))
properties = predictors.run_properties(run)
colour_choices = [SCORE_COLOUR, *(properties.names if properties is not None else [])]
state.drop_stale_choice(st.session_state, COLOUR_KEY, colour_choices)
colour_kept = state.kept_value(st.session_state, COLOUR_KEY, SCORE_COLOUR)
# one control path: the radio picks the score that colours the map until the popover's select
# picks a property; then the radio is greyed out and says so (it still ranks the selection)
with controls[1]:
    score = widgets.score_radio(
        view,
        "Colour by",
        disabled=colour_kept != SCORE_COLOUR,
        help="The dispersion score that colours the map (and ranks the selection below)."
        if colour_kept == SCORE_COLOUR
        else "The map is coloured by the property chosen under Colour; choose "
        "'dispersion score' there to colour it by this score again (it still ranks the "
        "selection below).",
    )
colour_now = widgets.excerpt(
    plots.SCORE_NAME[score] if colour_kept == SCORE_COLOUR else colour_kept, 30
)
# in a popover (its label says the choice): the browser builds the select box only when opened
with controls[1].popover(  # a short label: one line in a 1024-pixel window
    f"Colour: {widgets.escape_markdown(colour_now)}", icon=":material/palette:"
):
    colour_by = widgets.choose_one(
        "Colour by a stimulus property",
        colour_choices,
        key=COLOUR_KEY,
        format_func=lambda choice: (
            f"dispersion score ({plots.SCORE_NAME[score]})" if choice == SCORE_COLOUR else choice
        ),
        help="Any column of the run's property table (What predicts dispersion page), or the "
        "dispersion score picked under Colour by.",
    )
colour_property = colour_by if properties is not None and colour_by in properties.names else ""

# The chart's last box or lasso and an uploaded file are in the session state before their
# widgets are drawn: applied here, so the map below already circles the selection they make.
CHART_KEY = "residual-scatter"
chart_state = st.session_state.get(CHART_KEY)
chart_rows = selection_io.rows_from_chart_selection(
    chart_state.get("selection") if chart_state is not None else None, n
)
if chart_state is not None and tuple(chart_rows) != st.session_state.get(LAST_CHART_ROWS, ()):
    st.session_state[LAST_CHART_ROWS] = tuple(chart_rows)
    if chart_rows:
        state.set_selection(
            st.session_state,
            run.name,
            [ids[r] for r in chart_rows],
            origin=f"{projection} {score} chart",
        )
import_messages: list[tuple[str, str]] = []  # (kind, text), shown under the import popover
uploaded = st.session_state.get("w_import")
if uploaded is not None and uploaded.file_id != st.session_state.get(LAST_IMPORT):
    st.session_state[LAST_IMPORT] = uploaded.file_id
    imported, import_messages = selection_io.imported_selection(
        uploaded.getvalue(), found.rows_of, widgets.excerpt, known=found.position
    )
    if imported is not None:
        state.set_selection(
            st.session_state, run.name, [ids[r] for r in imported], origin="an imported file"
        )

selection = state.get_selection(st.session_state, run.name)
selected_rows = found.rows_of(selection.ids)[0] if selection else np.array([], dtype=int)
try:
    shown = data.residual_map(run, projection)
except (ValueError, OSError) as exc:
    st.error(widgets.escape_markdown(  # the message may name models or paths: as text
        f"UMAP could not be computed for this run: {exc}. Use the PCA projection."
    ))
    st.stop()
if projection == "PCA" and (note := two_model_note(len(run.gpa.models))) is not None:
    st.caption(f"PC2 is rounding noise here. {note}")
if projection == "UMAP" and n > data.UMAP_MAX_FIT:
    st.caption(
        f"UMAP was fitted on a seeded random sample of {data.UMAP_MAX_FIT:,} of the {n:,} "
        "stimuli; the others were placed on that map by UMAP's transform."
    )

# kept across page switches: a user who turned the chart interactive keeps it that way
interactive = widgets.interactive_chart_toggle(
    INTERACTIVE_KEY, "Interactive chart: hover, zoom, and box or lasso selection", "map"
)
if not interactive:
    st.image(
        data.residual_scatter_png(
            str(run.path), data.manifest_stamp(run.path), projection, score,
            tuple(int(r) for r in selected_rows), colour_property,
        )
    )
    st.caption(
        "Turn on the interactive chart to select points with a box or a lasso; the current "
        "selection is circled in red."
    )
else:
    colour, colour_title = data.residual_colour(run, found, score, colour_property)
    figure = plots.residual_scatter(
        shown.x,
        shown.y,
        colour,
        ids=ids,
        captions=found.first_captions,
        scores=found.values,
        colour_title=colour_title,
        selected=selected_rows,
        x_title=shown.x_title,
        y_title=shown.y_title,
        title=shown.title,
    )
    st.caption(
        "Drag a box or a lasso around points to make them the current selection."
        + (
            ""
            if n <= plots.HOVER_TEXT_LIMIT
            else f" With {n:,} points, hovering shows each point's colour score only; the "
            "selected stimuli's ids and captions are listed below the chart."
        )
    )
    st.plotly_chart(figure, key=CHART_KEY, on_select="rerun", selection_mode=("box", "lasso"))

# a popover: the browser loads the file uploader's code only when it is opened
with st.popover("Import a selection", icon=":material/upload_file:"):
    uploaded = st.file_uploader(
        "CSV with an 'id' column (e.g. an exported selection) or a text file of ids",
        type=["csv", "txt"],
        key="w_import",
    )
widgets.show_messages(import_messages)


if projection == "PCA":
    components = st.expander(
        "Principal components of the residuals (variance explained, per-model loadings)",
        key="w_components_open",
        on_change="rerun",
    )
    with components:
        if components.open:
            st.image(
                data.residual_components_png(str(run.path), data.manifest_stamp(run.path))
            )
            st.markdown(widgets.markdown_table(
                catalogue.shown_table(catalogue.components_table(run))
            ))

st.header("Current selection")
if selection is None:
    st.info(
        "Empty selection: select points in the chart above (box or lasso), or import a CSV of ids "
        "above. The selection is yours alone (this browser session) and is used by the Stimuli and "
        "Alignment lab pages."
    )
else:
    st.text(f"{len(selection.ids)} stimuli selected (from {selection.origin}).")
    buttons = st.columns(2)
    with buttons[0]:
        chosen_ids, chosen_rows = list(selection.ids), selected_rows
        st.download_button(
            "Export selection (CSV of ids and captions)",
            # written when the button is pressed, not on every rerun (a lasso may hold 10,000)
            lambda: selection_io.selection_csv(
                chosen_ids, [list(stimuli["captions"].iloc[r]) for r in chosen_rows]
            ),
            file_name=f"selection-{run.name}.csv",
            mime="text/csv",
            key="export-selection",
        )
    with buttons[1]:
        if st.button("Clear selection", key="clear-selection"):
            state.clear_selection(st.session_state)
            st.rerun()
    shown = selected_rows[:SELECTION_GALLERY_LIMIT]
    if len(selected_rows) > len(shown):
        st.text(f"Showing the first {len(shown)} of {len(selected_rows)}.")
    rank = found.rank[score]
    gallery.show(
        run,
        shown,
        [f"id {ids[r]} · rank {int(rank[r]) + 1} by {plots.SCORE_NAME[score]}" for r in shown],
        key="selection",
        columns=6,
        inspect=False,
    )

page.close_page(context)
