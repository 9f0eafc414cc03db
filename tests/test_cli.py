"""`python -m convergence_core`: help, runs, errors, and a real precompute of 6 coco-mini images."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convergence_core import settings
from convergence_core.cache import run_lock
from convergence_core.cli import main
from tests.fixtures_runs import make_synthetic_run

REPO = Path(__file__).resolve().parent.parent


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_help_reads_well_from_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "convergence_core", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for word in ("precompute", "runs", "report", "GPA"):
        assert word in result.stdout


def test_precompute_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["precompute", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--vision",
        "--language",
        "--layers",
        "--device",
        "--batch-size",
        "--caption-mode",
        "--drop-bad",
        "--run-name",
        "--cache",
        "--preset",
        "demo",
        "--gpa-stop",
    ):
        assert flag in text
    # the cluster example's continued line keeps its backslash (a plain string ate it, and the
    # two lines of the command printed as one)
    assert "--ray-address auto \\\n      --device cuda" in text


def test_no_command_prints_help():
    code, out, _ = _main()
    assert code == 2 and "precompute" in out


def test_a_cache_that_is_a_file_is_refused_in_words(tmp_path, monkeypatch):
    """precompute --cache FILE ended in a NotADirectoryError traceback, and runs --cache FILE
    said "no cached runs"."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for command in (("runs",), ("precompute", "--features", f"a={afile}", "--modality",
                                 "a=vision", "--features", f"b={afile}", "--modality", "b=vision")):
        code, out, err = _main(*command, "--cache", str(afile))
        assert code == 2 and f"the cache {afile} (" in err and "--cache) is a file" in err, err
    monkeypatch.setenv("CONVERGENCE_CACHE", str(afile))
    code, _, err = _main("runs")
    assert code == 2 and "($CONVERGENCE_CACHE or the default) is a file" in err


def _feature_files(folder: Path, n: int = 12, names: tuple[str, str] = ("a", "b")) -> list[str]:
    """Two small vision feature files with their ids (models ``names``, widths 5 and 4): the
    ``--features`` flags of a quick run of two GPA models."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    flags = []
    for name, width in zip(names, (5, 4), strict=True):
        np.save(folder / f"{name}.npy", np.random.default_rng(width).standard_normal((n, width)))
        (folder / f"{name}.npy.ids.txt").write_text("".join(f"s{i}\n" for i in range(n)))
        flags += ["--features", f"{name}={folder / name}.npy", "--modality", f"{name}=vision"]
    return flags


def test_a_cache_given_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """From the audit: ``--cache ~/c`` made folders at ./~/c while pandas wrote to $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    features = _feature_files(tmp_path / "features")
    code, _, err = _main("precompute", *features, "--quiet", "--cache", "~/c")
    assert code == 0, err
    assert not (tmp_path / "~").exists() and len(list((tmp_path / "home/c/runs").iterdir())) == 1
    code, out, _ = _main("runs", "--cache", "~/c")
    assert code == 0 and "feature-ids-" in out and str(tmp_path / "home/c/runs") in out


@pytest.mark.parametrize(("afile", "under"), [("runs", ""), ("afile", "afile/sub")])
def test_a_cache_whose_runs_folder_is_a_file_is_refused_in_words(tmp_path, afile, under):
    """From the audit: runs/ a file, or a cache under a file, ended in a NotADirectoryError or
    FileExistsError traceback after the data set was read."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / afile).write_text("a file")
    cache = tmp_path / "c" / under
    features = _feature_files(tmp_path / "features")
    for command in (("runs",), ("precompute", *features, "--quiet")):
        code, _, err = _main(*command, "--cache", str(cache))
        assert code == 2 and err.startswith(f"error: the cache {cache} ("), err
        assert "--cache) " in err and "give the cache folder with --cache" in err, err
        assert err.count("\n") == 1 and f"{tmp_path / 'c' / afile}" in err, err


@pytest.mark.parametrize("flag", ["--num-cpus", "--num-gpus"])
@pytest.mark.parametrize("value", ["inf", "1e999", "-inf", "nan"])
def test_an_infinite_ray_resource_is_refused_naming_the_flag(tmp_path, flag, value):
    """From the audit: --num-cpus inf raised OverflowError."""
    features = _feature_files(tmp_path / "features")
    code, _, err = _main("precompute", *features, "--engine", "ray", f"{flag}={value}",
                         "--cache", str(tmp_path / "c"))
    assert code == 2 and flag in err and "finite" in err and err.count("\n") == 1, err


def test_a_config_that_is_a_folder_is_called_a_folder(tmp_path):
    """From the audit: `precompute FOLDER` said the config file does not exist."""
    code, _, err = _main("precompute", str(tmp_path))
    assert code == 2 and f"{tmp_path} is a folder, not a config file" in err, err


def test_a_config_that_cannot_be_read_is_named_with_the_fix(tmp_path, monkeypatch):
    """From a review of the command line: a config file that is not UTF-8 gave a codec error
    naming neither the file nor the fix, and one that cannot be read (no permission, an I/O
    error) ended in a traceback."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[dataset]\n")
    code, _, err = _main("precompute", str(binary))
    assert code == 2 and f"config file {binary} is not UTF-8 text" in err, err
    readable = tmp_path / "locked.toml"
    readable.write_text("[dataset]\n")
    original = Path.read_text

    def denied(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self == readable:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = _main("precompute", str(readable))
    assert code == 2 and f"config file {readable} cannot be read (Permission denied)" in err, err
    assert "Traceback" not in err


def test_runs_lists_cached_runs(tmp_path):
    code, out, _ = _main("runs", "--cache", str(tmp_path))
    assert code == 0 and f"no cached runs in {tmp_path / 'runs'}" in out
    make_synthetic_run(tmp_path / "runs", n=8, thumbnails=False, name="alpha")
    code, out, _ = _main("runs", "--cache", str(tmp_path))
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:6] == ["name", "status", "n", "vision", "language", "other"]
    assert row.split()[:3] == ["alpha", "complete", "8"] and row.split()[5] == "-"
    code, out, _ = _main("runs", "--cache", str(tmp_path), "--json")
    listed = json.loads(out)
    assert [r["name"] for r in listed] == ["alpha"] and listed[0]["n_stimuli"] == 8
    # the run's summary record, field by field, as JSON lists and objects
    assert list(listed[0]) == [
        "name", "path", "damaged", "complete", "needs_upgrade", "dataset", "n_stimuli",
        "vision_models", "language_models", "other_models", "gpa_models", "created", "updated",
        "steps",
    ]
    assert isinstance(listed[0]["vision_models"], list) and listed[0]["vision_models"]
    assert isinstance(listed[0]["steps"], list) and isinstance(listed[0]["other_models"], dict)
    # an unfinished run: being written while a live precompute holds its lock, else incomplete
    manifest_path = tmp_path / "runs" / "alpha" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    code, out, _ = _main("runs", "--cache", str(tmp_path))
    assert out.strip().splitlines()[1].split()[:2] == ["alpha", "incomplete"]
    with run_lock(tmp_path / "runs" / "alpha"):  # this process writes the run now
        code, out, _ = _main("runs", "--cache", str(tmp_path))
    assert f"being written (pid {os.getpid()})" in out
    # a lock whose pid no longer writes it (here this process, which does not hold it: a killed
    # run's lock whose pid the next process got again): the run is incomplete
    (tmp_path / "runs" / ".alpha.lock").write_text(str(os.getpid()))
    code, out, _ = _main("runs", "--cache", str(tmp_path))
    assert out.strip().splitlines()[1].split()[:2] == ["alpha", "incomplete"]


def test_user_errors_are_one_line_with_the_fix(tmp_path):
    code, _, err = _main("precompute", "--cache", str(tmp_path))
    assert code == 2 and err.startswith("error: nothing to precompute") and "--preset demo" in err
    code, _, err = _main(
        "precompute",
        "--dataset",
        str(tmp_path / "absent"),
        "--vision",
        "efficientnet-lite0,nope",
        "--cache",
        str(tmp_path),
    )
    assert code == 2 and "unknown model 'nope'" in err and "Traceback" not in err
    assert "Did you mean" not in err
    code, _, err = _main("precompute", "--dataset", str(tmp_path / "absent"), "--vision",
                         "efficientnet-lite0,efficientnet-lite1", "--language", "minlm")
    assert code == 2 and "unknown model 'minlm'. Did you mean 'minilm'?" in err
    code, _, err = _main(
        "precompute", "--preset", "demo", "--layers", "lite0", "--cache", str(tmp_path)
    )
    assert code == 2 and "MODEL=VALUE" in err


def test_report_is_delegated(monkeypatch):
    import convergence_core.report as report

    seen = []
    monkeypatch.setattr(report, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert main(["report", "demo", "--out", "x"]) == 0
    assert seen == [(["demo", "--out", "x"], "python -m convergence_core")]


@pytest.mark.slow
def test_precompute_real_models_on_six_images(tmp_path, monkeypatch):
    """EfficientNet-Lite0/1 (GPA needs two vision models) + MiniLM on 6 coco-mini images."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    source = settings.demo_data_root()
    data = json.loads((source / "captions.json").read_text(encoding="utf-8"))
    images = sorted(data["images"], key=lambda im: im["id"])[:6]
    root = tmp_path / "six"
    (root / "images").mkdir(parents=True)
    for image in images:
        shutil.copy(source / "images" / image["file_name"], root / "images")
    ids = {im["id"] for im in images}
    data = {
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
    }
    (root / "captions.json").write_text(json.dumps(data), encoding="utf-8")
    argv = [
        "precompute",
        "--dataset",
        str(root),
        "--vision",
        "efficientnet-lite0,efficientnet-lite1",
        "--language",
        "minilm",
        "--layers",
        "default",
        "--batch-size",
        "4",
        "--run-name",
        "six",
        "--cache",
        str(tmp_path / "cache"),
    ]
    code, out, err = _main(*argv)
    assert code == 0, err
    run_path = tmp_path / "cache" / "runs" / "six"
    assert out.startswith(
        f"run {run_path}: 6 stimuli; vision efficientnet-lite0, efficientnet-lite1"
    )
    assert "GPA" in out and "iterations" in out and out.count("\n") == 1
    assert "efficientnet-lite0" in err  # the progress bar
    # what to do next, with the folder and the cache since they are not the default ones
    assert (
        f"next: `python -m convergence_core report {run_path} --out report-six/` (the paper's "
        f"figures and tables), or `python -m convergence_core serve --cache {tmp_path / 'cache'}`"
    ) in err
    from convergence_core import load_run

    run = load_run(run_path)
    assert run.layers("efficientnet-lite0") == ["pre_logits"]
    assert run.embeddings["efficientnet-lite1"]["pre_logits"].shape == (6, 1280)
    assert run.embeddings["minilm"][run.default_layer("minilm")].shape == (6, 384)
    assert run.manifest.models["minilm"].weights_id
    code, out, err = _main(*argv)  # everything cached now
    assert code == 0 and err.count("cached") >= 4


def _progress_events():
    """A model extracted in 3 reports, confirmed once written, then indexed in 2 layers of 5 rows
    (the first report already counts a layer), then the steps after extraction: what precompute
    sends."""
    from convergence_core.precompute import ProgressEvent as E

    return [
        (0.0, E("extract", "lite0", 0, 10)),
        (1.0, E("extract", "lite0", 4, 10)),
        (31.5, E("extract", "lite0", 8, 10)),
        (40.0, E("extract", "lite0", 10, 10)),
        (40.1, E("extract", "lite0", 10, 10)),  # confirmed: its files are written
        (41.0, E("extract", "minilm", 10, 10, skipped=True)),
        (42.0, E("neighbours", "lite0", 5, 10)),
        (44.0, E("neighbours", "lite0", 10, 10)),
        (45.0, E("gpa", None, 0, 1001)),
        (46.0, E("gpa", None, 1, 1001, detail="iteration 1")),
        (76.0, E("gpa", None, 2, 1001, detail="iteration 2")),  # 31 s since the last line
        (77.0, E("gpa", None, 3, 1001, detail="iteration 3")),
        (147.5, E("gpa", None, 1001, 1001)),
        # a resumed stability step says what it kept as it starts
        (147.6, E("gpa_stability", None, 0, 6,
                  detail="3 of 5 GPA solutions kept from an interrupted run")),
        (147.9, E("gpa_stability", None, 6, 6)),
        (148.0, E("dispersion", None, 1, 1)),
        (148.5, E("properties", "minilm", 2, 3)),  # a cached part, read back
        (149.0, E("properties", None, 3, 3, skipped=True)),
    ]


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_is_plain_lines():
    """Not a terminal (a log file, a cluster job): one line as a model starts, one per 30 s, one
    at the end with its time; the confirming event adds nothing, and there is no carriage
    return (a bar's redraws would pile up in the log)."""
    from convergence_core.cli import _ProgressBars

    stream, clock = io.StringIO(), _Clock()
    bars = _ProgressBars(stream, clock=clock)
    assert not bars.terminal
    for clock.now, event in _progress_events():
        bars(event)
    assert stream.getvalue().splitlines() == [
        "  lite0: 0/10 items",
        "  lite0: 8/10 items (32 s)",
        "  lite0: 10/10 items in 40.0 s",
        "  minilm: cached",
        "  lite0 neighbours: 5/10 rows",
        "  lite0 neighbours: 10/10 rows in 2.0 s",
        "  gpa: started",
        "  gpa: iteration 2 (31 s)",
        "  gpa: done in 102.5 s",
        "  gpa_stability: started (3 of 5 GPA solutions kept from an interrupted run)",
        "  gpa_stability: done in 0.3 s",
        "  dispersion: done",
        "  properties: cached",
    ]


def test_progress_on_a_terminal_draws_one_bar_per_model():
    """On a terminal: one tqdm bar per model that ends at 100 % once (the confirming event used
    to draw a second, instant bar), and its rate counts from the bar's first report."""
    from convergence_core.cli import _ProgressBars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream, clock = Terminal(), _Clock()
    bars = _ProgressBars(stream, clock=clock)
    assert bars.terminal
    for clock.now, event in _progress_events():
        bars(event)
    lines = stream.getvalue().split("\n")  # a bar's redraws share its line (carriage returns)
    bars_of = {label: [line for line in lines if f"{label}:" in line]
               for label in ("lite0", "lite0 neighbours")}
    assert {label: len(found) for label, found in bars_of.items()} == {
        "lite0": 1, "lite0 neighbours": 1}
    # (tqdm pads a redraw with spaces where the previous one was longer: a rate of "50901.75"
    # after "121222.66", as the real clock decides)
    assert all(found[0].rstrip().endswith("/s]") and "100%" in found[0]
               for found in bars_of.values())
    assert "  minilm: cached" in lines and "  gpa: done in 102.5 s" in lines


def test_flags_override_a_config_file(tmp_path, monkeypatch):
    import convergence_core.precompute as precompute_module

    seen = {}

    def fake_precompute(config, progress=None):
        seen.update(config)
        raise ValueError("stop here")

    monkeypatch.setattr(precompute_module, "precompute", fake_precompute)
    config = tmp_path / "c.toml"
    config.write_text(
        'dataset = "data"\nvision_models = ["a", "b"]\nbatch_size = 8\ncaption_mode = "mean"\n',
        encoding="utf-8",
    )
    code, _, err = _main(
        "precompute",
        str(config),
        "--batch-size",
        "2",
        "--layers",
        "a=x,y",
        "--layers",
        "b=z",
        "--gpa-layer",
        "a=y",
        "--weights",
        "a=/w/a.pth",
        "--drop-bad",
        "--no-thumbnails",
        "--gpa-stop",
        "uncertainty",
    )
    assert code == 2 and "stop here" in err
    assert seen["gpa_stop"] == "uncertainty"
    assert seen["batch_size"] == 2 and seen["caption_mode"] == "mean"
    assert seen["layers"] == {"a": ["x", "y"], "b": ["z"]}
    assert seen["gpa_layers"] == {"a": "y"} and seen["weights"] == {"a": "/w/a.pth"}
    assert seen["drop_bad"] is True and seen["thumbnails"] is False
    assert seen["vision_models"] == ["a", "b"] and seen["dataset"] == "data"


_MERGE_CONFIG = """\
dataset = "data"
vision_models = ["e1", "e2"]
weights = { e1 = "/w/e1.pth", e2 = "/w/e2.pth" }
layers = { e1 = ["x", "y"] }
gpa_models = ["subj01", "subj03"]
gpa_layers = { subj01 = "V1", subj03 = "V1" }

[[models]]
name = "a"
modality = "vision"
path = "a.npy"

[[models]]
name = "subj01"
modality = "brain"
files = { V1 = "s1_V1.npy", hV4 = "s1_hV4.npy" }

[[models]]
name = "subj03"
modality = "brain"
files = { hV4 = "s3_hV4.npy", V1 = "s3_V1.npy" }
"""


def _merged(monkeypatch, tmp_path, *flags: str, config: str = _MERGE_CONFIG):
    """The settings that ``precompute CONFIG FLAGS`` hands to the pipeline, or the error line."""
    import convergence_core.precompute as precompute_module

    seen: dict = {}

    def fake_precompute(settings, progress=None):
        seen.update(settings)
        raise ValueError("stop here")

    monkeypatch.setattr(precompute_module, "precompute", fake_precompute)
    path = tmp_path / "config.toml"
    path.write_text(config, encoding="utf-8")
    code, _, err = _main("precompute", str(path), *flags)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return seen if "stop here" in err else err


def test_per_model_flags_merge_with_a_config_file_model_by_model(tmp_path, monkeypatch):
    """From the audit (F1, F2): a --features flag beside a config dropped every [[models]] entry
    of the config, and one --gpa-layer replaced its whole gpa_layers table (subj03 moved from V1
    to its first file's layer without a word). A per-model flag now replaces the config's entry
    for the model it names and keeps the others'."""
    from convergence_core.precompute import PrecomputeConfig

    seen = _merged(monkeypatch, tmp_path, "--features", "c=c.npy", "--modality", "c=vision",
                   "--gpa-layer", "subj01=hV4", "--weights", "e2=/w/new.pth",
                   "--layers", "e2=z")
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["features"] == {
        "a": {"features": "a.npy"}, "subj01": {"V1": "s1_V1.npy", "hV4": "s1_hV4.npy"},
        "subj03": {"hV4": "s3_hV4.npy", "V1": "s3_V1.npy"}, "c": {"features": "c.npy"},
    }
    assert seen["modalities"] == {"a": "vision", "subj01": "brain", "subj03": "brain",
                                  "c": "vision"}
    assert seen["gpa_layers"] == {"subj01": "hV4", "subj03": "V1"}
    assert seen["weights"] == {"e1": "/w/e1.pth", "e2": "/w/new.pth"}
    assert seen["layers"] == {"e1": ["x", "y"], "e2": ["z"]}
    assert seen["vision_models"] == ["e1", "e2"] and seen["gpa_models"] == ["subj01", "subj03"]

    # --features NAME replaces all of NAME's files (the command line says which files it has);
    # its modality and GPA layer stay the config's
    seen = _merged(monkeypatch, tmp_path, "--features", "subj01:V1=new_V1.npy")
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["features"]["subj01"] == {"V1": "new_V1.npy"}
    assert seen["features"]["subj03"] == {"hV4": "s3_hV4.npy", "V1": "s3_V1.npy"}
    assert seen["modalities"]["subj01"] == "brain" and seen["gpa_layers"]["subj01"] == "V1"

    # GPA moved to other models: the config's GPA layers of the models that left GPA go (they
    # were an error naming the config, with no flag to undo them)
    seen = _merged(monkeypatch, tmp_path, "--gpa-models", "a,c", "--features", "c=c.npy",
                   "--modality", "c=vision")
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["gpa_models"] == ["a", "c"] and seen["gpa_layers"] is None

    # a list flag replaces the config's list; the per-model settings of the models it takes out
    # of the run leave with them
    seen = _merged(monkeypatch, tmp_path, "--vision", "e3")
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["vision_models"] == ["e3"] and seen["weights"] is None and seen["layers"] == "all"
    assert set(seen["features"]) == {"a", "subj01", "subj03"}

    # an encoder of the config given as a file on the command line, and the reverse
    seen = _merged(monkeypatch, tmp_path, "--features", "e1=e1.npy", "--modality", "e1=vision")
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["vision_models"] == ["e2"] and seen["features"]["e1"] == {"features": "e1.npy"}
    assert seen["weights"] == {"e2": "/w/e2.pth"} and seen["layers"] == "all"
    seen = _merged(monkeypatch, tmp_path, "--vision", "a,e1")
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["vision_models"] == ["a", "e1"] and "a" not in seen["features"]
    assert "a" not in seen["modalities"] and seen["layers"] == {"e1": ["x", "y"]}
    # a file model of the config now an encoder: its file layer is no GPA layer of the encoder
    # (the review found gpa_layers = {fv: "L1"} handed on to the encoder)
    config = ('dataset = "data"\nvision_models = ["e1"]\ngpa_layers = { fv = "L1" }\n\n'
              '[[models]]\nname = "fv"\nmodality = "vision"\nfiles = { L1 = "fv.npy" }\n')
    seen = _merged(monkeypatch, tmp_path, "--vision", "fv,e1", config=config)
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert seen["vision_models"] == ["fv", "e1"] and not seen.get("gpa_layers")
    # and the mirror: an encoder of the config now a file model keeps its GPA layer only if one
    # of its files has that layer
    config = 'dataset = "data"\nvision_models = ["e1", "e2"]\ngpa_layers = { e1 = "blocks.3" }\n'
    seen = _merged(monkeypatch, tmp_path, "--features", "e1:L1=e1.npy", "--modality",
                   "e1=vision", config=config)
    PrecomputeConfig.from_mapping(seen)  # a valid config
    assert not seen.get("gpa_layers")
    seen = _merged(monkeypatch, tmp_path, "--features", "e1:blocks.3=e1.npy", "--modality",
                   "e1=vision", config=config)
    assert seen["gpa_layers"] == {"e1": "blocks.3"}

    # a flag's own entry for a model not in the run is kept, and so refused, naming the setting
    seen = _merged(monkeypatch, tmp_path, "--weights", "nope=/w/n.pth")
    assert seen["weights"]["nope"] == "/w/n.pth"
    with pytest.raises(ValueError, match="weights names 'nope', which is not among the models"):
        PrecomputeConfig.from_mapping(seen)


def test_a_config_setting_the_flags_make_meaningless_is_named_with_the_fix(tmp_path, monkeypatch):
    """The config's gpa_models naming encoders that --vision replaced said "gpa_models names
    [...], which are not models of this run" as if the config were wrong; and the config's
    layers = "default" cannot take one model's --layers (the others would get every layer)."""
    config = 'dataset = "data"\nvision_models = ["e1", "e2"]\ngpa_models = ["e1", "e2"]\n'
    err = _merged(monkeypatch, tmp_path, "--vision", "e3,e4", config=config)
    assert err.startswith("error: the config's gpa_models names ['e1', 'e2'], which the command "
                          "line takes out of the run"), err
    assert "give --gpa-models with some of ['e3', 'e4']" in err
    seen = _merged(monkeypatch, tmp_path, "--vision", "e3,e4", "--gpa-models", "e3,e4",
                   config=config)
    assert seen["gpa_models"] == ["e3", "e4"]
    err = _merged(monkeypatch, tmp_path, "--layers", "e1=x",
                  config='dataset = "data"\nvision_models = ["e1", "e2"]\nlayers = "default"\n')
    assert "the config's layers = \"default\"" in err and "give --layers default" in err
    seen = _merged(monkeypatch, tmp_path, "--layers", "all",
                   config='dataset = "data"\nvision_models = ["e1"]\nlayers = { e1 = ["x"] }\n')
    assert seen["layers"] == "all"


def _brain_files(folder: Path, n: int = 12) -> dict[str, Path]:
    """Two subjects of two regions each, as .npy files with the ids of ``_feature_files``."""
    import numpy as np

    paths = {}
    for i, (subject, region) in enumerate(
        (s, r) for s in ("s1", "s2") for r in ("V1", "hV4")
    ):
        paths[f"{subject}_{region}"] = path = folder / f"{subject}_{region}.npy"
        np.save(path, np.random.default_rng(10 + i).standard_normal((n, 6)))
        (folder / f"{path.name}.ids.txt").write_text("".join(f"s{j}\n" for j in range(n)))
    return paths


def test_a_real_run_from_a_config_and_flags_keeps_the_configs_models(tmp_path):
    """F1 and F2 end to end: the config's models stay beside the one a flag adds, and one
    --gpa-layer changes that subject's GPA layer only."""
    from convergence_core import load_run

    _feature_files(tmp_path / "f")
    brain = _brain_files(tmp_path / "f")
    f = tmp_path / "f"
    config = tmp_path / "config.toml"
    config.write_text(
        'gpa_models = ["s1", "s2"]\ngpa_layers = { s1 = "V1", s2 = "V1" }\ngpa_starts = 0\n'
        "thumbnails = false\n"
        f'[[models]]\nname = "a"\nmodality = "vision"\npath = "{f / "a.npy"}"\n'
        f'[[models]]\nname = "s1"\nmodality = "brain"\n'
        f'files = {{ V1 = "{brain["s1_V1"]}", hV4 = "{brain["s1_hV4"]}" }}\n'
        f'[[models]]\nname = "s2"\nmodality = "brain"\n'
        f'files = {{ V1 = "{brain["s2_V1"]}", hV4 = "{brain["s2_hV4"]}" }}\n',
        encoding="utf-8",
    )
    code, out, err = _main("precompute", str(config), "--features", f"b={f / 'b.npy'}",
                           "--modality", "b=vision", "--gpa-layer", "s1=hV4", "--quiet",
                           "--cache", str(tmp_path / "c"), "--run-name", "merged")
    assert code == 0, err
    run = load_run(tmp_path / "c" / "runs" / "merged")
    assert sorted(run.models) == ["a", "b", "s1", "s2"]
    assert run.gpa.models == ("s1", "s2") and run.gpa.layers == ("hV4", "V1")


@pytest.mark.parametrize(
    ("flag", "first", "second"),
    [("--modality", "vision", "brain"), ("--modality", "vision", "vision"),
     ("--gpa-layer", "V1", "hV4"), ("--weights", "/w/a.pth", "/w/b.pth"),
     ("--layers", "x,y", "z")],
)
def test_a_per_model_flag_given_twice_for_a_model_is_refused(flag, first, second):
    """From the audit (F3): a repeated --modality, --gpa-layer, --weights or --layers MODEL=...
    kept the last value without a word; refused as a repeated --features layer is (the same
    value twice too, as --features)."""
    code, out, err = _main("precompute", "--features", "c=c.npy", flag, f"c={first}", flag,
                           f"c={second}")
    assert code == 2 and out == ""
    assert err == f"error: {flag} gives 'c' twice (c={first} and c={second}); give it once\n"


def test_layers_all_or_default_beside_another_layers_flag_is_refused():
    code, _, err = _main("precompute", "--layers", "default", "--layers", "a=x")
    assert code == 2 and "--layers default is a choice for every model" in err, err


def test_layers_default_keeps_every_file_of_a_file_model_as_the_help_says(tmp_path, capsys):
    """From the audit (F5): --layers default stored every layer of a model from feature files
    while the help said "each model's default layer only". A file model's layers are the files
    given for it (the config refuses layers for it), so they are kept; the help says so."""
    from convergence_core import load_run

    with pytest.raises(SystemExit):
        main(["precompute", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("'default' (each encoder's default layer only; a model from --features keeps every "
            "file given for it)") in help_text
    features = _feature_files(tmp_path / "f")
    brain = _brain_files(tmp_path / "f")
    code, _, err = _main("precompute", *features, "--features", f"s1:V1={brain['s1_V1']}",
                         "--features", f"s1:hV4={brain['s1_hV4']}", "--modality", "s1=brain",
                         "--layers", "default", "--gpa-starts", "0", "--no-thumbnails",
                         "--quiet", "--cache", str(tmp_path / "c"), "--run-name", "ld")
    assert code == 0, err
    run = load_run(tmp_path / "c" / "runs" / "ld")
    assert run.layers("s1") == ["V1", "hV4"] and run.default_layer("s1") == "V1"


def test_ctrl_c_says_how_to_resume_instead_of_a_traceback(monkeypatch):
    """Ctrl-C during an extraction raised KeyboardInterrupt through a page of torch frames; the
    run keeps what finished (tests/test_precompute.py), and the command now says so."""
    import convergence_core.precompute as precompute_module

    def interrupted(config, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute_module, "precompute", interrupted)
    code, out, err = _main("precompute", "--preset", "demo", "--quiet")
    assert code == 130 and out == ""
    assert err.strip() == (
        "interrupted: the steps that finished are kept in the run; rerun the same command to "
        "resume where it stopped"
    )


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES"])
def test_a_full_or_unwritable_cache_is_one_line_with_the_fix(monkeypatch, code):
    """A full disk mid-run raised OSError through the pipeline's frames; it is the user's to fix
    (space, or another --cache) and the finished steps are kept, which the line says. Other
    OSErrors keep their traceback (they may be bugs)."""
    import errno

    import convergence_core.precompute as precompute_module

    def full(config, progress=None):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/c/runs/x/a.npy")

    monkeypatch.setattr(precompute_module, "precompute", full)
    status, out, err = _main("precompute", "--preset", "demo", "--quiet")
    assert status == 1 and out == ""
    assert err.startswith(f"error: cannot write the run: {os.strerror(getattr(errno, code))} "
                          "(/c/runs/x/a.npy)")
    assert "rerun the same command to resume" in err

    def other(config, progress=None):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(precompute_module, "precompute", other)
    with pytest.raises(OSError, match="Input/output error"):
        _main("precompute", "--preset", "demo", "--quiet")


def test_a_short_write_on_a_full_disk_is_named_a_full_disk(monkeypatch, tmp_path):
    """numpy's short write carries no errno ("288000 requested and 283616 written", seen on a
    full 12 MB tmpfs): with the cache's disk nearly full it is a full disk; with room, a fault of
    another kind, whose traceback stays."""
    import collections

    import convergence_core.cli as cli
    import convergence_core.precompute as precompute_module

    def short_write(config, progress=None):
        raise OSError("288000 requested and 283616 written")

    monkeypatch.setattr(precompute_module, "precompute", short_write)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage(12 << 20, 11 << 20, 1 << 20))
    status, _, err = _main("precompute", "--preset", "demo", "--quiet", "--cache", str(tmp_path))
    assert status == 1
    assert err.startswith(f"error: cannot write the run: the disk holding {tmp_path} is full "
                          "(1.0 MiB free; 288000 requested and 283616 written)")
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 39))
    with pytest.raises(OSError, match="requested"):
        _main("precompute", "--preset", "demo", "--quiet", "--cache", str(tmp_path))


def test_a_short_write_under_a_size_limit_or_quota_is_a_storage_fault(monkeypatch, tmp_path):
    """From the reliability audit: under a file-size limit (or a quota, with the disk itself
    roomy) numpy's short write left a traceback. The cache's writer names the file and the
    causes, leaves no temporary file, and the CLI prints one line with the fix."""
    script = (
        "import resource, numpy as np\n"
        "from convergence_core.cache import write_npy, ShortWriteError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        f"    write_npy({str(tmp_path / 'big.npy')!r}, np.zeros(100_000))\n"
        "except ShortWriteError as error:\n"
        "    print('short:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert f"short: could not write {tmp_path / 'big.npy'} whole" in done.stdout, done.stderr
    assert "a file-size limit ran out" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left
    import convergence_core.precompute as precompute_module
    from convergence_core.cache import ShortWriteError

    def short_write(config, progress=None):
        raise ShortWriteError(f"could not write {tmp_path / 'x.npy'} whole (38400 requested "
                              "and 25584 written): the disk, your quota or a file-size limit "
                              "ran out")

    monkeypatch.setattr(precompute_module, "precompute", short_write)
    status, _, err = _main("precompute", "--preset", "demo", "--quiet", "--cache", str(tmp_path))
    assert status == 1 and err.startswith("error: cannot write the run: could not write")
    assert "rerun the same command to resume" in err and "Traceback" not in err
    # other writes under a size limit fail with errno EFBIG ("File too large"): the same line
    import errno

    def too_large(config, progress=None):
        raise OSError(errno.EFBIG, "File too large", str(tmp_path / "stimuli.parquet"))

    monkeypatch.setattr(precompute_module, "precompute", too_large)
    status, _, err = _main("precompute", "--preset", "demo", "--quiet", "--cache", str(tmp_path))
    assert status == 1 and "File too large" in err and "Traceback" not in err
    # only numpy's short write is relabelled; the error pickles (multiprocessing, Ray)
    import pickle

    from convergence_core.cache import atomic_path

    error = ShortWriteError("could not write x whole")
    assert str(pickle.loads(pickle.dumps(error))) == "could not write x whole"
    with pytest.raises(OSError, match="^unrelated$"), atomic_path(tmp_path / "y.bin"):
        raise OSError("unrelated")


def test_next_steps_name_a_run_of_the_default_cache_by_its_name(tmp_path, monkeypatch):
    from convergence_core.cli import next_steps

    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
    line = next_steps(tmp_path / "cache" / "runs" / "feature-ids-0123")
    name = "feature-ids-0123"
    assert f"`python -m convergence_core report {name} --out report-{name}/`" in line
    assert "`python -m convergence_core serve` (pick feature-ids-0123 in the sidebar)" in line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_names_an_address_one_can_open_and_words_the_empty_host_for_make():
    """`make demo HOST=0.0.0.0` echoed `Dashboard: http://0.0.0.0:8501`, which no browser opens,
    and `make demo HOST=` was refused by the server with "use --host …", a flag make users do not
    give. (The commands are echoed, not run: PY=echo; `-o install`: no install.)"""
    root = Path(__file__).resolve().parents[1]

    def demo(host: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", "-o", "install", "demo", f"HOST={host}", "PY=echo"],
                              cwd=root, capture_output=True, text=True, timeout=60)

    every = demo("0.0.0.0")
    assert every.returncode == 0, every.stderr
    assert "http://0.0.0.0" not in every.stdout, every.stdout
    import socket

    assert f"Dashboard: http://{socket.gethostname()}:8501 (listening on every interface" \
        in every.stdout
    assert "Dashboard: http://localhost:8501" in demo("localhost").stdout
    empty = demo("")
    assert empty.returncode != 0 and "precompute" not in empty.stdout, empty.stdout
    assert "HOST is empty" in empty.stderr and "HOST=localhost" in empty.stderr, empty.stderr
    # refused before the install (it installed first, then refused): -n lists the recipes in
    # the order make would run them, -W makes the install's stamp out of date
    planned = subprocess.run(["make", "-n", "-W", "requirements.txt", "demo", "HOST="], cwd=root,
                             capture_output=True, text=True, timeout=60).stdout
    assert "pip install" in planned and planned.index("HOST is empty") < planned.index(
        "pip install"), planned
