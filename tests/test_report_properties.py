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


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_undefined_fit_numbers_are_summarised_as_undefined(tmp_path) -> None:
    """--property-shuffles 0 (every shuffled-target metric NaN) and a constant score (every
    metric NaN): pivot_table dropped the all-NaN columns and the summary raised KeyError."""
    from convergence_core.properties import PropertyInfo, PropertyTable

    rng = np.random.default_rng(0)
    n = 60
    values = pd.DataFrame({"id": [str(i) for i in range(n)], "a": rng.random(n),
                           "b": rng.random(n)})
    table = PropertyTable(values, tuple(PropertyInfo(c, "numeric", "", "", "") for c in "ab"))
    dispersion = pd.DataFrame({"id": values["id"], "mean": np.zeros(n), "pc1": values["a"]})
    analysis = dp.analyse_properties(
        table, dispersion, n_permutations=50, n_shuffles=0, importance_repeats=1,
        models=("ridge",),
    )
    summary = report.property_summary(analysis)
    assert summary["mean"]["models"]["ridge"] == dict.fromkeys(
        ("r2_held_out", "r2_shuffled_mean", "r2_shuffled_upper_95", "p_value_vs_shuffled")
    )
    pc1 = summary["pc1"]["models"]["ridge"]
    assert pc1["r2_held_out"] > 0.5 and pc1["r2_shuffled_mean"] is None  # no shuffles: None
    text = report.format_property_summary(summary)
    assert "ridge: held-out R2 = undefined (shuffled targets: mean undefined" in text
    assert "(shuffled targets: mean undefined, 95th percentile undefined)" in text.split("pc1")[1]
    json.dumps(summary, allow_nan=False)  # report.json takes it
    from convergence_core import figures

    for score in ("mean", "pc1"):  # and the figure, whose legend read the same pivot
        figures.predictors_figure(analysis.tests, analysis.fit, analysis.predictions,
                                  tmp_path / f"{score}.png", score=score)
