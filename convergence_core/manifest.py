"""The run manifest as typed records, read against a schema.

``manifest.json`` says what a run folder holds: the data set, every model (its folder key, layers,
dimensions, content hashes, clip thresholds of the prepared features), which models entered GPA,
the settings, the library versions and which steps are done. A run folder may come from someone
else (a shared cache, a download), so :func:`parse_manifest` checks every field's type and every
name that will become a path (``cache.check_key``) and raises :class:`ManifestError` naming the
field and the fix; :func:`run.list_runs` lists such a run as damaged instead of failing.

Format history (``format``):

* 1 — runs stored dense (n, n) Gram matrices under ``grams/``.
* 2 — runs store exact top-K neighbour lists under ``neighbours/`` and each layer's clip
  threshold (``ModelEntry.clip_thresholds``); Gram matrices are gone. A format-1 run is upgraded
  in place by rerunning its precompute (embeddings are kept, the lists are built).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

from .cache import CacheFormatError, check_key
from .sources import KNOWN_MODALITIES, MODALITY_NAME

__all__ = [
    "MANIFEST_FORMAT",
    "DatasetInfo",
    "GPARecord",
    "Manifest",
    "ManifestError",
    "ModelEntry",
    "StepRecord",
    "StimulusSubset",
    "parse_manifest",
]

#: Version of the manifest schema written by this code (see the module docstring).
MANIFEST_FORMAT = 2
#: Older formats that ``precompute`` upgrades in place.
UPGRADABLE_FORMATS = (1,)


class ManifestError(CacheFormatError):
    """manifest.json does not follow the schema (damaged, altered or from another program)."""


def _fail(where: str, message: str) -> ManifestError:
    return ManifestError(
        f"{where}: {message}; the run's manifest is damaged or was altered: rerun the precompute "
        "that made it, or delete the run folder"
    )


def _get(data: dict[str, Any], name: str, kinds: type | tuple[type, ...], where: str,
         default: Any = ...) -> Any:
    if name not in data:
        if default is ...:
            raise _fail(where, f"field {name!r} is missing")
        return default
    value = data[name]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _fail(where, f"field {name!r} must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise _fail(where, f"field {name!r} must be {_kind_name(kinds)}, got {str(value)[:60]!r}")
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer",
             float: "a number", bool: "true or false", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _str_list(data: dict[str, Any], name: str, where: str, default: Any = ...) -> list[str]:
    values = _get(data, name, list, where, default)
    if any(not isinstance(v, str) for v in values):
        raise _fail(where, f"field {name!r} must be a list of strings")
    return list(values)


def _str_map(data: dict[str, Any], name: str, where: str, value_kinds: type | tuple[type, ...],
             default: Any = ...) -> dict[str, Any]:
    mapping = _get(data, name, dict, where, default)
    for key, value in mapping.items():
        if not isinstance(value, value_kinds) or isinstance(value, bool) and value_kinds is not bool:
            raise _fail(where, f"{name}[{key!r}] must be {_kind_name(value_kinds)}")
    return dict(mapping)


def _shared(keys: list[str]) -> list[str]:
    """The keys that occur more than once in ``keys``, sorted."""
    return sorted({key for key in keys if keys.count(key) > 1})


#: Where a model's features can come from (``ModelEntry.source``; ``sources.*Source.kind``)
FEATURE_SOURCES = ("encoder", "file", "arrays")


def _modality(data: dict[str, Any], where: str) -> str:
    """The model's modality, a name by the rule the run writers apply (``sources.check_modality``:
    a letter, then letters, digits, '_' or '-'): pages quote it in captions, labels and axis
    titles, so a name with Markdown (``vis[x](http://…)``) is refused here, never rendered. The
    writers' refusal of near-misses of ``vision``/``language`` is not applied, so a run written
    before that check still opens."""
    modality = _get(data, "modality", str, where)
    if not MODALITY_NAME.fullmatch(modality):
        raise _fail(
            where,
            f"field 'modality' is {modality[:60]!r}, not a modality name this program writes "
            f"(one of {list(KNOWN_MODALITIES)}, or a letter followed by up to 39 letters, digits, "
            "'_' or '-', e.g. 'ecog')",
        )
    return modality


def _feature_source(data: dict[str, Any], where: str) -> str | None:
    source = _get(data, "source", (str, type(None)), where, None)
    if source is not None and source not in FEATURE_SOURCES:
        raise _fail(where, f"source must be one of {list(FEATURE_SOURCES)}, got {source!r}")
    return source


@dataclass
class ModelEntry:
    """One model of a run.

    Attributes:
        key: folder name of its files (``cache.model_key`` of the name).
        modality: ``vision``, ``language``, ``brain`` or a user-given name (a letter, then
            letters, digits, ``_`` or ``-``: ``sources.check_modality``'s rule, checked on reading).
        layers: layer names, shallow to deep; ``layer_keys``: layer -> file name.
        default_layer: the layer used when none is named (a vision model's = its GPA layer).
        dims: layer -> feature width d; ``sha256``: layer -> content hash of the stored embedding.
        clip_thresholds: layer -> clip threshold of ``prepare_features`` (``inf`` = no clipping,
            stored as null).
        neighbour_layers: layers with stored neighbour lists.
        weights_id: sha256 of the weights (encoder models) or None.
        source: where its features came from, one of :data:`FEATURE_SOURCES` (``encoder``: this
            package extracted them; ``file``: a user's feature file; ``arrays``: arrays given to
            ``write_run_from_embeddings``), or None for a run stored before it was recorded.
        details: anything else recorded (timings, pooling), JSON-able.
    """

    key: str
    modality: str
    layers: list[str]
    layer_keys: dict[str, str]
    default_layer: str
    dims: dict[str, int]
    sha256: dict[str, str]
    clip_thresholds: dict[str, float] = field(default_factory=dict)
    neighbour_layers: list[str] = field(default_factory=list)
    weights_id: str | None = None
    source: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("key", "modality", "layers", "layer_keys", "default_layer", "dims", "sha256",
               "clip_thresholds", "neighbour_layers", "weights_id", "source")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ModelEntry:
        if not isinstance(data, dict):
            raise _fail(where, f"must be an object, got {str(data)[:60]!r}")
        key = check_key(_get(data, "key", str, where), "model key")
        layers = _str_list(data, "layers", where)
        if not layers:
            raise _fail(where, "has no layers")
        layer_keys = _str_map(data, "layer_keys", where, str)
        if set(layer_keys) != set(layers):
            raise _fail(where, "layer_keys must name exactly the model's layers")
        for value in layer_keys.values():
            check_key(value, "layer key")
        shared = _shared(list(layer_keys.values()))
        if shared:  # one layer would read (and a rerun overwrite) another's files
            raise _fail(where, f"several layers share the file key(s) {shared}")
        default_layer = _get(data, "default_layer", str, where)
        if default_layer not in layers:
            raise _fail(where, f"default_layer {default_layer!r} is not one of its layers")
        dims = _str_map(data, "dims", where, int)
        if any(d < 1 for d in dims.values()):
            raise _fail(where, "dims must be positive")
        thresholds = _get(data, "clip_thresholds", dict, where, {})
        clip: dict[str, float] = {}
        for layer, value in thresholds.items():
            if value is None:
                clip[layer] = math.inf
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                clip[layer] = float(value)
            else:
                raise _fail(where, f"clip_thresholds[{layer!r}] must be a positive number or null")
        neighbour_layers = _str_list(data, "neighbour_layers", where, [])
        unknown = sorted(set(neighbour_layers) - set(layers))
        if unknown:
            raise _fail(where, f"neighbour_layers names unknown layers {unknown}")
        return cls(
            key=key,
            modality=_modality(data, where),
            layers=layers,
            layer_keys=layer_keys,
            default_layer=default_layer,
            dims=dims,
            sha256=_str_map(data, "sha256", where, str, {}),
            clip_thresholds=clip,
            neighbour_layers=neighbour_layers,
            weights_id=_get(data, "weights_id", (str, type(None)), where, None),
            source=_feature_source(data, where),
            details={k: v for k, v in data.items() if k not in cls._FIELDS},
        )

    @property
    def from_encoder(self) -> bool:
        """Whether the features were extracted by an encoder this package loads (so the model can
        embed more text or images), not read from a user's file or arrays (runs from before
        :attr:`source` was recorded: encoders are the models with a weights hash)."""
        if self.source is not None:
            return self.source == "encoder"
        return self.weights_id is not None

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._FIELDS}
        if self.source is None:  # a run stored before it was recorded stays as it was
            del out["source"]
        out["clip_thresholds"] = {
            layer: (None if math.isinf(value) else value)
            for layer, value in self.clip_thresholds.items()
        }
        out.update(self.details)
        return out


#: ``DatasetInfo.name`` and ``source["kind"]`` of a run made from feature files alone, whose
#: stimuli are the first file's ids (``precompute.stimuli_from_feature_files``).
FEATURE_IDS_DATASET = "feature-ids"


@dataclass(frozen=True)
class StimulusSubset:
    """A run that holds some of its data set's stimuli (``PrecomputeConfig.stimuli``,
    ``precompute.restrict_stimuli``): ``rule`` is ``"common"`` (those every feature file covers)
    or the path of the id list; ``kept`` of ``of`` stimuli; ``lacking``: per feature file
    (``"model:layer"``), how many of the data set's stimuli it has no row for."""

    rule: str
    kept: int
    of: int
    lacking: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """``20 of its 30 stimuli: those every feature file covers (subj01:V1 lacks 10)``, or
        ``12 of its 30 stimuli: those listed in keep.txt``."""
        if self.rule == "common":
            short = [f"{where} lacks {count:,}" for where, count in self.lacking.items() if count]
            which = "those every feature file covers" + (
                f" ({', '.join(short[:3])}{', …' if len(short) > 3 else ''})" if short else "")
        else:
            which = f"those listed in {PurePath(self.rule).name}"
        return f"{self.kept:,} of its {self.of:,} stimuli: {which}"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StimulusSubset:
        if not isinstance(data, dict):
            raise _fail(where, f"must be an object, got {str(data)[:60]!r}")
        return cls(
            rule=_get(data, "rule", str, where),
            kept=_get(data, "kept", int, where),
            of=_get(data, "of", int, where),
            lacking=_str_map(data, "lacking", where, int, {}),
        )


@dataclass
class DatasetInfo:
    """The data set a run was made from (``images_root`` None: a run without images;
    ``subset``: the run holds only some of its stimuli)."""

    name: str | None = None
    fingerprint: str | None = None
    images_root: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    subset: StimulusSubset | None = None

    def describe(self) -> str:
        """The data set in words, for Home: its name, or where a run without one took its
        stimuli; and, for a run of some of its stimuli, how many and which."""
        if self.source.get("kind") == FEATURE_IDS_DATASET:
            words = (
                f"none (the stimuli are the ids of {PurePath(str(self.source.get('path'))).name}; "
                "no images, no captions)"
            )
        else:
            words = self.name or "unnamed"
        return words if self.subset is None else f"{words}; {self.subset.describe()}"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DatasetInfo:
        if not isinstance(data, dict):
            raise _fail(where, f"must be an object, got {str(data)[:60]!r}")
        dropped = _get(data, "dropped", list, where, [])
        if any(not isinstance(item, dict) for item in dropped):
            raise _fail(where, "dropped must be a list of objects")
        return cls(
            name=_get(data, "name", (str, type(None)), where, None),
            fingerprint=_get(data, "fingerprint", (str, type(None)), where, None),
            images_root=_get(data, "images_root", (str, type(None)), where, None),
            source=_get(data, "source", dict, where, {}),
            dropped=list(dropped),
            subset=None if data.get("subset") is None
            else StimulusSubset.from_dict(data["subset"], f"{where}: subset"),
        )


@dataclass
class StepRecord:
    """A finished step: the fingerprint of its inputs, when it finished, and details."""

    inputs: str
    done: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StepRecord:
        if not isinstance(data, dict):
            raise _fail(where, "must be an object")
        return cls(
            inputs=_get(data, "inputs", str, where),
            done=_get(data, "done", str, where, ""),
            details={k: v for k, v in data.items() if k not in ("inputs", "done")},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "done": self.done, **self.details}


@dataclass
class GPARecord:
    """Which model (at which layer) entered GPA, in order."""

    models: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """Everything ``manifest.json`` records about one run (see the module docstring)."""

    name: str
    created: str
    updated: str
    complete: bool = False
    n_stimuli: int = 0
    dataset: DatasetInfo = field(default_factory=DatasetInfo)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    vision_models: list[str] = field(default_factory=list)
    language_models: list[str] = field(default_factory=list)
    gpa: GPARecord = field(default_factory=GPARecord)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, StepRecord] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    details: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("format", "name", "created", "updated", "complete", "n_stimuli", "dataset",
               "models", "vision_models", "language_models", "gpa", "settings", "versions", "steps")

    @property
    def needs_upgrade(self) -> bool:
        """True for a run in an older format that precompute upgrades in place."""
        return self.format in UPGRADABLE_FORMATS

    @property
    def model_names(self) -> list[str]:
        """Every model: vision, then language, then any other modality (in entry order)."""
        listed = [*self.vision_models, *self.language_models]
        return listed + [m for m in self.models if m not in listed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "created": self.created,
            "updated": self.updated,
            "complete": self.complete,
            "n_stimuli": self.n_stimuli,
            "dataset": asdict(self.dataset),
            "models": {name: entry.to_dict() for name, entry in self.models.items()},
            "vision_models": list(self.vision_models),
            "language_models": list(self.language_models),
            "gpa": asdict(self.gpa),
            "settings": self.settings,
            "versions": self.versions,
            "steps": {name: step.to_dict() for name, step in self.steps.items()},
            **self.details,
        }


def parse_manifest(data: Any, where: str = "manifest.json") -> Manifest:
    """A :class:`Manifest` from parsed JSON, every field checked; ManifestError otherwise.

    Formats other than :data:`MANIFEST_FORMAT` and :data:`UPGRADABLE_FORMATS` are refused.
    """
    if not isinstance(data, dict):
        raise _fail(where, "must hold a JSON object")
    version = data.get("format")
    if type(version) is not int or (  # not true (== 1) nor 2.0
        version != MANIFEST_FORMAT and version not in UPGRADABLE_FORMATS
    ):
        raise ManifestError(
            f"{where}: format {version!r} is not one this version reads ({MANIFEST_FORMAT}, or "
            f"{list(UPGRADABLE_FORMATS)} to upgrade); rerun precompute to rewrite the run"
        )
    models_data = _get(data, "models", dict, where, {})
    models = {
        str(name): ModelEntry.from_dict(entry, f"{where}: models[{name!r}]")
        for name, entry in models_data.items()
    }
    shared = _shared([entry.key for entry in models.values()])
    if shared:  # two models would read (and a rerun overwrite) the same files
        raise _fail(where, f"several models share the file key(s) {shared}")
    vision = _str_list(data, "vision_models", where, [])
    language = _str_list(data, "language_models", where, [])
    unknown = [m for m in [*vision, *language] if m not in models]
    if unknown and data.get("complete"):
        raise _fail(where, f"vision_models/language_models name models without an entry: {unknown}")
    gpa_data = _get(data, "gpa", dict, where, {})
    gpa = GPARecord(
        models=_str_list(gpa_data, "models", f"{where}: gpa", []),
        layers=_str_list(gpa_data, "layers", f"{where}: gpa", []),
    )
    if len(gpa.models) != len(gpa.layers):
        raise _fail(where, "gpa.models and gpa.layers must have the same length")
    strays = [f"{model}:{layer}" for model, layer in zip(gpa.models, gpa.layers, strict=True)
              if layer not in getattr(models.get(model), "layers", ())]
    if strays and data.get("complete"):  # (a rerun drops models before its GPA is redone)
        raise _fail(where, f"gpa names models or layers without an entry in models: {strays}")
    steps_data = _get(data, "steps", dict, where, {})
    n_stimuli = _get(data, "n_stimuli", int, where, 0)
    if n_stimuli < 0:
        raise _fail(where, "n_stimuli must be >= 0")
    return Manifest(
        format=int(version),
        name=_get(data, "name", str, where),
        created=_get(data, "created", str, where, ""),
        updated=_get(data, "updated", str, where, ""),
        complete=_get(data, "complete", bool, where, False),
        n_stimuli=n_stimuli,
        dataset=DatasetInfo.from_dict(_get(data, "dataset", dict, where, {}), f"{where}: dataset"),
        models=models,
        vision_models=vision,
        language_models=language,
        gpa=gpa,
        settings=_get(data, "settings", dict, where, {}),
        versions=_get(data, "versions", dict, where, {}),
        steps={
            str(name): StepRecord.from_dict(step, f"{where}: steps[{name!r}]")
            for name, step in steps_data.items()
        },
        details={k: v for k, v in data.items() if k not in Manifest._FIELDS},
    )
