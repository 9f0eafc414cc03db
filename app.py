"""Convergence Explorer — Home: the run at a glance (dataset, models, GPA, dispersion).

Start with ``make demo`` or ``streamlit run app.py`` (see README). Pages in ``pages/``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from convergence_core.dashboard import page, plots, widgets

context = page.open_page("Convergence Explorer", icon="🔭")
run = context.run
view = context.view

st.text(
    "Where do vision models agree, stimulus by stimulus? Generalized Procrustes residuals across "
    "vision models (dispersion) and how they modulate vision-language alignment (CKNNA)."
)

dataset = run.manifest.dataset
gpa = run.gpa
st.text(f"Dataset: {dataset.name or 'unnamed'} · run {run.name} · {run.path}")
cards = st.columns(4)
cards[0].metric("Layers cached", sum(len(run.layers(model)) for model in run.models))
cards[1].metric("Stimuli", f"{run.n_stimuli:,}")
cards[2].metric("Vision models", len(run.vision_models))
cards[3].metric("Language models", len(run.language_models))

gpa_cards = st.columns(4)
gpa_cards[0].metric("GPA iterations", int(gpa.n_iter))
gpa_cards[1].metric("GPA converged", "yes" if gpa.converged else "NO")
gpa_cards[2].metric("GPA final loss", f"{float(gpa.loss_history[-1]):.6f}")
gpa_cards[3].metric(
    "Residual PC1 explains", f"{100 * float(run.pca.explained_variance_ratio[0]):.1f} %"
)
if not gpa.converged:
    st.warning(
        "GPA did not converge for this run: residuals may not be final. "
        "Re-run precompute with a larger max_iter."
    )

gpa_layers = dict(zip(gpa.models, gpa.layers, strict=True))
models_table = pd.DataFrame(
    [
        {
            "model": model,
            "modality": run.modality(model),
            "layers": len(run.layers(model)),
            "GPA / default layer": gpa_layers.get(model, run.default_layer(model)),
            "role": "GPA (dispersion)" if model in gpa_layers else "alignment (CKNNA)",
        }
        for model in run.models
    ]
)
st.subheader("Models")
st.dataframe(models_table, hide_index=True, width="stretch")

st.subheader("Dispersion")
mean = run.dispersion["mean"].to_numpy(dtype=np.float64)
pc1 = run.dispersion["pc1"].to_numpy(dtype=np.float64)
# Spearman's rho is Pearson's r of the ranks (the run stores both scores' ranks; no ties)
pearson = float(np.corrcoef(mean, pc1)[0, 1])
spearman = float(np.corrcoef(run.dispersion["rank_mean"], run.dispersion["rank_pc1"])[0, 1])
st.plotly_chart(plots.dispersion_histograms(mean, pc1, pearson, spearman), key="home-histogram")

score = view.score
rank = run.dispersion[f"rank_{score}"].to_numpy()
order = np.argsort(rank, kind="stable")
preview = 5
sides = (("Lowest", "home-low", order[:preview]), ("Highest", "home-high", order[::-1][:preview]))
for column, (extreme, key, rows) in zip(st.columns(2), sides, strict=True):
    with column:
        st.subheader(f"{extreme} dispersion ({plots.SCORE_NAME[score]})")
        widgets.gallery(
            run,
            rows,
            [f"rank {int(rank[r]) + 1} · {run.stimuli['id'].iloc[r]}" for r in rows],
            key=key,
            columns=preview,
            all_captions=False,
            inspect=False,
        )

st.subheader("Explore")
page.page_links(context)
page.close_page(context)
