"""The Ray Data extraction engine: one model's extraction as a Ray Data pipeline over an actor pool.

For each :class:`~convergence_core.engines.ExtractionJob`:

1. **Shards.** The items (image paths or captions, in stimulus order) are cut into contiguous
   shards of ``shard_rows`` items, a multiple of the batch size, with at least
   :data:`SHARDS_PER_ACTOR` shards per actor where there are enough items. A shard is one block
   of the Ray dataset (``ray.data.from_pandas``, one DataFrame per shard: columns ``row``,
   ``shard``, ``item``), so every actor gets work and a forward batch never straddles two shards.
2. **Actors.** ``map_batches(EncoderActor, compute=ActorPoolStrategy(size=concurrency),
   num_cpus=..., num_gpus=..., batch_size=shard_rows)``: each actor loads the encoder once (its
   constructor) and embeds whole shards, decoding the images itself, in the same batches
   (``items[k*B:(k+1)*B]``) and with the same code (:func:`extract.extract_embeddings`) as the
   local engine, so the numbers are the same.
3. **Shard files.** The driver collects each shard's rows by row id and writes the shard, complete,
   as ``<run>/shards/<model key>/<job key>/shard-<index>.npz`` (temp file + rename; numeric arrays
   only, read back with ``allow_pickle=False``), beside ``plan.json`` (the shard size). A rerun of
   an interrupted job finds the same job key and skips every finished shard, keeping the stored
   shard size even where another number of actors would plan another one. Every run computes at
   least one shard; a finished shard whose weights id differs from this run's actors' (weights
   replaced at the same path, or a new hub snapshot) is deleted and computed again.
4. **Assembly.** Shards are read back in index order into ``{layer: (n, d) float32}``; every row id
   must occur exactly once (a duplicated or missing row is an error); captions are then pooled per
   stimulus as the local engine does. The shard folder is removed once the arrays are assembled.

**Faults.** Ray Data's actor pool restarts a dead actor and retries its tasks (``max_restarts`` /
``max_task_retries`` = -1, Ray Data's defaults); shards are keyed by row ids, written only when
complete, and a row seen twice is counted (``stats["duplicate_rows"]``) and kept once. Exceptions
in the model code (bad weights, a corrupt image) are not retried and come back as the original
error. Each actor first checks that the image folder is on its machine
(:func:`engines.check_job_inputs`), so a node without the data set fails before its model loads.

**Cluster.** ``EngineOptions.ray_address`` connects to an existing cluster (``ray start --head``
on one machine, ``ray start --address=HEAD:6379`` on the others; then ``--ray-address auto`` on
the head or ``HEAD:6379``); without it a local Ray instance starts and :meth:`RayEngine.close`
shuts it down. A Ray session that is already running in this process (a notebook) is used and left
running. Workers must be able to import ``convergence_core`` (installed on every node, or shipped
with ``runtime_env``), read the images and the model weights at the same paths, and the driver
writes the run folder.

**A local instance listens on loopback only.** Without ``ray_address`` (``RAY_ADDRESS`` in the
environment is not consulted either) the instance is one node whose address is ``127.0.0.1``
(:func:`_loopback_node`); Ray binds its servers to ``127.0.0.1`` when that is the node's address,
and to every interface (``0.0.0.0`` / ``::``, or the machine's network address) otherwise. So
the GCS, the raylet (node manager and object manager), the runtime-env agent and the gRPC
server of the driver and of every worker listen on ``127.0.0.1`` at random ports; with
``ray[default]`` installed, so do the dashboard agent (gRPC, HTTP on 52365, the metrics export
port) and the metrics ports of the dashboard head and the autoscaler monitor (44227, 44217; the
dashboard's web UI is not started). The object store and the raylet's socket for its workers are
Unix sockets in the session folder. A cluster (``ray_address``) keeps Ray's own network setup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .cache import CacheFormatError, atomic_file, model_key
from .engines import (
    EngineOptions,
    ExtractionJob,
    ExtractionResult,
    check_job_inputs,
    default_layer_of,
    load_for_job,
)
from .extract import extract_embeddings, fit_batch_size, pool_captions, warn_truncated

__all__ = [
    "SHARDS_PER_ACTOR",
    "EncoderActor",
    "RayEngine",
    "ShardStore",
    "WorkerError",
    "actor_device",
    "aligned_segments",
    "model_part",
    "plan_shard_rows",
]

#: shards per actor (when there are enough items): small enough to balance the actors and to lose
#: little to a killed worker, large enough that per-shard overhead stays negligible
SHARDS_PER_ACTOR = 4

#: a shard holds at most this many items (when the batch size allows)
MAX_SHARD_ROWS = 4096

#: environment variables passed to the workers of an existing cluster when set here
FORWARDED_ENV = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CONVERGENCE_CACHE", "CONVERGENCE_MAX_IMAGE_PIXELS"
)

Progress = Callable[[int, int], None]


def plan_shard_rows(n_items: int, batch_size: int, workers: int) -> int:
    """Items per shard: a multiple of ``batch_size``, at most ``max(MAX_SHARD_ROWS, batch_size)``,
    giving at least ``SHARDS_PER_ACTOR * workers`` shards when there are enough batches."""
    if n_items < 1 or batch_size < 1 or workers < 1:
        raise ValueError("n_items, batch_size and workers must be positive")
    batches = math.ceil(n_items / batch_size)
    per_shard = math.ceil(batches / (SHARDS_PER_ACTOR * workers))
    per_shard = min(per_shard, max(1, MAX_SHARD_ROWS // batch_size))
    return max(1, per_shard) * batch_size


def aligned_segments(rows: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """Cut sorted item ids into ``(start, stop)`` positions of runs that never cross a multiple of
    ``batch_size`` or a gap: each run is (part of) one of the local engine's batches."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    cuts = np.flatnonzero((np.diff(rows) != 1) | (rows[1:] % batch_size == 0)) + 1
    bounds = [0, *cuts.tolist(), int(rows.size)]
    return list(itertools.pairwise(bounds))


def actor_device(device: str) -> str:
    """The device an actor uses for the configured ``device``: any ``cuda:N`` becomes ``cuda``,
    since Ray gives each actor its own GPU(s) through ``CUDA_VISIBLE_DEVICES``."""
    return "cuda" if str(device).startswith("cuda") else str(device)


def model_part(job: ExtractionJob) -> ExtractionJob:
    """``job`` without what only the driver needs (items, owners, work folder, caption-agreement
    items): what an actor is sent to load its model; the items come in the batches."""
    return dataclasses.replace(
        job, items=(), owner=np.zeros(0, dtype=np.int64), n_stimuli=0, work_dir=None,
        agreement_items=None, agreement_owner=None,
    )


def _layer_column(index: int) -> str:
    return f"layer_{index:04d}"


class EncoderActor:
    """A Ray Data map worker: loads one model once, embeds shards of items.

    ``job`` is the :class:`ExtractionJob` without its items (:func:`model_part`): the fields
    that load the model and decide the numbers. A call gets a batch ``{"row", "shard", "item"}``
    (numpy) and returns ``{"row", "shard", "meta", "seconds", "layer_0000", ...}``: one (B, d)
    float32 column per chosen layer, in network order, ``seconds`` (the call's time per row)
    and ``meta`` (JSON: layers, default layer, weights id, load seconds, pid, ready_at) on
    every row.
    """

    def __init__(self, job: ExtractionJob) -> None:
        started = time.perf_counter()
        job = dataclasses.replace(job, device=actor_device(job.device))
        with _tag_errors():
            check_job_inputs(job)  # on this worker's machine, before the model loads
            self.encoder, self.layers, self.autocast = load_for_job(job)
        self.batch_size = None if job.batch_size == "auto" else int(job.batch_size)
        self.images_root = job.images_root
        self.meta = json.dumps(
            {
                "layers": self.layers,
                "default_layer": default_layer_of(self.encoder.default_layer, self.layers),
                "weights_id": self.encoder.weights_id,
                "max_tokens": getattr(self.encoder, "max_tokens", None),
                "load_seconds": time.perf_counter() - started,
                "pid": os.getpid(),
                "ready_at": time.time(),  # wall clock: when this actor could start embedding
            }
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with _tag_errors(), warnings.catch_warnings():
            # captions cut at max_tokens: counted in the "truncated" column, warned by the driver
            warnings.filterwarnings("ignore", message=".* captions are longer than")
            return self._embed(batch)

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        rows = np.asarray(batch["row"], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        items = [str(batch["item"][i]) for i in order]
        if self.batch_size is None:  # "auto": fill this actor's device, once
            self.batch_size = fit_batch_size(self.encoder, items[:8])
        parts: list[dict[str, np.ndarray]] = []
        cut_before = getattr(self.encoder, "truncated_captions", 0)
        for start, stop in aligned_segments(rows, self.batch_size):
            parts.append(
                extract_embeddings(
                    self.encoder,
                    items[start:stop],
                    batch_size=self.batch_size,
                    layers=self.layers,
                    autocast=self.autocast,
                    root=self.images_root,
                )
            )
        out: dict[str, np.ndarray] = {
            "row": rows,
            "shard": np.asarray(batch["shard"], dtype=np.int64)[order],
            "meta": np.asarray([self.meta] * len(rows)),
        }
        for index, layer in enumerate(self.layers):
            out[_layer_column(index)] = np.concatenate([part[layer] for part in parts])
        # this call's time, spread over its rows (their sum over a run is the actors' busy time)
        out["seconds"] = np.full(len(rows), (time.perf_counter() - started) / len(rows))
        out["truncated"] = np.zeros(len(rows), dtype=np.int64)  # captions cut, on the first row
        out["truncated"][0] = getattr(self.encoder, "truncated_captions", 0) - cut_before
        return out


def _plain_folders(*folders: Path) -> tuple[Path, ...]:
    """``folders`` (each inside the one before), refused if any is a symbolic link: shards are
    written there and stale ones deleted, so a link (planted in a run folder, or in a shared
    temporary folder) would make the engine write and delete files elsewhere."""
    for folder in folders:
        if folder.is_symlink():
            raise CacheFormatError(
                f"{folder} is a symbolic link, where the Ray engine writes and deletes its shards "
                "in a plain folder: delete the link (or the run folder) and rerun precompute"
            )
    return folders


class ShardStore:
    """The shard files of one job: ``folder/shard-<index:06d>.npz``, each the complete rows
    ``[index*shard_rows, min((index+1)*shard_rows, n_items))``: arrays ``rows`` (int64),
    ``layer_0000``... (float32) and ``meta`` (a JSON string); ``folder/plan.json`` holds
    ``shard_rows`` (written with the first shard)."""

    def __init__(self, folder: Path, n_items: int, shard_rows: int) -> None:
        self.folder = Path(folder)
        self.n_items = n_items
        self.shard_rows = shard_rows
        self.n_shards = math.ceil(n_items / shard_rows)
        self.plan = self.folder / "plan.json"

    @classmethod
    def open(
        cls, folder: Path, n_items: int, shard_rows: int, *, multiple: int = 1, keep: bool = True
    ) -> ShardStore:
        """The store of ``folder`` with the shard size in its ``plan.json`` (``keep``: a rerun
        planning another size for another number of actors keeps the finished shards), else
        with ``shard_rows`` and no shards (those of another size, or without a plan, deleted)."""
        try:
            stored = int(json.loads(Path(folder, "plan.json").read_text())["shard_rows"])
        except (OSError, ValueError, KeyError, TypeError):
            stored = None
        if stored == shard_rows or (keep and stored and stored > 0 and stored % multiple == 0):
            return cls(folder, n_items, stored)
        for old in [*Path(folder).glob("shard-*"), Path(folder, "plan.json")]:
            old.unlink(missing_ok=True)
        return cls(folder, n_items, shard_rows)

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_items)

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.npz"

    def write(
        self, shard: int, rows: np.ndarray, columns: dict[str, np.ndarray], meta: str
    ) -> None:
        """Write one complete shard atomically (temp file + rename)."""
        start, stop = self.bounds(shard)
        if not np.array_equal(rows, np.arange(start, stop)):
            raise RuntimeError(f"shard {shard} must hold rows {start}..{stop - 1} once each")
        arrays = {name: np.ascontiguousarray(value) for name, value in columns.items()}
        if not self.plan.is_file():
            with atomic_file(self.plan) as handle:
                handle.write(json.dumps({"shard_rows": self.shard_rows}).encode("utf-8"))
        with atomic_file(self.path(shard)) as handle:
            np.savez(handle, rows=rows.astype(np.int64), meta=np.asarray(meta), **arrays)

    def read(self, shard: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]] | None:
        """``(rows, layer columns, meta)`` of a finished shard, or None if absent or unreadable."""
        path = self.path(shard)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                rows = data["rows"]
                meta = json.loads(str(data["meta"]))
                columns = {k: data[k] for k in data.files if k.startswith("layer_")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        start, stop = self.bounds(shard)
        good = np.array_equal(rows, np.arange(start, stop)) and len(columns) == len(
            meta.get("layers", [])
        )
        good = good and all(v.ndim == 2 and v.shape[0] == stop - start for v in columns.values())
        return (rows, columns, meta) if good else None

    def finished(self) -> set[int]:
        return {s for s in range(self.n_shards) if self.read(s) is not None}

    def meta(self, shard: int) -> dict[str, Any] | None:
        """The meta of a shard file (its arrays unread), or None if unreadable."""
        try:
            with np.load(self.path(shard), allow_pickle=False) as data:
                return dict(json.loads(str(data["meta"])))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None


class _Collector:
    """Rows arriving from the actors, grouped by shard; a shard is written once all its rows are
    in. A row that arrives twice is counted in ``duplicates`` and kept once."""

    def __init__(self, store: ShardStore, on_shard: Callable[[int, int], None]) -> None:
        self.store = store
        self.on_shard = on_shard
        self.pending: dict[int, dict[int, tuple[dict[str, np.ndarray], str]]] = {}
        self.duplicates = 0
        self.busy_seconds = 0.0
        self.written: set[int] = set()
        self.metas: list[dict[str, Any]] = []
        self.truncated = 0  # captions the actors cut at max_tokens (a retried task counts again)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        columns = sorted(k for k in batch if k.startswith("layer_"))
        if "seconds" in batch:
            self.busy_seconds += float(np.sum(batch["seconds"]))
        if "truncated" in batch:
            self.truncated += int(np.sum(batch["truncated"]))
        rows_in = np.asarray(batch["row"], dtype=np.int64)
        shards_in = np.asarray(batch["shard"], dtype=np.int64)
        for shard in np.unique(shards_in).tolist():
            where = np.flatnonzero(shards_in == shard)
            start, stop = self.store.bounds(shard)
            if (
                shard not in self.written
                and shard not in self.pending
                and np.array_equal(rows_in[where], np.arange(start, stop))
            ):  # the usual case: a whole shard, in order, in one batch
                meta = str(batch["meta"][where[0]])
                arrays = {c: np.asarray(batch[c][where], dtype=np.float32) for c in columns}
                self._finish(shard, rows_in[where], arrays, meta)
                continue
            for position in where.tolist():  # pieces of a shard (or repeats): row by row
                self._add_row(shard, int(rows_in[position]), batch, position, columns)

    def _add_row(
        self, shard: int, row: int, batch: dict[str, np.ndarray], position: int, columns: list[str]
    ) -> None:
        if shard in self.written:
            self.duplicates += 1
            return
        rows = self.pending.setdefault(shard, {})
        if row in rows:
            self.duplicates += 1
            return
        rows[row] = ({c: batch[c][position] for c in columns}, str(batch["meta"][position]))
        start, stop = self.store.bounds(shard)
        if len(rows) == stop - start:
            self._write(shard, columns)

    def _write(self, shard: int, columns: list[str]) -> None:
        rows = self.pending.pop(shard)
        ids = np.asarray(sorted(rows), dtype=np.int64)
        stacked = {
            c: np.stack([rows[int(i)][0][c] for i in ids]).astype(np.float32) for c in columns
        }
        self._finish(shard, ids, stacked, rows[int(ids[0])][1])

    def _finish(
        self, shard: int, ids: np.ndarray, arrays: dict[str, np.ndarray], meta: str
    ) -> None:
        self.store.write(shard, ids, arrays, meta)
        self.written.add(shard)
        self.metas.append(json.loads(meta))
        self.on_shard(shard, len(ids))


@contextlib.contextmanager
def _package_on_worker_path() -> Iterator[None]:
    """While a local Ray instance starts, put the folder this package is imported from on
    ``PYTHONPATH``: its processes inherit this environment, so workers import the same
    ``convergence_core`` as the driver (a source checkout included)."""
    parent = str(Path(__file__).resolve().parent.parent)
    before = os.environ.get("PYTHONPATH")
    parts = [p for p in (before or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([parent, *[p for p in parts if p != parent]])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


#: Ray's switch (``ray_constants.ENABLE_RAY_CLUSTER``, on by default on Linux, off on macOS and
#: Windows) that lets a node take its network-reachable address: off, a node started on
#: ``127.0.0.1`` keeps that address (on, ``ray.init`` swaps it for the machine's network address)
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

#: the address of a local Ray instance's node; Ray's C++ servers bind to 127.0.0.1 (rather than
#: 0.0.0.0) exactly when the node's address is this string
LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_node() -> Iterator[dict[str, Any]]:
    """While a local Ray instance starts: the ``ray.init`` arguments (``_node_ip_address``) and
    the switch (:data:`_RAY_CLUSTER_SWITCH`, off in this process and in the environment the Ray
    processes inherit) that make its node ``127.0.0.1``, so that every Ray server of the instance
    binds to loopback. Both are restored afterwards (the processes keep their copy)."""
    from ray._private import ray_constants

    before_env = os.environ.get(_RAY_CLUSTER_SWITCH)
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"address": "local", "_node_ip_address": LOOPBACK}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = before_env


class WorkerError(ValueError):
    """An error our code raised in a Ray worker (a missing image, unusable weights, ...), with the
    original message; ``original_type`` names the original exception class."""

    def __init__(self, message: str, original_type: str) -> None:
        super().__init__(message)
        self.original_type = original_type


_TAG = re.compile(r"\[\[convergence-error:(\w+)\]\](.*?)\[\[/convergence-error\]\]", re.DOTALL)


@contextlib.contextmanager
def _tag_errors() -> Iterator[None]:
    """In a worker: re-raise our ValueErrors with their class and message tagged, so the driver can
    give users the original message (Ray Data's wrappers keep only the text of a user error)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(
            f"[[convergence-error:{type(exc).__name__}]]{exc}[[/convergence-error]]"
        ) from exc


def _original_error(exc: BaseException) -> WorkerError | None:
    """The tagged error of a worker (see :func:`_tag_errors`) inside Ray's wrappers, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        match = _TAG.search(str(current))
        if match:
            return WorkerError(match.group(2), match.group(1))
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def _same_model(job: ExtractionJob, metas: list[dict[str, Any]], stale_ok: bool = False) -> bool:
    """Whether every meta has the first one's layers and weights id; else RuntimeError (False
    with ``stale_ok``)."""
    for meta in metas[1:]:
        if (meta.get("layers"), meta.get("weights_id")) != (
            metas[0].get("layers"), metas[0].get("weights_id")
        ):
            if stale_ok:
                return False
            raise RuntimeError(
                f"{job.model}: workers loaded different weights or layers (weights ids "
                f"{str(metas[0].get('weights_id'))[:12]} vs {str(meta.get('weights_id'))[:12]}); "
                "every node must have the same model files"
            )
    return True


class RayEngine:
    """Extraction on Ray (see the module docstring). Ray starts on the first :meth:`extract`."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self._started = False
        self._owns_ray = False
        self._runtime_env: dict[str, Any] | None = None

    # ----------------------------------------------------------------------- Ray session
    def start(self) -> None:
        """Connect to ``ray_address``, use the session already running here, or start one: a
        local instance on ``127.0.0.1`` only (module docstring), refused if Ray gives its node
        another address."""
        if self._started:
            return
        try:
            import ray
            import ray.data
        except ImportError:
            raise ValueError(
                "engine 'ray' needs Ray Data: pip install 'ray[data]==2.60.0' (see "
                "requirements.txt)"
            ) from None
        runtime_env = dict(self.options.runtime_env or {})
        if self.options.ray_address:
            forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            if forwarded:
                runtime_env["env_vars"] = {**forwarded, **dict(runtime_env.get("env_vars", {}))}
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            if runtime_env:
                kwargs["runtime_env"] = runtime_env
            try:
                if self.options.ray_address:
                    ray.init(address=self.options.ray_address, **kwargs)
                else:
                    with _package_on_worker_path(), _loopback_node() as local:
                        ray.init(**local, **kwargs)
                    self._check_loopback(ray)
            except (ConnectionError, RuntimeError) as exc:
                chain = f"{exc} {exc.__cause__}"
                auth = (
                    " The cluster asks for an authentication token: export RAY_AUTH_MODE=token and "
                    "make its token available here (~/.ray/auth_token, copied from the head node, "
                    "or RAY_AUTH_TOKEN)."
                    if "auth" in chain.lower() and "token" in chain.lower()
                    else ""
                )
                raise ValueError(
                    f"cannot connect to the Ray cluster at {self.options.ray_address!r} ({exc}); "
                    "start it with `ray start --head` (and `ray start --address=HEAD:6379` on the "
                    f"other machines) or drop --ray-address to run Ray locally.{auth}"
                ) from None
            self._owns_ray = True
        self._runtime_env = runtime_env if not self._owns_ray else None
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # we draw our own progress; Ray Data's note that its bars are off is noise here
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        self._started = True

    @staticmethod
    def _check_loopback(ray: Any) -> None:
        """Refuse (after shutting it down) a local instance whose node did not get the loopback
        address: its servers would listen on every network interface (a Ray version that
        resolves the address otherwise)."""
        node = ray._private.worker._global_node
        address = getattr(node, "node_ip_address", None)
        if address != LOOPBACK:
            ray.shutdown()
            raise ValueError(
                f"the local Ray instance took the address {address!r} instead of {LOOPBACK}, so "
                "its servers would listen on the network; it was shut down. This Ray version "
                "does not keep a local node on loopback: run a Ray cluster you have secured and "
                "pass its address with --ray-address"
            )

    def close(self) -> None:
        """Shut down the Ray instance this engine started (a cluster or an existing session is
        left running)."""
        if self._owns_ray:
            import ray

            ray.shutdown()
        self._started = self._owns_ray = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- resources
    def actor_resources(self, device: str) -> tuple[float, float]:
        """``(num_cpus, num_gpus)`` per actor: the options, else 1 CPU and 1 GPU on CUDA."""
        cuda = str(device).startswith("cuda")
        num_cpus = 1.0 if self.options.num_cpus is None else float(self.options.num_cpus)
        num_gpus = (
            (1.0 if cuda else 0.0)
            if self.options.num_gpus is None
            else float(self.options.num_gpus)
        )
        if cuda and num_gpus <= 0:
            raise ValueError(
                "device 'cuda' with num_gpus=0: the actors would not see a GPU; set --num-gpus "
                "(e.g. 1, or 0.5 to put two actors on one GPU) or use --device cpu"
            )
        if not cuda and num_gpus > 0:
            raise ValueError(
                f"num_gpus={num_gpus:g} with device {device!r}: the model would run on the CPU "
                "while holding a GPU; use --device cuda or drop --num-gpus"
            )
        return num_cpus, num_gpus

    def concurrency(self, device: str) -> int:
        """Actors per model: ``options.concurrency``, else as many as the cluster holds.

        Raises ValueError when not even one actor fits, or (local Ray) when the asked number does
        not fit; a remote cluster may autoscale, so there it only warns."""
        import ray

        num_cpus, num_gpus = self.actor_resources(device)
        total = ray.cluster_resources()
        cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
        fits = [math.floor(cpus / num_cpus + 1e-9)] if num_cpus > 0 else []
        if num_gpus > 0:
            fits.append(math.floor(gpus / num_gpus + 1e-9))
        fit = min(fits) if fits else 1
        wanted = self.options.concurrency or max(1, fit)
        if wanted > fit:
            message = (
                f"{wanted} actors x ({num_cpus:g} CPU, {num_gpus:g} GPU) do not fit the Ray "
                f"cluster's {cpus:g} CPUs and {gpus:g} GPUs; lower --concurrency, --num-cpus or "
                "--num-gpus"
            )
            if not self.options.ray_address or fit < 1:
                raise ValueError(message)
            warnings.warn(message + " (waiting for the cluster to scale up)", stacklevel=2)
        return wanted

    # ----------------------------------------------------------------------- one job
    def extract(
        self, job: ExtractionJob, progress: Progress | None = None,
        agreement_progress: Progress | None = None, *, shard_rows: int | None = None,
    ) -> ExtractionResult:
        """Run ``job`` on Ray; ``progress(done, total)`` counts items in finished shards.

        ``shard_rows`` (a multiple of the batch size) overrides :func:`plan_shard_rows`. The
        caption agreement is not measured here (``agreement_progress`` is unused): the properties
        step measures it after the extraction, with its own progress."""
        self.start()
        started = time.perf_counter()
        num_cpus, num_gpus = self.actor_resources(job.device)
        workers = self.concurrency(job.device)
        # "auto": each actor fits its own batch size to its device, so shards are planned in
        # items (up to MAX_SHARD_ROWS) rather than in batches
        batch = 1 if job.batch_size == "auto" else int(job.batch_size)
        n_items = job.items_count
        if n_items == 0:
            raise ValueError("no items to embed; the dataset is empty (check its filters)")
        explicit = shard_rows is not None
        if shard_rows is None:
            shard_rows = plan_shard_rows(n_items, batch, workers)
        elif shard_rows < 1 or shard_rows % batch:
            raise ValueError(f"shard_rows must be a positive multiple of the batch size {batch}")
        store = ShardStore.open(
            self.shard_folder(job), n_items, shard_rows, multiple=batch, keep=not explicit
        )
        done = store.finished()
        # at least one shard runs: its actor's weights id tells which finished shards are stale
        todo = [s for s in range(store.n_shards) if s not in done] or [store.n_shards - 1]
        counted = set(done)
        items_done = sum(store.bounds(s)[1] - store.bounds(s)[0] for s in done)
        if progress is not None:
            progress(items_done, n_items)

        def on_shard(shard: int, count: int) -> None:
            nonlocal items_done
            if shard not in counted:
                counted.add(shard)
                items_done += count
            if progress is not None:
                progress(items_done, n_items)

        collector = _Collector(store, on_shard)
        run = (job, store, collector, workers, num_cpus, num_gpus)
        self._run_shards(todo, *run)
        _same_model(job, collector.metas)
        fresh = collector.metas[0] if collector.metas else {}
        stale = [
            s for s in sorted(done - collector.written)
            if fresh and not _same_model(job, [fresh, store.meta(s) or {}], stale_ok=True)
        ]
        if stale:
            warnings.warn(
                f"{job.model}: {len(stale)} finished shard(s) of an earlier run were computed "
                f"with other weights (weights id now {str(fresh.get('weights_id'))[:12]}); "
                "computing them again",
                stacklevel=2,
            )
            for shard in stale:
                store.path(shard).unlink(missing_ok=True)
            self._run_shards(stale, *run)
        finished_at = time.time()
        result = self._assemble(job, store, collector)
        result.extract_seconds = time.perf_counter() - started
        # one (pid, ready_at) per actor that delivered a shard (a restarted actor is another one;
        # the dead one's time counts to the end)
        actors = sorted({(int(m["pid"]), float(m["ready_at"])) for m in collector.metas
                         if "ready_at" in m})
        ready = [at for _, at in actors]
        result.stats.update(
            engine="ray",
            actors=workers,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            shard_rows=store.shard_rows,
            shards=store.n_shards,
            shards_skipped=len(done - collector.written),
            shards_written=len(collector.written),
            duplicate_rows=collector.duplicates,
            actor_pids=sorted({pid for pid, _ in actors}),
            # from the first actor ready to the last shard in: the embedding work as the engine
            # delivers it (scheduling, transfers and shard writes included; start-up excluded)
            compute_seconds=finished_at - min(ready) if ready else None,
            # each actor's time from its own ready to the last shard in, summed: what the engine
            # had to work with once the model was loaded (an actor still loading is not idle)
            actor_ready_seconds=sum(finished_at - at for at in ready) if ready else None,
            actors_ready=len(ready),
            ready_spread_seconds=max(ready) - min(ready) if ready else None,
            actor_busy_seconds=collector.busy_seconds,  # summed over actors (retries included)
            **({"truncated_captions": collector.truncated} if job.modality == "language" else {}),
        )
        computed = sum(store.bounds(s)[1] - store.bounds(s)[0] for s in collector.written)
        warn_truncated(job.model, collector.truncated, computed, fresh.get("max_tokens"))
        shutil.rmtree(store.folder, ignore_errors=True)
        return result

    def _run_shards(
        self, shards: list[int], job: ExtractionJob, store: ShardStore, collector: _Collector,
        workers: int, num_cpus: float, num_gpus: float,
    ) -> None:
        """Embed ``shards`` of ``job`` on an actor pool; ``collector`` writes them."""
        import pandas as pd
        import ray
        import ray.data

        frames = []
        for shard in shards:
            start, stop = store.bounds(shard)
            frames.append(
                pd.DataFrame(
                    {
                        "row": np.arange(start, stop, dtype=np.int64),
                        "shard": np.full(stop - start, shard, dtype=np.int64),
                        "item": list(job.items[start:stop]),
                    }
                )
            )
        extra: dict[str, Any] = {}
        if self._runtime_env:
            extra["runtime_env"] = self._runtime_env
        dataset = ray.data.from_pandas(frames).map_batches(
            EncoderActor,
            batch_size=store.shard_rows,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(shards))),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            fn_constructor_kwargs={"job": model_part(job)},
            batch_format="numpy",
            udf_modifying_row_count=False,
            **extra,
        )
        try:
            for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(out)
        except Exception as exc:
            original = _original_error(exc)
            if original is not None:
                raise original from None
            raise

    @staticmethod
    def shard_folder(job: ExtractionJob) -> Path:
        """Where ``job``'s shards go: ``<work_dir>/<model key>/<job key>``, the key a hash of
        everything that decides the numbers (not the shard size: ``plan.json`` keeps it, so a
        rerun on another number of actors reuses the shards). Folders of other keys of the same
        model are stale (inputs changed) and are deleted."""
        digest = hashlib.sha256()
        for part in (
            job.inputs,
            job.model,
            job.modality,
            json.dumps(job.layers if isinstance(job.layers, str) else list(job.layers)),
            str(job.gpa_layer),
            str(job.device).split(":")[0],
            str(job.batch_size),
            job.precision,
            str(job.weights),
        ):
            digest.update(part.encode("utf-8") + b"\0")
        for item in job.items:
            digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
        key = digest.hexdigest()[:16]
        if job.work_dir is None:
            import tempfile

            root = Path(tempfile.gettempdir()) / "convergence-shards"
            if root.exists() and hasattr(os, "getuid") and root.lstat().st_uid != os.getuid():
                raise CacheFormatError(
                    f"{root} belongs to another user, whose shards a rerun would reuse as they "
                    "are: delete it, or give the job a work_dir of your own"
                )
            return _plain_folders(root, root / key)[-1]
        root = Path(job.work_dir)
        base = root / model_key(job.model)
        _, base, folder = _plain_folders(root, base, base / key)
        if base.is_dir():
            for other in base.iterdir():
                if other.name != key and other.is_dir() and not other.is_symlink():
                    shutil.rmtree(other, ignore_errors=True)
        return folder

    def _assemble(
        self, job: ExtractionJob, store: ShardStore, collector: _Collector
    ) -> ExtractionResult:
        """Read every shard in order into ``{layer: (n, d)}``; each row exactly once."""
        seen = np.zeros(store.n_items, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        metas: list[dict[str, Any]] = []
        for shard in range(store.n_shards):
            read = store.read(shard)
            if read is None:
                raise RuntimeError(
                    f"shard {shard} of {job.model} is missing after the Ray pipeline finished; "
                    "rerun to compute it"
                )
            rows, columns, meta = read
            metas.append(meta)
            np.add.at(seen, rows, 1)
            for index, layer in enumerate(meta["layers"]):
                values = columns[_layer_column(index)]
                if layer not in arrays:
                    arrays[layer] = np.empty((store.n_items, values.shape[1]), dtype=np.float32)
                arrays[layer][rows] = values
        if not (seen == 1).all():
            bad = np.flatnonzero(seen != 1)[:5].tolist()
            raise RuntimeError(f"{job.model}: item rows {bad} were not embedded exactly once")
        _same_model(job, metas)
        first = metas[0]
        layers = list(first["layers"])
        pooled = pool_captions(arrays, job.owner, job.n_stimuli)
        return ExtractionResult(
            arrays={layer: pooled[layer] for layer in layers},
            layers=layers,
            default_layer=str(first["default_layer"]),
            weights_id=str(first["weights_id"]),
            items=job.items_count,
            load_seconds=max(float(m["load_seconds"]) for m in collector.metas or metas),
            extract_seconds=0.0,
            stats={},
        )
