"""Where a model's representations come from: an encoder, arrays in memory, or files.

Every model of a run has a *source*; the pipeline (:mod:`.precompute`) asks each source for
``{layer: (n, d) array}`` in stimulus order and treats every model alike after that (stored
embeddings, neighbour lists, GPA, dispersion). Three kinds:

* :class:`EncoderSource` — a registry model (``models.get_spec``): images or captions are embedded
  (``extract``), every chosen layer.
* :class:`ArraySource` — arrays a caller already has (``write_run_from_embeddings``, notebooks).
* :class:`FileSource` — one file per layer that a user brings: any model, or brain recordings
  (stimuli × voxels per subject and region). Formats (:func:`read_feature_file`):

  - ``.npy`` (n, d) numeric, with its stimulus ids one per line in ``<file>.ids.txt`` (for a
    symbolic link: beside the link, else beside the file it leads to);
  - ``.parquet`` with an ``id`` column (or index) and one numeric column per feature.

  Rows are matched to the data set by id (each id read by :func:`stimulus_id`, the rule of every
  reader of ids: text without surrounding whitespace); missing, extra or duplicated ids, NaN/Inf
  rows, wrong shapes and non-numeric data raise :class:`FeatureFileError` naming the file and
  the fix. A run
  restricted to some of the stimuli (``PrecomputeConfig.stimuli``: those every file covers, or
  an id list) reads only their rows: extra rows are skipped there (``extra_rows``).
  Nothing is unpickled (``allow_pickle=False``).

A source's ``inputs()`` is the fingerprint that decides whether its stored embeddings are stale;
its ``check(stimuli, images_root)`` runs for every source before anything of the run is written
(cheap: a feature file's ids against the data set, a vision encoder's need for images), so that
bad input stops a run before hours of extraction rather than after them, and never resets an
existing run folder. ``width(layer)`` is a layer's feature count when it is known without
loading anything (arrays, a feature file's header; None for an encoder), so that the run can
check before any work that GPA across its models fits in memory.

Modalities: ``vision`` and ``language`` are the two sides of the alignment analyses (vision models
enter the intra-modal GPA by default); ``brain`` and any other name a user gives (letters, digits,
``_``, ``-``) are kept as such and can enter cross-modal analyses.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .validation import closest_name, is_missing_value

__all__ = [
    "ArraySource",
    "EncoderSource",
    "Extracted",
    "FeatureFileError",
    "FeatureIdsError",
    "FileSource",
    "KNOWN_MODALITIES",
    "check_feature_file",
    "check_modality",
    "feature_file_ids",
    "id_lines",
    "read_feature_file",
    "stimulus_id",
]

#: Modalities with a meaning in the analyses; any other safe name is accepted too.
KNOWN_MODALITIES = ("vision", "language", "brain")
#: The modalities with a role in the analyses (GPA; the two sides of an alignment)
_ROLE_MODALITIES = ("vision", "language")
#: A modality name: a letter, then up to 39 letters, digits, ``_`` or ``-`` (what the run writers
#: accept and the manifest reader checks).
MODALITY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,39}")
#: Suffix of the id list that accompanies an ``.npy`` feature file.
IDS_SUFFIX = ".ids.txt"


class FeatureFileError(ValueError):
    """A feature file cannot be used as it is (the message names the file and the fix)."""


class FeatureIdsError(FeatureFileError):
    """A feature file's ids do not match the run's stimuli: ids listed twice, missing or
    unknown to the data set."""


def check_modality(modality: object, model: str) -> str:
    """``modality`` if it is a usable name (``vision``, ``language``, ``brain`` or another).

    A free name that is a near-miss of ``vision`` or ``language`` (``visoin``, ``Language``) is
    refused: those two decide what enters GPA and which side of an alignment a model is on, so a
    typo would silently leave the model out of both.
    """
    if not isinstance(modality, str) or not MODALITY_NAME.fullmatch(modality):
        raise ValueError(
            f"modality {modality!r} of model {model!r} is not a usable name; use one of "
            f"{list(KNOWN_MODALITIES)} or a name of letters, digits, '_' and '-' (e.g. 'ecog')"
        )
    if modality not in KNOWN_MODALITIES:
        near = closest_name(modality.lower(), _ROLE_MODALITIES, cutoff=0.8)
        if near:
            raise ValueError(
                f"modality {modality!r} of model {model!r} looks like a misspelt {near!r}; "
                f"write {near!r} (vision models enter GPA, language models are the other side "
                "of every alignment), or a name further from both for another modality"
            )
    return modality


@dataclass
class Extracted:
    """What a source hands to the pipeline: ``{layer: (n, d) array}`` (layers shallow to deep),
    the default layer, the weights' identity (encoders) and details for the manifest."""

    arrays: dict[str, np.ndarray]
    default_layer: str
    weights_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: (layer, (n,) agreement among each stimulus's own captions), measured by an encoder while
    #: it was loaded (``properties.caption_agreement``), or None
    caption_agreement: tuple[str, np.ndarray] | None = None
    #: every caption's embedding per layer, when the encoder kept them
    #: (``engines.ExtractionResult.caption_features``), or None
    caption_features: dict[str, np.ndarray] | None = None


def _sha256_file(path: Path, what: str = "feature file") -> str:
    """sha256 hex of ``path``'s bytes; FeatureFileError naming the file and the fix when it
    cannot be read (no permission, a disk error)."""
    from .cache import read_error_text

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as exc:
        raise FeatureFileError(read_error_text(exc, path, what)) from None
    return digest.hexdigest()


@dataclass
class ArraySource:
    """Representations given as arrays: ``{layer: (n, d)}`` in stimulus order, layers in order.

    ``default_layer`` (default: the first layer) is the layer used when none is named.
    """

    name: str
    modality: str
    arrays: Mapping[str, np.ndarray]
    default_layer: str | None = None
    kind: str = "arrays"

    def __post_init__(self) -> None:
        check_modality(self.modality, self.name)
        if not isinstance(self.arrays, Mapping) or not self.arrays:
            raise ValueError(
                f"embeddings[{self.name!r}] must be a non-empty dict {{layer name: (n, d) array}}"
            )
        if self.default_layer is not None and self.default_layer not in self.arrays:
            raise ValueError(
                f"default layer {self.default_layer!r} is not a layer of {self.name!r}; use one "
                f"of {list(self.arrays)}"
            )

    @property
    def layers(self) -> list[str]:
        return [str(layer) for layer in self.arrays]

    def inputs(self, context: Any) -> str:
        from .run_writer import array_fingerprint

        return "arrays:" + ",".join(array_fingerprint(np.asarray(a)) for a in self.arrays.values())

    def check(self, stimuli: pd.DataFrame, images_root: Path | None) -> None:
        """Nothing to check before the run's work: ``write_run_from_embeddings`` checks every
        array before it writes anything."""

    def width(self, layer: str) -> int | None:
        shape = np.shape(self.arrays[layer])
        return int(shape[1]) if len(shape) == 2 else None

    def load(self, context: Any) -> Extracted:
        return Extracted(
            {str(layer): np.asarray(a) for layer, a in self.arrays.items()},
            self.default_layer or self.layers[0],
        )


@dataclass
class FileSource:
    """Representations read from files, one per layer: ``{layer: path}`` (see the module doc)."""

    name: str
    modality: str
    files: Mapping[str, str | os.PathLike[str]]
    default_layer: str | None = None
    kind: str = "file"
    #: rows for ids outside the run's stimuli that are skipped: True, any (a run restricted to
    #: some stimuli); a set, those ids (stimuli that --drop-bad dropped); False, none
    extra_rows: bool | frozenset[str] = False

    def __post_init__(self) -> None:
        check_modality(self.modality, self.name)
        if not self.files:
            raise ValueError(f"model {self.name!r} names no feature file; pass NAME=PATH")
        # absolute, symbolic links kept: an id list sits beside the path given, also where that
        # is a link into a git-annex / DataLad / DVC store, else beside the link's target
        # (_ids_path; files are read through the link)
        self.files = {str(layer): Path(os.path.abspath(Path(path).expanduser()))
                      for layer, path in self.files.items()}
        for layer, path in self.files.items():
            if path.is_dir():
                raise FeatureFileError(
                    f"feature file {path} (model {self.name!r}, layer {layer!r}) is a folder, "
                    "not a file; pass the path of the .npy (with its .ids.txt) or .parquet file "
                    "inside it"
                )
            if not path.is_file():
                what = (  # a pipe, device or socket (a link to /dev/zero) is there, but no file
                    "is not a regular file (a pipe, device or socket)" if path.exists()
                    else "does not exist"
                )
                raise FeatureFileError(
                    f"feature file {path} (model {self.name!r}, layer {layer!r}) {what}; "
                    "pass the path of an .npy (with its .ids.txt) or a .parquet file"
                )
        if self.default_layer is not None and self.default_layer not in self.files:
            raise ValueError(
                f"default layer {self.default_layer!r} is not a layer of {self.name!r}; use one "
                f"of {list(self.files)}"
            )

    @property
    def layers(self) -> list[str]:
        return list(self.files)

    def inputs(self, context: Any) -> str:
        parts = []
        for layer, path in self.files.items():
            ids = _ids_path(path)
            listed = _sha256_file(ids, "id list") if ids.is_file() else ""
            parts.append(f"{layer}={_sha256_file(path)}:{listed}")
        return "file:" + ",".join(parts)

    def check(self, stimuli: pd.DataFrame, images_root: Path | None) -> None:
        """Before anything of the run is written: each file's format, shape and ids against the
        data set's ``stimuli`` (:func:`check_feature_file`; the NaN/Inf scan waits for the read),
        so that a missing id list does not wait for hours of extraction to be found."""
        ids = list(stimuli["id"])
        for layer, path in self.files.items():
            check_feature_file(path, ids, model=self.name, layer=layer,
                               extra_rows=self.extra_rows)

    def width(self, layer: str) -> int | None:
        """The file's feature count from its header (an .npy's shape; a parquet file's schema,
        less ``id`` and the index columns pandas stored), or None where it cannot be read."""
        path = self.files[layer]
        try:
            if path.suffix.lower() == ".npy":
                shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
                return int(shape[1]) if len(shape) == 2 else None
            return len(_parquet_feature_fields(path))
        except (OSError, ValueError):
            return None

    def load(self, context: Any) -> Extracted:
        ids = list(context.stimuli["id"])
        arrays = {
            layer: read_feature_file(path, ids, model=self.name, layer=layer,
                                     extra_rows=self.extra_rows)
            for layer, path in self.files.items()
        }
        return Extracted(
            arrays,
            self.default_layer or self.layers[0],
            details={"files": {layer: str(path) for layer, path in self.files.items()}},
        )


@dataclass
class EncoderSource:
    """A registry model: every stimulus's image (vision) or caption(s) (language) is embedded."""

    name: str
    modality: str
    kind: str = "encoder"

    def __post_init__(self) -> None:
        check_modality(self.modality, self.name)

    def inputs(self, context: Any) -> str:
        from . import models

        cfg = context.config
        weights = (cfg.weights or {}).get(self.name)
        layers, gpa_layer = cfg.layers_for(self.name), (cfg.gpa_layers or {}).get(self.name)

        spec = models.get_spec(self.name)

        def inputs(gpa: str | None) -> str:
            return context.fingerprint(
                "extract",
                context.data_fingerprint,
                self.name,
                spec.source,
                self.modality,
                layers,
                gpa,
                cfg.caption_mode if self.modality == "language" else None,
                str(cfg.device).split(":")[0],
                os.fspath(weights) if weights else None,
                *([cfg.precision] if cfg.precision != "auto" else []),
                # a loader's corrected output (registry.ModelSpec.extraction_version); absent
                # where never set, so the runs of unchanged loaders keep their fingerprints
                *([f"extraction:{spec.extraction_version}"] if spec.extraction_version else []),
            )

        stored_anyway = layers == "all" or (isinstance(layers, list) and gpa_layer in layers)
        if gpa_layer is None or not stored_anyway:
            return inputs(gpa_layer)
        # the GPA layer is among the layers stored anyway: another choice extracts nothing new.
        # A run extracted before this rule, with this GPA layer, stays as it is
        legacy = inputs(gpa_layer)
        done = context.manifest.step_done(f"extract:{self.name}", legacy)
        return legacy if done else inputs(None)

    def check(self, stimuli: pd.DataFrame, images_root: Path | None) -> None:
        """Before anything of the run is written: a vision model needs the data set's images
        (``images_root``; its weights are checked earlier, ``models.check_weights_available``)."""
        if self.modality == "vision" and images_root is None:
            raise ValueError(
                f"vision model {self.name!r} needs images, but the data set has none; use a data "
                "set with images or give this model's features as a file (--features)"
            )

    def width(self, layer: str) -> int | None:
        return None  # known once the model is loaded

    def load(self, context: Any) -> Extracted:
        """Run the extraction on the configured engine (``engines``: local or Ray; the same
        numbers on every engine)."""
        from .engines import agreement_label, make_job

        cfg = context.config
        self.check(context.stimuli, context.images_root)
        job = make_job(
            self.name,
            self.modality,
            context.stimuli,
            context.images_root,
            layers=cfg.layers_for(self.name),
            gpa_layer=(cfg.gpa_layers or {}).get(self.name),
            caption_mode=cfg.caption_mode,
            device=cfg.device,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            weights=(cfg.weights or {}).get(self.name),
            work_dir=context.layout.shards_dir,
            inputs=self.inputs(context),
            caption_agreement=context.wants_caption_agreement(),
        )
        result = context.engine().extract(
            job, context.progress_for(self.name),
            context.progress_for(agreement_label(self.name)) if job.agreement_items else None,
        )
        items, seconds = result.items, result.extract_seconds
        return Extracted(
            {layer: result.arrays[layer] for layer in result.layers},
            result.default_layer,
            weights_id=result.weights_id,
            details={
                "items": int(items),
                "load_seconds": round(result.load_seconds, 3),
                "extract_seconds": round(seconds, 3),
                "items_per_second": round(items / seconds, 2) if seconds > 0 else None,
                **({"engine": result.stats} if result.stats else {}),
            },
            caption_agreement=result.caption_agreement,
            caption_features=result.caption_features,
        )


# ----------------------------------------------------------------------------------------------
# feature files


def _ids_path(path: Path) -> Path:
    """The id list of the .npy ``path``: beside it (also where ``path`` is a symbolic link into a
    git-annex / DataLad / DVC store); where none is there, beside the file a link leads to (a file
    linked into a project, its id list left with it); where neither has one, beside ``path``."""
    beside, behind = (file.with_name(file.name + IDS_SUFFIX) for file in (path, path.resolve()))
    return behind if behind.is_file() and not beside.is_file() else beside


def stimulus_id(value: object) -> str | None:
    """What a stimulus id is once read, wherever it is read from: the one rule of every reader
    (an ``.ids.txt`` line, a parquet feature file's ``id`` column, a data set table's ``id``
    cell, a COCO or Hugging Face id, a ``--stimuli`` id list).

    An id is text: a number as ``str`` writes it (7 reads "7", which is not "007"; a float
    column's 7.0 reads "7.0"), without surrounding whitespace as ``str.strip`` removes it (a
    space, a tab, the "\\r" a spreadsheet's export leaves, a no-break space): "img1 " and
    "img1" are one id, as an id list always read them. Inner spaces stay ("img 1"). None where
    there is no id (None, NaN, pd.NA; blank text): each reader refuses that naming its file and
    row, or, in a list of one id per line, skips the blank line. Ids of another Unicode normal
    form are not made equal here (:func:`check_id_normalisation` names them instead).

    Text without surrounding whitespace reads as before (``str(value)``), so the runs of such
    inputs keep their ids and fingerprints."""
    if type(value) is str:  # the common case, first
        return value.strip() or None
    if is_missing_value(value):
        return None
    return str(value).strip() or None


def _whitespace_twins(raw: Sequence[object], ids: Sequence[str | None]) -> list[tuple[str, str]]:
    """Pairs of entries of ``raw`` written differently that are one id once read
    (:func:`stimulus_id`: "img1" and "img1 "), as ``(first, other)`` texts; [] when none."""
    first: dict[str, str] = {}
    twins: list[tuple[str, str]] = []
    for value, sid in zip(raw, ids):
        if sid is None:
            continue
        text = value if isinstance(value, str) else str(value)
        seen = first.setdefault(sid, text)
        if seen != text:
            twins.append((seen, text))
    return twins


def _refuse_whitespace_twins(where: str, raw: Sequence[object], ids: Sequence[str | None]) -> None:
    """FeatureIdsError when two of a file's ids differ only in surrounding whitespace: they are
    one stimulus's id, listed twice (the message shows them with repr, so that the spaces and
    line ends can be seen)."""
    twins = _whitespace_twins(raw, ids)
    if twins:
        examples = ", ".join(f"{a!r} and {b!r}" for a, b in twins[:3])
        raise FeatureIdsError(
            f"{where} lists {len(twins)} id(s) twice, written with and without surrounding "
            f"whitespace (e.g. {examples}): ids are read without surrounding spaces, tabs or "
            "line ends, so these rows name one stimulus; keep one row per stimulus, or correct "
            "the id that was meant to be another"
        )


def _read_ids(path: Path) -> list[str]:
    ids_file = _ids_path(path)
    if not ids_file.is_file():
        raise FeatureFileError(
            f"feature file {path} has no id list: write its rows' stimulus ids, one per line, to "
            f"{ids_file} (or use a .parquet file with an 'id' column)"
        )
    try:
        text = ids_file.read_text(encoding="utf-8-sig")  # a BOM (Notepad, Excel) is no id
    except UnicodeDecodeError as exc:
        raise FeatureFileError(f"{ids_file} is not UTF-8 text ({exc}); write it as UTF-8") from None
    except OSError as exc:  # no permission, a disk error
        from .cache import read_error_text

        raise FeatureFileError(
            read_error_text(exc, ids_file, f"the id list of feature file {path.name},")
        ) from None
    read = [(line, sid) for line in _LINE_END.split(text) if (sid := stimulus_id(line)) is not None]
    ids = [sid for _, sid in read]
    _refuse_whitespace_twins(
        f"the id list {ids_file} of feature file {path}", [line for line, _ in read], ids
    )
    return ids


#: a line ends at "\n", "\r\n" or "\r" only
_LINE_END = re.compile(r"\r\n|\r|\n")


def id_lines(text: str) -> list[str]:
    """The ids of an id list (one per line), each as :func:`stimulus_id` reads it (stripped),
    blank lines skipped. Lines end at "\\n", "\\r\\n" or "\\r" only: ``str.splitlines`` also
    splits at U+2028, U+0085 and \\x1c-\\x1e, which an id may hold."""
    return [sid for line in _LINE_END.split(text) if (sid := stimulus_id(line)) is not None]


def _blank_id_lines(path: Path) -> list[int]:
    """The 1-based numbers of the blank lines of an .npy's id list that lie between ids (a
    trailing blank line is none; [] where the list cannot be read): said when the list's count
    of ids is not the rows', since a blank line there may be a row whose id was lost."""
    try:
        text = _ids_path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return []
    lines = _LINE_END.split(text)
    while lines and stimulus_id(lines[-1]) is None:
        lines.pop()
    return [number for number, line in enumerate(lines, start=1) if stimulus_id(line) is None]


def _read_npy_features(path: Path) -> tuple[np.ndarray, list[str]]:
    from .cache import CacheFormatError, read_npy

    try:
        array = read_npy(
            path, mmap=True, what="feature file",
            fix="save the features as a numeric array: np.save(path, features.astype(np.float32))",
        )
    except CacheFormatError as exc:
        raise FeatureFileError(str(exc)) from None
    return array, _read_ids(path)


def _read_parquet_features(
    path: Path, *, features: bool = True
) -> tuple[np.ndarray | None, list[str]]:
    """``(features, ids)`` of a parquet feature file; ``features=False`` reads the ``id`` column
    only and gives None for the features (the check before any work)."""
    repeated: list[str] = []
    try:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        # a name used twice (pyarrow's error is a dump of its internal schema)
        repeated = sorted({str(name) for name in names if names.count(name) > 1})
        if repeated:
            frame = pd.DataFrame()
        elif features:
            frame = pd.read_parquet(path, engine="pyarrow")
        else:
            frame = pd.read_parquet(path, engine="pyarrow", columns=["id"] if "id" in names else [])
    except Exception as exc:  # pyarrow raises several types for bad files
        if isinstance(exc, OSError) and exc.errno is not None:  # no permission, a disk error
            from .cache import read_error_text

            raise FeatureFileError(read_error_text(exc, path, "feature file")) from None
        raise FeatureFileError(f"feature file {path} is not a readable parquet file ({exc})") from None
    if repeated:
        raise FeatureFileError(
            f"feature file {path} has column(s) named twice: {repeated[:5]}; give each column "
            "its own name"
        )
    if "id" not in frame.columns and frame.index.name == "id":  # df.set_index("id").to_parquet()
        frame = frame.reset_index()
    if "id" not in frame.columns:
        columns = list(frame.columns) if features else names
        raise FeatureFileError(
            f"feature file {path} has no 'id' column (columns: {columns[:8]}...); add "
            "one holding each row's stimulus id, or name the index that holds them "
            "(frame.index.name = 'id') before writing the file"
        )
    # each id as every reader reads one (stimulus_id): "img1 " or "img1\r" (a spreadsheet's
    # export) is the stimulus "img1", as in an .npy's id list
    raw = list(frame["id"])  # iterated as before: the same scalars, so the same text
    read = [stimulus_id(value) for value in raw]
    blank = [row for row, sid in enumerate(read) if sid is None]
    if blank:  # would be the stimuli "<NA>", "nan" or "", which no id list can name
        raise FeatureFileError(
            f"feature file {path} has {len(blank)} rows without an id (missing or blank; first at "
            f"row {blank[0]}); give every row its stimulus id"
        )
    ids = [sid for sid in read if sid is not None]
    _refuse_whitespace_twins(f"feature file {path}", raw, ids)
    if not features:
        width, bad = len(_parquet_feature_fields(path)), _non_numeric_parquet_columns(path)
    else:
        values = frame.drop(columns=["id"])
        width = values.shape[1]
        bad = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if width == 0:
        raise FeatureFileError(
            f"feature file {path} holds ids but no feature column; add one numeric column per "
            "feature beside 'id'"
        )
    if bad:
        raise FeatureFileError(
            f"feature file {path} has non-numeric feature column(s) {bad[:5]}; keep only 'id' and "
            "one numeric column per feature"
        )
    if not features:
        return None, ids
    # as stored (float64 stays float64): read_feature_file casts to float32 and says which values
    # do not fit
    stored = [getattr(dtype, "numpy_dtype", dtype) for dtype in values.dtypes]  # Float64, Int64
    return values.to_numpy(dtype=np.result_type(np.float32, *stored), na_value=np.nan), ids


def _parquet_feature_fields(path: Path) -> list[Any]:
    """The fields of a parquet file's schema that hold features (without reading the values):
    all but ``id`` and the index pandas stored (``__index_level_0__``, or a named index)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    index = (schema.pandas_metadata or {}).get("index_columns", [])
    skip = {"id", *(column for column in index if isinstance(column, str))}
    return [
        field for field in schema
        if field.name not in skip and not field.name.startswith("__index_level_")
    ]


def _non_numeric_parquet_columns(path: Path) -> list[str]:
    """Feature columns of a parquet file whose stored type is not a number (its schema only)."""
    import pyarrow as pa

    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    return [
        field.name for field in _parquet_feature_fields(path)
        if not any(test(field.type) for test in numeric)
    ]


def _open_feature_file(
    path: Path, where: str, *, features: bool = True
) -> tuple[np.ndarray | None, list[str]]:
    """``(array, ids)`` of a feature file (an .npy is memory-mapped; a parquet file's features
    are read only with ``features``), after the checks of its suffix, shape and dtype."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array, file_ids = _read_npy_features(path)
    elif suffix == ".parquet":
        array, file_ids = _read_parquet_features(path, features=features)
    else:
        npy = path.with_suffix(".npy").name
        how = (
            f"an .npz holds several arrays: save the features' one as .npy, "
            f"np.save('{npy}', np.load('{path.name}')['NAME']), with its ids in "
            f"'{npy}{IDS_SUFFIX}', or use" if suffix == ".npz" else
            f"use .npy (its rows' ids one per line in '{npy}{IDS_SUFFIX}') or"
        )
        raise FeatureFileError(
            f"{where} has suffix {suffix!r}; {how} .parquet (an 'id' column beside one numeric "
            "column per feature)"
        )
    if array is None:
        return None, file_ids
    if array.ndim > 2:
        raise FeatureFileError(
            f"{where} holds an array of shape {array.shape}; it must be 2-D (stimuli, features). "
            "Repeated presentations or time points on an axis are averaged first (e.g. "
            "features.mean(axis=2)); axes that are all features (a voxel grid, channels × "
            "positions) are flattened with features.reshape(len(features), -1)"
        )
    if array.ndim != 2 or array.shape[1] < 1:
        raise FeatureFileError(
            f"{where} holds an array of shape {array.shape}; it must be 2-D (stimuli, features): "
            "one row per stimulus, one column per feature (a 1-D array of one feature: "
            "features.reshape(-1, 1))"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise FeatureFileError(f"{where} has dtype {array.dtype}; store real numbers (float32)")
    if len(file_ids) != array.shape[0]:
        blank = _blank_id_lines(path) if suffix == ".npy" else []
        raise FeatureFileError(
            f"{where} has {array.shape[0]} rows but {len(file_ids)} ids; give exactly one id per "
            "row, in row order"
            + (
                f" (one id more than rows: is the first line, {file_ids[0]!r}, a header? the ids "
                "file has none)"
                if len(file_ids) == array.shape[0] + 1
                else ""
            )
            + (
                f" (its id list has {len(blank)} blank line(s) between ids, e.g. line "
                f"{blank[0]}, which are skipped: write the id of that row there)"
                if blank and len(file_ids) < array.shape[0]
                else ""
            )
        )
    return array, file_ids


def _row_order(
    where: str,
    file_ids: Sequence[str],
    ids: Sequence[str],
    *,
    extra_rows: bool | frozenset[str] = False,
) -> np.ndarray:
    """(n,) int64: the file's row of each of the data set's ``ids``; FeatureFileError for ids
    listed twice, missing from the file or unknown to the data set (unless ``extra_rows`` is
    True, or a set holding them: ids the run dropped)."""
    position: dict[str, int] = {}
    duplicated: list[str] = []
    for row, sid in enumerate(file_ids):
        if sid in position:
            duplicated.append(sid)
        position[sid] = row
    if duplicated:
        repeated = list(dict.fromkeys(duplicated))
        most = max(Counter(file_ids).values())
        times = "twice" if most == 2 else f"up to {most} times"
        raise FeatureIdsError(
            f"{where} lists {len(repeated)} id(s) more than once ({times}; e.g. {repeated[:5]}); "
            "keep one row per stimulus (average repeated presentations first)"
        )
    missing = [sid for sid in ids if sid not in position]
    if missing:
        check_id_normalisation(where, file_ids, missing, known=set(ids))
    if missing and len(missing) == len(ids):
        known = set(ids)
        floats = all(re.fullmatch(r"-?[0-9]+\.0", sid) for sid in file_ids) and any(
            sid[:-2] in known for sid in file_ids
        )
        raise FeatureIdsError(
            f"{where} lists none of the data set's {len(ids)} stimuli: its ids look like "
            f"{list(file_ids[:3])}, the stimuli's like {list(ids[:3])}; "
            + (
                "its ids are whole numbers written as floats (an id column of floats: 7.0 reads "
                "'7.0', not '7'); store the ids as integers or text"
                if floats else
                "write the file with the data set's ids (zero-padding, a prefix or a file "
                "suffix may differ)"
            )
        )
    if missing:
        raise FeatureIdsError(
            f"{where} has no row for {len(missing)} of the data set's {len(ids)} stimuli (e.g. "
            f"{missing[:5]}); add them, or run on the stimuli every feature file covers "
            "(--stimuli common; or --stimuli IDS.txt, a list of ids)"
        )
    known = set(ids)
    skipped = extra_rows if isinstance(extra_rows, frozenset) else frozenset()
    extra = [] if extra_rows is True else [
        sid for sid in file_ids if sid not in known and sid not in skipped
    ]
    if extra:
        raise FeatureIdsError(
            f"{where} has {len(extra)} row(s) for ids the data set does not have (e.g. "
            f"{extra[:5]}); drop those rows, use the data set they belong to, or run on the "
            "stimuli every feature file covers (--stimuli common)"
        )
    return np.fromiter((position[sid] for sid in ids), dtype=np.int64, count=len(ids))


def _unicode_forms(ids: Sequence[str]) -> str:
    """Which Unicode normal form ``ids`` are written in, in words: "NFC", "NFD" or "a mix of NFC
    and NFD" (ids of ASCII letters only are both: "NFC")."""
    nfc = all(unicodedata.is_normalized("NFC", sid) for sid in ids)
    nfd = all(unicodedata.is_normalized("NFD", sid) for sid in ids)
    return "NFC" if nfc else "NFD" if nfd else "a mix of NFC and NFD"


def check_id_normalisation(
    where: str, file_ids: Sequence[str], missing: Sequence[str], known: Collection[str] = ()
) -> None:
    """FeatureIdsError when ids of the data set that the file lacks are in it written in another
    Unicode normal form: "café" as one character é (NFC) in one and as e + a combining accent
    (NFD, as macOS writes file names) in the other. Both print alike, so the ids are shown with
    ``ascii()``. They are not matched silently: ids are keys into the user's data, and two
    distinct ids may share a normal form. A file id that is itself one of ``known`` (the data
    set's ids) is that stimulus, not another's spelling: a data set holding both forms as two
    stimuli is not refused for it."""
    by_form: dict[str, str] = {}
    for sid in file_ids:
        by_form.setdefault(unicodedata.normalize("NFC", sid), sid)
    known = known if isinstance(known, (set, frozenset, dict)) else set(known)
    pairs = [(sid, by_form[form]) for sid in missing
             if (form := unicodedata.normalize("NFC", sid)) in by_form and by_form[form] != sid
             and by_form[form] not in known]
    if not pairs:
        return
    theirs, ours = _unicode_forms([f for _, f in pairs]), _unicode_forms([s for s, _ in pairs])
    examples = ", ".join(f"{ascii(f)} for {ascii(s)}" for s, f in pairs[:3])
    raise FeatureIdsError(
        f"{where} writes {len(pairs)} of the data set's ids in another Unicode normal form, the "
        f"same text encoded differently (the file's ids in {theirs}, the stimuli's in {ours}; "
        f"e.g. the file's {examples}, as ascii() shows them); write the ids of both in one "
        "form (NFC), e.g. ids = [unicodedata.normalize('NFC', i) for i in ids] in Python, then "
        "rewrite the file's id list (.ids.txt or 'id' column) or the data set's ids (ids from "
        "macOS file names are often NFD)"
    )


def feature_file_ids(path: str | os.PathLike[str], *, model: str, layer: str) -> list[str]:
    """The stimulus ids of a feature file, in row order, without reading its features (an .npy's
    id list, a parquet file's ``id`` column), after the checks of its format and shape: what a
    run without a data set takes as its stimuli.

    Raises:
        FeatureFileError: as :func:`read_feature_file`, and for ids listed twice.
    """
    path = Path(path)
    where = f"feature file {path} (model {model!r}, layer {layer!r})"
    _, file_ids = _open_feature_file(path, where, features=False)
    _row_order(where, file_ids, list(dict.fromkeys(file_ids)))  # the duplicate check
    return file_ids


def check_feature_file(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    *,
    model: str,
    layer: str,
    extra_rows: bool | frozenset[str] = False,
) -> None:
    """Every check of :func:`read_feature_file` but the NaN/Inf scan, without reading the
    features (an .npy's header and id list; a parquet file's schema and ``id`` column): a run
    checks its feature files so before any model is extracted. ``extra_rows``: rows for ids
    outside ``ids`` are allowed (True: any, a run restricted to some stimuli; a set: those).

    Raises:
        FeatureFileError: as :func:`read_feature_file`.
    """
    path = Path(path)
    where = f"feature file {path} (model {model!r}, layer {layer!r})"
    _, file_ids = _open_feature_file(path, where, features=False)
    _row_order(where, file_ids, ids, extra_rows=extra_rows)


def read_feature_file(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    *,
    model: str,
    layer: str,
    extra_rows: bool | frozenset[str] = False,
) -> np.ndarray:
    """The (n, d) float32 features of ``path``, rows in the order of ``ids`` (the data set's;
    ``extra_rows``: the file may hold rows for other ids too (True: any; a set: those), which
    are not read).

    Raises:
        FeatureFileError: unknown suffix, unreadable file, not 2-D or not numeric, an id list of
            another length, duplicated ids, ids of the data set missing from the file or ids in
            the file that the data set does not have, NaN/Inf rows — each naming the fix.
    """
    path = Path(path)
    where = f"feature file {path} (model {model!r}, layer {layer!r})"
    array, file_ids = _open_feature_file(path, where)
    assert array is not None  # features=True reads them
    order = _row_order(where, file_ids, ids, extra_rows=extra_rows)
    in_order = len(file_ids) == len(ids) and bool(np.array_equal(order, np.arange(len(ids))))
    source = array if in_order else array[order]
    with np.errstate(over="ignore"):  # values beyond float32's range: said below
        out = np.asarray(source, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        too_large = np.isfinite(np.asarray(source[bad_rows])) & ~finite[bad_rows]
        if too_large.any():
            row = bad_rows[np.flatnonzero(too_large.any(axis=1))[0]]
            raise FeatureFileError(
                f"{where} has values beyond float32's range (±3.4e38; e.g. stimulus "
                f"{ids[row]!r}), which runs store as float32: rescale the features (e.g. divide "
                "by their standard deviation)"
            )
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        bad_columns = np.flatnonzero(~finite.all(axis=0))
        found = (
            f"{where} has NaN/Inf in {bad_rows.size} of {out.shape[0]} row(s), e.g. stimuli "
            f"{[ids[i] for i in bad_rows[:5]]}, within {bad_columns.size} of {out.shape[1]} "
            f"column(s), e.g. columns {bad_columns[:5].tolist()}"
        )
        if bad_rows.size > out.shape[0] // 2 and bad_columns.size <= out.shape[1] // 2:
            fix = ("they sit in a few columns (voxels outside a mask, say): remove those columns "
                   "from the file")
        else:
            fix = ("fix those rows, or leave those stimuli out of the run (--stimuli IDS.txt, a "
                   "list of the ids to keep)")
        raise FeatureFileError(f"{found}; {fix}")
    zero_rows = np.flatnonzero(~out.any(axis=1))
    if zero_rows.size:  # no direction: such a row cannot be normalised, nor have neighbours
        raise FeatureFileError(
            f"{where} has {zero_rows.size} of {out.shape[0]} row(s) that are all zeros, e.g. "
            f"stimuli {[ids[i] for i in zero_rows[:5]]}; fix those rows (features that were "
            "never written?), or leave those stimuli out of the run (--stimuli IDS.txt, a list "
            "of the ids to keep)"
        )
    return out
