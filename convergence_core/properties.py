"""Stimulus properties: what each image, its captions and its place among the others look like.

One number (or category) per stimulus and property, for asking which properties predict
dispersion (:mod:`convergence_core.dispersion_predictors`). The precompute stores them as
``properties.parquet`` (one row per stimulus, one column per property) plus ``properties.json``
(one :class:`PropertyInfo` per column); :attr:`Run.properties` reads them back as a
:class:`PropertyTable`.

Properties and their definitions (every function here is pure: arrays or files in, numbers out):

* **image** (:func:`image_statistics` on the decoded RGB pixels; sizes from the original file,
  everything else on a working copy whose longest side is at most :data:`WORK_SIDE` px, so that
  the measures do not depend on the file's resolution):
  ``width_px``, ``height_px``, ``megapixels``, ``aspect_ratio`` (width / height);
  ``luminance_mean`` and ``luminance_contrast`` (mean and standard deviation, i.e. RMS contrast, of
  the Rec. 709 luma ``0.2126 R + 0.7152 G + 0.0722 B`` of the gamma-encoded values, 0–1);
  ``colourfulness`` (Hasler & Süsstrunk 2003, on 0–255 RGB: ``rg = R − G``,
  ``yb = (R + G) / 2 − B``, ``M = √(σ_rg² + σ_yb²) + 0.3 √(μ_rg² + μ_yb²)``);
  ``edge_density`` (fraction of interior pixels whose Sobel gradient magnitude of the luma,
  divided by 4 so that it equals the height of a luminance step, exceeds
  :data:`EDGE_THRESHOLD`); ``entropy`` (Shannon entropy of the 256-bin histogram of the 8-bit luma,
  bits); ``jpeg_bytes_per_pixel`` (bytes of the working copy re-encoded as JPEG at quality
  :data:`JPEG_QUALITY`, per pixel: a clutter / visual-complexity proxy).
* **caption** (:func:`caption_statistics`; a run without any caption, made from feature files
  alone, has none of these): ``n_captions``; ``caption_words`` (mean number of
  whitespace-separated words per caption); ``caption_agreement:<language model>`` (mean pairwise
  cosine similarity of the stimulus's own captions embedded by that model at its default layer,
  :func:`caption_agreement`; missing for stimuli with fewer than 2 captions).
* **typicality** (:func:`neighbour_distance`): ``neighbour_distance:<vision model>`` =
  1 − the mean inner product of the stimulus's :data:`TYPICALITY_K` most similar other stimuli
  (prepared features, i.e. cosine similarity after clipping; the model's GPA layer): low = typical,
  high = unlike anything else in the set. It takes each row's top-K neighbour values, as
  ``run.neighbours(model, layer).values`` gives them; :func:`nearest_similarities` computes them
  exactly from features, in blocks. And ``centroid_distance:<vision model>``
  (:func:`centroid_distance`): the stimulus's distance from the centroid in the GPA input (the
  GPA-layer features centred and scaled to unit Frobenius norm, as GPA preprocesses them): a
  residual is a distance in the same space, so dispersion grows with it mechanically as well as
  for any deeper reason — a property to read the others against.
* **data set columns** (:func:`dataset_columns`): every column of the stimulus table other than
  ``id``, ``image`` and ``captions`` (e.g. ``label``): numbers as numeric properties, text and
  booleans as categorical ones.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from .validation import is_missing_value

__all__ = [
    "CAPTION_VERSION",
    "EDGE_THRESHOLD",
    "IMAGE_PROPERTIES",
    "IMAGE_VERSION",
    "JPEG_QUALITY",
    "PROPERTIES_VERSION",
    "TYPICALITY_K",
    "WORK_SIDE",
    "PropertyInfo",
    "PropertyTable",
    "assemble_properties",
    "caption_agreement",
    "caption_statistics",
    "centroid_distance",
    "dataset_columns",
    "image_properties",
    "image_statistics",
    "nearest_similarities",
    "neighbour_distance",
]

#: Versions of the definitions below, part of the precompute's fingerprints, so that changing a
#: definition recomputes what depends on it: the image part, the caption-agreement parts, and the
#: table (written into properties.json; 2: ``centroid_distance`` added).
IMAGE_VERSION = 1
CAPTION_VERSION = 1
PROPERTIES_VERSION = 2
#: Longest side (px) of the working copy of each image (never enlarged).
WORK_SIDE = 512
#: Sobel step height (luma, 0–1) above which a pixel counts as an edge.
EDGE_THRESHOLD = 0.1
#: JPEG quality of the re-encoding behind ``jpeg_bytes_per_pixel``.
JPEG_QUALITY = 75
#: Neighbours averaged by ``neighbour_distance``.
TYPICALITY_K = 10
#: Columns of the stimulus table that are not properties.
_NOT_PROPERTIES = ("id", "image", "captions")
KINDS = ("numeric", "categorical")


@dataclass(frozen=True)
class PropertyInfo:
    """What one property column means.

    ``kind``: ``"numeric"`` (float64, NaN = missing) or ``"categorical"`` (str, None = missing);
    ``unit``: the unit of a numeric value ("" for categories); ``source``: ``"image"``,
    ``"caption"``, ``"language:<model>"``, ``"vision:<model>"`` or ``"dataset"``.
    """

    name: str
    kind: str
    unit: str
    description: str
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == "id":
            raise ValueError(
                f"a property needs a non-empty name other than 'id', got {self.name!r}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"property {self.name!r} has kind {self.kind!r}; use one of {KINDS}")

    @property
    def label(self) -> str:
        """``name (unit)`` for axis titles; the name alone for categories."""
        return f"{self.name} ({self.unit})" if self.unit else self.name


#: The image properties, in table order.
IMAGE_PROPERTIES: tuple[PropertyInfo, ...] = (
    PropertyInfo("width_px", "numeric", "px", "image width of the original file", "image"),
    PropertyInfo("height_px", "numeric", "px", "image height of the original file", "image"),
    PropertyInfo("megapixels", "numeric", "Mpx", "width × height / 10⁶", "image"),
    PropertyInfo("aspect_ratio", "numeric", "width / height", "width / height", "image"),
    PropertyInfo(
        "luminance_mean",
        "numeric",
        "luma, 0–1",
        "mean Rec. 709 luma of the gamma-encoded pixels",
        "image",
    ),
    PropertyInfo(
        "luminance_contrast",
        "numeric",
        "luma s.d., 0–0.5",
        "RMS contrast: standard deviation of the luma",
        "image",
    ),
    PropertyInfo(
        "colourfulness",
        "numeric",
        "Hasler–Süsstrunk M, 0–255 scale",
        "Hasler & Süsstrunk (2003) colourfulness of the RGB pixels",
        "image",
    ),
    PropertyInfo(
        "edge_density",
        "numeric",
        "fraction of pixels",
        f"fraction of pixels with a Sobel luma step above {EDGE_THRESHOLD} "
        f"(longest side ≤ {WORK_SIDE} px)",
        "image",
    ),
    PropertyInfo(
        "entropy",
        "numeric",
        "bits",
        "Shannon entropy of the 8-bit luma histogram",
        "image",
    ),
    PropertyInfo(
        "jpeg_bytes_per_pixel",
        "numeric",
        "bytes / pixel",
        f"JPEG size at quality {JPEG_QUALITY} (longest side ≤ {WORK_SIDE} px) per pixel: "
        "a clutter proxy",
        "image",
    ),
)
_IMAGE_NAMES = tuple(info.name for info in IMAGE_PROPERTIES)


@dataclass(frozen=True)
class PropertyTable:
    """Properties of the n stimuli of a run.

    ``values``: DataFrame (n rows, run order) with ``id`` (str) and one column per property, in
    the order of ``info``: float64 for numeric properties (NaN = missing), object/str for
    categorical ones (None = missing). ``info``: one :class:`PropertyInfo` per column.
    """

    values: pd.DataFrame
    info: tuple[PropertyInfo, ...]

    def __post_init__(self) -> None:
        if "id" not in self.values.columns:
            raise ValueError("a property table needs an 'id' column (the stimulus ids, run order)")
        names = [info.name for info in self.info]
        if len(set(names)) != len(names):
            raise ValueError(f"property names must be unique, got {names}")
        columns = [c for c in self.values.columns if c != "id"]
        if columns != names:
            raise ValueError(
                f"property columns {columns} do not match the descriptions {names}; give one "
                "PropertyInfo per column, in column order"
            )

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.info]

    def info_for(self, name: str) -> PropertyInfo:
        """The description of property ``name``; ValueError listing the names if unknown."""
        for info in self.info:
            if info.name == name:
                return info
        raise ValueError(f"no property {name!r}; choose one of {self.names}")

    def records(self) -> list[dict[str, str]]:
        """The descriptions as JSON-able dicts (what ``properties.json`` stores)."""
        return [asdict(info) for info in self.info]

    @classmethod
    def from_records(
        cls, values: pd.DataFrame, records: Iterable[Mapping[str, Any]]
    ) -> PropertyTable:
        """Rebuild from a stored table and its description records (types restored)."""
        info = tuple(
            PropertyInfo(
                name=str(r["name"]),
                kind=str(r["kind"]),
                unit=str(r.get("unit", "")),
                description=str(r.get("description", "")),
                source=str(r.get("source", "")),
            )
            for r in records
        )
        columns = [str(c) for c in values.columns if c != "id"]
        if "id" not in values.columns or columns != [item.name for item in info]:
            raise ValueError(
                f"property columns {columns} do not match the descriptions "
                f"{[item.name for item in info]}; give one description per column, in column "
                "order, and an 'id' column"
            )
        return cls(_typed(values, info), info)


def _typed(values: pd.DataFrame, info: Sequence[PropertyInfo]) -> pd.DataFrame:
    frame = pd.DataFrame({"id": values["id"].astype(str).to_numpy()})
    for item in info:
        column = values[item.name]
        if item.kind == "numeric":
            frame[item.name] = pd.to_numeric(column, errors="coerce").astype(np.float64).to_numpy()
        else:
            frame[item.name] = pd.Series(
                [None if is_missing_value(v) else str(v) for v in column], dtype=object
            )
    return frame



# ---------------------------------------------------------------------------------------------
# Image properties
# ---------------------------------------------------------------------------------------------
def _luma(rgb: np.ndarray) -> np.ndarray:
    """(h, w) float64 Rec. 709 luma in 0–1 of (h, w, 3) uint8 RGB."""
    x = rgb.astype(np.float64) / 255.0
    return 0.2126 * x[..., 0] + 0.7152 * x[..., 1] + 0.0722 * x[..., 2]


def _sobel_magnitude(luma: np.ndarray) -> np.ndarray:
    """(h−2, w−2) Sobel gradient magnitude of the interior pixels, divided by 4 (step height)."""
    p = luma
    gx = (p[:-2, 2:] + 2.0 * p[1:-1, 2:] + p[2:, 2:]) - (
        p[:-2, :-2] + 2.0 * p[1:-1, :-2] + p[2:, :-2]
    )
    gy = (p[2:, :-2] + 2.0 * p[2:, 1:-1] + p[2:, 2:]) - (
        p[:-2, :-2] + 2.0 * p[:-2, 1:-1] + p[:-2, 2:]
    )
    return np.hypot(gx, gy) / 4.0


def image_statistics(rgb: np.ndarray) -> dict[str, float]:
    """Pixel statistics of one image: (h, w, 3) uint8 RGB -> ``{name: value}``.

    Returns ``luminance_mean``, ``luminance_contrast``, ``colourfulness``, ``edge_density``,
    ``entropy`` and ``jpeg_bytes_per_pixel`` (definitions in the module docstring), computed on
    the array as given (:func:`image_properties` passes the working copy). Images smaller than
    3 × 3 px have no interior, so their ``edge_density`` is NaN.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"image_statistics needs an (h, w, 3) uint8 RGB array, got shape {rgb.shape} dtype "
            f"{rgb.dtype}; convert with numpy.asarray(PIL_image.convert('RGB'))"
        )
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"image_statistics got an empty image ({w} × {h} px)")
    luma = _luma(rgb)
    x = rgb.astype(np.float64)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    colourfulness = float(
        np.sqrt(rg.var() + yb.var()) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    )
    edges = float(np.mean(_sobel_magnitude(luma) > EDGE_THRESHOLD)) if h >= 3 and w >= 3 else np.nan
    levels = np.clip(np.rint(luma * 255.0), 0, 255).astype(np.int64)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return {
        "luminance_mean": float(luma.mean()),
        "luminance_contrast": float(luma.std()),
        "colourfulness": colourfulness,
        "edge_density": edges,
        "entropy": entropy,
        "jpeg_bytes_per_pixel": buffer.tell() / float(h * w),
    }


def _working_copy(
    path: Path, root: str | os.PathLike[str] | None
) -> tuple[int, int, np.ndarray]:
    """(width, height) of the original and the (h', w', 3) uint8 working copy (≤ WORK_SIDE),
    read with the containment and size guards of :mod:`images`."""
    from .images import open_rgb_reduced

    (width, height), rgb = open_rgb_reduced(path, WORK_SIDE, root=root)
    scale = WORK_SIDE / max(rgb.size)
    if scale < 1.0:
        size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
        rgb = rgb.resize(size, Image.Resampling.BOX)  # area average: no ringing, no blur
    return width, height, np.asarray(rgb, dtype=np.uint8)


def image_properties(
    paths: Sequence[str | os.PathLike[str]],
    *,
    root: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """The image properties of each file: DataFrame (len(paths) rows) with the columns of
    :data:`IMAGE_PROPERTIES`, float64, in that order.

    ``root``: the folder every file must stay inside (``images.resolve_inside``); images above
    ``settings.max_image_pixels()`` are refused before decoding, as everywhere images are read.
    ``progress(done, total)`` is called after every image. Cost: one decode at reduced scale
    (JPEG draft mode) plus a ≤ 512 px resize and JPEG encode, ~5–20 ms per image on one core.
    Raises ``images.ImageFileError`` (a ValueError) for a missing or undecodable file.
    """
    rows: list[dict[str, float]] = []
    total = len(paths)
    for done, path in enumerate(paths, start=1):
        width, height, rgb = _working_copy(Path(path), root)
        rows.append(
            {
                "width_px": float(width),
                "height_px": float(height),
                "megapixels": width * height / 1e6,
                "aspect_ratio": width / height,
                **image_statistics(rgb),
            }
        )
        if progress is not None:
            progress(done, total)
    return pd.DataFrame(rows, columns=list(_IMAGE_NAMES), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Caption properties
# ---------------------------------------------------------------------------------------------
def caption_statistics(captions: Sequence[Sequence[str]]) -> pd.DataFrame:
    """``n_captions`` and ``caption_words`` (mean words per caption; NaN without captions).

    ``captions``: n lists of strings; returns a DataFrame of n rows, float64.
    """
    counts, words = [], []
    for caps in captions:
        caps = [str(c) for c in caps]
        counts.append(float(len(caps)))
        words.append(float(np.mean([len(c.split()) for c in caps])) if caps else np.nan)
    return pd.DataFrame({"n_captions": counts, "caption_words": words}, dtype=np.float64)


def caption_agreement(embeddings: np.ndarray, owners: np.ndarray, n: int) -> np.ndarray:
    """Mean pairwise cosine similarity of each stimulus's own captions: (n,) float64.

    Args:
        embeddings: (c, d) one row per caption (any float dtype; used in float64).
        owners: (c,) int, the stimulus row (0..n−1) of each caption.
        n: number of stimuli.

    Stimulus i with c_i ≥ 2 captions (unit vectors u) gets
    ``(‖Σ u‖² − c_i) / (c_i (c_i − 1))``, the mean of u_a·u_b over pairs a ≠ b, in O(c·d) time
    and O(n·d) memory; stimuli with fewer than 2 captions get NaN.

    Raises:
        ValueError: shapes disagree, an owner is out of range, or a caption embedding is zero or
            not finite (its cosine is undefined).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    owners = np.asarray(owners)
    if x.ndim != 2 or owners.shape != (x.shape[0],):
        raise ValueError(
            f"caption_agreement needs (c, d) embeddings and (c,) owner rows, got {x.shape} and "
            f"{owners.shape}; pass one owner row per caption"
        )
    if not np.issubdtype(owners.dtype, np.integer) or (
        owners.size and (owners.min() < 0 or owners.max() >= n)
    ):
        raise ValueError(f"owner rows must be integers in 0..{n - 1}; fix the caption owners")
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0.0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} caption embedding(s) are zero or not finite (first caption rows "
            f"{np.flatnonzero(bad)[:5].tolist()}); their cosine similarity is undefined"
        )
    units = x / norms[:, None]
    sums = np.zeros((n, x.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, units)
    counts = np.bincount(owners, minlength=n).astype(np.float64)
    agreement = np.full(n, np.nan)
    several = counts >= 2
    c = counts[several]
    agreement[several] = (np.einsum("ij,ij->i", sums[several], sums[several]) - c) / (c * (c - 1))
    return agreement


# ---------------------------------------------------------------------------------------------
# Typicality
# ---------------------------------------------------------------------------------------------
def nearest_similarities(features: np.ndarray, k: int, *, prepare: bool = True) -> np.ndarray:
    """Each row's k largest inner products with the other rows: (n, k) float64, descending.

    ``features`` (n, d); with ``prepare`` they go through ``alignment.prepare_features`` first
    (clip + L2-normalise rows: the features the run's neighbour lists are built on); without it
    they are not clipped but still L2-normalised (cosine similarities: the exact search's error
    bound is for unit rows). Exact (``neighbours.exact_top_k``: blocked, no (n, n) array). Runs
    store these values (``run.neighbours(model, layer).lists.values``); this is the path for
    features without them.
    """
    from .neighbours import PreparedFeatures, exact_top_k

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (n, d) array, got shape {x.shape}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an integer in 1..n−1 = {n - 1}, got {k!r}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(
            f"features hold NaN/inf in {bad.size} rows (first: row {bad[0]}); fix the embeddings "
            "or leave those stimuli out"
        )
    prepared = PreparedFeatures.from_raw(x) if prepare else PreparedFeatures(x, np.inf)
    return exact_top_k(prepared, int(k))[1]


def centroid_distance(features: np.ndarray) -> np.ndarray:
    """Each row's distance from the centroid after GPA's preprocessing: (n,) float64.

    ``features`` (n, d): rows centred, then divided by the Frobenius norm of the centred matrix
    (``procrustes.preprocess_embeddings``; its zero-padding changes no norm), so the squares sum
    to 1. Invariant to translation, rotation and scale of the features. O(n d).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (n ≥ 2, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN/inf; fix the embeddings")
    centred = x - x.mean(axis=0)
    norms = np.linalg.norm(centred, axis=1)
    total = float(np.sqrt(np.sum(norms**2)))
    if total == 0.0:
        raise ValueError(
            "every stimulus has the same features; distances from the centroid are 0/0"
        )
    return norms / total


def neighbour_distance(values: np.ndarray, k: int = TYPICALITY_K) -> np.ndarray:
    """Typicality as a distance: ``1 − calibration.local_density(values, k)``, (n,) float64.

    ``values`` (n, K ≥ k) float: each row's K largest similarities to other stimuli, most similar
    first (``run.neighbours(model, layer).lists.values`` or :func:`nearest_similarities`). With
    unit feature vectors this is 1 − the mean cosine similarity to the k nearest neighbours: 0 for
    a stimulus with k exact duplicates, larger the less typical it is.
    """
    from .calibration import local_density

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"neighbour values must be (n, K), got shape {v.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= v.shape[1]:
        raise ValueError(
            f"k must be an integer in 1..K = {v.shape[1]} (the neighbours stored per row), got "
            f"{k!r}"
        )
    return 1.0 - local_density(v, int(k))


# ---------------------------------------------------------------------------------------------
# Data set columns and assembly
# ---------------------------------------------------------------------------------------------
def dataset_columns(stimuli: pd.DataFrame) -> tuple[pd.DataFrame, list[PropertyInfo]]:
    """The stimulus table's own columns as properties (everything but id, image, captions).

    Numeric (non-boolean) columns become numeric properties (float64); text, boolean and
    categorical columns become categorical ones (str, None where missing). Columns holding lists
    or other non-scalar values are left out. Returns ``(frame (n rows), infos)``.
    """
    frame = pd.DataFrame(index=range(len(stimuli)))
    infos: list[PropertyInfo] = []
    for column in stimuli.columns:
        if column in _NOT_PROPERTIES:
            continue
        series = stimuli[column].reset_index(drop=True)
        name = str(column)
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            frame[name] = series.astype(np.float64).to_numpy()
            infos.append(
                PropertyInfo(name, "numeric", "as in the data set", "data set column", "dataset")
            )
            continue
        if any(isinstance(v, (list, tuple, dict, set, np.ndarray)) for v in series):
            continue
        frame[name] = pd.Series(
            [None if is_missing_value(v) else str(v) for v in series], dtype=object
        )
        infos.append(PropertyInfo(name, "categorical", "", "data set column", "dataset"))
    return frame, infos


def assemble_properties(
    stimuli: pd.DataFrame,
    *,
    image: pd.DataFrame | None = None,
    agreement: Mapping[str, np.ndarray] | None = None,
    distances: Mapping[str, np.ndarray] | None = None,
    centroid_distances: Mapping[str, np.ndarray] | None = None,
    agreement_layers: Mapping[str, str] | None = None,
    distance_layers: Mapping[str, str] | None = None,
) -> PropertyTable:
    """The property table of a run from its parts.

    Args:
        stimuli: the run's stimulus table (n rows: id, image, captions, other columns).
        image: :func:`image_properties` of the n images (None for a run without images).
        agreement: ``{language model: (n,) caption_agreement}``.
        distances: ``{vision model: (n,) neighbour_distance}``.
        centroid_distances: ``{vision model: (n,) centroid_distance}``.
        agreement_layers / distance_layers: the layer each was computed at (for the descriptions;
            distance_layers for both kinds of vision-model distance).

    Order: image, caption, caption agreement, neighbour distance, centroid distance, data set
    columns. Data set columns
    whose names clash with a computed property get the prefix ``dataset:``.
    """
    n = len(stimuli)
    frame = pd.DataFrame({"id": stimuli["id"].astype(str).to_numpy()})
    infos: list[PropertyInfo] = []
    if image is not None:
        if len(image) != n:
            raise ValueError(f"image properties have {len(image)} rows for {n} stimuli")
        for info in IMAGE_PROPERTIES:
            frame[info.name] = image[info.name].to_numpy(dtype=np.float64)
            infos.append(info)
    captions = list(stimuli["captions"]) if "captions" in stimuli else []
    if any(len(c) for c in captions):  # a run without captions (feature files only) has none
        stats = caption_statistics(captions)
        frame["n_captions"] = stats["n_captions"].to_numpy()
        frame["caption_words"] = stats["caption_words"].to_numpy()
        infos += [
            PropertyInfo("n_captions", "numeric", "captions", "number of captions", "caption"),
            PropertyInfo("caption_words", "numeric", "words", "mean words per caption", "caption"),
        ]
    for model, values in (agreement or {}).items():
        layer = (agreement_layers or {}).get(model, "default layer")
        name = f"caption_agreement:{model}"
        frame[name] = _column(values, n, name)
        infos.append(
            PropertyInfo(
                name,
                "numeric",
                "cosine similarity",
                f"mean pairwise cosine similarity of the stimulus's own captions ({model}, "
                f"{layer}); how much the describers agree",
                f"language:{model}",
            )
        )
    for model, values in (distances or {}).items():
        layer = (distance_layers or {}).get(model, "GPA layer")
        name = f"neighbour_distance:{model}"
        frame[name] = _column(values, n, name)
        infos.append(
            PropertyInfo(
                name,
                "numeric",
                "1 − cosine similarity",
                f"1 − mean similarity to the {TYPICALITY_K} nearest other stimuli ({model}, "
                f"{layer}); low = typical",
                f"vision:{model}",
            )
        )
    for model, values in (centroid_distances or {}).items():
        layer = (distance_layers or {}).get(model, "GPA layer")
        name = f"centroid_distance:{model}"
        frame[name] = _column(values, n, name)
        infos.append(
            PropertyInfo(
                name,
                "numeric",
                "Procrustes distance",
                f"distance from the centroid in the GPA input (centred, unit Frobenius norm; "
                f"{model}, {layer}); residuals grow with it",
                f"vision:{model}",
            )
        )
    own, own_infos = dataset_columns(stimuli)
    taken = set(frame.columns)
    for info in own_infos:
        name = info.name if info.name not in taken else f"dataset:{info.name}"
        frame[name] = own[info.name].to_numpy()
        infos.append(PropertyInfo(name, info.kind, info.unit, info.description, info.source))
    return PropertyTable.from_records(frame, [asdict(info) for info in infos])


def _column(values: np.ndarray, n: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(
            f"{name} has shape {array.shape}, expected ({n},) (one value per stimulus)"
        )
    return array
