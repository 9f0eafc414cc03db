"""The benchmarks' server helpers (dashboard/headless.py): a server on a chosen port with its
stderr kept, and waiting on what a server writes there (serve's warm-up says when it is done)."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from convergence_core.dashboard import headless


def _write_later(path, chunks, delay=0.3):  # noqa: ANN001, ANN202
    """Append ``chunks`` to ``path`` one by one, ``delay`` s apart, in a thread; the thread's
    ``last_write`` is the monotonic time of its last write."""
    def write() -> None:
        for chunk in chunks:
            time.sleep(delay)
            with open(path, "a") as handle:
                handle.write(chunk)
            thread.last_write = time.monotonic()

    thread = threading.Thread(target=write, daemon=True)
    thread.last_write = None
    thread.start()
    return thread


def test_wait_for_line_returns_the_line_once_the_server_has_written_it(tmp_path) -> None:
    log = tmp_path / "serve.err"
    writer = _write_later(log, ["starting\n", "step ready in 0.1 s\n", "done: all ready\n"])
    assert headless.wait_for_line(log, "done:", timeout=10) == "done: all ready"
    writer.join()
    # a line that only contains the words elsewhere does not count
    with pytest.raises(TimeoutError, match=r"no line starting 'ready' .* 'done: all ready'"):
        headless.wait_for_line(log, "ready", timeout=0.5)


def test_wait_for_line_on_a_file_not_yet_there_names_it(tmp_path) -> None:
    with pytest.raises(TimeoutError, match=r"\(nothing written\)"):
        headless.wait_for_line(tmp_path / "absent.err", "done", timeout=0.3)


def test_wait_until_quiet_waits_for_the_writing_to_stop(tmp_path) -> None:
    log = tmp_path / "serve.err"
    writer = _write_later(log, ["a\n", "b\n", "c\n"], delay=0.4)
    headless.wait_until_quiet(log, quiet=1.0, timeout=30)
    returned = time.monotonic()
    writer.join()
    assert log.read_text() == "a\nb\nc\n"  # it returned after the last write...
    assert returned - writer.last_write >= 1.0 - 0.05  # ...and a quiet second after it
    growing = _write_later(log, ["x\n"] * 40, delay=0.1)
    with pytest.raises(TimeoutError, match="still growing"):
        headless.wait_until_quiet(log, quiet=1.0, timeout=2.0)
    growing.join()


def test_waiting_on_a_server_that_has_exited_says_so(tmp_path) -> None:
    """A server that dies while its stderr is awaited ends the wait at once, naming the file."""
    import subprocess
    import sys

    log = tmp_path / "serve.err"
    log.write_text("starting\n")
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    for wait in (lambda: headless.wait_for_line(log, "done", 60, gone),
                 lambda: headless.wait_until_quiet(log, 30, 60, gone)):
        start = time.monotonic()
        with pytest.raises(AssertionError, match=r"exited with 3 .*serve\.err"):
            wait()
        assert time.monotonic() - start < 10


def test_a_server_on_a_chosen_port_keeps_its_stderr(tmp_path) -> None:
    """``port`` is the one served on, again once the first server has stopped (the benchmark
    keeps a checkout's port, and with it the browser's cache, from one fresh server to the
    next); ``stderr`` names the file the server's standard error goes to."""
    app = tmp_path / "app.py"
    app.write_text("import streamlit as st\n\nst.write('x')\n")
    log = tmp_path / "server.err"
    port = headless.free_port()
    with headless.streamlit_server(app, cwd=tmp_path, port=port, stderr=log) as (base, _):
        assert base == f"http://localhost:{port}"
        with urllib.request.urlopen(f"{base}/_stcore/health", timeout=10) as reply:
            assert reply.read().strip() == b"ok"
        assert log.exists()
    with headless.streamlit_server(app, cwd=tmp_path, port=port, stderr=log) as (again, _):
        assert again == base  # the same port once the first server has stopped
