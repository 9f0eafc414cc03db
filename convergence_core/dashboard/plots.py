"""Plotly figures of the dashboard. Pure functions: data in, ``go.Figure`` out (no Streamlit).

Every figure has a title and axis titles with units. Text that comes from the data set (captions,
ids) is HTML-escaped before it reaches Plotly, whose hover labels interpret a subset of HTML.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

RESIDUAL_AXIS = "residual (Procrustes distance, unit Frobenius-normalised embedding)"
#: What "residual units" means on the Fig. S2 axes (the Paper analyses page's caption)
RESIDUAL_UNITS = "Procrustes distance between unit-Frobenius-norm embeddings"
SCORE_AXIS = {
    "mean": "mean residual across vision models (Procrustes distance)",
    "pc1": "PC1 score of the residuals (Procrustes distance)",
}
SCORE_NAME = {"mean": "mean residual", "pc1": "PC1 score"}
#: Colour-bar titles: short lines, so the title does not run over the plot
COLOUR_TITLE = {
    "mean": "mean residual<br>(Procrustes distance)",
    "pc1": "PC1 score<br>(Procrustes distance)",
}
SET_COLOURS = {
    "low": "#1f77b4",
    "random": "#7f7f7f",
    "high": "#d62728",
    "selection": "#2ca02c",
    "pasted": "#9467bd",
}
HOVER_CAPTION_CHARS = 80
#: Up to this many points a scatter of stimuli carries hover text (id, caption, scores) per
#: point; above it only numbers (100,000 captions would be megabytes on every rerun)
HOVER_TEXT_LIMIT = 20_000


def point_fields(
    n: int,
    texts: Callable[[], Sequence[str]],
    numbers: str,
    *,
    color: str | None = None,
    size: int = 7,
    opacity: float = 0.8,
) -> dict[str, object]:
    """Hover and marker fields of a scatter of ``n`` stimuli (one place for every page's scatter).

    Up to :data:`HOVER_TEXT_LIMIT` points each point gets its text (``texts()``, called only
    then) above ``numbers`` (a Plotly hovertemplate line such as ``"x %{x:.4f}"``) at marker
    ``size`` (in ``color``); above it the hover shows ``numbers`` only and markers are smaller
    and lighter, so 100,000 points stay a few hundred kB (coordinates as binary arrays) instead
    of megabytes.
    Returns ``{"hovertemplate", "marker", ["text"]}`` for ``go.Scattergl``.
    """
    if n <= HOVER_TEXT_LIMIT:
        return {
            "text": list(texts()),
            "hovertemplate": f"%{{text}}<br>{numbers}<extra></extra>",
            "marker": {"size": size, "opacity": opacity, "color": color},
        }
    return {
        "hovertemplate": f"{numbers}<extra></extra>",
        "marker": {"size": max(2, size // 2), "opacity": min(opacity, 0.6), "color": color},
    }


def safe_hover_text(text: str, limit: int = HOVER_CAPTION_CHARS) -> str:
    """``text`` truncated to ``limit`` characters and HTML-escaped for a Plotly hover label."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=True)


def vision_model_panels(table: pd.DataFrame) -> tuple[go.Figure, list[str]]:
    """One panel per vision model of ``table`` (first-seen order), side by side with a shared y
    axis, and those models."""
    visions = list(dict.fromkeys(table["vision_model"]))
    figure = make_subplots(
        rows=1,
        cols=len(visions),
        shared_yaxes=True,
        subplot_titles=[safe_hover_text(v, 40) for v in visions],
    )
    return figure, visions


def random_baseline_bar(
    rows: pd.DataFrame, metric: str, x: Sequence[str], *, showlegend: bool
) -> go.Bar:
    """The "random" bar of set-comparison figures: per row, the mean of ``<metric>_random_mean``
    with error bars from ``<metric>_random_lower_95`` to ``<metric>_random_upper_95``."""
    mean = rows[f"{metric}_random_mean"].to_numpy()
    return go.Bar(
        x=x,
        y=mean,
        error_y={
            "type": "data",
            "symmetric": False,
            "array": rows[f"{metric}_random_upper_95"].to_numpy() - mean,
            "arrayminus": mean - rows[f"{metric}_random_lower_95"].to_numpy(),
        },
        name=f"random (mean, 95% of {int(rows['n_random'].iloc[0])} sets)",
        marker_color=SET_COLOURS["random"],
        legendgroup="random",
        showlegend=showlegend,
    )


def dispersion_histograms(
    mean: np.ndarray, pc1: np.ndarray, pearson: float, spearman: float
) -> go.Figure:
    """Side-by-side histograms of the two dispersion scores (m,) each, with their correlation."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Mean residual", "PC1 score"))
    figure.add_trace(
        go.Histogram(x=mean, nbinsx=40, name="mean", marker_color="#1f77b4"), row=1, col=1
    )
    figure.add_trace(
        go.Histogram(x=pc1, nbinsx=40, name="PC1", marker_color="#ff7f0e"), row=1, col=2
    )
    figure.update_xaxes(title_text=SCORE_AXIS["mean"], row=1, col=1)
    figure.update_xaxes(title_text=SCORE_AXIS["pc1"], row=1, col=2)
    figure.update_yaxes(title_text="stimuli (count)", row=1, col=1)
    figure.update_yaxes(title_text="stimuli (count)", row=1, col=2)
    figure.update_layout(
        title_text=(
            f"Dispersion of {len(mean)} stimuli — the two scores correlate: "
            f"Pearson r = {pearson:.3f}, Spearman ρ = {spearman:.3f}"
        ),
        showlegend=False,
        bargap=0.05,
        height=360,
        margin={"t": 80},
    )
    return figure


def residual_bars(
    models: Sequence[str], residuals: np.ndarray, typical: np.ndarray, stimulus: str
) -> go.Figure:
    """Bar per vision model of one stimulus's residual (M,); each model's median (M,) marked."""
    figure = go.Figure()
    figure.add_trace(
        go.Bar(x=list(models), y=residuals, name="this stimulus", marker_color="#1f77b4")
    )
    figure.add_trace(
        go.Scatter(
            x=list(models),
            y=typical,
            mode="markers",
            name="median over all stimuli",
            marker={"symbol": "line-ew-open", "size": 28, "color": "#222", "line": {"width": 3}},
        )
    )
    figure.update_layout(
        title_text=f"Residual per vision model — stimulus {safe_hover_text(stimulus, 60)}",
        xaxis_title="vision model",
        yaxis_title=RESIDUAL_AXIS,
        height=360,
        legend={"orientation": "h", "y": -0.25},
    )
    return figure


def residual_scatter(
    x: np.ndarray,
    y: np.ndarray,
    colour: np.ndarray,
    *,
    ids: Sequence[str] | None,
    captions: Sequence[str] | None,
    mean: np.ndarray,
    pc1: np.ndarray,
    colour_title: str,
    x_title: str,
    y_title: str,
    title: str,
    selected: Sequence[int] = (),
) -> go.Figure:
    """WebGL scatter of all stimuli; a point's stimulus row is its ``customdata`` (or, above
    :data:`HOVER_TEXT_LIMIT` points, its index in the first trace: the trace is in run order).

    Hover and markers follow :func:`point_fields`: up to :data:`HOVER_TEXT_LIMIT` points, hover
    shows id, caption (escaped, truncated; none when ``captions`` is None), both dispersion scores
    and the coordinates. Above it no per-point text is sent (100,000 captions would be megabytes
    on every rerun): hover shows the coordinates and the colour score, and a selection shows the
    chosen stimuli's ids and captions below the chart. Coordinates and colours travel as float32.
    The current selection is drawn as open circles on top.
    """
    n = len(x)
    x32 = np.asarray(x, dtype=np.float32)
    y32 = np.asarray(y, dtype=np.float32)

    def texts() -> list[str]:
        names = ids if ids is not None else [str(row) for row in range(n)]
        shown = captions if captions is not None else [""] * n
        return [
            f"id {safe_hover_text(i, 40)}<br>{safe_hover_text(c)}"
            f"<br>mean residual {m:.4f} · PC1 {p:.4f}"
            for i, c, m, p in zip(names, shown, mean, pc1, strict=True)
        ]

    fields = point_fields(
        n, texts, "x %{x:.4f} · y %{y:.4f}<br>colour %{marker.color:.4f}",
        color=np.asarray(colour, dtype=np.float32), size=7, opacity=0.85,
    )
    fields["marker"].update(
        colorscale="Viridis", colorbar={"title": {"text": colour_title, "side": "right"}}
    )
    points: dict[str, object] = {"x": x32, "y": y32, "mode": "markers", "name": "stimuli",
                                 **fields}
    if n <= HOVER_TEXT_LIMIT:
        points["customdata"] = np.arange(n, dtype=np.int32)
    figure = go.Figure()
    figure.add_trace(go.Scattergl(**points))
    if len(selected):
        chosen = np.asarray(selected, dtype=int)
        figure.add_trace(
            go.Scattergl(
                x=x32[chosen],
                y=y32[chosen],
                mode="markers",
                name="current selection",
                customdata=chosen.astype(np.int32),  # a box/lasso here selects the same stimuli
                hoverinfo="skip",
                marker={
                    "size": 12 if len(chosen) <= 2_000 else 6,
                    "color": "rgba(0,0,0,0)",
                    "line": {"color": "#d62728", "width": 2 if len(chosen) <= 2_000 else 1},
                },
            )
        )
    figure.update_layout(
        title_text=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=560,
        dragmode="lasso",
        legend={"orientation": "h", "y": -0.15},
    )
    return figure


def alignment_bars(
    sets: pd.DataFrame, baseline: pd.DataFrame | None, metric: str = "cknna"
) -> go.Figure:
    """Fig. 2-style bars: one panel per vision model, language models on x, one bar per set.

    ``sets`` has one row per pair × set (``lab.set_table``); ``baseline`` (``lab.baseline_table``)
    adds a "random" bar per pair at the random-subset mean with its 95% interval as error bars.
    ``metric`` is ``"cknna"`` or ``"mutual_knn"``.
    """
    metric_title = {
        "cknna": "CKNNA (unitless)",
        "mutual_knn": "mutual k-NN overlap (fraction of k)",
    }[metric]
    figure, visions = vision_model_panels(sets)
    set_names = list(dict.fromkeys(sets["set"]))
    order = [name for name in ("low", "random", "high") if name in set_names or name == "random"]
    order += [name for name in set_names if name not in order]
    has_baseline = baseline is not None and not baseline.empty
    for column, vision in enumerate(visions, start=1):
        panel = sets[sets["vision_model"] == vision]
        for name in order:
            if name == "random":
                if not has_baseline:
                    continue
                rows = baseline[baseline["vision_model"] == vision]
                trace = random_baseline_bar(
                    rows, metric, rows["language_model"], showlegend=column == 1
                )
            else:
                rows = panel[panel["set"] == name]
                if rows.empty:
                    continue
                trace = go.Bar(
                    x=rows["language_model"],
                    y=rows[metric],
                    name=f"{name} ({int(rows['set_size'].iloc[0])} stimuli)",
                    marker_color=SET_COLOURS.get(name, "#17becf"),
                    legendgroup=name,
                    showlegend=column == 1,
                )
            figure.add_trace(trace, row=1, col=column)
        figure.update_xaxes(title_text="language model", row=1, col=column)
    figure.update_yaxes(title_text=metric_title, row=1, col=1)
    k = int(sets["k"].iloc[0]) if not sets.empty else 0
    figure.update_layout(
        title_text=f"Vision–language alignment per set (k = {k}); error bars: 95% of random sets",
        barmode="group",
        height=420,
        legend={"orientation": "h", "y": -0.25},
    )
    return figure
