"""Stimuli: ranked gallery (lowest vs highest dispersion, or highest vs lowest per-stimulus
alignment), caption filter, a stimulus in detail, and per-stimulus alignment against dispersion.

Above the tabs only the score (every tab ranks by it); the gallery's order, caption filter,
selection switch and page number are a row inside the gallery tab, the only tab they act on.
Three tabs, and only the open one is built: the gallery first; the detail (ranks, residuals,
nearest neighbours in every model) when the user opens it or presses Inspect under an image; the
scatter of per-stimulus alignment (k-NN overlap, local CKA) against dispersion when opened. Above
``data.PER_STIMULUS_LIVE_STIMULI`` stimuli per-stimulus alignment is computed when asked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from convergence_core.analyses import pair_modalities
from convergence_core.dashboard import (
    catalogue,
    controls,
    data,
    gallery,
    lab,
    page,
    plots,
    state,
    widgets,
)
from convergence_core.dispersion import SCORE_ENTRIES
from convergence_core.stimulus_alignment import local_cka_base_size

PER_SIDE = 6  # stimuli per side and page
GALLERY_COLUMNS = 3
NEIGHBOUR_THUMBNAILS = 5  # per model; the table lists all requested neighbours
PICKER_CAPTION_CHARS = 60  # of the first caption beside each id in the detail's select box
#: Gallery orders: the dispersion score, or a per-stimulus alignment score of one pair
ORDERS = {
    "dispersion": "dispersion",
    "knn_overlap": "k-NN overlap",
    "local_cka": "local CKA",
}
#: The headings of the gallery's two sides by order: short enough for one line each at a
#: 1024-pixel window (~260 px a side), so both sides start level; the text above says more
SIDES = {
    "dispersion": ("Lowest dispersion", "Highest dispersion"),
    "knn_overlap": ("Most k-NN overlap", "Least k-NN overlap"),
    "local_cka": ("Highest local CKA", "Lowest local CKA"),
}
ALIGNMENT_TAB = "Alignment vs dispersion"
PAIR_KEY = "w_stimulus_pair"
#: Session keys of the gallery's order, caption filter and selection switch (controls.row)
ORDER_KEY = "w_gallery_order"
FILTER_KEY = "w_caption_filter"
ONLY_SELECTION_KEY = "w_only_selection"

context = page.open_page("pages/1_Stimuli.py")
run, view = context.run, context.view
found = data.catalogue(run)
ids = found.ids
n = run.n_stimuli
path, stamp = str(run.path), data.manifest_stamp(run.path)

# rows drawn by the browser as one element each (controls.py: a first visit ~0.18 s faster than
# Streamlit's radios, text box and toggle); the choices stay while the user visits other pages.
# Above the tabs only what every tab uses (the score); the gallery's order, filter, selection
# switch and page are a row inside the gallery tab, where they act.
selection = state.get_selection(st.session_state, run.name)
score = controls.bound_value(st.session_state, view, "score")
order_by = state.kept_value(st.session_state, ORDER_KEY, "dispersion")
query = state.kept_value(st.session_state, FILTER_KEY, "")
only_selection = state.kept_value(st.session_state, ONLY_SELECTION_KEY, False)
controls.row(
    [
        controls.choice(
            "score", "Rank by", state.SCORES, score, key=state.WIDGET_PREFIX + "score",
            view="score", labels=plots.SCORE_NAME.get,
            help="The dispersion scores: "
            + "; ".join(f"{e.label}, the {e.description}" for e in SCORE_ENTRIES.values())
            + f" (the GPA models: {run.gpa_modality}). Orders the gallery, the detail's list of "
            "stimuli and the alignment scatter.",
        ),
    ],
    key="stimuli-controls",
)

try:
    best_layers = (
        data.best_language_layers(path, stamp) if data.chooses_language_layers(run) else {}
    )
except ValueError as exc:
    st.warning(widgets.escape_markdown(  # the error names a language model as written
        f"Best language layers unavailable ({exc}); using each language model's default layer."
    ))
    best_layers = {}
# the other side: language models at their best layer, then other modalities outside GPA (brain
# recordings) at their default layer
others = run.other_partner_models
pairs = lab.cross_pairs(  # a language model in GPA is not paired with itself
    zip(run.gpa.models, run.gpa.layers, strict=True),
    [(partner, best_layers.get(partner, run.default_layer(partner)))
     for partner in run.partner_models],
)
k = state.sets_k(view, n)  # the k chosen in the lab, lowered below its set size as there


def _pair_choice() -> lab.Pair:
    """The vision × language pair of the per-stimulus scores (kept across tabs, by its models:
    a pair that is gone is forgotten, never replaced by the pair now at its place)."""
    choices = {(pair.vision_model, pair.language_model): pair for pair in pairs}
    state.drop_stale_choice(st.session_state, PAIR_KEY, list(choices))  # and its copy
    chosen = state.kept_widget(
        st.session_state,
        PAIR_KEY,
        lambda key: st.selectbox(
            "Vision × language pair (vision at its GPA layer, language at its best layer)"
            if not others and run.gpa_modality == "vision"
            else "GPA model × partner pair (GPA models at their GPA layer, language models at "
            "their best layer, other models at their default layer)",
            list(choices),
            key=key,
            format_func=lambda models: lab.pair_text(choices[models]),
        ),
    )
    return choices[chosen]


def _per_stimulus_ready(pair: lab.Pair, key: str) -> bool:
    """Whether per-stimulus alignment of ``pair`` is there to show: computed at once on runs up
    to ``data.PER_STIMULUS_LIVE_STIMULI`` stimuli, else when the user presses the button."""
    if data.per_stimulus_ready(path, stamp, n, [pair], k):
        return True
    st.info(
        f"Per-stimulus alignment of {n:,} stimuli (local CKA costs O(n·d²) per pair) is "
        "computed when you ask, once for every user of this server."
    )
    if not st.button("Compute per-stimulus alignment", key=key):
        return False
    bar = widgets.ProgressBar("Per-stimulus alignment…")
    data.per_stimulus_table(path, stamp, [pair], k, progress=bar)
    bar.empty()
    return True


#: Why per-stimulus alignment cannot be computed on this run (None: it can)
if not pairs:
    unaligned = (
        f"Run {context.quoted_name} has no language model (nor another modality outside GPA): "
        "per-stimulus alignment needs one."
    )
elif n < data.PER_STIMULUS_MIN_STIMULI:
    unaligned = (
        f"Run {context.quoted_name} has {n} stimuli: per-stimulus alignment needs at least "
        f"{data.PER_STIMULUS_MIN_STIMULI} (local CKA measures each stimulus against a base of at "
        "least 4 others)."
    )
else:
    unaligned = None
aligned = order_by != "dispersion"

rank, values, ascending = found.rank[score], found.values[score], found.order[score]
gallery_tab, detail_tab, alignment_tab = st.tabs(
    ["Gallery", widgets.DETAIL_TAB, ALIGNMENT_TAB], key=widgets.STIMULI_TAB_KEY,
    on_change="rerun",
)


def _label(row: int) -> str:
    return (
        f"#{int(rank[row]) + 1} of {n} · id {ids[row]}\n{plots.SCORE_NAME[score]} {values[row]:.4f}"
    )


def alignment_text(metric: str, value: float, k: int, decimals: int) -> str:
    """A per-stimulus alignment score as a card shows it: k-NN overlap as the count of shared
    neighbours ("8 of 10": the score is that share of k), local CKA (a change of CKA, often
    about 0.001) signed with ``decimals`` decimals (:func:`cka_decimals`)."""
    if metric == "knn_overlap":
        return f"{int(round(value * k))} of {k}"
    return f"{value:+.{decimals}f}"


def cka_decimals(values: np.ndarray) -> int:
    """Decimals that show about three significant digits of the largest local CKA change of a
    ranking (one precision for all its cards; 0.0025 → 5), from 4 to 8."""
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if finite.size else 0.0
    if largest <= 0:
        return 4
    return int(min(8, max(4, 2 - np.floor(np.log10(largest)))))


def _aligned_label(ranking: data.Ranking, row: int, decimals: int) -> str:
    """The card of a stimulus in the gallery ordered by alignment (rank 1 = highest)."""
    return (
        f"#{n - int(ranking.rank[row])} of {n} · id {ids[row]}\n{ORDERS[order_by]} "
        f"{alignment_text(order_by, ranking.values[row], k, decimals)} · "
        f"{plots.SCORE_NAME[score]} {values[row]:.4f}"
    )


def _gallery() -> None:
    """The gallery tab: its row of controls (order, caption filter, selection switch, page),
    then the page's cards from both ends of the ranking, side by side."""
    keep = found.matching(query)
    if only_selection and selection is not None:
        chosen = np.zeros(n, dtype=bool)
        chosen[found.rows_of(selection.ids)[0]] = True
        keep &= chosen
    n_kept = int(keep.sum())
    n_pages = catalogue.gallery_page_count(n_kept, PER_SIDE)
    page_number = controls.bound_value(
        st.session_state, view, "page", lambda value: min(max(1, int(value)), n_pages)
    )
    controls.row(
        [
            controls.choice(
                "order", "Gallery order", list(ORDERS), order_by, key=ORDER_KEY,
                labels=ORDERS.get,
                help="dispersion (Rank by above), or per-stimulus alignment of one GPA model × "
                "partner pair (a vision × language pair in most runs): k-NN overlap (share of a "
                "stimulus's k nearest stimuli both models agree on) or local CKA (how much the "
                "stimulus raises the CKA of a seeded base of "
                f"{local_cka_base_size(n)} pairs).",
            ),
            controls.text(
                "filter", "Filter by caption text" if run.has_captions else "Filter by id",
                query, key=FILTER_KEY, width=1.6,
                placeholder="e.g. dog, kitchen, surf…" if run.has_captions else "part of an id",
                help="Case-insensitive; matches any caption or the id.",
            ),
            controls.switch(
                "only_selection", "Selection only", only_selection, key=ONLY_SELECTION_KEY,
                disabled=selection is None, width=1.4,
                help="Only the stimuli of the current selection. Make a selection on the "
                "Residual space page (box/lasso) or import one there.",
            ),
            controls.number(
                "page", "Page", page_number, 1, n_pages, key=state.WIDGET_PREFIX + "page",
                view="page",
                help="Each page shows the next stimuli from both ends of the ranking.",
            ),
        ],
        key="stimuli-gallery-controls",
    )
    if aligned:
        if unaligned is not None:
            st.error(f"{unaligned} Order the gallery by dispersion.")
            return
        pair = _pair_choice()
        st.caption(
            f"Gallery ordered by {ORDERS[order_by]} of {widgets.escape_markdown(pair.label)}, "
            "highest alignment on the left"
            # the lab lowers k further for a smaller focus set, which this page does not know of
            + (f" (k = {k}, chosen in the Alignment lab"
               + (" and lowered below its set size)" if k < view.k else ")")
               if order_by == "knn_overlap" else "")
            + "; each card also shows its dispersion."
        )
        if not _per_stimulus_ready(pair, "w_gallery_compute"):
            return
        ranking = data.alignment_ranking(path, stamp, pair, order_by, k)
        decimals = cka_decimals(ranking.values)
        order, label = ranking.order[::-1], (lambda r: _aligned_label(ranking, r, decimals))
        agree = " and ".join(pair_modalities(run, [pair]))
        sides = SIDES[order_by]
        about = f"Left: {agree} agree most on these stimuli; right: least."
    else:
        order, label = ascending, _label
        sides = SIDES["dispersion"]
        about = (f"Left: the {run.gpa_modality} models (GPA) agree most on these stimuli; "
                 "right: least.")
    ranked = order[keep[order]]
    # the headings stay short (SIDES); what each side means is said here, as plain text (model
    # and modality names too)
    st.text(
        f"{n_kept} of {n} stimuli shown, {PER_SIDE} per side and page, {n_pages} "
        f"page{'s' if n_pages > 1 else ''}. {about}"
    )
    if n_kept == 0:
        st.info("No stimulus matches the filter; clear the caption filter to see all.")
        return
    low_rows, high_rows = catalogue.gallery_page(ranked, page_number, PER_SIDE)
    for side, heading, rows, key in zip(
        st.columns(2, gap="medium"), sides, (low_rows, high_rows), ("low", "high"), strict=True
    ):
        with side:
            st.subheader(heading)
            gallery.show(run, rows, [label(r) for r in rows], key=key, columns=GALLERY_COLUMNS)


def _picker_label(identifier: str) -> str:
    """A stimulus as the detail's select box lists it: its id and the start of its first caption
    ("281789 — two zebras grazing in a field…"). A select box shows its options as plain text
    (no Markdown), so a caption needs no escaping; line breaks are folded into spaces."""
    shown = widgets.excerpt(identifier)
    caption = " ".join(str(found.first_captions[found.position[identifier]]).split())
    if not caption:
        return shown
    if len(caption) > PICKER_CAPTION_CHARS:
        caption = caption[: PICKER_CAPTION_CHARS - 1].rstrip() + "…"
    return f"{shown} — {caption}"


with gallery_tab:
    if gallery_tab.open:
        _gallery()

with detail_tab:
    if detail_tab.open:
        under = "an image" if run.images_root is not None else "a stimulus"
        remembered = st.session_state.get(widgets.INSPECTED)
        if widgets.INSPECT_KEY not in st.session_state and remembered in found.position:
            st.session_state[widgets.INSPECT_KEY] = remembered
        if n <= widgets.SELECT_ALL_LIMIT:
            inspect_options = [str(ids[r]) for r in ascending]
            state.drop_stale_choice(st.session_state, widgets.INSPECT_KEY, inspect_options)
            detail_id = st.selectbox(
                f"Stimulus (by {plots.SCORE_NAME[score]}, lowest first; or press Inspect under "
                f"{under} in the gallery)",
                inspect_options,
                key=widgets.INSPECT_KEY,
                format_func=_picker_label,
            )
        else:
            if widgets.INSPECT_KEY not in st.session_state:
                st.session_state[widgets.INSPECT_KEY] = str(ids[ascending[0]])
            typed = st.text_input(
                f"Stimulus id (one of {n:,}; or press Inspect under {under} in the gallery)",
                key=widgets.INSPECT_KEY,
            ).strip()
            detail_id = typed if typed in found.position else str(ids[ascending[0]])
            if typed not in found.position:
                st.error(
                    f"No stimulus with id '{state.shown(typed)}' in this run: type an id exactly "
                    "as the gallery shows it. Showing the lowest-dispersion stimulus."
                )
        st.session_state[widgets.INSPECTED] = detail_id
        row = int(found.position[detail_id])
        captions = list(run.stimuli["captions"].iloc[row]) if "captions" in run.stimuli else []

        picture, facts = st.columns([1, 2])
        with picture:
            widgets.thumbnail(run, row)
            st.text(f"id {widgets.excerpt(detail_id)}")
            if run.has_captions:
                widgets.show_captions(captions, key="detail", title=f"Stimulus {detail_id}")
        with facts:
            widgets.number_cards(
                [
                    widgets.Card(
                        f"Rank by {entry.label}",
                        f"{int(found.rank[entry.name][row]) + 1} / {n}",
                        help=f"1 = lowest dispersion (the lowest {entry.description}: most "
                        "agreement among the GPA models)",
                    )
                    for entry in SCORE_ENTRIES.values()
                ],
                key="stimulus-ranks",
            )
            intervals = data.gpa_rank_intervals(path, stamp)
            if intervals is not None:
                low, high = int(intervals[0][row]) + 1, int(intervals[1][row]) + 1
                widgets.number_cards(
                    [
                        widgets.Card(
                            "Mean-residual rank over GPA's random starts",
                            f"{low} – {high}" if high > low else f"{low} (every start)",
                            help="Lowest and highest rank of this stimulus's mean residual over "
                            "the GPA solutions of the run's stability diagnostic (GPA from "
                            "random starts): how firmly GPA pins its place in the ranking.",
                        )
                    ],
                    key="stimulus-gpa",
                )
            st.image(data.residual_bars_png(path, stamp, row))

        st.subheader("Nearest neighbours")
        st.caption(
            "Most similar stimuli under each model: largest inner product of the prepared "
            "features (the run's exact neighbour lists). "
            + f"{widgets.escape_markdown(run.gpa_modality.capitalize())} models (GPA) at their "
            "GPA layer"
            + (", language models at their best layer" if best_layers else "")
            + (", other models at their default layer." if others or not best_layers else ".")
        )
        if n - 1 > 3:
            count = st.slider(
                "Neighbours per model", 3, min(20, n - 1), min(5, n - 1), key="w_neighbour_count"
            )
        else:  # a slider needs two values to choose from
            count = n - 1
            st.text(f"All {count} other stimuli of this run of {n} are listed (choosing how many "
                    "neighbours to list needs a run of at least 5 stimuli).")
        model_layers = [*zip(run.gpa.models, run.gpa.layers, strict=True)] + [
            (model, best_layers.get(model, run.default_layer(model)))
            for model in run.partner_models
            if model not in run.gpa.models  # a language model in GPA: shown at its GPA layer
        ]
        neighbours = {
            model: (layer, *run.nearest(model, layer, row, count)) for model, layer in model_layers
        }
        overview = pd.DataFrame({"neighbour": np.arange(1, count + 1)})
        for model, (layer, neighbour_rows, similarity) in neighbours.items():
            overview[f"{model} ({layer})"] = [
                f"{widgets.excerpt(ids[r])} · {s:.3f}"
                for r, s in zip(neighbour_rows, similarity, strict=True)
            ]
        st.text(
            "Neighbour ids and similarities in every model (same id in several columns: the "
            "models agree):"
        )
        st.dataframe(overview, hide_index=True, width="stretch")

        state.drop_stale_choice(
            st.session_state, "w_neighbour_model", [model for model, _ in model_layers]
        )
        shown_model = state.kept_widget(
            st.session_state,
            "w_neighbour_model",
            lambda key: st.radio(
                "Neighbours in detail for",
                [model for model, _ in model_layers],
                key=key,
                horizontal=True,
                format_func=lambda m: widgets.escape_markdown(f"{m} ({run.modality(m)})"),
            ),
        )
        layer, neighbour_rows, similarity = neighbours[shown_model]
        thumbs = st.columns(NEIGHBOUR_THUMBNAILS)
        for cell, neighbour in zip(thumbs, neighbour_rows[:NEIGHBOUR_THUMBNAILS], strict=False):
            with cell:
                widgets.thumbnail(run, int(neighbour))
                st.text(widgets.excerpt(ids[neighbour]))
        detail = widgets.captions_frame(run, neighbour_rows)
        detail.insert(0, "neighbour", np.arange(1, len(neighbour_rows) + 1))
        detail.insert(2, "similarity", similarity)
        detail[f"rank ({plots.SCORE_NAME[score]})"] = rank[neighbour_rows] + 1
        st.dataframe(detail, hide_index=True, width="stretch")

with alignment_tab:
    if alignment_tab.open:
        if unaligned is not None:
            st.info(unaligned)
        else:
            shown_pair = _pair_choice()
            if _per_stimulus_ready(shown_pair, "w_alignment_compute"):
                marked = () if selection is None else tuple(
                    int(r) for r in found.rows_of(selection.ids)[0]
                )
                st.image(
                    data.alignment_scatter_png(
                        path, stamp, shown_pair, k, score, marked, "current selection"
                    )
                )
                st.text(
                    "Each point is a stimulus: its dispersion (x) against how much its "
                    f"{' and '.join(pair_modalities(run, [shown_pair]))} neighbourhoods agree "
                    "(y). k-NN overlap: the share of its k nearest "
                    f"stimuli (k = {k}) both models agree on; local CKA (paper 003): how much it "
                    f"raises the CKA of a seeded base of {local_cka_base_size(n)} pairs. A "
                    "negative Spearman ρ: stimuli the GPA models agree on carry more "
                    "cross-modal alignment. The current selection is circled."
                )
                relation = data.alignment_relation(path, stamp, (shown_pair,), k, score)
                st.markdown(widgets.markdown_table(
                    relation[["metric", "dispersion_score", "spearman_rho",
                              "permutation_p_value_two_sided", "n_permutations", "n_stimuli"]]
                    .round(4)
                ))

page.close_page(context)
