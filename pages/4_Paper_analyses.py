"""Paper analyses: Fig. 2 (low / random / high dispersion sets), Fig. S1 (drop 25%), Fig. S2
(leave one vision model out) and the language-layer sweep, on the chosen run.

Every number comes from :mod:`convergence_core.analyses`; results are cached per run and
parameters (``st.cache_data``), so moving a control recomputes only what depends on it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from convergence_core import analyses
from convergence_core.dashboard import data, page, paper_plots, state

@st.cache_data(show_spinner="Sweeping language layers…", max_entries=32)
def _layer_sweep(path: str, stamp: int, k: int) -> pd.DataFrame:
    return analyses.layer_sweep(data.open_run(Path(path)), k=k)


def _best_layers(path: str, stamp: int, k: int) -> pd.DataFrame:
    run = data.open_run(Path(path))
    return analyses.best_language_layers(run, k=k, sweep=_layer_sweep(path, stamp, k))


@st.cache_data(
    show_spinner="Computing the low / random / high sets and permutation tests…", max_entries=64
)
def _dispersion_sets(
    path: str,
    stamp: int,
    size: int,
    k: int,
    score: str,
    n_random: int,
    n_permutations: int,
    seed: int,
) -> pd.DataFrame:
    return analyses.dispersion_set_alignment(
        data.open_run(Path(path)),
        size=size,
        k=k,
        score=score,
        n_random=n_random,
        seed=seed,
        n_permutations=n_permutations,
        best_layers=_best_layers(path, stamp, k),
    )


@st.cache_data(show_spinner="Dropping stimuli…", max_entries=64)
def _drop_fraction(path: str, stamp: int, q: float, k: int, score: str) -> pd.DataFrame:
    return analyses.drop_fraction_alignment(
        data.open_run(Path(path)), q=q, k=k, score=score, best_layers=_best_layers(path, stamp, k)
    )


@st.cache_data(show_spinner="Rerunning GPA without each vision model…", max_entries=16)
def _leave_one_out(path: str, stamp: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    points = analyses.leave_one_model_out(data.open_run(Path(path)))
    return points, analyses.leave_one_model_out_statistics(points)


#: p-values span many decades: show them in scientific notation
_P_VALUE_FORMAT = {
    name: st.column_config.NumberColumn(format="%.2e")
    for name in (
        "p_value",
        "pearson_p_value",
        "spearman_p_value",
        "permutation_p_value_two_sided",
        "permutation_p_value_low_greater",
    )
}

context = page.open_page("Paper analyses", icon="📄")
st.caption(
    "Does low intra-modal dispersion (vision models agree) go with higher vision–language "
    "alignment? Fig. 2, S1 and S2 of the paper, recomputed on this run."
)
run, view = context.run, context.view
run_name, path = context.info.name, context.info.path
stamp = data.manifest_stamp(path)
n = run.n_stimuli
max_size = n // 2
if max_size < state.MIN_SUBSET_SIZE:
    st.error(
        f"Run {run_name!r} has {n} stimuli; these analyses need at least "
        f"{2 * state.MIN_SUBSET_SIZE}. Pick a larger run."
    )
    st.stop()

with st.sidebar:
    score = state.bind_widget(
        st.session_state,
        view,
        "score",
        lambda key: st.radio(
            "Dispersion score",
            state.SCORES,
            key=key,
            help="mean residual rank, or score on the residuals' first principal component",
        ),
        coerce=lambda value: value if value in state.SCORES else state.DEFAULT_SCORE,
    )
    size = state.bind_widget(
        st.session_state,
        view,
        "size",
        lambda key: st.number_input(
            "Set size (stimuli)",
            min_value=state.MIN_SUBSET_SIZE,
            max_value=max_size,
            step=1,
            key=key,
            help=f"stimuli in each of the low / high / random sets (at most {max_size})",
        ),
        coerce=lambda value: min(
            max(state.MIN_SUBSET_SIZE, int(value or state.default_subset_size(n))), max_size
        ),
    )
    k = state.bind_widget(
        st.session_state,
        view,
        "k",
        lambda key: st.number_input(
            "k (CKNNA neighbours)", min_value=state.MIN_K, max_value=int(size) - 1, step=1, key=key
        ),
        coerce=lambda value: min(max(state.MIN_K, int(value)), int(size) - 1),
    )
    with st.expander("Statistics"):
        n_random = st.number_input("random sets", min_value=10, max_value=2000, value=200, step=10)
        n_permutations = st.number_input(
            "permutations per pair",
            min_value=50,
            max_value=5000,
            value=analyses.DEFAULT_N_PERMUTATIONS,
            step=50,
        )
        seed = st.number_input("seed", min_value=0, value=0, step=1)
page.close_page(context)

try:
    sweep = _layer_sweep(str(path), stamp, int(k))
    best = _best_layers(str(path), stamp, int(k))
    sets = _dispersion_sets(
        str(path), stamp, int(size), int(k), score, int(n_random), int(n_permutations), int(seed)
    )
except ValueError as error:
    st.error(str(error))
    st.stop()

fig2_tab, s1_tab, s2_tab, sweep_tab = st.tabs(
    [
        "Fig. 2: dispersion sets",
        "Fig. S1: drop a fraction",
        "Fig. S2: leave one model out",
        "Layer sweep",
    ]
)

with fig2_tab:
    st.subheader("Low vs random vs high dispersion")
    st.text(analyses.effect_verdict(sets))
    st.plotly_chart(paper_plots.dispersion_sets_bars(sets), width="stretch")
    st.dataframe(sets, hide_index=True, width="stretch", column_config=_P_VALUE_FORMAT)
    st.caption(
        f"Permutation test per pair: the low/high labels of the {2 * int(size)} stimuli shuffled "
        f"{int(n_permutations)} times; p = (1 + #as extreme) / ({int(n_permutations)} + 1). "
        "Across pairs: Wilcoxon signed-rank and paired t tests of low vs high (two-sided)."
    )
    st.dataframe(analyses.paired_set_tests(sets), hide_index=True, column_config=_P_VALUE_FORMAT)

with s1_tab:
    q = st.slider("Fraction dropped", min_value=0.05, max_value=0.5, value=0.25, step=0.05)
    try:
        dropped = _drop_fraction(str(path), stamp, float(q), int(k), score)
    except ValueError as error:
        st.error(str(error))
    else:
        st.plotly_chart(paper_plots.drop_fraction_bars(dropped), width="stretch")
        wide = dropped.pivot_table(
            index=["vision_model", "language_model"],
            columns="condition",
            values="cknna",
            sort=False,
        )[["drop_high", "full", "drop_low"]].reset_index()
        st.dataframe(wide, hide_index=True, width="stretch")

with s2_tab:
    if len(run.gpa.models) < 3:
        st.info(
            f"Leave-one-model-out needs at least 3 vision models; run {run_name!r} has "
            f"{len(run.gpa.models)}."
        )
    else:
        points, statistics = _leave_one_out(str(path), stamp)
        st.plotly_chart(paper_plots.leave_one_out_scatter(points, statistics), width="stretch")
        st.caption(
            f"Residual units: {paper_plots.RESIDUAL_UNITS}. Partial dispersion: mean residual "
            "of GPA rerun without the held-out model; deviation: the held-out model's distance "
            "from that consensus after orthogonal Procrustes."
        )
        st.dataframe(statistics, hide_index=True, width="stretch", column_config=_P_VALUE_FORMAT)

with sweep_tab:
    st.plotly_chart(paper_plots.layer_sweep_heatmap(sweep), width="stretch")
    st.caption(
        "Layer used for each language model (highest mean CKNNA with the vision models, full set):"
    )
    st.dataframe(best, hide_index=True)
    st.dataframe(sweep, hide_index=True, width="stretch")
