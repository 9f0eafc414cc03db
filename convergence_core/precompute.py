"""Write run folders: from in-memory embeddings, or the full resumable pipeline from a dataset.

A run folder (layout in docs/ARCHITECTURE.md and :class:`convergence_core.cache.RunLayout`) is
written step by step; each finished step is recorded in ``manifest.json`` under ``steps`` with the
fingerprint of its inputs, and the manifest is rewritten atomically after every step.

``write_run_from_embeddings`` writes a complete run from arrays you already have (tests and
analyses use it to build small runs). The pipeline (``precompute``) is defined further below.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .settings import cache_root as default_cache_root
from .cache import (
    CacheFormatError,
    RunLayout,
    clean_temp_files,
    model_key,
    read_json,
    read_npy,
    run_lock,
    write_json,
    write_npy,
    write_parquet,
)
from .run import MANIFEST_FORMAT, Run, load_run

__all__ = [
    "PrecomputeConfig",
    "ProgressEvent",
    "default_run_name",
    "precompute",
    "write_run_from_embeddings",
]

#: Longest side of gallery thumbnails, in pixels.
THUMBNAIL_SIZE = 256
_VERSIONED_LIBRARIES = ("numpy", "torch", "timm", "transformers", "pandas", "pyarrow", "pillow")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the numbers (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(*parts: Any) -> str:
    """sha256 hex of the canonical JSON of ``parts`` (dicts key-sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def array_fingerprint(array: np.ndarray) -> str:
    """sha256 hex over an array's dtype, shape and bytes (C order)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifest bookkeeping
# ---------------------------------------------------------------------------------------------
class _Manifest:
    """The manifest being written; ``save()`` rewrites manifest.json atomically."""

    def __init__(self, layout: RunLayout, data: dict[str, Any]) -> None:
        self.layout = layout
        self.data = data

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.layout.manifest, self.data)

    def step_done(self, step: str, inputs: str) -> bool:
        return self.data["steps"].get(step, {}).get("inputs") == inputs

    def finish_step(self, step: str, inputs: str, **details: Any) -> None:
        self.data["steps"][step] = {"inputs": inputs, "done": _now(), **details}
        self.save()

    def forget_step(self, step: str) -> None:
        if self.data["steps"].pop(step, None) is not None:
            self.save()


def _empty_manifest(name: str) -> dict[str, Any]:
    now = _now()
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "created": now,
        "updated": now,
        "complete": False,
        "n_stimuli": 0,
        "dataset": {},
        "models": {},
        "vision_models": [],
        "language_models": [],
        "gpa": {},
        "settings": {},
        "versions": library_versions(),
        "steps": {},
    }


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _normalise_stimuli(stimuli: pd.DataFrame) -> pd.DataFrame:
    """Copy of the stimulus table with ``id`` str, ``image`` str, ``captions`` list[str]."""
    if not isinstance(stimuli, pd.DataFrame):
        raise ValueError(
            f"stimuli must be a pandas DataFrame with columns id, image, captions; got "
            f"{type(stimuli).__name__}"
        )
    missing = [c for c in ("id", "image", "captions") if c not in stimuli.columns]
    if missing:
        raise ValueError(
            f"stimuli table lacks column(s) {missing}; it needs id (unique str), image (path "
            "relative to the images root) and captions (list of str per stimulus)"
        )
    if len(stimuli) < 3:
        raise ValueError(
            f"a run needs at least 3 stimuli (GPA residuals and k-NN need several), got {len(stimuli)}"
        )
    frame = stimuli.reset_index(drop=True).copy()
    frame["id"] = frame["id"].astype(str)
    duplicated = frame["id"][frame["id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"stimulus ids must be unique; duplicated: {duplicated[:5]}; give each stimulus its "
            "own id"
        )
    frame["image"] = frame["image"].astype(str)
    frame["captions"] = [_caption_list(value, row) for row, value in enumerate(frame["captions"])]
    return frame


def _caption_list(value: Any, row: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(c) for c in value]
    raise ValueError(
        f"captions of stimulus row {row} must be a list of strings (or one string), got "
        f"{type(value).__name__}"
    )


def _check_embeddings(
    embeddings: Mapping[str, Mapping[str, np.ndarray]],
    vision_models: Sequence[str],
    language_models: Sequence[str],
    n: int,
) -> dict[str, dict[str, np.ndarray]]:
    """Validate model lists and arrays; return ``{model: {layer: (n, d) float32}}``."""
    vision, language = list(vision_models), list(language_models)
    for kind, names in (("vision_models", vision), ("language_models", language)):
        if len(set(names)) != len(names):
            raise ValueError(f"{kind} lists a model twice: {names}; list each model once")
    both = sorted(set(vision) & set(language))
    if both:
        raise ValueError(f"models {both} are listed as both vision and language models; pick one")
    if len(vision) < 2:
        raise ValueError(
            f"GPA needs at least 2 vision models, got {vision}; add vision models"
        )
    listed = set(vision) | set(language)
    unknown = sorted(set(embeddings) - listed)
    absent = [name for name in [*vision, *language] if name not in embeddings]
    if unknown:
        raise ValueError(
            f"embeddings has model(s) {unknown} that are in neither vision_models nor "
            "language_models; list them in one of the two or drop them"
        )
    if absent:
        raise ValueError(
            f"no embeddings for listed model(s) {absent}; embeddings has {sorted(embeddings)}"
        )
    checked: dict[str, dict[str, np.ndarray]] = {}
    for model in [*vision, *language]:
        layers = embeddings[model]
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(
                f"embeddings[{model!r}] must be a non-empty dict {{layer name: (n, d) array}}"
            )
        checked[model] = {}
        for layer, array in layers.items():
            checked[model][str(layer)] = _check_array(np.asarray(array), model, str(layer), n)
    return checked


def _check_array(array: np.ndarray, model: str, layer: str, n: int) -> np.ndarray:
    where = f"embeddings[{model!r}][{layer!r}]"
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{where} must be a 2-D (n_stimuli, dim) array, got shape {array.shape}")
    if array.shape[0] != n:
        raise ValueError(
            f"{where} has {array.shape[0]} rows but there are {n} stimuli; every model must embed "
            "every stimulus, in stimulus-table order"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{where} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{where} has NaN/inf (or values beyond float32 range) in {rows.size} row(s), first "
            f"rows {rows[:5].tolist()}; fix the extraction or drop those stimuli"
        )
    return array


# ---------------------------------------------------------------------------------------------
# Steps shared by write_run_from_embeddings and the pipeline
# ---------------------------------------------------------------------------------------------
def _write_layer_arrays(
    layout: RunLayout, key: str, layer_keys: Mapping[str, str], arrays: Mapping[str, np.ndarray]
) -> dict[str, str]:
    """Write one model's embeddings (float32) and Gram matrices; return ``{layer: sha256}``."""
    from .alignment import prepare_features

    shutil.rmtree(layout.embeddings_dir(key), ignore_errors=True)
    shutil.rmtree(layout.grams_dir(key), ignore_errors=True)
    hashes: dict[str, str] = {}
    for layer, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        write_npy(layout.embedding(key, layer_keys[layer]), array)
        hashes[layer] = array_fingerprint(array)
        features = np.asarray(prepare_features(array.astype(np.float64)), dtype=np.float64)
        write_npy(layout.gram(key, layer_keys[layer]), (features @ features.T).astype(np.float32))
    return hashes


def _model_entry(
    name: str,
    modality: str,
    arrays: Mapping[str, np.ndarray],
    default_layer: str,
    hashes: Mapping[str, str],
    **extra: Any,
) -> dict[str, Any]:
    layers = list(arrays)
    return {
        "key": model_key(name),
        "modality": modality,
        "layers": layers,
        "layer_keys": {layer: model_key(layer) for layer in layers},
        "default_layer": default_layer,
        "dims": {layer: int(arrays[layer].shape[1]) for layer in layers},
        "sha256": dict(hashes),
        **extra,
    }


def _write_gpa(
    layout: RunLayout,
    arrays: Sequence[np.ndarray],
    models: Sequence[str],
    layers: Sequence[str],
    *,
    tol: float,
    max_iter: int,
) -> Any:
    """Run GPA on float64 copies of ``arrays`` and write gpa/; return the GPAResult."""
    from .procrustes import generalized_procrustes

    result = generalized_procrustes(
        [np.asarray(a, dtype=np.float64) for a in arrays],
        tol=tol,
        max_iter=max_iter,
        models=tuple(models),
        layers=tuple(layers),
    )
    write_npy(layout.gpa_array("residuals"), np.asarray(result.residuals, dtype=np.float64))
    write_npy(layout.gpa_array("consensus"), np.asarray(result.consensus, dtype=np.float64))
    write_npy(layout.gpa_array("loss_history"), np.asarray(result.loss_history, dtype=np.float64))
    write_npy(layout.gpa_array("aligned"), np.stack(result.aligned).astype(np.float32))
    write_json(
        layout.gpa_json,
        {
            "n_iter": int(result.n_iter),
            "converged": bool(result.converged),
            "models": list(models),
            "layers": list(layers),
            "tol": tol,
            "max_iter": max_iter,
        },
    )
    return result


def _ranks(scores: np.ndarray) -> np.ndarray:
    """0-based ranks, 0 = lowest score; ties broken by stimulus order."""
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(scores.shape[0])
    return ranks


def _write_dispersion(layout: RunLayout, ids: Sequence[str], residuals: np.ndarray) -> None:
    """Write dispersion.parquet and pca/ from the (m, M) residual matrix."""
    from .dispersion import dispersion_scores, residual_pca

    mean = np.asarray(dispersion_scores(residuals, method="mean"), dtype=np.float64)
    pc1 = np.asarray(dispersion_scores(residuals, method="pc1"), dtype=np.float64)
    frame = pd.DataFrame(
        {
            "id": list(ids),
            "mean": mean,
            "pc1": pc1,
            "rank_mean": _ranks(mean),
            "rank_pc1": _ranks(pc1),
        }
    )
    write_parquet(layout.dispersion, frame)
    pca = residual_pca(residuals)
    for name in RunLayout.PCA_ARRAYS:
        write_npy(layout.pca_array(name), np.asarray(getattr(pca, name), dtype=np.float64))


def _write_thumbnails(
    layout: RunLayout, stimuli: pd.DataFrame, images_root: Path, *, progress: Any = None
) -> None:
    """One JPEG per stimulus row (longest side :data:`THUMBNAIL_SIZE` px) under thumbnails/."""
    from .images import make_thumbnail

    root = images_root.resolve()
    for row, image in enumerate(stimuli["image"]):
        source = (root / image).resolve()
        if not source.is_relative_to(root):
            raise ValueError(
                f"image path {image!r} (row {row}) leaves the images root {root}; every image "
                "path must be relative to and inside the root"
            )
        make_thumbnail(source, layout.thumbnail(row), THUMBNAIL_SIZE)
        if progress is not None:
            progress(row + 1)


def _prepare_run_folder(path: Path) -> None:
    """Make ``path`` an empty run folder; an existing run folder there is replaced.

    A non-empty folder that is not a run (no manifest.json) is refused, so user data is never
    deleted.
    """
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"run path {path} is a file; choose a folder path for the run")
        if any(path.iterdir()):
            if not RunLayout(path).manifest.is_file():
                raise ValueError(
                    f"{path} is a non-empty folder that is not a run (no manifest.json); choose an "
                    "empty or new folder for the run"
                )
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_run_from_embeddings(
    path: str | os.PathLike[str],
    stimuli: pd.DataFrame,
    embeddings: Mapping[str, Mapping[str, np.ndarray]],
    *,
    vision_models: Sequence[str],
    language_models: Sequence[str],
    gpa_layers: Mapping[str, str] | None = None,
    default_layers: Mapping[str, str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    thumbnails: bool = True,
    dataset_name: str | None = None,
    dataset_fingerprint: str | None = None,
    settings: Mapping[str, Any] | None = None,
    gpa_tol: float = 1e-10,
    gpa_max_iter: int = 1000,
) -> Run:
    """Write a complete run folder at ``path`` from in-memory embeddings and return it loaded.

    Args:
        path: the run folder; created if needed. An existing *run* folder there is replaced; a
            non-empty folder without manifest.json is refused (ValueError).
        stimuli: n rows in stimulus order with ``id`` (unique), ``image`` (path relative to
            ``images_root``), ``captions`` (list[str]); other columns (e.g. ``label``) are kept.
        embeddings: ``{model: {layer: (n, d) array}}``, layers in network order; stored float32.
        vision_models / language_models: every model of ``embeddings``, each in exactly one list;
            at least 2 vision models (GPA needs them).
        gpa_layers: ``{vision model: layer}`` entering GPA; default: the model's default layer.
        default_layers: ``{model: layer}``; default: the first layer given for the model.
            A vision model's default layer is its GPA layer unless both are given.
        images_root: folder that ``stimuli.image`` is relative to; None = a run without images.
        thumbnails: write thumbnails/ (needs ``images_root``).
        dataset_name, dataset_fingerprint, settings: recorded in the manifest.
        gpa_tol, gpa_max_iter: passed to ``generalized_procrustes``.

    Gram matrices are ``prepare_features(X) @ prepare_features(X).T`` of the float32-stored
    embeddings, and GPA runs on float64 copies of them, so everything is reproducible from the
    run's own files. Raises ValueError (naming the fix) for inconsistent inputs.
    """
    path = Path(path)
    frame = _normalise_stimuli(stimuli)
    n = len(frame)
    arrays = _check_embeddings(embeddings, vision_models, language_models, n)
    vision, language = list(vision_models), list(language_models)
    defaults = {model: next(iter(arrays[model])) for model in arrays}
    for model, layer in (default_layers or {}).items():
        _check_layer_choice(arrays, model, layer, "default_layers")
        defaults[model] = layer
    gpa_choice = {model: defaults[model] for model in vision}
    for model, layer in (gpa_layers or {}).items():
        if model not in vision:
            raise ValueError(
                f"gpa_layers names {model!r}, which is not a vision model; use one of {vision}"
            )
        _check_layer_choice(arrays, model, layer, "gpa_layers")
        gpa_choice[model] = layer
        if model not in (default_layers or {}):
            defaults[model] = layer
    root = Path(images_root).resolve() if images_root is not None else None
    if thumbnails and root is None:
        raise ValueError("thumbnails=True needs images_root; pass images_root or thumbnails=False")
    if root is not None and not root.is_dir():
        raise ValueError(f"images_root {root} is not a folder; pass the folder holding the images")

    _prepare_run_folder(path)
    layout = RunLayout(path)
    manifest = _Manifest(layout, _empty_manifest(path.name))
    data = manifest.data
    data.update(
        n_stimuli=n,
        vision_models=vision,
        language_models=language,
        settings=dict(settings or {}),
        dataset={
            "name": dataset_name,
            "fingerprint": dataset_fingerprint,
            "images_root": str(root) if root is not None else None,
            "source": {"kind": "in-memory"},
            "dropped": [],
        },
    )
    manifest.save()  # first, so a crash leaves a recognisable (incomplete) run folder
    write_parquet(layout.stimuli, frame)
    manifest.finish_step("stimuli", fingerprint(frame["id"].tolist()))
    for model in [*vision, *language]:
        entry_key = model_key(model)
        layer_keys = {layer: model_key(layer) for layer in arrays[model]}
        hashes = _write_layer_arrays(layout, entry_key, layer_keys, arrays[model])
        modality = "vision" if model in vision else "language"
        data["models"][model] = _model_entry(
            model, modality, arrays[model], defaults[model], hashes, weights_id=None
        )
        manifest.finish_step(f"extract:{model}", fingerprint(hashes))
    gpa_layer_list = [gpa_choice[m] for m in vision]
    result = _write_gpa(
        layout,
        [arrays[m][gpa_choice[m]] for m in vision],
        vision,
        gpa_layer_list,
        tol=gpa_tol,
        max_iter=gpa_max_iter,
    )
    data["gpa"] = {"models": vision, "layers": gpa_layer_list}
    gpa_inputs = fingerprint([data["models"][m]["sha256"][gpa_choice[m]] for m in vision])
    manifest.finish_step("gpa", gpa_inputs, n_iter=int(result.n_iter))
    _write_dispersion(layout, frame["id"].tolist(), np.asarray(result.residuals))
    manifest.finish_step("dispersion", gpa_inputs)
    if thumbnails and root is not None:
        _write_thumbnails(layout, frame, root)
        manifest.finish_step("thumbnails", fingerprint(frame["image"].tolist()))
    data["complete"] = True
    manifest.save()
    return load_run(path)


def _check_layer_choice(
    arrays: Mapping[str, Mapping[str, np.ndarray]], model: str, layer: str, argument: str
) -> None:
    if model not in arrays:
        raise ValueError(f"{argument} names unknown model {model!r}; use one of {sorted(arrays)}")
    if layer not in arrays[model]:
        raise ValueError(
            f"{argument}[{model!r}] = {layer!r} is not a layer of {model!r}; use one of "
            f"{list(arrays[model])}"
        )


# ---------------------------------------------------------------------------------------------
# The pipeline: dataset -> embeddings -> grams -> GPA -> dispersion/PCA -> thumbnails
# ---------------------------------------------------------------------------------------------
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
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
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
            return list(self.layers.get(model, "all")) if model in self.layers else "all"
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
    """What the pipeline is doing: ``step`` ("dataset", "extract", "gpa", "dispersion",
    "thumbnails", "done"), the ``model`` being extracted (else None), ``done`` of ``total`` items
    (stimuli or captions), and ``skipped`` when the step was cached and is not recomputed."""

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
            f"GPA needs at least 2 vision models, got {list(config.vision_models)}; add vision models"
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
    """
    from . import models
    from .datasets import check_dataset, dataset_fingerprint, load_dataset
    from .extract import extract_caption_embeddings, extract_embeddings

    cfg = _resolve_config(config, options)
    notify = progress or (lambda event: None)
    started = time.perf_counter()
    _check_model_names(cfg)
    notify(ProgressEvent("dataset", None, 0, 1))
    dataset = load_dataset(cfg.dataset)
    dataset, dropped = check_dataset(dataset, drop_bad=cfg.drop_bad)
    data_fingerprint = dataset_fingerprint(dataset)
    stimuli = _normalise_stimuli(dataset.stimuli)
    n = len(stimuli)
    notify(ProgressEvent("dataset", None, 1, 1))

    name = cfg.run_name or default_run_name(cfg, dataset.name)
    cache = Path(cfg.cache_root) if cfg.cache_root else default_cache_root()
    path = cache / "runs" / model_key(name)
    with run_lock(path):
        layout = RunLayout(path)
        manifest = _open_manifest(layout, name)
        stimuli_inputs = fingerprint(data_fingerprint, dropped)
        if not manifest.step_done("stimuli", stimuli_inputs):
            _prepare_run_folder(path)
            manifest = _Manifest(layout, _empty_manifest(name))
            manifest.save()  # first, so a crash leaves a recognisable (incomplete) run folder
            write_parquet(layout.stimuli, stimuli)
            manifest.data["n_stimuli"] = n
            manifest.data["dataset"] = {
                "name": dataset.name,
                "fingerprint": data_fingerprint,
                "images_root": str(Path(dataset.root).resolve()),
                "source": dataset.source,
                "dropped": dropped,
            }
            manifest.finish_step("stimuli", stimuli_inputs)
        data = manifest.data
        data.update(
            complete=False,
            vision_models=list(cfg.vision_models),
            language_models=list(cfg.language_models),
            settings=cfg.to_dict(),
            versions=library_versions(),
        )
        _forget_dropped_models(manifest, [*cfg.vision_models, *cfg.language_models])
        manifest.save()

        device_kind = str(cfg.device).split(":")[0]
        for model in [*cfg.vision_models, *cfg.language_models]:
            modality = "vision" if model in cfg.vision_models else "language"
            weights = (cfg.weights or {}).get(model)
            spec = models.get_spec(model)
            inputs = fingerprint(
                "extract", data_fingerprint, model, spec.source, modality, cfg.layers_for(model),
                (cfg.gpa_layers or {}).get(model),
                cfg.caption_mode if modality == "language" else None, device_kind,
                os.fspath(weights) if weights else None,
            )
            step = f"extract:{model}"
            entry = data["models"].get(model)
            if manifest.step_done(step, inputs) and entry and _files_present(layout, entry):
                notify(ProgressEvent("extract", model, n, n, skipped=True))
                continue
            manifest.forget_step(step)
            load_started = time.perf_counter()
            encoder = models.load_encoder(model, device=cfg.device, weights=weights)
            load_seconds = time.perf_counter() - load_started
            layers = _choose_layers(cfg, encoder)
            default = encoder.default_layer if encoder.default_layer in layers else layers[-1]
            weights_id = encoder.weights_id
            total = n if modality == "vision" or cfg.caption_mode == "first" else int(
                sum(len(c) for c in stimuli["captions"])
            )

            def report(done: int, _total: int, _model: str = model) -> None:
                notify(ProgressEvent("extract", _model, int(done), int(_total)))

            extract_started = time.perf_counter()
            if modality == "vision":
                raw = extract_embeddings(
                    encoder,
                    [Path(dataset.root) / rel for rel in stimuli["image"]],
                    batch_size=cfg.batch_size,
                    progress=report,
                    layers=layers,
                )
            else:
                raw = extract_caption_embeddings(
                    encoder,
                    stimuli,
                    mode=cfg.caption_mode,
                    batch_size=cfg.batch_size,
                    progress=report,
                    layers=layers,
                )
            extract_seconds = time.perf_counter() - extract_started
            del encoder
            arrays = {layer: _check_array(np.asarray(raw[layer]), model, layer, n) for layer in layers}
            del raw
            hashes = _write_layer_arrays(
                layout, model_key(model), {layer: model_key(layer) for layer in arrays}, arrays
            )
            data["models"][model] = _model_entry(
                model, modality, arrays, default, hashes,
                weights_id=weights_id,
                items=total,
                load_seconds=round(load_seconds, 3),
                extract_seconds=round(extract_seconds, 3),
                items_per_second=round(total / extract_seconds, 2) if extract_seconds > 0 else None,
            )
            manifest.finish_step(step, inputs)

        gpa_models = list(cfg.vision_models)
        gpa_layers = [_gpa_layer(cfg, data["models"][m], m) for m in gpa_models]
        for model, layer in zip(gpa_models, gpa_layers):
            data["models"][model]["default_layer"] = layer
        gpa_inputs = fingerprint(
            "gpa", [data["models"][m]["sha256"][la] for m, la in zip(gpa_models, gpa_layers)],
            gpa_models, gpa_layers, GPA_TOL, GPA_MAX_ITER,
        )
        data["gpa"] = {"models": gpa_models, "layers": gpa_layers}
        if manifest.step_done("gpa", gpa_inputs) and layout.gpa_json.is_file():
            notify(ProgressEvent("gpa", None, 1, 1, skipped=True))
        else:
            manifest.forget_step("gpa")
            notify(ProgressEvent("gpa", None, 0, 1))
            arrays_in = [
                read_npy(layout.embedding(data["models"][m]["key"], data["models"][m]["layer_keys"][la]))
                for m, la in zip(gpa_models, gpa_layers)
            ]
            result = _write_gpa(
                layout, arrays_in, gpa_models, gpa_layers, tol=GPA_TOL, max_iter=GPA_MAX_ITER
            )
            manifest.finish_step(
                "gpa", gpa_inputs, n_iter=int(result.n_iter), converged=bool(result.converged)
            )
            notify(ProgressEvent("gpa", None, 1, 1))

        if manifest.step_done("dispersion", gpa_inputs) and layout.dispersion.is_file():
            notify(ProgressEvent("dispersion", None, 1, 1, skipped=True))
        else:
            manifest.forget_step("dispersion")
            _write_dispersion(layout, stimuli["id"].tolist(), read_npy(layout.gpa_array("residuals")))
            manifest.finish_step("dispersion", gpa_inputs)
            notify(ProgressEvent("dispersion", None, 1, 1))

        thumbs_inputs = fingerprint("thumbnails", data_fingerprint, THUMBNAIL_SIZE)
        if not cfg.thumbnails:
            manifest.forget_step("thumbnails")
            shutil.rmtree(layout.thumbnails_dir, ignore_errors=True)
        elif manifest.step_done("thumbnails", thumbs_inputs):
            notify(ProgressEvent("thumbnails", None, n, n, skipped=True))
        else:
            _write_thumbnails(
                layout, stimuli, Path(dataset.root),
                progress=lambda done: notify(ProgressEvent("thumbnails", None, done, n)),
            )
            manifest.finish_step("thumbnails", thumbs_inputs)

        data["complete"] = True
        data["seconds_last_call"] = round(time.perf_counter() - started, 3)
        manifest.save()
        notify(ProgressEvent("done", None, 1, 1))
        return load_run(path)


#: GPA settings used by the pipeline (recorded in gpa/gpa.json).
GPA_TOL = 1e-10
GPA_MAX_ITER = 1000


def _gpa_layer(config: PrecomputeConfig, entry: Mapping[str, Any], model: str) -> str:
    chosen = (config.gpa_layers or {}).get(model)
    if chosen is None:
        return str(entry["default_layer"])
    if chosen not in entry["layers"]:
        raise ValueError(
            f"gpa_layers[{model!r}] = {chosen!r} was not extracted; choose one of {entry['layers']} "
            "or add it to layers"
        )
    return chosen


def _open_manifest(layout: RunLayout, name: str) -> _Manifest:
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
            return _Manifest(layout, existing)
    return _Manifest(layout, _empty_manifest(name))


def _forget_dropped_models(manifest: _Manifest, wanted: Sequence[str]) -> None:
    """Remove models (files, entries and steps) that are no longer in the config."""
    data = manifest.data
    for model in [m for m in data["models"] if m not in wanted]:
        key = data["models"].pop(model)["key"]
        shutil.rmtree(manifest.layout.embeddings_dir(key), ignore_errors=True)
        shutil.rmtree(manifest.layout.grams_dir(key), ignore_errors=True)
        data["steps"].pop(f"extract:{model}", None)
