"""Alignment lab (pages/3_Alignment_lab.py) and its tables (dashboard/lab.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from convergence_core.dashboard import data, lab, state
from convergence_core.alignment import cknna, prepare_features
from convergence_core.subsets import select_stimuli
from tests.page_reading import card_deltas, cards, change_control, controls_shown, plain, shown

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60
PAGE = "pages/3_Alignment_lab.py"


def _shown(at: AppTest, name: str):
    """The value the control ``name`` shows (``controls.row``)."""
    return controls_shown(at)[name]["value"]


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures_runs import make_brain_run, make_synthetic_run

    cache = tmp_path_factory.mktemp("cache")
    make_synthetic_run(cache / "runs", n=60, name="demo")
    make_synthetic_run(
        cache / "runs", n=30, name="vision-only", language_models=(), thumbnails=False
    )
    make_brain_run(cache / "runs" / "brain")
    return cache


def _page(query: dict[str, str] | None = None, *, tables: bool = True) -> AppTest:
    """The lab in a fresh session opened with the URL query ``query`` (first run on Home), with
    the expander of the permutation test and the full table open (``tables``) or closed."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.run(timeout=TIMEOUT)
    if tables:
        at.session_state["w_lab_tables"] = True
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def _results(at: AppTest) -> pd.DataFrame:
    """The "All results" table (the same DataFrame the CSV download is written from)."""
    assert at.download_button, f"no results; errors: {[e.value for e in at.error]}"
    download = at.download_button[0]
    table = at.dataframe[-1].value
    assert "Download results" in download.proto.label
    return table


def _dense_cknna(run, vision: tuple[str, str], language: tuple[str, str], subset, k: int) -> float:
    """The dense definition on the subset's prepared features (independent of the lab)."""
    subset = np.sort(subset)
    X = prepare_features(np.asarray(run.embeddings[vision[0]][vision[1]], dtype=np.float64))
    Y = prepare_features(np.asarray(run.embeddings[language[0]][language[1]], dtype=np.float64))
    return cknna(X[subset], Y[subset], k=k)


# ---------------------------------------------------------------------------------------------
# the lab's tables (the batched engine itself is tested in test_neighbours.py)


def test_baseline_and_permutation_match_the_paper_analysis(run) -> None:
    """Same draws, same shuffles: the lab reproduces analyses.dispersion_set_alignment exactly."""
    from convergence_core.analyses import best_language_layers, dispersion_set_alignment

    size, k, seed = 15, 5, 3
    best = best_language_layers(run, k=10)
    reference = dispersion_set_alignment(
        run,
        size=size,
        k=k,
        score="pc1",
        n_random=40,
        seed=seed,
        n_permutations=30,
        best_layers=best,
    )
    layers = dict(zip(best["language_model"], best["language_layer"], strict=True))
    pairs = [
        lab.Pair(v, vl, lm, layers[lm])
        for v, vl, lm in zip(
            reference["vision_model"],
            reference["vision_layer"],
            reference["language_model"],
            strict=True,
        )
    ]
    scores = run.dispersion["pc1"].to_numpy()
    indexes = {(m, layer): run.neighbours(m, layer) for m in run.models for layer in run.layers(m)}
    baseline = lab.baseline_table(indexes, pairs, len(scores), size, k, n_random=40, seed=seed)
    low, high = select_stimuli(scores, "low", size), select_stimuli(scores, "high", size)
    test = lab.low_high_permutation_table(
        indexes, pairs, low, high, k, n_permutations=30, seed=seed
    )
    assert set(baseline["metric"]) == {"cknna"} and set(test["metric"]) == {"cknna"}
    for part in ("mean", "lower_95", "upper_95"):
        np.testing.assert_allclose(
            baseline[f"random_{part}"], reference[f"cknna_random_{part}"], rtol=1e-9
        )
    np.testing.assert_allclose(
        test["low_minus_high"], reference["low_minus_high"], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        test["permutation_p_value_two_sided"], reference["permutation_p_value_two_sided"]
    )
    np.testing.assert_allclose(
        test["permutation_p_value_low_greater"], reference["permutation_p_value_low_greater"]
    )


def test_k_and_subset_errors_are_in_words(run) -> None:
    with pytest.raises(ValueError, match="too large .* use k <= 9"):
        lab.check_subset_for_k(10, 10, "the low set")
    with pytest.raises(ValueError, match="at least 4"):
        lab.check_subset_for_k(3, 2, "the current selection")


def test_headline_cards_average_over_pairs_and_hide_cknna_of_small_sets() -> None:
    """Planted values: two pairs, three sets; the cards are the means over the pairs."""
    values = pd.DataFrame({
        "set": ["low", "low", "high", "high", "selection", "selection"],
        "value": [0.30, 0.50, 0.10, 0.20, 0.60, 0.80],
    })
    baseline = pd.DataFrame({"random_mean": [0.20, 0.30]})
    big = lab.MIN_CKNNA_SET_SIZE
    sizes = {"low": big, "high": big, "selection": big + 5}
    cards = lab.headline(values, baseline, sizes, "selection", big, "cknna")
    assert cards == lab.Headline("0.7000", "+0.4500 vs random", "0.4000", "0.2500", "0.1500", ())
    # the random focus has no delta; a focus set that is not there (empty selection) no value
    assert lab.headline(values, baseline, sizes, "random", big, "cknna")[:2] == ("0.2500", None)
    assert lab.headline(values, baseline, {"low": big, "high": big}, "selection", big,
                        "cknna")[:2] == ("—", None)
    # CKNNA of a set under MIN_CKNNA_SET_SIZE is not shown: the set is named instead
    small = {"low": big - 1, "high": big - 1, "selection": big}
    cards = lab.headline(values, baseline, small, "selection", big - 1, "cknna")
    assert cards.focus == "0.7000" and cards.focus_delta is None  # random hidden: no delta
    assert (cards.low, cards.random, cards.high) == ("—", "—", "—")
    assert cards.too_small == ("low", "high", "random")
    # other metrics show every set
    cards = lab.headline(values, baseline, small, "low", big - 1, "mutual_knn")
    assert cards == lab.Headline("0.4000", "+0.1500 vs random", "0.4000", "0.2500", "0.1500", ())
    # a focus set of another size is compared with random sets of its own size (alignment
    # depends on the set size): its own baseline, not the low/high sets' size's
    own = pd.DataFrame({"random_mean": [0.40, 0.50]})
    cards = lab.headline(values, baseline, sizes, "selection", big, "cknna", focus_baseline=own)
    assert cards == lab.Headline("0.7000", f"+0.2500 vs random of {big + 5}", "0.4000",
                                 "0.2500", "0.1500", ())
    # ... which shows a delta even where the low/high size is too small for CKNNA
    cards = lab.headline(values, baseline, small, "selection", big - 1, "cknna",
                         focus_baseline=own)
    assert (cards.focus, cards.focus_delta, cards.random) == (
        "0.7000", f"+0.2500 vs random of {big}", "—"
    )
    # a focus of the low/high size: its own baseline is the Random card's, no size named
    cards = lab.headline(values, baseline, {**sizes, "selection": big}, "selection", big,
                         "cknna", focus_baseline=baseline)
    assert cards.focus_delta == "+0.4500 vs random"


# ---------------------------------------------------------------------------------------------
# the page


def test_default_view_shows_low_high_random_per_pair(run) -> None:
    at = _page()
    table = _results(at)
    assert set(table["set"]) == {"low", "high"}
    assert len(table) == 2 * 3 * 2  # sets × vision models × language models
    assert set(table["set_size"]) == {15} and set(table["k"]) == {10}
    assert set(table["metric"]) == {"cknna"} and set(table["options"]) == {"k=10"}
    assert table["random_lower_95"].le(table["random_mean"]).all()
    assert table["permutation_p_value_two_sided"].between(0, 1).all()
    above = table["value"] > table["random_upper_95"]
    below = table["value"] < table["random_lower_95"]
    assert (table.loc[above, "vs_random_95"] == "above").all()
    assert (table.loc[below, "vs_random_95"] == "below").all()
    assert (table.loc[~above & ~below, "vs_random_95"] == "within").all()
    # low/high numbers equal the reference on the sets chosen by the numerics module
    scores = run.dispersion["mean"].to_numpy()
    row = table[(table["set"] == "high") & (table["vision_model"] == "vision-b")].iloc[0]
    expected = _dense_cknna(
        run,
        ("vision-b", row["vision_layer"]),
        (row["language_model"], row["language_layer"]),
        select_stimuli(scores, "high", 15),
        10,
    )
    assert row["value"] == pytest.approx(expected, rel=1e-9)
    assert at.query_params["k"] == "10" and at.query_params["size"] == "15"


def test_changing_k_changes_the_cknna_table(run) -> None:
    at = _page()
    before = _results(at)
    change_control(at, "k", 4)
    assert not at.exception, at.exception
    after = _results(at)
    assert set(after["k"]) == {4}
    assert not np.allclose(before["value"], after["value"])
    assert at.query_params["k"] == "4"


def test_high_and_low_sets_differ_and_follow_the_score(run) -> None:
    # sets of at least validation.MIN_CKNNA_SET_SIZE (24) stimuli: smaller ones show no number
    at = _page({"size": "24"})
    table = _results(at)
    low = table[table["set"] == "low"]["value"].to_numpy()
    high = table[table["set"] == "high"]["value"].to_numpy()
    assert not np.allclose(low, high)
    metrics = cards(at)
    assert (
        metrics["Focus: low"] == f"{low.mean():.4f}" == metrics["Low dispersion"]
    )
    # the focus card's change: the low sets' mean minus the random sets' mean, over the pairs
    deltas = card_deltas(at)
    random_mean = table[table["set"] == "low"]["random_mean"].mean()
    assert deltas["Focus: low"] == f"{low.mean() - random_mean:+.4f} vs random"
    assert deltas["Low dispersion"] is None and deltas["High dispersion"] is None

    change_control(at, "source", "high")
    metrics = cards(at)
    assert metrics["Focus: high"] == f"{high.mean():.4f}"

    change_control(at, "score", "pc1")
    by_pc1 = _results(at)
    assert set(by_pc1["score"]) == {"pc1"}
    assert at.query_params["score"] == "pc1" and at.query_params["source"] == "high"


def test_query_params_start_the_widgets(run) -> None:
    at = _page({"k": "5", "size": "20", "score": "pc1", "source": "random"})
    assert _shown(at, "k") == 5
    assert _shown(at, "size") == 20
    assert _shown(at, "score") == "pc1"
    assert _shown(at, "source") == "random"
    table = _results(at)
    assert set(table["set_size"]) == {20} and set(table["k"]) == {5}


def test_downloads_are_named_by_every_setting_they_depend_on() -> None:
    """The calibration CSV was named by run and metric alone (two downloads of other sets
    overwrote each other); a CKA file named a k that CKA does not use (selection-flow review)."""
    assert lab.download_name("alignment", "demo", "cknna", "mean", 59, 10) == (
        "alignment-demo-cknna-mean-size59-k10.csv"
    )
    assert lab.download_name("calibration", "demo", "cka", "pc1", 30, 10) == (
        "calibration-demo-cka-pc1-size30.csv"
    )


def test_a_link_carries_the_labs_metric(run) -> None:
    """The metric lived in the session only: a copied link (or a reload) came back at CKNNA,
    with other numbers and no word of it (from the selection-flow review)."""
    at = _page({"size": "24", "metric": "mutual_knn"})
    assert _shown(at, "metric") == "mutual_knn"
    assert set(_results(at)["metric"]) == {"mutual_knn"}
    change_control(at, "metric", "cka")
    assert at.query_params["metric"] == "cka"  # what a copied link now holds
    change_control(at, "metric", "cknna")
    assert "metric" not in at.query_params  # the default is left out


def test_k_too_large_for_the_sets_is_clamped_with_a_warning(run) -> None:
    at = _page({"k": "50", "size": "12"})
    assert _shown(at, "k") == 11
    warned = [w.value for w in at.warning]
    assert any("k=50 is too large for the smallest set shown (12 stimuli" in w for w in warned)
    assert any("every set is measured at k=11 so that they compare" in w for w in warned)


def test_k_lowered_for_small_sets_comes_back_with_larger_ones(run) -> None:
    """A small focus set for a moment lowered k for good (and in the URL), so every number after
    it silently changed. Now the view keeps the requested k and the slider returns to it."""
    at = _page({"k": "10", "size": "20"})
    change_control(at, "size", 6)
    assert _shown(at, "k") == 5 and set(_results(at)["k"]) == {5}
    assert any(
        "k=10 is too large for the smallest set shown (6 stimuli" in w.value for w in at.warning
    )
    assert at.query_params["k"] == "10"  # a link keeps the requested k
    change_control(at, "size", 20)
    assert _shown(at, "k") == 10 and set(_results(at)["k"]) == {10}
    assert not at.warning

    # moved while lowered: the user's new k stays
    change_control(at, "size", 6)
    change_control(at, "k", 3)
    assert at.query_params["k"] == "3"
    change_control(at, "size", 20)
    assert _shown(at, "k") == 3 and set(_results(at)["k"]) == {3}


def test_empty_selection_is_a_next_step_in_words(run) -> None:
    at = _page({"source": "selection"})
    # nothing chosen yet is said as on Residual space: information with the next step, no error
    assert any("Empty selection" in i.value for i in at.info)
    assert not any("Empty selection" in e.value for e in at.error)
    assert set(_results(at)["set"]) == {"low", "high"}  # the rest of the page still works


def test_current_selection_is_used_and_bounds_k(run) -> None:
    at = _page()
    rows = [0, 3, 5, 8, 13, 21, 34]
    state.set_selection(at.session_state, "demo", list(run.stimuli["id"].iloc[rows]), origin="test")
    change_control(at, "source", "selection")
    assert not at.exception, at.exception
    table = _results(at)
    chosen = table[table["set"] == "selection"]
    assert len(chosen) == 6 and set(chosen["set_size"]) == {7}
    assert _shown(at, "k") == 6  # k < 7
    row = chosen.iloc[0]
    expected = _dense_cknna(
        run,
        (row["vision_model"], row["vision_layer"]),
        (row["language_model"], row["language_layer"]),
        np.array(rows),
        6,
    )
    assert row["value"] == pytest.approx(expected, rel=1e-9)
    # its random baseline has its own size
    assert chosen["random_mean"].notna().all()


def test_focus_change_is_against_random_sets_of_the_focus_size(run, monkeypatch) -> None:
    """A selection of 30 beside low/high sets of 24: its "vs random" change is against random
    sets of 30 (the table's baseline of its rows), not of 24 (alignment depends on the size),
    and its bar stands beside a bar of those random sets."""
    drawn: list[str] = []
    original = data.alignment_bars_svg
    monkeypatch.setattr(data, "alignment_bars_svg",
                        lambda *args: drawn.append(original(*args)) or drawn[-1])
    at = _page({"size": "24"})
    state.set_selection(at.session_state, "demo", list(run.stimuli["id"].iloc[:30]),
                        origin="test")
    change_control(at, "source", "selection")
    assert not at.exception, at.exception
    table = _results(at)
    chosen, low = table[table["set"] == "selection"], table[table["set"] == "low"]
    assert set(chosen["set_size"]) == {30} and set(low["set_size"]) == {24}
    own, other = chosen["random_mean"].mean(), low["random_mean"].mean()
    assert abs(own - other) > 1e-4  # the two baselines differ, so the test tells them apart
    assert card_deltas(at)["Focus: selection"] == (
        f"{chosen['value'].mean() - own:+.4f} vs random of 30"
    )
    assert "random of 30 (mean;" in drawn[-1] and "selection (30 stimuli)" in drawn[-1]


def test_pasted_ids_unknown_and_too_few(run) -> None:
    at = _page({"source": "pasted"})
    assert any("Empty selection" in i.value for i in at.info)
    ids = list(run.stimuli["id"].iloc[:3])
    at.text_area(key="w_pasted_ids").set_value("\n".join([*ids, "ghost"])).run(timeout=TIMEOUT)
    assert any("1 pasted id(s)" in w for w in shown(at.warning))
    assert any(t.value == "ghost" for t in at.text)
    assert any("ids: 3 stimuli, too few" in e.value and "at least 4" in e.value for e in at.error)
    more = list(run.stimuli["id"].iloc[:9])
    at.text_area(key="w_pasted_ids").set_value(", ".join(more)).run(timeout=TIMEOUT)
    assert set(_results(at)["set"]) == {"low", "high", "pasted"}


def test_layer_choice_changes_the_pair_and_is_kept_while_the_layers_are_closed(run) -> None:
    at = _page()
    # the layer choices are built when their expander opens
    assert not [b for b in at.sidebar.selectbox if b.key.startswith("w_layer_")]
    at.session_state["w_lab_layers"] = True
    at.run(timeout=TIMEOUT)
    at.selectbox(key="w_layer_language-a").set_value("layer0").run(timeout=TIMEOUT)
    table = _results(at)
    assert set(table.loc[table["language_model"] == "language-a", "language_layer"]) == {"layer0"}
    at.session_state["w_lab_layers"] = False
    at.run(timeout=TIMEOUT)
    table = _results(at)
    assert set(table.loc[table["language_model"] == "language-a", "language_layer"]) == {"layer0"}


def test_brain_recordings_sit_on_the_language_side(run) -> None:
    """A run of vision models and a brain 'subject' (no language model): the lab aligns the GPA
    models with the subject, at its default layer or the one chosen, with the same numbers as the
    dense definition."""
    from convergence_core.run import load_run

    brain = load_run(run.path.parent / "brain")
    assert brain.other_models == ["subj01"] and brain.modality("subj01") == "brain"
    at = _page({"run": "brain", "size": "12", "k": "5"})
    assert not at.error and not at.warning, [e.value for e in [*at.error, *at.warning]]
    chooser = controls_shown(at)["language"]
    assert chooser["label"] == "Language and other models"
    # chips are text (textContent, never Markdown or HTML): the name exactly as written
    assert chooser["labels"] == ["subj01 (brain)"]
    # the caption's names are escaped Markdown too (a name from a feature file stays text)
    assert any("subj01 \\(brain\\): on the language side" in c.value for c in at.sidebar.caption)
    table = _results(at)
    assert set(table["language_model"]) == {"subj01"} and set(table["language_layer"]) == {"V1"}
    scores = brain.dispersion["mean"].to_numpy()
    row = table[(table["set"] == "low") & (table["vision_model"] == "vision-a")].iloc[0]
    expected = _dense_cknna(
        brain, ("vision-a", "stage2"), ("subj01", "V1"), select_stimuli(scores, "low", 12), 5
    )
    assert row["value"] == pytest.approx(expected, rel=1e-9)
    at.session_state["w_lab_layers"] = True
    at.run(timeout=TIMEOUT)
    box = at.selectbox(key="w_layer_subj01")
    assert box.format_func(box.options[0]) == "default layer (V1)"
    box.set_value("hV4").run(timeout=TIMEOUT)
    assert set(_results(at)["language_layer"]) == {"hV4"}


def test_a_language_model_in_gpa_gets_one_layer_choice(tmp_path, monkeypatch) -> None:
    """GPA across a vision and a language model: the language model is on both sides of the
    lab's pairs but never paired with itself (CKNNA about 1 in every mean), and the Layers
    expander shows its choice once (a second widget with the same key stopped the page); the
    Stimuli detail lists its neighbours once, at its GPA layer, and its pairs lack it × itself."""
    from convergence_core.dashboard import widgets

    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import synthetic_embeddings

    embeddings, _ = synthetic_embeddings(40)
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(40)],
                            "image": [f"{i}.jpg" for i in range(40)],
                            "captions": [[f"c{i}"] for i in range(40)]})
    write_run_from_embeddings(
        tmp_path / "runs" / "demo", stimuli, embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"], thumbnails=False,
        gpa_models=["vision-a", "language-a"],
        gpa_layers={"vision-a": "stage2", "language-a": "layer3"},
    )
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.run(timeout=TIMEOUT)
    at.session_state["w_lab_layers"] = True
    at.session_state["w_lab_tables"] = True
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    keys = [box.key for box in at.sidebar.selectbox if box.key.startswith("w_layer_")]
    assert sorted(keys) == sorted(
        f"w_layer_{m}" for m in ["vision-a", "language-a", "language-b", "vision-b", "vision-c"]
    )
    table = _results(at)
    # GPA's 2 models × 4 partners (language-a, language-b and the vision models outside GPA)
    pairs = set(zip(table["vision_model"], table["language_model"]))
    assert len(pairs) == 7 and ("language-a", "language-a") not in pairs
    assert ("language-a", "language-b") in pairs
    assert any("mean over the 7 " in caption.value for caption in at.caption)  # the cards' pairs
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert [plain(o) for o in at.radio(key="w_neighbour_model").options] == [
        f"{m} ({kind})" for m, kind in [("vision-a", "vision"), ("language-a", "language"),
                                         ("language-b", "language"), ("vision-b", "vision"),
                                         ("vision-c", "vision")]
    ]
    at.session_state[widgets.STIMULI_TAB_KEY] = "Gallery"
    at.session_state["w_gallery_order"] = "knn_overlap"
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    shown = [option.split(" (")[0] for option in at.selectbox(key="w_stimulus_pair").options]
    assert len(shown) == 7 and "language-a × language-a" not in shown


def test_first_screen_is_the_bars_picture_and_the_tables_wait_until_opened(
    run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convergence_core.dashboard import data

    calls: list[int] = []
    real = data.low_high_permutation
    monkeypatch.setattr(data, "low_high_permutation", lambda *a: calls.append(1) or real(*a))
    at = _page(tables=False)
    assert not at.get("plotly_chart") and not at.dataframe and not at.download_button
    assert len(at.image) == 1  # the bars, drawn on the server
    statement = next(c.value for c in at.caption if c.value.startswith("Random baseline:"))
    assert "random sets of 15 stimuli per pair" in statement
    assert calls == []  # no permutation test until its expander is opened
    at.session_state["w_lab_tables"] = True
    at.run(timeout=TIMEOUT)
    assert calls == [1] and len(at.dataframe) == 2 and at.download_button


def test_statistics_settings_are_kept_while_closed_and_set_the_baseline(run) -> None:
    at = _page()
    assert not [w for w in at.number_input if w.key == "w_n_random"]  # closed: not built
    at.session_state["w_lab_statistics"] = True
    at.run(timeout=TIMEOUT)
    at.number_input(key="w_interval_width").set_value(0.0).run(timeout=TIMEOUT)  # all sets
    at.number_input(key="w_n_random").set_value(40).run(timeout=TIMEOUT)
    assert set(_results(at)["n_random"]) == {40}
    at.session_state["w_lab_statistics"] = False
    at.run(timeout=TIMEOUT)
    table = _results(at)
    assert set(table["n_random"]) == {40}
    said = "40 random sets of 15 stimuli per pair (a fixed number)"
    assert any(said in c.value for c in at.caption)


def test_no_model_chosen_and_run_without_language_models(run) -> None:
    at = _page()
    change_control(at, "language", [])
    assert any("No language model chosen" in e.value for e in at.error)

    at = _page({"run": "vision-only"})
    assert any("has no language model" in e.value for e in at.error)


# ---------------------------------------------------------------------------------------------
# the metric picker, slower metrics, calibrated scores, per-stimulus alignment (issue 14)


def _prepared(run, model: str, layer: str) -> np.ndarray:
    return prepare_features(np.asarray(run.embeddings[model][layer], dtype=np.float64))


def test_the_picker_lists_every_registry_metric_with_its_description_and_range() -> None:
    from convergence_core.metrics import metric, metric_names

    choices = lab.metric_choices()
    assert [c.name for c in choices] == metric_names()
    for choice in choices:
        entry = metric(choice.name)
        assert choice.description == entry.description and choice.live == entry.live
        low, high = entry.value_range
        assert f"[{low:g}, {high:g}]" in choice.summary and choice.label in choice.summary
    assert lab.needs_button("svcca", 100) and not lab.needs_button("cknna", 100_000)
    assert lab.needs_button("cka", lab.LIVE_FEATURE_STIMULI + 1)
    assert not lab.needs_button("cka", 239)
    # the RBF width is ignored with the linear kernel (a moved σ recomputes nothing)
    linear = lab.chosen_options("cka", kernel="linear", sigma=3.0)
    assert linear == {"kernel": "linear", "sigma": 1.0}
    assert lab.chosen_options("svcca", cca_dim=4) == {"cca_dim": 4}
    assert lab.chosen_options("mutual_knn") == {}


def test_a_metric_change_redraws_every_number_for_that_metric(run) -> None:
    from convergence_core.metrics import measure

    at = _page({"size": "24"})
    change_control(at, "metric", "mutual_knn")
    assert not at.exception, at.exception
    labels = set(cards(at))
    assert {"Low dispersion", "High dispersion"} <= labels
    assert any(c.value.startswith("mutual k-NN (k = 10), mean over the") for c in at.caption)
    table = _results(at)
    assert set(table["metric"]) == {"mutual_knn"} and set(table["k"]) == {10}
    row = table[table["set"] == "low"].iloc[0]
    low = select_stimuli(run.dispersion["mean"].to_numpy(), "low", 24)
    X = _prepared(run, row["vision_model"], row["vision_layer"])[low]
    Y = _prepared(run, row["language_model"], row["language_layer"])[low]
    assert row["value"] == pytest.approx(measure("mutual_knn", X, Y, k=10), abs=1e-12)
    assert table["permutation_p_value_two_sided"].between(0, 1).all()

    # CKA with an RBF kernel: from the sets' features; k does not enter it
    change_control(at, "metric", "cka")
    at.radio(key="w_lab_kernel").set_value("rbf").run(timeout=TIMEOUT)
    table = _results(at)
    assert set(table["metric"]) == {"cka"} and table["k"].isna().all()
    assert set(table["options"]) == {"kernel=rbf, sigma=1"}
    row = table[table["set"] == "low"].iloc[0]
    X = _prepared(run, row["vision_model"], row["vision_layer"])[low]
    Y = _prepared(run, row["language_model"], row["language_layer"])[low]
    assert row["value"] == pytest.approx(measure("cka", X, Y, kernel="rbf"), abs=1e-9)
    # k is shown (it comes back for the neighbour metrics) but cannot be moved: it does nothing
    k = controls_shown(at)["k"]
    assert k["disabled"] and "not used by CKA" in k["label"]
    assert "Low dispersion" in cards(at)
    assert any(c.value.startswith("CKA, mean over the") for c in at.caption)  # no k


def test_a_slower_metric_waits_for_its_button_and_shows_progress(run) -> None:
    from convergence_core.metrics import measure

    at = _page({"size": "20"})
    change_control(at, "metric", "svcca")
    assert not at.exception, at.exception
    assert any("not computed live" in i.value for i in at.info)
    assert not at.image and not cards(at)  # nothing computed yet
    at.button(key="w_lab_compute").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert len(at.image) == 1 and "Low dispersion" in cards(at)
    assert not any("not computed live" in i.value for i in at.info)  # gone with its button
    assert not [b for b in at.button if b.key == "w_lab_compute"]
    at.session_state["w_lab_tables"] = True
    at.run(timeout=TIMEOUT)  # the numbers are kept for every session: no second press for them
    assert len(at.image) == 1 and not at.dataframe  # the permutation test waits for its button
    at.button(key="w_lab_permutation_compute").click().run(timeout=TIMEOUT)
    table = _results(at)
    assert set(table["metric"]) == {"svcca"} and set(table["options"]) == {"cca_dim=10"}
    row = table[table["set"] == "high"].iloc[0]
    high = select_stimuli(run.dispersion["mean"].to_numpy(), "high", 20)
    X = _prepared(run, row["vision_model"], row["vision_layer"])[high]
    Y = _prepared(run, row["language_model"], row["language_layer"])[high]
    assert row["value"] == pytest.approx(measure("svcca", X, Y, cca_dim=10), abs=1e-9)


def test_lab_numbers_report_progress_and_match_the_live_path(run) -> None:
    from convergence_core.dashboard import data

    path, stamp = str(run.path), data.manifest_stamp(run.path)
    pairs = (lab.Pair("vision-a", "stage2", "language-a", "layer3"),)
    rows = (np.arange(12), np.arange(12, 24))
    seen: list[float] = []
    values, baselines = data.lab_numbers(
        path, stamp, pairs, ("low", "high"), rows, 5, 40, 0, None, "mutual_knn", (),
        progress=lambda done, words: seen.append(done),
    )
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    live = data.set_values(path, stamp, pairs, ("low", "high"), rows, 5, "mutual_knn")
    pd.testing.assert_frame_equal(values, live)
    assert list(baselines) == [12] and int(baselines[12]["n_random"].iloc[0]) == 40


def test_calibration_reports_progress_and_matches_the_cached_path(run) -> None:
    """A feature metric's calibration behind the button: progress over the sets, matched sets and
    pairings scored (SVCCA measures each one: every step told), ending at all of them, and the
    same tables as the cached path; kept for every session."""
    from convergence_core.dashboard import data

    path, stamp = str(run.path), data.manifest_stamp(run.path)
    pairs = (lab.Pair("vision-a", "stage2", "language-a", "layer3"),
             lab.Pair("vision-b", "stage2", "language-a", "layer3"))
    rows = (np.arange(20), np.arange(20, 40))
    arguments = (path, stamp, pairs, ("low", "high"), rows, 5, "svcca", (("cca_dim", 4),), 6, 5, 1)
    seen: list[tuple[float, str]] = []
    result = data.calibration_with_progress(*arguments, progress=lambda *call: seen.append(call))
    total = 2 * (2 + 5 + 6)  # per set: the set and its 5 matched sets, the set and 6 shuffles
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[-1][1] == f"{total} of {total} sets, matched sets and shuffled pairings scored…"
    assert len(seen) == len(set(fractions)) == total  # one step per set and pairing
    cached = data.calibration(*arguments)
    pd.testing.assert_frame_equal(result.table, cached.table)
    pd.testing.assert_frame_equal(result.low_high, cached.low_high)
    assert data.kept(data.calibration_key(*arguments)) is result
    again = data.calibration_with_progress(*arguments, progress=lambda *call: seen.append(call))
    assert again is result and len(seen) == len(fractions)  # kept: nothing recomputed


def test_calibrated_scores_and_matched_baselines(run) -> None:
    from convergence_core import calibration
    from convergence_core.subset_metrics import metric_values

    pairs = [lab.Pair("vision-a", "stage2", "language-a", "layer3"),
             lab.Pair("vision-b", "stage2", "language-b", "layer3")]
    indexes = {(m, layer): run.neighbours(m, layer) for m in run.models for layer in run.layers(m)}
    scores = run.dispersion["mean"].to_numpy()
    sets = {"low": select_stimuli(scores, "low", 15), "high": select_stimuli(scores, "high", 15)}
    labels = np.repeat(["cat", "dog", "bird"], 20)
    covariates = lab.matching_covariates(run, labels, k=5)
    assert covariates.labels is not None and "category" in covariates.matched_on
    table, comparisons = lab.calibration_table(
        indexes, pairs, sets, 5, covariates, metric="mutual_knn", n_shuffles=30, n_matched=25,
        seed=2,
    )
    assert len(table) == 4 and set(table["n_matched"]) == {25}
    np.testing.assert_allclose(table["calibrated"], table["value"] - table["null_mean"])
    assert (table["null_lower_95"] <= table["null_upper_95"]).all()
    # the shuffled null is calibration.shuffled_pairing_null of the pairing score
    row = table.iloc[0]
    x, y = indexes[pairs[0].sides[0]], indexes[pairs[0].sides[1]]
    null = calibration.shuffled_pairing_null(
        lambda a, b: metric_values({"x": x, "y": y}, [("x", "y")], a, ["mutual_knn"],
                                   paired_with=b, k=5)["mutual_knn"][0],
        np.sort(sets[row["set"]]), n=60, n_shuffles=30, seed=2, batched=True,
    )
    assert row["null_mean"] == pytest.approx(null.null_mean)
    # matched sets keep each chosen stimulus's label
    matched, _ = lab._matched_sets(np.sort(sets["low"]), covariates, 5, 0)
    for drawn in matched:
        assert sorted(labels[drawn]) == sorted(labels[sets["low"]])
    low_high = lab.low_high_matched_table(pairs, comparisons)
    assert list(low_high["low_minus_high"]) == pytest.approx(
        [table[(table["set"] == "low") & (table["vision_model"] == p.vision_model)]["value"].iloc[0]
         - table[(table["set"] == "high") & (table["vision_model"] == p.vision_model)]["value"]
         .iloc[0] for p in pairs]
    )
    verdict = lab.matched_verdict(low_high, "mutual_knn", covariates.matched_on)
    assert "matched baseline" in verdict and "of 2 pairs" in verdict
    # typicality alone (no labels): the matched sets are closer to the set's typicality than
    # random sets (mean 0) are; not equal, since a set at the edge of the distribution can only
    # be matched from stimuli less extreme than its own (drawn from outside the set, 45 of 60)
    plain = lab.matching_covariates(run, None, k=5)
    typical, _ = lab.calibration_table(
        indexes, pairs[:1], sets, 5, plain, metric="mutual_knn", n_shuffles=5, n_matched=25
    )
    gap = (typical["matched_typicality"] - typical["set_typicality"]).abs()
    assert (gap < 0.6 * typical["set_typicality"].abs()).all()
    # one image per class: no category matching, said in words
    alone = lab.matching_covariates(run, np.arange(60).astype(str), k=5)
    assert alone.labels is None and "median label holds 1" in alone.note


def test_low_high_survives_only_what_the_matched_sets_do_not_reproduce() -> None:
    """Planted: sets chosen on a score correlated with a covariate (as dispersion is with
    density), and an alignment that is the covariate's mean: low − high is large, and matched
    sets reproduce it, so it does not survive. Adding a bonus to the low set's own stimuli
    survives. (Per-stimulus noise in the alignment: matching at the tails of a covariate is
    never exact, and a noiseless score would flag that small bias.)"""
    from convergence_core import calibration

    rng = np.random.default_rng(0)
    covariate = rng.normal(size=400)
    chosen_by = covariate + rng.normal(size=400)
    noise = rng.normal(size=400)
    low, high = np.argsort(chosen_by)[-40:], np.argsort(chosen_by)[:40]
    bonus = np.zeros(400)
    bonus[low] = 2.0
    for extra, survives in ((np.zeros(400), False), (bonus, True)):
        comparisons = []
        for chosen in (low, high):
            sets = calibration.matched_random_sets(chosen, covariate, n_sets=100, seed=1)
            comparisons.append(calibration.compare_with_baseline(
                lambda rows: float((covariate + noise + extra)[rows].mean()), chosen, sets
            ))
        result = calibration.compare_difference_with_baselines(*comparisons)
        assert (result.p_value_greater < 0.05) == survives


def test_a_slower_metrics_calibration_waits_for_its_button(run, monkeypatch) -> None:
    """SVCCA (not live): the calibration expander asks first, then draws its table (computed
    with a progress bar, kept for the next run of the page; its key made once a rerun)."""
    at = _page({"size": "20"}, tables=False)
    change_control(at, "metric", "svcca")
    if [b for b in at.button if b.key == "w_lab_compute"]:  # not kept yet by an earlier test
        at.button(key="w_lab_compute").click().run(timeout=TIMEOUT)
    at.session_state["w_lab_calibration"] = True
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert any("the calibrated scores takes a while" in i.value for i in at.info)
    at.button(key="w_lab_calibration_compute").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert any("Download calibrated scores" in b.proto.label for b in at.download_button)
    assert not [b for b in at.button if b.key == "w_lab_calibration_compute"]
    keys = []
    real = data.calibration_key
    monkeypatch.setattr(data, "calibration_key", lambda *a: keys.append(a) or real(*a))
    at.run(timeout=TIMEOUT)  # kept: shown again with no button
    assert any("Download calibrated scores" in b.proto.label for b in at.download_button)
    assert len(keys) == 1  # the kept result looked up once
    kept = data._kept()[0]  # the kept result gone (more recent ones took its place)
    for key in [key for key in kept if key[0] == "calibration"]:
        del kept[key]
    at.run(timeout=TIMEOUT)  # the button again, not minutes of work nobody asked for
    assert not at.exception, at.exception
    assert [b for b in at.button if b.key == "w_lab_calibration_compute"]
    assert not any("Download calibrated scores" in b.proto.label for b in at.download_button)


def test_finished_marks_are_few_hashes_that_go_before_their_results() -> None:
    """The server's "finished" marks keep a hash per analysis (not the rows of every set), the
    most recently used :data:`data.FINISHED_MARKS` of each name, at most half the entries of the
    cache holding its results (a mark that outlived its result started the computation without
    asking)."""
    data._finished().clear()
    sets = data.rows_key([np.arange(5_000), np.arange(5_000, 10_000)])
    for k in range(2, 302):  # a drag of the k slider with the permutation test open
        data.mark_finished("lab_permutation", "/runs/big", 1, sets, k)
    limit = data.FINISHED_MARKS["lab_permutation"]
    assert len(data._finished()["lab_permutation"]) == limit
    assert all(isinstance(mark, int) for mark in data._finished()["lab_permutation"])
    assert data.finished("lab_permutation", "/runs/big", 1, sets, 301)
    assert not data.finished("lab_permutation", "/runs/big", 1, sets, 2)
    assert data.finished("lab_permutation", "/runs/big", 1, sets, 302 - limit)  # used: kept
    data.mark_finished("lab_permutation", "/runs/big", 1, sets, 999)
    assert data.finished("lab_permutation", "/runs/big", 1, sets, 302 - limit)
    caches = {"cross_modal": data.cross_modal, "cross_modal_retrieval": data.cross_modal_retrieval,
              "dispersion_sets": data.dispersion_sets,
              "drop_fraction": data.drop_fraction, "leave_one_out": data.leave_one_out,
              "lab_permutation": data._low_high_permutation}
    assert set(caches) == set(data.FINISHED_MARKS)
    for name, cached in caches.items():
        assert 2 * data.FINISHED_MARKS[name] <= cached._info.max_entries, name
    data._finished().clear()


def test_calibration_and_per_stimulus_expanders(run) -> None:
    at = _page({"size": "20"}, tables=False)
    at.session_state["w_lab_calibration"] = True
    at.session_state["w_lab_per_stimulus"] = True
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    texts = [e.value for e in (*at.success, *at.warning)]
    assert any(t.startswith("Low > high") and "matched baseline" in t for t in texts)
    assert any("Download calibrated scores" in b.proto.label for b in at.download_button)
    assert len(at.image) == 2  # the bars and the per-stimulus scatter
    assert any("spearman" in m.value for m in at.markdown)  # the ρ table (escaped Markdown)
    # the calibration's tables (15 and 12 columns) in data grids, which scroll inside themselves
    grids = [frame.value for frame in at.dataframe]
    assert len(grids) == 2
    wide = max(grids, key=lambda frame: frame.shape[1])
    assert {"calibrated", "null_mean", "matched_mean"} <= set(wide.columns)


def test_a_set_size_too_large_for_a_new_run_becomes_the_size_the_warning_names(run) -> None:
    """Set size 30 on a run of 60, then a run of 40 (at most 20): the warning names the default
    size, and the widget, the URL and the sets use that size, not 30 clamped to 20."""
    at = _page({"size": "30"}, tables=False)
    assert _shown(at, "size") == 30
    at.selectbox(key="w_run").set_value("brain").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    default = state.default_subset_size(40)
    assert any(f"using {default}." in w.value for w in at.warning), [w.value for w in at.warning]
    assert _shown(at, "size") == default
    assert at.query_params.get("size") in (None, str(default))


def test_the_per_stimulus_pair_stays_when_another_model_is_deselected(run) -> None:
    """The per-stimulus pair is kept by its models: deselecting a model keeps the chosen pair
    (it moved to another place in the list), and forgets a pair that is gone."""
    at = _page(tables=False)
    at.session_state["w_lab_per_stimulus"] = True
    at.run(timeout=TIMEOUT)
    at.selectbox(key="w_lab_pair").set_value(("vision-b", "language-b")).run(timeout=TIMEOUT)
    change_control(at, "language", ["language-b"])
    assert not at.exception, at.exception
    box = at.selectbox(key="w_lab_pair")
    assert box.value == ("vision-b", "language-b")
    assert box.options[box.index].startswith("vision-b × language-b (")
    change_control(at, "vision", ["vision-a", "vision-c"])
    assert not at.exception, at.exception
    assert at.selectbox(key="w_lab_pair").value == ("vision-a", "language-b")  # gone: the first


def test_sampled_best_layers_are_said_in_the_sidebar(run, monkeypatch: pytest.MonkeyPatch) -> None:
    from convergence_core import analyses
    from convergence_core.dashboard import data

    sweep = analyses.layer_sweep(run, max_stimuli=20, seed=3)
    table = analyses.best_language_layers(run, sweep=sweep)
    note = lab.best_layer_sample_note(table, run.n_stimuli)
    assert note is not None and "20 of the 60 stimuli (seed 3)" in note
    assert lab.best_layer_sample_note(analyses.best_language_layers(run), run.n_stimuli) is None
    monkeypatch.setattr(data, "best_language_layer_table", lambda path, stamp, k=10: table)
    at = _page(tables=False)
    assert any(c.value == note for c in at.sidebar.caption)


def test_the_matched_verdict_says_where_a_p_value_is_undefined() -> None:
    """A pair whose value on some set is not a number has no p-value (it used to get the
    smallest): the verdict counts it apart instead of among the pairs that do not survive."""
    table = pd.DataFrame({"low_minus_high": [0.2, np.nan, 0.1],
                          "p_value": [0.01, np.nan, 0.5],
                          "survives": [True, False, False]})
    verdict = lab.matched_verdict(table, "cknna", "typicality")
    assert "in 1 of 3 (1 undefined: a value on some set is not a number" in verdict
    table["p_value"] = [0.01, 0.02, 0.5]
    assert "undefined" not in lab.matched_verdict(table, "cknna", "typicality")


def test_more_models_than_a_row_of_chips_holds_are_a_box_to_search(tmp_path, monkeypatch) -> None:
    """Above ``widgets.PILL_LIMIT`` models a side is a multi-select box (type to search), as
    before the chips: 14 GPA models as chips were 7 rows of them, and choosing one 13 clicks.
    The other side stays a chip row; both keep their choice across a page switch."""
    from convergence_core.dashboard import widgets
    from tests.fixtures_runs import make_synthetic_run

    many = tuple(f"subject-{i:02d}" for i in range(widgets.PILL_LIMIT + 2))
    make_synthetic_run(tmp_path / "cache" / "runs", n=40, name="many", vision_models=many)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
    at = _page({"run": "many"})
    box = at.multiselect(key="w_vision__box")
    assert box.options == list(many) and box.value == list(many)
    assert "vision" not in controls_shown(at) and "language" in controls_shown(at)
    box.set_value(["subject-03"]).run(timeout=TIMEOUT)
    change_control(at, "language", ["language-b"])
    assert not at.exception, at.exception
    table = _results(at)
    assert set(table["vision_model"]) == {"subject-03"}
    assert set(table["language_model"]) == {"language-b"}
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert at.multiselect(key="w_vision__box").value == ["subject-03"]
    assert controls_shown(at)["language"]["value"] == ["language-b"]


def test_chips_after_a_run_of_many_models_keep_every_change(tmp_path, monkeypatch) -> None:
    """A run of more than 12 GPA models (a box), then one of 3 that shares some of them (chips):
    the chips keep each change; the box had left its widget key on the choice, and Streamlit
    dropped every change the chips wrote at the next rerun (from the final review)."""
    from convergence_core.dashboard import widgets
    from tests.fixtures_runs import make_synthetic_run

    few = ("vision-a", "vision-b", "vision-c")
    many = few + tuple(f"subject-{i:02d}" for i in range(widgets.PILL_LIMIT))
    make_synthetic_run(tmp_path / "cache" / "runs", n=40, name="many", vision_models=many)
    make_synthetic_run(tmp_path / "cache" / "runs", n=40, name="few", vision_models=few)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
    at = _page({"run": "many"})
    at.multiselect(key="w_vision__box").set_value(["vision-a", "vision-c", "subject-05"]).run(
        timeout=TIMEOUT)
    at.sidebar.selectbox[0].set_value("few").run(timeout=TIMEOUT)
    assert controls_shown(at)["vision"]["value"] == ["vision-a", "vision-c"]
    change_control(at, "vision", ["vision-c"])
    for _ in range(2):
        at.run(timeout=TIMEOUT)
        assert controls_shown(at)["vision"]["value"] == ["vision-c"]
        assert set(_results(at)["vision_model"]) == {"vision-c"}
    at.sidebar.selectbox[0].set_value("many").run(timeout=TIMEOUT)
    assert at.multiselect(key="w_vision__box").value == ["vision-c"]


# ---------------------------------------------------------------------------------------------
# SVCCA where the layers or the stimuli limit it (from the edge-case review)


def _shown_cells(element) -> pd.DataFrame:  # noqa: ANN001
    """The cells of an ``st.dataframe`` as the browser shows them (a Styler's display values)."""
    from streamlit import dataframe_util

    styler = element.proto.arrow_data.styler
    return dataframe_util.convert_arrow_bytes_to_pandas_df(styler.display_values)


def _edge_run(tmp_path: Path, name: str, embeddings: dict, **options) -> Path:
    """A run of ``embeddings`` (vision-a, -b, -c and any others) under ``tmp_path/runs``."""
    from convergence_core.precompute import write_run_from_embeddings

    n = next(iter(next(iter(embeddings.values())).values())).shape[0]
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(n)],
                            "image": [f"{i}.jpg" for i in range(n)],
                            "captions": [[f"c{i}"] for i in range(n)]})
    write_run_from_embeddings(
        tmp_path / "runs" / name, stimuli, embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"], thumbnails=False,
        default_layers={m: "stage2" for m in ("vision-a", "vision-b", "vision-c")}, **options,
    )
    return tmp_path


def _svcca_computed(at: AppTest) -> AppTest:
    """SVCCA chosen and computed (its button), the tables' expander open and its test run."""
    change_control(at, "metric", "svcca")
    assert not at.exception, at.exception
    at.button(key="w_lab_compute").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    at.session_state["w_lab_tables"] = True
    at.run(timeout=TIMEOUT)
    at.button(key="w_lab_permutation_compute").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def test_svcca_on_a_brain_region_of_3_features_is_bounded_by_its_width(
    tmp_path, monkeypatch
) -> None:
    """A brain region of 3 features: the CCA dimension control stops at 3 and says why (it used
    to stop at the smallest set − 1 only, and "Compute SVCCA" raised cca_dim ≤ 3, got 10)."""
    from convergence_core.metrics import measure
    from convergence_core.run import load_run
    from tests.fixtures_runs import synthetic_embeddings

    embeddings, _ = synthetic_embeddings(40, language_models=())
    rng = np.random.default_rng(2)
    embeddings["subj01"] = {"roi": rng.standard_normal((40, 3)).astype(np.float32)}
    monkeypatch.setenv("CONVERGENCE_CACHE", str(
        _edge_run(tmp_path, "narrow", embeddings, language_models=[],
                  modalities={"subj01": "brain"})
    ))
    at = _svcca_computed(_page({"run": "narrow", "size": "15"}, tables=False))
    control = at.number_input(key="w_lab_cca_dim")
    assert control.value == 3 and control.max == 3
    assert "at most 3: one fewer than the smallest set (15 stimuli) and at most the 3 features " \
        "of the narrowest layer compared (subj01 / roi)" in plain(control.help)
    assert not at.warning, shown(at.warning)
    table = _results(at)
    assert set(table["options"]) == {"cca_dim=3"} and table["value"].notna().all()
    narrow = load_run(tmp_path / "runs" / "narrow")
    row = table[(table["set"] == "low") & (table["vision_model"] == "vision-b")].iloc[0]
    low = select_stimuli(narrow.dispersion["mean"].to_numpy(), "low", 15)
    X = _prepared(narrow, "vision-b", "stage2")[low]
    Y = _prepared(narrow, "subj01", "roi")[low]
    assert row["value"] == pytest.approx(measure("svcca", X, Y, cca_dim=3), abs=1e-9)


def test_svcca_undefined_on_repeated_stimuli_is_na_with_a_note(tmp_path, monkeypatch) -> None:
    """Every stimulus twice (rows 20..39 repeat 0..19 in every model): the low set of 15 holds
    about 8 distinct stimuli, fewer than cca_dim=10 directions, so SVCCA is undefined there. The
    page shows n/a (cards, table) and a note naming the set, why and the fix, not a traceback;
    a smaller CCA dimension gives numbers; CKA on the same sets is unaffected."""
    from convergence_core.metrics import measure
    from convergence_core.run import load_run
    from tests.fixtures_runs import synthetic_embeddings

    embeddings, _ = synthetic_embeddings(20)
    embeddings = {model: {layer: np.concatenate([X, X]) for layer, X in layers.items()}
                  for model, layers in embeddings.items()}
    monkeypatch.setenv("CONVERGENCE_CACHE", str(_edge_run(
        tmp_path, "repeated", embeddings, language_models=["language-a", "language-b"],
    )))
    at = _page({"run": "repeated", "size": "15"}, tables=False)
    at.session_state["w_language"] = ["language-a"]
    at = _svcca_computed(at)
    assert cards(at)["Low dispersion"] == "n/a"
    notes = [n for n in shown(at.warning) if "SVCCA is undefined (n/a) on the low set" in n]
    assert len(notes) == 1, shown(at.warning)
    assert "fewer independent directions than the CCA dimension (cca_dim=10)" in notes[0]
    assert "Choose a smaller CCA dimension, or sets of distinct stimuli." in notes[0]
    assert "vision-a × language-a" in notes[0]
    table = _results(at)
    low = table[table["set"] == "low"]
    assert low["value"].isna().all() and set(low["vs_random_95"]) == {"n/a"}
    cells = _shown_cells(at.dataframe[-1])
    assert set(cells.loc[(cells["set"] == "low").to_numpy(), "value"]) == {"n/a"}
    assert any("p-values are n/a" in t.value for t in at.text)

    at.number_input(key="w_lab_cca_dim").set_value(5).run(timeout=TIMEOUT)  # the fix it names
    if [b for b in at.button if b.key == "w_lab_compute"]:
        at.button(key="w_lab_compute").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert cards(at)["Low dispersion"] != "n/a"
    assert not any("undefined" in note for note in shown(at.warning))

    at.session_state["w_lab_tables"] = True
    change_control(at, "metric", "cka")  # other metrics: as before, numbers on every set
    assert not at.exception, at.exception
    assert not any("undefined" in note for note in shown(at.warning))
    table = _results(at)
    assert table["value"].notna().all()
    repeated = load_run(tmp_path / "runs" / "repeated")
    row = table[(table["set"] == "low") & (table["vision_model"] == "vision-a")].iloc[0]
    rows = select_stimuli(repeated.dispersion["mean"].to_numpy(), "low", 15)
    X = _prepared(repeated, "vision-a", "stage2")[rows]
    Y = _prepared(repeated, row["language_model"], row["language_layer"])[rows]
    assert row["value"] == pytest.approx(measure("cka", X, Y), abs=1e-9)
