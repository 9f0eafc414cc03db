"""Every caption of every stimulus, embedded by a run's language model, cached in the run folder.

A run stores one language embedding per stimulus: its first caption's, or the mean of its
captions' (the precompute's ``caption_mode``). The many-to-many analysis of paper 004 (one caption
per image vs the mean of all its captions; COCO has five) needs each caption's own embedding, so
:func:`embed_captions` embeds them once — it loads the language model, which is why the report
does it only when asked (``report --embed-captions``) — and caches one file per model × layer:

    <run>/captions/<model key>/<layer key>.npy    (m, d) float32 raw embeddings, one row per caption
    <run>/captions/<model key>/<layer key>.json   model, layer, weights_id, captions_sha256,
                                                  n_captions, n_stimuli, first_caption_difference

each written atomically (the ``.json`` last: a layer without it is not cached). The precompute
writes them too, for every extracted layer, when it embeds every caption anyway (caption
agreement) and they are small (``engines.CAPTION_CACHE_BYTES``): the demo's report then embeds
nothing. Captions and
their order are ``extract.captions_for_language(stimuli, "mean")``: every non-empty caption,
stimulus by stimulus; ``owners[c]`` is caption c's stimulus row. A cached file whose captions,
weights or shape no longer match the run is ignored (:func:`cached_caption_embeddings` returns
None) and rewritten by the next :func:`embed_captions`.

Weights: the encoder loads with the weights path given to :func:`embed_captions` (``weights=``,
the report's ``--weights MODEL=PATH``), else the one the run's manifest records
(``settings.weights``, the precompute's ``--weights``) only where it lies inside the cache's model
folder or the data folder once symbolic links are resolved (:func:`manifest_weights`): a run
folder can be altered (and lies in the cache itself), and nothing outside those is read because
of what it says.

``first_caption_difference``: for a run made with ``caption_mode="first"``, the largest absolute
difference between each stimulus's first-caption row here and the run's stored embedding,
relative to the largest absolute stored value — about 1e-6 when both came from the same weights
(batches pad differently), so the one-caption side of the comparison is the run's own.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .cache import CacheFormatError, read_json, read_npy, write_json, write_npy
from .extract import captions_for_language, extract_embeddings
from .images import ImageFileError, resolve_inside

if TYPE_CHECKING:
    from .manifest import ModelEntry
    from .models.base import Encoder
    from .run import Run

__all__ = [
    "CaptionEmbeddings",
    "cached_caption_embeddings",
    "caption_texts",
    "embed_captions",
    "manifest_weights",
    "write_caption_embeddings",
]


class CaptionEmbeddings(NamedTuple):
    """Raw embeddings of every caption at one layer: ``features`` (m, d) float32 and ``owners``
    (m,) int64, the stimulus row of each caption (non-decreasing)."""

    model: str
    layer: str
    features: np.ndarray
    owners: np.ndarray


def caption_texts(run: Run) -> tuple[list[str], np.ndarray]:
    """Every caption of the run's stimuli in order, and each caption's stimulus row."""
    if "captions" not in run.stimuli.columns:
        raise ValueError(f"run {run.name!r} has no captions; many-to-many needs captioned stimuli")
    return captions_for_language(run.stimuli, "mean")


def _fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _paths(run: Run, model: str, layer: str) -> tuple[Path, Path]:
    entry = run.manifest.models.get(model)
    if entry is None or entry.modality != "language":
        raise ValueError(
            f"{model!r} is not a language model of run {run.name!r}; choose one of "
            f"{run.language_models}"
        )
    if layer not in entry.layer_keys:
        raise ValueError(f"{layer!r} is not a layer of {model!r}; choose one of {entry.layers}")
    return run.layout.caption_embedding(entry.key, entry.layer_keys[layer])


def write_caption_embeddings(
    layout: Any,
    model: str,
    entry: Any,
    texts: Sequence[str],
    owners: np.ndarray,
    features: Mapping[str, np.ndarray],
    stored: Mapping[str, np.ndarray] | None = None,
) -> dict[str, CaptionEmbeddings]:
    """Cache every caption's embedding of a language model at each layer of ``features``.

    Args:
        layout: the run's ``cache.RunLayout``; model: the language model's name; entry: its
            ``manifest.ModelEntry``.
        texts, owners: ``caption_texts`` of the run (every caption, and its stimulus row).
        features: ``{layer: (len(texts), d) float}`` raw embeddings, rows in caption order.
        stored: ``{layer: (n_stimuli, d)}`` the run's own embeddings when it was made with
            ``caption_mode="first"`` (for ``first_caption_difference``); None otherwise.
    """
    owners = np.asarray(owners)
    first_rows = np.searchsorted(owners, np.arange(int(owners.max(initial=-1)) + 1))
    written = {}
    for layer, array in features.items():
        array = np.asarray(array, dtype=np.float32)
        if array.shape != (len(texts), entry.dims.get(layer, -1)):
            raise ValueError(
                f"caption embeddings of {model!r} at {layer!r} have shape {array.shape}, "
                f"expected ({len(texts)}, {entry.dims.get(layer)}); embed every caption once "
                "(caption_texts) at that layer"
            )
        difference = None
        if stored is not None:
            reference = np.asarray(stored[layer], dtype=np.float64)
            scale = float(np.max(np.abs(reference))) or 1.0
            difference = float(np.max(np.abs(array[first_rows] - reference))) / scale
        array_path, meta_path = layout.caption_embedding(entry.key, entry.layer_keys[layer])
        write_npy(array_path, array)
        write_json(
            meta_path,
            {
                "model": model,
                "layer": layer,
                "weights_id": entry.weights_id,
                "captions_sha256": _fingerprint(texts),
                "n_captions": len(texts),
                "n_stimuli": int(first_rows.size),
                "first_caption_difference": difference,
            },
        )
        written[layer] = CaptionEmbeddings(model, layer, array, owners)
    return written


def cached_caption_embeddings(run: Run, model: str, layer: str) -> CaptionEmbeddings | None:
    """The cached caption embeddings of ``model`` × ``layer``, or None when absent or stale."""
    array_path, meta_path = _paths(run, model, layer)
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    texts, owners = caption_texts(run)
    try:
        meta = read_json(meta_path)
        features = read_npy(array_path, mmap=True)
    except (CacheFormatError, OSError):
        return None
    entry = run.manifest.models[model]
    if (
        not isinstance(meta, dict)
        or meta.get("captions_sha256") != _fingerprint(texts)
        or meta.get("weights_id") != entry.weights_id
        or features.ndim != 2
        or features.shape != (len(texts), entry.dims.get(layer, -1))
        or not np.issubdtype(features.dtype, np.floating)
    ):
        return None
    return CaptionEmbeddings(model, layer, features, owners)


def _source_words(entry: ModelEntry) -> str:
    """Where a model's features came from, in words (``a features file``, ``arrays``)."""
    source = entry.source
    return {"file": "a features file", "arrays": "arrays given to write_run_from_embeddings"}.get(
        source, f"source {source!r}"
    )


def embed_captions(
    run: Run,
    model: str,
    layers: Sequence[str],
    *,
    encoder: Encoder | None = None,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, CaptionEmbeddings]:
    """Embed every caption with ``model`` (loaded offline unless ``encoder`` is given) and cache
    the ``layers`` asked for; layers already cached are read, not recomputed.

    ``weights``: a local weights path to load ``model`` from (a file or model folder, as the
    precompute's ``--weights``); None: the manifest's, if :func:`manifest_weights` accepts it.

    Raises ValueError when the model is not one of the run's language models, when the manifest
    names weights outside the cache and the data folder (:func:`manifest_weights`), when the
    loaded weights differ from those the run was made with (``weights_id``), or (from the model
    registry) when the weights are not available offline.
    """
    layers = list(dict.fromkeys(layers))
    found = {layer: cached_caption_embeddings(run, model, layer) for layer in layers}
    missing = [layer for layer, cached in found.items() if cached is None]
    if not missing:
        return found  # type: ignore[return-value]
    entry = run.manifest.models[model]
    if encoder is None and not entry.from_encoder:
        raise ValueError(
            f"{model!r} came from {_source_words(entry)}, not from an encoder, so there is "
            "nothing to embed each caption with; pass the encoder that made those features "
            "(embed_captions(..., encoder=...)) to embed them"
        )
    texts, owners = caption_texts(run)
    if encoder is None:
        from .models import load_encoder

        if weights is None:
            weights = manifest_weights(run, model)
        encoder = load_encoder(model, device="cpu", weights=weights)
    if entry.weights_id is not None and encoder.weights_id != entry.weights_id:
        raise ValueError(
            f"the weights of {model!r} loaded now ({encoder.weights_id[:12]}…) are not those run "
            f"{run.name!r} was made with ({entry.weights_id[:12]}…); embed its captions with the "
            "same weights (the precompute's --weights), or recompute the run"
        )
    per_caption = extract_embeddings(
        encoder, texts, batch_size=batch_size, progress=progress, layers=missing, by_length=True
    )
    first_mode = run.manifest.settings.get("caption_mode", "first") == "first"
    found.update(
        write_caption_embeddings(
            run.layout, model, entry, texts, owners, per_caption,
            {layer: run.embeddings[model][layer] for layer in missing} if first_mode else None,
        )
    )
    return found  # type: ignore[return-value]


def manifest_weights(run: Run, model: str) -> str | None:
    """The weights path the run's manifest records for ``model`` (``settings.weights``), or None.

    The manifest is read, not trusted: its path is accepted only if, with symbolic links
    resolved, it lies inside the cache's model folder (``settings.cache_root() / "models"``, not
    the runs beside it: a run could carry the weights it names) or the data folder
    (``settings.data_root()``), by the rule that keeps a data set's images inside its root
    (``images.resolve_inside``). Raises ValueError naming the field and the fix otherwise, or
    when the field is not a {model: path} mapping.
    """
    from . import settings

    recorded = run.manifest.settings.get("weights")
    field = f"settings.weights in {run.layout.manifest}"
    if recorded is None:
        return None
    path = recorded.get(model) if isinstance(recorded, Mapping) else recorded
    if path is None:
        return None
    fix = (
        f"pass the weights of {model!r} yourself (report --weights {model}=PATH, or "
        "embed_captions(..., weights=PATH)), or rerun precompute with weights inside the cache "
        "or the data folder"
    )
    if not isinstance(recorded, Mapping) or not isinstance(path, str) or not path.strip():
        raise ValueError(
            f"the {field} is {str(recorded)[:80]!r}, not a {{model: weights path}} mapping; the "
            f"manifest was altered or damaged: {fix}"
        )
    # the cache's model folder, not the whole cache: a run folder lies in the cache too, and an
    # altered run could name weights it carries itself
    roots = (settings.cache_root() / "models", settings.data_root())
    for root in roots:
        try:
            resolved = resolve_inside(root, Path(path).expanduser())
        except ImageFileError:
            continue
        return str(resolved)  # the path checked is the path loaded
    raise ValueError(
        f"run {run.name!r} records {path[:200]!r} as the weights of {model!r} ({field}), "
        f"which lies outside the cache's model folder {roots[0]} and the data folder "
        f"{roots[1]}, so it is not read (a run folder can be altered); if those are the weights "
        f"the run was made with, {fix}"
    )


def first_caption_difference(run: Run, model: str, layer: str) -> float | None:
    """The ``first_caption_difference`` recorded with a cached layer (None if absent)."""
    _, meta_path = _paths(run, model, layer)
    try:
        value = read_json(meta_path).get("first_caption_difference")
    except (CacheFormatError, OSError, AttributeError):
        return None
    return None if value is None else float(value)
