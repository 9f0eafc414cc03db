"""Per-stimulus dispersion from the GPA residual matrix (paper 000, §2.2).

Two summaries of the residual matrix R (m stimuli × M models):

* ``"mean"``: the mean residual of each stimulus across models;
* ``"pc1"``: the stimulus' score on the first principal component of R (centered over stimuli), its
  sign chosen so that it correlates positively with the mean residual (high = more dispersed).

:func:`residual_pca` exposes the whole PCA (scores, per-model loadings, explained variance) for the
dashboard's PCA view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .validation import check_features

#: The unit of every dispersion score: residuals are distances between unit-norm configurations
SCORE_UNIT = "Procrustes distance"


@dataclass(frozen=True)
class Score:
    """One dispersion score: how it is computed from the residuals and how it is named.

    Attributes:
        name: the key (a column of dispersion.parquet, a ``--scores`` choice).
        label: short name for legends and titles ("mean residual").
        description: what an axis of it shows, without the unit ("mean residual across the GPA
            models"); the unit is :data:`SCORE_UNIT`.
        compute: (m, M) residuals (checked, float64) → (m,) float64, higher = more dispersed.
    """

    name: str
    label: str
    description: str
    compute: Callable[[np.ndarray], np.ndarray]

    @property
    def axis_title(self) -> str:
        """The axis title with its unit."""
        return f"{self.description} ({SCORE_UNIT})"


def _mean_residual(residuals: np.ndarray) -> np.ndarray:
    return residuals.mean(axis=1)


def _pc1_score(residuals: np.ndarray) -> np.ndarray:
    return residual_pca(residuals).scores[:, 0].copy()


#: The dispersion scores: the one list. A run stores a column per score in dispersion.parquet,
#: with its rank in ``rank_<score>`` (0 = lowest dispersion); pages, analyses and the report offer
#: these names, and take their labels from here. A new score is one entry (the precompute's
#: dispersion step is keyed by these names, so existing runs gain its column on their next run).
SCORE_ENTRIES: dict[str, Score] = {
    entry.name: entry
    for entry in (
        Score("mean", "mean residual", "mean residual across the GPA models", _mean_residual),
        Score("pc1", "PC1 score", "PC1 score of the residuals", _pc1_score),
    )
}
SCORES: tuple[str, ...] = tuple(SCORE_ENTRIES)


def two_model_note(n_models: int) -> str | None:
    """Why the dispersion results of a run whose GPA aligns two models look too clean (None for
    any other count): each stimulus's two residuals are equal, so the scores agree and every GPA
    start reaches the same optimum by construction, not as a finding."""
    if n_models != 2:
        return None
    return (
        "With two GPA models each stimulus's two residuals are equal (each is half the distance "
        "between the models' aligned points): the residuals have one principal component, so "
        "PC1 is the mean residual rescaled and the two dispersion scores rank stimuli alike "
        "(the pc1 results repeat the mean ones), and GPA is one Procrustes problem, whose "
        "optimum every start reaches (the stability diagnostic agrees by construction). A third "
        "model lets them differ."
    )


def first_layer_note(
    models: Sequence[str], layer_counts: Sequence[int], run_name: str | None = None
) -> str | None:
    """Why a run's dispersion may come from the wrong end of its networks (None when ``models`` is
    empty): ``models`` entered GPA at the first of the ``layer_counts`` layers given for each,
    the default when features come from files or arrays and no layer is named. ``run_name``: the
    run's name, which the rerun it advises must give (a run given no name is named by a hash of
    its settings, the GPA layer among them: without its name the rerun makes a new run)."""
    if not models:
        return None
    named = ", ".join(f"{model} ({count} layers)" for model, count in zip(models, layer_counts))
    rename = f"--run-name {run_name}" if run_name else "--run-name and the run's name"
    return (
        f"GPA aligned {named} at the first layer given for each: the default for features from "
        "files or arrays when no layer is named. For a network listed from input to output "
        "that is its input end; the paper aligns each ViT's penultimate block. Name the layer "
        "with --gpa-layer MODEL=LAYER (gpa_layers in a config or in write_run_from_embeddings) "
        f"and rerun precompute with {rename}: the stored layers are reused and GPA and the "
        "steps after it are redone (without the name, a run that was given none is named by its "
        "settings, so the new layer makes a new run that reads every file and extracts every "
        "encoder again)."
    )


def check_score(score: str) -> str:
    """``score`` if it is one of :data:`SCORES`, else a ValueError naming the choices."""
    if score not in SCORES:
        raise ValueError(f"unknown dispersion score {score!r}; use one of {list(SCORES)}")
    return score


def score_entry(score: str) -> Score:
    """The :class:`Score` named ``score`` (a ValueError naming the choices otherwise)."""
    return SCORE_ENTRIES[check_score(score)]


def rank_column(score: str) -> str:
    """The column of dispersion.parquet holding the ranks of ``score`` (``"rank_mean"``)."""
    return f"rank_{check_score(score)}"


@dataclass(frozen=True)
class ResidualPCA:
    """PCA of the residual matrix R (m, M), centered over stimuli.

    Attributes:
        scores: (m, M) float64, scores[j, c] = (R_j − mean) · components[c].
        components: (M, M) float64, row c = principal axis c = per-model loadings, unit norm.
        explained_variance: (M,) variance of each score column (denominator m − 1), descending.
        explained_variance_ratio: (M,) explained_variance / its sum (all zeros if R is constant).
        mean: (M,) the per-model mean residual that was subtracted.

    Signs: PC1 is oriented so its scores correlate positively with the mean residual per stimulus;
    every other component so that its largest-magnitude loading is positive.
    """

    scores: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray


def _check_residuals(residuals: object) -> np.ndarray:
    return check_features(residuals, "residuals (stimuli × models)", min_rows=2)


def residual_pca(residuals: np.ndarray) -> ResidualPCA:
    """Principal components of the residual matrix.

    Args:
        residuals: (m, M) residual matrix, m ≥ 2 stimuli (rows) × M models (columns).

    Returns:
        :class:`ResidualPCA` with M components (all of them, in order of decreasing variance).
    """
    R = _check_residuals(residuals)
    m, n_models = R.shape
    mean = R.mean(axis=0)
    centered = R - mean
    _, singular_values, components = np.linalg.svd(centered, full_matrices=False)
    # svd gives min(m, M) components; pad with zero-variance orthonormal directions when m < M.
    if components.shape[0] < n_models:
        q, _ = np.linalg.qr(np.vstack([components, np.eye(n_models)]).T)
        components = q[:, :n_models].T
        singular_values = np.concatenate([singular_values, np.zeros(n_models - singular_values.size)])
    # deterministic signs: largest-magnitude loading positive; then PC1 by the mean residual.
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(n_models), largest])
    signs[signs == 0] = 1.0
    components = components * signs[:, None]
    scores = centered @ components.T
    mean_residual = R.mean(axis=1)
    if np.dot(scores[:, 0], mean_residual - mean_residual.mean()) < 0:
        components[0] = -components[0]
        scores[:, 0] = -scores[:, 0]
    explained_variance = singular_values**2 / (m - 1)
    total = explained_variance.sum()
    ratio = explained_variance / total if total > 0 else np.zeros_like(explained_variance)
    return ResidualPCA(
        scores=scores,
        components=components,
        explained_variance=explained_variance,
        explained_variance_ratio=ratio,
        mean=mean,
    )


def dispersion_scores(residuals: np.ndarray, method: str = "mean") -> np.ndarray:
    """One dispersion score per stimulus (higher = the models disagree more about it).

    Args:
        residuals: (m, M) residual matrix (stimuli × models), e.g. ``GPAResult.residuals``.
        method: a name of :data:`SCORES`: ``"mean"`` (mean residual across models) or
            ``"pc1"`` (PC1 score, see module doc).

    Returns:
        (m,) float64.
    """
    entry = score_entry(method)
    return np.asarray(entry.compute(_check_residuals(residuals)), dtype=np.float64)
