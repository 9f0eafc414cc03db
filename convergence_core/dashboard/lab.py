"""The Alignment lab's live numbers: any registry metric of many stimulus subsets at once.

The page recomputes, on every change of the metric, k or the subset, the chosen metric
(``metrics.metric_names()``) for every vision × language pair on the chosen sets, on up to
``n_random`` random sets (the baseline distribution) and, on demand, on the ``2 · n_permutations``
relabelled sets of the low-vs-high permutation test, the shuffled pairings of the calibrated
scores and the matched random sets. All of it goes through the engine the report uses,
``subset_metrics.metric_values`` (or its one-metric form ``metric_on_sets``): neighbour metrics
from the stored neighbour lists (every subset and pair in one batched pass), CKA-family metrics
from the sets' prepared features.
The random sets are the draws of ``analyses.random_sets`` (``random_baseline``: with an interval
width it stops drawing once the baseline mean is that precise) and the label shuffles draw from
``analyses.shuffle_rng``, as the report's: for the same seed, number of sets and metric the lab
and the report agree.

Every table here is long: one row per pair × set (× metric), the metric in a ``metric`` column and
its number in ``value`` (the CSV is the same table).

Shapes: ``n`` stimuli in the run, subsets of ``s`` stimuli; ``indexes`` maps (model, layer) to the
run's neighbour index (``run.neighbours``: prepared features + exact neighbour lists).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .. import calibration, random_baseline
from .. import metrics as registry
from ..alignment import cknna_bound_note
from ..analyses import (
    LayerKey,
    Pair,
    aligns_two_models,
    matched_set_seed,
    shuffle_rng,
    vision_typicality,
)
from ..neighbours import NeighbourIndex
from ..random_baseline import DEFAULT_MIN_SETS
from ..stats import (
    PERCENTILE_INTERVAL_MIN_VALUES,
    percentile_interval,
    permutation_tests_two_sets,
)
from ..subset_metrics import (
    cca_dim_limit,
    metric_on_sets,
    metric_options,
    metric_values,
    set_scorer,
)
from ..validation import MIN_CKNNA_SET_SIZE, check_k, check_min_stimuli

#: Key of the Alignment lab's container of the bars (CSS class ``st-key-lab-bars``): where the
#: browser test and benchmark look for the new bars after a change of k
BARS_CONTAINER_KEY = "lab-bars"
#: Above this many stimuli the feature metrics (CKA family: O(s·d²) per set without the small-n
#: kernel route) wait for a button like the metrics the registry marks as not live. At 10,000
#: stimuli (sets of 2,500, 768-1,536 features, 8 pairs) CKA took 179 s on 2 busy cores, and the
#: page sat behind a spinner: it was 20,000 before
LIVE_FEATURE_STIMULI = 5_000

PAIR_COLUMNS = ["vision_model", "vision_layer", "language_model", "language_layer"]

__all__ = [
    "BARS_CONTAINER_KEY",
    "LIVE_FEATURE_STIMULI",
    "MIN_CKNNA_SET_SIZE",
    "Headline",
    "MetricChoice",
    "Pair",
    "baseline_statement",
    "best_layer_sample_note",
    "baseline_table",
    "bound_note",
    "cca_dim_bound",
    "calibration_table",
    "check_subset_for_k",
    "chosen_options",
    "headline",
    "low_high_matched_table",
    "low_high_permutation_table",
    "matched_verdict",
    "matching_covariates",
    "metric_choices",
    "metric_label",
    "needs_button",
    "options_text",
    "results_table",
    "set_table",
    "shown_table",
    "undefined_note",
    "value_text",
]


# ----------------------------------------------------------------------------------------------
# the metric picker
class MetricChoice(NamedTuple):
    """One registry metric as the picker shows it."""

    name: str
    label: str
    description: str
    value_range: tuple[float, float]
    neighbour_metric: bool
    live: bool
    options: tuple[str, ...]

    @property
    def summary(self) -> str:
        """One line: what it measures, its range, what it needs, whether it is live."""
        low, high = self.value_range
        needs = "k nearest neighbours" if self.neighbour_metric else "the sets' features"
        if self.options:
            needs += " and " + ", ".join(self.options)
        speed = "live" if self.live else "slower: computed when asked (a button)"
        return (
            f"{self.label} ({self.name}): {self.description}. Range [{low:g}, {high:g}]; needs "
            f"{needs}; {speed}."
        )


def cross_pairs(
    gpa_side: Iterable[tuple[str, str]], partner_side: Iterable[tuple[str, str]]
) -> tuple[Pair, ...]:
    """Every GPA model × partner pair of the Stimuli page and the lab, from (model, layer)
    sides, without a model paired with itself (``analyses.aligns_two_models``)."""
    partners = list(partner_side)
    pairs = (
        Pair(model, layer, partner, partner_layer)
        for model, layer in gpa_side
        for partner, partner_layer in partners
    )
    return tuple(filter(aligns_two_models, pairs))


def pair_text(pair: Pair) -> str:
    """A pair as the pages' pair choices show it: ``"a × b (layer / layer)"`` (the choice itself
    is its two models; a name holding " × " is put in brackets, so that the texts of two pairs
    differ as their models do: a selectbox tells its choices apart by their text)."""
    vision, language = (f"({name})" if " × " in name else name
                        for name in (pair.vision_model, pair.language_model))
    return f"{vision} × {language} ({pair.vision_layer} / {pair.language_layer})"


def metric_label(name: str) -> str:
    """The short label of a registry metric (``metrics.Metric.label``)."""
    return registry.metric(name).label


def metric_choices() -> list[MetricChoice]:
    """Every metric of the registry, in registry order, as the lab's picker lists them."""
    choices = []
    for name in registry.metric_names():
        entry = registry.metric(name)
        choices.append(
            MetricChoice(
                name,
                metric_label(name),
                entry.description,
                tuple(entry.value_range),
                entry.neighbour_metric,
                entry.live,
                tuple(o for o in entry.options if o not in ("k", "normalise")),
            )
        )
    return choices


def needs_button(metric: str, n_stimuli: int) -> bool:
    """Whether the lab computes ``metric`` only when asked: the registry marks it as not live
    (e.g. SVCCA), or it is a feature metric on a run above :data:`LIVE_FEATURE_STIMULI`."""
    entry = registry.metric(metric)
    return not entry.live or (not entry.neighbour_metric and n_stimuli > LIVE_FEATURE_STIMULI)


def chosen_options(
    metric: str, *, kernel: str = "linear", sigma: float = 1.0, cca_dim: int = 10
) -> dict[str, Any]:
    """The options the picker's controls set, restricted to those ``metric`` takes (k aside)."""
    given = {"kernel": kernel, "sigma": float(sigma), "cca_dim": int(cca_dim)}
    entry = registry.metric(metric)
    options = {name: given[name] for name in entry.options if name in given}
    if options.get("kernel") == "linear":
        options.pop("sigma", None)  # sigma is the RBF width only
    return metric_options(metric, options)


class CcaDimBound(NamedTuple):
    """The largest CCA dimension the lab's control allows (:func:`cca_dim_bound`) and why."""

    limit: int
    #: e.g. "one fewer than the smallest set (15 stimuli) and at most the 3 features of the
    #: narrowest layer compared (subj01 / V1)"
    why: str


def cca_dim_bound(run: Any, pairs: Sequence[Pair], smallest: int) -> CcaDimBound:
    """SVCCA's ``cca_dim`` bound for ``pairs`` of ``run`` on sets of at least ``smallest``
    stimuli: ``subset_metrics.cca_dim_limit`` (the report's rule) of the set size and the feature
    width of every layer compared (``run.manifest``), with the words for the control's help."""
    widths = {
        (model, layer): int(run.manifest.models[model].dims[layer])
        for pair in pairs
        for model, layer in pair.sides
    }
    limit = cca_dim_limit(smallest, widths.values())
    (model, layer), narrowest = min(widths.items(), key=lambda item: item[1])
    why = f"one fewer than the smallest set ({smallest} stimuli)"
    if narrowest < smallest - 1:
        why += (
            f" and at most the {narrowest} feature{'s' if narrowest != 1 else ''} of the "
            f"narrowest layer compared ({model} / {layer})"
        )
    return CcaDimBound(limit, why)


def options_text(metric: str, k: int | None, options: Mapping[str, Any]) -> str:
    """The settings a value depends on, e.g. ``"k=10"`` or ``"kernel=rbf, sigma=1"``."""
    parts = [f"k={int(k)}"] if registry.metric(metric).neighbour_metric and k is not None else []
    for name, value in options.items():
        if name == "sigma" and options.get("kernel") == "linear":
            continue
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts)


def _k_of(metric: str, k: int | None) -> int | None:
    return int(k) if registry.metric(metric).neighbour_metric and k is not None else None


# ----------------------------------------------------------------------------------------------
# sets, random baseline, permutation test
def check_subset_for_k(size: int, k: int, what: str) -> None:
    """ValueError in words when ``k`` neighbours cannot be taken inside a subset of ``size``
    (CKNNA's unbiased HSIC needs at least 4 stimuli; k as ``validation.check_k`` words it)."""
    check_min_stimuli(size, 4, f"CKNNA on {what}")
    check_k(k, size, 1, what=what)


def download_name(kind: str, run: str, metric: str, score: str, size: int, k: int | None) -> str:
    """A downloaded table's file name: ``<kind>-<run>-<metric>-<score>-size<size>[-k<k>].csv``,
    k only for a neighbour metric (a CKA file named a k that CKA does not use), so that two
    downloads of other settings never share a name."""
    k_part = "" if _k_of(metric, k) is None else f"-k{int(k)}"
    return f"{kind}-{run}-{metric}-{score}-size{int(size)}{k_part}.csv"


def _metric_columns(metric: str, k: int | None, options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "metric": metric,
        "options": options_text(metric, k, options),
        "k": _k_of(metric, k),
    }


def _with_int_k(table: pd.DataFrame) -> pd.DataFrame:
    if "k" in table:
        table["k"] = pd.array(table["k"], dtype="Int64")  # empty for feature metrics
    return table


def set_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    sets: Mapping[str, np.ndarray],
    k: int | None,
    *,
    metric: str = "cknna",
    options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """``metric`` of every pair on each named set (sets may differ in size).

    Returns one row per pair × set: the pair's columns, ``set``, ``set_size``, ``metric``,
    ``options`` (text), ``k`` (empty for feature metrics), ``value`` (NaN where a feature metric
    is undefined on the set, e.g. SVCCA on repeated stimuli: :func:`undefined_note` says why).
    """
    options = metric_options(metric, options)
    neighbour = registry.metric(metric).neighbour_metric
    subsets = {name: np.asarray(rows_of_set, dtype=np.intp) for name, rows_of_set in sets.items()}
    for name, subset in subsets.items():
        if neighbour:
            check_subset_for_k(subset.shape[0], k, f"the {name} set")
        else:
            check_min_stimuli(subset.shape[0], 4, f"{metric_label(metric)} on the {name} set")
    values = {}
    for size in dict.fromkeys(subset.shape[0] for subset in subsets.values()):
        names = [name for name, subset in subsets.items() if subset.shape[0] == size]
        together = metric_on_sets(  # sets of one size in one batched call
            indexes, [pair.sides for pair in pairs], np.stack([subsets[n] for n in names]),
            metric, k=k or 1, options=options, on_error="nan",  # undefined: n/a and a note
        )
        values.update({name: together[:, j] for j, name in enumerate(names)})
    rows = [
        {
            **pair._asdict(),
            "set": name,
            "set_size": int(subset.shape[0]),
            **_metric_columns(metric, k, options),
            "value": float(value),
        }
        for name, subset in subsets.items()
        for pair, value in zip(pairs, values[name], strict=True)
    ]
    return _with_int_k(pd.DataFrame(rows))


def baseline_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    n: int,
    size: int,
    k: int | None,
    *,
    metric: str = "cknna",
    options: Mapping[str, Any] | None = None,
    n_random: int = 200,
    seed: int = 0,
    interval_width: float | None = None,
    min_sets: int = DEFAULT_MIN_SETS,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Random-subset baseline of ``metric`` per pair (``random_baseline.sequential_random_scores``
    over ``analyses.random_sets``' draws of ``size`` of the ``n`` stimuli).

    ``interval_width=None`` draws exactly ``n_random`` sets (the paper analysis's baseline); a
    width draws at most ``n_random`` and stops once every pair's 95% confidence interval of the
    mean ``metric`` is that narrow (in the metric's units).

    Returns one row per pair: the pair's columns, ``set_size``, ``metric``, ``options``, ``k``,
    ``n_random`` (sets drawn), ``random_mean``, ``random_lower_95``, ``random_upper_95`` (the 95%
    percentile interval of the random sets' values), ``random_mean_interval`` (width of the 95%
    confidence interval of the mean: Stein's or the usual t interval, whichever is wider),
    ``interval_width`` (asked for; NaN for a fixed number) and ``n_undefined`` (random sets on which
    the metric is undefined for the pair). A feature metric undefined on some random sets makes
    that pair's mean and intervals NaN (:func:`undefined_note`); drawn to a precision, the sets
    stop once the other pairs' means are that precise (``random_baseline``'s docstring says why).
    """
    options = metric_options(metric, options)
    keyed = [pair.sides for pair in pairs]
    drawn = random_baseline.sequential_random_scores(
        lambda sets: {metric: metric_on_sets(indexes, keyed, sets, metric, k=k or 1,
                                             options=options, on_error="nan")},
        int(n),
        int(size),
        stop_on=metric,
        interval_width=interval_width,
        max_sets=int(n_random),
        min_sets=min_sets,
        seed=int(seed),
        progress=progress,
    )
    values = drawn.values[metric]
    widths = drawn.intervals  # Stein's or the usual t interval, whichever is wider
    rows = []
    for pair, row, width, undefined in zip(pairs, values, widths, drawn.undefined, strict=True):
        lower, upper = percentile_interval(row, 0.95)
        rows.append(
            {
                **pair._asdict(),
                "set_size": int(size),
                **_metric_columns(metric, k, options),
                "n_random": drawn.n_sets,
                "random_mean": float(row.mean()),
                "random_lower_95": lower,
                "random_upper_95": upper,
                "random_mean_interval": float(width),
                "interval_width": np.nan if interval_width is None else float(interval_width),
                "n_undefined": int(undefined),
            }
        )
    return _with_int_k(pd.DataFrame(rows))


def low_high_permutation_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    low: np.ndarray,
    high: np.ndarray,
    k: int | None,
    *,
    metric: str = "cknna",
    options: Mapping[str, Any] | None = None,
    n_permutations: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Permutation test of metric(low) − metric(high) per pair, all pairs on the same shuffles
    (the report's shuffles, ``analyses.shuffle_rng``; tests/test_page_alignment_lab.py checks
    that both give the same p-values).

    Returns one row per pair: the pair's columns, ``metric``, ``options``, ``k``,
    ``low_minus_high``, ``permutation_p_value_two_sided``, ``permutation_p_value_low_greater``,
    ``n_permutations`` (NaN where a feature metric is undefined on the low or high set or on a
    relabelled set).
    """
    options = metric_options(metric, options)
    keyed = [pair.sides for pair in pairs]
    tests = permutation_tests_two_sets(
        set_scorer(indexes, keyed, metric, k=k or 1, options=options, on_error="nan"),
        low,
        high,
        n_permutations=int(n_permutations),
        rng=shuffle_rng(seed),
    )
    rows = [
        {
            **pair._asdict(),
            **_metric_columns(metric, k, options),
            "low_minus_high": test.observed,
            "permutation_p_value_two_sided": test.p_value_two_sided,
            "permutation_p_value_low_greater": test.p_value_first_greater,
            "n_permutations": int(n_permutations),
        }
        for pair, test in zip(pairs, tests, strict=True)
    ]
    return _with_int_k(pd.DataFrame(rows))


# ----------------------------------------------------------------------------------------------
# display
def value_text(value: float, set_size: int, metric: str = "cknna") -> str:
    """A value for display: ``"0.1234"``; ``"—"`` for CKNNA on a set of fewer than
    ``validation.MIN_CKNNA_SET_SIZE`` stimuli (too few for a CKNNA worth reading); ``"n/a"``
    where the metric is undefined (NaN: :func:`undefined_note` says why)."""
    if metric == "cknna" and set_size < MIN_CKNNA_SET_SIZE:
        return "—"
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.4f}"


class Headline(NamedTuple):
    """The four numbers above the lab's bars, as display text (:func:`headline`)."""

    focus: str  #: the focus set's value ("—" when it cannot be shown)
    focus_delta: str | None  #: "+0.0123 vs random", or None (no focus value, or random itself)
    low: str
    random: str  #: the mean of every pair's mean random value (the set size's baseline)
    high: str
    too_small: tuple[str, ...]  #: sets without a CKNNA number (fewer than MIN_CKNNA_SET_SIZE)


def headline(
    set_values: pd.DataFrame,
    baseline: pd.DataFrame,
    set_sizes: Mapping[str, int],
    focus: str,
    size: int,
    metric: str,
    focus_baseline: pd.DataFrame | None = None,
) -> Headline:
    """Each set's value averaged over the pairs shown, for the lab's summary cards.

    ``set_values`` is :func:`set_table`'s output, ``baseline`` :func:`baseline_table`'s for sets
    of ``size`` (the low, high and random sets' size), ``set_sizes`` the size of every set in
    ``set_values`` by name, ``focus`` the focus set's name ("random" for the random sets; a name
    missing from ``set_sizes``, such as an empty selection, has no value). The focus's change
    "vs random" is against random sets of the focus set's own size (alignment depends on the set
    size): ``focus_baseline``, :func:`baseline_table`'s for that size (None: ``baseline``, the
    focus being of ``size``); the change names that size where it is not ``size``
    ("+0.0123 vs random of 30"). CKNNA of sets under ``MIN_CKNNA_SET_SIZE`` stimuli is not shown
    (:func:`value_text`) and such sets are listed in ``too_small`` ("random" included when
    ``size`` is that small). A mean over pairs of which one is undefined (NaN) is "n/a", not
    the mean of the others.
    """

    def mean_of(name: str) -> float:
        return float(set_values.loc[set_values["set"] == name, "value"].mean(skipna=False))

    random_mean = float(baseline["random_mean"].mean(skipna=False))
    if focus == "random":
        focus_value, focus_size = random_mean, size
    elif focus in set_sizes:
        focus_value, focus_size = mean_of(focus), set_sizes[focus]
    else:
        focus_value, focus_size = float("nan"), size
    focus_text = value_text(focus_value, focus_size, metric) if (
        focus == "random" or focus in set_sizes
    ) else "—"  # no such set (an empty selection): nothing to show, the page says why
    compared, compared_size = (random_mean, size) if focus_baseline is None else (
        float(focus_baseline["random_mean"].mean(skipna=False)), focus_size
    )
    hidden = metric == "cknna" and compared_size < MIN_CKNNA_SET_SIZE
    delta = (
        None
        if not np.isfinite(focus_value) or focus_text == "—" or focus == "random" or hidden
        or not np.isfinite(compared)
        else f"{focus_value - compared:+.4f} vs random"
        + (f" of {focus_size:,}" if compared_size != size else "")  # not the Random card's size
    )
    too_small: tuple[str, ...] = ()
    if metric == "cknna":
        sizes = {**set_sizes, "random": size}
        too_small = tuple(name for name, s in sizes.items() if s < MIN_CKNNA_SET_SIZE)
    return Headline(
        focus_text,
        delta,
        value_text(mean_of("low"), size, metric),
        value_text(random_mean, size, metric),
        value_text(mean_of("high"), size, metric),
        too_small,
    )


def bound_note(set_values: pd.DataFrame, baselines: Mapping[int, pd.DataFrame]) -> str | None:
    """``alignment.cknna_bound_note`` over every CKNNA the lab shows: each set × pair (from
    :func:`set_table`) and the random baselines' means and 95 % bounds (:func:`baseline_table`,
    by set size). None when the tables hold no CKNNA or none is out of bounds."""
    rows = [
        (f"the {r.set} set, {r.vision_model} × {r.language_model}", r.value, r.set_size, r.k)
        for r in set_values.itertuples(index=False)
        if r.metric == "cknna"
    ]
    for size, table in baselines.items():
        for r in table.itertuples(index=False):
            if r.metric != "cknna":
                continue
            for part in ("mean", "lower_95", "upper_95"):
                what = f"random sets ({part.replace('_', ' ')}), {r.vision_model} × "
                rows.append((f"{what}{r.language_model}", getattr(r, f"random_{part}"), size, r.k))
    return cknna_bound_note(rows)


def baseline_statement(baseline: pd.DataFrame) -> str:
    """One sentence saying how the random baseline of :func:`baseline_table` was drawn."""
    sets = int(baseline["n_random"].iloc[0])
    size = int(baseline["set_size"].iloc[0])
    label = metric_label(str(baseline["metric"].iloc[0]))
    widest = float(baseline["random_mean_interval"].max(skipna=False))
    asked = float(baseline["interval_width"].iloc[0])
    precision = (
        f"the widest 95% confidence interval of a pair's mean random {label} is {widest:.4g} "
        "wide"
        if np.isfinite(widest)
        else f"{label} is undefined on some random sets, so some pairs' random mean and interval "
        "are n/a"
        if baseline["random_mean"].isna().any()
        else "too few sets for a confidence interval of the mean"
    )
    defined = baseline["random_mean_interval"].dropna()
    if np.isnan(asked):
        how = f"{sets} random sets of {size} stimuli per pair (a fixed number)"
    elif np.isfinite(widest) and widest <= asked:
        how = (
            f"{sets} random sets of {size} stimuli per pair, drawn until every pair's 95% "
            f"confidence interval of the mean was at most {asked:g} wide"
        )
    elif baseline["random_mean"].isna().any() and (defined <= asked).all():
        # undefined pairs stop no drawing (random_baseline): the others' precision did
        undefined = baseline[baseline["random_mean"].isna()]
        counts = undefined["n_undefined"] if "n_undefined" in undefined else None
        how = (
            f"{sets} random sets of {size} stimuli per pair, drawn until every pair with a "
            f"defined {label} had a 95% confidence interval of the mean at most {asked:g} wide"
            if len(defined) else
            f"{sets} random sets of {size} stimuli per pair, drawn until {label} was undefined "
            "for every pair"
        ) + (
            f" ({label} undefined on {int(counts.min())}"
            + (f"–{int(counts.max())}" if counts.max() > counts.min() else "")
            + f" of them for {len(undefined)} "
            + ("pair" if len(undefined) == 1 else "pairs") + ")"
            if counts is not None else ""
        )
    else:
        how = (
            f"{sets} random sets of {size} stimuli per pair (the most allowed; the requested "
            f"precision {asked:g} was not reached)"
        )
    bars = (
        "95% of the random sets' values"
        if sets >= PERCENTILE_INTERVAL_MIN_VALUES
        else f"the 2.5th to 97.5th percentiles of the {sets} random sets' values, with so few "
        "sets about their range"
    )
    return f"Random baseline: {how}; {precision}. Error bars: {bars}."


def _pairs_text(rows: pd.DataFrame) -> str:
    return ", ".join(f"{r.vision_model} × {r.language_model}" for r in rows.itertuples())


def undefined_note(
    set_values: pd.DataFrame, baselines: Mapping[int, pd.DataFrame] | None = None
) -> str | None:
    """Where the lab's metric is undefined (NaN, shown "n/a") on a set or on some random sets,
    the sentence that names those sets and pairs, why, and what to change; None where every value
    is defined.

    ``set_values``: :func:`set_table` (or :func:`calibration_table`: its matched sets and
    shuffled pairings too); ``baselines``: ``{set size: baseline_table}``. SVCCA is
    undefined where the set's standardised features of a model have fewer independent directions
    than ``cca_dim`` (repeated stimuli, features that do not vary); another feature metric where a
    model's features do not vary over the set (its kernel is not defined)."""
    tables = [set_values, *(baselines or {}).values()]
    where = [
        f"the {name} set ({_pairs_text(group)})"
        for name, group in set_values[set_values["value"].isna()].groupby("set", sort=False)
    ]
    defined = set_values[set_values["value"].notna()]
    for column, what in (("matched_mean", "matched sets"), ("null_mean", "shuffled pairings")):
        if column in defined:
            where += [
                f"some {what} of the {name} set ({_pairs_text(group)})"
                for name, group in defined[defined[column].isna()].groupby("set", sort=False)
            ]
    for size, table in (baselines or {}).items():
        undefined = table[table["random_mean"].isna()]
        if not undefined.empty:
            where.append(f"some random sets of {size} ({_pairs_text(undefined)})")
    if not where:
        return None
    metric = str(next(t["metric"].iloc[0] for t in tables if not t.empty))
    if metric == "svcca":
        dim = next((str(t["options"].iloc[0]) for t in tables if not t.empty), "cca_dim")
        why = (
            f"there a model's standardised features have fewer independent directions than the "
            f"CCA dimension ({dim}): repeated stimuli, or features that do not vary over them. "
            "Choose a smaller CCA dimension, or sets of distinct stimuli"
        )
    elif registry.metric(metric).neighbour_metric:
        why = "its value is not a number there"
    else:
        why = (
            "there a model's features do not vary over the stimuli (repeated stimuli, or a "
            "constant layer), so its kernel is not defined. Choose sets of distinct stimuli, or "
            "another layer under Layers"
        )
    places = where[0] if len(where) == 1 else f"{'; '.join(where[:-1])}; and {where[-1]}"
    return f"{metric_label(metric)} is undefined (n/a) on {places}: {why}."


def shown_table(frame: pd.DataFrame, digits: int | None = None) -> Any:
    """A table for ``st.dataframe``, floats rounded to ``digits`` decimals (None: as they are):
    where a float is undefined (NaN) a Styler that shows it as "n/a" (the data itself, and its
    CSV, keep NaN), else the frame itself (the data grid's own formatting, as before)."""
    rounded = frame if digits is None else frame.round(digits)
    undefined = frame.select_dtypes("floating").isna().to_numpy().any()
    if not undefined or frame.size > pd.get_option("styler.render.max_elements"):
        return rounded
    return rounded.style.format(na_rep="n/a", precision=6 if digits is None else digits)


_KEYS = [*PAIR_COLUMNS, "metric", "options", "k"]
_RANDOM_COLUMNS = ["n_random", "random_mean", "random_lower_95", "random_upper_95"]


def results_table(
    set_values: pd.DataFrame,
    baselines: Mapping[int, pd.DataFrame],
    permutation: pd.DataFrame,
    score: str,
    seed: int,
) -> pd.DataFrame:
    """Every number of the lab in one long table: one row per pair × set × metric.

    ``set_values`` (:func:`set_table`), ``baselines`` ``{set size: baseline_table}`` (each set is
    compared with random sets of its own size), ``permutation``
    (:func:`low_high_permutation_table`). Adds ``vs_random_95`` (``above`` / ``below`` /
    ``within`` the random sets' 95% interval; ``n/a`` where the value or the interval is
    undefined), ``score`` and ``seed``.
    """
    table = pd.concat(
        [
            set_values[set_values["set_size"] == set_size].merge(
                baselines[set_size][[*_KEYS, *_RANDOM_COLUMNS]], on=_KEYS, how="left"
            )
            for set_size in baselines
        ]
    )
    table = table.merge(
        permutation.drop(columns=["options"], errors="ignore"),
        on=[*PAIR_COLUMNS, "metric", "k"],
        how="left",
    )
    undefined = table[["value", "random_lower_95", "random_upper_95"]].isna().any(axis=1)
    table["vs_random_95"] = np.select(
        [undefined, table["value"] > table["random_upper_95"],
         table["value"] < table["random_lower_95"]],
        ["n/a", "above", "below"],
        default="within",
    )
    table["score"] = score
    table["seed"] = int(seed)
    return table.sort_values(
        ["metric", "vision_model", "language_model", "set"], kind="stable"
    ).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# calibrated scores and matched random baselines (issue 14, item 6)
class MatchingCovariates(NamedTuple):
    """What matched random sets are matched on: ``typicality`` (n,) (mean over the GPA models
    of each model's z-scored local density), ``labels`` (n,) or None, ``matched_on`` (words) and
    ``note`` (why labels were left out, or "")."""

    typicality: np.ndarray
    labels: np.ndarray | None
    matched_on: str
    note: str


def matching_covariates(run: Any, labels: object = None, *, k: int = 10) -> MatchingCovariates:
    """Typicality of every stimulus in ``run``'s GPA models at ``k`` (``vision_typicality``, as
    the report's matched baselines at ``analyses.typicality_k``) and the data set's labels when
    they can be matched on (``calibration.matchable_labels``: the median label holds at least
    ``calibration.MIN_STIMULI_PER_LABEL`` stimuli)."""
    typical = vision_typicality(run, k=k)
    labels, why_not = calibration.matchable_labels(labels)
    note = f"labels not matched on: {why_not}" if why_not else ""
    matched_on = f"typicality in the GPA models (local density, k={k})" + (
        " and category (label)" if labels is not None else ""
    )
    return MatchingCovariates(typical, labels, matched_on, note)


def _matched_sets(
    chosen: np.ndarray,
    covariates: MatchingCovariates,
    n_sets: int,
    seed: int,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """Matched random sets of ``chosen`` (s,) drawn from every stimulus by the report's engine,
    ``calibration.matched_sets_by_cost`` (a set kept out of its own baseline meets one without
    its chance luck): nearest-covariate matching within label while s · ``n_sets`` picks fit
    ``calibration.NEAREST_MATCHING_PICKS``, else typicality strata × label (25 bins, else 5),
    so that for the same seed (``analyses.matched_set_seed``) the lab draws the sets the
    report's ``analyses.matched_baselines`` draws. ``avoid`` (n_sets, t): the low set's matched
    sets, which the high set's avoid draw by draw (``calibration.matched_set_pairs``), dropped
    only where a label cannot spare them. Returns the sets (n_sets, s) int64, rows sorted, and
    the method in words.
    """
    drawn = calibration.matched_sets_by_cost(
        chosen, covariates.typicality, covariates.labels, n_sets=n_sets, seed=seed, avoid=avoid,
        covariate_name="typicality", avoided="the low set's",
    )
    return drawn.sets, drawn.method


def calibration_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    sets: Mapping[str, np.ndarray],
    k: int | None,
    covariates: MatchingCovariates,
    *,
    metric: str = "cknna",
    options: Mapping[str, Any] | None = None,
    n_shuffles: int = 200,
    n_matched: int = 200,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict[tuple[Pair, str], calibration.BaselineComparison]]:
    """Each raw score beside its calibrated score and its matched random baseline.

    Per pair × named set: the shuffled-pairing null within the set
    (``calibration.shuffled_pairing_rows``: the set's language rows shuffled ``n_shuffles``
    times, every pair scored on them in one call; ``calibration.calibrated_score``) and
    ``n_matched`` random sets matched to the set on ``covariates`` (:func:`_matched_sets`:
    ``calibration.matched_sets_by_cost``, the report's engine and seeds;
    ``calibration.compare_with_baseline``).

    Returns ``(table, comparisons)``: the table has one row per pair × set: the pair's columns,
    ``set``, ``set_size``, ``metric``, ``options``, ``k``, ``value`` (raw), ``null_mean``,
    ``null_lower_95``, ``null_upper_95``, ``calibrated`` (raw − null mean), ``null_z``,
    ``null_p_value`` (P(null ≥ raw)), ``matched_mean``, ``matched_lower_95``,
    ``matched_upper_95``, ``matched_p_value_greater``, ``matched_p_value_less``,
    ``set_typicality`` and ``matched_typicality`` (mean typicality of the set and of its matched
    sets: the balance the matching reached), ``n_shuffles``, ``n_matched``,
    ``distinct_matched`` (distinct sets among the matched sets, ``calibration.baseline_freedom``),
    ``matched_on``, ``matching`` (the method in words: ``calibration.MatchedSets.method``);
    ``comparisons`` the matched baselines by (pair, set) for
    :func:`low_high_matched_table`. ``progress(done, total)``: stimulus sets and pairings scored
    (each set, its matched sets and its shuffled pairings; a feature metric measured set by set
    reports each, the batched routes each batch). A feature metric undefined on a set, matched
    set or pairing gives NaN there and in what it enters (:func:`undefined_note`).
    """
    options = metric_options(metric, options)
    keyed = [pair.sides for pair in pairs]
    n = covariates.typicality.shape[0]
    rows, comparisons = [], {}
    total = len(sets) * (2 + int(n_matched) + int(n_shuffles))
    scored = [0]

    def scores(rows_x: np.ndarray, **paired: Any) -> np.ndarray:
        """(P, B) every pair's score on B sets (or pairings) at once, telling ``progress``."""
        start, told = scored[0], [0]

        def tell(done: int, count: int) -> None:
            told[0] = done
            if progress is not None:
                progress(start + done, total)

        values = metric_values(indexes, keyed, rows_x, [metric], k=k or 1,
                               options={metric: options}, on_error="nan", progress=tell,
                               **paired)[metric]
        scored[0] = start + rows_x.shape[0]
        if told[0] != rows_x.shape[0]:  # a batched route: all of them at once
            tell(rows_x.shape[0], rows_x.shape[0])
        return values

    drawn: dict[str, np.ndarray] = {}
    for name in sorted(sets, key=lambda name: name != "low"):  # low first (high avoids it)
        rows_of_set = sets[name]
        chosen = np.sort(np.asarray(rows_of_set, dtype=np.int64))
        # the high set's matched sets avoid the low set's, draw by draw, as the report's do: the
        # low - high gap is then tested against disjoint pairs, as low and high are
        low = drawn.get("low") if name == "high" and "low" in sets else None
        if low is not None and np.intersect1d(chosen, sets["low"]).size:
            low = None  # sets that overlap (a set size above half the run): no pairs
        matched, method = _matched_sets(
            chosen, covariates, int(n_matched), matched_set_seed(int(seed), name), avoid=low
        )
        drawn[name] = matched
        # every pair's score on the set and its matched sets in one batched pass
        on_sets = scores(np.concatenate([chosen[None], matched]))
        # every pair's score on the set's shuffled pairings (the same shuffles for each) at once
        rows_x, rows_y = calibration.shuffled_pairing_rows(
            chosen, n=n, n_shuffles=int(n_shuffles), seed=int(seed)
        )
        on_pairings = scores(rows_x, paired_with=rows_y)
        freedom = calibration.baseline_freedom(matched)  # one set's matched sets: once
        for p, pair in enumerate(pairs):
            null = calibration.calibrated_score(on_pairings[p])
            # the batched score is already computed: [chosen, *matched] in the order it asks
            baseline = calibration.compare_with_baseline(
                lambda stacked, values=on_sets[p]: values, chosen, matched, batched=True,
                freedom=freedom,
            )
            comparisons[(pair, name)] = baseline
            rows.append(
                {
                    **pair._asdict(),
                    "set": name,
                    "set_size": int(chosen.size),
                    **_metric_columns(metric, k, options),
                    "value": null.observed,
                    "null_mean": null.null_mean,
                    "null_lower_95": null.null_lower,
                    "null_upper_95": null.null_upper,
                    "calibrated": null.calibrated,
                    "null_z": null.z,
                    "null_p_value": null.p_value,
                    "matched_mean": baseline.baseline_mean,
                    "matched_lower_95": baseline.lower,
                    "matched_upper_95": baseline.upper,
                    "matched_p_value_greater": baseline.p_value_greater,
                    "matched_p_value_less": baseline.p_value_less,
                    "set_typicality": float(covariates.typicality[chosen].mean()),
                    "matched_typicality": float(covariates.typicality[matched].mean()),
                    "n_shuffles": null.n_shuffles,
                    "n_matched": baseline.n_sets,
                    "distinct_matched": baseline.freedom.n_distinct,
                    "matched_on": covariates.matched_on,
                    "matching": method,
                }
            )
    return _with_int_k(pd.DataFrame(rows)), comparisons


def low_high_matched_table(
    pairs: Sequence[Pair],
    comparisons: Mapping[tuple[Pair, str], calibration.BaselineComparison],
    *,
    level: float = 0.05,
) -> pd.DataFrame:
    """Does low > high survive the matched baseline? Per pair: metric(low) − metric(high) against
    the same difference between the low and high sets' matched random sets
    (``calibration.compare_difference_with_baselines``).

    Returns one row per pair: the pair's columns, ``low_minus_high``, ``matched_difference_mean``,
    ``matched_difference_lower_95``, ``matched_difference_upper_95``, ``p_value`` (P(matched
    difference ≥ observed)), ``distinct_matched`` (the fewer distinct matched sets of the two
    sets'), ``verdict_possible`` (at least ``calibration.distinct_sets_needed(level)`` for each:
    matched sets that are the same few sets drawn again and again, as on a run with few stimuli
    in all, leave a gap above theirs "surviving" by construction) and ``survives`` (a
    verdict is possible, low > high and p < ``level``); :func:`matched_verdict` says which.
    """
    needed = calibration.distinct_sets_needed(level)
    rows = []
    for pair in pairs:
        if (pair, "low") not in comparisons or (pair, "high") not in comparisons:
            continue
        result = calibration.compare_difference_with_baselines(
            comparisons[(pair, "low")], comparisons[(pair, "high")]
        )
        distinct = min(
            (f.n_distinct if f is not None else result.n_sets) for f in result.freedom
        )
        possible = distinct >= needed
        rows.append(
            {
                **pair._asdict(),
                "low_minus_high": result.observed,
                "matched_difference_mean": result.baseline_mean,
                "matched_difference_lower_95": result.lower,
                "matched_difference_upper_95": result.upper,
                "p_value": result.p_value_greater,
                "distinct_matched": int(distinct),
                "verdict_possible": bool(possible),
                "survives": bool(
                    possible and result.observed > 0 and result.p_value_greater < level
                ),
            }
        )
    return pd.DataFrame(rows)


def matched_verdict(table: pd.DataFrame, metric: str, matched_on: str) -> str:
    """One line: in how many pairs low > high survives the matched baseline; no verdict where
    the matched sets are too few distinct sets (``verdict_possible``,
    :func:`low_high_matched_table`), with the cause and the fix."""
    if table.empty:
        return "No low and high sets to compare."
    if "verdict_possible" in table and not table["verdict_possible"].all():
        needed = calibration.distinct_sets_needed()
        distinct = int(table["distinct_matched"].min())
        return (
            f"No verdict on low > high against the matched baseline ({matched_on}): the matched "
            f"sets of the low or high set are {distinct} distinct "
            f"{'set' if distinct == 1 else 'sets'}, fewer than the {needed} a one-sided "
            f"p < 0.05 needs (with D distinct sets no p-value is below 1/(D + 1)), so any "
            "difference above theirs would survive. The run's stimuli are too few to match "
            "the sets freely (or too few matched sets were drawn): choose smaller sets or a "
            "run with more stimuli."
        )
    label = metric_label(metric)
    survived = int(table["survives"].sum())
    greater = int((table["low_minus_high"] > 0).sum())
    total = len(table)
    if survived == total:
        word = "survives"
    else:
        word = "partly survives" if survived else "does not survive"
    undefined = int(table["p_value"].isna().sum())
    example = (
        "SVCCA on repeated stimuli, the note above says why" if metric == "svcca"
        else "the CKNNA of a small set"
    )
    where = (
        f" ({undefined} undefined: a value on some set is not a number, e.g. {example})"
        if undefined else ""
    )
    return (
        f"Low > high {word} the matched baseline ({matched_on}): {label}(low) − {label}(high) is "
        f"positive in {greater} of {total} pairs and larger than 95% of the matched sets' "
        f"differences (one-sided p < 0.05) in {survived} of {total}{where}."
    )


def best_layer_sample_note(best_layers: pd.DataFrame, n_stimuli: int) -> str | None:
    """Where the best language layers were chosen on a seeded sample of the stimuli (runs above
    ``analyses.LAYER_SWEEP_MAX_STIMULI``), the sentence that says so; None when on every stimulus.

    ``best_layers``: ``analyses.best_language_layers``' table (``n_stimuli_used``,
    ``sample_seed``).
    """
    if best_layers is None or best_layers.empty or "n_stimuli_used" not in best_layers:
        return None
    used = int(best_layers["n_stimuli_used"].max())
    if used >= n_stimuli:
        return None
    seeds = sorted({int(s) for s in best_layers["sample_seed"].dropna()})
    seed = f" (seed {', '.join(map(str, seeds))})" if seeds else ""
    return (
        f"Best language layers chosen on a seeded random sample of {used:,} of the "
        f"{n_stimuli:,} stimuli{seed}: the layer sweep samples runs above {used:,} stimuli. "
        "Every alignment number is then measured on the stimuli you choose."
    )
