"""Many-to-many alignment (He, Trott & Khosla, paper 004): does averaging several captions of an
image (or all images and captions of a class) align vision and language better than one-to-one
pairs?

* :func:`caption_averaging_effect` — images against one caption each (the first, or one drawn at
  random) vs the mean of all their captions (COCO has five): the two scores, their difference
  (averaged − one) and a resampling interval of the difference over images.
* :func:`class_averaging_effect` — for labelled sets: one image–text pair per class vs the class
  means of the images and of the texts, with the interval over classes.
* :func:`caption_count_curve` — the score as 1, 2, … captions are averaged (the paper's Fig. 3A).

Pure functions of feature arrays and index/label arrays. ``score`` is a metric name of the
registry (:func:`.metrics.measure`, options as keywords, e.g. ``k=10``) or any callable
``score(X, Y) -> float`` on paired rows. Intervals come from
:func:`.calibration.resampled_interval`: by default half-samples of the images (or classes),
which never repeat a row (repeats would be each other's nearest neighbours and inflate neighbour
metrics); ``method="bootstrap"`` resamples with replacement. The two effect functions take an
optional ``progress(done, total)``, called after each of the interval's ``total`` resamples
(the report's progress lines); it does not change the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from .calibration import has_label, resampled_interval
from .metrics import measure
from .subsets import check_indices
from .validation import check_features


#: Fewest units (images, or classes) of a comparison: each half-sample of the interval holds half
#: of them, and the registry's metrics need 4 stimuli
MIN_UNITS = 8


@dataclass(frozen=True)
class AveragingEffect:
    """Alignment of one-to-one pairs vs averaged ones.

    ``comparison`` is "captions" (units = images) or "classes" (units = classes); ``difference``
    = ``averaged`` − ``one``; (``lower``, ``upper``) its ``level`` interval from ``method``;
    ``sampled_from``: how many units there were when only a seeded sample of them was compared.
    """

    comparison: str
    one: float
    averaged: float
    difference: float
    lower: float
    upper: float
    n_units: int
    method: str
    n_resamples: int
    level: float
    #: the units a seeded sample of ``n_units`` was drawn from (None: every unit compared)
    sampled_from: int | None = None


def _scorer(
    score: str | Callable[..., float], options: dict[str, Any]
) -> Callable[[np.ndarray, np.ndarray], float]:
    if isinstance(score, str):
        return lambda X, Y: measure(score, X, Y, **options)
    if not callable(score):
        raise ValueError(f"score must be a metric name or a callable score(X, Y), got {score!r}.")
    if options:
        raise ValueError(
            f"options {sorted(options)} go with a metric name, not with a callable score."
        )
    return score


def _check_owners(owners: object, m: int, n: int | None) -> tuple[np.ndarray, int]:
    owners = np.asarray(owners)
    if owners.shape != (m,) or not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(
            f"owners must be an integer array (m,) = ({m},) giving each caption's image row; got "
            f"{owners.dtype} {owners.shape}."
        )
    n = int(owners.max(initial=-1)) + 1 if n is None else int(n)
    if owners.size and (owners.min() < 0 or owners.max() >= n):
        raise ValueError(f"owners must lie in 0..{n - 1} (image rows).")
    counts = np.bincount(owners, minlength=n)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0)
        raise ValueError(
            f"{missing.size} images have no caption (first rows: {missing[:5].tolist()}); "
            "drop them or pass their captions."
        )
    return owners.astype(np.int64), n


def caption_mean(captions: object, owners: object, n: int | None = None) -> np.ndarray:
    """(n, d) float64: the mean of each image's caption features (owners[c]: caption c's image)."""
    captions = check_features(captions, "captions")
    owners, n = _check_owners(owners, captions.shape[0], n)
    sums = np.zeros((n, captions.shape[1]))
    np.add.at(sums, owners, captions)
    return sums / np.bincount(owners, minlength=n)[:, None]


def _one_per_group(owners: np.ndarray, n: int, choice: str, seed: int) -> np.ndarray:
    """(n,) the row of one member per group 0..n−1: its first row, or one drawn at random."""
    if choice == "first":
        order = np.argsort(owners, kind="stable")
    elif choice == "random":
        rng = np.random.default_rng(int(seed))
        order = np.lexsort((rng.random(owners.size), owners))
    else:
        raise ValueError(f"choice must be 'first' or 'random', got {choice!r}.")
    return order[np.searchsorted(owners[order], np.arange(n))]


def single_caption(
    captions: object, owners: object, n: int | None = None, *, choice: str = "first", seed: int = 0
) -> np.ndarray:
    """(n, d): one caption per image — its first (lowest caption row) or one drawn at random."""
    captions = check_features(captions, "captions")
    owners, n = _check_owners(owners, captions.shape[0], n)
    return captions[_one_per_group(owners, n, choice, seed)]


def _effect(
    comparison: str,
    scorer: Callable[[np.ndarray, np.ndarray], float],
    X_one: np.ndarray,
    Y_one: np.ndarray,
    X_many: np.ndarray,
    Y_many: np.ndarray,
    method: str,
    n_resamples: int,
    seed: int,
    level: float,
    progress: Callable[[int, int], None] | None = None,
    k: object = None,
) -> AveragingEffect:
    """The scores of both sides and their difference's interval; ``k``: the metric's
    neighbours, if it has them (checked against a half-sample before any score is computed)."""
    n = X_one.shape[0]
    unit = "images" if comparison == "captions" else comparison
    more = "; pass finer labels" if comparison == "classes" else "; pass more images"
    if n < MIN_UNITS:
        raise ValueError(
            f"averaging over {comparison} compares {n} {unit}; it needs at least {MIN_UNITS} "
            f"(each half-sample of the interval holds half of them, and the metrics need 4)"
            + more
        )
    if method == "half" and isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        if k >= n // 2:  # a k-NN metric needs more than k rows in each half-sample
            raise ValueError(
                f"k={k} neighbours need more than {k} {unit} in each half-sample of the "
                f"interval, which holds {n // 2} of the {n}: pass k at most {n // 2 - 1}, or at "
                f"least {2 * k + 2} {unit}{more}"
            )
    one = float(scorer(X_one, Y_one))
    averaged = float(scorer(X_many, Y_many))
    calls = [0]  # resampled_interval scores all rows first, then each resample

    def difference(r: np.ndarray) -> float:
        value = scorer(X_many[r], Y_many[r]) - scorer(X_one[r], Y_one[r])
        calls[0] += 1
        if progress is not None and calls[0] > 1:
            progress(calls[0] - 1, int(n_resamples))
        return value

    interval = resampled_interval(
        difference,
        X_one.shape[0],
        method=method,
        n_resamples=n_resamples,
        seed=seed,
        level=level,
    )
    return AveragingEffect(
        comparison,
        one,
        averaged,
        averaged - one,
        interval.lower,
        interval.upper,
        X_one.shape[0],
        method,
        interval.n_resamples,
        level,
    )


def caption_averaging_effect(
    score: str | Callable[..., float],
    images: object,
    captions: object,
    owners: object,
    rows: object = None,
    *,
    one: str = "first",
    method: str = "half",
    n_resamples: int = 500,
    seed: int = 0,
    level: float = 0.95,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> AveragingEffect:
    """Images vs one caption each, and vs the mean of their captions, on the given image rows.

    Args:
        score: metric name (options as keywords) or callable score(X, Y).
        images: (n, d_x) image features.
        captions: (m, d_y) caption features; ``owners`` (m,) the image row of each caption.
        rows: image rows of the set (e.g. a dispersion set), or None for all.
        one: "first" or "random" caption per image (seeded).
        method, n_resamples, seed, level: the interval of the difference (over images).
        progress: optional ``progress(done, n_resamples)``, called after each resample.
    """
    scorer = _scorer(score, options)
    images = check_features(images, "images")
    n = images.shape[0]
    single = single_caption(captions, owners, n, choice=one, seed=seed)
    mean = caption_mean(captions, owners, n)
    rows = np.arange(n) if rows is None else check_indices(rows, n)
    X = images[rows]
    return _effect(
        "captions", scorer, X, single[rows], X, mean[rows], method, n_resamples, seed, level,
        progress, k=options.get("k"),
    )


def class_averaging_effect(
    score: str | Callable[..., float],
    images: object,
    texts: object,
    labels: object,
    *,
    one: str = "first",
    method: str = "half",
    n_resamples: int = 500,
    seed: int = 0,
    level: float = 0.95,
    max_classes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> AveragingEffect:
    """One image–text pair per class vs the class-mean image against the class-mean text.

    ``images`` (n, d_x) and ``texts`` (n, d_y) are paired rows (a float32 memory map is fine: only
    the rows compared are read), ``labels`` (n,) their classes; ``one`` picks each class's first
    row or a random one (seeded). The interval is over classes. Stimuli without a label
    (``calibration.has_label``: None, NaN or an empty string) take no part: they share no class,
    and a mean over them would be no class's mean. Labels of mixed types are compared as strings,
    as ``calibration.matchable_labels`` does. At least half of the classes need two or more
    members (else ValueError): with one image per class the comparison would be of each image
    with itself.

    ``max_classes``: above that many classes a seeded random sample of that many (``seed``; every
    member of each sampled class) is compared, and ``sampled_from`` says how many there were:
    every score is exact k-NN over the classes, O(classes² · d), ~2 × ``n_resamples`` of them.
    ``progress`` (optional): ``progress(done, n_resamples)`` after each resample.
    """
    scorer = _scorer(score, options)
    n = _rows_of(images, "images")
    if _rows_of(texts, "texts") != n:
        raise ValueError("images and texts must be paired rows of the same stimuli (same n).")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), one per row; got {labels.shape}.")
    labelled = has_label(labels)
    if not labelled.any():
        raise ValueError(
            "no stimulus has a label (each is None, NaN or an empty string); pass labels to "
            "average over classes."
        )
    rows = np.flatnonzero(labelled)
    labels = labels[rows]
    labels = labels.astype(str) if labels.dtype == object else labels  # str and int: sortable
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.ravel()
    sizes = np.bincount(codes, minlength=classes.size)
    if np.median(sizes) < 2:  # an ImageNet sample: two names shared by two classes each
        raise ValueError(
            f"{int(np.sum(sizes == 1))} of {sizes.size} classes have a single member, so their "
            "class means are the instances themselves; pass coarser labels (e.g. superclasses) "
            "to average over."
        )
    sampled_from = None
    if max_classes is not None:
        max_classes = int(max_classes)
        if max_classes < MIN_UNITS:
            raise ValueError(
                f"max_classes must be at least {MIN_UNITS} (the fewest classes compared), got "
                f"{max_classes}."
            )
        if classes.size > max_classes:
            sampled_from = int(classes.size)
            kept = np.sort(
                np.random.default_rng(int(seed)).choice(classes.size, max_classes, replace=False)
            )
            members = np.isin(codes, kept)
            rows, codes = rows[members], np.searchsorted(kept, codes[members])
            classes = classes[kept]
    # only the rows compared are read, as float64 (a run's features: a float32 memory map)
    every = rows.size == n
    images = check_features(images if every else np.asarray(images)[rows], "images")
    texts = check_features(texts if every else np.asarray(texts)[rows], "texts")
    image_means = _group_means(images, codes, classes.size)
    text_means = _group_means(texts, codes, classes.size)
    pick = _one_per_group(codes, classes.size, one, seed)
    effect = _effect(
        "classes",
        scorer,
        images[pick],
        texts[pick],
        image_means,
        text_means,
        method,
        n_resamples,
        seed,
        level,
        progress,
        k=options.get("k"),
    )
    return effect if sampled_from is None else replace(effect, sampled_from=sampled_from)


def _rows_of(features: object, name: str) -> int:
    """The number of rows of a 2-D feature array (read without converting it)."""
    shape = np.shape(features)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), one row per stimulus; got {shape}.")
    return int(shape[0])


def _group_means(features: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, d) float64: the mean row of each group 0..n_groups−1 (each non-empty)."""
    sums = np.zeros((n_groups, features.shape[1]))
    np.add.at(sums, codes, features)
    return sums / np.bincount(codes, minlength=n_groups)[:, None]


def caption_count_curve(
    score: str | Callable[..., float],
    images: object,
    captions: object,
    owners: object,
    rows: object = None,
    *,
    counts: object = None,
    n_draws: int = 5,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """The score as c = 1, 2, … captions (drawn at random per image) are averaged.

    Returns a long table: ``n_captions``, ``draw``, ``value``. ``counts`` defaults to 1 … the
    smallest number of captions any image has.
    """
    scorer = _scorer(score, options)
    images = check_features(images, "images")
    captions = check_features(captions, "captions")
    owners, n = _check_owners(owners, captions.shape[0], images.shape[0])
    rows = np.arange(n) if rows is None else check_indices(rows, n)
    per_image = np.bincount(owners, minlength=n)
    most = int(per_image[rows].min())
    counts = list(range(1, most + 1)) if counts is None else [int(c) for c in counts]
    if not counts or min(counts) < 1 or max(counts) > most:
        raise ValueError(
            f"counts must lie in 1..{most} (the fewest captions of an image in the set)."
        )
    rng = np.random.default_rng(int(seed))
    order = np.argsort(owners, kind="stable")
    starts = np.concatenate([[0], np.cumsum(per_image)[:-1]])
    records = []
    for draw in range(int(n_draws)):
        # one random order of each image's captions per draw; c captions = the first c of it
        ranks = np.lexsort((rng.random(owners.size), owners[order]))
        shuffled = order[ranks]
        for c in counts:
            Y = np.stack([captions[shuffled[starts[i] : starts[i] + c]].mean(axis=0) for i in rows])
            records.append({"n_captions": c, "draw": draw, "value": float(scorer(images[rows], Y))})
    return pd.DataFrame.from_records(records)
