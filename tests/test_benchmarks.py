"""The benchmark scripts run (smoke test on small problems): a benchmark that cannot run measures
nothing. Timings are not asserted here; they are read from the printed table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def _run_benchmark(script: str, out: str, *options: str, timeout: int = 300) -> tuple[dict, str]:
    """Run ``benchmarks/<script>`` with ``options`` and ``--out out``; return the JSON it wrote
    (then deleted from benchmarks/results) and its stdout."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *options, "--out", out],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = REPO / "benchmarks" / "results" / out
    payload = json.loads(path.read_text())
    path.unlink()
    return payload, done.stdout


def test_numerics_benchmark_runs_and_writes_json() -> None:
    out = "numerics-smoke-test.json"
    payload, stdout = _run_benchmark("bench_numerics.py", out, "--quick")
    assert payload["quick"] is True
    gpa = payload["gpa"]
    # both GPA loops stop near the same optimum (at tol 1e-10 the residuals are pinned to ~1e-8)
    assert gpa["max_abs_residual_difference"] < 1e-7
    for name in ("plain", "fast"):
        assert -1e-13 <= gpa[f"{name}_loss_above_optimum"] < 1e-10
        assert gpa[f"{name}_max_abs_residual_from_optimum"] < 1e-7
    assert "speed-up" in stdout


def test_neighbours_benchmark_runs_and_agrees_with_the_dense_reference() -> None:
    out = "neighbours-smoke-test.json"
    payload, _ = _run_benchmark("bench_neighbours.py", out, "--quick")
    assert {row["n"] for row in payload["rows"]} == {256, 512}
    assert all(row["abs_difference"] < 1e-9 for row in payload["rows"])


def test_matching_benchmark_runs_and_draws_the_reference_sets() -> None:
    payload, stdout = _run_benchmark(
        "bench_matching.py", "matching-smoke-test.json", "--sizes", "400", "--sets", "4"
    )
    (row,) = payload["rows"]
    assert row["n"] == 400 and row["s"] == 100 and row["identical"] is True
    assert "same sets" in stdout


def test_universal_benchmark_runs_and_writes_json() -> None:
    out = "universal-smoke-test.json"
    payload, _ = _run_benchmark("bench_universal.py", out, "--quick", timeout=600)
    assert payload["quick"] is True
    assert [row["n_test"] for row in payload["ranks"]] == [500, 2000]
    for row in payload["ranks"]:
        assert row["identical_to_dense"]
    assert payload["fit"]["gpa_iterations"] >= 1
    many = payload["many_models"]  # GPA on the rows: chosen, and the cross-product fit's result
    assert many["rows_chosen"] and many["models"] == 8
    assert many["gpa_iterations"] == many["cross_gpa_iterations"]
    assert many["max_residual_difference"] < 1e-10


def _gpa_scale_quick(out: str, *options: str) -> tuple[dict, str]:
    """``bench_gpa_scale.py --quick`` with ``options``: its rows by (n, method), and its stdout."""
    payload, stdout = _run_benchmark("bench_gpa_scale.py", out, "--quick", *options, timeout=600)
    return {(row["n"], row["method"]): row for row in payload["rows"]}, stdout


def test_gpa_scale_benchmark_runs_and_writes_json() -> None:
    rows, stdout = _gpa_scale_quick("gpa-scale-smoke-test.json")
    methods = ("old", "new", "reference", "tight", "stability")
    assert set(rows) == {(n, m) for n in (400, 800) for m in methods}
    for n in (400, 800):
        # the new scheme ends at the lowest loss found (to 1e-12) and ranks stimuli as the reference
        assert abs(rows[(n, "new")]["loss_minus_lowest"]) < 1e-12
        assert rows[(n, "new")]["spearman_vs_reference"] > 0.9999
        assert rows[(n, "new")]["peak_rss_mb"] > 0
    assert "final loss" in stdout


def test_gpa_scale_benchmark_compares_the_run_steps_with_and_without_reuse() -> None:
    """``steps``: GPA keeping its fit, the stability diagnostic starting from it; ``steps_before``:
    the diagnostic solving GPA again. Same GPA, same dispersion spreads; both timed.
    ``uncertainty``: the two in one, stopped at the residuals' uncertainty, measured against the
    optimum (``new``)."""
    methods = ("new", "steps", "steps_before", "uncertainty")
    rows, stdout = _gpa_scale_quick(
        "gpa-steps-smoke-test.json", "--methods", ",".join(methods), "--stability-starts", "2"
    )
    assert set(rows) == {(n, m) for n in (400, 800) for m in methods}
    for n in (400, 800):
        now, before = rows[(n, "steps")], rows[(n, "steps_before")]
        assert now["loss"] == before["loss"] and now["iterations"] == before["iterations"]
        assert now["spread_difference"] == 0.0
        assert now["stability_s"] > 0 and before["stability_s"] > 0
        early = rows[(n, "uncertainty")]
        assert early["loss"] >= rows[(n, "new")]["loss"] - 1e-12  # not below the optimum
        assert early["stop"]["step_over_spread"] <= 0.1 or not early["stop"]["met"]
        assert 0 < early["max_abs_residual_minus_optimum"] and early["spearman_vs_optimum"] > 0.9
    assert "when the stability step solved GPA again" in stdout
    assert "stopped at the residuals' uncertainty" in stdout and "× the largest spread" in stdout


def test_dashboard_round_ratios_and_their_verdict() -> None:
    """Each round's page time over the same round's bare page; the verdict reads the interval
    of the median ratio (with 2 or 3 rounds, the lowest to the highest round): within the
    target, above it, or straddling it."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dashboard import round_ratios

    summary = round_ratios([1.2, 1.6, 3.0], [1.0, 1.0, 2.0], 1.5)
    assert summary["per_round"] == [1.2, 1.6, 1.5]
    assert summary["median"] == 1.5 and summary["lowest"] == 1.2 and summary["highest"] == 1.6
    assert summary["verdict"] == "within noise"
    assert round_ratios([1.0, 1.4], [1.0, 1.0], 1.5)["verdict"] == "met"
    assert round_ratios([2.0, 1.6], [1.0, 1.0], 1.5)["verdict"] == "not met"
    with pytest.raises(ValueError, match="one bare-page visit per page visit"):
        round_ratios([1.0], [1.0, 1.0], 1.5)


def test_dashboard_verdict_reads_the_interval_of_the_median_not_the_worst_round() -> None:
    """One slow round among nine does not make a page miss its target: the verdict follows the
    95 % interval of the median ratio (here every other round is 1.2×); an interval that
    straddles the target leaves it to the noise."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dashboard import round_ratios

    one_slow = round_ratios([1.2] * 8 + [1.9], [1.0] * 9, 1.5)
    assert one_slow["highest"] == 1.9 and one_slow["median_interval"] == [1.2, 1.2]
    assert one_slow["verdict"] == "met"
    straddling = round_ratios([1.2, 1.3, 1.4, 1.45, 1.5, 1.55, 1.6, 1.7, 1.8], [1.0] * 9, 1.5)
    assert straddling["median_interval"] == [1.3, 1.7]
    assert straddling["verdict"] == "within noise"
    assert round_ratios([1.6] * 3 + [1.4], [1.0] * 4, 1.5)["verdict"] == "within noise"


def test_median_interval_is_the_widest_pair_of_order_statistics_at_95_percent() -> None:
    """The interval is the k-th lowest and k-th highest value, k the largest whose coverage
    (counted here from binomial coefficients) is still at least 95 %; unsorted input; below six
    values the lowest and highest, whose coverage is below 95 %."""
    import math

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dashboard import median_interval

    def coverage(k: int, n: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    rng = np.random.default_rng(3)
    for n in (6, 7, 9, 11, 13, 20, 31):
        values = rng.permutation(np.arange(1.0, n + 1))
        interval = median_interval(values)
        k = int(interval["low"])  # the values are 1..n: the k-th lowest is k
        assert interval["high"] == n + 1 - k
        assert interval["coverage"] == pytest.approx(coverage(k, n))
        assert coverage(k, n) >= 0.95 and (2 * (k + 1) > n + 1 or coverage(k + 1, n) < 0.95)
    small = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (small["low"], small["high"]) == (1.0, 5.0)
    assert small["coverage"] == pytest.approx(1 - 2 / 32)
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])
    with pytest.raises(ValueError, match="level must be a fraction"):
        median_interval([1.0, 2.0], level=95)


def test_paired_difference_counts_rounds_and_tests_their_signs() -> None:
    """This checkout minus the one beside, round by round: a checkout 0.1 s slower in every one
    of 9 rounds is slower 9 times with the sign test's p = 2 / 2⁹; tied rounds count for
    neither side; rounds of unequal count are refused."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dashboard import paired_difference

    beside = [0.5, 0.6, 0.55, 0.7, 0.52, 0.58, 0.61, 0.49, 0.66]
    slower = paired_difference([b + 0.1 for b in beside], beside)
    assert slower["median_s"] == pytest.approx(0.1)
    assert slower["interval_s"] == pytest.approx([0.1, 0.1])
    assert (slower["faster_rounds"], slower["slower_rounds"], slower["rounds"]) == (0, 9, 9)
    assert slower["sign_test_p"] == pytest.approx(2 / 2**9)
    mixed = paired_difference([0.4, 0.6, 0.5, 0.5], [0.5, 0.5, 0.5, 0.4])
    assert (mixed["faster_rounds"], mixed["slower_rounds"]) == (1, 2)
    assert mixed["sign_test_p"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one visit beside per visit"):
        paired_difference([0.5], [0.5, 0.6])


def test_dashboard_rounds_visit_each_page_then_its_twin_beside() -> None:
    """--beside: every round visits the bare page, then each page of this checkout followed by
    the same page of the other checkout, with the run in the query; without it, this one's only."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dashboard import BESIDE, PAGES, visits_of_a_round

    alone = visits_of_a_round("http://b", "http://new", "?run=demo")
    assert alone[0] == ("bare Streamlit page", "http://b/")
    assert alone[1:] == [(label, f"http://new/{path}?run=demo") for label, path in PAGES]
    both = visits_of_a_round("http://b", "http://new", "?run=demo", "http://old")
    assert both[0] == alone[0] and both[1::2] == alone[1:]
    assert both[2::2] == [
        (label + BESIDE, f"http://old/{path}?run=demo") for label, path in PAGES
    ]
    assert len({label for label, _ in both}) == len(both)  # every row keeps its own label
    # --pages: the bare page and only the chosen pages, in the list's order
    chosen = visits_of_a_round("http://b", "http://new", "?run=demo", "http://old",
                               [PAGES[2][0], PAGES[0][0]])
    assert [label for label, _ in chosen] == [
        "bare Streamlit page", PAGES[0][0], PAGES[0][0] + BESIDE, PAGES[2][0], PAGES[2][0] + BESIDE
    ]
    # every other round the checkout beside goes first in each pair (no order effect favours
    # either); without a checkout beside the order is the same
    swapped = visits_of_a_round("http://b", "http://new", "?run=demo", "http://old",
                                beside_first=True)
    assert swapped[0] == both[0] and swapped[1::2] == both[2::2] and swapped[2::2] == both[1::2]
    assert visits_of_a_round("http://b", "http://new", "?run=demo", beside_first=True) == alone


def test_element_costs_app_has_one_working_page_per_kind(tmp_path) -> None:
    """--element-costs serves one page per kind of element; each page runs without an exception
    and shows its element (checked in an AppTest, page by page)."""
    import shutil

    from streamlit.testing.v1 import AppTest

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dashboard import ELEMENT_KINDS, _element_app

    source = _element_app(REPO)
    shutil.copy(REPO / "docs" / "dashboard.png", tmp_path / "picture.png")
    names = list(ELEMENT_KINDS)
    assert names[0] == "frame" and source.count("st.Page(") == len(names)
    for i, name in enumerate(names):
        script = tmp_path / f"kind{i}.py"
        script.write_text(_element_app(REPO, only=i))
        at = AppTest.from_file(str(script)).run(timeout=60)
        assert not at.exception, (name, at.exception)
        assert at.title[0].value == "A page", name
        # the frame is the title and the line; every other kind adds its element after them
        assert len(at.main.children) == 2 if i == 0 else len(at.main.children) > 2, name
    assert len(at.get("plotly_chart")) == 1  # the last kind's element is its chart


def test_blind_matching_spread_runs_the_reports_section(tmp_path, capsys) -> None:
    """The spread measurement reruns the report's blind-matching section (its pairs, sets and
    settings): on the stored features it gives the report's own accuracies."""
    from convergence_core import analyses, report
    from tests.fixtures_runs import make_synthetic_run

    from benchmarks import measure_blind_matching_spread as spread

    run = make_synthetic_run(tmp_path / "runs", 48, name="r", images=False, thumbnails=False)
    out = tmp_path / "blind-matching-spread-smoke-test.json"  # in this process: no re-import
    assert spread.main(["--run", str(run.path), "--quick", "--out", str(out)]) == 0
    path = out
    payload = json.loads(path.read_text())
    path.unlink()
    assert payload["n_perturbations"] == 1 and len(payload["perturbed_percent"]) == 1
    size = report.default_set_size(run.n_stimuli, 10)
    options = report.AnalysisOptions()
    _, entry = report.blind_matching_section(
        run, tmp_path, analyses.pairs_with_best_layers(run, k=10),
        report.dispersion_sets(run, "mean", size, 200, 0),
        repeats=options.blind_matching_repeats, n_random=options.blind_matching_random,
        n_seeds=options.blind_matching_seeds, seed=0,
    )
    low = [row["accuracy_mean"] for row in entry["summary"] if row["set"] == "low"]
    assert payload["stored_percent"]["low"] == pytest.approx(100 * sum(low) / len(low))
    for name, (lowest, highest) in payload["range_percent"].items():
        assert 0 <= lowest <= highest <= 100, name
    assert "range over 1 perturbations" in capsys.readouterr().out


def test_feature_sets_benchmark_runs_and_both_routes_agree() -> None:
    out = "feature-sets-smoke-test.json"
    payload, stdout = _run_benchmark(
        "bench_feature_sets.py", out, "--n", "300", "--size", "120", "--sets", "1"
    )
    assert payload["ok"] and payload["largest_abs_difference"] <= 1e-10
    assert [row["route"] for row in payload["routes"]] == ["ours", "per_pair"]
    assert "speed-up" in stdout


def test_gpa_threads_benchmark_runs_and_every_way_reaches_the_same_loss() -> None:
    out = "gpa-threads-smoke-test.json"
    payload, _ = _run_benchmark("bench_gpa_threads.py", out, "--quick", "--busy", "1")
    assert [row["machine"] for row in payload["rows"]] == ["idle", "busy"]
    for row in payload["rows"]:
        assert row["loss_spread"] <= 1e-12
        assert row["library_iterations"] == row["one_iterations"] == row["rule_iterations"]
    assert payload["one_thread_width"] == 512


def test_gpa_curvature_measure_checks_its_hessian_against_the_loss() -> None:
    out = "gpa-curvature-smoke-test.json"
    payload, _ = _run_benchmark("measure_gpa_curvature.py", out, "--quick")
    assert [row["width"] for row in payload["rows"]] == [8, 12]
    for row in payload["rows"]:
        # the Hessian formula agrees with second differences of the loss computed directly
        assert row["hessian_check_rel_error"] < 1e-5
        # at GPA's optimum the Hessian is positive definite (a minimum, the frame fixed)
        assert row["eig_min"] > 0
        assert row["kappa_block"] <= row["kappa"]
        assert row["plain_iterations"] >= row["accelerated_iterations"]


def test_clip_pooling_measure_compares_the_two_clippings_on_a_run(tmp_path) -> None:
    """Per model, the threshold is one clip_threshold over the layers side by side; per layer,
    each layer's own, as stored in the run; a metric compared with itself changes by nothing."""
    from tests.fixtures_runs import make_synthetic_run

    from benchmarks import measure_clip_pooling as clip
    from convergence_core.neighbours import clip_threshold

    run = make_synthetic_run(tmp_path / "runs", 40, name="r", images=False, thumbnails=False)
    out = tmp_path / "clip-pooling-smoke-test.json"
    assert clip.main(["--run", str(run.path), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    model = run.language_models[0]
    layers = [np.asarray(run.embeddings[model][name], dtype=np.float64)
              for name in run.layers(model)]
    assert payload["thresholds"][model]["model"] == clip_threshold(np.hstack(layers))
    assert payload["thresholds"][model]["per_layer"] == {
        name: run.manifest.models[model].clip_thresholds[name] for name in run.layers(model)
    }
    pairs = len(run.gpa.models) * sum(len(run.layers(m)) for m in run.language_models)
    assert len(payload["rows"]) == 3 * pairs
    assert set(payload["summary"]) == {"mutual_knn", "cknna", "cka"}


def test_shuffles_and_strata_benchmark_runs_and_draws_what_the_old_code_drew() -> None:
    payload, _ = _run_benchmark(
        "bench_shuffles_and_strata.py", "shuffles-smoke-test.json",
        "--sizes", "2000", "--sets", "2", "--permutations", "100",
    )
    assert payload["strata"] and payload["shuffles"]
    assert all(row["identical"] for row in payload["strata"] + payload["shuffles"])


def test_set_tables_benchmark_runs_and_keeps_the_tables() -> None:
    payload, _ = _run_benchmark(
        "bench_set_tables.py", "set-tables-smoke-test.json",
        "--n", "4000", "--width", "16", "--list-size", "32", "--sizes", "2100",
    )
    (row,) = payload["rows"]
    assert row["s"] == 2100 and len(row["steps"]) == len(payload["k_steps"])
    # a k already seen again computes no row (the kept rows are sliced)
    assert row["steps"][4]["k"] == 10 and row["steps"][4]["new_rows_completed"] == 0


def test_two_afc_benchmark_runs_and_the_sampled_score_is_near_all_pairs() -> None:
    payload, _ = _run_benchmark(
        "bench_two_afc.py", "two-afc-smoke-test.json", "--sizes", "1500", "--seeds", "3",
    )
    (row,) = payload["rows"]
    assert row["s"] == 1500 and row["largest_error"] < 4 * row["bound"]
