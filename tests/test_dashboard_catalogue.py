"""Per-run lookups (dashboard/catalogue.py), text tables and server-drawn figures (charts.py)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convergence_core import stats
from convergence_core.dashboard import charts, lab, widgets
from convergence_core.dashboard.catalogue import build_catalogue, components_table, models_table


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures_runs import make_synthetic_run

    return make_synthetic_run(Path(tmp_path_factory.mktemp("runs")), n=40, thumbnails=False)


def test_catalogue_matches_the_run(run) -> None:
    found = build_catalogue(run)
    ids = run.stimuli["id"].astype(str).tolist()
    assert list(found.ids) == ids and found.n == run.n_stimuli
    assert all(found.position[identifier] == row for row, identifier in enumerate(ids))
    for score in ("mean", "pc1"):
        values = run.dispersion[score].to_numpy()
        np.testing.assert_array_equal(found.order[score], np.argsort(values, kind="stable"))
        np.testing.assert_array_equal(found.values[score], values)
        assert not found.order[score].flags.writeable  # shared by every session
    residuals = np.asarray(run.gpa.residuals)
    np.testing.assert_allclose(found.residual_median, np.median(residuals, axis=0))
    mean, pc1 = run.dispersion["mean"].to_numpy(), run.dispersion["pc1"].to_numpy()
    assert found.pearson == pytest.approx(np.corrcoef(mean, pc1)[0, 1])
    from scipy.stats import spearmanr

    assert found.spearman == pytest.approx(spearmanr(mean, pc1).statistic)


def test_the_scores_correlation_gives_tied_scores_their_average_rank() -> None:
    """Spearman ρ of the two scores as scipy's, ties sharing their average rank: it was the
    correlation of the run's stored ranks, which break ties by stimulus order."""
    from types import SimpleNamespace

    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    mean = rng.integers(0, 4, 30).astype(np.float64)
    pc1 = mean + rng.integers(0, 3, 30)
    dispersion = pd.DataFrame({"mean": mean, "pc1": pc1, "rank_mean": stats.ordinal_ranks(mean),
                               "rank_pc1": stats.ordinal_ranks(pc1)})
    tied = SimpleNamespace(stimuli=pd.DataFrame({"id": [f"s{i}" for i in range(30)]}),
                           dispersion=dispersion, gpa=SimpleNamespace(residuals=np.ones((30, 2))))
    found = build_catalogue(tied)
    assert found.spearman == pytest.approx(spearmanr(mean, pc1).statistic, abs=1e-12)


@pytest.mark.parametrize("query", ["", "0", "no such text"])
def test_a_match_is_the_callers_own_array(run, query) -> None:
    """The Stimuli page narrows the filter's rows to a selection in place: pandas had handed out
    a read-only array, and the page raised "output array is read-only"."""
    found = build_catalogue(run)
    expected = found.matching(query).copy()
    first = found.matching(query)
    assert first.flags.writeable and first.dtype == bool and first.shape == (run.n_stimuli,)
    first &= False  # changes nothing the catalogue (shared by every session) holds
    np.testing.assert_array_equal(found.matching(query), expected)


def test_caption_search_is_literal_and_case_insensitive(run) -> None:
    found = build_catalogue(run)
    captions = run.stimuli["captions"]
    word = captions.iloc[3][0].split()[1].upper()
    expected = [
        word.lower() in " ".join([i, *c]).lower()
        for i, c in zip(run.stimuli["id"], captions, strict=True)
    ]
    np.testing.assert_array_equal(found.matching(f"  {word} "), expected)
    assert found.matching("").all()
    assert not found.matching(".*").any()  # a pattern is text, not a regular expression
    identifier = str(run.stimuli["id"].iloc[5])
    assert found.matching(identifier)[5]


def test_rows_of_keeps_order_and_reports_unknown(run) -> None:
    found = build_catalogue(run)
    ids = [str(run.stimuli["id"].iloc[i]) for i in (7, 2)]
    rows, unknown = found.rows_of([ids[0], "ghost", ids[1]])
    assert list(rows) == [7, 2] and unknown == ["ghost"]


def test_markdown_tables_escape_every_cell_and_cut_long_ones() -> None:
    frame = pd.DataFrame({"model": ["a", "**bold** [x](http://e) <b>|</b> :red[y]"], "k": [3, 12]})
    lines = widgets.markdown_table(frame).splitlines()
    assert lines[0] == "| model | k |" and lines[1] == "| --- | --- |"
    assert lines[2] == "| a | 3 |"
    hostile = lines[3].split(" | ")[0][2:]
    assert hostile == (
        r"\*\*bold\*\* \[x\]\(http\:\/\/e\) \<b\>\|\<\/b\> \:red\[y\]"
    )
    cut = widgets.markdown_table(pd.DataFrame({"x": ["y" * 100]}), max_cell=10).splitlines()[2]
    assert cut == "| " + "y" * 9 + "… |"


def test_table_numbers_have_four_significant_digits() -> None:
    """Floats as a reader wants them (the paired tests once showed 0.33242650528523593 and
    2.813436507387875e-06); integers, text and NaN as they are."""
    cases = {
        0.33242650528523593: "0.3324",
        2.813436507387875e-06: "2.813e-06",
        23.124955816333816: "23.12",
        0.0: "0",
        np.float32(0.5): "0.5",
        120000.0: "120,000",
        12345.6: "1.235e+04",
        float("nan"): "nan",
        7: "7",
        np.int64(239): "239",
        True: "True",
        "0.123456789": "0.123456789",
    }
    for value, text in cases.items():
        assert widgets.number_text(value) == text, value
    frame = pd.DataFrame({"test": ["wilcoxon"], "p_value": [0.03125], "n_pairs": [6]})
    assert widgets.markdown_table(frame).splitlines()[2] == r"| wilcoxon | 0\.03125 | 6 |"


def test_escaped_markdown_renders_as_the_text_itself() -> None:
    """Every ASCII punctuation character is escaped; CommonMark renders an escaped one as itself,
    so removing the escapes gives the text back (checked with a CommonMark renderer if present)."""
    import string

    text = "".join(string.punctuation) + " tail"
    escaped = widgets.escape_markdown(text)
    assert re.sub(r"\\(.)", r"\1", escaped) == text
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").renderInline(escaped)
    import html as html_module

    assert html_module.unescape(html) == text


def _progress_script() -> None:
    from convergence_core.dashboard import widgets

    bar = widgets.ProgressBar("Per-stimulus alignment of [a](http://example.com/a.png)…")
    bar(2.0, "cknna of v*1* × l_[b](http://example.com/l.png)…")


def test_a_progress_text_shows_model_names_as_text() -> None:
    """A progress text renders Markdown; the words of a long computation name models."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_progress_script).run(timeout=30)
    (bar,) = at.get("progress")
    assert bar.proto.value == 100  # the fraction kept within [0, 1]
    assert re.sub(r"\\(.)", r"\1", bar.proto.text) == "cknna of v*1* × l_[b](http://example.com/l.png)…"
    assert "](" not in bar.proto.text


def test_models_and_components_tables(run) -> None:
    table = models_table(run)
    assert list(table["model"]) == run.models
    assert set(table.loc[table["model"].isin(run.gpa.models), "role"]) == {"GPA (dispersion)"}
    components = components_table(run)
    np.testing.assert_allclose(
        components["variance_explained_%"],
        np.round(100 * np.asarray(run.pca.explained_variance_ratio), 2),
    )
    assert [c for c in components.columns if c.startswith("loading")] == [
        f"loading {m}" for m in run.gpa.models
    ]


SVG = "{http://www.w3.org/2000/svg}"


def _svg(text: str) -> ElementTree.Element:
    """Parse an SVG document (well-formed XML with an svg root of positive size)."""
    root = ElementTree.fromstring(text)
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    return root


def _picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_charts_are_pngs_no_wider_than_streamlit_keeps(run) -> None:
    found = build_catalogue(run)
    pictures = [
        charts.dispersion_histograms(found.values, "title $x$"),
        charts.residual_bars(run.gpa.models, np.asarray(run.gpa.residuals)[0],
                             found.residual_median, "id$with$dollars"),
        charts.residual_scatter(np.arange(40.0), np.arange(40.0), found.values["mean"],
                                colour_title="c<br>d", x_title="x", y_title="y", title="t",
                                selected=[1, 2]),
        charts.residual_components(np.asarray(run.pca.explained_variance_ratio),
                                   np.asarray(run.pca.components), run.gpa.models),
        charts.ranked_effects(pd.DataFrame({
            "score": "mean", "rank": [1, 2, 3], "property": ["a$b", "c" * 80, "d"],
            "test": ["spearman", "kruskal_wallis", "spearman"], "effect": [0.5, 0.04, -0.1],
            "strength": [0.5, 0.2, 0.1], "q_value": [0.001, 0.01, 0.5],
        }), score="mean"),
        charts.cross_modal_scatter(found.values["mean"], found.values["pc1"], title="t $x$",
                                   x_title="x", y_title="y"),
        charts.model_residuals(pd.DataFrame({
            "model": ["v1", "v2", "l$1"], "layer": ["a", "b", "c"],
            "modality": ["vision", "vision", "language"], "mean_residual": [0.2, 0.3, 0.5],
        })),
    ]
    for data in pictures:
        image = _picture(data)
        assert 300 < image.width <= charts.MAX_WIDTH_PX and image.height > 200
        assert np.asarray(image.convert("L")).std() > 5  # something is drawn


def test_alignment_bars_draw_every_set_and_the_baseline(run) -> None:
    from convergence_core import analyses

    best = analyses.best_language_layers(run, k=5)
    layers = dict(zip(best["language_model"], best["language_layer"], strict=True))
    pairs = [
        lab.Pair(v, layer, m, layers[m])
        for v, layer in zip(run.gpa.models, run.gpa.layers, strict=True)
        for m in run.language_models
    ]
    indexes = analyses.indexes_for(run, pairs)
    scores = run.dispersion["mean"].to_numpy()
    sets = {"low": np.arange(10), "high": np.arange(10, 20), "selection": np.arange(20, 28)}
    values = lab.set_table(indexes, pairs, sets, 5)
    baseline = lab.baseline_table(indexes, pairs, len(scores), 10, 5, n_random=8)
    n_pairs = len(pairs)
    svg = _svg(charts.alignment_bars(values, baseline, "cknna"))
    bars = [r for r in svg.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 4 * n_pairs  # low, random, high, selection per pair
    assert len(list(svg.iter(f"{SVG}path"))) == n_pairs  # an error bar per random bar
    for bar in bars:  # each bar's height is its value on the axis's scale
        assert float(bar.get("height")) > 0
    legend = " ".join(t.text or "" for t in svg.iter(f"{SVG}text"))
    # 8 random sets are too few for 2.5% tails: the bars are about their range, and say so
    assert "random (mean; about the range of 8 sets)" in legend
    assert "selection (8 stimuli)" in legend
    assert stats.spread_words(40) == "95% of 40 sets"
    assert "CKNNA (unitless)" in legend
    assert "Vision × language alignment per set: CKNNA" in legend
    # the title says what the error bars are as the legend does (it said "95%" of 8 sets)
    assert "error bars: about the range of 8 sets" in legend and "95%" not in legend
    assert "language model" in legend  # the x axis
    # the selection (8) beside random sets of its own size, not only of the main size (10)
    own = lab.baseline_table(indexes, pairs, len(scores), 8, 5, n_random=8)
    matched = _svg(charts.alignment_bars(values, baseline, "cknna", matched=own))
    bars = [r for r in matched.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 5 * n_pairs and len(list(matched.iter(f"{SVG}path"))) == 2 * n_pairs
    words = " ".join(t.text or "" for t in matched.iter(f"{SVG}text"))
    assert "random of 8 (mean; about the range of 8 sets)" in words
    assert words.index("selection (8 stimuli)") < words.index("random of 8")
    first = [b.find(f"{SVG}title").text for b in bars[:5]]
    assert [t.split(", ")[-1].split(":")[0] for t in first] == [
        "low", "random", "high", "selection", "random of 8"
    ]
    # random sets of two counts: the title names neither one (it said "95% of 47 sets" beside
    # bars of 114), the legend gives each
    more = lab.baseline_table(indexes, pairs, len(scores), 8, 5, n_random=40)
    mixed = _svg(charts.alignment_bars(values, baseline, "cknna", matched=more))
    words = " ".join(" ".join(t.text or "" for t in mixed.iter(f"{SVG}text")).split())
    assert "error bars: the spread of each bar's random sets (their number in the legend)" in words
    assert "about the range of 8 sets" in words and "95% of 40 sets" in words
    # a selection of the main size needs no second baseline
    same = lab.set_table(indexes, pairs, {**sets, "selection": np.arange(20, 30)}, 5)
    assert "random of" not in charts.alignment_bars(same, baseline, "cknna", matched=own)
    no_baseline = _svg(charts.alignment_bars(values, None, modalities=("vision", "brain")))
    assert not list(no_baseline.iter(f"{SVG}path"))
    words = " ".join(t.text or "" for t in no_baseline.iter(f"{SVG}text"))
    assert "Vision × brain alignment per set" in words and "brain model" in words
    assert "error bars" not in words  # no random bars, no error bars
    assert analyses.pair_sides(run, pairs) == "vision × language"
    cka = lab.set_table(indexes, pairs, sets, None, metric="cka", options={"kernel": "rbf"})
    assert cka["k"].isna().all() and set(cka["options"]) == {"kernel=rbf, sigma=1"}
    _svg(charts.alignment_bars(cka, lab.baseline_table(
        indexes, pairs, len(scores), 10, None, metric="cka", options={"kernel": "rbf"},
        n_random=8,
    )))
    with pytest.raises(ValueError, match="unknown metric"):
        charts.alignment_bars(values, baseline, "r2")
    with pytest.raises(ValueError, match="say which one"):
        charts.alignment_bars(pd.concat([values, cka]), None)
    assert "8 random sets of 10 stimuli per pair (a fixed number)" in lab.baseline_statement(
        baseline
    )
    assert "mean random CKNNA" in lab.baseline_statement(baseline)
    assert lab.baseline_statement(baseline).endswith(
        "Error bars: the 2.5th to 97.5th percentiles of the 8 random sets' values, with so few "
        "sets about their range."
    )
    assert lab.baseline_statement(baseline.assign(n_random=200)).endswith(
        "Error bars: 95% of the random sets' values."
    )
    # a precision met just below the one asked for reads as met, not as "narrower than 0.02; the
    # widest is 0.0200" (its digits rounded up to the bound)
    met = lab.baseline_statement(
        baseline.assign(interval_width=0.02, random_mean_interval=0.019984)
    )
    assert "interval of the mean was at most 0.02 wide" in met and "is 0.01998 wide" in met


def test_alignment_bars_escape_names_and_place_bars_on_the_axis() -> None:
    """Names from a run are text in the SVG, never markup; a bar's top sits at its value on the
    y axis (ticks read back from the SVG); NaN draws no bar."""
    values = pd.DataFrame({
        "vision_model": ['<script>alert("v")</script>', '<script>alert("v")</script>'],
        "language_model": ["a & b", "a & b"], "set": ["low", "high"], "set_size": [30, 30],
        "metric": ["cknna", "cknna"], "k": [10, 10], "value": [0.5, np.nan],
    })
    text = charts.alignment_bars(values, None)
    assert "<script>" not in text and "&lt;script&gt;" in text and "a &amp; b" in text
    svg = _svg(text)
    bars = [r for r in svg.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 1  # the NaN set draws nothing
    ticks = {}
    for t in svg.iter(f"{SVG}text"):
        if t.get("text-anchor") == "end":
            ticks[float(t.text)] = float(t.get("y"))  # centred on its tick (dominant-baseline)
    (low, y_low), (high, y_high) = min(ticks.items()), max(ticks.items())
    top = float(bars[0].get("y"))
    expected = y_low + (0.5 - low) * (y_high - y_low) / (high - low)
    assert abs(top - expected) < 0.2
    assert abs(top + float(bars[0].get("height")) - y_low) < 0.2  # from zero (the lowest tick)


def test_per_stimulus_scatter_draws_a_panel_per_score(run) -> None:
    found = build_catalogue(run)
    rng = np.random.default_rng(0)
    relation = pd.DataFrame(
        {"metric": ["knn_overlap", "local_cka"], "spearman_rho": [-0.2, 0.1],
         "permutation_p_value_two_sided": [0.01, 0.4], "n_permutations": [1000, 1000]}
    )
    image = _picture(
        charts.alignment_dispersion(
            found.values["mean"], {"knn_overlap": rng.random(40), "local_cka": rng.normal(size=40)},
            relation, score="mean", k=10, title="vision-a × language-$a$", marked=[1, 2, 3],
        )
    )
    assert image.width > 600 and np.asarray(image.convert("L")).std() > 5


def test_a_constant_per_stimulus_score_says_why_rho_is_undefined(monkeypatch) -> None:
    """k = n − 1 makes every neighbour list the whole set: every overlap is 1 and Spearman ρ is
    NaN; the panel says why instead of "ρ = +nan, p = nan"."""
    monkeypatch.setattr(charts, "png", lambda figure: figure)
    relation = pd.DataFrame(
        {"metric": ["knn_overlap", "local_cka"], "spearman_rho": [np.nan, 0.1],
         "permutation_p_value_two_sided": [np.nan, 0.4], "n_permutations": [999, 999]}
    )
    figure = charts.alignment_dispersion(
        np.arange(8.0), {"knn_overlap": np.ones(8), "local_cka": np.arange(8.0)}, relation,
        score="mean", k=7, title="t",
    )
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[0] == (
        "k-NN overlap (k = 7)\nρ undefined: every stimulus scores 1 (k = 7 of 7 others)"
    )
    assert "ρ = +0.100" in titles[1]


def test_wide_pictures_are_shrunk_once() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 500), "white").save(buffer, format="PNG")
    shrunk = _picture(charts.fit_width(buffer.getvalue()))
    assert shrunk.size == (charts.MAX_WIDTH_PX, 350)
    small = io.BytesIO()
    Image.new("RGB", (300, 100), "white").save(small, format="PNG")
    assert charts.fit_width(small.getvalue()) == small.getvalue()


def test_text_from_a_run_never_starts_math_mode() -> None:
    assert charts.literal("a $b$ c") == r"a \$b\$ c"


def _choices_app(n_options: int) -> None:  # run by AppTest in its own script context
    import streamlit as st

    from convergence_core.dashboard import widgets

    options = [f"model_{i}" for i in range(n_options)]
    one = widgets.choose_one("One", options, key="one")
    many = widgets.choose_many("Many", options, key="many")
    st.text(f"{one}|{','.join(many)}")


@pytest.mark.parametrize("n_options", [3, widgets.PILL_LIMIT, widgets.PILL_LIMIT + 1])
def test_choices_are_pills_up_to_the_limit_and_select_boxes_above(n_options: int) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_choices_app, kwargs={"n_options": n_options}).run(timeout=60)
    assert not at.exception, at.exception
    options = [f"model_{i}" for i in range(n_options)]
    # the first option chosen for one, every option for many, until the user changes them
    assert at.text[0].value == f"model_0|{','.join(options)}"
    pills = n_options <= widgets.PILL_LIMIT
    assert len(at.button_group) == (2 if pills else 0)
    assert (len(at.selectbox), len(at.multiselect)) == ((0, 0) if pills else (1, 1))
    one = at.button_group(key="one") if pills else at.selectbox(key="one")
    many = at.button_group(key="many") if pills else at.multiselect(key="many")
    if pills:  # a pill's label is escaped Markdown: the name shows as written
        assert one.options[0] == "model\\_0"
    one.set_value("model_2")
    many.set_value(["model_1"])
    at.run(timeout=60)
    assert at.text[0].value == "model_2|model_1"


def test_gallery_ends_against_a_slow_reference() -> None:
    """Both ends of one stable ascending order, NaN left out: checked against sorting
    (value, row) pairs by hand on random values with ties and gaps."""
    from convergence_core.dashboard.catalogue import gallery_ends

    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        values = rng.integers(0, 5, n).astype(float)
        values[rng.random(n) < 0.2] = np.nan
        count = int(rng.integers(1, 8))
        ranked = sorted((v, row) for row, v in enumerate(values) if not np.isnan(v))
        lowest, highest = gallery_ends(values, count)
        assert lowest.tolist() == [row for _, row in ranked[:count]]
        assert highest.tolist() == [row for _, row in ranked[::-1][:count]]
        assert lowest.dtype == np.int64 and highest.dtype == np.int64


def test_gallery_pages_against_a_slow_reference() -> None:
    """Two-sided pages: every row once, the low side from the low end, the high side from the
    high end, the sides meeting in the middle (checked by walking the ranking from both ends)."""
    from convergence_core.dashboard.catalogue import gallery_page, gallery_page_count

    for m in range(0, 30):
        for per_side in (1, 2, 6):
            ranked = np.arange(100, 100 + m)
            low_end, high_end, lo, hi = [], [], 0, m - 1  # the reference: alternate ends
            while lo <= hi:
                low_end.append(ranked[lo])
                lo += 1
                if lo <= hi:
                    high_end.append(ranked[hi])
                    hi -= 1
            pages = gallery_page_count(m, per_side)
            assert pages == max(1, int(np.ceil(m / (2 * per_side))))
            shown_low, shown_high = [], []
            for page in range(1, pages + 1):
                low, high = gallery_page(ranked, page, per_side)
                assert len(low) <= per_side and len(high) <= per_side
                shown_low += low.tolist()
                shown_high += high.tolist()
            assert shown_low == low_end and shown_high == high_end


def test_number_cards_show_label_value_and_a_signed_change(tmp_path: Path) -> None:
    """widgets.number_cards: one card per column, the label (escaped, with its help), the value
    as a heading without an anchor, and the change as a badge coloured by its sign; no
    st.metric (whose code the browser would load)."""
    from streamlit.testing.v1 import AppTest

    from tests.page_reading import card_deltas, cards

    script = tmp_path / "cards.py"
    script.write_text(
        "from convergence_core.dashboard import widgets\n"
        "widgets.number_cards([\n"
        "    widgets.Card('Focus: low', '0.4123', delta='+0.2207 vs random', help='the *focus*'),\n"
        "    widgets.Card('Drop [%]', '-0.0100', delta='−0.0100 vs random'),\n"
        "    widgets.Card('Rank', '3 / 40', delta='same'),\n"
        "    widgets.Card('High', '**0.1**'),\n"
        "], key='t', widths=[2, 1, 1, 1])\n"
    )
    at = AppTest.from_file(str(script)).run()
    assert not at.exception, at.exception
    assert cards(at) == {
        "Focus: low": "0.4123", "Drop [%]": "-0.0100", "Rank": "3 / 40", "High": "**0.1**"
    }
    assert card_deltas(at) == {
        "Focus: low": "+0.2207 vs random", "Drop [%]": "−0.0100 vs random", "Rank": "same",
        "High": None,
    }
    badges = [m.value for m in at.markdown if "-badge[" in m.value]
    assert [b.split("[")[0] for b in badges] == [":green-badge", ":red-badge", ":gray-badge"]
    assert "arrow_upward" in badges[0] and "arrow_downward" in badges[1]
    assert "material" not in badges[2]
    assert at.markdown[0].proto.help == "the *focus*"
    assert at.subheader and all(h.proto.hide_anchor for h in at.subheader)
    assert not at.metric and len(at.columns) == 4
    with pytest.raises(ValueError):  # one width per card
        widgets.number_cards([widgets.Card("a", "1")], key="x", widths=[1, 1])


def test_the_run_summary_counts_every_modality(tmp_path):
    """A brain recording beside the vision models is counted under its own modality (a run whose
    GPA models were brain subjects read "Vision models 0 | Language models 1")."""
    from convergence_core.dashboard.catalogue import run_summary
    from tests.fixtures_runs import make_brain_run

    brains = make_brain_run(tmp_path / "brains", n=30, language_models=("language-a",))
    size, _ = run_summary(brains)
    assert size.iloc[0].to_dict() | {"Layers cached": 0} == {
        "Layers cached": 0, "Stimuli": "30", "Vision models": 3, "Language models": 1,
        "Brain models": 1,
    }


def test_residual_charts_name_the_gpa_models_modality(run, monkeypatch) -> None:
    """GPA across brain subjects: the bars and loadings say brain model, not vision model."""
    monkeypatch.setattr(charts, "png", lambda figure: figure)
    found = build_catalogue(run)
    bars = charts.residual_bars(run.gpa.models, np.asarray(run.gpa.residuals)[0],
                                found.residual_median, "s1", "brain")
    assert bars.axes[0].get_xlabel() == "brain model (GPA)"
    assert "Residual per brain model" in bars.axes[0].get_title()
    parts = charts.residual_components(np.asarray(run.pca.explained_variance_ratio),
                                       np.asarray(run.pca.components), run.gpa.models, "brain")
    assert parts.axes[1].get_xlabel() == "brain model (GPA)"


def test_the_model_residual_legend_sits_beside_the_bars(monkeypatch) -> None:
    """The modality legend covered the last bar; it now lies right of the plot, inside the
    picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    monkeypatch.setattr(charts, "png", lambda figure: figure)
    figure = charts.model_residuals(pd.DataFrame({
        "model": ["v1", "v2", "l1", "s1"], "layer": ["a", "b", "c", "d"],
        "modality": ["vision", "vision", "language", "brain"],
        "mean_residual": [0.2, 0.3, 0.5, 0.9],
    }))
    renderer = FigureCanvasAgg(figure).get_renderer()
    axis = figure.axes[0]
    legend = axis.get_legend().get_window_extent(renderer)
    assert legend.x0 >= axis.get_window_extent(renderer).x1
    assert legend.x1 <= figure.bbox.x1


# -- what a reader sees: one p-value format, names in words --------------------------------------
def test_one_p_value_format_for_every_table_card_and_title() -> None:
    """p- and q-values read alike everywhere (the review found "p = 0.000999" on a card above a
    table saying "0.001", "9.9e-01", and a q as 3.2e-04, 3.17e-4 and 0.00032 on one page): two
    significant digits and no exponent; below 0.001 "< 0.001"; at a permutation test's floor
    1/(B + 1) "≤ floor" (or "< 0.001" where the floor is below it); NaN "n/a"."""
    from convergence_core.dashboard.catalogue import NBSP, p_phrase, p_text

    def plain(text: str) -> str:
        assert " " not in text  # no-break spaces only: a number never wraps inside
        return text.replace(NBSP, " ")

    assert plain(p_text(1 / 1000, 999)) == "≤ 0.001"  # the floor of B = 999
    assert plain(p_text(1 / 1001, 1000)) == "< 0.001"  # 0.000999: the floor of B = 1,000
    assert plain(p_text(1 / 100, 99)) == "≤ 0.01"
    assert plain(p_text(2 / 100, 99)) == "0.02"  # above the floor: the value
    assert p_text(0.5) == "0.5" and p_text(0.5, 999) == "0.5"
    assert plain(p_text(1e-4)) == "< 0.001" and plain(p_text(3.17e-4)) == "< 0.001"
    assert p_text(float("nan")) == "n/a" and p_text(None) == "n/a"
    assert p_text(np.float64(0.0463)) == "0.046" and p_text(0.0092) == "0.0092"
    assert p_text(0.99) == "0.99" and p_text(1.0) == "1"
    for value in (0.987, 2.8e-6, 0.00032, 1e-12, 0.05):
        assert "e" not in p_text(value), value
    assert plain(p_phrase(0.0463)) == "p = 0.046"
    assert plain(p_phrase(1 / 1001, 1000)) == "p < 0.001"
    assert plain(p_phrase(0.01, 99, symbol="q")) == "q ≤ 0.01"
    assert plain(p_phrase(float("nan"))) == "p = n/a"
    # a floor is a bound: rounded up, never below it (1/300 is not "≤ 0.0033")
    assert plain(p_text(1 / 300, 299)) == "≤ 0.0034" and plain(p_text(1 / 30, 29)) == "≤ 0.034"
    # never rounded across 0.05 or 0.01: 0.0496 is not "0.05" beside a "q < 0.05"
    assert p_text(0.0496) == "0.0496" and p_text(0.04999) == "0.04999"
    assert p_text(0.00996) == "0.00996" and p_text(0.0504) == "0.05" and p_text(0.2349) == "0.23"


def test_numbers_in_markdown_tables_never_wrap_inside() -> None:
    """At 1024 px a table broke "3.2e-/04" and "ρ = /+0.0663": a number's cell has no-break
    spaces and a word joiner after its minus sign; text cells keep their spaces."""
    frame = pd.DataFrame({
        "property": ["caption words", "width_px"], "effect": ["ρ = +0.0663", "ρ = -0.0554"],
        "q": ["< 0.001", "0.39"], "x": [-2.5e-6, 0.5],
    })
    rows = widgets.markdown_table(frame).splitlines()[2:]
    assert rows[0].startswith("| caption words | ρ\u00a0\\=\u00a0\\+0\\.0663 | \\<\u00a00\\.001 |")
    assert "ρ\u00a0\\=\u00a0\\-\u20600\\.0554" in rows[1]
    assert "\\-\u20602\\.5e\\-\u206006" in rows[0]


def test_shown_tables_use_display_names_and_keep_the_frame_machine_readable() -> None:
    """One map of machine names to words (catalogue.DISPLAY_NAMES): headers and values as a
    reader reads them, with one precision per table; the frame itself (what the CSV downloads
    and the report write) keeps its names."""
    from convergence_core.dashboard.catalogue import display_name, paired_tests_table, shown_table

    frame = pd.DataFrame({
        "vision_model": ["a", "b"], "drop_high": [0.29, 0.3616], "full": [0.318, 0.2],
        "variance_explained_%": [70.71, 16.1], "model": ["boosted_trees", "ridge"],
    })
    shown = shown_table(frame, decimals=3)
    assert list(shown.columns) == [
        "vision model", "high-dispersion dropped", "full set", "variance explained (%)", "model"
    ]
    assert list(shown["high-dispersion dropped"]) == ["0.290", "0.362"]  # not 0.29 beside 0.3616
    assert list(shown["model"]) == ["boosted trees", "ridge"]
    assert list(frame.columns)[1] == "drop_high" and frame["model"].iloc[0] == "boosted_trees"
    # the user's names are shown as written, even where one reads like a machine name
    users = pd.DataFrame({"vision_model": ["full", "ridge"], "language_model": ["all", "lm"],
                          "held_out_model": ["universal", "recall_at_1"], "p_value": [0.5, 0.2]})
    assert list(shown_table(users)["held out model"]) == ["universal", "recall_at_1"]
    assert list(shown_table(users)["vision model"]) == ["full", "ridge"]
    assert list(shown_table(users)["language model"]) == ["all", "lm"]
    assert display_name("vision_to_language") == "image → text"
    assert display_name("recall_at_1") == "recall@1"
    assert display_name("permutation_p_value_two_sided") == "permutation p (two-sided)"
    assert display_name("knn_overlap") == "k-NN overlap"
    assert display_name("efficientnet_b0") == "efficientnet_b0"  # a value: as it is
    assert display_name("cknna_random_hi", column=True) == "CKNNA random hi"

    tests = pd.DataFrame({
        "test": ["wilcoxon_signed_rank", "paired_t", "permutation_mean_over_pairs"],
        "statistic": [0.0, 23.12, 0.3324], "p_value": [0.03125, 2.8e-6, 1 / 1001],
        "n_pairs": [6, 6, 6], "mean_difference": [0.3324] * 3, "note": ["", "", ""],
    })
    table = paired_tests_table(tests, 1000)
    assert list(table["test"]) == [
        "Wilcoxon signed-rank", "paired t", "permutation, mean over pairs"
    ]
    assert list(table["statistic"]) == ["W = 0", "t = 23.1", "Δ = +0.332"]  # which statistic
    assert [p.replace("\u00a0", " ") for p in table["p"]] == ["0.031", "< 0.001", "< 0.001"]


def test_data_tables_show_words_over_machine_data(monkeypatch) -> None:
    """widgets.data_table: the grid's headers are display names (column labels), p-values two
    digits, machine-name values shown in words, and the data (which the grid's CSV download
    writes, column names included) untouched."""
    calls = []
    monkeypatch.setattr(widgets.st, "dataframe", lambda frame, **kw: calls.append((frame, kw)))
    frame = pd.DataFrame({
        "model": ["ridge", "boosted_trees"], "q_value": [0.00032, 0.5], "id": ["1", "2"],
        "direction": ["vision_to_language", "language_to_vision"],
    })
    widgets.data_table(frame, hide_index=True, column_config={"id": "stimulus id"})
    shown, options = calls[0]
    assert shown is frame and list(shown["model"]) == ["ridge", "boosted_trees"]
    config = options["column_config"]
    assert config["q_value"]["label"] == "q (Benjamini–Hochberg)"
    assert config["q_value"]["type_config"]["format"] == "%.4g"  # 0.0496 is not "0.05"
    assert config["id"] == "stimulus id" and options["hide_index"] is True
    labels = {o["value"]: o["label"] for o in config["model"]["type_config"]["options"]}
    assert labels == {"ridge": "ridge", "boosted_trees": "boosted trees"}
    directions = {o["value"]: o["label"] for o in config["direction"]["type_config"]["options"]}
    assert directions["vision_to_language"] == "image → text"
    # a column of the user's names is never given display names ("full" is a model's name here)
    calls.clear()
    widgets.data_table(pd.DataFrame({"vision_model": ["full", "ridge"], "p_value": [0.5, 0.2]}))
    model_column = calls[0][1]["column_config"]["vision_model"]
    assert (model_column.get("type_config") or {}).get("options") is None
    assert model_column["label"] == "vision model"
