"""The Encoder interface shared by every model, and the vision-model plumbing.

An :class:`Encoder` turns a batch of stimuli (PIL images for vision, strings for language) into one
float32 array per layer: ``encode(batch) -> {layer: (B, d) float32}``. Encoders run in ``eval()``
mode under ``torch.inference_mode``; the same input gives the same output.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..images import to_rgb

__all__ = ["Encoder", "VisionEncoder", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, checking that CUDA/MPS is actually present when asked for."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"unknown device {device!r} ({exc}); use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for but CUDA is not available here (torch "
            f"{torch.__version__}); use the CPU: --device cpu (device='cpu' in Python)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device {device!r} asked for but MPS is not available here; use the CPU: --device "
            "cpu (device='cpu' in Python)"
        )
    return dev


class Encoder(ABC):
    """A loaded model that maps a batch of stimuli to per-layer embeddings.

    Attributes:
        name: the registry name it was loaded under.
        modality: ``"vision"`` or ``"language"``.
        layers: layer names, input side first; every ``encode`` result has exactly these keys.
        default_layer: the layer used when none is chosen (one of ``layers``).
        weights_id: sha256 hex identifying the weights (changes iff the weights change).
        device: the torch device the forward pass runs on.
    """

    modality: str

    def __init__(
        self,
        name: str,
        layers: Sequence[str],
        default_layer: str,
        weights_id: str,
        device: torch.device,
    ) -> None:
        self.name = name
        self.layers = list(layers)
        if default_layer not in self.layers:
            raise ValueError(f"default layer {default_layer!r} is not one of {self.layers}")
        self.default_layer = default_layer
        self.weights_id = weights_id
        self.device = device

    @abstractmethod
    def encode(self, batch: Sequence[Any]) -> dict[str, np.ndarray]:
        """Embed a batch: ``{layer: (len(batch), d_layer) float32}`` for every layer in ``layers``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, modality={self.modality!r}, "
            f"layers={len(self.layers)}, default_layer={self.default_layer!r}, device={self.device})"
        )


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 on the CPU in storage of its own: a view onto a larger tensor (a
    feature function's slice of a block output) would keep that whole tensor alive."""
    out = tensor.detach().float().cpu()
    return out.clone() if out.untyped_storage().nbytes() > out.nbytes else out


class VisionEncoder(Encoder):
    """An image model: a preprocessing transform (PIL -> (3, H, W) tensor) and a feature function.

    ``features(x)`` takes the stacked (B, 3, H, W) batch and returns ``{layer: (B, d) tensor}``.
    On CUDA with ``half=True`` the forward runs under float16 autocast; outputs are always
    returned as float32.
    """

    modality = "vision"

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        transform: Callable[[Any], torch.Tensor],
        features: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        layers: Sequence[str],
        default_layer: str,
        weights_id: str,
        device: torch.device,
        *,
        half: bool = False,
        cpu_forward_batch: int | None = None,
    ) -> None:
        super().__init__(name, layers, default_layer, weights_id, device)
        self.module = module.eval().to(device)
        self.transform = transform
        self._features = features
        self.half = bool(half) and device.type == "cuda"
        #: on CPU, run the forward pass on at most this many images at a time (None: no limit).
        #: Convolutional nets with large activations are memory-bound on CPU: per image, batches
        #: of 1-2 run several times faster than batches of 32 (see the EfficientNet-Lite loader).
        self.cpu_forward_batch = cpu_forward_batch if device.type == "cpu" else None

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Stack the transformed images into a (B, 3, H, W) float32 tensor on CPU."""
        if len(images) == 0:
            raise ValueError("cannot encode an empty batch; pass at least one image")
        return torch.stack([self.transform(image) for image in images])

    def encode(self, batch: Sequence[Any]) -> dict[str, np.ndarray]:
        """Embed PIL images (any mode is converted to RGB): ``{layer: (B, d) float32}``."""
        images = [to_rgb(im) if getattr(im, "mode", "RGB") != "RGB" else im for im in batch]
        return self.encode_tensor(self.preprocess(images))

    def encode_tensor(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Embed an already preprocessed (B, 3, H, W) batch: ``{layer: (B, d) float32}``."""
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if self.half
            else contextlib.nullcontext()
        )
        step = self.cpu_forward_batch or len(x)
        parts: list[dict[str, torch.Tensor]] = []
        with torch.inference_mode(), autocast:
            for start in range(0, len(x), step):
                feats = self._features(x[start : start + step].to(self.device, non_blocking=True))
                missing = set(self.layers) - set(feats)
                if missing:
                    raise RuntimeError(
                        f"{self.name}: feature function did not return layers {sorted(missing)}"
                    )
                parts.append({layer: _owned(feats[layer]) for layer in self.layers})
        return {
            layer: torch.cat([part[layer] for part in parts]).numpy().astype(np.float32, copy=False)
            for layer in self.layers
        }
