"""Stimulus subsets chosen by dispersion: the lowest / highest / random sets of the paper's Fig. 2 and
the drop-a-fraction sets of Fig. S1, plus validation of user-given index sets.

All functions return int64 index arrays in ascending index order (a subset keeps the stimulus order,
so sub-matrices of cached Gram matrices stay in dataset order). Ties in the scores are broken by
index: among equal scores the lower index counts as the lower score.
"""

from __future__ import annotations

import numpy as np

from .validation import check_features

KINDS = ("low", "high", "random")
WHICH = ("high", "low")


def _check_scores(scores: object) -> np.ndarray:
    array = np.asarray(scores)
    if array.ndim != 1:
        raise ValueError(
            f"scores must be 1-D (one score per stimulus) but have shape {array.shape}; "
            "pass e.g. dispersion_scores(residuals)."
        )
    return check_features(array.reshape(-1, 1), "scores", min_rows=1)[:, 0]


def _check_size(size: object, available: int) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an integer number of stimuli, got {size!r}.")
    size = int(size)
    if size < 1 or size > available:
        raise ValueError(
            f"size={size} is out of range: only {available} stimuli are available; "
            f"pass 1 <= size <= {available}."
        )
    return size


def _rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorted by ascending score, ties by ascending index."""
    return np.argsort(scores, kind="stable")


def select_stimuli(
    scores: np.ndarray,
    kind: str = "low",
    size: int = 1,
    *,
    rng: None | int | np.random.Generator = None,
) -> np.ndarray:
    """Indices of ``size`` stimuli: the lowest scores, the highest, or a uniform random set.

    Args:
        scores: (m,) finite scores, e.g. dispersion per stimulus.
        kind: ``"low"``, ``"high"`` or ``"random"`` (uniform, without replacement).
        size: how many stimuli, 1 ≤ size ≤ m.
        rng: for ``"random"``: None (fresh entropy), an int seed, or a ``np.random.Generator``.

    Returns:
        (size,) int64 indices, ascending.
    """
    values = _check_scores(scores)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {list(KINDS)}.")
    size = _check_size(size, values.size)
    if kind == "random":
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        chosen = generator.choice(values.size, size=size, replace=False)
    elif kind == "low":
        chosen = _rank_order(values)[:size]
    else:
        chosen = _rank_order(-values)[:size]
    return np.sort(chosen).astype(np.int64)


def drop_fraction(scores: np.ndarray, q: float, which: str = "high") -> np.ndarray:
    """Indices of the stimuli that REMAIN after dropping the top or bottom fraction q.

    The number dropped is q·m rounded to the nearest integer, halves rounded up
    (``floor(q·m + 0.5)``); e.g. q=0.25 of m=1024 drops 256 and keeps 768.

    Args:
        scores: (m,) finite scores.
        q: fraction to drop, 0 ≤ q < 1.
        which: ``"high"`` drops the highest scores, ``"low"`` the lowest.

    Returns:
        (m − round(q·m),) int64 indices, ascending.
    """
    values = _check_scores(scores)
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; use 'high' (drop the highest) or 'low'.")
    if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not 0 <= q < 1:
        raise ValueError(f"q must be a fraction with 0 <= q < 1, got {q!r}; e.g. q=0.25 drops a quarter.")
    m = values.size
    n_drop = int(np.floor(q * m + 0.5))
    if n_drop >= m:
        raise ValueError(
            f"dropping round({q} * {m}) = {n_drop} stimuli would leave none; use a smaller q."
        )
    order = _rank_order(values) if which == "low" else _rank_order(-values)
    return np.sort(order[n_drop:]).astype(np.int64)


def check_indices(indices: object, n: int) -> np.ndarray:
    """Validate a subset of stimulus indices into a set of n stimuli.

    Rejects: non-integer dtypes (including boolean masks), not 1-D, empty, negative or ≥ n
    (no negative indexing), duplicates.

    Returns:
        The indices as an int64 array, order kept.
    """
    array = np.asarray(indices)
    if array.dtype == np.bool_:
        raise ValueError(
            "indices is a boolean mask; pass integer positions instead, e.g. np.flatnonzero(mask)."
        )
    if array.size == 0:
        raise ValueError("indices is empty; select at least one stimulus.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"indices must be integers, got dtype {array.dtype}; cast with np.asarray(x, dtype=int) "
            "if the values are whole numbers."
        )
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-D but have shape {array.shape}; flatten them with .ravel().")
    array = array.astype(np.int64)
    out_of_range = (array < 0) | (array >= n)
    if out_of_range.any():
        bad = array[out_of_range]
        raise ValueError(
            f"{bad.size} indices are outside 0..{n - 1} (e.g. {bad[:5].tolist()}); indices count "
            f"from 0 and negative indexing is not allowed; keep them in 0..{n - 1}."
        )
    unique, counts = np.unique(array, return_counts=True)
    if unique.size != array.size:
        repeated = unique[counts > 1]
        raise ValueError(
            f"{repeated.size} indices occur more than once (e.g. {repeated[:5].tolist()}); "
            "a subset lists each stimulus once: use np.unique(indices)."
        )
    return array
