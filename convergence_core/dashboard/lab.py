"""The Alignment lab's live numbers: CKNNA and mutual k-NN of many stimulus subsets at once.

The page recomputes, on every change of k or of the subset, CKNNA for every vision × language pair
on the chosen sets, on ``n_random`` random sets (the baseline distribution) and on the
``2 · n_permutations`` relabelled sets of the low-vs-high permutation test. Calling
``neighbours.cknna_from_gram`` once per subset would take seconds; here all subsets of one size are
stacked into a (B, s, s) array and processed together, and each model's k-NN mask is computed once
and shared by every pair that model is in.

The numbers are those of ``neighbours.cknna_from_gram`` / ``mutual_knn_from_gram`` on each subset
(tests check this), and the random draws and label shuffles are the ones
``analyses.dispersion_set_alignment`` makes for the same seed, so the lab and the paper's Fig. 2
analysis agree exactly.

Shapes: ``n`` stimuli in the run, ``B`` subsets of ``s`` stimuli each; Grams are (n, n) inner
products of prepared features (unitless).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..subsets import select_stimuli

#: Upper bound on elements of one stacked (chunk, s, s) array, to bound memory (~32 MB float64).
_CHUNK_ELEMENTS = 4_000_000
#: Added to the CKNNA denominator, as in Huh et al.'s reference implementation.
_CKNNA_EPS = 1e-6
#: Relative tolerance for counting a permuted difference as extreme as the observed (see stats.py).
_TIE_TOLERANCE = 1e-12


class Pair(NamedTuple):
    """One vision × language comparison: a model and a layer on each side (hashable, a tuple)."""

    vision_model: str
    vision_layer: str
    language_model: str
    language_layer: str

    @property
    def label(self) -> str:
        return f"{self.vision_model} × {self.language_model}"


def check_subset_for_k(size: int, k: int, what: str) -> None:
    """ValueError in words when ``k`` neighbours cannot be taken inside a subset of ``size``."""
    if size < 4:
        raise ValueError(
            f"{what} has {size} stimuli; CKNNA needs at least 4 (and more than k): "
            "choose more stimuli"
        )
    if not 1 <= k < size:
        raise ValueError(
            f"k={k} is too large for {what} of {size} stimuli: each stimulus needs k other stimuli "
            f"as neighbours; use k <= {size - 1} or a larger set"
        )


def _stack(gram: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
    """(B, s, s) float64 sub-Grams ``gram[subset][:, subset]``, the diagonal set to -inf.

    ``flat_index`` (B, s, s) holds ``subset[i] * n + subset[j]`` (shared by every model).
    The diagonal is -inf so a stimulus is never its own neighbour; it is never read otherwise.
    """
    blocks = np.take(np.asarray(gram, dtype=np.float64).ravel(), flat_index)
    diagonal = np.arange(blocks.shape[-1])
    blocks[:, diagonal, diagonal] = -np.inf
    return blocks


def _knn_mask(blocks: np.ndarray, k: int) -> np.ndarray:
    """(B, s, s) bool: True at (b, i, j) when j is among the k most similar others of i in block b.

    Fast path: compare with each row's k-th largest value (one ``np.partition``). A row with
    exactly tied values at the threshold would get more than k neighbours; such blocks are redone
    with ``argpartition``, which keeps exactly k (ties broken arbitrarily, as the reference does).
    """
    s = blocks.shape[-1]
    threshold = np.partition(blocks, s - k, axis=-1)[..., s - k : s - k + 1]
    mask = blocks >= threshold
    tied = np.flatnonzero((mask.sum(axis=-1) != k).any(axis=-1))
    if tied.size:
        neighbours = np.argpartition(-blocks[tied], k - 1, axis=-1)[..., :k]
        exact = np.zeros((tied.size, s, s), dtype=bool)
        np.put_along_axis(exact, neighbours, True, axis=-1)
        mask[tied] = exact
    return mask


def _hsic_unbiased_sparse(
    n_blocks: int,
    s: int,
    position: np.ndarray,
    transposed: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    b_transposed: np.ndarray,
) -> np.ndarray:
    """(n_blocks,) unbiased HSIC (Song et al. 2012) of masked kernels A, B given by their entries.

    A and B are (s, s) per block, zero outside a common support of off-diagonal entries, listed as
    flat positions ``position`` = block·s² + i·s + j with ``transposed`` = block·s² + j·s + i.
    ``a``, ``b`` are A_ij, B_ij there; ``b_transposed`` is B_ji (0 where (j, i) is not in the
    support). Every sum is a float64 ``bincount``: O(entries), not O(s²) per block.

        HSIC = [tr(A B) + ΣA·ΣB / ((m-1)(m-2)) - 2·Σ_j colsum(A)_j rowsum(B)_j / (m-2)] / (m(m-3))
    """
    m = s
    block = position // (s * s)
    trace_term = np.bincount(block, weights=a * b_transposed, minlength=n_blocks)
    sums_term = (
        np.bincount(block, weights=a, minlength=n_blocks)
        * np.bincount(block, weights=b, minlength=n_blocks)
        / ((m - 1) * (m - 2))
    )
    column_sums_a = np.bincount(
        transposed // s, weights=a, minlength=n_blocks * s
    )  # at block·s + j
    row_sums_b = np.bincount(position // s, weights=b, minlength=n_blocks * s)  # at block·s + i
    cross_term = 2.0 * (column_sums_a * row_sums_b).reshape(n_blocks, s).sum(axis=1) / (m - 2)
    return (trace_term + sums_term - cross_term) / (m * (m - 3))


class _Side(NamedTuple):
    """One model's k-NN graph on a chunk of subsets, as flat entry lists."""

    values: np.ndarray  # (B·s·s,) sub-Gram entries, flat
    mask: np.ndarray  # (B·s·s,) bool, flat: j among the k nearest of i
    position: np.ndarray  # (E,) flat positions of the mask's True entries (E = B·s·k)
    transposed: np.ndarray  # (E,) the (j, i) position of each entry
    self_similarity: np.ndarray  # (B,) HSIC of the masked kernel with itself


def _side(gram: np.ndarray, flat_index: np.ndarray, k: int) -> _Side:
    n_blocks, s, _ = flat_index.shape
    blocks = _stack(gram, flat_index)
    mask = _knn_mask(blocks, k).ravel()
    values = blocks.ravel()
    position = np.flatnonzero(mask)
    within = position % (s * s)
    transposed = position - within + (within % s) * s + within // s
    a = values[position]
    a_transposed = np.where(mask[transposed], values[transposed], 0.0)
    similarity = _hsic_unbiased_sparse(n_blocks, s, position, transposed, a, a, a_transposed)
    return _Side(values, mask, position, transposed, similarity)


def _pair_similarity(x: _Side, y: _Side, n_blocks: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(HSIC of the mutual-neighbour kernels (B,), mutual neighbour count (B,))."""
    mutual = y.mask[x.position]
    position, transposed = x.position[mutual], x.transposed[mutual]
    in_support_transposed = x.mask[transposed] & y.mask[transposed]
    b_transposed = np.where(in_support_transposed, y.values[transposed], 0.0)
    similarity = _hsic_unbiased_sparse(
        n_blocks, s, position, transposed, x.values[position], y.values[position], b_transposed
    )
    counts = np.bincount(position // (s * s), minlength=n_blocks)
    return similarity, counts


def subset_alignment(
    grams: Mapping[tuple[str, str], np.ndarray],
    pairs: Sequence[Pair],
    subsets: np.ndarray,
    k: int,
) -> dict[Pair, tuple[np.ndarray, np.ndarray]]:
    """CKNNA and mutual k-NN of every pair on every subset.

    Args:
        grams: ``{(model, layer): (n, n) Gram}`` holding every model/layer named in ``pairs``.
        pairs: the vision × language pairs.
        subsets: (B, s) int row indices; each row is one subset of distinct stimuli.
        k: neighbours per stimulus, 1 <= k < s.

    Returns:
        ``{pair: (cknna (B,), mutual_knn (B,))}``, float64.
    """
    subsets = np.asarray(subsets, dtype=np.intp)
    if subsets.ndim != 2 or subsets.shape[0] == 0:
        raise ValueError(
            f"subsets must be a non-empty (B, s) array of row indices, got shape {subsets.shape}"
        )
    n_sets, s = subsets.shape
    check_subset_for_k(s, k, "each subset")
    results = {pair: (np.empty(n_sets), np.empty(n_sets)) for pair in pairs}
    sides = list(
        dict.fromkeys(
            side
            for pair in pairs
            for side in (
                (pair.vision_model, pair.vision_layer),
                (pair.language_model, pair.language_layer),
            )
        )
    )
    chunk = max(1, _CHUNK_ELEMENTS // (s * s))
    n = next(iter(grams.values())).shape[0]
    for start in range(0, n_sets, chunk):
        block = subsets[start : start + chunk]
        stop = start + block.shape[0]
        flat_index = block[:, :, None] * n + block[:, None, :]
        graphs = {side: _side(grams[side], flat_index, k) for side in sides}
        for pair in pairs:
            x = graphs[(pair.vision_model, pair.vision_layer)]
            y = graphs[(pair.language_model, pair.language_layer)]
            similarity, counts = _pair_similarity(x, y, block.shape[0], s)
            cknna_values, mknn_values = results[pair]
            cknna_values[start:stop] = similarity / (
                np.sqrt(x.self_similarity * y.self_similarity) + _CKNNA_EPS
            )
            mknn_values[start:stop] = counts / (s * k)
    return results


def random_subsets(scores: np.ndarray, size: int, n_random: int, seed: int) -> np.ndarray:
    """(n_random, size) random subsets: the draws ``analyses.dispersion_set_alignment`` makes."""
    random_seed, _ = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(random_seed)
    return np.stack(
        [
            np.asarray(select_stimuli(scores, "random", size, rng=rng), dtype=np.intp)
            for _ in range(n_random)
        ]
    )


def permuted_splits(
    low: np.ndarray, high: np.ndarray, n_permutations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The relabelled (first, second) sets of the permutation test, each (n_permutations, s).

    The same shuffles as ``stats.permutation_test_two_sets`` with the generator
    ``analyses.dispersion_set_alignment`` gives it for ``seed``.
    """
    _, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(permutation_seed)
    pool = np.concatenate([np.asarray(low, dtype=np.intp), np.asarray(high, dtype=np.intp)])
    size = len(low)
    shuffled = np.stack([pool[rng.permutation(pool.shape[0])] for _ in range(n_permutations)])
    return shuffled[:, :size], shuffled[:, size:]


def permutation_p_values(observed: float, null: np.ndarray) -> tuple[float, float]:
    """(two-sided, first-greater) permutation p-values with the +1 correction."""
    tolerance = _TIE_TOLERANCE * max(1.0, abs(observed))
    n = null.shape[0]
    two_sided = (1 + int(np.count_nonzero(np.abs(null) >= abs(observed) - tolerance))) / (n + 1)
    greater = (1 + int(np.count_nonzero(null >= observed - tolerance))) / (n + 1)
    return two_sided, greater


def baseline_table(
    grams: Mapping[tuple[str, str], np.ndarray],
    pairs: Sequence[Pair],
    scores: np.ndarray,
    size: int,
    k: int,
    *,
    n_random: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Random-subset baseline per pair: CKNNA and mutual k-NN mean and 95% percentile interval.

    Returns one row per pair: ``vision_model``, ``vision_layer``, ``language_model``,
    ``language_layer``, ``set_size``, ``k``, ``n_random``, ``cknna_random_mean``,
    ``cknna_random_lower_95``, ``cknna_random_upper_95``, ``mutual_knn_random_mean``,
    ``mutual_knn_random_lower_95``, ``mutual_knn_random_upper_95``.
    """
    from ..stats import (
        percentile_interval,
    )  # here: scipy's import would slow every page's first run

    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}; use e.g. 200")
    values = subset_alignment(grams, pairs, random_subsets(scores, size, n_random, seed), k)
    rows = []
    for pair in pairs:
        cknna_values, mknn_values = values[pair]
        row = {**_pair_columns(pair), "set_size": int(size), "k": int(k), "n_random": int(n_random)}
        for name, array in (("cknna", cknna_values), ("mutual_knn", mknn_values)):
            lower, upper = percentile_interval(array, 0.95)
            row[f"{name}_random_mean"] = float(array.mean())
            row[f"{name}_random_lower_95"] = lower
            row[f"{name}_random_upper_95"] = upper
        rows.append(row)
    return pd.DataFrame(rows)


def low_high_permutation_table(
    grams: Mapping[tuple[str, str], np.ndarray],
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
    low, high = np.asarray(low, dtype=np.intp), np.asarray(high, dtype=np.intp)
    if low.shape != high.shape or low.ndim != 1:
        raise ValueError(
            f"low and high must be sets of equal size for the permutation test, got {low.shape} "
            f"and {high.shape}; choose one set size for both"
        )
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}; use e.g. 200")
    first, second = permuted_splits(low, high, n_permutations, seed)
    stacked = np.concatenate([low[None], high[None], first, second])
    values = subset_alignment(grams, pairs, stacked, k)
    rows = []
    for pair in pairs:
        cknna_values = values[pair][0]
        observed = float(cknna_values[0] - cknna_values[1])
        null = cknna_values[2 : 2 + n_permutations] - cknna_values[2 + n_permutations :]
        two_sided, greater = permutation_p_values(observed, null)
        rows.append(
            {
                **_pair_columns(pair),
                "low_minus_high": observed,
                "permutation_p_value_two_sided": two_sided,
                "permutation_p_value_low_greater": greater,
                "n_permutations": int(n_permutations),
            }
        )
    return pd.DataFrame(rows)


def set_table(
    grams: Mapping[tuple[str, str], np.ndarray],
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
        values = subset_alignment(grams, pairs, subset[None, :], k)
        for pair in pairs:
            cknna_values, mknn_values = values[pair]
            rows.append(
                {
                    **_pair_columns(pair),
                    "set": name,
                    "set_size": int(subset.shape[0]),
                    "k": int(k),
                    "cknna": float(cknna_values[0]),
                    "mutual_knn": float(mknn_values[0]),
                }
            )
    return pd.DataFrame(rows)


def _pair_columns(pair: Pair) -> dict[str, str]:
    return {
        "vision_model": pair.vision_model,
        "vision_layer": pair.vision_layer,
        "language_model": pair.language_model,
        "language_layer": pair.language_layer,
    }


def nearest_neighbours(gram: np.ndarray, row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` stimuli most similar to ``row`` under one model (inner product of prepared
    features, i.e. the Gram row), most similar first, the stimulus itself excluded.

    Returns ``(rows (count,), similarities (count,) float64)``; ties go to the lower row.
    """
    n = gram.shape[0]
    if not 0 <= row < n:
        raise ValueError(f"row {row} is out of range for {n} stimuli; use 0..{n - 1}")
    count = min(count, n - 1)
    similarities = np.asarray(gram[row], dtype=np.float64).copy()
    similarities[row] = -np.inf
    order = np.lexsort((np.arange(n), -similarities))[:count]
    return order, similarities[order]
