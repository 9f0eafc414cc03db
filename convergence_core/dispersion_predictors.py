"""Which stimulus properties predict dispersion? Rank tests, group comparisons, fitted models.

Inputs: a :class:`~convergence_core.properties.PropertyTable` (n stimuli × properties) and the
run's dispersion table (``mean``, ``pc1``, run order). Every result is a long-format DataFrame.

* **Numeric properties** (:func:`property_tests`): Spearman ρ between the property and each
  dispersion score over the stimuli where the property is present, with a two-sided permutation
  p-value (the dispersion ranks shuffled ``n_permutations`` times over those stimuli,
  ``p = (1 + #{|ρ_null| ≥ |ρ|}) / (n_permutations + 1)``) and the asymptotic t-approximation p
  for comparison.
* **Categorical properties**: Kruskal–Wallis H across the levels (levels with fewer than
  ``min_group_size`` stimuli are left out), permutation p the same way (``H_null ≥ H``), the
  χ² p, and the effect size ε² = H / (N − 1) (0 = no separation, 1 = the levels separate the
  ranks completely); per-level medians in :func:`group_summary`.
* q-values: Benjamini–Hochberg over every tested property of one score (numeric and categorical
  together). ``strength`` = |ρ| or √ε², both on a correlation scale; ``rank`` 1 = the smallest
  p-value (ties: the larger strength).
* **Models** (:func:`cross_validated_fit`): ridge (median imputation + standardisation, one-hot
  categories, α by efficient leave-one-out on the training folds) and histogram gradient-boosted
  trees (NaN and categories handled natively; early stopping on 20 % of each training fold),
  both fitted on every usable property at once with K-fold cross-validation (shuffled, seeded).
  Reported: the held-out R² of the pooled out-of-fold predictions, per-fold R², the same with
  the dispersion scores shuffled ``n_shuffles`` times (the chance baseline: ≈ 0, or slightly
  below), and permutation importances measured on the held-out folds (the drop in held-out R²
  when one property's values are shuffled). Fits run on one thread (``threadpoolctl``).

Correlation is not cause: a property that predicts dispersion may stand for another that does.
Everything is seeded: the same inputs and seed give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from .dispersion import SCORES
from .properties import PropertyTable
from .stats import TIE_TOLERANCE, permutation_p_value, spearman_permutation_tests
from .validation import check_count

__all__ = [
    "DEFAULT_N_SHUFFLES",
    "MODELS",
    "PROPERTY_TEST_PERMUTATIONS",
    "PredictorAnalysis",
    "UsableProperties",
    "analyse_properties",
    "analyse_run",
    "benjamini_hochberg",
    "cross_validated_fit",
    "fit_problem",
    "group_summary",
    "property_tests",
    "usable_properties",
]

#: Label shuffles per rank test: with ~30 properties, BH needs p ≈ 1e-4 for q < 0.01.
PROPERTY_TEST_PERMUTATIONS = 10_000
#: Shuffled-target refits of each cross-validated model.
DEFAULT_N_SHUFFLES = 20
MIN_STIMULI = 10
MIN_GROUP_SIZE = 5
MAX_LEVELS = 50
#: model name -> description (for tables and pages)
MODELS = {
    "ridge": "ridge regression (standardised properties, one-hot categories, α by LOO)",
    "boosted_trees": "histogram gradient-boosted trees (seeded)",
}
_BLOCK_ELEMENTS = 1 << 22  # permutation block: at most ~32 MB of float64


@dataclass(frozen=True)
class UsableProperties:
    """Which properties enter the analysis.

    ``numeric``: names; ``categorical``: ``{name: levels kept}`` (each with ≥ min_group_size
    stimuli); ``skipped``: DataFrame ``property``, ``reason`` for the rest.
    """

    numeric: tuple[str, ...]
    categorical: dict[str, tuple[str, ...]]
    skipped: pd.DataFrame

    @property
    def names(self) -> list[str]:
        return [*self.numeric, *self.categorical]


@dataclass(frozen=True)
class PredictorAnalysis:
    """Everything :func:`analyse_properties` finds.

    ``tests``: one row per property × score (:func:`property_tests`); ``groups``: per level of
    each categorical property × score (:func:`group_summary`); ``fit``: per score × model ×
    metric (:func:`cross_validated_fit`); ``importances``: per score × model × property;
    ``predictions``: per score × model × stimulus (out-of-fold); ``skipped``: property, reason;
    ``parameters``: the settings used.
    """

    tests: pd.DataFrame
    groups: pd.DataFrame
    fit: pd.DataFrame
    importances: pd.DataFrame
    predictions: pd.DataFrame
    skipped: pd.DataFrame
    parameters: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _scores(dispersion: pd.DataFrame, table: PropertyTable, scores: Sequence[str]) -> None:
    if len(dispersion) != len(table.values):
        raise ValueError(
            f"the dispersion table has {len(dispersion)} rows but the property table "
            f"{len(table.values)}; pass both of the same run"
        )
    if "id" in dispersion and not np.array_equal(
        dispersion["id"].astype(str).to_numpy(), table.values["id"].astype(str).to_numpy()
    ):
        raise ValueError(
            "the dispersion and property tables list different stimuli (ids or order differ); "
            "recompute the properties of this run (rerun precompute)"
        )
    for score in scores:
        if score not in dispersion:
            raise ValueError(f"unknown dispersion score {score!r}; use one of {list(SCORES)}")
        values = dispersion[score].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"dispersion score {score!r} has NaN/inf; rerun precompute")


def fit_problem(
    table: PropertyTable, n_splits: int = 5, usable: UsableProperties | None = None
) -> str | None:
    """Why :func:`cross_validated_fit` cannot run on this table (no usable property, or too few
    stimuli for ``n_splits`` folds), or None when it can."""
    usable = usable or usable_properties(table)
    if not usable.names:
        return (
            "no usable property (each is constant, mostly missing or has too few levels); "
            "nothing to fit"
        )
    n = len(table.values)
    if n < 2 * n_splits:
        return f"{n} stimuli are too few for {n_splits}-fold cross-validation"
    return None


def usable_properties(
    table: PropertyTable,
    *,
    min_stimuli: int = MIN_STIMULI,
    min_group_size: int = MIN_GROUP_SIZE,
    max_levels: int = MAX_LEVELS,
) -> UsableProperties:
    """Sort the properties into testable numeric / categorical ones and skipped ones (with why).

    Numeric: needs ``min_stimuli`` present values and more than one distinct value. Categorical:
    levels with fewer than ``min_group_size`` stimuli are dropped; it needs ≥ 2 remaining levels,
    at most ``max_levels`` of them, and ``min_stimuli`` stimuli in them.
    """
    numeric: list[str] = []
    categorical: dict[str, tuple[str, ...]] = {}
    skipped: list[dict[str, str]] = []
    for info in table.info:
        column = table.values[info.name]
        if info.kind == "numeric":
            values = column.to_numpy(dtype=np.float64)
            present = values[np.isfinite(values)]
            if present.size < min_stimuli:
                skipped.append(
                    {"property": info.name, "reason": f"{present.size} stimuli have a value"}
                )
            elif np.ptp(present) == 0:
                skipped.append(
                    {"property": info.name, "reason": "the same value for every stimulus"}
                )
            else:
                numeric.append(info.name)
            continue
        counts = column.dropna().astype(str).value_counts()
        kept = counts[counts >= min_group_size]
        if len(kept) < 2:
            reason = (
                f"{len(counts)} level(s), {len(kept)} with ≥ {min_group_size} stimuli; "
                "a comparison needs 2"
            )
            skipped.append({"property": info.name, "reason": reason})
        elif len(kept) > max_levels:
            skipped.append(
                {
                    "property": info.name,
                    "reason": f"{len(kept)} levels with ≥ {min_group_size} stimuli "
                    f"(more than {max_levels})",
                }
            )
        elif int(kept.sum()) < min_stimuli:
            skipped.append(
                {"property": info.name, "reason": f"{int(kept.sum())} stimuli in levels"}
            )
        else:
            categorical[info.name] = tuple(sorted(kept.index))
    return UsableProperties(
        tuple(numeric), categorical, pd.DataFrame(skipped, columns=["property", "reason"])
    )


# ---------------------------------------------------------------------------------------------
# Rank tests
# ---------------------------------------------------------------------------------------------
def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of a 1-D array (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    present = np.isfinite(p)
    if present.any():
        from scipy.stats import false_discovery_control

        q[present] = false_discovery_control(p[present], method="bh")
    return q


def _permutation_blocks(n_rows: int, n_permutations: int, rng: np.random.Generator):
    """Yield (B, n_rows) blocks of independent permutations, n_permutations rows in all
    (:func:`.shuffles.permutation_blocks`: a compiled shuffle, ~3× NumPy's at n = 100,000)."""
    from .shuffles import permutation_blocks

    yield from permutation_blocks(n_rows, n_permutations, rng, block_elements=_BLOCK_ELEMENTS)


def _spearman_tests(
    x: np.ndarray, y: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ρ, permutation p (two-sided; :func:`.stats.spearman_permutation_tests`) and
    t-approximation p of each column of x (n, P) with y (n,)."""
    from scipy.stats import t as student_t

    rho, p_perm, _ = spearman_permutation_tests(
        x, y, n_permutations, rng, block_elements=_BLOCK_ELEMENTS
    )
    n = len(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_value = rho * np.sqrt((n - 2) / np.maximum(1.0 - rho**2, 0.0))
    p_t = 2.0 * student_t.sf(np.abs(t_value), n - 2)
    return rho, p_perm, p_t


def _kruskal_test(
    labels: np.ndarray, y: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """Kruskal–Wallis H (tie-corrected), ε², permutation p and χ² p of y (n,) across labels (n,)."""
    from scipy.stats import chi2, rankdata

    codes, _ = pd.factorize(labels, sort=True)
    groups = int(codes.max()) + 1
    n = len(y)
    ranks = rankdata(y)
    onehot = np.zeros((n, groups))
    onehot[np.arange(n), codes] = 1.0
    sizes = onehot.sum(axis=0)
    _, ties = np.unique(ranks, return_counts=True)
    correction = 1.0 - float(((ties**3) - ties).sum()) / (n**3 - n)

    def h_of(rank_rows: np.ndarray) -> np.ndarray:
        sums = rank_rows @ onehot  # (B, G)
        return (12.0 / (n * (n + 1)) * (sums**2 / sizes).sum(axis=-1) - 3.0 * (n + 1)) / correction

    observed = float(h_of(ranks[None])[0])
    extreme = 0
    threshold = observed - TIE_TOLERANCE * max(1.0, abs(observed))
    for perms in _permutation_blocks(n, n_permutations, rng):
        extreme += int(np.count_nonzero(h_of(ranks[perms]) >= threshold))
    p_perm = permutation_p_value(extreme, n_permutations) if np.isfinite(observed) else np.nan
    p_chi2 = float(chi2.sf(observed, groups - 1))
    return observed, observed / (n - 1), p_perm, p_chi2


def _categorical_rows(table: PropertyTable, name: str, levels: Sequence[str]) -> np.ndarray:
    """Row positions whose value of categorical ``name`` is one of ``levels``."""
    column = table.values[name]
    return np.flatnonzero(column.isin(list(levels)).to_numpy())


def property_tests(
    table: PropertyTable,
    dispersion: pd.DataFrame,
    *,
    scores: Sequence[str] = SCORES,
    n_permutations: int = PROPERTY_TEST_PERMUTATIONS,
    seed: int = 0,
    usable: UsableProperties | None = None,
) -> pd.DataFrame:
    """One row per usable property × score, ranked within each score.

    Columns: ``score``, ``rank`` (1 = smallest p, ties → larger strength), ``property``,
    ``kind``, ``source``, ``unit``, ``test`` (``spearman`` | ``kruskal_wallis``),
    ``n_stimuli`` (with a value), ``n_levels`` (categorical; else NaN), ``effect`` (ρ or ε²),
    ``effect_name`` (``spearman_rho`` | ``epsilon_squared``), ``strength`` (|ρ| or √ε²),
    ``statistic`` (ρ or H), ``p_value`` (permutation), ``p_value_asymptotic`` (t / χ²),
    ``q_value`` (BH over the properties of that score), ``n_permutations``.

    Permutations: one generator per score from ``SeedSequence(seed)``; numeric properties that
    are present for the same stimuli share their permutations.
    """
    _scores(dispersion, table, scores)
    n_permutations = check_count(n_permutations, "n_permutations", 1)
    usable = usable or usable_properties(table)
    columns = [
        "score", "rank", "property", "kind", "source", "unit", "test", "n_stimuli", "n_levels",
        "effect", "effect_name", "strength", "statistic", "p_value", "p_value_asymptotic",
        "q_value", "n_permutations",
    ]  # fmt: skip
    frames = []
    generators = np.random.SeedSequence(seed).spawn(len(scores))
    for score, sequence in zip(scores, generators, strict=True):
        rng = np.random.default_rng(sequence)
        y_all = dispersion[score].to_numpy(dtype=np.float64)
        rows: list[dict[str, Any]] = []
        numeric = list(usable.numeric)
        if numeric:
            matrix = table.values[numeric].to_numpy(dtype=np.float64)
            present = np.isfinite(matrix)
            patterns: dict[bytes, list[int]] = {}
            for j in range(len(numeric)):
                patterns.setdefault(np.packbits(present[:, j]).tobytes(), []).append(j)
            for members in patterns.values():
                rows_in = np.flatnonzero(present[:, members[0]])
                rho, p_perm, p_t = _spearman_tests(
                    matrix[np.ix_(rows_in, members)], y_all[rows_in], n_permutations, rng
                )
                for position, j in enumerate(members):
                    rows.append(
                        {
                            "property": numeric[j],
                            "test": "spearman",
                            "n_stimuli": int(rows_in.size),
                            "n_levels": np.nan,
                            "effect": float(rho[position]),
                            "effect_name": "spearman_rho",
                            "strength": abs(float(rho[position])),
                            "statistic": float(rho[position]),
                            "p_value": float(p_perm[position]),
                            "p_value_asymptotic": float(p_t[position]),
                        }
                    )
        for name, levels in usable.categorical.items():
            rows_in = _categorical_rows(table, name, levels)
            labels = table.values[name].to_numpy(dtype=object)[rows_in]
            h, epsilon, p_perm_c, p_chi2 = _kruskal_test(
                labels, y_all[rows_in], n_permutations, rng
            )
            rows.append(
                {
                    "property": name,
                    "test": "kruskal_wallis",
                    "n_stimuli": int(rows_in.size),
                    "n_levels": float(len(levels)),
                    "effect": epsilon,
                    "effect_name": "epsilon_squared",
                    "strength": float(np.sqrt(max(epsilon, 0.0))),
                    "statistic": h,
                    "p_value": p_perm_c,
                    "p_value_asymptotic": p_chi2,
                }
            )
        frame = pd.DataFrame(rows)
        if frame.empty:
            continue
        frame["q_value"] = benjamini_hochberg(frame["p_value"].to_numpy())
        frame = frame.sort_values(
            ["p_value", "strength", "property"], ascending=[True, False, True], kind="stable"
        ).reset_index(drop=True)
        frame["rank"] = np.arange(1, len(frame) + 1)
        frame["score"] = score
        frame["n_permutations"] = n_permutations
        info = {item.name: item for item in table.info}
        frame["kind"] = [info[p].kind for p in frame["property"]]
        frame["source"] = [info[p].source for p in frame["property"]]
        frame["unit"] = [info[p].unit for p in frame["property"]]
        frames.append(frame[columns])
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)


def group_summary(
    table: PropertyTable,
    dispersion: pd.DataFrame,
    *,
    scores: Sequence[str] = SCORES,
    usable: UsableProperties | None = None,
) -> pd.DataFrame:
    """Per level of each usable categorical property × score: ``score``, ``property``,
    ``level``, ``n_stimuli``, ``median``, ``lower_quartile``, ``upper_quartile`` (of the score),
    levels sorted by median."""
    _scores(dispersion, table, scores)
    usable = usable or usable_properties(table)
    rows = []
    for score in scores:
        y = dispersion[score].to_numpy(dtype=np.float64)
        for name, levels in usable.categorical.items():
            column = table.values[name].to_numpy(dtype=object)
            level_rows = []
            for level in levels:
                values = y[column == level]
                q25, q50, q75 = np.percentile(values, [25, 50, 75])
                level_rows.append(
                    {
                        "score": score,
                        "property": name,
                        "level": level,
                        "n_stimuli": int(values.size),
                        "median": float(q50),
                        "lower_quartile": float(q25),
                        "upper_quartile": float(q75),
                    }
                )
            rows += sorted(level_rows, key=lambda r: (r["median"], r["level"]))
    columns = [
        "score", "property", "level", "n_stimuli", "median", "lower_quartile", "upper_quartile",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# Cross-validated models
# ---------------------------------------------------------------------------------------------
def _design(table: PropertyTable, usable: UsableProperties) -> pd.DataFrame:
    """Feature frame: numeric float64 (NaN = missing, as are ±inf: the rank tests count them
    missing too) and categorical str (rare levels -> NaN)."""
    frame = pd.DataFrame(index=range(len(table.values)))
    for name in usable.numeric:
        values = table.values[name].to_numpy(dtype=np.float64)
        frame[name] = np.where(np.isfinite(values), values, np.nan)
    for name, levels in usable.categorical.items():
        column = table.values[name]
        kept = column.where(column.isin(list(levels)))
        frame[name] = pd.Series(
            [np.nan if pd.isna(v) else str(v) for v in kept], dtype=object, index=frame.index
        )
    return frame


def _make_model(name: str, numeric: Sequence[str], categorical: Sequence[str], seed: int) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    if name == "ridge":
        parts = []
        if numeric:
            parts.append(
                (
                    "numeric",
                    make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
                    list(numeric),
                )
            )
        if categorical:
            parts.append(
                (
                    "categorical",
                    make_pipeline(
                        SimpleImputer(strategy="constant", fill_value="(missing)"),
                        OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                    ),
                    list(categorical),
                )
            )
        return Pipeline(
            [
                ("features", ColumnTransformer(parts)),
                ("ridge", RidgeCV(alphas=np.logspace(-3, 4, 29))),
            ]
        )
    if name == "boosted_trees":
        parts = []
        if numeric:
            parts.append(("numeric", "passthrough", list(numeric)))
        if categorical:
            parts.append(
                (
                    "categorical",
                    OrdinalEncoder(
                        handle_unknown="use_encoded_value",
                        unknown_value=np.nan,
                        encoded_missing_value=np.nan,
                    ),
                    list(categorical),
                )
            )
        mask = [False] * len(numeric) + [True] * len(categorical)
        return Pipeline(
            [
                ("features", ColumnTransformer(parts)),
                (
                    "trees",
                    HistGradientBoostingRegressor(
                        max_iter=300,
                        learning_rate=0.05,
                        max_leaf_nodes=8,
                        min_samples_leaf=10,
                        l2_regularization=1.0,
                        # stop when 20% of the training fold held aside stops improving: on
                        # noise that is after a few trees, so the model stays near the mean
                        early_stopping=True,
                        validation_fraction=0.2,
                        n_iter_no_change=10,
                        categorical_features=mask if any(mask) else None,
                        random_state=seed,
                    ),
                ),
            ]
        )
    raise ValueError(f"unknown model {name!r}; use one of {list(MODELS)}")


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    """R² of ``predicted`` (n,) against ``observed`` (n,); NaN for a constant target, whose total
    sum of squares is 0 or rounding error (0.3 sixty times gives ~1e-31 and R² = 1)."""
    total = float(((observed - observed.mean()) ** 2).sum())
    rounding = observed.size * (16 * np.finfo(np.float64).eps * np.abs(observed).max()) ** 2
    if np.ptp(observed) == 0 or total <= rounding:
        return float("nan")
    return 1.0 - float(((observed - predicted) ** 2).sum()) / total


class _Fold(NamedTuple):
    """One cross-validation fold with the model's column transform fitted on its training rows
    (it does not look at the target, so every target fitted on the fold shares it)."""

    train: np.ndarray
    test: np.ndarray
    transform: Any  #: the fitted Pipeline of everything before the model's estimator
    train_matrix: np.ndarray
    test_matrix: np.ndarray


def _fold_designs(
    model_name: str,
    features: pd.DataFrame,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    usable: UsableProperties,
    seed: int,
) -> list[_Fold]:
    """Per fold, the transform of :func:`_make_model` fitted on the training rows (as
    ``Pipeline.fit`` fits it) and the transformed training and held-out rows."""
    out = []
    for train, test in folds:
        transform = _make_model(model_name, usable.numeric, list(usable.categorical), seed)[:-1]
        train_matrix = transform.fit_transform(features.iloc[train])
        out.append(_Fold(train, test, transform, train_matrix,
                         transform.transform(features.iloc[test])))
    return out


def _out_of_fold(
    model_name: str,
    designs: Sequence[_Fold],
    y: np.ndarray,
    usable: UsableProperties,
    seed: int,
    importance_repeats: int = 0,
    features: pd.DataFrame | None = None,
) -> tuple[np.ndarray, list[float], np.ndarray | None]:
    """Out-of-fold predictions (n,), per-fold R², and (importance_repeats > 0, ``features``
    given) the held-out permutation importances (P, folds × repeats). The numbers of fitting
    the whole model on each fold: only its estimator is fitted here, on the fold's transformed
    rows (:func:`_fold_designs`)."""
    from sklearn.pipeline import Pipeline

    predicted = np.empty_like(y)
    fold_r2: list[float] = []
    importances = []
    for index, fold in enumerate(designs):
        estimator = _make_model(model_name, usable.numeric, list(usable.categorical), seed)[-1]
        estimator.fit(fold.train_matrix, y[fold.train])
        predicted[fold.test] = estimator.predict(fold.test_matrix)
        fold_r2.append(_r2(y[fold.test], predicted[fold.test]))
        if importance_repeats and features is not None:
            model = Pipeline([*fold.transform.steps, ("estimator", estimator)])
            importances.append(permutation_importances(
                model, features.iloc[fold.test], y[fold.test], importance_repeats, seed + index
            ))
    return predicted, fold_r2, (np.concatenate(importances, axis=1) if importances else None)


def _identity(step: Any) -> bool:
    """Whether ``step`` is the identity a fitted ColumnTransformer puts for "passthrough"."""
    from sklearn.preprocessing import FunctionTransformer

    return isinstance(step, FunctionTransformer) and step.func is None


def _output_columns(transform: Any, frame: pd.DataFrame) -> list[np.ndarray] | None:
    """Per column of ``frame``, the columns of the fitted ``ColumnTransformer`` of
    :func:`_make_model` that come from it, or None where the transform is not one of those
    (then the caller uses scikit-learn's own loop). Numeric columns give one output each (the
    median imputer drops a column that was all missing when it was fitted), categorical ones one
    per level of the one-hot encoder, or one (ordinal codes)."""
    if not hasattr(transform, "transformers_"):
        return None
    out: dict[str, np.ndarray] = {}
    for name, part, columns in transform.transformers_:
        if name == "remainder":
            if part != "drop" or len(columns):
                return None
            continue
        start = transform.output_indices_[name].start
        steps = part.steps if hasattr(part, "steps") else [(None, part)]
        widths = [1] * len(columns)
        for _, step in steps:
            if hasattr(step, "categories_"):  # one-hot: a column per level; ordinal: one
                if hasattr(step, "drop_idx_"):
                    if step.drop_idx_ is not None:
                        return None
                    widths = [len(levels) for levels in step.categories_]
            elif hasattr(step, "statistics_"):  # an imputer drops a column with no statistic
                if getattr(step, "keep_empty_features", False):
                    return None
                widths = [0 if pd.isna(value) else 1 for value in step.statistics_]
            elif not (step == "passthrough" or hasattr(step, "scale_") or _identity(step)):
                return None
        for column, width in zip(columns, widths, strict=True):
            out[column] = np.arange(start, start + width)
            start += width
    if set(out) != set(frame.columns):
        return None
    return [out[column] for column in frame.columns]


def permutation_importances(
    model: Any, frame: pd.DataFrame, y: np.ndarray, n_repeats: int, random_state: int
) -> np.ndarray:
    """(P, n_repeats) drops in R² when each column of ``frame`` is shuffled: the numbers of
    ``sklearn.inspection.permutation_importance(model, frame, y, scoring="r2", n_repeats,
    random_state)``, the same shuffles, with the model's column transform run once instead of
    once per shuffle (the transform was most of the time of scikit-learn's loop here).

    Every step of the transform of :func:`_make_model` works row by row (imputers, scaling,
    encoders), so transforming a column whose rows are shuffled gives the transformed block of
    that column with its rows shuffled the same way, element for element; the final estimator
    then predicts from the same matrix. Shuffles: as scikit-learn draws them (one seed from
    ``RandomState(random_state)``, a ``RandomState`` of it per column, ``n_repeats`` successive
    in-place shuffles of one index, each applied to the column as last shuffled).
    """
    from sklearn.metrics import r2_score

    transform, estimator = model[:-1], model[-1]
    blocks = _output_columns(transform[-1], frame)
    if blocks is None:
        from sklearn.inspection import permutation_importance

        return permutation_importance(
            model, frame, y, scoring="r2", n_repeats=n_repeats, random_state=random_state
        ).importances
    base = np.asarray(transform.transform(frame))
    baseline = r2_score(y, estimator.predict(base))
    seed = np.random.RandomState(random_state).randint(np.iinfo(np.int32).max + 1)
    out = np.empty((len(blocks), n_repeats))
    for column, block in enumerate(blocks):
        rng = np.random.RandomState(seed)
        order = np.arange(base.shape[0])
        shuffled = base.copy()
        for repeat in range(n_repeats):
            rng.shuffle(order)
            shuffled[:, block] = shuffled[order[:, None], block]
            out[column, repeat] = baseline - r2_score(y, estimator.predict(shuffled))
    return out


def cross_validated_fit(
    table: PropertyTable,
    dispersion: pd.DataFrame,
    *,
    score: str = "mean",
    models: Sequence[str] = tuple(MODELS),
    n_splits: int = 5,
    n_shuffles: int = DEFAULT_N_SHUFFLES,
    importance_repeats: int = 5,
    seed: int = 0,
    usable: UsableProperties | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Predict one dispersion score from every usable property; returns (fit, importances,
    predictions).

    ``fit`` (long): ``score``, ``model``, ``metric``, ``value`` with metrics ``r2_held_out``
    (pooled out-of-fold predictions), ``r2_fold_mean``, ``r2_fold_sd``, ``r2_shuffled_mean``,
    ``r2_shuffled_sd``, ``r2_shuffled_upper_95`` (95th percentile of the shuffled-target
    refits), ``p_value_vs_shuffled`` (``(1 + #{shuffled ≥ observed}) / (n_shuffles + 1)``), plus
    columns ``n_stimuli``, ``n_properties``, ``n_splits``, ``n_shuffles``. R² and its p-value are
    NaN for a constant score (no variance to explain).
    ``importances``: ``score``, ``model``, ``property``, ``importance_mean``, ``importance_sd``
    (drop in held-out R² when the property is shuffled, over folds × ``importance_repeats``),
    ``rank`` (1 = most important). ``predictions``: ``score``, ``model``, ``id``, ``observed``,
    ``predicted`` (out of fold), ``fold``.

    The folds (``KFold(n_splits, shuffle=True, random_state=seed)``) are the same for every
    model and every shuffled refit.
    """
    from sklearn.model_selection import KFold

    _scores(dispersion, table, [score])
    usable = usable or usable_properties(table)
    n = len(table.values)
    n_splits = check_count(n_splits, "n_splits", 2)
    n_shuffles = check_count(n_shuffles, "n_shuffles", 0)
    importance_repeats = check_count(importance_repeats, "importance_repeats", 0)
    problem = fit_problem(table, n_splits, usable)
    if problem:
        raise ValueError(problem)
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; use one of {list(MODELS)}")
    features = _design(table, usable)
    y = dispersion[score].to_numpy(dtype=np.float64)
    folds = list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(features))
    fold_of = np.empty(n, dtype=np.int64)
    for index, (_, test) in enumerate(folds):
        fold_of[test] = index
    shuffle_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    shuffled_targets = [y[shuffle_rng.permutation(n)] for _ in range(n_shuffles)]
    ids = table.values["id"].astype(str).to_numpy()
    fit_rows: list[dict[str, Any]] = []
    importance_rows: list[dict[str, Any]] = []
    prediction_frames = []
    # one thread: for these small fits threads cost more than they save, and the trees' OpenMP
    # threads spin on a shared machine (50x slower at n = 100 on 2 busy cores)
    with threadpool_limits(limits=1):
        for name in models:
            designs = _fold_designs(name, features, folds, usable, seed)
            predicted, fold_r2, importances = _out_of_fold(
                name, designs, y, usable, seed, importance_repeats, features
            )
            null = np.array(
                [
                    _r2(target, _out_of_fold(name, designs, target, usable, seed)[0])
                    for target in shuffled_targets
                ]
            )
            metrics = _fit_metrics(_r2(y, predicted), fold_r2, null)
            fit_rows += [
                {"score": score, "model": name, "metric": metric, "value": value}
                for metric, value in metrics.items()
            ]
            if importances is not None:
                importance_rows += _importance_rows(importances, usable.names, score, name)
            prediction_frames.append(
                pd.DataFrame(
                    {
                        "score": score,
                        "model": name,
                        "id": ids,
                        "observed": y,
                        "predicted": predicted,
                        "fold": fold_of,
                    }
                )
            )
    fit = pd.DataFrame(fit_rows).assign(
        n_stimuli=n, n_properties=len(usable.names), n_splits=n_splits, n_shuffles=n_shuffles
    )
    importance_columns = [
        "score", "model", "property", "importance_mean", "importance_sd", "rank",
    ]  # fmt: skip
    return (
        fit,
        pd.DataFrame(importance_rows, columns=importance_columns),
        pd.concat(prediction_frames, ignore_index=True),
    )


def _fit_metrics(observed: float, fold_r2: Sequence[float], null: np.ndarray) -> dict[str, float]:
    """The ``fit`` metrics of one model from its held-out R², per-fold R² and shuffled R² (S,)."""
    nan = float("nan")
    return {
        "r2_held_out": observed,
        "r2_fold_mean": float(np.mean(fold_r2)),
        "r2_fold_sd": float(np.std(fold_r2, ddof=1)),
        "r2_shuffled_mean": float(null.mean()) if null.size else nan,
        "r2_shuffled_sd": float(null.std(ddof=1)) if null.size > 1 else nan,
        "r2_shuffled_upper_95": float(np.percentile(null, 95)) if null.size else nan,
        "p_value_vs_shuffled": (  # NaN for an undefined R², never the smallest p
            permutation_p_value(int(np.count_nonzero(null >= observed)), null.size)
            if null.size and np.isfinite(observed) else nan
        ),
    }


def _importance_rows(
    importances: np.ndarray, names: Sequence[str], score: str, model: str
) -> list[dict[str, Any]]:
    """Rows of the importance table from (P, folds × repeats) held-out R² drops."""
    order = np.argsort(-importances.mean(axis=1), kind="stable")
    spread = importances.std(axis=1, ddof=1) if importances.shape[1] > 1 else None
    return [
        {
            "score": score,
            "model": model,
            "property": names[j],
            "importance_mean": float(importances[j].mean()),
            "importance_sd": float(spread[j]) if spread is not None else float("nan"),
            "rank": rank,
        }
        for rank, j in enumerate(order, start=1)
    ]


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------
def analyse_properties(
    table: PropertyTable,
    dispersion: pd.DataFrame,
    *,
    scores: Sequence[str] = SCORES,
    n_permutations: int = PROPERTY_TEST_PERMUTATIONS,
    models: Sequence[str] = tuple(MODELS),
    n_splits: int = 5,
    n_shuffles: int = DEFAULT_N_SHUFFLES,
    importance_repeats: int = 5,
    seed: int = 0,
) -> PredictorAnalysis:
    """:func:`property_tests`, :func:`group_summary` and :func:`cross_validated_fit` per score."""
    usable = usable_properties(table)
    tests = property_tests(
        table, dispersion, scores=scores, n_permutations=n_permutations, seed=seed, usable=usable
    )
    groups = group_summary(table, dispersion, scores=scores, usable=usable)
    fits, importances, predictions = [], [], []
    for score in scores:
        fit, importance, prediction = cross_validated_fit(
            table,
            dispersion,
            score=score,
            models=models,
            n_splits=n_splits,
            n_shuffles=n_shuffles,
            importance_repeats=importance_repeats,
            seed=seed,
            usable=usable,
        )
        fits.append(fit)
        importances.append(importance)
        predictions.append(prediction)
    return PredictorAnalysis(
        tests=tests,
        groups=groups,
        fit=pd.concat(fits, ignore_index=True),
        importances=pd.concat(importances, ignore_index=True),
        predictions=pd.concat(predictions, ignore_index=True),
        skipped=usable.skipped,
        parameters={
            "scores": list(scores),
            "n_permutations": n_permutations,
            "models": list(models),
            "n_splits": n_splits,
            "n_shuffles": n_shuffles,
            "importance_repeats": importance_repeats,
            "seed": seed,
            "n_stimuli": len(table.values),
        },
    )


def analyse_run(run: Any, **options: Any) -> PredictorAnalysis:
    """:func:`analyse_properties` on a run's property table and dispersion scores.

    Raises ValueError when the run has no property table (a run written before the properties
    step, or by ``write_run_from_embeddings``): rerun precompute on it to add one.
    """
    table = run.properties
    if table is None:
        raise ValueError(
            f"run {run.name!r} has no property table (properties.parquet); rerun the same "
            "`python -m convergence_core precompute` command to add it (finished steps are reused)"
        )
    return analyse_properties(table, run.dispersion, **options)
