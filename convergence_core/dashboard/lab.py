"""The Alignment lab's live numbers: CKNNA and mutual k-NN of many stimulus subsets at once.

The page recomputes, on every change of k or of the subset, CKNNA for every vision × language pair
on the chosen sets, on ``n_random`` random sets (the baseline distribution) and on the
``2 · n_permutations`` relabelled sets of the low-vs-high permutation test. All of it goes through
``neighbours.subset_alignment`` (every subset and pair in one batched pass). The random sets are
the draws of ``analyses.random_sets`` (``random_baseline.sequential_random_alignment``: with an
interval width it stops drawing once the baseline mean is that precise) and the label shuffles are
``analyses.low_high_permutation_tests``, the functions the paper's Fig. 2 analysis calls: for the
same seed and number of sets the lab and the report agree.

Shapes: ``n`` stimuli in the run, subsets of ``s`` stimuli; ``indexes`` maps (model, layer) to the
run's neighbour index (``run.neighbours``: prepared features + exact neighbour lists).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..alignment import cknna_bound_note
from ..analyses import LayerKey, Pair, low_high_permutation_tests
from ..neighbours import NeighbourIndex, subset_alignment
from .. import random_baseline
from ..random_baseline import DEFAULT_MIN_SETS
from ..validation import MIN_CKNNA_SET_SIZE, check_k, check_min_stimuli

#: Key of the Alignment lab's container of the bars (CSS class ``st-key-lab-bars``): where the
#: browser test and benchmark look for the new bars after a change of k
BARS_CONTAINER_KEY = "lab-bars"

__all__ = [
    "MIN_CKNNA_SET_SIZE",
    "Pair",
    "baseline_statement",
    "baseline_table",
    "bound_note",
    "cknna_text",
    "check_subset_for_k",
    "low_high_permutation_table",
    "results_table",
    "set_table",
]


def check_subset_for_k(size: int, k: int, what: str) -> None:
    """ValueError in words when ``k`` neighbours cannot be taken inside a subset of ``size``
    (CKNNA's unbiased HSIC needs at least 4 stimuli; k as ``validation.check_k`` words it)."""
    check_min_stimuli(size, 4, f"CKNNA on {what}")
    check_k(k, size, 1, what=what)


def baseline_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    scores: np.ndarray,
    size: int,
    k: int,
    *,
    n_random: int = 200,
    seed: int = 0,
    interval_width: float | None = None,
    min_sets: int = DEFAULT_MIN_SETS,
) -> pd.DataFrame:
    """Random-subset baseline per pair (``random_baseline.baseline_table``; ``scores`` (n,) only
    sets n): CKNNA and mutual k-NN mean and 95% percentile interval of the random sets.

    ``interval_width=None`` draws exactly ``n_random`` sets (the paper analysis's baseline); a
    width draws at most ``n_random`` and stops once every pair's 95% confidence interval of the
    mean CKNNA is that narrow. Columns: see ``random_baseline.baseline_table``.
    """
    return random_baseline.baseline_table(
        indexes,
        pairs,
        int(np.asarray(scores).shape[0]),
        size,
        k,
        max_sets=n_random,
        seed=seed,
        interval_width=interval_width,
        min_sets=min_sets,
    )


def low_high_permutation_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    low: np.ndarray,
    high: np.ndarray,
    k: int,
    *,
    n_permutations: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Permutation test of CKNNA(low) - CKNNA(high) per pair, all pairs on the same shuffles.

    Returns one row per pair: the pair's columns, ``low_minus_high``,
    ``permutation_p_value_two_sided``, ``permutation_p_value_low_greater``, ``n_permutations``.
    """
    tests = low_high_permutation_tests(
        indexes, pairs, low, high, k, n_permutations=n_permutations, seed=seed
    )
    rows = [
        {
            **pair._asdict(),
            "low_minus_high": test.observed,
            "permutation_p_value_two_sided": test.p_value_two_sided,
            "permutation_p_value_low_greater": test.p_value_first_greater,
            "n_permutations": int(n_permutations),
        }
        for pair, test in zip(pairs, tests, strict=True)
    ]
    return pd.DataFrame(rows)


def set_table(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    sets: Mapping[str, np.ndarray],
    k: int,
) -> pd.DataFrame:
    """CKNNA and mutual k-NN of every pair on each named set (sets may differ in size).

    Returns one row per pair × set: the pair's columns, ``set``, ``set_size``, ``k``, ``cknna``,
    ``mutual_knn``.
    """
    rows = []
    for name, rows_of_set in sets.items():
        subset = np.asarray(rows_of_set, dtype=np.intp)
        check_subset_for_k(subset.shape[0], k, f"the {name} set")
        result = subset_alignment(indexes, [pair.sides for pair in pairs], subset[None, :], k)
        cknna, mutual_knn = result.cknna, result.mutual_knn
        for pair, cknna_values, mknn_values in zip(pairs, cknna, mutual_knn, strict=True):
            rows.append(
                {
                    **pair._asdict(),
                    "set": name,
                    "set_size": int(subset.shape[0]),
                    "k": int(k),
                    "cknna": float(cknna_values[0]),
                    "mutual_knn": float(mknn_values[0]),
                }
            )
    return pd.DataFrame(rows)


def cknna_text(value: float, set_size: int) -> str:
    """A CKNNA for display: ``"0.1234"``, or ``"—"`` for a set of fewer than
    ``validation.MIN_CKNNA_SET_SIZE`` stimuli (too few for a CKNNA worth reading) or NaN."""
    if set_size < MIN_CKNNA_SET_SIZE or not np.isfinite(value):
        return "—"
    return f"{value:.4f}"


def bound_note(set_values: pd.DataFrame, baselines: Mapping[int, pd.DataFrame]) -> str | None:
    """``alignment.cknna_bound_note`` over every CKNNA the lab shows: each set × pair (from
    :func:`set_table`) and the random baselines' means and 95 % bounds (:func:`baseline_table`,
    by set size)."""
    rows = [
        (f"the {r.set} set, {r.vision_model} × {r.language_model}", r.cknna, r.set_size, r.k)
        for r in set_values.itertuples(index=False)
    ]
    for size, table in baselines.items():
        for r in table.itertuples(index=False):
            for part in ("mean", "lower_95", "upper_95"):
                what = f"random sets ({part.replace('_', ' ')}), {r.vision_model} × "
                rows.append(
                    (f"{what}{r.language_model}", getattr(r, f"cknna_random_{part}"), size, r.k)
                )
    return cknna_bound_note(rows)
_PAIR_COLUMNS = ["vision_model", "vision_layer", "language_model", "language_layer"]
_RANDOM_COLUMNS = [
    f"{metric}_random_{part}"
    for metric in ("cknna", "mutual_knn")
    for part in ("mean", "lower_95", "upper_95")
]


def baseline_statement(baseline: pd.DataFrame) -> str:
    """One sentence saying how the random baseline of :func:`baseline_table` was drawn."""
    sets = int(baseline["n_random"].iloc[0])
    size = int(baseline["set_size"].iloc[0])
    widest = float(baseline["cknna_random_mean_interval"].max())
    asked = float(baseline["interval_width"].iloc[0])
    precision = (
        f"the widest 95% confidence interval of a pair's mean random CKNNA is {widest:.4f}"
        if np.isfinite(widest)
        else "too few sets for a confidence interval of the mean"
    )
    if np.isnan(asked):
        how = f"{sets} random sets of {size} stimuli per pair (a fixed number)"
    elif np.isfinite(widest) and widest <= asked:
        how = (
            f"{sets} random sets of {size} stimuli per pair, drawn until every pair's 95% "
            f"confidence interval of the mean was narrower than {asked:g}"
        )
    else:
        how = (
            f"{sets} random sets of {size} stimuli per pair (the most allowed; the requested "
            f"precision {asked:g} was not reached)"
        )
    return f"Random baseline: {how}; {precision}. Error bars: 95% of the random sets' values."


def results_table(
    set_values: pd.DataFrame,
    baselines: Mapping[int, pd.DataFrame],
    permutation: pd.DataFrame,
    score: str,
    seed: int,
) -> pd.DataFrame:
    """Every number of the lab in one table: one row per pair × set.

    ``set_values`` (:func:`set_table`), ``baselines`` ``{set size: baseline_table}`` (each set is
    compared with random sets of its own size), ``permutation``
    (:func:`low_high_permutation_table`). Adds ``cknna_vs_random_95`` (``above`` / ``below`` /
    ``within`` the random sets' 95% interval), ``score`` and ``seed``.
    """
    table = pd.concat(
        [
            set_values[set_values["set_size"] == set_size].merge(
                baselines[set_size][[*_PAIR_COLUMNS, *_RANDOM_COLUMNS, "n_random"]],
                on=_PAIR_COLUMNS,
                how="left",
            )
            for set_size in baselines
        ]
    )
    table = table.merge(permutation, on=_PAIR_COLUMNS, how="left")
    table["cknna_vs_random_95"] = np.select(
        [
            table["cknna"] > table["cknna_random_upper_95"],
            table["cknna"] < table["cknna_random_lower_95"],
        ],
        ["above", "below"],
        default="within",
    )
    table["score"] = score
    table["seed"] = int(seed)
    return table.sort_values(["vision_model", "language_model", "set"], kind="stable").reset_index(
        drop=True
    )
