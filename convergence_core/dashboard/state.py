"""Shareable view state (URL query parameters) and per-session selections for the dashboard.

Two kinds of state live here:

* the *view*: run, selection source, score, k, subset size and gallery page. It is read from the
  URL once per browser session (so a shared link reopens the same view), kept in
  ``st.session_state`` while the user moves between pages, and written back to ``st.query_params``
  after every rerun. Invalid URL values fall back to defaults with a warning, never a crash.
* the *current selection*: stimulus ids picked on the Residual-space page (box/lasso) or imported
  from a file, used by the Stimuli and Alignment-lab pages. It lives in ``st.session_state`` only,
  so two browser sessions never see each other's selections.

The parsing functions are pure (no Streamlit) so they can be tested directly; the ``bind_*``
helpers take the Streamlit module's session state and query params.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..dispersion import SCORES  # the dispersion scores a stimulus can be ranked by
from ..metrics import DEFAULT_K as DEFAULT_METRIC_K
from ..metrics import metric_names
from ..subset_metrics import MIN_K, MIN_SET_SIZE, k_for_sets
from ..subset_metrics import default_set_size as _default_set_size

#: Where the Alignment lab's subset comes from.
SOURCES: tuple[str, ...] = ("low", "high", "random", "selection", "pasted")
#: Query-parameter names, in the order they are written to the URL.
PARAM_NAMES: tuple[str, ...] = ("run", "source", "score", "k", "size", "page", "metric")

DEFAULT_SOURCE = "low"
DEFAULT_SCORE = "mean"
DEFAULT_K = DEFAULT_METRIC_K  # the registry's (the report's too)
DEFAULT_METRIC = "cknna"  # the Alignment lab's metric: the paper's
MIN_SUBSET_SIZE = MIN_SET_SIZE  # it and MIN_K come from subset_metrics (the report uses them too)

VIEW_KEY = "convergence_view"
SELECTION_KEY = "convergence_selection"
WIDGET_PREFIX = "w_"


def default_subset_size(n_stimuli: int) -> int:
    """Default size of the low/high/random subsets: a quarter of the stimuli, ``n // 4`` (at least
    4, at most n; ``subset_metrics.default_set_size``). The report's ``report.default_set_size``
    is the same quarter but at least k + 1; where that does not fit and --k was left out, the
    report takes these sets and lowers k to fit them as the pages do
    (``subset_metrics.k_for_sets``, ``report.sets_and_k``)."""
    return _default_set_size(n_stimuli)


def subset_size(size: int | None, n_stimuli: int) -> int:
    """The pages' set size for a requested ``size``: :func:`default_subset_size` when
    None, else within [MIN_SUBSET_SIZE, n // 2] (low and high sets must not overlap)."""
    if size is None:
        return default_subset_size(n_stimuli)
    return min(max(MIN_SUBSET_SIZE, int(size)), n_stimuli // 2)


@dataclass
class View:
    """The shareable part of what the user is looking at (one per browser session)."""

    run: str | None = None
    source: str = DEFAULT_SOURCE
    score: str = DEFAULT_SCORE
    k: int = DEFAULT_K
    size: int | None = None  # None: default_subset_size(n) of the chosen run
    page: int = 1
    metric: str = DEFAULT_METRIC  # the Alignment lab's metric (a registry name)

    def to_query_params(self) -> dict[str, str]:
        """The view as URL query parameters (values that are unset are left out, and the metric
        where it is the default, so that the pages without one keep their links short)."""
        params = {
            "run": self.run,
            "source": self.source,
            "score": self.score,
            "k": str(self.k),
            "size": None if self.size is None else str(self.size),
            "page": str(self.page),
            "metric": None if self.metric == DEFAULT_METRIC else self.metric,
        }
        return {name: value for name, value in params.items() if value is not None}


def sets_k(view: View, n_stimuli: int) -> int:
    """The view's k lowered below the Alignment lab's set size, as the lab does
    (:func:`bind_bounded_int`; the view keeps the k asked for); the lab lowers it further for a
    focus set smaller than its low and high sets."""
    return k_for_sets(view.k, subset_size(view.size, n_stimuli))


def shown(text: str, limit: int = 40) -> str:
    """A user-supplied value made safe to quote inside a Markdown message (st.warning renders
    Markdown): only letters, digits, space and ``._-`` are kept (others become ``?``), truncated
    to ``limit`` characters of the value (the last one ``…`` when cut), then every ``_``
    backslash-escaped (``\\_``: ``__x__`` would render bold), so the Markdown may be longer than
    ``limit`` but renders as the value's first characters, never a dangling backslash."""
    kept = re.sub(r"[^A-Za-z0-9 ._-]", "?", str(text))
    if len(kept) > limit:
        kept = kept[: limit - 1] + "…"
    return kept.replace("_", "\\_")


def _last(value: str | Sequence[str]) -> str:
    """A query parameter's value; repeated keys keep the last occurrence (like st.query_params)."""
    if isinstance(value, str):
        return value
    return str(value[-1]) if len(value) else ""


def _parse_int(name: str, text: str, low: int, warnings: list[str]) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        warnings.append(
            f"URL parameter {name}='{shown(text)}' is not a whole number; using the default."
        )
        return None
    if value < low:
        warnings.append(f"URL parameter {name}={value} must be at least {low}; using the default.")
        return None
    return value


def parse_query_params(
    params: Mapping[str, str | Sequence[str]], run_names: Sequence[str],
    unfinished: Sequence[str] = (),
) -> tuple[View, list[str]]:
    """Read a :class:`View` from URL query parameters.

    Args:
        params: query parameters as given by ``st.query_params.to_dict()`` (or a repeated-key list).
        run_names: names of the cached runs; ``run`` must be one of them.
        unfinished: names of runs whose precompute has not finished (a link to one says so).

    Returns:
        ``(view, warnings)``: every invalid or unknown value is replaced by its default and
        explained in one warning sentence (naming the parameter and the accepted values).
        Parameters that are not part of the view are ignored.
    """
    view = View()
    warnings: list[str] = []
    values = {name: _last(params[name]) for name in PARAM_NAMES if name in params}

    if "run" in values:
        if values["run"] in run_names:
            view.run = values["run"]
        elif values["run"] in unfinished:
            warnings.append(
                f"Run '{shown(values['run'])}' is not finished: its precompute is still running "
                "or stopped before the end (run the same precompute command again to finish it; "
                "then reload this page); showing the default run."
            )
        else:
            known = ", ".join(shown(name) for name in run_names) if run_names else "none yet"
            warnings.append(
                f"URL parameter run='{shown(values['run'])}' is not a cached run "
                f"(cached: {known}); "
                "showing the default run."
            )
    for name, choices, default in (
        ("source", SOURCES, DEFAULT_SOURCE),
        ("score", SCORES, DEFAULT_SCORE),
        ("metric", tuple(metric_names()), DEFAULT_METRIC),
    ):
        if name not in values:
            continue
        if values[name] in choices:
            setattr(view, name, values[name])
        else:
            warnings.append(
                f"URL parameter {name}='{shown(values[name])}' is not one of "
                f"{', '.join(choices)}; using {default!r}."
            )
    for name, minimum in (("k", MIN_K), ("size", MIN_SUBSET_SIZE), ("page", 1)):
        if name in values:
            number = _parse_int(name, values[name], minimum, warnings)
            if number is not None:
                setattr(view, name, number)
    return view, warnings


@dataclass
class Selection:
    """One browser session's current selection: stimulus ids of one run, and their origin."""

    run: str
    ids: tuple[str, ...]
    origin: str = ""


def init_view(
    session_state: MutableMapping[str, Any],
    query_params: Mapping[str, str | Sequence[str]],
    run_names: Sequence[str],
    unfinished: Sequence[str] = (),
) -> tuple[View, list[str]]:
    """The session's view: parsed from the URL on the session's first rerun, then kept
    (``unfinished``: see :func:`parse_query_params`).

    Returns ``(view, warnings)``; warnings come on the session's first rerun, and on the rerun
    where the session's run stops being available (a precompute rewriting it, or it was deleted:
    the session then shows the default run, and says why).
    The returned ``View`` belongs to this session (mutating it is how widgets update it).
    """
    view = session_state.get(VIEW_KEY)
    if isinstance(view, View):
        if view.run is not None and view.run not in run_names:
            gone, view.run = view.run, None
            if gone in unfinished:
                why = ("is being written by a precompute (or its precompute stopped before the "
                       "end); pick it in the sidebar again once its precompute has finished")
            else:
                why = "is no longer in the cache"
            meanwhile = (
                "Showing the default run meanwhile." if run_names else "No other run is cached."
            )
            return view, [f"Run '{shown(gone)}' {why}. {meanwhile}"]
        return view, []
    view, warnings = parse_query_params(query_params, run_names, unfinished)
    session_state[VIEW_KEY] = view
    return view, warnings


def bind_widget(
    session_state: MutableMapping[str, Any],
    view: View,
    name: str,
    make_widget: Callable[[str], Any],
    coerce: Callable[[Any], Any] = lambda value: value,
) -> Any:
    """Create a widget whose value is the view's field ``name`` and store its new value back.

    ``make_widget(key)`` must create the widget with that key and return its value. The widget's
    session value is initialised from the view (and passed through ``coerce`` first, e.g. to clamp
    k into the slider's current range) so the widget starts from the URL and survives page
    switches, where Streamlit drops the state of widgets that were not shown.
    """
    key = WIDGET_PREFIX + name
    # Set on every rerun, not only the first: a page switch can give the widget a new identity,
    # and Streamlit would then start it from its default instead of the session's value.
    session_state[key] = coerce(session_state.get(key, getattr(view, name)))
    value = make_widget(key)
    setattr(view, name, value)
    return value


#: Prefix of the session keys that remember a value :func:`bind_bounded_int` had to lower
CLAMPED_PREFIX = "clamped_"


def bind_bounded_int(
    session_state: MutableMapping[str, Any],
    view: View,
    name: str,
    make_widget: Callable[[str], Any],
    low: int,
    high: int,
) -> tuple[int, int | None]:
    """:func:`bind_widget` for a whole number whose allowed range ``[low, high]`` depends on other
    choices (k must stay below the smallest set). A value above ``high`` is used as ``high`` for
    now, but not forgotten: the view (and so the URL) keeps it, and the widget returns to it once
    the range allows, unless the user moved the widget meanwhile. Otherwise a small set chosen
    for a moment lowered k for good, and every number after it silently changed.

    Returns ``(value, requested)``: the value to use, and the requested value when it was lowered
    (else None).
    """
    key = WIDGET_PREFIX + name
    remembered = session_state.pop(CLAMPED_PREFIX + key, None)
    if remembered is not None and session_state.get(key) == remembered[1]:
        session_state[key] = remembered[0]  # the widget is where it was lowered to: restore
    requested = int(session_state.get(key, getattr(view, name)))
    value = int(
        bind_widget(
            session_state, view, name, make_widget, coerce=lambda v: min(max(low, int(v)), high)
        )
    )
    if requested > high and value == high:
        session_state[CLAMPED_PREFIX + key] = (requested, high)
        setattr(view, name, requested)
        return value, requested
    return value, None


def drop_stale_choice(
    session_state: MutableMapping[str, Any], key: str, options: Sequence[Any]
) -> None:
    """Forget a widget's session value that is not among its current ``options`` (e.g. a stimulus
    or model of the previously chosen run), so the widget starts from its default, not an error.
    The copy a :func:`kept_widget` keeps is checked the same way."""
    for name in (key, KEPT_PREFIX + key):
        if name in session_state and session_state[name] not in options:
            del session_state[name]


def carry_choices_to_run(
    session_state: MutableMapping[str, Any], key: str, options: Sequence[Any]
) -> None:
    """Carry a multi-choice widget's session value (a list, e.g. of models) over to a newly chosen
    run whose ``options`` lack some of it: keep the chosen options this run has; if it has none
    of them, forget the value so the widget starts from its default (all). A value without stale
    entries is left alone, an empty one the user made on purpose included. The copy a
    :func:`kept_widget` keeps is carried over the same way."""
    for name in (key, KEPT_PREFIX + key):
        chosen = session_state.get(name)
        if chosen is None or not set(chosen) - set(options):
            continue
        kept = [option for option in chosen if option in options]
        if kept:
            session_state[name] = kept
        else:
            del session_state[name]


def write_query_params(query_params: MutableMapping[str, Any], view: View) -> None:
    """Write the view to the URL, touching only the keys that changed (avoids needless reruns)."""
    wanted = view.to_query_params()
    changed = {
        name: wanted[name]
        for name in PARAM_NAMES
        if name in wanted and query_params.get(name) != wanted[name]
    }
    if changed:
        query_params.update(changed)  # st.query_params sends one message for all of them
    for name in PARAM_NAMES:
        if name not in wanted and name in query_params:
            del query_params[name]


def get_selection(session_state: Mapping[str, Any], run: str) -> Selection | None:
    """The session's current selection for ``run`` (None if empty or made on another run)."""
    selection = session_state.get(SELECTION_KEY)
    if isinstance(selection, Selection) and selection.run == run and selection.ids:
        return selection
    return None


def set_selection(
    session_state: MutableMapping[str, Any],
    run: str,
    ids: Sequence[str],
    origin: str,
) -> Selection:
    """Replace the session's current selection (ids keep the given order, duplicates dropped)."""
    unique = tuple(dict.fromkeys(str(i) for i in ids))
    selection = Selection(run=run, ids=unique, origin=origin)
    session_state[SELECTION_KEY] = selection
    return selection


def clear_selection(session_state: MutableMapping[str, Any]) -> None:
    """Forget the session's current selection."""
    session_state.pop(SELECTION_KEY, None)


#: Prefix of the session keys (not widget keys) that keep a widget's value while it is not shown
KEPT_PREFIX = "kept_"


def kept_widget(
    session_state: MutableMapping[str, Any], key: str, make_widget: Callable[[str], Any]
) -> Any:
    """Create the widget ``make_widget(key)`` so that its value survives reruns where it is not
    shown (inside a closed lazy expander or tab, or on another page).

    Streamlit forgets a widget's value when a rerun does not draw the widget; a copy under
    ``KEPT_PREFIX + key`` restores it the next time the widget is drawn. Read the value while the
    widget is hidden with :func:`kept_value`.
    """
    kept = KEPT_PREFIX + key
    if key not in session_state and kept in session_state:
        session_state[key] = session_state[kept]
    value = make_widget(key)
    session_state[kept] = value
    return value


def kept_value(session_state: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value of a :func:`kept_widget` (drawn or not on this rerun), else ``default``."""
    if key in session_state:
        return session_state[key]
    return session_state.get(KEPT_PREFIX + key, default)
