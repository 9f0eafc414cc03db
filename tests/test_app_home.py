"""Home page (app.py) with AppTest against runs built in the test, and the URL-state helpers."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from convergence_core.dashboard import data, page, state, widgets
from tests.page_reading import change_control, controls_shown, gallery_cards, shown
from convergence_core.run import RunInfo

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs: "demo" (60 stimuli) and the newer "other" (40 stimuli, other models)."""
    from tests.fixtures_runs import make_synthetic_run

    cache = tmp_path_factory.mktemp("cache")
    make_synthetic_run(cache / "runs", n=60, name="demo")
    time.sleep(0.01)
    make_synthetic_run(
        cache / "runs",
        n=40,
        name="other",
        seed=1,
        vision_models=("vision-x", "vision-y", "vision-z"),
        language_models=("language-z",),
        n_language_layers=3,
    )
    return cache


@pytest.fixture
def synthetic_cache(_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONVERGENCE_CACHE", str(_cache_dir))
    return _cache_dir


def _app() -> AppTest:
    return AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)


def _markdown_rows(table: str) -> list[list[str]]:
    """The cells of a ``widgets.markdown_table``, unescaped (header first, the rule dropped)."""
    lines = [line for i, line in enumerate(table.splitlines()) if i != 1]
    return [
        [re.sub(r"\\(.)", r"\1", cell.strip()).replace("\u200b", "")  # headers' break points
         for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in lines
    ]


def _metric(at: AppTest, label: str) -> str:
    """The value under ``label`` in Home's one-row summary tables (Markdown)."""
    for markdown in at.markdown:
        rows = _markdown_rows(markdown.value) if markdown.value.startswith("| ") else []
        if len(rows) == 2 and label in rows[0]:
            return rows[1][rows[0].index(label)]
    raise AssertionError(f"no summary cell {label!r}: {[m.value for m in at.markdown]}")


# ---------------------------------------------------------------------------------------------
# pure URL state


def test_parse_query_params_reads_valid_values() -> None:
    view, warnings = state.parse_query_params(
        {"run": "demo", "source": "high", "score": "pc1", "k": "7", "size": "30", "page": "3"},
        ["demo", "other"],
    )
    assert warnings == []
    assert (view.run, view.source, view.score, view.k, view.size, view.page) == (
        "demo",
        "high",
        "pc1",
        7,
        30,
        3,
    )
    assert state.parse_query_params(view.to_query_params(), ["demo"])[0] == view
    # the lab's metric travels too, and is left out of a link where it is the default
    assert "metric" not in view.to_query_params()
    with_metric, warnings = state.parse_query_params({"metric": "svcca"}, ["demo"])
    assert warnings == [] and with_metric.metric == "svcca"
    assert with_metric.to_query_params()["metric"] == "svcca"


@pytest.mark.parametrize(
    ("params", "field", "default", "word"),
    [
        ({"score": "median"}, "score", "mean", "score"),
        ({"source": "<b>x</b>"}, "source", "low", "source"),
        ({"k": "ten"}, "k", 10, "whole number"),
        ({"k": "1"}, "k", 10, "at least 2"),
        ({"size": "-4"}, "size", None, "at least 4"),
        ({"page": "0"}, "page", 1, "at least 1"),
        ({"run": "nope"}, "run", None, "not a cached run"),
        ({"metric": "unknown"}, "metric", "cknna", "not one of cknna, mutual_knn"),
    ],
)
def test_parse_query_params_falls_back_with_a_warning(params, field, default, word) -> None:
    view, warnings = state.parse_query_params(params, ["demo"])
    assert getattr(view, field) == default
    assert len(warnings) == 1 and word in warnings[0]


def test_warnings_never_echo_markdown_or_html_from_the_url() -> None:
    _, warnings = state.parse_query_params({"score": "![x](http://evil/t.png)<script>"}, [])
    assert (
        "![x]" not in warnings[0] and "<script>" not in warnings[0] and "(http" not in warnings[0]
    )


def test_repeated_query_keys_use_the_last_value() -> None:
    view, _ = state.parse_query_params({"k": ["3", "12"]}, [])
    assert view.k == 12


def test_default_run_prefers_newest_demo_then_newest() -> None:
    def info(name: str) -> RunInfo:
        return RunInfo(name, Path(name), {})

    assert data.default_run_name([info("new"), info("demo-2"), info("demo")]) == "demo-2"
    assert data.default_run_name([info("new"), info("old")]) == "new"
    assert data.default_run_name([info("demonstration"), info("old")]) == "demonstration"
    assert data.default_run_name([]) is None


def test_a_choice_of_models_carries_over_to_another_run() -> None:
    session = {"models": ["a", "b", "c"]}
    state.carry_choices_to_run(session, "models", ["b", "c", "d"])
    assert session["models"] == ["b", "c"]  # the models this run has, in the chosen order
    state.carry_choices_to_run(session, "models", ["x", "y"])
    assert "models" not in session  # none of them: the widget starts from its default (all)
    session = {"models": []}  # emptied on purpose on this run: stays empty
    state.carry_choices_to_run(session, "models", ["x", "y"])
    assert session["models"] == []
    state.carry_choices_to_run(session, "absent", ["x"])
    assert "absent" not in session


def test_a_session_whose_run_goes_away_is_told_why() -> None:
    """From the reliability audit: while a precompute rewrote the shown run, the session moved
    to another run without a word. It now says so, once, and why."""
    session: dict = {}
    view, warnings = state.init_view(session, {"run": "live"}, ["live", "demo"])
    assert view.run == "live" and not warnings
    view, warnings = state.init_view(session, {}, ["demo"], unfinished=["live"])
    assert view.run is None  # the page shows the default run
    assert len(warnings) == 1 and "'live' is being written by a precompute" in warnings[0]
    assert state.init_view(session, {}, ["demo"], unfinished=["live"])[1] == []  # said once
    view.run = "gone"
    assert "no longer in the cache" in state.init_view(session, {}, ["demo"])[1][0]
    view.run = "live"  # the only run, being rewritten: there is no default to show
    (alone,) = state.init_view(session, {}, [], unfinished=["live"])[1]
    assert "No other run is cached" in alone and "default run" not in alone


def test_default_subset_size() -> None:
    assert state.default_subset_size(239) == 59
    assert state.default_subset_size(60) == 15
    assert state.default_subset_size(10) == 4


# ---------------------------------------------------------------------------------------------
# the page


def test_no_run_says_how_to_make_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "empty-cache"))
    at = _app().run(timeout=TIMEOUT)
    assert not at.exception
    message = " ".join(e.value for e in at.error)
    assert "No cached run" in message
    assert (
        "make demo" in message and "python -m convergence_core precompute --preset demo" in message
    )


def test_home_cards_histogram_and_previews(synthetic_cache: Path) -> None:
    from convergence_core.run import load_run

    run = load_run(synthetic_cache / "runs" / "demo")
    at = _app().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert _metric(at, "Stimuli") == str(run.n_stimuli)
    assert _metric(at, "Vision models") == "3"
    assert _metric(at, "Language models") == "2"
    assert _metric(at, "GPA iterations") == str(run.gpa.n_iter)
    assert _metric(at, "GPA final loss") == f"{float(run.gpa.loss_history[-1]):.6f}"
    assert _metric(at, "GPA converged") == ("yes" if run.gpa.converged else "NO")
    assert not at.metric  # tables, not cards (no card code for the browser to load)
    # the stored GPA stability diagnostic, in one sentence
    assert run.gpa_stability.describe(run.n_stimuli) in [t.value for t in at.text]
    assert run.gpa_stop is None and not any("gpa_stop" in box.value for box in at.info)
    # the models table is an escaped Markdown table (no data grid): a header, then a row per model
    rows = _markdown_rows(next(m.value for m in at.markdown if m.value.startswith("| model |")))
    assert [row[0] for row in rows[1:]] == run.models
    assert rows[1][-1] == "GPA (dispersion)" and rows[-1][-1] == "alignment (CKNNA)"
    assert not at.dataframe and not at.get("plotly_chart")  # nothing that loads heavy scripts
    # the histogram picture and 5 lowest and 5 highest dispersion thumbnails, in rank order
    assert len(at.image) == 1
    shown = gallery_cards(at)
    assert len(shown) == 10 and all(card["image"].startswith("data:image/jpeg") for card in shown)
    labels = [card["text"].split("\n")[0] for card in shown]
    order = np.argsort(run.dispersion["rank_mean"].to_numpy())
    expected_low = [f"rank {i + 1} · {run.stimuli['id'].iloc[r]}" for i, r in enumerate(order[:5])]
    assert labels[:5] == expected_low
    # the correlation of the two scores, computed independently
    mean, pc1 = run.dispersion["mean"].to_numpy(), run.dispersion["pc1"].to_numpy()
    r = np.corrcoef(mean, pc1)[0, 1]
    line = next(t.value for t in at.text if t.value.startswith("The two scores correlate"))
    assert f"Pearson r = {r:.3f}" in line
    from scipy.stats import spearmanr

    assert f"Spearman ρ = {spearmanr(mean, pc1).statistic:.3f}" in line


def test_two_gpa_models_say_why_the_scores_agree(tmp_path, monkeypatch) -> None:
    """With two GPA models both residuals of a stimulus are equal, so PC1 is the mean residual
    (r = 1): Home says so, where it would otherwise read as a finding."""
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", n=40, name="demo", images=False,
                             thumbnails=False, vision_models=("vision-a", "vision-b"))
    residuals = np.asarray(run.gpa.residuals)
    np.testing.assert_allclose(residuals[:, 0], residuals[:, 1], rtol=1e-9)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _app().run(timeout=TIMEOUT)
    line = next(t.value for t in at.text if t.value.startswith("The two scores correlate"))
    from convergence_core.dispersion import two_model_note

    assert "Pearson r = 1.000" in line and two_model_note(2) in line


def test_a_gpa_stopped_at_its_uncertainty_says_so(tmp_path, monkeypatch) -> None:
    """A run precomputed with gpa_stop="uncertainty": Home says where GPA stopped and that its
    loss is not the optimum's, beside the stability sentence (a default run's Home says nothing
    of it: test_home_cards_histogram_and_previews)."""
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", n=40, name="demo", images=False,
                             thumbnails=False, gpa_stop="uncertainty")
    assert run.gpa_stop is not None
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _app().run(timeout=TIMEOUT)
    assert not at.exception
    notes = [box.value for box in at.info]
    assert notes == [run.gpa_stop.describe()] and "gpa_stop" in notes[0]
    assert any(t.value.startswith("GPA stability (4 random starts") for t in at.text)


def test_home_defaults_to_the_demo_run_and_can_switch(synthetic_cache: Path) -> None:
    at = _app().run(timeout=TIMEOUT)
    run_box = at.sidebar.selectbox[0]
    assert run_box.value == "demo"
    assert set(run_box.options) == {"demo", "other"}
    assert at.query_params["run"] == "demo"
    run_box.set_value("other").run(timeout=TIMEOUT)
    assert not at.exception
    assert _metric(at, "Stimuli") == "40"
    assert at.query_params["run"] == "other"


def test_query_params_start_the_view(synthetic_cache: Path) -> None:
    at = _app()
    at.query_params["run"] = "other"
    at.query_params["score"] = "pc1"
    at.run(timeout=TIMEOUT)
    assert at.sidebar.selectbox[0].value == "other"
    assert any("PC1 score" in s.value for s in at.subheader)
    assert not at.warning


def test_invalid_query_params_warn_and_fall_back(synthetic_cache: Path) -> None:
    at = _app()
    at.query_params["run"] = "missing"
    at.query_params["k"] = "many"
    at.run(timeout=TIMEOUT)
    assert not at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "not a cached run" in warnings and "whole number" in warnings
    assert at.sidebar.selectbox[0].value == "demo"
    assert at.query_params["k"] == "10"


def test_a_link_to_a_run_still_being_written_says_so(tmp_path, monkeypatch) -> None:
    """A run whose precompute has not finished is not listed; a link to it said "not a cached
    run", which reads as a typo. It now says the run is not finished and how to finish it."""
    import json

    from tests.fixtures_runs import make_synthetic_run

    make_synthetic_run(tmp_path / "runs", n=30, name="demo", images=False, thumbnails=False)
    half = make_synthetic_run(tmp_path / "runs", n=30, name="half", images=False,
                              thumbnails=False)
    manifest = half.path / "manifest.json"
    record = json.loads(manifest.read_text())
    record["complete"] = False  # as a precompute leaves it until its last step
    manifest.write_text(json.dumps(record))
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _app()
    at.query_params["run"] = "half"
    at.run(timeout=TIMEOUT)
    assert not at.exception
    assert [w.value for w in at.warning] == [
        "Run 'half' is not finished: its precompute is still running or stopped before the end "
        "(run the same precompute command again to finish it; then reload this page); showing "
        "the default run."
    ]
    assert at.sidebar.text[0].value == "Run: demo"  # the only complete run


def test_cached_run_is_reloaded_when_its_manifest_changes(synthetic_cache: Path) -> None:
    path = synthetic_cache / "runs" / "demo"
    first = data.open_run(path)
    assert data.open_run(path) is first
    manifest = path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns + 10_000_000
    os.utime(manifest, ns=(stamp, stamp))
    assert data.open_run(path) is not first


#: Every page after Home (the one list of pages)
MY_PAGES = tuple(entry.file for entry in page.PAGES)


def test_pages_never_load_a_model_run_gpa_or_mutate_the_shared_run(
    synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # imported before patching: a module importing the name while it is patched would keep the fake
    import convergence_core.analyses as analyses
    import convergence_core.models.registry as registry
    import convergence_core.procrustes as procrustes

    def forbidden(*args, **kwargs):
        raise AssertionError("a dashboard page must not load a model or run GPA on a rerun")

    for module in (procrustes, analyses):
        monkeypatch.setattr(module, "generalized_procrustes", forbidden)
    monkeypatch.setattr(registry, "load_encoder", forbidden)
    shared = data.open_run(synthetic_cache / "runs" / "demo")
    stimuli, dispersion = shared.stimuli.copy(deep=True), shared.dispersion.copy(deep=True)
    residuals = np.array(shared.gpa.residuals, copy=True)

    at = _app().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    for target in MY_PAGES:
        at.switch_page(target).run(timeout=TIMEOUT)
        assert not at.exception, (target, at.exception)
    assert data.open_run(synthetic_cache / "runs" / "demo") is shared
    assert shared.stimuli.equals(stimuli) and shared.dispersion.equals(dispersion)
    np.testing.assert_array_equal(shared.gpa.residuals, residuals)


def test_view_survives_page_switches(synthetic_cache: Path) -> None:
    at = _app()
    at.query_params["score"] = "pc1"
    at.query_params["k"] = "6"
    at.run(timeout=TIMEOUT)
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["score"]["value"] == "pc1"
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    shown = controls_shown(at)
    assert shown["score"]["value"] == "pc1" and shown["k"]["value"] == 6
    change_control(at, "k", 4)
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    assert at.query_params["k"] == "4" and at.query_params["score"] == "pc1"


def test_the_labs_k_and_the_paper_pages_k_are_one_number(synthetic_cache: Path) -> None:
    """The lab's k (a native slider: ``controls.bounded_value``) and the Paper page's (a number
    box: ``state.bind_bounded_int``) are the view's one k. A k one page lowers for its small
    sets is the other page's k still, and a k the user moved to is never replaced by an older
    one (the lab had written its lowered k where the Paper page reads it, and left the Paper
    page's note of an older lowering behind)."""
    from convergence_core.run import load_run

    ids = list(load_run(synthetic_cache / "runs" / "demo").stimuli["id"])
    at = _app()
    at.query_params["run"] = "demo"
    at.query_params["k"] = "9"
    at.run(timeout=TIMEOUT)
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["k"]["value"] == 9
    change_control(at, "source", "pasted")
    at.text_area(key="w_pasted_ids").input(" ".join(ids[:5])).run(timeout=TIMEOUT)
    assert controls_shown(at)["k"]["value"] == 4 and at.query_params["k"] == "9"
    at.switch_page("pages/4_Paper_analyses.py").run(timeout=TIMEOUT)
    assert at.number_input(key="w_k").value == 9  # its sets of 15 allow 9
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    change_control(at, "source", "low")
    assert controls_shown(at)["k"]["value"] == 9

    at = _app()
    at.query_params["run"] = "demo"
    at.query_params["k"] = "40"
    at.query_params["size"] = "6"
    at.run(timeout=TIMEOUT)
    at.switch_page("pages/4_Paper_analyses.py").run(timeout=TIMEOUT)
    assert at.number_input(key="w_k").value == 5  # lowered for sets of 6
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    change_control(at, "size", 30)
    assert controls_shown(at)["k"]["value"] == 29  # the 40 asked for, as far as sets of 30 allow
    change_control(at, "k", 5)  # the user's own k
    at.switch_page("pages/4_Paper_analyses.py").run(timeout=TIMEOUT)
    assert at.number_input(key="w_k").value == 5 and at.query_params["k"] == "5"
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["k"]["value"] == 5


def test_a_score_chosen_on_the_stimuli_page_is_every_pages_score(synthetic_cache: Path) -> None:
    """The Stimuli page's and the lab's score are controls drawn by the browser
    (``controls.row``), the other pages' a Streamlit radio: a change on either shows on the other
    and in the URL, both ways."""
    at = _app().run(timeout=TIMEOUT)
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["score"]["value"] == "mean"
    change_control(at, "score", "pc1")
    assert at.query_params["score"] == "pc1"
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    assert at.radio(key="w_score").value == "pc1"
    at.radio(key="w_score").set_value("mean").run(timeout=TIMEOUT)
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["score"]["value"] == "mean"
    change_control(at, "score", "pc1")
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    assert at.radio(key="w_score").value == "pc1"
    at.radio(key="w_score").set_value("mean").run(timeout=TIMEOUT)
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["score"]["value"] == "mean" and at.query_params["score"] == "mean"
    change_control(at, "score", "no such score")  # ignored, as the browser cannot send it
    assert controls_shown(at)["score"]["value"] == "mean"
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    assert at.radio(key="w_score").value == "mean"


def test_switching_runs_keeps_every_page_working(synthetic_cache: Path) -> None:
    """Choices tied to one run (inspected stimulus, models, layers) must not break another run."""
    from convergence_core.run import load_run

    other_ids = set(load_run(synthetic_cache / "runs" / "other").stimuli["id"])
    at = _app().run(timeout=TIMEOUT)
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    inspected = next(i for i in at.selectbox(key="w_inspect").options if i not in other_ids)
    at.selectbox(key="w_inspect").set_value(inspected).run(timeout=TIMEOUT)
    at.radio(key="w_neighbour_model").set_value("language-b").run(timeout=TIMEOUT)
    at.sidebar.selectbox[0].set_value("other").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert at.selectbox(key="w_inspect").value in other_ids
    assert at.radio(key="w_neighbour_model").value == "vision-x"

    at.sidebar.selectbox[0].set_value("demo").run(timeout=TIMEOUT)
    at.session_state["w_lab_layers"] = True  # the sidebar's layer choices
    at.session_state["w_lab_tables"] = True  # the table of every number
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    change_control(at, "vision", ["vision-b"])
    at.selectbox(key="w_layer_language-a").set_value("layer0").run(timeout=TIMEOUT)
    at.sidebar.selectbox[0].set_value("other").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    table = at.dataframe[-1].value
    assert set(table["vision_model"]) == {"vision-x", "vision-y", "vision-z"}  # back to all models
    assert set(table["language_model"]) == {"language-z"}
    assert set(table["set_size"]) == {15}  # the size chosen on demo is still valid for 40 stimuli

    # Universal space: its barycenter's models chosen on demo are none of other's; switching
    # used to leave the choice empty and the page showed only "pick at least two models"
    at.sidebar.selectbox[0].set_value("demo").run(timeout=TIMEOUT)
    at.switch_page("pages/6_Universal_space.py").run(timeout=TIMEOUT)
    assert not at.error, [e.value for e in at.error]
    at.sidebar.selectbox[0].set_value("other").run(timeout=TIMEOUT)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert set(at.session_state["w_universal_models"]) == {
        "vision-x", "vision-y", "vision-z", "language-z"
    }


def test_each_pages_choices_survive_visits_to_other_pages(synthetic_cache: Path) -> None:
    """Streamlit forgets a widget that a rerun does not draw: the lab's models and metric, the
    gallery's order and filter, the map's projection and the barycenter's models were reset by
    a visit to another page, and the lab's numbers changed with no notice."""
    at = _app().run(timeout=TIMEOUT)
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    change_control(at, "vision", ["vision-b"])
    change_control(at, "metric", "mutual_knn")
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    change_control(at, "order", "knn_overlap")
    change_control(at, "filter", "a")
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    at.radio(key="w_projection").set_value("UMAP").run(timeout=TIMEOUT)
    at.switch_page("pages/6_Universal_space.py").run(timeout=TIMEOUT)
    at.button_group(key="w_universal_models").set_value(["vision-a", "language-a"])
    at.run(timeout=TIMEOUT)

    for target in ("app.py", "pages/3_Alignment_lab.py", "pages/1_Stimuli.py",
                   "pages/2_Residual_space.py", "pages/6_Universal_space.py"):
        at.switch_page(target).run(timeout=TIMEOUT)
        assert not at.exception, (target, at.exception)
    assert at.button_group(key="w_universal_models").value == ["vision-a", "language-a"]
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["vision"]["value"] == ["vision-b"]
    assert controls_shown(at)["metric"]["value"] == "mutual_knn"
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    assert controls_shown(at)["order"]["value"] == "knn_overlap"
    assert controls_shown(at)["filter"]["value"] == "a"
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    assert at.radio(key="w_projection").value == "UMAP"
    assert not at.warning, [w.value for w in at.warning]


def test_home_links_to_every_page_with_the_view_in_the_url(synthetic_cache: Path) -> None:
    at = _app()
    at.query_params["score"] = "pc1"
    at.run(timeout=TIMEOUT)
    from convergence_core.dashboard.page import PAGES

    links = at.get("page_link")
    assert [link.proto.label for link in links] == [entry.label for entry in PAGES]
    assert {"Stimuli gallery", "Residual space", "Alignment lab", "Paper analyses",
            "What predicts dispersion", "Universal space"} <= {link.proto.label for link in links}
    assert all((REPO / entry.file).is_file() for entry in PAGES)
    for link in links:
        assert "run=demo" in link.proto.query_string and "score=pc1" in link.proto.query_string


def test_page_urls_are_streamlits_and_cover_every_page_file() -> None:
    """The one list of pages names every file in pages/, and each URL path is the one Streamlit
    serves it at (its own name for the file), so the browser test and benchmark visit them all."""
    from streamlit.source_util import page_icon_and_name

    from convergence_core.dashboard.page import PAGE_URLS, PAGES, url_path

    assert sorted(entry.file for entry in PAGES) == sorted(
        str(path.relative_to(REPO)) for path in (REPO / "pages").glob("*.py")
    )
    for target in (entry.file for entry in PAGES):
        assert url_path(target) == page_icon_and_name(REPO / target)[1]
    assert PAGE_URLS[0] == ("Home", "") and len(PAGE_URLS) == len(PAGES) + 1
    assert url_path("pages/12_Two_words.py") == "Two_words"


def test_the_navigation_is_home_then_the_one_list_of_pages(monkeypatch) -> None:
    """app.py's sidebar: Home (home.py, so the sidebar says "Home", not "app"), then every entry
    of page.PAGES with its label and icon, in that order; every file is there."""
    from convergence_core.dashboard import page

    made = []
    monkeypatch.setattr(page.st, "Page", lambda target, **options: made.append((target, options)))
    page.navigation_pages()
    assert [(target, options["title"]) for target, options in made] == [
        (page.HOME, "Home"), *((entry.file, entry.label) for entry in page.PAGES)
    ]
    assert made[0][1]["default"] and all(options.get("icon") for _, options in made)
    assert all((REPO / target).is_file() for target, _ in made)
    assert "st.navigation(page.navigation_pages())" in (REPO / "app.py").read_text()


def test_each_page_is_titled_by_its_entry_in_the_one_list_of_pages(
    synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's title and browser tab say what the sidebar calls it (page.PAGES): the Stimuli
    page was "Stimuli" in the tab and on the page but "Stimuli gallery" in the sidebar."""
    configs: list[dict] = []
    real = page.st.set_page_config
    monkeypatch.setattr(page.st, "set_page_config",
                        lambda **options: configs.append(options) or real(**options))
    at = _app().run(timeout=TIMEOUT)
    assert at.title[0].value == page.APP_TITLE
    assert (configs[-1]["page_title"], configs[-1]["page_icon"]) == (page.APP_TITLE, page.APP_ICON)
    assert len({entry.tab_icon for entry in page.PAGES} | {page.APP_ICON}) == len(page.PAGES) + 1
    for entry in page.PAGES:
        at.switch_page(entry.file).run(timeout=TIMEOUT)
        assert not at.exception, (entry.file, at.exception)
        assert at.title[0].value == entry.label, entry.file
        assert configs[-1]["page_title"] == f"{entry.label} · {page.APP_TITLE}", entry.file
        assert configs[-1]["page_icon"] == entry.tab_icon, entry.file
    with pytest.raises(ValueError, match="unknown page file 'pages/9_Nope.py'"):
        page.page_heading("pages/9_Nope.py")


def test_damaged_run_is_an_error_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", n=20, name="demo", thumbnails=False)
    (run.path / "dispersion.parquet").write_bytes(b"not a parquet file")
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _app().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    message = " ".join(e.value for e in at.error)
    assert "cannot be opened" in message and "rerun precompute" in message


def test_page_switches_and_new_sessions_reuse_what_the_server_has(
    synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-run lookups (ids, caption search text, rank orders) and the pictures are made once per
    server, not per page, rerun or session."""
    from convergence_core.dashboard import catalogue, charts

    builds: list[str] = []
    histograms: list[int] = []
    real_build, real_histograms = catalogue.build_catalogue, charts.dispersion_histograms
    monkeypatch.setattr(
        data, "build_catalogue", lambda run: builds.append(run.name) or real_build(run)
    )
    monkeypatch.setattr(
        charts,
        "dispersion_histograms",
        lambda *args, **kwargs: histograms.append(1) or real_histograms(*args, **kwargs),
    )
    data._catalogue.clear()
    data.dispersion_histograms_png.clear()
    for _ in range(2):  # two sessions
        at = _app().run(timeout=TIMEOUT)
        for target in MY_PAGES:
            at.switch_page(target).run(timeout=TIMEOUT)
            assert not at.exception, (target, at.exception)
        at.switch_page("app.py").run(timeout=TIMEOUT)
    assert builds == ["demo"]
    assert histograms == [1]


def test_serve_opens_the_default_run_before_the_first_visit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve's background warm-up opens, checks and indexes the default run, draws Home's
    histograms, finds its best language layers, computes the Paper page's default Fig. 2 and runs
    its property tests in the server's caches: the first pages compute none of it again."""
    from convergence_core import analyses, universal
    from convergence_core.dashboard import charts, predictors, serve
    from tests.fixtures_runs import make_synthetic_run

    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    monkeypatch.setattr(serve, "WARM_DELAY_S", 0.0)
    assert data.warm_default_run() is None  # no run yet: nothing to open
    serve._warm_default_run()  # and the warm-up says so in its last line
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(serve.WARM_DONE) and "no run to warm up" in last
    # sets of 11 stimuli: the Paper page's Fig. 2 keeps k = 10, the best layers' k
    make_synthetic_run(tmp_path / "runs", n=44, name="demo")
    calls = {"load_run": 0, "best_language_layers": 0, "layer_sweep": 0, "property_tests": 0,
             "cross_modal": 0, "fig2": 0, "fig2_png": 0, "histograms": 0}

    def counted(name, function):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(data, "load_run", counted("load_run", data.load_run))
    monkeypatch.setattr(
        analyses, "best_language_layers",
        counted("best_language_layers", analyses.best_language_layers),
    )
    monkeypatch.setattr(analyses, "layer_sweep", counted("layer_sweep", analyses.layer_sweep))
    monkeypatch.setattr(
        predictors.dp, "property_tests", counted("property_tests", predictors.dp.property_tests)
    )
    monkeypatch.setattr(
        universal, "run_cross_modal_analysis",
        counted("cross_modal", universal.run_cross_modal_analysis),
    )
    monkeypatch.setattr(
        analyses, "dispersion_set_alignment",
        counted("fig2", analyses.dispersion_set_alignment),
    )
    monkeypatch.setattr(charts, "paper_figure", counted("fig2_png", charts.paper_figure))
    monkeypatch.setattr(
        charts, "dispersion_histograms", counted("histograms", charts.dispersion_histograms)
    )
    # one layer sweep per run and k: the Paper analyses page's Fig. 2 reads the same best layers
    once = {"load_run": 1, "best_language_layers": 1, "layer_sweep": 1, "property_tests": 1,
            "cross_modal": 1, "fig2": 1, "fig2_png": 1, "histograms": 1}
    try:
        serve._warm_default_run()  # what the server's thread runs
        err = capsys.readouterr().err
        assert "run 'demo' opened and checked" in err and "property tests ready" in err
        assert "cross-modal dispersion ready" in err and "Fig. 2 ready" in err
        assert err.strip().splitlines()[-1].startswith(serve.WARM_DONE)  # said last
        assert calls == once
        pages = ("app.py", "pages/1_Stimuli.py", "pages/3_Alignment_lab.py",
                 "pages/4_Paper_analyses.py", "pages/5_What_predicts_dispersion.py",
                 "pages/6_Universal_space.py")
        for target in pages:
            at = AppTest.from_file(str(REPO / target), default_timeout=TIMEOUT)
            at.query_params["run"] = "demo"
            at.run(timeout=TIMEOUT)
            assert not at.exception, at.exception
        assert calls == once, calls  # all found in the caches
        paper = AppTest.from_file(str(REPO / "pages/4_Paper_analyses.py"),
                                  default_timeout=TIMEOUT)
        paper.query_params["run"] = "demo"
        paper.run(timeout=TIMEOUT)
        assert len(paper.image) == 1  # its first tab drew Fig. 2, from the warm-up's sets
        assert calls == once, calls
        # the Paper analyses page's best layers and layer sweep at the same k: the same entries
        run = data.load_run("demo")
        path, stamp = str(run.path), data.manifest_stamp(run.path)
        data.best_layers_table(path, stamp, 10)
        data.layer_sweep(path, stamp, 10)
        assert calls == {**once, "load_run": 2}, calls

        # a damaged default run: the warm-up says so and returns; the page shows it in words
        (tmp_path / "runs" / "demo" / "dispersion.parquet").write_bytes(b"not a parquet file")
        os.utime(tmp_path / "runs" / "demo" / "manifest.json")  # a new version of the run
        serve._warm_default_run()
        err = capsys.readouterr().err
        assert "could not be opened" in err
        assert err.strip().splitlines()[-1].startswith(serve.WARM_DONE)  # said last, still
    finally:
        for cached in (data._open_run, data._catalogue, data._best_language_layer_table,
                       data.layer_sweep, data.cross_modal, data.cross_modal_pictures,
                       data.dispersion_sets, data.paper_figure_png,
                       data.dispersion_histograms_png):
            cached.clear()


def test_a_failing_warm_up_step_leaves_the_others_and_the_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One step that raises is said and skipped; the steps after it still run, and the last
    line (serve.WARM_DONE, which a presenter or the benchmark waits for) names it."""
    from convergence_core.dashboard import serve
    from tests.fixtures_runs import make_synthetic_run

    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    monkeypatch.setattr(serve, "WARM_DELAY_S", 0.0)
    make_synthetic_run(tmp_path / "runs", n=44, name="demo")

    def broken(run):  # noqa: ANN001, ANN202
        raise RuntimeError("planted failure")

    monkeypatch.setattr(data, "default_dispersion_sets", broken)
    try:
        serve._warm_default_run()
    finally:
        for cached in (data._open_run, data._catalogue, data._best_language_layer_table,
                       data.layer_sweep, data.cross_modal, data.cross_modal_pictures):
            cached.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert "convergence serve: Fig. 2 failed: planted failure" in lines
    assert any(line.startswith("convergence serve: property tests ready") for line in lines)
    assert any(line.startswith("convergence serve: cross-modal dispersion ready") for line in lines)
    assert lines[-1].startswith(serve.WARM_DONE) and "but for Fig. 2" in lines[-1]


def test_paper_pages_first_screen_is_warmed_only_where_the_page_computes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.default_dispersion_sets is the Paper page's default Fig. 2 (set size a quarter of
    the run, k = 10 lowered to fit, the first pairing), and None where the page waits for a
    button instead: more stimuli than PAPER_AUTO_COMPUTE_STIMULI, or set size × k above
    PAPER_AUTO_COMPUTE_SET_WORK."""
    from convergence_core import analyses
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", n=40, name="demo")
    assert data.default_dispersion_sets(run) == {
        "size": 10, "k": 9, "score": "mean", "n_random": data.PAPER_RANDOM_SETS,
        "n_permutations": analyses.DEFAULT_N_PERMUTATIONS, "seed": 0, "partners": "language",
    }
    monkeypatch.setattr(data, "PAPER_AUTO_COMPUTE_SET_WORK", 89)  # 10 × 9 = 90 waits
    assert data.default_dispersion_sets(run) is None
    monkeypatch.setattr(data, "PAPER_AUTO_COMPUTE_SET_WORK", 90)
    assert data.default_dispersion_sets(run) is not None
    monkeypatch.setattr(data, "PAPER_AUTO_COMPUTE_STIMULI", 39)
    assert data.default_dispersion_sets(run) is None


def test_home_warns_when_gpa_took_the_first_of_several_given_layers(tmp_path, monkeypatch):
    """Arrays with every layer and no layer named: GPA ran at each model's first layer (its
    input end), which Home says above everything built on it."""
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import synthetic_embeddings

    embeddings, _ = synthetic_embeddings(30, seed=3)
    vision = [m for m in embeddings if m.startswith("vision")]
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(30)],
                            "image": [f"{i}.jpg" for i in range(30)],
                            "captions": [[f"caption {i}"] for i in range(30)]})
    run = write_run_from_embeddings(
        tmp_path / "runs" / "demo", stimuli, embeddings, vision_models=vision,
        language_models=[m for m in embeddings if m not in vision], thumbnails=False,
    )
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _app().run(timeout=TIMEOUT)
    assert not at.exception
    assert shown(at.warning) == [" ".join(run.first_layer_note().split())]  # shown as text
