"""Paths that a run's manifest or a mistyped argument names, handled before anything is read.

* ``report --embed-captions`` loaded a language model from the weights path the run's manifest
  records (``settings.weights``): a tampered manifest could make it read weights from anywhere.
  Now only a path inside the cache's model folder or the data folder (symbolic links resolved)
  is taken from the manifest; any other is refused naming the field and the fix
  (``--weights MODEL=PATH``).
* ``load_hf`` (``--dataset hf:...``) with a mistyped local path (``./data/wit``) probed the hub
  (up to 5 s) and then said the hub could not be reached; a name that cannot be a hub id and is
  not there now fails at once, naming the path, without asking the hub.

Each test here failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest

from convergence_core import analyses, caption_embeddings, models, report, settings
from convergence_core.run import load_run
from tests.fixtures_runs import make_synthetic_run

LANGUAGE = "language-a"
LAYER = "layer3"

# --------------------------------------------------------------------------- manifest weights


class _Loaded(Exception):
    """Raised by the stand-in ``load_encoder`` once it has recorded its call."""


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A cache and a data folder of their own (the roots a manifest's weights may lie in), and a
    folder outside both."""
    folders = {name: tmp_path / name for name in ("cache", "data", "elsewhere")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setenv("CONVERGENCE_DEMO_DATA", str(settings.demo_data_root()))  # the stimuli
    monkeypatch.setenv("CONVERGENCE_CACHE", str(folders["cache"]))
    monkeypatch.setenv("CONVERGENCE_DATA", str(folders["data"]))
    return folders


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``models.load_encoder`` replaced: it records the weights it was asked to load, then stops
    (raising :class:`_Loaded`)."""
    calls: list[object] = []

    def load_encoder(name, device="cpu", dtype=None, weights=None):
        calls.append(weights)
        raise _Loaded(name)

    monkeypatch.setattr(models, "load_encoder", load_encoder)
    return calls


def _run_naming_weights(cache: Path, weights: object):
    """A small run whose language model ``language-a`` came from an encoder, and whose manifest
    names ``weights`` as its weights (as a tampered, or a moved, run folder would); its stimuli
    are coco-mini's first 30, five captions each."""
    run = make_synthetic_run(cache / "runs", n=30, thumbnails=False)
    manifest_path = run.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"][LANGUAGE]["source"] = "encoder"
    manifest["settings"]["weights"] = weights
    manifest_path.write_text(json.dumps(manifest))
    loaded = load_run(run.path)
    assert loaded.manifest.models[LANGUAGE].from_encoder
    return loaded


def test_manifest_weights_outside_the_roots_are_never_loaded(roots, loads) -> None:
    planted = roots["elsewhere"] / "weights"
    planted.mkdir()
    run = _run_naming_weights(roots["cache"], {LANGUAGE: str(planted)})
    with pytest.raises(ValueError) as info:
        caption_embeddings.embed_captions(run, LANGUAGE, [LAYER])
    assert loads == []  # refused before any model loads
    message = str(info.value)
    assert str(planted) in message and "settings.weights" in message
    assert f"--weights {LANGUAGE}=PATH" in message and "rerun precompute" in message
    # the report's many-to-many section says it in its note, and loads nothing either
    pair = analyses.Pair("vision-a", "stage2", LANGUAGE, LAYER)
    found, notes = report._caption_pairs(run, [pair], embed=True)
    assert not found and loads == []
    assert len(notes) == 1 and "settings.weights" in notes[0]


def test_a_link_inside_the_cache_to_weights_outside_is_refused(roots, loads) -> None:
    """The rule resolves symbolic links, as it does for a data set's images."""
    (roots["elsewhere"] / "weights").mkdir()
    link = roots["cache"] / "models" / "linked"
    link.parent.mkdir()
    link.symlink_to(roots["elsewhere"] / "weights")
    run = _run_naming_weights(roots["cache"], {LANGUAGE: str(link)})
    with pytest.raises(ValueError, match="settings.weights"):
        caption_embeddings.embed_captions(run, LANGUAGE, [LAYER])
    assert loads == []


def test_weights_a_run_carries_in_its_own_folder_are_refused(roots, loads) -> None:
    """A run lies in the cache too: an altered run could name weights it carries itself, so only
    the cache's model folder (and the data folder) is taken from a manifest."""
    run = _run_naming_weights(roots["cache"], None)
    carried = run.path / "weights"
    carried.mkdir()
    run = _run_naming_weights(roots["cache"], {LANGUAGE: str(carried)})
    with pytest.raises(ValueError, match="outside the cache's model folder"):
        caption_embeddings.embed_captions(run, LANGUAGE, [LAYER])
    assert loads == []


@pytest.mark.parametrize("weights", [["not", "a", "mapping"], {LANGUAGE: 7}, "/etc"])
def test_a_manifest_weights_field_of_another_shape_is_refused(roots, loads, weights) -> None:
    run = _run_naming_weights(roots["cache"], weights)
    with pytest.raises(ValueError, match="not a {model: weights path} mapping"):
        caption_embeddings.embed_captions(run, LANGUAGE, [LAYER])
    assert loads == []


@pytest.mark.parametrize("root", ["cache", "data"])
def test_manifest_weights_inside_the_cache_or_data_folder_are_loaded(roots, loads, root) -> None:
    inside = roots[root] / "models" / "language-a"
    inside.mkdir(parents=True)
    run = _run_naming_weights(roots["cache"], {LANGUAGE: str(inside)})
    with pytest.raises(_Loaded):
        caption_embeddings.embed_captions(run, LANGUAGE, [LAYER])
    assert loads == [str(inside)]


def test_weights_given_explicitly_are_loaded_whatever_the_manifest_says(roots, loads) -> None:
    run = _run_naming_weights(roots["cache"], {LANGUAGE: "/somewhere/else"})
    mine = roots["elsewhere"] / "my-weights"
    with pytest.raises(_Loaded):
        caption_embeddings.embed_captions(run, LANGUAGE, [LAYER], weights=str(mine))
    assert loads == [str(mine)]
    # the report passes --weights on to it
    pair = analyses.Pair("vision-a", "stage2", LANGUAGE, LAYER)
    with pytest.raises(_Loaded):
        report._caption_pairs(run, [pair], embed=True, weights={LANGUAGE: str(mine)})
    assert loads == [str(mine), str(mine)]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--weights", f"{LANGUAGE}=/w"], "add --embed-captions"),
        (["--embed-captions", "--weights", "language-z=/w"], "not among run"),
        (["--embed-captions", "--weights", "nonsense"], "--weights expects MODEL=VALUE"),
    ],
)
def test_report_weights_flag_is_checked(roots, loads, tmp_path, flags, said) -> None:
    run = _run_naming_weights(roots["cache"], None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = report.main([str(run.path), "--out", str(tmp_path / "out"), *flags])
    assert status == 2 and said in err.getvalue(), err.getvalue()
    assert not (tmp_path / "out").exists() and loads == []


# --------------------------------------------------------------------------- hf: local paths


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[object]]:
    """The hub probe and ``datasets.load_dataset`` replaced by recorders (the hub unreachable, a
    hub data set not cached); the working folder an empty one, so relative paths name nothing."""
    import datasets

    from convergence_core.models import availability

    calls: dict[str, list[object]] = {"probe": [], "load_dataset": []}

    def probe(*args, **kwargs):
        calls["probe"].append(args)
        return False

    def load_dataset(path, *args, **kwargs):
        calls["load_dataset"].append(path)
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(availability, "hub_reachable", probe)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize(
    "name",
    ["./data/wit", "/abs/missing/folder", "data/my/set", "~/no-such-folder-here", "data\\wit",
     "../wit", "my set"],
)
def test_a_mistyped_local_path_fails_at_once_without_asking_the_hub(hub, name) -> None:
    from convergence_core.datasets import DatasetUnavailableError, load_dataset, load_hf

    for load in (lambda: load_hf(name), lambda: load_dataset(f"hf:{name}")):
        started = time.perf_counter()
        with pytest.raises(ValueError) as info:
            load()
        assert time.perf_counter() - started < 1.0
        assert not isinstance(info.value, DatasetUnavailableError)  # not "offline": a bad path
        message = str(info.value)
        assert repr(name) in message and "does not exist" in message, message
        assert "hf:/path/to/folder" in message and "not a hub id" in message
    assert hub == {"probe": [], "load_dataset": []}


@pytest.mark.parametrize("name", ["minhuh/prh", "wit", "data/my_set"])
def test_a_name_that_may_be_a_hub_id_still_asks_the_hub(hub, name) -> None:
    """``data/my_set`` may be a local folder or a hub id: with no such folder, the hub (or its
    cache, offline) answers, as before."""
    from convergence_core.datasets import DatasetUnavailableError, load_hf

    with pytest.raises(DatasetUnavailableError, match="not in the datasets cache"):
        load_hf(name)
    assert len(hub["probe"]) == 1 and hub["load_dataset"] == [name]


def test_an_existing_local_folder_is_not_mistaken_for_a_typo(hub, tmp_path) -> None:
    """A folder that is there (here one ``datasets`` cannot read) goes to the loader as before,
    without the hub."""
    from convergence_core.datasets import DatasetUnavailableError, load_hf

    (tmp_path / "data" / "wit").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError):
        load_hf("./data/wit")
    assert hub["probe"] == [] and hub["load_dataset"] == [str(Path("./data/wit"))]
