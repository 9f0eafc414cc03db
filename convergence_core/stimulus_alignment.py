"""Per-stimulus alignment: which stimuli carry vision–language alignment (issue 14, item 2).

Two scores per stimulus i and vision × language pair, both from the prepared features:

* ``knn_overlap`` — |knn_X(i) ∩ knn_Y(i)| / k: the share of i's k nearest stimuli (whole set) that
  both models agree on; its mean over stimuli is the set's mutual k-NN. Read from the stored
  neighbour lists (exact; k ≤ K), so O(n·k) at any n.
* ``local_cka`` — the local CKA of paper 003 (§4.2): the linear CKA of a *base set* B of stimuli
  augmented with stimulus i, CKA(B ∪ {i}), reported as the change that adding i makes,
  Δ(i) = CKA(B_i ∪ {i}) − CKA(B_i) with B_i = B \\ {i} (so a stimulus of the base is scored like
  any other). Positive: i's image and caption sit in their spaces the way the base's pairs do.
  B is a seeded random sample of ``base_size`` stimuli (paper 003 uses 320 base pairs). CKA is
  ``metrics.cka`` (biased HSIC, linear kernel, the reference's +1e-6): ‖X̃ᵀỸ‖²_F /
  (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F + 1e-6) on centered features. Adding one row changes the centered cross
  products by a rank-2 term, so every Δ(i) costs O(d_x·d_y + d_x² + d_y²) once the base's sums
  are known — O(n·d²) for all stimuli, never an (n, n) array.
  Features wider than the number of stimuli (d > n, n ≤ 4096; e.g. 1280-d image features of 239
  stimuli) are first written in coordinates of their own row space (n columns, from a QR): CKA is
  invariant to orthogonal maps and every centered row lies in that space, so this is exact and
  turns the d×d sums into n×n ones.

:func:`alignment_dispersion_relation` relates either score to dispersion stimulus by stimulus
(Spearman ρ, permutation p).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from .metrics import EPSILON
from .neighbours import NeighbourIndex, PreparedFeatures, exact_top_k
from .stats import spearman_permutation_test

if TYPE_CHECKING:
    from .analyses import Pair
    from .run import Run

__all__ = [
    "LOCAL_CKA_BASE_SIZE",
    "PER_STIMULUS_METRICS",
    "LocalCKA",
    "alignment_dispersion_relation",
    "knn_overlap",
    "local_cka",
    "local_cka_base_size",
    "per_stimulus_alignment",
]

#: The per-stimulus scores, in the order tables list them.
PER_STIMULUS_METRICS = ("knn_overlap", "local_cka")
#: Base pairs of the local CKA (paper 003 uses 320).
LOCAL_CKA_BASE_SIZE = 320
_ROWS_PER_BLOCK = 2048
#: Up to this many stimuli, features wider than n are used in their row-space coordinates.
_ROW_SPACE_MAX_STIMULI = 4096


def _top_k(index: NeighbourIndex, k: int) -> np.ndarray:
    """(n, k) every stimulus's k nearest others (whole set), from the lists or computed."""
    if index.lists is not None and k <= index.k_max:
        return np.asarray(index.lists.indices[:, :k], dtype=np.int64)
    return exact_top_k(index.features, k)[0]


def knn_overlap(x: NeighbourIndex, y: NeighbourIndex, k: int = 10) -> np.ndarray:
    """(n,) float64: |knn_X(i) ∩ knn_Y(i)| / k per stimulus (k nearest in the whole set).

    The mean equals ``metrics.mutual_knn`` on the full set.
    """
    if x.n != y.n:
        raise ValueError(f"the indexes cover {x.n} and {y.n} stimuli; use two layers of one run")
    if isinstance(k, bool) or not 1 <= int(k) < x.n:
        raise ValueError(f"k must be in 1..{x.n - 1}, got {k!r}")
    top_x, top_y = _top_k(x, int(k)), _top_k(y, int(k))
    out = np.empty(x.n)
    for start in range(0, x.n, 65536):
        a, b = top_x[start : start + 65536], top_y[start : start + 65536]
        out[start : start + a.shape[0]] = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(1) / k
    return out


class LocalCKA(NamedTuple):
    """``delta`` (n,) CKA(B_i ∪ {i}) − CKA(B_i); ``local`` (n,) CKA(B_i ∪ {i}); ``base`` (M,)
    the base rows (sorted); ``base_cka`` CKA(B)."""

    delta: np.ndarray
    local: np.ndarray
    base: np.ndarray
    base_cka: float


class _BaseSums(NamedTuple):
    """Uncentered sums over a base set: Σ x yᵀ etc. and Σ x, Σ y, its size."""

    xy: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    m: int


def _sums(X: np.ndarray, Y: np.ndarray) -> _BaseSums:
    return _BaseSums(X.T @ Y, X.T @ X, Y.T @ Y, X.sum(axis=0), Y.sum(axis=0), X.shape[0])


def _minus(sums: _BaseSums, x: np.ndarray, y: np.ndarray) -> _BaseSums:
    return _BaseSums(
        sums.xy - np.outer(x, y), sums.xx - np.outer(x, x), sums.yy - np.outer(y, y),
        sums.sx - x, sums.sy - y, sums.m - 1,
    )


def _cka_of(sums: _BaseSums) -> float:
    m = sums.m
    cxy = sums.xy - np.outer(sums.sx, sums.sy) / m
    cxx = sums.xx - np.outer(sums.sx, sums.sx) / m
    cyy = sums.yy - np.outer(sums.sy, sums.sy) / m
    return float(np.sum(cxy**2) / (np.linalg.norm(cxx) * np.linalg.norm(cyy) + EPSILON))


def _augmented_norm2(A: np.ndarray, s_left: np.ndarray, s_right: np.ndarray, n_new: int,
                     left: np.ndarray, right: np.ndarray, A_right: np.ndarray,
                     left_A: np.ndarray) -> np.ndarray:
    """‖C‖²_F for C = A + u rᵀ + b l s_rightᵀ with one row (l, r) added to a base (rows: stimuli).

    A = Σ_B l rᵀ − s_l s_rᵀ / n_new (the base's uncentered sums centered by the new size), u = a l
    + b s_l, a = 1 − 1/n_new, b = −1/n_new; ``A_right`` = A r (rows), ``left_A`` = lᵀ A (rows).
    """
    a, b = 1.0 - 1.0 / n_new, -1.0 / n_new
    u = a * left + b * s_left[None, :]
    u_norm2 = np.einsum("ij,ij->i", u, u)
    r_norm2 = np.einsum("ij,ij->i", right, right)
    l_norm2 = np.einsum("ij,ij->i", left, left)
    s_right_norm2 = float(s_right @ s_right)
    u_A_r = np.einsum("ij,ij->i", u, A_right)
    l_A_s = left_A @ s_right
    u_l = np.einsum("ij,ij->i", u, left)
    r_s = right @ s_right
    return (
        float(np.sum(A**2))
        + u_norm2 * r_norm2
        + b * b * l_norm2 * s_right_norm2
        + 2.0 * u_A_r
        + 2.0 * b * l_A_s
        + 2.0 * b * u_l * r_s
    )


def _local_cka_rows(sums: _BaseSums, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """CKA(base ∪ {i}) for each row i of X, Y (not in the base), from the base's sums."""
    n_new = sums.m + 1
    cxy = sums.xy - np.outer(sums.sx, sums.sy) / n_new
    cxx = sums.xx - np.outer(sums.sx, sums.sx) / n_new
    cyy = sums.yy - np.outer(sums.sy, sums.sy) / n_new
    xy2 = _augmented_norm2(cxy, sums.sx, sums.sy, n_new, X, Y, Y @ cxy.T, X @ cxy)
    x_cxx = X @ cxx  # symmetric: A r and lᵀ A are the same rows
    y_cyy = Y @ cyy
    xx2 = _augmented_norm2(cxx, sums.sx, sums.sx, n_new, X, X, x_cxx, x_cxx)
    yy2 = _augmented_norm2(cyy, sums.sy, sums.sy, n_new, Y, Y, y_cyy, y_cyy)
    return xy2 / (np.sqrt(np.maximum(xx2, 0.0) * np.maximum(yy2, 0.0)) + EPSILON)


def _row_source(features: PreparedFeatures):
    """``rows(index)`` of the prepared features, or, when they are wider than the stimuli are
    many (d > n ≤ 4096), of their (n, n) row-space coordinates Z (Z Zᵀ = F Fᵀ; exact for CKA)."""
    n = features.n
    if features.d > n and n <= _ROW_SPACE_MAX_STIMULI:
        coordinates = np.linalg.qr(features.all_rows().T, mode="r").T
        return lambda index: coordinates[index]
    return features.rows


def local_cka_base_size(n_stimuli: int, base_size: int = LOCAL_CKA_BASE_SIZE) -> int:
    """The base a run of ``n_stimuli`` gets: ``base_size``, at most ``n_stimuli − 1``."""
    return min(int(base_size), int(n_stimuli) - 1)


def local_cka(
    x: PreparedFeatures, y: PreparedFeatures, *, base_size: int = LOCAL_CKA_BASE_SIZE,
    seed: int = 0,
) -> LocalCKA:
    """The local CKA of every stimulus against a seeded base set (see the module docstring).

    Args:
        x, y: prepared features of the same n stimuli (two models × layers of a run).
        base_size: M, the base's size (at most n − 1).
        seed: picks the base (``numpy.random.default_rng(seed).choice(n, M)``).
    """
    if x.n != y.n:
        raise ValueError(f"the features cover {x.n} and {y.n} stimuli; use two layers of one run")
    n = x.n
    if isinstance(base_size, bool) or not 4 <= int(base_size) <= n - 1:
        raise ValueError(
            f"base_size must be in 4..{n - 1} (fewer than the stimuli), got {base_size!r}"
        )
    base = np.sort(np.random.default_rng(seed).choice(n, int(base_size), replace=False))
    x_rows, y_rows = _row_source(x), _row_source(y)
    Xb, Yb = x_rows(base), y_rows(base)
    sums = _sums(Xb, Yb)
    base_cka = _cka_of(sums)
    local = np.empty(n)
    delta = np.empty(n)
    outside = np.setdiff1d(np.arange(n), base)
    for start in range(0, outside.size, _ROWS_PER_BLOCK):
        rows = outside[start : start + _ROWS_PER_BLOCK]
        local[rows] = _local_cka_rows(sums, x_rows(rows), y_rows(rows))
        delta[rows] = local[rows] - base_cka
    for position, row in enumerate(base):  # leave the member out, then add it back
        without = _minus(sums, Xb[position], Yb[position])
        local[row] = base_cka
        delta[row] = base_cka - _cka_of(without)
    return LocalCKA(delta, local, base, base_cka)


def per_stimulus_alignment(
    run: Run,
    pairs: Sequence[Pair],
    *,
    k: int = 10,
    base_size: int = LOCAL_CKA_BASE_SIZE,
    seed: int = 0,
    metrics: Sequence[str] = PER_STIMULUS_METRICS,
) -> pd.DataFrame:
    """Per-stimulus scores (``metrics``, default both) for every pair, long format.

    Columns: ``stimulus`` (row), ``id``, ``vision_model``, ``vision_layer``, ``language_model``,
    ``language_layer``, ``metric`` (``knn_overlap`` | ``local_cka``), ``value``, ``k`` (for
    ``knn_overlap``), ``base_size`` and ``seed`` (for ``local_cka``).
    """
    unknown = [m for m in metrics if m not in PER_STIMULUS_METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"unknown per-stimulus metrics {unknown}; use some of {list(PER_STIMULUS_METRICS)}"
        )
    ids = run.stimuli["id"].astype(str).to_numpy()
    rows = np.arange(run.n_stimuli)
    tables = []
    for pair in pairs:
        x = run.neighbours(pair.vision_model, pair.vision_layer)
        y = run.neighbours(pair.language_model, pair.language_layer)
        size = local_cka_base_size(run.n_stimuli, base_size)
        compute = {
            "knn_overlap": lambda: knn_overlap(x, y, k),
            "local_cka": lambda: local_cka(x.features, y.features, base_size=size,
                                           seed=seed).delta,
        }
        scores = {m: compute[m]() for m in PER_STIMULUS_METRICS if m in metrics}
        for metric, values in scores.items():
            tables.append(
                pd.DataFrame(
                    {
                        "stimulus": rows,
                        "id": ids,
                        **pair._asdict(),
                        "metric": metric,
                        "value": values,
                        "k": int(k) if metric == "knn_overlap" else None,
                        "base_size": size if metric == "local_cka" else None,
                        "seed": int(seed) if metric == "local_cka" else None,
                    }
                )
            )
    return pd.concat(tables, ignore_index=True)


def alignment_dispersion_relation(
    table: pd.DataFrame,
    dispersion: np.ndarray,
    *,
    score: str = "mean",
    n_permutations: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman ρ (with permutation p-values) of each per-stimulus score with dispersion.

    ``table`` from :func:`per_stimulus_alignment`; ``dispersion`` (n,) in run order (e.g.
    ``run.dispersion[score]``). One row per pair × metric: the pair's columns, ``metric``,
    ``dispersion_score``, ``spearman_rho``, ``permutation_p_value_two_sided``,
    ``permutation_p_value_positive``, ``n_permutations``, ``n_stimuli``. A negative ρ means that
    stimuli the vision models agree on (low dispersion) carry more cross-modal alignment.
    """
    dispersion = np.asarray(dispersion, dtype=np.float64)
    keys = ["vision_model", "vision_layer", "language_model", "language_layer", "metric"]
    rows = []
    for key, group in table.groupby(keys, sort=False):
        values = group.sort_values("stimulus")["value"].to_numpy()
        result = spearman_permutation_test(
            values, dispersion, n_permutations=n_permutations, seed=seed,
            names=(f"{key[-1]} per stimulus", "dispersion"),
        )
        rows.append({**dict(zip(keys, key, strict=True)), "dispersion_score": score, **result})
    return pd.DataFrame(rows)
