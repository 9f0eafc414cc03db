"""The one look of every static figure: the report's PNGs (:mod:`convergence_core.figures`) and the
dashboard's pictures (:mod:`convergence_core.dashboard.charts`).

Figures are drawn about as wide as they are shown, so that their text keeps its size: a figure
:data:`FULL_WIDTH` inches wide at :data:`DPI` dots per inch is 900 pixels, about the dashboard's
main column in a 1400-pixel window (940 CSS px), where :data:`STYLE`'s 10-point ticks are about
16 px. Shrunk into the 564-px column of a 1024-pixel window they are still about 10 px
(10 pt × DPI / 72 × 564 / 900). A picture in a narrower column (e.g. two thirds of it) is drawn
narrower in proportion. Figures with many panels wrap them into rows of at most two or three.

Every figure is drawn for a theme, :data:`THEMES`: "light" (matplotlib's own colours: the
report's files and the dashboard's light theme) or "dark" (Streamlit's dark theme: a transparent
background, light text and frames, :data:`THEME_STYLE`). Colours a figure picks itself for what
the light theme draws black or dark grey (zero lines, error bars, grey points) come from
:func:`ink`, and the colour map of coloured points from :func:`colour_map`, so that they read on
the dark background too.

Only :mod:`matplotlib` itself is imported here (not pyplot): the dashboard's pages import this.
"""

from __future__ import annotations

import contextlib
import textwrap
import threading
from collections.abc import Iterator, Mapping

import matplotlib
from matplotlib.colors import Colormap, ListedColormap, to_hex, to_rgb

#: Dots per inch of every static figure (report and dashboard)
DPI = 120
#: Width (inches) of a figure shown across the dashboard's main column
FULL_WIDTH = 7.5
#: Font sizes (points) of every static figure; axes titles sit a little above their axes
STYLE: dict[str, object] = {
    "font.size": 10.0,
    "axes.titlesize": 11.0,
    "axes.labelsize": 10.5,
    "xtick.labelsize": 10.0,
    "ytick.labelsize": 10.0,
    "legend.fontsize": 10.0,
    "legend.title_fontsize": 10.0,
    "figure.titlesize": 12.0,
    "axes.titlepad": 5.0,
    "figure.constrained_layout.h_pad": 0.08,  # inches between rows of panels
    "figure.constrained_layout.w_pad": 0.06,
    "savefig.dpi": DPI,
}

#: The themes a figure is drawn for (Streamlit's theme types)
THEMES = ("light", "dark")
#: The dark theme's background: none (transparent), so that the page's own shows through
#: (Streamlit 1.67's dark page is #171614, older ones' #0e1117, a custom theme's anything)
DARK_BACKGROUND = "none"
#: The dark theme's text (Streamlit's dark text colour), frames (spines, ticks) and grid lines:
#: neutral greys that read on any dark page
DARK_TEXT = "#fafafa"
DARK_FRAME = "#a6a6a6"
DARK_GRID = "#3d3d3d"
_DARK: dict[str, object] = {
    "figure.facecolor": DARK_BACKGROUND,
    "figure.edgecolor": DARK_BACKGROUND,
    "axes.facecolor": DARK_BACKGROUND,
    "text.color": DARK_TEXT,
    "axes.labelcolor": DARK_TEXT,
    "axes.edgecolor": DARK_FRAME,
    "xtick.color": DARK_FRAME,
    "ytick.color": DARK_FRAME,
    "xtick.labelcolor": DARK_TEXT,
    "ytick.labelcolor": DARK_TEXT,
    "grid.color": DARK_GRID,
    "legend.facecolor": "#2b2b2b",  # a legend over points hides them as on white
    "legend.edgecolor": "#555555",
    "patch.edgecolor": DARK_TEXT,
}
#: rcParams of each theme (over :data:`STYLE`): the light one sets the same keys to matplotlib's
#: defaults, so a light figure is the same whatever was drawn before it
THEME_STYLE: dict[str, dict[str, object]] = {
    "light": {key: matplotlib.rcParamsDefault[key] for key in _DARK},
    "dark": _DARK,
}
#: The theme :func:`styled` draws in now (read by :func:`ink`; set under :data:`_LOCK`)
_theme = "light"

#: Serialises drawing under :data:`STYLE` (``rc_context`` changes matplotlib's global settings,
#: and Streamlit runs each session in its own thread); re-entrant, so a styled figure may draw
#: another helper's styled parts
_LOCK = threading.RLock()


@contextlib.contextmanager
def styled(extra: Mapping[str, object] | None = None, theme: str = "light") -> Iterator[None]:
    """Draw (and save) a figure under :data:`STYLE`, the colours of ``theme`` (one of
    :data:`THEMES`) and the ``extra`` rcParams, one thread at a time."""
    global _theme
    if theme not in THEME_STYLE:
        raise ValueError(f"unknown theme {theme!r}; use one of {list(THEMES)}")
    with _LOCK, matplotlib.rc_context({**STYLE, **THEME_STYLE[theme], **(extra or {})}):
        before, _theme = _theme, theme
        try:
            yield
        finally:
            _theme = before


def colour_map(theme: str | None = None) -> Colormap:
    """The colour map of values drawn as coloured points on ``theme`` (default: the one
    :func:`styled` draws in now): viridis, without its darkest fifth on the dark theme (its deep
    purple points vanished on the dark background)."""
    viridis = matplotlib.colormaps["viridis"]
    if (theme or _theme) == "light":
        return viridis
    return ListedColormap(viridis.colors[len(viridis.colors) // 5:], name="viridis_on_dark")


def tint(colour: str, theme: str | None = None) -> str:
    """The colour of translucent points drawn in ``colour`` on ``theme`` (default: the one
    :func:`styled` draws in now): ``colour`` itself on the light theme; on the dark one, a third
    of the way to white (matplotlib's blue at alpha 0.6 read at 2.1:1 on the dark page)."""
    if (theme or _theme) == "light":
        return colour
    return to_hex(tuple(c + (1.0 - c) / 3.0 for c in to_rgb(colour)))


def ink(light: str = "black", theme: str | None = None) -> str:
    """The colour of what the light theme draws in the grey ``light`` (black for zero lines and
    error bars, a dark grey for grey points) on ``theme`` (default: the one :func:`styled` draws
    in now): ``light`` itself on the light theme; on the dark one, the grey as light as ``light``
    is dark (black is :data:`DARK_TEXT`, ``#444444`` about ``#b7b7b7``)."""
    if (theme or _theme) == "light":
        return light
    grey = sum(to_rgb(light)) / 3.0
    level = (1.0 - grey) * sum(to_rgb(DARK_TEXT)) / 3.0
    return to_hex((level, level, level))


def _chunks(line: str, parentheses: bool) -> list[str]:
    """``line`` cut where it reads best broken, outside parentheses: after ", ", "; " or " — ",
    and (``parentheses``) before " (" (the cut space dropped)."""
    chunks, depth, start = [], 0, 0
    for i, char in enumerate(line):
        if depth == 0 and i > start:
            if line.startswith(", ", i) or line.startswith("; ", i):
                chunks.append(line[start:i + 1])
                start = i + 2
            elif line.startswith(" — ", i):
                chunks.append(line[start:i + 2])
                start = i + 3
            elif parentheses and line.startswith(" (", i):
                chunks.append(line[start:i])
                start = i + 1
        depth += (char in "([") - (char in ")]")
    return [*chunks, line[start:]]


def _joined(chunks: list[str], limit: int) -> list[str]:
    """``chunks`` joined with spaces into as few lines of at most ``limit`` characters as the
    order allows (a chunk longer than that is a line of its own)."""
    parts: list[str] = []
    for chunk in chunks:
        if parts and len(parts[-1]) + 1 + len(chunk) <= limit:
            parts[-1] += " " + chunk
        else:
            parts.append(chunk)
    return parts


def wrap(text: object, inches: float, points: float | None = None) -> str:
    """``text`` with each of its lines broken to fit ``inches`` at ``points`` (default: the
    style's axis-label size; DejaVu Sans averages about 0.56 em a character): after a comma,
    semicolon or dash outside parentheses where that is enough, else also before a parenthesis,
    else at spaces. A word longer than a line stays whole; a line that fits is left as it is."""
    size = float(points if points is not None else STYLE["axes.labelsize"])  # type: ignore[arg-type]
    limit = max(12, int(inches * 72.0 / (0.56 * size)))
    lines: list[str] = []
    for line in str(text).split("\n"):
        for parts in (
            _joined(_chunks(line, False), limit),
            _joined(_chunks(line, True), limit),
            textwrap.wrap(line, limit, break_long_words=False, break_on_hyphens=False) or [line],
        ):
            if max(map(len, parts)) <= limit:
                break
        lines += parts
    return "\n".join(lines)
