"""`report` on a run with a property table: the property tables, the figure and the summary
agree with dispersion_predictors; a run without one gets a note."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from convergence_core import dispersion_predictors as dp
from convergence_core import report
from tests.fixtures_runs import add_properties, make_synthetic_run

FAST = [
    "--n-random", "10", "--n-permutations", "20", "--k", "5", "--size", "15",
    "--property-permutations", "3000", "--property-shuffles", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("report_properties")
    run = make_synthetic_run(root / "runs", 60, name="demo", thumbnails=False)
    noise = np.random.default_rng(2).standard_normal(run.n_stimuli)
    run = add_properties(run, extra={"null_number": noise})
    out = root / "out"
    status = report.main([str(run.path), "--out", str(out), *FAST])
    return status, out, run


def test_report_writes_the_property_tables_and_figure(written) -> None:
    status, out, run = written
    assert status == 0
    for stem in (
        "property_tests",
        "property_groups",
        "property_model_fit",
        "property_importances",
        "property_predictions",
        "property_skipped",
    ):
        assert (out / f"{stem}.csv").is_file() and (out / f"{stem}.json").is_file()
    for score in ("mean", "pc1"):
        png = out / f"what_predicts_dispersion_{score}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tests = pd.read_csv(out / "property_tests.csv")
    expected = dp.property_tests(run.properties, run.dispersion, n_permutations=3000, seed=0)
    np.testing.assert_allclose(tests["effect"], expected["effect"])
    np.testing.assert_allclose(tests["q_value"], expected["q_value"])
    assert tests[tests["rank"] == 1]["property"].tolist() == ["planted_noise", "planted_noise"]


def test_report_json_and_text_summarise_the_top_properties(written) -> None:
    _, out, _ = written
    meta = json.loads((out / "report.json").read_text())
    assert meta["parameters"]["property_permutations"] == 3000
    summary = meta["properties"]["mean"]
    assert summary["top_properties"][0]["property"] == "planted_noise"
    assert summary["top_properties"][0]["q_value"] < 0.01
    fit = pd.read_csv(out / "property_model_fit.csv")
    ridge = fit[(fit.score == "mean") & (fit.model == "ridge")].set_index("metric")["value"]
    assert summary["models"]["ridge"]["r2_held_out"] == pytest.approx(ridge["r2_held_out"])
    assert summary["models"]["ridge"]["r2_held_out"] > 0.3
    text = (out / "summary.txt").read_text()
    assert "What predicts dispersion (mean):" in text
    assert "planted_noise: rho = +" in text
    assert f"held-out R2 = {ridge['r2_held_out']:.3f}" in text
    assert set(meta["files"]) <= {p.name for p in out.iterdir()}


def test_a_run_without_properties_gets_a_note(tmp_path, capsys) -> None:
    run = make_synthetic_run(tmp_path / "runs", 40, name="plain", images=False, thumbnails=False)
    # as a run made before the properties step existed
    run.layout.properties.unlink()
    run.layout.properties_info.unlink()
    status = report.main([str(run.path), "--out", str(tmp_path / "out"), *FAST, "--size", "10"])
    assert status == 0
    assert "stimulus properties skipped" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "report.json").read_text())
    assert meta["properties"] is None
