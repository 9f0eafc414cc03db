"""Linear predictivity (He, Trott & Khosla, paper 004): how well one modality's features predict
the other's through a cross-validated ridge regression.

For a set of s stimuli with source features X (s, d_x) and target features Y (s, d_y):

1. Outer K-fold cross-validation (``n_folds``, shuffled with ``seed``). In each fold a ridge
   regression with intercept is fitted on the training rows; its penalty is chosen by an inner
   cross-validation on those rows only (scikit-learn ``RidgeCV``'s efficient leave-one-out, through
   :func:`ridge.fit_ridge_cv`, over ``alphas``, by default 10^-8 … 10^8 in decades, the paper's
   grid; one penalty for all outputs).
   Each held-out row is predicted by the model that did not see it.
2. Scores of the held-out predictions P (s, d_y):
   * ``r2``: pooled R² = 1 − Σ‖y_i − p_i‖² / Σ‖y_i − ȳ‖² (the fraction of the target's total
     variance explained; ȳ the mean over all s rows). Can be negative (worse than the mean).
   * ``correlation``: mean over target dimensions of Pearson r(P[:, j], Y[:, j]) (the paper's
     score; dimensions constant in Y or P are skipped).
   * ``two_afc``: pairwise two-alternative forced choice: over ordered pairs (i, j ≠ i), the
     fraction with sim(p_i, y_i) > sim(p_i, y_j) (ties ½), sim = Pearson correlation across
     dimensions by default ("cosine" or negative "euclidean" distance optional). Chance is ½.
     A one-feature target has no correlation across dimensions: its correlation 2AFC is NaN.
     Cost O(s²·d_y) in row blocks (O(block·s) memory); ``n_foils`` = F compares each i with F
     distinct random j ≠ i instead (seeded; rows in blocks of 8 share a draw, scored by one
     matrix product): O(s·F·d_y). Independent draws would give a standard deviation about the
     all-pairs score of √(Σ pᵢ(1 − pᵢ)/F)/s ≤ 0.5/√(s·F) (pᵢ: row i's all-pairs score); rows
     that share a draw add to it where a few targets are easy foils for every row (hubs), at
     most √B-fold for blocks of B (a block's sum has at most B times the variance of its rows'
     sum): ≤ √8 · 0.5/√(s·F). Measured (s = 6,000, F = 1,000, six hub-heavy synthetic data
     sets, 20–40 seeds): 0.8–1.6× the independent bound with blocks of 8, up to 2.5× with 64;
     one call at s = 25,000, d = 768 took 5.0 s with blocks of 8 and 2.7 s with 64 (all pairs:
     ~33 s).

Both directions (vision → language and back) come from :func:`predictivity_table`, long format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from .ridge import fit_ridge_cv
from .subset_metrics import row_space_coordinates
from .subsets import check_indices
from .validation import check_pair, product_rounding

#: the paper's ridge penalties: 10^-8 … 10^8
DEFAULT_ALPHAS = tuple(10.0**p for p in range(-8, 9))

_BLOCK_ELEMENTS = 4_000_000
#: Rows that share one random draw of foils in the sampled 2AFC (``n_foils``): each block's draw
#: is scored by one (rows, foils + 1) matrix product. Shared draws are correlated where targets
#: have hubs (module docstring): 64 rows made the sampled score's sd 2.5× the independent one
_FOIL_BLOCK_ROWS = 8
_DISTANCES = ("correlation", "cosine", "euclidean")


@dataclass(frozen=True)
class Predictivity:
    """Held-out scores of a ridge map from ``source`` to ``target`` features (see module doc).

    ``alphas`` holds the penalty chosen in each outer fold.
    """

    source: str
    target: str
    r2: float
    correlation: float
    two_afc: float
    alphas: tuple[float, ...]
    n_stimuli: int
    n_folds: int


def _check_rows(rows: object, n: int) -> np.ndarray:
    return np.arange(n) if rows is None else check_indices(rows, n)


def _check_alphas(alphas: object) -> np.ndarray:
    array = np.asarray(alphas, dtype=np.float64).ravel()
    if array.size == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"alphas must be positive finite ridge penalties, got {alphas!r}.")
    return array


def cross_validated_predictions(
    X: object,
    Y: object,
    *,
    n_folds: int = 5,
    alphas: object = DEFAULT_ALPHAS,
    seed: int = 0,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Held-out ridge predictions of Y (s, d_y) from X (s, d_x), and the penalty of each fold.

    Each row is predicted by the fold model that did not train on it (see the module doc).
    Sources wider than the rows are many (d_x > s) are first written in their s row-space
    coordinates (exact: ridge depends on X only through inner products; ~d_x/s times faster).
    """
    from sklearn.model_selection import KFold

    X, Y = check_pair(X, Y)
    s = X.shape[0]
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}; the paper uses 5.")
    if s < 2 * n_folds:
        raise ValueError(
            f"{s} stimuli are too few for {n_folds}-fold cross-validation (each training fold needs "
            f"at least 2 rows for the inner leave-one-out); use at least {2 * n_folds} stimuli or "
            "fewer folds."
        )
    alphas = _check_alphas(alphas)
    # the ridge map sees X only through inner products of its (centered) rows: written in
    # coordinates of their own row space (s columns) every prediction and leave-one-out error
    # is the same, and the per-penalty coefficients cost s instead of d_x columns
    X = row_space_coordinates(X)
    predictions = np.empty_like(Y)
    chosen = []
    for train, test in KFold(n_folds, shuffle=True, random_state=int(seed)).split(X):
        model = fit_ridge_cv(X[train], Y[train], alphas)
        predictions[test] = model.predict(X[test])
        chosen.append(model.alpha)
    return predictions, tuple(chosen)


def pooled_r2(Y: object, P: object) -> float:
    """1 − Σ‖y_i − p_i‖² / Σ‖y_i − ȳ‖² of targets Y and predictions P (s, d)."""
    Y, P = check_pair(Y, P)
    total = float(np.sum((Y - Y.mean(axis=0)) ** 2))
    if total == 0:
        raise ValueError("Y is constant over the stimuli; R² is undefined.")
    return 1.0 - float(np.sum((Y - P) ** 2)) / total


def mean_correlation(Y: object, P: object) -> float:
    """Mean over dimensions j of Pearson r(P[:, j], Y[:, j]); constant dimensions skipped."""
    Y, P = check_pair(Y, P)
    Yc, Pc = Y - Y.mean(axis=0), P - P.mean(axis=0)
    norms = np.sqrt(np.sum(Yc**2, axis=0) * np.sum(Pc**2, axis=0))
    varying = norms > 0
    if not varying.any():
        return float("nan")
    return float(np.mean(np.sum(Yc * Pc, axis=0)[varying] / norms[varying]))


def _prepared(A: np.ndarray, distance: str) -> np.ndarray:
    if distance == "correlation":
        A = A - A.mean(axis=1, keepdims=True)
    if distance in ("correlation", "cosine"):
        norms = np.linalg.norm(A, axis=1, keepdims=True)
        return A / np.where(norms > 0, norms, 1.0)
    return A


def two_afc(
    P: object,
    Y: object,
    *,
    distance: str = "correlation",
    n_foils: int | None = None,
    seed: int = 0,
) -> float:
    """Pairwise 2AFC accuracy of predictions P (s, d) for targets Y (s, d) (see module doc).

    ``n_foils=None`` compares every i with every j ≠ i (O(s²·d), row blocks); an integer compares
    each i with that many distinct random j ≠ i (seeded), a uniform draw for each i, drawn once
    for a block of rows (before 2026-12-07 once per row, through a memory-bound gathered copy:
    6 s at s = 10,000, d = 768, F = 250, against 0.7 s now).

    NaN for one-dimensional targets (d = 1) with ``distance="correlation"``: a correlation across
    one dimension is undefined (until 2026-12-07 every comparison tied and the score read 0.5).
    """
    P, Y = check_pair(P, Y, min_rows=2)
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}.")
    if distance == "correlation" and P.shape[1] < 2:
        # a Pearson correlation across one dimension is undefined (each centred row is 0): every
        # comparison tied, and the score read ½ as if measured at chance
        return float("nan")
    s = P.shape[0]
    Pn, Yn = _prepared(P, distance), _prepared(Y, distance)

    def similarity(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        """sim(p_a, y_b) for rows p (a, d) against y (a, b, d) or (b, d)."""
        if distance == "euclidean" and y.ndim == 3:
            return -np.linalg.norm(p[:, None, :] - y, axis=-1)
        if distance == "euclidean":  # the (a, step, d) differences in column blocks
            step = max(1, _BLOCK_ELEMENTS // (p.shape[0] * p.shape[1]))
            return np.concatenate(
                [
                    -np.linalg.norm(p[:, None, :] - y[None, j : j + step], axis=-1)
                    for j in range(0, y.shape[0], step)
                ],
                axis=1,
            )
        return np.einsum("ad,abd->ab", p, y) if y.ndim == 3 else p @ y.T

    # BLAS may score a target and its exact duplicate an ulp apart (validation.product_rounding):
    # within this slack two similarities are a tie, worth half a vote. Distances are computed
    # pair by pair, so they tie exactly
    slack = 0.0 if distance == "euclidean" else product_rounding(P.shape[1])

    def votes(own: np.ndarray, sims: np.ndarray, counted: np.ndarray | bool = True) -> float:
        wins = (own > sims + slack) & counted
        ties = (np.abs(own - sims) <= slack) & counted
        return float(np.sum(wins) + 0.5 * np.sum(ties))

    correct = 0.0
    pairs = 0
    if n_foils is None:
        block = max(1, _BLOCK_ELEMENTS // (s * (P.shape[1] if distance == "euclidean" else 1)))
        for start in range(0, s, block):
            rows = np.arange(start, min(s, start + block))
            sims = similarity(Pn[rows], Yn)
            own = sims[np.arange(rows.size), rows][:, None]
            other = np.ones(sims.shape, dtype=bool)
            other[np.arange(rows.size), rows] = False
            correct += votes(own, sims, other)
            pairs += rows.size * (s - 1)
        return correct / pairs
    if (
        isinstance(n_foils, bool)
        or not isinstance(n_foils, (int, np.integer))
        or not 1 <= n_foils <= s - 1
    ):
        raise ValueError(
            f"n_foils must be an integer in 1..{s - 1} (or None for all), got {n_foils!r}."
        )
    foils = int(n_foils)
    rng = np.random.default_rng(int(seed))
    # one draw of foils per block of rows, scored by one matrix product (a draw per row needed a
    # gathered (rows, foils, d) copy: memory-bound, slower than all pairs at d = 768): F + 1
    # distinct stimuli in random order; each row takes the first F that are not itself (its own
    # index dropped, the spare taken), a uniform draw of F of the s - 1 others
    width = foils + 1
    block = min(
        _FOIL_BLOCK_ROWS,
        max(1, _BLOCK_ELEMENTS // (width * (P.shape[1] if distance == "euclidean" else 1))),
    )
    # small products: BLAS threads cost more than they give (a (64, 16) by (16, 1001) product
    # took 34 ms on 2 busy cores with threads, 0.3 ms on one)
    with threadpool_limits(limits=1):
        for start in range(0, s, block):
            rows = np.arange(start, min(s, start + block))
            drawn = rng.choice(s, width, replace=False)
            own = similarity(Pn[rows], Yn[rows][:, None, :])[:, 0][:, None]
            sims = similarity(Pn[rows], Yn[drawn])
            itself = drawn[None, :foils] == rows[:, None]
            counted = np.ones(sims.shape, dtype=bool)
            counted[:, :foils] = ~itself
            counted[:, foils] = itself.any(axis=1)
            correct += votes(own, sims, counted)
    return correct / (s * foils)


def linear_predictivity(
    X: object,
    Y: object,
    rows: object = None,
    *,
    n_folds: int = 5,
    alphas: object = DEFAULT_ALPHAS,
    seed: int = 0,
    distance: str = "correlation",
    n_foils: int | None = None,
    source: str = "X",
    target: str = "Y",
) -> Predictivity:
    """Cross-validated ridge predictivity of Y from X on the given rows (all when None).

    Args:
        X, Y: (n, d_x), (n, d_y) paired features.
        rows: stimulus indices of the set (e.g. a dispersion set), or None.
        n_folds, alphas, seed: the outer folds, the inner-CV penalty grid and the fold seed.
        distance, n_foils: of the 2AFC score (:func:`two_afc`).
        source, target: names to carry in the result (e.g. "vision", "language").
    """
    X, Y = check_pair(X, Y)
    rows = _check_rows(rows, X.shape[0])
    Xs, Ys = X[rows], Y[rows]
    P, chosen = cross_validated_predictions(Xs, Ys, n_folds=n_folds, alphas=alphas, seed=seed)
    return Predictivity(
        source=str(source),
        target=str(target),
        r2=pooled_r2(Ys, P),
        correlation=mean_correlation(Ys, P),
        two_afc=two_afc(P, Ys, distance=distance, n_foils=n_foils, seed=seed),
        alphas=chosen,
        n_stimuli=int(rows.size),
        n_folds=int(n_folds),
    )


def predictivity_table(
    vision: object, language: object, rows: object = None, **options: object
) -> pd.DataFrame:
    """Both directions as a long table: ``source``, ``target``, ``metric`` (r2, correlation,
    two_afc), ``value``, ``n_stimuli``, ``n_folds``, ``median_alpha``.

    ``options`` go to :func:`linear_predictivity`.
    """
    records = []
    for source, target, X, Y in (
        ("vision", "language", vision, language),
        ("language", "vision", language, vision),
    ):
        result = linear_predictivity(X, Y, rows, source=source, target=target, **options)
        for name in ("r2", "correlation", "two_afc"):
            records.append(
                {
                    "source": source,
                    "target": target,
                    "metric": name,
                    "value": getattr(result, name),
                    "n_stimuli": result.n_stimuli,
                    "n_folds": result.n_folds,
                    "median_alpha": float(np.median(result.alphas)),
                }
            )
    return pd.DataFrame.from_records(records)
