"""Read a precomputed run: everything a dashboard page or analysis needs, without loading a model.

``load_run(path)`` reads the manifest (checked against its schema, :mod:`.manifest`) and the
stimulus table eagerly (both small) and everything else lazily: embeddings and neighbour lists are
memory-mapped on first access, the GPA result, the dispersion table and the residual PCA are read on
first access and then kept. Nothing is ever unpickled (see :mod:`convergence_core.cache`).

Alignment of any subset goes through one entry point, :meth:`Run.alignment` (one number) or
:meth:`Run.subset_alignment` (many pairs × many subsets), both exact at any n
(:mod:`.neighbours`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from . import settings
from .cache import (
    CacheFormatError,
    RunLayout,
    live_writer,
    model_key,
    read_json,
    read_npy,
    read_parquet,
)
from .dispersion import SCORES, first_layer_note, rank_column
from .manifest import MANIFEST_FORMAT, Manifest, ModelEntry, parse_manifest

__all__ = ["MANIFEST_FORMAT", "Run", "RunInfo", "list_runs", "load_run"]



class _LayerArrays(Mapping[str, np.ndarray]):
    """``{layer: (n, d) float32 array}`` for one model; arrays are memory-mapped on first access."""

    def __init__(self, run: Run, model: str) -> None:
        self._run = run
        self._model = model
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, layer: str) -> np.ndarray:
        if layer not in self._loaded:
            self._loaded[layer] = self._run._read_model_array(self._model, layer)
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
        manifest: the typed ``manifest.json`` (:class:`~convergence_core.manifest.Manifest`:
            dataset, models, settings, versions, steps).
        stimuli: DataFrame, one row per stimulus in run order: ``id`` (str), ``image`` (str, relative
            to :attr:`images_root`), ``captions`` (list[str]), optional ``label`` and other columns.
        embeddings: ``embeddings[model][layer]`` -> read-only (n, d) float32 memory map.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest) -> None:
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
        self._indexes: dict[tuple[str, str], Any] = {}

    # -- identity -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The run's name (its folder name when it was written)."""
        return self.manifest.name or self.path.name

    @property
    def n_stimuli(self) -> int:
        return int(self.manifest.n_stimuli)

    @property
    def models(self) -> list[str]:
        """Every model in the run: vision models first, then language models, then others."""
        return self.manifest.model_names

    @property
    def vision_models(self) -> list[str]:
        return list(self.manifest.vision_models)

    @property
    def language_models(self) -> list[str]:
        return list(self.manifest.language_models)

    @property
    def other_models(self) -> list[str]:
        """Models that are neither vision nor language models (brain recordings, or any other
        modality a user gave), in run order."""
        listed = {*self.vision_models, *self.language_models}
        return [model for model in self.models if model not in listed]

    @property
    def partner_models(self) -> list[str]:
        """The models the dashboard aligns the GPA models with: the language models (also one
        that is in GPA, as before), then every other model outside GPA (brain recordings given as
        feature files; with GPA across brain subjects, the vision models), in run order."""
        return [*self.language_models, *self.other_partner_models]

    @property
    def other_partner_models(self) -> list[str]:
        """The :attr:`partner_models` that are not language models: every model outside GPA of
        another modality (brain recordings, ...; vision models when GPA runs across subjects)."""
        gpa = set(self.manifest.gpa.models)
        return [m for m in self.models if m not in self.language_models and m not in gpa]

    @property
    def gpa_modality(self) -> str:
        """The modality of the GPA models, whose residuals are the run's dispersion, in words
        for labels: ``"vision"`` (the usual run), ``"brain"`` (GPA across subjects), or several
        ``/``-joined in GPA order (``"vision/brain"``); ``"vision"`` before GPA is recorded."""
        models = self.manifest.gpa.models or self.vision_models
        return "/".join(dict.fromkeys(self.modality(m) for m in models)) or "vision"

    def _model_entry(self, model: str) -> ModelEntry:
        entry = self.manifest.models.get(model)
        if entry is None:
            raise ValueError(
                f"model {model!r} is not in run {self.name!r}; choose one of {self.models}"
            )
        return entry

    def layers(self, model: str) -> list[str]:
        """Layer names of ``model``, in network order (shallow to deep)."""
        return list(self._model_entry(model).layers)

    def default_layer(self, model: str) -> str:
        """The model's default layer (for a vision model: the layer that went into the GPA)."""
        return str(self._model_entry(model).default_layer)

    def first_layer_note(self) -> str | None:
        """:func:`dispersion.first_layer_note` of the GPA models from files or arrays with several
        layers that entered GPA at the first (the default when no layer is named); None if none.
        Brain recordings are left out: their "layers" are regions, in no network order."""
        models = [
            model for model, layer in zip(self.manifest.gpa.models, self.manifest.gpa.layers)
            if not self._model_entry(model).from_encoder and self.modality(model) != "brain"
            and len(self.layers(model)) > 1 and layer == self.layers(model)[0]
        ]
        return first_layer_note(models, [len(self.layers(model)) for model in models], self.name)

    def modality(self, model: str) -> str:
        """``"vision"``, ``"language"``, ``"brain"`` or the name a user gave."""
        return str(self._model_entry(model).modality)

    def _keys(self, model: str, layer: str) -> tuple[str, str]:
        entry = self._model_entry(model)
        if layer not in entry.layer_keys:
            raise ValueError(
                f"layer {layer!r} is not a layer of {model!r} in run {self.name!r}; "
                f"choose one of {entry.layers}"
            )
        return entry.key, entry.layer_keys[layer]

    def _read_model_array(self, model: str, layer: str) -> np.ndarray:
        model_key, layer_key = self._keys(model, layer)
        file = self.layout.embedding(model_key, layer_key)
        array = read_npy(file, mmap=True)
        n = self.n_stimuli
        if array.ndim != 2 or array.shape[0] != n:
            raise CacheFormatError(
                f"{file} has shape {array.shape}, expected ({n}, d) for {n} stimuli; delete "
                f"{self.path} and rerun precompute"
            )
        return array

    # -- neighbours and alignment -------------------------------------------------------------
    def neighbours(self, model: str, layer: str) -> Any:
        """The :class:`~convergence_core.neighbours.NeighbourIndex` of one model × layer.

        Its prepared features come from the stored embedding and clip threshold; its exact
        neighbour lists (``.lists.indices`` (n, K) int32, ``.lists.values`` (n, K) float64, most
        similar first) are memory-mapped when the run stores them for this layer (else ``lists``
        is None and every table is computed from the features). Kept after the first call.
        """
        from .neighbours import (
            NeighbourIndex,
            NeighbourLists,
            NeighbourRangeError,
            PreparedFeatures,
        )

        key = (model, layer)
        if key not in self._indexes:
            entry = self._model_entry(model)
            model_key, layer_key = self._keys(model, layer)
            threshold = entry.clip_thresholds.get(layer)
            if threshold is None:
                raise CacheFormatError(
                    f"run {self.name!r} records no clip threshold for {model!r} {layer!r}; rerun "
                    "its precompute to repair the run"
                )
            features = PreparedFeatures(self.embeddings[model][layer], threshold)
            lists = None
            if layer in entry.neighbour_layers:
                indices = read_npy(self.layout.neighbour_indices(model_key, layer_key), mmap=True)
                values = read_npy(self.layout.neighbour_values(model_key, layer_key), mmap=True)
                n = self.n_stimuli
                if (
                    indices.ndim != 2
                    or indices.shape[0] != n
                    or values.shape != indices.shape
                    or not np.issubdtype(indices.dtype, np.integer)
                    or values.dtype != np.float64
                ):
                    raise CacheFormatError(
                        f"the neighbour lists of {model!r} {layer!r} in run {self.name!r} have "
                        f"shapes {indices.shape} {indices.dtype} / {values.shape} {values.dtype}, "
                        f"expected (n={n}, K) int32 / float64; rerun its precompute"
                    )
                try:
                    lists = NeighbourLists(indices, values)
                except NeighbourRangeError:  # a rerun skips a step it recorded as done
                    raise CacheFormatError(
                        f"{self.layout.neighbour_indices(model_key, layer_key)} lists stimuli "
                        f"outside 0..{n - 1}: the neighbour lists of {model!r} {layer!r} are "
                        f"damaged or from another run; delete the run folder {self.path} and "
                        "rerun `python -m convergence_core precompute` (the same command) to "
                        "rewrite it"
                    ) from None
            self._indexes[key] = NeighbourIndex(features, lists)
        return self._indexes[key]

    def subset_alignment(
        self,
        pairs: Sequence[tuple[str, str, str, str]],
        subsets: object,
        k: int = 10,
        *,
        metrics: Sequence[str] = ("cknna", "mutual_knn"),
    ) -> Any:
        """Neighbour metrics of many (model, layer, model, layer) pairs on many subsets.

        Args:
            pairs: ``(model_x, layer_x, model_y, layer_y)`` per comparison (e.g.
                ``analyses.Pair``).
            subsets: (B, s) or (s,) stimulus rows (each row distinct; any order).
            k: neighbours per stimulus, k < s.
            metrics: neighbour metrics of the registry (``metrics.metric_names()``).

        Returns:
            ``neighbours.SubsetAlignment(cknna, mutual_knn, values)``, each (len(pairs), B).
        """
        from .neighbours import subset_alignment

        keyed = [((p[0], p[1]), (p[2], p[3])) for p in pairs]
        indexes = {side: self.neighbours(*side) for pair in keyed for side in pair}
        return subset_alignment(indexes, keyed, subsets, k, metrics=metrics)

    def rows_of(self, ids: Iterable[str]) -> np.ndarray:
        """(s,) int64 rows of the stimuli with these ids (``run.stimuli["id"]``), in the given
        order; ValueError naming the ids the run does not have."""
        ids = [str(i) for i in ids]
        position = {stimulus: row for row, stimulus in enumerate(self.stimuli["id"])}
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise ValueError(
                f"{len(unknown)} of {len(ids)} ids are not stimuli of run {self.name!r}, e.g. "
                f"{unknown[:5]}; its ids look like {self.stimuli['id'].head(3).tolist()} "
                "(run.stimuli['id'] lists them)"
            )
        return np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))

    def alignment(
        self,
        model_x: str,
        layer_x: str,
        model_y: str,
        layer_y: str,
        *,
        subset: object = None,
        k: int = 10,
        metric: str = "cknna",
        **options: Any,
    ) -> float:
        """One alignment score of two model layers on a stimulus subset: None (all stimuli),
        stimulus rows (ints), or stimulus ids (strings, as in ``run.stimuli["id"]``).

        Usually a vision and a language model (``run.alignment(vision, layer, language, layer,
        subset=rows, k=10)``), but any two models of the run. Exactly the metric on the subset's
        prepared features at any n: neighbour metrics (``cknna``, ``mutual_knn``, ``cycle_knn``,
        ``lcs_knn``, ``edit_distance_knn``) from the stored neighbour lists, feature metrics
        (``cka``, ``unbiased_cka``, ``svcca``; ``options`` such as ``kernel``, ``cca_dim``) from
        the subset's prepared features. ``metrics.metric_names()`` lists them. The engine is the
        one the dashboard and the report use (``subset_metrics.metric_on_sets``).
        """
        from . import metrics as registry
        from .subset_metrics import metric_on_sets

        if registry.metric(metric).neighbour_metric and options:
            raise ValueError(f"{metric} takes no options here besides k; got {sorted(options)}")
        if subset is None:
            rows = np.arange(self.n_stimuli)
        elif _holds_ids(subset):
            rows = self.rows_of(subset)
        else:
            rows = subset
        x, y = (model_x, layer_x), (model_y, layer_y)
        indexes = {x: self.neighbours(*x), y: self.neighbours(*y)}
        return float(metric_on_sets(indexes, [(x, y)], rows, metric, k=k, options=options)[0, 0])

    def nearest(self, model: str, layer: str, row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` stimuli most similar to ``row`` under one model × layer (itself excluded),
        most similar first: ``(rows (count,), inner products (count,))``, ties to the lower row."""
        return self.neighbours(model, layer).nearest(self._check_row(row), count)

    # -- GPA, dispersion, PCA -----------------------------------------------------------------
    @cached_property
    def gpa(self) -> Any:
        """The ``GPAResult`` of the GPA models' layers: residuals, loss history, each model's map,
        mean and scale. ``aligned`` / ``consensus`` (and ``aligned_rows`` / ``consensus_rows`` for
        a few rows) are computed on demand from the run's embeddings of those layers."""
        from .procrustes import GPAResult

        models, layers, n_iter, converged, gap_estimate = self._gpa_settings()
        maps_there = [self.layout.gpa_model_array("map", i).is_file() for i in range(len(models))]
        if not all(maps_there):
            raise CacheFormatError(
                f"{self.layout.gpa_dir} holds no GPA maps (the run was written before GPA kept "
                "maps instead of the aligned arrays); rerun the precompute command that made it "
                "(finished steps are reused, GPA is recomputed)"
            )
        arrays = {name: read_npy(self.layout.gpa_array(name)) for name in RunLayout.GPA_ARRAYS}
        return GPAResult(
            residuals=arrays["residuals"],
            loss_history=arrays["loss_history"],
            n_iter=n_iter,
            converged=converged,
            models=models,
            layers=layers,
            maps=[read_npy(self.layout.gpa_model_array("map", i)) for i in range(len(models))],
            means=[read_npy(self.layout.gpa_model_array("mean", i)) for i in range(len(models))],
            scales=arrays["scales"],
            gap_estimate=gap_estimate,
            inputs=[self.embeddings[m][la] for m, la in zip(models, layers, strict=True)],
        )

    def _gpa_settings(self) -> tuple[tuple[str, ...], tuple[str, ...], int, bool, float]:
        """``(models, layers, n_iter, converged, gap_estimate)`` from gpa/gpa.json, checked:
        CacheFormatError naming the field and the fix when the file was altered or damaged."""
        info = read_json(self.layout.gpa_json)

        def shown(value: Any) -> str:  # an altered file's value, within a line
            text = repr(value)
            return text if len(text) <= 60 else text[:59] + "…"

        def names(field: str) -> tuple[str, ...]:
            value = info[field]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{field!r} is {shown(value)}, not a list of names")
            return tuple(value)

        try:
            if not isinstance(info, dict):
                raise ValueError(f"it holds {type(info).__name__}, not an object")
            models, layers = names("models"), names("layers")
            if len(models) != len(layers):
                raise ValueError(f"{len(models)} models but {len(layers)} layers")
            strays = [f"{model}:{layer}" for model, layer in zip(models, layers, strict=True)
                      if layer not in getattr(self.manifest.models.get(model), "layers", ())]
            if strays:
                raise ValueError(f"it names models or layers the run does not hold: {strays}")
            n_iter, converged = info["n_iter"], info["converged"]
            if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 0:
                raise ValueError(f"'n_iter' is {shown(n_iter)}, not a count")
            if not isinstance(converged, bool):
                raise ValueError(f"'converged' is {shown(converged)}, not true or false")
            gap_estimate = float(info.get("gap_estimate", float("nan")))
        except KeyError as exc:
            problem = f"has no {exc.args[0]!r}"
        except (TypeError, ValueError) as exc:
            problem = f"is malformed: {exc}"
        else:
            return models, layers, n_iter, converged, gap_estimate
        raise CacheFormatError(
            f"{self.layout.gpa_json} {problem}; delete the run's GPA folder {self.layout.gpa_dir} "
            "and rerun the precompute command that made the run (finished steps are reused, GPA "
            "is recomputed)"
        )

    @cached_property
    def gpa_stop(self) -> Any:
        """How the run's GPA stopped: None at its optimum (the loss rule to its tol; every run
        precomputed with the default ``gpa_stop``), else a ``gpa_stability.UncertaintyStop``
        (stopped once its residuals moved less than their spread over random starts)."""
        from .gpa_stability import UncertaintyStop

        self._gpa_settings()  # CacheFormatError when gpa.json is damaged (not an object, ...)
        stop = read_json(self.layout.gpa_json).get("stop")
        if stop is None:
            return None
        try:
            return UncertaintyStop(
                fraction=float(stop["fraction"]),
                tol=float(stop["tol"]),
                stages=int(stop["stages"]),
                # None: every start ended at the same residuals (no spread to compare with)
                step_over_spread=(
                    None if stop["step_over_spread"] is None else float(stop["step_over_spread"])
                ),
                met=bool(stop["met"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(
                f"{self.layout.gpa_json} has a malformed 'stop' ({exc}); delete the run's gpa "
                "folder and rerun precompute"
            ) from None

    @cached_property
    def gpa_stability(self) -> Any:
        """The stored GPA stability diagnostic (``gpa_stability.StoredStability``: how far each
        stimulus's residuals and dispersion rank move when GPA starts elsewhere), or None when the
        run has none (precomputed with ``gpa_starts=0`` or before the step existed)."""
        if not self.layout.gpa_stability_json.is_file():
            return None
        from .gpa_stability import StoredStability

        info = read_json(self.layout.gpa_stability_json)
        table = read_parquet(self.layout.gpa_stability_table)
        expected = {"stimulus", "id", "model", "metric", "value"}
        try:
            record = StoredStability(
                n_starts=int(info["n_starts"]),
                seed=int(info["seed"]),
                tol=float(info["tol"]),
                summary=dict(info["summary"]),
                table=table,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(
                f"{self.layout.gpa_stability_json} is malformed ({exc}); delete it and rerun "
                "precompute"
            ) from None
        if not expected <= set(table.columns) or len(table) != self.n_stimuli * (
            2 * len(self.gpa.models) + 5
        ):
            raise CacheFormatError(
                f"{self.layout.gpa_stability_table} does not match the run ({len(table)} rows, "
                f"columns {sorted(table.columns)}); delete it and rerun precompute"
            )
        return record

    @cached_property
    def dispersion(self) -> pd.DataFrame:
        """Per-stimulus dispersion, run order: ``id``, ``mean``, ``pc1``, ``rank_mean``, ``rank_pc1``.

        Ranks are 0-based, 0 = lowest dispersion (most agreement among the vision models).
        """
        frame = read_parquet(self.layout.dispersion)
        wanted = {"id", *SCORES, *map(rank_column, SCORES)}
        missing = wanted - set(frame.columns)
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
        root = self.manifest.dataset.images_root
        return Path(root) if root else None

    @cached_property
    def has_thumbnails(self) -> bool:
        """Whether the run wrote gallery thumbnails (not for a run without images, or one
        precomputed with ``thumbnails=False``)."""
        return self.layout.thumbnails_dir.is_dir()

    @cached_property
    def has_captions(self) -> bool:
        """Whether any stimulus has a caption (a run made from feature files alone has none)."""
        return "captions" in self.stimuli and any(len(c) for c in self.stimuli["captions"])

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
            _caption_cell(value, row, frame, layout)
            for row, value in enumerate(frame["captions"])
        ]
    return frame


def _caption_cell(value: object, row: int, frame: pd.DataFrame, layout: RunLayout) -> list[str]:
    """A ``captions`` cell of stimuli.parquet as a list of str: a list (an array, as parquet
    reads it), one string (as ``normalise_stimuli`` takes it) or empty; CacheFormatError naming
    the file, row and fix for anything else (a table this program did not write)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(c) for c in value]
    if pd.api.types.is_scalar(value) and pd.isna(value):  # a missing cell (NaN, NA)
        return []

    def shown(cell: object) -> str:  # an altered file's value, within a line
        text = repr(cell)
        return text if len(text) <= 60 else text[:59] + "…"

    if isinstance(value, np.generic):  # a NumPy scalar, named as the Python value it holds
        value = value.item()
    raise CacheFormatError(
        f"{layout.stimuli}: column 'captions' holds {type(value).__name__} {shown(value)} at row "
        f"{row} (id {shown(frame['id'].iloc[row])}), not a list of captions; delete the run and "
        "rerun precompute"
    )


def _read_manifest(layout: RunLayout) -> Manifest:
    return parse_manifest(read_json(layout.manifest), str(layout.manifest))


def _holds_ids(subset: object) -> bool:
    """Whether a subset is given as stimulus ids (strings) rather than rows."""
    if isinstance(subset, np.ndarray):
        return subset.dtype.kind in "US" or (
            subset.dtype.kind == "O" and all(isinstance(v, str) for v in subset.ravel())
        )
    if isinstance(subset, (list, tuple, pd.Series, pd.Index)):
        return len(subset) > 0 and all(isinstance(v, str) for v in subset)
    return False


def load_run(path: str | os.PathLike[str]) -> Run:
    """Open the run folder ``path`` (or a run name under ``settings.runs_root()``).

    Raises:
        FileNotFoundError: no run at ``path``.
        CacheFormatError (a ValueError): the manifest is missing, damaged (``ManifestError``
            naming the field), of an older format (rerun its precompute to upgrade it), or the run
            is incomplete: being written by a live precompute (it holds the run's lock,
            ``cache.live_writer``: wait for it), else an interrupted one (rerun it to finish).
    """
    folder = Path(path)
    if not (folder / "manifest.json").is_file() and not folder.is_absolute():
        # a run name: its folder under the cache, named as precompute names it (a name such as
        # "my run" or "lab/v1" is stored as "my_run-<hash>", cache.model_key); a folder of the
        # same name here that is not a run (no manifest) does not hide it
        candidate = settings.runs_root() / model_key(os.fspath(path))
        if candidate.is_dir():
            folder = candidate
    if not folder.is_dir():
        known = [info.name for info in list_runs() if info.damaged is None]
        root = settings.cache_root()
        absent = "" if root.is_dir() else f"; that cache folder {root} does not exist"
        raise FileNotFoundError(
            f"no run folder at {folder} and no run of that name in {settings.runs_root()}"
            f"{absent} (a cache elsewhere: give its folder with --cache, or set "
            "$CONVERGENCE_CACHE); precompute one with `python -m convergence_core precompute` "
            f"or pick a cached run: {known}"
        )
    layout = RunLayout(folder)
    if not layout.manifest.is_file():
        raise CacheFormatError(
            f"{folder} has no manifest.json, so it is not a run folder; point at a folder made by "
            "`python -m convergence_core precompute`"
        )
    manifest = _read_manifest(layout)
    if manifest.needs_upgrade:
        raise CacheFormatError(
            f"run {folder.name!r} was written by an older version (manifest format "
            f"{manifest.format}: dense Gram matrices); rerun the precompute that made it (e.g. "
            "`python -m convergence_core precompute --preset demo` for the demo) to upgrade it in "
            "place: its embeddings are kept and exact neighbour lists replace the Gram matrices"
        )
    if not manifest.complete:
        done = sorted(manifest.steps)
        writer = live_writer(folder)  # as `runs` tells "being written (pid N)" from "incomplete"
        if writer is not None:
            raise CacheFormatError(
                f"run {folder.name!r} is being written by process {writer} (a precompute; steps "
                f"finished so far: {done}); wait for it to finish (`python -m convergence_core "
                "runs` then lists it as complete), then try again"
            )
        raise CacheFormatError(
            f"run {folder.name!r} is incomplete (steps finished: {done}): its precompute was "
            "interrupted or stopped on an error; rerun the same `python -m convergence_core "
            "precompute` command to resume it (after fixing what the error named, if it stopped "
            "on one)"
        )
    return Run(folder, manifest)


@dataclass(frozen=True)
class RunSummary:
    """What :func:`list_runs` (``runs``, the dashboard's run picker) shows of a cached run, read
    from its manifest. A damaged run's summary is :meth:`unreadable` (not complete, nothing known).

    Attributes:
        complete: every step finished and the format is current (the run can be opened).
        needs_upgrade: written by an older version; rerunning its precompute upgrades it.
        dataset, n_stimuli: the data set's name and the run's stimuli (None when unknown).
        vision_models, language_models: model names by modality; other_models:
            ``{model: modality}`` of the rest (brain recordings, ...); gpa_models: GPA's models.
        created, updated: ISO 8601 UTC ("" when unknown); steps: the finished steps, sorted.
    """

    complete: bool
    needs_upgrade: bool
    dataset: str | None = None
    n_stimuli: int | None = None
    vision_models: tuple[str, ...] = ()
    language_models: tuple[str, ...] = ()
    other_models: Mapping[str, str] = field(default_factory=dict)
    gpa_models: tuple[str, ...] = ()
    created: str = ""
    updated: str = ""
    steps: tuple[str, ...] = ()

    @classmethod
    def of(cls, manifest: Manifest) -> RunSummary:
        shown = (*manifest.vision_models, *manifest.language_models)
        return cls(
            complete=bool(manifest.complete) and not manifest.needs_upgrade,
            needs_upgrade=manifest.needs_upgrade,
            dataset=manifest.dataset.name,
            n_stimuli=manifest.n_stimuli,
            vision_models=tuple(manifest.vision_models),
            language_models=tuple(manifest.language_models),
            other_models={m: manifest.models[m].modality for m in manifest.model_names
                          if m not in shown},
            gpa_models=tuple(manifest.gpa.models),
            created=manifest.created or "",
            updated=manifest.updated or "",
            steps=tuple(sorted(manifest.steps)),
        )

    @classmethod
    def unreadable(cls) -> RunSummary:
        """The summary of a run whose manifest cannot be read."""
        return cls(complete=False, needs_upgrade=False)

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (lists, a dict), for ``runs --json``."""
        return {
            key: list(value) if isinstance(value, tuple) else
            dict(value) if isinstance(value, Mapping) else value
            for key, value in asdict(self).items()
        }


class RunInfo(NamedTuple):
    """One cached run as listed by :func:`list_runs`.

    ``damaged`` is None for a readable run, else the reason it cannot be opened (its manifest
    does not follow the schema); ``summary`` is then :meth:`RunSummary.unreadable`.
    """

    name: str
    path: Path
    summary: RunSummary
    damaged: str | None = None


def list_runs(root: str | os.PathLike[str] | None = None) -> list[RunInfo]:
    """Cached runs under ``root`` (default ``settings.runs_root()``), most recently updated first.

    Each entry is ``RunInfo(name, path, summary, damaged)``, ``summary`` a :class:`RunSummary`
    (complete, models by modality, GPA's models, created / updated, steps). A folder whose
    manifest cannot be read
    or does not follow the schema is listed last, with ``damaged`` giving the reason; folders
    without a manifest are not runs and are skipped, and so are hidden ones (``.<run>.reset``,
    a run being deleted by a reset).
    """
    folder = Path(root) if root is not None else settings.runs_root()
    if not folder.is_dir():
        return []
    runs: list[RunInfo] = []
    damaged: list[RunInfo] = []
    for child in sorted(c for c in folder.iterdir() if not c.name.startswith(".")):
        try:
            layout = RunLayout(child)
            if not layout.manifest.is_file():
                continue
            manifest = _read_manifest(layout)
        except (CacheFormatError, OSError) as exc:
            damaged.append(RunInfo(child.name, child, RunSummary.unreadable(), str(exc)))
            continue
        runs.append(RunInfo(child.name, child, RunSummary.of(manifest)))
    runs.sort(key=lambda info: (info.summary.updated, info.name), reverse=True)
    return runs + damaged
