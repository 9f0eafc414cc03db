"""cache.py: atomic writes leave no half files, readers never unpickle."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from convergence_core import cache
from convergence_core.cache import (
    CacheFormatError,
    PickleRefusedError,
    RunLockedError,
    atomic_path,
    clean_temp_files,
    model_key,
    read_json,
    read_npy,
    read_parquet,
    run_lock,
    write_bytes,
    write_json,
    write_npy,
    write_parquet,
)


def _no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_npy_round_trip_and_mmap_is_read_only(tmp_path):
    array = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    path = write_npy(tmp_path / "sub" / "x.npy", array)
    assert path == tmp_path / "sub" / "x.npy"
    np.testing.assert_array_equal(read_npy(path), array)
    mapped = read_npy(path, mmap=True)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, array)
    with pytest.raises(ValueError):
        mapped[0, 0] = 1.0
    assert _no_temp_files(tmp_path)


def test_npy_name_is_kept_exactly(tmp_path):
    # np.save appends ".npy" to names without it; the atomic writer must not.
    write_npy(tmp_path / "grams", np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grams"]


@pytest.mark.parametrize("mmap", [False, True])
def test_object_npy_is_refused_not_unpickled(tmp_path, mmap):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"payload": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(PickleRefusedError, match="unpickling") as info:
        read_npy(path, mmap=mmap)
    assert "rerun" in str(info.value)  # names the fix
    assert isinstance(info.value, ValueError)


def test_object_arrays_are_never_written(tmp_path):
    with pytest.raises(ValueError, match="pickle"):
        write_npy(tmp_path / "o.npy", np.array(["a", 1], dtype=object))
    assert not list(tmp_path.iterdir())


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.npy"
    write_npy(path, np.arange(3.0))
    with pytest.raises(RuntimeError, match="disk died"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("disk died")
    np.testing.assert_array_equal(read_npy(path), np.arange(3.0))
    assert _no_temp_files(tmp_path)


def test_failure_inside_numpy_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.npy"
    write_npy(path, np.arange(3.0))

    def broken_save(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="no space"):
        write_npy(path, np.arange(10.0))
    monkeypatch.undo()
    np.testing.assert_array_equal(read_npy(path), np.arange(3.0))
    assert _no_temp_files(tmp_path)


def test_writer_replaces_existing_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "b": [1.5, "é"]})
    assert read_json(path) == {"a": 2, "b": [1.5, "é"]}
    assert json.loads(path.read_text(encoding="utf-8"))["b"][1] == "é"


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"x": float("nan")})
    assert _no_temp_files(tmp_path)


def test_parquet_round_trip_keeps_caption_lists(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "captions": [["x", "y"], []], "v": [1.0, 2.0]})
    write_parquet(tmp_path / "t.parquet", frame)
    back = read_parquet(tmp_path / "t.parquet")
    assert back["id"].tolist() == ["a", "b"]
    assert [list(c) for c in back["captions"]] == [["x", "y"], []]


def test_missing_and_corrupt_files_raise_with_fix(tmp_path):
    with pytest.raises(CacheFormatError, match="precompute"):
        read_npy(tmp_path / "absent.npy")
    with pytest.raises(CacheFormatError, match="precompute"):
        read_json(tmp_path / "absent.json")
    with pytest.raises(CacheFormatError, match="precompute"):
        read_parquet(tmp_path / "absent.parquet")
    write_bytes(tmp_path / "bad.npy", b"not numpy at all")
    with pytest.raises(CacheFormatError, match="not a .npy file"):
        read_npy(tmp_path / "bad.npy")
    write_bytes(tmp_path / "bad.json", b"{oops")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_clean_temp_files_removes_only_temp_files(tmp_path):
    (tmp_path / "keep.npy").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f"x.npy.tmp-{os.getpid()}").write_bytes(b"x")
    # a file another live process is writing (the dashboard's UMAP, say) is left to it
    (tmp_path / f"umap.npy.tmp-{os.getppid()}").write_bytes(b"x")
    # names that only contain ".tmp-" are a user's, not ours; a linked folder is not entered
    (tmp_path / "notes.tmp-final.docx").write_bytes(b"x")
    (tmp_path / "notes.tmp-").write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "y.npy.tmp-7").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(outside)
    assert clean_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d", "keep.npy", "linked", "notes.tmp-", "notes.tmp-final.docx",
        f"umap.npy.tmp-{os.getppid()}",
    ]
    assert not any((tmp_path / "d").iterdir()) and (outside / "y.npy.tmp-7").is_file()


def test_a_link_planted_at_a_temp_name_is_never_written_through(tmp_path, monkeypatch):
    """From the audit: the temp name was ``<file>.tmp-<pid>``, opened following links, so a link
    planted there in a shared run made a write overwrite a file outside the run."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    noise = iter([b"\0" * 6, b"\1" * 6])  # the first random name is planted too
    monkeypatch.setattr(os, "urandom", lambda size: next(noise))
    for name in (f"x.npy.tmp-{os.getpid()}", f"x.npy.tmp-{os.getpid()}-{'00' * 6}"):
        (run / name).symlink_to(victim)
    write_npy(run / "x.npy", np.arange(3.0))
    monkeypatch.undo()
    assert victim.read_text() == "precious"
    np.testing.assert_array_equal(read_npy(run / "x.npy"), np.arange(3.0))
    assert not (run / "x.npy").is_symlink()
    assert clean_temp_files(run) == 0 and len(list(run.iterdir())) == 3  # links are left alone


def test_two_threads_writing_one_file_never_share_a_temp_file(tmp_path):
    """From the audit: two threads (Streamlit sessions) shared ``<file>.tmp-<pid>``: one renamed
    the other's half-written file into place, and the other's rename failed."""
    target = tmp_path / "x.bin"
    both_writing = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(byte: bytes) -> None:
        try:
            with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                handle.write(byte * 100_000)
                handle.flush()
                both_writing.wait(timeout=10)
                handle.write(byte * 100_000)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(byte,)) for byte in (b"a", b"b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert target.read_bytes() in (b"a" * 200_000, b"b" * 200_000)
    assert _no_temp_files(tmp_path)


def test_a_temp_file_of_a_dead_writer_is_cleaned_whatever_its_name_version(tmp_path):
    (tmp_path / "old.npy.tmp-99999999").write_bytes(b"x")  # as older versions named them
    (tmp_path / f"new.npy.tmp-99999999-{'ab' * 6}").write_bytes(b"x")
    (tmp_path / f"live.npy.tmp-{os.getppid()}-{'ab' * 6}").write_bytes(b"x")
    assert clean_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [f"live.npy.tmp-{os.getppid()}-{'ab' * 6}"]


@pytest.mark.parametrize("pid", [2**31, 2**63, 10**20])
def test_a_pid_too_large_for_the_system_is_not_alive(tmp_path, pid):
    """From the audit: such a pid in a lock or temp name raised OverflowError out of run_lock,
    live_writer, clean_temp_files and `runs`."""
    assert not cache._pid_alive(pid)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    lock = cache.lock_path(run)
    lock.write_text(str(pid))
    assert cache.live_writer(run) is None
    with run_lock(run):
        assert lock.read_text() == str(os.getpid())
    (run / f"x.npy.tmp-{pid}").write_bytes(b"x")
    assert clean_temp_files(run) == 1


def test_deeply_nested_json_is_a_format_error(tmp_path):
    """From the audit: a manifest of nested brackets raised RecursionError out of list_runs."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CacheFormatError, match="not valid JSON.*delete it and rerun"):
        read_json(path)


def test_a_npy_header_claiming_more_than_the_file_holds_is_refused(tmp_path):
    """From the audit: without mmap, numpy first allocated what the header claims (MemoryError)."""
    path = tmp_path / "huge.npy"
    np.save(path, np.zeros((4, 3)))
    raw = path.read_bytes()
    end = 10 + int.from_bytes(raw[8:10], "little")  # the header, padded with spaces to a newline
    header = raw[10:end].replace(b"(4, 3)", b"(10000000000000, 3)").replace(b" " * 13, b"", 1)
    assert len(header) == end - 10
    path.write_bytes(raw[:10] + header + raw[end:])
    for mmap in (False, True):
        with pytest.raises(CacheFormatError, match="huge.npy.*; rerun .* precompute"):
            read_npy(path, mmap=mmap)
    path.write_bytes(raw[:-8])  # cut short by one number
    with pytest.raises(CacheFormatError, match="claims a \\(4, 3\\) float64 array of 224 bytes"):
        read_npy(path)


@pytest.mark.parametrize(
    "name",
    ["efficientnet-lite0", "blocks.10", "org/model", "a b", "../x", ".hidden", "ü", "a/b", "a_b"],
)
def test_model_key_is_safe(name):
    key = model_key(name)
    assert key and "/" not in key and not key.startswith(".")
    assert all(c.isalnum() or c in "._-" for c in key) and key.isascii()


def test_model_key_keeps_safe_names_and_separates_unsafe_ones():
    assert model_key("efficientnet-lite0") == "efficientnet-lite0"
    assert model_key("blocks.10") == "blocks.10"
    names = ["a/b", "a_b", "a b", "a:b", "a//b"]
    assert len({model_key(n) for n in names}) == len(names)
    with pytest.raises(ValueError, match="non-empty"):
        model_key("")


def test_raw_pickle_file_is_refused(tmp_path):
    import pickle

    path = tmp_path / "x.npy"
    path.write_bytes(pickle.dumps({"a": np.arange(3)}))
    with pytest.raises(PickleRefusedError, match="pickle"):
        read_npy(path)


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_model_key_is_injective_and_safe_for_any_names(a, b):
    key_a, key_b = model_key(a), model_key(b)
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in key_a)
    assert not key_a.startswith(".")
    if a != b:
        assert key_a != key_b


@pytest.mark.skipif(cache._process_started(os.getpid()) is None, reason="needs Linux's /proc")
def test_a_lock_whose_pid_was_reused_is_taken_over(tmp_path):
    """A live process whose pid a lock names, but which started after the lock was written (the
    pid reused after the writer died, or after a restart), holds nothing."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    lock.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = cache._process_started(sleeper.pid)
        assert started is not None and abs(started - time.time()) < 5
        lock.write_text(str(sleeper.pid))  # written after it started: it may hold it
        assert cache.live_writer(run) == sleeper.pid
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"), run_lock(run):
            pass
        written = started - cache._LOCK_START_MARGIN_SECONDS - 60  # a minute before it started
        os.utime(lock, (written, written))
        assert cache.live_writer(run) is None
        with run_lock(run):
            assert lock.read_text() == str(os.getpid())
        assert not lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


_HOLDER = """
import sys, time
from convergence_core.cache import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(cache.fcntl is None, reason="needs fcntl")
def test_a_lock_a_live_precompute_holds_is_never_stale(tmp_path):
    """A writer of this version holds its lock with flock, which the system releases when it
    ends: it stays held whatever its file's time says (a clock stepped forward after a VM slept
    made a live writer's lock look older than the writer) and whatever its pid (containers
    sharing a cache often run their precompute as the same pid)."""
    run = tmp_path / "runs" / "alpha"
    run.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = cache.lock_path(run)
        started = cache._process_started(holder.pid) or time.time()
        long_before = started - 3600
        os.utime(lock, (long_before, long_before))  # as after a forward step of the clock
        assert cache.live_writer(run) == holder.pid
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"), run_lock(run):
            pass
        # another process that judged an older lock of the same pid stale (two containers
        # restarted at once) removes that one only, never this live one
        cache._remove_stale_lock(lock, (holder.pid, long_before))
        assert lock.exists() and cache._held(lock) and cache.live_writer(run) == holder.pid
        lock.write_text(str(os.getpid()))  # its pid as ours (one pid in two containers)
        assert cache.live_writer(run) == os.getpid()  # held all the same
    finally:
        holder.kill()
        holder.wait()
    assert cache.live_writer(run) is None  # its process ended: the system let go of the lock


_FORKS = """
import os, sys, time
from convergence_core.cache import lock_path, run_lock
run, crash = sys.argv[1], sys.argv[2] == "crash"
with run_lock(run):
    child = os.fork()
    if child and crash:  # the writer dies while its child lives on
        print(child, flush=True)
        os._exit(0)
    if child:
        os.waitpid(child, 0)
        print("after the child:", lock_path(run).exists(), flush=True)
    elif crash:  # (its output elsewhere: the test reads the writer's to its end)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(1, 2)
        time.sleep(30)
if child == 0:
    os._exit(0)  # the child has left the lock's context: it must not have deleted it
print("after the writer:", lock_path(run).exists(), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork") or cache.fcntl is None, reason="needs fork, fcntl")
def test_a_forked_child_neither_deletes_nor_keeps_its_parents_lock(tmp_path):
    """A child forked while the lock is held shares its file: leaving the lock's context there
    deleted the parent's live lock, and a child that outlived a crashed writer kept the lock
    held (naming the dead writer) until it ended."""
    run = tmp_path / "runs" / "alpha"
    run.parent.mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _FORKS, str(run), "leave"], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["after the child: True", "after the writer: False"]
    crashed = subprocess.run([sys.executable, "-c", _FORKS, str(run), "crash"], cwd=repo,
                             capture_output=True, text=True, timeout=60)
    child = int(crashed.stdout.split()[0])
    try:
        assert cache.lock_path(run).exists() and cache._held(cache.lock_path(run)) is False
        assert cache.live_writer(run) is None  # the writer is gone; its child holds nothing
        with run_lock(run):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)


def test_leaving_a_lock_deletes_it_only_if_it_is_still_this_one(tmp_path):
    """A lock taken over meanwhile (replaced by another writer's) is that writer's: leaving the
    first one's context must not delete it."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    with run_lock(run):
        lock.unlink()
        lock.write_text("12345")  # another writer's lock now
    assert lock.read_text() == "12345"
    lock.unlink()
    with run_lock(run):
        pass
    assert not lock.exists()


def test_a_lock_naming_this_process_that_it_does_not_hold_is_taken_over(tmp_path):
    """A killed run's lock, whose pid the next run got again (a container restarted): the next
    run takes it over at once, where it waited an hour for itself, and it does not show as being
    written; a lock this process holds stays held."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))
    assert cache.live_writer(run) is None
    with run_lock(run, wait_seconds=0):
        assert lock.read_text() == str(os.getpid()) and cache.live_writer(run) == os.getpid()
        with pytest.raises(RunLockedError), run_lock(run, wait_seconds=0):
            pass  # held by this process now: not taken over
    assert not lock.exists()


def test_an_empty_lock_nobody_holds_is_taken_over_once_it_is_old(tmp_path):
    """A writer that ended between creating its lock and writing its pid left an empty file,
    which blocked every later precompute of the run (naming pid None)."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    with run_lock(run, wait_seconds=0):
        assert lock.read_text() == str(os.getpid())


@pytest.mark.parametrize("text", ["", "0", "-5", "²", "12 34", "abc"])
def test_a_lock_without_a_pid_is_being_written(tmp_path, text):
    """Empty (its writer is writing the pid) or not a positive pid: no live writer is named and
    nothing fails (a superscript two passed isdigit and then failed int)."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    lock.parent.mkdir(parents=True)
    lock.write_text(text)
    assert cache.live_writer(run) is None
    with pytest.raises(RunLockedError, match="pid None"), run_lock(run, wait_seconds=0):
        pass


def test_a_stale_lock_replaced_meanwhile_is_not_removed(tmp_path):
    """Two processes judged the same old lock stale; one removed it and wrote its own, naming the
    same pid (two containers restarted at once), and has not yet taken its flock: the other
    must leave that new lock alone (it compared the pid only, or only 'still empty')."""
    run = tmp_path / "runs" / "alpha"
    lock = cache.lock_path(run)
    lock.parent.mkdir(parents=True)
    for old_text in ("7", ""):
        lock.write_text(old_text)
        an_hour_ago = time.time() - 3600
        os.utime(lock, (an_hour_ago, an_hour_ago))
        judged = cache._lock_state(lock)
        lock.unlink()
        lock.write_text(old_text)  # the other's fresh lock: same text, written now
        cache._remove_stale_lock(lock, judged)
        assert lock.exists() and lock.read_text() == old_text
        cache._remove_stale_lock(lock, cache._lock_state(lock))  # judged as it is: removed
        assert not lock.exists()


def test_a_temp_file_swapped_for_a_link_mid_write_is_not_written_through(tmp_path, monkeypatch):
    """A writer that reopened its temp file by name could be made to write through a link that
    replaced the temp after its creation (a run others can write to; from the review): the
    package's writers write through the descriptor that created the file."""
    from convergence_core import cache

    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    made = cache._new_temp_file

    def swapped(target):
        tmp, fd = made(target)
        tmp.unlink()
        tmp.symlink_to(outside)  # the name now leads out of the run
        return tmp, fd

    monkeypatch.setattr(cache, "_new_temp_file", swapped)
    run = tmp_path / "run"
    for name, write in (("a.bin", lambda: write_bytes(run / "a.bin", b"PWNED")),
                        ("a.npy", lambda: write_npy(run / "a.npy", np.arange(3))),
                        ("a.parquet",
                         lambda: cache.write_parquet(run / "a.parquet", pd.DataFrame({"x": [1]})))):
        with pytest.raises(CacheFormatError, match="was replaced while"):
            write()
        assert outside.read_text() == "mine"
        # nor is the link renamed onto the file (its readers would find a path out of the run)
        assert not (run / name).exists() and not (run / name).is_symlink()
        assert sorted(p.name for p in run.iterdir()) == []  # no temp file (or link) left


def test_a_temp_file_naming_pid_0_is_cleaned(tmp_path):
    """os.kill(0, 0) signals our own process group and succeeds: pid 0 was taken for a live
    writer, and a temp file naming it was never cleaned (from the review)."""
    assert not cache._pid_alive(0) and not cache._pid_alive(-5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "x.npy.tmp-0").write_bytes(b"x")
    assert clean_temp_files(run) == 1
