"""Runs with planted structure for the analyses tests: the answer each analysis must give is known.

Every vision model sees a shared latent configuration ``Z`` (n, latent) through its own random
orthonormal map, plus isotropic noise whose size depends on the stimulus (``noise_level``): the
noisier a stimulus, the more the vision models disagree on it, so its GPA dispersion is high.

Language models:
- ``planted``: layers ``block0..block3``; ``block2`` is ``Z`` through a random map with little
  noise on the quieter half of the stimuli and much noise on the noisier half (it agrees with the
  vision consensus on low-dispersion stimuli only); ``block0`` is pure noise; ``block1`` and
  ``block3`` mix ``block2`` with noise, so ``block2`` is the best layer.
- ``independent``: Gaussian noise, independent of everything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from convergence_core.precompute import write_run_from_embeddings
from convergence_core.run import Run

LATENT_DIM = 6
PLANTED_BEST_LAYER = "block2"
_LAYER_MIX = {"block0": 0.0, "block1": 0.35, "block2": 1.0, "block3": 0.6}


def _orthonormal_map(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """(rows, columns) with orthonormal rows (rows <= columns)."""
    q, _ = np.linalg.qr(rng.standard_normal((columns, columns)))
    return q[:rows]


def _stimuli(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"s{i:03d}" for i in range(n)],
            "image": [f"img{i:03d}.jpg" for i in range(n)],
            "captions": [[f"caption of stimulus {i}"] for i in range(n)],
        }
    )


def planted_embeddings(
    n: int = 80, *, n_vision: int = 3, seed: int = 0
) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Embeddings ``{model: {layer: (n, d)}}`` and the per-stimulus noise level (n,)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, LATENT_DIM))
    noise_level = rng.permutation(np.linspace(0.02, 1.2, n))
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    for i in range(n_vision):
        width = 10 + 3 * i
        mapped = latent @ _orthonormal_map(rng, LATENT_DIM, width)
        noisy = mapped + noise_level[:, None] * rng.standard_normal((n, width))
        embeddings[f"vision{i}"] = {"final": noisy}
    quiet = noise_level <= np.median(noise_level)
    language_noise = np.where(quiet, 0.05, 3.0)
    width = 12
    aligned = latent @ _orthonormal_map(rng, LATENT_DIM, width)
    aligned = aligned + language_noise[:, None] * rng.standard_normal((n, width))
    embeddings["planted"] = {
        layer: mix * aligned + (1.0 - mix) * 2.0 * rng.standard_normal((n, width))
        for layer, mix in _LAYER_MIX.items()
    }
    embeddings["independent"] = {"final": rng.standard_normal((n, 9))}
    return embeddings, noise_level


def make_planted_run(path: Path, n: int = 80, *, n_vision: int = 3, seed: int = 0) -> Run:
    """Write the planted run described in the module docstring to ``path`` and load it."""
    embeddings, _ = planted_embeddings(n, n_vision=n_vision, seed=seed)
    vision = [f"vision{i}" for i in range(n_vision)]
    return write_run_from_embeddings(
        path,
        _stimuli(n),
        embeddings,
        vision_models=vision,
        language_models=["planted", "independent"],
        thumbnails=False,
    )


def make_rotation_run(path: Path, n: int = 60, *, seed: int = 1) -> tuple[Run, np.ndarray]:
    """A run whose vision model ``copy`` is ``vision0`` times a random orthogonal matrix.

    Returns the run and that matrix. Vision models: vision0, vision1, vision2, copy.
    """
    embeddings, _ = planted_embeddings(n, n_vision=3, seed=seed)
    rng = np.random.default_rng(seed + 100)
    base = embeddings["vision0"]["final"]
    rotation, _ = np.linalg.qr(rng.standard_normal((base.shape[1], base.shape[1])))
    embeddings["copy"] = {"final": base @ rotation}
    run = write_run_from_embeddings(
        path,
        _stimuli(n),
        embeddings,
        vision_models=["vision0", "vision1", "vision2", "copy"],
        language_models=["planted", "independent"],
        thumbnails=False,
    )
    return run, rotation
