"""Plotly figures and small table helpers of the "What predicts dispersion" page (and the
property colouring of the Residual-space page). Pure functions: data in, figures/arrays out.

Every figure has a title and axis titles with units; text from the data set is HTML-escaped
(:func:`plots.safe_hover_text`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..properties import PropertyTable
from .catalogue import NBSP, display_name, p_text
from .plots import NEUTRAL_LINE, SCORE_AXIS, SCORE_NAME, point_fields, safe_hover_text

SIGNIFICANT = "#d62728"
NOT_SIGNIFICANT = "#7f7f7f"
MODEL_COLOURS = {"ridge": "#1f77b4", "boosted_trees": "#ff7f0e"}
EFFECT_AXIS = "effect: Spearman ρ (numeric) or √ε² (categorical), unitless"


def tests_frame(tests: pd.DataFrame, score: str) -> pd.DataFrame:
    """The rows of one score in rank order, with the columns a reader needs (plain values)."""
    rows = tests[tests["score"] == score].sort_values("rank")
    return rows[
        [
            "rank", "property", "test", "effect_name", "effect", "q_value", "p_value",
            "p_value_asymptotic", "n_stimuli", "source", "unit",
        ]
    ].reset_index(drop=True)  # fmt: skip


#: how the ranking's small table writes each effect (``dispersion_predictors.property_tests``)
_EFFECT_SYMBOLS = {"spearman_rho": "ρ", "epsilon_squared": "ε²"}


def ranked_summary(ranked: pd.DataFrame) -> pd.DataFrame:
    """The ranking as text for a small table: rank, property, effect, q (Benjamini–Hochberg),
    p (permutation), n (stimuli tested): what :func:`tests_frame` holds, numbers rounded for
    reading. The effect's symbol names its test (ρ: Spearman, ε²: Kruskal–Wallis) and the
    headers are short, so the table fits a 1024-pixel window beside the sidebar; the sortable
    table has every column."""
    return pd.DataFrame(
        {
            "rank": ranked["rank"].astype(int),
            "property": ranked["property"].astype(str),
            "effect": [
                f"{_EFFECT_SYMBOLS.get(name, name)}{NBSP}={NBSP}"
                + (f"{value:+.3f}" if name == "spearman_rho" else f"{value:.3f}")
                for name, value in zip(ranked["effect_name"], ranked["effect"], strict=True)
            ],
            "q": [p_text(value) for value in ranked["q_value"]],
            "p": [p_text(value) for value in ranked["p_value"]],
            "n": ranked["n_stimuli"].astype(int),
        }
    )


def _hover(ids: Sequence[str], captions: Sequence[str]) -> list[str]:
    """A point's hover lines: its id and first caption (escaped)."""
    return [
        f"id {safe_hover_text(i, 40)}<br>{safe_hover_text(c)}"
        for i, c in zip(ids, captions, strict=True)
    ]


def property_scatter(
    table: PropertyTable,
    name: str,
    dispersion: np.ndarray,
    *,
    score: str,
    ids: Sequence[str],
    captions: Sequence[str],
    effect_text: str,
) -> go.Figure:
    """One point per stimulus: the property (x) against the dispersion score (y).

    Numeric: a WebGL scatter. Categorical: the levels side by side (x = level, jittered, with a
    box per level). ``customdata`` is each point's stimulus row (clicks and box/lasso select
    stimuli). Stimuli without a value are left out.
    """
    info = table.info_for(name)
    column = table.values[name]
    y = np.asarray(dispersion, dtype=np.float64)
    figure = go.Figure()
    if info.kind == "numeric":
        x = column.to_numpy(dtype=np.float64)
        rows = np.flatnonzero(np.isfinite(x))
        fields = point_fields(
            rows.size,
            lambda: _hover([ids[r] for r in rows], [captions[r] for r in rows]),
            # the property's name is the x-axis title; a template must not carry data-set text
            # (Plotly would read any %{...} in it as a field)
            "value %{x:.4g} · dispersion %{y:.4f}",
            color="#1f77b4",
        )
        figure.add_trace(
            go.Scattergl(
                x=x[rows].astype(np.float32),
                y=y[rows].astype(np.float32),
                mode="markers",
                customdata=rows.astype(np.int32),
                name="stimuli",
                **fields,
            )
        )
        x_title = safe_hover_text(info.label, 120)
    else:
        values = column.to_numpy(dtype=object)
        levels = sorted({v for v in values if v is not None})
        code = {level: i for i, level in enumerate(levels)}
        rows = np.array([r for r, v in enumerate(values) if v is not None], dtype=int)
        codes = np.array([code[values[r]] for r in rows], dtype=np.float64)
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, size=rows.size)
        for level in levels:
            members = rows[codes == code[level]]
            figure.add_trace(
                go.Box(
                    x=np.full(members.size, code[level], dtype=np.float64),
                    y=y[members],
                    boxpoints=False,
                    name=safe_hover_text(level, 30),
                    marker_color="#7f7f7f",
                    showlegend=False,
                    hoverinfo="skip",
                )
            )
        fields = point_fields(
            rows.size,
            lambda: [
                f"{line}<br>{safe_hover_text(name, 40)} = {safe_hover_text(values[r], 40)}"
                for line, r in zip(
                    _hover([ids[r] for r in rows], [captions[r] for r in rows]), rows, strict=True
                )
            ],
            "level %{x:.0f} · dispersion %{y:.4f}",
            color="#1f77b4",
        )
        figure.add_trace(
            go.Scattergl(
                x=(codes + jitter).astype(np.float32),
                y=y[rows].astype(np.float32),
                mode="markers",
                customdata=rows.astype(np.int32),
                name="stimuli",
                **fields,
            )
        )
        figure.update_xaxes(
            tickvals=list(range(len(levels))), ticktext=[safe_hover_text(v, 30) for v in levels]
        )
        x_title = f"{safe_hover_text(name, 80)} (level)"
    figure.update_layout(
        title_text=(
            f"{safe_hover_text(name, 60)} against {SCORE_NAME[score]} — {effect_text} "
            f"({rows.size} stimuli with a value)"
        ),
        xaxis_title=x_title,
        yaxis_title=SCORE_AXIS[score],
        height=480,
        dragmode="select",
        showlegend=False,
    )
    return figure


#: The columns of :func:`fit_summary`: metric of the long fit table → header
FIT_COLUMNS = {
    "r2_held_out": "held-out R²",
    "r2_fold_mean": "R² per fold (mean)",
    "r2_fold_sd": "R² per fold (s.d.)",
    "r2_shuffled_mean": "shuffled-target R² (mean)",
    "r2_shuffled_upper_95": "shuffled-target R² (95th percentile)",
    "p_value_vs_shuffled": "p vs shuffled",
}


def fit_summary(fit: pd.DataFrame) -> pd.DataFrame:
    """One row per model: held-out R², per-fold mean ± sd, the shuffled-target baseline (its
    columns left out when the fit had no shuffled-target refits)."""
    wide = fit.pivot_table(index="model", columns="metric", values="value", sort=False)
    table = pd.DataFrame({"model": wide.index})
    for metric, header in FIT_COLUMNS.items():
        if metric in wide:
            table[header] = wide[metric].to_numpy()
    return table


def held_out_fit(predictions: pd.DataFrame, fit: pd.DataFrame, *, score: str) -> go.Figure:
    """Observed against out-of-fold predicted dispersion, one trace per model, with y = x."""
    r2 = fit[fit["metric"] == "r2_held_out"].set_index("model")["value"]
    figure = go.Figure()
    low = float(min(predictions["observed"].min(), predictions["predicted"].min()))
    high = float(max(predictions["observed"].max(), predictions["predicted"].max()))
    for model, rows in predictions.groupby("model", sort=False):
        fields = point_fields(
            len(rows),
            lambda: [f"id {safe_hover_text(i, 40)}" for i in rows["id"]],
            "predicted %{x:.4f} · observed %{y:.4f}",
            size=6,
            opacity=0.7,
            color=MODEL_COLOURS.get(str(model)),
        )
        figure.add_trace(
            go.Scattergl(
                x=rows["predicted"].to_numpy(dtype=np.float32),
                y=rows["observed"].to_numpy(dtype=np.float32),
                mode="markers",
                name=f"{display_name(model)} (held-out R² = {r2[model]:.3f})",
                **fields,
            )
        )
    figure.add_trace(
        go.Scatter(
            x=[low, high],
            y=[low, high],
            mode="lines",
            name="observed = predicted",
            line={"color": NEUTRAL_LINE, "dash": "dot", "width": 1.5},
            hoverinfo="skip",
        )
    )
    figure.update_layout(
        title_text=(
            f"Held-out fit: {SCORE_NAME[score]} from every property<br>"
            f"({int(fit['n_splits'].iloc[0])}-fold cross-validation)"
        ),
        xaxis_title=f"predicted out of fold: {SCORE_NAME[score]} (Procrustes distance)",
        yaxis_title=f"observed: {SCORE_NAME[score]} (Procrustes distance)",
        height=460,
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def importance_bars(importances: pd.DataFrame, *, top: int = 15) -> go.Figure:
    """Held-out permutation importance per property (mean ± s.d.), one bar group per model."""
    best = importances.groupby("property")["importance_mean"].max().sort_values(ascending=False)
    keep = list(best.index[:top])[::-1]
    figure = go.Figure()
    for model, rows in importances.groupby("model", sort=False):
        rows = rows.set_index("property").reindex(keep)
        figure.add_trace(
            go.Bar(
                x=rows["importance_mean"],
                y=[safe_hover_text(p, 50) for p in keep],
                error_x={
                    "type": "data",
                    "array": rows["importance_sd"].fillna(0.0),
                    "color": NEUTRAL_LINE,  # read on the light and the dark theme
                },
                orientation="h",
                name=display_name(model),
                marker_color=MODEL_COLOURS.get(str(model)),
            )
        )
    figure.update_layout(
        title_text="Permutation importance<br>on the held-out folds",
        xaxis_title="drop in held-out R² (unitless)",
        yaxis_title="property",
        barmode="group",
        height=max(320, 30 * len(keep) + 140),
        margin={"l": 220},
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def value_text(table: PropertyTable, name: str, row: int) -> str:
    """Property ``name`` of stimulus ``row`` as short plain text ("missing" when absent)."""
    value = table.values[name].iloc[int(row)]
    if table.info_for(name).kind == "numeric":
        return "missing" if not np.isfinite(value) else f"{float(value):.4g}"
    return "missing" if value is None else str(value)


def property_colour(table: PropertyTable, name: str) -> tuple[np.ndarray, str]:
    """Colour values (n,) float64 and a colour-bar title for property ``name``.

    Numeric: the values (NaN where missing). Categorical: each level's position among the sorted
    levels (NaN where missing); the title lists the first levels' codes.
    """
    info = table.info_for(name)
    column = table.values[name]
    if info.kind == "numeric":
        unit = f"<br>({safe_hover_text(info.unit, 30)})" if info.unit else ""
        return column.to_numpy(dtype=np.float64), f"{safe_hover_text(name, 30)}{unit}"
    levels = sorted({v for v in column if v is not None})
    code = {level: float(i) for i, level in enumerate(levels)}
    values = np.array([np.nan if v is None else code[v] for v in column], dtype=np.float64)
    shown = ", ".join(f"{i} {safe_hover_text(v, 12)}" for i, v in enumerate(levels[:4]))
    more = " …" if len(levels) > 4 else ""
    return values, f"{safe_hover_text(name, 30)}<br>(level: {shown}{more})"
