"""`python -m convergence_core report <run> --out report/`: the paper's analyses on one run.

Writes to ``--out``: every analysis table as CSV and JSON (records; NaN as null), the PNG figures
(Fig. 2 per dispersion score, Fig. S1, Fig. S2, the layer-sweep heat map, what predicts
dispersion per score when the run has a property table), ``summary.csv`` /
``summary.json`` / ``summary.txt`` (per pair: low, random mean [95% interval], high, low/high
ratio, permutation p) and ``report.json`` (parameters, verdicts, file list). Prints the summary
table and one verdict line per dispersion score, computed from the numbers.

The universal-space section (:func:`universal_space_section`; every model of the run at its
default layer) adds ``universal_*`` tables and figures: residuals per model and stimulus,
cross-modal dispersion and its relation to vision dispersion, and held-out image-text retrieval
(k-fold) against chance and the ridge baseline, with one printed headline line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import analyses, dispersion_predictors, figures, retrieval, universal
from .alignment import cknna_bound_note
from .cache import write_bytes, write_json
from .presets import PRESETS, preset_config
from .run import Run, load_run
from .validation import MIN_CKNNA_SET_SIZE

#: Columns of the summary table, in print order.
SUMMARY_COLUMNS = [
    "score",
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


def default_set_size(n_stimuli: int, k: int) -> int:
    """A quarter of the stimuli (the paper used sets of a few hundred of 1,024), at least k + 1."""
    return max(n_stimuli // 4, k + 1)


def _write_table(frame: pd.DataFrame, out: Path, stem: str) -> list[str]:
    csv_path = write_bytes(out / f"{stem}.csv", frame.to_csv(index=False).encode("utf-8"))
    json_text = frame.to_json(orient="records", indent=2, force_ascii=False)
    json_path = write_bytes(out / f"{stem}.json", (json_text + "\n").encode("utf-8"))
    return [csv_path.name, json_path.name]


def summary_table(set_tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Summary rows (one per score × pair) from :func:`analyses.dispersion_set_alignment` tables."""
    return pd.concat([table[SUMMARY_COLUMNS] for table in set_tables], ignore_index=True)


def format_summary(summary: pd.DataFrame, set_size: int | None = None) -> str:
    """Fixed-width text of the summary: low, random mean [95% interval], high, ratio, p.

    With ``set_size`` below ``validation.MIN_CKNNA_SET_SIZE`` the CKNNA columns show "—" (too
    few stimuli for a CKNNA worth reading; the CSV/JSON tables keep the values).
    """
    if set_size is not None and set_size < MIN_CKNNA_SET_SIZE:
        summary = summary.copy()
        for column in SUMMARY_COLUMNS:
            if column.startswith("cknna_") or column == "low_high_ratio":
                summary[column] = float("nan")
    dash = "—"

    def number(value: float, spec: str = "{:.4f}") -> str:
        return dash if pd.isna(value) else spec.format(value)

    shown = pd.DataFrame(
        {
            "score": summary["score"],
            "vision": summary["vision_model"],
            "language (layer)": [
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
    set_tables: Sequence[pd.DataFrame], dropped: pd.DataFrame, sweep: pd.DataFrame, n: int
) -> list[tuple[str, float, int, int]]:
    """``(what, CKNNA, set size, k)`` of every CKNNA the report writes (for the bound note)."""
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
    for r in sweep.to_dict("records"):
        what = f"full set, {r['vision_model']} × {r['language_model']} {r['language_layer']}"
        rows.append((what, r["cknna"], n, int(r["k"])))
    return rows
def property_summary(analysis: Any, top: int = 5) -> dict[str, Any]:
    """Per score: the ``top`` ranked properties (property, test, effect_name, effect, q_value,
    p_value, n_stimuli) and, per model, the held-out R² with its shuffled-target baseline."""
    summary: dict[str, Any] = {}
    for score in analysis.parameters["scores"]:
        tests = analysis.tests[analysis.tests["score"] == score].sort_values("rank").head(top)
        fit = analysis.fit[analysis.fit["score"] == score]
        wide = fit.pivot_table(index="model", columns="metric", values="value", sort=False)
        summary[score] = {
            "top_properties": [
                {
                    key: (value.item() if hasattr(value, "item") else value)
                    for key, value in row.items()
                }
                for row in tests[
                    ["property", "test", "effect_name", "effect", "q_value", "p_value", "n_stimuli"]
                ].to_dict("records")
            ],
            "models": {
                str(model): {
                    "r2_held_out": float(row["r2_held_out"]),
                    "r2_shuffled_mean": float(row["r2_shuffled_mean"]),
                    "r2_shuffled_upper_95": float(row["r2_shuffled_upper_95"]),
                    "p_value_vs_shuffled": float(row["p_value_vs_shuffled"]),
                }
                for model, row in wide.iterrows()
            },
        }
    return summary


def format_property_summary(summary: dict[str, Any]) -> str:
    """Text of :func:`property_summary`: per score the top properties and the models' fit."""
    lines = []
    for score, part in summary.items():
        lines.append(f"\nWhat predicts dispersion ({score}):")
        for row in part["top_properties"]:
            symbol = "rho" if row["effect_name"] == "spearman_rho" else "eps2"
            lines.append(
                f"  {row['property']}: {symbol} = {row['effect']:+.3f}, q = {row['q_value']:.2g}"
                f" (n = {row['n_stimuli']})"
            )
        for model, fit in part["models"].items():
            lines.append(
                f"  {model}: held-out R2 = {fit['r2_held_out']:.3f} (shuffled targets: mean "
                f"{fit['r2_shuffled_mean']:.3f}, 95th percentile {fit['r2_shuffled_upper_95']:.3f})"
            )
    return "\n".join(lines) + "\n" if lines else ""


def write_report(
    run: Run,
    out: str | os.PathLike[str],
    *,
    size: int | None = None,
    k: int = 10,
    scores: Sequence[str] = ("mean", "pc1"),
    n_random: int = 200,
    n_permutations: int = analyses.DEFAULT_N_PERMUTATIONS,
    q: float = 0.25,
    seed: int = 0,
    universal_folds: int = 5,
    property_permutations: int = dispersion_predictors.DEFAULT_N_PERMUTATIONS,
    property_shuffles: int = dispersion_predictors.DEFAULT_N_SHUFFLES,
) -> dict[str, Any]:
    """Run every analysis on ``run`` and write tables, figures and the summary to ``out``.

    Returns the content of ``report.json``: ``run``, ``parameters``, ``best_language_layers``,
    ``verdicts`` (score -> sentence), ``paired_tests``, ``universal_space`` (see
    :func:`universal_space_section`), ``properties`` (what predicts dispersion: top properties
    and held-out R² per score; None without a property table), ``notes`` and ``files``.
    """
    out = check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    n = int(run.gpa.residuals.shape[0])
    size = default_set_size(n, k) if size is None else size
    files: list[str] = []
    notes: list[str] = []

    sweep = analyses.layer_sweep(run, k=k)
    best = analyses.best_language_layers(run, k=k, sweep=sweep)
    files += _write_table(sweep, out, "layer_sweep")
    files += _write_table(best, out, "best_language_layers")
    files.append(figures.layer_sweep_figure(sweep, out / "layer_sweep.png").name)

    set_tables, paired, verdicts = [], [], {}
    for score in scores:
        table = analyses.dispersion_set_alignment(
            run,
            size=size,
            k=k,
            score=score,
            n_random=n_random,
            seed=seed,
            n_permutations=n_permutations,
            best_layers=best,
        )
        set_tables.append(table)
        files += _write_table(table, out, f"dispersion_sets_{score}")
        files.append(
            figures.dispersion_sets_figure(table, out / f"fig2_dispersion_sets_{score}.png").name
        )
        paired.append(analyses.paired_set_tests(table).assign(score=score))
        verdicts[score] = analyses.effect_verdict(table)
    paired_tests = pd.concat(paired, ignore_index=True)
    files += _write_table(paired_tests, out, "paired_tests")

    dropped = analyses.drop_fraction_alignment(run, q=q, k=k, best_layers=best)
    files += _write_table(dropped, out, "drop_fraction")
    files.append(figures.drop_fraction_figure(dropped, out / "figS1_drop_fraction.png").name)

    if len(run.gpa.models) >= 3:
        points = analyses.leave_one_model_out(run)
        statistics = analyses.leave_one_model_out_statistics(points)
        files += _write_table(points, out, "leave_one_model_out_points")
        files += _write_table(statistics, out, "leave_one_model_out_statistics")
        files.append(
            figures.leave_one_out_figure(
                points, statistics, out / "figS2_leave_one_model_out.png"
            ).name
        )
    else:
        notes.append(
            f"leave-one-model-out skipped: it needs at least 3 vision models, the run has "
            f"{len(run.gpa.models)}"
        )

    universal_files, universal_space = universal_space_section(
        run, out, n_folds=universal_folds, seed=seed, n_permutations=n_permutations
    )
    files += universal_files
    if universal_space.get("note"):
        notes.append(universal_space["note"])

    properties, property_text = None, ""
    if run.properties is None:
        notes.append(
            "stimulus properties skipped: the run has no property table; rerun the precompute "
            "command that made it to add one"
        )
    else:
        analysis = dispersion_predictors.analyse_properties(
            run.properties,
            run.dispersion,
            scores=scores,
            n_permutations=property_permutations,
            n_shuffles=property_shuffles,
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
        property_text = format_property_summary(properties)

    if size < MIN_CKNNA_SET_SIZE:
        notes.append(
            f"sets of {size} stimuli are fewer than {MIN_CKNNA_SET_SIZE}: summary.txt shows no "
            "CKNNA numbers for them (too noisy to read; values above 1 are common), the tables "
            "keep the values; use --size of at least "
            f"{MIN_CKNNA_SET_SIZE}"
        )
    bound = cknna_bound_note(_cknna_values(set_tables, dropped, sweep, n))
    if bound is not None:
        notes.append(bound)
    summary = summary_table(set_tables)
    files += _write_table(summary, out, "summary")
    text = format_summary(summary, size) + "\n\n" + "\n".join(verdicts.values()) + "\n"
    text += property_text
    if bound is not None:
        text += f"\nNote: {bound}\n"
    files.append(write_bytes(out / "summary.txt", text.encode("utf-8")).name)

    report = {
        "run": {"name": run.name, "path": str(run.path), "n_stimuli": n},
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
        },
        "best_language_layers": dict(
            zip(best["language_model"], best["language_layer"], strict=True)
        ),
        "verdicts": verdicts,
        "properties": properties,
        "paired_tests": paired_tests.astype(object)
        .where(paired_tests.notna(), None)
        .to_dict("records"),
        "universal_space": universal_space,
        "notes": notes,
        "files": sorted([*files, "report.json"]),
    }
    write_json(out / "report.json", report)
    return report


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
    """A table cell as plain JSON: numpy scalars unwrapped, NaN as null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def universal_space_section(
    run: Run, out: Path, *, n_folds: int = 5, seed: int = 0, n_permutations: int = 1000
) -> tuple[list[str], dict[str, Any]]:
    """The universal-space tables and figures of every model of ``run`` (default layers).

    Writes ``universal_residuals``, ``universal_cross_modal_dispersion``,
    ``universal_dispersion_relation``, ``universal_retrieval`` (per fold),
    ``universal_retrieval_summary``, ``universal_retrieval_ranks``, ``universal_ridge_alphas``,
    ``universal_retrieval_paired_test`` (McNemar, recall@1, universal vs ridge) (CSV + JSON) and ``universal_cross_modal_dispersion.png``, ``universal_retrieval.png``.
    Returns (file names, the ``universal_space`` entry of report.json: members, relation and the
    retrieval headline per direction; ``note`` instead when the run lacks a modality).
    """
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
    result = retrieval.run_retrieval(run, n_folds=n_folds, seed=seed)
    summary = result.summary()
    files += _write_table(result.table, out, "universal_retrieval")
    files += _write_table(summary, out, "universal_retrieval_summary")
    files += _write_table(result.ranks, out, "universal_retrieval_ranks")
    files += _write_table(result.baseline, out, "universal_ridge_alphas")
    paired = retrieval.paired_recall_test(result.ranks, k=1)
    files += _write_table(paired, out, "universal_retrieval_paired_test")
    files.append(figures.retrieval_figure(summary, out / "universal_retrieval.png").name)
    relation = analysis.relation.iloc[0].to_dict()
    entry = {
        "members": [m._asdict() for m in members],
        "relation": {key: _json_value(value) for key, value in relation.items()},
        "n_folds": n_folds,
        "n_gallery_mean": float(
            summary.loc[summary["subset"] == "all", "n_gallery_mean"].iloc[0]
        ),
        "similarity": result.parameters["similarity"],
        "ridge_alpha_relative": result.baseline["alpha_relative"].tolist(),
        "vision_to_language": retrieval_headline(summary, result.forward),
        "language_to_vision": retrieval_headline(summary, result.backward),
        "paired_test_recall_at_1": paired.to_dict("records"),
    }
    entry["headline"] = format_retrieval_headline(entry)
    return files, entry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convergence_core report",
        description=(
            "Reproduce the paper's analyses (Fig. 2, S1, S2, layer sweep) on a precomputed run."
        ),
    )
    parser.add_argument("run", nargs="?", help="run folder, or a run name under the cache's runs/")
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
    parser.add_argument("--k", type=int, default=10, help="CKNNA neighbours (default 10)")
    parser.add_argument(
        "--scores",
        nargs="+",
        choices=["mean", "pc1"],
        default=["mean", "pc1"],
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sets and shuffles")
    parser.add_argument(
        "--universal-folds",
        type=int,
        default=5,
        help="folds of the universal-space retrieval (default 5)",
    )
    parser.add_argument(
        "--property-permutations",
        type=int,
        default=dispersion_predictors.DEFAULT_N_PERMUTATIONS,
        help="label shuffles per property test (default "
        f"{dispersion_predictors.DEFAULT_N_PERMUTATIONS})",
    )
    parser.add_argument(
        "--property-shuffles",
        type=int,
        default=dispersion_predictors.DEFAULT_N_SHUFFLES,
        help="shuffled-target refits per dispersion model (default "
        f"{dispersion_predictors.DEFAULT_N_SHUFFLES})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.run is None) == (args.preset is None):
        parser.error("give either a run (folder or name) or --preset NAME, not both")
    try:
        check_out_folder(args.out)  # before any analysis: a bad --out fails in a second
        if args.preset:
            name = preset_config(args.preset)["run_name"]
            try:
                run = load_run(name)
            except FileNotFoundError as missing:
                raise FileNotFoundError(
                    f"the {args.preset} run {name!r} is not cached yet; make it with "
                    f"`python -m convergence_core precompute --preset {args.preset}` ({missing})"
                ) from missing
        else:
            run = load_run(args.run)
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
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. no permission to write to --out
        print(
            f"error: cannot write the report to {args.out} ({error.strerror or error}); pass a "
            "folder you can write to with --out",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    print(
        f"Run {report['run']['name']!r}: {report['run']['n_stimuli']} stimuli; "
        f"set size {report['parameters']['set_size']}, k = {report['parameters']['k']}; "
        f"language layers used: {report['best_language_layers']}"
    )
    print((out / "summary.txt").read_text(encoding="utf-8"), end="")
    if "headline" in report["universal_space"]:
        print(report["universal_space"]["headline"])
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {len(report['files'])} files to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
