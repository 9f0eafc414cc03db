"""Cached access to precomputed runs for the dashboard pages.

Everything heavy is computed at most once per server process and shared across sessions, so a
page switch or a second user never recomputes what the server already has:

* the list of runs (``st.cache_data``, keyed by each run's manifest time);
* the :class:`~convergence_core.run.Run` (``st.cache_resource``, keyed by run folder and the
  manifest's modification time, so a re-precomputed run is reloaded), its files checked once
  (``run_checks.check_run_files``) so a damaged run fails on opening, in words, and its
  :class:`~.catalogue.Catalogue` (ids, id → row, caption search text, rank orders);
* the neighbour indexes of the run's layers (``run.neighbours``: memory-mapped features and exact
  neighbour lists, kept by the shared Run);
* best language layers, the random baseline and the permutation test of the Alignment lab, the
  UMAP map, and every static figure (``st.cache_data``; UMAP is also written to
  ``<run>/umap.npy`` atomically). The figures are drawn for the page's theme (:func:`themed`:
  light or dark, each cached apart).

``st.cache_data`` returns each caller its own copy (small tables and PNG bytes here); objects
returned by ``st.cache_resource`` are shared by every browser session: callers must not modify
them (arrays handed out here are read-only to enforce that).
"""

from __future__ import annotations

import contextlib
import functools
import html
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import streamlit as st

from .. import residual_umap, retrieval, settings, universal
from ..cache import RunLayout, read_npy, write_npy
from ..figure_style import THEMES
from ..random_baseline import DEFAULT_INTERVAL_WIDTH
from ..stimulus_alignment import PER_STIMULUS_METRICS
from ..run import Run, RunInfo, list_runs, load_run
from ..run_checks import check_run_files
from . import charts, lab, plots, state
from .catalogue import Catalogue, build_catalogue, p_phrase

#: Command that makes the demo run; shown whenever no run is cached.
MAKE_RUN_COMMAND = "make demo"
MAKE_RUN_PYTHON = "python -m convergence_core precompute --preset demo"
UMAP_RANDOM_STATE = residual_umap.RANDOM_STATE
UMAP_MAX_FIT = residual_umap.MAX_FIT_STIMULI


def page_theme() -> str:
    """The theme the visitor's browser shows the page in: "light" or "dark" (Streamlit's
    ``st.context.theme.type``), "light" when unknown (outside a session's script, e.g. the
    server's warm-up). Right on a session's first run; a theme switched in the settings menu
    reruns nothing, so the pictures follow it at the session's next rerun (any widget)."""
    kind = st.context.theme.type
    return kind if kind in THEMES else "light"


def themed(cached: Callable[..., Any]) -> Callable[..., Any]:
    """The figure function ``cached`` (``st.cache_data``, with a keyword ``theme``) drawn for
    the page's theme (:func:`page_theme`) unless the caller names one (``theme=``): each theme
    is drawn and cached apart. The pages call it as before; ``clear()`` clears ``cached``."""

    @functools.wraps(cached)
    def drawn(*args: Any, theme: str | None = None, **kwargs: Any) -> Any:
        return cached(*args, theme=theme or page_theme(), **kwargs)

    drawn.clear = cached.clear  # type: ignore[attr-defined]
    return drawn


def _runs_signature(root: Path) -> tuple[tuple[str, int], ...]:
    """(folder name, manifest mtime) of every folder under ``root`` that has a manifest."""
    if not root.is_dir():
        return ()
    signature = []
    for folder in sorted(root.iterdir()):
        try:
            signature.append((folder.name, (folder / "manifest.json").stat().st_mtime_ns))
        except OSError:  # not a run (no manifest), or it vanished meanwhile
            continue
    return tuple(signature)


def complete_runs(root: str | Path) -> list[RunInfo]:
    """The complete runs under ``root`` (a cache's ``runs/``), newest first, read now."""
    return [info for info in list_runs(root) if info.summary.complete]


@st.cache_data(show_spinner=False, max_entries=8)
def _listed_runs(root: str, signature: tuple[tuple[str, int], ...]) -> list[RunInfo]:
    return list_runs(root)


def available_runs() -> list[RunInfo]:
    """Complete runs under ``settings.runs_root()`` (``$CONVERGENCE_CACHE/runs``), newest first.

    Read again only when a manifest changes (a stat per run folder, not a parse, per rerun).
    """
    root = settings.runs_root()
    listed = _listed_runs(str(root), _runs_signature(root))
    return [info for info in listed if info.summary.complete]


def unfinished_run_names() -> list[str]:
    """Runs under ``settings.runs_root()`` whose precompute has not finished (still running, or
    stopped before the end), newest first: a link to one says so instead of "not a run"."""
    root = settings.runs_root()
    listed = _listed_runs(str(root), _runs_signature(root))
    return [info.name for info in listed
            if info.damaged is None and not info.summary.complete]


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


@st.cache_resource(show_spinner="Indexing the stimuli…", max_entries=8)
def _catalogue(path: str, stamp: int) -> Catalogue:
    return build_catalogue(_open_run(path, stamp))


def catalogue(run: Run) -> Catalogue:
    """The run's :class:`~.catalogue.Catalogue`, built once per server. Shared: do not mutate."""
    return _catalogue(str(run.path), manifest_stamp(run.path))


def warm_default_run() -> Run | None:
    """Open, check and index the run a first visitor sees (:func:`default_run_name`), so that the
    first page after a server start finds it in the server's caches (Streamlit's caches are the
    process's, with or without a session). ``serve`` calls it in a background thread; a page
    that asks meanwhile waits for the same result.

    Returns the run, or None when there is no complete run. A damaged run raises here as it would
    on the page (which then shows the error in words).
    """
    runs = complete_runs(settings.runs_root())
    name = default_run_name(runs)
    if name is None:
        return None
    info = next(info for info in runs if info.name == name)
    run = open_run(info.path)
    catalogue(run)
    return run


#: The Universal space page's default number of label shuffles for its ρ's permutation test
CROSS_MODAL_PERMUTATIONS = 1000


def default_members(run: Run) -> tuple[tuple[str, str], ...]:
    """The Universal space page's default barycenter: every model of the run at its default
    layer, as (model, layer) pairs."""
    return tuple((model, run.default_layer(model)) for model in run.models)


@st.cache_data(show_spinner="Aligning the chosen models (GPA on every stimulus)…", max_entries=32)
def cross_modal(
    path: str,
    stamp: int,
    members: tuple[tuple[str, str], ...],
    score: str,
    n_permutations: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """:func:`universal.run_cross_modal_analysis` of ``members`` ((model, layer) pairs): per
    stimulus, the relation to the run's (GPA) dispersion and the per-model summary (the
    Universal space page; ``serve`` computes the default members' for the default run before
    the first visit)."""
    analysis = universal.run_cross_modal_analysis(
        open_run(Path(path)),
        [model for model, _ in members],
        layers=dict(members),
        score=score,
        n_permutations=n_permutations,
        seed=seed,
    )
    mark_finished("cross_modal", path, stamp, members, score, n_permutations, seed)
    return analysis.per_stimulus(), analysis.relation, analysis.model_summary()


@st.cache_data(
    show_spinner="Held-out retrieval: fitting the space on each training split…", max_entries=32
)
def cross_modal_retrieval(
    path: str,
    stamp: int,
    members: tuple[tuple[str, str], ...],
    score: str,
    n_folds: int,
    seed: int,
    similarity: str,
) -> retrieval.CrossValidatedRetrieval:
    """:func:`retrieval.run_retrieval` of ``members`` (the Universal space page)."""
    result = retrieval.run_retrieval(
        open_run(Path(path)),
        [model for model, _ in members],
        layers=dict(members),
        score=score,
        n_folds=n_folds,
        seed=seed,
        similarity=similarity,
    )
    mark_finished("cross_modal_retrieval", path, stamp, members, score, n_folds, seed, similarity)
    return result


@themed
@st.cache_data(show_spinner=False, max_entries=32)
def cross_modal_pictures(
    path: str,
    stamp: int,
    members: tuple[tuple[str, str], ...],
    score: str,
    n_permutations: int,
    seed: int,
    theme: str = "light",
) -> tuple[bytes, bytes]:
    """The cross-modal scatter and the model residual bars as pictures, drawn once per server
    and theme."""
    per_stimulus, relation, model_summary = cross_modal(
        path, stamp, members, score, n_permutations, seed
    )
    row = relation.iloc[0]
    scatter = charts.cross_modal_scatter(
        per_stimulus["intra_modal_dispersion"].to_numpy(),
        per_stimulus["cross_modal_dispersion"].to_numpy(),
        title=f"Cross-modal vs intra-modal dispersion, {len(per_stimulus):,} stimuli — "
        f"Spearman ρ = {row['spearman_rho']:.3f}, permutation "
        f"{p_phrase(row['permutation_p_value_two_sided'], row['n_permutations'])} "
        f"({int(row['n_permutations'])} shuffles)",
        x_title=f"{open_run(Path(path)).gpa_modality} dispersion ({plots.SCORE_NAME[score]}) "
        "(residual units)",
        y_title="cross-modal dispersion (residual units)",
        theme=theme,
    )
    return scatter, charts.model_residuals(model_summary, theme=theme)


def indexes_for(run: Run, pairs: Sequence[lab.Pair]) -> dict[tuple[str, str], object]:
    """The run's neighbour index of every model/layer in ``pairs`` (shared, read-only)."""
    from ..analyses import indexes_for as compute

    return compute(run, pairs)


# one cache entry per (run, version, k) whoever asks, however k is passed (st.cache_data keyed
# (path, stamp) and (path, stamp, 10) apart: the lab and the Stimuli page computed it twice), kept
# as a resource and handed out as copies; serve fills it for the default run before the first visit.
# It is read off the cached layer sweep, which the Paper analyses page draws too: one sweep per
# run and k for every page (the Paper page used to sweep again)
@st.cache_resource(show_spinner="Finding each language model's best layer…", max_entries=32)
def _best_language_layer_table(path: str, stamp: int, k: int) -> pd.DataFrame:
    from ..analyses import best_language_layers as compute

    return compute(_open_run(path, stamp), k=k, sweep=layer_sweep(path, stamp, k))


def best_language_layer_table(path: str, stamp: int, k: int = 10) -> pd.DataFrame:
    """:func:`analyses.best_language_layers` of the run (with ``n_stimuli_used`` and
    ``sample_seed``: above ``analyses.LAYER_SWEEP_MAX_STIMULI`` a seeded sample), computed once
    per server and manifest version (at 100,000 stimuli ~5 s: the sample's rows are completed
    from the features; ``serve`` computes it for the default run before the first visit)."""
    return _best_language_layer_table(path, stamp, k).copy()


def chooses_language_layers(run: Run) -> bool:
    """Whether the run has a language model with several layers to choose from (else each is
    at its only layer, and no layer sweep runs)."""
    return any(len(run.layers(model)) > 1 for model in run.language_models)


def best_language_layers(path: str, stamp: int, k: int = 10) -> dict[str, str]:
    """``{language model: layer with the highest mean full-set CKNNA with the vision models}``."""
    table = best_language_layer_table(path, stamp, k)
    return dict(zip(table["language_model"], table["language_layer"], strict=True))


Options = tuple[tuple[str, object], ...]


def options_key(options: dict[str, object] | None) -> Options:
    """A metric's options as a hashable cache key (sorted items)."""
    return tuple(sorted((options or {}).items()))


def k_key(metric: str, k: int) -> int | None:
    """k as part of a cache key: None for feature metrics (their values do not depend on k, so
    moving k with CKA chosen recomputes nothing)."""
    from ..metrics import metric as entry

    return int(k) if entry(metric).neighbour_metric else None


@st.cache_data(show_spinner="Computing the metric on the sets…", max_entries=512)
def _set_values(  # noqa: ANN001
    path, stamp, pairs, names, rows, k, metric, options
) -> pd.DataFrame:
    run = _open_run(path, stamp)
    return lab.set_table(
        indexes_for(run, pairs), pairs, dict(zip(names, rows, strict=True)), k, metric=metric,
        options=dict(options),
    )


def set_values(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    names: tuple[str, ...],
    rows: tuple[np.ndarray, ...],
    k: int,
    metric: str = "cknna",
    options: Options = (),
) -> pd.DataFrame:
    """:func:`lab.set_table` of the sets ``names`` (stimulus rows ``rows``, same order) for
    ``metric``, cached for every session (the arrays are hashed by content; k only for neighbour
    metrics)."""
    return _set_values(path, stamp, pairs, names, rows, k_key(metric, k), metric, options)


@st.cache_data(show_spinner="Drawing the random baseline…", max_entries=256)
def _random_baseline(
    path, stamp, pairs, size, k, n_random, seed, interval_width, metric, options  # noqa: ANN001
) -> pd.DataFrame:
    run = _open_run(path, stamp)
    return lab.baseline_table(
        indexes_for(run, pairs), pairs, run.n_stimuli, size, k, metric=metric,
        options=dict(options), n_random=n_random, seed=seed, interval_width=interval_width,
    )


def random_baseline(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    size: int,
    k: int,
    n_random: int,
    seed: int,
    interval_width: float | None = DEFAULT_INTERVAL_WIDTH,
    metric: str = "cknna",
    options: Options = (),
) -> pd.DataFrame:
    """:func:`lab.baseline_table` for a run, cached per (pairs, size, k, n_random, seed, width,
    metric, options).

    ``n_random`` is the most random sets drawn; with ``interval_width`` the drawing stops once
    every pair's 95% interval of the mean metric is that narrow (None: exactly ``n_random``).
    """
    return _random_baseline(
        path, stamp, pairs, int(size), k_key(metric, k), int(n_random), int(seed),
        interval_width, metric, options,
    )


def lab_numbers(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    names: tuple[str, ...],
    rows: tuple[np.ndarray, ...],
    k: int,
    n_random: int,
    seed: int,
    interval_width: float | None,
    metric: str,
    options: Options,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[pd.DataFrame, dict[int, pd.DataFrame]]:
    """The sets' values and the random baselines (one per set size) of a metric the lab computes
    only when asked (:func:`lab.needs_button`), reporting ``progress(fraction, words)``.

    Not an ``st.cache_data`` function (progress is drawn while it runs): the result is kept for
    every session with :func:`keep` under :func:`lab_numbers_key`.
    """
    run = _open_run(path, stamp)
    indexes = indexes_for(run, pairs)
    k_used = k_key(metric, k)
    sizes = sorted({len(r) for r in rows})
    steps = 1 + len(sizes)
    label = lab.metric_label(metric)
    if progress is not None:
        progress(0.0, f"{label} of the sets…")
    values = lab.set_table(indexes, pairs, dict(zip(names, rows, strict=True)), k_used,
                           metric=metric, options=dict(options))
    baselines = {}
    for step, size in enumerate(sizes, start=1):

        def report(drawn: int, most: int, step: int = step, size: int = size) -> None:
            if progress is not None:
                progress((step + drawn / most) / steps,
                         f"{label} of random sets of {size}: {drawn} of at most {most} drawn…")

        report(0, max(1, int(n_random)))
        baselines[size] = lab.baseline_table(
            indexes, pairs, run.n_stimuli, size, k_used, metric=metric, options=dict(options),
            n_random=int(n_random), seed=int(seed), interval_width=interval_width,
            progress=report,
        )
    if progress is not None:
        progress(1.0, "done")
    return values, baselines


def rows_key(sets: Iterable[object]) -> tuple[tuple[int, ...], ...]:
    """Sets of stimulus rows (arrays or sequences of ints) as a hashable key."""
    return tuple(tuple(map(int, np.asarray(rows).ravel())) for rows in sets)


def lab_numbers_key(*parameters: object) -> tuple:
    """The :func:`keep` key of :func:`lab_numbers`' result for these parameters (arrays of rows
    as tuples; the caller passes k as :func:`k_key`)."""
    return ("lab_numbers", *(
        rows_key([p])[0] if isinstance(p, np.ndarray) else p for p in parameters
    ))


@st.cache_data(show_spinner="Running the permutation test…", max_entries=256)
def _low_high_permutation(
    path, stamp, pairs, low, high, k, n_permutations, seed, metric, options  # noqa: ANN001
) -> pd.DataFrame:
    run = _open_run(path, stamp)
    return lab.low_high_permutation_table(
        indexes_for(run, pairs), pairs, np.array(low), np.array(high), k, metric=metric,
        options=dict(options), n_permutations=n_permutations, seed=seed,
    )


def low_high_permutation(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    low: tuple[int, ...],
    high: tuple[int, ...],
    k: int,
    n_permutations: int,
    seed: int,
    metric: str = "cknna",
    options: Options = (),
) -> pd.DataFrame:
    """:func:`lab.low_high_permutation_table` for a run, cached per (pairs, sets, k, seed,
    metric, options)."""
    return _low_high_permutation(
        path, stamp, pairs, low, high, k_key(metric, k), int(n_permutations), int(seed), metric,
        options,
    )


class Calibration(NamedTuple):
    """The lab's calibrated scores (:func:`lab.calibration_table`), the low-vs-high matched
    comparison (:func:`lab.low_high_matched_table`) and its one-line verdict."""

    table: pd.DataFrame
    low_high: pd.DataFrame
    verdict: str
    note: str


def _calibration_of(
    path, stamp, pairs, names, rows, k, metric, options, n_shuffles, n_matched, seed,  # noqa: ANN001
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    run = _open_run(path, stamp)
    indexes = indexes_for(run, pairs)
    labels = run.stimuli["label"] if "label" in run.stimuli else None
    # typicality at the analysis k, as the report (k is None for a feature metric: the default)
    from ..analyses import typicality_k

    typical_k = typicality_k(run, 10 if k is None else int(k))
    covariates = lab.matching_covariates(run, labels, k=typical_k)
    table, comparisons = lab.calibration_table(
        indexes, pairs, dict(zip(names, rows, strict=True)), k, covariates, metric=metric,
        options=dict(options), n_shuffles=n_shuffles, n_matched=n_matched, seed=seed,
        progress=progress,
    )
    low_high = lab.low_high_matched_table(pairs, comparisons)
    return Calibration(
        table, low_high, lab.matched_verdict(low_high, metric, covariates.matched_on),
        covariates.note,
    )


@st.cache_data(
    show_spinner="Shuffling pairings and drawing matched random sets…", max_entries=64
)
def _calibration(
    path, stamp, pairs, names, rows, k, metric, options, n_shuffles, n_matched, seed  # noqa: ANN001
) -> Calibration:
    return _calibration_of(path, stamp, pairs, names, rows, k, metric, options, n_shuffles,
                           n_matched, seed)


def calibration(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    names: tuple[str, ...],
    rows: tuple[np.ndarray, ...],
    k: int,
    metric: str = "cknna",
    options: Options = (),
    n_shuffles: int = 200,
    n_matched: int = 200,
    seed: int = 0,
) -> Calibration:
    """:class:`Calibration` of the named sets, cached per run and parameters."""
    return _calibration(path, stamp, pairs, names, rows, k_key(metric, k), metric, options,
                        int(n_shuffles), int(n_matched), int(seed))


def calibration_key(*parameters: object) -> tuple:
    """The :func:`keep` key of :func:`calibration_with_progress`' result for the arguments of
    :func:`calibration` (arrays of rows as tuples; k left out for feature metrics)."""
    path, stamp, pairs, names, rows, k, metric, *rest = parameters
    return ("calibration", path, stamp, pairs, names, rows_key(rows), k_key(metric, k), metric,
            *rest)


def calibration_with_progress(
    path: str,
    stamp: int,
    pairs: tuple[lab.Pair, ...],
    names: tuple[str, ...],
    rows: tuple[np.ndarray, ...],
    k: int,
    metric: str,
    options: Options,
    n_shuffles: int,
    n_matched: int,
    seed: int,
    progress: Callable[[float, str], None],
) -> Calibration:
    """:func:`calibration` for a metric the lab computes only when asked (a feature metric on a
    large run: minutes), reporting ``progress(fraction, words)``. Not an ``st.cache_data``
    function (progress is drawn while it runs): kept for every session with :func:`keep` under
    :func:`calibration_key`."""
    key = calibration_key(path, stamp, pairs, names, rows, k, metric, options, n_shuffles,
                          n_matched, seed)
    found = kept(key)
    if found is not None:
        return found

    def tell(done: int, total: int) -> None:
        progress(min(1.0, done / total),
                 f"{done:,} of {total:,} sets, matched sets and shuffled pairings scored…")

    result = _calibration_of(path, stamp, pairs, names, rows, k_key(metric, k), metric, options,
                             int(n_shuffles), int(n_matched), int(seed), progress=tell)
    keep(key, result)
    return result


# ----------------------------------------------------------------------------------------------
# per-stimulus alignment (issue 14, item 2)

#: Above this many stimuli per-stimulus alignment (local CKA: O(n·d²) per pair) is computed when
#: asked (a button with progress), once for every session of the server
PER_STIMULUS_LIVE_STIMULI = 20_000
#: The fewest stimuli per-stimulus alignment needs: local CKA measures each stimulus against
#: a base of at least 4 others (``stimulus_alignment.local_cka``)
PER_STIMULUS_MIN_STIMULI = 5
#: Permutations of the Spearman test of per-stimulus alignment against dispersion
RELATION_PERMUTATIONS = 1000


def _per_stimulus_of(path: str, stamp: int, pair: lab.Pair, metric: str, k: int | None,
                     ) -> pd.DataFrame:
    from ..stimulus_alignment import per_stimulus_alignment

    return per_stimulus_alignment(_open_run(path, stamp), [pair], k=k or 10, metrics=[metric])


_per_stimulus = st.cache_data(
    _per_stimulus_of, show_spinner="Computing per-stimulus alignment…", max_entries=128
)


def _per_stimulus_key(path: str, stamp: int, pair: lab.Pair, metric: str, k: int) -> tuple:
    return ("per_stimulus", path, stamp, pair, metric, int(k) if metric == "knn_overlap" else None)


def per_stimulus(path: str, stamp: int, pair: lab.Pair, metric: str, k: int) -> pd.DataFrame:
    """:func:`stimulus_alignment.per_stimulus_alignment` of one pair and metric (``knn_overlap``
    at k, or ``local_cka``), long format, cached per run, pair and metric; above
    :data:`PER_STIMULUS_LIVE_STIMULI` stimuli (computed behind a button) kept with :func:`keep`,
    whose entry is also what :func:`per_stimulus_ready` looks for: the mark and the result go
    together (a mark that outlived its result started minutes of work without the button)."""
    key = _per_stimulus_key(path, stamp, pair, metric, k)
    if _open_run(path, stamp).n_stimuli <= PER_STIMULUS_LIVE_STIMULI:
        return _per_stimulus(*key[1:])
    table = kept(key)
    if table is None:
        table = _per_stimulus_of(*key[1:])
        keep(key, table)
    return table


def per_stimulus_ready(path: str, stamp: int, n: int, pairs: Sequence[lab.Pair], k: int) -> bool:
    """Whether per-stimulus alignment of ``pairs`` can be shown at once: a run of at most
    :data:`PER_STIMULUS_LIVE_STIMULI` stimuli, or computed on this server and still kept."""
    return n <= PER_STIMULUS_LIVE_STIMULI or all(
        kept(_per_stimulus_key(path, stamp, pair, metric, k)) is not None
        for pair in pairs
        for metric in PER_STIMULUS_METRICS
    )


def per_stimulus_table(
    path: str,
    stamp: int,
    pairs: Sequence[lab.Pair],
    k: int,
    progress: Callable[[float, str], None] | None = None,
) -> pd.DataFrame:
    """Both per-stimulus scores of every pair (each pair × metric cached on its own), with
    ``progress(fraction, words)`` between them."""
    parts = []
    steps = [(pair, metric) for pair in pairs for metric in PER_STIMULUS_METRICS]
    for step, (pair, metric) in enumerate(steps):
        if progress is not None:
            progress(step / len(steps), f"{metric} of {pair.label}…")
        parts.append(per_stimulus(path, stamp, pair, metric, k))
    if progress is not None:
        progress(1.0, "done")
    return pd.concat(parts, ignore_index=True)


@st.cache_data(show_spinner="Relating per-stimulus alignment to dispersion…", max_entries=128)
def alignment_relation(
    path: str, stamp: int, pairs: tuple[lab.Pair, ...], k: int, score: str
) -> pd.DataFrame:
    """:func:`stimulus_alignment.alignment_dispersion_relation` (Spearman ρ, permutation p) of
    every pair × per-stimulus metric against the dispersion ``score``."""
    from ..stimulus_alignment import alignment_dispersion_relation

    table = per_stimulus_table(path, stamp, pairs, k)
    dispersion = _open_run(path, stamp).dispersion[score].to_numpy(dtype=np.float64)
    return alignment_dispersion_relation(
        table, dispersion, score=score, n_permutations=RELATION_PERMUTATIONS, seed=0
    )


@themed
@st.cache_data(show_spinner="Drawing per-stimulus alignment…", max_entries=64)
def alignment_scatter_png(
    path: str,
    stamp: int,
    pair: lab.Pair,
    k: int,
    score: str,
    marked: tuple[int, ...] = (),
    marked_label: str = "focus set",
    theme: str = "light",
) -> bytes:
    """Per-stimulus alignment of ``pair`` against dispersion (a panel per metric, ρ and p in
    each title), the ``marked`` rows circled (named ``marked_label`` in the legend)."""
    table = per_stimulus_table(path, stamp, [pair], k)
    relation = alignment_relation(path, stamp, (pair,), k, score)
    found = _catalogue(path, stamp)
    values = {
        metric: table.loc[table["metric"] == metric].sort_values("stimulus")["value"].to_numpy()
        for metric in PER_STIMULUS_METRICS
    }
    base = table.loc[table["metric"] == "local_cka", "base_size"]
    return charts.alignment_dispersion(
        found.values[score], values, relation, score=score, k=int(k), title=pair.label,
        base_size=int(base.iloc[0]) if len(base) else None, marked=marked,
        marked_label=marked_label, theme=theme,
    )


class Ranking(NamedTuple):
    """Stimuli ordered by one per-stimulus score: ``values`` (n,), ``order`` (n,) rows from the
    lowest value (ties: lower row), ``rank`` (n,) each row's position in ``order``."""

    values: np.ndarray
    order: np.ndarray
    rank: np.ndarray


@st.cache_data(show_spinner=False, max_entries=64)
def alignment_ranking(path: str, stamp: int, pair: lab.Pair, metric: str, k: int) -> Ranking:
    """The gallery's order by per-stimulus ``metric`` of ``pair``."""
    table = per_stimulus(path, stamp, pair, metric, k)
    values = table.sort_values("stimulus")["value"].to_numpy(dtype=np.float64)
    order = np.argsort(values, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return Ranking(values, order, rank)


def compute_umap(residuals: np.ndarray, random_state: int = UMAP_RANDOM_STATE) -> np.ndarray:
    """(m, 2) float64 UMAP of the (m, M) residual matrix (:func:`residual_umap.residual_map`:
    fitted on a sample of :data:`UMAP_MAX_FIT` above that many stimuli)."""
    return residual_umap.residual_map(residuals, random_state=random_state).coordinates


#: What the page says while UMAP runs: measured on the demo's 239 stimuli here, the first UMAP
#: of a server process took 18.6 s (umap-learn's numba code compiles) and 48 s after an install
#: (nothing compiled yet); later ones take well under a second
UMAP_SPINNER = (
    "Computing the UMAP view, once per run (then cached). The first UMAP of a server process "
    "compiles umap-learn's code: about 20 s, up to a minute after an install…"
)


@st.cache_data(show_spinner=UMAP_SPINNER, max_entries=16)
def umap_coordinates(path: str, stamp: int) -> np.ndarray:
    """(m, 2) UMAP of the run's residuals: from ``<run>/umap.npy``, else computed and written
    (where the run folder cannot be written, e.g. a shared read-only cache, the coordinates are
    still shown, and kept in this server's memory)."""
    run = _open_run(path, stamp)
    m = run.gpa.residuals.shape[0]
    file = RunLayout(Path(path)).umap
    if file.is_file() and file.stat().st_mtime_ns >= stamp:
        cached = read_npy(file)
        if cached.shape == (m, 2) and np.isfinite(cached).all():
            return cached.astype(np.float64)
    coordinates = compute_umap(run.gpa.residuals)
    with contextlib.suppress(OSError):  # the page said "UMAP could not be computed" here
        write_npy(file, coordinates)
    return coordinates


# ----------------------------------------------------------------------------------------------
# static figures (PNG bytes, charts.py), cached across sessions


@themed
@st.cache_data(show_spinner=False, max_entries=32)
def dispersion_histograms_png(path: str, stamp: int, theme: str = "light") -> bytes:
    """Home's histograms of the run's two dispersion scores."""
    found = _catalogue(path, stamp)
    title = (
        f"Dispersion of {found.n:,} stimuli — the two scores correlate: "
        f"Pearson r = {found.pearson:.3f}, Spearman ρ = {found.spearman:.3f}"
    )
    return charts.dispersion_histograms(found.values, title, theme=theme)


class ResidualMap(NamedTuple):
    """The Residual space map of a run: coordinates (n,) each and the chart's titles."""

    x: np.ndarray
    y: np.ndarray
    x_title: str
    y_title: str
    title: str


def residual_map(run: Run, projection: str) -> ResidualMap:
    """PCA (PC1, PC2 of the residuals) or UMAP (:func:`umap_coordinates`) map of the run.

    Raises ValueError or OSError when UMAP cannot be computed for the run.
    """
    n = run.n_stimuli
    if projection == "UMAP":
        coordinates = umap_coordinates(str(run.path), manifest_stamp(run.path))
        return ResidualMap(
            coordinates[:, 0],
            coordinates[:, 1],
            "UMAP 1 (unitless)",
            "UMAP 2 (unitless)",
            f"Residual space: {n} stimuli, UMAP of the GPA residuals "
            f"(fixed random seed {UMAP_RANDOM_STATE})",
        )
    if projection != "PCA":
        raise ValueError(f"unknown projection {projection!r}; use 'PCA' or 'UMAP'")
    ratio = np.asarray(run.pca.explained_variance_ratio, dtype=np.float64)
    scores = np.asarray(run.pca.scores, dtype=np.float64)
    return ResidualMap(
        scores[:, 0],
        scores[:, 1] if scores.shape[1] > 1 else np.zeros(n),
        f"PC1 of residuals ({100 * ratio[0]:.1f} % of variance; Procrustes distance)",
        f"PC2 of residuals ({100 * ratio[1]:.1f} % of variance; Procrustes distance)"
        if len(ratio) > 1
        else "PC2 (absent: one model)",
        f"Residual space: {n} stimuli, PCA of the GPA residuals",
    )


@themed
@st.cache_data(show_spinner="Drawing the map…", max_entries=64)
def residual_scatter_png(
    path: str,
    stamp: int,
    projection: str,
    score: str,
    selected: tuple[int, ...],
    colour_property: str = "",
    theme: str = "light",
) -> bytes:
    """The Residual space map as a picture (:func:`residual_map`), coloured by ``score`` or, when
    given, by the run's stimulus property ``colour_property``."""
    run, found = _open_run(path, stamp), _catalogue(path, stamp)
    shown = residual_map(run, projection)
    colour, title = residual_colour(run, found, score, colour_property)
    return charts.residual_scatter(
        shown.x,
        shown.y,
        colour,
        # the title is Plotly's (HTML-escaped); matplotlib draws text as is
        colour_title=html.unescape(title.replace("<br>", "\n")),
        x_title=shown.x_title,
        y_title=shown.y_title,
        title=shown.title,
        selected=selected,
        theme=theme,
    )


def residual_colour(
    run: Run, found: Catalogue, score: str, colour_property: str = ""
) -> tuple[np.ndarray, str]:
    """Colour values (n,) and their title: the dispersion ``score``, or a stimulus property of the
    run's property table (``predictor_plots.property_colour``) when one is named."""
    table = run.properties if colour_property else None
    if table is not None and colour_property in table.names:
        from .predictor_plots import property_colour

        return property_colour(table, colour_property)
    return found.values[score], plots.COLOUR_TITLE[score]


@themed
@st.cache_data(show_spinner=False, max_entries=16)
def residual_components_png(path: str, stamp: int, theme: str = "light") -> bytes:
    """Variance explained and per-model loadings of the residuals' principal components."""
    run = _open_run(path, stamp)
    return charts.residual_components(
        run.pca.explained_variance_ratio, np.asarray(run.pca.components), run.gpa.models,
        run.gpa_modality, theme=theme,
    )


@st.cache_data(show_spinner=False, max_entries=16)
def gpa_rank_intervals(path: str, stamp: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(rank_low, rank_high), each (n,) int64, of the mean residual over the run's stored GPA
    stability solutions (0 = least dispersed), or None when the run has no diagnostic."""
    stability = _open_run(path, stamp).gpa_stability
    if stability is None:
        return None
    return tuple(  # type: ignore[return-value]
        stability.per_stimulus(name).astype(np.int64) for name in ("rank_low", "rank_high")
    )


@themed
@st.cache_data(show_spinner=False, max_entries=256)
def residual_bars_png(path: str, stamp: int, row: int, theme: str = "light") -> bytes:
    """One stimulus's residual per GPA model beside each model's median."""
    run, found = _open_run(path, stamp), _catalogue(path, stamp)
    residuals = np.asarray(run.gpa.residuals[row], dtype=np.float64)
    return charts.residual_bars(run.gpa.models, residuals, found.residual_median, found.ids[row],
                                run.gpa_modality, theme=theme)


@themed
@st.cache_data(show_spinner=False, max_entries=512)
def alignment_bars_svg(
    sets: pd.DataFrame,
    baseline: pd.DataFrame,
    metric: str,
    modalities: tuple[str, str] = ("vision", "language"),
    matched: pd.DataFrame | None = None,
    theme: str = "light",
) -> str:
    """The Alignment lab's bars (:func:`charts.alignment_bars`, SVG), cached per table contents
    and theme."""
    return charts.alignment_bars(sets, baseline, metric, modalities, matched, theme)


@themed
@st.cache_data(show_spinner=False, max_entries=128)
def paper_figure_png(
    name: str, *tables: pd.DataFrame, theme: str = "light", **options: Any
) -> bytes:
    """One of the report's figures (``convergence_core.figures.<name>_figure``, keyword
    ``options`` passed on) as PNG bytes, drawn for ``theme``."""
    from .. import figures

    allowed = ("dispersion_sets", "drop_fraction", "leave_one_out", "layer_sweep")
    if name not in allowed:
        raise ValueError(f"unknown paper figure {name!r}; use one of {list(allowed)}")
    return charts.paper_figure(
        getattr(figures, f"{name}_figure"), *tables, theme=theme, **options
    )


# ----------------------------------------------------------------------------------------------
# the paper's analyses (Paper analyses page), cached per run and parameters


@st.cache_data(show_spinner="Sweeping language layers…", max_entries=32)
def layer_sweep(path: str, stamp: int, k: int) -> pd.DataFrame:
    """:func:`analyses.layer_sweep` of the run (a seeded sample above 4,096 stimuli)."""
    from .. import analyses

    return analyses.layer_sweep(_open_run(path, stamp), k=k)


def best_layers_table(path: str, stamp: int, k: int) -> pd.DataFrame:
    """:func:`best_language_layer_table` (read off the cached :func:`layer_sweep`)."""
    return best_language_layer_table(path, stamp, k)


def _paper_pairs(run: Run, path: str, stamp: int, k: int, partners: str) -> dict[str, Any]:
    """The pairs of Fig. 2 and S1 as keyword arguments: for ``partners="language"`` the best
    language layers (the cached :func:`best_layers_table`), for ``"other"`` (or on a run without
    language models) ``analyses.partner_pairs`` (see ``analyses.partner_groups``)."""
    from .. import analyses

    if partners not in ("language", "other"):
        raise ValueError(f"partners must be 'language' or 'other', got {partners!r}")
    if partners == "language" and run.language_models:
        return {"best_layers": best_layers_table(path, stamp, k)}
    return {"pairs": analyses.partner_pairs(run)}


#: The Paper analyses page's Fig. 2: random sets per pair unless the user asks for more
PAPER_RANDOM_SETS = 200
#: Above this many stimuli the Paper analyses page's Fig. 2 and Fig. S2 wait for a button (they
#: take minutes there)
PAPER_AUTO_COMPUTE_STIMULI = 5_000
#: Above this set size × k Fig. 2 waits for a button too: its time grows with both (on the demo,
#: 2 cores: 59 × 10 took 0.8 s, 100 × 90 took 22 s and a new k also finds the best layers again)
PAPER_AUTO_COMPUTE_SET_WORK = 3_000


def default_dispersion_sets(run: Run) -> dict[str, Any] | None:
    """What the Paper analyses page computes on a first visit (Fig. 2, every control at its
    default): the keyword arguments of :func:`dispersion_sets` after ``path`` and ``stamp``.
    None where that visit computes nothing: a run too small for the sets, one where Fig. 2 waits
    for a button (more than :data:`PAPER_AUTO_COMPUTE_STIMULI` stimuli, or set size × k above
    :data:`PAPER_AUTO_COMPUTE_SET_WORK`), or one with neither language models nor models outside
    GPA. ``serve`` computes it for the default run before the first visit."""
    from .. import analyses

    n = run.n_stimuli
    if n // 2 < state.MIN_SUBSET_SIZE or n > PAPER_AUTO_COMPUTE_STIMULI:
        return None
    size = state.subset_size(None, n)
    k = min(max(state.MIN_K, state.DEFAULT_K), size - 1)  # as the page bounds the view's k
    if size * k > PAPER_AUTO_COMPUTE_SET_WORK:
        return None
    if not run.language_models and not analyses.partner_pairs(run):
        return None
    return {
        "size": size,
        "k": k,
        "score": state.DEFAULT_SCORE,
        "n_random": PAPER_RANDOM_SETS,
        "n_permutations": analyses.DEFAULT_N_PERMUTATIONS,
        "seed": 0,
        "partners": next(iter(analyses.partner_groups(run)), "language"),
    }


def dispersion_sets_picture(
    run: Run, sets: pd.DataFrame, size: int, partners: str
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The table and keyword options of Fig. 2's picture (:func:`paper_figure_png`) of ``sets``
    (:func:`dispersion_sets` of sets of ``size`` stimuli), as the Paper analyses page draws it
    and the server's warm-up draws it first (the call is the cache key): the partner side named
    for the models outside GPA unless the pairs are the language models, and where
    ``analyses.cknna_shown`` hides the sets' CKNNA (sets under 24 stimuli), the table without it
    and the sentence said in place of the bars (``analyses.cknna_bars_note``)."""
    from .. import analyses
    from ..validation import MIN_CKNNA_SET_SIZE

    options = {} if partners == "language" and run.language_models else {
        "partner": "model outside GPA"
    }
    shown, hidden = analyses.shown_set_table(sets, size, f"a set size of {MIN_CKNNA_SET_SIZE}")
    # no "hidden" key where bars are drawn: the call (the cache key) stays the warm-up's
    return shown, options if hidden is None else {**options, "hidden": hidden}


@st.cache_data(
    show_spinner="Computing the low / random / high sets and permutation tests…", max_entries=64
)
def dispersion_sets(
    path: str,
    stamp: int,
    size: int,
    k: int,
    score: str,
    n_random: int,
    n_permutations: int,
    seed: int,
    partners: str = "language",
) -> pd.DataFrame:
    """Fig. 2: :func:`analyses.dispersion_set_alignment` with the best language layers, or with
    ``partners="other"`` (and on a run without language models) the GPA models × the models
    outside GPA, ``analyses.partner_pairs``."""
    from .. import analyses

    run = _open_run(path, stamp)
    result = analyses.dispersion_set_alignment(
        run,
        size=size,
        k=k,
        score=score,
        n_random=n_random,
        seed=seed,
        n_permutations=n_permutations,
        **_paper_pairs(run, path, stamp, k, partners),
    )
    mark_finished(
        "dispersion_sets", path, stamp, size, k, score, n_random, n_permutations, seed, partners
    )
    return result


@st.cache_data(show_spinner="Dropping stimuli…", max_entries=64)
def drop_fraction(
    path: str, stamp: int, q: float, k: int, score: str, partners: str = "language"
) -> pd.DataFrame:
    """Fig. S1: :func:`analyses.drop_fraction_alignment` for the pairs of
    :func:`dispersion_sets` (the best language layers, or ``analyses.partner_pairs``)."""
    from .. import analyses

    run = _open_run(path, stamp)
    result = analyses.drop_fraction_alignment(
        run, q=q, k=k, score=score, **_paper_pairs(run, path, stamp, k, partners)
    )
    mark_finished("drop_fraction", path, stamp, q, k, score, partners)
    return result


@st.cache_data(show_spinner="Rerunning GPA without each vision model…", max_entries=16)
def leave_one_out(path: str, stamp: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. S2: :func:`analyses.leave_one_model_out` points and their statistics."""
    from .. import analyses

    points = analyses.leave_one_model_out(_open_run(path, stamp))
    mark_finished("leave_one_out", path, stamp)
    return points, analyses.leave_one_model_out_statistics(points)


#: How many "finished" marks each analysis keeps (the most recently used): half the entries of
#: the cache that holds its results, so that a mark goes before its result. A mark that
#: outlived its result started a minutes-long computation without its button; one that goes
#: first only brings the button back, whose press then finds the result cached.
FINISHED_MARKS = {
    "cross_modal": 16, "cross_modal_retrieval": 16, "dispersion_sets": 32, "drop_fraction": 32,
    "leave_one_out": 8, "lab_permutation": 128,
}
#: The same for an analysis not named in :data:`FINISHED_MARKS`
DEFAULT_FINISHED_MARKS = 8


_FINISHED_LOCK = threading.Lock()


@st.cache_resource(show_spinner=False)
def _finished() -> dict[str, OrderedDict]:
    """The analyses this server has computed (for every session), per analysis name: the hash
    of each key (not the key, which may hold every row of every set), most recent last."""
    return {}


def finished(*key: object) -> bool:
    """Whether the analysis ``(name, path, stamp, parameters…)`` has been computed here and is
    still among the last :data:`FINISHED_MARKS` of its name (a page that asks before starting a
    long computation shows a finished one at once)."""
    with _FINISHED_LOCK:
        kept_marks = _finished().get(str(key[0]), {})
        if hash(tuple(key)) not in kept_marks:
            return False
        kept_marks.move_to_end(hash(tuple(key)))  # used again, like its cached result
        return True


def mark_finished(*key: object) -> None:
    """Record that the analysis ``(name, path, stamp, parameters…)`` has been computed here (a
    page that asked before computing it shows it at once from now on, to every session); the
    least recently used mark beyond :data:`FINISHED_MARKS` of its name is forgotten."""
    name, mark = str(key[0]), hash(tuple(key))
    with _FINISHED_LOCK:
        kept_marks = _finished().setdefault(name, OrderedDict())
        kept_marks[mark] = None
        kept_marks.move_to_end(mark)
        while len(kept_marks) > FINISHED_MARKS.get(name, DEFAULT_FINISHED_MARKS):
            kept_marks.popitem(last=False)


@st.cache_resource(show_spinner=False)
def _kept() -> tuple[OrderedDict, threading.Lock]:
    """Results computed behind a button (with progress, so outside ``st.cache_data``), kept for
    every session: the most recent :data:`KEPT_RESULTS`."""
    return OrderedDict(), threading.Lock()


#: How many results computed behind a button the server keeps
KEPT_RESULTS = 32


def keep(key: tuple, value: object) -> None:
    """Keep ``value`` under ``key`` for every session (the oldest beyond :data:`KEPT_RESULTS`
    is forgotten). Shared: callers must not modify what they keep or get back."""
    store, lock = _kept()
    with lock:
        store[key] = value
        store.move_to_end(key)
        while len(store) > KEPT_RESULTS:
            store.popitem(last=False)


def kept(key: tuple) -> object | None:
    """The value :func:`keep` stored under ``key``, or None."""
    store, lock = _kept()
    with lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    return None
