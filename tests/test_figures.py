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
