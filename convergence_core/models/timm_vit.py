"""timm vision models: the paper's ViTs (MAE, DINOv2, CLIP, CLIP+IN12k) and any other timm name.

Layers of a ViT (a timm model with ``.blocks``): ``block_00`` .. ``block_NN``, the CLS token (token
0) of each transformer block's output, before the final norm. A ViT without a class token gives
the mean of its patch tokens instead. Default layer: the penultimate block, as in the paper.
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

__all__ = ["block_layer_names", "encoder_from_timm_model", "load_timm_encoder", "vit_default_layer"]


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

    blocks = model.blocks
    layers = block_layer_names(len(blocks))
    has_cls = getattr(model, "cls_token", None) is not None
    n_prefix = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))

    def block_features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def make_hook(layer: str) -> Any:
            def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                # index the (B, T, d) output first, then copy: a view would keep every block's
                # whole output alive (T times the memory, also in fit_batch_size's peak)
                captured[layer] = (
                    output[:, 0].float().clone()
                    if has_cls
                    else output[:, n_prefix:].float().mean(dim=1)
                )

            return hook

        handles = [blk.register_forward_hook(make_hook(lay)) for blk, lay in zip(blocks, layers)]
        try:
            model.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    return VisionEncoder(
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
