"""Safe cache I/O: atomic writes, pickle-free readers and the on-disk layout of one run.

Every writer here first writes a new ``<name>.tmp-<pid>-<random>`` next to the target and then
``os.replace``s it, so a reader (or a resumed precompute) never sees half a file: a crash mid-write
leaves the previous version of the file (or no file) plus, at worst, a stray temporary file that
:func:`clean_temp_files` deletes. Readers never unpickle: ``.npy`` files are read with
``allow_pickle=False`` and a file that would need pickle raises :class:`PickleRefusedError`.

:class:`RunLayout` is the single place that knows where each file of a run lives (see
docs/ARCHITECTURE.md, "Cache layout"); ``precompute.py`` writes through it and ``run.py`` reads
through it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

try:  # Unix: a lock the system releases when its process ends
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid rules alone
    fcntl = None  # type: ignore[assignment]

import numpy as np
import pandas as pd

__all__ = [
    "CacheFormatError",
    "PickleRefusedError",
    "RunLayout",
    "RunLockedError",
    "atomic_file",
    "atomic_path",
    "check_key",
    "clean_temp_files",
    "colliding_keys",
    "model_key",
    "read_json",
    "read_error_text",
    "read_npy",
    "read_parquet",
    "run_lock",
    "write_bytes",
    "write_json",
    "write_npy",
    "write_parquet",
]

_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_PROTOCOL_OPCODE = b"\x80"
#: Marks temporary files: ``<final name>.tmp-<pid>-<random>``.
TEMP_MARKER = ".tmp-"


class CacheFormatError(ValueError):
    """A cached file is missing, unreadable or not in the expected format."""


class PickleRefusedError(CacheFormatError):
    """A cached ``.npy`` holds Python objects, which could only be read by unpickling it."""


def read_error_text(exc: OSError, path: str | os.PathLike[str], what: str) -> str:
    """The one-line error for ``exc``, met while reading the file ``path`` (``what`` names it:
    "feature file", "table", "cached array"), with the fix: permission denied (make it
    readable), a folder where a file is needed, a disk error (EIO: copy the file again, check
    the disk), else the system's words. A storage fault, not a bug: never a traceback."""
    if isinstance(exc, FileNotFoundError):
        return f"{what} {path} is missing; check the path"
    if isinstance(exc, IsADirectoryError):
        return f"{what} {path} is a folder, not a file; give the path of the file itself"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot read {what} {path}: permission denied; make it readable by this user "
            f"(e.g. chmod u+r '{path}'), then rerun"
        )
    if exc.errno == errno.EIO:
        return (
            f"cannot read {what} {path}: the disk reported an input/output error (EIO), so the "
            "file or the disk holding it is damaged (on a network drive: the connection); copy "
            "the file again from a good copy (or recreate it) and check the disk, then rerun"
        )
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot read {what} {path} ({cause}); check the file and its disk, then rerun"


class RunLockedError(ValueError):
    """Another live process is writing the same run folder (or the run's lock path holds
    something no run lock is: a symbolic link, a folder, a FIFO)."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill would signal a process group (0: our own), not a process
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # no such pid (or no pid at all)
        return False
    except PermissionError:
        return True
    return True


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (Linux's /proc: the boot time,
    whole seconds, plus the process's start in clock ticks since boot), or None where that cannot
    be read (no such process, or a system without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            line for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        fields = stat.rsplit(")", 1)[-1].split()  # the name in parentheses may hold spaces
        return int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # proc(5) 22
    except (OSError, StopIteration, IndexError, ValueError):
        return None


#: A process that started this long after a lock was written did not write it (its pid was
#: reused); the margin covers the boot time's whole seconds and the clock ticks
_LOCK_START_MARGIN_SECONDS = 2.0


#: A lock holds one pid: what is read of a lock file at most (a longer file holds no pid)
_LOCK_BYTES = 64

#: Opening a lock never follows a symbolic link (a lock planted as a link to /dev/zero, a huge
#: file or a FIFO outside the cache) nor waits on a FIFO
_LOCK_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
)


def _not_a_lock(lock: Path) -> str | None:
    """What sits at ``lock`` if it is something :func:`run_lock` never writes (a symbolic link,
    even to a lock, a folder, a FIFO, a device), in words; None for a regular file or nothing."""
    try:
        mode = os.lstat(lock).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(lock)
        except OSError:
            target = "?"
        return f"a symbolic link (to {target})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def _open_lock(lock: Path) -> int | None:
    """A read-only descriptor of the lock file ``lock``, opened without following a symbolic link
    or blocking; None where there is none, or what is there is no regular file (never ours)."""
    try:
        fd = os.open(lock, _LOCK_OPEN_FLAGS)
    except OSError:  # gone, unreadable, or a symbolic link (ELOOP)
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _lock_state(lock: Path) -> tuple[int | None, float] | None:
    """``(pid, mtime)`` of ``lock``: the pid written in it (None while it is empty, being
    written, or holds no pid) and when it was written; None when there is no such file, or no
    regular file (a symbolic link is never followed, and at most :data:`_LOCK_BYTES` are read:
    :func:`_not_a_lock` tells what it is)."""
    fd = _open_lock(lock)
    if fd is None:
        return None
    try:
        data = os.read(fd, _LOCK_BYTES + 1)
        written = os.fstat(fd).st_mtime
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii").strip() if len(data) <= _LOCK_BYTES else ""
    except UnicodeDecodeError:
        text = ""
    return (int(text) if text.isdecimal() and int(text) > 0 else None), written


def _lock_holder(lock: Path) -> tuple[int, float] | None:
    """The pid written in ``lock`` and when the lock was written (its mtime), or None while it is
    empty (being written) or unreadable."""
    state = _lock_state(lock)
    return None if state is None or state[0] is None else (state[0], state[1])


def _held(lock: Path) -> bool | None:
    """Whether a live process holds ``lock`` with :func:`run_lock` (an exclusive ``flock`` on the
    file, which the system releases when that process ends, whatever its pid or clock); None
    where that cannot be asked (no ``fcntl``, the file gone or unreadable)."""
    if fcntl is None:
        return None
    fd = _open_lock(lock)  # (never through a symbolic link, nor on a FIFO)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


#: The run locks this process holds now: lock fd -> (device, inode) of its file
_HELD: dict[int, tuple[int, int]] = {}

#: An empty lock nobody holds, older than this, is a writer's that ended before writing its pid
_EMPTY_LOCK_SECONDS = 10.0


def _forget_held_locks_in_a_child() -> None:
    """After a fork the child shares its parent's lock files (and flocks): it closes its copies,
    which leaves the parent's locks held, and must not delete them when it unwinds."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_locks_in_a_child)


def _holds(lock: Path) -> bool:
    """Whether this process holds ``lock`` (by its file, so a replaced lock is not ours)."""
    try:
        status = os.lstat(lock)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) in _HELD.values()


def _stale(lock: Path, holder: tuple[int, float] | None) -> bool:
    """Whether the process a lock names no longer holds it. A lock this version holds is held
    (:func:`_held`) and never stale. One nobody holds so is a dead writer's, or an older
    version's that still runs; it is stale when its pid has exited, names this process (which
    does not hold it), or names a process that started after the lock was written (the pid
    reused after the writer died, e.g. a restarted container, where the next precompute often
    gets the same pid); an empty one (``holder`` None) when it is older than a few seconds. A
    lock holds only a pid, so that every version of this program reads every other's."""
    if _holds(lock):  # (asked first: on NFS, asking _held from the holder drops its lock)
        return False
    held = _held(lock)
    if held:
        return False
    if holder is None:  # a writer that ended between creating the file and writing its pid
        try:
            age = time.time() - os.lstat(lock).st_mtime
        except OSError:
            return False
        return held is False and age > _EMPTY_LOCK_SECONDS
    pid, written = holder
    if not _pid_alive(pid) or pid == os.getpid():
        return True
    started = _process_started(pid)
    return started is not None and started > written + _LOCK_START_MARGIN_SECONDS


def _remove_stale_lock(lock: Path, stale: tuple[int | None, float]) -> None:
    """Delete ``lock`` if it is still the stale one, ``stale`` = (pid, mtime) as judged: never a
    lock another process took meanwhile, even one naming the same pid (two containers restarted
    at once, each judging the same old lock stale). With flock: holding the file exclusively
    (so no writer holds it) and checking that the path still names it; else by moving it aside,
    which a third process's new lock can race."""
    if fcntl is not None:
        fd = _open_lock(lock)  # (never through a symbolic link, nor on a FIFO)
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return  # held: a writer's, not stale
        except OSError:
            os.close(fd)  # no locks on this file system: moved aside below
        else:
            try:
                mine, now = os.fstat(fd), os.lstat(lock)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino) and (
                    _lock_state(lock) == stale
                ):
                    lock.unlink()
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
            return
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if _lock_state(aside) == stale and not _held(aside):
        aside.unlink()
    else:  # someone replaced the stale lock in between: give theirs back (a link as a link,
        # never a hard link to what it leads to, which may lie outside the cache)
        with contextlib.suppress(FileExistsError):
            if os.link in os.supports_follow_symlinks:
                os.link(aside, lock, follow_symlinks=False)
            elif not os.path.islink(aside):
                os.link(aside, lock)
        aside.unlink()


def lock_path(run_folder: str | os.PathLike[str]) -> Path:
    """The lock file of a run being written: ``.<run>.lock`` beside its folder."""
    folder = Path(run_folder)
    return folder.with_name(f".{folder.name}.lock")


def live_writer(run_folder: str | os.PathLike[str]) -> int | None:
    """The process id of a live precompute writing the run now (it holds the run's lock), else
    None (no lock, or a stale one: see :func:`_stale`; or something no precompute writes, such
    as a symbolic link, which is never followed nor read: :func:`run_lock` names it)."""
    lock = lock_path(run_folder)
    holder = _lock_holder(lock)
    return holder[0] if holder is not None and not _stale(lock, holder) else None


@contextlib.contextmanager
def run_lock(
    run_folder: str | os.PathLike[str],
    *,
    wait_seconds: float = 0.0,
    poll_seconds: float = 0.5,
    on_wait: Callable[[int | None], None] | None = None,
) -> Iterator[Path]:
    """Hold the lock file ``.<run>.lock`` next to ``run_folder`` while writing the run.

    The file holds our pid, and we hold it with an exclusive ``flock`` (released by the system
    if this process dies). A stale lock (:func:`_stale`: nobody holds it, and its process
    exited or its pid now names another process) is taken over. While another live process
    holds it, wait up to ``wait_seconds`` (calling ``on_wait(holder_pid)`` once), then raise
    :class:`RunLockedError`. So does a lock path that holds what no run lock is (a symbolic link,
    a folder, a FIFO): it is neither followed, read nor deleted, and the error names it.
    """
    folder = Path(run_folder)
    lock = lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, wait_seconds)
    told = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            foreign = _not_a_lock(lock)
            if foreign is not None:
                raise RunLockedError(
                    f"the lock path {lock} of run {folder} is {foreign}, not a lock file a "
                    "precompute writes (a regular file holding its pid); it was not followed, "
                    f"read or deleted: delete {lock} yourself (if no precompute of this run is "
                    "running) and rerun"
                ) from None
            state = _lock_state(lock)
            if state is None and not os.path.lexists(lock):  # gone meanwhile
                continue
            holder = None if state is None or state[0] is None else (state[0], state[1])
            if state is not None and _stale(lock, holder):
                _remove_stale_lock(lock, state)
                continue
            pid = None if state is None else state[0]
            if time.monotonic() >= deadline:
                raise RunLockedError(
                    f"another precompute (pid {pid}) is writing {folder}; wait for it to "
                    f"finish, or delete {lock} if that process is not a precompute"
                ) from None
            if on_wait is not None and not told:
                on_wait(pid)
                told = True
            time.sleep(poll_seconds)
            continue
        status = os.fstat(fd)
        _HELD[fd] = (status.st_dev, status.st_ino)
        try:  # the pid first: until the flock is held, the pid rules say this lock is live
            os.write(fd, str(os.getpid()).encode())
            _flock(fd)
        except BaseException:
            _release(lock, fd)
            raise
        break
    try:
        yield lock
    finally:
        _release(lock, fd)


def _flock(fd: int) -> None:
    """Hold ``fd``'s file with an exclusive flock until this process ends (what others ask,
    :func:`_held`). The file is new, so only a reader's brief shared lock can stand in the way:
    a few tries. Where the file system keeps no locks (an NFS mount without them), the lock's
    pid alone tells."""
    if fcntl is None:
        return
    for _ in range(50):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
        except OSError:  # ENOLCK and the like: no locks here
            return


def _release(lock: Path, fd: int) -> None:
    """Delete ``lock`` if it is still the file ``fd`` holds (never a lock another process took
    over meanwhile), then close ``fd``, which releases the ``flock``. Nothing in a forked child,
    whose copies were closed at the fork (the lock is its parent's)."""
    held = _HELD.pop(fd, None)
    if held is None:
        return
    try:
        now = os.lstat(lock)
        if (now.st_dev, now.st_ino) == held:
            lock.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _new_temp_file(target: Path) -> tuple[Path, int]:
    """Create an empty ``<name>.tmp-<pid>-<random>`` beside ``target``, exclusively and without
    following a symbolic link, unique to this call (two threads writing one file never share it);
    return it with its open descriptor, which writers write through (:func:`atomic_file`): a
    file reopened by name could be swapped for a link in a run others can write to."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = target.with_name(f"{target.name}{TEMP_MARKER}{os.getpid()}-{os.urandom(6).hex()}")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue


@contextlib.contextmanager
def _replaced_on_success(path: str | os.PathLike[str]) -> Iterator[tuple[Path, int]]:
    """A new temporary file next to ``path`` (its path and open descriptor, which the caller
    closes); renamed onto ``path`` when the ``with`` block succeeds, else removed, ``path`` left
    exactly as it was (old content or absent). Parent folders are created. A temporary file
    that is no longer the file it was made as (swapped for a link or another file meanwhile) is
    never renamed onto ``path``: CacheFormatError."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_temp_file(target)
    made = os.fstat(fd)
    try:
        yield tmp, fd
        now = os.lstat(tmp)
        if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
            raise CacheFormatError(
                f"{tmp} was replaced while {target} was being written (by another process in "
                f"this folder?); {target} was left as it was: find what else writes there"
            )
        os.replace(tmp, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if (
            isinstance(error, OSError)
            and error.errno is None
            and _SHORT_WRITE.fullmatch(str(error))
        ):  # numpy's short write ("38400 requested and 25584 written") names no cause
            raise ShortWriteError(
                f"could not write {target} whole ({error}): the disk, your quota or a file-size "
                "limit ran out"
            ) from error
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a new temporary file next to ``path``, open for binary writing; when the ``with``
    block succeeds it is flushed, synced and renamed onto ``path``. If the block raises, the
    temporary file is removed and ``path`` is left exactly as it was (old content or absent).
    The file is written through the descriptor that created it, never reopened by name."""
    with _replaced_on_success(path) as (_, fd), os.fdopen(fd, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    For writers that need a path (benchmarks, tests); the package's writers use
    :func:`atomic_file`, which is never reopened by name. If the ``with`` block raises, the
    temporary file is removed and ``path`` is left exactly as it was. Parent folders are created.
    """
    with _replaced_on_success(path) as (tmp, fd):
        os.close(fd)
        yield tmp


#: numpy's message for a write cut short (``ndarray.tofile``), which carries no errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class ShortWriteError(OSError):
    """A file could not be written whole and the system named no cause (numpy's short write): a
    full disk, a quota or a file-size limit (``ulimit -f``) ran out. The message names the file.
    """


#: A temporary file's name exactly as :func:`atomic_path` makes it,
#: ``<final name>.tmp-<pid>-<12 hex digits>``, or as older versions did, ``<final name>.tmp-<pid>``
_TEMP_NAME = re.compile(rf".+{re.escape(TEMP_MARKER)}([0-9]+)(-[0-9a-f]{{12}})?")


def clean_temp_files(folder: str | os.PathLike[str]) -> int:
    """Delete leftover ``<name>.tmp-<pid>-<random>`` files (of a killed writer) under the run
    folder ``folder``; count them. Only names :func:`atomic_path` makes are touched
    (``notes.tmp-1.txt`` or ``draft.tmp-final`` are not), a file whose writer process is alive is
    left to it, and symbolic links are neither followed nor deleted. Call it on run folders only
    (a folder holding a manifest), never on a folder a user points at before it is known to be a
    run."""
    count = 0
    for where, _, names in os.walk(folder):  # os.walk does not enter linked folders
        for name in names:
            tmp = Path(where) / name
            match = _TEMP_NAME.fullmatch(name)
            if match is None or not tmp.is_file() or tmp.is_symlink():
                continue
            writer = int(match[1])
            if writer != os.getpid() and _pid_alive(writer):
                continue  # still being written (the dashboard's UMAP, a report's captions)
            tmp.unlink()
            count += 1
    return count


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write a numeric array as ``.npy`` atomically (never pickled); return the path.

    Raises ValueError for object arrays, which ``.npy`` could only store by pickling.
    """
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise ValueError(
            f"cannot cache an object array at {path}: it would need pickle; "
            "convert it to a numeric dtype (e.g. np.asarray(x, dtype=np.float32)) first"
        )
    with atomic_file(path) as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def _missing_bytes(handle: Any) -> str | None:
    """What a ``.npy`` file lacks when its header claims more data than the file holds, else None
    (also for a header numpy cannot parse: ``np.load`` says what is wrong with it)."""
    handle.seek(0)
    try:
        version = np.lib.format.read_magic(handle)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
            np.lib.format.read_array_header_2_0)
        shape, _, dtype = header(handle)
    except (ValueError, OSError, EOFError):
        return None
    need = handle.tell() + math.prod(shape) * dtype.itemsize
    size = os.fstat(handle.fileno()).st_size
    if dtype.hasobject or need <= size:
        return None
    return f"its header claims a {shape} {dtype} array of {need:,} bytes, the file holds {size:,}"


def read_npy(
    path: str | os.PathLike[str],
    *,
    mmap: bool = False,
    what: str = "cached array",
    fix: str = "rerun `python -m convergence_core precompute` for this run (the same command): it "
    "writes the file again",
) -> np.ndarray:
    """Read a ``.npy`` file without ever unpickling; ``mmap=True`` maps it read-only.

    ``what`` names the file in errors and ``fix`` says what to do (a cached file is recreated by
    precompute; a feature file a user wrote is saved again by its owner).

    Raises:
        CacheFormatError: the file is missing or not a valid ``.npy`` file.
        PickleRefusedError: the file holds Python objects (a pickle), which is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheFormatError(f"{what} {path} is missing; {fix}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
            short = None if mmap or magic != _NPY_MAGIC else _missing_bytes(handle)
    except OSError as exc:  # no permission, a disk error: the file is there but unreadable
        raise CacheFormatError(read_error_text(exc, path, what)) from None
    if short:  # np.load would first ask for all the bytes its header claims (a MemoryError)
        raise CacheFormatError(f"cannot read {what} {path} ({short}): it is damaged; {fix}")
    if magic != _NPY_MAGIC:
        if magic[:1] == _PICKLE_PROTOCOL_OPCODE:
            raise PickleRefusedError(
                f"refusing to load {what} {path}: it is a pickle, not a .npy file, and unpickling "
                f"can run arbitrary code; {fix}"
            )
        raise CacheFormatError(
            f"{what} {path} is not a .npy file (it does not start with the numpy header); {fix}"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        message = str(exc).lower()
        if "pickle" in message or "object" in message:
            raise PickleRefusedError(
                f"refusing to load {what} {path}: it holds Python objects and could only be read "
                f"by unpickling, which can run arbitrary code; {fix}"
            ) from exc
        raise CacheFormatError(f"cannot read {what} {path} ({exc}); {fix}") from exc
    except (OSError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the disk's fault, not the file's
            raise CacheFormatError(read_error_text(exc, path, what)) from None
        raise CacheFormatError(f"cannot read {what} {path} ({exc}); {fix}") from exc


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as pretty, key-sorted UTF-8 JSON atomically; return the path."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return write_bytes(path, (text + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; CacheFormatError (with the fix) when missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CacheFormatError(
            f"{path} is missing; rerun `python -m convergence_core precompute` for this run"
        ) from exc
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8; brackets nested too deep
        raise CacheFormatError(
            f"{path} is not valid JSON ({str(exc)[:200] or type(exc).__name__}); delete it and "
            "rerun precompute"
        ) from exc
    except OSError as exc:  # no permission, a disk error
        raise CacheFormatError(read_error_text(exc, path, "file")) from None


def write_parquet(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame as parquet (pyarrow, no index) atomically; return the path."""
    with atomic_file(path) as handle:
        frame.to_parquet(handle, engine="pyarrow", index=False)
    return Path(path)


def read_parquet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a parquet file; CacheFormatError (with the fix) when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CacheFormatError(
            f"{path} is missing; rerun `python -m convergence_core precompute` for this run"
        )
    try:
        return pd.read_parquet(path, engine="pyarrow")
    except OSError as exc:
        if exc.errno is None:  # pyarrow's own OSError: a damaged file (no errno)
            raise CacheFormatError(
                f"cannot read {path} ({exc}); delete it and rerun precompute"
            ) from exc
        raise CacheFormatError(read_error_text(exc, path, "file")) from None
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise CacheFormatError(
            f"cannot read {path} ({exc}); delete it and rerun precompute"
        ) from exc


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: What a key may look like: one path component of safe characters, not starting with a dot (so
#: never ``.``, ``..`` or hidden), at most 120 characters (:func:`model_key` keeps to this).
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,119}")
_MAX_KEPT_NAME = 100


def model_key(name: str) -> str:
    """File-system-safe, collision-free folder/file name for a model or layer name.

    Names made only of ``[A-Za-z0-9._-]`` (and not starting with a dot) are kept as they are;
    any other name (or one longer than 100 characters) gets its unsafe runs replaced by ``_``, is
    cut to 100 characters and gets an 8-hex hash of the original, so two different names never
    share a key. E.g. ``"org/model"`` -> ``"org_model-1a2b3c4d"``. Every key passes
    :func:`check_key`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model/layer name must be a non-empty string, got {name!r}")
    safe = _UNSAFE.sub("_", name).lstrip(".")
    if safe == name and len(name) <= _MAX_KEPT_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{safe[:_MAX_KEPT_NAME] or 'x'}-{digest}"


def colliding_keys(keys: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first two names of ``{name: key}`` whose keys would name one file: the same key, or
    keys equal but for case (one file where file names ignore case: macOS and Windows by
    default). Returns ``(first name, second name, where)`` (``where``: "" for the same key, else
    the words saying on which systems), or None."""
    seen: dict[str, str] = {}
    for name, key in keys.items():
        other = seen.setdefault(key.casefold(), name)
        if other != name:
            same = keys[other] == key
            where = "" if same else " on macOS and Windows, whose file systems ignore case"
            return other, name, where
    return None


def check_key(key: object, what: str = "key") -> str:
    """``key`` if it is a safe file name as :func:`model_key` makes them, else CacheFormatError.

    Keys are read from a run's manifest, which may come from someone else (a shared cache, a
    downloaded run): a key such as ``"../../x"`` or ``"/home"`` must never become a path.
    """
    if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
        raise CacheFormatError(
            f"the run's manifest names the {what} {str(key)[:80]!r}, which is not a file name this "
            "program writes (letters, digits, '.', '_', '-', not starting with '.'); the manifest "
            "was altered or damaged: delete the run folder and rerun precompute"
        )
    return key


class RunLayout:
    """Paths of every file in one run folder (see docs/ARCHITECTURE.md, "Cache layout").

    Model and layer arguments are *keys* (from :func:`model_key`), not display names; each is
    checked with :func:`check_key` before it becomes a path, and every path handed out is checked
    to stay inside the run folder once symbolic links are resolved (CacheFormatError otherwise),
    so a tampered run folder can never make a reader or writer touch anything outside it.
    """

    #: gpa/: residuals (n, M), loss_history, scales (M,); per model i also ``map_{i}`` (d_i, p),
    #: p = min(n − 1, d), and ``mean_{i}`` (d_i,) (:meth:`gpa_model_array`): O(M·d·p), never the
    #: (n, p) aligned arrays
    GPA_ARRAYS = ("residuals", "loss_history", "scales")
    PCA_ARRAYS = ("scores", "components", "explained_variance", "explained_variance_ratio", "mean")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._resolved_root = self.root.resolve()

    def inside(self, path: Path) -> Path:
        """``path`` (under :attr:`root`) if it resolves inside the run folder, else CacheFormatError."""
        if not path.resolve().is_relative_to(self._resolved_root):
            raise CacheFormatError(
                f"{path} leads outside the run folder {self.root} (through a symbolic link); the "
                "run folder was altered: delete it and rerun precompute"
            )
        return path

    def _file(self, *parts: str) -> Path:
        return self.inside(self.root.joinpath(*parts))

    def remove_tree(self, path: Path) -> None:
        """Delete the folder ``path`` of this run (nothing happens if it is absent or leads out)."""
        with contextlib.suppress(CacheFormatError):
            target = self.inside(path)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)

    @property
    def manifest(self) -> Path:
        return self._file("manifest.json")

    @property
    def stimuli(self) -> Path:
        return self._file("stimuli.parquet")

    def embeddings_dir(self, model: str) -> Path:
        return self._file("embeddings", check_key(model, "model key"))

    def embedding(self, model: str, layer: str) -> Path:
        return self._file(
            "embeddings", check_key(model, "model key"), f"{check_key(layer, 'layer key')}.npy"
        )

    def neighbours_dir(self, model: str) -> Path:
        return self._file("neighbours", check_key(model, "model key"))

    def neighbour_indices(self, model: str, layer: str) -> Path:
        """(n, K) int32: each stimulus's K most similar others (see ``neighbours.NeighbourLists``)."""
        return self._file(
            "neighbours", check_key(model, "model key"), f"{check_key(layer, 'layer key')}.indices.npy"
        )

    def neighbour_values(self, model: str, layer: str) -> Path:
        """(n, K) float64: their inner products (prepared features), most similar first."""
        return self._file(
            "neighbours", check_key(model, "model key"), f"{check_key(layer, 'layer key')}.values.npy"
        )

    def captions_dir(self, model: str) -> Path:
        """``captions/<model>/``: every caption's embedding per layer (``caption_embedding``)."""
        return self._file("captions", check_key(model, "model key"))

    def caption_embedding(self, model: str, layer: str) -> tuple[Path, Path]:
        """``captions/<model>/<layer>.npy`` (every caption's embedding) and its ``.json``."""
        folder, layer = self.captions_dir(model), check_key(layer, "layer key")
        return self.inside(folder / f"{layer}.npy"), self.inside(folder / f"{layer}.json")

    @property
    def legacy_grams_dir(self) -> Path:
        """``grams/`` of format-1 runs (dense Gram matrices), removed when a run is upgraded."""
        return self._file("grams")

    @property
    def shards_dir(self) -> Path:
        """Where the Ray engine keeps its shards while a model is extracted (deleted after)."""
        return self._file("shards")

    @property
    def gpa_dir(self) -> Path:
        return self._file("gpa")

    def gpa_array(self, name: str) -> Path:
        return self._file("gpa", f"{check_key(name, 'GPA array')}.npy")

    def gpa_model_array(self, name: str, model: int) -> Path:
        """``gpa/<name>_<model>.npy``: ``map`` (d_i, p) or ``mean`` (d_i,) of the model-th GPA
        input."""
        return self.gpa_array(f"{check_key(name, 'GPA array')}_{int(model)}")

    @property
    def gpa_json(self) -> Path:
        return self._file("gpa", "gpa.json")

    @property
    def gpa_stability_table(self) -> Path:
        """``gpa/stability.parquet``: ``GPAStability.to_frame`` (long: stimulus × model × metric)."""
        return self._file("gpa", "stability.parquet")

    @property
    def gpa_stability_json(self) -> Path:
        """``gpa/stability.json``: ``n_starts``, ``seed``, ``tol`` and ``GPAStability.summary``."""
        return self._file("gpa", "stability.json")

    @property
    def gpa_stability_solutions_dir(self) -> Path:
        """``gpa/stability_solutions/``: the stability diagnostic's finished GPA solutions while
        it runs (``run_writer.StabilitySolutions``; removed when the step is done)."""
        return self._file("gpa", "stability_solutions")

    def gpa_stability_solution(self, index: int, name: str) -> Path:
        """``gpa/stability_solutions/<index>_<name>``: a file of solution ``index``."""
        return self._file(
            "gpa", "stability_solutions", f"{int(index)}_{check_key(name, 'solution file')}"
        )

    @property
    def dispersion(self) -> Path:
        return self._file("dispersion.parquet")

    def pca_array(self, name: str) -> Path:
        return self._file("pca", f"{check_key(name, 'PCA array')}.npy")

    @property
    def thumbnails_dir(self) -> Path:
        return self._file("thumbnails")

    def thumbnail(self, row: int) -> Path:
        return self._file("thumbnails", f"{int(row)}.jpg")

    @property
    def umap(self) -> Path:
        return self._file("umap.npy")

    @property
    def properties(self) -> Path:
        """properties.parquet: one row per stimulus, one column per property."""
        return self._file("properties.parquet")

    @property
    def properties_info(self) -> Path:
        """properties.json: the description of every property column."""
        return self._file("properties.json")

    def properties_part(self, name: str, suffix: str) -> Path:
        """``properties/<name><suffix>``: a part the precompute caches (image table, caption
        agreement)."""
        return self._file("properties", f"{check_key(name, 'property part')}{suffix}")
