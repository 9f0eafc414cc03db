"""Hostile data sets, configs, captions and run files (issue 16, items 3-8).

Beside tests/test_hostile_inputs.py (tampered run folders): data sets whose links leave their root,
decompression bombs, malformed COCO files and configs, captions that cannot be encoded or are
100,000 characters long, damaged run files under every page, hub models offline, and CKNNA
values above 1 on tiny sets. Future code must keep passing this suite.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from convergence_core import images, settings
from convergence_core.dashboard import page as dashboard_page
from convergence_core.dashboard import widgets
from convergence_core.datasets import (
    check_dataset,
    dataset_fingerprint,
    load_coco,
    load_dataset,
    safe_relative_path,
)
from convergence_core.images import ImageFileError, image_problem, make_thumbnail, open_rgb
from tests.page_reading import cards, gallery_cards, shown

# names added for issue 16 are looked up when a test runs, so each test fails on its own on
# code that lacks them (rather than the whole module failing to import)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, width: int = 12_000, height: int = 12_000) -> Path:
    """A valid 1-bit greyscale PNG of ``width`` × ``height`` zeros: a few KB on disk, written row
    block by row block (never holding the image in memory)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    block = row * 256
    parts = []
    for start in range(0, height, 256):
        rows = min(256, height - start)
        parts.append(compressor.compress(block if rows == 256 else row * rows))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def no_big_decodes(monkeypatch):
    """Fail the test if Pillow starts decoding any image above the pixel limit."""
    original = ImageFile.ImageFile.load
    decoded: list[tuple[int, int]] = []

    def guarded(self):
        width, height = self.size
        if width * height > settings.max_image_pixels():
            decoded.append((width, height))
            raise AssertionError(f"decoded a {width} x {height} image above the limit")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded)
    return decoded


def _coco(root: Path, file_names: list[str], captions: list[list[str]] | None = None) -> Path:
    """captions.json for ``file_names`` (images must already be there or be links)."""
    captions = captions or [[f"caption {i}"] for i in range(len(file_names))]
    data = {
        "images": [{"id": i + 1, "file_name": name} for i, name in enumerate(file_names)],
        "annotations": [
            {"id": 100 * (i + 1) + j, "image_id": i + 1, "caption": caption}
            for i, caps in enumerate(captions)
            for j, caption in enumerate(caps)
        ],
    }
    (root / "captions.json").write_text(json.dumps(data), encoding="utf-8")
    return root


# ------------------------------------------------------------------------ item 4: symbolic links


@pytest.fixture
def linked_root(tmp_path, write_image):
    """A data root with a real image, a link inside pointing inside, and a link pointing outside."""
    root = tmp_path / "data"
    write_image(root / "images" / "real.png", seed=1)
    (root / "images" / "alias.png").symlink_to(root / "images" / "real.png")
    outside = write_image(tmp_path / "private" / "secret.png", seed=2)
    (root / "images" / "escape.png").symlink_to(outside)
    (root / "linked-folder").symlink_to(outside.parent, target_is_directory=True)
    return root


def test_a_link_inside_the_root_pointing_inside_is_fine(linked_root):
    assert safe_relative_path(linked_root, "images/alias.png") == "images/alias.png"
    dataset = load_coco(_coco(linked_root, ["real.png", "alias.png"]))
    kept, dropped = check_dataset(dataset)
    assert len(kept) == 2 and dropped == []


@pytest.mark.parametrize("name", ["images/escape.png", "linked-folder/secret.png"])
def test_every_loader_refuses_a_link_out_of_the_root(linked_root, name):
    with pytest.raises(ValueError, match="outside the dataset root .*symbolic link"):
        safe_relative_path(linked_root, name)
    # COCO (file names under images/)
    _coco(linked_root, ["real.png", "escape.png"])
    with pytest.raises(ValueError, match="symbolic link"):
        load_coco(linked_root)
    # table (CSV) and labelled folder
    pd.DataFrame({"image": ["images/real.png", name], "caption": ["a", "b"]}).to_csv(
        linked_root / "table.csv", index=False
    )
    with pytest.raises(ValueError, match="symbolic link"):
        load_dataset(linked_root / "table.csv")
    pd.DataFrame({"image": ["images/real.png", name], "label": ["a", "b"]}).to_csv(
        linked_root / "labels.csv", index=False
    )
    with pytest.raises(ValueError, match="symbolic link"):
        load_dataset(linked_root, kind="labelled")


def test_a_link_swapped_in_after_loading_is_a_bad_item_and_never_read(linked_root, tmp_path):
    """Image readers check containment themselves, not only the loaders."""
    dataset = load_coco(_coco(linked_root, ["real.png", "alias.png"]))
    alias = linked_root / "images" / "alias.png"
    alias.unlink()
    alias.symlink_to(tmp_path / "private" / "secret.png")
    with pytest.raises(ValueError, match="1 of 2 stimuli") as info:
        check_dataset(dataset)
    assert "outside the dataset root" in str(info.value)
    kept, dropped = check_dataset(dataset, drop_bad=True)
    assert kept.stimuli["image"].tolist() == ["images/real.png"]
    assert "outside the dataset root" in dropped[0]["reason"]
    with pytest.raises(ValueError, match="outside the dataset root"):
        dataset_fingerprint(dataset)
    with pytest.raises(ImageFileError, match="outside the dataset root"):
        open_rgb(alias, root=linked_root)
    with pytest.raises(ImageFileError, match="outside the dataset root"):
        make_thumbnail(alias, tmp_path / "t.jpg", root=linked_root)
    assert open_rgb(linked_root / "images" / "real.png", root=linked_root).size == (48, 32)


def test_write_thumbnails_refuses_a_link_out_of_the_images_root(linked_root, tmp_path):
    from convergence_core.cache import RunLayout
    from convergence_core.run_writer import write_thumbnails

    stimuli = pd.DataFrame({"id": ["a", "b"], "image": ["images/real.png", "images/escape.png"]})
    with pytest.raises(ValueError, match="outside"):
        write_thumbnails(RunLayout(tmp_path / "run"), stimuli, linked_root)
    assert not (tmp_path / "run" / "thumbnails" / "1.jpg").exists()


def test_extraction_reads_images_only_inside_the_root(linked_root, tmp_path):
    from convergence_core.extract import extract_embeddings

    class Probe:
        """The smallest vision encoder extract_embeddings accepts."""

        modality = "vision"
        name = "probe"
        layers = ["size"]

        def encode(self, batch):
            return {"size": np.array([[im.size[0]] for im in batch], dtype=np.float32)}

    items = [linked_root / "images" / "real.png", linked_root / "images" / "escape.png"]
    with pytest.raises(ImageFileError, match="outside the dataset root"):
        extract_embeddings(Probe(), items, root=linked_root)
    out = extract_embeddings(Probe(), items[:1], root=linked_root)
    assert out["size"].tolist() == [[48.0]]


# ------------------------------------------------------------------ item 5: decompression bombs


def test_the_pixel_limit_is_a_setting(monkeypatch):
    assert settings.max_image_pixels() == settings.DEFAULT_MAX_IMAGE_PIXELS
    assert settings.DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's warning level
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "5_000")
    assert settings.max_image_pixels() == 5000
    for bad in ("lots", "-3", "0", "1.5"):
        monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ValueError, match="CONVERGENCE_MAX_IMAGE_PIXELS"):
            settings.max_image_pixels()


def test_a_png_bomb_is_a_bad_item_and_is_never_decoded(tmp_path, write_image, no_big_decodes):
    root = tmp_path / "data"
    write_image(root / "images" / "fine.png", seed=1)
    bomb = write_png_bomb(root / "images" / "bomb.png")
    assert bomb.stat().st_size < 64_000  # a few KB claiming 144 million pixels
    problem = image_problem(bomb, root=root)
    assert problem is not None and problem.startswith("too large: 12,000 × 12,000 pixels")
    with pytest.raises(images.ImageTooLargeError, match="12,000 × 12,000"):
        open_rgb(bomb)
    with pytest.raises(images.ImageTooLargeError):
        make_thumbnail(bomb, tmp_path / "t.jpg")
    dataset = load_coco(_coco(root, ["fine.png", "bomb.png"]))
    with pytest.raises(ValueError, match="too large") as info:
        check_dataset(dataset)
    assert "--drop-bad" in str(info.value)
    kept, dropped = check_dataset(dataset, drop_bad=True)
    assert kept.stimuli["image"].tolist() == ["images/fine.png"]
    assert dropped[0]["image"] == "images/bomb.png" and "too large" in dropped[0]["reason"]
    assert no_big_decodes == []


def test_a_lower_limit_refuses_ordinary_images_by_their_header(tmp_path, write_image, monkeypatch):
    path = write_image(tmp_path / "a.png", seed=3, size=(100, 60))
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "5999")
    assert "100 × 60 pixels, over the limit of 5,999" in image_problem(path)
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "6000")
    assert image_problem(path) is None and open_rgb(path).size == (100, 60)


def test_an_image_above_twice_pillows_limit_is_refused_too(tmp_path, no_big_decodes):
    bomb = write_png_bomb(tmp_path / "huge.png", 20_000, 20_000)  # Pillow itself refuses these
    assert image_problem(bomb).startswith("too large")
    with pytest.raises(images.ImageTooLargeError):
        open_rgb(bomb)


# ------------------------------------------------------- item 6: clear errors, not tracebacks


def _coco_data(root: Path) -> dict:
    return json.loads((root / "captions.json").read_text(encoding="utf-8"))


MALFORMED_COCO = {
    "image without file_name": (lambda d: d["images"][0].pop("file_name"), "no file_name"),
    "file_name a number": (
        lambda d: d["images"][1].update(file_name=7),
        "file_name 7 (needs a string)",
    ),
    "image id a list": (lambda d: d["images"][0].update(id=[1]), "id [1] (needs an integer)"),
    "image not an object": (lambda d: d["images"].append("x.png"), "is a str, not an object"),
    "annotation without caption": (
        lambda d: d["annotations"][0].pop("caption"),
        "no caption",
    ),
    "caption a number": (
        lambda d: d["annotations"][1].update(caption=3.5),
        "caption 3.5 (needs a string)",
    ),
    "caption a list": (
        lambda d: d["annotations"][1].update(caption=["a", "b"]),
        "caption ['a', 'b'] (needs a string)",
    ),
    "image_id missing": (lambda d: d["annotations"][0].pop("image_id"), "image_id None"),
    "annotations an object": (lambda d: d.update(annotations={}), "must be lists"),
    "mixed id types": (lambda d: d["images"][0].update(id="one"), "mix integers and strings"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_COCO))
def test_malformed_coco_entries_give_one_clear_error(make_coco_folder, case):
    edit, expected = MALFORMED_COCO[case]
    root = make_coco_folder([["a cat"], ["a dog"], ["a cow"]])
    data = _coco_data(root)
    edit(data)
    (root / "captions.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_coco(root)
    message = str(info.value)
    assert expected in message, message
    assert "COCO captions format" in message


def test_string_coco_ids_still_load(make_coco_folder):
    root = make_coco_folder([["a cat"], ["a dog"]])
    data = _coco_data(root)
    for image in data["images"]:
        image["id"] = f"img-{image['id']}"
    for ann in data["annotations"]:
        ann["image_id"] = f"img-{ann['image_id']}"
    (root / "captions.json").write_text(json.dumps(data), encoding="utf-8")
    assert load_coco(root).stimuli["id"].tolist() == ["img-1", "img-2"]


WRONG_TYPES = {
    "dataset": [["a", "b"], 5, {"kind": "coco"}],
    "vision_models": [5, [1, 2], {"a": 1}, ["a", ""]],
    "language_models": [5, [None]],
    "layers": [5, ["a"], {"m": "block_01"}, {"m": [1]}],
    "gpa_layers": [["a"], {"m": 5}, "block_01"],
    "device": [5, "", None],
    "batch_size": ["32", 2.5, True, None, "big"],
    "caption_mode": [5],
    "drop_bad": ["yes", 1, None],
    "stimuli": [5, None, "", ["common"]],
    "run_name": [5, "", ["demo"]],
    "cache_root": [5, ["cache"]],
    "weights": [["x"], {"m": 5}, "weights.pth"],
    "thumbnails": ["no", 0],
    "features": [5, ["a.npy"], {"m": 5}, {"m": {"layer": 5}}],
    "modalities": [["vision"], {"m": 5}],
    "gpa_models": [5, [1, 2]],
    "list_size": ["128", 1.5, True],
    "gpa_starts": ["4", 1.5, True, -1],
    "gpa_stop": [5, None, "fast", ["optimum"]],
    "neighbour_layers": [5, None],
    "precision": [16, None],
    "engine": [1, None],
    "ray_address": [5, ""],
    "concurrency": ["two", 1.5],
    "num_cpus": ["1", True],
    "num_gpus": ["1", [1]],
    "runtime_env": ["py_modules", [1]],
}


def test_every_config_field_has_a_type_check():
    from dataclasses import fields

    from convergence_core.precompute import _FIELD_TYPES, PrecomputeConfig

    assert {f.name for f in fields(PrecomputeConfig)} == set(_FIELD_TYPES) == set(WRONG_TYPES)


@pytest.mark.parametrize(
    ("key", "value"), [(key, value) for key, values in WRONG_TYPES.items() for value in values]
)
def test_config_values_of_the_wrong_type_name_the_key_and_the_fix(tmp_path, key, value):
    from convergence_core.precompute import PrecomputeConfig

    base = {"dataset": str(tmp_path), "vision_models": ["m1", "m2"]}
    if key == "layers" and isinstance(value, dict):
        base["vision_models"] = ["m", "m2"]
    with pytest.raises(ValueError) as info:
        PrecomputeConfig.from_mapping({**base, key: value})
    message = str(info.value)
    assert repr(key) in message or f"{key}=" in message or f"{key}[" in message, message
    # the same from a JSON config file
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, key: value}))
    with pytest.raises(ValueError, match=key):
        PrecomputeConfig.from_file(path)


def test_well_typed_configs_still_load(tmp_path):
    from convergence_core.precompute import PrecomputeConfig

    config = PrecomputeConfig.from_mapping(
        {
            "dataset": {"kind": "coco", "path": str(tmp_path)},
            "vision_models": "a, b",
            "language_models": ["c"],
            "layers": {"a": ["x"]},
            "gpa_layers": {"a": "x"},
            "device": "cpu",
            "batch_size": 8,
            "caption_mode": "mean",
            "drop_bad": True,
            "run_name": "r",
            "cache_root": tmp_path,
            "weights": {"a": tmp_path / "w.pth"},
            "thumbnails": False,
        }
    )
    assert config.vision_models == ("a", "b") and config.cache_root == str(tmp_path)
    assert config.weights == {"a": str(tmp_path / "w.pth")}


def test_report_out_onto_an_existing_file_is_a_clear_error(tmp_path, capsys):
    from convergence_core import report
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", 24, name="r", images=False, thumbnails=False)
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "sub"):
        assert report.main([str(run.path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and "existing file, not a folder" in err
        assert "Traceback" not in err
    assert existing.read_text() == "keep me"
    with pytest.raises(ValueError, match="existing file"):
        report.write_report(run, existing)


LONE_SURROGATE = "a dog \ud800 on a sofa"


def test_a_caption_that_cannot_be_encoded_is_a_bad_item(make_coco_folder):
    root = make_coco_folder([["a cat"], [LONE_SURROGATE, "fine"], ["a cow"]])
    dataset = load_coco(root)  # json escapes "\ud800" into a lone surrogate
    assert dataset.stimuli["captions"].iat[1][0] == LONE_SURROGATE
    with pytest.raises(ValueError, match="caption 1 not valid Unicode text") as info:
        check_dataset(dataset)
    assert "drop_bad=True" in str(info.value)
    with pytest.raises(ValueError, match="lone surrogate"):
        dataset_fingerprint(dataset)
    kept, dropped = check_dataset(dataset, drop_bad=True)
    assert kept.stimuli["id"].tolist() == ["1", "3"]
    assert json.dumps(dropped, ensure_ascii=False).encode("utf-8")  # storable as it is
    assert len(dataset_fingerprint(kept)) == 64


def test_extraction_refuses_a_caption_that_cannot_be_encoded():
    from convergence_core.extract import captions_for_language

    stimuli = pd.DataFrame({"id": ["a", "b"], "captions": [["fine"], ["ok", LONE_SURROGATE]]})
    assert captions_for_language(stimuli, "first")[0] == ["fine", "ok"]
    with pytest.raises(ValueError, match="'b' is not valid Unicode.*--drop-bad"):
        captions_for_language(stimuli, "mean")


@pytest.fixture
def fake_models(monkeypatch):
    """The test doubles of tests/test_precompute.py, registered; returns the names."""
    pytest.importorskip("torch")
    from convergence_core.models import registry
    from tests.test_precompute import FakeEncoder

    names = {"fake-v1": "vision", "fake-v2": "vision", "fake-v3": "vision", "fake-l1": "language"}
    loads: list[str] = []

    def loader(spec, device, dtype, weights):
        loads.append(spec.name)
        return FakeEncoder(spec.name, spec.modality)

    for name, modality in names.items():
        spec = registry.ModelSpec(name, modality, "fake", "test double", "middle", name, loader)
        monkeypatch.setitem(registry._REGISTRY, name, spec)
    return loads


def test_precompute_drop_bad_drops_a_caption_that_cannot_be_encoded(
    make_coco_folder, tmp_path, fake_models
):
    from convergence_core.precompute import precompute

    captions = [["a cat"], [LONE_SURROGATE], ["a cow"], ["a hen"], ["a pig"], ["a yak"]]
    options = {
        "dataset": str(make_coco_folder(captions)),
        "vision_models": ["fake-v1", "fake-v2"],
        "language_models": ["fake-l1"],
        "cache_root": str(tmp_path / "cache"),
        "run_name": "surrogate",
    }
    with pytest.raises(ValueError, match="not valid Unicode"):
        precompute(**options)
    assert fake_models == []
    run = precompute(**options, drop_bad=True, caption_mode="mean")
    assert run.n_stimuli == 5 and "2" not in run.stimuli["id"].tolist()
    assert "not valid Unicode" in run.manifest.dataset.dropped[0]["reason"]


# ------------------------------------------------------- item 7: every model's weights up front


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and the hub probe forgotten; whatever a test switches (offline
    mode, the endpoint) is restored afterwards. Returns huggingface_hub.constants."""
    from huggingface_hub import constants

    from convergence_core.models import availability

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(availability, "_probed", {})
    return constants


@pytest.fixture
def offline_hub(hub, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return hub


def _fake_snapshot(cache: Path, repo_id: str, files: list[str]) -> None:
    """A hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for name in files:
        path = repo / "snapshots" / ("0" * 40) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")


def _weights_message(error, model: str) -> str:
    message = str(error)
    assert model in message
    assert "hub access" in message and "local path" in message and "HF_HOME" in message
    assert "--weights" in message
    return message


def test_a_hub_model_offline_is_refused_at_once_without_loading(offline_hub, monkeypatch):
    import time

    import timm

    from convergence_core.models import WeightsUnavailableError, check_weights_available

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights_available(["efficientnet-lite0", "vit_huge_patch14_224.mae", "minilm"])
    assert time.perf_counter() - started < 5
    message = _weights_message(info.value, "vit_huge_patch14_224.mae")
    assert "offline mode is on" in message and "efficientnet-lite0" not in message
    assert info.value.models == ("vit_huge_patch14_224.mae",)


def test_every_missing_model_is_named_in_one_error(offline_hub, tmp_path):
    from convergence_core.models import WeightsUnavailableError, check_weights_available

    with pytest.raises(WeightsUnavailableError) as info:
        check_weights_available(
            ["vit_huge_patch14_224.mae", "bigscience/bloom-560m", "efficientnet-lite1"],
            weights={"efficientnet-lite1": tmp_path / "missing.pth"},
        )
    assert info.value.models == (
        "vit_huge_patch14_224.mae",
        "bigscience/bloom-560m",
        "efficientnet-lite1",
    )
    assert str(info.value).startswith("weights for 3 models are not available here")
    assert "missing.pth does not exist" in str(info.value)


def test_a_near_miss_of_an_installed_model_names_it(offline_hub):
    """`efficientnet_lite0` is timm's model (hub weights), `efficientnet-lite0` ours (installed):
    a user who typed the first, or the hub id of MiniLM, is pointed at the installed one."""
    from convergence_core.models import WeightsUnavailableError, check_weights_available

    with pytest.raises(WeightsUnavailableError) as info:
        check_weights_available(
            ["efficientnet_lite0", "sentence-transformers/all-MiniLM-L6-v2", "bigscience/bloom-560m"]
        )
    message = str(info.value)
    assert "Did you mean 'efficientnet-lite0'? That model's weights are installed here." in message
    assert "Did you mean 'minilm'?" in message
    assert message.count("Did you mean") == 2  # BLOOM has no installed counterpart


def test_cached_files_and_local_paths_count_as_available(offline_hub, tmp_path):
    from convergence_core.models import WeightsUnavailableError, check_weights_available

    cache = Path(offline_hub.HF_HUB_CACHE)
    _fake_snapshot(cache, "timm/vit_huge_patch14_224.mae", ["model.safetensors"])
    _fake_snapshot(cache, "bigscience/bloom-560m", ["config.json", "model.safetensors"])
    check_weights_available(["vit_huge_patch14_224.mae", "bigscience/bloom-560m"])
    # a hub snapshot with a config but no weight file is not enough
    _fake_snapshot(cache, "openlm-research/open_llama_3b", ["config.json"])
    with pytest.raises(WeightsUnavailableError, match="open_llama_3b"):
        check_weights_available(["openlm-research/open_llama_3b"])
    # local weights: a file for timm / EfficientNet, a model folder for transformers
    (tmp_path / "vit.safetensors").write_bytes(b"x")
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(WeightsUnavailableError, match="lacks config.json or weight files"):
        check_weights_available(["huggyllama/llama-7b"], weights={"huggyllama/llama-7b": folder})
    (folder / "model.safetensors").write_bytes(b"x")
    check_weights_available(
        ["vit_giant_patch14_dinov2.lvd142m", "huggyllama/llama-7b", f"hf:{folder}"],
        weights={
            "vit_giant_patch14_dinov2.lvd142m": tmp_path / "vit.safetensors",
            "huggyllama/llama-7b": folder,
        },
    )


def test_the_offline_demo_models_need_no_hub(offline_hub):
    from convergence_core.models import check_weights_available

    check_weights_available(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
    check_weights_available(["minilm", "gemma-3-270m"])


def test_an_unreachable_hub_is_probed_once_and_then_left_alone(hub, monkeypatch):
    """A hub that refuses connections: one probe, then offline mode for the process."""
    from convergence_core.models import WeightsUnavailableError, availability

    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    assert availability.hub_reachable(timeout=2) is False
    assert hub.HF_HUB_OFFLINE is True  # huggingface_hub and transformers now answer from cache
    from convergence_core.models import check_weights_available

    with pytest.raises(WeightsUnavailableError, match="cannot be reached from here"):
        check_weights_available(["vit_huge_patch14_224.mae"])


def test_a_hanging_network_costs_at_most_the_probe_timeout(hub, monkeypatch):
    import threading
    import time
    import urllib.request

    from convergence_core.models import availability

    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)  # a DNS lookup or connection that never answers
        raise OSError("gave up")

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    started = time.perf_counter()
    try:
        assert availability.hub_reachable(timeout=0.5) is False
    finally:
        release.set()
    assert time.perf_counter() - started < 3
    assert availability.hub_reachable(timeout=0.5) is False  # asked once per process


def test_loading_a_hub_model_does_not_retry_an_unreachable_hub(hub, monkeypatch):
    """load_encoder itself (used directly, e.g. by another engine) probes once, not 23 s."""
    import time

    from convergence_core.models import WeightsUnavailableError, load_encoder

    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError):
        load_encoder("vit_huge_patch14_224.mae")
    with pytest.raises(WeightsUnavailableError):
        load_encoder("hf:someone/not-a-cached-model")
    assert time.perf_counter() - started < 10


def _unavailable_fake(monkeypatch, name: str, cause: str = "no weights on this machine"):
    import dataclasses

    from convergence_core.models import registry

    spec = registry._REGISTRY[name]
    monkeypatch.setitem(
        registry._REGISTRY,
        name,
        dataclasses.replace(spec, weights_problem=lambda spec, weights: cause, weights_kind="hf"),
    )


def test_precompute_checks_every_model_before_the_first_extraction(
    make_coco_folder, tmp_path, fake_models, monkeypatch
):
    from convergence_core.models import WeightsUnavailableError
    from convergence_core.precompute import precompute

    captions = [[f"a {animal}"] for animal in ("cat", "dog", "cow", "hen", "pig", "yak")]
    options = {
        "dataset": str(make_coco_folder(captions)),
        "vision_models": ["fake-v1", "fake-v2", "fake-v3"],
        "language_models": ["fake-l1"],
        "cache_root": str(tmp_path / "cache"),
        "run_name": "weights",
    }
    _unavailable_fake(monkeypatch, "fake-v3")
    with pytest.raises(WeightsUnavailableError, match="'fake-v3'.*no weights on this machine"):
        precompute(**options)
    assert fake_models == []  # nothing was loaded ...
    assert not (tmp_path / "cache" / "runs" / "weights").exists()  # ... and no run was begun
    monkeypatch.undo()  # weights back: the run completes
    fake_models.clear()
    from convergence_core.models import registry
    from tests.test_precompute import FakeEncoder

    def loader(spec, device, dtype, weights):
        fake_models.append(spec.name)
        return FakeEncoder(spec.name, spec.modality)

    for name, modality in {**dict.fromkeys(options["vision_models"], "vision")}.items():
        spec = registry.ModelSpec(name, modality, "fake", "test double", "middle", name, loader)
        monkeypatch.setitem(registry._REGISTRY, name, spec)
    spec = registry.ModelSpec("fake-l1", "language", "fake", "double", "middle", "fake-l1", loader)
    monkeypatch.setitem(registry._REGISTRY, "fake-l1", spec)
    run = precompute(**options)
    assert sorted(fake_models) == ["fake-l1", "fake-v1", "fake-v2", "fake-v3"]
    # weights gone again, but the run already holds that model's embeddings: nothing to load
    _unavailable_fake(monkeypatch, "fake-v3")
    fake_models.clear()
    assert precompute(**options).n_stimuli == run.n_stimuli and fake_models == []


@pytest.mark.slow
def test_cli_lite0_with_a_hub_model_offline_stops_before_any_work(
    offline_hub, tmp_path, make_coco_folder, monkeypatch, capsys
):
    """The issue's command: --vision efficientnet-lite0,vit_huge_patch14_224.mae offline."""
    import dataclasses
    import time

    from convergence_core.cli import main
    from convergence_core.models import registry

    lite0 = registry._REGISTRY["efficientnet-lite0"]
    monkeypatch.setitem(
        registry._REGISTRY,
        "efficientnet-lite0",
        dataclasses.replace(lite0, loader=lambda *a: pytest.fail("lite0 was loaded")),
    )
    root = make_coco_folder([["a cat"], ["a dog"], ["a cow"], ["a hen"]])
    started = time.perf_counter()
    status = main(
        [
            "precompute",
            "--dataset",
            str(root),
            "--vision",
            "efficientnet-lite0,vit_huge_patch14_224.mae",
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: weights for model 'vit_huge_patch14_224.mae'")
    assert "Traceback" not in err
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "cache" / "runs").exists() or not any(
        (tmp_path / "cache" / "runs").iterdir()
    )


# ------------------------------------------- items 3 and 6: hostile captions, damaged run files

REPO = Path(__file__).resolve().parent.parent
#: Every page of the dashboard by its sidebar label (Home: the app's first page)
PAGES = {"Home": None, **{entry.label: entry.file for entry in dashboard_page.PAGES}}
HUGE = "a dog " * 16_667  # 100,002 characters
N_PAGE_RUN = 24


def _write_page_run(path: Path, captions: list[list[str]] | None = None, ids=None) -> None:
    """A run of the first N_PAGE_RUN coco-mini images (real thumbnails), synthetic embeddings,
    and the property table the precompute writes."""
    from convergence_core.precompute import write_run_from_embeddings
    from convergence_core.run import load_run
    from tests.fixtures_runs import add_properties, synthetic_embeddings

    dataset = load_coco(settings.demo_data_root())
    stimuli = dataset.stimuli.iloc[:N_PAGE_RUN].reset_index(drop=True).copy()
    if captions is not None:
        stimuli["captions"] = captions
    if ids is not None:
        stimuli["id"] = ids
    embeddings, _ = synthetic_embeddings(N_PAGE_RUN)
    write_run_from_embeddings(
        path,
        stimuli,
        embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"],
        default_layers={"vision-a": "stage2", "vision-b": "stage2", "vision-c": "stage2"},
        images_root=dataset.root,
        thumbnails=True,
        dataset_name="hostile",
    )
    add_properties(load_run(path))  # as the precompute does: What predicts dispersion has cards


def _open(cache: Path, page: str | None, monkeypatch, query: dict | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=90)
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.run(timeout=90)
    at.session_state["w_lab_tables"] = True  # the lab's table of every number (an expander)
    # Universal space's galleries of the stimuli at both ends (an expander)
    at.session_state["w_universal_ends_open"] = True
    # What predicts dispersion builds only its open tab: open the one with the stimulus cards
    at.session_state["w_predictors_tab"] = "A property against dispersion"
    if page is not None:
        at.switch_page(page).run(timeout=90)
    return at


def _lowest_dispersion_rows(run, count: int) -> list[int]:
    return list(np.argsort(run.dispersion["rank_mean"].to_numpy(), kind="stable")[:count])


#: Pages that show stimulus cards (thumbnail, caption excerpt, "Full captions"): Home, the
#: gallery, and the galleries of the dispersion predictors and of the universal space. Residual
#: space shows cards for the stimuli selected; the other pages show no stimulus.
CARD_PAGES = ("Home", "Stimuli gallery", "What predicts dispersion", "Universal space")


@pytest.fixture(scope="module")
def huge_caption_cache(tmp_path_factory):
    """A run whose every stimulus has a 100,000-character first caption (so every gallery shows
    one, whichever stimuli it picks) and whose lowest-dispersion stimulus has a 5,003-character
    id."""
    from convergence_core.run import load_run

    cache = tmp_path_factory.mktemp("huge-caption")
    path = cache / "runs" / "demo"
    _write_page_run(path)
    low = _lowest_dispersion_rows(load_run(path), 1)[0]
    dataset = load_coco(settings.demo_data_root())
    captions = [
        [f"{HUGE}{row}", *c[1:]]
        for row, c in enumerate(dataset.stimuli["captions"].iloc[:N_PAGE_RUN])
    ]
    ids = dataset.stimuli["id"].iloc[:N_PAGE_RUN].tolist()
    ids[low] = "id-" + "9" * 5000
    _write_page_run(path, captions, ids)  # same embeddings, so the same ranks
    assert _lowest_dispersion_rows(load_run(path), 1)[0] == low
    return cache


def _longest_text(at) -> int:
    texts = [element.value for element in at.text] + [c["text"] for c in gallery_cards(at)]
    for frame in at.dataframe:
        texts += [str(v) for v in frame.value.astype(str).to_numpy().ravel()]
    for box in at.selectbox:
        texts += [str(option) for option in box.options]
    return max(map(len, texts), default=0)


def test_the_caption_excerpt_is_a_setting(monkeypatch):
    from convergence_core.dashboard.widgets import excerpt

    assert settings.caption_excerpt_chars() == settings.DEFAULT_CAPTION_EXCERPT_CHARS == 300
    assert excerpt("short") == "short"
    cut = excerpt(HUGE)
    assert cut.endswith(f"… [{len(HUGE):,} characters]") and len(cut) < 340
    monkeypatch.setenv("CONVERGENCE_CAPTION_EXCERPT_CHARS", "50")
    assert len(excerpt(HUGE)) < 80
    monkeypatch.setenv("CONVERGENCE_CAPTION_EXCERPT_CHARS", "five")
    with pytest.raises(ValueError, match="CONVERGENCE_CAPTION_EXCERPT_CHARS"):
        excerpt(HUGE)


@pytest.mark.parametrize("page", list(PAGES))
def test_a_huge_caption_is_shown_as_an_excerpt_with_the_full_text_one_click_away(
    huge_caption_cache, monkeypatch, page
):
    at = _open(huge_caption_cache, PAGES[page], monkeypatch, {"score": "mean"})
    assert not at.exception, at.exception
    # no element carries the whole caption or id (a card's text holds two excerpts: its label,
    # with the id, and its first caption)
    assert _longest_text(at) < 800
    if page not in CARD_PAGES:
        return  # Residual space shows captions in hover text (80 characters) and selections
    # each card's "Full captions" (text: tests/test_gallery_browser.py) holds its captions up to
    # gallery.FULL_CAPTIONS_CHARS, so that a gallery of such captions stays small; past it a
    # caption says its length and where it is shown whole
    from convergence_core.dashboard.gallery import FULL_CAPTIONS_CHARS

    shown = gallery_cards(at)
    assert shown and all(card["captions"] for card in shown), "no way to see the captions"
    for card in shown:
        assert sum(map(len, card["captions"])) < FULL_CAPTIONS_CHARS + 1000
        assert len(card["captions"]) + card["left_out"] == 5  # every coco caption accounted for
        first = card["captions"][0]
        assert first.startswith(HUGE[:FULL_CAPTIONS_CHARS].rstrip())
        assert first.endswith("characters; the Stimuli page's detail view shows it whole under "
                              "Full captions]")
    if page != "Stimuli gallery":
        return
    # there, one click away: the detail view's "Full captions" dialog, every caption whole
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.run(timeout=90)
    buttons = [b for b in at.button if b.label == "Full captions"]
    assert buttons, "no way to see the whole caption"
    buttons[0].click().run(timeout=90)
    assert not at.exception, at.exception
    assert any(HUGE.strip() in element.value for element in at.text)


def _damage_residuals_shape(run_path: Path) -> None:
    residuals = np.load(run_path / "gpa" / "residuals.npy")
    np.save(run_path / "gpa" / "residuals.npy", residuals[:, :2])


def _damage_residuals_nan(run_path: Path) -> None:
    residuals = np.load(run_path / "gpa" / "residuals.npy")
    np.save(run_path / "gpa" / "residuals.npy", np.full_like(residuals, np.nan))


def _damage_embedding_pickle(run_path: Path) -> None:
    import pickle

    target = next((run_path / "embeddings").glob("language-a/*.npy"))
    target.write_bytes(pickle.dumps({"not": "an array"}))


def _damage_embedding_truncated(run_path: Path) -> None:
    target = next((run_path / "embeddings").glob("vision-b/*.npy"))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def _damage_dispersion(run_path: Path) -> None:
    frame = pd.read_parquet(run_path / "dispersion.parquet")
    frame["mean"] = np.nan
    frame.to_parquet(run_path / "dispersion.parquet", index=False)


def _damage_gpa_map(run_path: Path) -> None:
    np.save(run_path / "gpa" / "map_1.npy", np.zeros((3, 3)))


def _damage_stability_table(run_path: Path) -> None:
    frame = pd.read_parquet(run_path / "gpa" / "stability.parquet")
    frame.iloc[: len(frame) // 2].to_parquet(run_path / "gpa" / "stability.parquet", index=False)


def _damage_gpa_settings(run_path: Path) -> None:
    settings_file = run_path / "gpa" / "gpa.json"
    info = json.loads(settings_file.read_text())
    del info["models"]
    settings_file.write_text(json.dumps(info))


DAMAGES = {
    "GPA settings without their models": _damage_gpa_settings,
    "residuals of the wrong shape": _damage_residuals_shape,
    "a GPA map of the wrong shape": _damage_gpa_map,
    "a truncated GPA stability table": _damage_stability_table,
    "residuals all NaN": _damage_residuals_nan,
    "a pickled embedding": _damage_embedding_pickle,
    "a truncated embedding": _damage_embedding_truncated,
    "dispersion all NaN": _damage_dispersion,
}


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("healthy")
    _write_page_run(cache / "runs" / "demo")
    return cache / "runs" / "demo"


def _damaged_cache(healthy_run: Path, tmp_path: Path, damage) -> Path:
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(healthy_run, cache / "runs" / "demo")
    damage(cache / "runs" / "demo")
    return cache


@pytest.fixture(scope="module")
def brain_cache(tmp_path_factory) -> Path:
    """A cache whose run "demo" has vision models and a brain 'subject' but no language model."""
    from tests.fixtures_runs import make_brain_run

    cache = tmp_path_factory.mktemp("brain_cache")
    make_brain_run(cache / "runs" / "demo", n=80, images=True)  # sets of 20 > k = 10
    return cache


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_works_on_a_run_without_language_models(brain_cache, monkeypatch, page):
    """Vision models and brain recordings only (the neuroscience case): no page stops with an
    error or warns about missing language layers; the lab aligns the vision models with the
    subject, and the pages that need language models say so as information."""
    at = _open(brain_cache, PAGES[page], monkeypatch)
    assert not at.exception, at.exception
    alerts = [e.value for e in [*at.error, *at.warning]]
    assert not alerts, (page, alerts)
    if page == "Alignment lab":
        assert set(at.dataframe[-1].value["language_model"]) == {"subj01"}


#: Model names as a feature file or a shared run may spell them: Markdown links and emphasis
HOSTILE_VISION = "v*1*[a](http://example.com/v.png)"
HOSTILE_LANGUAGE = "l_[b](http://example.com/l.png)"


@pytest.fixture(scope="module")
def hostile_names_cache(tmp_path_factory) -> Path:
    """A run whose models are named with Markdown, every GPA model at its first layer (so Home
    notes that the dispersion comes from the first layers, naming the models)."""
    from convergence_core.precompute import write_run_from_embeddings
    from tests.fixtures_runs import _stimuli, synthetic_embeddings

    cache = tmp_path_factory.mktemp("hostile_names")
    visions = [HOSTILE_VISION, "vision-b", "vision-c"]
    languages = [HOSTILE_LANGUAGE, "language-b"]
    embeddings, _ = synthetic_embeddings(48, vision_models=visions, language_models=languages)
    stimuli, images_root = _stimuli(48, True)
    write_run_from_embeddings(
        cache / "runs" / "demo", stimuli, embeddings, vision_models=visions,
        language_models=languages, images_root=images_root, thumbnails=True,
        dataset_name="hostile names",
    )
    return cache


def _markdown_texts(at) -> list[str]:  # noqa: ANN001
    """Every text the page renders as Markdown: alerts, captions, headings, widget labels and
    the options of radios and pills (their labels are Markdown too)."""
    assert not at.exception, at.exception
    rendered = [
        element.value
        for kind in ("markdown", "caption", "info", "warning", "error", "success", "title",
                     "header", "subheader")
        for element in getattr(at, kind)
    ]
    rendered += [widget.label for widget in at.main if getattr(widget, "label", None)]
    rendered += [option for radio in at.radio for option in radio.proto.options]
    rendered += [option.content for pills in at.get("button_group")
                 for option in pills.proto.options]
    return [str(text) for text in rendered]


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_shows_model_names_as_text(hostile_names_cache, monkeypatch, page):
    """No text a page renders as Markdown (alerts, captions, headings, labels, progress texts)
    holds a model's name unescaped: it would show as a link, emphasis or an outside picture. The
    Stimuli gallery is ordered by a pair's alignment, and the lab's CKNNA note is planted."""
    from convergence_core.dashboard import lab

    note = f"CKNNA outside [-1, 1]: {HOSTILE_VISION} × {HOSTILE_LANGUAGE}"
    monkeypatch.setattr(lab, "bound_note", lambda *_: note)
    at = _open(hostile_names_cache, None, monkeypatch)
    at.session_state["w_gallery_order"] = "knn_overlap"
    if PAGES[page] is not None:
        at.switch_page(PAGES[page])
    at.run(timeout=90)
    rendered = _markdown_texts(at)
    if page == "Stimuli gallery":  # the detail tab (built only when open) names every model
        at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
        at.run(timeout=90)
        rendered += _markdown_texts(at)
        assert [r for r in at.radio if r.label == "Neighbours in detail for"], "no detail radio"
    assert rendered
    raw = [text for text in rendered if "](http" in str(text)]
    assert not raw, (page, raw)
    if page == "Home":
        assert any("v\\*1\\*\\[a\\]" in text for text in map(str, rendered)), rendered


#: A run folder named with Markdown emphasis and a Streamlit emoji shortcode
HOSTILE_RUN = "nolang*bold*:cat:"


@pytest.fixture(scope="module")
def hostile_run_names_cache(tmp_path_factory) -> Path:
    """Two runs named with Markdown: one without language models, property table and a third
    GPA model (40 stimuli), one of 6 stimuli (too few for low and high sets)."""
    from tests.fixtures_runs import make_synthetic_run

    cache = tmp_path_factory.mktemp("hostile_run_names")
    run = make_synthetic_run(cache / "runs", n=40, name=HOSTILE_RUN, language_models=(),
                             vision_models=("vision-a", "vision-b"), images=False)
    run.layout.properties.unlink()  # as a run made before the properties step existed
    run.layout.properties_info.unlink()
    make_synthetic_run(cache / "runs", n=6, name=f"tiny{HOSTILE_RUN}", images=False)
    return cache


@pytest.mark.parametrize(("run_name", "page", "settings"), [
    (HOSTILE_RUN, "Stimuli gallery", {"w_gallery_order": "knn_overlap"}),
    (HOSTILE_RUN, "Stimuli gallery", {widgets.STIMULI_TAB_KEY: "Alignment vs dispersion"}),
    (HOSTILE_RUN, "Alignment lab", {}),
    (HOSTILE_RUN, "Paper analyses", {}),
    (HOSTILE_RUN, "Paper analyses", {"w_paper_tab": "Fig. S2: leave one model out"}),
    (HOSTILE_RUN, "What predicts dispersion", {}),
    (f"tiny{HOSTILE_RUN}", "Alignment lab", {}),
    (f"tiny{HOSTILE_RUN}", "Paper analyses", {}),
])
def test_a_run_name_in_a_message_is_shown_as_text(
    hostile_run_names_cache, monkeypatch, run_name, page, settings
):
    """A message naming the run (no language model, too few stimuli, too few GPA models, no
    property table) quotes its folder name as text: no emphasis, no emoji."""
    at = _open(hostile_run_names_cache, None, monkeypatch, {"run": run_name})
    for key, value in settings.items():
        at.session_state[key] = value
    at.switch_page(PAGES[page]).run(timeout=90)
    rendered = _markdown_texts(at)
    assert not [text for text in rendered if "*bold*" in text or ":cat:" in text], rendered
    quoted = widgets.escape_markdown(repr(run_name))
    assert any(quoted in text for text in rendered), rendered


@pytest.mark.parametrize(("page", "computes"), [("Paper analyses", "dispersion_sets"),
                                              ("Universal space", "cross_modal")])
def test_an_analysis_error_naming_a_model_is_shown_as_text(
    hostile_names_cache, monkeypatch, page, computes
):
    """An analysis's ValueError names models (e.g. 'a single vision model (…)'); the page shows
    it as text, never as a link or a picture fetched from elsewhere."""
    from convergence_core.dashboard import data

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError(f"a single vision model ({HOSTILE_VISION}): add another")

    monkeypatch.setattr(data, computes, refuse)
    at = _open(hostile_names_cache, PAGES[page], monkeypatch)
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert errors and not [e for e in errors if "](http" in e], errors
    assert f"a single vision model ({HOSTILE_VISION}): add another" in shown(at.error)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_turns_damaged_run_files_into_a_clean_alert(
    healthy_run, tmp_path, monkeypatch, page, damage
):
    cache = _damaged_cache(healthy_run, tmp_path, DAMAGES[damage])
    at = _open(cache, PAGES[page], monkeypatch)
    assert not at.exception, f"{page} with {damage}: {at.exception}"
    errors = " ".join(element.value for element in at.error)
    assert "cannot be opened" in errors and "rerun" in errors, errors


@pytest.mark.parametrize("page", [*CARD_PAGES, "Residual space"])
def test_a_thumbnail_that_is_not_a_jpeg_is_a_placeholder_not_a_traceback(
    healthy_run, tmp_path, monkeypatch, page
):
    """Every thumbnail damaged (HTML, or a JPEG header and nothing else, alternately), so that
    whichever stimuli a page shows, its cards say so instead of failing."""
    from convergence_core.run import load_run

    rows = _lowest_dispersion_rows(load_run(healthy_run), 2)

    def damage(run_path: Path) -> None:
        for row in range(N_PAGE_RUN):
            bad = b"<html>not a jpeg</html>" if row % 2 else b"\xff\xd8\xff" + b"\0" * 20
            (run_path / "thumbnails" / f"{row}.jpg").write_bytes(bad)

    cache = _damaged_cache(healthy_run, tmp_path, damage)
    query = {"score": "mean"}
    at = _open(cache, PAGES[page], monkeypatch, query)
    if page == "Residual space":  # thumbnails appear with a selection: select two stimuli
        from convergence_core.dashboard import state

        run = load_run(cache / "runs" / "demo")
        ids = [str(run.stimuli["id"].iloc[r]) for r in rows]
        state.set_selection(at.session_state, "demo", ids, origin="test")
        at.run(timeout=90)
    assert not at.exception, at.exception
    texts = [element.value for element in at.text] + [c["note"] for c in gallery_cards(at)]
    assert any("thumbnail unreadable" in text for text in texts), texts


# ------------------------------------------------------------- item 8: CKNNA above 1, small sets


def test_the_bound_note_says_where_and_why():
    from convergence_core.alignment import cknna_bound_note
    from convergence_core.validation import MIN_CKNNA_SET_SIZE

    inside = [("low", 0.99, 5, 3), ("high", -1.0, 5, 3), ("nan", np.nan, 5, 3)]
    assert cknna_bound_note(inside) is None
    note = cknna_bound_note([("low", 0.5, 59, 10), ("pasted ids", 1.29, 5, 3), ("x", -1.1, 9, 4)])
    assert note.startswith("CKNNA outside [-1, 1] (2 values; largest 1.290: pasted ids, 5 stimuli")
    assert "Cauchy–Schwarz" in note and "unbiased HSIC" in note
    assert f"at least {MIN_CKNNA_SET_SIZE} stimuli" in note


def test_unbiased_cknna_really_exceeds_1_on_tiny_sets_and_not_on_large_ones(healthy_run):
    """The premise, on the run's own features with the dense reference: tiny sets leave [-1, 1],
    sets of MIN_CKNNA_SET_SIZE at k <= s/4 do not."""
    from convergence_core.alignment import cknna, prepare_features
    from convergence_core.run import load_run
    from convergence_core.validation import MIN_CKNNA_SET_SIZE

    run = load_run(healthy_run)
    x = prepare_features(np.asarray(run.embeddings["vision-a"]["stage2"], dtype=np.float64))
    y = prepare_features(np.asarray(run.embeddings["language-a"]["layer3"], dtype=np.float64))
    rng = np.random.default_rng(0)
    subsets = [rng.choice(len(x), 5, replace=False) for _ in range(50)]
    tiny = [cknna(x[s], y[s], k=3) for s in subsets]
    assert np.nanmax(np.abs(tiny)) > 1
    assert MIN_CKNNA_SET_SIZE <= N_PAGE_RUN
    full = cknna(x[:MIN_CKNNA_SET_SIZE], y[:MIN_CKNNA_SET_SIZE], k=MIN_CKNNA_SET_SIZE // 4)
    assert abs(full) <= 1


def test_the_lab_shows_no_number_for_a_tiny_pasted_set_and_says_why_above_1(
    healthy_run, tmp_path, monkeypatch
):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(healthy_run, cache / "runs" / "demo")
    at = _open(cache, PAGES["Alignment lab"], monkeypatch, {"source": "pasted", "k": "3"})
    from convergence_core.run import load_run

    run = load_run(cache / "runs" / "demo")
    all_ids = run.stimuli["id"].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    for _ in range(20):
        pasted = rng.choice(all_ids, 5, replace=False)
        at.text_area(key="w_pasted_ids").set_value("\n".join(pasted)).run(timeout=90)
        assert not at.exception, at.exception
        table = at.dataframe[-1].value
        table = table[table["metric"] == "cknna"]  # the lab's table is long: a metric column
        chosen = table[table["set"] == "pasted"]
        if (chosen["value"].abs() > 1).any():
            break
    else:
        pytest.fail("no 5-stimulus set with CKNNA above 1 in 20 draws")
    metrics = cards(at)
    assert metrics["Focus: pasted ids"] == "—"
    assert all(value == "—" for value in metrics.values())  # every set here has < 24 stimuli
    infos = " ".join(element.value for element in at.info)
    assert "fewer than 24 stimuli" in infos and "pasted ids" in infos
    warnings = " ".join(shown(at.warning))
    assert "CKNNA outside [-1, 1]" in warnings and "Cauchy–Schwarz" in warnings
    assert f"{chosen['value'].abs().max():.3f}" in warnings or "largest" in warnings


def test_the_lab_shows_numbers_for_sets_of_the_minimum_size(tmp_path, monkeypatch):
    from convergence_core.validation import MIN_CKNNA_SET_SIZE
    from tests.fixtures_runs import make_synthetic_run

    cache = tmp_path / "cache"
    make_synthetic_run(cache / "runs", n=2 * MIN_CKNNA_SET_SIZE, name="demo", thumbnails=False)
    size = MIN_CKNNA_SET_SIZE
    at = _open(cache, PAGES["Alignment lab"], monkeypatch, {"size": str(size), "k": "4"})
    assert not at.exception, at.exception
    metrics = cards(at)
    table = at.dataframe[-1].value
    table = table[table["metric"] == "cknna"]
    low = table.loc[table["set"] == "low", "value"].mean()
    assert metrics["Low dispersion"] == f"{low:.4f}"
    assert not any("fewer than" in element.value for element in at.info)
    if (table["value"].abs() <= 1).all():
        assert not any("outside [-1, 1]" in element.value for element in at.warning)


def test_the_report_hides_small_set_numbers_and_notes_values_above_1(tmp_path):
    from convergence_core import report
    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", 40, name="r", images=False, thumbnails=False)
    out = tmp_path / "out"
    written = report.write_report(
        run, out, size=5, k=3, scores=["mean"], n_random=40, n_permutations=50
    )
    sets = pd.read_csv(out / "dispersion_sets_mean.csv")
    values = sets[["cknna_low_dispersion", "cknna_high_dispersion", "cknna_random_upper_95"]]
    assert (values.abs() > 1).any().any(), "5 stimuli, k = 3 should reach above 1"
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    table_lines = summary.split("\n\n")[0].splitlines()[1:]
    assert table_lines and all("—" in line for line in table_lines)
    notes = " ".join(written["notes"])
    assert "fewer than 24" in notes and "CKNNA outside [-1, 1]" in notes
    assert "Note: CKNNA outside [-1, 1]" in summary
    # the tables keep every value
    assert np.isfinite(sets["cknna_low_dispersion"]).all()


def test_the_cknna_bound_measurement_runs(tmp_path):
    import subprocess
    import sys

    from tests.fixtures_runs import make_synthetic_run

    run = make_synthetic_run(tmp_path / "runs", 40, name="r", images=False, thumbnails=False)
    out = "cknna-bound-smoke-test.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/measure_cknna_bound.py",
            "--run",
            str(run.path),
            "--quick",
            "--out",
            out,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = REPO / "benchmarks" / "results" / out
    payload = json.loads(path.read_text())
    path.unlink()
    assert payload["reference_max_difference"] < 1e-9 and payload["reference_checks"] > 0
    assert {row["set_size"] for row in payload["by_size"]} == {4, 6, 10, 20}
    assert "|c|>1 worst k" in done.stdout
