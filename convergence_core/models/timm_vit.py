"""timm vision models: the paper's ViTs (MAE, DINOv2, CLIP, CLIP+IN12k), other plain ViT-style timm
models, and any timm model without transformer blocks (one pooled layer).

Layers of a ViT (a timm model with ``.blocks`` and ``num_prefix_tokens``): ``block_00`` ..
``block_NN``, the CLS token (token 0) of each transformer block's output, before the final norm. A
ViT without a class token gives the mean of its patch tokens instead. Default layer: the
penultimate block, as in the paper. This needs blocks that each return one ``(B, prefix tokens +
patches, d)`` tensor with the class token at 0: timm's ``vision_transformer`` (``vit_*``, MAE,
DINOv2, CLIP, SigLIP), ``deit*``, ``beit*``, ``eva*`` / ``eva02_*``, the hybrid and relpos ViTs,
``vitamin_*`` and ``naflexvit_*`` do. Families whose ``.blocks`` carry only patch tokens (the class
token joins later: CaiT's ``blocks_token_only``, XCiT's ``cls_attn_blocks``, ConViT after its
``local_up_to_layer`` GPSA blocks) or return something else (TNT: (pixel, patch) tuples) are
refused rather than storing a patch token as "CLS": by name when the model is named
(:func:`check_timm_family`, before any weights are looked for or any model extracted), by their
attributes when the encoder is made (:func:`check_vit_blocks`), then by one blank image through
the model whose every block output must be a tensor of the prefix tokens + the patch embedding's
patches (checked on every forward).
Any other timm model (a CNN, ...) has one layer, ``pre_logits`` (``forward_head(...,
pre_logits=True)``). Preprocessing is timm's own eval transform for the model's data config.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import VisionEncoder
from .errors import UnknownModelError, WeightsUnavailableError, cause_lines, short_cause
from .weights import files_sha256, state_dict_sha256

__all__ = [
    "block_layer_names",
    "check_timm_family",
    "check_vit_blocks",
    "encoder_from_timm_model",
    "load_timm_encoder",
    "vit_default_layer",
]


def block_layer_names(depth: int) -> list[str]:
    """``["block_00", ..., f"block_{depth-1:02d}"]``."""
    return [f"block_{i:02d}" for i in range(depth)]


def vit_default_layer(depth: int) -> str:
    """The penultimate block's name (the only block when ``depth == 1``)."""
    return f"block_{max(depth - 2, 0):02d}"


def _is_vit(model: torch.nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (
        isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList)
        and len(blocks) > 0
        and (hasattr(model, "num_prefix_tokens"))
    )


#: plain ViT-style timm families whose blocks carry the class token (see the module docstring)
VIT_FAMILIES = "vit_*, deit*, beit*, eva* / eva02_*, vitamin_*, naflexvit_*"

#: (attribute, where the class token joins) of timm families whose ``.blocks`` are patch-only
_LATE_CLASS_TOKEN = (
    ("blocks_token_only", "the class-attention blocks `blocks_token_only` after `.blocks` (CaiT)"),
    ("cls_attn_blocks", "the class-attention blocks `cls_attn_blocks` after `.blocks` (XCiT)"),
)


def _refusal(name: str, why: str) -> ValueError:
    return ValueError(
        f"timm model {name!r} cannot give a class token per block: {why}. Use a plain ViT-style "
        "timm model, whose every block outputs (batch, prefix tokens + patches, width) with the "
        f"class token first ({VIT_FAMILIES})"
    )


#: timm modules whose models' ``.blocks`` do not carry the class token, and why: refused by name
#: when the model is named (:func:`check_timm_family`), before any weights are looked for or any
#: other model is extracted
_UNSUPPORTED_MODULES = {
    "cait": "its `.blocks` carry only the patch tokens; the class token joins in the "
    "class-attention blocks `blocks_token_only` after them (CaiT)",
    "xcit": "its `.blocks` carry only the patch tokens; the class token joins in the "
    "class-attention blocks `cls_attn_blocks` after them (XCiT)",
    "convit": "its first blocks carry only the patch tokens; the class token joins part-way "
    "through them, after the `local_up_to_layer` GPSA blocks (ConViT)",
    "tnt": "its blocks return (pixel, patch) token pairs, not one sequence with the class token "
    "first (TNT)",
}


def check_timm_family(name: str, timm_name: str) -> None:
    """Refuse, by name alone (nothing is built or downloaded), a timm model of a family whose
    blocks cannot give a class token per block: the family of ``timm_name`` (a timm model name,
    with or without a pretrained tag) is the timm module that defines it. Names timm does not
    know pass (they are refused where they are looked up). :func:`check_vit_blocks` and the
    block-output check still guard a model built from such a family under another name.

    Raises:
        ValueError: naming the model, where its class token lives, and what works instead.
    """
    import timm.models

    architecture, _ = timm.models.split_model_name_tag(timm_name)
    if not timm.models.is_model(architecture):
        return
    module = timm.models.model_entrypoint(architecture).__module__.rsplit(".", 1)[-1]
    if module in _UNSUPPORTED_MODULES:
        raise _refusal(name, _UNSUPPORTED_MODULES[module])


def check_vit_blocks(name: str, model: torch.nn.Module) -> None:
    """Refuse a timm model with ``.blocks`` whose blocks do not carry the class token.

    Structural, before any forward pass: class-attention blocks (``blocks_token_only``,
    ``cls_attn_blocks``) that the class token joins only after ``.blocks``, or a class token
    concatenated part-way through the blocks (``local_up_to_layer``). The block outputs
    themselves are checked on every forward pass of the encoder (:func:`_check_block_output`).

    Raises:
        ValueError: naming the model, where its class token lives, and what works instead.
    """
    for attribute, where in _LATE_CLASS_TOKEN:
        if getattr(model, attribute, None) is not None:
            raise _refusal(
                name,
                f"its `.blocks` carry only the patch tokens (token 0 is a patch, not the class "
                f"token); the class token joins in {where}",
            )
    joins = getattr(model, "local_up_to_layer", None)
    if isinstance(joins, int) and 0 < joins < len(model.blocks):
        raise _refusal(
            name,
            f"its first {joins} blocks carry only the patch tokens (token 0 is a patch, not the "
            f"class token); the class token joins at block {joins:02d} (`local_up_to_layer`, "
            "ConViT)",
        )


def _tokens_of(shape: tuple[int, ...] | None, width: int) -> int | None:
    """The patch count of a patch embedding's output ``shape`` for blocks of ``width``: (B, N, d)
    -> N, (B, H, W, d) or (B, d, H, W) -> H*W; None when it cannot tell."""
    if shape is None:
        return None
    if len(shape) == 3:
        return int(shape[1])
    if len(shape) == 4 and shape[-1] == width:
        return int(shape[1] * shape[2])
    if len(shape) == 4 and shape[1] == width:
        return int(shape[2] * shape[3])
    return None


def _check_block_output(
    name: str, layer: str, output: Any, n_prefix: int, patch_shape: tuple[int, ...] | None
) -> None:
    """A block's output must be one (B, T, d) tensor with T = n_prefix + the patch embedding's
    patch count (when its output ``patch_shape`` tells it)."""
    if not isinstance(output, torch.Tensor):
        raise _refusal(
            name,
            f"its {layer} returns a {type(output).__name__}, not one (batch, tokens, width) tensor "
            "(TNT's blocks return (pixel, patch) embeddings)",
        )
    if output.ndim != 3:
        raise _refusal(name, f"its {layer} outputs shape {tuple(output.shape)}, not 3-D tokens")
    n_patches = _tokens_of(patch_shape, int(output.shape[-1]))
    if n_patches is not None and output.shape[1] != n_prefix + n_patches:
        raise _refusal(
            name,
            f"its {layer} outputs {output.shape[1]} tokens where its {n_prefix} prefix token(s) "
            f"and {n_patches} patches make {n_prefix + n_patches}: its blocks do not carry the "
            "class token alongside the patches (token 0 would be a patch)",
        )


def encoder_from_timm_model(
    name: str,
    model: torch.nn.Module,
    *,
    device: torch.device,
    weights_id: str | None = None,
    half: bool = False,
) -> VisionEncoder:
    """Wrap an already created timm model as a :class:`VisionEncoder` (see the module docstring)."""
    from timm.data import create_transform, resolve_data_config

    model = model.eval()
    data_config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model.patch_embed, "dynamic_img_size", False):
        # a ViT with a fixed grid only accepts its own input size (which may differ from the
        # pretrained config when the model was created with img_size=...)
        data_config["input_size"] = (3, *tuple(img_size))
    transform = create_transform(**data_config, is_training=False)
    weights_id = weights_id or state_dict_sha256(model)

    if not _is_vit(model):

        def pooled_features(x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"pre_logits": model.forward_head(model.forward_features(x), pre_logits=True)}

        return VisionEncoder(
            name,
            model,
            transform,
            pooled_features,
            ["pre_logits"],
            "pre_logits",
            weights_id,
            device,
            half=half,
        )

    check_vit_blocks(name, model)
    blocks = model.blocks
    layers = block_layer_names(len(blocks))
    has_cls = getattr(model, "cls_token", None) is not None
    n_prefix = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))
    patch_embed = getattr(model, "patch_embed", None)

    def block_features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        patches: list[tuple[int, ...] | None] = [None]

        def patch_hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            patches[0] = tuple(output.shape) if isinstance(output, torch.Tensor) else None

        def make_hook(layer: str) -> Any:
            def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
                _check_block_output(name, layer, output, n_prefix, patches[0])
                # index the (B, T, d) output first, then copy: a view would keep every block's
                # whole output alive (T times the memory, also in fit_batch_size's peak)
                captured[layer] = (
                    output[:, 0].float().clone()
                    if has_cls
                    else output[:, n_prefix:].float().mean(dim=1)
                )

            return hook

        handles = [blk.register_forward_hook(make_hook(lay)) for blk, lay in zip(blocks, layers)]
        if isinstance(patch_embed, torch.nn.Module):
            handles.append(patch_embed.register_forward_hook(patch_hook))
        try:
            model.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    encoder = VisionEncoder(
        name,
        model,
        transform,
        block_features,
        layers,
        vit_default_layer(len(blocks)),
        weights_id,
        device,
        half=half,
    )
    # one blank image through the blocks: refuses (ValueError) blocks that do not carry the class
    # token before any stimulus is embedded
    with torch.inference_mode():
        block_features(torch.zeros((1, *data_config["input_size"]), device=device))
    return encoder


def _hub_filenames(filename: str | None) -> list[str]:
    """The files timm tries on the hub for ``hf_hub_filename``, safetensors first."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    if filename == "pytorch_model.bin":
        return ["model.safetensors", filename]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    return (
        [filename[: -len(".bin")] + ".safetensors", filename]
        if filename.endswith(".bin")
        else [filename]
    )


def _fetch_hub_weights(name: str, timm_name: str) -> None:
    """Get the hub weights into the HF cache *before* building the model, so a missing file fails
    in a second rather than after allocating a billion-parameter model. Models whose weights are
    not on the hub (URL-only) are left to timm."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg

    from .availability import hub_reachable

    cfg = get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return
    hub_reachable()  # one short probe per process; unreachable -> offline mode, no 23 s retries
    repo_id, _, revision = hub_id.partition("@")
    last: BaseException | None = None
    for filename in _hub_filenames(getattr(cfg, "hf_hub_filename", None)):
        try:
            hf_hub_download(repo_id, filename, revision=revision or None)
            return
        except LocalEntryNotFoundError as exc:  # offline and not cached (a subclass of the next)
            raise WeightsUnavailableError(name, short_cause(exc), kind="timm") from None
        except EntryNotFoundError as exc:  # the repo has no file of this name: try the next
            last = exc
        except Exception as exc:  # offline, unreachable, gated, not cached: all the same to users
            raise WeightsUnavailableError(name, short_cause(exc), kind="timm") from None
    raise WeightsUnavailableError(
        name, short_cause(last) if last else "no weight file", kind="timm"
    )


def load_timm_encoder(
    name: str,
    timm_name: str,
    *,
    device: torch.device,
    half: bool,
    weights: str | os.PathLike[str] | None = None,
) -> VisionEncoder:
    """Create ``timm_name`` with pretrained weights (hub, HF cache or the local file ``weights``).

    Raises:
        UnknownModelError: timm does not know ``timm_name``.
        WeightsUnavailableError: the weights cannot be found or downloaded (one short message).
    """
    import timm

    if not timm.is_model(timm_name):
        raise UnknownModelError(
            f"timm does not know the model {timm_name!r}; list names with timm.list_models()"
        )
    kwargs: dict[str, Any] = {}
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise ValueError(f"weights file {path} for {name!r} does not exist; check the path")
        kwargs["pretrained_cfg_overlay"] = {"file": path}
    else:
        _fetch_hub_weights(name, timm_name)
    try:
        model = timm.create_model(timm_name, pretrained=True, **kwargs)
    except (TypeError, AttributeError, KeyError, NameError):
        raise
    except Exception as exc:  # hub/offline/file errors come in many types; report one message
        if weights is not None:  # the file is there: it does not fit the model
            raise ValueError(
                f"weights file {os.fspath(weights)} does not fit model {name!r} (timm "
                f"{timm_name!r}): {cause_lines(exc)}; pass a checkpoint of that very variant "
                "(same size, patch and number of classes), or name the model the file belongs to"
            ) from None
        raise WeightsUnavailableError(name, short_cause(exc), kind="timm") from None
    weights_id = files_sha256([weights]) if weights is not None else state_dict_sha256(model)
    return encoder_from_timm_model(name, model, device=device, weights_id=weights_id, half=half)
