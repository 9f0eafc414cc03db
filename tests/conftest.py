"""Shared pytest fixtures: paths of the real data sets and tiny image folders made in tmp_path."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from convergence_core.settings import demo_data_root, imagenet_samples_root


#: Test files that hold one long chain of work in one process (the end-to-end file builds the real
#: demo run, then runs the README's report and the browser test on it: ~6 of the suite's ~11
#: minutes of one worker). ``make test`` hands out whole files in collection order
#: (``--dist loadfile``), so these go first and the other worker takes the rest meanwhile; in
#: alphabetical order the chain started mid-run. Fresh-clone runs the same afternoon: pytest 569 s
#: with this order, 608 s and 698 s without (a noisy machine).
LONG_FILES = ("test_end_to_end.py",)


_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Names the thread variables :func:`pytest_configure` set (the xdist controller tells its workers
#: through this variable, so that they know those values are not the user's).
_SET_HERE = "CONVERGENCE_TEST_THREAD_VARIABLES"
#: BLAS / OpenMP thread settings the user gave (they win over :func:`pytest_configure`'s).
_USER_THREADS = {
    name
    for name in _THREAD_VARIABLES
    if name in os.environ and name not in os.environ.get(_SET_HERE, "").split(",")
}


def _worker_count(config: pytest.Config) -> int:
    """How many test processes share the cores: xdist's workers (seen from a worker or from the
    controller), else 1."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return max(1, int(workerinput["workercount"]))
    try:
        return max(1, int(config.getoption("numprocesses", None) or 1))
    except (TypeError, ValueError):  # "auto" / "logical" before xdist resolves them
        return 1


def pytest_configure(config: pytest.Config) -> None:
    """One share of the cores per xdist worker for BLAS / OpenMP threads, in this process and in
    every process it starts (benchmarks, the served app, the installed wheel). OpenBLAS threads
    spin while they wait, so two workers' 2-thread pools on 2 cores slow each other down by an
    order of magnitude: the numerics benchmark's plain GPA took 18.2 s beside another 2-thread
    BLAS process, 1.6 s with one thread each and 1.4 s alone; in the suite its test took 74-90 s.
    The xdist controller sets the same values before it starts the workers, which inherit them.
    """
    workers = _worker_count(config)
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    ours = [name for name in _THREAD_VARIABLES if name not in _USER_THREADS]
    for name in ours:
        os.environ[name] = str(threads)
    os.environ[_SET_HERE] = ",".join(ours)
    if "OPENBLAS_NUM_THREADS" not in _USER_THREADS:
        threadpool_limits(limits=threads)  # libraries loaded already; stays until changed


@pytest.fixture(scope="session")
def user_environment() -> dict[str, str]:
    """``os.environ`` without the thread settings of :func:`pytest_configure` that change numbers:
    for a process that must compute what the user's own command computes. torch's threads
    (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) are the user's: the vision encoders' convolutions
    round differently on 1 and 2 threads (features ~1e-6 apart on the demo), and the README's
    blind-matching accuracies, a local search, moved by up to 0.8 points with them.

    numpy's OpenBLAS keeps this worker's share (``OPENBLAS_NUM_THREADS``; torch does not use it):
    the demo report wrote the same report.json and printed the same text with 1 and 2 BLAS
    threads (other tables ≤ 2e-15 apart), and beside another busy test process the report took
    152 s with the user's 2 spinning OpenBLAS threads against 79 s with one."""
    environment = dict(os.environ)
    for name in environment.pop(_SET_HERE, "").split(","):
        if name != "OPENBLAS_NUM_THREADS":
            environment.pop(name, None)
    return environment


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode for the Hugging Face clients, even when another test in this process imported
    them first: they read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` at import time, so the
    variables alone came too late and the paper config's offline test retried the hub for 23 s
    in CI (and would have downloaded on a machine with a network)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: order kept otherwise


@pytest.fixture(autouse=True)
def _cache_setting_restored():
    """Every test leaves ``$CONVERGENCE_CACHE`` as it found it. Code under test may set it
    (``serve --cache`` does, for the pages it starts); a test that leaves it changed sends every
    later test of its worker process to that folder — the end-to-end file's demo run once went to
    a temporary cache instead of the checkout's, and ``make demo`` after ``make test`` built the
    demo again. (Runs after ``monkeypatch`` has undone its own changes.)"""
    before = os.environ.get("CONVERGENCE_CACHE")
    yield
    after = os.environ.get("CONVERGENCE_CACHE")
    assert after == before, (
        f"the test left CONVERGENCE_CACHE = {after!r} (it was {before!r}); set it through "
        "monkeypatch.setenv first, so that its teardown restores it"
    )


@pytest.fixture(scope="session")
def coco_mini_root() -> Path:
    """The embedded COCO-format demo set (239 images, 5 captions each)."""
    return demo_data_root()


@pytest.fixture(scope="session")
def imagenet_root() -> Path:
    """The labelled ImageNet sample set (1,000 images, labels.csv)."""
    return imagenet_samples_root()


def _write_image(
    path: Path, seed: int, size: tuple[int, int] = (48, 32), mode: str = "RGB"
) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, seed, size=(48, 32), mode="RGB") -> path``: a small random image file
    (format from the suffix), distinct for distinct seeds."""
    return _write_image


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., list[Path]]:
    """``make_images(n, folder="images", suffix=".png") -> paths`` of n distinct random images."""

    def make(n: int, folder: str = "images", suffix: str = ".png") -> list[Path]:
        return [_write_image(tmp_path / folder / f"img{i:03d}{suffix}", seed=i) for i in range(n)]

    return make


@pytest.fixture
def make_coco_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_coco_folder(captions_per_image)`` -> a COCO-format folder in tmp_path.

    ``captions_per_image`` is a list (one entry per image) of caption lists. Image ids are given
    in reverse order in the JSON so loaders must sort them.
    """

    def make(captions_per_image: Sequence[Sequence[str]], name: str = "coco") -> Path:
        root = tmp_path / name
        images, annotations = [], []
        for i, caps in enumerate(captions_per_image):
            file_name = f"{i:012d}.png"
            _write_image(root / "images" / file_name, seed=100 + i)
            images.append({"id": i + 1, "file_name": file_name})
            for j, cap in enumerate(caps):
                annotations.append({"image_id": i + 1, "id": 1000 * (i + 1) + j, "caption": cap})
        data = {"images": images[::-1], "annotations": annotations[::-1]}
        (root / "captions.json").write_text(json.dumps(data), encoding="utf-8")
        return root

    return make


@pytest.fixture
def run(_cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """For the dashboard page tests: the run "demo" in the test module's own ``_cache_dir``
    fixture (a cache folder with ``runs/demo``), with CONVERGENCE_CACHE pointing at that cache."""
    from convergence_core.run import load_run

    monkeypatch.setenv("CONVERGENCE_CACHE", str(_cache_dir))
    return load_run(_cache_dir / "runs" / "demo")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module, for the components' own code
    (tests/browser_components.py); skipped where Playwright is not installed."""
    playwright = pytest.importorskip("playwright.sync_api")
    from convergence_core.dashboard.headless import launch_chromium

    with playwright.sync_playwright() as driver:
        chromium = launch_chromium(driver)
        yield chromium
        chromium.close()
