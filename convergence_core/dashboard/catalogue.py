"""Per-run lookups every page needs, computed once per run and shared by all sessions (no
Streamlit).

A page rerun must not redo O(n) Python work that another rerun (or another session) has already
done: at 100,000 stimuli, turning the id column into strings, building an id → row dictionary or
lower-casing every caption takes 0.1–1 s each. :func:`build_catalogue` does all of it once per run
(``data.catalogue`` caches it with ``st.cache_resource``); its arrays are read-only.

Shapes: ``n`` stimuli, ``M`` vision models in the GPA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..dispersion import SCORES
from ..run import Run


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
        pearson, spearman: correlation of the two scores (Spearman: Pearson of the ranks).
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
    # Spearman's rho is Pearson's r of the ranks (the run stores both scores' ranks; no ties)
    spearman = float(np.corrcoef(rank["mean"], rank["pc1"])[0, 1])
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
