"""Blind matching (Maniparambil et al., paper 003): recover which caption belongs to which image
from the two unpaired sets alone, by the permutation that maximises CKA — a seeded quadratic
assignment problem.

Given image features X (s, d_x) and caption features Y (s, d_y) whose true pairing is known to us
(``truth[i]`` = the caption row of image i; the identity by default) but not to the solver:

1. *Stretch* each feature by its standard deviation over the set (the paper's S = diag(1/std)),
   form linear kernels, center them (H K H) and scale each to unit Frobenius norm, so that
   trace(K̄_X P K̄_Y Pᵀ) is the CKA of the images against the permuted captions.
2. Give the solver a few *seed* pairs (``n_seeds``; chosen by k-means on the images, the sample
   nearest each centre, as the paper does, or at random) and hide the rest of the pairing by a
   seeded shuffle of the caption rows.
3. Maximise with scipy's Fast Approximate QAP (``quadratic_assignment(method="faq",
   partial_match=seeds, maximize=True)``), best of ``n_init`` starts (the barycenter first, then
   randomized ones).
4. Report the fraction of the non-seed images matched to their own caption (chance: 1/(s − m)).

Dense (s, s) kernels and an O(s³) solver: for the sets of a lab or a report (hundreds to a few
thousand stimuli; ``max_stimuli`` guards the size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import cka
from .validation import check_features, check_pair

#: The largest set :func:`blind_matching` matches by default (dense (s, s) kernels, O(s³) solver)
MAX_STIMULI = 3000


def check_set_size(s: int, max_stimuli: int | None = None) -> None:
    """ValueError naming the fix if a set of ``s`` stimuli is above ``max_stimuli`` (default
    :data:`MAX_STIMULI`): callers check before choosing seeds (k-means on the whole set)."""
    limit = MAX_STIMULI if max_stimuli is None else max_stimuli
    if s > limit:
        raise ValueError(
            f"{s} stimuli: blind matching forms dense ({s}, {s}) kernels and an O(s³) solver; match "
            f"a set of at most {limit} (or raise max_stimuli knowingly)."
        )


@dataclass(frozen=True)
class MatchingResult:
    """Outcome of :func:`blind_matching`.

    ``matching[i]`` is the caption row the solver gave image i; ``correct`` (s,) whether it is
    image i's own; ``accuracy`` the fraction correct among the ``n_query`` non-seed images;
    ``chance`` = 1 / n_query; ``seeds`` the image rows given as known pairs; ``cka_true`` and
    ``cka_found`` the CKA (stretched features) of the true and the found pairing.
    """

    accuracy: float
    chance: float
    n_query: int
    n_seeds: int
    seeds: np.ndarray
    matching: np.ndarray
    correct: np.ndarray
    cka_true: float
    cka_found: float


def stretch(F: np.ndarray) -> np.ndarray:
    """Divide each feature by its standard deviation over the rows (constant features: by 1).

    A constant column whose value is not representable (0.1) has a standard deviation of a few
    ulps of its value, not 0: it counts as constant too, rather than blown up ~1e15 times."""
    sd = F.std(axis=0)
    eps = np.finfo(np.result_type(F.dtype, np.float32)).eps
    varying = sd > 16 * eps * np.abs(F.mean(axis=0))
    return F / np.where(varying & (sd > 0), sd, 1.0)


def normalised_centered_kernel(F: np.ndarray) -> np.ndarray:
    """(s, s) H F Fᵀ H / ‖H F Fᵀ H‖_F (the paper's K̄)."""
    centered = F - F.mean(axis=0)
    K = centered @ centered.T
    norm = np.linalg.norm(K)
    if norm == 0:
        raise ValueError("the features do not vary over the set; there is nothing to match.")
    return K / norm


def choose_seeds(X: np.ndarray, n_seeds: int, *, how: str = "kmeans", seed: int = 0) -> np.ndarray:
    """(n_seeds,) distinct image rows: nearest to each k-means centre, or drawn at random."""
    s = X.shape[0]
    rng = np.random.default_rng(int(seed))
    if how == "random":
        return np.sort(rng.choice(s, n_seeds, replace=False))
    if how != "kmeans":
        raise ValueError(f"seed selection must be 'kmeans' or 'random', got {how!r}.")
    from sklearn.cluster import KMeans

    centres = KMeans(n_clusters=n_seeds, n_init=4, random_state=int(seed)).fit(X).cluster_centers_
    chosen: list[int] = []
    for centre in centres:
        order = np.argsort(np.sum((X - centre) ** 2, axis=1), kind="stable")
        chosen.append(int(next(i for i in order if i not in chosen)))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def image_seeds(
    X: object,
    n_seeds: int,
    *,
    how: str = "kmeans",
    seed: int = 0,
    stretch_features: bool = True,
) -> np.ndarray:
    """(n_seeds,) the known pairs :func:`blind_matching` chooses for images X (s, d) with these
    options (:func:`choose_seeds` on the stretched features); passing them as its ``seeds`` gives
    the same result. For one image set matched against many caption sets: choose them once."""
    X = check_features(X, "X", min_rows=3)
    s = X.shape[0]
    if (
        isinstance(n_seeds, bool)
        or not isinstance(n_seeds, (int, np.integer))
        or not 0 <= n_seeds <= s - 2
    ):
        raise ValueError(
            f"n_seeds must be an integer in 0..{s - 2} (two or more left to match), got "
            f"{n_seeds!r}."
        )
    if not n_seeds:
        return np.empty(0, dtype=np.int64)
    return choose_seeds(stretch(X) if stretch_features else X, int(n_seeds), how=how, seed=seed)


def blind_matching(
    X: object,
    Y: object,
    *,
    truth: object = None,
    n_seeds: int = 10,
    seeds: object = None,
    seed_selection: str = "kmeans",
    stretch_features: bool = True,
    n_init: int = 1,
    maxiter: int = 30,
    seed: int = 0,
    max_stimuli: int | None = None,
) -> MatchingResult:
    """Match images X (s, d_x) to captions Y (s, d_y) by maximising CKA (see the module doc).

    Args:
        X, Y: the two sets, equal size s.
        truth: (s,) ``truth[i]`` = the caption row of image i (a permutation; default identity).
        n_seeds: known pairs given to the solver (ignored when ``seeds`` is given).
        seeds: explicit image rows to give as known pairs.
        seed_selection: "kmeans" (the paper's) or "random".
        stretch_features: divide each feature by its std first (the paper's stretching).
        n_init: solver starts (barycenter, then randomized); the best objective is kept.
        maxiter: Frank–Wolfe iterations per start.
        seed: integer seed of the hidden shuffle, the seed choice and the randomized starts.
        max_stimuli: refuse larger sets (dense (s, s) kernels, O(s³) solver; None:
            :data:`MAX_STIMULI`).
    """
    from scipy.optimize import quadratic_assignment

    X, Y = check_pair(X, Y, min_rows=3)
    s = X.shape[0]
    check_set_size(s, max_stimuli)
    truth = np.arange(s) if truth is None else np.asarray(truth)
    if truth.shape != (s,) or not np.array_equal(np.sort(truth), np.arange(s)):
        raise ValueError(
            f"truth must be a permutation of 0..{s - 1}: the caption row of each image."
        )
    Xs = stretch(X) if stretch_features else X
    Ys = stretch(Y) if stretch_features else Y
    if seeds is None:
        seeds = image_seeds(
            X, n_seeds, how=seed_selection, seed=seed, stretch_features=stretch_features
        )
    else:
        seeds = np.unique(np.asarray(seeds, dtype=np.int64))
        if seeds.size > s - 2 or (seeds.size and (seeds.min() < 0 or seeds.max() >= s)):
            raise ValueError(
                f"seeds must be distinct image rows in 0..{s - 1}, leaving two or more to match."
            )
    if isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}.")
    rng = np.random.default_rng(int(seed))
    hidden = rng.permutation(s)  # shuffled caption row r is caption hidden[r]
    position = np.argsort(hidden)  # caption c sits at shuffled row position[c]
    A = normalised_centered_kernel(Xs)
    B = normalised_centered_kernel(Ys[hidden])
    partial = np.column_stack([seeds, position[truth[seeds]]]) if seeds.size else None
    best = None
    for start in range(int(n_init)):
        options = {
            "maximize": True,
            "maxiter": int(maxiter),
            "P0": "barycenter" if start == 0 else "randomized",
            "rng": np.random.default_rng(int(rng.integers(2**31))),
        }
        if partial is not None:
            options["partial_match"] = partial
        result = quadratic_assignment(A, B, method="faq", options=options)
        if best is None or result.fun > best.fun:
            best = result
    matching = hidden[best.col_ind]
    correct = matching == truth
    query = np.ones(s, dtype=bool)
    query[seeds] = False
    n_query = int(query.sum())
    return MatchingResult(
        accuracy=float(correct[query].mean()),
        chance=1.0 / n_query,
        n_query=n_query,
        n_seeds=int(seeds.size),
        seeds=seeds,
        matching=matching,
        correct=correct,
        cka_true=cka(Xs, Ys[truth]),
        cka_found=cka(Xs, Ys[matching]),
    )
