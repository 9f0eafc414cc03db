"""The resumable precompute pipeline.

dataset -> embeddings -> neighbour lists -> GPA -> dispersion + PCA -> thumbnails -> properties.

Configure it with :class:`PrecomputeConfig` (or a .json/.toml file, or keyword options) and call
:func:`precompute`. Each step is recorded in the run's manifest with the fingerprint of its
inputs and skipped on a rerun whose inputs are unchanged, so an interrupted run resumes and a
finished one costs seconds. The files of each step are written by :mod:`.run_writer`;
``write_run_from_embeddings`` is re-exported here.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cache import (
    CacheFormatError,
    RunLayout,
    clean_temp_files,
    colliding_keys,
    lock_path,
    model_key,
    read_json,
    read_npy,
    read_parquet,
    run_lock,
    write_npy,
    write_parquet,
)
from .dispersion import SCORES
from .gpa_stability import GPA_STOPS
from .manifest import (
    FEATURE_IDS_DATASET,
    MANIFEST_FORMAT,
    DatasetInfo,
    GPARecord,
    Manifest,
    ManifestError,
    ModelEntry,
    StimulusSubset,
    parse_manifest,
)
from .neighbours import DEFAULT_LIST_SIZE, clip_threshold, list_size_for
from .procrustes import DEFAULT_TOL as DEFAULT_GPA_TOL
from .procrustes import GPA_ALGORITHM
from .run import Run, load_run
from .run_writer import (
    NEIGHBOURS_ALGORITHM,
    THUMBNAIL_SIZE,
    RunManifest,
    StabilitySolutions,
    adopted_solution,
    check_embedding_array,
    clip_thresholds,
    empty_manifest,
    fingerprint,
    library_versions,
    model_entry,
    normalise_stimuli,
    prepare_run_folder,
    remove_new_run_folder,
    remove_reset_leftover,
    stability_record_state,
    stored_file_problem,
    upgrade_stability_record,
    write_dispersion,
    write_gpa,
    write_gpa_solution,
    write_gpa_stability,
    write_gpa_to_uncertainty,
    write_model_arrays,
    write_neighbour_lists,
    write_properties,
    write_thumbnails,
)
from .settings import cache_folder, cache_root_given

__all__ = [
    "GPA_MAX_ITER",
    "GPA_TOL",
    "PrecomputeConfig",
    "ProgressEvent",
    "default_run_name",
    "precompute",
    "write_run_from_embeddings",
]

#: GPA settings used by the pipeline (recorded in gpa/gpa.json).
# GPA's own default: the loss is flat near the optimum, so residuals settle only well below where
# the loss does (at 1e-10 they were still ~1e-6 from the optimum's); iterations cost O(M² d³), not n
GPA_TOL = DEFAULT_GPA_TOL
#: random starts of the GPA stability diagnostic stored in every run (gpa/stability.*; 0: none)
GPA_STARTS = 4
#: seed of those starts
GPA_STABILITY_SEED = 0
#: how GPA stops (``gpa_stability.GPA_STOPS``): at the optimum, or at its residuals' uncertainty
GPA_STOP = "optimum"
GPA_MAX_ITER = 1000


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything that decides what a run contains.

    Attributes:
        dataset: a dataset spec for ``load_dataset``: a folder / table path, ``"hf:<name>"``, or a
            mapping ``{"kind", "path", **options}``. None (only when every model comes from
            ``features``): the stimuli are the ids of the first feature file, in its order, with
            no images and no captions (:func:`stimuli_from_feature_files`).
        vision_models / language_models: registry names (``models.get_spec``) whose
            representations are extracted here (encoders).
        features: models whose representations a user brings as files, ``{model: path}`` or
            ``{model: {layer: path}}`` (``.npy`` + ``.ids.txt``, or ``.parquet`` with an ``id``
            column; see :mod:`.sources`); each needs a ``modalities`` entry.
        modalities: ``{file model: "vision" | "language" | "brain" | any name}``.
        gpa_models: the models that enter the intra-modal GPA (default: every vision model,
            from encoders and files alike); at least 2.
        layers: ``"all"`` (every layer of every model), ``"default"`` (only each encoder's default
            layer; a model from feature files keeps every file given for it), or
            ``{model: [layer, ...]}`` (models not named get all their layers).
        gpa_layers: ``{GPA model: layer}`` entering GPA (always extracted, whatever ``layers``
            says); default: the model's default layer.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (or ``"mps:0"``).
        batch_size: stimuli per forward pass.
        caption_mode: ``"first"`` (embed each stimulus's first caption) or ``"mean"`` (embed
            every caption and average the embeddings per stimulus, float64); see
            ``extract.captions_for_language``.
        drop_bad: drop stimuli with a missing/corrupt image or no caption (recorded in the
            manifest) instead of stopping with the list of them.
        stimuli: which of the data set's stimuli (or, without a data set, of the first feature
            file's ids) the run holds: ``"all"`` (every feature file must cover exactly them),
            ``"common"`` (those that every feature file covers; rows of files for other ids are
            skipped: brain recordings of a subset, say) or the path of a text file listing the
            ids to keep, one per line (every feature file must cover them). The data set's
            order is kept; :func:`restrict_stimuli`.
        run_name: folder name under ``<cache>/runs/``; default ``<dataset>-<config hash>``.
        cache_root: cache folder; default ``settings.cache_root()``. It holds the run and all
            else the run caches (converted model weights): ``settings.cache_root_given``.
        weights: ``{model: local weights path}`` for encoders whose weights are not installed.
        thumbnails: write gallery thumbnails.
        list_size: K, the exact nearest neighbours stored per stimulus and layer
            (``neighbours.DEFAULT_LIST_SIZE``; n − 1 for small n).
        neighbour_layers: ``"all"`` (lists for every stored layer) or ``"default"`` (only each
            model's default / GPA layer; other layers are still exact, computed from their
            features, which is slower for large subsets).
        precision: ``"auto"`` (float16 autocast for vision models on CUDA, float32 otherwise),
            ``"float32"``, ``"float16"`` or ``"bfloat16"`` (``extract.precision_plan``).
        engine: where extraction runs: ``"local"`` (this process) or ``"ray"`` (a Ray Data
            pipeline per model; ``engines`` / ``ray_engine``). The engine never changes the numbers.
        ray_address: an existing Ray cluster (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``);
            None starts a local Ray instance for the run.
        concurrency: Ray actors per model (None: as many as the cluster's CPUs / GPUs allow).
        num_cpus / num_gpus: resources per Ray actor (None: 1 CPU; 1 GPU on CUDA).
        runtime_env: Ray ``runtime_env`` mapping (e.g. to ship this package to the workers).
        gpa_starts: random starts of the GPA stability diagnostic stored in the run
            (``gpa_stability``; shown on Home and Stimuli); 0 leaves it out. They are also
            candidates for GPA's answer: a start that reaches a minimum clearly lower than
            Gower's start's (beyond the diagnostic's ``optimum_margin``) is the run's GPA
            solution (residuals, maps, dispersion), and the diagnostic says so.
        gpa_stop: ``"optimum"`` (GPA's loss rule to ``GPA_TOL``: the same optimum as a
            tol = 1e-13 run) or ``"uncertainty"`` (stop once the residuals move less than a
            tenth of their spread over the diagnostic's random starts,
            ``gpa_stability.gpa_to_uncertainty``: far fewer iterations for models of equal
            width, residuals about that spread from the optimum's; needs ``gpa_starts`` ≥ 1).

    ``batch_size`` may also be ``"auto"``: as many items as fill 80 % of the free GPU memory
    (measured once per model; ``extract.fit_batch_size``), 32 on CPU.
    """

    dataset: Any = None
    vision_models: tuple[str, ...] = ()
    language_models: tuple[str, ...] = ()
    features: Mapping[str, Any] | None = None
    modalities: Mapping[str, str] | None = None
    gpa_models: tuple[str, ...] | None = None
    layers: Any = "all"
    gpa_layers: Mapping[str, str] | None = None
    device: str = "cpu"
    batch_size: int = 32
    caption_mode: str = "first"
    drop_bad: bool = False
    stimuli: str = "all"
    run_name: str | None = None
    cache_root: str | None = None
    weights: Mapping[str, str] | None = None
    thumbnails: bool = True
    list_size: int = DEFAULT_LIST_SIZE
    neighbour_layers: str = "all"
    precision: str = "auto"
    engine: str = "local"
    ray_address: str | None = None
    concurrency: int | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    runtime_env: Mapping[str, Any] | None = None
    gpa_starts: int = GPA_STARTS
    gpa_stop: str = GPA_STOP

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_gpa_stop(self.gpa_stop, self.gpa_starts)
        object.__setattr__(self, "vision_models", _name_tuple(self.vision_models, "vision_models"))
        object.__setattr__(
            self, "language_models", _name_tuple(self.language_models, "language_models")
        )
        if isinstance(self.dataset, os.PathLike):
            object.__setattr__(self, "dataset", os.fspath(self.dataset))
        if isinstance(self.stimuli, os.PathLike):
            object.__setattr__(self, "stimuli", os.fspath(self.stimuli))
        if isinstance(self.cache_root, os.PathLike):
            object.__setattr__(self, "cache_root", os.fspath(self.cache_root))
        if self.weights is not None:
            object.__setattr__(
                self, "weights", {str(m): os.fspath(p) for m, p in self.weights.items()}
            )
        if not self.dataset:
            if self.vision_models or self.language_models:
                encoders = [*self.vision_models, *self.language_models]
                raise ValueError(
                    f"no dataset given, but encoder models {encoders} embed its images and "
                    "captions; give the data set (--dataset, or dataset=<folder, table file or "
                    "hf:name>); only a run whose every model comes from feature files may leave "
                    "it out"
                )
            if not self.features:
                raise ValueError("no dataset given; pass dataset=<folder, table file or hf:name>")
            object.__setattr__(self, "dataset", None)
        from .extract import CAPTION_MODES

        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(
                f"unknown caption_mode {self.caption_mode!r}; use one of {list(CAPTION_MODES)}"
            )
        if self.batch_size != "auto" and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be a positive integer or 'auto', got {self.batch_size!r}"
            )
        from .engines import check_engine_settings

        check_engine_settings(self)
        if isinstance(self.layers, str):
            if self.layers not in ("all", "default"):
                raise ValueError(
                    f"layers={self.layers!r} is not understood; use 'all', 'default' or "
                    "{model: [layer, ...]}"
                )
        elif isinstance(self.layers, Mapping):
            listed = {*self.vision_models, *self.language_models}
            for model, chosen in self.layers.items():
                if model in (self.features or {}):
                    raise ValueError(
                        f"layers names {model!r}, a model read from feature files: its layers "
                        "are the files given for it (NAME:LAYER=PATH); leave it out of layers"
                    )
                if model not in listed:
                    raise ValueError(
                        f"layers names {model!r}, which is not among the models extracted here "
                        f"{sorted(listed)}"
                    )
                if isinstance(chosen, str) or not chosen:
                    raise ValueError(f"layers[{model!r}] must be a non-empty list of layer names")
            object.__setattr__(
                self, "layers", {m: [str(x) for x in chosen] for m, chosen in self.layers.items()}
            )
        else:
            raise ValueError("layers must be 'all', 'default' or a {model: [layer, ...]} mapping")
        encoders = sorted({*self.vision_models, *self.language_models})
        for model in self.weights or {}:
            if model not in encoders:  # a typo would silently run on the installed weights
                raise ValueError(
                    f"weights names {model!r}, which is not among the models extracted here "
                    f"{encoders}; spell it as the model is listed (--weights MODEL=PATH)"
                )
        list_size_for(10**9, self.list_size)  # raises the explained error for a bad K
        if self.neighbour_layers not in ("all", "default"):
            raise ValueError(
                f"neighbour_layers={self.neighbour_layers!r} is not understood; use 'all' or "
                "'default'"
            )
        self._check_features()
        gpa = self.gpa_model_names
        if self.gpa_models is not None:
            unknown = [m for m in gpa if m not in self.model_names]
            if unknown:
                raise ValueError(
                    f"gpa_models names {unknown}, which are not models of this run; use some of "
                    f"{self.model_names}"
                )
        for model, layer in (self.gpa_layers or {}).items():
            if model not in gpa:
                raise ValueError(
                    f"gpa_layers names {model!r}, which is not a model entering GPA; use one of "
                    f"{gpa}"
                )
            files = (self.features or {}).get(model)
            if files is not None and layer not in files:
                # known now, before any file is read or list built (an encoder's layers are known
                # once it is loaded, and checked then)
                raise ValueError(
                    f"gpa_layers[{model!r}] = {layer!r} is not a layer of {model!r}, whose layers "
                    f"are its feature files {list(files)}; name one of them (--gpa-layer "
                    f"{model}=LAYER) or add the file (--features {model}:{layer}=PATH)"
                )

    def _check_features(self) -> None:
        from .sources import check_modality

        features: dict[str, dict[str, str]] = {}
        for model, spec in (self.features or {}).items():
            model = str(model)
            if model in self.vision_models or model in self.language_models:
                raise ValueError(
                    f"model {model!r} is listed both as an encoder and with a feature file; keep "
                    "one of the two"
                )
            if isinstance(spec, (str, os.PathLike)):
                features[model] = {"features": os.fspath(spec)}
            elif isinstance(spec, Mapping) and spec and all(
                isinstance(v, (str, os.PathLike)) for v in spec.values()
            ):
                features[model] = {str(layer): os.fspath(v) for layer, v in spec.items()}
            else:
                raise ValueError(
                    f"features[{model!r}] must be a file path or {{layer: path}}, got {spec!r}"
                )
        modalities = {str(m): v for m, v in (self.modalities or {}).items()}
        for model in modalities:
            if model not in features:
                raise ValueError(
                    f"modalities names {model!r}, which has no feature file; an encoder's modality "
                    "comes from the model registry (list it under vision_models or "
                    "language_models)"
                )
        for model in features:
            if model not in modalities:
                raise ValueError(
                    f"say which modality the features of {model!r} are: --modality "
                    f"{model}=vision|language|brain|<name> (or modalities = {{{model} = ...}})"
                )
            check_modality(modalities[model], model)
        object.__setattr__(self, "features", features or None)
        object.__setattr__(self, "modalities", modalities or None)
        if self.gpa_models is not None:
            object.__setattr__(self, "gpa_models", _name_tuple(self.gpa_models, "gpa_models"))

    @property
    def model_names(self) -> list[str]:
        """Every model: encoder vision models, encoder language models, then file models."""
        return [*self.vision_models, *self.language_models, *(self.features or {})]

    def modality_of(self, model: str) -> str:
        if model in self.vision_models:
            return "vision"
        if model in self.language_models:
            return "language"
        return str((self.modalities or {})[model])

    @property
    def gpa_model_names(self) -> list[str]:
        if self.gpa_models is not None:
            return list(self.gpa_models)
        return [m for m in self.model_names if self.modality_of(m) == "vision"]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> PrecomputeConfig:
        """Build from a dict (e.g. a parsed config file); unknown keys raise ValueError.

        A ``models`` list (``[[models]]`` tables in TOML) may describe the models one by one:
        ``{name, modality?}`` for an encoder (its modality from the registry) or ``{name,
        modality, path, layer?}`` / ``{name, modality, files = {layer = path}}`` for features
        from files; it is folded into ``vision_models``, ``language_models``, ``features`` and
        ``modalities``.
        """
        known = {f.name for f in fields(cls)}
        mapping = dict(mapping)
        if "models" in mapping:
            mapping = _fold_models_table(mapping)
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        models = ("features", "vision_models", "language_models")
        if "dataset" not in mapping and not any(mapping.get(key) for key in models):
            raise ValueError(
                "a precompute config needs at least 'dataset' and some models (or only "
                "'features', whose first file's ids are then the stimuli)"
            )
        return cls(**mapping)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PrecomputeConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) config file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; pass a .json or .toml file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"config file {path} is not UTF-8 text; save it as a UTF-8 .toml or .json file"
            ) from None
        except OSError as exc:  # no permission, an I/O error
            raise ValueError(
                f"config file {path} cannot be read ({exc.strerror or exc}); check its "
                "permissions, or copy it somewhere readable"
            ) from None
        try:
            if path.suffix.lower() == ".toml":
                data = tomllib.loads(text)
            elif path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                raise ValueError(f"config file {path} must end in .json or .toml")
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot parse config file {path}: {exc}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"config file {path} must hold a table/object of settings")
        return cls.from_mapping(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in the manifest)."""
        return json.loads(json.dumps(asdict(self), default=str))

    def sources(self) -> list[Any]:
        """The :mod:`.sources` of every model, in :attr:`model_names` order."""
        from .sources import EncoderSource, FileSource

        out: list[Any] = [EncoderSource(m, "vision") for m in self.vision_models]
        out += [EncoderSource(m, "language") for m in self.language_models]
        out += [
            FileSource(m, self.modality_of(m), files, extra_rows=self.stimuli != "all")
            for m, files in (self.features or {}).items()
        ]
        return out

    def layers_for(self, model: str) -> str | list[str]:
        """``"all"``, ``"default"`` or the list of layers chosen for ``model``."""
        if isinstance(self.layers, Mapping):
            return list(self.layers[model]) if model in self.layers else "all"
        return self.layers


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)


def _is_str_map(value: Any, check_value: Callable[[Any], bool]) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and k and check_value(v) for k, v in value.items()
    )


#: field -> (accepts the value, what it must be: the fix in the error message)
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (
        lambda v: v is None
        or isinstance(v, (str, os.PathLike))
        or (isinstance(v, Mapping) and "path" in v and _is_path(v["path"])),
        'a dataset folder or table path (a string), "hf:<name>", a mapping '
        '{"kind": ..., "path": "..."}, or None when every model comes from feature files',
    ),
    "vision_models": (
        lambda v: isinstance(v, str) or _is_str_list(v) or v == (),
        'a list of model names, e.g. ["efficientnet-lite0", "efficientnet-lite1"] '
        '(or one comma-separated string)',
    ),
    "language_models": (
        lambda v: isinstance(v, str) or _is_str_list(v),
        'a list of model names, e.g. ["minilm"] (or one comma-separated string; [] for none)',
    ),
    "layers": (
        lambda v: isinstance(v, str) or _is_str_map(v, _is_str_list),
        '"all", "default" or a mapping {model: [layer, ...]}',
    ),
    "gpa_layers": (
        lambda v: v is None or _is_str_map(v, lambda x: isinstance(x, str) and bool(x)),
        "a mapping {vision model: layer name} (or null / left out for the default layers)",
    ),
    "device": (  # torch's names for the devices extraction runs on (a typo failed mid-run)
        lambda v: isinstance(v, str) and re.fullmatch(r"cpu|(mps|cuda)(:[0-9]+)?", v) is not None,
        'a device name: "cpu", "cuda", "cuda:N" (the N-th GPU), "mps" or "mps:0"',
    ),
    "batch_size": (
        lambda v: (isinstance(v, int) and not isinstance(v, bool)) or v == "auto",
        'a positive whole number such as 32, or "auto" (fill the GPU)',
    ),
    "caption_mode": (lambda v: isinstance(v, str), '"first" or "mean"'),
    "drop_bad": (lambda v: isinstance(v, bool), "true or false"),
    "stimuli": (
        lambda v: isinstance(v, (str, os.PathLike)) and bool(os.fspath(v).strip()),
        '"all" (the default), "common" (the stimuli every feature file covers) or the path of '
        "a text file listing the ids to keep, one per line",
    ),
    "run_name": (
        lambda v: v is None or (isinstance(v, str) and bool(v.strip())),
        "a non-empty folder name such as \"demo\" (or null / left out for an automatic name)",
    ),
    "cache_root": (
        lambda v: v is None or _is_path(v),
        "a folder path (a string), or null / left out for the default cache",
    ),
    "weights": (
        lambda v: v is None or _is_str_map(v, _is_path),
        "a mapping {model name: local weights path} (or null / left out)",
    ),
    "thumbnails": (lambda v: isinstance(v, bool), "true or false"),
    "gpa_starts": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "a whole number >= 0 such as 4 (random starts of the GPA stability diagnostic; 0: none)",
    ),
    "gpa_stop": (
        lambda v: v in GPA_STOPS,
        '"optimum" (GPA to its optimum, the default) or "uncertainty" (GPA stopped once its '
        "residuals move less than their spread over the random starts)",
    ),
    "features": (
        lambda v: v is None
        or _is_str_map(v, lambda x: _is_path(x) or _is_str_map(x, _is_path)),
        "a mapping {model: feature file path} or {model: {layer: path}} (or null / left out)",
    ),
    "modalities": (
        lambda v: v is None or _is_str_map(v, lambda x: isinstance(x, str) and bool(x)),
        'a mapping {file model: "vision" | "language" | "brain" | a name} (or null / left out)',
    ),
    "gpa_models": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "a list of model names entering GPA (or null / left out for the vision models)",
    ),
    "list_size": (
        lambda v: isinstance(v, int) and not isinstance(v, bool),
        "a positive whole number such as 128 (neighbours stored per stimulus)",
    ),
    "neighbour_layers": (lambda v: isinstance(v, str), '"all" or "default"'),
    "precision": (lambda v: isinstance(v, str), '"auto", "float32", "float16" or "bfloat16"'),
    "engine": (lambda v: isinstance(v, str), '"local" or "ray"'),
    "ray_address": (
        lambda v: v is None or (isinstance(v, str) and bool(v.strip())),
        'a Ray cluster address such as "auto" or "host:6379" (or null / left out)',
    ),
    "concurrency": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
        "a whole number of Ray actors per model (or null / left out)",
    ),
    "num_cpus": (
        lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
        "a number of CPUs per Ray actor (or null / left out)",
    ),
    "num_gpus": (
        lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
        "a number of GPUs per Ray actor (or null / left out)",
    ),
    "runtime_env": (
        lambda v: v is None or isinstance(v, Mapping),
        "a Ray runtime_env mapping (or null / left out)",
    ),
}


def _check_gpa_stop(stop: str, starts: int) -> None:
    """``gpa_stop`` is one of ``GPA_STOPS``, and "uncertainty" has random starts to compare."""
    if stop not in GPA_STOPS:
        raise ValueError(
            f"gpa_stop={stop!r} is not understood; use one of {list(GPA_STOPS)}"
        )
    if stop == "uncertainty" and starts < 1:
        raise ValueError(
            'gpa_stop="uncertainty" compares the residuals\' steps with their spread over the '
            "stability diagnostic's random starts, and gpa_starts is 0; pass gpa_starts >= 1 "
            '(e.g. 4) or gpa_stop="optimum"'
        )


def _check_field_types(config: PrecomputeConfig) -> None:
    """ValueError naming the first field whose value is not accepted (of the wrong type, or a
    word, number or path it cannot be), and what it must be."""
    for spec in fields(config):
        accepts, expected = _FIELD_TYPES[spec.name]
        value = getattr(config, spec.name)
        if not accepts(value):
            raise ValueError(
                f"config value {spec.name!r} = {_shown(value)} is not accepted; it must be "
                f"{expected}"
            )


def _fold_models_table(mapping: dict[str, Any]) -> dict[str, Any]:
    """``models = [{name, modality?, path?/files?, layer?}, ...]`` -> the config's own keys."""
    table = mapping.pop("models")
    if not isinstance(table, list) or not all(isinstance(e, Mapping) for e in table):
        raise ValueError("'models' must be a list of tables ([[models]] with name, modality, path)")
    vision = list(_name_tuple(mapping.get("vision_models", ()), "vision_models"))
    language = list(_name_tuple(mapping.get("language_models", ()), "language_models"))
    features = dict(mapping.get("features") or {})
    modalities = dict(mapping.get("modalities") or {})
    for entry in table:
        unknown = sorted(set(entry) - {"name", "modality", "path", "layer", "files"})
        if unknown or "name" not in entry:
            raise ValueError(
                f"[[models]] entry {dict(entry)!r}: needs 'name', may have 'modality', 'path', "
                f"'layer' or 'files'; unknown keys {unknown}"
            )
        name = str(entry["name"])
        if "path" in entry or "files" in entry:
            if "files" in entry:
                features[name] = dict(entry["files"])
            else:
                features[name] = {str(entry.get("layer", "features")): entry["path"]}
            if "modality" not in entry:
                raise ValueError(
                    f"[[models]] entry {name!r} reads features from a file: give its modality "
                    "(vision, language, brain or a name)"
                )
            modalities[name] = entry["modality"]
            continue
        from . import models

        modality = entry.get("modality") or models.get_spec(name).modality
        (vision if modality == "vision" else language).append(name)
    mapping.update(
        vision_models=vision, language_models=language, features=features or None,
        modalities=modalities or None,
    )
    return mapping


def _name_tuple(names: Any, what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{what} must be a list of model names, got {names!r}")
    names = tuple(str(n).strip() for n in names)
    if len(set(names)) != len(names):
        raise ValueError(f"{what} lists a model twice: {list(names)}; list each model once")
    return names


@dataclass(frozen=True)
class ProgressEvent:
    """What the pipeline is doing, sent to the ``progress`` callback.

    ``step``: "dataset", "waiting" (for another process writing the same run), "extract",
    "neighbours", "gpa", "gpa_stability", "dispersion", "thumbnails", "properties" or "done"; ``model``: the model
    being extracted or indexed (else None; "<model> (every caption, for caption agreement)" while
    the properties step embeds every caption of a run extracted before that step existed;
    "properties": the language model whose part is done); ``done`` of ``total`` items (stimuli,
    captions or rows; "properties": parts; "gpa": iterations of at most ``max_iter``, then the
    residual pass; "gpa_stability": solutions, then the residual pass); ``skipped``: the step was
    cached and is not recomputed; ``detail``: where the step is, in words ("iteration 12"), for a
    log.
    """

    step: str
    model: str | None
    done: int
    total: int
    skipped: bool = False
    detail: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def default_run_name(
    config: PrecomputeConfig, dataset_name: str, *, as_spelt: bool = False
) -> str:
    """``<dataset>-<12 hex>``: a hash of everything in the config that changes the results, its
    paths absolute and normal (``as_spelt``: as given, the name earlier versions gave, which
    :func:`_run_name` still finds)."""
    # settings added later count only when changed from their default, so that existing runs
    # keep their folder names
    from .engines import ENGINE_SETTINGS

    added_later = {
        "list_size": DEFAULT_LIST_SIZE,
        "neighbour_layers": "all",
        "features": None,
        "modalities": None,
        "gpa_models": None,
        "precision": "auto",
        "gpa_starts": GPA_STARTS,
        "gpa_stop": GPA_STOP,
        "stimuli": "all",
    }
    relevant = {
        k: v
        for k, v in (config.to_dict() if as_spelt else _spelt_alike(config.to_dict())).items()
        if k not in ("run_name", "cache_root", "batch_size", "thumbnails", *ENGINE_SETTINGS)
        and not (k in added_later and v == added_later[k])
    }
    safe = model_key(dataset_name.replace(" ", "-"))
    return f"{safe}-{fingerprint(relevant)[:12]}"


def _run_name(cfg: PrecomputeConfig, dataset_name: str, cache: Path) -> str:
    """``run_name``, else :func:`default_run_name`; where no run has that name yet but one has the
    name of the paths as spelt (a relative --dataset, --features, --stimuli or --weights named
    the run so before paths were normalised), that run, so that it is resumed, not recomputed."""
    if cfg.run_name:
        return cfg.run_name
    name, spelt = (default_run_name(cfg, dataset_name, as_spelt=raw) for raw in (False, True))
    runs = cache / "runs"
    kept = not (runs / model_key(name)).exists() and (runs / model_key(spelt)).is_dir()
    return spelt if kept else name


def _spelt_alike(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (``PrecomputeConfig.to_dict``) with every path absolute and normal, so that
    ``./f/a.npy``, ``f//a.npy`` and ``/abs/f/a.npy`` name one run (symbolic links are kept)."""

    def norm(path: str) -> str:
        return path if path.startswith("hf:") else os.path.abspath(os.path.expanduser(path))

    dataset, weights, features = settings["dataset"], settings["weights"], settings["features"]
    if isinstance(dataset, str):
        settings["dataset"] = norm(dataset)
    elif isinstance(dataset, dict) and dataset.get("kind") != "hf":
        settings["dataset"] = {**dataset, "path": norm(str(dataset["path"]))}
    if settings["stimuli"] not in ("all", "common"):
        settings["stimuli"] = norm(settings["stimuli"])
    settings["weights"] = weights and {model: norm(p) for model, p in weights.items()}
    settings["features"] = features and {
        model: {layer: norm(p) for layer, p in files.items()} for model, files in features.items()
    }
    return settings


def _resolve_config(config: Any, options: Mapping[str, Any]) -> PrecomputeConfig:
    if config is None:
        return PrecomputeConfig.from_mapping(options)
    if isinstance(config, PrecomputeConfig):
        base = config
    elif isinstance(config, Mapping):
        base = PrecomputeConfig.from_mapping(config)
    elif isinstance(config, (str, os.PathLike)):
        base = PrecomputeConfig.from_file(config)
    else:
        raise ValueError(
            f"config must be a PrecomputeConfig, a mapping or a .json/.toml path, got "
            f"{type(config).__name__}"
        )
    if options:
        return PrecomputeConfig.from_mapping({**asdict(base), **options})
    return base


def _check_models(config: PrecomputeConfig) -> None:
    """Fail before any heavy work: unknown names, a model under the wrong modality, too few
    models for GPA, feature files that do not exist, a device that is not here."""
    from . import models

    gpa = config.gpa_model_names
    if len(gpa) < 2:
        raise ValueError(
            f"GPA needs at least 2 vision models (or GPA models named otherwise), got {gpa}; add "
            "vision models (encoders, or --features with --modality NAME=vision) or name the "
            "models GPA aligns with --gpa-models A,B (gpa_models in a config or in Python; e.g. "
            "brain subjects)"
        )
    both = sorted(set(config.vision_models) & set(config.language_models))
    if both:
        raise ValueError(f"models {both} are listed as both vision and language models; pick one")
    for expected, names in (("vision", config.vision_models), ("language", config.language_models)):
        for name in names:
            spec = models.get_spec(name)
            modality = getattr(spec, "modality", expected)
            if modality != expected:
                raise ValueError(
                    f"{name!r} is a {modality} model but was listed as a {expected} model; move "
                    f"it to the {modality} models"
                )
    config.sources()  # file sources check that their files exist
    if config.device != "cpu":  # a GPU that is not here: said now, not after the image check
        from .models.base import resolve_device

        try:
            resolve_device(config.device)
        except ValueError as exc:
            raise ValueError(
                f"{exc}. The data set and the models' weights are checked after the device: "
                "--device cpu also shows whether they are all here"
            ) from None


def _check_weights(config: PrecomputeConfig, names: Sequence[str]) -> None:
    """``models.check_weights_available`` for ``names`` (no model is loaded): a model whose
    weights are missing stops the run before any work, with the ways to supply them."""
    if names:
        from . import models

        models.check_weights_available(names, weights=config.weights)


def _recorded_extractions(path: Path) -> set[str]:
    """Models whose extraction the manifest at ``path`` records (a cheap look before the dataset
    is checked; the pipeline checks exactly once it has the dataset's fingerprint); a manifest
    that cannot be read is refused here already (:func:`_read_manifest`)."""
    manifest = _read_manifest(RunLayout(path))
    steps = manifest.steps if manifest is not None else {}
    return {step.removeprefix("extract:") for step in steps if step.startswith("extract:")}


def _waiting_words(pid: int | None, run_folder: Path, seconds: float) -> str:
    """Who holds the run's lock and what to do if it is no precompute (a process id reused after
    a kill): the waiting line said only "waiting", for up to an hour (reliability audit)."""
    holder = f"process {pid}" if pid is not None else "another process"
    return (
        f"{holder} holds {lock_path(run_folder)}; waiting up to {seconds:,.0f} s for it to "
        "finish (delete that file if the process is not a precompute of this run)"
    )


def _first_problem(
    files: Sequence[Path], shapes: Mapping[Path, Sequence[int | None]] | None = None
) -> str | None:
    """What is wrong with the first missing or damaged file a finished step wrote (None: every
    one is there and looks whole), so that a file deleted (by hand, or as an error's advice
    said), truncated or replaced by hand makes its step run again instead of being skipped on
    every rerun while the dashboard fails on it. Cheap, headers and footers only
    (``run_writer.stored_file_problem``; ``shapes``: a file's expected shape where known)."""
    for file in files:
        problem = stored_file_problem(file, (shapes or {}).get(file))
        if problem is not None:
            return problem
    return None


def _redo_words(problem: str) -> str:
    """The progress detail of a finished step that runs again because of a damaged file."""
    return f"redone: {problem}"


def _embeddings_problem(layout: RunLayout, entry: ModelEntry, n: int) -> str | None:
    """What is wrong with a model's stored embeddings (each ``(n, d)`` as recorded; None: they
    look whole) or its record (a layer without a clip threshold)."""
    if set(entry.clip_thresholds) != set(entry.layers):
        return f"model {entry.key} has layers without clip thresholds in the manifest"
    return _first_problem(
        [layout.embedding(entry.key, key) for key in entry.layer_keys.values()],
        {layout.embedding(entry.key, key): (n, entry.dims.get(layer))
         for layer, key in entry.layer_keys.items()},
    )


@dataclass
class _Plan:
    """What one pipeline run writes: the models' sources and every setting the steps use.

    Made by :func:`precompute` from a :class:`PrecomputeConfig` and by
    :func:`write_run_from_embeddings` from arrays; everything after that is shared.
    """

    sources: list[Any]
    vision_models: list[str]
    language_models: list[str]
    gpa_models: list[str]
    gpa_layers: dict[str, str]
    default_layers: dict[str, str]
    list_size: int
    neighbour_layers: str
    thumbnails: bool
    gpa_tol: float
    gpa_max_iter: int
    device: str | None
    settings: dict[str, Any]
    config: PrecomputeConfig | None = None
    gpa_starts: int = GPA_STARTS
    gpa_stop: str = GPA_STOP


def _plan_from_config(cfg: PrecomputeConfig) -> _Plan:
    return _Plan(
        sources=cfg.sources(),
        vision_models=[m for m in cfg.model_names if cfg.modality_of(m) == "vision"],
        language_models=[m for m in cfg.model_names if cfg.modality_of(m) == "language"],
        gpa_models=cfg.gpa_model_names,
        gpa_layers=dict(cfg.gpa_layers or {}),
        default_layers={},
        list_size=cfg.list_size,
        neighbour_layers=cfg.neighbour_layers,
        thumbnails=cfg.thumbnails,
        gpa_tol=GPA_TOL,
        gpa_max_iter=GPA_MAX_ITER,
        device=cfg.device,
        settings=cfg.to_dict(),
        config=cfg,
        gpa_starts=cfg.gpa_starts,
        gpa_stop=cfg.gpa_stop,
    )


def precompute(
    config: PrecomputeConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    progress: ProgressCallback | None = None,
    lock_wait_seconds: float = 3600.0,
    **options: Any,
) -> Run:
    """Run (or resume) the pipeline and return the finished run, loaded.

    ``config`` is a :class:`PrecomputeConfig`, a mapping of its fields, or a .json/.toml file;
    keyword ``options`` (the same field names: ``dataset``, ``vision_models``, ``language_models``,
    ``features``, ``modalities``, ``layers``, ``device``, ``batch_size``, ``caption_mode``,
    ``drop_bad``, ``run_name``, ``cache_root``, ...) override it or, without ``config``, make it.

    Steps, each recorded in the manifest with the fingerprint of its inputs when it finishes and
    skipped on a rerun whose inputs are unchanged: load + check the dataset -> fingerprint it ->
    per model: its representations (extracted by an encoder, or read from files) -> its exact
    neighbour lists -> GPA on the GPA models' layers (from Gower's start) -> its stability
    diagnostic (random starts; the lowest-loss solution becomes GPA's, gpa/ rewritten when it is
    not Gower's start's) -> dispersion + residual PCA -> thumbnails.
    An interrupted run therefore resumes after its last finished step. Without a data set
    (``dataset`` None: every model from feature files) the stimuli are the first feature file's
    ids, with no images and no captions (:func:`stimuli_from_feature_files`).

    Stale files are never reused: an encoder's fingerprint covers the dataset fingerprint, the
    model name, its layers, the caption mode (language), the device type and any weights path;
    a file model's covers the files' bytes; GPA's covers the content hashes of its input arrays.
    A changed dataset (bytes, captions, order, dropped items) resets the whole run folder; a
    model no longer in the config is removed from it. Without ``run_name`` the folder is named
    from a hash of the config, so different configs never share a folder. Encoder weights are
    identified by name here (their sha256 ``weights_id`` is recorded after extraction): after
    replacing a model's weights under the same name, delete the run or use a new ``run_name``.

    ``progress(event: ProgressEvent)`` is called as work advances; an exception it raises aborts
    the run, which a later call resumes.

    A finished step is skipped only while the files it wrote are there and look whole (headers
    and footers: an ``.npy`` of the recorded shape and size, a parquet footer, a JSON file that
    parses); one truncated or replaced by hand makes the step run again, and its start event's
    ``detail`` ("redone: <file> ...") names the file. Bad input is checked before the run folder
    is made where that is cheap (files exist, formats, shapes, ids); what shows only later (NaN
    in a feature file, a layer name an encoder lacks) stops the run with a ValueError, and a
    first call that made the run folder and finished no step in it removes that folder again.
    An interruption (KeyboardInterrupt), a storage fault (OSError) or a failure after some step
    finished keeps the folder, which the corrected command resumes.

    While another process is writing the same run (its lock file ``.<run>.lock`` names a live
    pid), wait up to ``lock_wait_seconds`` (a ``"waiting"`` event is sent), then continue, reusing
    what it finished; after that, raise ``cache.RunLockedError``.
    """
    cfg = _resolve_config(config, options)
    notify = progress or (lambda event: None)
    # the run's cache holds all it caches (converted model weights too), in this process and in
    # the processes it starts (Ray workers): $CONVERGENCE_CACHE while it runs, then restored
    with cache_root_given(cfg.cache_root):
        return _precompute(cfg, notify, lock_wait_seconds)


def _precompute(cfg: PrecomputeConfig, notify: ProgressCallback, lock_wait_seconds: float) -> Run:
    """:func:`precompute` of a checked config, with its cache as ``settings.cache_root()``."""
    from .sources import FeatureIdsError

    _check_models(cfg)
    cache = cache_folder(cfg.cache_root, "cache_root, --cache")
    notify(ProgressEvent("dataset", None, 0, 1))
    if cfg.dataset is None:
        stimuli, info = stimuli_from_feature_files(cfg)
        name = _run_name(cfg, FEATURE_IDS_DATASET, cache)
    else:
        stimuli, info, name = _checked_dataset(cfg, cache)
    stimuli, info = restrict_stimuli(cfg, stimuli, info)
    notify(ProgressEvent("dataset", None, 1, 1))
    plan = _plan_from_config(cfg)
    if info.dropped:  # --drop-bad: feature files keep their rows of the dropped stimuli
        plan = replace(plan, sources=_skipping_dropped(plan.sources, info.dropped))
    try:
        return _execute(
            plan,
            cache / "runs" / model_key(name),
            name,
            stimuli,
            info,
            notify,
            lock_wait_seconds=lock_wait_seconds,
        )
    except FeatureIdsError as exc:
        if cfg.dataset is not None or cfg.stimuli != "all":
            raise
        raise FeatureIdsError(
            f"{exc} (no dataset was given, so the stimuli are the ids of "
            f"{info.source['path']}: every feature file must list the same ids)"
        ) from None


def _skipping_dropped(sources: list[Any], dropped: list[dict[str, Any]]) -> list[Any]:
    """``sources`` whose feature files may keep rows for the ``dropped`` stimuli (--drop-bad
    drops a stimulus from every model alike: a file's row for it is skipped, not an error)."""
    from .sources import FileSource

    ids = frozenset(str(item.get("id")) for item in dropped)
    return [
        replace(source, extra_rows=ids)
        if isinstance(source, FileSource) and source.extra_rows is False else source
        for source in sources
    ]


def _checked_dataset(
    cfg: PrecomputeConfig, cache: Path
) -> tuple[pd.DataFrame, DatasetInfo, str]:
    """The config's data set, loaded and checked (bad images or captions: raise, or drop them),
    as the normalised stimulus table, its :class:`DatasetInfo` and the run's name; the encoders'
    weights are checked first, before the (slower) image check.

    A Hugging Face data set that cannot be loaded (offline, not cached: at once, without retrying
    the hub, see ``datasets.load_hf``) is reported together with every model whose weights are
    missing too (:func:`_dataset_unavailable`): one error lists all that is missing."""
    from .datasets import DatasetUnavailableError, check_dataset, dataset_fingerprint, load_dataset

    spec = cfg.dataset if isinstance(cfg.dataset, Mapping) else {"path": cfg.dataset}
    if spec.get("kind") == "hf" or str(spec["path"]).startswith("hf:"):
        # its images are written under the run's cache; Hugging Face's own cache stays its own
        spec = {"images_cache": cache, **spec}
    try:
        loaded = load_dataset(spec)
    except DatasetUnavailableError as exc:
        raise _dataset_unavailable(cfg, cache, spec, exc) from None
    name = _run_name(cfg, loaded.name, cache)
    # weights first, before the image check: every encoder the run does not record as extracted
    # (the pipeline checks again, exactly, once it knows the data set's fingerprint)
    _check_weights(cfg, _unrecorded_encoders(cfg, cache, name))
    dataset, dropped = check_dataset(loaded, drop_bad=cfg.drop_bad)
    info = DatasetInfo(
        name=dataset.name,
        fingerprint=dataset_fingerprint(dataset),
        images_root=str(Path(dataset.root).resolve()) if dataset.images else None,
        source=dataset.source,
        dropped=dropped,
    )
    return normalise_stimuli(dataset.stimuli), info, name


def _unrecorded_encoders(cfg: PrecomputeConfig, cache: Path, name: str) -> list[str]:
    """The config's encoders whose extraction the run ``name`` does not record (their weights
    are needed)."""
    recorded = _recorded_extractions(cache / "runs" / model_key(name))
    return [model for model in (*cfg.vision_models, *cfg.language_models) if model not in recorded]


def _dataset_unavailable(
    cfg: PrecomputeConfig, cache: Path, spec: Mapping[str, Any], error: Exception
) -> Exception:
    """``error`` (a Hugging Face data set that cannot be loaded), joined with the weights check
    of the encoders into one ``datasets.InputsUnavailableError`` when weights are missing too:
    offline, a first run lacks both, and the user learns everything missing at once (the hub
    probe already answered, so this costs no wait). ``error`` itself when every weight is there,
    or when the check cannot be made (it must never hide the data set's message)."""
    from .datasets import InputsUnavailableError
    from .models import WeightsUnavailableError

    path = str(spec["path"]).removeprefix("hf:")
    # the name load_hf gives the data set (a local folder's name, else the hub id): the run's
    try:
        shown = Path(path).name if Path(path).expanduser().is_dir() else path
        _check_weights(cfg, _unrecorded_encoders(cfg, cache, _run_name(cfg, shown, cache)))
    except WeightsUnavailableError as missing:
        return InputsUnavailableError(error, missing)
    except (ValueError, OSError, ImportError):  # an unreadable manifest, ...: said later
        return error
    return error


def restrict_stimuli(
    config: PrecomputeConfig, stimuli: pd.DataFrame, info: DatasetInfo
) -> tuple[pd.DataFrame, DatasetInfo]:
    """The run's stimuli after ``config.stimuli``: unchanged for ``"all"``; for ``"common"`` the
    rows of ``stimuli`` whose id every feature file (every model, every layer) lists; for the
    path of an id list (text, one id per line, blank lines ignored) the rows it names. The
    order of ``stimuli`` is kept. Only id lists are read (an .npy's ``.ids.txt``, a parquet
    file's ``id`` column), never features.

    The returned :class:`DatasetInfo` has a fingerprint that covers the kept ids (another
    restriction is another data set: the run starts afresh) and its ``subset``
    (:class:`.manifest.StimulusSubset`): the rule, how many stimuli were kept of how many, and
    per feature file how many of the data set's stimuli it lacks.

    Raises:
        FeatureFileError: a feature file that cannot be read (as :func:`.sources.feature_file_ids`).
        ValueError: an id list that is missing, empty, lists an id twice or names ids the data
            set does not have (or that --drop-bad dropped); ``"common"`` without feature files;
            fewer than 3 stimuli left.
    """
    from .sources import check_id_normalisation, feature_file_ids

    rule = os.fspath(config.stimuli)
    if rule == "all":
        return stimuli, info
    ids = [str(i) for i in stimuli["id"]]
    where = (f"the data set {info.name!r}" if config.dataset is not None
             else f"the first feature file ({info.source.get('path')})")
    lacking: dict[str, int] = {}
    if rule == "common":
        if not config.features:
            raise ValueError(
                "stimuli = 'common' keeps the stimuli every feature file covers, but the run has "
                "no feature file (--features); leave it out (every encoder embeds every stimulus) "
                "or give an id list"
            )
        keep = set(ids)
        every_id = frozenset(ids)
        for source in config.sources():
            for layer, path in getattr(source, "files", {}).items():
                file_ids = feature_file_ids(path, model=source.name, layer=layer)
                listed = set(file_ids)
                lacking[f"{source.name}:{layer}"] = sum(sid not in listed for sid in ids)
                # ids alike but for their Unicode form (they print alike) are the same stimuli
                # written two ways, not stimuli the file lacks: refused with the fix, never
                # left out in silence
                check_id_normalisation(
                    f"feature file {path} (model {source.name!r}, layer {layer!r})",
                    file_ids, [sid for sid in ids if sid in keep and sid not in listed],
                    known=every_id,
                )
                if keep and not keep & listed:
                    raise ValueError(
                        f"no stimulus of {where} is listed by every feature file (stimuli = "
                        f"'common'): none is left once feature file {path} (model "
                        f"{source.name!r}, layer {layer!r}) is taken in: its ids look like "
                        f"{file_ids[:3]}, the stimuli's like {ids[:3]}; write the files with "
                        "the data set's ids"
                    )
                keep &= listed
    else:
        keep = set(_read_id_list(Path(rule).expanduser(), ids, where, info.dropped))
    try:  # as few as that makes no run: said now, before the run folder is touched
        kept = normalise_stimuli(stimuli[[sid in keep for sid in ids]])
    except ValueError as exc:
        raise ValueError(
            f"stimuli = {rule!r} (--stimuli) keeps {len(keep)} of the {len(ids)} stimuli of "
            f"{where}, too few: {exc}; keep more (a longer id list; for 'common', feature "
            "files that cover more of them)"
        ) from None
    return kept, replace(
        info,
        fingerprint=fingerprint(info.fingerprint, "stimuli", kept["id"].astype(str).tolist()),
        subset=StimulusSubset(rule=rule, kept=len(kept), of=len(ids), lacking=lacking),
    )


def _read_id_list(
    path: Path, ids: Sequence[str], where: str, dropped: Sequence[Mapping[str, Any]] = ()
) -> list[str]:
    """The ids of an id list file (one per line, surrounding spaces and blank lines ignored),
    checked against the data set's ``ids`` (``dropped``: the stimuli --drop-bad dropped, said
    as such); ValueError naming the problem and the fix."""
    if not path.is_file():
        raise ValueError(
            f"stimuli: {path} is not a file; give 'all', 'common' or the path of a text file "
            "listing the ids to keep, one per line"
        )
    from .sources import id_lines

    try:
        listed = id_lines(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"stimuli: id list {path} cannot be read as UTF-8 text ({exc}); write one id per line"
        ) from None
    if not listed:
        raise ValueError(f"stimuli: id list {path} lists no id; write one id per line")
    twice = [sid for sid, count in Counter(listed).items() if count > 1]
    if twice:
        raise ValueError(
            f"stimuli: id list {path} lists {len(twice)} id(s) twice (e.g. {twice[:5]}); list "
            "each once"
        )
    known = set(ids)
    reasons = {str(item.get("id")): item.get("reason") for item in dropped}
    gone = [sid for sid in listed if sid not in known and sid in reasons]
    if gone:
        raise ValueError(
            f"stimuli: id list {path} names {len(gone)} id(s) that --drop-bad dropped (e.g. "
            f"{gone[0]!r}: {reasons[gone[0]]}); fix those stimuli or take them off the list"
        )
    unknown = [sid for sid in listed if sid not in known]
    if unknown:
        raise ValueError(
            f"stimuli: id list {path} names {len(unknown)} id(s) that {where} does not have "
            f"(e.g. {unknown[:5]}); list ids exactly as the data set writes them"
        )
    return listed


def stimuli_from_feature_files(config: PrecomputeConfig) -> tuple[pd.DataFrame, DatasetInfo]:
    """The stimuli of a run without a data set (every model from files): the ids of the first
    feature file (its first model, first layer) in that file's order, with no image and no
    caption; every other file must hold the same ids, in any order (checked before any work, as
    for a data set). Returns the normalised stimulus table and the run's :class:`DatasetInfo`
    (no images root; the fingerprint covers the ids, so a changed id list resets the run)."""
    from .sources import feature_file_ids

    first = next(source for source in config.sources() if source.kind == "file")
    layer = first.layers[0]
    ids = feature_file_ids(first.files[layer], model=first.name, layer=layer)
    frame = normalise_stimuli(
        pd.DataFrame({"id": ids, "image": [""] * len(ids), "captions": [[] for _ in ids]})
    )
    info = DatasetInfo(
        name=FEATURE_IDS_DATASET,
        fingerprint=fingerprint(
            frame["id"].tolist(), frame["image"].tolist(), frame["captions"].tolist()
        ),
        images_root=None,
        source={"kind": FEATURE_IDS_DATASET, "path": str(first.files[layer]),
                "options": {"model": first.name, "layer": layer}},
    )
    return frame, info


def write_run_from_embeddings(
    path: str | os.PathLike[str],
    stimuli: Any,
    embeddings: Mapping[str, Mapping[str, np.ndarray]],
    *,
    vision_models: Sequence[str],
    language_models: Sequence[str],
    modalities: Mapping[str, str] | None = None,
    gpa_models: Sequence[str] | None = None,
    gpa_layers: Mapping[str, str] | None = None,
    default_layers: Mapping[str, str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    thumbnails: bool = True,
    dataset_name: str | None = None,
    dataset_fingerprint: str | None = None,
    settings: Mapping[str, Any] | None = None,
    gpa_tol: float = GPA_TOL,
    gpa_max_iter: int = GPA_MAX_ITER,
    gpa_starts: int = GPA_STARTS,
    gpa_stop: str = GPA_STOP,
    list_size: int = DEFAULT_LIST_SIZE,
    neighbour_layers: str = "all",
    progress: ProgressCallback | None = None,
) -> Run:
    """Write (or resume) a complete run folder at ``path`` from in-memory arrays; return it loaded.

    The same pipeline as :func:`precompute`, with every model's representations given:

    Args:
        path: the run folder; created if needed. An existing run there is reused where its
            steps' inputs match (else those steps are redone); a non-empty folder without
            manifest.json, or with one this version cannot read, is refused (ValueError).
        stimuli: n rows in stimulus order with ``id`` (unique), ``image`` (path relative to
            ``images_root``), ``captions`` (list[str]); other columns (e.g. ``label``) are kept.
        embeddings: ``{model: {layer: (n, d) array}}``, layers in network order; stored float32
            (memory maps are fine: a float32 map is written without a copy).
        vision_models / language_models: the models on the two sides of the alignment analyses.
        modalities: ``{model: modality}`` for any other model of ``embeddings`` (e.g. "brain").
        gpa_models: the models entering GPA (default: the vision models); at least 2.
        gpa_layers: ``{GPA model: layer}``; default: the model's default layer.
        default_layers: ``{model: layer}``; default: the first layer given for the model.
            A GPA model's default layer is its GPA layer unless both are given.
        images_root: folder that ``stimuli.image`` is relative to; None = a run without images.
        thumbnails: write thumbnails/ (needs ``images_root``).
        dataset_name, dataset_fingerprint, settings: recorded in the manifest.
        gpa_tol, gpa_max_iter: passed to ``generalized_procrustes``.
        gpa_starts, gpa_stop, list_size, neighbour_layers: as in :class:`PrecomputeConfig`.
        progress: as in :func:`precompute`.

    Neighbour lists are built from ``prepare_features`` of the float32-stored embeddings, and GPA
    reads those stored arrays (in row blocks, float64 sums), so everything is reproducible from the
    run's own files.
    Raises ValueError (naming the fix) for inconsistent inputs.
    """
    from .sources import ArraySource

    path = Path(path)
    frame = normalise_stimuli(stimuli)
    vision, language = list(vision_models), list(language_models)
    extra = dict(modalities or {})
    for kind, names in (("vision_models", vision), ("language_models", language)):
        if len(set(names)) != len(names):
            raise ValueError(f"{kind} lists a model twice: {names}; list each model once")
    both = sorted(set(vision) & set(language))
    if both:
        raise ValueError(f"models {both} are listed as both vision and language models; pick one")
    modality = {**{m: "vision" for m in vision}, **{m: "language" for m in language}}
    clash = sorted(set(extra) & set(modality))
    if clash:
        raise ValueError(f"modalities names {clash}, which are already vision or language models")
    modality.update(extra)
    unknown = sorted(set(embeddings) - set(modality))
    if unknown:
        raise ValueError(
            f"embeddings has model(s) {unknown} that are in neither vision_models nor "
            "language_models; list them in one of the two (or give their modality) or drop them"
        )
    absent = [name for name in modality if name not in embeddings]
    if absent:
        raise ValueError(
            f"no embeddings for listed model(s) {absent}; embeddings has {sorted(embeddings)}"
        )
    order = [*vision, *language, *extra]
    for model in order:  # every array is checked before anything is written
        layers = embeddings[model]
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(
                f"embeddings[{model!r}] must be a non-empty dict {{layer name: (n, d) array}}"
            )
        for layer, array in layers.items():
            check_embedding_array(array, model, str(layer), len(frame))
    gpa = list(gpa_models) if gpa_models is not None else list(vision)
    if len(gpa) < 2:
        raise ValueError(f"GPA needs at least 2 vision models, got {gpa}; add vision models")
    sources = [
        ArraySource(m, modality[m], embeddings[m], (default_layers or {}).get(m)) for m in order
    ]
    for model, layer in {**(default_layers or {}), **(gpa_layers or {})}.items():
        _check_layer_choice(embeddings, model, layer)
    for model in gpa_layers or {}:
        if model not in gpa:
            raise ValueError(
                f"gpa_layers names {model!r}, which is not a vision model; use one of {gpa}"
            )
    _check_gpa_stop(gpa_stop, gpa_starts)
    root = Path(images_root).resolve() if images_root is not None else None
    if thumbnails and root is None:
        raise ValueError("thumbnails=True needs images_root; pass images_root or thumbnails=False")
    if root is not None and not root.is_dir():
        raise ValueError(f"images_root {root} is not a folder; pass the folder holding the images")
    plan = _Plan(
        sources=sources,
        vision_models=vision,
        language_models=language,
        gpa_models=gpa,
        gpa_layers=dict(gpa_layers or {}),
        default_layers=dict(default_layers or {}),
        list_size=list_size_for(10**9, list_size),
        neighbour_layers=neighbour_layers,
        thumbnails=thumbnails,
        gpa_tol=gpa_tol,
        gpa_max_iter=gpa_max_iter,
        device=None,
        settings=dict(settings or {}),
        gpa_starts=gpa_starts,
        gpa_stop=gpa_stop,
    )
    data_fingerprint = dataset_fingerprint or fingerprint(
        frame["id"].tolist(), frame["image"].tolist(), frame["captions"].tolist()
    )
    info = DatasetInfo(
        name=dataset_name,
        fingerprint=dataset_fingerprint,
        images_root=str(root) if root is not None else None,
        source={"kind": "in-memory"},
    )
    return _execute(
        plan, path, path.name, frame, info, progress or (lambda event: None),
        data_fingerprint=data_fingerprint,
    )


def _check_layer_choice(
    arrays: Mapping[str, Mapping[str, np.ndarray]], model: str, layer: str
) -> None:
    if model not in arrays:
        raise ValueError(f"a layer choice names unknown model {model!r}; use one of {sorted(arrays)}")
    if layer not in arrays[model]:
        raise ValueError(
            f"layer {layer!r} chosen for {model!r} is not a layer of {model!r}; use one of "
            f"{list(arrays[model])}"
        )


def _check_gpa_fits(plan: _Plan, n: int) -> None:
    """Before any work: GPA across the plan's GPA models fits in memory, where their widths are
    known now (feature files, arrays; an encoder's is known once it is loaded, and GPA itself
    checks again)."""
    from .procrustes import check_gpa_fits

    sources = {source.name: source for source in plan.sources}
    widths = []
    for model in plan.gpa_models:
        source = sources.get(model)
        if source is None or source.kind == "encoder":
            return
        layer = (plan.gpa_layers.get(model) or plan.default_layers.get(model)
                 or source.default_layer or source.layers[0])
        width = source.width(layer) if layer in source.layers else None
        if width is None:
            return
        widths.append(width)
    if len(widths) >= 2:
        check_gpa_fits(n, widths, plan.gpa_models)


def _execute(
    plan: _Plan,
    path: Path,
    name: str,
    stimuli: Any,
    info: DatasetInfo,
    notify: ProgressCallback,
    *,
    lock_wait_seconds: float = 3600.0,
    data_fingerprint: str | None = None,
) -> Run:
    """Every step of a plan on one run folder, under the run's lock; the finished run, loaded.

    A run folder this call creates is removed again when the steps stop on bad input (a
    ValueError) before any step but the stimulus table finished
    (:func:`_remove_unfinished_new_run`); an existing folder is never removed here."""
    started = time.perf_counter()
    # cheap checks (feature files' ids, ...) before anything is written: a bad file must neither
    # wait for the extractions nor reset an existing run folder
    images_root = Path(info.images_root) if info.images_root else None
    _check_model_folders([source.name for source in plan.sources])
    for source in plan.sources:
        source.check(stimuli, images_root)
    _check_gpa_fits(plan, len(stimuli))
    with run_lock(
        path,
        wait_seconds=lock_wait_seconds,
        on_wait=lambda pid: notify(ProgressEvent(
            "waiting", None, 0, 1, detail=_waiting_words(pid, path, lock_wait_seconds)
        )),
    ):
        # checked under the lock (no other precompute makes the folder meanwhile): whether this
        # call creates the run folder, which a failure on bad input may then remove again
        created = not os.path.lexists(path)
        try:
            pipeline = _Pipeline(
                plan, stimuli, info, data_fingerprint or info.fingerprint or "", path, name, notify
            )
            if plan.config is not None:
                # again, exactly: the encoders this call will load (a changed data set
                # re-extracts)
                _check_weights(
                    plan.config,
                    [s.name for s in plan.sources if s.kind == "encoder" and not pipeline.done(s)],
                )
            try:
                for source in plan.sources:
                    pipeline.model(source)
                    pipeline.neighbours(source.name)
            finally:
                pipeline.close_engine()
            gpa_inputs = pipeline.gpa()
            pipeline.gpa_stability(gpa_inputs)
            pipeline.dispersion(gpa_inputs)
            pipeline.thumbnails()
            pipeline.properties()
            pipeline.finish(time.perf_counter() - started)
        except ValueError:
            if created:
                _remove_unfinished_new_run(path)
            raise
    notify(ProgressEvent("done", None, 1, 1))
    return load_run(path)


#: Steps a new run folder finishes before any work: the stimulus table (seconds to redo)
_BOOKKEEPING_STEPS = frozenset({"stimuli"})


def _remove_unfinished_new_run(path: Path) -> None:
    """After a first precompute of a run stopped on bad input (a ValueError: a feature file with
    NaN, a layer name that is not the model's, ...): delete the run folder it created when no
    step but the stimulus table finished and no extraction left shards to resume from, so that
    ``runs`` and the dashboard do not list an incomplete run that holds nothing. A folder where
    work finished is kept (the corrected command resumes it), and so is everything on a
    KeyboardInterrupt or a storage fault (OSError), which never come here. The original error
    is what the caller sees: a failure to read or delete the folder is ignored."""
    layout = RunLayout(path)
    try:
        manifest = _read_manifest(layout)
        steps = set(manifest.steps) if manifest is not None else set()
        shards = layout.shards_dir
        if steps - _BOOKKEEPING_STEPS or (shards.is_dir() and any(shards.iterdir())):
            return
        remove_new_run_folder(path)
    except (OSError, ValueError):
        return


def _check_model_folders(names: Sequence[str]) -> None:
    """ValueError if two models would share a folder of the run: their :func:`model_key` is the
    same (``org/model`` is stored as ``org_model-c87c0c64``, another model's name), or the same
    where file names ignore case (macOS and Windows by default: ``V1`` and ``v1``)."""
    collision = colliding_keys({name: model_key(name) for name in names})
    if collision is None:
        return
    other, name, where = collision
    folder = model_key(other)
    if other.casefold() == name.casefold():
        raise ValueError(
            f"models {other!r} and {name!r} differ only in upper and lower case: they would "
            f"share the folder {folder!r} in the run{where}; rename one of them"
        )
    renamed = ", ".join(f"{n!r} as {model_key(n)!r}" for n in (other, name) if model_key(n) != n)
    raise ValueError(
        f"models {other!r} and {name!r} would share the folder {folder!r} in the run{where} "
        f"(names are stored in a file-name-safe form: {renamed}); rename one of them"
    )


class _Pipeline:
    """The steps of one plan on one run folder (the caller holds the run's lock).

    Opening it reuses the folder's manifest when its stimuli step matches the data (else the
    folder is reset); each step method skips its work when the manifest records it done with
    the same input fingerprint and its files are present and look whole (:func:`_first_problem`;
    else the step runs again and says which file it redoes). It is also the context the sources
    read (:mod:`.sources`): ``config``, ``stimuli``, ``images_root``, ``data_fingerprint``,
    ``fingerprint``, ``engine()``, ``layout``, ``progress_for``.
    """

    fingerprint = staticmethod(fingerprint)

    def __init__(
        self,
        plan: _Plan,
        stimuli: Any,
        info: DatasetInfo,
        data_fingerprint: str,
        path: Path,
        name: str,
        notify: ProgressCallback,
    ) -> None:
        self.plan = plan
        self.config = plan.config
        self.stimuli = stimuli
        self.n = len(stimuli)
        self.images_root = Path(info.images_root) if info.images_root else None
        self.data_fingerprint = data_fingerprint
        self.layout = RunLayout(path)
        self.notify = notify
        remove_reset_leftover(path)
        self.manifest = _open_manifest(self.layout, name)
        stimuli_inputs = fingerprint(data_fingerprint, info.dropped)
        if not self.manifest.step_done("stimuli", stimuli_inputs):
            prepare_run_folder(path)
            self.manifest = RunManifest(self.layout, empty_manifest(name))
        self.data = self.manifest.data
        # saved with the first change to the run: a rerun that stops before changing anything
        # (a layer name that is not the model's) leaves a finished run complete
        self.data.complete = False
        # every column of the stimulus table (a corrected label too; the embeddings' inputs are
        # the data fingerprint): the stored table follows it, and so do the properties
        table = fingerprint(stimuli.to_dict("list"))
        kept = self.data.steps.get("stimuli")
        if kept is None or kept.details.get("table") != table or not self.layout.stimuli.is_file():
            if kept is None:  # first, so a crash leaves a recognisable (incomplete) run folder
                self.manifest.save()
            write_parquet(self.layout.stimuli, stimuli)  # a table it cannot store changes nothing
            self.data.n_stimuli = self.n
            self.data.dataset = info
            self.manifest.finish_step("stimuli", stimuli_inputs, table=table)
        # the same stimuli from inputs described anew (a subset's per-file counts, the data
        # set's folder): the record follows the inputs
        self.data.dataset = info
        # GPA's result with its kept fit, from gpa() to gpa_stability() (None: not computed here)
        self._gpa_result: Any = None
        self.data.vision_models = list(plan.vision_models)
        self.data.language_models = list(plan.language_models)
        self.data.settings = plan.settings
        self.data.versions = library_versions()
        _forget_dropped_models(self.manifest, [source.name for source in plan.sources])
        self._engine: Any = None

    # -- the context sources read ---------------------------------------------------------------
    def engine(self) -> Any:
        """The extraction engine of the encoders, opened on first use (the Ray engine checks
        every encoder's weights before Ray starts)."""
        if self._engine is None:
            from .engines import open_engine

            encoders = [s.name for s in self.plan.sources if s.kind == "encoder"]
            self._engine = open_engine(self.config, encoders)
        return self._engine

    def close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def progress_for(self, model: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            self.notify(ProgressEvent("extract", model, int(done), int(total)))

        return report

    def _tell_redone(
        self,
        step: str,
        inputs: str,
        event: str,
        model: str | None,
        problem: Callable[[], str | None],
        *,
        done: int = 0,
        total: int | None = None,
    ) -> None:
        """Where the manifest records ``step`` finished from these ``inputs`` but it runs again,
        a ``ProgressEvent(event, model, done, total)`` whose detail names the file that is
        missing or damaged (``problem()``, asked only then): a rerun says why it redoes work."""
        if not self.manifest.step_done(step, inputs):
            return
        said = problem()
        if said is not None:
            self.notify(ProgressEvent(event, model, done, self.n if total is None else total,
                                      detail=_redo_words(said)))

    # -- steps ------------------------------------------------------------------------------------
    def done(self, source: Any) -> bool:
        """Whether ``source``'s embeddings are in the run, from the same inputs (nothing to do)."""
        entry = self.data.models.get(source.name)
        return bool(
            self.manifest.step_done(f"extract:{source.name}", source.inputs(self))
            and entry is not None
            and entry.modality == source.modality
            and _embeddings_problem(self.layout, entry, self.n) is None
        )

    def model(self, source: Any) -> None:
        """One model's representations (encoder, arrays or files): embeddings + clip thresholds."""
        name, n = source.name, self.n
        step, inputs = f"extract:{name}", source.inputs(self)
        if self.done(source):
            # the stored layers serve another GPA / default layer choice as they are (their
            # fingerprint leaves it out): the default layer follows this run's choice
            entry = self.data.models[name]
            entry.default_layer = self._default_layer(
                name, entry.details.get("model_default_layer", entry.default_layer)
            )
            self.notify(ProgressEvent("extract", name, n, n, skipped=True))
            return
        stored = self.data.models.get(name)
        if stored is not None:  # finished, but a file is missing or damaged: said
            self._tell_redone(step, inputs, "extract", name,
                              lambda: _embeddings_problem(self.layout, stored, n))
        # loaded before the step is forgotten: a load that fails (a layer name that is not the
        # model's, missing weights) leaves the model's finished work as it was, so the corrected
        # command finds it done; forgotten before any of its files change
        extracted = source.load(self)
        # checked before the step is forgotten too: features that cannot be used (rows that all
        # point one way, mostly zeros) leave a finished run as it was, as a failed load does
        arrays = {
            layer: check_embedding_array(array, name, layer, n)
            for layer, array in extracted.arrays.items()
        }
        thresholds = clip_thresholds(model_key(name), arrays)
        self.manifest.forget_step(step)
        default = self._default_layer(name, extracted.default_layer)
        hashes, thresholds = write_model_arrays(
            self.layout, model_key(name), {layer: model_key(layer) for layer in arrays}, arrays,
            thresholds,
        )
        if extracted.caption_agreement is not None:  # measured while the model was loaded
            layer, values = extracted.caption_agreement
            self._store_caption_agreement(source, layer, values)
        self.data.models[name] = model_entry(
            name, source.modality, arrays, default, hashes, thresholds,
            weights_id=extracted.weights_id, source=source.kind, **extracted.details,
            model_default_layer=extracted.default_layer,
        )
        if extracted.caption_features:  # every caption embedded anyway, and small: cache them
            from .caption_embeddings import write_caption_embeddings
            from .extract import captions_for_language

            texts, owners = captions_for_language(self.stimuli, "mean")
            write_caption_embeddings(
                self.layout, name, self.data.models[name], texts, owners,
                {layer: extracted.caption_features[layer] for layer in arrays},
                arrays if self.config.caption_mode == "first" else None,
            )
        for layer in arrays:  # new embeddings: their lists are rebuilt
            self.data.steps.pop(f"neighbours:{name}:{layer}", None)
        self.manifest.finish_step(step, inputs)
        self.notify(ProgressEvent("extract", name, n, n))

    def _default_layer(self, name: str, model_default: str | None) -> str | None:
        """The model's default layer in this run: its --default-layer, else its GPA layer, else
        ``model_default`` (the model's own)."""
        return (
            self.plan.default_layers.get(name) or self.plan.gpa_layers.get(name) or model_default
        )

    def neighbours(self, model: str) -> None:
        """Exact top-K neighbour lists of the model's layers (all, or its default/GPA layer)."""
        entry = self.data.models[model]
        gpa_layer = self.plan.gpa_layers.get(model)
        if self.plan.neighbour_layers == "all":
            wanted = list(entry.layers)
        else:
            wanted = [entry.default_layer] + ([gpa_layer] if gpa_layer else [])
        k = list_size_for(self.n, self.plan.list_size)
        done: list[str] = []
        total = self.n * len(wanted)  # one progress bar per model: rows of all its layers
        for layer in entry.layers:
            step = f"neighbours:{model}:{layer}"
            if layer not in wanted:
                self.data.steps.pop(step, None)
                continue
            offset = self.n * len(done)
            inputs = fingerprint("neighbours", entry.sha256[layer], k, NEIGHBOURS_ALGORITHM)
            key = entry.layer_keys[layer]
            lists = (self.layout.neighbour_indices(entry.key, key),
                     self.layout.neighbour_values(entry.key, key))
            problem = _first_problem(lists, {file: (self.n, k) for file in lists})
            if self.manifest.step_done(step, inputs) and problem is None:
                self.notify(ProgressEvent("neighbours", model, self.n, self.n, skipped=True))
            else:
                self._tell_redone(step, inputs, "neighbours", model, lambda: problem,
                                  done=offset, total=total)
                self.manifest.forget_step(step)
                started = time.perf_counter()
                write_neighbour_lists(
                    self.layout,
                    entry,
                    layer,
                    list_size=k,
                    device=self.plan.device,
                    progress=lambda rows, _, offset=offset: self.notify(
                        ProgressEvent("neighbours", model, offset + int(rows), total)
                    ),
                )
                self.manifest.finish_step(
                    step, inputs, list_size=k, seconds=round(time.perf_counter() - started, 3)
                )
            done.append(layer)
        if entry.neighbour_layers != done:
            entry.neighbour_layers = done
            self.manifest.save()

    def gpa(self) -> str:
        """GPA on the GPA models' layers; returns the step's input fingerprint."""
        models_in = list(self.plan.gpa_models)
        entries = [self.data.models[m] for m in models_in]
        layers_in = [self._gpa_layer(entry, m) for entry, m in zip(entries, models_in, strict=True)]
        for entry, layer in zip(entries, layers_in, strict=True):
            if entry.modality == "vision":
                entry.default_layer = layer  # a vision model's default layer is its GPA layer
        inputs = fingerprint(
            "gpa",
            [entry.sha256[layer] for entry, layer in zip(entries, layers_in, strict=True)],
            models_in,
            layers_in,
            self.plan.gpa_tol,
            self.plan.gpa_max_iter,
            GPA_ALGORITHM,  # a new iteration scheme recomputes stored results
            # stopped at the residuals' uncertainty: its starts too (the optimum's runs keep
            # the inputs they had before the option existed)
            *(
                ()
                if self.plan.gpa_stop == "optimum"
                else (self.plan.gpa_stop, self.plan.gpa_starts, GPA_STABILITY_SEED)
            ),
        )
        self.data.gpa = GPARecord(models=models_in, layers=layers_in)
        uncertainty = self.plan.gpa_stop == "uncertainty"
        written = (
            self.layout.gpa_json, *map(self.layout.gpa_array, RunLayout.GPA_ARRAYS),
            *(self.layout.gpa_model_array(name, i)
              for name in ("map", "mean") for i in range(len(models_in))),
            # stopped at the uncertainty, this step writes the diagnostic too
            *((self.layout.gpa_stability_json, self.layout.gpa_stability_table)
              if uncertainty else ()),
        )
        shapes = {self.layout.gpa_array("residuals"): (self.n, len(models_in))}
        problem = (
            _first_problem(written, shapes) if self.manifest.step_done("gpa", inputs) else None
        )
        if (
            self.manifest.step_done("gpa", inputs)
            and problem is None
            and self._gpa_solution_kept()
            and (not uncertainty
                 or self.manifest.step_done("gpa_stability", self._stability_inputs(inputs)))
        ):
            self.notify(ProgressEvent("gpa", None, 1, 1, skipped=True))
            return inputs
        self.manifest.forget_step("gpa")
        redone = "" if problem is None else _redo_words(problem)
        if uncertainty:
            self._gpa_to_uncertainty(inputs, redone)
            return inputs
        total = self.plan.gpa_max_iter + 1  # the iterations at most, then the residual pass
        self.notify(ProgressEvent("gpa", None, 0, total, detail=redone))
        result = write_gpa(
            self.layout,
            self._gpa_arrays(),
            models_in,
            layers_in,
            tol=self.plan.gpa_tol,
            max_iter=self.plan.gpa_max_iter,
            progress=lambda done: self.notify(
                ProgressEvent("gpa", None, done, total, detail=f"iteration {done}")
            ),
            keep_fit=self.plan.gpa_starts > 0,  # the stability step starts from it
        )
        self._gpa_result = result
        self.manifest.finish_step(
            "gpa", inputs, n_iter=int(result.n_iter), converged=bool(result.converged)
        )
        self.notify(ProgressEvent("gpa", None, total, total))
        return inputs

    def _stability_inputs(self, gpa_inputs: str) -> str:
        """The gpa_stability step's input fingerprint."""
        return fingerprint("gpa_stability", gpa_inputs, self.plan.gpa_starts, GPA_STABILITY_SEED)

    def _gpa_solution(self) -> dict[str, Any] | None:
        """Which solution gpa/ holds, as the finished GPA step records it: None for GPA from
        Gower's start, ``{"start": s, "seed": seed}`` for random start s of the stability
        diagnostic, adopted because it reached a clearly lower minimum (part of the dispersion
        step's inputs)."""
        record = self.data.steps.get("gpa")
        solution = None if record is None else record.details.get("solution")
        return dict(solution) if isinstance(solution, dict) else None

    def _gpa_solution_kept(self) -> bool:
        """Whether the solution gpa/ holds is one this plan may keep: Gower's start's always;
        an adopted random start's only where the diagnostic that adopted it runs again when its
        inputs change (``gpa_starts`` ≥ 1: the stability step writes gpa/ again when the adopted
        solution changes, Gower's start's included), never with ``gpa_starts`` = 0 (GPA from
        Gower's start is solved again). Stopped at the uncertainty, the step's own diagnostic
        must have been written by the rule (an older one with Gower's start above another
        solution's minimum is solved again; ``stability_record_state``)."""
        if self.plan.gpa_stop == "uncertainty":
            return stability_record_state(self.layout) in ("current", "upgradable")
        return self._gpa_solution() is None or self.plan.gpa_starts > 0

    def _adoption_held(self) -> bool:
        """Whether gpa/ holds the solution the finished stability step adopted (a run written
        before adoption: Gower's start's): not after the GPA step was solved again (a deleted
        file of gpa/), whose Gower's start the diagnostic must weigh again."""
        record = self.data.steps.get("gpa_stability")
        adopted = 0 if record is None else record.details.get("adopted", 0)
        held = self._gpa_solution()
        return adopted == (0 if held is None else held.get("start"))

    def _adopt(self, gpa_inputs: str, result: Any, stability: Any) -> None:
        """gpa/ holds the solution the stability diagnostic adopted: rewritten when it holds
        another (a random start's lower minimum, or Gower's start's again after the starts
        changed), the GPA step forgotten while its files are replaced (an interruption leaves
        it to redo, never a mix of two solutions under a finished step) and finished again
        with ``solution``; nothing is written when gpa/ already holds it."""
        record = adopted_solution(stability)
        wanted = None if record is None else {"start": record["start"], "seed": record["seed"]}
        if self.manifest.step_done("gpa", gpa_inputs) and self._gpa_solution() == wanted:
            return
        self.manifest.forget_step("gpa")
        write_gpa_solution(
            self.layout, result, self.data.gpa.models, self.data.gpa.layers,
            tol=self.plan.gpa_tol, max_iter=self.plan.gpa_max_iter, solution=record,
        )
        self.manifest.finish_step(
            "gpa", gpa_inputs, n_iter=int(result.n_iter), converged=bool(result.converged),
            **({} if wanted is None else {"solution": wanted, "loss_gap": record["loss_gap"]}),
        )

    def _gpa_to_uncertainty(self, inputs: str, redone: str = "") -> None:
        """The GPA step stopped at the residuals' uncertainty: GPA and its stability diagnostic
        in one (``write_gpa_to_uncertainty``), so this step also finishes gpa_stability
        (``redone``: the start event's detail, why a finished step runs again)."""
        starts = self.plan.gpa_starts
        self.manifest.forget_step("gpa_stability")
        # per stage: GPA from its own start and from each random start; then the stop (one
        # "done", not one per stage)
        total = starts + 2
        self.notify(ProgressEvent("gpa", None, 0, total, detail=redone))
        result, stability, stop = write_gpa_to_uncertainty(
            self.layout,
            self._gpa_arrays(),
            self.data.gpa.models,
            self.data.gpa.layers,
            self.stimuli["id"].astype(str).tolist(),
            n_starts=starts,
            seed=GPA_STABILITY_SEED,
            tol=self.plan.gpa_tol,
            max_iter=self.plan.gpa_max_iter,
            progress=lambda tol, done, count: self.notify(
                ProgressEvent("gpa", None, done, total,
                              detail=f"loss tol {tol:.0e}: GPA solution {done} of {count}")
            ),
        )
        record = adopted_solution(stability)
        self.manifest.finish_step(
            "gpa_stability", self._stability_inputs(inputs), adopted=int(stability.adopted)
        )
        self.manifest.finish_step(
            "gpa", inputs, n_iter=int(result.n_iter), converged=bool(result.converged),
            stop_tol=stop.tol,
            **({} if record is None else {
                "solution": {"start": record["start"], "seed": record["seed"]},
                "loss_gap": record["loss_gap"],
            }),
        )
        self.notify(ProgressEvent("gpa", None, total, total))

    def _gpa_arrays(self) -> list[np.ndarray]:
        """The GPA inputs as stored (float32 memory maps; GPA reads them in row blocks)."""
        gpa = self.data.gpa
        return [
            read_npy(self.layout.embedding(entry.key, entry.layer_keys[layer]), mmap=True)
            for entry, layer in zip(
                (self.data.models[m] for m in gpa.models), gpa.layers, strict=True
            )
        ]

    def gpa_stability(self, gpa_inputs: str) -> None:
        """gpa/stability.*: GPA from ``gpa_starts`` random starts (none when 0); gpa/ then holds
        the lowest-loss solution (``_adopt``).

        A run written before the adoption rule is taken as it is where its diagnostic found
        Gower's start at the lowest minimum (its record gains the adoption entries: the rule
        adopts Gower's start there, the same numbers), and solved again where it found a lower
        one (``stability_record_state``)."""
        starts = self.plan.gpa_starts
        inputs = self._stability_inputs(gpa_inputs)
        # GPA's result with its fit when this process computed it: the reference solution, not
        # solved again (released here: its cross-products are the largest array GPA keeps)
        reference, self._gpa_result = self._gpa_result, None
        # each finished solution is kept until the step is done: a rerun solves only the rest
        solutions = StabilitySolutions(
            self.layout, fingerprint("gpa_stability_solutions", gpa_inputs, GPA_STABILITY_SEED)
        )
        if starts == 0:
            solutions.remove()
            self.manifest.forget_step("gpa_stability")
            for path in (self.layout.gpa_stability_json, self.layout.gpa_stability_table):
                path.unlink(missing_ok=True)
            return
        state = stability_record_state(self.layout)
        problem = _first_problem(  # the table is long: a row per stimulus and statistic
            [self.layout.gpa_stability_json, self.layout.gpa_stability_table]
        ) if self.manifest.step_done("gpa_stability", inputs) else None
        if (
            self.manifest.step_done("gpa_stability", inputs)
            and problem is None
            and state in ("current", "upgradable")
            and self._adoption_held()
        ):
            if state == "upgradable":  # written before the adoption rule, which keeps Gower's
                upgrade_stability_record(self.layout)
                self.manifest.finish_step("gpa_stability", inputs, adopted=0)
            self.notify(ProgressEvent("gpa_stability", None, 1, 1, skipped=True))
            return
        self.manifest.forget_step("gpa_stability")
        total = starts + 2  # GPA from its own start and from each random start, the residual pass
        kept = min(solutions.kept(), starts + 1)
        resumed = "; ".join(
            ([f"{kept} of {starts + 1} GPA solutions kept from an interrupted run"] if kept else [])
            + ([_redo_words(problem)] if problem is not None else [])
        )
        self.notify(ProgressEvent("gpa_stability", None, 0, total, detail=resumed))
        result, stability = write_gpa_stability(
            self.layout,
            self._gpa_arrays(),
            self.data.gpa.models,
            self.data.gpa.layers,
            self.stimuli["id"].astype(str).tolist(),
            n_starts=starts,
            seed=GPA_STABILITY_SEED,
            tol=self.plan.gpa_tol,
            max_iter=self.plan.gpa_max_iter,
            reference=reference,
            store=solutions,
            progress=lambda done, count: self.notify(
                ProgressEvent("gpa_stability", None, done, total,
                              detail=f"GPA solution {done} of {count}")
            ),
        )
        self._adopt(gpa_inputs, result, stability)
        self.manifest.finish_step("gpa_stability", inputs, adopted=int(stability.adopted))
        solutions.remove()  # after the adoption: an interruption before it still has them
        adopted = (
            "" if stability.adopted == 0
            else f"GPA's solution is random start {stability.adopted}'s, its loss "
            f"{stability.adopted_loss_gap:.2g} below Gower's start's"
        )
        self.notify(ProgressEvent("gpa_stability", None, total, total, detail=adopted))

    def _gpa_layer(self, entry: ModelEntry, model: str) -> str:
        chosen = self.plan.gpa_layers.get(model)
        if chosen is None:
            return str(entry.default_layer)
        if chosen not in entry.layers:
            raise ValueError(
                f"gpa_layers[{model!r}] = {chosen!r} was not extracted; choose one of "
                f"{entry.layers} or add it to layers"
            )
        return chosen

    def dispersion(self, gpa_inputs: str) -> None:
        """dispersion.parquet and pca/ from the GPA residuals (keyed by the score names too: a run
        stored before a score was added gains its column on the next precompute)."""
        # the solution gpa/ holds (none: Gower's start, as before adoption, so such runs keep
        # their dispersion); a change of the adopted solution recomputes the dispersion
        solution = self._gpa_solution()
        inputs = fingerprint(
            "dispersion", gpa_inputs, list(SCORES), *(() if solution is None else (solution,))
        )
        written = (self.layout.dispersion, *map(self.layout.pca_array, RunLayout.PCA_ARRAYS))
        shapes = {self.layout.dispersion: (self.n,),
                  self.layout.pca_array("scores"): (self.n, None)}
        problem = _first_problem(written, shapes)
        if self.manifest.step_done("dispersion", inputs) and problem is None:
            self.notify(ProgressEvent("dispersion", None, 1, 1, skipped=True))
            return
        self._tell_redone("dispersion", inputs, "dispersion", None, lambda: problem, total=1)
        self.manifest.forget_step("dispersion")
        residuals = read_npy(self.layout.gpa_array("residuals"))
        write_dispersion(self.layout, self.stimuli["id"].tolist(), residuals)
        self.manifest.finish_step("dispersion", inputs)
        self.notify(ProgressEvent("dispersion", None, 1, 1))

    def thumbnails(self) -> None:
        """Gallery thumbnails (or remove them when turned off or there are no images)."""
        inputs = fingerprint("thumbnails", self.data_fingerprint, THUMBNAIL_SIZE)
        if not self.plan.thumbnails or self.images_root is None:
            self.manifest.forget_step("thumbnails")
            self.layout.remove_tree(self.layout.thumbnails_dir)
        elif self.manifest.step_done("thumbnails", inputs):
            lost = [row for row in range(self.n) if not self.layout.thumbnail(row).is_file()]
            if lost:  # deleted since: those are drawn again
                write_thumbnails(self.layout, self.stimuli, self.images_root, rows=lost)
            self.notify(ProgressEvent("thumbnails", None, self.n, self.n, skipped=not lost))
        else:
            self.notify(ProgressEvent("thumbnails", None, 0, self.n))
            write_thumbnails(
                self.layout,
                self.stimuli,
                self.images_root,
                progress=lambda done: self.notify(ProgressEvent("thumbnails", None, done, self.n)),
            )
            self.manifest.finish_step("thumbnails", inputs)

    # -- properties (convergence_core.properties) ------------------------------------------------
    def wants_caption_agreement(self) -> bool:
        """Whether caption agreement can be measured: some stimulus has 2 or more captions."""
        return any(len(captions) >= 2 for captions in self.stimuli["captions"])

    def _agreement_step(self, source: Any, layer: str) -> tuple[str, str, Path]:
        from . import properties as props

        step = f"properties:captions:{source.name}"
        inputs = fingerprint(step, props.CAPTION_VERSION, source.inputs(self), layer)
        file = self.layout.properties_part(f"caption_agreement-{model_key(source.name)}", ".npy")
        return step, inputs, file

    def _store_caption_agreement(self, source: Any, layer: str, values: np.ndarray) -> None:
        step, inputs, file = self._agreement_step(source, layer)
        write_npy(file, np.asarray(values, dtype=np.float64))
        self.manifest.finish_step(step, inputs)

    def _caption_agreement(self, source: Any) -> tuple[str, str, Path] | None:
        """``(input fingerprint, layer, file)`` of a language encoder's caption agreement, made
        current: measured by the extraction when the model was loaded for it, else (a run
        extracted before this step existed, or the Ray engine) by loading it once more. None for
        a model from files or arrays (its captions are not ours to embed)."""
        from . import properties as props
        from .engines import agreement_label, load_for_job, make_job
        from .extract import captions_for_language, extract_embeddings

        if source.kind != "encoder":
            return None
        layer = self.data.models[source.name].default_layer
        step, inputs, file = self._agreement_step(source, layer)
        if self.manifest.step_done(step, inputs) and stored_file_problem(file) is None:
            return inputs, layer, file
        cfg = self.config
        job = make_job(
            source.name, "language", self.stimuli, None, layers=[layer],
            caption_mode="mean", device=cfg.device, batch_size=cfg.batch_size,
            precision=cfg.precision, weights=(cfg.weights or {}).get(source.name),
        )
        encoder, layers, autocast = load_for_job(job)
        texts, owners = captions_for_language(self.stimuli, "mean")
        label = agreement_label(source.name)
        embedded = extract_embeddings(
            encoder, texts,
            batch_size=32 if cfg.batch_size == "auto" else int(cfg.batch_size),
            progress=lambda done, total: self.notify(
                ProgressEvent("extract", label, int(done), int(total))
            ),
            layers=[layer], autocast=autocast, by_length=True,
        )[layer]
        del encoder
        self._store_caption_agreement(source, layer, props.caption_agreement(embedded, owners, self.n))
        return inputs, layer, file

    def _forget_dropped_caption_parts(self) -> None:
        """Remove the caption-agreement steps and files of models no longer in the run."""
        prefix = "properties:captions:"
        wanted = {source.name for source in self.plan.sources}
        for step in [s for s in self.data.steps if s.startswith(prefix)]:
            model = step[len(prefix) :]
            if model not in wanted:
                self.manifest.forget_step(step)
                file = self.layout.properties_part(f"caption_agreement-{model_key(model)}", ".npy")
                file.unlink(missing_ok=True)

    def properties(self) -> None:
        """properties.parquet + properties.json (see :mod:`convergence_core.properties`).

        Cached in parts under properties/, each a manifest step with its own input fingerprint:
        the image properties (``properties:image``: every image decoded once more, ~5–20 ms each;
        none for a run without images), each language encoder's caption agreement
        (``properties:captions:<model>``: every caption embedded at the model's default layer —
        measured by the extraction itself while the model is loaded, so only runs extracted
        before this step existed, or on the Ray engine, load the model again; skipped when no
        stimulus has 2 captions), then the table (``properties``) with each GPA model's
        typicality (from its stored neighbour lists) and distance from the centroid.
        """
        from . import properties as props

        layout, n = self.layout, self.n
        language = [s for s in self.plan.sources if s.modality == "language"]
        total = 1 + len(language) + 1
        image_inputs = fingerprint("properties:image", props.IMAGE_VERSION, self.data_fingerprint)
        image_file = layout.properties_part("image", ".parquet")
        image = None
        if self.images_root is not None:
            if not (
                self.manifest.step_done("properties:image", image_inputs)
                and stored_file_problem(image_file, (n,)) is None
            ):
                self.notify(ProgressEvent("properties", None, 0, total))
                paths = [self.images_root / rel for rel in self.stimuli["image"]]
                write_parquet(image_file, props.image_properties(paths, root=self.images_root))
                self.manifest.finish_step("properties:image", image_inputs)
            image = read_parquet(image_file)
        self._forget_dropped_caption_parts()
        agreement, agreement_inputs, agreement_layers = {}, {}, {}
        for done, source in enumerate(language, start=1):
            part = self._caption_agreement(source) if self.wants_caption_agreement() else None
            if part is not None:
                agreement_inputs[source.name], layer, file = part
                agreement[source.name], agreement_layers[source.name] = read_npy(file), layer
            self.notify(ProgressEvent("properties", source.name, 1 + done, total))
        gpa = self.data.gpa
        k = min(props.TYPICALITY_K, n - 1)
        inputs = fingerprint(
            "properties",
            props.PROPERTIES_VERSION,
            image_inputs if image is not None else None,
            agreement_inputs,
            {m: self.data.models[m].sha256[layer] for m, layer in zip(gpa.models, gpa.layers)},
            k,
            NEIGHBOURS_ALGORITHM,
            self.stimuli.drop(columns=["captions"]).to_dict("list"),
        )
        problem = _first_problem(
            [layout.properties, layout.properties_info], {layout.properties: (n,)}
        )
        if self.manifest.step_done("properties", inputs) and problem is None:
            self.notify(ProgressEvent("properties", None, total, total, skipped=True))
            return
        self._tell_redone("properties", inputs, "properties", None, lambda: problem, total=total)
        self.manifest.forget_step("properties")
        distances, centroid = {}, {}
        stored = list_size_for(n, self.plan.list_size) >= k  # lists of k or more (--list-size)
        for model, layer in zip(gpa.models, gpa.layers, strict=True):
            entry = self.data.models[model]
            key = entry.layer_keys[layer]
            if stored and layer in entry.neighbour_layers:  # typicality from the stored lists
                values = read_npy(layout.neighbour_values(entry.key, key), mmap=True)[:, :k]
            else:
                from .neighbours import PreparedFeatures, exact_top_k

                raw = read_npy(layout.embedding(entry.key, key), mmap=True)
                features = PreparedFeatures(raw, entry.clip_thresholds[layer])
                values = exact_top_k(features, k, device=self.plan.device)[1]
            distances[model] = props.neighbour_distance(np.asarray(values), k)
            centroid[model] = props.centroid_distance(
                read_npy(layout.embedding(entry.key, key), mmap=True)
            )
        table = props.assemble_properties(
            self.stimuli,
            image=image,
            agreement=agreement,
            distances=distances,
            centroid_distances=centroid,
            agreement_layers=agreement_layers,
            distance_layers=dict(zip(gpa.models, gpa.layers, strict=True)),
        )
        write_properties(layout, table.values, table.info)
        self.manifest.finish_step("properties", inputs)
        self.notify(ProgressEvent("properties", None, total, total))

    def finish(self, seconds: float) -> None:
        """Mark the run complete."""
        self.data.complete = True
        self.data.details["seconds_last_call"] = round(seconds, 3)
        self.manifest.save()


def _open_manifest(layout: RunLayout, name: str) -> RunManifest:
    """The existing manifest (to resume), or a fresh one when there is none.

    A format-1 run (dense Gram matrices) is upgraded here: its Gram folder is removed and each
    model's clip thresholds are computed from the stored embeddings, so its extraction steps are
    kept and only the neighbour lists are built.
    """
    if layout.manifest.is_file():
        # a run folder: a killed writer's temporary files go. A folder without a manifest is
        # left alone here; prepare_run_folder refuses it unless it is empty
        clean_temp_files(layout.root)
    existing = _read_manifest(layout)
    if existing is not None and existing.needs_upgrade:
        existing = _upgrade_format_1(layout, existing)
    return RunManifest(layout, empty_manifest(name) if existing is None else existing)


def _read_manifest(layout: RunLayout) -> Manifest | None:
    """The run's manifest (None: the folder has none). One that cannot be read is refused
    (ManifestError naming the fix), never replaced: a reset would delete the whole run folder."""
    if not layout.manifest.is_file():
        return None
    try:
        return parse_manifest(read_json(layout.manifest), str(layout.manifest))
    except CacheFormatError as exc:
        problem = str(exc).split("; ")[0]  # the reader's own advice was to rerun precompute
        raise ManifestError(
            f"{problem}; precompute does not overwrite a run it cannot read: if a newer version "
            "of convergence_core wrote it, use that version; otherwise restore manifest.json, or "
            f"delete {layout.root} (or choose another run name, --run-name) to compute it afresh"
        ) from None


def _upgrade_format_1(layout: RunLayout, manifest: Any) -> Any:
    """Format 1 -> 2 in place: drop grams/, add clip thresholds; None when that fails."""
    try:
        for entry in manifest.models.values():
            entry.clip_thresholds = {
                layer: clip_threshold(read_npy(layout.embedding(entry.key, key), mmap=True))
                for layer, key in entry.layer_keys.items()
            }
            entry.neighbour_layers = []
    except (CacheFormatError, ValueError):
        return None
    layout.remove_tree(layout.legacy_grams_dir)
    manifest.format = MANIFEST_FORMAT
    manifest.complete = False
    return manifest


def _forget_dropped_models(manifest: RunManifest, wanted: Sequence[str]) -> None:
    """Remove models (files, entries and steps) that are no longer in the config."""
    data = manifest.data
    for model in [m for m in data.models if m not in wanted]:
        entry = data.models.pop(model)
        for step in [s for s in data.steps if s == f"extract:{model}" or
                     s.startswith(f"neighbours:{model}:")]:
            data.steps.pop(step)
        manifest.save()  # forgotten (and the run incomplete) before any of its files go
        # the key was checked when the manifest was read (manifest.ModelEntry); a folder that
        # leads out of the run (a planted symbolic link) is left alone
        layout = manifest.layout
        for folder in (layout.embeddings_dir, layout.neighbours_dir, layout.captions_dir):
            try:
                layout.remove_tree(folder(entry.key))
            except CacheFormatError:
                continue
