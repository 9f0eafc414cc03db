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
    assert first.get_ylabel() == "GPA model (its GPA layer)"
    assert [t.get_text() for t in first.get_yticklabels()] == ["v1 (b4)", "v2 (s2)"]


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
