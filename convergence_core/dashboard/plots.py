"""Plotly figures of the dashboard. Pure functions: data in, ``go.Figure`` out (no Streamlit).

Every figure has a title and axis titles with units. Text that comes from the data set (captions,
ids) is HTML-escaped before it reaches Plotly, whose hover labels interpret a subset of HTML.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..dispersion import SCORE_ENTRIES, SCORE_UNIT

RESIDUAL_AXIS = "residual (Procrustes distance, unit Frobenius-normalised embedding)"
#: What "residual units" means on the Fig. S2 axes (the Paper analyses page's caption)
RESIDUAL_UNITS = "Procrustes distance between unit-Frobenius-norm embeddings"
#: Each dispersion score's axis title and short name, from ``dispersion.SCORE_ENTRIES``
SCORE_AXIS = {name: entry.axis_title for name, entry in SCORE_ENTRIES.items()}
SCORE_NAME = {name: entry.label for name, entry in SCORE_ENTRIES.items()}
#: Colour-bar titles: short lines, so the title does not run over the plot
COLOUR_TITLE = {name: f"{entry.label}<br>({SCORE_UNIT})" for name, entry in SCORE_ENTRIES.items()}
SET_COLOURS = {
    "low": "#1f77b4",
    "random": "#7f7f7f",
    "high": "#d62728",
    "selection": "#2ca02c",
    "pasted": "#9467bd",
}
#: Error bars and reference lines of the Plotly charts: a mid grey that reads on the light and on
#: the dark theme (Plotly's default, a dark slate, vanished on the dark background)
NEUTRAL_LINE = "rgba(128, 128, 128, 0.9)"
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


def residual_scatter(
    x: np.ndarray,
    y: np.ndarray,
    colour: np.ndarray,
    *,
    ids: Sequence[str] | None,
    captions: Sequence[str] | None,
    scores: Mapping[str, np.ndarray],
    colour_title: str,
    x_title: str,
    y_title: str,
    title: str,
    selected: Sequence[int] = (),
) -> go.Figure:
    """WebGL scatter of all stimuli; a point's stimulus row is its ``customdata`` (or, above
    :data:`HOVER_TEXT_LIMIT` points, its index in the first trace: the trace is in run order).

    Hover and markers follow :func:`point_fields`: up to :data:`HOVER_TEXT_LIMIT` points, hover
    shows id, caption (escaped, truncated; none when ``captions`` is None), each dispersion score
    of ``scores`` ({name: (n,) values}, named by ``dispersion.SCORE_ENTRIES``' labels, in
    :data:`SCORE_NAME`'s order) and the coordinates. Above it no per-point text is sent (100,000
    captions would be megabytes on every rerun): hover shows the coordinates and the colour score, and a selection shows the
    chosen stimuli's ids and captions below the chart. Coordinates and colours travel as float32.
    The current selection is drawn as open circles on top.
    """
    n = len(x)
    x32 = np.asarray(x, dtype=np.float32)
    y32 = np.asarray(y, dtype=np.float32)

    def texts() -> list[str]:
        names = ids if ids is not None else [str(row) for row in range(n)]
        shown = captions if captions is not None else [""] * n
        named = [(SCORE_NAME[name], scores[name]) for name in SCORE_NAME if name in scores]
        rows = list(zip(*(column for _, column in named), strict=True)) if named else [()] * n
        return [
            f"id {safe_hover_text(i, 40)}<br>{safe_hover_text(c)}<br>"
            + " · ".join(f"{label} {v:.4f}" for (label, _), v in zip(named, row, strict=True))
            for i, c, row in zip(names, shown, rows, strict=True)
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
