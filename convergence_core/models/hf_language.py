"""Hugging Face transformers language models: every hidden state, mean-pooled over real tokens.

Layers: ``layer_00`` .. ``layer_NN``, the ``hidden_states`` tuple of ``output_hidden_states=True``
as transformers defines it: ``layer_00`` is the embedding output, ``layer_01`` .. ``layer_{NN-1}``
are the outputs of blocks 0 .. NN-2, and ``layer_NN`` is the model's ``last_hidden_state``. For an
encoder without a final norm (BERT, MiniLM: each block ends in its own LayerNorm) that is the last
block's output; for decoder LLMs with a final norm (Llama, Gemma, BLOOM's ``ln_f``, GPT-2's
``ln_f``, ...) it is the last block's output *after* that norm, so it is on another scale than
the layers before it, which are the un-normalised residual stream (Gemma-3-270M: values up to
~1e5 in the middle layers; its last block's raw output differs from ``layer_18`` by up to ~4e4).
Each layer is averaged over the tokens the attention mask marks as real (special tokens such as
BOS/CLS/SEP included, padding excluded), summed in float64. Batches are padded on the right:
with a causal model a real token never sees the padding after it, and positions are not shifted,
so a caption's embedding does not depend on what it is batched with. Decoder models without a pad
token reuse their EOS (or UNK) token as padding; it is masked out anyway. Default layer: the last
one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Encoder
from .errors import WeightsUnavailableError, short_cause
from .weights import files_sha256, state_dict_sha256

__all__ = ["LanguageEncoder", "hidden_layer_names", "load_hf_language", "masked_mean"]

#: captions are short; longer inputs are truncated to this many tokens (counted in
#: ``LanguageEncoder.truncated_captions``; ``extract_embeddings`` warns once per extraction)
MAX_TOKENS = 512


def hidden_layer_names(n_states: int) -> list[str]:
    """``["layer_00", ..., f"layer_{n_states-1:02d}"]`` (layer_00 = embeddings)."""
    return [f"layer_{i:02d}" for i in range(n_states)]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens where ``mask`` is 1: (B, T, d), (B, T) -> (B, d) float64."""
    weights = mask.to(torch.float64).unsqueeze(-1)
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a text tokenised to zero tokens; remove empty captions first")
    return (hidden.to(torch.float64) * weights).sum(dim=1) / counts


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Right padding, and a pad token for decoder tokenizers that have none (EOS, else UNK)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                "the tokenizer has no pad, EOS or UNK token to pad batches with; "
                "set tokenizer.pad_token before loading"
            )
        tokenizer.pad_token = fallback
    return tokenizer


class LanguageEncoder(Encoder):
    """A transformers model + tokenizer; ``encode(texts) -> {layer_XX: (B, d) float32}``."""

    modality = "language"

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        device: torch.device,
        weights_id: str | None = None,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        if n_layers < 1:
            raise ValueError(f"cannot tell how many layers {name!r} has (config.num_hidden_layers)")
        layers = hidden_layer_names(n_layers + 1)
        super().__init__(name, layers, layers[-1], weights_id or state_dict_sha256(model), device)
        vocab = int(getattr(text_config, "vocab_size", 0) or 0)
        if len(tokenizer) < vocab // 2:  # no tokenizer files: a few special tokens, words [UNK]
            from .availability import TOKENIZER_FIX

            raise WeightsUnavailableError(
                name,
                f"its tokenizer has {len(tokenizer)} tokens for the model's vocabulary of {vocab}: "
                f"its tokenizer files are missing or are another model's; {TOKENIZER_FIX}",
                kind="hf",
            ) from None
        self.model = model.eval().to(device)
        self.tokenizer = prepare_tokenizer(tokenizer)
        limits = [max_tokens, getattr(tokenizer, "model_max_length", None)]
        limits.append(getattr(text_config, "max_position_embeddings", None))
        self.max_tokens = int(min(v for v in limits if isinstance(v, int) and v > 0))
        #: captions cut to ``max_tokens`` by :meth:`encode` so far (``extract_embeddings`` warns)
        self.truncated_captions = 0

    def encode(self, batch: Sequence[str]) -> dict[str, np.ndarray]:
        """Embed captions: ``{layer: (B, d) float32}``, mean over each caption's real tokens."""
        texts = list(batch)
        if not texts:
            raise ValueError("cannot encode an empty batch; pass at least one caption")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"caption {i} of the batch is empty or not a string ({text!r}); "
                    "drop empty captions (check_dataset(..., drop_bad=True))"
                )
        longer = self.tokenizer(texts, truncation=True, max_length=self.max_tokens + 1)
        self.truncated_captions += sum(len(ids) > self.max_tokens for ids in longer["input_ids"])
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        with torch.inference_mode():
            output = self.model(**tokens, output_hidden_states=True)
        states = output.hidden_states
        if len(states) != len(self.layers):
            raise RuntimeError(
                f"{self.name}: model returned {len(states)} hidden states, expected {len(self.layers)}"
            )
        mask = tokens["attention_mask"]
        return {
            layer: masked_mean(state, mask).cpu().numpy().astype(np.float32)
            for layer, state in zip(self.layers, states)
        }


def _weights_id_for(source: str, model: torch.nn.Module) -> str:
    """sha256 of the weight files (memoised per file) when they can be located on disk: a local
    folder, or the hub cache snapshot of a hub id; otherwise of the loaded state dict."""
    path = Path(source).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not a hub id, or not cached as a snapshot: hash the tensors instead
            return state_dict_sha256(model)
    try:
        return files_sha256([path])
    except ValueError:
        return state_dict_sha256(model)


def load_hf_language(
    name: str,
    source: str | os.PathLike[str],
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> LanguageEncoder:
    """Load a transformers model (hub id or local folder; ``weights`` overrides the location).

    ``dtype`` defaults to float32 (for large LLMs on a GPU pass ``torch.bfloat16``).

    Raises:
        WeightsUnavailableError: the model is not cached and the hub cannot be reached.
    """
    from transformers import AutoModel, AutoTokenizer

    location = os.fspath(weights) if weights is not None else os.fspath(source)
    if weights is not None and not Path(location).is_dir():
        raise ValueError(
            f"weights for {name!r} must be a model folder (written by save_pretrained); "
            f"{location} is not a folder"
        )
    folder = Path(location).expanduser()
    if folder.is_dir():
        from .availability import folder_weights_problem

        problem = folder_weights_problem(folder)
        if problem is not None:
            raise WeightsUnavailableError(name, problem, kind="hf")
    else:
        from .availability import hub_reachable

        hub_reachable()  # one short probe per process; unreachable -> offline mode, no retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModel.from_pretrained(location, dtype=dtype or torch.float32)
    except OSError as exc:  # not cached and the hub unreachable, or no such repo or folder
        raise WeightsUnavailableError(name, short_cause(exc), kind="hf") from None
    except Exception as exc:  # hub client errors (httpx, huggingface_hub) when offline
        if type(exc).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests"):
            raise WeightsUnavailableError(name, short_cause(exc), kind="hf") from None
        raise
    return LanguageEncoder(
        name, model, tokenizer, device=device, weights_id=_weights_id_for(location, model)
    )
