"""Convergence Explorer — Home: the run at a glance (dataset, models, GPA, dispersion).

Start with ``make demo`` or ``streamlit run app.py`` (see README): ``app.py`` is the navigation,
which runs this page first; the other pages are in ``pages/``.
"""

from __future__ import annotations

import streamlit as st

from convergence_core.dashboard import catalogue, data, gallery, page, plots, widgets
from convergence_core.dispersion import two_model_note

context = page.open_page(page.HOME)
run = context.run
view = context.view
found = data.catalogue(run)

partners = [m for m in run.models if m not in run.gpa.models]
if run.language_models and run.gpa_modality == "vision":
    modulates = " and how they modulate vision-language alignment (CKNNA)"
elif partners:
    modulates = " and how they modulate their alignment with the other models (CKNNA)"
else:  # no model outside GPA: nothing to align with
    modulates = ""
if run.gpa_modality == "vision":
    st.text(
        "Where do vision models agree, stimulus by stimulus? Generalized Procrustes residuals "
        f"across vision models (dispersion){modulates}."
    )
else:  # GPA across brain recordings (docs/brain_data.md) or another modality
    st.text(
        f"Where do the GPA models ({', '.join(run.gpa.models)}: {run.gpa_modality}) agree, "
        "stimulus by stimulus? Generalized Procrustes residuals across them (dispersion)"
        f"{modulates}."
    )

dataset = run.manifest.dataset
gpa = run.gpa
st.text(f"Dataset: {dataset.describe()} · run {run.name} · {run.path}")
# plain Markdown tables rather than eight st.metric cards: a first visit then loads no card code
# (~0.1 s of the page's 0.75 s in the browser, benchmarks/bench_dashboard.py)
for summary in catalogue.run_summary(run):
    st.markdown(widgets.markdown_table(summary))
if not gpa.converged:
    st.warning(
        "GPA did not converge for this run: residuals may not be final. "
        "Re-run precompute with a larger max_iter."
    )
if run.gpa_stop is not None:  # stopped at its residuals' uncertainty, not at the optimum
    st.info(run.gpa_stop.describe())
stability = run.gpa_stability
if stability is None:
    st.caption(
        "No GPA stability diagnostic in this run (precomputed with gpa_starts = 0, or before the "
        "diagnostic existed): rerun its precompute command to add one."
    )
else:
    st.text(stability.describe(run.n_stimuli))
    st.caption(
        "GPA's residuals are only as determined as its loss is curved: the run reran GPA from "
        "random starts. A stimulus's rank interval over those solutions is on the Stimuli page "
        "(Inspect)."
    )

st.subheader("Models")
# a Markdown table, every cell escaped: a handful of rows needs no data grid (1.4 MB of JS)
st.markdown(widgets.markdown_table(catalogue.models_table(run)))
if (first_layer := run.first_layer_note()) is not None:
    st.warning(widgets.escape_markdown(first_layer))  # it names the models: as text

st.subheader("Dispersion")
st.text(
    f"The two scores correlate: Pearson r = {found.pearson:.3f}, "
    f"Spearman ρ = {found.spearman:.3f} ({run.n_stimuli:,} stimuli)."
    + (f" {note}" if (note := two_model_note(len(run.gpa.models))) else "")
)
st.image(data.dispersion_histograms_png(str(run.path), data.manifest_stamp(run.path)))

score = view.score
rank, order = found.rank[score], found.order[score]
preview = 5
sides = (("Lowest", "home-low", order[:preview]), ("Highest", "home-high", order[::-1][:preview]))
# one side per row: side by side, ten cards in the page's width broke captions mid-word
for extreme, key, rows in sides:
    st.subheader(f"{extreme} dispersion ({plots.SCORE_NAME[score]})")
    gallery.show(
        run,
        rows,
        [f"rank {int(rank[r]) + 1} · {found.ids[r]}" for r in rows],
        key=key,
        columns=preview,
        inspect=False,
    )

st.subheader("Explore")
page.page_links(context)
page.close_page(context)
