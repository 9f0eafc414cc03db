"""Batched, deterministic embedding extraction: items in, one (n, d) float32 array per layer out.

Vision items are image paths (opened with :func:`images.open_rgb`); language items are strings.
Row ``i`` of every output array belongs to ``items[i]``.

The GPU path: ``precision`` (:data:`PRECISIONS`) picks the weights' dtype and an autocast dtype
per modality (:func:`precision_plan`); on CUDA the prepared image batches sit in pinned host memory
so the copy to the device overlaps the next batch's decoding; :func:`fit_batch_size` measures how
many items fill a share of the device's free memory. Every one of these is a no-op on CPU except
an explicit ``float16`` / ``bfloat16`` precision, which runs CPU autocast (how the tolerance to
float32 is tested without a GPU).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .images import open_rgb, to_rgb
from .models.base import Encoder, VisionEncoder

__all__ = [
    "CAPTION_MODES",
    "DEFAULT_BATCH_SIZE",
    "PRECISIONS",
    "PRECISION_TOLERANCE",
    "PrecisionPlan",
    "autocast_context",
    "captions_for_language",
    "check_precision",
    "extract_embeddings",
    "fit_batch_size",
    "forward_dtype",
    "pin_for_device",
    "pool_captions",
    "precision_plan",
    "warn_truncated",
]

#: how a stimulus with several captions becomes one language embedding
CAPTION_MODES = ("first", "mean")

#: numeric precision of the forward pass (see :func:`precision_plan`)
PRECISIONS = ("auto", "float32", "float16", "bfloat16")

#: the batch size ``batch_size="auto"`` means where there is no device memory to fill (CPU)
DEFAULT_BATCH_SIZE = 32

#: stated tolerance of each reduced precision against float32, per row of every layer:
#: (minimum cosine similarity, maximum relative L2 error). Measured with CPU autocast on 40
#: coco-mini stimuli (EfficientNet-Lite0 / Lite2 at their trained input scale, all layers:
#: float16 0.99946 / 3.3 % and 0.99937 / 3.6 %, bfloat16 0.974 / 26 % and 0.962 / 34 %, worst
#: at stage_0, the pooled output of the first stage; MiniLM: float16 0.999999 / 0.14 %,
#: bfloat16 0.99994 / 1.1 %); tested in tests/test_ray_engine.py. bfloat16 keeps 8 mantissa
#: bits, so early conv layers move most: for EfficientNet's first stages use float32 or float16.
#: These hold for models whose activations stay inside float16's range (largest finite value
#: 65,504); they are no promise for every model: Gemma-3-270M's residual stream reaches ~1e5, so
#: at float16 its layers 08-18 overflow to inf/NaN, which ``extract_embeddings`` refuses (use
#: bfloat16, which has float32's range, or float32).
PRECISION_TOLERANCE = {"float16": (0.999, 0.05), "bfloat16": (0.95, 0.40)}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    return str(precision)


@dataclass(frozen=True)
class PrecisionPlan:
    """How a model runs at a precision.

    Attributes:
        load_dtype: the ``dtype`` passed to ``models.load_encoder`` (None: the loader's default,
            i.e. float16 autocast for vision models on CUDA, float32 otherwise).
        autocast: the dtype of ``torch.autocast`` around every forward pass (None: no autocast).
    """

    load_dtype: torch.dtype | None
    autocast: torch.dtype | None


def precision_plan(precision: str, modality: str) -> PrecisionPlan:
    """The weights' dtype and the autocast dtype for ``precision`` and a model's ``modality``.

    - ``"auto"``: the loaders' defaults (vision: float16 autocast on CUDA, float32 on CPU;
      language: float32 weights), unchanged from before precisions existed.
    - ``"float32"``: float32 weights, no autocast, on every device.
    - ``"float16"`` / ``"bfloat16"``: vision models keep float32 weights and run under autocast of
      that dtype; language models load their weights in that dtype (half the memory: what lets a
      13-65 B model fit on a GPU) and also run under autocast. Pooling stays float64 and outputs
      float32 (``LanguageEncoder``, ``VisionEncoder``).

    For language models prefer ``"bfloat16"``: float16 stops at 65,504, and decoder LLMs' hidden
    states (the un-normalised residual stream of every block) can exceed it; Gemma-3-270M does
    (inf/NaN from layer 08 on at float16). ``extract_embeddings`` stops at the first batch with a
    non-finite value, naming the model, layers and precision; bfloat16 has float32's range.
    """
    check_precision(precision)
    if modality not in ("vision", "language"):
        raise ValueError(f"modality must be 'vision' or 'language', got {modality!r}")
    if precision == "auto":
        return PrecisionPlan(None, None)
    if precision == "float32":
        return PrecisionPlan(torch.float32, None)
    dtype = _TORCH_DTYPES[precision]
    return PrecisionPlan(torch.float32 if modality == "vision" else dtype, dtype)


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` on ``device``'s type with ``dtype``, or a null context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"autocast is not available on device type {device_type!r}")
    return torch.autocast(device_type=device_type, dtype=dtype)


def pin_for_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` in pinned (page-locked) host memory when it is bound for a CUDA device, so
    ``.to(device, non_blocking=True)`` copies asynchronously; unchanged for any other device."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return tensor.pin_memory()
    return tensor


def fit_batch_size(
    encoder: Encoder,
    sample: Sequence[Any],
    *,
    fraction: float = 0.8,
    maximum: int = 1024,
    probe: int = 8,
    memory: Callable[[], tuple[int, int]] | None = None,
    peak: Callable[[Callable[[], Any]], int] | None = None,
) -> int:
    """The batch size that fills ``fraction`` of the device's free memory (a power of two).

    On CUDA: run one probe batch of ``probe`` items from ``sample``, measure the peak memory it
    allocates beyond the model, and scale: ``batch = fraction * free / (peak / probe)``, rounded
    down to a power of two, clipped to ``[1, maximum]``. On CPU (where a larger batch only costs
    cache misses) it returns :data:`DEFAULT_BATCH_SIZE`.

    ``memory() -> (free_bytes, total_bytes)`` and ``peak(run) -> bytes`` default to
    ``torch.cuda.mem_get_info`` and ``torch.cuda.max_memory_allocated`` around ``run()``; tests
    pass their own to check the arithmetic on CPU.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1:
        raise ValueError(f"maximum must be a positive integer, got {maximum!r}")
    device = getattr(encoder, "device", torch.device("cpu"))
    if memory is None and torch.device(device).type != "cuda":
        return min(DEFAULT_BATCH_SIZE, maximum)
    items = list(sample)[: max(1, probe)]
    if not items:
        raise ValueError("fit_batch_size needs at least one sample item to measure")
    if memory is None:
        memory = lambda: torch.cuda.mem_get_info(device)
    if peak is None:

        def peak(run: Callable[[], Any]) -> int:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run()
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - base)

    used = peak(lambda: extract_embeddings(encoder, items, batch_size=len(items)))
    free, _total = memory()
    per_item = max(used, 1) / len(items)
    fitted = int(fraction * free / per_item)
    if fitted < 1:
        return 1
    power = 1 << (fitted.bit_length() - 1)
    return max(1, min(power, maximum))

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
    autocast: torch.dtype | None = None,
    by_length: bool = False,
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
        autocast: run every forward pass under ``torch.autocast`` with this dtype on the
            encoder's device (``precision_plan(...).autocast``); None: as the encoder is.

        by_length: captions only: batch them in order of length (characters; stable), so that a
            batch pads its captions to similar token counts; the rows still come back in input
            order. A model's cost is per padded token: on the demo's 1,195 captions Gemma-3-270M
            took 35.8 s instead of 47.2 s; the embeddings agree to float32 rounding (2.9e-5 apart
            on values up to 61), caption agreement to 7e-8.

    Batch ``k`` holds ``items[k*batch_size:(k+1)*batch_size]`` (of the length order with
    ``by_length``). On CUDA, image batches are prepared (decoded, resized, stacked) on a helper
    thread into pinned host memory while the previous batch runs on the device.

    A language encoder cuts captions at its ``max_tokens``; a UserWarning then says, once per
    call, how many it cut and at what length.

    Every batch's kept layers are checked as soon as it is embedded: a value that is not finite
    (inf or NaN) stops the extraction with a ValueError naming the model, the layers, the first
    such item, the precision the model ran at and the cure (float16 overflows past 65,504: run at
    bfloat16 or float32; in float32 the model or its weights give the non-finite values).

    Raises:
        ValueError: empty ``items``, bad ``batch_size``, unknown layer, an unusable item, or a
        non-finite embedding.
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
    if by_length:
        if encoder.modality != "language":
            raise ValueError(
                f"by_length orders captions; {encoder.name!r} is a {encoder.modality} model, "
                "embed its items with by_length=False"
            )
        _load_items(encoder, items)  # strings, or the usual error before any sorting
        order = np.argsort([len(item) for item in items], kind="stable")
        ordered = extract_embeddings(
            encoder, [items[i] for i in order], batch_size=batch_size, progress=progress,
            layers=layers, root=root, autocast=autocast,
        )
        for values in ordered.values():
            values[order] = values.copy()
        return ordered
    device = getattr(encoder, "device", torch.device("cpu"))
    if isinstance(encoder, VisionEncoder):
        # decode + resize on a helper thread (PIL releases the GIL) while the model runs
        def prepare(chunk: Sequence[Any]) -> Any:
            batch = encoder.preprocess(
                [to_rgb(im) for im in _load_items(encoder, chunk, root)]
            )
            return pin_for_device(batch, device)

        run: Callable[[Any], dict[str, np.ndarray]] = encoder.encode_tensor
    else:

        def prepare(chunk: Sequence[Any]) -> Any:
            return _load_items(encoder, chunk, root)

        run = encoder.encode
    starts = list(range(0, total, batch_size))
    outputs: dict[str, np.ndarray] = {}
    truncated_before = getattr(encoder, "truncated_captions", 0)
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=1) as loader:
        pending = loader.submit(prepare, items[0:batch_size])
        for position, start in enumerate(starts):
            prepared = pending.result()
            if position + 1 < len(starts):
                nxt = starts[position + 1]
                pending = loader.submit(prepare, items[nxt : nxt + batch_size])
            with autocast_context(device, autocast):
                result = run(prepared)
            count = min(batch_size, total - start)
            _store(encoder, result, keep, outputs, start, count, total)
            _check_finite(encoder, outputs, keep, items[start : start + count], start, autocast)
            if progress is not None:
                progress(min(start + batch_size, total), total)
    cut = getattr(encoder, "truncated_captions", 0) - truncated_before
    warn_truncated(encoder.name, cut, total, getattr(encoder, "max_tokens", None))
    return outputs


def warn_truncated(model: str, cut: int, total: int, max_tokens: Any) -> None:
    """One warning for the ``cut`` of ``total`` captions that ``model`` truncated."""
    if cut > 0:
        warnings.warn(
            f"{model}: {cut} of {total} captions are longer than {max_tokens} tokens and were cut "
            "to that length (captions that differ only after it embed alike); shorten them to "
            "keep every word",
            stacklevel=3,
        )


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


def forward_dtype(encoder: Encoder, autocast: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``encoder``'s forward pass computes in: ``autocast`` when given, float16 for a
    vision encoder's own CUDA autocast (``half``), else its weights' floating dtype (float32 when
    it has none to inspect)."""
    if autocast is not None:
        return autocast
    if getattr(encoder, "half", False):
        return torch.float16
    for attribute in ("model", "module"):
        module = getattr(encoder, attribute, None)
        if isinstance(module, torch.nn.Module):
            for parameter in module.parameters():
                if parameter.is_floating_point():
                    return parameter.dtype
    return torch.float32


def _check_finite(
    encoder: Encoder,
    outputs: dict[str, np.ndarray],
    keep: Sequence[str],
    batch: Sequence[Any],
    start: int,
    autocast: torch.dtype | None,
) -> None:
    """Raise a ValueError when rows ``start:start+len(batch)`` of ``outputs`` are not finite."""
    stop = start + len(batch)
    bad_layers: list[str] = []
    bad_rows = np.zeros(len(batch), dtype=bool)
    for layer in keep:
        finite = np.isfinite(outputs[layer][start:stop]).all(axis=1)
        if not finite.all():
            bad_layers.append(layer)
            bad_rows |= ~finite
    if not bad_layers:
        return
    first = batch[int(np.flatnonzero(bad_rows)[0])]
    if isinstance(first, str) and encoder.modality == "language":  # a caption: its start
        shown = repr(first) if len(first) <= 80 else repr(first[:77] + "...")
    elif isinstance(first, str | os.PathLike):  # an image path: its end (the file name)
        path = os.fspath(first)
        shown = repr(path) if len(path) <= 80 else repr("..." + path[-77:])
    else:
        shown = f"a {type(first).__name__}"
    dtype = forward_dtype(encoder, autocast)
    precision = str(dtype).removeprefix("torch.")
    what = (
        f"model {encoder.name!r} gave non-finite values (inf/NaN) at precision {precision} in "
        f"layer(s) {', '.join(bad_layers)} for {int(bad_rows.sum())} of the {len(batch)} items of "
        f"a batch (first: {shown})"
    )
    if dtype == torch.float16:
        cure = (
            "its activations exceed float16's range (largest finite value 65,504) and overflow; "
            "run it at --precision bfloat16 (float32's range at half the memory) or float32 "
            "(precision='bfloat16' or 'float32' in Python)"
        )
    elif dtype == torch.bfloat16:
        cure = (
            "bfloat16 has float32's range, so this is rarely overflow; try --precision float32 "
            "(precision='float32' in Python), and if that fails too, check the model's weights"
        )
    else:
        cure = (
            "not a reduced-precision overflow: the model itself gives undefined values for this "
            "input (check its weights file, e.g. a damaged or wrongly converted checkpoint)"
        )
    raise ValueError(f"{what}; the extraction stopped there: {cure}")


def captions_for_language(
    stimuli: pd.DataFrame, mode: str = "first"
) -> tuple[list[str], np.ndarray]:
    """The captions to embed for each stimulus, and which stimulus each belongs to.

    ``mode="first"``: one caption per stimulus (its first). ``mode="mean"``: every caption of every
    stimulus; the per-stimulus embedding is then the mean of its captions' embeddings (see
    :func:`pool_captions`).

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


def pool_captions(
    per_text: dict[str, np.ndarray], owner: np.ndarray, n_stimuli: int
) -> dict[str, np.ndarray]:
    """Per-stimulus rows from per-caption rows: ``{layer: (n_texts, d)}`` -> ``{layer: (n, d)}``.

    ``owner`` (n_texts,) int is each caption's stimulus row (from :func:`captions_for_language`).
    One caption per stimulus in order (``owner == arange(n)``): the arrays are returned as they
    are. Otherwise each stimulus's row is the float64 mean of its captions' rows, cast to
    float32. Every stimulus needs at least one caption.
    """
    owner = np.asarray(owner, dtype=np.int64)
    if owner.ndim != 1 or (owner.size and (owner.min() < 0 or owner.max() >= n_stimuli)):
        raise ValueError(f"owner must be stimulus rows in [0, {n_stimuli}), one per caption")
    counts = np.bincount(owner, minlength=n_stimuli).astype(np.float64)[:, None]
    if (counts == 0).any():
        missing = np.flatnonzero(counts[:, 0] == 0)[:5].tolist()
        raise ValueError(
            f"stimulus rows {missing} have no caption embedding; every stimulus needs one"
        )
    if owner.size == n_stimuli and np.array_equal(owner, np.arange(n_stimuli)):
        return per_text
    result: dict[str, np.ndarray] = {}
    for layer, values in per_text.items():
        sums = np.zeros((n_stimuli, values.shape[1]), dtype=np.float64)
        np.add.at(sums, owner, values.astype(np.float64))
        result[layer] = (sums / counts).astype(np.float32)
    return result
