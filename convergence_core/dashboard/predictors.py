"""Cached results of :mod:`convergence_core.dispersion_predictors` for the "What predicts
dispersion" page (``st.cache_data``, keyed by run folder and manifest stamp like
:mod:`.data`)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from .. import dispersion_predictors as dp
from ..properties import PropertyTable
from ..run import Run
from . import charts
from .data import _open_run, themed

#: Permutations per rank test on the page (as the report: q-values down to ~1e-3 with ~30
#: properties).
PAGE_PERMUTATIONS = dp.PROPERTY_TEST_PERMUTATIONS
#: Shuffled-target refits per model on the page.
PAGE_SHUFFLES = dp.DEFAULT_N_SHUFFLES


def run_properties(run: Run) -> PropertyTable | None:
    """The run's property table; None (with a warning on the page) when it is absent or damaged."""
    try:
        return run.properties
    except (OSError, ValueError) as exc:
        st.warning("The run's property table cannot be read; rerun precompute on this run:")
        st.text(str(exc))  # may quote the run's files: plain text, never Markdown
        return None


@st.cache_data(show_spinner=False, max_entries=32)  # the page's spinner says how much work
def property_tests(path: str, stamp: int, n_permutations: int, seed: int) -> pd.DataFrame:
    """:func:`dispersion_predictors.property_tests` of a run, both scores (empty without a
    property table)."""
    table = _open_run(path, stamp).properties
    if table is None:
        return pd.DataFrame()
    return dp.property_tests(
        table, _open_run(path, stamp).dispersion, n_permutations=n_permutations, seed=seed
    )


@themed
@st.cache_data(show_spinner=False, max_entries=64)
def ranked_effects_png(
    path: str, stamp: int, n_permutations: int, seed: int, score: str, theme: str = "light"
) -> bytes:
    """:func:`charts.ranked_effects` of the run's property tests for one score, drawn once per
    server and theme (a picture: the numbers are in the ranked table under it)."""
    return charts.ranked_effects(
        property_tests(path, stamp, n_permutations, seed), score=score, theme=theme
    )


@st.cache_data(show_spinner=False, max_entries=32)
def skipped_properties(path: str, stamp: int) -> pd.DataFrame:
    """Properties left out of the analysis, with the reason (``property``, ``reason``)."""
    table = _open_run(path, stamp).properties
    if table is None:
        return pd.DataFrame(columns=["property", "reason"])
    return dp.usable_properties(table).skipped


@st.cache_data(show_spinner="Cross-validating the models (and their shuffled baselines)…")
def model_fit(
    path: str, stamp: int, score: str, n_shuffles: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """:func:`dispersion_predictors.cross_validated_fit` of one score: (fit, importances,
    predictions)."""
    run = _open_run(path, stamp)
    return dp.cross_validated_fit(
        run.properties, run.dispersion, score=score, n_shuffles=n_shuffles, seed=seed
    )
