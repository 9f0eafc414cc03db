"""Post-hoc cross-modal retrieval through the universal space (paper 001), k-fold, against chance
and a ridge-regression baseline.

Protocol (:func:`cross_validated_retrieval`):

1. The stimuli are split into ``n_folds`` folds (``sklearn.model_selection.KFold``, shuffled with
   ``seed``). For each fold, every model's centring, scale, principal axes and orthogonal map are
   learned on the other folds only (:func:`universal.fit_universal_space` on the training rows).
2. The held-out rows of every model are mapped into that fold's universal space; a held-out
   stimulus's *query* is the mean of its query-modality models' mapped rows (e.g. the image:
   the vision models), its *gallery item* the mean of its gallery-modality models' rows (the
   caption: the language models). Models of other modalities (e.g. ``brain``) shape the space but
   are not retrieved.
3. Each query is scored against every gallery item of the same fold (cosine similarity by
   default, or negative Euclidean distance). The rank of its own item is
   ``1 + #{other items scoring ≥ it}`` (ties count against the true match). Both directions are
   scored: ``<query>_to_<gallery>`` (image → text) and ``<gallery>_to_<query>`` (text → image).
4. Metrics per fold: ``recall_at_k`` (fraction of queries whose true item ranks ≤ k) for k in
   ``ks``, ``median_rank``; ``chance`` rows give their values for a random ranking of n_gallery
   items: recall@k = min(k, n)/n, median rank = (n + 1)/2.
5. Baseline (``ridge``): each query-modality model's training features are centred and scaled to
   unit Frobenius norm (as for the universal space) and concatenated (X), likewise the gallery
   modality (Y); ridge regression (``ridge.fit_ridge_cv``: scikit-learn's ``RidgeCV``) predicts Y
   from X, its α chosen on the training rows only by inner cross-validation (efficient
   leave-one-out by default, or ``inner_folds`` shuffled folds) over ``alphas_relative`` ×
   tr(XᵀX). Held-out queries are the predictions Ŷ for the held-out images, compared with the
   held-out Y (text → image: Y against Ŷ).
6. Low/high dispersion (``strata``): within each fold's held-out rows, the third with the lowest
   ``strata`` score and the third with the highest (floor(n_test / 3) each, ties to the lower
   row), and retrieval is rerun *among that subset only* (queries and gallery both restricted), so
   both subsets have the same gallery size and chance level. The run-level function uses the
   intra-modal (vision) dispersion, which uses no caption and so no pairing information.

Memory: similarities are computed one block of queries at a time, at most ``BLOCK_ELEMENTS``
scores (32 MiB of float64) beyond the (n, p) queries and gallery, so n_test = 20,000 needs no
(n, n) matrix.

Cost: each fold's space is a GPA solved from Gower's start on the training rows. On a large run
with models of equal width that is minutes per fold (see :mod:`.procrustes`), and starting a
fold's GPA from the maps of a space fitted on all stimuli (or on another fold) would be faster,
but those maps have seen the fold's held-out rows: where the loss has several near-equal minima
(equal widths), such a start picks the minimum that suits the held-out rows, and the held-out
retrieval would no longer be held out. So every fold starts afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .dispersion import check_score
from .ridge import RidgeFit, fit_ridge_cv
from .universal import (
    Member,
    _check_members,
    dispersion_name,
    fit_universal_space,
    modality_means,
    run_features,
    run_members,
)
from .validation import check_features, product_rounding

if TYPE_CHECKING:
    from .run import Run

__all__ = [
    "BLOCK_ELEMENTS",
    "DEFAULT_KS",
    "DEFAULT_RIDGE_ALPHAS",
    "SIMILARITIES",
    "CrossValidatedRetrieval",
    "RetrievalFold",
    "RidgeBaseline",
    "chance_metrics",
    "comparison_table",
    "cross_validated_retrieval",
    "direction_label",
    "fit_ridge_baseline",
    "paired_recall_test",
    "retrieval_metrics",
    "retrieval_ranks",
    "run_retrieval",
    "summarise_retrieval",
    "top_matches",
]

SIMILARITIES: tuple[str, ...] = ("cosine", "euclidean")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: Ridge α grid, relative to tr(XᵀX) of the (unit-Frobenius-norm per model) training features.
DEFAULT_RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-6, 2, 17))
#: Largest block of similarities held at once (2**22 float64 = 32 MiB).
BLOCK_ELEMENTS = 1 << 22
METHODS: tuple[str, ...] = ("universal", "ridge", "chance")
#: What a reader calls a modality's stimuli in a retrieval direction (others by their name).
_STIMULUS_WORDS = {"vision": "image", "language": "text"}


def direction_label(direction: str) -> str:
    """A retrieval direction's name (``<query>_to_<gallery>``, as the tables write it) in words,
    the one wording of the report's figures and the dashboard: ``vision_to_language`` ->
    ``image → text``; other modalities by name (``brain_to_language`` -> ``brain → text``)."""
    source, _, target = direction.partition("_to_")
    return f"{_STIMULUS_WORDS.get(source, source)} → {_STIMULUS_WORDS.get(target, target)}"


# ----------------------------------------------------------------------------------------------
# ranks and metrics


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; use one of {list(SIMILARITIES)}")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (their cosine with anything is 0)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class _Scorer:
    """Similarities of blocks of queries with one gallery (n_gallery, p)."""

    def __init__(self, gallery: np.ndarray, similarity: str) -> None:
        _check_similarity(similarity)
        self.similarity = similarity
        if similarity == "cosine":
            self.gallery = _unit_rows(gallery)
        else:
            # distances expanded as 2 q·g − |g|² − |q|² lose the differences between them to
            # rounding when every row sits far from the origin; about the gallery's mean (the
            # distances do not change) the products are as small as the spread of the rows
            self.center = gallery.mean(axis=0)
            self.gallery = gallery - self.center
            self.squared = np.einsum("ij,ij->i", self.gallery, self.gallery)

    def _centred(self, queries: np.ndarray) -> np.ndarray:
        """Euclidean queries in the gallery's centred coordinates."""
        return queries - self.center

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        """(b, n_gallery): cosine similarity, or minus the squared Euclidean distance."""
        if self.similarity == "cosine":
            return _unit_rows(queries) @ self.gallery.T
        queries = self._centred(queries)
        scores = 2.0 * (queries @ self.gallery.T)
        scores -= self.squared
        scores -= np.einsum("ij,ij->i", queries, queries)[:, None]
        return scores

    def item_rounding(self, queries: np.ndarray) -> np.ndarray | float:
        """How far rounding may move each score of ``queries`` (b, p) from its exact value: a few
        ulps of the products' scale, (b, n_gallery), or one number for cosine (unit rows: every
        score within [-1, 1]). Per pair, so that one gallery row of a huge norm widens no other
        pair's slack."""
        width = queries.shape[1]
        if self.similarity == "cosine":
            return product_rounding(width)
        queries = self._centred(queries)
        squared = np.einsum("ij,ij->i", queries, queries)[:, None]
        return product_rounding(width, squared + self.squared[None, :])

    def rounding(self, queries: np.ndarray, own: np.ndarray) -> np.ndarray | float:
        """How far apart rounding may put a query's own score and each other score when they
        are equal in exact arithmetic (identical gallery rows: BLAS takes a block's tail through
        another kernel): the larger of the two scores' allowances, (b, n_gallery), or one number
        for cosine. ``own``: (b,) the own gallery rows."""
        items = self.item_rounding(queries)
        if np.ndim(items) == 0:
            return items
        return np.maximum(items[np.arange(len(own)), own][:, None], items)

    def block_rows(self, block_rows: int | None) -> int:
        if block_rows is not None:
            return max(1, int(block_rows))
        return max(1, BLOCK_ELEMENTS // max(1, self.gallery.shape[0]))


def _check_paired(queries: object, gallery: object) -> tuple[np.ndarray, np.ndarray]:
    q = check_features(queries, "queries")
    g = check_features(gallery, "gallery")
    if q.shape != g.shape:
        raise ValueError(
            f"queries {q.shape} and gallery {g.shape} must have the same shape: row i of each is "
            "stimulus i, in the same space"
        )
    return q, g


def retrieval_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    similarity: str = "cosine",
    block_rows: int | None = None,
) -> np.ndarray:
    """Rank of each query's own gallery item among all gallery items (1 = retrieved first).

    Args:
        queries, gallery: (n, p); row i of ``gallery`` is the true match of row i of ``queries``.
        similarity: ``"cosine"`` or ``"euclidean"`` (negative distance).
        block_rows: queries scored at once (default: as many as fit ``BLOCK_ELEMENTS`` scores).

    Returns:
        (n,) int64 ranks in 1..n: 1 + #{j ≠ i : score(i, j) ≥ score(i, i)} (ties count against
        the true match, so constant features give rank n, never a lucky 1).
    """
    q, g = _check_paired(queries, gallery)
    scorer = _Scorer(g, similarity)
    n = q.shape[0]
    step = scorer.block_rows(block_rows)
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        scores = scorer(q[start:stop])
        own = scores[np.arange(stop - start), np.arange(start, stop)]
        # a tie within rounding counts against the true match (a duplicate of the own item
        # scored an ulp lower gave a lucky rank 1)
        slack = scorer.rounding(q[start:stop], np.arange(start, stop))
        ranks[start:stop] = np.count_nonzero(scores >= own[:, None] - slack, axis=1)
        del scores  # so that the next block is not allocated while this one is alive
    return ranks


def top_matches(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    similarity: str = "cosine",
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery items of each query: (indices (b, k) int64, scores (b, k) float64).

    Best first; equal scores go to the lower gallery index, where equal means equal within
    rounding (``_Scorer.item_rounding``): a gallery item and its exact duplicate, which BLAS may
    score an ulp apart, are listed in index order with one score. Scores: cosine similarity, or
    the Euclidean distance (smallest first) for ``similarity="euclidean"``.
    """
    q = check_features(np.atleast_2d(queries), "queries")
    g = check_features(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"queries have {q.shape[1]} columns, the gallery {g.shape[1]}; map both "
            "into the same space"
        )
    n = g.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in 1..{n} (the gallery size), got {k!r}")
    scorer = _Scorer(g, similarity)
    step = scorer.block_rows(block_rows)
    indices = np.empty((q.shape[0], k), dtype=np.int64)
    values = np.empty((q.shape[0], k))
    for start in range(0, q.shape[0], step):
        scores = scorer(q[start : start + step])
        for row, line in enumerate(scores, start=start):
            slack = np.broadcast_to(np.atleast_2d(scorer.item_rounding(q[row : row + 1]))[0], n)
            indices[row], values[row] = _best_with_ties(line, slack, k)
        del scores
    if similarity == "euclidean":
        values = np.sqrt(np.clip(-values, 0.0, None))
    return indices, values


def _best_with_ties(line: np.ndarray, slack: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of one query's scores ``line`` (n,), each known to within ``slack`` (n,):
    (indices (k,), scores (k,)), best first. Scores whose gap is within the larger slack of the
    two tie: a tied run is ordered by index and carries its best score."""
    n = line.shape[0]
    best = np.argpartition(-line, k - 1)[:k] if k < n else np.arange(n)
    # the k-th best may tie with items outside ``best``: take every item that may score as well
    kth = best[np.argmin(line[best])]
    candidates = np.flatnonzero(line + slack >= line[kth] - slack[kth])
    candidates = candidates[np.lexsort((candidates, -line[candidates]))]
    ordered = line[candidates]
    gaps = ordered[:-1] - ordered[1:]
    runs = np.concatenate(([0], np.cumsum(gaps > np.maximum(slack[candidates[:-1]],
                                                             slack[candidates[1:]]))))
    order = np.lexsort((candidates, runs))[:k]  # runs ascending already; by index within a run
    tops = ordered[np.r_[0, np.flatnonzero(np.diff(runs)) + 1]]  # each run's best score
    return candidates[order], tops[runs[order]]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks
    ):
        raise ValueError(f"ks must be positive integers (e.g. (1, 5, 10)), got {ks!r}")
    return tuple(int(k) for k in ks)


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``recall_at_<k>`` for each k (fraction of ranks ≤ k) and ``median_rank`` of (n,) ranks."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError("ranks must be a non-empty 1-D array of ranks (1 = best)")
    metrics = {f"recall_at_{k}": float(np.mean(ranks <= k)) for k in _check_ks(ks)}
    metrics["median_rank"] = float(np.median(ranks))
    return metrics


def chance_metrics(n_gallery: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """The same metrics for a uniformly random ranking of ``n_gallery`` items."""
    if n_gallery < 1:
        raise ValueError(f"n_gallery must be at least 1, got {n_gallery}")
    metrics = {f"recall_at_{k}": min(k, n_gallery) / n_gallery for k in _check_ks(ks)}
    metrics["median_rank"] = (n_gallery + 1) / 2.0
    return metrics


# ----------------------------------------------------------------------------------------------
# ridge baseline


def _standardise(
    features: Sequence[np.ndarray], rows: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """Concatenated (len(rows), Σd) training features, each model centred and scaled to unit
    Frobenius norm on ``rows``; returns (matrix, means, scales)."""
    blocks, means, scales = [], [], []
    for x in features:
        block = np.asarray(x[rows], dtype=np.float64)
        mean = block.mean(axis=0)
        block -= mean
        scale = float(np.linalg.norm(block))
        if not scale > 0.0:
            raise ValueError(
                "a model's training features are identical for every stimulus; drop that model"
            )
        blocks.append(block / scale)
        means.append(mean)
        scales.append(scale)
    return np.hstack(blocks), tuple(means), np.asarray(scales)


def _apply(
    features: Sequence[np.ndarray],
    rows: np.ndarray,
    means: Sequence[np.ndarray],
    scales: np.ndarray,
) -> np.ndarray:
    return np.hstack(
        [
            (np.asarray(x[rows], dtype=np.float64) - mean) / scale
            for x, mean, scale in zip(features, means, scales, strict=True)
        ]
    )


@dataclass(frozen=True)
class RidgeBaseline:
    """Ridge regression from one modality's features to another's (:func:`fit_ridge_baseline`).

    ``source_*`` / ``target_*``: per-model training means and Frobenius scales; ``model``: the
    fitted map (``ridge.RidgeFit``, coef (Σd_source, Σd_target)); ``alpha``: the chosen α,
    ``alpha_relative`` = α / tr(XᵀX); ``at_grid_edge``: the chosen α is the smallest or largest
    of the grid (widen the grid).
    """

    source_means: tuple[np.ndarray, ...]
    source_scales: np.ndarray
    target_means: tuple[np.ndarray, ...]
    target_scales: np.ndarray
    model: RidgeFit
    alpha: float
    alpha_relative: float
    at_grid_edge: bool

    def predict(self, source: Sequence[np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        """(n, Σd_target) predicted target features of ``rows`` (default all) of ``source``."""
        rows = np.arange(source[0].shape[0]) if rows is None else np.asarray(rows)
        return self.model.predict(_apply(source, rows, self.source_means, self.source_scales))

    def targets(self, target: Sequence[np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        """(n, Σd_target) target features of ``rows``, standardised as in the fit."""
        rows = np.arange(target[0].shape[0]) if rows is None else np.asarray(rows)
        return _apply(target, rows, self.target_means, self.target_scales)


def fit_ridge_baseline(
    source: Sequence[np.ndarray],
    target: Sequence[np.ndarray],
    *,
    rows: np.ndarray | None = None,
    alphas_relative: Sequence[float] = DEFAULT_RIDGE_ALPHAS,
    inner_folds: int | None = None,
    seed: int = 0,
) -> RidgeBaseline:
    """Fit ridge regression from ``source`` models' features to ``target`` models' features.

    Args:
        source, target: lists of (n, d) arrays (e.g. the vision models, the language models).
        rows: the training rows (default all).
        alphas_relative: α grid relative to tr(XᵀX) (= the number of source models, since each is
            scaled to unit Frobenius norm).
        inner_folds: None: α by efficient leave-one-out CV on the training rows (sklearn's
            ``RidgeCV`` default); an integer: by that many shuffled folds (``seed``).
    """
    from sklearn.model_selection import KFold

    if not source or not target:
        raise ValueError("the ridge baseline needs at least one source and one target model")
    rows = np.arange(source[0].shape[0]) if rows is None else np.asarray(rows)
    if rows.shape[0] < 3:
        raise ValueError(f"the ridge baseline needs at least 3 training rows, got {rows.shape[0]}")
    grid = np.asarray(alphas_relative, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all(grid > 0):
        raise ValueError(f"alphas_relative must be positive numbers, got {alphas_relative!r}")
    x, source_means, source_scales = _standardise(source, rows)
    y, target_means, target_scales = _standardise(target, rows)
    trace = float(len(source))  # each model block has unit Frobenius norm
    cv = None
    if inner_folds is not None:
        if not 2 <= inner_folds <= rows.shape[0]:
            raise ValueError(
                f"inner_folds must be in 2..{rows.shape[0]} (training rows) or None, got "
                f"{inner_folds}"
            )
        cv = KFold(n_splits=int(inner_folds), shuffle=True, random_state=seed)
    model = fit_ridge_cv(x, y, grid * trace, cv=cv)
    alpha = model.alpha
    relative = alpha / trace
    return RidgeBaseline(
        source_means=source_means,
        source_scales=source_scales,
        target_means=target_means,
        target_scales=target_scales,
        model=model,
        alpha=alpha,
        alpha_relative=relative,
        # the grid point RidgeCV chose (alpha is one of grid * trace, up to rounding)
        at_grid_edge=int(np.argmin(np.abs(np.log(grid) - np.log(relative)))) in (
            int(np.argmin(grid)), int(np.argmax(grid))
        ),
    )


# ----------------------------------------------------------------------------------------------
# k-fold retrieval


@dataclass(frozen=True)
class RetrievalFold:
    """One fold's held-out rows and their positions in that fold's universal space.

    ``test`` (n_test,) row indices; ``query`` / ``gallery`` (n_test, p): the mean mapped rows of
    the query / gallery modality's models, row i = stimulus ``test[i]``.
    """

    fold: int
    test: np.ndarray
    query: np.ndarray
    gallery: np.ndarray


@dataclass(frozen=True)
class CrossValidatedRetrieval:
    """Result of :func:`cross_validated_retrieval`.

    Attributes:
        table: long table, one row per fold × method × direction × subset × metric: ``fold``,
            ``method`` (universal | ridge | chance), ``direction`` (``<query>_to_<gallery>`` or
            back), ``subset`` (all | low_dispersion | high_dispersion), ``n_gallery``, ``metric``
            (recall_at_k, median_rank), ``value``.
        ranks: per held-out stimulus (subset ``all``): ``stimulus``, ``id``, ``fold``, ``method``,
            ``direction``, ``rank``, ``n_gallery``.
        baseline: per fold: ``fold``, ``alpha``, ``alpha_relative``, ``alpha_at_grid_edge`` (empty
            without the baseline).
        folds: the held-out rows and universal-space positions of each fold.
        parameters: the settings (folds, seed, similarity, modalities, members, ks, …).
    """

    table: pd.DataFrame
    ranks: pd.DataFrame
    baseline: pd.DataFrame
    folds: tuple[RetrievalFold, ...]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def forward(self) -> str:
        """Direction name of query → gallery (e.g. ``vision_to_language``: image → text)."""
        return f"{self.parameters['query_modality']}_to_{self.parameters['gallery_modality']}"

    @property
    def backward(self) -> str:
        return f"{self.parameters['gallery_modality']}_to_{self.parameters['query_modality']}"

    def summary(self) -> pd.DataFrame:
        """:func:`summarise_retrieval` of :attr:`table`."""
        return summarise_retrieval(self.table)

    def rank_of(self, stimulus: int, *, backward: bool = False) -> tuple[int, int, int]:
        """(rank of the true match, gallery size, fold) of ``stimulus`` through the universal
        space, image → text (``backward``: text → image)."""
        direction = self.backward if backward else self.forward
        row = self.ranks[
            (self.ranks["stimulus"] == stimulus)
            & (self.ranks["method"] == "universal")
            & (self.ranks["direction"] == direction)
        ]
        if row.empty:
            raise ValueError(f"stimulus {stimulus} is in no fold; pass a row of the run")
        return int(row["rank"].iloc[0]), int(row["n_gallery"].iloc[0]), int(row["fold"].iloc[0])

    def top_matches(
        self,
        stimulus: int,
        k: int = 5,
        *,
        backward: bool = False,
        ids: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The k best items of ``stimulus``'s query among its fold's held-out gallery.

        Returns rows ``rank`` (1 = best), ``stimulus``, ``id`` (if ``ids``), ``label`` (if
        ``labels``, e.g. each stimulus's first caption), ``score`` (cosine similarity, or
        Euclidean distance), ``true_match``; plus, if the true match is not among the k, one more
        row for it with its rank. The true match sits at its recorded rank (:meth:`rank_of`),
        which counts a tie against it: items that score as well as it are listed before it.
        """
        for fold in self.folds:
            position = np.flatnonzero(fold.test == stimulus)
            if position.size:
                break
        else:
            raise ValueError(f"stimulus {stimulus} is in no fold; pass a row of the run")
        queries, gallery = (fold.gallery, fold.query) if backward else (fold.query, fold.gallery)
        similarity = self.parameters["similarity"]
        k = min(int(k), gallery.shape[0])
        # one more than asked, so that k others remain when the true match is taken out
        fetch = min(k + 1, gallery.shape[0])
        indices, scores = top_matches(queries[position], gallery, fetch, similarity=similarity)
        others = [
            (int(item), float(score))
            for item, score in zip(fold.test[indices[0]], scores[0], strict=True)
            if item != stimulus
        ][:k]
        rank, _, _ = self.rank_of(stimulus, backward=backward)
        own = _Scorer(gallery, similarity)(queries[position])[0, position[0]]
        if similarity == "euclidean":
            own = float(np.sqrt(max(-own, 0.0)))
        listed = others[: rank - 1] + [(int(stimulus), float(own))] + others[rank - 1 :]
        rows = [(place, *item) for place, item in enumerate(listed[:k], start=1)]
        if rank > k:
            rows.append((rank, int(stimulus), float(own)))
        frame = pd.DataFrame(rows, columns=["rank", "stimulus", "score"])
        frame["stimulus"] = frame["stimulus"].astype(np.int64)
        if ids is not None:
            frame.insert(2, "id", [str(ids[s]) for s in frame["stimulus"]])
        if labels is not None:
            frame.insert(
                frame.columns.get_loc("score"), "label", [str(labels[s]) for s in frame["stimulus"]]
            )
        frame["true_match"] = frame["stimulus"] == stimulus
        return frame


def summarise_retrieval(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1) over folds of every method × direction × subset ×
    metric, with ``n_folds`` and the mean ``n_gallery``; long format (``metric``, ``mean``,
    ``std``)."""
    keys = ["method", "direction", "subset", "metric"]
    grouped = table.groupby(keys, sort=False)
    summary = grouped["value"].agg(mean="mean", std="std", n_folds="count").reset_index()
    summary["n_gallery_mean"] = grouped["n_gallery"].mean().to_numpy()
    return summary


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The methods side by side: one row per direction × subset × metric, columns ``universal``,
    ``universal_sd``, ``ridge``, ``ridge_sd``, ``chance`` (means and s.d. over folds; a method
    that was not scored is absent), ``n_gallery_mean``. ``summary``: :func:`summarise_retrieval`."""
    keys = ["direction", "subset", "metric"]
    wide = summary.pivot_table(index=keys, columns="method", values="mean", sort=False)
    spread = summary.pivot_table(index=keys, columns="method", values="std", sort=False)
    out = pd.DataFrame(index=wide.index)
    for method in METHODS:
        if method in wide.columns:
            out[method] = wide[method]
            if method != "chance":
                out[f"{method}_sd"] = spread[method]
    out["n_gallery_mean"] = summary.groupby(keys, sort=False)["n_gallery_mean"].first()
    return out.reset_index()


def paired_recall_test(ranks: pd.DataFrame, k: int = 1) -> pd.DataFrame:
    """Universal space vs ridge baseline on the same held-out queries: exact McNemar test of
    recall@k, per direction.

    ``ranks``: :attr:`CrossValidatedRetrieval.ranks` (both methods). Each query counts once;
    ``universal_only`` / ``ridge_only``: queries whose true item only that method ranks ≤ k; the
    two-sided p-value is the exact binomial test of ``universal_only`` among the discordant
    queries at 1/2 (1.0 when there are none). Returns ``direction``, ``k``, ``n_queries``,
    ``both``, ``universal_only``, ``ridge_only``, ``neither``, ``p_value``.
    """
    from scipy.stats import binomtest  # here: scipy.stats is slow to import

    rows = []
    for direction, group in ranks.groupby("direction", sort=False):
        hits = group.pivot_table(index="stimulus", columns="method", values="rank") <= k
        if not {"universal", "ridge"} <= set(hits.columns):
            continue
        universal, ridge = hits["universal"].to_numpy(), hits["ridge"].to_numpy()
        universal_only = int(np.sum(universal & ~ridge))
        ridge_only = int(np.sum(~universal & ridge))
        discordant = universal_only + ridge_only
        rows.append(
            {
                "direction": direction,
                "k": int(k),
                "n_queries": int(universal.shape[0]),
                "both": int(np.sum(universal & ridge)),
                "universal_only": universal_only,
                "ridge_only": ridge_only,
                "neither": int(np.sum(~universal & ~ridge)),
                "p_value": float(binomtest(universal_only, discordant).pvalue)
                if discordant
                else 1.0,
            }
        )
    return pd.DataFrame(rows)


def _strata_subsets(test: np.ndarray, strata: np.ndarray) -> dict[str, np.ndarray]:
    """Positions (within ``test``) of the lowest and highest third of ``strata[test]``."""
    size = test.shape[0] // 3
    order = np.lexsort((test, strata[test]))  # by score, ties to the lower row
    return {"low_dispersion": np.sort(order[:size]), "high_dispersion": np.sort(order[-size:])}


def cross_validated_retrieval(
    features: Sequence[np.ndarray],
    members: Sequence[Member],
    *,
    query_modality: str = "vision",
    gallery_modality: str = "language",
    n_folds: int = 5,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    similarity: str = "cosine",
    n_components: int | None = None,
    strata: np.ndarray | None = None,
    strata_name: str = "strata",
    ridge: bool = True,
    ridge_alphas: Sequence[float] = DEFAULT_RIDGE_ALPHAS,
    inner_folds: int | None = None,
    ids: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CrossValidatedRetrieval:
    """k-fold retrieval between two modalities through the universal space (module docstring).

    Args:
        features: M arrays (n, d_i) of the same stimuli; members: their :class:`Member` s. Every
            member shapes the space; the query / gallery modalities must each have ≥ 1 member.
        query_modality, gallery_modality: e.g. ``"vision"`` (images) and ``"language"`` (captions).
        n_folds: folds (≥ 2); every fold's held-out set needs ≥ 2 stimuli (≥ 6 with ``strata``).
        seed: shuffles the folds (and the inner folds of the baseline).
        ks: recall cut-offs; similarity: ``"cosine"`` or ``"euclidean"``.
        n_components: principal axes kept per model (:func:`universal.fit_universal_space`).
        strata: optional (n,) per-stimulus score (e.g. vision dispersion) for the low/high thirds.
        ridge: also score the ridge baseline (query features → gallery features).
        ids: n stimulus ids for the ``ranks`` table (default the row numbers as text).
        progress: ``progress(done, n_folds)`` after each fold (a fold fits a universal space:
            minutes on a run of 10,000 stimuli).
    """
    from sklearn.model_selection import KFold

    members = _check_members(members)
    _check_similarity(similarity)
    ks = _check_ks(ks)
    if len(features) != len(members):
        raise ValueError(f"got {len(features)} feature arrays for {len(members)} members")
    modalities = list(dict.fromkeys(m.modality for m in members))
    for role, modality in (("query", query_modality), ("gallery", gallery_modality)):
        if modality not in modalities:
            raise ValueError(
                f"the {role} modality {modality!r} has no model among the members (modalities: "
                f"{modalities}); add one of its models or pick another modality"
            )
    if query_modality == gallery_modality:
        raise ValueError(f"query and gallery modality are both {query_modality!r}; pick two")
    rows = [int(np.shape(x)[0]) for x in features]
    if len(set(rows)) != 1:  # a fold's rows index every member: checked before any fit
        raise ValueError(
            f"every member must embed the same stimuli, but the row counts differ ({rows}); "
            "select the same rows from each"
        )
    n = rows[0]
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    minimum_test = 6 if strata is not None else 2
    if n // n_folds < minimum_test:
        why = " (a third of them per subset)" if strata is not None else ""
        fix = (
            f"use at most {n // minimum_test} folds, or more stimuli" if n // minimum_test >= 2
            else f"held-out retrieval needs at least {2 * minimum_test} stimuli (2 folds)"
        )
        raise ValueError(
            f"{n} stimuli in {n_folds} folds leave {n // n_folds} held-out "
            f"{'stimulus' if n // n_folds == 1 else 'stimuli'} per fold; "
            f"at least {minimum_test} are needed{why}: {fix}"
        )
    if strata is not None:
        strata = np.asarray(strata, dtype=np.float64).reshape(-1)
        if strata.shape[0] != n or not np.isfinite(strata).all():
            raise ValueError(
                f"strata must be {n} finite per-stimulus scores, got shape {strata.shape}"
            )
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} stimuli; pass one id per row")
    query_index = [i for i, m in enumerate(members) if m.modality == query_modality]
    gallery_index = [i for i, m in enumerate(members) if m.modality == gallery_modality]
    forward = f"{query_modality}_to_{gallery_modality}"
    backward = f"{gallery_modality}_to_{query_modality}"

    table_rows: list[dict[str, Any]] = []
    rank_tables: list[pd.DataFrame] = []
    baseline_rows: list[dict[str, Any]] = []
    folds: list[RetrievalFold] = []

    def score_fold(
        fold: int,
        method: str,
        query: np.ndarray,
        gallery: np.ndarray,
        test: np.ndarray,
        subsets: dict[str, np.ndarray],
    ) -> None:
        for direction, (q, g) in ((forward, (query, gallery)), (backward, (gallery, query))):
            for subset, positions in subsets.items():
                ranks = retrieval_ranks(q[positions], g[positions], similarity=similarity)
                for metric, value in retrieval_metrics(ranks, ks).items():
                    table_rows.append(
                        {
                            "fold": fold,
                            "method": method,
                            "direction": direction,
                            "subset": subset,
                            "n_gallery": int(positions.shape[0]),
                            "metric": metric,
                            "value": value,
                        }
                    )
                if subset == "all":
                    rank_tables.append(
                        pd.DataFrame(
                            {
                                "stimulus": test,
                                "id": [ids[s] for s in test],
                                "fold": fold,
                                "method": method,
                                "direction": direction,
                                "rank": ranks,
                                "n_gallery": int(positions.shape[0]),
                            }
                        )
                    )

    splitter = KFold(n_splits=int(n_folds), shuffle=True, random_state=seed)
    for fold, (train, test) in enumerate(splitter.split(np.arange(n))):
        subsets = {"all": np.arange(test.shape[0])}
        if strata is not None:
            subsets.update(_strata_subsets(test, strata))
        fit = fit_universal_space([x[train] for x in features], members, n_components=n_components)
        mapped = [fit.transform(i, features[i][test]) for i in query_index + gallery_index]
        means = modality_means(mapped, [members[i] for i in query_index + gallery_index])
        query, gallery = means[query_modality], means[gallery_modality]
        folds.append(RetrievalFold(fold=fold, test=test, query=query, gallery=gallery))
        score_fold(fold, "universal", query, gallery, test, subsets)
        if ridge:
            baseline = fit_ridge_baseline(
                [features[i] for i in query_index],
                [features[i] for i in gallery_index],
                rows=train,
                alphas_relative=ridge_alphas,
                inner_folds=inner_folds,
                seed=seed,
            )
            predicted = baseline.predict([features[i] for i in query_index], test)
            actual = baseline.targets([features[i] for i in gallery_index], test)
            score_fold(fold, "ridge", predicted, actual, test, subsets)
            baseline_rows.append(
                {
                    "fold": fold,
                    "alpha": baseline.alpha,
                    "alpha_relative": baseline.alpha_relative,
                    "alpha_at_grid_edge": baseline.at_grid_edge,
                }
            )
        for direction in (forward, backward):
            for subset, positions in subsets.items():
                for metric, value in chance_metrics(int(positions.shape[0]), ks).items():
                    table_rows.append(
                        {
                            "fold": fold,
                            "method": "chance",
                            "direction": direction,
                            "subset": subset,
                            "n_gallery": int(positions.shape[0]),
                            "metric": metric,
                            "value": value,
                        }
                    )
        if progress is not None:
            progress(fold + 1, int(n_folds))
    parameters = {
        "n_folds": int(n_folds),
        "seed": int(seed),
        "ks": list(ks),
        "similarity": similarity,
        "n_components": n_components,
        "query_modality": query_modality,
        "gallery_modality": gallery_modality,
        "members": [m._asdict() for m in members],
        "strata": strata_name if strata is not None else None,
        "ridge": bool(ridge),
        "ridge_alphas_relative": [float(a) for a in ridge_alphas],
        "inner_folds": inner_folds,
        "n_stimuli": n,
    }
    return CrossValidatedRetrieval(
        table=pd.DataFrame(table_rows),
        ranks=pd.concat(rank_tables, ignore_index=True),
        baseline=pd.DataFrame(
            baseline_rows, columns=["fold", "alpha", "alpha_relative", "alpha_at_grid_edge"]
        ),
        folds=tuple(folds),
        parameters=parameters,
    )


def run_retrieval(
    run: Run,
    models: Sequence[str] | None = None,
    *,
    layers: dict[str, str] | None = None,
    score: str = "mean",
    query_modality: str = "vision",
    gallery_modality: str = "language",
    n_folds: int = 5,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    similarity: str = "cosine",
    n_components: int | None = None,
    ridge: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> CrossValidatedRetrieval:
    """:func:`cross_validated_retrieval` of a run's ``models`` (default all, default layers), with
    low/high thirds by the run's intra-modal dispersion ``run.dispersion[score]`` (GPA);
    ``progress(done, n_folds)`` after each fold."""
    check_score(score)
    members = run_members(run, models, layers)
    return cross_validated_retrieval(
        run_features(run, members),
        members,
        query_modality=query_modality,
        gallery_modality=gallery_modality,
        n_folds=n_folds,
        seed=seed,
        ks=ks,
        similarity=similarity,
        n_components=n_components,
        strata=run.dispersion[score].to_numpy(dtype=np.float64),
        strata_name=dispersion_name(run, score),
        ridge=ridge,
        ids=run.stimuli["id"].astype(str).tolist(),
        progress=progress,
    )
