"""A local Ray instance (``--engine ray`` without ``--ray-address``) listens on loopback only.

The project's rule is that nothing listens beyond localhost unless asked. Ray's defaults on Linux
bind the GCS, the raylet, the agents and every worker's gRPC server to all interfaces (or to the
machine's network address); the engine starts its local instance on ``127.0.0.1`` instead. The
test starts that instance once (a few seconds), runs one task so that a worker exists, and checks
every listening socket of the instance's processes (and the ones the driver opened for it).
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from convergence_core.engines import EngineOptions
from convergence_core.ray_engine import RayEngine

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

#: Ray's switch that the engine turns off while its local instance starts
SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (``::ffff:127.0.0.1``, a dual-stack socket)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def listening(proc: psutil.Process) -> set[tuple[str, int, str]]:
    """``(ip, port, kind)`` of the TCP sockets ``proc`` listens on and its bound UDP sockets."""
    found = set()
    try:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port, "tcp"))
            elif conn.type.name == "SOCK_DGRAM" and conn.laddr and not conn.raddr:
                found.add((conn.laddr.ip, conn.laddr.port, "udp"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    return found


def ray_processes(session_dir: str) -> list[psutil.Process]:
    """The processes of the Ray instance of ``session_dir``: this process's descendants (GCS,
    raylet, agents, workers) and any process naming the session folder, with theirs."""
    me = psutil.Process()
    roots = me.children(recursive=True)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if session_dir in " ".join(proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {}
    for proc in roots:
        found[proc.pid] = proc
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    found.pop(me.pid, None)
    return list(found.values())


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only() -> None:
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    me = psutil.Process()
    before_driver = listening(me)
    from ray._private import ray_constants

    switch_before = os.environ.get(SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    engine = RayEngine(EngineOptions(engine="ray", concurrency=1))
    try:
        engine.start()

        @ray.remote(num_cpus=1)
        def pid() -> int:
            return os.getpid()

        worker = ray.get(pid.remote())  # a worker process, with its own gRPC server, exists
        node = ray._private.worker._global_node
        processes = ray_processes(node.get_session_dir_path())
        assert worker in {p.pid for p in processes}
        sockets = {
            (p.pid, " ".join(p.cmdline()[:1])[-40:], *s)
            for p in processes for s in listening(p)
        }
        # the driver's own servers (its core worker), not sockets it had before Ray started
        sockets |= {(me.pid, "driver", *s) for s in listening(me) - before_driver}
        pids = {entry[0] for entry in sockets}
        # not vacuous: the GCS, the raylet, the worker and the driver listen on TCP
        assert len(pids) >= 4 and worker in pids and me.pid in pids, sorted(sockets)
        exposed = sorted(entry for entry in sockets if not is_loopback(entry[2]))
        assert not exposed, f"Ray sockets beyond loopback: {exposed}"
        assert node.node_ip_address == "127.0.0.1"
    finally:
        engine.close()
    assert not ray.is_initialized()
    # the switch is back as it was in this process (the Ray processes had their own copy)
    assert (os.environ.get(SWITCH), ray_constants.ENABLE_RAY_CLUSTER) == switch_before


def test_loopback_check() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))
