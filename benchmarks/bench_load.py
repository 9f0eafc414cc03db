"""A room of users: N sessions on the Alignment lab changing k, against one dashboard server.

Each session speaks Streamlit's own websocket protocol to a real server (the one ``make demo``
starts), as a browser does but without drawing anything: it opens the lab, then every few seconds
moves k by a step or two, as a user dragging the slider does, and times the server's answer. This
measures the server alone, the part that a room of users shares, on the real code path (session
management, the script runs, every element serialised to protobuf and sent over the websocket,
the shared caches). AppTest sessions in threads would skip the server's session handling, message
serialisation and transport, and do not run the page's fragment the way a browser's widget
change does; browsers would measure their own rendering on the same 2 cores.

For N = 1, 4, 16, 32 (a fresh server each) it reports, per change of k:

* ``bars``: seconds from sending the new k until the server has sent the new bars (the lab's
  picture; what the user waits for), and ``done``: until the script run has finished;
  percentiles p50 / p95 / p99 / max over every change of every session;
* the server's resident memory (RSS, with its child processes) before the sessions, at its peak
  and at the end, and the growth per session.

Target (issue 16, item 9): 16 sessions changing k every few seconds, p95 ≤ 1 s server-side, and RSS
growth bounded (the run's arrays are shared by every session, never copied per session).

    .venv/bin/python benchmarks/bench_load.py                       # N = 1, 4, 16, 32; 40 s each
    .venv/bin/python benchmarks/bench_load.py --sessions 16 --duration 60 --interval 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import websockets  # noqa: E402
from streamlit.proto.BackMsg_pb2 import BackMsg  # noqa: E402
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg  # noqa: E402

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import settings  # noqa: E402
from convergence_core.dashboard import headless  # noqa: E402

TARGET_P95_S = 1.0
TARGET_SESSIONS = 16
K_LABEL = "k (nearest neighbours)"
PAGE = "Alignment_lab"


@dataclass
class Session:
    """One simulated user: its websocket, the k slider's identity and its timings."""

    name: str
    query: str
    rng: random.Random
    slider_id: str = ""
    fragment_id: str = ""
    page_hash: str = ""
    k: int = 10
    k_max: int = 10
    first_load_s: float = 0.0
    bars_s: list[float] = field(default_factory=list)
    done_s: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)


async def _receive_run(  # noqa: ANN001 - a websockets connection
    websocket, session: Session, started: float
) -> tuple[float, float]:
    """Read one script run's messages; returns (seconds to the first image, to the end)."""
    bars = float("nan")
    while True:
        message = ForwardMsg()
        message.ParseFromString(await websocket.recv())
        kind = message.WhichOneof("type")
        if kind == "new_session":
            session.page_hash = message.new_session.page_script_hash
        elif kind == "delta" and message.delta.WhichOneof("type") == "new_element":
            element = message.delta.new_element
            which = element.WhichOneof("type")
            if which == "slider" and element.slider.label == K_LABEL:
                session.slider_id = element.slider.id
                session.fragment_id = message.delta.fragment_id
                session.k_max = int(element.slider.max)
                values = list(element.slider.value) or list(element.slider.default)
                session.k = int(values[0]) if values else session.k
            elif which == "imgs" and bars != bars:  # the first picture of the run: the bars
                bars = time.perf_counter() - started
        elif kind == "script_finished":
            session.statuses.append(ForwardMsg.ScriptFinishedStatus.Name(message.script_finished))
            if message.script_finished == ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                continue  # the server restarted the run (a newer request): wait for its end
            return bars, time.perf_counter() - started


def _rerun(session: Session, k: int | None) -> bytes:
    message = BackMsg()
    state = message.rerun_script
    state.query_string = session.query
    state.page_name = PAGE
    if session.page_hash:
        state.page_script_hash = session.page_hash
    if k is not None:
        widget = state.widget_states.widgets.add()
        widget.id = session.slider_id
        widget.double_array_value.data.append(float(k))
        if session.fragment_id:
            state.fragment_id = session.fragment_id
    return message.SerializeToString()


async def _user(  # noqa: ANN001 - asyncio.Event
    base: str, session: Session, stop: list[float], interval: float, ready
) -> None:
    """Open the lab, wait for ``ready``, then change k every ``interval`` s (±30%) until
    ``stop[0]`` (a shared clock: it is set once every user has the page open)."""
    uri = base.replace("http", "ws", 1) + "/_stcore/stream"
    async with websockets.connect(uri, subprotocols=["streamlit"], max_size=None) as websocket:
        started = time.perf_counter()
        await websocket.send(_rerun(session, None))
        _, session.first_load_s = await _receive_run(websocket, session, started)
        if not session.slider_id:
            raise RuntimeError(f"{session.name}: the lab sent no k slider; is a run cached?")
        await ready.wait()
        await asyncio.sleep(session.rng.uniform(0.0, interval))  # users do not act in step
        while time.perf_counter() < stop[0]:
            step = session.rng.choice((-2, -1, 1, 2))
            k = min(max(2, session.k + step), session.k_max)
            if k == session.k:
                k = session.k - step if 2 <= session.k - step <= session.k_max else session.k
            session.k = k
            started = time.perf_counter()
            await websocket.send(_rerun(session, k))
            bars, done = await _receive_run(websocket, session, started)
            session.bars_s.append(bars)
            session.done_s.append(done)
            await asyncio.sleep(max(0.0, interval * session.rng.uniform(0.7, 1.3)))


def _rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {
        "p50": round(at(0.50), 3),
        "p95": round(at(0.95), 3),
        "p99": round(at(0.99), 3),
        "max": round(ordered[-1], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


def measure(cache: Path, run_name: str, sessions: int, duration: float, interval: float,
            seed: int) -> dict[str, object]:
    """One server, ``sessions`` users for ``duration`` seconds; timings and memory."""
    with headless.streamlit_server(
        None, cwd=ROOT, env={"CONVERGENCE_CACHE": str(cache)}
    ) as (base, process):
        server = psutil.Process(process.pid)
        # one visit first, as the first user of the day: later sessions share its caches
        warm = Session("warm-up", f"run={run_name}&k=10", random.Random(seed))
        asyncio.run(_visit_once(base, warm))
        rss_before = _rss(server)
        peak = [rss_before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                peak[0] = max(peak[0], _rss(server))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        users = [
            Session(f"user-{i}", f"run={run_name}&k=10", random.Random(seed * 1000 + i))
            for i in range(sessions)
        ]
        started = time.perf_counter()
        asyncio.run(_room(base, users, duration, interval))
        wall = time.perf_counter() - started
        sampling.set()
        sampler.join()
        rss_end = _rss(server)
        cpu = server.cpu_times()
    every_bars = [s for user in users for s in user.bars_s]
    bars = [s for s in every_bars if s == s]  # a run without a picture has NaN: counted below
    done = [s for user in users for s in user.done_s]
    statuses: dict[str, int] = {}
    for user in users:
        for status in user.statuses:
            statuses[status] = statuses.get(status, 0) + 1
    return {
        "sessions": sessions,
        "changes_of_k": len(done),
        "seconds": round(wall, 1),
        "first_load_s": _percentiles([u.first_load_s for u in users]),
        "bars_s": _percentiles(bars),
        "done_s": _percentiles(done),
        "runs_without_new_bars": len(every_bars) - len(bars),
        "script_finished": statuses,
        "rss_mb_before": round(rss_before / 1e6, 1),
        "rss_mb_peak": round(peak[0] / 1e6, 1),
        "rss_mb_end": round(rss_end / 1e6, 1),
        "rss_mb_growth_per_session": round((peak[0] - rss_before) / 1e6 / sessions, 2),
        "server_cpu_s": round(cpu.user + cpu.system, 1),
        "ok": sessions != TARGET_SESSIONS
        or bool(bars and _percentiles(bars)["p95"] <= TARGET_P95_S),
    }


async def _visit_once(base: str, session: Session) -> None:
    ready = asyncio.Event()
    ready.set()
    await _user(base, session, [0.0], 0.0, ready)


async def _room(base: str, users: list[Session], duration: float, interval: float) -> None:
    """Every user opens the lab; once all have it open, all change k for ``duration`` s."""
    ready = asyncio.Event()
    stop = [float("inf")]
    tasks = [asyncio.create_task(_user(base, user, stop, interval, ready)) for user in users]
    while not all(user.slider_id for user in users):
        await asyncio.sleep(0.05)
        failed = [task for task in tasks if task.done() and task.exception() is not None]
        if failed:
            raise failed[0].exception()
    stop[0] = time.perf_counter() + duration
    ready.set()
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,4,16,32", help="comma-separated N")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of k changes per N")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between changes")
    parser.add_argument("--run", help="a run folder (default: the demo run, else a synthetic one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="load.json", help="file name in benchmarks/results")
    args = parser.parse_args()
    if args.run:
        run_path = Path(args.run).resolve()
    elif (settings.runs_root() / "demo" / "manifest.json").is_file():
        run_path = settings.runs_root() / "demo"
    else:
        from tests.fixtures_runs import make_synthetic_run

        cache = Path(tempfile.mkdtemp(prefix="bench-load-"))
        run_path = make_synthetic_run(cache / "runs", n=239, name="demo").path
    cache = run_path.parent.parent
    counts = [int(n) for n in args.sessions.split(",")]
    print(f"run {run_path} · {os.cpu_count()} CPUs · load average {os.getloadavg()[0]:.1f}")
    rows = []
    for n in counts:
        row = measure(cache, run_path.name, n, args.duration, args.interval, args.seed)
        rows.append(row)
        print(
            f"N={n:3d}  changes {row['changes_of_k']:4d}  bars p50 {row['bars_s']['p50']:.3f} "
            f"p95 {row['bars_s']['p95']:.3f} p99 {row['bars_s']['p99']:.3f} "
            f"max {row['bars_s']['max']:.3f}  done p95 {row['done_s']['p95']:.3f}  "
            f"RSS {row['rss_mb_before']:.0f} → peak {row['rss_mb_peak']:.0f} MB "
            f"(+{row['rss_mb_growth_per_session']:.1f} MB/session)  ok {row['ok']}",
            flush=True,
        )
    write_results(
        args.out,
        {
            "run": str(run_path),
            "page": PAGE,
            "interval_s": args.interval,
            "duration_s": args.duration,
            "target": {"sessions": TARGET_SESSIONS, "p95_s": TARGET_P95_S},
            "machine": machine(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
