"""`report.main` on a planted run: files written, summary parses and agrees with the analyses."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from convergence_core import analyses, caption_embeddings, report, settings
from convergence_core import metrics as registry
from convergence_core.datasets import load_coco
from convergence_core.metrics import metric_names
from convergence_core.models.base import Encoder
from tests.fixtures_runs import make_synthetic_run

FAST = [
    # sets of MIN_CKNNA_SET_SIZE: the smallest whose CKNNA the report counts in its verdicts
    # (tests/test_report_small_sets.py: below it)
    "--n-random", "20", "--n-permutations", "40", "--k", "5", "--size", "24",
    # the issue-14 sections, small
    "--metric-permutations", "10", "--n-shuffles", "20", "--predictivity-random", "2",
    "--blind-matching-random", "2",
]


@pytest.fixture(scope="module")
def planted_run_path(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("report_cache")
    make_synthetic_run(
        root / "runs", 80, plant="quiet_half", name="demo", images=False, thumbnails=False
    )
    return root


@pytest.fixture(scope="module")
def written(planted_run_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out")
    with contextlib.redirect_stderr(io.StringIO()) as progress, contextlib.redirect_stdout(
        io.StringIO()
    ) as printed:
        status = report.main([str(planted_run_path / "runs" / "demo"), "--out", str(out), *FAST])
    (out / "progress.log").write_text(progress.getvalue())  # for the progress test
    (out / "stdout.log").write_text(printed.getvalue())  # what the command printed
    return status, out


def test_report_tells_each_section_as_it_starts(written, planted_run_path, tmp_path,
                                               monkeypatch):
    """The CLI prints each section as it starts, with the seconds so far, on stderr (a report on
    a large run takes minutes); with --quiet it passes no progress callback."""
    status, out = written
    lines = (out / "progress.log").read_text().splitlines()
    seconds = [float(line.split(" s  ")[0]) for line in lines]
    steps = [line.split(" s  ", 1)[1] for line in lines]
    # the first section is told as it starts, before the work (not timed tightly: a loaded
    # machine took 1.5 s to open the run)
    assert status == 0 and seconds == sorted(seconds) and seconds[0] < min(5.0, seconds[-1])
    assert steps[0] == "layer sweep and best language layers" and steps[-1] == "done"
    assert steps[1].startswith("low, high and random sets: ") and "(Fig. 2)" in steps[1]
    assert "--metrics cknna" not in steps[1]  # sets of 20: no warning
    # sets of thousands: the line says why it takes long and what makes it short (a report on
    # 10,000 stimuli sat 6 minutes on this line without a word)
    line = report._fig2_step(["cknna", "mutual_knn", "cka", "svcca"], 2, 2_500)
    assert line.endswith("; cka, svcca cost O(set size × features²) per set: on sets of 2,500 "
                         "this can take many minutes (--metrics cknna for CKNNA alone)")
    assert "minutes" not in report._fig2_step(["cknna", "mutual_knn"], 2, 2_500)
    sections = [report.SECTION_TITLES[name] for name in report.SECTION_TITLES]
    assert [step for step in steps if step in sections] == sections  # in the report's order
    assert "what predicts dispersion" in steps and "universal space" in steps
    # the universal space's retrieval fits a space per fold (minutes each on 10,000 stimuli)
    folds = [step for step in steps if step.startswith("universal space: fold")]
    assert folds == [f"universal space: fold {i} of 5 done" for i in range(1, 6)]
    passed = {}

    def stop(run, out, **settings):  # noqa: ANN001, ANN003
        passed.update(settings)
        raise ValueError("stopped here")

    monkeypatch.setattr(report, "write_report", stop)
    with contextlib.redirect_stderr(io.StringIO()) as quiet:
        assert report.main([str(planted_run_path / "runs" / "demo"), "--out", str(tmp_path),
                            "--quiet"]) == 2
    assert passed["progress"] is None and quiet.getvalue() == "error: stopped here\n"


def test_report_writes_tables_figures_and_summary(written):
    status, out = written
    assert status == 0
    expected = {
        "layer_sweep.csv",
        "layer_sweep.json",
        "layer_sweep.png",
        "best_language_layers.csv",
        "best_language_layers.json",
        "dispersion_sets_mean.csv",
        "dispersion_sets_pc1.json",
        "fig2_dispersion_sets_mean.png",
        "fig2_dispersion_sets_pc1.png",
        "paired_tests.csv",
        "drop_fraction.csv",
        "figS1_drop_fraction.png",
        "leave_one_model_out_points.csv",
        "leave_one_model_out_statistics.json",
        "figS2_leave_one_model_out.png",
        "summary.csv",
        "summary.json",
        "summary.txt",
        "report.json",
    }
    assert expected <= {p.name for p in out.iterdir()}
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert not any("two GPA models" in note for note in notes)  # three GPA models here
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp-*"))


def test_summary_parses_and_matches_the_tables(written):
    _, out = written
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 * 3 * 2  # scores × vision × language
    assert set(summary.score) == {"mean", "pc1"}
    records = json.loads((out / "summary.json").read_text())
    assert len(records) == len(summary)
    mean_table = pd.read_csv(out / "dispersion_sets_mean.csv")
    merged = summary[summary.score == "mean"].merge(
        mean_table, on=["vision_model", "language_model"]
    )
    pd.testing.assert_series_equal(
        merged.cknna_low_dispersion_x, merged.cknna_low_dispersion_y, check_names=False
    )
    planted = summary[summary.language_model == "planted"]
    assert (planted.cknna_low_dispersion > planted.cknna_high_dispersion).all()


def test_report_json_verdicts_come_from_the_numbers(written, planted_run_path):
    _, out = written
    meta = json.loads((out / "report.json").read_text())
    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    assert meta["run"] == {"name": run.name, "path": str(run.path), "n_stimuli": run.n_stimuli,
                           "dataset": run.manifest.dataset.describe()}
    assert meta["parameters"]["set_size"] == 24
    assert meta["best_language_layers"]["planted"] == "block2"
    summary = pd.read_csv(out / "summary.csv")
    for score in meta["parameters"]["scores"]:
        verdict = meta["verdicts"][score]
        rows = summary[summary.score == score]
        ordered = int(
            (
                (rows.cknna_low_dispersion > rows.cknna_random_mean)
                & (rows.cknna_random_mean > rows.cknna_high_dispersion)
            ).sum()
        )
        assert f"holds for {ordered} of {len(rows)} " in verdict
    text = (out / "summary.txt").read_text()
    assert all(verdict in text for verdict in meta["verdicts"].values())
    assert set(meta["files"]) <= {p.name for p in out.iterdir()}


def test_preset_demo_reads_the_demo_run_and_prints_the_summary(
    planted_run_path, tmp_path, monkeypatch, capsys
):
    # the cache given by --cache, as precompute, runs and serve take it (the variable names
    # another; monkeypatch puts it back after the test)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "elsewhere"))
    status = report.main(["--preset", "demo", "--cache", str(planted_run_path), "--out",
                          str(tmp_path), "--scores", "mean", *FAST])
    printed = capsys.readouterr().out
    assert status == 0
    assert "random mean [95% interval]" in printed and "holds for" in printed
    assert not (tmp_path / "dispersion_sets_pc1.csv").exists()


def test_bad_input_gives_a_clear_error(planted_run_path, tmp_path, monkeypatch, capsys):
    run = str(planted_run_path / "runs" / "demo")
    assert report.main([run, "--out", str(tmp_path), "--size", "60", "--n-random", "2"]) == 2
    assert "larger than half" in capsys.readouterr().err
    # a new --out (and the parents it needed) is not left behind empty by a failed report ...
    new = tmp_path / "new" / "report"
    assert report.main([run, "--out", str(new), "--size", "60", "--n-random", "2"]) == 2
    assert "larger than half" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # a negative seed or a count of none is refused before the first section writes anything
    for flag, value in (("--seed", "-1"), ("--n-random", "0"), ("--n-permutations", "0"),
                        ("--k", "0"), ("--universal-folds", "1"),
                        ("--property-permutations", "0"), ("--property-shuffles", "-1")):
        assert report.main([run, "--out", str(new), "--n-random", "2", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag[2:].replace('-', '_')} must be an integer >=" in err and f"{flag} " in err
        assert not (tmp_path / "new").exists()
    for value in ("1.5", "nan", "0"):
        assert report.main([run, "--out", str(new), "--n-random", "2", "--q", value]) == 2
        assert "must lie in (0, 1)" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # ... while a folder that was there stays, and so does what a report wrote before failing
    (tmp_path / "kept").mkdir()
    assert report.main([run, "--out", str(tmp_path / "kept"), "--size", "60"]) == 2
    assert (tmp_path / "kept").is_dir()
    (tmp_path / "partial" / "report").mkdir(parents=True)
    (tmp_path / "partial" / "report" / "layer_sweep.csv").write_text("x\n")
    assert report._missing_folders(tmp_path / "partial" / "report" / "deeper") == [
        tmp_path / "partial" / "report" / "deeper"
    ]
    report._remove_empty([tmp_path / "partial" / "report", tmp_path / "partial"])
    assert (tmp_path / "partial" / "report" / "layer_sweep.csv").exists()
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither a run nor a preset: said so (not "not both")
        report.main(["--out", str(tmp_path)])
    assert "give a run (folder or name" in capsys.readouterr().err
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "empty-cache"))
    assert report.main(["--preset", "demo", "--out", str(tmp_path)]) == 2
    assert "precompute --preset demo" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert report.main(["demo", "--cache", str(tmp_path / "a-file"), "--out", str(tmp_path)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([run, "--preset", "demo", "--out", str(tmp_path)])
    # Ctrl-C: what is on disk and what to do, not a page of frames

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    assert report.main([run, "--out", str(tmp_path / "stopped")]) == 130
    assert "interrupted: the files in" in capsys.readouterr().err


def test_report_has_the_universal_space_tables_figures_and_headline(written, capsys):
    _, out = written
    names = {p.name for p in out.iterdir()}
    for stem in (
        "universal_residuals",
        "universal_cross_modal_dispersion",
        "universal_dispersion_relation",
        "universal_retrieval",
        "universal_retrieval_summary",
        "universal_retrieval_ranks",
        "universal_ridge_alphas",
        "universal_retrieval_paired_test",
    ):
        assert {f"{stem}.csv", f"{stem}.json"} <= names
    assert {"universal_cross_modal_dispersion.png", "universal_retrieval.png"} <= names
    meta = json.loads((out / "report.json").read_text())
    entry = meta["universal_space"]
    assert [m["model"] for m in entry["members"]] == [
        "vision0", "vision1", "vision2", "planted", "independent"
    ]
    summary = pd.read_csv(out / "universal_retrieval_summary.csv")
    assert set(summary.columns) >= {"method", "direction", "subset", "metric", "mean", "std"}
    row = summary.query(
        "method == 'universal' and direction == 'vision_to_language' and subset == 'all' "
        "and metric == 'recall_at_1'"
    )
    assert entry["vision_to_language"]["universal"]["recall_at_1"] == row["mean"].iloc[0]
    chance = entry["vision_to_language"]["chance"]["recall_at_1"]
    assert chance == 1 / entry["n_gallery_mean"]
    # (planted answers are tested in test_retrieval.py: here the default language layers carry
    # little of the planted latent, so only the bookkeeping is checked)
    assert 0.0 <= entry["vision_to_language"]["ridge"]["recall_at_1"] <= 1.0
    relation = pd.read_csv(out / "universal_dispersion_relation.csv")
    assert relation["permutation_p_value_two_sided"].iloc[0] >= 1 / 41  # FAST: 40 shuffles
    assert entry["headline"].startswith("Universal space, held-out image → text retrieval (5-fold")
    # summary.txt says what the command prints (it left the headline out), and it is printed once
    assert entry["headline"] in (out / "summary.txt").read_text()
    assert (out / "stdout.log").read_text().count(entry["headline"]) == 1
    paired = entry["paired_test_recall_at_1"]
    assert [row["direction"] for row in paired] == ["vision_to_language", "language_to_vision"]
    assert all(row["both"] + row["universal_only"] + row["ridge_only"] + row["neither"] == 80
               for row in paired)
    residuals = pd.read_csv(out / "universal_residuals.csv")
    assert len(residuals) == 80 * 5 and set(residuals.metric) == {"residual"}


# -- the metric suite and the neighbouring papers' analyses (issue 14) ---------------------------

SECTION_TABLES = (
    "dispersion_sets_metrics",
    "gpa_stability",
    "metric_effect_counts",
    "per_stimulus_alignment",
    "per_stimulus_dispersion_relation",
    "predictivity_sets",
    "predictivity_summary",
    "blind_matching",
    "blind_matching_summary",
    "calibrated_scores",
    "matched_baselines",
    "matched_balance",
)


def test_report_has_every_section_table_figure_and_verdict(written):
    _, out = written
    names = {p.name for p in out.iterdir()}
    for stem in SECTION_TABLES:
        assert {f"{stem}.csv", f"{stem}.json"} <= names, stem
    assert "per_stimulus_alignment.png" in names
    meta = json.loads((out / "report.json").read_text())
    text = (out / "summary.txt").read_text()
    for section in ("metric_suite", "per_stimulus", "predictivity", "blind_matching",
                    "matched_baselines", "gpa_stability"):
        assert meta["verdicts"][section] in text
        assert meta[section]["verdict"] == meta["verdicts"][section]
    # the synthetic run has one caption per stimulus: nothing to average
    assert "many_to_many" not in meta["verdicts"]
    assert any("many-to-many" in note and "single caption" in note for note in meta["notes"])
    assert meta["parameters"]["metric_permutations"] == 10
    assert meta["parameters"]["metric_options"] == {"svcca": {"cca_dim": 9}}  # narrowest layer


def test_every_metric_is_in_one_long_table_that_holds_the_cknna_tables(written):
    _, out = written
    long = pd.read_csv(out / "dispersion_sets_metrics.csv")
    assert list(dict.fromkeys(long.metric)) == metric_names()
    assert set(long.score) == {"mean", "pc1"}
    for score in ("mean", "pc1"):
        classic = pd.read_csv(out / f"dispersion_sets_{score}.csv")
        rows = long[(long.score == score) & (long.metric == "cknna")].reset_index(drop=True)
        np.testing.assert_allclose(rows.low_dispersion, classic.cknna_low_dispersion)
        np.testing.assert_allclose(rows.random_mean, classic.cknna_random_mean)
        np.testing.assert_allclose(
            rows.permutation_p_value_two_sided, classic.permutation_p_value_two_sided
        )
    others = long[long.metric != "cknna"]
    assert (others.n_permutations == 10).all()
    counts = pd.read_csv(out / "metric_effect_counts.csv")
    mean_cka = long[(long.score == "mean") & (long.metric == "cka")]
    row = counts[(counts.score == "mean") & (counts.metric == "cka")].iloc[0]
    assert row.n_low_above_high == int((mean_cka.low_dispersion > mean_cka.high_dispersion).sum())
    meta = json.loads((out / "report.json").read_text())
    assert f"cka {row.n_low_random_high}," in meta["verdicts"]["metric_suite"]
    # planted: every metric sees the planted model agree more on the quiet half
    planted = long[long.language_model == "planted"]
    assert (planted.low_dispersion > planted.high_dispersion).mean() > 0.9


def test_per_stimulus_predictivity_blind_matching_find_the_planted_effect(written):
    _, out = written
    relation = pd.read_csv(out / "per_stimulus_dispersion_relation.csv")
    planted = relation[relation.language_model == "planted"]
    assert len(relation) == 6 * 2 and (planted.spearman_rho < -0.3).all()
    per_stimulus = pd.read_csv(out / "per_stimulus_alignment.csv")
    assert len(per_stimulus) == 80 * 6 * 2
    summary = pd.read_csv(out / "predictivity_summary.csv")
    assert set(summary.metric) == {"r2", "correlation", "two_afc"}
    assert len(summary) == 6 * 2 * 3 and (summary.n_random == 2).all()
    forward = summary[(summary.language_model == "planted") & (summary.source == "vision")]
    assert (forward.low_minus_high > 0).all()
    runs = pd.read_csv(out / "blind_matching.csv")
    assert set(runs.set) == {"low", "high", "random"}
    assert len(runs) == 6 * (3 + 3 + 2)
    assert ((runs.n_correct / runs.n_query - runs.accuracy).abs() < 1e-12).all()
    matching = pd.read_csv(out / "blind_matching_summary.csv")
    planted_matching = matching[matching.language_model == "planted"].pivot_table(
        index="vision_model", columns="set", values="accuracy_mean"
    )
    assert (planted_matching["low"] > planted_matching["high"]).all()


def test_calibration_and_matched_baselines_in_the_report(written):
    _, out = written
    calibrated = pd.read_csv(out / "calibrated_scores.csv")
    live = [m for m in metric_names() if registry.metric(m).live]
    assert list(dict.fromkeys(calibrated.metric)) == live  # SVCCA is not live: not calibrated
    assert set(calibrated.set) == {"low", "high"} and (calibrated.n_shuffles == 20).all()
    np.testing.assert_allclose(calibrated.calibrated, calibrated.observed - calibrated.null_mean)
    low = calibrated[(calibrated.set == "low") & (calibrated.metric == "cknna")]
    assert (low[low.language_model == "planted"].z > 2).all()
    matched = pd.read_csv(out / "matched_baselines.csv")
    assert set(matched.matched_on) == {"typicality"} and (matched.n_sets == 20).all()
    np.testing.assert_allclose(matched.low_minus_high, matched.observed_low - matched.observed_high)
    expected = (matched.low_minus_high > 0) & (matched.p_value_gap < 0.05)
    assert (matched.survives == expected).all()
    meta = json.loads((out / "report.json").read_text())
    survived = int(matched[matched.metric == "cknna"].survives.sum())
    assert f"survives for {survived} of 6 pairs by CKNNA" in meta["verdicts"]["matched_baselines"]


def test_a_section_that_cannot_run_on_small_sets_becomes_a_note(planted_run_path, tmp_path):
    from convergence_core.run import load_run

    meta = report.write_report(
        load_run(planted_run_path / "runs" / "demo"), tmp_path, size=8, k=3, scores=["mean"],
        n_random=5, n_permutations=5,
        options=report.AnalysisOptions(
            metrics=("cka",), metric_permutations=2, n_shuffles=3, n_matched=3,
            predictivity_random=0, blind_matching_repeats=1, blind_matching_random=0,
        ),
    )
    assert any(
        note.startswith("predictivity skipped: sets of 8 stimuli are too few for 5-fold")
        for note in meta["notes"]
    )
    assert "predictivity" not in meta["verdicts"] and "blind_matching" in meta["verdicts"]
    assert not (tmp_path / "predictivity_sets.csv").exists()


def test_an_unexpected_section_error_is_said_as_a_bug_not_as_a_skip(tmp_path, monkeypatch):
    """Only a section's own "cannot run" conditions (SectionSkipped) become "<section> skipped"
    notes. Every ValueError did: a run with a one-feature model lost linear predictivity to
    "predictivity skipped: shape mismatch: value array of shape (3,) could not be broadcast…",
    a bug that read as a property of the run (review of 2026-12-07). Now such an error is a note
    that says it is a bug and where it was raised, a RuntimeWarning with the traceback, and the
    traceback in report.json; the other sections stand."""
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("operands could not be broadcast together")

    def cannot(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise report.SectionSkipped("sets of 3 stimuli are too few for 5-fold cross-validation")

    monkeypatch.setattr(report, "blind_matching_section", broken)
    monkeypatch.setattr(report, "predictivity_section", cannot)
    with pytest.warns(RuntimeWarning, match="the blind_matching section failed"):
        meta = report.write_report(run, tmp_path / "out", **_tiny_report_settings())
    assert "predictivity skipped: sets of 3 stimuli are too few for 5-fold cross-validation" in (
        meta["notes"]
    )
    [note] = [note for note in meta["notes"] if note.startswith("blind_matching")]
    assert note.startswith("blind_matching failed: ValueError in broken (test_report.py, line ")
    assert "operands could not be broadcast together. This is a bug in the report" in note
    assert "skipped" not in note
    assert meta["blind_matching"]["verdict"] is None
    assert "ValueError: operands could not be broadcast" in meta["blind_matching"]["error"]
    assert "per_stimulus" in meta["verdicts"] and "matched_baselines" in meta["verdicts"]


@pytest.mark.parametrize("size", [20, 24])
def test_the_calibration_sentence_follows_the_small_set_rule_and_states_its_imbalance(
    planted_run_path, tmp_path, size
):
    """Sets below MIN_CKNNA_SET_SIZE: the note says summary.txt shows no CKNNA numbers, but the
    calibration sentence printed them (sets of 4: "0.953 on the low set … CKNNA gap +0.976").
    And sets matched 1.07 sd away in typicality were said to leave low > high standing, the
    imbalance set apart before the verdict: it now follows the verdict as its caveat (the
    matching has no balance threshold to judge by)."""
    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    pairs = analyses.pairs_with_best_layers(run, k=5)
    sets = report.dispersion_sets(run, "mean", size, 2, 0)
    _, entry = report.calibration_section(
        run, tmp_path, pairs, sets, k=5, metrics=["cknna", "cka"], metric_options={},
        n_shuffles=5, n_matched=20, seed=0,  # fewer matched sets: no verdict (test_tiny_runs)
    )
    verdict = entry["verdict"]
    calibrated = pd.read_csv(tmp_path / "calibrated_scores.csv")
    low = calibrated[(calibrated.metric == "cknna") & (calibrated.set == "low")].calibrated.mean()
    shown = size >= 24
    assert (f"is {low:.3f} on the low set" in verdict) == shown
    assert ("CKNNA gap" in verdict) == shown
    hidden = f"no CKNNA numbers for sets of {size} stimuli (fewer than 24; calibrated_scores keeps"
    assert (hidden in verdict) != shown
    shift = pd.read_csv(tmp_path / "matched_balance.csv").standardised_difference.abs().max()
    caveat = f"against matched sets whose mean typicality still lies up to {shift:.2f} sd"
    assert verdict.index("survives for") < verdict.index(caveat)
    assert "largest covariate imbalance" in verdict[verdict.index(caveat):]


def test_one_known_pair_and_a_one_feature_target_read_right(planted_run_path, tmp_path,
                                                             monkeypatch):
    """"1 known pairs" in the blind-matching sentence; and a 2AFC that is not a number (a
    one-feature target, predictivity.two_afc) is said in a note and counted as undefined in
    the verdict, not as "low > high" failing."""
    from convergence_core import predictivity
    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    pairs = analyses.pairs_with_best_layers(run, k=5)
    sets = report.dispersion_sets(run, "mean", 15, 2, 0)
    _, entry = report.blind_matching_section(
        run, tmp_path, pairs, sets, repeats=1, n_random=0, n_seeds=1, seed=0
    )
    assert "(seeded QAP on CKA, 1 known pair, 15 stimuli per set)" in entry["verdict"]
    real = predictivity.predictivity_table

    def one_feature_language(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        table = real(*args, **kwargs)
        undefined = (table.target == "language") & (table.metric == "two_afc")
        table.loc[undefined, "value"] = np.nan
        return table

    monkeypatch.setattr(predictivity, "predictivity_table", one_feature_language)
    _, entry = report.predictivity_section(
        run, tmp_path, pairs, sets, n_random=1, n_folds=3, seed=0
    )
    names = dict.fromkeys(f"{p.language_model} ({p.language_layer})" for p in pairs)
    language = ", ".join(names)
    assert entry["notes"] == [
        f"linear predictivity's 2AFC is not a number where {language} "
        f"{'is' if len(names) == 1 else 'are'} the target: it has one feature, and 2AFC compares "
        "a prediction with the targets by their correlation across features, which one feature "
        "does not have; its R² and correlation stand"
    ]
    assert f"two afc 0 ({len(pairs)} undefined) of {len(pairs)} pairs" in entry["verdict"]


def test_properties_that_cannot_be_fitted_become_a_note(tmp_path):
    """A run of a handful of stimuli: the property section is a note and the report goes on
    (it stopped the whole report, before its summary, on an 8-stimulus run)."""
    from convergence_core import dispersion_predictors
    from tests.fixtures_runs import add_properties

    run = add_properties(make_synthetic_run(tmp_path / "runs", n=8, name="few"))
    problem = dispersion_predictors.fit_problem(run.properties)
    assert problem
    files, notes, entry, text = report.properties_section(
        run, tmp_path / "out", scores=["mean"], n_permutations=9, n_shuffles=0, seed=0
    )
    assert (files, entry, text) == ([], None, "")
    assert notes == [f"stimulus properties skipped: {problem}"]


def test_a_run_without_language_models_gets_the_dispersion_analyses(tmp_path, capsys):
    """Vision models and a brain 'subject': the report writes Fig. 2 for vision × subject (the
    subject at its default layer, the same numbers as the dense definition) and what needs no
    other side (Fig. S2, GPA stability, what predicts dispersion), and says what it skipped; a
    run of vision models alone gets the latter only. The CLI too."""
    from convergence_core.alignment import cknna, prepare_features
    from convergence_core.subsets import select_stimuli
    from tests.fixtures_runs import make_brain_run

    run = make_brain_run(tmp_path / "run", n=40)
    assert run.properties is not None
    assert analyses.partner_groups(run) == {"other": "vision × brain"}
    meta = report.write_report(  # 4 GPA starts: the run's stored diagnostic, not a rerun
        run, tmp_path / "out", k=5, scores=["mean"], n_random=20, n_permutations=50,
        property_permutations=50, property_shuffles=1, options=report.AnalysisOptions(gpa_starts=4),
    )
    assert meta["best_language_layers"] == {} and meta["parameters"]["partner_models"] == [
        "subj01"
    ]
    assert "no language model" in meta["notes"][0]
    dropped = pd.read_csv(tmp_path / "out" / "drop_fraction.csv")
    full = dropped[(dropped["condition"] == "full") & (dropped["vision_model"] == "vision-a")]
    X = prepare_features(np.asarray(run.embeddings["vision-a"]["stage2"], dtype=np.float64))
    Y = prepare_features(np.asarray(run.embeddings["subj01"]["V1"], dtype=np.float64))
    assert float(full["cknna"].iloc[0]) == pytest.approx(cknna(X, Y, k=5), rel=1e-9)
    for name in ("fig2_dispersion_sets_mean.png", "dispersion_sets_mean.csv", "paired_tests.csv",
                 "figS1_drop_fraction.png",
                 "figS2_leave_one_model_out.png", "leave_one_model_out_statistics.csv",
                 "gpa_stability.csv", "property_tests.csv", "summary.txt", "report.json"):
        assert name in meta["files"] and (tmp_path / "out" / name).exists(), name
    assert meta["files"] == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert set(meta["verdicts"]) == {"mean", "gpa_stability"}
    # sets of 10, below MIN_CKNNA_SET_SIZE: no count from their CKNNA
    assert "for the 3 vision × brain pairs: no verdict: sets of 10 < 24" in meta["verdicts"]["mean"]
    table = pd.read_csv(tmp_path / "out" / "dispersion_sets_mean.csv")
    assert set(table["language_model"]) == {"subj01"} and set(table["language_layer"]) == {"V1"}
    row = table[table["vision_model"] == "vision-b"].iloc[0]
    size = int(row["set_size"])
    low = np.sort(select_stimuli(run.dispersion["mean"].to_numpy(), "low", size))
    X = prepare_features(np.asarray(run.embeddings["vision-b"]["stage2"], dtype=np.float64))
    Y = prepare_features(np.asarray(run.embeddings["subj01"]["V1"], dtype=np.float64))
    assert row["cknna_low_dispersion"] == pytest.approx(cknna(X[low], Y[low], k=5), rel=1e-9)
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert summary.startswith("Run 'run' has no language model: Fig. 2 and S1 for subj01")
    rows = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert set(rows["sides"]) == {"vision × brain"} and len(rows) == 3
    assert "summary.csv" in meta["files"] and "brain (layer)" in summary
    # its sets of 10 are below MIN_CKNNA_SET_SIZE: the text shows "—" for CKNNA, p as it is
    assert "subj01 (V1)   —" in summary
    assert f"{row['permutation_p_value_two_sided']:.4f}" in summary
    assert meta["verdicts"]["gpa_stability"] in summary and meta["verdicts"]["mean"] in summary
    assert report.main([str(run.path), "--out", str(tmp_path / "cli"), "--k", "5",
                        "--scores", "mean", "--n-random", "10", "--n-permutations", "20",
                        "--property-permutations", "20", "--property-shuffles", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Fig. 2 and S1 for subj01" in printed and "note: the vision–language" in printed

    alone = make_synthetic_run(tmp_path / "alone", n=30, language_models=(), images=False)
    meta = report.write_report(
        alone, tmp_path / "alone-out", scores=["mean"], property_permutations=20,
        property_shuffles=1,
    )
    assert set(meta["verdicts"]) == {"gpa_stability"} and meta["paired_tests"] == []
    assert (tmp_path / "alone-out" / "summary.txt").read_text(encoding="utf-8").startswith(
        "Run 'synthetic' has no language model: dispersion analyses only."
    )


@pytest.mark.parametrize("with_language", [False, True])
def test_both_report_paths_explain_the_cknna_numbers_summary_txt_hides(
    tmp_path, monkeypatch, with_language
):
    """Sets below MIN_CKNNA_SET_SIZE: summary.txt shows "—" for CKNNA, and the note saying why
    (and the note on CKNNA outside [-1, 1]) came only on the path with language models: a run of
    vision models and brain recordings showed the dashes unexplained (review of 2026-12-07).
    Both paths now give both notes, the bound note over every CKNNA written, brain pairs too."""
    from tests.fixtures_runs import LANGUAGE_MODELS, make_brain_run

    seen = []

    def bound(values):  # noqa: ANN001, ANN202
        seen.append(list(values))
        return "CKNNA BOUND NOTE"

    monkeypatch.setattr(report, "cknna_bound_note", bound)
    run = make_brain_run(
        tmp_path / "run", n=40, language_models=LANGUAGE_MODELS if with_language else ()
    )
    meta = report.write_report(  # sets of 40 // 4 = 10
        run, tmp_path / "out", k=5, scores=["mean"], n_random=5, n_permutations=5,
        property_permutations=10, property_shuffles=1, universal_folds=2,
        options=report.AnalysisOptions(
            metrics=(), skip=report.OPTIONAL_SECTIONS, gpa_starts=4,
        ),
    )
    assert bool(meta["best_language_layers"]) == with_language
    size_note = "No CKNNA numbers for sets of 10 stimuli (— and n/a in the table"
    notes = [note for note in meta["notes"] if note.startswith(size_note)]
    assert len(notes) == 1, meta["notes"]
    assert meta["notes"].index(notes[0]) + 1 == meta["notes"].index("CKNNA BOUND NOTE")
    summary = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert "subj01 (V1)   —" in summary and "\nNote: CKNNA BOUND NOTE\n" in summary
    assert f"\n{notes[0]}\n\n" in summary  # under the table, before the verdicts
    assert len(seen) == 1 and any(what.endswith(" × subj01 (mean)") for what, *_ in seen[0])


def test_brain_recordings_beside_language_models_get_their_own_fig2_and_s1(tmp_path):
    """A run with language models and a brain 'subject': the vision–language figures are as
    before and the subject gets its own Fig. 2 and S1 (files ``*_partners*``, the same numbers
    as the dense definition on its default region), verdicts ``partners_<score>`` in the summary
    and ``partners`` in report.json."""
    from convergence_core.alignment import cknna, prepare_features
    from convergence_core.subsets import select_stimuli
    from tests.fixtures_runs import LANGUAGE_MODELS, make_brain_run

    run = make_brain_run(tmp_path / "run", n=40, language_models=LANGUAGE_MODELS)
    assert run.language_models == list(LANGUAGE_MODELS) and run.other_partner_models == ["subj01"]
    assert analyses.partner_groups(run) == {
        "language": "vision × language", "other": "vision × brain"
    }
    meta = report.write_report(
        run, tmp_path / "out", k=5, scores=["mean"], n_random=10, n_permutations=20,
        property_permutations=10, property_shuffles=1, universal_folds=2,
        options=report.AnalysisOptions(
            metrics=(), skip=report.OPTIONAL_SECTIONS, gpa_starts=4,
        ),
    )
    out = tmp_path / "out"
    assert set(meta["best_language_layers"]) == set(LANGUAGE_MODELS)
    language = pd.read_csv(out / "dispersion_sets_mean.csv")
    assert set(language["language_model"]) == set(LANGUAGE_MODELS)
    for name in ("dispersion_sets_partners_mean.csv", "fig2_dispersion_sets_partners_mean.png",
                 "paired_tests_partners.csv", "drop_fraction_partners.csv",
                 "figS1_drop_fraction_partners.png"):
        assert name in meta["files"] and (out / name).exists(), name
    assert meta["files"] == sorted(p.name for p in out.iterdir())
    table = pd.read_csv(out / "dispersion_sets_partners_mean.csv")
    assert set(table["language_model"]) == {"subj01"} and set(table["language_layer"]) == {"V1"}
    row = table[table["vision_model"] == "vision-c"].iloc[0]
    low = np.sort(select_stimuli(run.dispersion["mean"].to_numpy(), "low", int(row["set_size"])))
    X = prepare_features(np.asarray(run.embeddings["vision-c"]["stage2"], dtype=np.float64))
    Y = prepare_features(np.asarray(run.embeddings["subj01"]["V1"], dtype=np.float64))
    assert row["cknna_low_dispersion"] == pytest.approx(cknna(X[low], Y[low], k=5), rel=1e-9)
    dropped = pd.read_csv(out / "drop_fraction_partners.csv")
    full = dropped[(dropped["condition"] == "full") & (dropped["vision_model"] == "vision-c")]
    assert float(full["cknna"].iloc[0]) == pytest.approx(cknna(X, Y, k=5), rel=1e-9)
    assert "for the 3 vision × brain pairs: no verdict: sets of 10 < 24" in meta["verdicts"][
        "partners_mean"]
    assert "for the 6 vision × language pairs: no verdict" in meta["verdicts"]["mean"]
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    assert meta["verdicts"]["partners_mean"] in summary and meta["verdicts"]["mean"] in summary
    # summary.csv: every pair, named by its sides; the brain rows are the partners' table's
    rows = pd.read_csv(out / "summary.csv")
    assert list(dict.fromkeys(rows["sides"])) == ["vision × language", "vision × brain"]
    assert (rows["sides"] == "vision × language").sum() == 6
    brain = rows[rows["sides"] == "vision × brain"].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        brain.drop(columns="sides"), table[brain.columns.drop("sides")], check_dtype=False
    )
    # summary.txt: a table per sides, each headed by it, the partner column named for the side
    language_part, brain_part = summary.split("\n\nvision × brain:\n", 1)
    assert language_part.startswith("vision × language:\n")
    assert "language (layer)" in language_part and "brain (layer)" in brain_part
    assert "subj01 (V1)" in brain_part and "subj01" not in language_part
    assert meta["partners"]["models"] == ["subj01"]
    assert meta["partners"]["sides"] == "vision × brain"
    assert {r["score"] for r in meta["partners"]["paired_tests"]} == {"mean"}


def test_a_metric_undefined_on_the_run_is_a_note_not_a_failure(tmp_path):
    """A language model whose features span 3 dimensions (of 12): SVCCA's cca_dim of 10 does not
    fit them, so its rows for that model are NaN and a note says why; the report runs."""
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import quiet_half_embeddings

    embeddings, _ = quiet_half_embeddings(48)
    narrow = np.random.default_rng(0).standard_normal((48, 3))
    embeddings["independent"] = {"final": np.hstack([narrow, np.zeros((48, 9))])}
    stimuli = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(48)],
            "image": [f"{i}.jpg" for i in range(48)],
            "captions": [[f"caption {i}"] for i in range(48)],
        }
    )
    run = write_run_from_embeddings(
        tmp_path / "run", stimuli, embeddings, vision_models=["vision0", "vision1", "vision2"],
        language_models=["planted", "independent"], thumbnails=False,
    )
    meta = report.write_report(
        run, tmp_path / "out", k=5, scores=["mean"], n_random=5, n_permutations=5,
        options=report.AnalysisOptions(
            metrics=("svcca",), metric_permutations=3, n_shuffles=3, n_matched=3,
            skip=("per_stimulus", "predictivity", "blind_matching"),
        ),
    )
    assert any(
        note.startswith("svcca is undefined (NaN) on some sets of vision0 × independent")
        for note in meta["notes"]
    )
    long = pd.read_csv(tmp_path / "out" / "dispersion_sets_metrics.csv")
    svcca = long[long.metric == "svcca"]
    assert svcca[svcca.language_model == "independent"].low_dispersion.isna().all()
    assert svcca[svcca.language_model == "planted"].low_dispersion.notna().all()
    assert long[long.metric == "cknna"].low_dispersion.notna().all()
    calibrated = pd.read_csv(tmp_path / "out" / "calibrated_scores.csv")
    assert set(calibrated.metric) == {"cknna"}  # SVCCA is not a live metric


def test_fixed_points_p_value_is_exact():
    """Against enumeration of every permutation of 6 items, and its limits."""
    counts = np.bincount(
        [sum(int(p[i] == i) for i in range(6)) for p in itertools.permutations(range(6))],
        minlength=7,
    )
    for correct in range(8):
        expected = counts[correct:].sum() / counts.sum()
        assert report.fixed_points_p_value(correct, 6) == pytest.approx(expected, abs=1e-12)
    assert report.fixed_points_p_value(0, 50) == 1.0
    assert report.fixed_points_p_value(1, 50) == pytest.approx(1 - np.exp(-1), abs=1e-9)


def test_gpa_stability_section_reruns_the_runs_gpa(written, planted_run_path):
    from convergence_core.gpa_stability import gpa_stability
    from convergence_core.run import load_run

    _, out = written
    run = load_run(planted_run_path / "runs" / "demo")
    table = pd.read_csv(out / "gpa_stability.csv")
    mean = table[(table.model == "mean") & (table.metric == "dispersion")]
    # the reference solution is the run's own GPA: its dispersion is the run's mean residual
    np.testing.assert_allclose(mean["value"], run.dispersion["mean"], rtol=1e-9, atol=1e-12)
    assert mean["id"].astype(str).tolist() == run.stimuli["id"].astype(str).tolist()
    direct = gpa_stability(run.gpa.inputs, n_starts=4, seed=0, models=run.gpa.models).summary()
    summary = json.loads((out / "report.json").read_text())["gpa_stability"]["summary"]
    assert summary["min_spearman"] == pytest.approx(direct["min_spearman"], abs=1e-9)
    assert summary["max_rank_interval"] == direct["max_rank_interval"]
    assert summary["n_starts"] == 4
    assert json.loads((out / "report.json").read_text())["gpa_stability"]["stored"] is True
    assert "GPA stability (4 random starts" in (out / "summary.txt").read_text()


def test_gpa_stability_with_other_starts_is_recomputed(planted_run_path, tmp_path):
    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    files, entry = report.gpa_stability_section(run, tmp_path, n_starts=2, seed=1)
    assert entry["stored"] is False and entry["summary"]["n_starts"] == 2
    assert "gpa_stability.csv" in files and "(2 random starts" in entry["verdict"]
    assert "other_solution" not in entry and "not the run's GPA" not in entry["verdict"]


def test_a_rerun_diagnostic_at_another_minimum_says_it_is_not_the_runs_gpa(
    planted_run_path, tmp_path, monkeypatch
):
    """From the review: rerun with the report's own starts, the diagnostic adopts its own
    lowest minimum, which may not be the run's GPA (a run of 0 starts keeps Gower's; another seed
    may miss the run's lower minimum); the report then said the run's residuals "are that
    solution's". Here the rerun's solution is moved 1 % away from the run's dispersion."""
    import dataclasses

    from convergence_core.run import load_run

    real = report.gpa_stability

    def elsewhere(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real(*args, **kwargs)
        losses = result.losses.copy()  # also: Gower's start above another minimum
        losses[0] = losses.min() + 1.0
        return dataclasses.replace(result, dispersion=result.dispersion * 1.01, adopted=1,
                                   losses=losses)

    monkeypatch.setattr(report, "gpa_stability", elsewhere)
    run = load_run(planted_run_path / "runs" / "demo")
    _, entry = report.gpa_stability_section(run, tmp_path, n_starts=2, seed=1)
    assert entry["other_solution"] == pytest.approx(0.01, rel=1e-3)
    assert "are the report's, not the run's (4 random starts, seed 0)" in entry["verdict"]
    assert "with --gpa-starts 4 --seed 0 to read the run's own" in entry["verdict"]
    assert "are that solution's" not in entry["verdict"]
    assert "written before GPA took" not in entry["verdict"]


def test_gpa_stopped_at_its_uncertainty_is_said_in_the_report(tmp_path):
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", n=40, images=False, thumbnails=False,
                             gpa_stop="uncertainty")
    files, entry = report.gpa_stability_section(run, tmp_path / "out", n_starts=4, seed=0)
    assert entry["stored"] is True
    assert entry["gpa_stop"]["tol"] == run.gpa_stop.tol == run.gpa_stability.tol
    assert entry["verdict"].endswith(run.gpa_stop.describe())
    assert entry["verdict"].startswith("GPA stability (4 random starts")


def test_skipped_sections_are_left_out(planted_run_path, tmp_path):
    run = str(planted_run_path / "runs" / "demo")
    status = report.main(
        [run, "--out", str(tmp_path), *FAST, "--scores", "mean", "--metrics", "cka",
         "--skip", *report.OPTIONAL_SECTIONS]
    )
    assert status == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert "dispersion_sets_metrics.csv" in names
    assert not {"per_stimulus_alignment.csv", "predictivity_sets.csv", "blind_matching.csv",
                "calibrated_scores.csv", "universal_residuals.csv", "universal_retrieval.csv",
                "gpa_stability.csv"} & names
    meta = json.loads((tmp_path / "report.json").read_text())
    assert meta["universal_space"] == {"note": "universal-space section skipped (--skip)"}
    assert "universal-space section skipped (--skip)" in meta["notes"]
    long = pd.read_csv(tmp_path / "dispersion_sets_metrics.csv")
    assert list(dict.fromkeys(long.metric)) == ["cknna", "cka"]  # CKNNA always
    with pytest.raises(ValueError, match="cannot skip"):
        report.AnalysisOptions(skip=("layer_sweep",))


def test_every_skipped_section_says_so_once(planted_run_path, tmp_path, capsys):
    """`--skip X`: only the universal space printed a "skipped" note; the other sections were
    left out silently. Each skipped section now has one note, on both report paths."""
    run = str(planted_run_path / "runs" / "demo")
    assert report.main([run, "--out", str(tmp_path / "out"), *FAST, "--scores", "mean",
                        "--metrics", "cka", "--skip", *report.OPTIONAL_SECTIONS]) == 0
    printed = capsys.readouterr().out
    notes = json.loads((tmp_path / "out" / "report.json").read_text())["notes"]
    for skip in report.OPTIONAL_SECTIONS:
        said = f"{skip.replace('_', '-')} section skipped (--skip)"
        assert notes.count(said) == 1 and printed.count(f"note: {said}\n") == 1, (skip, notes)
    alone = make_synthetic_run(tmp_path / "alone", n=30, language_models=(), images=False)
    meta = report.write_report(
        alone, tmp_path / "alone-out", scores=["mean"], property_permutations=20,
        property_shuffles=1, options=report.AnalysisOptions(skip=("gpa_stability",)),
    )
    assert meta["notes"].count("gpa-stability section skipped (--skip)") == 1, meta["notes"]


# -- many-to-many: captions embedded by a stand-in language model --------------------------------


class _PlantedCaptionEncoder(Encoder):
    """A language 'model' whose caption embedding is the stimulus's own vector plus noise seeded
    by the caption text: the mean of a stimulus's captions is closer to its vector than one
    caption is (the planted many-to-many effect)."""

    modality = "language"

    def __init__(self, vectors: dict[str, np.ndarray], layer: str) -> None:
        super().__init__("planted", [layer], layer, "planted-weights", torch.device("cpu"))
        self._vectors = vectors
        self._layer = layer

    def encode(self, batch):
        rows = []
        for text in batch:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            noise = np.random.default_rng(seed).standard_normal(self._vectors[text].shape)
            rows.append(self._vectors[text] + 1.5 * noise)
        return {self._layer: np.asarray(rows, dtype=np.float32)}


@pytest.fixture(scope="module")
def captioned_run(tmp_path_factory):
    """The first 60 coco-mini stimuli (five real captions each), quiet-half embeddings, a label
    per stimulus (4 classes), and every caption embedded by the stand-in encoder."""
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import quiet_half_embeddings

    n = 60
    embeddings, _ = quiet_half_embeddings(n)
    stimuli = load_coco(settings.demo_data_root()).stimuli.iloc[:n].reset_index(drop=True)
    stimuli["label"] = [f"class{i % 4}" for i in range(n)]
    vision = embeddings["vision0"]["final"]
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((vision.shape[1],) * 2))[0]
    embeddings["planted"] = {"caption": vision @ rotation}
    run = write_run_from_embeddings(
        tmp_path_factory.mktemp("captioned") / "run", stimuli,
        {k: v for k, v in embeddings.items() if k != "independent"},
        vision_models=["vision0", "vision1", "vision2"], language_models=["planted"],
        thumbnails=False,
    )
    texts, owners = caption_embeddings.caption_texts(run)
    base = embeddings["planted"]["caption"]
    encoder = _PlantedCaptionEncoder({t: base[o] for t, o in zip(texts, owners)}, "caption")
    caption_embeddings.embed_captions(run, "planted", ["caption"], encoder=encoder)
    return run


def test_caption_embeddings_are_cached_atomically_and_checked(captioned_run):
    cached = caption_embeddings.cached_caption_embeddings(captioned_run, "planted", "caption")
    texts, owners = caption_embeddings.caption_texts(captioned_run)
    assert cached is not None and cached.features.shape == (len(texts), 10)  # vision0 rotated
    assert len(texts) > 4 * captioned_run.n_stimuli  # COCO: about five captions per image
    np.testing.assert_array_equal(cached.owners, owners)
    folder = captioned_run.path / "captions" / "planted"
    assert sorted(p.name for p in folder.iterdir()) == ["caption.json", "caption.npy"]
    # the first caption's row is noise around the run's own embedding here (planted), so the
    # recorded difference is large; the real demo's is ~1e-7 (tests/test_end_to_end.py)
    assert caption_embeddings.first_caption_difference(captioned_run, "planted", "caption") > 0.1
    with pytest.raises(ValueError, match="not a language model"):
        caption_embeddings.cached_caption_embeddings(captioned_run, "vision0", "final")


def test_stale_caption_embeddings_are_ignored(captioned_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(captioned_run.path, copy)
    from convergence_core.run import load_run

    run = load_run(copy)
    meta = copy / "captions" / "planted" / "caption.json"
    record = json.loads(meta.read_text())
    record["captions_sha256"] = "0" * 64
    meta.write_text(json.dumps(record))
    assert caption_embeddings.cached_caption_embeddings(run, "planted", "caption") is None
    # and a different model's weights are refused when embedding
    other = _PlantedCaptionEncoder({}, "caption")
    run.manifest.models["planted"].weights_id = "f" * 64
    with pytest.raises(ValueError, match="not those run"):
        caption_embeddings.embed_captions(run, "planted", ["caption"], encoder=other)


def test_captions_are_never_embedded_with_a_model_the_features_did_not_come_from(
    tmp_path, monkeypatch
):
    """A language model read from arrays or a file and named like a registered encoder
    ('minilm'): embedding its captions would load that encoder, whose captions do not belong with
    the user's features (no weights hash to tell). Refused before any model loads; the report's
    note says why instead of suggesting --embed-captions."""
    from convergence_core import models
    from convergence_core.manifest import ModelEntry
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import quiet_half_embeddings

    embeddings, _ = quiet_half_embeddings(30)
    stimuli = load_coco(settings.demo_data_root()).stimuli.iloc[:30].reset_index(drop=True)
    run = write_run_from_embeddings(
        tmp_path / "run", stimuli,
        {"vision0": embeddings["vision0"], "vision1": embeddings["vision1"],
         "minilm": {"final": embeddings["planted"]["block2"]}},
        vision_models=["vision0", "vision1"], language_models=["minilm"], thumbnails=False,
    )
    entry = run.manifest.models["minilm"]
    assert entry.source == "arrays" and not entry.from_encoder

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_encoder", no_loading)
    with pytest.raises(ValueError, match="came from arrays .* not from an encoder"):
        caption_embeddings.embed_captions(run, "minilm", ["final"])
    pairs = [analyses.Pair("vision0", "final", "minilm", "final")]
    found, notes = report._caption_pairs(run, pairs, embed=True)
    assert not found and len(notes) == 1
    assert "no encoder to embed each caption" in notes[0] and "--embed-captions" not in notes[0]
    # runs from before the source was recorded: encoders are the models with a weights hash
    legacy = {**entry.to_dict(), "weights_id": "a" * 64}
    del legacy["source"]
    assert ModelEntry.from_dict(legacy, "models.minilm").from_encoder
    del legacy["weights_id"]
    assert not ModelEntry.from_dict(legacy, "models.minilm").from_encoder
    assert ModelEntry.from_dict({**legacy, "source": "encoder"}, "models.minilm").from_encoder
    # a legacy entry is written back as it was (no source invented), a recorded one round-trips
    assert "source" not in ModelEntry.from_dict(legacy, "models.minilm").to_dict()
    assert ModelEntry.from_dict(entry.to_dict(), "models.minilm") == entry


def test_many_to_many_recovers_the_planted_caption_averaging_effect(captioned_run, tmp_path):
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)
    files, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cknna", "cka"), n_resamples=40,
        embed=False, seed=0,
    )
    table = pd.read_csv(tmp_path / "many_to_many.csv")
    assert files == ["many_to_many.csv", "many_to_many.json"]
    captions = table[table.comparison == "captions"]
    assert len(captions) == 3 * 2 and (captions.n_units == 60).all()
    assert (captions.difference > 0).all()
    # the captions were planted around vision0's features: there the interval clears 0
    assert (captions[captions.vision_model == "vision0"].lower > 0).all()
    np.testing.assert_allclose(captions.difference, captions.averaged - captions.one)
    # 4 class means are too few for an interval over classes (its half-samples would hold 2
    # classes, on which CKA is 1 whatever the data): skipped, once, with the reason
    assert not (table.comparison == "classes").any()
    skipped = [note for note in entry["notes"] if "class averaging skipped" in note]
    assert len(skipped) == 1 and "compares 4 classes; it needs at least 8" in skipped[0]
    assert "mean of all captions" in entry["verdict"]


def test_labels_with_one_member_per_class_skip_class_averaging_and_category_matching(
    captioned_run, tmp_path, monkeypatch
):
    """ImageNet samples: one image per class, so class means are the instances and no other
    stimulus shares a category: both are skipped with a note, the rest runs."""
    unique = captioned_run.stimuli.assign(label=[f"c{i}" for i in range(captioned_run.n_stimuli)])
    monkeypatch.setattr(captioned_run, "stimuli", unique)
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)
    _, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cka",), n_resamples=10, embed=False,
        seed=0,
    )
    assert any("single member" in note for note in entry["notes"])
    assert set(pd.read_csv(tmp_path / "many_to_many.csv").comparison) == {"captions"}
    sets = report.dispersion_sets(captioned_run, "mean", 15, 3, 0)
    _, calibration = report.calibration_section(
        captioned_run, tmp_path, pairs, sets, k=5, metrics=["cknna"], metric_options={},
        n_shuffles=5, n_matched=5, seed=0,
    )
    assert any(
        "typicality and category skipped: the median label holds 1 stimulus (fewer than 5)" in note
        for note in calibration["notes"]
    ), calibration["notes"]
    assert set(pd.read_csv(tmp_path / "matched_baselines.csv").matched_on) == {"typicality"}


def test_category_matched_baselines_where_classes_have_members(captioned_run, tmp_path):
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)
    sets = report.dispersion_sets(captioned_run, "mean", 12, 3, 0)
    _, entry = report.calibration_section(
        captioned_run, tmp_path, pairs, sets, k=5, metrics=["cknna", "cka"], metric_options={},
        n_shuffles=5, n_matched=5, seed=0,
    )
    matched = pd.read_csv(tmp_path / "matched_baselines.csv")
    assert list(dict.fromkeys(matched.matched_on)) == ["typicality", "typicality and category"]
    assert "matched on typicality and category" in entry["verdict"]


def test_the_report_benchmark_runs_and_writes_json():
    """benchmarks/bench_report.py --quick (48 stimuli, small counts): every case measured, ratios
    to the report without the issue-14 sections (timings are read, not asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = "report-smoke-test.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_report.py", "--quick", "--out", out],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = repo / "benchmarks" / "results" / out
    payload = json.loads(path.read_text())
    path.unlink()
    assert payload["quick"] is True
    rows = {row["what"]: row for row in payload["results"]}
    assert rows["report without the issue-14 sections"]["cpu_ratio_to_report_without"] == 1.0
    assert len(rows) == 9 and all(row["cpu_seconds"] >= 0 for row in rows.values())


def test_two_gpa_models_say_why_their_results_look_clean(tmp_path, capsys):
    """With two GPA models the pc1 results repeat the mean ones and every GPA start agrees, by
    construction: the report says so once, in its notes and in summary.txt (the CLI prints it),
    where it would otherwise read as two findings."""
    from convergence_core.dispersion import two_model_note

    run = make_synthetic_run(tmp_path / "runs", 40, name="two", images=False, thumbnails=False,
                             vision_models=("vision-a", "vision-b"))
    assert report.main([str(run.path), "--out", str(tmp_path / "out"), *FAST, "--metrics",
                        "cknna", "--size", "20"]) == 0  # at most half the 40 stimuli
    out = tmp_path / "out"
    note = two_model_note(2)
    assert note is not None and two_model_note(3) is None
    assert note in json.loads((out / "report.json").read_text())["notes"]
    assert f"Note: {note}" in (out / "summary.txt").read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert printed.count(note) == 1  # from summary.txt; it was printed a second time as "note:"
    # what the note claims: the pc1 sets are the mean sets, and the GPA starts agree
    mean, pc1 = (pd.read_csv(out / f"dispersion_sets_{s}.csv") for s in ("mean", "pc1"))
    columns = ["cknna_low_dispersion", "cknna_high_dispersion"]
    pd.testing.assert_frame_equal(mean[columns], pc1[columns])
    stability = json.loads((out / "report.json").read_text())["gpa_stability"]["summary"]
    assert stability["max_rank_interval"] == 0


def test_a_tiny_run_says_which_k_fits_and_reports_what_it_can(tmp_path):
    """12 stimuli: the defaults (k = 10) cannot fit, and the error names the k that does, in one
    go; with it the report runs, the universal space keeps its cross-modal dispersion and the
    retrieval that needs 5 folds of 6 is a note."""
    with pytest.raises(ValueError, match="12 stimuli is too small for k = 10.*use --k 5 or less"):
        report.default_set_size(12, 10)
    with pytest.raises(ValueError, match="need at least 6"):
        report.default_set_size(5, 10)
    assert report.default_set_size(12, 5) == 6 and report.default_set_size(400, 10) == 100
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    meta = report.write_report(
        run, tmp_path / "out", k=3, scores=["mean"], n_random=5, n_permutations=5,
        property_permutations=20, property_shuffles=1,
        options=report.AnalysisOptions(metrics=("cknna",), metric_permutations=2, n_shuffles=3,
                                       n_matched=3, skip=("gpa_stability",)),
    )
    assert any(note.startswith("universal-space retrieval skipped: 12 stimuli in 5 folds")
               for note in meta["notes"]), meta["notes"]
    assert "relation" in meta["universal_space"] and "headline" not in meta["universal_space"]
    assert (tmp_path / "out" / "universal_cross_modal_dispersion.csv").is_file()


def test_a_large_run_starts_with_what_makes_it_long_and_how_to_shorten_it():
    """From LARGE_RUN_STIMULI stimuli the report's first line names the options that leave out
    its slow parts, only those still on; a small run, or one with them off, gets no such line."""
    full = report.large_run_hint(report.LARGE_RUN_STIMULI, report.AnalysisOptions())
    assert full.startswith("a run of 10,000 stimuli: the full report takes over an hour")
    assert full.endswith(
        "add --metrics cknna --skip universal_space predictivity calibration gpa_stability"
    )
    assert report.large_run_hint(report.LARGE_RUN_STIMULI - 1, report.AnalysisOptions()) is None
    some = report.AnalysisOptions(metrics=("cknna",), skip=("universal_space", "calibration"))
    assert report.large_run_hint(50_000, some).endswith(
        "add --skip predictivity gpa_stability"
    )
    quick = report.AnalysisOptions(metrics=("cknna",), skip=report._SLOW_SECTIONS)
    assert report.large_run_hint(100_000, quick) is None
    # a run without language models runs only GPA stability of the slow sections
    assert report.large_run_hint(
        20_000, report.AnalysisOptions(metrics=("cknna",)), ("gpa_stability",)
    ).endswith("add --skip gpa_stability")


def test_long_sections_tell_how_far_they_are(monkeypatch):
    """Inside a long section a line at most every SET_PROGRESS_EVERY_S seconds, none before,
    with the sets done in all and the time left at the rate so far."""
    told = []
    quiet = report._set_progress(told.append, "Fig. 2", every_s=3600.0)
    for done in range(1, 201):
        quiet("random sets", done, 200)
    assert told == []
    clock = iter([0.0, 25.0, 30.0, 46.0, 50.0, 70.0])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    step = report._set_progress(told.append, "Fig. 2", total_sets=203, every_s=20.0)  # at 0 s
    step("random sets", 1, 1)  # at 25 s: the first set (with the set-up) gives no rate
    for done in (1, 2, 3, 4):  # at 30, 46, 50 and 70 s: 10.5 s, then 11.25 s per set since 25 s
        step("label shuffles (mean)", done, 200)
    assert told == [
        "Fig. 2: random sets, 1 of 1 sets; 1 of 203 in all",
        "Fig. 2: label shuffles (mean), 2 of 200 sets; 3 of 203 in all; about 35 min left",
        "Fig. 2: label shuffles (mean), 4 of 200 sets; 5 of 203 in all; about 37 min left",
    ]
    # one stage: no "in all"; another unit
    clock = iter([0.0, 1.0, 30.0])
    told.clear()
    step = report._set_progress(told.append, "shuffled pairings", total_sets=16, every_s=20.0,
                                unit="pairings")
    step("low", 1, 16)
    step("low", 2, 16)
    assert told == ["shuffled pairings: low, 2 of 16 pairings; about 7 min left"]
    # a stage done in one piece counts all its items
    clock = iter([0.0, 30.0, 60.0])
    told.clear()
    step = report._set_progress(told.append, "shuffled pairings", total_sets=10, every_s=20.0,
                                unit="pairings")
    step("low", 5, 5)
    step("high", 5, 5)
    assert told == ["shuffled pairings: low, 5 of 5 pairings; 5 of 10 in all",
                    "shuffled pairings: high, 5 of 5 pairings; 10 of 10 in all; about 0 s left"]
    # (no rate until items are done after the first call: its items carry the set-up)
    assert report._duration(89.4) == "89 s" and report._duration(95) == "2 min"
    # the feature sets of Fig. 2 (what the section's calls report): random sets, then per score
    # low + high and 2 × the shuffles of the metrics other than CKNNA
    assert report._fig2_feature_sets(["cknna", "svcca"], 2, 200, 100) == 200 + 2 * 202
    assert report._fig2_feature_sets(["cknna"], 2, 200, 100) == 204


def test_a_report_refuses_a_run_that_a_precompute_rewrites_meanwhile(tmp_path, monkeypatch):
    """From the reliability audit: a report overlapping a precompute of its run ended as if
    complete, with sections missing and a false 'no property table' note. A run locked by a live
    precompute is refused at once; one rewritten while the report ran fails at the end, without
    report.json."""
    import os

    from convergence_core.cache import run_lock

    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    fast = {"k": 3, "scores": ["mean"], "n_random": 5, "n_permutations": 5,
            "property_permutations": 20, "property_shuffles": 1,
            "options": report.AnalysisOptions(metrics=("cknna",), metric_permutations=2,
                                              n_shuffles=3, n_matched=3,
                                              skip=("gpa_stability", "universal_space"))}
    with run_lock(run.path), pytest.raises(  # a live process (this one) holds the run
        ValueError, match=r"a precompute \(pid \d+\) is writing run 'tiny' now "
        r"\(it holds .*\.tiny\.lock\).*delete that file if process"
    ):
        report.write_report(run, tmp_path / "out", **fast)
    original = report.leave_one_model_out_section

    def rewritten_meanwhile(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        manifest = run.path / "manifest.json"
        manifest.write_text(manifest.read_text())  # a precompute's save, mid-report
        os.utime(manifest, ns=(0, manifest.stat().st_mtime_ns + 10**9))
        return original(*args, **kwargs)

    monkeypatch.setattr(report, "leave_one_model_out_section", rewritten_meanwhile)
    with pytest.raises(ValueError, match="changed while the report was running"):
        report.write_report(run, tmp_path / "out2", **fast)
    assert not (tmp_path / "out2" / "report.json").exists()


def test_numpy_settings_and_undefined_p_values_still_give_report_json(tmp_path, monkeypatch):
    """From the review: settings given as numpy numbers (k = np.int64(3), from an array of
    choices, say) and a property test without a p-value (NaN, against a constant score) reached
    report.json as they were, which JSON refused after every section had run."""
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    original = report.property_summary

    def with_an_undefined_test(analysis, top=5):  # noqa: ANN001, ANN202
        analysis.tests.loc[analysis.tests.index[0], ["p_value", "q_value"]] = np.nan
        return original(analysis, top)

    monkeypatch.setattr(report, "property_summary", with_an_undefined_test)
    summary = report.write_report(
        run, tmp_path / "out", k=np.int64(3), q=np.float32(0.25), scores=["mean"],
        n_random=np.int64(5), n_permutations=5, property_permutations=20, property_shuffles=1,
        options=report.AnalysisOptions(metrics=("cknna",), metric_permutations=np.int64(2),
                                       n_shuffles=3, n_matched=3,
                                       skip=("gpa_stability", "universal_space")),
    )
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["parameters"]["metric_permutations"] == 2
    assert written["parameters"]["k"] == 3 and written["parameters"]["fraction_dropped"] == 0.25
    top = written["properties"]["mean"]["top_properties"][0]
    assert top["p_value"] is None and summary["parameters"]["n_random"] == 5


# -- from the audit: settings refused before the first section, stale and non-finite report.json -


def _tiny_report_settings(**options):  # noqa: ANN003, ANN202
    return {"k": 3, "scores": ["mean"], "n_random": 5, "n_permutations": 5,
            "property_permutations": 20, "property_shuffles": 1,
            "options": report.AnalysisOptions(metrics=("cknna",), metric_permutations=2,
                                              n_shuffles=3, n_matched=3,
                                              skip=("gpa_stability", "universal_space"),
                                              **options)}


def test_settings_are_refused_before_the_first_section_writes(planted_run_path, tmp_path):
    """Unknown scores or metrics and k too large for the sets were refused after the layer sweep
    had written its files; predictivity_folds = 1 and blind matching of no set got through."""
    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    out = tmp_path / "out"
    for match, settings_ in (
        (r"unknown dispersion score 'median'.*\(--scores\)", {"scores": ["median"]}),
        (r"pass at least one dispersion score.*\(--scores\)", {"scores": []}),
        (r"unknown metric 'cknn'.*\(--metrics\)",
         {"options": report.AnalysisOptions(metrics=("cknn",))}),
        (r"k=10 is too large for sets of 8 stimuli.*\(--k, --size\)", {"size": 8, "k": 10}),
        (r"too small for k = 40.*use --k 39 or less", {"k": 40}),  # the default size
    ):
        with pytest.raises(ValueError, match=match):
            report.write_report(run, out, n_random=2, n_permutations=2, **settings_)
        assert not out.exists()
    with pytest.raises(ValueError, match="predictivity_folds must be an integer >= 2"):
        report.AnalysisOptions(predictivity_folds=1)
    with pytest.raises(ValueError, match="--blind-matching-random 10.*--skip blind_matching"):
        report.AnalysisOptions(blind_matching_repeats=0, blind_matching_random=0)
    report.AnalysisOptions(blind_matching_repeats=0, blind_matching_random=0,
                           skip=("blind_matching",))  # nothing to match: nothing refused


def test_a_rerun_that_fails_leaves_no_earlier_report_json(tmp_path, monkeypatch):
    """A failed rerun into an --out with a report left the old report.json and summary.txt beside
    the new tables: a folder with report.json must hold one whole report."""
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"parameters": {}, "files": []}\n')  # a report's
    (out / "summary.txt").write_text("an earlier report\n")
    with pytest.raises(ValueError, match="--scores"):  # refused: the earlier report stays whole
        report.write_report(run, out, **{**_tiny_report_settings(), "scores": ["median"]})
    assert (out / "report.json").exists() and (out / "summary.txt").exists()

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("stopped mid-way")

    monkeypatch.setattr(report, "leave_one_model_out_section", stopped)
    with pytest.raises(RuntimeError, match="stopped mid-way"):
        report.write_report(run, out, **_tiny_report_settings())
    assert (out / "layer_sweep.csv").exists()  # the new tables so far ...
    assert not (out / "report.json").exists() and not (out / "summary.txt").exists()  # ... alone


def test_files_of_those_names_that_no_report_wrote_stay(tmp_path, monkeypatch):
    """--out pointed at a folder of the user's own: a report.json that is not a report's, and a
    summary.txt beside it, are not deleted when the report stops mid-way (from the review)."""
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.json").write_text('{"mine": 1}\n')
    (out / "summary.txt").write_text("my notes\n")

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("stopped mid-way")

    monkeypatch.setattr(report, "leave_one_model_out_section", stopped)
    with pytest.raises(RuntimeError, match="stopped mid-way"):
        report.write_report(run, out, **_tiny_report_settings())
    assert (out / "report.json").read_text() == '{"mine": 1}\n'
    assert (out / "summary.txt").read_text() == "my notes\n"


def test_analysis_options_are_counts() -> None:
    """A fraction or a bool was taken for a count (int() of it passed the check)."""
    for name, value in (("predictivity_folds", 2.9), ("n_shuffles", True)):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            report.AnalysisOptions(**{name: value})


def test_non_finite_numbers_are_null_in_report_json(tmp_path, monkeypatch):
    """An inf (a paired t of differences without variance) made write_json refuse the whole
    report.json after every section had run."""
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    original = analyses.paired_set_tests
    monkeypatch.setattr(analyses, "paired_set_tests",
                        lambda table: original(table).assign(statistic=np.inf))
    returned = report.write_report(run, tmp_path / "out", **_tiny_report_settings())
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["paired_tests"] and all(
        row["statistic"] is None for row in written["paired_tests"]
    )
    assert returned["paired_tests"] == written["paired_tests"]
    assert report._plain_json({"a": (np.float32(-np.inf), [np.nan, np.int64(2)])}) == {
        "a": [None, [None, 2]]
    }


def test_blind_matching_refuses_a_large_set_before_any_k_means(
    planted_run_path, tmp_path, monkeypatch
):
    """k-means chose the seeds on the whole set (22.8 s at 25,000 × 768) before blind matching
    refused sets above its limit."""
    import convergence_core.blind_matching as blind

    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    pairs = analyses.pairs_with_best_layers(run, k=5)
    sets = report.dispersion_sets(run, "mean", 15, 2, 0)

    def no_k_means(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("k-means ran on a set blind matching refuses")

    monkeypatch.setattr(report, "image_seeds", no_k_means)
    monkeypatch.setattr(blind, "MAX_STIMULI", 10)
    with pytest.raises(report.SectionSkipped, match="15 stimuli: blind matching .* at most 10"):
        report.blind_matching_section(run, tmp_path, pairs, sets, repeats=1, n_random=1,
                                      n_seeds=3, seed=0)
    monkeypatch.setattr(blind, "MAX_STIMULI", 3000)
    with pytest.raises(ValueError, match="no set to match"):  # was a KeyError: not a note
        report.blind_matching_section(run, tmp_path, pairs, sets, repeats=0, n_random=0,
                                      n_seeds=3, seed=0)


def test_stimuli_without_a_label_take_no_part_in_class_averaging(captioned_run, tmp_path,
                                                                 monkeypatch):
    """A label column with a missing value raised TypeError in the many-to-many section (which
    turns only ValueError into a note), ending the report."""
    labels = pd.Series([f"class{i % 10}" for i in range(captioned_run.n_stimuli)], dtype=object)
    labels[[5, 17]] = None
    labels[33] = np.nan
    monkeypatch.setattr(captioned_run, "stimuli", captioned_run.stimuli.assign(label=labels))
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)
    _, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cka",), n_resamples=10, embed=False,
        seed=0,
    )
    classes = pd.read_csv(tmp_path / "many_to_many.csv").query("comparison == 'classes'")
    assert len(classes) == len(pairs) and (classes.n_units == 10).all()  # no class of None
    assert not any("class averaging skipped" in note for note in entry["notes"])


def test_many_to_many_section_tells_how_far_it_is_and_keeps_its_numbers(captioned_run, tmp_path,
                                                                       monkeypatch):
    """From the README walkthrough: the section ran 172 s on the demo run without a progress
    line. It now tells the resamples done, as the other long sections (a fake clock 30 s apart:
    a line per resample); its numbers are those of a run without progress (same seed)."""
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)
    settings_ = {"k": 5, "metrics": ("cka",), "n_resamples": 10, "embed": False, "seed": 0}
    report.many_to_many_section(captioned_run, tmp_path / "quiet", pairs, **settings_)
    clock = itertools.count(0.0, 30.0)
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    told: list[str] = []
    report.many_to_many_section(captioned_run, tmp_path / "told", pairs, tell=told.append,
                                **settings_)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "quiet" / "many_to_many.csv"),
                                  pd.read_csv(tmp_path / "told" / "many_to_many.csv"))
    # 3 pairs × 1 metric × 10 resamples of the caption comparison; the class comparison (4
    # classes, too few) is skipped at the first pair, and the total drops to what runs
    first = f"{pairs[0].vision_model} × {pairs[0].language_model}, cka, captions"
    last = f"{pairs[-1].vision_model} × {pairs[-1].language_model}, cka, captions"
    assert len(told) == 3 * 10 and all(line.startswith("many-to-many: ") for line in told)
    assert told[0] == f"many-to-many: {first}, 1 of 10 resamples; 1 of 60 in all"
    assert told[10].startswith(f"many-to-many: {pairs[1].vision_model} × ")
    assert ", 1 of 10 resamples; 11 of 30 in all; about " in told[10]
    assert told[-1] == (
        f"many-to-many: {last}, 10 of 10 resamples; 30 of 30 in all; about 0 s left"
    )


def test_many_to_many_captions_run_on_a_capped_sample_of_a_large_run(captioned_run, tmp_path,
                                                                      monkeypatch):
    """Exact k-NN on every stimulus cost hours at 100,000 stimuli: above the cap a seeded sample
    of that many is used, and a note says so; below it every stimulus (as before)."""
    monkeypatch.setattr(report, "MANY_TO_MANY_MAX_STIMULI", 24)
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)[:1]
    _, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cka",), n_resamples=10, embed=False,
        seed=0,
    )
    captions = pd.read_csv(tmp_path / "many_to_many.csv").query("comparison == 'captions'")
    assert captions.n_units.tolist() == [24]
    assert any("random sample of 24 of the 60 stimuli" in note for note in entry["notes"])
    monkeypatch.setattr(report, "MANY_TO_MANY_MAX_STIMULI", 60)
    _, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cka",), n_resamples=10, embed=False,
        seed=0,
    )
    captions = pd.read_csv(tmp_path / "many_to_many.csv").query("comparison == 'captions'")
    assert captions.n_units.tolist() == [60]
    assert not any("random sample of" in note for note in entry["notes"])


def test_predictivity_samples_2afc_foils_above_its_limit_and_says_so(planted_run_path, tmp_path,
                                                                   monkeypatch):
    """2AFC over all pairs costs O(s²·d) per set and direction: over an hour for the report at
    100,000 stimuli (s = 25,000). Above PREDICTIVITY_ALL_PAIRS_MAX_STIMULI each stimulus meets
    PREDICTIVITY_FOILS others drawn with the report's seed, and a note says so; at or below it,
    all pairs (as before)."""
    from convergence_core import predictivity
    from convergence_core.run import load_run

    run = load_run(planted_run_path / "runs" / "demo")
    pair = analyses.pairs_with_best_layers(run, k=5)[0]
    sets = report.dispersion_sets(run, "mean", 30, 1, 0)
    vision = run.neighbours(pair.vision_model, pair.vision_layer).features
    language = run.neighbours(pair.language_model, pair.language_layer).features
    monkeypatch.setattr(report, "PREDICTIVITY_FOILS", 7)
    for limit, foils in ((29, 7), (30, None)):
        monkeypatch.setattr(report, "PREDICTIVITY_ALL_PAIRS_MAX_STIMULI", limit)
        _, entry = report.predictivity_section(run, tmp_path, [pair], sets, n_random=1,
                                               n_folds=3, seed=4)
        assert entry["two_afc_foils"] == foils
        sampled = [note for note in entry["notes"] if "2AFC" in note]
        if foils is None:
            assert not sampled
        else:
            assert len(sampled) == 1
            assert "compares each stimulus with 7 random others (seed 4;" in sampled[0]
            assert "not all 29" in sampled[0]
        long = pd.read_csv(tmp_path / "predictivity_sets.csv").query("metric == 'two_afc'")
        for name, rows in (("low", sets.low), ("high", sets.high), ("random", sets.random[0])):
            expected = predictivity.predictivity_table(
                vision.rows(rows), language.rows(rows), n_folds=3, seed=4, n_foils=foils
            ).query("metric == 'two_afc'")
            got = long[long.set == name]
            assert got.value.tolist() == pytest.approx(expected.value.tolist(), abs=1e-12)
    full = long  # the all-pairs values: the sampled ones differ
    monkeypatch.setattr(report, "PREDICTIVITY_ALL_PAIRS_MAX_STIMULI", 29)
    report.predictivity_section(run, tmp_path, [pair], sets, n_random=1, n_folds=3, seed=4)
    sampled = pd.read_csv(tmp_path / "predictivity_sets.csv").query("metric == 'two_afc'")
    assert not np.allclose(sampled.value, full.value)


def test_a_language_model_undefined_at_every_layer_is_used_at_its_default_layer(
    planted_run_path, tmp_path, monkeypatch
):
    """CKNNA NaN at every layer of one language model stopped the whole report (best-layer
    selection); the dashboard pages use the default layer. The report does too, for that model
    alone, and says so in a note naming the model and the layer (report.json and summary.txt)."""
    real = analyses.layer_sweep

    def sweep(run, **settings):  # noqa: ANN001, ANN003
        table = real(run, **settings)
        table.loc[table["language_model"] == "planted", "cknna"] = np.nan
        return table

    monkeypatch.setattr(analyses, "layer_sweep", sweep)
    run = str(planted_run_path / "runs" / "demo")
    with contextlib.redirect_stdout(io.StringIO()):
        status = report.main([run, "--out", str(tmp_path), *FAST, "--scores", "mean",
                              "--metrics", "cknna", "--skip", *report.OPTIONAL_SECTIONS])
    assert status == 0
    meta = json.loads((tmp_path / "report.json").read_text())
    default = "block0"  # the planted model's default layer (its best is block2)
    assert meta["best_language_layers"]["planted"] == default
    assert meta["best_language_layers"]["independent"] == "final"
    said = [note for note in meta["notes"] if "'planted'" in note]
    assert len(said) == 1 and f"default layer '{default}'" in said[0]
    assert "dashboard pages" in said[0]
    assert f"default layer '{default}'" in (tmp_path / "summary.txt").read_text()
    best = pd.read_csv(tmp_path / "best_language_layers.csv").set_index("language_model")
    assert best.loc["planted", "language_layer"] == default
    assert np.isnan(best.loc["planted", "mean_cknna"])
    assert not np.isnan(best.loc["independent", "mean_cknna"])
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(summary[summary.language_model == "planted"].language_layer) == {default}


def test_paired_tests_say_what_they_take_as_independent(written):
    """Pairs that share models are not independent replicates: beside the Wilcoxon and t tests
    (each with a note saying their p-values are too small) the report tests the mean over pairs
    on the per-pair test's label shuffles, every pair on the same ones."""
    _, out = written
    paired = pd.read_csv(out / "paired_tests.csv")
    for score, group in paired.groupby("score"):
        tests = group.set_index("test")
        assert list(tests.index) == [
            "wilcoxon_signed_rank", "paired_t", "permutation_mean_over_pairs"
        ]
        assert tests["note"].str.contains("too small").tolist() == [True, True, False]
        sets = pd.read_csv(out / f"dispersion_sets_{score}.csv")
        assert tests.loc["permutation_mean_over_pairs", "p_value"] == pytest.approx(
            sets["mean_over_pairs_p_value_two_sided"].iloc[0]
        )
        assert tests.loc["permutation_mean_over_pairs", "statistic"] == pytest.approx(
            (sets.cknna_low_dispersion - sets.cknna_high_dispersion).mean()
        )
    meta = json.loads((out / "report.json").read_text())
    assert {row["test"] for row in meta["paired_tests"]} >= {"permutation_mean_over_pairs"}
    assert all(row["note"] for row in meta["paired_tests"])


def _some_unlabelled(run, every: int = 3) -> pd.Series:
    """The run's labels (4 classes) with every ``every``-th stimulus's missing: None, NaN or an
    empty string in turn (a parquet column's missing value, a CSV's empty cell)."""
    labels = pd.Series([f"class{i % 4}" for i in range(run.n_stimuli)], dtype=object)
    missing = np.arange(0, run.n_stimuli, every)
    labels[missing] = np.array([[None, np.nan, ""][j % 3] for j in range(missing.size)],
                               dtype=object)
    return labels


def test_the_report_says_how_stimuli_without_a_label_are_matched(captioned_run, tmp_path,
                                                                 monkeypatch):
    """str(label) made None, NaN and "" three categories of the category-matched baselines; they
    are one group, matched only among themselves, and the report says so."""
    labels = _some_unlabelled(captioned_run)
    monkeypatch.setattr(captioned_run, "stimuli", captioned_run.stimuli.assign(label=labels))
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)
    sets = report.dispersion_sets(captioned_run, "mean", 12, 3, 0)
    _, entry = report.calibration_section(
        captioned_run, tmp_path, pairs, sets, k=5, metrics=["cknna"], metric_options={},
        n_shuffles=5, n_matched=5, seed=0,
    )
    matched = pd.read_csv(tmp_path / "matched_baselines.csv")
    assert "typicality and category" in set(matched.matched_on), entry["notes"]
    said = [note for note in entry["notes"] if "without a label" in note]
    assert len(said) == 1 and "the 20 of 60 stimuli without a label" in said[0]
    assert "matched only among themselves" in said[0]

    # a matching that could not be made is said skipped, and only that (the review found both
    # "matched only among themselves" and "skipped" side by side)
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("no stimulus without a label is left outside the chosen set")

    monkeypatch.setattr(analyses, "matched_baselines", refuse)
    _, entry = report.calibration_section(
        captioned_run, tmp_path, pairs, sets, k=5, metrics=["cknna"], metric_options={},
        n_shuffles=5, n_matched=5, seed=0,
    )
    assert not [note for note in entry["notes"] if "matched only among themselves" in note]
    assert any("typicality and category skipped" in note for note in entry["notes"])


def test_class_averaging_says_it_leaves_out_stimuli_without_a_label(captioned_run, tmp_path,
                                                                    monkeypatch):
    """An empty string was a class of its own in class averaging (None and NaN were left out);
    every kind of missing label is left out, and a note says how many."""
    labels = pd.Series([f"class{i % 10}" for i in range(captioned_run.n_stimuli)], dtype=object)
    labels[np.arange(0, 60, 3)] = ["", None, np.nan, " "] * 5
    monkeypatch.setattr(captioned_run, "stimuli", captioned_run.stimuli.assign(label=labels))
    monkeypatch.setattr(report, "MANY_TO_MANY_MAX_STIMULI", 8)
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)[:1]
    _, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cka",), n_resamples=10, embed=False,
        seed=0,
    )
    classes = pd.read_csv(tmp_path / "many_to_many.csv").query("comparison == 'classes'")
    assert classes.n_units.tolist() == [8]  # 10 classes (no class of ""): a sample of 8
    said = [note for note in entry["notes"] if "without a label" in note]
    assert len(said) == 1 and "leaves out the 20 of 60 stimuli without a label" in said[0]


def test_class_averaging_of_many_classes_runs_on_a_seeded_sample_of_classes(
    captioned_run, tmp_path, monkeypatch
):
    """Thousands of small classes made the class comparison slow (exact k-NN over every class,
    ~2 × resamples scores per pair and metric). Above MANY_TO_MANY_MAX_STIMULI classes a seeded
    sample of that many classes is compared, every member of each, and a note gives the seed."""
    labels = pd.Series([f"class{i % 15}" for i in range(captioned_run.n_stimuli)], dtype=object)
    monkeypatch.setattr(captioned_run, "stimuli", captioned_run.stimuli.assign(label=labels))
    monkeypatch.setattr(report, "MANY_TO_MANY_MAX_STIMULI", 8)
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)[:2]
    _, entry = report.many_to_many_section(
        captioned_run, tmp_path, pairs, k=5, metrics=("cka",), n_resamples=10, embed=False,
        seed=3,
    )
    classes = pd.read_csv(tmp_path / "many_to_many.csv").query("comparison == 'classes'")
    assert classes.n_units.tolist() == [8, 8]
    said = [note for note in entry["notes"] if "class averaging on a random sample" in note]
    assert len(said) == 1 and "of 8 of the 15 classes (seed 3;" in said[0]
    from convergence_core import many_to_many
    from convergence_core.neighbours import prepare_rows

    pair = pairs[0]
    vision = captioned_run.neighbours(pair.vision_model, pair.vision_layer).features
    language = captioned_run.neighbours(pair.language_model, pair.language_layer).features
    classes_sorted = np.unique(labels.to_numpy().astype(str))  # "class0", "class1", "class10"…
    kept = classes_sorted[np.sort(np.random.default_rng(3).choice(15, 8, replace=False))]
    rows = np.flatnonzero(labels.isin(kept).to_numpy())
    expected = many_to_many.class_averaging_effect(
        lambda X, Y: registry.measure(
            "cka", prepare_rows(X, vision.threshold), prepare_rows(Y, language.threshold),
        ),
        vision.raw[rows], language.raw[rows], labels.to_numpy()[rows], n_resamples=10, seed=3,
    )
    assert classes.averaged.iloc[0] == pytest.approx(expected.averaged)
    assert classes.one.iloc[0] == pytest.approx(expected.one)


def test_a_run_with_a_damaged_file_is_refused_before_any_section(tmp_path, capsys):
    """An embedding of the wrong width (the manifest and GPA say 16 features) made a whole
    report of wrong numbers with exit 0; the report now checks the run's files as the dashboard
    does and refuses it, naming a damaged file and the repair, before writing anything."""
    run = make_synthetic_run(tmp_path / "cache", n=40, thumbnails=False)
    keys = run._keys("vision-a", "stage2")
    np.save(run.layout.embedding(*keys), np.random.default_rng(0).standard_normal((40, 3)))
    out = tmp_path / "out"
    assert report.main([str(run.path), "--out", str(out), "--n-random", "2"]) == 2
    error = capsys.readouterr().err
    assert "the run is damaged: delete the run folder" in error, error
    assert "Traceback" not in error
    assert not (out / "report.json").exists() and not (out / "summary.txt").exists()


def test_a_new_report_removes_every_file_the_earlier_one_listed(tmp_path):
    """Reusing --out mixed two reports: only report.json and summary.txt of the earlier one were
    removed, so its tables and figures that the new report does not write (a run without
    language models writes no Fig. 2) stayed beside the new ones, unnoticed (from a review of
    the command line). Every file the earlier report.json lists goes; nothing else does."""
    out = tmp_path / "out"
    out.mkdir()
    listed = ["layer_sweep.csv", "layer_sweep.json", "fig2_dispersion_sets_mean.png", "summary.txt"]
    for name in [*listed, "notes.md", "mine.csv"]:
        (out / name).write_text("x")
    (tmp_path / "outside.csv").write_text("x")
    (out / "report.json").write_text(json.dumps({
        "parameters": {}, "files": [*listed, "report.json", "../outside.csv", "notes.md", 7],
    }))
    report._forget_earlier_report(out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.csv", "notes.md"]
    assert (tmp_path / "outside.csv").exists()  # only plain names inside --out


def test_a_run_file_it_cannot_read_is_named_not_blamed_on_out(tmp_path, monkeypatch, capsys):
    """Any OSError was reported as "cannot write the report to --out": an unreadable file of the
    run sent the user to fix --out (from a review of the command line). A file outside --out is
    named as one that cannot be read; one inside it is still a write error."""
    run = make_synthetic_run(tmp_path / "runs", 12, name="tiny", images=False, thumbnails=False)
    out = tmp_path / "out"
    unreadable = run.path / "embeddings" / "features.npy"

    def fails(error):  # noqa: ANN001, ANN202
        def write_report(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise error
        return write_report

    monkeypatch.setattr(report, "write_report", fails(PermissionError(
        13, "Permission denied", str(unreadable))))
    assert report.main([str(run.path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot read {unreadable} (Permission denied)" in error and "--out" not in error, error
    monkeypatch.setattr(report, "write_report", fails(PermissionError(
        13, "Permission denied", str(out / "layer_sweep.csv"))))
    assert report.main([str(run.path), "--out", str(out)]) == 2
    assert "cannot write the report to" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cap", "k", "metric", "said"),
    [
        (6, 5, "cka", "compares 6 images; it needs at least 8"),
        (10, 5, "mutual_knn", "half-samples of 5 images are too few for k = 5 neighbours"),
    ],
)
def test_many_to_many_on_too_few_images_is_a_skip_not_a_bug(
    captioned_run, tmp_path, monkeypatch, cap, k, metric, said
):
    """Since unexpected section errors are said as bugs, what a small run cannot have must be a
    SectionSkipped: fewer images than caption averaging needs, or half-samples too small for k
    (here a capped sample stands for a small run)."""
    monkeypatch.setattr(report, "MANY_TO_MANY_MAX_STIMULI", cap)
    pairs = analyses.pairs_with_best_layers(captioned_run, k=5)[:1]
    with pytest.raises(report.SectionSkipped, match=said):
        report.many_to_many_section(
            captioned_run, tmp_path, pairs, k=k, metrics=(metric,), n_resamples=10, embed=False,
            seed=0,
        )
