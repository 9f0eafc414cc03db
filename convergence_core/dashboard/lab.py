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

from ..stats import percentile_interval
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
            f"{what} has {size} stimuli; CKNNA needs at least 4 (and more than k): choose more stimuli"
        )
    if not 1 <= k < size:
        raise ValueError(
            f"k={k} is too large for {what} of {size} stimuli: each stimulus needs k other stimuli "
            f"as neighbours; use k <= {size - 1} or a larger set"
        )


def _stack(gram: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """(B, s, s) float64: ``gram[subset][:, subset]`` for each row of ``subsets`` (B, s)."""
    return np.asarray(gram[subsets[:, :, None], subsets[:, None, :]], dtype=np.float64)


def _knn_mask(blocks: np.ndarray, k: int) -> np.ndarray:
    """(B, s, s) bool: True at (b, i, j) when j is among the k most similar others of i in block b."""
    n_blocks, s, _ = blocks.shape
    work = -blocks  # argpartition picks the smallest, so negate similarities
    diagonal = np.arange(s)
    work[:, diagonal, diagonal] = np.inf  # never one's own neighbour
    neighbours = np.argpartition(work, k - 1, axis=-1)[..., :k]
    mask = np.zeros((n_blocks, s, s), dtype=bool)
    np.put_along_axis(mask, neighbours, True, axis=-1)
    return mask


def _hsic_unbiased(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) unbiased HSIC (Song et al. 2012) of stacked kernels with zero diagonals, float64."""
    m = a.shape[-1]
    trace_term = np.einsum("bij,bji->b", a, b)
    sums_term = a.sum(axis=(1, 2)) * b.sum(axis=(1, 2)) / ((m - 1) * (m - 2))
    # sum(A @ B) = sum_j colsum(A)_j * rowsum(B)_j
    cross_term = 2.0 * np.einsum("bj,bj->b", a.sum(axis=1), b.sum(axis=2)) / (m - 2)
    return (trace_term + sums_term - cross_term) / (m * (m - 3))


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
            for side in ((pair.vision_model, pair.vision_layer), (pair.language_model, pair.language_layer))
        )
    )
    chunk = max(1, _CHUNK_ELEMENTS // (s * s))
    for start in range(0, n_sets, chunk):
        block = subsets[start : start + chunk]
        masked: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for side in sides:
            blocks = _stack(grams[side], block)
            mask = _knn_mask(blocks, k)
            self_similarity = _hsic_unbiased(mask * blocks, mask * blocks)
            masked[side] = (blocks, mask, self_similarity)
        for pair in pairs:
            kx, mask_x, sim_xx = masked[(pair.vision_model, pair.vision_layer)]
            ky, mask_y, sim_yy = masked[(pair.language_model, pair.language_layer)]
            mutual = mask_x & mask_y
            sim_xy = _hsic_unbiased(mutual * kx, mutual * ky)
            cknna_values, mknn_values = results[pair]
            stop = start + block.shape[0]
            cknna_values[start:stop] = sim_xy / (np.sqrt(sim_xx * sim_yy) + _CKNNA_EPS)
            mknn_values[start:stop] = mutual.sum(axis=(1, 2)) / (s * k)
    return results


def random_subsets(scores: np.ndarray, size: int, n_random: int, seed: int) -> np.ndarray:
    """(n_random, size) random subsets, the same draws ``analyses.dispersion_set_alignment`` makes."""
    random_seed, _ = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(random_seed)
    return np.stack(
        [np.asarray(select_stimuli(scores, "random", size, rng=rng), dtype=np.intp) for _ in range(n_random)]
    )


def permuted_splits(low: np.ndarray, high: np.ndarray, n_permutations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
