"""`report.main` on a planted run: files written, summary parses and agrees with the analyses."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from convergence_core import report
from tests.fixtures_runs import make_synthetic_run

FAST = ["--n-random", "20", "--n-permutations", "40", "--k", "5", "--size", "20"]


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
    status = report.main([str(planted_run_path / "runs" / "demo"), "--out", str(out), *FAST])
    return status, out


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


def test_report_json_verdicts_come_from_the_numbers(written):
    _, out = written
    meta = json.loads((out / "report.json").read_text())
    assert meta["parameters"]["set_size"] == 20
    assert meta["best_language_layers"]["planted"] == "block2"
    summary = pd.read_csv(out / "summary.csv")
    for score, verdict in meta["verdicts"].items():
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
    monkeypatch.setenv("CONVERGENCE_CACHE", str(planted_run_path))
    status = report.main(["--preset", "demo", "--out", str(tmp_path), "--scores", "mean", *FAST])
    printed = capsys.readouterr().out
    assert status == 0
    assert "random mean [95% interval]" in printed and "holds for" in printed
    assert not (tmp_path / "dispersion_sets_pc1.csv").exists()


def test_bad_input_gives_a_clear_error(planted_run_path, tmp_path, monkeypatch, capsys):
    run = str(planted_run_path / "runs" / "demo")
    assert report.main([run, "--out", str(tmp_path), "--size", "60", "--n-random", "2"]) == 2
    assert "larger than half" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "empty-cache"))
    assert report.main(["--preset", "demo", "--out", str(tmp_path)]) == 2
    assert "precompute --preset demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([run, "--preset", "demo", "--out", str(tmp_path)])


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
    paired = entry["paired_test_recall_at_1"]
    assert [row["direction"] for row in paired] == ["vision_to_language", "language_to_vision"]
    assert all(row["both"] + row["universal_only"] + row["ridge_only"] + row["neither"] == 80
               for row in paired)
    residuals = pd.read_csv(out / "universal_residuals.csv")
    assert len(residuals) == 80 * 5 and set(residuals.metric) == {"residual"}
