"""Paper analyses: Fig. 2 (low / random / high dispersion sets), Fig. S1 (drop 25%), Fig. S2
(leave one vision model out) and the language-layer sweep, on the chosen run.

Every number comes from :mod:`convergence_core.analyses`; results are cached per run and
parameters (``st.cache_data`` in ``dashboard.data``), so moving a control recomputes only what
depends on it. Only the open tab is computed and drawn; figures are the report's own (PNG) and the
full tables open on demand. Above ``data.PAPER_AUTO_COMPUTE_STIMULI`` stimuli an analysis that
takes minutes starts only when asked (a button), and once computed it is shown to every session at
once; ``serve`` computes the default Fig. 2 of the default run before the first visit
(``data.default_dispersion_sets``).
"""

from __future__ import annotations

import streamlit as st

from convergence_core import analyses, validation
from convergence_core.dashboard import catalogue, data, lab, page, plots, state, widgets

#: Session key of the open tab
TAB_KEY = "w_paper_tab"
TABS = (
    "Fig. 2: dispersion sets",
    "Fig. S1: drop a fraction",
    "Fig. S2: leave one model out",
    "Layer sweep",
)

context = page.open_page("pages/4_Paper_analyses.py")
run, view = context.run, context.view
st.caption(
    "Does low intra-modal dispersion (vision models agree) go with higher vision–language "
    "alignment? Fig. 2, S1 and S2 of the paper, recomputed on this run."
    if run.gpa_modality == "vision" else
    f"Does low dispersion (the GPA models, {widgets.escape_markdown(run.gpa_modality)}, agree) "
    "go with higher alignment "
    "with the other models? Fig. 2, S1 and S2 of the paper, recomputed on this run."
)
path = context.info.path
stamp = data.manifest_stamp(path)
n = run.n_stimuli
max_size = n // 2
if max_size < state.MIN_SUBSET_SIZE:
    st.error(
        f"Run {context.quoted_name} has {n} stimuli; these analyses need at least "
        f"{2 * state.MIN_SUBSET_SIZE}. Pick a larger run."
    )
    st.stop()

with st.sidebar:
    score = widgets.score_radio(
        view,
        "Dispersion score",
        horizontal=False,
        help=f"mean residual across the {widgets.escape_markdown(run.gpa_modality)} models "
        "(GPA), or score on the "
        "residuals' first principal "
        "component",
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
        coerce=lambda value: state.subset_size(value, n),
    )
    k, requested_k = state.bind_bounded_int(
        st.session_state,
        view,
        "k",
        lambda key: st.number_input(
            "k (CKNNA neighbours)", min_value=state.MIN_K, max_value=int(size) - 1, step=1, key=key
        ),
        state.MIN_K,
        int(size) - 1,
    )
    if requested_k is not None:
        st.caption(f"k={requested_k} needs sets of more than {requested_k} stimuli; using k={k}.")
    # the browser builds a popover's widgets only when it is opened (an expander's at once)
    with st.popover("Statistics", icon=":material/tune:"):
        n_random = st.number_input(
            "random sets", min_value=10, max_value=2000, value=data.PAPER_RANDOM_SETS, step=10
        )
        n_permutations = st.number_input(
            "permutations per pair",
            min_value=50,
            max_value=5000,
            value=analyses.DEFAULT_N_PERMUTATIONS,
            step=50,
        )
        seed = st.number_input("seed", min_value=0, value=0, step=1)
    # Fig. 2 and S1 align the GPA models with the language models or, on a run that has them,
    # with the models outside GPA (brain recordings), as the report does
    groups = analyses.partner_groups(run)
    partners = next(iter(groups), "language")
    if len(groups) > 1:
        state.drop_stale_choice(st.session_state, "w_paper_partners", list(groups))
        partners = state.kept_widget(st.session_state, "w_paper_partners", lambda key: st.radio(
            "Fig. 2 and S1 pairs", list(groups), key=key,
            format_func=lambda group: widgets.escape_markdown(groups[group]),  # modalities
            help="the language models (at their best layers) or the models outside GPA that are "
            "not language models (at their default layers)",
        ))
page.close_page(context)
path_text = str(path)
large = n > data.PAPER_AUTO_COMPUTE_STIMULI


def _asked(what: str, work: str, key: str, *done_key: object, heavy: bool = False) -> bool:
    """Whether to compute ``what`` now: always for small runs or once computed on this server;
    for large runs (or ``heavy`` settings) only when the user presses the button (which says
    what it will do)."""
    where = f"on {n:,} stimuli" if large else f"with sets of {int(size):,} and k = {int(k)}"
    return widgets.ask_first(
        large or heavy, done_key,
        f"{what} {where} takes up to minutes here ({work}); it is computed once for every user "
        "of this server.",
        f"Compute {what}", key=key,
    )


def _table_on_demand(label: str, key: str, frame, **options) -> None:
    """A data table inside an expander that is built only when opened: headers in words, p-values
    to four significant digits (``widgets.data_table``); its CSV download keeps the machine
    names."""
    box = st.expander(label, key=key, on_change="rerun")
    with box:
        if box.open:
            widgets.data_table(frame, hide_index=True, width="stretch", **options)


# without language models (or when chosen), Fig. 2 and S1 align the GPA models with the models
# outside GPA (brain recordings, at their default layers); the layer sweep needs language models
partner_pairs = (
    [] if run.language_models and partners == "language" else analyses.partner_pairs(run)
)


def _language_missing(*, partners_will_do: bool = False) -> bool:
    """Whether the run lacks language models (then say so: the sweep needs them; Fig. 2 and S1
    (``partners_will_do``) are drawn for the models outside GPA when there are any)."""
    if run.language_models or (partners_will_do and partner_pairs):
        return False
    others = run.partner_models  # no language model here: the models outside GPA
    st.info(
        f"Run {context.quoted_name} has no language model: this figure compares the vision "
        "models with language models. Fig. S2 needs only the vision models"
        + ("; Fig. 2, S1 and the Alignment lab align them with "
           f"{', '.join(map(widgets.escape_markdown, others))}."
           if others else ".")
    )
    return True


fig2_tab, s1_tab, s2_tab, sweep_tab = st.tabs(list(TABS), key=TAB_KEY, on_change="rerun")

with fig2_tab:
    if fig2_tab.open and not _language_missing(partners_will_do=True):
        st.subheader("Low vs random vs high dispersion")
        work = (
            f"{int(n_random)} random sets and {int(n_permutations)} label shuffles of "
            f"{int(size):,}-stimulus sets"
        )
        done_key = ("dispersion_sets", path_text, stamp, int(size), int(k), score,
                    int(n_random), int(n_permutations), int(seed), partners)
        if _asked("Fig. 2", work, "compute-fig2", *done_key,
                  heavy=int(size) * int(k) > data.PAPER_AUTO_COMPUTE_SET_WORK):
            try:
                sets = data.dispersion_sets(
                    path_text, stamp, int(size), int(k), score, int(n_random),
                    int(n_permutations), int(seed), partners,
                )
            except ValueError as error:
                st.error(widgets.escape_markdown(error))
            else:
                if partner_pairs:
                    st.caption(
                        ("" if run.language_models else "No language model in this run: ")
                        + "Fig. 2 for the GPA models × "
                        + ", ".join(dict.fromkeys(
                            widgets.escape_markdown(p.language_model) for p in partner_pairs
                        ))
                        + " "
                        "(models outside GPA, at their default layers)."
                    )
                    sides = analyses.pair_sides(run, partner_pairs)
                else:  # the GPA models × the language models: "brain × language" with brains
                    sides = analyses.partner_groups(run)["language"]
                # the report's rule: no CKNNA number, bar or count for sets under 24 stimuli
                size_fix = f"a set size of {validation.MIN_CKNNA_SET_SIZE}"
                st.text(analyses.set_effect_verdict(
                    sets, sides, int(size), f"use {size_fix} or more"
                ))

                if not partner_pairs and n > analyses.LAYER_SWEEP_MAX_STIMULI:  # sampled layers
                    sample_note = lab.best_layer_sample_note(
                        data.best_layers_table(path_text, stamp, int(k)), n
                    )
                    if sample_note is not None:
                        st.info(sample_note)
                shown, options = data.dispersion_sets_picture(run, sets, int(size), partners)
                st.image(data.paper_figure_png("dispersion_sets", shown, **options))
                st.caption(
                    f"Permutation test per pair: the low/high labels of the {2 * int(size)} "
                    f"stimuli shuffled {int(n_permutations)} times; p = (1 + #as extreme) / "
                    f"({int(n_permutations)} + 1). Across pairs (two-sided): the mean over pairs "
                    "of low − high against that mean on the same shuffles, which keeps the pairs' "
                    "shared models and stimuli in the null; Wilcoxon signed-rank and paired t "
                    "tests take the pairs as independent, so their p-values may be too small when "
                    "the pairs' differences go together (and with n pairs Wilcoxon's cannot fall "
                    "below 2/2ⁿ):"
                )
                st.markdown(widgets.markdown_table(catalogue.paired_tests_table(
                    analyses.paired_set_tests(sets), int(n_permutations)
                )))
                st.caption(
                    "Statistic: W, Wilcoxon's signed-rank sum; t, the paired t; Δ, the mean over "
                    "pairs of CKNNA low − high (the permutation test's)."
                )
                _table_on_demand(
                    "Every pair: CKNNA per set, random interval, permutation p-values",
                    "w_paper_sets_table", sets,
                )

with s1_tab:
    if s1_tab.open and not _language_missing(partners_will_do=True):
        q = st.slider("Fraction dropped", min_value=0.05, max_value=0.5, value=0.25, step=0.05)
        try:
            dropped = data.drop_fraction(path_text, stamp, float(q), int(k), score, partners)
        except ValueError as error:
            st.error(widgets.escape_markdown(error))
        else:
            st.image(data.paper_figure_png(
                "drop_fraction", dropped,
                **({"partner": "model outside GPA"} if partner_pairs else {}),
            ))
            wide = dropped.pivot_table(
                index=["vision_model", "language_model"],
                columns="condition",
                values="cknna",
                sort=False,
            )[["drop_high", "full", "drop_low"]].reset_index()
            st.caption(f"CKNNA (k = {int(k)}) of each pair, {q:.0%} of the stimuli dropped:")
            st.markdown(widgets.markdown_table(catalogue.shown_table(wide, decimals=3)))

with s2_tab:
    if s2_tab.open:
        if len(run.gpa.models) < 3:
            st.info(
                f"Leave-one-model-out needs at least 3 GPA models; run {context.quoted_name} has "
                f"{len(run.gpa.models)}."
            )
        elif _asked(
            "Fig. S2", f"GPA rerun {len(run.gpa.models)} times", "compute-s2",
            "leave_one_out", path_text, stamp,
        ):
            points, statistics = data.leave_one_out(path_text, stamp)
            st.image(data.paper_figure_png("leave_one_out", points, statistics))
            st.caption(
                f"Residual units: {plots.RESIDUAL_UNITS}. Partial dispersion: mean residual "
                "of GPA rerun without the held-out model; deviation: the held-out model's distance from "
                "that consensus after orthogonal Procrustes."
            )
            _table_on_demand(
                "Correlation per held-out model (Pearson, Spearman, fit line)",
                "w_paper_s2_table", statistics,
            )

with sweep_tab:
    if sweep_tab.open and not _language_missing():
        try:
            sweep = data.layer_sweep(path_text, stamp, int(k))
            best = data.best_layers_table(path_text, stamp, int(k))
        except ValueError as error:
            st.error(widgets.escape_markdown(error))
        else:
            st.image(data.paper_figure_png("layer_sweep", sweep))
            st.caption(
                "Layer used for each language model (highest mean CKNNA with the GPA models, "
                "full set):"
            )
            # k is the sidebar's and a sampled sweep says its seed below: the rest fits the page
            st.markdown(widgets.markdown_table(catalogue.shown_table(
                best.drop(columns=["k", "sample_seed"]), decimals=3
            )))
            sample_note = lab.best_layer_sample_note(best, n)
            if sample_note is not None:
                st.info(sample_note)
            _table_on_demand("Every GPA model × language layer", "w_paper_sweep_table", sweep)
