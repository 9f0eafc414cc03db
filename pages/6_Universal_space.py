"""Universal space: the barycenter (GPA) of the chosen models across modalities; cross-modal
dispersion per stimulus and its relation to the run's (GPA) dispersion; held-out image–text
retrieval through the space beside a ridge baseline and chance; each image's top captions.

Only the open tab is built (retrieval runs when its tab or the captions tab is opened), the
scatter is a picture until its toggle asks for the interactive chart, and the pictures of the
stimuli at both ends and the table of every stimulus are sent when their expanders are opened.

Every number comes from :mod:`convergence_core.universal` and :mod:`convergence_core.retrieval`,
cached per run and settings in :mod:`convergence_core.dashboard.data` (``cross_modal``,
``cross_modal_pictures``, ``cross_modal_retrieval``), so moving a control recomputes only what
depends on it.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from convergence_core import retrieval
from convergence_core.dashboard import (
    catalogue,
    data,
    gallery,
    page,
    plots,
    state,
    universal_plots,
    widgets,
)

#: Above this many stimuli the universal space waits for a button (it takes minutes there)
AUTO_COMPUTE_STIMULI = 5_000
MODELS_KEY = "w_universal_models"
IMAGE_KEY = "w_universal_image"
TAB_KEY = "w_universal_tab"
INTERACTIVE_KEY = "w_universal_interactive"
TABLE_KEY = "w_universal_table_open"
ENDS_KEY = "w_universal_ends_open"
GALLERY_SIZE = 6
#: Above this many stimuli the image is typed as an id instead of picked from a list.
SELECTBOX_LIMIT = 2000
SCORE_COLUMN = {
    "cosine": "cosine similarity",
    "euclidean": "Euclidean distance (residual units)",
}
#: Their short headers in the narrow table of top captions (the full name is the column's help)
SCORE_HEADER = {"cosine": "cosine", "euclidean": "distance"}


context = page.open_page("pages/6_Universal_space.py")
run, view = context.run, context.view
path = context.info.path
stamp = data.manifest_stamp(path)
ids = run.stimuli["id"].astype(str).tolist()
captions = list(run.stimuli["captions"]) if "captions" in run.stimuli else [[] for _ in ids]
first_captions = data.catalogue(run).first_captions
has_pictures = run.images_root is not None  # a run from feature files alone has none
st.caption(
    "Generalized Procrustes over any group of models — vision, language, or any other modality "
    "in the run — gives one space in which every stimulus has a position per model. "
    + (
        "Where do image and caption land apart, and can captions be found from images through it?"
        if has_pictures and run.has_captions else
        "Where do a stimulus's vision and language representations land apart, and can one be "
        "found from the other through it?"
    )
    # the layers differ from the pages that pair vision with language (a user saw gemma at
    # layer_18 here and layer_13 there): said where the choice is made
    + " Each model enters at its default layer (Layers, in the sidebar, changes it); the Stimuli, "
    "Alignment lab and Paper analyses pages take each language model at its best layer against "
    "the GPA models (the vision models, or whatever the run aligns with GPA) instead."
)

# a choice made on another run: the models this run has, else (none of them) all of this run's
state.carry_choices_to_run(st.session_state, MODELS_KEY, run.models)
with st.sidebar:
    st.header("Barycenter")
    chosen = widgets.choose_many(
        "Models in the barycenter",
        run.models,
        key=MODELS_KEY,
        format_func=lambda model: f"{model} ({run.modality(model)})",
        help="Each chosen model weighs the same in the consensus.",
    )
    layers: dict[str, str] = {}
    # popovers: the browser builds their widgets only when opened (an expander's at once)
    with st.popover("Layers", icon=":material/layers:"):  # data.default_members: the defaults
        for model in chosen:
            key = f"w_universal_layer_{model}"
            options = run.layers(model)
            state.drop_stale_choice(st.session_state, key, options)
            layers[model] = st.selectbox(  # a label renders Markdown: the name as text
                widgets.escape_markdown(model), options,
                index=options.index(run.default_layer(model)), key=key,
            )
    # model names come from the user (feature files, a shared run): help texts render Markdown
    gpa_models_text = ", ".join(widgets.escape_markdown(m) for m in run.gpa.models)
    modality_text = widgets.escape_markdown(run.gpa_modality)  # as is the modality's name
    score = widgets.score_radio(  # a label renders Markdown: the modality as text
        view, widgets.escape_markdown(f"{run.gpa_modality.capitalize()} dispersion"),
        help=f"intra-modal dispersion: the mean residual (or PC1 score) of GPA across the run's "
        f"GPA models ({gpa_models_text})"
    )
    with st.popover("Retrieval and statistics", icon=":material/tune:"):
        n_folds = st.number_input("Folds", min_value=2, max_value=10, value=5, step=1)
        similarity = st.radio("Similarity", retrieval.SIMILARITIES, horizontal=True)
        n_permutations = st.number_input(
            "Permutations", min_value=50, max_value=5000, value=data.CROSS_MODAL_PERMUTATIONS,
            step=50,
        )
        seed = st.number_input("Seed", min_value=0, value=0, step=1)
page.close_page(context)

modalities = list(dict.fromkeys(run.modality(model) for model in chosen))
if len(chosen) < 2 or len(modalities) < 2:
    st.error(
        "Pick at least two models of at least two modalities (e.g. a vision and a language "
        f"model) in the sidebar; chosen: {len(chosen)} model(s) of "
        f"{widgets.escape_markdown(', '.join(modalities)) if modalities else 'no'} modality."
    )
    st.stop()
members = tuple((model, layers[model]) for model in chosen)

# only the open tab is built: retrieval fits the space once per fold, so it runs when asked
dispersion_tab, retrieval_tab, captions_tab = st.tabs(
    ["Cross-modal dispersion", "Retrieval", "Top captions per image"],
    key=TAB_KEY,
    on_change="rerun",
)


def _asked(what: str, key: str, *done: object) -> bool:
    """Whether to compute ``what`` now: always below ``AUTO_COMPUTE_STIMULI`` stimuli or once
    this server has computed it (``done``: its key in ``data.finished``); above, when the user
    presses the button (GPA across the chosen models takes minutes there: 10,000 stimuli × 6
    models of 768-1,536 features took 7 minutes on 2 busy cores)."""
    return widgets.ask_first(
        run.n_stimuli > AUTO_COMPUTE_STIMULI, done,
        f"{what.capitalize()} of {len(members)} models on {run.n_stimuli:,} stimuli can take "
        "minutes here; it is computed once for every user of this server."
        + (" The server started the default models' space when it started: this page shows "
           "it at once when that is done." if what == "the universal space" else ""),
        f"Compute {what}", key=key, icon=":material/play_arrow:",
    )


with dispersion_tab:
    if dispersion_tab.open and _asked(
        "the universal space", "compute-universal", "cross_modal", str(path), stamp, members,
        score, int(n_permutations), int(seed),
    ):
        try:
            per_stimulus, relation, model_summary = data.cross_modal(
                str(path), stamp, members, score, int(n_permutations), int(seed)
            )
        except ValueError as error:
            st.error(widgets.escape_markdown(error))
            st.stop()
        row = relation.iloc[0]
        pairs = (
            " and ".join(modalities)
            if len(modalities) == 2
            else "each pair of " + ", ".join(modalities)
        )
        st.text(
            "Cross-modal dispersion of a stimulus: the distance between its modality means in the "
            f"universal space ({pairs}; root-mean-square over pairs when there are more than two), "
            f"in {universal_plots.UNITS}. 0 = the modalities agree exactly."
        )
        # short labels (one line each in a 1024-pixel window); the help says the rest
        widgets.number_cards(
            [
                widgets.Card(
                    f"ρ with {run.gpa_modality} dispersion", f"{row['spearman_rho']:.3f}",
                    help="Spearman rank correlation, over stimuli, of cross-modal dispersion and "
                    f"dispersion across the GPA models ({gpa_models_text})",
                ),
                widgets.Card(
                    "Permutation p",
                    catalogue.p_text(row["permutation_p_value_two_sided"], row["n_permutations"]),
                    help=f"two-sided, over {int(row['n_permutations']):,} shuffles of the "
                    f"stimuli: the smallest p they can give is 1/({int(row['n_permutations']):,} "
                    "+ 1)",
                ),
                widgets.Card(
                    "Median cross-modal",
                    f"{per_stimulus['cross_modal_dispersion'].median():.4f}",
                    help=f"median cross-modal dispersion over the stimuli, in "
                    f"{universal_plots.UNITS}",
                ),
            ],
            key="universal",
        )
        # a picture first (quick to load); the toggle turns it into the Plotly chart, whose
        # hover names each stimulus (id and caption up to plots.HOVER_TEXT_LIMIT stimuli)
        scatter, bars = data.cross_modal_pictures(
            str(path), stamp, members, score, int(n_permutations), int(seed)
        )
        # kept while another tab is open
        interactive = widgets.interactive_chart_toggle(
            INTERACTIVE_KEY, "Interactive chart: hover for each stimulus's id and caption, zoom",
            "scatter",
        )
        if interactive:
            st.plotly_chart(
                universal_plots.dispersion_scatter(
                    per_stimulus,
                    row,
                    first_captions,
                    intra_title=f"{run.gpa_modality} dispersion ({plots.SCORE_NAME[score]})",
                ),
                key="universal-scatter",
            )
        else:
            st.image(scatter)
        st.image(bars)
        # the stimuli at both ends are built when their expander is opened: below the first
        # screen, their 12 pictures were a third of the page's load in the browser
        end_size = min(GALLERY_SIZE, len(per_stimulus) // 2)  # the two ends never overlap
        ends = st.expander(
            f"Stimuli at both ends: the {end_size} lowest and the {end_size} highest by "
            "cross-modal dispersion",
            key=ENDS_KEY,
            on_change="rerun",
        )
        with ends:
            if ends.open:
                st.caption(
                    "Under each image: its id and its cross-modal dispersion (distance between "
                    f"its modality means, {universal_plots.UNITS})."
                )
                values = per_stimulus["cross_modal_dispersion"].to_numpy()
                stimulus_rows = per_stimulus["stimulus"].to_numpy()
                by_row = dict(zip(stimulus_rows, values, strict=True))
                lowest, highest = catalogue.gallery_ends(values, end_size)
                sides = (("Lowest", stimulus_rows[lowest]), ("Highest", stimulus_rows[highest]))
                for column, (extreme, rows) in zip(st.columns(2), sides, strict=True):
                    with column:
                        st.subheader(f"{extreme} cross-modal dispersion")
                        gallery.show(
                            run,
                            rows,
                            [f"id {ids[r]} · cross-modal {by_row[r]:.4f}" for r in rows],
                            key=f"universal-{extreme.lower()}",
                            columns=3,
                            inspect=False,
                        )
        # the table of every stimulus is sent when opened (100,000 rows are megabytes)
        table = st.expander(
            f"Every stimulus ({len(per_stimulus):,} rows)", key=TABLE_KEY, on_change="rerun"
        )
        with table:
            if table.open:
                # two different residuals: the run's GPA dispersion of the stimulus (x of the
                # scatter) and its residual from the consensus of the chosen models (all
                # modalities); headers in words, the CSV download keeps the machine names
                widgets.data_table(
                    per_stimulus.assign(
                        caption=[first_captions[r] for r in per_stimulus["stimulus"]]
                    ),
                    names=catalogue.universal_table_names(
                        per_stimulus.columns, run.gpa_modality, plots.SCORE_NAME[score],
                        len(members),
                    ),
                    hide_index=True,
                    width="stretch",
                )

def _retrieval_missing() -> str | None:
    """Why there is no image–text retrieval with these members (None: there is), and the fix
    when the sidebar can give it."""
    lacking = [m for m in ("vision", "language") if m not in modalities]
    if not lacking:
        return None
    absent = [m for m in lacking if not getattr(run, f"{m}_models")]
    if absent:
        return (
            f"Image–text retrieval needs a vision and a language model; this run has no "
            f"{' and no '.join(absent)} model."
        )
    return (
        f"Image–text retrieval needs at least one vision and one language model in the "
        f"barycenter; add a {' and a '.join(lacking)} model in the sidebar."
    )


def _retrieval(key: str) -> retrieval.CrossValidatedRetrieval | None:
    """The chosen members' held-out retrieval (both tabs; None: a large run waits for the
    button ``key``); a run too small for the folds stops the tab with the reason and the fix."""
    if not _asked(
        "held-out retrieval", key, "cross_modal_retrieval", str(path), stamp, members, score,
        int(n_folds), int(seed), similarity,
    ):
        return None
    try:
        return data.cross_modal_retrieval(
            str(path), stamp, members, score, int(n_folds), int(seed), similarity
        )
    except ValueError as error:  # a limit of the run (too few stimuli), said with the fix
        st.warning(widgets.escape_markdown(error))
        st.stop()


with retrieval_tab:
    if retrieval_tab.open:
        if (missing := _retrieval_missing()) is not None:
            st.info(missing)
        elif (result := _retrieval("compute-retrieval")) is not None:
            summary = result.summary()
            subset = st.radio(
                "Held-out stimuli",
                ("all", "low_dispersion", "high_dispersion"),
                horizontal=True,
                format_func=lambda s: {  # a radio's options render Markdown
                    "all": "all",
                    "low_dispersion": f"low {modality_text} dispersion (third)",
                    "high_dispersion": f"high {modality_text} dispersion (third)",
                }[s],
            )
            st.plotly_chart(
                universal_plots.retrieval_bars(summary, subset), key="universal-recall"
            )
            widgets.data_table(
                retrieval.comparison_table(summary), hide_index=True, width="stretch"
            )
            st.caption(
                f"{int(n_folds)}-fold (seed {int(seed)}): each fold's space (centring, scale, "
                "rotation of every model) is fitted on the other folds; held-out images and "
                f"captions are mapped into it and ranked by {similarity} similarity among the "
                "fold's held-out stimuli. Ridge: vision features → language features, α by "
                "leave-one-out CV on the training folds. Chance: recall@k = k / n, median rank "
                f"(n + 1) / 2. Thirds: the held-out stimuli of lowest / highest {modality_text} "
                "dispersion, ranked among themselves."
            )
            st.text(
                "Universal space vs ridge on the same held-out queries (recall@1, exact McNemar):"
            )
            widgets.data_table(
                retrieval.paired_recall_test(result.ranks, k=1), hide_index=True, width="stretch"
            )
            st.text("Ridge α chosen in each fold (relative to tr(XᵀX)):")
            widgets.data_table(result.baseline, hide_index=True)

with captions_tab:
    if captions_tab.open:
        if (missing := _retrieval_missing()) is not None:
            st.info(missing)
        elif (result := _retrieval("compute-captions")) is not None:
            which = "Image (stimulus id)" if has_pictures else "Stimulus id"
            if len(ids) <= SELECTBOX_LIMIT:
                state.drop_stale_choice(st.session_state, IMAGE_KEY, ids)
                chosen_id = st.selectbox(which, ids, key=IMAGE_KEY)
            else:
                chosen_id = st.text_input(which, value=ids[0], key=IMAGE_KEY)
            if chosen_id not in ids:
                st.error(f"No stimulus with id '{state.shown(chosen_id)}' in this run.")
                st.stop()
            stimulus = ids.index(chosen_id)
            k = st.slider("Captions shown", min_value=1, max_value=10, value=5)
            rank, n_gallery, fold = result.rank_of(stimulus)
            left, right = st.columns([1, 2])
            with left:
                # checked (inside the run, a decodable JPEG of a thumbnail's size) as on every page
                thumbnail, problem = widgets.thumbnail_file(run, stimulus)
                if problem is not None:
                    st.text(widgets.unreadable_thumbnail_note(problem))
                elif thumbnail is not None:
                    st.image(str(thumbnail), width="stretch")
                else:
                    st.text("(no thumbnail in this run)")
                if run.has_captions:
                    st.text("Its captions:")
                    widgets.show_captions(captions[stimulus])
                else:
                    st.text("(no caption text in this run: its language side came from "
                            "features; matches are named by stimulus id)")
            with right:
                st.text(
                    f"True caption: rank {rank} of {n_gallery} held-out captions (fold {fold}; "
                    "the space was fitted without them). First caption of each stimulus shown."
                )
                top = result.top_matches(stimulus, k, ids=ids, labels=first_captions)
                if not run.has_captions:
                    top = top.drop(columns="label")
                column = SCORE_COLUMN[similarity]
                st.dataframe(
                    top.rename(columns={"label": "caption", "score": column}).assign(
                        true_match=lambda frame: np.where(frame["true_match"], "✓", "")
                    ),
                    hide_index=True,
                    width="stretch",
                    # every row in view: the true caption's row, added below the top k when it
                    # ranks lower, was hidden under the grid's default height (35 px a row)
                    height=35 * (len(top) + 1) + 3,
                    # the true-caption mark up front and narrow number columns; the caption last,
                    # so that a narrow window hides the end of a caption, never the mark
                    column_order=("rank", "true_match", "id", column, "caption"),
                    column_config={
                        "rank": st.column_config.NumberColumn("rank", width=45),
                        "id": st.column_config.TextColumn("id", width=70),
                        column: st.column_config.NumberColumn(
                            SCORE_HEADER[similarity], width=70, format="%.4f", help=column
                        ),
                        "true_match": st.column_config.TextColumn(
                            "true", width=45, help="✓: the image's own (held-out) caption"
                        ),
                    },
                )
