"""The neighbour engine: exact lists, within-subset tables and subset CKNNA / mutual k-NN.

Every number is checked against the dense definition written here from the formulas (a full
inner-product matrix, a stable sort per row, the masked unbiased HSIC), on random, tiny, clustered
and adversarial subsets, and against ``alignment.cknna`` / ``alignment.mutual_knn`` on the subset's
features.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convergence_core import neighbours
from convergence_core.alignment import cknna, mutual_knn, prepare_features
from convergence_core.neighbours import (
    NeighbourIndex,
    PreparedFeatures,
    build_neighbour_lists,
    clip_threshold,
    exact_top_k,
    float32_error_bound,
    subset_alignment,
)


def _features(n: int, d: int = 12, seed: int = 0, latent: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent))
    return (z @ rng.standard_normal((latent, d)) + 0.5 * rng.standard_normal((n, d))).astype(
        np.float32
    )


def _dense_top_k(F: np.ndarray, k: int, queries=None, candidates=None):
    """Reference: each query's k best candidates by a stable sort of −(F Fᵀ), self excluded."""
    n = F.shape[0]
    queries = np.arange(n) if queries is None else np.asarray(queries)
    candidates = np.arange(n) if candidates is None else np.asarray(candidates)
    G = F[queries] @ F[candidates].T
    keys = -G
    keys[queries[:, None] == candidates[None, :]] = np.inf
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]
    return candidates[order], np.take_along_axis(G, order, axis=1)


def _dense_hsic(A: np.ndarray, B: np.ndarray) -> float:
    n = A.shape[0]
    A, B = A.copy(), B.copy()
    np.fill_diagonal(A, 0.0)
    np.fill_diagonal(B, 0.0)
    value = (A * B.T).sum() + A.sum() * B.sum() / ((n - 1) * (n - 2))
    value -= 2.0 * (A @ B).sum() / (n - 2)
    return value / (n * (n - 3))


def _dense_alignment(FX: np.ndarray, FY: np.ndarray, k: int) -> tuple[float, float]:
    """CKNNA and mutual k-NN from the formulas, on full (s, s) matrices."""
    s = FX.shape[0]
    masks, kernels = [], []
    for F in (FX, FY):
        G = F @ F.T
        top, _ = _dense_top_k(F, k)
        mask = np.zeros((s, s))
        mask[np.arange(s)[:, None], top] = 1.0
        masks.append(mask)
        kernels.append(G)
    (mx, my), (K, L) = masks, kernels
    mutual = mx * my
    value = _dense_hsic(mutual * K, mutual * L) / (
        np.sqrt(_dense_hsic(mx * K, mx * K) * _dense_hsic(my * L, my * L)) + 1e-6
    )
    return float(value), float(mutual.sum() / (s * k))


# -- prepared features ---------------------------------------------------------------------------


def test_prepared_rows_are_prepare_features_bit_for_bit():
    X = _features(300, 20)
    features = PreparedFeatures.from_raw(X)
    assert np.array_equal(features.all_rows(), prepare_features(X))
    rows = np.array([5, 0, 299, 17])
    assert np.array_equal(features.rows(rows), prepare_features(X)[rows])
    # blocking does not change the threshold (exact summation)
    assert clip_threshold(X, block_rows=7) == clip_threshold(X, block_rows=1000)


def test_prepared_rows_against_a_plain_reference():
    """Independent of prepare_features (which calls the same clip_threshold and prepare_rows, so
    the test above cannot see a wrong threshold or clip): the threshold is the mean over rows of
    each row's 0.95-quantile of |x|, every entry clamps to [-t, t] on both sides, rows end at unit
    norm. (A one-sided clip and a threshold from x instead of |x| passed here before.)"""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 40)) * rng.uniform(0.5, 3.0, size=(50, 1))
    X[3, 7], X[9, 2] = -40.0, 35.0  # outliers on both sides
    threshold = float(np.mean([np.quantile(np.abs(row), 0.95) for row in X]))
    assert clip_threshold(X) == pytest.approx(threshold, rel=1e-13)
    clipped = np.minimum(np.maximum(X, -threshold), threshold)
    expected = clipped / np.sqrt((clipped**2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(PreparedFeatures.from_raw(X).all_rows(), expected, rtol=1e-12)


def test_float32_error_bound_holds_on_unit_vectors():
    rng = np.random.default_rng(3)
    for d in (8, 384, 1536):
        x = rng.standard_normal((200, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        exact = x @ x[:50].T
        approx = (x.astype(np.float32) @ x[:50].astype(np.float32).T).astype(np.float64)
        assert np.abs(exact - approx).max() <= float32_error_bound(d)


# -- exact top-k ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10, 59])
def test_exact_top_k_equals_the_dense_sort(k):
    X = _features(60, 16, seed=k)
    F = prepare_features(X)
    index, values = exact_top_k(PreparedFeatures.from_raw(X), k)
    ref_index, ref_values = _dense_top_k(F, k)
    assert np.array_equal(index, ref_index)
    np.testing.assert_allclose(values, ref_values, rtol=0, atol=1e-14)


def test_exact_top_k_on_query_and_candidate_subsets():
    X = _features(80, 10, seed=1)
    F = prepare_features(X)
    rng = np.random.default_rng(0)
    candidates = np.sort(rng.choice(80, 30, replace=False))
    queries = np.concatenate([candidates[:5], np.setdiff1d(np.arange(80), candidates)[:5]])
    index, values = exact_top_k(
        PreparedFeatures.from_raw(X), 7, queries=queries, candidates=candidates
    )
    ref_index, ref_values = _dense_top_k(F, 7, queries, candidates)
    assert np.array_equal(index, ref_index)
    np.testing.assert_allclose(values, ref_values, atol=1e-14)
    # queries that are all candidates take their rows from the prepared candidates
    inside = candidates[::3]
    index, values = exact_top_k(
        PreparedFeatures.from_raw(X), 7, queries=inside, candidates=candidates
    )
    ref_index, ref_values = _dense_top_k(F, 7, inside, candidates)
    assert np.array_equal(index, ref_index)
    np.testing.assert_allclose(values, ref_values, atol=1e-14)


def test_float32_screen_cannot_drop_neighbours_it_cannot_resolve():
    """Inner products that differ by ~1e-12 (far below float32 resolution, far above float64
    rounding): the float64 refinement must pick the dense float64 reference's neighbours."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal(64)
    X = base[None, :] + 1e-5 * rng.standard_normal((200, 64))
    F = X / np.linalg.norm(X, axis=1, keepdims=True)
    G = F @ F.T
    off = G[~np.eye(200, dtype=bool)]
    assert np.ptp(off) < 1e-8  # every similarity within float32 rounding of the others
    index, values = exact_top_k(PreparedFeatures(X, np.inf), 10)
    ref_index, _ = _dense_top_k(F, 10)
    rows = np.arange(200)[:, None]
    # the same neighbours up to float64 rounding (two values equal in one computation may differ
    # in the last bit in the other, which can swap exactly tied neighbours)
    np.testing.assert_allclose(G[rows, index], G[rows, ref_index], rtol=0, atol=1e-15)
    np.testing.assert_allclose(values, G[rows, index], rtol=0, atol=1e-15)
    assert (index == ref_index).all(axis=1).mean() > 0.95


def test_exact_ties_go_to_the_lower_index():
    X = _features(40, 6, seed=2).astype(np.float64)
    X[[3, 17, 25]] = X[9]  # three duplicates of row 9: exactly tied similarities to everyone
    index, _ = exact_top_k(PreparedFeatures(X, np.inf), 5)
    # row 9's three nearest are its duplicates, in index order
    assert index[9, :3].tolist() == [3, 17, 25]
    # any other row ranks the duplicates of 9 (and 9 itself) consecutively, lower index first
    for row in range(40):
        listed = [j for j in index[row] if j in (3, 9, 17, 25)]
        assert listed == sorted(listed)


def test_exact_top_k_bad_k_is_explained():
    features = PreparedFeatures.from_raw(_features(10))
    with pytest.raises(ValueError, match="use 1 <= k <= 9"):
        exact_top_k(features, 10)
    with pytest.raises(ValueError, match="use 1 <= k"):
        exact_top_k(features, 0)
    with pytest.raises(ValueError, match="use 1 <= k"):  # int(2.5) = 2 neighbours, silently
        exact_top_k(features, 2.5)


def test_exact_top_k_refuses_candidates_and_queries_it_cannot_search():
    """Unsorted or repeated candidates, or a negative query, let a query list itself among its
    neighbours (its own row is found by binary search), from a review."""
    features = PreparedFeatures.from_raw(_features(10))
    queries = np.array([3, 5])
    for candidates in ([5, 3, 7, 1, 9], [1, 3, 3, 5, 7]):
        with pytest.raises(ValueError, match="distinct rows in ascending order"):
            exact_top_k(features, 2, queries=queries, candidates=np.array(candidates))
    for rows in ([-1], [10]):
        with pytest.raises(ValueError, match=r"queries must be a 1-D array of rows in 0..9"):
            exact_top_k(features, 2, queries=np.array(rows))
    with pytest.raises(ValueError, match=r"candidates must be a 1-D array of rows in 0..9"):
        exact_top_k(features, 2, candidates=np.array([-1, 2, 4]))
    with pytest.raises(ValueError, match="a set of the subset engine .* needs at least 4"):
        neighbours.check_subsets(np.array([[0, 1, 2]]), 10, 1)
    index, _ = exact_top_k(features, 2, queries=queries, candidates=np.array([1, 3, 5, 7, 9]))
    assert 3 not in index[0] and 5 not in index[1]


def test_lists_equal_the_dense_sort_and_are_capped_at_n_minus_1():
    X = _features(50, 8, seed=4)
    lists = build_neighbour_lists(PreparedFeatures.from_raw(X), list_size=128)
    assert lists.k_max == 49 and lists.indices.dtype == np.int32
    ref_index, ref_values = _dense_top_k(prepare_features(X), 49)
    assert np.array_equal(lists.indices, ref_index)
    np.testing.assert_allclose(lists.values, ref_values, atol=1e-14)
    with pytest.raises(ValueError, match="positive integer"):
        build_neighbour_lists(PreparedFeatures.from_raw(X), list_size=0)


# -- within-subset tables -----------------------------------------------------------------------


def _check_tables(index: NeighbourIndex, F: np.ndarray, subsets: np.ndarray, k: int) -> None:
    tables = index.tables(np.sort(subsets, axis=1), k)
    for b, subset in enumerate(np.sort(subsets, axis=1)):
        ref_positions, ref_values = _dense_top_k(F[subset], k)
        assert np.array_equal(tables.positions[b], ref_positions), b
        np.testing.assert_allclose(tables.values[b], ref_values, atol=1e-14)


@pytest.mark.parametrize("list_size", [3, 12, 128])
def test_tables_equal_the_dense_sort_for_random_tiny_and_clustered_subsets(list_size):
    X = _features(120, 10, seed=5)
    F = prepare_features(X)
    index = NeighbourIndex.from_features(X, list_size=list_size)
    rng = np.random.default_rng(1)
    random_sets = np.stack([rng.choice(120, 30, replace=False) for _ in range(6)])
    _check_tables(index, F, random_sets, 5)
    _check_tables(index, F, np.stack([rng.choice(120, 5, replace=False) for _ in range(4)]), 3)
    # a clustered subset: row 0 and its 29 nearest neighbours
    near, _ = _dense_top_k(F, 29, queries=[0])
    _check_tables(index, F, np.concatenate([[0], near[0]])[None, :], 10)


def test_tables_when_every_listed_neighbour_is_outside_the_subset():
    """Adversarial: each member's stored neighbours are all outside the subset (completion)."""
    X = _features(100, 8, seed=6)
    F = prepare_features(X)
    index = NeighbourIndex.from_features(X, list_size=4)
    # greedily pick members none of whose 4 listed neighbours is picked
    chosen: list[int] = []
    blocked: set[int] = set()
    for row in range(100):
        listed = set(index.lists.indices[row].tolist())
        if row not in blocked and not listed & set(chosen):
            chosen.append(row)
            blocked |= listed
    subset = np.array(sorted(chosen))
    assert subset.size >= 8
    assert not np.isin(index.lists.indices[subset], subset).any()
    _check_tables(index, F, subset[None, :], 3)


def test_tables_without_lists_are_computed_from_features():
    X = _features(40, 6, seed=8)
    index = NeighbourIndex(PreparedFeatures.from_raw(X), None)
    assert index.k_max == 0
    _check_tables(index, prepare_features(X), np.arange(40)[None, :], 6)


def test_nearest_uses_the_list_and_falls_back_to_features():
    X = _features(70, 8, seed=9)
    F = prepare_features(X)
    index = NeighbourIndex.from_features(X, list_size=5)
    ref_index, ref_values = _dense_top_k(F, 20, queries=[11])
    rows, values = index.nearest(11, 5)
    assert rows.tolist() == ref_index[0, :5].tolist()
    rows, values = index.nearest(11, 20)  # more than the list holds: computed
    assert rows.tolist() == ref_index[0].tolist()
    np.testing.assert_allclose(values, ref_values[0], atol=1e-14)
    with pytest.raises(ValueError, match="out of range"):
        index.nearest(70, 3)


# -- subset alignment ----------------------------------------------------------------------------


def _indexes(n: int = 90, list_size: int = 128, seed: int = 0):
    X = _features(n, 14, seed=seed)
    Y = _features(n, 9, seed=seed + 100, latent=4) + 0.8 * X[:, :9]
    return (
        {"x": NeighbourIndex.from_features(X, list_size=list_size),
         "y": NeighbourIndex.from_features(Y, list_size=list_size)},
        prepare_features(X),
        prepare_features(Y),
    )


@pytest.mark.parametrize("list_size", [4, 20, 128])
@pytest.mark.parametrize(("s", "k"), [(4, 2), (9, 3), (30, 5), (90, 10), (45, 44)])
def test_subset_alignment_equals_the_dense_definition(list_size, s, k):
    indexes, FX, FY = _indexes(list_size=list_size)
    rng = np.random.default_rng(s * 31 + k)
    subsets = np.stack([rng.choice(90, s, replace=False) for _ in range(5)])
    result = subset_alignment(indexes, [("x", "y"), ("y", "x"), ("x", "x")], subsets, k)
    for b, subset in enumerate(subsets):
        for p, (A, B) in enumerate(((FX, FY), (FY, FX), (FX, FX))):
            ref_cknna, ref_mutual = _dense_alignment(A[subset], B[subset], k)
            assert result.cknna[p, b] == pytest.approx(ref_cknna, abs=1e-9)
            assert result.mutual_knn[p, b] == pytest.approx(ref_mutual, abs=1e-12)
            if k >= 2:
                assert result.cknna[p, b] == pytest.approx(cknna(A[subset], B[subset], k), abs=1e-9)
            assert result.mutual_knn[p, b] == pytest.approx(mutual_knn(A[subset], B[subset], k))


def test_every_neighbour_metric_of_the_registry_from_the_lists():
    from convergence_core.metrics import METRICS, measure

    indexes, FX, FY = _indexes(list_size=12)
    rng = np.random.default_rng(4)
    subsets = np.stack([np.sort(rng.choice(90, 30, replace=False)) for _ in range(3)])
    names = [name for name, entry in METRICS.items() if entry.neighbour_metric]
    assert {"cknna", "mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"} <= set(names)
    result = subset_alignment(indexes, [("x", "y")], subsets, 6, metrics=names)
    for name in names:
        for b, subset in enumerate(subsets):
            assert result.values[name][0, b] == pytest.approx(
                measure(name, FX[subset], FY[subset], k=6), abs=1e-9
            ), name
    with pytest.raises(ValueError, match="not a neighbour metric"):
        subset_alignment(indexes, [("x", "y")], subsets, 6, metrics=["cka"])


def test_k_beyond_the_lists_on_a_large_subset_is_refused_with_the_fix():
    X = _features(3000, 6, seed=1)
    index = NeighbourIndex.from_features(X, list_size=5)
    with pytest.raises(ValueError, match="more than the 5 neighbours stored.*--list-size"):
        index.tables(np.arange(3000)[None, :], 6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), s=st.integers(6, 60), k_fraction=st.floats(0.05, 0.95))
def test_subset_alignment_property(seed, s, k_fraction):
    indexes, FX, FY = _indexes(n=60, list_size=8, seed=seed % 7)
    rng = np.random.default_rng(seed)
    subset = rng.choice(60, s, replace=False)
    k = max(2, min(s - 1, int(k_fraction * s)))
    result = subset_alignment(indexes, [("x", "y")], subset, k)
    assert result.cknna[0, 0] == pytest.approx(cknna(FX[subset], FY[subset], k), abs=1e-9)
    assert result.mutual_knn[0, 0] == pytest.approx(mutual_knn(FX[subset], FY[subset], k))


def test_subset_order_and_chunking_do_not_matter(monkeypatch):
    indexes, _, _ = _indexes()
    rng = np.random.default_rng(2)
    subsets = np.stack([rng.choice(90, 25, replace=False) for _ in range(7)])
    base = subset_alignment(indexes, [("x", "y")], subsets, 4)
    shuffled = subset_alignment(indexes, [("x", "y")], rng.permuted(subsets, axis=1), 4)
    np.testing.assert_array_equal(base.cknna, shuffled.cknna)
    monkeypatch.setattr(neighbours, "_ENTRY_CHUNK", 50)
    chunked = subset_alignment(indexes, [("x", "y")], subsets, 4)
    np.testing.assert_allclose(chunked.cknna, base.cknna, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(chunked.mutual_knn, base.mutual_knn)


def test_a_model_with_itself_scores_one_and_a_rotation_too():
    X = _features(80, 12, seed=3)
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 12)))
    indexes = {
        "x": NeighbourIndex(PreparedFeatures(X.astype(np.float64), np.inf),
                            build_neighbour_lists(PreparedFeatures(X.astype(np.float64), np.inf))),
        "rotated": NeighbourIndex.from_features(X.astype(np.float64) @ Q, q=1),
    }
    result = subset_alignment(indexes, [("x", "rotated"), ("x", "x")], np.arange(80), 10)
    # 1 up to the reference's +1e-6 in the denominator (relative to HSIC values ~0.05 here)
    np.testing.assert_allclose(result.cknna, 1.0, atol=1e-4)
    assert result.cknna[0, 0] == pytest.approx(result.cknna[1, 0], abs=1e-12)
    np.testing.assert_allclose(result.mutual_knn, 1.0)


@pytest.mark.parametrize(
    ("subsets", "k", "message"),
    [
        (np.array([1, 2, 2, 3, 4]), 2, "more than once"),
        (np.array([1, 2, 3]), 2, "at least 4"),
        (np.arange(10), 10, "k"),
        (np.array([1.5, 2, 3, 4]), 2, "integers"),
        (np.array([0, 1, 2, 200]), 2, "outside"),
    ],
)
def test_bad_subsets_are_explained(subsets, k, message):
    indexes, _, _ = _indexes()
    with pytest.raises(ValueError, match=message):
        subset_alignment(indexes, [("x", "y")], subsets, k)


def test_rows_outside_the_run_never_reach_the_compiled_loop():
    """The table loop indexes by list entries and subset rows unchecked: a damaged list file or
    an out-of-range subset given to NeighbourIndex.tables directly is refused first."""
    indexes, _, _ = _indexes()
    with pytest.raises(ValueError, match=r"rows in 0\.\.89"):
        indexes["x"].tables(np.array([[0, 1, 2, 90]]), 2)
    with pytest.raises(ValueError, match=r"rows in 0\.\.89"):
        indexes["x"].tables(np.array([[-1, 1, 2, 3]]), 2)
    lists = indexes["x"].lists
    damaged = lists.indices.copy()
    damaged[5, 3] = lists.n
    with pytest.raises(ValueError, match="damaged"):
        neighbours.NeighbourLists(damaged, lists.values)
    damaged[5, 3] = -1
    with pytest.raises(ValueError, match="damaged"):
        neighbours.NeighbourLists(damaged, lists.values)


def test_unknown_or_mismatched_indexes_are_explained():
    indexes, _, _ = _indexes()
    with pytest.raises(ValueError, match="no neighbour index"):
        subset_alignment(indexes, [("x", "z")], np.arange(10), 3)
    other = NeighbourIndex.from_features(_features(50))
    with pytest.raises(ValueError, match="different numbers of stimuli"):
        subset_alignment({"x": indexes["x"], "o": other}, [("x", "o")], np.arange(10), 3)


@pytest.mark.parametrize("block_elements", [7 * 120, 16 * 120, 50 * 120])
def test_a_full_build_in_row_blocks_equals_the_dense_sort(monkeypatch, block_elements):
    """Lists of all rows built block by block are those of the dense sort, exact ties and
    near-ties included."""
    X = _features(120, 10, seed=block_elements)
    X[[5, 77]] = X[40]  # exact ties
    features = PreparedFeatures.from_raw(X)
    monkeypatch.setattr(neighbours, "_BLOCK_ELEMENTS", block_elements)
    lists = build_neighbour_lists(features, list_size=20)
    ref_index, ref_values = _dense_top_k(prepare_features(X), 20)
    np.testing.assert_array_equal(lists.indices, ref_index)
    np.testing.assert_allclose(lists.values, ref_values, atol=1e-14)
    # near-ties beyond the first margin: the screen widens its window, still exact
    near = X[:1] + 1e-6 * np.random.default_rng(0).standard_normal((120, 10))
    lists = build_neighbour_lists(PreparedFeatures(near, np.inf), list_size=5)
    F = near / np.linalg.norm(near, axis=1, keepdims=True)
    G = F @ F.T
    ref_index, _ = _dense_top_k(F, 5)
    rows = np.arange(120)[:, None]
    np.testing.assert_allclose(G[rows, lists.indices], G[rows, ref_index], atol=1e-15)


@pytest.mark.parametrize("copies", [3, 5, 17, 129])
def test_identical_candidates_get_identical_values_wherever_they_sit(copies):
    """The float64 refinement gives exact duplicates bit-identical values at every position of
    the window (a stacked BLAS matmul did not: tail rows took another kernel, an ulp apart), so
    the tie rule (lower index first) decides, not the position."""
    rng = np.random.default_rng(copies)
    X = np.repeat(rng.standard_normal((1, 33)), copies, axis=0)  # one point, many times
    features = PreparedFeatures(X, np.inf)
    queries = rng.standard_normal((7, 33))
    window = np.tile(np.arange(copies), (7, 1))
    index, values = neighbours._refine(
        queries, np.arange(copies), window, np.ones_like(window, bool), features, None, copies
    )
    assert all(np.unique(row).size == 1 for row in values)
    np.testing.assert_array_equal(index, window)  # all tied: ascending index


def test_tables_completed_from_features_break_exact_ties_by_index():
    """Members whose stored list holds fewer than k of the set are completed from the set's
    features. A matrix product scored a row's exact duplicates an ulp apart there, so duplicated
    stimuli (the same image twice) were ordered by rounding noise: 17 of 40 such sets had tables
    other than the dense definition's, and neighbour metrics moved by up to 5e-3."""
    rng = np.random.default_rng(14)
    differing = 0
    for _ in range(12):
        n, d = int(rng.integers(40, 300)), int(rng.integers(3, 200))
        X = rng.standard_normal((n // 3, d))[rng.integers(0, n // 3, n)]  # many duplicates
        index = NeighbourIndex.from_features(X, list_size=3)  # short lists: mostly completed
        k = int(rng.integers(4, min(30, n - 1)))
        subset = np.sort(rng.choice(n, int(rng.integers(k + 2, n + 1)), replace=False))
        tables = index.tables(subset[None], k).positions[0]
        F = index.features.all_rows()[subset]
        # the dense definition on exact values: a row's duplicates are equal, lower index first
        exact = np.einsum("id,jd->ij", F, F)
        np.fill_diagonal(exact, -np.inf)
        expected = np.lexsort((np.broadcast_to(np.arange(len(F)), exact.shape), -exact))[:, :k]
        differing += not np.array_equal(tables, expected)
    assert differing == 0


def test_a_row_is_never_its_own_neighbour_even_where_norms_overflow():
    """A norm above ~1e154 made the rounding allowance infinite, which took the row's own
    (excluded) column back in among its candidates: the row came out as its own neighbour."""
    from convergence_core.metrics import nearest_neighbours

    rng = np.random.default_rng(0)
    F = rng.standard_normal((6, 4))
    F[5] *= 1e160
    with np.errstate(over="ignore", invalid="ignore"):
        table = nearest_neighbours(F, 3).indices
    assert all(row not in table[row] for row in range(6))


# -- completed rows kept per set (a k change slices them) ---------------------------------------


def _completion_spy(monkeypatch) -> dict:
    """Counts the rows completed from the features (the dense product's rows and exact_top_k's
    queries), in this code and in the code before rows were kept alike."""
    from convergence_core import metrics

    counted = {"rows": 0}
    dense, exact = metrics.neighbours_of_rows, neighbours.exact_top_k

    def dense_rows(F, rows, k, **options):  # noqa: ANN001, ANN003, ANN202
        counted["rows"] += len(rows)
        return dense(F, rows, k, **options)

    def exact_rows(features, k, *, queries=None, **options):  # noqa: ANN001, ANN003, ANN202
        counted["rows"] += features.n if queries is None else len(queries)
        return exact(features, k, queries=queries, **options)

    monkeypatch.setattr(metrics, "neighbours_of_rows", dense_rows)
    monkeypatch.setattr(neighbours, "exact_top_k", exact_rows)
    return counted


def _exact_tables(F: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense definition on exact values (one product per pair: duplicates tie exactly),
    value descending, then the lower position."""
    exact = np.einsum("id,jd->ij", F, F)
    np.fill_diagonal(exact, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(F)), exact.shape), -exact))[:, :k]
    return order, np.take_along_axis(exact, order, axis=1)


def _short_rows(index: NeighbourIndex, subset: np.ndarray, k: int) -> np.ndarray:
    """Positions of the members whose stored list holds fewer than k members (a walk)."""
    inside = np.isin(index.lists.indices[subset], subset).sum(axis=1)
    return np.flatnonzero(inside < k)


def _duplicated_features(n: int = 150, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n // 3, 6))[rng.integers(0, n // 3, n)]  # each row ~3 times


@pytest.mark.parametrize("dense_limit", [2048, 40])  # the dense product; exact_top_k
def test_a_k_change_slices_the_kept_completions_instead_of_completing_again(
    monkeypatch, dense_limit
):
    """The lab's k slider asks for the same sets at k = 10, 15, 5, ...: each call completed the
    members whose K stored neighbours hold fewer than k of the set from the features again,
    O(s²·d) per model and set (at 100,000 stimuli every lab size from 2,049 to ~7,800 at k = 10;
    a k change took minutes). Now each row once per set, at COMPLETION_K neighbours, sliced at
    any k up to that; the tables stay the dense definition's, exact ties to the lower index."""
    monkeypatch.setattr(neighbours, "_DENSE_SUBSET", dense_limit)
    counted = _completion_spy(monkeypatch)
    X = _duplicated_features()
    index = NeighbourIndex.from_features(X, list_size=12)
    F = index.features.all_rows()
    rng = np.random.default_rng(0)
    # most members short at k = 5: the whole set is completed at once
    most = np.sort(rng.choice(150, 60, replace=False))
    assert _short_rows(index, most, 5).size >= 30
    # few members short at k = 5, more at larger k: only those rows, each once
    few = np.sort(np.random.default_rng(90).choice(150, 90, replace=False))
    assert 0 < _short_rows(index, few, 5).size < 45 < _short_rows(index, few, 8).size
    done: dict[str, set] = {}
    first = {}
    for k in (5, 8, 3, 12, 5, 2):
        for name, subset in (("few", few), ("most", most)):
            counted["rows"] = 0
            tables = index.tables(subset[None], k)
            positions, values = _exact_tables(F[subset], k)
            assert np.array_equal(tables.positions[0], positions), (name, k)
            np.testing.assert_allclose(tables.values[0], values, atol=1e-14)
            short = set(_short_rows(index, subset, k).tolist())
            if name not in done:  # the first call: at least the rows short at its k
                first[name] = counted["rows"]
                assert first[name] >= len(short)
                done[name] = set(range(subset.size)) if first[name] == subset.size else short
            else:  # a k change: only rows short now and never completed before
                assert counted["rows"] == len(short - done[name]), (name, k)
                done[name] |= short
    assert first == {"few": _short_rows(index, few, 5).size, "most": most.size}  # most: whole


def test_a_k_above_the_kept_rows_completes_them_again_at_that_k(monkeypatch):
    counted = _completion_spy(monkeypatch)
    monkeypatch.setattr(neighbours, "COMPLETION_K", 4)
    X = _duplicated_features(seed=4)
    index = NeighbourIndex.from_features(X, list_size=3)
    F = index.features.all_rows()
    subset = np.sort(np.random.default_rng(1).choice(150, 50, replace=False))
    for k, completes in ((3, True), (4, False), (9, True), (6, False), (2, False)):
        counted["rows"] = 0
        tables = index.tables(subset[None], k)
        assert np.array_equal(tables.positions[0], _exact_tables(F[subset], k)[0]), k
        assert (counted["rows"] > 0) == completes, k


def test_completions_are_kept_within_their_byte_budget(monkeypatch):
    """0 bytes: every call completes its own rows at its own k (the method before); a small
    budget keeps the most recently used sets only; either way the same tables (the dense
    product's values may differ in the last bit with the rows completed together)."""
    counted = _completion_spy(monkeypatch)
    X = _duplicated_features(seed=5)
    index = NeighbourIndex.from_features(X, list_size=4)
    rng = np.random.default_rng(2)
    sets = [np.sort(rng.choice(150, 60, replace=False)) for _ in range(3)]
    kept = [index.tables(subset[None], 6) for subset in sets]
    owned = [key for key in neighbours._COMPLETIONS._entries if key[0] == index._token]
    assert len(owned) == 3
    monkeypatch.setattr(neighbours, "COMPLETION_CACHE_BYTES", 0)
    other = NeighbourIndex(index.features, index.lists)
    for k in (6, 6, 3):
        counted["rows"] = 0
        for subset, expected in zip(sets, kept):
            tables = other.tables(subset[None], k)
            assert np.array_equal(tables.positions, expected.positions[..., :k])
            np.testing.assert_allclose(tables.values, expected.values[..., :k], atol=1e-15)
        assert counted["rows"] == sum(_short_rows(index, subset, k).size for subset in sets)
    assert not [key for key in neighbours._COMPLETIONS._entries if key[0] == other._token]
    # room for about one set: the least recently used go first
    one = neighbours._COMPLETIONS._entries[owned[0]].nbytes
    monkeypatch.setattr(neighbours, "COMPLETION_CACHE_BYTES", one + one // 2)
    small = NeighbourIndex(index.features, index.lists)
    for subset in sets:
        small.tables(subset[None], 6)
    assert [key[2] for key in neighbours._COMPLETIONS._entries if key[0] == small._token] == [
        owned[2][2]
    ]
    assert neighbours._COMPLETIONS.nbytes <= one + one // 2


def test_an_index_that_is_gone_leaves_no_kept_rows():
    import gc

    index = NeighbourIndex.from_features(_duplicated_features(seed=6), list_size=3)
    token = index._token
    index.tables(np.arange(0, 150, 3)[None], 4)
    assert any(key[0] == token for key in neighbours._COMPLETIONS._entries)
    del index
    gc.collect()  # the store is free: its rows go at once (not only at the next use: review)
    assert not any(key[0] == token for key in neighbours._COMPLETIONS._entries)


def test_an_index_collected_while_the_store_is_locked_does_not_wait_for_it():
    """From the review: the finalizer of a collected index took the store's lock; a collection
    that an allocation started while this thread held it ran that finalizer, which then waited
    for the lock its own thread held, for ever. Here an index in a reference cycle is collected
    while the lock is held; the finalizer must return, and its rows go at the next use."""
    import gc
    import threading

    features = _duplicated_features(seed=7)
    index = NeighbourIndex.from_features(features, list_size=3)
    token = index._token
    index.tables(np.arange(0, 150, 3)[None], 4)
    index.cycle = index
    del index
    finished = threading.Event()

    def collect_holding_the_lock() -> None:
        with neighbours._COMPLETIONS._lock:
            gc.collect()  # runs the finalizer on this thread, the lock held
        finished.set()

    worker = threading.Thread(target=collect_holding_the_lock, daemon=True)
    worker.start()
    assert finished.wait(20), "the finalizer waited for the lock its own thread holds"
    assert neighbours._COMPLETIONS.nbytes >= 0
    assert not any(key[0] == token for key in neighbours._COMPLETIONS._entries)


def test_tables_from_threads_at_once_equal_one_at_a_time():
    """The lab's sessions share a run's indexes and subset_alignment uses a thread per core:
    rows kept by one call while another reads them change no table."""
    from concurrent.futures import ThreadPoolExecutor

    index = NeighbourIndex.from_features(_duplicated_features(seed=7), list_size=4)
    F = index.features.all_rows()
    rng = np.random.default_rng(3)
    sets = [np.sort(rng.choice(150, 70, replace=False)) for _ in range(3)]
    calls = [(subset, k) for k in (7, 3, 11, 5) for subset in sets] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda call: index.tables(call[0][None], call[1]), calls))
    for (subset, k), tables in zip(calls, results):
        assert np.array_equal(tables.positions[0], _exact_tables(F[subset], k)[0]), k


def test_exact_top_k_of_a_whole_set_against_itself_is_the_general_product():
    """Every candidate queried in order takes the symmetric product (syrk) for the screen: the
    same neighbours and values, bit for bit, as the rows queried in another order."""
    X = _features(300, 24, seed=11)
    features = PreparedFeatures.from_raw(X)
    members = np.sort(np.random.default_rng(4).choice(300, 200, replace=False))
    whole = exact_top_k(features, 9, queries=members, candidates=members)
    order = np.random.default_rng(5).permutation(200)
    shuffled = exact_top_k(features, 9, queries=members[order], candidates=members)
    back = np.argsort(order)
    assert np.array_equal(whole[0], shuffled[0][back])
    assert np.array_equal(whole[1], shuffled[1][back])
    ref_index, ref_values = _dense_top_k(prepare_features(X), 9, members, members)
    assert np.array_equal(whole[0], ref_index)
    np.testing.assert_allclose(whole[1], ref_values, atol=1e-14)
