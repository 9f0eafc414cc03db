"""Write the parts of a run folder, and whole runs from in-memory embeddings.

A run folder (layout in docs/ARCHITECTURE.md and :class:`convergence_core.cache.RunLayout`) is
written step by step; each finished step is recorded in ``manifest.json`` under ``steps`` with the
fingerprint of its inputs (:class:`RunManifest`), and the manifest is rewritten atomically after
every step. The step writers here (embeddings + Gram matrices, GPA, dispersion + PCA,
thumbnails) are shared by :func:`write_run_from_embeddings` (tests and analyses build small runs
with it) and by the resumable pipeline in :mod:`convergence_core.precompute`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cache import RunLayout, model_key, write_json, write_npy, write_parquet
from .run import MANIFEST_FORMAT, Run, load_run

__all__ = [
    "THUMBNAIL_SIZE",
    "RunManifest",
    "array_fingerprint",
    "check_embedding_array",
    "empty_manifest",
    "fingerprint",
    "library_versions",
    "model_entry",
    "normalise_stimuli",
    "prepare_run_folder",
    "write_dispersion",
    "write_gpa",
    "write_model_arrays",
    "write_properties",
    "write_run_from_embeddings",
    "write_thumbnails",
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
class RunManifest:
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


def empty_manifest(name: str) -> dict[str, Any]:
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
def normalise_stimuli(stimuli: pd.DataFrame) -> pd.DataFrame:
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
            "a run needs at least 3 stimuli (GPA residuals and k-NN need several), got "
            f"{len(stimuli)}"
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
        raise ValueError(f"GPA needs at least 2 vision models, got {vision}; add vision models")
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
            checked[model][str(layer)] = check_embedding_array(
                np.asarray(array), model, str(layer), n
            )
    return checked


def check_embedding_array(array: np.ndarray, model: str, layer: str, n: int) -> np.ndarray:
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
# Steps shared by write_run_from_embeddings and the pipeline (precompute.py)
# ---------------------------------------------------------------------------------------------
def write_model_arrays(
    layout: RunLayout, key: str, layer_keys: Mapping[str, str], arrays: Mapping[str, np.ndarray]
) -> dict[str, str]:
    """Write one model's embeddings (float32) and Gram matrices; return ``{layer: sha256}``."""
    from .alignment import prepare_features

    layout.remove_tree(layout.embeddings_dir(key))
    layout.remove_tree(layout.grams_dir(key))
    hashes: dict[str, str] = {}
    for layer, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        write_npy(layout.embedding(key, layer_keys[layer]), array)
        hashes[layer] = array_fingerprint(array)
        features = np.asarray(prepare_features(array.astype(np.float64)), dtype=np.float64)
        write_npy(layout.gram(key, layer_keys[layer]), (features @ features.T).astype(np.float32))
    return hashes


def model_entry(
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


def write_gpa(
    layout: RunLayout,
    arrays: Sequence[np.ndarray],
    models: Sequence[str],
    layers: Sequence[str],
    *,
    tol: float,
    max_iter: int,
) -> Any:
    """Run GPA on float64 copies of ``arrays`` and write gpa/; return the GPAResult."""
    from .procrustes import GPA_ALGORITHM, generalized_procrustes

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
            "algorithm": GPA_ALGORITHM,
        },
    )
    return result


def _ranks(scores: np.ndarray) -> np.ndarray:
    """0-based ranks, 0 = lowest score; ties broken by stimulus order."""
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(scores.shape[0])
    return ranks


def write_dispersion(layout: RunLayout, ids: Sequence[str], residuals: np.ndarray) -> None:
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


def write_thumbnails(
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


def write_properties(layout: RunLayout, table: pd.DataFrame, descriptions: Sequence[Any]) -> None:
    """Write properties.parquet (``id`` + one column per property) and properties.json.

    ``descriptions``: one ``properties.PropertyInfo`` (or its dict) per property column, in
    column order; checked by building a ``PropertyTable`` (ValueError on a mismatch). The parquet
    is written before the JSON; a reader checks that the two agree.
    """
    from dataclasses import asdict, is_dataclass

    from .properties import PROPERTIES_VERSION, PropertyTable

    records = [asdict(d) if is_dataclass(d) else dict(d) for d in descriptions]
    checked = PropertyTable.from_records(table, records)
    write_parquet(layout.properties, checked.values)
    write_json(layout.properties_info, {"version": PROPERTIES_VERSION, "properties": records})


def prepare_run_folder(path: Path) -> None:
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
    frame = normalise_stimuli(stimuli)
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

    prepare_run_folder(path)
    layout = RunLayout(path)
    manifest = RunManifest(layout, empty_manifest(path.name))
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
        hashes = write_model_arrays(layout, entry_key, layer_keys, arrays[model])
        modality = "vision" if model in vision else "language"
        data["models"][model] = model_entry(
            model, modality, arrays[model], defaults[model], hashes, weights_id=None
        )
        manifest.finish_step(f"extract:{model}", fingerprint(hashes))
    gpa_layer_list = [gpa_choice[m] for m in vision]
    result = write_gpa(
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
    write_dispersion(layout, frame["id"].tolist(), np.asarray(result.residuals))
    manifest.finish_step("dispersion", gpa_inputs)
    if thumbnails and root is not None:
        write_thumbnails(layout, frame, root)
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
