"""Convergence Explorer: the dashboard's navigation. Home (``home.py``) and the pages of
``convergence_core.dashboard.page.PAGES`` (``pages/``), with their labels and icons in the sidebar.

Start with ``make demo`` or ``streamlit run app.py`` (see README).
"""

import streamlit as st

from convergence_core.dashboard import page

# The tab's icon before the navigation: otherwise the tab first takes the page's Material icon
# from the sidebar, which the browser fetches from fonts.gstatic.com (a third-party request on
# every visit, failing offline). Each page then sets its own icon (page.open_page).
st.set_page_config(page_icon=page.APP_ICON)
st.navigation(page.navigation_pages()).run()
