"""Command line: ``convergence precompute | runs | report | serve`` (the console script of an
installed package) or, the same, ``python -m convergence_core precompute | runs | report | serve``.

User errors (bad flags, unknown models, bad data, missing weights) print one ``error:`` line with
the fix and exit with status 2; they never show a stack trace.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from .presets import PRESETS

__all__ = ["console_main", "main"]

DESCRIPTION = """\
Convergence Explorer: where vision models agree stimulus by stimulus (GPA dispersion) and how
that changes vision-language alignment (CKNNA).

  precompute   extract (or read) representations; neighbour lists, GPA, dispersion into the cache
  runs         list the cached runs
  report       the paper's analyses on one run: tables, figures, summary
  serve        the dashboard on the cached runs (http://localhost:8501)

Run `{prog} COMMAND --help` for the options of a command.
"""

PRECOMPUTE_EPILOG = """\
examples:
  {prog} precompute --preset demo
  {prog} precompute config.toml
  {prog} precompute --dataset ../shared/data/coco-mini \\
      --vision efficientnet-lite0,efficientnet-lite1 --language minilm --layers default
  {prog} precompute --dataset my-set/ --vision efficientnet-lite0 \\
      --features dinov2=feats/dinov2.npy --modality dinov2=vision \\
      --features subj01:V1=fmri/subj01_V1.parquet --modality subj01=brain
  {prog} precompute --features a=a.npy --features b=b.npy \\
      --features V1=V1.parquet --modality a=vision --modality b=vision --modality V1=brain
      (no --dataset: the stimuli are the first file's ids; no images, no captions)
  {prog} precompute --dataset data/coco --vision a,b --language minilm \\
      --features V1=V1.npy --modality V1=brain --stimuli common
      (brain recordings of some of the images: the run holds the stimuli every file covers)

A config file (.json or .toml) holds the same settings by their long names with underscores
(dataset, vision_models, language_models, features, modalities, gpa_models, layers, gpa_layers,
device, batch_size, caption_mode, drop_bad, stimuli, run_name, cache_root, weights, thumbnails,
list_size, neighbour_layers, precision, engine, ray_address, concurrency, num_cpus, num_gpus,
runtime_env, gpa_starts, gpa_stop),
or the models one by one as [[models]] tables (name, modality, and path + layer for features from
a file). Flags given on the command line override it: a flag of one value (--device, --run-name,
--layers default) or a list of models (--vision, --language, --gpa-models) replaces the config's
setting; the per-model flags (--features, --modality, --gpa-layer, --weights, --layers MODEL=...)
replace the config's entry for the models they name and keep its other models' entries. --features
NAME replaces all of NAME's files in the config (give every layer NAME needs: NAME:LAYER=PATH); a
model named by --vision, --language or --features replaces the config's model of that name (an
encoder given as a file, say); a model the flags take out of the run (--vision replaces the
config's vision encoders) leaves with its per-model settings.
Rerunning the same command reuses every finished step; an interrupted run resumes.

on a cluster (README, "Running on a cluster"):
  ray start --head                                   # on one machine; `ray start --address=...`
  {prog} precompute config.toml --engine ray --ray-address auto \\
      --device cuda --precision bfloat16 --batch-size auto --num-gpus 1
"""


_CACHE_HELP = (
    "cache folder (default $CONVERGENCE_CACHE, else cache/ in a checkout or "
    "~/.cache/convergence-explorer when installed)"
)


def command(prog: str, words: str) -> str:
    """A command to run, as the user runs this program: ``prog`` is how they called it
    (``python -m convergence_core``, or ``convergence`` for the installed console script)."""
    return f"`{prog} {words}`"


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a mistyped ``name``
    (``validation.closest_name``, as ``--modality visoin`` and unknown model names are
    answered), else ``""``."""
    from .validation import closest_name

    close = closest_name(name, choices)
    return f" (did you mean {close!r}?)" if close else ""


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _split_names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _layers(values: Sequence[str] | None) -> str | dict[str, list[str]] | None:
    """``--layers all|default`` or one or more ``--layers MODEL=L1,L2``."""
    if not values:
        return None
    if len(values) == 1 and values[0] in ("all", "default"):
        return values[0]
    whole = [value for value in values if value in ("all", "default")]
    if whole:
        raise ValueError(
            f"--layers {whole[0]} is a choice for every model and cannot be given with another "
            f"--layers; give --layers {whole[0]} alone, or only --layers MODEL=L1,L2 flags"
        )
    from .validation import model_value_pairs  # numpy: imported when a flag is read

    pairs = model_value_pairs(values, "--layers")
    return {model: _split_names(layers) for model, layers in pairs.items()}


def _precompute_parser(sub: Any, prog: str) -> None:
    parser = sub.add_parser(
        "precompute",
        description="Run (or resume) the precompute pipeline and print a one-line summary.",
        epilog=PRECOMPUTE_EPILOG.format(prog=prog),
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
        help="dataset folder (COCO captions.json or labels.csv), table file (with an image "
        "column; or id and caption alone: captions without images), or hf:NAME; may be left out "
        "when every model comes from --features (the stimuli are then the ids of the first "
        "feature file)",
    )
    parser.add_argument(
        "--vision",
        help="vision models, comma-separated (GPA needs at least 2 vision models in all, those of "
        "--features included, or --gpa-models)",
    )
    parser.add_argument("--language", help="language models, comma-separated")
    parser.add_argument(
        "--layers",
        action="append",
        metavar="SPEC",
        help="'all' (default), 'default' (each encoder's default layer only; a model from "
        "--features keeps every file given for it), or MODEL=L1,L2 (an encoder's layers; "
        "repeatable; models not named keep all layers)",
    )
    parser.add_argument(
        "--features",
        action="append",
        metavar="NAME[:LAYER]=PATH",
        help="a model whose representations you bring: an .npy (n, d) with its stimulus ids one "
        "per line in PATH.ids.txt, or a .parquet with an 'id' column and one column per feature; "
        "repeatable (several layers: NAME:LAYER=PATH); needs --modality",
    )
    parser.add_argument(
        "--modality",
        action="append",
        metavar="NAME=MODALITY",
        help="modality of a --features model: vision, language, brain or a name of your own; "
        "vision models enter GPA",
    )
    parser.add_argument(
        "--gpa-models",
        help="models entering GPA, comma-separated (default: every vision model)",
    )
    parser.add_argument(
        "--list-size",
        type=int,
        help="exact nearest neighbours stored per stimulus and layer (default 128)",
    )
    parser.add_argument(
        "--gpa-starts",
        type=int,
        help="random starts of the GPA stability diagnostic stored in the run (default 4; 0: "
        "none); a start reaching a clearly lower minimum than Gower's start becomes the run's GPA",
    )
    parser.add_argument(
        "--gpa-stop",
        metavar="RULE",
        help="optimum (default): GPA to the optimum of its loss; uncertainty: stop once the "
        "residuals move less than their spread over the random starts (models of equal width: "
        "far fewer iterations)",
    )
    parser.add_argument(
        "--gpa-layer",
        action="append",
        metavar="MODEL=LAYER",
        help="layer of a model entering GPA (default: its default layer); repeatable",
    )
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        help="stimuli per forward pass (default 32), or 'auto': as many as fill 80%% of the "
        "free GPU memory (32 on CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto (default: float16 autocast for vision models on CUDA, else float32), float32, "
        "or float16/bfloat16 (autocast; language models load their weights in that dtype; prefer "
        "bfloat16 for decoder LLMs, whose activations can pass float16's 65,504)",
    )
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        help="where extraction runs: local (default, this process) or ray (a Ray Data pipeline "
        "per model over an actor pool; same numbers)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="connect to this Ray cluster (auto, HOST:6379 or ray://HOST:10001); without it a "
        "local Ray instance starts for the run",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="Ray actors per model (default: as many as the cluster's CPUs/GPUs allow)",
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        metavar="N",
        help="CPUs reserved per Ray actor (default 1)",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        metavar="N",
        help="GPUs per Ray actor (default 1 with --device cuda; 0.5 puts two actors on a GPU)",
    )
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
    parser.add_argument(
        "--stimuli",
        metavar="RULE",
        help="all (default: every feature file covers exactly the data set's stimuli), common "
        "(only the stimuli every feature file covers; rows for other ids are skipped) or the "
        "path of a text file listing the ids to keep, one per line",
    )
    parser.add_argument("--run-name", help="folder name under CACHE/runs (default: a config hash)")
    parser.add_argument("--cache", help=_CACHE_HELP)
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


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(prog=prog)  # for the commands our messages recommend (:func:`command`)
    # the description lists the commands (a help= per command would list them a second time)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _precompute_parser(sub, prog)
    runs = sub.add_parser(
        "runs", description="List cached runs, newest first."
    )
    runs.add_argument("--cache", help=_CACHE_HELP)
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser(
        "report",
        add_help=False,
    )
    sub.add_parser(
        "serve",
        add_help=False,
    )
    return parser


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from .presets import preset_config
    from .validation import model_value_pairs

    _check_flag_values(args)
    config: dict[str, Any] = {}
    if args.preset and args.config:
        raise ValueError("give either a config file or --preset, not both")
    if args.preset:
        config = preset_config(args.preset)
    elif args.config:
        from .precompute import PrecomputeConfig

        if Path(args.config).is_dir():
            raise ValueError(
                f"{args.config} is a folder, not a config file: pass a .json or .toml config "
                "file, or give a data set folder with --dataset"
            )
        config = dict(PrecomputeConfig.from_file(args.config).to_dict())
    flags = {
        "dataset": args.dataset,
        "vision_models": _split_names(args.vision) if args.vision else None,
        "language_models": _split_names(args.language) if args.language is not None else None,
        "layers": _layers(args.layers),
        "gpa_layers": model_value_pairs(args.gpa_layer, "--gpa-layer") or None,
        "device": args.device,
        "batch_size": args.batch_size,
        "caption_mode": args.caption_mode,
        "drop_bad": args.drop_bad,
        "stimuli": args.stimuli,
        "run_name": args.run_name,
        "cache_root": args.cache,
        "weights": model_value_pairs(args.weights, "--weights") or None,
        "thumbnails": args.thumbnails,
        "features": _features(args.features),
        "modalities": model_value_pairs(args.modality, "--modality") or None,
        "gpa_models": _split_names(args.gpa_models) if args.gpa_models else None,
        "list_size": args.list_size,
        "gpa_starts": args.gpa_starts,
        "gpa_stop": args.gpa_stop,
        "precision": args.precision,
        "engine": args.engine,
        "ray_address": args.ray_address,
        "concurrency": args.concurrency,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    config = _merge_flags(config, given)
    _check_run_name(config.get("run_name"), "--run-name" if args.run_name else "run_name")
    if args.preset and args.dataset is None:
        _check_preset_data(args.preset, config)
    if not (config.get("vision_models") or config.get("features")):
        raise ValueError(
            "nothing to precompute: give --preset demo, a config file, --dataset with --vision "
            f"or --features, or --features alone (see {command(args.prog, 'precompute --help')})"
        )
    _check_names(config)
    return config


def _check_names(config: Mapping[str, Any]) -> None:
    """A mistyped name that the run would refuse without a hint: ``stimuli`` (``--stimuli
    comon``) or a ``modalities`` model (``--modality vitb=vision``) near one it takes."""
    rule = config.get("stimuli")
    if isinstance(rule, str) and rule not in ("all", "common") and not Path(rule).exists():
        hint = _did_you_mean(rule, ["all", "common"])
        if hint:
            raise ValueError(
                f"stimuli: {rule} is not a file{hint}; give 'all', 'common' or the path of a "
                "text file listing the ids to keep, one per line"
            )
    files = list(config.get("features") or {})
    for model in config.get("modalities") or {}:
        hint = "" if model in _run_models(config) else _did_you_mean(model, files)
        if hint:
            raise ValueError(
                f"modalities names {model!r}, which has no feature file{hint}; a modality is "
                f"given for a --features model (here: {', '.join(files)})"
            )


def _check_flag_values(args: argparse.Namespace) -> None:
    """ValueError naming the flag (not the config setting it sets) for a value out of range,
    before the config is checked: the command line's user typed --list-size, not list_size."""
    import re

    from .gpa_stability import GPA_STOPS

    if args.list_size is not None and args.list_size < 1:
        raise ValueError(
            f"--list-size {args.list_size} is not a positive whole number; give the neighbours "
            "stored per stimulus, e.g. --list-size 128 (the default)"
        )
    if args.gpa_starts is not None and args.gpa_starts < 0:
        raise ValueError(
            f"--gpa-starts {args.gpa_starts} is negative; give the random starts of the GPA "
            "stability diagnostic, e.g. --gpa-starts 4 (the default), or 0 for none"
        )
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(
            f"--concurrency {args.concurrency} is not a positive whole number; give the Ray "
            "actors per model, e.g. --concurrency 2, or leave it out (as many as the cluster "
            "allows)"
        )
    if args.gpa_stop is not None and args.gpa_stop not in GPA_STOPS:
        raise ValueError(
            f"--gpa-stop {args.gpa_stop!r} is not a rule; use --gpa-stop optimum (the default) "
            "or --gpa-stop uncertainty"
        )
    if args.device is not None and not re.fullmatch(r"cpu|(mps|cuda)(:[0-9]+)?", args.device):
        raise ValueError(
            f"--device {args.device!r} is not a device; use cpu, cuda, cuda:N (the N-th GPU) or "
            "mps"
        )


def _check_run_name(name: Any, where: str) -> None:
    """A run name starting with '-' (``--run-name=-dash``) makes a run that ``report NAME``
    cannot name: the other commands read it as an option."""
    if isinstance(name, str) and name.strip().startswith("-"):
        raise ValueError(
            f"{where} {name!r} starts with '-', which `report` and the other commands would read "
            "as an option; use a name starting with a letter or a digit"
        )


#: settings holding one entry per model: a flag's entry for a model replaces the config's entry
#: for that model only (``layers`` when both are {model: [layer, ...]} mappings)
_PER_MODEL_SETTINGS = ("features", "modalities", "gpa_layers", "weights", "layers")


def _names(value: Any) -> list[str]:
    """A list of model names as a config spells it (a list, or a comma-separated string)."""
    if isinstance(value, str):
        return _split_names(value)
    return [str(name).strip() for name in value or ()]


def _run_models(settings: Mapping[str, Any]) -> list[str]:
    """Every model of ``settings`` (a config mapping): encoders, then file models."""
    return [*_names(settings.get("vision_models")), *_names(settings.get("language_models")),
            *(settings.get("features") or {})]


def _gpa_set(settings: Mapping[str, Any]) -> list[str]:
    """The models of ``settings`` that enter GPA: ``gpa_models``, else every vision model."""
    if settings.get("gpa_models"):
        return _names(settings["gpa_models"])
    modalities = settings.get("modalities") or {}
    return [*_names(settings.get("vision_models")),
            *(m for m in settings.get("features") or {} if modalities.get(m) == "vision")]


def _merge_flags(config: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a config file's or a preset's settings) with the command line's ``flags`` over
    it. A flag of one value or a list of models replaces the config's setting; the per-model
    settings (``_PER_MODEL_SETTINGS``) are merged model by model: a flag's entry for a model
    replaces the config's entry for it (for ``features``, all of that model's files: the command
    line says which files the model has, and a model whose layers came half from each would be
    neither), the config's other models keep theirs. A model named by ``--vision``,
    ``--language`` or ``--features`` leaves the config's other list (an encoder in the config
    given as a file on the command line, or the reverse), and the config's per-model settings of a
    model that the flags take out of the run (``--vision`` replacing the config's vision models)
    go with it, as do its ``gpa_layers`` entries of models the flags take out of GPA."""
    if not config:
        return dict(flags)
    merged = dict(config)
    flag_files = set(flags.get("features") or {})
    flag_encoders = {*_names(flags.get("vision_models")), *_names(flags.get("language_models"))}
    for key in ("vision_models", "language_models"):  # an encoder now given as a file
        if key not in flags and flag_files & set(_names(merged.get(key))):
            merged[key] = [m for m in _names(merged.get(key)) if m not in flag_files]
    for key in ("features", "modalities"):  # a file model now given as an encoder
        if flag_encoders & set(merged.get(key) or {}):
            kept = {m: v for m, v in merged[key].items() if m not in flag_encoders}
            merged[key] = kept or None
    layers = flags.get("layers")
    if isinstance(layers, Mapping) and merged.get("layers") == "default":
        raise ValueError(
            "the config's layers = \"default\" keeps each encoder's default layer, and --layers "
            "MODEL=L1,L2 would give every model it does not name all its layers; give --layers "
            "default (or all) on the command line, or the layers of each model in the config"
        )
    for key, value in flags.items():
        kept = merged.get(key)
        if key in _PER_MODEL_SETTINGS and isinstance(value, Mapping) and isinstance(kept, Mapping):
            value = {**kept, **value}  # the config's order, the flag's entries
        merged[key] = value
    removed = set(_run_models(config)) - set(_run_models(merged))
    if removed and "gpa_models" not in flags and set(_names(config.get("gpa_models"))) & removed:
        missing = [m for m in _names(config.get("gpa_models")) if m in removed]
        raise ValueError(
            f"the config's gpa_models names {missing}, which the command line takes out of the "
            "run (--vision and --language replace the config's encoders of that modality); "
            f"give --gpa-models with some of {_run_models(merged)}, or name those models again"
        )
    # settings that no longer apply: an encoder's weights and layers once it is a file model or
    # out of the run, a GPA layer once its model is out of GPA
    as_files = flag_files & {*_names(config.get("vision_models")),
                             *_names(config.get("language_models"))}
    # a file model now an encoder: its file layer names mean nothing to the encoder
    as_encoders = flag_encoders & set(config.get("features") or {})
    left_gpa = set(_gpa_set(config)) - set(_gpa_set(merged))
    for key in ("weights", "layers", "gpa_layers"):
        table = merged.get(key)
        if not isinstance(table, Mapping):
            continue
        gone = removed | (left_gpa | as_encoders if key == "gpa_layers" else as_files)
        if key == "gpa_layers":  # an encoder now a file model: its layer only if a file has it
            gone |= {m for m in as_files
                     if table.get(m) not in ((flags.get("features") or {}).get(m) or {})}
        from_flags = flags.get(key) if isinstance(flags.get(key), Mapping) else {}
        merged[key] = {
            m: v for m, v in table.items() if m in from_flags or m not in gone
        } or (None if key != "layers" else "all")
    return merged


def _features(values: Sequence[str] | None) -> dict[str, dict[str, str]] | None:
    """``--features NAME=PATH`` / ``NAME:LAYER=PATH`` (repeatable) -> ``{name: {layer: path}}``."""
    out: dict[str, dict[str, str]] = {}
    for key, path in _feature_items(values):
        name, _, layer = key.partition(":")
        if not name.strip():
            raise ValueError(
                f"--features {key}={path} has no model name before the ':'; --features expects "
                "NAME=PATH or NAME:LAYER=PATH (e.g. --features subj01:V1=V1.npy)"
            )
        if ":" in key and not layer.strip():  # NAME:=PATH: a layer name was meant, and left out
            raise ValueError(
                f"--features {key}={path} has no layer name after the ':'; give NAME:LAYER=PATH "
                f"(e.g. --features {name.strip()}:V1={path}) or NAME=PATH (one layer, "
                "'features')"
            )
        layers = out.setdefault(name.strip(), {})
        layer = layer.strip() or "features"
        if layer in layers:
            raise ValueError(
                f"--features gives layer {layer!r} of {name!r} twice ({layers[layer]} and "
                f"{path}); give it once"
            )
        layers[layer] = path
    return out or None


def _feature_items(values: Sequence[str] | None) -> list[tuple[str, str]]:
    items = []
    for value in values or []:
        key, sep, path = value.partition("=")
        if not sep or not key.strip() or not path.strip():
            raise ValueError(f"--features expects NAME=PATH or NAME:LAYER=PATH, got {value!r}")
        items.append((key.strip(), path.strip()))
    return items


#: preset -> the setting that moves its data set (see convergence_core.settings)
_PRESET_DATA_SETTINGS = {"demo": "CONVERGENCE_DEMO_DATA", "imagenet": "CONVERGENCE_IMAGENET_DATA"}


def _check_preset_data(preset: str, config: dict[str, Any]) -> None:
    """A preset whose data set is not where the settings say: name the setting that moves it."""
    folder = Path(str(config.get("dataset", "")))
    variable = _PRESET_DATA_SETTINGS.get(preset)
    if variable is None or folder.exists():
        return
    raise ValueError(
        f"the {preset} preset's data set is not at {folder}; point ${variable} (or "
        "$CONVERGENCE_DATA, the folder holding coco-mini/ and imagenet-samples/) at it, or give "
        "--dataset PATH (see the README's 'Install' section)"
    )


class _ProgressBars:
    """Progress of a precompute on ``stream`` (stderr). On a terminal, one tqdm bar per extracted
    or indexed model. On anything else (a log file, a cluster job's output), plain lines: one when
    a model starts, at most one per ``LOG_INTERVAL_S``, one when it ends with its time, so that a
    log reads line by line instead of holding every redraw of a bar. The steps after extraction
    (GPA, ...) print a line as they start, where they are at most every ``LOG_INTERVAL_S``, and
    one as they end, with their time. Cached steps print one line; the event that confirms a
    finished model (sent once its files are written) draws nothing."""

    #: seconds between two plain progress lines of the same model
    LOG_INTERVAL_S = 30.0

    def __init__(self, stream: TextIO, clock: Any = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        isatty = getattr(stream, "isatty", None)
        self.terminal = bool(isatty()) if callable(isatty) else False
        self.bar: Any = None
        self.key: tuple[str, str | None] | None = None
        self.cached: set[tuple[str, str | None]] = set()
        self.finished: set[tuple[str, str | None]] = set()
        self.said: set[tuple[tuple[str, str | None], str]] = set()  # details printed
        self.step_started: dict[str, float] = {}
        self.step_line: dict[str, float] = {}
        self.started = self.last_line = 0.0

    def __call__(self, event: Any) -> None:
        if event.step == "waiting":
            print(f"  waiting for another precompute of this run to finish: {event.detail}",
                  file=self.stream)
        elif event.step in ("extract", "neighbours"):
            self._model_event(event)
        elif event.step in ("gpa", "gpa_stability", "dispersion", "thumbnails", "properties"):
            self._step_event(event)

    def _step_event(self, event: Any) -> None:
        """A step after extraction: a line as it starts (GPA and its stability take minutes at
        100,000 stimuli), where it is at most every ``LOG_INTERVAL_S`` (``event.detail``: "GPA
        solution 2 of 5"), and a line as it ends, with its time."""
        now = self.clock()
        if event.done < event.total and not event.skipped:
            if event.done == 0:  # the step's own start (a cached step reads its parts silently)
                self._close()
                self.step_started[event.step] = self.step_line[event.step] = now
                said = f" ({event.detail})" if event.detail else ""  # e.g. a resumed step
                print(f"  {event.step}: started{said}", file=self.stream, flush=True)
            elif event.step not in self.step_started:
                return
            elif now - self.step_line[event.step] >= self.LOG_INTERVAL_S:
                self.step_line[event.step] = now
                where = event.detail or f"{event.done:,}/{event.total:,}"
                seconds = now - self.step_started[event.step]
                print(f"  {event.step}: {where} ({seconds:.0f} s)", file=self.stream, flush=True)
        else:
            self._close()
            started = self.step_started.pop(event.step, None)
            if event.skipped:
                state = "cached"
            elif started is None:
                state = "done"
            else:
                state = f"done in {now - started:.1f} s"
            print(f"  {event.step}: {state}", file=self.stream, flush=True)

    def _model_event(self, event: Any) -> None:
        label = event.model if event.step == "extract" else f"{event.model} neighbours"
        unit = "item" if event.step == "extract" else "row"
        key = (event.step, event.model)
        complete = event.done >= event.total
        if event.skipped:
            self._close()
            if key not in self.cached:
                self.cached.add(key)
                print(f"  {label}: cached", file=self.stream)
            return
        if event.detail and (key, event.detail) not in self.said:
            # e.g. "redone: <file> is cut short": why finished work runs again (once per layer)
            self.said.add((key, event.detail))
            self._close()
            print(f"  {label}: {event.detail}", file=self.stream, flush=True)
        first = key != self.key
        if first:
            self._close()
            if complete and key in self.finished:
                return  # the model's bar has already reached its total
            self.key, self.started = key, self.clock()
            self.last_line = self.started
            if self.terminal:
                from tqdm import tqdm

                # initial: the rate counts from here (a first event may already report rows)
                self.bar = tqdm(total=event.total, initial=event.done, desc=f"  {label}",
                                unit=unit, file=self.stream, leave=True, dynamic_ncols=True)
        if self.bar is not None:
            self.bar.n = event.done
            self.bar.refresh()
        elif first or complete or self.clock() - self.last_line >= self.LOG_INTERVAL_S:
            self.last_line = self.clock()
            seconds = self.last_line - self.started
            if first:  # nothing reported before: no time to tell
                timing = ""
            else:
                timing = f" in {seconds:.1f} s" if complete else f" ({seconds:.0f} s)"
            print(f"  {label}: {event.done:,}/{event.total:,} {unit}s{timing}",
                  file=self.stream, flush=True)
        if complete:
            self.finished.add(key)
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None


def _silence_library_progress_bars() -> None:
    """transformers draws its own "Loading weights" bar per model; ours (one per model) suffice."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


def _run_precompute(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``precompute``: the run, then its summary line. The cache it was given (``--cache``, else
    the config's ``cache_root``: one setting, ``config["cache_root"]``) holds everything it
    caches while it runs, converted model weights included (``precompute`` runs under
    :func:`settings.cache_root_given`)."""
    from .precompute import precompute

    config = _config_from_args(args)
    _silence_library_progress_bars()
    started = time.perf_counter()
    bars = None if args.quiet else _ProgressBars(err)
    try:  # precompute makes its cache (--cache) hold all it caches: settings.cache_root_given
        run = precompute(config, progress=bars)
    except KeyboardInterrupt:  # Ctrl-C: a page of torch frames says less than this
        print(
            "\ninterrupted: the steps that finished are kept in the run; rerun the same command "
            "to resume where it stopped",
            file=err,
        )
        return 130
    except OSError as exc:
        cache = config.get("cache_root") or args.cache
        cache = Path(str(cache)).expanduser() if cache else None
        unreadable = _input_fault(exc, cache)
        if unreadable is not None:
            print(f"error: {unreadable}", file=err)
            return 2
        if exc.errno == errno.EIO and exc.filename:  # a disk error on the cache's disk
            print(
                f"error: input/output error (EIO) on {exc.filename}: the cache's disk (or its "
                "network connection) is failing. The steps that finished are kept: check the "
                "disk, or give a folder on another disk with --cache, then rerun the same command",
                file=err,
            )
            return 1
        cause = _storage_fault(exc, cache)
        if cause is None:
            raise
        print(
            f"error: cannot write the run: {cause}. The steps that finished are kept: free some "
            "space (or give a writable folder with --cache), then rerun the same command to "
            "resume",
            file=err,
        )
        return 1
    finally:
        if bars is not None:
            bars._close()
    print(f"{run_line(run)}; {time.perf_counter() - started:.1f} s", file=out)
    if not args.quiet:  # what to do with it (a run named by a hash is otherwise hard to find)
        print(next_steps(run.path, args.prog), file=err)
    return 0


def next_steps(path: Path, prog: str = "python -m convergence_core") -> str:
    """The commands that use the run at ``path``, for the user who just made it: by its name
    when it is in the default cache, else by its folder (``report``) and ``--cache`` (``serve``);
    ``prog``: how the user runs this program (:func:`command`)."""
    from . import settings

    name = path.name
    default = settings.runs_root().resolve() == path.parent.resolve()
    given = name if default else str(path)
    cache = "" if default else f" --cache {path.parent.parent}"
    return (
        f"next: {command(prog, f'report {given} --out report-{name}/')} (the paper's figures "
        f"and tables), or {command(prog, f'serve{cache}')} (pick {name} in the sidebar)"
    )


#: Storage faults a user fixes outside the program (a full disk or quota, a read-only or
#: unwritable cache): one line and the fix, not a traceback
_STORAGE_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.EFBIG,  # "File too large": a file-size limit (ulimit -f)
}
#: Below this much free space an OSError without an errno is taken for a full disk (numpy's
#: short write, "288000 requested and 283616 written", carries none)
_NEARLY_FULL_BYTES = 64 * 2**20


#: Errors of reading a file the user gave (no permission, a disk error); a full disk, a quota or
#: a read-only file system is a fault of writing (:func:`_storage_fault`), wherever the file is
_READ_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EIO})


def _input_fault(exc: OSError, cache: Path | None) -> str | None:
    """The error line for ``exc`` where it is a fault reading one of the run's inputs (a file
    the user gave: a feature file, an id list, a data set's table), else None. An input is an
    existing file outside the cache folder (neither in it nor one of the folders holding it),
    failing with a read error (:data:`_READ_ERRORS`: no permission, a disk error); the cache's
    own faults, and a full disk anywhere, are :func:`_storage_fault`'s ("cannot write the
    run")."""
    from .cache import read_error_text
    from .settings import cache_root

    if exc.errno not in _READ_ERRORS or not exc.filename:
        return None
    try:
        path = Path(os.fsdecode(exc.filename))
        if not path.is_file():
            return None
        folder = Path(os.path.abspath(cache or cache_root()))
        for file in {Path(os.path.abspath(path)), path.resolve()}:
            for top in {folder, folder.resolve()}:
                if file.is_relative_to(top) or top.is_relative_to(file):
                    return None
    except (OSError, ValueError):
        return None
    return read_error_text(exc, path, "input file")


def _storage_fault(exc: OSError, cache: Path | None) -> str | None:
    """What the user must fix about the cache's storage, in words, or None (another fault)."""
    from .cache import ShortWriteError

    if exc.errno in _STORAGE_ERRORS:
        return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    if isinstance(exc, ShortWriteError):  # whatever the free space: a quota or a size limit
        return str(exc)
    if exc.errno is not None:
        return None
    from .settings import cache_root

    folder = cache or cache_root()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= _NEARLY_FULL_BYTES:
        return None
    return f"the disk holding {folder} is full ({free / 2**20:.1f} MiB free; {exc})"


def run_line(run: Any) -> str:
    """What a finished precompute made, in one line: its models by modality and GPA, e.g.
    ``run PATH: 239 stimuli; vision a, b; language c; GPA 6 iterations (converged)``; models of
    other modalities (brain recordings) follow by modality, and GPA names its models when they
    are not the vision models (``GPA across subj01, subj02: 6 iterations``)."""
    subset = run.manifest.dataset.subset
    of = "" if subset is None else f" (of {subset.of}: --stimuli {subset.rule})"
    parts = [
        f"{run.n_stimuli} stimuli{of}", f"vision {', '.join(run.vision_models) or '-'}",
        f"language {', '.join(run.language_models) or '-'}",
    ]
    others: dict[str, list[str]] = {}
    for model in run.other_models:
        others.setdefault(run.modality(model), []).append(model)
    parts += [f"{modality} {', '.join(models)}" for modality, models in others.items()]
    gpa = list(run.gpa.models)
    across = "" if gpa == run.vision_models else f" across {', '.join(gpa)}:"
    stop = run.gpa_stop  # None: GPA ran to its optimum (the default)
    if not run.gpa.converged:
        status = "NOT converged"
    elif stop is None:
        status = "converged"
    elif stop.met:
        status = f"stopped at its residuals' uncertainty, loss tol {stop.tol:.0e}"
    elif stop.step_over_spread is None:  # every random start ended at the same residuals
        status = (f"converged: the random starts agree exactly, no uncertainty to stop at "
                  f"before loss tol {stop.tol:.0e}")
    else:
        status = f"converged: the uncertainty rule did not hold before loss tol {stop.tol:.0e}"
    parts.append(f"GPA{across} {run.gpa.n_iter} iterations ({status})")
    return f"run {run.path}: " + "; ".join(parts)


def _other_models(models: Mapping[str, str], gpa: Sequence[str]) -> str:
    """``runs``' other column: models of other modalities by modality, then the GPA models when
    they are not the vision models (``subj01,subj02 (brain; GPA)``)."""
    by_modality: dict[str, list[str]] = {}
    for model, modality in models.items():
        by_modality.setdefault(modality, []).append(model)
    parts = []
    for modality, names in by_modality.items():
        in_gpa = bool(set(names) & set(gpa))
        parts.append(f"{','.join(names)} ({modality}{'; GPA' if in_gpa else ''})")
    return " ".join(parts) or "-"


def _status(info: Any) -> str:
    if info.damaged is not None:
        return "damaged"
    if info.summary.needs_upgrade:
        return "needs upgrade (rerun its precompute)"
    if info.summary.complete:
        return "complete"
    from .cache import live_writer

    writer = live_writer(info.path)  # a precompute writing it now, or one that stopped
    return f"being written (pid {writer})" if writer is not None else "incomplete"


def _run_runs(args: argparse.Namespace, out: TextIO) -> int:
    from .run import list_runs

    from .settings import cache_folder

    cache = cache_folder(args.cache)
    runs = list_runs(cache / "runs")
    if args.json:
        print(
            json.dumps(
                [
                    {"name": r.name, "path": str(r.path), "damaged": r.damaged,
                     **r.summary.as_dict()}
                    for r in runs
                ],
                indent=2,
            ),
            file=out,
        )
        return 0
    if not runs:
        print(
            f"no cached runs in {cache / 'runs'}; make one with "
            f"{command(args.prog, 'precompute --preset demo')}",
            file=out,
        )
        return 0
    rows = [
        (
            r.name,
            _status(r),
            "-" if r.summary.n_stimuli is None else str(r.summary.n_stimuli),
            ",".join(r.summary.vision_models) or "-",
            ",".join(r.summary.language_models) or "-",
            _other_models(r.summary.other_models, r.summary.gpa_models),
            r.summary.updated or "-",
            str(r.path),
        )
        for r in runs
    ]
    header = ("name", "status", "n", "vision", "language", "other", "updated", "path")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )
    for info in runs:
        if info.damaged is not None:
            print(f"damaged run {info.name}: {info.damaged}", file=out)
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    prog: str = "python -m convergence_core",
) -> int:
    """Entry point of ``python -m convergence_core``; returns the exit status.

    ``prog`` is the command name shown in help and usage lines (``convergence`` for the console
    script); the commands are the same. Output whose reader went away (``runs --json | head -1``:
    ``head`` exits after its line) ends the command quietly with :data:`EXIT_BROKEN_PIPE`, as a
    command killed by SIGPIPE ends, instead of a BrokenPipeError traceback
    (:func:`_output_closed`).
    """
    try:
        return _main(argv, out=out, err=err, prog=prog)
    except BrokenPipeError as exc:
        # only the reader of our output going away ends quietly; a broken pipe of the work
        # itself (a worker's, a file's) is an error like any other
        if exc.filename is not None or not _output_closed():
            raise
        return EXIT_BROKEN_PIPE


#: Exit status of a command whose output's reader went away: 128 + SIGPIPE (13), what the shell
#: reports for a command killed by SIGPIPE (``yes | head -1``: ``yes`` exits 141)
EXIT_BROKEN_PIPE = 128 + 13


def _output_closed() -> bool:
    """After a BrokenPipeError: whether it came from standard output or standard error losing
    its reader (``runs --json | head -1``, ``2>&1 | head``), and if so point that stream at
    /dev/null, so that the interpreter's flush of its buffer at exit neither raises again nor
    prints "Exception ignored ... BrokenPipeError" (the recipe of Python's ``signal``
    documentation, "Note on SIGPIPE"). A stream whose reader is there is left as it is. False
    (neither stream lost its reader): the broken pipe was another one (a worker's), which is
    not the reader going away."""
    closed = False
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # None, a test's StringIO, or closed
            continue
        if not _reader_gone(fd):
            continue
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        closed = True
    return closed


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is the writing end of a pipe (or socket) whose reader has gone: polling it
    reports an error or a hang-up (POSIX). Where ``select.poll`` is missing (Windows), every
    stream is taken to have lost its reader, as the recipe does."""
    import select

    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _main(
    argv: Sequence[str] | None,
    *,
    out: TextIO | None,
    err: TextIO | None,
    prog: str,
) -> int:
    """:func:`main`, which turns a closed output into its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if argv and argv[0] == "report":
        from . import report

        return int(report.main(argv[1:], prog=prog) or 0)
    if argv and argv[0] == "serve":
        from .dashboard import serve

        return int(serve.main(argv[1:], prog=f"{prog} serve") or 0)
    parser = _build_parser(prog)
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


def console_main() -> int:
    """The ``convergence`` console script (``[project.scripts]`` in pyproject.toml)."""
    return main(prog="convergence")
