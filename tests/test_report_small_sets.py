"""The report on sets too small for a CKNNA worth reading (``validation.MIN_CKNNA_SET_SIZE``).

README: on small sets CKNNA's unbiased estimates can exceed 1, and "the lab and the report say
so where it happens, and show no CKNNA number for sets of fewer than 24 stimuli". The Alignment
lab did; the report (review of the 24-stimulus rule) showed "—" in its table without a sentence
saying why, drew every Fig. 2 bar (an interval reaching 1.015 on the demo run at 20 stimuli) and
counted orderings of the hidden numbers in its verdicts ("holds for 3 of 6 … low > high for 5 of
6"), in the printed text, summary.txt and report.json alike, and so did the metric-suite and the
matched-baseline sentences. Planted runs of ``tests/fixtures_runs.py`` (as tests/test_report.py's),
each report at a set size under the rule and, as the control, at the rule's size itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from convergence_core import figures, report
from convergence_core.validation import MIN_CKNNA_SET_SIZE
from tests.fixtures_runs import make_synthetic_run

SMALL = MIN_CKNNA_SET_SIZE - 4  # 20: the reviewer's size
SIZES = (SMALL, MIN_CKNNA_SET_SIZE)

#: a quick report: CKNNA and CKA on the Fig. 2 sets, the calibration section (its matched
#: baselines count CKNNA) and nothing slower
QUICK = [
    "--n-random", "20", "--n-permutations", "40", "--k", "5", "--scores", "mean", "pc1",
    "--metrics", "cknna", "cka", "--metric-permutations", "10", "--n-shuffles", "20",
    "--skip", "universal_space", "per_stimulus", "predictivity", "many_to_many",
    "blind_matching", "gpa_stability",
]
CKNNA_COLUMNS = [
    "cknna_low_dispersion", "cknna_random_mean", "cknna_random_lower_95",
    "cknna_random_upper_95", "cknna_high_dispersion",
]


class Drawn:
    """What one figure function was given and drew (:func:`_spy`)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def saved(self, figure) -> None:  # noqa: ANN001
        """Called by figures._save with the finished figure, before it is closed."""
        self.calls[-1]["bars"] = sum(len(axis.containers) for axis in figure.axes)
        self.calls[-1]["patches"] = sum(
            1 for axis in figure.axes for patch in axis.patches
            if np.isfinite(patch.get_height()) and patch.get_height() != 0
        )
        texts = [text.get_text() for axis in figure.axes for text in axis.texts]
        if figure._suptitle is not None:
            texts.append(figure._suptitle.get_text())
        self.calls[-1]["texts"] = " ".join(" ".join(texts).split())  # lines wrapped: joined


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> Drawn:
    """Record the tables given to ``figures.<name>`` and what it draws (bars, texts), then draw
    as it would."""
    drawn = Drawn()
    draw, save = getattr(figures, name), figures._save

    def spied(table, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        drawn.calls.append({"table": table.copy(), "path": str(path), "kwargs": dict(kwargs)})
        return draw(table, path, *args, **kwargs)

    def saving(figure, path):  # noqa: ANN001, ANN202
        if drawn.calls and drawn.calls[-1]["path"] == str(path):
            drawn.saved(figure)
        return save(figure, path)

    monkeypatch.setattr(figures, name, spied)
    monkeypatch.setattr(figures, "_save", saving)
    return drawn


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """The CLI's report of a planted 80-stimulus run at each of :data:`SIZES`: its printed text,
    summary.txt, report.json and what Fig. 2 was given and drew."""
    root = tmp_path_factory.mktemp("small_sets")
    make_synthetic_run(
        root / "runs", 80, plant="quiet_half", name="demo", images=False, thumbnails=False
    )
    found = {}
    for size in SIZES:
        out = root / f"out{size}"
        with pytest.MonkeyPatch.context() as monkeypatch:
            drawn = _spy(monkeypatch, "dispersion_sets_figure")
            with contextlib.redirect_stdout(io.StringIO()) as printed, \
                    contextlib.redirect_stderr(io.StringIO()):
                status = report.main(
                    [str(root / "runs" / "demo"), "--out", str(out), "--size", str(size), *QUICK]
                )
        assert status == 0
        found[size] = {
            "printed": printed.getvalue(),
            "summary": (out / "summary.txt").read_text(encoding="utf-8"),
            "meta": json.loads((out / "report.json").read_text(encoding="utf-8")),
            "fig2": drawn.calls,
            "out": out,
        }
    return found


def test_the_text_says_why_the_cknna_numbers_are_missing(reports):
    """Under the summary table of "—" and "n/a": one sentence naming the rule (fewer than
    MIN_CKNNA_SET_SIZE stimuli) and the fix (a larger --size), in summary.txt, printed once, and
    in report.json's notes; none on sets of the rule's size, whose table shows the numbers."""
    small = reports[SMALL]
    table = pd.read_csv(small["out"] / "summary.csv")
    lines = small["summary"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("score "))
    table_end = header + len(table)  # its last row
    assert lines[table_end].split()[0] == "pc1" and " — " in lines[table_end]
    under = lines[table_end + 1]
    assert f"sets of {SMALL} stimuli" in under
    assert f"fewer than {MIN_CKNNA_SET_SIZE} stimuli" in under
    assert f"--size {MIN_CKNNA_SET_SIZE} or more" in under
    assert lines[table_end + 2] == ""  # one sentence, then the verdicts
    assert small["printed"].count(under) == 1  # from summary.txt, not again as a "note:"
    assert under in small["meta"]["notes"]
    # the rows of the table itself: no CKNNA number
    for value in table["cknna_low_dispersion"]:
        assert f"{value:.4f}" not in small["summary"]

    shown = reports[MIN_CKNNA_SET_SIZE]
    assert f"fewer than {MIN_CKNNA_SET_SIZE} stimuli" not in shown["summary"]
    table = pd.read_csv(shown["out"] / "summary.csv")
    assert f"{table['cknna_low_dispersion'].iloc[0]:.4f}" in shown["summary"]


def _cknna_counts(text: str) -> list[str]:
    """Every count drawn from CKNNA numbers that a text states: Fig. 2's orderings, the metric
    suite's CKNNA counts and the matched baselines' CKNNA survivals."""
    patterns = (
        r"holds for \d+ of \d+",
        r"low > high for \d+ of \d+",
        r"cknna \d+",
        r"survives for \d+ of \d+ pairs by CKNNA",
    )
    return [hit for pattern in patterns for hit in re.findall(pattern, text)]


def test_no_verdict_or_count_comes_from_hidden_cknna_numbers(reports):
    """On sets under the rule every verdict says "no verdict" for CKNNA, naming the size, and
    states no count of CKNNA orderings: report.json → verdicts, summary.txt and the printed text
    alike. The other metrics keep their counts (CKA: the metric suite and the matched baselines,
    CKNNA left out of the latter's pair × metric count), and sets of the rule's size keep every
    count."""
    small = reports[SMALL]
    verdicts = small["meta"]["verdicts"]
    for key in ("mean", "pc1", "metric_suite", "matched_baselines"):
        assert "no verdict" in verdicts[key], (key, verdicts[key])
        assert f"sets of {SMALL} < {MIN_CKNNA_SET_SIZE} stimuli" in verdicts[key], verdicts[key]
    for key in ("mean", "pc1"):
        assert not _cknna_counts(verdicts[key]), verdicts[key]
    for text in (json.dumps(verdicts, ensure_ascii=False), small["summary"], small["printed"]):
        assert not _cknna_counts(text), _cknna_counts(text)
    assert all(verdict in small["summary"] for verdict in verdicts.values())
    assert re.search(r"holds in cka \d+ of 6 pairs", verdicts["metric_suite"])
    matched = pd.read_csv(small["out"] / "matched_baselines.csv")
    others = matched[matched["metric"] != "cknna"]
    assert (
        f"survives for {int(others['survives'].sum())} of {len(others)} pair × metric "
        "combinations over 1 metrics"
    ) in verdicts["matched_baselines"]

    shown = reports[MIN_CKNNA_SET_SIZE]["meta"]["verdicts"]
    for key in ("mean", "pc1"):
        assert re.search(r"holds for \d+ of 6 .*low > high for \d+ of 6", shown[key]), shown[key]
    assert re.search(r"holds in cknna \d+, cka \d+ of 6", shown["metric_suite"])
    assert re.search(r"survives for \d+ of 6 pairs by CKNNA", shown["matched_baselines"])
    assert not any("no verdict" in verdict for verdict in shown.values())


def test_fig2_is_given_and_draws_no_hidden_bars(reports):
    """Fig. 2 on sets under the rule: the figure function gets no CKNNA number (every CKNNA
    column NaN), draws no bar and no error bar, and says in the figure why and what to do; its
    panels keep their axis label (CKNNA, unitless) and ticks. Sets of the rule's size: the
    bars, from the table's numbers."""
    small = reports[SMALL]["fig2"]
    assert [call["path"].rsplit("/", 1)[1] for call in small] == [
        "fig2_dispersion_sets_mean.png", "fig2_dispersion_sets_pc1.png"
    ]
    for call in small:
        assert call["table"][CKNNA_COLUMNS].isna().all().all()
        assert call["bars"] == 0 and call["patches"] == 0
        assert f"sets of {SMALL} stimuli" in call["texts"]
        assert f"--size {MIN_CKNNA_SET_SIZE}" in call["texts"]
    png = reports[SMALL]["out"] / "fig2_dispersion_sets_mean.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for call in reports[MIN_CKNNA_SET_SIZE]["fig2"]:
        assert call["table"][CKNNA_COLUMNS].notna().all().all()
        # 3 vision panels × (low, random, high and the random sets' error bars)
        assert call["bars"] == 3 * 4
        assert f"fewer than {MIN_CKNNA_SET_SIZE}" not in call["texts"]


def test_the_hidden_fig2_keeps_its_axes():
    """The figure without bars keeps the labels and units of the one with them."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame([
        {"vision_model": "v", "vision_layer": "l", "language_model": m, "language_layer": "x",
         "score": "mean", "set_size": SMALL, "k": 5, **dict.fromkeys(CKNNA_COLUMNS, np.nan)}
        for m in ("a", "b")
    ])
    kept = {}

    def save(figure, path):  # noqa: ANN001, ANN202
        axis = figure.axes[0]
        kept.update(ylabel=axis.get_ylabel(), xlabel=axis.get_xlabel(),
                    ticks=[t.get_text() for t in axis.get_xticklabels()],
                    bars=len(axis.containers))
        plt.close(figure)
        return path

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(figures, "_save", save)
        report.dispersion_sets_figure(table, "unused.png", SMALL)
    assert kept["ylabel"] == "CKNNA (k = 5, unitless)"
    assert kept["xlabel"] == "language model (layer used)"
    assert kept["ticks"] == ["a\n(x)", "b\n(x)"] and kept["bars"] == 0


def test_fig_s1_draws_no_bars_for_its_sets_under_the_rule(tmp_path, monkeypatch):
    """Fig. S1 on a run of 30 stimuli: the full set (30) keeps its bars, the sets left after
    dropping a quarter (22) get none (NaN given, not drawn), and the figure and report.json's
    notes say why and what to do (a smaller --q or more stimuli)."""
    run = make_synthetic_run(tmp_path / "runs", 30, images=False, thumbnails=False)
    drawn = _spy(monkeypatch, "drop_fraction_figure")
    meta = report.write_report(
        run, tmp_path / "out", k=5, scores=["mean"], n_random=5, n_permutations=5,
        property_permutations=10, property_shuffles=1,
        options=report.AnalysisOptions(metrics=("cknna",), metric_permutations=2,
                                       skip=report.OPTIONAL_SECTIONS),
    )
    (call,) = drawn.calls
    table = call["table"]
    dropped = table[table["condition"] != "full"]
    assert (dropped["n_stimuli"] < MIN_CKNNA_SET_SIZE).all()
    assert dropped["cknna"].isna().all()
    assert table.loc[table["condition"] == "full", "cknna"].notna().all()
    assert call["bars"] == 3  # one per vision panel: the full set only
    assert f"fewer than {MIN_CKNNA_SET_SIZE} stimuli" in call["texts"]
    (note,) = [n for n in meta["notes"] if n.startswith("Fig. S1 draws no CKNNA bars")]
    assert "smaller --q" in note and f"fewer than {MIN_CKNNA_SET_SIZE}" in note
    # the table keeps every value
    written = pd.read_csv(tmp_path / "out" / "drop_fraction.csv")
    assert written["cknna"].notna().all()
