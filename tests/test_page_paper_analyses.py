"""The Paper-analyses page renders on a planted run and follows its controls."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.fixtures_runs import make_synthetic_run

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "4_Paper_analyses.py")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("page_cache")
    make_synthetic_run(
        root / "runs", 60, plant="quiet_half", name="demo", images=False, thumbnails=False
    )
    return root


def _page(monkeypatch: pytest.MonkeyPatch, cache_root: Path) -> AppTest:
    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache_root))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run(timeout=60)
    assert not at.exception, at.exception
    return at


def _widget(at: AppTest, label: str):
    return next(w for w in at.number_input if w.label == label)


def test_page_shows_every_analysis_and_reacts_to_size_and_k(monkeypatch, cache_root):
    at = _page(monkeypatch, cache_root)
    assert [tab.label for tab in at.tabs] == [
        "Fig. 2: dispersion sets",
        "Fig. S1: drop a fraction",
        "Fig. S2: leave one model out",
        "Layer sweep",
    ]
    assert len(at.get("plotly_chart")) == 4
    first = at.dataframe[0].value
    assert len(first) == 6 and set(first["set_size"]) == {15}  # default: a quarter of 60
    assert any("holds for" in text.value for text in at.text)

    _widget(at, "Set size (stimuli)").set_value(20)
    at.run(timeout=60)
    assert not at.exception, at.exception
    resized = at.dataframe[0].value
    assert set(resized["set_size"]) == {20}
    assert not resized["cknna_low_dispersion"].equals(first["cknna_low_dispersion"])

    _widget(at, "k (CKNNA neighbours)").set_value(5)
    at.run(timeout=60)
    assert not at.exception, at.exception
    rekeyed = at.dataframe[0].value
    assert set(rekeyed["k"]) == {5}
    assert not rekeyed["cknna_low_dispersion"].equals(resized["cknna_low_dispersion"])
    assert at.query_params["k"] == ["5"] or at.query_params["k"] == "5"


def test_page_without_runs_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run(timeout=60)
    assert not at.exception
    assert "make demo" in at.error[0].value
