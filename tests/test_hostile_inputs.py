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
from convergence_core.run import list_runs, load_run
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
        lambda: layout.neighbours_dir(key),
        lambda: layout.embedding(key, "layer"),
        lambda: layout.embedding("model", key),
        lambda: layout.neighbour_indices("model", key),
        lambda: layout.neighbour_values(key, "layer"),
    ):
        with pytest.raises(CacheFormatError):
            build()


def test_precompute_never_deletes_outside_the_run_for_a_tampered_key(tmp_path, monkeypatch):
    """Issue 16 item 1: a dropped model whose manifest key points outside is not deleted."""
    from convergence_core.precompute import _open_manifest

    run = make_synthetic_run(tmp_path / "cache", n=12)
    victim = _victim(tmp_path)
    relative = Path("../" * 8) / victim.relative_to("/")
    for key in (str(victim), str(relative), "..", "../victim"):

        def edit(manifest, key=key):
            manifest["models"]["vision-a"]["key"] = key

        _tamper(run.path, edit)
        # a manifest naming such a key is refused, never replaced by a fresh one (nothing of the
        # run is deleted, nor anything it points to)
        with pytest.raises(CacheFormatError, match="not a file name this program writes"):
            _open_manifest(RunLayout(run.path), run.name)
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
    with pytest.raises(CacheFormatError, match="not a file name this program writes"):
        load_run(run.path)
    info = {i.name: i for i in list_runs(run.path.parent)}[run.path.name]
    assert info.damaged is not None and "not a file name" in info.damaged


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

    lists = run.layout.neighbours_dir("vision-a")
    for child in lists.iterdir():
        child.unlink()
    lists.rmdir()
    lists.symlink_to(victim, target_is_directory=True)
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


# -- item 2: one bad manifest must not break the other runs -------------------------------------


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(dataset="oops"), "dataset"),
        (lambda m: m.update(updated=5), "updated"),
        (lambda m: m.update(models=[1, 2]), "models"),
        (lambda m: m.update(n_stimuli="many"), "n_stimuli"),
        (lambda m: m["models"]["vision-a"].update(layers="stage1"), "layers"),
        (lambda m: m["models"]["vision-a"].update(dims={"stage1": "wide"}), "dims"),
        (lambda m: m.update(complete="yes"), "complete"),
        (lambda m: m.update(steps={"gpa": 3}), "gpa"),
        (lambda m: m.update(format=99), "format"),
        (lambda m: m["dataset"].update(subset={"rule": "common", "kept": "all"}), "kept"),
        (lambda m: m["dataset"].update(subset="common"), "subset"),
        (lambda m: m["models"]["vision-a"].update(source="elsewhere"), "source"),
        # two models reading the same files (from the reliability audit: misleading advice)
        (lambda m: m["models"]["vision-b"].update(key=m["models"]["vision-a"]["key"]),
         "share the file key"),
        # from the audit: one layer read another's file; GPA named a model or layer the run
        # lacks (user-input advice followed); format true (== 1) or 2.0 was read
        (lambda m: m["models"]["vision-a"]["layer_keys"].update(stage1="stage2"),
         "several layers share the file key"),
        (lambda m: m["gpa"]["models"].__setitem__(-1, "ghost"), "gpa names models or layers"),
        (lambda m: m["gpa"]["layers"].__setitem__(-1, "nolayer"), "gpa names models or layers"),
        (lambda m: m.update(format=True), "format True"),
        (lambda m: m.update(format=2.0), "format 2.0"),
    ],
)
def test_a_damaged_manifest_is_listed_with_its_reason_and_the_others_work(tmp_path, edit, field):
    from convergence_core.cli import main

    cache = tmp_path / "cache"
    healthy = make_synthetic_run(cache / "runs", n=12, name="healthy")
    bad = make_synthetic_run(cache / "runs", n=12, name="bad")
    _tamper(bad.path, edit)
    infos = {info.name: info for info in list_runs(cache / "runs")}
    assert infos["healthy"].damaged is None and infos["healthy"].summary.complete
    assert infos["bad"].damaged is not None and field in infos["bad"].damaged
    assert not infos["bad"].summary.complete
    assert load_run(healthy.path).n_stimuli == 12
    with pytest.raises(CacheFormatError, match=field):
        load_run(bad.path)
    import io

    out = io.StringIO()
    assert main(["runs", "--cache", str(cache)], out=out) == 0
    text = out.getvalue()
    assert "healthy" in text and "damaged run bad:" in text


def test_manifest_that_is_not_an_object_or_not_json(tmp_path):
    cache = tmp_path / "cache"
    make_synthetic_run(cache / "runs", n=12, name="healthy")
    for name, text in (("list", "[1, 2]"), ("garbage", "{not json"), ("empty", "")):
        folder = cache / "runs" / name
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(text)
    infos = {info.name: info for info in list_runs(cache / "runs")}
    assert infos["healthy"].damaged is None
    assert all(infos[name].damaged for name in ("list", "garbage", "empty"))


def test_an_unfinished_rerun_whose_gpa_names_a_dropped_model_still_reads(tmp_path):
    """A rerun drops models from the manifest before it redoes GPA: until then (the run
    incomplete) the GPA record may name them, and the run must stay readable to resume."""
    run = make_synthetic_run(tmp_path / "runs", n=12)

    def edit(manifest):
        manifest["models"].pop(manifest["gpa"]["models"][-1])
        manifest["vision_models"] = [m for m in manifest["vision_models"]
                                     if m in manifest["models"]]
        manifest["complete"] = False

    _tamper(run.path, edit)
    assert [info.damaged for info in list_runs(run.path.parent)] == [None]


def test_a_deeply_nested_manifest_is_listed_as_damaged(tmp_path):
    """From the audit: nested brackets raised RecursionError out of list_runs (and `runs`)."""
    make_synthetic_run(tmp_path / "runs", n=12, name="healthy")
    (tmp_path / "runs" / "deep").mkdir()
    (tmp_path / "runs" / "deep" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    infos = {info.name: info for info in list_runs(tmp_path / "runs")}
    assert infos["healthy"].damaged is None and "not valid JSON" in infos["deep"].damaged


def test_caption_embedding_paths_never_lead_out_of_the_run(tmp_path):
    """From the audit: captions/<model>/<layer>.npy and .json skipped the containment check."""
    victim = _victim(tmp_path)
    layout = RunLayout(tmp_path / "run")
    folder = layout.root / "captions" / "language-a"
    folder.mkdir(parents=True)
    for suffix in (".npy", ".json"):
        link = folder / f"layer0{suffix}"
        link.symlink_to(victim / "precious.txt")
        with pytest.raises(CacheFormatError, match="leads outside the run folder"):
            layout.caption_embedding("language-a", "layer0")
        link.unlink()
    assert [p.name for p in layout.caption_embedding("language-a", "layer0")] == [
        "layer0.npy", "layer0.json"]
