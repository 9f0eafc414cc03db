"""Serve the dashboard (``convergence serve``), heavy imports done before the first visitor.

``streamlit run app.py`` imports pandas, pyarrow, Plotly, matplotlib, scipy and the run reader
only when the first browser session runs a page, which adds seconds to the first page on 2 cores
(benchmarks/bench_dashboard.py). Those long-lived objects are then frozen out of the garbage
collector's full passes (``gc.freeze``), and pages opened from their own URL are told where the
server is (:mod:`.deep_links`). This is the same ``streamlit run app.py`` through Streamlit's
own command line, after those imports have been done in the server process::

    convergence serve --port 8501 --cache ~/my-cache       # an installed package
    python -m convergence_core serve --port 8501           # the same
    python -m convergence_core.dashboard.serve --server.port 8501 --server.address localhost

Where the dashboard comes from (:func:`app_folder`): a wheel ships the repository's ``app.py``,
``pages/`` and ``.streamlit/config.toml`` inside the package, in
``convergence_core/dashboard/streamlit_app/`` (copied there by the build hook in ``setup.py``);
in a checkout (``make demo``, an editable install) the repository root itself is served. Either
way Streamlit finds the pages beside ``app.py`` and reads the ``.streamlit/config.toml`` beside it
(listen on localhost only, no usage statistics), whatever the current folder is. Options given
here or on the command line override that file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from convergence_core import settings

__all__ = ["PACKAGED_APP_FOLDER", "app_folder", "app_path", "main"]

#: the thread that opens the default run while the server starts (:func:`_warm_default_run`)
WARM_THREAD = "warm-default-run"
#: seconds between the default run being open and the warm-up of the slowest first screens
WARM_DELAY_S = 3.0
#: the warm-up's last stderr line starts so (a presenter, or a benchmark, can wait for it)
WARM_DONE = "convergence serve: warm-up done"
#: where a wheel carries the dashboard (app.py, pages/, .streamlit/config.toml)
PACKAGED_APP_FOLDER = Path(__file__).resolve().parent / "streamlit_app"

_EPILOG = """\
Every other option is passed to `streamlit run` (e.g. --server.headless true,
--server.port 8502; `streamlit run --help` lists them).

examples (in a checkout, `python -m convergence_core serve` is the same command):
  convergence serve                                  # http://localhost:8501
  convergence serve --port 8502 --cache ~/runs-cache
  convergence serve --host 0.0.0.0                   # a live demo: every machine on the network
"""


def app_folder() -> Path:
    """The folder holding the dashboard's ``app.py``, ``pages/`` and ``.streamlit/``.

    The copy inside an installed package, else the repository root of a checkout; a
    FileNotFoundError saying how to reinstall when neither is there.
    """
    if (PACKAGED_APP_FOLDER / "app.py").is_file():
        return PACKAGED_APP_FOLDER
    root = settings.checkout_root()
    if root is not None:
        return root
    raise FileNotFoundError(
        f"the dashboard (app.py and pages/) is not in this installation ({PACKAGED_APP_FOLDER} "
        "has no app.py) and the package does not run from a checkout; reinstall it from a wheel "
        "built from the repository (`pip install .` or `pip wheel .`), which ships the dashboard"
    )


def app_path() -> Path:
    """The dashboard's entry page, ``app_folder() / "app.py"``."""
    return app_folder() / "app.py"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the Convergence Explorer dashboard on the cached runs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # never mistake one of Streamlit's --server.* options for ours
    )
    parser.add_argument("--port", type=int, help="port to listen on (default 8501)")
    parser.add_argument(
        "--host",
        help="address to listen on (default localhost: this machine only; 0.0.0.0: everyone)",
    )
    parser.add_argument(
        "--cache",
        help="cache folder whose runs/ are shown (default $CONVERGENCE_CACHE, else cache/ in a "
        "checkout or ~/.cache/convergence-explorer when installed)",
    )
    return parser


def streamlit_arguments(argv: list[str], *, prog: str = "convergence serve") -> list[str]:
    """``argv`` of ``convergence serve`` -> the arguments after ``streamlit run APP``.

    Sets ``$CONVERGENCE_CACHE`` when ``--cache`` is given (the pages run in this process and read
    it at call time). ``--port``/``--host`` become ``--server.port``/``--server.address``; every
    other argument passes through unchanged, in order.
    """
    ours, passthrough = _parser(prog).parse_known_args(argv)
    if ours.cache is not None:
        from ..settings import cache_folder

        os.environ["CONVERGENCE_CACHE"] = str(cache_folder(ours.cache).resolve())
    options: list[str] = []
    if ours.port is not None:
        if not 0 < ours.port < 65536:
            raise ValueError(f"--port {ours.port} is not a TCP port; use 1..65535 (e.g. 8501)")
        options += ["--server.port", str(ours.port)]
    if ours.host is not None:
        options += ["--server.address", ours.host]
    arguments = [*options, *passthrough]
    _check_address(arguments)
    for flag, value in _option_values(passthrough, "--server.port"):
        _port_number(value, flag)
    hosts = [("--host", ours.host)] if ours.host is not None else []
    for flag, host in [*hosts, *_option_values(passthrough, "--server.address")]:
        _check_host(host.strip(), flag)
    return arguments


def _option_values(arguments: Sequence[str], option: str) -> list[tuple[str, str]]:
    """``(option, value)`` of each ``option VALUE`` or ``option=VALUE`` in ``arguments``."""
    found = []
    for i, argument in enumerate(arguments):
        if argument == option and i + 1 < len(arguments):
            found.append((option, arguments[i + 1]))
        elif argument.startswith(option + "="):
            found.append((option, argument.split("=", 1)[1]))
    return found


def _port_number(text: str, flag: str) -> int:
    """The TCP port ``text`` of ``flag`` (``--server.port`` passed through to Streamlit);
    ValueError, as for ``--port``, for a number out of 1..65535 or a word."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"{flag} {text} is not a TCP port; use 1..65535 (e.g. 8501)")
    return port


_HOST_CHOICES = (
    "use localhost (this machine only, the default), 0.0.0.0 (every network interface) or an "
    "IP address or host name of this machine"
)


def _check_host(host: str, flag: str) -> None:
    """ValueError (one line, naming ``flag`` and the fix) unless the server can listen on
    ``host``: a name that does not resolve, a malformed IPv4 address (999.1.1.1) or an address
    of another machine. Streamlit found these only after every import, as a socket traceback.
    The probe binds a socket to a free port of ``host`` and closes it at once (a port in use is
    Streamlit's to say: it names it)."""
    import errno
    import ipaddress
    import re
    import socket

    if re.fullmatch(r"[0-9.]+", host):  # dotted numbers: an IPv4 address, never a name to look up
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{flag} {host} is not an IPv4 address (four numbers 0-255, e.g. 127.0.0.1); "
                f"{_HOST_CHOICES}"
            ) from None
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:  # socket.gaierror: the name does not resolve
        cause = getattr(exc, "strerror", None) or exc
        raise ValueError(
            f"{flag} {host!r} is not an address or a host name this machine can resolve "
            f"({cause}); {_HOST_CHOICES}"
        ) from None
    # as the server binds: every address the name resolves to (localhost: ::1 first, on a
    # machine without IPv6 on lo, then 127.0.0.1); one that binds is enough
    failures: list[tuple[str, OSError]] = []
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
            return
        except OSError as exc:
            failures.append((str(address[0]), exc))
    if all(exc.errno == errno.EADDRNOTAVAIL for _, exc in failures):
        tried = sorted({a for a, _ in failures} - {host})
        shown = f" ({', '.join(tried)})" if tried else ""
        raise ValueError(
            f"{flag} {host}{shown} is not an address of this machine, so the dashboard "
            f"cannot listen on it; {_HOST_CHOICES}"
        ) from None
    exc = next(exc for _, exc in failures if exc.errno != errno.EADDRNOTAVAIL)
    raise ValueError(
        f"cannot listen on {flag} {host} ({exc.strerror or exc}); {_HOST_CHOICES}"
    ) from None


def _check_address(arguments: Sequence[str]) -> None:
    """An empty listening address (``--host ""``, ``--server.address=``: an unset variable in a
    script) makes Streamlit listen on every network interface while its banner shows
    ``http://:PORT``; refuse it with the two choices (from the reliability audit)."""
    for i, argument in enumerate(arguments):
        if argument in ("--server.address", "--host"):
            value = arguments[i + 1] if i + 1 < len(arguments) else ""
        elif argument.startswith(("--server.address=", "--host=")):
            value = argument.split("=", 1)[1]
        else:
            continue
        if not value.strip() or value.startswith("--"):
            raise ValueError(
                "the listening address is empty; use --host localhost (this machine only, the "
                "default when --host is left out) or --host 0.0.0.0 to listen on every network "
                "interface"
            )


def _warm_default_run() -> None:
    """What the first visitor of the default run would wait for, computed while the server
    starts: :func:`data.warm_default_run` (the run opened, checked and indexed), then Home's
    histograms, the best language layers and the default first screens of Paper analyses (Fig. 2
    where the page computes it without a button: up to ~1,200 stimuli at its default set size
    and k), What predicts dispersion and Universal space.
    One stderr line per step: its time, or why it failed (the page then says it too); last, on
    every path, a line starting :data:`WARM_DONE` that says how it ended. At 100,000 stimuli:
    ~5 s, then ~5, ~16 and ~3 s (README, "Runs of 10,000-100,000 stimuli"; Fig. 2 waits for its
    button there, so it is not computed)."""
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").addFilter(
        lambda record: record.threadName != WARM_THREAD
    )  # Streamlit warns that this thread runs no page at every cached call: true and expected
    start = time.perf_counter()
    outcome = "stopped by an unexpected error (the pages compute what they need)"
    try:
        outcome = _warm_steps()
    finally:
        print(f"{WARM_DONE} in {time.perf_counter() - start:.1f} s: {outcome}", file=sys.stderr)


def _warm_steps() -> str:
    """:func:`_warm_default_run`'s work; returns how it ended, in words."""
    from convergence_core.dashboard import data, predictors, state

    start = time.perf_counter()
    try:
        run = data.warm_default_run()
    except Exception as exc:  # noqa: BLE001 - the page shows the same error in words
        print(f"convergence serve: the default run could not be opened: {exc}", file=sys.stderr)
        return "the default run could not be opened"
    if run is None:
        return "no run to warm up (precompute one first)"
    print(
        f"convergence serve: run {run.name!r} opened and checked in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    # then the slowest first screens: Home's histograms (a picture: the first visitor's
    # first page), the best language layers (Stimuli, the lab: ~5 s at 100,000 stimuli),
    # Paper analyses' Fig. 2 (0.8 s on the demo; larger runs wait for its button, so nothing
    # there), What predicts dispersion's property tests (10,000 permutations per test, ~16
    # s) and Universal space's GPA of every model, called exactly as those pages call them
    # by default (the call is the cache key). A visitor who came at once is served first:
    # these start WARM_DELAY_S later, at the lowest CPU priority of this thread (its Python
    # still takes turns with the pages' for the GIL). The pictures are drawn for the light
    # theme only (data.themed: no browser here to ask; a dark page draws its own on first visit)
    time.sleep(WARM_DELAY_S)
    with contextlib.suppress(AttributeError, OSError):  # Linux threads have their own priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    path, stamp = str(run.path), data.manifest_stamp(run.path)

    # each step returns None when done, or why the page computes nothing there
    def home() -> None:  # Home's histograms of the two dispersion scores (a matplotlib picture)
        data.dispersion_histograms_png(path, stamp, theme="light")

    def best_layers() -> str | None:  # Stimuli, the lab and Fig. 2 read them
        if not (run.language_models and run.gpa.models):
            return "no language model, or no GPA model"
        data.best_language_layer_table(path, stamp)
        return None

    def paper_fig2() -> str | None:  # the sets, then their picture
        if (fig2 := data.default_dispersion_sets(run)) is None:
            return "the page shows a button or a note there"
        table, options = data.dispersion_sets_picture(
            run, data.dispersion_sets(path, stamp, **fig2), fig2["size"], fig2["partners"]
        )
        data.paper_figure_png("dispersion_sets", table, theme="light", **options)
        return None

    def property_tests() -> None:  # What predicts dispersion (empty without properties)
        predictors.property_tests(path, stamp, predictors.PAGE_PERMUTATIONS, 0)

    def universal_space() -> str | None:  # the default barycenter: every model
        members = data.default_members(run)
        if len({run.modality(model) for model, _ in members}) < 2:
            return "the run has one modality"
        data.cross_modal_pictures(
            path, stamp, members, state.DEFAULT_SCORE, data.CROSS_MODAL_PERMUTATIONS, 0,
            theme="light",
        )
        return None

    steps = [
        ("Home's histograms", home),
        ("best language layers", best_layers),
        ("Fig. 2", paper_fig2),
        ("property tests", property_tests),
        ("cross-modal dispersion", universal_space),
    ]
    failed = []
    for what, step in steps:
        start = time.perf_counter()
        try:
            skipped = step()
        except Exception as exc:  # noqa: BLE001 - the page shows the same error in words
            print(f"convergence serve: {what} failed: {exc}", file=sys.stderr)
            failed.append(what)
            continue
        print(
            f"convergence serve: {what} not needed ({skipped})" if skipped else
            f"convergence serve: {what} ready in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    if failed:
        return f"run {run.name!r} warmed up but for {', '.join(failed)} (above)"
    return f"the first screens of run {run.name!r} are ready"


@contextlib.contextmanager
def _runtime_not_started_yet() -> Iterator[None]:
    """Importing the pages' cached functions before Streamlit's runtime exists makes Streamlit
    log "No runtime found, using MemoryCacheStorageManager" once per function (24 lines at
    every start of the server): it checks each function's cache settings at import, against a
    throwaway in-memory store; the caches themselves are made on first use. Those lines are
    left out while the warm-up imports the pages' modules; other warnings pass."""
    from streamlit.runtime.caching import cache_data_api

    logger = logging.getLogger(cache_data_api.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(argv: list[str] | None = None, *, prog: str = "convergence serve") -> int:
    """Warm the imports, then run ``streamlit run APP ARGS`` (blocks while the server runs).

    Returns 2 (with one ``error:`` line) for bad options; otherwise Streamlit exits the process.
    """
    try:
        options = streamlit_arguments(sys.argv[1:] if argv is None else list(argv), prog=prog)
        app = app_path()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import gc

    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import scipy.stats  # noqa: F401  (the lab's baseline and the paper's tests)

    with _runtime_not_started_yet():
        from convergence_core.dashboard import (  # noqa: F401
            charts, data, page, plots, predictors, widgets,
        )
    from convergence_core.dashboard import deep_links

    from streamlit.web import cli

    # Everything imported so far lives as long as the server: keep it out of the garbage
    # collector's full passes, whose pause grows with every object it has to look at.
    gc.collect()
    gc.freeze()
    # a page opened from its own URL finds the server without a failed guess first
    deep_links.install([path for _, path in page.PAGE_URLS if path])
    # open and check the default run while the server starts, not on the first visit
    threading.Thread(target=_warm_default_run, name=WARM_THREAD, daemon=True).start()

    sys.argv = ["streamlit", "run", str(app), *options]
    cli.main(prog_name="streamlit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
