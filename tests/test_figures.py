"""The report's figures draw names from the data as plain text."""

from __future__ import annotations

import matplotlib
import pandas as pd
from PIL import Image

from convergence_core import figures


def test_a_dollar_in_a_model_name_is_drawn_as_text_not_math(tmp_path):
    """A name such as ``$$\\frac{a}{b}$$`` (from a feature file) started matplotlib's math mode
    and failed the whole figure, and with it the report and the Paper analyses page (from the
    reliability audit). It is drawn literally now, and the setting does not leak out."""
    sweep = pd.DataFrame({
        "vision_model": ["$$\\frac{a}{b}$$"] * 3, "vision_layer": ["l$1"] * 3,
        "language_model": ["**b** $x"] * 3, "language_layer": ["a", "b", "c"],
        "language_layer_index": [0, 1, 2], "k": [10] * 3, "cknna": [0.1, 0.2, 0.3],
        "n_stimuli_used": [10] * 3, "sample_seed": [None] * 3,
    })
    path = figures.layer_sweep_figure(sweep, tmp_path / "sweep.png")
    assert Image.open(path).size[0] > 100
    assert matplotlib.rcParams["text.parse_math"] is True


def test_a_language_model_undefined_at_every_layer_keeps_its_panel(tmp_path, monkeypatch):
    """A language model whose CKNNA is NaN at every layer (the report then uses its default
    layer) lost its whole grid: ``pivot_table`` drops all-NaN rows and columns, so its panel was
    empty (and matplotlib warned about identical limits). It keeps its vision × layer grid."""
    rows = []
    for language, values in (("good", [0.1, 0.2, 0.3]), ("flat", [float("nan")] * 3)):
        for vision in ("v1", "v2"):
            for index, value in enumerate(values):
                rows.append({
                    "vision_model": vision, "vision_layer": "b", "language_model": language,
                    "language_layer": f"l{index}", "language_layer_index": index, "k": 10,
                    "cknna": value, "n_stimuli_used": 10, "sample_seed": None,
                })
    shapes = []
    original = matplotlib.axes.Axes.imshow

    def recording(self, grid, *args, **kwargs):  # noqa: ANN001, ANN202
        shapes.append(grid.shape)
        return original(self, grid, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording)
    figures.layer_sweep_figure(pd.DataFrame(rows), tmp_path / "sweep.png")
    assert shapes == [(2, 3), (2, 3)]


def _drawn(monkeypatch):
    """Keep the figures that ``figures._save`` is given (and still write them)."""
    kept = []
    original = figures._save

    def keeping(figure, path):  # noqa: ANN001, ANN202
        kept.append(figure)
        return original(figure, path)

    monkeypatch.setattr(figures, "_save", keeping)
    return kept


def test_every_panel_of_fig_s2_names_its_y_axis(tmp_path, monkeypatch):
    """Fig. S2's panels have their own y scales (no shared axis): the label was on the first
    panel only, so the others showed numbers without saying what or in which unit."""
    kept = _drawn(monkeypatch)
    points = pd.DataFrame({
        "held_out_model": ["a"] * 4 + ["b"] * 4,
        "partial_dispersion": [0.1, 0.2, 0.3, 0.4] * 2,
        "deviation": [0.02, 0.05, 0.07, 0.14, 0.03, 0.06, 0.1, 0.16],
    })
    statistics = pd.DataFrame({
        "held_out_model": ["a", "b"], "fit_slope": [0.4, 0.4], "fit_intercept": [0.0, 0.0],
        "pearson_r": [0.9, 0.9], "pearson_p_value": [0.1, 0.1],
        "spearman_rho": [1.0, 1.0], "spearman_p_value": [0.04, 0.04],
    })
    figures.leave_one_out_figure(points, statistics, tmp_path / "s2.png")
    labels = [axis.get_ylabel() for axis in kept[0].axes]
    assert labels == ["held-out deviation (residual units)"] * 2, labels


def test_the_layer_sweep_shows_each_gpa_models_layer(tmp_path, monkeypatch):
    """The rows are the GPA models at their GPA layer; the label said "GPA model (its GPA
    layer)" but no layer was shown anywhere: each row's tick now names it."""
    kept = _drawn(monkeypatch)
    sweep = pd.DataFrame({
        "vision_model": ["v1", "v1", "v2", "v2"], "vision_layer": ["b4", "b4", "s2", "s2"],
        "language_model": ["lang"] * 4, "language_layer": ["l0", "l1"] * 2,
        "language_layer_index": [0, 1] * 2, "k": [10] * 4, "cknna": [0.1, 0.2, 0.3, 0.4],
        "n_stimuli_used": [10] * 4, "sample_seed": [None] * 4,
    })
    figures.layer_sweep_figure(sweep, tmp_path / "sweep.png")
    first = kept[0].axes[0]
    assert first.get_ylabel().replace("\n", " ") == "GPA model (its GPA layer)"
    # the layer under the model's name
    assert [t.get_text() for t in first.get_yticklabels()] == ["v1\n(b4)", "v2\n(s2)"]


def test_what_predicts_dispersion_names_its_axes_and_draws_any_property_name(
    tmp_path, monkeypatch
):
    """The ranked panel had no y label, and a property named ``$$\\frac{a}{b}$$`` failed the
    figure (and with it the report): the plain-text rule decorated a helper, not the figure."""
    kept = _drawn(monkeypatch)
    names = ["$$\\frac{a}{b}$$", "size"]
    tests = pd.DataFrame({
        "score": ["mean"] * 2, "rank": [1, 2], "test": ["spearman"] * 2,
        "effect": [0.5, -0.2], "strength": [0.5, 0.2], "q_value": [0.01, 0.3], "property": names,
    })
    fit = pd.DataFrame({
        "score": ["mean"] * 2, "model": ["ridge"] * 2,
        "metric": ["r2_held_out", "r2_shuffled_mean"], "value": [0.3, 0.0],
    })
    predictions = pd.DataFrame({
        "score": ["mean"] * 3, "model": ["ridge"] * 3,
        "predicted": [0.1, 0.2, 0.3], "observed": [0.12, 0.18, 0.33],
    })
    figures.predictors_figure(tests, fit, predictions, tmp_path / "predictors.png")
    left, right = kept[0].axes[:2]
    assert left.get_ylabel() == "property" and left.get_xlabel()
    assert right.get_xlabel() and right.get_ylabel()
    assert matplotlib.rcParams["text.parse_math"] is True


def test_long_titles_break_where_they_read_best():
    """Titles and labels are broken to fit their figure: after a comma outside parentheses
    before anywhere else, then before a parenthesis, then at spaces; text that fits is kept."""
    from convergence_core.figure_style import wrap

    assert wrap("r = 0.35 (p = 4.1e-08), ρ = 0.36 (p = 7.5e-09)", 3.6, 11) == (
        "r = 0.35 (p = 4.1e-08),\nρ = 0.36 (p = 7.5e-09)"
    )
    assert wrap("cut-off k (gallery: 48 held-out stimuli per fold)", 3.4) == (
        "cut-off k\n(gallery: 48 held-out stimuli per fold)"
    )
    assert wrap("short\ntitle", 3.0) == "short\ntitle"
    assert wrap("x" * 80, 1.0) == "x" * 80  # a word is never cut


def _figure_of(monkeypatch, draw):  # noqa: ANN001, ANN202
    """The matplotlib figure a dashboard chart draws (instead of its PNG bytes)."""
    from convergence_core.dashboard import charts

    monkeypatch.setattr(charts, "png", lambda figure: figure)
    return draw()


def test_dashboard_pictures_are_drawn_at_the_size_they_are_shown(monkeypatch):
    """The pictures were drawn 13 inches wide with 8-point text and shrunk into the page's
    column, where their text was about 5 px: they are drawn as wide as the column now (two thirds
    of it for the Stimuli page's detail), every text at least the style's tick size."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from convergence_core.dashboard import charts
    from convergence_core.figure_style import DPI, FULL_WIDTH, STYLE

    rng = np.random.default_rng(0)
    models = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    drawn = {
        "histograms": lambda: charts.dispersion_histograms(
            {"mean": rng.random(50), "pc1": rng.normal(size=50)}, "Dispersion of 50 stimuli"
        ),
        "map": lambda: charts.residual_scatter(
            rng.random(50), rng.random(50), rng.random(50), colour_title="c", x_title="x",
            y_title="y", title="t", selected=[1, 2],
        ),
        "components": lambda: charts.residual_components(
            np.array([0.7, 0.2, 0.1]), np.eye(3), models
        ),
        "bars": lambda: charts.residual_bars(models, rng.random(3), rng.random(3), "s1"),
        "cross-modal": lambda: charts.cross_modal_scatter(
            rng.random(50), rng.random(50), title="t", x_title="x (a) (residual units)",
            y_title="y",
        ),
    }
    smallest = float(STYLE["xtick.labelsize"])
    for name, draw in drawn.items():
        figure = _figure_of(monkeypatch, draw)
        FigureCanvasAgg(figure).draw()
        width = charts.PART_WIDTH if name == "bars" else FULL_WIDTH
        assert abs(figure.get_figwidth() - width) < 1e-6, name
        sizes = [t.get_fontsize() for t in figure.findobj(matplotlib.text.Text) if t.get_text()]
        assert min(sizes) >= smallest, (name, min(sizes))
    assert charts.DPI == DPI
    # "vision dispersion (mean residual) (residual units)" had its parentheses doubled
    figure = _figure_of(monkeypatch, drawn["cross-modal"])
    assert figure.axes[0].get_xlabel() == "x (a; residual units)"


def test_the_lab_bars_wrap_into_rows_of_at_most_three_panels():
    """Six vision models were six panels side by side in a picture shrunk to the column: they
    are rows of at most three now, the picture as wide as the PNGs and its text as large."""
    import xml.etree.ElementTree as ET

    from convergence_core.dashboard import charts
    from convergence_core.figure_style import DPI, FULL_WIDTH

    visions = [f"vision-{i}" for i in range(6)]
    rows = [
        {"vision_model": v, "language_model": m, "set": s, "set_size": 30, "metric": "cknna",
         "k": 10, "value": 0.1 * i}
        for i, v in enumerate(visions) for m in ("minilm", "gemma") for s in ("low", "high")
    ]
    svg = ET.fromstring(charts.alignment_bars(pd.DataFrame(rows), None))
    assert float(svg.get("width")) == FULL_WIDTH * DPI
    space = "{http://www.w3.org/2000/svg}"
    titles = [t for t in svg.iter(f"{space}text") if (t.text or "") in visions]
    assert len(titles) == 6 and len({t.get("y") for t in titles}) >= 2  # more than one row
    per_row = max(sum(t.get("y") == y for t in titles) for y in {t.get("y") for t in titles})
    assert per_row <= 3
    sizes = [float(t.get("font-size") or svg.get("font-size")) for t in svg.iter(f"{space}text")]
    assert min(sizes) >= 16  # 10 points at the PNGs' 120 dots per inch


def test_report_figures_wrap_many_panels_into_rows(tmp_path, monkeypatch):
    """Fig. S2 had a panel per held-out model in one row (three 4.8-inch panels): at most two or
    three a row now, in a figure as wide as the dashboard's column."""
    from convergence_core.figure_style import FULL_WIDTH

    kept = _drawn(monkeypatch)
    models = ["a", "b", "c"]
    points = pd.DataFrame({
        "held_out_model": [m for m in models for _ in range(4)],
        "partial_dispersion": [0.1, 0.2, 0.3, 0.4] * 3,
        "deviation": [0.02, 0.05, 0.07, 0.14] * 3,
    })
    statistics = pd.DataFrame({
        "held_out_model": models, "fit_slope": [0.4] * 3, "fit_intercept": [0.0] * 3,
        "pearson_r": [0.9] * 3, "pearson_p_value": [0.1] * 3,
        "spearman_rho": [1.0] * 3, "spearman_p_value": [0.04] * 3,
    })
    path = figures.leave_one_out_figure(points, statistics, tmp_path / "s2.png")
    figure = kept[0]
    assert figure.get_figwidth() == FULL_WIDTH
    tops = {round(axis.get_position().y1, 3) for axis in figure.axes}
    assert len(figure.axes) == 3 and len(tops) == 2  # two rows
    assert Image.open(path).size[0] < 1000


def test_plotly_error_bars_and_reference_lines_read_on_the_dark_theme():
    """Plotly's default error bars (a dark slate) and the "observed = predicted" line (#222)
    vanished on the dark theme's background: both are a mid grey now."""
    from convergence_core.dashboard import predictor_plots, universal_plots
    from convergence_core.dashboard.plots import NEUTRAL_LINE

    importances = pd.DataFrame({
        "model": ["ridge", "ridge"], "property": ["a", "b"],
        "importance_mean": [0.2, 0.1], "importance_sd": [0.05, 0.02],
    })
    bars = predictor_plots.importance_bars(importances)
    assert all(trace.error_x.color == NEUTRAL_LINE for trace in bars.data)
    predictions = pd.DataFrame({
        "score": ["mean"] * 2, "model": ["ridge"] * 2, "id": ["1", "2"],
        "predicted": [0.1, 0.2], "observed": [0.12, 0.18],
    })
    fit = pd.DataFrame({"model": ["ridge"], "metric": ["r2_held_out"], "value": [0.3],
                        "n_splits": [5]})
    line = predictor_plots.held_out_fit(predictions, fit, score="mean").data[-1]
    assert line.name == "observed = predicted" and line.line.color == NEUTRAL_LINE
    summary = pd.DataFrame({
        "direction": ["vision_to_language"] * 2, "method": ["universal", "chance"],
        "metric": ["recall_at_1"] * 2, "subset": ["all"] * 2, "mean": [0.5, 0.1],
        "std": [0.05, 0.0], "n_gallery_mean": [40, 40], "n_folds": [5, 5],
    })
    retrieval = universal_plots.retrieval_bars(summary)
    assert retrieval.data[0].error_y.color == NEUTRAL_LINE
