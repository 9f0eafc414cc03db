"""The paper's analyses on any precomputed run, each returning a tidy pandas DataFrame.

- :func:`layer_sweep`: CKNNA of each vision model (at its GPA layer) with every layer of every
  language model, on the full stimulus set.
- :func:`best_language_layers`: per language model, the layer with the highest mean CKNNA with the
  vision models on the full set (the paper's §2.4 choice).
- :func:`dispersion_set_alignment` (Fig. 2): CKNNA on the low-, high- and random-dispersion sets,
  a permutation test of low vs high per pair; :func:`paired_set_tests` tests across pairs and
  :func:`effect_verdict` states in one line how often low > random > high holds.
- :func:`drop_fraction_alignment` (Fig. S1): CKNNA on the full set, without the q highest- and
  without the q lowest-dispersion stimuli.
- :func:`leave_one_model_out` (Fig. S2): partial dispersion vs the held-out model's deviation,
  per stimulus; :func:`leave_one_model_out_statistics` gives Pearson r, Spearman ρ and the fit
  line.

CKNNA is always computed from the run's cached Gram matrices (``run.gram``) with
``neighbours.cknna_from_gram``, or ``neighbours.subset_alignment`` for many subsets at once, so a
subset costs milliseconds. Column names are full words; CKNNA values are unitless.

Fig. 2's random sets and label shuffles come from :func:`random_set_alignment` and
:func:`low_high_permutation_tests`, which the dashboard's Alignment lab calls too: for the same
seed the page and the report draw the same sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pandas as pd

from .neighbours import cknna_from_gram, subset_alignment
from .procrustes import (
    deviation_from_consensus,
    generalized_procrustes,
    preprocess_embeddings,
    procrustes_align,
)
from .stats import (
    PermutationResult,
    correlation_with_fit,
    paired_difference_tests,
    percentile_interval,
    permutation_tests_two_sets,
)
from .subsets import drop_fraction, select_stimuli
from .validation import check_k

if TYPE_CHECKING:
    from .run import Run

DispersionScore = Literal["mean", "pc1"]
_SCORES: tuple[str, ...] = ("mean", "pc1")

#: Default number of label shuffles in the low-vs-high permutation test (p-value floor 1/1001).
DEFAULT_N_PERMUTATIONS = 1000

#: A model and layer: the key of one cached Gram matrix.
GramKey = tuple[str, str]


class Pair(NamedTuple):
    """One vision × language comparison: a model and a layer on each side (hashable, a tuple)."""

    vision_model: str
    vision_layer: str
    language_model: str
    language_layer: str

    @property
    def label(self) -> str:
        return f"{self.vision_model} × {self.language_model}"

    @property
    def gram_keys(self) -> tuple[GramKey, GramKey]:
        """((vision model, layer), (language model, layer)): the two Grams compared."""
        return (self.vision_model, self.vision_layer), (self.language_model, self.language_layer)


# ----------------------------------------------------------------------------------------------
# inputs shared by every analysis


def vision_layers(run: Run) -> list[tuple[str, str]]:
    """(vision model, layer) pairs in the order GPA used them; at least two, else ValueError."""
    models, layers = tuple(run.gpa.models), tuple(run.gpa.layers)
    if len(models) != len(layers) or not models:
        raise ValueError(
            f"run {run.path} does not record which layer of each vision model entered GPA "
            f"(gpa.json models={models!r}, layers={layers!r}); re-run precompute to rewrite "
            "gpa.json"
        )
    if len(models) < 2:
        raise ValueError(
            f"run {run.path} has a single vision model ({models[0]}); dispersion and these "
            "analyses "
            "need at least 2 vision models (3 for leave-one-model-out): precompute the run with "
            "more vision models"
        )
    return list(zip(models, layers, strict=True))


def _language_models(run: Run) -> list[str]:
    models = list(run.language_models)
    if not models:
        raise ValueError(
            f"run {run.path} has no language model; precompute it with at least one language model"
        )
    return models


def _n_stimuli(run: Run) -> int:
    return int(run.gpa.residuals.shape[0])


def _dispersion_scores(run: Run, score: str) -> np.ndarray:
    if score not in _SCORES:
        raise ValueError(f"unknown dispersion score {score!r}; use one of {list(_SCORES)}")
    return run.dispersion[score].to_numpy(dtype=np.float64)


class _Grams(dict):
    """``{(model, layer): Gram}`` of a run, each read on first use (once per analysis call)."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self._run = run

    def __missing__(self, key: GramKey) -> np.ndarray:
        gram = self[key] = np.asarray(self._run.gram(*key))
        return gram


# ----------------------------------------------------------------------------------------------
# layer sweep and best layers


def layer_sweep(run: Run, *, k: int = 10) -> pd.DataFrame:
    """CKNNA (full set) of each vision model's GPA layer against every layer of each language model.

    Returns one row per vision model × language model × language layer with columns
    ``vision_model``, ``vision_layer``, ``language_model``, ``language_layer``,
    ``language_layer_index`` (position in ``run.layers(language_model)``), ``k``, ``cknna``.
    """
    pairs = vision_layers(run)
    languages = _language_models(run)
    check_k(k, _n_stimuli(run), 2, what="the full set")
    grams = _Grams(run)
    rows = []
    for language in languages:
        for layer_index, language_layer in enumerate(run.layers(language)):
            language_gram = grams[(language, language_layer)]
            for vision, vision_layer in pairs:
                rows.append(
                    {
                        "vision_model": vision,
                        "vision_layer": vision_layer,
                        "language_model": language,
                        "language_layer": language_layer,
                        "language_layer_index": layer_index,
                        "k": int(k),
                        "cknna": float(
                            cknna_from_gram(grams[(vision, vision_layer)], language_gram, k=k)
                        ),
                    }
                )
    return pd.DataFrame(rows)


def best_language_layers(
    run: Run, *, k: int = 10, sweep: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per language model, the layer whose mean CKNNA with the vision models (full set) is highest.

    ``sweep`` may pass a :func:`layer_sweep` table already computed with the same ``k``. Ties go to
    the shallower layer. Returns one row per language model: ``language_model``,
    ``language_layer``, ``language_layer_index``, ``mean_cknna``, ``n_vision_models``, ``k``.
    """
    if sweep is None:
        sweep = layer_sweep(run, k=k)
    elif not (sweep["k"] == k).all():
        raise ValueError(f"the layer sweep passed was computed with another k; pass one with k={k}")
    means = (
        sweep.groupby(["language_model", "language_layer_index", "language_layer"], sort=False)
        .agg(mean_cknna=("cknna", "mean"), n_vision_models=("vision_model", "nunique"))
        .reset_index()
    )
    rows = []
    for language in dict.fromkeys(means["language_model"]):
        layers = means[means["language_model"] == language].sort_values("language_layer_index")
        best = layers.iloc[int(np.argmax(layers["mean_cknna"].to_numpy()))]
        rows.append(
            {
                "language_model": language,
                "language_layer": best["language_layer"],
                "language_layer_index": int(best["language_layer_index"]),
                "mean_cknna": float(best["mean_cknna"]),
                "n_vision_models": int(best["n_vision_models"]),
                "k": int(k),
            }
        )
    return pd.DataFrame(rows)


def _pairs_with_best_layers(run: Run, k: int, best_layers: pd.DataFrame | None) -> list[Pair]:
    """Every vision model (at its GPA layer) × language model (at its best layer)."""
    if best_layers is None:
        best_layers = best_language_layers(run, k=k)
    chosen = dict(zip(best_layers["language_model"], best_layers["language_layer"], strict=True))
    missing = [m for m in _language_models(run) if m not in chosen]
    if missing:
        raise ValueError(f"best_layers has no row for language models {missing}; recompute it")
    return [
        Pair(vision, vision_layer, language, chosen[language])
        for language in _language_models(run)
        for vision, vision_layer in vision_layers(run)
    ]


# ----------------------------------------------------------------------------------------------
# Fig. 2: low / high / random dispersion sets


def _set_draw_seeds(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent streams for Fig. 2's random sets and for its label shuffles, from one seed."""
    random_seed, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    return random_seed, permutation_seed


def random_sets(scores: np.ndarray, size: int, n_random: int, seed: int) -> np.ndarray:
    """(n_random, size) int64: Fig. 2's random sets, each ``size`` stimuli without replacement."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}; use e.g. n_random=200")
    rng = np.random.default_rng(_set_draw_seeds(seed)[0])
    return np.stack([select_stimuli(scores, "random", size, rng=rng) for _ in range(n_random)])


def random_set_alignment(
    grams: Mapping[GramKey, np.ndarray],
    pairs: Sequence[Pair],
    scores: np.ndarray,
    size: int,
    k: int,
    *,
    n_random: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """CKNNA and mutual k-NN of every pair on the :func:`random_sets` (the same sets for all).

    ``grams`` maps (model, layer) to its (n, n) Gram; ``scores`` (n,) only sets n. Returns
    ``(cknna, mutual_knn)``, each (len(pairs), n_random) float64.
    """
    sets = random_sets(scores, size, n_random, seed)
    return subset_alignment(grams, [pair.gram_keys for pair in pairs], sets, k)


def low_high_permutation_tests(
    grams: Mapping[GramKey, np.ndarray],
    pairs: Sequence[Pair],
    low: np.ndarray,
    high: np.ndarray,
    k: int,
    *,
    n_permutations: int,
    seed: int,
) -> list[PermutationResult]:
    """Per pair, the permutation test of CKNNA(low) - CKNNA(high), all pairs on the same shuffles.

    The low/high labels of the 2·s stimuli are shuffled ``n_permutations`` times
    (``stats.label_shuffles``); p-values use the +1 correction. One result per pair, in order.
    """
    keys = [pair.gram_keys for pair in pairs]
    return permutation_tests_two_sets(
        lambda sets: subset_alignment(grams, keys, sets, k)[0],
        low,
        high,
        n_permutations=n_permutations,
        rng=np.random.default_rng(_set_draw_seeds(seed)[1]),
    )


def dispersion_set_alignment(
    run: Run,
    *,
    size: int,
    k: int = 10,
    score: DispersionScore = "mean",
    n_random: int = 200,
    seed: int = 0,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    best_layers: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Fig. 2: CKNNA of every vision × language pair on the low-, high- and random-dispersion sets.

    The low (high) set holds the ``size`` stimuli with the lowest (highest) dispersion ``score``;
    the ``n_random`` random sets are drawn without replacement, the same draws for every pair.
    Each language model is used at its best layer (:func:`best_language_layers`, on the full set;
    ``best_layers`` may pass that table). Per pair, a permutation test shuffles the low/high labels
    of the 2·size stimuli ``n_permutations`` times and recomputes CKNNA(low) - CKNNA(high);
    p-values use the +1 correction, (1 + #{as extreme}) / (n_permutations + 1).

    Returns one row per pair with columns ``vision_model``, ``vision_layer``, ``language_model``,
    ``language_layer``, ``score``, ``set_size``, ``k``, ``cknna_low_dispersion``,
    ``cknna_random_mean``, ``cknna_random_lower_95`` / ``cknna_random_upper_95`` (2.5th / 97.5th
    percentiles), ``cknna_high_dispersion``, ``low_minus_high``, ``low_high_ratio`` (NaN when
    CKNNA(high) <= 0, where a ratio means nothing), ``permutation_p_value_two_sided``,
    ``permutation_p_value_low_greater``, ``n_random``, ``n_permutations``, ``seed``.
    """
    vision_layers(run)  # a run with a single vision model fails here, before anything else
    n = _n_stimuli(run)
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(
            f"set size must be a positive integer, got {size!r}; use e.g. size={n // 4}"
        )
    if 2 * size > n:
        raise ValueError(
            f"set size {size} is larger than half the {n} stimuli, so the low- and high-dispersion "
            f"sets would overlap; use size <= {n // 2}"
        )
    check_k(k, size, 2, what="sets")
    scores = _dispersion_scores(run, score)
    pairs = _pairs_with_best_layers(run, k, best_layers)

    low = select_stimuli(scores, "low", size)
    high = select_stimuli(scores, "high", size)
    grams = _Grams(run)
    keys = [pair.gram_keys for pair in pairs]
    low_values, high_values = subset_alignment(grams, keys, np.stack([low, high]), k)[0].T
    random_values, _ = random_set_alignment(
        grams, pairs, scores, size, k, n_random=n_random, seed=seed
    )
    tests = low_high_permutation_tests(
        grams, pairs, low, high, k, n_permutations=n_permutations, seed=seed
    )
    rows = []
    for pair, low_value, high_value, random_row, test in zip(
        pairs, low_values.tolist(), high_values.tolist(), random_values, tests, strict=True
    ):
        lower, upper = percentile_interval(random_row, 0.95)
        rows.append(
            {
                **pair._asdict(),
                "score": score,
                "set_size": int(size),
                "k": int(k),
                "cknna_low_dispersion": low_value,
                "cknna_random_mean": float(random_row.mean()),
                "cknna_random_lower_95": lower,
                "cknna_random_upper_95": upper,
                "cknna_high_dispersion": high_value,
                "low_minus_high": low_value - high_value,
                "low_high_ratio": low_value / high_value if high_value > 0 else float("nan"),
                "permutation_p_value_two_sided": test.p_value_two_sided,
                "permutation_p_value_low_greater": test.p_value_first_greater,
                "n_random": int(n_random),
                "n_permutations": int(n_permutations),
                "seed": int(seed),
            }
        )
    return pd.DataFrame(rows)


def paired_set_tests(table: pd.DataFrame) -> pd.DataFrame:
    """Across pairs, Wilcoxon signed-rank and paired t tests of CKNNA(low) vs CKNNA(high).

    ``table`` is a :func:`dispersion_set_alignment` result (one score). Returns one row per test:
    ``test``, ``statistic``, ``p_value`` (two-sided), ``n_pairs``, ``mean_difference`` (low - high).
    """
    return paired_difference_tests(
        table["cknna_low_dispersion"].to_numpy(), table["cknna_high_dispersion"].to_numpy()
    )


def effect_verdict(table: pd.DataFrame) -> str:
    """One sentence, computed from a :func:`dispersion_set_alignment` table, on the paper's effect.

    Counts the pairs where low > random mean > high, those where low > high, and among those the
    ones whose two-sided permutation p-value is below 0.05.
    """
    if table.empty:
        raise ValueError(
            "the table has no pairs; run dispersion_set_alignment on a run with models"
        )
    low = table["cknna_low_dispersion"].to_numpy()
    random_mean = table["cknna_random_mean"].to_numpy()
    high = table["cknna_high_dispersion"].to_numpy()
    ordered = int(np.count_nonzero((low > random_mean) & (random_mean > high)))
    low_above_high = low > high
    significant = int(
        np.count_nonzero(low_above_high & (table["permutation_p_value_two_sided"] < 0.05))
    )
    n_pairs = len(table)
    scores = ", ".join(sorted(set(map(str, table["score"]))))
    return (
        f"low > random > high ({scores} dispersion, {int(table['set_size'].iloc[0])} stimuli per "
        "set) "
        f"holds for {ordered} of {n_pairs} vision × language pairs; low > high for "
        f"{int(np.count_nonzero(low_above_high))} of {n_pairs} ({significant} with permutation "
        "p < 0.05)."
    )


# ----------------------------------------------------------------------------------------------
# Fig. S1: drop the q highest / lowest dispersion stimuli


def drop_fraction_alignment(
    run: Run,
    *,
    q: float = 0.25,
    k: int = 10,
    score: DispersionScore = "mean",
    best_layers: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Fig. S1: CKNNA per pair on the full set, without the q highest and without the q lowest.

    Returns one row per pair × condition (``full``, ``drop_high``, ``drop_low``) with columns
    ``vision_model``, ``vision_layer``, ``language_model``, ``language_layer``, ``condition``,
    ``fraction_dropped``, ``score``, ``n_stimuli`` (stimuli kept), ``k``, ``cknna``.
    """
    vision_layers(run)
    if not 0.0 < q < 1.0:
        raise ValueError(
            f"q is the fraction of stimuli to drop and must lie in (0, 1), got {q}; use e.g. 0.25"
        )
    n = _n_stimuli(run)
    scores = _dispersion_scores(run, score)
    pairs = _pairs_with_best_layers(run, k, best_layers)
    conditions = {
        "full": np.arange(n),
        "drop_high": np.asarray(drop_fraction(scores, q, "high"), dtype=np.intp),
        "drop_low": np.asarray(drop_fraction(scores, q, "low"), dtype=np.intp),
    }
    for name, kept in conditions.items():
        check_k(k, kept.shape[0], 2, what=f"the {name} set")
    grams = _Grams(run)
    rows = []
    for pair in pairs:
        vision_gram, language_gram = (grams[key] for key in pair.gram_keys)
        for name, kept in conditions.items():
            subset = None if name == "full" else kept
            rows.append(
                {
                    **pair._asdict(),
                    "condition": name,
                    "fraction_dropped": 0.0 if name == "full" else float(q),
                    "score": score,
                    "n_stimuli": int(kept.shape[0]),
                    "k": int(k),
                    "cknna": float(cknna_from_gram(vision_gram, language_gram, k=k, subset=subset)),
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Fig. S2: leave one vision model out


def _row_space_coordinates(configuration: np.ndarray) -> np.ndarray:
    """(m, min(m, d)) coordinates Z of the rows of ``configuration`` (m, d) in an orthonormal basis
    V of its row space (configuration = Z Vᵀ), so every distance between rows is kept."""
    return np.linalg.qr(configuration.T, mode="r").T


def held_out_deviation(held_out: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    """Per-stimulus distance of a held-out embedding from a GPA consensus it did not enter.

    ``held_out`` (m, d_h) is preprocessed exactly as GPA preprocesses its inputs (centred over
    stimuli, zero-padded to max(d_h, d_c), unit Frobenius norm), then rotated (orthogonal
    Procrustes, reflections allowed) onto ``consensus`` (m, d_c) zero-padded to the same width.
    Returns (m,) float64 Euclidean distances, in the same units as the GPA residuals.

    Both configurations are first written in an orthonormal basis of their own row space (at most
    m columns); Procrustes optimises over every orthogonal map, so this changes no distance and
    turns a (d × d) SVD into an (m × m) one when d > m.
    """
    consensus = np.asarray(consensus, dtype=np.float64)
    held_out = np.asarray(held_out, dtype=np.float64)
    if held_out.ndim != 2 or consensus.ndim != 2 or held_out.shape[0] != consensus.shape[0]:
        raise ValueError(
            f"the held-out embedding has shape {held_out.shape} and the consensus "
            f"{consensus.shape}; "
            "pass (m, d) arrays of the same m stimuli in the same order"
        )
    # preprocess as GPA does; the consensus rides along only to set the padded width (its own
    # preprocessed copy is discarded: the target is the consensus as GPA returned it)
    prepared = preprocess_embeddings([held_out, consensus], models=("held-out model", "consensus"))[
        0
    ]
    source, target = _row_space_coordinates(prepared), _row_space_coordinates(consensus)
    width = max(source.shape[1], target.shape[1])
    source = np.pad(source, ((0, 0), (0, width - source.shape[1])))
    target = np.pad(target, ((0, 0), (0, width - target.shape[1])))
    aligned, _ = procrustes_align(source, target)
    return np.linalg.norm(np.asarray(aligned, dtype=np.float64) - target, axis=1)


def leave_one_model_out(run: Run) -> pd.DataFrame:
    """Fig. S2: for each vision model, partial dispersion of the others vs its own deviation.

    For each held-out vision model, GPA is rerun on the other vision models (same layers); the
    partial dispersion of a stimulus is its mean residual across them; the held-out model's
    deviation is :func:`held_out_deviation` from the partial consensus. Needs >= 3 vision models.

    Returns one row per held-out model × stimulus: ``held_out_model``, ``held_out_layer``,
    ``stimulus`` (row index), ``id``, ``partial_dispersion``, ``deviation`` (both in residual
    units: Euclidean distance between unit-Frobenius-norm configurations).
    """
    pairs = vision_layers(run)
    if len(pairs) < 3:
        raise ValueError(
            "leave-one-model-out needs at least 3 vision models (GPA on the others needs 2), the "
            "run "
            f"has {len(pairs)}: precompute the run with more vision models"
        )
    # as stored (memory maps are read in row blocks; no float64 copies of whole models)
    embeddings = {model: run.embeddings[model][layer] for model, layer in pairs}
    ids = run.stimuli["id"].astype(str).to_numpy()
    tables = []
    for held_model, held_layer in pairs:
        others = [(m, layer) for m, layer in pairs if m != held_model]
        partial = generalized_procrustes(
            [embeddings[m] for m, _ in others],
            models=tuple(m for m, _ in others),
            layers=tuple(layer for _, layer in others),
        )
        tables.append(
            pd.DataFrame(
                {
                    "held_out_model": held_model,
                    "held_out_layer": held_layer,
                    "stimulus": np.arange(ids.shape[0]),
                    "id": ids,
                    "partial_dispersion": np.asarray(partial.residuals, dtype=np.float64).mean(
                        axis=1
                    ),
                    # = held_out_deviation(embeddings[held_model], partial.consensus), computed
                    # from cross-products over row blocks (no (n, d) consensus)
                    "deviation": deviation_from_consensus(embeddings[held_model], partial),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)


def leave_one_model_out_statistics(points: pd.DataFrame) -> pd.DataFrame:
    """Per held-out model: Pearson r and Spearman ρ of deviation on partial dispersion, fit line.

    ``points`` is a :func:`leave_one_model_out` table. Returns one row per held-out model with
    ``held_out_model``, ``held_out_layer``, ``pearson_r``, ``pearson_p_value``, ``spearman_rho``,
    ``spearman_p_value`` (two-sided), ``fit_slope``, ``fit_intercept`` (deviation ≈ slope ·
    partial dispersion + intercept), ``n_stimuli``.
    """
    rows = []
    for (model, layer), group in points.groupby(["held_out_model", "held_out_layer"], sort=False):
        rows.append(
            {
                "held_out_model": model,
                "held_out_layer": layer,
                **correlation_with_fit(
                    group["partial_dispersion"].to_numpy(), group["deviation"].to_numpy()
                ),
            }
        )
    return pd.DataFrame(rows)
