"""Datasets of paired stimuli: one image and one or more captions per stimulus, in a fixed order
(or captions alone: a table without an ``image`` column, whose vision models come from files).

A :class:`Dataset` is a root folder plus a stimulus table. Every loader returns the same shape:

* ``stimuli`` DataFrame, one row per stimulus, in the dataset's order:
  ``id`` (str, unique), ``image`` (str, path relative to ``root``, always inside it),
  ``captions`` (list[str], at least one entry once checked), optional ``label`` (str).
* ``source``: a JSON-able dict saying how it was loaded (``kind``, ``path``, ``options``).

Loaders
-------
``load_coco``      COCO captions format: ``captions.json`` + image folder (ordered by image id).
``load_table``     a CSV / JSONL / parquet table with an ``image`` column and either
                   ``captions`` (a list; in CSV, or as a string anywhere, ``|``-separated) or
                   ``caption`` (one caption per row; rows sharing an id/image are merged, captions
                   kept in row order), plus optional ``id`` and ``label`` columns. Without an
                   ``image`` column (``id`` and captions only) it is a data set *without images*
                   (``Dataset.images`` False): captions for language models and the dashboard,
                   with every vision model's features from files.
``load_labelled``  ImageNet-sample style ``labels.csv`` (image, wnid, label); caption from a template.
``load_hf``        a Hugging Face ``datasets`` source; images are written as files into the cache.
``load_dataset``   dispatches on ``kind`` or detects it from ``spec``.

Captions are stripped of surrounding whitespace and blank entries are removed; a stimulus left
with no caption is reported by :func:`check_dataset` as "empty caption". Ids given as such (a
table's ``id`` column, COCO image ids, a Hugging Face ``id_column``) are read as every id is
(:func:`.sources.stimulus_id`: text without surrounding whitespace; a blank one is refused
naming the row), so that they match the ids of feature files; ids made of image paths or row
numbers are those as they are.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .images import TOO_LARGE, TOO_LARGE_FIX, ImageFileError, image_problem, resolve_inside
from .settings import cache_root
from .sources import stimulus_id

__all__ = [
    "Dataset",
    "DatasetUnavailableError",
    "InputsUnavailableError",
    "check_dataset",
    "dataset_fingerprint",
    "load_coco",
    "load_dataset",
    "load_hf",
    "load_labelled",
    "load_table",
    "safe_relative_path",
]

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
CAPTION_SEPARATOR = "|"
#: how many bad items a check_dataset error message lists before summarising
_MAX_LISTED = 20


class DatasetUnavailableError(ValueError):
    """A remote dataset cannot be reached (offline) and no local copy was given."""


class InputsUnavailableError(DatasetUnavailableError):
    """The data set cannot be loaded and model weights are missing too: one error for both.

    Offline, the first run of a config (the paper's) usually lacks the data set and every hub
    model's weights; naming them all at once spares a round trip per missing input. Raised by
    ``precompute``; catch it as :class:`DatasetUnavailableError` (or ``ValueError``).

    Attributes: ``dataset_error`` (the :class:`DatasetUnavailableError`), ``weights_error`` (the
    ``models.WeightsUnavailableError`` naming every missing model), ``models`` (those models).
    """

    def __init__(self, dataset_error: DatasetUnavailableError, weights_error: ValueError) -> None:
        self.dataset_error = dataset_error
        self.weights_error = weights_error
        self.models: tuple[str, ...] = tuple(getattr(weights_error, "models", ()))
        count = f"{len(self.models)} model{'s' if len(self.models) != 1 else ''}"
        weights = str(weights_error).replace("\n", "\n  ")  # its own list, indented under ours
        super().__init__(
            f"the data set and the weights of {count} are not available here; supply them all, "
            f"then run again:\n- {dataset_error}\n- {weights}"
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    """Ordered stimuli (image + captions) under one root folder.

    Attributes:
        name: short display name.
        root: absolute folder; every ``stimuli.image`` is relative to it and stays inside it.
        stimuli: DataFrame with columns ``id``, ``image``, ``captions`` and optionally ``label``.
        source: how the dataset was loaded: ``{"kind", "path", "options"}`` (JSON-able).
        images: False for a data set without images (a table of ids and captions): every
            ``image`` is ``""``, and there is nothing for a vision encoder to embed.
    """

    name: str
    root: Path
    stimuli: pd.DataFrame
    source: dict[str, Any] = field(default_factory=dict)
    images: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())
        _validate_stimuli(self.stimuli, self.root, images=self.images)

    def __len__(self) -> int:
        return len(self.stimuli)

    def _check_images(self) -> None:
        if not self.images:
            raise ValueError(
                f"dataset {self.name!r} has no images (a table of ids and captions); give vision "
                "models as feature files, or use a data set with an 'image' column"
            )

    def image_path(self, row: int) -> Path:
        """Absolute path of the image of stimulus ``row`` (0-based position)."""
        self._check_images()
        return self.root / self.stimuli["image"].iat[int(row)]

    def image_paths(self) -> list[Path]:
        """Absolute image paths of all stimuli, in order."""
        self._check_images()
        return [self.root / rel for rel in self.stimuli["image"]]

    def first_captions(self) -> list[str]:
        """The first caption of every stimulus, in order ("" where a stimulus has none)."""
        return [caps[0] if len(caps) else "" for caps in self.stimuli["captions"]]

    def with_stimuli(self, stimuli: pd.DataFrame) -> Dataset:
        """A copy with another stimulus table (same root, name and source); index is reset."""
        return Dataset(
            self.name, self.root, stimuli.reset_index(drop=True), dict(self.source), self.images
        )


# --------------------------------------------------------------------------- validation helpers


def safe_relative_path(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    _real_dirs: dict[str, str] | None = None,
) -> str:
    """``path`` (relative to ``root``, or absolute inside it) as a normalised POSIX relative path.

    Two checks: lexically (``..`` components resolved as text) the path must stay under ``root``,
    and once symbolic links are resolved, the file it names must still lie inside the resolved
    ``root``. So a dataset may hold symlinked images or folders whose targets are inside the
    root, but a link to anything outside it is refused (it would be read and embedded). A
    backslash is read as a separator (a table written on Windows), before the checks.
    ``_real_dirs`` caches resolved folders across the calls of one bulk check.

    Raises:
        ValueError: the path is empty, escapes ``root`` (``../``, an absolute path outside), or
        leads outside it through a symbolic link.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"empty image path in dataset under {root}; every stimulus needs an image file"
        )
    text = text.replace("\\", "/")
    root_abs = os.path.normpath(os.path.abspath(os.fspath(root)))
    joined = os.path.normpath(os.path.join(root_abs, text))
    if os.path.commonpath([root_abs, joined]) != root_abs or joined == root_abs:
        raise ValueError(
            f"image path {text!r} points outside the dataset root {root_abs}; image paths must "
            "be relative to the root (no '../', no absolute path elsewhere): move the images "
            "under the root or load the dataset with a root that contains them"
        )
    real_dirs = {} if _real_dirs is None else _real_dirs
    folder, name = os.path.split(joined)
    if root_abs not in real_dirs:
        real_dirs[root_abs] = os.path.realpath(root_abs)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    real_root, target = real_dirs[root_abs], os.path.join(real_dirs[folder], name)
    if os.path.islink(target):
        target = os.path.realpath(target)
    if os.path.commonpath([real_root, target]) != real_root or target == real_root:
        raise ValueError(
            f"image path {text!r} points outside the dataset root {root_abs} through a symbolic "
            f"link (it leads to {target}); copy the file into the root instead of linking to it, "
            "or load the dataset with a root that contains the link's target"
        )
    return Path(os.path.relpath(joined, root_abs)).as_posix()


def _clean_captions(value: Any, *, split: bool = False) -> list[str]:
    """Normalise a caption cell to a list of non-blank, stripped strings.

    A string is one caption, or with ``split=True`` several joined by ``|``.
    """
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):  # a missing cell read by pandas
        return []
    if isinstance(value, str):
        parts = value.split(CAPTION_SEPARATOR) if split else [value]
    elif isinstance(value, Iterable):
        parts = [str(v) for v in value if v is not None]
    else:
        parts = [str(value)]
    return [p.strip() for p in parts if p is not None and p.strip()]


def _validate_stimuli(stimuli: pd.DataFrame, root: Path, *, images: bool = True) -> None:
    if not isinstance(stimuli, pd.DataFrame):
        raise ValueError(f"stimuli must be a pandas DataFrame, got {type(stimuli).__name__}")
    missing = [c for c in ("id", "image", "captions") if c not in stimuli.columns]
    if missing:
        raise ValueError(
            f"stimulus table lacks column(s) {missing}; it needs id, image and captions"
        )
    ids = stimuli["id"]
    if not all(isinstance(i, str) and i for i in ids):
        raise ValueError("stimulus ids must be non-empty strings; convert them with str()")
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"stimulus ids must be unique; duplicated: {duplicated[:10]}"
            f"{' ...' if len(duplicated) > 10 else ''}; give each row its own id"
        )
    real_dirs: dict[str, str] = {}
    for rel in stimuli["image"]:
        if not images:
            if rel != "":
                raise ValueError(
                    f"image path {rel!r} in a data set without images; leave every image empty"
                )
            continue
        if not isinstance(rel, str) or safe_relative_path(root, rel, _real_dirs=real_dirs) != rel:
            raise ValueError(
                f"image path {rel!r} is not a normalised path relative to {root}; "
                "build the table with a loader (load_dataset) or safe_relative_path()"
            )
    for caps in stimuli["captions"]:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError("every captions cell must be a list of strings")


def _make_stimuli(
    ids: list[str], images: list[str], captions: list[list[str]], labels: list[str] | None
) -> pd.DataFrame:
    data: dict[str, Any] = {"id": ids, "image": images, "captions": captions}
    if labels is not None:
        data["label"] = labels
    frame = pd.DataFrame(data)
    frame["id"] = frame["id"].astype(object)
    frame["image"] = frame["image"].astype(object)
    return frame


def _existing_dir(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{what} root {path} is not a folder; pass the folder holding the data")
    return path


def _within(root: Path, name: str | os.PathLike[str], what: str) -> Path:
    """A file named relative to ``root`` (or absolute anywhere) that must exist."""
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist; check the path or the dataset root")
    return path


#: COCO ids are integers; strings are accepted too (integers sort first, numerically)
_COCO_ID_TYPES = (int, str)


def _coco_sort_key(value: Any) -> tuple[int, Any]:
    return (1, value) if isinstance(value, str) else (0, value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_coco_id(value: Any) -> bool:
    return isinstance(value, _COCO_ID_TYPES) and not isinstance(value, bool)


def _checked_coco_entries(path: Path, images: Any, annotations: Any) -> tuple[list, list]:
    """``images`` and ``annotations`` of a COCO captions file, each entry checked for the keys and
    types the loader reads; ValueError listing the first problems and the fix otherwise."""
    layout = (
        'COCO captions format: "images": [{"id": int, "file_name": str}, ...], '
        '"annotations": [{"image_id": int, "caption": str}, ...]'
    )
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(
            f"{path}: 'images' and 'annotations' must be lists (got "
            f"{type(images).__name__} and {type(annotations).__name__}); use the {layout}"
        )
    problems: list[str] = []
    for i, image in enumerate(images):
        if not isinstance(image, Mapping):
            problems.append(f"images[{i}] is a {type(image).__name__}, not an object")
            continue
        if not _is_coco_id(image.get("id")):
            problems.append(f"images[{i}] has id {_short(image.get('id'))} (needs an integer)")
        elif stimulus_id(image["id"]) is None:
            problems.append(f"images[{i}] has a blank id {_short(image['id'])} (needs an integer)")
        name = image.get("file_name")
        if not isinstance(name, str) or not name.strip():
            what = "no file_name" if name is None else f"file_name {_short(name)} (needs a string)"
            problems.append(f"images[{i}] has {what}")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, Mapping):
            problems.append(f"annotations[{i}] is a {type(ann).__name__}, not an object")
            continue
        if not _is_coco_id(ann.get("image_id")):
            problems.append(
                f"annotations[{i}] has image_id {_short(ann.get('image_id'))} (needs an integer)"
            )
        if "id" in ann and not _is_coco_id(ann["id"]):
            problems.append(f"annotations[{i}] has id {_short(ann['id'])} (needs an integer)")
        caption = ann.get("caption")
        if not isinstance(caption, str):
            what = (
                "no caption" if caption is None else f"caption {_short(caption)} (needs a string)"
            )
            problems.append(f"annotations[{i}] has {what}")
    ids = [im["id"] for im in images if isinstance(im, Mapping) and _is_coco_id(im.get("id"))]
    if len({type(v) for v in ids}) > 1:
        problems.append("image ids mix integers and strings (use integers throughout)")
    # string ids read as every id does (sources.stimulus_id): "7" and "7 " are one stimulus
    read = [stimulus_id(v) for v in ids]
    first: dict[str, Any] = {}
    for value, sid in zip(ids, read):
        if sid is not None and first.setdefault(sid, value) != value:
            problems.append(
                f"image ids {first[sid]!r} and {value!r} are one id once surrounding whitespace "
                "is removed (as ids are read; give each image its own id)"
            )
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(
            f"{path} has {len(problems)} malformed entr{'y' if len(problems) == 1 else 'ies'}: "
            f"{listed[:2000]}{more}. Fix them to follow the {layout}"
        )
    return images, annotations


# --------------------------------------------------------------------------- loaders


def load_coco(
    root: str | os.PathLike[str],
    captions_file: str = "captions.json",
    images_dir: str = "images",
    *,
    name: str | None = None,
) -> Dataset:
    """Load a COCO captions-format dataset: ``<root>/<captions_file>`` + ``<root>/<images_dir>/``.

    Stimuli are ordered by COCO image id; ``id`` is the image id as a string; ``captions`` are
    all annotations of the image in annotation-id order. Images without any annotation are kept
    (they fail :func:`check_dataset` as "empty caption").
    """
    root_path = _existing_dir(root, "COCO dataset")
    ann_path = _within(root_path, captions_file, "COCO captions")
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
        images = data["images"]
        annotations = data["annotations"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{ann_path} is not a COCO captions file ({type(exc).__name__}: {exc}); it must be "
            'JSON with "images" [{id, file_name}] and "annotations" [{image_id, caption}]'
        ) from None
    except OSError as exc:  # no permission, a disk error
        from .cache import read_error_text

        raise ValueError(read_error_text(exc, ann_path, "COCO captions file")) from None
    images, annotations = _checked_coco_entries(ann_path, images, annotations)
    by_image: dict[Any, list[tuple[Any, str]]] = {}
    for position, ann in enumerate(annotations):
        by_image.setdefault(ann["image_id"], []).append((ann.get("id", position), ann["caption"]))
    ordered = sorted(images, key=lambda im: _coco_sort_key(im["id"]))
    ids, rels, caps = [], [], []
    real_dirs: dict[str, str] = {}
    for image in ordered:
        ids.append(stimulus_id(image["id"]))  # an integer's digits; a string id, stripped
        rels.append(
            safe_relative_path(
                root_path, Path(images_dir) / image["file_name"], _real_dirs=real_dirs
            )
        )
        anns = sorted(by_image.get(image["id"], []), key=lambda pair: _coco_sort_key(pair[0]))
        caps.append(_clean_captions([caption for _, caption in anns]))
    return Dataset(
        name=name or root_path.name,
        root=root_path,
        stimuli=_make_stimuli(ids, rels, caps, None),
        source={
            "kind": "coco",
            "path": str(root_path),
            "options": {"captions_file": str(captions_file), "images_dir": str(images_dir)},
        },
    )


def _read_jsonl(path: Path) -> pd.DataFrame:
    """A JSONL table, each value as JSON wrote it: a column of numbers with one missing stays
    numbers (pandas' reader made it floats, and ids or labels 1, 2 became '1.0', '2.0'); a
    byte-order mark is skipped."""
    records = []
    # lines end at "\n" only (splitlines would also split at U+2028 or NEL, which JSON allows
    # inside a string); a "\r" before it is JSON whitespace
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is not a JSON object ({{\"id\": ..., ...}})")
        records.append(record)
    if not records:
        raise ValueError("it holds no rows; write one JSON object per stimulus (or caption)")
    return pd.DataFrame(records, dtype=object)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".parquet":
            return pd.read_parquet(path, engine="pyarrow")
    except OSError as exc:
        if exc.errno is not None:  # no permission, a disk error: not the table's format
            from .cache import read_error_text

            raise ValueError(read_error_text(exc, path, "table")) from None
        raise ValueError(f"cannot read table {path} ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise ValueError(f"cannot read table {path} ({type(exc).__name__}: {exc})") from None
    raise ValueError(
        f"table {path} has an unsupported suffix {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}"
    )


#: file suffixes of images, by which a table column of image paths is recognised
_IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif",
})
#: names of a table column that mean "image" (lower case, separators removed): image_path,
#: imagePath, img, img_file, ...
_IMAGE_COLUMN_NAMES = frozenset(
    stem + end
    for stem in ("image", "images", "img", "imgs", "picture", "photo")
    for end in ("", "path", "paths", "file", "files", "filename", "filepath", "name", "relpath",
                "uri", "url", "loc", "location")
)
#: table columns with a meaning of their own, never taken for a misnamed image column
_TABLE_COLUMNS = frozenset({"id", "caption", "captions", "label"})


def _misnamed_image_column(frame: pd.DataFrame) -> tuple[str, str] | None:
    """``(column, why)`` for a column of a table without an ``image`` column that looks like its
    image column under another name, else None. A column looks so when

    * its name, in lower case without separators, is "image" spelt otherwise (``Image``,
      ``IMAGE``, `` image``), one of ``_IMAGE_COLUMN_NAMES`` (``img``, ``image_path``,
      ``imagePath``, ``img_file``, ``photo``, ...) or a near miss of "image" (difflib ratio at
      least 0.8: ``imgae``, ``imag``), unless it ends in "id"/"ids" (``image_id`` holds an
      image's id, not its file); or
    * every non-empty cell of it is text ending in an image file suffix (``.jpg``, ``.png``,
      ...; ``_IMAGE_SUFFIXES``), whatever its name (``file``, ``path``, ``stimulus``).

    ``id``, ``caption(s)`` and ``label`` are never taken (ids may be image file names)."""
    for column in frame.columns:
        name = str(column)
        if name in _TABLE_COLUMNS:
            continue
        squeezed = re.sub(r"[^0-9a-z]", "", name.lower())
        if squeezed in _IMAGE_COLUMN_NAMES:
            return name, "its name is a variant of 'image'"
        near = difflib.SequenceMatcher(None, squeezed, "image").ratio() >= 0.8
        if near and not squeezed.endswith(("id", "ids")):
            return name, "its name is close to 'image'"
    for column in frame.columns:
        name = str(column)
        if name in _TABLE_COLUMNS:
            continue
        cells = [text for value in frame[column] if (text := _cell_text(value)) is not None]
        if cells and all(
            isinstance(value, str) and os.path.splitext(value.strip())[1].lower() in _IMAGE_SUFFIXES
            for value in cells
        ):
            return name, f"its cells are image files, e.g. {cells[0]!r}"
    return None


def _cell_text(value: Any) -> str | None:
    """A table cell as text, or None where it is empty: None, NaN (a row without the key) or
    blank."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None  # an empty CSV cell


def load_table(
    root: str | os.PathLike[str],
    table: str | os.PathLike[str],
    *,
    name: str | None = None,
) -> Dataset:
    """Load a stimulus table (CSV, JSONL or parquet) whose image paths are relative to ``root``.

    Columns: ``image``; ``captions`` (a list, or a ``|``-separated string) or ``caption`` (one
    caption per row); optional ``id`` (default: the image path) and ``label``. With ``caption``,
    rows sharing the same id (or image, when there is no id column) are merged into one stimulus
    whose captions keep row order. Stimuli keep the table's order (first appearance). A table
    with ``id`` but no ``image`` column is a data set without images (``images=False``),
    unless another column looks like the image column under another name (``img``, ``Image``,
    ``image_path``, or cells that are image files: :func:`_misnamed_image_column`): that table
    is refused, naming the column, so that a misspelt image column does not silently make a
    data set without images. An image-less table leaves such a column out.
    """
    root_path = _existing_dir(root, "table dataset")
    table_path = _within(root_path, table, "stimulus table")
    frame = _read_table(table_path)
    columns = set(frame.columns)
    images = "image" in columns
    misnamed = None if images else _misnamed_image_column(frame)
    if not images and "id" not in columns:
        hint = "" if misnamed is None else (
            f"; its column {misnamed[0]!r} looks like the image column ({misnamed[1]}): "
            "rename it to 'image'"
        )
        raise ValueError(
            f"table {table_path} has no 'image' column (columns: {sorted(columns)}); "
            "add one holding each image's path relative to the dataset root (or, for a data set "
            f"without images whose vision models come from feature files, an 'id' column){hint}"
        )
    if misnamed is not None:
        column, why = misnamed
        raise ValueError(
            f"table {table_path} has no 'image' column, but its column {column!r} looks like one "
            f"({why}); rename that column to 'image' (each image's path relative to "
            f"{root_path}), or, for a data set without images whose vision models come from "
            "feature files, leave that column out of the table"
        )
    if "captions" in columns:
        caption_col = "captions"
    elif "caption" in columns:
        caption_col = "caption"
    else:
        raise ValueError(
            f"table {table_path} has neither a 'captions' nor a 'caption' column "
            f"(columns: {sorted(columns)}); add one"
        )
    has_id, has_label = "id" in columns, "label" in columns
    order: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    written: dict[str, str] = {}  # each id as its first row writes it (the id cell's text)
    real_dirs: dict[str, str] = {}
    for row, record in enumerate(frame.to_dict("records"), start=1):
        rel = ""
        if images:
            image = _cell_text(record["image"])  # not 'nan' / 'None' for an empty cell
            if image is None:
                raise ValueError(
                    f"table {table_path}: row {row} has no image; give every row an image path "
                    f"relative to {root_path}, or leave the row out"
                )
            rel = safe_relative_path(root_path, image, _real_dirs=real_dirs)
        # an id cell reads as every id does (sources.stimulus_id): "img1 " or "img1\r" is the
        # stimulus "img1", which an .npy's id list or a parquet feature file names as "img1".
        # An id made of the image path is the path as the data set stores it, not stripped
        key = stimulus_id(record["id"]) if has_id else rel
        if key is None:
            raise ValueError(
                f"table {table_path}: row {row} has no id; give every row an id (or leave the "
                "'id' column out, so that each stimulus is named by its image path)"
            )
        caps = _clean_captions(record[caption_col], split=caption_col == "captions")
        cell = str(record["id"]) if has_id else rel
        if key in rows:
            if caption_col == "captions" or rows[key]["image"] != rel:
                spaced = (
                    f" (written {written[key]!r} and {cell!r}: ids are read without surrounding "
                    "whitespace, so these are one id)" if written[key] != cell else ""
                )
                raise ValueError(
                    f"table {table_path} has id {key!r} on more than one row{spaced}; ids must be "
                    "unique (with a 'caption' column, rows of one stimulus must share id and "
                    "image)"
                )
            rows[key]["captions"].extend(caps)
            continue
        order.append(key)
        written[key] = cell
        rows[key] = {"image": rel, "captions": caps}
        if has_label:
            rows[key]["label"] = _cell_text(record["label"]) or ""
    stimuli = _make_stimuli(
        order,
        [rows[k]["image"] for k in order],
        [rows[k]["captions"] for k in order],
        [rows[k]["label"] for k in order] if has_label else None,
    )
    return Dataset(
        name=name or table_path.stem,
        root=root_path,
        stimuli=stimuli,
        source={"kind": "table", "path": str(root_path), "options": {"table": str(table_path)}},
        images=images,
    )


def load_labelled(
    root: str | os.PathLike[str],
    labels_csv: str = "labels.csv",
    template: str = "a photo of a {label}",
    *,
    name: str | None = None,
) -> Dataset:
    """Load an ImageNet-sample style folder: ``labels.csv`` with columns image, label (and wnid).

    Each stimulus gets one caption, ``template.format(label=label)``; ``id`` is the image file
    name without suffix, ``label`` is kept as a column.
    """
    root_path = _existing_dir(root, "labelled dataset")
    csv_path = _within(root_path, labels_csv, "labels")
    if "{label}" not in template:
        raise ValueError(
            f"caption template {template!r} lacks the '{{label}}' placeholder; "
            "e.g. 'a photo of a {label}'"
        )
    try:
        template.format(label="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"caption template {template!r} is invalid ({exc}); use only the {{label}} "
            "placeholder and double any other braces"
        ) from None
    frame = _read_table(csv_path)
    if not {"image", "label"} <= set(frame.columns):
        raise ValueError(
            f"{csv_path} needs columns 'image' and 'label' (has {list(frame.columns)})"
        )
    real_dirs: dict[str, str] = {}
    rels = [safe_relative_path(root_path, str(p), _real_dirs=real_dirs) for p in frame["image"]]
    stems = [Path(r).stem for r in rels]
    ids = stems if len(set(stems)) == len(stems) else rels
    labels = [str(v) for v in frame["label"]]
    caps = [_clean_captions([template.format(label=lab)]) if lab.strip() else [] for lab in labels]
    return Dataset(
        name=name or root_path.name,
        root=root_path,
        stimuli=_make_stimuli(ids, rels, caps, labels),
        source={
            "kind": "labelled",
            "path": str(root_path),
            "options": {"labels_csv": str(labels_csv), "template": template},
        },
    )


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

#: what a Hugging Face hub id can look like: ``name`` or ``owner/name``, each of letters, digits,
#: '-', '_' and '.', starting and ending with a letter or digit (``huggingface_hub``'s rule, a
#: little wider: it also refuses '--', '..' and over 96 characters); anything else is a path
_HUB_ID = re.compile(r"(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?")


def _not_a_local_folder(name: str, local: Path) -> str | None:
    """Why ``name`` (``load_hf``'s, ``~`` expanded as ``local``) names nothing to load, where it
    cannot be a hub id (a leading '/', '.' or '~', more than one '/', a backslash, ...) and
    nothing is there: said at once, without asking the hub (up to 5 s) about a mistyped path.
    None where it is there, or where it may be a hub id (the hub, or its cache, answers that)."""
    if _HUB_ID.fullmatch(name) or local.exists():
        return None
    return (
        f"the Hugging Face data set {name!r} names no folder here ({os.path.abspath(local)} does "
        "not exist) and is not a hub id (name or owner/name: letters, digits, '-', '_' and "
        "'.'); check the path, or point at the folder written by datasets.Dataset.save_to_disk() "
        "or holding the data set's parquet files (--dataset hf:/path/to/folder)"
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode for the Hugging Face ``datasets`` library (and ``huggingface_hub``) during
    one load, restored afterwards.

    Both read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, at import, into
    ``datasets.config.HF_HUB_OFFLINE`` (``HF_DATASETS_OFFLINE``, its old name) and
    ``huggingface_hub.constants.HF_HUB_OFFLINE``, so setting the variables now would come too
    late: the module values are switched (the variables too, for anything imported meanwhile).
    Offline, ``datasets.load_dataset`` asks no server (no 5 retries, ~28 s where DNS fails at
    once) and serves a hub data set from its cache (Hugging Face's documented offline mode), or
    raises at once when it is not cached.
    """
    import datasets.config
    import huggingface_hub.constants

    flags = [
        (module, name)
        for module, name in (
            (datasets.config, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_DATASETS_OFFLINE"),
            (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        )
        if hasattr(module, name)
    ]
    saved_flags = [getattr(module, name) for module, name in flags]
    variables = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_variables = {name: os.environ.get(name) for name in variables}
    try:
        for module, name in flags:
            setattr(module, name, True)
        os.environ.update(dict.fromkeys(variables, "1"))
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for name, value in saved_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _hub_usable() -> bool:
    """Whether the Hugging Face hub can be asked now: ``models.availability.hub_reachable`` (False
    at once in offline mode; else one probe of at most 5 s per process, shared with the weights
    check, which it then switches to offline mode too)."""
    from .models import availability

    return availability.hub_reachable()


def _hf_offline_message(
    name: str, subset: str | None, exc: BaseException, unreachable: str | None = None
) -> str:
    cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if unreachable:  # loaded in offline mode: say why first, then what datasets said
        cause = f"{unreachable} and it is not in the datasets cache ({cause})"
    return (
        f"cannot load the Hugging Face dataset {name!r}"
        f"{f' (subset {subset!r})' if subset else ''}: {cause}. Either run once with network "
        "access (it is then cached under HF_DATASETS_CACHE / cache_dir), or point at a local copy: "
        "--dataset hf:/path/to/folder (in Python, load_dataset('hf:/path/to/folder')) where the "
        "folder was written by "
        "datasets.Dataset.save_to_disk() or holds the dataset's parquet files "
        "(e.g. for the paper's WIT-1024 set: on a machine with network, "
        "datasets.load_dataset('minhuh/prh', revision='wit_1024', split='train')"
        ".save_to_disk('wit_1024') and copy that folder here)"
    )


def _hf_local_folder_message(name: str, folder: Path, exc: BaseException) -> str:
    """What to say when ``datasets`` cannot read the local folder ``folder`` (``name`` as given):
    the hub and its cache are beside the point there, so the message is about the folder."""
    cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load the folder {os.path.abspath(folder)} as a Hugging Face data set "
        f"(--dataset hf:{name}): {cause}. Point at a folder written by "
        "datasets.Dataset.save_to_disk() (it holds state.json or dataset_dict.json) or one "
        "holding the data set's data files (parquet, arrow, csv or json), or give an image "
        "folder without 'hf:' (--dataset PATH: images plus captions.json)"
    )


def _hf_hub_caches(cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The folders a hub dataset's files are downloaded into (``cache_dir``, the ``datasets``
    cache, its downloads and extracted archives, the hub's cache): the only places its image
    cells may name."""
    import datasets.config
    import huggingface_hub.constants

    folders = [
        cache_dir,
        datasets.config.HF_DATASETS_CACHE,
        datasets.config.DOWNLOADED_DATASETS_PATH,
        datasets.config.EXTRACTED_DATASETS_PATH,  # may be set apart from the downloads
        huggingface_hub.constants.HF_HUB_CACHE,
    ]
    return [Path(os.path.abspath(Path(f).expanduser())) for f in folders if f]


def _hf_image_file(text: str, row: int, dataset: str, folder: Path | None,
                   caches: Sequence[Path]) -> Path:
    """The file an HF image cell names by path alone (no bytes), once it is known to stay inside
    its place: for a local dataset its ``folder`` (a relative path is relative to that folder,
    never to the working directory; symbolic links are resolved: :func:`safe_relative_path`);
    for a hub dataset the Hugging Face caches it was downloaded into (``caches``). A file named
    elsewhere would be copied into the cache and embedded: ValueError naming the row, the path
    and the fix."""
    where = f"row {row} of the Hugging Face dataset {dataset!r}"
    fix = (
        "put the image file inside the dataset folder and name it by a path relative to that "
        "folder, or store the image's bytes in the cell ({'bytes': <encoded image>, 'path': "
        "<file name>})"
    )
    text = text.replace("\\", "/")
    if folder is None:
        if os.path.isabs(text):
            for cache in caches:
                try:
                    return cache / safe_relative_path(cache, text)
                except ValueError:
                    continue
        raise ValueError(
            f"{where}: its image cell names the file {text!r} without the image's bytes, and "
            "that path is not a file the dataset downloaded into the Hugging Face caches "
            f"({', '.join(str(c) for c in caches)}); such a file is never read. Point at a local "
            f"copy of the dataset instead (hf:/path/to/folder) and {fix}"
        )
    # the folder as named, or with its symbolic links resolved (an absolute path may use either)
    inside = []
    for root in dict.fromkeys((os.path.abspath(folder), os.path.realpath(folder))):
        joined = os.path.normpath(os.path.join(root, text))
        if joined != root and os.path.commonpath([root, joined]) == root:
            inside.append(root)
    if not inside:
        kind = "an absolute path" if os.path.isabs(text) else "a relative path with '../'"
        raise ValueError(
            f"{where}: its image cell names the file {text!r} ({kind}), which lies outside the "
            f"dataset folder {folder}; it was not read. Image files named by path must lie "
            f"inside that folder: {fix}"
        )
    try:
        rel = safe_relative_path(inside[0], text)
    except ValueError as exc:  # lexically inside: a symbolic link leads out
        raise ValueError(
            f"{where}: its image cell names the file {text!r}, which leads outside the dataset "
            f"folder {folder} through a symbolic link ({exc}); it was not read. Copy the image "
            f"into the folder instead of linking to it: {fix}"
        ) from None
    return Path(inside[0]) / rel


def _read_image_file(path: Path, text: str, row: int, dataset: str) -> bytes:
    """The bytes of the regular file ``path`` (never a FIFO or device, which could block or
    never end); ValueError naming the row and the path where there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ValueError(
            f"row {row} of the Hugging Face dataset {dataset!r}: its image cell names the file "
            f"{text!r}, which cannot be read ({exc.strerror or exc}); check that the image file "
            "is there (in the dataset folder, or for a hub dataset in its download)"
        ) from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(
                f"row {row} of the Hugging Face dataset {dataset!r}: its image cell names "
                f"{text!r}, which is not a regular file; name an image file"
            )
        return file.read()


def _hf_image_bytes(
    value: Any,
    *,
    row: int = 0,
    dataset: str = "",
    folder: Path | None = None,
    caches: Sequence[Path] = (),
) -> tuple[bytes, str]:
    """(encoded bytes, suffix) of one HF image cell: a PIL image or {"bytes", "path"} dict. A
    cell with a path and no bytes is read only from inside the dataset's ``folder`` (local) or
    the Hugging Face ``caches`` (hub): :func:`_hf_image_file`."""
    from PIL import Image

    if isinstance(value, Mapping):
        raw = value.get("bytes")
        if raw:
            try:
                with Image.open(io.BytesIO(raw)) as probe:
                    detected = (probe.format or "").lower()
            except Exception:  # undecodable bytes are kept as they are; check_dataset reports them
                detected = ""
            suffix = {"jpeg": ".jpg", "": Path(value.get("path") or "x.img").suffix}.get(
                detected, f".{detected}"
            )
            return bytes(raw), suffix.lower() or ".img"
        text = value.get("path")
        if isinstance(text, str) and text.strip():
            path = _hf_image_file(text, row, dataset, folder, caches)
            return _read_image_file(path, text, row, dataset), path.suffix.lower() or ".jpg"
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        fmt = (value.format or "PNG").upper()
        fmt = fmt if fmt in {"JPEG", "PNG", "WEBP", "GIF", "BMP"} else "PNG"
        image = value if fmt != "JPEG" or value.mode in ("RGB", "L") else value.convert("RGB")
        image.save(buffer, format=fmt)
        return buffer.getvalue(), "." + ("jpg" if fmt == "JPEG" else fmt.lower())
    raise ValueError(
        f"image cell of type {type(value).__name__} is not an image; pick the image column with "
        "image_column=..."
    )


def load_hf(
    name: str,
    subset: str | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    images_cache: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load a Hugging Face ``datasets`` source and materialise its images as files.

    ``name`` is a hub id (``"minhuh/prh"``) or a local folder (written by ``save_to_disk`` or
    holding data files such as parquet). ``subset`` is the config name, ``revision`` a hub
    branch/tag (the paper's WIT-1024 set is ``minhuh/prh`` at ``revision="wit_1024"``).
    ``cache_dir`` is the Hugging Face library's own cache (default: its own, HF_DATASETS_CACHE).
    Images are written to ``<images_cache or cache_dir or cache_root()>/datasets/<name>/images/
    <row>.<ext>`` (atomic writes; a file already holding the same bytes is left alone; the suffix
    follows the decoded format), which becomes the dataset root. ``caption_column``
    cells may be a string or a list of strings. ``limit`` keeps the first ``limit`` rows.

    A hub id is loaded in offline mode (:func:`_hub_offline`, for this call only) when the hub
    cannot be reached (one probe of at most 5 s per process, or ``HF_HUB_OFFLINE`` set): a data
    set in the datasets cache is served from it, and one that is not fails at once instead of
    retrying the hub for half a minute. A local folder never asks the hub, and neither does a
    ``name`` that cannot be a hub id (``./data/wit``, ``/abs/folder``, ``a/b/c``) and is not there.

    Raises:
        DatasetUnavailableError: offline / not found, with how to point at a local copy; a
            local folder ``datasets`` cannot read as a data set, with what it must hold.
        ValueError: ``name`` is no hub id and no folder here (a mistyped path: at once); an
            image cell that names a file by path outside the dataset's folder (or, for a hub
            dataset, outside the Hugging Face caches), or a file that cannot be read.
    """
    local = Path(name).expanduser()
    problem = _not_a_local_folder(name, local)
    if problem is not None:
        raise ValueError(problem)
    import datasets as hf_datasets

    from .cache import write_bytes

    # a hub id: ask the hub only when it answers (one short probe per process); otherwise load
    # in offline mode, from the datasets cache or failing at once, instead of 5 retries (~28 s)
    unreachable = None
    if not local.is_dir() and not _hub_usable():
        from .models.availability import _hub_unreachable_cause

        unreachable = _hub_unreachable_cause()
    try:
        saved_to_disk = local.is_dir() and any(
            (local / marker).is_file() for marker in ("dataset_dict.json", "state.json")
        )
        if saved_to_disk:
            loaded = hf_datasets.load_from_disk(str(local))
            if isinstance(loaded, hf_datasets.DatasetDict):
                loaded = loaded[split]
        else:
            with _hub_offline() if unreachable else contextlib.nullcontext():
                loaded = hf_datasets.load_dataset(
                    str(local) if local.is_dir() else name,
                    subset,
                    split=split,
                    revision=revision,
                    cache_dir=None if cache_dir is None else str(cache_dir),
                )
    except Exception as exc:  # datasets wraps hub failures in its own exception types
        expected = isinstance(exc, (ConnectionError, OSError, ValueError)) or type(
            exc
        ).__module__.startswith(("datasets", "huggingface_hub", "requests", "httpx"))
        if not expected:
            raise
        if local.is_dir():  # a folder here that datasets cannot read: no hub, no network
            raise DatasetUnavailableError(_hf_local_folder_message(name, local, exc)) from None
        message = _hf_offline_message(name, subset, exc, unreachable)
        raise DatasetUnavailableError(message) from None
    columns = set(loaded.column_names)
    for column, what in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in columns:
            raise ValueError(
                f"dataset {name!r} has no column {column!r} (columns: {sorted(columns)}); "
                f"pass {what}=<one of them> (on the command line: a config file whose "
                f"[dataset] table has kind = \"hf\", path = ... and {what} = ..., as in "
                "configs/paper-wit1024.toml)"
            )
    if limit is not None:
        loaded = loaded.select(range(min(int(limit), len(loaded))))
    if isinstance(loaded.features.get(image_column), hf_datasets.Image):
        loaded = loaded.cast_column(image_column, hf_datasets.Image(decode=False))
    safe = _UNSAFE_NAME.sub("_", f"{name}-{subset or ''}-{revision or ''}-{split}").strip("_.")
    root = Path(images_cache or cache_dir or cache_root())
    root = (root / "datasets" / safe).resolve()
    ids, rels, caps, labels = [], [], [], []
    width = max(5, len(str(len(loaded))))
    # image cells naming files by path: inside the local folder, or the hub's caches
    folder = Path(os.path.abspath(local)) if local.is_dir() else None
    caches = [] if folder is not None else _hf_hub_caches(cache_dir)
    for row, record in enumerate(loaded):
        data, suffix = _hf_image_bytes(
            record[image_column], row=row, dataset=name, folder=folder, caches=caches
        )
        rel = f"images/{row:0{width}d}{suffix}"
        target = root / rel
        if not target.is_file() or target.read_bytes() != data:  # never keep a stale image
            write_bytes(target, data)
        if id_column:  # read as every id is (sources.stimulus_id); row numbers need not be
            sid = stimulus_id(record[id_column])
            if sid is None:
                raise ValueError(
                    f"dataset {name!r}: row {row} has no id in column {id_column!r} (missing or "
                    "blank); give every row an id, or leave id_column out (rows are then named "
                    "by their position)"
                )
            ids.append(sid)
        else:
            ids.append(str(row))
        rels.append(rel)
        caps.append(_clean_captions(record[caption_column]))
        if label_column:
            labels.append(str(record[label_column]))
    return Dataset(
        name=Path(name).name if local.is_dir() else name,
        root=root,
        stimuli=_make_stimuli(ids, rels, caps, labels if label_column else None),
        source={
            "kind": "hf",
            "path": str(name),
            "options": {
                "subset": subset,
                "revision": revision,
                "split": split,
                "image_column": image_column,
                "caption_column": caption_column,
                "limit": limit,
            },
        },
    )


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "coco": load_coco,
    "table": load_table,
    "labelled": load_labelled,
    "hf": load_hf,
}


def _detect_kind(spec: str) -> tuple[str, str]:
    if spec.startswith("hf:"):
        return "hf", spec[3:]
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "captions.json").is_file():
            return "coco", spec
        if (path / "labels.csv").is_file():
            return "labelled", spec
        raise ValueError(
            f"cannot tell the kind of dataset in {path}: it has neither captions.json (COCO) nor "
            "labels.csv (labelled); point at a COCO folder, a labelled folder or a table file "
            "(CSV, JSONL or parquet; README: Data sets), or, in a config or from Python, give "
            "{kind = 'coco'|'table'|'labelled'|'hf', path = ...}"
        )
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return "table", spec
    if not path.exists():
        raise ValueError(f"dataset {spec!r} does not exist{_missing_path_hint(path)}")
    raise ValueError(
        f"dataset {spec!r} is neither a folder, a table file ({', '.join(TABLE_SUFFIXES)}) "
        "nor 'hf:<name>'; check the path"
    )


def _missing_path_hint(path: Path) -> str:
    """Where a data set path that does not exist was looked for, and where a folder of its name
    is (the data folder of ``settings.data_root``: $CONVERGENCE_DATA, or ../shared/data beside
    the checkout), as the rest of a sentence: the README's commands name ``../shared/data/...``,
    read from the working folder."""
    from .settings import data_root

    hint = ""
    if not path.is_absolute():
        hint = (
            f" (a relative path is read from the working folder {Path.cwd()}: "
            f"{os.path.abspath(path)})"
        )
    try:
        there = data_root() / path.name
    except (OSError, ValueError):
        return hint + "; check the path"
    if path.name and there.exists():  # path itself does not exist, so it is not this one
        return hint + f"; the data folder has {there}: give that path"
    return hint + "; check the path"


def _table_root(table: Path) -> Path:
    """The image root of the table file ``table``: its folder. Where ``table`` is a symbolic link
    whose first image is not beside the link but is beside the file the link leads to (a table
    linked into a project, its images left with the data), that file's folder."""
    if not table.is_symlink():
        return table.parent
    try:  # unreadable, no image column, no row: load_table says so
        first = (_cell_text(_read_table(table)["image"].iloc[0]) or "").replace("\\", "/")
    except (ValueError, KeyError, IndexError):
        return table.parent
    behind = table.resolve().parent
    missing = not (table.parent / first).exists() and (behind / first).exists()
    return behind if missing else table.parent


def load_dataset(
    spec: str | os.PathLike[str] | Mapping[str, Any], kind: str | None = None, **options: Any
) -> Dataset:
    """Load a dataset from a path, ``"hf:<name>"`` or a config mapping.

    Kinds: ``coco`` (folder with captions.json), ``labelled`` (folder with labels.csv), ``table``
    (a .csv/.jsonl/.parquet file; its folder is the root unless ``root=`` is given, or for a
    symbolic link the folder of its target where the images are there: :func:`_table_root`), ``hf``
    (``hf:<hub id or local folder>``). ``kind=None`` detects it. ``options`` go to the loader.
    A mapping spec is ``{"kind": ..., "path": ..., **options}`` (e.g. from a config file).
    """
    if isinstance(spec, Mapping):
        options = {**{k: v for k, v in spec.items() if k not in ("kind", "path")}, **options}
        kind = kind or spec.get("kind")
        if "path" not in spec:
            raise ValueError("a dataset config mapping needs a 'path' (folder, table or hf:<name>)")
        spec = spec["path"]
    spec = os.fspath(spec)
    if kind is None:
        kind, target = _detect_kind(spec)
    else:
        target = spec.removeprefix("hf:")
    if kind not in _LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; use one of {sorted(_LOADERS)}")
    try:
        if kind == "table":
            # absolute, symbolic links kept: a table linked into a git-annex / DataLad store has
            # its images (and its name) beside the link (or beside its target: _table_root);
            # images are still checked to stay inside that root once resolved
            table = Path(os.path.abspath(Path(target).expanduser()))
            root = options.pop("root", None) or _table_root(table)
            return load_table(root, table, **options)
        return _LOADERS[kind](target, **options)
    except TypeError as exc:
        if "argument" not in str(exc):
            raise
        raise ValueError(
            f"bad option for a {kind!r} dataset ({exc}); see help(convergence_core.datasets."
            f"{_LOADERS[kind].__name__})"
        ) from None


# --------------------------------------------------------------------------- checks, fingerprint


def _printable(text: Any) -> str:
    """``text`` as a string that can be written as UTF-8 (lone surrogates as ``\\udXXX``)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_problems(sid: Any, rel: Any, captions: Sequence[str], label: Any) -> list[str]:
    """Why the stimulus's id, image path, captions or label cannot be stored as UTF-8 text
    (a lone surrogate such as "\\ud800", e.g. from a JSON escape), or []."""
    problems = []
    if not _encodes(str(sid)):
        problems.append("id is not valid Unicode text (a lone surrogate)")
    if not _encodes(str(rel)):
        problems.append("image path is not valid Unicode text (a lone surrogate)")
    broken = [i + 1 for i, caption in enumerate(captions) if not _encodes(caption)]
    if broken:
        problems.append(
            f"caption{'s' if len(broken) > 1 else ''} {', '.join(map(str, broken[:5]))} "
            "not valid Unicode text (a lone surrogate such as \\ud800)"
        )
    if label is not None and not _encodes(str(label)):
        problems.append("label is not valid Unicode text (a lone surrogate)")
    return problems


def check_dataset(
    dataset: Dataset, *, drop_bad: bool = False, workers: int | None = None
) -> tuple[Dataset, list[dict[str, str]]]:
    """Find stimuli with a missing/corrupt image or no caption; raise, or drop them.

    Each image is checked with PIL ``verify()`` and a full decode (threads: ``workers``,
    default min(4, cpu count)), unless it leads outside the dataset root through a symbolic
    link or its header claims more than ``settings.max_image_pixels()`` pixels (then it is bad
    and never decoded). Ids, image paths, captions and labels must be valid Unicode text (a lone
    surrogate such as ``"\\ud800"`` cannot be stored). Texts in ``dropped`` are made printable
    (a lone surrogate becomes ``\\ud800``).

    Returns:
        ``(dataset, dropped)`` where ``dropped`` lists ``{"id", "image", "reason"}`` in stimulus
        order; with no problems it is ``(dataset, [])`` (the same object).

    Raises:
        ValueError: there are bad stimuli and ``drop_bad`` is False (lists the first 20 and the
        count; where an image is over the pixel limit, ends with how to raise
        ``$CONVERGENCE_MAX_IMAGE_PIXELS`` or resize it: ``images.TOO_LARGE_FIX``), or every
        stimulus is bad.
    """
    stimuli = dataset.stimuli
    n_workers = workers or min(4, os.cpu_count() or 1)
    root = dataset.root
    if not dataset.images:
        image_problems: list[str | None] = [None] * len(stimuli)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            image_problems = list(
                pool.map(lambda path: image_problem(path, root=root), dataset.image_paths())
            )
    labels = stimuli["label"] if "label" in stimuli.columns else None
    bad: list[dict[str, str]] = []
    bad_rows: list[int] = []
    for row, ((sid, rel, caps), problem) in enumerate(
        zip(stimuli[["id", "image", "captions"]].itertuples(index=False), image_problems)
    ):
        reasons = [f"image {problem}"] if problem else []
        if not caps:
            reasons.append("empty caption")
        reasons += _text_problems(sid, rel, caps, None if labels is None else labels.iat[row])
        if reasons:
            bad_rows.append(row)
            bad.append(
                {"id": _printable(sid), "image": _printable(rel), "reason": "; ".join(reasons)}
            )
    if not bad:
        return dataset, []
    # an image over the pixel limit: say which variable sets it and what to do
    fix = f"\n{TOO_LARGE_FIX}" if any(p and p.startswith(TOO_LARGE) for p in image_problems) else ""
    if not drop_bad:
        listed = "\n".join(
            f"  {b['id']}" + (f" ({b['image']})" if b["image"] else "") + f": {b['reason']}"
            for b in bad[:_MAX_LISTED]
        )
        more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise ValueError(
            f"{len(bad)} of {len(stimuli)} stimuli in dataset {dataset.name!r} are unusable:\n"
            f"{listed}{more}\nfix or remove them, or drop them explicitly "
            "(check_dataset(..., drop_bad=True) / precompute --drop-bad)"
            f"{fix}"
        )
    if len(bad) == len(stimuli):
        raise ValueError(
            f"every stimulus of dataset {dataset.name!r} is unusable (first: {bad[0]['reason']}); "
            f"check the dataset root and image paths{fix}"
        )
    keep = np.ones(len(stimuli), dtype=bool)
    keep[bad_rows] = False
    return dataset.with_stimuli(stimuli[keep]), bad


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"the {what} is not valid Unicode text (a lone surrogate); run check_dataset() first, "
            "which lists it (drop_bad=True / precompute --drop-bad drops it)"
        ) from None


def _image_hash(dataset: Dataset, sid: str, rel: str) -> bytes:
    """sha256 of the image file's bytes (read inside the data set root)."""
    file_hash = hashlib.sha256()
    try:
        with open(resolve_inside(dataset.root, dataset.root / rel), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_hash.update(block)
    except (OSError, ImageFileError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(
            f"cannot read image {rel!r} of stimulus {sid!r} to fingerprint the dataset "
            f"({cause}); run check_dataset() first"
        ) from None
    return file_hash.digest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 hex over every stimulus in order: id, image file bytes, captions and label.

    Changing an image's bytes, a caption, the order or the set of stimuli changes it; moving the
    dataset folder does not. Fields are length-prefixed so no two datasets collide by concatenation.
    """
    digest = hashlib.sha256(b"convergence-dataset-v1\0")

    def put(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    labels = dataset.stimuli["label"] if "label" in dataset.stimuli.columns else None
    for row, (sid, rel, caps) in enumerate(
        dataset.stimuli[["id", "image", "captions"]].itertuples(index=False)
    ):
        put(_utf8(sid, f"id of stimulus {row}"))
        # no image: b"" (length-prefixed, so never equal to an image's 32-byte hash)
        put(_image_hash(dataset, sid, rel) if dataset.images else b"")
        put(_utf8(json.dumps(list(caps), ensure_ascii=False), f"a caption of stimulus {row}"))
        put(b"" if labels is None else _utf8(str(labels.iat[row]), f"label of stimulus {row}"))
    return digest.hexdigest()
