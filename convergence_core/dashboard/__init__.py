"""Streamlit helpers for the dashboard (``app.py`` and ``pages/``); the only Streamlit code in the package.

- :mod:`.page`: what every page does first and last (run picker, view from the URL, no-run message)
- :mod:`.state`: URL query parameters <-> view, per-session selection
- :mod:`.data`: cached run loading, Grams, best layers, random baselines, UMAP (st.cache_*)
- :mod:`.lab`: batched CKNNA / mutual k-NN over many subsets (no Streamlit)
- :mod:`.selection_io`: chart selections, id import/export (no Streamlit)
- :mod:`.plots`: Plotly figures (no Streamlit)
- :mod:`.widgets`: captions as plain text, stimulus cards, galleries
"""
