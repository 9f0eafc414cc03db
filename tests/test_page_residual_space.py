"""Residual-space page (pages/2_Residual_space.py), chart selections, selection import/export."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from convergence_core import settings
from convergence_core.dashboard import catalogue, data, selection_io, state
from tests.page_reading import gallery_texts, shown

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60
PAGE = "pages/2_Residual_space.py"


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures_runs import make_synthetic_run

    cache = tmp_path_factory.mktemp("cache")
    make_synthetic_run(cache / "runs", n=50, name="demo")
    return cache


INTERACTIVE = "w_interactive_scatter"


def _page(*, interactive: bool = True) -> AppTest:
    """The page in a new session, its map interactive (Plotly) or a picture."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT).run(timeout=TIMEOUT)
    if interactive:  # off by default
        at.session_state[INTERACTIVE] = True
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    return at


def _figure(at: AppTest, title_part: str) -> dict:
    for chart in at.get("plotly_chart"):
        figure = json.loads(chart.proto.spec)
        if title_part in json.dumps(figure["layout"].get("title", "")):
            return figure
    raise AssertionError(f"no chart titled with {title_part!r}")


def _array(value) -> np.ndarray:
    """A Plotly JSON array: a plain list or a typed array ``{"dtype": ..., "bdata": base64}``."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return flat.reshape(value["shape"]) if "shape" in value else flat
    return np.asarray(value)


# ---------------------------------------------------------------------------------------------
# pure helpers


def test_rows_from_chart_selection_uses_customdata_and_ignores_junk() -> None:
    selection = {
        "points": [
            {"point_index": 0, "customdata": 7},
            {"point_index": 1, "customdata": [3]},
            {"point_index": 4},  # no customdata: its index
            {"point_index": 2, "customdata": 99},  # out of range
            {"customdata": "x"},
            {"point_index": 1, "customdata": [3]},  # duplicate
        ]
    }
    assert selection_io.rows_from_chart_selection(selection, 10) == [3, 4, 7]
    assert selection_io.rows_from_chart_selection(None, 10) == []
    assert selection_io.rows_from_chart_selection({"points": []}, 10) == []


def test_selection_csv_round_trips_through_import() -> None:
    ids = ["a1", "b,2", 'q"3']
    captions = [["first", "second"], ["<b>x</b>"], []]
    csv_bytes = selection_io.selection_csv(ids, captions)
    assert selection_io.parse_id_list(csv_bytes) == ids
    rows, unknown = catalogue.rows_of_ids(
        selection_io.parse_id_list(csv_bytes), {'q"3': 0, "zz": 1, "a1": 2}
    )
    assert list(rows) == [2, 0] and unknown == ["b,2"]


def test_a_known_id_holding_spaces_or_commas_is_read_whole_from_its_line() -> None:
    """Ids such as file names with spaces could not be pasted or uploaded: every line was split
    at spaces and commas. A line that is one of the run's ids is that id."""
    known = {"img 1.jpg", "a,b", "c"}
    assert selection_io.parse_id_list("img 1.jpg\n a,b \nc d, e\n", known) == [
        "img 1.jpg", "a,b", "c", "d", "e"
    ]
    assert selection_io.parse_id_list(b"img 1.jpg\nc\n", known) == ["img 1.jpg", "c"]
    assert selection_io.parse_id_list("img 1.jpg") == ["img", "1.jpg"]  # no run: a list


def test_parse_id_list_accepts_plain_lists_and_refuses_binary() -> None:
    assert selection_io.parse_id_list("12, 15;\n15\t7  \n\n") == ["12", "15", "7"]
    assert selection_io.parse_id_list(b"\xef\xbb\xbfID,caption\n5,cat\n6,dog\n") == ["5", "6"]
    with pytest.raises(ValueError, match="UTF-8"):
        selection_io.parse_id_list(b"\xff\xfe\x00bad")
    # an uploaded table without an 'id' column: its cells were taken for ids
    with pytest.raises(ValueError, match=r"table without an 'id' column \(its columns: name, "
                                         r"value\)"):
        selection_io.parse_id_list(b"name,value\na,1\nb,2\n")
    assert selection_io.parse_id_list("a, b\nc, d") == ["a", "b", "c", "d"]  # pasted: a list
    assert selection_io.parse_id_list(b"a\nb\n") == ["a", "b"]
    # blank lines above the header (an export with a leading empty line; pasted text)
    assert selection_io.parse_id_list(b"\n \nid,caption\n5,cat\n\n6,dog\n") == ["5", "6"]
    assert selection_io.parse_id_list("\r\nid\r\na\r\nb\r\n") == ["a", "b"]
    # the dashboard's own export, with captions holding characters that end a line for Python
    # (a line separator, NEL, a form feed) but not for a CSV reader
    captions = [["a cat\u2028on a mat"], ["dog\x85x\x0c"]]
    export = selection_io.selection_csv(["img1", "img2"], captions)
    assert selection_io.parse_id_list(export) == ["img1", "img2"]


def test_a_large_exported_selection_is_read_back() -> None:
    """The page's own export of 20,000 stimuli (ids and five captions each: 5.8 MB) is read back,
    its captions skipped (an import refused more than 5 MB), and the server accepts an upload of
    its size."""
    import tomllib

    from convergence_core.datasets import load_coco

    demo = load_coco(settings.demo_data_root()).stimuli
    n = 20_000
    ids = [f"{demo['id'].iloc[i % len(demo)]}_{i}" for i in range(n)]
    captions = [list(demo["captions"].iloc[i % len(demo)]) for i in range(n)]
    exported = selection_io.selection_csv(ids, captions)
    assert len(exported) > 5_000_000
    rows, messages = selection_io.imported_selection(
        exported, lambda wanted: catalogue.rows_of_ids(wanted, {i: r for r, i in enumerate(ids)})
    )
    assert rows is not None and len(rows) == n, messages
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert len(exported) < config["server"]["maxUploadSize"] * 1024 * 1024


def test_an_export_is_read_back_in_little_more_memory_than_its_ids() -> None:
    """An upload near the 64 MB limit peaked at ~6.5 times its size (held as text, then as
    lines, then as a text stream): the table is now read row by row."""
    import tracemalloc

    n = 26_000
    ids = [f"COCO_val2014_{i:012d}.jpg" for i in range(n)]
    captions = [[f"a photo of a cat number {i} sitting on a mat beside a dog, in a room"] * 5
                for i in range(n)]
    exported = selection_io.selection_csv(ids, captions)
    del captions
    assert len(exported) > 10_000_000
    known = set(ids)
    tracemalloc.start()
    try:
        assert selection_io.parse_id_list(exported, known) == ids
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(exported), peak / len(exported)


def test_an_uploaded_list_of_ids_holding_commas_is_a_list_not_a_table() -> None:
    """Every line the same number of comma-separated cells looked like a table without an 'id'
    column, and was refused, though every line is one of the run's ids."""
    known = {"cat, 1.jpg", "dog, 2.jpg"}
    assert selection_io.parse_id_list(b"cat, 1.jpg\ndog, 2.jpg\n", known) == [
        "cat, 1.jpg", "dog, 2.jpg"
    ]
    with pytest.raises(ValueError, match="table without an 'id' column"):
        selection_io.parse_id_list(b"cat, 1.jpg\nbird, 3.jpg\n", known)  # not all known


def test_rows_of_ids_keeps_order_and_reports_unknown() -> None:
    rows, unknown = catalogue.rows_of_ids(["c", "x", "a"], {"a": 0, "b": 1, "c": 2})
    assert list(rows) == [2, 0] and unknown == ["x"]


# ---------------------------------------------------------------------------------------------
# the page


def test_scatter_is_webgl_coloured_by_dispersion_with_hover(run) -> None:
    at = _page()
    figure = _figure(at, "PCA of the GPA residuals")
    points = figure["data"][0]
    assert points["type"] == "scattergl"
    np.testing.assert_allclose(
        _array(points["x"]), np.asarray(run.pca.scores)[:, 0], rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(_array(points["marker"]["color"]), run.dispersion["mean"], rtol=1e-6)
    assert list(_array(points["customdata"])) == list(range(run.n_stimuli))
    assert "mean residual" in points["marker"]["colorbar"]["title"]["text"]
    assert f"id {run.stimuli['id'].iloc[0]}" in points["text"][0]
    assert figure["layout"]["xaxis"]["title"]["text"].startswith("PC1 of residuals")
    assert points["x"]["dtype"] == "f4"  # coordinates travel as float32

    # the principal components: a picture and their numbers, built when the expander opens
    assert not any(m.value.startswith("| component |") for m in at.markdown)
    at.session_state["w_components_open"] = True
    at.run(timeout=TIMEOUT)
    table = next(m.value for m in at.markdown if m.value.startswith("| component |"))
    rows = [
        [re.sub(r"\\(.)", r"\1", cell.strip()) for cell in line.split(" | ")]
        for line in table.splitlines()[2:]
    ]
    np.testing.assert_allclose(
        [float(r[1]) for r in rows], 100 * np.asarray(run.pca.explained_variance_ratio), atol=0.006
    )
    np.testing.assert_allclose(
        [float(v.rstrip(" |")) for v in rows[0][2:]], np.asarray(run.pca.components)[0], atol=6e-5
    )

    at.radio(key="w_score").set_value("pc1").run(timeout=TIMEOUT)
    figure = _figure(at, "PCA of the GPA residuals")
    np.testing.assert_allclose(
        _array(figure["data"][0]["marker"]["color"]), run.dispersion["pc1"], rtol=1e-6
    )


def test_the_hover_names_every_score_of_the_one_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each point's hover gives every dispersion score of dispersion.SCORE_ENTRIES by its label,
    in that order: a new score is one entry there (the hover named "mean" and "PC1" itself)."""
    from convergence_core.dashboard import plots

    monkeypatch.setattr(plots, "SCORE_NAME", {**plots.SCORE_NAME, "max": "largest residual"})
    scores = {"pc1": np.array([0.5, -1.25]), "max": np.array([3.0, 4.0]),
              "mean": np.array([0.125, 2.0])}
    figure = plots.residual_scatter(
        np.zeros(2), np.ones(2), scores["mean"], ids=["a", "b"], captions=None, scores=scores,
        colour_title="t", x_title="x", y_title="y", title="map",
    )
    assert figure.data[0].text == (
        "id a<br><br>mean residual 0.1250 · PC1 score 0.5000 · largest residual 3.0000",
        "id b<br><br>mean residual 2.0000 · PC1 score -1.2500 · largest residual 4.0000",
    )


def test_hover_text_is_escaped(run) -> None:
    from convergence_core.dashboard import plots

    assert (
        plots.safe_hover_text("<script>alert(1)</script>")
        == "&lt;script&gt;alert(1)&lt;/script&gt;"
    )
    assert (
        plots.safe_hover_text("x" * 200).endswith("…")
        and len(plots.safe_hover_text("x" * 200)) == 80
    )


def test_empty_selection_says_what_to_do(run) -> None:
    at = _page()
    assert any("Empty selection" in i.value for i in at.info)
    assert not at.download_button


def test_selection_shows_gallery_export_and_overlay(run) -> None:
    at = _page()
    ids = list(run.stimuli["id"].iloc[[4, 9, 11]])
    state.set_selection(at.session_state, "demo", ids, origin="test")
    at.run(timeout=TIMEOUT)
    assert any(t.value.startswith("3 stimuli selected") for t in at.text)
    gallery_ids = [
        text.split(" · ")[0][3:]
        for text in gallery_texts(at, "selection")
        if text.startswith("id ") and " · rank " in text
    ]
    assert gallery_ids == ids
    overlay = _figure(at, "PCA of the GPA residuals")["data"][1]
    assert list(_array(overlay["customdata"])) == [4, 9, 11]
    download = at.download_button[0]
    assert "Export selection" in download.proto.label

    at.button(key="clear-selection").click().run(timeout=TIMEOUT)
    assert state.get_selection(at.session_state, "demo") is None


def test_import_sets_selection_and_reports_unknown_ids(run) -> None:
    at = _page()
    known = list(run.stimuli["id"].iloc[[2, 3]])
    content = ("id\n" + "\n".join([known[0], "no-such-id", known[1]])).encode()
    at.file_uploader(key="w_import").upload("ids.csv", content, "text/csv")
    at.run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert "1 id(s) in the file are not in this run and were left out:" in shown(at.warning)
    assert any(t.value == "no-such-id" for t in at.text)
    selection = state.get_selection(at.session_state, "demo")
    assert selection is not None and list(selection.ids) == known
    # the map drawn in the same rerun already circles the imported stimuli (it lagged one
    # action behind: drawn before the file was read)
    overlay = _figure(at, "PCA of the GPA residuals")["data"][1]
    assert list(_array(overlay["customdata"])) == [2, 3]


def test_import_of_only_unknown_ids_is_an_error(run) -> None:
    at = _page()
    at.file_uploader(key="w_import").upload("ids.txt", b"nope1\nnope2\n", "text/plain")
    at.run(timeout=TIMEOUT)
    assert any("Empty selection" in e.value for e in at.error)
    assert state.get_selection(at.session_state, "demo") is None


def test_two_sessions_do_not_share_selections(run) -> None:
    first, second = _page(), _page()
    state.set_selection(
        first.session_state, "demo", list(run.stimuli["id"].iloc[:5]), origin="test"
    )
    first.run(timeout=TIMEOUT)
    second.run(timeout=TIMEOUT)
    assert state.get_selection(first.session_state, "demo") is not None
    assert state.get_selection(second.session_state, "demo") is None
    assert any("Empty selection" in i.value for i in second.info)


def test_umap_is_computed_once_and_cached_atomically(run, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def fake_umap(residuals: np.ndarray, random_state: int = 0) -> np.ndarray:
        calls.append(residuals.shape)
        return np.column_stack([residuals[:, 0], residuals[:, 1]])

    monkeypatch.setattr(data, "compute_umap", fake_umap)
    data.umap_coordinates.clear()
    umap_file = run.path / "umap.npy"
    umap_file.unlink(missing_ok=True)
    at = _page()
    at.radio(key="w_projection").set_value("UMAP").run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    figure = _figure(at, "UMAP of the GPA residuals")
    np.testing.assert_allclose(
        _array(figure["data"][0]["x"]), np.asarray(run.gpa.residuals)[:, 0], rtol=1e-6
    )
    assert calls == [(run.n_stimuli, 3)]
    assert umap_file.is_file() and not list(run.path.glob("umap.npy.tmp-*"))
    data.umap_coordinates.clear()  # a new server process reads the file instead of recomputing
    np.testing.assert_allclose(
        data.umap_coordinates(str(run.path), data.manifest_stamp(run.path))[:, 1],
        np.asarray(run.gpa.residuals)[:, 1],
    )
    assert len(calls) == 1
    umap_file.unlink()
    data.umap_coordinates.clear()
    # a run folder that cannot be written (a shared read-only cache): the map is still shown
    def read_only(path, array):  # noqa: ANN001, ANN202
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(data, "write_npy", read_only)
    at = _page()
    at.radio(key="w_projection").set_value("UMAP").run(timeout=TIMEOUT)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert _figure(at, "UMAP of the GPA residuals") and not umap_file.exists()
    data.umap_coordinates.clear()


def test_the_map_is_a_picture_until_the_chart_is_made_interactive(run) -> None:
    """First visit: a server-drawn picture (no Plotly code for the browser to load); the toggle
    turns it into the lasso chart, and the session keeps that choice across page switches."""
    at = _page(interactive=False)
    assert not at.get("plotly_chart") and len(at.image) == 1
    assert any("Turn on the interactive chart" in c.value for c in at.caption)
    at.toggle(key=INTERACTIVE).set_value(True).run(timeout=TIMEOUT)
    assert len(at.get("plotly_chart")) == 1
    at.switch_page("pages/1_Stimuli.py").run(timeout=TIMEOUT)
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert at.toggle(key=INTERACTIVE).value and len(at.get("plotly_chart")) == 1


def test_large_maps_send_no_text_per_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above HOVER_TEXT_LIMIT points the scatter carries coordinates and colours only (float32),
    and a selection's rows come from the points' indices in the first trace."""
    from convergence_core.dashboard import plots

    monkeypatch.setattr(plots, "HOVER_TEXT_LIMIT", 50)
    n = 200
    rng = np.random.default_rng(0)
    x, y, colour = rng.random(n), rng.random(n), rng.random(n)
    figure = plots.residual_scatter(
        x, y, colour, ids=[f"s{i}" for i in range(n)], captions=["c"] * n,
        scores={"mean": colour, "pc1": colour}, colour_title="t", x_title="x", y_title="y",
        title="map", selected=[3, 150],
    )
    spec = json.loads(figure.to_json())
    points, overlay = spec["data"]
    assert "text" not in points and "customdata" not in points
    assert points["x"]["dtype"] == "f4" and points["marker"]["color"]["dtype"] == "f4"
    assert list(_array(overlay["customdata"])) == [3, 150]
    selection = {"points": [{"point_index": 7}, {"point_index": 120}, {"customdata": 150}]}
    assert selection_io.rows_from_chart_selection(selection, n) == [7, 120, 150]


def test_an_uploaded_selection_is_read_into_rows_and_messages() -> None:
    """The page's import in one pure function: rows of the known ids in the file's order, the
    unknown ones named (shortened), and None (selection unchanged) for nothing usable."""
    known = {"a": 0, "b": 1, "c": 2}

    def rows_of(ids):  # noqa: ANN001, ANN202
        return (np.array([known[i] for i in ids if i in known], dtype=np.int64),
                [i for i in ids if i not in known])

    rows, messages = selection_io.imported_selection(b"id\nc\nghost\na\n", rows_of, str.upper)
    assert rows.tolist() == [2, 0]
    assert messages == [
        ("warning", "1 id(s) in the file are not in this run and were left out:"),
        ("text", "GHOST"),
        ("success", "Imported 2 stimuli as the current selection."),
    ]
    rows, messages = selection_io.imported_selection(b"x\ny\n", rows_of)
    assert rows is None and messages[-1][0] == "error" and "unchanged" in messages[-1][1]
    rows, messages = selection_io.imported_selection(b"\xff\xfe", rows_of)
    assert rows is None and messages == [
        ("error", "Could not read the uploaded file: the id list is not UTF-8 text; save it as a "
         "UTF-8 CSV with an 'id' column")
    ]
    many = [f"u{i}" for i in range(25)]
    listed = selection_io.unknown_id_messages(many, "pasted")
    assert listed[0] == ("warning", "25 pasted id(s) are not in this run and were left out:")
    assert listed[1][1].endswith("u19 …") and "u20" not in listed[1][1]
    assert selection_io.unknown_id_messages([], "pasted") == []


def test_an_uploaded_files_words_in_a_message_are_text_not_markdown(run) -> None:
    """An error quotes the file's column names: a Markdown link there is shown as its text."""
    at = _page()
    content = b"[click](http://example.invalid),score\n1,2\n3,4\n"
    at.file_uploader(key="w_import").upload("table.csv", content, "text/csv")
    at.run(timeout=TIMEOUT)
    errors = [e.value for e in at.error]
    assert any(r"\[click\]\(http\:\/\/example\.invalid\)" in e for e in errors), errors
    assert any("[click](http://example.invalid)" in e for e in shown(at.error))


def test_a_run_of_two_gpa_models_says_its_pc2_is_rounding(monkeypatch, tmp_path) -> None:
    """Two GPA models give the residuals one principal component: the PCA map's PC2 axis is
    rounding noise (0.0 % of variance), and the page says so; with three it says nothing."""
    from convergence_core.dispersion import two_model_note
    from tests.fixtures_runs import make_synthetic_run

    make_synthetic_run(tmp_path / "runs", n=30, name="demo", plant="quiet_half", n_vision=2,
                       images=False, thumbnails=False)
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    at = _page(interactive=False)
    assert f"PC2 is rounding noise here. {two_model_note(2)}" in [c.value for c in at.caption]


def test_a_run_of_three_gpa_models_has_no_two_model_note(run) -> None:
    at = _page(interactive=False)
    assert not any("PC2 is rounding noise" in c.value for c in at.caption)


def test_ids_beginning_or_ending_with_a_space_are_read_back_as_written() -> None:
    """Run ids keep their spaces; the page's own export of " a b" and "x " read back as "a b"
    and "x", ids the run does not have (from the review)."""
    known = {" a b", "x ", "c"}
    exported = selection_io.selection_csv([" a b", "x "], [["one"], ["two"]])
    assert selection_io.parse_id_list(exported, known) == [" a b", "x "]
    assert selection_io.parse_id_list(" a b\nx \n c \n", known) == [" a b", "x ", "c"]
