"""Input checks shared by every numerics module.

Every check raises ``ValueError`` whose message says what is wrong *and* how to fix it, and returns
the input converted to the form the numerics expect (float64 2-D arrays, a plain ``int`` k), so
callers can write ``X = check_features(X, "X")`` and carry on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _label(index: int, names: Sequence[str] | None) -> str:
    if names is not None and index < len(names):
        return f"model {index} ({names[index]!r})"
    return f"model {index}"


def _check_finite(array: np.ndarray, what: str, rows: str, fix: str) -> None:
    """ValueError counting the NaN and ±Inf values of the (n, d) ``array`` and the ``rows``
    (e.g. "stimuli") that hold them, ending with ``fix``; nothing when all are finite."""
    n_nan = int(np.count_nonzero(np.isnan(array)))
    n_inf = int(np.count_nonzero(np.isinf(array)))
    if n_nan or n_inf:
        bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(
            f"{what} contains {n_nan} NaN and {n_inf} Inf values in {bad_rows.size} {rows} "
            f"(first rows: {bad_rows[:5].tolist()}); {fix}"
        )


def _from_tensor(value: object) -> object:
    """A torch tensor as a CPU tensor numpy can read (detached from autograd; bfloat16, which
    numpy lacks, as float32); anything else as it is. Model outputs can be passed directly."""
    if type(value).__module__.split(".")[0] != "torch" or not hasattr(value, "detach"):
        return value
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()
    return tensor.numpy()


def numeric_matrix(value: object, what: str) -> np.ndarray:
    """``value`` as a real 2-D numeric array, dtype kept (an ndarray, memory maps included, is
    returned as it is); ValueError naming ``what`` and the fix otherwise."""
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(_from_tensor(value))
    except Exception as exc:  # ragged nested lists and the like
        raise ValueError(
            f"{what} could not be read as a numeric array ({exc}); pass a 2-D numpy array "
            "of shape (n_stimuli, n_features)."
        ) from exc
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise ValueError(
            f"{what} has dtype {array.dtype}, not a number type; pass a numeric 2-D array "
            "of shape (n_stimuli, n_features)."
        )
    if np.iscomplexobj(array):
        raise ValueError(f"{what} is complex; pass real-valued features (e.g. np.real(X) if that is meant).")
    if array.ndim != 2:
        hint = (
            " Reshape a single vector with X.reshape(-1, 1), or flatten extra axes with "
            "X.reshape(len(X), -1)."
        )
        raise ValueError(
            f"{what} must be 2-D (n_stimuli, n_features) but has shape {array.shape}.{hint}"
        )
    return array


def _as_float_matrix(value: object, what: str) -> np.ndarray:
    """``value`` as a 2-D float64 array (no copy when it already is one)."""
    return np.asarray(numeric_matrix(value, what), dtype=np.float64)


def check_features(X: object, name: str = "X", *, min_rows: int = 1) -> np.ndarray:
    """Validate one feature matrix.

    Args:
        X: array-like of shape (n, d), one row per stimulus.
        name: what to call it in error messages.
        min_rows: the smallest n the caller can work with.

    Returns:
        ``X`` as a float64 array of shape (n, d).

    Raises:
        ValueError: not 2-D, not numeric, too few rows, no columns, or NaN/Inf anywhere.
    """
    array = _as_float_matrix(X, name)
    n, d = array.shape
    if n < min_rows:
        raise ValueError(
            f"{name} has {n} rows (stimuli) but at least {min_rows} are needed; "
            "pass more stimuli."
        )
    if d < 1:
        raise ValueError(f"{name} has no feature columns (shape {array.shape}); pass at least one feature.")
    _check_finite(array, name, "rows", "drop those stimuli or re-extract the features.")
    return array


def check_pair(X: object, Y: object, *, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate two feature matrices whose rows are paired (row i of X and Y = stimulus i).

    Returns:
        (X, Y) as float64 arrays of shapes (n, d_x) and (n, d_y).

    Raises:
        ValueError: either is invalid (see :func:`check_features`) or their row counts differ.
    """
    X = check_features(X, "X", min_rows=min_rows)
    Y = check_features(Y, "Y", min_rows=min_rows)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; the rows must be the same stimuli "
            "in the same order, so select the same stimuli from both."
        )
    return X, Y


def check_embedding_set(
    embeddings: Sequence[object], names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Validate the embeddings of several models for the same stimuli (the input of GPA).

    Args:
        embeddings: M arrays of shape (m, d_i): same m stimuli in the same order; d_i may differ.
        names: optional model names used in error messages.

    Returns:
        The M arrays as float64, shapes unchanged.

    Raises:
        ValueError: fewer than 2 models, an array not 2-D, different m across models, m < 3,
            an empty feature axis, or NaN/Inf (naming the model and counting them).
    """
    if isinstance(embeddings, np.ndarray) and embeddings.ndim == 3:
        embeddings = list(embeddings)
    if isinstance(embeddings, np.ndarray) or not isinstance(embeddings, Sequence):
        raise ValueError(
            "embeddings must be a list of M arrays of shape (m, d_i), one per model; "
            f"got {type(embeddings).__name__}. Wrap a single model's array in a list together "
            "with the other models'."
        )
    if len(embeddings) < 2:
        raise ValueError(
            f"Generalized Procrustes needs at least 2 models but got {len(embeddings)}; "
            "pass the embeddings of two or more models for the same stimuli."
        )
    if names is not None and len(names) not in (0, len(embeddings)):
        raise ValueError(
            f"got {len(names)} model names for {len(embeddings)} embedding arrays; "
            "pass one name per array (or none)."
        )
    arrays = [_as_float_matrix(x, _label(i, names)) for i, x in enumerate(embeddings)]
    n_rows = [a.shape[0] for a in arrays]
    if len(set(n_rows)) != 1:
        listing = ", ".join(f"{_label(i, names)}: {n}" for i, n in enumerate(n_rows))
        raise ValueError(
            f"all models must embed the same stimuli, but the numbers of rows differ ({listing}); "
            "select the same stimuli, in the same order, from every model."
        )
    m = n_rows[0]
    if m < 3:
        raise ValueError(
            f"only {m} stimuli; Procrustes residuals need at least 3 stimuli (after centering "
            "fewer carry no shape); pass more stimuli."
        )
    for i, a in enumerate(arrays):
        if a.shape[1] < 1:
            raise ValueError(f"{_label(i, names)} has no feature columns; drop it or re-extract it.")
        _check_finite(
            a,
            _label(i, names),
            "stimuli",
            "drop those stimuli from every model or re-extract this model's embeddings.",
        )
    return arrays


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int, if it is an integer (not a bool) of at least ``minimum``: a
    count such as ``n_sets`` or ``n_permutations``; ValueError naming ``name`` otherwise."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def model_value_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """A repeatable command-line flag's ``["MODEL=VALUE", ...]`` as ``{model: value}`` (the value
    may itself contain ``=``; both stripped); ValueError naming ``flag`` for an entry without a
    model or value, and for a model given twice (the last one silently won)."""
    out: dict[str, str] = {}
    for value in values or []:
        model, sep, rest = value.partition("=")
        model, rest = model.strip(), rest.strip()
        if not sep or not model or not rest:
            raise ValueError(f"{flag} expects MODEL=VALUE, got {value!r}")
        if model in out:
            raise ValueError(
                f"{flag} gives {model!r} twice ({model}={out[model]} and {model}={rest}); "
                "give it once"
            )
        out[model] = rest
    return out


def check_level(level: object) -> float:
    """The central mass of an interval, in (0, 1), as a float; ValueError naming the fix otherwise
    (a bool or a non-number included)."""
    if (
        isinstance(level, bool)
        or not isinstance(level, (int, float, np.floating))
        or not 0 < level < 1
    ):
        raise ValueError(f"level must lie in (0, 1), got {level!r}; use e.g. 0.95.")
    return float(level)


def check_k(k: object, n: int, minimum: int = 1, *, what: str = "the set") -> int:
    """Validate a neighbour count k for a set of n stimuli: ``minimum <= k <= n - 1``.

    The upper bound is n - 1 because a stimulus is never its own neighbour. The one k check of the
    package (metrics, Gram paths, analyses and the Alignment lab), so every error reads alike.

    Args:
        k: the neighbour count to check.
        n: stimuli in the set the neighbours are taken from.
        minimum: the smallest k the measure accepts (CKNNA: 2, mutual k-NN: 1).
        what: the set, as the message should name it (e.g. ``"the low set"``).

    Returns:
        k as a Python int.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer number of neighbours, got {k!r}; pass e.g. k=10.")
    k = int(k)
    if n - 1 < minimum:
        raise ValueError(
            f"{what} has {n} stimuli, too few for k >= {minimum} nearest neighbours (each stimulus "
            f"needs {minimum} others); use at least {minimum + 1} stimuli."
        )
    if k < minimum:
        raise ValueError(
            f"k={k} is too small: it must satisfy {minimum} <= k <= {n - 1} for {what} of {n} "
            f"stimuli; pass k >= {minimum}."
        )
    if k > n - 1:
        raise ValueError(
            f"k={k} is too large for {what} of {n} stimuli: each stimulus needs k other stimuli as "
            f"neighbours, so {minimum} <= k <= {n - 1}; use k <= {n - 1} or a larger set."
        )
    return k


#: Smallest stimulus set whose CKNNA the Alignment lab and the report show as a number. CKNNA's
#: unbiased HSIC estimates can leave [-1, 1] on small sets (see ``alignment.cknna_bound_note``).
#: Measured on the demo run (239 COCO stimuli; 3 vision models × 26 language layers; 200 random
#: sets + the low and high sets per size and k; benchmarks/measure_cknna_bound.py): at the
#: lab's default k = 10, |CKNNA| > 1 in 53-75 % of the values for sets of 12-16 stimuli, 2.3 % at
#: 20, 0.02 % (3 of 15,756, largest 1.016) at 24 and none from 28 on; with k <= s/4 none from 20
#: on, while even k = 2 exceeds 1 below that (67 % at 4 stimuli, 2.3 % at 8, 0.5 % at 10). With
#: k close to s (s/2 < k < s - 1) values above 1 occur up to 64 stimuli: those are flagged by the
#: note, not hidden. (Re-measured 2026-12-07 with EfficientNet-Lite at its trained input scale.)
MIN_CKNNA_SET_SIZE = 24


def is_missing_value(value: object) -> bool:
    """Whether one table cell holds no value: None, NaN of any float type, NaT or pd.NA (as
    ``pd.isna`` says of a scalar; a list or array is a value), never turned into a level or id
    named "nan", "NaT" or "<NA>"."""
    import pandas as pd

    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def closest_name(name: str, choices: Sequence[str], *, cutoff: float = 0.75) -> str | None:
    """The one of ``choices`` a mistyped ``name`` most likely meant (difflib's ratio at least
    ``cutoff``), or None: the "did you mean" of every message about an unknown name (a model,
    a modality, a flag's value)."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def check_min_stimuli(n: int, minimum: int, what: str) -> None:
    """Raise if ``n < minimum`` stimuli, explaining that ``what`` needs ``minimum``."""
    if n < minimum:
        raise ValueError(f"{what} needs at least {minimum} stimuli but got {n}; pass more stimuli.")


def check_square(G: object, name: str) -> np.ndarray:
    """Validate an (n, n) kernel / Gram matrix; returns it as an array (dtype kept, no copy)."""
    try:
        array = np.asarray(G)
    except Exception as exc:
        raise ValueError(f"{name} could not be read as an array ({exc}); pass an (n, n) numpy array.") from exc
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} has dtype {array.dtype}; pass a real-valued (n, n) Gram matrix.")
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(
            f"{name} must be a square (n, n) Gram matrix but has shape {array.shape}; "
            "build it as F @ F.T from features F of shape (n, d)."
        )
    return array


def product_rounding(width: int, scale: object = 1.0) -> np.ndarray | float:
    """How far apart rounding may put two float64 inner products of ``width`` terms that are equal
    in exact arithmetic, for products of size up to ``scale`` (1 for unit rows): a few ulps,
    growing with √width. BLAS computes a product by blocks, and takes a block's tail through
    another kernel, so a row and its exact duplicate may score an ulp apart; comparisons that
    must see them tie (neighbour tables, retrieval ranks, 2AFC) allow this much."""
    return 64.0 * np.finfo(np.float64).eps * np.sqrt(max(1, int(width))) * np.asarray(scale)
