"""The Paper-analyses page renders on a planted run and follows its controls."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.fixtures_runs import make_synthetic_run

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "4_Paper_analyses.py")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("page_cache")
    make_synthetic_run(
        root / "runs", 60, plant="quiet_half", name="demo", images=False, thumbnails=False
    )
    return root


def _page(monkeypatch: pytest.MonkeyPatch, cache_root: Path) -> AppTest:
    """The page with Fig. 2's full table open (it is built only when its expander opens)."""
    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache_root))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["w_paper_sets_table"] = True
    at.run(timeout=60)
    assert not at.exception, at.exception
    return at


def _widget(at: AppTest, label: str):
    return next(w for w in at.number_input if w.label == label)


def test_page_shows_every_analysis_and_reacts_to_size_and_k(monkeypatch, cache_root):
    at = _page(monkeypatch, cache_root)
    assert [tab.label for tab in at.tabs] == [
        "Fig. 2: dispersion sets",
        "Fig. S1: drop a fraction",
        "Fig. S2: leave one model out",
        "Layer sweep",
    ]
    # only the open tab is computed and drawn: Fig. 2's picture, its verdict and its tables
    assert len(at.image) == 1 and not at.get("plotly_chart")
    assert len(at.dataframe) == 1
    first = at.dataframe[0].value
    assert len(first) == 6 and set(first["set_size"]) == {15}  # default: a quarter of 60
    # sets under 24 stimuli: no CKNNA count, as in the report and the lab (it said "holds for")
    assert not any("holds for" in text.value for text in at.text)
    assert any("no verdict: sets of 15 < 24 stimuli have no CKNNA numbers (use a set size of 24 "
               "or more)" in text.value for text in at.text)

    _widget(at, "Set size (stimuli)").set_value(20)
    at.run(timeout=60)
    assert not at.exception, at.exception
    resized = at.dataframe[0].value
    assert set(resized["set_size"]) == {20}
    assert not resized["cknna_low_dispersion"].equals(first["cknna_low_dispersion"])

    _widget(at, "k (CKNNA neighbours)").set_value(5)
    at.run(timeout=60)
    assert not at.exception, at.exception
    rekeyed = at.dataframe[0].value
    assert set(rekeyed["k"]) == {5}
    assert not rekeyed["cknna_low_dispersion"].equals(resized["cknna_low_dispersion"])
    assert at.query_params["k"] == ["5"] or at.query_params["k"] == "5"

    # a set size too small for k lowers k for these sets only: k comes back with larger sets
    _widget(at, "Set size (stimuli)").set_value(4)
    at.run(timeout=60)
    assert set(at.dataframe[0].value["k"]) == {3}
    assert any("k=5 needs sets of more than 5 stimuli" in c.value for c in at.caption)
    _widget(at, "Set size (stimuli)").set_value(20)
    at.run(timeout=60)
    assert set(at.dataframe[0].value["k"]) == {5}
    _widget(at, "Set size (stimuli)").set_value(24)
    at.run(timeout=60)
    assert any("holds for" in text.value for text in at.text)


def test_page_without_runs_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run(timeout=60)
    assert not at.exception
    assert "make demo" in at.error[0].value


def test_each_tab_is_computed_when_opened(monkeypatch, cache_root):
    from convergence_core.dashboard import data

    at = _page(monkeypatch, cache_root)
    # Fig. 2's tests across pairs: named in words, each statistic by its symbol, one p format
    tests = next(m.value for m in at.markdown if m.value.startswith("| test | statistic |"))
    assert "Wilcoxon signed" in tests and "W\u00a0\\=" in tests and "t\u00a0\\=" in tests
    assert "wilcoxon\\_signed" not in tests and "e\\-0" not in tests
    calls: list[str] = []
    for name in ("drop_fraction", "leave_one_out", "layer_sweep"):
        real = getattr(data, name)
        monkeypatch.setattr(
            data, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    at.run(timeout=60)
    assert calls == []  # Fig. 2 is open; its best layers come from the cached sweep
    for tab, expected in (
        ("Fig. S1: drop a fraction", "drop_fraction"),
        ("Fig. S2: leave one model out", "leave_one_out"),
        ("Layer sweep", "layer_sweep"),
    ):
        calls.clear()
        at.session_state["w_paper_tab"] = tab
        at.run(timeout=60)
        assert not at.exception, at.exception
        assert calls[:1] == [expected] and len(at.image) == 1, (tab, calls)
    best = next(  # headers in words (catalogue.DISPLAY_NAMES), not language_model
        m.value for m in at.markdown if m.value.startswith("| language model |")
    )
    assert "| language layer |" in best  # the best layer of each language model, a small table
    assert "mean CKNNA" in best and "\\_" not in best.splitlines()[0]


def test_a_run_without_language_models_says_what_each_tab_needs(monkeypatch, tmp_path):
    """Fig. 2, S1 and the layer sweep compare vision with language models: on a run without any
    they say so (no error); Fig. S2 needs only the vision models and is drawn."""
    make_synthetic_run(
        tmp_path / "runs", 30, name="demo", language_models=(), images=False, thumbnails=False
    )
    at = _page(monkeypatch, tmp_path)
    for tab in ("Fig. 2: dispersion sets", "Fig. S1: drop a fraction", "Layer sweep",
                "Fig. S2: leave one model out"):
        at.session_state["w_paper_tab"] = tab
        at.run(timeout=60)
        assert not at.exception and not at.error, (tab, [e.value for e in at.error])
        said = [i.value for i in at.info if "has no language model" in i.value]
        if tab.startswith("Fig. S2"):
            assert not said and len(at.image) == 1
        else:
            assert said and "Fig. S2 needs only the vision models" in said[0], tab


def _shows_vision_times_subject(at: AppTest, run) -> None:
    """Fig. 2 (open) is drawn for the GPA models × subj01 with the numbers of
    ``analyses.dispersion_set_alignment`` on ``analyses.partner_pairs``; then Fig. S1 is too."""
    from convergence_core import analyses

    assert not at.error and not at.exception, [e.value for e in at.error]
    assert any("Fig. 2 for the GPA models × subj01" in c.value for c in at.caption)
    assert any("3 vision × brain pairs" in t.value for t in at.text)  # a count, or no verdict
    assert len(at.image) == 1
    shown = at.dataframe[0].value
    expected = analyses.dispersion_set_alignment(
        run, size=10, k=9, score="mean", n_random=200, seed=0,
        n_permutations=analyses.DEFAULT_N_PERMUTATIONS, pairs=analyses.partner_pairs(run),
    )
    assert set(shown["language_model"]) == {"subj01"}
    for column in ("cknna_low_dispersion", "cknna_high_dispersion"):
        assert shown[column].to_numpy() == pytest.approx(expected[column].to_numpy(), rel=1e-12)
    at.session_state["w_paper_tab"] = "Fig. S1: drop a fraction"
    at.run(timeout=60)
    assert not at.error and not at.exception and len(at.image) == 1
    assert "subj01" in at.markdown[-1].value  # the table of CKNNA per condition


def test_without_language_models_fig2_aligns_the_models_outside_gpa(monkeypatch, tmp_path):
    """Vision models and a brain subject: Fig. 2 and S1 are drawn for vision × subject (the
    report's tables, same numbers); the layer sweep says it needs language models."""
    from tests.fixtures_runs import make_brain_run

    run = make_brain_run(tmp_path / "runs" / "demo", n=40)
    at = _page(monkeypatch, tmp_path)
    _shows_vision_times_subject(at, run)
    at.session_state["w_paper_tab"] = "Layer sweep"
    at.run(timeout=60)
    assert any("has no language model" in i.value for i in at.info)


def test_with_language_and_brain_models_fig2_and_s1_offer_both_pairings(monkeypatch, tmp_path):
    """Language models and a brain subject: Fig. 2 starts with vision × language (as before); the
    sidebar's pairing switches Fig. 2 and S1 to vision × subject, with the numbers of the
    report's partner section."""
    from tests.fixtures_runs import LANGUAGE_MODELS, make_brain_run

    run = make_brain_run(tmp_path / "runs" / "demo", n=40, language_models=LANGUAGE_MODELS)
    at = _page(monkeypatch, tmp_path)
    assert not at.error and not at.exception, [e.value for e in at.error]
    pairing = at.sidebar.radio(key="w_paper_partners")
    assert list(pairing.options) == ["vision × language", "vision × brain"]
    assert set(at.dataframe[0].value["language_model"]) == set(LANGUAGE_MODELS)
    pairing.set_value("other").run(timeout=60)
    _shows_vision_times_subject(at, run)
    assert "language-a" not in at.markdown[-1].value


def test_large_runs_ask_before_the_long_analyses(monkeypatch, cache_root):
    """Above data.PAPER_AUTO_COMPUTE_STIMULI, Fig. 2 waits for its button; once computed it
    shows at once."""
    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache_root))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["w_paper_tab"] = "Fig. 2: dispersion sets"
    at.run(timeout=60)
    from convergence_core.dashboard import data

    data.dispersion_sets.clear()
    data._finished().clear()
    monkeypatch.setattr(data, "PAPER_AUTO_COMPUTE_STIMULI", 10)
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run(timeout=60)
    assert not at.image and any("takes up to minutes here" in i.value for i in at.info)
    at.button(key="compute-fig2").click().run(timeout=60)
    assert not at.exception, at.exception
    assert len(at.image) == 1
    again = AppTest.from_file(PAGE, default_timeout=60)
    again.run(timeout=60)
    assert len(again.image) == 1 and not again.info  # computed once for every session

    # a small run with a large set size × k waits too (its time grows with both)
    monkeypatch.setattr(data, "PAPER_AUTO_COMPUTE_STIMULI", 5_000)
    monkeypatch.setattr(data, "PAPER_AUTO_COMPUTE_SET_WORK", 100)
    heavy = AppTest.from_file(PAGE, default_timeout=60)
    heavy.query_params["k"] = "9"
    heavy.run(timeout=60)
    assert not heavy.image
    assert any("with sets of 15 and k = 9 takes up to minutes" in i.value for i in heavy.info)


def test_a_sampled_layer_choice_is_said_where_the_layers_are_shown(monkeypatch, cache_root):
    """Above analyses.LAYER_SWEEP_MAX_STIMULI the best layers come from a seeded sample: Fig. 2
    and the layer sweep say so (issue 11, item 3)."""
    from convergence_core import analyses
    from convergence_core.dashboard import data

    monkeypatch.setattr(analyses, "LAYER_SWEEP_MAX_STIMULI", 20)
    monkeypatch.setattr(
        data, "layer_sweep",
        lambda path, stamp, k: analyses.layer_sweep(data.open_run(Path(path)), k=k,
                                                    max_stimuli=20, seed=0),
    )
    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache_root))
    # the best layers are kept per server and read off the sweep: none kept from another test
    data._best_language_layer_table.clear()
    try:
        for tab in ("Fig. 2: dispersion sets", "Layer sweep"):
            at = AppTest.from_file(PAGE, default_timeout=60)
            at.session_state["w_paper_tab"] = tab
            at.run(timeout=60)
            assert not at.exception, at.exception
            notes = [i.value for i in at.info if "seeded random sample" in i.value]
            assert notes and "20 of the 60 stimuli (seed 0)" in notes[0], tab
    finally:
        data._best_language_layer_table.clear()  # the sampled layers stay in this test


def test_a_model_name_is_shown_as_written_not_as_markdown(monkeypatch, tmp_path):
    """A subject named with Markdown (a name from a feature file or a shared run): the notes of
    Fig. 2 and of the tabs that need language models show it as written, never as a link or
    emphasis."""
    from tests.fixtures_runs import make_brain_run
    from tests.page_reading import plain

    name = "s_1*[x](http://example.com/a.png)"
    make_brain_run(tmp_path / "runs" / "demo", n=40, subject=name)
    at = _page(monkeypatch, tmp_path)
    assert not at.error and not at.exception, [e.value for e in at.error]
    fig2 = next(c.value for c in at.caption if "Fig. 2 for the GPA models ×" in c.value)
    assert name not in fig2 and f"× {name} (models outside GPA" in plain(fig2)
    at.session_state["w_paper_tab"] = "Layer sweep"
    at.run(timeout=60)
    note = next(i.value for i in at.info if "has no language model" in i.value)
    assert name not in note and f"align them with {name}." in plain(note)
