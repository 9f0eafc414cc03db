"""What every benchmark records beside its printed table: the machine it ran on (:func:`machine`)
and one JSON file under ``benchmarks/results/`` (:func:`write_results`), written whole (a
temporary file, then a rename), so an interrupted benchmark never leaves half a file.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, Python, CPUs and the 1-minute load average now (other jobs slow every number:
    compare ratios measured in one run), plus ``extra`` (BLAS, threads, a measured peak...)."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        **extra,
    }


def write_results(
    name: str | os.PathLike[str], payload: Any, *, default: Callable[[Any], Any] | None = None
) -> Path:
    """Write ``payload`` as indented JSON to ``benchmarks/results/<name>`` (a relative ``name``;
    an absolute one is used as it is), atomically; print and return the path. ``default``:
    as in ``json.dumps``, for values JSON does not know (numpy scalars)."""
    from convergence_core.cache import atomic_path

    out = RESULTS_DIR / name
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=default) + "\n", encoding="utf-8")
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"wrote {shown}")
    return out
