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
  (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F + 1e-6) on centered features, computed from linear kernels: ‖X̃ᵀỸ‖²_F =
  tr(H K H L) with K = F Fᵀ, and tr(H K H L) over a set needs only Σ K∘L, the kernels' row sums
  and totals over that set. Adding a stimulus to the base (or taking a member out) changes those
  by its one row and column, so with the base's m × m kernels known, every Δ(i) costs O(m) plus
  its m kernel values against the base: O(n·m·d) for all stimuli at any width d, never an
  (n, n) or a d × d array. (Before: sums of d × d cross-products, a QR to n columns for wide
  features, and an O(d²) recomputation per base member: 5.8 s for one pair of 1,000 stimuli
  × 1,536/2,048 features, now 0.04 s.)

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
from .validation import check_k

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
#: entries of knn_overlap's (rows, k, k) comparison per block (4 MB of booleans, at any k)
_OVERLAP_ENTRIES = 1 << 22


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
    k = check_k(k, x.n)
    top_x, top_y = _top_k(x, k), _top_k(y, k)
    out = np.empty(x.n)
    rows = max(1, _OVERLAP_ENTRIES // (k * k))
    for start in range(0, x.n, rows):
        a, b = top_x[start : start + rows], top_y[start : start + rows]
        out[start : start + a.shape[0]] = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(1) / k
    return out


class LocalCKA(NamedTuple):
    """``delta`` (n,) CKA(B_i ∪ {i}) − CKA(B_i); ``local`` (n,) CKA(B_i ∪ {i}); ``base`` (M,)
    the base rows (sorted); ``base_cka`` CKA(B)."""

    delta: np.ndarray
    local: np.ndarray
    base: np.ndarray
    base_cka: float


class _Gram(NamedTuple):
    """One side's linear kernel on the base B (m rows): K = F_B F_Bᵀ, its row sums and total."""

    K: np.ndarray  # (m, m)
    rows: np.ndarray  # (m,) Σ_b K_ab
    total: float


def _gram(base_rows: np.ndarray) -> _Gram:
    K = base_rows @ base_rows.T
    rows = K.sum(axis=1)
    return _Gram(K, rows, float(rows.sum()))


def _centred(sum_of_products, row_products, total_a, total_b, s: float):
    """tr(H A H B) over a set of s stimuli (H the centering matrix) from Σ A∘B, Σ_a (A1)_a (B1)_a
    and 1ᵀA1, 1ᵀB1 of that set's uncentered kernels (elementwise over arrays of sets)."""
    return sum_of_products - 2.0 / s * row_products + total_a * total_b / (s * s)


def _cka_from_hsic(xy, xx, yy):
    """Linear CKA from the centered HSIC terms, as ``metrics.cka`` (‖X̃ᵀỸ‖²_F = tr(K̃L̃), ...)."""
    return xy / (np.sqrt(np.maximum(xx, 0.0) * np.maximum(yy, 0.0)) + EPSILON)


def _base_cka(gx: _Gram, gy: _Gram) -> float:
    m = gx.K.shape[0]
    terms = [
        _centred(float(np.vdot(a.K, b.K)), float(a.rows @ b.rows), a.total, b.total, m)
        for a, b in ((gx, gy), (gx, gx), (gy, gy))
    ]
    return float(_cka_from_hsic(*terms))


def _leave_one_out_cka(gx: _Gram, gy: _Gram) -> np.ndarray:
    """(m,) CKA(B \\ {i}) for each base member i, from the base's kernels: removing i takes its row
    and column out of Σ K∘L, of the row sums and of the totals (O(m²) for all members)."""
    m = gx.K.shape[0]

    def hsic(a: _Gram, b: _Gram) -> np.ndarray:
        both = a.K * b.K
        own = both.sum(axis=1)
        da, db = np.diag(a.K), np.diag(b.K)
        sum_of_products = both.sum() - 2.0 * own + da * db
        row_products = (
            a.rows @ b.rows - a.K @ b.rows - b.K @ a.rows + own - (a.rows - da) * (b.rows - db)
        )
        return _centred(
            sum_of_products, row_products, a.total - 2.0 * a.rows + da,
            b.total - 2.0 * b.rows + db, m - 1,
        )

    return _cka_from_hsic(hsic(gx, gy), hsic(gx, gx), hsic(gy, gy))


def _added_cka(gx: _Gram, gy: _Gram, X: np.ndarray, Y: np.ndarray, Xb: np.ndarray,
               Yb: np.ndarray) -> np.ndarray:
    """(r,) CKA(B ∪ {j}) for each of r stimuli j outside the base (rows X, Y), from the base's
    kernels and the r × m kernel values between them and the base: O(r·m·d)."""
    s = gx.K.shape[0] + 1
    kx, ky = X @ Xb.T, Y @ Yb.T  # (r, m)
    own_x, own_y = np.einsum("ij,ij->i", X, X), np.einsum("ij,ij->i", Y, Y)
    sides = {"x": (gx, kx, own_x), "y": (gy, ky, own_y)}

    def hsic(first: str, second: str) -> np.ndarray:
        a, ka, da = sides[first]
        b, kb, db = sides[second]
        cross = np.einsum("ij,ij->i", ka, kb)
        sum_of_products = float(np.vdot(a.K, b.K)) + 2.0 * cross + da * db
        sum_a, sum_b = ka.sum(axis=1), kb.sum(axis=1)
        row_products = (
            a.rows @ b.rows + kb @ a.rows + ka @ b.rows + cross + (sum_a + da) * (sum_b + db)
        )
        return _centred(
            sum_of_products, row_products, a.total + 2.0 * sum_a + da,
            b.total + 2.0 * sum_b + db, s,
        )

    return _cka_from_hsic(hsic("x", "y"), hsic("x", "x"), hsic("y", "y"))


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
    Xb, Yb = x.rows(base), y.rows(base)
    gx, gy = _gram(Xb), _gram(Yb)
    base_cka = _base_cka(gx, gy)
    local = np.empty(n)
    delta = np.empty(n)
    outside = np.setdiff1d(np.arange(n), base)
    for start in range(0, outside.size, _ROWS_PER_BLOCK):
        rows = outside[start : start + _ROWS_PER_BLOCK]
        local[rows] = _added_cka(gx, gy, x.rows(rows), y.rows(rows), Xb, Yb)
        delta[rows] = local[rows] - base_cka
    # a base member: the base without it, then with it
    local[base] = base_cka
    delta[base] = base_cka - _leave_one_out_cka(gx, gy)
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
