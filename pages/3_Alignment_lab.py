"""Alignment lab: any registry metric of vision × language pairs on chosen stimulus sets, live.
The other side of a pair may also be a model of another modality outside GPA (brain recordings).

The sets, the metric, k and everything computed from them live in one ``st.fragment``: moving k
(or the metric, set size, score or focus set) reruns only that part of the page. The bars are a
PNG drawn on the server (``charts.alignment_bars``). Metrics the registry marks as not live (and
feature metrics on very large runs) are computed when asked, with progress. The calibrated scores
and matched baselines, per-stimulus alignment, the permutation test and the full table are
computed only when their expander is opened.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from convergence_core.analyses import pair_modalities, pair_sides
from convergence_core.dashboard import (
    controls,
    data,
    lab,
    page,
    plots,
    selection_io,
    state,
    widgets,
)
from convergence_core.random_baseline import DEFAULT_INTERVAL_WIDTH, DEFAULT_MIN_SETS
from convergence_core.stimulus_alignment import local_cka_base_size
from convergence_core.subset_metrics import largest_k
from convergence_core.subsets import select_stimuli

BEST = "__best__"
#: Session key of the expander holding the permutation test and the full table (open or not)
TABLES_KEY = "w_lab_tables"
#: Session keys of the sidebar's layer choices and of the statistics settings (open or not)
LAYERS_KEY = "w_lab_layers"
STATISTICS_KEY = "w_lab_statistics"
#: Session keys of the expanders of calibrated scores and of per-stimulus alignment
CALIBRATION_KEY = "w_lab_calibration"
PER_STIMULUS_KEY = "w_lab_per_stimulus"
#: The metric picker and its options
METRICS = {choice.name: choice for choice in lab.metric_choices()}
SET_LABEL = {
    "low": "low dispersion",
    "high": "high dispersion",
    "random": "random",
    "selection": "current selection",
    "pasted": "pasted ids",
}
#: the same in the focus card's label
SHORT_SET_LABEL = {**SET_LABEL, "low": "low", "high": "high", "selection": "selection"}

context = page.open_page("pages/3_Alignment_lab.py")
run, view = context.run, context.view
n = run.n_stimuli
found = data.catalogue(run)
path, stamp = str(run.path), data.manifest_stamp(run.path)

# the other side of every pair: the language models, then every other model outside GPA (brain
# recordings given as feature files, ...), which the lab aligns with the GPA models alike
partners = run.partner_models
others = run.other_partner_models
if not partners:
    st.error(
        f"Run {context.quoted_name} has no language model, nor any other model outside GPA (such "
        "as brain recordings), so there is nothing to align the vision models with: precompute a "
        "run with at least one language model (the demo run has two)."
    )
    st.stop()

# ---------------------------------------------------------------------------------------------
# models and layers
gpa_layers = dict(zip(run.gpa.models, run.gpa.layers, strict=True))
for key, options in (("w_vision", run.gpa.models), ("w_language", partners)):
    state.carry_choices_to_run(st.session_state, key, options)  # a choice made on another run
with st.sidebar:
    st.header("Models")
    # chips in one row drawn by the browser (controls.py), like the page's other controls: a
    # first visit loads no widget code of Streamlit's for them (a multi-select box above 12)
    # the GPA models: vision models, unless GPA runs across e.g. brain subjects
    gpa_vision = all(run.modality(m) == "vision" for m in run.gpa.models)
    chosen_models = widgets.choose_many_in_row(
        [
            controls.many(
                "vision", "Vision models" if gpa_vision else "GPA models", run.gpa.models,
                state.kept_value(st.session_state, "w_vision", run.gpa.models), key="w_vision",
                labels=lambda m: m if gpa_vision else f"{m} ({run.modality(m)})",
            ),
            controls.many(
                "language", "Language and other models" if others else "Language models",
                partners, state.kept_value(st.session_state, "w_language", partners),
                key="w_language",
                labels=lambda m: m if m in run.language_models else f"{m} ({run.modality(m)})",
                help="The other side of every pair: the language models, then the run's other "
                "models outside GPA (e.g. brain recordings)." if others else "",
            ),
        ],
        key="lab-models",
    )
    visions, languages = chosen_models["vision"], chosen_models["language"]
    if chosen_others := [m for m in languages if m not in run.language_models]:
        st.caption(
            ", ".join(widgets.escape_markdown(f"{m} ({run.modality(m)})") for m in chosen_others)
            + ": on the language "
            "side of the pairs, at the default layer unless chosen under Layers; the tables' "
            "language_model column names them."
        )
if not visions or not languages:
    missing = (
        ("vision" if gpa_vision else "GPA") if not visions
        else ("language or other" if others else "language")
    )
    st.error(f"No {missing} model chosen: pick at least one {missing} model in the sidebar.")
    st.stop()

try:
    best_table = (
        data.best_language_layer_table(path, stamp) if data.chooses_language_layers(run) else None
    )
except ValueError as exc:
    st.warning(widgets.escape_markdown(  # the error names a language model as written
        f"Best language layers unavailable ({exc}); 'best layer' means the default layer here."
    ))
    best_layers, sample_note = {}, None
else:
    best_layers = {} if best_table is None else dict(
        zip(best_table["language_model"], best_table["language_layer"], strict=True)
    )
    sample_note = None if best_table is None else lab.best_layer_sample_note(best_table, n)
if sample_note is not None:
    st.sidebar.caption(sample_note)

layer_choice: dict[str, str] = {}
# built only when opened (its select boxes keep their choices while it is closed)
layers_box = st.sidebar.expander("Layers", key=LAYERS_KEY, on_change="rerun")
with layers_box:
    for model in dict.fromkeys([*visions, *languages]):  # a language model may be in GPA too
        automatic = gpa_layers.get(model) or best_layers.get(model) or run.default_layer(model)
        word = (
            "GPA layer" if model in gpa_layers
            else "best layer" if model in run.language_models else "default layer"
        )
        key, options = f"w_layer_{model}", [BEST, *run.layers(model)]
        state.drop_stale_choice(st.session_state, key, options)  # and its kept copy
        if layers_box.open:
            chosen = state.kept_widget(
                st.session_state,
                key,
                lambda key, model=model, options=options, w=word, a=automatic: st.selectbox(
                    widgets.escape_markdown(model),  # a label renders Markdown: the name as text
                    options,
                    key=key,
                    format_func=lambda layer: f"{w} ({a})" if layer == BEST else layer,
                ),
            )
        else:
            chosen = state.kept_value(st.session_state, key, BEST)
        layer_choice[model] = automatic if chosen == BEST else chosen
pairs = lab.cross_pairs(  # a language model in GPA is not paired with itself
    [(vision, layer_choice[vision]) for vision in visions],
    [(language, layer_choice[language]) for language in languages],
)
if not pairs:
    st.error(
        "The models chosen on both sides are the same model, which is not aligned with itself: "
        "pick another model in the sidebar."
    )
    st.stop()
sides = pair_sides(run, pairs)  # e.g. "vision × brain", in the texts

# ---------------------------------------------------------------------------------------------
# sets and k
max_size = n // 2
if max_size < 4:
    st.error(
        f"Run {context.quoted_name} has only {n} stimuli; low and high sets need at least 4 "
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
    score = controls.bound_value(st.session_state, view, "score")
    size = controls.bound_value(
        st.session_state, view, "size", lambda value: state.subset_size(value, n)
    )
    source = controls.bound_value(st.session_state, view, "source")
    controls.row(
        [
            controls.choice(
                "score", "Dispersion score", state.SCORES, score,
                key=state.WIDGET_PREFIX + "score", view="score", labels=plots.SCORE_NAME.get,
                help="mean: average residual across the GPA models; PC1: score on the first "
                "principal component of the residuals (the paper's two dispersion measures).",
            ),
            controls.number(
                "size", "Set size (low / high / random)", size, 4, max_size,
                key=state.WIDGET_PREFIX + "size", view="size",
                help=f"Stimuli per set; at most half of the {n} stimuli (low, high must not "
                "overlap).",
            ),
            controls.choice(
                "source", "Focus set", state.SOURCES, source, key=state.WIDGET_PREFIX + "source",
                view="source", labels=SET_LABEL.get, width=2,
                help="Low, high and random sets are always shown; the focus set is summarised on "
                "top. 'current selection' comes from the Residual space page, 'pasted ids' from a "
                "box below.",
            ),
        ],
        key="lab-sets",
    )

    dispersion_scores = found.values[score]
    sets: dict[str, np.ndarray] = {
        "low": np.asarray(select_stimuli(dispersion_scores, "low", size), dtype=np.intp),
        "high": np.asarray(select_stimuli(dispersion_scores, "high", size), dtype=np.intp),
    }
    if source == "selection":
        selection = state.get_selection(st.session_state, run.name)
        if selection is None:
            st.info(  # nothing chosen yet, as on Residual space: a next step, not a fault
                "Empty selection: make one on the Residual space page (box or lasso on the "
                "scatter, or import a CSV of ids), or choose another focus set."
            )
        else:
            sets["selection"] = found.rows_of(selection.ids)[0]
    elif source == "pasted":
        pasted = state.kept_widget(st.session_state, "w_pasted_ids", lambda key: st.text_area(
            "Stimulus ids (one per line, or separated by commas or spaces)", key=key
        ))
        wanted = selection_io.parse_id_list(pasted, found.position)
        rows, unknown = found.rows_of(wanted)
        widgets.show_messages(selection_io.unknown_id_messages(unknown, "pasted", widgets.excerpt))
        if len(rows) == 0:
            st.info("Empty selection: paste the ids of at least 4 stimuli of this run.")
        else:
            sets["pasted"] = rows
    for name in ("selection", "pasted"):
        if name in sets and len(sets[name]) < 4:
            st.error(
                f"{SET_LABEL[name].capitalize()}: {len(sets[name])} stimuli, too few for a set "
                "(at least 4, and more than k). Add stimuli or choose another focus set."
            )
            del sets[name]

    smallest = min(len(rows) for rows in sets.values())
    # k lowered below the smallest set: the rule the report follows where --k is left out
    max_k = largest_k(smallest)  # bounded_value below: k_for_sets(k, smallest)

    # -----------------------------------------------------------------------------------------
    # the metric (any of the registry) and its options
    # the picker has the row to itself: a row of pills does not wrap, and in a narrower column
    # the last metrics were hidden behind a horizontal scroll
    # bound to the view, so the link carries it (state.View.metric)
    metric = controls.bound_value(
        st.session_state, view, "metric",
        lambda name: name if name in METRICS else state.DEFAULT_METRIC,
    )
    controls.row(
        [controls.choice(
            "metric", "Metric", list(METRICS), metric, key=state.WIDGET_PREFIX + "metric",
            view="metric",
            labels=lambda name: METRICS[name].label,
            help="Every metric of the registry (convergence_core.metrics), with the numbers of "
            "the Platonic Representation code: neighbour metrics from the run's neighbour lists, "
            "CKA-family metrics from the sets' prepared features.",
        )],
        key="lab-metric",
    )
    choice = METRICS[metric]
    st.caption(choice.summary)
    kernel, sigma, cca_dim = "linear", 1.0, 10
    metric_settings = (
        st.columns([1, 1, 2]) if {"kernel", "cca_dim"} & set(choice.options) else None
    )
    if "kernel" in choice.options:
        with metric_settings[0]:
            kernel = state.kept_widget(
                st.session_state,
                "w_lab_kernel",
                lambda key: st.radio("Kernel", ("linear", "rbf"), key=key, horizontal=True),
            )
        if kernel == "rbf":
            with metric_settings[1]:
                sigma = state.kept_widget(
                    st.session_state,
                    "w_lab_sigma",
                    lambda key: st.number_input(
                        "RBF width σ", min_value=0.01, max_value=100.0, value=1.0, step=0.1,
                        key=key, help="exp(−‖x − y‖² / (2σ²)) on prepared (unit-length) rows.",
                    ),
                )
    if "cca_dim" in choice.options:
        with metric_settings[0]:
            # the report's rule: at most the smallest set − 1 and the narrowest layer compared
            limit, why = lab.cca_dim_bound(run, pairs, smallest)
            if state.kept_value(st.session_state, "w_lab_cca_dim", 10) > limit:
                st.session_state["w_lab_cca_dim"] = limit
            cca_dim = state.kept_widget(
                st.session_state,
                "w_lab_cca_dim",
                lambda key: st.number_input(
                    "CCA dimension", min_value=1, max_value=limit, value=min(10, limit), step=1,
                    key=key, help=widgets.escape_markdown(  # it names a model as written
                        f"Top SVD directions kept per side (at most {limit}: {why})."
                    ),
                ),
            )
    options = lab.chosen_options(metric, kernel=kernel, sigma=sigma, cca_dim=cca_dim)
    options_key = data.options_key(options)
    label = choice.label

    row2 = st.columns([2, 2])
    with row2[0]:
        k, requested_k = controls.bounded_value(st.session_state, view, "k", state.MIN_K, max_k)
        controls.row(
            [controls.slider(
                "k", "k (nearest neighbours)" if choice.neighbour_metric
                else f"k (not used by {label})", k, state.MIN_K, max_k,
                key=state.WIDGET_PREFIX + "k", view="k",
                disabled=not choice.neighbour_metric,  # kept for the neighbour metrics
                help=f"2 … {max_k}: k must be smaller than the smallest set ({smallest} stimuli). "
                "Feature metrics (CKA, SVCCA) do not use k.",
            )],
            key="lab-k",
        )
    if requested_k is not None and choice.neighbour_metric:
        st.warning(
            f"k={requested_k} is too large for the smallest set shown ({smallest} stimuli; each "
            f"stimulus needs k other stimuli as neighbours); every set is measured at k={max_k} "
            f"so that they compare. Choose a larger set size (or drop the small set) for a larger "
            f"k; k={requested_k} comes back with larger sets."
        )
    with row2[1]:
        statistics = st.expander(
            "Statistics: random sets, precision, permutations, seed",
            key=STATISTICS_KEY,
            on_change="rerun",
        )
    with statistics:
        # two rows of two: in half the page, four columns broke the labels mid-word
        settings = [*st.columns(2), *st.columns(2)] if statistics.open else [None] * 4
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
                "random value of the metric is narrower than this (at least "
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
                help="Label shuffles of low vs high for the permutation p-value, and shuffled "
                "pairings and matched sets for the calibrated scores.",
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
    # the numbers: live, or (slower metrics) when asked, with progress
    names = tuple(sets)
    rows = tuple(np.asarray(r) for r in sets.values())
    sizes = sorted({len(r) for r in rows})
    if lab.needs_button(metric, n):
        key = data.lab_numbers_key(path, stamp, pairs, names, *rows, data.k_key(metric, k),
                                   int(n_random), int(seed), interval_width, metric, options_key)
        numbers = data.kept(key)
        if numbers is None:
            why = (
                "it takes longer than the 0.3 s a live change may take"
                if not choice.live
                else f"a feature metric on {n:,} stimuli"
            )
            prompt = st.empty()  # the notice and its button go once the numbers are asked for
            with prompt.container():
                st.info(
                    f"{label} is not computed live ({why}): it is computed on the sets and up "
                    f"to {int(n_random)} random sets per set size when you ask, once for every "
                    "user of this server."
                )
                asked = st.button(
                    f"Compute {label}", key="w_lab_compute", icon=":material/play_arrow:"
                )
            if asked:
                prompt.empty()
                bar = widgets.ProgressBar(f"{label}…")
                numbers = data.lab_numbers(
                    path, stamp, pairs, names, rows, k, int(n_random), int(seed),
                    interval_width, metric, options_key, progress=bar,
                )
                data.keep(key, numbers)
                bar.empty()
        if numbers is None:
            page.close_page(context)
            return
        set_values, baselines = numbers
    else:
        set_values = data.set_values(path, stamp, pairs, names, rows, k, metric, options_key)
        baselines = {
            set_size: data.random_baseline(
                path, stamp, pairs, set_size, k, int(n_random), int(seed), interval_width,
                metric, options_key,
            )
            for set_size in sizes
        }

    baseline_main = baselines[size]
    set_sizes = {name: len(r) for name, r in sets.items()}
    cards = lab.headline(set_values, baseline_main, set_sizes, source, size, metric,
                         focus_baseline=baselines.get(set_sizes.get(source, size)))
    # what the cards hold, once: their labels stay short enough for a 1024-pixel window (a card's
    # label is one line, cut with an ellipsis)
    what = f"{label} (k = {k})" if choice.neighbour_metric else label
    st.caption(f"{what}, mean over the {len(pairs)} {widgets.escape_markdown(sides)} pairs shown:")
    widgets.number_cards(
        [
            widgets.Card(
                f"Focus: {SHORT_SET_LABEL[source]}",
                cards.focus,
                delta=cards.focus_delta,
                help=f"{what} of the focus set ({SET_LABEL[source]}), mean over the "
                f"{widgets.escape_markdown(sides)} "
                "pairs shown; the change is against random sets of the focus set's size "
                f"({set_sizes.get(source, size):,} stimuli: alignment depends on the set size).",
            ),
            widgets.Card("Low dispersion", cards.low),
            widgets.Card("Random (mean)", cards.random),
            widgets.Card("High dispersion", cards.high),
        ],
        key="lab",
        widths=[1.6, 1, 1, 1],  # the focus card's delta ("+0.0123 vs random of 30") needs room
    )
    if cards.too_small:
        st.info(
            f"No CKNNA number above for sets of fewer than {lab.MIN_CKNNA_SET_SIZE} stimuli "
            f"({', '.join(SET_LABEL[name] for name in cards.too_small)}): on so few stimuli "
            "CKNNA's unbiased estimates are too noisy to read and often exceed 1. The bars and "
            "the table below still show them; choose a larger set size (or select more "
            "stimuli) for numbers."
        )
    undefined = lab.undefined_note(set_values, baselines)
    if undefined is not None:  # it names the models: as text
        st.warning(widgets.escape_markdown(undefined))
    bound_note = lab.bound_note(set_values, baselines)
    if bound_note is not None:  # it names the models: as text
        st.warning(widgets.escape_markdown(bound_note))

    # a stable name for the browser test and the benchmark
    with st.container(key=lab.BARS_CONTAINER_KEY):
        # a selection or pasted set of another size beside random sets of its own size
        own_size = set_sizes.get(source, size) if source in ("selection", "pasted") else size
        st.image(data.alignment_bars_svg(
            set_values, baseline_main, metric, pair_modalities(run, pairs),
            baselines.get(own_size) if own_size != size else None,
        ))
    st.caption(lab.baseline_statement(baseline_main))

    calibrated = st.expander(
        "Calibrated scores and matched random baselines: does low > high survive density and "
        "category?",
        key=CALIBRATION_KEY,
        on_change="rerun",
    )
    with calibrated:
        if calibrated.open:
            _calibration(sets, k, metric, options_key, label, int(n_permutations), int(seed),
                         lab.download_name("calibration", context.info.name, metric, score,
                                           size, k))

    per_stimulus = st.expander(
        "Per-stimulus alignment against dispersion (k-NN overlap, local CKA)",
        key=PER_STIMULUS_KEY,
        on_change="rerun",
    )
    with per_stimulus:
        if per_stimulus.open:
            _per_stimulus(sets, source, score, k)

    tables = st.expander(
        "Low vs high permutation test, and every number in a table (CSV download)",
        key=TABLES_KEY,
        on_change="rerun",
    )
    with tables:
        if tables.open:
            _tables(sets, set_values, baselines, score, size, k, n_permutations, seed, metric,
                    options_key, label)
    page.close_page(context)  # the URL follows the fragment's own reruns


def _live(metric: str) -> bool:
    """Whether the expanders compute ``metric``'s analyses at once: a live metric on a run of
    at most ``data.PER_STIMULUS_LIVE_STIMULI`` stimuli."""
    return not lab.needs_button(metric, n) and n <= data.PER_STIMULUS_LIVE_STIMULI


def _when_asked(metric: str, what: str, work: str, key: str, done: bool) -> bool:
    """Whether to compute ``what`` of ``metric`` now: at once for live metrics on runs up to
    ``data.PER_STIMULUS_LIVE_STIMULI`` stimuli or when computed on this server and still kept
    (``done``); else when the user presses the button (which says what it will do)."""
    if _live(metric) or done:
        return True
    prompt = st.empty()  # the notice and its button go once the work is asked for
    with prompt.container():
        st.info(f"{what} takes a while here ({work}); it is computed when you ask, once for "
                "every user of this server.")
        asked = st.button(f"Compute {what}", key=key)
    if asked:
        prompt.empty()
    return asked


def _calibration(  # noqa: ANN001
    sets, k, metric, options_key, label, n_draws, seed, file_name
) -> None:
    """Each set's raw score beside its calibrated score and matched random baseline, and the
    verdict on low > high."""
    arguments = (path, stamp, pairs, tuple(sets), tuple(np.asarray(r) for r in sets.values()), k,
                 metric, options_key, n_draws, n_draws, seed)
    # done while the result is kept (the kept results are bounded: it may have gone)
    found = None if _live(metric) else data.kept(data.calibration_key(*arguments))
    work = f"{label} on {n_draws} shuffled pairings and {n_draws} matched sets per set and pair"
    if not _when_asked(
        metric, "the calibrated scores", work, "w_lab_calibration_compute", found is not None
    ):
        return
    st.text(
        f"Calibrated: the {label} of a set minus the mean of the same score with the "
        f"{'image–caption' if sides == 'vision × language' else sides.replace(' × ', '–')} "
        f"pairing shuffled within the set ({n_draws} shuffles; the set's size and density stay, "
        f"only the pairing goes). Matched: {n_draws} random sets matched to each set on the "
        "GPA models' local density (typicality) and, where the data set has labels, on "
        "category."
    )
    result = data.calibration(*arguments) if _live(metric) else found
    if result is None:  # minutes on a large run: a progress bar, the result kept for everyone
        bar = widgets.ProgressBar("Shuffling pairings and drawing matched random sets…")
        result = data.calibration_with_progress(*arguments, progress=bar)
        bar.empty()
    if result.low_high.empty:
        st.text(result.verdict)
    elif result.low_high["survives"].all():
        st.success(result.verdict)
    else:
        st.warning(result.verdict)
    if result.note:
        st.text(f"Note: {result.note}.")
    undefined = lab.undefined_note(result.table)
    if undefined is not None:  # it names the models: as text
        st.warning(widgets.escape_markdown(undefined))
    shown = result.table[
        ["vision_model", "language_model", "set", "set_size", "value", "calibrated",
         "null_mean", "null_lower_95", "null_upper_95", "matched_mean", "matched_lower_95",
         "matched_upper_95", "matched_p_value_greater", "set_typicality", "matched_typicality"]
    ].rename(columns={"value": label, "matched_p_value_greater": "p(matched ≥ set)"})
    # data grids, not Markdown: 15 columns are wider than the page and scroll inside the grid
    st.dataframe(lab.shown_table(shown, 4), hide_index=True, width="stretch",
                 key="calibration-table")
    st.text("Low − high against the same difference between the low and high sets' matched sets:")
    st.dataframe(
        lab.shown_table(result.low_high.drop(columns=["vision_layer", "language_layer"]), 4),
        hide_index=True,
        width="stretch",
        key="calibration-low-high",
    )
    st.download_button(
        "Download calibrated scores (CSV)",
        lambda: result.table.to_csv(index=False).encode("utf-8"),
        file_name=file_name,
        mime="text/csv",
        key="download-calibration",
    )


def _per_stimulus(sets, focus, score, k) -> None:  # noqa: ANN001
    """Per-stimulus alignment of one pair against dispersion (picture, ρ and permutation p)."""
    # by its models: a pair that is gone is forgotten, never replaced by the pair now at its place
    choices = {(pair.vision_model, pair.language_model): pair for pair in pairs}
    state.drop_stale_choice(st.session_state, "w_lab_pair", list(choices))
    pair = choices[st.selectbox(
        "Pair", list(choices), key="w_lab_pair",
        format_func=lambda models: lab.pair_text(choices[models]),
    )]
    if not data.per_stimulus_ready(path, stamp, n, [pair], k):
        st.info(
            f"Per-stimulus alignment of {n:,} stimuli (local CKA costs O(n·d²) per pair) is "
            "computed when you ask, once for every user of this server."
        )
        if not st.button("Compute per-stimulus alignment", key="w_lab_per_stimulus_compute"):
            return
        bar = widgets.ProgressBar("Per-stimulus alignment…")
        data.per_stimulus_table(path, stamp, [pair], k, progress=bar)
        bar.empty()
    marked = tuple(map(int, sets[focus])) if focus in sets else ()
    st.image(data.alignment_scatter_png(path, stamp, pair, k, score, marked))
    relation = data.alignment_relation(path, stamp, (pair,), k, score)
    st.text(
        "k-NN overlap: the share of a stimulus's k nearest stimuli that the "
        f"{' and the '.join(pair_modalities(run, [pair]))} model agree on (its mean is the full "
        "set's mutual k-NN). Local CKA (paper "
        f"003): how much the stimulus raises the CKA of a seeded base of "
        f"{local_cka_base_size(n)} pairs. Spearman ρ "
        "against dispersion with a two-sided permutation p; a negative ρ means that stimuli the "
        f"GPA models agree on carry more cross-modal alignment. Focus set circled; k = {k}."
    )
    st.markdown(widgets.markdown_table(
        relation[["metric", "dispersion_score", "spearman_rho", "permutation_p_value_two_sided",
                  "n_permutations", "n_stimuli"]].round(4)
    ))


def _tables(  # noqa: ANN001
    sets, set_values, baselines, score, size, k, n_permutations, seed, metric, options_key, label
) -> None:
    """The permutation test per pair and the table of every number (with its CSV download)."""
    done = ("lab_permutation", metric, path, stamp, pairs, tuple(map(int, sets["low"])),
            tuple(map(int, sets["high"])), data.k_key(metric, k), options_key,
            int(n_permutations), int(seed))
    work = f"{label} on {2 * int(n_permutations)} relabelled sets per pair"
    if not _when_asked(
        metric, "the permutation test", work, "w_lab_permutation_compute", data.finished(*done)
    ):
        return
    st.subheader("Low vs high: permutation test per pair")
    st.caption(
        f"{label}(low) − {label}(high) against {int(n_permutations)} random relabellings of the "
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
        metric,
        options_key,
    )
    data.mark_finished(*done)
    if permutation["permutation_p_value_two_sided"].isna().any():
        fix = ": a smaller CCA dimension, or sets of distinct stimuli, gives numbers"
        st.text(f"p-values are n/a where {label} is undefined on the low or high set or on some "
                f"of their relabellings{fix if metric == 'svcca' else ''}.")
    st.dataframe(lab.shown_table(permutation), hide_index=True, width="stretch")
    table = lab.results_table(set_values, baselines, permutation, score, int(seed))
    st.subheader("All results")
    st.caption(
        f"One row per {widgets.escape_markdown(sides)} pair, set and metric (long format: the "
        "metric in "
        "'metric', its number in 'value'); random columns: random sets of the same size "
        "(n_random: how many were drawn)."
    )
    st.dataframe(lab.shown_table(table), hide_index=True, width="stretch")
    st.download_button(
        "Download results (CSV)",
        lambda: table.to_csv(index=False).encode("utf-8"),
        file_name=lab.download_name("alignment", context.info.name, metric, score, size, k),
        mime="text/csv",
        key="download-results",
    )


sets_and_results()
page.close_page(context)
