"""The dashboard's static pictures follow the page's Streamlit theme: on the dark theme they were
white boxes with dark text on a dark page. Drawn for "dark" they are transparent (the page's own
background shows through) with light text and lines; drawn for "light" (the default, and the
report's files) they are as before, on white."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from PIL import Image
from streamlit.testing.v1 import AppTest

from convergence_core.dashboard import charts, data

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60
WHITE = (255, 255, 255)
#: a dark page (Streamlit 1.67's dark theme's background)
PAGE = (23, 22, 20)


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures_runs import make_synthetic_run

    cache = tmp_path_factory.mktemp("cache")
    make_synthetic_run(cache / "runs", n=40, name="demo", thumbnails=False)
    return cache


def _pixels(picture: bytes) -> np.ndarray:
    """(height, width, 4) RGBA values 0-255."""
    return np.asarray(Image.open(io.BytesIO(picture)).convert("RGBA"), dtype=np.int64)


def _corner(picture: bytes) -> tuple[int, ...]:
    """The picture's background: the RGBA of a pixel by its top left corner."""
    return tuple(int(v) for v in _pixels(picture)[1, 1])


def _on_page(pixels: np.ndarray) -> np.ndarray:
    """RGBA pixels laid on the dark page (RGB)."""
    alpha = pixels[..., 3:] / 255.0
    return pixels[..., :3] * alpha + np.array(PAGE) * (1.0 - alpha)


def _clear(corner: tuple[int, ...]) -> bool:
    return corner[3] == 0


def _luminance(colour: object) -> float:
    red, green, blue = to_rgb(colour)  # type: ignore[arg-type]
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def _is_grey(colour: object) -> bool:
    rgb = to_rgb(colour)  # type: ignore[arg-type]
    return max(rgb) - min(rgb) < 0.05


def _pictures(run, theme: str) -> dict[str, bytes]:  # noqa: ANN001
    """Every kind of dashboard picture (charts.py, and the report's figures that the Paper
    analyses page shows), drawn for ``theme``."""
    from convergence_core import figures
    from convergence_core.dashboard.catalogue import build_catalogue

    found = build_catalogue(run)
    models = list(run.gpa.models)
    rng = np.random.default_rng(0)
    sets = pd.DataFrame([
        {"vision_model": v, "vision_layer": "b", "language_model": m, "language_layer": "l",
         "set_size": 10, "score": "mean", "k": 5, "cknna_low_dispersion": 0.4,
         "cknna_high_dispersion": 0.2, "cknna_random_mean": 0.3, "cknna_random_lower_95": 0.25,
         "cknna_random_upper_95": 0.35}
        for v in models for m in ("lang-a", "lang-b")
    ])
    points = pd.DataFrame({
        "held_out_model": [m for m in models for _ in range(5)],
        "partial_dispersion": rng.random(5 * len(models)),
        "deviation": rng.random(5 * len(models)),
    })
    statistics = pd.DataFrame({
        "held_out_model": models, "fit_slope": 0.5, "fit_intercept": 0.1, "pearson_r": 0.5,
        "pearson_p_value": 0.1, "spearman_rho": 0.4, "spearman_p_value": 0.2,
    })
    return {
        "histograms": charts.dispersion_histograms(found.values, "title", theme=theme),
        "map": charts.residual_scatter(
            np.arange(40.0), np.arange(40.0), found.values["mean"], colour_title="c",
            x_title="x", y_title="y", title="t", selected=[1, 2], theme=theme,
        ),
        "components": charts.residual_components(
            np.asarray(run.pca.explained_variance_ratio), np.asarray(run.pca.components),
            models, theme=theme,
        ),
        "bars": charts.residual_bars(
            models, np.asarray(run.gpa.residuals)[0], found.residual_median, "s1", theme=theme
        ),
        "per-stimulus": charts.alignment_dispersion(
            found.values["mean"], {"knn_overlap": rng.random(40)},
            pd.DataFrame({"metric": ["knn_overlap"], "spearman_rho": [0.1],
                          "permutation_p_value_two_sided": [0.5], "n_permutations": [100]}),
            score="mean", k=5, title="a × b", marked=[1], theme=theme,
        ),
        "ranked": charts.ranked_effects(pd.DataFrame({
            "score": "mean", "rank": [1, 2, 3], "property": ["a", "b", "c"],
            "test": ["spearman", "kruskal_wallis", "spearman"], "effect": [0.5, 0.04, -0.1],
            "strength": [0.5, 0.2, 0.1], "q_value": [0.001, 0.01, 0.5],
        }), score="mean", theme=theme),
        "cross-modal": charts.cross_modal_scatter(
            found.values["mean"], found.values["pc1"], title="t", x_title="x", y_title="y",
            theme=theme,
        ),
        "model residuals": charts.model_residuals(pd.DataFrame({
            "model": ["v1", "l1"], "layer": ["a", "b"], "modality": ["vision", "language"],
            "mean_residual": [0.2, 0.3],
        }), theme=theme),
        "fig2": charts.paper_figure(figures.dispersion_sets_figure, sets, theme=theme),
        "figS2": charts.paper_figure(
            figures.leave_one_out_figure, points, statistics, theme=theme
        ),
    }


def test_every_picture_has_the_themes_background_and_light_text_on_dark(_cache_dir) -> None:
    """Planted answer: the corner (the figure's background) is opaque white on the light theme
    and transparent on the dark one; laid on a dark page, the picture's text and lines are light
    (many near-white pixels) and none is the old black ink."""
    from convergence_core.run import load_run

    run = load_run(_cache_dir / "runs" / "demo")
    light, dark = _pictures(run, "light"), _pictures(run, "dark")
    for name in light:
        bright, night = _pixels(light[name]), _pixels(dark[name])
        assert tuple(bright[1, 1]) == (*WHITE, 255), name
        assert night[1, 1, 3] == 0 and night[-2, -2, 3] == 0, name  # transparent
        lightness = _on_page(night).mean(axis=2)
        assert (lightness > 200).mean() > 0.002, name  # light text
        ink = (night[..., 3] > 200) & (night[..., :3].mean(axis=2) < 40)
        assert ink.mean() < 0.0005, name  # no black text or lines


def test_on_dark_every_text_and_grey_line_or_point_is_light(monkeypatch) -> None:
    """The colours the pictures pick themselves (zero lines and medians drawn black or #222,
    grey points #444) turned light on the dark theme, as every text did; on the light theme they
    are what they were."""
    monkeypatch.setattr(charts, "png", lambda figure: figure)
    found_light = {"components": [], "bars": [], "cross-modal": []}
    for theme in ("dark", "light"):
        drawn = {
            "components": charts.residual_components(
                np.array([0.7, 0.3]), np.array([[0.5, -0.5], [0.5, 0.5]]), ["a", "b"],
                theme=theme,
            ),
            "bars": charts.residual_bars(
                ["a", "b"], np.array([0.1, 0.2]), np.array([0.15, 0.1]), "s1", theme=theme
            ),
            "cross-modal": charts.cross_modal_scatter(
                np.arange(5.0), np.arange(5.0), title="t", x_title="x", y_title="y", theme=theme
            ),
        }
        for name, figure in drawn.items():
            colours = [t.get_color() for t in figure.findobj(matplotlib.text.Text)
                       if t.get_text()]
            colours += [line.get_color() for line in figure.findobj(matplotlib.lines.Line2D)
                        if line.get_visible()]
            for collection in figure.findobj(matplotlib.collections.PathCollection):
                colours += [tuple(c[:3]) for c in collection.get_facecolors()]
                colours += [tuple(c[:3]) for c in collection.get_edgecolors()]
            greys = [c for c in colours if _is_grey(c)]
            assert greys, name
            if theme == "dark":
                assert min(map(_luminance, greys)) > 0.55, (name, greys)
            else:
                found_light[name] = greys
    assert min(map(_luminance, found_light["components"])) == 0.0  # black zero line, black text
    # the map's lowest values were viridis's deep purple (#440154), lost on the dark background
    for theme, darkest in (("dark", (0.2, 1.0)), ("light", (0.0, 0.1))):
        figure = charts.residual_scatter(
            np.arange(3.0), np.arange(3.0), np.arange(3.0), colour_title="c", x_title="x",
            y_title="y", title="t", theme=theme,
        )
        lowest = figure.axes[0].collections[0].cmap(0.0)
        assert darkest[0] <= _luminance(lowest[:3]) <= darkest[1], (theme, lowest)
    assert "#222222" in {matplotlib.colors.to_hex(c) for c in found_light["bars"]}
    assert "#444444" in {matplotlib.colors.to_hex(c) for c in found_light["cross-modal"]}


def test_the_lab_bars_svg_follows_the_theme() -> None:
    import xml.etree.ElementTree as ET

    rows = [
        {"vision_model": "v", "language_model": m, "set": s, "set_size": 30, "metric": "cknna",
         "k": 10, "value": 0.1 + 0.1 * i}
        for i, m in enumerate(("a", "b")) for s in ("low", "high")
    ]
    baseline = pd.DataFrame([
        {"vision_model": "v", "language_model": m, "metric": "cknna", "random_mean": 0.2,
         "random_lower_95": 0.1, "random_upper_95": 0.3, "n_random": 40}
        for m in ("a", "b")
    ])
    space = "{http://www.w3.org/2000/svg}"
    for theme, paper in (("light", "white"), ("dark", "none")):
        text = charts.alignment_bars(pd.DataFrame(rows), baseline, theme=theme)
        svg = ET.fromstring(text)
        assert next(svg.iter(f"{space}rect")).get("fill") == paper
        # the error bars (paths) and the panels' frames (unfilled rectangles)
        strokes = {e.get("stroke") for e in svg.iter(f"{space}path")} | {
            e.get("stroke") for e in svg.iter(f"{space}rect")
            if e.get("fill") == "none" and e.get("stroke")
        }
        assert len(strokes) >= 1
        if theme == "dark":
            assert _luminance(svg.get("fill")) > 0.9  # every text
            assert all(_luminance(s) > 0.5 for s in strokes), strokes
        else:
            assert svg.get("fill") in (None, "black") and strokes == {"black"}
    with pytest.raises(ValueError, match="unknown theme"):
        charts.alignment_bars(pd.DataFrame(rows), baseline, theme="sepia")


def test_the_report_files_stay_light(tmp_path) -> None:
    """The report's PNG files (no theme) are drawn on white as before."""
    from convergence_core import figures

    points = pd.DataFrame({"held_out_model": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
                           "partial_dispersion": [0.1, 0.2, 0.3] * 3,
                           "deviation": [0.1, 0.3, 0.2] * 3})
    statistics = pd.DataFrame({
        "held_out_model": ["a", "b", "c"], "fit_slope": 0.5, "fit_intercept": 0.1,
        "pearson_r": 0.5, "pearson_p_value": 0.1, "spearman_rho": 0.4, "spearman_p_value": 0.2,
    })
    path = figures.leave_one_out_figure(points, statistics, tmp_path / "s2.png")
    assert _corner(path.read_bytes()) == (*WHITE, 255)
    assert matplotlib.rcParams["axes.facecolor"] == "white"  # nothing leaks out


@pytest.mark.parametrize("context, expected", [({"theme": "dark"}, "dark"),
                                               ({"theme": "light"}, "light"), ({}, "light")])
def test_home_draws_its_picture_for_the_browsers_theme(
    _cache_dir, monkeypatch, context, expected
) -> None:
    """The pages call the figure functions as before; the dashboard layer reads the browser's
    theme (``st.context.theme.type``, unknown: light) and draws (and caches) for it."""
    monkeypatch.setenv("CONVERGENCE_CACHE", str(_cache_dir))
    drawn: list[tuple[str, tuple[int, ...]]] = []
    original = charts.dispersion_histograms

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        picture = original(*args, **kwargs)
        drawn.append((kwargs.get("theme"), _clear(_corner(picture))))
        return picture

    monkeypatch.setattr(charts, "dispersion_histograms", recording)
    data.dispersion_histograms_png.clear()
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
        at.context = context
        at.run(timeout=TIMEOUT)
        assert not at.exception, at.exception
        assert len(at.image) >= 1
    finally:
        data.dispersion_histograms_png.clear()
    assert drawn == [(expected, expected == "dark")]


def test_a_named_theme_wins_and_each_theme_is_cached_apart(_cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(data, "page_theme", lambda: "dark")
    run_path = str(_cache_dir / "runs" / "demo")
    stamp = data.manifest_stamp(Path(run_path))
    data.residual_components_png.clear()
    try:
        dark = data.residual_components_png(run_path, stamp)  # the page's theme
        light = data.residual_components_png(run_path, stamp, theme="light")
    finally:
        data.residual_components_png.clear()
    assert _clear(_corner(dark)) and _corner(light) == (*WHITE, 255)


@pytest.mark.browser
def test_a_dark_browser_gets_dark_pictures(_cache_dir) -> None:
    """In Chromium with a dark colour scheme (Streamlit's dark theme), Home's picture shows the
    page's own dark background at its corner (it was a white box); with a light one, white."""
    from playwright.sync_api import sync_playwright

    from convergence_core.dashboard import headless

    if not headless.CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: install Debian's chromium (.ci/run does)")
    port = headless.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "convergence_core.dashboard.serve", "--cache", str(_cache_dir),
         "--port", str(port), "--server.headless", "true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "CONVERGENCE_CACHE": str(_cache_dir)},
    )
    base = f"http://localhost:{port}"
    start = time.monotonic()
    try:
        headless.wait_healthy(base, server)
        with sync_playwright() as playwright:
            browser = headless.launch_chromium(playwright)
            corners, pages = {}, {}
            for scheme in ("dark", "light"):
                context = browser.new_context(
                    color_scheme=scheme, viewport={"width": 1400, "height": 1000}
                )
                tab = context.new_page()
                tab.goto(f"{base}/")
                tab.wait_for_function(headless.PAGE_DRAWN, polling="raf", timeout=60_000)
                image = tab.locator('[data-testid="stImage"] img').first
                corners[scheme] = tuple(_pixels(image.screenshot())[2, 2, :3])
                pages[scheme] = tab.evaluate(
                    "() => getComputedStyle(document.querySelector('[data-testid=\"stApp\"]'))"
                    ".backgroundColor"
                )
                context.close()
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    for scheme, page in pages.items():  # "rgb(r, g, b)"
        background = [int(v) for v in page[page.index("(") + 1:-1].split(",")[:3]]
        assert max(abs(a - b) for a, b in zip(corners[scheme], background)) <= 3, (
            scheme, corners, pages)
    assert max(corners["dark"]) < 60 and min(corners["light"]) >= 250, corners
    assert time.monotonic() - start < 60


def test_dark_theme_points_and_the_layer_sweep_read_on_the_dark_page() -> None:
    """From the visual review of the dark pages: the per-stimulus scatter's blue points (alpha
    0.6) read at 2.1:1, and the layer sweep's heat map kept viridis's deep purple (#440154)."""
    from convergence_core import figures
    from convergence_core.figure_style import tint

    assert tint("#1f77b4", "light") == "#1f77b4"
    assert _luminance(to_rgb(tint("#1f77b4", "dark"))) > _luminance(to_rgb("#1f77b4")) + 0.15
    sweep = pd.DataFrame({
        "vision_model": ["v"] * 4, "vision_layer": ["b"] * 4, "language_model": ["t"] * 4,
        "language_layer": list("abcd"), "language_layer_index": [0, 1, 2, 3], "k": [10] * 4,
        "cknna": [0.1, 0.2, 0.3, 0.4], "n_stimuli_used": [10] * 4, "sample_seed": [None] * 4,
    })
    purple = np.array([68, 1, 84])
    for theme, expected in (("light", True), ("dark", False)):
        picture = np.asarray(Image.open(io.BytesIO(
            charts.paper_figure(figures.layer_sweep_figure, sweep, theme=theme)
        )).convert("RGB"), dtype=int)
        found = bool((np.abs(picture - purple).max(axis=2) <= 6).mean() > 0.01)  # a cell of 4
        assert found is expected, theme
