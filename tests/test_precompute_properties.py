"""The precompute's properties step: what it stores, that it is cached and resumable, and that it
does not load a language model a second time (fake encoders from tests/test_precompute.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from convergence_core import properties as props
from convergence_core.cache import read_json, write_json
from convergence_core.precompute import ProgressEvent, precompute
from tests.test_precompute import (  # noqa: F401  (fixtures)
    LANGUAGE,
    VISION,
    FakeEncoder,
    _options,
    loads,
    tiny_coco,
)


def test_precompute_writes_the_property_table(tiny_coco, tmp_path, loads):
    run = precompute(**_options(tiny_coco, tmp_path))
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})  # no second load
    table = run.properties
    assert table is not None and table.values["id"].tolist() == run.stimuli["id"].tolist()
    steps = run.manifest.steps
    assert {"properties", "properties:image", f"properties:captions:{LANGUAGE[0]}"} <= set(steps)

    image = props.image_properties([run.image_path(r) for r in range(run.n_stimuli)])
    for info in props.IMAGE_PROPERTIES:
        np.testing.assert_allclose(table.values[info.name], image[info.name], err_msg=info.name)
    assert table.values["n_captions"].tolist() == [float(len(c)) for c in run.stimuli["captions"]]
    # caption agreement: every caption through the model at its default layer
    encoder = FakeEncoder(LANGUAGE[0], "language")
    layer = run.default_layer(LANGUAGE[0])
    texts = [c for caps in run.stimuli["captions"] for c in caps]
    owners = np.repeat(np.arange(run.n_stimuli), [len(c) for c in run.stimuli["captions"]])
    expected = props.caption_agreement(encoder.encode(texts)[layer], owners, run.n_stimuli)
    np.testing.assert_allclose(
        table.values[f"caption_agreement:{LANGUAGE[0]}"], expected, rtol=1e-6
    )
    assert layer in table.info_for(f"caption_agreement:{LANGUAGE[0]}").description
    # typicality (from the run's neighbour lists: prepared features) and centroid distance of
    # each vision model at its GPA layer (k = n - 1 = 5)
    for model in VISION:
        features = run.embeddings[model][run.default_layer(model)]
        np.testing.assert_allclose(
            table.values[f"neighbour_distance:{model}"],
            props.neighbour_distance(props.nearest_similarities(features, 5), 5),
        )
        np.testing.assert_allclose(
            table.values[f"centroid_distance:{model}"], props.centroid_distance(features)
        )
    assert not list(run.path.rglob("*.tmp-*"))


def test_the_extraction_caches_every_caption_embedding_it_made(tiny_coco, tmp_path, loads):
    """Caption agreement embeds every caption; a small run keeps them at every layer in the
    caption cache, so a report's many-to-many section embeds nothing (no second load)."""
    from convergence_core import caption_embeddings
    from convergence_core.report import _caption_pairs

    run = precompute(**_options(tiny_coco, tmp_path))
    model = LANGUAGE[0]
    texts, owners = caption_embeddings.caption_texts(run)
    expected = FakeEncoder(model, "language").encode(texts)
    assert set(run.manifest.models[model].layers) <= set(expected)
    for layer in run.manifest.models[model].layers:
        cached = caption_embeddings.cached_caption_embeddings(run, model, layer)
        assert cached is not None, layer
        np.testing.assert_allclose(cached.features, expected[layer], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(cached.owners, owners)
        # the run embeds each stimulus's first caption: the cache's first-caption rows are it
        assert caption_embeddings.first_caption_difference(run, model, layer) < 1e-6
    pairs = [analyses_pair(run, model)]
    found, notes = _caption_pairs(run, pairs, embed=False)
    assert (model, pairs[0].language_layer) in found and not notes
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})


def test_a_large_caption_set_keeps_only_the_agreement(tiny_coco, tmp_path, loads, monkeypatch):
    from convergence_core import caption_embeddings, engines

    monkeypatch.setattr(engines, "CAPTION_CACHE_BYTES", 16)
    run = precompute(**_options(tiny_coco, tmp_path))
    assert run.properties.values[f"caption_agreement:{LANGUAGE[0]}"].notna().any()
    for layer in run.manifest.models[LANGUAGE[0]].layers:
        assert caption_embeddings.cached_caption_embeddings(run, LANGUAGE[0], layer) is None
    assert not (run.path / "captions").exists()


def analyses_pair(run, language_model):  # noqa: ANN001, ANN201
    from convergence_core.analyses import Pair

    vision = run.gpa.models[0]
    return Pair(vision, run.default_layer(vision), language_model,
                run.default_layer(language_model))


def test_rerun_reuses_the_properties(tiny_coco, tmp_path, loads):
    first = precompute(**_options(tiny_coco, tmp_path))
    files = [first.layout.properties, first.layout.properties_info]
    files += list((first.layout.root / "properties").iterdir())
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    events: list[ProgressEvent] = []
    second = precompute(progress=events.append, **_options(tiny_coco, tmp_path))
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    done = [e for e in events if e.step == "properties" and e.done == e.total]
    assert done and all(e.skipped for e in done)
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})
    assert second.properties.values.equals(first.properties.values)


def test_a_run_made_before_the_step_gets_its_properties_on_rerun(tiny_coco, tmp_path, loads):
    """Simulate a run cached before the properties step existed: only the language model is
    loaded again (for the caption agreement), no vision model."""
    first = precompute(**_options(tiny_coco, tmp_path))
    expected = first.properties.values
    manifest = read_json(first.layout.manifest)
    for step in [s for s in manifest["steps"] if s.startswith("properties")]:
        del manifest["steps"][step]
    write_json(first.layout.manifest, manifest)
    first.layout.properties.unlink()
    first.layout.properties_info.unlink()
    first.layout.remove_tree(first.layout.root / "properties")
    again = precompute(**_options(tiny_coco, tmp_path))
    assert loads == Counter({**{v: 1 for v in VISION}, LANGUAGE[0]: 2})
    assert again.properties.values.equals(expected)


def test_an_interrupted_properties_step_resumes(tiny_coco, tmp_path, loads):
    class Crash(RuntimeError):
        pass

    def crash(event: ProgressEvent) -> None:
        if event.step == "properties" and event.model == LANGUAGE[0]:
            raise Crash("power cut")

    with pytest.raises(Crash):
        precompute(progress=crash, **_options(tiny_coco, tmp_path))
    path = tmp_path / "cache" / "runs" / "tiny"
    steps = read_json(path / "manifest.json")["steps"]
    assert "properties:image" in steps and "properties" not in steps
    image_part = path / "properties" / "image.parquet"
    before = image_part.stat().st_mtime_ns
    resumed = precompute(**_options(tiny_coco, tmp_path))
    assert image_part.stat().st_mtime_ns == before  # the finished part is reused
    clean = precompute(**_options(tiny_coco, tmp_path, run_name="clean"))
    assert resumed.properties.values.equals(clean.properties.values)
    assert loads[LANGUAGE[0]] == 2  # one load per run folder


def test_dropping_a_language_model_drops_its_agreement(tiny_coco, tmp_path, loads):
    precompute(**_options(tiny_coco, tmp_path))
    run = precompute(**_options(tiny_coco, tmp_path, language_models=[]))
    assert not [name for name in run.properties.names if name.startswith("caption_agreement")]
    assert not [s for s in run.manifest.steps if s.startswith("properties:captions:")]
    assert not list((run.layout.root / "properties").glob("caption_agreement-*"))


def test_the_caption_agreement_pass_shows_its_progress(tiny_coco, tmp_path, loads):
    """The extraction embeds every caption for the caption agreement after the first captions
    (Gemma-3-270M on the demo: ~35 s with no progress line): it reports under its own label."""
    from convergence_core.engines import agreement_label

    events: list[ProgressEvent] = []
    run = precompute(**_options(tiny_coco, tmp_path), progress=events.append)
    n_captions = sum(len(captions) for captions in run.stimuli["captions"])
    for model in LANGUAGE:
        mine = [(e.done, e.total) for e in events if e.model == agreement_label(model)]
        assert mine and mine[0] == (0, n_captions) and mine[-1] == (n_captions, n_captions)
        first = [i for i, e in enumerate(events) if e.model == model and e.step == "extract"]
        agreement = [i for i, e in enumerate(events) if e.model == agreement_label(model)]
        assert first[0] < agreement[0] < agreement[-1] < first[-1]  # inside the model's extraction
