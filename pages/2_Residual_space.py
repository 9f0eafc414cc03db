"""Residual space: PCA (or UMAP) of the GPA residuals; box/lasso selection; export and import."""

from __future__ import annotations

import numpy as np
import streamlit as st

from convergence_core.dashboard import (
    data,
    page,
    plots,
    predictor_plots,
    predictors,
    selection_io,
    state,
    widgets,
)

SELECTION_GALLERY_LIMIT = 24
LAST_CHART_ROWS = "residual_space_last_chart_rows"
LAST_IMPORT = "residual_space_last_import"

context = page.open_page("Residual space", icon="🧭")
run, view = context.run, context.view
stimuli, dispersion = run.stimuli, run.dispersion
ids = stimuli["id"].astype(str).tolist()
first_captions = [c[0] if len(c) else "" for c in stimuli["captions"]]
n = run.n_stimuli
pca = run.pca

controls = st.columns(2)
with controls[0]:
    projection = st.radio(
        "Projection",
        ("PCA", "UMAP"),
        key="w_projection",
        horizontal=True,
        help="PCA: PC1 vs PC2 of the residual matrix R (stimuli × vision models). "
        "UMAP (umap-learn, fixed seed) of R: computed once per run and cached.",
    )
with controls[1]:
    score = widgets.score_radio(view, "Colour by")
properties = predictors.run_properties(run)
colour_choices = ["(the dispersion score)", *(properties.names if properties is not None else [])]
colour_by = st.selectbox(
    "Colour by a stimulus property",
    colour_choices,
    key="w_colour_property",
    help="Any column of the run's property table (What predicts dispersion page); the default "
    "colours by the dispersion score chosen above.",
)

selection = state.get_selection(st.session_state, run.name)
selected_rows = (
    selection_io.match_ids(selection.ids, ids)[0] if selection else np.array([], dtype=int)
)
mean = dispersion["mean"].to_numpy(dtype=np.float64)
pc1 = dispersion["pc1"].to_numpy(dtype=np.float64)
common = {
    "ids": ids,
    "captions": first_captions,
    "mean": mean,
    "pc1": pc1,
    "colour_title": plots.COLOUR_TITLE[score],
    "selected": selected_rows,
}
colour = dispersion[score].to_numpy(dtype=np.float64)
if properties is not None and colour_by in properties.names:
    colour, common["colour_title"] = predictor_plots.property_colour(properties, colour_by)
if projection == "PCA":
    ratio = np.asarray(pca.explained_variance_ratio, dtype=np.float64)
    scores = np.asarray(pca.scores, dtype=np.float64)
    second = scores[:, 1] if scores.shape[1] > 1 else np.zeros(n)
    figure = plots.residual_scatter(
        scores[:, 0],
        second,
        colour,
        x_title=f"PC1 of residuals ({100 * ratio[0]:.1f} % of variance; Procrustes distance)",
        y_title=(
            f"PC2 of residuals ({100 * ratio[1]:.1f} % of variance; Procrustes distance)"
            if len(ratio) > 1
            else "PC2 (absent: one model)"
        ),
        title=f"Residual space: {n} stimuli, PCA of the GPA residuals",
        **common,
    )
else:
    try:
        coordinates = data.umap_coordinates(str(run.path), data.manifest_stamp(run.path))
    except (ValueError, OSError) as exc:
        st.error(f"UMAP could not be computed for this run: {exc}. Use the PCA projection.")
        st.stop()
    figure = plots.residual_scatter(
        coordinates[:, 0],
        coordinates[:, 1],
        colour,
        x_title="UMAP 1 (unitless)",
        y_title="UMAP 2 (unitless)",
        title=(
            f"Residual space: {n} stimuli, UMAP of the GPA residuals "
            f"(random_state={data.UMAP_RANDOM_STATE})"
        ),
        **common,
    )

st.caption("Drag a box or a lasso around points to make them the current selection.")
event = st.plotly_chart(
    figure, key="residual-scatter", on_select="rerun", selection_mode=("box", "lasso")
)
chart_rows = selection_io.rows_from_chart_selection(getattr(event, "selection", None), n)
if tuple(chart_rows) != st.session_state.get(LAST_CHART_ROWS, ()):
    st.session_state[LAST_CHART_ROWS] = tuple(chart_rows)
    if chart_rows:
        selection = state.set_selection(
            st.session_state,
            run.name,
            [ids[r] for r in chart_rows],
            origin=f"{projection} {score} chart",
        )
        selected_rows = np.asarray(chart_rows, dtype=int)

st.subheader("Import a selection")
uploaded = st.file_uploader(
    "CSV with an 'id' column (e.g. an exported selection) or a text file of ids",
    type=["csv", "txt"],
    key="w_import",
)
if uploaded is not None and uploaded.file_id != st.session_state.get(LAST_IMPORT):
    st.session_state[LAST_IMPORT] = uploaded.file_id
    try:
        wanted = selection_io.parse_id_list(uploaded.getvalue())
    except ValueError as exc:
        st.error(f"Could not read the uploaded file: {exc}")
    else:
        rows, unknown = selection_io.match_ids(wanted, ids)
        if unknown:
            st.warning(f"{len(unknown)} id(s) in the file are not in this run and were skipped:")
            st.text(
                ", ".join(map(widgets.excerpt, unknown[:20])) + (" …" if len(unknown) > 20 else "")
            )
        if len(rows) == 0:
            st.error(
                "Empty selection: none of the ids in the file is in this run; "
                "the selection is unchanged."
            )
        else:
            selection = state.set_selection(
                st.session_state, run.name, [ids[r] for r in rows], origin="an imported file"
            )
            selected_rows = rows
            st.success(f"Imported {len(rows)} stimuli as the current selection.")


if projection == "PCA":
    bars = st.columns(2)
    with bars[0]:
        st.plotly_chart(
            plots.explained_variance_bars(pca.explained_variance_ratio), key="explained"
        )
    with bars[1]:
        st.plotly_chart(
            plots.loadings_bars(np.asarray(pca.components), run.gpa.models), key="loadings"
        )

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
        st.download_button(
            "Export selection (CSV of ids and captions)",
            selection_io.selection_csv(
                list(selection.ids), [list(stimuli["captions"].iloc[r]) for r in selected_rows]
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
    rank = dispersion[f"rank_{score}"].to_numpy()
    widgets.gallery(
        run,
        shown,
        [f"id {ids[r]} · rank {int(rank[r]) + 1} by {plots.SCORE_NAME[score]}" for r in shown],
        key="selection",
        columns=6,
        all_captions=False,
        inspect=False,
    )

page.close_page(context)
