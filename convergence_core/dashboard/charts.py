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

import html
import io
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
from ..stats import spread_words
from .plots import RESIDUAL_AXIS, SCORE_AXIS, SCORE_NAME, SET_COLOURS
from .predictor_plots import EFFECT_AXIS, NOT_SIGNIFICANT, SIGNIFICANT
from .universal_plots import MODALITY_COLOURS

#: Pixels per inch of every PNG; figure sizes below are in inches (13 in ≈ the wide page's width).
DPI = 100
_PYPLOT_LOCK = threading.Lock()
#: Height of axes titles (axes fraction). Given explicitly, matplotlib does not measure every
#: tick label to place each title, which was a fifth of a figure's drawing time.
TITLE_Y = 1.01


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
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


#: Histogram colours of the dispersion scores, in the order of ``dispersion.SCORES``
_SCORE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def dispersion_histograms(scores: Mapping[str, np.ndarray], title: str) -> bytes:
    """Side-by-side histograms (40 bins) of the dispersion scores, ``{score name: (m,) values}``
    (names of ``dispersion.SCORES``, drawn in that order)."""
    names = [name for name in SCORE_NAME if name in scores]
    figure = Figure(figsize=(6.5 * len(names), 3.4))
    axes = np.atleast_1d(figure.subplots(1, len(names)))
    _margins(figure, left=0.75, right=0.2, top=0.65, bottom=0.6, wspace=0.18)
    for i, (axis, name) in enumerate(zip(axes, names)):
        colour = _SCORE_COLOURS[i % len(_SCORE_COLOURS)]
        axis.hist(np.asarray(scores[name], dtype=np.float64), bins=40, color=colour)
        axis.set_xlabel(SCORE_AXIS[name])
        axis.set_ylabel("stimuli (count)")
        label = SCORE_NAME[name]
        axis.set_title(label[:1].upper() + label[1:], fontsize=10, y=TITLE_Y)  # "PC1 score" stays
    figure.suptitle(literal(title), fontsize=11)
    return png(figure)


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
    """The residual map as a picture: every stimulus (n,) coloured by ``colour`` (viridis, with a
    colour bar), the ``selected`` rows circled in red. Points are rasterised, so the PNG costs the
    same at 100,000 stimuli as at 1,000."""
    n = len(x)
    figure = Figure(figsize=(13.0, 5.6))
    axis = figure.subplots()
    _margins(figure, left=0.8, right=1.6, top=0.45, bottom=0.6)
    size = _point_size(n)
    points = axis.scatter(
        x, y, c=colour, s=size, cmap="viridis", alpha=0.85, linewidths=0, rasterized=True
    )
    chosen = np.asarray(selected, dtype=np.int64)
    if chosen.size:
        axis.scatter(
            np.asarray(x)[chosen], np.asarray(y)[chosen], s=60 if chosen.size <= 2_000 else 12,
            facecolors="none", edgecolors="#d62728", linewidths=1.2, rasterized=True,
            label=f"current selection ({chosen.size:,})",
        )
        axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    bar = figure.colorbar(points, ax=axis, fraction=0.03, pad=0.01)
    bar.set_label(literal(colour_title.replace("<br>", " ")), fontsize=8)
    axis.set_xlabel(literal(x_title))
    axis.set_ylabel(literal(y_title), fontsize=8)
    axis.set_title(literal(title), fontsize=10, y=1.06 if chosen.size else TITLE_Y)
    return png(figure)


def residual_components(
    ratio: np.ndarray, components: np.ndarray, models: Sequence[str], modality: str = "vision"
) -> bytes:
    """Two panels: variance of the residuals explained per principal component (M,), and each
    GPA model's loading on the first two components (rows of ``components`` (M, M));
    ``modality`` names the GPA models (``Run.gpa_modality``: vision, brain, ...)."""
    figure = Figure(figsize=(13.0, 3.4))
    left, right = figure.subplots(1, 2)
    _margins(figure, left=0.75, right=0.2, top=0.45, bottom=0.75, wspace=0.2)
    labels = [f"PC{i + 1}" for i in range(len(ratio))]
    left.bar(labels, 100.0 * np.asarray(ratio, dtype=np.float64), color="#1f77b4")
    left.set_xlabel("principal component of the residual matrix R")
    left.set_ylabel("variance explained (%)")
    left.set_title("Variance of the residuals explained per component", fontsize=10, y=TITLE_Y)
    x = np.arange(len(models))
    shown = min(2, np.asarray(components).shape[0])
    for index in range(shown):
        offset = (index - (shown - 1) / 2) * 0.35
        right.bar(x + offset, np.asarray(components)[index], 0.35, label=f"PC{index + 1}")
    right.axhline(0.0, color="black", linewidth=0.5)
    right.set_xticks(x, [literal(m) for m in models], fontsize=8)
    right.set_xlabel(literal(f"{modality} model (GPA)"))
    right.set_ylabel("loading (unit-norm weight)")
    right.set_title("Per-model loadings of the first components", fontsize=10, y=TITLE_Y)
    right.legend(fontsize=8)
    return png(figure)


def residual_bars(
    models: Sequence[str], residuals: np.ndarray, typical: np.ndarray, stimulus: str,
    modality: str = "vision",
) -> bytes:
    """Bar per GPA model (``modality``: vision, brain, ...) of one stimulus's residual (M,), each
    model's median (M,) marked."""
    figure = Figure(figsize=(6.5, 3.4))
    axis = figure.subplots()
    _margins(figure, left=0.9, right=0.15, top=0.4, bottom=0.95)
    x = np.arange(len(models))
    axis.bar(x, residuals, 0.6, color="#1f77b4", label="this stimulus")
    axis.scatter(
        x, typical, marker="_", s=900, linewidths=3, color="#222222",
        label="median over all stimuli",
    )
    axis.set_xticks(x, [literal(m) for m in models], fontsize=8)
    axis.set_xlabel(literal(f"{modality} model (GPA)"))
    axis.set_ylabel(RESIDUAL_AXIS.replace(", unit", ",\nunit"), fontsize=8)
    axis.set_title(
        literal(f"Residual per {modality} model — stimulus {stimulus}"), fontsize=10, y=TITLE_Y
    )
    figure.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    return png(figure)


def metric_axis(metric: str) -> str:
    """Axis title of a registry metric: its label and its unit (``metrics.Metric.axis_title``)."""
    return registry.metric(metric).axis_title


def _svg_text(text: object) -> str:
    """Text from a run (model names, set names) as SVG character data: escaped, never markup."""
    return html.escape(str(text), quote=True)  # as plots.safe_hover_text escapes hover text


def alignment_bars(
    sets: pd.DataFrame,
    baseline: pd.DataFrame | None,
    metric: str | None = None,
    modalities: tuple[str, str] = ("vision", "language"),
    matched: pd.DataFrame | None = None,
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

    Written as SVG text rather than drawn with matplotlib: the lab redraws these bars on every
    change of k, metric or set, and matplotlib took 0.2 s for them (half of a k change) where this
    takes about a millisecond. NaN values draw no bar; every text is escaped.
    """
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

    # layout in pixels (100 px per inch of the matplotlib version)
    n_panels = max(1, len(visions))
    width_per_bar = 0.8 / max(1, len(order))
    panel_inches = max(3.2, 0.9 * len(languages) * max(1, len(order)) * width_per_bar + 1.6)
    width = int(100 * min(13.0, panel_inches * n_panels + 0.8))
    height = 390
    left, right, top, bottom, gap = 78.0, 15.0, 58.0, 92.0, 10.0
    panel_width = (width - left - right - gap * (n_panels - 1)) / n_panels
    plot_height = height - top - bottom

    def y_of(value: float) -> float:
        return top + plot_height * (top_value - value) / (top_value - bottom_value)

    settings = str(sets["options"].iloc[0]) if "options" in sets and not sets.empty else ""
    title = (
        f"{modalities[0].capitalize()} × {modalities[1]} alignment per set: "
        f"{registry.metric(metric).label}"
        + (f" ({settings})" if settings else "")
        + (f"; error bars: {spread_words(min(random_counts))}" if random_counts else "")
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" '
        'font-size="11" role="img">',
        f"<title>{_svg_text(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="13">'
        f"{_svg_text(title)}</text>",
    ]
    for index, vision in enumerate(visions):
        x0 = left + index * (panel_width + gap)
        group = panel_width / max(1, len(languages))
        out.append(
            f'<text x="{x0 + panel_width / 2:.1f}" y="{top - 8:.1f}" text-anchor="middle" '
            f'font-size="12">{_svg_text(vision)}</text>'
        )
        for tick in ticks:
            y = y_of(float(tick))
            out.append(f'<line x1="{x0:.1f}" x2="{x0 + panel_width:.1f}" y1="{y:.1f}" '
                       f'y2="{y:.1f}" stroke="#e6e6e6"/>')
            if index == 0:
                out.append(f'<line x1="{x0 - 4:.1f}" x2="{x0:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                           'stroke="black"/>')
                out.append(f'<text x="{x0 - 7:.1f}" y="{y + 4:.1f}" text-anchor="end">'
                           f"{float(tick):g}</text>")
        for position, language in enumerate(languages):
            centre = x0 + (position + 0.5) * group
            out.append(f'<text x="{centre:.1f}" y="{top + plot_height + 17:.1f}" '
                       f'text-anchor="middle">{_svg_text(language)}</text>')
            bar_width = group * width_per_bar
            for slot, name in enumerate(order):
                heights, lower, upper = bars[vision][name]
                value = heights[position]
                if not np.isfinite(value):
                    continue
                x = centre + (slot - len(order) / 2) * bar_width
                y_top, y_zero = y_of(max(value, 0.0)), y_of(min(value, 0.0))
                colour = _bar_colour(name, matched_name)
                out.append(
                    f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar_width:.1f}" '
                    f'height="{max(y_zero - y_top, 0.5):.1f}" fill="{colour}">'
                    f"<title>{_svg_text(f'{vision} × {language}, {name}: {value:.4f}')}</title>"
                    "</rect>"
                )
                if lower is not None and np.isfinite(lower[position]):
                    middle = x + bar_width / 2
                    y_low, y_high = y_of(float(lower[position])), y_of(float(upper[position]))
                    out.append(
                        f'<path d="M{middle:.1f},{y_low:.1f}V{y_high:.1f}'
                        f'M{middle - 3:.1f},{y_low:.1f}h6M{middle - 3:.1f},{y_high:.1f}h6" '
                        'stroke="black" fill="none"/>'
                    )
        zero = y_of(0.0)
        out.append(f'<line x1="{x0:.1f}" x2="{x0 + panel_width:.1f}" y1="{zero:.1f}" '
                   f'y2="{zero:.1f}" stroke="black" stroke-width="0.6"/>')
        out.append(f'<rect x="{x0:.1f}" y="{top:.1f}" width="{panel_width:.1f}" '
                   f'height="{plot_height:.1f}" fill="none" stroke="black" stroke-width="0.8"/>')
        out.append(f'<text x="{x0 + panel_width / 2:.1f}" y="{top + plot_height + 35:.1f}" '
                   f'text-anchor="middle">{_svg_text(modalities[1])} model</text>')
    middle_y = top + plot_height / 2
    out.append(
        f'<text x="16" y="{middle_y:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {middle_y:.1f})">{_svg_text(metric_axis(metric))}</text>'
    )
    # legend: one swatch and label per set, centred under the panels
    entries = [(_bar_colour(n, matched_name), labels[n]) for n in order]
    widths = [24 + 6.5 * len(text) for _, text in entries]
    x = (width - sum(widths)) / 2
    y = height - 16
    for (colour, text), step in zip(entries, widths, strict=True):
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="14" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 19:.1f}" y="{y:.1f}">{_svg_text(text)}</text>')
        x += step
    out.append("</svg>")
    return "\n".join(out)


def _bar_colour(name: str, matched_name: str | None) -> str:
    """A set's bar colour; the own-size random baseline of a selection is a lighter grey."""
    return "#c7c7c7" if name == matched_name else SET_COLOURS.get(name, "#17becf")


#: Axis titles of the per-stimulus scores (stimulus_alignment)
PER_STIMULUS_AXIS = {
    "knn_overlap": "k-NN overlap\n(fraction of its k neighbours shared)",
    "local_cka": "local CKA\n(change in CKA when it joins the base)",
}


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
    figure = Figure(figsize=(13.0, 4.4))
    axes = np.atleast_1d(figure.subplots(1, len(values), squeeze=False)[0])
    _margins(figure, left=0.9, right=0.2, top=0.95, bottom=0.65, wspace=0.3)
    size = _point_size(n)
    chosen = np.asarray(marked, dtype=np.int64)
    x = np.asarray(dispersion, dtype=np.float64)
    for axis, (metric, y) in zip(axes, values.items(), strict=True):
        y = np.asarray(y, dtype=np.float64)
        axis.scatter(x, y, s=size, color="#1f77b4", alpha=0.6, linewidths=0, rasterized=True)
        if chosen.size:
            axis.scatter(
                x[chosen], y[chosen], s=50, facecolors="none", edgecolors="#d62728",
                linewidths=1.0, rasterized=True,
                label=literal(f"{marked_label} ({chosen.size:,})"),
            )
            axis.legend(fontsize=8, loc="best")
        row = relation[relation["metric"] == metric]
        words = ""
        if not row.empty:
            r = row.iloc[0]
            words = (
                f"Spearman ρ = {r['spearman_rho']:+.3f}, permutation p = "
                f"{r['permutation_p_value_two_sided']:.3g} ({int(r['n_permutations']):,} shuffles)"
            )
            finite = y[np.isfinite(y)]
            if not np.isfinite(r["spearman_rho"]) and finite.size and np.ptp(finite) == 0:
                words = f"ρ undefined: every stimulus scores {finite[0]:.3g}" + (
                    f" (k = {k} of {n - 1} others)" if metric == "knn_overlap" else ""
                )
        axis.set_xlabel(SCORE_AXIS[score])
        axis.set_ylabel(literal(PER_STIMULUS_AXIS.get(metric, metric)), fontsize=8)
        names = {
            "knn_overlap": f"k-NN overlap (k = {k})",
            "local_cka": "local CKA" + (f" (base of {base_size})" if base_size else ""),
        }
        name = names.get(metric, metric)
        axis.set_title(literal(f"{name}\n{words}" if words else name), fontsize=9, y=TITLE_Y)
    figure.suptitle(
        literal(f"Per-stimulus alignment against dispersion — {title} ({n:,} stimuli)"),
        fontsize=10,
    )
    return png(figure)


def _point_size(n: int) -> float:
    """Marker area (pt²) of a rasterised scatter of ``n`` points: smaller as they crowd."""
    return 14.0 if n <= 2_000 else (5.0 if n <= 20_000 else 1.5)


def _short(text: object, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (with …), drawn literally."""
    text = " ".join(str(text).split())
    return literal(text if len(text) <= limit else text[: limit - 1] + "…")


def ranked_effects(tests: pd.DataFrame, *, score: str, top: int = 25, q: float = 0.05) -> bytes:
    """Horizontal bars of the ``top`` best-ranked properties of one score (rows of
    ``dispersion_predictors.property_tests``): ρ (signed) for numeric properties, √ε² for
    categorical ones; red where q < ``q``. Every number is also in the ranked table beside it."""
    rows = tests[tests["score"] == score].sort_values("rank").head(top).iloc[::-1]
    effect = np.where(rows["test"] == "spearman", rows["effect"], rows["strength"])
    significant = rows["q_value"].to_numpy() < q
    figure = Figure(figsize=(13.0, max(3.0, 0.25 * len(rows) + 1.2)))
    axis = figure.subplots()
    _margins(figure, left=3.3, right=0.3, top=0.45, bottom=0.6)
    y = np.arange(len(rows))
    axis.barh(y, np.asarray(effect, dtype=np.float64),
              color=[SIGNIFICANT if s else NOT_SIGNIFICANT for s in significant])
    axis.axvline(0.0, color="black", linewidth=0.5)
    axis.set_yticks(y, [_short(name, 50) for name in rows["property"]], fontsize=8)
    axis.set_xlabel(EFFECT_AXIS)
    axis.set_ylabel("property")
    axis.set_title(
        f"Properties ranked by permutation p-value ({SCORE_NAME[score]}); red: q < {q} "
        "(Benjamini–Hochberg)",
        fontsize=10,
        y=TITLE_Y,
    )
    return png(figure)


def cross_modal_scatter(
    intra: np.ndarray, cross: np.ndarray, *, title: str, x_title: str, y_title: str
) -> bytes:
    """Per stimulus (n,): intra-modal (vision) dispersion (x) against cross-modal dispersion (y),
    rasterised (the same PNG size at 100,000 stimuli as at 1,000)."""
    n = len(intra)
    figure = Figure(figsize=(13.0, 4.4))
    axis = figure.subplots()
    _margins(figure, left=0.9, right=0.3, top=0.45, bottom=0.6)
    axis.scatter(
        np.asarray(intra, dtype=np.float64), np.asarray(cross, dtype=np.float64),
        s=_point_size(n), color="#444444", alpha=0.6, linewidths=0, rasterized=True,
    )
    axis.set_xlabel(literal(x_title))
    axis.set_ylabel(literal(y_title), fontsize=8)
    axis.set_title(literal(title), fontsize=10, y=TITLE_Y)
    return png(figure)


def model_residuals(model_summary: pd.DataFrame) -> bytes:
    """Mean residual of each model (``model``, ``layer``, ``modality``, ``mean_residual`` rows of
    ``CrossModalAnalysis.model_summary``) from the universal consensus, coloured by modality."""
    modalities = list(dict.fromkeys(model_summary["modality"]))
    figure = Figure(figsize=(13.0, 3.0))
    axis = figure.subplots()
    _margins(figure, left=0.9, right=1.1, top=0.45, bottom=0.65)
    x = np.arange(len(model_summary))
    colour = {m: MODALITY_COLOURS[i % len(MODALITY_COLOURS)] for i, m in enumerate(modalities)}
    for modality in modalities:
        chosen = (model_summary["modality"] == modality).to_numpy()
        axis.bar(x[chosen], model_summary["mean_residual"].to_numpy(dtype=np.float64)[chosen],
                 0.6, color=colour[modality], label=literal(modality))
    labels = [
        _short(f"{m} ({layer})", 40)
        for m, layer in zip(model_summary["model"], model_summary["layer"], strict=True)
    ]
    axis.set_xticks(x, labels, fontsize=8)
    axis.set_xlabel("model (layer)")
    axis.set_ylabel("mean residual (residual units)")
    axis.set_title(
        "Mean residual of each model from the universal consensus", fontsize=10, y=TITLE_Y
    )
    # beside the plot, not over the bars (it covered the last one)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
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


def paper_figure(draw: Callable[..., Path], *tables: pd.DataFrame, **options: Any) -> bytes:
    """PNG bytes of one of the report's figures (``convergence_core.figures.<name>_figure``),
    drawn from ``tables`` (and keyword ``options``) exactly as the report draws it (one pyplot
    figure at a time), at most :data:`MAX_WIDTH_PX` wide."""
    with _PYPLOT_LOCK, tempfile.TemporaryDirectory(prefix="convergence-figure-") as folder:
        path = draw(*tables, Path(folder) / "figure.png", **options)
        return fit_width(Path(path).read_bytes())
