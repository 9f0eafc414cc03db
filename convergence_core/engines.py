"""Extraction engines: where the forward passes of one model over every stimulus run.

``precompute`` hands each model's extraction to an engine as an :class:`ExtractionJob` and gets
an :class:`ExtractionResult` back: ``{layer: (n_stimuli, d) float32}`` in stimulus order, plus
what the manifest records (layers, default layer, weights id, timings). Everything after that
(checks, writing, GPA, ...) is shared.

- ``"local"`` (:class:`LocalEngine`, the default): the model runs in this process.
- ``"ray"`` (:class:`convergence_core.ray_engine.RayEngine`): a Ray Data pipeline over an actor
  pool, on a local Ray instance or an existing cluster; same numbers (see that module).

Both give the same numbers for the same model, precision, device and batch contents.
The Ray engine checks every model's weights (``models.check_weights_available``) before
scheduling anything.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from .extract import (
    DEFAULT_BATCH_SIZE,
    captions_for_language,
    check_precision,
    extract_embeddings,
    fit_batch_size,
    pool_captions,
    precision_plan,
)

__all__ = [
    "ENGINES",
    "ENGINE_SETTINGS",
    "Engine",
    "EngineOptions",
    "ExtractionJob",
    "ExtractionResult",
    "LocalEngine",
    "check_engine_settings",
    "check_job_inputs",
    "choose_layers",
    "load_for_job",
    "make_job",
    "open_engine",
]

#: the engines ``precompute`` knows
ENGINES = ("local", "ray")

#: ``PrecomputeConfig`` fields that choose where extraction runs (never what it computes: they are
#: left out of run names and step fingerprints)
ENGINE_SETTINGS = ("engine", "ray_address", "concurrency", "num_cpus", "num_gpus", "runtime_env")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EngineOptions:
    """How extraction is distributed (none of these change the numbers).

    Attributes:
        engine: ``"local"`` or ``"ray"``.
        ray_address: an existing Ray cluster (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``);
            None starts a local Ray instance for the run and shuts it down afterwards.
        concurrency: actors per model (None: as many as the cluster's CPUs / GPUs allow).
        num_cpus / num_gpus: resources reserved per actor (None: 1 CPU; 1 GPU when the device is
            CUDA, else 0).
        runtime_env: Ray ``runtime_env`` for the job (e.g. ``{"py_modules": [...]}`` or
            ``{"pip": [...]}`` to ship this package to workers that lack it).
        weights: ``{model: local weights path}`` as in ``PrecomputeConfig``.
    """

    engine: str = "local"
    ray_address: str | None = None
    concurrency: int | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    runtime_env: Mapping[str, Any] | None = None
    weights: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        check_engine_settings(self)

    @classmethod
    def from_config(cls, config: Any) -> EngineOptions:
        """The engine settings of a ``PrecomputeConfig`` (or anything with those attributes)."""
        names = (*ENGINE_SETTINGS, "weights")
        return cls(**{name: getattr(config, name, None) for name in names if hasattr(config, name)})


@dataclass(frozen=True)
class ExtractionJob:
    """One model over every stimulus.

    Attributes:
        model: registry name. modality: ``"vision"`` | ``"language"``.
        items: what is fed to the model, in order: absolute image paths (vision) or caption texts
            (language: one per stimulus for caption mode "first", every caption for "mean").
        owner: (len(items),) int64, the stimulus row of each item (``arange(n)`` for vision).
        n_stimuli: rows of the result.
        layers: ``"all"``, ``"default"`` or a list of layer names; ``gpa_layer`` is always added.
        device, batch_size (int or ``"auto"``), precision, weights: as in ``PrecomputeConfig``.
        work_dir: a folder inside the run where an engine may keep partial results (the Ray
            engine's shards); None: keep nothing.
        inputs: a fingerprint of everything that decides the result (names the shard folder).
        images_root: the data set's image folder: every image path must stay inside it once
            symbolic links are resolved (None: no check; language jobs).
        agreement_items / agreement_owner: language jobs only, when set: every caption and its
            stimulus row; the engine also measures each stimulus's caption agreement
            (``properties.caption_agreement``) at the model's default layer while the model is
            loaded (engines that cannot leave ``ExtractionResult.caption_agreement`` None).
    """

    model: str
    modality: str
    items: tuple[str, ...]
    owner: np.ndarray
    n_stimuli: int
    layers: Any = "all"
    gpa_layer: str | None = None
    device: str = "cpu"
    batch_size: int | str = DEFAULT_BATCH_SIZE
    precision: str = "auto"
    weights: str | None = None
    work_dir: Path | None = None
    inputs: str = ""
    images_root: str | None = None
    agreement_items: tuple[str, ...] | None = None
    agreement_owner: np.ndarray | None = None

    @property
    def items_count(self) -> int:
        return len(self.items)


@dataclass
class ExtractionResult:
    """An engine's answer for one :class:`ExtractionJob`.

    ``arrays``: ``{layer: (n_stimuli, d) float32}`` (rows in stimulus order), for ``layers`` in
    network order; ``default_layer``: the model's default if chosen, else the last layer;
    ``stats``: engine details for the manifest and benchmarks (Ray: shards written / skipped,
    duplicate rows seen, actors).
    """

    arrays: dict[str, np.ndarray]
    layers: list[str]
    default_layer: str
    weights_id: str
    items: int
    load_seconds: float
    extract_seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    caption_agreement: tuple[str, np.ndarray] | None = None  # (layer, (n_stimuli,) float64)
    #: every caption's embedding at each of ``layers`` ({layer: (captions, d) float32}), kept
    #: with the caption agreement when small (:data:`CAPTION_CACHE_BYTES`), else None
    caption_features: dict[str, np.ndarray] | None = None


def agreement_label(model: str) -> str:
    """What the progress calls the pass that embeds every caption of a language ``model`` for
    its caption agreement (in the extraction, or in the properties step of an older run)."""
    return f"{model} (every caption, for caption agreement)"


class Engine(Protocol):
    """What ``precompute`` needs from an engine."""

    def extract(
        self, job: ExtractionJob, progress: Progress | None = None,
        agreement_progress: Progress | None = None,
    ) -> ExtractionResult:
        """Run ``job``; ``progress(done, total)`` counts items; ``agreement_progress`` counts
        the captions of the caption-agreement pass, where the engine makes one."""

    def close(self) -> None:
        """Release what the engine started (a local Ray instance)."""


def check_engine_settings(settings: Any) -> None:
    """ValueError naming the setting and the fix for a bad engine setting of ``settings`` (a
    ``PrecomputeConfig`` or :class:`EngineOptions`); also the ``precision`` when it has one."""
    engine = getattr(settings, "engine", "local")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {list(ENGINES)}")
    if hasattr(settings, "precision"):
        check_precision(settings.precision)
    concurrency = getattr(settings, "concurrency", None)
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ValueError(
            f"concurrency must be a positive integer (actors per model), got {concurrency!r}"
        )
    for name in ("num_cpus", "num_gpus"):
        value = getattr(settings, name, None)
        if value is None:
            continue
        if (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 <= value < float("inf")
        ):
            raise ValueError(
                f"{name} must be a number >= 0 (per Ray actor), and finite; got {value!r} "
                f"(--{name.replace('_', '-')})"
            )
        if value != int(value) and value > 1:
            raise ValueError(
                f"{name}={value!r}: Ray accepts fractions only below 1 (e.g. 0.5) or whole numbers"
            )
    address = getattr(settings, "ray_address", None)
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ValueError(
            f"ray_address must be a cluster address such as 'auto' or 'host:6379', got {address!r}"
        )
    runtime_env = getattr(settings, "runtime_env", None)
    if runtime_env is not None and not isinstance(runtime_env, Mapping):
        raise ValueError(
            "runtime_env must be a mapping of Ray runtime_env fields (e.g. {'py_modules': [...]}), "
            f"got {type(runtime_env).__name__}"
        )
    if engine == "local":
        used = [
            name
            for name in ("ray_address", "concurrency", "num_cpus", "num_gpus", "runtime_env")
            if getattr(settings, name, None) is not None
        ]
        if used:
            raise ValueError(
                f"{', '.join(used)} only apply to engine 'ray'; set engine='ray' (--engine ray) "
                "or remove them"
            )


def choose_layers(
    model: str,
    available: Sequence[str],
    default_layer: str,
    wanted: Any,
    gpa_layer: str | None = None,
) -> list[str]:
    """Layers to keep, in network order: ``wanted`` (``"all"``, ``"default"`` or a list) plus
    ``gpa_layer``. Unknown layers raise ValueError listing the model's layers."""
    if wanted == "all":
        chosen = set(available)
    elif wanted == "default":
        chosen = {default_layer}
    else:
        chosen = set(wanted)
    if gpa_layer is not None:
        chosen.add(gpa_layer)
    unknown = sorted(chosen - set(available))
    if unknown:
        raise ValueError(
            f"layer(s) {unknown} are not layers of {model!r}; choose from {list(available)}"
        )
    return [layer for layer in available if layer in chosen]


def make_job(
    model: str,
    modality: str,
    stimuli: Any,
    images_root: str | os.PathLike[str] | None,
    *,
    layers: Any = "all",
    gpa_layer: str | None = None,
    caption_mode: str = "first",
    device: str = "cpu",
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    precision: str = "auto",
    weights: str | os.PathLike[str] | None = None,
    work_dir: Path | None = None,
    inputs: str = "",
    caption_agreement: bool = False,
) -> ExtractionJob:
    """The job for ``model`` over a stimulus table (columns ``image``, ``captions``);
    ``caption_agreement`` asks a language job to measure caption agreement too."""
    n = len(stimuli)
    if modality == "vision":
        root = Path(images_root)
        items = tuple(str(root / rel) for rel in stimuli["image"])
        owner = np.arange(n, dtype=np.int64)
    elif modality == "language":
        texts, owner = captions_for_language(stimuli, caption_mode)
        items = tuple(texts)
    else:
        raise ValueError(f"modality must be 'vision' or 'language', got {modality!r}")
    return ExtractionJob(
        model=model,
        modality=modality,
        items=items,
        owner=owner,
        n_stimuli=n,
        layers=layers,
        gpa_layer=gpa_layer,
        device=str(device),
        batch_size=batch_size,
        precision=check_precision(precision),
        weights=os.fspath(weights) if weights else None,
        work_dir=work_dir,
        inputs=inputs,
        images_root=os.fspath(images_root) if modality == "vision" else None,
        **_agreement_fields(stimuli, modality, caption_agreement),
    )


def _agreement_fields(stimuli: Any, modality: str, wanted: bool) -> dict[str, Any]:
    if not wanted or modality != "language":
        return {}
    texts, owner = captions_for_language(stimuli, "mean")
    return {"agreement_items": tuple(texts), "agreement_owner": owner}


#: Largest float32 size of every caption's embedding at every extracted layer that an extraction
#: keeps for the run's caption cache (``caption_embeddings``): the same forward passes give every
#: layer, and a report's many-to-many section then embeds nothing (the demo: 1,195 captions, 68
#: MB for both language models; the README's report command 162 -> 62 s). Larger runs keep only
#: the agreement; ``report --embed-captions`` embeds the layers it needs.
CAPTION_CACHE_BYTES = 128 * 2**20


class CaptionMeasure(NamedTuple):
    """What :func:`measure_caption_agreement` gives: the ``layer`` and (n_stimuli,) ``agreement``,
    and ``features`` (``ExtractionResult.caption_features``)."""

    layer: str
    agreement: np.ndarray
    features: dict[str, np.ndarray] | None


def measure_caption_agreement(
    job: ExtractionJob, encoder: Any, per_item: Mapping[str, np.ndarray], layer: str,
    batch_size: int, autocast: Any, progress: Progress | None = None,
) -> CaptionMeasure | None:
    """``job``'s caption agreement at ``layer`` with the loaded ``encoder`` (reusing the job's
    own per-item embeddings when they already are every caption), and every caption's embedding
    at each layer of ``per_item`` when they fit in :data:`CAPTION_CACHE_BYTES`;
    ``progress(done, total)`` counts the captions embedded."""
    from .properties import caption_agreement

    if job.agreement_items is None:
        return None
    width = sum(int(np.shape(values)[1]) for values in per_item.values())
    keep = len(job.agreement_items) * width * 4 <= CAPTION_CACHE_BYTES
    if job.items == job.agreement_items and layer in per_item:
        embedded = dict(per_item)
    else:
        embedded = extract_embeddings(
            encoder, list(job.agreement_items), batch_size=batch_size,
            layers=list(per_item) if keep else [layer], autocast=autocast, by_length=True,
            progress=progress,
        )
    agreement = caption_agreement(embedded[layer], job.agreement_owner, job.n_stimuli)
    return CaptionMeasure(layer, agreement, embedded if keep else None)


def check_job_inputs(job: ExtractionJob) -> None:
    """Before ``job``'s model loads: its image folder (vision jobs) is on this machine.

    Checked where the model runs: a Ray worker on another node may lack the data set, and the
    largest models take minutes to load before their first image would fail.

    Raises:
        ValueError: the image folder is not a folder here (the message names the machine).
    """
    if job.images_root is not None and not os.path.isdir(job.images_root):
        raise ValueError(
            f"image folder {job.images_root} not found on {socket.gethostname()}: the data set "
            "must be at this path on every machine that extracts embeddings (with --engine ray, "
            "on every node of the cluster: copy it there or use a shared file system)"
        )


def load_for_job(job: ExtractionJob) -> tuple[Any, list[str], Any]:
    """Load ``job``'s model at its precision: ``(encoder, chosen layers, autocast dtype)``."""
    from . import models

    plan = precision_plan(job.precision, job.modality)
    encoder = models.load_encoder(
        job.model, device=job.device, dtype=plan.load_dtype, weights=job.weights
    )
    layers = choose_layers(
        job.model, encoder.layers, encoder.default_layer, job.layers, job.gpa_layer
    )
    return encoder, layers, plan.autocast


def resolve_batch_size(job: ExtractionJob, encoder: Any) -> int:
    """``job.batch_size``, or for ``"auto"`` the size that fills the device
    (:func:`extract.fit_batch_size`)."""
    if job.batch_size == "auto":
        return fit_batch_size(encoder, job.items[:8])
    return int(job.batch_size)


def default_layer_of(encoder_default: str, layers: Sequence[str]) -> str:
    return encoder_default if encoder_default in layers else layers[-1]


class LocalEngine:
    """Every model in this process, one after the other (the default engine)."""

    def extract(
        self, job: ExtractionJob, progress: Progress | None = None,
        agreement_progress: Progress | None = None,
    ) -> ExtractionResult:
        check_job_inputs(job)
        load_started = time.perf_counter()
        encoder, layers, autocast = load_for_job(job)
        load_seconds = time.perf_counter() - load_started
        started = time.perf_counter()
        per_item = extract_embeddings(
            encoder,
            list(job.items),
            batch_size=resolve_batch_size(job, encoder),
            progress=progress,
            layers=layers,
            autocast=autocast,
            root=job.images_root,
        )
        arrays = pool_captions(per_item, job.owner, job.n_stimuli)
        seconds = time.perf_counter() - started
        default = default_layer_of(encoder.default_layer, layers)
        agreement = measure_caption_agreement(
            job, encoder, per_item, default, resolve_batch_size(job, encoder), autocast,
            agreement_progress,
        )
        result = ExtractionResult(
            arrays={layer: arrays[layer] for layer in layers},
            layers=layers,
            default_layer=default,
            caption_agreement=None if agreement is None else (agreement.layer, agreement.agreement),
            caption_features=None if agreement is None else agreement.features,
            weights_id=encoder.weights_id,
            items=job.items_count,
            load_seconds=load_seconds,
            extract_seconds=seconds,
            stats={"engine": "local",
                   "truncated_captions": getattr(encoder, "truncated_captions", 0)},
        )
        del encoder
        return result

    def close(self) -> None:
        return None


def open_engine(options: Any, models: Sequence[str]) -> Engine:
    """The engine ``options.engine`` for a run over ``models`` (``options``: an
    :class:`EngineOptions` or a ``PrecomputeConfig``).

    The Ray engine first checks every model's weights (``models.check_weights_available``, the
    check the local pipeline makes too), so a missing model fails before Ray starts or any work
    is scheduled, with the same message.
    """
    if not isinstance(options, EngineOptions):
        options = EngineOptions.from_config(options)
    if options.engine == "local":
        return LocalEngine()
    if options.engine == "ray":
        from .models import check_weights_available

        check_weights_available(list(models), weights=options.weights)
        from .ray_engine import RayEngine

        return RayEngine(options)
    raise ValueError(f"unknown engine {options.engine!r}; use one of {list(ENGINES)}")
