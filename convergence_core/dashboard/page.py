"""What every dashboard page does first and last: pick the run, restore the view, write the URL.

A page script is::

    context = page.open_page("Stimuli")      # stops the page with a message if there is no run
    ...                                       # widgets bound to context.view via state.bind_widget
    page.close_page(context)                  # writes the view to the URL (shareable link)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import streamlit as st
from streamlit.errors import StreamlitAPIException

from .. import settings
from ..run import Run, RunInfo
from . import data, state


@dataclass
class PageContext:
    """The run a page shows and this session's view of it."""

    run: Run
    info: RunInfo
    view: state.View


def no_run_message() -> str:
    """What to tell a user who has no cached run yet, with the commands that make one."""
    return (
        "No cached run yet under "
        f"{settings.runs_root()}. Make the demo run with `{data.MAKE_RUN_COMMAND}` "
        f"(or `{data.MAKE_RUN_PYTHON}`), or point CONVERGENCE_CACHE at a cache that has runs, "
        "then reload this page."
    )


def open_page(title: str, icon: str = "🔬") -> PageContext:
    """Set up a page: title, run picker (sidebar), view from URL/session; stop if no run exists."""
    st.set_page_config(page_title=f"{title} · Convergence Explorer", page_icon=icon, layout="wide")
    runs = data.available_runs()
    names = [info.name for info in runs]
    view, warnings = state.init_view(st.session_state, st.query_params.to_dict(), names)
    for warning in warnings:
        st.warning(warning)
    if not runs:
        st.title(title)
        st.error(no_run_message())
        st.stop()
    if view.run is None:
        view.run = data.default_run_name(runs)
    with st.sidebar:
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
        run = data.open_run(info.path)
        # read the lazily loaded results every page needs now, so a damaged run fails here, in words
        run.gpa, run.dispersion, run.pca  # noqa: B018
    except (OSError, ValueError) as exc:
        st.title(title)
        st.error(f"Run {info.name!r} cannot be opened: {exc}")
        st.stop()
    if view.size is not None and view.size > run.n_stimuli // 2:
        st.warning(
            f"Subset size {view.size} is more than half of the run's {run.n_stimuli} stimuli "
            f"(low and high sets would overlap); using {state.default_subset_size(run.n_stimuli)}."
        )
        view.size = None
    st.title(title)
    return PageContext(run=run, info=info, view=view)


def close_page(context: PageContext) -> None:
    """Write the view to the URL so the address bar is a link to this exact view."""
    state.write_query_params(st.query_params, context.view)


class DashboardPage(NamedTuple):
    """One page of the app: its script (relative to ``app.py``), its name in the navigation menu
    (the URL path comes from the file name: ``pages/1_Stimuli.py`` is ``/Stimuli``), its icon (a
    Material Symbol: Streamlit ships the font, so it renders where no emoji font is installed) and
    the label of the Home page's link to it."""

    path: str
    title: str
    icon: str
    link_label: str


#: The app's pages in menu order; the first is the default page (at the app's root URL).
PAGES = (
    DashboardPage("pages/0_Home.py", "Home", ":material/home:", "Home"),
    DashboardPage("pages/1_Stimuli.py", "Stimuli", ":material/photo_library:", "Stimuli gallery"),
    DashboardPage(
        "pages/2_Residual_space.py", "Residual space", ":material/scatter_plot:", "Residual space"
    ),
    DashboardPage("pages/3_Alignment_lab.py", "Alignment lab", ":material/balance:", "Alignment lab"),
    DashboardPage(
        "pages/4_Paper_analyses.py", "Paper analyses", ":material/description:", "Paper analyses"
    ),
)


def navigation() -> None:
    """Build the navigation menu from :data:`PAGES` and run the page the URL asks for."""
    st.navigation(
        [
            st.Page(p.path, title=p.title, icon=p.icon, default=index == 0)
            for index, p in enumerate(PAGES)
        ]
    ).run()


def page_links(context: PageContext) -> None:
    """Links from Home to the other pages, carrying the current view in their URL."""
    params = context.view.to_query_params()
    targets = PAGES[1:]
    for cell, target in zip(st.columns(len(targets)), targets, strict=True):
        with cell:
            try:
                st.page_link(
                    target.path, label=target.link_label, icon=target.icon, query_params=params
                )
            except StreamlitAPIException:  # the page file is not there (yet)
                st.caption(f"{target.link_label} (page not installed)")
