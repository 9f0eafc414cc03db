"""Integrity of a run folder's files: everything a page or analysis reads, checked once.

A run folder may be damaged (a truncated or pickled array, residuals of the wrong shape or full of
NaN) or come from someone else. :func:`check_run_files` reads what the dashboard pages and the
report read and checks shapes, dtypes and finiteness, so a damaged run fails in one place, with
one :class:`~convergence_core.cache.CacheFormatError` naming the file and the fix, instead of a
traceback somewhere in a page. Costs: values are checked only where they are small (residuals,
PCA, dispersion, loss history, GPA maps and means: O(n · M + M · d²)); the per-model arrays,
memory-mapped, of which only the headers are read, by shape and dtype only, so no check reads
O(n · d) values.

Thumbnails are not checked here (one file per stimulus): the dashboard shows a placeholder for one
it cannot read (``dashboard.widgets.thumbnail_file``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .cache import CacheFormatError, RunLayout
from .dispersion import SCORES, rank_column
from .neighbour_kernels import first_invalid_list_row
from .run import Run

__all__ = ["check_run_files"]

#: How much a stored list's similarity may exceed the one before it (rounding of equal values)
_SORTED_TOLERANCE = 1e-12


def _damaged(run: Run, file: Path | str, problem: str) -> CacheFormatError:
    return CacheFormatError(
        f"{file} {problem}; the run is damaged: delete the run folder {run.path} and rerun "
        "`python -m convergence_core precompute` (the same command) to rewrite it"
    )


def _check_array(
    run: Run, file: Path, array: np.ndarray, shape: tuple[int | None, ...], *, finite: bool = True
) -> None:
    """``array`` has ``shape`` (None: any length), a real floating dtype and, with ``finite``,
    only finite values."""
    if array.ndim != len(shape) or any(
        want is not None and have != want for have, want in zip(array.shape, shape, strict=True)
    ):
        wanted = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
        raise _damaged(run, file, f"has shape {array.shape}, expected {wanted}")
    if not np.issubdtype(array.dtype, np.floating):
        raise _damaged(run, file, f"holds {array.dtype} values, expected floating point numbers")
    if finite and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise _damaged(run, file, f"holds {bad} NaN or infinite value(s) of {np.size(array)}")


def _model_arrays(run: Run) -> Iterator[tuple[str, str]]:
    """(model, layer) of every per-model embedding the run's manifest lists."""
    for model in run.models:
        for layer in run.layers(model):
            yield model, layer


def _check_lists(run: Run, model: str, layer: str) -> None:
    """The layer's neighbour lists: (n, K) int32 / float64 (``Run.neighbours`` checks that), every
    index a stimulus other than the row's own, values finite and non-increasing along rows.
    Reads O(n·K) values (12 bytes each), once per run version."""
    index = run.neighbours(model, layer)
    if index.lists is None:
        return
    indices, values = index.lists.indices, index.lists.values
    file = run.layout.neighbour_indices(*run._keys(model, layer))
    n = run.n_stimuli
    for start in range(0, n, 65536):
        # plain arrays (not memory-map objects) for the compiled loop; one pass per block
        row, problem = first_invalid_list_row(
            np.asarray(indices[start : start + 65536]),
            np.asarray(values[start : start + 65536]),
            start, n, _SORTED_TOLERANCE,
        )
        if problem == 1:
            raise _damaged(run, file, f"lists indices outside 0..n-1 or a stimulus as its own "
                           f"neighbour (row {start + row})")
        if problem == 2:
            raise _damaged(run, file.with_name(file.name.replace(".indices", ".values")),
                           f"holds non-finite or unsorted similarities (row {start + row})")


def check_run_files(run: Run) -> None:
    """Check every file of ``run`` that the pages and the report read.

    GPA: residuals (n, M) with M = the GPA's models, consensus (n, p), aligned (M, n, p), loss
    history (iterations,), all finite. Dispersion: finite ``mean`` / ``pc1``, ranks a permutation
    of 0..n-1. PCA: scores (n, M), components (M, M), explained variance (+ ratio) and mean (M,),
    finite. Every embedding: readable without pickle, (n, d) floating point; every neighbour list:
(n, K), indices in range and never the row itself, similarities finite and sorted.

    Raises:
        CacheFormatError (a ValueError): the first damaged file, what is wrong, and the fix.
    """
    n = run.n_stimuli
    layout: RunLayout = run.layout
    gpa = run.gpa
    m = len(gpa.models)
    if m < 2 or len(gpa.layers) != m:
        raise _damaged(run, layout.gpa_json, f"names {m} models and {len(gpa.layers)} layers")
    _check_array(run, layout.gpa_array("residuals"), np.asarray(gpa.residuals), (n, m))
    _check_array(run, layout.gpa_array("scales"), np.asarray(gpa.scales), (m,))
    for i, (rotation, mean) in enumerate(zip(gpa.maps, gpa.means, strict=True)):
        width = np.shape(gpa.inputs[i])[1]
        _check_array(run, layout.gpa_model_array("map", i), np.asarray(rotation), (width, None))
        _check_array(run, layout.gpa_model_array("mean", i), np.asarray(mean), (width,))
    _check_array(run, layout.gpa_array("loss_history"), np.asarray(gpa.loss_history), (None,))
    stability = run.gpa_stability  # None, or read and checked against the run (CacheFormatError)
    if stability is not None:
        for name in ("rank_low", "rank_high"):
            ranks = stability.per_stimulus(name)
            if not (np.isfinite(ranks).all() and ranks.min() >= 0 and ranks.max() < n):
                raise _damaged(run, layout.gpa_stability_table, f"holds {name} outside 0..{n - 1}")

    dispersion = run.dispersion
    for column in SCORES:
        values = dispersion[column].to_numpy()
        if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
            raise _damaged(run, layout.dispersion, f"has non-finite or non-numeric {column!r}")
    for column in map(rank_column, SCORES):
        ranks = dispersion[column].to_numpy()
        if not np.issubdtype(ranks.dtype, np.integer) or not np.array_equal(
            np.sort(ranks), np.arange(n)
        ):
            raise _damaged(run, layout.dispersion, f"has {column!r} that is not a ranking 0..n-1")

    pca = run.pca
    for name, shape in (
        ("scores", (n, m)),
        ("components", (m, m)),
        ("explained_variance", (m,)),
        ("explained_variance_ratio", (m,)),
        ("mean", (m,)),
    ):
        _check_array(run, layout.pca_array(name), np.asarray(getattr(pca, name)), shape)

    for model, layer in _model_arrays(run):
        array = run.embeddings[model][layer]
        file = layout.embedding(*run._keys(model, layer))
        _check_array(run, file, array, (n, None), finite=False)
        _check_lists(run, model, layer)
