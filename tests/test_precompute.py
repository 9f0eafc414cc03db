"""The resumable pipeline, on a few real coco-mini images and fast deterministic fake encoders.

The fake encoders are registered in the model registry for the duration of a test (monkeypatch),
so the pipeline runs its real code path: registry lookup, load_encoder, extract_embeddings, the
cache writers. Each load is counted, so resuming is checked by what is *not* re-extracted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convergence_core import settings
from convergence_core.cache import RunLockedError, read_json, run_lock, write_json
from convergence_core.datasets import load_dataset
from convergence_core.precompute import (
    PrecomputeConfig,
    ProgressEvent,
    default_run_name,
    precompute,
)
from convergence_core.run import list_runs, load_run

torch = pytest.importorskip("torch")
from convergence_core.models import registry  # noqa: E402
from convergence_core.models.base import Encoder  # noqa: E402

VISION = ("fake-vision-a", "fake-vision-b", "fake-vision-c")
LANGUAGE = ("fake-language-a",)


class FakeEncoder(Encoder):
    """Deterministic features: vision from an 8x8 grey thumbnail, language from letter counts.

    Each layer is a fixed random projection (seeded by model and layer name) of those raw
    features, so different models agree up to a linear map plus nonlinearity.
    """

    def __init__(self, name: str, modality: str) -> None:
        self.modality = modality
        layers = ["early", "middle", "late"]
        super().__init__(
            name, layers, "middle", weights_id=f"sha-{name}", device=torch.device("cpu")
        )
        self._projections = {
            layer: np.random.default_rng(abs(hash((name, layer))) % 2**32).standard_normal(
                (64 if modality == "vision" else 26, 6 + 2 * i)
            )
            for i, layer in enumerate(layers)
        }

    def _raw(self, item) -> np.ndarray:
        if self.modality == "vision":
            grey = np.asarray(item.convert("L").resize((8, 8)), dtype=np.float64) / 255.0
            return grey.ravel()
        text = item.lower()
        return np.array([text.count(chr(ord("a") + i)) for i in range(26)], dtype=np.float64)

    def encode(self, batch: Sequence) -> dict[str, np.ndarray]:
        raw = np.stack([self._raw(item) for item in batch])
        return {
            layer: np.tanh(raw @ proj / 4.0).astype(np.float32)
            for layer, proj in self._projections.items()
        }


@pytest.fixture
def loads(monkeypatch) -> Counter:
    """Register the fake models; return a Counter of encoder loads per model name."""
    counter: Counter = Counter()

    def loader(spec, device, dtype, weights):
        counter[spec.name] += 1
        return FakeEncoder(spec.name, spec.modality)

    for name, modality in [*((v, "vision") for v in VISION), *((x, "language") for x in LANGUAGE)]:
        spec = registry.ModelSpec(name, modality, "fake", "test double", "middle", name, loader)
        monkeypatch.setitem(registry._REGISTRY, name, spec)
    return counter


@pytest.fixture
def tiny_coco(tmp_path) -> Path:
    """A COCO-format copy of the first 6 coco-mini images (copied at test time, never committed)."""
    source = settings.demo_data_root()
    data = json.loads((source / "captions.json").read_text(encoding="utf-8"))
    images = sorted(data["images"], key=lambda im: im["id"])[:6]
    ids = {im["id"] for im in images}
    root = tmp_path / "tiny-coco"
    (root / "images").mkdir(parents=True)
    for image in images:
        shutil.copy(source / "images" / image["file_name"], root / "images" / image["file_name"])
    subset = {
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
    }
    (root / "captions.json").write_text(json.dumps(subset), encoding="utf-8")
    return root


def _options(tiny_coco: Path, tmp_path: Path, **extra) -> dict:
    return {
        "dataset": str(tiny_coco),
        "vision_models": list(VISION),
        "language_models": list(LANGUAGE),
        "run_name": "tiny",
        "cache_root": str(tmp_path / "cache"),
        "batch_size": 4,
        **extra,
    }


def _arrays(run) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for model in run.models:
        for layer in run.layers(model):
            out[(model, layer)] = np.array(run.embeddings[model][layer])
            lists = run.neighbours(model, layer).lists
            out[("neighbours", model, layer)] = np.array(lists.indices)
            out[("similarities", model, layer)] = np.array(lists.values)
    out[("gpa",)] = np.array(run.gpa.residuals)
    out[("dispersion",)] = run.dispersion[["mean", "pc1"]].to_numpy()
    return out


def test_full_run_writes_every_part(tiny_coco, tmp_path, loads):
    events: list[ProgressEvent] = []
    run = precompute(progress=events.append, **_options(tiny_coco, tmp_path))
    assert run.path == tmp_path / "cache" / "runs" / "tiny"
    assert run.n_stimuli == 6 and run.vision_models == list(VISION)
    assert run.layers("fake-vision-a") == ["early", "middle", "late"]
    assert run.gpa.layers == ("middle",) * 3 and run.default_layer("fake-vision-b") == "middle"
    assert run.embeddings["fake-language-a"]["late"].shape == (6, 10)
    for row in range(6):
        assert run.thumbnail_path(row) is not None and run.image_path(row).is_file()
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})
    manifest = run.manifest
    assert manifest.complete and manifest.dataset.dropped == []
    assert len(manifest.dataset.fingerprint) == 64
    assert manifest.models["fake-vision-a"].weights_id == "sha-fake-vision-a"
    assert manifest.versions["numpy"] == np.__version__
    assert manifest.settings["caption_mode"] == "first"
    assert set(manifest.steps) == {
        "stimuli",
        "gpa",
        "gpa_stability",
        "dispersion",
        "thumbnails",
        *(f"extract:{m}" for m in (*VISION, *LANGUAGE)),
        *(
            f"neighbours:{m}:{layer}"
            for m in (*VISION, *LANGUAGE)
            for layer in run.layers(m)
        ),
        "properties",  # and its cached parts:
        "properties:image",
        *(f"properties:captions:{m}" for m in LANGUAGE),
    }
    # every layer has exact lists (K = n - 1 = 5 here)
    assert all(run.neighbours(m, layer).k_max == 5 for m in run.models for layer in run.layers(m))
    steps = [e.step for e in events]
    assert steps[0] == "dataset" and steps[-1] == "done"
    assert any(e.step == "extract" and e.model == "fake-language-a" and e.done == 6 for e in events)
    assert not list(run.path.rglob("*.tmp-*"))


def test_rerun_recomputes_nothing(tiny_coco, tmp_path, loads):
    first = precompute(**_options(tiny_coco, tmp_path))
    before = _arrays(first)
    mtimes = {p: p.stat().st_mtime_ns for p in first.path.rglob("*.npy")}
    events: list[ProgressEvent] = []
    second = precompute(progress=events.append, **_options(tiny_coco, tmp_path))
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})  # no second load
    assert {p: p.stat().st_mtime_ns for p in second.path.rglob("*.npy")} == mtimes
    assert all(
        e.skipped
        for e in events
        if e.step in ("extract", "gpa", "gpa_stability", "dispersion", "thumbnails")
    )
    after = _arrays(second)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_a_format_1_run_is_upgraded_in_place_without_re_extraction(tiny_coco, tmp_path, loads):
    """Runs written before neighbour lists (dense grams/, manifest format 1) keep working: load_run
    says to rerun the precompute, and that rerun keeps the embeddings and builds the lists."""
    from convergence_core.run import list_runs

    first = precompute(**_options(tiny_coco, tmp_path))
    before = _arrays(first)
    path = first.path
    # turn it into what the previous version wrote
    manifest = read_json(path / "manifest.json")
    manifest["format"] = 1
    for entry in manifest["models"].values():
        entry.pop("clip_thresholds")
        entry.pop("neighbour_layers")
    manifest["steps"] = {k: v for k, v in manifest["steps"].items() if not k.startswith("neigh")}
    write_json(path / "manifest.json", manifest)
    shutil.rmtree(path / "neighbours")
    (path / "grams" / "fake-vision-a").mkdir(parents=True)
    np.save(path / "grams" / "fake-vision-a" / "middle.npy", np.eye(6, dtype=np.float32))
    with pytest.raises(ValueError, match="older version.*rerun the precompute"):
        load_run(path)
    (info,) = list_runs(path.parent)
    assert info.summary.needs_upgrade and not info.summary.complete
    events: list[ProgressEvent] = []
    upgraded = precompute(progress=events.append, **_options(tiny_coco, tmp_path))
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})  # nothing re-extracted
    assert not (path / "grams").exists()
    assert upgraded.manifest.format == 2
    assert {e.step for e in events if not e.skipped and e.step != "dataset"} >= {"neighbours"}
    after = _arrays(upgraded)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_new_gpa_algorithm_recomputes_gpa_only(tiny_coco, tmp_path, loads, monkeypatch):
    import convergence_core.precompute as pipeline

    first = precompute(**_options(tiny_coco, tmp_path))
    gpa_json = first.path / "gpa" / "gpa.json"
    assert read_json(gpa_json)["algorithm"] == pipeline.GPA_ALGORITHM
    monkeypatch.setattr(pipeline, "GPA_ALGORITHM", "some-other-scheme/2")
    events: list[ProgressEvent] = []
    precompute(progress=events.append, **_options(tiny_coco, tmp_path))
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})  # nothing re-extracted
    redone = {
        e.step
        for e in events
        if e.step in ("gpa", "gpa_stability", "dispersion", "thumbnails") and not e.skipped
    }
    assert redone == {"gpa", "gpa_stability", "dispersion"}


def test_gpa_stability_is_stored_and_follows_gpa_starts(tiny_coco, tmp_path, loads, monkeypatch):
    from convergence_core import procrustes
    from convergence_core.gpa_stability import gpa_stability

    solves = []
    iterate = procrustes._iterate
    monkeypatch.setattr(
        procrustes, "_iterate", lambda *a, **k: solves.append(k.get("start")) or iterate(*a, **k)
    )
    run = precompute(**_options(tiny_coco, tmp_path))
    # GPA once from Gower's start (the step after it starts from GPA's result), 4 random starts
    assert [start is None for start in solves] == [True, False, False, False, False]
    monkeypatch.setattr(procrustes, "_iterate", iterate)
    stored = run.gpa_stability
    assert (stored.n_starts, stored.seed) == (4, 0)
    # the reference solution is the run's GPA: its dispersion is the stored mean residual
    np.testing.assert_allclose(
        stored.per_stimulus("dispersion"), run.dispersion["mean"], rtol=1e-9, atol=1e-12
    )
    rank = run.dispersion["rank_mean"].to_numpy()
    assert (stored.per_stimulus("rank_low") <= rank).all()
    assert (rank <= stored.per_stimulus("rank_high")).all()
    direct = gpa_stability(run.gpa.inputs, n_starts=4, seed=0, models=run.gpa.models)
    np.testing.assert_allclose(
        stored.per_stimulus("dispersion_spread"), direct.dispersion_spread, atol=1e-12
    )
    assert "GPA stability (4 random starts" in stored.describe(run.n_stimuli)
    with pytest.raises(ValueError, match="no per-stimulus metric 'nope'"):
        stored.per_stimulus("nope")
    # more starts: only the diagnostic is recomputed; 0 starts: the run has none
    events: list[ProgressEvent] = []
    again = precompute(progress=events.append, **_options(tiny_coco, tmp_path, gpa_starts=2))
    redone = {e.step for e in events if not e.skipped}
    assert "gpa_stability" in redone
    assert not redone & {"extract", "neighbours", "gpa", "dispersion", "thumbnails"}
    assert loads == Counter({name: 1 for name in (*VISION, *LANGUAGE)})
    assert again.gpa_stability.n_starts == 2
    none = precompute(**_options(tiny_coco, tmp_path, gpa_starts=0))
    assert none.gpa_stability is None and not (none.path / "gpa" / "stability.json").exists()
    with pytest.raises(ValueError, match="gpa_starts"):
        precompute(**_options(tiny_coco, tmp_path, gpa_starts=-1))


def test_gpa_stopped_at_its_uncertainty_writes_gpa_and_its_diagnostic_in_one_step(
    tiny_coco, tmp_path, loads, monkeypatch
):
    """gpa_stop="uncertainty": the GPA step solves the reference and the random starts together
    (stage by stage), writes the diagnostic and GPA, and finishes both steps; a rerun skips both;
    the default run's folder and GPA are untouched by the option."""
    from convergence_core import procrustes
    from convergence_core.gpa_stability import UncertaintyStop, gpa_to_uncertainty

    optimum = precompute(**_options(tiny_coco, tmp_path))
    assert optimum.gpa_stop is None and "stop" not in read_json(optimum.path / "gpa" / "gpa.json")
    solves = []
    iterate = procrustes._iterate
    monkeypatch.setattr(
        procrustes, "_iterate", lambda *a, **k: solves.append(k.get("start")) or iterate(*a, **k)
    )
    events: list[ProgressEvent] = []
    options = _options(tiny_coco, tmp_path, gpa_stop="uncertainty", run_name="uncertain")
    run = precompute(progress=events.append, **options)
    stop = run.gpa_stop
    assert isinstance(stop, UncertaintyStop)
    assert len(solves) == 5 * stop.stages  # the reference and 4 starts per stage, nothing else
    assert not any(e.step == "gpa_stability" and not e.skipped for e in events)
    assert any(e.step == "gpa" and "GPA solution 5 of 5" in (e.detail or "") for e in events)
    # one "done" for the step, not one per stage
    assert sum(e.step == "gpa" and e.done >= e.total for e in events) == 1
    monkeypatch.setattr(procrustes, "_iterate", iterate)
    direct, stability, direct_stop = gpa_to_uncertainty(
        run.gpa.inputs, n_starts=4, seed=0, models=run.gpa.models
    )
    assert direct_stop == stop
    np.testing.assert_allclose(run.gpa.residuals, direct.residuals, rtol=0, atol=1e-15)
    # the command's summary says where GPA stopped (it said "converged" either way)
    from convergence_core.cli import run_line

    said = run_line(run)
    assert "(converged)" not in said and f"loss tol {stop.tol:.0e}" in said
    assert ("stopped at its residuals' uncertainty" in said) == stop.met
    assert "(converged)" in run_line(optimum)
    stored = run.gpa_stability
    assert stored.n_starts == 4 and stored.tol == stop.tol
    np.testing.assert_allclose(
        stored.per_stimulus("dispersion_spread"), stability.dispersion_spread, atol=1e-15
    )
    np.testing.assert_allclose(
        run.dispersion["mean"], run.gpa.residuals.mean(axis=1), rtol=1e-12
    )
    # a rerun does neither step again
    events.clear()
    precompute(progress=events.append, **options)
    assert all(e.skipped for e in events if e.step in ("gpa", "gpa_stability"))
    # the default run was left as it was
    assert precompute(**_options(tiny_coco, tmp_path)).gpa_stop is None
    with pytest.raises(ValueError, match="gpa_starts is 0; pass gpa_starts >= 1"):
        precompute(**_options(tiny_coco, tmp_path, gpa_stop="uncertainty", gpa_starts=0))
    with pytest.raises(ValueError, match="gpa_stop"):
        precompute(**_options(tiny_coco, tmp_path, gpa_stop="fast"))
    # a damaged record of the stop is an error that says what to do
    gpa_json = run.path / "gpa" / "gpa.json"
    write_json(gpa_json, {**read_json(gpa_json), "stop": {"fraction": "a tenth"}})
    with pytest.raises(ValueError, match="malformed 'stop'.*rerun precompute"):
        load_run(run.path).gpa_stop


def test_a_run_without_gpa_maps_says_to_rerun(tiny_coco, tmp_path, loads):
    run = precompute(**_options(tiny_coco, tmp_path))
    (run.path / "gpa" / "map_0.npy").unlink()
    with pytest.raises(ValueError, match="no GPA maps.*rerun the precompute"):
        load_run(run.path).gpa


def test_interrupted_run_resumes_and_equals_a_clean_run(tiny_coco, tmp_path, loads):
    class Crash(RuntimeError):
        pass

    def crash_after_first_model(event: ProgressEvent) -> None:
        if event.step == "extract" and event.model == VISION[1] and event.done > 0:
            raise Crash("power cut")

    with pytest.raises(Crash):
        precompute(progress=crash_after_first_model, **_options(tiny_coco, tmp_path))
    path = tmp_path / "cache" / "runs" / "tiny"
    manifest = read_json(path / "manifest.json")
    assert not manifest["complete"]
    assert f"extract:{VISION[0]}" in manifest["steps"]
    assert f"extract:{VISION[1]}" not in manifest["steps"]
    with pytest.raises(ValueError, match="incomplete"):
        load_run(path)

    resumed = precompute(**_options(tiny_coco, tmp_path))
    assert loads[VISION[0]] == 1  # finished before the crash: not extracted again
    assert loads[VISION[1]] == 2  # crashed mid-extraction: redone
    assert loads[VISION[2]] == 1 and loads[LANGUAGE[0]] == 1

    clean = precompute(**_options(tiny_coco, tmp_path, run_name="clean"))
    got, expected = _arrays(resumed), _arrays(clean)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))
    assert resumed.stimuli.equals(clean.stimuli)


def test_interrupted_stability_step_resumes_after_its_last_finished_solution(
    tiny_coco, tmp_path, loads, monkeypatch
):
    """Killed after 3 of its 5 GPA solutions (the reference and 2 random starts), the stability
    step solves only the 2 others on the rerun; the run equals a clean one and keeps no
    solution files once done."""
    from convergence_core import procrustes

    class Crash(RuntimeError):
        pass

    first: list[ProgressEvent] = []

    def crash_in_stability(event: ProgressEvent) -> None:
        first.append(event)
        if event.step == "gpa_stability" and event.done == 3:
            raise Crash("power cut")

    with pytest.raises(Crash):
        precompute(progress=crash_in_stability, **_options(tiny_coco, tmp_path))
    assert next(e for e in first if e.step == "gpa_stability" and e.done == 0).detail == ""
    path = tmp_path / "cache" / "runs" / "tiny"
    kept = sorted(p.name for p in (path / "gpa" / "stability_solutions").iterdir())
    assert [name for name in kept if name.endswith("solution.json")] == [
        "0_solution.json", "1_solution.json", "2_solution.json"
    ]
    solves = []
    iterate = procrustes._iterate
    monkeypatch.setattr(
        procrustes, "_iterate", lambda *a, **k: solves.append(k.get("start")) or iterate(*a, **k)
    )
    events: list[ProgressEvent] = []
    resumed = precompute(progress=events.append, **_options(tiny_coco, tmp_path))
    assert len(solves) == 2 and all(start is not None for start in solves)
    start = next(e for e in events if e.step == "gpa_stability" and e.done == 0)
    assert start.detail == "3 of 5 GPA solutions kept from an interrupted run"
    assert not (path / "gpa" / "stability_solutions").exists()
    monkeypatch.setattr(procrustes, "_iterate", iterate)
    clean = precompute(**_options(tiny_coco, tmp_path, run_name="clean"))
    got, expected = resumed.gpa_stability, clean.gpa_stability
    assert got.summary == expected.summary
    pd.testing.assert_frame_equal(got.table, expected.table)


def test_changed_inputs_are_not_served_stale(tiny_coco, tmp_path, loads):
    base = _options(tiny_coco, tmp_path)
    precompute(**base)
    # fewer layers for one model: only that model is re-extracted, its old layer files vanish
    run = precompute(**{**base, "layers": {"fake-vision-b": ["middle"]}})
    assert loads["fake-vision-b"] == 2 and loads["fake-vision-a"] == 1
    assert run.layers("fake-vision-b") == ["middle"]
    assert sorted(p.name for p in (run.path / "embeddings" / "fake-vision-b").iterdir()) == [
        "middle.npy"
    ]
    # a different caption mode re-extracts only the language model
    precompute(**{**base, "caption_mode": "mean"})
    assert loads["fake-language-a"] == 2 and loads["fake-vision-a"] == 1
    # a model removed from the config disappears from the run
    run = precompute(**{**base, "vision_models": list(VISION[:2])})
    assert run.vision_models == list(VISION[:2]) and "fake-vision-c" not in run.manifest.models
    assert not (run.path / "embeddings" / "fake-vision-c").exists()
    assert run.gpa.models == VISION[:2]
    # so does a language model, with its every-caption embeddings (captions/<model>/)
    assert (run.path / "captions" / "fake-language-a").is_dir()
    run = precompute(**{**base, "vision_models": list(VISION[:2]), "language_models": []})
    assert not run.language_models and not (run.path / "captions" / "fake-language-a").exists()
    assert not (run.path / "embeddings" / "fake-language-a").exists()
    # changed dataset bytes: everything is recomputed
    image = sorted((tiny_coco / "images").iterdir())[0]
    from PIL import Image

    with Image.open(image) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    counts = dict(loads)
    run = precompute(**base)
    assert all(loads[m] == counts[m] + 1 for m in (*VISION, *LANGUAGE))
    assert len(run.vision_models) == 3


def test_a_rerun_that_fails_on_a_layer_name_keeps_the_finished_work(tiny_coco, tmp_path, loads):
    """A typo in a layer name is found once the model is loaded: the model's finished extraction
    must survive it, so that the corrected command (here the original one) extracts nothing."""
    base = _options(tiny_coco, tmp_path)
    precompute(**base)
    with pytest.raises(ValueError, match=r"\['middel'\] are not layers of 'fake-vision-b'"):
        precompute(**{**base, "layers": {"fake-vision-b": ["middel"]}})
    assert load_run(tmp_path / "cache" / "runs" / "tiny").manifest.complete  # still opens
    counts = dict(loads)
    run = precompute(**base)
    assert dict(loads) == counts  # nothing extracted again
    assert run.layers("fake-vision-b") == ["early", "middle", "late"]


def test_a_first_run_that_fails_on_a_layer_name_leaves_no_run_folder(tiny_coco, tmp_path, loads):
    """A misspelt layer of the first encoder is found once it is loaded, after the run folder
    was made: a first run left that folder, holding nothing but the stimulus table, for `runs`
    to list as an incomplete run. It is removed; the lock with it; the runs folder stays."""
    from convergence_core.cache import lock_path

    runs = tmp_path / "cache" / "runs"
    with pytest.raises(ValueError, match=r"\['midle'\] are not layers of 'fake-vision-a'"):
        precompute(**_options(tiny_coco, tmp_path, layers={"fake-vision-a": ["midle"]}))
    assert not (runs / "tiny").exists() and not lock_path(runs / "tiny").exists()
    assert runs.is_dir() and list_runs(runs) == []
    # a later one (a misspelt layer of the second model) keeps the first model's extraction
    with pytest.raises(ValueError, match=r"\['midle'\] are not layers of 'fake-vision-b'"):
        precompute(**_options(tiny_coco, tmp_path, layers={"fake-vision-b": ["midle"]}))
    assert [info.name for info in list_runs(runs)] == ["tiny"]


def test_default_run_name_hashes_the_config(tiny_coco, tmp_path, loads):
    options = _options(tiny_coco, tmp_path)
    del options["run_name"]
    a = PrecomputeConfig.from_mapping(options)
    b = PrecomputeConfig.from_mapping({**options, "caption_mode": "mean"})
    c = PrecomputeConfig.from_mapping({**options, "batch_size": 2})
    assert default_run_name(a, "coco") != default_run_name(b, "coco")
    assert default_run_name(a, "coco") == default_run_name(c, "coco")  # batching changes nothing
    # a setting added later names a new folder only when it differs from its default
    stop = PrecomputeConfig.from_mapping({**options, "gpa_stop": "optimum"})
    assert default_run_name(stop, "coco") == default_run_name(a, "coco")
    stop = PrecomputeConfig.from_mapping({**options, "gpa_stop": "uncertainty"})
    assert default_run_name(stop, "coco") != default_run_name(a, "coco")
    run = precompute(a)
    assert run.path.name == default_run_name(a, "tiny-coco")


def test_caption_mode_mean_averages_caption_embeddings(tiny_coco, tmp_path, loads):
    run = precompute(**_options(tiny_coco, tmp_path, caption_mode="mean", thumbnails=False))
    encoder = FakeEncoder("fake-language-a", "language")
    captions = run.stimuli["captions"].iloc[2]
    expected = np.mean(
        [encoder.encode([c])["late"][0].astype(np.float64) for c in captions], axis=0
    )
    np.testing.assert_allclose(run.embeddings["fake-language-a"]["late"][2], expected, rtol=1e-6)
    assert run.thumbnail_path(0) is None


def test_bad_images_stop_or_are_dropped_and_recorded(tiny_coco, tmp_path, loads):
    broken = sorted((tiny_coco / "images").iterdir())[3]
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="drop"):
        precompute(**_options(tiny_coco, tmp_path))
    assert sum(loads.values()) == 0  # stopped before loading any model
    run = precompute(**_options(tiny_coco, tmp_path, drop_bad=True))
    assert run.n_stimuli == 5
    dropped = run.manifest.dataset.dropped
    assert [d["image"] for d in dropped] == [f"images/{broken.name}"]
    assert all(run.embeddings[m]["late"].shape[0] == 5 for m in run.models)


def test_config_errors_name_the_fix(tiny_coco, tmp_path, loads):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        precompute(**_options(tiny_coco, tmp_path, vision_models=[*VISION, "no-such-model"]))
    with pytest.raises(ValueError, match="is a language model but was listed as a vision"):
        precompute(
            **_options(
                tiny_coco, tmp_path, vision_models=[*VISION, LANGUAGE[0]], language_models=[]
            )
        )
    with pytest.raises(ValueError, match="at least 2 vision models"):
        precompute(**_options(tiny_coco, tmp_path, vision_models=VISION[:1]))
    with pytest.raises(ValueError, match="caption_mode"):
        precompute(**_options(tiny_coco, tmp_path, caption_mode="all"))
    with pytest.raises(ValueError, match="unknown config key"):
        precompute(**_options(tiny_coco, tmp_path, colour="blue"))
    with pytest.raises(ValueError, match="not layers of 'fake-vision-a'"):
        precompute(**_options(tiny_coco, tmp_path, layers={"fake-vision-a": ["nope"]}))
    with pytest.raises(ValueError, match=r"\['nope'\] are not layers"):
        precompute(**_options(tiny_coco, tmp_path, gpa_layers={"fake-vision-b": "nope"}))
    # each layer error surfaced right after loading the model concerned
    assert loads == Counter({"fake-vision-a": 2, "fake-vision-b": 1})


def test_a_bad_feature_file_stops_the_run_before_any_model_is_extracted(
    tiny_coco, tmp_path, loads
):
    """A feature file's ids are checked against the data set before the first encoder loads: a
    missing id list or an id the data set lacks must not wait for the extractions to be found."""
    from convergence_core.sources import FeatureFileError

    ids = [str(i) for i in load_dataset(tiny_coco).stimuli["id"]]
    features = np.random.default_rng(0).standard_normal((len(ids), 5)).astype(np.float32)
    np.save(tmp_path / "subj.npy", features)  # no subj.npy.ids.txt
    options = _options(tiny_coco, tmp_path, features={"subj": {"V1": str(tmp_path / "subj.npy")}},
                       modalities={"subj": "brain"})
    with pytest.raises(FeatureFileError, match="no id list"):
        precompute(**options)
    (tmp_path / "subj.npy.ids.txt").write_text("\n".join([*ids[:-1], "ghost"]) + "\n")
    with pytest.raises(FeatureFileError, match="no row for 1 of the data set's"):
        precompute(**options)
    assert loads == Counter()  # no encoder was loaded
    assert not (tmp_path / "cache" / "runs" / "tiny").exists()  # and nothing was written
    (tmp_path / "subj.npy.ids.txt").write_text("\n".join(ids) + "\n")
    run = precompute(**options)
    np.testing.assert_array_equal(run.embeddings["subj"]["V1"], features)


def test_gpa_layer_is_extracted_even_with_default_layers(tiny_coco, tmp_path, loads):
    run = precompute(
        **_options(tiny_coco, tmp_path, layers="default", gpa_layers={VISION[1]: "late"})
    )
    assert run.layers(VISION[0]) == ["middle"]
    assert run.layers(VISION[1]) == ["middle", "late"]
    assert run.gpa.layers == ("middle", "late", "middle")
    assert run.default_layer(VISION[1]) == "late"


def test_config_files_json_and_toml(tiny_coco, tmp_path, loads):
    options = _options(tiny_coco, tmp_path, layers="default")
    (tmp_path / "c.json").write_text(json.dumps(options), encoding="utf-8")
    toml_lines = [
        f'dataset = "{tiny_coco}"',
        f"vision_models = {json.dumps(list(VISION))}",
        f"language_models = {json.dumps(list(LANGUAGE))}",
        'layers = "default"',
        'run_name = "tiny"',
        f'cache_root = "{tmp_path / "cache"}"',
    ]
    (tmp_path / "c.toml").write_text("\n".join(toml_lines), encoding="utf-8")
    from_json = PrecomputeConfig.from_file(tmp_path / "c.json")
    from_toml = PrecomputeConfig.from_file(tmp_path / "c.toml")
    assert from_json.vision_models == from_toml.vision_models == VISION
    run = precompute(tmp_path / "c.toml")
    assert run.layers("fake-vision-a") == ["middle"]
    (tmp_path / "c.yaml").write_text("x: 1", encoding="utf-8")
    with pytest.raises(ValueError, match=".json or .toml"):
        PrecomputeConfig.from_file(tmp_path / "c.yaml")


def test_a_device_name_torch_does_not_know_is_refused_before_any_work() -> None:
    """'gpu' reached torch only when the neighbour lists were built: a traceback, after the run's
    embeddings were written."""
    base = {"dataset": "x", "vision_models": ["a", "b"]}
    for device in ("gpu", "cuda:", "CUDA", "cuda:x", " cpu"):
        with pytest.raises(ValueError, match=r"'device' = .* is not accepted.*\"cuda:N\""):
            PrecomputeConfig.from_mapping({**base, "device": device})
    for device in ("cpu", "cuda", "cuda:1", "mps", "mps:0"):
        assert PrecomputeConfig.from_mapping({**base, "device": device}).device == device


def test_a_live_writer_locks_the_run(tiny_coco, tmp_path, loads):

    run_path = tmp_path / "cache" / "runs" / "tiny"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = run_path.with_name(".tiny.lock")
        lock.parent.mkdir(parents=True)
        lock.write_text(str(sleeper.pid))
        events: list[ProgressEvent] = []
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            precompute(
                progress=events.append, lock_wait_seconds=0.6, **_options(tiny_coco, tmp_path)
            )
        assert [e.step for e in events].count("waiting") == 1
        # who holds the lock, where it is, for how long, and what to do if it is no precompute
        (waiting,) = [e.detail for e in events if e.step == "waiting"]
        assert f"process {sleeper.pid} holds {lock}" in waiting and "up to 1 s" in waiting
        assert "delete that file if the process is not a precompute" in waiting
        assert sum(loads.values()) == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its stale lock is taken over and released afterwards
    run = precompute(**_options(tiny_coco, tmp_path))
    assert run.n_stimuli == 6 and not lock.exists()
    with run_lock(run_path):
        assert lock.read_text() == str(os.getpid())
    assert [r.name for r in list_runs(tmp_path / "cache" / "runs")] == ["tiny"]  # lock not listed


def test_a_foreign_folder_with_the_run_name_is_never_deleted(tiny_coco, tmp_path, loads):
    folder = tmp_path / "cache" / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    # files whose names look like temporary files (from the reliability audit: these were deleted
    # before the folder was refused), and one named exactly as ours
    (folder / "notes.tmp-1").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "draft.tmp-final.docx").write_text("mine")
    with pytest.raises(ValueError, match="not a run"):
        precompute(**_options(tiny_coco, tmp_path))
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "notes.tmp-1").read_text() == "mine"
    assert (folder / "sub" / "draft.tmp-final.docx").read_text() == "mine"
    # the same folder given by path to write_run_from_embeddings, and linked into the cache
    from convergence_core.precompute import write_run_from_embeddings

    with pytest.raises(ValueError, match="not a run"):
        stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(6)],
                                "image": [f"{i}.jpg" for i in range(6)],
                                "captions": [[f"caption {i}"] for i in range(6)]})
        rng = np.random.default_rng(0)
        write_run_from_embeddings(folder, stimuli,
                                  {"v": {"l": rng.random((6, 4))}, "w": {"l": rng.random((6, 3))}},
                                  vision_models=["v", "w"], language_models=[], thumbnails=False)
    linked = tmp_path / "cache" / "runs" / "linked"
    linked.symlink_to(folder)
    with pytest.raises(ValueError, match="not a run"):
        precompute(**_options(tiny_coco, tmp_path, run_name="linked"))
    assert sorted(p.name for p in folder.rglob("*")) == [
        "draft.tmp-final.docx", "notes.tmp-1", "notes.txt", "sub"
    ]


def test_temp_files_of_a_killed_process_are_cleaned_on_resume(tiny_coco, tmp_path, loads):
    run = precompute(**_options(tiny_coco, tmp_path))
    stray = run.path / "embeddings" / "fake-vision-a" / "late.npy.tmp-99999"
    stray.write_bytes(b"half")
    precompute(**_options(tiny_coco, tmp_path))
    assert not stray.exists()


@pytest.mark.parametrize(
    "lost",
    ["stimuli.parquet", "gpa/residuals.npy", "gpa/scales.npy", "gpa/map_0.npy",
     "gpa/mean_1.npy", "gpa/stability.parquet", "pca/scores.npy", "properties.json",
     "thumbnails/3.jpg"],
)
def test_a_deleted_file_of_a_finished_step_is_written_again_on_rerun(
    tiny_coco, tmp_path, loads, lost
):
    """From the reliability audit: a step was 'done' while a file it wrote was gone, so every
    rerun failed on the missing file (or reported success over it); deleting a damaged file, as
    the errors advise, could not repair the run. The rerun now writes that step again."""
    from convergence_core.run_checks import check_run_files

    run = precompute(**_options(tiny_coco, tmp_path))
    before = {name: np.load(run.path / name) for name in ("gpa/residuals.npy", "pca/scores.npy")}
    (run.path / lost).unlink()
    again = precompute(**_options(tiny_coco, tmp_path))
    assert (again.path / lost).is_file()
    check_run_files(load_run(again.path))
    for name, values in before.items():
        np.testing.assert_allclose(np.load(again.path / name), values, atol=1e-10)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda info: info.pop("converged"), "has no 'converged'"),
        (lambda info: info.update(n_iter="many"), "'n_iter' is 'many', not a count"),
        (lambda info: info.update(models=info["models"][:1]), r"1 models but \d layers"),
        (lambda info: info.update(layers=None), "'layers' is None, not a list of names"),
        (lambda info: info.update(converged="no"), "'converged' is 'no', not true or false"),
    ],
)
def test_altered_gpa_settings_say_what_and_the_fix_which_repairs_the_run(
    tiny_coco, tmp_path, loads, change, said
):
    """gpa/gpa.json altered or damaged: every reader of the run's GPA (precompute's summary, the
    pages, the report) failed with a bare KeyError or a zip() length error. It names the field
    now, and its fix (delete the GPA folder, rerun) gives back the same residuals."""
    from convergence_core.cache import CacheFormatError

    run = precompute(**_options(tiny_coco, tmp_path))
    before = np.load(run.path / "gpa" / "residuals.npy")
    settings_file = run.path / "gpa" / "gpa.json"
    info = json.loads(settings_file.read_text())
    change(info)
    settings_file.write_text(json.dumps(info))
    with pytest.raises(CacheFormatError, match="delete the run's GPA folder") as raised:
        load_run(run.path).gpa  # noqa: B018 - reading it is the test
    assert re.search(said, str(raised.value)) and str(settings_file) in str(raised.value)
    shutil.rmtree(run.path / "gpa")
    again = precompute(**_options(tiny_coco, tmp_path))
    np.testing.assert_allclose(np.load(again.path / "gpa" / "residuals.npy"), before, atol=1e-10)


def test_presets_are_complete_configs(monkeypatch, tmp_path):
    from convergence_core.presets import PRESETS, preset_config

    monkeypatch.setenv("CONVERGENCE_DEMO_DATA", str(tmp_path / "elsewhere"))
    demo = PrecomputeConfig.from_mapping(preset_config("demo"))
    assert demo.dataset == str(tmp_path / "elsewhere")  # follows the setting
    assert demo.vision_models == ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
    assert demo.language_models == ("minilm", "gemma-3-270m")
    assert demo.run_name == "demo" and demo.caption_mode == "first"
    assert PrecomputeConfig.from_mapping(preset_config("imagenet")).run_name == "imagenet"
    assert set(PRESETS) >= {"demo", "imagenet"}
    with pytest.raises(ValueError, match="choose one of"):
        preset_config("nope")


def test_a_second_writer_waits_for_the_first_then_reuses_its_work(tiny_coco, tmp_path, loads):
    run_path = tmp_path / "cache" / "runs" / "tiny"
    lock = run_path.with_name(".tiny.lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    reaper = threading.Thread(target=holder.wait)  # a dead, reaped process, as after a kill
    reaper.start()
    try:
        lock.write_text(str(holder.pid))
        # the holder exits (without removing its lock, like a killed process): the waiter
        # notices the dead pid and takes over
        events: list[ProgressEvent] = []
        run = precompute(
            progress=events.append, lock_wait_seconds=30, **_options(tiny_coco, tmp_path)
        )
    finally:
        holder.kill()
        reaper.join()
    assert "waiting" in [e.step for e in events] and run.n_stimuli == 6 and not lock.exists()


def test_an_id_list_keeping_too_few_stimuli_is_refused_before_the_run_is_touched(
    tiny_coco, tmp_path, loads
):
    """--stimuli keeping 1 stimulus reset the existing run, then failed on K = 0."""
    run = precompute(**_options(tiny_coco, tmp_path, thumbnails=False))
    before = run.layout.manifest.read_bytes()
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{run.stimuli['id'][0]}\n{run.stimuli['id'][1]}\n")
    with pytest.raises(ValueError, match=r"--stimuli\) keeps 2 of the 6 stimuli.*at least 3"):
        precompute(**_options(tiny_coco, tmp_path, thumbnails=False, stimuli=str(ids)))
    assert run.layout.manifest.read_bytes() == before and load_run(run.path).n_stimuli == 6


def test_an_id_list_naming_a_stimulus_drop_bad_dropped_says_so(tiny_coco, tmp_path, loads):
    """The id of a stimulus dropped for its corrupt image was reported as one the data set does
    not have, with the advice to spell it as the data set does."""
    broken = sorted((tiny_coco / "images").iterdir())[3]
    broken.write_bytes(b"not a jpeg")
    ids = [str(i) for i in load_dataset(tiny_coco).stimuli["id"]]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    options = _options(tiny_coco, tmp_path, drop_bad=True, stimuli=str(tmp_path / "ids.txt"))
    with pytest.raises(ValueError, match=rf"--drop-bad dropped \(e.g. '{ids[3]}': .*take them off"):
        precompute(**options)
    assert sum(loads.values()) == 0


def test_the_default_run_name_does_not_depend_on_how_paths_are_spelt(tmp_path, monkeypatch):
    """./f/a.npy, f//a.npy and /abs/f/a.npy named three runs (three extractions)."""
    monkeypatch.chdir(tmp_path)
    names = set()
    for spelling in ("f/a.npy", "./f/a.npy", "f//a.npy", str(tmp_path / "f" / "a.npy")):
        config = PrecomputeConfig.from_mapping({
            "dataset": spelling.replace("a.npy", "set/"), "vision_models": ["x"],
            "features": {"a": spelling, "b": {"L": spelling.replace("a.npy", "b.npy")}},
            "modalities": {"a": "vision", "b": "vision"}, "stimuli": spelling + ".ids",
            "weights": {"x": spelling.replace("a.npy", "x.pth")},
        })
        names.add(default_run_name(config, "set"))
    assert len(names) == 1
    hub = PrecomputeConfig.from_mapping({"dataset": "hf:org/set", "vision_models": ["x", "y"]})
    assert hub.to_dict()["dataset"] == "hf:org/set" and default_run_name(hub, "set")


def test_a_run_named_from_paths_as_spelt_is_resumed_under_that_name(
    tiny_coco, tmp_path, loads, monkeypatch
):
    """Runs of relative paths (--dataset coco-mini) were named from the spelling; once paths were
    normalised before the hash, a rerun recomputed everything into a new folder."""
    import convergence_core.precompute as module

    monkeypatch.chdir(tiny_coco.parent)
    options = _options(tiny_coco, tmp_path, thumbnails=False, dataset=tiny_coco.name,
                       run_name=None)
    config, dataset = PrecomputeConfig.from_mapping(options), load_dataset(tiny_coco).name
    new = default_run_name(config, dataset)
    with monkeypatch.context() as patch:  # the earlier name: the paths hashed as given
        patch.setattr(module, "_spelt_alike", lambda spelt: spelt)
        old = default_run_name(config, dataset)
    assert old != new
    first = precompute(**{**options, "run_name": old})
    loads.clear()
    assert precompute(**options).path == first.path and sum(loads.values()) == 0
    assert not (tmp_path / "cache" / "runs" / new).exists()
    elsewhere = precompute(**{**options, "cache_root": str(tmp_path / "other")})
    assert elsewhere.path.name == new  # no earlier run: the normalised name


def test_weights_for_a_model_not_in_the_run_are_refused():
    """--weights efficientnet_lite0=... for the run's efficientnet-lite0 was silently ignored."""
    base = {"dataset": "x", "vision_models": ["a-model", "b"]}
    with pytest.raises(ValueError, match=r"weights names 'a_model', which is not among .*--weigh"):
        PrecomputeConfig.from_mapping({**base, "weights": {"a_model": "/w.pth"}})
    assert PrecomputeConfig.from_mapping({**base, "weights": {"a-model": "/w.pth"}}).weights


def test_a_device_that_is_not_here_is_refused_before_any_work(
    tiny_coco, tmp_path, loads, monkeypatch
):
    """--device cuda without CUDA was refused only once every image was decoded and the run
    folder was marked incomplete (or reset)."""
    import convergence_core.datasets as datasets_module

    run = precompute(**_options(tiny_coco, tmp_path, thumbnails=False))
    before = run.layout.manifest.read_bytes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(datasets_module, "check_dataset", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ValueError, match="CUDA is not available.*--device cpu") as caught:
        precompute(**_options(tiny_coco, tmp_path, thumbnails=False, device="cuda"))
    # and says that nothing else was checked yet (the paper's config offline: the device alone)
    assert "weights are checked after the device: --device cpu also shows" in str(caught.value)
    assert run.layout.manifest.read_bytes() == before and sum(loads.values()) == len(loads)


def test_a_hugging_face_data_set_keeps_its_images_under_the_given_cache(tmp_path, monkeypatch):
    """--cache DIR with hf:... wrote the data set's images under the default cache."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(5)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"image": images, "text": [f"caption {i}" for i in range(5)]}, features=features
    ).save_to_disk(str(tmp_path / "local"))
    for name, width in (("a", 4), ("b", 5)):
        np.save(tmp_path / f"{name}.npy", rng.normal(size=(5, width)).astype(np.float32))
        (tmp_path / f"{name}.npy.ids.txt").write_text("\n".join(map(str, range(5))))
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "default"))
    run = precompute(
        dataset=f"hf:{tmp_path / 'local'}", cache_root=str(tmp_path / "mine"), gpa_starts=0,
        features={m: str(tmp_path / f"{m}.npy") for m in "ab"},
        modalities={"a": "vision", "b": "vision"},
    )
    assert run.image_path(0).is_relative_to(tmp_path / "mine" / "datasets")
    assert not (tmp_path / "default").exists()


def test_a_hugging_face_data_set_keeps_the_librarys_own_cache(
    tmp_path, monkeypatch, hub_offline
):
    """--cache DIR with hf:... also made DIR the datasets library's own cache (load_dataset's
    cache_dir): HF_DATASETS_CACHE was ignored and every download fetched again. (Offline mode:
    the hub is never asked, not even probed.)"""
    datasets = pytest.importorskip("datasets")
    from convergence_core.datasets import DatasetUnavailableError

    seen: dict = {}

    def load_dataset(*args, **kwargs):
        seen.update(kwargs)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for name in "ab":
        np.save(tmp_path / f"{name}.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(DatasetUnavailableError):
        precompute(
            dataset="hf:org/set", cache_root=str(tmp_path / "mine"),
            features={m: str(tmp_path / f"{m}.npy") for m in "ab"},
            modalities={"a": "vision", "b": "vision"},
        )
    assert "cache_dir" in seen and seen["cache_dir"] is None


def test_a_list_size_below_the_typicality_k_gives_exact_typicality(tiny_coco, tmp_path, loads):
    """--list-size below properties.TYPICALITY_K crashed the last step of every run: typicality
    read k columns of lists that hold fewer; it is computed exactly instead."""
    from convergence_core import properties as props

    run = precompute(**_options(tiny_coco, tmp_path, list_size=3, thumbnails=False))
    assert run.manifest.complete and run.neighbours(VISION[0], "middle").k_max == 3
    for model in VISION:  # k = n - 1 = 5 here
        features = run.embeddings[model][run.default_layer(model)]
        np.testing.assert_allclose(
            run.properties.values[f"neighbour_distance:{model}"],
            props.neighbour_distance(props.nearest_similarities(features, 5), 5),
        )


def test_an_id_list_keeps_ids_holding_unicode_line_separators_whole(tmp_path):
    """str.splitlines also breaks at U+2028, U+0085 and \\x1c-\\x1e, which an id may hold: such
    an id was split in two and reported as unknown."""
    from convergence_core.precompute import _read_id_list

    ids = ["a\u2028b", "c\x85d", "e"]
    listed = tmp_path / "keep.ids.txt"
    listed.write_text("a\u2028b\r\nc\x85d\n\ne\n", encoding="utf-8")
    assert _read_id_list(listed, ids, "stimuli") == ids


# -- GPA's answer: the lowest minimum of Gower's start and the stability diagnostic's starts ------
def _planted_gpa_inputs(seed: int = 4) -> list[np.ndarray]:
    """tests/test_gpa_stability.py's planted set (4 models of width 48/32/40/48, 300 stimuli, a
    24-d shared latent plus noise). Seed 4, stored as float32 as a run stores it: GPA from
    Gower's start stops in a local minimum 1.03e-5 above the one random starts 1-3 of seed 0
    reach, with dispersions up to 0.8 % apart."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((300, 24))
    return [z @ rng.standard_normal((24, d)) + rng.standard_normal((300, d))
            for d in (48, 32, 40, 48)]


def _planted_run(path: Path, seed: int = 4, **options):
    from convergence_core.precompute import write_run_from_embeddings

    stimuli = pd.DataFrame(
        {"id": [f"s{j}" for j in range(300)], "image": "", "captions": [[""]] * 300}
    )
    names = ["a", "b", "c", "d"]
    return write_run_from_embeddings(
        path, stimuli, {m: {"x": x} for m, x in zip(names, _planted_gpa_inputs(seed))},
        vision_models=names, language_models=[], thumbnails=False, **options,
    )


def _from_maps(run) -> tuple[np.ndarray, float]:
    """A run's GPA residuals (n, M) and loss recomputed from its stored maps, means and scales
    and its stored inputs alone."""
    gpa = run.gpa
    aligned = np.stack([
        ((np.asarray(x, dtype=np.float64) - mean) / scale) @ rotation
        for x, mean, scale, rotation in zip(gpa.inputs, gpa.means, gpa.scales, gpa.maps)
    ])
    deviations = aligned - aligned.mean(axis=0)
    return np.linalg.norm(deviations, axis=2).T, float(np.sum(deviations**2))


def _gpa_files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (path / "gpa").glob("*.npy")}


def test_a_run_takes_gpa_from_the_lowest_minimum_its_starts_found(tmp_path):
    """The audit's finding: the run kept GPA from Gower's start although its own stability step
    found a lower minimum. The run's GPA (maps, residuals, loss) is now random start 1's, its
    dispersion and PCA come from it (checked against its maps), the records say so; a rerun does
    nothing; fewer starts that adopt the same start change only the diagnostic; no starts bring
    back Gower's start's solution and its dispersion, and starts again the lower one."""
    from convergence_core.dispersion import dispersion_scores
    from convergence_core.procrustes import generalized_procrustes

    path = tmp_path / "planted"
    events: list[ProgressEvent] = []
    run = _planted_run(path, progress=events.append)
    gower = generalized_procrustes(run.gpa.inputs)
    residuals, loss = _from_maps(run)
    np.testing.assert_allclose(run.gpa.residuals, residuals, rtol=1e-10, atol=1e-13)
    assert run.gpa.loss_history[-1] == pytest.approx(loss, abs=1e-12)
    assert 1e-5 < gower.loss_history[-1] - loss < 1.1e-5
    dispersion = residuals.mean(axis=1)
    np.testing.assert_allclose(run.dispersion["mean"], dispersion, rtol=1e-10)
    np.testing.assert_allclose(
        run.dispersion["pc1"], dispersion_scores(residuals, method="pc1"), rtol=1e-8, atol=1e-12
    )
    moved = np.abs(gower.residuals.mean(axis=1) - dispersion) / dispersion
    assert 5e-3 < moved.max() < 1e-2  # what keeping Gower's start's solution cost
    solution = read_json(path / "gpa" / "gpa.json")["solution"]
    assert (solution["start"], solution["seed"]) == (1, 0)
    assert solution["loss_gap"] == pytest.approx(gower.loss_history[-1] - loss, abs=1e-12)
    assert solution["max_relative_dispersion_change"] == pytest.approx(moved.max(), rel=1e-6)
    steps = run.manifest.steps
    assert steps["gpa"].details["solution"] == {"start": 1, "seed": 0}
    assert steps["gpa_stability"].details["adopted"] == 1
    stored = run.gpa_stability
    assert stored.summary["adopted_solution"] == 1.0
    assert stored.summary["reference_at_best_optimum"] == 0.0
    assert "from random start 1: the residuals and dispersion are that solution's" in (
        stored.describe(run.n_stimuli)
    )
    np.testing.assert_allclose(stored.per_stimulus("dispersion"), run.dispersion["mean"],
                               rtol=1e-10)
    done = [e for e in events if e.step == "gpa_stability" and e.done == e.total]
    assert "random start 1's" in done[-1].detail
    # a rerun with the same inputs does nothing
    files = _gpa_files(path)
    events.clear()
    _planted_run(path, progress=events.append)
    assert all(e.skipped for e in events if e.step in ("gpa", "gpa_stability", "dispersion"))
    assert _gpa_files(path) == files
    # 2 starts adopt the same start 1: only the diagnostic is computed again
    events.clear()
    two = _planted_run(path, progress=events.append, gpa_starts=2)
    redone = {e.step for e in events if not e.skipped}
    assert "gpa_stability" in redone and not redone & {"gpa", "dispersion"}
    assert _gpa_files(path) == files and two.gpa_stability.n_starts == 2
    # no starts: nothing to adopt, GPA from Gower's start and its dispersion again
    events.clear()
    none = _planted_run(path, progress=events.append, gpa_starts=0)
    assert {"gpa", "dispersion"} <= {e.step for e in events if not e.skipped}
    assert none.gpa_stability is None and "solution" not in read_json(path / "gpa" / "gpa.json")
    np.testing.assert_allclose(none.gpa.residuals, gower.residuals, rtol=0, atol=1e-13)
    np.testing.assert_allclose(none.dispersion["mean"], gower.residuals.mean(axis=1), rtol=1e-12)
    # and starts again: the lower minimum again, its numbers as the first time
    again = _planted_run(path, gpa_starts=4)
    np.testing.assert_allclose(again.gpa.residuals, run.gpa.residuals, rtol=0, atol=1e-14)
    np.testing.assert_allclose(again.dispersion["mean"], run.dispersion["mean"], rtol=1e-12)


@pytest.mark.parametrize("crash", ["stability", "adoption", "before_dispersion"])
def test_an_interrupted_adoption_resumes_to_the_clean_run(tmp_path, monkeypatch, crash):
    """Interrupted within the stability step (after 3 of 5 solutions), while gpa/ is being
    replaced by the adopted solution (one file written), or after the adoption and before the
    dispersion: no finished step records a half-written gpa/, the resumed run reuses the kept
    solutions (only GPA from Gower's start is solved again, where gpa/ was half replaced) and
    equals a clean run."""
    import convergence_core.precompute as pipeline
    from convergence_core import procrustes

    class Crash(RuntimeError):
        pass

    def crash_at(event: ProgressEvent) -> None:
        if crash == "stability" and event.step == "gpa_stability" and event.done == 3:
            raise Crash("power cut")
        if crash == "before_dispersion" and event.step == "gpa_stability" and (
            event.done == event.total
        ):
            raise Crash("power cut")

    if crash == "adoption":
        def half_written(layout, result, *args, **kwargs):
            np.save(layout.gpa_array("residuals"), result.residuals)
            raise Crash("power cut")

        monkeypatch.setattr(pipeline, "write_gpa_solution", half_written)
    path = tmp_path / "planted"
    with pytest.raises(Crash):
        _planted_run(path, progress=crash_at)
    monkeypatch.undo()
    steps = read_json(path / "manifest.json")["steps"]
    assert ("gpa" in steps) == (crash != "adoption")  # forgotten while gpa/ is replaced
    assert "dispersion" not in steps
    with pytest.raises(ValueError, match="incomplete"):
        load_run(path)
    solves = []
    iterate = procrustes._iterate
    monkeypatch.setattr(
        procrustes, "_iterate", lambda *a, **k: solves.append(k.get("start")) or iterate(*a, **k)
    )
    resumed = _planted_run(path)
    expected_solves = {"stability": [False, False], "adoption": [True], "before_dispersion": []}
    assert [start is None for start in solves] == expected_solves[crash]
    monkeypatch.setattr(procrustes, "_iterate", iterate)
    assert not (path / "gpa" / "stability_solutions").exists()
    clean = _planted_run(tmp_path / "clean")
    assert resumed.manifest.steps["gpa"].details["solution"] == {"start": 1, "seed": 0}
    np.testing.assert_allclose(resumed.gpa.residuals, clean.gpa.residuals, rtol=0, atol=1e-14)
    for a, b in zip(resumed.gpa.maps, clean.gpa.maps):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)
    np.testing.assert_allclose(resumed.dispersion["mean"], clean.dispersion["mean"], rtol=1e-12)
    assert resumed.gpa_stability.summary == clean.gpa_stability.summary


def test_a_deleted_gpa_file_of_an_adopted_run_gives_back_the_adopted_solution(tmp_path):
    """Deleting a file of gpa/ solves GPA again from Gower's start: the diagnostic must weigh it
    again, or the run would keep Gower's worse minimum under a record that says otherwise."""
    path = tmp_path / "planted"
    run = _planted_run(path)
    before = np.array(run.gpa.residuals)
    (path / "gpa" / "map_2.npy").unlink()
    again = _planted_run(path)
    assert again.manifest.steps["gpa"].details["solution"] == {"start": 1, "seed": 0}
    np.testing.assert_allclose(again.gpa.residuals, before, rtol=0, atol=1e-14)
    np.testing.assert_allclose(again.dispersion["mean"], before.mean(axis=1), rtol=1e-12)


def test_a_run_written_before_adoption_is_kept_or_solved_again_as_its_diagnostic_says(tmp_path):
    """A run written before GPA adopted its lowest-loss solution has Gower's start's GPA and a
    stability summary without the adoption entries. Where that summary found Gower's start at
    the lowest minimum (seed 0) the new code adopts Gower's start too: a rerun computes nothing
    and only adds the entries. Where it found a lower minimum (seed 4), opening the run says to
    rerun; the rerun computes the diagnostic again, adopts start 1 and recomputes the
    dispersion: the run then equals one written by this version."""
    from convergence_core.procrustes import generalized_procrustes
    from convergence_core.run_writer import fingerprint

    def make_old(path: Path, seed: int) -> None:
        """What the previous version left: GPA from Gower's start (as with gpa_starts=0), then
        its stability step's record of 4 starts, summary without the adoption entries."""
        _planted_run(path, seed=seed, gpa_starts=0)
        newer = _planted_run(tmp_path / f"new-{seed}", seed=seed)
        for name in ("stability.json", "stability.parquet"):
            shutil.copy(newer.path / "gpa" / name, path / "gpa" / name)
        record = read_json(path / "gpa" / "stability.json")
        for key in ("adopted_solution", "adopted_loss_gap",
                    "adopted_max_relative_dispersion_change"):
            record["summary"].pop(key)
        write_json(path / "gpa" / "stability.json", record)
        manifest = read_json(path / "manifest.json")
        gpa_inputs = manifest["steps"]["gpa"]["inputs"]
        manifest["steps"]["gpa_stability"] = {
            "inputs": fingerprint("gpa_stability", gpa_inputs, 4, 0), "done": "2026-01-01"
        }
        write_json(path / "manifest.json", manifest)

    # Gower's start at the lowest minimum: kept, nothing computed
    kept = tmp_path / "old-0"
    make_old(kept, seed=0)
    files, said = _gpa_files(kept), load_run(kept).gpa_stability.describe(300)
    assert "Gower" not in said
    events: list[ProgressEvent] = []
    upgraded = _planted_run(kept, seed=0, progress=events.append)
    assert all(e.skipped for e in events if e.step in ("gpa", "gpa_stability", "dispersion"))
    assert _gpa_files(kept) == files
    assert upgraded.gpa_stability.summary["adopted_solution"] == 0.0
    assert upgraded.gpa_stability.describe(300) == said
    # Gower's start above another minimum: opened, the run says to rerun; rerun, it adopts
    stale = tmp_path / "old-4"
    make_old(stale, seed=4)
    old = load_run(stale)
    assert "rerun its precompute command" in old.gpa_stability.describe(old.n_stimuli)
    gower = generalized_procrustes(old.gpa.inputs)
    np.testing.assert_allclose(old.dispersion["mean"], gower.residuals.mean(axis=1), rtol=1e-12)
    events.clear()
    fixed = _planted_run(stale, progress=events.append)
    redone = {e.step for e in events if not e.skipped}
    assert {"gpa_stability", "dispersion"} <= redone and "gpa" not in redone
    new = load_run(tmp_path / "new-4")
    assert fixed.manifest.steps["gpa"].details["solution"] == {"start": 1, "seed": 0}
    np.testing.assert_allclose(fixed.gpa.residuals, new.gpa.residuals, rtol=0, atol=1e-14)
    np.testing.assert_allclose(fixed.dispersion["mean"], new.dispersion["mean"], rtol=1e-12)
    assert fixed.gpa_stability.summary == new.gpa_stability.summary
