"""Convergence Explorer: the app's entry point (``make demo`` serves it; see README).

It only builds the navigation menu; each page is a script in ``pages/``, listed with its title and
icon in ``convergence_core.dashboard.page.PAGES`` (Home first).
"""

from convergence_core.dashboard import page

page.navigation()
