"""Serve the dashboard with its heavy imports done before the first visitor arrives.

``streamlit run app.py`` imports pandas, pyarrow, Plotly and the run reader only when the first
browser session runs a page, which adds about 0.4 s to the first page on 2 cores
(benchmarks/bench_dashboard.py). This is the same ``streamlit run app.py`` through Streamlit's own
command line, after those imports have been done in the server process::

    python -m convergence_core.dashboard.serve --server.port 8501 --server.address localhost
"""

from __future__ import annotations

import sys
from pathlib import Path

#: the dashboard's entry page
APP = Path(__file__).resolve().parents[2] / "app.py"


def main(argv: list[str] | None = None) -> None:
    """Warm the imports, then run ``streamlit run app.py ARGV`` (Streamlit's options)."""
    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from convergence_core.dashboard import data, page, plots, widgets  # noqa: F401

    from streamlit.web import cli

    options = sys.argv[1:] if argv is None else argv
    sys.argv = ["streamlit", "run", str(APP), *options]
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main()
