"""Stimuli page (pages/1_Stimuli.py) with AppTest against runs built in the test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from convergence_core import settings
from convergence_core.dashboard import gallery, widgets
from tests.page_reading import cards, change_control, controls_shown, gallery_cards, gallery_texts

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60
PAGE = "pages/1_Stimuli.py"
PER_SIDE = 6  # stimuli per side and gallery page, as on the page
EVIL = "<script>alert(1)</script> **bold** [link](http://example.com) :red[x]"
LABEL = re.compile(r"^#(\d+) of (\d+) · id (\S+)\n")


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run "demo" of 40 coco-mini stimuli whose first caption of stimulus 3 is hostile."""
    from convergence_core.datasets import load_coco
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import synthetic_embeddings

    n = 40
    cache = tmp_path_factory.mktemp("cache")
    dataset = load_coco(settings.demo_data_root())
    stimuli = dataset.stimuli.iloc[:n].reset_index(drop=True).copy()
    captions = [list(c) for c in stimuli["captions"]]
    captions[3] = [EVIL, *captions[3][1:]]
    stimuli["captions"] = captions
    embeddings, _ = synthetic_embeddings(n)
    write_run_from_embeddings(
        cache / "runs" / "demo",
        stimuli,
        embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"],
        default_layers={"vision-a": "stage2", "vision-b": "stage2", "vision-c": "stage2"},
        images_root=dataset.root,
        thumbnails=True,
        dataset_name="hostile captions",
    )
    return cache


def _page(query: dict[str, str] | None = None, *, detail: bool = False) -> AppTest:
    """The Stimuli page in a fresh session opened with the URL query ``query`` (``detail``: on
    the "Stimulus in detail" tab; else on the gallery)."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.run(timeout=TIMEOUT)  # the session starts on Home (AppTest needs a first run to switch)
    if detail:
        at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def _gallery_ids(at: AppTest) -> list[str]:
    return [LABEL.match(text).group(3) for text in gallery_texts(at) if LABEL.match(text)]


def _press_inspect(at: AppTest, side: str, identifier: str) -> None:
    """Press Inspect on the card of ``identifier`` in the gallery's ``side`` ("low", "high") and
    rerun: what the component's callback does (``gallery.inspect_trigger`` reading the pressed id
    from the component's state). AppTest cannot click inside a component; the browser test
    (tests/test_end_to_end.py) presses the real button."""
    import streamlit as st

    key = f"{gallery.KEY_PREFIX}{side}"
    assert identifier in [card["id"] for card in gallery_cards(at, side)]

    class Pressed:  # the session state as the callback sees it, the component's trigger set
        def get(self, name, default=None):  # noqa: ANN001, ANN202
            if name == key:
                return {"inspect": identifier}
            return at.session_state[name] if name in at.session_state else default

        def __setitem__(self, name, value) -> None:  # noqa: ANN001
            at.session_state[name] = value

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(st, "session_state", Pressed())
        gallery.inspect_trigger(key)
    at.run(timeout=TIMEOUT)


def _shown(at: AppTest, name: str):
    """The value the control ``name`` shows (``controls.row``)."""
    return controls_shown(at)[name]["value"]


def _expected(run, score: str, rows_per_side: int, page: int) -> tuple[list[str], list[str]]:
    """Page ``page``'s ids: the low side from the lowest inward over the lower half (the middle
    stimulus of an odd count included), the high side from the highest inward over the rest."""
    order = np.argsort(run.dispersion[f"rank_{score}"].to_numpy(), kind="stable")
    ids = list(run.stimuli["id"].to_numpy()[order])
    low_half, high_half = ids[: (len(ids) + 1) // 2], ids[(len(ids) + 1) // 2 :][::-1]
    start = (page - 1) * rows_per_side
    return low_half[start : start + rows_per_side], high_half[start : start + rows_per_side]


def test_gallery_ranks_lowest_and_highest_side_by_side(run) -> None:
    at = _page()
    low, high = _expected(run, "mean", PER_SIDE, 1)
    assert _gallery_ids(at) == low + high
    shown = gallery_cards(at)  # every card carries its thumbnail, sent as a JPEG data URI
    assert len(shown) == 2 * PER_SIDE
    assert all(card["image"].startswith("data:image/jpeg;base64,/9j/") for card in shown)
    assert all(card["captions"] == [] for card in shown)  # no caption is cut: nothing to open


def test_paging_and_score_change_the_shown_ids(run) -> None:
    at = _page()
    first = _gallery_ids(at)
    change_control(at, "page", 2)
    second = _gallery_ids(at)
    assert second == sum(_expected(run, "mean", PER_SIDE, 2), [])
    assert not set(second[:PER_SIDE]) & set(first[:PER_SIDE])
    assert at.query_params["page"] == "2"

    change_control(at, "score", "pc1")
    assert _gallery_ids(at) == sum(_expected(run, "pc1", PER_SIDE, 2), [])
    assert at.query_params["score"] == "pc1"


def test_the_pages_show_every_stimulus_once_under_its_own_end(run) -> None:
    """The sides meet in the middle: the pages had been counted for one side only, so the second
    half of them showed the first half's stimuli again, the highest under "Lowest dispersion"."""
    at = _page()
    assert "4 pages" in " ".join(t.value for t in at.text)  # 40 stimuli, 12 per page
    shown_low, shown_high = [], []
    for number in range(1, 5):
        change_control(at, "page", number)
        ids = _gallery_ids(at)
        low, high = _expected(run, "mean", PER_SIDE, number)
        assert ids == low + high
        shown_low += low
        shown_high += high
    assert len(shown_low) == len(shown_high) == 20  # the last page: 2 per side
    assert sorted(shown_low + shown_high) == sorted(run.stimuli["id"])
    rank = dict(zip(run.stimuli["id"], run.dispersion["rank_mean"], strict=True))
    assert max(rank[i] for i in shown_low) < min(rank[i] for i in shown_high)


def test_query_params_start_the_widgets(run) -> None:
    at = _page({"score": "pc1", "page": "3"})
    assert _shown(at, "score") == "pc1"
    assert _shown(at, "page") == 3
    assert _gallery_ids(at) == sum(_expected(run, "pc1", PER_SIDE, 3), [])


def test_page_beyond_the_last_is_clamped_and_bad_page_warns(run) -> None:
    at = _page({"page": "99"})
    assert _shown(at, "page") == 4  # 40 stimuli, 6 from each end per page
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.query_params["page"] = "first"
    at.run(timeout=TIMEOUT)  # the session's first page reads the URL and warns
    assert any("page='first' is not a whole number" in w.value for w in at.warning)
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert _shown(at, "page") == 1


def test_caption_filter_keeps_only_matching_stimuli(run) -> None:
    at = _page()
    word = "dog"
    matching = {
        i
        for i, caps in zip(run.stimuli["id"], run.stimuli["captions"], strict=True)
        if any(word in c.lower() for c in caps)
    }
    assert 0 < len(matching) <= 2 * PER_SIDE, (
        "pick a filter word that matches a handful of the 40 stimuli"
    )
    change_control(at, "filter", "DOG")
    shown = _gallery_ids(at)
    assert set(shown) == matching
    assert any(t.value.startswith(f"{len(matching)} of 40 stimuli shown") for t in at.text)

    change_control(at, "filter", "zzzz-no-such-caption")
    assert _gallery_ids(at) == []
    assert any("No stimulus matches" in i.value for i in at.info)


def test_hostile_caption_is_shown_verbatim_as_plain_text(run) -> None:
    at = _page(detail=True)
    target = str(run.stimuli["id"].iloc[3])
    at.selectbox(key="w_inspect").set_value(target).run(timeout=TIMEOUT)
    texts = [t.value for t in at.text]
    assert f"• {EVIL}" in texts
    rendered_as_markdown = [
        e
        for e in [
            *at.markdown,
            *at.caption,
            *at.info,
            *at.warning,
            *at.error,
            *at.subheader,
            *at.header,
        ]
        if "alert(1)" in e.value
    ]
    assert rendered_as_markdown == []
    assert not at.html


def test_inspect_button_shows_ranks_residuals_and_neighbours(run) -> None:
    at = _page()
    high_ids = _gallery_ids(at)[PER_SIDE:]
    target = high_ids[0]  # the highest-dispersion stimulus
    row = int(np.flatnonzero(run.stimuli["id"].to_numpy() == target)[0])
    _press_inspect(at, "high", target)
    # Inspect opens the detail tab (only the open tab is built) on that stimulus
    assert at.session_state[widgets.STIMULI_TAB_KEY] == widgets.DETAIL_TAB
    assert not gallery_cards(at)
    assert at.selectbox(key="w_inspect").value == target
    assert "press Inspect under an image in the gallery" in at.selectbox(key="w_inspect").label
    assert (
        "Vision models (GPA) at their GPA layer, language models at their best layer."
        in " ".join(c.value for c in at.caption)
    )
    metrics = cards(at)
    n = run.n_stimuli
    assert metrics["Rank by mean residual"] == f"{n} / {n}"
    assert metrics["Rank by PC1 score"] == f"{int(run.dispersion['rank_pc1'].iloc[row]) + 1} / {n}"
    # the rank interval over GPA's random starts, from the run's stored diagnostic
    stability = run.gpa_stability
    low = int(stability.per_stimulus("rank_low")[row]) + 1
    high = int(stability.per_stimulus("rank_high")[row]) + 1
    shown = metrics["Mean-residual rank over GPA's random starts"]
    assert shown == (f"{low} – {high}" if high > low else f"{low} (every start)")
    # the stimulus's thumbnail, its residual bars (a picture) and 5 neighbour thumbnails
    assert len(at.image) == 7 and not at.get("plotly_chart")

    # nearest neighbours: independent brute force over each model's prepared features
    def brute(model: str, layer: str) -> tuple[list[str], np.ndarray]:
        from convergence_core.alignment import prepare_features

        features = prepare_features(np.asarray(run.embeddings[model][layer], dtype=np.float64))
        gram = features @ features.T
        order = sorted((j for j in range(n) if j != row), key=lambda j: (-gram[row, j], j))[:5]
        return list(run.stimuli["id"].iloc[order]), gram[row, order]

    overview, detail = at.dataframe[-2].value, at.dataframe[-1].value
    assert len(overview.columns) == 1 + len(run.models)  # every vision and language model
    model, layer = run.gpa.models[0], run.gpa.layers[0]
    expected_ids, expected_similarity = brute(model, layer)
    assert list(detail["id"]) == expected_ids
    np.testing.assert_allclose(detail["similarity"], expected_similarity)
    assert [cell.split(" · ")[0] for cell in overview[f"{model} ({layer})"]] == expected_ids

    language = run.language_models[1]
    at.radio(key="w_neighbour_model").set_value(language).run(timeout=TIMEOUT)
    language_column = next(c for c in at.dataframe[-2].value.columns if c.startswith(language))
    language_layer = language_column[len(language) + 2 : -1]
    from convergence_core.analyses import best_language_layers

    best = best_language_layers(run, k=10)
    assert (
        language_layer
        == dict(zip(best["language_model"], best["language_layer"], strict=True))[language]
    )
    assert list(at.dataframe[-1].value["id"]) == brute(language, language_layer)[0]


def test_neighbour_count_slider_changes_the_tables(run) -> None:
    at = _page(detail=True)
    at.slider(key="w_neighbour_count").set_value(9).run(timeout=TIMEOUT)
    assert len(at.dataframe[-2].value) == 9 and len(at.dataframe[-1].value) == 9


def test_only_selection_toggle_restricts_the_gallery(run) -> None:
    from convergence_core.dashboard import state

    at = _page()
    chosen = list(run.stimuli["id"].iloc[[1, 5, 7]])
    assert controls_shown(at)["only_selection"]["disabled"]  # nothing selected yet
    state.set_selection(at.session_state, "demo", chosen, origin="test")
    at.run(timeout=TIMEOUT)
    change_control(at, "only_selection", True)
    shown = _gallery_ids(at)
    assert set(shown) == set(chosen)
    # with a caption filter too: the filter's rows and the selection's (the filter's array was
    # read-only, and narrowing it to the selection raised on the page)
    word = next(w for w in run.stimuli["captions"].iloc[1][0].lower().split() if len(w) > 3)
    change_control(at, "filter", word)
    assert not at.exception, at.exception
    matching = {i for i, caps in zip(run.stimuli["id"], run.stimuli["captions"], strict=True)
                if any(word in c.lower() for c in caps)}
    assert set(_gallery_ids(at)) == set(chosen) & matching and run.stimuli["id"].iloc[1] in matching


def test_detail_tab_remembers_the_stimulus_and_the_gallery_is_built_only_when_open(run) -> None:
    at = _page(detail=True)
    assert not gallery_cards(at)  # the gallery tab is not built
    target = str(run.stimuli["id"].iloc[7])
    at.selectbox(key="w_inspect").set_value(target).run(timeout=TIMEOUT)
    at.session_state[widgets.STIMULI_TAB_KEY] = "Gallery"
    at.run(timeout=TIMEOUT)
    assert _gallery_ids(at) and "w_inspect" not in at.session_state  # detail not built
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.run(timeout=TIMEOUT)
    assert at.selectbox(key="w_inspect").value == target


def _rows_of_controls(at: AppTest) -> dict[str, list[str]]:
    """Row key → the names of its controls, of every ``controls.row`` on the page."""
    import json

    from convergence_core.dashboard import controls

    rows = {}
    for element in at.get("bidi_component"):
        if element.proto.component_name == controls.COMPONENT:
            data = json.loads(element.proto.json)
            rows[data["row"]] = [field["name"] for field in data["fields"]]
    return rows


def test_the_gallerys_controls_are_in_the_gallery_tab_and_the_detail_does_not_filter(run) -> None:
    """The order, caption filter and selection switch act on the gallery only: they are a row in
    the gallery tab (with its page number), and only the score, which every tab uses, is above
    the tabs. With the filter "dog" set, the detail tab shows no filter and lists every stimulus
    (it had shown the filter above it while listing zebras)."""
    from convergence_core.dashboard import controls

    at = _page()
    assert _rows_of_controls(at) == {
        "stimuli-controls": ["score"],
        "stimuli-gallery-controls": ["order", "filter", "only_selection", "page"],
    }
    gallery_tab = at.tabs[0]
    assert gallery_tab.label == "Gallery"
    inside = [e.proto.component_name for e in gallery_tab.get("bidi_component")]
    assert inside.count(controls.COMPONENT) == 1  # the gallery's row, not the score's
    assert inside.count(gallery.COMPONENT) == 2  # and the two sides' cards
    assert [h.value for h in at.subheader] == ["Lowest dispersion", "Highest dispersion"]
    assert any("Left: the vision models (GPA) agree most on these stimuli; right: least."
               in t.value for t in at.text)

    change_control(at, "filter", "dog")
    assert 0 < len(_gallery_ids(at)) < run.n_stimuli
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert _rows_of_controls(at) == {"stimuli-controls": ["score"]}
    assert len(at.selectbox(key="w_inspect").options) == run.n_stimuli
    at.session_state[widgets.STIMULI_TAB_KEY] = "Gallery"
    at.run(timeout=TIMEOUT)
    assert controls_shown(at)["filter"]["value"] == "dog"  # kept while the detail was open


def test_the_detail_lists_each_stimulus_by_id_and_first_caption(run) -> None:
    """The detail's select box lists "id — first caption" (cut at 60 characters, as plain text:
    a select box renders no Markdown), lowest dispersion first; its value stays the id."""
    from convergence_core.dashboard.catalogue import build_catalogue

    at = _page(detail=True)
    box = at.selectbox(key="w_inspect")
    found = build_catalogue(run)
    order = np.argsort(run.dispersion["rank_mean"].to_numpy(), kind="stable")
    expected = []
    for row in order:
        caption = " ".join(str(run.stimuli["captions"].iloc[row][0]).split())
        if len(caption) > 60:
            caption = caption[:59].rstrip() + "…"
        expected.append(f"{found.ids[row]} — {caption}")
    assert box.options == expected
    assert all(len(option.split(" — ", 1)[1]) <= 60 for option in box.options)
    hostile = next(o for o in box.options if o.startswith(f"{run.stimuli['id'].iloc[3]} — "))
    assert hostile.split(" — ", 1)[1] == EVIL[:59].rstrip() + "…"  # verbatim, cut
    target = str(run.stimuli["id"].iloc[3])
    box.set_value(target).run(timeout=TIMEOUT)
    assert at.selectbox(key="w_inspect").value == target
    assert any(t.value == f"id {target}" for t in at.text)


def test_large_runs_type_the_id_instead_of_listing_every_id(
    run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above SELECT_ALL_LIMIT stimuli no select box of every id is sent to the browser."""
    monkeypatch.setattr(widgets, "SELECT_ALL_LIMIT", 10)
    at = _page(detail=True)
    assert not at.selectbox
    box = at.text_input(key="w_inspect")
    order = np.argsort(run.dispersion["rank_mean"].to_numpy(), kind="stable")
    assert box.value == str(run.stimuli["id"].iloc[order[0]])  # the lowest-dispersion stimulus
    target = str(run.stimuli["id"].iloc[5])
    box.set_value(target).run(timeout=TIMEOUT)
    assert any(t.value == f"id {target}" for t in at.text)
    at.text_input(key="w_inspect").set_value("no such id").run(timeout=TIMEOUT)
    assert any("No stimulus with id 'no such id'" in e.value for e in at.error)
    assert not at.exception


# ---------------------------------------------------------------------------------------------
# per-stimulus alignment (issue 14, item 2)
ALIGNED_LABEL = re.compile(
    r"^#(\d+) of (\d+) · id (\S+)\n(k-NN overlap|local CKA) (\d+ of \d+|[-+]?[0-9.]+) · "
    r"mean residual"
)


def _score(shown: str) -> float:
    """A card's alignment score: "8 of 10" (k-NN overlap: neighbours shared of k) or a number."""
    if " of " in shown:
        shared, k = shown.split(" of ")
        return int(shared) / int(k)
    return float(shown)


def _dense_overlap(run, vision: str, vision_layer: str, language: str, layer: str, k: int):
    """Per-stimulus k-NN overlap from dense inner products of the prepared features."""
    from convergence_core.alignment import prepare_features

    tops = []
    for model, layer_name in ((vision, vision_layer), (language, layer)):
        X = prepare_features(np.asarray(run.embeddings[model][layer_name], dtype=np.float64))
        G = X @ X.T
        np.fill_diagonal(G, -np.inf)
        tops.append(np.argsort(-G, axis=1, kind="stable")[:, :k])
    return np.array([len(set(a) & set(b)) / k for a, b in zip(*tops, strict=True)])


def _aligned_cards(at) -> list[tuple[int, str, float]]:
    return [
        (int(m.group(1)), m.group(3), _score(m.group(5)))
        for m in (ALIGNED_LABEL.match(text) for text in gallery_texts(at))
        if m
    ]


def test_gallery_ranked_by_per_stimulus_knn_overlap(run) -> None:
    from convergence_core.analyses import best_language_layers

    at = _page({"k": "5"})
    change_control(at, "order", "knn_overlap")
    assert not at.exception, at.exception
    pair_box = at.selectbox(key="w_stimulus_pair")
    pair_box.set_value(("vision-a", "language-b")).run(timeout=TIMEOUT)
    best = dict(zip(*best_language_layers(run).iloc[:, :2].T.values, strict=True))
    expected = _dense_overlap(run, "vision-a", "stage2", "language-b", best["language-b"], 5)
    cards = _aligned_cards(at)
    assert len(cards) == 2 * PER_SIDE
    ids = list(run.stimuli["id"])
    for rank, identifier, value in cards:
        assert value == pytest.approx(expected[ids.index(identifier)], abs=1e-4)
    left, right = cards[:PER_SIDE], cards[PER_SIDE:]
    assert [r for r, _, _ in left] == list(range(1, PER_SIDE + 1))  # highest first
    assert min(v for _, _, v in left) >= max(v for _, _, v in right)
    assert left[0][2] == pytest.approx(expected.max()) and right[0][2] == pytest.approx(
        expected.min()
    )
    # short headings (one line a side); what the sides mean in the text above them
    assert [h.value for h in at.subheader] == ["Most k-NN overlap", "Least k-NN overlap"]
    assert any("Left: vision and language agree most on these stimuli; right: least." in t.value
               for t in at.text)
    # each card says how many of its k = 5 neighbours the two models share ("0.8000" was a
    # fraction of k printed to four decimals)
    texts = gallery_texts(at)
    assert all(re.search(r"\nk-NN overlap [0-5] of 5 · mean residual 0\.\d{4}\n", t)
               for t in texts), texts


def test_the_gallery_uses_the_k_the_lab_uses(run) -> None:
    """k = 200 in the URL on a run of 40: the lab measures its sets of 10 at k = 9, and the
    gallery ordered by k-NN overlap says and uses that k, not 200 (clamped to 39)."""
    from convergence_core.analyses import best_language_layers

    at = _page({"k": "200"})
    change_control(at, "order", "knn_overlap")
    assert not at.exception, at.exception
    assert any("(k = 9, chosen in the Alignment lab and lowered below its set size)"
               in caption.value for caption in at.caption), [
        caption.value for caption in at.caption
    ]
    best = dict(zip(*best_language_layers(run).iloc[:, :2].T.values, strict=True))
    expected = _dense_overlap(run, "vision-a", "stage2", "language-a", best["language-a"], 9)
    assert _aligned_cards(at)[0][2] == pytest.approx(expected.max(), abs=1e-4)
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert controls_shown(at)["k"]["value"] == 9


def test_the_gallery_does_not_claim_the_k_of_a_lab_with_a_small_focus_set(run) -> None:
    """Five pasted ids in the lab: it measures every set at k = 4, and the gallery said it used
    "k = 10, the lab's k on its low and high sets"; it now says only what is true."""
    at = _page({"size": "20"})
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    change_control(at, "source", "pasted")
    at.text_area(key="w_pasted_ids").input("\n".join(run.stimuli["id"][:5])).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert controls_shown(at)["k"]["value"] == 4
    at.session_state["w_gallery_order"] = "knn_overlap"
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    captions = [caption.value for caption in at.caption if "Gallery ordered by" in caption.value]
    assert len(captions) == 1 and "(k = 10, chosen in the Alignment lab)" in captions[0]
    assert "the lab's k" not in captions[0]


def test_pairs_whose_labels_coincide_are_two_choices(tmp_path, monkeypatch) -> None:
    """Models named with " × ": "x × y" with "z" and "x" with "y × z" are both labelled
    "x × y × z"; choices keyed by the label (and shown by it) kept one of the two pairs (on
    both pages)."""
    import pandas as pd

    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import synthetic_embeddings

    vision, language = ["x", "x × y"], ["z", "y × z"]
    embeddings, _ = synthetic_embeddings(30, vision_models=vision, language_models=language)
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(30)],
                            "image": [f"{i}.jpg" for i in range(30)],
                            "captions": [[f"c{i}"] for i in range(30)]})
    write_run_from_embeddings(tmp_path / "runs" / "demo", stimuli, embeddings,
                              vision_models=vision, language_models=language, thumbnails=False)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _page()
    change_control(at, "order", "knn_overlap")
    assert not at.exception, at.exception
    box = at.selectbox(key="w_stimulus_pair")
    assert len(box.options) == 4
    box.set_value(("x", "y × z")).run(timeout=TIMEOUT)
    box = at.selectbox(key="w_stimulus_pair")
    assert box.value == ("x", "y × z") and box.options[box.index].startswith("x × (y × z) (")
    at.session_state["w_lab_per_stimulus"] = True
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert len(at.selectbox(key="w_lab_pair").options) == 4


@pytest.mark.parametrize("n", [3, 4])
def test_a_run_of_three_or_four_stimuli_says_what_it_lacks(tmp_path, monkeypatch, n) -> None:
    """The detail lists every other stimulus (a slider of one value raised), and per-stimulus
    alignment (local CKA needs a base of 4 others) says it needs 5 stimuli, never a traceback."""
    from tests.fixtures_runs import make_synthetic_run

    make_synthetic_run(tmp_path / "runs", n=n, name="demo", images=False)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _page(detail=True)
    assert f"All {n - 1} other stimuli" in " ".join(t.value for t in at.text)
    at.session_state[widgets.STIMULI_TAB_KEY] = "Alignment vs dispersion"
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert "needs at least 5" in " ".join(i.value for i in at.info)
    at.session_state[widgets.STIMULI_TAB_KEY] = "Gallery"
    at.run(timeout=TIMEOUT)  # the gallery's order is a control of the gallery tab
    change_control(at, "order", "local_cka")
    assert not at.exception, at.exception
    assert "needs at least 5" in " ".join(e.value for e in at.error)


def test_brain_recordings_have_per_stimulus_alignment_and_neighbours(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of vision models and a brain 'subject' (no language model): the gallery ranks by
    the k-NN overlap of vision × subject, and the detail lists the subject's neighbours."""
    from tests.fixtures_runs import make_brain_run

    brain = make_brain_run(tmp_path / "runs" / "demo", n=40, images=True)
    assert brain.partner_models == ["subj01"]
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _page({"k": "5"})
    change_control(at, "order", "knn_overlap")
    assert not at.exception and not at.error, [e.value for e in at.error]
    pair_box = at.selectbox(key="w_stimulus_pair")
    assert pair_box.label.startswith("GPA model × partner pair")
    assert pair_box.options[0] == "vision-a × subj01 (stage2 / V1)"
    expected = _dense_overlap(brain, "vision-a", "stage2", "subj01", "V1", 5)
    cards = _aligned_cards(at)
    ids = list(brain.stimuli["id"])
    assert len(cards) == 2 * PER_SIDE and all(
        value == pytest.approx(expected[ids.index(identifier)], abs=1e-4)
        for _, identifier, value in cards
    )
    assert "Most k-NN overlap" in [h.value for h in at.subheader]
    assert any("Left: vision and brain agree most" in t.value for t in at.text)
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert "subj01 (V1)" in at.dataframe[0].value.columns


def test_gallery_ranked_by_local_cka_and_the_alignment_tab(run) -> None:
    from scipy.stats import spearmanr

    from convergence_core.analyses import Pair, best_language_layers
    from convergence_core.stimulus_alignment import local_cka

    at = _page()
    change_control(at, "order", "local_cka")
    best = dict(zip(*best_language_layers(run).iloc[:, :2].T.values, strict=True))
    pair = Pair("vision-a", "stage2", "language-a", best["language-a"])
    delta = local_cka(
        run.neighbours("vision-a", "stage2").features,
        run.neighbours("language-a", pair.language_layer).features,
        base_size=39,
    ).delta
    ids = list(run.stimuli["id"])
    cards = _aligned_cards(at)
    assert cards and all(
        v == pytest.approx(delta[ids.index(i)], abs=1e-4) for _, i, v in cards
    )
    assert cards[0][2] == pytest.approx(delta.max(), abs=1e-4)
    # one precision on every card, about three significant digits of the largest change, signed
    shown = [re.search(r"\nlocal CKA ([-+])\d+\.(\d+) · ", t) for t in gallery_texts(at)]
    assert all(shown) and len({len(m.group(2)) for m in shown}) == 1
    decimals = len(shown[0].group(2))
    assert decimals == min(8, max(4, 2 - int(np.floor(np.log10(np.abs(delta).max())))))

    at.session_state[widgets.STIMULI_TAB_KEY] = "Alignment vs dispersion"
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert len(at.image) == 1  # the scatter (the gallery is not built)
    from convergence_core.dashboard import data

    relation = data.alignment_relation(
        str(run.path), data.manifest_stamp(run.path), (pair,), 10, "mean"
    ).set_index("metric")
    rho = spearmanr(delta, run.dispersion["mean"].to_numpy()).statistic
    assert relation.loc["local_cka", "spearman_rho"] == pytest.approx(rho, abs=1e-12)
    assert any("spearman" in m.value for m in at.markdown)


def test_large_runs_compute_per_stimulus_alignment_on_a_button(
    run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convergence_core.dashboard import data

    monkeypatch.setattr(data, "PER_STIMULUS_LIVE_STIMULI", 10)
    data.st.cache_data.clear()
    data._finished().clear()
    at = _page()
    change_control(at, "order", "knn_overlap")
    assert any("computed when you ask" in i.value for i in at.info)
    assert not _aligned_cards(at)
    at.button(key="w_gallery_compute").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert len(_aligned_cards(at)) == 2 * PER_SIDE
    at.run(timeout=TIMEOUT)  # computed once on this server: shown without a new press
    assert len(_aligned_cards(at)) == 2 * PER_SIDE


def test_a_per_stimulus_result_behind_its_button_and_its_mark_go_together(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's scenario: per-stimulus alignment of a large run computed on its button,
    then other users' galleries of a live run filled the cache. The large run was still marked
    finished (no button) while its result was gone, so its gallery started minutes of work
    unasked. Now its result is kept with the mark, and when it goes the button comes back."""
    from convergence_core import stimulus_alignment
    from convergence_core.dashboard import data, lab
    from tests.fixtures_runs import make_synthetic_run

    big = make_synthetic_run(tmp_path, 40, name="big", images=False, thumbnails=False)
    small = make_synthetic_run(tmp_path, 30, name="small", images=False, thumbnails=False)
    monkeypatch.setattr(data, "PER_STIMULUS_LIVE_STIMULI", 35)  # big asks first; small is live
    data.st.cache_data.clear()
    data._kept()[0].clear()
    data._finished().clear()
    computed = []
    real = stimulus_alignment.per_stimulus_alignment
    monkeypatch.setattr(stimulus_alignment, "per_stimulus_alignment",
                        lambda run, pairs, **kw: computed.append(kw) or real(run, pairs, **kw))

    def pairs(run):  # noqa: ANN001, ANN202
        return lab.cross_pairs(zip(run.gpa.models, run.gpa.layers),
                               [(m, run.default_layer(m)) for m in run.partner_models])

    path, stamp, pair = str(big.path), data.manifest_stamp(big.path), pairs(big)[0]
    assert not data.per_stimulus_ready(path, stamp, 40, [pair], 10)
    data.per_stimulus_table(path, stamp, [pair], 10)  # the button pressed
    live = [(p, k) for k in range(2, 29) for p in pairs(small)]
    assert len(live) > 128  # more than the per-stimulus cache holds
    for live_pair, k in live:
        data.alignment_ranking(str(small.path), data.manifest_stamp(small.path), live_pair,
                               "knn_overlap", k)
    computed.clear()
    assert data.per_stimulus_ready(path, stamp, 40, [pair], 10)  # shown without its button…
    data.alignment_ranking(path, stamp, pair, "knn_overlap", 10)
    assert computed == []  # …from the result kept, not computed again unasked
    for i in range(data.KEPT_RESULTS):  # later results take its place
        data.keep(("other", i), i)
    assert not data.per_stimulus_ready(path, stamp, 40, [pair], 10)  # the button again
    data._kept()[0].clear()


def test_a_run_without_images_is_not_described_by_them(tmp_path, monkeypatch) -> None:
    """A run from feature files: the detail asks to inspect "a stimulus", not "an image", and
    shows no empty caption ("(no caption)", an empty caption column)."""
    from convergence_core.run import Run
    from tests.fixtures_runs import make_synthetic_run

    make_synthetic_run(tmp_path / "runs", 30, name="demo", images=False, thumbnails=False)
    monkeypatch.setattr(Run, "has_captions", property(lambda self: False))
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _page()
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert "press Inspect under a stimulus in the gallery" in at.selectbox(key="w_inspect").label
    assert list(at.dataframe[-1].value.columns[:2]) == ["neighbour", "id"]
    assert "caption" not in at.dataframe[-1].value.columns
    assert not any("no caption" in t.value for t in at.text)
