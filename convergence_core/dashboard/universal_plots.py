"""Plotly figures of the Universal-space page (data in, ``go.Figure`` out; no Streamlit).

Tables come from :mod:`convergence_core.universal` and :mod:`convergence_core.retrieval`. Ids,
captions and model names are escaped with ``plots.safe_hover_text`` before they reach Plotly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..retrieval import direction_label
from .catalogue import p_phrase
from .plots import NEUTRAL_LINE, point_fields, safe_hover_text

#: The unit of every distance in the universal space.
UNITS = "residual units: Euclidean distance between unit-Frobenius-norm configurations"
METHOD_COLOURS = {"universal": "#1f77b4", "ridge": "#ff7f0e", "chance": "#7f7f7f"}
METHOD_NAMES = {"universal": "universal space (GPA)", "ridge": "ridge baseline", "chance": "chance"}
MODALITY_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def merged_units(title: str) -> str:
    """An axis title whose name ends in a parenthesis before its unit's, with the two merged:
    ``vision dispersion (mean residual) (residual units)`` ->
    ``vision dispersion (mean residual; residual units)``. Others are returned as they are."""
    return re.sub(r"\(([^()]*)\) \(([^()]*)\)$", r"(\1; \2)", title)


def dispersion_scatter(
    per_stimulus: pd.DataFrame,
    relation: pd.Series,
    captions: Sequence[str],
    *,
    intra_title: str,
) -> go.Figure:
    """Per stimulus: intra-modal (vision) dispersion (x) vs cross-modal dispersion (y).

    ``per_stimulus``: ``CrossModalAnalysis.per_stimulus()`` (``stimulus``, ``id``,
    ``intra_modal_dispersion``, ``cross_modal_dispersion``); ``relation``: its relation row;
    ``captions``: the first caption of every run row (hover text). Points carry their run row as
    ``customdata``.
    """
    rows = per_stimulus["stimulus"].to_numpy()
    fields = point_fields(
        len(rows),
        lambda: [
            f"id {safe_hover_text(str(i), 40)}<br>{safe_hover_text(captions[r])}"
            for i, r in zip(per_stimulus["id"], rows, strict=True)
        ],
        "intra %{x:.4g} · cross %{y:.4g}",
        size=6,
        opacity=0.65,
        color="#444",
    )
    figure = go.Figure(
        go.Scattergl(
            x=per_stimulus["intra_modal_dispersion"].to_numpy(dtype=np.float32),
            y=per_stimulus["cross_modal_dispersion"].to_numpy(dtype=np.float32),
            mode="markers",
            customdata=rows.astype(np.int32),
            **fields,
        )
    )
    figure.update_layout(
        title_text=(
            f"Cross-modal vs intra-modal dispersion, {len(rows)} stimuli — Spearman ρ = "
            f"{relation['spearman_rho']:.3f}, permutation "
            f"{p_phrase(relation['permutation_p_value_two_sided'], relation['n_permutations'])} "
            f"({int(relation['n_permutations'])} shuffles)"
        ),
        xaxis_title=merged_units(f"{intra_title} (residual units)"),
        yaxis_title="cross-modal dispersion (residual units)",
        height=440,
    )
    return figure


def retrieval_bars(summary: pd.DataFrame, subset: str = "all") -> go.Figure:
    """Recall@k per direction: the universal space, the ridge baseline and chance side by side
    (mean ± s.d. over folds). ``summary``: :func:`retrieval.summarise_retrieval`."""
    rows = summary[(summary["subset"] == subset) & summary["metric"].str.startswith("recall_at_")]
    directions = list(dict.fromkeys(rows["direction"]))
    figure = make_subplots(
        rows=1,
        cols=len(directions),
        shared_yaxes=True,
        subplot_titles=[direction_label(d) for d in directions],
    )
    for column, direction in enumerate(directions, start=1):
        part = rows[rows["direction"] == direction]
        for method in ("universal", "ridge", "chance"):
            bars = part[part["method"] == method]
            if bars.empty:
                continue
            figure.add_trace(
                go.Bar(
                    x=[m.replace("recall_at_", "recall@") for m in bars["metric"]],
                    y=bars["mean"],
                    error_y=None
                    if method == "chance"
                    else {
                        "type": "data",
                        "array": np.nan_to_num(bars["std"].to_numpy()),
                        "color": NEUTRAL_LINE,  # read on the light and the dark theme
                    },
                    name=METHOD_NAMES[method],
                    marker_color=METHOD_COLOURS[method],
                    legendgroup=method,
                    showlegend=column == 1,
                ),
                row=1,
                col=column,
            )
        figure.update_xaxes(title_text="cut-off k", row=1, col=column)
    figure.update_yaxes(
        title_text="recall (fraction of held-out queries)", range=[0, 1.05], row=1, col=1
    )
    n_gallery = rows["n_gallery_mean"].mean() if len(rows) else float("nan")
    figure.update_layout(
        title_text=(
            f"Held-out retrieval ({subset.replace('_', ' ')}; {n_gallery:.0f} candidates per "
            f"query, {int(rows['n_folds'].max()) if len(rows) else 0}-fold)"
        ),
        barmode="group",
        height=400,
        legend={"orientation": "h", "y": -0.25},
    )
    return figure
