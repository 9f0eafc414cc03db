"""Convergence Explorer: the dashboard's navigation. Home (``home.py``) and the pages of
``convergence_core.dashboard.page.PAGES`` (``pages/``), with their labels and icons in the sidebar.

Start with ``make demo`` or ``streamlit run app.py`` (see README).
"""

import streamlit as st

from convergence_core.dashboard import page

st.navigation(page.navigation_pages()).run()
