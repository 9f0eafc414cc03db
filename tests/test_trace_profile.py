"""``headless.trace_profile``: where a Chromium trace's main-thread time went, on planted traces
(the benchmark's ``--trace`` reads real ones; no browser is needed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convergence_core.dashboard.headless import trace_profile


def node(node_id: int, function: str, url: str = "") -> dict:
    return {"id": node_id, "callFrame": {"functionName": function, "url": url}}


def chunk(pid: int, profile: str, nodes: list[dict], samples: list[int], deltas: list[int]) -> dict:
    return {
        "name": "ProfileChunk",
        "pid": pid,
        "id": profile,
        "args": {"data": {"cpuProfile": {"nodes": nodes, "samples": samples},
                          "timeDeltas": deltas}},
    }


def test_sampled_time_is_summed_by_module_across_chunks(tmp_path: Path) -> None:
    """Two chunks of the main thread's profile (nodes announced in the first, sampled in both),
    and a worker's smaller profile that must be left out; times are in microseconds."""
    main = [
        node(1, "(root)"),
        node(2, "(idle)"),
        node(3, "(program)"),
        node(4, "(garbage collector)"),
        node(5, "Ho", "http://localhost:8501/static/js/react-dom.Dzbslgj4.js"),
        node(6, "n", "http://localhost:8501/static/js/StreamlitMarkdown.oOG-xoxw.js?v=1"),
        node(7, "appendChild"),
    ]
    events = [
        {"name": "TracingStartedInBrowser", "ph": "I"},
        chunk(10, "0x1", main, [2, 3, 5, 5, 6], [1000, 2000, 3000, 4000, 500]),
        chunk(10, "0x1", [node(8, "t", "http://x/static/js/index.DormvYxC.js")],
              [7, 8, 3, 2], [250, 750, 1000, 9000]),
        chunk(11, "0x1", [node(1, "w", "http://x/worker.js")], [1], [100]),  # another process
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    profile = trace_profile(path)
    assert profile["idle"] == pytest.approx(10.0)
    assert profile["native"] == pytest.approx(3.0)
    assert profile["react-dom"] == pytest.approx(7.0)
    assert profile["StreamlitMarkdown"] == pytest.approx(0.5)
    assert profile["browser API"] == pytest.approx(0.25)
    assert profile["index"] == pytest.approx(0.75)
    assert "gc" not in profile and "worker.js" not in profile  # never sampled / other profile
    assert profile["total"] == pytest.approx(21.5)
    assert profile["busy"] == pytest.approx(11.5)
    assert list(profile)[:2] == ["idle", "react-dom"]  # largest first


def test_a_trace_without_a_cpu_profile_gives_nothing(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([{"name": "RunTask", "ph": "X", "dur": 5}]))  # the array form
    assert trace_profile(path) == {}
