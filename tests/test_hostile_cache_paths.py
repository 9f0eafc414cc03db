"""Hostile paths planted in the cache or named by a data set: run locks that are symbolic links
(to /dev/zero, a FIFO, a big file outside the cache) and Hugging Face image cells naming files
outside their data set's folder.

Project rule: nothing outside the cache (or a data set's folder) is read, copied or deleted
because of what sits in the cache or the data set; bad input gets an error naming the problem and
the fix. Each test here failed on the code before the fix (``runs`` ended in MemoryError or hung,
``run_lock`` spun forever on a dangling link, the ``hf:`` loader copied /tmp files into the cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from convergence_core import cache
from convergence_core.cache import RunLockedError, run_lock
from convergence_core.datasets import _hf_image_bytes, load_hf
from tests.fixtures_runs import make_synthetic_run
from tests.test_cli import _main

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- run locks


def _incomplete_run(cache_folder: Path, name: str = "alpha") -> Path:
    """A run ``name`` under ``cache_folder/runs`` whose manifest says it is not complete (what a
    precompute that stopped, or one writing it now, leaves): ``runs`` asks its lock."""
    make_synthetic_run(cache_folder / "runs", n=8, thumbnails=False, name=name)
    manifest_path = cache_folder / "runs" / name / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    return cache_folder / "runs" / name


def _status_of(out: str, name: str = "alpha") -> str:
    """The status column of run ``name`` in ``runs``' table."""
    for line in out.strip().splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] == name:
            return cells[1]
    raise AssertionError(f"run {name} not listed in:\n{out}")


def _in_a_thread(work, seconds: float, unblock) -> tuple[bool, object]:
    """Run ``work()`` in a thread for at most ``seconds``: (finished, its result or exception).
    A thread still running then is unblocked with ``unblock()`` (so that a failing test leaves
    no thread behind) and reported unfinished."""
    box: dict[str, object] = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            box["result"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(30)
        return False, box.get("result")
    return True, box.get("result")


_RUNS_UNDER_A_MEMORY_CAP = """
import io, resource, sys
from convergence_core import cache, cli, run, settings  # everything imported before the cap
from convergence_core.cache import run_lock

def size():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

cap = size() + 768 * 2**20  # an unbounded read of /dev/zero ends in MemoryError at once
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out, err = io.StringIO(), io.StringIO()
code = cli.main(["runs", "--cache", sys.argv[1]], out=out, err=err)
print("runs:", code)
print(out.getvalue(), err.getvalue(), flush=True)
try:
    with run_lock(sys.argv[2], wait_seconds=0):
        print("run_lock: taken")
except cache.RunLockedError as error:
    print("run_lock refused:", error)
"""


@pytest.mark.skipif(
    not os.path.exists("/dev/zero") or not os.path.exists("/proc/self/status"),
    reason="needs /dev/zero and /proc",
)
def test_runs_never_reads_a_lock_linked_to_dev_zero(tmp_path):
    """From the review: ``runs/.x.lock -> /dev/zero`` beside an incomplete run made ``runs``
    read the lock without end (MemoryError), and a precompute's ``run_lock`` the same. Under a
    memory cap and a time limit: the run is listed as incomplete, and ``run_lock`` refuses the
    link by name (neither following nor deleting it)."""
    run = _incomplete_run(tmp_path)
    lock = cache.lock_path(run)
    lock.symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-c", _RUNS_UNDER_A_MEMORY_CAP, str(tmp_path), str(run)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runs: 0" in done.stdout, done.stdout + done.stderr
    table = done.stdout.split("runs: 0", 1)[1]
    assert _status_of(table) == "incomplete", done.stdout
    assert "run_lock refused:" in done.stdout and "a symbolic link (to /dev/zero)" in done.stdout
    assert f"delete {lock}" in done.stdout  # the fix, naming the file
    assert lock.is_symlink() and os.readlink(lock) == "/dev/zero"  # left where it was


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("planted", ["link to a FIFO outside the cache", "FIFO as the lock"])
def test_runs_does_not_hang_on_a_lock_that_is_a_fifo(tmp_path, planted):
    """From the review: opening a lock that is (or links to) a FIFO waits for a writer that
    never comes, so ``runs`` hung. It is neither followed nor read: the run is incomplete, no
    writer is named, and ``run_lock`` refuses it by name at once."""
    run = _incomplete_run(tmp_path / "cache")
    lock = cache.lock_path(run)
    if planted.startswith("link"):
        fifo = tmp_path / "outside" / "pipe"
        fifo.parent.mkdir()
        os.mkfifo(fifo)
        lock.symlink_to(fifo)
        what = f"a symbolic link (to {fifo})"
    else:
        fifo = lock
        os.mkfifo(fifo)
        what = "a FIFO (named pipe)"

    def unblock():  # a writer lets a reader blocked in open() go on
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    finished, result = _in_a_thread(lambda: _main("runs", "--cache", str(tmp_path / "cache")),
                                    20, unblock)
    assert finished, "`runs` hung on a lock that is a FIFO"
    code, out, err = result
    assert code == 0 and _status_of(out) == "incomplete", out + err

    def lock_it():
        with run_lock(run, wait_seconds=0):
            return "taken"

    finished, result = _in_a_thread(lambda: lock_it(), 20, unblock)
    assert finished, "run_lock hung on a lock that is a FIFO"
    assert isinstance(result, RunLockedError), result
    assert what in str(result) and f"delete {lock}" in str(result)
    assert cache.live_writer(run) is None and cache._held(lock) is None
    assert os.path.lexists(lock)  # not deleted: the user decides


_SLEEPER = "import time; print('up', flush=True); time.sleep(120)"


def test_a_lock_linked_to_a_big_file_outside_the_cache_is_never_read(tmp_path):
    """A lock that is a symbolic link to a big file outside the cache, which begins with the pid
    of a live process (the planted answer): following it made ``runs`` report that process as
    the run's writer ("being written (pid N)") after reading the whole file, and made
    ``run_lock`` wait for it. The link is not a lock: the run is incomplete and ``run_lock``
    refuses it by name; the file outside is left as it was."""
    run = _incomplete_run(tmp_path / "cache")
    lock = cache.lock_path(run)
    sleeper = subprocess.Popen([sys.executable, "-c", _SLEEPER], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert sleeper.stdout.readline().strip() == "up"
        outside = tmp_path / "outside" / "big.log"
        outside.parent.mkdir()
        with outside.open("w") as file:  # written after the process started: "its" lock
            file.write(f"{sleeper.pid}\n")
            file.write(" " * (32 * 2**20))  # 32 MiB: whitespace the old reader stripped
        before = outside.stat()
        lock.symlink_to(outside)
        code, out, err = _main("runs", "--cache", str(tmp_path / "cache"))
        assert code == 0 and _status_of(out) == "incomplete", out + err
        assert f"pid {sleeper.pid}" not in out
        assert cache.live_writer(run) is None
        assert cache._lock_state(lock) is None and cache._held(lock) is None
        with pytest.raises(RunLockedError) as refused, run_lock(run, wait_seconds=0):
            pass
        message = str(refused.value)
        assert f"a symbolic link (to {outside})" in message and f"delete {lock}" in message
        assert f"pid {sleeper.pid}" not in message
        assert lock.is_symlink() and outside.stat().st_size == before.st_size
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dangling_symlink_lock_is_refused_not_spun_on(tmp_path):
    """A lock that is a symbolic link to nothing: creating the lock failed (the name is taken)
    while the old check 'gone meanwhile?' followed the link (not there), so ``run_lock`` retried
    forever. It is refused at once, naming the link; ``runs`` lists the run as incomplete."""
    run = _incomplete_run(tmp_path)
    lock = cache.lock_path(run)
    lock.symlink_to(tmp_path / "nowhere" / "lock")

    def lock_it():
        with run_lock(run, wait_seconds=0):
            return "taken"

    finished, result = _in_a_thread(lock_it, 20, lambda: lock.unlink())
    assert finished, "run_lock spun on a dangling symbolic link"
    assert isinstance(result, RunLockedError), result
    assert "a symbolic link (to " in str(result) and f"delete {lock}" in str(result)
    assert lock.is_symlink() and not (tmp_path / "nowhere").exists()  # nothing made through it
    code, out, err = _main("runs", "--cache", str(tmp_path))
    assert code == 0 and _status_of(out) == "incomplete", out + err


def test_a_regular_lock_is_read_only_a_few_bytes(tmp_path, monkeypatch):
    """A regular lock file is read at most a pid's worth: one that holds a pid followed by a
    megabyte is not a lock this program wrote (no pid), and is never read whole."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{os.getpid()}" + " " * 2**20)
    real_read, asked = os.read, []

    def read(fd, n):
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    state = cache._lock_state(lock)
    monkeypatch.undo()
    assert state is not None and state[0] is None
    assert asked and max(asked) <= 4096


# --------------------------------------------------------------------------- hf: image paths


def _png_bytes(path: Path, size: tuple[int, int] = (7, 5)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 40)).save(path)
    return path.read_bytes()


def _write_hf_parquet(folder: Path, paths: list[str]) -> None:
    """``folder/train.parquet``: a Hugging Face image column whose cells name files by path only
    ({"bytes": None, "path": ...}, the Image feature's own layout), and a caption per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": None, "path": p} for p in paths], type=image),
            "text": [f"caption {i}" for i in range(len(paths))],
        }
    )
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "train.parquet")


def _cached_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every data set and cache, which no loader may copy."""
    path = tmp_path / "outside_secret.txt"
    path.write_text("the secret: do not copy me")
    return path


def _assert_not_copied(cache_dir: Path, secret: Path) -> None:
    leaked = [p for p in _cached_files(cache_dir) if p.read_bytes() == secret.read_bytes()]
    assert leaked == [], f"{secret} was copied into the cache: {leaked}"


@pytest.mark.parametrize("how", ["absolute", "relative ../", "symbolic link inside"])
def test_hf_image_cell_naming_a_file_outside_the_folder_is_refused(
    tmp_path, monkeypatch, hub_offline, secret, how
):
    """From the review: a parquet whose image cell was {"bytes": None, "path":
    "/tmp/outside_secret.txt"} had that file copied into <cache>/datasets/.../images/. A path
    naming a file outside the data set's folder (absolute, '../', or a symbolic link inside the
    folder leading out) is refused with an error naming the row, the path and the fix, and
    nothing of it is copied. (The working directory is the data set's folder, where the old
    loader found '../' and the link.)"""
    folder = tmp_path / "hf-data"
    _png_bytes(folder / "img" / "ok.png")
    if how == "absolute":
        bad = str(secret)
    elif how == "relative ../":
        bad = "../outside_secret.txt"
    else:
        (folder / "img" / "pretty.png").symlink_to(secret)
        bad = "img/pretty.png"
    _write_hf_parquet(folder, ["img/ok.png", bad])
    monkeypatch.chdir(folder)
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError) as refused:
        load_hf(str(folder), cache_dir=cache_dir)
    message = str(refused.value)
    assert "row 1" in message and repr(bad) in message, message
    assert f"outside the dataset folder {folder}" in message, message
    assert "relative to that folder" in message  # the fix
    if how == "symbolic link inside":
        assert "symbolic link" in message
    _assert_not_copied(cache_dir, secret)
    assert secret.read_text() == "the secret: do not copy me"


def test_hf_image_cells_relative_to_the_dataset_folder_are_read(tmp_path, monkeypatch, hub_offline):
    """The legitimate case: image cells naming files by paths relative to the data set's folder
    (also through a symbolic link that stays inside it, and as an absolute path inside it) are
    read from that folder, whatever the working directory (the old loader read them relative
    to the working directory, and refused them elsewhere as 'not an image')."""
    folder = tmp_path / "hf-data"
    first = _png_bytes(folder / "img" / "a.png", (7, 5))
    second = _png_bytes(folder / "img" / "sub" / "b.png", (9, 4))
    (folder / "linked").symlink_to(folder / "img" / "sub")  # a link that stays inside
    _write_hf_parquet(folder, ["img/a.png", "linked/b.png", str(folder / "img" / "a.png")])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds = load_hf(str(folder), cache_dir=tmp_path / "cache")
    assert ds.stimuli["captions"].tolist() == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert [ds.image_path(i).read_bytes() for i in range(3)] == [first, second, first]
    assert all(ds.image_path(i).suffix == ".png" for i in range(3))


def test_hf_hub_image_cells_are_read_only_from_the_hub_caches(tmp_path, secret):
    """A hub data set (no local folder) names its downloaded files by absolute paths inside the
    Hugging Face caches: those are read; any other path (a planted absolute path, or one
    relative to the working directory) is refused naming the row and the path."""
    hub_cache = tmp_path / "hf-cache"
    inside = _png_bytes(hub_cache / "downloads" / "x.png")
    data, suffix = _hf_image_bytes(
        {"bytes": None, "path": str(hub_cache / "downloads" / "x.png")},
        row=3, dataset="someone/set", folder=None, caches=[hub_cache],
    )
    assert data == inside and suffix == ".png"
    for bad in (str(secret), "downloads/x.png"):
        with pytest.raises(ValueError, match="row 4 of the Hugging Face dataset 'someone/set'"):
            _hf_image_bytes({"bytes": None, "path": bad}, row=4, dataset="someone/set",
                            folder=None, caches=[hub_cache])
