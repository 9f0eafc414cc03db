"""Universal space: barycentric (Generalized Procrustes) alignment across modalities (paper 001).

A *universal space* is the GPA consensus of any group of models that embedded the same stimuli —
vision and language models, brain recordings (stimuli × voxels), or any modality a user names. Each
model's features are mapped into it by a learned affine isometry: subtract the model's column
means, divide by its Frobenius scale, then apply an orthogonal map. Everything is learned on the
rows the fit sees (all stimuli for the per-stimulus analysis; a training split for retrieval,
:mod:`convergence_core.retrieval`), so rows it did not see can be mapped afterwards.

Fit (:func:`fit_universal_space`), for models i = 1..M with training features X_i (n, d_i):

1. Centre: μ_i = column means of X_i; X̃_i = X_i − μ_i.
2. Principal axes: V_i (d_i, k_i), orthonormal columns, the right singular vectors of X̃_i with
   singular value > ``RANK_RTOL`` × the largest, in order of decreasing variance (at most
   ``n_components`` of them, if given). k_i ≤ min(n − 1, d_i). Coordinates Z_i = X̃_i V_i.
   Without ``n_components`` this drops nothing but numerically null directions, so GPA on Z_i has
   exactly the residuals of GPA on X_i (GPA is invariant to an orthogonal change of each model's
   basis). It also fixes the map of rows outside the training span: a direction the training rows
   never varied along has no Procrustes rotation, and is mapped to zero instead of arbitrarily.
3. Scale: s_i = ||Z_i||_F, so every configuration Z_i / s_i has unit Frobenius norm (paper 000, §2.1).
4. GPA (:func:`procrustes.generalized_procrustes`) of the Z_i / s_i, zero-padded to p = max k_i
   columns: aligned configurations A_i (n, p) and their mean, the consensus C.
5. Orthogonal maps: T_i (k_i, p), orthonormal rows, with (Z_i / s_i) T_i = A_i: GPA's own map of
   model i (its inputs are already centred and of unit norm, so GPA's centring and scaling change
   them only by rounding).

A row x of model i maps to ``u = (x − μ_i) V_i T_i / s_i`` (:meth:`UniversalFit.transform`), in the
units of the unit-Frobenius-norm configurations ("residual units"; a typical training row has norm
≈ 1/sqrt(n)). The maps of the training rows reproduce A_i (tested to 1e-10).

Per-stimulus quantities (:func:`cross_modal_analysis`), for stimulus j:

* residual r_ij = ||A_i[j] − C[j]|| (as in paper 000 §2.2, now across modalities);
* modality mean m_g[j] = mean of A_i[j] over the models i of modality g (each model weighs the same
  in the consensus; each modality weighs the same in the dispersion below);
* **cross-modal dispersion** D_j = sqrt( mean over modality pairs a < b of ||m_a[j] − m_b[j]||² ),
  the root-mean-square distance between the modality means of stimulus j in the universal space, in
  residual units. With two modalities (vision, language) it is ||m_vision[j] − m_language[j]||: how
  far the image's and the caption's positions are apart after alignment. 0 = the modalities agree
  exactly on that stimulus.

Its relation to intra-modal (vision) dispersion — the paper's mean GPA residual of the vision
models alone — is the Spearman rank correlation ρ over stimuli with a two-sided permutation p-value
(:func:`dispersion_relation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from .dispersion import check_score
from .procrustes import GPAResult, generalized_procrustes
from .stats import spearman_permutation_test
from .validation import check_count

if TYPE_CHECKING:
    from .run import Run

__all__ = [
    "RANK_RTOL",
    "CrossModalAnalysis",
    "Member",
    "UniversalFit",
    "cross_modal_analysis",
    "cross_modal_dispersion",
    "dispersion_relation",
    "fit_universal_space",
    "modality_means",
    "run_cross_modal_analysis",
    "run_features",
    "run_members",
]

#: Singular values of a model's centred training features at or below this fraction of the largest
#: are treated as zero (the eigendecomposition route resolves singular values to ~1.5e-8 of the
#: largest, so this is well above its rounding and well below any real signal).
RANK_RTOL = 1e-6

#: Rows per block when centring / projecting large feature matrices (bounds temporary memory to
#: one (block, d) float64 array).
_ROW_BLOCK = 8192

#: Above this many rows per column the principal axes come from the (d, d) scatter matrix instead of
#: an SVD of the (n, d) features (the SVD's (n, min(n, d)) factor would be the largest array).
_SCATTER_ROUTE_RATIO = 2


class Member(NamedTuple):
    """One model (at one layer) that enters the universal space, and its modality."""

    model: str
    layer: str
    modality: str

    @property
    def label(self) -> str:
        return f"{self.model} ({self.layer})"


@dataclass(frozen=True)
class UniversalFit:
    """The learned universal space of M models (:func:`fit_universal_space`).

    Attributes:
        members: the M models, in input order.
        means: M arrays (d_i,) float64, column means of each model's training features.
        scales: (M,) float64, Frobenius norm of each model's centred training coordinates.
        bases: M arrays (d_i, k_i), orthonormal columns: the principal axes kept (step 2).
        rotations: M arrays (k_i, p), orthonormal rows: the maps onto the consensus (step 5).
        gpa: the GPA result on the training rows (residuals (n, M), consensus (n, p), aligned).
        n_train: training rows.
    """

    members: tuple[Member, ...]
    means: tuple[np.ndarray, ...]
    scales: np.ndarray
    bases: tuple[np.ndarray, ...]
    rotations: tuple[np.ndarray, ...]
    gpa: GPAResult
    n_train: int

    @property
    def width(self) -> int:
        """p: columns of the universal space."""
        return int(self.rotations[0].shape[1])

    @property
    def modalities(self) -> tuple[str, ...]:
        """The members' modalities, each once, in order of first appearance."""
        return tuple(dict.fromkeys(member.modality for member in self.members))

    def map_matrix(self, index: int) -> np.ndarray:
        """(d_i, p) linear part of member ``index``'s map: V_i T_i / s_i."""
        return self.bases[index] @ self.rotations[index] / self.scales[index]

    def transform(self, index: int, features: np.ndarray) -> np.ndarray:
        """Map rows of member ``index``'s features (n, d_i) into the universal space: (n, p).

        Works in blocks of rows, so a memory-mapped (n, d_i) input is never copied whole.
        """
        mean = self.means[index]
        if getattr(features, "ndim", None) != 2 or features.shape[1] != mean.shape[0]:
            raise ValueError(
                f"features for {self.members[index].label} must have shape (n, {mean.shape[0]}), "
                f"got {getattr(features, 'shape', None)}; pass the same model and layer the space "
                "was fitted on"
            )
        matrix = self.map_matrix(index)
        out = np.empty((features.shape[0], matrix.shape[1]), dtype=np.float64)
        for start in range(0, features.shape[0], _ROW_BLOCK):
            block = np.asarray(features[start : start + _ROW_BLOCK], dtype=np.float64)
            if not np.isfinite(block).all():
                raise ValueError(
                    f"features for {self.members[index].label} contain NaN or Inf in rows "
                    f"{start}..{start + block.shape[0] - 1}; drop those stimuli or re-extract"
                )
            out[start : start + block.shape[0]] = (block - mean) @ matrix
        return out


def _check_member_count(features: Sequence[object], members: Sequence[Member]) -> None:
    if len(features) != len(members):
        raise ValueError(
            f"got {len(features)} feature arrays for {len(members)} members; pass one (n, d) "
            "array per member, in the same order"
        )


def _check_members(members: Sequence[Member]) -> tuple[Member, ...]:
    checked = []
    for member in members:
        if not isinstance(member, tuple) or len(member) != 3:
            raise ValueError(
                f"each member must be a Member(model, layer, modality), got {member!r}"
            )
        model, layer, modality = (str(x) for x in member)
        if not modality:
            raise ValueError(
                f"member {model!r} has an empty modality; name it (e.g. 'vision', 'language', "
                "'brain')"
            )
        checked.append(Member(model, layer, modality))
    keys = [(m.model, m.layer) for m in checked]
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"a model and layer appears twice among the members {keys}; list each once"
        )
    return tuple(checked)


def _as_feature_array(x: object, member: Member) -> np.ndarray:
    """``x`` as a 2-D real array (numpy arrays and memory maps as they are, anything else copied)."""
    array = x if isinstance(x, np.ndarray) else np.asarray(x)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(
            f"features of {member.label} must be 2-D (n_stimuli, n_features), got shape "
            f"{array.shape}; pass one row per stimulus"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"features of {member.label} have dtype {array.dtype}; pass real numbers")
    return array


def _principal_axes(features: np.ndarray, mean: np.ndarray, n_components: int | None) -> np.ndarray:
    """(d, k) principal axes of the centred rows of ``features`` (n, d), decreasing variance.

    Small problems (n ≤ 2d): thin SVD of the centred (n, d) matrix. Tall ones: eigendecomposition
    of the (d, d) scatter matrix accumulated in float64 blocks of rows (memory O(d²), not O(n·d)).
    Axes with singular value ≤ RANK_RTOL × the largest are dropped.
    """
    n, d = features.shape
    if n <= _SCATTER_ROUTE_RATIO * d:
        centred = np.asarray(features, dtype=np.float64) - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt.T
    else:
        scatter = np.zeros((d, d))
        for start in range(0, n, _ROW_BLOCK):
            block = np.asarray(features[start : start + _ROW_BLOCK], dtype=np.float64) - mean
            scatter += block.T @ block
        eigenvalues, eigenvectors = np.linalg.eigh(scatter)
        order = np.argsort(eigenvalues)[::-1]
        singular = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        axes = eigenvectors[:, order]
    if not singular.size or not singular[0] > 0.0:
        return axes[:, :0]
    rank = int(np.count_nonzero(singular > RANK_RTOL * singular[0]))
    if n_components is not None:
        rank = min(rank, n_components)
    return axes[:, :rank]


def _project(features: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """(n, k) coordinates (features − mean) @ axes, in blocks of rows."""
    out = np.empty((features.shape[0], axes.shape[1]))
    for start in range(0, features.shape[0], _ROW_BLOCK):
        block = np.asarray(features[start : start + _ROW_BLOCK], dtype=np.float64)
        out[start : start + block.shape[0]] = (block - mean) @ axes
    return out


def _orthogonal_maps(gpa: GPAResult) -> tuple[np.ndarray, ...]:
    """T_i (k_i, p) with configurations[i] @ T_i = gpa.aligned[i] (module docstring, step 5).

    GPA's own maps R_i (k_i, p; orthonormal rows) give aligned_i = ((Z_i / s_i − μ_i) / σ_i) R_i
    with its column means μ_i and Frobenius scale σ_i of the configuration, which is centred and
    of unit norm: μ_i = 0 and σ_i = 1 up to rounding, so T_i = R_i.
    """
    return tuple(np.asarray(r, dtype=np.float64) for r in gpa.maps)


def fit_universal_space(
    features: Sequence[np.ndarray],
    members: Sequence[Member],
    *,
    n_components: int | None = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
) -> UniversalFit:
    """Learn the universal space of a group of models from their features of the same stimuli.

    Args:
        features: M ≥ 2 arrays (n, d_i), rows = the same n ≥ 3 stimuli in the same order (e.g. the
            training rows of a split). Memory-mapped float32 is fine; it is read in blocks.
        members: M :class:`Member` s (model, layer, modality), one per array. Modalities are free
            names; any number of them.
        n_components: keep at most this many principal axes per model (None: every axis with
            variance, at most n − 1).
        tol, max_iter: passed to :func:`procrustes.generalized_procrustes`.

    Returns:
        :class:`UniversalFit` (means, scales, principal axes, orthogonal maps, the GPA result).
    """
    members = _check_members(members)
    _check_member_count(features, members)
    if len(members) < 2:
        raise ValueError(
            f"a universal space needs at least 2 models, got {len(members)}; pick two or more"
        )
    if n_components is not None and (
        isinstance(n_components, bool)
        or not isinstance(n_components, (int, np.integer))
        or n_components < 1
    ):
        raise ValueError(
            f"n_components must be a positive integer or None (keep every axis), got "
            f"{n_components!r}"
        )
    features = [_as_feature_array(x, member) for x, member in zip(features, members, strict=True)]
    n_rows = {int(x.shape[0]) for x in features}
    if len(n_rows) != 1:
        raise ValueError(
            f"every member must embed the same stimuli, but the row counts differ "
            f"({[int(x.shape[0]) for x in features]}); select the same rows from each"
        )
    n = n_rows.pop()
    if n < 3:
        raise ValueError(f"only {n} stimuli; a universal space needs at least 3 to fit")
    means, bases, configurations, scales = [], [], [], []
    for member, x in zip(members, features, strict=True):
        mean = np.zeros(x.shape[1])
        for start in range(0, n, _ROW_BLOCK):
            block = np.asarray(x[start : start + _ROW_BLOCK], dtype=np.float64)
            if not np.isfinite(block).all():
                bad = start + np.flatnonzero(~np.isfinite(block).all(axis=1))
                raise ValueError(
                    f"features of {member.label} contain NaN or Inf in {bad.size} rows of this "
                    f"block (first: {bad[:5].tolist()}); drop those stimuli or re-extract"
                )
            mean += block.sum(axis=0)
        mean /= n
        axes = _principal_axes(x, mean, n_components)
        if axes.shape[1] == 0:
            raise ValueError(
                f"{member.label} is identical for every stimulus (zero variance after centring); "
                "drop this model or check its extraction"
            )
        coordinates = _project(x, mean, axes)
        scale = float(np.linalg.norm(coordinates))
        means.append(mean)
        bases.append(axes)
        configurations.append(coordinates / scale)
        scales.append(scale)
    gpa = generalized_procrustes(
        configurations,
        tol=tol,
        max_iter=max_iter,
        models=tuple(m.model for m in members),
        layers=tuple(m.layer for m in members),
    )
    return UniversalFit(
        members=members,
        means=tuple(means),
        scales=np.asarray(scales, dtype=np.float64),
        bases=tuple(bases),
        rotations=_orthogonal_maps(gpa),
        gpa=gpa,
        n_train=n,
    )


def modality_means(
    aligned: Sequence[np.ndarray], members: Sequence[Member]
) -> dict[str, np.ndarray]:
    """``{modality: (n, p) mean of its members' aligned rows}``, modalities in first-seen order."""
    _check_member_count(aligned, members)
    groups: dict[str, list[np.ndarray]] = {}
    for member, rows in zip(members, aligned, strict=True):
        groups.setdefault(member.modality, []).append(np.asarray(rows, dtype=np.float64))
    return {modality: np.mean(rows, axis=0) for modality, rows in groups.items()}


def _pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]


def _check_modalities(modalities: list[str]) -> None:
    """ValueError unless there are at least two modalities to compare."""
    if len(modalities) < 2:
        raise ValueError(
            f"cross-modal dispersion needs models of at least 2 modalities, got {modalities}; "
            "add a model of another modality (e.g. a language model)"
        )


def cross_modal_dispersion(
    means: dict[str, np.ndarray],
) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
    """Cross-modal dispersion D (n,) and each modality pair's distances (n,) (module docstring).

    Args:
        means: ``{modality: (n, p)}`` from :func:`modality_means`; at least two modalities.

    Returns:
        ``(D, {(a, b): ||m_a − m_b|| per stimulus})``; residual units.
    """
    _check_modalities(list(means))
    pairs = _pairs(list(means))
    distances = {(a, b): np.linalg.norm(means[a] - means[b], axis=1) for a, b in pairs}
    squared = np.mean([d**2 for d in distances.values()], axis=0)
    return np.sqrt(squared), distances


def dispersion_relation(
    cross_modal: np.ndarray,
    intra_modal: np.ndarray,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Spearman ρ between cross-modal and intra-modal dispersion, with permutation p-values
    (``stats.spearman_permutation_test``; the null shuffles the intra-modal values)."""
    return spearman_permutation_test(
        cross_modal, intra_modal, n_permutations=n_permutations, seed=seed,
        names=("cross_modal", "intra_modal"),
    )


@dataclass(frozen=True)
class CrossModalAnalysis:
    """Per-stimulus view of a universal space fitted on every stimulus (:func:`cross_modal_analysis`).

    Attributes:
        fit: the :class:`UniversalFit` on all n stimuli.
        residuals: long table, one row per stimulus × member: ``stimulus`` (row), ``id``, ``model``,
            ``layer``, ``modality``, ``metric`` (= ``"residual"``), ``value`` (residual units).
        dispersion: long table, one row per stimulus × metric: ``stimulus``, ``id``, ``metric``,
            ``modality_a``, ``modality_b`` (set for ``modality_distance`` rows, else empty),
            ``value``. Metrics: ``cross_modal_dispersion`` (D), ``modality_distance`` (one per
            modality pair), ``mean_residual`` (over all members), ``intra_modal_dispersion`` (the
            given per-stimulus intra-modal score, when one was given).
        relation: one row: :func:`dispersion_relation` of D against the intra-modal score (empty
            when none was given), plus ``intra_modal`` (its name).
    """

    fit: UniversalFit
    residuals: pd.DataFrame
    dispersion: pd.DataFrame
    relation: pd.DataFrame

    def model_summary(self) -> pd.DataFrame:
        """Per member: ``model``, ``layer``, ``modality``, ``mean_residual``,
        ``median_residual`` over stimuli (residual units)."""
        grouped = self.residuals.groupby(["model", "layer", "modality"], sort=False)["value"]
        return grouped.agg(mean_residual="mean", median_residual="median").reset_index()

    def per_stimulus(self) -> pd.DataFrame:
        """The dispersion table wide: one row per stimulus, a column per metric (and pair)."""
        frame = self.dispersion.copy()
        pair = frame["modality_a"].astype(str) + "|" + frame["modality_b"].astype(str)
        frame["column"] = np.where(
            frame["metric"] == "modality_distance", "distance " + pair, frame["metric"]
        )
        wide = frame.pivot_table(
            index=["stimulus", "id"], columns="column", values="value", sort=False
        ).reset_index()
        wide.columns.name = None
        return wide


def cross_modal_analysis(
    features: Sequence[np.ndarray],
    members: Sequence[Member],
    *,
    ids: Sequence[str] | None = None,
    intra_modal: np.ndarray | None = None,
    intra_modal_name: str = "intra_modal_dispersion",
    n_components: int | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> CrossModalAnalysis:
    """GPA over the group on every stimulus: residuals per model, cross-modal dispersion per
    stimulus, and (given ``intra_modal``, e.g. the vision models' mean residual) their relation.

    Args:
        features: M arrays (n, d_i) of the same stimuli; members: their :class:`Member` s (at least
            two modalities).
        ids: n stimulus ids (default ``"0".."n-1"``).
        intra_modal: (n,) per-stimulus intra-modal dispersion to relate D to (optional).
        n_components, n_permutations, seed: see :func:`fit_universal_space` and
            :func:`dispersion_relation`.

    The members, ids, ``intra_modal`` and ``n_permutations`` are checked before the fit (minutes
    on a large run).
    """
    members = _check_members(members)
    _check_member_count(features, members)
    _check_modalities(list(dict.fromkeys(member.modality for member in members)))
    n = len(features[0])  # the fit checks that every member has as many rows
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} stimuli; pass one id per row")
    intra = None
    if intra_modal is not None:
        intra = np.asarray(intra_modal, dtype=np.float64).reshape(-1)
        if intra.shape[0] != n:
            raise ValueError(
                f"intra_modal has {intra.shape[0]} values for {n} stimuli; pass one per stimulus"
            )
        bad = np.flatnonzero(~np.isfinite(intra))
        if bad.size:
            raise ValueError(
                f"intra_modal has {bad.size} NaN or Inf values (first at stimulus {bad[0]}); pass "
                "a finite score per stimulus, or leave those stimuli out of every input"
            )
        check_count(n_permutations, "n_permutations", 1)
    fit = fit_universal_space(features, members, n_components=n_components)
    residuals = np.asarray(fit.gpa.residuals, dtype=np.float64)
    stimulus = np.arange(n)
    residual_table = pd.concat(
        [
            pd.DataFrame(
                {
                    "stimulus": stimulus,
                    "id": ids,
                    "model": member.model,
                    "layer": member.layer,
                    "modality": member.modality,
                    "metric": "residual",
                    "value": residuals[:, i],
                }
            )
            for i, member in enumerate(members)
        ],
        ignore_index=True,
    )
    means = modality_means(fit.gpa.aligned, members)
    dispersion, distances = cross_modal_dispersion(means)

    def rows(metric: str, values: np.ndarray, a: str = "", b: str = "") -> pd.DataFrame:
        return pd.DataFrame(
            {
                "stimulus": stimulus,
                "id": ids,
                "metric": metric,
                "modality_a": a,
                "modality_b": b,
                "value": np.asarray(values, dtype=np.float64),
            }
        )

    parts = [rows("cross_modal_dispersion", dispersion)]
    parts += [rows("modality_distance", d, a, b) for (a, b), d in distances.items()]
    parts.append(rows("mean_residual", residuals.mean(axis=1)))
    relation = pd.DataFrame()
    if intra is not None:
        parts.append(rows("intra_modal_dispersion", intra))
        relation = pd.DataFrame(
            [
                {
                    "x": "cross_modal_dispersion",
                    "y": intra_modal_name,
                    **dispersion_relation(
                        dispersion, intra, n_permutations=n_permutations, seed=seed
                    ),
                }
            ]
        )
    return CrossModalAnalysis(
        fit=fit,
        residuals=residual_table,
        dispersion=pd.concat(parts, ignore_index=True),
        relation=relation,
    )


# ----------------------------------------------------------------------------------------------
# runs


def run_members(
    run: Run, models: Sequence[str] | None = None, layers: dict[str, str] | None = None
) -> list[Member]:
    """Members for ``models`` of a run (default: every model), each at ``layers[model]`` or its
    default layer (a vision model's default is its GPA layer), with the run's modality."""
    models = list(run.models if models is None else models)
    layers = dict(layers or {})
    unknown = sorted(set(layers) - set(models))
    if unknown:
        raise ValueError(f"layers given for models that are not chosen: {unknown}; choose them")
    members = []
    for model in models:
        layer = layers.get(model, run.default_layer(model))
        if layer not in run.layers(model):
            raise ValueError(
                f"layer {layer!r} is not a layer of {model!r}; choose one of {run.layers(model)}"
            )
        members.append(Member(model, layer, run.modality(model)))
    return members


def run_features(run: Run, members: Sequence[Member]) -> list[np.ndarray]:
    """The stored (n, d) features of each member (read-only memory maps; blocks are read as
    needed by the functions here)."""
    return [run.embeddings[m.model][m.layer] for m in members]


def dispersion_name(run: Run, score: str) -> str:
    """The name of the run's dispersion ``score`` in tables: ``vision_dispersion_mean``, or for
    GPA across brain recordings ``brain_dispersion_mean`` (:attr:`Run.gpa_modality`)."""
    return f"{run.gpa_modality.replace('/', '_')}_dispersion_{score}"


def run_cross_modal_analysis(
    run: Run,
    models: Sequence[str] | None = None,
    *,
    layers: dict[str, str] | None = None,
    score: str = "mean",
    n_components: int | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> CrossModalAnalysis:
    """:func:`cross_modal_analysis` of a run's ``models`` (default all), related to the run's
    intra-modal dispersion ``run.dispersion[score]`` (``"mean"`` or ``"pc1"``: GPA across the
    vision models, or the run's GPA models), named by :func:`dispersion_name`."""
    check_score(score)
    members = run_members(run, models, layers)
    return cross_modal_analysis(
        run_features(run, members),
        members,
        ids=run.stimuli["id"].astype(str).tolist(),
        intra_modal=run.dispersion[score].to_numpy(dtype=np.float64),
        intra_modal_name=dispersion_name(run, score),
        n_components=n_components,
        n_permutations=n_permutations,
        seed=seed,
    )
