"""A run whose GPA models are brain recordings (docs/brain_data.md: GPA across subjects) is
labelled as such: the report and the pages say "brain × language", "brain dispersion", never
"vision × language" for pairs whose left side is a subject. Found by running the how-to: the
report's summary called three subject × MiniLM pairs "vision × language pairs"."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convergence_core import report
from convergence_core import write_run_from_embeddings
from tests.fixtures_runs import synthetic_embeddings
from tests.page_reading import cards

SUBJECTS = ("subj01", "subj02", "subj03")
N = 60
APP = Path(__file__).resolve().parent.parent / "app.py"


def _brain_run(root: Path, name: str, subjects: tuple[str, ...], modality: str) -> Path:
    """A run of one vision model, one language model and three subjects of ``modality`` (GPA
    across them), in ``root``/runs/``name``."""
    embeddings, _ = synthetic_embeddings(N, vision_models=("vision-a",),
                                         language_models=("language-a",))
    rng = np.random.default_rng(3)
    source = np.asarray(embeddings["vision-a"]["stage2"], dtype=np.float64)
    for subject in subjects:
        mixing = rng.standard_normal((source.shape[1], 20))
        embeddings[subject] = {
            "V1": (source @ mixing + rng.standard_normal((N, 20))).astype(np.float32),
        }
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(N)],
                            "image": [f"{i}.jpg" for i in range(N)],
                            "captions": [[f"caption {i}", f"another {i}"] for i in range(N)]})
    write_run_from_embeddings(
        root / "runs" / name, stimuli, embeddings, vision_models=["vision-a"],
        language_models=["language-a"], modalities=dict.fromkeys(subjects, modality),
        gpa_models=list(subjects), gpa_layers=dict.fromkeys(subjects, "V1"), thumbnails=False,
    )
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one vision model, one language model and three subjects (GPA across them)."""
    return _brain_run(tmp_path_factory.mktemp("brain_gpa"), "brains", SUBJECTS, "brain")


def test_the_run_names_its_gpa_modality(cache: Path) -> None:
    from convergence_core import load_run
    from convergence_core.cli import run_line

    run = load_run(cache / "runs" / "brains")
    assert run.gpa_modality == "brain"
    assert run.partner_models == ["language-a", "vision-a"]
    # `runs` lists the subjects with their modality and that they are the GPA models
    import io

    from convergence_core.cli import main

    listing = io.StringIO()
    assert main(["runs", "--cache", str(cache)], out=listing) == 0
    assert "subj01,subj02,subj03 (brain; GPA)" in listing.getvalue()
    # precompute's last line lists the subjects and says that GPA ran across them
    assert run_line(run) == (
        f"run {run.path}: {N} stimuli; vision vision-a; language language-a; "
        f"brain subj01, subj02, subj03; GPA across subj01, subj02, subj03: {run.gpa.n_iter} "
        "iterations (converged)"
    )


@pytest.fixture(scope="module")
def written(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brain_report")
    fast = ["--n-random", "20", "--n-permutations", "40", "--k", "5", "--size", "15",
            "--metrics", "cknna", "--metric-permutations", "10", "--n-shuffles", "10",
            "--predictivity-random", "2", "--blind-matching-random", "2", "--scores", "mean",
            "--skip", "many_to_many"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert report.main([str(cache / "runs" / "brains"), "--out", str(out), *fast]) == 0
    return out


def test_the_report_calls_the_pairs_by_their_modalities(written: Path) -> None:
    text = (written / "summary.txt").read_text(encoding="utf-8")
    assert "vision × language" not in text and "vision → language" not in text
    assert "brain × language:" in text and "brain × vision:" in text  # a table for each side
    # the verdict: 3 subjects × 1 language model (sets of 15, under MIN_CKNNA_SET_SIZE: "for the
    # 3 brain × language pairs: no verdict"; with counts "holds for … of 3 brain × language pairs")
    assert "3 brain × language pairs" in text
    assert "brain → language: low > high" in text and "language → brain" in text
    tables = [block for block in text.split("\n\n") if block.startswith("brain × ")]
    assert tables[0].splitlines()[1].split()[:3] == ["score", "brain", "language"]
    assert tables[1].splitlines()[1].split()[:3] == ["score", "brain", "vision"]
    meta = json.loads((written / "report.json").read_text(encoding="utf-8"))
    assert meta["universal_space"]["relation"]["y"] == "brain_dispersion_mean"


def _app(cache: Path, monkeypatch: pytest.MonkeyPatch, page: str | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "brains"
    at.run(timeout=60)
    if page is not None:
        at.switch_page(page).run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def test_home_says_which_models_gpa_aligned(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(cache, monkeypatch)
    texts = [t.value for t in at.text]
    assert any(t.startswith("Where do the GPA models (subj01, subj02, subj03: brain) agree")
               for t in texts), texts[:3]


def test_paper_page_verdict_names_brain_pairs(cache: Path, monkeypatch) -> None:
    at = _app(cache, monkeypatch, "pages/4_Paper_analyses.py")
    verdicts = [t.value for t in at.text if t.value.startswith("low > random > high")]
    assert verdicts and all("brain × language pairs" in v for v in verdicts), verdicts
    assert at.caption[0].value.startswith("Does low dispersion (the GPA models, brain, agree)")


def test_universal_page_relates_to_brain_dispersion(cache: Path, monkeypatch) -> None:
    at = _app(cache, monkeypatch, "pages/6_Universal_space.py")
    assert "ρ with brain dispersion" in cards(at) and "ρ with vision dispersion" not in cards(at)
    assert at.radio(key="w_score").label == "Brain dispersion"


# --------------------------------------------------------------------------- names as text

#: a modality name the run writers accept whose '_' can open and close emphasis in Markdown
#: ("f-_mri_" rendered "f-" and an italic "mri"), and a model name made of underscores
ODD_MODALITY = "f-_mri_"
ODD_SUBJECTS = ("__x__", "subj02", "subj03")


@pytest.fixture(scope="module")
def odd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The brain run of :func:`cache`, its subjects of modality ``f-_mri_``, one named ``__x__``."""
    return _brain_run(tmp_path_factory.mktemp("odd_names"), "odd", ODD_SUBJECTS, ODD_MODALITY)


def _odd_app(cache: Path, monkeypatch: pytest.MonkeyPatch, page: str, **state: object):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONVERGENCE_CACHE", str(cache))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "odd"
    at.run(timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(page).run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


#: the modality as Markdown that shows it as written
ODD_SHOWN = "f\\-\\_mri\\_"


def test_the_odd_names_need_escaping() -> None:
    """Widget labels, radio options, help texts, captions and subheaders render Markdown: the
    run's GPA modality (and a model named ``__x__``) in them is escaped, so that it shows as
    written, never as emphasis (the tests below). Plain-text elements (st.text, tables, the
    browser-drawn controls of ``dashboard.controls``) quote it as is."""
    from convergence_core.dashboard import widgets

    assert widgets.escape_markdown(ODD_MODALITY) == ODD_SHOWN


def test_paper_page_shows_the_modality_as_written(odd_cache: Path, monkeypatch) -> None:
    at = _odd_app(odd_cache, monkeypatch, "pages/4_Paper_analyses.py")
    assert at.caption[0].value.startswith(f"Does low dispersion (the GPA models, {ODD_SHOWN}, ")
    assert f"across the {ODD_SHOWN} models (GPA)" in at.radio(key="w_score").help
    assert at.radio(key="w_paper_partners").options == [
        f"{ODD_SHOWN} × language", f"{ODD_SHOWN} × vision"
    ]


def test_universal_page_shows_the_modality_as_written(odd_cache: Path, monkeypatch) -> None:
    score = _odd_app(odd_cache, monkeypatch, "pages/6_Universal_space.py").radio(key="w_score")
    assert score.label == "F\\-\\_mri\\_ dispersion"
    assert "GPA models (\\_\\_x\\_\\_, subj02, subj03)" in score.help


def test_lab_shows_the_modality_as_written(odd_cache: Path, monkeypatch) -> None:
    at = _odd_app(odd_cache, monkeypatch, "pages/3_Alignment_lab.py")
    captions = [c.value for c in at.caption]
    assert any(f" {ODD_SHOWN} × language\\/vision pairs shown:" in c for c in captions), captions


def test_stimuli_page_shows_the_modality_as_written(odd_cache: Path, monkeypatch) -> None:
    from convergence_core.dashboard import widgets

    at = _odd_app(odd_cache, monkeypatch, "pages/1_Stimuli.py", w_gallery_order="knn_overlap")
    # the gallery's sides are explained in plain text (st.text): the name as written
    texts = [t.value for t in at.text]
    assert any(f"Left: {ODD_MODALITY} and " in t for t in texts), texts
    at = _odd_app(odd_cache, monkeypatch, "pages/1_Stimuli.py",
                  **{widgets.STIMULI_TAB_KEY: widgets.DETAIL_TAB})
    captions = [c.value for c in at.caption]
    assert any("F\\-\\_mri\\_ models (GPA) at their GPA layer" in c for c in captions), captions
