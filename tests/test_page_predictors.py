"""The "What predicts dispersion" page (pages/5_What_predicts_dispersion.py) and the
Residual-space page's colouring by a property, on a synthetic run whose dispersion is driven by a
planted column."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from convergence_core import dispersion_predictors as dp
from convergence_core.dashboard import predictors

REPO = Path(__file__).resolve().parent.parent
PAGE = str(REPO / "pages" / "5_What_predicts_dispersion.py")
RESIDUAL_PAGE = str(REPO / "pages" / "2_Residual_space.py")
TIMEOUT = 120
N = 50
SHUFFLES = 3


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures_runs import add_properties, make_synthetic_run

    cache = tmp_path_factory.mktemp("cache")
    run = make_synthetic_run(cache / "runs", n=N, name="demo")
    groups = np.random.default_rng(3).choice(["indoor", "outdoor"], size=N)
    add_properties(run, extra={"scene": groups})
    old = make_synthetic_run(cache / "runs", n=20, name="old", images=False, thumbnails=False)
    old.layout.properties.unlink()  # as a run made before the properties step existed
    old.layout.properties_info.unlink()
    damaged = add_properties(
        make_synthetic_run(cache / "runs", n=20, name="damaged", images=False, thumbnails=False)
    )
    damaged.layout.properties_info.write_text('{"properties": [{"name": "[x](http://e.com)"}]}')
    return cache


def _page(path: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setattr(predictors, "PAGE_SHUFFLES", SHUFFLES)
    monkeypatch.setattr(predictors, "PAGE_PERMUTATIONS", 2000)
    at = AppTest.from_file(path, default_timeout=TIMEOUT)
    at.query_params["run"] = "demo"
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def _open_tab(at: AppTest, label: str) -> None:
    at.session_state["w_predictors_tab"] = label
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception


def _ranked_table(at: AppTest):  # noqa: ANN202
    """The sortable table of every column, opened (it is built only when its expander opens)."""
    at.session_state["w_predictors_table"] = True
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at.dataframe[0].value


def _figure(at: AppTest, title_part: str) -> dict:
    for chart in at.get("plotly_chart"):
        figure = json.loads(chart.proto.spec)
        if title_part in json.dumps(figure["layout"].get("title", "")):
            return figure
    raise AssertionError(f"no chart titled with {title_part!r}")


def _array(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return flat.reshape(value["shape"]) if "shape" in value else flat
    return np.asarray(value)


def test_page_ranks_the_planted_property_first_and_shows_the_fit(run, monkeypatch) -> None:
    at = _page(PAGE, monkeypatch)
    # the first screen: the ranking as a Markdown table (no data grid), planted property first
    assert not at.dataframe
    table = next(m.value for m in at.markdown if m.value.startswith("| rank | property |"))
    assert table.splitlines()[0] == "| rank | property | effect | q | p | n |"
    first_row = table.splitlines()[2]
    # the effect and p-values stay on one line (no-break spaces), p and q in one format
    assert first_row.startswith("| 1 | planted\\_noise | ρ\u00a0\\=\u00a0\\+0\\."), first_row
    assert "e\\-0" not in table and "e-0" not in table  # no exponent: "0.0095", "< 0.001"
    ranked = _ranked_table(at)
    # the sortable table shows words over the data as computed: its CSV download (the grid's
    # toolbar writes the data's column names) keeps the machine names
    labels = {c["label"] for c in json.loads(at.dataframe[0].proto.columns).values()
              if c.get("label")}
    assert "q (Benjamini–Hochberg)" in labels and "q_value" not in labels
    assert "q_value" in ranked.columns and "p_value" in ranked.columns
    assert ranked["property"].iloc[0] == "planted_noise"
    assert ranked["q_value"].iloc[0] < 0.01
    expected = dp.property_tests(run.properties, run.dispersion, n_permutations=2000, seed=0)
    expected = expected[expected["score"] == "mean"].reset_index(drop=True)
    np.testing.assert_allclose(ranked["effect"], expected["effect"])
    np.testing.assert_allclose(ranked["q_value"], expected["q_value"])
    # the ranking's bars are a picture (every number is in the table): no Plotly on this tab
    assert len(at.image) == 1 and not at.get("plotly_chart")

    # only the ranking is built until another tab is opened
    assert len(at.dataframe) == 1
    _open_tab(at, "A property against dispersion")
    # the property scatter starts on the top property, one point per stimulus
    scatter = _figure(at, "planted_noise against")
    points = scatter["data"][0]
    np.testing.assert_allclose(_array(points["x"]), run.properties.values["planted_noise"])
    np.testing.assert_allclose(_array(points["y"]), run.dispersion["mean"])
    assert list(_array(points["customdata"])) == list(range(N))
    assert any("lowest and" in t.value for t in at.text)

    # the held-out fit: the same numbers as the core function
    _open_tab(at, "Predicting dispersion from every property")
    fit_table = next(d.value for d in at.dataframe if "held-out R²" in d.value.columns)
    fit, _, _ = dp.cross_validated_fit(
        run.properties, run.dispersion, score="mean", n_shuffles=SHUFFLES, seed=0
    )
    r2 = fit[fit["metric"] == "r2_held_out"].set_index("model")["value"]
    np.testing.assert_allclose(
        fit_table.set_index("model")["held-out R²"].loc[list(r2.index)], r2.to_numpy()
    )
    assert fit_table["held-out R²"].min() > 0.3
    _figure(at, "Held-out fit")
    _figure(at, "Permutation importance")

    # no shuffled-target refits (the input's minimum): the fit without its baseline columns
    at.number_input(key="w_predictors_shuffles").set_value(0).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    fit_table = next(d.value for d in at.dataframe if "held-out R²" in d.value.columns)
    assert not any("shuffled" in column for column in fit_table.columns)
    np.testing.assert_allclose(
        fit_table.set_index("model")["held-out R²"].loc[list(r2.index)], r2.to_numpy()
    )


def test_choosing_a_categorical_property_and_the_pc1_score(run, monkeypatch) -> None:
    at = _page(PAGE, monkeypatch)
    _open_tab(at, "A property against dispersion")
    at.selectbox(key="w_predictors_property").set_value("scene")
    at.radio(key="w_score").set_value("pc1")
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    scatter = _figure(at, "scene against PC1 score")
    boxes = [trace for trace in scatter["data"] if trace["type"] == "box"]
    assert [box["name"] for box in boxes] == ["indoor", "outdoor"]
    points = scatter["data"][-1]
    np.testing.assert_allclose(_array(points["y"]), run.dispersion["pc1"])
    assert scatter["layout"]["xaxis"]["ticktext"] == ["indoor", "outdoor"]
    _open_tab(at, "Properties ranked")
    assert _ranked_table(at)["property"].iloc[0] == "planted_noise"


def test_a_run_without_properties_says_how_to_add_them(run, monkeypatch) -> None:
    monkeypatch.setattr(predictors, "PAGE_SHUFFLES", SHUFFLES)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.query_params["run"] = "old"
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert any("no stimulus property table" in info.value for info in at.info)
    assert not at.get("plotly_chart")


def test_a_damaged_property_table_is_a_warning_in_plain_text(run, monkeypatch) -> None:
    for path in (PAGE, RESIDUAL_PAGE):
        at = AppTest.from_file(path, default_timeout=TIMEOUT)
        at.query_params["run"] = "damaged"
        at.run(timeout=TIMEOUT)
        assert not at.exception, at.exception
        assert any("cannot be read" in warning.value for warning in at.warning)
        assert any("properties.json" in text.value for text in at.text)  # st.text, not Markdown


def test_residual_space_colours_points_by_any_property(run, monkeypatch) -> None:
    at = _page(RESIDUAL_PAGE, monkeypatch)
    box = at.selectbox(key="w_colour_property")
    assert box.options[0] == "dispersion score (mean residual)"  # the radio's score, named
    assert set(run.properties.names) <= set(box.options)
    assert not at.radio(key="w_score").disabled  # the radio colours the map
    box.set_value("luminance_mean")
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert len(at.image) == 1  # the picture, coloured by the property (cached per property)
    # one control path: the property colours the map, the score radio says so and rests
    radio = at.radio(key="w_score")
    assert radio.disabled and "coloured by the property" in radio.help
    at.toggle(key="w_interactive_scatter").set_value(True)  # the interactive chart
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    points = _figure(at, "PCA of the GPA residuals")["data"][0]
    np.testing.assert_allclose(
        _array(points["marker"]["color"]), run.properties.values["luminance_mean"]
    )
    assert "luminance_mean" in points["marker"]["colorbar"]["title"]["text"]
    at.selectbox(key="w_colour_property").set_value("scene")
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    points = _figure(at, "PCA of the GPA residuals")["data"][0]
    codes = (run.properties.values["scene"] == "outdoor").astype(float)
    np.testing.assert_allclose(_array(points["marker"]["color"]), codes)


def test_the_residual_picture_colour_bar_shows_property_names_without_html_entities(
    tmp_path, monkeypatch
) -> None:
    """The picture's colour bar (matplotlib) gets the property's name and levels as written,
    not the HTML-escaped title of the Plotly chart (``R&amp;D``)."""
    from convergence_core.dashboard import charts, data
    from tests.fixtures_runs import add_properties, make_synthetic_run

    run = make_synthetic_run(tmp_path, n=20, images=False)
    add_properties(run, {"R&D <score>": [float(i) for i in range(20)],
                         "owner": ["Tom's" if i % 2 else "Ann & Bo" for i in range(20)]})
    titles = []
    monkeypatch.setattr(charts, "residual_scatter",
                        lambda *args, colour_title, **kwargs: titles.append(colour_title) or b"")
    stamp = data.manifest_stamp(run.path)
    for name in ("R&D <score>", "owner"):
        data.residual_scatter_png(str(run.path), stamp, "PCA", "mean", (), name)
    assert titles[0].startswith("R&D <score>") and "&amp;" not in titles[0]
    assert titles[1] == "owner\n(level: 0 Ann & Bo, 1 Tom's)"


def _popover_labels(at: AppTest) -> list[str]:
    labels = []

    def walk(node) -> None:  # noqa: ANN001
        proto = getattr(node, "proto", None)
        if proto is not None and "popover" in proto.DESCRIPTOR.fields_by_name and (
            proto.HasField("popover")
        ):
            labels.append(proto.popover.label)
        children = getattr(node, "children", None)
        for child in children.values() if isinstance(children, dict) else ():
            walk(child)

    walk(at.main)
    return labels


def test_the_colour_label_names_the_kept_property_after_a_page_switch(run, monkeypatch) -> None:
    """The colour popover's label says the property the map is coloured by, also after a visit
    to another page (when Streamlit has forgotten the widget and the kept copy restores it)."""
    at = _page(str(REPO / "app.py"), monkeypatch)
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    at.selectbox(key="w_colour_property").set_value("luminance_mean").run(timeout=TIMEOUT)
    assert "Colour: luminance\\_mean" in _popover_labels(at)
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    at.switch_page("pages/2_Residual_space.py").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert at.selectbox(key="w_colour_property").value == "luminance_mean"
    assert "Colour: luminance\\_mean" in _popover_labels(at)


def test_scatters_above_the_hover_limit_send_numbers_not_text(run, monkeypatch) -> None:
    """Every page's scatter of stimuli (a property against dispersion, numeric or categorical;
    the held-out fit; cross-modal against vision dispersion) carries each point's text up to
    plots.HOVER_TEXT_LIMIT points; above it float32 coordinates, each point's row and a
    numbers-only hover, so 100,000 points are not megabytes of captions on every rerun."""
    import pandas as pd

    from convergence_core.dashboard import plots, predictor_plots, universal_plots

    ids = run.stimuli["id"].astype(str).tolist()
    captions = ["a <b>caption</b>"] * N
    dispersion = run.dispersion["mean"].to_numpy()

    def traces(figure) -> list[dict]:
        return json.loads(figure.to_json())["data"]

    def numeric() -> dict:
        return traces(predictor_plots.property_scatter(
            run.properties, "planted_noise", dispersion, score="mean", ids=ids,
            captions=captions, effect_text="ρ",
        ))[0]

    small = numeric()
    assert len(small["text"]) == N and "&lt;b&gt;caption" in small["text"][0]
    assert "%{text}" in small["hovertemplate"]
    monkeypatch.setattr(plots, "HOVER_TEXT_LIMIT", N - 1)
    large = numeric()
    assert "text" not in large and "%{x" in large["hovertemplate"]
    assert large["x"]["dtype"] == "f4" and large["y"]["dtype"] == "f4"
    assert list(_array(large["customdata"])) == list(range(N))  # a selection still finds rows
    np.testing.assert_allclose(_array(large["y"]), dispersion, rtol=1e-6)
    assert large["marker"]["size"] < small["marker"]["size"]

    categorical = traces(predictor_plots.property_scatter(
        run.properties, "scene", dispersion, score="mean", ids=ids, captions=captions,
        effect_text="ε²",
    ))[-1]
    assert "text" not in categorical and "level %{x" in categorical["hovertemplate"]
    assert sorted(_array(categorical["customdata"])) == list(range(N))

    predictions = pd.DataFrame(
        {"model": "ridge", "id": ids, "predicted": dispersion, "observed": dispersion}
    )
    fit = pd.DataFrame(
        {"model": ["ridge"], "metric": ["r2_held_out"], "value": [0.5], "n_splits": [5]}
    )
    held_out = traces(predictor_plots.held_out_fit(predictions, fit, score="mean"))[0]
    assert "text" not in held_out and held_out["x"]["dtype"] == "f4"

    per_stimulus = pd.DataFrame({
        "stimulus": np.arange(N), "id": ids,
        "intra_modal_dispersion": dispersion, "cross_modal_dispersion": dispersion,
    })
    relation = pd.Series(
        {"spearman_rho": 0.5, "permutation_p_value_two_sided": 0.01, "n_permutations": 100}
    )
    cross = traces(
        universal_plots.dispersion_scatter(per_stimulus, relation, captions, intra_title="v")
    )[0]
    assert "text" not in cross and list(_array(cross["customdata"])) == list(range(N))


def test_a_property_name_never_reaches_a_hover_template(run) -> None:
    """Hostile column names: a property called '%{customdata}' or '<b>x</b>' is data-set text.
    Plotly reads %{...} in a hovertemplate as a field and hover labels as HTML, so the name is
    only in the escaped axis title and title, never in the template."""
    from convergence_core.dashboard import predictor_plots
    from convergence_core.properties import PropertyTable

    hostile = "%{customdata} <b>x</b>"
    values = run.properties.values.rename(columns={"planted_noise": hostile})
    records = [
        {**info.__dict__, "name": hostile} if info.name == "planted_noise" else info.__dict__
        for info in run.properties.info
    ]
    table = PropertyTable.from_records(values, records)
    ids = run.stimuli["id"].astype(str).tolist()
    figure = json.loads(predictor_plots.property_scatter(
        table, hostile, run.dispersion["mean"].to_numpy(), score="mean", ids=ids,
        captions=[""] * N, effect_text="ρ",
    ).to_json())
    points = figure["data"][0]
    assert "customdata}" not in points["hovertemplate"] and "<b>" not in points["hovertemplate"]
    assert "<b>" not in figure["layout"]["title"]["text"]
    assert "&lt;b&gt;" in figure["layout"]["title"]["text"]
