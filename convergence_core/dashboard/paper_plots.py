"""Plotly figures of the paper's analyses for the Paper-analyses page (data in, ``go.Figure`` out).

Each takes a table from :mod:`convergence_core.analyses`. Model and layer names are escaped with
``plots.safe_hover_text`` before they reach Plotly, whose labels interpret a subset of HTML.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .plots import SET_COLOURS, random_baseline_bar, safe_hover_text, vision_model_panels

_CONDITIONS = {
    "drop_high": ("drop high-dispersion", "#1f77b4"),
    "full": ("full set", "#7f7f7f"),
    "drop_low": ("drop low-dispersion", "#ff7f0e"),
}
#: What "residual units" means on the Fig. S2 axes (shown in the page's caption).
RESIDUAL_UNITS = "Procrustes distance between unit-Frobenius-norm embeddings"


def _cknna_title(k: int) -> str:
    return f"CKNNA (k = {k}, unitless)"


def _language_labels(rows: pd.DataFrame) -> list[str]:
    return [
        safe_hover_text(f"{model} ({layer})", 60)
        for model, layer in zip(rows["language_model"], rows["language_layer"], strict=True)
    ]


def _grouped_bars_layout(figure: go.Figure, title: str, k: int) -> go.Figure:
    """CKNNA y title on the first panel, grouped bars, the legend under the panels."""
    figure.update_yaxes(title_text=_cknna_title(k), row=1, col=1)
    figure.update_layout(
        title_text=title, barmode="group", height=420, legend={"orientation": "h", "y": -0.3}
    )
    return figure


def dispersion_sets_bars(table: pd.DataFrame) -> go.Figure:
    """Fig. 2: per vision model, low / random (mean, 95% interval) / high CKNNA per language
    model."""
    figure, visions = vision_model_panels(table)
    for column, vision in enumerate(visions, start=1):
        rows = table[table["vision_model"] == vision]
        labels, first = _language_labels(rows), column == 1
        low, high = (
            go.Bar(
                x=labels,
                y=rows[f"cknna_{side}_dispersion"],
                name=f"{side} dispersion",
                marker_color=SET_COLOURS[side],
                legendgroup=side,
                showlegend=first,
            )
            for side in ("low", "high")
        )
        for trace in (low, random_baseline_bar(rows, "cknna", labels, showlegend=first), high):
            figure.add_trace(trace, row=1, col=column)
        figure.update_xaxes(title_text="language model (layer used)", row=1, col=column)
    title = (
        f"Fig. 2: CKNNA on {int(table['set_size'].iloc[0])}-stimulus sets selected by "
        f"{table['score'].iloc[0]} dispersion"
    )
    return _grouped_bars_layout(figure, title, int(table["k"].iloc[0]))


def drop_fraction_bars(table: pd.DataFrame) -> go.Figure:
    """Fig. S1: per vision model, CKNNA without the highest / on all / without the lowest
    stimuli."""
    figure, visions = vision_model_panels(table)
    for column, vision in enumerate(visions, start=1):
        panel = table[table["vision_model"] == vision]
        for condition, (label, colour) in _CONDITIONS.items():
            rows = panel[panel["condition"] == condition]
            figure.add_trace(
                go.Bar(
                    x=_language_labels(rows),
                    y=rows["cknna"],
                    marker_color=colour,
                    name=f"{label} ({int(rows['n_stimuli'].iloc[0])} stimuli)",
                    legendgroup=condition,
                    showlegend=column == 1,
                ),
                row=1,
                col=column,
            )
        figure.update_xaxes(title_text="language model (layer used)", row=1, col=column)
    fraction = float(table.loc[table["condition"] != "full", "fraction_dropped"].iloc[0])
    title = f"Fig. S1: dropping {fraction:.0%} of the stimuli by dispersion"
    return _grouped_bars_layout(figure, title, int(table["k"].iloc[0]))


def leave_one_out_scatter(points: pd.DataFrame, statistics: pd.DataFrame) -> go.Figure:
    """Fig. S2: per held-out model, its deviation vs the others' partial dispersion, with the
    fit line."""
    models = list(dict.fromkeys(points["held_out_model"]))
    stats = statistics.set_index("held_out_model")
    titles = [
        safe_hover_text(
            f"{m}: r = {stats.loc[m, 'pearson_r']:.2f}, ρ = {stats.loc[m, 'spearman_rho']:.2f} "
            f"(p = {stats.loc[m, 'spearman_p_value']:.2g})",
            80,
        )
        for m in models
    ]
    figure = make_subplots(rows=1, cols=len(models), subplot_titles=titles)
    for column, model in enumerate(models, start=1):
        group = points[points["held_out_model"] == model]
        x = group["partial_dispersion"].to_numpy()
        figure.add_trace(
            go.Scatter(
                x=x,
                y=group["deviation"],
                mode="markers",
                marker={"size": 5, "opacity": 0.6, "color": "#636363"},
                name="stimulus",
                text=[safe_hover_text(i) for i in group["id"]],
                hovertemplate="%{text}<br>partial dispersion %{x:.4f}<br>deviation %{y:.4f}",
                showlegend=column == 1,
            ),
            row=1,
            col=column,
        )
        slope, intercept = stats.loc[model, "fit_slope"], stats.loc[model, "fit_intercept"]
        if np.isfinite(slope):
            line_x = np.array([x.min(), x.max()])
            figure.add_trace(
                go.Scatter(
                    x=line_x,
                    y=slope * line_x + intercept,
                    mode="lines",
                    name="least-squares fit",
                    line={"color": "red"},
                    showlegend=column == 1,
                ),
                row=1,
                col=column,
            )
        figure.update_xaxes(title_text="partial dispersion (residual units)", row=1, col=column)
    figure.update_yaxes(title_text="held-out deviation (residual units)", row=1, col=1)
    figure.update_layout(
        title_text=(
            "Fig. S2: dispersion of the other vision models vs the held-out model's deviation"
        ),
        height=420,
        legend={"orientation": "h", "y": -0.3},
    )
    return figure


def layer_sweep_heatmap(sweep: pd.DataFrame) -> go.Figure:
    """Layer sweep: per language model, CKNNA of each vision model (rows) with each layer
    (columns)."""
    languages = list(dict.fromkeys(sweep["language_model"]))
    figure = make_subplots(
        rows=1,
        cols=len(languages),
        subplot_titles=[safe_hover_text(m, 40) for m in languages],
        horizontal_spacing=0.08,
    )
    low, high = float(sweep["cknna"].min()), float(sweep["cknna"].max())
    for column, language in enumerate(languages, start=1):
        grid = sweep[sweep["language_model"] == language].pivot_table(
            index="vision_model", columns="language_layer_index", values="cknna", sort=False
        )
        figure.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[int(c) for c in grid.columns],
                y=[safe_hover_text(v, 40) for v in grid.index],
                zmin=low,
                zmax=high,
                colorscale="Viridis",
                showscale=column == len(languages),
                colorbar={"title": {"text": _cknna_title(int(sweep["k"].iloc[0]))}},
                hovertemplate="layer %{x}<br>%{y}<br>CKNNA %{z:.4f}<extra></extra>",
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(
            title_text="layer (block index, 0 = shallowest)",
            tickmode="array",
            tickvals=[int(c) for c in grid.columns],
            row=1,
            col=column,
        )
        figure.update_yaxes(autorange="reversed", row=1, col=column)
    figure.update_yaxes(title_text="vision model (GPA layer)", row=1, col=1)
    figure.update_layout(title_text="Layer sweep: CKNNA on the full set", height=360)
    return figure
