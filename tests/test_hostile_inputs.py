"""Hostile inputs: run folders, data sets and files that someone else made (issue 16).

A run folder may come from a shared cache or a download; every name read from it is validated
before it becomes a path, and nothing outside the run folder is ever read, written or deleted.
Future code must keep passing this suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convergence_core.cache import CacheFormatError, RunLayout, check_key, model_key
from convergence_core.run import load_run
from tests.fixtures_runs import make_synthetic_run

ESCAPING_KEYS = ["../../../../outside", "/absolute/folder", "..", ".", ".hidden", "a/b", "", "a\\b"]


def _tamper(run_path: Path, edit) -> None:
    manifest_path = run_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def _victim(tmp_path: Path) -> Path:
    """A folder outside the cache with files a tampered manifest might aim at."""
    victim = tmp_path / "victim"
    (victim / "stage1.npy").parent.mkdir(parents=True)
    np.save(victim / "stage1.npy", np.ones((3, 3), dtype=np.float32))
    (victim / "precious.txt").write_text("do not delete")
    return victim


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_check_key_refuses_names_that_are_not_plain_file_names(key):
    with pytest.raises(CacheFormatError, match="delete the run folder and rerun"):
        check_key(key, "model key")


def test_every_model_key_passes_check_key():
    for name in ["minilm", "org/model", "../../x", "/abs", "." * 3, "a" * 500, "ü", "x y"]:
        assert check_key(model_key(name)) == model_key(name)


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_run_layout_never_builds_a_path_from_an_unsafe_key(tmp_path, key):
    layout = RunLayout(tmp_path / "run")
    for build in (
        lambda: layout.embeddings_dir(key),
        lambda: layout.grams_dir(key),
        lambda: layout.embedding(key, "layer"),
        lambda: layout.embedding("model", key),
        lambda: layout.gram("model", key),
    ):
        with pytest.raises(CacheFormatError):
            build()


def test_precompute_never_deletes_outside_the_run_for_a_tampered_key(tmp_path, monkeypatch):
    """Issue 16 item 1: a dropped model whose manifest key points outside is not deleted."""
    from convergence_core.precompute import _forget_dropped_models, _open_manifest

    run = make_synthetic_run(tmp_path / "cache", n=12)
    victim = _victim(tmp_path)
    relative = Path("../" * 8) / victim.relative_to("/")
    for key in (str(victim), str(relative), "..", "../victim"):

        def edit(manifest, key=key):
            manifest["models"]["vision-a"]["key"] = key

        _tamper(run.path, edit)
        manifest = _open_manifest(RunLayout(run.path), run.name)
        _forget_dropped_models(manifest, ["vision-b", "vision-c"])
        assert (victim / "precious.txt").read_text() == "do not delete"
        assert (victim / "stage1.npy").is_file()
    assert (run.path / "embeddings").is_dir()  # the run's own folders are still there


def test_load_run_refuses_a_key_that_leaves_the_run(tmp_path):
    run = make_synthetic_run(tmp_path / "cache", n=12)
    victim = _victim(tmp_path)

    def edit(manifest):
        manifest["models"]["vision-a"]["key"] = str(victim)
        manifest["models"]["vision-a"]["layer_keys"]["stage1"] = "../../../victim/stage1"

    _tamper(run.path, edit)
    tampered = load_run(run.path)
    with pytest.raises(CacheFormatError, match="not a file name this program writes"):
        tampered.embeddings["vision-a"]["stage1"]
    with pytest.raises(CacheFormatError, match="not a file name this program writes"):
        tampered.gram("vision-a", "stage1")


def test_a_symbolic_link_inside_the_run_is_not_followed_out(tmp_path):
    run = make_synthetic_run(tmp_path / "cache", n=12)
    victim = _victim(tmp_path)
    target = run.layout.embedding("vision-a", "stage1")
    target.unlink()
    target.symlink_to(victim / "stage1.npy")
    fresh = load_run(run.path)
    with pytest.raises(CacheFormatError, match="leads outside the run folder"):
        fresh.embeddings["vision-a"]["stage1"]
    # a whole folder linked out: nothing in it is removed when the model is dropped
    from convergence_core.precompute import _forget_dropped_models, _open_manifest

    grams = run.layout.grams_dir("vision-a")
    for child in grams.iterdir():
        child.unlink()
    grams.rmdir()
    grams.symlink_to(victim, target_is_directory=True)
    manifest = _open_manifest(RunLayout(run.path), run.name)
    _forget_dropped_models(manifest, ["vision-b", "vision-c"])
    assert (victim / "precious.txt").is_file() and (victim / "stage1.npy").is_file()


def test_report_and_pages_open_no_file_outside_a_tampered_run(tmp_path):
    """The report reads Grams through Run: a tampered key stops it with the clear error."""
    from convergence_core.analyses import layer_sweep

    run = make_synthetic_run(tmp_path / "cache", n=16)

    def edit(manifest):
        manifest["models"]["language-a"]["key"] = "../../../../etc"

    _tamper(run.path, edit)
    with pytest.raises(CacheFormatError, match="altered or damaged"):
        layer_sweep(load_run(run.path), k=3)
