"""Alignment lab: live CKNNA and mutual k-NN of vision × language pairs on chosen stimulus sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from convergence_core.dashboard import data, lab, page, plots, selection_io, state, widgets
from convergence_core.subsets import select_stimuli

BEST = "__best__"
SET_LABEL = {
    "low": "low dispersion",
    "high": "high dispersion",
    "random": "random",
    "selection": "current selection",
    "pasted": "pasted ids",
}

context = page.open_page("Alignment lab", icon="⚖️")
run, view = context.run, context.view
n = run.n_stimuli
ids = run.stimuli["id"].astype(str).tolist()
path, stamp = str(run.path), data.manifest_stamp(run.path)

if not run.language_models:
    st.error(
        f"Run {context.info.name!r} has no language model, so there is nothing to align the vision "
        "models with: precompute a run with at least one language model (the demo run has two)."
    )
    st.stop()

# ---------------------------------------------------------------------------------------------
# models and layers
gpa_layers = dict(zip(run.gpa.models, run.gpa.layers, strict=True))
for key, options in (("w_vision", run.gpa.models), ("w_language", run.language_models)):
    if key in st.session_state and set(st.session_state[key]) - set(options):
        # a choice made on another run: keep the models this run has, else start from all
        kept = [m for m in st.session_state[key] if m in options]
        if kept:
            st.session_state[key] = kept
        else:
            del st.session_state[key]
with st.sidebar:
    st.header("Models")
    visions = st.multiselect(
        "Vision models", list(run.gpa.models), default=list(run.gpa.models), key="w_vision"
    )
    languages = st.multiselect(
        "Language models", run.language_models, default=run.language_models, key="w_language"
    )
if not visions or not languages:
    missing = "vision" if not visions else "language"
    st.error(f"No {missing} model chosen: pick at least one {missing} model in the sidebar.")
    st.stop()

try:
    best_layers = data.best_language_layers(path, stamp)
except ValueError as exc:
    st.warning(
        f"Best language layers unavailable ({exc}); 'best layer' means the default layer here."
    )
    best_layers = {}

layer_choice: dict[str, str] = {}
with st.sidebar.expander("Layers", expanded=False):
    for model in [*visions, *languages]:
        automatic = gpa_layers.get(model) or best_layers.get(model) or run.default_layer(model)
        word = "GPA layer" if model in gpa_layers else "best layer"
        state.drop_stale_choice(st.session_state, f"w_layer_{model}", [BEST, *run.layers(model)])
        chosen = st.selectbox(
            model,
            [BEST, *run.layers(model)],
            key=f"w_layer_{model}",
            format_func=lambda layer, w=word, a=automatic: f"{w} ({a})" if layer == BEST else layer,
        )
        layer_choice[model] = automatic if chosen == BEST else chosen
pairs = tuple(
    lab.Pair(vision, layer_choice[vision], language, layer_choice[language])
    for vision in visions
    for language in languages
)

# ---------------------------------------------------------------------------------------------
# sets and k
max_size = n // 2
if max_size < 4:
    st.error(
        f"Run {context.info.name!r} has only {n} stimuli; low and high sets need at least 4 "
        "each (8 stimuli)."
    )
    st.stop()
row1 = st.columns([1, 1, 2])
with row1[0]:
    score = widgets.score_radio(view, "Dispersion score", horizontal=False)
with row1[1]:
    size = state.bind_widget(
        st.session_state,
        view,
        "size",
        lambda key: st.number_input(
            "Set size (low / high / random)",
            min_value=4,
            max_value=max_size,
            step=1,
            key=key,
            help=f"Stimuli per set; at most half of the {n} stimuli (low, high must not overlap).",
        ),
        coerce=lambda value: (
            state.default_subset_size(n) if value is None else min(max(4, int(value)), max_size)
        ),
    )
with row1[2]:
    source = state.bind_widget(
        st.session_state,
        view,
        "source",
        lambda key: st.radio(
            "Focus set",
            state.SOURCES,
            key=key,
            horizontal=True,
            format_func=lambda s: SET_LABEL[s],
            help="Low, high and random sets are always shown; the focus set is summarised on top. "
            "'current selection' comes from the Residual space page, 'pasted ids' from a box "
            "below.",
        ),
    )

dispersion_scores = run.dispersion[score].to_numpy(dtype=np.float64)
sets: dict[str, np.ndarray] = {
    "low": np.asarray(select_stimuli(dispersion_scores, "low", size), dtype=np.intp),
    "high": np.asarray(select_stimuli(dispersion_scores, "high", size), dtype=np.intp),
}
if source == "selection":
    selection = state.get_selection(st.session_state, run.name)
    if selection is None:
        st.error(
            "Empty selection: make one on the Residual space page (box or lasso on the scatter, or "
            "import a CSV of ids), or choose another focus set."
        )
    else:
        sets["selection"] = selection_io.match_ids(selection.ids, ids)[0]
elif source == "pasted":
    pasted = st.text_area(
        "Stimulus ids (one per line, or separated by commas or spaces)", key="w_pasted_ids"
    )
    wanted = selection_io.parse_id_list(pasted)
    rows, unknown = selection_io.match_ids(wanted, ids)
    if unknown:
        st.warning(f"{len(unknown)} pasted id(s) are not in this run and were left out:")
        st.text(
            ", ".join(map(widgets.excerpt, unknown[:20])) + (" …" if len(unknown) > 20 else "")
        )
    if len(rows) == 0:
        st.error("Empty selection: paste the ids of at least 4 stimuli of this run.")
    else:
        sets["pasted"] = rows
for name in ("selection", "pasted"):
    if name in sets and len(sets[name]) < 4:
        st.error(
            f"The {SET_LABEL[name]} has {len(sets[name])} stimuli; CKNNA needs at least 4 "
            "(and more than k). "
            "Add stimuli or choose another focus set."
        )
        del sets[name]

smallest = min(len(rows) for rows in sets.values())
max_k = smallest - 1
requested_k = view.k
row2 = st.columns([2, 1, 1, 1])
with row2[0]:
    k = state.bind_widget(
        st.session_state,
        view,
        "k",
        lambda key: st.slider(
            "k (nearest neighbours)",
            min_value=state.MIN_K,
            max_value=max_k,
            key=key,
            help=f"2 … {max_k}: k must be smaller than the smallest set ({smallest} stimuli).",
        ),
        coerce=lambda value: min(max(state.MIN_K, int(value)), max_k),
    )
if requested_k > max_k and k == max_k:
    st.warning(
        f"k={requested_k} is too large for sets of {smallest} stimuli (each stimulus needs k other "
        f"stimuli as neighbours); using k={max_k}. Choose a larger set size for a larger k."
    )
with row2[1]:
    n_random = st.number_input(
        "Random sets",
        20,
        2000,
        200,
        step=20,
        key="w_n_random",
        help="Random subsets of the same size forming the baseline distribution.",
    )
with row2[2]:
    n_permutations = st.number_input(
        "Permutations",
        20,
        5000,
        200,
        step=20,
        key="w_n_permutations",
        help="Label shuffles of low vs high for the permutation p-value.",
    )
with row2[3]:
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, step=1, key="w_seed")

# ---------------------------------------------------------------------------------------------
# the bars first (set CKNNA + random baseline), then the permutation test and the full table:
# Streamlit sends elements as they are made, so new bars appear before the slower test finishes
indexes = data.indexes_for(run, pairs)
set_values = lab.set_table(indexes, pairs, sets, k)
baselines = {
    set_size: data.random_baseline(path, stamp, pairs, score, set_size, k, int(n_random), int(seed))
    for set_size in sorted({len(rows) for rows in sets.values()})
}
baseline_main = baselines[size]
random_mean = float(baseline_main["cknna_random_mean"].mean())
focus = source if source in sets else ("random" if source == "random" else None)
if focus == "random":
    focus_value = random_mean
elif focus is not None:
    focus_value = float(set_values.loc[set_values["set"] == focus, "cknna"].mean())
else:
    focus_value = float("nan")
focus_size = len(sets[focus]) if focus in sets else size
focus_text = lab.cknna_text(focus_value, focus_size)
summary = st.columns(4)
summary[0].metric(
    f"Focus: {SET_LABEL[source]}",
    focus_text,
    delta=None
    if focus_text == "—" or focus == "random" or size < lab.MIN_CKNNA_SET_SIZE
    else f"{focus_value - random_mean:+.4f} vs random",
    help="CKNNA of the focus set, mean over the vision × language pairs shown.",
)
summary[1].metric(
    "CKNNA, low dispersion",
    lab.cknna_text(set_values.loc[set_values["set"] == "low", "cknna"].mean(), size),
)
summary[2].metric("CKNNA, random (mean)", lab.cknna_text(random_mean, size))
summary[3].metric(
    "CKNNA, high dispersion",
    lab.cknna_text(set_values.loc[set_values["set"] == "high", "cknna"].mean(), size),
)
too_small = [
    SET_LABEL[name] for name, rows in sets.items() if len(rows) < lab.MIN_CKNNA_SET_SIZE
]
too_small += [SET_LABEL["random"]] if size < lab.MIN_CKNNA_SET_SIZE else []
if too_small:
    st.info(
        f"No CKNNA number above for sets of fewer than {lab.MIN_CKNNA_SET_SIZE} stimuli "
        f"({', '.join(too_small)}): on so few stimuli CKNNA's unbiased estimates are too noisy "
        "to read and often exceed 1. The bars and the table below still show them; choose a "
        "larger set size (or select more stimuli) for numbers."
    )
bound_note = lab.bound_note(set_values, baselines)
if bound_note is not None:
    st.warning(bound_note)

metric = st.radio(
    "Bars show",
    ("cknna", "mutual_knn"),
    horizontal=True,
    key="w_metric",
    format_func=lambda m: {"cknna": "CKNNA", "mutual_knn": "mutual k-NN"}[m],
)
st.plotly_chart(plots.alignment_bars(set_values, baseline_main, metric), key="alignment-bars")

st.subheader("Low vs high: permutation test per pair")
st.caption(
    f"CKNNA(low) − CKNNA(high) against {int(n_permutations)} random relabellings of the {2 * size} "
    "low and high stimuli; p-values with the +1 correction (smallest possible: "
    f"{1 / (int(n_permutations) + 1):.4f})."
)
permutation = data.low_high_permutation(
    path,
    stamp,
    pairs,
    tuple(map(int, sets["low"])),
    tuple(map(int, sets["high"])),
    k,
    int(n_permutations),
    int(seed),
)
st.dataframe(permutation, hide_index=True, width="stretch")

pair_columns = ["vision_model", "vision_layer", "language_model", "language_layer"]
random_columns = [
    f"{m}_random_{part}"
    for m in ("cknna", "mutual_knn")
    for part in ("mean", "lower_95", "upper_95")
]
table = pd.concat(
    [
        set_values[set_values["set_size"] == set_size].merge(
            baselines[set_size][[*pair_columns, *random_columns]], on=pair_columns, how="left"
        )
        for set_size in baselines
    ]
)
table = table.merge(permutation.drop(columns=["n_permutations"]), on=pair_columns, how="left")
# where each set falls in the distribution of random sets of its own size
table["cknna_vs_random_95"] = np.select(
    [
        table["cknna"] > table["cknna_random_upper_95"],
        table["cknna"] < table["cknna_random_lower_95"],
    ],
    ["above", "below"],
    default="within",
)
table["score"] = score
table["n_random"] = int(n_random)
table["n_permutations"] = int(n_permutations)
table["seed"] = int(seed)
table = table.sort_values(["vision_model", "language_model", "set"], kind="stable").reset_index(
    drop=True
)
st.subheader("All results")
st.caption(
    "One row per vision × language pair and set; random columns: random sets of the same size."
)
st.dataframe(table, hide_index=True, width="stretch")
st.download_button(
    "Download results (CSV)",
    table.to_csv(index=False).encode("utf-8"),
    file_name=f"alignment-{context.info.name}-{score}-size{size}-k{k}.csv",
    mime="text/csv",
    key="download-results",
)

page.close_page(context)
