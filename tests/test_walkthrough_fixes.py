"""Defects a walk through the README found: GPA of two models stopped at its uncertainty (an
infinite ratio in gpa.json), ``report`` on a run being written (told it was interrupted),
``runs | head -1`` (a BrokenPipeError traceback), and ``--cache`` that did not hold the
converted model weights (they went to the default cache)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convergence_core import settings
from convergence_core.cache import CacheFormatError, read_json, run_lock, write_json
from convergence_core.cli import main
from convergence_core.gpa_stability import gpa_stability, gpa_to_uncertainty
from convergence_core.procrustes import DEFAULT_TOL, generalized_procrustes
from convergence_core.run import load_run
from tests.fixtures_runs import make_synthetic_run
from tests.test_cli import _feature_files as feature_files

REPO = Path(__file__).resolve().parent.parent


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _feature_files(folder: Path, n: int = 12) -> list[str]:
    """Two small vision feature files with their ids (``vit-a``, ``vit-b``): the ``--features``
    flags of a quick run of two GPA models."""
    return feature_files(folder, n, names=("vit-a", "vit-b"))


def _strict(text: str) -> object:
    """``text`` parsed as strict JSON: Infinity, -Infinity and NaN are refused."""
    def refuse(constant: str) -> object:
        raise ValueError(f"non-finite number {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


# -- 1: GPA of two models stopped at its residuals' uncertainty ---------------------------------


def _two_models(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((40, 6)), rng.standard_normal((40, 5))]


def test_two_models_have_no_uncertainty_to_stop_at_and_gpa_runs_to_its_optimum():
    """Two models: every start reaches the same residuals (spread 0), and the rule "step ≤ a
    tenth of the spread" had an infinite ratio, which gpa.json (strict JSON) could not hold. The
    rule does not hold there: GPA goes on to the floor tol, as GPA to its optimum does, and the
    stop records no ratio (None)."""
    embeddings = _two_models()
    result, stability, stop = gpa_to_uncertainty(embeddings, n_starts=4, seed=0)
    assert float(stability.residual_spread.max()) == 0.0  # the case: no spread at all
    assert stop.step_over_spread is None and not stop.met
    assert stop.tol == DEFAULT_TOL  # the floor: the optimum's rule
    optimum = generalized_procrustes(embeddings)
    np.testing.assert_allclose(result.residuals, optimum.residuals, rtol=0, atol=1e-12)
    record = json.dumps(dataclasses.asdict(stop), allow_nan=False)  # raised ValueError: inf
    assert json.loads(record)["step_over_spread"] is None
    words = stop.describe()
    assert "no uncertainty to stop at" in words and "as GPA to its optimum does" in words
    assert "inf" not in words


def test_the_summary_has_no_infinite_ratio_when_residuals_move_but_do_not_spread():
    """``last_step_over_spread`` of a last step > 0 against a spread of 0 was inf, which the
    run's stability.json (strict JSON) cannot hold; it is NaN (not defined: written as null)."""
    stability = gpa_stability(_two_models(), n_starts=2, seed=0)
    assert float(stability.residual_spread.max()) == 0.0
    moved = dataclasses.replace(stability, last_step=np.full_like(stability.last_step, 1e-9))
    summary = moved.summary()
    assert not any(math.isinf(value) for value in summary.values()), summary
    assert math.isnan(summary["last_step_over_spread"])
    assert stability.summary()["last_step_over_spread"] == 0.0  # nothing moved: as before


def test_gpa_stop_uncertainty_with_two_models_makes_a_complete_run(tmp_path):
    """The README's walk: `precompute --features vit-a=a.npy --features vit-b=b.npy ...
    --gpa-stop uncertainty` stopped with "error: Out of range float values are not JSON
    compliant: inf" and left an incomplete run. It now finishes; every JSON file of the run is
    strict JSON, and the run's stop reads back and says why GPA ran to its optimum."""
    cache = tmp_path / "cache"
    code, out, err = _main(
        "precompute", *_feature_files(tmp_path / "f"), "--gpa-stop", "uncertainty",
        "--run-name", "t-unc", "--quiet", "--cache", str(cache),
    )
    assert code == 0, err
    assert "no uncertainty to stop at before loss tol 1e-13" in out
    folder = cache / "runs" / "t-unc"
    for path in folder.rglob("*.json"):
        _strict(path.read_text())
    assert _strict((folder / "gpa" / "gpa.json").read_text())["stop"]["step_over_spread"] is None
    run = load_run(folder)
    assert run.manifest.complete
    assert run.gpa_stop.step_over_spread is None and not run.gpa_stop.met
    assert "no uncertainty to stop at" in run.gpa_stop.describe()
    code, out, _ = _main("runs", "--cache", str(cache))
    assert out.splitlines()[1].split()[:2] == ["t-unc", "complete"]


# -- 2: `report` on a run that a precompute is writing now --------------------------------------


def _unfinished_run(tmp_path: Path) -> Path:
    run = make_synthetic_run(tmp_path / "runs", n=8, images=False, thumbnails=False, name="alpha")
    manifest = read_json(run.layout.manifest)
    write_json(run.layout.manifest, {**manifest, "complete": False})
    return run.path


def test_a_run_being_written_is_told_apart_from_an_interrupted_one(tmp_path):
    """load_run told a run that a live precompute writes (``runs``: "being written (pid N)")
    that its precompute was interrupted and should be rerun. It now names the writing process
    and says to wait."""
    folder = _unfinished_run(tmp_path)
    with run_lock(folder):  # this process writes the run now
        with pytest.raises(CacheFormatError) as caught:
            load_run(folder)
    message = str(caught.value)
    assert f"run 'alpha' is being written by process {os.getpid()} (a precompute" in message
    assert "wait for it to finish" in message
    assert "interrupted" not in message and "resume" not in message
    # no live writer (the lock is gone): an interrupted precompute, to rerun
    with pytest.raises(CacheFormatError, match="interrupted or stopped on an error"):
        load_run(folder)


def test_report_on_a_run_being_written_says_to_wait(tmp_path, capsys):
    """`report RUN` while a precompute writes RUN: one line naming the process, no traceback."""
    folder = _unfinished_run(tmp_path)
    with run_lock(folder):
        code = main(["report", str(folder), "--out", str(tmp_path / "report"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: run 'alpha' is being written by process ")
    assert f"process {os.getpid()}" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


# -- 3: output whose reader went away (`runs --json | head -1`) ----------------------------------


@pytest.mark.parametrize("flags", [["--json"], []], ids=["json", "table"])
def test_runs_into_a_closed_pipe_ends_quietly(tmp_path, flags):
    """`runs --json | head -1` ended in a BrokenPipeError traceback (status 1) once ``head``
    had gone. The reader here closes the pipe before the command writes (deterministic, unlike
    ``head``, which may read everything first): no output on stderr, status 128 + SIGPIPE."""
    for name in ("a", "b", "c"):
        make_synthetic_run(tmp_path / "runs", n=6, images=False, thumbnails=False, name=name)
    command = [sys.executable, "-m", "convergence_core", "runs", *flags, "--cache", str(tmp_path)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # the reader is gone before the first line is written
    try:
        err = process.stderr.read()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert err == "", err
    assert code == 128 + signal.SIGPIPE  # 141, as for a command killed by SIGPIPE


def test_runs_into_a_shell_pipe_that_closes_early_ends_quietly(tmp_path):
    """The shell's view: `runs --json | true` (a reader that exits at once, as ``head -1`` does
    after its line, here before the command has even started writing): no traceback on stderr,
    and the shell sees status 141 (PIPESTATUS), as for ``yes | head -1``."""
    for name in ("a", "b"):
        make_synthetic_run(tmp_path / "runs", n=6, images=False, thumbnails=False, name=name)
    result = subprocess.run(
        ["bash", "-c", '"$0" -m convergence_core runs --json --cache "$1" | true; '
         'echo "${PIPESTATUS[0]}"', sys.executable, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.stderr == "" and result.stdout == "141\n", result.stderr


# -- 4: --cache holds everything a precompute caches, converted model weights included ---------


def _record_cache_during_precompute(monkeypatch) -> dict[str, object]:
    """Wrap ``precompute._precompute`` (the body ``precompute`` runs under the cache it was
    given) to record where the models' converted weights and weight ids would go while the run
    is made."""
    from convergence_core import precompute as module
    from convergence_core.models import gemma_gguf, weights

    seen: dict[str, object] = {}
    real = module._precompute

    def recording(*args, **kwargs):
        seen["cache_root"] = settings.cache_root()
        seen["gemma"] = gemma_gguf.converted_gemma_folder()
        seen["weights_ids"] = weights._memo_path()
        seen["variable"] = os.environ.get("CONVERGENCE_CACHE")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_precompute", recording)
    return seen


def test_cache_flag_holds_the_converted_models_too(tmp_path, monkeypatch):
    """`precompute --preset demo --cache X` wrote its run under X but converted Gemma's weights
    into the default cache's models/ (settings.cache_root() read only $CONVERGENCE_CACHE). While
    the command runs, the cache is X for everything; afterwards the variable is as it was."""
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("CONVERGENCE_CACHE", str(other))
    seen = _record_cache_during_precompute(monkeypatch)
    given = tmp_path / "given"
    code, _, err = _main(
        "precompute", *_feature_files(tmp_path / "f"), "--quiet", "--cache", str(given)
    )
    assert code == 0, err
    assert seen["cache_root"] == given.resolve()
    assert seen["gemma"] == given.resolve() / "models" / "gemma-3-270m"
    assert seen["weights_ids"] == given.resolve() / "models" / "weights_ids.json"
    assert seen["variable"] == str(given.resolve())  # what Ray workers are handed
    assert os.environ["CONVERGENCE_CACHE"] == str(other)  # restored
    assert not other.exists()  # nothing written under the other cache
    assert [p.name for p in (given / "runs").iterdir() if not p.name.startswith(".")]


def test_a_relative_cache_and_an_unset_variable(tmp_path, monkeypatch):
    """A relative --cache is the folder under the working folder (absolute in the variable, for
    processes started elsewhere); an unset variable is unset again afterwards, also when the
    precompute stops on an error."""
    monkeypatch.delenv("CONVERGENCE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    seen = _record_cache_during_precompute(monkeypatch)
    code, _, err = _main("precompute", *_feature_files(tmp_path / "f"), "--quiet",
                         "--cache", "rel")
    assert code == 0, err
    assert seen["cache_root"] == (tmp_path / "rel").resolve()
    assert seen["variable"] == str((tmp_path / "rel").resolve())
    assert "CONVERGENCE_CACHE" not in os.environ
    seen.clear()
    features = _feature_files(tmp_path / "g")
    (tmp_path / "g" / "vit-b.npy").unlink()  # precompute stops on it: a one-line error
    code, _, err = _main("precompute", *features, "--quiet", "--cache", "rel2")
    assert code == 2 and "vit-b.npy" in err, err
    assert seen["cache_root"] == (tmp_path / "rel2").resolve()
    assert "CONVERGENCE_CACHE" not in os.environ


def test_a_config_files_cache_root_holds_the_models_too(tmp_path, monkeypatch):
    """The config's cache_root is the same setting as --cache (one source: the config the CLI
    hands to precompute), and --cache overrides it."""
    monkeypatch.delenv("CONVERGENCE_CACHE", raising=False)
    seen = _record_cache_during_precompute(monkeypatch)
    _feature_files(tmp_path / "f")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "features": {m: {"features": str(tmp_path / "f" / f"{m}.npy")} for m in ("vit-a", "vit-b")},
        "modalities": {"vit-a": "vision", "vit-b": "vision"},
        "cache_root": str(tmp_path / "from-config"),
    }))
    code, _, err = _main("precompute", str(config), "--quiet")
    assert code == 0, err
    assert seen["cache_root"] == (tmp_path / "from-config").resolve()
    assert (tmp_path / "from-config" / "runs").is_dir()
    code, _, err = _main("precompute", str(config), "--quiet", "--cache", str(tmp_path / "flag"))
    assert code == 0, err
    assert seen["cache_root"] == (tmp_path / "flag").resolve()
    assert "CONVERGENCE_CACHE" not in os.environ


def test_cache_root_given_sets_and_restores_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "before"))
    with settings.cache_root_given(tmp_path / "inside") as root:
        assert root == settings.cache_root() == (tmp_path / "inside").resolve()
        assert settings.runs_root() == root / "runs"
    assert os.environ["CONVERGENCE_CACHE"] == str(tmp_path / "before")
    with pytest.raises(RuntimeError), settings.cache_root_given(tmp_path / "x"):
        raise RuntimeError("a failing command")
    assert os.environ["CONVERGENCE_CACHE"] == str(tmp_path / "before")
    for nothing in (None, ""):  # no folder given: the variable (or the default) stays
        with settings.cache_root_given(nothing) as root:
            assert root == (tmp_path / "before").resolve()
    assert os.environ["CONVERGENCE_CACHE"] == str(tmp_path / "before")
