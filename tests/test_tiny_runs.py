"""Runs with very few stimuli, or a metric undefined on some sets: what the report and the
Alignment lab say there (three items of a review that were seen and left alone).

1. Matched random sets of a set of 4 of 8 stimuli are the other 4, every time: no verdict
   (``calibration.baseline_freedom``), not a forced "survives".
2. ``report`` without --k on a run too small for k = 10 lowers k as the lab does
   (``subset_metrics.k_for_sets``) and says so; a --k too large is still refused.
3. The lab's random baseline drawn to a precision stops once the defined pairs are precise,
   where a pair undefined on some random sets (SVCCA) made it draw all 200.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convergence_core import analyses, calibration, report, subset_metrics
from convergence_core.dashboard import lab, state
from convergence_core.precompute import write_run_from_embeddings
from tests.fixtures_runs import make_synthetic_run, synthetic_embeddings

#: the sections the tiny-run reports leave out (each is tested elsewhere)
_SKIP = ("gpa_stability", "universal_space", "predictivity", "many_to_many", "blind_matching",
         "per_stimulus")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """8 stimuli, 3 vision and 2 language models: sets of 4 at most k = 3."""
    root = tmp_path_factory.mktemp("tiny")
    return make_synthetic_run(root / "runs", 8, name="tiny", images=False, thumbnails=False)


def _tiny_report(run, out: Path, **settings):  # noqa: ANN001, ANN003, ANN202
    options = report.AnalysisOptions(metrics=("cknna",), metric_permutations=2, n_shuffles=20,
                                     n_matched=20, skip=_SKIP)
    return report.write_report(run, out, scores=["mean"], n_random=5, n_permutations=5,
                               property_permutations=20, property_shuffles=1, options=options,
                               **settings)


# ----------------------------------------------------------------------------------------------
# 1. matched random sets with no freedom
def test_distinct_sets_a_verdict_needs() -> None:
    """With D distinct sets no p-value is below 1/(D + 1): p < 0.05 needs D >= 20."""
    assert calibration.distinct_sets_needed(0.05) == 20
    assert calibration.distinct_sets_needed(0.01) == 100
    assert calibration.distinct_sets_needed(0.03) == 33  # 1/34 < 0.03 <= 1/33
    for alpha in (0.05, 0.01, 0.03, 0.2):
        needed = calibration.distinct_sets_needed(alpha)
        assert 1 / (needed + 1) < alpha <= 1 / needed
    one = np.tile([4, 5, 6, 7], (200, 1))
    freedom = calibration.baseline_freedom(one)
    assert (freedom.n_sets, freedom.n_distinct, freedom.mean_overlap) == (200, 1, 1.0)
    assert not freedom.enough
    rng = np.random.default_rng(0)
    free = calibration.baseline_freedom([rng.choice(100, 10, replace=False) for _ in range(50)])
    assert free.enough and free.n_distinct == 50 and free.mean_overlap < 0.3
    # the same sets in another order are the same sets
    assert calibration.baseline_freedom(one[:, ::-1]).n_distinct == 1


def test_matched_sets_of_a_tiny_run_give_no_verdict(tiny_run, tmp_path) -> None:
    """Sets of 4 of 8 stimuli: matched sets drawn outside each set were the set's other half
    every time (the matched gap minus the observed one: any positive gap "survived" with p =
    1/21). Drawn from every stimulus, the high match apart from the low match, the 20 drawn are
    still fewer than 20 distinct pairs: no verdict, the cause and the fix, even where a gap's p
    falls below 0.05."""
    meta = _tiny_report(tiny_run, tmp_path / "out", k=3)
    verdict = meta["verdicts"]["matched_baselines"]
    assert "no verdict on low > high" in verdict and "survives for" not in verdict, verdict
    balance = pd.read_csv(tmp_path / "out" / "matched_balance.csv")
    distinct = balance.distinct_matched_sets.tolist()
    assert max(distinct) < 20 and not balance.verdict_possible.any()
    assert "sets of 4 stimuli drawn from a run of 8 (each high match apart" in verdict
    assert f"{distinct[0]} for the low set" in verdict
    assert "more stimuli or a smaller --size" in verdict
    matched = pd.read_csv(tmp_path / "out" / "matched_baselines.csv")
    assert not matched.survives.any()
    assert ((matched.low_minus_high > 0) & (matched.p_value_gap < 0.05)).any()  # the rule's doing
    assert "no verdict" in (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")


def test_too_few_matched_sets_drawn_name_the_flag(tiny_run, tmp_path) -> None:
    """Fewer matched sets drawn than a verdict needs: the fix is --n-shuffles, not the run."""
    options = report.AnalysisOptions(metrics=("cknna",), metric_permutations=2, n_shuffles=5,
                                     n_matched=5, skip=_SKIP)
    meta = report.write_report(tiny_run, tmp_path / "out", k=3, scores=["mean"], n_random=5,
                               n_permutations=5, property_permutations=20, property_shuffles=1,
                               options=options)
    verdict = meta["verdicts"]["matched_baselines"]
    assert "no verdict" in verdict and "use --n-shuffles 20 or more" in verdict, verdict


def test_the_lab_gives_no_matched_verdict_on_a_tiny_run(tiny_run) -> None:
    pairs = analyses.pairs_with_best_layers(tiny_run, k=3)
    indexes = analyses.indexes_for(tiny_run, pairs)
    sets = report.dispersion_sets(tiny_run, "mean", 4, 1, 0)
    sets = {"low": sets.low, "high": sets.high}
    covariates = lab.matching_covariates(tiny_run, None, k=3)
    table, comparisons = lab.calibration_table(
        indexes, pairs, sets, 3, covariates, metric="cknna", n_shuffles=5, n_matched=25
    )
    low_high = lab.low_high_matched_table(pairs, comparisons)
    verdict = lab.matched_verdict(low_high, "cknna", covariates.matched_on)
    assert verdict.startswith("No verdict on low > high"), verdict  # "survives" before
    distinct = int(table["distinct_matched"].min())
    assert distinct < 20 and f"{distinct} distinct sets," in verdict
    assert "choose smaller sets or a run with more" in verdict
    assert not low_high["survives"].any() and not low_high["verdict_possible"].any()


# ----------------------------------------------------------------------------------------------
# 2. the report's k on a tiny run: the lab's rule
def test_report_without_k_lowers_it_as_the_lab_does(tiny_run, tmp_path) -> None:
    """k = 10 does not fit sets of 4: the report used to stop; now it takes the lab's sets and
    k (the lab's view at its default k) and says so in the notes and in summary.txt."""
    meta = _tiny_report(tiny_run, tmp_path / "out")  # no k
    n = tiny_run.n_stimuli
    assert meta["parameters"]["k"] == state.sets_k(state.View(), n) == 3
    assert meta["parameters"]["set_size"] == state.subset_size(None, n) == 4
    note = next(note for note in meta["notes"] if note.startswith("k = 3, not the default 10"))
    assert "sets of 4" in note and "as the Alignment lab lowers it" in note and "--k" in note
    assert f"Note: {note}" in (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    # the numbers are those of an explicit --k 3 (the same sets)
    explicit = _tiny_report(tiny_run, tmp_path / "explicit", k=3)
    assert not any(note.startswith("k = 3") for note in explicit["notes"])
    for name in ("dispersion_sets_mean.csv", "matched_baselines.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / name),
                                      pd.read_csv(tmp_path / "explicit" / name))


@pytest.mark.parametrize("n", [8, 9, 12, 20, 21, 22, 43, 44, 239, 1000])
def test_the_default_sets_and_k(n: int) -> None:
    """Where k = 10 fits the report's own sets (a quarter, at least k + 1) they are unchanged;
    below, the lab's sets and k; an explicit k keeps the old rule (refused when too large)."""
    size, k, note = report.sets_and_k(n, None, None)
    if 2 * 11 <= n:
        assert (size, k, note) == (report.default_set_size(n, 10), 10, None)
    else:
        assert size == subset_metrics.default_set_size(n) == state.subset_size(None, n)
        assert k == subset_metrics.k_for_sets(10, size) == state.sets_k(state.View(), n)
        assert note.startswith(f"k = {k}, not the default 10")
    size, k, note = report.sets_and_k(n, 6, None)  # --size 6 without --k
    assert (size, k) == (6, 5) and note.startswith("k = 5, not the default 10: the sets hold 6")
    assert report.sets_and_k(n, 11, None) == (11, 10, None)
    assert report.sets_and_k(n, None, 3) == (report.default_set_size(n, 3), 3, None)


def test_a_run_too_small_for_the_lab_sets_is_still_refused() -> None:
    with pytest.raises(ValueError, match="7 stimuli is too small for k = 10.*use --k 2 or less"):
        report.sets_and_k(7, None, None)


def test_an_explicit_k_too_large_is_refused_naming_the_flag(tiny_run, tmp_path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = report.main([str(tiny_run.path), "--out", str(tmp_path / "out"), "--k", "10"])
    assert code == 2 and "too small for k = 10" in err.getvalue()
    assert "use --k 3 or less" in err.getvalue()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = report.main([str(tiny_run.path), "--out", str(tmp_path / "out"), "--k", "10",
                            "--size", "4"])
    assert code == 2 and "use k <= 3 or a larger set. (--k, --size)" in err.getvalue()


def test_the_cli_without_k_reports_a_tiny_run(tiny_run, tmp_path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = report.main([str(tiny_run.path), "--out", str(tmp_path / "out"), "--quiet",
                            "--n-random", "5", "--n-permutations", "5", "--n-shuffles", "5",
                            "--metrics", "cknna", "--metric-permutations", "2",
                            "--property-permutations", "20", "--property-shuffles", "1",
                            "--skip", *_SKIP])
    assert code == 0, out.getvalue()
    assert "set size 4, k = 3" in out.getvalue()
    assert "Note: k = 3, not the default 10" in out.getvalue()
    meta = json.loads((tmp_path / "out" / "report.json").read_text())
    assert meta["parameters"]["k"] == 3


# ----------------------------------------------------------------------------------------------
# 3. the random baseline with a metric undefined on some random sets
@pytest.fixture(scope="module")
def one_caption_run(tmp_path_factory: pytest.TempPathFactory):
    """40 stimuli; language-a gives stimuli 0-11 one and the same embedding (one caption for
    them), so its SVCCA at cca_dim 5 is undefined on a set of 10 holding six or more of them
    (a few random sets in a hundred); language-b's is defined on every set."""
    n = 40
    embeddings, noise = synthetic_embeddings(n, seed=0)
    for layer in embeddings["language-a"]:
        embeddings["language-a"][layer][1:12] = embeddings["language-a"][layer][0]
    stimuli = pd.DataFrame({"id": [f"s{i:03d}" for i in range(n)],
                            "image": [f"synthetic/{i:03d}.jpg" for i in range(n)],
                            "captions": [[f"stimulus {i}"] for i in range(n)]})
    run = write_run_from_embeddings(
        tmp_path_factory.mktemp("one_caption") / "run", stimuli, embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"],
        default_layers={"vision-a": "stage2", "vision-b": "stage2", "vision-c": "stage2",
                        "language-a": "layer3", "language-b": "layer3"},
        thumbnails=False, dataset_name="synthetic", settings={"seed": 0},
    )
    pairs = [analyses.Pair(v, "stage2", m, "layer3")
             for v in ("vision-a", "vision-b") for m in ("language-a", "language-b")]
    return run, pairs, analyses.indexes_for(run, pairs)


def test_an_undefined_pair_no_longer_draws_every_set(one_caption_run) -> None:
    run, pairs, indexes = one_caption_run
    table = lab.baseline_table(indexes, pairs, run.n_stimuli, 10, None, metric="svcca",
                               options={"cca_dim": 5}, n_random=200, interval_width=0.02)
    sets = int(table["n_random"].iloc[0])
    assert sets < 200  # all 200 before: the undefined pairs' interval never narrowed
    undefined = table[table["language_model"] == "language-a"]
    defined = table[table["language_model"] == "language-b"]
    assert undefined["random_mean"].isna().all() and (undefined["n_undefined"] > 0).all()
    assert (defined["n_undefined"] == 0).all()
    assert (defined["random_mean_interval"] <= 0.02).all()
    assert (undefined["n_undefined"] < sets / 10).all()  # a few sets: undefined all the same
    statement = lab.baseline_statement(table)
    assert f"{sets} random sets of 10 stimuli per pair, drawn until every pair with a " \
        "defined SVCCA" in statement
    assert "SVCCA undefined on" in statement and "for 2 pairs" in statement
    assert "was not reached" not in statement
    # a fixed number of sets is still that number
    fixed = lab.baseline_table(indexes, pairs, run.n_stimuli, 10, None, metric="svcca",
                               options={"cca_dim": 5}, n_random=30)
    assert set(fixed["n_random"]) == {30}
