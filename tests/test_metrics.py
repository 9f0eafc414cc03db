"""The metric registry against slow dense references written from the formulas, and against the
invariances (and non-invariances) each entry claims.

The references below are transcriptions of the definitions (Huh et al. 2024 and its code's
metric definitions; Song et al. 2012 eq. 5; Kornblith et al. 2019; Raghu et al. 2017), written
with explicit (n, n) masks, loops and matrix inverses, independent of the vectorised code.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convergence_core
from convergence_core import metrics
from convergence_core.metrics import (
    cka_from_kernel_sides,
    cka_from_kernels,
    cknna_from_tables,
    kernel_side,
    measure,
    measure_tables,
    metric,
    metric_names,
    nearest_neighbours,
    permute_table,
)


# --- dense references ---------------------------------------------------------------------------
def ref_table(F: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest inner products with others, descending, ties to the lower index
    (each product on its own, as the subset engine computes them: BLAS may give two equal
    products values an ulp apart, by where they fall in its blocks)."""
    G = np.array([[np.einsum("d,d->", a, b) for b in F] for a in F])
    table = []
    for i in range(len(F)):
        others = sorted((j for j in range(len(F)) if j != i), key=lambda j: (-G[i, j], j))
        table.append(others[:k])
    return np.array(table, dtype=np.int64)


def ref_mask(F: np.ndarray, k: int) -> np.ndarray:
    n = len(F)
    mask = np.zeros((n, n))
    for i, row in enumerate(ref_table(F, k)):
        mask[i, row] = 1.0
    return mask


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    ones = np.ones(n)
    value = (
        np.trace(Kt @ Lt)
        + (ones @ Kt @ ones) * (ones @ Lt @ ones) / ((n - 1) * (n - 2))
        - 2.0 * (ones @ Kt @ Lt @ ones) / (n - 2)
    )
    return value / (n * (n - 3))


def ref_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H)


def ref_ratio(kl: float, kk: float, ll: float) -> float:
    return kl / (np.sqrt(kk * ll) + 1e-6)


def ref_cknna(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    K, L = X @ X.T, Y @ Y.T
    MK, ML = ref_mask(X, k), ref_mask(Y, k)

    def similarity(A, MA, B, MB):
        M = MA * MB
        return ref_hsic_unbiased(M * A, M * B)

    return ref_ratio(similarity(K, MK, L, ML), similarity(K, MK, K, MK), similarity(L, ML, L, ML))


def ref_mutual_knn(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    return float(np.mean((ref_mask(X, k) * ref_mask(Y, k)).sum(axis=1) / k))


def ref_cycle_knn(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    tx, ty = ref_table(X, k), ref_table(Y, k)
    return float(np.mean([any(i in tx[j] for j in ty[i]) for i in range(len(X))]))


@functools.cache
def ref_lcs(a: tuple, b: tuple) -> int:
    """The recursive definition (memoised)."""
    if not a or not b:
        return 0
    if a[-1] == b[-1]:
        return ref_lcs(a[:-1], b[:-1]) + 1
    return max(ref_lcs(a[:-1], b), ref_lcs(a, b[:-1]))


def ref_levenshtein(a, b) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1,
                table[i][j - 1] + 1,
                table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
    return table[-1][-1]


def ref_lcs_knn(X, Y, k):  # the reference's scale: mean length
    tx, ty = ref_table(X, k), ref_table(Y, k)
    return float(np.mean([ref_lcs(tuple(map(int, a)), tuple(map(int, b))) for a, b in zip(tx, ty)]))


def ref_edit_distance_knn(X, Y, k):
    tx, ty = ref_table(X, k), ref_table(Y, k)
    return 1.0 - float(np.mean([ref_levenshtein(list(a), list(b)) for a, b in zip(tx, ty)])) / k


def ref_rbf(F: np.ndarray, sigma: float) -> np.ndarray:
    n = len(F)
    K = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            K[i, j] = np.exp(-np.sum((F[i] - F[j]) ** 2) / (2 * sigma**2))
    return K


def ref_cka(X, Y, kernel="linear", sigma=1.0, unbiased=False):
    K, L = (X @ X.T, Y @ Y.T) if kernel == "linear" else (ref_rbf(X, sigma), ref_rbf(Y, sigma))
    hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased
    return ref_ratio(hsic(K, L), hsic(K, K), hsic(L, L))


def inverse_sqrt(C: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(C)
    return V @ np.diag(w**-0.5) @ V.T


def ref_svcca(X, Y, q):
    """Standardise, project on the top-q principal directions, classical CCA from covariances."""

    def reduced(F):
        F = (F - F.mean(0)) / (F.std(0, ddof=1) + 1e-8)
        _, _, Vt = np.linalg.svd(F, full_matrices=True)
        return F @ Vt[:q].T

    A, B = reduced(X), reduced(Y)
    A, B = A - A.mean(0), B - B.mean(0)
    Caa, Cbb, Cab = A.T @ A, B.T @ B, A.T @ B
    rho = np.linalg.svd(inverse_sqrt(Caa) @ Cab @ inverse_sqrt(Cbb), compute_uv=False)
    return float(np.mean(rho))


REFERENCES = {
    "cknna": lambda X, Y, k: ref_cknna(X, Y, k),
    "mutual_knn": ref_mutual_knn,
    "cycle_knn": ref_cycle_knn,
    "lcs_knn": lambda X, Y, k: ref_lcs_knn(X, Y, k) / k,
    "edit_distance_knn": ref_edit_distance_knn,
}


def paired(rng, n=40, dx=9, dy=7, noise=0.7, latent=5):
    Z = rng.standard_normal((n, latent)) * np.linspace(2.0, 0.5, latent)
    X = Z @ rng.standard_normal((latent, dx)) + noise * rng.standard_normal((n, dx))
    Y = Z @ rng.standard_normal((latent, dy)) + noise * rng.standard_normal((n, dy))
    return X, Y


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --- registry -----------------------------------------------------------------------------------
def test_registry_names_are_the_reference_names() -> None:
    assert metric_names() == [
        "cknna",
        "mutual_knn",
        "cycle_knn",
        "lcs_knn",
        "edit_distance_knn",
        "cka",
        "unbiased_cka",
        "svcca",
    ]
    for name in metric_names():
        entry = metric(name)
        assert entry.name == name
        assert entry.neighbour_metric == (entry.from_tables is not None)
        assert set(entry.invariances).isdisjoint(entry.not_invariant)
        assert set(entry.invariances) | set(entry.not_invariant) <= set(metrics.TRANSFORMS)
        with pytest.raises((AttributeError, TypeError)):
            entry.options["k"] = 3  # read-only
        assert entry.label and entry.unit  # what pickers, tables and axes show
        assert entry.axis_title == f"{entry.label} ({entry.unit})"
    labels = [metric(name).label for name in metric_names()]
    assert len(set(labels)) == len(labels)  # one label per metric
    assert convergence_core.measure is measure and convergence_core.metric_names is metric_names


def test_one_check_of_a_metrics_options_for_every_route() -> None:
    """measure, the subset engine, the analyses and the lab read options through one check."""
    from convergence_core import analyses, subset_metrics

    assert metrics.check_options("cka") == {"kernel": "linear", "sigma": 1.0}
    assert metrics.check_options("mutual_knn", {"k": 5}) == {"k": 5}
    assert metrics.check_options("mutual_knn", {"k": 5}, k_apart=True) == {}
    assert metrics.check_options("cka", {"kernel": "rbf", "k": 3}, k_apart=True) == {
        "kernel": "rbf", "sigma": 1.0,
    }
    bad = [({"cca": 3}, "svcca does not take 'cca'; it takes cca_dim."),
           ({"kernel": "poly"}, "kernel must be 'linear' or 'rbf', got 'poly'.")]
    for options, message in bad:
        name = "svcca" if "cca" in options else "cka"
        for check in (
            lambda: metrics.check_options(name, options),
            lambda: subset_metrics.metric_options(name, options),
            lambda: analyses._metric_options([name], {name: options}),
        ):
            with pytest.raises(ValueError) as raised:
                check()
            assert str(raised.value) == message
    for dim in (0, -3, 2.5, True, "10"):  # the upper bound comes with the data
        with pytest.raises(ValueError, match="cca_dim must be a positive integer"):
            metrics.check_options("svcca", {"cca_dim": dim})
    assert metrics.check_options("svcca", {"cca_dim": np.int64(3)}) == {"cca_dim": 3}
    with pytest.raises(ValueError, match="mutual_knn does not take 'kernel'; it takes k."):
        metrics.check_options("mutual_knn", {"kernel": "rbf"})
    with pytest.raises(ValueError, match="it takes no options besides k."):
        metrics.check_options("mutual_knn", {"kernel": "rbf"}, k_apart=True)


def test_a_neighbour_metrics_smallest_k_is_its_registry_entry_everywhere() -> None:
    """``Metric.min_k`` is the one place a metric's smallest k is written: the dense function
    and the subset engine both start at it (the engine had CKNNA's 2 written in by name)."""
    from convergence_core.neighbours import NeighbourIndex, subset_alignment

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(12, 5)), rng.normal(size=(12, 4))
    indexes = {"x": NeighbourIndex.from_features(X), "y": NeighbourIndex.from_features(Y)}
    for name in metric_names():
        entry = metrics.metric(name)
        if not entry.neighbour_metric:
            continue
        assert np.isfinite(measure(name, X, Y, k=entry.min_k))
        subset_alignment(indexes, [("x", "y")], np.arange(12), entry.min_k, metrics=[name])
        with pytest.raises(ValueError, match=f"{entry.min_k} <= k"):
            measure(name, X, Y, k=entry.min_k - 1)
        if entry.min_k > 1:
            with pytest.raises(ValueError, match=f"{entry.min_k} <= k"):
                subset_alignment(
                    indexes, [("x", "y")], np.arange(12), entry.min_k - 1, metrics=[name]
                )
    assert metrics.metric("cknna").min_k == 2


def test_measure_rejects_unknown_metrics_and_options() -> None:
    X, Y = paired(np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown metric 'ckna'; known metrics: cknna"):
        measure("ckna", X, Y)
    with pytest.raises(ValueError, match=r"unknown metric 'CKNNA' \(did you mean 'cknna'\?\)"):
        measure("CKNNA", X, Y)
    with pytest.raises(ValueError, match="does not take 'topk'; it takes k"):
        measure("mutual_knn", X, Y, topk=5)
    with pytest.raises(ValueError, match="does not take 'k'"):
        measure("cka", X, Y, k=5)
    with pytest.raises(ValueError, match="kernel must be 'linear' or 'rbf'"):
        measure("cka", X, Y, kernel="poly")
    with pytest.raises(ValueError, match="sigma"):
        measure("cka", X, Y, kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match="cca_dim"):
        measure("svcca", X, Y, cca_dim=8)  # > d_y = 7
    with pytest.raises(ValueError, match="k=40 is too large"):
        measure("lcs_knn", X, Y, k=40)
    with pytest.raises(ValueError, match="same stimuli"):
        measure("cknna", X, Y[:-1])
    assert measure("cka", X, Y, kernel="ip") == measure("cka", X, Y)  # the reference's name


# --- neighbour tables ---------------------------------------------------------------------------
def test_nearest_neighbours_order_values_and_ties() -> None:
    rng = np.random.default_rng(1)
    F = rng.standard_normal((30, 4))
    table = nearest_neighbours(F, 6)
    np.testing.assert_array_equal(table.indices, ref_table(F, 6))
    G = F @ F.T
    np.testing.assert_allclose(
        table.values, np.take_along_axis(G, table.indices, axis=1), rtol=1e-14
    )
    # exact ties: integer features; the lower index must win, also across a row-block boundary
    F = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(nearest_neighbours(F, 3).indices, ref_table(F, 3))


def test_nearest_neighbours_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    F = np.round(rng.standard_normal((50, 3)), 1)  # many ties
    whole = nearest_neighbours(F, 7)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * 50)  # blocks of 3 rows
    blocked = nearest_neighbours(F, 7)
    np.testing.assert_array_equal(whole.indices, blocked.indices)
    np.testing.assert_array_equal(whole.indices, ref_table(F, 7))


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize(("n", "k"), [(12, 2), (30, 5), (40, 10), (25, 24)])
def test_neighbour_metrics_match_dense_references(name: str, n: int, k: int) -> None:
    X, Y = paired(np.random.default_rng(n * 100 + k), n=n)
    assert measure(name, X, Y, k=k) == pytest.approx(REFERENCES[name](X, Y, k), abs=1e-12)


def test_lcs_scale_of_the_reference() -> None:
    X, Y = paired(np.random.default_rng(3))
    assert measure("lcs_knn", X, Y, k=6, normalise=False) == pytest.approx(ref_lcs_knn(X, Y, 6))
    assert measure("lcs_knn", X, Y, k=6) == pytest.approx(ref_lcs_knn(X, Y, 6) / 6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(6, 40), k_fraction=st.floats(0, 1))
def test_neighbour_metrics_property(seed: int, n: int, k_fraction: float) -> None:
    X, Y = paired(np.random.default_rng(seed), n=n, dx=4, dy=3)
    k = 2 + int(k_fraction * (n - 3))
    for name, reference in REFERENCES.items():
        assert measure(name, X, Y, k=k) == pytest.approx(reference(X, Y, k), abs=1e-10), name


def test_known_sequence_values() -> None:
    # one stimulus per row; rows are the ordered neighbour lists of 4 stimuli
    tx = np.array([[1, 2, 3], [2, 3, 0], [3, 0, 1], [0, 1, 2]])
    ty = np.array([[3, 2, 1], [2, 3, 0], [0, 1, 3], [2, 1, 0]])
    # LCS lengths: [1,2,3]/[3,2,1] -> 1; identical -> 3; [3,0,1]/[0,1,3] -> 2; [0,1,2]/[2,1,0] -> 1
    assert measure_tables("lcs_knn", tx, ty, normalise=False) == pytest.approx((1 + 3 + 2 + 1) / 4)
    # edit distances: 2, 0, 2, 2
    assert measure_tables("edit_distance_knn", tx, ty) == pytest.approx(1 - (2 + 0 + 2 + 2) / 4 / 3)
    assert measure_tables("mutual_knn", tx, ty) == 1.0  # same sets, other orders
    assert measure_tables("cycle_knn", tx[:, :1], ty[:, :1]) == pytest.approx(
        np.mean([i in tx[ty[i, 0], :1] for i in range(4)])
    )


def test_tables_batched_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(4)
    X, Y = paired(rng, n=60)
    sets = np.stack([np.sort(rng.choice(60, 20, replace=False)) for _ in range(5)])
    tables = [(nearest_neighbours(X[s], 4), nearest_neighbours(Y[s], 4)) for s in sets]
    tx = np.stack([t[0].indices for t in tables])
    ty = np.stack([t[1].indices for t in tables])
    vx = np.stack([t[0].values for t in tables])
    vy = np.stack([t[1].values for t in tables])
    for name in REFERENCES:
        batched = measure_tables(name, tx, ty, vx, vy)
        assert batched.shape == (5,)
        single = [measure(name, X[s], Y[s], k=4) for s in sets]
        np.testing.assert_allclose(batched, single, rtol=0, atol=1e-13)
    # kernel values from getters, one set and batched
    dot = lambda F, s: lambda i, j: np.einsum("ij,ij->i", F[s[i]], F[s[j]])  # noqa: E731
    one = cknna_from_tables(tx[0], ty[0], dot(X, sets[0]), dot(Y, sets[0]))
    assert one == pytest.approx(measure("cknna", X[sets[0]], Y[sets[0]], k=4), abs=1e-13)
    getter = lambda F: lambda b, i, j: np.einsum("ij,ij->i", F[sets[b, i]], F[sets[b, j]])  # noqa: E731
    np.testing.assert_allclose(
        cknna_from_tables(tx, ty, getter(X), getter(Y)),
        measure_tables("cknna", tx, ty, vx, vy),
        atol=1e-13,
    )


def test_split_table_forms_equal_the_whole() -> None:
    """Where an entry splits its table form (one side per table, shared by every pair the table
    is in), from_sides of the sides is from_tables of the tables: each side's table with several
    others, single and batched, and the argument order kept (CKNNA is not symmetric)."""
    rng = np.random.default_rng(8)
    X, Y = paired(rng, n=50)
    Z = X @ rng.standard_normal((X.shape[1], X.shape[1])) + rng.standard_normal(X.shape)
    sets = np.stack([np.sort(rng.choice(50, 18, replace=False)) for _ in range(4)])
    tables = {}
    for label, F in (("x", X), ("y", Y), ("z", Z)):
        built = [nearest_neighbours(F[s], 5) for s in sets]
        tables[label] = (np.stack([t.indices for t in built]), np.stack([t.values for t in built]))
    split = [metric(name) for name in REFERENCES if metric(name).side is not None]
    assert [entry.name for entry in split] == ["cknna"]
    for entry in split:
        sides = {label: entry.side(*tables[label]) for label in tables}
        for a, b in (("x", "y"), ("y", "x"), ("z", "y"), ("x", "z")):
            (ta, va), (tb, vb) = tables[a], tables[b]
            whole = measure_tables(entry.name, ta, tb, va, vb)
            np.testing.assert_array_equal(entry.from_sides(sides[a], sides[b]), whole)
            one = entry.from_sides(entry.side(tables[a][0][1], tables[a][1][1]),
                                   entry.side(tables[b][0][1], tables[b][1][1]))
            features = {"x": X, "y": Y, "z": Z}
            assert isinstance(one, float)
            assert one == pytest.approx(
                measure(entry.name, features[a][sets[1]], features[b][sets[1]], k=5), abs=1e-13
            )
        with pytest.raises(ValueError, match="same s stimuli"):
            entry.from_sides(sides["x"], entry.side(tables["y"][0][:2], tables["y"][1][:2]))


def test_table_checks() -> None:
    tx = np.array([[1, 2], [2, 0], [0, 1], [0, 1]])
    with pytest.raises(ValueError, match="own neighbour"):
        measure_tables("mutual_knn", tx, np.array([[0, 2], [2, 0], [0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="repeats a neighbour"):
        measure_tables("mutual_knn", tx, np.array([[1, 1], [2, 0], [0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="outside 0..3"):
        measure_tables("mutual_knn", tx, np.array([[1, 4], [2, 0], [0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="same k"):
        measure_tables("mutual_knn", tx, tx[:, :1])
    with pytest.raises(ValueError, match="integer neighbour table"):
        measure_tables("mutual_knn", tx.astype(float), tx)
    with pytest.raises(ValueError, match="needs the kernel values"):
        measure_tables("cknna", tx, tx)
    with pytest.raises(ValueError, match="feature metric"):
        measure_tables("cka", tx, tx)
    with pytest.raises(ValueError, match="k=3 but the tables list 2"):
        measure_tables("mutual_knn", tx, tx, k=3)
    with pytest.raises(ValueError, match="shape"):
        measure_tables("cknna", tx, tx, np.ones((4, 3)), np.ones((4, 2)))


def test_permute_table_matches_recomputed_neighbours() -> None:
    rng = np.random.default_rng(5)
    Y = rng.standard_normal((25, 6))
    permutation = rng.permutation(25)
    table = nearest_neighbours(Y, 5).indices
    np.testing.assert_array_equal(
        permute_table(table, permutation), nearest_neighbours(Y[permutation], 5).indices
    )
    other = rng.permutation(25)
    batched = permute_table(np.stack([table, table]), np.stack([permutation, other]))
    np.testing.assert_array_equal(batched[1], nearest_neighbours(Y[other], 5).indices)
    with pytest.raises(ValueError, match="exactly once"):
        permute_table(table, np.zeros(25, dtype=int))


# --- CKA and SVCCA ------------------------------------------------------------------------------
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize(("kernel", "sigma"), [("linear", 1.0), ("rbf", 0.8), ("rbf", 3.0)])
def test_cka_matches_dense_reference(unbiased: bool, kernel: str, sigma: float) -> None:
    X, Y = paired(np.random.default_rng(6), n=35)
    X = X + 2.0  # not centered: the linear path centers internally
    name = "unbiased_cka" if unbiased else "cka"
    expected = ref_cka(X, Y, kernel, sigma, unbiased)
    assert measure(name, X, Y, kernel=kernel, sigma=sigma) == pytest.approx(
        expected, abs=1e-12, rel=1e-10
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_feature_route_equals_gram_route(unbiased: bool) -> None:
    rng = np.random.default_rng(7)
    X, Y = paired(rng, n=300, dx=5, dy=4)  # s(dx+dy) > dx²+dy²+dx·dy: the feature route
    name = "unbiased_cka" if unbiased else "cka"
    expected = ref_cka(X, Y, unbiased=unbiased)
    assert measure(name, X, Y) == pytest.approx(expected, rel=1e-10)
    X, Y = paired(rng, n=12, dx=40, dy=30)  # the Gram route
    assert measure(name, X, Y) == pytest.approx(ref_cka(X, Y, unbiased=unbiased), rel=1e-10)


def test_rbf_cka_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    X, Y = paired(np.random.default_rng(8), n=30)
    whole = measure("unbiased_cka", X, Y, kernel="rbf", sigma=2.0)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 4 * 30)
    assert measure("unbiased_cka", X, Y, kernel="rbf", sigma=2.0) == pytest.approx(whole, rel=1e-13)
    assert whole == pytest.approx(ref_cka(X, Y, "rbf", 2.0, unbiased=True), rel=1e-10)


def test_cka_from_kernels_batched() -> None:
    rng = np.random.default_rng(9)
    X, Y = paired(rng, n=50)
    sets = np.stack([rng.choice(50, 15, replace=False) for _ in range(4)])
    K = np.stack([X[s] @ X[s].T for s in sets])
    L = np.stack([Y[s] @ Y[s].T for s in sets])
    for unbiased, name in ((False, "cka"), (True, "unbiased_cka")):
        expected = [measure(name, X[s], Y[s]) for s in sets]
        np.testing.assert_allclose(cka_from_kernels(K, L, unbiased=unbiased), expected, rtol=1e-10)
        assert cka_from_kernels(K[0], L[0], unbiased=unbiased) == pytest.approx(
            expected[0], rel=1e-10
        )
    with pytest.raises(ValueError, match="square kernels"):
        cka_from_kernels(K[0], L[0][:, :3])


def test_kernel_sides_pair_one_set_with_many() -> None:
    """A side of one set against a side of B sets (a shuffled pairing keeps the X side): each
    value is CKA of that set's kernel against the other side's kernel of the same position."""
    rng = np.random.default_rng(10)
    X, Y = paired(rng, n=30)
    orders = np.stack([rng.permutation(30) for _ in range(5)])
    K = X @ X.T
    L = np.stack([Y[order] @ Y[order].T for order in orders])
    for unbiased, name in ((False, "cka"), (True, "unbiased_cka")):
        expected = [measure(name, X, Y[order]) for order in orders]
        one_many = cka_from_kernel_sides(kernel_side(K), kernel_side(L), unbiased=unbiased)
        many_one = cka_from_kernel_sides(kernel_side(L), kernel_side(K), unbiased=unbiased)
        np.testing.assert_allclose(one_many, expected, rtol=1e-10)
        np.testing.assert_allclose(many_one, expected, rtol=1e-10)  # CKA is symmetric
    with pytest.raises(ValueError, match="square kernels"):
        cka_from_kernel_sides(kernel_side(L[:2]), kernel_side(L[:3]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernel_side(np.full((4, 4), np.nan))


@pytest.mark.parametrize(("n", "q"), [(40, 3), (40, 7), (12, 5)])
def test_svcca_matches_dense_reference(n: int, q: int) -> None:
    X, Y = paired(np.random.default_rng(n + q), n=n, dx=9, dy=8)
    assert measure("svcca", X, Y, cca_dim=q) == pytest.approx(ref_svcca(X, Y, q), abs=1e-10)


def test_svcca_gram_route_when_stimuli_outnumber_features() -> None:
    X, Y = paired(np.random.default_rng(10), n=200, dx=6, dy=5)
    # s > d takes the eigh route; s <= d the SVD route (on the transposed problem's size)
    assert measure("svcca", X, Y, cca_dim=4) == pytest.approx(ref_svcca(X, Y, 4), abs=1e-10)


def test_svcca_rank_deficient_features_are_explained() -> None:
    rng = np.random.default_rng(11)
    X = rng.standard_normal((30, 2)) @ rng.standard_normal((2, 8))  # rank 2
    Y = rng.standard_normal((30, 8))
    with pytest.raises(ValueError, match="fewer than cca_dim=5 independent directions"):
        measure("svcca", X, Y, cca_dim=5)


@pytest.mark.parametrize("name", [m for m in metrics.metric_names()
                                  if metrics.metric(m).feature_side is not None])
def test_a_split_feature_metric_equals_its_function_from_one_side_per_model(name) -> None:
    """feature_side once per model, from_feature_sides per pair: the same value as the metric's
    function on each pair (what set_metric_values relies on when one model meets many)."""
    entry = metrics.metric(name)
    rng = np.random.default_rng(12)
    X, Y = paired(rng, n=50, dx=30, dy=12)  # s > d and s ≤ d routes: a wide third model
    Z = np.hstack([Y, rng.standard_normal((50, 60))])
    choices = [{"cca_dim": 6}] if name == "svcca" else [{}, {"kernel": "rbf", "sigma": 3.0}]
    for options in choices:
        merged = {**entry.options, **options}
        sides = [entry.feature_side(F, **merged) for F in (X, Y, Z)]
        for (i, A), (j, B) in [((0, X), (1, Y)), ((0, X), (2, Z)), ((2, Z), (1, Y)),
                               ((2, Z), (2, Z))]:
            assert entry.from_feature_sides(sides[i], sides[j]) == pytest.approx(
                measure(name, A, B, **options), abs=1e-12
            )
        with pytest.raises(ValueError, match="same stimuli"):
            entry.from_feature_sides(sides[0], entry.feature_side(X[:-1], **merged))
        # a shuffled pairing reorders a side instead of making a new one: the same values
        order = rng.permutation(X.shape[0])
        for i, F in enumerate((X, Y, Z)):
            reordered = entry.permuted_feature_side(sides[i], order)
            for j in range(3):
                assert entry.from_feature_sides(sides[j], reordered) == pytest.approx(
                    measure(name, (X, Y, Z)[j], F[order], **options), abs=1e-12
                )


# --- invariances ----------------------------------------------------------------------------------
def transform(name: str, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if name == metrics.ORTHOGONAL:
        return X @ random_orthogonal(rng, X.shape[1])
    if name == metrics.ISOTROPIC_SCALING:
        return 3.7 * X
    if name == metrics.TRANSLATION:
        return X + rng.standard_normal(X.shape[1]) * 2.0
    if name == metrics.FEATURE_SCALING:
        return X * np.exp(rng.standard_normal(X.shape[1]))
    raise AssertionError(name)


OPTIONS = {
    "cknna": {"k": 6},
    "mutual_knn": {"k": 6},
    "cycle_knn": {"k": 6},
    "lcs_knn": {"k": 6},
    "edit_distance_knn": {"k": 6},
    "svcca": {"cca_dim": 4},
}


@pytest.mark.parametrize("name", metric_names())
def test_claimed_invariances_hold_and_claimed_variances_show(name: str) -> None:
    rng = np.random.default_rng(12)
    X, Y = paired(rng, n=60, dx=8, dy=8, noise=1.0)
    entry = metric(name)
    options = OPTIONS.get(name, {})
    value = measure(name, X, Y, **options)
    lo, hi = entry.value_range
    assert lo - 0.05 <= value <= hi + 1e-9
    for t in entry.invariances:
        if t == metrics.STIMULUS_PERMUTATION:
            p = rng.permutation(len(X))
            moved = measure(name, X[p], Y[p], **options)
        else:
            moved = measure(name, transform(t, X, rng), transform(t, Y, rng), **options)
        # CKA-like scores carry the reference's +1e-6 in the denominator, SVCCA its +1e-8
        assert moved == pytest.approx(value, abs=1e-5), (name, t)
    for t in entry.not_invariant:
        moved = measure(name, transform(t, X, rng), Y, **options)
        assert abs(moved - value) > 1e-3, (name, t)
    swapped = measure(name, Y, X, **options)
    if entry.symmetric:
        assert swapped == pytest.approx(value, abs=1e-12)
    else:
        assert swapped != pytest.approx(value, abs=1e-6)


def test_rbf_cka_is_not_scale_invariant_but_is_rotation_invariant() -> None:
    rng = np.random.default_rng(13)
    X, Y = paired(rng, n=40)
    value = measure("cka", X, Y, kernel="rbf", sigma=2.0)
    assert abs(measure("cka", 3 * X, 3 * Y, kernel="rbf", sigma=2.0) - value) > 1e-2
    Q, R = random_orthogonal(rng, 9), random_orthogonal(rng, 7)
    assert measure("cka", X @ Q, Y @ R, kernel="rbf", sigma=2.0) == pytest.approx(value, rel=1e-10)


def test_identical_representations_score_one() -> None:
    X, _ = paired(np.random.default_rng(14), n=50)
    for name in metric_names():
        value = measure(name, X, X, **OPTIONS.get(name, {}))
        if name == "cycle_knn":
            # k-NN is not a symmetric relation: i need not be a neighbour of its own neighbours
            assert value == pytest.approx(ref_cycle_knn(X, X, 6)) and value < 1.0
        else:
            assert value == pytest.approx(1.0, abs=1e-5), name


def test_a_cka_side_keeps_the_cross_sums_of_the_last_side_only() -> None:
    """CKA then unbiased CKA of one pair share the cross term, and a set's side that meets many
    reordered sides (a calibration's shuffles) does not keep them all alive."""
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((30, 6)), rng.standard_normal((30, 5))
    x = metrics.cka_feature_side(X)
    y = metrics.cka_feature_side(Y)
    first = metrics.cka_from_feature_sides(x, y)
    assert list(x.crosses) == [id(y)]
    metrics.unbiased_cka_from_feature_sides(x, y)  # the same cross sums, reused
    assert x.crosses[id(y)][0] is y
    for _ in range(5):
        metrics.cka_from_feature_sides(x, metrics.permuted_cka_side(y, rng.permutation(30)))
    assert len(x.crosses) == 1
    assert metrics.cka_from_feature_sides(x, y) == first


def test_torch_tensors_are_measured_as_their_values() -> None:
    """Model outputs go in directly: a tensor that requires grad, or in bfloat16 (which numpy
    lacks), is measured as its detached values (numpy could not read either)."""
    import torch

    X, Y = paired(np.random.default_rng(4))
    expected = measure("cknna", X, Y, k=5)
    graded = torch.tensor(X, requires_grad=True)
    assert measure("cknna", graded, torch.tensor(Y), k=5) == pytest.approx(expected, abs=1e-12)
    X16, Y16 = (torch.tensor(a).to(torch.bfloat16) for a in (X, Y))
    assert measure("cka", X16, Y16) == pytest.approx(
        measure("cka", X16.float().numpy(), Y16.float().numpy()), abs=1e-12
    )


def test_duplicated_stimuli_have_the_same_neighbours_in_the_dense_metrics_and_the_engine() -> None:
    """Stimuli present twice (the same image and caption): their rows are identical, an exact
    tie that both break by position. The dense table took its values from one BLAS product,
    which put identical rows an ulp apart (mutual k-NN 0.434 against the engine's 0.447)."""
    from convergence_core.neighbours import NeighbourIndex, subset_alignment

    rng = np.random.default_rng(0)
    for _ in range(40):
        n, d = int(rng.integers(40, 120)), int(rng.choice([5, 17, 33, 130]))
        X, Y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        source, copy = rng.choice(n, n // 4, replace=False), rng.choice(n, n // 4, replace=False)
        X[copy], Y[copy] = X[source], Y[source]
        ix = NeighbourIndex.from_features(X, list_size=n - 1)
        iy = NeighbourIndex.from_features(Y, list_size=n - 1)
        prepared_x, prepared_y = ix.features.all_rows(), iy.features.all_rows()
        for k in (1, 3):
            engine = subset_alignment({"x": ix, "y": iy}, [("x", "y")], np.arange(n), k,
                                      metrics=("mutual_knn",))
            for F, index in ((prepared_x, ix), (prepared_y, iy)):
                np.testing.assert_array_equal(nearest_neighbours(F, k).indices,
                                              index.lists.indices[:, :k])
            assert metrics.mutual_knn(prepared_x, prepared_y, k) == engine.mutual_knn[0, 0]



def test_a_negative_self_alignment_is_nan_not_a_number_outside_the_range() -> None:
    """The unbiased self-HSIC of a small set can be negative; the normalised alignment is then
    undefined (NaN, as the square root of a negative product), never a finite value: with the
    absolute value taken instead, CKNNA of this planted 4-stimulus set read -1.93, outside
    [-1, 1], and would have entered means and p-values."""
    assert np.isnan(metrics.normalised_alignment(0.3, -0.5, 2.0))
    assert np.isnan(metrics.normalised_alignment(0.3, 2.0, -0.5))
    assert metrics.normalised_alignment(0.3, 0.5, 2.0) == pytest.approx(0.3 / (1.0 + 1e-6))
    rng = np.random.default_rng(1226)
    s = int(rng.integers(4, 12))
    k = int(rng.integers(2, s))
    x = rng.standard_normal((s, 2)) + rng.uniform(0, 3)
    y = rng.standard_normal((s, 2)) + rng.uniform(0, 3)
    assert (s, k) == (4, 2)
    assert np.isnan(metrics.cknna(x, y, k=k))
