"""Build hook: the dashboard travels in the wheel. Everything else is declared in pyproject.toml.

The dashboard lives at the repository root (``app.py``, ``pages/``, ``.streamlit/config.toml``):
``streamlit run app.py`` and ``make demo`` use it there. Streamlit finds a multipage app's pages
in the ``pages/`` folder beside its main script, and reads the ``.streamlit/config.toml`` beside
it, so the three must stay together. ``build_py`` copies them into the package folder
``convergence_core/dashboard/streamlit_app/`` of the build (never into the source tree), where
``convergence serve`` finds them (``convergence_core.dashboard.serve.app_folder``). They are also
listed as source files, so an sdist carries them and a wheel built from the sdist has them too.
An editable install (``pip install -e .``) copies nothing: it serves the checkout's own files.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

#: the folder inside the package that receives the dashboard
TARGET = Path("convergence_core", "dashboard", "streamlit_app")


def dashboard_files() -> list[str]:
    """The dashboard's files, relative to the repository root (POSIX separators)."""
    pages = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "pages").glob("*.py"))
    files = ["app.py", "home.py", ".streamlit/config.toml", *pages]
    missing = [name for name in files if not (ROOT / name).is_file()]
    if missing or not pages:
        raise FileNotFoundError(
            f"the dashboard files {missing or ['pages/*.py']} are missing from {ROOT}; build "
            "from a complete checkout (or an sdist made from one)"
        )
    return files


class BuildPyWithDashboard(build_py):
    """``build_py`` that also copies the dashboard into ``<build_lib>/convergence_core/dashboard/
    streamlit_app/`` (skipped for editable installs)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in dashboard_files():
            target = Path(self.build_lib, TARGET, name)
            self.mkpath(str(target.parent))
            self.copy_file(str(ROOT / name), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [str(Path(self.build_lib, TARGET, name)) for name in dashboard_files()]
        return outputs

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), *dashboard_files()]


setup(cmdclass={"build_py": BuildPyWithDashboard})
