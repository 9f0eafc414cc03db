"""Retrieval through the universal space: ranks and top matches against slow references, blocks,
planted answers (a shared latent is retrieved far above chance, shuffled pairs give chance, low
dispersion retrieves better than high), the ridge baseline recovers a planted linear map."""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd
import pytest

from convergence_core import retrieval
from convergence_core.retrieval import (
    chance_metrics,
    cross_validated_retrieval,
    fit_ridge_baseline,
    retrieval_metrics,
    retrieval_ranks,
    summarise_retrieval,
    top_matches,
)
from convergence_core.universal import Member
from tests.fixtures_runs import make_synthetic_run

MEMBERS = [
    Member("cam-a", "final", "vision"),
    Member("cam-b", "final", "vision"),
    Member("text-a", "last", "language"),
    Member("text-b", "last", "language"),
]


def slow_scores(queries, gallery, similarity):
    out = np.empty((len(queries), len(gallery)))
    for i, q in enumerate(queries):
        for j, g in enumerate(gallery):
            if similarity == "cosine":
                out[i, j] = q @ g / (np.linalg.norm(q) * np.linalg.norm(g))
            else:
                out[i, j] = -np.sum((q - g) ** 2)
    return out


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
@pytest.mark.parametrize("block_rows", [None, 1, 4])
def test_ranks_match_a_slow_reference(similarity, block_rows):
    rng = np.random.default_rng(0)
    queries, gallery = rng.standard_normal((13, 5)), rng.standard_normal((13, 5))
    scores = slow_scores(queries, gallery, similarity)
    expected = [
        1 + sum(scores[i, j] >= scores[i, i] for j in range(13) if j != i) for i in range(13)
    ]
    ranks = retrieval_ranks(queries, gallery, similarity=similarity, block_rows=block_rows)
    np.testing.assert_array_equal(ranks, expected)


def test_ties_count_against_the_true_match():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # items 0 and 2 tie for query 0
    np.testing.assert_array_equal(retrieval_ranks(queries, gallery), [2, 1, 3])
    constant = np.ones((6, 3))
    np.testing.assert_array_equal(retrieval_ranks(constant, constant), [6] * 6)


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_a_duplicate_of_the_true_match_is_a_tie_whatever_the_rounding(similarity):
    """Stimuli duplicated at the end of the set (the same image and caption twice): BLAS gives
    identical gallery rows in a block's tail scores an ulp apart, which broke the tie in favour
    of the true match (rank 1) in about a tenth of the queries."""
    rng = np.random.default_rng(0)
    for n, p in ((333, 17), (500, 64), (1001, 100)):
        queries = rng.standard_normal((n, p))
        gallery = queries + 0.3 * rng.standard_normal((n, p))
        queries[-8:], gallery[-8:] = queries[:8], gallery[:8]  # 8 stimuli twice
        ranks = retrieval_ranks(queries, gallery, similarity=similarity)
        twice = [*range(8), *range(n - 8, n)]
        assert (ranks[twice] >= 2).all(), (n, p)  # its twin scores as high as the true match


def test_the_rounding_allowance_is_per_pair_not_the_galleries_largest():
    """One stimulus of a huge norm must not make other queries' near-misses count as ties (a
    slack scaled by the gallery's largest norm changed 78 of 2,000 ranks, from the review)."""
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((2000, 64))
    gallery = queries + 0.3 * rng.standard_normal((2000, 64))
    expected = retrieval_ranks(queries, gallery, similarity="euclidean")
    queries[7] *= 1e7
    gallery[7] *= 1e7
    ranks = retrieval_ranks(queries, gallery, similarity="euclidean")
    others = np.arange(2000) != 7
    # the others' ranks as they were (row 7 is far from every other: it changes none of them)
    np.testing.assert_array_equal(ranks[others], expected[others])


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
def test_euclidean_ranks_do_not_change_when_every_row_moves_far_from_the_origin(offset):
    """Distances expanded as 2 q·g − |g|² − |q|² lost their differences to rounding once the rows
    sat far from the origin (from a review: an offset of 1e6 changed 482 of 500 ranks); a shift
    of both sides changes no distance."""
    rng = np.random.default_rng(12)
    queries = rng.standard_normal((500, 16))
    gallery = queries + 2.0 * rng.standard_normal((500, 16))
    expected = retrieval_ranks(queries, gallery, similarity="euclidean")
    shift = offset * rng.standard_normal(16)
    shifted = retrieval_ranks(queries + shift, gallery + shift, similarity="euclidean")
    np.testing.assert_array_equal(shifted, expected)
    indices, distances = top_matches(
        queries[:5] + shift, gallery + shift, 3, similarity="euclidean"
    )
    reference = np.linalg.norm(queries[:5, None, :] - gallery[None], axis=-1)
    np.testing.assert_array_equal(indices, np.argsort(reference, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(
        distances, np.take_along_axis(reference, indices, axis=1), rtol=1e-9 * offset
    )


def test_perfect_pairs_rank_first_and_reversed_pairs_last():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 4))
    assert np.all(retrieval_ranks(x, 3.0 * x) == 1)
    assert np.all(retrieval_ranks(x, x, similarity="euclidean") == 1)


def test_blocks_never_exceed_the_memory_budget(monkeypatch):
    rng = np.random.default_rng(2)
    queries, gallery = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    full = retrieval_ranks(queries, gallery)
    seen: list[tuple[int, ...]] = []
    original = retrieval._Scorer.__call__

    def recording(self, block):
        out = original(self, block)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(retrieval._Scorer, "__call__", recording)
    monkeypatch.setattr(retrieval, "BLOCK_ELEMENTS", 400)
    np.testing.assert_array_equal(retrieval_ranks(queries, gallery), full)
    assert len(seen) == 7 and max(rows * cols for rows, cols in seen) <= 400


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_top_matches_match_a_sorted_reference_with_ties_to_the_lower_index(similarity):
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((30, 4))
    gallery[17] = gallery[4]  # an exact tie
    queries = np.vstack([gallery[4] + 0.01, rng.standard_normal((5, 4))])
    indices, values = top_matches(queries, gallery, 6, similarity=similarity, block_rows=2)
    scores = slow_scores(queries, gallery, similarity)
    for row in range(len(queries)):
        order = sorted(range(30), key=lambda j: (-scores[row, j], j))[:6]
        np.testing.assert_array_equal(indices[row], order)
        expected = scores[row, order] if similarity == "cosine" else np.sqrt(-scores[row, order])
        np.testing.assert_allclose(values[row], expected, atol=1e-12)
    assert list(indices[0][:2]) == [4, 17]


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_top_matches_list_a_duplicate_right_after_its_twin_with_the_same_score(similarity):
    """The same image and caption twice: BLAS scores a gallery row and its duplicate an ulp
    apart, which listed the later one first (or cut one at the k-th place) for 17 of 96 such
    queries before; within rounding they tie and go in index order."""
    rng = np.random.default_rng(0)
    for n, p in ((333, 17), (500, 64), (1001, 100)):
        queries = rng.standard_normal((n, p))
        gallery = queries + 0.3 * rng.standard_normal((n, p))
        queries[-8:], gallery[-8:] = queries[:8], gallery[:8]  # 8 stimuli twice
        indices, values = top_matches(queries, gallery, 5, similarity=similarity)
        for row in [*range(8), *range(n - 8, n)]:
            first, twin = row % (n - 8), row % (n - 8) + n - 8
            listed = list(indices[row])
            assert (first in listed) == (twin in listed), (n, row, listed)
            if first in listed:
                place = listed.index(first)
                assert listed[place + 1] == twin, (n, row, listed)
                assert values[row, place] == values[row, place + 1]


def test_metrics_and_chance():
    metrics = retrieval_metrics(np.array([1, 2, 6, 11, 1]), ks=(1, 5, 10))
    assert metrics == {
        "recall_at_1": 0.4,
        "recall_at_5": 0.6,
        "recall_at_10": 0.8,
        "median_rank": 2.0,
    }
    assert chance_metrics(8, (1, 5, 10)) == {
        "recall_at_1": 1 / 8,
        "recall_at_5": 5 / 8,
        "recall_at_10": 1.0,
        "median_rank": 4.5,
    }


def planted_pairs(n=300, latent_dim=8, noise=0.3, seed=0, caption_noise=None):
    """Images (2 vision models) and captions (2 language models) that share a latent."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent_dim))
    caption_noise = np.full(n, noise) if caption_noise is None else caption_noise
    out = []
    for d in (20, 24):
        out.append(z @ rng.standard_normal((latent_dim, d)) + noise * rng.standard_normal((n, d)))
    for d in (15, 18):
        out.append(
            z @ rng.standard_normal((latent_dim, d))
            + caption_noise[:, None] * rng.standard_normal((n, d))
        )
    return out


def recall(result, method, metric="recall_at_1", subset="all", direction="vision_to_language"):
    summary = result.summary()
    row = summary[
        (summary.method == method)
        & (summary.metric == metric)
        & (summary.subset == subset)
        & (summary.direction == direction)
    ]
    assert len(row) == 1
    return float(row["mean"].iloc[0])


@pytest.fixture(scope="module")
def planted_result():
    return cross_validated_retrieval(planted_pairs(), MEMBERS, n_folds=5, seed=0)


def test_a_planted_latent_is_retrieved_far_above_chance(planted_result):
    chance = recall(planted_result, "chance")
    assert chance == pytest.approx(1 / 60)
    for direction in ("vision_to_language", "language_to_vision"):
        assert recall(planted_result, "universal", direction=direction) > 0.5
        assert recall(planted_result, "ridge", direction=direction) > 0.5
    assert recall(planted_result, "universal", "median_rank") <= 2
    ranks = planted_result.ranks
    assert len(ranks) == 300 * 2 * 2 and set(ranks.fold) == set(range(5))
    assert sorted(
        ranks.query("method == 'universal' and direction == 'vision_to_language'").stimulus
    ) == list(range(300))


def test_shuffled_pairs_give_chance():
    features = planted_pairs()
    permutation = np.random.default_rng(11).permutation(300)
    features[2], features[3] = features[2][permutation], features[3][permutation]
    result = cross_validated_retrieval(features, MEMBERS, n_folds=5, seed=0, ridge=False)
    pooled = result.ranks.query("method == 'universal'")
    # under the null a rank is uniform on 1..60: 600 draws give recall@1 1/60 ± 0.005
    assert np.mean(pooled["rank"] == 1) < 0.045
    assert 25 <= np.median(pooled["rank"]) <= 36


def test_low_dispersion_stimuli_are_retrieved_better_and_subsets_are_equal_thirds():
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.05, 5.0, size=300)
    features = planted_pairs(caption_noise=difficulty)
    result = cross_validated_retrieval(
        features, MEMBERS, n_folds=5, seed=0, strata=difficulty, ridge=False
    )
    assert (
        recall(result, "universal", subset="low_dispersion")
        > recall(result, "universal", subset="high_dispersion") + 0.2
    )
    table = result.table
    sizes = table[table.subset != "all"].groupby(["fold", "subset"])["n_gallery"].first()
    for fold in range(5):
        assert sizes[(fold, "low_dispersion")] == sizes[(fold, "high_dispersion")] == 60 // 3
    subsets = retrieval._strata_subsets(
        np.array([10, 11, 12, 13, 14, 15, 16]), np.arange(20.0)[::-1]
    )
    np.testing.assert_array_equal(subsets["low_dispersion"], [5, 6])  # rows 15, 16: lowest scores
    np.testing.assert_array_equal(subsets["high_dispersion"], [0, 1])


def test_other_modalities_shape_the_space_but_are_not_retrieved():
    features = planted_pairs(n=120)
    rng = np.random.default_rng(5)
    brain = features[0] @ rng.standard_normal((20, 30)) + rng.standard_normal((120, 30))
    members = [*MEMBERS, Member("subject1", "v1", "brain")]
    result = cross_validated_retrieval([*features, brain], members, n_folds=3, ridge=False)
    assert set(result.table.direction) == {"vision_to_language", "language_to_vision"}
    assert recall(result, "universal") > 0.3
    brain_query = cross_validated_retrieval(
        [*features, brain], members, query_modality="brain", n_folds=3, ridge=False
    )
    assert set(brain_query.table.direction) == {"brain_to_language", "language_to_brain"}


def test_results_are_seeded(planted_result):
    again = cross_validated_retrieval(planted_pairs(), MEMBERS, n_folds=5, seed=0)
    for first, second in zip(planted_result.folds, again.folds, strict=True):
        np.testing.assert_array_equal(first.test, second.test)
    np.testing.assert_array_equal(planted_result.table["value"], again.table["value"])
    other = cross_validated_retrieval(planted_pairs(), MEMBERS, n_folds=5, seed=1, ridge=False)
    assert not np.array_equal(other.folds[0].test, planted_result.folds[0].test)


def test_top_matches_mark_the_true_item():
    labels = [f"caption {i}" for i in range(300)]
    planted_result = cross_validated_retrieval(
        planted_pairs(noise=1.5), MEMBERS, n_folds=5, seed=0, ridge=False
    )
    ranks = planted_result.ranks.query(
        "method == 'universal' and direction == 'vision_to_language'"
    ).set_index("stimulus")["rank"]
    found = int(ranks[ranks == 1].index[0])
    top = planted_result.top_matches(found, 3, labels=labels, ids=[f"s{i}" for i in range(300)])
    assert list(top["rank"]) == [1, 2, 3] and top["true_match"].tolist() == [True, False, False]
    assert top["label"].iloc[0] == f"caption {found}" and top["id"].iloc[0] == f"s{found}"
    missed = int(ranks[ranks > 3].index[0])
    top = planted_result.top_matches(missed, 3)
    assert len(top) == 4 and top["true_match"].tolist() == [False, False, False, True]
    assert top["rank"].iloc[-1] == ranks[missed]
    assert top["score"].iloc[-1] <= top["score"].iloc[2]
    back = planted_result.top_matches(found, 2, backward=True)
    assert len(back) >= 2


def test_top_matches_put_a_tied_true_match_at_its_recorded_rank():
    """A tie counts against the true match (rank 2 here), but the list put it first, ahead of the
    item that ties it (from a review): the table and the rank disagreed."""
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # items 0 and 2 tie for query 0
    test = np.arange(3)
    ranks = retrieval_ranks(queries, gallery)
    result = retrieval.CrossValidatedRetrieval(
        table=pd.DataFrame(),
        ranks=pd.DataFrame({
            "stimulus": test, "id": ["0", "1", "2"], "fold": 0, "method": "universal",
            "direction": "vision_to_language", "rank": ranks, "n_gallery": 3,
        }),
        baseline=pd.DataFrame(),
        folds=(retrieval.RetrievalFold(0, test, queries, gallery),),
        parameters={"similarity": "cosine", "query_modality": "vision",
                    "gallery_modality": "language"},
    )
    assert result.rank_of(0)[0] == 2
    top = result.top_matches(0, 2)
    assert top["stimulus"].tolist() == [2, 0] and top["rank"].tolist() == [1, 2]
    assert top["true_match"].tolist() == [False, True]
    assert top["score"].tolist() == pytest.approx([1.0, 1.0])
    top = result.top_matches(0, 1)  # beyond the k listed: one more row, at its rank
    assert top["stimulus"].tolist() == [2, 0] and top["rank"].tolist() == [1, 2]
    assert result.top_matches(1, 1)["stimulus"].tolist() == [1]  # an untied first place


def test_summary_is_long_and_has_every_method(planted_result):
    summary = summarise_retrieval(planted_result.table)
    assert set(summary.method) == {"universal", "ridge", "chance"}
    assert set(summary.metric) == {"recall_at_1", "recall_at_5", "recall_at_10", "median_rank"}
    assert (summary.n_folds == 5).all()
    assert len(planted_result.baseline) == 5


def test_ridge_recovers_a_planted_linear_map():
    rng = np.random.default_rng(6)
    n = 200
    x = rng.standard_normal((n, 10)) * rng.uniform(0.5, 2.0, size=10) + 3.0
    w = rng.standard_normal((10, 6))
    y = x @ w + 1e-4 * rng.standard_normal((n, 6))
    train, test = np.arange(150), np.arange(150, n)
    baseline = fit_ridge_baseline([x], [y], rows=train)
    predicted, actual = baseline.predict([x], test), baseline.targets([y], test)
    residual = np.sum((predicted - actual) ** 2) / np.sum((actual - actual.mean(axis=0)) ** 2)
    assert residual < 1e-4
    # the coefficients in raw units are the planted map
    raw = baseline.model.coef * baseline.target_scales[0] / baseline.source_scales[0]
    np.testing.assert_allclose(raw, w, atol=1e-3)
    # and equal the closed-form ridge solution at the chosen alpha (an independent reference)
    xs = (x[train] - x[train].mean(0)) / baseline.source_scales[0]
    ys = (y[train] - y[train].mean(0)) / baseline.target_scales[0]
    beta = np.linalg.solve(xs.T @ xs + baseline.alpha * np.eye(10), xs.T @ ys)
    np.testing.assert_allclose(baseline.model.coef, beta, atol=1e-8)
    inner = fit_ridge_baseline([x], [y], rows=train, inner_folds=5, seed=0)
    assert inner.alpha_relative <= 1e-4


def test_the_grid_edge_is_the_chosen_grid_points_place_whatever_the_grids_scale():
    """np.isclose's absolute tolerance (1e-8) called every α below 1e-8 an edge of the grid,
    interior or not (from a review)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 40)) @ np.diag(np.logspace(0, -4, 40))  # ill-conditioned
    y = x @ rng.standard_normal((40, 5)) + 1e-3 * rng.standard_normal((60, 5))
    grid = np.logspace(-13, -5, 9)
    baseline = fit_ridge_baseline([x], [y], alphas_relative=grid)
    chosen = int(np.argmin(np.abs(np.log(grid / baseline.alpha_relative))))
    assert 0 < chosen < len(grid) - 1  # the planted noise puts the optimum inside this grid
    assert baseline.at_grid_edge is False
    edge = fit_ridge_baseline([x], [y], alphas_relative=grid[chosen:])
    assert edge.at_grid_edge is True  # now the smallest of the grid


def test_ridge_shrinks_when_there_is_nothing_to_predict():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((120, 30)), rng.standard_normal((120, 5))
    assert fit_ridge_baseline([x], [y]).alpha_relative >= 1.0


def test_bad_input_names_the_problem():
    features = planted_pairs(n=30)
    with pytest.raises(ValueError, match="has no model among the members"):
        cross_validated_retrieval(features, MEMBERS, gallery_modality="brain")
    with pytest.raises(ValueError, match="both 'vision'"):
        cross_validated_retrieval(features, MEMBERS, gallery_modality="vision")
    with pytest.raises(ValueError, match="use at most 15 folds, or more stimuli"):
        cross_validated_retrieval(features, MEMBERS, n_folds=20)
    with pytest.raises(ValueError, match="use at most 5 folds, or more stimuli"):
        cross_validated_retrieval(features, MEMBERS, n_folds=6, strata=np.arange(30.0))
    few = [f[:10] for f in features]  # 2 folds of 5 leave too few for thirds: no fold count helps
    with pytest.raises(ValueError, match=r"retrieval needs at least 12 stimuli \(2 folds\)$"):
        cross_validated_retrieval(few, MEMBERS, n_folds=2, strata=np.arange(10.0))
    with pytest.raises(ValueError, match="n_folds"):
        cross_validated_retrieval(features, MEMBERS, n_folds=1)
    with pytest.raises(ValueError, match="strata"):
        cross_validated_retrieval(features, MEMBERS, n_folds=3, strata=np.ones(5))
    with pytest.raises(ValueError, match="unknown similarity"):
        cross_validated_retrieval(features, MEMBERS, similarity="dot")
    # a member with other rows (another run's features) was cut to the first member's rows
    longer = [*features[:3], np.vstack([features[3], features[3][:5]])]
    with pytest.raises(ValueError, match=r"row counts differ \(\[30, 30, 30, 35\]\)"):
        cross_validated_retrieval(longer, MEMBERS, n_folds=3)
    with pytest.raises(ValueError, match="got 29 ids for 30 stimuli"):
        cross_validated_retrieval(features, MEMBERS, n_folds=3, ids=[str(i) for i in range(29)])
    with pytest.raises(ValueError, match="same shape"):
        retrieval_ranks(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="k must be"):
        top_matches(np.ones((1, 2)), np.ones((4, 2)), 5)
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(np.array([1, 2]), ks=(0,))


def test_run_level_retrieval_on_a_planted_run(tmp_path):
    run = make_synthetic_run(tmp_path, 60, images=False, thumbnails=False)
    result = retrieval.run_retrieval(run, n_folds=3, ks=(1, 5))
    assert result.parameters["strata"] == "vision_dispersion_mean"
    assert set(result.table.subset) == {"all", "low_dispersion", "high_dispersion"}
    assert recall(result, "universal") > 3 * recall(result, "chance")
    assert set(result.ranks["id"]) == set(run.stimuli["id"])
    with pytest.raises(ValueError, match="unknown dispersion score"):
        retrieval.run_retrieval(run, score="median")


def test_comparison_table_puts_the_methods_side_by_side(planted_result):
    summary = planted_result.summary()
    wide = retrieval.comparison_table(summary)
    assert list(wide.columns) == [
        "direction",
        "subset",
        "metric",
        "universal",
        "universal_sd",
        "ridge",
        "ridge_sd",
        "chance",
        "n_gallery_mean",
    ]
    assert len(wide) == 2 * 4  # directions × metrics (no strata)
    row = wide.query("direction == 'vision_to_language' and metric == 'recall_at_5'").iloc[0]
    expected = summary.query(
        "method == 'ridge' and direction == 'vision_to_language' and metric == 'recall_at_5'"
    )["mean"].iloc[0]
    assert row["ridge"] == expected and row["chance"] == 5 / 60


def test_paired_recall_test_counts_discordant_queries():
    ranks = pd.DataFrame(
        {
            "stimulus": [0, 1, 2, 3, 0, 1, 2, 3],
            "method": ["universal"] * 4 + ["ridge"] * 4,
            "direction": "vision_to_language",
            "rank": [1, 1, 1, 4, 1, 3, 2, 1],
        }
    )
    table = retrieval.paired_recall_test(ranks, k=1)
    row = table.iloc[0]
    assert (row["both"], row["universal_only"], row["ridge_only"], row["neither"]) == (1, 2, 1, 0)
    assert row["p_value"] == pytest.approx(1.0)  # 2 of 3 discordant: binomial p = 1
    many = pd.DataFrame(
        {
            "stimulus": list(range(20)) * 2,
            "method": ["universal"] * 20 + ["ridge"] * 20,
            "direction": "vision_to_language",
            "rank": [1] * 20 + [2] * 20,
        }
    )
    assert retrieval.paired_recall_test(many)["p_value"].iloc[0] == pytest.approx(2 * 0.5**20)


def test_paired_recall_test_p_value_counts_only_the_discordant_queries():
    """Exact McNemar: binomial test of universal_only among the discordant queries only (catches a
    binomial n of all queries, which treats concordant queries as losses)."""
    from scipy.stats import binomtest

    # planted (universal rank, ridge rank): both 40, universal only 8, ridge only 2, neither 50
    cells = [(1, 1)] * 40 + [(1, 5)] * 8 + [(5, 1)] * 2 + [(5, 5)] * 50
    ranks = pd.DataFrame(
        {
            "stimulus": list(range(len(cells))) * 2,
            "method": ["universal"] * len(cells) + ["ridge"] * len(cells),
            "direction": "vision_to_language",
            "rank": [u for u, _ in cells] + [r for _, r in cells],
        }
    )
    row = retrieval.paired_recall_test(ranks, k=1).iloc[0]
    assert (row["both"], row["universal_only"], row["ridge_only"], row["neither"]) == (40, 8, 2, 50)
    assert row["n_queries"] == 100
    assert row["p_value"] == pytest.approx(binomtest(8, 10, 0.5).pvalue)  # 0.109375
    assert row["p_value"] == pytest.approx(2 * sum(comb(10, j) for j in range(8, 11)) / 2**10)


def test_held_out_ridge_retrieval_of_unrelated_features_stays_near_chance():
    """The ridge baseline is fitted on the training fold only: with independent vision and language
    features its held-out recall@1 is near chance (a fit on all rows memorises the test pairs)."""
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((60, 80)) for _ in range(2)]
    members = [Member("v1", "l", "vision"), Member("t1", "l", "language")]
    result = cross_validated_retrieval(features, members, n_folds=3, seed=0, ks=(1,))
    summary = result.summary()
    chosen = summary[(summary.subset == "all") & (summary.metric == "recall_at_1")]
    chance = chosen[chosen.method == "chance"]["mean"].iloc[0]
    assert chance == pytest.approx(1 / 20)
    for direction in ("vision_to_language", "language_to_vision"):
        ridge = chosen[(chosen.method == "ridge") & (chosen.direction == direction)]["mean"]
        assert ridge.iloc[0] < 3 * chance


def test_ridge_alpha_is_relative_to_the_number_of_source_models():
    """α = alpha_relative × tr(XᵀX) = alpha_relative × the number of SOURCE models (each block has
    unit Frobenius norm), on the grid; catches a scale by the number of target models."""
    rng = np.random.default_rng(2)
    n = 80
    source = [rng.standard_normal((n, 20))]

    def noisy_map():  # noise 8: leave-one-out picks an α inside the grid
        return source[0] @ rng.standard_normal((20, 6)) + 8.0 * rng.standard_normal((n, 6))

    target = [noisy_map() for _ in range(3)]  # 1 source model, 3 target models
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    baseline = fit_ridge_baseline(source, target, alphas_relative=grid)
    assert any(baseline.alpha_relative == pytest.approx(g, rel=1e-9) for g in grid)
    assert baseline.alpha == pytest.approx(baseline.alpha_relative * len(source), rel=1e-9)
    # independent reference: leave-one-out by refitting over the absolute grid α = grid × tr(XᵀX),
    # where the standardised source block has tr(XᵀX) = 1
    x = (source[0] - source[0].mean(0)) / baseline.source_scales[0]
    scales = baseline.target_scales
    y = np.hstack([(t - t.mean(0)) / scale for t, scale in zip(target, scales, strict=True)])
    assert np.trace(x.T @ x) == pytest.approx(1.0)
    errors = []
    for alpha in grid:
        error = 0.0
        for i in range(n):
            keep = np.arange(n) != i
            xm, ym = x[keep].mean(0), y[keep].mean(0)
            xc, yc = x[keep] - xm, y[keep] - ym
            beta = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
            error += np.sum((y[i] - ym - (x[i] - xm) @ beta) ** 2)
        errors.append(error)
    assert 0 < int(np.argmin(errors)) < len(grid) - 1  # the planted noise puts it inside the grid
    assert baseline.alpha == pytest.approx(grid[int(np.argmin(errors))], rel=1e-9)
