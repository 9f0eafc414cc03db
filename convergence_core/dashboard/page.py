"""What every dashboard page does first and last: pick the run, restore the view, write the URL.

A page script is::

    context = page.open_page("pages/1_Stimuli.py")  # title from PAGES; stops if there is no run
    ...                                       # widgets bound to context.view via state.bind_widget
    page.close_page(context)                  # writes the view to the URL (shareable link)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import streamlit as st
from streamlit.errors import StreamlitAPIException

from .. import settings
from ..run import Run, RunInfo
from . import data, state, widgets


@dataclass
class PageContext:
    """The run a page shows and this session's view of it."""

    run: Run
    info: RunInfo
    view: state.View

    @property
    def quoted_name(self) -> str:
        """The run's (folder) name quoted for a message, as text: alerts render Markdown, and a
        folder may be named ``*bold*:cat:``."""
        return widgets.escape_markdown(repr(self.info.name))


def no_run_message() -> str:
    """What to tell a user who has no cached run yet, with the commands that make one."""
    return (
        "No cached run yet under "
        f"{settings.runs_root()}. Make the demo run with `{data.MAKE_RUN_COMMAND}` "
        f"(or `{data.MAKE_RUN_PYTHON}`), or point CONVERGENCE_CACHE at a cache that has runs, "
        "then reload this page."
    )


#: Whether :func:`leave_directory_mode` has switched Streamlit's pages-folder mode off here
_LEFT_DIRECTORY_MODE = False


def leave_directory_mode() -> None:
    """Rerun through ``app.py``'s navigation when Streamlit ran this page on its own.

    Streamlit starts in its old multipage mode when a ``pages/`` folder sits beside the app
    (``PagesManager.uses_pages_directory``) and leaves it at the first ``st.navigation`` call in
    the process. Until then a session that opens a page's URL first (a shared link on a freshly
    started server) runs that page file alone, under a sidebar built from the folder ("app",
    "Stimuli", no icons). Switching the flag off and rerunning runs ``app.py`` instead, which
    finds the same page by its URL. Once per process, as on a server the mode never comes back
    (Streamlit's AppTest sets it again before every script run; its runs of a page alone are
    left as they are, so that a rerun never swallows a button press there).
    """
    global _LEFT_DIRECTORY_MODE
    from streamlit.runtime.pages_manager import PagesManager

    if getattr(PagesManager, "uses_pages_directory", False) and not _LEFT_DIRECTORY_MODE:
        _LEFT_DIRECTORY_MODE = True
        PagesManager.uses_pages_directory = False
        st.rerun()


#: The browser tab's icon until a page sets its own (an emoji: drawn by the browser, no download)
APP_ICON = "🔭"


def open_page(target: str) -> PageContext:
    """Set up the page of file ``target`` (:data:`HOME` or one of :data:`PAGES`): title and tab
    (:func:`page_heading`), run picker (sidebar), view from URL/session; stop if no run exists."""
    leave_directory_mode()
    title, tab_title, icon = page_heading(target)
    st.set_page_config(page_title=tab_title, page_icon=icon, layout="wide")
    runs = data.available_runs()
    names = [info.name for info in runs]
    view, warnings = state.init_view(
        st.session_state, st.query_params.to_dict(), names, data.unfinished_run_names()
    )
    for warning in warnings:
        st.warning(warning)
    if not runs:
        st.title(title)
        st.error(no_run_message())
        st.stop()
    if view.run is None:
        view.run = data.default_run_name(runs)
    with st.sidebar:
        if len(names) == 1:
            # nothing to choose: plain text, which spares the browser the select box's code
            view.run = names[0]
            st.text(f"Run: {names[0]}")
        else:
            state.bind_widget(
                st.session_state,
                view,
                "run",
                lambda key: st.selectbox(
                    "Run",
                    names,
                    key=key,
                    help="Cached runs under $CONVERGENCE_CACHE/runs; default: the newest demo run.",
                ),
                coerce=lambda value: value if value in names else data.default_run_name(runs),
            )
    info = runs[names.index(view.run)]
    try:
        # loads the run and checks every file the pages read (run_checks.check_run_files), so a
        # damaged run fails here, on every page alike, in words with the fix, never mid-page
        run = data.open_run(info.path)
    except (OSError, ValueError) as exc:
        st.title(title)
        st.error(widgets.escape_markdown(f"Run {info.name!r} cannot be opened: {exc}"))
        st.stop()
    if view.size is not None and view.size > run.n_stimuli // 2:
        st.warning(
            f"Subset size {view.size} is more than half of the run's {run.n_stimuli} stimuli "
            f"(low and high sets would overlap); using {state.default_subset_size(run.n_stimuli)}."
        )
        view.size = None
        # the size widget follows (else it kept the old size, clamped to another number)
        st.session_state.pop(state.WIDGET_PREFIX + "size", None)
    st.title(title)
    return PageContext(run=run, info=info, view=view)


def close_page(context: PageContext) -> None:
    """Write the view to the URL so the address bar is a link to this exact view."""
    state.write_query_params(st.query_params, context.view)


@dataclass(frozen=True)
class PageEntry:
    """One page after Home: its ``file`` (what ``st.Page`` and ``st.switch_page`` take), its
    ``label`` (the sidebar's name for it, and its title), its ``icon`` in the sidebar (a Material
    Symbol: they ship with Streamlit, so they render where no emoji font is installed) and its
    ``tab_icon`` in the browser tab (an emoji, drawn by the browser: a Material icon there is
    fetched from fonts.gstatic.com, a third-party request that fails offline)."""

    file: str
    label: str
    icon: str
    tab_icon: str


#: The dashboard's pages after Home: the one list of pages. A new page is one entry here (and its
#: file under ``pages/``); the sidebar, the links between pages, the titles, the browser test and
#: the benchmark read this list.
PAGES = [
    PageEntry("pages/1_Stimuli.py", "Stimuli gallery", ":material/photo_library:", "🖼️"),
    PageEntry("pages/2_Residual_space.py", "Residual space", ":material/scatter_plot:", "🧭"),
    PageEntry("pages/3_Alignment_lab.py", "Alignment lab", ":material/balance:", "⚖️"),
    PageEntry("pages/4_Paper_analyses.py", "Paper analyses", ":material/description:", "📄"),
    PageEntry(
        "pages/5_What_predicts_dispersion.py", "What predicts dispersion", ":material/insights:",
        "🧩",
    ),
    PageEntry("pages/6_Universal_space.py", "Universal space", ":material/hub:", "🌐"),
]
#: The app's name: Home's title, and the end of every other page's tab title
APP_TITLE = "Convergence Explorer"


def page_heading(target: str) -> tuple[str, str, str]:
    """(title, browser-tab title, tab icon) of the page of file ``target``: a page of
    :data:`PAGES` is titled by its label there (the sidebar's name for it), ``<label> ·
    Convergence Explorer`` in the tab with its ``tab_icon`` emoji; Home (:data:`HOME`) by
    the app's name, with :data:`APP_ICON`. ValueError naming the files for any other."""
    if target == HOME:
        return APP_TITLE, APP_TITLE, APP_ICON
    for entry in PAGES:
        if entry.file == target:
            return entry.label, f"{entry.label} · {APP_TITLE}", entry.tab_icon
    known = [HOME, *(entry.file for entry in PAGES)]
    raise ValueError(f"unknown page file {target!r}; pass one of {known} (page.PAGES)")


def url_path(target: str) -> str:
    """The URL path Streamlit serves a page file at: its file name without the ordering number
    and ``.py`` (``"pages/2_Residual_space.py"`` -> ``"Residual_space"``; Home is ``""``)."""
    return re.sub(r"^[0-9]+_", "", PurePosixPath(target).stem)


#: Every page as (label, URL path), Home first: what the browser test and benchmark visit.
PAGE_URLS = [("Home", ""), *((entry.label, url_path(entry.file)) for entry in PAGES)]


def page_links(context: PageContext) -> None:
    """Links to the other pages carrying the current view in their URL."""
    params = context.view.to_query_params()
    # one row that wraps, each link as wide as its label (equal columns cut the longest labels)
    with st.container(horizontal=True, wrap=True, gap="small"):
        for entry in PAGES:
            try:
                st.page_link(entry.file, label=entry.label, icon=entry.icon, query_params=params)
            except StreamlitAPIException:  # the page file is not there (yet)
                st.caption(f"{entry.label} (page not installed)")


#: The Home page's file (beside app.py, which is the navigation)
HOME = "home.py"


def navigation_pages() -> list[st.Page]:
    """Home and :data:`PAGES` as ``st.Page`` s for ``st.navigation`` (``app.py``): the sidebar
    shows their labels and icons; each page's URL path is its file name without the number
    (:func:`url_path`)."""
    home = st.Page(HOME, title="Home", icon=":material/home:", default=True)
    return [home, *(st.Page(entry.file, title=entry.label, icon=entry.icon) for entry in PAGES)]
