"""PNG figures of the paper's analyses (matplotlib, Agg backend; no display needed).

Each function takes the tidy table of one analysis (see :mod:`convergence_core.analyses`), draws
one figure with a panel per vision model (or held-out / language model) and writes it atomically
to ``path``. CKNNA is unitless; dispersion and deviation are Euclidean distances between
unit-Frobenius-norm configurations ("residual units").
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .cache import write_bytes  # noqa: E402
from .figure_style import DPI, FULL_WIDTH, STYLE, colour_map, ink, styled, wrap  # noqa: E402
from .dispersion import SCORE_UNIT, score_entry  # noqa: E402
from .retrieval import direction_label  # noqa: E402

P = ParamSpec("P")
R = TypeVar("R")

_SET_COLOURS = {"low": "#2b8cbe", "random": "#969696", "high": "#e34a33"}
_CONDITION_COLOURS = {"drop_high": "#2b8cbe", "full": "#969696", "drop_low": "#fd8d3c"}
_CONDITION_LABELS = {
    "drop_high": "drop high-dispersion",
    "full": "full set",
    "drop_low": "drop low-dispersion",
}


def _plain_text(draw: Callable[P, R]) -> Callable[P, R]:
    """Draw the figure in the shared style (:mod:`convergence_core.figure_style`: font sizes for a
    figure as wide as the dashboard's column) with every text taken literally: model, layer and
    property names come from the user, and a ``$`` in one (``$$\\frac{a}{b}$$``) would otherwise
    start matplotlib's math mode and fail the whole figure (from the reliability audit: the report
    and the Paper analyses page stopped on such a name). The figures use no math text of their
    own. The keyword ``theme`` ("light", the default: the report's files, or "dark": the
    dashboard's dark theme) picks the figure's colours (``figure_style.styled``)."""

    @functools.wraps(draw)
    def drawn(*args: P.args, **kwargs: P.kwargs) -> R:
        theme = str(kwargs.pop("theme", "light"))
        with styled({"text.parse_math": False}, theme=theme):
            return draw(*args, **kwargs)

    return drawn


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return write_bytes(path, buffer.getvalue())


def _panels(
    n: int, height: float = 3.0, min_width: float = 3.0, width: float = FULL_WIDTH
) -> tuple[Figure, list[plt.Axes], list[plt.Axes], float]:
    """``n`` panels in rows of at most three, each at least ``min_width`` inches wide when it can
    be, in a figure ``width`` inches wide (the dashboard's column): the panels, the spare cells
    of the last row (empty; :func:`_legend_below` may put the legend in one) and a cell's width
    (inches, for fitting titles)."""
    columns = max(1, min(n, 3, int(width // min_width)))
    rows = -(-n // columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(width, height * rows), squeeze=False, layout="constrained"
    )
    axes = list(grid.flat)
    for spare in axes[n:]:
        spare.set_axis_off()
    return figure, axes[:n], axes[n:], width / columns


def _legend_below(
    figure: Figure, axis: plt.Axes, spare: list[plt.Axes] | None = None
) -> None:
    """One legend for the figure, where it cannot hide a bar: in the first spare cell of the last
    row when there is one, else under the panels, in as many columns as fit the figure's width."""
    handles, labels = axis.get_legend_handles_labels()
    for extra in (spare or [])[1:]:
        extra.remove()
    if spare:
        spare[0].legend(handles, labels, loc="center", frameon=False)
        return
    size = float(STYLE["legend.fontsize"])  # type: ignore[arg-type]
    width = figure.get_figwidth() * 72.0
    needed = [0.56 * size * len(label) + 3.5 * size for label in labels]  # text, handle, gap
    columns = len(labels)
    while columns > 1 and max(
        sum(needed[i:i + columns]) for i in range(0, len(needed), columns)
    ) > width:
        columns -= 1
    figure.legend(handles, labels, loc="outside lower center", ncol=columns)


def _suptitle(figure: Figure, text: str) -> None:
    """The figure's title, broken into lines that fit its width."""
    figure.suptitle(wrap(text, figure.get_figwidth() - 0.3, float(STYLE["figure.titlesize"])))


def _fit_title(axis: plt.Axes, text: str, inches: float) -> None:
    """An axes title broken into lines that fit ``inches``."""
    axis.set_title(wrap(text, inches, float(STYLE["axes.titlesize"])))


def _bars_width(names: list[str]) -> float:
    """The narrowest panel (inches) whose x tick labels ``names`` (one group of bars each) do not
    run into each other at the style's tick size, with room for the y axis."""
    size = float(STYLE["xtick.labelsize"])  # type: ignore[arg-type]
    longest = max((len(str(name)) for name in names), default=1)
    return 1.0 + len(names) * max(0.8, 0.56 * size * (longest + 2) / 72.0)


def _cknna_label(k: int) -> str:
    return f"CKNNA (k = {k}, unitless)"


def _no_bars(axis: plt.Axes, x: np.ndarray, note: str, inches: float) -> None:
    """A panel of bars without its bars: ``note`` (why there are none) in its middle, its x range
    that of the groups and its y range CKNNA's [-1, 1] with the zero line, so that its ticks and
    axis labels read as those of a panel with bars."""
    axis.set_xlim(float(x[0]) - 0.5, float(x[-1]) + 0.5)
    axis.set_ylim(-1.0, 1.0)
    axis.axhline(0.0, color=ink(), linewidth=0.5)
    axis.text(
        0.5, 0.5, wrap(note, 0.62 * inches, float(STYLE["axes.labelsize"])),
        transform=axis.transAxes, ha="center", va="center", color=ink(),
        fontsize=STYLE["axes.labelsize"],
        bbox={"facecolor": axis.get_facecolor(), "edgecolor": "none"},  # over the zero line
    )


def _set_bars(axis: plt.Axes, rows: pd.DataFrame, x: np.ndarray, bar_width: float) -> None:
    """Fig. 2's bars in one panel: low, random mean with its 95% interval, high, per language
    model (``rows``, one per x position), and the zero line."""
    random_mean = rows["cknna_random_mean"].to_numpy()
    interval = np.vstack(
        [
            random_mean - rows["cknna_random_lower_95"],
            rows["cknna_random_upper_95"] - random_mean,
        ]
    )
    axis.bar(
        x - bar_width,
        rows["cknna_low_dispersion"],
        bar_width,
        label="low dispersion",
        color=_SET_COLOURS["low"],
    )
    axis.bar(
        x,
        random_mean,
        bar_width,
        yerr=interval,
        capsize=3,
        ecolor=ink(),
        label="random (mean, 95% interval)",
        color=_SET_COLOURS["random"],
    )
    axis.bar(
        x + bar_width,
        rows["cknna_high_dispersion"],
        bar_width,
        label="high dispersion",
        color=_SET_COLOURS["high"],
    )
    axis.axhline(0.0, color=ink(), linewidth=0.5)


@_plain_text
def dispersion_sets_figure(
    table: pd.DataFrame,
    path: str | os.PathLike[str],
    partner: str = "language model",
    hidden: str | None = None,
) -> Path:
    """Fig. 2: per vision model, grouped bars (low, random mean with 95% interval, high) per
    language model. ``table`` is one :func:`~convergence_core.analyses.dispersion_set_alignment`
    result (a single score); ``partner`` names the models on x (e.g. ``model outside GPA``).

    ``hidden``: a sentence saying why the sets' CKNNA is not drawn (the report's sets too small
    for a CKNNA worth reading, ``analyses.cknna_shown``): no bars then, that sentence in each panel
    instead, the panels' titles, ticks and axis labels as with bars. None: the bars."""
    visions = list(dict.fromkeys(table["vision_model"]))
    languages = list(dict.fromkeys(table["language_model"]))
    figure, axes, spare, panel = _panels(len(visions), min_width=_bars_width(languages))
    bar_width = 0.26
    x = np.arange(len(languages))
    for axis, vision in zip(axes, visions, strict=True):
        rows = table[table["vision_model"] == vision].set_index("language_model").loc[languages]
        if hidden is None:
            _set_bars(axis, rows, x, bar_width)
        else:
            _no_bars(axis, x, hidden, panel)
        axis.set_xticks(
            x,
            [f"{m}\n({layer})" for m, layer in zip(languages, rows["language_layer"], strict=True)],
        )
        _fit_title(axis, f"{vision} ({rows['vision_layer'].iloc[0]})", panel)
        axis.set_xlabel(f"{partner} (layer used)")
        axis.set_ylabel(_cknna_label(int(table["k"].iloc[0])))
    if hidden is None:
        _legend_below(figure, axes[0], spare)
    else:  # no bars, no legend: the spare cells stay empty
        for extra in spare:
            extra.remove()
    _suptitle(
        figure,
        f"Fig. 2: CKNNA on {int(table['set_size'].iloc[0])}-stimulus sets selected by "
        f"{table['score'].iloc[0]} dispersion",
    )
    return _save(figure, path)


@_plain_text
def drop_fraction_figure(
    table: pd.DataFrame,
    path: str | os.PathLike[str],
    partner: str = "language model",
    hidden: Sequence[str] = (),
    note: str | None = None,
) -> Path:
    """Fig. S1: per vision model, bars (drop high, full, drop low) per language model
    (``partner`` names the models on x).

    ``hidden``: conditions whose CKNNA is not drawn (their sets too small for a CKNNA worth
    reading, ``analyses.cknna_shown``): no bars and no legend entry for them (the others keep
    their places), and ``note`` (the sentence saying why) under the title, or in each panel, as
    in Fig. 2, when every condition is hidden."""
    visions = list(dict.fromkeys(table["vision_model"]))
    languages = list(dict.fromkeys(table["language_model"]))
    conditions = ["drop_high", "full", "drop_low"]
    shown = [c for c in conditions if c not in hidden]
    figure, axes, spare, panel = _panels(len(visions), min_width=_bars_width(languages))
    bar_width = 0.26
    x = np.arange(len(languages))
    fraction = float(table.loc[table["condition"] != "full", "fraction_dropped"].iloc[0])
    for axis, vision in zip(axes, visions, strict=True):
        rows = table[table["vision_model"] == vision]
        if not shown:
            _no_bars(axis, x, note or "", panel)
        for offset, condition in zip((-bar_width, 0.0, bar_width), conditions, strict=True):
            if condition not in shown:
                continue
            values = rows[rows["condition"] == condition].set_index("language_model").loc[languages]
            axis.bar(
                x + offset,
                values["cknna"],
                bar_width,
                color=_CONDITION_COLOURS[condition],
                label=f"{_CONDITION_LABELS[condition]} (n = {int(values['n_stimuli'].iloc[0])})",
            )
        axis.set_xticks(x, languages)
        _fit_title(axis, f"{vision} ({rows['vision_layer'].iloc[0]})", panel)
        axis.set_xlabel(partner)
        axis.set_ylabel(_cknna_label(int(table["k"].iloc[0])))
        if shown:
            axis.axhline(0.0, color=ink(), linewidth=0.5)
    if shown:
        _legend_below(figure, axes[0], spare)
    else:  # no bars, no legend: the spare cells stay empty
        for extra in spare:
            extra.remove()
    title = f"Fig. S1: dropping {fraction:.0%} of stimuli by dispersion"
    _suptitle(figure, title if not (hidden and shown and note) else f"{title}\n{note}")
    return _save(figure, path)


@_plain_text
def leave_one_out_figure(
    points: pd.DataFrame, statistics: pd.DataFrame, path: str | os.PathLike[str]
) -> Path:
    """Fig. S2: per held-out GPA model, deviation vs partial dispersion with the fit line."""
    models = list(dict.fromkeys(points["held_out_model"]))
    figure, axes, spare, panel = _panels(len(models), height=3.3, min_width=3.4)
    for extra in spare:
        extra.remove()
    for axis, model in zip(axes, models, strict=True):
        group = points[points["held_out_model"] == model]
        stats = statistics[statistics["held_out_model"] == model].iloc[0]
        x = group["partial_dispersion"].to_numpy()
        axis.scatter(x, group["deviation"], s=8, alpha=0.6, color=ink("#636363"))
        if np.isfinite(stats["fit_slope"]):
            line_x = np.array([x.min(), x.max()])
            axis.plot(
                line_x,
                stats["fit_slope"] * line_x + stats["fit_intercept"],
                color="red",
                linewidth=1.5,
                label="least-squares fit",
            )
            axis.legend(loc="upper left")
        _fit_title(
            axis,
            f"held out: {model}\n"
            f"r = {stats['pearson_r']:.2f} (p = {stats['pearson_p_value']:.2g}), "
            f"ρ = {stats['spearman_rho']:.2f} (p = {stats['spearman_p_value']:.2g})",
            panel,
        )
        axis.set_xlabel(wrap(
            "partial dispersion: mean residual of the other GPA models (residual units)", panel
        ))
        axis.set_ylabel("held-out deviation (residual units)")  # each panel has its own scale
    _suptitle(figure, "Fig. S2: leave one GPA model out, its deviation from the others' consensus")
    return _save(figure, path)


@_plain_text
def layer_sweep_figure(sweep: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Layer sweep heat map: per language model, rows = vision models, columns = language layers."""
    languages = list(dict.fromkeys(sweep["language_model"]))
    n_rows = sweep["vision_model"].nunique()
    # a panel per language model, one under another: each as wide as the figure, whose row
    # labels (model and layer names) would leave side-by-side panels little room
    figure, axes = plt.subplots(
        len(languages),
        1,
        figsize=(FULL_WIDTH, len(languages) * (0.45 * n_rows + 1.5) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    axes = axes.T
    vmin, vmax = float(sweep["cknna"].min()), float(sweep["cknna"].max())
    layer_of = dict(zip(sweep["vision_model"], sweep["vision_layer"], strict=True))
    image = None
    for axis, language in zip(axes[0], languages, strict=True):
        grid = sweep[sweep["language_model"] == language].pivot_table(
            index="vision_model", columns="language_layer_index", values="cknna", sort=False,
            dropna=False,  # a model undefined (NaN) at every layer keeps its panel, blank
        )
        image = axis.imshow(
            grid.to_numpy(), aspect="auto", cmap=colour_map(), vmin=vmin, vmax=vmax
        )
        axis.set_xticks(np.arange(grid.shape[1]), [str(c) for c in grid.columns])
        # the layer under the name: the names' width is taken from the layers' columns
        axis.set_yticks(np.arange(grid.shape[0]), [f"{m}\n({layer_of[m]})" for m in grid.index])
        axis.set_xlabel("layer (block index, 0 = shallowest)")
        axis.set_ylabel("GPA model\n(its GPA layer)")
        axis.set_title(language)
    colourbar = figure.colorbar(image, ax=list(axes[0]))
    colourbar.set_label(wrap(_cknna_label(int(sweep["k"].iloc[0])), 0.45 * n_rows + 1.4))
    _suptitle(figure, "Layer sweep: CKNNA on the full set")
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------
# universal space (convergence_core.universal, convergence_core.retrieval)

_METHOD_COLOURS = {"universal": "#2b8cbe", "ridge": "#fd8d3c", "chance": "#969696"}
_METHOD_LABELS = {
    "universal": "universal space (GPA)",
    "ridge": "ridge baseline",
    "chance": "chance",
}
_SUBSET_LABELS = {
    "all": "all held out",
    "low_dispersion": "low-dispersion third",
    "high_dispersion": "high-dispersion third",
}


@_plain_text
def cross_modal_dispersion_figure(
    per_stimulus: pd.DataFrame, relation: pd.DataFrame, path: str | os.PathLike[str]
) -> Path:
    """Per stimulus: intra-modal (GPA) dispersion vs cross-modal dispersion in the universal
    space, with Spearman ρ and its permutation p in the title. ``per_stimulus`` is
    ``CrossModalAnalysis.per_stimulus()`` (columns ``intra_modal_dispersion``,
    ``cross_modal_dispersion``); ``relation`` its one-row ``relation`` table."""
    figure, (axis,), _, panel = _panels(1, height=4.6)
    axis.scatter(
        per_stimulus["intra_modal_dispersion"],
        per_stimulus["cross_modal_dispersion"],
        s=9,
        alpha=0.6,
        color=ink("#636363"),
    )
    stats = relation.iloc[0]
    _fit_title(
        axis,
        f"Spearman ρ = {stats['spearman_rho']:.2f}, permutation p = "
        f"{stats['permutation_p_value_two_sided']:.2g} "
        f"({int(stats['n_permutations'])} shuffles, n = {int(stats['n_stimuli'])})",
        panel,
    )
    axis.set_xlabel(f"intra-modal dispersion: {str(stats['y']).replace('_', ' ')} (residual units)")
    axis.set_ylabel("cross-modal dispersion (residual units)")
    _suptitle(figure, "Universal space: cross-modal vs intra-modal (GPA) dispersion")
    return _save(figure, path)


@_plain_text
def retrieval_figure(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Held-out retrieval: per direction, recall@k of the universal space, the ridge baseline and
    chance (mean ± s.d. over folds; top row, all held-out stimuli) and recall@1 on the low- and
    high-dispersion thirds (bottom row, when present). ``summary`` is
    :func:`retrieval.summarise_retrieval` output."""
    directions = list(dict.fromkeys(summary["direction"]))
    methods = [m for m in ("universal", "ridge", "chance") if m in set(summary["method"])]
    subsets = [s for s in ("low_dispersion", "high_dispersion") if s in set(summary["subset"])]
    recalls = sorted(
        {m for m in summary["metric"] if m.startswith("recall_at_")},
        key=lambda m: int(m.rsplit("_", 1)[1]),
    )
    n_rows = 2 if subsets else 1
    figure, grid = plt.subplots(
        n_rows,
        len(directions),
        figsize=(max(FULL_WIDTH, 3.75 * len(directions)), 3.4 * n_rows),
        squeeze=False,
        layout="constrained",
    )
    width = 0.8 / len(methods)

    def bars(axis: plt.Axes, rows: pd.DataFrame, groups: list[tuple[str, str]]) -> None:
        x = np.arange(len(groups))
        for offset, method in enumerate(methods):
            picked = [
                rows[(rows["method"] == method) & (rows["metric"] == metric)
                     & (rows["subset"] == subset)]
                for metric, subset in groups
            ]
            means = [float(p["mean"].iloc[0]) if len(p) else np.nan for p in picked]
            errors = [float(p["std"].iloc[0]) if len(p) else 0.0 for p in picked]
            axis.bar(
                x + (offset - (len(methods) - 1) / 2) * width,
                means,
                width,
                yerr=None if method == "chance" else np.nan_to_num(errors),
                capsize=3,
                ecolor=ink(),
                color=_METHOD_COLOURS[method],
                label=_METHOD_LABELS[method],
            )
        axis.set_ylim(0.0, 1.05)
        axis.set_ylabel(wrap("recall (fraction of held-out queries)", 2.6))

    for column, direction in enumerate(directions):
        rows = summary[summary["direction"] == direction]
        top = grid[0][column]
        bars(top, rows, [(metric, "all") for metric in recalls])
        n_gallery = rows[rows["subset"] == "all"]["n_gallery_mean"].iloc[0]
        top.set_xticks(np.arange(len(recalls)), [f"recall@{m.rsplit('_', 1)[1]}" for m in recalls])
        top.set_xlabel(wrap(f"cut-off k (gallery: {n_gallery:.0f} held-out stimuli per fold)", 3.4))
        top.set_title(direction_label(direction))
        if subsets:
            bottom = grid[1][column]
            bars(bottom, rows, [("recall_at_1", subset) for subset in subsets])
            size = rows[rows["subset"] == subsets[0]]["n_gallery_mean"].iloc[0]
            bottom.set_xticks(
                np.arange(len(subsets)), [wrap(_SUBSET_LABELS[s], 1.5) for s in subsets]
            )
            bottom.set_xlabel(
                wrap(f"held-out stimuli by GPA dispersion ({size:.0f} per fold)", 3.4)
            )
            bottom.set_title(wrap(f"recall@1, {direction_label(direction)}", 3.4, 11.0))
    _legend_below(figure, grid[0][0])
    folds = int(summary["n_folds"].max())
    _suptitle(
        figure,
        f"Held-out retrieval through the universal space ({folds}-fold, mean ± s.d. over folds)",
    )
    return _save(figure, path)


def _number(value: float) -> str:
    """A legend's number: three decimals, or "undefined" for NaN (as summary.txt says)."""
    return "undefined" if np.isnan(value) else f"{value:.3f}"


@_plain_text
def predictors_figure(
    tests: pd.DataFrame,
    fit: pd.DataFrame,
    predictions: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    score: str = "mean",
    top: int = 12,
    q: float = 0.05,
) -> Path:
    """What predicts dispersion, for one score: the ``top`` best-ranked properties (ρ, or √ε²
    for categories; filled where q < ``q``) and observed against out-of-fold predicted
    dispersion per model, with the held-out R² and the shuffled-target baseline in the legend.

    ``tests``, ``fit``, ``predictions``: the tables of
    :func:`~convergence_core.dispersion_predictors.analyse_properties`.
    """
    rows = tests[tests["score"] == score].sort_values("rank").head(top).iloc[::-1]
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(11.5, max(3.8, 0.32 * len(rows) + 1.6)), layout="constrained"
    )
    effect = np.where(rows["test"] == "spearman", rows["effect"], rows["strength"])
    significant = rows["q_value"].to_numpy() < q
    y = np.arange(len(rows))
    left.barh(
        y,
        effect,
        color=["#e34a33" if s else matplotlib.rcParams["axes.facecolor"] for s in significant],
        edgecolor="#e34a33",
    )
    names = [
        name if test == "spearman" else f"{name} (categorical)"
        for name, test in zip(rows["property"], rows["test"], strict=True)
    ]
    left.set_yticks(y, names)
    for position, (value, q_value) in enumerate(zip(effect, rows["q_value"], strict=True)):
        left.annotate(  # right of the bar, or of the axis for a negative bar (never on a label)
            f"q={q_value:.1g}",
            (max(value, 0.0), position),
            xytext=(3, 0),
            textcoords="offset points",
            ha="left",
            va="center",
            fontsize=9,
        )
    left.axvline(0.0, color=ink("#444444"), linewidth=0.8)
    left.set_xlabel(wrap("Spearman ρ with dispersion (√ε² for categories), unitless", 4.0))
    left.set_ylabel("property")
    _fit_title(left, f"Top properties by permutation p ({score}); filled: q < {q}", 5.0)
    metrics = fit[fit["score"] == score].pivot_table(
        index="model", columns="metric", values="value", dropna=False  # an undefined R² is NaN
    )
    chosen = predictions[predictions["score"] == score]
    colours = {"ridge": "#2b8cbe", "boosted_trees": "#fd8d3c"}
    for model, points in chosen.groupby("model", sort=False):
        row = metrics.loc[model]
        right.scatter(
            points["predicted"],
            points["observed"],
            s=9,
            alpha=0.6,
            color=colours.get(str(model), ink("#666666")),
            label=(
                f"{model}: held-out R² = {_number(row['r2_held_out'])} "
                f"(shuffled {_number(row['r2_shuffled_mean'])})"
            ),
        )
    low = float(min(chosen["observed"].min(), chosen["predicted"].min()))
    high = float(max(chosen["observed"].max(), chosen["predicted"].max()))
    right.plot([low, high], [low, high], color=ink("#444444"), linestyle=":", linewidth=1)
    unit = f"{score_entry(score).label}, {SCORE_UNIT}"
    right.set_xlabel(wrap(f"predicted out of fold ({unit})", 5.0))
    right.set_ylabel(wrap(f"observed ({unit})", 4.0))
    _fit_title(right, "Dispersion predicted from every property (cross-validated)", 5.0)
    right.legend(loc="upper left", fontsize=9)
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------
# per-stimulus alignment (convergence_core.stimulus_alignment)

_VISION_COLOURS = ("#2b8cbe", "#e34a33", "#31a354", "#756bb1", "#fd8d3c", "#636363")
_PER_STIMULUS_LABELS = {
    "knn_overlap": "k-NN overlap (share of the k = {k} nearest stimuli shared)",
    "local_cka": "local CKA Δ (change of the base set's CKA, unitless)",
}


@_plain_text
def per_stimulus_alignment_figure(
    table: pd.DataFrame,
    dispersion: np.ndarray,
    relation: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    score: str = "mean",
) -> Path:
    """Per stimulus: its alignment (rows: ``knn_overlap``, ``local_cka``) against its dispersion,
    one panel per metric × language model, each vision model a colour with its Spearman ρ and
    permutation p in the legend. ``table`` is ``stimulus_alignment.per_stimulus_alignment``
    output, ``dispersion`` (n,) in run order, ``relation`` its ``alignment_dispersion_relation``."""
    metrics = list(dict.fromkeys(table["metric"]))
    languages = list(dict.fromkeys(table["language_model"]))
    visions = list(dict.fromkeys(table["vision_model"]))
    figure, grid = plt.subplots(
        len(metrics),
        len(languages),
        figsize=(max(FULL_WIDTH, 3.75 * len(languages)), 4.4 * len(metrics)),
        squeeze=False,
        layout="constrained",
    )
    dispersion = np.asarray(dispersion, dtype=np.float64)
    for row, metric in enumerate(metrics):
        for column, language in enumerate(languages):
            axis = grid[row][column]
            for colour, vision in zip(_VISION_COLOURS * 8, visions, strict=False):
                group = table[
                    (table["metric"] == metric)
                    & (table["language_model"] == language)
                    & (table["vision_model"] == vision)
                ].sort_values("stimulus")
                stats = relation[
                    (relation["metric"] == metric)
                    & (relation["language_model"] == language)
                    & (relation["vision_model"] == vision)
                ]
                label = vision
                if len(stats):
                    label += (
                        f": ρ = {stats['spearman_rho'].iloc[0]:.2f} "
                        f"(p = {stats['permutation_p_value_two_sided'].iloc[0]:.2g})"
                    )
                axis.scatter(
                    dispersion[group["stimulus"].to_numpy()], group["value"], s=6, alpha=0.45,
                    color=colour, label=label,
                )
            layer = table.loc[table["language_model"] == language, "language_layer"].iloc[0]
            _fit_title(axis, f"{language} ({layer})", 3.6)
            axis.set_xlabel(wrap(f"dispersion: {score} GPA residual (residual units)", 3.4))
            k = table.loc[table["metric"] == metric, "k"].dropna()
            axis.set_ylabel(wrap(
                _PER_STIMULUS_LABELS.get(metric, f"{metric} (unitless)").format(
                    k=int(k.iloc[0]) if len(k) else "?"
                ),
                2.4,
            ))
            # under the panel: inside, its lines covered the points
            axis.legend(
                loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=9, frameon=False,
                markerscale=2,
            )
    _suptitle(
        figure,
        "Per-stimulus alignment of each GPA model × partner pair against dispersion (Spearman ρ, "
        "permutation p)",
    )
    return _save(figure, path)
