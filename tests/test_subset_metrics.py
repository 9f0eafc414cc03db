"""Any registry metric on many sets and on shuffled pairings (convergence_core/subset_metrics.py),
against the metric on each set's prepared features (metrics.measure: the dense definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core import metrics
from convergence_core.neighbours import NeighbourIndex, PreparedFeatures, build_neighbour_lists
from convergence_core.subset_metrics import (
    DENSE_GRAM_STIMULI,
    cca_dim_limit,
    metric_on_sets,
    metric_options,
    metric_values,
    set_scorer,
)


def metric_on_pairings(x, y, rows_x, rows_y, metric, *, k=10, options=None,  # noqa: ANN001, ANN201
                       dense_limit=DENSE_GRAM_STIMULI):
    """(B,): ``metric`` of X[rows_x[b]] against Y[rows_y[b]], row m paired with row m —
    :func:`metric_values` of the one pair with ``paired_with`` (once the package's own function,
    used by nothing but tests)."""
    return metric_values({"x": x, "y": y}, [("x", "y")], rows_x, [metric], paired_with=rows_y,
                         k=k, options={metric: options or {}}, dense_limit=dense_limit)[metric][0]


#: (metric, options) covering every registry entry and both kernels
CASES = [
    ("cknna", {}),
    ("mutual_knn", {}),
    ("cycle_knn", {}),
    ("lcs_knn", {}),
    ("edit_distance_knn", {}),
    ("cka", {}),
    ("cka", {"kernel": "rbf", "sigma": 0.7}),
    ("unbiased_cka", {}),
    ("unbiased_cka", {"kernel": "rbf", "sigma": 1.3}),
    ("svcca", {"cca_dim": 4}),
]


def _index(X: np.ndarray, list_size: int = 12) -> NeighbourIndex:
    features = PreparedFeatures.from_raw(X, 0.95)
    return NeighbourIndex(features, build_neighbour_lists(features, list_size))


@pytest.fixture(scope="module")
def indexes() -> dict[str, NeighbourIndex]:
    """Three 'models' of 90 stimuli sharing a latent structure (no exact ties)."""
    rng = np.random.default_rng(7)
    latent = rng.standard_normal((90, 6))
    out = {}
    for key, d in (("a", 20), ("b", 14), ("c", 9)):
        X = latent @ rng.standard_normal((6, d)) + 0.6 * rng.standard_normal((90, d))
        out[key] = _index(X)
    return out


def _dense(indexes, x, y, rows_x, rows_y, metric, k, options) -> float:
    X = indexes[x].features.rows(np.asarray(rows_x))
    Y = indexes[y].features.rows(np.asarray(rows_y))
    if metrics.metric(metric).neighbour_metric:
        return metrics.measure(metric, X, Y, k=k, **options)
    return metrics.measure(metric, X, Y, **options)


@pytest.mark.parametrize(("metric", "options"), CASES)
@pytest.mark.parametrize("dense_limit", [10_000, 0])
def test_every_metric_on_sets_equals_the_metric_on_the_sets_features(
    indexes, metric, options, dense_limit
) -> None:
    rng = np.random.default_rng(1)
    sets = np.stack([rng.choice(90, 30, replace=False) for _ in range(5)])
    pairs = [("a", "b"), ("c", "a")]
    k = 7
    values = metric_on_sets(
        indexes, pairs, sets, metric, k=k, options=options, dense_limit=dense_limit
    )
    assert values.shape == (2, 5)
    for p, (x, y) in enumerate(pairs):
        for b, rows in enumerate(sets):
            expected = _dense(indexes, x, y, np.sort(rows), np.sort(rows), metric, k, options)
            assert values[p, b] == pytest.approx(expected, abs=1e-9), (metric, p, b)


@pytest.mark.parametrize(("metric", "options"), CASES)
@pytest.mark.parametrize("dense_limit", [10_000, 0])
def test_shuffled_pairings_equal_the_metric_on_the_paired_rows(
    indexes, metric, options, dense_limit
) -> None:
    """On the per-set route (``dense_limit`` 0) a feature metric's side of the set is made once
    and reordered for each shuffle (``permuted_feature_side``): the same values."""
    rng = np.random.default_rng(2)
    rows = np.sort(rng.choice(90, 28, replace=False))
    shuffles = np.stack([rows[rng.permutation(28)] for _ in range(4)])
    rows_x = np.broadcast_to(rows, shuffles.shape)
    k = 6
    values = metric_on_pairings(
        indexes["a"], indexes["b"], rows_x, shuffles, metric, k=k, options=options,
        dense_limit=dense_limit,
    )
    for b in range(4):
        expected = _dense(indexes, "a", "b", rows, shuffles[b], metric, k, options)
        assert values[b] == pytest.approx(expected, abs=1e-9), (metric, b)
    # both sides in one new order = the set itself (every metric is permutation invariant)
    order = rng.permutation(28)
    same = metric_on_pairings(
        indexes["a"], indexes["b"], rows[order][None], rows[order][None], metric, k=k,
        options=options, dense_limit=dense_limit,
    )
    on_set = metric_on_sets(indexes, [("a", "b")], rows, metric, k=k, options=options)
    assert same[0] == pytest.approx(on_set[0, 0], abs=1e-9)


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
@pytest.mark.parametrize("dense_limit", [10_000, 0])
def test_pairings_of_different_sets_on_both_sides(indexes, metric, dense_limit) -> None:
    """Every set of X paired with another set of Y (neither side fixed): each value is the metric
    on those rows, on the (n, n)-kernel route and the per-set route."""
    rng = np.random.default_rng(3)
    rows_x = np.stack([rng.choice(90, 24, replace=False) for _ in range(5)])
    rows_y = np.stack([rng.choice(90, 24, replace=False) for _ in range(5)])
    values = metric_on_pairings(
        indexes["a"], indexes["b"], rows_x, rows_y, metric, dense_limit=dense_limit
    )
    for b in range(5):
        expected = _dense(indexes, "a", "b", rows_x[b], rows_y[b], metric, 5, {})
        assert values[b] == pytest.approx(expected, abs=1e-9), (metric, b)


@pytest.mark.parametrize("dense_limit", [10_000, 0])
def test_every_metric_of_every_pair_at_once_equals_one_call_each(indexes, dense_limit) -> None:
    """``metric_values`` shares tables, kernels and sides between pairs and metrics (CKA and
    unbiased CKA share a side; "a" is in two pairs): every value is the one-metric, one-pair
    answer, on shuffled pairings and on plain sets alike."""
    rng = np.random.default_rng(4)
    rows = np.sort(rng.choice(90, 30, replace=False))
    shuffles = np.stack([rows, *(rows[rng.permutation(30)] for _ in range(5))])
    rows_x = np.broadcast_to(rows, shuffles.shape)
    names = [name for name, _ in CASES[:6]] + ["unbiased_cka", "svcca"]
    options = {"svcca": {"cca_dim": 4}}
    pairs = [("a", "b"), ("a", "c"), ("c", "b")]
    told = []
    values = metric_values(
        indexes, pairs, rows_x, names, paired_with=shuffles, k=5, options=options,
        dense_limit=dense_limit, progress=lambda *call: told.append(call),
    )
    assert list(values) == names and told == [(b, 6) for b in range(1, 7)]  # SVCCA per pairing
    for name in names:
        for p, (x, y) in enumerate(pairs):
            one = metric_on_pairings(
                indexes[x], indexes[y], rows_x, shuffles, name, k=5,
                options=options.get(name), dense_limit=dense_limit,
            )
            np.testing.assert_allclose(values[name][p], one, rtol=0, atol=1e-12)
    sets = np.stack([np.sort(rng.choice(90, 25, replace=False)) for _ in range(3)])
    on_sets = metric_values(indexes, pairs, sets, names, k=5, options=options,
                            dense_limit=dense_limit)
    for name in names:
        np.testing.assert_allclose(
            on_sets[name],
            metric_on_sets(indexes, pairs, sets, name, k=5, options=options.get(name),
                           dense_limit=dense_limit),
            rtol=0, atol=1e-12,
        )
    with pytest.raises(ValueError, match="options name metrics not asked for"):
        metric_values(indexes, pairs, sets, ["cka"], options={"svcca": {"cca_dim": 2}})
    with pytest.raises(ValueError, match="on_error must be"):
        metric_values(indexes, pairs, sets, ["cka"], on_error="ignore")
    with pytest.raises(ValueError, match="pairs is empty"):
        metric_values(indexes, [], sets, ["cka"])
    # a kernel or width that is not one is refused on the (n, n)-kernel route too, which never
    # calls metrics.measure
    for dense_limit in (10_000, 0):
        with pytest.raises(ValueError, match="kernel must be 'linear' or 'rbf'"):
            metric_on_sets(indexes, pairs, sets, "cka", options={"kernel": "bogus"},
                           dense_limit=dense_limit)
        with pytest.raises(ValueError, match="sigma .* must be a positive number"):
            metric_values(indexes, pairs, sets, ["unbiased_cka"], dense_limit=dense_limit,
                          options={"unbiased_cka": {"kernel": "rbf", "sigma": -1.0}},
                          on_error="nan")


def test_a_metric_undefined_on_a_pairing_gives_nan_when_asked(indexes) -> None:
    """SVCCA with more CCA directions than a set's rows allow: an error, or NaN for that metric
    only (``on_error="nan"``); the other metrics keep their values."""
    rows = np.arange(8)
    with pytest.raises(ValueError):
        metric_values(indexes, [("a", "b")], rows, ["svcca"], options={"svcca": {"cca_dim": 12}},
                      dense_limit=0)
    values = metric_values(indexes, [("a", "b")], rows, ["svcca", "cka"], dense_limit=0,
                           options={"svcca": {"cca_dim": 12}}, on_error="nan")
    assert np.isnan(values["svcca"]).all() and np.isfinite(values["cka"]).all()


def test_cca_dim_limit_is_the_set_size_and_the_narrowest_layer() -> None:
    """The report's and the lab's bound on SVCCA's cca_dim: min(set size − 1, every width), at
    least 1; SVCCA at that bound is defined, one more raises (metrics.svcca's own check)."""
    assert cca_dim_limit(15, [24, 16]) == 14
    assert cca_dim_limit(15, [24, 3]) == 3  # a brain region of 3 features
    assert cca_dim_limit(40, [1, 768]) == 1  # a model of one feature
    assert cca_dim_limit(4, [20]) == 3
    with pytest.raises(ValueError, match="feature width"):
        cca_dim_limit(15, [])
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((15, 24)), rng.standard_normal((15, 3))
    limit = cca_dim_limit(15, [X.shape[1], Y.shape[1]])
    assert np.isfinite(metrics.measure("svcca", X, Y, cca_dim=limit))
    with pytest.raises(ValueError, match="cca_dim"):
        metrics.measure("svcca", X, Y, cca_dim=limit + 1)


def test_metric_on_sets_gives_nan_on_a_set_where_svcca_is_undefined() -> None:
    """Repeated stimuli: a set of 6 distinct stimuli twice over has fewer independent directions
    than cca_dim=8, so SVCCA is undefined there: an error by default, NaN with on_error="nan",
    where the other sets keep the value of metrics.measure."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((40, 20))
    Y = X @ rng.standard_normal((20, 12)) + 0.5 * rng.standard_normal((40, 12))
    X[20:26], Y[20:26] = X[:6], Y[:6]  # stimuli 20..25 repeat 0..5
    x, y = _index(X), _index(Y)
    sets = np.stack([np.r_[0:6, 20:26], np.arange(6, 18)])
    with pytest.raises(ValueError, match="independent directions"):
        metric_on_sets({"x": x, "y": y}, [("x", "y")], sets, "svcca", options={"cca_dim": 8})
    values = metric_on_sets({"x": x, "y": y}, [("x", "y")], sets, "svcca",
                            options={"cca_dim": 8}, on_error="nan")
    assert np.isnan(values[0, 0])
    expected = metrics.measure("svcca", x.features.rows(sets[1]), y.features.rows(sets[1]),
                               cca_dim=8)
    assert values[0, 1] == pytest.approx(expected, abs=1e-9)


def test_a_planted_pairing_scores_above_its_shuffles(indexes) -> None:
    """X paired with a scaled copy of itself with its features reordered (the prepared features
    are then the same up to column order): every shuffle destroys the alignment."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 8))
    x, y = _index(X), _index(3.0 * X[:, rng.permutation(8)])
    rows = np.arange(60)
    shuffles = np.stack([rng.permutation(60) for _ in range(10)])
    for metric in ("cknna", "mutual_knn", "cka"):
        true = metric_on_pairings(x, y, rows[None], rows[None], metric, k=5)[0]
        null = metric_on_pairings(x, y, np.broadcast_to(rows, (10, 60)), shuffles, metric, k=5)
        assert true == pytest.approx(1.0, abs=1e-3) and np.all(null < 0.5), metric  # +1e-6


def test_scorer_and_options_are_checked(indexes) -> None:
    score = set_scorer(indexes, [("a", "b")], "mutual_knn", k=5)
    sets = np.arange(40).reshape(2, 20)
    np.testing.assert_array_equal(
        score(sets), metric_on_sets(indexes, [("a", "b")], sets, "mutual_knn", k=5)
    )
    assert metric_options("cka", {"kernel": "rbf", "k": 10}) == {"kernel": "rbf", "sigma": 1.0}
    with pytest.raises(ValueError, match="does not take 'cca_dim'; it takes kernel, sigma"):
        metric_options("cka", {"cca_dim": 3})
    with pytest.raises(ValueError, match="unknown metric 'r2'"):
        metric_on_sets(indexes, [("a", "b")], sets, "r2")
    with pytest.raises(ValueError, match="no neighbour index"):
        metric_on_sets(indexes, [("a", "z")], sets, "cka")
    with pytest.raises(ValueError, match="same shape"):
        metric_on_pairings(indexes["a"], indexes["b"], sets, sets[:, :10], "cka")


def test_neighbour_options_are_honoured_on_sets_as_on_pairings(indexes) -> None:
    """lcs_knn's normalise=False was refused on sets (the engine took defaults only) and
    accepted on pairings of the same rows (from the audit)."""
    sets = np.arange(40).reshape(2, 20)
    raw = metric_on_sets(indexes, [("a", "b")], sets, "lcs_knn", k=5,
                         options={"normalise": False})
    paired = metric_on_pairings(indexes["a"], indexes["b"], sets, sets, "lcs_knn", k=5,
                                options={"normalise": False})
    dense = [_dense(indexes, "a", "b", rows, rows, "lcs_knn", 5, {"normalise": False})
             for rows in sets]
    np.testing.assert_allclose(raw[0], dense, atol=1e-12)
    np.testing.assert_allclose(paired, dense, atol=1e-12)
    normalised = metric_on_sets(indexes, [("a", "b")], sets, "lcs_knn", k=5)
    np.testing.assert_allclose(raw, 5 * normalised, atol=1e-12)


def test_the_engine_computes_only_the_metrics_asked_for(indexes) -> None:
    """A lab showing one metric does not pay for CKNNA (neighbours.subset_alignment)."""
    from convergence_core.neighbours import subset_alignment

    sets = np.arange(40).reshape(2, 20)
    result = subset_alignment(indexes, [("a", "b")], sets, 5, metrics=["cycle_knn"])
    assert list(result.values) == ["cycle_knn"] and result.cknna is None
    default = subset_alignment(indexes, [("a", "b")], sets, 5)
    assert set(default.values) == {"cknna", "mutual_knn"} and default.cknna.shape == (1, 2)
    with pytest.raises(ValueError, match="metrics is empty"):
        subset_alignment(indexes, [("a", "b")], sets, 5, metrics=[])


def test_dense_kernels_are_kept_between_calls_and_read_only(indexes) -> None:
    from convergence_core import subset_metrics

    first = subset_metrics._dense_kernel(indexes["a"], "linear", 1.0)
    assert subset_metrics._dense_kernel(indexes["a"], "linear", 1.0) is first
    assert not first.flags.writeable
    rbf = subset_metrics._dense_kernel(indexes["a"], "rbf", 0.5)
    assert rbf is not first and np.allclose(np.diagonal(rbf), 1.0)


def test_shuffled_pairings_in_many_chunks_complete_each_row_once(monkeypatch) -> None:
    """The calibration's shuffled pairings of a set come in chunks, and each chunk asks for the
    set's tables again (``NeighbourIndex.tables``): the members whose stored lists hold fewer
    than k of the set were completed from the features once per chunk, O(s²·d) each time. The
    index now keeps them: each row is completed once, whatever the number of chunks."""
    from convergence_core import neighbours, subset_metrics

    counted = {"rows": 0}
    exact = neighbours.exact_top_k
    dense = metrics.neighbours_of_rows

    def exact_rows(features, k, *, queries=None, **options):  # noqa: ANN001, ANN003, ANN202
        counted["rows"] += features.n if queries is None else len(queries)
        return exact(features, k, queries=queries, **options)

    def dense_rows(F, rows, k, **options):  # noqa: ANN001, ANN003, ANN202
        counted["rows"] += len(rows)
        return dense(F, rows, k, **options)

    rng = np.random.default_rng(11)
    latent = rng.standard_normal((90, 5))
    x, y = (_index(latent @ rng.standard_normal((5, d)) + 0.5 * rng.standard_normal((90, d)),
                   list_size=4) for d in (12, 8))
    monkeypatch.setattr(neighbours, "exact_top_k", exact_rows)
    monkeypatch.setattr(metrics, "neighbours_of_rows", dense_rows)
    rows = np.sort(rng.choice(90, 28, replace=False))
    shuffles = np.stack([rows[rng.permutation(28)] for _ in range(8)])
    rows_x = np.broadcast_to(rows, shuffles.shape)
    k = 6
    monkeypatch.setattr(subset_metrics, "_CHUNK_ELEMENTS", 28 * k * k)  # one pairing a chunk
    values = metric_on_pairings(x, y, rows_x, shuffles, "cknna", k=k)
    completed = counted["rows"]
    indexes = {"a": x, "b": y}
    for b in range(8):
        expected = _dense(indexes, "a", "b", rows, shuffles[b], "cknna", k, {})
        assert values[b] == pytest.approx(expected, abs=1e-9), b
    short = [int((np.isin(index.lists.indices[rows], rows).sum(axis=1) < k).sum())
             for index in (x, y)]
    assert all(short)
    # each side once: its short rows, or the whole set when they are at least half of it
    assert completed == sum(28 if r >= 14 else r for r in short)
