"""Bad input to every subcommand: one ``error:`` line naming the problem and the fix, exit status
2, never a traceback (from the review of bad input: unreadable inputs called cache-write faults,
disk errors as tracebacks, a bad --host, a misspelt image column, misleading messages)."""

from __future__ import annotations

import builtins
import errno
import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convergence_core.cache import CacheFormatError, read_json, read_npy, read_parquet
from convergence_core.cli import main
from convergence_core.datasets import load_dataset
from convergence_core.sources import FeatureFileError, read_feature_file
from tests.test_cli import _feature_files


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _unreadable(monkeypatch, path: Path, code: int) -> None:
    """Opening ``path`` (by open(), Path.read_text or pandas) fails with ``code``, as a file
    without read permission (EACCES; tests run as root, which chmod cannot stop) or on a failing
    disk (EIO) does."""
    real = builtins.open
    target = os.path.abspath(path)

    def fake(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == target:
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


# -- 1, 2: an input (or a run's file) that cannot be read ---------------------------------------


@pytest.mark.parametrize("which", ["b.npy", "b.npy.ids.txt"])
def test_an_unreadable_feature_file_is_named_not_called_a_cache_write_fault(
    tmp_path, monkeypatch, which
):
    """EACCES reading a feature file said "cannot write the run ... free some space (or give a
    writable folder with --cache)", exit 1."""
    features = _feature_files(tmp_path / "f")
    _unreadable(monkeypatch, tmp_path / "f" / which, errno.EACCES)
    code, out, err = _main("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "cannot read " in err and str(tmp_path / "f" / which) in err
    assert "permission denied" in err and "chmod u+r" in err
    assert "cannot write the run" not in err and "--cache" not in err


@pytest.mark.parametrize("which", ["b.npy", "b.npy.ids.txt"])
def test_a_disk_error_reading_a_feature_file_is_one_line_naming_it(tmp_path, monkeypatch, which):
    """EIO reading a feature file (or its id list) ended in an OSError traceback."""
    features = _feature_files(tmp_path / "f")
    _unreadable(monkeypatch, tmp_path / "f" / which, errno.EIO)
    code, _, err = _main("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(tmp_path / "f" / which) in err and "input/output error" in err


def test_an_id_list_read_error_names_the_id_list(tmp_path, monkeypatch):
    """sources._read_ids let an OSError other than a decoding error through."""
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    ids = tmp_path / "x.npy.ids.txt"
    ids.write_text("a\nb\n")
    real = Path.read_text

    def failing(self, *args, **kwargs):
        if self == ids:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(FeatureFileError, match=r"cannot read the id list of feature file x\.npy, "
                       + r".*x\.npy\.ids\.txt: the disk reported an input/output error"):
        read_feature_file(tmp_path / "x.npy", ["a", "b"], model="m", layer="l")


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_a_run_file_that_cannot_be_read_is_a_format_error_naming_it(tmp_path, monkeypatch, code):
    """cache.read_npy opened the file outside any handler: EIO (or EACCES) was a traceback in
    report, runs and the dashboard; read_json and read_parquet did the same or told to delete a
    file that is fine."""
    np.save(tmp_path / "a.npy", np.ones(3))
    (tmp_path / "m.json").write_text("{}")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "t.parquet")
    for name in ("a.npy", "m.json"):
        _unreadable(monkeypatch, tmp_path / name, code)
    words = "the disk reported an input/output error" if code == errno.EIO else "permission denied"
    with pytest.raises(CacheFormatError, match=f"cannot read cached array .*a.npy: {words}"):
        read_npy(tmp_path / "a.npy")
    with pytest.raises(CacheFormatError, match=f"cannot read file .*m.json: {words}"):
        read_json(tmp_path / "m.json")
    import pyarrow.parquet as pq

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "t.parquet"))

    monkeypatch.setattr(pq, "read_table", failing)
    with pytest.raises(CacheFormatError, match=f"cannot read file .*t.parquet: {words}") as error:
        read_parquet(tmp_path / "t.parquet")
    assert "delete it" not in str(error.value)


def test_an_unreadable_coco_captions_file_is_named(make_coco_folder, monkeypatch):
    """COCO's captions.json was read outside any handler: EACCES became "cannot write the
    run"."""
    root = make_coco_folder([["a cat"], ["a dog"]])
    _unreadable(monkeypatch, root / "captions.json", errno.EACCES)
    with pytest.raises(ValueError, match=r"cannot read COCO captions file .*captions\.json: "
                       "permission denied"):
        load_dataset(root)


def test_an_unreadable_table_names_the_table_and_the_fix(tmp_path, monkeypatch):
    pd.DataFrame({"id": ["s0", "s1"], "caption": ["x", "y"]}).to_csv(tmp_path / "t.csv",
                                                                     index=False)
    _unreadable(monkeypatch, tmp_path / "t.csv", errno.EACCES)
    with pytest.raises(ValueError, match=r"cannot read table .*t\.csv: permission denied; make "
                       "it readable"):
        load_dataset(tmp_path / "t.csv")


def test_an_input_read_fault_outside_the_cache_is_not_a_cache_write_fault(tmp_path, monkeypatch):
    """A read the pipeline does itself (the --stimuli id list, say) failing with EACCES or EIO on
    a file outside the cache: named as an input, exit 2; the same fault inside the cache keeps
    the storage line (exit 1)."""
    import convergence_core.precompute as precompute_module

    features = _feature_files(tmp_path / "f")
    listed = tmp_path / "keep.txt"
    listed.write_text("s1\n")
    inside = tmp_path / "c" / "runs" / "r" / "a.npy"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"")
    raised: list[OSError] = []

    def failing(config, progress=None):
        raise raised[0]

    monkeypatch.setattr(precompute_module, "precompute", failing)
    flags = ("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"))
    raised[:] = [OSError(errno.EACCES, "Permission denied", str(listed))]
    code, _, err = _main(*flags)
    assert code == 2 and f"cannot read input file {listed}: permission denied" in err, err
    raised[:] = [OSError(errno.EIO, "Input/output error", str(listed))]
    code, _, err = _main(*flags)
    assert code == 2 and f"cannot read input file {listed}: the disk reported" in err, err
    raised[:] = [OSError(errno.EACCES, "Permission denied", str(inside))]
    code, _, err = _main(*flags)
    assert code == 1 and err.startswith("error: cannot write the run: Permission denied"), err
    raised[:] = [OSError(errno.EIO, "Input/output error", str(inside))]
    code, _, err = _main(*flags)
    assert code == 1 and f"input/output error (EIO) on {inside}" in err, err
    assert err.count("\n") == 1


# -- 3: serve --host / --port ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "999.1.1.1"], "--host 999.1.1.1 is not an IPv4 address"),
        (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
        (["--server.address", "192.0.2.1"], "--server.address 192.0.2.1 is not an address"),
        (["--host", "not-a-host"], "--host 'not-a-host' is not an address or a host name"),
        (["--server.port", "70000"], "--server.port 70000 is not a TCP port"),
        (["--port", "0"], "--port 0 is not a TCP port"),
    ],
)
def test_serve_refuses_a_bad_host_in_one_line(argv, message, capsys, monkeypatch):
    """--host not-a-host (or 999.1.1.1, or an address of another machine) was a socket traceback
    from Streamlit, after every import."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # no name server needed
        if host == "not-a-host":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setenv("CONVERGENCE_CACHE", "unused")  # serve --cache would set it
    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert "localhost" in error or "1..65535" in error


def test_serve_accepts_the_usual_hosts():
    from convergence_core.dashboard import serve

    for host in ("localhost", "127.0.0.1", "0.0.0.0"):
        assert serve.streamlit_arguments(["--host", host]) == ["--server.address", host]


def test_a_host_is_accepted_when_any_of_its_addresses_binds(monkeypatch):
    """localhost resolving to ::1 first on a machine without IPv6 on lo (common in containers):
    the server binds 127.0.0.1, so the check must not refuse it on the first address alone."""
    from convergence_core.dashboard import serve

    real_socket = socket.socket

    def resolve(host, *args, **kwargs):
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
        ]

    class NoIPv6(real_socket):
        def bind(self, address):  # noqa: ANN001, ANN202
            if self.family == socket.AF_INET6:
                raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
            return super().bind(address)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "socket", NoIPv6)
    assert serve.streamlit_arguments(["--host", "localhost"]) == [
        "--server.address", "localhost"
    ]


# -- 4: a misspelt image column -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "values", "why"),
    [
        ("img", ["a.png", "b.png"], "its name is a variant of 'image'"),
        ("Image", ["a.png", "b.png"], "its name is a variant of 'image'"),
        ("image_path", ["x/a", "x/b"], "its name is a variant of 'image'"),
        ("imagePath", ["x/a", "x/b"], "its name is a variant of 'image'"),
        ("imgae", ["x/a", "x/b"], "its name is close to 'image'"),
        ("file", ["a.PNG", "sub/b.jpg"], "its cells are image files, e.g. 'a.PNG'"),
    ],
)
def test_a_misspelt_image_column_is_refused_naming_it(tmp_path, column, values, why):
    """A table with an id column and a misspelt image column loaded silently as a data set
    without images (captions only)."""
    pd.DataFrame({"id": ["s0", "s1"], column: values, "caption": ["x", "y"]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(ValueError) as error:
        load_dataset(tmp_path / "t.csv")
    text = str(error.value)
    assert f"has no 'image' column, but its column {column!r} looks like one ({why})" in text
    assert "rename that column to 'image'" in text and "leave that column out" in text


def test_a_table_without_images_still_loads(tmp_path):
    """The rule spares a genuinely image-less table: ids that are image file names, a COCO-style
    image_id, a label and other columns."""
    pd.DataFrame({
        "id": ["0001.jpg", "0002.jpg"], "image_id": [11, 12], "caption": ["x", "y"],
        "label": ["cat.png", "dog.png"], "imagenet": ["n01", "n02"], "score": [0.5, 0.7],
    }).to_csv(tmp_path / "t.csv", index=False)
    ds = load_dataset(tmp_path / "t.csv")
    assert not ds.images and ds.stimuli["id"].tolist() == ["0001.jpg", "0002.jpg"]


def test_a_misspelt_image_column_without_ids_is_named(tmp_path):
    pd.DataFrame({"img": ["a.png"], "caption": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"its column 'img' looks like the image column .*: "
                       "rename it to 'image'"):
        load_dataset(tmp_path / "t.csv")


# -- 5: messages that misled -----------------------------------------------------------------------


def test_a_folder_given_as_a_feature_file_is_called_a_folder(tmp_path):
    features = _feature_files(tmp_path / "f")
    features[1] = f"a={tmp_path / 'f'}"
    code, _, err = _main("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"))
    assert code == 2 and f"feature file {tmp_path / 'f'} (model 'a'" in err
    assert "is a folder, not a file" in err and "does not exist" not in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_pipe_or_device_given_as_a_feature_file_is_not_said_to_be_missing(tmp_path):
    """A named pipe, or a link to /dev/zero, was called a file that "does not exist" (from a
    review): it is there, but not a regular file."""
    features = _feature_files(tmp_path / "f")
    os.mkfifo(tmp_path / "pipe.npy")
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    for name in ("pipe.npy", "zero.npy"):
        features[1] = f"a={tmp_path / name}"
        code, _, err = _main("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"))
        assert code == 2 and f"feature file {tmp_path / name} (model 'a'" in err
        assert "is not a regular file (a pipe, device or socket)" in err, err
        assert "does not exist" not in err


def test_features_without_a_model_name_names_the_format(tmp_path):
    """--features :L=PATH reached the config check: "config value 'features' = {'': ...}"."""
    code, _, err = _main("precompute", "--features", f":L={tmp_path / 'a.npy'}", "--modality",
                         "a=vision")
    assert code == 2 and "has no model name before the ':'" in err
    assert "NAME:LAYER=PATH" in err and "config value" not in err


def test_a_run_name_starting_with_a_dash_is_refused(tmp_path):
    """--run-name=-dash made a run that `report -dash` reads as an unknown option."""
    features = _feature_files(tmp_path / "f")
    code, _, err = _main("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"),
                         "--run-name=-dash")
    assert code == 2 and "--run-name '-dash' starts with '-'" in err
    assert not (tmp_path / "c" / "runs" / "-dash").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--list-size", "0"), ("--gpa-starts", "-1"), ("--concurrency", "0"),
     ("--gpa-stop", "fast"), ("--device", "gpu")],
)
def test_a_value_out_of_range_names_the_flag_typed(tmp_path, flag, value):
    """These named the setting (config value 'gpa_starts', the neighbour list size K,
    concurrency), not the flag."""
    features = _feature_files(tmp_path / "f")
    code, _, err = _main("precompute", *features, "--quiet", "--cache", str(tmp_path / "c"),
                         flag, value)
    assert code == 2 and err.startswith(f"error: {flag} ") and err.count("\n") == 1, err
    assert "config value" not in err


def test_report_with_a_cache_that_does_not_exist_says_so_and_names_the_flag(
    tmp_path, monkeypatch, capsys
):
    """`report NAME --cache FOLDER` where FOLDER does not exist: the error says that folder does
    not exist and names --cache (it sent the user to $CONVERGENCE_CACHE only)."""
    from convergence_core import report

    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))  # restored at teardown
    missing = tmp_path / "no-such-cache"
    code = report.main(["demo", "--cache", str(missing), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2, error
    assert os.environ["CONVERGENCE_CACHE"] == str(tmp_path / "cache")  # --cache's, put back
    assert f"that cache folder {missing} does not exist" in error, error
    assert "give its folder with --cache" in error, error
    assert error.count("\n") == 1 and "Traceback" not in error, error


def test_a_rerun_says_which_damaged_file_it_redoes(tmp_path):
    """A feature file's stored embeddings cut short by hand: the rerun extracts that model again
    and its progress says why, naming the file (the model's lines said nothing of it)."""
    features = _feature_files(tmp_path / "f")
    cache = ["--cache", str(tmp_path / "c")]
    code, _, err = _main("precompute", *features, *cache)
    assert code == 0, err
    (stored,) = (tmp_path / "c" / "runs").glob("*/embeddings/b/features.npy")
    stored.write_bytes(stored.read_bytes()[:-8])
    code, _, err = _main("precompute", *features, *cache)
    assert code == 0, err
    (said,) = [line for line in err.splitlines() if "redone" in line]
    assert said.startswith("  b: redone: ") and "embeddings/b/features.npy" in said, err
    assert "  a: cached" in err, err


def test_a_broken_pipe_of_the_work_is_not_taken_for_a_closed_output(tmp_path, monkeypatch):
    """A BrokenPipeError from the work (a worker's pipe), not from writing the output, was ended
    quietly with status 141, and standard output was pointed at /dev/null for the rest of the
    process: it is an error like any other, and the output stays as it was."""
    from convergence_core import precompute as module

    def broken(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(module, "precompute", broken)
    with pytest.raises(BrokenPipeError):
        _main("precompute", *_feature_files(tmp_path / "f"), "--quiet",
              "--cache", str(tmp_path / "c"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_outside_the_cache_is_not_called_an_unreadable_input(tmp_path, code):
    """A write fault on an existing file outside the cache (the Hugging Face caches, say) was
    'cannot read input file ... (No space left on device)': it is the storage's fault."""
    from convergence_core.cli import _input_fault, _storage_fault

    existing = tmp_path / "elsewhere" / "file.bin"
    existing.parent.mkdir()
    existing.write_bytes(b"x")
    fault = OSError(code, os.strerror(code), str(existing))
    assert _input_fault(fault, tmp_path / "cache") is None
    assert _storage_fault(fault, tmp_path / "cache") is not None


def test_features_with_an_empty_layer_name_names_the_format(tmp_path):
    """`--features a:=path` silently made the layer 'features': a layer name was meant."""
    code, _, err = _main("precompute", "--features", f"a:={tmp_path / 'a.npy'}",
                         "--cache", str(tmp_path / "c"))
    assert code == 2 and err.count("\n") == 1, err
    assert "has no layer name after the ':'" in err and "NAME:LAYER=PATH" in err, err


def test_every_redone_layer_of_a_model_is_said():
    """A model's neighbour lists of two layers, both damaged: each layer's "redone" line is
    printed (only the model's first event printed its detail, so the second layer's was lost)."""
    from convergence_core.cli import _ProgressBars
    from convergence_core.precompute import ProgressEvent

    stream = io.StringIO()
    bars = _ProgressBars(stream)
    bars(ProgressEvent("neighbours", "b", 0, 24, detail="redone: first layer's file"))
    bars(ProgressEvent("neighbours", "b", 6, 24))
    bars(ProgressEvent("neighbours", "b", 12, 24, detail="redone: second layer's file"))
    bars(ProgressEvent("neighbours", "b", 24, 24))
    said = [line for line in stream.getvalue().splitlines() if "redone" in line]
    assert said == ["  b neighbours: redone: first layer's file",
                    "  b neighbours: redone: second layer's file"], stream.getvalue()


def test_a_damaged_cached_array_says_rerun_precompute_which_repairs_it(tmp_path):
    """The message said "delete it and rerun precompute", but the rerun alone writes the file
    again (headers and sizes are checked): following the message as written repairs the run."""
    from convergence_core.run import load_run
    from convergence_core.run_checks import check_run_files

    features = [*_feature_files(tmp_path / "f"), "--quiet", "--cache", str(tmp_path / "c")]
    assert _main("precompute", *features)[0] == 0
    (stored,) = (tmp_path / "c" / "runs").glob("*/embeddings/b/features.npy")
    stored.write_bytes(b"not numpy at all")
    with pytest.raises(CacheFormatError) as error:
        read_npy(stored)
    assert "delete" not in str(error.value) and "rerun `python -m" in str(error.value)
    assert _main("precompute", *features)[0] == 0  # the rerun, nothing deleted
    check_run_files(load_run(stored.parents[2]))
    assert read_npy(stored).shape == (12, 4)


@pytest.mark.parametrize(
    ("flags", "meant"),
    [(["--stimuli", "comon"], "'common'"), (["--modality", "vitb=vision"], "'vit-b'")],
)
def test_a_near_miss_of_stimuli_or_a_model_name_is_answered_with_the_name(tmp_path, flags, meant):
    """`--stimuli comon` said only "comon is not a file", `--modality vitb=vision` only "which
    has no feature file": each now suggests the close name, as `--modality a=visoin` does."""
    features = _feature_files(tmp_path / "f", names=("vit-a", "vit-b"))
    code, _, err = _main("precompute", *features, *flags, "--quiet", "--cache", str(tmp_path / "c"))
    assert code == 2 and err.count("\n") == 1, err
    assert f"(did you mean {meant}?)" in err, err
    assert not (tmp_path / "c" / "runs").exists() or not any((tmp_path / "c" / "runs").iterdir())


def test_the_console_script_names_itself_in_what_it_recommends(tmp_path, monkeypatch, capsys):
    """`convergence runs` on an empty cache recommended `python -m convergence_core precompute
    --preset demo`: the installed command names itself, in that line, the help's examples and
    the next steps after a precompute."""
    from convergence_core import cli

    monkeypatch.setattr(sys, "argv", ["convergence", "runs", "--cache", str(tmp_path / "c")])
    assert cli.console_main() == 0
    said = capsys.readouterr().out
    assert "make one with `convergence precompute --preset demo`" in said, said
    monkeypatch.setattr(sys, "argv", ["convergence", "precompute", "--help"])
    with pytest.raises(SystemExit):
        cli.console_main()
    help_text = capsys.readouterr().out
    assert "\n  convergence precompute --preset demo\n" in help_text
    assert "python -m" not in help_text
    assert "layer of a model entering GPA" in help_text  # brain subjects too, not only vision
    line = cli.next_steps(tmp_path / "c" / "runs" / "r", "convergence")
    assert "`convergence report " in line and "`convergence serve --cache " in line, line
    # and the report's own help and messages (they said python -m convergence_core report)
    monkeypatch.setattr(sys, "argv", ["convergence", "report", "--help"])
    with pytest.raises(SystemExit):
        cli.console_main()
    report_help = capsys.readouterr().out
    assert report_help.startswith("usage: convergence report") and "python -m" not in report_help
    monkeypatch.setattr(sys, "argv", ["convergence", "report", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        cli.console_main()
    assert "`convergence runs` lists them" in capsys.readouterr().err
