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
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .cache import write_bytes  # noqa: E402
from .dispersion import SCORE_UNIT, score_entry  # noqa: E402

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
    """Draw the figure with every text taken literally: model, layer and property names come from
    the user, and a ``$`` in one (``$$\\frac{a}{b}$$``) would otherwise start matplotlib's math
    mode and fail the whole figure (from the reliability audit: the report and the Paper
    analyses page stopped on such a name). The figures use no math text of their own."""

    @functools.wraps(draw)
    def drawn(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return write_bytes(path, buffer.getvalue())


def _panels(n: int, width: float = 4.2, height: float = 3.6) -> tuple[Figure, list[plt.Axes]]:
    figure, axes = plt.subplots(
        1, n, figsize=(width * n, height), squeeze=False, layout="constrained"
    )
    return figure, list(axes[0])


def _legend_below(figure: Figure, axis: plt.Axes) -> None:
    """One legend for the figure, under the panels, where it cannot hide a bar."""
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)


def _cknna_label(k: int) -> str:
    return f"CKNNA (k = {k}, unitless)"


@_plain_text
def dispersion_sets_figure(
    table: pd.DataFrame, path: str | os.PathLike[str], partner: str = "language model"
) -> Path:
    """Fig. 2: per vision model, grouped bars (low, random mean with 95% interval, high) per
    language model. ``table`` is one :func:`~convergence_core.analyses.dispersion_set_alignment`
    result (a single score); ``partner`` names the models on x (e.g. ``model outside GPA``)."""
    visions = list(dict.fromkeys(table["vision_model"]))
    languages = list(dict.fromkeys(table["language_model"]))
    figure, axes = _panels(len(visions), width=max(4.2, 1.6 * len(languages) + 1.5))
    bar_width = 0.26
    x = np.arange(len(languages))
    for axis, vision in zip(axes, visions, strict=True):
        rows = table[table["vision_model"] == vision].set_index("language_model").loc[languages]
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
        axis.set_xticks(
            x,
            [f"{m}\n({layer})" for m, layer in zip(languages, rows["language_layer"], strict=True)],
            fontsize=8,
        )
        axis.set_title(f"{vision} ({rows['vision_layer'].iloc[0]})", fontsize=9)
        axis.set_xlabel(f"{partner} (layer used)")
        axis.set_ylabel(_cknna_label(int(table["k"].iloc[0])))
        axis.axhline(0.0, color="black", linewidth=0.5)
    _legend_below(figure, axes[0])
    figure.suptitle(
        f"Fig. 2: CKNNA on {int(table['set_size'].iloc[0])}-stimulus sets selected by "
        f"{table['score'].iloc[0]} dispersion",
        fontsize=10,
    )
    return _save(figure, path)


@_plain_text
def drop_fraction_figure(
    table: pd.DataFrame, path: str | os.PathLike[str], partner: str = "language model"
) -> Path:
    """Fig. S1: per vision model, bars (drop high, full, drop low) per language model
    (``partner`` names the models on x)."""
    visions = list(dict.fromkeys(table["vision_model"]))
    languages = list(dict.fromkeys(table["language_model"]))
    conditions = ["drop_high", "full", "drop_low"]
    figure, axes = _panels(len(visions), width=max(4.2, 1.6 * len(languages) + 1.5))
    bar_width = 0.26
    x = np.arange(len(languages))
    fraction = float(table.loc[table["condition"] != "full", "fraction_dropped"].iloc[0])
    for axis, vision in zip(axes, visions, strict=True):
        rows = table[table["vision_model"] == vision]
        for offset, condition in zip((-bar_width, 0.0, bar_width), conditions, strict=True):
            values = rows[rows["condition"] == condition].set_index("language_model").loc[languages]
            axis.bar(
                x + offset,
                values["cknna"],
                bar_width,
                color=_CONDITION_COLOURS[condition],
                label=f"{_CONDITION_LABELS[condition]} (n = {int(values['n_stimuli'].iloc[0])})",
            )
        axis.set_xticks(x, languages, fontsize=8)
        axis.set_title(f"{vision} ({rows['vision_layer'].iloc[0]})", fontsize=9)
        axis.set_xlabel(partner)
        axis.set_ylabel(_cknna_label(int(table["k"].iloc[0])))
        axis.axhline(0.0, color="black", linewidth=0.5)
    _legend_below(figure, axes[0])
    figure.suptitle(f"Fig. S1: dropping {fraction:.0%} of stimuli by dispersion", fontsize=10)
    return _save(figure, path)


@_plain_text
def leave_one_out_figure(
    points: pd.DataFrame, statistics: pd.DataFrame, path: str | os.PathLike[str]
) -> Path:
    """Fig. S2: per held-out GPA model, deviation vs partial dispersion with the fit line."""
    models = list(dict.fromkeys(points["held_out_model"]))
    figure, axes = _panels(len(models), width=4.8, height=4.0)
    for axis, model in zip(axes, models, strict=True):
        group = points[points["held_out_model"] == model]
        stats = statistics[statistics["held_out_model"] == model].iloc[0]
        x = group["partial_dispersion"].to_numpy()
        axis.scatter(x, group["deviation"], s=8, alpha=0.6, color="#636363")
        if np.isfinite(stats["fit_slope"]):
            line_x = np.array([x.min(), x.max()])
            axis.plot(
                line_x,
                stats["fit_slope"] * line_x + stats["fit_intercept"],
                color="red",
                linewidth=1.5,
                label="least-squares fit",
            )
            axis.legend(fontsize=7, loc="upper left")
        axis.set_title(
            f"held out: {model}\n"
            f"r = {stats['pearson_r']:.2f} (p = {stats['pearson_p_value']:.2g}), "
            f"ρ = {stats['spearman_rho']:.2f} (p = {stats['spearman_p_value']:.2g})",
            fontsize=9,
        )
        axis.set_xlabel("partial dispersion (residual units)")
        axis.set_ylabel("held-out deviation (residual units)")  # each panel has its own scale
    figure.suptitle(
        "Fig. S2: mean residual of the other GPA models (partial dispersion) vs the held-out "
        "model's deviation from their consensus",
        fontsize=10,
    )
    return _save(figure, path)


@_plain_text
def layer_sweep_figure(sweep: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Layer sweep heat map: per language model, rows = vision models, columns = language layers."""
    languages = list(dict.fromkeys(sweep["language_model"]))
    widths = [
        max(3.0, 0.45 * sweep[sweep["language_model"] == m]["language_layer_index"].nunique())
        for m in languages
    ]
    figure, axes = plt.subplots(
        1,
        len(languages),
        figsize=(sum(widths) + 3.0, 3.6),
        squeeze=False,
        sharey=True,
        layout="constrained",
        gridspec_kw={"width_ratios": widths},
    )
    vmin, vmax = float(sweep["cknna"].min()), float(sweep["cknna"].max())
    layer_of = dict(zip(sweep["vision_model"], sweep["vision_layer"], strict=True))
    image = None
    for axis, language in zip(axes[0], languages, strict=True):
        grid = sweep[sweep["language_model"] == language].pivot_table(
            index="vision_model", columns="language_layer_index", values="cknna", sort=False,
            dropna=False,  # a model undefined (NaN) at every layer keeps its panel, blank
        )
        image = axis.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        axis.set_xticks(np.arange(grid.shape[1]), [str(c) for c in grid.columns], fontsize=7)
        axis.set_yticks(
            np.arange(grid.shape[0]), [f"{m} ({layer_of[m]})" for m in grid.index], fontsize=8
        )
        axis.set_xlabel("layer (block index, 0 = shallowest)")
        axis.set_title(language, fontsize=9)
    axes[0][0].set_ylabel("GPA model (its GPA layer)")
    colourbar = figure.colorbar(image, ax=list(axes[0]))
    colourbar.set_label(_cknna_label(int(sweep["k"].iloc[0])))
    figure.suptitle("Layer sweep: CKNNA on the full set", fontsize=10)
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


def _direction_label(direction: str) -> str:
    """``vision_to_language`` -> ``vision → language (image → text)``."""
    source, _, target = direction.partition("_to_")
    names = {"vision": "image", "language": "text"}
    plain = f"{source} → {target}"
    if source in names and target in names:
        plain += f" ({names[source]} → {names[target]})"
    return plain


@_plain_text
def cross_modal_dispersion_figure(
    per_stimulus: pd.DataFrame, relation: pd.DataFrame, path: str | os.PathLike[str]
) -> Path:
    """Per stimulus: intra-modal (GPA) dispersion vs cross-modal dispersion in the universal
    space, with Spearman ρ and its permutation p in the title. ``per_stimulus`` is
    ``CrossModalAnalysis.per_stimulus()`` (columns ``intra_modal_dispersion``,
    ``cross_modal_dispersion``); ``relation`` its one-row ``relation`` table."""
    figure, (axis,) = _panels(1, width=5.6, height=4.4)
    axis.scatter(
        per_stimulus["intra_modal_dispersion"],
        per_stimulus["cross_modal_dispersion"],
        s=9,
        alpha=0.6,
        color="#636363",
    )
    stats = relation.iloc[0]
    axis.set_title(
        f"Spearman ρ = {stats['spearman_rho']:.2f}, permutation p = "
        f"{stats['permutation_p_value_two_sided']:.2g} "
        f"({int(stats['n_permutations'])} shuffles, n = {int(stats['n_stimuli'])})",
        fontsize=9,
    )
    axis.set_xlabel(f"intra-modal dispersion: {str(stats['y']).replace('_', ' ')} (residual units)")
    axis.set_ylabel("cross-modal dispersion (residual units)")
    figure.suptitle("Universal space: cross-modal vs intra-modal (GPA) dispersion", fontsize=10)
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
        figsize=(5.0 * len(directions), 3.6 * n_rows),
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
                color=_METHOD_COLOURS[method],
                label=_METHOD_LABELS[method],
            )
        axis.set_ylim(0.0, 1.05)
        axis.set_ylabel("recall (fraction of held-out queries)")

    for column, direction in enumerate(directions):
        rows = summary[summary["direction"] == direction]
        top = grid[0][column]
        bars(top, rows, [(metric, "all") for metric in recalls])
        n_gallery = rows[rows["subset"] == "all"]["n_gallery_mean"].iloc[0]
        top.set_xticks(np.arange(len(recalls)), [f"recall@{m.rsplit('_', 1)[1]}" for m in recalls])
        top.set_xlabel(f"cut-off k (gallery: {n_gallery:.0f} held-out stimuli per fold)")
        top.set_title(_direction_label(direction), fontsize=9)
        if subsets:
            bottom = grid[1][column]
            bars(bottom, rows, [("recall_at_1", subset) for subset in subsets])
            size = rows[rows["subset"] == subsets[0]]["n_gallery_mean"].iloc[0]
            bottom.set_xticks(np.arange(len(subsets)), [_SUBSET_LABELS[s] for s in subsets])
            bottom.set_xlabel(f"held-out stimuli by GPA dispersion ({size:.0f} per fold)")
            bottom.set_title(f"recall@1, {_direction_label(direction)}", fontsize=9)
    _legend_below(figure, grid[0][0])
    folds = int(summary["n_folds"].max())
    figure.suptitle(
        f"Held-out retrieval through the universal space ({folds}-fold, mean ± s.d. over folds)",
        fontsize=10,
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
        color=["#e34a33" if s else "#ffffff" for s in significant],
        edgecolor="#e34a33",
    )
    names = [
        name if test == "spearman" else f"{name} (categorical)"
        for name, test in zip(rows["property"], rows["test"], strict=True)
    ]
    left.set_yticks(y, names, fontsize=8)
    for position, (value, q_value) in enumerate(zip(effect, rows["q_value"], strict=True)):
        left.annotate(  # right of the bar, or of the axis for a negative bar (never on a label)
            f"q={q_value:.1g}",
            (max(value, 0.0), position),
            xytext=(3, 0),
            textcoords="offset points",
            ha="left",
            va="center",
            fontsize=7,
        )
    left.axvline(0.0, color="#444", linewidth=0.8)
    left.set_xlabel("Spearman ρ with dispersion (√ε² for categories), unitless")
    left.set_ylabel("property")
    left.set_title(f"Top properties by permutation p ({score}); filled: q < {q}", fontsize=9)
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
            color=colours.get(str(model), "#666"),
            label=(
                f"{model}: held-out R² = {_number(row['r2_held_out'])} "
                f"(shuffled {_number(row['r2_shuffled_mean'])})"
            ),
        )
    low = float(min(chosen["observed"].min(), chosen["predicted"].min()))
    high = float(max(chosen["observed"].max(), chosen["predicted"].max()))
    right.plot([low, high], [low, high], color="#444", linestyle=":", linewidth=1)
    unit = f"{score_entry(score).label}, {SCORE_UNIT}"
    right.set_xlabel(f"predicted out of fold ({unit})")
    right.set_ylabel(f"observed ({unit})")
    right.set_title("Dispersion predicted from every property (cross-validated)", fontsize=9)
    right.legend(fontsize=7, loc="upper left")
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
        figsize=(4.6 * len(languages), 3.6 * len(metrics)),
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
            axis.set_title(f"{language} ({layer})", fontsize=9)
            axis.set_xlabel(f"dispersion: {score} GPA residual (residual units)")
            k = table.loc[table["metric"] == metric, "k"].dropna()
            axis.set_ylabel(
                _PER_STIMULUS_LABELS.get(metric, f"{metric} (unitless)").format(
                    k=int(k.iloc[0]) if len(k) else "?"
                ),
                fontsize=8,
            )
            axis.legend(fontsize=6, loc="best")
    figure.suptitle(
        "Per-stimulus alignment of each GPA model × partner pair against dispersion (Spearman ρ, "
        "permutation p)",
        fontsize=10,
    )
    return _save(figure, path)
