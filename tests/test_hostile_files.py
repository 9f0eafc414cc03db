"""Hostile files: id lists with cells longer than the csv module's limit, thumbnails that are not
usable on the Universal space page's "Top captions per image" tab, and a stimulus table whose
caption cells are not lists.

Each is a clear message or a placeholder, never a traceback; a legitimate file (an export of
long captions) still works. Beside tests/test_hostile_inputs.py and
tests/test_hostile_datasets.py, whose run builders and page openers these tests reuse.
"""

from __future__ import annotations

import csv
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from convergence_core.dashboard import selection_io
from tests.page_reading import shown
from tests.test_hostile_datasets import (  # noqa: F401 (healthy_run: a fixture used by name)
    N_PAGE_RUN,
    PAGES,
    _damaged_cache,
    _open,
    healthy_run,
)

#: Characters of one stimulus's captions in the export below: more than the csv module's default
#: field limit (131,072), which made reading the file raise csv.Error
LONG = 140_000


def _long_caption_export(ids: list[str]) -> bytes:
    """The Residual space page's export (``selection_csv``) of ``ids``, the second one's
    captions totalling more than 128 KiB."""
    captions = [["a cat on a mat", "a mat"] for _ in ids]
    captions[1] = ["a dog " * 12_000, "b" * 70_000]  # 72,000 + 3 + 70,000 characters joined
    assert sum(map(len, captions[1])) > 128 * 1024
    return selection_io.selection_csv(ids, captions)


# ------------------------------ item 1: cells over the csv module's 131,072-character limit


def test_a_long_caption_export_reads_back_as_its_ids_and_leaves_the_csv_limit_alone():
    ids = ["img-1", "img 2", "img,3"]
    limit = csv.field_size_limit()
    assert selection_io.parse_id_list(_long_caption_export(ids), set(ids)) == ids
    assert selection_io.parse_id_list(_long_caption_export(ids)) == ids  # known ids not needed
    assert csv.field_size_limit() == limit  # raised for the parse only, then put back


def test_a_pasted_token_over_the_csv_limit_is_an_id_not_an_error():
    token = "x" * LONG
    for text in (token, f"a\n{token}\nb", f"{token},a"):
        wanted = selection_io.parse_id_list(text, {"a", "b"})
        assert token in wanted  # an id (unknown to the run: reported as such by the pages)
    # a plain-list file of such lines too, and an id column holding one
    assert selection_io.parse_id_list(f"{token}\n".encode()) == [token]
    assert selection_io.parse_id_list(f"id\n{token}\na\n".encode()) == [token, "a"]


def test_concurrent_parses_put_the_csv_limit_back():
    """Streamlit runs each session in a thread: parses that overlap raise the process-wide limit
    together and the last to finish restores it, whatever the order they end in."""
    limit = csv.field_size_limit()
    start = threading.Barrier(8)
    results: list[list[str]] = []
    failures: list[BaseException] = []

    def parse(n: int) -> None:
        ids = [f"s{n}-a", f"s{n}-b", f"s{n}-c"]
        data = _long_caption_export(ids) + b"x" * (n * 1000)  # parses of different lengths
        start.wait()
        try:
            for _ in range(3):
                results.append(selection_io.parse_id_list(data, set(ids))[:3])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=parse, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert len(results) == 24 and all(r[0].endswith("-a") for r in results)
    assert csv.field_size_limit() == limit


def _run_ids(cache: Path) -> list[str]:
    from convergence_core.run import load_run

    return load_run(cache / "runs" / "demo").stimuli["id"].astype(str).tolist()


def test_residual_space_imports_its_own_export_of_long_captions(
    healthy_run, tmp_path, monkeypatch  # noqa: F811
):
    from convergence_core.dashboard import state

    cache = _damaged_cache(healthy_run, tmp_path, lambda path: None)  # an intact copy
    ids = _run_ids(cache)
    chosen = [ids[5], ids[2], ids[9]]
    at = _open(cache, PAGES["Residual space"], monkeypatch)
    export = _long_caption_export(chosen)
    at.file_uploader(key="w_import").upload("selection.csv", export, "text/csv")
    at.run(timeout=90)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert "Imported 3 stimuli as the current selection." in shown(at.success)
    selection = state.get_selection(at.session_state, "demo")
    assert selection is not None and list(selection.ids) == chosen


def test_the_lab_reports_a_pasted_token_over_the_csv_limit_as_an_unknown_id(
    healthy_run, tmp_path, monkeypatch  # noqa: F811
):
    cache = _damaged_cache(healthy_run, tmp_path, lambda path: None)
    ids = _run_ids(cache)
    at = _open(cache, PAGES["Alignment lab"], monkeypatch, {"source": "pasted", "k": "3"})
    pasted = "\n".join(["y" * LONG, *ids[:6]])  # first: the lines read as CSV cells
    at.text_area(key="w_pasted_ids").set_value(pasted).run(timeout=90)
    assert not at.exception, at.exception
    assert "1 pasted id(s) are not in this run and were left out:" in shown(at.warning)
    assert not any("Empty selection" in e.value for e in at.error)


# --------------------------- item 2: the Universal space's "Top captions per image" thumbnail


def _link_out(run_path: Path) -> None:
    """thumbnails/0.jpg: a link to a real JPEG outside the run folder."""
    outside = run_path.parent.parent.parent / "outside.jpg"
    thumbnail = run_path / "thumbnails" / "0.jpg"
    shutil.copyfile(thumbnail, outside)
    thumbnail.unlink()
    thumbnail.symlink_to(outside)


def _html(run_path: Path) -> None:
    (run_path / "thumbnails" / "0.jpg").write_bytes(b"<html><body>not a jpeg</body></html>")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(_link_out, "it leads outside the run folder"), (_html, "it is not a JPEG file")],
    ids=["link-out-of-the-run", "html"],
)
def test_top_captions_shows_a_note_for_an_unusable_thumbnail(
    healthy_run, tmp_path, monkeypatch, damage, problem  # noqa: F811
):
    cache = _damaged_cache(healthy_run, tmp_path, damage)
    at = _open(cache, PAGES["Universal space"], monkeypatch)
    # 24 stimuli: at most 4 folds of held-out retrieval (its default is 5)
    next(box for box in at.number_input if box.label == "Folds").set_value(4)
    at.session_state["w_universal_tab"] = "Top captions per image"
    at.run(timeout=90)
    assert not at.exception, at.exception
    assert at.session_state["w_universal_image"] == _run_ids(cache)[0]  # row 0's thumbnail
    texts = [element.value for element in at.text]
    assert any(f"thumbnail unreadable: {problem}" in text for text in texts), texts
    assert any("rerun precompute" in text for text in texts), texts


# ------------------------------------------- item 3: caption cells of stimuli.parquet not lists


#: stimuli.parquet's captions column: every cell the integer 7 (the first bad row: 0), or two
#: missing cells (read as no captions) before the 7s (the first bad row: 2)
NOT_LISTS = {
    "all-7": ([7] * N_PAGE_RUN, 0),
    "missing-then-7": ([None, None] + [7] * (N_PAGE_RUN - 2), 2),
}


def _assert_names_the_problem(message: str, row: int) -> None:
    assert "stimuli.parquet" in message and "'captions'" in message, message
    assert f"int 7 at row {row} " in message, message  # the first bad row
    assert "not a list of captions" in message and "rerun precompute" in message, message


@pytest.mark.parametrize("case", sorted(NOT_LISTS))
def test_caption_cells_that_are_not_lists_are_a_clear_error(
    healthy_run, tmp_path, monkeypatch, capsys, case  # noqa: F811
):
    from convergence_core import cli
    from convergence_core.cache import CacheFormatError
    from convergence_core.run import load_run

    cells, row = NOT_LISTS[case]

    def damage(run_path: Path) -> None:
        table = run_path / "stimuli.parquet"
        frame = pd.read_parquet(table)
        # plain int64 cells, or nullable ones where some are missing
        frame["captions"] = pd.array(cells, dtype="Int64") if None in cells else cells
        frame.to_parquet(table)

    cache = _damaged_cache(healthy_run, tmp_path, damage)
    run_path = cache / "runs" / "demo"
    with pytest.raises(CacheFormatError) as raised:
        load_run(run_path)
    _assert_names_the_problem(str(raised.value), row)
    # `python -m convergence_core report RUN`: an error line and status 2, no traceback
    assert cli.main(["report", str(run_path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    _assert_names_the_problem(err, row)
    # Home: the run cannot be opened, said with the fix
    at = _open(cache, None, monkeypatch)
    assert not at.exception, at.exception
    errors = " ".join(element.value for element in at.error)
    assert "cannot be opened" in errors, errors
    _assert_names_the_problem(errors.replace("\\", ""), row)  # Markdown escapes removed


def test_caption_cells_of_one_string_or_missing_still_read(healthy_run, tmp_path):  # noqa: F811
    from convergence_core.run import load_run

    def edit(run_path: Path) -> None:
        table = run_path / "stimuli.parquet"
        frame = pd.read_parquet(table)
        frame["captions"] = ["one caption", None] * (N_PAGE_RUN // 2)
        frame.to_parquet(table)

    cache = _damaged_cache(healthy_run, tmp_path, edit)
    captions = load_run(cache / "runs" / "demo").stimuli["captions"].tolist()
    assert captions == [["one caption"], []] * (N_PAGE_RUN // 2)
