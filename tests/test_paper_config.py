"""The shipped config for the paper's setting parses, names registered models, and fails early
offline with the message that says how to supply the data set and weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from convergence_core.datasets import DatasetUnavailableError, load_dataset
from convergence_core.models import get_spec
from convergence_core.precompute import PrecomputeConfig

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper-wit1024.toml"


def test_paper_config_names_the_papers_models() -> None:
    config = PrecomputeConfig.from_file(CONFIG)
    assert config.vision_models == (
        "vit_huge_patch14_224.mae",
        "vit_giant_patch14_dinov2.lvd142m",
        "vit_huge_patch14_clip_224.laion2b",
        "vit_huge_patch14_clip_224.laion2b_ft_in12k",
    )
    for name in (*config.vision_models, *config.language_models):
        spec = get_spec(name)
        assert spec.modality == ("vision" if name in config.vision_models else "language")
    assert config.dataset["kind"] == "hf" and config.dataset["revision"] == "wit_1024"


def test_paper_dataset_offline_says_how_to_use_a_local_copy(
    monkeypatch, tmp_path, hub_offline
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = dict(PrecomputeConfig.from_file(CONFIG).dataset)
    with pytest.raises(DatasetUnavailableError, match="save_to_disk"):
        load_dataset(spec, cache_dir=tmp_path)
