"""Batched, deterministic embedding extraction: items in, one (n, d) float32 array per layer out.

Vision items are image paths (opened with :func:`images.open_rgb`); language items are strings.
Row ``i`` of every output array belongs to ``items[i]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from .images import open_rgb
from .models.base import Encoder, VisionEncoder

__all__ = [
    "CAPTION_MODES",
    "captions_for_language",
    "extract_caption_embeddings",
    "extract_embeddings",
]

#: how a stimulus with several captions becomes one language embedding
CAPTION_MODES = ("first", "mean")

Progress = Callable[[int, int], None]


def _load_items(encoder: Encoder, chunk: Sequence[Any], root: Any = None) -> list[Any]:
    if encoder.modality == "vision":
        return [
            open_rgb(item, root=root) if isinstance(item, str | os.PathLike) else item
            for item in chunk
        ]
    for item in chunk:
        if not isinstance(item, str):
            raise ValueError(
                f"language model {encoder.name!r} needs strings, got {type(item).__name__}; "
                "pass captions (e.g. captions_for_language(stimuli))"
            )
    return list(chunk)


def extract_embeddings(
    encoder: Encoder,
    items: Sequence[Any],
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
    layers: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """Embed ``items`` in batches: ``{layer: (n, d_layer) float32}`` with rows in input order.

    Args:
        encoder: a loaded :class:`~convergence_core.models.Encoder`.
        items: image paths (or PIL images) for a vision encoder, strings for a language encoder.
        batch_size: items per forward pass (>= 1).
        progress: called as ``progress(done, total)`` after every batch (and once with 0 first).
        layers: keep only these layers (default: all of ``encoder.layers``).
        root: image paths must stay inside this folder once symbolic links are resolved
            (``images.open_rgb``); None: no containment check.

    Raises:
        ValueError: empty ``items``, bad ``batch_size``, unknown layer, or an unusable item.
    """
    items = list(items)
    total = len(items)
    if total == 0:
        raise ValueError("no items to embed; the dataset is empty (check its filters)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    keep = list(encoder.layers if layers is None else layers)
    unknown = [layer for layer in keep if layer not in encoder.layers]
    if unknown:
        raise ValueError(
            f"model {encoder.name!r} has no layer(s) {unknown}; its layers are {encoder.layers}"
        )
    if isinstance(encoder, VisionEncoder):
        # decode + resize on a helper thread (PIL releases the GIL) while the model runs
        def prepare(chunk: Sequence[Any]) -> Any:
            return encoder.preprocess(
                [im.convert("RGB") for im in _load_items(encoder, chunk, root)]
            )

        run: Callable[[Any], dict[str, np.ndarray]] = encoder.encode_tensor
    else:

        def prepare(chunk: Sequence[Any]) -> Any:
            return _load_items(encoder, chunk, root)

        run = encoder.encode
    starts = list(range(0, total, batch_size))
    outputs: dict[str, np.ndarray] = {}
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=1) as loader:
        pending = loader.submit(prepare, items[0:batch_size])
        for position, start in enumerate(starts):
            prepared = pending.result()
            if position + 1 < len(starts):
                nxt = starts[position + 1]
                pending = loader.submit(prepare, items[nxt : nxt + batch_size])
            _store(
                encoder, run(prepared), keep, outputs, start, min(batch_size, total - start), total
            )
            if progress is not None:
                progress(min(start + batch_size, total), total)
    return outputs


def _store(
    encoder: Encoder,
    batch: dict[str, np.ndarray],
    keep: Sequence[str],
    outputs: dict[str, np.ndarray],
    start: int,
    count: int,
    total: int,
) -> None:
    """Copy one batch's rows ``start:start+count`` into the (total, d) output arrays."""
    for layer in keep:
        values = np.asarray(batch[layer], dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != count:
            raise RuntimeError(
                f"{encoder.name}: layer {layer} gave shape {values.shape} for {count} items"
            )
        if layer not in outputs:
            outputs[layer] = np.empty((total, values.shape[1]), dtype=np.float32)
        outputs[layer][start : start + count] = values


def captions_for_language(
    stimuli: pd.DataFrame, mode: str = "first"
) -> tuple[list[str], np.ndarray]:
    """The captions to embed for each stimulus, and which stimulus each belongs to.

    ``mode="first"``: one caption per stimulus (its first). ``mode="mean"``: every caption of every
    stimulus; the per-stimulus embedding is then the mean of its captions' embeddings (see
    :func:`extract_caption_embeddings`).

    Returns:
        ``(texts, owner)``: ``texts`` list[str]; ``owner`` (len(texts),) int64, the stimulus row of
        each text, non-decreasing.

    Raises:
        ValueError: unknown mode, a stimulus without any caption (with its id), or a caption to
        embed that is not valid Unicode text (a lone surrogate).
    """
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption mode must be one of {CAPTION_MODES}, got {mode!r}")
    texts: list[str] = []
    owner: list[int] = []
    for row, (sid, caps) in enumerate(stimuli[["id", "captions"]].itertuples(index=False)):
        caps = [c for c in caps if isinstance(c, str) and c.strip()]
        if not caps:
            raise ValueError(
                f"stimulus {sid!r} has no caption; run check_dataset(..., drop_bad=True) first"
            )
        for caption in caps if mode == "mean" else caps[:1]:
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:
                shown = str(sid).encode("utf-8", "backslashreplace").decode("utf-8")
                raise ValueError(
                    f"a caption of stimulus {shown!r} is not valid Unicode text (a lone surrogate "
                    "such as \\ud800), which no tokenizer can read; run check_dataset(..., "
                    "drop_bad=True) (precompute --drop-bad) to drop it, or fix the caption"
                ) from None
        chosen = caps[:1] if mode == "first" else caps
        texts.extend(chosen)
        owner.extend([row] * len(chosen))
    return texts, np.asarray(owner, dtype=np.int64)


def extract_caption_embeddings(
    encoder: Encoder,
    stimuli: pd.DataFrame,
    *,
    mode: str = "first",
    batch_size: int = 32,
    progress: Progress | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-stimulus language embeddings: ``{layer: (n_stimuli, d) float32}``.

    With ``mode="mean"`` each stimulus's row is the float64 mean of its captions' embeddings
    (each caption mean-pooled over its tokens first), cast to float32.
    """
    texts, owner = captions_for_language(stimuli, mode)
    per_text = extract_embeddings(
        encoder, texts, batch_size=batch_size, progress=progress, layers=layers
    )
    if mode == "first":
        return per_text
    n = len(stimuli)
    counts = np.bincount(owner, minlength=n).astype(np.float64)[:, None]
    result: dict[str, np.ndarray] = {}
    for layer, values in per_text.items():
        sums = np.zeros((n, values.shape[1]), dtype=np.float64)
        np.add.at(sums, owner, values.astype(np.float64))
        result[layer] = (sums / counts).astype(np.float32)
    return result
