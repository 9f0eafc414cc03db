"""The Universal-space page renders on a synthetic run, shows the core's numbers, follows the
model choice, and marks each image's true caption among its retrieved captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from convergence_core import retrieval, universal
from convergence_core.dashboard.catalogue import p_text
from tests.fixtures_runs import make_synthetic_run
from tests.page_reading import cards, gallery_cards, gallery_texts, shown

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "6_Universal_space.py")
TIMEOUT = 120
TAB_KEY = "w_universal_tab"
TABLE_KEY = "w_universal_table_open"
ENDS_KEY = "w_universal_ends_open"
INTERACTIVE_KEY = "w_universal_interactive"


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("universal_page_cache")
    make_synthetic_run(root / "runs", 60, name="demo")  # the first 60 coco-mini images
    return root


def _page(monkeypatch: pytest.MonkeyPatch, cache_root: Path) -> AppTest:
    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache_root))
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def _metric(at: AppTest, label: str) -> str:
    return cards(at)[label]


def _open_tab(at: AppTest, label: str) -> None:
    at.session_state[TAB_KEY] = label
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception


def test_page_shows_dispersion_retrieval_and_top_captions(monkeypatch, cache_root):
    at = _page(monkeypatch, cache_root)
    assert [tab.label for tab in at.tabs] == [
        "Cross-modal dispersion",
        "Retrieval",
        "Top captions per image",
    ]
    # the layers taken are said: default layers here, best language layers on the other pages
    assert any("default layer" in c.value and "best layer against the GPA models" in c.value
               for c in at.caption)
    # only the open tab is built (no retrieval yet); its scatter and residual bars are pictures
    # until the toggle asks for Plotly; the table of every stimulus comes when its expander opens
    assert not at.get("plotly_chart") and len(at.image) >= 2 and not at.dataframe
    at.toggle(key=INTERACTIVE_KEY).set_value(True)
    at.run(timeout=TIMEOUT)
    (chart,) = at.get("plotly_chart")
    points = json.loads(chart.proto.spec)["data"][0]
    assert len(points["text"]) == 60 and points["text"][0].startswith("id ")  # id and caption
    _open_tab(at, "Retrieval")  # the toggle is not drawn meanwhile; back, it is still on
    _open_tab(at, "Cross-modal dispersion")
    assert at.toggle(key=INTERACTIVE_KEY).value and len(at.get("plotly_chart")) == 1
    at.session_state[TABLE_KEY] = True
    at.run(timeout=TIMEOUT)
    every = at.dataframe[0].value
    assert len(every) == 60 and "caption" in every.columns
    # two residuals that cannot be taken for each other: the run's GPA dispersion and the
    # residual from the universal consensus; the data (the CSV download) keeps machine names
    labels = {name: c.get("label") for name, c in json.loads(at.dataframe[0].proto.columns).items()}
    assert labels["intra_modal_dispersion"] == "vision dispersion (mean residual of the run's GPA)"
    assert labels["mean_residual"].startswith("universal-space residual (mean over its")
    assert {"intra_modal_dispersion", "mean_residual"} <= set(every.columns)
    run = make_run_handle(cache_root)
    expected = universal.run_cross_modal_analysis(run, n_permutations=1000, seed=0)
    # the stimuli at both ends: no pictures until their expander is opened, then the 6 lowest
    # and 6 highest cross-modal dispersions, each labelled with its id and value
    assert not gallery_cards(at)
    at.session_state[ENDS_KEY] = True
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert len(gallery_cards(at)) == 12 and all(c["image"] for c in gallery_cards(at))
    frame = expected.per_stimulus().sort_values(["cross_modal_dispersion", "stimulus"])
    ids = run.stimuli["id"].astype(str)
    wanted = [
        f"id {ids.iloc[row]} · cross-modal {value:.4f}"  # the number says what it is
        for row, value in zip(frame["stimulus"], frame["cross_modal_dispersion"], strict=True)
    ]
    shown = [text.split("\n")[0] for text in gallery_texts(at)]
    assert shown == wanted[:6] + wanted[::-1][:6]
    relation = expected.relation.iloc[0]
    assert _metric(at, "ρ with vision dispersion") == f"{relation['spearman_rho']:.3f}"
    # one p-value format (catalogue.p_text): at the floor 1/(1000 + 1) "< 0.001", as in the
    # chart's title, never "0.000999"
    p_value = p_text(relation["permutation_p_value_two_sided"], relation["n_permutations"])
    assert _metric(at, "Permutation p") == p_value.replace("\u00a0", " ")
    assert relation["permutation_p_value_two_sided"] > 1 / 1001 or p_value == "<\u00a00.001"
    # the retrieval table puts the baseline beside the universal space, as the core computes it
    _open_tab(at, "Retrieval")
    assert len(at.get("plotly_chart")) == 1
    comparison = next(frame.value for frame in at.dataframe if "ridge" in frame.value.columns)
    wanted = retrieval.comparison_table(retrieval.run_retrieval(run).summary())
    assert (
        comparison[["universal", "ridge", "chance"]]
        .round(12)
        .equals(wanted[["universal", "ridge", "chance"]].round(12))
    )
    # top captions of the first image: its true caption is marked exactly once
    _open_tab(at, "Top captions per image")
    top = next(
        frame.value
        for frame in at.dataframe
        if "caption" in frame.value.columns and "true_match" in frame.value.columns
    )
    marked = top[top["true_match"] == "✓"]
    assert len(marked) == 1 and marked["id"].iloc[0] == run.stimuli["id"].iloc[0]
    assert marked["caption"].iloc[0] == run.stimuli["captions"].iloc[0][0]
    # captions are plain text, never Markdown
    first_caption = run.stimuli["captions"].iloc[0][0]
    assert any(first_caption in t.value for t in at.text)
    assert not any(first_caption in m.value for m in at.markdown)


def make_run_handle(cache_root: Path):
    from convergence_core.run import load_run

    return load_run(cache_root / "runs" / "demo")


def test_choosing_models_and_an_image_updates_the_page(monkeypatch, cache_root):
    at = _page(monkeypatch, cache_root)
    models = at.button_group(key="w_universal_models")
    models.set_value(["vision-a", "vision-b"]).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert "at least two modalities" in at.error[0].value

    at.button_group(key="w_universal_models").set_value(["vision-a", "language-a"]).run(
        timeout=TIMEOUT
    )
    assert not at.exception, at.exception
    run = make_run_handle(cache_root)
    expected = universal.run_cross_modal_analysis(
        run, ["vision-a", "language-a"], n_permutations=1000
    )
    rho = expected.relation.iloc[0]["spearman_rho"]
    assert _metric(at, "ρ with vision dispersion") == f"{rho:.3f}"

    chosen = run.stimuli["id"].iloc[7]
    _open_tab(at, "Top captions per image")
    at.selectbox(key="w_universal_image").set_value(chosen).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    top = next(frame.value for frame in at.dataframe if "true_match" in frame.value.columns)
    assert top.loc[top["true_match"] == "✓", "id"].tolist() == [chosen]
    assert any(t.value.startswith("True caption: rank ") for t in at.text)


def test_page_without_runs_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.run(timeout=TIMEOUT)
    assert not at.exception
    assert "make demo" in at.error[0].value


def test_large_runs_send_numbers_not_captions_to_the_interactive_chart(monkeypatch, cache_root):
    """Above plots.HOVER_TEXT_LIMIT stimuli the interactive scatter carries no text per point."""
    from convergence_core.dashboard import plots

    monkeypatch.setattr(plots, "HOVER_TEXT_LIMIT", 10)
    at = _page(monkeypatch, cache_root)
    assert not at.get("plotly_chart")
    at.toggle(key=INTERACTIVE_KEY).set_value(True)
    at.run(timeout=TIMEOUT)
    (chart,) = at.get("plotly_chart")
    points = json.loads(chart.proto.spec)["data"][0]
    assert "text" not in points and "intra %{x" in points["hovertemplate"]
    assert _metric(at, "ρ with vision dispersion")


def test_large_runs_ask_before_the_minutes_of_gpa_and_retrieval(monkeypatch, tmp_path):
    """Above AUTO_COMPUTE_STIMULI the universal space and the retrieval wait for their buttons
    (a 10,000-stimulus run kept the page blank for 7 minutes); once computed they show at once,
    in every session."""
    from convergence_core.dashboard import data

    make_synthetic_run(tmp_path / "runs", 40, name="demo", images=False, thumbnails=False)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    source = Path(PAGE).read_text().replace("AUTO_COMPUTE_STIMULI = 5_000",
                                            "AUTO_COMPUTE_STIMULI = 10")
    data._finished().clear()
    at = AppTest.from_string(source, default_timeout=TIMEOUT).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert not cards(at) and any("can take minutes here" in i.value for i in at.info)
    at.button(key="compute-universal").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert _metric(at, "ρ with vision dispersion")
    at.session_state[TAB_KEY] = "Retrieval"
    at.run(timeout=TIMEOUT)
    assert not at.dataframe and any("Held-out retrieval of" in i.value for i in at.info)
    at.button(key="compute-retrieval").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert at.dataframe
    again = AppTest.from_string(source, default_timeout=TIMEOUT).run(timeout=TIMEOUT)
    assert _metric(again, "ρ with vision dispersion") and not again.info


def test_a_run_too_small_for_the_folds_says_so_in_both_retrieval_tabs(monkeypatch, tmp_path):
    """12 stimuli in 5 folds: the Top captions tab raised the retrieval's ValueError as an
    exception; both tabs now show it as a warning with the fix (a limit of the run, not a
    fault), and the dispersion tab works."""
    make_synthetic_run(tmp_path / "runs", 12, name="demo", images=False, thumbnails=False)
    at = _page(monkeypatch, tmp_path)
    assert "ρ with vision dispersion" in cards(at)
    for tab in ("Retrieval", "Top captions per image"):
        _open_tab(at, tab)
        assert shown(at.warning) == [  # the message as text (it may name models)
            "12 stimuli in 5 folds leave 2 held-out stimuli per fold; at least 6 are needed (a "
            "third of them per subset): use at most 2 folds, or more stimuli"
        ], tab
        assert not at.error


def test_a_run_without_language_models_says_retrieval_is_not_possible(monkeypatch, tmp_path):
    """Vision models and a brain subject, no language model: the retrieval tabs say the run has
    none (they used to ask for one in the sidebar, which cannot offer it)."""
    from tests.fixtures_runs import make_brain_run

    make_brain_run(tmp_path / "runs" / "demo", n=30)
    at = _page(monkeypatch, tmp_path)
    for tab in ("Retrieval", "Top captions per image"):
        _open_tab(at, tab)
        assert [i.value for i in at.info] == [
            "Image–text retrieval needs a vision and a language model; this run has no language "
            "model."
        ], tab


def test_a_run_without_images_or_captions_is_not_described_by_them(monkeypatch, tmp_path):
    """A run from feature files alone: the page speaks of representations, the Top captions tab
    asks for a stimulus id and names matches by id (it showed "Image (stimulus id)", "(no
    caption)" and an empty caption column)."""
    from convergence_core.run import Run

    make_synthetic_run(tmp_path / "runs", 30, name="demo", images=False, thumbnails=False)
    monkeypatch.setattr(Run, "has_captions", property(lambda self: False))
    at = _page(monkeypatch, tmp_path)
    assert any("vision and language representations land apart" in c.value for c in at.caption)
    assert not any("image and caption" in c.value for c in at.caption)
    _open_tab(at, "Top captions per image")
    assert "Stimulus id" in [box.label for box in at.selectbox]
    assert "Image (stimulus id)" not in [box.label for box in at.selectbox]
    assert any("no caption text in this run" in t.value for t in at.text)
    assert "caption" not in at.dataframe[0].value.columns


def test_model_names_are_shown_as_text_not_markdown(monkeypatch, tmp_path):
    """Model names come from feature files or a shared run; in widget labels and help texts
    (both render Markdown) they are escaped, so an image link or emphasis in a name stays text
    (from the reliability audit: this page showed them raw)."""
    from convergence_core.dashboard.widgets import escape_markdown

    names = ("![i](//evil.example/p.png)", "**bold** <b>x</b>", "plain-c")
    make_synthetic_run(tmp_path / "runs", 30, name="demo", images=False, thumbnails=False,
                       vision_models=names, language_models=("$$x$$", "lang-b"))
    at = _page(monkeypatch, tmp_path)
    labels = [box.label for box in at.selectbox]
    for name in (*names, "$$x$$", "lang-b"):
        assert escape_markdown(name) in labels
    assert "![i](//evil.example/p.png)" not in labels and "**bold** <b>x</b>" not in labels
    helps = " ".join(str(widget.help) for widget in at.radio)
    assert escape_markdown(names[0]) in helps and "![i](" not in helps
