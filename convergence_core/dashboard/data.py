"""Cached access to precomputed runs for the dashboard pages.

Everything heavy is computed at most once per server process and shared across sessions:

* the :class:`~convergence_core.run.Run` (``st.cache_resource``, keyed by run folder and the
  manifest's modification time, so a re-precomputed run is reloaded), its files checked once
  (``run_checks.check_run_files``) so a damaged run fails on opening, in words;
* the neighbour indexes of the run's layers (``run.neighbours``: memory-mapped features and exact
  neighbour lists, kept by the shared Run);
* best language layers, the random baseline and the permutation test of the Alignment lab, and the
  UMAP embedding (``st.cache_data``; UMAP is also written to ``<run>/umap.npy`` atomically).

Objects returned by ``st.cache_resource`` are shared by every browser session: callers must not
modify them (copy first). Arrays handed out here are marked read-only to enforce that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from .. import settings
from ..cache import RunLayout, read_npy, write_npy
from ..run import Run, RunInfo, list_runs, load_run
from ..run_checks import check_run_files
from . import lab

#: Command that makes the demo run; shown whenever no run is cached.
MAKE_RUN_COMMAND = "make demo"
MAKE_RUN_PYTHON = "python -m convergence_core precompute --preset demo"
UMAP_RANDOM_STATE = 0
UMAP_NEIGHBOURS = 15


def available_runs() -> list[RunInfo]:
    """Complete runs under ``settings.runs_root()`` (``$CONVERGENCE_CACHE/runs``), newest first."""
    return [info for info in list_runs(settings.runs_root()) if info.summary.get("complete")]


def default_run_name(runs: Sequence[RunInfo]) -> str | None:
    """The newest run named ``demo`` (or ``demo-…``), else the newest run; None when there is none.

    ``runs`` must be newest first (as :func:`available_runs` returns them).
    """
    for info in runs:
        if info.name == "demo" or info.name.startswith("demo-"):
            return info.name
    return runs[0].name if runs else None


def manifest_stamp(path: Path) -> int:
    """Modification time (ns) of a run's manifest: part of every cache key of that run."""
    return RunLayout(path).manifest.stat().st_mtime_ns


@st.cache_resource(show_spinner="Opening the run…", max_entries=8)
def _open_run(path: str, stamp: int) -> Run:
    run = load_run(path)
    check_run_files(run)  # a damaged file fails here, once, with the fix (never mid-page)
    return run


def open_run(path: Path) -> Run:
    """The run at ``path``, loaded and checked (``run_checks.check_run_files``) once per server
    and manifest version. Shared: do not mutate.

    Raises:
        CacheFormatError (a ValueError) / OSError: a missing or damaged run file, with the fix.
    """
    return _open_run(str(path), manifest_stamp(path))


def indexes_for(run: Run, pairs: Sequence[lab.Pair]) -> dict[tuple[str, str], object]:
    """The run's neighbour index of every model/layer in ``pairs`` (shared, read-only)."""
    from ..analyses import indexes_for as compute

    return compute(run, pairs)


@st.cache_data(show_spinner="Finding each language model's best layer…", max_entries=32)
def best_language_layers(path: str, stamp: int, k: int = 10) -> dict[str, str]:
    """``{language model: layer with the highest mean full-set CKNNA with the vision models}``."""
    from ..analyses import best_language_layers as compute

    table = compute(_open_run(path, stamp), k=k)
    return dict(zip(table["language_model"], table["language_layer"], strict=True))


@st.cache_data(show_spinner="Drawing the random baseline…", max_entries=256)
def random_baseline(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    score: str,
    size: int,
    k: int,
    n_random: int,
    seed: int,
) -> pd.DataFrame:
    """:func:`lab.baseline_table` for a run, cached per (pairs, size, k, n_random, seed)."""
    run = _open_run(path, stamp)
    scores = run.dispersion[score].to_numpy(dtype=np.float64)
    return lab.baseline_table(
        indexes_for(run, pairs), pairs, scores, size, k, n_random=n_random, seed=seed
    )


@st.cache_data(show_spinner="Running the permutation test…", max_entries=256)
def low_high_permutation(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    low: tuple[int, ...],
    high: tuple[int, ...],
    k: int,
    n_permutations: int,
    seed: int,
) -> pd.DataFrame:
    """:func:`lab.low_high_permutation_table` for a run, cached per (pairs, sets, k, seed)."""
    run = _open_run(path, stamp)
    return lab.low_high_permutation_table(
        indexes_for(run, pairs),
        pairs,
        np.array(low),
        np.array(high),
        k,
        n_permutations=n_permutations,
        seed=seed,
    )


def compute_umap(residuals: np.ndarray, random_state: int = UMAP_RANDOM_STATE) -> np.ndarray:
    """(m, 2) float64 UMAP embedding of the (m, M) residual matrix (Euclidean, fixed seed)."""
    import umap  # imported here: it compiles with numba on first use, which takes seconds

    m = residuals.shape[0]
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(UMAP_NEIGHBOURS, max(2, m - 1)),
        random_state=random_state,
        n_jobs=1,  # a fixed random_state forces one thread anyway; saying so silences a warning
        init="spectral" if m > 10 else "random",
    )
    return np.asarray(
        reducer.fit_transform(np.asarray(residuals, dtype=np.float64)), dtype=np.float64
    )


@st.cache_data(show_spinner="Computing the UMAP view (once per run)…", max_entries=16)
def umap_coordinates(path: str, stamp: int) -> np.ndarray:
    """(m, 2) UMAP of the run's residuals: from ``<run>/umap.npy``, else computed and written."""
    run = _open_run(path, stamp)
    m = run.gpa.residuals.shape[0]
    file = RunLayout(Path(path)).umap
    if file.is_file() and file.stat().st_mtime_ns >= stamp:
        cached = read_npy(file)
        if cached.shape == (m, 2) and np.isfinite(cached).all():
            return cached.astype(np.float64)
    coordinates = compute_umap(run.gpa.residuals)
    write_npy(file, coordinates)
    return coordinates
