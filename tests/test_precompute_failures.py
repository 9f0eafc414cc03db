"""A precompute that fails on bad input, and a finished step whose file was damaged by hand.

Runs from ``--features``-style files only (no model, no data set): a second or two each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from convergence_core.cache import lock_path
from convergence_core.precompute import ProgressEvent, precompute
from convergence_core.run import list_runs, load_run
from convergence_core.run_checks import check_run_files
from convergence_core.run_writer import stored_file_problem

N = 14


def _files(folder: Path, *, nan_in: str | None = None) -> dict[str, str]:
    """Two vision feature files (``a``, ``b``) with their ids; ``nan_in``: the one holding a NaN."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, width in (("a", 5), ("b", 4)):
        values = np.random.default_rng(width).standard_normal((N, width)).astype(np.float32)
        if name == nan_in:
            values[3, 1] = np.nan
        np.save(folder / f"{name}.npy", values)
        (folder / f"{name}.npy.ids.txt").write_text("".join(f"s{i}\n" for i in range(N)))
        paths[name] = str(folder / f"{name}.npy")
    return paths


def _options(tmp_path: Path, files: dict[str, str], **extra) -> dict:
    return {
        "features": files,
        "modalities": {name: "vision" for name in files},
        "run_name": "r",
        "cache_root": str(tmp_path / "cache"),
        "gpa_starts": 1,
        **extra,
    }


def _runs(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "runs"


def test_a_first_run_stopped_by_non_finite_features_leaves_no_run_folder(tmp_path):
    """A first precompute whose (first) feature file held NaN left an incomplete run folder
    (manifest + stimulus table) that ``runs`` listed as "incomplete": nothing in it was worth
    keeping, and the user could not tell whether to delete it."""
    with pytest.raises(ValueError, match="NaN/Inf"):
        precompute(**_options(tmp_path, _files(tmp_path / "f", nan_in="a")))
    assert not (_runs(tmp_path) / "r").exists()
    assert list_runs(_runs(tmp_path)) == []
    assert sorted(p.name for p in _runs(tmp_path).iterdir()) == []  # no lock, no .reset left
    # the corrected command makes the run as if nothing had happened
    run = precompute(**_options(tmp_path, _files(tmp_path / "f")))
    assert run.manifest.complete


def test_a_first_run_without_a_run_name_leaves_no_folder_either(tmp_path):
    options = _options(tmp_path, _files(tmp_path / "f", nan_in="a"))
    del options["run_name"]
    with pytest.raises(ValueError, match="NaN/Inf"):
        precompute(**options)
    assert list(_runs(tmp_path).iterdir()) == []


def test_a_folder_that_existed_before_is_never_removed(tmp_path):
    """Only a folder this call created goes: an empty folder made beforehand (by the user) stays,
    and so does a finished run whose rerun fails on bad input."""
    folder = _runs(tmp_path) / "r"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match="NaN/Inf"):
        precompute(**_options(tmp_path, _files(tmp_path / "f", nan_in="a")))
    assert folder.is_dir()
    shutil.rmtree(folder)
    run = precompute(**_options(tmp_path, _files(tmp_path / "f")))
    before = run.layout.manifest.read_bytes()
    with pytest.raises(ValueError, match="NaN/Inf"):
        precompute(**_options(tmp_path, _files(tmp_path / "f", nan_in="a")))
    assert (folder / "manifest.json").is_file() and (folder / "embeddings").is_dir()
    assert before != b""


def test_a_first_run_that_finished_a_step_keeps_it_for_the_corrected_command(tmp_path):
    """A bad second file stops the run after the first model's work finished: that work is kept
    (the folder stays, incomplete) and the corrected command resumes it."""
    with pytest.raises(ValueError, match="NaN/Inf"):
        precompute(**_options(tmp_path, _files(tmp_path / "f", nan_in="b")))
    assert (_runs(tmp_path) / "r" / "manifest.json").is_file()
    events: list[ProgressEvent] = []
    run = precompute(progress=events.append, **_options(tmp_path, _files(tmp_path / "f")))
    assert run.manifest.complete
    assert any(e.step == "extract" and e.model == "a" and e.skipped for e in events)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_an_interrupted_or_storage_failed_first_run_keeps_its_folder(tmp_path, fault):
    """Ctrl-C or a full disk is no bad input: the run folder and its finished steps stay, so the
    same command resumes (the CLI says so)."""

    def stop(event: ProgressEvent) -> None:
        if event.step == "neighbours" and event.model == "b" and not event.skipped:
            raise fault("stop")

    with pytest.raises(fault):
        precompute(progress=stop, **_options(tmp_path, _files(tmp_path / "f")))
    assert (_runs(tmp_path) / "r" / "manifest.json").is_file()
    assert not lock_path(_runs(tmp_path) / "r").exists()


def test_a_first_run_stopped_before_any_step_on_a_storage_fault_keeps_its_folder(
    tmp_path, monkeypatch
):
    """Only bad input (ValueError) removes the new folder; an OSError leaves it as it was."""
    import convergence_core.precompute as pre

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pre, "write_model_arrays", fail)
    with pytest.raises(OSError, match="No space"):
        precompute(**_options(tmp_path, _files(tmp_path / "f")))
    assert (_runs(tmp_path) / "r" / "manifest.json").is_file()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def _wrong_shape(path: Path) -> None:
    np.save(path, np.zeros((3, 2), np.float32))


def _emptied(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("damaged", "damage", "step"),
    [
        ("embeddings/a/features.npy", _truncate, "extract"),
        ("embeddings/b/features.npy", _wrong_shape, "extract"),
        ("neighbours/a/features.values.npy", _truncate, "neighbours"),
        ("gpa/residuals.npy", _truncate, "gpa"),
        ("gpa/residuals.npy", _wrong_shape, "gpa"),
        ("pca/scores.npy", _wrong_shape, "dispersion"),
        ("dispersion.parquet", _truncate, "dispersion"),
        ("gpa/stability.json", _emptied, "gpa_stability"),
        ("properties.parquet", _truncate, "properties"),
        ("properties.json", _truncate, "properties"),
    ],
)
def test_a_damaged_file_of_a_finished_step_is_written_again_on_rerun(
    tmp_path, damaged, damage, step
):
    """A finished step was skipped on every rerun while a file it wrote was truncated or replaced
    by hand (only its presence was checked), and the dashboard failed on it. The rerun now
    writes that step again and says which file it redid."""
    files = _files(tmp_path / "f")
    run = precompute(**_options(tmp_path, files))
    damage(run.path / damaged)
    events: list[ProgressEvent] = []
    again = precompute(progress=events.append, **_options(tmp_path, files))
    assert again.manifest.complete
    check_run_files(load_run(again.path))
    said = [e for e in events if e.step == step and e.detail.startswith("redone")]
    assert said and damaged in said[0].detail.replace("\\", "/")
    assert stored_file_problem(again.path / damaged) is None
    # an intact run is skipped whole, with no word of redoing anything
    events.clear()
    precompute(progress=events.append, **_options(tmp_path, files))
    assert not [e for e in events if "redone" in e.detail]
    assert not [e for e in events if e.step == "extract" and not e.skipped]


def test_stored_file_problem_reads_only_headers(tmp_path):
    """The check behind the skip: header and size of an .npy (never its values), the footer of a
    parquet file; what it says names the file and the fault."""
    import pandas as pd

    array = tmp_path / "x.npy"
    np.save(array, np.arange(12, dtype=np.float32).reshape(6, 2))
    assert stored_file_problem(array) is None
    assert stored_file_problem(array, (6, None)) is None
    assert "expected (7, None)" in stored_file_problem(array, (7, None))
    with open(array, "ab") as handle:  # one value too many: not what the step wrote
        handle.write(b"\0\0\0\0")
    assert "header says" in stored_file_problem(array)
    assert "is missing" in stored_file_problem(tmp_path / "none.npy")
    table = tmp_path / "t.parquet"
    pd.DataFrame({"v": range(5)}).to_parquet(table)
    assert stored_file_problem(table, (5,)) is None
    assert "5 rows, expected 4" in stored_file_problem(table, (4,))
    _truncate(table)
    assert "cannot be read" in stored_file_problem(table)
    (tmp_path / "p.npy").write_bytes(b"\x80\x04not numpy")
    assert "cannot be read" in stored_file_problem(tmp_path / "p.npy")


@pytest.mark.parametrize("kind", ["one_direction", "mostly_zeros"])
def test_a_rerun_with_features_it_cannot_use_keeps_the_finished_run(tmp_path, kind):
    """A finished run, rerun after a feature file was replaced by one the checks refuse: NaN was
    refused before anything changed, but rows that all point one way were refused after the run
    was marked incomplete, and mostly-zero features after the model's embeddings and lists were
    deleted and the bad array written (from a review). The finished run now stays as it was."""
    files = _files(tmp_path / "f")
    precompute(**_options(tmp_path, files))
    layout = load_run(_runs(tmp_path) / "r").layout
    stored = {p: p.read_bytes() for p in sorted(layout.root.rglob("*.npy"))}
    manifest = layout.manifest.read_bytes()
    bad = np.zeros((N, 4), dtype=np.float32)
    if kind == "one_direction":
        bad[:] = np.arange(1, 5, dtype=np.float32)
        match = "points the same way"
    else:
        bad = np.zeros((N, 100), dtype=np.float32)
        bad[:, 0] = np.random.default_rng(0).standard_normal(N)
        bad[:, 1] = 1.0
        match = "mostly zeros"
    np.save(files["b"], bad)
    with pytest.raises(ValueError, match=match):
        precompute(**_options(tmp_path, files))
    assert layout.manifest.read_bytes() == manifest
    assert {p: p.read_bytes() for p in sorted(layout.root.rglob("*.npy"))} == stored
    assert load_run(_runs(tmp_path) / "r").manifest.complete  # the dashboard still opens it


def test_a_dropped_model_leaves_no_gpa_map_behind(tmp_path):
    """After a rerun without one of three models, gpa/ still held the dropped model's map_2 and
    mean_2 (never read again, gpa.json names two models; from a review)."""
    files = _files(tmp_path / "f")
    third = np.random.default_rng(9).standard_normal((N, 6)).astype(np.float32)
    np.save(tmp_path / "f" / "c.npy", third)
    (tmp_path / "f" / "c.npy.ids.txt").write_text("".join(f"s{i}\n" for i in range(N)))
    precompute(**_options(tmp_path, {**files, "c": str(tmp_path / "f" / "c.npy")}))
    gpa = _runs(tmp_path) / "r" / "gpa"
    assert (gpa / "map_2.npy").is_file() and (gpa / "mean_2.npy").is_file()
    run = precompute(**_options(tmp_path, files))
    assert list(run.gpa.models) == ["a", "b"]
    assert sorted(p.name for p in gpa.glob("m*_*.npy")) == [
        "map_0.npy", "map_1.npy", "mean_0.npy", "mean_1.npy"
    ]
