"""Small runs with planted structure, for the tests of every page and analysis.

``make_synthetic_run(tmp_path, n=60, plant=...)`` writes a complete run folder with
``write_run_from_embeddings`` in well under a second (plus ~5 ms per thumbnail) and returns it
loaded. What is planted (the answer a test may rely on):

* ``plant="layer_peak"`` (:func:`synthetic_embeddings`): vision models that agree up to rotation
  except for a per-stimulus noise level (``stimuli.planted_noise``), language models whose CKNNA
  with them peaks at the middle layer; for the pages.
* ``plant="quiet_half"`` (:func:`quiet_half_embeddings`): a language model ``planted`` that agrees
  with the vision consensus only on the quieter half of the stimuli, best at layer
  ``PLANTED_BEST_LAYER``, and an ``independent`` one; for the paper's analyses.

:func:`make_rotation_run` adds a vision model that is an exact rotation of another;
:func:`add_properties` writes a run's stimulus property table (as the precompute does, without
caption agreement). Import from any test::

    from tests.fixtures_runs import make_synthetic_run
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from convergence_core import settings
from convergence_core.datasets import load_coco
from convergence_core.precompute import write_run_from_embeddings
from convergence_core.run import Run

__all__ = [
    "COCO_MINI_SIZE",
    "add_properties",
    "PLANTED_BEST_LAYER",
    "make_rotation_run",
    "make_synthetic_run",
    "quiet_half_embeddings",
    "synthetic_embeddings",
]

#: number of images in the embedded demo set (coco-mini)
COCO_MINI_SIZE = 239

VISION_MODELS = ("vision-a", "vision-b", "vision-c")
LANGUAGE_MODELS = ("language-a", "language-b")
VISION_LAYERS = ("stage1", "stage2")
VISION_DIMS = (16, 20, 24)
LANGUAGE_DIMS = (12, 14)
LATENT_DIM = 8

QUIET_HALF_LATENT_DIM = 6
PLANTED_BEST_LAYER = "block2"
_LAYER_MIX = {"block0": 0.0, "block1": 0.35, "block2": 1.0, "block3": 0.6}


def _orthonormal_rows(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """(k, d) matrix with orthonormal rows: an isometric embedding of R^k into R^d."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T


def _orthonormal_square_rows(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """(k, d) orthonormal rows: the first k rows of a random (d, d) orthogonal matrix.

    (Draws d·d normals, unlike :func:`_orthonormal_rows`; the quiet-half run's numbers depend on
    this stream.)
    """
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:k]


def synthetic_embeddings(
    n: int,
    *,
    vision_models: Sequence[str] = VISION_MODELS,
    language_models: Sequence[str] = LANGUAGE_MODELS,
    n_language_layers: int = 4,
    seed: int = 0,
) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Embeddings with planted structure and the planted per-stimulus noise level.

    Returns ``(embeddings, noise)``: ``embeddings[model][layer]`` (n, d) float32, and ``noise``
    (n,) float64, the planted noise scale of each stimulus (0.05 .. 1.05, uniform at random).

    What is planted:

    * a shared latent ``z`` (n, 8), standard normal;
    * vision model i, layer ``stage2`` (its default and GPA layer) = ``(z + noise_j * e_ij) Q_i``,
      with ``e_ij`` fresh standard normal per model and ``Q_i`` an isometry R^8 -> R^{16|20|24}: so
      the models agree up to rotation except for per-stimulus noise, and a stimulus's GPA
      residuals (mean and PC1 dispersion) grow with ``noise_j``;
      layer ``stage1`` = ``stage2`` plus extra isotropic noise (0.8 per entry), a worse layer;
    * language model l, layer t of ``n_language_layers`` (``layer0`` ..):
      ``(a_t z + noise_j e + (1 - a_t) g) P`` with ``a_t`` peaking at layer
      ``n_language_layers // 2`` (a_t = 1 there, 0.2 at the ends), ``e`` fresh standard normal
      (scaled by the same per-stimulus ``noise_j``) and ``g`` independent normal: so
      vision-language CKNNA peaks at the middle layer and is higher on low-dispersion stimuli
      (the paper's effect). The default language layer is the last one.
    """
    if n_language_layers < 1:
        raise ValueError("n_language_layers must be at least 1")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, LATENT_DIM))
    noise = 0.05 + rng.uniform(0.0, 1.0, size=n)
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    for index, model in enumerate(vision_models):
        d = VISION_DIMS[index % len(VISION_DIMS)]
        q = _orthonormal_rows(rng, LATENT_DIM, d)
        clean = (z + noise[:, None] * rng.standard_normal((n, LATENT_DIM))) @ q
        worse = clean + 0.8 * rng.standard_normal(clean.shape)
        embeddings[model] = {"stage1": worse.astype(np.float32), "stage2": clean.astype(np.float32)}
    peak = n_language_layers // 2
    span = max(peak, n_language_layers - 1 - peak, 1)
    for index, model in enumerate(language_models):
        d = LANGUAGE_DIMS[index % len(LANGUAGE_DIMS)]
        p = _orthonormal_rows(rng, LATENT_DIM, d)
        own_noise = noise[:, None] * rng.standard_normal((n, LATENT_DIM))
        layers: dict[str, np.ndarray] = {}
        for t in range(n_language_layers):
            a = 1.0 - 0.8 * abs(t - peak) / span
            g = rng.standard_normal((n, LATENT_DIM))
            layers[f"layer{t}"] = ((a * z + own_noise + (1.0 - a) * g) @ p).astype(np.float32)
        embeddings[model] = layers
    return embeddings, noise


def quiet_half_embeddings(
    n: int = 80, *, n_vision: int = 3, seed: int = 0
) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Embeddings ``{model: {layer: (n, d)}}`` and the planted per-stimulus noise level (n,).

    Every vision model ``vision<i>`` (one layer, ``final``) sees a shared latent ``Z`` (n, 6)
    through its own random orthonormal map, plus isotropic noise scaled by the stimulus's noise
    level (a permutation of 0.02 .. 1.2): the noisier a stimulus, the higher its dispersion.
    Language model ``planted``: ``block2`` is ``Z`` through a random map with little noise on the
    quieter half of the stimuli and much noise on the noisier half (it agrees with the vision
    consensus on low-dispersion stimuli only); ``block0`` is pure noise; ``block1`` and ``block3``
    mix ``block2`` with noise, so ``block2`` is the best layer. ``independent``: Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, QUIET_HALF_LATENT_DIM))
    noise_level = rng.permutation(np.linspace(0.02, 1.2, n))
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    for i in range(n_vision):
        width = 10 + 3 * i
        mapped = latent @ _orthonormal_square_rows(rng, QUIET_HALF_LATENT_DIM, width)
        noisy = mapped + noise_level[:, None] * rng.standard_normal((n, width))
        embeddings[f"vision{i}"] = {"final": noisy}
    quiet = noise_level <= np.median(noise_level)
    language_noise = np.where(quiet, 0.05, 3.0)
    width = 12
    aligned = latent @ _orthonormal_square_rows(rng, QUIET_HALF_LATENT_DIM, width)
    aligned = aligned + language_noise[:, None] * rng.standard_normal((n, width))
    embeddings["planted"] = {
        layer: mix * aligned + (1.0 - mix) * 2.0 * rng.standard_normal((n, width))
        for layer, mix in _LAYER_MIX.items()
    }
    embeddings["independent"] = {"final": rng.standard_normal((n, 9))}
    return embeddings, noise_level


def _stimuli(n: int, images: bool) -> tuple[pd.DataFrame, Path | None]:
    """The first n coco-mini stimuli and their image root, or (images=False or n > 239) a table
    of n image-less stimuli and None."""
    if images and n <= COCO_MINI_SIZE:
        dataset = load_coco(settings.demo_data_root())
        return dataset.stimuli.iloc[:n].reset_index(drop=True).copy(), dataset.root
    stimuli = pd.DataFrame(
        {
            "id": [f"s{i:05d}" for i in range(n)],
            "image": [f"synthetic/{i:05d}.jpg" for i in range(n)],
            "captions": [[f"synthetic stimulus {i}"] for i in range(n)],
        }
    )
    return stimuli, None


def _write(
    path: Path,
    embeddings: Mapping[str, Mapping[str, np.ndarray]],
    noise: np.ndarray,
    *,
    vision_models: Sequence[str],
    language_models: Sequence[str],
    default_layers: Mapping[str, str] | None,
    images: bool,
    thumbnails: bool,
    seed: int,
    gpa_stop: str = "optimum",
) -> Run:
    stimuli, images_root = _stimuli(noise.shape[0], images)
    stimuli["planted_noise"] = noise
    return write_run_from_embeddings(
        path,
        stimuli,
        embeddings,
        vision_models=list(vision_models),
        language_models=list(language_models),
        default_layers=default_layers,
        images_root=images_root,
        thumbnails=thumbnails and images_root is not None,
        dataset_name="coco-mini (synthetic embeddings)" if images_root else "synthetic",
        settings={"seed": seed, "synthetic": True},
        gpa_stop=gpa_stop,
    )


def make_synthetic_run(
    tmp_path: str | os.PathLike[str],
    n: int = 60,
    *,
    plant: str = "layer_peak",
    vision_models: Sequence[str] = VISION_MODELS,
    language_models: Sequence[str] = LANGUAGE_MODELS,
    n_language_layers: int = 4,
    n_vision: int = 3,
    seed: int = 0,
    images: bool = True,
    thumbnails: bool = True,
    name: str = "synthetic",
    gpa_stop: str = "optimum",
) -> Run:
    """Write and load a run of ``n`` stimuli under ``tmp_path/name`` (``gpa_stop`` as in
    ``write_run_from_embeddings``).

    ``plant`` picks the embeddings (module docstring): ``"layer_peak"`` uses ``vision_models``,
    ``language_models`` and ``n_language_layers`` (defaults: 3 vision models with layers
    ``stage1``, ``stage2``, GPA on ``stage2``; 2 language models with ``layer0..layer3``);
    ``"quiet_half"`` uses ``n_vision`` (models ``vision0..``, language models ``planted`` and
    ``independent``). With ``images`` and ``n <= 239`` the stimuli are the first ``n`` real
    coco-mini images with their captions (so ``image_path`` and, with ``thumbnails=True``,
    ``thumbnail_path`` point at real files); otherwise the run has no images. ``stimuli`` gets an
    extra ``planted_noise`` column, so a test can check that dispersion recovers it.
    """
    if plant == "layer_peak":
        embeddings, noise = synthetic_embeddings(
            n,
            vision_models=vision_models,
            language_models=language_models,
            n_language_layers=n_language_layers,
            seed=seed,
        )
        defaults: dict[str, str] | None = {model: "stage2" for model in vision_models}
        defaults.update({model: f"layer{n_language_layers - 1}" for model in language_models})
    elif plant == "quiet_half":
        embeddings, noise = quiet_half_embeddings(n, n_vision=n_vision, seed=seed)
        vision_models = [f"vision{i}" for i in range(n_vision)]
        language_models, defaults = ["planted", "independent"], None
    else:
        raise ValueError(f"unknown plant {plant!r}; use 'layer_peak' or 'quiet_half'")
    return _write(
        Path(tmp_path) / name,
        embeddings,
        noise,
        vision_models=vision_models,
        language_models=language_models,
        default_layers=defaults,
        images=images,
        thumbnails=thumbnails,
        seed=seed,
        gpa_stop=gpa_stop,
    )


def make_rotation_run(path: Path, n: int = 60, *, seed: int = 1) -> tuple[Run, np.ndarray]:
    """A quiet-half run whose extra vision model ``copy`` is ``vision0`` times a random orthogonal
    matrix. Returns the run (at ``path``; no images) and that matrix.

    Vision models: vision0, vision1, vision2, copy.
    """
    embeddings, noise = quiet_half_embeddings(n, n_vision=3, seed=seed)
    rng = np.random.default_rng(seed + 100)
    base = embeddings["vision0"]["final"]
    rotation, _ = np.linalg.qr(rng.standard_normal((base.shape[1], base.shape[1])))
    embeddings["copy"] = {"final": base @ rotation}
    run = _write(
        Path(path),
        embeddings,
        noise,
        vision_models=["vision0", "vision1", "vision2", "copy"],
        language_models=["planted", "independent"],
        default_layers=None,
        images=False,
        thumbnails=False,
        seed=seed,
    )
    return run, rotation


def add_properties(run: Run, extra: Mapping[str, Sequence[object]] | None = None) -> Run:
    """Compute and write the run's property table the way the precompute does (image properties
    when the run has images, caption statistics, typicality and centroid distance of every vision
    model at its GPA layer, the stimulus table's own columns, plus ``extra`` columns ``{name: n values}``); no
    caption agreement (that needs a language model). Returns the run loaded again."""
    from convergence_core import properties as props
    from convergence_core.run import load_run
    from convergence_core.run_writer import write_properties

    stimuli = run.stimuli.copy()
    for name, values in (extra or {}).items():
        stimuli[name] = list(values)
    image = None
    if run.images_root is not None:
        image = props.image_properties([run.image_path(r) for r in range(run.n_stimuli)])
    k = min(props.TYPICALITY_K, run.n_stimuli - 1)
    distances = {
        model: props.neighbour_distance(
            props.nearest_similarities(run.embeddings[model][run.default_layer(model)], k), k
        )
        for model in run.vision_models
    }
    centroid = {
        model: props.centroid_distance(run.embeddings[model][run.default_layer(model)])
        for model in run.vision_models
    }
    table = props.assemble_properties(
        stimuli, image=image, distances=distances, centroid_distances=centroid
    )
    write_properties(run.layout, table.values, table.info)
    return load_run(run.path)


def make_brain_run(
    path: str | os.PathLike[str],
    n: int = 40,
    *,
    images: bool = False,
    seed: int = 5,
    language_models: Sequence[str] = (),
    subject: str = "subj01",
) -> Run:
    """Write and load a run of ``n`` stimuli at ``path``: the three vision models of
    :func:`synthetic_embeddings` (GPA on ``stage2``), its ``language_models`` (none by default)
    and one 'subject' (named ``subject``) of modality ``brain`` with two regions, ``V1`` (a
    noisy copy of vision-a's features, so it aligns with vision-a) and ``hV4`` (noise).
    ``images``: real coco-mini images and thumbnails (n ≤ 239)."""
    embeddings, noise = synthetic_embeddings(n, language_models=language_models, seed=seed)
    rng = np.random.default_rng(seed)
    source = embeddings["vision-a"]["stage2"]
    embeddings[subject] = {
        "V1": source + 0.3 * rng.standard_normal(source.shape).astype(np.float32),
        "hV4": rng.standard_normal((n, 24)).astype(np.float32),
    }
    stimuli, images_root = _stimuli(n, images)
    stimuli["planted_noise"] = noise
    return write_run_from_embeddings(
        path, stimuli, embeddings, vision_models=list(VISION_MODELS),
        language_models=list(language_models), modalities={subject: "brain"},
        default_layers={m: "stage2" for m in VISION_MODELS},
        images_root=images_root, thumbnails=images_root is not None,
        dataset_name="synthetic vision + brain",
    )
