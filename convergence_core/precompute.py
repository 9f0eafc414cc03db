"""The resumable precompute pipeline.

dataset -> embeddings -> Gram matrices -> GPA -> dispersion + PCA -> thumbnails -> properties.

Configure it with :class:`PrecomputeConfig` (or a .json/.toml file, or keyword options) and call
:func:`precompute`. Each step is recorded in the run's manifest with the fingerprint of its
inputs and skipped on a rerun whose inputs are unchanged, so an interrupted run resumes and a
finished one costs seconds. The files of each step are written by :mod:`.run_writer`;
``write_run_from_embeddings`` is re-exported here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .cache import (
    CacheFormatError,
    RunLayout,
    clean_temp_files,
    model_key,
    read_json,
    read_npy,
    read_parquet,
    run_lock,
    write_npy,
    write_parquet,
)
from .procrustes import GPA_ALGORITHM
from .run import MANIFEST_FORMAT, Run, load_run
from .run_writer import (
    THUMBNAIL_SIZE,
    RunManifest,
    check_embedding_array,
    empty_manifest,
    fingerprint,
    library_versions,
    model_entry,
    normalise_stimuli,
    prepare_run_folder,
    write_dispersion,
    write_gpa,
    write_model_arrays,
    write_properties,
    write_run_from_embeddings,
    write_thumbnails,
)
from .settings import cache_root as default_cache_root

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
GPA_TOL = 1e-10
GPA_MAX_ITER = 1000


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything that decides what a run contains.

    Attributes:
        dataset: a dataset spec for ``load_dataset``: a folder / table path, ``"hf:<name>"``, or a
            mapping ``{"kind", "path", **options}``.
        vision_models / language_models: registry names (``models.get_spec``).
        layers: ``"all"`` (every layer of every model), ``"default"`` (only each model's default
            layer), or ``{model: [layer, ...]}`` (models not named get all their layers).
        gpa_layers: ``{vision model: layer}`` entering GPA (always extracted, whatever
            ``layers`` says); default: the model's default layer.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        batch_size: stimuli per forward pass.
        caption_mode: ``"first"`` (embed each stimulus's first caption) or ``"mean"`` (embed
            every caption and average the embeddings per stimulus, float64); see
            ``extract.captions_for_language``.
        drop_bad: drop stimuli with a missing/corrupt image or no caption (recorded in the
            manifest) instead of stopping with the list of them.
        run_name: folder name under ``<cache>/runs/``; default ``<dataset>-<config hash>``.
        cache_root: cache folder; default ``settings.cache_root()``.
        weights: ``{model: local weights path}`` for models whose weights are not installed.
        thumbnails: write gallery thumbnails.
    """

    dataset: Any
    vision_models: tuple[str, ...]
    language_models: tuple[str, ...] = ()
    layers: Any = "all"
    gpa_layers: Mapping[str, str] | None = None
    device: str = "cpu"
    batch_size: int = 32
    caption_mode: str = "first"
    drop_bad: bool = False
    run_name: str | None = None
    cache_root: str | None = None
    weights: Mapping[str, str] | None = None
    thumbnails: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "vision_models", _name_tuple(self.vision_models, "vision_models"))
        object.__setattr__(
            self, "language_models", _name_tuple(self.language_models, "language_models")
        )
        if isinstance(self.dataset, os.PathLike):
            object.__setattr__(self, "dataset", os.fspath(self.dataset))
        if isinstance(self.cache_root, os.PathLike):
            object.__setattr__(self, "cache_root", os.fspath(self.cache_root))
        if not self.dataset:
            raise ValueError("no dataset given; pass dataset=<folder, table file or hf:name>")
        from .extract import CAPTION_MODES

        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(
                f"unknown caption_mode {self.caption_mode!r}; use one of {list(CAPTION_MODES)}"
            )
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.layers, str):
            if self.layers not in ("all", "default"):
                raise ValueError(
                    f"layers={self.layers!r} is not understood; use 'all', 'default' or "
                    "{model: [layer, ...]}"
                )
        elif isinstance(self.layers, Mapping):
            listed = {*self.vision_models, *self.language_models}
            for model, chosen in self.layers.items():
                if model not in listed:
                    raise ValueError(
                        f"layers names {model!r}, which is not among the models {sorted(listed)}"
                    )
                if isinstance(chosen, str) or not chosen:
                    raise ValueError(f"layers[{model!r}] must be a non-empty list of layer names")
            object.__setattr__(
                self, "layers", {m: [str(x) for x in chosen] for m, chosen in self.layers.items()}
            )
        else:
            raise ValueError("layers must be 'all', 'default' or a {model: [layer, ...]} mapping")
        for model in self.gpa_layers or {}:
            if model not in self.vision_models:
                raise ValueError(
                    f"gpa_layers names {model!r}, which is not a vision model; use one of "
                    f"{list(self.vision_models)}"
                )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> PrecomputeConfig:
        """Build from a dict (e.g. a parsed config file); unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        if "dataset" not in mapping or "vision_models" not in mapping:
            raise ValueError("a precompute config needs at least 'dataset' and 'vision_models'")
        return cls(**dict(mapping))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PrecomputeConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) config file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; pass a .json or .toml file")
        text = path.read_text(encoding="utf-8")
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

    def layers_for(self, model: str) -> str | list[str]:
        """``"all"``, ``"default"`` or the list of layers chosen for ``model``."""
        if isinstance(self.layers, Mapping):
            return list(self.layers[model]) if model in self.layers else "all"
        return self.layers


def _name_tuple(names: Any, what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = tuple(str(n).strip() for n in names)
    if len(set(names)) != len(names):
        raise ValueError(f"{what} lists a model twice: {list(names)}; list each model once")
    return names


@dataclass(frozen=True)
class ProgressEvent:
    """What the pipeline is doing, sent to the ``progress`` callback.

    ``step``: "dataset", "waiting" (for another process writing the same run), "extract",
    "gpa", "dispersion", "thumbnails", "properties" or "done"; ``model``: the model being
    extracted (else None; "<model> (every caption, for caption agreement)" while the properties'
    caption pass embeds every caption; "properties": the language model whose part is done);
    ``done`` of ``total`` items (stimuli or captions; "properties": parts); ``skipped``: the step
    was cached and is not recomputed.
    """

    step: str
    model: str | None
    done: int
    total: int
    skipped: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


def default_run_name(config: PrecomputeConfig, dataset_name: str) -> str:
    """``<dataset>-<12 hex>``: a hash of everything in the config that changes the results."""
    relevant = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("run_name", "cache_root", "batch_size", "thumbnails")
    }
    safe = model_key(dataset_name.replace(" ", "-"))
    return f"{safe}-{fingerprint(relevant)[:12]}"


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


def _check_model_names(config: PrecomputeConfig) -> None:
    """Fail before any heavy work: unknown names, or a model listed under the wrong modality."""
    from . import models

    if len(config.vision_models) < 2:
        raise ValueError(
            f"GPA needs at least 2 vision models, got {list(config.vision_models)}; "
            "add vision models"
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


def _choose_layers(config: PrecomputeConfig, encoder: Any) -> list[str]:
    """Layers to keep, in network order: the configured ones plus a vision model's GPA layer."""
    wanted = config.layers_for(encoder.name)
    if wanted == "all":
        chosen = set(encoder.layers)
    elif wanted == "default":
        chosen = {encoder.default_layer}
    else:
        chosen = set(wanted)
    gpa_layer = (config.gpa_layers or {}).get(encoder.name)
    if gpa_layer is not None:
        chosen.add(gpa_layer)
    unknown = sorted(chosen - set(encoder.layers))
    if unknown:
        raise ValueError(
            f"layer(s) {unknown} are not layers of {encoder.name!r}; choose from {encoder.layers}"
        )
    return [layer for layer in encoder.layers if layer in chosen]


def _files_present(layout: RunLayout, entry: Mapping[str, Any]) -> bool:
    return all(
        layout.embedding(entry["key"], key).is_file() and layout.gram(entry["key"], key).is_file()
        for key in entry["layer_keys"].values()
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
    ``layers``, ``device``, ``batch_size``, ``caption_mode``, ``drop_bad``, ``run_name``,
    ``cache_root``, ...) override it or, without ``config``, make it.

    Steps, each recorded in the manifest with the fingerprint of its inputs when it finishes and
    skipped on a rerun whose inputs are unchanged: load + check the dataset -> fingerprint it ->
    per model: load, extract every chosen layer, write embeddings and Gram matrices -> GPA on the
    vision models' GPA layers -> dispersion + residual PCA -> thumbnails. An interrupted run
    therefore resumes after its last finished step.

    Stale files are never reused: a model step's fingerprint covers the dataset fingerprint, the
    model name, its layers, the caption mode (language), the device type and any weights path;
    GPA's covers the content hashes of its input arrays. A changed dataset (bytes, captions,
    order, dropped items) resets the whole run folder; a model no longer in the config is removed
    from it. Without ``run_name`` the folder is named from a hash of the config, so different
    configs never share a folder. The weights are identified by name here (their sha256
    ``weights_id`` is recorded after extraction): after replacing a model's weights under the same
    name, delete the run or use a new ``run_name``.

    ``progress(event: ProgressEvent)`` is called as work advances; an exception it raises aborts
    the run, which a later call resumes.

    While another process is writing the same run (its lock file ``.<run>.lock`` names a live
    pid), wait up to ``lock_wait_seconds`` (a ``"waiting"`` event is sent), then continue, reusing
    what it finished; after that, raise ``cache.RunLockedError``.
    """
    from .datasets import check_dataset, dataset_fingerprint, load_dataset

    cfg = _resolve_config(config, options)
    notify = progress or (lambda event: None)
    started = time.perf_counter()
    _check_model_names(cfg)
    notify(ProgressEvent("dataset", None, 0, 1))
    dataset, dropped = check_dataset(load_dataset(cfg.dataset), drop_bad=cfg.drop_bad)
    data_fingerprint = dataset_fingerprint(dataset)
    notify(ProgressEvent("dataset", None, 1, 1))

    name = cfg.run_name or default_run_name(cfg, dataset.name)
    cache = Path(cfg.cache_root) if cfg.cache_root else default_cache_root()
    path = cache / "runs" / model_key(name)
    with run_lock(
        path,
        wait_seconds=lock_wait_seconds,
        on_wait=lambda pid: notify(ProgressEvent("waiting", None, 0, 1)),
    ):
        pipeline = _Pipeline(cfg, dataset, data_fingerprint, dropped, path, name, notify)
        for model in [*cfg.vision_models, *cfg.language_models]:
            pipeline.extract(model)
        gpa_inputs = pipeline.gpa()
        pipeline.dispersion(gpa_inputs)
        pipeline.thumbnails()
        pipeline.properties()
        pipeline.finish(time.perf_counter() - started)
    notify(ProgressEvent("done", None, 1, 1))
    return load_run(path)


class _Pipeline:
    """The steps of one precompute on one run folder (the caller holds the run's lock).

    Opening it reuses the folder's manifest when its stimuli step matches the dataset (else the
    folder is reset); each step method skips its work when the manifest records it done with
    the same input fingerprint and its files are present.
    """

    def __init__(
        self,
        cfg: PrecomputeConfig,
        dataset: Any,
        data_fingerprint: str,
        dropped: list[dict[str, str]],
        path: Path,
        name: str,
        notify: ProgressCallback,
    ) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.data_fingerprint = data_fingerprint
        self.stimuli = normalise_stimuli(dataset.stimuli)
        self.n = len(self.stimuli)
        self.layout = RunLayout(path)
        self.notify = notify
        self.manifest = _open_manifest(self.layout, name)
        stimuli_inputs = fingerprint(data_fingerprint, dropped)
        if not self.manifest.step_done("stimuli", stimuli_inputs):
            prepare_run_folder(path)
            self.manifest = RunManifest(self.layout, empty_manifest(name))
            self.manifest.save()  # first, so a crash leaves a recognisable (incomplete) run folder
            write_parquet(self.layout.stimuli, self.stimuli)
            self.manifest.data["n_stimuli"] = self.n
            self.manifest.data["dataset"] = {
                "name": dataset.name,
                "fingerprint": data_fingerprint,
                "images_root": str(Path(dataset.root).resolve()),
                "source": dataset.source,
                "dropped": dropped,
            }
            self.manifest.finish_step("stimuli", stimuli_inputs)
        self.data = self.manifest.data
        self.data.update(
            complete=False,
            vision_models=list(cfg.vision_models),
            language_models=list(cfg.language_models),
            settings=cfg.to_dict(),
            versions=library_versions(),
        )
        _forget_dropped_models(self.manifest, [*cfg.vision_models, *cfg.language_models])
        self.manifest.save()

    def _extract_inputs(self, model: str, modality: str) -> str:
        from . import models

        weights = (self.cfg.weights or {}).get(model)
        return fingerprint(
            "extract",
            self.data_fingerprint,
            model,
            models.get_spec(model).source,
            modality,
            self.cfg.layers_for(model),
            (self.cfg.gpa_layers or {}).get(model),
            self.cfg.caption_mode if modality == "language" else None,
            str(self.cfg.device).split(":")[0],
            os.fspath(weights) if weights else None,
        )

    def extract(self, model: str) -> None:
        """Load ``model``, embed every stimulus, write its embeddings and Gram matrices."""
        from . import models
        from .extract import extract_caption_embeddings, extract_embeddings

        cfg, n = self.cfg, self.n
        modality = "vision" if model in cfg.vision_models else "language"
        step, inputs = f"extract:{model}", self._extract_inputs(model, modality)
        entry = self.data["models"].get(model)
        if self.manifest.step_done(step, inputs) and entry and _files_present(self.layout, entry):
            self.notify(ProgressEvent("extract", model, n, n, skipped=True))
            return
        self.manifest.forget_step(step)
        load_started = time.perf_counter()
        encoder = models.load_encoder(
            model, device=cfg.device, weights=(cfg.weights or {}).get(model)
        )
        load_seconds = time.perf_counter() - load_started
        layers = _choose_layers(cfg, encoder)
        default = encoder.default_layer if encoder.default_layer in layers else layers[-1]
        weights_id = encoder.weights_id

        def report(done: int, total: int) -> None:
            self.notify(ProgressEvent("extract", model, int(done), int(total)))

        extract_started = time.perf_counter()
        if modality == "vision":
            images = [Path(self.dataset.root) / rel for rel in self.stimuli["image"]]
            raw = extract_embeddings(
                encoder, images, batch_size=cfg.batch_size, progress=report, layers=layers
            )
            items = n
        else:
            raw = extract_caption_embeddings(
                encoder,
                self.stimuli,
                mode=cfg.caption_mode,
                batch_size=cfg.batch_size,
                progress=report,
                layers=layers,
            )
            items = n if cfg.caption_mode == "first" else sum(map(len, self.stimuli["captions"]))
        extract_seconds = time.perf_counter() - extract_started
        if modality == "language":  # while the model is loaded: saves the properties step a load
            self._caption_agreement(model, default, encoder)
        del encoder
        arrays = {
            layer: check_embedding_array(np.asarray(raw[layer]), model, layer, n)
            for layer in layers
        }
        hashes = write_model_arrays(
            self.layout, model_key(model), {layer: model_key(layer) for layer in arrays}, arrays
        )
        self.data["models"][model] = model_entry(
            model,
            modality,
            arrays,
            default,
            hashes,
            weights_id=weights_id,
            items=int(items),
            load_seconds=round(load_seconds, 3),
            extract_seconds=round(extract_seconds, 3),
            items_per_second=round(items / extract_seconds, 2) if extract_seconds > 0 else None,
        )
        self.manifest.finish_step(step, inputs)

    def gpa(self) -> str:
        """GPA on the vision models' GPA layers; returns the step's input fingerprint."""
        models_in = list(self.cfg.vision_models)
        entries = [self.data["models"][m] for m in models_in]
        layers_in = [
            _gpa_layer(self.cfg, entry, m) for entry, m in zip(entries, models_in, strict=True)
        ]
        for entry, layer in zip(entries, layers_in, strict=True):
            entry["default_layer"] = layer
        inputs = fingerprint(
            "gpa",
            [entry["sha256"][layer] for entry, layer in zip(entries, layers_in, strict=True)],
            models_in,
            layers_in,
            GPA_TOL,
            GPA_MAX_ITER,
            GPA_ALGORITHM,  # a new iteration scheme recomputes stored results
        )
        self.data["gpa"] = {"models": models_in, "layers": layers_in}
        if self.manifest.step_done("gpa", inputs) and self.layout.gpa_json.is_file():
            self.notify(ProgressEvent("gpa", None, 1, 1, skipped=True))
            return inputs
        self.manifest.forget_step("gpa")
        self.notify(ProgressEvent("gpa", None, 0, 1))
        arrays = [
            read_npy(self.layout.embedding(entry["key"], entry["layer_keys"][layer]))
            for entry, layer in zip(entries, layers_in, strict=True)
        ]
        result = write_gpa(
            self.layout, arrays, models_in, layers_in, tol=GPA_TOL, max_iter=GPA_MAX_ITER
        )
        self.manifest.finish_step(
            "gpa", inputs, n_iter=int(result.n_iter), converged=bool(result.converged)
        )
        self.notify(ProgressEvent("gpa", None, 1, 1))
        return inputs

    def dispersion(self, gpa_inputs: str) -> None:
        """dispersion.parquet and pca/ from the GPA residuals."""
        if self.manifest.step_done("dispersion", gpa_inputs) and self.layout.dispersion.is_file():
            self.notify(ProgressEvent("dispersion", None, 1, 1, skipped=True))
            return
        self.manifest.forget_step("dispersion")
        residuals = read_npy(self.layout.gpa_array("residuals"))
        write_dispersion(self.layout, self.stimuli["id"].tolist(), residuals)
        self.manifest.finish_step("dispersion", gpa_inputs)
        self.notify(ProgressEvent("dispersion", None, 1, 1))

    def thumbnails(self) -> None:
        """Gallery thumbnails (or remove them when the config turns them off)."""
        inputs = fingerprint("thumbnails", self.data_fingerprint, THUMBNAIL_SIZE)
        if not self.cfg.thumbnails:
            self.manifest.forget_step("thumbnails")
            self.layout.remove_tree(self.layout.thumbnails_dir)
        elif self.manifest.step_done("thumbnails", inputs):
            self.notify(ProgressEvent("thumbnails", None, self.n, self.n, skipped=True))
        else:
            write_thumbnails(
                self.layout,
                self.stimuli,
                Path(self.dataset.root),
                progress=lambda done: self.notify(ProgressEvent("thumbnails", None, done, self.n)),
            )
            self.manifest.finish_step("thumbnails", inputs)

    def properties(self) -> None:
        """properties.parquet + properties.json (see :mod:`convergence_core.properties`).

        Cached in parts under properties/, each a manifest step with its own input fingerprint:
        the image properties (``properties:image``: every image decoded once more, ~5–20 ms each),
        each language model's caption agreement (``properties:captions:<model>``: every caption
        embedded at the model's default layer, about the cost of its extract step with
        caption_mode "mean"; done by the extract step while the model is loaded, so only a run
        extracted before this step existed loads the model again; skipped when no stimulus has 2
        captions), then the table (``properties``) with the vision models' typicality and
        distance from the centroid from their GPA-layer embeddings.
        """
        from . import properties as props

        layout, n = self.layout, self.n
        total = 1 + len(self.cfg.language_models) + 1
        image_inputs = fingerprint(
            "properties:image", props.IMAGE_VERSION, self.data_fingerprint
        )
        image_file = layout.properties_part("image", ".parquet")
        if not (self.manifest.step_done("properties:image", image_inputs) and image_file.is_file()):
            self.notify(ProgressEvent("properties", None, 0, total))
            paths = [Path(self.dataset.root) / rel for rel in self.stimuli["image"]]
            write_parquet(image_file, props.image_properties(paths))
            self.manifest.finish_step("properties:image", image_inputs)
        self._forget_dropped_caption_parts()
        agreement, agreement_inputs, agreement_layers = {}, {}, {}
        for done, model in enumerate(self.cfg.language_models, start=1):
            layer = str(self.data["models"][model]["default_layer"])
            part = self._caption_agreement(model, layer)
            if part is not None:
                agreement_inputs[model], file = part
                agreement[model], agreement_layers[model] = read_npy(file), layer
            self.notify(ProgressEvent("properties", model, 1 + done, total))
        gpa = self.data["gpa"]
        vision = {
            model: (layer, self.data["models"][model])
            for model, layer in zip(gpa["models"], gpa["layers"], strict=True)
        }
        k = min(props.TYPICALITY_K, n - 1)
        inputs = fingerprint(
            "properties",
            props.PROPERTIES_VERSION,
            image_inputs,
            agreement_inputs,
            {model: entry["sha256"][layer] for model, (layer, entry) in vision.items()},
            k,
            self.stimuli.drop(columns=["captions"]).to_dict("list"),
        )
        if self.manifest.step_done("properties", inputs) and layout.properties.is_file():
            self.notify(ProgressEvent("properties", None, total, total, skipped=True))
            return
        self.manifest.forget_step("properties")
        distances, centroid = {}, {}
        for model, (layer, entry) in vision.items():
            features = read_npy(layout.embedding(entry["key"], entry["layer_keys"][layer]))
            distances[model] = props.neighbour_distance(props.nearest_similarities(features, k), k)
            centroid[model] = props.centroid_distance(features)
        table = props.assemble_properties(
            self.stimuli,
            image=read_parquet(image_file),
            agreement=agreement,
            distances=distances,
            centroid_distances=centroid,
            agreement_layers=agreement_layers,
            distance_layers={model: layer for model, (layer, _) in vision.items()},
        )
        write_properties(layout, table.values, table.info)
        self.manifest.finish_step("properties", inputs)
        self.notify(ProgressEvent("properties", None, total, total))

    def _forget_dropped_caption_parts(self) -> None:
        """Remove the caption-agreement steps and files of language models no longer configured."""
        prefix = "properties:captions:"
        for step in [s for s in self.data["steps"] if s.startswith(prefix)]:
            model = step[len(prefix) :]
            if model not in self.cfg.language_models:
                self.manifest.forget_step(step)
                file = self.layout.properties_part(f"caption_agreement-{model_key(model)}", ".npy")
                file.unlink(missing_ok=True)

    def _caption_agreement(
        self, model: str, layer: str, encoder: Any = None
    ) -> tuple[str, Path] | None:
        """Make sure ``model``'s caption agreement (properties/) is current; return its input
        fingerprint and file, or None when no stimulus has 2 captions (nothing to measure).

        Uses ``encoder`` when given (the extract step passes its loaded model), else loads it.
        """
        from . import properties as props

        if not any(len(captions) >= 2 for captions in self.stimuli["captions"]):
            return None
        step = f"properties:captions:{model}"
        inputs = fingerprint(
            step, props.CAPTION_VERSION, self._extract_inputs(model, "language"), layer
        )
        file = self.layout.properties_part(f"caption_agreement-{model_key(model)}", ".npy")
        if self.manifest.step_done(step, inputs) and file.is_file():
            return inputs, file
        from .extract import captions_for_language, extract_embeddings

        if encoder is None:
            from . import models

            encoder = models.load_encoder(
                model, device=self.cfg.device, weights=(self.cfg.weights or {}).get(model)
            )
        texts, owners = captions_for_language(self.stimuli, "mean")
        label = f"{model} (every caption, for caption agreement)"

        def report(done: int, total: int) -> None:
            self.notify(ProgressEvent("extract", label, int(done), int(total)))

        embedded = extract_embeddings(
            encoder, texts, batch_size=self.cfg.batch_size, progress=report, layers=[layer]
        )[layer]
        write_npy(file, props.caption_agreement(embedded, owners, self.n))
        self.manifest.finish_step(step, inputs)
        return inputs, file

    def finish(self, seconds: float) -> None:
        """Mark the run complete."""
        self.data["complete"] = True
        self.data["seconds_last_call"] = round(seconds, 3)
        self.manifest.save()


def _gpa_layer(config: PrecomputeConfig, entry: Mapping[str, Any], model: str) -> str:
    chosen = (config.gpa_layers or {}).get(model)
    if chosen is None:
        return str(entry["default_layer"])
    if chosen not in entry["layers"]:
        raise ValueError(
            f"gpa_layers[{model!r}] = {chosen!r} was not extracted; choose one of "
            f"{entry['layers']} or add it to layers"
        )
    return chosen


def _open_manifest(layout: RunLayout, name: str) -> RunManifest:
    """The existing manifest (to resume), or a fresh one when there is none or it is unreadable."""
    if layout.root.exists():
        clean_temp_files(layout.root)
    if layout.manifest.is_file():
        try:
            existing = read_json(layout.manifest)
        except CacheFormatError:
            existing = None
        if isinstance(existing, dict) and existing.get("format") == MANIFEST_FORMAT:
            existing.setdefault("steps", {})
            existing.setdefault("models", {})
            return RunManifest(layout, existing)
    return RunManifest(layout, empty_manifest(name))


def _forget_dropped_models(manifest: RunManifest, wanted: Sequence[str]) -> None:
    """Remove models (files, entries and steps) that are no longer in the config."""
    data = manifest.data
    for model in [m for m in data["models"] if m not in wanted]:
        entry = data["models"].pop(model)
        data["steps"].pop(f"extract:{model}", None)
        key = entry.get("key") if isinstance(entry, Mapping) else None
        try:
            folders = (manifest.layout.embeddings_dir(key), manifest.layout.grams_dir(key))
        except CacheFormatError:
            continue  # a key that is not ours (tampered manifest): there is nothing of ours to delete
        for folder in folders:
            manifest.layout.remove_tree(folder)
