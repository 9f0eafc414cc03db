"""Per-stimulus alignment (issue 14, item 2): k-NN overlap and local CKA, each against a slow
reference, and their relation to dispersion on a planted run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from convergence_core.metrics import cka, mutual_knn
from convergence_core.neighbours import NeighbourIndex, PreparedFeatures
from convergence_core.stimulus_alignment import (
    alignment_dispersion_relation,
    knn_overlap,
    local_cka,
    local_cka_base_size,
    per_stimulus_alignment,
)


def _pair(n=70, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 5))
    X = z @ rng.standard_normal((5, 12)) + 0.5 * rng.standard_normal((n, 12))
    Y = z @ rng.standard_normal((5, 9)) + 0.8 * rng.standard_normal((n, 9))
    return X, Y


def test_knn_overlap_per_stimulus_against_a_loop_and_mutual_knn():
    X, Y = _pair()
    x, y = NeighbourIndex.from_features(X, list_size=20), NeighbourIndex.from_features(Y, list_size=4)
    F, G = x.features.all_rows(), y.features.all_rows()
    for k in (3, 10):  # k = 10 is beyond y's stored lists: computed from its features
        values = knn_overlap(x, y, k)
        for i in (0, 13, 69):
            a = F @ F[i]
            b = G @ G[i]
            a[i] = b[i] = -np.inf
            mine = set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])
            assert values[i] == pytest.approx(len(mine) / k)
        assert values.mean() == pytest.approx(mutual_knn(F, G, k))


def test_knn_overlap_refuses_a_k_that_is_not_a_whole_number():
    """k = 2.5 took 2 neighbours and divided by 2.5 (every overlap 0.8 of its value); the one k
    check of the package refuses it, as every other k."""
    X, Y = _pair()
    x, y = (NeighbourIndex.from_features(F, list_size=20) for F in (X, Y))
    for bad in (2.5, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer"):
            knn_overlap(x, y, bad)
    assert knn_overlap(x, y, np.int64(2)).max() <= 1.0


def test_knn_overlap_blocks_are_sized_by_k(monkeypatch):
    """Blocks of 65,536 rows whatever k: a (rows, k, k) comparison of ~1 GB at k = 128. Blocks
    now hold about _OVERLAP_ENTRIES entries; a small budget (several blocks, a partial last one,
    one row per block) gives the same values."""
    import convergence_core.stimulus_alignment as module

    X, Y = _pair()
    x, y = (NeighbourIndex.from_features(F, list_size=20) for F in (X, Y))
    for k in (3, 10):
        whole = knn_overlap(x, y, k)
        for budget in (8 * k * k, k * k - 1):
            monkeypatch.setattr(module, "_OVERLAP_ENTRIES", budget)
            np.testing.assert_array_equal(knn_overlap(x, y, k), whole)
        monkeypatch.undo()


def test_local_cka_is_the_cka_of_the_base_plus_the_stimulus():
    X, Y = _pair(n=60, seed=3)
    x, y = PreparedFeatures.from_raw(X), PreparedFeatures.from_raw(Y)
    result = local_cka(x, y, base_size=20, seed=1)
    F, G = x.all_rows(), y.all_rows()
    base = result.base
    assert result.base_cka == pytest.approx(cka(F[base], G[base]), abs=1e-12)
    for i in [r for r in range(60) if r not in base]:  # every stimulus: closed forms
        rows = np.sort(np.append(base, i))
        assert result.local[i] == pytest.approx(cka(F[rows], G[rows]), abs=1e-10)
        assert result.delta[i] == pytest.approx(result.local[i] - result.base_cka, abs=1e-12)
    for i in base:  # a base member: the base without it, then with it
        without = base[base != i]
        expected = cka(F[base], G[base]) - cka(F[without], G[without])
        assert result.delta[i] == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ValueError, match="base_size"):
        local_cka(x, y, base_size=60)


def test_local_cka_of_features_wider_than_the_stimuli_matches_the_definition():
    """d > n: the features are used in their row-space coordinates (exact for CKA); same slow
    reference as above, on the prepared features themselves."""
    rng = np.random.default_rng(4)
    n = 40
    z = rng.standard_normal((n, 6))
    X = z @ rng.standard_normal((6, 90)) + 0.3 * rng.standard_normal((n, 90))
    Y = z @ rng.standard_normal((6, 55)) + 0.5 * rng.standard_normal((n, 55))
    x, y = PreparedFeatures.from_raw(X), PreparedFeatures.from_raw(Y)
    result = local_cka(x, y, base_size=25, seed=2)
    F, G = x.all_rows(), y.all_rows()
    base = result.base
    assert result.base_cka == pytest.approx(cka(F[base], G[base]), abs=1e-10)
    for i in [r for r in range(n) if r not in base][:4]:
        rows = np.sort(np.append(base, i))
        assert result.local[i] == pytest.approx(cka(F[rows], G[rows]), abs=1e-10)
    for i in base[:3]:
        without = base[base != i]
        expected = cka(F[base], G[base]) - cka(F[without], G[without])
        assert result.delta[i] == pytest.approx(expected, abs=1e-10)


def test_a_stimulus_whose_caption_is_swapped_loses_local_cka():
    """Planted: swap the language features of 10 stimuli with random others: their pairing is
    broken, so adding them lowers the base's CKA, and their k-NN overlap drops."""
    X, Y = _pair(n=200, seed=5)
    broken = np.arange(10)
    Y = Y.copy()
    Y[broken] = np.random.default_rng(9).standard_normal((10, Y.shape[1])) * Y.std(axis=0)
    x, y = NeighbourIndex.from_features(X), NeighbourIndex.from_features(Y)
    delta = local_cka(x.features, y.features, base_size=120, seed=0).delta
    overlap = knn_overlap(x, y, 10)
    assert np.median(delta[broken]) < np.median(delta[10:])
    assert overlap[broken].mean() < overlap[10:].mean()


def test_per_stimulus_table_and_dispersion_relation_on_a_planted_run(tmp_path):
    """The quiet-half run: the planted language model agrees with the vision consensus only on the
    quieter (low-dispersion) half, so its per-stimulus overlap falls with dispersion."""
    from convergence_core.analyses import Pair, vision_layers
    from tests.fixtures_runs import PLANTED_BEST_LAYER, make_synthetic_run

    run = make_synthetic_run(tmp_path, n=120, plant="quiet_half", images=False, thumbnails=False)
    vision, layer = vision_layers(run)[0]
    pairs = [Pair(vision, layer, "planted", PLANTED_BEST_LAYER)]
    table = per_stimulus_alignment(run, pairs, k=8, base_size=40)
    assert set(table["metric"]) == {"knn_overlap", "local_cka"}
    assert len(table) == 2 * run.n_stimuli
    # the base the pages name: paper 003's 320, at most n - 1 (here 119)
    assert local_cka_base_size(10_000) == 320 and local_cka_base_size(run.n_stimuli) == 119
    whole = per_stimulus_alignment(run, pairs, k=8, metrics=["local_cka"])
    assert set(whole["base_size"]) == {local_cka_base_size(run.n_stimuli)}
    relation = alignment_dispersion_relation(
        table, run.dispersion["mean"].to_numpy(), n_permutations=200
    ).set_index("metric")
    assert relation.loc["knn_overlap", "spearman_rho"] < -0.3
    assert relation.loc["knn_overlap", "permutation_p_value_two_sided"] < 0.01


def test_per_stimulus_table_of_one_metric_equals_its_part_of_both(tmp_path):
    """``metrics=`` computes only the scores asked for (the dashboard caches them apart: local CKA
    does not depend on k), each equal to its rows of the full table."""
    import pandas as pd
    import pytest

    from convergence_core.analyses import Pair, vision_layers
    from tests.fixtures_runs import PLANTED_BEST_LAYER, make_synthetic_run

    run = make_synthetic_run(tmp_path, n=60, plant="quiet_half", images=False, thumbnails=False)
    vision, layer = vision_layers(run)[0]
    pairs = [Pair(vision, layer, "planted", PLANTED_BEST_LAYER)]
    both = per_stimulus_alignment(run, pairs, k=6, base_size=30)
    for metric in ("knn_overlap", "local_cka"):
        alone = per_stimulus_alignment(run, pairs, k=6, base_size=30, metrics=[metric])
        assert set(alone["metric"]) == {metric}
        pd.testing.assert_frame_equal(
            alone.reset_index(drop=True),
            both[both["metric"] == metric].reset_index(drop=True),
            check_dtype=False,  # k / base_size / seed: object columns once both are stacked
        )
    with pytest.raises(ValueError, match="unknown per-stimulus metrics"):
        per_stimulus_alignment(run, pairs, metrics=["cka"])


def test_dispersion_relation_does_not_depend_on_the_order_of_the_tables_rows():
    """The per-stimulus values are matched to dispersion by stimulus, not by row order: shuffling
    the table's rows changes nothing (catches taking the values in row order)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    n = 50
    dispersion = rng.standard_normal(n)
    value = -dispersion + 0.3 * rng.standard_normal(n)  # planted ρ near −0.94
    table = pd.DataFrame(
        {
            "stimulus": np.arange(n),
            "vision_model": "v",
            "vision_layer": "l",
            "language_model": "t",
            "language_layer": "l",
            "metric": "knn_overlap",
            "value": value,
        }
    )
    expected = spearmanr(value, dispersion).statistic
    assert expected < -0.9
    reference = alignment_dispersion_relation(table, dispersion, n_permutations=200)
    assert reference["spearman_rho"].iloc[0] == pytest.approx(expected)
    for shuffled in (table.sort_values("value"), table.sample(frac=1.0, random_state=1)):
        relation = alignment_dispersion_relation(shuffled, dispersion, n_permutations=200)
        pd.testing.assert_frame_equal(relation, reference)
