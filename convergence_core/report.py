"""`python -m convergence_core report <run> --out report/`: the paper's analyses on one run.

Writes to ``--out``: every analysis table as CSV and JSON (records; NaN as null), the PNG figures
(Fig. 2 per dispersion score, Fig. S1, Fig. S2, the layer-sweep heat map, what predicts
dispersion per score when the run has a property table), ``summary.csv`` /
``summary.json`` / ``summary.txt`` (per score and pair, vision × language and then any vision ×
brain pairs, named in a ``sides`` column: low, random mean [95% interval], high, low/high ratio,
permutation p) and ``report.json`` (parameters, verdicts, file list). Prints the summary
table and one verdict line per dispersion score, computed from the numbers.

On sets too small for a CKNNA worth reading (fewer than ``validation.MIN_CKNNA_SET_SIZE``
stimuli, :func:`cknna_shown`, the Alignment lab's rule) the text shows no CKNNA number and says
why under its table (:func:`cknna_hidden_note`), Fig. 2 (and Fig. S1's sets that small) draws
no bar, and no verdict counts CKNNA orderings; the CSV and JSON tables keep every value.

The universal-space section (:func:`universal_space_section`; every model of the run at its
default layer) adds ``universal_*`` tables and figures: residuals per model and stimulus,
cross-modal dispersion and its relation to vision dispersion, and held-out image-text retrieval
(k-fold) against chance and the ridge baseline, with one printed headline line.

The issue-14 sections (:func:`paper_sections`, one function each, settings in
:class:`AnalysisOptions`) measure every metric of the registry on the Fig. 2 sets
(:func:`metric_suite_section`), per-stimulus alignment against dispersion
(:func:`per_stimulus_section`), linear predictivity (:func:`predictivity_section`), one caption
vs the mean of all captions and class means (:func:`many_to_many_section`; captions embedded once
with ``--embed-captions``), blind matching (:func:`blind_matching_section`), and calibrated scores
with typicality- (and category-) matched baselines (:func:`calibration_section`), and GPA's
stability over random starts (:func:`gpa_stability_section`); each adds its sentence to
summary.txt and report.json → ``verdicts``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from . import (
    analyses,
    calibration,
    dispersion_predictors,
    caption_embeddings,
    figures,
    many_to_many,
    predictivity,
    retrieval,
    stimulus_alignment,
    subset_metrics,
    universal,
)
from . import metrics as registry
from .alignment import cknna_bound_note
from .blind_matching import blind_matching as match_blind
from .blind_matching import check_set_size as check_matching_size
from .blind_matching import image_seeds
from .cache import RunLayout, live_writer, lock_path, read_json, write_bytes, write_json
from .dispersion import SCORES, check_score, two_model_note
from .gpa_stability import describe as describe_stability
from .gpa_stability import gpa_stability
from .metrics import metric_names
from .neighbours import prepare_rows
from .presets import PRESETS, preset_config
from .run import Run, load_run
from .run_checks import check_run_files
from .stats import percentile_interval
from .subset_metrics import cca_dim_limit, row_space_coordinates
from .subsets import select_stimuli
from .analyses import cknna_shown, without_cknna
from .validation import MIN_CKNNA_SET_SIZE, check_count, check_k, model_value_pairs

#: Columns of the summary table, in print order.
SUMMARY_COLUMNS = [
    "score",
    "sides",
    "vision_model",
    "language_model",
    "language_layer",
    "cknna_low_dispersion",
    "cknna_random_mean",
    "cknna_random_lower_95",
    "cknna_random_upper_95",
    "cknna_high_dispersion",
    "low_high_ratio",
    "permutation_p_value_two_sided",
]


def _run_record(run: Run) -> dict[str, Any]:
    """report.json's ``run``: its name, folder, stimuli and data set in words (with the subset a
    ``--stimuli`` run holds: ``coco-mini; 200 of its 239 stimuli: those every feature file
    covers``)."""
    return {"name": run.name, "path": str(run.path), "n_stimuli": run.n_stimuli,
            "dataset": run.manifest.dataset.describe()}


def default_set_size(n_stimuli: int, k: int) -> int:
    """A quarter of the stimuli (the paper used sets of a few hundred of 1,024), at least k + 1.

    Raises:
        ValueError: the low and high sets (at most half the stimuli each) cannot hold k + 1
            stimuli; the message gives the largest k that fits, so that one rerun does.
    """
    size = max(n_stimuli // 4, k + 1)
    if 2 * size > n_stimuli:
        fits = n_stimuli // 2 - 1
        raise ValueError(
            f"a run of {n_stimuli} stimuli is too small for k = {k}: the low- and high-dispersion "
            f"sets hold at most {n_stimuli // 2} stimuli each, and each stimulus needs k others "
            "in its set; "
            + (f"use --k {fits} or less" if fits >= 2 else "these analyses need at least 6")
        )
    return size


#: k of a report that is not given one (--k left out), where its sets allow it: the registry's
DEFAULT_K = registry.DEFAULT_K


def sets_and_k(n_stimuli: int, size: int | None, k: int | None) -> tuple[int, int, str | None]:
    """The set size and k of a report, and the note that says why k is not the one asked for.

    ``k`` given (``--k``): :func:`default_set_size` where ``size`` is None, and k as given (a k too
    large for the sets is refused, naming --k and the largest that fits: here, or in
    ``_check_k_fits`` for a given ``size``). ``k`` None: :data:`DEFAULT_K` and those sets where
    they fit; else k lowered below the sets by the Alignment lab's rule
    (``subset_metrics.k_for_sets``), on the given sets or, where ``size`` is None, the lab's
    default sets (``subset_metrics.default_set_size``: a quarter, at least 4), so that a small
    run's report measures what the lab shows, and a note names the k and why. A run too small
    for the lab's sets (fewer than 8 stimuli) is refused as for a given k.
    """
    if k is not None:
        return (default_set_size(n_stimuli, k) if size is None else size), k, None
    if size is None:
        try:
            return default_set_size(n_stimuli, DEFAULT_K), DEFAULT_K, None
        except ValueError:
            size = subset_metrics.default_set_size(n_stimuli)
            if 2 * size > n_stimuli:  # too few stimuli even for the lab's sets
                raise
        sets = (
            f"this run's {n_stimuli} stimuli make low- and high-dispersion sets of {size} (a "
            f"quarter of the stimuli, at least {subset_metrics.MIN_SET_SIZE}, as the Alignment "
            "lab's)"
        )
    else:
        sets = f"the sets hold {size} stimuli (--size)"
    lowered = subset_metrics.k_for_sets(DEFAULT_K, size)
    if lowered == DEFAULT_K:
        return size, DEFAULT_K, None
    return size, lowered, (
        f"k = {lowered}, not the default {DEFAULT_K}: {sets}, and each stimulus needs k others "
        f"in its set, so k was lowered to the set size less one, as the Alignment lab lowers it; "
        f"--k chooses k (at most {lowered} for these sets)"
    )


def _write_table(frame: pd.DataFrame, out: Path, stem: str) -> list[str]:
    csv_path = write_bytes(out / f"{stem}.csv", frame.to_csv(index=False).encode("utf-8"))
    json_text = frame.to_json(orient="records", indent=2, force_ascii=False)
    json_path = write_bytes(out / f"{stem}.json", (json_text + "\n").encode("utf-8"))
    return [csv_path.name, json_path.name]


def summary_table(set_tables: Sequence[pd.DataFrame], sides: str) -> pd.DataFrame:
    """Summary rows (one per score × pair) from :func:`analyses.dispersion_set_alignment` tables
    of pairs that align ``sides`` (:func:`analyses.pair_sides`: ``vision × language``,
    ``vision × brain``), which fills the ``sides`` column. The partner model of a pair is in the
    ``language_model`` / ``language_layer`` columns whatever its modality, as in those tables."""
    return pd.concat(
        [table.assign(sides=sides)[SUMMARY_COLUMNS] for table in set_tables], ignore_index=True
    )


def cknna_hidden_note(size: int) -> str | None:
    """The one sentence saying why a report on sets of ``size`` stimuli shows no CKNNA number for
    them, naming the rule and the fix (summary.txt under its table, and report.json's notes);
    None where :func:`cknna_shown`."""
    if cknna_shown(size):
        return None
    return (
        f"No CKNNA numbers for sets of {size} stimuli (— and n/a in the table, no Fig. 2 bars, "
        "no CKNNA verdict or count): the report shows none for sets of fewer than "
        f"{MIN_CKNNA_SET_SIZE} stimuli, on which CKNNA's unbiased estimates are too "
        f"noisy to read and often exceed 1; use --size {MIN_CKNNA_SET_SIZE} or more for numbers "
        "(the CSV and JSON tables keep the values)."
    )


#: How the report's text says a CKNNA verdict's cure: the command line's set size
_SIZE_FIX = f"use --size {MIN_CKNNA_SET_SIZE} or more"


def _no_cknna_verdict(size: int) -> str:
    """What a verdict says in place of counts of CKNNA on sets of ``size`` stimuli that
    :func:`cknna_shown` hides (``analyses.withheld_cknna_verdict``)."""
    return analyses.withheld_cknna_verdict(size, _SIZE_FIX)


def fig2_verdict(table: pd.DataFrame, sides: str, size: int) -> str:
    """``analyses.set_effect_verdict`` of a Fig. 2 table on sets of ``size`` stimuli, its cure
    said as the command line's ``--size``."""
    return analyses.set_effect_verdict(table, sides, size, _SIZE_FIX)


def dispersion_sets_figure(
    table: pd.DataFrame, path: Path, size: int, **options: str
) -> Path:
    """Fig. 2 of ``table`` (sets of ``size`` stimuli) at ``path``: its bars, or where
    :func:`cknna_shown` hides their CKNNA, no CKNNA numbers given to the figure and a sentence
    saying why in place of the bars."""
    shown, hidden = analyses.shown_set_table(table, size, f"--size {MIN_CKNNA_SET_SIZE}")
    return figures.dispersion_sets_figure(shown, path, hidden=hidden, **options)


def drop_fraction_figure(
    dropped: pd.DataFrame, path: Path, **options: str
) -> tuple[Path, str | None]:
    """Fig. S1 of ``dropped`` at ``path``, without the bars of the conditions whose sets
    :func:`cknna_shown` hides (on a run of few stimuli), and the note saying which and why (None
    where every bar is drawn). Returns (the figure, that note)."""
    sizes = dropped.groupby("condition", sort=False)["n_stimuli"].first()
    hidden = [str(c) for c, n in sizes.items() if not cknna_shown(int(n))]
    if not hidden:
        return figures.drop_fraction_figure(dropped, path, **options), None
    which = ", ".join(f"{c.replace('_', ' ')}: {int(sizes[c])}" for c in hidden)
    fix = "a run with more stimuli" + (
        "" if "full" in hidden else " or a smaller --q"
    )
    note = (
        f"Fig. S1 draws no CKNNA bars for its sets of fewer than {MIN_CKNNA_SET_SIZE} stimuli "
        f"({which}; too few for a CKNNA worth reading); use {fix} (drop_fraction keeps the "
        "values)"
    )
    masked = dropped.copy()
    masked.loc[masked["condition"].isin(hidden), "cknna"] = float("nan")
    path = figures.drop_fraction_figure(masked, path, hidden=hidden, note=note, **options)
    return path, note


def _cknna_notes(
    size: int, values: Sequence[tuple[str, float, int, int]]
) -> tuple[list[str], str | None]:
    """The notes on the CKNNA numbers of a report whose sets hold ``size`` stimuli, alike on the
    paths with and without language models: why the report shows none (sets below
    :func:`cknna_shown`'s size: :func:`cknna_hidden_note`, which summary.txt carries under its
    table) and ``alignment.cknna_bound_note`` of ``values`` (every CKNNA the report writes:
    ``(what, value, set size, k)``). Returns (the notes, in that order; the bound note alone,
    which summary.txt also carries, or None)."""
    notes = []
    hidden = cknna_hidden_note(size)
    if hidden is not None:
        notes.append(hidden)
    bound = cknna_bound_note(values)
    if bound is not None:
        notes.append(bound)
    return notes, bound


def format_summary(summary: pd.DataFrame, set_size: int | None = None) -> str:
    """Fixed-width text of the summary: low, random mean [95% interval], high, ratio, p; one
    table per value of ``sides`` (vision × language first, as in :func:`summary_table`), each
    headed by it when there is more than one, its model columns named for the two sides ("vision",
    "language (layer)"; "brain", "vision (layer)").

    With ``set_size`` below ``validation.MIN_CKNNA_SET_SIZE`` the CKNNA columns show "—" (too
    few stimuli for a CKNNA worth reading; the CSV/JSON tables keep the values).
    """
    groups = list(dict.fromkeys(summary["sides"]))
    if len(groups) > 1:
        return "\n\n".join(
            f"{sides}:\n" + format_summary(summary[summary["sides"] == sides], set_size)
            for sides in groups
        )
    side, partner = groups[0].split(" × ") if groups else ("vision", "language")
    if set_size is not None and not cknna_shown(set_size):
        summary = without_cknna(summary)
    dash = "—"

    def number(value: float, spec: str = "{:.4f}") -> str:
        return dash if pd.isna(value) else spec.format(value)

    shown = pd.DataFrame(
        {
            "score": summary["score"],
            side: summary["vision_model"],
            f"{partner} (layer)": [
                f"{m} ({layer})"
                for m, layer in zip(
                    summary["language_model"], summary["language_layer"], strict=True
                )
            ],
            "low": summary["cknna_low_dispersion"].map(number),
            "random mean [95% interval]": [
                dash if pd.isna(m) else f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
                for m, lo, hi in zip(
                    summary["cknna_random_mean"],
                    summary["cknna_random_lower_95"],
                    summary["cknna_random_upper_95"],
                    strict=True,
                )
            ],
            "high": summary["cknna_high_dispersion"].map(number),
            "low/high": summary["low_high_ratio"].map(
                lambda v: "n/a" if pd.isna(v) else f"{v:.2f}"
            ),
            "p (perm.)": summary["permutation_p_value_two_sided"].map("{:.4f}".format),
        }
    )
    return shown.to_string(index=False)


def _table_text(summary: pd.DataFrame, size: int) -> str:
    """summary.txt's table (:func:`format_summary`) and, where its sets are too small for CKNNA
    numbers (:func:`cknna_shown`), the sentence under it that says why it shows none
    (:func:`cknna_hidden_note`), then the blank line before the verdicts."""
    hidden = cknna_hidden_note(size)
    return format_summary(summary, size) + "\n" + ("" if hidden is None else f"{hidden}\n") + "\n"


def check_out_folder(out: str | os.PathLike[str]) -> Path:
    """``out`` as a Path if it is, or can become, a folder; ValueError naming the fix otherwise.

    An existing file (or a file where a parent folder should be) is never overwritten.
    """
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            where = "is" if folder == out else f"lies under {folder}, which is"
            raise ValueError(
                f"--out {out} {where} an existing file, not a folder; pass a folder for the "
                "report (a new one, or an existing folder whose report files may be replaced)"
            )
        if folder.exists():
            break
    return out


def _cknna_values(
    set_tables: Sequence[pd.DataFrame], dropped: pd.DataFrame, sweep: pd.DataFrame | None = None,
    n: int = 0,
) -> list[tuple[str, float, int, int]]:
    """``(what, CKNNA, set size, k)`` of every CKNNA the report writes (for the bound note): the
    sets, Fig. S1's and the layer sweep's (``sweep``, on all ``n`` stimuli; none without)."""
    rows: list[tuple[str, float, int, int]] = []
    for table in set_tables:
        for r in table.to_dict("records"):
            pair = f"{r['vision_model']} × {r['language_model']} ({r['score']})"
            for column in (
                "cknna_low_dispersion",
                "cknna_high_dispersion",
                "cknna_random_mean",
                "cknna_random_lower_95",
                "cknna_random_upper_95",
            ):
                what = f"{column.removeprefix('cknna_').replace('_', ' ')}, {pair}"
                rows.append((what, r[column], int(r["set_size"]), int(r["k"])))
    for r in dropped.to_dict("records"):
        what = f"{r['condition']}, {r['vision_model']} × {r['language_model']}"
        rows.append((what, r["cknna"], int(r["n_stimuli"]), int(r["k"])))
    for r in [] if sweep is None else sweep.to_dict("records"):
        what = f"full set, {r['vision_model']} × {r['language_model']} {r['language_layer']}"
        rows.append((what, r["cknna"], n, int(r["k"])))
    return rows
def property_summary(analysis: Any, top: int = 5) -> dict[str, Any]:
    """Per score: the ``top`` ranked properties (property, test, effect_name, effect, q_value,
    p_value, n_stimuli) and, per model, the held-out R² with its shuffled-target baseline (None
    where undefined: no shuffles, a constant score)."""
    summary: dict[str, Any] = {}
    for score in analysis.parameters["scores"]:
        tests = analysis.tests[analysis.tests["score"] == score].sort_values("rank").head(top)
        fit = analysis.fit[analysis.fit["score"] == score]
        wide = fit.pivot_table(  # dropna=False: an all-NaN metric keeps its column
            index="model", columns="metric", values="value", sort=False, dropna=False
        )
        summary[score] = {
            "top_properties": [
                {key: _json_value(value) for key, value in row.items()}  # NaN p: null
                for row in tests[
                    ["property", "test", "effect_name", "effect", "q_value", "p_value", "n_stimuli"]
                ].to_dict("records")
            ],
            "models": {
                str(model): {
                    name: _json_value(float(row[name]))
                    for name in ("r2_held_out", "r2_shuffled_mean", "r2_shuffled_upper_95",
                                 "p_value_vs_shuffled")
                }
                for model, row in wide.iterrows()
            },
        }
    return summary


def format_property_summary(summary: dict[str, Any]) -> str:
    """Text of :func:`property_summary`: per score the top properties and the models' fit."""
    def number(value: float | None, spec: str) -> str:  # None: undefined (a constant score)
        return "undefined" if value is None else format(value, spec)

    lines = []
    for score, part in summary.items():
        lines.append(f"\nWhat predicts dispersion ({score}):")
        for row in part["top_properties"]:
            symbol = "rho" if row["effect_name"] == "spearman_rho" else "eps2"
            lines.append(
                f"  {row['property']}: {symbol} = {number(row['effect'], '+.3f')}, "
                f"q = {number(row['q_value'], '.2g')} (n = {row['n_stimuli']})"
            )
        for model, fit in part["models"].items():
            lines.append(
                f"  {model}: held-out R2 = {number(fit['r2_held_out'], '.3f')} (shuffled "
                f"targets: mean {number(fit['r2_shuffled_mean'], '.3f')}, 95th percentile "
                f"{number(fit['r2_shuffled_upper_95'], '.3f')})"
            )
    return "\n".join(lines) + "\n" if lines else ""


def _gpa_notes(run: Run) -> tuple[str | None, str | None]:
    """The notes on how the run's GPA was set up: two GPA models (``two_model_note``) and GPA at
    the first of several given layers (``Run.first_layer_note``); None where they do not apply."""
    return two_model_note(len(run.gpa.models)), run.first_layer_note()


def _with_notes(text: str, first: str | None, last: Sequence[str | None]) -> str:
    """summary.txt's text with ``first`` as a note at the top (every result rests on it) and the
    ``last`` notes at the end."""
    text += "".join(f"\nNote: {note}\n" for note in last if note is not None)
    return text if first is None else f"Note: {first}\n\n{text}"


#: The report's whole-number settings: (least value, the example its message gives)
_COUNTS = {
    "seed": (0, 0), "k": (1, 10), "n_random": (1, 200), "n_permutations": (1, 200),
    "universal_folds": (2, 5), "property_permutations": (1, 1000), "property_shuffles": (0, 20),
}


def _check_settings(
    q: object, scores: Sequence[str], options: AnalysisOptions, **counts: object
) -> tuple[float, list[str], dict[str, int]]:
    """ValueError naming the setting, its command-line flag and the fix unless each count is an
    integer of at least its least value (:data:`_COUNTS`), ``q`` a fraction in (0, 1), ``scores``
    one or more dispersion scores and the metrics of ``options`` registry names: checked before
    the first section, which on a large run takes minutes (each was checked only when its
    section ran, after the sections before it had written their files). Returns q, the scores
    (repeats dropped) and the counts as Python numbers."""
    checked = {}
    for name, value in counts.items():
        least, example = _COUNTS[name]
        try:
            checked[name] = check_count(value, name, least)
        except ValueError as exc:  # with the flag that sets it
            raise ValueError(
                f"{exc} Use e.g. --{name.replace('_', '-')} {example} (or {name}={example})"
            ) from None
    if isinstance(q, bool) or not isinstance(q, (int, float, np.number)) or not 0 < q < 1:
        raise ValueError(
            f"q is the fraction of stimuli Fig. S1 drops and must lie in (0, 1), got {q!r}; use "
            "e.g. --q 0.25 (or q=0.25)"
        )
    scores = [scores] if isinstance(scores, str) else list(dict.fromkeys(scores))
    try:
        if not scores:
            raise ValueError(f"pass at least one dispersion score; use one of {list(SCORES)}")
        for score in scores:
            check_score(score)
    except ValueError as exc:
        raise ValueError(f"{exc} (--scores)") from None
    for flag, names in (("--metrics", options.metric_names),
                        ("calibration_metrics", lambda: options.calibration_metric_names([])),
                        ("many_to_many_metrics",
                         lambda: analyses.check_metric_names(options.many_to_many_metrics))):
        try:
            names()
        except ValueError as exc:
            raise ValueError(f"{exc} ({flag})") from None
    # as Python numbers: they go into report.json (numpy's int64 and float32 are no JSON)
    return float(q), scores, checked


def _os_error_text(error: OSError, out: Path) -> str:
    """What failed and the fix: writing the report to ``out``, or reading a file of the run (a
    file outside ``out``: the error's file name says which)."""
    reason = error.strerror or str(error)
    file = error.filename
    inside = file is None or Path(os.path.abspath(file)).is_relative_to(os.path.abspath(out))
    if inside:
        return (
            f"cannot write the report to {out} ({reason}); pass a folder you can write to with "
            "--out"
        )
    return (
        f"cannot read {file} ({reason}); check that file of the run (its permissions, or the "
        "disk), or precompute the run again"
    )


#: What a report writes: tables (.csv and .json), figures (.png), report.json and summary.txt
_REPORT_SUFFIXES = frozenset({".csv", ".json", ".png", ".txt"})


def _forget_earlier_report(out: Path) -> None:
    """Remove an earlier report from ``out`` before the first section writes: its
    ``report.json``, ``summary.txt`` and every file its report.json lists (``files``), so that a
    folder with a report.json holds one whole report. A rerun that fails leaves no earlier one
    beside its new tables, and a report of another run or with other settings leaves none of the
    earlier one's tables and figures among its own (a run without language models writes no
    Fig. 2: the earlier run's stayed, unnoticed). Only a report.json this program wrote (its
    ``parameters`` and ``files``) is taken for one; other files of those names stay, and only
    plain file names in ``out`` with the suffixes a report writes are removed."""
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not (isinstance(earlier, dict) and {"parameters", "files"} <= set(earlier)):
        return
    listed = earlier["files"] if isinstance(earlier["files"], list) else []
    for name in [*(n for n in listed if isinstance(n, str)), "report.json", "summary.txt"]:
        path = out / name
        if Path(name).name == name and name not in ("", ".", "..") and (
            path.suffix in _REPORT_SUFFIXES and not path.is_dir()
        ):
            path.unlink(missing_ok=True)


def _check_k_fits(k: int, size: int) -> None:
    """ValueError naming --k and --size unless each stimulus of a set of ``size`` has k others
    (CKNNA: k >= 2): before the first section, not after the layer sweep."""
    try:
        check_k(k, size, 2, what="sets")
    except ValueError as exc:
        raise ValueError(f"{exc} (--k, --size)") from None


def write_report(
    run: Run,
    out: str | os.PathLike[str],
    *,
    size: int | None = None,
    k: int | None = None,
    scores: Sequence[str] = SCORES,
    n_random: int = 200,
    n_permutations: int = analyses.DEFAULT_N_PERMUTATIONS,
    q: float = 0.25,
    seed: int = 0,
    universal_folds: int = 5,
    property_permutations: int = dispersion_predictors.PROPERTY_TEST_PERMUTATIONS,
    property_shuffles: int = dispersion_predictors.DEFAULT_N_SHUFFLES,
    options: AnalysisOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every analysis on ``run`` and write tables, figures and the summary to ``out``.

    Returns the content of ``report.json``: ``run``, ``parameters``, ``best_language_layers``,
    ``verdicts`` (each score -> its Fig. 2 sentence, ``partners_<score>`` -> the same for the
    models outside GPA, and one sentence per issue-14 section: ``metric_suite``,
    ``per_stimulus``, ``predictivity``, ``many_to_many``, ``blind_matching``,
    ``matched_baselines``), ``paired_tests``, ``universal_space`` (see
    :func:`universal_space_section`), ``partners`` (empty, or the models outside GPA that are not
    language models, what their pairs align and their paired tests), the sections' entries
    (``metric_suite``, ``per_stimulus``, ...; see each ``*_section``), ``properties`` (what
    predicts dispersion: top properties and held-out R² per score; None without a property
    table), ``notes`` and ``files``. ``options`` sets the issue-14 sections
    (:class:`AnalysisOptions`; its defaults when None).

    ``k`` None (``--k`` left out) is :data:`DEFAULT_K`, lowered below the sets of a small run as
    the Alignment lab lowers it, with a note (:func:`sets_and_k`); a ``k`` given is used as given
    or refused.

    Models outside GPA that are not language models (brain recordings) get their own Fig. 2 and
    S1 (:func:`partner_alignment_section`, files ``*_partners*``). A run without language models
    gets those as its Fig. 2 and S1, the analyses that need no other side (Fig. S2, GPA stability,
    what predicts dispersion) and a note.

    Each language model is used at its best layer (:func:`analyses.best_language_layers`); one
    whose CKNNA is NaN at every layer at its default layer instead, as the dashboard pages do,
    with a note naming it and the layer (report.json and summary.txt). ``paired_tests`` holds,
    per score, the Wilcoxon and paired t tests across pairs, each with a note that it takes the
    pairs as independent (they share models and stimuli: its p-value is too small), and the
    label-shuffle test of the mean over pairs, which keeps their dependence
    (:func:`analyses.paired_set_tests`).

    ``progress`` (optional) is called with each section's name as it starts (the CLI prints
    them with the time so far: a report on a large run takes minutes).

    Every setting is checked before the first section (ValueError naming the flag), and every
    file of the run the report reads, as the dashboard checks it (``run_checks.check_run_files``:
    a damaged file is a CacheFormatError naming it and the repair, never a report of wrong
    numbers); then an earlier report's ``report.json`` and ``summary.txt`` in ``out`` are
    removed, so a folder with report.json holds one whole report (written last; NaN and ±inf as
    null).
    """
    options = AnalysisOptions() if options is None else options
    tell = progress or _silent
    out = check_out_folder(out)
    version = _run_version(run)  # a precompute rewriting the run meanwhile is found at the end
    n = int(run.gpa.residuals.shape[0])
    if size is not None:
        analyses.check_set_size(size, n)  # before the first section writes a file
        size = int(size)
    q, scores, counts = _check_settings(
        q, scores, options, seed=seed, k=DEFAULT_K if k is None else k, n_random=n_random,
        n_permutations=n_permutations,
        universal_folds=universal_folds, property_permutations=property_permutations,
        property_shuffles=property_shuffles,
    )
    seed, n_random, n_permutations = counts["seed"], counts["n_random"], counts["n_permutations"]
    k = None if k is None else counts["k"]
    universal_folds, property_permutations, property_shuffles = (
        counts["universal_folds"], counts["property_permutations"], counts["property_shuffles"]
    )
    check_run_files(run)  # after the settings (a typo fails in a second), before any section
    k_note = None  # why k is not the default, where it was lowered
    if run.partner_models:  # the Fig. 2 sets (GPA models × language or other models)
        size, k, k_note = sets_and_k(n, size, k)
        _check_k_fits(k, size)
    elif k is None:
        k = DEFAULT_K
    out.mkdir(parents=True, exist_ok=True)
    _forget_earlier_report(out)
    # without language models only GPA stability of the slow sections runs
    hint = large_run_hint(n, options, _SLOW_SECTIONS if run.language_models else ("gpa_stability",))
    if hint is not None:
        tell(hint)
    if not run.language_models:
        return _report_without_language(
            run, out, size=size, k=k, q=q, scores=scores, n_random=n_random,
            n_permutations=n_permutations, seed=seed, options=options,
            property_permutations=property_permutations, property_shuffles=property_shuffles,
            tell=tell, version=version, k_note=k_note,
        )
    files: list[str] = []
    notes: list[str] = [] if k_note is None else [k_note]
    two_models, first_layer = _gpa_notes(run)
    notes += [note for note in (two_models, first_layer) if note is not None]

    tell("layer sweep and best language layers")
    sweep = analyses.layer_sweep(run, k=k)
    # a language model whose CKNNA is NaN at every layer: its default layer, as the dashboard
    # pages, and a note naming it (it stopped the whole report)
    best = analyses.best_language_layers(run, k=k, sweep=sweep, undefined="default")
    default_layers = analyses.undefined_layer_note(best)
    notes += default_layers
    files += _write_table(sweep, out, "layer_sweep")
    files += _write_table(best, out, "best_language_layers")
    files.append(figures.layer_sweep_figure(sweep, out / "layer_sweep.png").name)

    pairs = analyses.pairs_with_best_layers(run, k=k, best_layers=best)
    sides = analyses.pair_sides(run, pairs)  # "vision × language"; "brain × language", ...
    metrics = options.metric_names()
    metric_options = options.metric_options(run, pairs, size, metrics)
    tell(_fig2_step(metrics, len(scores), size))
    long_table = analyses.dispersion_set_alignment(
        run,
        size=size,
        k=k,
        score=list(scores),
        n_random=n_random,
        seed=seed,
        n_permutations=n_permutations,
        best_layers=best,
        metrics=metrics,
        metric_options=metric_options,
        metric_permutations=options.metric_permutations,
        on_error="nan",  # a metric undefined on some sets (SVCCA beyond the rank) is a note
        progress=None if progress is None else _set_progress(
            tell, "Fig. 2",
            _fig2_feature_sets(metrics, len(scores), n_random, options.metric_permutations),
        ),
    )
    set_tables, paired, verdicts = [], [], {}
    for score in scores:
        table = analyses.cknna_table(long_table[long_table["score"] == score])
        set_tables.append(table)
        files += _write_table(table, out, f"dispersion_sets_{score}")
        files.append(
            dispersion_sets_figure(table, out / f"fig2_dispersion_sets_{score}.png", size).name
        )
        paired.append(analyses.paired_set_tests(table).assign(score=score))
        verdicts[score] = fig2_verdict(table, sides, size)
    paired_tests = pd.concat(paired, ignore_index=True)
    files += _write_table(paired_tests, out, "paired_tests")

    tell("dropping the most dispersed stimuli (Fig. S1)")
    dropped = analyses.drop_fraction_alignment(run, q=q, k=k, best_layers=best)
    files += _write_table(dropped, out, "drop_fraction")
    s1_figure, s1_note = drop_fraction_figure(dropped, out / "figS1_drop_fraction.png")
    files.append(s1_figure.name)
    notes += [s1_note] if s1_note is not None else []

    # the models outside GPA that are not language models (brain recordings): their own Fig. 2
    # and S1, as on a run without language models
    partners: dict[str, Any] = {}
    partner_summary = None
    partner_values: list[tuple[str, float, int, int]] = []  # their CKNNA, for the bound note
    if run.other_partner_models:
        tell(STEP_TITLES["partners"])
        section = partner_alignment_section(
            run, out, size=size, k=k, q=q, scores=scores, n_random=n_random,
            n_permutations=n_permutations, seed=seed, suffix="_partners",
        )
        files += section.files
        verdicts.update({f"partners_{score}": text for score, text in section.verdicts.items()})
        partners = {
            "models": run.other_partner_models,
            "sides": section.sides,
            "paired_tests": _records(section.paired_tests),
        }
        partner_summary = section.summary
        partner_values = section.cknna_values
        notes += section.notes

    tell(STEP_TITLES["leave_one_model_out"])
    loo_files, loo_notes = leave_one_model_out_section(run, out)
    files += loo_files
    notes += loo_notes

    if "universal_space" in options.skip:
        universal_files: list[str] = []
        universal_space: dict[str, Any] = {"note": skipped_note("universal_space")}
    else:
        tell("universal space")
        universal_files, universal_space = universal_space_section(
            run, out, n_folds=universal_folds, seed=seed, n_permutations=n_permutations,
            tell=tell,
        )
    files += universal_files
    if universal_space.get("note"):
        notes.append(universal_space["note"])

    sections = paper_sections(
        run, out, pairs, long_table, options=options, scores=scores, size=size, k=k,
        n_random=n_random, n_permutations=n_permutations, seed=seed, metrics=metrics,
        metric_options=metric_options, progress=tell,
    )
    for entry in sections.values():
        files += entry.pop("files")
        notes += entry.pop("notes", [])
    section_verdicts = {
        name: entry["verdict"] for name, entry in sections.items() if entry.get("verdict")
    }

    tell(STEP_TITLES["properties"])
    property_files, property_notes, properties, property_text = properties_section(
        run, out, scores=scores, n_permutations=property_permutations,
        n_shuffles=property_shuffles, seed=seed,
    )
    files += property_files
    notes += property_notes

    cknna_notes, bound = _cknna_notes(
        size, _cknna_values(set_tables, dropped, sweep, n) + partner_values
    )
    notes += cknna_notes
    # every pair's row: vision × language, then the models outside GPA (vision × brain)
    summary = summary_table(set_tables, sides)
    if partner_summary is not None:
        summary = pd.concat([summary, partner_summary], ignore_index=True)
    files += _write_table(summary, out, "summary")
    text = _table_text(summary, size) + "\n".join(verdicts.values()) + "\n"
    if section_verdicts:
        text += "\n" + "\n".join(section_verdicts.values()) + "\n"
    if universal_space.get("headline"):  # the file says what the command prints
        text += "\n" + universal_space["headline"] + "\n"
    verdicts.update(section_verdicts)
    text += property_text
    text = _with_notes(text, first_layer, (k_note, two_models, *default_layers, bound))
    files.append(write_bytes(out / "summary.txt", text.encode("utf-8")).name)

    report = {
        "run": _run_record(run),
        "parameters": {
            "set_size": size,
            "k": k,
            "scores": list(scores),
            "n_random": n_random,
            "n_permutations": n_permutations,
            "fraction_dropped": q,
            "seed": seed,
            "universal_folds": universal_folds,
            "property_permutations": property_permutations,
            "property_shuffles": property_shuffles,
            "metrics": metrics,
            "metric_options": metric_options,
            "sets_of_later_sections": scores[0],
            **{key: [_json_value(v) for v in value] if isinstance(value, tuple)
               else _json_value(value)  # numpy numbers as Python's: JSON takes no others
               for key, value in asdict(options).items() if key != "metrics"},
        },
        "best_language_layers": dict(
            zip(best["language_model"], best["language_layer"], strict=True)
        ),
        "verdicts": verdicts,
        "properties": properties,
        "paired_tests": _records(paired_tests),
        "universal_space": universal_space,
        "partners": partners,
        **sections,
        "notes": notes,
        "files": sorted([*files, "report.json"]),
    }
    _check_unchanged(run, version, out)
    report = _plain_json(report)
    write_json(out / "report.json", report)
    return report


def _run_version(run: Run) -> int:
    """The run's version: when its manifest was last written (a precompute rewrites it at every
    step). Refuses a run that a precompute is writing now."""
    writer = live_writer(run.path)
    if writer is not None:
        raise ValueError(
            f"a precompute (pid {writer}) is writing run {run.name!r} now (it holds "
            f"{lock_path(run.path)}); rerun the report when it has finished, or delete that file "
            f"if process {writer} is not a precompute of this run"
        )
    try:
        return RunLayout(run.path).manifest.stat().st_mtime_ns
    except OSError:
        return -1


def _check_unchanged(run: Run, version: int, out: Path) -> None:
    """A ValueError if the run was rewritten while the report read it (found by the reliability
    audit: such a report ended as if complete, with sections missing and a false note)."""
    try:
        unchanged = _run_version(run) == version
    except ValueError:  # a precompute is writing it now
        unchanged = False
    if not unchanged:
        raise ValueError(
            f"run {run.name!r} changed while the report was running (a precompute rewrote it): "
            f"the files in {out} mix its two versions, and report.json was not written; rerun "
            "the report once the precompute has finished"
        )


def _report_without_language(
    run: Run, out: Path, *, size: int | None, k: int, q: float, scores: Sequence[str],
    n_random: int, n_permutations: int, seed: int, options: AnalysisOptions,
    property_permutations: int, property_shuffles: int, tell: Callable[[str], None],
    version: int, k_note: str | None = None,
) -> dict[str, Any]:
    """:func:`write_report` for a run without language models (vision models and brain
    recordings, say): Fig. 2 and S1 for the GPA models × the models outside GPA
    (:func:`analyses.partner_pairs`, at their default layers) and their ``summary`` table when
    there are any, then what needs no other side — leave-one-model-out (Fig. S2), GPA stability
    and what predicts dispersion — and a note naming what was skipped."""
    partners = run.partner_models  # no language model here: the models outside GPA
    notes = [
        "the vision–language analyses (the layer sweep, the metric suite and the sections built "
        "on it, universal space; Fig. 2 and S1 with language models) skipped: the run has no "
        "language model"
    ]
    notes += [note for note in (k_note,) if note is not None]
    two_models, first_layer = _gpa_notes(run)
    notes += [note for note in (two_models, first_layer) if note is not None]
    files: list[str] = []
    verdicts: dict[str, str] = {}
    paired_tests = None
    summary_text = ""
    bound = None
    if partners:
        tell(STEP_TITLES["partners"])
        section = partner_alignment_section(
            run, out, size=size, k=k, q=q, scores=scores, n_random=n_random,
            n_permutations=n_permutations, seed=seed,
        )
        files = section.files + _write_table(section.summary, out, "summary")
        verdicts, paired_tests = dict(section.verdicts), section.paired_tests
        summary_text = _table_text(section.summary, size)
        notes += section.notes
        cknna_notes, bound = _cknna_notes(size, section.cknna_values)
    tell(STEP_TITLES["leave_one_model_out"])
    loo_files, loo_notes = leave_one_model_out_section(run, out)
    files += loo_files
    notes += loo_notes
    sections: dict[str, dict[str, Any]] = {}
    if "gpa_stability" in options.skip:
        notes.append(skipped_note("gpa_stability"))
    else:
        tell(SECTION_TITLES["gpa_stability"])
        stability_files, sections["gpa_stability"] = gpa_stability_section(
            run, out, n_starts=options.gpa_starts, seed=seed
        )
        files += stability_files
    tell(STEP_TITLES["properties"])
    property_files, property_notes, properties, property_text = properties_section(
        run, out, scores=scores, n_permutations=property_permutations,
        n_shuffles=property_shuffles, seed=seed,
    )
    files += property_files
    notes += property_notes
    if partners:  # after the property notes, as on the path with language models
        notes += cknna_notes
    verdicts.update(
        {name: entry["verdict"] for name, entry in sections.items() if entry["verdict"]}
    )
    text = (
        f"Run {run.name!r} has no language model: "
        + (f"Fig. 2 and S1 for {', '.join(partners)} (models outside GPA, at their default "
           "layers) "
           "and the dispersion analyses.\n\n" if partners else "dispersion analyses only.\n")
        + summary_text
        + "".join(f"{verdict}\n" for verdict in verdicts.values())
        + property_text
    )
    text = _with_notes(text, first_layer, (k_note, two_models, bound))
    files.append(write_bytes(out / "summary.txt", text.encode("utf-8")).name)
    report = {
        "run": _run_record(run),
        "parameters": {
            "set_size": size if partners else None, "k": k, "fraction_dropped": q,
            "scores": list(scores),
            "n_random": n_random, "n_permutations": n_permutations, "seed": seed,
            "gpa_starts": options.gpa_starts, "property_permutations": property_permutations,
            "property_shuffles": property_shuffles, "skip": list(options.skip),
            "partner_models": partners,
        },
        "best_language_layers": {},
        "verdicts": verdicts,
        "properties": properties,
        "paired_tests": [] if paired_tests is None else _records(paired_tests),
        "universal_space": {},
        **sections,
        "notes": notes,
        "files": sorted([*files, "report.json"]),
    }
    _check_unchanged(run, version, out)
    report = _plain_json(report)
    write_json(out / "report.json", report)
    return report


class PartnerSection(NamedTuple):
    """What :func:`partner_alignment_section` wrote and found."""

    files: list[str]
    verdicts: dict[str, str]  #: score -> its Fig. 2 sentence
    paired_tests: pd.DataFrame  #: long: a ``score`` column
    summary: pd.DataFrame  #: :func:`summary_table` rows of these pairs (``sides`` filled)
    sides: str  #: what the pairs align, e.g. ``vision × brain``
    #: ``(what, CKNNA, set size, k)`` of every CKNNA written (``alignment.cknna_bound_note``)
    cknna_values: list[tuple[str, float, int, int]]
    #: Fig. S1's note on the bars it does not draw (:func:`drop_fraction_figure`), if any
    notes: list[str]


def partner_alignment_section(
    run: Run, out: Path, *, size: int, k: int, q: float, scores: Sequence[str], n_random: int,
    n_permutations: int, seed: int, suffix: str = "",
) -> PartnerSection:
    """Fig. 2 and S1 for the GPA models × the models outside GPA that are not language models
    (:func:`analyses.partner_pairs`: brain recordings at their default layers).

    Writes ``dispersion_sets{suffix}_{score}`` (table and Fig. 2 per score),
    ``paired_tests{suffix}`` and ``drop_fraction{suffix}`` (table and Fig. S1): without a suffix on
    a run without language models, where these are the report's Fig. 2 and S1, and with
    ``_partners`` beside the vision–language ones. Returns a :class:`PartnerSection`: the files,
    one :func:`analyses.effect_verdict` per score (naming the sides, e.g. ``vision × brain``), the
    paired tests and the summary rows.
    """
    pairs = analyses.partner_pairs(run)
    sides = analyses.pair_sides(run, pairs)
    table = analyses.dispersion_set_alignment(
        run, size=size, k=k, score=list(scores), n_random=n_random, seed=seed,
        n_permutations=n_permutations, pairs=pairs,
    )
    files: list[str] = []
    verdicts: dict[str, str] = {}
    paired, set_tables = [], []
    for score in scores:
        rows = table[table["score"] == score]
        set_tables.append(rows)
        stem = f"dispersion_sets{suffix}_{score}"
        files += _write_table(rows, out, stem)
        files.append(dispersion_sets_figure(
            rows, out / f"fig2_{stem}.png", size, partner="model outside GPA"
        ).name)
        paired.append(analyses.paired_set_tests(rows).assign(score=score))
        verdicts[score] = fig2_verdict(rows, sides, size)
    paired_tests = pd.concat(paired, ignore_index=True)
    files += _write_table(paired_tests, out, f"paired_tests{suffix}")
    dropped = analyses.drop_fraction_alignment(run, q=q, k=k, pairs=pairs)
    files += _write_table(dropped, out, f"drop_fraction{suffix}")
    s1_figure, s1_note = drop_fraction_figure(
        dropped, out / f"figS1_drop_fraction{suffix}.png", partner="model outside GPA"
    )
    files.append(s1_figure.name)
    return PartnerSection(
        files, verdicts, paired_tests, summary_table(set_tables, sides), sides,
        _cknna_values(set_tables, dropped), [] if s1_note is None else [s1_note],
    )


def leave_one_model_out_section(run: Run, out: Path) -> tuple[list[str], list[str]]:
    """Fig. S2 (:func:`analyses.leave_one_model_out`: each GPA model's deviation against the
    dispersion of the others) when the run has at least 3 GPA models. Returns (files, notes)."""
    if len(run.gpa.models) < 3:
        return [], [
            f"leave-one-model-out skipped: it needs at least 3 GPA models, the run has "
            f"{len(run.gpa.models)}"
        ]
    points = analyses.leave_one_model_out(run)
    statistics = analyses.leave_one_model_out_statistics(points)
    files = _write_table(points, out, "leave_one_model_out_points")
    files += _write_table(statistics, out, "leave_one_model_out_statistics")
    files.append(
        figures.leave_one_out_figure(points, statistics, out / "figS2_leave_one_model_out.png").name
    )
    return files, []


def properties_section(
    run: Run, out: Path, *, scores: Sequence[str], n_permutations: int, n_shuffles: int, seed: int
) -> tuple[list[str], list[str], dict[str, Any] | None, str]:
    """What predicts dispersion (:func:`dispersion_predictors.analyse_properties` on the run's
    property table): tables and a figure per score. Returns (files, notes, the report.json entry
    (:func:`property_summary`; None without a property table), its summary text)."""
    if run.properties is None:
        return [], [
            "stimulus properties skipped: the run has no property table; rerun the precompute "
            "command that made it to add one"
        ], None, ""
    problem = dispersion_predictors.fit_problem(run.properties)
    if problem:  # a run of a handful of stimuli: the rest of the report goes on
        return [], [f"stimulus properties skipped: {problem}"], None, ""
    files: list[str] = []
    analysis = dispersion_predictors.analyse_properties(
        run.properties,
        run.dispersion,
        scores=scores,
        n_permutations=n_permutations,
        n_shuffles=n_shuffles,
        seed=seed,
    )
    for stem, table in (
        ("property_tests", analysis.tests),
        ("property_groups", analysis.groups),
        ("property_model_fit", analysis.fit),
        ("property_importances", analysis.importances),
        ("property_predictions", analysis.predictions),
        ("property_skipped", analysis.skipped),
    ):
        files += _write_table(table, out, stem)
    for score in scores:
        files.append(
            figures.predictors_figure(
                analysis.tests,
                analysis.fit,
                analysis.predictions,
                out / f"what_predicts_dispersion_{score}.png",
                score=score,
            ).name
        )
    properties = property_summary(analysis)
    return files, [], properties, format_property_summary(properties)


#: Retrieval metrics quoted in the headline (report.json and the printed line).
HEADLINE_METRICS = ("recall_at_1", "recall_at_5", "median_rank")


def retrieval_headline(summary: pd.DataFrame, direction: str) -> dict[str, dict[str, float]]:
    """``{method: {metric: mean over folds}}`` of one direction on all held-out stimuli."""
    rows = summary[(summary["direction"] == direction) & (summary["subset"] == "all")]
    return {
        method: {
            metric: float(group.loc[group["metric"] == metric, "mean"].iloc[0])
            for metric in HEADLINE_METRICS
        }
        for method, group in rows.groupby("method", sort=False)
    }


def format_retrieval_headline(headline: dict[str, Any]) -> str:
    """One line: image → text recall@1 / @5 of the universal space vs ridge vs chance."""
    numbers = headline["vision_to_language"]

    def part(metric: str) -> str:
        return (
            f"{metric.replace('_at_', '@')} {numbers['universal'][metric]:.3f} "
            f"(ridge {numbers['ridge'][metric]:.3f}, chance {numbers['chance'][metric]:.3f})"
        )

    return (
        f"Universal space, held-out image → text retrieval ({headline['n_folds']}-fold, "
        f"{headline['n_gallery_mean']:.0f} captions per fold): "
        f"{part('recall_at_1')}; {part('recall_at_5')}"
    )


def _json_value(value: Any) -> Any:
    """A table cell as plain JSON: numpy scalars unwrapped, NaN and ±inf as null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _plain_json(value: Any) -> Any:
    """``value`` (dicts, lists and tuples of cells, nested) with every cell :func:`_json_value`:
    report.json is strict JSON, and one inf (a t statistic, say) refused all of it."""
    if isinstance(value, dict):
        return {key: _plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain_json(item) for item in value]
    return _json_value(value)


def universal_space_section(
    run: Run,
    out: Path,
    *,
    n_folds: int = 5,
    seed: int = 0,
    n_permutations: int = 1000,
    tell: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """The universal-space tables and figures of every model of ``run`` (default layers).

    Writes ``universal_residuals``, ``universal_cross_modal_dispersion``,
    ``universal_dispersion_relation``, ``universal_retrieval`` (per fold),
    ``universal_retrieval_summary``, ``universal_retrieval_ranks``, ``universal_ridge_alphas``,
    ``universal_retrieval_paired_test`` (McNemar, recall@1, universal vs ridge) (CSV + JSON) and
    ``universal_cross_modal_dispersion.png``, ``universal_retrieval.png``. Returns (file names,
    the ``universal_space`` entry of report.json: members, relation and the retrieval headline
    per direction; ``note`` instead when the run lacks a modality, or beside the cross-modal
    dispersion when the run is too small for ``n_folds`` held-out folds). ``tell`` (optional)
    hears when the retrieval starts and each fold it finishes (each fits a universal space).
    """
    tell = tell or _silent
    members = universal.run_members(run)
    modalities = {m.modality for m in members}
    if not {"vision", "language"} <= modalities:
        return [], {
            "note": "universal-space section skipped: it needs vision and language models, the "
            f"run has {sorted(modalities)}"
        }
    files: list[str] = []
    analysis = universal.run_cross_modal_analysis(run, n_permutations=n_permutations, seed=seed)
    files += _write_table(analysis.residuals, out, "universal_residuals")
    files += _write_table(analysis.dispersion, out, "universal_cross_modal_dispersion")
    files += _write_table(analysis.relation, out, "universal_dispersion_relation")
    files.append(
        figures.cross_modal_dispersion_figure(
            analysis.per_stimulus(), analysis.relation, out / "universal_cross_modal_dispersion.png"
        ).name
    )
    relation = analysis.relation.iloc[0].to_dict()
    entry: dict[str, Any] = {
        "members": [m._asdict() for m in members],
        "relation": {key: _json_value(value) for key, value in relation.items()},
    }
    tell(f"universal space: {n_folds}-fold retrieval, a space of {len(members)} models fitted "
         "per fold")
    try:
        result = retrieval.run_retrieval(
            run, n_folds=n_folds, seed=seed,
            progress=lambda done, total: tell(f"universal space: fold {done} of {total} done"),
        )
    except ValueError as error:  # a small run: the cross-modal dispersion above still stands
        entry["note"] = f"universal-space retrieval skipped: {error} (--universal-folds)"
        return files, entry
    summary = result.summary()
    files += _write_table(result.table, out, "universal_retrieval")
    files += _write_table(summary, out, "universal_retrieval_summary")
    files += _write_table(result.ranks, out, "universal_retrieval_ranks")
    files += _write_table(result.baseline, out, "universal_ridge_alphas")
    paired = retrieval.paired_recall_test(result.ranks, k=1)
    files += _write_table(paired, out, "universal_retrieval_paired_test")
    files.append(figures.retrieval_figure(summary, out / "universal_retrieval.png").name)
    entry.update({
        "n_folds": n_folds,
        "n_gallery_mean": float(
            summary.loc[summary["subset"] == "all", "n_gallery_mean"].iloc[0]
        ),
        "similarity": result.parameters["similarity"],
        "ridge_alpha_relative": result.baseline["alpha_relative"].tolist(),
        "vision_to_language": retrieval_headline(summary, result.forward),
        "language_to_vision": retrieval_headline(summary, result.backward),
        "paired_test_recall_at_1": paired.to_dict("records"),
    })
    entry["headline"] = format_retrieval_headline(entry)
    return files, entry


# ----------------------------------------------------------------------------------------------
# the metric suite and the neighbouring papers' analyses (issue 14), one function per section

class SectionSkipped(ValueError):
    """A section cannot run on this run or with these settings (sets too small for its
    cross-validation, too large for blind matching): :func:`paper_sections` turns it into a note
    ("<section> skipped: <why>") and the rest of the report goes on. Any other error of a section
    is not one it expects (a bug): see :func:`_section_failed`."""


def _section_failed(name: str, error: ValueError) -> dict[str, Any]:
    """The report.json entry of a section that stopped on a ValueError it does not expect (not
    a :class:`SectionSkipped`): a bug. Before 2026-12-07 every ValueError became "<section>
    skipped: <error>", as if the run could not have the section, which hid a bug for a run with
    a one-feature model. The report still goes on (the sections before and after stand, and a
    run may take an hour), but the note says it is a bug, where it was raised and what to do;
    the full traceback goes to the entry's ``error`` and to a RuntimeWarning (stderr)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = (
        f" in {frames[-1].name} ({Path(frames[-1].filename).name}, line {frames[-1].lineno})"
        if frames else ""
    )
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    warnings.warn(f"the {name} section failed (a bug):\n{text}", RuntimeWarning, stacklevel=3)
    note = (
        f"{name} failed: {type(error).__name__}{where}: {error}. This is a bug in the report, "
        "not a problem with the run: the other sections stand; please report it with this "
        f"note and the traceback (report.json: the \"error\" of \"{name}\")"
    )
    return {"verdict": None, "notes": [note], "error": text}


@dataclass(frozen=True)
class Section:
    """One optional section of the report: ``name`` its key in report.json, ``skip`` its
    ``--skip`` name, ``title`` what the progress lines call it, ``slow`` whether it is among the
    longest on large runs (named in :func:`large_run_hint`; ``docs/PERFORMANCE.md``)."""

    name: str
    skip: str
    title: str
    slow: bool = False


#: The report's optional sections, in the order they run: the one list. A new section is an entry
#: here and its function in :func:`paper_sections` (the universal space runs on its own, before).
#: Each costs seconds to a minute on the demo; the universal space fits a GPA of every model,
#: then one per retrieval fold: over 15 minutes on a 10,000-stimulus run of six models.
SECTIONS = (
    Section("universal_space", "universal_space", "universal space", slow=True),
    Section("per_stimulus", "per_stimulus", "per-stimulus alignment against dispersion"),
    Section("predictivity", "predictivity", "linear predictivity", slow=True),
    Section("many_to_many", "many_to_many", "one caption against the mean of all captions"),
    Section("blind_matching", "blind_matching", "blind matching"),
    Section("matched_baselines", "calibration",
            "calibration: shuffled pairings and matched random sets", slow=True),
    Section("gpa_stability", "gpa_stability", "GPA stability", slow=True),
)
#: Report sections that ``--skip`` may leave out (their ``--skip`` names)
OPTIONAL_SECTIONS = tuple(section.skip for section in SECTIONS)
#: report.json section -> what the report's progress lines call it (those of paper_sections)
SECTION_TITLES = {s.name: s.title for s in SECTIONS if s.name != "universal_space"}


def skipped_note(skip: str) -> str:
    """The note (report.json's ``notes``, printed as ``note: ...``) of a section that ``--skip``
    left out, ``skip`` its ``--skip`` name: one per skipped section, on both report paths."""
    return f"{skip.replace('_', '-')} section skipped (--skip)"


#: Runs of at least this many stimuli get a line, before the first section, on what makes the
#: report long and how to shorten it (a full report on 10,000 stimuli took over an hour here).
LARGE_RUN_STIMULI = 10_000
#: The sections that take longest on large runs (``docs/PERFORMANCE.md``, the report's cost).
_SLOW_SECTIONS = tuple(section.skip for section in SECTIONS if section.slow)


def large_run_hint(
    n: int, options: AnalysisOptions, sections: Sequence[str] = _SLOW_SECTIONS
) -> str | None:
    """The line a report on ``n`` stimuli starts with when it will take long (None when n is
    below :data:`LARGE_RUN_STIMULI` or the slow parts are already left out): what to pass for a
    first look. ``sections``: the slow sections this report runs."""
    if n < LARGE_RUN_STIMULI:
        return None
    cheaper = []
    if any(name != "cknna" for name in options.metric_names()):
        cheaper.append("--metrics cknna")
    slow = [name for name in sections if name not in options.skip]
    if slow:
        cheaper.append("--skip " + " ".join(slow))
    if not cheaper:
        return None
    return (
        f"a run of {n:,} stimuli: the full report takes over an hour (on 10,000 stimuli and 2 "
        "cores, Fig. 2 with every metric took ~27 min, linear predictivity ~20 and the universal "
        "space over 15: docs/PERFORMANCE.md, \"The report's cost\"); for a first look, add "
        + " ".join(cheaper)
    )


@dataclass(frozen=True)
class AnalysisOptions:
    """Settings of the issue-14 sections of the report (defaults keep the demo's report cheap).

    Attributes:
        metrics: registry metrics of the Fig. 2 sets (None: every metric,
            ``metrics.metric_names()``; CKNNA is always added: the summary is CKNNA's).
        metric_permutations: low/high label shuffles per metric other than CKNNA (the first of
            CKNNA's shuffles; 0: no test).
        cca_dim: SVCCA's dimension (at most the narrowest layer compared and the set size − 1).
        calibration_metrics: metrics of the calibration section (None: the Fig. 2 metrics that the
            registry marks fast enough for the live lab, ``metrics.metric(name).live``).
        n_shuffles: shuffled-pairing null draws per set, pair and metric (calibration).
        n_matched: typicality-matched random sets per set (calibration).
        predictivity_random: random sets (the first of Fig. 2's draws) scored by linear
            predictivity besides the low and high sets.
        predictivity_folds: outer cross-validation folds of the ridge map.
        blind_matching_repeats: blind-matching runs (seeds) on the low and on the high set.
        blind_matching_random: random sets (the first of Fig. 2's draws) matched blind once each.
        blind_matching_seeds: known pairs given to the matching solver.
        many_to_many_metrics: metrics of one caption vs the mean of all captions.
        many_to_many_resamples: half-samples of the interval of that difference.
        embed_captions: load each language model to embed every caption (cached in the run
            folder) when the run has no cached caption embeddings.
        caption_weights: ``{language model: local weights path}`` to embed its captions with
            (``--weights``); a model left out loads the manifest's weights if they lie inside the
            cache or the data folder (``caption_embeddings.manifest_weights``).
        gpa_starts: random starts of the GPA stability diagnostic (``gpa_stability``).
        skip: sections to leave out (names of :data:`OPTIONAL_SECTIONS`).
    """

    metrics: tuple[str, ...] | None = None
    metric_permutations: int = 100
    cca_dim: int = 10
    calibration_metrics: tuple[str, ...] | None = None
    n_shuffles: int = 200
    n_matched: int = 200
    predictivity_random: int = 5
    predictivity_folds: int = 5
    blind_matching_repeats: int = 3
    blind_matching_random: int = 10
    blind_matching_seeds: int = 10
    many_to_many_metrics: tuple[str, ...] = ("cknna", "cka")
    many_to_many_resamples: int = 200
    embed_captions: bool = False
    caption_weights: dict[str, str] | None = None
    gpa_starts: int = 4
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - set(OPTIONAL_SECTIONS))
        if unknown:
            raise ValueError(
                f"cannot skip {unknown}; sections that may be skipped: {OPTIONAL_SECTIONS}"
            )
        least = {"n_shuffles": 1, "n_matched": 1, "predictivity_folds": 2,
                 "many_to_many_resamples": 1, "cca_dim": 1, "gpa_starts": 1,
                 "metric_permutations": 0, "predictivity_random": 0, "blind_matching_repeats": 0,
                 "blind_matching_random": 0, "blind_matching_seeds": 0}
        for name, minimum in least.items():
            check_count(getattr(self, name), name, minimum)
        if (self.blind_matching_repeats + self.blind_matching_random < 1
                and "blind_matching" not in self.skip):
            raise ValueError(
                "blind_matching_repeats and blind_matching_random are both 0, so blind matching "
                "has no set to match; use e.g. --blind-matching-random 10 (or "
                "blind_matching_repeats=3), or --skip blind_matching"
            )

    def metric_names(self) -> list[str]:
        """The Fig. 2 metrics: CKNNA first, then the chosen ones (all by default)."""
        chosen = metric_names() if self.metrics is None else list(self.metrics)
        return analyses.check_metric_names(["cknna", *chosen])

    def calibration_metric_names(self, metrics: Sequence[str]) -> list[str]:
        """The calibration section's metrics (default: the live ones of ``metrics``)."""
        if self.calibration_metrics is not None:
            return analyses.check_metric_names(self.calibration_metrics)
        return [name for name in metrics if registry.metric(name).live]

    def metric_options(self, run: Run, pairs: Sequence[analyses.Pair], size: int,
                       names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """SVCCA's ``cca_dim``: at most the narrowest layer compared and size − 1."""
        if "svcca" not in names:
            return {}
        widths = [
            run.manifest.models[model].dims[layer] for pair in pairs for model, layer in pair.sides
        ]
        return {"svcca": {"cca_dim": min(int(self.cca_dim), cca_dim_limit(size, widths))}}


class DispersionSets(NamedTuple):
    """The sets of the issue-14 sections: by the report's first dispersion score."""

    score: str
    low: np.ndarray
    high: np.ndarray
    random: np.ndarray  # (n_random, size): Fig. 2's draws, the same for every section


def dispersion_sets(run: Run, score: str, size: int, n_random: int, seed: int) -> DispersionSets:
    values = run.dispersion[score].to_numpy(dtype=np.float64)
    return DispersionSets(
        score,
        select_stimuli(values, "low", size),
        select_stimuli(values, "high", size),
        analyses.random_sets(values, size, n_random, seed),
    )


def _pair_label(row: Any) -> str:
    return f"{row['vision_model']} × {row['language_model']}"


def _range_text(values: Sequence[float], spec: str = "{:+.2f}") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    return spec.format(low) if low == high else f"{spec.format(low)} to {spec.format(high)}"


def metric_suite_section(out: Path, table: pd.DataFrame) -> tuple[list[str], dict[str, Any]]:
    """Fig. 2 for every metric (every score, one long table) and how often the effect holds.

    ``table`` is ``analyses.dispersion_set_alignment(..., metrics=[...])``. Writes
    ``dispersion_sets_metrics`` (long: a ``metric`` column) and ``metric_effect_counts``
    (``analyses.effect_counts``). Returns (files, the ``metric_suite`` entry of report.json:
    metrics, counts, verdict). On sets whose CKNNA :func:`cknna_shown` hides, the verdict counts
    the other metrics and says why CKNNA has no count (the tables keep its numbers).
    """
    counts = analyses.effect_counts(table)
    files = _write_table(table, out, "dispersion_sets_metrics")
    files += _write_table(counts, out, "metric_effect_counts")
    size = int(table["set_size"].iloc[0])
    lines = []
    for score, group in counts.groupby("score", sort=False):
        n_pairs = int(group["n_pairs"].iloc[0])
        records = [
            r for r in group.to_dict("records") if cknna_shown(size) or r["metric"] != "cknna"
        ]
        ordered = ", ".join(f"{r['metric']} {r['n_low_random_high']}" for r in records)
        significant = ", ".join(f"{r['metric']} {r['n_significant']}" for r in records)
        line = f"Every metric ({score} dispersion, {size} stimuli per set): "
        if records:
            line += (
                f"low > random > high holds in {ordered} of {n_pairs} pairs; low > high with "
                f"permutation p < 0.05 in {significant}"
            )
        if len(records) < len(group):  # CKNNA's counts hidden
            line += ("; " if records else "") + f"cknna: {_no_cknna_verdict(size)}"
        lines.append(line + ".")
    notes = []
    values = table[["low_dispersion", "random_mean", "high_dispersion"]]
    for name, group in table[values.isna().any(axis=1)].groupby("metric", sort=False):
        pairs = ", ".join(sorted({_pair_label(row) for row in group.to_dict("records")}))
        notes.append(
            f"{name} is undefined (NaN) on some sets of {pairs}: its options do not fit those "
            "features there (e.g. SVCCA's cca_dim above their rank), or a model's features do not "
            "vary over those stimuli; its rows show NaN"
        )
    entry = {
        "metrics": list(dict.fromkeys(table["metric"])),
        "effect_counts": _records(counts),
        "verdict": " ".join(lines),
        "notes": notes,
    }
    return files, entry


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {key: _json_value(value) for key, value in row.items()}
        for row in frame.to_dict("records")
    ]


def per_stimulus_section(
    run: Run, out: Path, pairs: Sequence[analyses.Pair], *, k: int, score: str,
    n_permutations: int, seed: int,
) -> tuple[list[str], dict[str, Any]]:
    """Per-stimulus alignment (k-NN overlap, local CKA) of every pair against dispersion.

    Writes ``per_stimulus_alignment`` (long: stimulus × pair × metric),
    ``per_stimulus_dispersion_relation`` (Spearman ρ with permutation p per pair and metric) and
    ``per_stimulus_alignment.png``. Returns (files, report.json entry with the verdict).
    """
    table = stimulus_alignment.per_stimulus_alignment(run, pairs, k=k, seed=seed)
    dispersion = run.dispersion[score].to_numpy(dtype=np.float64)
    relation = stimulus_alignment.alignment_dispersion_relation(
        table, dispersion, score=score, n_permutations=n_permutations, seed=seed
    )
    files = _write_table(table, out, "per_stimulus_alignment")
    files += _write_table(relation, out, "per_stimulus_dispersion_relation")
    files.append(
        figures.per_stimulus_alignment_figure(
            table, dispersion, relation, out / "per_stimulus_alignment.png", score=score
        ).name
    )
    parts = []
    for metric, group in relation.groupby("metric", sort=False):
        negative = int(
            ((group["spearman_rho"] < 0) & (group["permutation_p_value_two_sided"] < 0.05)).sum()
        )
        parts.append(
            f"{metric.replace('_', ' ')} ρ {_range_text(group['spearman_rho'].tolist())} "
            f"({negative} of {len(group)} pairs negative with permutation p < 0.05)"
        )
    verdict = (
        f"Per-stimulus alignment against {score} dispersion ({run.n_stimuli} stimuli, Spearman): "
        + "; ".join(parts) + "."
    )
    return files, {"relation": _records(relation), "verdict": verdict}


def gpa_stability_section(
    run: Run, out: Path, *, n_starts: int, seed: int
) -> tuple[list[str], dict[str, Any]]:
    """How well GPA pins each stimulus's residuals and dispersion rank: the run's stored
    diagnostic (``Run.gpa_stability``) when it was made with ``n_starts`` and ``seed``, else the
    run's GPA rerun from ``n_starts`` random starts on its stored inputs, same tolerance.

    Writes ``gpa_stability`` (long: stimulus × model × metric). Returns (files, report.json entry:
    ``summary`` (``GPAStability.summary``), ``stored`` (read from the run) and the verdict).

    Rerun with other starts, the diagnostic adopts its own lowest-loss solution, which need not be
    the run's GPA (the run adopted among its own starts, or had none): where its dispersion is not
    the run's, the verdict says so and says nothing of an adoption, and the entry's
    ``other_solution`` gives the largest relative difference.
    """
    stored = run.gpa_stability
    other = None  # relative dispersion difference when the rerun's solution is not the run's
    if stored is None or (stored.n_starts, stored.seed) != (n_starts, seed):
        settings = read_json(run.layout.gpa_json)
        gpa = run.gpa
        result = gpa_stability(
            gpa.inputs, n_starts=n_starts, seed=seed, tol=float(settings["tol"]),
            max_iter=int(settings["max_iter"]), models=gpa.models,
        )
        table = result.to_frame(ids=run.stimuli["id"].astype(str))
        summary = {name: _json_value(value) for name, value in result.summary().items()}
        tol, reused = float(settings["tol"]), False
        own = run.dispersion["mean"].to_numpy(dtype=np.float64)
        apart = np.abs(result.dispersion - own) / np.maximum(np.abs(own), 1e-12)
        if apart.size and float(np.max(apart)) > 1e-5:  # (rounding alone: ~1e-12)
            other = float(np.max(apart))
    else:
        table, summary, tol, reused = stored.table, stored.summary, stored.tol, True
    files = _write_table(table, out, "gpa_stability")
    # another solution than the run's: no words about an adoption (said below instead)
    words = summary if other is None else {**summary, "adopted_solution": 0}
    verdict = describe_stability(words, n_stimuli=run.n_stimuli, n_starts=n_starts, tol=tol)
    if other is not None:
        if stored is None:
            runs_own = "none"
            fix = (f"rerun its precompute with --gpa-starts {n_starts} (seed 0), then this "
                   "report with --seed 0")
        else:
            runs_own = f"{stored.n_starts} random starts, seed {stored.seed}"
            fix = (f"run this report with --gpa-starts {stored.n_starts} --seed {stored.seed} "
                   "to read the run's own")
        verdict += (
            f" These {n_starts} random starts (seed {seed}) are the report's, not the run's "
            f"({runs_own}), and their lowest minimum is not the run's GPA (dispersions up to "
            f"{100 * other:.2g} % apart): the spread is measured around another solution; "
            f"{fix}."
        )
    entry: dict[str, Any] = {"summary": summary, "stored": reused, "verdict": verdict}
    if other is not None:
        entry["other_solution"] = other
    if (stop := run.gpa_stop) is not None:  # GPA stopped at its residuals' uncertainty
        entry["gpa_stop"] = {**asdict(stop), "verdict": stop.describe()}
        entry["verdict"] = f"{verdict} {stop.describe()}"
    return files, entry


#: Sets of more than this many stimuli score linear predictivity's 2AFC against
#: :data:`PREDICTIVITY_FOILS` random foils per stimulus (``predictivity.two_afc(n_foils=...)``,
#: seeded with the report's seed; a note says so) instead of all s − 1 others: all pairs cost
#: O(s²·d) per set and direction (2.3 / 5.9 / 26.2 s at s = 5,000 / 10,000 / 20,000, d = 14; 33 s
#: at s = 25,000, d = 768; at 100,000 stimuli over an hour for 8 pairs × 7 sets × 2 directions).
#: At most this many (the default sets of runs up to 20,000 stimuli) keep every pair.
PREDICTIVITY_ALL_PAIRS_MAX_STIMULI = 5_000
#: Foils per stimulus above :data:`PREDICTIVITY_ALL_PAIRS_MAX_STIMULI` (s·F comparisons: ~5 s at
#: s = 25,000, d = 768, against ~33 s for all pairs). The sampled score is a mean of s·F
#: comparisons, each row's foils a uniform draw: with independent draws its standard deviation
#: about the all-pairs score is √(Σ pᵢ(1 − pᵢ)/F)/s ≤ 0.5/√(s·F) (pᵢ: row i's all-pairs score),
#: 2.2e-4 at most just above the limit. Rows share a draw in blocks of 8
#: (``predictivity._FOIL_BLOCK_ROWS``), which adds to it where targets have hubs, at most
#: √8-fold (6.3e-4 just above the limit); measured 0.8–1.6× the independent bound on hub-heavy
#: synthetic targets. The 2AFC of random sets of 10,000 spreads ~9e-4 (sd).
PREDICTIVITY_FOILS = 1_000


def predictivity_section(
    run: Run, out: Path, pairs: Sequence[analyses.Pair], sets: DispersionSets, *,
    n_random: int, n_folds: int, seed: int, tell: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Linear predictivity (paper 004; cross-validated ridge, both directions) on the low, high
    and the first ``n_random`` random sets (all of one size). ``tell`` (optional) hears how far
    it is at most every :data:`SET_PROGRESS_EVERY_S` (sets of 2,500 stimuli and 768-1,536
    features: about 20 s per pair and set). Sets of more than
    :data:`PREDICTIVITY_ALL_PAIRS_MAX_STIMULI` stimuli score 2AFC against
    :data:`PREDICTIVITY_FOILS` seeded random foils per stimulus (a note says so). A target
    model of one feature has no 2AFC (``predictivity.two_afc``: NaN; a note says so). Sets too
    small for ``n_folds``-fold cross-validation raise :class:`SectionSkipped`.

    Writes ``predictivity_sets`` (long: pair × set × direction × metric, ``draw`` numbering the
    random sets) and ``predictivity_summary`` (per pair × direction × metric: low, high, random
    mean and 2.5/97.5 percentiles, low − high). Returns (files, report.json entry with
    ``verdict``, ``two_afc_foils`` (foils per stimulus, None for all pairs) and ``notes``).
    """
    size = int(np.size(sets.low))
    if size < 2 * n_folds:
        raise SectionSkipped(
            f"sets of {size} stimuli are too few for {n_folds}-fold cross-validation "
            f"(at least {2 * n_folds}); use a larger --size"
        )
    foils = PREDICTIVITY_FOILS if size > PREDICTIVITY_ALL_PAIRS_MAX_STIMULI else None
    notes = []
    if foils is not None:
        notes.append(
            f"linear predictivity's 2AFC on sets of {size:,} stimuli compares each stimulus with "
            f"{foils:,} random others (seed {seed}; PREDICTIVITY_ALL_PAIRS_MAX_STIMULI "
            f"{PREDICTIVITY_ALL_PAIRS_MAX_STIMULI:,}), not all {size - 1:,}: all pairs cost "
            "O(s²) per set and direction; the sampled score's standard deviation about the "
            f"all-pairs score is at most {0.5 / math.sqrt(size * foils):.1e} for independent "
            "draws, and rows share a draw in blocks of 8, which can raise it where a few targets "
            "are easy foils for every row, at most to "
            f"{math.sqrt(8) * 0.5 / math.sqrt(size * foils):.1e}"
        )
    named = [("low", 0, sets.low), ("high", 0, sets.high)] + [
        ("random", i, rows) for i, rows in enumerate(sets.random[:n_random])
    ]
    frames = []
    step = _set_progress(tell or _silent, "linear predictivity", len(pairs) * len(named))
    for pair in pairs:
        vision = run.neighbours(pair.vision_model, pair.vision_layer).features
        language = run.neighbours(pair.language_model, pair.language_layer).features
        for done, (set_name, draw, rows) in enumerate(named, start=1):
            table = predictivity.predictivity_table(
                vision.rows(rows), language.rows(rows), n_folds=n_folds, seed=seed,
                n_foils=foils,
            )
            frames.append(table.assign(**pair._asdict(), set=set_name, draw=draw))
            step(f"{pair.vision_model} × {pair.language_model}", done, len(named))
    long = pd.concat(frames, ignore_index=True)
    keys = [*analyses.Pair._fields, "source", "target", "metric"]
    long = long[
        [*keys[:4], "set", "draw", *keys[4:], "value", "n_stimuli", "n_folds", "median_alpha"]
    ]
    undefined = long[(long["metric"] == "two_afc") & long["value"].isna()]
    if not undefined.empty:  # predictivity.two_afc: NaN for a one-feature target
        names = dict.fromkeys(
            f"{row[f'{row.target}_model']} ({row[f'{row.target}_layer']})"
            for _, row in undefined.iterrows()
        )
        notes.append(
            f"linear predictivity's 2AFC is not a number where {', '.join(names)} "
            f"{'is' if len(names) == 1 else 'are'} the target: it has one feature, and 2AFC "
            "compares a prediction with the targets by "
            "their correlation across features, which one feature does not have; its R² and "
            "correlation stand"
        )
    rows = []
    for key, group in long.groupby(keys, sort=False):
        by_set = {
            name: group[group["set"] == name]["value"].to_numpy()
            for name in ("low", "high", "random")
        }
        random_values = by_set["random"]
        lower, upper = (
            percentile_interval(random_values, 0.95) if random_values.size else (math.nan, math.nan)
        )
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "low_dispersion": float(by_set["low"][0]),
                "random_mean": float(random_values.mean()) if random_values.size else math.nan,
                "random_lower_95": lower,
                "random_upper_95": upper,
                "high_dispersion": float(by_set["high"][0]),
                "low_minus_high": float(by_set["low"][0] - by_set["high"][0]),
                "n_random": int(random_values.size),
                "set_size": size,
            }
        )
    summary = pd.DataFrame(rows)
    files = _write_table(long, out, "predictivity_sets")
    files += _write_table(summary, out, "predictivity_summary")
    parts = []
    # the table names the directions by role; the sentence by modality ("brain → language")
    words = dict(zip(("vision", "language"), analyses.pair_modalities(run, pairs), strict=True))
    for (source, target), group in summary.groupby(["source", "target"], sort=False):
        counts = ", ".join(
            f"{metric.replace('_', ' ')} {int((g['low_minus_high'] > 0).sum())}"
            + (f" ({nan} undefined)" if (nan := int(g["low_minus_high"].isna().sum())) else "")
            for metric, g in group.groupby("metric", sort=False)
        )
        parts.append(
            f"{words[source]} → {words[target]}: low > high in {counts} of {len(pairs)} pairs"
        )
    verdict = (
        f"Linear predictivity (ridge, {n_folds}-fold, {size} stimuli per "
        f"{sets.score}-dispersion set): " + "; ".join(parts) + "."
    )
    return files, {
        "summary": _records(summary), "verdict": verdict, "two_afc_foils": foils, "notes": notes,
    }


def _caption_pairs(
    run: Run, pairs: Sequence[analyses.Pair], embed: bool, weights: dict[str, str] | None = None
) -> tuple[dict[tuple[str, str], caption_embeddings.CaptionEmbeddings], list[str]]:
    """Per-caption embeddings of every language model × layer in ``pairs`` (cached, or embedded
    when ``embed``), and notes for those missing."""
    found, notes = {}, []
    if max(map(len, run.stimuli["captions"]), default=0) < 2:
        return found, [
            "many-to-many (one caption vs the mean of all captions) skipped: every stimulus has a "
            "single caption"
        ]
    for model, layer in dict.fromkeys((p.language_model, p.language_layer) for p in pairs):
        cached = caption_embeddings.cached_caption_embeddings(run, model, layer)
        if cached is None and not run.manifest.models[model].from_encoder:
            notes.append(
                f"many-to-many (one caption vs the mean of all captions) skipped for {model}: its "
                "features came from a file or arrays, one row per stimulus, and there is no "
                "encoder to embed each caption with"
            )
        elif cached is None and embed:
            try:
                cached = caption_embeddings.embed_captions(
                    run, model, [layer], weights=(weights or {}).get(model)
                )[layer]
            except (ValueError, OSError, ImportError) as error:
                notes.append(f"many-to-many: could not embed the captions with {model}: {error}")
        elif cached is None:
            notes.append(
                f"many-to-many (one caption vs the mean of all captions) skipped for {model}: the "
                "run stores one embedding per stimulus; pass --embed-captions to embed every "
                f"caption once with {model} (cached in the run folder)"
            )
        if cached is not None:
            found[(model, layer)] = cached
    return found, notes


#: Above this many stimuli the many-to-many caption comparison runs on a seeded random sample of
#: this many (``analyses.sweep_sample`` with the report's seed; said in a note): exact k-NN on
#: every stimulus costs O(n²·d) per score, ~200 scores per pair and metric (~80 s per pair and
#: metric at 1,000 stimuli on 2 cores, about 3 min at 4,000, hours at 100,000). The class
#: comparison likewise above this many classes: a seeded sample of this many classes, every
#: member of each (``many_to_many.class_averaging_effect(max_classes=...)``, the same seed).
MANY_TO_MANY_MAX_STIMULI = 1_000


def _check_half_samples(n: int, k: int, metrics: Sequence[str]) -> None:
    """:class:`SectionSkipped` where caption averaging over ``n`` images cannot run: fewer than
    ``many_to_many.MIN_UNITS`` images, or half-samples (⌊n/2⌋ images, the interval's) too small
    for k neighbours of a neighbour metric among ``metrics``."""
    if n < many_to_many.MIN_UNITS:
        raise SectionSkipped(
            f"caption averaging compares {n} images; it needs at least {many_to_many.MIN_UNITS}"
        )
    half = n // 2
    neighbour = [m for m in metrics if registry.metric(m).neighbour_metric]
    if neighbour and k > half - 1:
        raise SectionSkipped(
            f"its interval's half-samples of {half} images are too few for k = {k} neighbours "
            f"({', '.join(neighbour)}); use --k {max(1, half - 1)} or less for it"
        )


def many_to_many_section(
    run: Run, out: Path, pairs: Sequence[analyses.Pair], *, k: int, metrics: Sequence[str],
    n_resamples: int, embed: bool, seed: int, tell: Callable[[str], None] | None = None,
    weights: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """One caption per image vs the mean of all its captions (paper 004), and for labelled runs
    one image–text pair per class vs class means; the difference with its half-sample interval.

    Captions are embedded at each language model's layer in the pairs (:mod:`caption_embeddings`)
    and prepared as the run prepares that layer (clip at its threshold, unit norm): the
    one-caption side is then the run's own language features. Above
    :data:`MANY_TO_MANY_MAX_STIMULI` stimuli the caption comparison runs on a seeded random
    sample of that many (a note says so; ``n_units`` is the sample's size); class averaging takes
    every labelled stimulus, above that many classes those of a seeded sample of that many
    classes (a note says so). Stimuli without a label (``calibration.has_label``: None, NaN or
    an empty string) take no part in class averaging (a note says how many). Writes
    ``many_to_many``. Returns (files, report.json entry with ``verdict`` and ``notes``).
    ``tell`` (optional) hears how far the resamples are at most every
    :data:`SET_PROGRESS_EVERY_S` (minutes on the demo run).
    """
    captions, notes = _caption_pairs(run, pairs, embed, weights)
    labels = run.stimuli["label"].to_numpy() if "label" in run.stimuli.columns else None
    class_notes: list[str] = []  # said once, after the caption notes, if classes were compared
    if labels is not None:
        unlabelled = int(np.count_nonzero(~calibration.has_label(labels)))
        if unlabelled:
            class_notes.append(
                f"many-to-many class averaging leaves out the {unlabelled:,} of "
                f"{labels.size:,} stimuli without a label (None, NaN or an empty string): they "
                "share no class, and their mean would be no class's mean"
            )
    sample = analyses.sweep_sample(run.n_stimuli, max_stimuli=MANY_TO_MANY_MAX_STIMULI, seed=seed)
    if captions:  # what the run cannot have, said as a skip (any other error is a bug)
        _check_half_samples(sample.size, k, metrics)
    if captions and sample.size < run.n_stimuli:
        notes.append(
            f"many-to-many caption averaging on a random sample of {sample.size:,} of the "
            f"{run.n_stimuli:,} stimuli (seed {seed}; MANY_TO_MANY_MAX_STIMULI; exact k-NN on "
            "all of them would take hours): its one-caption and all-caption values compare with "
            "each other, not with full-set numbers at the same k"
        )
    # progress: resamples of every comparison; once class averaging is skipped (its labels do
    # not allow it: the same for every pair), only the class comparisons that ran count
    compared = sum((p.language_model, p.language_layer) in captions for p in pairs)
    class_runs = {"planned": 0 if labels is None else len(pairs) * len(metrics), "ran": 0,
                  "skipped": False}

    def total_resamples() -> int:
        ran, planned = class_runs["ran"], class_runs["planned"]
        return int(n_resamples) * (compared * len(metrics) + (
            ran if class_runs["skipped"] else planned
        ))

    step = _set_progress(tell or _silent, "many-to-many", total_resamples, unit="resamples")
    records = []
    for pair in pairs:
        vision = run.neighbours(pair.vision_model, pair.vision_layer).features
        language = run.neighbours(pair.language_model, pair.language_layer).features
        embedded = captions.get((pair.language_model, pair.language_layer))
        prepared_images = vision.rows(sample) if embedded is not None else None
        if embedded is not None:  # the captions of the sampled images, owners as sample rows
            kept = np.isin(embedded.owners, sample)
            caption_rows = np.asarray(embedded.features[kept], dtype=np.float64)
            owners = np.searchsorted(sample, embedded.owners[kept])
        for metric in metrics:
            options = {"k": k} if registry.metric(metric).neighbour_metric else {}

            def prepared(X, Y, metric=metric, options=options, language=language):
                # images already prepared; captions (one, or the mean of the raw embeddings of
                # all) prepared as the run prepares this language layer
                return registry.measure(metric, X, prepare_rows(Y, language.threshold), **options)

            def raw(X, Y, metric=metric, options=options, vision=vision, language=language):
                # class means of raw embeddings on both sides, prepared as the run prepares them
                return registry.measure(
                    metric, prepare_rows(X, vision.threshold), prepare_rows(Y, language.threshold),
                    **options,
                )

            names = f"{pair.vision_model} × {pair.language_model}, {metric}"
            effects = []
            if embedded is not None:
                images = prepared_images
                if registry.ORTHOGONAL in registry.metric(metric).invariances:
                    # exact for these metrics (they see the images only through inner products)
                    images = row_space_coordinates(prepared_images)
                effects.append(
                    many_to_many.caption_averaging_effect(
                        prepared, images, caption_rows, owners, method="half",
                        n_resamples=n_resamples, seed=seed,
                        progress=lambda done, total, stage=f"{names}, captions": step(
                            stage, done, total
                        ),
                    )
                )
            if labels is not None:
                try:  # the raw memory maps: only the compared classes' rows are read
                    effect = many_to_many.class_averaging_effect(
                        raw, vision.raw, language.raw, labels, method="half",
                        n_resamples=n_resamples, seed=seed, max_classes=MANY_TO_MANY_MAX_STIMULI,
                        progress=lambda done, total, stage=f"{names}, classes": step(
                            stage, done, total
                        ),
                    )
                except ValueError as error:
                    class_runs["skipped"] = True
                    note = f"many-to-many class averaging skipped: {error}"
                    if note not in notes:
                        notes.append(note)
                else:
                    class_runs["ran"] += 1
                    effects.append(effect)
                    if effect.sampled_from is not None and not any(
                        "class averaging on a random sample" in note for note in class_notes
                    ):
                        class_notes.append(
                            f"many-to-many class averaging on a random sample of "
                            f"{effect.n_units:,} of the {effect.sampled_from:,} classes (seed "
                            f"{seed}; MANY_TO_MANY_MAX_STIMULI; every member of each): each "
                            "score is exact k-NN over the classes, O(classes²), "
                            f"{2 * n_resamples + 2} scores per pair and metric; its one-pair and "
                            "class-mean values compare with each other"
                        )
            for effect in effects:
                records.append(
                    {
                        **pair._asdict(),
                        "metric": metric,
                        "comparison": effect.comparison,
                        "one": effect.one,
                        "averaged": effect.averaged,
                        "difference": effect.difference,
                        "lower": effect.lower,
                        "upper": effect.upper,
                        "n_units": effect.n_units,
                        "method": effect.method,
                        "n_resamples": effect.n_resamples,
                        "level": effect.level,
                        "k": int(k) if options else None,
                    }
                )
    if any(record["comparison"] == "classes" for record in records):
        notes += class_notes
    entry: dict[str, Any] = {"notes": notes}
    if not records:
        entry["verdict"] = None
        return [], entry
    table = pd.DataFrame(records)
    files = _write_table(table, out, "many_to_many")
    parts = []
    for (comparison, metric), group in table.groupby(["comparison", "metric"], sort=False):
        above = int((group["lower"] > 0).sum())
        below = int((group["upper"] < 0).sum())
        parts.append(
            f"{metric} {_range_text(group['difference'].tolist(), '{:+.3f}')} "
            f"({above} of {len(group)} pairs with the 95% interval above 0, {below} below)"
        )
    what = {
        "captions": "the mean of all captions instead of the first",
        "classes": "class means of images and texts instead of one pair per class",
    }
    comparisons = list(dict.fromkeys(table["comparison"]))
    verdict = (
        "Many-to-many (" + " / ".join(what[c] for c in comparisons) + "), averaged − one: "
        + "; ".join(parts) + "."
    )
    entry.update(
        {
            "verdict": verdict,
            "first_caption_difference": {
                f"{m} {layer}": caption_embeddings.first_caption_difference(run, m, layer)
                for m, layer in captions
            },
        }
    )
    return files, entry


def fixed_points_p_value(correct: int, n: int) -> float:
    """P(a uniformly random matching of n items gets at least ``correct`` right): the exact
    distribution of the fixed points of a random permutation, P(F = j) = (1/j!)·Σ_{i ≤ n−j}
    (−1)^i / i! (chance of blind matching; mean 1)."""
    n, correct = int(n), int(correct)
    if correct <= 0:
        return 1.0
    if correct > n:
        return 0.0
    inverse = np.cumprod(np.concatenate([[1.0], 1.0 / np.arange(1, n + 1)]))  # 1/i!, i = 0..n
    partial = np.cumsum(inverse * (-1.0) ** np.arange(n + 1))  # Σ_{i ≤ m} (−1)^i / i!
    j = np.arange(correct, n + 1)
    return float(min(1.0, max(0.0, np.sum(partial[n - j] * inverse[j]))))


def blind_matching_section(
    run: Run, out: Path, pairs: Sequence[analyses.Pair], sets: DispersionSets, *,
    repeats: int, n_random: int, n_seeds: int, seed: int,
) -> tuple[list[str], dict[str, Any]]:
    """Blind matching (paper 003: CKA-maximising seeded QAP) on the low and high sets (``repeats``
    seeds each) and on the first ``n_random`` random sets; accuracy against chance.

    Writes ``blind_matching`` (one row per run: pair, set, draw, accuracy, chance, n_correct,
    n_query, p-value of as many correct by chance, CKA of the true and found pairings) and
    ``blind_matching_summary`` (per pair × set: mean accuracy, chance, ratio, random interval).
    Sets above ``blind_matching.MAX_STIMULI`` are refused (:class:`SectionSkipped`: a note) before
    any k-means.
    """
    try:  # before image_seeds' k-means on the whole set
        check_matching_size(int(np.size(sets.low)))
    except ValueError as error:
        raise SectionSkipped(str(error)) from None
    named = [("low", r, sets.low) for r in range(repeats)]
    named += [("high", r, sets.high) for r in range(repeats)]
    named += [("random", i, rows) for i, rows in enumerate(sets.random[:n_random])]
    if not named:  # AnalysisOptions refuses this before the report starts
        raise ValueError("no set to match; pass repeats or n_random of at least 1")
    records = []
    known: dict[tuple[str, str, str, int], np.ndarray] = {}  # an image set's seeds, for all pairs
    for pair in pairs:
        vision = run.neighbours(pair.vision_model, pair.vision_layer).features
        language = run.neighbours(pair.language_model, pair.language_layer).features
        for set_name, draw, rows in named:
            draw_seed = seed + draw if set_name != "random" else seed
            images = vision.rows(rows)
            key = (pair.vision_model, pair.vision_layer, set_name, draw)
            if key not in known:
                known[key] = image_seeds(images, min(n_seeds, len(rows) - 3), seed=draw_seed)
            result = match_blind(images, language.rows(rows), seeds=known[key], seed=draw_seed)
            correct = int(result.correct.sum() - result.correct[result.seeds].sum())
            records.append(
                {
                    **pair._asdict(),
                    "set": set_name,
                    "draw": draw,
                    "set_size": len(rows),
                    "n_seeds": result.n_seeds,
                    "n_query": result.n_query,
                    "n_correct": correct,
                    "accuracy": result.accuracy,
                    "chance": result.chance,
                    "p_value_vs_chance": fixed_points_p_value(correct, result.n_query),
                    "cka_true": result.cka_true,
                    "cka_found": result.cka_found,
                }
            )
    table = pd.DataFrame(records)
    rows = []
    for key, group in table.groupby([*analyses.Pair._fields, "set"], sort=False):
        accuracy = group["accuracy"].to_numpy()
        lower, upper = (
            percentile_interval(accuracy, 0.95) if len(group) > 1 else (math.nan, math.nan)
        )
        rows.append(
            {
                **dict(zip([*analyses.Pair._fields, "set"], key, strict=True)),
                "n_runs": len(group),
                "accuracy_mean": float(accuracy.mean()),
                "accuracy_lower_95": lower,
                "accuracy_upper_95": upper,
                "chance": float(group["chance"].mean()),
                "accuracy_over_chance": float(accuracy.mean() / group["chance"].mean()),
                "n_runs_above_chance": int((group["p_value_vs_chance"] < 0.05).sum()),
            }
        )
    summary = pd.DataFrame(rows)
    files = _write_table(table, out, "blind_matching")
    files += _write_table(summary, out, "blind_matching_summary")
    means = summary.groupby("set", sort=False)["accuracy_mean"].mean()
    chance = float(summary["chance"].mean())
    low_above = int(
        (summary[summary["set"] == "low"]["accuracy_mean"].to_numpy()
         > summary[summary["set"] == "high"]["accuracy_mean"].to_numpy()).sum()
    )
    seeds = int(table["n_seeds"].max())
    verdict = (
        f"Blind matching (seeded QAP on CKA, {seeds} known pair{'' if seeds == 1 else 's'}, "
        f"{int(np.size(sets.low))} stimuli per set): accuracy low "
        f"{means.get('low', math.nan):.3f}, high {means.get('high', math.nan):.3f}"
        + (f", random {means['random']:.3f}" if "random" in means else "")
        + f" (mean over {len(pairs)} pairs; chance {chance:.3f}); low > high in {low_above} of "
        f"{len(pairs)} pairs."
    )
    return files, {"summary": _records(summary), "verdict": verdict}


def calibration_section(
    run: Run, out: Path, pairs: Sequence[analyses.Pair], sets: DispersionSets, *, k: int,
    metrics: Sequence[str], metric_options: dict[str, dict[str, Any]], n_shuffles: int,
    n_matched: int, seed: int, tell: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Calibrated scores (shuffled-pairing null) on the low and high sets, and matched random
    baselines (typicality in the vision models; and category where the run has labels: stimuli
    without a label, ``calibration.has_label``, are one group matched only among themselves, and
    a note says how many).

    Writes ``calibrated_scores`` (per set × metric × pair: observed, null mean and interval,
    calibrated, z, p), ``matched_baselines`` (per matching × metric × pair: low and high against
    their matched sets, the gap against the matched gap, ``survives``) and ``matched_balance``.
    The matched sets are the Alignment lab's (``calibration.matched_sets_by_cost``: nearest
    matching within ``calibration.NEAREST_MATCHING_PICKS`` picks, else typicality strata):
    where they were not drawn by nearest matching, kept apart, ``matched_on`` and the verdict
    say how (``analyses.matched_method_words``).
    Returns (files, report.json entry with the verdict). ``tell`` (optional) hears how far each
    part is at most every :data:`SET_PROGRESS_EVERY_S` (minutes on sets of thousands).
    """
    tell = tell or _silent
    indexes = analyses.indexes_for(run, pairs)
    calibrated = analyses.shuffled_pairing_calibration(
        indexes, pairs, {"low": sets.low, "high": sets.high}, k, metrics,
        metric_options=metric_options, n_shuffles=n_shuffles, seed=seed, on_error="nan",
        progress=lambda stage, done, total, step=_set_progress(
            tell, "shuffled pairings", 2 * (n_shuffles + 1), unit="pairings"
        ): step(f"{stage} set", done, total),
    )
    covariate = analyses.vision_typicality(run, k=analyses.typicality_k(run, k))
    matchings: list[tuple[str, np.ndarray | None]] = [("typicality", None)]
    notes = []
    if "label" in run.stimuli.columns:  # as the Alignment lab: only labels that can be matched on
        labels, why_not = calibration.matchable_labels(run.stimuli["label"])
        if labels is None:
            notes.append(f"matched baselines on typicality and category skipped: {why_not}")
        else:
            matchings.append(("typicality and category", labels))
    tables, balances = [], []
    for name, labels in matchings:
        try:
            step = _set_progress(tell, f"matched on {name}", 2 * n_matched)
            table, balance = analyses.matched_baselines(
                indexes, pairs, sets.low, sets.high, k, metrics, covariate=covariate,
                labels=labels, metric_options=metric_options, n_sets=n_matched, seed=seed,
                on_error="nan",
                progress=lambda done, total, step=step: step("random sets", done, total),
            )
        except ValueError as error:
            notes.append(f"matched baselines on {name} skipped: {error}")
            continue
        tables.append(table)
        balances.append(balance)
        unlabelled = 0 if labels is None else int(np.count_nonzero(~calibration.has_label(labels)))
        if unlabelled:  # said once the matching on category was made, never beside its skip
            notes.append(
                f"matched baselines on {name}: the {unlabelled:,} of {labels.size:,} stimuli "
                "without a label (None, NaN or an empty string) are one group, matched only "
                "among themselves on typicality, so each matched set has as many of them as its "
                "set (many-to-many class averaging leaves them out instead: there they would "
                "form a class)"
            )
    files = _write_table(calibrated, out, "calibrated_scores")
    if not tables:
        return files, {"matched": [], "notes": notes, "verdict": None}
    matched = pd.concat(tables, ignore_index=True)
    files += _write_table(matched, out, "matched_baselines")
    files += _write_table(pd.concat(balances, ignore_index=True), out, "matched_balance")
    cknna_calibrated = calibrated[calibrated["metric"] == "cknna"]
    by_set = cknna_calibrated.groupby("set", sort=False)["calibrated"].mean()
    size = int(np.size(sets.low))
    shown = cknna_shown(size)  # no CKNNA numbers in summary.txt for small sets, as its table
    sentences = [
        "Calibrated against shuffled pairings within each set, CKNNA (observed − null mean, "
        f"mean over {len(pairs)} pairs) is {by_set.get('low', math.nan):.3f} on the low set and "
        f"{by_set.get('high', math.nan):.3f} on the high set."
        if shown else
        "Calibrated against shuffled pairings within each set: no CKNNA numbers for sets of "
        f"{size} stimuli (fewer than {MIN_CKNNA_SET_SIZE}; calibrated_scores keeps them)."
    ]
    for matched_on, group in matched.groupby("matched_on", sort=False):
        cknna_rows = group[group["metric"] == "cknna"]
        if not shown:  # no count from the CKNNA numbers this report hides
            group = group[group["metric"] != "cknna"]
        balance = pd.concat(balances)
        balance = balance[balance["matched_on"] == matched_on]
        if not balance["verdict_possible"].all():  # too few distinct matched sets
            sentences.append(
                _no_matched_verdict(matched_on, balance, run.n_stimuli, size, n_matched)
            )
            continue
        shift = balance["standardised_difference"].abs().max()
        # no balance threshold decides whether the matching worked: the imbalance it left is
        # said beside the verdict, as what the verdict holds under
        others = (
            f"for {int(group['survives'].sum())} of {len(group)} pair × metric "
            f"combinations over {group['metric'].nunique()} metrics"
            + (f" ({undefined} with no p-value: a value on some set is not a number)"
               if (undefined := int(group["p_value_gap"].isna().sum())) else "")
        )
        if shown:
            verdict = (
                f"low > high survives for {int(cknna_rows['survives'].sum())} of "
                f"{len(cknna_rows)} pairs by CKNNA (matched-gap p < 0.05; CKNNA gap "
                f"{cknna_rows['low_minus_high'].mean():+.3f} observed vs "
                f"{cknna_rows['matched_gap_mean'].mean():+.3f} between the matched sets, mean "
                f"over pairs) and {others}"
            )
        else:
            verdict = f"CKNNA: {_no_cknna_verdict(size)}" + (
                "" if group.empty else
                f"; besides CKNNA, low > high survives {others} (matched-gap p < 0.05)"
            )
        sentences.append(
            f"Against random sets matched on {matched_on} ({n_matched} per set), {verdict}, "
            f"against matched sets whose mean typicality still lies up to {shift:.2f} sd "
            "from the chosen set's (largest covariate imbalance; 0 is an exact match, and the "
            "larger it is, the more of the gap typicality may still explain)."
        )
    return files, {
        "matched": _records(matched),
        "notes": notes,
        "verdict": " ".join(sentences),
    }


def _no_matched_verdict(
    matched_on: str, balance: pd.DataFrame, n_stimuli: int, size: int, n_matched: int
) -> str:
    """The calibration sentence in place of a verdict where a set's matched random sets are too
    few distinct sets to be a baseline (``analyses.matched_baselines``' ``verdict_possible``,
    ``calibration.baseline_freedom``): how many distinct sets, why and the fix: more matched sets
    (``--n-shuffles``) where fewer were drawn than a verdict needs, else more stimuli or smaller
    sets (the run's stimuli are too few to match the sets freely)."""
    needed = calibration.distinct_sets_needed()
    why = (
        f"fewer than the {needed} distinct sets a one-sided p < 0.05 needs (with D distinct "
        "matched sets no p-value is below 1/(D + 1))"
    )
    if n_matched < needed:
        return (
            f"Against random sets matched on {matched_on}: no verdict on low > high: "
            f"{n_matched} matched sets per set are {why}; use --n-shuffles {needed} or more "
            "(matched_baselines keeps the numbers)."
        )
    short = balance[~balance["verdict_possible"].astype(bool)]
    # matched_on names the method where it is not nearest matching, kept apart
    # (analyses.matched_method_words: "..., not kept apart from the low set's")
    apart = "not kept apart" not in matched_on
    counts = " and ".join(
        f"{int(row.distinct_matched_sets)} for the {row.set} set" for row in short.itertuples()
    )
    overlap = 100 * float(short["matched_overlap"].max())
    return (
        f"Against random sets matched on {matched_on}: no verdict on low > high. Matched "
        f"sets of {size:,} stimuli drawn from a run of {n_stimuli:,}"
        + (" (each high match apart from its low match)" if apart else "")
        + f": the {n_matched} drawn are few distinct sets "
        f"({counts}; two draws share up to {overlap:.0f}% of their stimuli), {why}: any gap "
        "above so few sets would \"survive\". Use a run with more stimuli or a smaller --size "
        "(matched_baselines keeps the numbers)."
    )


def paper_sections(
    run: Run,
    out: Path,
    pairs: Sequence[analyses.Pair],
    long_table: pd.DataFrame,
    *,
    options: AnalysisOptions,
    scores: Sequence[str],
    size: int,
    k: int,
    n_random: int,
    n_permutations: int,
    seed: int,
    metrics: Sequence[str],
    metric_options: dict[str, dict[str, Any]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The issue-14 sections, in order; each entry holds its ``files``, ``verdict`` (a sentence
    or None), ``notes`` and its numbers (see each ``*_section``). The sections after the metric
    suite use the sets of the first score (``scores[0]``). ``progress`` is called with each
    section's title (:data:`SECTION_TITLES`) as it starts."""
    tell = progress or _silent
    sets = dispersion_sets(run, scores[0], size, n_random, seed)
    chosen = options.calibration_metric_names(metrics)
    sections: dict[str, Callable[[], tuple[list[str], dict[str, Any]]]] = {
        "per_stimulus": lambda: per_stimulus_section(
            run, out, pairs, k=k, score=sets.score, n_permutations=n_permutations, seed=seed
        ),
        "predictivity": lambda: predictivity_section(
            run, out, pairs, sets, n_random=options.predictivity_random,
            n_folds=options.predictivity_folds, seed=seed, tell=tell,
        ),
        "many_to_many": lambda: many_to_many_section(
            run, out, pairs, k=k, metrics=options.many_to_many_metrics,
            n_resamples=options.many_to_many_resamples, embed=options.embed_captions, seed=seed,
            tell=tell, weights=options.caption_weights,
        ),
        "blind_matching": lambda: blind_matching_section(
            run, out, pairs, sets, repeats=options.blind_matching_repeats,
            n_random=options.blind_matching_random, n_seeds=options.blind_matching_seeds,
            seed=seed,
        ),
        "matched_baselines": lambda: calibration_section(
            run, out, pairs, sets, k=k, metrics=chosen,
            metric_options={
                name: value for name, value in metric_options.items() if name in chosen
            },
            n_shuffles=options.n_shuffles, n_matched=options.n_matched, seed=seed, tell=tell,
        ),
        "gpa_stability": lambda: gpa_stability_section(
            run, out, n_starts=options.gpa_starts, seed=seed
        ),
    }
    results = {"metric_suite": metric_suite_section(out, long_table)}
    listed = [entry for entry in SECTIONS if entry.name in sections]
    assert [entry.name for entry in listed] == list(sections), "SECTIONS lists every section"
    for entry in listed:
        name, section = entry.name, sections[entry.name]
        if entry.skip in options.skip:  # said in the notes, as the universal space's skip
            results[name] = ([], {"verdict": None, "notes": [skipped_note(entry.skip)]})
            continue
        tell(entry.title)
        try:
            results[name] = section()
        except SectionSkipped as error:  # e.g. sets too small for it: the rest of the report stands
            results[name] = ([], {"verdict": None, "notes": [f"{name} skipped: {error}"]})
        except ValueError as error:  # not a condition it expects: a bug, said as one
            results[name] = ([], _section_failed(name, error))
    return {name: {**entry, "files": files} for name, (files, entry) in results.items()}


#: the steps both report paths (with and without language models) announce
STEP_TITLES = {
    "partners": "the models outside GPA (Fig. 2 and S1)",
    "leave_one_model_out": "leaving one model out (Fig. S2)",
    "properties": "what predicts dispersion",
}


def _silent(step: str) -> None:
    """A progress callback that says nothing."""


def _parser(prog: str = "python -m convergence_core") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} report",
        description=(
            "Reproduce the paper's analyses (Fig. 2, S1, S2, layer sweep), every alignment "
            "metric on its sets and the neighbouring papers' analyses on a precomputed run."
        ),
    )
    parser.add_argument("run", nargs="?", help="run folder, or a run name under the cache's runs/")
    parser.add_argument(
        "--cache",
        help="cache folder whose runs/ hold the named run (default $CONVERGENCE_CACHE, else cache/ "
        "in a checkout or ~/.cache/convergence-explorer when installed), as precompute's --cache",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="use the run that `precompute --preset NAME` made (e.g. demo: cache/runs/demo)",
    )
    parser.add_argument("--out", required=True, help="folder for tables, figures and the summary")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="stimuli per low/high/random set (default: a quarter of the stimuli)",
    )
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help=f"CKNNA neighbours (default {DEFAULT_K}; on a run too small for it, lowered below the "
        "sets as the Alignment lab lowers it, with a note)",
    )
    parser.add_argument(
        "--scores",
        nargs="+",
        choices=list(SCORES),
        default=list(SCORES),
        help="dispersion scores that select the sets (default: both)",
    )
    parser.add_argument("--n-random", type=int, default=200, help="random sets drawn (default 200)")
    parser.add_argument(
        "--n-permutations",
        type=int,
        default=analyses.DEFAULT_N_PERMUTATIONS,
        help=f"label shuffles per permutation test (default {analyses.DEFAULT_N_PERMUTATIONS})",
    )
    parser.add_argument(
        "--q", type=float, default=0.25, help="fraction dropped in Fig. S1 (default 0.25)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random sets and shuffles (default 0)"
    )
    parser.add_argument(
        "--universal-folds",
        type=int,
        default=5,
        help="folds of the universal-space retrieval (default 5)",
    )
    parser.add_argument(
        "--property-permutations",
        type=int,
        default=dispersion_predictors.PROPERTY_TEST_PERMUTATIONS,
        help="label shuffles per property test (default "
        f"{dispersion_predictors.PROPERTY_TEST_PERMUTATIONS})",
    )
    parser.add_argument(
        "--property-shuffles",
        type=int,
        default=dispersion_predictors.DEFAULT_N_SHUFFLES,
        help="shuffled-target refits per dispersion model (default "
        f"{dispersion_predictors.DEFAULT_N_SHUFFLES})",
    )
    defaults = AnalysisOptions()
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=metric_names(),
        default=None,
        help="registry metrics measured on the Fig. 2 sets (default: all; CKNNA always)",
    )
    parser.add_argument(
        "--metric-permutations",
        type=int,
        default=defaults.metric_permutations,
        help="label shuffles of the low-vs-high test of every metric but CKNNA (default "
        f"{defaults.metric_permutations}; 0: none)",
    )
    parser.add_argument(
        "--n-shuffles",
        type=int,
        default=defaults.n_shuffles,
        help=f"shuffled pairings and matched random sets per set (default {defaults.n_shuffles})",
    )
    parser.add_argument(
        "--predictivity-random",
        type=int,
        default=defaults.predictivity_random,
        help="random sets scored by linear predictivity besides low and high (default "
        f"{defaults.predictivity_random})",
    )
    parser.add_argument(
        "--blind-matching-random",
        type=int,
        default=defaults.blind_matching_random,
        help=f"random sets matched blind (default {defaults.blind_matching_random})",
    )
    parser.add_argument(
        "--embed-captions",
        action="store_true",
        help="load each language model once to embed every caption of every stimulus (cached in "
        "the run folder) for the many-to-many section",
    )
    parser.add_argument(
        "--weights",
        action="append",
        metavar="MODEL=PATH",
        help="with --embed-captions: local weights of a language model (as precompute's "
        "--weights); without it, weights the run records are read only from inside the cache's "
        "model folder or the data folder; repeatable",
    )
    parser.add_argument(
        "--gpa-starts",
        type=int,
        default=defaults.gpa_starts,
        help="random starts of the GPA stability section (how well GPA pins each stimulus's "
        f"dispersion; default {defaults.gpa_starts})",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        choices=OPTIONAL_SECTIONS,
        default=[],
        help="sections to leave out",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines on stderr (each section as it starts, with the time so far)",
    )
    return parser


#: Above this set size the Fig. 2 progress line says that the feature metrics take long (on a
#: 10,000-stimulus run, sets of 2,500 and 768-1,536 features, the section ran over 6 minutes)
FEATURE_METRIC_HINT_SIZE = 1_000


def _fig2_step(metrics: Sequence[str], n_scores: int, size: int) -> str:
    """The progress line of Fig. 2's section; on large sets it says that the feature metrics
    take long and how to leave them out."""
    slow = [name for name in metrics if not registry.metric(name).neighbour_metric]
    line = f"low, high and random sets: {len(metrics)} metrics × {n_scores} scores (Fig. 2)"
    if slow and size > FEATURE_METRIC_HINT_SIZE:
        line += (
            f"; {', '.join(slow)} cost O(set size × features²) per set: on sets of {size:,} "
            "this can take many minutes (--metrics cknna for CKNNA alone)"
        )
    return line


#: Seconds between two progress lines inside a long section (a line per set would flood)
SET_PROGRESS_EVERY_S = 20.0


def _set_progress(
    tell: Callable[[str], None],
    section: str,
    total_sets: int | Callable[[], int] | None = None,
    every_s: float | None = None,
    unit: str = "sets",
) -> Callable[[str, int, int], None]:
    """A ``progress(stage, done, total)`` callback (e.g. for
    :func:`analyses.dispersion_set_alignment`) that tells ``<section>: <stage>, <done> of <total>
    <unit>`` at most every ``every_s`` seconds (default :data:`SET_PROGRESS_EVERY_S`), so a
    section that runs for minutes says how far it is and a short one stays quiet. With
    ``total_sets`` (every stage's items together) it adds how many are done in all (when there
    are several stages) and the time left at the rate since the first item was done (the first
    carries the section's set-up: reading the features, the neighbour metrics); a callable
    ``total_sets`` is asked at each line (a section that learns on the way that it skips a
    part). Items are counted from ``done``, so a stage that finishes several at once counts
    them all."""
    every = SET_PROGRESS_EVERY_S if every_s is None else every_s
    last = [time.perf_counter()]
    first: list[float] = []  # the time of the first call and the items done by then
    finished = [0]
    done_in: dict[str, int] = {}  # items done in each stage so far

    def step(stage: str, done: int, total: int) -> None:
        before = done_in.get(stage, 0)
        finished[0] += done - before if done > before else done  # a stage run again starts at 0
        done_in[stage] = done
        now = time.perf_counter()
        first[:] = first or [now, finished[0]]
        if now - last[0] < every:
            return
        last[0] = now
        parts = [f"{section}: {stage}, {done:,} of {total:,} {unit}"]
        in_all = total_sets() if callable(total_sets) else total_sets
        if in_all is not None and in_all >= finished[0]:
            if in_all != total:
                parts.append(f"{finished[0]:,} of {in_all:,} in all")
            if finished[0] > first[1]:
                rate = (now - first[0]) / (finished[0] - first[1])
                parts.append(f"about {_duration(rate * (in_all - finished[0]))} left")
        tell("; ".join(parts))

    return step


def _duration(seconds: float) -> str:
    """``40 s`` below 90 seconds, else ``12 min``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _fig2_feature_sets(
    metrics: Sequence[str], n_scores: int, n_random: int, metric_permutations: int
) -> int:
    """How many sets Fig. 2's section measures feature metrics on: the random sets, then per
    score the low and high set and both halves of each label shuffle of the metrics other than
    CKNNA (:func:`analyses.dispersion_set_alignment`)."""
    shuffled = metric_permutations if any(name != "cknna" for name in metrics) else 0
    return n_random + n_scores * (2 + 2 * shuffled)


def _progress_lines(stream: Any) -> Callable[[str], None]:
    """A progress callback that prints ``  12.3 s  <section>`` lines (time since it was made)."""
    started = time.perf_counter()

    def tell(step: str) -> None:
        print(f"  {time.perf_counter() - started:6.1f} s  {step}", file=stream, flush=True)

    return tell


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders (deepest first) that the failed report created and left empty, so a
    report that stopped on bad input leaves no empty ``--out`` behind."""
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder; anything written stays
        except OSError:
            return


def _weights_flag(
    values: Sequence[str] | None, run: Run, embed: bool
) -> dict[str, str] | None:
    """``--weights MODEL=PATH`` (repeatable) as ``{model: path}``, each a language model of
    ``run``; refused without ``--embed-captions``, the only step that loads a model."""
    weights = model_value_pairs(values, "--weights")
    if weights and not embed:
        raise ValueError(
            "--weights gives the weights to embed captions with, and only --embed-captions "
            "embeds them; add --embed-captions, or leave --weights out"
        )
    unknown = [model for model in weights if model not in run.language_models]
    if unknown:
        raise ValueError(
            f"--weights names {unknown}, not among run {run.name!r}'s language models "
            f"{run.language_models}; spell it as the model is listed (--weights MODEL=PATH)"
        )
    return weights or None


def main(argv: list[str] | None = None, prog: str = "python -m convergence_core") -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input). ``prog``: how the user
    called the program (``convergence`` for the installed console script), which the help and
    the messages name."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.run is None and args.preset is None:
        parser.error(f"give a run (folder or name; `{prog} runs` lists them) or --preset NAME")
    if args.run is not None and args.preset is not None:
        parser.error("give either a run (folder or name) or --preset NAME, not both")
    new_folders = _missing_folders(Path(args.out))  # removed again if the report fails empty
    # --cache: runs named by name are looked up there, and what the report caches (embedded
    # captions' models) goes there, while it runs (settings.cache_root_given restores it)
    cache_given = contextlib.ExitStack()
    try:
        if args.cache is not None:
            from .settings import cache_folder, cache_root_given

            cache_given.enter_context(cache_root_given(cache_folder(args.cache).resolve()))
        check_out_folder(args.out)  # before any analysis: a bad --out fails in a second
        if args.preset:
            name = preset_config(args.preset)["run_name"]
            try:
                run = load_run(name)
            except FileNotFoundError as missing:
                raise FileNotFoundError(
                    f"the {args.preset} run {name!r} is not cached yet; make it with "
                    f"`{prog} precompute --preset {args.preset}` ({missing})"
                ) from missing
        else:
            run = load_run(args.run)
        tell = None if args.quiet else _progress_lines(sys.stderr)
        report = write_report(
            run,
            args.out,
            size=args.size,
            k=args.k,
            scores=args.scores,
            n_random=args.n_random,
            n_permutations=args.n_permutations,
            q=args.q,
            seed=args.seed,
            universal_folds=args.universal_folds,
            property_permutations=args.property_permutations,
            property_shuffles=args.property_shuffles,
            options=AnalysisOptions(
                metrics=None if args.metrics is None else tuple(args.metrics),
                metric_permutations=args.metric_permutations,
                n_shuffles=args.n_shuffles,
                n_matched=args.n_shuffles,
                predictivity_random=args.predictivity_random,
                blind_matching_random=args.blind_matching_random,
                embed_captions=args.embed_captions,
                caption_weights=_weights_flag(args.weights, run, args.embed_captions),
                gpa_starts=args.gpa_starts,
                skip=tuple(args.skip),
            ),
            progress=tell,
        )
        if tell is not None:
            tell("done")
    except (ValueError, FileNotFoundError) as error:
        _remove_empty(new_folders)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a page of frames says less than this
        print(
            f"\ninterrupted: the files in {args.out} so far are whole (each is written to a "
            "temporary name, then renamed), but the report is not complete; rerun it to finish",
            file=sys.stderr,
        )
        return 130
    except OSError as error:  # e.g. no permission to write to --out, or to read the run
        _remove_empty(new_folders)
        print(f"error: {_os_error_text(error, Path(args.out))}", file=sys.stderr)
        return 2
    finally:
        cache_given.close()
    out = Path(args.out)
    if report["best_language_layers"]:
        print(
            f"Run {report['run']['name']!r}: {report['run']['n_stimuli']} stimuli; "
            f"set size {report['parameters']['set_size']}, k = {report['parameters']['k']}; "
            f"language layers used: {report['best_language_layers']}"
        )
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    print(summary, end="")
    headline = report["universal_space"].get("headline")
    if headline and headline not in summary:  # summary.txt carries it (reports since 2026-12)
        print(headline)
    for note in report["notes"]:
        if note not in summary:  # a note summary.txt carries (two GPA models) is printed once
            print(f"note: {note}")
    print(f"wrote {len(report['files'])} files to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
