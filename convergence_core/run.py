"""Read a precomputed run: everything a dashboard page or analysis needs, without loading a model.

``load_run(path)`` reads the manifest and the stimulus table eagerly (both small) and everything
else lazily: embeddings and Gram matrices are memory-mapped on first access, the GPA result, the
dispersion table and the residual PCA are read on first access and then kept. Nothing is ever
unpickled (see :mod:`convergence_core.cache`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from . import settings
from .cache import CacheFormatError, RunLayout, read_json, read_npy, read_parquet

__all__ = ["MANIFEST_FORMAT", "Run", "RunInfo", "list_runs", "load_run"]

#: Version of the manifest schema written by precompute.py; load_run refuses other versions.
MANIFEST_FORMAT = 1


class _LayerArrays(Mapping[str, np.ndarray]):
    """``{layer: (n, d) float32 array}`` for one model; arrays are memory-mapped on first access."""

    def __init__(self, run: Run, model: str) -> None:
        self._run = run
        self._model = model
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, layer: str) -> np.ndarray:
        if layer not in self._loaded:
            self._loaded[layer] = self._run._read_model_array("embedding", self._model, layer)
        return self._loaded[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.layers(self._model))

    def __len__(self) -> int:
        return len(self._run.layers(self._model))

    def __repr__(self) -> str:
        return f"<embeddings of {self._model!r}: layers {self._run.layers(self._model)}>"


class _ModelEmbeddings(Mapping[str, Mapping[str, np.ndarray]]):
    """``embeddings[model][layer]``: lazy, memory-mapped, stimuli in table order."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._models = {name: _LayerArrays(run, name) for name in run.models}

    def __getitem__(self, model: str) -> Mapping[str, np.ndarray]:
        self._run._model_entry(model)  # raises the helpful error for unknown names
        return self._models[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"<embeddings of models {list(self._models)}>"


class Run:
    """One precomputed run folder, read lazily.

    Attributes:
        path: the run folder.
        manifest: the parsed ``manifest.json`` (dataset fingerprint, models, settings,
            versions, steps).
        stimuli: DataFrame, one row per stimulus in run order: ``id`` (str), ``image`` (str, relative
            to :attr:`images_root`), ``captions`` (list[str]), optional ``label`` and other columns.
        embeddings: ``embeddings[model][layer]`` -> read-only (n, d) float32 memory map.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.layout = RunLayout(self.path)
        self.manifest = manifest
        self.stimuli = _read_stimuli(self.layout)
        if len(self.stimuli) != self.n_stimuli:
            raise CacheFormatError(
                f"{self.layout.stimuli} has {len(self.stimuli)} rows but the manifest says "
                f"{self.n_stimuli}; the run is inconsistent: delete {self.path} and rerun precompute"
            )
        self.embeddings: Mapping[str, Mapping[str, np.ndarray]] = _ModelEmbeddings(self)
        self._grams: dict[tuple[str, str], np.ndarray] = {}

    # -- identity -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The run's name (its folder name when it was written)."""
        return str(self.manifest.get("name", self.path.name))

    @property
    def n_stimuli(self) -> int:
        return int(self.manifest["n_stimuli"])

    @property
    def models(self) -> list[str]:
        """Every model in the run: vision models first, then language models."""
        return [*self.vision_models, *self.language_models]

    @property
    def vision_models(self) -> list[str]:
        return list(self.manifest["vision_models"])

    @property
    def language_models(self) -> list[str]:
        return list(self.manifest["language_models"])

    def _model_entry(self, model: str) -> dict[str, Any]:
        entry = self.manifest["models"].get(model)
        if entry is None:
            raise ValueError(
                f"model {model!r} is not in run {self.name!r}; choose one of {self.models}"
            )
        return entry

    def layers(self, model: str) -> list[str]:
        """Layer names of ``model``, in network order (shallow to deep)."""
        return list(self._model_entry(model)["layers"])

    def default_layer(self, model: str) -> str:
        """The model's default layer (for a vision model: the layer that went into the GPA)."""
        return str(self._model_entry(model)["default_layer"])

    def modality(self, model: str) -> str:
        """``"vision"`` or ``"language"``."""
        return str(self._model_entry(model)["modality"])

    def _keys(self, model: str, layer: str) -> tuple[str, str]:
        entry = self._model_entry(model)
        if layer not in entry["layer_keys"]:
            raise ValueError(
                f"layer {layer!r} is not a layer of {model!r} in run {self.name!r}; "
                f"choose one of {entry['layers']}"
            )
        return entry["key"], entry["layer_keys"][layer]

    def _read_model_array(self, kind: str, model: str, layer: str) -> np.ndarray:
        model_key, layer_key = self._keys(model, layer)
        file = (self.layout.embedding if kind == "embedding" else self.layout.gram)(
            model_key, layer_key
        )
        array = read_npy(file, mmap=True)
        n = self.n_stimuli
        expected_ndim_ok = array.ndim == 2 and array.shape[0] == n
        if kind == "gram":
            expected_ndim_ok = expected_ndim_ok and array.shape[1] == n
        if not expected_ndim_ok:
            raise CacheFormatError(
                f"{file} has shape {array.shape}, expected ({n}, {'n' if kind == 'gram' else 'd'}) "
                f"for {n} stimuli; delete {self.path} and rerun precompute"
            )
        return array

    def gram(self, model: str, layer: str) -> np.ndarray:
        """(n, n) float32 Gram matrix ``F Fᵀ`` of ``F = prepare_features(embeddings[model][layer])``.

        Memory-mapped read-only on first access, then kept.
        """
        key = (model, layer)
        if key not in self._grams:
            self._grams[key] = self._read_model_array("gram", model, layer)
        return self._grams[key]

    # -- GPA, dispersion, PCA -----------------------------------------------------------------
    @cached_property
    def gpa(self) -> Any:
        """The ``GPAResult`` of the vision models' default layers (``aligned`` is stored float32)."""
        from .procrustes import GPAResult

        info = read_json(self.layout.gpa_json)
        arrays = {name: read_npy(self.layout.gpa_array(name)) for name in RunLayout.GPA_ARRAYS}
        aligned = arrays["aligned"]
        return GPAResult(
            residuals=arrays["residuals"],
            consensus=arrays["consensus"],
            aligned=[aligned[i] for i in range(aligned.shape[0])],
            loss_history=arrays["loss_history"],
            n_iter=int(info["n_iter"]),
            converged=bool(info["converged"]),
            models=tuple(info["models"]),
            layers=tuple(info["layers"]),
        )

    @cached_property
    def dispersion(self) -> pd.DataFrame:
        """Per-stimulus dispersion, run order: ``id``, ``mean``, ``pc1``, ``rank_mean``, ``rank_pc1``.

        Ranks are 0-based, 0 = lowest dispersion (most agreement among the vision models).
        """
        frame = read_parquet(self.layout.dispersion)
        missing = {"id", "mean", "pc1", "rank_mean", "rank_pc1"} - set(frame.columns)
        if missing or len(frame) != self.n_stimuli:
            raise CacheFormatError(
                f"{self.layout.dispersion} is malformed (missing columns {sorted(missing)} or "
                f"{len(frame)} rows for {self.n_stimuli} stimuli); delete {self.path} and rerun "
                "precompute"
            )
        return frame

    @cached_property
    def pca(self) -> Any:
        """The ``ResidualPCA`` of the GPA residuals."""
        from .dispersion import ResidualPCA

        return ResidualPCA(
            **{name: read_npy(self.layout.pca_array(name)) for name in RunLayout.PCA_ARRAYS}
        )

    @cached_property
    def properties(self) -> Any:
        """The stimulus property table (``properties.PropertyTable``), or None when the run has
        none (written before the properties step existed, or by ``write_run_from_embeddings``)."""
        if not self.layout.properties.is_file():
            return None
        from .properties import PropertyTable

        info = read_json(self.layout.properties_info)
        frame = read_parquet(self.layout.properties)
        try:
            table = PropertyTable.from_records(frame, info["properties"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(
                f"{self.layout.properties} does not match {self.layout.properties_info} ({exc}); "
                f"delete both and rerun precompute"
            ) from None
        if table.values["id"].tolist() != self.stimuli["id"].tolist():
            raise CacheFormatError(
                f"{self.layout.properties} lists other stimuli than the run; delete it and rerun "
                "precompute"
            )
        return table

    # -- images ---------------------------------------------------------------------------------
    @property
    def images_root(self) -> Path | None:
        """Folder that the ``image`` column is relative to, or None for a run without images."""
        root = self.manifest.get("dataset", {}).get("images_root")
        return Path(root) if root else None

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise ValueError(f"row must be an integer position in run.stimuli, got {row!r}")
        if not 0 <= row < self.n_stimuli:
            raise ValueError(
                f"row {row} is out of range for run {self.name!r} with {self.n_stimuli} stimuli; "
                f"use 0..{self.n_stimuli - 1}"
            )
        return int(row)

    def image_path(self, row: int) -> Path | None:
        """Absolute path of the stimulus image at position ``row``; None if the run has no images.

        Raises ValueError if the stored relative path would leave the images root.
        """
        row = self._check_row(row)
        root = self.images_root
        if root is None:
            return None
        resolved_root = root.resolve()
        path = (resolved_root / str(self.stimuli["image"].iloc[row])).resolve()
        if not path.is_relative_to(resolved_root):
            raise ValueError(
                f"image path {self.stimuli['image'].iloc[row]!r} of row {row} leaves the images "
                f"root {root}; fix the dataset table so every image path is inside its root"
            )
        return path

    def thumbnail_path(self, row: int) -> Path | None:
        """Path of the small JPEG (longest side 256 px) for ``row``; None if it was not written."""
        path = self.layout.thumbnail(self._check_row(row))
        return path if path.is_file() else None

    def __repr__(self) -> str:
        return (
            f"Run({self.name!r}, n={self.n_stimuli}, vision={self.vision_models}, "
            f"language={self.language_models}, path={str(self.path)!r})"
        )


def _read_stimuli(layout: RunLayout) -> pd.DataFrame:
    frame = read_parquet(layout.stimuli)
    if "id" not in frame.columns:
        raise CacheFormatError(
            f"{layout.stimuli} has no 'id' column; delete the run and rerun precompute"
        )
    frame["id"] = frame["id"].astype(str)
    if "captions" in frame.columns:
        frame["captions"] = [
            [] if value is None else [str(c) for c in value] for value in frame["captions"]
        ]
    return frame


def load_run(path: str | os.PathLike[str]) -> Run:
    """Open the run folder ``path`` (or a run name under ``settings.runs_root()``).

    Raises:
        FileNotFoundError: no run at ``path``.
        CacheFormatError (a ValueError): the manifest is missing, of another format version, or the
            run is incomplete (an interrupted precompute: rerun it to finish).
    """
    folder = Path(path)
    if not folder.exists() and not folder.is_absolute() and len(folder.parts) == 1:
        candidate = settings.runs_root() / folder
        if candidate.exists():
            folder = candidate
    if not folder.is_dir():
        known = [info.name for info in list_runs()]
        raise FileNotFoundError(
            f"no run folder at {folder}; precompute one with `python -m convergence_core precompute` "
            f"or pick a cached run: {known}"
        )
    layout = RunLayout(folder)
    if not layout.manifest.is_file():
        raise CacheFormatError(
            f"{folder} has no manifest.json, so it is not a run folder; point at a folder made by "
            "`python -m convergence_core precompute`"
        )
    manifest = read_json(layout.manifest)
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version != MANIFEST_FORMAT:
        raise CacheFormatError(
            f"{layout.manifest} has format {version!r}, this version reads {MANIFEST_FORMAT}; "
            "rerun precompute to rewrite the run"
        )
    if not manifest.get("complete", False):
        done = sorted(manifest.get("steps", {}))
        raise CacheFormatError(
            f"run {folder.name!r} is incomplete (steps finished: {done}); it was interrupted: rerun "
            "the same `python -m convergence_core precompute` command to resume it"
        )
    return Run(folder, manifest)


class RunInfo(NamedTuple):
    """One cached run as listed by :func:`list_runs`."""

    name: str
    path: Path
    summary: dict[str, Any]


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    dataset = manifest.get("dataset", {})
    return {
        "complete": bool(manifest.get("complete", False)),
        "dataset": dataset.get("name"),
        "n_stimuli": manifest.get("n_stimuli"),
        "vision_models": manifest.get("vision_models", []),
        "language_models": manifest.get("language_models", []),
        "created": manifest.get("created"),
        "updated": manifest.get("updated"),
        "steps": sorted(manifest.get("steps", {})),
    }


def list_runs(root: str | os.PathLike[str] | None = None) -> list[RunInfo]:
    """Cached runs under ``root`` (default ``settings.runs_root()``), most recently updated first.

    Each entry is ``(name, path, summary)``; ``summary`` holds ``complete``, ``dataset``,
    ``n_stimuli``, ``vision_models``, ``language_models``, ``created``, ``updated`` (ISO 8601 UTC)
    and ``steps``. Folders without a readable manifest are skipped.
    """
    folder = Path(root) if root is not None else settings.runs_root()
    if not folder.is_dir():
        return []
    runs: list[RunInfo] = []
    for child in folder.iterdir():
        layout = RunLayout(child)
        if not layout.manifest.is_file():
            continue
        try:
            manifest = read_json(layout.manifest)
        except CacheFormatError:
            continue
        if not isinstance(manifest, dict):
            continue
        runs.append(RunInfo(child.name, child, _summary(manifest)))
    runs.sort(key=lambda info: (info.summary["updated"] or "", info.name), reverse=True)
    return runs
