"""Where things live: the cache and the data sets, each a setting with a default.

Every location is read at call time (not import time), so tests, the CLI (``--cache``, through
:func:`cache_root_given`) and ``convergence serve --cache`` can change it through the environment:

=============================  ==========================================================
setting                        default
=============================  ==========================================================
``$CONVERGENCE_CACHE``         checkout: ``<repository>/cache``;
                               installed: ``$XDG_CACHE_HOME/convergence-explorer``
                               (``~/.cache/convergence-explorer``)
``$CONVERGENCE_DATA``          checkout: ``<repository>/../shared/data``;
                               installed: ``$XDG_DATA_HOME/convergence-explorer``
                               (``~/.local/share/convergence-explorer``)
``$CONVERGENCE_DEMO_DATA``     ``<CONVERGENCE_DATA>/coco-mini``
``$CONVERGENCE_IMAGENET_DATA`` ``<CONVERGENCE_DATA>/imagenet-samples``
=============================  ==========================================================

"Checkout" means the package is imported from the repository (``make demo``, ``make test``, an
editable install): :func:`checkout_root` finds ``app.py`` and ``pyproject.toml`` beside the
package. An installed package (a wheel in site-packages) never writes or looks for data inside
site-packages: its defaults are the per-user folders above. An empty variable counts as unset;
``~`` is expanded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "APP_NAME",
    "PROJECT_ROOT",
    "cache_folder",
    "cache_root",
    "cache_root_given",
    "check_cache_folder",
    "checkout_root",
    "data_root",
    "demo_data_root",
    "imagenet_samples_root",
    "runs_root",
]

#: the folder that holds the ``convergence_core`` package: the repository root in a checkout,
#: site-packages when installed (then nothing is read or written here; see :func:`checkout_root`)
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: the distribution's name, used for the per-user folders of an installed package
APP_NAME = "convergence-explorer"


def checkout_root() -> Path | None:
    """The repository root if the package runs from a checkout, else None (an installed package).

    A checkout is recognised by ``app.py`` and ``pyproject.toml`` beside the package folder; a
    wheel ships ``app.py`` inside the package (``convergence_core/dashboard/streamlit_app/``),
    never at the top of site-packages.
    """
    if (PROJECT_ROOT / "app.py").is_file() and (PROJECT_ROOT / "pyproject.toml").is_file():
        return PROJECT_ROOT
    return None


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else None


def _user_folder(xdg_variable: str, fallback: str) -> Path:
    """``$XDG_...`` (if set and absolute, as the XDG spec asks) or ``~/<fallback>``; + APP_NAME."""
    base = os.environ.get(xdg_variable, "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / fallback
    return (root / APP_NAME).resolve()


def cache_root() -> Path:
    """Root of the cache (runs, converted weights, downloaded data sets).

    ``$CONVERGENCE_CACHE``, else ``<repository>/cache`` in a checkout, else
    ``$XDG_CACHE_HOME/convergence-explorer`` (default ``~/.cache/convergence-explorer``).
    """
    configured = _from_env("CONVERGENCE_CACHE")
    if configured is not None:
        return configured
    root = checkout_root()
    if root is not None:
        return (root / "cache").resolve()
    return _user_folder("XDG_CACHE_HOME", ".cache")


@contextlib.contextmanager
def cache_root_given(folder: str | os.PathLike[str] | None) -> Iterator[Path]:
    """While the block runs, :func:`cache_root` is ``folder``: a command's ``--cache`` (or a
    config's ``cache_root``) then holds everything the command caches (runs, converted model
    weights under ``models/``, data sets' images), as ``$CONVERGENCE_CACHE`` would.

    Sets ``$CONVERGENCE_CACHE`` to ``folder`` as an absolute path (``~`` expanded, relative to
    the working folder, as the command read it), so that processes started inside the block (Ray
    workers, which are handed the variable) see it too, and restores the variable's previous
    value, or its absence, on leaving, also on an error: a caller of ``cli.main`` in the same
    process (a test, a notebook) keeps its own setting. ``folder`` None or empty changes nothing
    (the variable or the default stays). Yields :func:`cache_root` inside the block. Nothing is
    checked or made here (:func:`cache_folder` does that where the cache is written).
    """
    if folder is None or not os.fspath(folder).strip():
        yield cache_root()
        return
    previous = os.environ.get("CONVERGENCE_CACHE")
    os.environ["CONVERGENCE_CACHE"] = os.path.abspath(Path(os.fspath(folder)).expanduser())
    try:
        yield cache_root()
    finally:
        if previous is None:
            os.environ.pop("CONVERGENCE_CACHE", None)
        else:
            os.environ["CONVERGENCE_CACHE"] = previous


def check_cache_folder(folder: Path, given_as: str = "--cache") -> Path:
    """``folder`` if it and its ``runs/`` are folders or can be made (when a run is written);
    ValueError naming ``given_as`` (the option or variable that set it) when the folder is a file,
    lies under a file, or holds a file ``runs``."""
    runs = folder / "runs"
    blocking = next((p for p in (runs, *runs.parents) if p.exists() or p.is_symlink()), None)
    if blocking is None or blocking.is_dir():
        return folder
    problem = (
        "is a file, not a folder" if blocking == folder
        else f"holds a file {runs} where its runs/ folder goes" if blocking == runs
        else f"lies under {blocking}, which is a file, not a folder"
    )
    raise ValueError(
        f"the cache {folder} ({given_as}) {problem}; give the cache folder with --cache (runs are "
        "kept in its runs/ subfolder), or a new path to make one"
    )


def cache_folder(given: str | os.PathLike[str] | None, given_as: str = "--cache") -> Path:
    """The cache folder a command was given (``~`` expanded), else :func:`cache_root`; checked
    by :func:`check_cache_folder` (``given_as``: the option that gave it)."""
    if not given:
        return check_cache_folder(cache_root(), "$CONVERGENCE_CACHE or the default")
    return check_cache_folder(Path(given).expanduser(), given_as)


def runs_root() -> Path:
    """Folder holding one sub-folder per precomputed run: ``<cache_root()>/runs``."""
    return cache_root() / "runs"


def data_root() -> Path:
    """Folder holding the named data sets (``coco-mini``, ``imagenet-samples``).

    ``$CONVERGENCE_DATA``, else ``<repository>/../shared/data`` in a checkout, else
    ``$XDG_DATA_HOME/convergence-explorer`` (default ``~/.local/share/convergence-explorer``).
    """
    configured = _from_env("CONVERGENCE_DATA")
    if configured is not None:
        return configured
    root = checkout_root()
    if root is not None:
        return (root.parent / "shared" / "data").resolve()
    return _user_folder("XDG_DATA_HOME", ".local/share")


def demo_data_root() -> Path:
    """The embedded demo set (COCO format): ``$CONVERGENCE_DEMO_DATA`` or
    ``<data_root()>/coco-mini``."""
    return _from_env("CONVERGENCE_DEMO_DATA") or data_root() / "coco-mini"


def imagenet_samples_root() -> Path:
    """The labelled ImageNet sample set: ``$CONVERGENCE_IMAGENET_DATA`` or
    ``<data_root()>/imagenet-samples``."""
    return _from_env("CONVERGENCE_IMAGENET_DATA") or data_root() / "imagenet-samples"


#: Default largest image (width × height, in pixels) that is decoded: Pillow's own
#: decompression-bomb warning level, ``Image.MAX_IMAGE_PIXELS`` = 1024³ // 4 // 3 = 89,478,485
#: (a 9,500 × 9,400 photo). Camera originals stay under it (a 61 MP full-frame sensor, a 50 MP
#: phone), while one RGB image at the limit already takes 268 MB once decoded, and the dataset
#: check decodes up to 4 at a time (~1.1 GB). The models see 224-260 px crops, so nothing larger
#: is ever useful. A PNG of a few KB can claim 12,000 × 12,000 pixels (432 MB decoded).
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def max_image_pixels() -> int:
    """Largest image, in pixels (width × height), that is decoded; larger ones are bad items.

    ``$CONVERGENCE_MAX_IMAGE_PIXELS`` (a positive integer) or :data:`DEFAULT_MAX_IMAGE_PIXELS`.
    """
    text = os.environ.get("CONVERGENCE_MAX_IMAGE_PIXELS", "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"CONVERGENCE_MAX_IMAGE_PIXELS={os.environ['CONVERGENCE_MAX_IMAGE_PIXELS']!r} is not a "
            f"positive whole number of pixels; unset it (default {DEFAULT_MAX_IMAGE_PIXELS:,}) or "
            "set e.g. 50000000"
        )
    return value


#: Default longest caption excerpt on cards and in tables, in characters: every caption of the
#: demo set is whole (coco-mini: median 51, longest 240 of 1,195), while a 100,000-character
#: caption is cut to a few lines (rendering it whole froze the browser on Home).
DEFAULT_CAPTION_EXCERPT_CHARS = 300


def caption_excerpt_chars() -> int:
    """Longest caption shown on dashboard cards and in tables (the full text is one click away).

    ``$CONVERGENCE_CAPTION_EXCERPT_CHARS`` (a whole number >= 20) or
    :data:`DEFAULT_CAPTION_EXCERPT_CHARS`.
    """
    text = os.environ.get("CONVERGENCE_CAPTION_EXCERPT_CHARS", "").strip()
    if not text:
        return DEFAULT_CAPTION_EXCERPT_CHARS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 20:
        raise ValueError(
            f"CONVERGENCE_CAPTION_EXCERPT_CHARS={text!r} is not a whole number of at least 20 "
            f"characters; unset it (default {DEFAULT_CAPTION_EXCERPT_CHARS}) or set e.g. 500"
        )
    return value
