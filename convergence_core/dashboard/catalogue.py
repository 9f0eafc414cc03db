"""Per-run lookups every page needs, computed once per run and shared by all sessions (no
Streamlit).

A page rerun must not redo O(n) Python work that another rerun (or another session) has already
done: at 100,000 stimuli, turning the id column into strings, building an id → row dictionary or
lower-casing every caption takes 0.1–1 s each. :func:`build_catalogue` does all of it once per run
(``data.catalogue`` caches it with ``st.cache_resource``); its arrays are read-only.

Shapes: ``n`` stimuli, ``M`` vision models in the GPA.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..dispersion import SCORES
from ..retrieval import direction_label
from ..run import Run
from ..stats import spearman_rho


@dataclass(frozen=True)
class Catalogue:
    """Lookups of one run (read-only; shared by every browser session).

    Attributes:
        ids: (n,) object array of stimulus ids (str), run order.
        position: ``{id: row}``.
        first_captions: (n,) object array: each stimulus's first caption ("" if none).
        search_text: (n,) pandas Series of str: the id and every caption, lower case, one per
            line (what the caption filter searches).
        order: ``{score: (n,) rows from the lowest to the highest dispersion}`` (ties by row).
        rank: ``{score: (n,) 0-based rank of each row}`` (0 = lowest dispersion).
        values: ``{score: (n,) float64 dispersion}``.
        residual_median: (M,) median residual of each vision model over all stimuli.
        pearson, spearman: correlation of the two scores (Spearman: Pearson of the average
            ranks, ties sharing theirs).
    """

    ids: np.ndarray
    position: Mapping[str, int]
    first_captions: np.ndarray
    search_text: pd.Series
    order: Mapping[str, np.ndarray]
    rank: Mapping[str, np.ndarray]
    values: Mapping[str, np.ndarray]
    residual_median: np.ndarray
    pearson: float
    spearman: float

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Rows of ``ids`` in the run (given order) and the ids the run does not have:
        ``(rows (found,) int64, unknown)`` (:func:`rows_of_ids`)."""
        return rows_of_ids(ids, self.position)

    def matching(self, query: str) -> np.ndarray:
        """(n,) bool: stimuli whose id or any caption contains ``query`` (case-insensitive,
        literal text, not a pattern). An empty query matches everything. The array is the
        caller's own (pandas may hand out a read-only view, and the Stimuli page narrows it to a
        selection in place)."""
        needle = query.strip().lower()
        if not needle:
            return np.ones(self.n, dtype=bool)
        return np.array(self.search_text.str.contains(needle, regex=False), dtype=bool)


def rows_of_ids(ids: Sequence[str], position: Mapping[str, int]) -> tuple[np.ndarray, list[str]]:
    """Rows of ``ids`` (in the given order) under ``position`` (``{id: row}``) and the ids it does
    not have: ``(rows (found,) int64, unknown)``. The one place a list of ids (a selection, an
    import, pasted ids) becomes rows."""
    rows = [position[i] for i in ids if i in position]
    unknown = [i for i in ids if i not in position]
    return np.asarray(rows, dtype=np.int64), unknown


def gallery_ends(values: object, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows a gallery shows at each end of a ranking: the ``count`` lowest and the ``count``
    highest finite ``values`` (n,), each from its end inward (lowest first, highest first).

    Missing (NaN) values are left out. Both ends come from one stable ascending order: among equal
    values the lower row is nearer the low end. The two overlap when fewer than ``2 * count``
    values are finite. Returns two int64 arrays of up to ``count`` rows."""
    numbers = np.asarray(values, dtype=np.float64)
    present = np.flatnonzero(np.isfinite(numbers))
    order = present[np.argsort(numbers[present], kind="stable")].astype(np.int64)
    return order[:count], order[::-1][:count]


def gallery_page_count(n_ranked: int, per_side: int) -> int:
    """Pages of a two-sided gallery of ``n_ranked`` stimuli, ``per_side`` from each end per page
    (:func:`gallery_page`); at least 1."""
    return max(1, -(-n_ranked // (2 * per_side)))


def gallery_page(
    ranked: np.ndarray, page: int, per_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of page ``page`` (1-based) of a two-sided gallery over ``ranked`` (m,), a ranking
    from the low end to the high end: the low side walks the first ⌈m/2⌉ rows from the low end
    inward, the high side the other ⌊m/2⌋ from the high end inward, ``per_side`` per page. The
    two sides meet in the middle on the last page, so every row is shown once, under its own
    end's heading, over :func:`gallery_page_count` pages."""
    ranked = np.asarray(ranked)
    middle = -(-len(ranked) // 2)
    start = (page - 1) * per_side
    low_half, high_half = ranked[:middle], ranked[middle:][::-1]
    return low_half[start : start + per_side], high_half[start : start + per_side]


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    array.flags.writeable = False
    return array


def build_catalogue(run: Run) -> Catalogue:
    """The :class:`Catalogue` of ``run`` (O(n) work, once per run)."""
    stimuli, dispersion = run.stimuli, run.dispersion
    ids = stimuli["id"].astype(str).to_numpy(dtype=object)
    captions = stimuli["captions"] if "captions" in stimuli else pd.Series([[]] * len(stimuli))
    first = np.array([c[0] if len(c) else "" for c in captions], dtype=object)
    search = pd.Series(
        [
            "\n".join([identifier, *map(str, caps)]).lower()
            for identifier, caps in zip(ids, captions, strict=True)
        ],
        dtype=object,
    )
    order, rank, values = {}, {}, {}
    for score in SCORES:
        rank[score] = _read_only(dispersion[f"rank_{score}"].to_numpy(dtype=np.int64))
        order[score] = _read_only(np.argsort(rank[score], kind="stable"))
        values[score] = _read_only(dispersion[score].to_numpy(dtype=np.float64))
    residuals = np.asarray(run.gpa.residuals, dtype=np.float64)
    pearson = float(np.corrcoef(values["mean"], values["pc1"])[0, 1])
    # from average ranks: the run's stored ranks break ties by position, which would make the
    # correlation depend on the stimuli's order where scores tie
    spearman = spearman_rho(values["mean"], values["pc1"])
    return Catalogue(
        ids=_read_only(ids),
        position={identifier: row for row, identifier in enumerate(ids)},
        first_captions=_read_only(first),
        search_text=search,
        order=order,
        rank=rank,
        values=values,
        residual_median=_read_only(np.median(residuals, axis=0)),
        pearson=pearson,
        spearman=spearman,
    )


def run_summary(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run at a glance as two one-row tables: its size (``Layers cached``, ``Stimuli``,
    ``Vision models``, ``Language models``, and per other modality e.g. ``Brain models``) and
    its GPA (``GPA iterations``, ``GPA converged``, ``GPA final loss``, ``Residual PC1
    explains``), values formatted for display."""
    gpa = run.gpa
    size = {
        "Layers cached": sum(len(run.layers(model)) for model in run.models),
        "Stimuli": f"{run.n_stimuli:,}",
        "Vision models": len(run.vision_models),
        "Language models": len(run.language_models),
    }
    for modality in dict.fromkeys(run.modality(model) for model in run.other_models):
        size[f"{modality.capitalize()} models"] = sum(
            run.modality(model) == modality for model in run.other_models
        )
    alignment = {
        "GPA iterations": int(gpa.n_iter),
        "GPA converged": "yes" if gpa.converged else "NO",
        "GPA final loss": f"{float(gpa.loss_history[-1]):.6f}",
        "Residual PC1 explains": f"{100 * float(run.pca.explained_variance_ratio[0]):.1f} %",
    }
    return pd.DataFrame([size]), pd.DataFrame([alignment])


def models_table(run: Run) -> pd.DataFrame:
    """One row per model: ``model``, ``modality``, ``layers`` (count), ``GPA / default layer``,
    ``role`` (GPA for dispersion, or alignment only)."""
    gpa_layers = dict(zip(run.gpa.models, run.gpa.layers, strict=True))
    return pd.DataFrame(
        [
            {
                "model": model,
                "modality": run.modality(model),
                "layers": len(run.layers(model)),
                "GPA / default layer": gpa_layers.get(model, run.default_layer(model)),
                "role": "GPA (dispersion)" if model in gpa_layers else "alignment (CKNNA)",
            }
            for model in run.models
        ]
    )


def components_table(run: Run) -> pd.DataFrame:
    """One row per principal component of the residuals: ``component``, ``variance_explained_%``
    and the loading of each vision model (a column per model)."""
    pca = run.pca
    ratio = np.asarray(pca.explained_variance_ratio, dtype=np.float64)
    components = np.asarray(pca.components, dtype=np.float64)
    table = pd.DataFrame(
        {
            "component": [f"PC{i + 1}" for i in range(len(ratio))],
            "variance_explained_%": np.round(100.0 * ratio, 2),
        }
    )
    for column, model in enumerate(run.gpa.models):
        table[f"loading {model}"] = np.round(components[: len(ratio), column], 4)
    return table


# ----------------------------------------------------------------------------------------------
# what a reader sees: p-values and the names of columns and values


#: Below this a p-value (or q-value) reads "< 0.001": more digits claim a precision the tests'
#: permutations rarely have
P_TEXT_FLOOR = 1e-3
#: no-break space: a number's text never wraps inside itself ("ρ = +0.066" on one line)
NBSP = "\u00a0"


def p_text(p: object, n_permutations: int | None = None) -> str:
    """A p-value (or q-value) as a reader wants it, the one format of every page's tables,
    cards and chart titles: two significant digits, never an exponent (``0.046``, ``0.0092``,
    ``0.99``); ``< 0.001`` below :data:`P_TEXT_FLOOR`; ``n/a`` when missing (None or NaN).

    With ``n_permutations`` (B), a permutation p-value at its floor 1/(B + 1), the smallest it
    can be (no shuffle as extreme as the data), reads ``≤ 1/(B + 1)`` (``≤ 0.01`` for B = 99),
    or ``< 0.001`` when that floor is below 0.001 (B = 1,000: 0.000999). The words' spaces are
    no-break spaces (:data:`NBSP`)."""
    try:
        value = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "n/a"
    if not np.isfinite(value):
        return "n/a"
    if n_permutations is not None and int(n_permutations) > 0:
        floor = 1.0 / (int(n_permutations) + 1)
        if value <= floor * (1 + 1e-9) and floor >= P_TEXT_FLOOR:
            return f"≤{NBSP}{_rounded_up(floor)}"
    if value < P_TEXT_FLOOR:
        return f"<{NBSP}{P_TEXT_FLOOR:g}"
    return _on_its_side(value)


#: Levels a p-value is read against: its text never rounds it across one (0.0496 is not "0.05")
P_LEVELS = (0.05, 0.01)


def _on_its_side(value: float) -> str:
    """``value`` to two significant digits, or to as many more as keep it on its side of each of
    :data:`P_LEVELS` (0.0496 → ``0.0496``, 0.04999 → ``0.04999``; 0.046 → ``0.046``)."""
    for digits in range(2, 8):
        text = f"{value:.{digits}g}"
        if not any(value < level <= float(text) for level in P_LEVELS):
            return text
    return repr(value)


def _rounded_up(value: float) -> str:
    """``value`` to two significant digits, rounded up (a bound stays a bound: the floor 1/300
    reads ``0.0034``, not ``0.0033``)."""
    text = f"{value:.2g}"
    if float(text) >= value:
        return text
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return f"{math.ceil(value / step) * step:.2g}"


def p_phrase(p: object, n_permutations: int | None = None, *, symbol: str = "p") -> str:
    """``p = 0.046``, ``p < 0.001``, ``q ≤ 0.01`` (:func:`p_text` after ``symbol``), with
    no-break spaces."""
    text = p_text(p, n_permutations)
    return f"{symbol}{NBSP}{text}" if text[0] in "<≤" else f"{symbol}{NBSP}={NBSP}{text}"


#: Every machine name (a column of a core table, or one of its values) a page shows, with the
#: words a reader sees instead. Pages show tables through :func:`shown_table` (or with these as
#: column labels, ``widgets.data_table``); the CSV downloads and the report's files keep the
#: machine names.
DISPLAY_NAMES: dict[str, str] = {
    # tests and their numbers
    "test": "test",
    "statistic": "statistic",
    "p_value": "p",
    "q_value": "q (Benjamini–Hochberg)",
    "p_value_asymptotic": "p (asymptotic)",
    "n_pairs": "pairs",
    "mean_difference": "mean difference (low − high)",
    "wilcoxon_signed_rank": "Wilcoxon signed-rank",
    "paired_t": "paired t",
    "permutation_mean_over_pairs": "permutation, mean over pairs",
    "permutation_p_value_two_sided": "permutation p (two-sided)",
    "permutation_p_value_low_greater": "permutation p (low > high)",
    "mean_over_pairs_p_value_two_sided": "mean over pairs: permutation p (two-sided)",
    "mean_over_pairs_p_value_low_greater": "mean over pairs: permutation p (low > high)",
    "pearson_r": "Pearson r",
    "pearson_p_value": "Pearson p",
    "spearman_rho": "Spearman ρ",
    "spearman_p_value": "Spearman p",
    "spearman": "Spearman rank correlation",
    "kruskal_wallis": "Kruskal–Wallis",
    "epsilon_squared": "Kruskal–Wallis ε²",
    "effect_name": "effect measure",
    "n_stimuli": "stimuli",
    "n_permutations": "permutations",
    "n_queries": "queries",
    # models and sets
    "vision_model": "vision model",
    "vision_layer": "vision layer",
    "language_model": "language model",
    "language_layer": "language layer",
    "language_layer_index": "layer index",
    "n_vision_models": "vision models",
    "n_stimuli_used": "stimuli used",
    "set_size": "set size",
    "mean_cknna": "mean CKNNA",
    "cknna_low_dispersion": "CKNNA, low-dispersion set",
    "cknna_random_mean": "CKNNA, random sets (mean)",
    "cknna_high_dispersion": "CKNNA, high-dispersion set",
    "drop_high": "high-dispersion dropped",
    "full": "full set",
    "drop_low": "low-dispersion dropped",
    "variance_explained_%": "variance explained (%)",
    # short: the page's caption names them in full, and the fit table must fit a 1400-px page
    "ridge": "ridge",
    "boosted_trees": "boosted trees",
    # per-stimulus metrics
    "knn_overlap": "k-NN overlap",
    "local_cka": "local CKA",
    # the universal space
    "stimulus": "row",
    "cross_modal_dispersion": "cross-modal dispersion",
    "mean_residual": "universal-space residual (mean over its models)",
    "intra_modal_dispersion": "intra-modal dispersion (the run's GPA)",
    # retrieval
    "direction": "direction",
    "subset": "held-out stimuli",
    "metric": "measure",
    "all": "all",
    "low_dispersion": "low third",  # the thirds of the run's dispersion (the page says so)
    "high_dispersion": "high third",
    "median_rank": "median rank",
    "universal": "universal space",
    "universal_sd": "universal s.d.",
    "ridge_sd": "ridge s.d.",
    "chance": "chance",
    "n_gallery_mean": "candidates",
    "universal_only": "universal space only",
    "ridge_only": "ridge only",
    "alpha_relative": "alpha (relative)",
    "alpha_at_grid_edge": "alpha at the grid's edge",
}


#: The only columns whose values are machine names a page shows in words (the tests, retrieval's
#: direction, held-out subset and measure, the S1 condition, the predictors' regression); every
#: other column's values are shown as written: model, layer and property names are the user's,
#: and a model called "full" or "ridge" stays "full", "ridge"
MACHINE_VALUE_COLUMNS = frozenset({
    "test", "direction", "subset", "metric", "condition", "model", "effect_name",
})


def display_name(name: object, *, column: bool = False) -> str:
    """What a reader sees for machine name ``name`` (:data:`DISPLAY_NAMES`; ``recall_at_5`` →
    ``recall@5``, ``vision_to_language`` → ``image → text``; anything else as it is, except that
    a ``column`` name's underscores are spaces: ``cknna_random_hi`` → ``CKNNA random hi``)."""
    text = str(name)
    if text in DISPLAY_NAMES:
        return DISPLAY_NAMES[text]
    if re.fullmatch(r"recall_at_\d+", text):
        return text.replace("recall_at_", "recall@")
    source, to, target = text.partition("_to_")
    if to and source and target and "_" not in source + target:  # a retrieval direction
        return direction_label(text)
    if column and re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9%]+)+", text):  # snake_case
        return text.replace("_", " ").replace("cknna", "CKNNA")
    return text


def shown_table(
    frame: pd.DataFrame,
    names: Mapping[str, str] | None = None,
    *,
    decimals: int | None = None,
) -> pd.DataFrame:
    """``frame`` as a page shows it: its columns and its text values that are machine names
    (:func:`display_name`) in words; ``names`` overrides or adds names for this table; with
    ``decimals``, every float column as text with that many decimals (one table, one precision:
    not 0.29 beside 0.3615). A copy: the frame itself (what a download or the report writes)
    keeps its machine names."""
    names = dict(names or {})

    def shown(value: object) -> object:
        if not isinstance(value, str):
            return value
        return names.get(value, display_name(value))

    table = frame.copy()
    for column in table.columns:
        text = table[column].dtype == object or pd.api.types.is_string_dtype(table[column])
        if text and column in MACHINE_VALUE_COLUMNS:  # other values as written: the user's names
            table[column] = table[column].map(shown)
        elif decimals is not None and pd.api.types.is_float_dtype(table[column]):
            table[column] = [
                f"{value:.{decimals}f}" if np.isfinite(value) else "n/a"
                for value in table[column]
            ]
    return table.rename(
        columns=lambda column: names.get(column, display_name(column, column=True))
    )


#: How the paired tests across pairs (``analyses.paired_set_tests``) name their statistic
_STATISTIC_SYMBOLS = {
    "wilcoxon_signed_rank": "W",
    "paired_t": "t",
    "permutation_mean_over_pairs": "Δ",
}


def paired_tests_table(tests: pd.DataFrame, n_permutations: int | None = None) -> pd.DataFrame:
    """The Paper analyses page's table of the tests across pairs (``analyses.paired_set_tests``,
    without its ``note``) as text: the test in words, its statistic named by its symbol (W:
    Wilcoxon's signed-rank sum, t: paired t, Δ: the mean over pairs of CKNNA low − high, the
    permutation test's statistic), p by :func:`p_text` (the permutation test's at its floor
    1/(``n_permutations`` + 1)), the mean difference to 3 decimals."""
    rows = []
    for record in tests.to_dict("records"):
        test = str(record["test"])
        statistic = float(record["statistic"])
        symbol = _STATISTIC_SYMBOLS.get(test, "")
        number = (
            "n/a" if not np.isfinite(statistic)
            else f"{statistic:.0f}" if symbol == "W"
            else f"{statistic:+.3f}" if symbol == "Δ" else f"{statistic:.3g}"
        )
        permutation = test == "permutation_mean_over_pairs"
        rows.append({
            "test": display_name(test),
            "statistic": f"{symbol} = {number}" if symbol else number,
            "p": p_text(record["p_value"], n_permutations if permutation else None),
            "pairs": int(record["n_pairs"]),
            "mean CKNNA low − high": f"{float(record['mean_difference']):+.3f}",
        })
    return pd.DataFrame(rows, columns=["test", "statistic", "p", "pairs", "mean CKNNA low − high"])


def universal_table_names(
    columns: Sequence[str], gpa_modality: str, score_name: str, n_members: int
) -> dict[str, str]:
    """Headers of the Universal space page's table of every stimulus
    (``CrossModalAnalysis.per_stimulus``): which residual each column is, so that the run's GPA
    dispersion (``intra_modal_dispersion``: e.g. the vision models' mean residual) and the
    residual from the universal consensus (``mean_residual``: over the barycenter's models, every
    modality) cannot be taken for each other; ``distance vision|language`` → ``vision–language
    distance``."""
    names = {
        "intra_modal_dispersion": f"{gpa_modality} dispersion ({score_name} of the run's GPA)",
        "mean_residual": f"universal-space residual (mean over its {n_members} models)",
    }
    for column in columns:
        if str(column).startswith("distance ") and "|" in str(column):
            a, _, b = str(column)[len("distance "):].partition("|")
            names[column] = f"{a}–{b} distance"
    return names
