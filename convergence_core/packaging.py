"""Getting the package onto Ray workers: the ``runtime_env`` the Ray engine passes to ``ray.init``.

A Ray worker is a fresh Python process on some node; it must import ``convergence_core`` (the
encoder actors and the extraction code live there) with the same version as the driver. Three
ways, chosen by ``ship`` (README, "Running on a cluster"):

``"source"`` (default)
    Ray zips this package's folder (``py_modules``; without ``__pycache__``), uploads it to the
    cluster once per content hash, and puts it first on every worker's path. The workers' Python
    must already have the dependencies (torch, transformers, ...): the usual case when every node
    runs the same image or virtual environment as the driver. Works from a checkout and from an
    installed package alike.
``"installed"``
    Nothing is shipped: every node has the same ``convergence-explorer`` installed (e.g. ``pip
    install convergence-explorer[demo,ray]`` from the same wheel in the node image). The
    recommended setup for a fixed cluster.
``"wheel"``
    Ray uploads a built wheel (``pip wheel . -w dist``) and pip-installs it *with its
    dependencies* into a per-job folder on each node (``py_modules``): no preparation of the
    nodes, but the first job on a node downloads and installs torch & co.

In every mode the ``CONVERGENCE_*`` settings of this process (:mod:`convergence_core.settings`)
are passed on as ``env_vars``, so workers see the same cache and data folders and the same image
size limit; those paths must exist on the workers (a shared file system, or the same paths on
every node).

This module never imports Ray: it builds a plain dict (Ray accepts one wherever it takes a
``RuntimeEnv``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["PACKAGE_DIR", "SETTINGS_VARIABLES", "SHIP_MODES", "ray_runtime_env"]

#: this package's folder (what ``ship="source"`` uploads)
PACKAGE_DIR = Path(__file__).resolve().parent

#: the environment variables that carry this project's settings to the workers
SETTINGS_VARIABLES = (
    "CONVERGENCE_CACHE",
    "CONVERGENCE_DATA",
    "CONVERGENCE_DEMO_DATA",
    "CONVERGENCE_IMAGENET_DATA",
    "CONVERGENCE_MAX_IMAGE_PIXELS",  # workers decode the images: the same size limit there
)

ShipMode = Literal["source", "installed", "wheel"]
SHIP_MODES: tuple[str, ...] = ("source", "installed", "wheel")

#: never uploaded with the source (Ray matches these like .gitignore lines)
_SOURCE_EXCLUDES = ["__pycache__/", "*.pyc", "*.tmp-*"]


def ray_runtime_env(
    ship: ShipMode = "source",
    *,
    wheel: str | os.PathLike[str] | None = None,
    pip: Sequence[str] | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Ray ``runtime_env`` dict that makes ``convergence_core`` importable on every worker.

    Args:
        ship: ``"source"``, ``"installed"`` or ``"wheel"`` (module docstring).
        wheel: the ``.whl`` file to ship; required with ``ship="wheel"``, refused otherwise.
        pip: extra requirements Ray installs into each worker's environment (e.g.
            ``["convergence-explorer[demo]==0.1.0"]`` or pinned dependencies); omitted if None.
        env_vars: extra environment variables for the workers; they override the settings
            copied from this process.

    Returns:
        e.g. ``{"py_modules": ["/.../convergence_core"], "excludes": [...],
        "env_vars": {"CONVERGENCE_CACHE": "/shared/cache"}}``; pass it as
        ``ray.init(address=..., runtime_env=...)``.

    Raises:
        ValueError: unknown ``ship``; ``wheel`` missing, not a ``.whl`` file, or given without
            ``ship="wheel"``; ``pip`` or ``env_vars`` entries that are not strings.
    """
    if ship not in SHIP_MODES:
        raise ValueError(f"unknown ship mode {ship!r}; use one of {list(SHIP_MODES)}")
    runtime_env: dict[str, Any] = {}
    if ship == "source":
        if wheel is not None:
            raise ValueError("wheel= is only used with ship='wheel'")
        runtime_env["py_modules"] = [str(PACKAGE_DIR)]
        runtime_env["excludes"] = list(_SOURCE_EXCLUDES)
    elif ship == "wheel":
        if wheel is None:
            raise ValueError(
                "ship='wheel' needs wheel=PATH to a built wheel (make one with "
                "`pip wheel --no-deps . -w dist` in the repository)"
            )
        path = Path(wheel).expanduser().resolve()
        if path.suffix != ".whl" or not path.is_file():
            raise ValueError(
                f"wheel {str(wheel)!r} is not a .whl file; build one with `pip wheel --no-deps .`"
            )
        runtime_env["py_modules"] = [str(path)]
    elif wheel is not None:
        raise ValueError("wheel= is only used with ship='wheel'")
    if pip is not None:
        if isinstance(pip, str) or not all(isinstance(item, str) for item in pip):
            raise ValueError("pip must be a list of requirement strings, e.g. ['ray[data]>=2.60']")
        runtime_env["pip"] = list(pip)
    variables = {
        name: os.environ[name] for name in SETTINGS_VARIABLES if os.environ.get(name, "").strip()
    }
    for name, value in (env_vars or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"env_vars must map strings to strings, got {name!r}: {value!r}")
        variables[name] = value
    if variables:
        runtime_env["env_vars"] = variables
    return runtime_env
