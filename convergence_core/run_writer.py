"""Write the parts of a run folder, and whole runs from in-memory embeddings.

A run folder (layout in docs/ARCHITECTURE.md and :class:`convergence_core.cache.RunLayout`) is
written step by step; each finished step is recorded in ``manifest.json`` under ``steps`` with the
fingerprint of its inputs (:class:`RunManifest`), and the manifest is rewritten atomically after
every step. The step writers here (embeddings + clip thresholds, neighbour lists, GPA,
dispersion + PCA, thumbnails) are called by the one pipeline in :mod:`convergence_core.precompute`
(``precompute`` from encoders or files, ``write_run_from_embeddings`` from arrays).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cache import (
    CacheFormatError,
    RunLayout,
    colliding_keys,
    model_key,
    read_json,
    read_npy,
    write_json,
    write_npy,
    write_parquet,
)
from .memory_maps import release
from .manifest import MANIFEST_FORMAT, Manifest, ModelEntry, StepRecord

__all__ = [
    "NEIGHBOURS_ALGORITHM",
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
    "remove_new_run_folder",
    "remove_reset_leftover",
    "stored_file_problem",
    "write_dispersion",
    "write_gpa",
    "write_gpa_solution",
    "write_model_arrays",
    "write_neighbour_lists",
    "write_properties",
    "write_thumbnails",
]

#: Longest side of gallery thumbnails, in pixels.
THUMBNAIL_SIZE = 256
#: Names the neighbour-list construction (part of the fingerprint of the stored lists).
NEIGHBOURS_ALGORITHM = "exact-top-k/float32-screen+float64-refine/1"
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
    """The manifest being written (a typed :class:`~convergence_core.manifest.Manifest`);
    ``save()`` rewrites manifest.json atomically."""

    def __init__(self, layout: RunLayout, manifest: Manifest) -> None:
        self.layout = layout
        self.data = manifest

    def save(self) -> None:
        self.data.updated = _now()
        write_json(self.layout.manifest, self.data.to_dict())

    def step_done(self, step: str, inputs: str) -> bool:
        record = self.data.steps.get(step)
        return record is not None and record.inputs == inputs

    def finish_step(self, step: str, inputs: str, **details: Any) -> None:
        self.data.steps[step] = StepRecord(inputs=inputs, done=_now(), details=details)
        self.save()

    def forget_step(self, step: str) -> None:
        if self.data.steps.pop(step, None) is not None:
            self.save()


def empty_manifest(name: str) -> Manifest:
    now = _now()
    return Manifest(
        name=name, created=now, updated=now, versions=library_versions(), format=MANIFEST_FORMAT
    )


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


def check_embedding_array(array: np.ndarray, model: str, layer: str, n: int) -> np.ndarray:
    """``array`` as (n, d) float32 (no copy when it already is: a float32 memory map stays one),
    checked in row blocks; ValueError naming the model, layer and fix otherwise."""
    where = f"embeddings[{model!r}][{layer!r}]"
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{where} must be a 2-D (n_stimuli, dim) array, got shape {array.shape}")
    if array.shape[0] != n:
        raise ValueError(
            f"{where} has {array.shape[0]} rows but there are {n} stimuli; every model must embed "
            "every stimulus, in stimulus-table order"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{where} must be real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        array = np.asarray(array, dtype=np.float32)
    block = max(1, 16_000_000 // array.shape[1])
    bad = np.concatenate(
        [~np.isfinite(array[i : i + block]).all(axis=1) for i in range(0, n, block)]
    )
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{where} has NaN/inf (or values beyond float32 range) in {rows.size} row(s), first "
            f"rows {rows[:5].tolist()}; fix the extraction or drop those stimuli"
        )
    zero = np.concatenate([~array[i : i + block].any(axis=1) for i in range(0, n, block)])
    if zero.any():  # no direction: it cannot be normalised, nor have neighbours
        rows = np.flatnonzero(zero)
        raise ValueError(
            f"{where} has {rows.size} row(s) that are all zeros, first rows "
            f"{rows[:5].tolist()}; such a stimulus has no direction to compare (features that "
            "were never written?): fix the extraction or drop those stimuli"
        )
    if n > 1 and _one_direction(array, block):
        raise ValueError(
            f"{where}: every one of its {n} rows points the same way (the features do not vary "
            "over the stimuli once each row is scaled to unit length, as the metrics do), so its "
            "neighbours are ties broken at random and its alignment with any model is noise that "
            "can look like an effect; fix the extraction, or leave that layer (or model) out"
        )
    return array


#: Largest difference between unit-length rows that still counts as one direction (float32 rows
#: of one direction differ by ~1e-7 once scaled)
SAME_DIRECTION_TOLERANCE = 1e-6


def _one_direction(array: np.ndarray, block: int) -> bool:
    """Whether every row of the (n, d) float32 ``array`` (no zero row) has the first row's
    direction within :data:`SAME_DIRECTION_TOLERANCE`, read in row blocks of ``block``."""
    first = np.asarray(array[0], dtype=np.float64)
    first /= np.linalg.norm(first)
    for start in range(0, array.shape[0], block):
        rows = np.asarray(array[start : start + block], dtype=np.float64)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        if np.abs(rows - first).max() > SAME_DIRECTION_TOLERANCE:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Steps shared by write_run_from_embeddings and the pipeline (precompute.py)
# ---------------------------------------------------------------------------------------------
def clip_thresholds(key: str, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``{layer: clip threshold}`` of one model's embeddings (as stored: float32), or a
    ValueError naming the layer whose features are mostly zeros (the clipping would erase them).
    Computed before anything of the model is written or forgotten."""
    from .neighbours import clip_threshold

    thresholds: dict[str, float] = {}
    for layer, array in arrays.items():
        try:
            thresholds[layer] = clip_threshold(np.ascontiguousarray(array, dtype=np.float32))
        except ValueError:  # features that are mostly zeros: say whose, and what to do
            raise ValueError(
                f"model {key!r}, layer {layer!r}: the features are mostly zeros (in the average "
                "row at least 95% of the values are 0), so the paper's clipping at the "
                "0.95-quantile of |x| would erase them; if whole columns are 0 (voxels outside a "
                "mask, unused units), remove them from the features"
            ) from None
    return thresholds


def write_model_arrays(
    layout: RunLayout,
    key: str,
    layer_keys: Mapping[str, str],
    arrays: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float] | None = None,
) -> tuple[dict[str, str], dict[str, float]]:
    """Write one model's embeddings (float32); return ``({layer: sha256}, {layer: clip threshold})``.

    The clip threshold (``neighbours.clip_threshold``) is all that ``prepare_features`` needs
    besides the embedding itself, so the prepared features are never stored twice. ``thresholds``:
    :func:`clip_thresholds` of ``arrays`` when the caller checked them already.
    """
    collision = colliding_keys(layer_keys)  # before anything of the model is touched
    if collision is not None:
        other, layer, where = collision
        raise ValueError(
            f"model {key!r}: layers {other!r} and {layer!r} would be one file in the run{where}; "
            "rename one of them"
        )
    # every layer usable before the model's files change
    thresholds = dict(thresholds) if thresholds is not None else clip_thresholds(key, arrays)
    layout.remove_tree(layout.embeddings_dir(key))
    layout.remove_tree(layout.neighbours_dir(key))
    hashes: dict[str, str] = {}
    for layer, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        write_npy(layout.embedding(key, layer_keys[layer]), array)
        hashes[layer] = array_fingerprint(array)
        release(array)  # a memory-mapped input was read whole: its pages need not stay resident
    return hashes, thresholds


def write_neighbour_lists(
    layout: RunLayout,
    entry: ModelEntry,
    layer: str,
    *,
    list_size: int,
    device: str | None = None,
    progress: Any = None,
) -> int:
    """Build and write the exact neighbour lists of one stored layer; return K.

    Reads the layer's embedding (memory-mapped) and clip threshold from ``entry``; writes
    ``neighbours/<model>/<layer>.indices.npy`` (int32) and ``.values.npy`` (float64).
    """
    from .neighbours import PreparedFeatures, build_neighbour_lists

    layer_key = entry.layer_keys[layer]
    raw = read_npy(layout.embedding(entry.key, layer_key), mmap=True)
    features = PreparedFeatures(raw, entry.clip_thresholds[layer])
    lists = build_neighbour_lists(features, list_size, device=device, progress=progress)
    write_npy(layout.neighbour_values(entry.key, layer_key), lists.values)
    write_npy(layout.neighbour_indices(entry.key, layer_key), lists.indices)
    return lists.k_max


def model_entry(
    name: str,
    modality: str,
    arrays: Mapping[str, np.ndarray],
    default_layer: str,
    hashes: Mapping[str, str],
    thresholds: Mapping[str, float],
    **extra: Any,
) -> ModelEntry:
    layers = list(arrays)
    weights_id = extra.pop("weights_id", None)
    source = extra.pop("source", None)
    return ModelEntry(
        key=model_key(name),
        modality=modality,
        layers=layers,
        layer_keys={layer: model_key(layer) for layer in layers},
        default_layer=default_layer,
        dims={layer: int(arrays[layer].shape[1]) for layer in layers},
        sha256=dict(hashes),
        clip_thresholds=dict(thresholds),
        weights_id=weights_id,
        source=source,
        details=extra,
    )


def write_gpa(
    layout: RunLayout,
    arrays: Sequence[np.ndarray],
    models: Sequence[str],
    layers: Sequence[str],
    *,
    tol: float,
    max_iter: int,
    progress: Callable[[int], None] | None = None,
    keep_fit: bool = False,
) -> Any:
    """Run GPA on ``arrays`` (read in row blocks; float32 memory maps are not copied) and write
    gpa/: residuals, loss history, scales and each model's map and mean (O(M·d²); the aligned
    configurations are reproduced from the run's embeddings on demand). Return the GPAResult.
    ``progress``: called with the iterations done after each (``generalized_procrustes``);
    ``keep_fit``: the result keeps its fit, for :func:`write_gpa_stability` (``reference``)."""
    from .procrustes import generalized_procrustes

    result = generalized_procrustes(
        list(arrays),
        tol=tol,
        max_iter=max_iter,
        models=tuple(models),
        layers=tuple(layers),
        progress=progress,
        keep_fit=keep_fit,
    )
    _write_gpa_result(layout, result, models, layers, tol=tol, max_iter=max_iter)
    return result


def _write_gpa_result(
    layout: RunLayout,
    result: Any,
    models: Sequence[str],
    layers: Sequence[str],
    *,
    tol: float,
    max_iter: int,
    stop: Any = None,
    solution: Mapping[str, Any] | None = None,
) -> None:
    """gpa/ of a GPAResult; ``stop``: the ``gpa_stability.UncertaintyStop`` of a GPA stopped at
    its residuals' uncertainty (recorded in gpa.json as ``stop``; absent: the optimum's rule);
    ``solution``: :func:`adopted_solution` of a result adopted from a random start (recorded
    in gpa.json as ``solution``; absent: GPA from Gower's start). Each file is written whole
    (temp + rename), gpa.json last; the caller's manifest says whether the set is finished."""
    from .procrustes import GPA_ALGORITHM

    write_npy(layout.gpa_array("residuals"), np.asarray(result.residuals, dtype=np.float64))
    write_npy(layout.gpa_array("loss_history"), np.asarray(result.loss_history, dtype=np.float64))
    write_npy(layout.gpa_array("scales"), np.asarray(result.scales, dtype=np.float64))
    for i, (rotation, mean) in enumerate(zip(result.maps, result.means, strict=True)):
        write_npy(layout.gpa_model_array("map", i), np.asarray(rotation, dtype=np.float64))
        write_npy(layout.gpa_model_array("mean", i), np.asarray(mean, dtype=np.float64))
    # a model dropped since the last GPA: its map and mean go (gpa.json never names them again)
    extra = len(result.maps)
    while layout.gpa_model_array("map", extra).is_file() or layout.gpa_model_array(
        "mean", extra
    ).is_file():
        for name in ("map", "mean"):
            layout.gpa_model_array(name, extra).unlink(missing_ok=True)
        extra += 1
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
            "gap_estimate": float(result.gap_estimate),
            **({} if stop is None else {"stop": dataclasses.asdict(stop)}),
            **({} if solution is None else {"solution": dict(solution)}),
        },
    )


def adopted_solution(stability: Any) -> dict[str, Any] | None:
    """The record of the solution a ``GPAStability`` adopted as GPA's answer: None for Gower's
    start (GPA's own result), else ``start`` (random start s of the diagnostic), ``seed`` (of
    the random starts: with the GPA inputs they name the solution), ``loss``,
    ``reference_loss`` (Gower's start's), ``loss_gap`` (their difference, above ``margin``,
    the diagnostic's ``optimum_margin``) and ``max_relative_dispersion_change``."""
    if stability.adopted == 0:
        return None
    summary = stability.summary()
    return {
        "start": int(stability.adopted),
        "seed": int(stability.seed),
        "loss": float(stability.losses[stability.adopted]),
        "reference_loss": float(stability.losses[0]),
        "loss_gap": float(stability.adopted_loss_gap),
        "margin": float(stability.optimum_margin),
        "max_relative_dispersion_change": summary["adopted_max_relative_dispersion_change"],
    }


def write_gpa_solution(
    layout: RunLayout,
    result: Any,
    models: Sequence[str],
    layers: Sequence[str],
    *,
    tol: float,
    max_iter: int,
    solution: Mapping[str, Any] | None,
) -> None:
    """Replace gpa/ with another solution of the same GPA (the one a stability diagnostic
    adopted, ``gpa_stability.gpa_over_starts``): residuals, loss history, maps, means, scales
    and gpa.json, which records ``solution`` (:func:`adopted_solution`; None: Gower's start).
    O(n·M + M·d·p) written; the files are written one by one, so the caller forgets the GPA
    step in the manifest first and finishes it after (an interruption leaves it to redo)."""
    _write_gpa_result(layout, result, models, layers, tol=tol, max_iter=max_iter,
                      solution=solution)


class StabilitySolutions:
    """The stability diagnostic's finished GPA solutions in a run folder
    (``gpa/stability_solutions/``; ``gpa_stability.SolutionStore``), so that an interrupted
    precompute resumes after the last finished one instead of solving every start again.

    Per solution ``index``: ``<index>_map_<i>.npy`` (r_i, p) per model, for the reference (0) also
    ``<index>_previous_<i>.npy`` (its last step is part of the diagnostic), ``<index>_loss_history
    .npy`` and, written last, ``<index>_solution.json`` with ``key`` (the GPA inputs and seed:
    solutions of other inputs are never taken). A file that is missing, unreadable or of another
    shape makes that solution computed again.
    """

    def __init__(self, layout: RunLayout, key: str) -> None:
        self.layout = layout
        self.key = key

    def _file(self, index: int, name: str) -> Path:
        return self.layout.gpa_stability_solution(index, name)

    def load(self, index: int, shapes: Sequence[tuple[int, int]]) -> Any:
        from .procrustes import GPASolution

        try:
            record = read_json(self._file(index, "solution.json"))
            if not isinstance(record, dict) or record.get("key") != self.key:
                return None
            maps = [read_npy(self._file(index, f"map_{i}.npy")) for i in range(len(shapes))]
            previous = maps if index > 0 else [
                read_npy(self._file(index, f"previous_{i}.npy")) for i in range(len(shapes))
            ]
            history = read_npy(self._file(index, "loss_history.npy"))
            if [m.shape for m in [*maps, *previous]] != [*shapes, *shapes] or history.ndim != 1:
                return None
            return GPASolution(
                maps=[np.asarray(m, dtype=np.float64) for m in maps],
                previous_maps=[np.asarray(m, dtype=np.float64) for m in previous],
                loss_history=np.asarray(history, dtype=np.float64),
                converged=bool(record["converged"]),
                gap_estimate=float.fromhex(record["gap_estimate"]),
                sweeps=int(record["sweeps"]),
                loss_evaluations=int(record["loss_evaluations"]),
                restarts=int(record["restarts"]),
            )
        except (CacheFormatError, KeyError, TypeError, ValueError):
            return None

    def save(self, index: int, solution: Any) -> None:
        record = self._file(index, "solution.json")
        record.parent.mkdir(parents=True, exist_ok=True)
        # the record of a solution this one replaces goes first: an interruption before the new
        # record is written must not pair the old key with the new maps
        record.unlink(missing_ok=True)
        for i, t in enumerate(solution.maps):
            write_npy(self._file(index, f"map_{i}.npy"), t)
        if index == 0:
            for i, t in enumerate(solution.previous_maps):
                write_npy(self._file(index, f"previous_{i}.npy"), t)
        write_npy(self._file(index, "loss_history.npy"), solution.loss_history)
        write_json(
            self._file(index, "solution.json"),
            {
                "key": self.key,
                "converged": bool(solution.converged),
                "gap_estimate": float(solution.gap_estimate).hex(),  # exact, inf and nan too
                "sweeps": int(solution.sweeps),
                "loss_evaluations": int(solution.loss_evaluations),
                "restarts": int(solution.restarts),
            },
        )

    def kept(self) -> int:
        """How many solutions of this key are kept (a resumed step says so as it starts)."""
        folder = self.layout.gpa_stability_solutions_dir
        if not folder.is_dir():
            return 0
        count = 0
        for path in folder.glob("*_solution.json"):
            try:
                record = read_json(self.layout.inside(path))
            except CacheFormatError:
                continue
            count += isinstance(record, dict) and record.get("key") == self.key
        return count

    def remove(self) -> None:
        """Delete the folder (CacheFormatError, deleting nothing, where it leads out of the run)."""
        self.layout.remove_tree(self.layout.gpa_stability_solutions_dir)


def write_gpa_stability(
    layout: RunLayout,
    arrays: Sequence[np.ndarray],
    models: Sequence[str],
    layers: Sequence[str],
    ids: Sequence[str],
    *,
    n_starts: int,
    seed: int,
    tol: float,
    max_iter: int,
    progress: Callable[[int, int], None] | None = None,
    reference: Any = None,
    store: StabilitySolutions | None = None,
) -> tuple[Any, Any]:
    """Run the GPA stability diagnostic (``gpa_over_starts``: GPA from ``n_starts`` random starts
    on the GPA inputs, same stopping rule) and write gpa/stability.parquet and .json; return
    ``(GPAResult of the adopted solution, GPAStability)`` (gpa/ itself is the caller's to
    replace, :func:`write_gpa_solution`). O(n · M) storage; cost: one more pass over the inputs
    for every solution's residuals plus one GPA solve on the cross-products per start
    (independent of n). ``progress``: called with (solutions done, solutions) after each;
    ``reference``: GPA's result of these arrays with its kept fit (``write_gpa(keep_fit=True)``),
    whose solution is then not computed again; ``store``: keeps each finished solution (resume)."""
    from .gpa_stability import gpa_over_starts

    result, stability = gpa_over_starts(
        list(arrays), n_starts=n_starts, seed=seed, tol=tol, max_iter=max_iter, models=models,
        layers=layers, progress=progress, reference=reference, store=store,
    )
    _write_stability_result(layout, stability, ids, n_starts=n_starts, seed=seed, tol=tol)
    return result, stability


#: the summary entries the stability diagnostic gained when runs began to adopt its
#: lowest-loss solution, as they read where Gower's start was adopted
_ADOPTION_SUMMARY = {
    "adopted_solution": 0.0,
    "adopted_loss_gap": 0.0,
    "adopted_max_relative_dispersion_change": 0.0,
}


def stability_record_state(layout: RunLayout) -> str:
    """How gpa/stability.json stands against the rule that GPA's answer is its lowest-loss
    solution: ``"current"`` (it records the adopted solution), ``"upgradable"`` (written before
    that rule, with Gower's start at the lowest minimum: the rule adopts Gower's start, so only
    the record's entries are missing, :func:`upgrade_stability_record`), ``"outdated"``
    (written before it, with Gower's start above another solution's minimum, or unreadable:
    the diagnostic must be computed again) or ``"absent"``."""
    if not layout.gpa_stability_json.is_file():
        return "absent"
    try:
        summary = read_json(layout.gpa_stability_json)["summary"]
        if "adopted_solution" in summary:
            return "current"
        return "upgradable" if summary["reference_at_best_optimum"] == 1 else "outdated"
    except (CacheFormatError, KeyError, TypeError):
        return "outdated"


def upgrade_stability_record(layout: RunLayout) -> None:
    """Add the adoption entries (Gower's start adopted) to the summary of a stability record
    whose state is ``"upgradable"`` (:func:`stability_record_state`); one atomic rewrite. What
    the diagnostic would compute again is the same table and summary, so nothing else
    changes."""
    record = read_json(layout.gpa_stability_json)
    record["summary"] = {**record["summary"], **_ADOPTION_SUMMARY}
    write_json(layout.gpa_stability_json, record)


def _write_stability_result(
    layout: RunLayout, result: Any, ids: Sequence[str], *, n_starts: int, seed: int, tol: float
) -> None:
    """gpa/stability.parquet and .json of a ``GPAStability``."""
    write_parquet(layout.gpa_stability_table, result.to_frame(ids=[str(x) for x in ids]))
    summary = {
        name: None if np.isnan(value) else value for name, value in result.summary().items()
    }
    write_json(
        layout.gpa_stability_json,
        {"n_starts": int(n_starts), "seed": int(seed), "tol": float(tol), "summary": summary},
    )


def write_gpa_to_uncertainty(
    layout: RunLayout,
    arrays: Sequence[np.ndarray],
    models: Sequence[str],
    layers: Sequence[str],
    ids: Sequence[str],
    *,
    n_starts: int,
    seed: int,
    tol: float,
    max_iter: int,
    progress: Callable[[float, int, int], None] | None = None,
) -> tuple[Any, Any, Any]:
    """GPA stopped when its residuals move less than their uncertainty, with its stability
    diagnostic (``gpa_stability.gpa_to_uncertainty``: the reference and ``n_starts`` random
    starts iterated together in stages of looser to tighter tol, down to ``tol``): writes the
    diagnostic first (gpa/stability.*), then gpa/ from the adopted solution (its gpa.json
    records the stop, and ``solution`` when a random start was adopted); returns
    (GPAResult, GPAStability, UncertaintyStop)."""
    from .gpa_stability import gpa_to_uncertainty

    result, stability, stop = gpa_to_uncertainty(
        list(arrays), n_starts=n_starts, seed=seed, tol=tol, max_iter=max_iter, models=models,
        layers=layers, progress=progress,
    )
    _write_stability_result(layout, stability, ids, n_starts=n_starts, seed=seed, tol=stop.tol)
    _write_gpa_result(layout, result, models, layers, tol=tol, max_iter=max_iter, stop=stop,
                      solution=adopted_solution(stability))
    return result, stability, stop


def write_dispersion(layout: RunLayout, ids: Sequence[str], residuals: np.ndarray) -> None:
    """Write dispersion.parquet and pca/ from the (m, M) residual matrix."""
    from .dispersion import SCORES, dispersion_scores, rank_column, residual_pca
    from .stats import ordinal_ranks  # 0 = lowest score; ties broken by stimulus order

    scores = {
        score: np.asarray(dispersion_scores(residuals, method=score), dtype=np.float64)
        for score in SCORES
    }
    ranks = {rank_column(score): ordinal_ranks(values) for score, values in scores.items()}
    frame = pd.DataFrame({"id": list(ids), **scores, **ranks})
    write_parquet(layout.dispersion, frame)
    pca = residual_pca(residuals)
    for name in RunLayout.PCA_ARRAYS:
        write_npy(layout.pca_array(name), np.asarray(getattr(pca, name), dtype=np.float64))


def write_thumbnails(
    layout: RunLayout,
    stimuli: pd.DataFrame,
    images_root: Path,
    *,
    progress: Any = None,
    rows: Sequence[int] | None = None,
) -> None:
    """One JPEG per stimulus row (longest side :data:`THUMBNAIL_SIZE` px) under thumbnails/
    (``rows``: only those rows, e.g. the thumbnails a finished run lost).

    Every image must stay inside ``images_root`` once symbolic links are resolved and be within
    ``settings.max_image_pixels()`` (``images.make_thumbnail``); ValueError otherwise.
    """
    from .images import make_thumbnail

    root = Path(images_root)
    images = stimuli["image"].tolist()
    for done, row in enumerate(range(len(images)) if rows is None else rows, start=1):
        # make_thumbnail resolves symbolic links and refuses a path outside the root (ValueError)
        make_thumbnail(root / images[row], layout.thumbnail(row), THUMBNAIL_SIZE, root=root)
        if progress is not None:
            progress(done)


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
    deleted. The old run is first moved aside in one step (to ``.<run>.reset`` beside it, which
    is not a run: its manifest goes first) and then deleted, so an interrupted reset leaves
    either the whole old run or no folder, never a folder that is not a run; a leftover of that
    move is deleted by the next reset or precompute of the run (:func:`remove_reset_leftover`).
    """
    remove_reset_leftover(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"run path {path} is a file; choose a folder path for the run")
        if any(path.iterdir()):
            if not RunLayout(path).manifest.is_file():
                raise ValueError(
                    f"{path} is a non-empty folder that is not a run (no manifest.json); choose an "
                    "empty or new folder for the run"
                )
            if path.is_symlink():  # where it leads is not ours to move or delete
                raise ValueError(
                    f"run folder {path} is a symbolic link; delete the link (or the run it leads "
                    "to) and rerun"
                )
            aside = _reset_path(path)
            os.replace(path, aside)
            (aside / "manifest.json").unlink()
            shutil.rmtree(aside)
    path.mkdir(parents=True, exist_ok=True)


def remove_new_run_folder(path: Path) -> None:
    """Delete the run folder ``path`` that the caller's precompute created and that holds no
    finished work (its first call stopped on bad input before any step finished), so that no
    incomplete run is left behind for ``runs`` and the dashboard to list.

    The caller decides that the folder is its own and holds nothing worth keeping
    (``precompute._execute``); here only ``path`` itself goes, moved aside first in one step as
    :func:`prepare_run_folder` does (an interruption leaves the whole folder or none; a leftover
    of the move is deleted by the next precompute of the run). A symbolic link or anything but a
    folder is left alone, and so is a folder without manifest.json that holds anything (not a
    run: never ours to delete).
    """
    if path.is_symlink() or not path.is_dir():
        return
    manifest = RunLayout(path).manifest
    if not manifest.is_file() and any(path.iterdir()):
        return
    remove_reset_leftover(path)
    aside = _reset_path(path)
    os.replace(path, aside)
    (aside / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(aside, ignore_errors=True)


#: Largest JSON file of a run that :func:`stored_file_problem` parses whole (they are small)
_JSON_CHECK_BYTES = 16 * 2**20


def stored_file_problem(path: Path, shape: Sequence[int | None] | None = None) -> str | None:
    """What is wrong with a file a finished step wrote, in words, or None when it looks whole.

    Cheap, never a full read of a large file (runs reach 100,000 stimuli and gigabytes): an
    ``.npy`` file's header must parse, name no Python objects, match ``shape`` (its lengths;
    None: any) and account for the file's exact size; a ``.parquet`` file's footer must parse
    (``shape[0]``, where given, its row count); a ``.json`` file (small) must parse; any other
    file must be non-empty. Files are written temp-then-rename, so this finds only a file
    truncated, emptied or replaced by hand (the values are checked where a page reads them,
    :mod:`.run_checks`).
    """
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        return f"{path} is missing"
    if size == 0:
        return f"{path} is empty"
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _npy_problem(path, size, shape)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_metadata(path).num_rows
            if shape and shape[0] is not None and rows != shape[0]:
                return f"{path} holds {rows} rows, expected {shape[0]}"
        elif suffix == ".json" and size <= _JSON_CHECK_BYTES:
            json.loads(path.read_bytes())
    except (OSError, ValueError, EOFError) as exc:  # pyarrow's errors are OSError / ValueError
        return f"{path} cannot be read ({str(exc)[:200]})"
    return None


def _npy_problem(path: Path, size: int, shape: Sequence[int | None] | None) -> str | None:
    """:func:`stored_file_problem` for an ``.npy`` file (its header only)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        stored, _, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        return f"{path} holds Python objects, not numbers"
    if shape is not None and (len(stored) != len(shape) or any(
        want is not None and have != want for have, want in zip(stored, shape, strict=True)
    )):
        return f"{path} holds a {stored} array, expected {tuple(shape)}"
    need = offset + int(np.prod(stored, dtype=np.int64)) * dtype.itemsize
    if need != size:
        return f"{path} holds {size:,} bytes where its header says {need:,} (cut short?)"
    return None


def _reset_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.reset")


def remove_reset_leftover(path: Path) -> None:
    """Delete what an interrupted reset of the run folder ``path`` left beside it (its old
    folder, moved aside); a symbolic link or a file of that name is unlinked (never followed).

    Raises:
        ValueError: a folder there that cannot be deleted (it would block the next reset).
    """
    aside = _reset_path(path)
    if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
        aside.unlink()
    elif aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            raise ValueError(
                f"{aside}, left by an interrupted reset of the run {path.name}, cannot be "
                "deleted (permissions?); delete that folder and rerun"
            )
