"""Command line: ``python -m convergence_core precompute | runs | report``.

User errors (bad flags, unknown models, bad data, missing weights) print one ``error:`` line with
the fix and exit with status 2; they never show a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .presets import PRESETS

__all__ = ["main"]

DESCRIPTION = """\
Convergence Explorer: where vision models agree stimulus by stimulus (GPA dispersion) and how
that changes vision-language alignment (CKNNA).

  precompute   extract embeddings and compute GPA, dispersion, Gram matrices into the cache
  runs         list the cached runs
  report       the paper's analyses on one run: tables, figures, summary

Run `python -m convergence_core COMMAND --help` for the options of a command.
"""

PRECOMPUTE_EPILOG = """\
examples:
  python -m convergence_core precompute --preset demo
  python -m convergence_core precompute config.toml
  python -m convergence_core precompute --dataset ../shared/data/coco-mini \\
      --vision efficientnet-lite0,efficientnet-lite1 --language minilm --layers default

A config file (.json or .toml) holds the same settings by their long names with underscores
(dataset, vision_models, language_models, layers, gpa_layers, device, batch_size, caption_mode,
drop_bad, run_name, cache_root, weights, thumbnails); flags given on the command line override it.
Rerunning the same command reuses every finished step; an interrupted run resumes.
"""


def _split_names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``["model=value", ...]`` -> dict (the value may itself contain ``=``)."""
    out: dict[str, str] = {}
    for value in values or []:
        model, sep, rest = value.partition("=")
        if not sep or not model or not rest:
            raise ValueError(f"{flag} expects MODEL=VALUE, got {value!r}")
        out[model.strip()] = rest.strip()
    return out


def _layers(values: Sequence[str] | None) -> str | dict[str, list[str]] | None:
    """``--layers all|default`` or one or more ``--layers MODEL=L1,L2``."""
    if not values:
        return None
    if len(values) == 1 and values[0] in ("all", "default"):
        return values[0]
    return {model: _split_names(layers) for model, layers in _pairs(values, "--layers").items()}


def _precompute_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "precompute",
        help="extract embeddings and compute GPA, dispersion and Gram matrices into the cache",
        description="Run (or resume) the precompute pipeline and print a one-line summary.",
        epilog=PRECOMPUTE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="a .json or .toml config file")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named config: demo (coco-mini x EfficientNet-Lite0/1/2 x MiniLM + Gemma-3-270M) "
        "or imagenet (the 1,000 ImageNet samples x the same models)",
    )
    parser.add_argument(
        "--dataset",
        help="dataset folder (COCO captions.json or labels.csv), table file, or hf:NAME",
    )
    parser.add_argument("--vision", help="vision models, comma-separated (at least 2)")
    parser.add_argument("--language", help="language models, comma-separated")
    parser.add_argument(
        "--layers",
        action="append",
        metavar="SPEC",
        help="'all' (default), 'default' (each model's default layer only), or MODEL=L1,L2 "
        "(repeatable; models not named keep all layers)",
    )
    parser.add_argument(
        "--gpa-layer",
        action="append",
        metavar="MODEL=LAYER",
        help="layer of a vision model entering GPA (default: its default layer); repeatable",
    )
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, help="stimuli per forward pass (default 32)")
    parser.add_argument(
        "--caption-mode",
        choices=["first", "mean"],
        help="embed each stimulus's first caption (default) or the mean over all its captions",
    )
    parser.add_argument(
        "--drop-bad",
        action="store_true",
        default=None,
        help="drop stimuli with a missing/corrupt image or no caption (recorded in the manifest) "
        "instead of stopping with their list",
    )
    parser.add_argument("--run-name", help="folder name under CACHE/runs (default: a config hash)")
    parser.add_argument("--cache", help="cache folder (default $CONVERGENCE_CACHE or ./cache)")
    parser.add_argument(
        "--weights",
        action="append",
        metavar="MODEL=PATH",
        help="local weights for a model whose weights are not installed; repeatable",
    )
    parser.add_argument(
        "--no-thumbnails",
        dest="thumbnails",
        action="store_false",
        default=None,
        help="skip the gallery thumbnails",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convergence_core",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _precompute_parser(sub)
    runs = sub.add_parser(
        "runs", help="list the cached runs", description="List cached runs, newest first."
    )
    runs.add_argument("--cache", help="cache folder (default $CONVERGENCE_CACHE or ./cache)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser(
        "report",
        help="the paper's analyses on one run (see `report --help`)",
        add_help=False,
    )
    return parser


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from .presets import preset_config

    config: dict[str, Any] = {}
    if args.preset and args.config:
        raise ValueError("give either a config file or --preset, not both")
    if args.preset:
        config = preset_config(args.preset)
    elif args.config:
        from .precompute import PrecomputeConfig

        config = dict(PrecomputeConfig.from_file(args.config).to_dict())
    flags = {
        "dataset": args.dataset,
        "vision_models": _split_names(args.vision) if args.vision else None,
        "language_models": _split_names(args.language) if args.language is not None else None,
        "layers": _layers(args.layers),
        "gpa_layers": _pairs(args.gpa_layer, "--gpa-layer") or None,
        "device": args.device,
        "batch_size": args.batch_size,
        "caption_mode": args.caption_mode,
        "drop_bad": args.drop_bad,
        "run_name": args.run_name,
        "cache_root": args.cache,
        "weights": _pairs(args.weights, "--weights") or None,
        "thumbnails": args.thumbnails,
    }
    config.update({key: value for key, value in flags.items() if value is not None})
    if "dataset" not in config or "vision_models" not in config:
        raise ValueError(
            "nothing to precompute: give --preset demo, a config file, or at least --dataset and "
            "--vision (see `python -m convergence_core precompute --help`)"
        )
    return config


class _ProgressBars:
    """One tqdm bar per extracted model (stderr); cached steps print one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None
        self.model: str | None = None

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        if event.step == "waiting":
            print("  waiting for another precompute of this run to finish ...", file=self.stream)
        elif event.step == "extract":
            if event.skipped:
                self._close()
                print(f"  {event.model}: cached", file=self.stream)
                return
            if event.model != self.model:
                self._close()
                self.model = event.model
                self.bar = tqdm(
                    total=event.total,
                    desc=f"  {event.model}",
                    unit="item",
                    file=self.stream,
                    leave=True,
                    dynamic_ncols=True,
                )
            self.bar.n = event.done
            self.bar.refresh()
            if event.done >= event.total:
                self._close()
        elif (
            event.step in ("gpa", "dispersion", "thumbnails", "properties")
            and event.done >= event.total
        ):
            self._close()
            state = "cached" if event.skipped else "done"
            print(f"  {event.step}: {state}", file=self.stream)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.model = None, None


def _silence_library_progress_bars() -> None:
    """transformers draws its own "Loading weights" bar per model; ours (one per model) suffice."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


def _run_precompute(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .precompute import precompute

    config = _config_from_args(args)
    _silence_library_progress_bars()
    started = time.perf_counter()
    bars = None if args.quiet else _ProgressBars(err)
    try:
        run = precompute(config, progress=bars)
    finally:
        if bars is not None:
            bars._close()
    seconds = time.perf_counter() - started
    print(
        f"run {run.path}: {run.n_stimuli} stimuli; vision {', '.join(run.vision_models)}; "
        f"language {', '.join(run.language_models) or '-'}; GPA {run.gpa.n_iter} iterations "
        f"({'converged' if run.gpa.converged else 'NOT converged'}); {seconds:.1f} s",
        file=out,
    )
    return 0


def _run_runs(args: argparse.Namespace, out: TextIO) -> int:
    from .run import list_runs

    root = Path(args.cache) / "runs" if args.cache else None
    runs = list_runs(root)
    if args.json:
        print(
            json.dumps(
                [{"name": r.name, "path": str(r.path), **r.summary} for r in runs], indent=2
            ),
            file=out,
        )
        return 0
    if not runs:
        print(
            "no cached runs; make one with `python -m convergence_core precompute --preset demo`",
            file=out,
        )
        return 0
    rows = [
        (
            r.name,
            "complete" if r.summary["complete"] else "incomplete",
            str(r.summary["n_stimuli"]),
            ",".join(r.summary["vision_models"]),
            ",".join(r.summary["language_models"]) or "-",
            r.summary["updated"] or "-",
            str(r.path),
        )
        for r in runs
    ]
    header = ("name", "status", "n", "vision", "language", "updated", "path")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )
    return 0


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Entry point of ``python -m convergence_core``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if argv and argv[0] == "report":
        from . import report

        return int(report.main(argv[1:]) or 0)
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(out)
        return 2
    try:
        if args.command == "precompute":
            return _run_precompute(args, out, err)
        return _run_runs(args, out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=err)
        return 2
