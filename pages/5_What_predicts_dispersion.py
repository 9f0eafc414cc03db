"""What predicts dispersion: stimulus properties ranked by how strongly they go with dispersion,
any property against dispersion (click points to see the images), and the held-out fit of models
that predict dispersion from every property: three tabs, only the open one built.

Every number comes from :mod:`convergence_core.dispersion_predictors` (cached per run and
settings in :mod:`convergence_core.dashboard.predictors`).
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
    predictor_plots,
    predictors,
    selection_io,
    state,
    widgets,
)

CARDS = 8
TAB_KEY = "w_predictors_tab"
#: Session key of the expander with the sortable table of every column (built when opened)
TABLE_KEY = "w_predictors_table"
RANKED_TAB = "Properties ranked"
SCATTER_TAB = "A property against dispersion"
FIT_TAB = "Predicting dispersion from every property"

context = page.open_page("pages/5_What_predicts_dispersion.py")
run, view = context.run, context.view
table = predictors.run_properties(run)
if table is None:
    st.info(
        f"Run {context.quoted_name} has no stimulus property table (it was made before the "
        "properties step existed, or from arrays). Rerun the precompute command that made it (e.g. "
        "`python -m convergence_core precompute --preset demo`): finished steps are reused and "
        "only the properties are computed."
    )
    page.close_page(context)
    st.stop()

st.caption(
    "Which stimulus properties go with low or high dispersion? Each property is tested against "
    "the dispersion score (Spearman ρ for numbers, Kruskal–Wallis ε² for categories; "
    "permutation p-values, Benjamini–Hochberg q-values across properties). Correlation is not "
    "cause: a property can stand for another one that was not measured."
)
stamp = data.manifest_stamp(run.path)
controls = st.columns([2, 1])  # room for the popover's label in a narrow window
with controls[0]:
    score = widgets.score_radio(view, "Dispersion score")
# settings one rarely changes sit in a popover: the browser builds its widgets only when opened
with controls[1].popover("Permutations, seed", icon=":material/tune:"):
    n_permutations = int(
        st.number_input(
            "Permutations per test",
            min_value=99,
            max_value=100_000,
            value=predictors.PAGE_PERMUTATIONS,
            step=1000,
            key="w_predictors_permutations",
        )
    )
    seed = int(st.number_input("Seed", min_value=0, value=0, step=1, key="w_predictors_seed"))

with st.spinner(
    f"Testing every property against dispersion: {n_permutations:,} permutations per test over "
    f"{run.n_stimuli:,} stimuli (a minute or more at 100,000; once for every user of this "
    "server)…"
):
    tests = predictors.property_tests(str(run.path), stamp, n_permutations, seed)
ranked = predictor_plots.tests_frame(tests, score)

# only the open tab is built: the first screen is the ranking; the scatter of one property and
# the held-out fit (cross-validated models, the slow part on a large run) come when opened
ranked_tab, scatter_tab, fit_tab = st.tabs(
    [RANKED_TAB, SCATTER_TAB, FIT_TAB], key=TAB_KEY, on_change="rerun"
)


def _ranked() -> None:
    if ranked.empty:
        st.warning("No property could be tested on this run (see the list of skipped properties).")
    else:
        st.image(predictors.ranked_effects_png(str(run.path), stamp, n_permutations, seed, score))
        # a Markdown table: the data grid's code (1.4 MB of JavaScript, ~0.2 s of a first visit)
        # loads only when the sortable table of every column is opened
        st.markdown(widgets.markdown_table(predictor_plots.ranked_summary(ranked)))
        every_column = st.expander(
            "Every column (sortable table, CSV download)", key=TABLE_KEY, on_change="rerun"
        )
        with every_column:
            if every_column.open:
                # headers in words over the data as computed: the CSV download (the grid's
                # toolbar) keeps the machine-readable names and unrounded numbers
                widgets.data_table(ranked, hide_index=True, key="ranked-table")
    skipped = predictors.skipped_properties(str(run.path), stamp)
    if len(skipped):
        count = f"{len(skipped)} {'property' if len(skipped) == 1 else 'properties'}"
        with st.expander(f"{count} not tested"):
            st.markdown(widgets.markdown_table(skipped))


def _scatter() -> None:
    names = list(ranked["property"]) or table.names
    state.drop_stale_choice(st.session_state, "w_predictors_property", names)
    chosen = state.kept_widget(st.session_state, "w_predictors_property", lambda key: st.selectbox(
        "Property",
        names,
        key=key,
        help="Ordered by rank (strongest first). Click a point, or drag a box, to see its images.",
    ))
    row = ranked[ranked["property"] == chosen]
    effect_text = (
        f"{'ρ' if row['test'].iloc[0] == 'spearman' else 'ε²'} = {row['effect'].iloc[0]:.3f}, "
        + catalogue.p_phrase(row["q_value"].iloc[0], symbol="q")
        if len(row)
        else "not tested"
    )
    ids = run.stimuli["id"].astype(str).tolist()
    first_captions = data.catalogue(run).first_captions
    dispersion = run.dispersion[score].to_numpy(dtype=np.float64)
    event = st.plotly_chart(
        predictor_plots.property_scatter(
            table,
            chosen,
            dispersion,
            score=score,
            ids=ids,
            captions=first_captions,
            effect_text=effect_text,
        ),
        key="property-scatter",
        on_select="rerun",
        selection_mode=("points", "box", "lasso"),
    )
    clicked = selection_io.rows_from_chart_selection(
        getattr(event, "selection", None), run.n_stimuli
    )
    def labels(rows) -> list[str]:  # noqa: ANN001
        return [
            f"id {ids[r]} · {chosen} {predictor_plots.value_text(table, chosen, r)} · "
            f"dispersion {dispersion[r]:.4f}"
            for r in rows
        ]

    if clicked:
        st.text(f"{len(clicked)} stimuli selected in the chart (first {min(CARDS, len(clicked))}):")
        shown = clicked[:CARDS]
        gallery.show(run, shown, labels(shown), key="predictors", columns=4, inspect=False)
        return
    if table.info_for(chosen).kind == "numeric":
        lowest, highest = catalogue.gallery_ends(table.values[chosen], CARDS // 2)
        on = chosen
    else:
        lowest, highest = catalogue.gallery_ends(dispersion, CARDS // 2)
        on = f"dispersion ({plots.SCORE_NAME[score]})"
    st.text(f"No point selected: the {CARDS // 2} lowest and {CARDS // 2} highest on {on}.")
    # one grid per end, each under its heading (ascending, as the scatter's axis)
    for end, rows, key in (
        ("Lowest", list(lowest), "predictors"), ("Highest", list(highest[::-1]), "predictors-high")
    ):
        st.text(f"{end} {len(rows)} on {on}:")
        gallery.show(run, rows, labels(rows), key=key, columns=4, inspect=False)


def _fit() -> None:
    st.caption(
        "Ridge regression and gradient-boosted trees, fitted on every tested property at once; R² "
        "on held-out folds (5-fold cross-validation), against the same models refitted on "
        "shuffled dispersion scores (chance: R² ≈ 0). Importance: how much held-out R² drops "
        "when one property's values are shuffled."
    )
    n_shuffles = int(
        st.number_input(
            "Shuffled-target refits per model",
            min_value=0,
            max_value=200,
            value=predictors.PAGE_SHUFFLES,
            key="w_predictors_shuffles",
        )
    )
    if ranked.empty:
        st.info("No property to fit.")
        return
    fit, importances, predictions = predictors.model_fit(
        str(run.path), stamp, score, n_shuffles, seed
    )
    widgets.data_table(predictor_plots.fit_summary(fit), hide_index=True, key="fit-table")
    # one above the other: side by side, the importances' long property names squeezed the
    # bars into a few pixels and the fit's titles were cut
    st.plotly_chart(
        predictor_plots.held_out_fit(predictions, fit, score=score), key="held-out-fit"
    )
    st.plotly_chart(predictor_plots.importance_bars(importances), key="importances")


for tab, build in ((ranked_tab, _ranked), (scatter_tab, _scatter), (fit_tab, _fit)):
    with tab:
        if tab.open:
            build()

page.close_page(context)
