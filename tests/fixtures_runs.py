"""Small runs with planted structure, for the tests of every page and analysis.

``make_synthetic_run(tmp_path, n=60)`` writes a complete run folder with
``write_run_from_embeddings`` in well under a second (plus ~5 ms per thumbnail) and returns it
loaded. Import it from any test::

    from tests.fixtures_runs import make_synthetic_run
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from convergence_core import settings
from convergence_core.datasets import load_coco
from convergence_core.precompute import write_run_from_embeddings
from convergence_core.run import Run

__all__ = ["COCO_MINI_SIZE", "make_synthetic_run", "synthetic_embeddings"]

#: number of images in the embedded demo set (coco-mini)
COCO_MINI_SIZE = 239

VISION_MODELS = ("vision-a", "vision-b", "vision-c")
LANGUAGE_MODELS = ("language-a", "language-b")
VISION_LAYERS = ("stage1", "stage2")
VISION_DIMS = (16, 20, 24)
LANGUAGE_DIMS = (12, 14)
LATENT_DIM = 8


def _orthonormal_rows(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """(k, d) matrix with orthonormal rows: an isometric embedding of R^k into R^d."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T


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


def make_synthetic_run(
    tmp_path: str | os.PathLike[str],
    n: int = 60,
    *,
    vision_models: Sequence[str] = VISION_MODELS,
    language_models: Sequence[str] = LANGUAGE_MODELS,
    n_language_layers: int = 4,
    seed: int = 0,
    thumbnails: bool = True,
    name: str = "synthetic",
) -> Run:
    """Write and load a run of ``n`` stimuli under ``tmp_path/name``.

    For ``n <= 239`` the stimuli are the first ``n`` real coco-mini images with their captions
    (so ``image_path`` and, with ``thumbnails=True``, ``thumbnail_path`` point at real files);
    for larger ``n`` the run has no images (``image_path`` returns None, no thumbnails).
    ``stimuli`` gets an extra ``planted_noise`` column (see :func:`synthetic_embeddings`), so a
    test can check that dispersion recovers it. Defaults: 3 vision models (layers ``stage1``,
    ``stage2``; GPA on ``stage2``) and 2 language models with layers ``layer0..layer3``.
    """
    embeddings, noise = synthetic_embeddings(
        n,
        vision_models=vision_models,
        language_models=language_models,
        n_language_layers=n_language_layers,
        seed=seed,
    )
    if n <= COCO_MINI_SIZE:
        dataset = load_coco(settings.demo_data_root())
        stimuli = dataset.stimuli.iloc[:n].reset_index(drop=True).copy()
        images_root: Path | None = dataset.root
    else:
        stimuli = pd.DataFrame(
            {
                "id": [f"s{i:05d}" for i in range(n)],
                "image": [f"synthetic/{i:05d}.jpg" for i in range(n)],
                "captions": [[f"synthetic stimulus {i}"] for i in range(n)],
            }
        )
        images_root = None
    stimuli["planted_noise"] = noise
    defaults = {model: "stage2" for model in vision_models}
    defaults.update({model: f"layer{n_language_layers - 1}" for model in language_models})
    return write_run_from_embeddings(
        Path(tmp_path) / name,
        stimuli,
        embeddings,
        vision_models=list(vision_models),
        language_models=list(language_models),
        default_layers=defaults,
        images_root=images_root,
        thumbnails=thumbnails and images_root is not None,
        dataset_name="coco-mini (synthetic embeddings)" if images_root else "synthetic",
        settings={"seed": seed, "synthetic": True},
    )
