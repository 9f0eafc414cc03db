"""Static figures of the dashboard: PNG bytes drawn on the server with matplotlib (no Streamlit).

Why pictures and not Plotly: Plotly's JavaScript is 4.7 MB that a browser tab parses and runs before
it draws anything (about as long as a whole bare Streamlit page takes to load), and these figures
gain nothing from zooming or hovering: every number in them is also in a table on the same page.
The one figure that needs interaction, the residual-space scatter with its lasso, stays Plotly
(:mod:`.plots`). A PNG costs the browser one small image request. The Alignment lab's bars
(:func:`alignment_bars`) are redrawn on every change of k and are written as SVG text directly
(a millisecond, where matplotlib took 0.2 s).

The functions are pure (inputs in, PNG bytes out) and thread-safe: they draw on
``matplotlib.figure.Figure`` objects that pyplot never sees (Streamlit runs each session's script
in its own thread; pyplot's global state is not thread-safe). The paper's figures are drawn by
:mod:`convergence_core.figures`, the report's own code, which uses pyplot: :func:`paper_figure`
serialises those calls with a lock. Text that comes from a run (model and layer names) is drawn
literally (a ``$`` never starts matplotlib's math mode).
"""

from __future__ import annotations

import functools
import html
import io
import math
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import metrics as registry
from ..figure_style import (
    DARK_BACKGROUND, DARK_FRAME, DARK_GRID, DPI, FULL_WIDTH, STYLE, THEMES, colour_map, ink,
    styled, tint, wrap,
)
from ..stats import spread_words
from .catalogue import p_phrase
from .plots import RESIDUAL_AXIS, SCORE_AXIS, SCORE_NAME, SET_COLOURS
from .predictor_plots import EFFECT_AXIS, NOT_SIGNIFICANT, SIGNIFICANT
from .universal_plots import MODALITY_COLOURS, merged_units

#: Figure sizes below are in inches at ``DPI`` (:mod:`convergence_core.figure_style`, which sets
#: every picture's font sizes): ``FULL_WIDTH`` for a picture across the page's main column (shown
#: at 564 CSS px in a 1024-px window, 900 at 1400), ``PART_WIDTH`` for one in two thirds of it
#: (the Stimuli page's detail column: 370 px and 600 px).
PART_WIDTH = 5.0
_PYPLOT_LOCK = threading.Lock()
#: Height of axes titles (axes fraction). Given explicitly, matplotlib does not measure every
#: tick label to place each title, which was a fifth of a figure's drawing time.
TITLE_Y = 1.01
#: Height (inches) of a line of text at the style's sizes, with its spacing
_LINE = {"tick": 0.2, "label": 0.21, "title": 0.22, "suptitle": 0.24}


def _styled(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Draw (and encode) the picture in the shared style (``figure_style.styled``), for the
    keyword ``theme`` ("light", the default, or "dark": the page's Streamlit theme)."""

    @functools.wraps(draw)
    def drawn(*args: Any, theme: str = "light", **kwargs: Any) -> Any:
        with styled(theme=theme):
            return draw(*args, **kwargs)

    return drawn


def _lines(text: str) -> int:
    return text.count("\n") + 1


def _text_inches(text: object, points: float) -> float:
    """About how wide ``text`` (its longest line) is at ``points`` (DejaVu Sans)."""
    return max(len(line) for line in str(text).split("\n")) * 0.56 * points / 72.0


def _turned(labels: Sequence[str], inches: float) -> tuple[bool, float, float]:
    """Whether category tick labels under a plot ``inches`` wide are turned 30° (side by side
    they would run into each other), the height (inches) they then take, and how far (inches)
    the first reaches left of the plot."""
    size = float(STYLE["xtick.labelsize"])  # type: ignore[arg-type]
    widest = max((_text_inches(label, size) for label in labels), default=0.0)
    lines = max((_lines(label) for label in labels), default=1)
    slot = inches / max(1, len(labels))
    if widest + 0.1 <= slot:
        return False, _LINE["tick"] * lines + 0.1, 0.0
    angle = math.radians(30)
    height = widest * math.sin(angle) + _LINE["tick"] * lines * math.cos(angle)
    return True, height, max(0.0, widest * math.cos(angle) - slot / 2)


def _x_ticks(axis: Any, labels: Sequence[str], inches: float) -> None:
    """Category tick labels under ``axis`` (a plot ``inches`` wide), turned as :func:`_turned`
    says."""
    if _turned(labels, inches)[0]:
        axis.set_xticks(
            np.arange(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor"
        )
    else:
        axis.set_xticks(np.arange(len(labels)), labels)


def literal(text: object) -> str:
    """``text`` as matplotlib draws it literally: every ``$`` escaped (no math mode)."""
    return str(text).replace("$", r"\$")


def _margins(
    figure: Figure, *, left: float, right: float, top: float, bottom: float, wspace: float = 0.25
) -> None:
    """Fixed margins in inches (matplotlib's constrained layout would double the drawing time)."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(
        left=left / width,
        right=1.0 - right / width,
        top=1.0 - top / height,
        bottom=bottom / height,
        wspace=wspace,
    )


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes (``DPI`` dots per inch)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # the style's sizes were set when drawn
    return buffer.getvalue()


#: Histogram colours of the dispersion scores, in the order of ``dispersion.SCORES``
_SCORE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


@_styled
def dispersion_histograms(scores: Mapping[str, np.ndarray], title: str) -> bytes:
    """Side-by-side histograms (40 bins) of the dispersion scores, ``{score name: (m,) values}``
    (names of ``dispersion.SCORES``, drawn in that order)."""
    names = [name for name in SCORE_NAME if name in scores]
    panel = (FULL_WIDTH - 0.4) / max(1, len(names)) - 0.7  # a panel's plot area (inches)
    heading = wrap(literal(title), FULL_WIDTH - 0.3, float(STYLE["figure.titlesize"]))
    x_titles = [wrap(SCORE_AXIS[name], panel + 0.4) for name in names]
    top = 0.15 + _LINE["suptitle"] * _lines(heading) + _LINE["title"] + 0.1
    bottom = 0.35 + _LINE["label"] * max(map(_lines, x_titles), default=1)
    figure = Figure(figsize=(FULL_WIDTH, top + bottom + 2.2))
    axes = np.atleast_1d(figure.subplots(1, len(names)))
    _margins(figure, left=0.75, right=0.15, top=top, bottom=bottom, wspace=0.75 / panel)
    for i, (axis, name) in enumerate(zip(axes, names)):
        colour = _SCORE_COLOURS[i % len(_SCORE_COLOURS)]
        axis.hist(np.asarray(scores[name], dtype=np.float64), bins=40, color=colour)
        axis.set_xlabel(x_titles[i])
        axis.set_ylabel("stimuli (count)")
        label = SCORE_NAME[name]
        axis.set_title(label[:1].upper() + label[1:], y=TITLE_Y)  # "PC1 score" stays
    figure.suptitle(heading, y=1.0 - 0.12 / figure.get_figheight(), va="top")
    return png(figure)


@_styled
def residual_scatter(
    x: np.ndarray,
    y: np.ndarray,
    colour: np.ndarray,
    *,
    colour_title: str,
    x_title: str,
    y_title: str,
    title: str,
    selected: Sequence[int] = (),
) -> bytes:
    """The residual map as a picture: every stimulus (n,) coloured by ``colour`` (viridis,
    ``figure_style.colour_map``, with a colour bar), the ``selected`` rows circled in red.
    Points are rasterised, so the PNG costs the same at 100,000 stimuli as at 1,000."""
    n = len(x)
    height = 5.2  # the plot area is about 4 in high
    chosen = np.asarray(selected, dtype=np.int64)
    legend = 0.3 if chosen.size else 0.0  # the selection's legend, between title and plot
    heading = wrap(literal(title), FULL_WIDTH - 1.0, float(STYLE["axes.titlesize"]))
    top = 0.12 + _LINE["title"] * _lines(heading) + legend
    plot_height = height - top - 0.62
    y_label = wrap(literal(y_title), plot_height)
    colour_label = wrap(literal(colour_title.replace("<br>", " ")), plot_height)
    figure = Figure(figsize=(FULL_WIDTH, height))
    axis = figure.subplots()
    _margins(
        figure, left=0.72 + _LINE["label"] * _lines(y_label), top=top, bottom=0.62,
        right=0.6 + _LINE["label"] * _lines(colour_label),
    )
    size = _point_size(n)
    points = axis.scatter(
        x, y, c=colour, s=size, cmap=colour_map(), alpha=0.85, linewidths=0, rasterized=True
    )
    if chosen.size:
        axis.scatter(
            np.asarray(x)[chosen], np.asarray(y)[chosen], s=60 if chosen.size <= 2_000 else 12,
            facecolors="none", edgecolors="#d62728", linewidths=1.2, rasterized=True,
            label=f"current selection ({chosen.size:,})",
        )
        axis.legend(
            loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, borderaxespad=0.1
        )
    bar = figure.colorbar(points, ax=axis, fraction=0.04, pad=0.02)
    bar.set_label(colour_label)
    axis.set_xlabel(wrap(literal(x_title), FULL_WIDTH - 1.5))
    axis.set_ylabel(y_label)
    axis.set_title(heading, y=1.0 + legend / plot_height + 0.01)
    return png(figure)


@_styled
def residual_components(
    ratio: np.ndarray, components: np.ndarray, models: Sequence[str], modality: str = "vision"
) -> bytes:
    """Two panels: variance of the residuals explained per principal component (M,), and each
    GPA model's loading on the first two components (rows of ``components`` (M, M));
    ``modality`` names the GPA models (``Run.gpa_modality``: vision, brain, ...)."""
    # one panel under the other, each as wide as the column: side by side, the model names under
    # the loadings had no room
    plot = FULL_WIDTH - 1.2
    names = [literal(m) for m in models]
    ticks = _turned(names, plot)[1]
    gap = 0.5 + 0.12 + _LINE["title"]  # the upper panel's x label, the lower one's title
    heights = (2.2, 2.2)
    top, bottom = 0.12 + _LINE["title"], ticks + 0.35
    figure = Figure(figsize=(FULL_WIDTH, top + sum(heights) + gap + bottom + 0.15))
    upper, lower = figure.subplots(2, 1)
    _margins(figure, left=0.95, right=0.2, top=top, bottom=bottom)
    figure.subplots_adjust(hspace=(gap + 0.15) / (sum(heights) / 2))
    labels = [f"PC{i + 1}" for i in range(len(ratio))]
    upper.bar(labels, 100.0 * np.asarray(ratio, dtype=np.float64), color="#1f77b4")
    upper.set_xlabel("principal component of the residual matrix R")
    upper.set_ylabel("variance explained (%)")
    upper.set_title("Variance of the residuals explained per component", y=TITLE_Y)
    x = np.arange(len(models))
    shown = min(2, np.asarray(components).shape[0])
    for index in range(shown):
        offset = (index - (shown - 1) / 2) * 0.35
        lower.bar(x + offset, np.asarray(components)[index], 0.35, label=f"PC{index + 1}")
    lower.axhline(0.0, color=ink(), linewidth=0.5)
    _x_ticks(lower, names, plot)
    lower.set_xlabel(literal(f"{modality} model (GPA)"))
    lower.set_ylabel(wrap("loading (unit-norm weight)", heights[1]))
    lower.set_title("Per-model loadings of the first components", y=TITLE_Y)
    lower.legend()
    return png(figure)


@_styled
def residual_bars(
    models: Sequence[str], residuals: np.ndarray, typical: np.ndarray, stimulus: str,
    modality: str = "vision",
) -> bytes:
    """Bar per GPA model (``modality``: vision, brain, ...) of one stimulus's residual (M,), each
    model's median (M,) marked."""
    # drawn for two thirds of the page's column (the Stimuli page's detail beside the picture)
    plot = PART_WIDTH - 1.15
    names = [literal(m) for m in models]
    ticks = _turned(names, plot)[1]
    heading = wrap(
        literal(f"Residual per {modality} model — stimulus {stimulus}"), PART_WIDTH - 0.4,
        float(STYLE["axes.titlesize"]),
    )
    top = 0.12 + _LINE["title"] * _lines(heading) + 0.3  # the title, the legend under it
    bottom = ticks + 0.35
    y_label = wrap(RESIDUAL_AXIS, 2.9)
    figure = Figure(figsize=(PART_WIDTH, top + bottom + 2.7))
    axis = figure.subplots()
    _margins(
        figure, left=0.6 + _LINE["label"] * _lines(y_label), right=0.15, top=top, bottom=bottom
    )
    x = np.arange(len(models))
    axis.bar(x, residuals, 0.6, color="#1f77b4", label="this stimulus")
    axis.scatter(
        x, typical, marker="_", s=900, linewidths=3, color=ink("#222222"),
        label="median over all stimuli",
    )
    _x_ticks(axis, names, plot)
    axis.set_xlabel(literal(f"{modality} model (GPA)"))
    axis.set_ylabel(y_label)
    axis.set_title(heading, y=1.0 + 0.3 / 2.7 + 0.01)
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False,
                borderaxespad=0.1)
    return png(figure)


def metric_axis(metric: str) -> str:
    """Axis title of a registry metric: its label and its unit (``metrics.Metric.axis_title``)."""
    return registry.metric(metric).axis_title


def _svg_text(text: object) -> str:
    """Text from a run (model names, set names) as SVG character data: escaped, never markup."""
    return html.escape(str(text), quote=True)  # as plots.safe_hover_text escapes hover text


def _error_bar_words(counts: Sequence[int]) -> str:
    """The title's words for the error bars: the random sets behind them where every bar has
    as many, else the legend's (a selection of another size has random sets of its own size, often
    fewer: the title said "95% of 47 sets" beside bars of 114)."""
    if len(set(counts)) == 1:
        return spread_words(counts[0])
    return "the spread of each bar's random sets (their number in the legend)"


def alignment_bars(
    sets: pd.DataFrame,
    baseline: pd.DataFrame | None,
    metric: str | None = None,
    modalities: tuple[str, str] = ("vision", "language"),
    matched: pd.DataFrame | None = None,
    theme: str = "light",
) -> str:
    """Fig. 2-style bars as an SVG document: a panel per vision model, language models on x, a bar
    per set.

    ``sets``: long, one row per pair × set × metric (``lab.set_table``: ``vision_model``,
    ``language_model``, ``set``, ``set_size``, ``metric``, ``k``, ``value``); ``baseline``
    (``lab.baseline_table``) adds the "random" bar of each pair at the random-set mean with the 95%
    percentile interval of the random sets as its error bar. ``metric``: which metric's rows to
    draw (default: the one metric the table holds). ``modalities``: what is aligned, for the
    title and the x axis (``analyses.pair_modalities``, e.g. ``("vision", "brain")``).
    ``matched``: the random baseline at the size of the set that is neither low nor high (a
    selection or pasted ids), drawn beside it as "random of N" when N is not the main size:
    alignment depends on the set size, so that set is compared with random sets of its own size.
    ``theme``: "light" (black on white) or "dark" (light text and lines on a transparent
    background, the dark page's own, as :func:`figure_style.styled` draws the PNGs).

    Written as SVG text rather than drawn with matplotlib: the lab redraws these bars on every
    change of k, metric or set, and matplotlib took 0.2 s for them (half of a k change) where this
    takes about a millisecond. NaN values draw no bar; every text is escaped.
    """
    if theme not in THEMES:
        raise ValueError(f"unknown theme {theme!r}; use one of {list(THEMES)}")
    present = list(dict.fromkeys(sets["metric"]))
    if metric is None:
        if len(present) != 1:
            raise ValueError(f"the table holds metrics {present}; say which one to draw")
        metric = present[0]
    if metric not in present:
        raise ValueError(f"unknown metric {metric!r} for these tables; use one of {present}")
    sets = sets[sets["metric"] == metric]
    if baseline is not None:
        baseline = baseline[baseline["metric"] == metric]
    visions = list(dict.fromkeys(sets["vision_model"]))
    languages = list(dict.fromkeys(sets["language_model"]))
    names = list(dict.fromkeys(sets["set"]))
    has_baseline = baseline is not None and not baseline.empty
    order = [n for n in ("low",) if n in names] + (["random"] if has_baseline else [])
    order += [n for n in ("high",) if n in names] + [n for n in names if n not in ("low", "high")]
    # the other set's own-size random baseline, right after it
    others = [n for n in names if n not in ("low", "high")]
    matched_name = None
    if matched is not None and not matched.empty and others:
        matched = matched[matched["metric"] == metric]
        other_size = int(sets.loc[sets["set"] == others[0], "set_size"].iloc[0])
        main_sizes = set(sets.loc[sets["set"].isin(["low", "high"]), "set_size"].astype(int))
        if not matched.empty and other_size not in main_sizes:
            matched_name = f"random of {other_size:,}"
            order.insert(order.index(others[0]) + 1, matched_name)

    # bars[vision][name] = (heights (L,), lower (L,) or None, upper (L,) or None); legend labels
    bars: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]] = {}
    labels: dict[str, str] = {}
    random_counts: list[int] = []  # random sets behind each pair's error bar
    for vision in visions:
        bars[vision] = {}
        for name in order:
            if name in ("random", matched_name):
                rows = (baseline if name == "random" else matched)
                rows = rows[rows["vision_model"] == vision]
                rows = rows.set_index("language_model").reindex(languages)
                mean = rows["random_mean"].to_numpy(dtype=np.float64)
                bars[vision][name] = (
                    mean,
                    rows["random_lower_95"].to_numpy(dtype=np.float64),
                    rows["random_upper_95"].to_numpy(dtype=np.float64),
                )
                drawn = int(np.nanmax(rows["n_random"])) if "n_random" in rows else 0
                random_counts.append(drawn)
                labels[name] = f"{name} (mean; {spread_words(drawn)})"
                continue
            rows = sets[(sets["vision_model"] == vision) & (sets["set"] == name)]
            rows = rows.set_index("language_model").reindex(languages)
            bars[vision][name] = (rows["value"].to_numpy(dtype=np.float64), None, None)
            size = sets.loc[sets["set"] == name, "set_size"].iloc[0]
            labels[name] = f"{name} ({int(size)} stimuli)"

    drawn_values = [
        part for entry in bars.values() for heights, low, high in entry.values()
        for part in (heights, low, high) if part is not None
    ]
    finite = np.concatenate([v[np.isfinite(v)] for v in drawn_values] + [np.zeros(1)])
    ticks = MaxNLocator(nbins=6).tick_values(float(finite.min()), float(finite.max()))
    bottom_value, top_value = float(ticks[0]), float(ticks[-1])
    if top_value <= bottom_value:
        top_value = bottom_value + 1.0

    # layout in pixels: as wide as the PNGs (FULL_WIDTH × DPI), text at the style's sizes
    # (points × DPI / 72): shrunk into a 1024-px window's column, a tick label is still ~10 px
    width = int(FULL_WIDTH * DPI)
    px = DPI / 72.0
    tick_px, label_px, panel_px, title_px = (
        round(float(STYLE[name]) * px)  # type: ignore[arg-type]
        for name in ("xtick.labelsize", "axes.labelsize", "axes.titlesize", "figure.titlesize")
    )
    char = 0.56 * tick_px  # a character's average width
    n_panels = max(1, len(visions))
    width_per_bar = 0.8 / max(1, len(order))
    left, right, gap = 50.0 + 0.56 * label_px + 0.56 * tick_px * 5, 12.0, 16.0
    # at most three panels a row, each wide enough for its language models' names and bars
    group_needed = max(
        max((len(str(name)) for name in languages), default=1) * char + 12.0,
        len(order) * 14.0 / 0.8,
    )
    panel_needed = max(180.0, len(languages) * group_needed)
    columns = max(1, min(n_panels, 3, int((width - left - right + gap) // (panel_needed + gap))))
    n_rows = -(-n_panels // columns)
    panel_width = (width - left - right - gap * (columns - 1)) / columns
    plot_height = 230.0
    above = panel_px + 14.0  # the panel's title
    below = tick_px + 10.0 + label_px + 14.0  # the language models' names, the x axis title
    row_height = above + plot_height + below

    settings = str(sets["options"].iloc[0]) if "options" in sets and not sets.empty else ""
    title = (
        f"{modalities[0].capitalize()} × {modalities[1]} alignment per set: "
        f"{registry.metric(metric).label}"
        + (f" ({settings})" if settings else "")
        + (f"; error bars: {_error_bar_words(random_counts)}" if random_counts else "")
    )
    heading = wrap(title, (width - 20) / DPI, float(STYLE["figure.titlesize"])).split("\n")
    top = 10.0 + 1.25 * title_px * len(heading)
    # legend: one swatch and label per set, in as many lines as the width needs
    entries = [(_bar_colour(n, matched_name, theme), labels[n]) for n in order]
    steps = [22.0 + 0.56 * tick_px * len(text) + 18.0 for _, text in entries]
    legend_rows: list[list[int]] = [[]]
    for index, step in enumerate(steps):
        row = legend_rows[-1]
        if row and sum(steps[i] for i in row) + step > width - 20:
            legend_rows.append([])
        legend_rows[-1].append(index)
    line_height = 1.5 * tick_px
    # in the last row's empty cells when there are some, one entry a line; else under the panels
    spare_x = left + (n_panels - (n_rows - 1) * columns) * (panel_width + gap) + 10
    in_spare = n_rows > 1 and spare_x + 22 + max(steps) - 18 <= width
    if in_spare:
        legend_rows = [[i] for i in range(len(entries))]
    height = int(
        top + n_rows * row_height + (0 if in_spare else len(legend_rows) * line_height) + 12
    )

    def y_of(value: float, y0: float) -> float:
        return y0 + plot_height * (top_value - value) / (top_value - bottom_value)

    # the theme's colours: background, text (inherited by every text), frames, grid, lines
    paper, writing, frame, grid = (
        (DARK_BACKGROUND, ink(theme="dark"), DARK_FRAME, DARK_GRID) if theme == "dark"
        else ("white", "black", "black", "#e6e6e6")
    )
    ink_line = ink(theme=theme)  # error bars and the zero line
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" '
        f'font-size="{tick_px}" fill="{writing}" role="img">',
        f"<title>{_svg_text(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="{paper}"/>',
    ]
    for line, text in enumerate(heading):
        out.append(
            f'<text x="{width / 2:.1f}" y="{8 + title_px * (1 + 1.25 * line):.1f}" '
            f'text-anchor="middle" font-size="{title_px}">{_svg_text(text)}</text>'
        )
    for index, vision in enumerate(visions):
        row, column = divmod(index, columns)
        x0 = left + column * (panel_width + gap)
        y0 = top + row * row_height + above  # the plot's top
        group = panel_width / max(1, len(languages))
        out.append(
            f'<text x="{x0 + panel_width / 2:.1f}" y="{y0 - 8:.1f}" text-anchor="middle" '
            f'font-size="{panel_px}">{_svg_text(vision)}</text>'
        )
        for value in ticks:
            y = y_of(float(value), y0)
            out.append(f'<line x1="{x0:.1f}" x2="{x0 + panel_width:.1f}" y1="{y:.1f}" '
                       f'y2="{y:.1f}" stroke="{grid}"/>')
            if column == 0:
                out.append(f'<line x1="{x0 - 4:.1f}" x2="{x0:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                           f'stroke="{frame}"/>')
                out.append(f'<text x="{x0 - 7:.1f}" y="{y:.1f}" text-anchor="end" '
                           f'dominant-baseline="central">{float(value):g}</text>')
        for position, language in enumerate(languages):
            centre = x0 + (position + 0.5) * group
            out.append(f'<text x="{centre:.1f}" y="{y0 + plot_height + tick_px + 6:.1f}" '
                       f'text-anchor="middle">{_svg_text(language)}</text>')
            bar_width = group * width_per_bar
            for slot, name in enumerate(order):
                heights, lower, upper = bars[vision][name]
                value = heights[position]
                if not np.isfinite(value):
                    continue
                x = centre + (slot - len(order) / 2) * bar_width
                y_top, y_zero = y_of(max(value, 0.0), y0), y_of(min(value, 0.0), y0)
                colour = _bar_colour(name, matched_name, theme)
                out.append(
                    f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar_width:.1f}" '
                    f'height="{max(y_zero - y_top, 0.5):.1f}" fill="{colour}">'
                    f"<title>{_svg_text(f'{vision} × {language}, {name}: {value:.4f}')}</title>"
                    "</rect>"
                )
                if lower is not None and np.isfinite(lower[position]):
                    middle = x + bar_width / 2
                    y_low = y_of(float(lower[position]), y0)
                    y_high = y_of(float(upper[position]), y0)
                    out.append(
                        f'<path d="M{middle:.1f},{y_low:.1f}V{y_high:.1f}'
                        f'M{middle - 4:.1f},{y_low:.1f}h8M{middle - 4:.1f},{y_high:.1f}h8" '
                        f'stroke="{ink_line}" stroke-width="1.3" fill="none"/>'
                    )
        zero = y_of(0.0, y0)
        out.append(f'<line x1="{x0:.1f}" x2="{x0 + panel_width:.1f}" y1="{zero:.1f}" '
                   f'y2="{zero:.1f}" stroke="{ink_line}" stroke-width="0.6"/>')
        out.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{panel_width:.1f}" '
                   f'height="{plot_height:.1f}" fill="none" stroke="{frame}" stroke-width="0.8"/>')
        out.append(f'<text x="{x0 + panel_width / 2:.1f}" '
                   f'y="{y0 + plot_height + tick_px + label_px + 14:.1f}" text-anchor="middle" '
                   f'font-size="{label_px}">{_svg_text(modalities[1])} model</text>')
        if column == 0:  # the y axis title, beside each row's first panel
            middle_y = y0 + plot_height / 2
            out.append(
                f'<text x="{6 + label_px:.1f}" y="{middle_y:.1f}" text-anchor="middle" '
                f'font-size="{label_px}" '
                f'transform="rotate(-90 {6 + label_px:.1f} {middle_y:.1f})">'
                f"{_svg_text(metric_axis(metric))}</text>"
            )
    y = top + n_rows * row_height + tick_px
    if in_spare:
        y = top + (n_rows - 1) * row_height + above + (plot_height - len(entries) * line_height) / 2
    for row in legend_rows:
        x = spare_x if in_spare else (width - sum(steps[i] for i in row)) / 2
        for i in row:
            colour, text = entries[i]
            out.append(f'<rect x="{x:.1f}" y="{y - 0.8 * tick_px:.1f}" width="16" '
                       f'height="{0.8 * tick_px:.1f}" fill="{colour}"/>')
            out.append(f'<text x="{x + 22:.1f}" y="{y:.1f}">{_svg_text(text)}</text>')
            x += steps[i]
        y += line_height
    out.append("</svg>")
    return "\n".join(out)


def _bar_colour(name: str, matched_name: str | None, theme: str = "light") -> str:
    """A set's bar colour; the own-size random baseline of a selection is a lighter grey than
    the random bars (a darker one on the dark theme, where its light error bar is drawn over it)."""
    if name == matched_name:
        return "#c7c7c7" if theme == "light" else "#555555"
    return SET_COLOURS.get(name, "#17becf")


#: Axis titles of the per-stimulus scores (stimulus_alignment)
PER_STIMULUS_AXIS = {
    "knn_overlap": "k-NN overlap\n(fraction of its k neighbours shared)",
    "local_cka": "local CKA\n(change in CKA when it joins the base)",
}


@_styled
def alignment_dispersion(
    dispersion: np.ndarray,
    values: dict[str, np.ndarray],
    relation: pd.DataFrame,
    *,
    score: str,
    k: int,
    title: str,
    base_size: int | None = None,
    marked: Sequence[int] = (),
    marked_label: str = "focus set",
) -> bytes:
    """Per-stimulus alignment against dispersion: a panel per score in ``values`` ({metric: (n,)}),
    x = the dispersion ``score`` (n,), each panel titled with Spearman ρ and its permutation p
    from ``relation`` (``stimulus_alignment.alignment_dispersion_relation``, one row per metric);
    ``base_size``: the local CKA's base; ``marked_label`` names the circled rows.
    Rasterised points (the same size at 100,000 stimuli); ``marked`` rows circled in red."""
    n = len(dispersion)
    # a panel per score, one under another, each as wide as the column (side by side, their
    # two-line titles ran into each other)
    heading = wrap(
        literal(f"Per-stimulus alignment against dispersion — {title} ({n:,} stimuli)"),
        FULL_WIDTH - 0.3, float(STYLE["figure.titlesize"]),
    )
    y_labels = {
        metric: wrap(literal(PER_STIMULUS_AXIS.get(metric, metric)), 2.7) for metric in values
    }
    left = 0.72 + _LINE["label"] * max(map(_lines, y_labels.values()), default=1)
    plot, panel_title = FULL_WIDTH - left - 0.2, 0.1 + 2 * _LINE["title"]
    top = 0.15 + _LINE["suptitle"] * _lines(heading) + panel_title
    gap = 0.62 + panel_title  # a panel's x label, the next one's title
    rows = max(1, len(values))
    figure = Figure(figsize=(FULL_WIDTH, top + rows * 2.7 + (rows - 1) * gap + 0.62))
    axes = np.atleast_1d(figure.subplots(rows, 1, squeeze=False)[:, 0])
    _margins(figure, left=left, right=0.2, top=top, bottom=0.62)
    figure.subplots_adjust(hspace=gap / 2.7)
    size = _point_size(n)
    chosen = np.asarray(marked, dtype=np.int64)
    x = np.asarray(dispersion, dtype=np.float64)
    for axis, (metric, y) in zip(axes, values.items(), strict=True):
        y = np.asarray(y, dtype=np.float64)
        axis.scatter(x, y, s=size, color=tint("#1f77b4"), alpha=0.6, linewidths=0,
                     rasterized=True)
        if chosen.size:
            axis.scatter(
                x[chosen], y[chosen], s=50, facecolors="none", edgecolors="#d62728",
                linewidths=1.0, rasterized=True,
                label=literal(f"{marked_label} ({chosen.size:,})"),
            )
            axis.legend(loc="best")
        row = relation[relation["metric"] == metric]
        words = ""
        if not row.empty:
            r = row.iloc[0]
            words = (
                f"Spearman ρ = {r['spearman_rho']:+.3f}, permutation "
                f"{p_phrase(r['permutation_p_value_two_sided'], r['n_permutations'])} "
                f"({int(r['n_permutations']):,} shuffles)"
            )
            finite = y[np.isfinite(y)]
            if not np.isfinite(r["spearman_rho"]) and finite.size and np.ptp(finite) == 0:
                words = f"ρ undefined: every stimulus scores {finite[0]:.3g}" + (
                    f" (k = {k} of {n - 1} others)" if metric == "knn_overlap" else ""
                )
        axis.set_xlabel(SCORE_AXIS[score])
        axis.set_ylabel(y_labels[metric])
        names = {
            "knn_overlap": f"k-NN overlap (k = {k})",
            "local_cka": "local CKA" + (f" (base of {base_size})" if base_size else ""),
        }
        name = names.get(metric, metric)
        axis.set_title(
            wrap(literal(f"{name}\n{words}" if words else name), plot,
                 float(STYLE["axes.titlesize"])),
            y=TITLE_Y,
        )
    figure.suptitle(heading, y=1.0 - 0.12 / figure.get_figheight(), va="top")
    return png(figure)


def _point_size(n: int) -> float:
    """Marker area (pt²) of a rasterised scatter of ``n`` points: smaller as they crowd."""
    return 14.0 if n <= 2_000 else (5.0 if n <= 20_000 else 1.5)


def _short(text: object, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (with …), drawn literally."""
    text = " ".join(str(text).split())
    return literal(text if len(text) <= limit else text[: limit - 1] + "…")


@_styled
def ranked_effects(tests: pd.DataFrame, *, score: str, top: int = 25, q: float = 0.05) -> bytes:
    """Horizontal bars of the ``top`` best-ranked properties of one score (rows of
    ``dispersion_predictors.property_tests``): ρ (signed) for numeric properties, √ε² for
    categorical ones; red where q < ``q``. Every number is also in the ranked table beside it."""
    rows = tests[tests["score"] == score].sort_values("rank").head(top).iloc[::-1]
    effect = np.where(rows["test"] == "spearman", rows["effect"], rows["strength"])
    significant = rows["q_value"].to_numpy() < q
    names = [_short(name, 50) for name in rows["property"]]
    size = float(STYLE["ytick.labelsize"])  # type: ignore[arg-type]
    # room for the longest name shown, the y axis title beside them
    left = 0.45 + max((_text_inches(name, size) for name in names), default=1.0)
    heading = wrap(
        f"Properties ranked by permutation p-value ({SCORE_NAME[score]}); red: q < {q} "
        "(Benjamini–Hochberg)",
        FULL_WIDTH - left - 0.2 + 1.0, float(STYLE["axes.titlesize"]),
    )
    x_title = wrap(EFFECT_AXIS, FULL_WIDTH - left)
    top = 0.12 + _LINE["title"] * _lines(heading)
    bottom = 0.35 + _LINE["label"] * _lines(x_title)
    figure = Figure(figsize=(FULL_WIDTH, top + bottom + max(1.8, 0.27 * len(rows))))
    axis = figure.subplots()
    _margins(figure, left=left, right=0.2, top=top, bottom=bottom)
    y = np.arange(len(rows))
    axis.barh(y, np.asarray(effect, dtype=np.float64),
              color=[SIGNIFICANT if s else NOT_SIGNIFICANT for s in significant])
    axis.axvline(0.0, color=ink(), linewidth=0.5)
    axis.set_yticks(y, names)
    axis.set_ylim(-0.6, len(rows) - 0.4)
    axis.set_xlabel(x_title)
    axis.set_ylabel("property")
    axis.set_title(heading, y=TITLE_Y)
    return png(figure)


@_styled
def cross_modal_scatter(
    intra: np.ndarray, cross: np.ndarray, *, title: str, x_title: str, y_title: str
) -> bytes:
    """Per stimulus (n,): intra-modal (vision) dispersion (x) against cross-modal dispersion (y),
    rasterised (the same PNG size at 100,000 stimuli as at 1,000)."""
    n = len(intra)
    heading = wrap(literal(title), FULL_WIDTH - 0.6, float(STYLE["axes.titlesize"]))
    y_label = wrap(literal(y_title), 3.2)
    top = 0.12 + _LINE["title"] * _lines(heading)
    figure = Figure(figsize=(FULL_WIDTH, top + 3.4 + 0.62))
    axis = figure.subplots()
    _margins(figure, left=0.72 + _LINE["label"] * _lines(y_label), right=0.2, top=top,
             bottom=0.62)
    axis.scatter(
        np.asarray(intra, dtype=np.float64), np.asarray(cross, dtype=np.float64),
        s=_point_size(n), color=ink("#444444"), alpha=0.6, linewidths=0, rasterized=True,
    )
    axis.set_xlabel(wrap(literal(merged_units(x_title)), FULL_WIDTH - 1.2))
    axis.set_ylabel(y_label)
    axis.set_title(heading, y=TITLE_Y)
    return png(figure)


@_styled
def model_residuals(model_summary: pd.DataFrame) -> bytes:
    """Mean residual of each model (``model``, ``layer``, ``modality``, ``mean_residual`` rows of
    ``CrossModalAnalysis.model_summary``) from the universal consensus, coloured by modality."""
    modalities = list(dict.fromkeys(model_summary["modality"]))
    labels = [  # the layer under the model's name: narrower labels
        f"{_short(m, 40)}\n({_short(layer, 40)})"
        for m, layer in zip(model_summary["model"], model_summary["layer"], strict=True)
    ]
    size = float(STYLE["legend.fontsize"])  # type: ignore[arg-type]
    # the legend beside the plot, not over the bars (it covered the last one)
    right = 0.75 + max((_text_inches(literal(m), size) for m in modalities), default=0.5)
    plot = FULL_WIDTH - 1.0 - right
    _, ticks, overhang = _turned(labels, plot)
    top, bottom = 0.12 + _LINE["title"], ticks + 0.35
    figure = Figure(figsize=(FULL_WIDTH, top + 2.4 + bottom))
    axis = figure.subplots()
    left = max(1.0, overhang + 0.1)
    _margins(figure, left=left, right=right, top=top, bottom=bottom)
    x = np.arange(len(model_summary))
    colour = {m: MODALITY_COLOURS[i % len(MODALITY_COLOURS)] for i, m in enumerate(modalities)}
    for modality in modalities:
        chosen = (model_summary["modality"] == modality).to_numpy()
        axis.bar(x[chosen], model_summary["mean_residual"].to_numpy(dtype=np.float64)[chosen],
                 0.6, color=colour[modality], label=literal(modality))
    _x_ticks(axis, labels, plot)
    axis.set_xlabel("model (layer)")
    axis.set_ylabel(wrap("mean residual (residual units)", 2.4))
    axis.set_title("Mean residual of each model from the universal consensus", y=TITLE_Y)
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return png(figure)


#: Widest PNG sent to the page: Streamlit shrinks (decodes, resizes, re-encodes) any image wider
#: than 1,460 px on every rerun; shrinking once here keeps that off every rerun
MAX_WIDTH_PX = 1400


def fit_width(image: bytes, max_width: int = MAX_WIDTH_PX) -> bytes:
    """PNG ``image`` scaled down to at most ``max_width`` pixels wide (unchanged if narrower)."""
    from PIL import Image

    picture = Image.open(io.BytesIO(image))
    if picture.width <= max_width:
        return image
    height = round(picture.height * max_width / picture.width)
    buffer = io.BytesIO()
    picture.resize((max_width, height), Image.LANCZOS).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def paper_figure(
    draw: Callable[..., Path], *tables: pd.DataFrame, theme: str = "light", **options: Any
) -> bytes:
    """PNG bytes of one of the report's figures (``convergence_core.figures.<name>_figure``),
    drawn from ``tables`` (and keyword ``options``) exactly as the report draws it (one pyplot
    figure at a time) but for ``theme`` ("light" or "dark"), at most :data:`MAX_WIDTH_PX` wide."""
    with _PYPLOT_LOCK, tempfile.TemporaryDirectory(prefix="convergence-figure-") as folder:
        path = draw(*tables, Path(folder) / "figure.png", theme=theme, **options)
        return fit_width(Path(path).read_bytes())
