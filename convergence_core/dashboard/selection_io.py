"""Turning chart selections, uploaded files and pasted text into stimulus rows, and back into CSV.

Pure functions (no Streamlit): rows are 0-based positions in the run's stimulus order.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

def rows_from_chart_selection(selection: Mapping[str, Any] | None, n_stimuli: int) -> list[int]:
    """Stimulus rows of the points in a ``st.plotly_chart(on_select=...)`` selection.

    Each point's ``customdata`` holds its stimulus row (the scatter plots in ``plots.py`` set it);
    points without it fall back to ``point_index``. Rows outside ``[0, n_stimuli)`` are ignored.
    Returns sorted unique rows (empty for no selection).
    """
    if not selection:
        return []
    rows: set[int] = set()
    for point in selection.get("points", []) or []:
        custom = point.get("customdata")
        if isinstance(custom, (list, tuple)):
            custom = custom[0] if custom else None
        value = custom if custom is not None else point.get("point_index")
        try:
            row = int(value)
        except (TypeError, ValueError):
            continue
        if 0 <= row < n_stimuli:
            rows.add(row)
    return sorted(rows)


def selection_csv(ids: Sequence[str], captions: Sequence[Sequence[str]]) -> bytes:
    """CSV (UTF-8) with columns ``id, captions`` (an image's captions joined by `` | ``)."""
    if len(ids) != len(captions):
        raise ValueError(
            f"got {len(ids)} ids but {len(captions)} caption lists; pass one caption list per id"
        )
    frame = pd.DataFrame(
        {"id": [str(i) for i in ids], "captions": [" | ".join(map(str, c)) for c in captions]}
    )
    return frame.to_csv(index=False).encode("utf-8")


def parse_id_list(data: bytes | str, known: Container[str] = ()) -> list[str]:
    """Stimulus ids from an uploaded file or pasted text, in order, without duplicates.

    Accepts a CSV with an ``id`` column (e.g. a file written by :func:`selection_csv`, whose
    other columns are skipped as they are read), or plain ids separated by newlines, commas,
    semicolons, tabs or spaces. Blank entries are skipped. A line of a plain list that is one of
    the ``known`` ids (the run's) as a whole is that id, so that ids holding spaces or commas
    can be pasted or uploaded one per line (a file of such lines is a list, not a table). A
    table is read as a stream, row by row. The uploader's size limit
    (``server.maxUploadSize``) bounds an upload.

    A cell may be as long as the data (the caption column of an export may hold more than the
    csv module's default limit of 131,072 characters: :func:`_csv_fields_up_to`).

    Raises:
        ValueError: data that is not UTF-8 text, an uploaded table (rows of the same number
            of comma-separated cells; pasted text is always a list) without an ``id`` column,
            or text the csv module cannot read.
    """
    try:
        with _csv_fields_up_to(len(data)):
            return _parse_id_list(data, known)
    except UnicodeDecodeError as exc:
        raise ValueError(
            "the id list is not UTF-8 text; save it as a UTF-8 CSV with an 'id' column"
        ) from exc
    except csv.Error as exc:  # never a traceback on a page (the Alignment lab calls this bare)
        raise ValueError(
            f"the id list cannot be read as CSV ({exc}); save it as a UTF-8 CSV with an 'id' "
            "column, or as a plain list of ids, one per line"
        ) from exc


# csv.field_size_limit is one setting for the whole process, and Streamlit runs each session in
# a thread: parses that need a higher limit raise it together (never lowering it) and the last
# one to finish puts back the limit found by the first, so that concurrent parses never leave it
# raised for good (nor lower it under one another). While raised, other csv readers of the
# process accept fields as long as the data being parsed here, which is already in memory (an
# upload bounded by server.maxUploadSize, or pasted text).
_FIELD_LIMIT_LOCK = threading.Lock()
_field_limit_users = 0
_field_limit_saved = 0


@contextmanager
def _csv_fields_up_to(length: int) -> Iterator[None]:
    """The csv module reads fields of up to ``length`` characters (a cell of data of
    ``length`` characters, or UTF-8 bytes, is no longer) inside this block."""
    global _field_limit_users, _field_limit_saved
    with _FIELD_LIMIT_LOCK:
        current = csv.field_size_limit()
        if _field_limit_users == 0:
            _field_limit_saved = current
        _field_limit_users += 1
        if length >= current:  # a field raises csv.Error at the limit: one more than its length
            csv.field_size_limit(length + 1)
    try:
        yield
    finally:
        with _FIELD_LIMIT_LOCK:
            _field_limit_users -= 1
            if _field_limit_users == 0:
                csv.field_size_limit(_field_limit_saved)


def _parse_id_list(data: bytes | str, known: Container[str]) -> list[str]:
    # a table is read as a stream (an upload of 64 MB held at once as text and lines took ~6.5
    # times its size); its header is the first line that is not blank, the rest is read as
    # written (a caption may hold characters that splitlines breaks at)
    stream = (
        io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
        if isinstance(data, bytes)
        else io.StringIO(data, newline="")
    )
    first = next((line for line in stream if line.strip()), "")
    header = [cell.strip().lower() for cell in next(csv.reader([first]), [])]
    if "id" in header:
        column = header.index("id")  # only the id of each row is kept
        ids = [
            _whole_id(record[column], known) or record[column].strip() if column < len(record)
            else ""
            for record in csv.reader(stream)
        ]
    else:
        lines = (data.decode("utf-8-sig") if isinstance(data, bytes) else data).splitlines()
        rows = [line for line in lines if line.strip()][:6]
        widths = {len(next(csv.reader([line]), [])) for line in rows}
        if (
            isinstance(data, bytes) and len(rows) > 1 and len(widths) == 1 and widths.pop() > 1
            and not all(_whole_id(line, known) for line in rows)  # ids holding commas
        ):
            # a table (every row the same number of cells), not a list: its ids would be guessed
            raise ValueError(
                f"the file is a table without an 'id' column (its columns: "
                f"{', '.join(header[:8])}); name the column of stimulus ids 'id', or upload a "
                "plain list of ids, one per line"
            )
        ids = [
            token if whole else token.strip()
            for line in lines
            for whole in [_whole_id(line, known)]
            for token in ([whole] if whole else re.split(r"[\s,;]+", line))
        ]
    return list(dict.fromkeys(i for i in ids if i))


def _whole_id(text: str, known: Container[str]) -> str | None:
    """``text`` as one of the ``known`` ids: as written (an id may begin or end with a space),
    else stripped; None when it is neither."""
    return text if text in known else stripped if (stripped := text.strip()) in known else None


#: Unknown ids listed by name in a message (the rest are counted)
LISTED_UNKNOWN_IDS = 20


def unknown_id_messages(
    unknown: Sequence[str], source: str, shorten: Callable[[str], str] = str
) -> list[tuple[str, str]]:
    """``(kind, text)`` messages for ids of ``source`` ("the file", "pasted") that the run does
    not have: a warning with their count, then the first :data:`LISTED_UNKNOWN_IDS` as text
    (each through ``shorten``). No message when every id is known."""
    if not len(unknown):
        return []
    listing = ", ".join(map(shorten, unknown[:LISTED_UNKNOWN_IDS]))
    more = " …" if len(unknown) > LISTED_UNKNOWN_IDS else ""
    where = f"{source} id(s) are" if source == "pasted" else f"id(s) in {source} are"
    return [
        ("warning", f"{len(unknown)} {where} not in this run and were left out:"),
        ("text", listing + more),
    ]


def imported_selection(
    data: bytes,
    rows_of: Callable[[Sequence[str]], tuple[np.ndarray, list[str]]],
    shorten: Callable[[str], str] = str,
    known: Container[str] = (),
) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
    """An uploaded selection file read into the run's rows, and what to tell the user.

    ``rows_of(ids)`` gives ``(rows, unknown)`` for the run (``Catalogue.rows_of``); ``known``:
    the run's ids (:func:`parse_id_list`). Returns
    ``(rows, messages)``: the rows of the file's known ids in its order (None when the file
    cannot be read or names none of the run's stimuli: the selection stays as it was) and
    ``(kind, text)`` messages, kind one of "error", "warning", "text", "success".
    """
    try:
        wanted = parse_id_list(data, known)
    except ValueError as exc:
        return None, [("error", f"Could not read the uploaded file: {exc}")]
    rows, unknown = rows_of(wanted)
    messages = unknown_id_messages(unknown, "the file", shorten)
    if len(rows) == 0:
        messages.append((
            "error",
            "Empty selection: none of the ids in the file is in this run; the selection is "
            "unchanged.",
        ))
        return None, messages
    messages.append(("success", f"Imported {len(rows)} stimuli as the current selection."))
    return rows, messages
