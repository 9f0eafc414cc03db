"""CKNNA / mutual k-NN from cached Gram matrices equal the feature-based metrics on the subset."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convergence_core.alignment import cknna, mutual_knn, prepare_features
from convergence_core import neighbours
from convergence_core.neighbours import (
    cknna_from_gram,
    mutual_knn_from_gram,
    subset_alignment,
    top_k_neighbours,
)


def features(seed: int, n: int = 150, dx: int = 20, dy: int = 12):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dx))
    Y = X @ rng.standard_normal((dx, dy)) + rng.standard_normal((n, dy))
    return prepare_features(X), prepare_features(Y)


def slow_top_k(G: np.ndarray, k: int) -> list[set[int]]:
    out = []
    for i, row in enumerate(G):
        order = [j for j in np.argsort(-row, kind="stable") if j != i]
        out.append(set(int(j) for j in order[:k]))
    return out


@pytest.mark.parametrize("k", [1, 2, 10, 149])
def test_top_k_neighbours_matches_sorting(k: int) -> None:
    X, _ = features(k)
    G = X @ X.T
    got = [set(row.tolist()) for row in top_k_neighbours(G, k)]
    assert got == slow_top_k(G, k)


def test_top_k_neighbours_excludes_self_even_when_self_is_not_largest() -> None:
    # unnormalised features: a row's own inner product need not be its largest
    X = np.array([[1.0], [2.0], [3.0], [-1.0]])
    G = X @ X.T
    assert [set(r.tolist()) for r in top_k_neighbours(G, 2)] == slow_top_k(G, 2)
    # subset values [-1, 1, 2]; positions within the subset are returned
    assert [set(r.tolist()) for r in top_k_neighbours(G, 1, subset=[3, 0, 1])] == [{1}, {2}, {1}]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(4, 150),
    k_fraction=st.floats(0.0, 1.0),
)
def test_subset_from_gram_equals_features_on_subset(seed: int, size: int, k_fraction: float) -> None:
    X, Y = features(seed % 1000)
    rng = np.random.default_rng(seed)
    subset = rng.choice(X.shape[0], size=size, replace=False)
    k = 2 + int(k_fraction * (size - 3))
    K, L = X @ X.T, Y @ Y.T
    # NaN on both sides is agreement: a negative self-HSIC estimate (tiny subsets) gives NaN
    expected = cknna(X[subset], Y[subset], k)
    assert cknna_from_gram(K, L, k, subset) == pytest.approx(expected, abs=1e-9, nan_ok=True)
    assert mutual_knn_from_gram(K, L, k, subset) == pytest.approx(
        mutual_knn(X[subset], Y[subset], k), abs=1e-12
    )


def test_full_set_and_float32_grams() -> None:
    X, Y = features(11)
    K, L = X @ X.T, Y @ Y.T
    assert cknna_from_gram(K, L, 10) == pytest.approx(cknna(X, Y, 10), abs=1e-9)
    # float32 caches: same neighbours on continuous data, values to float32 accuracy
    K32, L32 = K.astype(np.float32), L.astype(np.float32)
    assert cknna_from_gram(K32, L32, 10) == pytest.approx(cknna(X, Y, 10), abs=1e-6)
    subset = np.arange(0, 150, 3)
    assert cknna_from_gram(K32, L32, 5, subset) == pytest.approx(cknna(X[subset], Y[subset], 5), abs=1e-6)


def test_subset_order_does_not_matter() -> None:
    X, Y = features(12)
    K, L = X @ X.T, Y @ Y.T
    subset = np.array([5, 90, 3, 41, 7, 66, 12, 100, 33, 21])
    shuffled = subset[::-1].copy()
    assert cknna_from_gram(K, L, 3, subset) == pytest.approx(cknna_from_gram(K, L, 3, shuffled), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subset": []}, "empty"),
        ({"subset": [1, 2, 2, 3, 4]}, "more than once"),
        ({"subset": [0, 1, 2, 150]}, "outside 0..149"),
        ({"subset": [0, 1, 2, -1]}, "negative indexing"),
        ({"subset": np.array([0.0, 1.0, 2.0, 3.0])}, "must be integers"),
        ({"subset": np.ones(150, dtype=bool)}, "boolean mask"),
        ({"subset": [0, 1, 2]}, "at least 4 stimuli"),
        ({"k": 1}, "2 <= k"),
        ({"k": 150}, "k=150 is too large"),
    ],
)
def test_bad_input_is_explained(kwargs: dict, message: str) -> None:
    X, Y = features(13)
    with pytest.raises(ValueError, match=message):
        cknna_from_gram(X @ X.T, Y @ Y.T, **{"k": 2, **kwargs})


def test_bad_grams_are_explained() -> None:
    X, Y = features(14)
    K, L = X @ X.T, Y @ Y.T
    with pytest.raises(ValueError, match="square"):
        cknna_from_gram(X, L)
    with pytest.raises(ValueError, match="same stimuli"):
        cknna_from_gram(K, L[:-1, :-1])
    K[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        mutual_knn_from_gram(K, L, 3)
    # a NaN outside the chosen subset is not touched
    assert np.isfinite(mutual_knn_from_gram(K, L, 3, subset=np.arange(5, 40)))


# --- subset_alignment: many subsets and pairs at once, against the one-subset functions ---------


def _batch_grams() -> dict[str, np.ndarray]:
    """Four models' Grams on the same 60 stimuli (two related pairs, one unrelated model)."""
    X, Y = features(20, n=60)
    Z, W = features(21, n=60)
    return {name: F @ F.T for name, F in (("x", X), ("y", Y), ("z", Z), ("w", W))}


@pytest.mark.parametrize(("s", "k"), [(12, 3), (25, 10), (40, 39)])
def test_subset_alignment_matches_the_one_subset_functions(s: int, k: int) -> None:
    grams = _batch_grams()
    pairs = [("x", "y"), ("z", "y"), ("w", "x")]
    rng = np.random.default_rng(s)
    subsets = np.stack([rng.choice(60, s, replace=False) for _ in range(7)])
    cknna_values, mknn_values = subset_alignment(grams, pairs, subsets, k)
    assert cknna_values.shape == mknn_values.shape == (3, 7)
    for p, (x, y) in enumerate(pairs):
        K, L = grams[x], grams[y]
        expected_cknna = [cknna_from_gram(K, L, k=k, subset=subset) for subset in subsets]
        expected_mknn = [mutual_knn_from_gram(K, L, k=k, subset=subset) for subset in subsets]
        np.testing.assert_allclose(cknna_values[p], expected_cknna, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mknn_values[p], expected_mknn, rtol=1e-12)


def test_subset_alignment_on_float32_grams_matches_the_one_subset_functions() -> None:
    grams = {name: gram.astype(np.float32) for name, gram in _batch_grams().items()}
    subsets = np.stack([np.arange(0, 60, 2), np.arange(1, 60, 2)])
    cknna_values, _ = subset_alignment(grams, [("x", "y")], subsets, 5)
    expected = [cknna_from_gram(grams["x"], grams["y"], 5, subset) for subset in subsets]
    np.testing.assert_allclose(cknna_values[0], expected, rtol=1e-9, atol=1e-12)


def test_subset_alignment_is_invariant_to_order_within_a_subset() -> None:
    subset = np.arange(5, 35)
    shuffled = np.random.default_rng(1).permutation(subset)
    values = subset_alignment(_batch_grams(), [("x", "y")], np.stack([subset, shuffled]), 5)
    cknna_values, mknn_values = values[0][0], values[1][0]
    assert cknna_values[0] == pytest.approx(cknna_values[1], rel=1e-10)
    assert mknn_values[0] == pytest.approx(mknn_values[1], rel=1e-12)


def test_a_model_aligned_with_itself_scores_one() -> None:
    grams = _batch_grams()
    cknna_values, mknn_values = subset_alignment(grams, [("x", "x")], np.arange(40)[None], 8)
    # just below 1: the reference adds 1e-6 to the denominator
    assert 0.999 < cknna_values[0, 0] < 1.0 and mknn_values[0, 0] == pytest.approx(1.0)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    grams = _batch_grams()
    subsets = np.stack([np.random.default_rng(i).choice(60, 20, replace=False) for i in range(9)])
    whole = subset_alignment(grams, [("x", "z")], subsets, 4)[0]
    monkeypatch.setattr(neighbours, "_CHUNK_ELEMENTS", 20 * 20 * 2)  # chunks of 2 subsets
    np.testing.assert_array_equal(subset_alignment(grams, [("x", "z")], subsets, 4)[0], whole)


def test_subset_alignment_bad_input_is_explained() -> None:
    grams = _batch_grams()
    with pytest.raises(ValueError, match=r"\(B, s\)"):
        subset_alignment(grams, [], np.arange(5), 2)
    with pytest.raises(ValueError, match="at least 4"):
        subset_alignment(grams, [("x", "y")], np.arange(3)[None], 2)
    with pytest.raises(ValueError, match="k=10 is too large"):
        subset_alignment(grams, [("x", "y")], np.arange(10)[None], 10)


# --- NeighbourRanking: the same numbers from a per-row ranking of the full set -------------------


def _rankings(K: np.ndarray, L: np.ndarray):
    return neighbours.NeighbourRanking.from_gram(K), neighbours.NeighbourRanking.from_gram(L)


def test_ranking_is_a_stable_sort_of_each_row_without_self() -> None:
    X, _ = features(30, n=40)
    G = np.round(X @ X.T, 1)  # rounded: many exact ties
    order = neighbours.NeighbourRanking.from_gram(G).order
    assert order.shape == (40, 39)
    for i in range(40):
        expected = [j for j in np.argsort(-G[i], kind="stable") if j != i]
        assert order[i].tolist() == expected


@pytest.mark.parametrize("k", [2, 5, 10, 30])
@pytest.mark.parametrize("size", [4, 9, 37, 100, 150])
def test_ranking_path_equals_gram_path_and_features(k: int, size: int) -> None:
    k = min(k, size - 1)  # at most s - 1 neighbours
    X, Y = features(size * 100 + k)
    K, L = X @ X.T, Y @ Y.T
    rankings = _rankings(K, L)
    rng = np.random.default_rng(k)
    subset = rng.choice(150, size=size, replace=False)  # unsorted
    expected = cknna(X[subset], Y[subset], k)
    gram_path = cknna_from_gram(K, L, k, subset)
    ranked = cknna_from_gram(K, L, k, subset, rankings=rankings)
    assert gram_path == pytest.approx(expected, abs=1e-9, nan_ok=True)
    assert ranked == pytest.approx(gram_path, abs=1e-9, nan_ok=True)
    assert mutual_knn_from_gram(K, L, k, subset, rankings=rankings) == pytest.approx(
        mutual_knn(X[subset], Y[subset], k), abs=1e-12
    )


def test_ranking_path_on_the_full_set_and_float32_grams() -> None:
    X, Y = features(31)
    K32, L32 = (X @ X.T).astype(np.float32), (Y @ Y.T).astype(np.float32)
    rankings = _rankings(K32, L32)
    for k in (3, 10, 49):
        for subset in (None, np.arange(150)[::-1], np.arange(0, 150, 3)):
            assert cknna_from_gram(K32, L32, k, subset, rankings=rankings) == pytest.approx(
                cknna_from_gram(K32, L32, k, subset), abs=1e-9
            )
            assert mutual_knn_from_gram(K32, L32, k, subset, rankings=rankings) == pytest.approx(
                mutual_knn_from_gram(K32, L32, k, subset), abs=1e-12
            )


def test_ranking_path_widens_for_clustered_subsets() -> None:
    # two far-apart clusters; the subset is mostly from cluster 0 and a few of cluster 1, whose
    # in-subset neighbours lie far down their rankings (past the first prefix)
    rng = np.random.default_rng(32)
    centres = np.repeat([[0.0] * 8, [5.0] * 8], 100, axis=0)
    X = centres + rng.standard_normal((200, 8))
    Y = X + 0.5 * rng.standard_normal((200, 8))
    K, L = X @ X.T, Y @ Y.T
    subset = np.concatenate([np.arange(100), [150, 170, 190]])
    rankings = _rankings(K, L)
    for k in (2, 5, 20):
        assert cknna_from_gram(K, L, k, subset, rankings=rankings) == pytest.approx(
            cknna(X[subset], Y[subset], k), abs=1e-9
        )


def test_exact_ties_give_the_same_answer_on_both_paths() -> None:
    # duplicated stimuli: rows with exactly equal inner products; ties go to the lower index
    X, Y = features(33, n=50)
    X, Y = np.concatenate([X, X[:20]]), np.concatenate([Y, Y[:20]])
    K, L = X @ X.T, Y @ Y.T
    rankings = _rankings(K, L)
    rng = np.random.default_rng(0)
    for k in (2, 4, 8):
        for subset in (None, rng.permutation(70)[:40], np.array([0, 50, 1, 51, 2, 52, 3, 53, 10])):
            for metric in (cknna_from_gram, mutual_knn_from_gram):
                assert metric(K, L, k, subset, rankings=rankings) == pytest.approx(
                    metric(K, L, k, subset), abs=1e-9, nan_ok=True
                )
    # the Gram path's neighbours follow the rule too (of tied columns, the lower index)
    for k in (1, 3, 7):
        assert [set(row.tolist()) for row in top_k_neighbours(K, k)] == slow_top_k(K, k)


def test_bad_rankings_are_explained() -> None:
    X, Y = features(34)
    K, L = X @ X.T, Y @ Y.T
    with pytest.raises(ValueError, match="pair"):
        cknna_from_gram(K, L, 3, rankings=neighbours.NeighbourRanking.from_gram(K))
    small = neighbours.NeighbourRanking.from_gram(K[:10, :10])
    with pytest.raises(ValueError, match="cover 10"):
        cknna_from_gram(K, L, 3, rankings=(small, small))
    bad = K.copy()
    bad[3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        neighbours.NeighbourRanking.from_gram(bad)
    with pytest.raises(ValueError, match=r"\(n, n - 1\)"):
        neighbours.NeighbourRanking(np.zeros((4, 4), dtype=np.int16))
