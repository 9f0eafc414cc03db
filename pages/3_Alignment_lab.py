"""Alignment lab: live CKNNA and mutual k-NN of vision × language pairs on chosen stimulus sets.

The sets, k and everything computed from them live in one ``st.fragment``: moving k (or the set
size, score or focus set) reruns only that part of the page. The bars are a PNG drawn on the
server (``charts.alignment_bars``); the permutation test and the full table are computed only when
their expander is opened.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from convergence_core.dashboard import data, lab, page, selection_io, state, widgets
from convergence_core.random_baseline import DEFAULT_INTERVAL_WIDTH, DEFAULT_MIN_SETS
from convergence_core.subsets import select_stimuli

BEST = "__best__"
#: Session key of the expander holding the permutation test and the full table (open or not)
TABLES_KEY = "w_lab_tables"
#: Session keys of the sidebar's layer choices and of the statistics settings (open or not)
LAYERS_KEY = "w_lab_layers"
STATISTICS_KEY = "w_lab_statistics"
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
found = data.catalogue(run)
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
# built only when opened (its select boxes keep their choices while it is closed)
layers_box = st.sidebar.expander("Layers", key=LAYERS_KEY, on_change="rerun")
with layers_box:
    for model in [*visions, *languages]:
        automatic = gpa_layers.get(model) or best_layers.get(model) or run.default_layer(model)
        word = "GPA layer" if model in gpa_layers else "best layer"
        key, options = f"w_layer_{model}", [BEST, *run.layers(model)]
        state.drop_stale_choice(st.session_state, key, options)
        state.drop_stale_choice(st.session_state, state.KEPT_PREFIX + key, options)
        if layers_box.open:
            chosen = state.kept_widget(
                st.session_state,
                key,
                lambda key, model=model, options=options, w=word, a=automatic: st.selectbox(
                    model,
                    options,
                    key=key,
                    format_func=lambda layer: f"{w} ({a})" if layer == BEST else layer,
                ),
            )
        else:
            chosen = state.kept_value(st.session_state, key, BEST)
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


def _setting(cell, key: str, default, make_widget):  # noqa: ANN001, ANN202
    """A statistics setting: its widget in ``cell`` when the Statistics expander is open (the
    value kept while it is closed), else the kept value or ``default``."""
    if cell is None:
        return state.kept_value(st.session_state, key, default)
    if key not in st.session_state and state.KEPT_PREFIX + key not in st.session_state:
        st.session_state[key] = default
    with cell:
        return state.kept_widget(st.session_state, key, make_widget)


@st.fragment
def sets_and_results() -> None:
    """Sets, k, the bars and (on demand) the permutation test and the full table."""
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
                help=f"Stimuli per set; at most half of the {n} stimuli (low, high must not "
                "overlap).",
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
                help="Low, high and random sets are always shown; the focus set is summarised on "
                "top. 'current selection' comes from the Residual space page, 'pasted ids' from a "
                "box below.",
            ),
        )

    dispersion_scores = found.values[score]
    sets: dict[str, np.ndarray] = {
        "low": np.asarray(select_stimuli(dispersion_scores, "low", size), dtype=np.intp),
        "high": np.asarray(select_stimuli(dispersion_scores, "high", size), dtype=np.intp),
    }
    if source == "selection":
        selection = state.get_selection(st.session_state, run.name)
        if selection is None:
            st.error(
                "Empty selection: make one on the Residual space page (box or lasso on the "
                "scatter, or import a CSV of ids), or choose another focus set."
            )
        else:
            sets["selection"] = found.rows_of(selection.ids)[0]
    elif source == "pasted":
        pasted = st.text_area(
            "Stimulus ids (one per line, or separated by commas or spaces)", key="w_pasted_ids"
        )
        wanted = selection_io.parse_id_list(pasted)
        rows, unknown = found.rows_of(wanted)
        if unknown:
            st.warning(f"{len(unknown)} pasted id(s) are not in this run and were left out:")
            st.text(
                ", ".join(map(widgets.excerpt, unknown[:20]))
                + (" …" if len(unknown) > 20 else "")
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
    row2 = st.columns([2, 2])
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
            f"k={requested_k} is too large for sets of {smallest} stimuli (each stimulus needs k "
            f"other stimuli as neighbours); using k={max_k}. Choose a larger set size for a "
            "larger k."
        )
    with row2[1]:
        statistics = st.expander(
            "Statistics: random sets, precision, permutations, seed",
            key=STATISTICS_KEY,
            on_change="rerun",
        )
    with statistics:
        settings = st.columns(4) if statistics.open else [None] * 4
        n_random = _setting(
            settings[0],
            "w_n_random",
            200,
            lambda key: st.number_input(
                "Random sets (at most)",
                20,
                2000,
                step=20,
                key=key,
                help="Most random subsets of the same size drawn for the baseline distribution.",
            ),
        )
        precision = _setting(
            settings[1],
            "w_interval_width",
            DEFAULT_INTERVAL_WIDTH,
            lambda key: st.number_input(
                "Baseline precision",
                0.0,
                0.5,
                step=0.001,
                format="%.3f",
                key=key,
                help="Random sets are drawn until the 95% confidence interval of every pair's mean "
                "random CKNNA is narrower than this (at least "
                f"{DEFAULT_MIN_SETS} sets, at most 'Random sets'); 0 draws all of them.",
            ),
        )
        n_permutations = _setting(
            settings[2],
            "w_n_permutations",
            200,
            lambda key: st.number_input(
                "Permutations",
                20,
                5000,
                step=20,
                key=key,
                help="Label shuffles of low vs high for the permutation p-value.",
            ),
        )
        seed = _setting(
            settings[3],
            "w_seed",
            0,
            lambda key: st.number_input("Seed", 0, 2**31 - 1, step=1, key=key),
        )
    interval_width = float(precision) if precision > 0 else None

    # -----------------------------------------------------------------------------------------
    # the bars (set CKNNA + random baseline); the permutation test and full table on demand
    set_values = data.set_values(
        path, stamp, pairs, tuple(sets), tuple(np.asarray(r) for r in sets.values()), k
    )
    baselines = {
        set_size: data.random_baseline(
            path, stamp, pairs, score, set_size, k, int(n_random), int(seed), interval_width
        )
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
            f"({', '.join(too_small)}): on so few stimuli CKNNA's unbiased estimates are too "
            "noisy to read and often exceed 1. The bars and the table below still show them; "
            "choose a larger set size (or select more stimuli) for numbers."
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
    # a stable name for the browser test and the benchmark
    with st.container(key=lab.BARS_CONTAINER_KEY):
        st.image(data.alignment_bars_png(set_values, baseline_main, metric))
    st.caption(lab.baseline_statement(baseline_main))

    tables = st.expander(
        "Low vs high permutation test, and every number in a table (CSV download)",
        key=TABLES_KEY,
        on_change="rerun",
    )
    with tables:
        if tables.open:
            _tables(sets, set_values, baselines, score, size, k, n_random, n_permutations, seed)
    page.close_page(context)  # the URL follows the fragment's own reruns


def _tables(sets, set_values, baselines, score, size, k, n_random, n_permutations, seed) -> None:
    """The permutation test per pair and the table of every number (with its CSV download)."""
    st.subheader("Low vs high: permutation test per pair")
    st.caption(
        f"CKNNA(low) − CKNNA(high) against {int(n_permutations)} random relabellings of the "
        f"{2 * size} low and high stimuli; p-values with the +1 correction (smallest possible: "
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
    table = lab.results_table(set_values, baselines, permutation, score, int(seed))
    st.subheader("All results")
    st.caption(
        "One row per vision × language pair and set; random columns: random sets of the same "
        "size (n_random: how many were drawn)."
    )
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button(
        "Download results (CSV)",
        lambda: table.to_csv(index=False).encode("utf-8"),
        file_name=f"alignment-{context.info.name}-{score}-size{size}-k{k}.csv",
        mime="text/csv",
        key="download-results",
    )


sets_and_results()
page.close_page(context)
