"""The paper's analyses on any precomputed run, each returning a tidy pandas DataFrame.

- :func:`layer_sweep`: CKNNA of each vision model (at its GPA layer) with every layer of every
  language model, on the full stimulus set.
- :func:`best_language_layers`: per language model, the layer with the highest mean CKNNA with the
  vision models on the full set (the paper's §2.4 choice).
- :func:`dispersion_set_alignment` (Fig. 2): CKNNA on the low-, high- and random-dispersion sets,
  a permutation test of low vs high per pair; :func:`paired_set_tests` tests across pairs and
  :func:`effect_verdict` states in one line how often low > random > high holds.
- :func:`set_metric_values`: any metric of the registry (``metrics.metric_names()``) of many pairs
  on many sets; ``dispersion_set_alignment(..., metrics=[...])`` gives Fig. 2 for every metric as
  one long table (a ``metric`` column), :func:`cknna_table` its classic CKNNA columns and
  :func:`effect_counts` how often the effect holds per metric.
- :func:`shuffled_pairing_calibration`: each score on a set beside the same score with the
  image–text pairing shuffled within that set; :func:`matched_baselines`: the low and high sets
  against random sets matched on the vision models' typicality (:func:`vision_typicality`) and,
  where the run has labels, on category — does low > high survive?
- :func:`drop_fraction_alignment` (Fig. S1): CKNNA on the full set, without the q highest- and
  without the q lowest-dispersion stimuli.
- :func:`leave_one_model_out` (Fig. S2): partial dispersion vs the held-out model's deviation,
  per stimulus; :func:`leave_one_model_out_statistics` gives Pearson r, Spearman ρ and the fit
  line.

Neighbour metrics (CKNNA among them) are always computed by the neighbour engine
(``neighbours.subset_alignment`` over the run's ``run.neighbours(model, layer)`` indexes: exact,
from the stored neighbour lists), many subsets and pairs at once, so a subset costs milliseconds
at any n; feature metrics (CKA, SVCCA) from each set's prepared features (``metrics.measure``),
one call per pair and set. Column names are full words; metric values are unitless. Above
:data:`LAYER_SWEEP_MAX_STIMULI` stimuli the layer sweep (and so the choice of each language
model's best layer) runs on a seeded random sample of that many stimuli, which its table says
(``n_stimuli_used``, ``sample_seed``).

Fig. 2's random sets (:func:`random_sets`) and its label shuffles' random stream
(:func:`shuffle_rng`) are public, and the dashboard's Alignment lab draws from them too: for the
same seed the page and the report draw the same sets and the same shuffles.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from . import metrics as registry
from .calibration import (
    MatchedSets,
    baseline_freedom,
    calibrated_score,
    local_density,
    matched_sets_by_cost,
    shuffled_pairing_rows,
    typicality,
)
from .dispersion import SCORES, check_score
from .neighbours import NeighbourIndex, check_subsets, exact_top_k, subset_alignment
from .procrustes import (
    deviation_from_consensus,
    generalized_procrustes,
    preprocess_embeddings,
    procrustes_align,
)
from .stats import (
    SHUFFLE_BLOCK,
    correlation_with_fit,
    label_shuffle_blocks,
    paired_difference_tests,
    percentile_interval,
    permutation_p_values,
)
from .subset_metrics import OnError, metric_values, row_space_coordinates
from .subsets import drop_fraction, select_stimuli
from .validation import MIN_CKNNA_SET_SIZE, check_count, check_k, check_level

if TYPE_CHECKING:
    from .run import Run

#: A dispersion score's name: one of ``dispersion.SCORES`` (the one list; see ``check_score``)
DispersionScore = str

#: Default number of label shuffles in the low-vs-high permutation test (p-value floor 1/1001).
DEFAULT_N_PERMUTATIONS = 1000

#: A model and layer: the key of one neighbour index (``run.neighbours(model, layer)``).
LayerKey = tuple[str, str]

#: Above this many stimuli, the layer sweep runs on a seeded random sample of this size.
LAYER_SWEEP_MAX_STIMULI = 4096
LAYER_SWEEP_SEED = 0


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
    def sides(self) -> tuple[LayerKey, LayerKey]:
        """((vision model, layer), (language model, layer)): the two layers compared."""
        return (self.vision_model, self.vision_layer), (self.language_model, self.language_layer)


def aligns_two_models(pair: Pair) -> bool:
    """Whether ``pair`` aligns two models: a language model that is also in GPA would be
    aligned with itself (CKNNA about 1) and lift every mean over the pairs."""
    return pair.vision_model != pair.language_model


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
    return run.dispersion[check_score(score)].to_numpy(dtype=np.float64)


def indexes_for(run: Run, pairs: Sequence[Pair]) -> dict[LayerKey, NeighbourIndex]:
    """``{(model, layer): run.neighbours(model, layer)}`` for both sides of every pair."""
    return {side: run.neighbours(*side) for pair in pairs for side in pair.sides}


def _alignment(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    sets: np.ndarray,
    k: int,
    metrics: Sequence[str] = ("cknna",),
):
    """The subset engine's ``metrics`` (only CKNNA by default: the layer sweep and Fig. S1 read
    nothing else, and the engine computes only what it is asked for)."""
    return subset_alignment(indexes, [pair.sides for pair in pairs], sets, k, metrics=metrics)


# ----------------------------------------------------------------------------------------------
# layer sweep and best layers


def sweep_sample(n: int, *, max_stimuli: int = LAYER_SWEEP_MAX_STIMULI,
                 seed: int = LAYER_SWEEP_SEED) -> np.ndarray:
    """Rows the layer sweep uses: all n, or a seeded random sample of ``max_stimuli`` (sorted)."""
    if n <= max_stimuli:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_stimuli, replace=False))


def layer_sweep(
    run: Run, *, k: int = 10, max_stimuli: int = LAYER_SWEEP_MAX_STIMULI,
    seed: int = LAYER_SWEEP_SEED,
) -> pd.DataFrame:
    """CKNNA of each vision model's GPA layer against every layer of each language model.

    On the full set, or above ``max_stimuli`` stimuli on a seeded random sample of that many
    (:func:`sweep_sample`). Returns one row per vision model × language model × language layer
    with columns ``vision_model``, ``vision_layer``, ``language_model``, ``language_layer``,
    ``language_layer_index`` (position in ``run.layers(language_model)``), ``k``, ``cknna``,
    ``n_stimuli_used``, ``sample_seed`` (None when every stimulus was used).
    """
    vision = vision_layers(run)
    languages = _language_models(run)
    rows_used = sweep_sample(_n_stimuli(run), max_stimuli=max_stimuli, seed=seed)
    check_k(k, rows_used.size, 2, what="the full set")
    sampled = rows_used.size < _n_stimuli(run)
    pairs = [
        pair
        for language in languages
        for language_layer in run.layers(language)
        for vision_model, vision_layer in vision
        if aligns_two_models(pair := Pair(vision_model, vision_layer, language, language_layer))
    ]
    values = _alignment(indexes_for(run, pairs), pairs, rows_used[None, :], k).cknna[:, 0]
    layer_index = {
        (language, layer): i for language in languages for i, layer in enumerate(run.layers(language))
    }
    return pd.DataFrame(
        [
            {
                **pair._asdict(),
                "language_layer_index": layer_index[(pair.language_model, pair.language_layer)],
                "k": int(k),
                "cknna": float(value),
                "n_stimuli_used": int(rows_used.size),
                "sample_seed": int(seed) if sampled else None,
            }
            for pair, value in zip(pairs, values, strict=True)
        ]
    )


def best_language_layers(
    run: Run, *, k: int = 10, sweep: pd.DataFrame | None = None,
    undefined: Literal["raise", "default"] = "raise",
) -> pd.DataFrame:
    """Per language model, the layer whose mean CKNNA with the vision models (full set) is highest.

    ``sweep`` may pass a :func:`layer_sweep` table already computed with the same ``k``. Ties go to
    the shallower layer; layers whose mean is NaN (CKNNA undefined with every vision model) are
    passed over. Returns one row per language model: ``language_model``,
    ``language_layer``, ``language_layer_index``, ``mean_cknna``, ``n_vision_models``, ``k``,
    ``n_stimuli_used`` and ``sample_seed`` (of the sweep's sample; None: every stimulus).

    ``undefined`` says what a language model whose every layer has a NaN mean CKNNA gets:
    ``"raise"`` (the default) a ValueError naming it (the dashboard pages then use the default
    layers); ``"default"`` its default layer (``run.default_layer``), with ``mean_cknna`` NaN:
    the only row whose ``mean_cknna`` is NaN (:func:`undefined_layer_note` says it in words; the
    report's choice).

    Raises:
        ValueError: ``undefined="raise"`` and every layer of a language model has a NaN mean
            CKNNA (naming the model).
    """
    if undefined not in ("raise", "default"):
        raise ValueError(f"undefined must be 'raise' or 'default', got {undefined!r}")
    if sweep is None:
        sweep = layer_sweep(run, k=k)
    elif not (sweep["k"] == k).all():
        raise ValueError(f"the layer sweep passed was computed with another k; pass one with k={k}")
    means = (
        sweep.groupby(["language_model", "language_layer_index", "language_layer"], sort=False)
        .agg(
            mean_cknna=("cknna", "mean"),
            n_vision_models=("vision_model", "nunique"),
            n_stimuli_used=("n_stimuli_used", "first"),
            sample_seed=("sample_seed", "first"),
        )
        .reset_index()
    )
    rows = []
    for language in dict.fromkeys(means["language_model"]):
        layers = means[means["language_model"] == language].sort_values("language_layer_index")
        values = layers["mean_cknna"].to_numpy(dtype=np.float64)
        if not np.isnan(values).all():
            best = layers.iloc[int(np.nanargmax(values))]
        elif undefined == "raise":
            raise ValueError(
                f"language model {language!r} has no defined CKNNA with the vision models at any "
                "of its layers (NaN: its features or theirs do not vary over the stimuli?); check "
                "its features, or leave it out of the run"
            )
        else:  # as the dashboard pages: the model's default layer (mean_cknna NaN there too)
            default = run.default_layer(language)
            at_default = layers[layers["language_layer"] == default]
            if at_default.empty:
                raise ValueError(
                    f"language model {language!r}'s default layer {default!r} is not in the "
                    "layer sweep; pass a sweep of this run (analyses.layer_sweep)"
                )
            best = at_default.iloc[0]
        rows.append(
            {
                "language_model": language,
                "language_layer": best["language_layer"],
                "language_layer_index": int(best["language_layer_index"]),
                "mean_cknna": float(best["mean_cknna"]),
                "n_vision_models": int(best["n_vision_models"]),
                "k": int(k),
                "n_stimuli_used": int(best["n_stimuli_used"]),
                "sample_seed": None if pd.isna(best["sample_seed"]) else int(best["sample_seed"]),
            }
        )
    return pd.DataFrame(rows)


def undefined_layer_note(best_layers: pd.DataFrame) -> list[str]:
    """One sentence per language model that :func:`best_language_layers` (``undefined=
    "default"``) put at its default layer because its CKNNA is NaN at every layer (its
    ``mean_cknna`` NaN), naming the model and the layer; [] when there is none."""
    return [
        f"language model {row.language_model!r} has no defined CKNNA with the vision models at "
        f"any of its layers (NaN: its features or theirs do not vary over the stimuli?), so no "
        f"best layer: its default layer {row.language_layer!r} is used instead, as the dashboard "
        "pages do; its pairs' CKNNA may be NaN (check its features)"
        for row in best_layers.itertuples()
        if pd.isna(row.mean_cknna)
    ]


def pairs_with_best_layers(
    run: Run, *, k: int = 10, best_layers: pd.DataFrame | None = None
) -> list[Pair]:
    """Every vision model (at its GPA layer) × language model (at its best layer, from
    ``best_layers`` or :func:`best_language_layers` with this ``k``), in Fig. 2's row order."""
    return _pairs_with_best_layers(run, k, best_layers)


def _pairs_with_best_layers(run: Run, k: int, best_layers: pd.DataFrame | None) -> list[Pair]:
    """Every vision model (at its GPA layer) × language model (at its best layer), without a
    model paired with itself (:func:`aligns_two_models`)."""
    if best_layers is None:
        best_layers = best_language_layers(run, k=k)
    chosen = dict(zip(best_layers["language_model"], best_layers["language_layer"], strict=True))
    missing = [m for m in _language_models(run) if m not in chosen]
    if missing:
        raise ValueError(f"best_layers has no row for language models {missing}; recompute it")
    pairs = (
        Pair(vision, vision_layer, language, chosen[language])
        for language in _language_models(run)
        for vision, vision_layer in vision_layers(run)
    )
    return list(filter(aligns_two_models, pairs))


def partner_pairs(run: Run) -> list[Pair]:
    """Every GPA model (at its GPA layer) × every model outside GPA that is not a language model
    (:attr:`Run.partner_models`: brain recordings, ...; at its default layer), partner-major as
    Fig. 2's rows: the pairs of the paper's analyses on a run without language models."""
    return [
        Pair(model, layer, partner, run.default_layer(partner))
        for partner in run.other_partner_models
        for model, layer in vision_layers(run)
    ]


def partner_groups(run: Run) -> dict[str, str]:
    """The groups of partners that Fig. 2 and S1 align the GPA models with, in what the pairs
    align: ``"language"`` (the language models, at their best layers in the figures) and
    ``"other"`` (:func:`partner_pairs`: brain recordings, ...), each present only when the run has
    such models, e.g. ``{"language": "vision × language", "other": "vision × brain"}``."""
    groups: dict[str, str] = {}
    if run.language_models:
        groups["language"] = pair_sides(run, [
            Pair(model, layer, language, run.default_layer(language))
            for language in run.language_models
            for model, layer in vision_layers(run)
        ])
    if run.other_partner_models:
        groups["other"] = pair_sides(run, partner_pairs(run))
    return groups


def pair_modalities(run: Run, pairs: Sequence[Pair]) -> tuple[str, str]:
    """The modalities on each side of ``pairs`` (repeats dropped, ``/``-joined):
    ``("vision", "language")``, ``("vision", "brain")``, ``("brain", "vision/brain")``."""
    left = dict.fromkeys(run.modality(p.vision_model) for p in pairs)
    right = dict.fromkeys(run.modality(p.language_model) for p in pairs)
    return "/".join(left), "/".join(right)


def pair_sides(run: Run, pairs: Sequence[Pair]) -> str:
    """What ``pairs`` align, in words: ``vision × language``, ``vision × brain``."""
    return " × ".join(pair_modalities(run, pairs))


# ----------------------------------------------------------------------------------------------
# Fig. 2: low / high / random dispersion sets


def set_draw_seeds(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent streams for Fig. 2's random sets and for its label shuffles, from one seed
    (``random_baseline.random_set_stream`` draws the same random sets one at a time)."""
    random_seed, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    return random_seed, permutation_seed


def shuffle_rng(seed: int) -> np.random.Generator:
    """The random stream of Fig. 2's low/high label shuffles for ``seed`` (independent of the
    random sets' stream, :func:`random_sets`): the report and the Alignment lab shuffle with
    it."""
    return np.random.default_rng(set_draw_seeds(int(seed))[1])


def random_sets(scores: np.ndarray, size: int, n_random: int, seed: int) -> np.ndarray:
    """(n_random, size) int64: Fig. 2's random sets, each ``size`` stimuli without replacement."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}; use e.g. n_random=200")
    rng = np.random.default_rng(set_draw_seeds(seed)[0])
    return np.stack([select_stimuli(scores, "random", size, rng=rng) for _ in range(n_random)])


def check_set_size(size: object, n: int) -> None:
    """ValueError naming the fix unless ``size`` is a positive integer of at most half the ``n``
    stimuli (the low- and high-dispersion sets of Fig. 2 must not overlap)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(
            f"set size must be a positive integer, got {size!r}; use e.g. size={n // 4}"
        )
    if 2 * size > n:
        raise ValueError(
            f"set size {size} is larger than half the {n} stimuli, so the low- and high-dispersion "
            f"sets would overlap; use size <= {n // 2}"
        )


def dispersion_set_alignment(
    run: Run,
    *,
    size: int,
    k: int = 10,
    score: DispersionScore | Sequence[DispersionScore] = "mean",
    n_random: int = 200,
    seed: int = 0,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    best_layers: pd.DataFrame | None = None,
    metrics: Sequence[str] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    metric_permutations: int | None = None,
    on_error: OnError = "raise",
    pairs: Sequence[Pair] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """Fig. 2: alignment of every vision × language pair on the low-, high- and random sets.

    The low (high) set holds the ``size`` stimuli with the lowest (highest) dispersion ``score``
    (one score, or several: their rows one after the other, score by score); the ``n_random``
    random sets are drawn without replacement (:func:`random_sets`), the same draws for every
    pair, metric and score (measured once). Each language model is used at its best layer
    (:func:`best_language_layers`, on the full set; ``best_layers`` may pass that table). Per pair
    and metric, a permutation test shuffles the low/high labels of the 2·size stimuli and
    recomputes metric(low) - metric(high) — CKNNA ``n_permutations`` times, every other metric
    ``metric_permutations`` times (default: as many; 0: no test, p-values NaN), the first of
    the same shuffles; p-values use the +1 correction, (1 + #{as extreme}) / (shuffles + 1).

    ``metrics=None`` (the default) gives the classic CKNNA table, one row per pair with columns
    ``vision_model``, ``vision_layer``, ``language_model``, ``language_layer``, ``score``,
    ``set_size``, ``k``, ``cknna_low_dispersion``, ``cknna_random_mean``,
    ``cknna_random_lower_95`` / ``cknna_random_upper_95`` (2.5th / 97.5th percentiles),
    ``cknna_high_dispersion``, ``low_minus_high``, ``low_high_ratio`` (NaN when the high value is
    <= 0, where a ratio means nothing), ``permutation_p_value_two_sided``,
    ``permutation_p_value_low_greater``, ``mean_over_pairs_p_value_two_sided`` /
    ``_low_greater`` (the same on every row of a score and metric: the mean over the pairs of
    low − high against that mean on each label shuffle, the same shuffles for every pair; see
    :func:`paired_set_tests`), ``n_random``, ``n_permutations``, ``seed``.

    ``metrics=[names]`` (registry names, ``metrics.metric_names()``; ``metric_options`` per
    metric, e.g. ``{"svcca": {"cca_dim": 10}}``) gives the long table: one row per metric × pair
    (metric-major), a ``metric`` column after ``score``, and the value columns without the
    ``cknna_`` prefix (``low_dispersion``, ``random_mean``, ``random_lower_95``,
    ``random_upper_95``, ``high_dispersion``); ``n_permutations`` is each row's count.
    :func:`cknna_table` turns its CKNNA rows into the classic table (the same numbers).
    ``on_error="nan"``: a feature metric undefined on a set gives NaN there (and NaN p-values and
    intervals wherever such a set enters) instead of an error (:func:`set_metric_values`).
    ``pairs``: other pairs instead of vision × language at the best layers (e.g. the GPA models
    × brain recordings, :attr:`Run.partner_models`); ``best_layers`` is then not used.
    ``progress(stage, done, total)``: called after each set that feature metrics are measured on
    (``stage``: "random sets", "low and high sets (<score>)" or "label shuffles (<score>)"; the
    neighbour metrics take all sets at once and report nothing).
    """
    vision_layers(run)  # a run with a single vision model fails here, before anything else
    n = _n_stimuli(run)
    check_set_size(size, n)
    check_k(k, size, 2, what="sets")
    names = ["cknna"] if metrics is None else check_metric_names(metrics)
    options = _metric_options(names, metric_options)
    counts = {
        name: check_count(
            n_permutations if name == "cknna" or metric_permutations is None
            else metric_permutations,
            "n_permutations" if name == "cknna" else "metric_permutations",
            minimum=1 if name == "cknna" else 0,
        )
        for name in names
    }
    score_names = [score] if isinstance(score, str) else list(dict.fromkeys(score))
    if not score_names:
        raise ValueError(f"pass at least one dispersion score; use one of {list(SCORES)}")
    by_score = {name: _dispersion_scores(run, name) for name in score_names}
    pairs = _pairs_with_best_layers(run, k, best_layers) if pairs is None else list(pairs)
    if not pairs:
        raise ValueError("no pairs to align; pass at least one Pair")
    indexes = indexes_for(run, pairs)
    # the random sets depend on n and the seed only: measured once for every score
    draws = random_sets(by_score[score_names[0]], size, n_random, seed)
    random_values = set_metric_values(
        indexes, pairs, draws, k, names, options, on_error=on_error,
        progress=_stage(progress, "random sets"),
    )
    rows = []
    for score_name, scores in by_score.items():
        rows += _score_rows(
            indexes, pairs, scores, score_name, random_values, size=size, k=k, names=names,
            options=options, counts=counts, n_random=n_random, seed=seed, on_error=on_error,
            progress=progress,
        )
    table = pd.DataFrame(rows)
    return cknna_table(table) if metrics is None else table


def _stage(
    progress: Callable[[str, int, int], None] | None, stage: str
) -> Callable[[int, int], None] | None:
    """``progress`` with its stage name bound (None stays None)."""
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _score_rows(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    scores: np.ndarray,
    score: str,
    random_values: Mapping[str, np.ndarray],
    *,
    size: int,
    k: int,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    counts: Mapping[str, int],
    n_random: int,
    seed: int,
    on_error: OnError,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """The long table's rows of one dispersion score (see :func:`dispersion_set_alignment`)."""
    low = select_stimuli(scores, "low", size)
    high = select_stimuli(scores, "high", size)
    values = set_metric_values(
        indexes, pairs, np.stack([low, high]), k, names, options, on_error=on_error,
        progress=_stage(progress, f"low and high sets ({score})"),
    )
    nulls = _shuffle_nulls(
        indexes, pairs, low, high, k, names, options, counts, seed, on_error=on_error,
        progress=_stage(progress, f"label shuffles ({score})"),
    )
    # across pairs: the mean over pairs of low − high against the same mean on each label
    # shuffle, every pair on the same shuffles, so the pairs' dependence (shared models, the same
    # stimuli) is in the null as in the observed mean (paired_set_tests)
    across: dict[str, tuple[float, float]] = {}
    for name in names:
        if name in nulls:
            observed = float(np.mean(values[name][:, 0] - values[name][:, 1]))
            across[name] = permutation_p_values(observed, nulls[name].mean(axis=0))
        else:
            across[name] = (float("nan"), float("nan"))
    rows = []
    for name in names:
        for p, pair in enumerate(pairs):
            low_value, high_value = float(values[name][p, 0]), float(values[name][p, 1])
            random_row = random_values[name][p]
            lower, upper = percentile_interval(random_row, 0.95)
            if name in nulls:
                two_sided, greater = permutation_p_values(low_value - high_value, nulls[name][p])
            else:
                two_sided = greater = float("nan")
            rows.append(
                {
                    **pair._asdict(),
                    "score": score,
                    "metric": name,
                    "set_size": int(size),
                    "k": int(k),
                    "low_dispersion": low_value,
                    "random_mean": float(random_row.mean()),
                    "random_lower_95": lower,
                    "random_upper_95": upper,
                    "high_dispersion": high_value,
                    "low_minus_high": low_value - high_value,
                    "low_high_ratio": low_value / high_value if high_value > 0 else float("nan"),
                    "permutation_p_value_two_sided": two_sided,
                    "permutation_p_value_low_greater": greater,
                    "mean_over_pairs_p_value_two_sided": across[name][0],
                    "mean_over_pairs_p_value_low_greater": across[name][1],
                    "n_random": int(n_random),
                    "n_permutations": counts[name],
                    "seed": int(seed),
                }
            )
    return rows


def _shuffle_nulls(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    low: np.ndarray,
    high: np.ndarray,
    k: int,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    counts: Mapping[str, int],
    seed: int,
    *,
    on_error: OnError,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``{metric: (len(pairs), counts[metric]) float64}``: metric(low') − metric(high') of every
    pair on each of the first ``counts[metric]`` label shuffles of ``low`` and ``high`` (the
    stream :func:`shuffle_rng`; metrics with a count of 0 left out).

    The shuffles are drawn and measured :data:`SHUFFLE_BLOCK` at a time
    (``stats.label_shuffle_blocks``: the same shuffles, in the same order, as drawing them all),
    each block once for every metric that still needs it, so memory is O(block · size) however
    many shuffles there are (1,000 of them at 100,000 stimuli were 0.8 GB in index arrays
    alone). ``progress(done, total)`` counts a metric group's sets (total = 2 · its count) across
    the blocks, as one call on all of them would (feature metrics measured set by set only).
    """
    groups = {
        count: [name for name in names if counts[name] == count]
        for count in sorted(set(counts.values()) - {0})
    }
    nulls = {
        name: np.empty((len(pairs), count)) for count, group in groups.items() for name in group
    }
    if not groups:
        return nulls
    done = 0
    for first, second in label_shuffle_blocks(
        low, high, max(groups), shuffle_rng(seed), block=SHUFFLE_BLOCK
    ):
        for count, group in groups.items():
            b = min(count - done, first.shape[0])
            if b <= 0:
                continue
            shuffled = set_metric_values(
                indexes, pairs, np.concatenate([first[:b], second[:b]]), k, group,
                {name: options[name] for name in group}, on_error=on_error,
                progress=_shifted(progress, 2 * done, 2 * count),
            )
            for name in group:
                nulls[name][:, done : done + b] = shuffled[name][:, :b] - shuffled[name][:, b:]
        done += first.shape[0]
    return nulls


def _shifted(
    progress: Callable[[int, int], None] | None, offset: int, total: int
) -> Callable[[int, int], None] | None:
    """``progress`` of a part of the work: (offset + done in the part, total) (None stays None)."""
    if progress is None:
        return None
    return lambda done, _: progress(offset + done, total)


#: The long table's value columns and their names in the classic CKNNA table.
_CKNNA_COLUMNS = {
    "low_dispersion": "cknna_low_dispersion",
    "random_mean": "cknna_random_mean",
    "random_lower_95": "cknna_random_lower_95",
    "random_upper_95": "cknna_random_upper_95",
    "high_dispersion": "cknna_high_dispersion",
}


def cknna_table(table: pd.DataFrame) -> pd.DataFrame:
    """The classic Fig. 2 CKNNA table from the CKNNA rows of a long
    :func:`dispersion_set_alignment` table (``metric`` column dropped, ``cknna_`` columns)."""
    rows = table[table["metric"] == "cknna"]
    if rows.empty:
        raise ValueError(
            "the table has no cknna rows; compute it with metrics that include 'cknna'"
        )
    return rows.drop(columns="metric").rename(columns=_CKNNA_COLUMNS).reset_index(drop=True)


def effect_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per score × metric of a long :func:`dispersion_set_alignment` table: how often the effect
    holds.

    Columns: ``score``, ``metric``, ``n_pairs``, ``n_low_random_high`` (low > random mean > high),
    ``n_low_above_high``, ``n_significant`` (low > high with two-sided permutation p < 0.05; NaN
    p-values never count), ``mean_low_dispersion``, ``mean_random_mean``,
    ``mean_high_dispersion``, ``mean_low_minus_high`` (means over the pairs), ``n_permutations``.
    """
    rows = []
    for (score, name), group in table.groupby(["score", "metric"], sort=False):
        low = group["low_dispersion"].to_numpy()
        random_mean = group["random_mean"].to_numpy()
        high = group["high_dispersion"].to_numpy()
        above = low > high
        rows.append(
            {
                "score": score,
                "metric": name,
                "n_pairs": len(group),
                "n_low_random_high": int(
                    np.count_nonzero((low > random_mean) & (random_mean > high))
                ),
                "n_low_above_high": int(np.count_nonzero(above)),
                "n_significant": int(
                    np.count_nonzero(above & (group["permutation_p_value_two_sided"] < 0.05))
                ),
                "mean_low_dispersion": float(np.mean(low)),
                "mean_random_mean": float(np.mean(random_mean)),
                "mean_high_dispersion": float(np.mean(high)),
                "mean_low_minus_high": float(np.mean(low - high)),
                "n_permutations": int(group["n_permutations"].iloc[0]),
            }
        )
    return pd.DataFrame(rows)


#: What each test of :func:`paired_set_tests` takes as its independent unit, in words.
PAIRED_TEST_NOTES = {
    "wilcoxon_signed_rank": (
        "takes the pairs as independent; they are not (pairs share vision or language models and "
        "all use the same stimuli), so this p-value is too small when their differences go "
        "together: read it as a description, the permutation test's p as the test"
    ),
    "paired_t": (
        "takes the pairs as independent; they are not (pairs share vision or language models and "
        "all use the same stimuli), so this p-value is too small when their differences go "
        "together: read it as a description, the permutation test's p as the test"
    ),
    "permutation_mean_over_pairs": (
        "mean over the pairs of low − high against the same mean with the low/high labels of the "
        "stimuli shuffled, the same shuffles for every pair: the pairs' dependence is in the "
        "null; about these models (the unit is the stimulus), not about other models"
    ),
}


def paired_set_tests(table: pd.DataFrame) -> pd.DataFrame:
    """Across pairs, tests of CKNNA(low) vs CKNNA(high): Wilcoxon signed-rank, paired t and,
    where the table has it, the label-shuffle test of the mean over pairs.

    ``table`` is a :func:`dispersion_set_alignment` result (one score). Returns one row per test:
    ``test``, ``statistic``, ``p_value`` (two-sided), ``n_pairs``, ``mean_difference`` (low -
    high), ``note`` (:data:`PAIRED_TEST_NOTES`: what the test takes as independent).

    The Wilcoxon and t tests take the pairs as independent replicates, which they are not: the
    pairs of a run share vision and language models (3 vision × 2 language models: 6 pairs of 5
    models) and are measured on the same stimuli, so their differences go together and these
    p-values come out too small. No test over models fits so few of them (with 2 language
    models, about one degree of freedom is left for what a language model adds).
    ``permutation_mean_over_pairs`` (statistic: the mean difference) tests what the data can: its
    null is the mean over the pairs of low − high on each of the per-pair test's label shuffles,
    every pair on the same shuffles, so whatever the pairs share is in the null as in the
    observed mean; its p-value (the table's ``mean_over_pairs_p_value_two_sided``; NaN where a
    pair's value is) is about these models and generalises over stimuli.
    """
    tests = paired_difference_tests(
        table["cknna_low_dispersion"].to_numpy(), table["cknna_high_dispersion"].to_numpy()
    )
    column = "mean_over_pairs_p_value_two_sided"
    if column in table.columns and len(table):
        shared = table[column].to_numpy(dtype=np.float64)
        same = np.all(shared == shared[0]) or np.isnan(shared).all()
        tests = pd.concat([tests, pd.DataFrame([{
            "test": "permutation_mean_over_pairs",
            "statistic": float(tests["mean_difference"].iloc[0]),
            "p_value": float(shared[0]) if same else float("nan"),
            "n_pairs": int(tests["n_pairs"].iloc[0]),
            "mean_difference": float(tests["mean_difference"].iloc[0]),
        }])], ignore_index=True)
    return tests.assign(note=tests["test"].map(PAIRED_TEST_NOTES))


def cknna_shown(set_size: int) -> bool:
    """Whether CKNNA numbers of sets of ``set_size`` stimuli are shown: at least
    ``validation.MIN_CKNNA_SET_SIZE`` (below, too noisy to read; values above 1 are common). The
    one rule of the report (its table, Fig. 2 and S1 bars, every verdict that counts CKNNA) and
    the dashboard (the Alignment lab's numbers, Paper analyses' Fig. 2); the CSV and JSON tables
    keep every value."""
    return set_size >= MIN_CKNNA_SET_SIZE


def without_cknna(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of a Fig. 2 / summary table with its CKNNA numbers (the ``cknna_`` columns and the
    low/high ratio) as NaN: what text and figures are given where :func:`cknna_shown` hides
    them."""
    table = table.copy()
    for column in table.columns:
        if str(column).startswith("cknna_") or column == "low_high_ratio":
            table[column] = float("nan")
    return table


def withheld_cknna_verdict(size: int, fix: str) -> str:
    """What a verdict says in place of counts of CKNNA on sets of ``size`` stimuli that
    :func:`cknna_shown` hides; ``fix`` the cure in the caller's words ("use --size 24 or
    more")."""
    return (
        f"no verdict: sets of {size} < {MIN_CKNNA_SET_SIZE} stimuli have no CKNNA numbers "
        f"({fix})"
    )


def set_effect_verdict(table: pd.DataFrame, sides: str, size: int, fix: str) -> str:
    """:func:`effect_verdict` of a Fig. 2 table on sets of ``size`` stimuli, or where
    :func:`cknna_shown` hides their CKNNA, the sentence with no count in its place
    (:func:`withheld_cknna_verdict`, ``fix`` its cure)."""
    if cknna_shown(size):
        return effect_verdict(table, sides)
    scores = ", ".join(sorted(set(map(str, table["score"]))))
    return (
        f"low > random > high ({scores} dispersion, {size} stimuli per set) for the {len(table)} "
        f"{sides} pairs: {withheld_cknna_verdict(size, fix)}."
    )


def cknna_bars_note(size: int, fix: str) -> str:
    """Fig. 2's sentence in place of its bars on sets of ``size`` stimuli that
    :func:`cknna_shown` hides (``figures.dispersion_sets_figure(hidden=...)``); ``fix`` names the
    set size to use ("--size 24")."""
    return (
        f"No CKNNA bars: sets of {size} stimuli are fewer than {MIN_CKNNA_SET_SIZE}, too few "
        f"for a CKNNA worth reading. Use {fix} or more."
    )


def shown_set_table(
    table: pd.DataFrame, size: int, fix: str
) -> tuple[pd.DataFrame, str | None]:
    """What Fig. 2's picture of ``table`` (sets of ``size`` stimuli) is given: the table and
    None, or where :func:`cknna_shown` hides their CKNNA, the table without it
    (:func:`without_cknna`) and the sentence said in place of the bars (:func:`cknna_bars_note`,
    ``fix`` the set size to use in the caller's words). The report and Paper analyses alike."""
    if cknna_shown(size):
        return table, None
    return without_cknna(table), cknna_bars_note(size, fix)


def effect_verdict(table: pd.DataFrame, sides: str = "vision × language") -> str:
    """One sentence, computed from a :func:`dispersion_set_alignment` table, on the paper's effect.

    Counts the pairs where low > random mean > high, those where low > high, and among those the
    ones whose two-sided permutation p-value is below 0.05. ``sides`` names the pairs.
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
        f"holds for {ordered} of {n_pairs} {sides} pairs; low > high for "
        f"{int(np.count_nonzero(low_above_high))} of {n_pairs} ({significant} with permutation "
        "p < 0.05)."
    )


# ----------------------------------------------------------------------------------------------
# any registry metric on many sets


def check_metric_names(metrics: Sequence[str] | str) -> list[str]:
    """Registry names (order kept, repeats dropped); ValueError naming the known ones otherwise."""
    names = list(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    if not names:
        raise ValueError(f"pass at least one metric; known metrics: {registry.metric_names()}")
    for name in names:
        registry.metric(name)
    return names


def _metric_options(
    names: Sequence[str], metric_options: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Options per feature metric; neighbour metrics take none here (k is the engine's)."""
    given = dict(metric_options or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"metric_options names metrics not asked for: {unknown}; ask for them too")
    options: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = registry.metric(name)
        chosen = dict(given.get(name, {}))
        if entry.neighbour_metric and chosen:
            where_k = (
                "; its k is the analysis's own k argument: pass k there" if "k" in chosen else ""
            )
            raise ValueError(
                f"{name} is computed from the neighbour lists, which take no metric_options "
                f"(got {sorted(chosen)}){where_k}; leave {name} out of metric_options"
            )
        registry.check_options(name, chosen)
        options[name] = chosen
    return options


def set_metric_values(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    sets: np.ndarray,
    k: int,
    metrics: Sequence[str],
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    on_error: OnError = "raise",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every metric of every pair on every set: ``{metric: (len(pairs), B) float64}``.

    Args:
        indexes: ``{(model, layer): NeighbourIndex}`` (:func:`indexes_for`).
        pairs: the comparisons (:class:`Pair`, or ``(model, layer, model, layer)`` tuples).
        sets: (B, s) or (s,) stimulus rows, each row distinct (s >= 4, k < s).
        k: neighbours of the neighbour metrics.
        metrics: registry names (``metrics.metric_names()``).
        metric_options: options per feature metric, e.g. ``{"svcca": {"cca_dim": 10}}``.
        on_error: ``"raise"``, or ``"nan"``: a feature metric undefined on a set (ValueError,
            e.g. SVCCA on features of lower rank than ``cca_dim``) gives NaN there.
        progress: ``progress(done, B)`` after each set of the feature metrics measured set by
            set (the slow part on large sets; the other routes take all sets at once).

    All of it is ``subset_metrics.metric_values`` (the one engine behind the Alignment lab and the
    calibration too): neighbour metrics from the stored neighbour lists (all sets at once, exact),
    the CKA family on a run of at most ``subset_metrics.DENSE_GRAM_STIMULI`` stimuli from each
    model's (n, n) kernel (every set's sub-kernels at once), the other feature metrics set by set
    from each set's prepared features, a model's side once per set for all its pairs.
    """
    pairs = [Pair(*pair) for pair in pairs]
    if not pairs:
        raise ValueError("pairs is empty; pass at least one Pair (vision model, layer, language "
                         "model, layer)")
    names = check_metric_names(metrics)
    options = _metric_options(names, metric_options)
    n = indexes[pairs[0].sides[0]].n
    sets = check_subsets(sets, n, k, min_k=2)
    return metric_values(
        indexes, [pair.sides for pair in pairs], sets, names, k=k, options=options,
        on_error=on_error, progress=progress,
    )


# ----------------------------------------------------------------------------------------------
# calibrated scores and matched baselines


def shuffled_pairing_calibration(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    sets: Mapping[str, np.ndarray],
    k: int,
    metrics: Sequence[str],
    *,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    n_shuffles: int = 200,
    seed: int = 0,
    level: float = 0.95,
    on_error: OnError = "raise",
    progress: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """Each score on each named set beside the same score with the pairing shuffled in the set.

    The null keeps both modalities' sets (their size, density and categories) and destroys only
    which caption goes with which image: ``calibration.shuffled_pairing_rows``, the same
    ``n_shuffles`` shuffles (from ``seed``) for every pair and metric of a set. Neighbour metrics
    permute the language side's within-set neighbour table (``metrics.permute_table``: exact up
    to tie order), feature metrics are measured on the shuffled rows: the set's sub-kernels with
    the Y side's reordered (the CKA family of a run small enough for its (n, n) kernels), else
    each model's side of the set once, reordered per shuffle once for every metric sharing it
    (``subset_metrics.metric_values`` with ``paired_with``: every pair and metric of a set in one
    call).

    Returns one row per set × metric × pair: ``set``, the pair's columns, ``metric``,
    ``set_size``, ``k``, ``observed``, ``null_mean``, ``null_lower`` / ``null_upper`` (central
    ``level`` interval), ``calibrated`` (observed − null mean), ``z`` (calibrated / null sd),
    ``p_value_shuffled`` (P(null ≥ observed), +1 correction; NaN where a value is NaN,
    ``on_error="nan"``), ``n_shuffles``, ``seed``. ``progress(set name, done, total)`` counts
    a set's pairings (its ``n_shuffles`` shuffles and the observed one): after each pairing of
    the feature metrics measured pairing by pairing (large runs), and once when the set is
    done.
    """
    pairs = [Pair(*pair) for pair in pairs]
    names = check_metric_names(metrics)
    options = _metric_options(names, metric_options)
    level = check_level(level)  # before the first set's work
    keys = list(dict.fromkeys(side for pair in pairs for side in pair.sides))
    n = indexes[keys[0]].n
    rows = []
    for set_name, members in sets.items():
        members = check_subsets(members, n, k, min_k=2)[0]
        rows_x, rows_y = shuffled_pairing_rows(members, n=n, n_shuffles=n_shuffles, seed=seed)
        told = [-1, 0]

        def tell(done: int, total: int, set_name=set_name, told=told) -> None:
            told[:] = [done, total]
            if progress is not None:
                progress(set_name, done, total)

        # every pair and metric of the set on the same pairings, in one call
        values = metric_values(
            indexes, [pair.sides for pair in pairs], rows_x, names, paired_with=rows_y, k=k,
            options=options, on_error=on_error, progress=tell,
        )
        if told[0] != told[1]:  # no pairing-by-pairing route: the set is done in one piece
            tell(rows_x.shape[0], rows_x.shape[0])
        for name in names:
            for p, pair in enumerate(pairs):
                result = calibrated_score(values[name][p], level)
                rows.append(
                    {
                        "set": set_name,
                        **pair._asdict(),
                        "metric": name,
                        "set_size": int(members.size),
                        "k": int(k),
                        "observed": result.observed,
                        "null_mean": result.null_mean,
                        "null_lower": result.null_lower,
                        "null_upper": result.null_upper,
                        "calibrated": result.calibrated,
                        "z": result.z,
                        "p_value_shuffled": result.p_value,  # NaN where a value is not one
                        "n_shuffles": int(result.n_shuffles),
                        "seed": int(seed),
                    }
                )
    return pd.DataFrame(rows)


def typicality_k(run: Run, k: int) -> int:
    """The k at which matched baselines measure typicality (the report and the Alignment lab
    alike): the analysis k, at most the length of the GPA models' stored neighbour lists. Beyond
    it each stimulus's neighbours would be searched over the whole run (O(n²): 8.8 s at n = 6,000
    and k = 1,500, against 0.01 s from the lists)."""
    stored = [
        index.k_max for index in (run.neighbours(m, layer) for m, layer in vision_layers(run))
        if index.lists is not None
    ]
    return int(min([int(k), *stored]))


def vision_typicality(run: Run, *, k: int = 10) -> np.ndarray:
    """(n,) each stimulus's typicality in the vision models: its mean similarity to its k nearest
    stimuli (``calibration.local_density``, from the stored neighbour lists at the GPA layers),
    z-scored per model and averaged (``calibration.typicality``). High: a dense, typical region."""
    densities = []
    for model, layer in vision_layers(run):
        index = run.neighbours(model, layer)
        if index.lists is not None and index.k_max >= k:
            values = np.asarray(index.lists.values[:, :k], dtype=np.float64)
        else:
            values = exact_top_k(index.features, k)[1]
        densities.append(local_density(values, k))
    return typicality(densities)


#: Named sets in the order their matched random sets take the children of the analysis seed
#: (:func:`matched_set_seed`): the report's low and high sets and the Alignment lab's sets of the
#: same name are matched with the same draws
MATCHED_SET_ORDER = ("low", "high", "random", "selection", "pasted")


def matched_set_seed(seed: int, name: str) -> int:
    """The seed of the matched random sets of the set called ``name`` under the analysis ``seed``:
    child i of ``SeedSequence(seed)`` for the i-th name of :data:`MATCHED_SET_ORDER` (another
    name: a child numbered from a checksum of the name), so that the report
    (:func:`matched_baselines`) and the Alignment lab draw the same matched sets for a set."""
    if name in MATCHED_SET_ORDER:
        child = MATCHED_SET_ORDER.index(name)
    else:
        child = len(MATCHED_SET_ORDER) + zlib.crc32(name.encode("utf-8"))
    sequence = np.random.SeedSequence(int(seed), spawn_key=(child,))
    return int(sequence.generate_state(1)[0])


def matched_method_words(matched_on: str, drawn: Mapping[str, MatchedSets]) -> str:
    """``matched_on`` (what the sets are matched on, in words) as it is when every named set's
    matched sets (``drawn``: set name to ``calibration.matched_sets_by_cost``' result) were
    drawn by nearest matching and kept apart, else with the method after a comma:
    ``"typicality, by 25 typicality strata (...)"`` when one method drew them all, else each
    set's (``"typicality, the low set's by ...; the high set's by ..."``)."""
    if all(result.nearest and result.kept_apart for result in drawn.values()):
        return matched_on
    methods = [result.method for result in drawn.values()]
    if len(set(methods)) == 1:
        return f"{matched_on}, by {methods[0]}"
    return matched_on + ", " + "; ".join(
        f"the {name} set's by {result.method}" for name, result in drawn.items()
    )


def matched_baselines(
    indexes: Mapping[LayerKey, NeighbourIndex],
    pairs: Sequence[Pair],
    low: np.ndarray,
    high: np.ndarray,
    k: int,
    metrics: Sequence[str],
    *,
    covariate: np.ndarray,
    labels: np.ndarray | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    n_sets: int = 200,
    n_candidates: int = 5,
    seed: int = 0,
    level: float = 0.95,
    on_error: OnError = "raise",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The low and high sets against random sets matched to each on ``covariate`` (and labels).

    ``n_sets`` pairs of random sets with the two sets' covariate profiles, drawn from every
    stimulus, the b-th high match disjoint from the b-th low match as the two sets are (the
    pairs of ``calibration.matched_set_pairs``), by ``calibration.matched_sets_by_cost`` with
    the seeds of :func:`matched_set_seed`, as the Alignment lab draws them: nearest-covariate
    matching within label while its picks (set size × ``n_sets``) fit
    ``calibration.NEAREST_MATCHING_PICKS``, else covariate strata × label (25 bins, else 5),
    the high matches let into the low matches only where a label cannot spare them;
    ``matched_on`` says which method where it is not nearest matching. The question: is the
    observed gap metric(low) − metric(high) larger than the gap between sets that only share
    their covariate (and category) profile? Its p-value is P(matched gap ≥
    observed gap) over the pairs (+1 correction); ``survives`` = gap > 0 and p < 0.05, and each
    set's matched sets free enough for a verdict (``calibration.baseline_freedom``: at least 20
    distinct sets; with too few stimuli outside a set its matched sets are the same few sets drawn
    again and again, and any gap above theirs would "survive").

    Returns ``(table, balance)``. ``table``: one row per metric × pair with the pair's columns,
    ``metric``, ``set_size``, ``observed_low``, ``matched_low_mean`` / ``_lower`` / ``_upper``,
    ``p_value_low_above_matched`` (P(matched ≥ low)), ``observed_high``, ``matched_high_mean`` /
    ``_lower`` / ``_upper``, ``p_value_high_below_matched`` (P(matched ≤ high)),
    ``low_minus_high``, ``matched_gap_mean`` / ``_lower`` / ``_upper``, ``p_value_gap``,
    ``share_of_gap_matched`` (matched gap mean / observed gap), ``survives``, ``n_sets``,
    ``matched_on`` (p-values NaN where a value is NaN, ``on_error="nan"``): ``"typicality"``, or
    ``"typicality and category"`` with labels, and where the sets were not drawn by nearest
    matching kept apart, the method after a comma (``"typicality, by 25 typicality strata
    (nearest matching: ... picks, above its budget of ...)"``, or each set's: ``"typicality, the
    low set's by ...; the high set's by ..."``; :func:`matched_method_words`). ``balance``: per
    set (low, high): ``set``, ``chosen_covariate_mean``,
    ``matched_covariate_mean``, ``standardised_difference`` ((matched − chosen) / covariate sd over
    all stimuli), ``mean_overlap`` (share of a matched set inside the chosen set),
    ``distinct_matched_sets`` (distinct sets among the ``n_sets`` drawn), ``matched_overlap``
    (share of a matched set's stimuli another matched set also holds, mean over pairs of draws),
    ``verdict_possible`` (``distinct_matched_sets`` at least
    ``calibration.distinct_sets_needed()``), ``matched_on``.
    """
    pairs = [Pair(*pair) for pair in pairs]
    names = check_metric_names(metrics)
    covariate = np.asarray(covariate, dtype=np.float64)
    if np.intersect1d(low, high).size:
        raise ValueError(
            "the low and high sets share stimuli; matched pairs are for disjoint sets: choose a "
            "set size of at most half the run"
        )
    drawn_low = matched_sets_by_cost(
        low, covariate, labels, n_sets=n_sets, seed=matched_set_seed(seed, "low"),
        n_candidates=n_candidates, covariate_name="typicality",
    )
    drawn_high = matched_sets_by_cost(  # the b-th high match avoids the b-th low match
        high, covariate, labels, n_sets=n_sets, seed=matched_set_seed(seed, "high"),
        avoid=drawn_low.sets, n_candidates=n_candidates, covariate_name="typicality",
        avoided="the low set's",
    )
    matched = {"low": drawn_low.sets, "high": drawn_high.sets}
    B = matched["low"].shape[0]
    freedom = {name: baseline_freedom(drawn) for name, drawn in matched.items()}
    free = all(f.enough for f in freedom.values())  # else no verdict: too few distinct sets
    sets = np.concatenate(
        [np.sort(low)[None], np.sort(high)[None], matched["low"], matched["high"]]
    )
    values = set_metric_values(  # progress(done, B) after each set of the feature metrics
        indexes, pairs, sets, k, names, metric_options, on_error=on_error, progress=progress
    )
    matched_on = matched_method_words(
        "typicality" if labels is None else "typicality and category",
        {"low": drawn_low, "high": drawn_high},
    )
    rows = []
    for name in names:
        for p, pair in enumerate(pairs):
            low_value, high_value = float(values[name][p, 0]), float(values[name][p, 1])
            low_null = values[name][p, 2 : 2 + B]
            high_null = values[name][p, 2 + B :]
            gap, gaps = low_value - high_value, low_null - high_null
            p_gap = permutation_p_values(gap, gaps)[1]
            gap_mean = float(gaps.mean())
            rows.append(
                {
                    **pair._asdict(),
                    "metric": name,
                    "set_size": int(np.size(low)),
                    "observed_low": low_value,
                    "matched_low_mean": float(low_null.mean()),
                    "matched_low_lower": percentile_interval(low_null, level)[0],
                    "matched_low_upper": percentile_interval(low_null, level)[1],
                    "p_value_low_above_matched": permutation_p_values(low_value, low_null)[1],
                    "observed_high": high_value,
                    "matched_high_mean": float(high_null.mean()),
                    "matched_high_lower": percentile_interval(high_null, level)[0],
                    "matched_high_upper": percentile_interval(high_null, level)[1],
                    "p_value_high_below_matched": permutation_p_values(-high_value, -high_null)[1],
                    "low_minus_high": gap,
                    "matched_gap_mean": gap_mean,
                    "matched_gap_lower": percentile_interval(gaps, level)[0],
                    "matched_gap_upper": percentile_interval(gaps, level)[1],
                    "p_value_gap": p_gap,
                    "share_of_gap_matched": gap_mean / gap if gap != 0 else float("nan"),
                    "survives": bool(free and gap > 0 and p_gap < 0.05),
                    "n_sets": int(B),
                    "matched_on": matched_on,
                }
            )
    spread = float(covariate.std()) or 1.0
    balance = []
    for set_name, chosen in (("low", low), ("high", high)):
        chosen = np.asarray(chosen)
        drawn = matched[set_name]
        balance.append(
            {
                "set": set_name,
                "chosen_covariate_mean": float(covariate[chosen].mean()),
                "matched_covariate_mean": float(covariate[drawn].mean()),
                "standardised_difference": float(
                    (covariate[drawn].mean() - covariate[chosen].mean()) / spread
                ),
                "mean_overlap": float(np.isin(drawn, chosen).mean()),
                "distinct_matched_sets": freedom[set_name].n_distinct,
                "matched_overlap": freedom[set_name].mean_overlap,
                "verdict_possible": freedom[set_name].enough,
                "matched_on": matched_on,
            }
        )
    return pd.DataFrame(rows), pd.DataFrame(balance)


# ----------------------------------------------------------------------------------------------
# Fig. S1: drop the q highest / lowest dispersion stimuli


def drop_fraction_alignment(
    run: Run,
    *,
    q: float = 0.25,
    k: int = 10,
    score: DispersionScore = "mean",
    best_layers: pd.DataFrame | None = None,
    pairs: Sequence[Pair] | None = None,
) -> pd.DataFrame:
    """Fig. S1: CKNNA per pair on the full set, without the q highest and without the q lowest.

    Returns one row per pair × condition (``full``, ``drop_high``, ``drop_low``) with columns
    ``vision_model``, ``vision_layer``, ``language_model``, ``language_layer``, ``condition``,
    ``fraction_dropped``, ``score``, ``n_stimuli`` (stimuli kept), ``k``, ``cknna``. ``pairs``:
    other pairs than vision × language at the best layers (e.g. :func:`partner_pairs`).
    """
    vision_layers(run)
    if not 0.0 < q < 1.0:
        raise ValueError(
            f"q is the fraction of stimuli to drop and must lie in (0, 1), got {q}; use e.g. 0.25"
        )
    n = _n_stimuli(run)
    scores = _dispersion_scores(run, score)
    pairs = _pairs_with_best_layers(run, k, best_layers) if pairs is None else list(pairs)
    if not pairs:
        raise ValueError("no pairs to align; pass at least one Pair")
    conditions = {
        "full": np.arange(n),
        "drop_high": np.asarray(drop_fraction(scores, q, "high"), dtype=np.intp),
        "drop_low": np.asarray(drop_fraction(scores, q, "low"), dtype=np.intp),
    }
    for name, kept in conditions.items():
        check_k(k, kept.shape[0], 2, what=f"the {name} set")
    indexes = indexes_for(run, pairs)
    values = {
        name: _alignment(indexes, pairs, kept[None, :], k).cknna[:, 0]
        for name, kept in conditions.items()
    }
    rows = []
    for p, pair in enumerate(pairs):
        for name, kept in conditions.items():
            rows.append(
                {
                    **pair._asdict(),
                    "condition": name,
                    "fraction_dropped": 0.0 if name == "full" else float(q),
                    "score": score,
                    "n_stimuli": int(kept.shape[0]),
                    "k": int(k),
                    "cknna": float(values[name][p]),
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Fig. S2: leave one vision model out


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
    source, target = row_space_coordinates(prepared), row_space_coordinates(consensus)
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
            "leave-one-model-out needs at least 3 GPA models (GPA on the others needs 2), the "
            f"run has {len(pairs)}: precompute the run with more vision models (or more models "
            "in --gpa-models)"
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
